//! The composition root: [`App`] holds every domain service, serves the HTTP router
//! ([`App::serve`]) and runs the background tasks (hold sweep and plan renewals, tool-list
//! TTL refresh and list-changed watches, idle upstream session reaper, alert delivery), all children of
//! one cancellation token and awaited on shutdown.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::KeyContext;
use crate::auth::accounts::AccountError;
use crate::auth::{KeyError, Signer, SigningError};
use crate::billing::{BillingError, Ledger};
use crate::catalog::{Catalog, CatalogError, Server, ServerStatus};
use crate::config::Config;
use crate::gateway::notify::Notifier;
use crate::security::EndpointPolicy;
use crate::security::audit::{self, Actor};
use crate::security::credentials::{self, CredentialError, CredentialInfo};
use crate::security::policy::{Defaults, Effective, Policies, PolicyError};
use crate::security::ratelimit::{AccountLimitSource, AccountLimits, ConcurrencyCaps, RateLimiter};
use crate::security::ssrf::{Lookup, SystemLookup};
use crate::security::vault::{Vault, VaultError};
use crate::store::versions::Domain;
use crate::store::{Store, StoreError, now_ms};
use crate::upstream::{UpstreamError, Upstreams};

/// How often the reaper closes idle upstream sessions.
const REAP_INTERVAL: Duration = Duration::from_secs(30);
/// How often the refresher looks for stale tool lists and servers without a watch.
const REFRESH_SCAN_INTERVAL: Duration = Duration::from_secs(60);
/// Longest pause between reconnects of a list-changed watch.
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// After the last call of a shutdown ended, how long its answer gets to reach the
/// client before the MCP sessions close.
const RESULT_FLUSH: Duration = Duration::from_millis(250);
/// Extra time, beyond a server's timeout, before a hold counts as abandoned (ms).
pub const HOLD_GRACE_MS: i64 = 60_000;
/// Longest a cached effective trust policy is used (ms), whatever the generations: a
/// plan change scheduled for a time (`account_plans.effective_at`) takes effect within
/// one second without any write.
const POLICY_CACHE_MS: i64 = 1_000;
/// Most entries of each per-process cache of the call path (policies, upstream
/// headers); past it the cache starts afresh.
const CACHE_CAPACITY: usize = 100_000;

/// Errors that cross domains (the CLI and the REST API map them).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A catalog error.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A billing error.
    #[error(transparent)]
    Billing(#[from] BillingError),
    /// A key error.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// An account error.
    #[error(transparent)]
    Account(#[from] AccountError),
    /// A signing error.
    #[error(transparent)]
    Signing(#[from] SigningError),
    /// An upstream error while fetching tools.
    #[error("fetching the server's tools failed: {0}")]
    Upstream(#[from] UpstreamError),
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A configuration error.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The master key or a stored ciphertext.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// Upstream credentials.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// A trust policy.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Alert channels or delivery.
    #[error(transparent)]
    Alert(#[from] crate::alerts::AlertError),
    /// A socket or file error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Every service of a running marketplace. Shared as `Arc<App>`.
#[derive(Debug)]
pub struct App {
    /// Resolved configuration.
    pub config: Config,
    /// The database.
    pub store: Store,
    /// Change versions of the in-memory snapshots (the store's, see
    /// [`crate::store::versions`]): a write through this process is seen by the next
    /// request, a write by another process within one second (the poller runs every
    /// 250 ms while the app serves).
    pub versions: Arc<crate::store::Versions>,
    /// The ledger.
    pub ledger: Ledger,
    /// The catalog.
    pub catalog: Catalog,
    /// The signing key.
    pub signer: Signer,
    /// Upstream sessions.
    pub upstreams: Upstreams,
    /// Open downstream MCP sessions, for `notifications/tools/list_changed`.
    pub notifier: Notifier,
    /// Endpoint URL policy (and the SSRF-checking DNS lookup).
    pub policy: EndpointPolicy,
    /// The master key: upstream credentials at rest.
    pub vault: Vault,
    /// Per-server, per-account and per-key trust policy overrides.
    pub policies: Policies,
    /// Rate limiters (GCRA) of this process.
    pub rate_limits: RateLimiter,
    /// Per-server concurrency caps of this process.
    pub concurrency: ConcurrencyCaps,
    /// Circuit breakers and load per endpoint (issue 4).
    pub breakers: crate::upstream::breaker::Breakers,
    /// Live-call failure streaks feeding the status machine (issue 4).
    pub call_health: crate::upstream::health::CallHealth,
    /// The alert outbox's delivery worker (run as a background task).
    pub alerts: crate::alerts::worker::Worker,
    /// Authenticated keys served from memory (see [`KeyCache`]).
    pub keys: crate::auth::keys::KeyCache,
    /// Effective trust policies by (server id or "", account id, key id), with the auth
    /// generation and the time (epoch ms) they were built at.
    policy_cache: DashMap<(String, String, String), (u64, i64, Effective)>,
    /// Held while a policy is rebuilt, so that the calls in flight when a cached policy
    /// expires wait for one rebuild instead of each querying the store.
    policy_rebuild: tokio::sync::Mutex<()>,
    /// Fixed upstream headers (secret and decrypted credentials) by server id, with the
    /// catalog and auth generations they were built at.
    header_cache: DashMap<String, (u64, u64, http::HeaderMap)>,
    account_limits: std::sync::RwLock<Option<Arc<dyn AccountLimitSource>>>,
    refresh_tx: mpsc::UnboundedSender<String>,
    refresh_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    watches: DashMap<String, CancellationToken>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Calls between the breaker check and their settle or refund (issue 4 item 6).
    in_flight: TaskTracker,
    /// Cancelled when a shutdown's grace is over: calls still running are cancelled.
    drain: CancellationToken,
}

impl App {
    /// Connects the store (migrating it), loads or makes the signing key, refunds holds
    /// left by a previous process (the sweep at start), and books this month's plan fees
    /// and included credits that are due.
    ///
    /// # Errors
    /// [`AppError::Store`], [`AppError::Signing`], [`AppError::Upstream`].
    pub async fn new(config: Config) -> Result<Arc<Self>, AppError> {
        let store = Store::connect(&config.database_url).await?;
        Self::with_store(config, store).await
    }

    /// As [`App::new`] on an already connected store.
    ///
    /// # Errors
    /// As [`App::new`].
    pub async fn with_store(config: Config, store: Store) -> Result<Arc<Self>, AppError> {
        crate::telemetry::install();
        let vault = Vault::load(&config.master_key)?;
        vault.check(&store).await?;
        let signer = Signer::load_or_create(&store).await?;
        let ledger = Ledger::new(store.clone()).with_plans(config.billing.plans.clone());
        let swept = ledger.sweep_expired_holds(now_ms()).await?;
        if swept > 0 {
            tracing::warn!(swept, "refunded holds left by an earlier process");
        }
        let catalog = Catalog::new(store.clone());
        let pinned = catalog.backfill_tool_pins().await?;
        if pinned > 0 {
            tracing::info!(pinned, "pinned tools cached before tool pinning existed");
        }
        // The search index and reputation of servers written before they existed.
        catalog.reindex_all().await?;
        let lookup: Arc<dyn Lookup> = match &config.lookup {
            Some(l) => l.clone(),
            None => Arc::new(SystemLookup::new()),
        };
        let policy = EndpointPolicy::new(config.allow_upstream_hosts.clone(), lookup);
        let renewed = ledger.renew_subscriptions().await?;
        if renewed > 0 {
            tracing::info!(
                renewed,
                "booked this month's plan fees and included credits"
            );
        }
        let (refresh_tx, refresh_rx) = mpsc::unbounded_channel();
        let alerts = crate::alerts::worker::Worker::new(
            store.clone(),
            vault.clone(),
            policy.clone(),
            config.alerts.clone(),
        )?;
        Ok(Arc::new(Self {
            alerts,
            upstreams: Upstreams::new(
                config.max_response_bytes,
                config.session_idle.as_millis() as i64,
                policy.clone(),
            )?,
            policy,
            vault,
            policies: Policies::new(store.clone()),
            rate_limits: RateLimiter::default(),
            concurrency: ConcurrencyCaps::default(),
            breakers: crate::upstream::breaker::Breakers::new(config.reliability.breaker),
            call_health: crate::upstream::health::CallHealth::default(),
            keys: crate::auth::keys::KeyCache::default(),
            policy_cache: DashMap::new(),
            policy_rebuild: tokio::sync::Mutex::new(()),
            header_cache: DashMap::new(),
            // Billing plans set per-account rate limits (replaceable by embedders/tests).
            account_limits: std::sync::RwLock::new(Some(Arc::new(crate::billing::PlanLimits(
                ledger.clone(),
            )))),
            catalog,
            notifier: Notifier::default(),
            config,
            ledger,
            signer,
            versions: store.versions().clone(),
            store,
            refresh_tx,
            refresh_rx: std::sync::Mutex::new(Some(refresh_rx)),
            watches: DashMap::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            in_flight: TaskTracker::new(),
            drain: CancellationToken::new(),
        }))
    }

    /// Approves `slug` as the marketplace itself (the demo, tests); see
    /// [`App::approve_as`].
    ///
    /// # Errors
    /// As [`App::approve_as`].
    pub async fn approve(self: &Arc<Self>, slug: &str) -> Result<Server, AppError> {
        self.approve_as(&Actor::System, slug).await
    }

    /// Approves `slug`: fetches its tools (the server must answer), caches them, marks
    /// it active and starts watching it for `list_changed`. The first approval (from
    /// `pending_review`) also approves every tool it offers; later approvals leave
    /// held-back tool changes to [`App::approve_tools`]. On a fetch failure nothing
    /// changes. Audited as `server.approve`.
    ///
    /// # Errors
    /// [`AppError::Catalog`] (unknown server), [`AppError::Upstream`].
    pub async fn approve_as(
        self: &Arc<Self>,
        actor: &Actor,
        slug: &str,
    ) -> Result<Server, AppError> {
        let server = self.catalog.get(slug).await?;
        // A server whose verification failed is never listed.
        crate::market::ensure_verified(self, &server).await?;
        let fixed = self.upstream_headers(&server).await?;
        let tools = self.upstreams.fetch_tools(&server, &fixed).await?;
        self.catalog.replace_tools(&server, &tools).await?;
        let first = server.status == ServerStatus::PendingReview;
        if first {
            self.catalog
                .approve_tools(&server.id, None, &actor.label())
                .await?;
        }
        let server = crate::upstream::health::set_status_by_admin(
            self,
            slug,
            ServerStatus::Active,
            "approved by an admin",
        )
        .await?;
        let _ = audit::record(
            &self.store,
            actor,
            "server.approve",
            slug,
            serde_json::json!({"tools": tools.len(), "first_approval": first}),
        )
        .await;
        self.start_watch(&server);
        self.notify_server(&server.id).await;
        Ok(server)
    }

    /// Approves held-back tool changes of `slug` (`servers approve SLUG --tools`): pins
    /// the cached definitions of `tools` (every held-back tool when `None`) and tells
    /// the sessions that see the server. Returns the names approved. Audited as
    /// `server.approve_tools`.
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn approve_tools(
        &self,
        actor: &Actor,
        slug: &str,
        tools: Option<&[String]>,
    ) -> Result<Vec<String>, AppError> {
        let server = self.catalog.get(slug).await?;
        let pending: Vec<String> = self
            .catalog
            .pending_tool_changes(&server.id)
            .await?
            .into_iter()
            .map(|c| c.tool)
            .filter(|t| tools.is_none_or(|names| names.contains(t)))
            .collect();
        let approved = self
            .catalog
            .approve_tools(&server.id, Some(&pending), &actor.label())
            .await?;
        if !approved.is_empty() {
            let _ = audit::record(
                &self.store,
                actor,
                "server.approve_tools",
                slug,
                serde_json::json!({"tools": approved}),
            )
            .await;
            self.notify_server(&server.id).await;
        }
        Ok(approved)
    }

    /// Suspends `slug` as the marketplace itself; see [`App::suspend_as`].
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn suspend(&self, slug: &str) -> Result<Server, AppError> {
        self.suspend_as(&Actor::System, slug).await
    }

    /// Suspends `slug`: hidden from every `tools/list`, not callable, its upstream
    /// sessions and watch closed. Audited as `server.suspend`.
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn suspend_as(&self, actor: &Actor, slug: &str) -> Result<Server, AppError> {
        let server = crate::upstream::health::set_status_by_admin(
            self,
            slug,
            ServerStatus::Suspended,
            "suspended by an admin",
        )
        .await?;
        let _ = audit::record(
            &self.store,
            actor,
            "server.suspend",
            slug,
            serde_json::json!({}),
        )
        .await;
        if let Some((_, token)) = self.watches.remove(&server.id) {
            token.cancel();
        }
        self.upstreams.close_server(&server.id).await;
        self.notify_server(&server.id).await;
        Ok(server)
    }

    /// The headers every upstream request to `server` carries: its
    /// `X-MCP-Marketplace-Secret` and the creator's decrypted credentials (sensitive).
    /// Served from memory while the catalog and auth generations are the ones they were
    /// built at, so a rotated secret or new credentials reach the next call.
    ///
    /// # Errors
    /// [`AppError::Catalog`], [`AppError::Credential`].
    pub async fn upstream_headers(&self, server: &Server) -> Result<http::HeaderMap, AppError> {
        // Generations read before the store: a change committed meanwhile makes the
        // entry stale at once.
        let generations = (
            self.versions.generation(Domain::Catalog),
            self.versions.generation(Domain::Auth),
        );
        if let Some(entry) = self.header_cache.get(&server.id) {
            let (catalog, auth, headers) = entry.value();
            if (*catalog, *auth) == generations {
                return Ok(headers.clone());
            }
        }
        let secret = self.catalog.secret(&server.id).await?;
        let headers =
            credentials::upstream_headers(&self.store, &self.vault, &server.id, &secret).await?;
        if self.header_cache.len() >= CACHE_CAPACITY {
            self.header_cache.clear();
        }
        self.header_cache.insert(
            server.id.clone(),
            (generations.0, generations.1, headers.clone()),
        );
        Ok(headers)
    }

    /// Replaces the upstream credentials of `slug` (validated, encrypted) and closes its
    /// upstream sessions so the next call uses them. Audited as
    /// `server.credentials_set` with the header names only.
    ///
    /// # Errors
    /// [`AppError::Catalog`], [`AppError::Credential`].
    pub async fn set_credentials(
        &self,
        actor: &Actor,
        slug: &str,
        headers: &[(String, String)],
    ) -> Result<Vec<CredentialInfo>, AppError> {
        let server = self.catalog.get(slug).await?;
        let stored =
            credentials::set_credentials(&self.store, &self.vault, &server.id, headers).await?;
        let names: Vec<&str> = stored.iter().map(|c| c.header.as_str()).collect();
        let _ = audit::record(
            &self.store,
            actor,
            "server.credentials_set",
            slug,
            serde_json::json!({"headers": names}),
        )
        .await;
        self.upstreams.close_server(&server.id).await;
        Ok(stored)
    }

    /// Makes a new `X-MCP-Marketplace-Secret` for `slug`, closes its upstream sessions
    /// (they carry the old one) and returns it, shown this once. Audited as
    /// `server.secret_rotate`.
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn rotate_secret(&self, actor: &Actor, slug: &str) -> Result<String, AppError> {
        let (server, secret) = self.catalog.rotate_secret(slug).await?;
        // The cached upstream headers carry the old secret.
        self.versions.invalidate(Domain::Auth);
        let _ = audit::record(
            &self.store,
            actor,
            "server.secret_rotate",
            slug,
            serde_json::json!({}),
        )
        .await;
        self.upstreams.close_server(&server.id).await;
        Ok(secret)
    }

    /// Plugs in a source of per-account rate limits (e.g. billing plans); see
    /// `security::ratelimit::AccountLimitSource`. Replaces any earlier one.
    pub fn set_account_limit_source(&self, source: Arc<dyn AccountLimitSource>) {
        if let Ok(mut s) = self.account_limits.write() {
            *s = Some(source);
        }
    }

    /// The trust policy of one call by `key` (to `server_id` for an upstream tool):
    /// the configured defaults, the database's overrides and the account limit source,
    /// per `security::policy`. Served from memory while the auth generation is the one
    /// it was built at and for at most one second (see [`crate::store::versions`]);
    /// when it is stale, one call rebuilds it (two store reads) while the others wait
    /// for that rebuild (before, each call that met it stale read it again: about 22
    /// reads a second at 32 calls in flight, on SQLite's one connection).
    ///
    /// # Errors
    /// [`AppError::Policy`].
    pub async fn effective_policy(
        &self,
        server_id: Option<&str>,
        key: &KeyContext,
    ) -> Result<Effective, AppError> {
        let cache_key = (
            server_id.unwrap_or("").to_owned(),
            key.account_id.clone(),
            key.key_id.clone(),
        );
        let cached = |generation: u64, now: i64| {
            self.policy_cache.get(&cache_key).and_then(|entry| {
                let (at, built_ms, policy) = entry.value();
                (*at == generation && now - built_ms < POLICY_CACHE_MS).then(|| policy.clone())
            })
        };
        if let Some(policy) = cached(self.versions.generation(Domain::Auth), now_ms()) {
            return Ok(policy);
        }
        let _rebuild = self.policy_rebuild.lock().await;
        // Read before loading: a write committed during the load moves the generation
        // past it, and the next call rebuilds.
        let generation = self.versions.generation(Domain::Auth);
        let now = now_ms();
        if let Some(policy) = cached(generation, now) {
            // Rebuilt by the call this one waited for.
            return Ok(policy);
        }
        let subjects = self
            .policies
            .for_call(server_id, &key.account_id, &key.key_id)
            .await?;
        let source = self.account_limits.read().ok().and_then(|s| s.clone());
        let plan = match source {
            Some(s) => s.account_limits(&key.account_id).await,
            None => AccountLimits::default(),
        };
        let defaults = Defaults {
            limits: self.config.rate_limits,
            max_concurrency: self.config.max_concurrency_per_server,
            scan: self.config.scan_mode,
        };
        let policy = Effective::resolve(
            &defaults,
            &subjects.server,
            &subjects.account,
            &subjects.key,
            &plan,
        );
        if self.policy_cache.len() >= CACHE_CAPACITY {
            self.policy_cache.clear();
        }
        self.policy_cache
            .insert(cache_key, (generation, now, policy.clone()));
        Ok(policy)
    }

    /// Installs `slug` for `account_id` and tells the account's open sessions.
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn install(&self, account_id: &str, slug: &str) -> Result<bool, AppError> {
        let added = self.catalog.install(account_id, slug).await?;
        if added {
            self.notifier.tools_changed(&[account_id.to_owned()], None);
        }
        Ok(added)
    }

    /// Uninstalls `slug` for `account_id` and tells the account's open sessions.
    ///
    /// # Errors
    /// [`AppError::Catalog`].
    pub async fn uninstall(&self, account_id: &str, slug: &str) -> Result<bool, AppError> {
        let removed = self.catalog.uninstall(account_id, slug).await?;
        if removed {
            self.notifier.tools_changed(&[account_id.to_owned()], None);
        }
        Ok(removed)
    }

    /// Re-reads the tool list of `server_id` and, when it changed, tells every session
    /// that sees the server. Returns whether it changed.
    ///
    /// # Errors
    /// [`AppError::Catalog`], [`AppError::Upstream`].
    pub async fn refresh_tools(&self, server_id: &str) -> Result<bool, AppError> {
        let server = self.catalog.get_by_id(server_id).await?;
        if !server.status.is_callable() {
            return Ok(false);
        }
        let fixed = self.upstream_headers(&server).await?;
        let tools = self.upstreams.fetch_tools(&server, &fixed).await?;
        let changed = self.catalog.replace_tools(&server, &tools).await?;
        if changed {
            tracing::info!(server = %server.slug, "upstream tool list changed");
            self.notify_server(&server.id).await;
        }
        Ok(changed)
    }

    /// Asks the background refresher to re-read `server_id`'s tools (an upstream sent
    /// `notifications/tools/list_changed`).
    pub fn request_refresh(&self, server_id: &str) {
        let _ = self.refresh_tx.send(server_id.to_owned());
    }

    /// Sends `notifications/tools/list_changed` to the sessions that see `server_id`.
    pub(crate) async fn notify_server(&self, server_id: &str) {
        match (
            self.catalog.installed_by(server_id).await,
            self.catalog.get_by_id(server_id).await,
        ) {
            (Ok(accounts), Ok(server)) => {
                self.notifier.tools_changed(&accounts, Some(&server.slug))
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot notify sessions of a tool change")
            }
        }
    }

    /// Starts the `list_changed` watch of `server` unless one runs.
    fn start_watch(self: &Arc<Self>, server: &Server) {
        if self.watches.contains_key(&server.id) || self.shutdown.is_cancelled() {
            return;
        }
        let token = self.shutdown.child_token();
        self.watches.insert(server.id.clone(), token.clone());
        let app = self.clone();
        let server_id = server.id.clone();
        self.tasks.spawn(async move {
            app.watch(server_id.clone(), token).await;
            app.watches.remove(&server_id);
        });
    }

    /// Keeps a standalone SSE stream open to the upstream and refreshes the cached tools
    /// on each `notifications/tools/list_changed`; reconnects with capped backoff, stops
    /// when the server is no longer callable or offers no stream.
    async fn watch(self: &Arc<Self>, server_id: String, token: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let Ok(server) = self.catalog.get_by_id(&server_id).await else {
                return;
            };
            if !server.status.is_callable() {
                return;
            }
            let Ok(fixed) = self.upstream_headers(&server).await else {
                return;
            };
            let Some(session) = self.upstreams.detached_session(&server, &fixed) else {
                return;
            };
            let tx = self.refresh_tx.clone();
            let id = server_id.clone();
            let on_message = move |m: Value| {
                if m.get("method").and_then(Value::as_str)
                    == Some("notifications/tools/list_changed")
                {
                    let _ = tx.send(id.clone());
                }
            };
            let outcome = tokio::select! {
                r = session.listen(&on_message) => r,
                () = token.cancelled() => { session.close().await; return; }
            };
            session.close().await;
            match outcome {
                Err(UpstreamError::HttpStatus(405)) => {
                    tracing::debug!(server = %server.slug, "upstream offers no notification stream; relying on the TTL refresh");
                    return;
                }
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::debug!(server = %server.slug, error = %e, "list_changed watch broke")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = token.cancelled() => return,
            }
            backoff = (backoff * 2).min(WATCH_MAX_BACKOFF);
        }
    }

    /// Serves the marketplace on `listener` ([`crate::server::serve`], under
    /// `config.http`) until `shutdown` is cancelled, then lets the calls in flight
    /// finish, closes every connection once its response in progress is done, stops
    /// the background tasks and closes upstream sessions. Failures of single
    /// connections or accepts are logged, never returned.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        self.spawn_background();
        // Every route made a service once, here: served as a `Router` with state, axum
        // would rebuild the route table for each connection (`with_state` per
        // connection), about 18 KiB per open connection (issue 7: memory with 1,000
        // sessions); a `Router<()>` clones as a reference count.
        let router = crate::gateway::router(self.clone()).with_state(());
        let app = self.clone();
        crate::server::serve(listener, router, self.config.http, async move {
            shutdown.cancelled().await;
            app.drain_calls().await;
            app.shutdown.cancel();
        })
        .await;
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.upstreams.close_all().await;
    }

    /// A guard a `tools/call` holds from its breaker check until it is settled or
    /// refunded; `None` once a shutdown began (the call is refused, uncharged).
    pub fn call_guard(&self) -> Option<tokio_util::task::task_tracker::TaskTrackerToken> {
        (!self.in_flight.is_closed()).then(|| self.in_flight.token())
    }

    /// Cancelled when a shutdown's grace is over; calls still forwarding then stop and
    /// are refunded.
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    /// Calls currently between their breaker check and their settle or refund.
    pub fn calls_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The first step of a graceful shutdown (issue 4 item 6): refuses new calls, lets
    /// the calls in flight finish for up to `shutdown_grace`, then cancels the rest
    /// (each is refunded by its own call path) and waits for their refunds.
    async fn drain_calls(&self) {
        self.in_flight.close();
        let grace = self.config.reliability.shutdown_grace;
        let running = self.in_flight.len();
        if running > 0 {
            tracing::info!(running, "shutting down: letting calls in flight finish");
        }
        if tokio::time::timeout(grace, self.in_flight.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.in_flight.len(),
                "shutdown grace over: cancelling and refunding the calls still running"
            );
            self.drain.cancel();
            // Refunds are single transactions; this bounds a stuck database.
            let _ = tokio::time::timeout(Duration::from_secs(30), self.in_flight.wait()).await;
        }
        if running > 0 {
            // The last results are written to their SSE streams after their calls
            // returned; give them a moment before the sessions close.
            tokio::time::sleep(RESULT_FLUSH).await;
        }
    }

    /// The token cancelled when the marketplace shuts down (rmcp sessions use it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    fn spawn_background(self: &Arc<Self>) {
        let token = self.shutdown.clone();
        // The snapshot version poller: writes by other processes reach every cache
        // within one second.
        let versions = self.versions.clone();
        let t = token.clone();
        self.tasks
            .spawn(async move { versions.run_poller(t).await });
        // The alert outbox's delivery worker.
        let worker = self.alerts.clone();
        let t = token.clone();
        self.tasks.spawn(async move { worker.run(t).await });
        // The hold sweep.
        let app = self.clone();
        let t = token.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(app.config.sweep_interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = t.cancelled() => return,
                }
                match app.ledger.sweep_expired_holds(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(refunded = n, "hold sweep refunded abandoned calls"),
                    Err(e) => tracing::error!(error = %e, "hold sweep failed"),
                }
                // A new month, or a plan change that took effect: book its fee and credits.
                match app.ledger.renew_subscriptions().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(renewed = n, "booked plan fees and included credits"),
                    Err(e) => tracing::error!(error = %e, "plan renewal failed"),
                }
            }
        });
        // The reputation job (README "Reputation").
        let app = self.clone();
        let t = token.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(app.config.marketplace.reputation_interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = t.cancelled() => return,
                }
                if let Err(e) = app.catalog.refresh_reputations().await {
                    tracing::error!(error = %e, "reputation job failed");
                }
            }
        });
        // The idle session reaper.
        let app = self.clone();
        let t = token.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = t.cancelled() => return,
                }
                app.upstreams.reap_idle().await;
                app.rate_limits.evict_idle();
            }
        });
        // The probe scheduler (issue 4).
        let r = self.config.reliability;
        self.tasks.spawn(crate::upstream::probe::run_scheduler(
            self.clone(),
            r.probe_interval,
            r.probe_concurrency,
            token.clone(),
        ));
        // The tool-list refresher: list_changed requests, plus a TTL scan that also
        // starts watches for servers approved elsewhere (the CLI, another replica).
        let rx = self.refresh_rx.lock().ok().and_then(|mut r| r.take());
        let Some(mut rx) = rx else { return };
        let app = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_SCAN_INTERVAL.min(app.config.tools_ttl));
            loop {
                tokio::select! {
                    Some(server_id) = rx.recv() => {
                        if let Err(e) = app.refresh_tools(&server_id).await {
                            tracing::warn!(error = %e, "tool list refresh failed");
                        }
                    }
                    _ = tick.tick() => app.scan().await,
                    () = token.cancelled() => return,
                }
            }
        });
    }

    async fn scan(self: &Arc<Self>) {
        let cutoff = now_ms() - self.config.tools_ttl.as_millis() as i64;
        match self.catalog.stale_tool_lists(cutoff).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = self.refresh_tools(&id).await {
                        tracing::warn!(error = %e, "TTL tool list refresh failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot scan for stale tool lists"),
        }
        if let Ok(servers) = self.catalog.list().await {
            for s in servers.iter().filter(|s| s.status.is_callable()) {
                self.start_watch(s);
            }
        }
    }
}
