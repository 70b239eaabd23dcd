//! A batch of the group commit run set-wise: one statement reads everything the batch's
//! checks need, the checks run in memory in queue order, one statement writes the
//! result.
//!
//! # Why
//! Run one operation after the other, a paid call costs about a dozen statements, and
//! on SQLite each statement is a round trip to sqlx's worker thread for the connection
//! (a thread wake-up each way). A batch of 32 calls took some 400 round trips; set-wise
//! it takes five whatever its size: `BEGIN IMMEDIATE`, one multi-statement read, one
//! multi-statement write, `COMMIT`, and (after a relaxed batch) the `PRAGMA` that puts
//! the connection back in `FULL` mode.
//!
//! # Why it decides exactly as the statements one by one would
//! `BEGIN IMMEDIATE` takes SQLite's write lock before the read, and the store has one
//! connection, so nothing but this batch changes the rows between the read and the
//! write. The in-memory checks are the SQL ones: the key's spend limits (the sum of the
//! key's non-refunded prices since the period start), the plan's monthly quota (the
//! guarded counter), the guarded wallet debit, the low-balance crossing, the
//! `reserved → settled|refunded` guard; each operation sees the effects of those before
//! it, and an operation that fails changes nothing (as its savepoint's rollback did).
//!
//! # When it gives up
//! Anything the in-memory checks do not model (a missing ledger account or server, a
//! duplicate call id, a CHECK or foreign key failing in the write) makes [`run`] return
//! [`Fallback`]; the caller rolls back and runs the batch one operation at a time with a
//! savepoint each, which gives every operation its own exact error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{Job, Op};
use crate::billing::ledger::{
    BillingError, CallStats, HOLDS, Outcome, PLATFORM_REVENUE, Reservation, earnings_id, lock_rank,
    period_start_ms, wallet_id,
};
use crate::billing::period::Month;
use crate::billing::pricing::split_price;

/// Why the set-wise run did not answer the batch: the caller rolls back and runs it one
/// operation at a time. Carries the reason, for the log.
#[derive(Debug)]
pub(super) struct Fallback(pub(super) String);

impl From<sqlx::Error> for Fallback {
    fn from(e: sqlx::Error) -> Self {
        Self(e.to_string())
    }
}

/// Everything the batch's checks read, as one row holding one JSON object (one row
/// rather than one per call: sqlx hands every row over from its worker thread as a
/// message of its own). `$1` the finished calls' ids, `$2` the reserving wallets, `$3`
/// the reserving accounts, `$4` the latest `at` of the batch, `$5` `[account, month]`
/// of the reservations, `$6` `[key, since]` of the spend limits to check; see [`Loaded`]
/// for what comes back.
macro_rules! load_sql {
    () => {
        "\
SELECT json_object( \
 'calls', (SELECT json_group_array(jsonb_array(id, status, account_id, key_id, server_id, \
 price_micros, creator_micros, fee_micros, created_at)) FROM calls \
 WHERE id IN (SELECT value FROM json_each($1))), \
 'wallets', (SELECT json_group_array(jsonb_array(id, balance, low_balance_micros, low_balance_alerted)) \
 FROM ledger_accounts WHERE id IN (SELECT value FROM json_each($2) \
 UNION SELECT 'wallet:' || account_id FROM calls WHERE id IN (SELECT value FROM json_each($1)))), \
 'plans', (SELECT json_group_array(jsonb_array(account_id, id, plan_id, effective_at)) FROM account_plans \
 WHERE account_id IN (SELECT value FROM json_each($3)) AND effective_at <= $4), \
 'usage', (SELECT json_group_array(jsonb_array(account_id, month, calls, spent_micros)) FROM usage_counters \
 WHERE (account_id, month) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM jsonb_each($5) \
 UNION SELECT account_id, strftime('%Y-%m', created_at / 1000, 'unixepoch') FROM calls \
 WHERE id IN (SELECT value FROM json_each($1)))), \
 'spent', (SELECT json_group_array(jsonb_array(j.key, (SELECT COALESCE(SUM(price_micros), 0) FROM calls \
 WHERE key_id = json_extract(j.value, '$[0]') AND created_at >= json_extract(j.value, '$[1]') \
 AND status <> 'refunded'))) FROM jsonb_each($6) AS j), \
 'owners', (SELECT json_group_array(jsonb_array(id, owner_account_id)) FROM servers \
 WHERE id IN (SELECT server_id FROM calls WHERE id IN (SELECT value FROM json_each($1))))) \
"
    };
}

/// A call as [`load_sql!`] returns it: `[id, status, account, key, server, price,
/// creator, fee, created_at]`.
type LoadedCall = (String, String, String, String, String, i64, i64, i64, i64);

/// The row of [`load_sql!`].
#[derive(serde::Deserialize)]
struct Loaded {
    /// See [`LoadedCall`].
    calls: Vec<LoadedCall>,
    /// `[ledger account, balance, low-balance threshold, alerted (0|1)]`.
    wallets: Vec<(String, i64, Option<i64>, i64)>,
    /// `[account, plan row id, plan id, effective_at]`.
    plans: Vec<(String, String, String, i64)>,
    /// `[account, month, calls, spent]`.
    usage: Vec<(String, String, i64, i64)>,
    /// `[index into the spend limits asked, spent]`.
    spent: Vec<(usize, i64)>,
    /// `[server, owner account]`.
    owners: Vec<(String, String)>,
}

/// [`load_sql!`] opening the batch's transaction in the same round trip.
const BEGIN_AND_LOAD: &str = concat!("BEGIN IMMEDIATE; ", load_sql!());
/// [`BEGIN_AND_LOAD`] after relaxing the connection (see `SyncMode` in group.rs).
const RELAX_BEGIN_AND_LOAD: &str = concat!(
    "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; ",
    load_sql!()
);

/// Everything the batch writes (eight statements, each fed one JSON array of rows; an
/// empty array writes nothing). `jsonb_each` (SQLite 3.45+) hands each row over as a
/// JSONB blob, so the `json_extract`s of its columns do not parse its text again
/// (`json_each` did, once per column: a fifth of a batch's time in `perf`).
///
/// The `calls` update matches by id alone: with `AND status = 'reserved'` SQLite's
/// planner walked the `calls_status` index and scanned the batch's rows for each
/// reserved call (quadratic: 22 ms for a batch of 256 settlements). The in-memory guard
/// decided that every call is still reserved, and the `calls_append_only` trigger
/// aborts the update of a finished call (which sends the batch to the fallback).
macro_rules! write_sql {
    () => {
        "\
INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
 fee_micros, status, hold_expires_at, created_at, request_bytes) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), \
 json_extract(value, '$[6]'), json_extract(value, '$[7]'), 'reserved', json_extract(value, '$[8]'), \
 json_extract(value, '$[9]'), json_extract(value, '$[10]') FROM jsonb_each($1); \
UPDATE calls SET status = j.status, error_kind = j.error_kind, finished_at = j.finished_at, \
 latency_ms = j.latency_ms, response_bytes = j.response_bytes \
 FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS status, \
 json_extract(value, '$[2]') AS error_kind, json_extract(value, '$[3]') AS finished_at, \
 json_extract(value, '$[4]') AS latency_ms, json_extract(value, '$[5]') AS response_bytes \
 FROM jsonb_each($2)) AS j WHERE calls.id = j.id; \
INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]') FROM jsonb_each($3); \
INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') \
 FROM jsonb_each($4); \
UPDATE ledger_accounts SET balance = balance + j.delta \
 FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS delta FROM jsonb_each($5)) AS j \
 WHERE ledger_accounts.id = j.id; \
UPDATE ledger_accounts SET low_balance_alerted = 1 WHERE id IN (SELECT value FROM json_each($6)); \
INSERT INTO balance_alerts (id, account_id, kind, threshold_micros, balance_micros, call_id, created_at) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 'low_balance', json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]') FROM jsonb_each($7); \
INSERT INTO usage_counters (account_id, month, calls, spent_micros) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]') FROM jsonb_each($8) WHERE true \
 ON CONFLICT (account_id, month) DO UPDATE SET calls = excluded.calls, spent_micros = excluded.spent_micros"
    };
}

/// [`write_sql!`] and the batch's `COMMIT`, in one round trip: if any statement fails,
/// the ones after it (the `COMMIT` among them) do not run.
const WRITE_AND_COMMIT: &str = concat!(write_sql!(), "; COMMIT");

/// A call row as the batch found it (and as its earlier operations left it).
struct CallRow {
    status: String,
    account_id: String,
    key_id: String,
    server_id: String,
    price: i64,
    creator: i64,
    fee: i64,
    created_at: i64,
}

/// A wallet as the batch found it (and as its earlier operations left it).
struct Wallet {
    balance: i64,
    threshold: Option<i64>,
    alerted: bool,
}

/// One `account_plans` row.
struct PlanRow {
    id: String,
    plan_id: String,
    effective_at: i64,
}

/// What the batch read, updated in memory as its operations are decided.
#[derive(Default)]
struct State {
    calls: HashMap<String, CallRow>,
    wallets: HashMap<String, Wallet>,
    plans: HashMap<String, Vec<PlanRow>>,
    /// `(account, month)` → `(calls, spent micros)`.
    usage: HashMap<(String, String), (i64, i64)>,
    /// `(key, period start ms)` → spent micros.
    spent: HashMap<(String, i64), i64>,
    /// Server id → owner account id.
    owners: HashMap<String, String>,
}

/// The rows the batch writes, as the JSON arrays [`write_sql!`] reads.
#[derive(Default)]
struct Writes {
    new_calls: Vec<Value>,
    finished_calls: Vec<Value>,
    transfers: Vec<Value>,
    entries: Vec<Value>,
    /// Ledger account → net change of its balance, micros.
    deltas: BTreeMap<String, i64>,
    alerted: Vec<String>,
    alerts: Vec<Value>,
    /// `(account, month)` whose counter the batch changed.
    usage: BTreeSet<(String, String)>,
}

/// Runs `jobs` set-wise in one transaction on `conn` (after `PRAGMA synchronous =
/// NORMAL` when `relax`): `BEGIN IMMEDIATE` and the read in one round trip, every
/// operation decided in memory in queue order, the writes and `COMMIT` in a second.
/// Returns each job's result once the `COMMIT` returned.
///
/// # Errors
/// [`Fallback`] when a statement fails or the batch holds something the in-memory
/// checks do not model; nothing was committed, and the transaction may still be open
/// with partial writes: the caller must roll it back.
pub(super) async fn run(
    conn: &mut AnyConnection,
    jobs: &[Job],
    relax: bool,
) -> Result<Vec<Result<i64, BillingError>>, Fallback> {
    let mut state = load(conn, jobs, relax).await?;
    let mut writes = Writes::default();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let result = match &job.op {
            Op::Reserve(r) => reserve(&mut state, &mut writes, job, r)?,
            Op::Finish {
                call_id,
                outcome,
                error_kind,
                stats,
            } => finish(
                &mut state,
                &mut writes,
                job,
                call_id,
                *outcome,
                error_kind.as_deref(),
                *stats,
            )?,
        };
        results.push(result);
    }
    write(conn, &state, writes).await?;
    // Owners are immutable facts: keep the ones read for the next batches.
    if let Some(job) = jobs.first() {
        for (server, owner) in state.owners {
            if job.ledger.owners.len() < super::super::MAX_CACHED_OWNERS {
                job.ledger.owners.insert(server, owner);
            }
        }
    }
    Ok(results)
}

/// Opens the batch's transaction (after `PRAGMA synchronous = NORMAL` when `relax`) and
/// reads what the checks of `jobs` need, under the write lock, in one round trip.
async fn load(conn: &mut AnyConnection, jobs: &[Job], relax: bool) -> Result<State, Fallback> {
    let mut finished = Vec::new();
    let mut wallets = Vec::new();
    let mut accounts = Vec::new();
    let mut months = Vec::new();
    let mut limits: Vec<(String, i64)> = Vec::new();
    let mut latest = i64::MIN;
    for job in jobs {
        latest = latest.max(job.at);
        match &job.op {
            Op::Finish { call_id, .. } => finished.push(call_id.as_str()),
            Op::Reserve(r) => {
                wallets.push(wallet_id(&r.account_id));
                accounts.push(r.account_id.as_str());
                months.push(json!([r.account_id, Month::of_ms(job.at).to_string()]));
                for (_, period) in &r.spend_limits {
                    let key = (r.key_id.clone(), period_start_ms(period, job.at));
                    if !limits.contains(&key) {
                        limits.push(key);
                    }
                }
            }
        }
    }
    let sql = if relax {
        RELAX_BEGIN_AND_LOAD
    } else {
        BEGIN_AND_LOAD
    };
    let rows = sqlx::query(sql)
        .bind(json!(finished).to_string())
        .bind(json!(wallets).to_string())
        .bind(json!(accounts).to_string())
        .bind(latest)
        .bind(Value::Array(months).to_string())
        .bind(json!(limits).to_string())
        // Not `fetch_one`: it stops at the first statement (`BEGIN`), which has no row.
        .fetch_all(conn)
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| Fallback("the batch's read returned no row".into()))?;
    let text: String = row.try_get(0)?;
    let loaded: Loaded = serde_json::from_str(&text)
        .map_err(|e| Fallback(format!("the batch's read did not parse: {e}")))?;
    let mut state = State::default();
    for (id, status, account_id, key_id, server_id, price, creator, fee, created_at) in loaded.calls
    {
        let call = CallRow {
            status,
            account_id,
            key_id,
            server_id,
            price,
            creator,
            fee,
            created_at,
        };
        state.calls.insert(id, call);
    }
    for (id, balance, threshold, alerted) in loaded.wallets {
        let wallet = Wallet {
            balance,
            threshold,
            alerted: alerted != 0,
        };
        state.wallets.insert(id, wallet);
    }
    for (account_id, id, plan_id, effective_at) in loaded.plans {
        let plan = PlanRow {
            id,
            plan_id,
            effective_at,
        };
        state.plans.entry(account_id).or_default().push(plan);
    }
    for (account_id, month, calls, spent) in loaded.usage {
        state.usage.insert((account_id, month), (calls, spent));
    }
    for (index, spent) in loaded.spent {
        let key = limits
            .get(index)
            .ok_or_else(|| Fallback(format!("no spend limit #{index} in the batch")))?;
        state.spent.insert(key.clone(), spent);
    }
    state.owners.extend(loaded.owners);
    Ok(state)
}

/// Decides one reservation (the checks of `Ledger::reserve_in`, in its order).
fn reserve(
    state: &mut State,
    writes: &mut Writes,
    job: &Job,
    r: &Reservation,
) -> Result<Result<i64, BillingError>, Fallback> {
    let at = job.at;
    for (limit_micros, period) in &r.spend_limits {
        let since = period_start_ms(period, at);
        let spent = state
            .spent
            .get(&(r.key_id.clone(), since))
            .copied()
            .ok_or_else(|| Fallback("a spend limit was not read".into()))?;
        if spent + r.price_micros > *limit_micros {
            return Ok(Err(BillingError::SpendLimit {
                limit_micros: *limit_micros,
                spent_micros: spent,
                period: period.clone(),
            }));
        }
    }
    // The plan in effect at `at`: the latest row with effective_at <= at (ties: the
    // later id), else the default plan.
    let plans = &job.ledger.plans;
    let plan = state
        .plans
        .get(&r.account_id)
        .and_then(|rows| {
            rows.iter()
                .filter(|p| p.effective_at <= at)
                .max_by(|a, b| (a.effective_at, &a.id).cmp(&(b.effective_at, &b.id)))
        })
        .map_or_else(|| plans.default_plan(), |p| plans.resolve(&p.plan_id));
    let quota = plan.monthly_calls.unwrap_or(i64::MAX);
    let month = Month::of_ms(at);
    let usage_key = (r.account_id.clone(), month.to_string());
    let counted = match state.usage.get(&usage_key) {
        _ if quota <= 0 => None,
        None => Some((1, r.price_micros)),
        Some(&(calls, spent)) if calls < quota => Some((calls + 1, spent + r.price_micros)),
        Some(_) => None,
    };
    let Some(counted) = counted else {
        return Ok(Err(BillingError::QuotaExceeded {
            plan: plan.name.clone(),
            quota,
            resets_at_ms: month.end_ms(),
        }));
    };
    let wallet = wallet_id(&r.account_id);
    let balance = match state.wallets.get_mut(&wallet) {
        Some(w) if r.price_micros == 0 => w.balance,
        Some(w) if w.balance >= r.price_micros => {
            w.balance -= r.price_micros;
            if let Some(threshold) = w.threshold
                && w.balance < threshold
                && !w.alerted
            {
                w.alerted = true;
                writes.alerted.push(wallet.clone());
                writes.alerts.push(json!([
                    uuid::Uuid::now_v7().to_string(),
                    r.account_id,
                    threshold,
                    w.balance,
                    r.call_id,
                    at
                ]));
            }
            w.balance
        }
        Some(w) => {
            return Ok(Err(BillingError::InsufficientCredits {
                price_micros: r.price_micros,
                balance_micros: w.balance,
            }));
        }
        // A missing wallet: the statement form tells these cases apart exactly.
        None => return Err(Fallback(format!("no ledger account {wallet}"))),
    };
    // Checks passed: apply.
    state.usage.insert(usage_key.clone(), counted);
    writes.usage.insert(usage_key);
    for ((key, since), spent) in &mut state.spent {
        if *key == r.key_id && at >= *since {
            *spent += r.price_micros;
        }
    }
    let (creator_micros, fee_micros) = split_price(r.price_micros, r.fee_bps);
    writes.new_calls.push(json!([
        r.call_id,
        r.account_id,
        r.key_id,
        r.server_id,
        r.tool,
        r.price_micros,
        creator_micros,
        fee_micros,
        r.hold_expires_at,
        at,
        r.request_bytes.max(0)
    ]));
    transfer(
        writes,
        "reserve",
        &r.call_id,
        r.price_micros,
        &[(&wallet, -r.price_micros), (HOLDS, r.price_micros)],
        "",
        at,
    );
    Ok(Ok(balance))
}

/// Decides one settle or refund (the checks of `Ledger::finish_in`).
fn finish(
    state: &mut State,
    writes: &mut Writes,
    job: &Job,
    call_id: &str,
    outcome: Outcome,
    error_kind: Option<&str>,
    stats: CallStats,
) -> Result<Result<i64, BillingError>, Fallback> {
    let Some(call) = state.calls.get_mut(call_id) else {
        return Ok(Err(BillingError::UnknownCall(call_id.to_owned())));
    };
    if call.status != "reserved" {
        return Ok(Err(BillingError::NotReserved(call_id.to_owned())));
    }
    let wallet = wallet_id(&call.account_id);
    let Some(w) = state.wallets.get_mut(&wallet) else {
        return Err(Fallback(format!("no ledger account {wallet}")));
    };
    let price = call.price;
    match outcome {
        Outcome::Settled => {
            let server = &call.server_id;
            let owner = match job.ledger.owners.get(server) {
                Some(owner) => owner.clone(),
                None => state
                    .owners
                    .get(server)
                    .cloned()
                    .ok_or_else(|| Fallback(format!("no owner of server {server}")))?,
            };
            // The split stored with the call at its reservation.
            transfer(
                writes,
                "settle",
                call_id,
                price,
                &[
                    (HOLDS, -price),
                    (&earnings_id(&owner), call.creator),
                    (PLATFORM_REVENUE, call.fee),
                ],
                "",
                job.at,
            );
        }
        Outcome::Refunded => {
            // A refunded call does not count against the quota of the month it was made
            // in, nor against the key's spend limits.
            let key = (
                call.account_id.clone(),
                Month::of_ms(call.created_at).to_string(),
            );
            if let Some((calls, spent)) = state.usage.get_mut(&key) {
                *calls -= 1;
                *spent -= price;
                writes.usage.insert(key);
            }
            for ((key, since), spent) in &mut state.spent {
                if *key == call.key_id && call.created_at >= *since {
                    *spent -= price;
                }
            }
            w.balance += price;
            transfer(
                writes,
                "refund",
                call_id,
                price,
                &[(HOLDS, -price), (&wallet, price)],
                error_kind.unwrap_or(""),
                job.at,
            );
        }
    }
    call.status = outcome.as_str().to_owned();
    writes.finished_calls.push(json!([
        call_id,
        outcome.as_str(),
        error_kind,
        job.at,
        stats.latency_ms.max(0),
        stats.response_bytes.max(0)
    ]));
    Ok(Ok(w.balance))
}

/// Adds a transfer and its non-zero entries (in the ledger's lock order, as
/// `write_entries` writes them), and moves the balances they touch.
fn transfer(
    writes: &mut Writes,
    kind: &str,
    call_id: &str,
    amount: i64,
    entries: &[(&str, i64)],
    memo: &str,
    at: i64,
) {
    debug_assert_eq!(entries.iter().map(|(_, a)| a).sum::<i64>(), 0);
    let id = uuid::Uuid::now_v7().to_string();
    let mut ordered: Vec<&(&str, i64)> = entries.iter().filter(|(_, a)| *a != 0).collect();
    ordered.sort_by_key(|(account, _)| (lock_rank(account), *account));
    for (account, amount) in ordered {
        writes.entries.push(json!([id, account, amount]));
        *writes.deltas.entry((*account).to_owned()).or_default() += amount;
    }
    writes
        .transfers
        .push(json!([id, kind, call_id, amount, memo, at]));
}

/// Writes the batch's rows and commits, in one round trip (only the `COMMIT` when every
/// operation was refused).
async fn write(conn: &mut AnyConnection, state: &State, writes: Writes) -> Result<(), Fallback> {
    if writes.transfers.is_empty() {
        // Every write comes with a transfer: nothing was decided that writes.
        sqlx::raw_sql("COMMIT").execute(conn).await?;
        return Ok(());
    }
    let deltas: Vec<Value> = writes
        .deltas
        .into_iter()
        .filter(|(_, delta)| *delta != 0)
        .map(|(account, delta)| json!([account, delta]))
        .collect();
    let usage: Vec<Value> = writes
        .usage
        .into_iter()
        .filter_map(|key| {
            let (calls, spent) = state.usage.get(&key)?;
            Some(json!([key.0, key.1, calls, spent]))
        })
        .collect();
    sqlx::query(WRITE_AND_COMMIT)
        .bind(Value::Array(writes.new_calls).to_string())
        .bind(Value::Array(writes.finished_calls).to_string())
        .bind(Value::Array(writes.transfers).to_string())
        .bind(Value::Array(writes.entries).to_string())
        .bind(Value::Array(deltas).to_string())
        .bind(json!(writes.alerted).to_string())
        .bind(Value::Array(writes.alerts).to_string())
        .bind(Value::Array(usage).to_string())
        .execute(conn)
        .await?;
    Ok(())
}
