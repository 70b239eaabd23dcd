//! Configuration: flags, a TOML file (`--config FILE`) and `MCP_MARKETPLACE_*`
//! variables (DESIGN.md "Configuration file"). Precedence: flag over variable over the
//! file over the defaults here. Every file key is also a variable: `key` is
//! `MCP_MARKETPLACE_KEY`, `[section] key` is `MCP_MARKETPLACE_SECTION__KEY`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::billing::plans::{PlanBook, PlanFile, UsdSetting};
use crate::billing::pricing::DEFAULT_PLATFORM_FEE_BPS;
use crate::billing::stripe::WebhookSecret;
use crate::billing::{BillingConfig, DEFAULT_PAYOUT_THRESHOLD_MICROS};
use crate::security::ratelimit::{Limits, Rate};
use crate::security::scan::ScanMode;
use crate::security::ssrf::Lookup;
use crate::security::vault::{MASTER_KEY_VAR, MasterKeySource};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default database.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://mcp-marketplace.db";
/// Default cap on a request body (1 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Default interval of the TTL refresh of cached tool lists.
pub const DEFAULT_TOOLS_TTL: Duration = Duration::from_secs(10 * 60);
/// Default interval of the hold sweep.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Default cap on concurrent calls to one server (a rule of thumb: well above what one
/// MCP server of a small creator serves at once, low enough that one server cannot tie
/// up the marketplace's connections).
pub const DEFAULT_MAX_CONCURRENCY_PER_SERVER: u32 = 32;

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    /// The file, or a variable, does not fit the expected shape.
    #[error("invalid configuration in {0}: {1}")]
    Parse(String, String),
    /// A value is out of range.
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// The settings a TOML file and `MCP_MARKETPLACE_*` variables may give, every one
/// optional. A file key `a` is also the variable `MCP_MARKETPLACE_A`; a key `b` of a
/// section `[a]` is `MCP_MARKETPLACE_A__B` (DESIGN.md "Configuration file"). Unknown keys
/// are ignored so newer files work with older binaries.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct FileConfig {
    /// `HOST:PORT` to listen on.
    pub listen: Option<String>,
    /// `sqlite://FILE` or `postgres://…`.
    pub database_url: Option<String>,
    /// The URL clients and upstreams know the marketplace by.
    pub public_url: Option<String>,
    /// Hosts allowed over plain http (and on private addresses): a TOML list, or one
    /// comma-separated string (as a variable gives it).
    #[serde(default, deserialize_with = "string_or_list")]
    pub allow_upstream_hosts: Vec<String>,
    /// Platform fee in basis points (3000 = 30 %).
    pub platform_fee_bps: Option<u32>,
    /// Request body cap, bytes.
    pub max_request_bytes: Option<usize>,
    /// Upstream response cap, bytes.
    pub max_response_bytes: Option<usize>,
    /// TTL of cached tool lists, e.g. `10m`.
    pub tools_ttl: Option<String>,
    /// Interval of the hold sweep, e.g. `1m`.
    pub sweep_interval: Option<String>,
    /// Idle time after which an (account, server) upstream session closes, e.g. `5m`.
    pub session_idle: Option<String>,
    /// How long a client's HTTP connection may wait for a request's complete head (idle
    /// between requests, or sending it slowly) before it is closed, e.g. `30s`.
    pub http_idle_timeout: Option<String>,
    /// Most client HTTP connections open at once.
    pub max_connections: Option<usize>,
    /// `[rate_limits]`: `per_account_per_server`, `per_account`, `per_key`.
    #[serde(default)]
    pub rate_limits: RateLimitsFile,
    /// `[scanning]`: `mode`.
    #[serde(default)]
    pub scanning: ScanningFile,
    /// Most concurrent calls to one server (per-server overrides in the database).
    pub max_concurrency_per_server: Option<u32>,
    /// The master key file (created 0600 on first start). `MCP_MARKETPLACE_MASTER_KEY`
    /// wins over it.
    pub master_key_file: Option<String>,
    /// `[billing]`.
    #[serde(default)]
    pub billing: BillingFile,
    /// `[plans.ID]`, overlaying the built-in Free, Pro and Enterprise plans.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanFile>,
    /// `[stripe]`.
    #[serde(default)]
    pub stripe: StripeFile,
    /// `[probes]`: `interval` (e.g. `5m`), `concurrency`.
    #[serde(default)]
    pub probes: ProbesFile,
    /// How long a shutdown lets calls in flight finish, e.g. `30s`.
    pub shutdown_grace: Option<String>,
    /// `[alerts]` and `[alerts.smtp]`.
    #[serde(default)]
    pub alerts: crate::alerts::AlertsFile,
    /// `[marketplace]`.
    #[serde(default)]
    pub marketplace: MarketplaceFile,
}

/// The `[probes]` section.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ProbesFile {
    /// Interval of scheduled probes (default `5m`).
    pub interval: Option<String>,
    /// Servers probed at once (default 4).
    pub concurrency: Option<usize>,
}

/// `[marketplace]` in a config file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct MarketplaceFile {
    /// Approve servers whose registration verification passed, without an admin
    /// (default false). `true`/`false`, also as a string from a variable.
    pub auto_approve: Option<String>,
    /// Interval of the reputation job, e.g. `5m`.
    pub reputation_interval: Option<String>,
}

/// The marketplace settings (`[marketplace]`).
#[derive(Debug, Clone)]
pub struct MarketplaceConfig {
    /// Approve servers whose registration verification passed without an admin.
    pub auto_approve: bool,
    /// How often reputation scores are recomputed.
    pub reputation_interval: Duration,
}

/// Default interval of the reputation job.
pub const DEFAULT_REPUTATION_INTERVAL: Duration = Duration::from_secs(5 * 60);

impl Default for MarketplaceConfig {
    fn default() -> Self {
        Self {
            auto_approve: false,
            reputation_interval: DEFAULT_REPUTATION_INTERVAL,
        }
    }
}

/// The `[rate_limits]` section: `"N/sec"`, `"N/min"`, `"N/hour"` or `"off"` each.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct RateLimitsFile {
    /// Per account per server (default `20/min`).
    pub per_account_per_server: Option<String>,
    /// Per account overall (default `600/min`).
    pub per_account: Option<String>,
    /// Per key (default `600/min`).
    pub per_key: Option<String>,
}

/// The `[scanning]` section.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ScanningFile {
    /// `off`, `flag` (default) or `block`.
    pub mode: Option<String>,
}

/// `[billing]` in a config file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct BillingFile {
    /// The plan of accounts without one (default `free`).
    pub default_plan: Option<String>,
    /// Payouts below this USD amount are carried forward (default `10.00`).
    pub payout_threshold: Option<UsdSetting>,
}

/// `[stripe]` in a config file.
#[derive(Clone, Default, serde::Deserialize)]
pub struct StripeFile {
    /// The webhook endpoint's signing secret (`whsec_…`); also
    /// `MCP_MARKETPLACE_STRIPE__WEBHOOK_SECRET`.
    pub webhook_secret: Option<String>,
}

impl std::fmt::Debug for StripeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeFile")
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| ".."),
            )
            .finish()
    }
}

/// Accepts `["a", "b"]` or `"a,b"`.
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(
        match <Option<OneOrMany> as serde::Deserialize>::deserialize(d)? {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => s
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            Some(OneOrMany::Many(v)) => v,
        },
    )
}

impl FileConfig {
    /// Reads the TOML file `path` (when given) overlaid with the `MCP_MARKETPLACE_*`
    /// variables.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Parse`] when it
    /// or a variable does not fit the expected shape.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut builder = config::Config::builder();
        let origin = match path {
            Some(p) => {
                // Read it ourselves so a missing file is an error that names it.
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read(p.display().to_string(), e))?;
                builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
                p.display().to_string()
            }
            None => "the environment".to_owned(),
        };
        // Variables stay strings (a numeric-looking URL or key must not turn into a
        // number); serde converts them where a field wants a number.
        builder
            .add_source(
                Environment::with_prefix("MCP_MARKETPLACE")
                    .prefix_separator("_")
                    .separator("__"),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Parse(origin, e.to_string()))
    }
}

/// Parses an optional humantime duration (`30s`, `5m`), `default` when absent.
///
/// # Errors
/// [`ConfigError::Invalid`] naming `key`.
pub fn duration_or(
    key: &'static str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        Some(v) => {
            humantime::parse_duration(v).map_err(|e| ConfigError::Invalid(key, e.to_string()))
        }
        None => Ok(default),
    }
}

/// The resolved configuration of a running marketplace.
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// Database URL.
    pub database_url: String,
    /// The public base URL (`iss` of upstream tokens); default `http://LISTEN`.
    pub public_url: String,
    /// Hosts allowed over plain http.
    pub allow_upstream_hosts: Vec<String>,
    /// Platform fee, basis points.
    pub platform_fee_bps: u32,
    /// Request body cap, bytes.
    pub max_request_bytes: usize,
    /// Upstream response cap, bytes.
    pub max_response_bytes: usize,
    /// TTL of cached tool lists.
    pub tools_ttl: Duration,
    /// Interval of the hold sweep.
    pub sweep_interval: Duration,
    /// Idle time after which an (account, server) upstream session is closed.
    pub session_idle: Duration,
    /// The idle timeout and connection cap of the HTTP server ([`crate::server`]).
    pub http: crate::server::HttpLimits,
    /// Default rate limits.
    pub rate_limits: Limits,
    /// Default response scan mode.
    pub scan_mode: ScanMode,
    /// Default cap on concurrent calls to one server.
    pub max_concurrency_per_server: u32,
    /// Where the master key comes from.
    pub master_key: MasterKeySource,
    /// The DNS lookup upstream names resolve through; `None` is the system's
    /// (hickory-resolver). Tests and embedders inject their own.
    pub lookup: Option<Arc<dyn Lookup>>,
    /// Plans, payout threshold, Stripe webhook secret.
    pub billing: BillingConfig,
    /// Probes, breakers, shutdown grace (issue 4).
    pub reliability: crate::upstream::ReliabilityConfig,
    /// Alert delivery: polling, retries, SMTP.
    pub alerts: crate::alerts::AlertsConfig,
    /// Auto-approval and the reputation job.
    pub marketplace: MarketplaceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            public_url: format!("http://{DEFAULT_LISTEN}"),
            allow_upstream_hosts: Vec::new(),
            platform_fee_bps: DEFAULT_PLATFORM_FEE_BPS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: crate::upstream::client::DEFAULT_MAX_RESPONSE_BYTES,
            tools_ttl: DEFAULT_TOOLS_TTL,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            session_idle: Duration::from_millis(crate::upstream::DEFAULT_SESSION_IDLE_MS as u64),
            http: crate::server::HttpLimits::default(),
            rate_limits: Limits::default(),
            scan_mode: ScanMode::default(),
            max_concurrency_per_server: DEFAULT_MAX_CONCURRENCY_PER_SERVER,
            master_key: MasterKeySource::File(MasterKeySource::default_file(DEFAULT_DATABASE_URL)),
            lookup: None,
            billing: BillingConfig::default(),
            reliability: crate::upstream::ReliabilityConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
            marketplace: MarketplaceConfig::default(),
        }
    }
}

fn rate_or(key: &'static str, value: Option<&str>, default: Rate) -> Result<Rate, ConfigError> {
    match value {
        Some(v) => v
            .parse()
            .map_err(|e: crate::security::ratelimit::RateError| {
                ConfigError::Invalid(key, e.to_string())
            }),
        None => Ok(default),
    }
}

/// Values given on the command line (or by `MCP_MARKETPLACE_*` through clap).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--public-url`.
    pub public_url: Option<String>,
    /// `--allow-upstream-host` (added to the file's list).
    pub allow_upstream_hosts: Vec<String>,
}

impl Config {
    /// Resolves flags over variables over the file over defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable file or an out-of-range value.
    pub fn resolve(file: Option<&Path>, cli: Overrides) -> Result<Self, ConfigError> {
        let file = FileConfig::load(file)?;
        let billing = billing_config(&file)?;
        let reliability = reliability_config(&file)?;
        let d = Config::default();
        let listen = cli.listen.or(file.listen).unwrap_or(d.listen);
        let public_url = cli
            .public_url
            .or(file.public_url)
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let mut allow = file.allow_upstream_hosts;
        allow.extend(cli.allow_upstream_hosts);
        let platform_fee_bps = file.platform_fee_bps.unwrap_or(d.platform_fee_bps);
        if platform_fee_bps > 10_000 {
            return Err(ConfigError::Invalid(
                "platform_fee_bps",
                "at most 10000".into(),
            ));
        }
        let database_url = cli
            .database_url
            .or(file.database_url)
            .unwrap_or(d.database_url);
        let master_key = match std::env::var(MASTER_KEY_VAR) {
            Ok(material) if !material.trim().is_empty() => MasterKeySource::Material(material),
            _ => MasterKeySource::File(
                file.master_key_file
                    .map(PathBuf::from)
                    .unwrap_or_else(|| MasterKeySource::default_file(&database_url)),
            ),
        };
        let r = &file.rate_limits;
        let rate_limits = Limits {
            per_account_per_server: rate_or(
                "rate_limits.per_account_per_server",
                r.per_account_per_server.as_deref(),
                d.rate_limits.per_account_per_server,
            )?,
            per_account: rate_or(
                "rate_limits.per_account",
                r.per_account.as_deref(),
                d.rate_limits.per_account,
            )?,
            per_key: rate_or(
                "rate_limits.per_key",
                r.per_key.as_deref(),
                d.rate_limits.per_key,
            )?,
        };
        let scan_mode = match file.scanning.mode.as_deref() {
            Some(m) => m
                .parse()
                .map_err(|e: crate::security::scan::ScanModeError| {
                    ConfigError::Invalid("scanning.mode", e.to_string())
                })?,
            None => d.scan_mode,
        };
        let max_concurrency_per_server = file
            .max_concurrency_per_server
            .unwrap_or(d.max_concurrency_per_server);
        if !(1..=10_000).contains(&max_concurrency_per_server) {
            return Err(ConfigError::Invalid(
                "max_concurrency_per_server",
                "between 1 and 10000".into(),
            ));
        }
        let http = crate::server::HttpLimits {
            idle_timeout: duration_or(
                "http_idle_timeout",
                file.http_idle_timeout.as_deref(),
                d.http.idle_timeout,
            )?,
            max_connections: file.max_connections.unwrap_or(d.http.max_connections),
        };
        if http.idle_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "http_idle_timeout",
                "must be longer than 0 s".into(),
            ));
        }
        if !(1..=1_000_000).contains(&http.max_connections) {
            return Err(ConfigError::Invalid(
                "max_connections",
                "between 1 and 1000000".into(),
            ));
        }
        Ok(Self {
            listen,
            database_url,
            public_url,
            allow_upstream_hosts: allow,
            platform_fee_bps,
            max_request_bytes: file.max_request_bytes.unwrap_or(d.max_request_bytes),
            max_response_bytes: file.max_response_bytes.unwrap_or(d.max_response_bytes),
            tools_ttl: duration_or("tools_ttl", file.tools_ttl.as_deref(), d.tools_ttl)?,
            sweep_interval: duration_or(
                "sweep_interval",
                file.sweep_interval.as_deref(),
                d.sweep_interval,
            )?,
            session_idle: duration_or(
                "session_idle",
                file.session_idle.as_deref(),
                d.session_idle,
            )?,
            http,
            rate_limits,
            scan_mode,
            max_concurrency_per_server,
            master_key,
            lookup: None,
            billing,
            reliability,
            alerts: crate::alerts::AlertsConfig::from_file(&file.alerts)
                .map_err(|e| ConfigError::Invalid("alerts", e.to_string()))?,
            marketplace: MarketplaceConfig {
                auto_approve: match file.marketplace.auto_approve.as_deref().map(str::trim) {
                    None => d.marketplace.auto_approve,
                    Some("true") => true,
                    Some("false") => false,
                    Some(other) => {
                        return Err(ConfigError::Invalid(
                            "marketplace.auto_approve",
                            format!("'{other}' is not true or false"),
                        ));
                    }
                },
                reputation_interval: duration_or(
                    "marketplace.reputation_interval",
                    file.marketplace.reputation_interval.as_deref(),
                    d.marketplace.reputation_interval,
                )?,
            },
        })
    }
}

/// Resolves `[probes]` and `shutdown_grace`.
fn reliability_config(
    file: &FileConfig,
) -> Result<crate::upstream::ReliabilityConfig, ConfigError> {
    let d = crate::upstream::ReliabilityConfig::default();
    let probe_interval = duration_or(
        "probes.interval",
        file.probes.interval.as_deref(),
        d.probe_interval,
    )?;
    if probe_interval < Duration::from_secs(1) {
        return Err(ConfigError::Invalid(
            "probes.interval",
            "at least 1s".into(),
        ));
    }
    let probe_concurrency = file.probes.concurrency.unwrap_or(d.probe_concurrency);
    if !(1..=256).contains(&probe_concurrency) {
        return Err(ConfigError::Invalid(
            "probes.concurrency",
            "between 1 and 256".into(),
        ));
    }
    Ok(crate::upstream::ReliabilityConfig {
        probe_interval,
        probe_concurrency,
        shutdown_grace: duration_or(
            "shutdown_grace",
            file.shutdown_grace.as_deref(),
            d.shutdown_grace,
        )?,
        ..d
    })
}

/// Resolves `[billing]`, `[plans.*]` and `[stripe]`.
fn billing_config(file: &FileConfig) -> Result<BillingConfig, ConfigError> {
    let plans = PlanBook::from_config(&file.plans, file.billing.default_plan.as_deref())
        .map_err(|e| ConfigError::Invalid("plans", e))?;
    let payout_threshold_micros = match &file.billing.payout_threshold {
        Some(UsdSetting::Text(t)) => {
            crate::billing::pricing::parse_usd(t.trim(), crate::billing::pricing::MAX_GRANT_MICROS)
                .map_err(|e| ConfigError::Invalid("billing.payout_threshold", e.to_string()))?
        }
        Some(UsdSetting::Whole(w)) if (0..=1_000_000).contains(w) => w * 1_000_000,
        Some(UsdSetting::Whole(w)) => {
            return Err(ConfigError::Invalid(
                "billing.payout_threshold",
                format!("{w} is out of range"),
            ));
        }
        None => DEFAULT_PAYOUT_THRESHOLD_MICROS,
    };
    let stripe_webhook_secret = file
        .stripe
        .webhook_secret
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(WebhookSecret::new);
    Ok(BillingConfig {
        plans: Arc::new(plans),
        payout_threshold_micros,
        stripe_webhook_secret,
    })
}
