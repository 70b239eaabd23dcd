//! Creator self-service on the catalog: editing a listing, price changes with an
//! effective time, unlisting, per-install tool choice, verification reports and probe
//! history, and analytics. The REST API and the CLI check ownership before calling
//! these (`api::owned_server`).
//!
//! Prices: every change is a row of `price_changes` with the time it takes effect.
//! A change effective now is applied at once; a later one is applied by the first read
//! of the server at or after its time (`servers.next_price_change_at` makes that check
//! free). A call copies the price in effect when it is reserved into its `calls` row,
//! and settles that amount, so a price change never alters a call already reserved.

use std::collections::{BTreeMap, HashMap};

use sqlx::Row;

use super::{
    Catalog, CatalogError, Server, parse_tool_price, search, validate_categories,
    validate_description, validate_endpoints, validate_name,
};
use crate::billing::pricing;
use crate::security::EndpointPolicy;
use crate::store::{StoreError, Tx, now_ms};

/// Longest analytics window (days).
pub const MAX_ANALYTICS_DAYS: i64 = 90;
/// Most probe results listed at once.
pub const MAX_PROBES_LISTED: i64 = 200;
const DAY_MS: i64 = 86_400_000;

/// Fields of a listing a creator may change; `None` leaves one as it is.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerUpdate {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Categories (replaces the list).
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// Endpoint URLs (replaces the list; SSRF-checked).
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    /// Per-call timeout, ms (1 ms – 300 s).
    #[serde(default)]
    pub timeout_ms: Option<i64>,
}

/// A price change: a new default price and/or per-tool overrides (`None` removes a
/// tool's override), effective at `effective_at` (epoch ms; `None` or past: now).
#[derive(Debug, Clone, Default)]
pub struct PriceChange {
    /// `free` or `<decimal>_per_request`.
    pub pricing: Option<String>,
    /// Tool → `0.05` / `free` / `None` (remove the override).
    pub tool_prices: BTreeMap<String, Option<String>>,
    /// When it takes effect, epoch ms.
    pub effective_at: Option<i64>,
}

/// One recorded price change.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PriceRecord {
    /// `None` for the server's default price, else the tool.
    pub tool: Option<String>,
    /// The price, micros; `None`: the tool's override was removed.
    pub price_micros: Option<i64>,
    /// When it takes (took) effect, epoch ms.
    pub effective_at: i64,
    /// When it was made, epoch ms.
    pub created_at: i64,
    /// When it was applied, epoch ms (`None`: scheduled).
    pub applied_at: Option<i64>,
}

/// The check a `registration` verification does not require: the creator's server
/// cannot know its `X-MCP-Marketplace-Secret` before the registration's answer.
pub const SECRET_CHECK: &str = "secret_required";

/// Whether check `name` counts for a verification of `kind` (`registration` does not
/// count [`SECRET_CHECK`]).
pub fn counts(kind: &str, name: &str) -> bool {
    !(kind == "registration" && name == SECRET_CHECK)
}

/// Whether a stored probe row (`kind`, its `checks` JSON array) passed: every check
/// that [`counts`] passed.
pub fn stored_passed(kind: &str, checks: &serde_json::Value) -> bool {
    checks.as_array().is_some_and(|cs| {
        !cs.is_empty()
            && cs.iter().all(|c| {
                c.get("ok") == Some(&serde_json::Value::Bool(true))
                    || !counts(kind, c.get("name").and_then(|n| n.as_str()).unwrap_or(""))
            })
    })
}

/// One stored probe run (`probe_results`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeRecord {
    /// UUIDv7.
    pub id: String,
    /// `registration`, `scheduled` or `manual`.
    pub kind: String,
    /// The endpoint's position, if endpoint-specific.
    pub endpoint_position: Option<i64>,
    /// Epoch ms.
    pub started_at: i64,
    /// ms.
    pub duration_ms: i64,
    /// ms; `None` when unreachable.
    pub latency_ms: Option<i64>,
    /// `A`–`F`.
    pub grade: String,
    /// Every check passed.
    pub ok: bool,
    /// Passed as a verification ([`stored_passed`]: a registration does not need the
    /// secret check).
    pub passed: bool,
    /// `[{"name", "ok", "detail", "duration_ms"}]`.
    pub checks: serde_json::Value,
}

/// Call statistics of one bucket (a day, a tool, the whole window).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CallStats {
    /// Finished and in-flight calls.
    pub calls: i64,
    /// Settled calls.
    pub settled: i64,
    /// Refunded calls.
    pub failed: i64,
    /// Refunded / finished (0 when none finished).
    pub error_rate: f64,
    /// The creator's share of settled calls, micros.
    pub earnings_micros: i64,
    /// Median latency, ms (nearest rank).
    pub p50_latency_ms: Option<i64>,
    /// 95th percentile latency, ms (nearest rank).
    pub p95_latency_ms: Option<i64>,
}

/// A server's analytics over a window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Analytics {
    /// The slug.
    pub slug: String,
    /// Window start, epoch ms.
    pub from_ms: i64,
    /// Window end, epoch ms.
    pub to_ms: i64,
    /// The whole window.
    pub total: CallStats,
    /// Per UTC day (`YYYY-MM-DD`), oldest first.
    pub per_day: Vec<(String, CallStats)>,
    /// Per tool, most called first (the top tools).
    pub per_tool: Vec<(String, CallStats)>,
}

#[derive(Default)]
struct Acc {
    calls: i64,
    settled: i64,
    failed: i64,
    earnings: i64,
    latencies: Vec<i64>,
}

impl Acc {
    fn add(&mut self, status: &str, earnings: i64, latency: Option<i64>) {
        self.calls += 1;
        match status {
            "settled" => {
                self.settled += 1;
                self.earnings += earnings;
            }
            "refunded" => self.failed += 1,
            _ => {}
        }
        if let Some(l) = latency {
            self.latencies.push(l);
        }
    }

    fn stats(mut self) -> CallStats {
        self.latencies.sort_unstable();
        let pct = |p: f64| -> Option<i64> {
            let n = self.latencies.len();
            (n > 0).then(|| {
                let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
                self.latencies[rank - 1]
            })
        };
        let finished = self.settled + self.failed;
        CallStats {
            calls: self.calls,
            settled: self.settled,
            failed: self.failed,
            error_rate: if finished > 0 {
                self.failed as f64 / finished as f64
            } else {
                0.0
            },
            earnings_micros: self.earnings,
            p50_latency_ms: pct(0.50),
            p95_latency_ms: pct(0.95),
        }
    }
}

/// Records prices applied at `now` in the price history (registration, sync).
///
/// # Errors
/// [`CatalogError::Store`].
pub(crate) async fn record_applied_prices(
    tx: &mut Tx<'_>,
    server_id: &str,
    price_micros: i64,
    tool_prices: &BTreeMap<String, i64>,
    now: i64,
) -> Result<(), CatalogError> {
    let rows = std::iter::once(("", Some(price_micros)))
        .chain(tool_prices.iter().map(|(t, p)| (t.as_str(), Some(*p))));
    for (tool, price) in rows {
        insert_change(tx, server_id, tool, price, now, now, Some(now)).await?;
    }
    Ok(())
}

async fn insert_change(
    tx: &mut Tx<'_>,
    server_id: &str,
    tool: &str,
    price: Option<i64>,
    effective_at: i64,
    now: i64,
    applied_at: Option<i64>,
) -> Result<(), CatalogError> {
    sqlx::query(
        "INSERT INTO price_changes (id, server_id, tool, price_micros, effective_at, created_at, applied_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(server_id)
    .bind(tool)
    .bind(price)
    .bind(effective_at)
    .bind(now)
    .bind(applied_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Applies one price to the live tables.
async fn apply_price(
    tx: &mut Tx<'_>,
    server_id: &str,
    tool: &str,
    price: Option<i64>,
) -> Result<(), CatalogError> {
    match (tool, price) {
        ("", Some(p)) => {
            sqlx::query("UPDATE servers SET price_micros = $1 WHERE id = $2")
                .bind(p)
                .bind(server_id)
                .execute(&mut **tx)
                .await?;
        }
        ("", None) => {}
        (tool, Some(p)) => {
            sqlx::query(
                "INSERT INTO tool_prices (server_id, tool, price_micros) VALUES ($1, $2, $3) \
                 ON CONFLICT (server_id, tool) DO UPDATE SET price_micros = EXCLUDED.price_micros",
            )
            .bind(server_id)
            .bind(tool)
            .bind(p)
            .execute(&mut **tx)
            .await?;
        }
        (tool, None) => {
            sqlx::query("DELETE FROM tool_prices WHERE server_id = $1 AND tool = $2")
                .bind(server_id)
                .bind(tool)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

async fn set_next_change(tx: &mut Tx<'_>, server_id: &str) -> Result<(), CatalogError> {
    sqlx::query(
        "UPDATE servers SET next_price_change_at = \
         (SELECT MIN(effective_at) FROM price_changes WHERE server_id = $1 AND applied_at IS NULL) \
         WHERE id = $1",
    )
    .bind(server_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Catalog {
    /// Changes the listing of `server`: only the given fields, each validated as at
    /// registration; nothing is written when one is refused. Returns the server as now.
    ///
    /// # Errors
    /// [`CatalogError::InvalidField`], [`CatalogError::Endpoint`],
    /// [`CatalogError::InvalidTimeout`], [`CatalogError::Store`].
    pub async fn update(
        &self,
        server: &Server,
        update: &ServerUpdate,
        policy: &EndpointPolicy,
    ) -> Result<Server, CatalogError> {
        let name = update.name.as_deref().map(validate_name).transpose()?;
        if let Some(d) = &update.description {
            validate_description(d)?;
        }
        let categories = update
            .categories
            .as_deref()
            .map(validate_categories)
            .transpose()?;
        let endpoints = match &update.endpoints {
            Some(e) => Some(validate_endpoints(e, policy).await?),
            None => None,
        };
        if update
            .timeout_ms
            .is_some_and(|t| !(1..=super::MAX_TIMEOUT_MS).contains(&t))
        {
            return Err(CatalogError::InvalidTimeout);
        }
        let mut tx = self.store.begin().await?;
        sqlx::query(
            "UPDATE servers SET name = $1, description = $2, categories = $3, timeout_ms = $4, updated_at = $5 \
             WHERE id = $6",
        )
        .bind(name.unwrap_or(&server.name))
        .bind(update.description.as_deref().unwrap_or(&server.description))
        .bind(categories.unwrap_or_else(|| server.categories.clone()).join(","))
        .bind(update.timeout_ms.unwrap_or(server.timeout_ms))
        .bind(now_ms())
        .bind(&server.id)
        .execute(&mut *tx)
        .await?;
        if let Some(endpoints) = &endpoints {
            sqlx::query("DELETE FROM server_endpoints WHERE server_id = $1")
                .bind(&server.id)
                .execute(&mut *tx)
                .await?;
            for (i, url) in endpoints.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO server_endpoints (server_id, position, url) VALUES ($1, $2, $3)",
                )
                .bind(&server.id)
                .bind(i as i64)
                .bind(url)
                .execute(&mut *tx)
                .await?;
            }
        }
        search::reindex(&mut tx, self.store.backend(), &server.id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.changed();
        self.get_by_id(&server.id).await
    }

    /// Records a price change of `server` with its effective time (module docs);
    /// applies it at once when effective now. Returns the recorded rows.
    ///
    /// # Errors
    /// [`CatalogError::Price`], [`CatalogError::InvalidField`] (nothing to change, a bad
    /// tool name), [`CatalogError::Store`].
    pub async fn change_prices(
        &self,
        server: &Server,
        change: &PriceChange,
    ) -> Result<Vec<PriceRecord>, CatalogError> {
        let mut rows: Vec<(String, Option<i64>)> = Vec::new();
        if let Some(p) = &change.pricing {
            rows.push((String::new(), Some(pricing::parse_pricing(p)?)));
        }
        for (tool, price) in &change.tool_prices {
            let micros = match price {
                Some(p) => Some(parse_tool_price(tool, p)?),
                None => {
                    parse_tool_price(tool, "free")?;
                    None
                }
            };
            rows.push((tool.clone(), micros));
        }
        if rows.is_empty() {
            return Err(CatalogError::InvalidField(
                "pricing: give a new price or tool prices",
            ));
        }
        let now = now_ms();
        let effective_at = change.effective_at.unwrap_or(now).max(now);
        let applied = (effective_at <= now).then_some(now);
        let mut tx = self.store.begin().await?;
        for (tool, price) in &rows {
            insert_change(
                &mut tx,
                &server.id,
                tool,
                *price,
                effective_at,
                now,
                applied,
            )
            .await?;
            if applied.is_some() {
                apply_price(&mut tx, &server.id, tool, *price).await?;
            }
        }
        set_next_change(&mut tx, &server.id).await?;
        sqlx::query("UPDATE servers SET updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&server.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.changed();
        Ok(rows
            .into_iter()
            .map(|(tool, price_micros)| PriceRecord {
                tool: (!tool.is_empty()).then_some(tool),
                price_micros,
                effective_at,
                created_at: now,
                applied_at: applied,
            })
            .collect())
    }

    /// Applies the price changes of `server_id` whose time has come, oldest first.
    /// Returns how many were applied.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn apply_due_prices(&self, server_id: &str) -> Result<usize, CatalogError> {
        let now = now_ms();
        let mut tx = self.store.begin().await?;
        let due: Vec<(String, String, Option<i64>)> = sqlx::query(
            "SELECT id, tool, price_micros FROM price_changes \
             WHERE server_id = $1 AND applied_at IS NULL AND effective_at <= $2 \
             ORDER BY effective_at, created_at, id",
        )
        .bind(server_id)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()?;
        for (id, tool, price) in &due {
            apply_price(&mut tx, server_id, tool, *price).await?;
            sqlx::query("UPDATE price_changes SET applied_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        set_next_change(&mut tx, server_id).await?;
        tx.commit().await.map_err(StoreError::from)?;
        if !due.is_empty() {
            self.changed();
        }
        Ok(due.len())
    }

    /// The price history of `server_id`, newest first (scheduled changes included).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn price_history(&self, server_id: &str) -> Result<Vec<PriceRecord>, CatalogError> {
        sqlx::query(
            "SELECT tool, price_micros, effective_at, created_at, applied_at FROM price_changes \
             WHERE server_id = $1 ORDER BY effective_at DESC, created_at DESC, id DESC LIMIT 500",
        )
        .bind(server_id)
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| {
            let tool: String = r.try_get(0)?;
            Ok(PriceRecord {
                tool: (!tool.is_empty()).then_some(tool),
                price_micros: r.try_get(1)?,
                effective_at: r.try_get(2)?,
                created_at: r.try_get(3)?,
                applied_at: r.try_get(4)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
    }

    /// Lists or unlists `server`. Unlisted: hidden from search and new installs;
    /// existing installs keep working.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn set_listed(&self, server: &Server, listed: bool) -> Result<Server, CatalogError> {
        sqlx::query("UPDATE servers SET listed = $1, updated_at = $2 WHERE id = $3")
            .bind(i64::from(listed))
            .bind(now_ms())
            .bind(&server.id)
            .execute(self.store.pool())
            .await?;
        self.changed();
        self.get_by_id(&server.id).await
    }

    /// Chooses which tools of an installed server `account_id` sees listed: `None` or
    /// an empty list: all of them. Every named tool must be one of the server's visible
    /// tools; nothing changes otherwise. Returns true when the choice changed.
    ///
    /// # Errors
    /// [`CatalogError::InvalidField`] for an unknown tool, [`CatalogError::Store`].
    pub async fn choose_tools(
        &self,
        account_id: &str,
        server: &Server,
        tools: Option<&[String]>,
    ) -> Result<bool, CatalogError> {
        let visible: Vec<String> = self
            .tools_of_server(&server.id)
            .await?
            .into_iter()
            .map(|t| t.name.clone())
            .collect();
        let mut chosen: Vec<String> = tools.unwrap_or_default().to_vec();
        chosen.sort();
        chosen.dedup();
        if chosen.iter().any(|t| !visible.contains(t)) {
            return Err(CatalogError::InvalidField(
                "tools: only tools the server offers (see marketplace__get_server)",
            ));
        }
        let mut tx = self.store.begin().await?;
        let mut before: Vec<String> =
            sqlx::query("SELECT tool FROM install_tools WHERE account_id = $1 AND server_id = $2")
                .bind(account_id)
                .bind(&server.id)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
        before.sort();
        if before == chosen {
            return Ok(false);
        }
        sqlx::query("DELETE FROM install_tools WHERE account_id = $1 AND server_id = $2")
            .bind(account_id)
            .bind(&server.id)
            .execute(&mut *tx)
            .await?;
        for t in &chosen {
            sqlx::query(
                "INSERT INTO install_tools (account_id, server_id, tool) VALUES ($1, $2, $3)",
            )
            .bind(account_id)
            .bind(&server.id)
            .bind(t)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.changed();
        Ok(true)
    }

    /// The probe history of `server_id`, newest first, at most `limit` (≤ 200).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn probe_history(
        &self,
        server_id: &str,
        limit: i64,
    ) -> Result<Vec<ProbeRecord>, CatalogError> {
        self.probes(server_id, "", limit.clamp(1, MAX_PROBES_LISTED))
            .await
    }

    /// The latest verification (a `registration` or `manual` probe) of `server_id`:
    /// the latest row of its first endpoint.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn latest_verification(
        &self,
        server_id: &str,
    ) -> Result<Option<ProbeRecord>, CatalogError> {
        Ok(self
            .latest_verification_rows(server_id)
            .await?
            .into_iter()
            .next())
    }

    /// The latest verification row of each endpoint of `server_id`, by endpoint.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn latest_verification_rows(
        &self,
        server_id: &str,
    ) -> Result<Vec<ProbeRecord>, CatalogError> {
        let mut out: Vec<ProbeRecord> = Vec::new();
        for p in self
            .probes(
                server_id,
                "AND kind IN ('registration', 'manual')",
                4 * super::MAX_ENDPOINTS as i64,
            )
            .await?
        {
            if !out
                .iter()
                .any(|o| o.endpoint_position == p.endpoint_position)
            {
                out.push(p);
            }
        }
        out.sort_by_key(|p| p.endpoint_position);
        Ok(out)
    }

    async fn probes(
        &self,
        server_id: &str,
        filter: &'static str,
        limit: i64,
    ) -> Result<Vec<ProbeRecord>, CatalogError> {
        let sql = format!(
            "SELECT id, kind, endpoint_position, started_at, duration_ms, latency_ms, grade, ok, checks \
             FROM probe_results WHERE server_id = $1 {filter} ORDER BY started_at DESC, id DESC LIMIT $2"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(server_id)
            .bind(limit)
            .fetch_all(self.store.pool())
            .await?
            .into_iter()
            .map(|r| {
                let checks: String = r.try_get(8)?;
                let checks: serde_json::Value =
                    serde_json::from_str(&checks).unwrap_or(serde_json::Value::Null);
                let kind: String = r.try_get(1)?;
                Ok(ProbeRecord {
                    id: r.try_get(0)?,
                    passed: stored_passed(&kind, &checks),
                    kind,
                    endpoint_position: r.try_get(2)?,
                    started_at: r.try_get(3)?,
                    duration_ms: r.try_get(4)?,
                    latency_ms: r.try_get(5)?,
                    grade: r.try_get(6)?,
                    ok: r.try_get::<i64, _>(7)? == 1,
                    checks,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Analytics of `server` over the `days` (1–90) before `now_ms`: calls per day,
    /// earnings, error rate, p50/p95 latency, per tool (most called first).
    ///
    /// # Errors
    /// [`CatalogError::InvalidField`] for `days` out of range, [`CatalogError::Store`].
    pub async fn analytics(
        &self,
        server: &Server,
        days: i64,
        now_ms: i64,
    ) -> Result<Analytics, CatalogError> {
        if !(1..=MAX_ANALYTICS_DAYS).contains(&days) {
            return Err(CatalogError::InvalidField("days: 1 to 90"));
        }
        // Whole UTC days: today and the days before it.
        let to_ms = (now_ms.div_euclid(DAY_MS) + 1) * DAY_MS;
        let from_ms = to_ms - days * DAY_MS;
        let rows = sqlx::query(
            "SELECT tool, status, creator_micros, latency_ms, created_at FROM calls \
             WHERE server_id = $1 AND created_at >= $2 AND created_at < $3",
        )
        .bind(&server.id)
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all(self.store.pool())
        .await?;
        let mut total = Acc::default();
        let mut per_day: BTreeMap<i64, Acc> = BTreeMap::new();
        let mut per_tool: HashMap<String, Acc> = HashMap::new();
        for r in rows {
            let tool: String = r.try_get(0)?;
            let status: String = r.try_get(1)?;
            let earnings: i64 = r.try_get(2)?;
            let latency: Option<i64> = r.try_get(3)?;
            let day = r.try_get::<i64, _>(4)?.div_euclid(DAY_MS);
            total.add(&status, earnings, latency);
            per_day
                .entry(day)
                .or_default()
                .add(&status, earnings, latency);
            per_tool
                .entry(tool)
                .or_default()
                .add(&status, earnings, latency);
        }
        let mut per_tool: Vec<(String, CallStats)> =
            per_tool.into_iter().map(|(t, a)| (t, a.stats())).collect();
        per_tool.sort_by(|a, b| b.1.calls.cmp(&a.1.calls).then_with(|| a.0.cmp(&b.0)));
        Ok(Analytics {
            slug: server.slug.clone(),
            from_ms,
            to_ms,
            total: total.stats(),
            per_day: per_day
                .into_iter()
                .map(|(d, a)| (day_label(d), a.stats()))
                .collect(),
            per_tool,
        })
    }
}

fn day_label(day: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day * DAY_MS)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut a = Acc::default();
        for l in 1..=20 {
            a.add("settled", 7, Some(l * 10));
        }
        a.add("refunded", 0, None);
        let s = a.stats();
        assert_eq!(s.p50_latency_ms, Some(100));
        assert_eq!(s.p95_latency_ms, Some(190));
        assert_eq!(s.earnings_micros, 140);
        assert!((s.error_rate - 1.0 / 21.0).abs() < 1e-12);
    }
}
