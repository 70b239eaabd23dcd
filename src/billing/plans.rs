//! Plans (issue 6 item 1): Free, Pro and Enterprise by default, each with rate limits, a
//! monthly call quota, included monthly credits and a monthly fee, all set in config:
//!
//! ```toml
//! [billing]
//! default_plan = "free"
//! [plans.pro]
//! name = "Pro"
//! monthly_fee = "20.00"          # USD, charged from the wallet at the start of each month
//! included_credits = "20.00"     # USD, granted to the wallet with each fee
//! monthly_calls = 1000000        # or "unlimited"
//! rate_limits = { per_account = "600/min" }   # unset keys follow [rate_limits]
//! ```
//!
//! The plan rows of an account (`account_plans`) say which plan is in effect from when;
//! the ledger books each month's fee and credits ([`super::Ledger::change_plan`],
//! [`super::Ledger::renew_subscriptions`]). This module holds the configured plans.

use std::collections::BTreeMap;

use super::pricing::{MAX_GRANT_MICROS, parse_usd};
pub use crate::config::RateLimitsFile;
use futures::future::BoxFuture;

use crate::security::ratelimit::{AccountLimitSource, AccountLimits, Rate};

/// The id of the plan accounts start on, unless `[billing] default_plan` says otherwise.
pub const DEFAULT_PLAN_ID: &str = "free";

/// A plan's rate limits; `None` means the marketplace-wide `[rate_limits]` value applies.
/// The rate limiter (security layer) reads them through [`super::PlanLimits`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PlanRateLimits {
    /// All calls of the account.
    pub per_account: Option<Rate>,
    /// All calls made with one key.
    pub per_key: Option<Rate>,
    /// Calls of the account to one server.
    pub per_account_per_server: Option<Rate>,
}

/// One plan. Money in micros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// The id used in config and on the command line (`free`, `pro`, …).
    pub id: String,
    /// The name shown on invoices.
    pub name: String,
    /// Charged from the wallet for each month (prorated for a plan that starts mid-month).
    pub monthly_fee_micros: i64,
    /// Granted to the wallet for each month, after the fee (prorated alike).
    pub included_credits_micros: i64,
    /// Calls allowed per UTC month (refunded calls do not count); `None` = unlimited.
    pub monthly_calls: Option<i64>,
    /// Rate limits.
    pub rate_limits: PlanRateLimits,
}

impl Plan {
    /// True when the plan books money each month (a fee or included credits).
    pub fn books_money(&self) -> bool {
        self.monthly_fee_micros > 0 || self.included_credits_micros > 0
    }
}

/// The configured plans and which one new accounts start on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanBook {
    plans: BTreeMap<String, Plan>,
    default_plan: String,
}

/// A USD amount in a config file: a string (`"19.99"`) or a whole number of dollars.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum UsdSetting {
    /// `"19.99"`.
    Text(String),
    /// `20`.
    Whole(i64),
}

impl UsdSetting {
    fn micros(&self, key: &str) -> Result<i64, String> {
        match self {
            Self::Text(t) => {
                parse_usd(t.trim(), MAX_GRANT_MICROS).map_err(|e| format!("{key}: {e}"))
            }
            Self::Whole(w) if *w >= 0 && *w <= MAX_GRANT_MICROS / 1_000_000 => Ok(w * 1_000_000),
            Self::Whole(w) => Err(format!("{key}: {w} is out of range")),
        }
    }
}

/// A monthly call quota in a config file: a number, a string of digits, or `"unlimited"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum QuotaSetting {
    /// `100000`.
    Number(i64),
    /// `"100000"` (as a variable gives it) or `"unlimited"`.
    Text(String),
}

impl QuotaSetting {
    fn calls(&self) -> Result<Option<i64>, String> {
        match self {
            Self::Number(n) if *n >= 0 => Ok(Some(*n)),
            Self::Text(t) if t.trim().eq_ignore_ascii_case("unlimited") => Ok(None),
            Self::Text(t) => t
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(Some)
                .ok_or_else(|| format!("monthly_calls: '{t}' is not a count or 'unlimited'")),
            Self::Number(n) => Err(format!("monthly_calls: {n} is negative")),
        }
    }
}

/// `[plans.ID]` in a config file; every key optional (a built-in plan keeps its value).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct PlanFile {
    /// Display name.
    pub name: Option<String>,
    /// USD per month.
    pub monthly_fee: Option<UsdSetting>,
    /// USD granted per month.
    pub included_credits: Option<UsdSetting>,
    /// Calls per month, or `unlimited`.
    pub monthly_calls: Option<QuotaSetting>,
    /// Rate limits.
    #[serde(default)]
    pub rate_limits: RateLimitsFile,
}

fn limit(s: &str) -> Rate {
    s.parse().expect("built-in rate limits parse")
}

impl PlanBook {
    /// The built-in plans (a rule of thumb, documented in README.md "Plans"):
    /// Free — no fee, 10 000 calls a month, 60 calls/min per account; Pro — 20 USD a
    /// month including 20 USD of credits, 1 000 000 calls, 600/min; Enterprise — 500 USD
    /// including 500 USD, unlimited calls, 6000/min. Other limits follow `[rate_limits]`.
    pub fn builtin() -> Self {
        let plan = |id: &str, name: &str, usd: i64, calls: Option<i64>, rate: &str| Plan {
            id: id.to_owned(),
            name: name.to_owned(),
            monthly_fee_micros: usd * 1_000_000,
            included_credits_micros: usd * 1_000_000,
            monthly_calls: calls,
            rate_limits: PlanRateLimits {
                per_account: Some(limit(rate)),
                ..PlanRateLimits::default()
            },
        };
        let plans = [
            plan("free", "Free", 0, Some(10_000), "60/min"),
            plan("pro", "Pro", 20, Some(1_000_000), "600/min"),
            plan("enterprise", "Enterprise", 500, None, "6000/min"),
        ];
        Self {
            plans: plans.into_iter().map(|p| (p.id.clone(), p)).collect(),
            default_plan: DEFAULT_PLAN_ID.to_owned(),
        }
    }

    /// The built-in plans overlaid with `[plans.*]` from config, and the default plan.
    ///
    /// # Errors
    /// A message naming the bad key: a malformed id, amount, quota or rate limit, an
    /// unknown default plan, or a default plan with a fee (accounts land on it when they
    /// cannot pay, so it must cost nothing).
    pub fn from_config(
        files: &BTreeMap<String, PlanFile>,
        default_plan: Option<&str>,
    ) -> Result<Self, String> {
        let mut book = Self::builtin();
        for (id, f) in files {
            let id = id.to_ascii_lowercase();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "plans.{id}: a plan id is 1-32 characters of a-z, 0-9, '-' or '_'"
                ));
            }
            let mut plan = book.plans.get(&id).cloned().unwrap_or_else(|| Plan {
                id: id.clone(),
                name: id.clone(),
                monthly_fee_micros: 0,
                included_credits_micros: 0,
                monthly_calls: None,
                rate_limits: PlanRateLimits::default(),
            });
            let at = |key: &str| format!("plans.{id}.{key}");
            if let Some(n) = &f.name {
                plan.name = n.clone();
            }
            if let Some(v) = &f.monthly_fee {
                plan.monthly_fee_micros = v.micros(&at("monthly_fee"))?;
            }
            if let Some(v) = &f.included_credits {
                plan.included_credits_micros = v.micros(&at("included_credits"))?;
            }
            if let Some(q) = &f.monthly_calls {
                plan.monthly_calls = q.calls().map_err(|e| format!("plans.{id}.{e}"))?;
            }
            let r = &f.rate_limits;
            for (value, slot) in [
                (&r.per_account, &mut plan.rate_limits.per_account),
                (&r.per_key, &mut plan.rate_limits.per_key),
                (
                    &r.per_account_per_server,
                    &mut plan.rate_limits.per_account_per_server,
                ),
            ] {
                if let Some(v) = value {
                    *slot = Some(
                        v.parse()
                            .map_err(|e| format!("{}: {e}", at("rate_limits")))?,
                    );
                }
            }
            book.plans.insert(id, plan);
        }
        if let Some(d) = default_plan {
            book.default_plan = d.to_ascii_lowercase();
        }
        let default = book
            .plans
            .get(&book.default_plan)
            .ok_or_else(|| format!("billing.default_plan: no plan '{}'", book.default_plan))?;
        if default.monthly_fee_micros != 0 {
            return Err(format!(
                "billing.default_plan: plan '{}' has a fee; the default plan must be free",
                default.id
            ));
        }
        Ok(book)
    }

    /// The plan `id`, if configured.
    pub fn get(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id)
    }

    /// The plan accounts are on when no plan row says otherwise.
    pub fn default_plan(&self) -> &Plan {
        self.plans
            .get(&self.default_plan)
            .expect("the default plan is checked to exist")
    }

    /// The plan `id`, or the default plan when `id` is no longer configured (an account
    /// whose plan was removed from config falls back to the default's limits).
    pub fn resolve(&self, id: &str) -> &Plan {
        self.get(id).unwrap_or_else(|| self.default_plan())
    }

    /// Every plan, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }
}

impl Default for PlanBook {
    fn default() -> Self {
        Self::builtin()
    }
}

/// The part of `amount` (micros) for a period starting at `starts_at` inside a month of
/// `[month_start, month_end)`: floor(amount × remaining ÷ month length). A period that
/// starts at or before the month's start gets the whole amount.
pub fn prorate(amount: i64, month_start: i64, month_end: i64, starts_at: i64) -> i64 {
    if starts_at <= month_start || month_end <= month_start {
        return amount;
    }
    let remaining = i128::from((month_end - starts_at).max(0));
    let len = i128::from(month_end - month_start);
    (i128::from(amount) * remaining / len) as i64
}

/// The billing plans as the rate limiter's per-account source
/// ([`AccountLimitSource`]): the limits of the plan an account is on replace the
/// marketplace-wide `[rate_limits]` defaults; an account's own override in the database
/// still wins (precedence in `security::policy`). Installed by `App::with_store`.
#[derive(Debug, Clone)]
pub struct PlanLimits(pub super::Ledger);

impl AccountLimitSource for PlanLimits {
    fn account_limits<'a>(&'a self, account_id: &'a str) -> BoxFuture<'a, AccountLimits> {
        Box::pin(async move {
            match self.0.rate_limits_for(account_id).await {
                Ok(plan) => AccountLimits {
                    per_account: plan.per_account,
                    per_account_per_server: plan.per_account_per_server,
                    per_key: plan.per_key,
                },
                // The store failing must not stop calls: the configured defaults apply
                // (the reserve that follows needs the store anyway and fails cleanly).
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the account's plan limits; using the defaults");
                    AccountLimits::default()
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_overlays_builtin_plans() {
        let mut files = BTreeMap::new();
        files.insert(
            "pro".to_owned(),
            PlanFile {
                monthly_fee: Some(UsdSetting::Text("25.00".into())),
                monthly_calls: Some(QuotaSetting::Text("unlimited".into())),
                ..PlanFile::default()
            },
        );
        files.insert(
            "team".to_owned(),
            PlanFile {
                name: Some("Team".into()),
                monthly_fee: Some(UsdSetting::Whole(50)),
                monthly_calls: Some(QuotaSetting::Text("5000".into())),
                rate_limits: RateLimitsFile {
                    per_key: Some("100/min".into()),
                    ..RateLimitsFile::default()
                },
                ..PlanFile::default()
            },
        );
        let book = PlanBook::from_config(&files, None).unwrap();
        let pro = book.get("pro").unwrap();
        assert_eq!(pro.monthly_fee_micros, 25_000_000);
        assert_eq!(
            pro.included_credits_micros, 20_000_000,
            "kept from the built-in"
        );
        assert_eq!(pro.monthly_calls, None);
        let team = book.get("team").unwrap();
        assert_eq!(team.monthly_fee_micros, 50_000_000);
        assert_eq!(team.monthly_calls, Some(5000));
        assert_eq!(team.rate_limits.per_key.unwrap().to_string(), "100/min");
        assert_eq!(book.default_plan().id, "free");
        assert!(
            PlanBook::from_config(&files, Some("pro")).is_err(),
            "a paid default"
        );
        assert!(PlanBook::from_config(&files, Some("nope")).is_err());
    }

    #[test]
    fn prorates_by_remaining_time_rounding_down() {
        assert_eq!(prorate(20_000_000, 0, 30, 0), 20_000_000);
        assert_eq!(prorate(20_000_000, 0, 30, 15), 10_000_000);
        assert_eq!(prorate(10, 0, 3, 1), 6);
        assert_eq!(prorate(10, 0, 3, 3), 0);
    }
}
