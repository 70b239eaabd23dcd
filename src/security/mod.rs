//! Security checks at the marketplace's edges (issue 3, the trust layer):
//!
//! | module | job |
//! | --- | --- |
//! | [`endpoint`] | the upstream endpoint URL policy, at registration and before every session |
//! | [`ssrf`] | forbidden address ranges and the DNS resolver every upstream connect goes through |
//! | [`vault`] | the master key and AES-256-GCM encryption of upstream credentials at rest |
//! | [`credentials`] | upstream credentials and the per-server secret: set, rotate, inject |
//! | [`ratelimit`] | GCRA rate limits per key, per account and per account per server |
//! | [`policy`] | per-server, per-account and per-key trust policy overrides |
//! | [`scan`] | response scanning for prompt-injection markers and leaked secrets |
//! | [`redact`] | JSONPath redaction of results |
//! | [`audit`] | the audit log |
//! | [`fuzzing`] | the entry points the cargo-fuzz targets and their seed corpus test drive |

pub mod audit;
pub mod credentials;
pub mod endpoint;
pub mod fuzzing;
pub mod policy;
pub mod ratelimit;
pub mod redact;
pub mod scan;
pub mod ssrf;
pub mod vault;

pub use endpoint::{EndpointError, EndpointPolicy};
