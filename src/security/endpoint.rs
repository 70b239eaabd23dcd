//! Upstream endpoint URL policy (DESIGN.md "Health and trust", SSRF): `https` only,
//! `http` only for hosts the operator allowed (`--allow-upstream-host`, local
//! development and tests); no userinfo; no fragment; at most 2048 bytes; an IP literal
//! host must be public (see [`super::ssrf`]) unless allowed; at registration the
//! host's name must resolve, and only to public addresses ([`EndpointPolicy::check_resolved`]).
//! Redirects are never followed and every connect resolves through
//! [`super::ssrf::GuardedResolver`] (see `upstream::client::http_client`).
//!
//! Hostile spellings of an address (`http://2130706433/`, `0x7f.1`, `0177.0.0.1`,
//! `127.1`, `[::ffff:127.0.0.1]`) are normalized by the WHATWG URL parser (`url`)
//! before the address check, so they are judged as the address they mean.

use std::sync::Arc;

use url::{Host, Url};

use super::ssrf::{self, Lookup};

/// Longest endpoint URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// Why an endpoint URL was refused. Messages never echo credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// Not a parseable absolute URL.
    #[error("the endpoint is not a valid absolute URL")]
    Malformed,
    /// Longer than [`MAX_URL_LEN`].
    #[error("the endpoint URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    /// Neither https nor an allowed http host.
    #[error("the endpoint must use https (http only for hosts the operator allows)")]
    Scheme,
    /// Carries `user:password@`.
    #[error("the endpoint URL must not carry credentials (set upstream credentials separately)")]
    Userinfo,
    /// Carries a `#fragment`.
    #[error("the endpoint URL must not carry a fragment")]
    Fragment,
    /// No host.
    #[error("the endpoint URL has no host")]
    NoHost,
    /// The host is, or resolves to, an address that is not public (private, loopback,
    /// link-local, metadata, …), or does not resolve. One variant for all of these so
    /// registration tells nothing about internal DNS.
    #[error(
        "the endpoint's host must be a public address or a name that resolves only to public addresses"
    )]
    NotPublic,
}

/// Which endpoints are acceptable, and the lookup their names resolve through.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    /// `HOST` or `HOST:PORT` entries allowed over plain http (and on private addresses).
    pub allowed_hosts: Vec<String>,
    /// The DNS lookup of registration checks and upstream connects.
    pub lookup: Arc<dyn Lookup>,
}

impl EndpointPolicy {
    /// A policy allowing `allowed_hosts` (over http, on private addresses) and
    /// resolving names through `lookup`.
    pub fn new(allowed_hosts: Vec<String>, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            allowed_hosts,
            lookup,
        }
    }

    /// The resolver the upstream HTTP client connects through.
    pub fn resolver(&self) -> ssrf::GuardedResolver {
        ssrf::GuardedResolver::new(self.lookup.clone(), &self.allowed_hosts)
    }

    /// True when `host[:port]` of `url` is in the operator's allow list.
    pub fn is_allowed_host(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = ssrf::normalize_host(host);
        let port = url.port_or_known_default();
        self.allowed_hosts.iter().any(|entry| {
            let (h, p) = ssrf::split_host_port(entry.trim());
            ssrf::normalize_host(h) == host && (p.is_none() || p == port)
        })
    }

    /// Parses and checks `text` against the policy without DNS: scheme, userinfo,
    /// fragment, length, and the address of an IP-literal host. Returns the normalized
    /// URL. Used before every upstream session is built.
    ///
    /// # Errors
    /// One [`EndpointError`] naming the first rule broken.
    pub fn check(&self, text: &str) -> Result<Url, EndpointError> {
        if text.len() > MAX_URL_LEN {
            return Err(EndpointError::TooLong);
        }
        let url = Url::parse(text.trim()).map_err(|_| EndpointError::Malformed)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointError::Userinfo);
        }
        if url.fragment().is_some() {
            return Err(EndpointError::Fragment);
        }
        match url.host() {
            None => return Err(EndpointError::NoHost),
            Some(Host::Domain("")) => return Err(EndpointError::NoHost),
            _ => {}
        }
        let allowed = self.is_allowed_host(&url);
        match url.scheme() {
            "https" => {}
            "http" if allowed => {}
            _ => return Err(EndpointError::Scheme),
        }
        let literal = match url.host() {
            Some(Host::Ipv4(a)) => Some(std::net::IpAddr::V4(a)),
            Some(Host::Ipv6(a)) => Some(std::net::IpAddr::V6(a)),
            _ => None,
        };
        if let Some(ip) = literal
            && !allowed
            && ssrf::forbidden_reason(ip).is_some()
        {
            return Err(EndpointError::NotPublic);
        }
        Ok(url)
    }

    /// [`EndpointPolicy::check`], then (for a name that is not allowed) a DNS lookup:
    /// the name must resolve, and only to public addresses. Used at registration.
    ///
    /// # Errors
    /// As [`EndpointPolicy::check`], and [`EndpointError::NotPublic`].
    pub async fn check_resolved(&self, text: &str) -> Result<Url, EndpointError> {
        let url = self.check(text)?;
        if let Some(Host::Domain(name)) = url.host()
            && !self.is_allowed_host(&url)
        {
            ssrf::resolve_checked(self.lookup.as_ref(), &self.allowed_hosts, name)
                .await
                .map_err(|_| EndpointError::NotPublic)?;
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str]) -> EndpointPolicy {
        EndpointPolicy::new(
            allowed.iter().map(|s| (*s).to_owned()).collect(),
            Arc::new(ssrf::StaticLookup::new(None)),
        )
    }

    #[test]
    fn https_only_unless_allowed() {
        let p = policy(&["127.0.0.1"]);
        assert!(p.check("https://example.com/mcp").is_ok());
        assert!(p.check("http://127.0.0.1:9000/mcp").is_ok());
        assert_eq!(
            p.check("http://example.com/mcp"),
            Err(EndpointError::Scheme)
        );
        assert_eq!(p.check("ftp://example.com/"), Err(EndpointError::Scheme));
        assert_eq!(
            p.check("https://u:p@example.com/"),
            Err(EndpointError::Userinfo)
        );
        assert_eq!(p.check("not a url"), Err(EndpointError::Malformed));
        assert_eq!(
            p.check("https://example.com/#x"),
            Err(EndpointError::Fragment)
        );
        let p = policy(&["localhost:8000"]);
        assert!(p.check("http://localhost:8000/mcp").is_ok());
        assert_eq!(
            p.check("http://localhost:8001/mcp"),
            Err(EndpointError::Scheme)
        );
    }

    #[test]
    fn hostile_spellings_of_private_addresses_are_refused() {
        let p = policy(&["127.0.0.1:9000"]);
        for url in [
            "https://2130706433/",
            "https://0x7f.1/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://127.0.0.1/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:a9fe:a9fe]/latest/meta-data",
            "https://169.254.169.254/",
            "https://[fd00:ec2::254]/",
            "https://[::1]:9000/",
            "https://0/",
        ] {
            assert_eq!(p.check(url), Err(EndpointError::NotPublic), "{url}");
        }
        assert!(p.check("http://127.0.0.1:9000/mcp").is_ok());
        assert_eq!(p.check("http://2130706433/"), Err(EndpointError::Scheme));
    }
}
