//! The marketplace's REST routes beyond registration and search: creator self-service
//! (prices with an effective time, unlisting, verification, probe history, analytics,
//! replies), reviews, admin approval and tool search. Scopes are in [`super::ROUTES`];
//! every creator route answers `not_found` for another creator's server
//! ([`super::owned_server`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::{HeaderMap, StatusCode};
use serde_json::json;

use super::{ApiError, actor, bad_request, internal, owned_server, parse_body, query_error};
use crate::app::App;
use crate::auth::{KeyContext, Scope};
use crate::catalog::CatalogError;
use crate::catalog::creator::PriceChange;
use crate::catalog::reviews::ReviewError;
use crate::security::audit;

/// The routes of this module (merged into [`super::router`], behind its authorization).
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/api/v1/servers/{slug}/pricing",
            get(price_history).put(change_prices),
        )
        .route("/api/v1/servers/{slug}/unlist", post(unlist))
        .route("/api/v1/servers/{slug}/list", post(relist))
        .route("/api/v1/servers/{slug}/verify", post(verify))
        .route("/api/v1/servers/{slug}/verification", get(verification))
        .route("/api/v1/servers/{slug}/probes", get(probes))
        .route("/api/v1/servers/{slug}/analytics", get(analytics))
        .route(
            "/api/v1/servers/{slug}/reviews",
            get(reviews).post(write_review),
        )
        .route("/api/v1/servers/{slug}/reviews/{id}/reply", post(reply))
        .route("/api/v1/servers/{slug}/approve", post(approve))
        .route("/api/v1/tools", get(search_tools))
}

impl From<ReviewError> for ApiError {
    fn from(e: ReviewError) -> Self {
        match e {
            ReviewError::Catalog(c) => c.into(),
            ReviewError::NoPaidCall(_) | ReviewError::OwnServer => {
                ApiError::new(StatusCode::FORBIDDEN, "review_refused", e.to_string())
            }
            ReviewError::UnknownReview => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ReviewError::AlreadyReplied => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            _ => bad_request(e.to_string()),
        }
    }
}

/// The body of `PUT /api/v1/servers/{slug}/pricing`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PricingBody {
    /// `free` or `<decimal>_per_request`.
    #[serde(default)]
    pricing: Option<String>,
    /// Tool → USD (`0.05`, `free`) or `null` to remove the override.
    #[serde(default)]
    tool_prices: BTreeMap<String, Option<String>>,
    /// RFC 3339, a day or a month (default: now).
    #[serde(default)]
    effective_at: Option<String>,
}

async fn change_prices(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let body: PricingBody = parse_body(&headers, &body)?;
    let effective_at = body
        .effective_at
        .as_deref()
        .map(crate::billing::period::parse_instant)
        .transpose()
        .map_err(bad_request)?;
    let changes = app
        .catalog
        .change_prices(
            &server,
            &PriceChange {
                pricing: body.pricing,
                tool_prices: body.tool_prices,
                effective_at,
            },
        )
        .await?;
    let _ = audit::record(
        &app.store,
        &actor(&key),
        "server.pricing",
        &slug,
        json!({"changes": changes}),
    )
    .await;
    let server = app.catalog.get(&slug).await?;
    Ok(axum::Json(json!({
        "slug": slug,
        "changes": changes,
        "price_micros": server.price_micros,
        "tool_prices_micros": server.tool_prices,
    }))
    .into_response())
}

async fn price_history(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let history = app.catalog.price_history(&server.id).await?;
    Ok(axum::Json(json!({
        "slug": slug,
        "price_micros": server.price_micros,
        "tool_prices_micros": server.tool_prices,
        "history": history,
    }))
    .into_response())
}

async fn set_listed(
    app: &App,
    key: &KeyContext,
    slug: &str,
    listed: bool,
) -> Result<Response, ApiError> {
    let server = owned_server(app, key, slug).await?;
    let server = app.catalog.set_listed(&server, listed).await?;
    let _ = audit::record(
        &app.store,
        &actor(key),
        if listed {
            "server.list"
        } else {
            "server.unlist"
        },
        slug,
        json!({}),
    )
    .await;
    Ok(axum::Json(json!({"slug": slug, "listed": server.listed})).into_response())
}

async fn unlist(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    set_listed(&app, &key, &slug, false).await
}

async fn relist(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    set_listed(&app, &key, &slug, true).await
}

async fn verify(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let v = crate::market::reverify(&app, &server).await?;
    let status = app.catalog.get(&slug).await?.status;
    Ok(
        axum::Json(json!({"slug": slug, "status": status, "verification": {
            "ok": v.ok, "grade": v.grade, "failed_checks": v.failed_checks(), "report": v.report,
        }}))
        .into_response(),
    )
}

async fn verification(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let v = app.catalog.latest_verification(&server.id).await?;
    Ok(
        axum::Json(json!({"slug": slug, "status": server.status, "verification": v}))
            .into_response(),
    )
}

/// The query of the probe and analytics routes.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowParams {
    limit: Option<i64>,
    days: Option<i64>,
}

async fn probes(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    params: Result<Query<WindowParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_error)?;
    let server = owned_server(&app, &key, &slug).await?;
    let list = app
        .catalog
        .probe_history(&server.id, p.limit.unwrap_or(50))
        .await?;
    Ok(axum::Json(json!({"slug": slug, "probes": list})).into_response())
}

async fn analytics(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    params: Result<Query<WindowParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_error)?;
    let server = owned_server(&app, &key, &slug).await?;
    let a = app
        .catalog
        .analytics(&server, p.days.unwrap_or(30), crate::store::now_ms())
        .await?;
    let reputation = app.catalog.reputation(&server.id).await?;
    Ok(axum::Json(json!({"analytics": a, "reputation": reputation})).into_response())
}

/// A server anyone may read about: callable, or the caller's own (or admin).
async fn readable_server(
    app: &App,
    key: &KeyContext,
    slug: &str,
) -> Result<crate::catalog::Server, ApiError> {
    let s = app.catalog.get(slug).await?;
    if !s.status.is_callable()
        && s.owner_account_id != key.account_id
        && !key.has_scope(Scope::Admin)
    {
        return Err(CatalogError::UnknownServer(slug.to_owned()).into());
    }
    Ok(s)
}

async fn reviews(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = readable_server(&app, &key, &slug).await?;
    let list = app.catalog.reviews(&server.id).await?;
    let reputation = app.catalog.reputation(&server.id).await?;
    Ok(
        axum::Json(json!({"slug": slug, "reviews": list, "reputation": reputation}))
            .into_response(),
    )
}

/// The body of `POST /api/v1/servers/{slug}/reviews`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    rating: i64,
    #[serde(default)]
    review: String,
}

async fn write_review(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let server = readable_server(&app, &key, &slug).await?;
    let body: ReviewBody = parse_body(&headers, &body)?;
    let (review, created) = app
        .catalog
        .rate(&key.account_id, &server, body.rating, &body.review)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(json!({"slug": slug, "review": review, "created": created})),
    )
        .into_response())
}

/// The body of `POST /api/v1/servers/{slug}/reviews/{id}/reply`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyBody {
    reply: String,
}

async fn reply(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path((slug, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let server = owned_server(&app, &key, &slug).await?;
    let body: ReplyBody = parse_body(&headers, &body)?;
    let review = app.catalog.reply(&server, &id, &body.reply).await?;
    Ok(axum::Json(json!({"slug": slug, "review": review})).into_response())
}

async fn approve(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    Path(slug): Path<String>,
) -> Result<Response, ApiError> {
    let server = app
        .approve_as(&actor(&key), &slug)
        .await
        .map_err(|e| match e {
            crate::app::AppError::Catalog(c) => ApiError::from(c),
            crate::app::AppError::Upstream(u) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("fetching the server's tools failed: {u}"),
            ),
            other => internal(other),
        })?;
    Ok(axum::Json(json!({"slug": slug, "status": server.status})).into_response())
}

/// The query of `GET /api/v1/tools`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolSearchParams {
    q: String,
    limit: Option<usize>,
}

async fn search_tools(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    params: Result<Query<ToolSearchParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params.map_err(query_error)?;
    let hits = app
        .catalog
        .search_tools(&p.q, p.limit.unwrap_or(20).clamp(1, 100))
        .await?;
    // One snapshot for every hit: no query per hit.
    let snapshot = app.catalog.snapshot().await?;
    let mut out = Vec::new();
    for hit in hits {
        let Some(server) = snapshot.server_by_id(&hit.server_id) else {
            continue;
        };
        let Some(t) = snapshot.tool_of_server(&server.id, &hit.tool) else {
            continue;
        };
        if !key.allows_tool(&t.namespaced_name) {
            continue;
        }
        out.push(json!({
            "name": t.namespaced_name,
            "server": server.slug,
            "description": t.definition.get("description"),
            "price_micros": server.price_of(&t.name),
        }));
    }
    Ok(axum::Json(json!({"tools": out})).into_response())
}
