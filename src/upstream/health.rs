//! The status machine of DESIGN.md "Health and trust" (issue 4 item 2), fed by probes
//! ([`super::probe`]) and by the outcomes of live calls.
//!
//! ```text
//! pending_review ──approve──▶ active ⇄ degraded ──▶ inactive ──▶ recovered ──▶ active
//!                 suspended by an admin from any status; approve brings it back
//! ```
//!
//! A probe is a **pass** when every check of every endpoint passed with grade A–C, a
//! **fail** when no endpoint completed `initialize` and `tools/list`, and **impaired**
//! otherwise (a failed check, grade D/F, or some endpoints down). The thresholds, with
//! hysteresis (one bad signal degrades, several good ones restore):
//!
//! | from | to | when |
//! | --- | --- | --- |
//! | active | degraded | one impaired or failed probe, or [`DEGRADE_AFTER_CALL_FAILURES`] live calls in a row failed at the upstream (transport, timeout, HTTP ≥ 500, invalid answer) |
//! | degraded | active | [`RESTORE_AFTER_PASSES`] passing probes in a row |
//! | active, degraded | inactive | [`INACTIVE_AFTER_FAILURES`] failed probes in a row |
//! | inactive | recovered | [`RECOVER_AFTER_REACHABLE`] probes in a row where the server answered |
//! | recovered | active | [`PROBATION_PASSES`] passing probes in a row |
//! | recovered | inactive | one failed probe (it is on probation) |
//! | recovered | degraded | one impaired probe, or [`DEGRADE_AFTER_CALL_FAILURES`] failed calls in a row |
//!
//! Pass and answered streaks restart at every transition (a recovered server's
//! probation counts from its recovery); the failure streak runs on across active →
//! degraded. Probes of servers pending review or suspended change nothing. Inactive servers are
//! hidden from `tools/list` and not callable; entering or leaving inactive sends
//! `notifications/tools/list_changed` to every account that installed the server.
//!
//! Every transition is one transaction: a compare-and-set of `servers.status` (so two
//! replicas never both move a server), a `server_status_events` row, and the
//! `server.status_changed` alert to the owner in the outbox. The probe streaks live in
//! `server_health`; the live-call streak is per process (in memory: a database write
//! per call would cost more than the call path's budget).

use std::sync::atomic::{AtomicU32, Ordering};

use dashmap::DashMap;
use sqlx::Row;

use super::probe::{Grade, ProbeReport};
use crate::alerts::{self, AlertEvent};
use crate::app::App;
use crate::catalog::{CatalogError, Server, ServerStatus};
use crate::store::{StoreError, now_ms};

/// Live calls failing at the upstream in a row that degrade an active server.
pub const DEGRADE_AFTER_CALL_FAILURES: u32 = 5;
/// Passing probes in a row that bring a degraded server back to active.
pub const RESTORE_AFTER_PASSES: i64 = 2;
/// Failed probes in a row that make a server inactive.
pub const INACTIVE_AFTER_FAILURES: i64 = 3;
/// Probes in a row where an inactive server answered that make it recovered.
pub const RECOVER_AFTER_REACHABLE: i64 = 2;
/// Passing probes in a row that end a recovered server's probation.
pub const PROBATION_PASSES: i64 = 3;

/// Who moved a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A probe.
    Probe,
    /// Live call outcomes.
    Calls,
    /// An admin (approve, suspend).
    Admin,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::Calls => "calls",
            Self::Admin => "admin",
        }
    }
}

/// What one probe says about a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every check passed, grade A–C.
    Pass,
    /// Reachable, but a check failed, it was slow, or an endpoint is down.
    Impaired,
    /// No endpoint completed `initialize` and `tools/list`.
    Fail,
}

impl Verdict {
    /// The verdict of `report`.
    pub fn of(report: &ProbeReport) -> Self {
        if !report.reachable {
            Self::Fail
        } else if report.ok && report.grade <= Grade::C {
            Self::Pass
        } else {
            Self::Impaired
        }
    }
}

/// The probe streaks of a server after a probe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streaks {
    /// Passing probes in a row.
    pub passes: i64,
    /// Probes in a row where some endpoint answered.
    pub reachable: i64,
    /// Failed probes in a row.
    pub failures: i64,
}

/// The status a server in `status` moves to after a probe with `verdict` that left
/// `streaks` (already counting this probe); `None` to stay. Pure: the table of the
/// module docs.
pub fn next_status(
    status: ServerStatus,
    verdict: Verdict,
    streaks: Streaks,
) -> Option<ServerStatus> {
    use ServerStatus as S;
    use Verdict as V;
    match (status, verdict) {
        (S::Active, V::Impaired | V::Fail) if streaks.failures >= INACTIVE_AFTER_FAILURES => {
            Some(S::Inactive)
        }
        (S::Active, V::Impaired | V::Fail) => Some(S::Degraded),
        (S::Degraded, V::Fail) if streaks.failures >= INACTIVE_AFTER_FAILURES => Some(S::Inactive),
        (S::Degraded, V::Pass) if streaks.passes >= RESTORE_AFTER_PASSES => Some(S::Active),
        (S::Inactive, V::Pass | V::Impaired) if streaks.reachable >= RECOVER_AFTER_REACHABLE => {
            Some(S::Recovered)
        }
        (S::Recovered, V::Fail) => Some(S::Inactive),
        (S::Recovered, V::Impaired) => Some(S::Degraded),
        (S::Recovered, V::Pass) if streaks.passes >= PROBATION_PASSES => Some(S::Active),
        _ => None,
    }
}

/// Per-process live-call health: the streak of upstream failures per server.
#[derive(Debug, Default)]
pub struct CallHealth {
    failures: DashMap<String, AtomicU32>,
}

impl CallHealth {
    /// Records a call to `server_id` that reached a verdict; returns the failure streak
    /// after it (0 after a success).
    pub fn record(&self, server_id: &str, failed_at_upstream: bool) -> u32 {
        if !failed_at_upstream {
            if let Some(c) = self.failures.get(server_id) {
                c.store(0, Ordering::Relaxed);
            }
            return 0;
        }
        if let Some(c) = self.failures.get(server_id) {
            return c.fetch_add(1, Ordering::Relaxed) + 1;
        }
        self.failures
            .entry(server_id.to_owned())
            .or_default()
            .fetch_add(1, Ordering::Relaxed)
            + 1
    }
}

/// Feeds one probe report of `server` to the status machine: updates the streaks in
/// `server_health` and moves the server when [`next_status`] says so.
///
/// # Errors
/// [`StoreError`] when the database fails.
pub async fn on_probe(app: &App, server: &Server, report: &ProbeReport) -> Result<(), StoreError> {
    let verdict = Verdict::of(report);
    let now = now_ms();
    let mut tx = app.store.begin().await?;
    let row = sqlx::query(
        "SELECT probe_passes, probe_reachable, probe_failures FROM server_health WHERE server_id = $1",
    )
    .bind(&server.id)
    .fetch_optional(&mut *tx)
    .await?;
    let before = match &row {
        Some(r) => Streaks {
            passes: r.try_get(0)?,
            reachable: r.try_get(1)?,
            failures: r.try_get(2)?,
        },
        None => Streaks::default(),
    };
    let after = Streaks {
        passes: if verdict == Verdict::Pass {
            before.passes + 1
        } else {
            0
        },
        reachable: if verdict == Verdict::Fail {
            0
        } else {
            before.reachable + 1
        },
        failures: if verdict == Verdict::Fail {
            before.failures + 1
        } else {
            0
        },
    };
    if row.is_some() {
        sqlx::query(
            "UPDATE server_health SET probe_passes = $1, probe_reachable = $2, probe_failures = $3, \
             updated_at = $4 WHERE server_id = $5",
        )
    } else {
        sqlx::query(
            "INSERT INTO server_health (probe_passes, probe_reachable, probe_failures, updated_at, server_id) \
             VALUES ($1, $2, $3, $4, $5)",
        )
    }
    .bind(after.passes)
    .bind(after.reachable)
    .bind(after.failures)
    .bind(now)
    .bind(&server.id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    // The status now, not the one the caller read before a probe of several seconds.
    let current = match current_status(app, &server.id).await? {
        Some(s) => s,
        None => return Ok(()),
    };
    // Every probe refreshes the gauge, so a new process shows statuses within one
    // interval.
    metrics::gauge!("mcp_marketplace_server_status", "server" => server.slug.clone(), "status" => current.as_str())
        .set(1.0);
    if let Some(to) = next_status(current, verdict, after) {
        let reason = match verdict {
            Verdict::Pass => format!("{} passing probes in a row", after.passes),
            Verdict::Impaired => {
                let failed: Vec<&str> = report
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| c.name.as_str())
                    .collect();
                if failed.is_empty() {
                    format!("the probe graded its latency {}", report.grade.as_str())
                } else {
                    format!("probe checks failed: {}", failed.join(", "))
                }
            }
            Verdict::Fail if to == ServerStatus::Inactive => format!(
                "{} probes in a row could not reach the server",
                after.failures
            ),
            Verdict::Fail => "a probe could not reach the server".to_owned(),
        };
        if matches!(to, ServerStatus::Recovered) && verdict == Verdict::Impaired {
            tracing::info!(server = %server.slug, "recovering while impaired");
        }
        if transition(app, server, current, to, Source::Probe, &reason).await? {
            // Passes count within a status: a recovered server's probation starts now.
            sqlx::query(
                "UPDATE server_health SET probe_passes = 0, probe_reachable = 0 WHERE server_id = $1",
            )
            .bind(&server.id)
            .execute(app.store.pool())
            .await?;
        }
    }
    Ok(())
}

/// Feeds the outcome of one live call to the status machine: `failed_at_upstream` is
/// true for transport errors, timeouts, HTTP ≥ 500 and invalid answers (not for an
/// upstream's own `isError` result). The [`DEGRADE_AFTER_CALL_FAILURES`]th failure in a
/// row degrades an active or recovered server.
pub async fn on_call(app: &App, server: &Server, failed_at_upstream: bool) {
    let streak = app.call_health.record(&server.id, failed_at_upstream);
    if streak != DEGRADE_AFTER_CALL_FAILURES {
        return;
    }
    if !matches!(
        server.status,
        ServerStatus::Active | ServerStatus::Recovered
    ) {
        return;
    }
    let reason = format!("{streak} calls in a row failed at the server");
    if let Err(e) = transition(
        app,
        server,
        server.status,
        ServerStatus::Degraded,
        Source::Calls,
        &reason,
    )
    .await
    {
        tracing::warn!(server = %server.slug, error = %e, "cannot record a status change");
    }
}

async fn current_status(app: &App, server_id: &str) -> Result<Option<ServerStatus>, StoreError> {
    Ok(sqlx::query("SELECT status FROM servers WHERE id = $1")
        .bind(server_id)
        .fetch_optional(app.store.pool())
        .await?
        .map(|r| r.try_get::<String, _>(0).map(|s| ServerStatus::parse(&s)))
        .transpose()?)
}

/// Moves `server` from `from` to `to` in one transaction: `servers.status` (only if it
/// is still `from`), a `server_status_events` row and the `server.status_changed`
/// alert to the owner. Then, outside the transaction: the status gauge, and when the
/// server became hidden or visible, `notifications/tools/list_changed` to the accounts
/// that installed it (and its upstream sessions closed when it became hidden). Returns
/// false when another writer moved the server first (nothing changed).
///
/// # Errors
/// [`StoreError`] when the database fails (nothing changed).
pub async fn transition(
    app: &App,
    server: &Server,
    from: ServerStatus,
    to: ServerStatus,
    source: Source,
    reason: &str,
) -> Result<bool, StoreError> {
    if from == to {
        return Ok(false);
    }
    let now = now_ms();
    let mut tx = app.store.begin().await?;
    let moved = sqlx::query(
        "UPDATE servers SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(&server.id)
    .bind(from.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        return Ok(false);
    }
    record_event(&mut tx, server, from, to, source, reason, now).await?;
    tx.commit().await?;
    // The snapshot (tools/list, the call path) sees the new status on the next request.
    app.catalog.changed();
    after_transition(app, server, from, to, source, reason).await;
    Ok(true)
}

/// Moves `slug` to `to` as an admin (approve, suspend), from whatever status it has:
/// the update, a `server_status_events` row (source `admin`) and the
/// `server.status_changed` alert in one transaction; the probe streaks restart. No
/// event when the status does not change. The caller notifies sessions. Returns the
/// server as it is now.
///
/// # Errors
/// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
pub async fn set_status_by_admin(
    app: &App,
    slug: &str,
    to: ServerStatus,
    reason: &str,
) -> Result<Server, CatalogError> {
    let server = app.catalog.get(slug).await?;
    let from = server.status;
    if from == to {
        return Ok(server);
    }
    let now = now_ms();
    let mut tx = app.store.begin().await?;
    sqlx::query("UPDATE servers SET status = $1, updated_at = $2 WHERE id = $3")
        .bind(to.as_str())
        .bind(now)
        .bind(&server.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM server_health WHERE server_id = $1")
        .bind(&server.id)
        .execute(&mut *tx)
        .await?;
    record_event(&mut tx, &server, from, to, Source::Admin, reason, now).await?;
    tx.commit().await.map_err(StoreError::Database)?;
    app.catalog.changed();
    tracing::info!(server = %server.slug, from = from.as_str(), to = to.as_str(), "server status set by an admin");
    set_status_gauge(&server.slug, from, to);
    app.catalog.get_by_id(&server.id).await
}

/// Writes the event row and the alert of a transition inside `tx`.
///
/// # Errors
/// [`StoreError`].
pub async fn record_event(
    tx: &mut crate::store::Tx<'_>,
    server: &Server,
    from: ServerStatus,
    to: ServerStatus,
    source: Source,
    reason: &str,
    at: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO server_status_events (id, server_id, from_status, to_status, source, reason, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&server.id)
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(source.as_str())
    .bind(reason)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    alerts::enqueue(
        tx,
        &server.owner_account_id,
        &AlertEvent::ServerStatusChanged {
            slug: server.slug.clone(),
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
            reason: reason.to_owned(),
        },
    )
    .await?;
    Ok(())
}

/// What follows a committed transition: logs, the status gauge, list_changed
/// notifications when visibility changed, closed sessions when the server is hidden.
pub async fn after_transition(
    app: &App,
    server: &Server,
    from: ServerStatus,
    to: ServerStatus,
    source: Source,
    reason: &str,
) {
    tracing::warn!(server = %server.slug, from = from.as_str(), to = to.as_str(), source = source.as_str(), reason, "server status changed");
    set_status_gauge(&server.slug, from, to);
    if from.is_callable() != to.is_callable() {
        if !to.is_callable() {
            app.upstreams.close_server(&server.id).await;
        }
        app.notify_server(&server.id).await;
    }
}

/// `mcp_marketplace_server_status{server, status}`: 1 for `to`, 0 for `from`.
pub fn set_status_gauge(slug: &str, from: ServerStatus, to: ServerStatus) {
    metrics::gauge!("mcp_marketplace_server_status", "server" => slug.to_owned(), "status" => from.as_str())
        .set(0.0);
    metrics::gauge!("mcp_marketplace_server_status", "server" => slug.to_owned(), "status" => to.as_str())
        .set(1.0);
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatusEvent {
    /// Status before.
    pub from: String,
    /// Status after.
    pub to: String,
    /// `probe`, `calls` or `admin`.
    pub source: String,
    /// Why.
    pub reason: String,
    /// When, epoch ms.
    pub at: i64,
}

/// The transitions of `server_id`, oldest first.
///
/// # Errors
/// [`StoreError`].
pub async fn status_events(app: &App, server_id: &str) -> Result<Vec<StatusEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT from_status, to_status, source, reason, at FROM server_status_events \
         WHERE server_id = $1 ORDER BY at, id",
    )
    .bind(server_id)
    .fetch_all(app.store.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(StatusEvent {
                from: r.try_get(0)?,
                to: r.try_get(1)?,
                source: r.try_get(2)?,
                reason: r.try_get(3)?,
                at: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::Database)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ServerStatus as S;
    use Verdict as V;

    fn st(passes: i64, reachable: i64, failures: i64) -> Streaks {
        Streaks {
            passes,
            reachable,
            failures,
        }
    }

    #[test]
    fn the_documented_table() {
        assert_eq!(next_status(S::Active, V::Pass, st(5, 5, 0)), None);
        assert_eq!(
            next_status(S::Active, V::Impaired, st(0, 1, 0)),
            Some(S::Degraded)
        );
        assert_eq!(
            next_status(S::Active, V::Fail, st(0, 0, 1)),
            Some(S::Degraded)
        );
        assert_eq!(next_status(S::Degraded, V::Fail, st(0, 0, 2)), None);
        assert_eq!(
            next_status(S::Degraded, V::Fail, st(0, 0, 3)),
            Some(S::Inactive)
        );
        assert_eq!(next_status(S::Degraded, V::Pass, st(1, 1, 0)), None);
        assert_eq!(
            next_status(S::Degraded, V::Pass, st(2, 2, 0)),
            Some(S::Active)
        );
        assert_eq!(next_status(S::Inactive, V::Fail, st(0, 0, 9)), None);
        assert_eq!(next_status(S::Inactive, V::Pass, st(1, 1, 0)), None);
        assert_eq!(
            next_status(S::Inactive, V::Pass, st(2, 2, 0)),
            Some(S::Recovered)
        );
        assert_eq!(next_status(S::Recovered, V::Pass, st(2, 4, 0)), None);
        assert_eq!(
            next_status(S::Recovered, V::Pass, st(3, 5, 0)),
            Some(S::Active)
        );
        assert_eq!(
            next_status(S::Recovered, V::Fail, st(0, 0, 1)),
            Some(S::Inactive)
        );
        assert_eq!(
            next_status(S::Recovered, V::Impaired, st(0, 3, 0)),
            Some(S::Degraded)
        );
        for s in [S::PendingReview, S::Suspended] {
            for v in [V::Pass, V::Impaired, V::Fail] {
                assert_eq!(next_status(s, v, st(9, 9, 9)), None);
            }
        }
    }

    #[test]
    fn call_streaks_reset_on_success() {
        let h = CallHealth::default();
        assert_eq!(h.record("s", true), 1);
        assert_eq!(h.record("s", true), 2);
        assert_eq!(h.record("s", false), 0);
        assert_eq!(h.record("s", true), 1);
    }
}
