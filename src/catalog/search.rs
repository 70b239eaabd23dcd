//! Catalog search: full-text search over servers (name, description, categories, and
//! the names and descriptions of their visible tools) and over single tools, with the
//! database's own engine on each backend:
//!
//! - SQLite: FTS5 with the Porter stemmer (`server_search`, `tool_search`); relevance
//!   is `-bm25()` with column weights name 10, description 4, categories 3, tools 2
//!   (FTS5 "The bm25() function").
//! - PostgreSQL: `tsvector` documents of the `english` configuration with weights
//!   (name A, description and categories B, tools C), relevance `ts_rank`.
//!
//! A query is split into words (letters and digits); English stop words are dropped and
//! the rest are OR-ed, so a task description ("convert 10 km to miles") matches
//! servers with any of its words and ranks those with more, rarer ones first. Only tools
//! whose definition an admin pinned are indexed (an unreviewed description never
//! steers search).
//!
//! Ranking: `rank = relevance × (1 + reputation / 100)` (reputation 0–100, see
//! [`super::reputation`]), so reputation orders servers of similar relevance and at most
//! doubles a weak match. Without words, servers are ordered by reputation, then slug.

use std::collections::HashMap;

use sqlx::Row;

use super::{Catalog, CatalogError, Server};
use crate::store::{Backend, Tx};

/// Most words of a query used.
pub const MAX_QUERY_WORDS: usize = 32;
/// Most candidates the full-text engine returns before filters and ranking.
const MAX_CANDIDATES: i64 = 500;

/// English stop words dropped from queries (PostgreSQL's `english` configuration
/// drops them too; dropping them on SQLite keeps both backends alike).
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "for", "from", "get", "how", "i",
    "in", "into", "is", "it", "me", "my", "of", "on", "or", "our", "should", "some", "that", "the",
    "their", "them", "then", "this", "to", "use", "want", "was", "we", "what", "when", "which",
    "with", "you", "your",
];

/// The words of `query` that are searched: lowercase runs of letters and digits, stop
/// words dropped, duplicates removed, at most [`MAX_QUERY_WORDS`].
pub fn query_words(query: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
    {
        if STOP_WORDS.contains(&w.as_str()) || out.contains(&w) || w.chars().count() > 64 {
            continue;
        }
        out.push(w);
        if out.len() == MAX_QUERY_WORDS {
            break;
        }
    }
    out
}

/// Filters of a server search.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct SearchFilters {
    /// Only servers in this category.
    #[serde(default)]
    pub category: Option<String>,
    /// Only servers whose default price is at most this many micros.
    #[serde(default)]
    pub max_price_micros: Option<i64>,
    /// Only servers in this status (one of the callable ones; default: all callable).
    #[serde(default)]
    pub status: Option<String>,
    /// Only servers whose mean rating is at least this (1–5); servers without reviews
    /// are excluded when set.
    #[serde(default)]
    pub min_rating: Option<f64>,
}

/// A search hit: the server, its relevance (0 without query words) and final rank.
#[derive(Debug, Clone)]
pub struct ServerHit {
    /// The server.
    pub server: Server,
    /// Full-text relevance (backend-specific scale; higher is better).
    pub relevance: f64,
    /// `relevance × (1 + reputation / 100)`.
    pub rank: f64,
}

/// A tool search hit.
#[derive(Debug, Clone)]
pub struct ToolHit {
    /// The server's id.
    pub server_id: String,
    /// The upstream tool name.
    pub tool: String,
    /// Relevance (higher is better).
    pub relevance: f64,
    /// `relevance × (1 + reputation / 100)`.
    pub rank: f64,
}

fn sqlite_match(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("\"{w}\""))
        .collect::<Vec<_>>()
        .join(" OR ")
}

fn pg_tsquery(words: &[String]) -> String {
    words.join(" | ")
}

/// Rewrites the search rows of `server_id` from the catalog: its name, description,
/// categories and visible tools (or removes them when the server is gone). Called in the
/// transaction of every write that changes one of those.
///
/// # Errors
/// [`CatalogError::Store`].
pub(crate) async fn reindex(
    tx: &mut Tx<'_>,
    backend: Backend,
    server_id: &str,
) -> Result<(), CatalogError> {
    sqlx::query("DELETE FROM server_search WHERE server_id = $1")
        .bind(server_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM tool_search WHERE server_id = $1")
        .bind(server_id)
        .execute(&mut **tx)
        .await?;
    let Some(row) = sqlx::query("SELECT name, description, categories FROM servers WHERE id = $1")
        .bind(server_id)
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(());
    };
    let name: String = row.try_get(0)?;
    let description: String = row.try_get(1)?;
    let categories: String = row.try_get::<String, _>(2)?.replace(',', " ");
    // (upstream name, searchable name words with the title, description)
    let tools: Vec<(String, String, String)> = sqlx::query(
        "SELECT t.name, t.definition FROM upstream_tools t \
         JOIN tool_pins p ON p.server_id = t.server_id AND p.tool = t.name AND p.hash = t.hash \
         WHERE t.server_id = $1 ORDER BY t.position",
    )
    .bind(server_id)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| {
        let name: String = r.try_get(0)?;
        let def: String = r.try_get(1)?;
        let def = serde_json::from_str::<serde_json::Value>(&def).unwrap_or_default();
        let text = |p: &str| def.pointer(p).and_then(|v| v.as_str()).unwrap_or("");
        // The title (MCP `title`, else `annotations.title`) is searched with the name.
        let title = match text("/title") {
            "" => text("/annotations/title"),
            t => t,
        };
        let words = format!("{} {title}", name.replace(['_', '-', '.'], " "));
        Ok((name, words, text("/description").to_owned()))
    })
    .collect::<Result<_, sqlx::Error>>()?;
    // Tool names are searched as words too: `create_event` → "create event".
    let tools_text = tools
        .iter()
        .map(|(_, n, d)| format!("{n} {d}"))
        .collect::<Vec<_>>()
        .join("\n");
    match backend {
        Backend::Sqlite => {
            sqlx::query(
                "INSERT INTO server_search (server_id, name, description, categories, tools) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(server_id)
            .bind(&name)
            .bind(&description)
            .bind(&categories)
            .bind(&tools_text)
            .execute(&mut **tx)
            .await?;
            for (tool, words, desc) in &tools {
                sqlx::query(
                    "INSERT INTO tool_search (server_id, tool, name, description) VALUES ($1, $2, $3, $4)",
                )
                .bind(server_id)
                .bind(tool)
                .bind(words)
                .bind(format!("{desc} {name}"))
                .execute(&mut **tx)
                .await?;
            }
        }
        Backend::Postgres => {
            sqlx::query(
                "INSERT INTO server_search (server_id, document) VALUES ($1, \
                 setweight(to_tsvector('english', $2), 'A') || \
                 setweight(to_tsvector('english', $3), 'B') || \
                 setweight(to_tsvector('english', $4), 'B') || \
                 setweight(to_tsvector('english', $5), 'C'))",
            )
            .bind(server_id)
            .bind(&name)
            .bind(&description)
            .bind(&categories)
            .bind(&tools_text)
            .execute(&mut **tx)
            .await?;
            for (tool, words, desc) in &tools {
                sqlx::query(
                    "INSERT INTO tool_search (server_id, tool, document) VALUES ($1, $2, \
                     setweight(to_tsvector('english', $3), 'A') || \
                     setweight(to_tsvector('english', $4), 'B') || \
                     setweight(to_tsvector('english', $5), 'D'))",
                )
                .bind(server_id)
                .bind(tool)
                .bind(words)
                .bind(desc)
                .bind(&name)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(())
}

impl Catalog {
    /// Rewrites the search rows of `server_id` in a transaction of its own.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn reindex(&self, server_id: &str) -> Result<(), CatalogError> {
        let mut tx = self.store.begin().await?;
        reindex(&mut tx, self.store.backend(), server_id).await?;
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        Ok(())
    }

    /// Indexes the servers missing from the search index (at start: servers written
    /// before it existed). Returns how many.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn reindex_all(&self) -> Result<usize, CatalogError> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM servers WHERE id NOT IN (SELECT server_id FROM server_search)",
        )
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        for id in &ids {
            self.reindex(id).await?;
        }
        Ok(ids.len())
    }

    /// Full-text relevance of the servers matching `words` (no words: empty).
    async fn server_relevance(
        &self,
        words: &[String],
    ) -> Result<HashMap<String, f64>, CatalogError> {
        if words.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = match self.store.backend() {
            Backend::Sqlite => {
                sqlx::query(
                    "SELECT server_id, -bm25(server_search, 0.0, 10.0, 4.0, 3.0, 2.0) FROM server_search \
                     WHERE server_search MATCH $1 LIMIT $2",
                )
                .bind(sqlite_match(words))
                .bind(MAX_CANDIDATES)
                .fetch_all(self.store.pool())
                .await?
            }
            Backend::Postgres => {
                sqlx::query(
                    "SELECT server_id, CAST(ts_rank(document, to_tsquery('english', $1)) AS DOUBLE PRECISION) \
                     FROM server_search WHERE document @@ to_tsquery('english', $1) LIMIT $2",
                )
                .bind(pg_tsquery(words))
                .bind(MAX_CANDIDATES)
                .fetch_all(self.store.pool())
                .await?
            }
        };
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Searches listed, callable servers: full-text over `query` (empty: every server)
    /// with `filters`, ranked by relevance and reputation (module docs), at most `limit`.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn search_servers(
        &self,
        query: &str,
        filters: &SearchFilters,
        limit: usize,
    ) -> Result<Vec<ServerHit>, CatalogError> {
        let words = query_words(query);
        let relevance = self.server_relevance(&words).await?;
        if !words.is_empty() && relevance.is_empty() {
            return Ok(Vec::new());
        }
        let reputations = self.reputations().await?;
        let ratings = self.rating_means().await?;
        // From the snapshot: no query per candidate.
        let snapshot = self.snapshot().await?;
        let servers: Vec<Server> = if words.is_empty() {
            snapshot.servers()
        } else {
            relevance
                .keys()
                .filter_map(|id| snapshot.server_by_id(id))
                .map(|s| (*s).clone())
                .collect()
        };
        let mut hits = Vec::new();
        for server in servers {
            if !server.status.is_callable() || !server.listed {
                continue;
            }
            let rel = match relevance.get(&server.id) {
                Some(r) => *r,
                None if words.is_empty() => 0.0,
                None => continue,
            };
            if let Some(c) = &filters.category {
                let c = c.trim().to_lowercase();
                if !server.categories.contains(&c) {
                    continue;
                }
            }
            if filters
                .max_price_micros
                .is_some_and(|max| server.price_micros > max)
            {
                continue;
            }
            if filters
                .status
                .as_deref()
                .is_some_and(|s| s != server.status.as_str())
            {
                continue;
            }
            if let Some(min) = filters.min_rating {
                match ratings.get(&server.id) {
                    Some(r) if *r >= min => {}
                    _ => continue,
                }
            }
            let reputation = reputations.get(&server.id).copied().unwrap_or(0.0);
            let rank = if words.is_empty() {
                reputation
            } else {
                rel * (1.0 + reputation / 100.0)
            };
            hits.push(ServerHit {
                server,
                relevance: rel,
                rank,
            });
        }
        hits.sort_by(|a, b| {
            b.rank
                .total_cmp(&a.rank)
                .then_with(|| a.server.slug.cmp(&b.server.slug))
        });
        hits.truncate(limit);
        Ok(hits)
    }

    /// Searches the visible tools of listed, callable servers by a task description,
    /// ranked by relevance × (1 + reputation / 100), at most `limit`.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn search_tools(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<ToolHit>, CatalogError> {
        let words = query_words(query);
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let rows = match self.store.backend() {
            Backend::Sqlite => {
                sqlx::query(
                    "SELECT f.server_id, f.tool, -bm25(tool_search, 0.0, 0.0, 6.0, 3.0) FROM tool_search f \
                     JOIN servers s ON s.id = f.server_id \
                     WHERE tool_search MATCH $1 AND s.listed = 1 \
                     AND s.status IN ('active', 'degraded', 'recovered') LIMIT $2",
                )
                .bind(sqlite_match(&words))
                .bind(MAX_CANDIDATES)
                .fetch_all(self.store.pool())
                .await?
            }
            Backend::Postgres => {
                sqlx::query(
                    "SELECT f.server_id, f.tool, CAST(ts_rank(f.document, to_tsquery('english', $1)) AS DOUBLE PRECISION) \
                     FROM tool_search f JOIN servers s ON s.id = f.server_id \
                     WHERE f.document @@ to_tsquery('english', $1) AND s.listed = 1 \
                     AND s.status IN ('active', 'degraded', 'recovered') LIMIT $2",
                )
                .bind(pg_tsquery(&words))
                .bind(MAX_CANDIDATES)
                .fetch_all(self.store.pool())
                .await?
            }
        };
        let reputations = self.reputations().await?;
        let mut hits: Vec<ToolHit> = rows
            .into_iter()
            .map(|r| {
                let server_id: String = r.try_get(0)?;
                let relevance: f64 = r.try_get(2)?;
                let reputation = reputations.get(&server_id).copied().unwrap_or(0.0);
                Ok(ToolHit {
                    tool: r.try_get(1)?,
                    rank: relevance * (1.0 + reputation / 100.0),
                    relevance,
                    server_id,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        hits.sort_by(|a, b| {
            b.rank
                .total_cmp(&a.rank)
                .then_with(|| a.server_id.cmp(&b.server_id))
                .then_with(|| a.tool.cmp(&b.tool))
        });
        hits.truncate(limit);
        Ok(hits)
    }

    /// The reputation score (0–100) of every server that has one.
    async fn reputations(&self) -> Result<HashMap<String, f64>, CatalogError> {
        sqlx::query("SELECT server_id, score FROM server_reputation")
            .fetch_all(self.store.pool())
            .await?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The mean star rating of every server with reviews.
    async fn rating_means(&self) -> Result<HashMap<String, f64>, CatalogError> {
        sqlx::query(
            "SELECT server_id, CAST(SUM(rating) AS BIGINT), CAST(COUNT(*) AS BIGINT) FROM reviews GROUP BY server_id",
        )
        .fetch_all(self.store.pool())
        .await?
        .into_iter()
        .map(|r| {
            let sum: i64 = r.try_get(1)?;
            let n: i64 = r.try_get(2)?;
            Ok((r.try_get(0)?, sum as f64 / n.max(1) as f64))
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_words_drop_stop_words_and_punctuation() {
        assert_eq!(
            query_words("Convert 10 km to miles, please!"),
            vec!["convert", "10", "km", "miles", "please"]
        );
        assert!(query_words("the a of").is_empty());
        assert_eq!(query_words("\"x\" OR y*"), vec!["x", "y"]);
        assert_eq!(
            sqlite_match(&query_words("rain forecast")),
            "\"rain\" OR \"forecast\""
        );
    }
}
