//! The delivery worker: takes due rows of `alert_outbox` and delivers each to its
//! account's webhook and e-mail address.
//!
//! - **Claiming.** A batch of due rows (not delivered, not dead, `next_attempt_at` ≤
//!   now, no live lease) is claimed in one `UPDATE … RETURNING` that sets
//!   `lease_owner`/`lease_until` ([`LEASE_MS`]); on PostgreSQL the inner `SELECT` uses
//!   `FOR UPDATE SKIP LOCKED`, so replicas sharing the database never claim the same
//!   row, and a row claimed by a replica that died is taken over when its lease ends.
//!   SQLite serializes writers, so the same statement is atomic there.
//! - **Delivery.** The webhook gets an HTTP POST of the stored event JSON, signed as
//!   [`super::signature`] describes, through the upstream HTTP client (no redirects, no
//!   proxy, every connect through the SSRF-checking resolver; the URL is re-checked
//!   against the endpoint policy at each attempt). Any 2xx answer marks the webhook
//!   done; anything else (3xx included) is a failure. E-mail goes through
//!   [`super::email::Mailer`] when `[alerts.smtp]` is configured and the account set an
//!   address. Each channel is marked done on its own, so a retry never resends what a
//!   channel already accepted; the row is delivered when every configured channel is
//!   done. An account with no channel gets its alerts marked delivered with
//!   `last_error = "no delivery channel configured"` (nothing is queued forever).
//! - **Retries.** After failed attempt `n`, the next is due after
//!   `min(retry_base · 2^(n−1), retry_max)`, of which a random half is dropped (equal
//!   jitter), so receivers coming back are not hit by every replica at once. After
//!   `max_attempts` failures the row is dead (`dead_at`). `last_error` holds a short
//!   reason (an HTTP status or a transport class), never a URL, a secret or a body.
//! - **Exactly once by event id.** The outbox row's id is the event id (also sent as
//!   [`super::signature::EVENT_ID_HEADER`]). A delivery is repeated only when the
//!   marketplace did not see the 2xx (a crash or a timeout after the receiver
//!   accepted), so receivers deduplicate on the id.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use super::channels::{self, Destination};
use super::email::Mailer;
use super::signature::{EVENT_ID_HEADER, EVENT_KIND_HEADER, SIGNATURE_HEADER, sign};
use super::{AlertError, AlertsConfig};
use crate::security::EndpointPolicy;
use crate::security::vault::Vault;
use crate::store::{Backend, Store, now_ms};

/// How long a claim holds a row (ms): longer than one webhook POST and one SMTP
/// exchange together.
pub const LEASE_MS: i64 = 60_000;
/// Rows claimed per batch.
pub const CLAIM_BATCH: i64 = 32;
/// Deadline of one webhook POST.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the worker looks whether a week's digests are due.
const DIGEST_CHECK_MS: i64 = 10 * 60 * 1000;
/// Low-balance alerts relayed per tick.
const RELAY_BATCH: usize = 100;
/// What `last_error` says when an account has no channel.
pub const NO_CHANNEL: &str = "no delivery channel configured";

/// One claimed outbox row.
#[derive(Debug, Clone)]
struct Claimed {
    id: String,
    account_id: String,
    kind: String,
    payload: String,
    attempts: i64,
    webhook_done: bool,
    email_done: bool,
}

/// The delivery worker of one process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    vault: Vault,
    policy: EndpointPolicy,
    http: reqwest::Client,
    config: AlertsConfig,
    mailer: Option<Mailer>,
    /// This worker's lease owner id (UUIDv7).
    owner: String,
}

impl Worker {
    /// A worker over `store`, decrypting signing secrets with `vault`, posting only
    /// where `policy` allows.
    ///
    /// # Errors
    /// [`AlertError::Config`] when the HTTP client or the SMTP transport cannot be made.
    pub fn new(
        store: Store,
        vault: Vault,
        policy: EndpointPolicy,
        config: AlertsConfig,
    ) -> Result<Self, AlertError> {
        let http = crate::upstream::client::http_client(policy.resolver())
            .map_err(|e| AlertError::Config("alerts", e.to_string()))?;
        let mailer = config.smtp.as_ref().map(Mailer::new).transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                vault,
                policy,
                http,
                config,
                mailer,
                owner: uuid::Uuid::now_v7().to_string(),
            }),
        })
    }

    /// Runs until `token` is cancelled: each `poll_interval` relays low-balance alerts,
    /// enqueues due weekly digests (checked every 10 minutes), and delivers due rows
    /// batch after batch. On cancellation the pass in hand is dropped (a delivery in
    /// flight is abandoned and retried later, so shutdown never waits for a slow
    /// receiver) and the rows this worker leases are released for the next process.
    pub async fn run(&self, token: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_digest_check = 0i64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = token.cancelled() => break,
            }
            if let Err(e) =
                crate::billing::alerts::relay_to_outbox(&self.inner.store, RELAY_BATCH).await
            {
                tracing::warn!(error = %e, "relaying low-balance alerts failed");
            }
            let now = now_ms();
            if self.inner.config.weekly_digest && now - last_digest_check >= DIGEST_CHECK_MS {
                last_digest_check = now;
                let week = super::digest::last_complete_week(now);
                match super::digest::enqueue_weekly_digests(&self.inner.store, &week).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(digests = n, week = %week.label, "enqueued weekly digests")
                    }
                    Err(e) => tracing::warn!(error = %e, "enqueueing weekly digests failed"),
                }
            }
            loop {
                // Shutdown does not wait for slow receivers: the pass in hand is dropped
                // and its rows released below, to be retried by the next process.
                let pass = tokio::select! {
                    r = self.deliver_due() => r,
                    () = token.cancelled() => break,
                };
                match pass {
                    Ok(n) if n as i64 == CLAIM_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "alert delivery pass failed");
                        break;
                    }
                }
            }
            if token.is_cancelled() {
                break;
            }
        }
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "cannot release alert leases");
        }
    }

    /// Claims one batch of due rows and attempts each. Returns how many were claimed.
    ///
    /// # Errors
    /// [`AlertError::Store`] when claiming or recording fails.
    pub async fn deliver_due(&self) -> Result<usize, AlertError> {
        let batch = self.claim().await?;
        let n = batch.len();
        for row in batch {
            self.attempt(row).await?;
        }
        Ok(n)
    }

    async fn claim(&self) -> Result<Vec<Claimed>, AlertError> {
        let now = now_ms();
        let lock = match self.inner.store.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let due = "delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= $3 \
                   AND (lease_until IS NULL OR lease_until < $3)";
        let sql = format!(
            "UPDATE alert_outbox SET lease_owner = $1, lease_until = $2 WHERE {due} AND id IN \
             (SELECT id FROM alert_outbox WHERE {due} ORDER BY next_attempt_at, id LIMIT $4{lock}) \
             RETURNING id, account_id, kind, payload, attempts, webhook_done_at, email_done_at"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&self.inner.owner)
            .bind(now + LEASE_MS)
            .bind(now)
            .bind(CLAIM_BATCH)
            .fetch_all(self.inner.store.pool())
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Claimed {
                id: r.try_get(0)?,
                account_id: r.try_get(1)?,
                kind: r.try_get(2)?,
                payload: r.try_get(3)?,
                attempts: r.try_get(4)?,
                webhook_done: r.try_get::<Option<i64>, _>(5)?.is_some(),
                email_done: r.try_get::<Option<i64>, _>(6)?.is_some(),
            });
        }
        // Oldest first within the batch, so one account's alerts usually arrive in order.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn attempt(&self, row: Claimed) -> Result<(), AlertError> {
        let dest = match channels::destination(
            &self.inner.store,
            &self.inner.vault,
            &row.account_id,
        )
        .await
        {
            Ok(d) => d,
            Err(AlertError::Vault(_)) => {
                // A secret that no longer decrypts is a configuration fault; retrying
                // with backoff gives the operator time to fix the key.
                return self
                    .failed(&row, "the webhook signing secret cannot be decrypted")
                    .await;
            }
            Err(e) => return Err(e),
        };
        let Destination { webhook, email } = dest;
        let email = email.filter(|_| self.inner.mailer.is_some());
        if webhook.is_none() && email.is_none() {
            return self.finish(&row, Some(NO_CHANNEL)).await;
        }
        let mut errors = Vec::new();
        if let Some((url, secret)) = &webhook
            && !row.webhook_done
        {
            match self.post(url, secret, &row).await {
                Ok(()) => {
                    self.mark(&row, "webhook_done_at").await?;
                    metrics::counter!("mcp_marketplace_alerts_delivered_total", "channel" => "webhook").increment(1);
                }
                Err(e) => errors.push(format!("webhook: {e}")),
            }
        }
        if let (Some(to), Some(mailer)) = (&email, &self.inner.mailer)
            && !row.email_done
        {
            let payload: Value = serde_json::from_str(&row.payload).unwrap_or(Value::Null);
            match mailer.send(to, &payload).await {
                Ok(()) => {
                    self.mark(&row, "email_done_at").await?;
                    metrics::counter!("mcp_marketplace_alerts_delivered_total", "channel" => "email").increment(1);
                }
                Err(e) => errors.push(format!("email: {e}")),
            }
        }
        if errors.is_empty() {
            self.finish(&row, None).await
        } else {
            self.failed(&row, &errors.join("; ")).await
        }
    }

    /// POSTs the stored payload to `url`, signed with `secret`.
    async fn post(&self, url: &str, secret: &str, row: &Claimed) -> Result<(), String> {
        // IP-literal hosts never reach the resolver: check the policy here too.
        self.inner
            .policy
            .check(url)
            .map_err(|e| format!("the URL is no longer allowed ({e})"))?;
        let body = row.payload.clone().into_bytes();
        let signature = sign(secret, chrono::Utc::now().timestamp(), &body);
        let response = self
            .inner
            .http
            .post(url)
            .timeout(WEBHOOK_TIMEOUT)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &row.id)
            .header(EVENT_KIND_HEADER, &row.kind)
            .body(body)
            .send()
            .await
            // reqwest's messages carry the URL; only the class of failure is kept.
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_owned()
                } else if e.is_connect() {
                    "could not connect".to_owned()
                } else {
                    "the connection failed".to_owned()
                }
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }

    async fn mark(&self, row: &Claimed, column: &'static str) -> Result<(), AlertError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE alert_outbox SET {column} = $1 WHERE id = $2 AND lease_owner = $3"
        )))
        .bind(now_ms())
        .bind(&row.id)
        .bind(&self.inner.owner)
        .execute(self.inner.store.pool())
        .await?;
        Ok(())
    }

    /// Marks `row` delivered (with a note when nothing was sent).
    async fn finish(&self, row: &Claimed, note: Option<&str>) -> Result<(), AlertError> {
        sqlx::query(
            "UPDATE alert_outbox SET delivered_at = $1, attempts = attempts + 1, last_error = $2, \
             lease_owner = NULL, lease_until = NULL WHERE id = $3 AND lease_owner = $4",
        )
        .bind(now_ms())
        .bind(note)
        .bind(&row.id)
        .bind(&self.inner.owner)
        .execute(self.inner.store.pool())
        .await?;
        Ok(())
    }

    /// Records a failed attempt: schedules the next one, or gives the row up.
    async fn failed(&self, row: &Claimed, error: &str) -> Result<(), AlertError> {
        let attempts = row.attempts + 1;
        let now = now_ms();
        let dead = attempts >= i64::from(self.inner.config.max_attempts);
        let next = now + retry_delay_ms(&self.inner.config, attempts);
        let error: String = error.chars().take(500).collect();
        sqlx::query(
            "UPDATE alert_outbox SET attempts = $1, next_attempt_at = $2, last_error = $3, dead_at = $4, \
             lease_owner = NULL, lease_until = NULL WHERE id = $5 AND lease_owner = $6",
        )
        .bind(attempts)
        .bind(next)
        .bind(&error)
        .bind(dead.then_some(now))
        .bind(&row.id)
        .bind(&self.inner.owner)
        .execute(self.inner.store.pool())
        .await?;
        metrics::counter!("mcp_marketplace_alerts_failed_attempts_total").increment(1);
        if dead {
            metrics::counter!("mcp_marketplace_alerts_dead_total").increment(1);
            tracing::warn!(event_id = %row.id, kind = %row.kind, attempts, "alert given up after its last attempt");
        } else {
            tracing::debug!(event_id = %row.id, kind = %row.kind, attempts, error = %error, "alert delivery failed; will retry");
        }
        Ok(())
    }

    /// Releases the rows this worker still leases (at shutdown).
    ///
    /// # Errors
    /// [`AlertError::Store`].
    pub async fn release(&self) -> Result<(), AlertError> {
        sqlx::query(
            "UPDATE alert_outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(&self.inner.owner)
        .execute(self.inner.store.pool())
        .await?;
        Ok(())
    }
}

/// The delay before the attempt after failed attempt `attempts` (≥ 1), ms:
/// `min(retry_base · 2^(attempts−1), retry_max)`, of which a uniformly random part of
/// up to half is dropped (equal jitter).
pub fn retry_delay_ms(config: &AlertsConfig, attempts: i64) -> i64 {
    let base = config.retry_base.as_millis().min(i64::MAX as u128) as i64;
    let max = config.retry_max.as_millis().min(i64::MAX as u128) as i64;
    let shift = (attempts - 1).clamp(0, 40) as u32;
    let full = base.saturating_mul(1i64 << shift).min(max).max(1);
    let half = full / 2;
    let jitter = getrandom::u64().unwrap_or(0) % (half as u64 + 1);
    full - jitter as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap_with_at_most_half_jitter() {
        let config = AlertsConfig {
            retry_base: Duration::from_secs(10),
            retry_max: Duration::from_secs(3600),
            ..AlertsConfig::default()
        };
        for (attempts, full) in [
            (1, 10_000),
            (2, 20_000),
            (3, 40_000),
            (9, 2_560_000),
            (10, 3_600_000),
            (30, 3_600_000),
        ] {
            for _ in 0..20 {
                let d = retry_delay_ms(&config, attempts);
                assert!((full / 2..=full).contains(&d), "attempt {attempts}: {d}");
            }
        }
    }
}
