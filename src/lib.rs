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
//! | [`gateway`] | the downstream MCP server: `/mcp` and `/servers/{slug}/mcp`, tool listing, the call path ([`gateway::call`]) |
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
pub mod store;
pub mod telemetry;
pub mod upstream;

/// Installs rustls' ring crypto provider for this process (idempotent). Every HTTP
/// client the marketplace builds calls it first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is installed already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
