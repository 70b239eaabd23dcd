//! `/api/v1/account/alerts`, `/api/v1/account/webhook`, `/api/v1/account/alert-email`:
//! where the key's own account gets its alerts, and its recent alerts. Any key of the
//! account may use them (like `GET /api/v1/account`); the signing secret appears only
//! in the answer of the `PUT` that made it.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;
use sqlx::Row;

use super::{ApiError, bad_request, internal};
use crate::alerts::{AlertError, channels};
use crate::app::App;
use crate::auth::KeyContext;
use crate::billing::period::rfc3339;

/// Most alerts `GET /api/v1/account/alerts` lists.
const LISTED_ALERTS: i64 = 50;

impl From<AlertError> for ApiError {
    fn from(e: AlertError) -> Self {
        match e {
            AlertError::Store(_) | AlertError::Vault(_) => internal(e),
            other => bad_request(other.to_string()),
        }
    }
}

/// `GET /api/v1/account/alerts`: `{"webhook_url", "email", "alerts": [{"id", "kind",
/// "created_at", "attempts", "state", "last_error"}]}` (newest first, at most 50).
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
) -> Result<Response, ApiError> {
    let c = channels::get(&app.store, &key.account_id).await?;
    let rows = sqlx::query(
        "SELECT id, kind, created_at, attempts, delivered_at, dead_at, last_error \
         FROM alert_outbox WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(&key.account_id)
    .bind(LISTED_ALERTS)
    .fetch_all(app.store.pool())
    .await
    .map_err(internal)?;
    let mut alerts = Vec::new();
    for r in rows {
        let delivered: Option<i64> = r.try_get(4).map_err(internal)?;
        let dead: Option<i64> = r.try_get(5).map_err(internal)?;
        alerts.push(json!({
            "id": r.try_get::<String, _>(0).map_err(internal)?,
            "kind": r.try_get::<String, _>(1).map_err(internal)?,
            "created_at": rfc3339(r.try_get(2).map_err(internal)?),
            "attempts": r.try_get::<i64, _>(3).map_err(internal)?,
            "state": if delivered.is_some() { "delivered" } else if dead.is_some() { "dead" } else { "pending" },
            "last_error": r.try_get::<Option<String>, _>(6).map_err(internal)?,
        }));
    }
    Ok(axum::Json(json!({
        "webhook_url": c.as_ref().and_then(|c| c.webhook_url.clone()),
        "email": c.as_ref().and_then(|c| c.email.clone()),
        "alerts": alerts,
    }))
    .into_response())
}

/// `PUT /api/v1/account/webhook` with `{"url": "https://…"}`: sets the webhook and
/// answers `{"webhook_url", "signing_secret"}`, the secret shown this once.
pub(super) async fn set_webhook(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        url: String,
    }
    let b: Body = serde_json::from_slice(&body)
        .map_err(|_| bad_request("expected {\"url\": \"https://…\"}"))?;
    let secret =
        channels::set_webhook(&app.store, &app.vault, &app.policy, &key.account_id, &b.url).await?;
    let c = channels::get(&app.store, &key.account_id).await?;
    Ok(axum::Json(json!({
        "webhook_url": c.and_then(|c| c.webhook_url),
        "signing_secret": secret,
    }))
    .into_response())
}

/// `DELETE /api/v1/account/webhook`: 204.
pub(super) async fn clear_webhook(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
) -> Result<Response, ApiError> {
    channels::clear_webhook(&app.store, &key.account_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /api/v1/account/alert-email` with `{"email": "a@b.example"}` (or `null` to
/// remove): answers `{"email"}`.
pub(super) async fn set_email(
    State(app): State<Arc<App>>,
    Extension(key): Extension<KeyContext>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body {
        email: Option<String>,
    }
    let b: Body = serde_json::from_slice(&body).map_err(|_| {
        bad_request("expected {\"email\": \"name@example.com\"} or {\"email\": null}")
    })?;
    channels::set_email(&app.store, &key.account_id, b.email.as_deref()).await?;
    let c = channels::get(&app.store, &key.account_id).await?;
    Ok(axum::Json(json!({"email": c.and_then(|c| c.email)})).into_response())
}
