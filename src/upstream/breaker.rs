//! Circuit breakers, one per endpoint of every server (issue 4 item 3), and the choice
//! of endpoint for each attempt of a call (item 4).
//!
//! A breaker is a small state machine (after linkerd's consecutive-failures breaker):
//!
//! - **closed** → **open** after [`BreakerConfig::consecutive_failures`] failures in a
//!   row, or when at least [`BreakerConfig::failure_rate_percent`] % of the last
//!   [`BreakerConfig::window`] calls failed (counted once the window holds
//!   [`BreakerConfig::min_calls`]);
//! - **open** rejects every call (the call path answers `upstream_unavailable` before
//!   reserving, so nothing is charged) for a backoff of [`BreakerConfig::open_base`],
//!   doubled at each reopening, capped at [`BreakerConfig::open_max`];
//! - then **half-open**: exactly one trial call is let through; its success closes the
//!   breaker (and resets the backoff), its failure reopens it with the next backoff.
//!
//! A failure is what says the endpoint is unwell: no connection, timeout, HTTP ≥ 500,
//! a broken or invalid answer. A JSON-RPC error or an `isError` result is an answer,
//! so it counts as a success here.
//!
//! Breakers live in the memory of one process: each replica learns for itself, which
//! is what a breaker is for. Each state change sets the gauge
//! `mcp_marketplace_breaker_state{server, endpoint}` (0 closed, 1 half-open, 2 open).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::catalog::Server;

/// The settings of every breaker (the defaults are the documented ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures in a row that open a closed breaker (default 5).
    pub consecutive_failures: u32,
    /// Calls remembered for the failure rate (default 20).
    pub window: usize,
    /// Calls the window must hold before the rate counts (default 10).
    pub min_calls: usize,
    /// Failure rate, percent, that opens the breaker (default 50).
    pub failure_rate_percent: u32,
    /// First open period (default 10 s).
    pub open_base: Duration,
    /// Longest open period (default 5 min).
    pub open_max: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            window: 20,
            min_calls: 10,
            failure_rate_percent: 50,
            open_base: Duration::from_secs(10),
            open_max: Duration::from_secs(300),
        }
    }
}

/// A breaker's state, as the gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// One trial call may flow (or is flowing).
    HalfOpen,
    /// Calls are refused until the open period ends.
    Open,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { trial_out: bool },
}

#[derive(Debug)]
struct Breaker {
    state: State,
    consecutive: u32,
    recent: VecDeque<bool>,
    /// Openings since the last close, for the backoff.
    opens: u32,
}

impl Breaker {
    fn new() -> Self {
        Self {
            state: State::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
            opens: 0,
        }
    }

    fn public(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call could be let through now (no state change).
    fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { trial_out } => !trial_out,
        }
    }

    /// Lets a call through if possible; `Some(trial)` when it may go.
    fn admit(&mut self, now: Instant) -> Option<bool> {
        match self.state {
            State::Closed => Some(false),
            // The open period is over: this call is the single trial.
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { trial_out: true };
                Some(true)
            }
            State::Open { .. } => None,
            State::HalfOpen { trial_out: false } => {
                self.state = State::HalfOpen { trial_out: true };
                Some(true)
            }
            State::HalfOpen { trial_out: true } => None,
        }
    }

    fn open(&mut self, cfg: &BreakerConfig, now: Instant) {
        let factor = 2u32.saturating_pow(self.opens.min(16));
        let period = cfg.open_base.saturating_mul(factor).min(cfg.open_max);
        self.opens = self.opens.saturating_add(1);
        self.state = State::Open {
            until: now + period,
        };
    }

    fn record(&mut self, cfg: &BreakerConfig, ok: Option<bool>, trial: bool, now: Instant) {
        match (&self.state, ok) {
            // A trial that ended without a verdict (cancelled, never sent): let another
            // call be the trial.
            (State::HalfOpen { .. }, None) if trial => {
                self.state = State::HalfOpen { trial_out: false };
            }
            // The trial succeeded: close, forget the past.
            (State::HalfOpen { .. }, Some(true)) if trial => {
                self.state = State::Closed;
                self.consecutive = 0;
                self.recent.clear();
                self.opens = 0;
            }
            // The trial failed: reopen for longer.
            (State::HalfOpen { .. }, Some(false)) if trial => self.open(cfg, now),
            (State::Closed, Some(ok)) => {
                self.recent.push_back(ok);
                while self.recent.len() > cfg.window.max(1) {
                    self.recent.pop_front();
                }
                if ok {
                    self.consecutive = 0;
                    return;
                }
                self.consecutive += 1;
                let failures = self.recent.iter().filter(|ok| !**ok).count();
                let rate_tripped = self.recent.len() >= cfg.min_calls.max(1)
                    && failures * 100 >= self.recent.len() * cfg.failure_rate_percent as usize;
                // Too many failures in a row, or too high a rate: open.
                if self.consecutive >= cfg.consecutive_failures.max(1) || rate_tripped {
                    self.consecutive = 0;
                    self.recent.clear();
                    self.open(cfg, now);
                }
            }
            // Verdicts of calls admitted before the breaker opened change nothing.
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct Endpoint {
    breaker: Mutex<Option<Breaker>>,
    in_flight: AtomicUsize,
}

/// Every endpoint's breaker and load, and the round-robin counter per server.
#[derive(Debug, Default)]
pub struct Breakers {
    config: BreakerConfig,
    endpoints: DashMap<(String, usize), Arc<Endpoint>>,
    turns: DashMap<String, AtomicU64>,
}

impl Breakers {
    /// Breakers with `config`.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    fn endpoint(&self, server_id: &str, position: usize) -> Arc<Endpoint> {
        let key = (server_id.to_owned(), position);
        if let Some(e) = self.endpoints.get(&key) {
            return e.clone();
        }
        self.endpoints.entry(key).or_default().clone()
    }

    /// The state of the breaker of `server_id`'s endpoint at `position`.
    pub fn state(&self, server_id: &str, position: usize) -> BreakerState {
        let now = Instant::now();
        self.endpoints
            .get(&(server_id.to_owned(), position))
            .and_then(|e| {
                e.breaker
                    .lock()
                    .ok()
                    .and_then(|b| b.as_ref().map(|b| b.public(now)))
            })
            .unwrap_or(BreakerState::Closed)
    }

    /// True when some endpoint of `server` would let a call through now (step 4 of
    /// the call path, before reserving). Changes nothing.
    pub fn any_available(&self, server: &Server) -> bool {
        let now = Instant::now();
        (0..server.endpoints.len()).any(|p| {
            self.endpoints
                .get(&(server.id.clone(), p))
                .and_then(|e| {
                    e.breaker
                        .lock()
                        .ok()
                        .map(|b| b.as_ref().is_none_or(|b| b.available(now)))
                })
                .unwrap_or(true)
        })
    }

    /// Picks the endpoint of `server` for the next attempt: among endpoints whose
    /// breaker lets a call through, those not in `avoid` first (failover), then the
    /// least loaded (calls in flight), ties broken round-robin. `None` when every
    /// breaker refuses. The permit counts the call as in flight until it is dropped;
    /// report the outcome with [`Permit::success`] or [`Permit::failure`].
    pub fn acquire(&self, server: &Server, avoid: &[usize]) -> Option<Permit> {
        let n = server.endpoints.len();
        if n == 0 {
            return None;
        }
        let turn = self
            .turns
            .entry(server.id.clone())
            .or_default()
            .fetch_add(1, Ordering::Relaxed) as usize;
        let now = Instant::now();
        let mut candidates: Vec<(bool, usize, usize, usize, Arc<Endpoint>)> = (0..n)
            .map(|p| {
                let e = self.endpoint(&server.id, p);
                let load = e.in_flight.load(Ordering::Relaxed);
                (avoid.contains(&p), load, (p + n - turn % n) % n, p, e)
            })
            .collect();
        candidates.sort_by_key(|(avoided, load, rr, _, _)| (*avoided, *load, *rr));
        for (_, _, _, position, e) in candidates {
            let admitted = {
                let Ok(mut guard) = e.breaker.lock() else {
                    continue;
                };
                let b = guard.get_or_insert_with(Breaker::new);
                let before = b.public(now);
                let admitted = b.admit(now);
                let after = b.public(now);
                if before != after {
                    gauge(&server.slug, position, after);
                }
                admitted
            };
            if let Some(trial) = admitted {
                e.in_flight.fetch_add(1, Ordering::Relaxed);
                return Some(Permit {
                    endpoint: e,
                    config: self.config,
                    slug: server.slug.clone(),
                    position,
                    trial,
                    done: false,
                });
            }
        }
        None
    }
}

fn gauge(slug: &str, position: usize, state: BreakerState) {
    metrics::gauge!(
        "mcp_marketplace_breaker_state",
        "server" => slug.to_owned(),
        "endpoint" => position.to_string(),
    )
    .set(state.gauge());
    if state == BreakerState::Open {
        tracing::warn!(server = %slug, endpoint = position, "circuit breaker opened");
    }
}

/// One attempt's claim on an endpoint: in flight until dropped. Dropped without a
/// verdict (cancelled, never sent), it frees a half-open trial for another call.
#[derive(Debug)]
pub struct Permit {
    endpoint: Arc<Endpoint>,
    config: BreakerConfig,
    slug: String,
    /// The endpoint's position in the server's endpoint list.
    pub position: usize,
    trial: bool,
    done: bool,
}

impl Permit {
    /// The endpoint answered.
    pub fn success(mut self) {
        self.finish(Some(true));
    }

    /// The endpoint failed (transport, timeout, HTTP ≥ 500, invalid answer).
    pub fn failure(mut self) {
        self.finish(Some(false));
    }

    fn finish(&mut self, ok: Option<bool>) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        if let Ok(mut guard) = self.endpoint.breaker.lock() {
            let b = guard.get_or_insert_with(Breaker::new);
            let before = b.public(now);
            b.record(&self.config, ok, self.trial, now);
            let after = b.public(now);
            if before != after {
                gauge(&self.slug, self.position, after);
            }
        }
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(n: usize) -> Server {
        Server {
            id: "s1".into(),
            slug: "s".into(),
            name: "s".into(),
            description: String::new(),
            categories: vec![],
            owner_account_id: "o".into(),
            price_micros: 0,
            tool_prices: Default::default(),
            status: crate::catalog::ServerStatus::Active,
            timeout_ms: 1000,
            endpoints: (0..n)
                .map(|i| format!("http://127.0.0.1:{}/mcp", 1000 + i))
                .collect(),
            created_at: 0,
            listed: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_one_trial_closes_it() {
        let b = Breakers::new(BreakerConfig::default());
        let s = server(1);
        for _ in 0..5 {
            b.acquire(&s, &[]).expect("closed").failure();
        }
        assert_eq!(b.state("s1", 0), BreakerState::Open);
        assert!(b.acquire(&s, &[]).is_none(), "open refuses");
        assert!(!b.any_available(&s));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.any_available(&s));
        let trial = b.acquire(&s, &[]).expect("the trial");
        assert!(b.acquire(&s, &[]).is_none(), "a single trial");
        trial.success();
        assert_eq!(b.state("s1", 0), BreakerState::Closed);
        assert!(b.acquire(&s, &[]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_doubles_the_open_period() {
        let b = Breakers::new(BreakerConfig::default());
        let s = server(1);
        for _ in 0..5 {
            b.acquire(&s, &[]).unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        b.acquire(&s, &[]).expect("trial").failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.state("s1", 0), BreakerState::Open, "20 s now");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.state("s1", 0), BreakerState::HalfOpen);
        // A trial dropped without a verdict frees the slot.
        drop(b.acquire(&s, &[]).expect("trial"));
        assert!(b.acquire(&s, &[]).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_rate_opens_it_too() {
        let b = Breakers::new(BreakerConfig::default());
        let s = server(1);
        for i in 0..11 {
            let p = b.acquire(&s, &[]).unwrap();
            if i % 2 == 0 { p.failure() } else { p.success() }
        }
        assert_eq!(b.state("s1", 0), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_are_shared_and_avoided() {
        let b = Breakers::new(BreakerConfig::default());
        let s = server(2);
        let first = b.acquire(&s, &[]).unwrap();
        let second = b.acquire(&s, &[]).unwrap();
        assert_ne!(first.position, second.position, "least loaded");
        let p = first.position;
        drop(first);
        drop(second);
        assert_ne!(b.acquire(&s, &[p]).unwrap().position, p, "failover avoids");
        for _ in 0..5 {
            let p = b.acquire(&s, &[1]).unwrap();
            assert_eq!(p.position, 0);
            p.failure();
        }
        assert_eq!(
            b.acquire(&s, &[]).unwrap().position,
            1,
            "open endpoint skipped"
        );
    }
}
