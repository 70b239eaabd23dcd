//! Alerts to creators and accounts (issue 4 item 7): state changes of a server, tool
//! changes held back by pinning, incidents, low balances and weekly digests.
//!
//! Every alert goes through the transactional outbox `alert_outbox`: [`enqueue`] writes
//! the event in the caller's own transaction, next to the change it reports, so an
//! alert exists exactly when its change committed and no crash or restart loses it.
//! Delivery (signed webhooks, e-mail) reads the outbox afterwards; the event's `id`
//! (UUIDv7) is the idempotency key a receiver deduplicates on.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::store::{StoreError, Tx, now_ms};

/// What an alert reports. Serialized as `{"kind": "...", ...fields}`; `kind` is also
/// stored in `alert_outbox.kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum AlertEvent {
    /// A server moved between statuses of the status machine (DESIGN.md "Health and
    /// trust"). Sent to the server's owner.
    #[serde(rename = "server.status_changed")]
    ServerStatusChanged {
        /// The server's slug.
        slug: String,
        /// The status before, e.g. `active`.
        from: String,
        /// The status after, e.g. `degraded`.
        to: String,
        /// Why, in one sentence (never an upstream URL or secret).
        reason: String,
    },
    /// An upstream changed or added a tool; it is held back until re-approved.
    #[serde(rename = "tool.changed")]
    ToolChanged {
        /// The server's slug.
        slug: String,
        /// The upstream's tool name.
        tool: String,
        /// `added`, `changed` or `removed`.
        change: String,
        /// The `tool_changes` row's id.
        change_id: String,
    },
    /// Something went wrong for callers: a circuit opened, calls failed in a row.
    #[serde(rename = "incident")]
    Incident {
        /// The server's slug.
        slug: String,
        /// What happened, in one sentence.
        summary: String,
    },
    /// A wallet fell below its owner's threshold (see [`crate::billing::alerts`]).
    #[serde(rename = "balance.low")]
    LowBalance {
        /// The account's name.
        account: String,
        /// The threshold crossed, micros.
        threshold_micros: i64,
        /// The balance right after the crossing, micros.
        balance_micros: i64,
    },
    /// A creator's weekly digest.
    #[serde(rename = "digest.weekly")]
    WeeklyDigest {
        /// The digest's figures (calls served, uptime %, earnings, tool changes, incidents).
        digest: Value,
    },
}

impl AlertEvent {
    /// The event's kind as stored and sent, e.g. `server.status_changed`.
    pub fn kind(&self) -> &'static str {
        match self {
            AlertEvent::ServerStatusChanged { .. } => "server.status_changed",
            AlertEvent::ToolChanged { .. } => "tool.changed",
            AlertEvent::Incident { .. } => "incident",
            AlertEvent::LowBalance { .. } => "balance.low",
            AlertEvent::WeeklyDigest { .. } => "digest.weekly",
        }
    }
}

/// Writes `event` for `account_id` to the outbox inside `tx` and returns the event id
/// (UUIDv7). Nothing is sent here: the alert becomes deliverable when `tx` commits and
/// disappears with it when `tx` rolls back.
///
/// The stored payload is `{"id", "created_at" (epoch ms), "kind", ...event fields}`.
///
/// # Errors
/// [`StoreError`] when the insert fails (e.g. an unknown `account_id`).
pub async fn enqueue(tx: &mut Tx, account_id: &str, event: &AlertEvent) -> Result<String, StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let mut payload =
        serde_json::to_value(event).expect("an AlertEvent has string keys and JSON values only");
    if let Value::Object(map) = &mut payload {
        map.insert("id".into(), Value::String(id.clone()));
        map.insert("created_at".into(), Value::from(now));
    }
    sqlx::query(
        "INSERT INTO alert_outbox (id, account_id, kind, payload, created_at, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(account_id)
    .bind(event.kind())
    .bind(payload.to_string())
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}
