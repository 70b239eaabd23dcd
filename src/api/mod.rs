//! The REST front door (`/api/v1/…`): what the CLI and a web page need. JSON in and
//! out; errors as `{"error": {"kind": "...", "message": "..."}}`. Holds no business
//! rules: each handler authenticates, checks the scope and calls a domain.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, StatusCode};
use serde_json::json;

use crate::app::App;
use crate::auth::keys::KeyError;
use crate::auth::{KeyContext, Scope};
use crate::billing::pricing::{format_pricing, format_usd};
use crate::catalog::{CatalogError, NewServer, Server};

/// An API error: HTTP status, kind and a message without internals.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
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
            CatalogError::Store(_) => internal(e),
            _ => Self::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error in REST API");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; please retry",
    )
}

async fn auth(
    app: &App,
    headers: &HeaderMap,
    scope: Option<Scope>,
) -> Result<KeyContext, ApiError> {
    let key = match crate::gateway::authenticate_request(app, headers).await {
        Ok(k) => k,
        Err(KeyError::Unauthorized) => {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", ""));
        }
        Err(e) => return Err(internal(e)),
    };
    if let Some(s) = scope
        && !key.has_scope(s)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this key lacks the scope '{s}'"),
        ));
    }
    Ok(key)
}

/// The `/api/v1` routes.
pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/account", get(account))
        .route("/api/v1/servers", get(list_servers).post(register_server))
        .route("/api/v1/servers/{slug}", get(get_server))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            app.config.max_request_bytes,
        ))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
}

async fn account(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let key = auth(&app, &headers, None).await?;
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

fn public_server(s: &Server) -> serde_json::Value {
    json!({
        "slug": s.slug,
        "name": s.name,
        "description": s.description,
        "categories": s.categories,
        "status": s.status,
        "price_micros": s.price_micros,
        "pricing": format_pricing(s.price_micros),
        "tool_prices_micros": s.tool_prices,
    })
}

async fn list_servers(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth(&app, &headers, Some(Scope::CatalogRead)).await?;
    let servers = app.catalog.search("", usize::MAX).await?;
    Ok(
        axum::Json(json!({"servers": servers.iter().map(public_server).collect::<Vec<_>>()}))
            .into_response(),
    )
}

async fn get_server(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let key = auth(&app, &headers, Some(Scope::CatalogRead)).await?;
    let s = app.catalog.get(&slug).await?;
    // Unapproved servers are visible to their owner only.
    if !s.status.is_callable()
        && s.owner_account_id != key.account_id
        && !key.has_scope(Scope::Admin)
    {
        return Err(CatalogError::UnknownServer(slug).into());
    }
    Ok(axum::Json(public_server(&s)).into_response())
}

/// The body of `POST /api/v1/servers`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
    #[serde(default)]
    slug: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    pricing: String,
    #[serde(default)]
    tool_prices: BTreeMap<String, String>,
    /// A duration such as `30s`.
    #[serde(default)]
    timeout: Option<String>,
}

async fn register_server(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = auth(&app, &headers, Some(Scope::ServersWrite)).await?;
    let is_json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the server as JSON (Content-Type: application/json)",
        ));
    }
    let body: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid body: {e}"),
        )
    })?;
    let timeout_ms = match &body.timeout {
        Some(t) => Some(
            humantime::parse_duration(t)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "invalid timeout (e.g. 30s)",
                    )
                })?
                .as_millis()
                .min(i64::MAX as u128) as i64,
        ),
        None => None,
    };
    let mut endpoints = body.endpoints;
    if let Some(e) = body.endpoint {
        endpoints.insert(0, e);
    }
    let new = NewServer {
        name: body.name,
        slug: body.slug,
        description: body.description,
        categories: body.categories,
        endpoints,
        pricing: body.pricing,
        tool_prices: body.tool_prices,
        timeout_ms,
    };
    let (server, secret) = app
        .catalog
        .register(&key.account_id, &new, &app.policy)
        .await?;
    tracing::info!(slug = %server.slug, "server registered, pending review");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"slug": server.slug, "status": server.status, "secret": secret})),
    )
        .into_response())
}
