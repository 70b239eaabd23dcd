//! Billing: prices in integer micros ([`pricing`]), the double-entry two-phase ledger
//! ([`ledger`], see its module docs for the design), and signed receipts ([`receipts`]).

pub mod ledger;
pub mod pricing;
pub mod receipts;

pub use ledger::{BillingError, Ledger, Outcome, Reservation};
pub use receipts::Receipt;
