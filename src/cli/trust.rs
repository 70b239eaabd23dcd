//! The trust layer's commands: `credentials` (creators, over REST), `policy` and
//! `audit` (admins, on the database), `servers changes`, and the REST helper the
//! creator's commands share.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{CliError, print};
use crate::app::{App, AppError};
use crate::security::audit::{self, Actor, AuditQuery};
use crate::security::policy::{Policy, SubjectKind};
use crate::security::ratelimit::Rate;
use crate::store::{Store, now_ms};

/// Where a creator's command reaches the marketplace.
#[derive(Debug, Args)]
pub struct Remote {
    /// The marketplace's base URL.
    #[arg(
        long,
        env = "MCP_MARKETPLACE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub marketplace: String,
    /// A key with scope servers:write (for credentials: the server's owner's).
    #[arg(long, env = "MCP_MARKETPLACE_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

/// `credentials …` (creators, over the REST API).
#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Replace the upstream credentials of your server (stored encrypted; the
    /// marketplace sends them on every request to it and never shows them again).
    Set {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        /// 'Name: value', e.g. 'Authorization: Bearer …'; repeatable.
        #[arg(long = "header", required = true)]
        headers: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the credential headers of your server (names only).
    List {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove every credential of your server.
    Clear {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make a new X-MCP-Marketplace-Secret for your server (shown once).
    RotateSecret {
        /// The server's slug.
        #[arg(long)]
        slug: String,
        #[command(flatten)]
        remote: Remote,
    },
}

/// Whose policy.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PolicySubject {
    /// A server, by slug.
    #[arg(long)]
    pub server: Option<String>,
    /// An account, by name.
    #[arg(long)]
    pub account: Option<String>,
    /// A key, by id or its 12-character prefix.
    #[arg(long)]
    pub key: Option<String>,
}

/// `policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show a subject's overrides and what they mean with the defaults.
    Show {
        #[command(flatten)]
        subject: PolicySubject,
    },
    /// Change a subject's overrides (only the given fields; `default` inherits again).
    Set {
        #[command(flatten)]
        subject: PolicySubject,
        /// Rate per account on a server: N/sec, N/min, N/hour, off or default.
        #[arg(long)]
        per_account_per_server: Option<String>,
        /// Rate per account overall (accounts only).
        #[arg(long)]
        per_account: Option<String>,
        /// Rate per key (accounts, for all their keys, or keys).
        #[arg(long)]
        per_key: Option<String>,
        /// Most concurrent calls (servers only), or default.
        #[arg(long)]
        max_concurrency: Option<String>,
        /// Response scanning: off, flag, block or default (servers and accounts).
        #[arg(long)]
        scan: Option<String>,
        /// A JSONPath (RFC 9535) removed from results, e.g. '$.email'; repeatable;
        /// replaces the list; 'none' empties it (servers and keys).
        #[arg(long)]
        redact: Vec<String>,
    },
    /// Remove every override of a subject.
    Clear {
        #[command(flatten)]
        subject: PolicySubject,
    },
}

/// `audit`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries of the last DURATION, e.g. 24h, 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// Only this action, e.g. key.create, server.approve, call.blocked.
    #[arg(long)]
    pub action: Option<String>,
    /// Only this subject (a key id, a slug, a call id).
    #[arg(long)]
    pub subject: Option<String>,
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// Calls the marketplace's REST API: `method` `path` with `key`, an optional JSON
/// body; returns the JSON answer. `what` names the request in error messages.
///
/// # Errors
/// [`CliError::Remote`] when the marketplace cannot be reached, answers without JSON,
/// or refuses (with its error message).
pub(super) async fn rest(
    method: http::Method,
    base: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
    what: &str,
) -> Result<Value, CliError> {
    crate::install_crypto_provider();
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut request = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| CliError::Remote(format!("cannot reach the marketplace at {base}: {e}")))?;
    let status = response.status();
    let value: Value = response.json().await.map_err(|e| {
        CliError::Remote(format!(
            "the marketplace answered HTTP {status} without JSON: {e}"
        ))
    })?;
    if !status.is_success() {
        let message = value
            .pointer("/error/message")
            .and_then(|m| m.as_str())
            .unwrap_or("request refused");
        return Err(CliError::Remote(format!(
            "{what} refused (HTTP {}): {message}",
            status.as_u16()
        )));
    }
    Ok(value)
}

/// Parses `Name: value` lines into a JSON object. Errors never echo a value.
///
/// # Errors
/// [`CliError::Usage`].
pub(super) fn header_lines(lines: &[String]) -> Result<serde_json::Map<String, Value>, CliError> {
    let mut out = serde_json::Map::new();
    for line in lines {
        let (name, value) = crate::security::credentials::parse_header_line(line)
            .map_err(|e| CliError::Usage(format!("{e}; give headers as 'Name: value'")))?;
        out.insert(name, Value::String(value));
    }
    Ok(out)
}

/// Runs `credentials …`.
///
/// # Errors
/// [`CliError`].
pub(super) async fn credentials(cmd: &CredentialsCommand, j: bool) -> Result<ExitCode, CliError> {
    match cmd {
        CredentialsCommand::Set {
            slug,
            headers,
            remote,
        } => {
            let body = json!({"headers": header_lines(headers)?});
            let v = rest(
                http::Method::PUT,
                &remote.marketplace,
                &format!("/api/v1/servers/{slug}/credentials"),
                &remote.api_key,
                Some(body),
                "setting credentials",
            )
            .await?;
            print(j, v.clone(), || {
                format!("{slug}: credentials set ({})", names(&v))
            });
        }
        CredentialsCommand::List { slug, remote } => {
            let v = rest(
                http::Method::GET,
                &remote.marketplace,
                &format!("/api/v1/servers/{slug}/credentials"),
                &remote.api_key,
                None,
                "listing credentials",
            )
            .await?;
            print(j, v.clone(), || format!("{slug}: {}", names(&v)));
        }
        CredentialsCommand::Clear { slug, remote } => {
            let v = rest(
                http::Method::DELETE,
                &remote.marketplace,
                &format!("/api/v1/servers/{slug}/credentials"),
                &remote.api_key,
                None,
                "clearing credentials",
            )
            .await?;
            print(j, v, || format!("{slug}: credentials removed"));
        }
        CredentialsCommand::RotateSecret { slug, remote } => {
            let v = rest(
                http::Method::POST,
                &remote.marketplace,
                &format!("/api/v1/servers/{slug}/secret"),
                &remote.api_key,
                None,
                "secret rotation",
            )
            .await?;
            print(j, v.clone(), || {
                format!(
                    "new X-MCP-Marketplace-Secret for {slug}: {}\n(shown once: configure your server to require it)",
                    v["secret"].as_str().unwrap_or("")
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn names(v: &Value) -> String {
    let list: Vec<&str> = v["headers"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h["header"].as_str()).collect())
        .unwrap_or_default();
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

async fn subject_id(app: &App, s: &PolicySubject) -> Result<(SubjectKind, String), CliError> {
    if let Some(slug) = &s.server {
        let server = app.catalog.get(slug).await.map_err(AppError::from)?;
        return Ok((SubjectKind::Server, server.id));
    }
    if let Some(name) = &s.account {
        let a = crate::auth::accounts::find_account(&app.store, name)
            .await
            .map_err(AppError::from)?;
        return Ok((SubjectKind::Account, a.id));
    }
    let key = s.key.as_deref().unwrap_or_default();
    let id = crate::auth::keys::key_id_of(&app.store, key)
        .await
        .map_err(AppError::from)?;
    Ok((SubjectKind::Key, id))
}

fn label(s: &PolicySubject) -> String {
    match (&s.server, &s.account, &s.key) {
        (Some(v), _, _) => format!("server {v}"),
        (_, Some(v), _) => format!("account {v}"),
        (_, _, Some(v)) => format!("key {v}"),
        _ => String::new(),
    }
}

fn rate_field(value: &Option<String>, current: Option<Rate>) -> Result<Option<Rate>, CliError> {
    match value.as_deref() {
        None => Ok(current),
        Some("default") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|e: crate::security::ratelimit::RateError| CliError::Usage(e.to_string())),
    }
}

/// Runs `policy …`.
///
/// # Errors
/// [`CliError`].
pub(super) async fn policy(app: &App, cmd: &PolicyCommand, j: bool) -> Result<ExitCode, CliError> {
    let (subject, label) = match cmd {
        PolicyCommand::Show { subject }
        | PolicyCommand::Set { subject, .. }
        | PolicyCommand::Clear { subject } => (subject, label(subject)),
    };
    let (kind, id) = subject_id(app, subject).await?;
    let current = app.policies.get(kind, &id).await.map_err(AppError::from)?;
    let policy =
        match cmd {
            PolicyCommand::Show { .. } => current,
            PolicyCommand::Clear { .. } => Policy::default(),
            PolicyCommand::Set {
                per_account_per_server,
                per_account,
                per_key,
                max_concurrency,
                scan,
                redact,
                ..
            } => Policy {
                per_account_per_server: rate_field(
                    per_account_per_server,
                    current.per_account_per_server,
                )?,
                per_account: rate_field(per_account, current.per_account)?,
                per_key: rate_field(per_key, current.per_key)?,
                max_concurrency: match max_concurrency.as_deref() {
                    None => current.max_concurrency,
                    Some("default") => None,
                    Some(v) => Some(v.parse().map_err(|_| {
                        CliError::Usage(format!(
                            "invalid --max-concurrency '{v}' (a number or default)"
                        ))
                    })?),
                },
                scan: match scan.as_deref() {
                    None => current.scan,
                    Some("default") => None,
                    Some(v) => Some(v.parse().map_err(
                        |e: crate::security::scan::ScanModeError| CliError::Usage(e.to_string()),
                    )?),
                },
                redact: match redact.as_slice() {
                    [] => current.redact,
                    [none] if none == "none" => Vec::new(),
                    paths => paths.to_vec(),
                },
            },
        };
    if !matches!(cmd, PolicyCommand::Show { .. }) {
        app.policies
            .set(kind, &id, &policy)
            .await
            .map_err(|e| match e {
                crate::security::policy::PolicyError::Store(s) => CliError::App(s.into()),
                other => CliError::Usage(other.to_string()),
            })?;
        let _ = audit::record(
            &app.store,
            &Actor::cli(),
            "policy.set",
            &label,
            json!({"policy": policy}),
        )
        .await;
    }
    print(j, json!({"subject": label, "policy": policy}), || {
        format!(
            "{label}: {}",
            serde_json::to_string(&policy).unwrap_or_default()
        )
    });
    Ok(ExitCode::SUCCESS)
}

/// Runs `audit`.
///
/// # Errors
/// [`CliError`].
pub(super) async fn audit(store: &Store, args: &AuditArgs, j: bool) -> Result<ExitCode, CliError> {
    let since_ms = match &args.since {
        Some(d) => {
            let d = humantime::parse_duration(d)
                .map_err(|_| CliError::Usage(format!("invalid --since '{d}' (e.g. 24h, 7d)")))?;
            Some(now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
        }
        None => None,
    };
    let entries = audit::read(
        store,
        &AuditQuery {
            since_ms,
            action: args.action.clone(),
            subject: args.subject.clone(),
            limit: args.limit,
        },
    )
    .await
    .map_err(|e| CliError::App(e.into()))?;
    print(j, json!({"entries": entries}), || {
        entries
            .iter()
            .map(|e| {
                let at = chrono::DateTime::from_timestamp_millis(e.at)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                format!(
                    "{at}  {:<22} {:<28} {}  {}",
                    e.action, e.actor, e.subject, e.detail
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(ExitCode::SUCCESS)
}

/// Prints the held-back tool changes of `slug` with the definitions to review.
///
/// # Errors
/// [`CliError`].
pub(super) async fn changes(app: &App, slug: &str, j: bool) -> Result<(), CliError> {
    let server = app.catalog.get(slug).await.map_err(AppError::from)?;
    let mut out = Vec::new();
    for c in app
        .catalog
        .pending_tool_changes(&server.id)
        .await
        .map_err(AppError::from)?
    {
        let definition = app
            .catalog
            .cached_definition(&server.id, &c.tool)
            .await
            .map_err(AppError::from)?;
        out.push(json!({"change": c, "definition": definition}));
    }
    print(j, json!({"slug": slug, "pending": out}), || {
        if out.is_empty() {
            format!("{slug}: no held-back tool changes")
        } else {
            out.iter()
                .map(|c| {
                    format!(
                        "{} ({}): {}",
                        c["change"]["tool"].as_str().unwrap_or(""),
                        if c["change"]["old_hash"].is_null() {
                            "new"
                        } else {
                            "changed"
                        },
                        c["definition"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
                + &format!("\napprove with: mcp-marketplace servers approve {slug} --tools")
        }
    });
    Ok(())
}
