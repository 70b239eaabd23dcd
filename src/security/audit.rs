//! The audit log (issue 3 item 8): who did what, when, kept in the store's
//! `audit_log` table and read with `mcp-marketplace audit`. Recorded: key creation and
//! revocation, server approvals (and tool re-approvals), suspensions, credential
//! changes, secret rotations, policy changes, and blocked calls. An entry never holds
//! a secret: details carry ids, names, header names and rule names only.

use serde_json::Value;
use sqlx::Row;

use crate::store::{Store, StoreError, now_ms};

/// Most entries one read returns.
pub const MAX_READ: usize = 10_000;

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An operator at the command line (the OS user, when known).
    Cli(String),
    /// An API key (REST or MCP), by key id and account name.
    Key {
        /// The key's id.
        key_id: String,
        /// Its account's name.
        account: String,
    },
    /// The marketplace itself (start-up, the demo, background work, the call path).
    System,
}

impl Actor {
    /// The operator running this process, from `$USER` (or `$LOGNAME`).
    pub fn cli() -> Self {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_owned());
        Self::Cli(user)
    }

    /// `cli:USER`, `key:KEY_ID (ACCOUNT)` or `system`.
    pub fn label(&self) -> String {
        match self {
            Self::Cli(u) => format!("cli:{u}"),
            Self::Key { key_id, account } => format!("key:{key_id} ({account})"),
            Self::System => "system".to_owned(),
        }
    }
}

/// One entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEntry {
    /// UUIDv7 (sorts by time).
    pub id: String,
    /// When, epoch ms.
    pub at: i64,
    /// Who: `cli:USER`, `key:KEY_ID (ACCOUNT)` or `system`.
    pub actor: String,
    /// What, e.g. `key.create`, `server.approve`, `call.blocked`.
    pub action: String,
    /// On what: a key id, a server slug, a call id.
    pub subject: String,
    /// Details (JSON object).
    pub detail: Value,
}

/// Appends an entry. A failure is logged and returned; callers that already changed
/// state log it rather than undo the change.
///
/// # Errors
/// [`StoreError`].
pub async fn record(
    store: &Store,
    actor: &Actor,
    action: &str,
    subject: &str,
    detail: Value,
) -> Result<(), StoreError> {
    let result = sqlx::query(
        "INSERT INTO audit_log (id, at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(now_ms())
    .bind(actor.label())
    .bind(action)
    .bind(subject)
    .bind(detail.to_string())
    .execute(store.pool())
    .await;
    if let Err(e) = &result {
        tracing::error!(error = %e, action, subject, "cannot write the audit log");
    }
    result.map(|_| ()).map_err(StoreError::from)
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only entries at or after this time, epoch ms.
    pub since_ms: Option<i64>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this subject.
    pub subject: Option<String>,
    /// At most this many, newest first (capped at [`MAX_READ`]).
    pub limit: usize,
}

/// Reads entries, newest first.
///
/// # Errors
/// [`StoreError`].
pub async fn read(store: &Store, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, at, actor, action, subject, detail FROM audit_log \
         WHERE at >= $1 AND ($2 = '' OR action = $2) AND ($3 = '' OR subject = $3) \
         ORDER BY at DESC, id DESC LIMIT $4",
    )
    .bind(q.since_ms.unwrap_or(0))
    .bind(q.action.clone().unwrap_or_default())
    .bind(q.subject.clone().unwrap_or_default())
    .bind(q.limit.clamp(1, MAX_READ) as i64)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            let detail: String = r.try_get(5)?;
            Ok(AuditEntry {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                actor: r.try_get(2)?,
                action: r.try_get(3)?,
                subject: r.try_get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}
