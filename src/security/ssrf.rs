//! SSRF defence (issue 3 item 1, DESIGN.md "Health and trust"): which IP addresses an
//! upstream may live at, and the DNS resolver the upstream HTTP client connects
//! through.
//!
//! - [`forbidden_reason`] classifies one address: loopback, RFC 1918, link-local (with
//!   the cloud metadata addresses 169.254.169.254 and fd00:ec2::254), CGNAT, 0.0.0.0/8,
//!   multicast, broadcast and reserved, documentation and benchmarking ranges, IPv6 ULA,
//!   link-local and site-local, and the IPv4-mapped, IPv4-compatible and NAT64 forms of
//!   every IPv4 range. IPv6 outside global unicast (2000::/3) is refused as a whole.
//!   Ranges from the IANA special-purpose registries (RFC 6890, RFC 8190).
//! - [`GuardedResolver`] is the `reqwest` DNS resolver of the upstream client: every
//!   address a name resolves to is checked at every connect, and a name with any
//!   forbidden address is refused as a whole, so the client only ever connects to
//!   addresses that passed (DNS-rebinding safe: a name that resolved public at
//!   registration and private now is refused now).
//! - Names the operator allowed (`allow_upstream_hosts`, the explicit opt-in for local
//!   development and tests) skip the address check. `reqwest` does not resolve IP
//!   literals, so literal hosts are checked by `EndpointPolicy::check` when a session
//!   is built (see `upstream::Upstreams`), which amounts to every connect: a literal
//!   cannot change its address.
//! - [`Lookup`] is the name lookup behind it: [`SystemLookup`] (hickory-resolver with
//!   the system configuration) in production, [`StaticLookup`] where a test or an
//!   embedder must control the answers.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, LazyLock, RwLock};

use futures::future::BoxFuture;
use ipnet::{Ipv4Net, Ipv6Net};

/// Why a name could not be resolved to acceptable addresses. The message is the same
/// for "does not resolve" and "resolves privately", so registration is no oracle for
/// internal DNS.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No address, a lookup failure, or at least one forbidden address.
    #[error("the upstream host does not resolve to public addresses only")]
    NotPublic,
}

/// A DNS lookup: the addresses of `host` (a name, never an IP literal; a trailing dot
/// may be present).
pub trait Lookup: Send + Sync + fmt::Debug {
    /// Resolves `host` to its IPv4 and IPv6 addresses.
    ///
    /// # Errors
    /// A description of the failure (never shown to clients).
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>>;
}

/// The production lookup: hickory-resolver on the system configuration
/// (`/etc/resolv.conf`, `/etc/hosts`); falls back to the operating system's resolver
/// (`getaddrinfo`) when that configuration cannot be read.
pub struct SystemLookup {
    resolver: Option<hickory_resolver::TokioResolver>,
}

impl fmt::Debug for SystemLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemLookup")
            .field("hickory", &self.resolver.is_some())
            .finish()
    }
}

impl SystemLookup {
    /// Builds the resolver from the system configuration.
    pub fn new() -> Self {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read the system DNS configuration; using getaddrinfo")
            })
            .ok();
        Self { resolver }
    }
}

impl Default for SystemLookup {
    fn default() -> Self {
        Self::new()
    }
}

impl Lookup for SystemLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>> {
        Box::pin(async move {
            match &self.resolver {
                Some(r) => r
                    .lookup_ip(host)
                    .await
                    .map(|l| l.iter().collect())
                    .map_err(|e| e.to_string()),
                None => tokio::net::lookup_host((host, 0))
                    .await
                    .map(|addrs| addrs.map(|a| a.ip()).collect())
                    .map_err(|e| e.to_string()),
            }
        })
    }
}

/// A lookup answered from a map that can change at run time (tests, embedders that
/// pin names). Names are matched case-insensitively without a trailing dot; unknown
/// names go to the fallback, or fail.
#[derive(Debug, Default)]
pub struct StaticLookup {
    entries: RwLock<HashMap<String, Vec<IpAddr>>>,
    fallback: Option<Arc<dyn Lookup>>,
}

impl StaticLookup {
    /// An empty map with an optional fallback lookup for names it does not hold.
    pub fn new(fallback: Option<Arc<dyn Lookup>>) -> Self {
        Self {
            entries: RwLock::default(),
            fallback,
        }
    }

    /// Makes `host` resolve to `addrs` (an empty list: to nothing).
    pub fn set(&self, host: &str, addrs: &[IpAddr]) {
        if let Ok(mut e) = self.entries.write() {
            e.insert(normalize_host(host), addrs.to_vec());
        }
    }
}

impl Lookup for StaticLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, String>> {
        let found = self
            .entries
            .read()
            .ok()
            .and_then(|e| e.get(&normalize_host(host)).cloned());
        Box::pin(async move {
            match (found, &self.fallback) {
                (Some(addrs), _) => Ok(addrs),
                (None, Some(f)) => f.lookup(host).await,
                (None, None) => Err("no such host".to_owned()),
            }
        })
    }
}

/// Lowercase, without brackets and without a trailing dot.
pub fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// True when `host` (any port) is named in the operator's allow list of `HOST` or
/// `HOST:PORT` entries.
pub fn host_is_allowed(allowed_hosts: &[String], host: &str) -> bool {
    let host = normalize_host(host);
    allowed_hosts
        .iter()
        .any(|entry| normalize_host(split_host_port(entry.trim()).0) == host)
}

/// Splits `HOST:PORT`, `[V6]:PORT`, `HOST`, `[V6]` or a bare IPv6 address.
pub fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (rest, None),
        };
    }
    match entry.rsplit_once(':') {
        // One colon: HOST:PORT. Several: a bare IPv6 address.
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (entry, None),
    }
}

struct Ranges {
    v4: Vec<(Ipv4Net, &'static str)>,
    v6: Vec<(Ipv6Net, &'static str)>,
}

fn v4(net: &str, why: &'static str) -> (Ipv4Net, &'static str) {
    (net.parse().expect("a valid IPv4 network literal"), why)
}

fn v6(net: &str, why: &'static str) -> (Ipv6Net, &'static str) {
    (net.parse().expect("a valid IPv6 network literal"), why)
}

/// The refused ranges, from the IANA IPv4 and IPv6 special-purpose address registries.
static RANGES: LazyLock<Ranges> = LazyLock::new(|| Ranges {
    v4: vec![
        v4("0.0.0.0/8", "'this network' (RFC 791)"),
        v4("10.0.0.0/8", "private (RFC 1918)"),
        v4("100.64.0.0/10", "shared address space / CGNAT (RFC 6598)"),
        v4("127.0.0.0/8", "loopback (RFC 1122)"),
        v4("169.254.169.254/32", "cloud metadata service"),
        v4("169.254.0.0/16", "link-local (RFC 3927)"),
        v4("172.16.0.0/12", "private (RFC 1918)"),
        v4("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
        v4("192.0.2.0/24", "documentation TEST-NET-1 (RFC 5737)"),
        v4("192.88.99.0/24", "6to4 relay anycast (RFC 7526)"),
        v4("192.168.0.0/16", "private (RFC 1918)"),
        v4("198.18.0.0/15", "benchmarking (RFC 2544)"),
        v4("198.51.100.0/24", "documentation TEST-NET-2 (RFC 5737)"),
        v4("203.0.113.0/24", "documentation TEST-NET-3 (RFC 5737)"),
        v4("168.63.129.16/32", "cloud platform endpoint (Azure)"),
        v4("224.0.0.0/4", "multicast (RFC 5771)"),
        v4("255.255.255.255/32", "limited broadcast (RFC 919)"),
        v4("240.0.0.0/4", "reserved (RFC 1112)"),
    ],
    v6: vec![
        v6("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
        v6("100::/64", "discard-only (RFC 6666)"),
        v6(
            "2001::/23",
            "IETF protocol assignments incl. Teredo (RFC 2928)",
        ),
        v6("2001:db8::/32", "documentation (RFC 3849)"),
        v6("2002::/16", "6to4 (RFC 3056)"),
        v6("3fff::/20", "documentation (RFC 9637)"),
        v6("5f00::/16", "SRv6 SIDs (RFC 9602)"),
        v6("fd00:ec2::254/128", "cloud metadata service (AWS)"),
        v6("fc00::/7", "unique local (RFC 4193)"),
        v6("fe80::/10", "link-local (RFC 4291)"),
        v6("fec0::/10", "site-local (RFC 3879)"),
        v6("ff00::/8", "multicast (RFC 4291)"),
    ],
});

/// Why `ip` may not be an upstream's address, or `None` for a public unicast address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => forbidden_v4(a),
        IpAddr::V6(a) => forbidden_v6(a),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> Option<&'static str> {
    RANGES
        .v4
        .iter()
        .find(|(net, _)| net.contains(&a))
        .map(|(_, why)| *why)
}

fn forbidden_v6(a: Ipv6Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        return Some("unspecified (RFC 4291)");
    }
    if a.is_loopback() {
        return Some("loopback (RFC 4291)");
    }
    let seg = a.segments();
    // ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible, deprecated) and 64:ff9b::a.b.c.d
    // (NAT64) all reach the IPv4 address inside: judge that one.
    let embedded = if let Some(v4) = a.to_ipv4_mapped() {
        Some(v4)
    } else if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let o = a.octets();
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return forbidden_v4(v4).map(|_| "an IPv6 form of a forbidden IPv4 address");
    }
    if let Some((_, why)) = RANGES.v6.iter().find(|(net, _)| net.contains(&a)) {
        return Some(why);
    }
    // Only global unicast (2000::/3) is assigned for public use.
    if seg[0] & 0xe000 != 0x2000 {
        return Some("not global unicast (RFC 4291)");
    }
    None
}

/// Resolves `host` for an upstream connection: the operator's allowed names resolve to
/// whatever they resolve to; any other name must resolve, and only to addresses that
/// pass [`forbidden_reason`]. An IP literal is checked as it is.
///
/// # Errors
/// [`ResolveError::NotPublic`].
pub async fn resolve_checked(
    lookup: &dyn Lookup,
    allowed_hosts: &[String],
    host: &str,
) -> Result<Vec<IpAddr>, ResolveError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return if host_is_allowed(allowed_hosts, host) || forbidden_reason(ip).is_none() {
            Ok(vec![ip])
        } else {
            Err(ResolveError::NotPublic)
        };
    }
    let addrs = lookup.lookup(host).await.map_err(|e| {
        tracing::debug!(host, error = %e, "upstream host lookup failed");
        ResolveError::NotPublic
    })?;
    if addrs.is_empty() {
        return Err(ResolveError::NotPublic);
    }
    if !host_is_allowed(allowed_hosts, host)
        && let Some((ip, why)) = addrs
            .iter()
            .find_map(|ip| forbidden_reason(*ip).map(|w| (ip, w)))
    {
        tracing::warn!(host, %ip, reason = why, "refused an upstream host that resolves to a forbidden address");
        return Err(ResolveError::NotPublic);
    }
    Ok(addrs)
}

/// The DNS resolver of the upstream HTTP client (see the module docs).
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    lookup: Arc<dyn Lookup>,
    allowed_hosts: Arc<[String]>,
}

impl GuardedResolver {
    /// A resolver over `lookup` that lets `allowed_hosts` resolve anywhere.
    pub fn new(lookup: Arc<dyn Lookup>, allowed_hosts: &[String]) -> Self {
        Self {
            lookup,
            allowed_hosts: allowed_hosts.into(),
        }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve_checked(this.lookup.as_ref(), &this.allowed_hosts, &host)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            // Port 0 is replaced by the URL's port.
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        forbidden_reason(s.parse().expect("an IP")).is_some()
    }

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.255.255",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:a9fe:a9fe",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::10.1.1.1",
            "fd00:ec2::254",
            "fc00::1",
            "fdff::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "2002:7f00:1::",
            "3fff::1",
            "100::1",
            "::2",
            "4000::1",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(!forbidden(ip), "{ip} is public");
        }
    }

    #[test]
    fn host_port_entries_split() {
        assert_eq!(split_host_port("127.0.0.1:8080"), ("127.0.0.1", Some(8080)));
        assert_eq!(split_host_port("localhost"), ("localhost", None));
        assert_eq!(split_host_port("[::1]:9000"), ("::1", Some(9000)));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert!(host_is_allowed(&["LocalHost.:80".into()], "localhost"));
        assert!(!host_is_allowed(&["localhost".into()], "localhost.evil"));
    }

    #[tokio::test]
    async fn names_are_judged_by_every_address_they_resolve_to() {
        let lookup = StaticLookup::new(None);
        lookup.set("public.test", &["93.184.215.14".parse().unwrap()]);
        lookup.set(
            "mixed.test",
            &[
                "93.184.215.14".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
            ],
        );
        lookup.set("private.test", &["10.0.0.1".parse().unwrap()]);
        assert!(resolve_checked(&lookup, &[], "public.test").await.is_ok());
        assert!(resolve_checked(&lookup, &[], "PUBLIC.test.").await.is_ok());
        for host in [
            "mixed.test",
            "private.test",
            "unknown.test",
            "[::1]",
            "127.0.0.1",
        ] {
            assert_eq!(
                resolve_checked(&lookup, &[], host).await,
                Err(ResolveError::NotPublic),
                "{host}"
            );
        }
        assert!(
            resolve_checked(&lookup, &["private.test:8000".into()], "private.test")
                .await
                .is_ok()
        );
    }
}
