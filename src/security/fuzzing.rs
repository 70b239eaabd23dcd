//! The entry points of the cargo-fuzz targets in `fuzz/` (issue 3: "a fuzz target for
//! the JSON-RPC entry point and for URL validation"). The targets call these
//! functions; `tests/fuzz_corpus.rs` runs every seed of `fuzz/corpus/` through them
//! as a normal test, so the invariants below are checked on every CI run too.
//!
//! Each function must never panic except on a broken invariant (which is the finding).

use std::sync::Arc;

use serde_json::Value;
use url::Host;

use super::endpoint::{EndpointError, EndpointPolicy};
use super::ssrf::{StaticLookup, forbidden_reason};
use crate::gateway::limits::{slug_of, tool_calls};

/// The allowed host of the URL target's policy (a test upstream's, as tests use).
pub const FUZZ_ALLOWED_HOST: &str = "127.0.0.1:9000";

/// Everything the marketplace does with a raw JSON-RPC POST body before rmcp's session
/// logic: find the `tools/call`s and their server (the rate limiter's view), parse the
/// message as rmcp does, and run content scanning and redaction over it as if it were
/// an upstream's result.
pub fn jsonrpc_entry(data: &[u8]) {
    for call in tool_calls(data) {
        if let Some(slug) = slug_of(None, &call.name) {
            assert!(
                call.name.starts_with(slug),
                "a slug is a prefix of its tool name"
            );
        }
        let _ = crate::catalog::namespaced_name("fuzz", &call.name);
    }
    let _ = serde_json::from_slice::<rmcp::model::ClientJsonRpcMessage>(data);
    if let Ok(mut value) = serde_json::from_slice::<Value>(data) {
        let findings = super::scan::scan(&value);
        assert!(findings.len() <= 20, "findings are capped");
        let removed = super::redact::redact_result(
            &mut value,
            &[
                "$.params".to_owned(),
                "$..name".to_owned(),
                "$.content[*].text".to_owned(),
            ],
        );
        let _ = removed;
    }
}

/// URL validation: `EndpointPolicy::check` on arbitrary text. An accepted URL never
/// carries credentials or a fragment, is https (or http to the allowed host), never
/// names a forbidden IP literal (unless it is the allowed host), and is accepted again
/// in its normalized form.
pub fn url_validation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = EndpointPolicy::new(
        vec![FUZZ_ALLOWED_HOST.to_owned()],
        Arc::new(StaticLookup::new(None)),
    );
    let Ok(url) = policy.check(text) else {
        return;
    };
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "no userinfo: {url}"
    );
    assert!(url.fragment().is_none(), "no fragment: {url}");
    let allowed = policy.is_allowed_host(&url);
    assert!(
        url.scheme() == "https" || (url.scheme() == "http" && allowed),
        "scheme: {url}"
    );
    let literal = match url.host() {
        Some(Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
        Some(Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
        _ => None,
    };
    if let Some(ip) = literal {
        assert!(
            allowed || forbidden_reason(ip).is_none(),
            "forbidden literal accepted: {url}"
        );
    }
    assert_ne!(
        policy.check(url.as_str()),
        Err(EndpointError::NotPublic),
        "stable: {url}"
    );
    assert!(
        policy.check(url.as_str()).is_ok(),
        "normalized form accepted: {url}"
    );
}
