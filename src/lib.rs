//! # mcp-marketplace
//!
//! One MCP URL for every paid MCP server. The marketplace is itself a streamable-HTTP
//! MCP server: it merges the tools of the upstream servers an account installed under
//! `{slug}__{tool}` names, forwards each `tools/call` to the upstream over JSON-RPC, and
//! meters it with a double-entry ledger debit that is refunded when the call fails.
//!
//! The map of the house (see `../shared/DESIGN.md` for the product contract):
//!
//! | module | job |
//! | --- | --- |
//! | [`alerts`] | the transactional alert outbox and its delivery (signed webhooks, SMTP, retries): server status changes, tool changes, incidents, low balances, weekly digests |
//! | [`gateway`] | the downstream MCP server: `/mcp` and `/servers/{slug}/mcp`, their sessions ([`gateway::session`]), tool listing, the call path ([`gateway::call`]) |
//! | [`upstream`] | upstream MCP sessions per (account, server, endpoint), forwarding with failover and safe retries, tool-list fetches; health probes, the status machine, circuit breakers |
//! | [`billing`] | prices in micros, the two-phase ledger, plans and quotas, the usage log, invoices, payouts, Stripe top-ups, low-balance alerts, signed receipts |
//! | [`auth`] | accounts, API keys and scopes, the Ed25519 signing key and upstream tokens |
//! | [`security`] | the trust layer: SSRF policy and resolver, rate limits, concurrency caps, trust policies, encrypted upstream credentials, response scanning and redaction, the audit log (see `SECURITY.md`) |
//! | [`catalog`] | servers, endpoints, prices and price history, status, cached tools and their namespaced names, tool pinning, installs, `tools-catalog/` manifests, search, reviews, reputation, creator analytics |
//! | [`market`] | the marketplace's workflows over those: registration with its verification probe, server views, `servers sync` |
//! | [`store`] | the sqlx pool (SQLite or PostgreSQL), migrations, transactions |
//! | [`api`] | the REST API (`/api/v1/…`) |
//! | [`config`] | flags, TOML file and `MCP_MARKETPLACE_*` variables |
//! | [`telemetry`] | Prometheus `/metrics` (one recorder per process) and the metric names |
//! | [`app`] | the composition root: services, router, background tasks, shutdown |
//! | [`cli`] | the `mcp-marketplace` command line |
//! | [`demo`] | `mcp-marketplace demo` and the example upstream servers of `examples/` |

#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod app;
pub mod auth;
pub mod billing;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod market;
pub mod security;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod upstream;

/// The global allocator of this package's programs: jemalloc (`tikv-jemallocator`). The
/// binary (src/main.rs), the load benchmarks (`examples/loadbench.rs`,
/// `examples/sessions.rs`) and the micro-benchmarks (`benches/hot_path.rs`) each
/// declare `#[global_allocator] static ALLOCATOR: Allocator = ALLOCATOR;`, so what is
/// measured allocates as what ships; the library itself and the test binaries leave
/// the allocator to the program (the system's).
///
/// Why: a call, a `tools/list` and a session allocate many small values, and glibc's
/// malloc spent about a third of a 10,000-tool listing in its own bookkeeping. With
/// jemalloc that listing builds in 5.6 ms instead of 15.5 ms, the call rate is
/// unchanged within noise and 1,000 open sessions hold about the same resident memory
/// (README "Performance"; mimalloc was as fast but held 50 % more with its defaults).
pub type Allocator = tikv_jemallocator::Jemalloc;

/// The [`Allocator`] value a program installs.
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// Turns on jemalloc's background threads (the `background_thread` option, jemalloc's
/// TUNING.md), so that memory freed after a burst (closed connections, ended sessions)
/// goes back to the OS after jemalloc's decay time (`dirty_decay_ms`, 10 s) even while
/// the process is idle, and is returned by a thread of jemalloc's own rather than
/// during later allocations on a request's path. Without them an idle marketplace kept
/// the pages of 1,000 closed connections resident (README "Performance"). For programs
/// that installed [`ALLOCATOR`]; idempotent.
///
/// # Errors
/// jemalloc's `mallctl` error when it cannot start them (for example a jemalloc built
/// without threads); the program runs on as before.
pub fn start_allocator_purging() -> Result<(), tikv_jemalloc_ctl::Error> {
    tikv_jemalloc_ctl::background_thread::write(true)
}

/// Installs rustls' ring crypto provider for this process (idempotent). Every HTTP
/// client the marketplace builds calls it first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is installed already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
