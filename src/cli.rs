//! The `mcp-marketplace` command line (DESIGN.md "Command line"). Admin commands work
//! on the database directly; `register` is the creator's command and talks to a running
//! marketplace's REST API. Every reporting command takes `--json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::auth::accounts::{create_account, find_account};
use crate::auth::keys::{
    NewKey, create_key, list_keys, parse_allow_tools, parse_scopes, parse_spend_limit, revoke_key,
};
use crate::billing::invoices::InvoiceFormat;
use crate::billing::payouts::PayoutMethod;
use crate::billing::period::{InvalidMonth, parse_instant, rfc3339};
use crate::billing::plans::Plan;
use crate::billing::pricing::{MAX_GRANT_MICROS, format_pricing, format_usd, parse_usd};
use crate::billing::usage::{MAX_PAGE_SIZE, UsageQuery};
use crate::billing::{BillingError, Ledger, Month, Receipt};
use crate::config::{Config, Overrides};
use crate::security::audit::{self, Actor};
use crate::store::Store;

mod alerts;
mod market;
mod trust;
pub use alerts::{AlertsCommand, EmailArgs, WebhookArgs};
pub use market::CreatorCommand;
pub use trust::{AuditArgs, CredentialsCommand, PolicyCommand, PolicySubject, Remote};

/// One MCP URL for every paid MCP server.
#[derive(Debug, Parser)]
#[command(name = "mcp-marketplace", version, about)]
pub struct Cli {
    /// Database URL: sqlite://FILE or postgres://…
    #[arg(long, global = true, env = "MCP_MARKETPLACE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A TOML configuration file.
    #[arg(long, global = true, env = "MCP_MARKETPLACE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the marketplace (MCP at /mcp, REST at /api/v1).
    Serve(ServeArgs),
    /// Serve with the example upstream servers registered, installed and funded.
    Demo(ServeArgs),
    /// Manage accounts.
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Grant credits.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Manage listed servers.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// Register a server with a running marketplace (creators).
    Register(RegisterArgs),
    /// Manage your own servers on a running marketplace (creators): listing, prices,
    /// verification, probes, analytics, reviews.
    #[command(subcommand)]
    Creator(CreatorCommand),
    /// Read and check the ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Check receipts.
    #[command(subcommand)]
    Receipt(ReceiptCommand),
    /// Set a server's upstream credentials on a running marketplace (creators).
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Trust policies: rate limits, concurrency cap, scanning, redaction overrides.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read the audit log.
    Audit(AuditArgs),
    /// Plans, usage, invoices, month close, payouts, alerts.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Alerts: an account's outbox, a creator's weekly digest.
    #[command(subcommand)]
    Alerts(AlertsCommand),
}

/// Flags of `serve` and `demo`.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// HOST:PORT to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "MCP_MARKETPLACE_LISTEN")]
    pub listen: Option<String>,
    /// The URL clients and upstreams know the marketplace by (default http://LISTEN).
    #[arg(long, env = "MCP_MARKETPLACE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// A host (HOST or HOST:PORT) upstreams may use over http; repeatable.
    #[arg(long = "allow-upstream-host")]
    pub allow_upstream_hosts: Vec<String>,
}

/// `accounts …`
#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    Create {
        /// Its unique name.
        name: String,
    },
    /// Set (or clear) where the account's alerts are POSTed; prints the signing secret once.
    Webhook(WebhookArgs),
    /// Set (or clear) the address the account's alerts are e-mailed to.
    AlertEmail(EmailArgs),
}

/// `keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (shown once).
    Create {
        /// The account.
        #[arg(long)]
        account: String,
        /// Comma-separated: invoke, catalog:read, servers:write, admin.
        #[arg(long, default_value = "invoke,catalog:read")]
        scopes: String,
        /// Comma-separated globs over namespaced tool names, e.g. 'calendar__*'.
        #[arg(long)]
        allow_tools: Option<String>,
        /// AMOUNT/day or AMOUNT/month, e.g. 5.00/day; repeat (or separate with commas)
        /// for a daily and a monthly limit.
        #[arg(long)]
        spend_limit: Vec<String>,
        /// Lifetime, e.g. 30d.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List an account's keys.
    List {
        /// The account.
        #[arg(long)]
        account: String,
    },
    /// Revoke a key by id or prefix.
    Revoke {
        /// Key id or its 12-character prefix.
        key: String,
    },
}

/// `credits …`
#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Grant USD credits to an account's wallet.
    Grant {
        /// The account.
        #[arg(long)]
        account: String,
        /// USD, e.g. 10.00.
        #[arg(long)]
        amount: String,
    },
}

/// `servers …`
#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// List every server.
    List,
    /// Approve a server: fetch its tools and make it active. With --tools, approve
    /// held-back tool changes instead (all, or the named ones).
    Approve {
        /// Its slug.
        slug: String,
        /// Approve held-back tool changes: all of them, or a comma-separated list.
        #[arg(long, num_args = 0..=1, default_missing_value = "")]
        tools: Option<String>,
    },
    /// List a server's held-back tool changes with the definitions to review.
    Changes {
        /// Its slug.
        slug: String,
    },
    /// Make a new X-MCP-Marketplace-Secret for a server (shown once).
    RotateSecret {
        /// Its slug.
        slug: String,
    },
    /// Suspend a server.
    Suspend {
        /// Its slug.
        slug: String,
    },
    /// Install a server for an account.
    Install {
        /// Its slug.
        slug: String,
        /// The account.
        #[arg(long)]
        account: String,
    },
    /// Uninstall a server for an account.
    Uninstall {
        /// Its slug.
        slug: String,
        /// The account.
        #[arg(long)]
        account: String,
    },
    /// Create or update servers from a directory of TOML manifests (tools-catalog/);
    /// idempotent, reports what changed.
    Sync {
        /// The directory.
        dir: PathBuf,
    },
}

/// Flags of `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Display name.
    #[arg(long)]
    pub name: String,
    /// Endpoint URL; repeat for replicas.
    #[arg(long = "endpoint", required = true)]
    pub endpoints: Vec<String>,
    /// free or <decimal>_per_request.
    #[arg(long)]
    pub pricing: String,
    /// Slug (default: from the name).
    #[arg(long)]
    pub slug: Option<String>,
    /// Description.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Category; repeatable.
    #[arg(long = "category")]
    pub categories: Vec<String>,
    /// TOOL=USD price override; repeatable.
    #[arg(long = "tool-price")]
    pub tool_prices: Vec<String>,
    /// Per-call upstream timeout (default 30s, at most 300s).
    #[arg(long)]
    pub timeout: Option<String>,
    /// An upstream credential header the marketplace sends to the server, as
    /// 'Name: value' (e.g. 'Authorization: Bearer …'); repeatable. Stored encrypted,
    /// never shown again.
    #[arg(long = "credential")]
    pub credentials: Vec<String>,
    /// Where the marketplace is, and the creator's key.
    #[command(flatten)]
    pub remote: Remote,
}

/// `ledger …`
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Balances of an account, or of the platform.
    Balance {
        /// The account.
        #[arg(
            long,
            conflicts_with = "platform",
            required_unless_present = "platform"
        )]
        account: Option<String>,
        /// The platform's revenue and holds.
        #[arg(long)]
        platform: bool,
    },
    /// Check every ledger invariant; exit 1 when one is broken.
    Verify,
}

/// `receipt …`
#[derive(Debug, Subcommand)]
pub enum ReceiptCommand {
    /// Verify a receipt's signature.
    Verify {
        /// A JSON file holding the receipt (or a tool result carrying it).
        file: PathBuf,
        /// Verify against a JWKS URL instead of the database's keys.
        #[arg(long)]
        jwks: Option<String>,
    },
}

/// `billing …`
#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Plans: list them, show or change an account's plan.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Book the plan fees and included credits that are due (a running server does this
    /// every sweep interval).
    Renew,
    /// Export an account's usage log (every call: times, outcome, price, bytes).
    Usage {
        /// The account.
        #[arg(long)]
        account: String,
        /// A UTC month, YYYY-MM.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        month: Option<String>,
        /// Calls made at or after (RFC 3339, a day or a month).
        #[arg(long)]
        from: Option<String>,
        /// Calls made before.
        #[arg(long)]
        to: Option<String>,
        /// csv (default) or json.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// An account's invoice for a month (the stored one once the month is closed, else a draft).
    Invoice {
        /// The account.
        #[arg(long)]
        account: String,
        /// A UTC month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// json (default), csv or html.
        #[arg(long, default_value = "json")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Close a month: store every account's invoice, once.
    Close {
        /// A UTC month, YYYY-MM, that has ended.
        #[arg(long)]
        month: String,
    },
    /// Pay creators for a closed month and write the PayPal and Stripe batch files.
    Payouts {
        /// A closed month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Where to write payouts-MONTH-paypal.csv and payouts-MONTH-stripe.csv.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Where a creator's payouts go.
    Payee {
        /// The account.
        #[arg(long)]
        account: String,
        /// A PayPal email.
        #[arg(long, conflicts_with = "stripe", required_unless_present = "stripe")]
        paypal: Option<String>,
        /// A Stripe connected account id (acct_…).
        #[arg(long)]
        stripe: Option<String>,
    },
    /// An account's low-balance alert threshold.
    LowBalance {
        /// The account.
        #[arg(long)]
        account: String,
        /// USD, e.g. 5.00, or off.
        #[arg(long)]
        threshold: String,
    },
}

/// `billing plans …`
#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// The configured plans.
    List,
    /// An account's plan now, and its plan history.
    Show {
        /// The account.
        #[arg(long)]
        account: String,
    },
    /// Put an account on a plan, now or from a later time.
    Set {
        /// The account.
        #[arg(long)]
        account: String,
        /// The plan id (see `billing plans list`).
        #[arg(long)]
        plan: String,
        /// When it takes effect: RFC 3339, a day (00:00 UTC) or a month (its first
        /// instant); default now.
        #[arg(long)]
        from: Option<String>,
    },
}

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A domain error.
    #[error(transparent)]
    App(#[from] AppError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The marketplace's REST API refused or failed.
    #[error("{0}")]
    Remote(String),
}

fn config(cli: &Cli, serve: Option<&ServeArgs>) -> Result<Config, CliError> {
    let overrides = Overrides {
        listen: serve.and_then(|s| s.listen.clone()),
        database_url: cli.database_url.clone(),
        public_url: serve.and_then(|s| s.public_url.clone()),
        allow_upstream_hosts: serve
            .map(|s| s.allow_upstream_hosts.clone())
            .unwrap_or_default(),
    };
    Config::resolve(cli.config.as_deref(), overrides).map_err(|e| CliError::App(e.into()))
}

fn print(json_mode: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json_mode {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// [`CliError`] with a message for the user.
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let j = cli.json;
    match &cli.command {
        Command::Serve(args) => {
            let config = config(&cli, Some(args))?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .map_err(|e| CliError::Usage(format!("cannot listen on {}: {e}", config.listen)))?;
            let app = App::new(config).await?;
            tracing::info!(url = %format!("{}/mcp", app.config.public_url), "serving");
            let token = CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                t.cancel();
            });
            app.serve(listener, token).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let mut config = config(&cli, Some(args))?;
            if cli.database_url.is_none() {
                config.database_url = crate::demo::demo_database_url();
                // The throwaway database gets a throwaway key file beside it.
                if let crate::security::vault::MasterKeySource::File(_) = config.master_key {
                    config.master_key = crate::security::vault::MasterKeySource::File(
                        crate::security::vault::MasterKeySource::default_file(&config.database_url),
                    );
                }
            }
            crate::demo::run(config, j).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(AccountsCommand::Create { name }) => {
            let store = store(&cli).await?;
            let a = create_account(&store, name).await.map_err(AppError::from)?;
            print(j, json!({"account": a.name, "id": a.id}), || {
                format!("created account {} ({})", a.name, a.id)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(AccountsCommand::Webhook(args)) => {
            alerts::webhook(&*app(&cli).await?, args, j).await
        }
        Command::Accounts(AccountsCommand::AlertEmail(args)) => {
            alerts::email(&*app(&cli).await?, args, j).await
        }
        Command::Alerts(cmd) => alerts::alerts(&*app(&cli).await?, cmd, j).await,
        Command::Keys(cmd) => keys(&cli, cmd, j).await,
        Command::Credits(CreditsCommand::Grant { account, amount }) => {
            let micros =
                parse_usd(amount, MAX_GRANT_MICROS).map_err(|e| CliError::Usage(e.to_string()))?;
            if micros == 0 {
                return Err(CliError::Usage("the amount must be above zero".into()));
            }
            let store = store(&cli).await?;
            let a = find_account(&store, account)
                .await
                .map_err(AppError::from)?;
            let balance = Ledger::new(store)
                .topup(&a.id, micros, "credits grant")
                .await
                .map_err(AppError::from)?;
            print(
                j,
                json!({"account": a.name, "granted_micros": micros, "wallet_micros": balance}),
                || {
                    format!(
                        "granted ${} to {}; wallet now ${}",
                        format_usd(micros),
                        a.name,
                        format_usd(balance)
                    )
                },
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Servers(cmd) => servers(&cli, cmd, j).await,
        Command::Register(args) => register(args, j).await,
        Command::Creator(cmd) => market::creator(cmd, j).await,
        Command::Credentials(cmd) => trust::credentials(cmd, j).await,
        Command::Policy(cmd) => {
            let app = app(&cli).await?;
            trust::policy(&app, cmd, j).await
        }
        Command::Audit(args) => {
            let store = store(&cli).await?;
            trust::audit(&store, args, j).await
        }
        Command::Ledger(cmd) => ledger(&cli, cmd, j).await,
        Command::Billing(cmd) => billing(&cli, cmd, j).await,
        Command::Receipt(ReceiptCommand::Verify { file, jwks }) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", file.display())))?;
            let receipt = Receipt::from_json(&value).map_err(|e| CliError::Usage(e.to_string()))?;
            let keys = match jwks {
                Some(url) => {
                    crate::install_crypto_provider();
                    let doc: serde_json::Value = reqwest::get(url)
                        .await
                        .map_err(|e| CliError::Remote(format!("cannot fetch {url}: {e}")))?
                        .json()
                        .await
                        .map_err(|e| CliError::Remote(format!("{url} is not a JWKS: {e}")))?;
                    crate::auth::signing::keys_from_jwks(&doc)
                }
                None => {
                    let store = store(&cli).await?;
                    let signer = crate::auth::Signer::load_or_create(&store)
                        .await
                        .map_err(AppError::from)?;
                    crate::auth::signing::keys_from_jwks(&signer.jwks())
                }
            };
            match receipt.verify(&keys) {
                Ok(()) => {
                    print(
                        j,
                        json!({"valid": true, "call_id": receipt.call_id, "outcome": receipt.outcome,
                        "charged_micros": receipt.charged_micros}),
                        || {
                            format!(
                                "valid receipt: call {} {} ${}",
                                receipt.call_id,
                                receipt.outcome,
                                format_usd(receipt.charged_micros)
                            )
                        },
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    print(j, json!({"valid": false, "error": e.to_string()}), || {
                        format!("INVALID receipt: {e}")
                    });
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}

async fn store(cli: &Cli) -> Result<Store, CliError> {
    let config = config(cli, None)?;
    Store::connect(&config.database_url)
        .await
        .map_err(|e| CliError::App(e.into()))
}

async fn app(cli: &Cli) -> Result<Arc<App>, CliError> {
    let config = config(cli, None)?;
    Ok(App::new(config).await?)
}

async fn keys(cli: &Cli, cmd: &KeysCommand, j: bool) -> Result<ExitCode, CliError> {
    let usage = |e: crate::auth::KeyError| CliError::Usage(e.to_string());
    match cmd {
        KeysCommand::Create {
            account,
            scopes,
            allow_tools,
            spend_limit,
            expires,
        } => {
            let new = NewKey {
                scopes: parse_scopes(scopes).map_err(usage)?,
                allow_tools: allow_tools
                    .as_deref()
                    .map(parse_allow_tools)
                    .transpose()
                    .map_err(usage)?
                    .unwrap_or_default(),
                spend_limits: spend_limit
                    .iter()
                    .flat_map(|s| s.split(','))
                    .filter(|s| !s.trim().is_empty())
                    .map(parse_spend_limit)
                    .collect::<Result<_, _>>()
                    .map_err(usage)?,
                expires_in: expires
                    .as_deref()
                    .map(|e| {
                        humantime::parse_duration(e).map_err(|_| {
                            CliError::Usage(format!("invalid --expires '{e}' (e.g. 30d)"))
                        })
                    })
                    .transpose()?,
            };
            let store = store(cli).await?;
            let (record, key) = create_key(&store, account, &new)
                .await
                .map_err(AppError::from)?;
            let _ = audit::record(
                &store,
                &Actor::cli(),
                "key.create",
                &record.key_id,
                json!({"account": record.account, "prefix": record.prefix, "scopes": record.scopes,
                       "daily_limit_micros": record.daily_limit_micros,
                       "monthly_limit_micros": record.monthly_limit_micros, "expires_at": record.expires_at}),
            )
            .await;
            let scopes: Vec<_> = record.scopes.iter().map(|s| s.as_str()).collect();
            print(
                j,
                json!({"key_id": record.key_id, "key": key, "prefix": record.prefix, "account": record.account, "scopes": scopes}),
                || {
                    format!(
                        "{key}\n(key id {}; shown once, store it now)",
                        record.key_id
                    )
                },
            );
        }
        KeysCommand::List { account } => {
            let store = store(cli).await?;
            let keys = list_keys(&store, account).await.map_err(AppError::from)?;
            print(j, json!({"keys": keys}), || {
                keys.iter()
                    .map(|k| {
                        let scopes: Vec<_> = k.scopes.iter().map(|s| s.as_str()).collect();
                        format!(
                            "{}  {}  {}{}",
                            k.key_id,
                            k.prefix,
                            scopes.join(","),
                            if k.revoked_at.is_some() {
                                "  (revoked)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        KeysCommand::Revoke { key } => {
            let store = store(cli).await?;
            let id = revoke_key(&store, key).await.map_err(AppError::from)?;
            let _ = audit::record(&store, &Actor::cli(), "key.revoke", &id, json!({})).await;
            print(j, json!({"key_id": id, "revoked": true}), || {
                format!("revoked key {id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn servers(cli: &Cli, cmd: &ServersCommand, j: bool) -> Result<ExitCode, CliError> {
    match cmd {
        ServersCommand::List => {
            let store = store(cli).await?;
            let catalog = crate::catalog::Catalog::new(store);
            let servers = catalog.list().await.map_err(AppError::from)?;
            let mut scores = Vec::with_capacity(servers.len());
            for s in &servers {
                scores.push(
                    catalog
                        .reputation(&s.id)
                        .await
                        .map_err(AppError::from)?
                        .map(|r| r.score),
                );
            }
            let rows: Vec<_> = servers
                .iter()
                .zip(&scores)
                .map(|(s, score)| json!({"slug": s.slug, "name": s.name, "status": s.status, "price_micros": s.price_micros,
                                "pricing": format_pricing(s.price_micros), "listed": s.listed,
                                "reputation": score}))
                .collect();
            print(j, json!({"servers": rows}), || {
                servers
                    .iter()
                    .zip(&scores)
                    .map(|(s, score)| {
                        format!(
                            "{:<32} {:<15} {:<24} reputation {}",
                            s.slug,
                            s.status.as_str(),
                            format_pricing(s.price_micros),
                            score.map_or("-".to_owned(), |v| format!("{v:.1}"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ServersCommand::Approve {
            slug,
            tools: Some(names),
        } => {
            let app = app(cli).await?;
            let names: Vec<String> = names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            let approved = app
                .approve_tools(
                    &Actor::cli(),
                    slug,
                    (!names.is_empty()).then_some(&names[..]),
                )
                .await?;
            print(j, json!({"slug": slug, "approved_tools": approved}), || {
                if approved.is_empty() {
                    format!("{slug}: no held-back tool changes to approve")
                } else {
                    format!("{slug}: approved {}", approved.join(", "))
                }
            });
        }
        ServersCommand::Changes { slug } => {
            let app = app(cli).await?;
            trust::changes(&app, slug, j).await?;
        }
        ServersCommand::RotateSecret { slug } => {
            let app = app(cli).await?;
            let secret = app.rotate_secret(&Actor::cli(), slug).await?;
            print(j, json!({"slug": slug, "secret": secret}), || {
                format!(
                    "new X-MCP-Marketplace-Secret for {slug}: {secret}\n(shown once; open upstream sessions were closed)"
                )
            });
        }
        ServersCommand::Approve { slug, tools: None } => {
            let app = app(cli).await?;
            let s = app.approve_as(&Actor::cli(), slug).await?;
            let tools = app
                .catalog
                .tools_of_server(&s.id)
                .await
                .map_err(AppError::from)?;
            print(
                j,
                json!({"slug": s.slug, "status": s.status, "tools": tools.len()}),
                || format!("approved {} ({} tools)", s.slug, tools.len()),
            );
        }
        ServersCommand::Sync { dir } => {
            let app = app(cli).await?;
            return market::sync(&app, dir, j).await;
        }
        ServersCommand::Suspend { slug } => {
            let app = app(cli).await?;
            let s = app.suspend_as(&Actor::cli(), slug).await?;
            print(j, json!({"slug": s.slug, "status": s.status}), || {
                format!("suspended {}", s.slug)
            });
        }
        ServersCommand::Install { slug, account } | ServersCommand::Uninstall { slug, account } => {
            let app = app(cli).await?;
            let a = find_account(&app.store, account)
                .await
                .map_err(AppError::from)?;
            let install = matches!(cmd, ServersCommand::Install { .. });
            let changed = if install {
                app.install(&a.id, slug).await?
            } else {
                app.uninstall(&a.id, slug).await?
            };
            print(
                j,
                json!({"slug": slug, "account": a.name, "installed": install, "changed": changed}),
                || {
                    format!(
                        "{} {slug} for {}",
                        if install { "installed" } else { "uninstalled" },
                        a.name
                    )
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn ledger(cli: &Cli, cmd: &LedgerCommand, j: bool) -> Result<ExitCode, CliError> {
    let store = store(cli).await?;
    let ledger = Ledger::new(store.clone());
    match cmd {
        LedgerCommand::Balance {
            account: Some(name),
            ..
        } => {
            let a = find_account(&store, name).await.map_err(AppError::from)?;
            let b = ledger
                .account_balance(&a.id)
                .await
                .map_err(AppError::from)?;
            print(
                j,
                json!({"account": a.name, "wallet_micros": b.wallet_micros, "holds_micros": b.holds_micros,
                       "earnings_micros": b.earnings_micros}),
                || {
                    format!(
                        "{}: wallet ${}, holds ${}, earnings ${}",
                        a.name,
                        format_usd(b.wallet_micros),
                        format_usd(b.holds_micros),
                        format_usd(b.earnings_micros)
                    )
                },
            );
        }
        LedgerCommand::Balance { .. } => {
            let p = ledger.platform_balance().await.map_err(AppError::from)?;
            print(
                j,
                json!({"revenue_micros": p.revenue_micros, "holds_micros": p.holds_micros}),
                || {
                    format!(
                        "platform: revenue ${}, holds ${} (included credits ${}, losses ${})",
                        format_usd(p.revenue_micros),
                        format_usd(p.holds_micros),
                        format_usd(p.included_credits_micros),
                        format_usd(p.losses_micros)
                    )
                },
            );
        }
        LedgerCommand::Verify => {
            let broken = ledger.verify().await.map_err(AppError::from)?;
            let ok = broken.is_empty();
            print(j, json!({"ok": ok, "broken": broken}), || {
                if ok {
                    "ledger ok: every invariant holds".to_owned()
                } else {
                    format!("LEDGER BROKEN:\n{}", broken.join("\n"))
                }
            });
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn register(args: &RegisterArgs, j: bool) -> Result<ExitCode, CliError> {
    let mut tool_prices = serde_json::Map::new();
    for tp in &args.tool_prices {
        let (tool, price) = tp.split_once('=').ok_or_else(|| {
            CliError::Usage(format!(
                "--tool-price '{tp}' must be TOOL=USD, e.g. create_event=0.05"
            ))
        })?;
        tool_prices.insert(tool.to_owned(), json!(price));
    }
    let credentials = trust::header_lines(&args.credentials)?;
    let body = json!({
        "name": args.name,
        "slug": args.slug,
        "description": args.description,
        "categories": args.categories,
        "endpoints": args.endpoints,
        "pricing": args.pricing,
        "tool_prices": tool_prices,
        "timeout": args.timeout,
        "credentials": credentials,
    });
    let value = trust::rest(
        http::Method::POST,
        &args.remote.marketplace,
        "/api/v1/servers",
        &args.remote.api_key,
        Some(body),
        "registration",
    )
    .await?;
    print(j, value.clone(), || {
        let verified = value.pointer("/verification/ok") == Some(&json!(true));
        format!(
            "registered '{}' ({}); verification {}{}.\nX-MCP-Marketplace-Secret: {}\n(shown once: configure your server to require it)",
            value["slug"].as_str().unwrap_or(""),
            value["status"].as_str().unwrap_or(""),
            if verified { "passed" } else { "FAILED: " },
            if verified {
                String::new()
            } else {
                value
                    .pointer("/verification/failed_checks")
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            },
            value["secret"].as_str().unwrap_or("")
        )
    });
    Ok(ExitCode::SUCCESS)
}

fn month_arg(text: &str) -> Result<Month, CliError> {
    text.parse()
        .map_err(|e: InvalidMonth| CliError::Usage(e.to_string()))
}

fn write_or_print(out: Option<&PathBuf>, text: &str) -> Result<(), CliError> {
    match out {
        Some(path) => std::fs::write(path, text)
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display()))),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn plan_json(p: &Plan) -> serde_json::Value {
    json!({"id": p.id, "name": p.name, "monthly_fee_micros": p.monthly_fee_micros,
           "included_credits_micros": p.included_credits_micros, "monthly_calls": p.monthly_calls,
           "rate_limits": p.rate_limits})
}

async fn billing(cli: &Cli, cmd: &BillingCommand, j: bool) -> Result<ExitCode, CliError> {
    let config = config(cli, None)?;
    let store = Store::connect(&config.database_url)
        .await
        .map_err(|e| CliError::App(e.into()))?;
    let ledger = Ledger::new(store.clone()).with_plans(config.billing.plans.clone());
    let account = |name: &String| {
        let store = store.clone();
        let name = name.clone();
        async move {
            find_account(&store, &name)
                .await
                .map_err(|e| CliError::App(e.into()))
        }
    };
    let billing_err = |e: BillingError| CliError::App(e.into());
    match cmd {
        BillingCommand::Plans(PlansCommand::List) => {
            let plans: Vec<_> = ledger.plans().iter().collect();
            let default = ledger.plans().default_plan().id.clone();
            print(
                j,
                json!({"default_plan": default, "plans": plans.iter().map(|p| plan_json(p)).collect::<Vec<_>>()}),
                || {
                    plans
                        .iter()
                        .map(|p| {
                            format!(
                                "{:<12} {:<12} ${}/month, ${} included, {} calls/month{}",
                                p.id,
                                p.name,
                                format_usd(p.monthly_fee_micros),
                                format_usd(p.included_credits_micros),
                                p.monthly_calls
                                    .map_or("unlimited".to_owned(), |c| c.to_string()),
                                if p.id == default { "  (default)" } else { "" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        BillingCommand::Plans(PlansCommand::Show { account: name }) => {
            let a = account(name).await?;
            let current = ledger.current_plan(&a.id).await.map_err(billing_err)?;
            let history = ledger.plan_history(&a.id).await.map_err(billing_err)?;
            print(
                j,
                json!({"account": a.name, "plan": plan_json(&current.plan),
                       "since": (current.effective_at > 0).then(|| rfc3339(current.effective_at)),
                       "history": history.iter().map(|h| json!({"plan": h.plan, "from": rfc3339(h.effective_at), "reason": h.reason})).collect::<Vec<_>>()}),
                || {
                    let mut text = format!("{} is on the {} plan", a.name, current.plan.name);
                    for h in &history {
                        text.push_str(&format!(
                            "\n  from {}: {} ({})",
                            rfc3339(h.effective_at),
                            h.plan,
                            h.reason
                        ));
                    }
                    text
                },
            );
        }
        BillingCommand::Plans(PlansCommand::Set {
            account: name,
            plan,
            from,
        }) => {
            let a = account(name).await?;
            let from = from
                .as_deref()
                .map(parse_instant)
                .transpose()
                .map_err(CliError::Usage)?;
            let change = ledger
                .change_plan(&a.id, plan, from)
                .await
                .map_err(billing_err)?;
            print(
                j,
                json!({"account": a.name, "plan": change.plan, "effective_at": rfc3339(change.effective_at),
                       "booked": change.booked}),
                || match &change.booked {
                    Some(b) => format!(
                        "{} is on the {} plan from now: charged ${}, granted ${} of included credits",
                        a.name,
                        change.plan,
                        format_usd(b.fee_micros),
                        format_usd(b.credits_micros)
                    ),
                    None => format!(
                        "{} moves to the {} plan at {}",
                        a.name,
                        change.plan,
                        rfc3339(change.effective_at)
                    ),
                },
            );
        }
        BillingCommand::Renew => {
            let n = ledger.renew_subscriptions().await.map_err(billing_err)?;
            print(j, json!({"booked": n}), || {
                format!("booked {n} plan periods")
            });
        }
        BillingCommand::Usage {
            account: name,
            month,
            from,
            to,
            format,
            out,
        } => {
            let a = account(name).await?;
            let (mut from_ms, mut to_ms) = (None, None);
            if let Some(m) = month {
                let m = month_arg(m)?;
                (from_ms, to_ms) = (Some(m.start_ms()), Some(m.end_ms()));
            }
            if let Some(f) = from {
                from_ms = Some(parse_instant(f).map_err(CliError::Usage)?);
            }
            if let Some(t) = to {
                to_ms = Some(parse_instant(t).map_err(CliError::Usage)?);
            }
            let csv = match format.as_str() {
                "csv" => true,
                "json" => false,
                _ => return Err(CliError::Usage("--format is csv or json".into())),
            };
            let mut query = UsageQuery {
                account_id: a.id.clone(),
                from: from_ms,
                to: to_ms,
                limit: MAX_PAGE_SIZE,
                ..UsageQuery::default()
            };
            let mut calls = Vec::new();
            loop {
                let page = crate::billing::usage::list(&store, &query)
                    .await
                    .map_err(billing_err)?;
                calls.extend(page.calls);
                match page.next_cursor {
                    Some(c) => query.cursor = Some(c),
                    None => break,
                }
            }
            let text = if csv && !j {
                crate::billing::usage::to_csv(&calls, true)
            } else {
                format!("{}\n", json!({"account": a.name, "calls": calls}))
            };
            write_or_print(out.as_ref(), &text)?;
            if out.is_some() {
                eprintln!("wrote {} calls", calls.len());
            }
        }
        BillingCommand::Invoice {
            account: name,
            month,
            format,
            out,
        } => {
            let a = account(name).await?;
            let month = month_arg(month)?;
            let format: InvoiceFormat = if j {
                InvoiceFormat::Json
            } else {
                format.parse().map_err(billing_err)?
            };
            let Some((inv, rendered)) = crate::billing::invoices::invoice(&ledger, &a.id, month)
                .await
                .map_err(billing_err)?
            else {
                return Err(CliError::Usage(format!(
                    "{} has no invoice for {month}: nothing happened on the account that month",
                    a.name
                )));
            };
            if inv.status == "draft" {
                eprintln!(
                    "note: {month} is not closed; this is a draft (run `billing close --month {month}` after the month ends)"
                );
            }
            write_or_print(out.as_ref(), rendered.get(format))?;
        }
        BillingCommand::Close { month } => {
            let month = month_arg(month)?;
            let report = crate::billing::invoices::close_month(&ledger, month)
                .await
                .map_err(billing_err)?;
            print(j, serde_json::to_value(&report).unwrap_or_default(), || {
                if report.already_closed {
                    format!(
                        "{} was closed already at {} ({} invoices); nothing changed",
                        report.month, report.closed_at, report.invoices
                    )
                } else {
                    format!(
                        "closed {}: {} invoices stored",
                        report.month, report.invoices
                    )
                }
            });
        }
        BillingCommand::Payouts { month, out_dir } => {
            let month = month_arg(month)?;
            let run = crate::billing::payouts::run(
                &ledger,
                month,
                config.billing.payout_threshold_micros,
            )
            .await
            .map_err(billing_err)?;
            let mut files = Vec::new();
            for (provider, text) in [
                (
                    "paypal",
                    crate::billing::payouts::paypal_csv(month, &run.payouts),
                ),
                (
                    "stripe",
                    crate::billing::payouts::stripe_csv(month, &run.payouts),
                ),
            ] {
                let path = out_dir.join(format!("payouts-{month}-{provider}.csv"));
                write_or_print(Some(&path), &text)?;
                files.push(path.display().to_string());
            }
            let mut value = serde_json::to_value(&run).unwrap_or_default();
            value["files"] = json!(files);
            print(j, value, || {
                let mut text = format!(
                    "{month}: paid ${} ({} new payouts), carried ${} forward",
                    format_usd(run.paid_micros),
                    run.new_payouts,
                    format_usd(run.carried_micros)
                );
                for p in &run.payouts {
                    text.push_str(&format!(
                        "\n  {:<24} {:<5} ${:<12} carried ${}{}",
                        p.account,
                        p.status,
                        format_usd(p.amount_micros),
                        format_usd(p.carried_out_micros),
                        if p.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", p.reason)
                        }
                    ));
                }
                text.push_str(&format!("\nbatch files: {}", files.join(", ")));
                if run.new_payouts == 0 && run.paid_micros > 0 {
                    text.push_str("\nno new payouts: these files are the ones written before; do not upload them again");
                }
                text
            });
        }
        BillingCommand::Payee {
            account: name,
            paypal,
            stripe,
        } => {
            let a = account(name).await?;
            let (method, destination) = match (paypal, stripe) {
                (Some(p), _) => (PayoutMethod::Paypal, p),
                (None, Some(s)) => (PayoutMethod::Stripe, s),
                (None, None) => return Err(CliError::Usage("give --paypal or --stripe".into())),
            };
            crate::billing::payouts::set_payee(&ledger, &a.id, method, destination)
                .await
                .map_err(billing_err)?;
            print(
                j,
                json!({"account": a.name, "method": method.as_str(), "destination": destination.trim()}),
                || {
                    format!(
                        "{} is paid by {} to {}",
                        a.name,
                        method.as_str(),
                        destination.trim()
                    )
                },
            );
        }
        BillingCommand::LowBalance {
            account: name,
            threshold,
        } => {
            let a = account(name).await?;
            let micros = if threshold.eq_ignore_ascii_case("off") {
                None
            } else {
                Some(
                    parse_usd(threshold, MAX_GRANT_MICROS)
                        .map_err(|e| CliError::Usage(e.to_string()))?,
                )
            };
            ledger
                .set_low_balance(&a.id, micros)
                .await
                .map_err(billing_err)?;
            print(
                j,
                json!({"account": a.name, "low_balance_threshold_micros": micros}),
                || match micros {
                    Some(m) => format!(
                        "{} is alerted when its wallet drops below ${}",
                        a.name,
                        format_usd(m)
                    ),
                    None => format!("{} has no low-balance alert", a.name),
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
