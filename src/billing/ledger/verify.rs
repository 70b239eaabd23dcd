//! `ledger verify`: every invariant of the ledger and of what is reconciled against it
//! (quotas, plans, payouts, payments, invoices).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use super::{BALANCE_SQL, BillingError, HOLDS, Ledger, scalar};
use crate::billing::period::{Month, rfc3339};

impl Ledger {
    /// Checks every invariant and returns the broken ones (empty when all hold):
    ///
    /// - DESIGN.md "Ledger": entries sum to zero overall and per transfer; every balance
    ///   equals the sum of its entries; the balances of all ledger accounts sum to zero
    ///   (the external accounts balance everything: no money created or lost); `holds`
    ///   equals the open reservations; no wallet is negative; every call has one reserve
    ///   and at most one of settle/refund, matching its status;
    /// - quotas: every monthly usage counter equals the calls it counts;
    /// - spend limits: every key's spend counter of a day or a month equals the
    ///   non-refunded prices of the key's calls made in it, and every period in which a
    ///   key spent has its counter when the key limits that period;
    /// - plans: every subscription period's fee and credits equal their transfers, and
    ///   every subscription or included-credits transfer belongs to a period;
    /// - payouts: every payout equals the earnings it consumed plus the sub-cent
    ///   remainder carried in, minus the remainder carried out, and the chain of a
    ///   creator's payouts has no gap or overlap; every payout transfer has its payout;
    /// - payments: every Stripe payment was credited by one top-up of its amount and
    ///   reversed by transfers summing to its reversed amount;
    /// - invoices: every stored invoice's totals equal the ledger's transfers of its month,
    ///   its balances reconcile, and regenerating it yields the same bytes.
    ///
    /// # Errors
    /// [`BillingError::Store`].
    pub async fn verify(&self) -> Result<Vec<String>, BillingError> {
        let mut broken = self.verify_core().await?;
        broken.extend(self.verify_counters().await?);
        broken.extend(self.verify_key_spend().await?);
        broken.extend(self.verify_subscriptions().await?);
        broken.extend(self.verify_payouts().await?);
        broken.extend(self.verify_payments().await?);
        broken.extend(crate::billing::invoices::verify(self).await?);
        Ok(broken)
    }

    async fn verify_core(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        let total: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger_entries")
                .fetch_one(pool)
                .await?
                .try_get(0)?;
        if total != 0 {
            broken.push(format!("entries sum to {total} micros, not zero"));
        }
        for row in sqlx::query(
            "SELECT transfer_id FROM ledger_entries GROUP BY transfer_id HAVING SUM(amount) <> 0",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            broken.push(format!("transfer {id} does not sum to zero"));
        }
        for row in sqlx::query(
            "SELECT a.id, a.balance, CAST(COALESCE(e.total, 0) AS BIGINT) FROM ledger_accounts a \
             LEFT JOIN (SELECT ledger_account_id, SUM(amount) AS total FROM ledger_entries \
                        GROUP BY ledger_account_id) e ON e.ledger_account_id = a.id \
             WHERE a.balance <> COALESCE(e.total, 0)",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let balance: i64 = row.try_get(1)?;
            let sum: i64 = row.try_get(2)?;
            broken.push(format!(
                "{id}: balance {balance} but its entries sum to {sum}"
            ));
        }
        let balances: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(balance), 0) AS BIGINT) FROM ledger_accounts")
                .fetch_one(pool)
                .await?
                .try_get(0)?;
        if balances != 0 {
            broken.push(format!(
                "the balances of all ledger accounts sum to {balances} micros, not zero: money was created or lost"
            ));
        }
        let holds = scalar(pool, BALANCE_SQL, HOLDS).await?;
        let open: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls WHERE status = 'reserved'",
        )
        .fetch_one(pool)
        .await?
        .try_get(0)?;
        if holds != open {
            broken.push(format!(
                "holds is {holds} but open reservations sum to {open}"
            ));
        }
        for row in sqlx::query(
            "SELECT id, balance FROM ledger_accounts WHERE kind = 'wallet' AND balance < 0",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let balance: i64 = row.try_get(1)?;
            broken.push(format!("{id} is negative: {balance}"));
        }
        for row in sqlx::query(
            "SELECT c.id, c.status, \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'reserve') AS BIGINT), \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'settle') AS BIGINT), \
               CAST((SELECT COUNT(*) FROM ledger_transfers t WHERE t.call_id = c.id AND t.kind = 'refund') AS BIGINT) \
             FROM calls c",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let status: String = row.try_get(1)?;
            let (reserve, settle, refund): (i64, i64, i64) =
                (row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
            let consistent = reserve == 1
                && match status.as_str() {
                    "reserved" => settle == 0 && refund == 0,
                    "settled" => settle == 1 && refund == 0,
                    "refunded" => settle == 0 && refund == 1,
                    _ => false,
                };
            if !consistent {
                broken.push(format!(
                    "call {id} ({status}) has {reserve} reserve, {settle} settle, {refund} refund transfers"
                ));
            }
        }
        Ok(broken)
    }

    async fn verify_counters(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        let mut counted = (0i64, 0i64);
        for row in sqlx::query("SELECT account_id, month, calls, spent_micros FROM usage_counters")
            .fetch_all(pool)
            .await?
        {
            let account: String = row.try_get(0)?;
            let month_text: String = row.try_get(1)?;
            let (calls, spent): (i64, i64) = (row.try_get(2)?, row.try_get(3)?);
            counted.0 += calls;
            counted.1 += spent;
            let Ok(month) = month_text.parse::<Month>() else {
                broken.push(format!(
                    "usage counter of {account} has a bad month '{month_text}'"
                ));
                continue;
            };
            let actual = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls \
                 WHERE account_id = $1 AND status <> 'refunded' AND created_at >= $2 AND created_at < $3",
            )
            .bind(&account)
            .bind(month.start_ms())
            .bind(month.end_ms())
            .fetch_one(pool)
            .await?;
            let (n, sum): (i64, i64) = (actual.try_get(0)?, actual.try_get(1)?);
            if (n, sum) != (calls, spent) {
                broken.push(format!(
                    "usage counter of {account} for {month} says {calls} calls / {spent} micros, the calls say {n} / {sum}"
                ));
            }
        }
        let all = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(price_micros), 0) AS BIGINT) FROM calls \
             WHERE status <> 'refunded'",
        )
        .fetch_one(pool)
        .await?;
        let all: (i64, i64) = (all.try_get(0)?, all.try_get(1)?);
        if all != counted {
            broken.push(format!(
                "usage counters hold {} calls / {} micros, the calls {} / {}",
                counted.0, counted.1, all.0, all.1
            ));
        }
        Ok(broken)
    }

    /// The key spend counters against the calls: one grouped read of the calls (per key
    /// and UTC day, gathered into months here), one of the counters, one of the keys'
    /// limits.
    async fn verify_key_spend(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut expected: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
        for row in sqlx::query(
            "SELECT key_id, created_at - created_at % 86400000, \
             CAST(SUM(price_micros) AS BIGINT) FROM calls \
             WHERE status <> 'refunded' AND price_micros > 0 \
             GROUP BY key_id, created_at - created_at % 86400000",
        )
        .fetch_all(pool)
        .await?
        {
            let (key, day, sum): (String, i64, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let month = Month::of_ms(day).start_ms();
            *expected
                .entry((key.clone(), "month".into(), month))
                .or_default() += sum;
            expected.insert((key, "day".into(), day), sum);
        }
        let mut broken = Vec::new();
        for row in
            sqlx::query("SELECT key_id, period, period_start, spent_micros FROM key_spend_counters")
                .fetch_all(pool)
                .await?
        {
            let (key, period, start, spent): (String, String, i64, i64) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            );
            let sum = expected
                .remove(&(key.clone(), period.clone(), start))
                .unwrap_or(0);
            if spent != sum {
                broken.push(format!(
                    "spend counter of key {key} for the {period} from {} says {spent} micros, \
                     the calls say {sum}",
                    rfc3339(start)
                ));
            }
        }
        // What is left had no counter: fine for a period the key does not limit.
        let mut limited = BTreeSet::new();
        for row in sqlx::query(
            "SELECT id, CAST(CASE WHEN daily_limit_micros IS NULL THEN 0 ELSE 1 END AS BIGINT), \
             CAST(CASE WHEN monthly_limit_micros IS NULL THEN 0 ELSE 1 END AS BIGINT) \
             FROM api_keys WHERE daily_limit_micros IS NOT NULL OR monthly_limit_micros IS NOT NULL",
        )
        .fetch_all(pool)
        .await?
        {
            let key: String = row.try_get(0)?;
            for (column, period) in [(1, "day"), (2, "month")] {
                if row.try_get::<i64, _>(column)? == 1 {
                    limited.insert((key.clone(), period.to_owned()));
                }
            }
        }
        for ((key, period, start), sum) in expected {
            if limited.contains(&(key.clone(), period.clone())) {
                broken.push(format!(
                    "key {key} spent {sum} micros in the {period} from {} without a spend counter",
                    rfc3339(start)
                ));
            }
        }
        Ok(broken)
    }

    async fn verify_subscriptions(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        for row in sqlx::query(
            "SELECT p.id, p.account_id, p.month, p.fee_micros, p.credits_micros, \
               f.kind, CAST(COALESCE(f.amount, -1) AS BIGINT), \
               c.kind, CAST(COALESCE(c.amount, -1) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e \
                     WHERE e.transfer_id = p.fee_transfer_id AND e.ledger_account_id = 'wallet:' || p.account_id) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e \
                     WHERE e.transfer_id = p.credits_transfer_id AND e.ledger_account_id = 'wallet:' || p.account_id) AS BIGINT) \
             FROM subscription_periods p \
             LEFT JOIN ledger_transfers f ON f.id = p.fee_transfer_id \
             LEFT JOIN ledger_transfers c ON c.id = p.credits_transfer_id",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let account: String = row.try_get(1)?;
            let month: String = row.try_get(2)?;
            let fee: i64 = row.try_get(3)?;
            let credits: i64 = row.try_get(4)?;
            let fee_kind: Option<String> = row.try_get(5)?;
            let fee_amount: i64 = row.try_get(6)?;
            let credits_kind: Option<String> = row.try_get(7)?;
            let credits_amount: i64 = row.try_get(8)?;
            let fee_entry: i64 = row.try_get(9)?;
            let credits_entry: i64 = row.try_get(10)?;
            let fee_ok = if fee == 0 {
                fee_kind.is_none()
            } else {
                fee_kind.as_deref() == Some("subscription")
                    && fee_amount == fee
                    && fee_entry == -fee
            };
            let credits_ok = if credits == 0 {
                credits_kind.is_none()
            } else {
                credits_kind.as_deref() == Some("included_credits")
                    && credits_amount == credits
                    && credits_entry == credits
            };
            if !fee_ok || !credits_ok {
                broken.push(format!(
                    "subscription period {id} of {account} for {month} (fee {fee}, credits {credits}) \
                     does not match its transfers ({fee_amount}, {credits_amount})"
                ));
            }
        }
        for row in sqlx::query(
            "SELECT t.id, t.kind FROM ledger_transfers t WHERE t.kind IN ('subscription', 'included_credits') \
             AND NOT EXISTS (SELECT 1 FROM subscription_periods p WHERE p.fee_transfer_id = t.id OR p.credits_transfer_id = t.id)",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            let kind: String = row.try_get(1)?;
            broken.push(format!("{kind} transfer {id} belongs to no subscription period"));
        }
        Ok(broken)
    }

    async fn verify_payouts(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        let rows = sqlx::query(
            "SELECT p.id, p.account_id, p.amount_micros, p.earned_micros, p.carried_in_micros, \
               p.carried_out_micros, p.earned_from, p.earned_to, CAST(COALESCE(t.amount, -1) AS BIGINT), t.kind, \
               CAST((SELECT COALESCE(SUM(e.amount), 0) FROM ledger_entries e \
                     WHERE e.transfer_id = p.transfer_id AND e.ledger_account_id = 'earnings:' || p.account_id) AS BIGINT) \
             FROM payouts p LEFT JOIN ledger_transfers t ON t.id = p.transfer_id \
             WHERE p.status = 'paid' ORDER BY p.account_id, p.earned_to",
        )
        .fetch_all(pool)
        .await?;
        let mut conn = pool.acquire().await?;
        let mut previous: Option<(String, i64, i64)> = None;
        for row in rows {
            let id: String = row.try_get(0)?;
            let account: String = row.try_get(1)?;
            let amount: i64 = row.try_get(2)?;
            let earned: i64 = row.try_get(3)?;
            let carried_in: i64 = row.try_get(4)?;
            let carried_out: i64 = row.try_get(5)?;
            let from: i64 = row.try_get(6)?;
            let to: i64 = row.try_get(7)?;
            let transfer_amount: i64 = row.try_get(8)?;
            let transfer_kind: Option<String> = row.try_get(9)?;
            let earnings_entry: i64 = row.try_get(10)?;
            let (expected_from, expected_carry) = match &previous {
                Some((a, to, carry)) if *a == account => (*to, *carry),
                _ => (0, 0),
            };
            if from != expected_from || carried_in != expected_carry {
                broken.push(format!(
                    "payout {id} of {account} starts at {from} carrying {carried_in}, \
                     but the previous payout ended at {expected_from} carrying {expected_carry}"
                ));
            }
            let consumed = Self::earnings_between(&mut conn, &account, from, to).await?;
            if consumed != earned || amount + carried_out != carried_in + earned {
                broken.push(format!(
                    "payout {id} of {account}: {amount} paid + {carried_out} carried out ≠ \
                     {carried_in} carried in + {earned} earned (the ledger says {consumed} was earned)"
                ));
            }
            if transfer_kind.as_deref() != Some("payout")
                || transfer_amount != amount
                || earnings_entry != -amount
            {
                broken.push(format!(
                    "payout {id} of {account} ({amount} micros) does not match its transfer ({transfer_amount})"
                ));
            }
            previous = Some((account, to, carried_out));
        }
        // SQLite has one connection: give it back before the next query.
        drop(conn);
        for row in sqlx::query(
            "SELECT t.id FROM ledger_transfers t WHERE t.kind = 'payout' \
             AND NOT EXISTS (SELECT 1 FROM payouts p WHERE p.transfer_id = t.id)",
        )
        .fetch_all(pool)
        .await?
        {
            let id: String = row.try_get(0)?;
            broken.push(format!("payout transfer {id} belongs to no payout"));
        }
        Ok(broken)
    }

    async fn verify_payments(&self) -> Result<Vec<String>, BillingError> {
        let pool = self.store.pool();
        let mut broken = Vec::new();
        for row in sqlx::query(
            "SELECT p.payment_key, p.amount_micros, p.reversed_micros, t.kind, CAST(COALESCE(t.amount, -1) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(r.amount_micros), 0) FROM stripe_reversals r WHERE r.payment_key = p.payment_key) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(rt.amount), 0) FROM stripe_reversals r JOIN ledger_transfers rt ON rt.id = r.transfer_id \
                     WHERE r.payment_key = p.payment_key AND rt.kind = 'reversal') AS BIGINT) \
             FROM stripe_payments p LEFT JOIN ledger_transfers t ON t.id = p.credit_transfer_id",
        )
        .fetch_all(pool)
        .await?
        {
            let key: String = row.try_get(0)?;
            let amount: i64 = row.try_get(1)?;
            let reversed: i64 = row.try_get(2)?;
            let kind: Option<String> = row.try_get(3)?;
            let credited: i64 = row.try_get(4)?;
            let reversals: i64 = row.try_get(5)?;
            let reversal_transfers: i64 = row.try_get(6)?;
            let credit_ok = match kind.as_deref() {
                Some("topup") => credited == amount,
                None => amount == 0,
                _ => false,
            };
            if !credit_ok {
                broken.push(format!(
                    "payment {key} of {amount} micros was credited {credited}"
                ));
            }
            if reversals != reversed || reversal_transfers != reversed || reversed > amount {
                broken.push(format!(
                    "payment {key}: {reversed} micros reversed, its reversal transfers sum to {reversal_transfers}"
                ));
            }
        }
        Ok(broken)
    }
}
