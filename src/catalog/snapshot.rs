//! The in-memory catalog snapshot the call path and `tools/list` read (issue 7 item 2):
//! every server (endpoints, status, timeout, prices), its visible (pinned) tools, and
//! every account's installs with their tool choices, loaded from the database in one
//! transaction (seven queries, whatever the catalog's size).
//!
//! Freshness ([`crate::store::versions`]): a snapshot remembers the catalog generation
//! it was built at and is rebuilt on the first read after the generation moved. Every
//! catalog write of this process invalidates the generation after its commit, so it
//! takes effect on the very next request; a write by another process (the CLI on the
//! same database, another replica) bumps `snapshot_versions.catalog` by trigger and is
//! seen within one second. Scheduled price changes are applied to the database by the
//! first read after they fall due ([`Catalog::snapshot`]), so a call always reserves the
//! price in effect at the time of the call.
//!
//! Reads that need fresh data for a write (registration, creator self-service, admin
//! commands) stay on the database ([`Catalog::get`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};

use rmcp::model::Tool;
use serde_json::{Value, json};
use sqlx::Row;

use super::{Catalog, CatalogError, CatalogTool, Server, catalog_tool};
use crate::store::{Backend, Domain, Store, StoreError, now_ms};

/// `_meta` key of a listed tool's price (DESIGN.md "The marketplace's own MCP tools").
pub const PRICE_META_KEY: &str = "mcp-marketplace/price";

/// The `_meta` price object of `micros` per call.
pub fn price_meta(micros: i64) -> Value {
    json!({"micros": micros, "per": "call", "currency": "USD"})
}

/// Turns a cached upstream definition into the listed tool named `name`, with its
/// price (micros) in `_meta["mcp-marketplace/price"]`. `None` if the definition is not
/// a valid MCP tool.
pub fn listed_tool(definition: &Value, name: &str, price_micros: i64) -> Option<Tool> {
    let mut def = definition.clone();
    let obj = def.as_object_mut()?;
    obj.insert("name".into(), Value::String(name.to_owned()));
    let meta = obj.entry("_meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut()?
        .insert(PRICE_META_KEY.into(), price_meta(price_micros));
    serde_json::from_value(def).ok()
}

/// One server of a [`Snapshot`].
#[derive(Debug)]
struct Entry {
    server: Arc<Server>,
    /// Visible (pinned) tools in upstream order.
    tools: Vec<Arc<CatalogTool>>,
    /// Upstream tool name → index in `tools`.
    by_name: HashMap<String, usize>,
    /// Earliest effective time of a price change not applied yet (epoch ms).
    next_price_change_at: Option<i64>,
    /// The listed tools, namespaced, with the prices a non-owner pays, aligned with
    /// `tools` (`None`: not a valid MCP tool); built on first use.
    listed_namespaced: OnceLock<Vec<Option<Tool>>>,
    /// The same, unprefixed (`/servers/{slug}/mcp`).
    listed_plain: OnceLock<Vec<Option<Tool>>>,
}

impl Entry {
    fn build_listed(&self, t: &CatalogTool, namespaced: bool, free: bool) -> Option<Tool> {
        let name = if namespaced {
            &t.namespaced_name
        } else {
            &t.name
        };
        let price = if free {
            0
        } else {
            self.server.price_of(&t.name)
        };
        listed_tool(&t.definition, name, price)
    }

    /// Appends the listed tools of this server as `account_id` sees them (its owner
    /// pays nothing), namespaced or not, for which `include` holds.
    fn listed_into(
        &self,
        out: &mut Vec<Tool>,
        account_id: &str,
        namespaced: bool,
        include: &dyn Fn(&CatalogTool) -> bool,
    ) {
        if self.server.owner_account_id == account_id {
            out.extend(
                self.tools
                    .iter()
                    .filter(|t| include(t))
                    .filter_map(|t| self.build_listed(t, namespaced, true)),
            );
            return;
        }
        let cell = if namespaced {
            &self.listed_namespaced
        } else {
            &self.listed_plain
        };
        let listed = cell.get_or_init(|| {
            self.tools
                .iter()
                .map(|t| self.build_listed(t, namespaced, false))
                .collect()
        });
        out.extend(
            listed
                .iter()
                .zip(self.tools.iter())
                .filter(|(_, t)| include(t))
                .filter_map(|(l, _)| l.clone()),
        );
    }
}

/// One install of an account.
#[derive(Debug)]
struct Install {
    server_id: String,
    /// The tools the account chose to see; `None`: all of them.
    tools: Option<HashSet<String>>,
}

/// An immutable picture of the catalog at one generation; see the module docs.
#[derive(Debug)]
pub struct Snapshot {
    generation: u64,
    servers: HashMap<String, Entry>,
    /// Slug → server id.
    by_slug: HashMap<String, String>,
    /// `{slug}__{tool}` → (server id, index of the tool).
    by_namespaced: HashMap<String, (String, usize)>,
    /// Account id → installs, by slug.
    installs: HashMap<String, Vec<Install>>,
    /// The earliest `next_price_change_at` of any server (epoch ms).
    next_price_change_at: Option<i64>,
}

impl Snapshot {
    /// The catalog generation this snapshot was built at.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The server with `slug` (any status).
    pub fn server(&self, slug: &str) -> Option<Arc<Server>> {
        let id = self.by_slug.get(slug)?;
        self.servers.get(id).map(|e| e.server.clone())
    }

    /// Every server (any status), by slug.
    pub fn servers(&self) -> Vec<Server> {
        let mut out: Vec<Server> = self.servers.values().map(|e| (*e.server).clone()).collect();
        out.sort_by(|a, b| a.slug.cmp(&b.slug));
        out
    }

    /// The server with `id` (any status).
    pub fn server_by_id(&self, id: &str) -> Option<Arc<Server>> {
        self.servers.get(id).map(|e| e.server.clone())
    }

    fn installed(&self, account_id: &str, server_id: &str) -> bool {
        self.installs
            .get(account_id)
            .is_some_and(|v| v.iter().any(|i| i.server_id == server_id))
    }

    /// The slugs `account_id` installed, sorted.
    pub fn installed_slugs(&self, account_id: &str) -> Vec<String> {
        self.installs
            .get(account_id)
            .map(|v| {
                v.iter()
                    .filter_map(|i| self.servers.get(&i.server_id))
                    .map(|e| e.server.slug.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn namespaced(&self, namespaced: &str) -> Option<(&Entry, &Arc<CatalogTool>)> {
        let (id, idx) = self.by_namespaced.get(namespaced)?;
        let entry = self.servers.get(id)?;
        Some((entry, entry.tools.get(*idx)?))
    }

    /// A visible tool `{slug}__{tool}` of a server `account_id` installed (any status:
    /// the caller checks it).
    pub fn resolve(
        &self,
        account_id: &str,
        namespaced: &str,
    ) -> Option<(Arc<Server>, Arc<CatalogTool>)> {
        let (entry, tool) = self.namespaced(namespaced)?;
        self.installed(account_id, &entry.server.id)
            .then(|| (entry.server.clone(), tool.clone()))
    }

    /// A visible tool `{slug}__{tool}` of a server that is listed or that `account_id`
    /// installed (any status), for `marketplace__call_tool`.
    pub fn resolve_any(
        &self,
        account_id: &str,
        namespaced: &str,
    ) -> Option<(Arc<Server>, Arc<CatalogTool>)> {
        let (entry, tool) = self.namespaced(namespaced)?;
        (entry.server.listed || self.installed(account_id, &entry.server.id))
            .then(|| (entry.server.clone(), tool.clone()))
    }

    /// The visible upstream tool `name` of `server_id`.
    pub fn tool_of_server(&self, server_id: &str, name: &str) -> Option<Arc<CatalogTool>> {
        let entry = self.servers.get(server_id)?;
        entry.by_name.get(name).map(|i| entry.tools[*i].clone())
    }

    /// The visible tools of `server_id`, in upstream order.
    pub fn tools_of_server(&self, server_id: &str) -> Vec<Arc<CatalogTool>> {
        self.servers
            .get(server_id)
            .map(|e| e.tools.clone())
            .unwrap_or_default()
    }

    /// Appends to `out` the upstream tools `account_id` lists on `/mcp`: those of its
    /// installed, callable servers (only the ones it chose at install time, when it
    /// chose) for which `include(namespaced name)` holds, by slug then upstream order,
    /// each with its price in `_meta`. Cloned from tool lists built once per snapshot;
    /// `out` grows once.
    pub fn account_tools_into(
        &self,
        out: &mut Vec<Tool>,
        account_id: &str,
        include: &dyn Fn(&str) -> bool,
    ) {
        let Some(installs) = self.installs.get(account_id) else {
            return;
        };
        out.reserve(
            installs
                .iter()
                .filter_map(|i| self.servers.get(&i.server_id))
                .map(|e| e.tools.len())
                .sum(),
        );
        for install in installs {
            let Some(entry) = self.servers.get(&install.server_id) else {
                continue;
            };
            if !entry.server.status.is_callable() {
                continue;
            }
            let chosen = install.tools.as_ref();
            entry.listed_into(out, account_id, true, &|t: &CatalogTool| {
                chosen.is_none_or(|c| c.contains(&t.name)) && include(&t.namespaced_name)
            });
        }
    }

    /// The tools of the callable server `slug` as `account_id` lists them on
    /// `/servers/{slug}/mcp` (unprefixed) for which `include(namespaced name)` holds;
    /// empty for an unknown or uncallable server.
    pub fn server_tools(
        &self,
        slug: &str,
        account_id: &str,
        include: &dyn Fn(&str) -> bool,
    ) -> Vec<Tool> {
        let Some(entry) = self.by_slug.get(slug).and_then(|id| self.servers.get(id)) else {
            return Vec::new();
        };
        if !entry.server.status.is_callable() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(entry.tools.len());
        entry.listed_into(&mut out, account_id, false, &|t: &CatalogTool| {
            include(&t.namespaced_name)
        });
        out
    }

    /// Ids of servers with a price change due at `now` (epoch ms).
    fn due_servers(&self, now: i64) -> Vec<String> {
        if self.next_price_change_at.is_none_or(|t| t > now) {
            return Vec::new();
        }
        self.servers
            .values()
            .filter(|e| e.next_price_change_at.is_some_and(|t| t <= now))
            .map(|e| e.server.id.clone())
            .collect()
    }

    /// Loads the whole catalog in one transaction (a consistent picture on both
    /// backends) at `generation`.
    async fn load(store: &Store, generation: u64) -> Result<Self, CatalogError> {
        let mut tx = store.begin().await?;
        if store.backend() == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let server_rows = sqlx::query(select_servers!("")).fetch_all(&mut *tx).await?;
        let mut endpoints: HashMap<String, Vec<String>> = HashMap::new();
        for r in
            sqlx::query("SELECT server_id, url FROM server_endpoints ORDER BY server_id, position")
                .fetch_all(&mut *tx)
                .await?
        {
            endpoints
                .entry(r.try_get(0)?)
                .or_default()
                .push(r.try_get(1)?);
        }
        let mut tool_prices: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
        for r in sqlx::query("SELECT server_id, tool, price_micros FROM tool_prices")
            .fetch_all(&mut *tx)
            .await?
        {
            tool_prices
                .entry(r.try_get(0)?)
                .or_default()
                .insert(r.try_get(1)?, r.try_get(2)?);
        }
        let mut tools: HashMap<String, Vec<Arc<CatalogTool>>> = HashMap::new();
        for r in sqlx::query(select_visible_tools!("ORDER BY t.server_id, t.position"))
            .fetch_all(&mut *tx)
            .await?
        {
            let t = catalog_tool(r)?;
            tools
                .entry(t.server_id.clone())
                .or_default()
                .push(Arc::new(t));
        }
        let mut chosen: HashMap<(String, String), HashSet<String>> = HashMap::new();
        for r in sqlx::query("SELECT account_id, server_id, tool FROM install_tools")
            .fetch_all(&mut *tx)
            .await?
        {
            chosen
                .entry((r.try_get(0)?, r.try_get(1)?))
                .or_default()
                .insert(r.try_get(2)?);
        }
        let install_rows = sqlx::query("SELECT account_id, server_id FROM installs")
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await.map_err(StoreError::from)?;

        let mut servers = HashMap::with_capacity(server_rows.len());
        let mut by_slug = HashMap::with_capacity(server_rows.len());
        let mut by_namespaced = HashMap::new();
        let mut earliest: Option<i64> = None;
        for row in server_rows {
            let id: String = row.try_get(0)?;
            let next: Option<i64> = row.try_get(11)?;
            let server = super::server_from_row(
                &row,
                endpoints.remove(&id).unwrap_or_default(),
                tool_prices.remove(&id).unwrap_or_default(),
            )?;
            let tools = tools.remove(&id).unwrap_or_default();
            let mut by_name = HashMap::with_capacity(tools.len());
            for (i, t) in tools.iter().enumerate() {
                by_name.insert(t.name.clone(), i);
                by_namespaced.insert(t.namespaced_name.clone(), (id.clone(), i));
            }
            if let Some(t) = next {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
            }
            by_slug.insert(server.slug.clone(), id.clone());
            servers.insert(
                id,
                Entry {
                    server: Arc::new(server),
                    tools,
                    by_name,
                    next_price_change_at: next,
                    listed_namespaced: OnceLock::new(),
                    listed_plain: OnceLock::new(),
                },
            );
        }
        let mut installs: HashMap<String, Vec<Install>> = HashMap::new();
        for r in install_rows {
            let account_id: String = r.try_get(0)?;
            let server_id: String = r.try_get(1)?;
            if !servers.contains_key(&server_id) {
                continue;
            }
            let tools = chosen.remove(&(account_id.clone(), server_id.clone()));
            installs
                .entry(account_id)
                .or_default()
                .push(Install { server_id, tools });
        }
        for list in installs.values_mut() {
            list.sort_by(|a, b| {
                let slug = |i: &Install| servers.get(&i.server_id).map(|e| e.server.slug.clone());
                slug(a).cmp(&slug(b))
            });
        }
        Ok(Self {
            generation,
            servers,
            by_slug,
            by_namespaced,
            installs,
            next_price_change_at: earliest,
        })
    }
}

/// The current snapshot of one [`Catalog`] and the lock that lets one task at a time
/// rebuild it.
#[derive(Debug, Default)]
pub(super) struct SnapshotCell {
    current: RwLock<Option<Arc<Snapshot>>>,
    build: tokio::sync::Mutex<()>,
}

impl SnapshotCell {
    fn fresh(&self, generation: u64) -> Option<Arc<Snapshot>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|s| s.generation == generation)
            .cloned()
    }
}

impl Catalog {
    /// Records that this process changed the catalog (call after the commit): the next
    /// read of the snapshot rebuilds it.
    pub fn changed(&self) {
        self.store.versions().invalidate(Domain::Catalog);
    }

    /// The current catalog snapshot: the cached one while the catalog generation has
    /// not moved, else a rebuilt one. Price changes that fell due are applied to the
    /// database first, so the snapshot's prices are the ones in effect now.
    ///
    /// # Errors
    /// [`CatalogError::Store`] when the database fails.
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, CatalogError> {
        let snap = self.current_snapshot().await?;
        let due = snap.due_servers(now_ms());
        if due.is_empty() {
            return Ok(snap);
        }
        for id in &due {
            self.apply_due_prices(id).await?;
        }
        // Rebuild from the database (even when another process applied them first),
        // unless a concurrent reader already moved the generation past this snapshot.
        if self.store.versions().generation(Domain::Catalog) == snap.generation {
            self.changed();
        }
        self.current_snapshot().await
    }

    async fn current_snapshot(&self) -> Result<Arc<Snapshot>, CatalogError> {
        let versions = self.store.versions();
        if let Some(s) = self.snapshot.fresh(versions.generation(Domain::Catalog)) {
            return Ok(s);
        }
        let _build = self.snapshot.build.lock().await;
        // Read before loading: a write committed during the load moves the generation
        // past it, and the next read rebuilds.
        let generation = versions.generation(Domain::Catalog);
        if let Some(s) = self.snapshot.fresh(generation) {
            return Ok(s);
        }
        let snap = Arc::new(Snapshot::load(&self.store, generation).await?);
        *self
            .snapshot
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
        Ok(snap)
    }

    /// The server with `slug` from the snapshot (any status); `None` when unknown.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn cached(&self, slug: &str) -> Result<Option<Arc<Server>>, CatalogError> {
        Ok(self.snapshot().await?.server(slug))
    }

    /// Resolves a namespaced tool for `account_id` from the snapshot: the server must be
    /// installed (its status is the caller's to check). `None` when unknown or not
    /// installed.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn resolve(
        &self,
        account_id: &str,
        namespaced: &str,
    ) -> Result<Option<(Arc<Server>, Arc<CatalogTool>)>, CatalogError> {
        Ok(self.snapshot().await?.resolve(account_id, namespaced))
    }

    /// Resolves a namespaced tool of any server for `account_id` without an install
    /// (`marketplace__call_tool`) from the snapshot: the tool must be visible (pinned)
    /// and the server listed or installed by the account (its status is the caller's
    /// to check).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn resolve_any(
        &self,
        account_id: &str,
        namespaced: &str,
    ) -> Result<Option<(Arc<Server>, Arc<CatalogTool>)>, CatalogError> {
        Ok(self.snapshot().await?.resolve_any(account_id, namespaced))
    }

    /// Resolves the upstream tool `name` of the server `slug` (`/servers/{slug}/mcp`)
    /// from the snapshot; any status (the caller checks it).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn resolve_on_server(
        &self,
        slug: &str,
        name: &str,
    ) -> Result<Option<(Arc<Server>, Arc<CatalogTool>)>, CatalogError> {
        let snap = self.snapshot().await?;
        let Some(server) = snap.server(slug) else {
            return Ok(None);
        };
        Ok(snap.tool_of_server(&server.id, name).map(|t| (server, t)))
    }

    /// The visible upstream tool `name` of `server_id`, from the snapshot.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn tool_of_server(
        &self,
        server_id: &str,
        name: &str,
    ) -> Result<Option<Arc<CatalogTool>>, CatalogError> {
        Ok(self.snapshot().await?.tool_of_server(server_id, name))
    }

    /// The visible (pinned) tools of one server, in upstream order, from the snapshot.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn tools_of_server(
        &self,
        server_id: &str,
    ) -> Result<Vec<Arc<CatalogTool>>, CatalogError> {
        Ok(self.snapshot().await?.tools_of_server(server_id))
    }

    /// The slugs `account_id` has installed, sorted, from the snapshot.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn installed_slugs(&self, account_id: &str) -> Result<Vec<String>, CatalogError> {
        Ok(self.snapshot().await?.installed_slugs(account_id))
    }
}
