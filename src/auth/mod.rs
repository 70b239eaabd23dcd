//! Authentication and authorization: API keys and their scopes ([`keys`]), and the
//! Ed25519 key that signs upstream tokens and receipts ([`signing`]).

pub mod accounts;
pub mod keys;
pub mod signing;

pub use keys::{KeyContext, KeyError, Scope};
pub use signing::{Signer, SigningError};
