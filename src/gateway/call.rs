//! One `tools/call`, in the order of DESIGN.md "One tools/call, in order":
//!
//! 1. authenticate (the middleware checked the key; here: scope `invoke`, allow-list);
//! 2. resolve `{slug}__{tool}` to an installed server (or the one-server endpoint's);
//!    a server that is not callable fails with `upstream_unavailable`;
//! 3. rate limit: checked before rmcp sees the request (`gateway::limits`, HTTP 429);
//!    here the call's trust policy is read and the server's concurrency cap applied;
//! 4. circuit breaker: when no endpoint's breaker lets a call through, or the
//!    marketplace is shutting down, fail fast with `upstream_unavailable` before
//!    anything is reserved (`upstream::breaker`);
//! 5. reserve the price (one transaction; insufficient credits, the key's spend limits
//!    or the plan's monthly call quota refuse the call before anything is sent);
//! 6. forward over the (account, server, endpoint) upstream session, with failover and
//!    retries only when safe (`upstream::failover`), the secret, the
//!    creator's credentials, a signed per-call token and `X-Request-Id`, under the
//!    server's timeout, streaming progress and log messages back; then content
//!    protection: redaction, then scanning (`blocked_content` in block mode, warnings
//!    under `_meta` in flag mode);
//! 7. settle on success; refund on any failure (transport, timeout, HTTP ≥ 500,
//!    JSON-RPC error, `isError: true`, blocked content, client cancellation);
//! 8. attach the signed receipt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, MetaObject, ProgressNotificationParam, ProgressToken,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer};
use serde_json::{Value, json};

use super::Caller;
use super::tools::{MARKETPLACE_PREFIX, call_marketplace, internal, tool_error, unknown_tool};
use crate::app::{App, HOLD_GRACE_MS};
use crate::auth::Scope;
use crate::auth::signing::{UPSTREAM_TOKEN_TTL_SECS, UpstreamClaims, now_secs};
use crate::billing::pricing::format_usd;
use crate::billing::receipts::RECEIPT_META_KEY;
use crate::billing::{BillingError, CallStats, Outcome, Receipt, Reservation};
use crate::security::audit::{self, Actor};
use crate::security::policy::Effective;
use crate::security::scan::{self, Finding, ScanMode, WARNINGS_META_KEY};
use crate::store::now_ms;
use crate::upstream::UpstreamError;
use crate::upstream::client::{REQUEST_ID_HEADER, TOKEN_HEADER, headers};

/// Runs one `tools/call` for `caller`.
///
/// # Errors
/// A JSON-RPC error only for calls that cannot be routed: `unknown_tool` (also for a
/// tool the key may not use) or an internal failure. Every other failure is a tool
/// result with `isError: true` and `_meta["mcp-marketplace/error"]`.
pub async fn call_tool(
    app: &Arc<App>,
    caller: &Caller,
    request: CallToolRequestParams,
    ctx: &RequestContext<RoleServer>,
) -> Result<CallToolResult, ErrorData> {
    let key = &caller.key;
    let name = request.name.to_string();
    let args = request.arguments.unwrap_or_default();

    // 1. Authenticate: the key may call tools at all, and this one.
    if caller.slug.is_none() && name.starts_with(MARKETPLACE_PREFIX) {
        if !key.allows_tool(&name) {
            return Err(unknown_tool(&name));
        }
        if name == super::tools::CALL_TOOL {
            // `marketplace__call_tool`: any approved tool, without an install.
            if !key.has_scope(Scope::Invoke) {
                return Err(unknown_tool(&name));
            }
            return match super::tools::call_tool_target(key, args) {
                Ok((target, args)) => call_upstream(app, caller, target, args, ctx, true).await,
                Err(refused) => Ok(refused),
            };
        }
        return call_marketplace(app, caller, &name, args).await;
    }
    call_upstream(app, caller, name, args, ctx, false).await
}

/// Steps 1 (scope) to 8 for an upstream tool `name`; `any_server` resolves it among
/// every listed server instead of the installed ones (`marketplace__call_tool`).
async fn call_upstream(
    app: &App,
    caller: &Caller,
    name: String,
    args: serde_json::Map<String, Value>,
    ctx: &RequestContext<RoleServer>,
    any_server: bool,
) -> Result<CallToolResult, ErrorData> {
    let key = &caller.key;
    if !key.has_scope(Scope::Invoke) {
        return Err(unknown_tool(&name));
    }

    // 2. Resolve.
    let (server, tool) = match &caller.slug {
        None if any_server => app
            .catalog
            .resolve_any(&key.account_id, &name)
            .await
            .map_err(internal)?,
        None => app
            .catalog
            .resolve(&key.account_id, &name)
            .await
            .map_err(internal)?,
        Some(slug) => app
            .catalog
            .resolve_on_server(slug, &name)
            .await
            .map_err(internal)?,
    }
    .ok_or_else(|| unknown_tool(&name))?;
    if !key.allows_tool(&tool.namespaced_name) {
        return Err(unknown_tool(&name));
    }
    if !server.status.is_callable() {
        if server.status == crate::catalog::ServerStatus::Suspended
            || server.status == crate::catalog::ServerStatus::PendingReview
        {
            return Err(unknown_tool(&name));
        }
        return Ok(tool_error(
            "upstream_unavailable",
            format!(
                "The server '{}' is unavailable right now. You were not charged; try again later.",
                server.slug
            ),
            Some(60),
        ));
    }

    // 3. The call's trust policy, and the server's concurrency cap (the permit is held
    // until the call is settled or refunded).
    let policy = app
        .effective_policy(Some(&server.id), key)
        .await
        .map_err(internal)?;
    let Some(_permit) = app
        .concurrency
        .try_acquire(&server.id, policy.max_concurrency)
    else {
        return Ok(tool_error(
            "upstream_unavailable",
            format!(
                "The server '{}' is already handling its maximum of {} concurrent calls. You were not \
                 charged; retry in a moment.",
                server.slug, policy.max_concurrency
            ),
            Some(1),
        ));
    };

    // 4. Circuit breaker, and no new call once a shutdown began. The guard keeps the
    // shutdown waiting until this call is settled or refunded.
    let Some(_in_flight) = app.call_guard() else {
        return Ok(tool_error(
            "upstream_unavailable",
            "The marketplace is restarting. You were not charged; retry in a moment.".into(),
            Some(5),
        ));
    };
    if !app.breakers.any_available(&server) {
        return Ok(tool_error(
            "upstream_unavailable",
            format!(
                "The server '{}' is failing, so the marketplace paused calls to it. You were not \
                 charged; try again later.",
                server.slug
            ),
            Some(30),
        ));
    }

    // 5. Reserve.
    let call_id = uuid::Uuid::now_v7().to_string();
    tracing::Span::current().record("call_id", call_id.as_str());
    let price = if server.owner_account_id == key.account_id {
        0
    } else {
        server.price_of(&tool.name)
    };
    // Bytes in, for the usage log (the arguments as JSON).
    let request_bytes = json_len(&args);
    let reservation = Reservation {
        call_id: call_id.clone(),
        account_id: key.account_id.clone(),
        key_id: key.key_id.clone(),
        server_id: server.id.clone(),
        tool: tool.name.clone(),
        price_micros: price,
        fee_bps: app.config.platform_fee_bps,
        hold_expires_at: now_ms() + server.timeout_ms + HOLD_GRACE_MS,
        spend_limits: key.spend_limits.clone(),
        request_bytes,
    };
    match app.ledger.reserve(&reservation).await {
        Ok(_) => {}
        Err(BillingError::InsufficientCredits {
            price_micros,
            balance_micros,
        }) => {
            return Ok(tool_error(
                "insufficient_credits",
                format!(
                    "This call costs ${} but your marketplace wallet holds ${}. Add credits, then retry. \
                     You were not charged.",
                    format_usd(price_micros),
                    format_usd(balance_micros)
                ),
                None,
            ));
        }
        Err(BillingError::SpendLimit {
            limit_micros,
            period,
            ..
        }) => {
            return Ok(tool_error(
                "spend_limit",
                format!(
                    "This key's spend limit of ${} per {period} is reached. You were not charged.",
                    format_usd(limit_micros)
                ),
                None,
            ));
        }
        Err(BillingError::QuotaExceeded {
            plan,
            quota,
            resets_at_ms,
        }) => {
            let retry = (resets_at_ms - now_ms()).max(0) / 1000;
            return Ok(tool_error(
                "quota_exceeded",
                format!(
                    "This account's {plan} plan allows {quota} calls per month and they are used up. \
                     Upgrade the plan or wait until {}. You were not charged.",
                    crate::billing::period::rfc3339(resets_at_ms)
                ),
                Some(retry as u64),
            ));
        }
        Err(e) => return Err(internal(e)),
    }

    // 6. Forward.
    let started = Instant::now();
    let retry_safe = crate::upstream::failover::retry_safe(&tool.definition);
    let forwarded = match forward(
        app, caller, &server, &tool.name, retry_safe, args, &call_id, price, ctx,
    )
    .await
    {
        Ok(result) => {
            protect(
                app,
                key,
                &server.slug,
                &tool.name,
                &call_id,
                &policy,
                result,
            )
            .await
        }
        Err(failure) => Err(failure),
    };
    let latency_ms = started.elapsed().as_millis() as i64;

    // 7. Settle or refund.
    let (mut result, failure) = match forwarded {
        Ok(result) if result.is_error != Some(true) => (result, None),
        Ok(result) => (result, Some("upstream_error")),
        Err(Failure::Cancelled) => (
            tool_error(
                "cancelled",
                "The call was cancelled. You were not charged.".into(),
                None,
            ),
            Some("cancelled"),
        ),
        Err(Failure::Blocked(findings)) => {
            let mut rules: Vec<&str> = findings.iter().map(|f| f.rule).collect();
            rules.dedup();
            (
                tool_error(
                    "blocked_content",
                    format!(
                        "The server '{}' answered with content the marketplace blocks ({}), so the answer \
                         was withheld. You were not charged.",
                        server.slug,
                        rules.join(", ")
                    ),
                    None,
                ),
                Some("blocked_content"),
            )
        }
        Err(Failure::Upstream(e)) => {
            let timeout_s = server.timeout_ms / 1000;
            let message = match &e {
                UpstreamError::Timeout => format!(
                    "The server '{}' did not answer within {timeout_s} s. You were not charged; try again later.",
                    server.slug
                ),
                UpstreamError::Connect => format!(
                    "The server '{}' could not be reached. You were not charged; try again later.",
                    server.slug
                ),
                UpstreamError::TooLarge(cap) => format!(
                    "The server '{}' answered with more than {cap} bytes, which the marketplace does not pass on. \
                     You were not charged; ask for less data.",
                    server.slug
                ),
                other => format!(
                    "The server '{}' failed: {other}. You were not charged.",
                    server.slug
                ),
            };
            let retry = matches!(e, UpstreamError::Timeout | UpstreamError::Connect).then_some(30);
            (tool_error(e.kind(), message, retry), Some(e.kind()))
        }
    };
    // Bytes out, for the usage log (the result as JSON, before the receipt).
    let stats = CallStats {
        latency_ms,
        response_bytes: json_len(&result),
    };
    let (outcome, balance_after) = match failure {
        None => match app.ledger.settle(&call_id, stats).await {
            Ok(b) => (Outcome::Settled, b),
            // Swept as abandoned while the upstream was slow: the caller keeps the result
            // and is not charged.
            Err(BillingError::NotReserved(_)) => {
                (Outcome::Refunded, wallet(app, &key.account_id).await?)
            }
            Err(e) => return Err(internal(e)),
        },
        Some(kind) => {
            if result.is_error == Some(true) && kind == "upstream_error" {
                mark_error(&mut result, kind);
            }
            match app.ledger.refund(&call_id, kind, stats).await {
                Ok(b) => (Outcome::Refunded, b),
                Err(BillingError::NotReserved(_)) => {
                    (Outcome::Refunded, wallet(app, &key.account_id).await?)
                }
                Err(e) => return Err(internal(e)),
            }
        }
    };
    tracing::info!(%call_id, server = %server.slug, tool = %tool.name, outcome = outcome.as_str(), latency_ms, "call");
    let duration = Duration::from_millis(latency_ms.max(0) as u64);
    crate::telemetry::record_call(&server.slug, &tool.name, failure.unwrap_or("ok"), duration);

    // 8. Receipt.
    let receipt = Receipt {
        call_id,
        account: key.account_name.clone(),
        key_id: key.key_id.clone(),
        server: server.slug.clone(),
        tool: tool.name.clone(),
        price_micros: price,
        charged_micros: if outcome == Outcome::Settled {
            price
        } else {
            0
        },
        outcome: outcome.as_str().to_owned(),
        balance_after_micros: balance_after,
        issued_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        kid: String::new(),
        sig: String::new(),
    }
    .sign(&app.signer)
    .map_err(internal)?;
    let meta = result
        .meta
        .get_or_insert_with(|| MetaObject(serde_json::Map::new()));
    meta.0.insert(
        RECEIPT_META_KEY.into(),
        serde_json::to_value(&receipt).map_err(internal)?,
    );
    Ok(result)
}

/// The length in bytes of `value` serialized as JSON (0 if it cannot be), counted as
/// it is written rather than by building the text: a result may be megabytes.
fn json_len(value: &impl serde::Serialize) -> i64 {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => i64::try_from(count.0).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

async fn wallet(app: &App, account_id: &str) -> Result<i64, ErrorData> {
    Ok(app
        .ledger
        .account_balance(account_id)
        .await
        .map_err(internal)?
        .wallet_micros)
}

/// Adds `_meta["mcp-marketplace/error"]` to an upstream's own error result, which
/// otherwise passes through unchanged.
fn mark_error(result: &mut CallToolResult, kind: &str) {
    let meta = result
        .meta
        .get_or_insert_with(|| MetaObject(serde_json::Map::new()));
    meta.0.insert(
        super::tools::ERROR_META_KEY.into(),
        json!({"kind": kind, "retry_after_s": null}),
    );
}

enum Failure {
    Upstream(UpstreamError),
    Cancelled,
    Blocked(Vec<Finding>),
}

/// Content protection of an upstream's result (after the forward, before settle), on
/// the result as the upstream sent it (`value`, the JSON-RPC response's `result`):
/// the policy's redaction paths are removed, then the result is scanned. Block mode
/// turns findings into [`Failure::Blocked`] (audited as `call.blocked`); flag mode
/// adds them under `_meta["mcp-marketplace/warnings"]`. Then the result becomes the
/// typed `CallToolResult` rmcp sends, in one conversion that moves its strings: the
/// parsed form is built once per call, and neither step copies it.
///
/// The scan reads every string the upstream sent, including members a
/// `CallToolResult` has no field for (which are not passed on).
///
/// # Errors
/// [`Failure::Blocked`] in block mode with findings; [`Failure::Upstream`] with
/// [`UpstreamError::Protocol`] when the result is not a `CallToolResult`.
async fn protect(
    app: &App,
    key: &crate::auth::KeyContext,
    slug: &str,
    tool: &str,
    call_id: &str,
    policy: &Effective,
    mut value: Value,
) -> Result<CallToolResult, Failure> {
    let typed = |value| {
        serde_json::from_value::<CallToolResult>(value).map_err(|_| {
            Failure::Upstream(UpstreamError::Protocol(
                "the result is not a CallToolResult".into(),
            ))
        })
    };
    if policy.redact.is_empty() && policy.scan == ScanMode::Off {
        return typed(value);
    }
    crate::security::redact::redact_result(&mut value, &policy.redact);
    let findings = if policy.scan == ScanMode::Off {
        Vec::new()
    } else {
        scan::scan(&value)
    };
    if !findings.is_empty() {
        tracing::warn!(%call_id, server = %slug, %tool, findings = findings.len(), mode = policy.scan.as_str(), "suspicious upstream content");
        if policy.scan == ScanMode::Block {
            let _ = audit::record(
                &app.store,
                &Actor::Key {
                    key_id: key.key_id.clone(),
                    account: key.account_name.clone(),
                },
                "call.blocked",
                call_id,
                json!({"server": slug, "tool": tool, "findings": findings}),
            )
            .await;
            return Err(Failure::Blocked(findings));
        }
        if let Some(obj) = value.as_object_mut() {
            let meta = obj.entry("_meta").or_insert_with(|| json!({}));
            if !meta.is_object() {
                *meta = json!({});
            }
            meta[WARNINGS_META_KEY] = json!(findings);
        }
    }
    typed(value)
}

/// Step 6: sends `tools/call` upstream (failover and retries as `retry_safe` allows),
/// relaying progress and log messages to the client meanwhile; returns the JSON-RPC
/// response's `result` as the upstream sent it, unchecked ([`protect`] checks it).
#[allow(clippy::too_many_arguments)]
async fn forward(
    app: &App,
    caller: &Caller,
    server: &crate::catalog::Server,
    tool: &str,
    retry_safe: bool,
    args: serde_json::Map<String, Value>,
    call_id: &str,
    price: i64,
    ctx: &RequestContext<RoleServer>,
) -> Result<Value, Failure> {
    let key = &caller.key;
    let fixed = app.upstream_headers(server).await.map_err(|e| {
        tracing::error!(server = %server.slug, error = %e, "cannot build the upstream headers");
        Failure::Upstream(UpstreamError::Protocol(
            "server credentials unavailable".into(),
        ))
    })?;
    let now = now_secs();
    let token = app
        .signer
        .upstream_token(&UpstreamClaims {
            iss: app.config.public_url.clone(),
            aud: server.slug.clone(),
            sub: app.signer.pseudonym(&key.account_id, &server.id),
            jti: call_id.to_owned(),
            iat: now,
            exp: now + UPSTREAM_TOKEN_TTL_SECS,
            tool: tool.to_owned(),
            price_micros: price,
        })
        .map_err(|_| {
            Failure::Upstream(UpstreamError::Protocol(
                "cannot sign the upstream token".into(),
            ))
        })?;
    let extra = headers(&[(TOKEN_HEADER, &token), (REQUEST_ID_HEADER, call_id)]);

    // Upstream progress uses our own token (the call id) so two client sessions of one
    // account never mix; it is mapped back to the client's token here.
    let client_token = ctx.meta.get_progress_token();
    let mut params = json!({"name": tool, "arguments": args});
    if client_token.is_some() {
        params["_meta"] = json!({"progressToken": call_id});
    }
    // Messages of the call's own stream and of the session's standalone stream (log
    // messages) reach the client while the call runs; `tools/list_changed` is not relayed
    // but refreshes the catalog.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let client_session = ctx
        .extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.headers.get("mcp-session-id"))
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| call_id.to_owned(), str::to_owned);
    let relay_to_client = async {
        while let Some(message) = rx.recv().await {
            if message.get("method").and_then(Value::as_str)
                == Some("notifications/tools/list_changed")
            {
                app.request_refresh(&server.id);
            } else {
                relay(&ctx.peer, &message, call_id, client_token.as_ref()).await;
            }
        }
    };
    let timeout = Duration::from_millis(server.timeout_ms as u64);
    let send = {
        let relay = crate::upstream::failover::Relay {
            client: client_session,
            tx: tx.clone(),
        };
        let on_message = move |message: Value| {
            let _ = tx.send(message);
        };
        // Both senders drop when the send ends, which ends `relay_to_client` once it has
        // passed on what was received.
        async move {
            crate::upstream::failover::send(
                app,
                &key.account_id,
                server,
                &fixed,
                "tools/call",
                params,
                &extra,
                &on_message,
                Some(&relay),
                retry_safe,
                timeout,
                &ctx.ct,
            )
            .await
        }
    };
    let (sent, ()) = tokio::join!(send, relay_to_client);
    match sent {
        Ok(result) => Ok(result),
        Err(crate::upstream::failover::SendError::Upstream(e)) => Err(Failure::Upstream(e)),
        Err(crate::upstream::failover::SendError::Cancelled) => Err(Failure::Cancelled),
    }
}

// Logging is deprecated by SEP-2577 but upstreams on protocol versions up to 2025-11-25
// still send it, and clients of those versions still show it.
#[allow(deprecated)]
/// Passes one upstream message to the client: progress for this call (with the
/// client's token), log messages; a `tools/list_changed` is not relayed (the catalog
/// refresh handles it).
async fn relay(
    peer: &rmcp::Peer<RoleServer>,
    message: &Value,
    our_token: &str,
    client_token: Option<&ProgressToken>,
) {
    let method = message.get("method").and_then(Value::as_str).unwrap_or("");
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    match method {
        "notifications/progress" => {
            let Some(client_token) = client_token else {
                return;
            };
            if params.get("progressToken").and_then(Value::as_str) != Some(our_token) {
                return;
            }
            let mut p = params;
            p["progressToken"] = serde_json::to_value(client_token).unwrap_or(Value::Null);
            if let Ok(p) = serde_json::from_value::<ProgressNotificationParam>(p) {
                let _ = peer.notify_progress(p).await;
            }
        }
        "notifications/message" => {
            if let Ok(p) =
                serde_json::from_value::<rmcp::model::LoggingMessageNotificationParam>(params)
            {
                let _ = peer.notify_logging_message(p).await;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_is_the_length_of_the_json_text() {
        let values = [
            json!({}),
            json!({"message": "héllo \"world\"\n", "n": [1, 2.5, -3], "nested": {"ok": true, "none": null}}),
            json!("x".repeat(100_000)),
        ];
        for value in values {
            assert_eq!(
                json_len(&value),
                serde_json::to_vec(&value).unwrap().len() as i64
            );
        }
    }
}
