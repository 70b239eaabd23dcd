//! Reputation: one score per server from the last 30 days, recomputed by a background
//! job ([`Catalog::refresh_reputations`]) and shown wherever a server is listed.
//!
//! ```text
//! U  uptime       = ok probes / probes                       (no probes: 0)
//! S  success rate = (settled + 9) / (finished + 10)          (a prior of 90 % worth 10 calls;
//!                   finished = settled + refunded calls, client cancellations excluded)
//! L  latency      = grade of the median latency of ok probes: A < 250 ms, B < 500, C < 1000,
//!                   D < 2500, else F (no ok probe: F); points A 1, B 0.75, C 0.5, D 0.25, F 0
//! R  rating       = (5·m + Σ stars) / (5 + n), the Bayesian average with a prior of 5
//!                   reviews at m, the mean of every review in the marketplace (3 without any)
//! score = 100 × (0.35·U + 0.25·S + 0.15·L + 0.25·(R − 1)/4), rounded to one decimal
//! ```
//! (The median of an even count is the lower middle value.) Probes come from
//! `probe_results` (scheduled and manual ones: at registration a server cannot pass the
//! secret check yet), calls from `calls`, reviews from `reviews`.

use std::collections::HashMap;

use sqlx::Row;

use super::{Catalog, CatalogError};
use crate::store::now_ms;

/// The window reputation looks back over (30 days, ms).
pub const WINDOW_MS: i64 = 30 * 24 * 60 * 60 * 1000;
/// Weight of the prior in the Bayesian rating (reviews).
pub const RATING_PRIOR_WEIGHT: f64 = 5.0;
/// The prior mean rating when the marketplace has no reviews.
pub const DEFAULT_PRIOR_RATING: f64 = 3.0;

/// The grade of a latency (ms): A < 250, B < 500, C < 1000, D < 2500, else F.
pub fn latency_grade(latency_ms: i64) -> char {
    match latency_ms {
        l if l < 250 => 'A',
        l if l < 500 => 'B',
        l if l < 1000 => 'C',
        l if l < 2500 => 'D',
        _ => 'F',
    }
}

/// The points of a grade: A 1, B 0.75, C 0.5, D 0.25, F 0.
pub fn grade_points(grade: char) -> f64 {
    match grade {
        'A' => 1.0,
        'B' => 0.75,
        'C' => 0.5,
        'D' => 0.25,
        _ => 0.0,
    }
}

/// The inputs of one server's score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Probes in the window.
    pub probes: i64,
    /// Of which passed.
    pub ok_probes: i64,
    /// Latencies (ms) of the passed probes.
    pub ok_latencies_ms: Vec<i64>,
    /// Settled calls in the window.
    pub settled: i64,
    /// Refunded calls in the window, client cancellations excluded.
    pub failed: i64,
    /// This server's review stars.
    pub stars: Vec<i64>,
    /// Mean stars of every review in the marketplace (`None`: no reviews at all).
    pub global_mean: Option<f64>,
}

/// One server's reputation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reputation {
    /// 0–100, one decimal.
    pub score: f64,
    /// 0–1.
    pub uptime: f64,
    /// 0–1 (smoothed).
    pub success_rate: f64,
    /// `A`–`F`.
    pub latency_grade: String,
    /// Mean stars, `None` without reviews.
    pub rating: Option<f64>,
    /// The Bayesian-averaged rating, 1–5.
    pub rating_bayes: f64,
    /// Number of reviews.
    pub reviews: i64,
    /// Probes in the window.
    pub probes: i64,
    /// Finished calls in the window.
    pub calls: i64,
}

/// Computes the reputation of [`Inputs`] (the formula of the module docs).
pub fn compute(i: &Inputs) -> Reputation {
    let uptime = if i.probes > 0 {
        i.ok_probes as f64 / i.probes as f64
    } else {
        0.0
    };
    let finished = i.settled + i.failed;
    let success_rate = (i.settled as f64 + 9.0) / (finished as f64 + 10.0);
    let mut lat = i.ok_latencies_ms.clone();
    lat.sort_unstable();
    let grade = if lat.is_empty() {
        'F'
    } else {
        latency_grade(lat[(lat.len() - 1) / 2])
    };
    let n = i.stars.len() as f64;
    let sum: i64 = i.stars.iter().sum();
    let m = i.global_mean.unwrap_or(DEFAULT_PRIOR_RATING);
    let rating_bayes = (RATING_PRIOR_WEIGHT * m + sum as f64) / (RATING_PRIOR_WEIGHT + n);
    let raw = 100.0
        * (0.35 * uptime
            + 0.25 * success_rate
            + 0.15 * grade_points(grade)
            + 0.25 * (rating_bayes - 1.0) / 4.0);
    Reputation {
        score: (raw * 10.0).round() / 10.0,
        uptime,
        success_rate,
        latency_grade: grade.to_string(),
        rating: (!i.stars.is_empty()).then(|| sum as f64 / n),
        rating_bayes,
        reviews: i.stars.len() as i64,
        probes: i.probes,
        calls: finished,
    }
}

impl Catalog {
    /// Reads the [`Inputs`] of `server_id` for the window ending at `now` (epoch ms).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn reputation_inputs(
        &self,
        server_id: &str,
        now: i64,
    ) -> Result<Inputs, CatalogError> {
        let since = now - WINDOW_MS;
        let pool = self.store.pool();
        let mut inputs = Inputs::default();
        for r in sqlx::query(
            "SELECT ok, latency_ms FROM probe_results WHERE server_id = $1 AND started_at >= $2 AND started_at <= $3 \
             AND kind <> 'registration'",
        )
        .bind(server_id)
        .bind(since)
        .bind(now)
        .fetch_all(pool)
        .await?
        {
            inputs.probes += 1;
            let ok: i64 = r.try_get(0)?;
            if ok == 1 {
                inputs.ok_probes += 1;
                if let Some(l) = r.try_get::<Option<i64>, _>(1)? {
                    inputs.ok_latencies_ms.push(l);
                }
            }
        }
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(CASE WHEN status = 'settled' THEN 1 ELSE 0 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN status = 'refunded' AND COALESCE(error_kind, '') <> 'cancelled' THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM calls WHERE server_id = $1 AND created_at >= $2 AND created_at <= $3",
        )
        .bind(server_id)
        .bind(since)
        .bind(now)
        .fetch_one(pool)
        .await?;
        inputs.settled = row.try_get(0)?;
        inputs.failed = row.try_get(1)?;
        inputs.stars = sqlx::query("SELECT rating FROM reviews WHERE server_id = $1")
            .bind(server_id)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        let g = sqlx::query(
            "SELECT CAST(COALESCE(SUM(rating), 0) AS BIGINT), CAST(COUNT(*) AS BIGINT) FROM reviews",
        )
        .fetch_one(pool)
        .await?;
        let (sum, n): (i64, i64) = (g.try_get(0)?, g.try_get(1)?);
        inputs.global_mean = (n > 0).then(|| sum as f64 / n as f64);
        Ok(inputs)
    }

    /// Computes and stores the reputation of `server_id` as of `now` (epoch ms).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn refresh_reputation(
        &self,
        server_id: &str,
        now: i64,
    ) -> Result<Reputation, CatalogError> {
        let rep = compute(&self.reputation_inputs(server_id, now).await?);
        sqlx::query(
            "INSERT INTO server_reputation (server_id, score, uptime, success_rate, latency_grade, rating, \
             rating_bayes, reviews, probes, calls, computed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (server_id) DO UPDATE SET score = EXCLUDED.score, uptime = EXCLUDED.uptime, \
             success_rate = EXCLUDED.success_rate, latency_grade = EXCLUDED.latency_grade, rating = EXCLUDED.rating, \
             rating_bayes = EXCLUDED.rating_bayes, reviews = EXCLUDED.reviews, probes = EXCLUDED.probes, \
             calls = EXCLUDED.calls, computed_at = EXCLUDED.computed_at",
        )
        .bind(server_id)
        .bind(rep.score)
        .bind(rep.uptime)
        .bind(rep.success_rate)
        .bind(&rep.latency_grade)
        // 0 without reviews (a NULL f64 does not bind on every backend).
        .bind(rep.rating.unwrap_or(0.0))
        .bind(rep.rating_bayes)
        .bind(rep.reviews)
        .bind(rep.probes)
        .bind(rep.calls)
        .bind(now)
        .execute(self.store.pool())
        .await?;
        Ok(rep)
    }

    /// Recomputes the reputation of every server (the background job). Returns how many.
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn refresh_reputations(&self) -> Result<usize, CatalogError> {
        let now = now_ms();
        let ids: Vec<String> = sqlx::query("SELECT id FROM servers")
            .fetch_all(self.store.pool())
            .await?
            .into_iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        for id in &ids {
            self.refresh_reputation(id, now).await?;
        }
        Ok(ids.len())
    }

    /// The stored reputation of `server_id` (`None` before the job first ran for it).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn reputation(&self, server_id: &str) -> Result<Option<Reputation>, CatalogError> {
        sqlx::query(
            "SELECT score, uptime, success_rate, latency_grade, rating, rating_bayes, reviews, probes, calls \
             FROM server_reputation WHERE server_id = $1",
        )
        .bind(server_id)
        .fetch_optional(self.store.pool())
        .await?
        .map(|r| reputation_of(&r))
        .transpose()
    }

    /// The last computed reputation of every server that has one, by server id (one
    /// query: the listings' batch form of [`Catalog::reputation`]).
    ///
    /// # Errors
    /// [`CatalogError::Store`].
    pub async fn all_reputations(&self) -> Result<HashMap<String, Reputation>, CatalogError> {
        sqlx::query(
            "SELECT score, uptime, success_rate, latency_grade, rating, rating_bayes, reviews, probes, calls, \
             server_id FROM server_reputation",
        )
        .fetch_all(self.store.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get(9)?, reputation_of(r)?)))
        .collect()
    }
}

/// A [`Reputation`] from the first nine columns of a `server_reputation` select.
fn reputation_of(r: &sqlx::any::AnyRow) -> Result<Reputation, CatalogError> {
    let reviews: i64 = r.try_get(6)?;
    let mean: f64 = r.try_get(4)?;
    Ok(Reputation {
        score: r.try_get(0)?,
        uptime: r.try_get(1)?,
        success_rate: r.try_get(2)?,
        latency_grade: r.try_get(3)?,
        rating: (reviews > 0).then_some(mean),
        rating_bayes: r.try_get(5)?,
        reviews,
        probes: r.try_get(7)?,
        calls: r.try_get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed: U = 9/10 = 0.9; S = (18 + 9)/(20 + 10) = 0.9; the median of the
    /// nine ok latencies is 300 ms → B → 0.75; m = (5 + 4 + 1)/3, R = (5m + 9)/7 =
    /// 25.6667/7 = 3.6667, (R − 1)/4 = 0.6667; score = 100 × (0.315 + 0.225 + 0.1125 +
    /// 0.1667) = 81.92 → 81.9.
    #[test]
    fn formula_matches_hand_computed_values() {
        let r = compute(&Inputs {
            probes: 10,
            ok_probes: 9,
            ok_latencies_ms: vec![490, 100, 150, 200, 220, 300, 400, 450, 480],
            settled: 18,
            failed: 2,
            stars: vec![5, 4],
            global_mean: Some(10.0 / 3.0),
        });
        assert_eq!(r.score, 81.9);
        assert_eq!(r.latency_grade, "B");
        assert!((r.uptime - 0.9).abs() < 1e-12);
        assert!((r.success_rate - 0.9).abs() < 1e-12);
        assert!((r.rating_bayes - 3.666_666_666_7).abs() < 1e-9);
        assert_eq!(r.rating, Some(4.5));
    }

    /// A server with nothing yet: U = 0, S = 9/10, L = F, R = 3 → 100 × (0.225 + 0.125) = 35.
    #[test]
    fn a_new_server_scores_35() {
        let r = compute(&Inputs::default());
        assert_eq!(r.score, 35.0);
        assert_eq!(r.rating, None);
    }

    #[test]
    fn grades_follow_the_probe_thresholds() {
        assert_eq!(latency_grade(249), 'A');
        assert_eq!(latency_grade(250), 'B');
        assert_eq!(latency_grade(999), 'C');
        assert_eq!(latency_grade(2499), 'D');
        assert_eq!(latency_grade(2500), 'F');
    }
}
