//! A fault-injecting upstream MCP server for tests: real rmcp over streamable HTTP,
//! with tools that succeed, fail, sleep or answer big, and an HTTP-level mode that
//! answers `tools/call` with HTTP 500.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

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

#[derive(Clone)]
struct Faulty;

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
        Ok(ListToolsResult::with_all_items(vec![
            tool(
                "add",
                "Adds a and b.",
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
        ]))
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
            other => return Err(ErrorData::invalid_params(format!("no tool {other}"), None)),
        };
        Ok(result.into())
    }
}

/// A running fault server.
pub struct FaultServer {
    pub url: String,
    pub mode: Arc<AtomicU8>,
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
        let service = StreamableHttpService::new(
            || Ok(Faulty),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default().with_cancellation_token(ct.child_token()),
        );
        let m = mode.clone();
        let router =
            axum::Router::new()
                .route_service("/mcp", service)
                .layer(axum::middleware::from_fn(
                    move |req: Request, next: Next| {
                        let m = m.clone();
                        async move {
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
            mode,
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
