//! The rate limit in front of rmcp (DESIGN.md call path step 3, "Errors a client
//! sees"). A `tools/call` arrives inside a POST that rmcp handles, and a 429 must be
//! an HTTP answer, so this runs in the axum layer after the key was authenticated:
//! it buffers the body (capped at `max_request_bytes`), recognises each `tools/call`
//! in it, resolves the server it names (`{slug}__{tool}` on `/mcp`, the path's slug on
//! `/servers/{slug}/mcp`), checks the limiters, and either answers HTTP 429 with
//! `Retry-After` and a JSON-RPC error whose `error.data.kind` is `rate_limited`
//! (echoing the request id), or passes the request on unchanged. Nothing is reserved
//! before this point, so a refused call is never charged.

use std::borrow::Cow;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Caller;
use super::tools::MARKETPLACE_PREFIX;
use crate::app::App;
use crate::catalog::namespace::SEPARATOR;
use crate::security::ratelimit::Refusal;

/// JSON-RPC error code of a rate-limited request (implementation-defined server error
/// range −32000…−32099 of JSON-RPC 2.0 §5.1).
pub const RATE_LIMITED_CODE: i64 = -32029;

/// One `tools/call` found in a request body.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The JSON-RPC id (echoed in a refusal).
    pub id: Value,
    /// `params.name`.
    pub name: String,
}

/// The members of a JSON-RPC message the rate limit reads. The others (a call's
/// arguments, however large) are skipped while parsing, not copied.
#[derive(serde::Deserialize)]
struct Message<'a> {
    #[serde(default)]
    id: Value,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(serde::Deserialize)]
struct Params<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

impl Message<'_> {
    fn tool_call(self) -> Option<ToolCall> {
        if self.method.as_deref() != Some("tools/call") {
            return None;
        }
        Some(ToolCall {
            id: self.id,
            name: self.params?.name.into_owned(),
        })
    }
}

/// The `tools/call` requests in a JSON-RPC body: one message, or each message of a
/// batch array. Anything else (other methods, notifications, malformed JSON, a name
/// that is not a string) yields nothing here and is left to rmcp to answer.
///
/// A body whose messages have the usual shape is read without building its JSON
/// tree; any other (a `params` that is not an object, a duplicate member, …) is read
/// as a whole `Value`, with the same answer.
pub fn tool_calls(body: &[u8]) -> Vec<ToolCall> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let shaped = if first == Some(&b'[') {
        serde_json::from_slice::<Vec<Message<'_>>>(body).ok()
    } else {
        serde_json::from_slice::<Message<'_>>(body)
            .ok()
            .map(|m| vec![m])
    };
    if let Some(messages) = shaped {
        return messages
            .into_iter()
            .filter_map(Message::tool_call)
            .collect();
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let one = |m: &Value| -> Option<ToolCall> {
        if m.get("method")?.as_str()? != "tools/call" {
            return None;
        }
        Some(ToolCall {
            id: m.get("id").cloned().unwrap_or(Value::Null),
            name: m.get("params")?.get("name")?.as_str()?.to_owned(),
        })
    };
    match &value {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// The slug a `tools/call` of `name` is for: the path's on `/servers/{slug}/mcp`, the
/// `{slug}` of `{slug}__{tool}` on `/mcp`; `None` for the marketplace's own tools.
pub fn slug_of<'a>(caller_slug: Option<&'a str>, name: &'a str) -> Option<&'a str> {
    match caller_slug {
        Some(slug) => Some(slug),
        None if name.starts_with(MARKETPLACE_PREFIX) => None,
        None => name.split_once(SEPARATOR).map(|(slug, _)| slug),
    }
}

/// The 429 answer for `refusal`, echoing `id`.
pub fn too_many_requests(id: &Value, refusal: &Refusal, slug: Option<&str>) -> Response {
    let retry = refusal.retry_after_secs();
    let what = match (refusal.scope, slug) {
        (crate::security::ratelimit::Scope::AccountServer, Some(s)) => {
            format!("your account's limit on the server '{s}'")
        }
        (crate::security::ratelimit::Scope::AccountServer, None) => {
            "your account's limit on this server".to_owned()
        }
        (crate::security::ratelimit::Scope::Account, _) => {
            "your account's overall limit".to_owned()
        }
        (crate::security::ratelimit::Scope::Key, _) => "this key's limit".to_owned(),
    };
    let body = json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": RATE_LIMITED_CODE,
            "message": format!(
                "Rate limit exceeded: {what} of {} calls is used up. Retry in {retry} s. You were not charged.",
                refusal.rate
            ),
            "data": {
                "kind": "rate_limited",
                "limit": refusal.scope.as_str(),
                "rate": refusal.rate.to_string(),
                "retry_after_s": retry,
            },
        },
    });
    (
        http::StatusCode::TOO_MANY_REQUESTS,
        [(http::header::RETRY_AFTER, retry.to_string())],
        axum::Json(body),
    )
        .into_response()
}

fn too_large(limit: usize) -> Response {
    (
        http::StatusCode::PAYLOAD_TOO_LARGE,
        axum::Json(json!({"error": {"kind": "request_too_large",
            "message": format!("the request body is larger than {limit} bytes")}})),
    )
        .into_response()
}

/// Buffers a POST body and checks the rate limits of every `tools/call` in it. Returns
/// the request to pass on, or the answer (413 or 429) to send instead.
pub async fn check(
    app: &App,
    caller: &Caller,
    req: axum::extract::Request,
) -> Result<axum::extract::Request, Response> {
    if req.method() != http::Method::POST {
        return Ok(req);
    }
    let limit = app.config.max_request_bytes;
    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit))?;
    for call in tool_calls(&bytes) {
        let slug = slug_of(caller.slug.as_deref(), &call.name);
        // Only a server that exists gets a per-server limiter (arbitrary names must not
        // grow the limiter map); an unknown one is answered by the call path.
        let server_id = match slug {
            Some(s) => app.catalog.id_of(s).await.map_err(internal)?,
            None => None,
        };
        let policy = app
            .effective_policy(server_id.as_deref(), &caller.key)
            .await
            .map_err(internal)?;
        if let Err(refusal) = app.rate_limits.check(
            &caller.key.key_id,
            &caller.key.account_id,
            server_id.as_deref(),
            &policy.limits,
        ) {
            tracing::info!(account = %caller.key.account_name, limit = refusal.scope.as_str(), "rate limited");
            return Err(too_many_requests(&call.id, &refusal, slug));
        }
    }
    Ok(axum::extract::Request::from_parts(parts, Body::from(bytes)))
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "rate limit lookup failed");
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        "temporarily unavailable",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_tool_calls_and_their_server() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"units__convert","arguments":{}}}"#;
        let calls = tool_calls(body);
        assert_eq!(
            calls,
            vec![ToolCall {
                id: json!(7),
                name: "units__convert".into()
            }]
        );
        assert_eq!(slug_of(None, "units__convert"), Some("units"));
        assert_eq!(slug_of(None, "marketplace__get_balance"), None);
        assert_eq!(slug_of(Some("units"), "convert"), Some("units"));
        assert!(tool_calls(b"{not json").is_empty());
        assert!(tool_calls(br#"{"method":"tools/list","id":1}"#).is_empty());
        assert!(
            tool_calls(br#"{"method":"tools/call","id":1,"params":{"name":{"$ne":1}}}"#).is_empty()
        );
        let batch = br#"[{"method":"tools/call","id":1,"params":{"name":"a__b"}},{"method":"ping","id":2}]"#;
        assert_eq!(tool_calls(batch).len(), 1);
    }

    /// The shaped reading and the whole-`Value` reading agree, including on bodies
    /// only the second can read.
    #[test]
    fn unusual_bodies_get_the_same_answer() {
        let call = |id: Value, name: &str| ToolCall {
            id,
            name: name.into(),
        };
        for (body, expected) in [
            // Escapes in the method and the name, arguments skipped, no id.
            (
                &br#" {"method":"tools\/call","params":{"name":"a__\u0062","arguments":{"t":"x\"y"}}}"#[..],
                vec![call(Value::Null, "a__b")],
            ),
            // A duplicate member: the last one counts, as in a `Value`.
            (
                br#"{"method":"ping","method":"tools/call","id":"x","params":{"name":"a__b"}}"#,
                vec![call(json!("x"), "a__b")],
            ),
            // One odd message in a batch does not hide the others.
            (
                br#"[{"method":"tools/call","id":1,"params":["a__b"]},{"method":"tools/call","id":2,"params":{"name":"c__d"}},{"method":7}]"#,
                vec![call(json!(2), "c__d")],
            ),
            (br#"{"method":"tools/call","id":3}"#, vec![]),
            (br#"[]"#, vec![]),
            (br#"[1, "x", null]"#, vec![]),
        ] {
            assert_eq!(tool_calls(body), expected, "{}", String::from_utf8_lossy(body));
        }
    }
}
