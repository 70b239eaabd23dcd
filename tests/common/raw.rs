//! Raw MCP over HTTP for tests that must see status codes and headers (429, 413, 401)
//! and send what no SDK would: one initialized streamable-HTTP session, POSTs of
//! arbitrary bodies, answers parsed from JSON or SSE.

use serde_json::Value;

/// `initialize` of protocol 2025-06-18.
pub const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;

/// One answer: status, headers, and the JSON-RPC response (from JSON or the SSE
/// stream), if any.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub message: Option<Value>,
}

impl Answer {
    /// `error.data.kind` of a JSON-RPC error answer.
    pub fn error_kind(&self) -> Option<String> {
        self.message
            .as_ref()?
            .pointer("/error/data/kind")?
            .as_str()
            .map(str::to_owned)
    }

    /// `_meta["mcp-marketplace/error"].kind` of a tool result.
    pub fn tool_error_kind(&self) -> Option<String> {
        self.message
            .as_ref()?
            .pointer("/result/_meta/mcp-marketplace~1error/kind")?
            .as_str()
            .map(str::to_owned)
    }
}

/// An initialized session on one MCP endpoint.
pub struct RawSession {
    pub url: String,
    pub key: String,
    pub session: Option<String>,
    client: reqwest::Client,
}

impl RawSession {
    /// Initializes a session on `url` with `key`.
    pub async fn open(url: &str, key: &str) -> Self {
        let mut s = Self {
            url: url.to_owned(),
            key: key.to_owned(),
            session: None,
            client: reqwest::Client::new(),
        };
        let a = s.post(INIT).await;
        assert_eq!(a.status, 200, "initialize: {}", a.body);
        s.session = a
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let n = s
            .post(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await;
        assert!(n.status < 300, "initialized: {}", n.body);
        s
    }

    /// POSTs `body` with the session's key and id.
    pub async fn post(&self, body: &str) -> Answer {
        self.post_with(body, &[]).await
    }

    /// POSTs `body` with extra headers (which replace the defaults of the same name).
    pub async fn post_with(&self, body: &str, extra: &[(&str, &str)]) -> Answer {
        let mut req = self
            .client
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2025-06-18")
            .bearer_auth(&self.key)
            .body(body.to_owned());
        if let Some(id) = &self.session {
            req = req.header("mcp-session-id", id);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let r = req.send().await.expect("the marketplace answers");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap_or_default();
        let message = parse(&body);
        Answer {
            status,
            headers,
            body,
            message,
        }
    }

    /// A `tools/call` of `name` with `arguments`, id `id`.
    pub async fn call(&self, id: u64, name: &str, arguments: Value) -> Answer {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}});
        self.post(&body.to_string()).await
    }
}

/// The JSON-RPC response in a JSON body or an SSE stream (the message with an id).
pub fn parse(body: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return Some(v);
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|m| m.get("id").is_some())
}
