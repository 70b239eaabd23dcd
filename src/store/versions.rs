//! Change versions of the in-memory snapshots (issue 7 item 2).
//!
//! The hot path serves the catalog (servers, prices, tools, installs) and the auth data
//! (keys, trust policies, credentials, plans) from in-memory snapshots. Each snapshot
//! belongs to a [`Domain`] and remembers the [`Versions::generation`] it was built at;
//! it is rebuilt when the generation moved. The generation moves when:
//!
//! - this process wrote the domain's data: the writer calls [`Versions::invalidate`]
//!   right after its commit, so the change takes effect on the very next request;
//! - another process wrote it (the CLI on the same database, another replica): triggers
//!   (migration `0010_snapshots.sql`) bump the domain's row of `snapshot_versions` on
//!   every write to its tables, and the poller ([`Versions::run_poller`], every
//!   [`POLL_INTERVAL`] = 250 ms) bumps the generation when it sees the row change.
//!
//! The rule this gives (DESIGN.md "Health and trust", issue 7): **a change made through
//! this process is seen by its next request; a change written by any other process is
//! seen by every marketplace process within one second** (one poll interval plus the
//! poll's query, far below 1 s).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{AnyPool, Row};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// How often [`Versions::run_poller`] reads `snapshot_versions` (250 ms), so a write by
/// another process reaches every cache within one second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// A group of tables one snapshot is built from (a row of `snapshot_versions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    /// servers (the columns the call path reads), server_endpoints, upstream_tools,
    /// tool_prices, price_changes, installs, install_tools, tool_pins.
    Catalog,
    /// accounts, api_keys, trust_policies, server_credentials, account_plans.
    Auth,
}

impl Domain {
    /// Every domain.
    pub const ALL: [Domain; 2] = [Domain::Catalog, Domain::Auth];

    /// The domain's row name in `snapshot_versions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Catalog => "catalog",
            Self::Auth => "auth",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Catalog => 0,
            Self::Auth => 1,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// The in-process generation of each [`Domain`]: a counter that only grows, moved by
/// local writes ([`Versions::invalidate`]) and by the database's change versions
/// ([`Versions::poll_once`]). See the module documentation for the ≤ 1 s rule.
#[derive(Debug)]
pub struct Versions {
    pool: AnyPool,
    generations: [AtomicU64; 2],
    /// The database versions last seen by [`Versions::poll_once`] (`None`: not yet).
    seen: Mutex<[Option<i64>; 2]>,
}

impl Versions {
    /// Versions over the database of `pool` (the store's).
    pub fn new(pool: AnyPool) -> Self {
        Self {
            pool,
            generations: [AtomicU64::new(1), AtomicU64::new(1)],
            seen: Mutex::new([None, None]),
        }
    }

    /// The current generation of `domain` (one atomic load). A snapshot built after
    /// reading generation `g` is current while this still returns `g`.
    pub fn generation(&self, domain: Domain) -> u64 {
        self.generations[domain.index()].load(Ordering::Acquire)
    }

    /// Records that this process just committed a write to `domain`'s tables: every
    /// snapshot of the domain is rebuilt on its next read. Call it after the commit.
    pub fn invalidate(&self, domain: Domain) {
        self.generations[domain.index()].fetch_add(1, Ordering::AcqRel);
    }

    /// Reads `snapshot_versions` once (`SELECT name, version`) and bumps the generation
    /// of every domain whose database version changed since the last poll (or that is
    /// seen for the first time). Returns the domains bumped.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the query fails.
    pub async fn poll_once(&self) -> Result<Vec<Domain>, StoreError> {
        let rows = sqlx::query("SELECT name, version FROM snapshot_versions")
            .fetch_all(&self.pool)
            .await?;
        let mut bumped = Vec::new();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let name: String = row.try_get(0)?;
            let version: i64 = row.try_get(1)?;
            let Some(domain) = Domain::parse(&name) else {
                continue;
            };
            let slot = &mut seen[domain.index()];
            if *slot != Some(version) {
                *slot = Some(version);
                self.invalidate(domain);
                bumped.push(domain);
            }
        }
        Ok(bumped)
    }

    /// Polls every [`POLL_INTERVAL`] until `shutdown` is cancelled (the app spawns it).
    /// A failed poll is logged and retried at the next tick.
    pub async fn run_poller(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.poll_once().await {
                tracing::warn!(error = %e, "cannot read the snapshot versions");
            }
        }
    }
}
