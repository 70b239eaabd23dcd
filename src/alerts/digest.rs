//! The weekly digest of each creator (issue 4 item 7): for one ISO 8601 week (Monday
//! 00:00 UTC to the next Monday), the calls their servers served (settled calls, by
//! `calls.finished_at`), their earnings (the credits of their `earnings:` ledger
//! account by settle transfers of that week), each server's uptime (the share of
//! `probe_results` rows with `ok = 1`; `null` without probes), the tool changes
//! detected (`tool_changes.detected_at`, those the creator was alerted of: the tools
//! of a server's first listing, reviewed at its approval, are no change) and the
//! incidents (their own outbox rows of kind `incident`, and of kind
//! `server.status_changed` into `degraded` or `inactive`; see [`is_incident`]).
//!
//! [`enqueue_weekly_digests`] enqueues one [`AlertEvent::WeeklyDigest`] per creator
//! (an account owning a server) and week; the primary key of `weekly_digests`, written
//! in the same transaction, makes that idempotent across restarts and replicas.

use chrono::{Datelike, NaiveDate, TimeZone, Utc, Weekday};
use serde::Serialize;
use sqlx::Row;

use super::{AlertError, AlertEvent, enqueue};
use crate::billing::ledger::earnings_id;
use crate::billing::period::rfc3339;
use crate::billing::pricing::format_usd;
use crate::store::{Store, StoreError, is_unique_violation, now_ms};

/// Most incidents listed in one digest (the count covers all).
pub const MAX_LISTED_INCIDENTS: i64 = 50;
const WEEK_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// One ISO week: its label and its bounds in epoch ms, `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Week {
    /// `YYYY-Www`, e.g. `2026-W48`.
    pub label: String,
    /// Monday 00:00 UTC, epoch ms.
    pub start_ms: i64,
    /// The next Monday 00:00 UTC, epoch ms (exclusive).
    pub end_ms: i64,
}

impl Week {
    fn starting(monday: NaiveDate) -> Self {
        let start_ms = Utc
            .from_utc_datetime(&monday.and_hms_opt(0, 0, 0).expect("midnight exists"))
            .timestamp_millis();
        let iso = monday.iso_week();
        Self {
            label: format!("{}-W{:02}", iso.year(), iso.week()),
            start_ms,
            end_ms: start_ms + WEEK_MS,
        }
    }

    /// The week containing `ms` (epoch ms).
    pub fn containing(ms: i64) -> Self {
        let date = Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_default()
            .date_naive();
        let monday = date - chrono::Days::new(u64::from(date.weekday().num_days_from_monday()));
        Self::starting(monday)
    }

    /// Parses `YYYY-Www` (ISO 8601 week date).
    ///
    /// # Errors
    /// [`AlertError::Config`] for anything else (or a week the year does not have).
    pub fn parse(label: &str) -> Result<Self, AlertError> {
        let bad = || {
            AlertError::Config(
                "week",
                format!("expected YYYY-Www, e.g. 2026-W48, got {label:?}"),
            )
        };
        let (y, w) = label.trim().split_once("-W").ok_or_else(bad)?;
        let (y, w): (i32, u32) = (y.parse().map_err(|_| bad())?, w.parse().map_err(|_| bad())?);
        let monday = NaiveDate::from_isoywd_opt(y, w, Weekday::Mon).ok_or_else(bad)?;
        Ok(Self::starting(monday))
    }
}

/// The last week that ended at or before `now_ms`.
pub fn last_complete_week(now_ms: i64) -> Week {
    Week::containing(Week::containing(now_ms).start_ms - 1)
}

/// One server's figures in a digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerDigest {
    /// The server's slug.
    pub slug: String,
    /// Settled calls.
    pub calls_served: i64,
    /// Probes run.
    pub probes: i64,
    /// Probes that passed.
    pub probes_ok: i64,
    /// `100 · probes_ok / probes`, rounded to 2 decimals; `None` without probes.
    pub uptime_percent: Option<f64>,
}

/// One incident listed in a digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentLine {
    /// The event id.
    pub id: String,
    /// `incident` or `server.status_changed`.
    pub kind: String,
    /// One line, as the e-mail subject says it.
    pub summary: String,
    /// When, RFC 3339.
    pub at: String,
}

/// A creator's weekly digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Digest {
    /// The creator's account name.
    pub account: String,
    /// The week, `YYYY-Www`.
    pub week: String,
    /// Start of the week, RFC 3339.
    pub period_start: String,
    /// End of the week (exclusive), RFC 3339.
    pub period_end: String,
    /// Settled calls over all their servers.
    pub calls_served: i64,
    /// Earnings credited by the week's settlements, micros.
    pub earnings_micros: i64,
    /// The same in USD, e.g. `12.34`.
    pub earnings: String,
    /// Probes over all their servers.
    pub probes: i64,
    /// Of which passed.
    pub probes_ok: i64,
    /// Overall uptime, `100 · probes_ok / probes` rounded to 2 decimals; `None` without probes.
    pub uptime_percent: Option<f64>,
    /// Tool changes detected (held back by pinning).
    pub tool_changes: i64,
    /// Incidents and status changes reported.
    pub incidents: i64,
    /// The first [`MAX_LISTED_INCIDENTS`] of them, oldest first.
    pub incident_list: Vec<IncidentLine>,
    /// Per server, by slug.
    pub servers: Vec<ServerDigest>,
}

fn percent(ok: i64, total: i64) -> Option<f64> {
    (total > 0).then(|| ((ok as f64) * 10_000.0 / (total as f64)).round() / 100.0)
}

/// Computes the digest of `account_id` for `week`.
///
/// # Errors
/// [`AlertError::UnknownAccount`], [`AlertError::Store`].
pub async fn compute(store: &Store, account_id: &str, week: &Week) -> Result<Digest, AlertError> {
    let pool = store.pool();
    let account: String = sqlx::query("SELECT name FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(pool)
        .await?
        .ok_or(AlertError::UnknownAccount)?
        .try_get(0)?;
    let (from, to) = (week.start_ms, week.end_ms);
    let rows = sqlx::query(
        "SELECT s.slug, \
           (SELECT CAST(COUNT(*) AS BIGINT) FROM calls c WHERE c.server_id = s.id AND c.status = 'settled' \
              AND c.finished_at >= $2 AND c.finished_at < $3), \
           (SELECT CAST(COUNT(*) AS BIGINT) FROM probe_results p WHERE p.server_id = s.id \
              AND p.started_at >= $2 AND p.started_at < $3), \
           (SELECT CAST(COUNT(*) AS BIGINT) FROM probe_results p WHERE p.server_id = s.id AND p.ok = 1 \
              AND p.started_at >= $2 AND p.started_at < $3) \
         FROM servers s WHERE s.owner_account_id = $1 ORDER BY s.slug",
    )
    .bind(account_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut servers = Vec::new();
    for r in rows {
        let (probes, probes_ok): (i64, i64) = (r.try_get(2)?, r.try_get(3)?);
        servers.push(ServerDigest {
            slug: r.try_get(0)?,
            calls_served: r.try_get(1)?,
            probes,
            probes_ok,
            uptime_percent: percent(probes_ok, probes),
        });
    }
    let earnings_micros: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(e.amount), 0) AS BIGINT) FROM ledger_entries e \
         JOIN ledger_transfers t ON t.id = e.transfer_id \
         WHERE e.ledger_account_id = $1 AND t.kind = 'settle' AND t.created_at >= $2 AND t.created_at < $3",
    )
    .bind(earnings_id(account_id))
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await?
    .try_get(0)?;
    let tool_changes: i64 = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM tool_changes c JOIN servers s ON s.id = c.server_id \
         WHERE s.owner_account_id = $1 AND c.alerted_at IS NOT NULL \
         AND c.detected_at >= $2 AND c.detected_at < $3",
    )
    .bind(account_id)
    .bind(from)
    .bind(to)
    .fetch_one(pool)
    .await?
    .try_get(0)?;
    // Incidents: `incident` rows, and status changes for the worse (into `degraded` or
    // `inactive`); an approval, a recovery or a suspension is no incident.
    let rows = sqlx::query(
        "SELECT id, kind, payload, created_at FROM alert_outbox \
         WHERE account_id = $1 AND kind IN ('incident', 'server.status_changed') \
         AND created_at >= $2 AND created_at < $3 ORDER BY created_at, id",
    )
    .bind(account_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut incidents: i64 = 0;
    let mut incident_list = Vec::new();
    for r in rows {
        let kind: String = r.try_get(1)?;
        let payload: String = r.try_get(2)?;
        let payload = serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null);
        if !is_incident(&kind, &payload) {
            continue;
        }
        incidents += 1;
        if incident_list.len() < MAX_LISTED_INCIDENTS as usize {
            incident_list.push(IncidentLine {
                id: r.try_get(0)?,
                kind,
                summary: super::email::summary(&payload),
                at: rfc3339(r.try_get(3)?),
            });
        }
    }
    let probes = servers.iter().map(|s| s.probes).sum();
    let probes_ok = servers.iter().map(|s| s.probes_ok).sum();
    Ok(Digest {
        account,
        week: week.label.clone(),
        period_start: rfc3339(from),
        period_end: rfc3339(to),
        calls_served: servers.iter().map(|s| s.calls_served).sum(),
        earnings_micros,
        earnings: format_usd(earnings_micros),
        probes,
        probes_ok,
        uptime_percent: percent(probes_ok, probes),
        tool_changes,
        incidents,
        incident_list,
        servers,
    })
}

/// Enqueues the digest of `account_id` for `week` unless one was enqueued before.
/// Returns the event id, or `None` when it already existed.
///
/// # Errors
/// As [`compute`].
pub async fn enqueue_digest(
    store: &Store,
    account_id: &str,
    week: &Week,
) -> Result<Option<String>, AlertError> {
    let digest = compute(store, account_id, week).await?;
    let mut tx = store.begin().await?;
    let event = AlertEvent::WeeklyDigest {
        digest: serde_json::to_value(&digest).expect("a digest is plain JSON"),
    };
    let id = enqueue(&mut tx, account_id, &event).await?;
    let claimed = sqlx::query(
        "INSERT INTO weekly_digests (account_id, week, event_id, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (account_id, week) DO NOTHING",
    )
    .bind(account_id)
    .bind(&week.label)
    .bind(&id)
    .bind(now_ms())
    .execute(&mut *tx)
    .await;
    match claimed {
        Ok(r) if r.rows_affected() == 1 => {
            tx.commit().await.map_err(StoreError::from)?;
            Ok(Some(id))
        }
        // Another replica enqueued it first: roll back our copy.
        Ok(_) => Ok(None),
        Err(e) if is_unique_violation(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Enqueues `week`'s digest for every creator (account owning a server registered
/// before the week ended) that has none yet. Returns how many were enqueued.
///
/// # Errors
/// As [`compute`]; digests enqueued before the failure stay enqueued.
pub async fn enqueue_weekly_digests(store: &Store, week: &Week) -> Result<usize, AlertError> {
    let creators: Vec<String> = sqlx::query(
        "SELECT DISTINCT s.owner_account_id FROM servers s WHERE s.created_at < $1 AND NOT EXISTS \
         (SELECT 1 FROM weekly_digests d WHERE d.account_id = s.owner_account_id AND d.week = $2)",
    )
    .bind(week.end_ms)
    .bind(&week.label)
    .fetch_all(store.pool())
    .await?
    .into_iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    let mut n = 0;
    for account_id in creators {
        if enqueue_digest(store, &account_id, week).await?.is_some() {
            n += 1;
        }
    }
    Ok(n)
}

/// Whether an outbox row of `kind` with `payload` counts as an incident in a digest:
/// every `incident`, and a `server.status_changed` whose `to` is `degraded` or
/// `inactive`. Approvals, recoveries and admin suspensions are status changes too, but
/// not incidents.
pub fn is_incident(kind: &str, payload: &serde_json::Value) -> bool {
    match kind {
        "incident" => true,
        "server.status_changed" => matches!(payload["to"].as_str(), Some("degraded" | "inactive")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_weeks_parse_and_contain() {
        let w = Week::parse("2026-W48").unwrap();
        assert_eq!(w.label, "2026-W48");
        assert_eq!(rfc3339(w.start_ms), "2026-11-23T00:00:00.000Z");
        assert_eq!(w.end_ms - w.start_ms, WEEK_MS);
        assert_eq!(Week::containing(w.start_ms + 5), w);
        assert_eq!(Week::containing(w.end_ms - 1), w);
        assert_eq!(last_complete_week(w.end_ms + 10), w);
        // ISO years: 2021-01-03 (a Sunday) belongs to 2020-W53.
        assert_eq!(Week::parse("2020-W53").unwrap().label, "2020-W53");
        assert!(Week::parse("2021-W53").is_err());
        assert!(Week::parse("2026-48").is_err());
        assert_eq!(percent(2, 3), Some(66.67));
        assert_eq!(percent(0, 0), None);
    }
}
