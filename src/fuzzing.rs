//! Entry points for the property harness (`examples/fuzz.rs`, run by `scripts/fuzz.sh`): each
//! takes arbitrary bytes, runs one parser the server exposes to clients, and panics if a
//! property breaks. Not a stable API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::server::ws::codec::{Decoder, Incoming, Limits};

fn summary(events: &[Incoming]) -> Vec<String> {
    events.iter().map(|e| format!("{e:?}")).collect()
}

/// The WebSocket decoder: never panics, and gives the same events and the same error whether
/// `data` arrives whole, one byte at a time, or in chunks of `chunk` bytes.
pub fn websocket_frames(data: &[u8], chunk: usize) {
    let limits = || Limits {
        max_frame_size: 4096,
        max_message_size: 8192,
    };
    let run = |size: usize| {
        let limits = limits();
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        let mut error = None;
        for piece in data.chunks(size.max(1)) {
            if let Err(e) = decoder.feed(&limits, piece, &mut out) {
                error = Some(e.close_code());
                break;
            }
        }
        (summary(&out), error)
    };
    let whole = run(data.len());
    let bytewise = run(1);
    let chunked = run(chunk);
    assert_eq!(whole, bytewise, "one piece vs one byte at a time");
    assert_eq!(whole, chunked, "one piece vs chunks of {chunk}");
}

/// The checks an upgrade request goes through before routing (header names and values, the
/// accept key, `Origin`, tokens, proxy headers), on headers parsed from arbitrary bytes.
pub fn upgrade_headers(data: &[u8]) {
    let mut headers = hyper::HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name),
            hyper::header::HeaderValue::from_bytes(value.trim_ascii()),
        ) {
            headers.append(n, v);
        }
    }
    let checked = crate::server::http_check_headers(&headers);
    if checked.is_ok() {
        for (name, value) in &headers {
            assert!(!name.as_str().contains('_'));
            assert!(
                !value
                    .as_bytes()
                    .iter()
                    .any(|b| [0x0b, 0x0c, 0x1c, 0x1d, 0x1e, 0x85].contains(b))
            );
        }
    }
    if let Some(key) = headers.get(hyper::header::SEC_WEBSOCKET_KEY) {
        assert_eq!(crate::server::http_accept_key(key.as_bytes()).len(), 28);
    }
    let policy = crate::server::origin::OriginPolicy::new(&["https://app.example.com".to_owned()])
        .unwrap_or_default();
    let _ = policy.check(
        headers.get(hyper::header::ORIGIN),
        headers.get(hyper::header::HOST),
    );
    let query = std::str::from_utf8(data).ok();
    if let Some((token, _)) = crate::server::auth::find_token(&headers, query) {
        let secret = crate::server::auth::JwtSecret::new("fuzz");
        let _ = crate::server::auth::verify_hs256(&token, &secret, 1_800_000_000);
    }
    if let Some(q) = query {
        let redacted = crate::server::auth::redact_query(q);
        for pair in redacted.split('&') {
            if let Some(v) = pair.strip_prefix("token=") {
                assert_eq!(v, "[redacted]");
            }
        }
    }
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
    let _ = crate::server::proxy_resolve(&[peer.ip()], Some(peer), &headers);
}

/// Route matching: never panics, and a `{param}` never captures a `/`.
pub fn route_matching(path: &str) {
    use crate::routing::Target::Endpoint;
    use crate::routing::{Router, path as p, re_path};
    static ROUTER: std::sync::OnceLock<Router<u8>> = std::sync::OnceLock::new();
    let router = ROUTER.get_or_init(|| {
        Router::new()
            .route(p("/ws/chat/{room}/", Endpoint(1)))
            .route(p("/api/{a}/{b}", Endpoint(2)))
            .route(re_path(r"^/re/(?P<id>[0-9]+)/$", Endpoint(3)))
    });
    if let Some(found) = router.resolve(path) {
        for (name, value) in &found.params {
            assert!(
                !value.contains('/'),
                "{name} captured {value:?} in {path:?}"
            );
        }
    }
}

/// Channel and group name validation: never panics, and what passes follows the rules.
pub fn names(name: &str) {
    use crate::layer::{check_channel_name, check_group_name};
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if check_group_name(name).is_ok() {
        assert!(!name.is_empty() && name.len() < 100 && name.chars().all(plain));
    }
    if check_channel_name(name).is_ok() {
        assert!(!name.is_empty() && name.len() < 100);
        assert!(name.matches('!').count() <= 1 && !name.starts_with('!'));
        assert!(name.chars().all(|c| plain(c) || c == '!'));
    }
}

/// Msgpack decoding of layer messages: never panics, and decoding what was encoded from a
/// decoded message gives the same bytes again (a fixed point).
pub fn msgpack(data: &[u8]) {
    if let Ok(message) = crate::Message::from_msgpack(data) {
        let once = message.to_msgpack();
        let again = crate::Message::from_msgpack(&once)
            .unwrap_or_else(|e| panic!("re-decoding our own encoding failed: {e}"));
        assert_eq!(once, again.to_msgpack(), "encoding is not a fixed point");
    }
}
