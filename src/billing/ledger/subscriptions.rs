//! Plans on the ledger: which plan an account is on from when, and the booking of each
//! month's fee and included credits (`subscription` and `included_credits` transfers,
//! one `subscription_periods` row per plan row and month).

use sqlx::{AnyConnection, Row};

use super::{
    BillingError, Ledger, PLATFORM_INCLUDED_CREDITS, PLATFORM_REVENUE, debit_wallet,
    insert_transfer, is_foreign_key_violation, lock_ledger_account, post_transfer,
    rearm_low_balance, wallet_id, write_entries,
};
use crate::billing::period::Month;
use crate::billing::plans::{Plan, PlanRateLimits, prorate};
use crate::store::{StoreError, Tx, is_unique_violation};

/// The plan in effect for an account at some instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentPlan {
    /// The `account_plans` row, or `None` for the default plan of an account without one.
    pub account_plan_id: Option<String>,
    /// Since when (epoch ms; 0 for the default plan).
    pub effective_at: i64,
    /// The plan (the default plan if the row names a plan no longer configured).
    pub plan: Plan,
}

/// One row of an account's plan history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanHistoryEntry {
    /// The row's id.
    pub id: String,
    /// The plan id.
    pub plan: String,
    /// Epoch ms from which it is in effect.
    pub effective_at: i64,
    /// `change` (asked for) or `lapsed` (the fee could not be paid).
    pub reason: String,
}

/// A booked subscription period: one plan for (part of) one month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BookedPeriod {
    /// The month, `YYYY-MM`.
    pub month: String,
    /// The plan id.
    pub plan: String,
    /// Start of the period (epoch ms); the month's start unless the plan began later.
    pub starts_at: i64,
    /// Fee charged, micros (prorated).
    pub fee_micros: i64,
    /// Credits granted, micros (prorated).
    pub credits_micros: i64,
}

/// What [`Ledger::change_plan`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanChange {
    /// The new plan row's id.
    pub account_plan_id: String,
    /// The plan id.
    pub plan: String,
    /// From when (epoch ms).
    pub effective_at: i64,
    /// The period booked now (a change in effect at once), or `None` (a future change is
    /// booked by [`Ledger::renew_subscriptions`] when it takes effect).
    pub booked: Option<BookedPeriod>,
}

impl Ledger {
    pub(super) async fn plan_in_effect(
        &self,
        conn: &mut AnyConnection,
        account_id: &str,
        at: i64,
    ) -> Result<CurrentPlan, BillingError> {
        let row = sqlx::query(
            "SELECT id, plan_id, effective_at FROM account_plans \
             WHERE account_id = $1 AND effective_at <= $2 \
             ORDER BY effective_at DESC, id DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(at)
        .fetch_optional(conn)
        .await?;
        Ok(match row {
            Some(r) => {
                let plan_id: String = r.try_get(1)?;
                CurrentPlan {
                    account_plan_id: Some(r.try_get(0)?),
                    effective_at: r.try_get(2)?,
                    plan: self.plans.resolve(&plan_id).clone(),
                }
            }
            None => CurrentPlan {
                account_plan_id: None,
                effective_at: 0,
                plan: self.plans.default_plan().clone(),
            },
        })
    }

    /// The plan in effect for `account_id` now.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn current_plan(&self, account_id: &str) -> Result<CurrentPlan, BillingError> {
        let mut conn = self.store.pool().acquire().await?;
        self.plan_in_effect(&mut conn, account_id, self.now_ms())
            .await
    }

    /// The rate limits of the plan `account_id` is on now (`None` fields: the
    /// marketplace-wide `[rate_limits]` apply). For the rate limiter of the call path.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn rate_limits_for(&self, account_id: &str) -> Result<PlanRateLimits, BillingError> {
        Ok(self.current_plan(account_id).await?.plan.rate_limits)
    }

    /// The account's plan rows, oldest first (future changes included).
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn plan_history(
        &self,
        account_id: &str,
    ) -> Result<Vec<PlanHistoryEntry>, BillingError> {
        let rows = sqlx::query(
            "SELECT id, plan_id, effective_at, reason FROM account_plans WHERE account_id = $1 \
             ORDER BY effective_at, id",
        )
        .bind(account_id)
        .fetch_all(self.store.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PlanHistoryEntry {
                    id: r.try_get(0)?,
                    plan: r.try_get(1)?,
                    effective_at: r.try_get(2)?,
                    reason: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Puts `account_id` on plan `plan_id` from `effective_at` (epoch ms; `None` = now).
    /// A change in effect now books this month's period at once, in the same
    /// transaction: the fee prorated to the rest of the month is charged from the wallet
    /// (`subscription`), then the prorated included credits are granted
    /// (`included_credits`); the previous plan's fee for this month is not refunded. A
    /// future change is booked when it takes effect ([`Ledger::renew_subscriptions`]).
    ///
    /// # Errors
    /// [`BillingError::UnknownPlan`]; [`BillingError::Invalid`] for a time in the past;
    /// [`BillingError::InsufficientCredits`] when the wallet cannot pay the fee (nothing
    /// changes); [`BillingError::Store`].
    pub async fn change_plan(
        &self,
        account_id: &str,
        plan_id: &str,
        effective_at: Option<i64>,
    ) -> Result<PlanChange, BillingError> {
        let plan = self
            .plans
            .get(plan_id)
            .cloned()
            .ok_or_else(|| BillingError::UnknownPlan(plan_id.chars().take(64).collect()))?;
        let at = self.now_ms();
        let effective_at = effective_at.unwrap_or(at);
        if effective_at < at {
            return Err(BillingError::Invalid(format!(
                "a plan change cannot take effect in the past ({}); give a later time or none for now",
                crate::billing::period::rfc3339(effective_at)
            )));
        }
        let mut tx = self.store.begin().await?;
        lock_ledger_account(&mut tx, self.store.backend(), &wallet_id(account_id)).await?;
        if effective_at <= at
            && self.plan_in_effect(&mut tx, account_id, at).await?.plan.id == plan.id
        {
            return Err(BillingError::Invalid(format!(
                "the account is on the {} plan already",
                plan.name
            )));
        }
        let row_id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO account_plans (id, account_id, plan_id, effective_at, reason, created_at) \
             VALUES ($1, $2, $3, $4, 'change', $5)",
        )
        .bind(&row_id)
        .bind(account_id)
        .bind(&plan.id)
        .bind(effective_at)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                BillingError::Invalid("no such account".into())
            } else {
                e.into()
            }
        })?;
        let booked = if effective_at <= at {
            Some(
                book_period(
                    &mut tx,
                    account_id,
                    &row_id,
                    &plan,
                    Month::of_ms(at),
                    effective_at,
                    at,
                )
                .await?,
            )
        } else {
            None
        };
        tx.commit().await.map_err(StoreError::from)?;
        // Plans set per-account rate limits: cached policies are rebuilt.
        self.store
            .versions()
            .invalidate(crate::store::versions::Domain::Auth);
        Ok(PlanChange {
            account_plan_id: row_id,
            plan: plan.id,
            effective_at,
            booked,
        })
    }

    /// Books this month's subscription period for every account whose plan in effect
    /// has none yet (a new month began, or a future plan change took effect): the fee
    /// (prorated when the plan began this month) from the wallet, then the included
    /// credits. An account whose wallet cannot pay the fee lapses to the default plan
    /// from now (a `lapsed` plan row). Idempotent: a period is booked once per (plan row,
    /// month). Returns how many periods were booked.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn renew_subscriptions(&self) -> Result<usize, BillingError> {
        let at = self.now_ms();
        let month = Month::of_ms(at);
        let mut due: Vec<(String, Option<String>, String, i64)> = Vec::new();
        for r in sqlx::query(
            "SELECT ap.account_id, ap.id, ap.plan_id, ap.effective_at FROM account_plans ap \
             WHERE ap.effective_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM account_plans l WHERE l.account_id = ap.account_id \
                 AND l.effective_at <= $1 \
                 AND (l.effective_at > ap.effective_at OR (l.effective_at = ap.effective_at AND l.id > ap.id))) \
             AND NOT EXISTS (SELECT 1 FROM subscription_periods p WHERE p.account_id = ap.account_id \
                 AND p.account_plan_id = ap.id AND p.month = $2)",
        )
        .bind(at)
        .bind(month.to_string())
        .fetch_all(self.store.pool())
        .await?
        {
            due.push((r.try_get(0)?, Some(r.try_get(1)?), r.try_get(2)?, r.try_get(3)?));
        }
        if self.plans.default_plan().books_money() {
            for r in sqlx::query(
                "SELECT a.id FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM account_plans ap \
                     WHERE ap.account_id = a.id AND ap.effective_at <= $1) \
                 AND NOT EXISTS (SELECT 1 FROM subscription_periods p WHERE p.account_id = a.id \
                     AND p.account_plan_id = '' AND p.month = $2)",
            )
            .bind(at)
            .bind(month.to_string())
            .fetch_all(self.store.pool())
            .await?
            {
                due.push((r.try_get(0)?, None, self.plans.default_plan().id.clone(), 0));
            }
        }
        let mut booked = 0;
        for (account_id, row_id, plan_id, effective_at) in due {
            let plan = self.plans.resolve(&plan_id).clone();
            let row = row_id.unwrap_or_default();
            let mut tx = self.store.begin().await?;
            lock_ledger_account(&mut tx, self.store.backend(), &wallet_id(&account_id)).await?;
            match book_period(&mut tx, &account_id, &row, &plan, month, effective_at, at).await {
                Ok(_) => {
                    tx.commit().await.map_err(StoreError::from)?;
                    // Plans set per-account rate limits: cached policies are rebuilt.
                    self.store
                        .versions()
                        .invalidate(crate::store::versions::Domain::Auth);
                    booked += 1;
                }
                // Booked meanwhile (another replica, a concurrent plan change).
                Err(BillingError::Invalid(_)) => {}
                Err(BillingError::InsufficientCredits { .. }) => {
                    drop(tx);
                    let default = self.plans.default_plan().clone();
                    tracing::warn!(account = %account_id, plan = %plan.id, "plan fee unpaid; the account lapses to the default plan");
                    let mut tx = self.store.begin().await?;
                    lock_ledger_account(&mut tx, self.store.backend(), &wallet_id(&account_id))
                        .await?;
                    let lapse_id = uuid::Uuid::now_v7().to_string();
                    sqlx::query(
                        "INSERT INTO account_plans (id, account_id, plan_id, effective_at, reason, created_at) \
                         VALUES ($1, $2, $3, $4, 'lapsed', $4)",
                    )
                    .bind(&lapse_id)
                    .bind(&account_id)
                    .bind(&default.id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                    book_period(&mut tx, &account_id, &lapse_id, &default, month, at, at).await?;
                    tx.commit().await.map_err(StoreError::from)?;
                    // Plans set per-account rate limits: cached policies are rebuilt.
                    self.store
                        .versions()
                        .invalidate(crate::store::versions::Domain::Auth);
                    booked += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(booked)
    }

    /// The subscription periods booked for `account_id` in `month`, oldest first.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub(crate) async fn periods_of(
        &self,
        conn: &mut AnyConnection,
        account_id: &str,
        month: Month,
    ) -> Result<Vec<(BookedPeriod, String)>, BillingError> {
        let rows = sqlx::query(
            "SELECT plan_id, plan_name, starts_at, fee_micros, credits_micros FROM subscription_periods \
             WHERE account_id = $1 AND month = $2 ORDER BY starts_at, id",
        )
        .bind(account_id)
        .bind(month.to_string())
        .fetch_all(conn)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    BookedPeriod {
                        month: month.to_string(),
                        plan: r.try_get(0)?,
                        starts_at: r.try_get(2)?,
                        fee_micros: r.try_get(3)?,
                        credits_micros: r.try_get(4)?,
                    },
                    r.try_get(1)?,
                ))
            })
            .collect()
    }
}

/// Books one subscription period inside `tx` (the wallet already locked): the fee and
/// credits of `plan` prorated from `starts_at` to the end of `month`, then the period row.
///
/// # Errors
/// [`BillingError::Invalid`] when the period is booked already;
/// [`BillingError::InsufficientCredits`] when the wallet cannot pay the fee.
async fn book_period(
    tx: &mut Tx<'_>,
    account_id: &str,
    account_plan_id: &str,
    plan: &Plan,
    month: Month,
    starts_at: i64,
    at: i64,
) -> Result<BookedPeriod, BillingError> {
    let booked = sqlx::query(
        "SELECT id FROM subscription_periods WHERE account_id = $1 AND account_plan_id = $2 AND month = $3",
    )
    .bind(account_id)
    .bind(account_plan_id)
    .bind(month.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    if booked.is_some() {
        return Err(BillingError::Invalid(format!(
            "the {month} period of this plan is booked already"
        )));
    }
    let starts_at = starts_at.max(month.start_ms());
    let fee = prorate(
        plan.monthly_fee_micros,
        month.start_ms(),
        month.end_ms(),
        starts_at,
    );
    let credits = prorate(
        plan.included_credits_micros,
        month.start_ms(),
        month.end_ms(),
        starts_at,
    );
    let wallet = wallet_id(account_id);
    let mut fee_transfer = None;
    if fee > 0 {
        debit_wallet(tx, account_id, fee, at, None).await?;
        let id = insert_transfer(
            tx,
            "subscription",
            None,
            fee,
            &format!("{} plan, {month}", plan.name),
            at,
        )
        .await?;
        write_entries(tx, &id, &[(&wallet, -fee), (PLATFORM_REVENUE, fee)], |a| {
            a != wallet
        })
        .await?;
        fee_transfer = Some(id.0);
    }
    let mut credits_transfer = None;
    if credits > 0 {
        let id = post_transfer(
            tx,
            "included_credits",
            None,
            credits,
            &[(&wallet, credits), (PLATFORM_INCLUDED_CREDITS, -credits)],
            &format!("{} plan credits, {month}", plan.name),
            at,
        )
        .await?;
        rearm_low_balance(tx, &wallet).await?;
        credits_transfer = Some(id);
    }
    sqlx::query(
        "INSERT INTO subscription_periods (id, account_id, account_plan_id, month, plan_id, plan_name, \
         starts_at, fee_micros, credits_micros, fee_transfer_id, credits_transfer_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(account_id)
    .bind(account_plan_id)
    .bind(month.to_string())
    .bind(&plan.id)
    .bind(&plan.name)
    .bind(starts_at)
    .bind(fee)
    .bind(credits)
    .bind(fee_transfer)
    .bind(credits_transfer)
    .bind(at)
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            BillingError::Invalid(format!("the {month} period of this plan is booked already"))
        } else {
            e.into()
        }
    })?;
    Ok(BookedPeriod {
        month: month.to_string(),
        plan: plan.id.clone(),
        starts_at,
        fee_micros: fee,
        credits_micros: credits,
    })
}
