//! The usage log (issue 6 item 2): one row per call with its account, key, server,
//! tool, times, duration, outcome, price, amount charged and bytes in and out.
//!
//! The log is the `calls` table itself, not a copy. A call's row is written by the
//! reserve, completed exactly once by its settle or refund (the guarded
//! `status = 'reserved'` update), and from then on database triggers refuse any update
//! and any delete: finished rows are append-only. Why not a separate append-only
//! table: a copy would add a write to every call's hot path and a second record to
//! reconcile with the ledger, while the calls table already carries every field, is
//! written in the ledger's own transactions, and the triggers make it as immutable as
//! a separate log would be. A row in flight shows as `reserved`.
//!
//! Listing is newest first with an opaque cursor (`created_at` and id of the last row),
//! so pages stay stable while new calls arrive.

use base64::Engine;
use sqlx::Row;

use super::ledger::BillingError;
use super::period::{Month, rfc3339};
use super::pricing::format_usd;
use crate::store::Store;

/// Rows per page by default.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most rows in one page (an export reads page after page).
pub const MAX_PAGE_SIZE: usize = 1000;

/// Filters of a usage listing (all optional but the account).
#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// The account whose calls are listed.
    pub account_id: String,
    /// Calls made at or after (epoch ms).
    pub from: Option<i64>,
    /// Calls made before (epoch ms).
    pub to: Option<i64>,
    /// Server slug.
    pub server: Option<String>,
    /// Upstream tool name (not namespaced).
    pub tool: Option<String>,
    /// Key id.
    pub key_id: Option<String>,
    /// `reserved`, `settled` or `refunded`.
    pub outcome: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Rows per page, 1..=[`MAX_PAGE_SIZE`].
    pub limit: usize,
}

/// One call in the usage log. Times RFC 3339; money in micros; sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRecord {
    /// The call's id (UUIDv7), also in its receipt.
    pub call_id: String,
    /// When it was made (the reserve).
    pub created_at: String,
    /// When it settled or was refunded; `None` while in flight.
    pub finished_at: Option<String>,
    /// Upstream time, ms; `None` while in flight.
    pub duration_ms: Option<i64>,
    /// The key used.
    pub key_id: String,
    /// The server's slug.
    pub server: String,
    /// The upstream tool name.
    pub tool: String,
    /// `reserved`, `settled` or `refunded`.
    pub outcome: String,
    /// Why it was refunded (`upstream_timeout`, …).
    pub error_kind: Option<String>,
    /// The price, micros.
    pub price_micros: i64,
    /// What was charged: the price when settled, else 0.
    pub charged_micros: i64,
    /// Size of the arguments as JSON.
    pub request_bytes: i64,
    /// Size of the result as JSON.
    pub response_bytes: i64,
}

/// One page of the usage log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsagePage {
    /// The calls, newest first.
    pub calls: Vec<UsageRecord>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

enum Arg {
    Text(String),
    Int(i64),
}

fn bad_cursor() -> BillingError {
    BillingError::Invalid("invalid cursor (pass the next_cursor of the previous page)".into())
}

fn encode_cursor(created_at: i64, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), BillingError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad_cursor())?;
    let text = String::from_utf8(bytes).map_err(|_| bad_cursor())?;
    let (at, id) = text.split_once(':').ok_or_else(bad_cursor)?;
    let at: i64 = at.parse().map_err(|_| bad_cursor())?;
    uuid::Uuid::parse_str(id).map_err(|_| bad_cursor())?;
    Ok((at, id.to_owned()))
}

/// One page of the account's calls matching `q`, newest first.
///
/// # Errors
/// [`BillingError::Invalid`] for a bad outcome, limit or cursor; [`BillingError::Store`].
pub async fn list(store: &Store, q: &UsageQuery) -> Result<UsagePage, BillingError> {
    if !(1..=MAX_PAGE_SIZE).contains(&q.limit) {
        return Err(BillingError::Invalid(format!(
            "limit must be between 1 and {MAX_PAGE_SIZE}"
        )));
    }
    let mut sql = String::from(
        "SELECT c.id, c.created_at, c.finished_at, c.latency_ms, c.key_id, s.slug, c.tool, c.status, \
         c.error_kind, c.price_micros, c.request_bytes, c.response_bytes \
         FROM calls c JOIN servers s ON s.id = c.server_id WHERE c.account_id = $1",
    );
    let mut args = vec![Arg::Text(q.account_id.clone())];
    let mut push = |cond: &str, arg: Arg, sql: &mut String| {
        args.push(arg);
        sql.push_str(&cond.replace('?', &format!("${}", args.len())));
    };
    if let Some(from) = q.from {
        push(" AND c.created_at >= ?", Arg::Int(from), &mut sql);
    }
    if let Some(to) = q.to {
        push(" AND c.created_at < ?", Arg::Int(to), &mut sql);
    }
    if let Some(server) = &q.server {
        push(" AND s.slug = ?", Arg::Text(server.clone()), &mut sql);
    }
    if let Some(tool) = &q.tool {
        push(" AND c.tool = ?", Arg::Text(tool.clone()), &mut sql);
    }
    if let Some(key) = &q.key_id {
        push(" AND c.key_id = ?", Arg::Text(key.clone()), &mut sql);
    }
    if let Some(outcome) = &q.outcome {
        if !["reserved", "settled", "refunded"].contains(&outcome.as_str()) {
            return Err(BillingError::Invalid(
                "outcome is one of reserved, settled, refunded".into(),
            ));
        }
        push(" AND c.status = ?", Arg::Text(outcome.clone()), &mut sql);
    }
    if let Some(cursor) = &q.cursor {
        let (at, id) = decode_cursor(cursor)?;
        push(" AND (c.created_at < ?", Arg::Int(at), &mut sql);
        push(" OR (c.created_at = ?", Arg::Int(at), &mut sql);
        push(" AND c.id < ?))", Arg::Text(id), &mut sql);
    }
    push(
        " ORDER BY c.created_at DESC, c.id DESC LIMIT ?",
        Arg::Int(q.limit as i64 + 1),
        &mut sql,
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for a in args {
        query = match a {
            Arg::Text(t) => query.bind(t),
            Arg::Int(i) => query.bind(i),
        };
    }
    let rows = query.fetch_all(store.pool()).await?;
    let mut calls = Vec::with_capacity(rows.len().min(q.limit));
    let mut last = None;
    for r in rows.iter().take(q.limit) {
        let created_at: i64 = r.try_get(1)?;
        let finished_at: Option<i64> = r.try_get(2)?;
        let status: String = r.try_get(7)?;
        let price: i64 = r.try_get(9)?;
        let id: String = r.try_get(0)?;
        last = Some((created_at, id.clone()));
        calls.push(UsageRecord {
            call_id: id,
            created_at: rfc3339(created_at),
            finished_at: finished_at.map(rfc3339),
            duration_ms: finished_at.and(r.try_get::<Option<i64>, _>(3)?),
            key_id: r.try_get(4)?,
            server: r.try_get(5)?,
            tool: r.try_get(6)?,
            charged_micros: if status == "settled" { price } else { 0 },
            outcome: status,
            error_kind: r.try_get(8)?,
            price_micros: price,
            request_bytes: r.try_get(10)?,
            response_bytes: r.try_get(11)?,
        });
    }
    let next_cursor = if rows.len() > q.limit {
        last.map(|(at, id)| encode_cursor(at, &id))
    } else {
        None
    };
    Ok(UsagePage { calls, next_cursor })
}

/// The CSV columns of the usage log.
pub const CSV_HEADER: [&str; 15] = [
    "call_id",
    "created_at",
    "finished_at",
    "duration_ms",
    "key_id",
    "server",
    "tool",
    "outcome",
    "error_kind",
    "price_micros",
    "price_usd",
    "charged_micros",
    "charged_usd",
    "request_bytes",
    "response_bytes",
];

/// Writes `records` as CSV rows (RFC 4180), with the header row first when `header`.
pub fn to_csv(records: &[UsageRecord], header: bool) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing to a Vec cannot fail; a failed row would only lose that row.
    if header {
        let _ = w.write_record(CSV_HEADER);
    }
    for r in records {
        let _ = w.write_record([
            r.call_id.clone(),
            r.created_at.clone(),
            r.finished_at.clone().unwrap_or_default(),
            r.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
            r.key_id.clone(),
            r.server.clone(),
            r.tool.clone(),
            r.outcome.clone(),
            r.error_kind.clone().unwrap_or_default(),
            r.price_micros.to_string(),
            format_usd(r.price_micros),
            r.charged_micros.to_string(),
            format_usd(r.charged_micros),
            r.request_bytes.to_string(),
            r.response_bytes.to_string(),
        ]);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// Calls of one (server, tool) in a month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ToolUsage {
    /// Server slug.
    pub server: String,
    /// Tool name.
    pub tool: String,
    /// Calls settled (charged).
    pub settled: i64,
    /// Calls refunded (not charged).
    pub refunded: i64,
    /// Calls still in flight.
    pub in_flight: i64,
    /// Charged, micros.
    pub charged_micros: i64,
}

/// The account's calls made in `month`, per server and tool (sorted by server, tool).
///
/// # Errors
/// [`BillingError::Store`].
pub async fn by_tool(
    store: &Store,
    account_id: &str,
    month: Month,
) -> Result<Vec<ToolUsage>, BillingError> {
    let rows = sqlx::query(
        "SELECT s.slug, c.tool, c.status, CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(c.price_micros), 0) AS BIGINT) \
         FROM calls c JOIN servers s ON s.id = c.server_id \
         WHERE c.account_id = $1 AND c.created_at >= $2 AND c.created_at < $3 \
         GROUP BY s.slug, c.tool, c.status",
    )
    .bind(account_id)
    .bind(month.start_ms())
    .bind(month.end_ms())
    .fetch_all(store.pool())
    .await?;
    let mut out: std::collections::BTreeMap<(String, String), ToolUsage> = Default::default();
    for r in rows {
        let server: String = r.try_get(0)?;
        let tool: String = r.try_get(1)?;
        let status: String = r.try_get(2)?;
        let n: i64 = r.try_get(3)?;
        let sum: i64 = r.try_get(4)?;
        let entry = out
            .entry((server.clone(), tool.clone()))
            .or_insert_with(|| ToolUsage {
                server,
                tool,
                settled: 0,
                refunded: 0,
                in_flight: 0,
                charged_micros: 0,
            });
        match status.as_str() {
            "settled" => {
                entry.settled += n;
                entry.charged_micros += sum;
            }
            "refunded" => entry.refunded += n,
            _ => entry.in_flight += n,
        }
    }
    Ok(out.into_values().collect())
}

/// A key's spend limit and what it spent in the current period. Micros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyLimit {
    /// The limit per period.
    pub limit_micros: i64,
    /// `day` or `month` (UTC).
    pub period: String,
    /// Spent (settled or held) this period.
    pub spent_micros: i64,
    /// What is left this period.
    pub remaining_micros: i64,
}

/// An account's plan, its use this month and its limits: what `marketplace__get_usage`
/// and `marketplace__get_balance` show. Money in micros, times RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SpendSummary {
    /// The month counted, `YYYY-MM` (UTC).
    pub month: String,
    /// The plan in effect now.
    pub plan: super::plans::Plan,
    /// Calls counted against the quota in `month` (refunded calls are not).
    pub calls_this_month: i64,
    /// Calls left this month; `None` = unlimited.
    pub calls_remaining: Option<i64>,
    /// Prices of those calls (settled or in flight).
    pub spent_this_month_micros: i64,
    /// When the quota starts over.
    pub quota_resets_at: String,
    /// The calling key's spend limits (a day's and/or a month's; empty = none).
    pub key_spend_limits: Vec<KeyLimit>,
    /// The low-balance threshold; `None` = no alert.
    pub low_balance_threshold_micros: Option<i64>,
    /// True from a low-balance alert until credits lift the wallet over the threshold.
    pub low_balance_alerted: bool,
    /// When the last low-balance alert was raised.
    pub last_low_balance_alert_at: Option<String>,
}

/// The spend summary of `account_id` for `month`, with the limits of the calling key
/// (`key_id`, its `(micros, "day"|"month")` spend limits) when there is one.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn spend_summary(
    ledger: &super::Ledger,
    account_id: &str,
    key: Option<(&str, &[(i64, String)])>,
    month: Month,
) -> Result<SpendSummary, BillingError> {
    let plan = ledger.current_plan(account_id).await?.plan;
    let used = ledger.month_usage(account_id, month).await?;
    let mut key_spend_limits = Vec::new();
    if let Some((key_id, limits)) = key {
        for (limit, period) in limits {
            let spent = ledger.key_spend(key_id, period).await?;
            key_spend_limits.push(KeyLimit {
                limit_micros: *limit,
                period: period.clone(),
                spent_micros: spent,
                remaining_micros: (limit - spent).max(0),
            });
        }
    }
    let low = ledger.low_balance(account_id).await?;
    let last = super::alerts::of_account(ledger.store(), account_id, 1)
        .await?
        .into_iter()
        .next();
    Ok(SpendSummary {
        month: month.to_string(),
        calls_remaining: plan.monthly_calls.map(|q| (q - used.calls).max(0)),
        plan,
        calls_this_month: used.calls,
        spent_this_month_micros: used.spent_micros,
        quota_resets_at: rfc3339(month.end_ms()),
        key_spend_limits,
        low_balance_threshold_micros: low.threshold_micros,
        low_balance_alerted: low.alerted,
        last_low_balance_alert_at: last.map(|a| rfc3339(a.created_at)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let id = uuid::Uuid::now_v7().to_string();
        let c = encode_cursor(1_700_000_000_000, &id);
        assert_eq!(decode_cursor(&c).unwrap(), (1_700_000_000_000, id));
        for bad in [
            "",
            "!!!",
            "bm90IGEgY3Vyc29y",
            &encode_cursor(1, "not-a-uuid"),
        ] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
