//! The scope: what is known about a connection (Channels' `scope` dict).
//!
//! One scope lives as long as its connection, so it is stored compactly: the path, query, route
//! params and headers share as few allocations as possible, and the WebSocket handshake headers
//! that no consumer needs after the upgrade (`Sec-WebSocket-Key`, `-Version`, `-Extensions`,
//! `Connection`, `Upgrade`) are not kept.

use std::net::SocketAddr;

/// Which protocol a scope belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScopeKind {
    /// A plain HTTP request.
    Http,
    /// A WebSocket connection.
    WebSocket,
}

/// Name/value pairs packed in one buffer: `u16 len | bytes` for each name then value.
#[derive(Clone, Default, PartialEq, Eq)]
struct Pairs {
    buf: Box<[u8]>,
}

impl Pairs {
    fn from_iter<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Pairs {
        let mut buf = Vec::new();
        for (name, value) in pairs {
            for part in [name, value] {
                let len = part.len().min(u16::MAX as usize);
                buf.extend_from_slice(&(len as u16).to_le_bytes());
                buf.extend_from_slice(&part[..len]);
            }
        }
        Pairs {
            buf: buf.into_boxed_slice(),
        }
    }

    fn iter(&self) -> PairsIter<'_> {
        PairsIter { rest: &self.buf }
    }
}

struct PairsIter<'a> {
    rest: &'a [u8],
}

impl<'a> PairsIter<'a> {
    fn part(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<2>()?;
        let len = u16::from_le_bytes(*len) as usize;
        let part = rest.get(..len)?;
        self.rest = &rest[len..];
        Some(part)
    }
}

impl<'a> Iterator for PairsIter<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let name = self.part()?;
        let value = self.part()?;
        Some((name, value))
    }
}

/// What is known about a connection: path, query, headers, peer, route params, user.
#[derive(Clone)]
pub struct Scope {
    kind: ScopeKind,
    method: http::Method,
    path: Box<str>,
    query: Box<str>,
    root_path: Box<str>,
    headers: Pairs,
    params: Pairs,
    client: Option<SocketAddr>,
    user: Option<Box<str>>,
    /// Whether the client reached us over TLS (ours, or a trusted proxy's).
    secure: bool,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("params", &self.params().collect::<Vec<_>>())
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Headers dropped after a WebSocket handshake: nothing reads them later.
const HANDSHAKE_ONLY: [&str; 5] = [
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "connection",
    "upgrade",
];

impl Scope {
    /// Builds a scope. `path` is the percent-decoded path; header names are lowercased.
    pub fn new(
        kind: ScopeKind,
        method: http::Method,
        path: &str,
        query: &str,
        headers: &http::HeaderMap,
        client: Option<SocketAddr>,
    ) -> Scope {
        let keep = |name: &str| kind != ScopeKind::WebSocket || !HANDSHAKE_ONLY.contains(&name);
        Scope {
            kind,
            method,
            path: path.into(),
            query: query.into(),
            root_path: "".into(),
            headers: Pairs::from_iter(
                headers
                    .iter()
                    .filter(|(n, _)| keep(n.as_str()))
                    .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
            ),
            params: Pairs::default(),
            client,
            user: None,
            secure: false,
        }
    }

    /// A WebSocket scope for tests: path and optional query, no headers.
    pub fn websocket(path: &str) -> Scope {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        Scope::new(
            ScopeKind::WebSocket,
            http::Method::GET,
            path,
            query,
            &http::HeaderMap::new(),
            None,
        )
    }

    /// Replaces the headers (tests and middleware).
    pub fn with_headers<'a>(
        mut self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        self.headers = Pairs::from_iter(
            headers
                .into_iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        self
    }

    pub(crate) fn set_root_path(&mut self, root: &str) {
        if !root.is_empty() {
            self.root_path = root.into();
        }
    }

    pub(crate) fn set_params(&mut self, params: &[(String, String)]) {
        self.params = Pairs::from_iter(params.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    }

    /// Sets the authenticated user (what auth middleware found).
    pub fn set_user(&mut self, user: Option<String>) {
        self.user = user.map(String::into_boxed_str);
    }

    /// HTTP or WebSocket.
    pub fn kind(&self) -> ScopeKind {
        self.kind
    }

    /// The request method (`GET` for WebSockets).
    pub fn method(&self) -> &http::Method {
        &self.method
    }

    /// The percent-decoded path, without the root path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query string (without `?`).
    pub fn query_string(&self) -> &str {
        &self.query
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            (k == name).then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    }

    /// The root path the application is mounted under (`--root-path`).
    pub fn root_path(&self) -> &str {
        &self.root_path
    }

    /// The headers as (lowercase name, value) pairs, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (std::str::from_utf8(n).unwrap_or(""), v))
    }

    /// The first value of header `name` (case-insensitive), if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn subprotocols(&self) -> impl Iterator<Item = &str> {
        self.headers()
            .filter(|(n, _)| *n == "sec-websocket-protocol")
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// The route params, in order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(n, v)| {
            (
                std::str::from_utf8(n).unwrap_or(""),
                std::str::from_utf8(v).unwrap_or(""),
            )
        })
    }

    /// Route param `name`, or an error naming it.
    pub fn param(&self, name: &str) -> Result<&str, crate::Error> {
        self.params()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| crate::Error::msg(format!("route has no parameter {name:?}")))
    }

    /// The client's address, if known: the peer, or, behind a trusted proxy, the address
    /// it forwarded in `X-Forwarded-For` (with port 0).
    pub fn client(&self) -> Option<SocketAddr> {
        self.client
    }

    /// The URL scheme the client used: `ws`/`wss` for WebSockets, `http`/`https` otherwise
    /// (`wss`/`https` over our TLS, or when a trusted proxy says `X-Forwarded-Proto: https`).
    pub fn scheme(&self) -> &'static str {
        match (self.kind == ScopeKind::WebSocket, self.secure) {
            (true, false) => "ws",
            (true, true) => "wss",
            (false, false) => "http",
            (false, true) => "https",
        }
    }

    pub(crate) fn set_secure(&mut self, secure: bool) {
        self.secure = secure;
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_packed_and_handshake_ones_dropped() {
        let mut h = http::HeaderMap::new();
        h.insert("host", "example.com".parse().unwrap());
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h.insert("sec-websocket-protocol", "a, b".parse().unwrap());
        h.append("cookie", "x=1".parse().unwrap());
        let s = Scope::new(
            ScopeKind::WebSocket,
            http::Method::GET,
            "/ws/chat/lobby/",
            "token=a%20b&x",
            &h,
            None,
        );
        assert_eq!(s.header("Host"), Some("example.com"));
        assert_eq!(s.header("sec-websocket-key"), None);
        assert_eq!(s.subprotocols().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(s.query("token").as_deref(), Some("a b"));
        assert_eq!(s.query("x").as_deref(), Some(""));
        assert_eq!(s.query("nope"), None);
    }

    #[test]
    fn params_round_trip() {
        let mut s = Scope::websocket("/ws/chat/lobby/");
        s.set_params(&[("room".into(), "lobby".into()), ("n".into(), "1".into())]);
        assert_eq!(s.param("room").unwrap(), "lobby");
        assert!(s.param("zz").is_err());
        assert_eq!(s.params().count(), 2);
    }
}
