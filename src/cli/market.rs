//! The creator's self-service commands (`creator …`, over the REST API with the
//! creator's key: own servers only) and the operator's `servers sync DIR`.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::trust::{Remote, rest};
use super::{CliError, print};
use crate::app::App;

/// `creator …`: manage your own servers on a running marketplace.
#[derive(Debug, Subcommand)]
pub enum CreatorCommand {
    /// Show your server as the marketplace lists it (tools, prices, reputation, reviews).
    Show {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Change the listing: name, description, categories, endpoints, timeout.
    Update {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Category (replaces the list); repeatable.
        #[arg(long = "category")]
        categories: Vec<String>,
        /// Endpoint URL (replaces the list); repeatable.
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
        /// Per-call timeout, e.g. 30s.
        #[arg(long)]
        timeout: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Change prices; calls reserved before the change keep the old price.
    Pricing {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// New default price: free or <decimal>_per_request.
        #[arg(long)]
        pricing: Option<String>,
        /// TOOL=USD override; repeatable.
        #[arg(long = "tool-price")]
        tool_prices: Vec<String>,
        /// Remove a tool's override; repeatable.
        #[arg(long = "remove-tool-price")]
        remove: Vec<String>,
        /// When it takes effect (RFC 3339, a day or a month); default now.
        #[arg(long)]
        effective_at: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// The price history (with scheduled changes).
    Prices {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Hide your server from search and new installs (existing installs keep working).
    Unlist {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List your server again.
    Relist {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Run the verification probe again (after fixing the server).
    Verify {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// The latest verification report.
    Verification {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// The probe history, newest first.
    Probes {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Calls per day, earnings, error rate, p50/p95 latency, top tools.
    Analytics {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// Days back, 1-90.
        #[arg(long, default_value_t = 30)]
        days: i64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Your server's reviews.
    Reviews {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Reply (once) to a review.
    Reply {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// The review's id.
        #[arg(long)]
        review: String,
        /// The reply.
        #[arg(long)]
        text: String,
        #[command(flatten)]
        remote: Remote,
    },
}

fn usd(micros: &Value) -> String {
    micros
        .as_i64()
        .map(crate::billing::pricing::format_usd)
        .unwrap_or_default()
}

/// Runs a `creator …` command.
///
/// # Errors
/// [`CliError::Usage`] for bad flags, [`CliError::Remote`] when the marketplace refuses.
pub(super) async fn creator(cmd: &CreatorCommand, j: bool) -> Result<ExitCode, CliError> {
    use http::Method;
    let (method, remote, path, body, what): (Method, &Remote, String, Option<Value>, &str) =
        match cmd {
            CreatorCommand::Show { slug, remote } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}"),
                None,
                "reading the server",
            ),
            CreatorCommand::Update {
                slug,
                name,
                description,
                categories,
                endpoints,
                timeout,
                remote,
            } => {
                let mut body = serde_json::Map::new();
                if let Some(n) = name {
                    body.insert("name".into(), json!(n));
                }
                if let Some(d) = description {
                    body.insert("description".into(), json!(d));
                }
                if !categories.is_empty() {
                    body.insert("categories".into(), json!(categories));
                }
                if !endpoints.is_empty() {
                    body.insert("endpoints".into(), json!(endpoints));
                }
                if let Some(t) = timeout {
                    body.insert("timeout".into(), json!(t));
                }
                if body.is_empty() {
                    return Err(CliError::Usage("nothing to change: give a flag".into()));
                }
                (
                    Method::PATCH,
                    remote,
                    format!("/api/v1/servers/{slug}"),
                    Some(Value::Object(body)),
                    "the update",
                )
            }
            CreatorCommand::Pricing {
                slug,
                pricing,
                tool_prices,
                remove,
                effective_at,
                remote,
            } => {
                let mut tools = serde_json::Map::new();
                for tp in tool_prices {
                    let (tool, price) = tp.split_once('=').ok_or_else(|| {
                        CliError::Usage(format!(
                            "--tool-price '{tp}' must be TOOL=USD, e.g. create_event=0.05"
                        ))
                    })?;
                    tools.insert(tool.to_owned(), json!(price));
                }
                for t in remove {
                    tools.insert(t.clone(), Value::Null);
                }
                (
                    Method::PUT,
                    remote,
                    format!("/api/v1/servers/{slug}/pricing"),
                    Some(
                        json!({"pricing": pricing, "tool_prices": tools, "effective_at": effective_at}),
                    ),
                    "the price change",
                )
            }
            CreatorCommand::Prices { slug, remote } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}/pricing"),
                None,
                "reading prices",
            ),
            CreatorCommand::Unlist { slug, remote } => (
                Method::POST,
                remote,
                format!("/api/v1/servers/{slug}/unlist"),
                None,
                "unlisting",
            ),
            CreatorCommand::Relist { slug, remote } => (
                Method::POST,
                remote,
                format!("/api/v1/servers/{slug}/list"),
                None,
                "listing",
            ),
            CreatorCommand::Verify { slug, remote } => (
                Method::POST,
                remote,
                format!("/api/v1/servers/{slug}/verify"),
                None,
                "the verification",
            ),
            CreatorCommand::Verification { slug, remote } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}/verification"),
                None,
                "reading the verification",
            ),
            CreatorCommand::Probes {
                slug,
                limit,
                remote,
            } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}/probes?limit={limit}"),
                None,
                "reading probes",
            ),
            CreatorCommand::Analytics { slug, days, remote } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}/analytics?days={days}"),
                None,
                "reading analytics",
            ),
            CreatorCommand::Reviews { slug, remote } => (
                Method::GET,
                remote,
                format!("/api/v1/servers/{slug}/reviews"),
                None,
                "reading reviews",
            ),
            CreatorCommand::Reply {
                slug,
                review,
                text,
                remote,
            } => (
                Method::POST,
                remote,
                format!("/api/v1/servers/{slug}/reviews/{review}/reply"),
                Some(json!({"reply": text})),
                "the reply",
            ),
        };
    let v = rest(
        method,
        &remote.marketplace,
        &path,
        &remote.api_key,
        body,
        what,
    )
    .await?;
    print(j, v.clone(), || match cmd {
        CreatorCommand::Analytics { .. } => {
            let t = &v["analytics"]["total"];
            let mut out = format!(
                "{}: {} calls, earnings ${}, error rate {:.1} %, p50 {} ms, p95 {} ms",
                v["analytics"]["slug"].as_str().unwrap_or(""),
                t["calls"],
                usd(&t["earnings_micros"]),
                t["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
                t["p50_latency_ms"],
                t["p95_latency_ms"]
            );
            for day in v["analytics"]["per_day"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  {} {} calls ${}",
                    day[0].as_str().unwrap_or(""),
                    day[1]["calls"],
                    usd(&day[1]["earnings_micros"])
                ));
            }
            for tool in v["analytics"]["per_tool"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  tool {} {} calls ${}",
                    tool[0].as_str().unwrap_or(""),
                    tool[1]["calls"],
                    usd(&tool[1]["earnings_micros"])
                ));
            }
            out
        }
        _ => serde_json::to_string_pretty(&v).unwrap_or_default(),
    });
    Ok(ExitCode::SUCCESS)
}

/// `servers sync DIR`: creates or updates servers from the manifests of `dir`.
///
/// # Errors
/// [`CliError::App`] when the directory cannot be read.
pub(super) async fn sync(
    app: &std::sync::Arc<App>,
    dir: &Path,
    j: bool,
) -> Result<ExitCode, CliError> {
    let report = crate::market::sync::sync(app, dir).await?;
    let value = serde_json::to_value(&report).unwrap_or_default();
    print(j, value, || {
        let mut lines = Vec::new();
        for c in &report.created {
            lines.push(format!(
                "created {} ({}, verification {}); X-MCP-Marketplace-Secret: {} (shown once)",
                c.slug,
                c.status,
                if c.verification_ok {
                    "passed"
                } else {
                    "FAILED"
                },
                c.secret
            ));
        }
        for u in &report.updated {
            lines.push(format!("updated {}: {}", u.slug, u.changed.join(", ")));
        }
        for s in &report.unchanged {
            lines.push(format!("unchanged {s}"));
        }
        for f in &report.failed {
            lines.push(format!("FAILED {}: {}", f.file, f.error));
        }
        if report.is_noop() && report.failed.is_empty() {
            lines.push("nothing to change".into());
        }
        lines.join("\n")
    });
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
