//! Security checks at the marketplace's edges. [`endpoint`] validates upstream endpoint
//! URLs at registration and again before every connect.

pub mod endpoint;

pub use endpoint::{EndpointError, EndpointPolicy};
