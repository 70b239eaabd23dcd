//! What `tools/list` shows, and the marketplace's own `marketplace__*` tools.
//!
//! Upstream tools keep their description, schemas and annotations and carry their price
//! in `_meta["mcp-marketplace/price"]`. A tool the key's scopes or allow-list exclude is
//! neither listed nor callable.

use std::sync::Arc;

use rmcp::ErrorData;
use rmcp::model::{CallToolResult, ContentBlock, MetaObject, Tool};
use serde_json::{Value, json};

use super::Caller;
use crate::app::App;
use crate::auth::Scope;
use crate::billing::Month;
use crate::billing::pricing::format_usd;

/// `_meta` key of a tool's price.
pub const PRICE_META_KEY: &str = crate::catalog::snapshot::PRICE_META_KEY;
/// `_meta` key of a failed call's error kind.
pub const ERROR_META_KEY: &str = "mcp-marketplace/error";
/// Prefix of the marketplace's own tools.
pub const MARKETPLACE_PREFIX: &str = "marketplace__";
/// Most servers `marketplace__search_servers` and tools `marketplace__search_tools`
/// return.
const MAX_SEARCH_RESULTS: usize = 50;
/// The name of `marketplace__call_tool` (run by the call path itself, `gateway::call`).
pub const CALL_TOOL: &str = "marketplace__call_tool";

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
    crate::catalog::snapshot::price_meta(micros)
}

/// The tools `caller` sees: on `/mcp` the marketplace's tools and those of installed,
/// callable servers, namespaced; on `/servers/{slug}/mcp` that server's, unprefixed.
///
/// Served from the catalog snapshot ([`crate::catalog::snapshot`]): the listed form of
/// every server's tools is built once per snapshot and cloned per request, filtered by
/// the account's installs and tool choices and the key's allow-list; no query unless
/// the catalog changed.
///
/// # Errors
/// An internal [`ErrorData`] when the store fails.
pub async fn list(app: &App, caller: &Caller) -> Result<Vec<Tool>, ErrorData> {
    let key = &caller.key;
    let snapshot = app.catalog.snapshot().await.map_err(internal)?;
    let include = |name: &str| key.allows_tool(name);
    match &caller.slug {
        None => {
            let mut out: Vec<Tool> = marketplace_tools()
                .into_iter()
                .filter(|(t, scope)| {
                    key.allows_tool(&t.name) && scope.is_none_or(|s| key.has_scope(s))
                })
                .map(|(t, _)| t)
                .collect();
            if key.has_scope(Scope::Invoke) {
                snapshot.account_tools_into(&mut out, &key.account_id, &include);
            }
            Ok(out)
        }
        Some(slug) if key.has_scope(Scope::Invoke) => {
            Ok(snapshot.server_tools(slug, &key.account_id, &include))
        }
        Some(_) => Ok(Vec::new()),
    }
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
                "Search the marketplace's MCP servers by what you need (full-text over names, descriptions, \
                 categories and tool descriptions), ranked by relevance and reputation. Filters: category, \
                 max_price_micros (price per call ceiling, micros of USD), status, min_rating (1-5). Returns \
                 each server's slug, description, price, reputation (uptime, success rate, latency grade, \
                 rating), tools and whether you installed it.",
                json!({"type": "object", "properties": {
                    "query": {"type": "string", "description": "What you need, e.g. 'weather forecast'; empty lists every server."},
                    "category": {"type": "string"},
                    "max_price_micros": {"type": "integer", "minimum": 0},
                    "status": {"type": "string", "enum": ["active", "degraded", "recovered"]},
                    "min_rating": {"type": "number", "minimum": 1, "maximum": 5},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_RESULTS}
                }}),
                true,
            ),
            Some(Scope::CatalogRead),
        ),
        (
            tool(
                "get_server",
                "Details of one marketplace server: description, price per call, per-tool prices, tools, \
                 reputation (uptime, success rate, latency grade, rating) and reviews.",
                slug_schema.clone(),
                true,
            ),
            Some(Scope::CatalogRead),
        ),
        (
            tool(
                "search_tools",
                "Find tools across the whole marketplace for a task, described in words (e.g. 'convert \
                 kilometres to miles'). Returns namespaced tool names with their server, description, input \
                 schema and price. Call one at once with marketplace__call_tool, or install its server.",
                json!({"type": "object", "properties": {
                    "query": {"type": "string", "description": "The task, in words."},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_RESULTS}
                }, "required": ["query"]}),
                true,
            ),
            Some(Scope::CatalogRead),
        ),
        (
            tool(
                "call_tool",
                "Call any approved marketplace tool by its namespaced name ({slug}__{tool}) without installing \
                 its server. Charged exactly like a direct call (see the tool's price).",
                json!({"type": "object", "properties": {
                    "name": {"type": "string", "description": "A namespaced tool name, e.g. 'units__convert'."},
                    "arguments": {"type": "object", "description": "The tool's arguments."}
                }, "required": ["name"]}),
                false,
            ),
            Some(Scope::Invoke),
        ),
        (
            tool(
                "install_server",
                "Install a marketplace server: its tools appear in this tool list as {slug}__{tool} \
                 (a tools/list_changed notification follows). Give 'tools' to list only some of them. \
                 Installing is free; calls are charged.",
                json!({"type": "object", "properties": {
                    "slug": {"type": "string", "description": "The server's slug, e.g. 'unit-converter'."},
                    "tools": {"type": "array", "items": {"type": "string"},
                              "description": "Only these of its tools (upstream names); default all."}
                }, "required": ["slug"]}),
                false,
            ),
            Some(Scope::Invoke),
        ),
        (
            tool(
                "uninstall_server",
                "Uninstall a marketplace server: its tools leave this tool list.",
                slug_schema.clone(),
                false,
            ),
            Some(Scope::Invoke),
        ),
        (
            tool(
                "rate_server",
                "Rate a server you made at least one paid call to: 1-5 stars and an optional review. \
                 Rating again edits your review.",
                json!({"type": "object", "properties": {
                    "slug": {"type": "string"},
                    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                    "review": {"type": "string", "maxLength": 2000}
                }, "required": ["slug", "rating"]}),
                false,
            ),
            Some(Scope::Invoke),
        ),
        (
            tool(
                "register_server",
                "Register your MCP server with the marketplace (creators). It is verified at once \
                 (handshake, tools/list, schemas) and waits for review unless auto-approved. Returns the \
                 X-MCP-Marketplace-Secret your server must require, shown this once, and the verification \
                 report.",
                json!({"type": "object", "properties": {
                    "name": {"type": "string"},
                    "slug": {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,31}$"},
                    "description": {"type": "string"},
                    "categories": {"type": "array", "items": {"type": "string"}},
                    "endpoint": {"type": "string", "description": "The server's streamable-HTTP URL."},
                    "endpoints": {"type": "array", "items": {"type": "string"}},
                    "pricing": {"type": "string", "description": "'free' or e.g. '0.02_per_request' (USD)."},
                    "tool_prices": {"type": "object", "additionalProperties": {"type": "string"},
                                    "description": "Per-tool USD prices, e.g. {\"create_event\": \"0.05\"}."},
                    "timeout": {"type": "string", "description": "Per-call timeout, e.g. '30s'."},
                    "credentials": {"type": "object", "additionalProperties": {"type": "string"},
                                    "description": "Headers the marketplace sends to your server (stored encrypted)."}
                }, "required": ["name", "pricing"]}),
                false,
            ),
            Some(Scope::ServersWrite),
        ),
        (
            tool(
                "server_analytics",
                "Analytics of one of your servers (creators): calls per day, earnings, error rate, p50/p95 \
                 latency, per tool; plus its status, verification and reputation.",
                json!({"type": "object", "properties": {
                    "slug": {"type": "string"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 90}
                }, "required": ["slug"]}),
                true,
            ),
            Some(Scope::ServersWrite),
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

fn slug_arg(args: &serde_json::Map<String, Value>) -> Option<&str> {
    args.get("slug").and_then(Value::as_str)
}

fn limit_arg(args: &serde_json::Map<String, Value>) -> usize {
    args.get("limit")
        .and_then(Value::as_u64)
        .map_or(MAX_SEARCH_RESULTS, |l| {
            (l.min(MAX_SEARCH_RESULTS as u64) as usize).max(1)
        })
}

/// The target of `marketplace__call_tool`: its `name` and `arguments`, or a tool error
/// result for bad arguments (the call path then runs the target like a direct call).
///
/// # Errors
/// A tool error result (`invalid_arguments`) when `name` is missing, names a
/// marketplace tool, or `arguments` is not an object.
pub fn call_tool_target(
    _key: &crate::auth::KeyContext,
    mut args: serde_json::Map<String, Value>,
) -> Result<(String, serde_json::Map<String, Value>), CallToolResult> {
    let Some(name) = args.get("name").and_then(Value::as_str).map(str::to_owned) else {
        return Err(tool_error(
            "invalid_arguments",
            "Give the namespaced tool name in 'name', e.g. 'units__convert'.".into(),
            None,
        ));
    };
    if name.starts_with(MARKETPLACE_PREFIX) {
        return Err(tool_error(
            "invalid_arguments",
            "marketplace__call_tool calls server tools; call marketplace tools directly.".into(),
            None,
        ));
    }
    let arguments = match args.remove("arguments") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(tool_error(
                "invalid_arguments",
                "Give 'arguments' as an object.".into(),
                None,
            ));
        }
    };
    Ok((name, arguments))
}

/// Runs marketplace tool `name` (already checked to be one) for `caller`.
///
/// # Errors
/// [`unknown_tool`] when it does not exist or the key lacks its scope; an internal
/// error when the store fails.
pub async fn call_marketplace(
    app: &Arc<App>,
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
            let limit = limit_arg(&args);
            let filters = crate::catalog::search::SearchFilters {
                category: args
                    .get("category")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                max_price_micros: args.get("max_price_micros").and_then(Value::as_i64),
                status: args
                    .get("status")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                min_rating: args.get("min_rating").and_then(Value::as_f64),
            };
            let installed = app
                .catalog
                .installed_slugs(&key.account_id)
                .await
                .map_err(internal)?;
            let hits = app
                .catalog
                .search_servers(query, &filters, limit)
                .await
                .map_err(internal)?;
            let listed: Vec<(&crate::catalog::Server, bool)> = hits
                .iter()
                .map(|h| (&h.server, installed.contains(&h.server.slug)))
                .collect();
            let mut out = crate::market::server_views(app, &listed)
                .await
                .map_err(internal)?;
            for (v, hit) in out.iter_mut().zip(&hits) {
                v["relevance"] = json!(hit.relevance);
            }
            Ok(ok(json!({ "servers": out })))
        }
        "search_tools" => {
            let query = args.get("query").and_then(Value::as_str).unwrap_or("");
            if crate::catalog::search::query_words(query).is_empty() {
                return Ok(tool_error(
                    "invalid_arguments",
                    "Describe the task in 'query', e.g. 'convert kilometres to miles'.".into(),
                    None,
                ));
            }
            // One snapshot for every hit: no query per hit.
            let snapshot = app.catalog.snapshot().await.map_err(internal)?;
            let installed = snapshot.installed_slugs(&key.account_id);
            let mut out = Vec::new();
            for hit in app
                .catalog
                .search_tools(query, limit_arg(&args))
                .await
                .map_err(internal)?
            {
                let Some(server) = snapshot.server_by_id(&hit.server_id) else {
                    continue;
                };
                let Some(t) = snapshot.tool_of_server(&server.id, &hit.tool) else {
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
                out.push(json!({
                    "name": t.namespaced_name,
                    "server": server.slug,
                    "server_name": server.name,
                    "description": t.definition.get("description"),
                    "inputSchema": t.definition.get("inputSchema"),
                    "price_micros": price,
                    "installed": installed.contains(&server.slug),
                }));
            }
            Ok(ok(json!({ "tools": out })))
        }
        "register_server" => {
            let request: crate::market::RegisterRequest =
                match serde_json::from_value(Value::Object(args)) {
                    Ok(r) => r,
                    Err(e) => {
                        return Ok(tool_error(
                            "invalid_arguments",
                            format!("Invalid registration: {e}."),
                            None,
                        ));
                    }
                };
            let actor = crate::security::audit::Actor::Key {
                key_id: key.key_id.clone(),
                account: key.account_name.clone(),
            };
            match crate::market::register(app, &actor, &key.account_id, request).await {
                Ok(r) => Ok(ok(r.to_json())),
                Err(crate::app::AppError::Catalog(e))
                    if !matches!(e, crate::catalog::CatalogError::Store(_)) =>
                {
                    Ok(tool_error("invalid_arguments", format!("{e}."), None))
                }
                Err(crate::app::AppError::Credential(e)) => {
                    Ok(tool_error("invalid_arguments", format!("{e}."), None))
                }
                Err(e) => Err(internal(e)),
            }
        }
        "get_server" | "install_server" | "uninstall_server" | "rate_server"
        | "server_analytics" => {
            let Some(slug) = slug_arg(&args) else {
                return Ok(tool_error(
                    "invalid_arguments",
                    "Give the server's slug in 'slug'.".into(),
                    None,
                ));
            };
            let server = match app.catalog.get(slug).await {
                Ok(s) if short == "server_analytics" => {
                    if s.owner_account_id != key.account_id && !key.has_scope(Scope::Admin) {
                        None
                    } else {
                        Some(s)
                    }
                }
                Ok(s) if s.status.is_callable() || short == "uninstall_server" => Some(s),
                _ => None,
            };
            let Some(server) = server else {
                return Ok(tool_error(
                    "unknown_server",
                    format!(
                        "There is no available server '{}'. Use marketplace__search_servers to find one.",
                        slug.chars().take(64).collect::<String>()
                    ),
                    None,
                ));
            };
            let installed = app
                .catalog
                .installed_slugs(&key.account_id)
                .await
                .map_err(internal)?
                .contains(&server.slug);
            match short {
                "get_server" => Ok(ok(crate::market::server_detail(app, &server, installed)
                    .await
                    .map_err(internal)?)),
                "install_server" => {
                    let tools: Option<Vec<String>> = match args.get("tools") {
                        None | Some(Value::Null) => None,
                        Some(v) => match serde_json::from_value(v.clone()) {
                            Ok(t) => Some(t),
                            Err(_) => {
                                return Ok(tool_error(
                                    "invalid_arguments",
                                    "Give 'tools' as a list of tool names.".into(),
                                    None,
                                ));
                            }
                        },
                    };
                    match app
                        .install_choosing(&key.account_id, &server, tools.as_deref())
                        .await
                    {
                        Ok(added) => Ok(ok(
                            json!({"slug": server.slug, "installed": true, "changed": added, "tools": tools}),
                        )),
                        Err(crate::app::AppError::Catalog(e))
                            if !matches!(e, crate::catalog::CatalogError::Store(_)) =>
                        {
                            Ok(tool_error("invalid_arguments", format!("{e}."), None))
                        }
                        Err(e) => Err(internal(e)),
                    }
                }
                "rate_server" => {
                    let Some(rating) = args.get("rating").and_then(Value::as_i64) else {
                        return Ok(tool_error(
                            "invalid_arguments",
                            "Give 'rating' as a whole number of stars from 1 to 5.".into(),
                            None,
                        ));
                    };
                    let body = args.get("review").and_then(Value::as_str).unwrap_or("");
                    match app
                        .catalog
                        .rate(&key.account_id, &server, rating, body)
                        .await
                    {
                        Ok((review, created)) => Ok(ok(
                            json!({"slug": server.slug, "review": review, "created": created}),
                        )),
                        Err(crate::catalog::reviews::ReviewError::Catalog(e)) => Err(internal(e)),
                        Err(e) => Ok(tool_error("review_refused", format!("{e}."), None)),
                    }
                }
                "server_analytics" => {
                    let days = args.get("days").and_then(Value::as_i64).unwrap_or(30);
                    let analytics = match app
                        .catalog
                        .analytics(&server, days, crate::store::now_ms())
                        .await
                    {
                        Ok(a) => a,
                        Err(crate::catalog::CatalogError::Store(e)) => return Err(internal(e)),
                        Err(e) => {
                            return Ok(tool_error("invalid_arguments", format!("{e}."), None));
                        }
                    };
                    let verification = app
                        .catalog
                        .latest_verification(&server.id)
                        .await
                        .map_err(internal)?;
                    let reputation = app.catalog.reputation(&server.id).await.map_err(internal)?;
                    Ok(ok(json!({
                        "slug": server.slug,
                        "status": server.status,
                        "listed": server.listed,
                        "analytics": analytics,
                        "verification": verification,
                        "reputation": reputation,
                    })))
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
