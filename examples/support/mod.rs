//! What the load and memory benchmarks share (included by `examples/loadbench.rs` and
//! `examples/sessions.rs` with `#[path]`): the fast upstream they measure against,
//! the marketplace settings of a benchmark, and reading a JSON-RPC answer.

use std::sync::Arc;

use anyhow::{Result, bail};
use mcp_marketplace::billing::PlanBook;
use mcp_marketplace::billing::plans::{PlanFile, QuotaSetting};
use mcp_marketplace::config::{Config, RateLimitsFile};
use mcp_marketplace::security::ratelimit::{Limits, Rate};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// Text to send back.
    message: String,
}

/// An rmcp streamable-HTTP server answering as fast as rmcp can.
#[derive(Debug, Clone)]
struct Echo {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Echo {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Send the message back (paid).")]
    fn echo(&self, Parameters(a): Parameters<EchoArgs>) -> CallToolResult {
        CallToolResult::success(vec![ContentBlock::text(a.message)])
    }

    #[tool(description = "Send the message back (free).")]
    fn echo_free(&self, Parameters(a): Parameters<EchoArgs>) -> CallToolResult {
        CallToolResult::success(vec![ContentBlock::text(a.message)])
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// Starts the echo upstream on 127.0.0.1 (an ephemeral port, `TCP_NODELAY`) until
/// `cancel`; returns its MCP URL. Tools: `echo` and `echo_free`, each sending back
/// `message`.
///
/// # Errors
/// When the port cannot be bound.
pub async fn spawn_echo(cancel: CancellationToken) -> Result<String> {
    use axum::serve::ListenerExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
        || Ok(Echo::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_cancellation_token(cancel.child_token()),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
    });
    Ok(format!("http://{addr}/mcp"))
}

/// The first JSON-RPC message of an answer: the body itself (`application/json`) or the
/// first `data:` line of an SSE stream (`text/event-stream`).
///
/// # Errors
/// When the body is not JSON or the stream carries no message.
pub fn first_message(content_type: &str, body: &[u8]) -> Result<Value> {
    if content_type.starts_with("text/event-stream") {
        let text = std::str::from_utf8(body)?;
        for line in text.lines() {
            if let Some(data) = line.strip_prefix("data:") {
                let data = data.trim();
                if !data.is_empty() {
                    return Ok(serde_json::from_str(data)?);
                }
            }
        }
        bail!("an SSE answer without a message")
    }
    Ok(serde_json::from_slice(body)?)
}

/// Turns off what a benchmark is not about: rate limits and the monthly call quota (the
/// only plan, `free`, is unlimited), so every call goes the whole metered path (rate
/// limiting itself still runs).
///
/// # Errors
/// When the plan book cannot be built.
pub fn unlimited(config: &mut Config) -> Result<()> {
    config.rate_limits = Limits {
        per_key: Rate::Off,
        per_account: Rate::Off,
        per_account_per_server: Rate::Off,
    };
    let unlimited = PlanFile {
        monthly_calls: Some(QuotaSetting::Text("unlimited".into())),
        rate_limits: RateLimitsFile {
            per_key: Some("off".into()),
            per_account: Some("off".into()),
            per_account_per_server: Some("off".into()),
        },
        ..PlanFile::default()
    };
    config.billing.plans = Arc::new(
        PlanBook::from_config(&[("free".to_owned(), unlimited)].into(), None)
            .map_err(anyhow::Error::msg)?,
    );
    Ok(())
}
