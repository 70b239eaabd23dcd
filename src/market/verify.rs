//! The verification probe run at registration and on a creator's request, until the
//! reliability layer's probe engine (`upstream::probe`) takes its place: per endpoint,
//! `initialize` + `tools/list` (every page), schema validation of every tool, and an
//! unknown method that must answer with a JSON-RPC error; latency graded A–F
//! (A < 250 ms, B < 500, C < 1000, D < 2500, else F). Each endpoint's run is stored in
//! `probe_results`.
//!
//! The missing-secret refusal is not checked here: at registration the creator's server
//! does not know its secret yet (it is shown in the registration's answer).

use std::time::Instant;

use serde_json::{Value, json};

use crate::app::{App, AppError};
use crate::catalog::Server;
use crate::catalog::creator::ProbeRecord;
use crate::catalog::reputation::latency_grade;
use crate::store::now_ms;

/// Longest wait for one check of one endpoint (a registration answers within about
/// twice this per endpoint).
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a probe runs (`probe_results.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// At registration.
    Registration,
    /// On a creator's or admin's request.
    Manual,
}

impl ProbeKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Registration => "registration",
            Self::Manual => "manual",
        }
    }
}

/// The outcome of a verification over every endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verification {
    /// Every check of every endpoint passed.
    pub ok: bool,
    /// The worst endpoint's grade.
    pub grade: String,
    /// One stored probe per endpoint.
    pub probes: Vec<ProbeRecord>,
}

impl Verification {
    /// The names of the failed checks, for messages (`initialize_and_list`, …).
    pub fn failed_checks(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .probes
            .iter()
            .flat_map(|p| p.checks.as_array().cloned().unwrap_or_default())
            .filter(|c| c.get("ok") != Some(&Value::Bool(true)))
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        out.dedup();
        out
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>, ms: u128) -> Value {
    json!({"name": name, "ok": ok, "detail": detail.into(), "duration_ms": ms as i64})
}

/// Checks one tool definition's shape (MCP `Tool`: a non-empty string `name`, an
/// object `inputSchema` of `"type": "object"`). Returns the problem.
fn tool_problem(def: &Value) -> Option<String> {
    let name = def.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Some("a tool without a name".into());
    }
    match def.get("inputSchema") {
        Some(Value::Object(s)) if s.get("type") == Some(&json!("object")) => None,
        _ => Some(format!(
            "tool '{}' has no object inputSchema",
            name.chars().take(64).collect::<String>()
        )),
    }
}

/// Runs the verification of `server` (every endpoint) and stores one `probe_results`
/// row per endpoint.
///
/// # Errors
/// [`AppError::Catalog`] / [`AppError::Credential`] when its headers cannot be built,
/// [`AppError::Store`] when the report cannot be stored. An unreachable or broken
/// server is a failed verification, not an error.
pub async fn run(app: &App, server: &Server, kind: ProbeKind) -> Result<Verification, AppError> {
    let fixed = app.upstream_headers(server).await?;
    let mut probes = Vec::new();
    for (position, url) in server.endpoints.iter().enumerate() {
        let one = Server {
            endpoints: vec![url.clone()],
            ..server.clone()
        };
        let started_at = now_ms();
        let started = Instant::now();
        let mut checks = Vec::new();
        let fetched = tokio::time::timeout(CHECK_TIMEOUT, app.upstreams.fetch_tools(&one, &fixed))
            .await
            .unwrap_or(Err(crate::upstream::UpstreamError::Timeout));
        let latency = started.elapsed().as_millis();
        let mut ok = true;
        let latency_ms = match &fetched {
            Ok(tools) => {
                checks.push(check(
                    "initialize_and_list",
                    true,
                    format!("{} tools", tools.len()),
                    latency,
                ));
                let problems: Vec<String> = tools.iter().filter_map(tool_problem).collect();
                let schema_ok = problems.is_empty() && !tools.is_empty();
                ok &= schema_ok;
                checks.push(check(
                    "tool_schemas",
                    schema_ok,
                    if tools.is_empty() {
                        "the server offers no tools".to_owned()
                    } else {
                        problems.first().cloned().unwrap_or_else(|| "valid".into())
                    },
                    0,
                ));
                Some(latency as i64)
            }
            Err(e) => {
                ok = false;
                checks.push(check("initialize_and_list", false, e.to_string(), latency));
                None
            }
        };
        if fetched.is_ok() {
            let t = Instant::now();
            let unknown = match app.upstreams.detached_session(&one, &fixed) {
                Some(session) => {
                    let r = tokio::time::timeout(
                        CHECK_TIMEOUT,
                        session.request(
                            "marketplace/verification-unknown-method",
                            json!({}),
                            &http::HeaderMap::new(),
                            &|_| {},
                        ),
                    )
                    .await
                    .unwrap_or(Err(crate::upstream::UpstreamError::Timeout));
                    session.close().await;
                    r
                }
                None => Err(crate::upstream::UpstreamError::Connect),
            };
            let answered = matches!(unknown, Err(crate::upstream::UpstreamError::JsonRpc { .. }));
            ok &= answered;
            checks.push(check(
                "unknown_method",
                answered,
                if answered {
                    "answered with a JSON-RPC error".to_owned()
                } else {
                    "did not answer an unknown method with a JSON-RPC error".to_owned()
                },
                t.elapsed().as_millis(),
            ));
        }
        let grade = latency_ms.map_or('F', latency_grade).to_string();
        let record = ProbeRecord {
            id: uuid::Uuid::now_v7().to_string(),
            kind: kind.as_str().to_owned(),
            endpoint_position: Some(position as i64),
            started_at,
            duration_ms: started.elapsed().as_millis() as i64,
            latency_ms,
            grade,
            ok,
            checks: Value::Array(checks),
        };
        sqlx::query(
            "INSERT INTO probe_results (id, server_id, endpoint_position, kind, started_at, duration_ms, \
             latency_ms, grade, ok, checks) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&record.id)
        .bind(&server.id)
        .bind(record.endpoint_position)
        .bind(&record.kind)
        .bind(record.started_at)
        .bind(record.duration_ms)
        .bind(record.latency_ms)
        .bind(&record.grade)
        .bind(i64::from(record.ok))
        .bind(record.checks.to_string())
        .execute(app.store.pool())
        .await
        .map_err(crate::store::StoreError::from)?;
        probes.push(record);
    }
    let ok = !probes.is_empty() && probes.iter().all(|p| p.ok);
    let grade = probes
        .iter()
        .map(|p| p.grade.clone())
        .max()
        .unwrap_or_else(|| "F".into());
    Ok(Verification { ok, grade, probes })
}
