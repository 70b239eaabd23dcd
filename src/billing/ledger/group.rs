//! Group commit of the call path's ledger writes, on both backends.
//!
//! # Why
//! SQLite has one writer; with `synchronous = FULL` every commit waits for an fsync of
//! the write-ahead log. One transaction per reserve and one per settle would cap the
//! marketplace at `1 / (2 × fsync)` paid calls per second and queue every other write
//! behind those fsyncs. On PostgreSQL every reserve and every settle moves the one
//! `holds` account, so one transaction per operation holds that row's lock through a
//! dozen round trips and its commit's WAL flush: every call of every account waited for
//! the one before it (0.02× the direct call's rate at 32 connections, README
//! "Performance").
//!
//! # How
//! A call's [`Ledger::reserve`], [`Ledger::settle`] and [`Ledger::refund`] hand an
//! [`Op`] to the group commit and wait for its answer. The operations waiting form a
//! batch of up to [`MAX_BATCH`] ([`PG_MAX_BATCH`] on PostgreSQL), run in queue order in
//! **one** transaction with one commit. While a batch commits the next operations queue
//! up and form the next batch, so the batch size follows the load by itself (one
//! operation when idle: no added latency, no timer).
//!
//! - **SQLite**: the ledger writer (`writer.rs`), a thread of its own with its own
//!   connection to the database file (rusqlite), takes the operations from a channel and
//!   runs each batch whole on that thread: a batch costs the caller one hand-off to the
//!   thread and one back, not a hand-off per statement to sqlx's worker thread and the
//!   ping sqlx sends as the pool's connection goes back (six per paid call before).
//! - **PostgreSQL**: operations wait in a queue; whoever takes the leader lock first
//!   becomes the leader and runs up to [`PG_MAX_BATCH`] queued operations (its own among
//!   them) in a task of its own.
//!
//! A batch runs set-wise first ([`bulk`]): the transaction opens and one read returns
//! everything its checks need, every operation is decided in memory in queue order,
//! then the writes send its rows, so a batch costs the same few statements whatever its
//! size (one operation after the other cost about a dozen statements per call). When
//! the set-wise run meets what its in-memory checks do not model (a missing ledger
//! account, a duplicate call id, a constraint failing in the write), it rolls back and
//! the batch runs again one operation at a time through sqlx (on SQLite on the store's
//! pooled connection), each inside its own `SAVEPOINT`, which gives every operation its
//! exact error. `mcp_marketplace_ledger_batches_total{mode}` counts both.
//!
//! On PostgreSQL, where several replicas share the database, every batch transaction
//! first takes one advisory lock (`pg_batch_lock!` in `bulk`), so batches run one after
//! the other as on SQLite's single writer: the in-memory checks read what every earlier
//! batch committed, and the rows a batch locks (wallets in id order, then `holds`,
//! earnings and platform revenue in the ledger's lock order, `lock_rank`) cannot form
//! a cycle with another batch. Top-ups and payouts, outside batches, lock in the same
//! order.
//!
//! # What it keeps
//! - **Durability before the answer.** Every operation of a batch is answered only after
//!   the batch's `COMMIT` returned. A batch holding a settlement commits durably
//!   (SQLite `synchronous = FULL`, PostgreSQL `synchronous_commit` on), so a call is
//!   told "settled" only once its settlement is on disk; a crash before that loses the
//!   whole batch and no caller was answered (the holds of reserved calls are refunded by
//!   the sweep, as after any crash). A batch of reservations and refunds only commits
//!   relaxed (SQLite: the writer's connection in `synchronous = NORMAL` for that batch,
//!   which only the writer uses; PostgreSQL `SET LOCAL synchronous_commit TO OFF`): it is
//!   atomic, survives a crash of the process, and is made durable by the next durable
//!   commit (the write-ahead log is flushed in order). A power loss can lose such a
//!   batch whole, which charges nothing: a lost reservation is a call never charged, a
//!   lost refund leaves a hold the sweep refunds. A lone paid call thus waits for one
//!   flush, not two.
//! - **Exact checks.** The operations of a batch are decided one after the other in one
//!   transaction, each seeing the effects of those before it (in memory under the write
//!   lock, or statement by statement), so spend limits, quotas and the guarded wallet
//!   debit are exactly as strict as with one transaction each.
//! - **Isolation of failures.** An operation that fails (insufficient credits, a quota,
//!   a call already finished) writes nothing (set-wise: nothing of it is added to the
//!   batch's writes; one at a time: it is rolled back to its savepoint); the others
//!   commit. When the batch itself fails (`BEGIN`, a savepoint or `COMMIT`), nothing of
//!   it is written and every operation of it gets [`BillingError::Commit`].
//! - **No cancellation hazard.** The batch runs on the writer's thread (SQLite) or in a
//!   task of its own (PostgreSQL), so a caller whose future is dropped (a cancelled MCP
//!   request) cannot abort a commit others wait on.

use std::sync::{Arc, Mutex};

use sqlx::pool::PoolConnection;
use sqlx::{Acquire, Any, Connection};
use tokio::sync::oneshot;

use super::{BillingError, CallStats, Ledger, Outcome, Reservation};
use crate::store::{Backend, Store, Tx};

mod bulk;
mod writer;

/// Most operations in one batch on SQLite (bounds the transaction's size and the time
/// SQLite's write lock is held: a few milliseconds).
pub const MAX_BATCH: usize = 256;

/// Most operations in one batch on PostgreSQL. sqlx 0.9.0 leaves Nagle's algorithm on
/// for its connections (transact-rs/sqlx#4335): a message the kernel sends in more than
/// one piece waits for the server's delayed ACK, 40 ms, for its last piece. A batch's
/// write carries about 600 bytes per operation; with 64 or more operations (about 40
/// KB) most batch writes took 45 ms on loopback and 256 calls in flight settled 790
/// calls/s; with at most 32 (about 19 KB) one write in some hundreds stalled and they
/// settled 4,700/s (`cargo bench --bench hot_path -- ledger_postgres`).
pub const PG_MAX_BATCH: usize = 32;

/// One ledger write of the call path.
#[derive(Debug)]
pub(super) enum Op {
    /// [`Ledger::reserve`].
    Reserve(Reservation),
    /// [`Ledger::settle`] or [`Ledger::refund`].
    Finish {
        call_id: String,
        outcome: Outcome,
        error_kind: Option<String>,
        stats: CallStats,
    },
}

struct Job {
    /// The ledger that asked (its clock stamped `at`, its plans apply).
    ledger: Ledger,
    op: Op,
    at: i64,
    reply: oneshot::Sender<Result<i64, BillingError>>,
}

/// The group commit of one [`Ledger`] (shared by its clones): on SQLite the ledger
/// writer's thread (`writer.rs`), on PostgreSQL the queue and the leader lock.
#[derive(Default)]
pub(super) struct GroupCommit {
    /// SQLite: the writer thread, started by the first operation (and again if it died).
    writer: Mutex<Option<writer::Writer>>,
    /// PostgreSQL: the operations waiting for a batch.
    queue: Mutex<Vec<Job>>,
    /// PostgreSQL: held by the task running a batch.
    leader: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

/// The error of an operation whose batch died (a panic) before answering: nothing of
/// the batch was committed.
fn abandoned() -> BillingError {
    BillingError::Commit("the batch was abandoned".into())
}

impl GroupCommit {
    /// Queues `op` and returns its result once the batch holding it committed.
    pub(super) async fn submit(
        &self,
        ledger: Ledger,
        op: Op,
        at: i64,
    ) -> Result<i64, BillingError> {
        let store = ledger.store.clone();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            ledger,
            op,
            at,
            reply,
        };
        match store.backend() {
            Backend::Sqlite => {
                self.send_to_writer(&store, job)?;
                // Closed: the writer died (a panic) before answering.
                answer.await.unwrap_or_else(|_| Err(abandoned()))
            }
            Backend::Postgres => self.lead(store, job, answer).await,
        }
    }

    /// Hands `job` to the SQLite writer thread, starting one when there is none or the
    /// last one died.
    fn send_to_writer(&self, store: &Store, job: Job) -> Result<(), BillingError> {
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let job = match writer.as_ref() {
            Some(running) => match running.send(job) {
                Ok(()) => return Ok(()),
                Err(job) => *job,
            },
            None => job,
        };
        let started = writer::Writer::start(store.clone()).map_err(|e| {
            BillingError::Commit(format!("the ledger writer thread could not start: {e}"))
        })?;
        let sent = started.send(job);
        *writer = Some(started);
        // Refused only by a writer that already died (a panic).
        sent.map_err(|_| abandoned())
    }

    /// PostgreSQL: queues `job`, then waits for its answer or for the leader lock, and
    /// leads the next batch when it gets the lock first.
    async fn lead(
        &self,
        store: Store,
        job: Job,
        mut answer: oneshot::Receiver<Result<i64, BillingError>>,
    ) -> Result<i64, BillingError> {
        self.lock_queue().push(job);
        loop {
            // Wait for the answer and for the leader lock at once: an operation whose
            // batch committed returns at once rather than queueing for the lock behind
            // the others of its batch (each of them then leading a batch of the few
            // operations queued so far: 256 calls in flight split into dozens of
            // batches).
            let guard = tokio::select! {
                biased;
                result = &mut answer => {
                    // Closed: the batch holding it died (a panic), nothing of it committed.
                    return result.unwrap_or_else(|_| Err(abandoned()));
                }
                guard = self.leader.clone().lock_owned() => guard,
            };
            match answer.try_recv() {
                Ok(result) => return result,
                // The batch holding it died (a panic): nothing of it was committed.
                Err(oneshot::error::TryRecvError::Closed) => return Err(abandoned()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            // Still queued: lead the next batch (it holds this operation unless more
            // than PG_MAX_BATCH were queued before it; then loop).
            let jobs = {
                let mut queue = self.lock_queue();
                let n = queue.len().min(PG_MAX_BATCH);
                queue.drain(..n).collect::<Vec<_>>()
            };
            let store = store.clone();
            let batch = tokio::spawn(async move {
                run_postgres_batch(&store, jobs).await;
                drop(guard);
            });
            // A panic in the batch drops its replies; the next try_recv sees Closed.
            let _ = batch.await;
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        // A poisoned queue still holds valid jobs (pushing and draining cannot leave it
        // half-changed).
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// True when `op` must be durable before its caller is answered: a settlement (DESIGN.md
/// "The ledger"; docs/ledger.md "Durability"). A reservation or a refund lost to a
/// crash leaves the ledger consistent and charges nothing: a lost reservation is a call
/// never charged, a lost refund leaves a hold the sweep refunds.
fn needs_durability(op: &Op) -> bool {
    matches!(
        op,
        Op::Finish {
            outcome: Outcome::Settled,
            ..
        }
    )
}

/// Runs `jobs` (PostgreSQL) in one transaction and commits once, then answers each. The
/// commit waits for the disk (`synchronous_commit` on) only when a job of the batch
/// settles a call.
///
/// First set-wise ([`bulk::run_postgres`]: one read, the checks in memory, one write);
/// when that gives up, the transaction is rolled back and the batch runs again one
/// operation at a time, each in a savepoint, which gives every operation its own exact
/// error.
async fn run_postgres_batch(store: &Store, jobs: Vec<Job>) {
    if jobs.is_empty() {
        return;
    }
    let relax = !jobs.iter().any(|j| needs_durability(&j.op));
    let mut conn = match store.pool().acquire().await {
        Ok(conn) => conn,
        Err(e) => return fail_all(jobs, &e.to_string()),
    };
    // A lone operation runs as its statements: there each statement is a network round
    // trip to a server that answers small ones in microseconds, and the set-wise form's
    // four larger statements took longer than one operation's dozen small ones (ledger
    // bench, one call alone: 1.9–2.1 ms per reserve+settle against 1.5 ms). Batches of
    // two and more run set-wise.
    let answers = if jobs.len() == 1 {
        count_batch("per_operation");
        run_in_transaction(&mut conn, Backend::Postgres, &jobs, relax).await
    } else {
        let outcome = bulk::run_postgres(&mut conn, &jobs, relax).await;
        if outcome.is_err() && sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_err() {
            // No transaction was open (BEGIN failed), or the connection is in an
            // unknown state: close it rather than hand it to anyone.
            conn.close_on_drop();
        }
        match outcome {
            Ok(results) => {
                count_batch("set");
                Ok(results)
            }
            Err(bulk::Fallback(why)) => {
                tracing::debug!(reason = %why, operations = jobs.len(), "ledger batch runs one operation at a time");
                count_batch("per_operation");
                run_in_transaction(&mut conn, Backend::Postgres, &jobs, relax).await
            }
        }
    };
    answer_all(jobs, answers);
}

/// Counts one batch run in `mode` (`set` or `per_operation`):
/// `mcp_marketplace_ledger_batches_total{mode}`.
fn count_batch(mode: &'static str) {
    metrics::counter!("mcp_marketplace_ledger_batches_total", "mode" => mode).increment(1);
}

/// Sends each job its result, or every job the batch's failure.
fn answer_all(jobs: Vec<Job>, answers: Result<Vec<Result<i64, BillingError>>, String>) {
    match answers {
        Ok(results) => {
            for (job, result) in jobs.into_iter().zip(results) {
                // The caller may be gone (cancelled); its write stands, like any committed call.
                let _ = job.reply.send(result);
            }
        }
        Err(e) => fail_all(jobs, &e),
    }
}

/// SQLite: runs `jobs` one operation at a time, each in a savepoint, in one durable
/// transaction on the store's pooled connection (the writer's set-wise run gave up on
/// them and rolled back), and answers each.
async fn run_sqlite_one_at_a_time(store: &Store, jobs: Vec<Job>) {
    count_batch("per_operation");
    let answers = match store.pool().acquire().await {
        Ok(mut conn) => run_in_transaction(&mut conn, Backend::Sqlite, &jobs, false).await,
        Err(e) => Err(e.to_string()),
    };
    answer_all(jobs, answers);
}

/// The jobs' results once their transaction committed (a lone failed job: rolled back,
/// and its error is the result), or why the whole batch failed. On SQLite the
/// transaction is `BEGIN IMMEDIATE` (the ledger writer holds a second connection to the
/// file; see `Store::begin`). On PostgreSQL the transaction takes the batch lock first
/// and, when `relax`, does not wait for the disk at its commit (`SET LOCAL
/// synchronous_commit TO OFF`).
async fn run_in_transaction(
    conn: &mut PoolConnection<Any>,
    backend: Backend,
    jobs: &[Job],
    relax: bool,
) -> Result<Vec<Result<i64, BillingError>>, String> {
    let mut tx = match backend {
        Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => conn.begin().await,
    }
    .map_err(|e| e.to_string())?;
    if backend == Backend::Postgres {
        sqlx::raw_sql(bulk::pg_lock(relax))
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
    }
    let alone = jobs.len() == 1;
    let mut results = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if !alone {
            // One round trip: close the previous operation's savepoint, open this one's.
            let sql = if i == 0 {
                "SAVEPOINT ledger_op"
            } else {
                "RELEASE SAVEPOINT ledger_op; SAVEPOINT ledger_op"
            };
            sqlx::raw_sql(sql)
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
        }
        let result = run_op(&mut tx, job).await;
        if result.is_err() {
            if alone {
                // Nothing of it may stay: roll back (if that fails, sqlx rolls back
                // again before the connection's next use).
                let _ = tx.rollback().await;
                return Ok(vec![result]);
            }
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT ledger_op")
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
        }
        results.push(result);
    }
    // COMMIT releases the last savepoint.
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(results)
}

async fn run_op(tx: &mut Tx<'_>, job: &Job) -> Result<i64, BillingError> {
    match &job.op {
        Op::Reserve(r) => job.ledger.reserve_in(tx, r, job.at).await,
        Op::Finish {
            call_id,
            outcome,
            error_kind,
            stats,
        } => {
            job.ledger
                .finish_in(tx, call_id, *outcome, error_kind.as_deref(), *stats, job.at)
                .await
        }
    }
}

fn fail_all(jobs: Vec<Job>, why: &str) {
    tracing::error!(error = %why, operations = jobs.len(), "ledger batch failed; nothing of it was written");
    for job in jobs {
        let _ = job.reply.send(Err(BillingError::Commit(format!(
            "the batch failed: {why}"
        ))));
    }
}
