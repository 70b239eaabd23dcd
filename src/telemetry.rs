//! Observability (issue 4 item 8): the Prometheus exposition of `GET /metrics` and the
//! metric names of the marketplace.
//!
//! Every domain emits through the `metrics` crate's macros; [`install`] sets one
//! `metrics-exporter-prometheus` recorder for the whole process the first time an
//! [`crate::app::App`] is made (later Apps, e.g. many in one test process, share it),
//! and [`render`] answers `/metrics` in the Prometheus text format 0.0.4. Histograms
//! are rendered with the buckets of [`LATENCY_BUCKETS`] (seconds).
//!
//! Metrics (labels in braces):
//! - `mcp_marketplace_calls_total` counter {server, tool, outcome}: tool calls;
//!   `outcome` is `ok` or the error kind the client saw (`upstream_error`,
//!   `upstream_timeout`, `cancelled`, and the refusals before any forward:
//!   `insufficient_credits`, `upstream_unavailable`, …);
//! - `mcp_marketplace_call_duration_seconds` histogram {server, tool}: the forward's
//!   duration;
//! - `mcp_marketplace_ledger_holds_micros` gauge: money held for calls in flight, read
//!   from the ledger at each scrape;
//! - `mcp_marketplace_alerts_delivered_total` counter {channel},
//!   `mcp_marketplace_alerts_failed_attempts_total`, `mcp_marketplace_alerts_dead_total`
//!   counters, and `mcp_marketplace_alert_outbox_pending` gauge (at each scrape);
//! - from the reliability layer: `mcp_marketplace_breaker_state` gauge {server,
//!   endpoint}, `mcp_marketplace_probes_total` counter {server, grade, ok},
//!   `mcp_marketplace_probe_latency_seconds` histogram {server},
//!   `mcp_marketplace_server_status` gauge {server, status}.
//!
//! Labels carry slugs, tool names and kinds only: never a URL, a key, a secret or an
//! argument.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets, seconds: 5 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's Prometheus recorder on first use and returns its handle;
/// `None` when another recorder was installed first (an embedder's own), in which case
/// `/metrics` answers 404 and the metrics go to that recorder.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = match PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS) {
                Ok(b) => b.build_recorder(),
                Err(e) => {
                    tracing::error!(error = %e, "invalid histogram buckets");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("another metrics recorder is installed; /metrics is off");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "mcp_marketplace_calls_total",
        "Finished upstream tool calls by server, tool and outcome."
    );
    describe_histogram!(
        "mcp_marketplace_call_duration_seconds",
        Unit::Seconds,
        "Duration of the forward of a tool call to its upstream."
    );
    describe_gauge!(
        "mcp_marketplace_ledger_holds_micros",
        "Money held for calls in flight, micros."
    );
    describe_gauge!(
        "mcp_marketplace_alert_outbox_pending",
        "Alerts neither delivered nor given up."
    );
    describe_counter!(
        "mcp_marketplace_ledger_batches_total",
        "Group-commit batches of the call path's ledger writes (SQLite) by mode: `set` \
         (read once, decided in memory, written once) or `per_operation` (the fallback)."
    );
    describe_counter!(
        "mcp_marketplace_alerts_delivered_total",
        "Alerts accepted by a channel (webhook or email)."
    );
}

/// Records one finished call: `mcp_marketplace_calls_total` and
/// `mcp_marketplace_call_duration_seconds`. `outcome` is `ok` or an error kind.
pub fn record_call(server: &str, tool: &str, outcome: &str, duration: Duration) {
    metrics::counter!(
        "mcp_marketplace_calls_total",
        "server" => server.to_owned(),
        "tool" => tool.to_owned(),
        "outcome" => outcome.to_owned()
    )
    .increment(1);
    metrics::histogram!(
        "mcp_marketplace_call_duration_seconds",
        "server" => server.to_owned(),
        "tool" => tool.to_owned()
    )
    .record(duration.as_secs_f64());
}

/// Counts a `tools/call` refused before it was forwarded (no receipt, an error kind in
/// `_meta["mcp-marketplace/error"]`: insufficient credits, spend limit, quota, an
/// unavailable server, the concurrency cap) in `mcp_marketplace_calls_total` with that
/// kind as `outcome`. `name` is the tool name the client called, `slug` the server of
/// a one-server endpoint. Calls that reached the forward carry a receipt and were
/// counted by [`record_call`]; unknown tools are JSON-RPC errors and never get here, so
/// the labels only take names the catalog resolved.
pub fn record_refusal(name: &str, slug: Option<&str>, result: &rmcp::model::CallToolResult) {
    let Some(meta) = result.meta.as_ref() else {
        return;
    };
    if meta
        .0
        .contains_key(crate::billing::receipts::RECEIPT_META_KEY)
    {
        return;
    }
    let Some(kind) = meta
        .0
        .get(crate::gateway::tools::ERROR_META_KEY)
        .and_then(|e| e.get("kind"))
        .and_then(serde_json::Value::as_str)
    else {
        return;
    };
    let (server, tool) = match slug {
        Some(s) => (s, name),
        None => name
            .split_once(crate::catalog::namespace::SEPARATOR)
            .unwrap_or(("marketplace", name)),
    };
    metrics::counter!(
        "mcp_marketplace_calls_total",
        "server" => server.to_owned(),
        "tool" => tool.to_owned(),
        "outcome" => kind.to_owned()
    )
    .increment(1);
}

/// The `/metrics` body: refreshes the gauges read from the store (ledger holds, the
/// outbox backlog), then renders every metric. `None` when [`install`] found another
/// recorder.
pub async fn render(app: &crate::app::App) -> Option<String> {
    let handle = install()?;
    match app.ledger.platform_balance().await {
        Ok(b) => metrics::gauge!("mcp_marketplace_ledger_holds_micros").set(b.holds_micros as f64),
        Err(e) => tracing::warn!(error = %e, "cannot read the ledger holds for /metrics"),
    }
    let pending: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM alert_outbox WHERE delivered_at IS NULL AND dead_at IS NULL",
    )
    .fetch_one(app.store.pool())
    .await;
    if let Ok(n) = pending {
        metrics::gauge!("mcp_marketplace_alert_outbox_pending").set(n as f64);
    }
    handle.run_upkeep();
    Some(handle.render())
}
