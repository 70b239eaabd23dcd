//! The store: one sqlx connection pool over SQLite (embedded default) or PostgreSQL,
//! migrations applied at connect, and the transaction helper every domain uses.
//!
//! Each domain owns its SQL (`billing::ledger` the ledger's, `catalog` the catalog's);
//! this module owns only the pool. Queries are written once for both backends through
//! sqlx's `Any` driver: placeholders are `$1, $2, …` (which SQLite accepts as numbered
//! parameters as long as each first appears in order), integers are 64-bit, times are
//! Unix epoch milliseconds and money is integer micros.

pub mod versions;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

pub use versions::{Domain, Versions};

/// How long a caller waits for a pooled connection before [`StoreError::Database`].
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// PostgreSQL pool size; SQLite uses one connection (see [`Store::connect`]).
const POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// SQLite waits this long (10 s) on a locked database file before failing.
const SQLITE_BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000";

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("unsupported database URL (expected sqlite://FILE or postgres://…)")]
    UnsupportedUrl,
    /// An in-memory SQLite database (`sqlite::memory:`, `mode=memory`): the ledger's
    /// writer opens a second connection to the store's file, and a ledger must outlive
    /// the process.
    #[error("an in-memory SQLite database is not supported (give a file: sqlite://FILE)")]
    InMemory,
    /// Connecting, querying or committing failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Which database engine a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file in WAL mode.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A pool of database connections with the schema migrated. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite: the database file.
    sqlite_file: Option<PathBuf>,
    versions: Arc<Versions>,
}

/// A database transaction; commit it with `tx.commit().await`, or drop it to roll back.
pub type Tx<'c> = Transaction<'c, Any>;

impl Store {
    /// Connects to `url` (`sqlite://FILE`, created if missing, or `postgres://…`) and
    /// applies the migrations of `migrations/sqlite` or `migrations/postgres`.
    ///
    /// SQLite runs in WAL mode with one pooled connection (SQLite serializes writers
    /// anyway); the ledger's writer thread opens a second one to the same file for the
    /// call path's batches (`billing::ledger`, group/writer.rs). Every transaction of the
    /// pool begins `IMMEDIATE` ([`Store::begin`]).
    ///
    /// # Errors
    /// [`StoreError::UnsupportedUrl`] for another scheme, [`StoreError::InMemory`] for an
    /// in-memory SQLite database, [`StoreError::Database`] when
    /// the database cannot be opened, [`StoreError::Migrate`] when a migration fails.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let sqlite_file = match backend {
            Backend::Sqlite => {
                if url.contains(":memory:") || url.contains("mode=memory") {
                    return Err(StoreError::InMemory);
                }
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?;
                Some(options.get_filename().to_owned())
            }
            Backend::Postgres => None,
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = match backend {
            Backend::Sqlite => {
                AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    // The connection is a file handle in this process, not a socket that
                    // can drop: no ping (a round trip to sqlx's worker thread) before each
                    // use.
                    .test_before_acquire(false)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            // FULL: a commit returns only once the WAL is fsynced, so
                            // a settled call survives a power loss, not only a crash
                            // (NORMAL syncs at checkpoints only). The ledger's group
                            // commit (billing::ledger, group.rs) shares one fsync
                            // among a batch of calls.
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute(SQLITE_BUSY_TIMEOUT).await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(POSTGRES_MAX_CONNECTIONS)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_with(options)
                    .await?
            }
        };
        match backend {
            Backend::Sqlite => SQLITE_MIGRATOR.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATOR.run(&pool).await?,
        }
        let versions = Arc::new(Versions::new(pool.clone()));
        Ok(Self {
            pool,
            backend,
            sqlite_file,
            versions,
        })
    }

    /// The connection pool, for single-statement reads and writes.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The snapshot change versions of this store's database, shared by every clone of
    /// the store (see [`versions`]): writers call `invalidate`, snapshots read
    /// `generation`.
    pub fn versions(&self) -> &Arc<Versions> {
        &self.versions
    }

    /// The engine behind this store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The SQLite database file (`None` on PostgreSQL).
    pub fn sqlite_file(&self) -> Option<&Path> {
        self.sqlite_file.as_deref()
    }

    /// Begins a transaction; on SQLite with `BEGIN IMMEDIATE`, which takes the
    /// database's write lock before the first read (waiting up to the busy timeout,
    /// 10 s): the ledger's writer holds a second connection to the file, and a deferred
    /// transaction that read before that writer committed would fail with
    /// `SQLITE_BUSY_SNAPSHOT` when it then writes (<https://sqlite.org/lang_transaction.html>).
    ///
    /// # Errors
    /// [`StoreError::Database`] when no connection can be had or `BEGIN` fails (the
    /// write lock stayed taken past the busy timeout).
    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Runs `SELECT 1`: the readiness check of `GET /readyz`.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the database does not answer.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection (waits for checked-out ones to return).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The current time as Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// True when `err` is a unique-constraint violation (SQLite `UNIQUE constraint failed`,
/// PostgreSQL SQLSTATE 23505).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code()
                .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
                || db.message().contains("UNIQUE constraint failed")
        }
        _ => false,
    }
}

/// True when `err` is a CHECK-constraint violation (SQLite `CHECK constraint failed`,
/// PostgreSQL SQLSTATE 23514).
pub fn is_check_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c == "23514" || c == "275")
                || db.message().contains("CHECK constraint failed")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ledger writer opens the store's file a second time, so an in-memory
    /// database is refused with its own error, not opened twice as two databases.
    #[tokio::test]
    async fn an_in_memory_sqlite_database_is_refused() {
        for url in ["sqlite::memory:", "sqlite://ledger.db?mode=memory"] {
            assert!(
                matches!(Store::connect(url).await, Err(StoreError::InMemory)),
                "{url}"
            );
        }
    }
}
