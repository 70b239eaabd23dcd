//! A batch of the group commit run set-wise: one statement reads everything the batch's
//! checks need, the checks run in memory in queue order, one statement writes the
//! result.
//!
//! # Why
//! Run one operation after the other, a paid call costs about a dozen statements (the
//! key's spend, the plan, the quota counter, the guarded debit, the call row, the
//! transfer, its entries, the balances, a savepoint each). Set-wise, a batch costs the
//! same few statements whatever its size: on SQLite ([`run_sqlite`], on the ledger
//! writer's thread, `writer.rs`) `BEGIN IMMEDIATE`, one read, the writes that have rows
//! and `COMMIT`, each a call into the SQLite library on that thread; on PostgreSQL
//! ([`run_postgres`]) four network round trips.
//!
//! # Why it decides exactly as the statements one by one would
//! The read runs under the batch's write lock (SQLite: `BEGIN IMMEDIATE` takes the
//! database's one write lock before it; PostgreSQL: the batch lock, and `FOR UPDATE` on
//! the ledger accounts), so nothing else changes the rows between the read and the
//! write. The in-memory checks are the SQL ones: the key's spend limits (its counter of
//! the period, `key_spend_counters`), the plan's monthly quota (the guarded counter),
//! the guarded wallet debit, the low-balance crossing, the `reserved →
//! settled|refunded` guard; each operation sees the effects of those before
//! it, and an operation that fails changes nothing (as its savepoint's rollback did).
//!
//! # When it gives up
//! Anything the in-memory checks do not model (a missing ledger account or server, a
//! duplicate call id, a CHECK or foreign key failing in the write) makes the run return
//! [`Fallback`]; the caller rolls back and runs the batch one operation at a time with a
//! savepoint each, which gives every operation its own exact error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};
use sqlx::{AnyConnection, Row};

use super::{Job, Op};
use crate::billing::ledger::{
    BillingError, CallStats, HOLDS, Outcome, PLATFORM_REVENUE, Reservation, SPEND_PERIODS,
    earnings_id, lock_rank, period_start_ms, spend_period, wallet_id,
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

impl From<rusqlite::Error> for Fallback {
    fn from(e: rusqlite::Error) -> Self {
        Self(e.to_string())
    }
}

/// Everything the batch's checks read, as one row holding one JSON object (one row
/// rather than one per call, so that PostgreSQL's twin [`PG_LOAD`] is one message).
/// `$1` the finished calls' ids, `$2` the reserving wallets, `$3`
/// the reserving accounts, `$4` the latest `at` of the batch, `$5` `[account, month]`
/// of the reservations, `$6` `[key, period, period start]` of the spend limits to check
/// (their counters; a missing counter reads 0); see [`Loaded`] for what comes back.
const SQLITE_LOAD: &str = "\
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
 'spent', (SELECT json_group_array(jsonb_array(j.key, COALESCE((SELECT spent_micros FROM key_spend_counters \
 WHERE key_id = json_extract(j.value, '$[0]') AND period = json_extract(j.value, '$[1]') \
 AND period_start = json_extract(j.value, '$[2]')), 0))) FROM jsonb_each($6) AS j), \
 'owners', (SELECT json_group_array(jsonb_array(id, owner_account_id)) FROM servers \
 WHERE id IN (SELECT server_id FROM calls WHERE id IN (SELECT value FROM json_each($1)))))";

/// A call as [`SQLITE_LOAD`] returns it: `[id, status, account, key, server, price,
/// creator, fee, created_at]`.
type LoadedCall = (String, String, String, String, String, i64, i64, i64, i64);

/// The row of [`SQLITE_LOAD`].
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

/// The batch lock of PostgreSQL: an advisory lock held until the transaction ends
/// (`pg_advisory_xact_lock`, key 0x6d6b745f6c656467, "mkt_ledg" in ASCII). Batches of
/// every replica take it first, so they run one after the other, as they do on
/// SQLite's single writer, and each reads what the ones before it committed.
macro_rules! pg_batch_lock {
    () => {
        "SELECT pg_advisory_xact_lock(7884523525831484519)"
    };
}

/// Plain index scans only, for the batch's statements: each looks rows up by key, and
/// a prepared statement keeps the generic plan PostgreSQL chose when it was first run.
/// Planned on a young database (a few hundred calls), that plan scanned `calls` whole
/// and kept doing so at 24,000 (a batch's read went from 0.3 to 6 ms), until the next
/// `ANALYZE` replanned it. Bitmap scans are off too: only a plain index scan marks the
/// index entries of dead row versions, and the ledger rewrites the same few balance rows
/// (`holds`, the platform's revenue) in every batch.
macro_rules! pg_plan {
    () => {
        "; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off"
    };
}

/// Opens a PostgreSQL batch: `BEGIN`, the batch lock and the planner settings, in one
/// round trip.
const PG_BEGIN: &str = concat!("BEGIN; ", pg_batch_lock!(), pg_plan!());
/// [`PG_BEGIN`] for a batch whose commit need not wait for the disk.
const PG_BEGIN_RELAXED: &str = concat!(
    "BEGIN; ",
    pg_batch_lock!(),
    pg_plan!(),
    "; SET LOCAL synchronous_commit TO OFF"
);

/// The batch lock and the planner settings for a transaction already open (a batch run
/// one operation at a time), and (when `relax`) a commit that does not wait for the
/// disk: PostgreSQL, one round trip.
pub(super) fn pg_lock(relax: bool) -> &'static str {
    if relax {
        concat!(
            pg_batch_lock!(),
            pg_plan!(),
            "; SET LOCAL synchronous_commit TO OFF"
        )
    } else {
        concat!(pg_batch_lock!(), pg_plan!())
    }
}

/// [`SQLITE_LOAD`] for PostgreSQL, the same row from the same arguments (JSON text, cast
/// to `jsonb`) and `$7`, the platform's ledger accounts a batch moves (`holds`, platform
/// revenue). It runs after the batch lock was taken, in its own statement, so its
/// snapshot holds every earlier batch. It locks every ledger account the batch may
/// move, `FOR UPDATE` in the ledger's lock order (`lock_rank`: wallets, holds,
/// earnings, platform; then by id), so a top-up or a payout committing meanwhile is
/// either seen or waits, and no lock is taken out of that order later in the batch.
/// Only the wallets come back.
///
/// Ids are matched with `= ANY(ARRAY(…))`, which every plan answers from the primary
/// key: with `IN (SELECT jsonb_array_elements_text(…))` the generic plan PostgreSQL
/// settles on for a prepared statement scanned `calls` whole (11 ms per batch with
/// 24,000 calls).
const PG_LOAD: &str = "\
SELECT json_build_object( \
 'calls', (SELECT COALESCE(json_agg(json_build_array(id, status, account_id, key_id, server_id, \
 price_micros, creator_micros, fee_micros, created_at)), '[]'::json) FROM calls \
 WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))), \
 'wallets', (SELECT COALESCE(json_agg(json_build_array(l.id, l.balance, l.low_balance_micros, \
 l.low_balance_alerted)) FILTER (WHERE l.kind = 'wallet'), '[]'::json) \
 FROM (SELECT id, kind, balance, low_balance_micros, low_balance_alerted FROM ledger_accounts \
 WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($2::jsonb) UNION SELECT jsonb_array_elements_text($7::jsonb) \
 UNION SELECT 'wallet:' || account_id FROM calls WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))) \
 UNION SELECT 'earnings:' || owner_account_id FROM servers WHERE id = ANY(ARRAY(SELECT server_id FROM calls \
 WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))))))) \
 ORDER BY CASE WHEN id LIKE 'wallet:%' THEN 0 WHEN id = 'holds' THEN 1 WHEN id LIKE 'earnings:%' THEN 2 \
 WHEN id LIKE 'platform:%' THEN 3 ELSE 4 END, id FOR UPDATE) AS l), \
 'plans', (SELECT COALESCE(json_agg(json_build_array(account_id, id, plan_id, effective_at)), '[]'::json) \
 FROM account_plans WHERE account_id = ANY(ARRAY(SELECT jsonb_array_elements_text($3::jsonb))) AND effective_at <= $4), \
 'usage', (SELECT COALESCE(json_agg(json_build_array(account_id, month, calls, spent_micros)), '[]'::json) \
 FROM usage_counters WHERE (account_id, month) IN (SELECT e->>0, e->>1 FROM jsonb_array_elements($5::jsonb) AS e \
 UNION SELECT account_id, to_char(to_timestamp(created_at / 1000) AT TIME ZONE 'UTC', 'YYYY-MM') FROM calls \
 WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))) \
 AND account_id = ANY(ARRAY(SELECT e->>0 FROM jsonb_array_elements($5::jsonb) AS e UNION SELECT account_id FROM calls \
 WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))))), \
 'spent', (SELECT COALESCE(json_agg(json_build_array(l.i - 1, COALESCE((SELECT spent_micros FROM key_spend_counters \
 WHERE key_id = l.v->>0 AND period = l.v->>1 AND period_start = (l.v->>2)::bigint), 0))), '[]'::json) \
 FROM jsonb_array_elements($6::jsonb) WITH ORDINALITY AS l(v, i)), \
 'owners', (SELECT COALESCE(json_agg(json_build_array(id, owner_account_id)), '[]'::json) FROM servers \
 WHERE id = ANY(ARRAY(SELECT server_id FROM calls WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb))))))\
)::text";

/// The statement of [`PG_WRITE`] and [`PG_WRITE_WITHOUT_SPEND`]: `$spend` is the key
/// spend counters' part, if any.
macro_rules! pg_write {
    ($spend:expr) => {
        concat!(
            "\
WITH new_calls AS (INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
 fee_micros, status, hold_expires_at, created_at, request_bytes) \
 SELECT e->>0, e->>1, e->>2, e->>3, e->>4, (e->>5)::bigint, (e->>6)::bigint, (e->>7)::bigint, 'reserved', \
 (e->>8)::bigint, (e->>9)::bigint, (e->>10)::bigint FROM jsonb_array_elements($1::jsonb) AS e), \
finished AS (UPDATE calls SET status = j->>1, error_kind = j->>2, finished_at = (j->>3)::bigint, \
 latency_ms = (j->>4)::bigint, response_bytes = (j->>5)::bigint \
 FROM jsonb_array_elements($2::jsonb) AS j WHERE calls.id = j->>0 \
 AND calls.id = ANY(ARRAY(SELECT e->>0 FROM jsonb_array_elements($2::jsonb) AS e))), \
transfers AS (INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) \
 SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, e->>4, (e->>5)::bigint FROM jsonb_array_elements($3::jsonb) AS e), \
entries AS (INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) \
 SELECT e->>0, e->>1, (e->>2)::bigint FROM jsonb_array_elements($4::jsonb) AS e), \
balances AS (UPDATE ledger_accounts SET balance = balance + (j->>1)::bigint, \
 low_balance_alerted = CASE WHEN (j->>2)::boolean THEN 1 ELSE low_balance_alerted END \
 FROM jsonb_array_elements($5::jsonb) AS j WHERE ledger_accounts.id = j->>0 \
 AND ledger_accounts.id = ANY(ARRAY(SELECT e->>0 FROM jsonb_array_elements($5::jsonb) AS e))), \
alerts AS (INSERT INTO balance_alerts (id, account_id, kind, threshold_micros, balance_micros, call_id, created_at) \
 SELECT e->>0, e->>1, 'low_balance', (e->>2)::bigint, (e->>3)::bigint, e->>4, (e->>5)::bigint \
 FROM jsonb_array_elements($6::jsonb) AS e) \
",
            $spend,
            "\
INSERT INTO usage_counters (account_id, month, calls, spent_micros) \
 SELECT e->>0, e->>1, (e->>2)::bigint, (e->>3)::bigint FROM jsonb_array_elements($7::jsonb) AS e \
 ON CONFLICT (account_id, month) DO UPDATE SET calls = excluded.calls, spent_micros = excluded.spent_micros"
        )
    };
}

/// [`SQLITE_WRITES`] for PostgreSQL: one statement whose data-modifying `WITH` parts all
/// run (foreign keys are checked at its end), fed the same nine arrays. `COMMIT`
/// follows in its own round trip (a statement with parameters cannot hold two).
const PG_WRITE: &str = pg_write!(
    ", \
spend_added AS (INSERT INTO key_spend_counters (key_id, period, period_start, spent_micros) \
 SELECT e->>0, e->>1, (e->>2)::bigint, (e->>3)::bigint FROM jsonb_array_elements($8::jsonb) AS e \
 ON CONFLICT (key_id, period, period_start) \
 DO UPDATE SET spent_micros = key_spend_counters.spent_micros + excluded.spent_micros), \
spend_taken AS (UPDATE key_spend_counters SET spent_micros = GREATEST(key_spend_counters.spent_micros - (j->>3)::bigint, 0) \
 FROM jsonb_array_elements($9::jsonb) AS j WHERE key_spend_counters.key_id = j->>0 \
 AND key_spend_counters.period = j->>1 AND key_spend_counters.period_start = (j->>2)::bigint) \
"
);

/// [`PG_WRITE`] without the key spend counters' parts, fed the first seven arrays: the
/// statement of a batch that changes no key spend counter (no key with a limit reserved
/// and no call was refunded), which most batches are, so they do not pay for two more
/// parts over empty arrays.
const PG_WRITE_WITHOUT_SPEND: &str = pg_write!("");

/// Everything the batch writes (nine statements, each fed one JSON array of rows as
/// `?1`; a part whose array is empty is not run). `jsonb_each` (SQLite 3.45+) hands each
/// row over as a JSONB blob, so the `json_extract`s of its columns do not parse its text again
/// (`json_each` did, once per column: a fifth of a batch's time in `perf`).
///
/// The `calls` update matches by id alone: with `AND status = 'reserved'` SQLite's
/// planner walked the `calls_status` index and scanned the batch's rows for each
/// reserved call (quadratic: 22 ms for a batch of 256 settlements). The in-memory guard
/// decided that every call is still reserved, and the `calls_append_only` trigger
/// aborts the update of a finished call (which sends the batch to the fallback).
///
/// The key spend counters come in two parts because the schema's `spent_micros >= 0`
/// CHECK is applied to the row an upsert proposes before its conflict is seen: a
/// counter the batch raised is upserted (created if new), one it lowered (refunds) is
/// updated where it exists (a refunded call's key may limit neither period), never
/// below zero (as `count_key_spend` in `ledger/mod.rs`).
const SQLITE_WRITES: [&str; 9] = [
    "\
INSERT INTO calls (id, account_id, key_id, server_id, tool, price_micros, creator_micros, \
 fee_micros, status, hold_expires_at, created_at, request_bytes) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), \
 json_extract(value, '$[6]'), json_extract(value, '$[7]'), 'reserved', json_extract(value, '$[8]'), \
 json_extract(value, '$[9]'), json_extract(value, '$[10]') FROM jsonb_each(?1)",
    "\
UPDATE calls SET status = j.status, error_kind = j.error_kind, finished_at = j.finished_at, \
 latency_ms = j.latency_ms, response_bytes = j.response_bytes \
 FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS status, \
 json_extract(value, '$[2]') AS error_kind, json_extract(value, '$[3]') AS finished_at, \
 json_extract(value, '$[4]') AS latency_ms, json_extract(value, '$[5]') AS response_bytes \
 FROM jsonb_each(?1)) AS j WHERE calls.id = j.id",
    "\
INSERT INTO ledger_transfers (id, kind, call_id, amount, memo, created_at) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]') FROM jsonb_each(?1)",
    "\
INSERT INTO ledger_entries (transfer_id, ledger_account_id, amount) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') \
 FROM jsonb_each(?1)",
    "\
UPDATE ledger_accounts SET balance = balance + j.delta, \
 low_balance_alerted = CASE WHEN j.alerted THEN 1 ELSE low_balance_alerted END \
 FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS delta, \
 json_extract(value, '$[2]') AS alerted FROM jsonb_each(?1)) AS j \
 WHERE ledger_accounts.id = j.id",
    "\
INSERT INTO balance_alerts (id, account_id, kind, threshold_micros, balance_micros, call_id, created_at) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 'low_balance', json_extract(value, '$[2]'), \
 json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]') FROM jsonb_each(?1)",
    "\
INSERT INTO usage_counters (account_id, month, calls, spent_micros) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]') FROM jsonb_each(?1) WHERE true \
 ON CONFLICT (account_id, month) DO UPDATE SET calls = excluded.calls, spent_micros = excluded.spent_micros",
    "\
INSERT INTO key_spend_counters (key_id, period, period_start, spent_micros) \
 SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
 json_extract(value, '$[3]') FROM jsonb_each(?1) WHERE true \
 ON CONFLICT (key_id, period, period_start) \
 DO UPDATE SET spent_micros = key_spend_counters.spent_micros + excluded.spent_micros",
    "\
UPDATE key_spend_counters SET spent_micros = MAX(spent_micros - j.amount, 0) \
 FROM (SELECT json_extract(value, '$[0]') AS key_id, json_extract(value, '$[1]') AS period, \
 json_extract(value, '$[2]') AS period_start, json_extract(value, '$[3]') AS amount FROM jsonb_each(?1)) AS j \
 WHERE key_spend_counters.key_id = j.key_id AND key_spend_counters.period = j.period \
 AND key_spend_counters.period_start = j.period_start",
];

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
    /// `(key, period, period start ms)` → spent micros: the counters of the spend
    /// limits the batch checks.
    spent: HashMap<SpendCounter, i64>,
    /// Server id → owner account id.
    owners: HashMap<String, String>,
}

/// A key's spend counter: `(key, period, period start ms)`.
type SpendCounter = (String, &'static str, i64);

/// The rows the batch writes, as the JSON arrays [`SQLITE_WRITES`] reads.
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
    /// Spend counter → net change, micros.
    key_spend: BTreeMap<SpendCounter, i64>,
}

impl Writes {
    /// Counts `delta` micros in `key`'s spend counters of `periods` holding `made_at`
    /// (the call's `created_at`, epoch ms), and in `read`, the batch's copies of the
    /// counters it checks ([`State::spent`]). The rule is `Ledger`'s
    /// (`count_key_spend` in `ledger/mod.rs`): a reservation counts in the periods its
    /// key limits; a refund in the day and month of its call, where those counters exist
    /// (the write of a lowered counter only updates existing rows).
    fn count_key_spend<'p>(
        &mut self,
        read: &mut HashMap<SpendCounter, i64>,
        key: &str,
        periods: impl IntoIterator<Item = &'p str>,
        made_at: i64,
        delta: i64,
    ) {
        if delta == 0 {
            return;
        }
        for period in periods {
            let period = spend_period(period);
            let counter = (key.to_owned(), period, period_start_ms(period, made_at));
            if let Some(spent) = read.get_mut(&counter) {
                *spent = (*spent + delta).max(0);
            }
            *self.key_spend.entry(counter).or_default() += delta;
        }
    }
}

/// Runs `jobs` set-wise on SQLite, on the ledger writer's own connection (`writer.rs`):
/// `BEGIN IMMEDIATE`, the read, every operation decided in memory in queue order, the
/// writes and `COMMIT`, all on the calling thread (SQLite is a library: no hand-off per
/// statement). Whether the `COMMIT` waits for the disk is the connection's `synchronous`
/// mode, which the writer sets before each batch (`NORMAL` for a batch without
/// settlements, `FULL` otherwise).
///
/// # Errors
/// [`Fallback`] when a statement fails or the batch holds something the in-memory
/// checks do not model; nothing was committed, and the transaction may still be open
/// with partial writes: the caller must roll it back.
pub(super) fn run_sqlite(
    conn: &rusqlite::Connection,
    jobs: &[Job],
) -> Result<Vec<Result<i64, BillingError>>, Fallback> {
    let args = LoadArgs::of(jobs);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let text: String = conn.prepare_cached(SQLITE_LOAD)?.query_row(
        rusqlite::named_params! {
            "$1": args.finished,
            "$2": args.wallets,
            "$3": args.accounts,
            "$4": args.latest,
            "$5": args.months,
            "$6": args.limits_json,
        },
        |row| row.get(0),
    )?;
    let mut state = State::read(&text, &args.limits)?;
    let (results, writes) = decide(&mut state, jobs)?;
    if let Some(rows) = write_rows(&state, writes) {
        for (sql, rows) in SQLITE_WRITES.iter().zip(rows) {
            // `[]`: this part has nothing to write in this batch.
            if rows != "[]" {
                conn.prepare_cached(sql)?.execute([rows])?;
            }
        }
    }
    conn.execute_batch("COMMIT")?;
    remember_owners(jobs, state);
    Ok(results)
}

/// Runs `jobs` set-wise on PostgreSQL in one transaction on `conn`, every operation
/// decided in memory in queue order between one read and one write, and returns each
/// job's result once the `COMMIT` returned. When `relax`, the commit does not wait for
/// the disk (`SET LOCAL synchronous_commit TO OFF`).
///
/// Four round trips: `BEGIN` with [`pg_batch_lock!`]; the read; the write; `COMMIT`.
///
/// # Errors
/// [`Fallback`] when a statement fails or the batch holds something the in-memory
/// checks do not model; nothing was committed, and the transaction may still be open
/// with partial writes: the caller must roll it back.
pub(super) async fn run_postgres(
    conn: &mut AnyConnection,
    jobs: &[Job],
    relax: bool,
) -> Result<Vec<Result<i64, BillingError>>, Fallback> {
    let args = LoadArgs::of(jobs);
    let begin = if relax { PG_BEGIN_RELAXED } else { PG_BEGIN };
    sqlx::raw_sql(begin).execute(&mut *conn).await?;
    let row = sqlx::query(PG_LOAD)
        .bind(args.finished)
        .bind(args.wallets)
        .bind(args.accounts)
        .bind(args.latest)
        .bind(args.months)
        .bind(args.limits_json)
        .bind(json!([HOLDS, PLATFORM_REVENUE]).to_string())
        .fetch_one(&mut *conn)
        .await?;
    let text: String = row.try_get(0)?;
    let mut state = State::read(&text, &args.limits)?;
    let (results, writes) = decide(&mut state, jobs)?;
    if let Some(rows) = write_rows(&state, writes) {
        // `[]`: no key spend counter changes in this batch.
        let spend = rows[7] != "[]" || rows[8] != "[]";
        let (sql, parts) = if spend {
            (PG_WRITE, 9)
        } else {
            (PG_WRITE_WITHOUT_SPEND, 7)
        };
        let mut query = sqlx::query(sql);
        for rows in rows.into_iter().take(parts) {
            query = query.bind(rows);
        }
        query.execute(&mut *conn).await?;
    }
    sqlx::raw_sql("COMMIT").execute(conn).await?;
    remember_owners(jobs, state);
    Ok(results)
}

/// Decides every job in queue order, each seeing what those before it changed: each
/// job's result, and the rows the batch writes.
fn decide(
    state: &mut State,
    jobs: &[Job],
) -> Result<(Vec<Result<i64, BillingError>>, Writes), Fallback> {
    let mut writes = Writes::default();
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let result = match &job.op {
            Op::Reserve(r) => reserve(state, &mut writes, job, r)?,
            Op::Finish {
                call_id,
                outcome,
                error_kind,
                stats,
            } => finish(
                state,
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
    Ok((results, writes))
}

/// Owners are immutable facts: keeps the ones the batch read for the next batches.
fn remember_owners(jobs: &[Job], state: State) {
    if let Some(job) = jobs.first() {
        for (server, owner) in state.owners {
            if job.ledger.owners.len() < super::super::MAX_CACHED_OWNERS {
                job.ledger.owners.insert(server, owner);
            }
        }
    }
}

/// The arguments of the batch's read ([`SQLITE_LOAD`], [`PG_LOAD`]), as JSON text.
struct LoadArgs {
    /// `$1`: the finished calls' ids.
    finished: String,
    /// `$2`: the reserving wallets.
    wallets: String,
    /// `$3`: the reserving accounts.
    accounts: String,
    /// `$4`: the latest `at` of the batch, ms.
    latest: i64,
    /// `$5`: `[account, month]` of the reservations.
    months: String,
    /// `$6`: [`Self::limits`] as JSON.
    limits_json: String,
    /// The spend counters of the limits to check; the read answers by index.
    limits: Vec<SpendCounter>,
}

impl LoadArgs {
    fn of(jobs: &[Job]) -> Self {
        let mut finished = Vec::new();
        let mut wallets = Vec::new();
        let mut accounts = Vec::new();
        let mut months = Vec::new();
        let mut limits: Vec<SpendCounter> = Vec::new();
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
                        let period = spend_period(period);
                        let key = (r.key_id.clone(), period, period_start_ms(period, job.at));
                        if !limits.contains(&key) {
                            limits.push(key);
                        }
                    }
                }
            }
        }
        Self {
            finished: json!(finished).to_string(),
            wallets: json!(wallets).to_string(),
            accounts: json!(accounts).to_string(),
            latest,
            months: Value::Array(months).to_string(),
            limits_json: json!(limits).to_string(),
            limits,
        }
    }
}

impl State {
    /// The state of the batch's read: `text` is its one JSON row ([`Loaded`]), `limits`
    /// the spend limits it was asked for ([`LoadArgs::limits`]).
    fn read(text: &str, limits: &[SpendCounter]) -> Result<Self, Fallback> {
        let loaded: Loaded = serde_json::from_str(text)
            .map_err(|e| Fallback(format!("the batch's read did not parse: {e}")))?;
        let mut state = State::default();
        for (id, status, account_id, key_id, server_id, price, creator, fee, created_at) in
            loaded.calls
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
        let counter = (
            r.key_id.clone(),
            spend_period(period),
            period_start_ms(period, at),
        );
        let spent = state
            .spent
            .get(&counter)
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
    let limited = r.spend_limits.iter().map(|(_, period)| period.as_str());
    writes.count_key_spend(&mut state.spent, &r.key_id, limited, at, r.price_micros);
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
            writes.count_key_spend(
                &mut state.spent,
                &call.key_id,
                SPEND_PERIODS,
                call.created_at,
                -price,
            );
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

/// The nine arrays of rows the batch writes, as JSON text in the order of
/// [`SQLITE_WRITES`] and [`PG_WRITE`]'s parameters (calls reserved, calls finished,
/// transfers, entries, balances, alerts, usage counters, key spend counters raised
/// `[key, period, start, micros added]`, lowered `[…, micros taken]`); `None` when the
/// batch writes nothing (every operation was refused).
fn write_rows(state: &State, writes: Writes) -> Option<[String; 9]> {
    if writes.transfers.is_empty() {
        // Every write comes with a transfer: nothing was decided that writes.
        return None;
    }
    let usage: Vec<Value> = writes
        .usage
        .iter()
        .filter_map(|key| {
            let (calls, spent) = state.usage.get(key)?;
            Some(json!([key.0, key.1, calls, spent]))
        })
        .collect();
    // `[account, delta, alerted]`: the low-balance flag rides with the balance change
    // (a wallet that crossed its threshold was debited in this batch), so each row is
    // updated once (PostgreSQL forbids updating a row twice in one statement).
    let mut balances: BTreeMap<&str, (i64, bool)> = writes
        .deltas
        .iter()
        .filter(|(_, delta)| **delta != 0)
        .map(|(account, delta)| (account.as_str(), (*delta, false)))
        .collect();
    for account in &writes.alerted {
        balances.entry(account.as_str()).or_default().1 = true;
    }
    let balances: Vec<Value> = balances
        .into_iter()
        .map(|(account, (delta, alerted))| json!([account, delta, alerted]))
        .collect();
    let (mut spend_added, mut spend_taken) = (Vec::new(), Vec::new());
    for ((key, period, start), delta) in &writes.key_spend {
        match delta.signum() {
            1 => spend_added.push(json!([key, period, start, delta])),
            -1 => spend_taken.push(json!([key, period, start, -delta])),
            _ => {}
        }
    }
    Some(
        [
            writes.new_calls,
            writes.finished_calls,
            writes.transfers,
            writes.entries,
            balances,
            writes.alerts,
            usage,
            spend_added,
            spend_taken,
        ]
        .map(|rows| Value::Array(rows).to_string()),
    )
}
