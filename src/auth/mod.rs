//! Authentication and authorization: API keys and their scopes ([`keys`]), the
//! short-lived cache of authenticated keys on the hot path ([`key_cache`]), and the
//! Ed25519 key that signs upstream tokens and receipts ([`signing`]).

pub mod accounts;
pub mod key_cache;
pub mod keys;
pub mod signing;

pub use key_cache::KeyCache;
pub use keys::{KeyContext, KeyError, Scope};
pub use signing::{Signer, SigningError};
