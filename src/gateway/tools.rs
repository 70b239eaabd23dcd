//! What `tools/list` shows, and the marketplace's own `marketplace__*` tools.
//!
//! Upstream tools keep their description, schemas and annotations and carry their price
//! in `_meta["mcp-marketplace/price"]`. A tool the key's scopes or allow-list exclude is
//! neither listed nor callable.

use std::collections::HashMap;

use rmcp::ErrorData;
use rmcp::model::{CallToolResult, ContentBlock, MetaObject, Tool};
use serde_json::{Value, json};

use super::Caller;
use crate::app::App;
use crate::auth::Scope;
use crate::billing::Month;
use crate::billing::pricing::{format_pricing, format_usd};
use crate::catalog::{CatalogTool, Server};

/// `_meta` key of a tool's price.
pub const PRICE_META_KEY: &str = "mcp-marketplace/price";
/// `_meta` key of a failed call's error kind.
pub const ERROR_META_KEY: &str = "mcp-marketplace/error";
/// Prefix of the marketplace's own tools.
pub const MARKETPLACE_PREFIX: &str = "marketplace__";
/// Most servers `marketplace__search_servers` returns.
const MAX_SEARCH_RESULTS: usize = 50;

/// A JSON-RPC error for an unknown tool, and equally for one the key may not use
/// (DESIGN.md "Errors a client sees": a key never learns what it cannot call).
pub fn unknown_tool(name: &str) -> ErrorData {
    let shown: String = name.chars().take(128).collect();
    ErrorData::invalid_params(
        format!("Unknown tool: {shown}"),
        Some(json!({"kind": "unknown_tool"})),
    )
}

/// An internal failure, without details.
pub fn internal(err: impl std::fmt::Display) -> ErrorData {
    tracing::error!(error = %err, "internal error");
    ErrorData::internal_error("internal error; please retry", None)
}

fn price_meta(micros: i64) -> Value {
    json!({"micros": micros, "per": "call", "currency": "USD"})
}

/// Turns a cached upstream definition into the listed tool named `name`, with its
/// price in `_meta`. `None` if the definition is not a valid MCP tool.
fn listed(tool: &CatalogTool, name: &str, price_micros: i64) -> Option<Tool> {
    let mut def = tool.definition.clone();
    let obj = def.as_object_mut()?;
    obj.insert("name".into(), Value::String(name.to_owned()));
    let meta = obj.entry("_meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut()?
        .insert(PRICE_META_KEY.into(), price_meta(price_micros));
    serde_json::from_value(def).ok()
}

/// The tools `caller` sees: on `/mcp` the marketplace's tools and those of installed,
/// callable servers, namespaced; on `/servers/{slug}/mcp` that server's, unprefixed.
///
/// # Errors
/// An internal [`ErrorData`] when the store fails.
pub async fn list(app: &App, caller: &Caller) -> Result<Vec<Tool>, ErrorData> {
    let key = &caller.key;
    let mut out = Vec::new();
    let (tools, servers): (Vec<CatalogTool>, HashMap<String, Server>) = match &caller.slug {
        None => {
            out.extend(
                marketplace_tools()
                    .into_iter()
                    .filter(|(t, scope)| {
                        key.allows_tool(&t.name) && scope.is_none_or(|s| key.has_scope(s))
                    })
                    .map(|(t, _)| t),
            );
            let tools = app
                .catalog
                .tools_for_account(&key.account_id)
                .await
                .map_err(internal)?;
            let mut servers = HashMap::new();
            for t in &tools {
                if !servers.contains_key(&t.server_id) {
                    let s = app
                        .catalog
                        .get_by_id(&t.server_id)
                        .await
                        .map_err(internal)?;
                    servers.insert(t.server_id.clone(), s);
                }
            }
            (tools, servers)
        }
        Some(slug) => {
            let server = match app.catalog.get(slug).await {
                Ok(s) if s.status.is_callable() => s,
                _ => return Ok(Vec::new()),
            };
            let tools = app
                .catalog
                .tools_of_server(&server.id)
                .await
                .map_err(internal)?;
            (tools, HashMap::from([(server.id.clone(), server)]))
        }
    };
    if !key.has_scope(Scope::Invoke) {
        return Ok(out);
    }
    for t in &tools {
        let Some(server) = servers.get(&t.server_id) else {
            continue;
        };
        if !key.allows_tool(&t.namespaced_name) {
            continue;
        }
        let price = if server.owner_account_id == key.account_id {
            0
        } else {
            server.price_of(&t.name)
        };
        let name = if caller.slug.is_some() {
            &t.name
        } else {
            &t.namespaced_name
        };
        if let Some(tool) = listed(t, name, price) {
            out.push(tool);
        }
    }
    Ok(out)
}

fn tool(name: &str, description: &str, schema: Value, read_only: bool) -> Tool {
    let mut def = json!({
        "name": format!("{MARKETPLACE_PREFIX}{name}"),
        "description": description,
        "inputSchema": schema,
        "annotations": {"readOnlyHint": read_only, "openWorldHint": false},
        "_meta": {PRICE_META_KEY: price_meta(0)},
    });
    if !read_only && let Some(a) = def.pointer_mut("/annotations") {
        a["idempotentHint"] = json!(true);
        a["destructiveHint"] = json!(false);
    }
    serde_json::from_value(def).expect("marketplace tool definitions are valid MCP tools")
}

/// The marketplace's own tools with the scope each needs (`None`: any key).
pub fn marketplace_tools() -> Vec<(Tool, Option<Scope>)> {
    let slug_schema = json!({
        "type": "object",
        "properties": {"slug": {"type": "string", "description": "The server's slug, e.g. 'unit-converter'."}},
        "required": ["slug"],
    });
    vec![
        (
            tool(
                "get_balance",
                "Your marketplace wallet: spendable balance, credits held for calls in flight and creator \
                 earnings, in micros of USD (1 USD = 1,000,000) and as decimal strings; your plan, spend \
                 this month against its quota and this key's spend limit, and the low-balance threshold.",
                json!({"type": "object", "properties": {}}),
                true,
            ),
            None,
        ),
        (
            tool(
                "get_usage",
                "Your usage this month (or the month given as YYYY-MM, UTC): your plan, calls counted \
                 against its monthly quota and calls left, spend, this key's spend limit, the low-balance \
                 threshold, and calls and charges per server and tool. Money in micros of USD.",
                json!({"type": "object", "properties": {
                    "month": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}$",
                              "description": "A UTC month such as 2026-11; default: this month."}
                }}),
                true,
            ),
            None,
        ),
        (
            tool(
                "search_servers",
                "Search the marketplace's MCP servers by keyword (name, description, category). Returns \
                 each server's slug, description, price per call, tools and whether you installed it.",
                json!({"type": "object", "properties": {
                    "query": {"type": "string", "description": "Keywords; empty lists every server."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_RESULTS}
                }}),
                true,
            ),
            Some(Scope::CatalogRead),
        ),
        (
            tool(
                "get_server",
                "Details of one marketplace server: description, price per call, per-tool prices and tools.",
                slug_schema.clone(),
                true,
            ),
            Some(Scope::CatalogRead),
        ),
        (
            tool(
                "install_server",
                "Install a marketplace server: its tools appear in this tool list as {slug}__{tool} \
                 (a tools/list_changed notification follows). Installing is free; calls are charged.",
                slug_schema.clone(),
                false,
            ),
            Some(Scope::Invoke),
        ),
        (
            tool(
                "uninstall_server",
                "Uninstall a marketplace server: its tools leave this tool list.",
                slug_schema,
                false,
            ),
            Some(Scope::Invoke),
        ),
    ]
}

fn ok(value: Value) -> CallToolResult {
    let mut r = CallToolResult::structured(value.clone());
    r.content = vec![ContentBlock::text(value.to_string())];
    r
}

/// A tool error the model can act on, with `_meta["mcp-marketplace/error"]`.
pub fn tool_error(kind: &str, message: String, retry_after_s: Option<u64>) -> CallToolResult {
    let mut r = CallToolResult::error(vec![ContentBlock::text(message)]);
    let mut meta = serde_json::Map::new();
    meta.insert(
        ERROR_META_KEY.into(),
        json!({"kind": kind, "retry_after_s": retry_after_s}),
    );
    r.meta = Some(MetaObject(meta));
    r
}

/// The caller's plan, spend and limits for `month` as JSON.
async fn spend_summary(
    app: &App,
    key: &crate::auth::KeyContext,
    month: Month,
) -> Result<Value, ErrorData> {
    let summary = crate::billing::usage::spend_summary(
        &app.ledger,
        &key.account_id,
        Some((key.key_id.as_str(), key.spend_limits.as_slice())),
        month,
    )
    .await
    .map_err(internal)?;
    serde_json::to_value(summary).map_err(internal)
}

/// Adds the fields of object `extra` to object `out`.
fn merge(out: &mut Value, extra: Value) {
    if let (Some(out), Value::Object(extra)) = (out.as_object_mut(), extra) {
        out.extend(extra);
    }
}

fn server_summary(s: &Server, installed: bool, tools: &[CatalogTool]) -> Value {
    json!({
        "slug": s.slug,
        "name": s.name,
        "description": s.description,
        "categories": s.categories,
        "price_micros": s.price_micros,
        "pricing": format_pricing(s.price_micros),
        "tool_prices_micros": s.tool_prices,
        "installed": installed,
        "tools": tools.iter().map(|t| json!({
            "name": t.namespaced_name,
            "description": t.definition.get("description"),
            "price_micros": s.price_of(&t.name),
        })).collect::<Vec<_>>(),
    })
}

fn slug_arg(args: &serde_json::Map<String, Value>) -> Option<&str> {
    args.get("slug").and_then(Value::as_str)
}

/// Runs marketplace tool `name` (already checked to be one) for `caller`.
///
/// # Errors
/// [`unknown_tool`] when it does not exist or the key lacks its scope; an internal
/// error when the store fails.
pub async fn call_marketplace(
    app: &App,
    caller: &Caller,
    name: &str,
    args: serde_json::Map<String, Value>,
) -> Result<CallToolResult, ErrorData> {
    let key = &caller.key;
    let Some((_, scope)) = marketplace_tools()
        .into_iter()
        .find(|(t, _)| t.name == name)
    else {
        return Err(unknown_tool(name));
    };
    if scope.is_some_and(|s| !key.has_scope(s)) {
        return Err(unknown_tool(name));
    }
    let short = &name[MARKETPLACE_PREFIX.len()..];
    match short {
        "get_balance" => {
            let b = app
                .ledger
                .account_balance(&key.account_id)
                .await
                .map_err(internal)?;
            let month = Month::of_ms(app.ledger.now_ms());
            let summary = spend_summary(app, key, month).await?;
            let mut out = json!({
                "account": key.account_name,
                "balance_micros": b.wallet_micros,
                "balance": format_usd(b.wallet_micros),
                "holds_micros": b.holds_micros,
                "earnings_micros": b.earnings_micros,
                "currency": "USD",
            });
            merge(&mut out, summary);
            Ok(ok(out))
        }
        "get_usage" => {
            let month = match args.get("month") {
                None | Some(Value::Null) => Month::of_ms(app.ledger.now_ms()),
                Some(Value::String(m)) => match m.parse::<Month>() {
                    Ok(m) => m,
                    Err(e) => return Ok(tool_error("invalid_arguments", format!("{e}."), None)),
                },
                Some(_) => {
                    return Ok(tool_error(
                        "invalid_arguments",
                        "Give 'month' as a string such as 2026-11.".into(),
                        None,
                    ));
                }
            };
            let mut out = json!({"account": key.account_name, "currency": "USD"});
            merge(&mut out, spend_summary(app, key, month).await?);
            let tools = crate::billing::usage::by_tool(&app.store, &key.account_id, month)
                .await
                .map_err(internal)?;
            out["by_tool"] = serde_json::to_value(tools).map_err(internal)?;
            Ok(ok(out))
        }
        "search_servers" => {
            let query = args.get("query").and_then(Value::as_str).unwrap_or("");
            let limit = args
                .get("limit")
                .and_then(Value::as_u64)
                .map_or(MAX_SEARCH_RESULTS, |l| {
                    (l as usize).clamp(1, MAX_SEARCH_RESULTS)
                });
            let installed = app
                .catalog
                .installed_slugs(&key.account_id)
                .await
                .map_err(internal)?;
            let mut out = Vec::new();
            for s in app.catalog.search(query, limit).await.map_err(internal)? {
                let tools = app.catalog.tools_of_server(&s.id).await.map_err(internal)?;
                out.push(server_summary(&s, installed.contains(&s.slug), &tools));
            }
            Ok(ok(json!({ "servers": out })))
        }
        "get_server" | "install_server" | "uninstall_server" => {
            let Some(slug) = slug_arg(&args) else {
                return Ok(tool_error(
                    "invalid_arguments",
                    "Give the server's slug in 'slug'.".into(),
                    None,
                ));
            };
            let server = match app.catalog.get(slug).await {
                Ok(s) if s.status.is_callable() || short == "uninstall_server" => s,
                _ => {
                    return Ok(tool_error(
                        "unknown_server",
                        format!(
                            "There is no available server '{}'. Use marketplace__search_servers to find one.",
                            slug.chars().take(64).collect::<String>()
                        ),
                        None,
                    ));
                }
            };
            match short {
                "get_server" => {
                    let installed = app
                        .catalog
                        .installed_slugs(&key.account_id)
                        .await
                        .map_err(internal)?;
                    let tools = app
                        .catalog
                        .tools_of_server(&server.id)
                        .await
                        .map_err(internal)?;
                    Ok(ok(server_summary(
                        &server,
                        installed.contains(&server.slug),
                        &tools,
                    )))
                }
                "install_server" => {
                    let added = app
                        .install(&key.account_id, &server.slug)
                        .await
                        .map_err(internal)?;
                    Ok(ok(
                        json!({"slug": server.slug, "installed": true, "changed": added}),
                    ))
                }
                _ => {
                    let removed = app
                        .uninstall(&key.account_id, &server.slug)
                        .await
                        .map_err(internal)?;
                    Ok(ok(
                        json!({"slug": server.slug, "installed": false, "changed": removed}),
                    ))
                }
            }
        }
        _ => Err(unknown_tool(name)),
    }
}
