//! A fault-injecting upstream MCP server for tests: real rmcp over streamable HTTP,
//! with tools that succeed, fail, sleep, answer big or echo what they are given, an
//! HTTP-level mode that answers `tools/call` with HTTP 500, a tool list that can change
//! at run time (the rug pull), a required credential header, and a record of the
//! headers every request carried.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mcp_marketplace::demo::upstreams::SecretSlot;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Serve MCP normally.
pub const NORMAL: u8 = 0;
/// Answer every `tools/call` POST with HTTP 500.
pub const HTTP_500: u8 = 1;

/// What a test can change or observe while the server runs.
#[derive(Default)]
pub struct FaultState {
    /// Appended to the description of `add` (a changed tool).
    pub add_description_suffix: RwLock<String>,
    /// Offer the extra tool `added_later` (a new tool).
    pub extra_tool: AtomicBool,
    /// A header every request must carry, else HTTP 401.
    pub required_header: RwLock<Option<(String, String)>>,
    /// The headers of every request, in order.
    pub seen: Mutex<Vec<http::HeaderMap>>,
}

#[derive(Clone)]
struct Faulty(Arc<FaultState>);

fn tool(name: &str, description: &str, props: serde_json::Value) -> Tool {
    serde_json::from_value(json!({
        "name": name, "description": description,
        "inputSchema": {"type": "object", "properties": props},
    }))
    .expect("valid tool")
}

impl ServerHandler for Faulty {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _r: Option<PaginatedRequestParams>,
        _c: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let suffix = self.0.add_description_suffix.read().unwrap().clone();
        let mut tools = vec![
            tool(
                "add",
                &format!("Adds a and b.{suffix}"),
                json!({"a": {"type": "number"}, "b": {"type": "number"}}),
            ),
            tool("fail", "Always fails with isError.", json!({})),
            tool(
                "sleep",
                "Sleeps ms milliseconds.",
                json!({"ms": {"type": "integer"}}),
            ),
            tool(
                "big",
                "Answers with bytes bytes of text.",
                json!({"bytes": {"type": "integer"}}),
            ),
            tool(
                "echo",
                "Answers with text, as text content.",
                json!({"text": {"type": "string"}}),
            ),
            tool(
                "json",
                "Answers with value as structured content and as JSON text.",
                json!({"value": {"type": "object"}}),
            ),
        ];
        if self.0.extra_tool.load(Ordering::SeqCst) {
            tools.push(tool(
                "added_later",
                "A tool that appeared later.",
                json!({}),
            ));
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _c: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let num = |k: &str| args.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        let result = match request.name.as_ref() {
            "add" => {
                CallToolResult::success(vec![ContentBlock::text((num("a") + num("b")).to_string())])
            }
            "fail" => CallToolResult::error(vec![ContentBlock::text("deliberate failure")]),
            "sleep" => {
                tokio::time::sleep(std::time::Duration::from_millis(num("ms") as u64)).await;
                CallToolResult::success(vec![ContentBlock::text("slept")])
            }
            "big" => {
                CallToolResult::success(vec![ContentBlock::text("x".repeat(num("bytes") as usize))])
            }
            "echo" => CallToolResult::success(vec![ContentBlock::text(
                args.get("text").and_then(|v| v.as_str()).unwrap_or(""),
            )]),
            "json" => {
                let value = args.get("value").cloned().unwrap_or(json!({}));
                let mut r = CallToolResult::structured(value.clone());
                r.content = vec![ContentBlock::text(value.to_string())];
                r
            }
            "added_later" => CallToolResult::success(vec![ContentBlock::text("later")]),
            other => return Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        };
        Ok(result.into())
    }
}

/// A running fault server.
pub struct FaultServer {
    pub url: String,
    /// `HOST:PORT`.
    pub addr: String,
    pub mode: Arc<AtomicU8>,
    pub state: Arc<FaultState>,
    pub secret: SecretSlot,
    ct: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    pub async fn start() -> Self {
        let listener = super::bind().await;
        let addr = listener.local_addr().expect("addr");
        let ct = CancellationToken::new();
        let mode = Arc::new(AtomicU8::new(NORMAL));
        let secret = SecretSlot::default();
        let state = Arc::new(FaultState::default());
        let handler = Faulty(state.clone());
        let service = StreamableHttpService::new(
            move || Ok(handler.clone()),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default().with_cancellation_token(ct.child_token()),
        );
        let m = mode.clone();
        let st = state.clone();
        let router =
            axum::Router::new()
                .route_service("/mcp", service)
                .layer(axum::middleware::from_fn(
                    move |req: Request, next: Next| {
                        let m = m.clone();
                        let st = st.clone();
                        async move {
                            st.seen.lock().unwrap().push(req.headers().clone());
                            let required = st.required_header.read().unwrap().clone();
                            if let Some((name, value)) = required
                                && req
                                    .headers()
                                    .get(name.as_str())
                                    .and_then(|v| v.to_str().ok())
                                    != Some(value.as_str())
                            {
                                return (http::StatusCode::UNAUTHORIZED, "credential required")
                                    .into_response();
                            }
                            if m.load(Ordering::Relaxed) == HTTP_500
                                && req.method() == http::Method::POST
                            {
                                let (parts, body) = req.into_parts();
                                let bytes = axum::body::to_bytes(body, 1 << 20)
                                    .await
                                    .unwrap_or_default();
                                if String::from_utf8_lossy(&bytes).contains("tools/call") {
                                    return (http::StatusCode::INTERNAL_SERVER_ERROR, "boom")
                                        .into_response();
                                }
                                return next
                                    .run(Request::from_parts(parts, Body::from(bytes)))
                                    .await;
                            }
                            let r: Response = next.run(req).await;
                            r
                        }
                    },
                ));
        let t = ct.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(t.cancelled_owned())
                .await;
        });
        Self {
            url: format!("http://{addr}/mcp"),
            addr: addr.to_string(),
            mode,
            state,
            secret,
            ct,
            task,
        }
    }

    pub fn set_mode(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
    }

    pub async fn stop(self) {
        self.ct.cancel();
        let _ = self.task.await;
    }
}
