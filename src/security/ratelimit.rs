//! Rate limits (issue 3 item 2, DESIGN.md call path step 3): GCRA through the
//! `governor` crate, three limits checked for every `tools/call` before anything is
//! reserved:
//!
//! - per key (default `600/min`), and per account overall (default `600/min`), for
//!   every tool including the marketplace's own;
//! - per account per server (default `20/min`), for upstream tools.
//!
//! A rate `N/period` allows a burst of N and refills one call every period/N (so
//! `20/min` is a burst of 20, then one call every 3 s). Over a limit the caller gets
//! HTTP 429 with `Retry-After` and a JSON-RPC error of kind `rate_limited` (see
//! `gateway::limits`), and nothing is charged. Counters live in this process: with
//! several replicas each enforces the limit on the calls it serves.
//!
//! Which rate applies comes from [`Limits`], resolved per call by
//! `security::policy` (configured defaults, database overrides and any
//! [`AccountLimitSource`] such as billing plans). A limiter whose rate changes is
//! replaced, so overrides take effect on the next call.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::future::BoxFuture;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

/// Default per account per server (DESIGN.md: 20/min, burst 20).
pub const DEFAULT_PER_ACCOUNT_PER_SERVER: Rate = Rate::per(20, Period::Minute);
/// Default per account, all servers together.
pub const DEFAULT_PER_ACCOUNT: Rate = Rate::per(600, Period::Minute);
/// Default per key.
pub const DEFAULT_PER_KEY: Rate = Rate::per(600, Period::Minute);
/// Limiters unused this long are dropped (longer than any period, so no state is lost:
/// an idle limiter has refilled to a full burst).
const IDLE_EVICT: Duration = Duration::from_secs(2 * 3600);

/// The period of a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

impl Period {
    fn duration(self) -> Duration {
        match self {
            Self::Second => Duration::from_secs(1),
            Self::Minute => Duration::from_secs(60),
            Self::Hour => Duration::from_secs(3600),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Second => "sec",
            Self::Minute => "min",
            Self::Hour => "hour",
        }
    }
}

/// A rate limit: `N/sec`, `N/min`, `N/hour` (N from 1 to 1 000 000), or `off`
/// (DESIGN.md "Configuration file" `[rate_limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// No limit.
    Off,
    /// At most `n` per `period`, burst `n`.
    Per {
        /// Calls per period (≥ 1).
        n: u32,
        /// The period.
        period: Period,
    },
}

/// A rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate '{0}' (expected N/sec, N/min, N/hour with N from 1 to 1000000, or off)")]
pub struct RateError(pub String);

impl Rate {
    /// `n` per `period` (`n` ≥ 1).
    pub const fn per(n: u32, period: Period) -> Self {
        Self::Per { n, period }
    }

    fn quota(self) -> Option<Quota> {
        let Self::Per { n, period } = self else {
            return None;
        };
        let n = NonZeroU32::new(n)?;
        Quota::with_period(period.duration() / n.get()).map(|q| q.allow_burst(n))
    }
}

impl FromStr for Rate {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Self, RateError> {
        let bad = || RateError(s.chars().take(40).collect());
        let t = s.trim();
        if t.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let (n, period) = t.split_once('/').ok_or_else(bad)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 7 {
            return Err(bad());
        }
        let n: u32 = n.parse().map_err(|_| bad())?;
        if !(1..=1_000_000).contains(&n) {
            return Err(bad());
        }
        let period = match period.trim() {
            "s" | "sec" | "second" => Period::Second,
            "m" | "min" | "minute" => Period::Minute,
            "h" | "hour" => Period::Hour,
            _ => return Err(bad()),
        };
        Ok(Self::Per { n, period })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Per { n, period } => write!(f, "{n}/{}", period.as_str()),
        }
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The three limits that apply to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per key.
    pub per_key: Rate,
    /// Per account, all servers together.
    pub per_account: Rate,
    /// Per account for the called server.
    pub per_account_per_server: Rate,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_key: DEFAULT_PER_KEY,
            per_account: DEFAULT_PER_ACCOUNT,
            per_account_per_server: DEFAULT_PER_ACCOUNT_PER_SERVER,
        }
    }
}

/// Per-account limits from a source other than the configuration and the database's
/// overrides, e.g. a billing plan. `None` fields leave the default in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountLimits {
    /// Replaces the per-account limit.
    pub per_account: Option<Rate>,
    /// Replaces the per-account-per-server limit.
    pub per_account_per_server: Option<Rate>,
    /// Replaces the per-key limit of the account's keys.
    pub per_key: Option<Rate>,
}

/// A source of per-account limits (billing plans plug in here: implement it and hand
/// it to `App::set_account_limit_source`). Consulted on every `tools/call`; an
/// account's own database override still wins over it.
pub trait AccountLimitSource: Send + Sync + fmt::Debug {
    /// The limits of `account_id`, or defaults when it has none.
    fn account_limits<'a>(&'a self, account_id: &'a str) -> BoxFuture<'a, AccountLimits>;
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The key's limit.
    Key,
    /// The account's overall limit.
    Account,
    /// The account's limit on one server.
    AccountServer,
}

impl Scope {
    /// `per_key`, `per_account` or `per_account_per_server` (as in the configuration).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "per_key",
            Self::Account => "per_account",
            Self::AccountServer => "per_account_per_server",
        }
    }
}

/// A refused call: which limit, its rate, and when a call would pass again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The limit that refused.
    pub scope: Scope,
    /// Its rate.
    pub rate: Rate,
    /// Wait before retrying.
    pub retry_after: Duration,
}

impl Refusal {
    /// `Retry-After` in whole seconds, rounded up, at least 1 (RFC 9110 §10.2.3).
    pub fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)).max(1)
    }
}

/// What one limiter counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Counted {
    Key(String),
    Account(String),
    AccountServer(String, String),
}

struct Entry {
    rate: Rate,
    limiter: Arc<DefaultDirectRateLimiter>,
    last_used: Instant,
}

/// The limiters of this process. Cheap to share (`&self` everywhere).
pub struct RateLimiter {
    limiters: DashMap<Counted, Entry>,
    clock: DefaultClock,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limiters", &self.limiters.len())
            .finish()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self {
            limiters: DashMap::new(),
            clock: DefaultClock::default(),
        }
    }
}

impl RateLimiter {
    /// Checks (and on success consumes) one call of `key_id` of `account_id`, on
    /// `server_id` when the tool is an upstream's, against `limits`: the key's limit
    /// first, then the account's, then the account's on the server. A call refused by a
    /// later limit has still used its place in the earlier ones (GCRA cannot check
    /// several limiters atomically); a refused call is never charged.
    ///
    /// # Errors
    /// The first [`Refusal`].
    pub fn check(
        &self,
        key_id: &str,
        account_id: &str,
        server_id: Option<&str>,
        limits: &Limits,
    ) -> Result<(), Refusal> {
        self.check_one(Counted::Key(key_id.to_owned()), Scope::Key, limits.per_key)?;
        self.check_one(
            Counted::Account(account_id.to_owned()),
            Scope::Account,
            limits.per_account,
        )?;
        if let Some(server_id) = server_id {
            self.check_one(
                Counted::AccountServer(account_id.to_owned(), server_id.to_owned()),
                Scope::AccountServer,
                limits.per_account_per_server,
            )?;
        }
        Ok(())
    }

    fn check_one(&self, key: Counted, scope: Scope, rate: Rate) -> Result<(), Refusal> {
        let Some(quota) = rate.quota() else {
            return Ok(());
        };
        let limiter = {
            let mut entry = self.limiters.entry(key).or_insert_with(|| Entry {
                rate,
                limiter: Arc::new(governor::RateLimiter::direct(quota)),
                last_used: Instant::now(),
            });
            if entry.rate != rate {
                // The override changed: start the new rate from a full burst.
                entry.rate = rate;
                entry.limiter = Arc::new(governor::RateLimiter::direct(quota));
            }
            entry.last_used = Instant::now();
            entry.limiter.clone()
        };
        limiter.check().map_err(|not_until| Refusal {
            scope,
            rate,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Drops limiters unused for two hours (they have refilled completely). Returns how
    /// many.
    pub fn evict_idle(&self) -> usize {
        let before = self.limiters.len();
        self.limiters
            .retain(|_, e| e.last_used.elapsed() < IDLE_EVICT);
        before - self.limiters.len()
    }

    /// Number of live limiters.
    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    /// True when no limiter is live.
    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}

/// Per-server concurrency caps (issue 3 item 5): at most `cap` calls of one server in
/// flight in this process. A call over the cap is refused at once, before anything is
/// reserved (`upstream_unavailable`, retry after 1 s), rather than queued: a queue
/// would only move the wait into the server's timeout. When a server's cap changes,
/// calls already in flight finish under the old one.
#[derive(Debug, Default)]
pub struct ConcurrencyCaps {
    servers: DashMap<String, (u32, Arc<tokio::sync::Semaphore>)>,
}

impl ConcurrencyCaps {
    /// A permit for one call to `server_id` under `cap` (held until dropped), or `None`
    /// when `cap` calls are in flight.
    pub fn try_acquire(
        &self,
        server_id: &str,
        cap: u32,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = {
            let mut entry = self
                .servers
                .entry(server_id.to_owned())
                .or_insert_with(|| (cap, Arc::new(tokio::sync::Semaphore::new(cap as usize))));
            if entry.0 != cap {
                *entry = (cap, Arc::new(tokio::sync::Semaphore::new(cap as usize)));
            }
            entry.1.clone()
        };
        semaphore.try_acquire_owned().ok()
    }

    /// Calls of `server_id` in flight under its current cap.
    pub fn in_flight(&self, server_id: &str) -> usize {
        self.servers
            .get(server_id)
            .map(|e| e.0 as usize - e.1.available_permits())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_caps_refuse_past_the_cap() {
        let caps = ConcurrencyCaps::default();
        let a = caps.try_acquire("s", 2).unwrap();
        let _b = caps.try_acquire("s", 2).unwrap();
        assert!(caps.try_acquire("s", 2).is_none());
        assert_eq!(caps.in_flight("s"), 2);
        drop(a);
        assert!(caps.try_acquire("s", 2).is_some());
        assert!(caps.try_acquire("other", 1).is_some());
    }

    #[test]
    fn parses_rates() {
        assert_eq!("20/min".parse(), Ok(Rate::per(20, Period::Minute)));
        assert_eq!("5/sec".parse(), Ok(Rate::per(5, Period::Second)));
        assert_eq!("100/hour".parse(), Ok(Rate::per(100, Period::Hour)));
        assert_eq!("OFF".parse(), Ok(Rate::Off));
        for bad in [
            "",
            "0/min",
            "-1/min",
            "1.5/min",
            "20/day",
            "20",
            "/min",
            "99999999/min",
            "2e1/min",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(Rate::per(20, Period::Minute).to_string(), "20/min");
    }

    #[test]
    fn refuses_past_the_burst_and_says_when_to_retry() {
        let limiter = RateLimiter::default();
        let limits = Limits {
            per_key: Rate::Off,
            per_account: Rate::Off,
            per_account_per_server: Rate::per(3, Period::Minute),
        };
        for _ in 0..3 {
            limiter.check("k", "a", Some("s"), &limits).unwrap();
        }
        let refusal = limiter.check("k", "a", Some("s"), &limits).unwrap_err();
        assert_eq!(refusal.scope, Scope::AccountServer);
        assert!(
            (19..=20).contains(&refusal.retry_after_secs()),
            "{refusal:?}"
        );
        // Another server, and the marketplace's own tools, are not affected.
        limiter.check("k", "a", Some("t"), &limits).unwrap();
        limiter.check("k", "a", None, &limits).unwrap();
        // A changed rate applies at once.
        let more = Limits {
            per_account_per_server: Rate::per(10, Period::Minute),
            ..limits
        };
        limiter.check("k", "a", Some("s"), &more).unwrap();
    }
}
