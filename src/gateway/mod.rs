//! The downstream front door: the marketplace as a streamable-HTTP MCP server.
//!
//! - `/mcp` merges the tools of every server the account installed under
//!   `{slug}__{tool}` names, plus the marketplace's own `marketplace__*` tools.
//! - `/servers/{slug}/mcp` serves one approved server alone, names unprefixed.
//!
//! Both are rmcp `StreamableHttpService`s behind [`require_key`], which authenticates
//! every HTTP request (so a revoked key stops working on its open sessions at once) and
//! hands the [`Caller`] to the handler through the request's extensions, then checks
//! the rate limits of any `tools/call` in the body ([`limits`]). A session is bound to
//! the account and endpoint that initialized it. [`session`] holds the sessions (our
//! own manager, not rmcp's); [`call`] is the call path.

pub mod call;
pub mod handler;
pub mod limits;
pub mod notify;
pub mod session;
pub mod tools;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::app::App;
use crate::auth::KeyContext;
use crate::auth::keys::{KeyError, presented_key};

pub use handler::GatewayHandler;

/// Who is calling, attached to each authenticated HTTP request by [`require_key`].
#[derive(Debug, Clone)]
pub struct Caller {
    /// The authenticated key.
    pub key: KeyContext,
    /// The slug of `/servers/{slug}/mcp`; `None` on `/mcp`.
    pub slug: Option<String>,
}

/// Builds the whole HTTP router: MCP endpoints, REST API, health and JWKS.
pub fn router(app: Arc<App>) -> Router {
    let hosts = allowed_hosts(&app);
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_max_request_body_bytes(app.config.max_request_bytes)
        .with_cancellation_token(app.shutdown_token().child_token());
    // One set of sessions for both endpoints: a session names its endpoint, and
    // `require_key` checks it with the account.
    let sessions = Arc::new(session::Sessions::default());
    let aggregated = {
        let app = app.clone();
        StreamableHttpService::new(
            move || Ok(GatewayHandler::new(app.clone())),
            sessions.clone(),
            config.clone(),
        )
    };
    let one_server = {
        let app = app.clone();
        StreamableHttpService::new(
            move || Ok(GatewayHandler::new(app.clone())),
            sessions.clone(),
            config,
        )
    };
    let mcp = Router::new()
        .route_service("/mcp", aggregated)
        .route_service("/servers/{slug}/mcp", one_server)
        .layer(axum::middleware::from_fn_with_state(
            Gate {
                app: app.clone(),
                sessions,
            },
            require_key,
        ));
    Router::new()
        .merge(mcp)
        .merge(crate::api::router(app.clone()))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(app)
}

/// `Host` values rmcp accepts (DNS-rebinding protection): loopback names, the listen
/// address and the public URL's host.
fn allowed_hosts(app: &App) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    hosts.push(app.config.listen.clone());
    if let Ok(url) = url::Url::parse(&app.config.public_url)
        && let Some(h) = url.host_str()
    {
        hosts.push(h.to_owned());
        if let Some(p) = url.port() {
            hosts.push(format!("{h}:{p}"));
        }
    }
    hosts
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(_) => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "database unreachable",
        )
            .into_response(),
    }
}

/// `GET /metrics`: Prometheus text format 0.0.4 (see [`crate::telemetry`]).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    match crate::telemetry::render(&app).await {
        Some(body) => (
            [(
                http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        None => (http::StatusCode::NOT_FOUND, "metrics are off").into_response(),
    }
}

async fn jwks(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.signer.jwks()).into_response()
}

/// The 401 answer for a missing, invalid, expired or revoked key (RFC 6750 §3).
pub fn unauthorized() -> Response {
    let body = serde_json::json!({"error": {"kind": "unauthorized", "message": "missing, invalid, expired or revoked API key"}});
    (
        http::StatusCode::UNAUTHORIZED,
        [(
            http::header::WWW_AUTHENTICATE,
            r#"Bearer realm="mcp-marketplace""#,
        )],
        axum::Json(body),
    )
        .into_response()
}

/// Authenticates a presented key ([`crate::auth::keys::KeyCache`]: from memory while
/// nothing in the auth tables changed).
///
/// # Errors
/// [`KeyError::Unauthorized`] when no valid key was presented.
pub async fn authenticate_request(
    app: &App,
    headers: &http::HeaderMap,
) -> Result<KeyContext, KeyError> {
    let key = presented_key(headers).ok_or(KeyError::Unauthorized)?;
    app.keys.authenticate(&app.store, key).await
}

/// What [`require_key`] needs: the app and the MCP sessions of both endpoints.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The application.
    pub app: Arc<App>,
    /// The sessions of `/mcp` and `/servers/{slug}/mcp`.
    pub sessions: Arc<session::Sessions>,
}

/// Middleware: authenticates the key of every MCP request and attaches a [`Caller`];
/// answers 401 with `WWW-Authenticate: Bearer` otherwise, 503 when the store is down;
/// answers 404 to a `GET` or `DELETE` naming a session of another account or endpoint
/// (as for an unknown session, MCP 2025-06-18 "Session Management"; a `POST` on it is
/// refused by the handler with `session_mismatch`); then applies the rate limits
/// ([`limits::check`]: 429 over a limit, 413 over the body cap).
pub async fn require_key(
    State(Gate { app, sessions }): State<Gate>,
    mut req: Request,
    next: Next,
) -> Response {
    let key = match authenticate_request(&app, req.headers()).await {
        Ok(k) => k,
        Err(KeyError::Unauthorized) => return unauthorized(),
        Err(e) => {
            tracing::error!(error = %e, "key lookup failed");
            return (
                http::StatusCode::SERVICE_UNAVAILABLE,
                "temporarily unavailable",
            )
                .into_response();
        }
    };
    let slug = req
        .uri()
        .path()
        .strip_prefix("/servers/")
        .and_then(|rest| rest.strip_suffix("/mcp"))
        .map(str::to_owned);
    let caller = Caller { key, slug };
    if req.method() != http::Method::POST
        && let Some(id) = req
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        && !sessions.owned_by(id, &caller.key.account_id, caller.slug.as_deref())
    {
        return (http::StatusCode::NOT_FOUND, "Not Found: Session not found").into_response();
    }
    req.extensions_mut().insert(caller.clone());
    match limits::check(&app, &caller, req).await {
        Ok(req) => next.run(req).await,
        Err(refused) => refused,
    }
}
