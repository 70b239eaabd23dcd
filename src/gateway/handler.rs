//! The rmcp `ServerHandler` of one downstream session.

use std::sync::{Arc, OnceLock};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, InitializeRequestParams,
    InitializeResult, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tracing::Instrument;

use super::Caller;
use crate::app::App;

/// The account and endpoint a session was initialized by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Binding {
    account_id: String,
    slug: Option<String>,
}

/// One downstream session's handler. The same type serves `/mcp` and
/// `/servers/{slug}/mcp`; the [`Caller`] of each request says which.
#[derive(Debug, Clone)]
pub struct GatewayHandler {
    app: Arc<App>,
    binding: Arc<OnceLock<Binding>>,
}

impl GatewayHandler {
    /// A handler for a new session.
    pub fn new(app: Arc<App>) -> Self {
        Self {
            app,
            binding: Arc::new(OnceLock::new()),
        }
    }

    /// The request's caller, checked against the session's binding: a session id used
    /// with another account's key, or on another endpoint, is refused.
    fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
        let caller = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<Caller>())
            .cloned()
            .ok_or_else(|| {
                ErrorData::internal_error("request without an authenticated caller", None)
            })?;
        if let Some(b) = self.binding.get()
            && (b.account_id != caller.key.account_id || b.slug != caller.slug)
        {
            return Err(ErrorData::invalid_request(
                "this session belongs to another account or endpoint; initialize a new session",
                Some(serde_json::json!({"kind": "session_mismatch"})),
            ));
        }
        Ok(caller)
    }
}

impl ServerHandler for GatewayHandler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().enable_tool_list_changed().build())
            .with_server_info(Implementation::new("mcp-marketplace", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "One URL for many paid MCP servers. Tools are named {server}__{tool}; each carries its \
                 price per call in _meta[\"mcp-marketplace/price\"] (micros of USD). Every result carries a \
                 signed receipt; failed calls are never charged. marketplace__* tools manage your installs \
                 and balance.",
            )
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        let caller = self.caller(&context)?;
        let binding = Binding {
            account_id: caller.key.account_id.clone(),
            slug: caller.slug.clone(),
        };
        if let Some(slug) = &caller.slug {
            // A one-server endpoint must name a callable server.
            match self.app.catalog.cached(slug).await {
                Ok(Some(s)) if s.status.is_callable() => {}
                _ => {
                    return Err(ErrorData::invalid_params(
                        format!("Unknown server: {slug}"),
                        Some(serde_json::json!({"kind": "unknown_server"})),
                    ));
                }
            }
        }
        if self.binding.set(binding).is_ok() {
            self.app.notifier.register(
                &caller.key.account_id,
                caller.slug.as_deref(),
                context.peer.clone(),
            );
        }
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let caller = self.caller(&context)?;
        let tools = super::tools::list(&self.app, &caller).await?;
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = self.caller(&context)?;
        // Everything logged during the call carries its call id (recorded by the call
        // path once made; also sent upstream as X-Request-Id).
        let span = tracing::info_span!("tools/call", tool = %request.name, call_id = tracing::field::Empty);
        let name = request.name.to_string();
        let result = super::call::call_tool(&self.app, &caller, request, &context)
            .instrument(span)
            .await?;
        crate::telemetry::record_refusal(&name, caller.slug.as_deref(), &result);
        Ok(result.into())
    }
}
