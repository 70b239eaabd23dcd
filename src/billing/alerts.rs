//! Low-balance alerts (issue 6 item 6). Each account may set a threshold
//! ([`super::Ledger::set_low_balance`]); the ledger records one [`LowBalanceAlert`] when a
//! debit (a call's reserve, a plan fee, a reversed payment) takes the wallet from at or
//! above the threshold to below it, in the debit's own transaction. The alert is not
//! raised again until a credit from outside (a top-up, a grant, included credits) lifts
//! the wallet back to the threshold: a balance hovering around it alerts once.
//!
//! Delivery is not done here: [`relay_to_outbox`] (run by the alert worker,
//! [`crate::alerts::worker`]) moves [`pending`] alerts into the transactional alert
//! outbox as `balance.low` events, marking each handed off in the same transaction, so
//! each crossing is delivered once whatever crashes or how many replicas relay.

use serde_json::{Value, json};
use sqlx::Row;

use super::ledger::BillingError;
use super::period::rfc3339;
use super::pricing::format_usd;
use crate::alerts::{self as outbox, AlertEvent};
use crate::store::{Store, StoreError, now_ms};

/// One recorded crossing of an account's low-balance threshold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LowBalanceAlert {
    /// The alert's id (UUIDv7): the idempotency key of its delivery.
    pub id: String,
    /// The account's id.
    pub account_id: String,
    /// The account's name.
    pub account: String,
    /// The threshold crossed, micros.
    pub threshold_micros: i64,
    /// The wallet balance right after the crossing, micros.
    pub balance_micros: i64,
    /// The call whose reserve crossed it, if a call did.
    pub call_id: Option<String>,
    /// When (epoch ms).
    pub created_at: i64,
    /// When the outbox took it over (epoch ms), if it did.
    pub handed_off_at: Option<i64>,
}

impl LowBalanceAlert {
    /// The JSON body to deliver: `{"type": "balance.low", "id", "account", "balance_micros",
    /// "balance", "threshold_micros", "threshold", "currency", "call_id", "created_at"}`
    /// (amounts in micros and as USD decimals, time RFC 3339).
    pub fn webhook_payload(&self) -> Value {
        json!({
            "type": "balance.low",
            "id": self.id,
            "account": self.account,
            "balance_micros": self.balance_micros,
            "balance": format_usd(self.balance_micros),
            "threshold_micros": self.threshold_micros,
            "threshold": format_usd(self.threshold_micros),
            "currency": "USD",
            "call_id": self.call_id,
            "created_at": rfc3339(self.created_at),
        })
    }
}

const SELECT: &str = "SELECT b.id, b.account_id, a.name, b.threshold_micros, b.balance_micros, b.call_id, \
     b.created_at, b.handed_off_at FROM balance_alerts b JOIN accounts a ON a.id = b.account_id";

fn from_row(r: &sqlx::any::AnyRow) -> Result<LowBalanceAlert, BillingError> {
    Ok(LowBalanceAlert {
        id: r.try_get(0)?,
        account_id: r.try_get(1)?,
        account: r.try_get(2)?,
        threshold_micros: r.try_get(3)?,
        balance_micros: r.try_get(4)?,
        call_id: r.try_get(5)?,
        created_at: r.try_get(6)?,
        handed_off_at: r.try_get(7)?,
    })
}

/// Alerts not yet handed to the outbox, oldest first, at most `limit`.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn pending(store: &Store, limit: usize) -> Result<Vec<LowBalanceAlert>, BillingError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE b.handed_off_at IS NULL ORDER BY b.created_at, b.id LIMIT $1"
    )))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Marks alert `id` as taken over by the outbox at `at_ms`. Returns false when it was
/// already (a second outbox worker lost the race) or does not exist.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn mark_handed_off(store: &Store, id: &str, at_ms: i64) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE balance_alerts SET handed_off_at = $1 WHERE id = $2 AND handed_off_at IS NULL",
    )
    .bind(at_ms)
    .bind(id)
    .execute(store.pool())
    .await?
    .rows_affected()
        == 1)
}

/// Moves up to `limit` [`pending`] alerts into the alert outbox: for each, one
/// transaction marks it handed off (guarded, so a second relay on another replica skips
/// it) and enqueues a [`AlertEvent::LowBalance`] for its account. Returns how many were
/// moved.
///
/// # Errors
/// [`BillingError::Store`]; alerts moved before the failure stay moved.
pub async fn relay_to_outbox(store: &Store, limit: usize) -> Result<usize, BillingError> {
    let mut moved = 0;
    for alert in pending(store, limit).await? {
        let mut tx = store.begin().await?;
        let claimed = sqlx::query(
            "UPDATE balance_alerts SET handed_off_at = $1 WHERE id = $2 AND handed_off_at IS NULL",
        )
        .bind(now_ms())
        .bind(&alert.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed != 1 {
            continue;
        }
        outbox::enqueue(
            &mut tx,
            &alert.account_id,
            &AlertEvent::LowBalance {
                account: alert.account.clone(),
                threshold_micros: alert.threshold_micros,
                balance_micros: alert.balance_micros,
            },
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        moved += 1;
    }
    Ok(moved)
}

/// The account's alerts, newest first, at most `limit`.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn of_account(
    store: &Store,
    account_id: &str,
    limit: usize,
) -> Result<Vec<LowBalanceAlert>, BillingError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE b.account_id = $1 ORDER BY b.created_at DESC, b.id DESC LIMIT $2"
    )))
    .bind(account_id)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(from_row).collect()
}
