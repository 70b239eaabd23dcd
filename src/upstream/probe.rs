//! The health probe of DESIGN.md "Health and trust" (issue 4 item 1): what the
//! marketplace checks of every endpoint of a server, at registration, every probe
//! interval, and on demand.
//!
//! Per endpoint, in order, each check under its own short deadline:
//!
//! | check | passes when |
//! | --- | --- |
//! | `initialize` | the MCP `initialize` handshake (plus `notifications/initialized`) succeeds |
//! | `tools_list` | `tools/list` (every page, at most [`super::MAX_LIST_PAGES`]) answers, and every tool has a name and an `inputSchema` that is a JSON object of `"type": "object"` and valid JSON Schema (checked against its meta-schema and compiled with the `jsonschema` crate; remote `$ref`s are never fetched) |
//! | `malformed_json` | a POST of broken JSON is answered with JSON-RPC error −32700, or refused with an HTTP 4xx (MCP 2025-06-18 "Transports": a server that cannot accept the input MUST answer an HTTP error status; the JSON-RPC body is optional, and rmcp answers HTTP 415), within [`ABUSE_TIMEOUT`]; a 5xx, a hang or a dropped connection fails |
//! | `unknown_method` | a request for a method no server implements is answered with JSON-RPC error −32601 within [`ABUSE_TIMEOUT`] |
//! | `secret_required` | an `initialize` without `X-MCP-Marketplace-Secret` is refused (HTTP 4xx or a JSON-RPC error) |
//!
//! The probe connects exactly like forwarding does: through the trust layer's HTTP
//! client (SSRF policy checked at every connect, no redirects) with the server's secret
//! and the creator's decrypted credentials ([`crate::app::App::upstream_headers`]).
//!
//! **Grade** ([`Grade::from_latency`]): the latency is the `initialize` plus the first
//! `tools/list` round trip. A < 250 ms, B < 500 ms, C < 1000 ms, D < 2500 ms, else F;
//! F when `initialize` or `tools/list` fails. An endpoint is `ok` when every check
//! passed; a server's report is `ok` when every endpoint is, its grade is the worst
//! endpoint's.
//!
//! Every endpoint's result is one `probe_results` row (migration 0006), the history
//! uptime and reputation are computed from. Each probe also feeds the status machine
//! ([`super::health`]) and the metrics `mcp_marketplace_probes_total{server, grade, ok}`
//! and `mcp_marketplace_probe_latency_seconds{server}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::client::UpstreamSession;
use super::{MAX_LIST_PAGES, UpstreamError};
use crate::app::App;
use crate::catalog::{Server, ServerStatus};
use crate::store::{StoreError, now_ms};

/// Deadline of the `initialize` and `tools/list` checks each.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of the malformed-JSON, unknown-method and missing-secret checks each: an
/// upstream that hangs on bad input fails them quickly.
pub const ABUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default interval of scheduled probes (DESIGN.md: every 5 minutes).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Default number of servers probed at once by the scheduler.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// The method the `unknown_method` check asks for.
pub const UNKNOWN_METHOD: &str = "mcp-marketplace/probe-unknown-method";
/// Longest `detail` kept per check (characters).
const MAX_DETAIL: usize = 300;

/// Why a probe ran; stored as `probe_results.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// By the probe scheduler.
    Scheduled,
    /// When a creator registers a server (issue 5).
    Registration,
    /// Asked for by an admin or a creator.
    Manual,
}

impl ProbeKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Registration => "registration",
            Self::Manual => "manual",
        }
    }
}

/// A latency grade, A (best) to F.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Grade {
    /// Under 250 ms.
    A,
    /// Under 500 ms.
    B,
    /// Under 1000 ms.
    C,
    /// Under 2500 ms.
    D,
    /// 2500 ms or more, or the server failed `initialize`/`tools/list`.
    F,
}

impl Grade {
    /// The grade of a latency in ms: A < 250, B < 500, C < 1000, D < 2500, else F.
    pub fn from_latency(latency_ms: i64) -> Self {
        match latency_ms {
            ..250 => Self::A,
            250..500 => Self::B,
            500..1000 => Self::C,
            1000..2500 => Self::D,
            _ => Self::F,
        }
    }

    /// `"A"` … `"F"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B => "B",
            Self::C => "C",
            Self::D => "D",
            Self::F => "F",
        }
    }
}

/// One check of one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeCheck {
    /// `initialize`, `tools_list`, `malformed_json`, `unknown_method` or
    /// `secret_required`.
    pub name: String,
    /// The endpoint's position (0-based, the order of the server's endpoints).
    pub endpoint: usize,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen, one sentence (never an URL, a secret or a header value).
    pub detail: String,
    /// How long it took, ms.
    pub duration_ms: i64,
}

/// The result of probing every endpoint of one server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// True when every check of every endpoint passed.
    pub ok: bool,
    /// The worst endpoint's grade.
    pub grade: Grade,
    /// The worst endpoint's latency (`initialize` + `tools/list`), ms; `None` when no
    /// endpoint completed both.
    pub latency_ms: Option<i64>,
    /// Wall time of the whole probe, ms.
    pub duration_ms: i64,
    /// Every check of every endpoint, endpoint by endpoint.
    pub checks: Vec<ProbeCheck>,
    /// True when at least one endpoint completed `initialize` and `tools/list` (the
    /// server can serve calls, perhaps impaired).
    pub reachable: bool,
}

/// Why a probe could not run (a failing upstream is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The server has no endpoint.
    #[error("the server has no endpoint to probe")]
    NoEndpoint,
    /// The secret or the creator's credentials could not be read or decrypted.
    #[error("the server's credentials are unavailable")]
    Credentials,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for ProbeError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// Probes every endpoint of `server` (see the module docs for the checks), stores one
/// `probe_results` row per endpoint with `kind`, feeds the status machine
/// ([`super::health::on_probe`]; servers pending review or suspended keep their status)
/// and returns the report. Endpoints are probed one after the other, so a report takes
/// at most about (2 × [`STEP_TIMEOUT`] + 3 × [`ABUSE_TIMEOUT`]) per endpoint.
///
/// The marketplace calls it at registration with [`ProbeKind::Registration`] (the
/// server is `pending_review`; its report helps the reviewer).
///
/// # Errors
/// [`ProbeError::NoEndpoint`], [`ProbeError::Credentials`], [`ProbeError::Store`].
pub async fn probe_server(
    app: &App,
    server: &Server,
    kind: ProbeKind,
) -> Result<ProbeReport, ProbeError> {
    if server.endpoints.is_empty() {
        return Err(ProbeError::NoEndpoint);
    }
    let fixed = app.upstream_headers(server).await.map_err(|e| {
        tracing::error!(server = %server.slug, error = %e, "cannot build the upstream headers for a probe");
        ProbeError::Credentials
    })?;
    let started_at = now_ms();
    let started = Instant::now();
    let mut endpoints = Vec::new();
    for position in 0..server.endpoints.len() {
        let ep_started_at = now_ms();
        let result = match app.upstreams.endpoint_session(server, position, &fixed) {
            Some(session) => {
                let r = probe_endpoint(&session, position).await;
                session.close().await;
                r
            }
            None => EndpointResult {
                latency_ms: None,
                checks: vec![ProbeCheck {
                    name: "initialize".into(),
                    endpoint: position,
                    ok: false,
                    detail: "the endpoint is no longer allowed by the marketplace's SSRF policy"
                        .into(),
                    duration_ms: 0,
                }],
            },
        };
        endpoints.push((ep_started_at, result));
    }
    let report = ProbeReport {
        ok: endpoints.iter().all(|(_, e)| e.ok()),
        grade: endpoints
            .iter()
            .map(|(_, e)| e.grade())
            .max()
            .unwrap_or(Grade::F),
        latency_ms: if endpoints.iter().all(|(_, e)| e.latency_ms.is_some()) {
            endpoints.iter().filter_map(|(_, e)| e.latency_ms).max()
        } else {
            None
        },
        duration_ms: started.elapsed().as_millis() as i64,
        reachable: endpoints.iter().any(|(_, e)| e.latency_ms.is_some()),
        checks: endpoints
            .iter()
            .flat_map(|(_, e)| e.checks.iter().cloned())
            .collect(),
    };

    let mut tx = app.store.begin().await?;
    for (position, (at, e)) in endpoints.iter().enumerate() {
        let duration: i64 = e.checks.iter().map(|c| c.duration_ms).sum();
        sqlx::query(
            "INSERT INTO probe_results (id, server_id, endpoint_position, kind, started_at, duration_ms, \
             latency_ms, grade, ok, checks) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&server.id)
        .bind(position as i64)
        .bind(kind.as_str())
        .bind(*at)
        .bind(duration)
        .bind(e.latency_ms)
        .bind(e.grade().as_str())
        .bind(i64::from(e.ok()))
        .bind(json!(e.checks).to_string())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(server = %server.slug, kind = kind.as_str(), ok = report.ok, grade = report.grade.as_str(), started_at, "probe");
    metrics::counter!(
        "mcp_marketplace_probes_total",
        "server" => server.slug.clone(),
        "grade" => report.grade.as_str(),
        "ok" => if report.ok { "true" } else { "false" },
    )
    .increment(1);
    if let Some(latency) = report.latency_ms {
        metrics::histogram!("mcp_marketplace_probe_latency_seconds", "server" => server.slug.clone())
            .record(latency as f64 / 1000.0);
    }
    if let Err(e) = super::health::on_probe(app, server, &report).await {
        tracing::warn!(server = %server.slug, error = %e, "the status machine could not take a probe");
    }
    Ok(report)
}

struct EndpointResult {
    latency_ms: Option<i64>,
    checks: Vec<ProbeCheck>,
}

impl EndpointResult {
    fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    fn grade(&self) -> Grade {
        self.latency_ms.map_or(Grade::F, Grade::from_latency)
    }
}

fn clip(s: impl Into<String>) -> String {
    let s: String = s.into();
    if s.chars().count() <= MAX_DETAIL {
        s
    } else {
        s.chars().take(MAX_DETAIL).collect::<String>() + "…"
    }
}

/// Runs every check against one endpoint session.
async fn probe_endpoint(session: &UpstreamSession, position: usize) -> EndpointResult {
    let mut checks = Vec::new();
    let mut check = |name: &str, started: Instant, outcome: Result<String, String>| {
        let ok = outcome.is_ok();
        checks.push(ProbeCheck {
            name: name.into(),
            endpoint: position,
            ok,
            detail: clip(outcome.unwrap_or_else(|e| e)),
            duration_ms: started.elapsed().as_millis() as i64,
        });
        ok
    };

    // initialize
    let t = Instant::now();
    let init = tokio::time::timeout(STEP_TIMEOUT, session.initialize_now())
        .await
        .unwrap_or(Err(UpstreamError::Timeout));
    let init_ms = t.elapsed().as_millis() as i64;
    let init_ok = check(
        "initialize",
        t,
        init.map(|()| "the handshake succeeded".to_owned())
            .map_err(|e| format!("initialize failed: {e}")),
    );

    // tools/list
    let mut latency_ms = None;
    if init_ok {
        let t = Instant::now();
        let listed = tokio::time::timeout(STEP_TIMEOUT, list_tools(session, &mut latency_ms))
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        let outcome = match listed {
            Ok(tools) => validate_tools(&tools),
            Err(e) => {
                latency_ms = None;
                Err(format!("tools/list failed: {e}"))
            }
        };
        check("tools_list", t, outcome);
        latency_ms = latency_ms.map(|l| l + init_ms);
    } else {
        check(
            "tools_list",
            Instant::now(),
            Err("skipped: initialize failed".into()),
        );
    }

    // Bad input must be answered with errors, quickly.
    let t = Instant::now();
    let outcome = if init_ok {
        match tokio::time::timeout(
            ABUSE_TIMEOUT,
            session.post_raw(r#"{"jsonrpc": "2.0", "id": 7, "method": "#, true, false),
        )
        .await
        {
            Err(_) => Err(format!(
                "no answer to malformed JSON within {} s",
                ABUSE_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("malformed JSON broke the exchange: {e}")),
            Ok(Ok(a)) if a.error_code() == Some(-32700) => {
                Ok("answered JSON-RPC error -32700 (parse error)".into())
            }
            Ok(Ok(a)) if (400..500).contains(&a.status) => Ok(format!(
                "refused with HTTP {} (no JSON-RPC -32700 body, which MCP allows)",
                a.status
            )),
            Ok(Ok(a)) => Err(format!(
                "answered HTTP {} without JSON-RPC error -32700",
                a.status
            )),
        }
    } else {
        Err("skipped: initialize failed".into())
    };
    check("malformed_json", t, outcome);

    let t = Instant::now();
    let outcome = if init_ok {
        match tokio::time::timeout(
            ABUSE_TIMEOUT,
            session.request(UNKNOWN_METHOD, json!({}), &http::HeaderMap::new(), &|_| {}),
        )
        .await
        {
            Err(_) => Err(format!(
                "no answer to an unknown method within {} s",
                ABUSE_TIMEOUT.as_secs()
            )),
            Ok(Err(UpstreamError::JsonRpc { code: -32601, .. })) => {
                Ok("answered JSON-RPC error -32601 (method not found)".into())
            }
            Ok(Err(UpstreamError::JsonRpc { code, .. })) => {
                Err(format!("answered JSON-RPC error {code} instead of -32601"))
            }
            Ok(Err(e)) => Err(format!("an unknown method failed the exchange: {e}")),
            Ok(Ok(_)) => Err("answered an unknown method with a result".into()),
        }
    } else {
        Err("skipped: initialize failed".into())
    };
    check("unknown_method", t, outcome);

    let t = Instant::now();
    let init_body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {
            "protocolVersion": super::client::UPSTREAM_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-marketplace-probe", "version": env!("CARGO_PKG_VERSION")},
        }
    })
    .to_string();
    let outcome = match tokio::time::timeout(
        ABUSE_TIMEOUT,
        session.post_raw(&init_body, false, true),
    )
    .await
    {
        Err(_) => Err("no answer to a request without the secret header".into()),
        Ok(Err(e)) => Err(format!("a request without the secret header failed: {e}")),
        Ok(Ok(a)) if (400..500).contains(&a.status) => Ok(format!(
            "refused a request without X-MCP-Marketplace-Secret (HTTP {})",
            a.status
        )),
        Ok(Ok(a)) if a.error_code().is_some() => {
            Ok("refused a request without X-MCP-Marketplace-Secret (JSON-RPC error)".into())
        }
        Ok(Ok(a)) => Err(format!(
            "accepted a request without X-MCP-Marketplace-Secret (HTTP {}); creators must reject it",
            a.status
        )),
    };
    check("secret_required", t, outcome);

    EndpointResult { latency_ms, checks }
}

/// Every page of `tools/list`; `first_ms` gets the first page's round trip.
async fn list_tools(
    session: &UpstreamSession,
    first_ms: &mut Option<i64>,
) -> Result<Vec<Value>, UpstreamError> {
    let mut tools = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_LIST_PAGES {
        let params = match &cursor {
            Some(c) => json!({ "cursor": c }),
            None => json!({}),
        };
        let t = Instant::now();
        let page = session
            .request("tools/list", params, &http::HeaderMap::new(), &|_| {})
            .await?;
        first_ms.get_or_insert(t.elapsed().as_millis() as i64);
        let items = page
            .get("tools")
            .and_then(Value::as_array)
            .ok_or_else(|| UpstreamError::Protocol("tools/list without a tools array".into()))?;
        tools.extend(items.iter().cloned());
        cursor = page
            .get("nextCursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    Ok(tools)
}

/// Checks every tool's name and `inputSchema` (MCP 2025-06-18 "Tools": `inputSchema`
/// is a JSON Schema object of `"type": "object"`).
fn validate_tools(tools: &[Value]) -> Result<String, String> {
    for (i, tool) in tools.iter().enumerate() {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return Err(format!("tool #{i} has no name"));
        };
        let name: String = name.chars().take(64).collect();
        let Some(schema) = tool.get("inputSchema") else {
            return Err(format!("tool '{name}' has no inputSchema"));
        };
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(format!(
                "tool '{name}': inputSchema is not of \"type\": \"object\""
            ));
        }
        if let Err(e) = jsonschema::meta::validate(schema) {
            return Err(format!(
                "tool '{name}': inputSchema is not valid JSON Schema: {e}"
            ));
        }
        if let Err(e) = jsonschema::validator_for(schema) {
            return Err(format!(
                "tool '{name}': inputSchema cannot be compiled: {e}"
            ));
        }
    }
    Ok(format!(
        "{} tools, every inputSchema valid JSON Schema",
        tools.len()
    ))
}

/// The probe scheduler: every `interval` (each round jittered by ±10 %), probes every
/// approved server (active, degraded, inactive or recovered; inactive ones so they
/// can recover) at most `concurrency` at a time, each after a random delay of up to a
/// tenth of the interval so replicas and servers spread out. Returns when `token` is
/// cancelled, abandoning probes in flight (a probe writes its results in one
/// transaction, so nothing half-done is left).
pub async fn run_scheduler(
    app: Arc<App>,
    interval: Duration,
    concurrency: usize,
    token: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(jitter(interval, 10)) => {}
            () = token.cancelled() => return,
        }
        let servers = match app.catalog.list().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the probe scheduler cannot list servers");
                continue;
            }
        };
        let due: Vec<Server> = servers
            .into_iter()
            .filter(|s| {
                matches!(
                    s.status,
                    ServerStatus::Active
                        | ServerStatus::Degraded
                        | ServerStatus::Inactive
                        | ServerStatus::Recovered
                )
            })
            .collect();
        let round = futures::stream::iter(due).for_each_concurrent(concurrency.max(1), |server| {
            let app = app.clone();
            async move {
                tokio::time::sleep(random_below(interval / 10)).await;
                if let Err(e) = probe_server(&app, &server, ProbeKind::Scheduled).await {
                    tracing::warn!(server = %server.slug, error = %e, "scheduled probe failed to run");
                }
            }
        });
        tokio::select! {
            () = round => {}
            () = token.cancelled() => return,
        }
    }
}

/// `d` moved by a random amount of up to ±`percent` %.
fn jitter(d: Duration, percent: u32) -> Duration {
    let spread = d * percent / 100;
    d.saturating_sub(spread) + random_below(spread * 2)
}

/// A random duration in `[0, max)` (zero when `max` is zero).
fn random_below(max: Duration) -> Duration {
    let max_ms = max.as_millis() as u64;
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    // Jitter only; without randomness the schedule is merely regular.
    let _ = getrandom::fill(&mut b);
    Duration::from_millis(u64::from_le_bytes(b) % max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_follow_the_documented_thresholds() {
        assert_eq!(Grade::from_latency(0), Grade::A);
        assert_eq!(Grade::from_latency(249), Grade::A);
        assert_eq!(Grade::from_latency(250), Grade::B);
        assert_eq!(Grade::from_latency(499), Grade::B);
        assert_eq!(Grade::from_latency(500), Grade::C);
        assert_eq!(Grade::from_latency(999), Grade::C);
        assert_eq!(Grade::from_latency(1000), Grade::D);
        assert_eq!(Grade::from_latency(2499), Grade::D);
        assert_eq!(Grade::from_latency(2500), Grade::F);
        assert!(Grade::A < Grade::F);
    }

    #[test]
    fn tool_schemas_are_validated() {
        let good = json!([{"name": "a", "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}}}]);
        assert!(validate_tools(good.as_array().unwrap()).is_ok());
        for bad in [
            json!({"name": "a"}),
            json!({"name": "a", "inputSchema": {"type": "string"}}),
            json!({"name": "a", "inputSchema": {"type": "object", "properties": {"x": {"type": 12}}}}),
            json!({"inputSchema": {"type": "object"}}),
        ] {
            assert!(validate_tools(std::slice::from_ref(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(100), 10);
            assert!(j >= Duration::from_secs(90) && j < Duration::from_secs(110));
        }
    }
}
