//! The ledger writer of SQLite: a thread of its own, with its own connection to the
//! database file, that runs the call path's batches (group.rs) whole.
//!
//! # Why
//! sqlx drives each SQLite connection from a worker thread of its own, so every
//! statement is a hand-off to that thread and back (two thread wake-ups, 30–90 µs on the
//! 2-vCPU development machine), and every return of the pooled connection adds one more
//! (sqlx 0.9 pings a connection as it goes back to the pool, whatever the pool's
//! options). A paid call's two batches made six such round trips; `perf` of a lone paid
//! call found about 30 % of that thread's time in the kernel switching threads (README
//! "Performance"). SQLite is a library: on a thread that owns its connection, a batch's
//! `BEGIN IMMEDIATE`, read, writes and `COMMIT` are plain function calls. A batch now
//! costs its callers one hand-off to this thread (a channel) and one back (each
//! caller's `oneshot`).
//!
//! # How
//! [`Writer::start`] spawns the thread; operations arrive on a channel in the order
//! they were submitted. The thread takes the first, then whatever else is already
//! waiting (up to [`MAX_BATCH`]), and runs them set-wise ([`bulk::run_sqlite`]); while
//! it commits (and waits for the fsync), the next operations wait in the channel and
//! form the next batch. The thread sets its connection's `synchronous` mode for each
//! batch (`NORMAL` for a batch without settlements, `FULL` otherwise; docs/ledger.md
//! "Durability"); nothing else uses that connection, so no other commit is ever made
//! in the relaxed mode. When the set-wise run gives up ([`bulk::Fallback`]), the
//! thread rolls back and runs the batch one operation at a time through sqlx on the
//! store's pooled connection (`run_sqlite_one_at_a_time`), waiting for it: batches stay
//! one after the other.
//!
//! # Two connections, one writer
//! The store's pool keeps its one connection for everything else; SQLite still has one
//! writer at a time. Every transaction of the pool begins `IMMEDIATE` (`Store::begin`),
//! taking the write lock before it reads, so neither connection's transaction can fail
//! with `SQLITE_BUSY` when it upgrades from reading to writing; a writer waits for the
//! other's lock up to the busy timeout (10 s). Reads of the pool now run beside a
//! batch (WAL readers do not wait for the writer).
//!
//! The thread ends when the ledger (every clone of it) is dropped.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::runtime::Handle;

use super::{
    BillingError, Job, MAX_BATCH, answer_all, bulk, count_batch, fail_all, needs_durability,
    run_sqlite_one_at_a_time,
};
use crate::store::Store;

/// How long the writer waits for SQLite's write lock held by the pool's connection
/// (10 s, as the pool's own `busy_timeout`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on the writer thread: hands it operations.
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts a writer thread (`ledger-writer`) for `store`, an SQLite store. The
    /// connection opens with the first batch.
    ///
    /// # Errors
    /// When `store` has no SQLite file, when called outside a tokio runtime (the
    /// fallback runs on it) or when the thread cannot be spawned.
    pub(super) fn start(store: Store) -> std::io::Result<Self> {
        let file = store
            .sqlite_file()
            .map(Path::to_path_buf)
            .ok_or_else(|| std::io::Error::other("the store is not an SQLite file"))?;
        let runtime = Handle::try_current().map_err(std::io::Error::other)?;
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let mut thread = Thread {
                    store,
                    file,
                    runtime,
                    conn: None,
                };
                thread.run(&queue);
            })?;
        Ok(Self { jobs })
    }

    /// Hands `job` to the thread; gives it back when the thread is gone (it panicked).
    pub(super) fn send(&self, job: Job) -> Result<(), Box<Job>> {
        self.jobs.send(job).map_err(|e| Box::new(e.0))
    }
}

/// The writer's connection and the `synchronous` mode it is in.
struct Open {
    conn: Connection,
    /// True while in `synchronous = NORMAL`.
    relaxed: bool,
}

/// What the writer thread owns.
struct Thread {
    store: Store,
    /// The store's database file.
    file: PathBuf,
    runtime: Handle,
    conn: Option<Open>,
}

impl Thread {
    /// Runs batches until every sender is gone.
    fn run(&mut self, queue: &mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.batch(jobs);
        }
    }

    /// Runs one batch and answers each of its jobs.
    fn batch(&mut self, jobs: Vec<Job>) {
        let relax = !jobs.iter().any(|j| needs_durability(&j.op));
        let outcome = match self.connection(relax) {
            Ok(conn) => bulk::run_sqlite(conn, &jobs),
            Err(e) => return fail_all(jobs, &e.to_string()),
        };
        match outcome {
            Ok(results) => {
                count_batch("set");
                if jobs.len() == 1 {
                    answer_all(jobs, Ok(results));
                } else {
                    self.answer_on_runtime(jobs, results);
                }
            }
            Err(bulk::Fallback(why)) => {
                self.roll_back();
                tracing::debug!(reason = %why, operations = jobs.len(), "ledger batch runs one operation at a time");
                self.runtime
                    .block_on(run_sqlite_one_at_a_time(&self.store, jobs));
            }
        }
    }

    /// Answers a batch of several jobs from a task on the runtime, and returns once the
    /// callers it woke had their turn to run.
    ///
    /// Woken from this thread, every answer would go through the runtime's shared queue
    /// and might unpark a worker; from a task, they go to that worker's own queue. And
    /// callers that go on to their next ledger operation at once (a settle after a
    /// reserve, in the ledger bench) queue it before the next batch begins: without that
    /// wait, 32 calls in flight split into two alternating batches of about 16, each
    /// waiting for the other's fsync (7,600 settled calls/s against 8,900 with batches
    /// of 30 through the leader lock this writer replaced). The task yields once after
    /// answering, so the callers it woke run before it ends; this thread waits for it
    /// to end (or to be dropped, by a runtime shutting down).
    fn answer_on_runtime(&self, jobs: Vec<Job>, results: Vec<Result<i64, BillingError>>) {
        let (delivered, wait) = mpsc::channel::<()>();
        self.runtime.spawn(async move {
            answer_all(jobs, Ok(results));
            tokio::task::yield_now().await;
            drop(delivered);
        });
        // `Err` once the task ended: nothing is ever sent.
        let _ = wait.recv();
    }

    /// The writer's connection in the mode the batch needs (`NORMAL` when `relax`,
    /// `FULL` otherwise), opened first if there is none. A connection whose mode could
    /// not be set is closed (the next batch opens a new one).
    fn connection(&mut self, relax: bool) -> rusqlite::Result<&Connection> {
        let mut open = match self.conn.take() {
            Some(open) => open,
            None => Open {
                conn: open(&self.file)?,
                relaxed: false,
            },
        };
        if open.relaxed != relax {
            let mode = if relax { "NORMAL" } else { "FULL" };
            open.conn.pragma_update(None, "synchronous", mode)?;
            open.relaxed = relax;
        }
        Ok(&self.conn.insert(open).conn)
    }

    /// Rolls back whatever the failed batch left open; a connection still in a
    /// transaction afterwards is closed (the next batch opens a new one).
    fn roll_back(&mut self) {
        let Some(open) = &self.conn else { return };
        if !open.conn.is_autocommit() {
            // A failed `COMMIT` leaves the transaction open, as does a failed statement.
            let _ = open.conn.execute_batch("ROLLBACK");
            if !open.conn.is_autocommit() {
                self.conn = None;
            }
        }
    }
}

/// Opens the writer's connection to `file` (the store's database, already migrated and
/// in WAL mode), as the store's pool opens its own: foreign keys on, `synchronous =
/// FULL`, the same busy timeout.
fn open(file: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection's `synchronous` mode: 1 = NORMAL, 2 = FULL.
    fn mode(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |row| row.get(0))
            .expect("mode")
    }

    /// Each batch gets the mode it needs, whatever the batch before it needed, and a
    /// transaction a failed batch left open is rolled back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn each_batch_sets_its_own_durability_and_failures_are_rolled_back() {
        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let store = Store::connect(&url).await.expect("store");
        let mut thread = Thread {
            store: store.clone(),
            file: dir.path().join("w.db"),
            runtime: Handle::current(),
            conn: None,
        };
        for relax in [true, true, false, true, false, false] {
            let conn = thread.connection(relax).expect("connection");
            assert_eq!(mode(conn), if relax { 1 } else { 2 }, "relax: {relax}");
        }

        let conn = thread.connection(false).expect("connection");
        conn.execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO accounts (id, name, created_at) VALUES ('w1', 'w1', 0)",
        )
        .expect("an open transaction with a write");
        thread.roll_back();
        let conn = thread.connection(false).expect("the same connection");
        assert!(conn.is_autocommit());
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM accounts WHERE id = 'w1'", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(rows, 0, "the failed batch's write was rolled back");
        store.close().await;
    }

    /// A writer that cannot open its connection (here: its file's directory is gone)
    /// answers every operation of the batch with `BillingError::Commit` and writes
    /// nothing: the wallet is as it was and no call row exists.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_writer_that_cannot_open_its_file_fails_the_batch_and_writes_nothing() {
        use crate::billing::ledger::{Ledger, Reservation};
        use tokio::sync::oneshot;

        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let store = Store::connect(&url).await.expect("store");
        let ledger = Ledger::new(store.clone());
        let account = crate::auth::accounts::create_account(&store, "payer")
            .await
            .expect("account");
        ledger
            .topup(&account.id, 1_000_000, "grant")
            .await
            .expect("topup");
        let mut thread = Thread {
            store: store.clone(),
            file: dir.path().join("gone").join("w.db"),
            runtime: Handle::current(),
            conn: None,
        };
        let (reply, answer) = oneshot::channel();
        let reservation = Reservation {
            call_id: "c1".into(),
            account_id: account.id.clone(),
            key_id: "k1".into(),
            server_id: "s1".into(),
            tool: "t".into(),
            price_micros: 20_000,
            fee_bps: 3000,
            hold_expires_at: i64::MAX,
            spend_limits: Vec::new(),
            request_bytes: 10,
        };
        let job = Job {
            ledger: ledger.clone(),
            op: super::super::Op::Reserve(reservation),
            at: 0,
            reply,
        };
        tokio::task::spawn_blocking(move || thread.batch(vec![job]))
            .await
            .expect("the batch ran");
        assert!(matches!(
            answer.await.expect("an answer"),
            Err(BillingError::Commit(_))
        ));
        let balance = ledger.account_balance(&account.id).await.expect("balance");
        assert_eq!(balance.wallet_micros, 1_000_000);
        assert_eq!(balance.holds_micros, 0);
        let calls: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM calls")
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(calls, 0);
        store.close().await;
    }

    /// A batch that falls back to one operation at a time (here: a call id reserved
    /// twice) keeps the keys' spend counters as the set-wise form does: a reservation
    /// adds its price, a refund takes it back, a spend limit reads the counter as the
    /// operations before it left it, and `ledger verify` agrees with every counter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn one_operation_at_a_time_counts_the_keys_spend() {
        use crate::billing::ledger::{CallStats, Ledger, Outcome, Reservation};
        use tokio::sync::oneshot;

        let dir = tempfile::tempdir().expect("dir");
        let url = format!("sqlite://{}", dir.path().join("w.db").display());
        let store = Store::connect(&url).await.expect("store");
        // A clock that stays put: every operation falls in one day and one month.
        let clock = crate::billing::period::ManualClock::new(1_780_000_000_000);
        let ledger = Ledger::new(store.clone()).with_clock(std::sync::Arc::new(clock));
        let payer = crate::auth::accounts::create_account(&store, "payer")
            .await
            .expect("account");
        let owner = crate::auth::accounts::create_account(&store, "owner")
            .await
            .expect("account");
        ledger
            .topup(&payer.id, 1_000_000, "grant")
            .await
            .expect("topup");
        sqlx::query(
            "INSERT INTO servers (id, slug, name, owner_account_id, price_micros, status, secret, \
             timeout_ms, created_at, updated_at) VALUES ('s1', 's1', 's1', $1, 20000, 'active', 'x', 1000, 0, 0)",
        )
        .bind(&owner.id)
        .execute(store.pool())
        .await
        .expect("server");
        let p = 20_000;
        let reservation = |call_id: &str, limits: Vec<(i64, String)>| Reservation {
            call_id: call_id.into(),
            account_id: payer.id.clone(),
            key_id: "k1".into(),
            server_id: "s1".into(),
            tool: "t".into(),
            price_micros: p,
            fee_bps: 3000,
            hold_expires_at: i64::MAX,
            spend_limits: limits,
            request_bytes: 10,
        };
        // The key's limits: 2 calls a day, 10 a month.
        let limits = || vec![(2 * p, "day".to_owned()), (10 * p, "month".to_owned())];
        ledger
            .reserve(&reservation("c0", limits()))
            .await
            .expect("the first call, set-wise");

        let ops = [
            super::super::Op::Reserve(reservation("c1", limits())),
            super::super::Op::Reserve(reservation("c2", limits())),
            super::super::Op::Finish {
                call_id: "c0".into(),
                outcome: Outcome::Refunded,
                error_kind: Some("upstream_error".into()),
                stats: CallStats::default(),
            },
            super::super::Op::Reserve(reservation("c3", limits())),
            // A call id reserved twice (by another key, without limits).
            super::super::Op::Reserve(Reservation {
                key_id: "k2".into(),
                ..reservation("c1", Vec::new())
            }),
        ];
        let at = ledger.now_ms();
        let (mut jobs, mut answers) = (Vec::new(), Vec::new());
        for op in ops {
            let (reply, answer) = oneshot::channel();
            jobs.push(Job {
                ledger: ledger.clone(),
                op,
                at,
                reply,
            });
            answers.push(answer);
        }
        let mut thread = Thread {
            store: store.clone(),
            file: dir.path().join("w.db"),
            runtime: Handle::current(),
            conn: None,
        };
        tokio::task::spawn_blocking(move || thread.batch(jobs))
            .await
            .expect("the batch ran");
        let mut results = Vec::new();
        for answer in answers {
            results.push(answer.await.expect("an answer"));
        }
        assert!(results[0].is_ok(), "{results:?}");
        assert!(
            matches!(
                results[1],
                Err(BillingError::SpendLimit {
                    spent_micros,
                    ..
                }) if spent_micros == 2 * p
            ),
            "c0 and c1 fill the day's limit: {results:?}"
        );
        assert!(results[2].is_ok(), "{results:?}");
        assert!(results[3].is_ok(), "c0's refund made room: {results:?}");
        assert!(
            matches!(results[4], Err(BillingError::Store(_))),
            "{results:?}"
        );
        assert_eq!(ledger.key_spend("k1", "day").await.expect("spend"), 2 * p);
        assert_eq!(ledger.key_spend("k1", "month").await.expect("spend"), 2 * p);
        assert_eq!(ledger.verify().await.expect("verify"), Vec::<String>::new());
        store.close().await;
    }
}
