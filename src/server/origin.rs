//! Origin validation for WebSocket handshakes (cross-site WebSocket hijacking guard).
//!
//! Browsers always send `Origin` on a WebSocket handshake, and a page on another site can open
//! a socket to this server with the user's cookies. So, by default:
//!
//! - no `Origin` header: allowed (non-browser clients, load tools);
//! - an `Origin` whose host and port equal the request's `Host`: allowed (the page came from
//!   this server; the scheme is not compared, so a TLS-terminating proxy in front is fine);
//! - any other `Origin`, `null` included: 403, unless an entry of
//!   [`ServerConfig::allowed_origins`](super::ServerConfig::allowed_origins) matches it.
//!
//! Entries: `*` (every origin; the server warns at startup), a full origin
//! (`https://app.example.com`, `http://localhost:3000`), a host with or without a port
//! (`app.example.com`, `localhost:3000`), or a domain and its subdomains (`.example.com` or
//! `*.example.com`). Host names compare case-insensitively, and a default port (80 for http,
//! 443 for https) may be written or left out.

use hyper::header::HeaderValue;

/// Why a handshake's `Origin` was refused (403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    /// The `Origin` header is not `scheme://host[:port]` (or is not text).
    #[error("the Origin header is not a valid origin")]
    Malformed,
    /// The origin is neither this server's host nor an allowed origin.
    #[error("origin {0:?} is not allowed")]
    NotAllowed(String),
}

/// An origin split into its parts, lowercased, with the default port filled in.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    scheme: String,
    host: String,
    port: u16,
}

fn default_port(scheme: &str) -> u16 {
    match scheme {
        "https" | "wss" => 443,
        _ => 80,
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into host and optional port.
fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        (format!("[{inside}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.parse().ok()?)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

fn parse_origin(origin: &str) -> Option<Parsed> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, port) = split_authority(authority)?;
    let port = port.unwrap_or_else(|| default_port(&scheme));
    Some(Parsed { scheme, host, port })
}

/// One `allowed_origins` entry.
#[derive(Debug, PartialEq, Eq)]
enum Rule {
    Any,
    Origin(Parsed),
    Host(String, Option<u16>),
    Domain(String),
    /// The literal `null` origin (sandboxed pages, `file://`).
    Null,
}

/// The origin policy of a server, compiled from its `allowed_origins`.
#[derive(Debug, Default)]
pub(crate) struct OriginPolicy {
    rules: Vec<Rule>,
}

impl OriginPolicy {
    /// Compiles the entries; an entry that is none of the accepted forms is an error.
    pub(crate) fn new(entries: &[String]) -> Result<Self, String> {
        let mut rules = Vec::new();
        for entry in entries {
            let e = entry.trim();
            let rule = if e == "*" {
                Rule::Any
            } else if e.eq_ignore_ascii_case("null") {
                Rule::Null
            } else if let Some(domain) = e.strip_prefix("*.").or_else(|| e.strip_prefix('.')) {
                if domain.is_empty() || domain.contains([':', '/', '*']) {
                    return Err(format!("allowed origin {entry:?} is not a valid domain"));
                }
                Rule::Domain(domain.to_ascii_lowercase())
            } else if e.contains("://") {
                Rule::Origin(
                    parse_origin(e)
                        .ok_or_else(|| format!("allowed origin {entry:?} is not a valid origin"))?,
                )
            } else {
                let (host, port) = split_authority(e)
                    .ok_or_else(|| format!("allowed origin {entry:?} is not a valid host"))?;
                Rule::Host(host, port)
            };
            rules.push(rule);
        }
        Ok(OriginPolicy { rules })
    }

    /// True when every origin is allowed (`*`): worth a warning at startup.
    pub(crate) fn allows_all(&self) -> bool {
        self.rules.contains(&Rule::Any)
    }

    /// Checks a handshake's `Origin` against its `Host` and the allowed list.
    pub(crate) fn check(
        &self,
        origin: Option<&HeaderValue>,
        host: Option<&HeaderValue>,
    ) -> Result<(), OriginError> {
        let Some(origin) = origin else {
            return Ok(());
        };
        if self.allows_all() {
            return Ok(());
        }
        let text = origin.to_str().map_err(|_| OriginError::Malformed)?.trim();
        if text.eq_ignore_ascii_case("null") {
            return if self.rules.contains(&Rule::Null) {
                Ok(())
            } else {
                Err(OriginError::NotAllowed(text.to_owned()))
            };
        }
        let parsed = parse_origin(text).ok_or(OriginError::Malformed)?;
        let same_host = host
            .and_then(|h| h.to_str().ok())
            .and_then(|h| split_authority(h.trim()))
            .is_some_and(|(h, p)| {
                h == parsed.host && p.unwrap_or_else(|| default_port(&parsed.scheme)) == parsed.port
            });
        if same_host || self.rules.iter().any(|rule| matches(rule, &parsed)) {
            Ok(())
        } else {
            Err(OriginError::NotAllowed(text.to_owned()))
        }
    }
}

fn matches(rule: &Rule, origin: &Parsed) -> bool {
    match rule {
        Rule::Any => true,
        Rule::Null => false,
        Rule::Origin(o) => o == origin,
        Rule::Host(host, port) => *host == origin.host && port.is_none_or(|p| p == origin.port),
        Rule::Domain(domain) => {
            origin.host == *domain
                || origin
                    .host
                    .strip_suffix(domain.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(allowed: &[&str], origin: Option<&str>, host: Option<&str>) -> bool {
        let entries: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        let policy = OriginPolicy::new(&entries).unwrap_or_default();
        let origin = origin.map(HeaderValue::from_str).and_then(Result::ok);
        let host = host.map(HeaderValue::from_str).and_then(Result::ok);
        policy.check(origin.as_ref(), host.as_ref()).is_ok()
    }

    #[test]
    fn same_host_and_no_origin_pass_by_default() {
        assert!(check(&[], None, Some("example.com")));
        assert!(check(&[], Some("http://example.com"), Some("example.com")));
        assert!(check(
            &[],
            Some("https://EXAMPLE.com"),
            Some("example.com:443")
        ));
        assert!(check(
            &[],
            Some("http://127.0.0.1:8000"),
            Some("127.0.0.1:8000")
        ));
        assert!(check(&[], Some("http://[::1]:8000"), Some("[::1]:8000")));
        assert!(!check(
            &[],
            Some("http://127.0.0.1:8001"),
            Some("127.0.0.1:8000")
        ));
        assert!(!check(&[], Some("http://evil.com"), Some("example.com")));
        assert!(!check(
            &[],
            Some("http://example.com.evil.com"),
            Some("example.com")
        ));
        assert!(!check(&[], Some("http://example.com"), None));
        assert!(!check(&[], Some("null"), Some("example.com")));
        assert!(!check(&[], Some("example.com"), Some("example.com")));
        assert!(!check(
            &[],
            Some("http://a@example.com"),
            Some("example.com")
        ));
    }

    #[test]
    fn allowed_entries() {
        let list = [
            "https://app.example.com",
            "localhost:3000",
            ".trusted.org",
            "null",
        ];
        assert!(check(
            &list,
            Some("https://app.example.com"),
            Some("api.example.com")
        ));
        assert!(check(
            &list,
            Some("https://app.example.com:443/"),
            Some("x")
        ));
        assert!(!check(&list, Some("http://app.example.com"), Some("x")));
        assert!(check(&list, Some("http://localhost:3000"), Some("x")));
        assert!(!check(&list, Some("http://localhost:3001"), Some("x")));
        assert!(check(&list, Some("https://a.b.trusted.org"), Some("x")));
        assert!(check(&list, Some("https://trusted.org"), Some("x")));
        assert!(!check(&list, Some("https://nottrusted.org"), Some("x")));
        assert!(check(&list, Some("null"), Some("x")));
        assert!(check(&["*"], Some("http://anything"), Some("x")));
        assert!(check(
            &["*.example.com"],
            Some("http://a.example.com"),
            Some("x")
        ));
        assert!(OriginPolicy::new(&["*".to_owned()]).is_ok_and(|p| p.allows_all()));
        assert!(OriginPolicy::new(&["http://".to_owned()]).is_err());
        assert!(OriginPolicy::new(&["a/b".to_owned()]).is_err());
        assert!(OriginPolicy::new(&[".".to_owned()]).is_err());
    }
}
