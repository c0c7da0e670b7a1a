//! The scope: what is known about a connection (Channels' `scope` dict).
//!
//! One scope lives as long as its connection, so it costs one heap allocation and one pointer:
//! [`Scope`] is a thin, reference-counted handle ([`triomphe::ThinArc`], 8 bytes; cloning it
//! only bumps the count) to a single block that holds everything the scope knows. The block
//! starts with three words: the reference count, a slot that is null unless the request used
//! a method outside HTTP's standard nine (an extension method must be answered by reference,
//! so it is boxed there; a WebSocket's is always `GET`), and the length of these bytes:
//!
//! | bytes | what |
//! | --- | --- |
//! | 1 | flags: WebSocket, secure, client kind (none, IPv4, IPv6, IPv6 with flow info and scope id), root path present, user present |
//! | 1 | method: an index into the standard methods (0 is `GET`) or "extension" |
//! | 2 | path length (u16, little-endian like every number here) |
//! | 2 | query length (u16) |
//! | 4 | length of the header records (u32) |
//! | 0, 6, 18 or 26 | the client: IPv4 address and port, IPv6 address and port, or those and the flow info and scope id |
//! | path, query | the percent-decoded path, then the raw query |
//! | 2 + n, if present | the root path, as a record: its length (u16), then its bytes |
//! | 2 + n, if present | the user, as a record |
//! | header records | per header, a record of its name, then one of its value, in the order received |
//! | param records | the route params the same way, up to the end |
//!
//! Accessors read a few fixed offsets and lengths and borrow from the block; nothing is
//! allocated on read. The setters the server uses while it builds a scope (route params, root
//! path, TLS, user) rebuild the block before anyone shares it. Each part is at most 65,535
//! bytes (a longer one is cut, at a character boundary for text), the header records at most
//! 4 GiB together. The WebSocket handshake headers that no consumer needs after the upgrade
//! (`Sec-WebSocket-Key`, `-Version`, `-Extensions`, `Connection`, `Upgrade`) are not kept.
//!
//! The handle is a thin pointer (not an `Arc<[u8]>`, which is two words) because every open
//! connection holds two of them, one in its task and one in its consumer's context.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::ops::Range;

use triomphe::ThinArc;

/// Which protocol a scope belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScopeKind {
    /// A plain HTTP request.
    Http,
    /// A WebSocket connection.
    WebSocket,
}

/// The longest part (path, query, root path, user, header name or value, param) kept.
const PART_MAX: usize = u16::MAX as usize;

/// Where the numbers of the fixed header are.
const FLAGS_AT: usize = 0;
const METHOD_AT: usize = 1;
const PATH_LEN_AT: usize = 2;
const QUERY_LEN_AT: usize = 4;
const HEADERS_LEN_AT: usize = 6;
/// Bytes of the fixed header; the client (if any) follows.
const FIXED: usize = 10;

/// Flag bits.
const WEBSOCKET: u8 = 1;
const SECURE: u8 = 1 << 1;
const CLIENT_SHIFT: u32 = 2;
const CLIENT_MASK: u8 = 0b11 << CLIENT_SHIFT;
const HAS_ROOT_PATH: u8 = 1 << 4;
const HAS_USER: u8 = 1 << 5;

/// Client kinds (two bits of the flags) and how many bytes each takes.
const CLIENT_NONE: u8 = 0;
const CLIENT_V4: u8 = 1;
const CLIENT_V6: u8 = 2;
/// IPv6 with a nonzero flow info or scope id (a link-local peer), kept exactly.
const CLIENT_V6_FULL: u8 = 3;

fn client_len(kind: u8) -> usize {
    match kind {
        CLIENT_V4 => 4 + 2,
        CLIENT_V6 => 16 + 2,
        CLIENT_V6_FULL => 16 + 2 + 4 + 4,
        _ => 0,
    }
}

/// The methods stored as their index; anything else is [`EXTENSION`].
static METHODS: [http::Method; 9] = [
    http::Method::GET,
    http::Method::POST,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::HEAD,
    http::Method::OPTIONS,
    http::Method::CONNECT,
    http::Method::PATCH,
    http::Method::TRACE,
];

/// The method byte of a scope whose method is boxed in the block's header.
const EXTENSION: u8 = u8::MAX;

/// The block's fixed header besides its length: an extension method, if any.
type Extension = Option<Box<http::Method>>;

/// Appends `len | bytes` records for each name and value.
fn encode_pairs<'a>(buf: &mut Vec<u8>, pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) {
    for (name, value) in pairs {
        for part in [name, value] {
            let part = part.get(..PART_MAX).unwrap_or(part);
            buf.extend_from_slice(&len16(part.len()));
            buf.extend_from_slice(part);
        }
    }
}

/// `len` (at most [`PART_MAX`]) as the two bytes that store it.
fn len16(len: usize) -> [u8; 2] {
    u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes()
}

/// `s` cut to at most [`PART_MAX`] bytes, at a character boundary.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(PART_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// The whole records of `buf` that fit in `max` bytes.
fn whole_records(buf: &[u8], max: usize) -> &[u8] {
    if buf.len() <= max {
        return buf;
    }
    let mut rest = pairs_of(buf);
    let mut end = 0;
    while rest.next().is_some() {
        let used = buf.len() - rest.rest.len();
        if used > max {
            break;
        }
        end = used;
    }
    buf.get(..end).unwrap_or(&[])
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
        self.rest = rest.get(len..)?;
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
/// A thin handle to one shared allocation (see the [module docs](self) for its layout):
/// one pointer wide, and cloning it only counts one more owner.
#[derive(Clone)]
pub struct Scope(ThinArc<Extension, u8>);

/// Where each variable part sits in a scope's bytes.
struct Layout {
    path: Range<usize>,
    query: Range<usize>,
    root_path: Range<usize>,
    user: Option<Range<usize>>,
    headers: Range<usize>,
    params: Range<usize>,
}

/// A scope taken apart (borrowing the pieces), to be put together again by [`Parts::build`].
struct Parts<'a> {
    kind: ScopeKind,
    secure: bool,
    /// The method byte ([`EXTENSION`] when `extension` holds it).
    method: u8,
    extension: Extension,
    client: Option<SocketAddr>,
    path: &'a str,
    query: &'a str,
    /// Empty when there is none.
    root_path: &'a str,
    user: Option<&'a str>,
    /// Header records.
    headers: &'a [u8],
    /// Param records.
    params: &'a [u8],
}

impl Parts<'_> {
    /// Lays the parts out in one new allocation.
    fn build(self) -> Scope {
        let path = clip(self.path);
        let query = clip(self.query);
        let root_path = clip(self.root_path);
        let user = self.user.map(clip);
        let headers = whole_records(self.headers, u32::MAX as usize);
        let client_kind = client_kind(self.client);
        let mut flags = client_kind << CLIENT_SHIFT;
        if self.kind == ScopeKind::WebSocket {
            flags |= WEBSOCKET;
        }
        if self.secure {
            flags |= SECURE;
        }
        if !root_path.is_empty() {
            flags |= HAS_ROOT_PATH;
        }
        if user.is_some() {
            flags |= HAS_USER;
        }
        let rare = [(!root_path.is_empty()).then_some(root_path), user];
        let len = FIXED
            + client_len(client_kind)
            + path.len()
            + query.len()
            + rare.iter().flatten().map(|p| 2 + p.len()).sum::<usize>()
            + headers.len()
            + self.params.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&[flags, self.method]);
        buf.extend_from_slice(&len16(path.len()));
        buf.extend_from_slice(&len16(query.len()));
        buf.extend_from_slice(
            &u32::try_from(headers.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        encode_client(self.client, &mut buf);
        buf.extend_from_slice(path.as_bytes());
        buf.extend_from_slice(query.as_bytes());
        for part in rare.into_iter().flatten() {
            buf.extend_from_slice(&len16(part.len()));
            buf.extend_from_slice(part.as_bytes());
        }
        buf.extend_from_slice(headers);
        buf.extend_from_slice(self.params);
        Scope(ThinArc::from_header_and_slice(self.extension, &buf))
    }
}

/// How the client is stored (two bits of the flags).
fn client_kind(client: Option<SocketAddr>) -> u8 {
    match client {
        None => CLIENT_NONE,
        Some(SocketAddr::V4(_)) => CLIENT_V4,
        Some(SocketAddr::V6(a)) if a.flowinfo() == 0 && a.scope_id() == 0 => CLIENT_V6,
        Some(SocketAddr::V6(_)) => CLIENT_V6_FULL,
    }
}

/// Appends the client's bytes ([`client_len`] of its [`client_kind`]).
fn encode_client(client: Option<SocketAddr>, buf: &mut Vec<u8>) {
    match client {
        None => {}
        Some(SocketAddr::V4(a)) => {
            buf.extend_from_slice(&a.ip().octets());
            buf.extend_from_slice(&a.port().to_le_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            buf.extend_from_slice(&a.ip().octets());
            buf.extend_from_slice(&a.port().to_le_bytes());
            if client_kind(client) == CLIENT_V6_FULL {
                buf.extend_from_slice(&a.flowinfo().to_le_bytes());
                buf.extend_from_slice(&a.scope_id().to_le_bytes());
            }
        }
    }
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("kind", &self.kind())
            .field("path", &self.path())
            .field("query", &self.query_string())
            .field("params", &self.params().collect::<Vec<_>>())
            .field("client", &self.client())
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
        let (method, extension) = match METHODS.iter().position(|m| *m == method) {
            Some(i) => (u8::try_from(i).unwrap_or(0), None),
            None => (EXTENSION, Some(Box::new(method))),
        };
        Parts {
            kind,
            secure: false,
            method,
            extension,
            client,
            path,
            query,
            root_path: "",
            user: None,
            headers: &pairs,
            params: &[],
        }
        .build()
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
    pub fn with_headers<'a>(self, headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut pairs = Vec::new();
        encode_pairs(
            &mut pairs,
            headers
                .into_iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        Parts {
            headers: &pairs,
            ..self.parts()
        }
        .build()
    }

    /// The scope's bytes (after the block's fixed header).
    fn bytes(&self) -> &[u8] {
        &self.0.slice
    }

    fn flags(&self) -> u8 {
        self.bytes().get(FLAGS_AT).copied().unwrap_or(0)
    }

    fn u16_at(&self, at: usize) -> usize {
        self.bytes()
            .get(at..)
            .and_then(<[u8]>::first_chunk::<2>)
            .map_or(0, |b| u16::from_le_bytes(*b).into())
    }

    fn u32_at(&self, at: usize) -> usize {
        self.bytes()
            .get(at..)
            .and_then(<[u8]>::first_chunk::<4>)
            .map_or(0, |b| u32::from_le_bytes(*b) as usize)
    }

    /// Where each part is: a few reads of the fixed header and the rare parts' lengths.
    fn layout(&self) -> Layout {
        let flags = self.flags();
        let start = FIXED + client_len((flags & CLIENT_MASK) >> CLIENT_SHIFT);
        let path = start..start + self.u16_at(PATH_LEN_AT);
        let query = path.end..path.end + self.u16_at(QUERY_LEN_AT);
        let record = |at: usize| at + 2..at + 2 + self.u16_at(at);
        let root_path = if flags & HAS_ROOT_PATH != 0 {
            record(query.end)
        } else {
            query.end..query.end
        };
        let user = (flags & HAS_USER != 0).then(|| record(root_path.end));
        let headers_at = user.as_ref().map_or(root_path.end, |u| u.end);
        let headers = headers_at..headers_at + self.u32_at(HEADERS_LEN_AT);
        let params = headers.end..self.bytes().len().max(headers.end);
        Layout {
            path,
            query,
            root_path,
            user,
            headers,
            params,
        }
    }

    fn slice(&self, range: Range<usize>) -> &[u8] {
        self.bytes().get(range).unwrap_or(&[])
    }

    fn text(&self, range: Range<usize>) -> &str {
        std::str::from_utf8(self.slice(range)).unwrap_or("")
    }

    fn header_bytes(&self) -> &[u8] {
        self.slice(self.layout().headers)
    }

    fn param_bytes(&self) -> &[u8] {
        self.slice(self.layout().params)
    }

    /// The scope taken apart, to be rebuilt with a change.
    fn parts(&self) -> Parts<'_> {
        let layout = self.layout();
        let flags = self.flags();
        Parts {
            kind: self.kind(),
            secure: flags & SECURE != 0,
            method: self.bytes().get(METHOD_AT).copied().unwrap_or(0),
            extension: self.0.header.header.clone(),
            client: self.client(),
            path: self.text(layout.path),
            query: self.text(layout.query),
            root_path: self.text(layout.root_path),
            user: layout.user.map(|u| self.text(u)),
            headers: self.slice(layout.headers),
            params: self.slice(layout.params),
        }
    }

    pub(crate) fn set_root_path(&mut self, root: &str) {
        if !root.is_empty() {
            *self = Parts {
                root_path: root,
                ..self.parts()
            }
            .build();
        }
    }

    pub(crate) fn set_params(&mut self, params: &[(String, String)]) {
        if params.is_empty() && self.param_bytes().is_empty() {
            return;
        }
        let mut pairs = Vec::new();
        encode_pairs(
            &mut pairs,
            params.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        *self = Parts {
            params: &pairs,
            ..self.parts()
        }
        .build();
    }

    /// Sets the authenticated user (what auth middleware found).
    pub fn set_user(&mut self, user: Option<String>) {
        if user.is_none() && self.flags() & HAS_USER == 0 {
            return;
        }
        *self = Parts {
            user: user.as_deref(),
            ..self.parts()
        }
        .build();
    }

    /// HTTP or WebSocket.
    pub fn kind(&self) -> ScopeKind {
        if self.flags() & WEBSOCKET != 0 {
            ScopeKind::WebSocket
        } else {
            ScopeKind::Http
        }
    }

    /// The request method (`GET` for WebSockets).
    pub fn method(&self) -> &http::Method {
        if let Some(method) = &self.0.header.header {
            return method;
        }
        let index = self.bytes().get(METHOD_AT).copied().unwrap_or(0);
        METHODS.get(usize::from(index)).unwrap_or(&METHODS[0])
    }

    /// The percent-decoded path, without the root path.
    pub fn path(&self) -> &str {
        self.text(self.layout().path)
    }

    /// The raw query string (without `?`).
    pub fn query_string(&self) -> &str {
        self.text(self.layout().query)
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
        self.text(self.layout().root_path)
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
        let kind = (self.flags() & CLIENT_MASK) >> CLIENT_SHIFT;
        let at = self.bytes().get(FIXED..)?;
        match kind {
            CLIENT_V4 => {
                let (ip, rest) = at.split_first_chunk::<4>()?;
                let port = rest.first_chunk::<2>()?;
                Some(SocketAddr::from((
                    Ipv4Addr::from(*ip),
                    u16::from_le_bytes(*port),
                )))
            }
            CLIENT_V6 | CLIENT_V6_FULL => {
                let (ip, rest) = at.split_first_chunk::<16>()?;
                let (port, rest) = rest.split_first_chunk::<2>()?;
                let (flowinfo, scope_id) = if kind == CLIENT_V6_FULL {
                    let (flowinfo, rest) = rest.split_first_chunk::<4>()?;
                    let scope_id = rest.first_chunk::<4>()?;
                    (u32::from_le_bytes(*flowinfo), u32::from_le_bytes(*scope_id))
                } else {
                    (0, 0)
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(*ip),
                    u16::from_le_bytes(*port),
                    flowinfo,
                    scope_id,
                )))
            }
            _ => None,
        }
    }

    /// The URL scheme the client used: `ws`/`wss` for WebSockets, `http`/`https` otherwise
    /// (`wss`/`https` over our TLS, or when a trusted proxy says `X-Forwarded-Proto: https`).
    pub fn scheme(&self) -> &'static str {
        match (
            self.kind() == ScopeKind::WebSocket,
            self.flags() & SECURE != 0,
        ) {
            (true, false) => "ws",
            (true, true) => "wss",
            (false, false) => "http",
            (false, true) => "https",
        }
    }

    pub(crate) fn set_secure(&mut self, secure: bool) {
        if secure != (self.flags() & SECURE != 0) {
            *self = Parts {
                secure,
                ..self.parts()
            }
            .build();
        }
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.layout().user.map(|u| self.text(u))
    }

    /// Bytes of the scope's one allocation as requested from the allocator: the block's
    /// reference count, its header (extension method slot and length) and the bytes.
    #[cfg(test)]
    fn allocation_size(&self) -> usize {
        let counts = std::mem::size_of::<usize>();
        let header = std::mem::size_of::<triomphe::HeaderWithLength<Extension>>();
        (counts + header + self.bytes().len()).next_multiple_of(std::mem::align_of::<usize>())
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
        let client = "10.1.2.3:4567".parse().ok();
        let mut s = Scope::new(
            ScopeKind::Http,
            http::Method::POST,
            "/a/b",
            "q=1",
            &h,
            client,
        );
        s.set_params(&[("room".into(), "lobby".into())]);
        s.set_root_path("/canal");
        s.set_user(Some("ann".into()));
        s.set_secure(true);
        assert_eq!(s.kind(), ScopeKind::Http);
        assert_eq!(s.path(), "/a/b");
        assert_eq!(s.query_string(), "q=1");
        assert_eq!(s.method(), http::Method::POST);
        assert_eq!(s.header("origin"), Some("http://x"));
        assert_eq!(s.param("room").unwrap(), "lobby");
        assert_eq!(s.root_path(), "/canal");
        assert_eq!(s.user(), Some("ann"));
        assert_eq!(s.client(), client);
        assert_eq!(s.scheme(), "https");
        // Every part at its place in the bytes, the rare ones as records before the headers.
        let mut expected = vec![
            SECURE | (CLIENT_V4 << CLIENT_SHIFT) | HAS_ROOT_PATH | HAS_USER,
            1, // POST
            4,
            0, // path length
            3,
            0, // query length
            2 + 6 + 2 + 8,
            0,
            0,
            0, // header records length
            10,
            1,
            2,
            3,
            0xd7,
            0x11, // 10.1.2.3, port 4567
        ];
        expected.extend_from_slice(b"/a/bq=1");
        expected.extend_from_slice(b"\x06\x00/canal\x03\x00ann");
        expected.extend_from_slice(b"\x06\x00origin\x08\x00http://x");
        expected.extend_from_slice(b"\x04\x00room\x05\x00lobby");
        assert_eq!(s.bytes(), expected);
        let s = s.with_headers([("x-a", "1")]);
        assert_eq!(s.header("origin"), None);
        assert_eq!(s.header("x-a"), Some("1"));
        assert_eq!(
            s.param("room").unwrap(),
            "lobby",
            "params survive new headers"
        );
        assert_eq!(
            (s.root_path(), s.user(), s.client(), s.scheme()),
            ("/canal", Some("ann"), client, "https"),
            "so does the rest"
        );
        let plain = Scope::websocket("/ws/?a=b");
        assert_eq!(plain.method(), http::Method::GET);
        assert_eq!((plain.path(), plain.query_string()), ("/ws/", "a=b"));
        assert_eq!(plain.root_path(), "");
        assert_eq!(plain.user(), None);
        assert_eq!(plain.scheme(), "ws");
    }

    /// The demo's chat connection: `/ws/chat/room-12/`, a host (and an origin), one param.
    fn demo(origin: bool) -> Scope {
        let mut h = http::HeaderMap::new();
        h.insert("host", "127.0.0.1:8000".parse().unwrap());
        if origin {
            h.insert("origin", "http://127.0.0.1:8000".parse().unwrap());
        }
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h.insert("sec-websocket-version", "13".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "Upgrade".parse().unwrap());
        let mut s = Scope::new(
            ScopeKind::WebSocket,
            http::Method::GET,
            "/ws/chat/room-12/",
            "",
            &h,
            "127.0.0.1:50312".parse().ok(),
        );
        s.set_secure(false);
        s.set_params(&[("room".into(), "room-12".into())]);
        s.set_root_path("");
        s
    }

    #[test]
    fn a_scope_is_one_pointer_to_one_small_allocation() {
        // The handle is one thin pointer (the old scope was 88 bytes inline, behind an Arc,
        // with two or three more allocations), and so is an optional one.
        assert_eq!(std::mem::size_of::<Scope>(), 8);
        assert_eq!(std::mem::size_of::<Option<Scope>>(), 8);
        fn shared<T: Send + Sync>() {}
        shared::<Scope>();
        let s = demo(false);
        assert_eq!(s.param("room").unwrap(), "room-12");
        assert_eq!(s.header("host"), Some("127.0.0.1:8000"));
        assert_eq!(s.headers().count(), 1, "handshake headers are dropped");
        // 10 fixed + 6 client + 17 path + 22 host + 15 param bytes, after 24 of count,
        // extension slot and length: 94 bytes, 96 with alignment (the old layout asked for
        // 104 + 17 + 37 in three allocations).
        assert_eq!(s.bytes().len(), 70);
        assert_eq!(s.allocation_size(), 96);
        let s = demo(true);
        assert_eq!(s.header("origin"), Some("http://127.0.0.1:8000"));
        assert!(s.allocation_size() <= 128, "{}", s.allocation_size());
        // A clone shares the bytes.
        let c = s.clone();
        assert!(std::ptr::eq(c.bytes(), s.bytes()));
    }

    #[test]
    fn clients_round_trip() {
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let link_local = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 8000, 7, 3));
        for client in [
            None,
            "192.0.2.7:0".parse().ok(),
            "127.0.0.1:65535".parse().ok(),
            Some(v6),
            Some(link_local),
            "[::ffff:192.0.2.7]:80".parse().ok(),
        ] {
            for query in ["", "a=1&b=%20"] {
                let mut s = Scope::new(
                    ScopeKind::WebSocket,
                    http::Method::GET,
                    "/ws/x/",
                    query,
                    &http::HeaderMap::new(),
                    client,
                );
                s.set_params(&[("x".into(), "é".into())]);
                assert_eq!(s.client(), client);
                assert_eq!((s.path(), s.query_string()), ("/ws/x/", query));
                assert_eq!(s.param("x").unwrap(), "é");
                assert_eq!(s.headers().count(), 0);
                assert_eq!(s.method(), http::Method::GET);
                assert_eq!(s.kind(), ScopeKind::WebSocket);
                let debug = format!("{s:?}");
                assert!(debug.contains("/ws/x/"), "{debug}");
            }
        }
    }

    #[test]
    fn rare_parts_round_trip_in_any_order() {
        let ext = http::Method::from_bytes(b"PROPFIND").unwrap();
        let long = http::Method::from_bytes(b"A-VERY-LONG-EXTENSION-METHOD").unwrap();
        let methods = [
            http::Method::GET,
            http::Method::POST,
            http::Method::PUT,
            http::Method::DELETE,
            http::Method::HEAD,
            http::Method::OPTIONS,
            http::Method::CONNECT,
            http::Method::PATCH,
            http::Method::TRACE,
            ext,
            long,
        ];
        for method in methods {
            let mut s = Scope::new(
                ScopeKind::Http,
                method.clone(),
                "/p",
                "",
                &http::HeaderMap::new(),
                None,
            );
            assert_eq!(s.method(), method);
            assert_eq!((s.root_path(), s.user()), ("", None));
            s.set_user(None);
            assert_eq!(s.user(), None);
            s.set_user(Some(String::new()));
            assert_eq!(s.user(), Some(""), "an empty user is still a user");
            s.set_user(Some("bob".into()));
            s.set_root_path("/root");
            s.set_params(&[("a".into(), "1".into())]);
            s.set_root_path("");
            assert_eq!(s.root_path(), "/root", "an empty root path changes nothing");
            assert_eq!((s.user(), s.param("a").unwrap()), (Some("bob"), "1"));
            s.set_user(None);
            assert_eq!((s.user(), s.root_path()), (None, "/root"));
            s.set_params(&[]);
            assert_eq!(s.params().count(), 0);
            assert_eq!((s.method(), s.path(), s.scheme()), (&method, "/p", "http"));
        }
    }

    #[test]
    fn header_values_keep_their_bytes() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-raw",
            http::HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap(),
        );
        h.append("x-raw", http::HeaderValue::from_static("second"));
        h.insert("x-empty", http::HeaderValue::from_static(""));
        let s = Scope::new(ScopeKind::Http, http::Method::GET, "/", "", &h, None);
        let raw: Vec<_> = s.headers().filter(|(n, _)| *n == "x-raw").collect();
        assert_eq!(raw, [("x-raw", &b"caf\xe9 \xff"[..]), ("x-raw", b"second")]);
        assert_eq!(s.header("x-raw"), None, "the first value is not UTF-8");
        assert_eq!(s.header("X-Empty"), Some(""));
    }

    #[test]
    fn parts_are_cut_at_u16() {
        // 2 bytes per 'é': 65,535 is inside one, so the cut falls before it.
        let path = "é".repeat(40_000);
        let value = "v".repeat(70_000);
        let mut s = Scope::websocket(&path).with_headers([("x-long", value.as_str())]);
        s.set_user(Some("u".repeat(70_000)));
        s.set_params(&[("p".into(), "w".repeat(70_000))]);
        assert_eq!(s.path().len(), 65_534);
        assert_eq!(s.header("x-long").map(str::len), Some(65_535));
        assert_eq!(s.user().map(str::len), Some(65_535));
        assert_eq!(s.param("p").map(str::len).ok(), Some(65_535));
        assert_eq!(s.query_string(), "");
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
