//! Creator payouts (issue 6 item 4).
//!
//! `billing payouts --month M` ([`run`]) pays each creator, once per closed month, the
//! earnings of their calls settled before the month's end that no earlier payout
//! consumed, plus the sub-cent remainder the previous payout carried forward — nothing
//! is deducted (the platform's 30 % was split off at each settle). Two rules hold money
//! back, and carry it forward to the next month's payout:
//! - payouts are whole cents (what PayPal and Stripe can send): the remainder below a
//!   cent is carried;
//! - a payout below the threshold (`[billing] payout_threshold`, default
//!   [`super::DEFAULT_PAYOUT_THRESHOLD_MICROS`]: 10 USD, where transfer fees stop eating a
//!   noticeable share), or to a creator without a payout destination, is held.
//!
//! Each paid payout is a `payout` transfer earnings → `external:payouts` and a row that
//! records the earnings it consumed (`[earned_from, earned_to)`) and the remainders in
//! and out, so `ledger verify` proves every payout equals the earnings it consumed. One
//! row per (creator, month), unique in the database: running the month again pays
//! nothing twice and rewrites the same batch files.
//!
//! The batch files: PayPal Payouts' CSV upload (no header; recipient, amount, currency,
//! customer id, note, wallet) and one row per Stripe Connect transfer with the
//! parameters of `POST /v1/transfers` (destination, amount in cents, currency,
//! description, transfer_group) plus an idempotency key. The reference of a payout is
//! stable (`mkt-YYYYMM-` + 16 hex of the account id's SHA-256, 27 characters, within
//! PayPal's 30), so a file uploaded twice can be recognised.

use sha2::{Digest, Sha256};
use sqlx::Row;

use super::invoices::month_closed_at;
use super::ledger::{BillingError, CENT_MICROS, Ledger};
use super::period::Month;
use crate::store::{StoreError, is_unique_violation};

/// Where a creator is paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayoutMethod {
    /// A PayPal account, by email.
    Paypal,
    /// A Stripe connected account (`acct_…`).
    Stripe,
}

impl PayoutMethod {
    /// `paypal` or `stripe`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paypal => "paypal",
            Self::Stripe => "stripe",
        }
    }
}

/// Records where `account_id` is paid: a PayPal email or a Stripe connected account id.
///
/// # Errors
/// [`BillingError::Invalid`] for a malformed destination or unknown account;
/// [`BillingError::Store`].
pub async fn set_payee(
    ledger: &Ledger,
    account_id: &str,
    method: PayoutMethod,
    destination: &str,
) -> Result<(), BillingError> {
    let d = destination.trim();
    let ok = match method {
        PayoutMethod::Paypal => {
            d.len() <= 254
                && d.split_once('@').is_some_and(|(user, host)| {
                    !user.is_empty() && host.contains('.') && !host.starts_with('.')
                })
                && !d.chars().any(|c| c.is_whitespace() || c == ',' || c == '"')
        }
        PayoutMethod::Stripe => {
            d.len() <= 64
                && d.strip_prefix("acct_").is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric())
                })
        }
    };
    if !ok {
        return Err(BillingError::Invalid(match method {
            PayoutMethod::Paypal => "a PayPal payee is an email address".into(),
            PayoutMethod::Stripe => "a Stripe payee is a connected account id (acct_…)".into(),
        }));
    }
    sqlx::query(
        "INSERT INTO payees (account_id, method, destination, updated_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (account_id) DO UPDATE SET method = $2, destination = $3, updated_at = $4",
    )
    .bind(account_id)
    .bind(method.as_str())
    .bind(d)
    .bind(ledger.now_ms())
    .execute(ledger.store().pool())
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.message().to_lowercase().contains("foreign key") => {
            BillingError::Invalid("no such account".into())
        }
        _ => e.into(),
    })?;
    Ok(())
}

/// One creator's payout for a month. Money in micros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PayoutLine {
    /// Account name.
    pub account: String,
    /// Account id.
    pub account_id: String,
    /// `paid` or `held`.
    pub status: String,
    /// Why held: `below_threshold` or `no_payee`; empty when paid.
    pub reason: String,
    /// Paid (whole cents); 0 when held.
    pub amount_micros: i64,
    /// Earnings of calls settled in the consumed range.
    pub earned_micros: i64,
    /// Remainder carried in from the previous payout.
    pub carried_in_micros: i64,
    /// Carried to the next payout (the sub-cent remainder, or everything when held).
    pub carried_out_micros: i64,
    /// `paypal` or `stripe`, when paid or known.
    pub method: Option<String>,
    /// The PayPal email or Stripe account.
    pub destination: Option<String>,
    /// The stable payout reference.
    pub reference: String,
    /// False when an earlier run of the month booked it (this run changed nothing).
    pub new: bool,
}

/// The payouts of one month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PayoutRun {
    /// `YYYY-MM`.
    pub month: String,
    /// One line per creator with earnings, by account name.
    pub payouts: Vec<PayoutLine>,
    /// Paid in total, micros.
    pub paid_micros: i64,
    /// Carried forward in total, micros.
    pub carried_micros: i64,
    /// Payouts booked by this run.
    pub new_payouts: usize,
}

/// The stable reference of `account_id`'s payout for `month` (≤ 30 characters, no spaces).
pub fn reference(account_id: &str, month: Month) -> String {
    let digest = hex::encode(Sha256::digest(account_id.as_bytes()));
    format!("mkt-{}-{}", month.compact(), &digest[..16])
}

const LINE_SQL: &str = "SELECT a.name, p.account_id, p.status, p.reason, p.amount_micros, p.earned_micros, \
     p.carried_in_micros, p.carried_out_micros, p.method, p.destination, p.reference \
     FROM payouts p JOIN accounts a ON a.id = p.account_id";

fn line(r: &sqlx::any::AnyRow, new: bool) -> Result<PayoutLine, BillingError> {
    Ok(PayoutLine {
        account: r.try_get(0)?,
        account_id: r.try_get(1)?,
        status: r.try_get(2)?,
        reason: r.try_get(3)?,
        amount_micros: r.try_get(4)?,
        earned_micros: r.try_get(5)?,
        carried_in_micros: r.try_get(6)?,
        carried_out_micros: r.try_get(7)?,
        method: r.try_get(8)?,
        destination: r.try_get(9)?,
        reference: r.try_get(10)?,
        new,
    })
}

/// Runs the payouts of closed `month` with `threshold_micros`: books each payable
/// creator's payout and records each held one. Idempotent per (creator, month).
///
/// # Errors
/// [`BillingError::MonthNotClosed`]; [`BillingError::Store`].
pub async fn run(
    ledger: &Ledger,
    month: Month,
    threshold_micros: i64,
) -> Result<PayoutRun, BillingError> {
    if month_closed_at(ledger, month).await?.is_none() {
        return Err(BillingError::MonthNotClosed(month.to_string()));
    }
    let end = month.end_ms();
    let mut payouts = Vec::new();
    for creator in ledger.creators_before(end).await? {
        if let Some(l) = pay_one(ledger, &creator, month, threshold_micros).await? {
            payouts.push(l);
        }
    }
    payouts.sort_by(|a, b| a.account.cmp(&b.account));
    Ok(PayoutRun {
        month: month.to_string(),
        paid_micros: payouts.iter().map(|p| p.amount_micros).sum(),
        carried_micros: payouts.iter().map(|p| p.carried_out_micros).sum(),
        new_payouts: payouts
            .iter()
            .filter(|p| p.new && p.status == "paid")
            .count(),
        payouts,
    })
}

async fn existing(
    conn: &mut sqlx::AnyConnection,
    creator: &str,
    month: Month,
) -> Result<Option<PayoutLine>, BillingError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{LINE_SQL} WHERE p.account_id = $1 AND p.month = $2"
    )))
    .bind(creator)
    .bind(month.to_string())
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(|r| line(r, false)).transpose()
}

async fn pay_one(
    ledger: &Ledger,
    creator: &str,
    month: Month,
    threshold_micros: i64,
) -> Result<Option<PayoutLine>, BillingError> {
    let at = ledger.now_ms();
    let end = month.end_ms();
    let mut tx = ledger.store().begin().await?;
    // Serializes payouts of one creator, so two runs cannot consume the same earnings.
    ledger.lock_earnings(&mut tx, creator).await?;
    if let Some(l) = existing(&mut tx, creator, month).await? {
        return Ok(Some(l));
    }
    let last = sqlx::query(
        "SELECT earned_to, carried_out_micros FROM payouts WHERE account_id = $1 AND status = 'paid' \
         ORDER BY earned_to DESC LIMIT 1",
    )
    .bind(creator)
    .fetch_optional(&mut *tx)
    .await?;
    let (from, carried_in): (i64, i64) = match last {
        Some(r) => (r.try_get(0)?, r.try_get(1)?),
        None => (0, 0),
    };
    if from >= end {
        // A later month was paid already; its payout consumed these earnings.
        return Ok(None);
    }
    let earned = Ledger::earnings_between(&mut tx, creator, from, end).await?;
    let available = carried_in + earned;
    if available == 0 {
        return Ok(None);
    }
    let payable = available - available % CENT_MICROS;
    let payee = sqlx::query("SELECT method, destination FROM payees WHERE account_id = $1")
        .bind(creator)
        .fetch_optional(&mut *tx)
        .await?;
    let payee: Option<(String, String)> = match payee {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        None => None,
    };
    let reason = if payee.is_none() {
        "no_payee"
    } else if payable < threshold_micros.max(CENT_MICROS) {
        "below_threshold"
    } else {
        ""
    };
    let paid = reason.is_empty();
    let transfer = if paid {
        Some(
            ledger
                .book_payout_in(
                    &mut tx,
                    creator,
                    payable,
                    &format!("payout {month} {}", reference(creator, month)),
                    at,
                )
                .await?,
        )
    } else {
        None
    };
    let (method, destination) = payee.unzip();
    let inserted = sqlx::query(
        "INSERT INTO payouts (id, account_id, month, status, reason, amount_micros, earned_micros, \
         carried_in_micros, carried_out_micros, earned_from, earned_to, method, destination, reference, \
         transfer_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(creator)
    .bind(month.to_string())
    .bind(if paid { "paid" } else { "held" })
    .bind(reason)
    .bind(if paid { payable } else { 0 })
    .bind(earned)
    .bind(carried_in)
    .bind(if paid { available - payable } else { available })
    .bind(from)
    .bind(end)
    .bind(&method)
    .bind(&destination)
    .bind(reference(creator, month))
    .bind(&transfer)
    .bind(at)
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            // Another run booked it first; this transaction (and its transfer) rolls back.
            drop(tx);
            let mut conn = ledger.store().pool().acquire().await?;
            return existing(&mut conn, creator, month).await;
        }
        Err(e) => return Err(e.into()),
    }
    let l = existing(&mut tx, creator, month).await?.map(|mut l| {
        l.new = true;
        l
    });
    tx.commit().await.map_err(StoreError::from)?;
    Ok(l)
}

/// The payouts recorded for `month`, by account name.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn of_month(ledger: &Ledger, month: Month) -> Result<Vec<PayoutLine>, BillingError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{LINE_SQL} WHERE p.month = $1"
    )))
    .bind(month.to_string())
    .fetch_all(ledger.store().pool())
    .await?;
    let mut out = rows
        .iter()
        .map(|r| line(r, false))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.account.cmp(&b.account));
    Ok(out)
}

fn cents(micros: i64) -> i64 {
    micros / CENT_MICROS
}

fn dollars(micros: i64) -> String {
    let c = cents(micros);
    format!("{}.{:02}", c / 100, c % 100)
}

/// The PayPal Payouts batch (web upload CSV, no header row): `email,amount,USD,reference,
/// note,PAYPAL` for every paid payout to a PayPal payee.
pub fn paypal_csv(month: Month, payouts: &[PayoutLine]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    for p in payouts
        .iter()
        .filter(|p| p.status == "paid" && p.method.as_deref() == Some("paypal"))
    {
        // Writing to a Vec cannot fail.
        let _ = w.write_record([
            p.destination.clone().unwrap_or_default(),
            dollars(p.amount_micros),
            "USD".into(),
            p.reference.clone(),
            format!("mcp-marketplace earnings {month}"),
            "PAYPAL".into(),
        ]);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// The Stripe Connect batch: a header row of `POST /v1/transfers` parameters
/// (`destination,amount,currency,description,transfer_group`, amount in cents) plus
/// `idempotency_key`, then every paid payout to a Stripe payee.
pub fn stripe_csv(month: Month, payouts: &[PayoutLine]) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = w.write_record([
        "destination",
        "amount",
        "currency",
        "description",
        "transfer_group",
        "idempotency_key",
    ]);
    for p in payouts
        .iter()
        .filter(|p| p.status == "paid" && p.method.as_deref() == Some("stripe"))
    {
        let _ = w.write_record([
            p.destination.clone().unwrap_or_default(),
            cents(p.amount_micros).to_string(),
            "usd".into(),
            format!("mcp-marketplace earnings {month}"),
            format!("mcp-marketplace-{month}"),
            p.reference.clone(),
        ]);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_fit_paypal_customer_ids() {
        let r = reference(
            "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            "2026-11".parse().unwrap(),
        );
        assert!(r.starts_with("mkt-202611-"));
        assert!(r.len() <= 30 && !r.contains(' '));
    }

    #[test]
    fn batch_files_have_the_providers_shapes() {
        let month: Month = "2026-11".parse().unwrap();
        let line = |method: &str, dest: &str, amount: i64| PayoutLine {
            account: "a".into(),
            account_id: "id".into(),
            status: "paid".into(),
            reason: String::new(),
            amount_micros: amount,
            earned_micros: amount,
            carried_in_micros: 0,
            carried_out_micros: 0,
            method: Some(method.into()),
            destination: Some(dest.into()),
            reference: "mkt-202611-0123456789abcdef".into(),
            new: true,
        };
        let lines = [
            line("paypal", "ann@example.com", 12_340_000),
            line("stripe", "acct_123", 7_050_000),
        ];
        assert_eq!(
            paypal_csv(month, &lines),
            "ann@example.com,12.34,USD,mkt-202611-0123456789abcdef,mcp-marketplace earnings 2026-11,PAYPAL\n"
        );
        assert_eq!(
            stripe_csv(month, &lines),
            "destination,amount,currency,description,transfer_group,idempotency_key\n\
             acct_123,705,usd,mcp-marketplace earnings 2026-11,mcp-marketplace-2026-11,mkt-202611-0123456789abcdef\n"
        );
    }
}
