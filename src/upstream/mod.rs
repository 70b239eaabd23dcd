//! Upstreams: the marketplace's side of every upstream MCP server. [`client`] speaks
//! MCP over streamable HTTP; [`Upstreams`] keeps one session per (account, server),
//! opened lazily and closed when idle, so no account ever shares upstream session state
//! with another, and fetches tool lists for the catalog.

pub mod breaker;
pub mod client;
pub mod failover;
pub mod health;
pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderMap;
use serde_json::{Value, json};

pub use client::{UpstreamError, UpstreamSession};

use crate::catalog::Server;
use crate::security::EndpointPolicy;
use crate::store::now_ms;

/// Most `tools/list` pages read from one upstream (a server that pages forever stops
/// here).
pub const MAX_LIST_PAGES: usize = 20;
/// Deadline of a whole tool-list fetch.
pub const TOOL_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// An (account, server) session unused this long is closed (ms).
pub const DEFAULT_SESSION_IDLE_MS: i64 = 5 * 60 * 1000;

/// Settings of the reliability layer (issue 4): `[probes]` and `shutdown_grace` in the
/// configuration file, the breaker's thresholds (documented in [`breaker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReliabilityConfig {
    /// Interval of scheduled probes (`[probes] interval`, default 5 min).
    pub probe_interval: Duration,
    /// Servers probed at once (`[probes] concurrency`, default 4).
    pub probe_concurrency: usize,
    /// Circuit breaker thresholds.
    pub breaker: breaker::BreakerConfig,
    /// How long a shutdown waits for calls in flight before cancelling (and refunding)
    /// them (`shutdown_grace`, default 30 s).
    pub shutdown_grace: Duration,
}

impl Default for ReliabilityConfig {
    fn default() -> Self {
        Self {
            probe_interval: probe::DEFAULT_INTERVAL,
            probe_concurrency: probe::DEFAULT_CONCURRENCY,
            breaker: breaker::BreakerConfig::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Default time a shutdown lets calls in flight finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The pool of upstream sessions plus the shared HTTP client.
#[derive(Debug)]
pub struct Upstreams {
    http: reqwest::Client,
    policy: EndpointPolicy,
    /// Keyed by (account id, server id, endpoint position).
    sessions: DashMap<(String, String, usize), Arc<UpstreamSession>>,
    max_response_bytes: usize,
    idle_ms: i64,
}

impl Upstreams {
    /// A pool capping every response at `max_response_bytes`, closing sessions idle
    /// for `idle_ms`, and connecting only where `policy` allows (its resolver checks
    /// every resolved address at every connect).
    ///
    /// # Errors
    /// [`UpstreamError::Protocol`] if the HTTP client cannot be built.
    pub fn new(
        max_response_bytes: usize,
        idle_ms: i64,
        policy: EndpointPolicy,
    ) -> Result<Self, UpstreamError> {
        Ok(Self {
            http: client::http_client(policy.resolver())?,
            policy,
            sessions: DashMap::new(),
            max_response_bytes,
            idle_ms,
        })
    }

    /// A session not bound to any account (tool-list fetches and list-changed watches),
    /// sending the `fixed` headers (secret and credentials) on every request. `None`
    /// when the server has no endpoint, or its endpoint no longer passes the policy
    /// (an IP-literal host is checked here, since the resolver never sees it).
    pub fn detached_session(&self, server: &Server, fixed: &HeaderMap) -> Option<UpstreamSession> {
        self.endpoint_session(server, 0, fixed)
    }

    /// As [`Upstreams::detached_session`] for the endpoint at `position` (0-based, the
    /// order of `server.endpoints`). `None` when there is no such endpoint or the policy
    /// refuses it.
    pub fn endpoint_session(
        &self,
        server: &Server,
        position: usize,
        fixed: &HeaderMap,
    ) -> Option<UpstreamSession> {
        let url = server.endpoints.get(position)?;
        let url = match self.policy.check(url) {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(server = %server.slug, error = %e, "refused to connect to an endpoint the policy no longer allows");
                return None;
            }
        };
        Some(UpstreamSession::new(
            self.http.clone(),
            url,
            fixed.clone(),
            self.max_response_bytes,
        ))
    }

    /// The session of `account_id` with `server`'s first endpoint; see
    /// [`Upstreams::session_at`].
    pub fn session(
        &self,
        account_id: &str,
        server: &Server,
        fixed: &HeaderMap,
    ) -> Option<Arc<UpstreamSession>> {
        self.session_at(account_id, server, 0, fixed)
    }

    /// The session of `account_id` with `server`'s endpoint at `position`, created (not
    /// yet initialized) on first use with the `fixed` headers. `None` when the server has
    /// no such endpoint it may use.
    pub fn session_at(
        &self,
        account_id: &str,
        server: &Server,
        position: usize,
        fixed: &HeaderMap,
    ) -> Option<Arc<UpstreamSession>> {
        let key = (account_id.to_owned(), server.id.clone(), position);
        if let Some(s) = self.sessions.get(&key) {
            return Some(s.clone());
        }
        let session = Arc::new(self.endpoint_session(server, position, fixed)?);
        Some(self.sessions.entry(key).or_insert(session).clone())
    }

    /// Drops the session of `account_id` with `server`'s endpoint at `position` (after
    /// a transport failure, so the next call starts afresh).
    pub fn forget_session(&self, account_id: &str, server_id: &str, position: usize) {
        self.sessions
            .remove(&(account_id.to_owned(), server_id.to_owned(), position));
    }

    /// Number of open (account, server) sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Closes sessions idle longer than the idle timeout; returns how many.
    pub async fn reap_idle(&self) -> usize {
        let cutoff = now_ms() - self.idle_ms;
        let idle: Vec<_> = self
            .sessions
            .iter()
            .filter(|e| e.value().last_used_ms() < cutoff && Arc::strong_count(e.value()) == 1)
            .map(|e| e.key().clone())
            .collect();
        let mut closed = 0;
        for key in idle {
            if let Some((_, session)) = self.sessions.remove(&key) {
                session.close().await;
                closed += 1;
            }
        }
        closed
    }

    /// Closes every session of `server_id` (after suspension, say).
    pub async fn close_server(&self, server_id: &str) {
        let keys: Vec<_> = self
            .sessions
            .iter()
            .filter(|e| e.key().1 == server_id)
            .map(|e| e.key().clone())
            .collect();
        for key in keys {
            if let Some((_, s)) = self.sessions.remove(&key) {
                s.close().await;
            }
        }
    }

    /// Closes every session (shutdown).
    pub async fn close_all(&self) {
        let keys: Vec<_> = self.sessions.iter().map(|e| e.key().clone()).collect();
        for key in keys {
            if let Some((_, s)) = self.sessions.remove(&key) {
                s.close().await;
            }
        }
    }

    /// Fetches the full tool list of `server` over a fresh session: `initialize`, then
    /// `tools/list` following `nextCursor` for at most [`MAX_LIST_PAGES`] pages, within
    /// [`TOOL_FETCH_TIMEOUT`]. Returns the MCP `Tool` JSON objects.
    ///
    /// # Errors
    /// Any [`UpstreamError`]; [`UpstreamError::Protocol`] when `tools` is not an array.
    pub async fn fetch_tools(
        &self,
        server: &Server,
        fixed: &HeaderMap,
    ) -> Result<Vec<Value>, UpstreamError> {
        let session = self
            .detached_session(server, fixed)
            .ok_or(UpstreamError::Connect)?;
        let result = tokio::time::timeout(TOOL_FETCH_TIMEOUT, async {
            let mut tools = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..MAX_LIST_PAGES {
                let params = match &cursor {
                    Some(c) => json!({ "cursor": c }),
                    None => json!({}),
                };
                let page = session
                    .request("tools/list", params, &HeaderMap::new(), &|_| {})
                    .await?;
                let items = page.get("tools").and_then(Value::as_array).ok_or_else(|| {
                    UpstreamError::Protocol("tools/list without a tools array".into())
                })?;
                tools.extend(items.iter().cloned());
                cursor = page
                    .get("nextCursor")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            Ok(tools)
        })
        .await
        .unwrap_or(Err(UpstreamError::Timeout));
        session.close().await;
        result
    }
}
