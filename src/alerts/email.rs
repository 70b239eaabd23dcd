//! E-mail delivery of alerts over SMTP (RFC 5321) with `lettre`, when `[alerts.smtp]`
//! is configured and the account set an address. One message per alert: a one-line
//! subject, a plain-text body with the event JSON, and `Message-ID:
//! <{event id}@mcp-marketplace>` so a mail system can deduplicate a resend.

use std::time::Duration;

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::Value;

use super::{AlertError, SmtpConfig, SmtpTls};

/// Deadline of one SMTP exchange.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

/// An SMTP client for alerts. Cheap to clone (a pooled transport).
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer").field("from", &self.from).finish()
    }
}

impl Mailer {
    /// A mailer for `config`.
    ///
    /// # Errors
    /// [`AlertError::Config`] when the host or `from` is unusable.
    pub fn new(config: &SmtpConfig) -> Result<Self, AlertError> {
        crate::install_crypto_provider();
        let bad = |e: lettre::transport::smtp::Error| {
            AlertError::Config("alerts.smtp.host", e.to_string())
        };
        let builder = match config.tls {
            SmtpTls::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host).map_err(bad)?
            }
            SmtpTls::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host).map_err(bad)?
            }
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host),
        };
        let mut builder = builder.port(config.port).timeout(Some(SMTP_TIMEOUT));
        if let Some((user, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let from = config
            .from
            .parse::<Mailbox>()
            .map_err(|e| AlertError::Config("alerts.smtp.from", e.to_string()))?;
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }

    /// Sends the alert `payload` (the outbox JSON) to `to`.
    ///
    /// # Errors
    /// A one-line reason without credentials (the SMTP reply or the transport failure).
    pub async fn send(&self, to: &str, payload: &Value) -> Result<(), String> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| "the account's e-mail address is invalid".to_owned())?;
        let id = payload.get("id").and_then(Value::as_str).unwrap_or("");
        let body = format!(
            "{}\n\n{}\n",
            summary(payload),
            serde_json::to_string_pretty(payload).unwrap_or_default()
        );
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("[mcp-marketplace] {}", summary(payload)))
            .message_id(Some(format!("<{id}@mcp-marketplace>")))
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| format!("cannot build the message: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP delivery failed: {e}"))
    }
}

/// One line describing an alert payload, e.g. `server units: active → degraded`.
pub fn summary(payload: &Value) -> String {
    let s = |k: &str| payload.get(k).and_then(Value::as_str).unwrap_or("?");
    match s("kind") {
        "server.status_changed" => format!("server {}: {} → {}", s("slug"), s("from"), s("to")),
        "tool.changed" => format!(
            "server {}: tool {} {} (held back until re-approved)",
            s("slug"),
            s("tool"),
            s("change")
        ),
        "incident" => format!("server {}: {}", s("slug"), s("summary")),
        "balance.low" => format!(
            "account {}: balance below the low-balance threshold",
            s("account")
        ),
        "digest.weekly" => format!(
            "weekly digest {}",
            payload
                .pointer("/digest/week")
                .and_then(Value::as_str)
                .unwrap_or("")
        ),
        other => other.to_owned(),
    }
}
