//! Sending one `tools/call` to a server with several endpoints (issue 4 items 3–5):
//! endpoint choice through the breakers, failover, retries only when safe, one
//! deadline, cancellation forwarded upstream.
//!
//! - Each attempt takes a [`Permit`](super::breaker::Permit) from
//!   [`Breakers::acquire`](super::breaker::Breakers::acquire): an endpoint whose breaker
//!   lets calls through, preferring endpoints not tried yet for this call, then the
//!   least loaded, round-robin among equals.
//! - **Retry by cause** (never blindly): a failed attempt is retried only when the
//!   failure says the endpoint is unwell (no connection, HTTP ≥ 500, a broken or invalid
//!   answer) and either the request never reached the upstream (the connection failed,
//!   or `initialize` failed before the call was posted), or the tool is annotated
//!   `readOnlyHint` or `idempotentHint` (MCP 2025-06-18 "Tool annotations"). A billed
//!   call that reached the upstream is never sent twice otherwise.
//! - At most [`MAX_ATTEMPTS`] attempts, [`BACKOFF_BASE`] doubling up to
//!   [`BACKOFF_MAX`] between them, all within the server's timeout (one deadline for the
//!   whole call; a timeout is never retried).
//! - Cancellation (the client's `notifications/cancelled`, or a shutdown past its
//!   grace): the attempt is abandoned and, when the request was sent, the upstream is
//!   told with `notifications/cancelled` (MCP 2025-06-18 "Cancellation"). The caller
//!   refunds.
//! - The final outcome feeds the status machine ([`super::health::on_call`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::UpstreamError;
use super::client::{OnMessage, Track, UpstreamSession};
use crate::app::App;
use crate::catalog::Server;

/// Most attempts of one call (the first included).
pub const MAX_ATTEMPTS: usize = 3;
/// Pause before the second attempt; doubles for each further one.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Longest pause between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Where a call hears what its upstream session's standalone stream carries while the
/// call is in flight (log messages; see [`UpstreamSession::subscribe`]).
#[derive(Debug, Clone)]
pub struct Relay {
    /// The downstream client session (its `Mcp-Session-Id`, or a value of its own for a
    /// client without one).
    pub client: String,
    /// Receives each message as JSON-RPC JSON.
    pub tx: tokio::sync::mpsc::UnboundedSender<Value>,
}

/// Why [`send`] gave up.
#[derive(Debug)]
pub enum SendError {
    /// The last attempt's failure (or [`UpstreamError::Connect`] when no endpoint's
    /// breaker let the call through).
    Upstream(UpstreamError),
    /// The client cancelled, or the marketplace is shutting down.
    Cancelled,
}

/// True when the tool's definition (MCP `Tool` JSON) says calling it twice is harmless:
/// `annotations.readOnlyHint` or `annotations.idempotentHint` is `true`.
pub fn retry_safe(definition: &Value) -> bool {
    let hint = |name: &str| {
        definition
            .pointer(&format!("/annotations/{name}"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    hint("readOnlyHint") || hint("idempotentHint")
}

/// True for failures that say an endpoint is unwell (they count against its breaker,
/// the server's health, and allow a safe retry): no connection, timeout, HTTP ≥ 500,
/// a broken exchange or an invalid answer. A JSON-RPC error, an HTTP 4xx or an
/// oversized answer is the upstream answering.
pub fn is_endpoint_failure(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Connect
        | UpstreamError::Timeout
        | UpstreamError::Transport
        | UpstreamError::Protocol(_)
        | UpstreamError::SessionExpired => true,
        UpstreamError::HttpStatus(s) => *s >= 500,
        UpstreamError::JsonRpc { .. } | UpstreamError::TooLarge(_) => false,
    }
}

/// One call: sends `method` with `params` (and `extra` headers) for `account_id` to an
/// endpoint of `server`, with failover and safe retries (see the module docs), within
/// `timeout`, until `cancel` or the app's drain token fires. `retry_safe` says the tool
/// may be sent twice. Messages before the answer go to `on_message`; with `relay`, the
/// call also hears the session's standalone stream during each attempt.
///
/// # Errors
/// [`SendError`].
#[allow(clippy::too_many_arguments)]
pub async fn send(
    app: &App,
    account_id: &str,
    server: &Server,
    fixed: &HeaderMap,
    method: &str,
    params: Value,
    extra: &HeaderMap,
    on_message: OnMessage<'_>,
    relay: Option<&Relay>,
    retry_safe: bool,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Value, SendError> {
    let deadline = Instant::now() + timeout;
    let drain = app.drain_token();
    let mut tried: Vec<usize> = Vec::new();
    let mut last = UpstreamError::Connect;
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            let pause = BACKOFF_BASE
                .saturating_mul(1 << (attempt - 1).min(8))
                .min(BACKOFF_MAX);
            if Instant::now() + pause >= deadline {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return Err(SendError::Cancelled),
                () = drain.cancelled() => return Err(SendError::Cancelled),
            }
        }
        let Some(permit) = app.breakers.acquire(server, &tried) else {
            break;
        };
        let position = permit.position;
        tried.push(position);
        let Some(session) = app
            .upstreams
            .session_at(account_id, server, position, fixed)
        else {
            // The policy refuses this endpoint now: nothing was sent.
            drop(permit);
            last = UpstreamError::Connect;
            continue;
        };
        let track = Track::default();
        let _subscription = relay.map(|r| session.subscribe(r.client.clone(), r.tx.clone()));
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline, session.request_tracked(method, params.clone(), extra, on_message, &track)) => {
                r.unwrap_or(Err(UpstreamError::Timeout))
            }
            () = cancel.cancelled() => {
                cancel_upstream(&session, &track, "The client cancelled the call.");
                return Err(SendError::Cancelled);
            }
            () = drain.cancelled() => {
                cancel_upstream(&session, &track, "The marketplace is shutting down.");
                return Err(SendError::Cancelled);
            }
        };
        match outcome {
            Ok(result) => {
                permit.success();
                super::health::on_call(app, server, false).await;
                return Ok(result);
            }
            Err(e) if !is_endpoint_failure(&e) => {
                permit.success();
                super::health::on_call(app, server, false).await;
                return Err(SendError::Upstream(e));
            }
            Err(e) => {
                permit.failure();
                // Start afresh next time when the session may be what broke (an HTTP
                // 5xx answer leaves it usable; a lost session was renewed already).
                if !matches!(e, UpstreamError::HttpStatus(_)) {
                    app.upstreams
                        .forget_session(account_id, &server.id, position);
                }
                let reached =
                    track.sent.load(Ordering::SeqCst) && !matches!(e, UpstreamError::Connect);
                let timed_out = matches!(e, UpstreamError::Timeout);
                tracing::debug!(server = %server.slug, endpoint = position, attempt, reached, error = %e, "attempt failed");
                last = e;
                if timed_out || (reached && !retry_safe) {
                    break;
                }
            }
        }
    }
    // Only attempts that ran say something about the server's health.
    if !tried.is_empty() {
        super::health::on_call(app, server, true).await;
    }
    Err(SendError::Upstream(last))
}

/// Tells the upstream, in the background, that the request tracked by `track` is
/// cancelled (nothing to tell when it was never sent).
fn cancel_upstream(session: &Arc<UpstreamSession>, track: &Track, reason: &'static str) {
    if !track.sent.load(Ordering::SeqCst) {
        return;
    }
    let id = track.id.load(Ordering::SeqCst);
    let session = session.clone();
    tokio::spawn(async move {
        let params = json!({"requestId": id, "reason": reason});
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            session.notify("notifications/cancelled", params),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!("could not forward a cancellation upstream");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_annotated_tools_are_retry_safe() {
        assert!(retry_safe(&json!({"annotations": {"readOnlyHint": true}})));
        assert!(retry_safe(
            &json!({"annotations": {"idempotentHint": true}})
        ));
        assert!(!retry_safe(
            &json!({"annotations": {"readOnlyHint": false}})
        ));
        assert!(!retry_safe(
            &json!({"annotations": {"destructiveHint": true}})
        ));
        assert!(!retry_safe(&json!({"name": "x"})));
    }

    #[test]
    fn endpoint_failures_are_told_from_answers() {
        assert!(is_endpoint_failure(&UpstreamError::Connect));
        assert!(is_endpoint_failure(&UpstreamError::HttpStatus(503)));
        assert!(!is_endpoint_failure(&UpstreamError::HttpStatus(401)));
        assert!(!is_endpoint_failure(&UpstreamError::JsonRpc {
            code: -32602,
            message: String::new()
        }));
    }
}
