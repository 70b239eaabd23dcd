//! The two-sided marketplace's workflows, shared by every front door (the REST API, the
//! MCP tools, the CLI): registration with its verification probe and (optional)
//! auto-approval ([`register`]), the views of a server everyone sees ([`server_view`]),
//! and the `tools-catalog/` sync ([`sync`]). The catalog holds the data and rules
//! (`catalog::{search, reviews, reputation, creator}`); this module strings them
//! together with the upstream side.

pub mod sync;
pub mod verify;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::app::{App, AppError};
use crate::billing::pricing::format_pricing;
use crate::catalog::{CatalogError, NewServer, Server, ServerStatus};
use crate::security::audit::{self, Actor};
use crate::security::credentials;

pub use verify::{ProbeKind, Verification};

/// A registration as every front door takes it (the body of `POST /api/v1/servers`,
/// the arguments of `marketplace__register_server`; the CLI sends it to the former).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Display name.
    pub name: String,
    /// Slug (default: from the name).
    #[serde(default)]
    pub slug: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// One endpoint URL (put first).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Endpoint URLs.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// `free` or `<decimal>_per_request`.
    pub pricing: String,
    /// Tool → USD per call.
    #[serde(default)]
    pub tool_prices: BTreeMap<String, String>,
    /// Per-call timeout, e.g. `30s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Upstream credential headers, name → value (stored encrypted).
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
}

/// What a registration answers: the server, its secret (shown this once), the
/// verification report.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The server as it is now (`pending_review`, or `active` when auto-approved).
    pub server: Server,
    /// The per-server `X-MCP-Marketplace-Secret`.
    pub secret: String,
    /// The verification probe's report.
    pub verification: Verification,
}

impl Registration {
    /// The JSON every front door answers with:
    /// `{"slug", "status", "secret", "verification": {"ok", "grade", "failed_checks", "probes"}}`.
    pub fn to_json(&self) -> Value {
        json!({
            "slug": self.server.slug,
            "status": self.server.status,
            "secret": self.secret,
            "verification": {
                "ok": self.verification.ok,
                "grade": self.verification.grade,
                "failed_checks": self.verification.failed_checks(),
                "report": self.verification.report,
            },
        })
    }
}

/// Parses a duration such as `30s` into ms.
///
/// # Errors
/// [`CatalogError::InvalidTimeout`].
pub fn timeout_ms(text: &str) -> Result<i64, CatalogError> {
    humantime::parse_duration(text)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .map_err(|_| CatalogError::InvalidTimeout)
}

/// Registers a server for `owner_account_id` — the one code path of the CLI, REST and
/// MCP registrations: validates everything (nothing is written when a field or a
/// credential is refused), stores it in `pending_review` with its credentials, runs the
/// verification probe at once and stores its report, then — only when it passed and
/// the operator turned on `[marketplace] auto_approve` — approves it. A server that
/// failed stays unlisted until a later verification passes and an admin approves it.
/// Audited as `server.register`.
///
/// # Errors
/// [`AppError::Catalog`] (invalid fields, slug taken), [`AppError::Credential`],
/// [`AppError::Store`].
pub async fn register(
    app: &std::sync::Arc<App>,
    actor: &Actor,
    owner_account_id: &str,
    request: RegisterRequest,
) -> Result<Registration, AppError> {
    let creds: Vec<(String, String)> = request.credentials.into_iter().collect();
    credentials::validate(&creds)?;
    let timeout_ms = request.timeout.as_deref().map(timeout_ms).transpose()?;
    let mut endpoints = request.endpoints;
    if let Some(e) = request.endpoint {
        endpoints.insert(0, e);
    }
    let new = NewServer {
        name: request.name,
        slug: request.slug,
        description: request.description,
        categories: request.categories,
        endpoints,
        pricing: request.pricing,
        tool_prices: request.tool_prices,
        timeout_ms,
    };
    let (server, secret) = app
        .catalog
        .register(owner_account_id, &new, &app.policy)
        .await?;
    if !creds.is_empty() {
        app.set_credentials(actor, &server.slug, &creds).await?;
    }
    let verification = verify::run(app, &server, ProbeKind::Registration).await?;
    let _ = audit::record(
        &app.store,
        actor,
        "server.register",
        &server.slug,
        json!({"verification_ok": verification.ok, "grade": verification.grade}),
    )
    .await;
    let mut server = server;
    if verification.ok && app.config.marketplace.auto_approve {
        match app.approve_as(&Actor::System, &server.slug).await {
            Ok(s) => server = s,
            Err(e) => {
                tracing::warn!(slug = %server.slug, error = %e, "auto-approval failed; the server waits for review")
            }
        }
    }
    tracing::info!(slug = %server.slug, status = server.status.as_str(), verified = verification.ok, "server registered");
    Ok(Registration {
        server,
        secret,
        verification,
    })
}

/// Refuses to approve a server whose latest verification failed (called by
/// `App::approve_as` on a first approval). A server without any verification (made by
/// an embedder or an older version) may be approved.
///
/// # Errors
/// [`CatalogError::VerificationFailed`], [`CatalogError::Store`].
pub async fn ensure_verified(app: &App, server: &Server) -> Result<(), CatalogError> {
    if server.status != ServerStatus::PendingReview {
        return Ok(());
    }
    let rows = app.catalog.latest_verification_rows(&server.id).await?;
    let mut failed: Vec<String> = rows
        .iter()
        .filter(|v| !v.passed)
        .flat_map(|v| {
            v.checks
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c.get("ok") != Some(&Value::Bool(true)))
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .filter(|n| verify::counts(&v.kind, n))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    if rows.iter().all(|v| v.passed) {
        return Ok(());
    }
    failed.sort();
    failed.dedup();
    Err(CatalogError::VerificationFailed(
        server.slug.clone(),
        failed.join(", "),
    ))
}

/// Runs a verification of `server` on request (`kind` manual) and, when it passed and
/// auto-approval is on, approves a server still pending review.
///
/// # Errors
/// As [`verify::run`].
pub async fn reverify(
    app: &std::sync::Arc<App>,
    server: &Server,
) -> Result<Verification, AppError> {
    let v = verify::run(app, server, ProbeKind::Manual).await?;
    if v.ok && app.config.marketplace.auto_approve && server.status == ServerStatus::PendingReview {
        app.approve_as(&Actor::System, &server.slug).await?;
    }
    Ok(v)
}

/// A server as listed to anyone (search results, `marketplace__get_server`,
/// `GET /api/v1/servers/{slug}`): slug, name, description, categories, status, prices,
/// reputation (score, uptime, success rate, latency grade, rating), its visible tools
/// with their prices, and whether the caller installed it. Never endpoints or secrets.
///
/// # Errors
/// [`CatalogError::Store`].
pub async fn server_view(
    app: &App,
    server: &Server,
    installed: bool,
) -> Result<Value, CatalogError> {
    let tools = app.catalog.tools_of_server(&server.id).await?;
    let reputation = app.catalog.reputation(&server.id).await?;
    Ok(view_of(server, installed, &tools, reputation.as_ref()))
}

/// [`server_view`] of many servers (a listing): one snapshot read for every server's
/// tools and one query for every reputation, whatever the number of servers.
///
/// # Errors
/// [`CatalogError::Store`].
pub async fn server_views(
    app: &App,
    servers: &[(&Server, bool)],
) -> Result<Vec<Value>, CatalogError> {
    if servers.is_empty() {
        return Ok(Vec::new());
    }
    let snapshot = app.catalog.snapshot().await?;
    let reputations = app.catalog.all_reputations().await?;
    Ok(servers
        .iter()
        .map(|(server, installed)| {
            view_of(
                server,
                *installed,
                &snapshot.tools_of_server(&server.id),
                reputations.get(&server.id),
            )
        })
        .collect())
}

fn view_of(
    server: &Server,
    installed: bool,
    tools: &[std::sync::Arc<crate::catalog::CatalogTool>],
    reputation: Option<&crate::catalog::reputation::Reputation>,
) -> Value {
    json!({
        "slug": server.slug,
        "name": server.name,
        "description": server.description,
        "categories": server.categories,
        "status": server.status,
        "listed": server.listed,
        "price_micros": server.price_micros,
        "pricing": format_pricing(server.price_micros),
        "tool_prices_micros": server.tool_prices,
        "installed": installed,
        "reputation": reputation,
        "tools": tools.iter().map(|t| json!({
            "name": t.namespaced_name,
            "tool": t.name,
            "description": t.definition.get("description"),
            "price_micros": server.price_of(&t.name),
        })).collect::<Vec<_>>(),
    })
}

/// [`server_view`] plus its reviews (the detail view).
///
/// # Errors
/// [`CatalogError::Store`].
pub async fn server_detail(
    app: &App,
    server: &Server,
    installed: bool,
) -> Result<Value, CatalogError> {
    let mut v = server_view(app, server, installed).await?;
    v["reviews"] = serde_json::to_value(app.catalog.reviews(&server.id).await?)
        .unwrap_or(Value::Array(Vec::new()));
    Ok(v)
}

impl App {
    /// Installs `server` for `account_id`, listing only `tools` of it when given (all
    /// when `None` or empty), and tells the account's open sessions
    /// (`notifications/tools/list_changed`) when what they list changed. Nothing changes
    /// when a named tool is not one of the server's. Returns whether anything changed.
    ///
    /// # Errors
    /// [`AppError::Catalog`]: [`CatalogError::InvalidField`] for an unknown tool,
    /// [`CatalogError::NotAvailable`] for a server that cannot be installed.
    pub async fn install_choosing(
        &self,
        account_id: &str,
        server: &Server,
        tools: Option<&[String]>,
    ) -> Result<bool, AppError> {
        if let Some(names) = tools {
            let visible: Vec<String> = self
                .catalog
                .tools_of_server(&server.id)
                .await?
                .into_iter()
                .map(|t| t.name.clone())
                .collect();
            if names.iter().any(|n| !visible.contains(n)) {
                return Err(CatalogError::InvalidField(
                    "tools: only tools the server offers (see marketplace__get_server)",
                )
                .into());
            }
        }
        let added = self.catalog.install(account_id, &server.slug).await?;
        let chose = self.catalog.choose_tools(account_id, server, tools).await?;
        if added || chose {
            self.notifier.tools_changed(&[account_id.to_owned()], None);
        }
        Ok(added || chose)
    }
}
