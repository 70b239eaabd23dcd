//! The REST front door (`/api/v1/…`): what the CLI and a web page need. JSON in and
//! out; errors as `{"error": {"kind": "...", "message": "..."}}`. Holds no business
//! rules: each handler calls a domain.
//!
//! Authorization has one place: [`ROUTES`] names the scope of every route, and the
//! [`authorize`] middleware authenticates the key and checks that scope before any
//! handler runs (a route missing from the table is refused). Handlers then only check
//! ownership of the server they touch ([`owned_server`]).

mod alerts;
mod market;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use crate::app::{App, AppError};
use crate::auth::accounts::find_account;
use crate::auth::keys::KeyError;
use crate::auth::{KeyContext, Scope};
use crate::billing::invoices::InvoiceFormat;
use crate::billing::period::parse_instant;
use crate::billing::pricing::format_usd;
use crate::billing::stripe::StripeError;
use crate::billing::usage::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, UsageQuery};
use crate::billing::{BillingError, Month};
use crate::catalog::{CatalogError, Server};
use crate::security::audit::{self, Actor, AuditQuery};
use crate::security::credentials::{self, CredentialError};

/// Who may call a REST route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any valid key.
    AnyKey,
    /// A key with this scope (or `admin`).
    Scope(Scope),
}

/// One REST route and who may call it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The route pattern, as axum matches it.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

const fn route(method: Method, path: &'static str, access: Access) -> Route {
    Route {
        method,
        path,
        access,
    }
}

/// Every REST route with the scope it needs: the one place the REST API's scopes are
/// decided (issue 3 item 3). Routes that act on one server also require that the key's
/// account owns it (or `admin`).
pub const ROUTES: &[Route] = &[
    route(Method::GET, "/api/v1/account", Access::AnyKey),
    route(
        Method::GET,
        "/api/v1/servers",
        Access::Scope(Scope::CatalogRead),
    ),
    route(
        Method::POST,
        "/api/v1/servers",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}",
        Access::Scope(Scope::CatalogRead),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/credentials",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::PUT,
        "/api/v1/servers/{slug}/credentials",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::DELETE,
        "/api/v1/servers/{slug}/credentials",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/secret",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::PATCH,
        "/api/v1/servers/{slug}",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/pricing",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::PUT,
        "/api/v1/servers/{slug}/pricing",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/unlist",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/list",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/verify",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/verification",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/probes",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/analytics",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::GET,
        "/api/v1/servers/{slug}/reviews",
        Access::Scope(Scope::CatalogRead),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/reviews",
        Access::Scope(Scope::Invoke),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/reviews/{id}/reply",
        Access::Scope(Scope::ServersWrite),
    ),
    route(
        Method::POST,
        "/api/v1/servers/{slug}/approve",
        Access::Scope(Scope::Admin),
    ),
    route(
        Method::GET,
        "/api/v1/tools",
        Access::Scope(Scope::CatalogRead),
    ),
    route(Method::GET, "/api/v1/audit", Access::Scope(Scope::Admin)),
    route(Method::GET, "/api/v1/usage", Access::AnyKey),
    route(Method::GET, "/api/v1/invoices/{month}", Access::AnyKey),
    route(Method::GET, "/api/v1/account/alerts", Access::AnyKey),
    route(Method::PUT, "/api/v1/account/webhook", Access::AnyKey),
    route(Method::DELETE, "/api/v1/account/webhook", Access::AnyKey),
    route(Method::PUT, "/api/v1/account/alert-email", Access::AnyKey),
];

/// An API error: HTTP status, kind and a message without internals.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::UNAUTHORIZED {
            return crate::gateway::unauthorized();
        }
        let body = json!({"error": {"kind": self.kind, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match &e {
            CatalogError::SlugTaken(_) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            CatalogError::UnknownServer(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            CatalogError::VerificationFailed(..) => {
                Self::new(StatusCode::CONFLICT, "verification_failed", e.to_string())
            }
            CatalogError::Store(_) => internal(e),
            _ => Self::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match &e {
            BillingError::Invalid(_)
            | BillingError::InvalidAmount(_)
            | BillingError::UnknownPlan(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            BillingError::MonthOpen { .. } | BillingError::MonthNotClosed(_) => {
                Self::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            _ => internal(e),
        }
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error in REST API");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; please retry",
    )
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Catalog(c) => c.into(),
            AppError::Credential(c) => c.into(),
            other => internal(other),
        }
    }
}

impl From<CredentialError> for ApiError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::Store(_) | CredentialError::Vault(_) => internal(e),
            other => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                other.to_string(),
            ),
        }
    }
}

/// Middleware on every REST route: authenticates the key, finds the route in
/// [`ROUTES`] and checks its access rule; the handler gets the [`KeyContext`]. 401
/// without a valid key, 403 without the scope (or for a route missing from the table).
pub async fn authorize(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let key = match crate::gateway::authenticate_request(&app, req.headers()).await {
        Ok(k) => k,
        Err(KeyError::Unauthorized) => return crate::gateway::unauthorized(),
        Err(e) => return internal(e).into_response(),
    };
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let rule = ROUTES
        .iter()
        .find(|r| r.path == path && r.method == req.method());
    let allowed = match rule.map(|r| r.access) {
        Some(Access::AnyKey) => true,
        Some(Access::Scope(s)) => key.has_scope(s),
        None if req.method() == Method::HEAD || req.method() == Method::OPTIONS => false,
        // Unknown method on a known path: let the router answer 405.
        None if ROUTES.iter().any(|r| r.path == path) => true,
        None => false,
    };
    if !allowed {
        let message = match rule.map(|r| r.access) {
            Some(Access::Scope(s)) => format!("this key lacks the scope '{s}'"),
            _ => "this route is not open to API keys".to_owned(),
        };
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response();
    }
    req.extensions_mut().insert(key);
    next.run(req).await
}

/// The server `slug` if the key's account owns it (or the key is `admin`); otherwise
/// `not_found`, so a key learns nothing about other creators' servers.
pub(crate) async fn owned_server(
    app: &App,
    key: &KeyContext,
    slug: &str,
) -> Result<Server, ApiError> {
    let server = app.catalog.get(slug).await?;
    if server.owner_account_id != key.account_id && !key.has_scope(Scope::Admin) {
        return Err(CatalogError::UnknownServer(slug.to_owned()).into());
    }
    Ok(server)
}

pub(crate) fn actor(key: &KeyContext) -> Actor {
    Actor::Key {
        key_id: key.key_id.clone(),
        account: key.account_name.clone(),
    }
}

/// The `/api/v1` routes.
pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/account", get(account))
        .route("/api/v1/servers", get(list_servers).post(register_server))
        .route(
            "/api/v1/servers/{slug}",
            get(get_server).patch(update_server),
        )
        .merge(crate::api::market::routes())
        .route(
            "/api/v1/servers/{slug}/credentials",
            get(list_credentials)
                .put(set_credentials)
                .delete(clear_credentials),
        )
        .route("/api/v1/servers/{slug}/secret", post(rotate_secret))
        .route("/api/v1/audit", get(read_audit))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/invoices/{month}", get(invoice))
        .route("/api/v1/account/alerts", get(alerts::list))
        .route(
            "/api/v1/account/webhook",
            axum::routing::put(alerts::set_webhook).delete(alerts::clear_webhook),
        )
        .route(
            "/api/v1/account/alert-email",
            axum::routing::put(alerts::set_email),
        )
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), authorize))
        // Stripe authenticates with its signature, not an API key.
        .route("/api/v1/webhooks/stripe", post(stripe_webhook))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            app.config.max_request_bytes,
        ))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
}

async fn account(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
) -> Result<Response, ApiError> {
    let b = app
        .ledger
        .account_balance(&key.account_id)
        .await
        .map_err(internal)?;
    Ok(axum::Json(json!({
        "account": key.account_name,
        "balance_micros": b.wallet_micros,
        "balance": format_usd(b.wallet_micros),
        "holds_micros": b.holds_micros,
        "earnings_micros": b.earnings_micros,
        "currency": "USD",
    }))
    .into_response())
}

/// The query of `GET /api/v1/servers`: full-text `q` and filters.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    q: Option<String>,
    category: Option<String>,
    /// USD, e.g. `0.05`.
    max_price: Option<String>,
    max_price_micros: Option<i64>,
    status: Option<String>,
    min_rating: Option<f64>,
    limit: Option<usize>,
}

/// `GET /api/v1/servers?q=…&category=…&max_price=…&status=…&min_rating=…`: listed,
/// callable servers ranked by relevance and reputation (`catalog::search`).
async fn list_servers(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_error)?;
    let max_price_micros = match (&p.max_price, p.max_price_micros) {
        (Some(usd), _) => Some(
            crate::billing::pricing::parse_usd(usd, i64::MAX)
                .map_err(|e| bad_request(format!("max_price: {e}")))?,
        ),
        (None, m) => m,
    };
    if p.min_rating.is_some_and(|r| !(1.0..=5.0).contains(&r)) {
        return Err(bad_request("min_rating is between 1 and 5"));
    }
    let filters = crate::catalog::search::SearchFilters {
        category: p.category,
        max_price_micros,
        status: p.status,
        min_rating: p.min_rating,
    };
    let limit = p.limit.unwrap_or(100).clamp(1, 500);
    let installed = app.catalog.installed_slugs(&key.account_id).await?;
    let hits = app
        .catalog
        .search_servers(p.q.as_deref().unwrap_or(""), &filters, limit)
        .await?;
    let listed: Vec<(&crate::catalog::Server, bool)> = hits
        .iter()
        .map(|h| (&h.server, installed.contains(&h.server.slug)))
        .collect();
    let mut out = crate::market::server_views(&app, &listed).await?;
    for (v, hit) in out.iter_mut().zip(&hits) {
        v["relevance"] = json!(hit.relevance);
    }
    Ok(axum::Json(json!({"servers": out})).into_response())
}

async fn get_server(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let s = app.catalog.get(&slug).await?;
    // Unapproved servers are visible to their owner only.
    if !s.status.is_callable()
        && s.owner_account_id != key.account_id
        && !key.has_scope(Scope::Admin)
    {
        return Err(CatalogError::UnknownServer(slug).into());
    }
    let installed = app
        .catalog
        .installed_slugs(&key.account_id)
        .await?
        .contains(&s.slug);
    Ok(axum::Json(crate::market::server_detail(&app, &s, installed).await?).into_response())
}

/// `PATCH /api/v1/servers/{slug}`: the owner changes name, description, categories,
/// endpoints or timeout (`catalog::creator::ServerUpdate`, with `timeout` as `30s`).
async fn update_server(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let mut body: serde_json::Value = parse_body(&headers, &body)?;
    if let Some(t) = body
        .get("timeout")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    {
        let ms = crate::market::timeout_ms(&t)?;
        if let Some(o) = body.as_object_mut() {
            o.remove("timeout");
            o.insert("timeout_ms".into(), json!(ms));
        }
    }
    let update: crate::catalog::creator::ServerUpdate =
        serde_json::from_value(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("invalid body: {e}"),
            )
        })?;
    let updated = app.catalog.update(&server, &update, &app.policy).await?;
    if update.endpoints.is_some() {
        app.upstreams.close_server(&server.id).await;
    }
    let _ = audit::record(
        &app.store,
        &actor(&key),
        "server.update",
        &slug,
        json!({"endpoints_changed": update.endpoints.is_some()}),
    )
    .await;
    Ok(axum::Json(crate::market::server_view(&app, &updated, false).await?).into_response())
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send JSON (Content-Type: application/json)",
        ))
    }
}

/// Parses a JSON body (`Content-Type: application/json`).
///
/// # Errors
/// 415 without the JSON content type, 400 `invalid_json` for a body of another shape.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    require_json(headers)?;
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid body: {e}"),
        )
    })
}

/// `POST /api/v1/servers`: registration (`market::register`, the one code path).
async fn register_server(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: crate::market::RegisterRequest = parse_body(&headers, &body)?;
    let registration =
        crate::market::register(&app, &actor(&key), &key.account_id, request).await?;
    Ok((StatusCode::CREATED, axum::Json(registration.to_json())).into_response())
}

/// The body of `PUT /api/v1/servers/{slug}/credentials`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsBody {
    /// Header name → value; replaces every credential of the server.
    headers: BTreeMap<String, String>,
}

async fn list_credentials(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let list = credentials::list_credentials(&app.store, &server.id).await?;
    Ok(axum::Json(json!({"slug": slug, "headers": list})).into_response())
}

async fn set_credentials(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let body: CredentialsBody = parse_body(&headers, &body)?;
    let creds: Vec<(String, String)> = body.headers.into_iter().collect();
    let list = app
        .set_credentials(&actor(&key), &server.slug, &creds)
        .await?;
    Ok(axum::Json(json!({"slug": slug, "headers": list})).into_response())
}

async fn clear_credentials(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    app.set_credentials(&actor(&key), &server.slug, &[]).await?;
    Ok(axum::Json(json!({"slug": slug, "headers": []})).into_response())
}

async fn rotate_secret(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let secret = app.rotate_secret(&actor(&key), &server.slug).await?;
    Ok(axum::Json(json!({"slug": slug, "secret": secret})).into_response())
}

/// The query of `GET /api/v1/audit`.
#[derive(Debug, serde::Deserialize)]
struct AuditParams {
    /// Epoch ms.
    since_ms: Option<i64>,
    action: Option<String>,
    subject: Option<String>,
    limit: Option<usize>,
}

async fn read_audit(
    State(app): State<Arc<App>>,
    Query(p): Query<AuditParams>,
) -> Result<Response, ApiError> {
    let entries = audit::read(
        &app.store,
        &AuditQuery {
            since_ms: p.since_ms,
            action: p.action,
            subject: p.subject,
            limit: p.limit.unwrap_or(100),
        },
    )
    .await
    .map_err(internal)?;
    Ok(axum::Json(json!({"entries": entries})).into_response())
}

/// The account a request is about: the key's own, or (admin keys only) `?account=NAME`.
async fn subject_account(
    app: &App,
    key: &KeyContext,
    account: Option<&str>,
) -> Result<(String, String), ApiError> {
    match account {
        None => Ok((key.account_id.clone(), key.account_name.clone())),
        Some(name) if key.has_scope(Scope::Admin) => {
            let a = find_account(&app.store, name).await.map_err(|e| match e {
                crate::auth::accounts::AccountError::Unknown(_) => {
                    ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
                }
                other => internal(other),
            })?;
            Ok((a.id, a.name))
        }
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only admin keys may name another account",
        )),
    }
}

pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    bad_request(format!("invalid query: {}", e.body_text()))
}

/// The query of `GET /api/v1/usage`: filters, page, format.
#[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    /// RFC 3339, a day or a month: calls made at or after.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    /// RFC 3339, a day or a month: calls made before.
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<String>,
    /// `YYYY-MM`: calls made that month (instead of from/to).
    #[serde(skip_serializing_if = "Option::is_none")]
    month: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<String>,
    /// A key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// `reserved`, `settled` or `refunded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<String>,
    /// `json` (default) or `csv`.
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    /// Admin keys: another account's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<String>,
}

/// `GET /api/v1/usage`: one page of the account's usage log, newest first, as JSON
/// (`{"calls": [...], "next_cursor"}`) or CSV (`format=csv`, or `Accept: text/csv`); the
/// next page is also linked in a `Link: <…>; rel="next"` header (RFC 8288).
async fn usage(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    headers: HeaderMap,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(mut p) = params.map_err(query_error)?;
    let (account_id, _) = subject_account(&app, &key, p.account.as_deref()).await?;
    let instant = |v: &Option<String>| v.as_deref().map(parse_instant).transpose();
    let mut from = instant(&p.from).map_err(bad_request)?;
    let mut to = instant(&p.to).map_err(bad_request)?;
    if let Some(m) = &p.month {
        if from.is_some() || to.is_some() {
            return Err(bad_request("give either month or from/to"));
        }
        let m: Month = m
            .parse()
            .map_err(|e: crate::billing::period::InvalidMonth| bad_request(e.to_string()))?;
        from = Some(m.start_ms());
        to = Some(m.end_ms());
    }
    let limit = match &p.limit {
        None => DEFAULT_PAGE_SIZE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_PAGE_SIZE).contains(l))
            .ok_or_else(|| bad_request(format!("limit must be between 1 and {MAX_PAGE_SIZE}")))?,
    };
    let wants_csv = match p.format.as_deref() {
        Some("csv") => true,
        Some("json") => false,
        Some(_) => return Err(bad_request("format is json or csv")),
        None => headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/csv")),
    };
    let page = crate::billing::usage::list(
        &app.store,
        &UsageQuery {
            account_id,
            from,
            to,
            server: p.server.clone(),
            tool: p.tool.clone(),
            key_id: p.key.clone(),
            outcome: p.outcome.clone(),
            cursor: p.cursor.clone(),
            limit,
        },
    )
    .await?;
    let link = page.next_cursor.as_ref().map(|c| {
        p.cursor = Some(c.clone());
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(
                serde_json::to_value(&p)
                    .ok()
                    .and_then(|v| v.as_object().cloned())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned()))),
            )
            .finish();
        format!("</api/v1/usage?{query}>; rel=\"next\"")
    });
    let mut response = if wants_csv {
        (
            [(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            crate::billing::usage::to_csv(&page.calls, true),
        )
            .into_response()
    } else {
        axum::Json(&page).into_response()
    };
    if let Some(link) = link.and_then(|l| http::HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(http::header::LINK, link);
    }
    Ok(response)
}

/// The query of `GET /api/v1/invoices/{month}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceParams {
    /// `json` (default), `csv` or `html`.
    format: Option<String>,
    /// Admin keys: another account's name.
    account: Option<String>,
}

/// `GET /api/v1/invoices/{month}`: the account's invoice for `YYYY-MM` — the stored one
/// of a closed month, else a draft — as JSON, CSV or printable HTML.
async fn invoice(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(month): Path<String>,
    params: Result<Query<InvoiceParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_error)?;
    let month: Month = month
        .parse()
        .map_err(|e: crate::billing::period::InvalidMonth| bad_request(e.to_string()))?;
    let format: InvoiceFormat = p.format.as_deref().unwrap_or("json").parse()?;
    let (account_id, name) = subject_account(&app, &key, p.account.as_deref()).await?;
    let Some((_, rendered)) =
        crate::billing::invoices::invoice(&app.ledger, &account_id, month).await?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "{name} has no invoice for {month}: nothing happened on the account that month"
            ),
        ));
    };
    Ok((
        [(http::header::CONTENT_TYPE, format.content_type())],
        rendered.get(format).to_owned(),
    )
        .into_response())
}

/// `POST /api/v1/webhooks/stripe`: Stripe's events, authenticated by the
/// `Stripe-Signature` header (no API key). 200 when handled or already handled (Stripe
/// stops retrying), 400 for a bad signature or payload, 503 when not configured, 500
/// when the store fails (Stripe retries).
async fn stripe_webhook(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let outcome = crate::billing::stripe::handle_webhook(
        &app.ledger,
        app.config.billing.stripe_webhook_secret.as_ref(),
        signature,
        &body,
    )
    .await
    .map_err(|e| match e {
        StripeError::NotConfigured => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            e.to_string(),
        ),
        StripeError::MissingSignature | StripeError::BadSignature => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", e.to_string())
        }
        StripeError::Stale(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "stale_signature", e.to_string())
        }
        StripeError::InvalidPayload(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_payload", e.to_string())
        }
        StripeError::Billing(b) => internal(b),
    })?;
    tracing::info!(?outcome, "stripe webhook");
    let mut body = serde_json::to_value(&outcome).unwrap_or_default();
    body["received"] = json!(true);
    Ok(axum::Json(body).into_response())
}
