//! Monthly invoices (issue 6 item 3) and the closing of a month (item 7).
//!
//! An invoice covers one account and one UTC month `[start, end)`: the plan fees booked
//! that month, one usage line per (server, tool, unit price) of the calls charged that
//! month, one zero-charge line per (server, tool, unit price) of the calls refunded, the
//! credits that came in (top-ups, included credits) or went out (reversed payments),
//! totals, and the opening and closing balance.
//!
//! Rules, so every figure is a sum of ledger transfers:
//! - a call belongs to the month in which it was settled or refunded (its transfer's
//!   time), so a call made at 23:59:59.999 on the last day and answered after midnight is
//!   on the next month's invoice — the month in which it was charged;
//! - a balance is the wallet plus what was on hold for calls in flight at that instant,
//!   so it moves only by credits, fees and charges:
//!   closing = opening + credits + included credits − reversals + adjustments − total.
//!
//! `billing close --month` ([`close_month`]) may run once the month has ended
//! ([`CLOSE_GRACE_MS`] later, so no transaction stamped inside the month is still in
//! flight). It stores each account's invoice once, as JSON, CSV and HTML, and never
//! changes it (database triggers). Rendering is a pure function of the ledger's records
//! of the month and the close time, so regenerating a closed month's invoice yields the
//! same bytes — which `ledger verify` checks.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};

use super::ledger::{BillingError, Ledger};
use super::period::{Month, rfc3339};
use super::pricing::format_usd;
use crate::store::{StoreError, is_unique_violation};

/// How long after a month's end it may be closed (5 minutes): longer than any
/// transaction stamped inside the month can still be running.
pub const CLOSE_GRACE_MS: i64 = 5 * 60_000;

/// One charge line of an invoice. Money in micros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InvoiceLine {
    /// `subscription`, `usage` or `refunded` (calls not charged: amount 0).
    pub kind: String,
    /// What it is, e.g. `units__convert` or `Pro plan, 2026-11-15 to 2026-12-01`.
    pub description: String,
    /// Server slug (usage and refunded lines).
    pub server: Option<String>,
    /// Tool (usage and refunded lines).
    pub tool: Option<String>,
    /// Number of calls (1 for a subscription).
    pub quantity: i64,
    /// Price per call (or the fee).
    pub unit_price_micros: i64,
    /// quantity × unit price, or 0 for refunded calls.
    pub amount_micros: i64,
}

/// Money that came into or left the wallet other than charges. Micros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreditLine {
    /// `topup`, `included_credits`, `reversal` or `adjustment`.
    pub kind: String,
    /// The transfer's memo (e.g. `Stripe payment pi_…`, `credits grant`).
    pub description: String,
    /// When (RFC 3339).
    pub date: String,
    /// Into the wallet > 0, out < 0.
    pub amount_micros: i64,
}

/// An invoice's totals, micros.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Plan fees.
    pub subscription_micros: i64,
    /// Calls charged.
    pub usage_micros: i64,
    /// subscription + usage.
    pub total_micros: i64,
    /// Top-ups and grants.
    pub credits_added_micros: i64,
    /// Credits included with plans.
    pub included_credits_micros: i64,
    /// Payments reversed (refunds and disputes at the payment provider), as a positive number.
    pub reversed_micros: i64,
    /// Adjustments (either sign).
    pub adjustments_micros: i64,
    /// Calls charged.
    pub settled_calls: i64,
    /// Calls refunded.
    pub refunded_calls: i64,
}

/// One account's invoice for one month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invoice {
    /// `INV-YYYYMM-ACCOUNT`.
    pub number: String,
    /// `final` (stored at close) or `draft` (the month is not closed).
    pub status: String,
    /// Account name.
    pub account: String,
    /// Account id.
    pub account_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// The month's first instant (RFC 3339, UTC).
    pub period_start: String,
    /// The next month's first instant.
    pub period_end: String,
    /// Always `USD`.
    pub currency: String,
    /// Wallet + holds at the start, micros.
    pub opening_balance_micros: i64,
    /// Charges.
    pub lines: Vec<InvoiceLine>,
    /// Credits in and out.
    pub credits: Vec<CreditLine>,
    /// Totals.
    pub totals: Totals,
    /// Wallet + holds at the end, micros.
    pub closing_balance_micros: i64,
    /// When the month was closed (RFC 3339); `None` for a draft.
    pub closed_at: Option<String>,
}

impl Invoice {
    /// True when nothing happened and nothing is held: no invoice is stored for it.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
            && self.credits.is_empty()
            && self.opening_balance_micros == 0
            && self.closing_balance_micros == 0
    }
}

/// The three renderings of an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedInvoice {
    /// Pretty JSON with a final newline.
    pub json: String,
    /// CSV (RFC 4180), one row per line, credit and total.
    pub csv: String,
    /// A printable HTML page.
    pub html: String,
}

/// An invoice format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceFormat {
    /// `application/json`.
    Json,
    /// `text/csv`.
    Csv,
    /// `text/html`.
    Html,
}

impl std::str::FromStr for InvoiceFormat {
    type Err = BillingError;
    fn from_str(s: &str) -> Result<Self, BillingError> {
        match s {
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            "html" => Ok(Self::Html),
            _ => Err(BillingError::Invalid(
                "format is one of json, csv, html".into(),
            )),
        }
    }
}

impl InvoiceFormat {
    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Html => "text/html; charset=utf-8",
        }
    }
}

impl RenderedInvoice {
    /// The rendering in `format`.
    pub fn get(&self, format: InvoiceFormat) -> &str {
        match format {
            InvoiceFormat::Json => &self.json,
            InvoiceFormat::Csv => &self.csv,
            InvoiceFormat::Html => &self.html,
        }
    }
}

fn day(ms: i64) -> String {
    rfc3339(ms).chars().take(10).collect()
}

/// Builds the invoice of `account_id` for `month` from the ledger, reading through
/// `conn` (a transaction when closing, for one consistent view). `closed_at` makes it
/// final; `None` a draft.
///
/// # Errors
/// [`BillingError::Invalid`] for an unknown account; [`BillingError::Unreconciled`] when
/// the lines do not add up to the ledger's transfers; [`BillingError::Store`].
pub async fn build(
    ledger: &Ledger,
    conn: &mut AnyConnection,
    account_id: &str,
    month: Month,
    closed_at: Option<i64>,
) -> Result<Invoice, BillingError> {
    let (from, to) = (month.start_ms(), month.end_ms());
    let account: String = sqlx::query("SELECT name FROM accounts WHERE id = $1")
        .bind(account_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| BillingError::Invalid("no such account".into()))?
        .try_get(0)?;
    let opening = Ledger::funds_at(conn, account_id, from).await?;
    let closing = Ledger::funds_at(conn, account_id, to).await?;

    let mut lines = Vec::new();
    let mut totals = Totals::default();
    for (period, plan_name) in ledger.periods_of(conn, account_id, month).await? {
        if period.fee_micros > 0 {
            lines.push(InvoiceLine {
                kind: "subscription".into(),
                description: format!("{plan_name} plan, {} to {}", day(period.starts_at), day(to)),
                server: None,
                tool: None,
                quantity: 1,
                unit_price_micros: period.fee_micros,
                amount_micros: period.fee_micros,
            });
            totals.subscription_micros += period.fee_micros;
        }
    }
    let rows = sqlx::query(
        "SELECT s.slug, c.tool, c.price_micros, c.status, CAST(COUNT(*) AS BIGINT) \
         FROM calls c JOIN servers s ON s.id = c.server_id \
         WHERE c.account_id = $1 AND c.status IN ('settled', 'refunded') \
         AND c.finished_at >= $2 AND c.finished_at < $3 \
         GROUP BY s.slug, c.tool, c.price_micros, c.status",
    )
    .bind(account_id)
    .bind(from)
    .bind(to)
    .fetch_all(&mut *conn)
    .await?;
    let mut groups: Vec<(String, String, i64, String, i64)> = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                r.try_get(1)?,
                r.try_get(2)?,
                r.try_get(3)?,
                r.try_get(4)?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    // Charged lines before refunded ones, each by server, tool, price. Sorted here, not
    // in SQL, so both backends (and their collations) give one order.
    groups.sort_by(|a, b| {
        (a.3 != "settled", &a.0, &a.1, a.2).cmp(&(b.3 != "settled", &b.0, &b.1, b.2))
    });
    for (server, tool, price, status, calls) in groups {
        let settled = status == "settled";
        let amount = if settled {
            price.checked_mul(calls).ok_or_else(|| {
                BillingError::Unreconciled(format!("{server}__{tool}: amount overflows"))
            })?
        } else {
            0
        };
        if settled {
            totals.usage_micros += amount;
            totals.settled_calls += calls;
        } else {
            totals.refunded_calls += calls;
        }
        lines.push(InvoiceLine {
            kind: if settled { "usage" } else { "refunded" }.into(),
            description: if settled {
                format!("{server}__{tool}")
            } else {
                format!("{server}__{tool} (refunded, not charged)")
            },
            server: Some(server),
            tool: Some(tool),
            quantity: calls,
            unit_price_micros: price,
            amount_micros: amount,
        });
    }

    let mut credits = Vec::new();
    let mut subscription_moved = 0;
    for m in Ledger::wallet_movements(conn, account_id, from, to).await? {
        match m.kind.as_str() {
            "subscription" => {
                subscription_moved -= m.amount;
                continue;
            }
            "topup" => totals.credits_added_micros += m.amount,
            "included_credits" => totals.included_credits_micros += m.amount,
            "reversal" => totals.reversed_micros -= m.amount,
            _ => totals.adjustments_micros += m.amount,
        }
        credits.push(CreditLine {
            kind: m.kind,
            description: m.memo,
            date: rfc3339(m.at),
            amount_micros: m.amount,
        });
    }
    totals.total_micros = totals.subscription_micros + totals.usage_micros;

    // Every figure against the ledger: the charged calls against the settle transfers,
    // the fees against the subscription transfers, and the balances against both.
    let settled = Ledger::settled_between(conn, account_id, from, to).await?;
    if settled != totals.usage_micros {
        return Err(BillingError::Unreconciled(format!(
            "{account} {month}: usage lines sum to {} but settle transfers to {settled}",
            totals.usage_micros
        )));
    }
    if subscription_moved != totals.subscription_micros {
        return Err(BillingError::Unreconciled(format!(
            "{account} {month}: plan fees sum to {} but subscription transfers to {subscription_moved}",
            totals.subscription_micros
        )));
    }
    let expected = opening + totals.credits_added_micros + totals.included_credits_micros
        - totals.reversed_micros
        + totals.adjustments_micros
        - totals.total_micros;
    if expected != closing {
        return Err(BillingError::Unreconciled(format!(
            "{account} {month}: opening {opening} and the month's movements give {expected}, the ledger {closing}"
        )));
    }
    Ok(Invoice {
        number: format!("INV-{}-{account}", month.compact()),
        status: if closed_at.is_some() {
            "final"
        } else {
            "draft"
        }
        .into(),
        account,
        account_id: account_id.to_owned(),
        month: month.to_string(),
        period_start: rfc3339(from),
        period_end: rfc3339(to),
        currency: "USD".into(),
        opening_balance_micros: opening,
        lines,
        credits,
        totals,
        closing_balance_micros: closing,
        closed_at: closed_at.map(rfc3339),
    })
}

/// Renders an invoice as JSON, CSV and HTML (pure: the same invoice, the same bytes).
pub fn render(inv: &Invoice) -> RenderedInvoice {
    let mut json = serde_json::to_string_pretty(inv).unwrap_or_default();
    json.push('\n');
    RenderedInvoice {
        json,
        csv: render_csv(inv),
        html: render_html(inv),
    }
}

fn render_csv(inv: &Invoice) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = w.write_record([
        "invoice",
        "account",
        "month",
        "kind",
        "description",
        "quantity",
        "unit_price_usd",
        "amount_usd",
    ]);
    let mut row = |kind: &str, description: &str, quantity: String, unit: String, amount: i64| {
        let _ = w.write_record([
            inv.number.as_str(),
            inv.account.as_str(),
            inv.month.as_str(),
            kind,
            description,
            quantity.as_str(),
            unit.as_str(),
            format_usd(amount).as_str(),
        ]);
    };
    row(
        "opening_balance",
        "Balance at the start of the month",
        String::new(),
        String::new(),
        inv.opening_balance_micros,
    );
    for l in &inv.lines {
        row(
            &l.kind,
            &l.description,
            l.quantity.to_string(),
            format_usd(l.unit_price_micros),
            l.amount_micros,
        );
    }
    let t = &inv.totals;
    row(
        "total",
        "Total charged",
        String::new(),
        String::new(),
        t.total_micros,
    );
    for c in &inv.credits {
        row(
            &c.kind,
            &format!("{} ({})", c.description, c.date),
            String::new(),
            String::new(),
            c.amount_micros,
        );
    }
    row(
        "closing_balance",
        "Balance at the end of the month",
        String::new(),
        String::new(),
        inv.closing_balance_micros,
    );
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

fn render_html(inv: &Invoice) -> String {
    use html_escape::encode_text as esc;
    let mut h = String::new();
    let t = &inv.totals;
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Invoice {number}</title>\n<style>\
         body{{font:14px/1.4 system-ui,sans-serif;max-width:52em;margin:2em auto;color:#111}}\
         table{{width:100%;border-collapse:collapse;margin:1em 0}}\
         th,td{{padding:.3em .5em;border-bottom:1px solid #ddd;text-align:left}}\
         td.n,th.n{{text-align:right;font-variant-numeric:tabular-nums}}\
         .draft{{color:#b00}} @media print{{body{{margin:0}}}}\
         </style></head><body>\n<h1>Invoice {number}</h1>\n",
        number = esc(&inv.number)
    );
    if inv.status == "draft" {
        h.push_str("<p class=\"draft\"><strong>Draft</strong>: the month is not closed; figures may still change.</p>\n");
    }
    let _ = write!(
        h,
        "<p>Account <strong>{account}</strong><br>Period {start} to {end} (UTC)<br>Currency USD</p>\n\
         <table><tr><th>Description</th><th class=\"n\">Quantity</th><th class=\"n\">Unit price</th>\
         <th class=\"n\">Amount</th></tr>\n",
        account = esc(&inv.account),
        start = esc(&inv.period_start),
        end = esc(&inv.period_end),
    );
    for l in &inv.lines {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&l.description),
            l.quantity,
            format_usd(l.unit_price_micros),
            format_usd(l.amount_micros)
        );
    }
    let _ = write!(
        h,
        "<tr><th colspan=\"3\">Total ({settled} calls charged, {refunded} refunded)</th>\
         <th class=\"n\">{total}</th></tr></table>\n\
         <h2>Balance</h2>\n<table><tr><td>Opening balance</td><td class=\"n\">{opening}</td></tr>\n",
        settled = t.settled_calls,
        refunded = t.refunded_calls,
        total = format_usd(t.total_micros),
        opening = format_usd(inv.opening_balance_micros),
    );
    for c in &inv.credits {
        let _ = writeln!(
            h,
            "<tr><td>{} ({})</td><td class=\"n\">{}</td></tr>",
            esc(&c.description),
            esc(&c.date),
            format_usd(c.amount_micros)
        );
    }
    let _ = write!(
        h,
        "<tr><td>Charged this month</td><td class=\"n\">-{total}</td></tr>\n\
         <tr><th>Closing balance</th><th class=\"n\">{closing}</th></tr></table>\n\
         <p>Balances include credits held for calls in flight at that instant. Refunded calls are \
         listed at no charge.</p>\n</body></html>\n",
        total = format_usd(t.total_micros),
        closing = format_usd(inv.closing_balance_micros),
    );
    h
}

/// What [`close_month`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CloseReport {
    /// `YYYY-MM`.
    pub month: String,
    /// When it was closed (RFC 3339).
    pub closed_at: String,
    /// Invoices stored.
    pub invoices: i64,
    /// True when it had been closed before (nothing was written now).
    pub already_closed: bool,
}

async fn closed_at(
    conn: &mut AnyConnection,
    month: Month,
) -> Result<Option<(i64, i64)>, BillingError> {
    let row = sqlx::query("SELECT closed_at, invoices FROM billing_periods WHERE month = $1")
        .bind(month.to_string())
        .fetch_optional(conn)
        .await?;
    Ok(match row {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        None => None,
    })
}

/// When `month` was closed (epoch ms), or `None`.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn month_closed_at(ledger: &Ledger, month: Month) -> Result<Option<i64>, BillingError> {
    let mut conn = ledger.store().pool().acquire().await?;
    Ok(closed_at(&mut conn, month).await?.map(|(at, _)| at))
}

/// Closes `month`: builds every account's invoice and stores it, with the month, in one
/// transaction. Closing a closed month changes nothing and reports it.
///
/// # Errors
/// [`BillingError::MonthOpen`] before the month's end plus [`CLOSE_GRACE_MS`];
/// [`BillingError::Unreconciled`] when an invoice does not add up (nothing is stored);
/// [`BillingError::Store`].
pub async fn close_month(ledger: &Ledger, month: Month) -> Result<CloseReport, BillingError> {
    let at = ledger.now_ms();
    let closable = month.end_ms() + CLOSE_GRACE_MS;
    let mut tx = ledger.store().begin().await?;
    if let Some((closed, n)) = closed_at(&mut tx, month).await? {
        return Ok(CloseReport {
            month: month.to_string(),
            closed_at: rfc3339(closed),
            invoices: n,
            already_closed: true,
        });
    }
    if at < closable {
        return Err(BillingError::MonthOpen {
            month: month.to_string(),
            closable_at: rfc3339(closable),
        });
    }
    let mut stored = Vec::new();
    for account_id in Ledger::accounts_to_invoice(&mut tx, month.start_ms(), month.end_ms()).await?
    {
        let inv = build(ledger, &mut tx, &account_id, month, Some(at)).await?;
        if !inv.is_empty() {
            let rendered = render(&inv);
            stored.push((inv, rendered));
        }
    }
    let inserted =
        sqlx::query("INSERT INTO billing_periods (month, closed_at, invoices) VALUES ($1, $2, $3)")
            .bind(month.to_string())
            .bind(at)
            .bind(stored.len() as i64)
            .execute(&mut *tx)
            .await;
    if let Err(e) = inserted {
        if is_unique_violation(&e) {
            // Closed meanwhile by another process: report its close.
            drop(tx);
            let mut conn = ledger.store().pool().acquire().await?;
            let (closed, n) = closed_at(&mut conn, month)
                .await?
                .ok_or_else(|| BillingError::Unreconciled(format!("{month} vanished")))?;
            return Ok(CloseReport {
                month: month.to_string(),
                closed_at: rfc3339(closed),
                invoices: n,
                already_closed: true,
            });
        }
        return Err(e.into());
    }
    for (inv, r) in &stored {
        sqlx::query(
            "INSERT INTO invoices (account_id, month, number, subscription_micros, usage_micros, total_micros, \
             opening_balance_micros, closing_balance_micros, json, csv, html, sha256, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&inv.account_id)
        .bind(month.to_string())
        .bind(&inv.number)
        .bind(inv.totals.subscription_micros)
        .bind(inv.totals.usage_micros)
        .bind(inv.totals.total_micros)
        .bind(inv.opening_balance_micros)
        .bind(inv.closing_balance_micros)
        .bind(&r.json)
        .bind(&r.csv)
        .bind(&r.html)
        .bind(hex::encode(Sha256::digest(r.json.as_bytes())))
        .bind(at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(CloseReport {
        month: month.to_string(),
        closed_at: rfc3339(at),
        invoices: stored.len() as i64,
        already_closed: false,
    })
}

/// The invoice of `account_id` for `month`: the stored one when the month is closed
/// (`None` if the account had nothing that month), else a draft built now.
///
/// # Errors
/// As [`build`].
pub async fn invoice(
    ledger: &Ledger,
    account_id: &str,
    month: Month,
) -> Result<Option<(Invoice, RenderedInvoice)>, BillingError> {
    let mut conn = ledger.store().pool().acquire().await?;
    if closed_at(&mut conn, month).await?.is_some() {
        let row = sqlx::query(
            "SELECT json, csv, html FROM invoices WHERE account_id = $1 AND month = $2",
        )
        .bind(account_id)
        .bind(month.to_string())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let rendered = RenderedInvoice {
            json: row.try_get(0)?,
            csv: row.try_get(1)?,
            html: row.try_get(2)?,
        };
        let inv: Invoice = serde_json::from_str(&rendered.json).map_err(|e| {
            BillingError::Unreconciled(format!("stored invoice is not an invoice: {e}"))
        })?;
        return Ok(Some((inv, rendered)));
    }
    let inv = build(ledger, &mut conn, account_id, month, None).await?;
    let rendered = render(&inv);
    Ok(Some((inv, rendered)))
}

/// The reconciliation of stored invoices, for `ledger verify`: each one's totals equal
/// the ledger's transfers of its month, its balances follow from its movements, and
/// regenerating it gives the same bytes.
///
/// # Errors
/// [`BillingError::Store`].
pub async fn verify(ledger: &Ledger) -> Result<Vec<String>, BillingError> {
    let mut broken = Vec::new();
    let mut conn = ledger.store().pool().acquire().await?;
    let rows = sqlx::query(
        "SELECT i.account_id, i.month, i.number, i.usage_micros, i.subscription_micros, i.total_micros, \
         i.opening_balance_micros, i.closing_balance_micros, i.json, i.csv, i.html, i.sha256, p.closed_at \
         FROM invoices i JOIN billing_periods p ON p.month = i.month ORDER BY i.month, i.number",
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let account_id: String = r.try_get(0)?;
        let month_text: String = r.try_get(1)?;
        let number: String = r.try_get(2)?;
        let usage: i64 = r.try_get(3)?;
        let subscription: i64 = r.try_get(4)?;
        let total: i64 = r.try_get(5)?;
        let opening: i64 = r.try_get(6)?;
        let closing: i64 = r.try_get(7)?;
        let stored = RenderedInvoice {
            json: r.try_get(8)?,
            csv: r.try_get(9)?,
            html: r.try_get(10)?,
        };
        let sha: String = r.try_get(11)?;
        let closed: i64 = r.try_get(12)?;
        let Ok(month) = month_text.parse::<Month>() else {
            broken.push(format!("invoice {number} has a bad month '{month_text}'"));
            continue;
        };
        let (from, to) = (month.start_ms(), month.end_ms());
        let settled = Ledger::settled_between(&mut conn, &account_id, from, to).await?;
        let fees: i64 = Ledger::wallet_movements(&mut conn, &account_id, from, to)
            .await?
            .iter()
            .filter(|m| m.kind == "subscription")
            .map(|m| -m.amount)
            .sum();
        if usage != settled || subscription != fees || total != usage + subscription {
            broken.push(format!(
                "invoice {number}: usage {usage} and plan fees {subscription} (total {total}), \
                 but the ledger's settle transfers sum to {settled} and subscription transfers to {fees}"
            ));
        }
        let funds = (
            Ledger::funds_at(&mut conn, &account_id, from).await?,
            Ledger::funds_at(&mut conn, &account_id, to).await?,
        );
        if funds != (opening, closing) {
            broken.push(format!(
                "invoice {number}: balances {opening} → {closing}, the ledger's {} → {}",
                funds.0, funds.1
            ));
        }
        if hex::encode(Sha256::digest(stored.json.as_bytes())) != sha {
            broken.push(format!(
                "invoice {number}: its JSON does not match its SHA-256"
            ));
        }
        match build(ledger, &mut conn, &account_id, month, Some(closed)).await {
            Ok(inv) => {
                if render(&inv) != stored {
                    broken.push(format!(
                        "invoice {number}: regenerating it from the ledger gives different bytes"
                    ));
                }
            }
            Err(e) => broken.push(format!("invoice {number}: cannot be regenerated: {e}")),
        }
    }
    Ok(broken)
}
