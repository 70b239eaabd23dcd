//! Paid top-ups through Stripe (issue 6 item 5): `POST /api/v1/webhooks/stripe`.
//!
//! Authentication is the `Stripe-Signature` header (Stripe's "Verify webhook
//! signatures" scheme): `t=TIMESTAMP,v1=HEX[,v1=HEX…]`, each `v1` an HMAC-SHA256 keyed
//! with the endpoint's signing secret (`whsec_…`, used as is) over `TIMESTAMP.BODY`. A
//! request passes when any `v1` matches (several appear while a secret is rolled),
//! compared in constant time, and the timestamp is within [`TOLERANCE_SECS`] of now.
//!
//! Events, each handled once per event id (`stripe_events`, written in the same
//! transaction as its effect, so a failed delivery is retried whole):
//! - `checkout.session.completed` (and `checkout.session.async_payment_succeeded`) with
//!   `payment_status = "paid"`, `currency = "usd"`: credits `amount_total` (cents) to the
//!   wallet of the account named by the session's `client_reference_id` (the account's
//!   id or name) or else `metadata.account` (its name or id). A payment (keyed by its
//!   `payment_intent`, or the session id without one) is credited once, whichever event
//!   reports it;
//! - `charge.refunded` (`amount_refunded`, cumulative) and `charge.dispute.created`
//!   (`amount`, once per dispute id) reverse up to the payment's amount: the wallet gives
//!   back what it still holds and `platform:losses` takes the rest. A refund or dispute
//!   that arrives before its payment (Stripe does not order events) is recorded and
//!   applied when the payment is credited;
//! - every other event type is acknowledged and ignored.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use sqlx::Row;

use super::ledger::{BillingError, Ledger};
use crate::store::{StoreError, Tx, is_unique_violation};

/// How far a signature's timestamp may be from now: five minutes (Stripe's default).
pub const TOLERANCE_SECS: i64 = 300;
/// Micros in one cent, the unit of Stripe's USD amounts.
const MICROS_PER_CENT: i64 = 10_000;

/// The endpoint's signing secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// Wraps a secret (`whsec_…`).
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// Why a webhook request was refused.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// No `[stripe] webhook_secret` is configured.
    #[error("the Stripe webhook is not configured on this marketplace")]
    NotConfigured,
    /// No `Stripe-Signature` header, or one without `t` or `v1`.
    #[error("missing or malformed Stripe-Signature header")]
    MissingSignature,
    /// No `v1` signature matches.
    #[error("no signature in Stripe-Signature matches the payload")]
    BadSignature,
    /// The timestamp is more than five minutes from now.
    #[error("the signature's timestamp is {0} s away from now (at most 300 s allowed)")]
    Stale(i64),
    /// The body is not a Stripe event.
    #[error("not a Stripe event: {0}")]
    InvalidPayload(String),
    /// The store failed (Stripe retries the delivery).
    #[error(transparent)]
    Billing(#[from] BillingError),
}

impl From<sqlx::Error> for StripeError {
    fn from(e: sqlx::Error) -> Self {
        Self::Billing(e.into())
    }
}

/// What handling an event did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WebhookOutcome {
    /// A payment was credited.
    Credited {
        /// The account's name.
        account: String,
        /// Micros credited.
        amount_micros: i64,
    },
    /// A refund or dispute was recorded (and reversed, if its payment is credited).
    Reversal {
        /// The payment.
        payment: String,
        /// Micros reversed now.
        reversed_micros: i64,
        /// Of which the wallet could not cover (platform loss).
        loss_micros: i64,
    },
    /// The event id was handled before.
    Duplicate,
    /// Acknowledged, nothing to do (the reason says why).
    Ignored {
        /// Why.
        reason: String,
    },
}

impl WebhookOutcome {
    fn label(&self) -> String {
        match self {
            Self::Credited { .. } => "credited".into(),
            Self::Reversal { .. } => "reversal".into(),
            Self::Duplicate => "duplicate".into(),
            Self::Ignored { reason } => format!("ignored: {reason}"),
        }
    }
}

/// Checks `header` (the `Stripe-Signature` value) against `payload` and `secret` at
/// `now_secs` (Unix seconds).
///
/// # Errors
/// [`StripeError::MissingSignature`], [`StripeError::BadSignature`], or
/// [`StripeError::Stale`] (checked after the signature, so unsigned requests learn nothing).
pub fn verify_signature(
    secret: &WebhookSecret,
    header: &str,
    payload: &[u8],
    now_secs: i64,
) -> Result<(), StripeError> {
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) if timestamp.is_none() => timestamp = Some(v),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let t = timestamp.ok_or(StripeError::MissingSignature)?;
    let t_secs: i64 = t.parse().map_err(|_| StripeError::MissingSignature)?;
    if signatures.is_empty() {
        return Err(StripeError::MissingSignature);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes())
        .map_err(|_| StripeError::NotConfigured)?;
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(payload);
    // `verify_slice` compares in constant time.
    let matches = signatures
        .iter()
        .any(|s| hex::decode(s).is_ok_and(|sig| mac.clone().verify_slice(&sig).is_ok()));
    if !matches {
        return Err(StripeError::BadSignature);
    }
    let age = (now_secs - t_secs).abs();
    if age > TOLERANCE_SECS {
        return Err(StripeError::Stale(age));
    }
    Ok(())
}

/// Verifies and handles one webhook delivery.
///
/// # Errors
/// [`StripeError::NotConfigured`] without a secret; the errors of [`verify_signature`];
/// [`StripeError::InvalidPayload`]; [`StripeError::Billing`] when the store fails.
pub async fn handle_webhook(
    ledger: &Ledger,
    secret: Option<&WebhookSecret>,
    header: Option<&str>,
    payload: &[u8],
) -> Result<WebhookOutcome, StripeError> {
    let secret = secret.ok_or(StripeError::NotConfigured)?;
    let header = header.ok_or(StripeError::MissingSignature)?;
    verify_signature(secret, header, payload, ledger.now_ms() / 1000)?;
    handle_event(ledger, payload).await
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn cents_to_micros(v: &Value, key: &str) -> Result<i64, StripeError> {
    v.get(key)
        .and_then(Value::as_i64)
        .filter(|c| *c >= 0)
        .and_then(|c| c.checked_mul(MICROS_PER_CENT))
        .ok_or_else(|| StripeError::InvalidPayload(format!("{key} is not an amount in cents")))
}

/// Handles a verified event (see the module docs).
///
/// # Errors
/// [`StripeError::InvalidPayload`]; [`StripeError::Billing`].
pub async fn handle_event(ledger: &Ledger, payload: &[u8]) -> Result<WebhookOutcome, StripeError> {
    let event: Value =
        serde_json::from_slice(payload).map_err(|e| StripeError::InvalidPayload(e.to_string()))?;
    let id = str_at(&event, "id")
        .filter(|id| id.len() <= 255)
        .ok_or_else(|| StripeError::InvalidPayload("no event id".into()))?;
    let kind = str_at(&event, "type")
        .ok_or_else(|| StripeError::InvalidPayload("no event type".into()))?;
    let object = event
        .pointer("/data/object")
        .filter(|o| o.is_object())
        .ok_or_else(|| StripeError::InvalidPayload("no data.object".into()))?;
    let at = ledger.now_ms();
    let mut tx = ledger.store().begin().await.map_err(BillingError::from)?;
    let seen = sqlx::query("SELECT id FROM stripe_events WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if seen.is_some() {
        return Ok(WebhookOutcome::Duplicate);
    }
    let outcome = match kind {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout(ledger, &mut tx, object, at).await?
        }
        "charge.refunded" => {
            let key = str_at(object, "payment_intent")
                .or_else(|| str_at(object, "id"))
                .ok_or_else(|| StripeError::InvalidPayload("charge without id".into()))?;
            if !usd(object) {
                ignored("not a USD charge")
            } else {
                let refunded = cents_to_micros(object, "amount_refunded")?;
                placeholder(&mut tx, key, at).await?;
                sqlx::query(
                    "UPDATE stripe_payments SET refunded_micros = $1 WHERE payment_key = $2 AND refunded_micros < $1",
                )
                .bind(refunded)
                .bind(key)
                .execute(&mut *tx)
                .await?;
                reconcile(ledger, &mut tx, key, at).await?
            }
        }
        "charge.dispute.created" => {
            let dispute = str_at(object, "id")
                .ok_or_else(|| StripeError::InvalidPayload("dispute without id".into()))?;
            let key = str_at(object, "payment_intent")
                .or_else(|| str_at(object, "charge"))
                .ok_or_else(|| StripeError::InvalidPayload("dispute without a charge".into()))?;
            if !usd(object) {
                ignored("not a USD dispute")
            } else {
                let amount = cents_to_micros(object, "amount")?;
                placeholder(&mut tx, key, at).await?;
                let new = sqlx::query(
                    "INSERT INTO stripe_disputes (id, payment_key, amount_micros, created_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(dispute)
                .bind(key)
                .bind(amount)
                .bind(at)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if new {
                    sqlx::query(
                        "UPDATE stripe_payments SET disputed_micros = disputed_micros + $1 WHERE payment_key = $2",
                    )
                    .bind(amount)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                }
                reconcile(ledger, &mut tx, key, at).await?
            }
        }
        other => ignored(&format!("event type {other} is not used")),
    };
    let recorded = sqlx::query(
        "INSERT INTO stripe_events (id, type, outcome, received_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(kind)
    .bind(outcome.label())
    .bind(at)
    .execute(&mut *tx)
    .await;
    match recorded {
        Ok(_) => {}
        // The same event handled concurrently: this transaction rolls back.
        Err(e) if is_unique_violation(&e) => return Ok(WebhookOutcome::Duplicate),
        Err(e) => return Err(e.into()),
    }
    tx.commit()
        .await
        .map_err(|e| BillingError::from(StoreError::from(e)))?;
    Ok(outcome)
}

fn ignored(reason: &str) -> WebhookOutcome {
    WebhookOutcome::Ignored {
        reason: reason.to_owned(),
    }
}

fn usd(object: &Value) -> bool {
    str_at(object, "currency").is_some_and(|c| c.eq_ignore_ascii_case("usd"))
}

async fn find_account(
    tx: &mut Tx<'_>,
    reference: &str,
) -> Result<Option<(String, String)>, StripeError> {
    let row =
        sqlx::query("SELECT id, name FROM accounts WHERE id = $1 OR name = $1 ORDER BY id LIMIT 1")
            .bind(reference)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(match row {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        None => None,
    })
}

async fn checkout(
    ledger: &Ledger,
    tx: &mut Tx<'_>,
    session: &Value,
    at: i64,
) -> Result<WebhookOutcome, StripeError> {
    let session_id = str_at(session, "id")
        .ok_or_else(|| StripeError::InvalidPayload("checkout session without id".into()))?;
    if str_at(session, "payment_status") != Some("paid") {
        return Ok(ignored("the payment is not completed yet"));
    }
    if !usd(session) {
        return Ok(ignored("not a USD payment"));
    }
    let amount = cents_to_micros(session, "amount_total")?;
    if amount == 0 {
        return Ok(ignored("nothing was paid"));
    }
    let reference = str_at(session, "client_reference_id")
        .or_else(|| session.pointer("/metadata/account").and_then(Value::as_str));
    let account = match reference {
        Some(r) => find_account(tx, r).await?,
        None => None,
    };
    let Some((account_id, account)) = account else {
        tracing::error!(session = %session_id, "a paid Stripe checkout names no known account; credit it by hand");
        return Ok(ignored(
            "no known account in client_reference_id or metadata.account",
        ));
    };
    let key = str_at(session, "payment_intent").unwrap_or(session_id);
    let credited = sqlx::query(
        "SELECT payment_key FROM stripe_payments WHERE (payment_key = $1 OR session_id = $2) \
         AND credit_transfer_id IS NOT NULL",
    )
    .bind(key)
    .bind(session_id)
    .fetch_optional(&mut **tx)
    .await?;
    if credited.is_some() {
        return Ok(ignored("this payment was credited already"));
    }
    let transfer = ledger
        .credit_wallet_in(
            tx,
            &account_id,
            amount,
            &format!("Stripe payment {key}"),
            at,
        )
        .await?;
    placeholder(tx, key, at).await?;
    sqlx::query(
        "UPDATE stripe_payments SET session_id = $1, account_id = $2, amount_micros = $3, credit_transfer_id = $4 \
         WHERE payment_key = $5",
    )
    .bind(session_id)
    .bind(&account_id)
    .bind(amount)
    .bind(&transfer)
    .bind(key)
    .execute(&mut **tx)
    .await?;
    // A refund or dispute that arrived first is applied now.
    reconcile(ledger, tx, key, at).await?;
    Ok(WebhookOutcome::Credited {
        account,
        amount_micros: amount,
    })
}

async fn placeholder(tx: &mut Tx<'_>, key: &str, at: i64) -> Result<(), StripeError> {
    sqlx::query(
        "INSERT INTO stripe_payments (payment_key, created_at) VALUES ($1, $2) ON CONFLICT (payment_key) DO NOTHING",
    )
    .bind(key)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Reverses what the payment's refunds and disputes ask for beyond what was reversed
/// already, capped at the amount paid; nothing while the payment is not credited.
async fn reconcile(
    ledger: &Ledger,
    tx: &mut Tx<'_>,
    key: &str,
    at: i64,
) -> Result<WebhookOutcome, StripeError> {
    let r = sqlx::query(
        "SELECT account_id, amount_micros, refunded_micros, disputed_micros, reversed_micros, credit_transfer_id \
         FROM stripe_payments WHERE payment_key = $1",
    )
    .bind(key)
    .fetch_one(&mut **tx)
    .await?;
    let account_id: Option<String> = r.try_get(0)?;
    let amount: i64 = r.try_get(1)?;
    let wanted = amount.min(r.try_get::<i64, _>(2)?.saturating_add(r.try_get(3)?));
    let reversed: i64 = r.try_get(4)?;
    let credit: Option<String> = r.try_get(5)?;
    let (Some(account_id), Some(_)) = (account_id, credit) else {
        return Ok(WebhookOutcome::Reversal {
            payment: key.to_owned(),
            reversed_micros: 0,
            loss_micros: 0,
        });
    };
    let delta = wanted - reversed;
    if delta <= 0 {
        return Ok(WebhookOutcome::Reversal {
            payment: key.to_owned(),
            reversed_micros: 0,
            loss_micros: 0,
        });
    }
    let (transfer, loss) = ledger
        .reverse_payment_in(
            tx,
            &account_id,
            delta,
            &format!("Stripe reversal {key}"),
            at,
        )
        .await?;
    sqlx::query(
        "INSERT INTO stripe_reversals (transfer_id, payment_key, amount_micros, loss_micros, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&transfer)
    .bind(key)
    .bind(delta)
    .bind(loss)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE stripe_payments SET reversed_micros = reversed_micros + $1 WHERE payment_key = $2",
    )
    .bind(delta)
    .bind(key)
    .execute(&mut **tx)
    .await?;
    if loss > 0 {
        tracing::warn!(payment = %key, loss_micros = loss, "a reversed payment had been spent; booked as a platform loss");
    }
    Ok(WebhookOutcome::Reversal {
        payment: key.to_owned(),
        reversed_micros: delta,
        loss_micros: loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(payload);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn accepts_any_matching_v1_within_tolerance() {
        let secret = WebhookSecret::new("whsec_test");
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_test", 1_000, body);
        let other = sign("whsec_old", 1_000, body);
        let h = format!("t=1000,v1={other},v1={good},v0=deadbeef");
        assert!(verify_signature(&secret, &h, body, 1_000).is_ok());
        assert!(verify_signature(&secret, &h, body, 1_300).is_ok());
        assert!(matches!(
            verify_signature(&secret, &h, body, 1_301),
            Err(StripeError::Stale(301))
        ));
        assert!(matches!(
            verify_signature(&secret, &format!("t=1000,v1={other}"), body, 1_000),
            Err(StripeError::BadSignature)
        ));
        assert!(matches!(
            verify_signature(&secret, &h, br#"{"id":"evt_2"}"#, 1_000),
            Err(StripeError::BadSignature)
        ));
        for bad in ["", "t=1000", &format!("v1={good}"), "t=x,v1=00"] {
            assert!(matches!(
                verify_signature(&secret, bad, body, 1_000),
                Err(StripeError::MissingSignature)
            ));
        }
        assert_eq!(format!("{secret:?}"), "WebhookSecret(..)");
    }
}
