//! `mcp-marketplace servers sync DIR`: creates or updates servers from the TOML
//! manifests of a directory (`tools-catalog/`), so an operator can keep the catalog in
//! git. Idempotent: a server whose listing already equals its manifest is not touched,
//! so a second run reports no change and writes nothing.
//!
//! New servers go through the one registration path ([`super::register`]: verification
//! probe, `pending_review` unless auto-approval is on). Existing ones are updated field
//! by field (name, description, categories, endpoints, timeout) and their prices
//! changed with effect now. A manifest's `owner` account is created when missing; a
//! slug owned by another account is refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::app::{App, AppError};
use crate::auth::accounts::{AccountError, create_account, find_account};
use crate::billing::pricing;
use crate::catalog::creator::{PriceChange, ServerUpdate};
use crate::catalog::{
    CatalogError, Manifest, parse_tool_price, validate_categories, validate_endpoints,
};
use crate::security::audit::Actor;

/// The owner of manifests without `owner`.
pub const DEFAULT_OWNER: &str = "marketplace";
/// Most manifests read from one directory.
pub const MAX_MANIFESTS: usize = 10_000;

/// A server created by a sync.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Created {
    /// Its slug.
    pub slug: String,
    /// Its status after registration.
    pub status: String,
    /// Its `X-MCP-Marketplace-Secret` (shown this once).
    pub secret: String,
    /// Whether the verification probe passed.
    pub verification_ok: bool,
}

/// A server a sync changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Updated {
    /// Its slug.
    pub slug: String,
    /// The fields changed.
    pub changed: Vec<String>,
}

/// A manifest a sync could not apply.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failed {
    /// The file.
    pub file: String,
    /// Why.
    pub error: String,
}

/// What a sync did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// New servers.
    pub created: Vec<Created>,
    /// Changed servers.
    pub updated: Vec<Updated>,
    /// Slugs already as their manifest says.
    pub unchanged: Vec<String>,
    /// Manifests that failed.
    pub failed: Vec<Failed>,
}

impl SyncReport {
    /// True when the sync changed nothing.
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty()
    }
}

/// Syncs every `*.toml` manifest of `dir` (sorted by file name) into the catalog.
///
/// # Errors
/// [`AppError::Io`] when `dir` cannot be read. A bad manifest is reported in
/// [`SyncReport::failed`] and the others are still applied.
pub async fn sync(app: &Arc<App>, dir: &Path) -> Result<SyncReport, AppError> {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    files.truncate(MAX_MANIFESTS);
    let mut report = SyncReport::default();
    for file in files {
        let name = file.display().to_string();
        let manifest = match Manifest::load(&file) {
            Ok(m) => m,
            Err(e) => {
                report.failed.push(Failed {
                    file: name,
                    error: e.to_string(),
                });
                continue;
            }
        };
        if let Err(e) = apply(app, &manifest, &mut report).await {
            report.failed.push(Failed {
                file: name,
                error: e.to_string(),
            });
        }
    }
    Ok(report)
}

async fn owner_id(app: &App, name: &str) -> Result<String, AppError> {
    match find_account(&app.store, name).await {
        Ok(a) => Ok(a.id),
        Err(AccountError::Unknown(_)) => Ok(create_account(&app.store, name).await?.id),
        Err(e) => Err(e.into()),
    }
}

async fn apply(app: &Arc<App>, m: &Manifest, report: &mut SyncReport) -> Result<(), AppError> {
    let owner = owner_id(app, m.owner.as_deref().unwrap_or(DEFAULT_OWNER)).await?;
    let existing = match app.catalog.get(&m.slug).await {
        Ok(s) => Some(s),
        Err(CatalogError::UnknownServer(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let new = m
        .to_new_server()
        .map_err(|e| AppError::Catalog(CatalogError::InvalidField(leak_field(&e.to_string()))))?;
    let Some(server) = existing else {
        let r = super::register(
            app,
            &Actor::cli(),
            &owner,
            super::RegisterRequest {
                name: new.name,
                slug: new.slug,
                description: new.description,
                categories: new.categories,
                endpoint: None,
                endpoints: new.endpoints,
                pricing: new.pricing,
                tool_prices: new.tool_prices,
                timeout: m.timeout.clone(),
                credentials: BTreeMap::new(),
            },
        )
        .await?;
        report.created.push(Created {
            slug: r.server.slug.clone(),
            status: r.server.status.as_str().to_owned(),
            secret: r.secret,
            verification_ok: r.verification.ok,
        });
        return Ok(());
    };
    if server.owner_account_id != owner {
        return Err(CatalogError::InvalidField(
            "owner: the slug belongs to another account; sync never moves a server",
        )
        .into());
    }
    // Everything is validated before anything is written.
    let categories = validate_categories(&new.categories)?;
    let endpoints = validate_endpoints(&new.endpoints, &app.policy).await?;
    let price = pricing::parse_pricing(&new.pricing).map_err(CatalogError::from)?;
    let mut tool_prices = BTreeMap::new();
    for (t, p) in &new.tool_prices {
        tool_prices.insert(t.clone(), parse_tool_price(t, p)?);
    }
    let mut changed = Vec::new();
    let mut update = ServerUpdate::default();
    if new.name.trim() != server.name {
        update.name = Some(new.name.clone());
        changed.push("name".to_owned());
    }
    if new.description != server.description {
        update.description = Some(new.description.clone());
        changed.push("description".to_owned());
    }
    if categories != server.categories {
        update.categories = Some(categories);
        changed.push("categories".to_owned());
    }
    if endpoints != server.endpoints {
        update.endpoints = Some(endpoints);
        changed.push("endpoints".to_owned());
    }
    let timeout = new.timeout_ms.unwrap_or(crate::catalog::DEFAULT_TIMEOUT_MS);
    if timeout != server.timeout_ms {
        update.timeout_ms = Some(timeout);
        changed.push("timeout".to_owned());
    }
    let mut prices = PriceChange::default();
    if price != server.price_micros {
        prices.pricing = Some(new.pricing.clone());
        changed.push("pricing".to_owned());
    }
    for (t, p) in &tool_prices {
        if server.tool_prices.get(t) != Some(p) {
            prices
                .tool_prices
                .insert(t.clone(), new.tool_prices.get(t).cloned());
        }
    }
    for t in server.tool_prices.keys() {
        if !tool_prices.contains_key(t) {
            prices.tool_prices.insert(t.clone(), None);
        }
    }
    if !prices.tool_prices.is_empty() {
        changed.push("tool_prices".to_owned());
    }
    if changed.is_empty() {
        report.unchanged.push(server.slug);
        return Ok(());
    }
    let endpoints_changed = update.endpoints.is_some();
    app.catalog.update(&server, &update, &app.policy).await?;
    if prices.pricing.is_some() || !prices.tool_prices.is_empty() {
        app.catalog.change_prices(&server, &prices).await?;
    }
    if endpoints_changed {
        app.upstreams.close_server(&server.id).await;
    }
    report.updated.push(Updated {
        slug: server.slug,
        changed,
    });
    Ok(())
}

/// `CatalogError::InvalidField` takes a static description; a manifest's own error
/// text is turned into one (rare: only a bad `timeout`).
fn leak_field(_text: &str) -> &'static str {
    "timeout: a duration such as 10s"
}
