//! Proxy headers: `X-Forwarded-For` and `X-Forwarded-Proto`, believed only when the peer is a
//! configured proxy ([`ServerConfig::trusted_proxies`](super::ServerConfig::trusted_proxies)).
//!
//! `X-Forwarded-For` is read from the right: each proxy appends the address it saw, so the
//! rightmost address that is not itself a trusted proxy is the client. Anything a client wrote
//! further left is ignored. From any other peer both headers are ignored (they stay visible in
//! the scope's raw headers, so read the client from [`Scope::client`](crate::Scope::client)).

use std::net::{IpAddr, SocketAddr};

/// The client address and whether it used TLS, as far as this server can trust.
pub(crate) fn resolve(
    trusted: &[IpAddr],
    peer: Option<SocketAddr>,
    headers: &hyper::HeaderMap,
    tls: bool,
) -> (Option<SocketAddr>, bool) {
    let Some(peer_addr) = peer else {
        return (peer, tls);
    };
    if !trusted.contains(&canonical(peer_addr.ip())) {
        return (peer, tls);
    }
    let mut client = peer;
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            // Garbage in the chain: stop at the last address we could trust.
            break;
        };
        client = Some(SocketAddr::new(ip, 0));
        if !trusted.contains(&canonical(ip)) {
            break;
        }
    }
    let secure = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
    {
        Some(p) if p.eq_ignore_ascii_case("https") || p.eq_ignore_ascii_case("wss") => true,
        Some(p) if p.eq_ignore_ascii_case("http") || p.eq_ignore_ascii_case("ws") => false,
        _ => tls,
    };
    (client, secure)
}

/// An IPv4 address mapped into IPv6 compares as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, hyper::header::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_trusted_peers_are_believed() {
        let proxy: SocketAddr = "10.0.0.1:4000".parse().unwrap_or_else(|_| unreachable!());
        let trusted = ["10.0.0.1".parse().unwrap_or_else(|_| unreachable!())];
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-proto", "https"),
        ]);
        let (client, secure) = resolve(&trusted, Some(proxy), &h, false);
        assert_eq!(
            client,
            Some("203.0.113.9:0".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert!(secure);
        let (client, secure) = resolve(&[], Some(proxy), &h, false);
        assert_eq!(client, Some(proxy));
        assert!(!secure);
        // A chain through two trusted proxies.
        let trusted2 = [
            trusted[0],
            "10.0.0.2".parse().unwrap_or_else(|_| unreachable!()),
        ];
        let h = headers(&[("x-forwarded-for", "198.51.100.7, 10.0.0.2")]);
        let (client, _) = resolve(&trusted2, Some(proxy), &h, false);
        assert_eq!(
            client,
            Some("198.51.100.7:0".parse().unwrap_or_else(|_| unreachable!()))
        );
        // Garbage keeps the proxy.
        let h = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(resolve(&trusted, Some(proxy), &h, false).0, Some(proxy));
    }
}
