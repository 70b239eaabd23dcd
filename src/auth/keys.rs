//! API keys: `mkt_` + 40 random base62 characters, stored only as a SHA-256 hash plus
//! the first 12 characters (`mkt_` + 8) to show (DESIGN.md "Words": API key).

use std::fmt;
use std::str::FromStr;

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::store::versions::Domain;
use crate::store::{Store, StoreError, now_ms};

/// The prefix of every key.
pub const KEY_PREFIX: &str = "mkt_";
/// Random base62 characters after the prefix.
const KEY_RANDOM_CHARS: usize = 40;
/// Characters of a key kept in clear to show it (`mkt_` + 8).
pub const SHOWN_PREFIX_LEN: usize = 12;
/// Longest key accepted on the wire (anything longer is refused before hashing).
const MAX_KEY_LEN: usize = 128;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A permission a key carries (DESIGN.md "Words": scope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// Call tools through `/mcp` and `/servers/{slug}/mcp`.
    #[serde(rename = "invoke")]
    Invoke,
    /// Read the catalog.
    #[serde(rename = "catalog:read")]
    CatalogRead,
    /// Register and manage one's own servers (creators).
    #[serde(rename = "servers:write")]
    ServersWrite,
    /// Everything.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    /// The wire name: `invoke`, `catalog:read`, `servers:write`, `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::CatalogRead => "catalog:read",
            Self::ServersWrite => "servers:write",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.trim() {
            "invoke" => Ok(Self::Invoke),
            "catalog:read" => Ok(Self::CatalogRead),
            "servers:write" => Ok(Self::ServersWrite),
            "admin" => Ok(Self::Admin),
            other => Err(KeyError::InvalidScope(other.to_owned())),
        }
    }
}

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unknown scope name.
    #[error("unknown scope '{0}' (expected invoke, catalog:read, servers:write or admin)")]
    InvalidScope(String),
    /// No scope given.
    #[error("a key needs at least one scope")]
    NoScope,
    /// A bad `--allow-tools` glob.
    #[error("invalid tool pattern '{0}'")]
    InvalidPattern(String),
    /// A bad `--spend-limit` (expected `5.00/day` or `20/month`).
    #[error("invalid spend limit '{0}' (expected AMOUNT/day or AMOUNT/month, e.g. 5.00/day)")]
    InvalidSpendLimit(String),
    /// A bad `--expires` (expected a duration such as `30d`).
    #[error("invalid expiry '{0}' (expected a duration such as 30d or 12h)")]
    InvalidExpiry(String),
    /// No account of that name.
    #[error("no account named '{0}'")]
    UnknownAccount(String),
    /// No key matches the id or prefix.
    #[error("no key matches '{0}'")]
    UnknownKey(String),
    /// The prefix matches several keys.
    #[error("'{0}' matches several keys; give the key id")]
    AmbiguousKey(String),
    /// Missing, malformed, unknown, revoked or expired key. Deliberately one variant:
    /// the caller learns nothing about which.
    #[error("missing, invalid, expired or revoked API key")]
    Unauthorized,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for KeyError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(e))
    }
}

/// An authenticated key: who is calling and what it may do.
#[derive(Debug, Clone)]
pub struct KeyContext {
    /// The key's id (UUIDv7).
    pub key_id: String,
    /// The owning account's id.
    pub account_id: String,
    /// The owning account's name.
    pub account_name: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Glob patterns over namespaced tool names, compiled; empty = every tool.
    pub allow_tools: AllowList,
    /// Spend limits `(micros, "day"|"month")`: at most one per period.
    pub spend_limits: Vec<(i64, String)>,
    /// Expiry, epoch ms.
    pub expires_at: Option<i64>,
}

/// A key's tool allow-list: glob patterns (`calendar__*`) over namespaced tool names,
/// compiled once when the key is read, so a `tools/list` of 10,000 tools tests each
/// name against one automaton instead of compiling every pattern per tool.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// `None` for an empty list (every tool admitted).
    set: Option<globset::GlobSet>,
}

impl AllowList {
    /// Compiles `patterns`; an empty slice admits every tool. A pattern that is not a
    /// valid glob admits nothing (they are validated when the key is made, by
    /// [`parse_allow_tools`]).
    pub fn new(patterns: &[String]) -> Self {
        if patterns.is_empty() {
            return Self::default();
        }
        let mut builder = globset::GlobSetBuilder::new();
        for glob in patterns.iter().filter_map(|p| globset::Glob::new(p).ok()) {
            builder.add(glob);
        }
        // Building only fails on an invalid glob, and those were left out; should it
        // fail anyway, the list admits nothing rather than everything.
        let set = builder
            .build()
            .unwrap_or_else(|_| globset::GlobSet::empty());
        Self { set: Some(set) }
    }

    /// True when the list is empty or a pattern matches the namespaced tool `name`.
    pub fn admits(&self, name: &str) -> bool {
        self.set.as_ref().is_none_or(|set| set.is_match(name))
    }
}

impl KeyContext {
    /// True when the key has `scope` or `admin`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }

    /// True when the key's allow-list admits the namespaced tool `name` (an empty list
    /// admits every tool).
    pub fn allows_tool(&self, name: &str) -> bool {
        self.allow_tools.admits(name)
    }
}

/// A key as listed (never the secret itself).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyRecord {
    /// The key's id.
    pub key_id: String,
    /// The first 12 characters (`mkt_` included).
    pub prefix: String,
    /// The owning account's name.
    pub account: String,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Tool globs (empty = all).
    pub allow_tools: Vec<String>,
    /// Spend limit per UTC day, micros.
    pub daily_limit_micros: Option<i64>,
    /// Spend limit per UTC month, micros.
    pub monthly_limit_micros: Option<i64>,
    /// Expiry, epoch ms.
    pub expires_at: Option<i64>,
    /// Revocation time, epoch ms.
    pub revoked_at: Option<i64>,
    /// Creation time, epoch ms.
    pub created_at: i64,
}

/// What `keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Scopes (at least one).
    pub scopes: Vec<Scope>,
    /// Tool globs (empty = all).
    pub allow_tools: Vec<String>,
    /// Spend limits `(micros, "day"|"month")`, at most one per period.
    pub spend_limits: Vec<(i64, String)>,
    /// Lifetime from now.
    pub expires_in: Option<std::time::Duration>,
}

/// Parses a comma-separated scope list (`invoke,catalog:read`).
///
/// # Errors
/// [`KeyError::InvalidScope`] or [`KeyError::NoScope`].
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, KeyError> {
    let mut scopes = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let scope: Scope = part.parse()?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(KeyError::NoScope);
    }
    Ok(scopes)
}

/// Parses a spend limit `AMOUNT/day` or `AMOUNT/month` into `(micros, period)`.
///
/// # Errors
/// [`KeyError::InvalidSpendLimit`].
pub fn parse_spend_limit(text: &str) -> Result<(i64, String), KeyError> {
    let bad = || KeyError::InvalidSpendLimit(text.to_owned());
    let (amount, period) = text.split_once('/').ok_or_else(bad)?;
    let period = match period.trim() {
        "day" | "d" => "day",
        "month" | "mo" => "month",
        _ => return Err(bad()),
    };
    let micros = crate::billing::pricing::parse_usd(
        amount.trim(),
        crate::billing::pricing::MAX_GRANT_MICROS,
    )
    .map_err(|_| bad())?;
    Ok((micros, period.to_owned()))
}

/// Parses allow-list globs, comma separated (`calendar__*,notes__get_note`).
///
/// # Errors
/// [`KeyError::InvalidPattern`].
pub fn parse_allow_tools(text: &str) -> Result<Vec<String>, KeyError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            globset::Glob::new(p)
                .map(|_| p.to_owned())
                .map_err(|_| KeyError::InvalidPattern(p.to_owned()))
        })
        .collect()
}

/// A fresh key: `mkt_` + 40 base62 characters from the OS random source.
pub fn generate_key() -> String {
    let mut out = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    out.push_str(KEY_PREFIX);
    let mut buf = [0u8; 64];
    while out.len() < KEY_PREFIX.len() + KEY_RANDOM_CHARS {
        getrandom::fill(&mut buf).expect("the OS random source is available");
        for b in buf {
            // Rejection sampling keeps every character equally likely.
            if b < 248 && out.len() < KEY_PREFIX.len() + KEY_RANDOM_CHARS {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// The stored hash of a key: lowercase hex SHA-256.
pub fn hash_key(key: &str) -> String {
    hex_lower(&Sha256::digest(key.as_bytes()))
}

pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn account_id_by_name(store: &Store, name: &str) -> Result<String, KeyError> {
    sqlx::query("SELECT id FROM accounts WHERE name = $1")
        .bind(name)
        .fetch_optional(store.pool())
        .await?
        .map(|r| r.try_get::<String, _>(0))
        .transpose()?
        .ok_or_else(|| KeyError::UnknownAccount(name.to_owned()))
}

/// Creates a key for the account `account_name`. Returns its record and the key itself,
/// which is shown this once and stored only hashed.
///
/// A key's spend limits are fixed here for its life: the ledger keeps a spend counter
/// only for the periods a key limits, from its first call (`billing::ledger`,
/// `count_key_spend`), so a way to change them must first create the new periods'
/// counters from the key's calls (as migration 0011 does).
///
/// # Errors
/// [`KeyError::UnknownAccount`], [`KeyError::NoScope`], [`KeyError::Store`].
pub async fn create_key(
    store: &Store,
    account_name: &str,
    new: &NewKey,
) -> Result<(KeyRecord, String), KeyError> {
    if new.scopes.is_empty() {
        return Err(KeyError::NoScope);
    }
    let (daily, monthly) = limits_by_period(&new.spend_limits)?;
    let account_id = account_id_by_name(store, account_name).await?;
    let key = generate_key();
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let expires_at = match new.expires_in {
        Some(d) => Some(
            i64::try_from(d.as_millis())
                .ok()
                .and_then(|ms| now.checked_add(ms))
                .ok_or_else(|| KeyError::InvalidExpiry(format!("{d:?}")))?,
        ),
        None => None,
    };
    let scopes = new
        .scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let allow = (!new.allow_tools.is_empty()).then(|| new.allow_tools.join(","));
    sqlx::query(
        "INSERT INTO api_keys (id, account_id, prefix, hash, scopes, allow_tools, daily_limit_micros, \
         monthly_limit_micros, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&id)
    .bind(&account_id)
    .bind(&key[..SHOWN_PREFIX_LEN])
    .bind(hash_key(&key))
    .bind(&scopes)
    .bind(allow)
    .bind(daily)
    .bind(monthly)
    .bind(expires_at)
    .bind(now)
    .execute(store.pool())
    .await?;
    let record = KeyRecord {
        key_id: id,
        prefix: key[..SHOWN_PREFIX_LEN].to_owned(),
        account: account_name.to_owned(),
        scopes: new.scopes.clone(),
        allow_tools: new.allow_tools.clone(),
        daily_limit_micros: daily,
        monthly_limit_micros: monthly,
        expires_at,
        revoked_at: None,
        created_at: now,
    };
    Ok((record, key))
}

/// Splits spend limits into `(daily, monthly)`.
///
/// # Errors
/// [`KeyError::InvalidSpendLimit`] for two limits of one period or another period.
fn limits_by_period(limits: &[(i64, String)]) -> Result<(Option<i64>, Option<i64>), KeyError> {
    let (mut daily, mut monthly) = (None, None);
    for (micros, period) in limits {
        let slot = match period.as_str() {
            "day" => &mut daily,
            "month" => &mut monthly,
            other => return Err(KeyError::InvalidSpendLimit(other.to_owned())),
        };
        if slot.replace(*micros).is_some() {
            return Err(KeyError::InvalidSpendLimit(format!(
                "two limits per {period} (give at most one per day and one per month)"
            )));
        }
    }
    Ok((daily, monthly))
}

/// The spend limits of a key from its stored columns.
fn stored_limits(daily: Option<i64>, monthly: Option<i64>) -> Vec<(i64, String)> {
    daily
        .map(|m| (m, "day".to_owned()))
        .into_iter()
        .chain(monthly.map(|m| (m, "month".to_owned())))
        .collect()
}

fn split_list(text: Option<String>) -> Vec<String> {
    text.map(|t| {
        t.split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

fn parse_stored_scopes(text: &str) -> Vec<Scope> {
    text.split(',').filter_map(|s| s.parse().ok()).collect()
}

/// Lists the keys of `account_name`, newest first (hashes never leave the store).
///
/// # Errors
/// [`KeyError::UnknownAccount`], [`KeyError::Store`].
pub async fn list_keys(store: &Store, account_name: &str) -> Result<Vec<KeyRecord>, KeyError> {
    let account_id = account_id_by_name(store, account_name).await?;
    let rows = sqlx::query(
        "SELECT id, prefix, scopes, allow_tools, daily_limit_micros, monthly_limit_micros, expires_at, \
         revoked_at, created_at FROM api_keys WHERE account_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(&account_id)
    .fetch_all(store.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(KeyRecord {
                key_id: r.try_get(0)?,
                prefix: r.try_get(1)?,
                account: account_name.to_owned(),
                scopes: parse_stored_scopes(&r.try_get::<String, _>(2)?),
                allow_tools: split_list(r.try_get(3)?),
                daily_limit_micros: r.try_get(4)?,
                monthly_limit_micros: r.try_get(5)?,
                expires_at: r.try_get(6)?,
                revoked_at: r.try_get(7)?,
                created_at: r.try_get(8)?,
            })
        })
        .collect()
}

/// The id of the live (not revoked) key whose id or shown prefix is `id_or_prefix`.
///
/// # Errors
/// [`KeyError::UnknownKey`], [`KeyError::AmbiguousKey`], [`KeyError::Store`].
pub async fn key_id_of(store: &Store, id_or_prefix: &str) -> Result<String, KeyError> {
    let rows = sqlx::query(
        "SELECT id FROM api_keys WHERE (id = $1 OR prefix = $1) AND revoked_at IS NULL",
    )
    .bind(id_or_prefix)
    .fetch_all(store.pool())
    .await?;
    match rows.as_slice() {
        [] => Err(KeyError::UnknownKey(id_or_prefix.to_owned())),
        [one] => Ok(one.try_get(0)?),
        _ => Err(KeyError::AmbiguousKey(id_or_prefix.to_owned())),
    }
}

/// Revokes the key whose id or shown prefix is `id_or_prefix`. Effective on the next
/// request of every session of this process using it (the auth generation moves, see
/// [`KeyCache`]), and within one second in every other marketplace process. Returns the
/// revoked key's id.
///
/// # Errors
/// [`KeyError::UnknownKey`], [`KeyError::AmbiguousKey`], [`KeyError::Store`].
pub async fn revoke_key(store: &Store, id_or_prefix: &str) -> Result<String, KeyError> {
    let id = key_id_of(store, id_or_prefix).await?;
    sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now_ms())
        .bind(&id)
        .execute(store.pool())
        .await?;
    store.versions().invalidate(Domain::Auth);
    Ok(id)
}

/// Authenticates a presented key: known hash, not revoked, not expired, reading the
/// store (no cache; the request path uses [`KeyCache::authenticate`]).
///
/// # Errors
/// [`KeyError::Unauthorized`] (one answer for every reason), [`KeyError::Store`].
pub async fn authenticate(store: &Store, presented: &str) -> Result<KeyContext, KeyError> {
    check_shape(presented)?;
    lookup(store, &hash_key(presented)).await
}

/// Refuses what cannot be a key before anything is hashed or read.
fn check_shape(presented: &str) -> Result<(), KeyError> {
    if !presented.starts_with(KEY_PREFIX)
        || presented.len() > MAX_KEY_LEN
        || !presented[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(KeyError::Unauthorized);
    }
    Ok(())
}

/// The key with hash `hash`: one query joining its account.
async fn lookup(store: &Store, hash: &str) -> Result<KeyContext, KeyError> {
    let row = sqlx::query(
        "SELECT k.id, k.account_id, a.name, k.scopes, k.allow_tools, k.daily_limit_micros, \
         k.monthly_limit_micros, k.expires_at FROM api_keys k JOIN accounts a ON a.id = k.account_id \
         WHERE k.hash = $1 AND k.revoked_at IS NULL",
    )
    .bind(hash)
    .fetch_optional(store.pool())
    .await?
    .ok_or(KeyError::Unauthorized)?;
    let expires_at: Option<i64> = row.try_get(7)?;
    if expires_at.is_some_and(|t| t <= now_ms()) {
        return Err(KeyError::Unauthorized);
    }
    let daily: Option<i64> = row.try_get(5)?;
    let monthly: Option<i64> = row.try_get(6)?;
    Ok(KeyContext {
        key_id: row.try_get(0)?,
        account_id: row.try_get(1)?,
        account_name: row.try_get(2)?,
        scopes: parse_stored_scopes(&row.try_get::<String, _>(3)?),
        allow_tools: AllowList::new(&split_list(row.try_get(4)?)),
        spend_limits: stored_limits(daily, monthly),
        expires_at,
    })
}

/// Most keys a [`KeyCache`] holds; past it the cache starts afresh, so its memory is
/// bounded whatever the number of keys in use (about 300 bytes per key).
pub const KEY_CACHE_CAPACITY: usize = 100_000;

/// Authenticated keys served from memory, so a request costs no query for its key
/// (issue 7 item 2). Keyed by the key's SHA-256 hash; only keys that authenticated are
/// kept, so a flood of wrong keys neither fills it nor is answered from it.
///
/// An entry is used only while the auth generation it was read at is current
/// ([`crate::store::versions`]): a revocation or any other change to `api_keys`,
/// `accounts`, `trust_policies`, `server_credentials` or `account_plans` made through
/// this process takes effect on its next request; one written by another process (the
/// CLI, another replica) within one second. An expiry time that passes is checked on
/// every request.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: DashMap<String, (u64, KeyContext)>,
}

impl KeyCache {
    /// As [`authenticate`], from memory when the key was read at the current auth
    /// generation.
    ///
    /// # Errors
    /// [`KeyError::Unauthorized`] (one answer for every reason), [`KeyError::Store`].
    pub async fn authenticate(
        &self,
        store: &Store,
        presented: &str,
    ) -> Result<KeyContext, KeyError> {
        check_shape(presented)?;
        let hash = hash_key(presented);
        // Read before the lookup: a change committed meanwhile moves the generation past
        // the one the entry is stored with, so the entry is never used.
        let generation = store.versions().generation(Domain::Auth);
        if let Some(entry) = self.entries.get(&hash) {
            let (at, key) = entry.value();
            if *at == generation {
                if key.expires_at.is_some_and(|t| t <= now_ms()) {
                    return Err(KeyError::Unauthorized);
                }
                return Ok(key.clone());
            }
        }
        match lookup(store, &hash).await {
            Ok(key) => {
                if self.entries.len() >= KEY_CACHE_CAPACITY {
                    self.entries.clear();
                }
                self.entries.insert(hash, (generation, key.clone()));
                Ok(key)
            }
            Err(e) => {
                self.entries.remove(&hash);
                Err(e)
            }
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Extracts the presented key from `Authorization: Bearer …` or `X-API-Key`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = v.trim().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = generate_key();
        assert!(k.starts_with("mkt_"));
        assert_eq!(k.len(), 44);
        assert!(k[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(generate_key(), k);
    }

    #[test]
    fn parses_scopes_limits_and_globs() {
        assert_eq!(
            parse_scopes("invoke,catalog:read").unwrap(),
            vec![Scope::Invoke, Scope::CatalogRead]
        );
        assert!(parse_scopes("invoke,root").is_err());
        assert!(parse_scopes("").is_err());
        assert_eq!(
            parse_spend_limit("5.00/day").unwrap(),
            (5_000_000, "day".to_owned())
        );
        assert!(parse_spend_limit("-5/day").is_err());
        assert!(parse_spend_limit("5/week").is_err());
        let ctx = KeyContext {
            key_id: String::new(),
            account_id: String::new(),
            account_name: String::new(),
            scopes: vec![Scope::Invoke],
            allow_tools: AllowList::new(&parse_allow_tools("calendar__*,notes__get_*").unwrap()),
            spend_limits: Vec::new(),
            expires_at: None,
        };
        assert!(ctx.allows_tool("calendar__create_event"));
        assert!(!ctx.allows_tool("notes__add_note"));
        assert!(ctx.allows_tool("notes__get_note"));
        assert!(AllowList::default().admits("anything__at_all"));
    }
}
