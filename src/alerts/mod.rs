//! Alerts to creators and accounts (issue 4 item 7): state changes of a server, tool
//! changes held back by pinning, incidents, low balances and weekly digests.
//!
//! Every alert goes through the transactional outbox `alert_outbox`: [`enqueue`] writes
//! the event in the caller's own transaction, next to the change it reports, so an
//! alert exists exactly when its change committed and no crash or restart loses it.
//! Delivery (signed webhooks, e-mail) reads the outbox afterwards; the event's `id`
//! (UUIDv7) is the idempotency key a receiver deduplicates on.
//!
//! - [`channels`]: each account's webhook (URL + HMAC signing secret, stored encrypted
//!   by the vault) and e-mail address;
//! - [`signature`]: the `X-MCP-Marketplace-Signature` scheme and its verification;
//! - [`worker`]: the delivery worker (claims due rows under a lease, POSTs them,
//!   e-mails them, retries with exponential backoff and jitter, gives up after
//!   [`AlertsConfig::max_attempts`]); it also relays low-balance alerts of
//!   [`crate::billing::alerts`] into the outbox and enqueues the weekly digests;
//! - [`email`]: SMTP via `lettre`;
//! - [`digest`]: the weekly digest of each creator.

pub mod channels;
pub mod digest;
pub mod email;
pub mod signature;
pub mod worker;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::security::EndpointError;
use crate::security::vault::VaultError;
use crate::store::{StoreError, Tx, now_ms};

/// Default pause between two looks at the outbox.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Default delay before the first retry; each further retry doubles it.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
/// Default longest delay between two attempts.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// Default number of attempts before an alert is given up (dead): with the defaults
/// above, 30 attempts span about 22 hours.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 30;

/// Errors of alert configuration and delivery. Messages never carry a signing secret,
/// an SMTP password or an upstream credential.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The webhook URL breaks the endpoint policy (https only, public hosts, …).
    #[error("invalid webhook URL: {0}")]
    Url(#[from] EndpointError),
    /// The e-mail address does not parse (RFC 5322 addr-spec).
    #[error("invalid e-mail address")]
    Email,
    /// No account of that name or id.
    #[error("unknown account")]
    UnknownAccount,
    /// A setting is out of range.
    #[error("invalid alerts setting {0}: {1}")]
    Config(&'static str, String),
    /// The vault could not encrypt or decrypt the signing secret.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for AlertError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// `[alerts]` of the config file (every key optional; durations in humantime, `30s`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AlertsFile {
    /// Pause between two looks at the outbox (default `2s`).
    pub poll_interval: Option<String>,
    /// Delay before the first retry (default `10s`).
    pub retry_base: Option<String>,
    /// Longest delay between attempts (default `1h`).
    pub retry_max: Option<String>,
    /// Attempts before an alert is dead (default 30).
    pub max_attempts: Option<u32>,
    /// Enqueue weekly digests (default true).
    pub weekly_digest: Option<bool>,
    /// `[alerts.smtp]`: e-mail delivery, off when absent.
    pub smtp: Option<SmtpFile>,
}

/// `[alerts.smtp]` of the config file.
#[derive(Clone, Default, Deserialize)]
pub struct SmtpFile {
    /// The SMTP server's host name.
    pub host: Option<String>,
    /// Its port (default 587 for `starttls`, 465 for `tls`, 25 for `none`).
    pub port: Option<u16>,
    /// `starttls` (default), `tls` (implicit TLS) or `none` (plain, local relays and tests).
    pub tls: Option<String>,
    /// SMTP AUTH user name.
    pub username: Option<String>,
    /// SMTP AUTH password (also `MCP_MARKETPLACE_ALERTS__SMTP__PASSWORD`).
    pub password: Option<String>,
    /// The `From:` address (required).
    pub from: Option<String>,
}

impl std::fmt::Debug for SmtpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpFile")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| ".."))
            .field("from", &self.from)
            .finish()
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (RFC 3207), required.
    StartTls,
    /// TLS from the first byte (RFC 8314).
    Tls,
    /// No TLS: only for a relay on the same host, and tests.
    None,
}

/// Resolved `[alerts.smtp]`.
#[derive(Clone)]
pub struct SmtpConfig {
    /// Host name.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Connection protection.
    pub tls: SmtpTls,
    /// SMTP AUTH credentials, when given.
    pub credentials: Option<(String, String)>,
    /// The `From:` address.
    pub from: String,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("from", &self.from)
            .finish()
    }
}

/// Resolved `[alerts]`.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// Pause between two looks at the outbox.
    pub poll_interval: Duration,
    /// Delay before the first retry.
    pub retry_base: Duration,
    /// Longest delay between attempts.
    pub retry_max: Duration,
    /// Attempts before an alert is dead.
    pub max_attempts: u32,
    /// Whether the worker enqueues weekly digests.
    pub weekly_digest: bool,
    /// E-mail delivery, when configured.
    pub smtp: Option<SmtpConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            poll_interval: DEFAULT_POLL_INTERVAL,
            retry_base: DEFAULT_RETRY_BASE,
            retry_max: DEFAULT_RETRY_MAX,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            weekly_digest: true,
            smtp: None,
        }
    }
}

impl AlertsConfig {
    /// Resolves `[alerts]` over the defaults.
    ///
    /// # Errors
    /// [`AlertError::Config`] naming the key that is out of range or malformed.
    pub fn from_file(file: &AlertsFile) -> Result<Self, AlertError> {
        let d = Self::default();
        let dur = |key: &'static str, v: &Option<String>, default: Duration| match v {
            Some(v) => humantime::parse_duration(v.trim())
                .map_err(|e| AlertError::Config(key, e.to_string())),
            None => Ok(default),
        };
        let max_attempts = file.max_attempts.unwrap_or(d.max_attempts);
        if !(1..=1000).contains(&max_attempts) {
            return Err(AlertError::Config(
                "alerts.max_attempts",
                "between 1 and 1000".into(),
            ));
        }
        let smtp = match &file.smtp {
            None => None,
            Some(s) => Some(smtp_config(s)?),
        };
        Ok(Self {
            poll_interval: dur("alerts.poll_interval", &file.poll_interval, d.poll_interval)?,
            retry_base: dur("alerts.retry_base", &file.retry_base, d.retry_base)?,
            retry_max: dur("alerts.retry_max", &file.retry_max, d.retry_max)?,
            max_attempts,
            weekly_digest: file.weekly_digest.unwrap_or(true),
            smtp,
        })
    }
}

fn smtp_config(s: &SmtpFile) -> Result<SmtpConfig, AlertError> {
    let host = s
        .host
        .as_deref()
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or_else(|| AlertError::Config("alerts.smtp.host", "required".into()))?;
    let tls = match s.tls.as_deref().map(str::trim) {
        None | Some("starttls") => SmtpTls::StartTls,
        Some("tls") => SmtpTls::Tls,
        Some("none") => SmtpTls::None,
        Some(_) => {
            return Err(AlertError::Config(
                "alerts.smtp.tls",
                "one of starttls, tls, none".into(),
            ));
        }
    };
    let port = s.port.unwrap_or(match tls {
        SmtpTls::StartTls => 587,
        SmtpTls::Tls => 465,
        SmtpTls::None => 25,
    });
    let from = s
        .from
        .as_deref()
        .map(str::trim)
        .filter(|f| f.parse::<lettre::message::Mailbox>().is_ok())
        .ok_or_else(|| {
            AlertError::Config("alerts.smtp.from", "a valid address is required".into())
        })?;
    let credentials = match (&s.username, &s.password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        _ => {
            return Err(AlertError::Config(
                "alerts.smtp.username",
                "username and password go together".into(),
            ));
        }
    };
    Ok(SmtpConfig {
        host: host.to_owned(),
        port,
        tls,
        credentials,
        from: from.to_owned(),
    })
}

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
pub async fn enqueue(
    tx: &mut Tx<'_>,
    account_id: &str,
    event: &AlertEvent,
) -> Result<String, StoreError> {
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
