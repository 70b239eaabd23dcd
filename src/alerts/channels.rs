//! Where an account's alerts go: one webhook (URL + HMAC signing secret) and one
//! e-mail address, both optional, in `alert_channels`.
//!
//! The webhook URL passes the same endpoint policy as upstream endpoints (https only,
//! http only for operator-allowed hosts, public addresses only; see
//! [`crate::security::endpoint`]), checked with DNS when set and again at every
//! delivery through the SSRF-checking resolver. The signing secret (`whsec_` + 43
//! base64url characters, 256 random bits) is made by the marketplace, shown once, and
//! stored encrypted by the vault bound to `alert_webhook:{account_id}`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sqlx::Row;

use super::AlertError;
use crate::security::EndpointPolicy;
use crate::security::vault::Vault;
use crate::store::{Store, now_ms};

/// What an account configured; never the secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AlertChannels {
    /// The webhook URL, if set.
    pub webhook_url: Option<String>,
    /// The e-mail address, if set.
    pub email: Option<String>,
    /// When last changed, epoch ms.
    pub updated_at: i64,
}

/// The associated data binding a stored secret to its account.
fn aad(account_id: &str) -> Vec<u8> {
    format!("alert_webhook:{account_id}").into_bytes()
}

/// A fresh signing secret: `whsec_` + base64url (no padding) of 32 random bytes.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    format!("whsec_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Sets the webhook of `account_id` to `url` with a new signing secret, which is
/// returned (shown this once; a later call rotates it). The URL is checked against
/// `policy` with DNS; on any error nothing changes.
///
/// # Errors
/// [`AlertError::Url`], [`AlertError::Store`] (also for an unknown account id).
pub async fn set_webhook(
    store: &Store,
    vault: &Vault,
    policy: &EndpointPolicy,
    account_id: &str,
    url: &str,
) -> Result<String, AlertError> {
    let url = policy.check_resolved(url).await?;
    let secret = new_secret();
    let sealed = vault.encrypt(&aad(account_id), secret.as_bytes());
    sqlx::query(
        "INSERT INTO alert_channels (account_id, webhook_url, webhook_secret, updated_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET \
         webhook_url = EXCLUDED.webhook_url, webhook_secret = EXCLUDED.webhook_secret, \
         updated_at = EXCLUDED.updated_at",
    )
    .bind(account_id)
    .bind(url.as_str())
    .bind(&sealed)
    .bind(now_ms())
    .execute(store.pool())
    .await?;
    Ok(secret)
}

/// Removes the webhook of `account_id`. Returns whether one was set.
///
/// # Errors
/// [`AlertError::Store`].
pub async fn clear_webhook(store: &Store, account_id: &str) -> Result<bool, AlertError> {
    Ok(sqlx::query(
        "UPDATE alert_channels SET webhook_url = NULL, webhook_secret = NULL, updated_at = $1 \
         WHERE account_id = $2 AND webhook_url IS NOT NULL",
    )
    .bind(now_ms())
    .bind(account_id)
    .execute(store.pool())
    .await?
    .rows_affected()
        == 1)
}

/// Sets (or with `None` removes) the e-mail address alerts of `account_id` go to.
///
/// # Errors
/// [`AlertError::Email`] for an address that does not parse; [`AlertError::Store`].
pub async fn set_email(
    store: &Store,
    account_id: &str,
    email: Option<&str>,
) -> Result<(), AlertError> {
    let email = match email.map(str::trim) {
        Some(e) => Some(
            e.parse::<lettre::Address>()
                .map_err(|_| AlertError::Email)?
                .to_string(),
        ),
        None => None,
    };
    sqlx::query(
        "INSERT INTO alert_channels (account_id, email, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (account_id) DO UPDATE SET email = EXCLUDED.email, updated_at = EXCLUDED.updated_at",
    )
    .bind(account_id)
    .bind(email)
    .bind(now_ms())
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The channels of `account_id` (`None` when it never configured one).
///
/// # Errors
/// [`AlertError::Store`].
pub async fn get(store: &Store, account_id: &str) -> Result<Option<AlertChannels>, AlertError> {
    let row = sqlx::query(
        "SELECT webhook_url, email, updated_at FROM alert_channels WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(store.pool())
    .await?;
    Ok(match row {
        None => None,
        Some(r) => Some(AlertChannels {
            webhook_url: r.try_get(0)?,
            email: r.try_get(1)?,
            updated_at: r.try_get(2)?,
        }),
    })
}

/// Where one account's alerts go, secret decrypted (delivery only; never logged).
#[derive(Clone, Default)]
pub(crate) struct Destination {
    pub webhook: Option<(String, String)>,
    pub email: Option<String>,
}

/// Loads the destination of `account_id` with the secret decrypted.
pub(crate) async fn destination(
    store: &Store,
    vault: &Vault,
    account_id: &str,
) -> Result<Destination, AlertError> {
    let row = sqlx::query(
        "SELECT webhook_url, webhook_secret, email FROM alert_channels WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(store.pool())
    .await?;
    let Some(r) = row else {
        return Ok(Destination::default());
    };
    let url: Option<String> = r.try_get(0)?;
    let sealed: Option<String> = r.try_get(1)?;
    let webhook = match (url, sealed) {
        (Some(url), Some(sealed)) => {
            let secret = vault.decrypt(&aad(account_id), &sealed)?;
            let secret = String::from_utf8(secret)
                .map_err(|_| AlertError::Vault(crate::security::vault::VaultError::Decrypt))?;
            Some((url, secret))
        }
        _ => None,
    };
    Ok(Destination {
        webhook,
        email: r.try_get(2)?,
    })
}
