//! Configuration: flags, a TOML file (`--config FILE`) and `MCP_MARKETPLACE_*`
//! variables (DESIGN.md "Configuration file"). Precedence: flag or variable (clap reads
//! both) over the file over the defaults here.

use std::path::Path;
use std::time::Duration;

use crate::billing::pricing::DEFAULT_PLATFORM_FEE_BPS;

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

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}: {1}")]
    Read(String, std::io::Error),
    /// The file is not valid TOML of the expected shape.
    #[error("invalid config file {0}: {1}")]
    Parse(String, String),
    /// A value is out of range.
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// The TOML file's shape. Unknown keys are ignored so newer files work with older
/// binaries.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct FileConfig {
    /// `HOST:PORT` to listen on.
    pub listen: Option<String>,
    /// `sqlite://FILE` or `postgres://…`.
    pub database_url: Option<String>,
    /// The URL clients and upstreams know the marketplace by.
    pub public_url: Option<String>,
    /// Hosts allowed over plain http (and on private addresses).
    #[serde(default)]
    pub allow_upstream_hosts: Vec<String>,
    /// Platform fee in basis points (3000 = 30 %).
    pub platform_fee_bps: Option<u32>,
    /// Request body cap, bytes.
    pub max_request_bytes: Option<usize>,
    /// Upstream response cap, bytes.
    pub max_response_bytes: Option<usize>,
    /// TTL of cached tool lists, e.g. `10m`.
    pub tools_ttl: Option<String>,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.display().to_string(), e.to_string()))
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
        }
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

fn env(key: &str) -> Option<String> {
    std::env::var(format!("MCP_MARKETPLACE_{key}"))
        .ok()
        .filter(|v| !v.is_empty())
}

impl Config {
    /// Resolves flags over variables over the file over defaults.
    ///
    /// # Errors
    /// [`ConfigError`] for an unreadable file or an out-of-range value.
    pub fn resolve(file: Option<&Path>, cli: Overrides) -> Result<Self, ConfigError> {
        let file = match file {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let listen = cli.listen.or(file.listen).unwrap_or(d.listen);
        let public_url = cli
            .public_url
            .or(file.public_url)
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let mut allow = file.allow_upstream_hosts;
        if let Some(v) = env("ALLOW_UPSTREAM_HOSTS") {
            allow.extend(
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()),
            );
        }
        allow.extend(cli.allow_upstream_hosts);
        let platform_fee_bps = match env("PLATFORM_FEE_BPS") {
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::Invalid("platform_fee_bps", v))?,
            None => file.platform_fee_bps.unwrap_or(d.platform_fee_bps),
        };
        if platform_fee_bps > 10_000 {
            return Err(ConfigError::Invalid(
                "platform_fee_bps",
                "at most 10000".into(),
            ));
        }
        let tools_ttl = match env("TOOLS_TTL").or(file.tools_ttl) {
            Some(v) => humantime::parse_duration(&v)
                .map_err(|e| ConfigError::Invalid("tools_ttl", e.to_string()))?,
            None => d.tools_ttl,
        };
        Ok(Self {
            listen,
            database_url: cli
                .database_url
                .or(file.database_url)
                .unwrap_or(d.database_url),
            public_url,
            allow_upstream_hosts: allow,
            platform_fee_bps,
            max_request_bytes: file.max_request_bytes.unwrap_or(d.max_request_bytes),
            max_response_bytes: file.max_response_bytes.unwrap_or(d.max_response_bytes),
            tools_ttl,
            sweep_interval: d.sweep_interval,
            session_idle: d.session_idle,
        })
    }
}
