//! The catalog: listed servers, their endpoints, prices and status, the cached upstream
//! tool definitions with their namespaced names, and installs.
//!
//! A client's `tools/list` is answered from here, never from an upstream: the tool
//! definitions are fetched at approval and refreshed by `upstream::tools`.
//!
//! Tool pinning ([`pins`]): every cached tool carries the hash of its reviewed fields,
//! and only tools whose hash an admin approved are listed or callable. Every write of
//! an upstream's tool list goes through [`Catalog::replace_tools`], which holds back a
//! new or changed tool and records the change.

pub mod creator;
pub mod manifest;
pub mod namespace;
pub mod pins;
pub mod reputation;
pub mod reviews;
pub mod search;

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::Row;

use crate::billing::pricing::{self, PriceError};
use crate::security::{EndpointError, EndpointPolicy};
use crate::store::{Store, StoreError, is_unique_violation, now_ms};

pub use manifest::{Manifest, ManifestError};
pub use namespace::namespaced_name;
pub use pins::{ToolChange, tool_hash};

/// Default per-call upstream timeout (ms).
pub const DEFAULT_TIMEOUT_MS: i64 = 30_000;
/// Longest per-call upstream timeout (ms).
pub const MAX_TIMEOUT_MS: i64 = 300_000;
/// Most tools kept per server.
pub const MAX_TOOLS_PER_SERVER: usize = 512;
/// Most endpoints per server.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest server name / description (characters).
const MAX_NAME_LEN: usize = 100;
const MAX_DESCRIPTION_LEN: usize = 2000;

/// A server's place in the status machine (DESIGN.md "Health and trust").
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    /// Registered, waiting for an admin.
    PendingReview,
    /// Approved and healthy.
    Active,
    /// Approved, slower or failing sometimes.
    Degraded,
    /// Failing: hidden and not callable.
    Inactive,
    /// Back from inactive, on probation.
    Recovered,
    /// Stopped by an admin.
    Suspended,
}

impl ServerStatus {
    /// The stored and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PendingReview => "pending_review",
            Self::Active => "active",
            Self::Degraded => "degraded",
            Self::Inactive => "inactive",
            Self::Recovered => "recovered",
            Self::Suspended => "suspended",
        }
    }

    /// Parses a stored name (unknown names read as suspended: fail closed).
    pub fn parse(s: &str) -> Self {
        match s {
            "pending_review" => Self::PendingReview,
            "active" => Self::Active,
            "degraded" => Self::Degraded,
            "inactive" => Self::Inactive,
            "recovered" => Self::Recovered,
            _ => Self::Suspended,
        }
    }

    /// Only active, degraded and recovered servers are callable and listed.
    pub fn is_callable(self) -> bool {
        matches!(self, Self::Active | Self::Degraded | Self::Recovered)
    }
}

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A slug not of the form `[a-z0-9][a-z0-9-]{0,31}`.
    #[error(
        "invalid slug '{0}': use 1-32 characters of a-z, 0-9 and '-', starting with a letter or digit"
    )]
    InvalidSlug(String),
    /// The slug is taken.
    #[error("the slug '{0}' is already taken")]
    SlugTaken(String),
    /// An empty or overlong name or description.
    #[error("invalid {0}")]
    InvalidField(&'static str),
    /// A refused endpoint.
    #[error("invalid endpoint: {0}")]
    Endpoint(#[from] EndpointError),
    /// A bad price.
    #[error("invalid price: {0}")]
    Price(#[from] PriceError),
    /// A timeout outside 1 ms – 300 s.
    #[error("invalid timeout: it must be between 1 ms and 300 s")]
    InvalidTimeout,
    /// No server with that slug.
    #[error("no server '{0}'")]
    UnknownServer(String),
    /// The server cannot be installed or called in its status.
    #[error("server '{0}' is {1} and cannot be used")]
    NotAvailable(String, &'static str),
    /// The server's verification failed; it cannot be approved until a verification
    /// passes.
    #[error(
        "server '{0}' failed its verification ({1}); fix the server and run the verification again"
    )]
    VerificationFailed(String, String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CatalogError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// A listed server. The per-server secret is not part of it (see [`Catalog::secret`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Server {
    /// UUIDv7.
    pub id: String,
    /// Unique slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Categories, e.g. `productivity`.
    pub categories: Vec<String>,
    /// The creator's account id.
    #[serde(skip)]
    pub owner_account_id: String,
    /// Default price per call, micros.
    pub price_micros: i64,
    /// Per-tool price overrides, micros.
    pub tool_prices: BTreeMap<String, i64>,
    /// Status.
    pub status: ServerStatus,
    /// Per-call upstream timeout, ms.
    pub timeout_ms: i64,
    /// Endpoint URLs (never shown to clients).
    #[serde(skip)]
    pub endpoints: Vec<String>,
    /// Creation time, epoch ms.
    pub created_at: i64,
    /// False when the creator unlisted it: hidden from search and new installs.
    pub listed: bool,
}

impl Server {
    /// The price of one call of `tool` in micros (the override, else the server's).
    pub fn price_of(&self, tool: &str) -> i64 {
        self.tool_prices
            .get(tool)
            .copied()
            .unwrap_or(self.price_micros)
    }
}

/// What a creator registers.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct NewServer {
    /// Display name (required).
    pub name: String,
    /// Slug; derived from the name when absent.
    #[serde(default)]
    pub slug: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// One or more endpoint URLs.
    pub endpoints: Vec<String>,
    /// `free` or `<decimal>_per_request`.
    pub pricing: String,
    /// Per-tool overrides: tool → `<decimal>` USD (or a pricing string).
    #[serde(default)]
    pub tool_prices: BTreeMap<String, String>,
    /// Per-call timeout in ms (default 30 000, at most 300 000).
    #[serde(default)]
    pub timeout_ms: Option<i64>,
}

/// A cached upstream tool.
#[derive(Debug, Clone)]
pub struct CatalogTool {
    /// The server's id.
    pub server_id: String,
    /// The server's slug.
    pub slug: String,
    /// The upstream's own tool name.
    pub name: String,
    /// `{slug}__{tool}`, at most 64 characters.
    pub namespaced_name: String,
    /// The upstream's tool definition (MCP `Tool` JSON).
    pub definition: serde_json::Value,
}

/// True for a slug of the form `[a-z0-9][a-z0-9-]{0,31}`.
pub fn is_valid_slug(slug: &str) -> bool {
    let b = slug.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// True for characters that render as nothing or reorder text: zero-width characters,
/// bidirectional controls, Unicode tags, the BOM. Refused in names and descriptions so
/// a listing cannot hide text or imitate another (Unicode TR #36 §2).
pub fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}' | '\u{061C}' | '\u{180E}'
        | '\u{E0000}'..='\u{E007F}')
}

/// Derives a slug from a display name: lowercase ASCII letters and digits, other runs
/// become one `-`, at most 32 characters.
pub fn slug_from_name(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= 32 {
            break;
        }
    }
    slug.trim_end_matches('-').to_owned()
}

/// A fresh per-server secret: `mms_` + 32 random bytes, base64url.
pub fn generate_secret() -> String {
    use base64::Engine;
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source is available");
    format!(
        "mms_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

/// Checks a display name: 1-100 printable characters after trimming. Returns it trimmed.
///
/// # Errors
/// [`CatalogError::InvalidField`].
pub fn validate_name(name: &str) -> Result<&str, CatalogError> {
    let name = name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_LEN
        || name.chars().any(|c| c.is_control() || is_invisible(c))
    {
        return Err(CatalogError::InvalidField(
            "name: 1-100 printable characters",
        ));
    }
    Ok(name)
}

/// Checks a description: at most 2000 printable characters (newlines and tabs allowed).
///
/// # Errors
/// [`CatalogError::InvalidField`].
pub fn validate_description(description: &str) -> Result<(), CatalogError> {
    if description.chars().count() > MAX_DESCRIPTION_LEN
        || description
            .chars()
            .any(|c| (c.is_control() && !matches!(c, '\n' | '\t')) || is_invisible(c))
    {
        return Err(CatalogError::InvalidField(
            "description: at most 2000 printable characters",
        ));
    }
    Ok(())
}

/// Normalizes and checks categories: trimmed, lowercase, empty ones dropped; at most 10,
/// each 1-40 characters without commas.
///
/// # Errors
/// [`CatalogError::InvalidField`].
pub fn validate_categories(categories: &[String]) -> Result<Vec<String>, CatalogError> {
    let categories: Vec<String> = categories
        .iter()
        .map(|c| c.trim().to_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    if categories.iter().any(|c| {
        c.len() > 40 || c.contains(',') || c.chars().any(|c| c.is_control() || is_invisible(c))
    }) || categories.len() > 10
    {
        return Err(CatalogError::InvalidField(
            "categories: at most 10, each 1-40 characters without commas",
        ));
    }
    Ok(categories)
}

/// Checks 1 to [`MAX_ENDPOINTS`] endpoint URLs against the SSRF `policy` (resolving
/// them). Returns them normalized.
///
/// # Errors
/// [`CatalogError::InvalidField`], [`CatalogError::Endpoint`].
pub async fn validate_endpoints(
    endpoints: &[String],
    policy: &EndpointPolicy,
) -> Result<Vec<String>, CatalogError> {
    if endpoints.is_empty() || endpoints.len() > MAX_ENDPOINTS {
        return Err(CatalogError::InvalidField(
            "endpoints: between 1 and 8 URLs",
        ));
    }
    let mut out = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        out.push(policy.check_resolved(e).await?.to_string());
    }
    Ok(out)
}

/// Parses a per-tool price override (`0.05`, `free` or `0.05_per_request`) for `tool`
/// (1-128 printable characters), in micros.
///
/// # Errors
/// [`CatalogError::InvalidField`], [`CatalogError::Price`].
pub fn parse_tool_price(tool: &str, price: &str) -> Result<i64, CatalogError> {
    if tool.is_empty()
        || tool.len() > 128
        || tool.chars().any(|c| c.is_control() || is_invisible(c))
    {
        return Err(CatalogError::InvalidField(
            "tool price: a tool name of 1-128 characters",
        ));
    }
    Ok(pricing::parse_pricing(price)
        .or_else(|_| pricing::parse_usd(price, pricing::MAX_PRICE_MICROS))?)
}

/// The catalog over a [`Store`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Store,
    /// The in-memory snapshot the call path and `tools/list` read ([`snapshot`]).
    snapshot: Arc<snapshot::SnapshotCell>,
}

/// `SELECT` of the server columns [`Catalog::hydrate`] reads, followed by `$tail`.
macro_rules! select_servers {
    ($tail:literal) => {
        concat!(
            "SELECT id, slug, name, description, categories, owner_account_id, price_micros, status, \
             timeout_ms, created_at, listed, next_price_change_at FROM servers ",
            $tail
        )
    };
}

/// `SELECT` of the [`CatalogTool`] columns of tools clients may see: cached tools whose
/// hash is the approved pin (tool pinning), joined with their server as `s`, followed
/// by `$tail` (more joins, then `WHERE …`). Every read of listed or callable tools
/// uses it.
macro_rules! select_visible_tools {
    ($tail:literal) => {
        concat!(
            "SELECT t.server_id, s.slug, t.name, t.namespaced_name, t.definition FROM upstream_tools t \
             JOIN servers s ON s.id = t.server_id \
             JOIN tool_pins p ON p.server_id = t.server_id AND p.tool = t.name AND p.hash = t.hash ",
            $tail
        )
    };
}

pub mod snapshot;
pub use snapshot::Snapshot;

impl Catalog {
    /// A catalog on `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            snapshot: Arc::default(),
        }
    }

    /// Validates and stores a new server in `pending_review`, owned by
    /// `owner_account_id`. Returns it with its `X-MCP-Marketplace-Secret`, shown once.
    /// Nothing is written when any field is refused.
    ///
    /// # Errors
    /// [`CatalogError::InvalidSlug`], [`CatalogError::SlugTaken`],
    /// [`CatalogError::InvalidField`], [`CatalogError::Endpoint`], [`CatalogError::Price`],
    /// [`CatalogError::InvalidTimeout`], [`CatalogError::Store`].
    pub async fn register(
        &self,
        owner_account_id: &str,
        new: &NewServer,
        policy: &EndpointPolicy,
    ) -> Result<(Server, String), CatalogError> {
        let name = validate_name(&new.name)?;
        validate_description(&new.description)?;
        let slug = match &new.slug {
            Some(s) => s.clone(),
            None => slug_from_name(name),
        };
        if !is_valid_slug(&slug) || slug == "marketplace" {
            return Err(CatalogError::InvalidSlug(slug));
        }
        let endpoints = validate_endpoints(&new.endpoints, policy).await?;
        let price_micros = pricing::parse_pricing(&new.pricing)?;
        let mut tool_prices = BTreeMap::new();
        for (tool, price) in &new.tool_prices {
            tool_prices.insert(tool.clone(), parse_tool_price(tool, price)?);
        }
        let timeout_ms = new.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(CatalogError::InvalidTimeout);
        }
        let categories = validate_categories(&new.categories)?;
        let now = now_ms();
        let server = Server {
            id: uuid::Uuid::now_v7().to_string(),
            slug: slug.clone(),
            name: name.to_owned(),
            description: new.description.clone(),
            categories,
            owner_account_id: owner_account_id.to_owned(),
            price_micros,
            tool_prices,
            status: ServerStatus::PendingReview,
            timeout_ms,
            endpoints,
            created_at: now,
            listed: true,
        };
        let secret = generate_secret();
        let mut tx = self.store.begin().await?;
        sqlx::query(
            "INSERT INTO servers (id, slug, name, description, categories, owner_account_id, price_micros, \
             status, secret, timeout_ms, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)",
        )
        .bind(&server.id)
        .bind(&server.slug)
        .bind(&server.name)
        .bind(&server.description)
        .bind(server.categories.join(","))
        .bind(&server.owner_account_id)
        .bind(server.price_micros)
        .bind(server.status.as_str())
        .bind(&secret)
        .bind(server.timeout_ms)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                CatalogError::SlugTaken(slug.clone())
            } else {
                e.into()
            }
        })?;
        for (i, url) in server.endpoints.iter().enumerate() {
            sqlx::query(
                "INSERT INTO server_endpoints (server_id, position, url) VALUES ($1, $2, $3)",
            )
            .bind(&server.id)
            .bind(i as i64)
            .bind(url)
            .execute(&mut *tx)
            .await?;
        }
        for (tool, micros) in &server.tool_prices {
            sqlx::query(
                "INSERT INTO tool_prices (server_id, tool, price_micros) VALUES ($1, $2, $3)",
            )
            .bind(&server.id)
            .bind(tool)
            .bind(*micros)
            .execute(&mut *tx)
            .await?;
        }
        // The price history starts with the registered prices.
        creator::record_applied_prices(&mut tx, &server.id, price_micros, &server.tool_prices, now)
            .await?;
        search::reindex(&mut tx, self.store.backend(), &server.id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.changed();
        Ok((server, secret))
    }

    async fn hydrate(&self, row: sqlx::any::AnyRow) -> Result<Server, CatalogError> {
        let id: String = row.try_get(0)?;
        let next_change: Option<i64> = row.try_get(11)?;
        if next_change.is_some_and(|t| t <= now_ms()) {
            // A scheduled price change fell due: apply it before anyone reads the price.
            self.apply_due_prices(&id).await?;
            let row = sqlx::query(select_servers!("WHERE id = $1"))
                .bind(&id)
                .fetch_one(self.store.pool())
                .await?;
            let (endpoints, tool_prices) = self.endpoints_and_prices(&id).await?;
            return server_from_row(&row, endpoints, tool_prices);
        }
        let (endpoints, tool_prices) = self.endpoints_and_prices(&id).await?;
        server_from_row(&row, endpoints, tool_prices)
    }

    async fn endpoints_and_prices(
        &self,
        id: &str,
    ) -> Result<(Vec<String>, BTreeMap<String, i64>), CatalogError> {
        let endpoints =
            sqlx::query("SELECT url FROM server_endpoints WHERE server_id = $1 ORDER BY position")
                .bind(id)
                .fetch_all(self.store.pool())
                .await?
                .into_iter()
                .map(|r| r.try_get(0))
                .collect::<Result<Vec<String>, _>>()?;
        let mut tool_prices = BTreeMap::new();
        for r in sqlx::query("SELECT tool, price_micros FROM tool_prices WHERE server_id = $1")
            .bind(id)
            .fetch_all(self.store.pool())
            .await?
        {
            tool_prices.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok((endpoints, tool_prices))
    }

    /// The server with `slug`.
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn get(&self, slug: &str) -> Result<Server, CatalogError> {
        let row = sqlx::query(select_servers!("WHERE slug = $1"))
            .bind(slug)
            .fetch_optional(self.store.pool())
            .await?
            .ok_or_else(|| CatalogError::UnknownServer(slug.to_owned()))?;
        self.hydrate(row).await
    }

    /// The server with `id`.
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn get_by_id(&self, id: &str) -> Result<Server, CatalogError> {
        let row = sqlx::query(select_servers!("WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.store.pool())
            .await?
            .ok_or_else(|| CatalogError::UnknownServer(id.to_owned()))?;
        self.hydrate(row).await
    }

    /// The id of the server with `slug` (any status), if there is one: the rate
    /// limiter's lookup on every `tools/call`, answered from the catalog snapshot (no
    /// query while the catalog is unchanged; see [`Catalog::snapshot`]).
    ///
    /// # Errors
    /// [`CatalogError::Store`] when the snapshot had to be rebuilt and could not be.
    pub async fn id_of(&self, slug: &str) -> Result<Option<String>, CatalogError> {
        Ok(self.cached(slug).await?.map(|s| s.id.clone()))
    }

    /// Replaces the per-server `X-MCP-Marketplace-Secret` of `slug` with a fresh one and
    /// returns it (shown this once). Open upstream sessions keep the old one until they
    /// are closed (`App::rotate_secret` closes them).
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn rotate_secret(&self, slug: &str) -> Result<(Server, String), CatalogError> {
        let secret = generate_secret();
        let n = sqlx::query("UPDATE servers SET secret = $1, updated_at = $2 WHERE slug = $3")
            .bind(&secret)
            .bind(now_ms())
            .bind(slug)
            .execute(self.store.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(CatalogError::UnknownServer(slug.to_owned()));
        }
        self.changed();
        Ok((self.get(slug).await?, secret))
    }

    /// Every server (admin view), by slug.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn list(&self) -> Result<Vec<Server>, CatalogError> {
        // Price changes that fell due are applied first (as `get` does), then three
        // queries whatever the number of servers.
        let now = now_ms();
        let due: Vec<String> = sqlx::query(
            "SELECT id FROM servers WHERE next_price_change_at IS NOT NULL AND next_price_change_at <= $1",
        )
        .bind(now)
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        for id in &due {
            self.apply_due_prices(id).await?;
        }
        let rows = sqlx::query(select_servers!("ORDER BY slug"))
            .fetch_all(self.store.pool())
            .await?;
        let mut endpoints: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in
            sqlx::query("SELECT server_id, url FROM server_endpoints ORDER BY server_id, position")
                .fetch_all(self.store.pool())
                .await?
        {
            endpoints
                .entry(r.try_get(0)?)
                .or_default()
                .push(r.try_get(1)?);
        }
        let mut prices: std::collections::HashMap<String, BTreeMap<String, i64>> =
            Default::default();
        for r in sqlx::query("SELECT server_id, tool, price_micros FROM tool_prices")
            .fetch_all(self.store.pool())
            .await?
        {
            prices
                .entry(r.try_get(0)?)
                .or_default()
                .insert(r.try_get(1)?, r.try_get(2)?);
        }
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0)?;
                server_from_row(
                    row,
                    endpoints.remove(&id).unwrap_or_default(),
                    prices.remove(&id).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The per-server `X-MCP-Marketplace-Secret` (server-side only; never shown again).
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn secret(&self, server_id: &str) -> Result<String, CatalogError> {
        Ok(sqlx::query("SELECT secret FROM servers WHERE id = $1")
            .bind(server_id)
            .fetch_optional(self.store.pool())
            .await?
            .ok_or_else(|| CatalogError::UnknownServer(server_id.to_owned()))?
            .try_get(0)?)
    }

    /// Moves `slug` to `status`.
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn set_status(
        &self,
        slug: &str,
        status: ServerStatus,
    ) -> Result<Server, CatalogError> {
        let n = sqlx::query("UPDATE servers SET status = $1, updated_at = $2 WHERE slug = $3")
            .bind(status.as_str())
            .bind(now_ms())
            .bind(slug)
            .execute(self.store.pool())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(CatalogError::UnknownServer(slug.to_owned()));
        }
        self.changed();
        self.get(slug).await
    }

    /// Installs `slug` for `account_id`. Returns false when it was installed already.
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::NotAvailable`] unless the server
    /// is callable, [`CatalogError::Store`].
    pub async fn install(&self, account_id: &str, slug: &str) -> Result<bool, CatalogError> {
        let server = self.get(slug).await?;
        if !server.status.is_callable() {
            return Err(CatalogError::NotAvailable(
                slug.to_owned(),
                server.status.as_str(),
            ));
        }
        if !server.listed {
            return Err(CatalogError::NotAvailable(slug.to_owned(), "unlisted"));
        }
        let n = sqlx::query(
            "INSERT INTO installs (account_id, server_id, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id, server_id) DO NOTHING",
        )
        .bind(account_id)
        .bind(&server.id)
        .bind(now_ms())
        .execute(self.store.pool())
        .await?
        .rows_affected();
        self.changed();
        Ok(n == 1)
    }

    /// Uninstalls `slug` for `account_id`. Returns false when it was not installed.
    ///
    /// # Errors
    /// [`CatalogError::UnknownServer`], [`CatalogError::Store`].
    pub async fn uninstall(&self, account_id: &str, slug: &str) -> Result<bool, CatalogError> {
        let server = self.get(slug).await?;
        let n = sqlx::query("DELETE FROM installs WHERE account_id = $1 AND server_id = $2")
            .bind(account_id)
            .bind(&server.id)
            .execute(self.store.pool())
            .await?
            .rows_affected();
        self.changed();
        Ok(n == 1)
    }

    /// Replaces the cached tool list of `server` with `tools` (MCP `Tool` JSON objects;
    /// ones without a string `name` and object `inputSchema` are skipped; at most
    /// [`MAX_TOOLS_PER_SERVER`]). Returns true when the tools clients see changed.
    ///
    /// This is the one function every read of an upstream's tool list goes through
    /// (approval, TTL refresh, `list_changed`, probes), and it applies tool pinning: a
    /// tool whose [`tool_hash`] is not the approved one (a changed or a new tool) is
    /// stored but held back from `tools/list` and calls, and the change is recorded in
    /// `tool_changes` (one pending change per tool; a tool that changes back resolves
    /// it as `reverted`). Each new or re-changed pending change enqueues a
    /// `tool.changed` alert for the server's owner in the same transaction
    /// ([`crate::alerts`]).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn replace_tools(
        &self,
        server: &Server,
        tools: &[serde_json::Value],
    ) -> Result<bool, CatalogError> {
        let mut fresh: Vec<pins::FreshTool> = Vec::new();
        for def in tools.iter().take(MAX_TOOLS_PER_SERVER) {
            let (Some(name), Some(_)) = (
                def.get("name").and_then(|n| n.as_str()),
                def.get("inputSchema").and_then(|s| s.as_object()),
            ) else {
                tracing::warn!(server = %server.slug, "skipping a tool definition without name or inputSchema");
                continue;
            };
            if name.is_empty() || fresh.iter().any(|t| t.name == name) {
                continue;
            }
            fresh.push(pins::FreshTool {
                name: name.to_owned(),
                namespaced: namespaced_name(&server.slug, name),
                definition: def.to_string(),
                hash: tool_hash(def),
            });
        }
        let mut tx = self.store.begin().await?;
        let changed = pins::replace_pinned(&mut tx, &server.id, &fresh).await?;
        sqlx::query("UPDATE servers SET tools_fetched_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(&server.id)
            .execute(&mut *tx)
            .await?;
        if changed {
            search::reindex(&mut tx, self.store.backend(), &server.id).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.changed();
        Ok(changed)
    }

    /// Ids of callable servers whose tools were fetched before `older_than_ms` (epoch ms)
    /// or never: the TTL refresh's work list.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn stale_tool_lists(&self, older_than_ms: i64) -> Result<Vec<String>, CatalogError> {
        Ok(sqlx::query(
            "SELECT id FROM servers WHERE status IN ('active', 'degraded', 'recovered') \
             AND (tools_fetched_at IS NULL OR tools_fetched_at < $1)",
        )
        .bind(older_than_ms)
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
    }

    /// Accounts that installed `server_id` (to notify on tool changes).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn installed_by(&self, server_id: &str) -> Result<Vec<String>, CatalogError> {
        Ok(
            sqlx::query("SELECT account_id FROM installs WHERE server_id = $1")
                .bind(server_id)
                .fetch_all(self.store.pool())
                .await?
                .into_iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?,
        )
    }
}

/// A [`Server`] from a row of `select_servers!` and its endpoints and price overrides.
fn server_from_row(
    row: &sqlx::any::AnyRow,
    endpoints: Vec<String>,
    tool_prices: BTreeMap<String, i64>,
) -> Result<Server, CatalogError> {
    let categories: String = row.try_get(4)?;
    Ok(Server {
        id: row.try_get(0)?,
        slug: row.try_get(1)?,
        name: row.try_get(2)?,
        description: row.try_get(3)?,
        categories: categories
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
        owner_account_id: row.try_get(5)?,
        price_micros: row.try_get(6)?,
        tool_prices,
        status: ServerStatus::parse(&row.try_get::<String, _>(7)?),
        timeout_ms: row.try_get(8)?,
        endpoints,
        created_at: row.try_get(9)?,
        listed: row.try_get::<i64, _>(10)? == 1,
    })
}

fn catalog_tool(row: sqlx::any::AnyRow) -> Result<CatalogTool, CatalogError> {
    let def: String = row.try_get(4)?;
    Ok(CatalogTool {
        server_id: row.try_get(0)?,
        slug: row.try_get(1)?,
        name: row.try_get(2)?,
        namespaced_name: row.try_get(3)?,
        definition: serde_json::from_str(&def).unwrap_or(serde_json::Value::Null),
    })
}
