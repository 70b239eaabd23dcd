//! Alert commands (issue 4 item 7): `accounts webhook` and `accounts alert-email` set
//! where an account's alerts go (on the database, like `accounts create`; the webhook's
//! signing secret is printed once), `alerts list` shows the outbox of an account, and
//! `alerts digest` prints a creator's weekly digest.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;
use sqlx::Row;

use super::{CliError, print};
use crate::alerts::digest::{Week, compute, last_complete_week};
use crate::alerts::{AlertError, channels};
use crate::app::{App, AppError};
use crate::auth::accounts::find_account;
use crate::billing::period::rfc3339;
use crate::store::now_ms;

/// `accounts webhook`: set (or clear) the account's alert webhook.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// The account's name.
    #[arg(long)]
    pub account: String,
    /// The webhook URL (https; http only for allowed hosts). Makes a new signing
    /// secret, printed once.
    #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
    pub url: Option<String>,
    /// Remove the webhook.
    #[arg(long)]
    pub clear: bool,
}

/// `accounts alert-email`: set (or clear) the account's alert e-mail address.
#[derive(Debug, Args)]
pub struct EmailArgs {
    /// The account's name.
    #[arg(long)]
    pub account: String,
    /// The address (alerts are e-mailed when `[alerts.smtp]` is configured).
    #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
    pub email: Option<String>,
    /// Remove the address.
    #[arg(long)]
    pub clear: bool,
}

/// `alerts …`
#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// The newest outbox rows of an account, with their delivery state.
    List {
        /// The account's name.
        #[arg(long)]
        account: String,
        /// How many rows (default 20).
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// A creator's weekly digest (default: the last complete ISO week).
    Digest {
        /// The creator's account name.
        #[arg(long)]
        account: String,
        /// The ISO week, e.g. 2026-W48.
        #[arg(long)]
        week: Option<String>,
    },
}

fn alert_err(e: AlertError) -> CliError {
    match e {
        AlertError::Store(_) | AlertError::Vault(_) => CliError::App(AppError::Alert(e)),
        other => CliError::Usage(other.to_string()),
    }
}

/// Runs `accounts webhook`.
///
/// # Errors
/// [`CliError::Usage`] for an unknown account or a refused URL.
pub async fn webhook(app: &App, args: &WebhookArgs, j: bool) -> Result<ExitCode, CliError> {
    let a = find_account(&app.store, &args.account)
        .await
        .map_err(AppError::from)?;
    match &args.url {
        Some(url) => {
            let secret = channels::set_webhook(&app.store, &app.vault, &app.policy, &a.id, url)
                .await
                .map_err(alert_err)?;
            print(
                j,
                json!({"account": a.name, "webhook_url": url, "signing_secret": secret}),
                || {
                    format!(
                        "alerts of {} go to {url}\nsigning secret (shown once; verify X-MCP-Marketplace-Signature with it): {secret}",
                        a.name
                    )
                },
            );
        }
        None => {
            let removed = channels::clear_webhook(&app.store, &a.id)
                .await
                .map_err(alert_err)?;
            print(j, json!({"account": a.name, "removed": removed}), || {
                format!("removed the webhook of {}", a.name)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `accounts alert-email`.
///
/// # Errors
/// [`CliError::Usage`] for an unknown account or an invalid address.
pub async fn email(app: &App, args: &EmailArgs, j: bool) -> Result<ExitCode, CliError> {
    let a = find_account(&app.store, &args.account)
        .await
        .map_err(AppError::from)?;
    channels::set_email(&app.store, &a.id, args.email.as_deref())
        .await
        .map_err(alert_err)?;
    print(
        j,
        json!({"account": a.name, "email": args.email}),
        || match &args.email {
            Some(e) => format!("alerts of {} are e-mailed to {e}", a.name),
            None => format!("removed the alert e-mail address of {}", a.name),
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `alerts …`.
///
/// # Errors
/// [`CliError::Usage`] for an unknown account or a malformed week.
pub async fn alerts(app: &App, cmd: &AlertsCommand, j: bool) -> Result<ExitCode, CliError> {
    match cmd {
        AlertsCommand::List { account, limit } => {
            let a = find_account(&app.store, account)
                .await
                .map_err(AppError::from)?;
            let rows = sqlx::query(
                "SELECT id, kind, created_at, attempts, delivered_at, dead_at, last_error \
                 FROM alert_outbox WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
            )
            .bind(&a.id)
            .bind((*limit).clamp(1, 1000))
            .fetch_all(app.store.pool())
            .await
            .map_err(|e| CliError::App(AppError::Store(e.into())))?;
            let mut list = Vec::new();
            for r in rows {
                let get = |e: sqlx::Error| CliError::App(AppError::Store(e.into()));
                let delivered: Option<i64> = r.try_get(4).map_err(get)?;
                let dead: Option<i64> = r.try_get(5).map_err(get)?;
                list.push(json!({
                    "id": r.try_get::<String, _>(0).map_err(get)?,
                    "kind": r.try_get::<String, _>(1).map_err(get)?,
                    "created_at": rfc3339(r.try_get(2).map_err(get)?),
                    "attempts": r.try_get::<i64, _>(3).map_err(get)?,
                    "state": if delivered.is_some() { "delivered" } else if dead.is_some() { "dead" } else { "pending" },
                    "last_error": r.try_get::<Option<String>, _>(6).map_err(get)?,
                }));
            }
            print(j, json!({"account": a.name, "alerts": list}), || {
                list.iter()
                    .map(|l| {
                        format!(
                            "{} {} {} attempts={} {}",
                            l["created_at"].as_str().unwrap_or(""),
                            l["kind"].as_str().unwrap_or(""),
                            l["state"].as_str().unwrap_or(""),
                            l["attempts"],
                            l["last_error"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        AlertsCommand::Digest { account, week } => {
            let a = find_account(&app.store, account)
                .await
                .map_err(AppError::from)?;
            let week = match week {
                Some(w) => Week::parse(w).map_err(alert_err)?,
                None => last_complete_week(now_ms()),
            };
            let d = compute(&app.store, &a.id, &week).await.map_err(alert_err)?;
            let value = serde_json::to_value(&d).unwrap_or_default();
            print(j, value, || {
                let uptime =
                    |u: Option<f64>| u.map_or("no probes".to_owned(), |u| format!("{u:.2} %"));
                let mut out = format!(
                    "weekly digest of {} for {} ({} – {})\ncalls served: {}\nearnings: ${}\nuptime: {}\ntool changes detected: {}\nincidents: {}",
                    d.account,
                    d.week,
                    d.period_start,
                    d.period_end,
                    d.calls_served,
                    d.earnings,
                    uptime(d.uptime_percent),
                    d.tool_changes,
                    d.incidents
                );
                for s in &d.servers {
                    out.push_str(&format!(
                        "\n  {}: {} calls, uptime {}",
                        s.slug,
                        s.calls_served,
                        uptime(s.uptime_percent)
                    ));
                }
                for i in &d.incident_list {
                    out.push_str(&format!("\n  {} {}", i.at, i.summary));
                }
                out
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
