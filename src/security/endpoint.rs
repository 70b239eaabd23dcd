//! Upstream endpoint URL policy (DESIGN.md "Health and trust", SSRF): `https` only,
//! `http` only for hosts the operator allowed (`--allow-upstream-host`, local
//! development and tests); no userinfo; no fragment; at most 2048 bytes. Redirects are
//! never followed by the upstream HTTP client (see `upstream::client`).

use url::{Host, Url};

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
}

/// Which endpoints are acceptable.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    /// `HOST` or `HOST:PORT` entries allowed over plain http (and on private addresses).
    pub allowed_hosts: Vec<String>,
}

impl EndpointPolicy {
    /// True when `host[:port]` of `url` is in the operator's allow list.
    pub fn is_allowed_host(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = url.port_or_known_default();
        self.allowed_hosts.iter().any(|entry| {
            let entry = entry.trim();
            match entry.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .eq_ignore_ascii_case(host)
                        && p.parse::<u16>().ok() == port
                }
                _ => entry
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .eq_ignore_ascii_case(host),
            }
        })
    }

    /// Parses and checks `text` against the policy; returns the normalized URL.
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
        match url.scheme() {
            "https" => Ok(url),
            "http" if self.is_allowed_host(&url) => Ok(url),
            _ => Err(EndpointError::Scheme),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_only_unless_allowed() {
        let p = EndpointPolicy {
            allowed_hosts: vec!["127.0.0.1".into()],
        };
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
        let p = EndpointPolicy {
            allowed_hosts: vec!["localhost:8000".into()],
        };
        assert!(p.check("http://localhost:8000/mcp").is_ok());
        assert_eq!(
            p.check("http://localhost:8001/mcp"),
            Err(EndpointError::Scheme)
        );
    }
}
