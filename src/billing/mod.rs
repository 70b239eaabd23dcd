//! Billing: one bill for orchestrators, reliable payouts for creators, 30 % for the
//! platform — all on one double-entry ledger.
//!
//! | module | job |
//! | --- | --- |
//! | [`pricing`] | prices and amounts in integer micros, the 70/30 split |
//! | [`ledger`] | the two-phase double-entry ledger: every write to money, quotas and the usage log; `ledger verify` (see its module docs) |
//! | [`period`] | UTC months and the clock billing reads |
//! | [`plans`] | Free, Pro, Enterprise and configured plans: fees, included credits, quotas, rate limits |
//! | [`usage`] | the usage log (the append-only calls table): filters, cursor pages, CSV |
//! | [`invoices`] | monthly invoices (JSON, CSV, HTML), closing a month |
//! | [`payouts`] | creator payouts, PayPal and Stripe batch files |
//! | [`stripe`] | paid top-ups: the Stripe webhook |
//! | [`alerts`] | low-balance alerts, for the alert outbox to deliver |
//! | [`receipts`] | signed receipts of calls |

pub mod alerts;
pub mod invoices;
pub mod ledger;
pub mod payouts;
pub mod period;
pub mod plans;
pub mod pricing;
pub mod receipts;
pub mod stripe;
pub mod usage;

use std::sync::Arc;

pub use ledger::{BillingError, CallStats, Ledger, Outcome, Reservation};
pub use period::Month;
pub use plans::{PlanBook, PlanLimits};
pub use receipts::Receipt;

/// The default payout threshold: 10 USD in micros. Below it a creator's earnings are
/// carried to the next month (a transfer's fixed fee would eat a visible share of less).
pub const DEFAULT_PAYOUT_THRESHOLD_MICROS: i64 = 10_000_000;

/// Billing settings resolved from config (`[billing]`, `[plans.*]`, `[stripe]`).
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// The plans.
    pub plans: Arc<PlanBook>,
    /// Payouts below this are held and carried forward, micros.
    pub payout_threshold_micros: i64,
    /// The Stripe webhook signing secret; without it the webhook answers 503.
    pub stripe_webhook_secret: Option<stripe::WebhookSecret>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            plans: Arc::new(PlanBook::builtin()),
            payout_threshold_micros: DEFAULT_PAYOUT_THRESHOLD_MICROS,
            stripe_webhook_secret: None,
        }
    }
}
