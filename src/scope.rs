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

/// Appends `len | bytes` records for each name and value.
fn encode_pairs<'a>(buf: &mut Vec<u8>, pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
    for (name, value) in pairs {
        for part in [name, value] {
            let len = part.len().min(u16::MAX as usize);
            buf.extend_from_slice(&(len as u16).to_le_bytes());
            buf.extend_from_slice(&part[..len]);
        }
    }
}

fn pairs_of(buf: &[u8]) -> PairsIter<'_> {
    PairsIter { rest: buf }
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
///
/// Stored compactly because one lives as long as each connection: the path and query share
/// one buffer, the headers and params another (`u16 len | bytes` records), and what most
/// connections lack (a method other than GET, a root path, a user) sits behind one pointer.
#[derive(Clone)]
pub struct Scope {
    kind: ScopeKind,
    /// Whether the client reached us over TLS (ours, or a trusted proxy's).
    secure: bool,
    /// Where the query starts in `text`.
    query_at: u32,
    /// Where the params start in `pairs` (the headers come before).
    params_at: u32,
    /// The path, then the query.
    text: Box<str>,
    /// Header records, then param records.
    pairs: Box<[u8]>,
    client: Option<SocketAddr>,
    rare: Option<Box<Rare>>,
}

/// The parts of a scope most connections do not have.
#[derive(Clone, Default)]
struct Rare {
    method: Option<http::Method>,
    root_path: Box<str>,
    user: Option<Box<str>>,
}

/// What `method()` answers when no other method was recorded.
static GET: http::Method = http::Method::GET;

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("kind", &self.kind)
            .field("path", &self.path())
            .field("query", &self.query_string())
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
        let mut pairs = Vec::new();
        encode_pairs(
            &mut pairs,
            headers
                .iter()
                .filter(|(n, _)| keep(n.as_str()))
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        let mut text = String::with_capacity(path.len() + query.len());
        text.push_str(path);
        text.push_str(query);
        let rare = (method != http::Method::GET).then(|| {
            Box::new(Rare {
                method: Some(method),
                ..Rare::default()
            })
        });
        Scope {
            kind,
            query_at: path.len() as u32,
            params_at: pairs.len() as u32,
            text: text.into_boxed_str(),
            pairs: pairs.into_boxed_slice(),
            client,
            rare,
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
        let mut pairs = Vec::new();
        encode_pairs(
            &mut pairs,
            headers
                .into_iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        let params_at = pairs.len() as u32;
        pairs.extend_from_slice(self.param_bytes());
        self.params_at = params_at;
        self.pairs = pairs.into_boxed_slice();
        self
    }

    fn header_bytes(&self) -> &[u8] {
        self.pairs.get(..self.params_at as usize).unwrap_or(&[])
    }

    fn param_bytes(&self) -> &[u8] {
        self.pairs.get(self.params_at as usize..).unwrap_or(&[])
    }

    fn rare_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    pub(crate) fn set_root_path(&mut self, root: &str) {
        if !root.is_empty() {
            self.rare_mut().root_path = root.into();
        }
    }

    pub(crate) fn set_params(&mut self, params: &[(String, String)]) {
        let mut pairs = self.header_bytes().to_vec();
        encode_pairs(
            &mut pairs,
            params.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        self.pairs = pairs.into_boxed_slice();
    }

    /// Sets the authenticated user (what auth middleware found).
    pub fn set_user(&mut self, user: Option<String>) {
        if user.is_none() && self.rare.is_none() {
            return;
        }
        self.rare_mut().user = user.map(String::into_boxed_str);
    }

    /// HTTP or WebSocket.
    pub fn kind(&self) -> ScopeKind {
        self.kind
    }

    /// The request method (`GET` for WebSockets).
    pub fn method(&self) -> &http::Method {
        self.rare
            .as_ref()
            .and_then(|r| r.method.as_ref())
            .unwrap_or(&GET)
    }

    /// The percent-decoded path, without the root path.
    pub fn path(&self) -> &str {
        self.text.get(..self.query_at as usize).unwrap_or("")
    }

    /// The raw query string (without `?`).
    pub fn query_string(&self) -> &str {
        self.text.get(self.query_at as usize..).unwrap_or("")
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        self.query_string().split('&').find_map(|pair| {
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
        self.rare.as_ref().map_or("", |r| &r.root_path)
    }

    /// The headers as (lowercase name, value) pairs, in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        pairs_of(self.header_bytes()).map(|(n, v)| (std::str::from_utf8(n).unwrap_or(""), v))
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
        pairs_of(self.param_bytes()).map(|(n, v)| {
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
        self.rare.as_ref().and_then(|r| r.user.as_deref())
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
    fn compact_layout_keeps_every_part_apart() {
        let mut h = http::HeaderMap::new();
        h.insert("origin", "http://x".parse().unwrap());
        let mut s = Scope::new(ScopeKind::Http, http::Method::POST, "/a/b", "q=1", &h, None);
        s.set_params(&[("room".into(), "lobby".into())]);
        s.set_root_path("/canal");
        s.set_user(Some("ann".into()));
        assert_eq!(s.path(), "/a/b");
        assert_eq!(s.query_string(), "q=1");
        assert_eq!(s.method(), http::Method::POST);
        assert_eq!(s.header("origin"), Some("http://x"));
        assert_eq!(s.param("room").unwrap(), "lobby");
        assert_eq!(s.root_path(), "/canal");
        assert_eq!(s.user(), Some("ann"));
        let s = s.with_headers([("x-a", "1")]);
        assert_eq!(s.header("origin"), None);
        assert_eq!(s.header("x-a"), Some("1"));
        assert_eq!(
            s.param("room").unwrap(),
            "lobby",
            "params survive new headers"
        );
        let plain = Scope::websocket("/ws/?a=b");
        assert_eq!(plain.method(), http::Method::GET);
        assert_eq!((plain.path(), plain.query_string()), ("/ws/", "a=b"));
        assert_eq!(plain.root_path(), "");
        assert!(std::mem::size_of::<Scope>() <= 96);
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
