//! The HTTP side: one hyper connection per TCP connection, routing of plain requests to HTTP
//! consumers, and validation of WebSocket upgrades before a consumer sees them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use base64::Engine;
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::stats::HandshakeFailure;
use super::ws::conn::{Decision, fmt_peer};
use super::ws::{UpgradeSource, websocket_task};
use super::{ConnGuard, Shared, coarse_secs};
use crate::consumer::Request;
use crate::scope::{Scope, ScopeKind};

type Body = Full<Bytes>;

/// Largest request head (request line + headers): hyper's read buffer, and the limit past
/// which a request gets 431.
const MAX_HEAD: usize = 64 * 1024;

/// GUID from RFC 6455 §1.3 for the `Sec-WebSocket-Accept` digest.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn plain(status: u16, text: &str) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Answers 503 to a connection over the limit, then closes it.
pub(crate) async fn refuse_busy<I: AsyncWrite + Unpin>(mut stream: I) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 26\r\nconnection: close\r\n\r\nserver at connection limit",
        ),
    )
    .await;
}

/// Answers 503 to a connection over the per-address limit, then closes it.
pub(crate) async fn refuse_busy_ip<I: AsyncWrite + Unpin>(mut stream: I) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nconnection: close\r\n\r\ntoo many connections from this address",
        ),
    )
    .await;
}

/// Requests in flight and the last moment one ended, for the keep-alive idle timeout.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: AtomicU32,
}

/// Runs the TLS handshake (within the header timeout), then serves the connection.
pub(crate) async fn serve_tls<I>(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: I,
    peer: Option<SocketAddr>,
    guard: ConnGuard,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio::time::timeout(shared.config.header_timeout, acceptor.accept(stream));
    tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => serve_connection(shared, tls, peer, guard).await,
            Ok(Err(e)) => {
                tracing::debug!(peer = fmt_peer(peer), error = %e, "TLS handshake failed");
                shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                tracing::debug!(peer = fmt_peer(peer), "TLS handshake timed out");
                shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            }
        },
        () = shared.shutdown.cancelled() => {}
    }
}

/// Serves one connection with hyper until it closes, is idle too long, or the server stops.
pub(crate) async fn serve_connection<I>(
    shared: Arc<Shared>,
    stream: I,
    peer: Option<SocketAddr>,
    guard: ConnGuard,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    activity.last.store(coarse_secs(), Ordering::Relaxed);
    let svc = {
        let shared = shared.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let activity = activity.clone();
            async move {
                activity.in_flight.fetch_add(1, Ordering::Relaxed);
                let resp = handle(&shared, peer, req).await;
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                activity.last.store(coarse_secs(), Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.header_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_HEAD);
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let idle = shared.config.http_idle_timeout;
    let mut check = tokio::time::interval(idle.max(std::time::Duration::from_millis(100)) / 2);
    check.tick().await;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = fmt_peer(peer), error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            () = shared.shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick(), if !shutting_down => {
                let quiet = coarse_secs().saturating_sub(activity.last.load(Ordering::Relaxed));
                if activity.in_flight.load(Ordering::Relaxed) == 0 && quiet as u64 >= idle.as_secs() {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    drop(guard);
}

/// Where a request path stands with respect to the root path.
enum Rooted<'a> {
    /// Inside it: route this (the root path stripped).
    Path(&'a str),
    /// The bare prefix: redirect to the prefix with a slash.
    Bare,
    /// Outside it.
    Outside,
}

fn strip_root<'a>(root: &str, path: &'a str) -> Rooted<'a> {
    if root.is_empty() {
        return Rooted::Path(path);
    }
    match path.strip_prefix(root) {
        Some("") => Rooted::Bare,
        Some(rest) if rest.starts_with('/') => Rooted::Path(rest),
        _ => Rooted::Outside,
    }
}

fn redirect_to_root(root: &str, query: Option<&str>) -> hyper::Response<Body> {
    let mut location = format!("{root}/");
    if let Some(q) = query {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = plain(308, "Permanent Redirect");
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Why a request's headers are refused before routing (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BadHeader {
    /// A header name holds `_`. Behind a proxy or framework that maps `-` and `_` to the same
    /// key (CGI/WSGI-style environments), it could spoof a trusted header (daphne's fix for
    /// header smuggling).
    #[error("header name {0:?} holds an underscore")]
    Underscore(String),
    /// A header name holds a byte outside the RFC 9110 token set.
    #[error("header name holds a control or separator character")]
    NameCharacter,
    /// A header value holds a control character, or a byte that Python's `str.splitlines`
    /// treats as a line break (`\x0b \x0c \x1c \x1d \x1e \x85`): a downstream consumer
    /// that splits on them would see an injected header.
    #[error("header {0:?} has a value with a control or line-break character")]
    ValueCharacter(String),
}

/// Checks every header of a request (daphne's CVE fixes): names are RFC 9110 tokens without
/// `_`, values hold no control characters and none of the bytes Python treats as line breaks.
pub(crate) fn check_headers(headers: &hyper::HeaderMap) -> Result<(), BadHeader> {
    for (name, value) in headers {
        let n = name.as_str();
        if n.contains('_') {
            return Err(BadHeader::Underscore(n.to_owned()));
        }
        if !n.bytes().all(is_tchar) {
            return Err(BadHeader::NameCharacter);
        }
        let bad = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f || b == 0x85;
        if value.as_bytes().iter().any(|&b| bad(b)) {
            return Err(BadHeader::ValueCharacter(n.to_owned()));
        }
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Routes one request: WebSocket upgrade or plain HTTP.
async fn handle(
    shared: &Arc<Shared>,
    peer: Option<SocketAddr>,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let head_size = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_size > MAX_HEAD {
        shared.stats.bad_headers.fetch_add(1, Ordering::Relaxed);
        let mut resp = plain(431, "request headers too large");
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    if let Err(e) = check_headers(req.headers()) {
        tracing::debug!(peer = fmt_peer(peer), error = %e, "bad request headers");
        shared.stats.bad_headers.fetch_add(1, Ordering::Relaxed);
        let mut resp = plain(400, &e.to_string());
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let raw_path = req.uri().path().to_owned();
    let Ok(decoded) = percent_encoding::percent_decode_str(&raw_path).decode_utf8() else {
        return plain(400, "path is not valid UTF-8");
    };
    let path = match strip_root(&shared.root_path, &decoded) {
        Rooted::Path(path) => path.to_owned(),
        Rooted::Bare => return redirect_to_root(&shared.root_path, req.uri().query()),
        Rooted::Outside => return plain(404, "Not Found"),
    };
    let (client, secure) = super::proxy::resolve(
        &shared.config.trusted_proxies,
        peer,
        req.headers(),
        shared.config.tls.is_some(),
    );
    let peer_text = fmt_peer(client);
    let is_upgrade = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        });
    let logged = shared
        .config
        .access_log
        .then(|| super::auth::logged_target(&path, req.uri().query()));
    if is_upgrade {
        let (resp, failure) = upgrade(shared, peer, (client, secure), &path, req).await;
        if let Some(reason) = failure {
            shared.stats.handshake_failed(reason);
            if let Some(logged) = logged {
                let status = resp.status().as_u16();
                tracing::info!(target: "canal::access", "{peer_text} - - \"WSREJECT {logged}\" {status}");
            }
        }
        return resp;
    }
    shared.stats.http_requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    let resp = plain_http(shared, (client, secure), &path, req).await;
    if let Some(logged) = logged {
        let size = hyper::body::Body::size_hint(resp.body())
            .exact()
            .unwrap_or(0);
        tracing::info!(
            target: "canal::access",
            "{peer_text} - - \"{method} {logged}\" {} {size}",
            resp.status().as_u16()
        );
    }
    resp
}

async fn plain_http(
    shared: &Arc<Shared>,
    (client, secure): (Option<SocketAddr>, bool),
    path: &str,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let Some(found) = shared.app.http.resolve(path) else {
        if let Some(builtin) = shared.builtins.get(path) {
            return super::builtins::serve(shared, builtin, req).await;
        }
        if shared.app.websocket.resolve(path).is_some() {
            let mut resp = plain(426, "this path speaks WebSocket");
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return resp;
        }
        return plain(404, "Not Found");
    };
    let endpoint = found.endpoint.clone();
    let mut scope = Scope::new(
        ScopeKind::Http,
        req.method().clone(),
        path,
        req.uri().query().unwrap_or(""),
        req.headers(),
        client,
    );
    scope.set_secure(secure);
    scope.set_params(&found.params);
    scope.set_root_path(&shared.root_path);
    let body = match Limited::new(req.into_body(), shared.config.max_body_size)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return plain(413, "request body too large");
        }
        Err(_) => return plain(400, "could not read the request body"),
    };
    let call =
        crate::seed::with_layer(shared.layer.clone(), endpoint.call(Request { scope, body }));
    // The watchdog times HTTP consumers' polls as it does WebSocket handlers'.
    let call = super::watchdog::watched_by(shared.clone(), call);
    let outcome = AssertUnwindSafe(call).catch_unwind().await;
    let response = match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::error!(path, error = %e, "HTTP consumer failed");
            shared.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
            return plain(500, "Internal Server Error");
        }
        Err(_) => {
            tracing::error!(path, "HTTP consumer panicked");
            shared.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
            return plain(500, "Internal Server Error");
        }
    };
    let mut resp = hyper::Response::new(Full::new(response.body));
    match hyper::StatusCode::from_u16(response.status) {
        Ok(status) => *resp.status_mut() = status,
        Err(_) => {
            tracing::error!(
                path,
                status = response.status,
                "HTTP consumer returned an invalid status"
            );
            return plain(500, "Internal Server Error");
        }
    }
    for (name, value) in &response.headers {
        match (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                resp.headers_mut().append(name, value);
            }
            _ => {
                tracing::error!(
                    path,
                    header = name,
                    "HTTP consumer returned an invalid header"
                );
                return plain(500, "Internal Server Error");
            }
        }
    }
    resp
}

fn header_has_token(req: &hyper::Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 §4.2.2).
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// Validates an upgrade request (RFC 6455 §4.2.1), routes it, runs the consumer's `connect`
/// in a connection task and answers with what it decided.
async fn upgrade(
    shared: &Arc<Shared>,
    peer: Option<SocketAddr>,
    (client, secure): (Option<SocketAddr>, bool),
    path: &str,
    mut req: hyper::Request<Incoming>,
) -> (hyper::Response<Body>, Option<HandshakeFailure>) {
    let bad = |text: &str| (plain(400, text), Some(HandshakeFailure::BadRequest));
    if req.method() != hyper::Method::GET {
        return bad("WebSocket upgrade requires GET");
    }
    if req.version() != hyper::Version::HTTP_11 {
        return bad("WebSocket upgrade requires HTTP/1.1");
    }
    if !header_has_token(&req, header::CONNECTION, "upgrade") {
        return bad("WebSocket upgrade requires 'Connection: Upgrade'");
    }
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        let mut resp = plain(426, "unsupported WebSocket version (use 13)");
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return (resp, Some(HandshakeFailure::BadVersion));
    }
    let key = match req.headers().get(header::SEC_WEBSOCKET_KEY) {
        Some(key)
            if base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .is_ok_and(|k| k.len() == 16) =>
        {
            key.as_bytes().to_vec()
        }
        _ => return bad("missing or invalid Sec-WebSocket-Key"),
    };
    if let Err(e) = shared.origins.check(
        req.headers().get(header::ORIGIN),
        req.headers().get(header::HOST),
    ) {
        tracing::debug!(peer = fmt_peer(peer), path, error = %e, "WebSocket origin refused");
        return (plain(403, &e.to_string()), Some(HandshakeFailure::Origin));
    }
    let (endpoint, params) = match shared.app.websocket.resolve(path) {
        Some(found) => (found.endpoint.clone(), found.params),
        None if shared.builtins.get(path) == Some(super::builtins::Builtin::AdminSocket) => {
            if !shared
                .builtins
                .admin_allowed(req.headers(), req.uri().query())
            {
                return (
                    plain(401, "the dashboard needs ?token=<admin token>"),
                    Some(HandshakeFailure::Refused),
                );
            }
            let weak = Arc::downgrade(shared);
            let admin_endpoint = match crate::consumer::ws(move || super::admin::AdminSocket {
                shared: weak.clone(),
            }) {
                crate::routing::Target::Endpoint(mut e) => {
                    e.metered = false;
                    e
                }
                crate::routing::Target::Nested(_) => {
                    return (
                        plain(500, "Internal Server Error"),
                        Some(HandshakeFailure::Error),
                    );
                }
            };
            (admin_endpoint, Vec::new())
        }
        None => return (plain(404, "Not Found"), Some(HandshakeFailure::NotFound)),
    };
    if shared.shutdown.is_cancelled() {
        return (
            plain(503, "server shutting down"),
            Some(HandshakeFailure::ShuttingDown),
        );
    }
    let mut scope = Scope::new(
        ScopeKind::WebSocket,
        hyper::Method::GET,
        path,
        req.uri().query().unwrap_or(""),
        req.headers(),
        client,
    );
    scope.set_secure(secure);
    scope.set_params(&params);
    scope.set_root_path(&shared.root_path);
    let token_source = match authenticate(shared, &req, endpoint.requires_user) {
        Ok(Some((user, source))) => {
            scope.set_user(Some(user));
            Some(source)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(peer = fmt_peer(peer), path, error = %e, "WebSocket authentication failed");
            return (plain(403, &e.to_string()), Some(HandshakeFailure::Auth));
        }
    };
    if let Err(rejection) = endpoint.factory.check(&scope) {
        return (
            plain(rejection.status, &rejection.message),
            Some(HandshakeFailure::Refused),
        );
    }
    let offered: Vec<String> = scope.subprotocols().map(str::to_owned).collect();
    let on_upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    let (tx, rx) = oneshot::channel();
    let guard = ConnGuard::new(shared, peer);
    shared.tracker.spawn(websocket_task(
        shared.clone(),
        endpoint,
        scope,
        UpgradeSource::Hyper(on_upgrade),
        tx,
        guard,
    ));
    let decision = rx
        .await
        .unwrap_or(Decision::Reject(500, HandshakeFailure::Error));
    match decision {
        Decision::Reject(status, reason) => (plain(status, reject_text(status)), Some(reason)),
        Decision::Accept {
            subprotocol,
            headers,
        } => {
            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&accept_key(&key)) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            // A token sent as `bearer, <token>` needs `bearer` selected, or browsers fail the
            // handshake.
            let subprotocol = subprotocol.or_else(|| {
                (token_source == Some(super::auth::TokenSource::Protocol))
                    .then(|| "bearer".to_owned())
            });
            if let Some(p) = subprotocol {
                if offered.contains(&p)
                    && let Ok(v) = HeaderValue::from_str(&p)
                {
                    h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
                } else {
                    tracing::warn!(
                        subprotocol = p,
                        "consumer selected a subprotocol the client did not offer; ignored"
                    );
                }
            }
            for (name, value) in headers {
                if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                    continue;
                }
                if let (Ok(n), Ok(v)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    h.append(n, v);
                }
            }
            (resp, None)
        }
    }
}

/// Checks the handshake's token, if the server has a secret: `Ok(Some(user))` for a valid
/// one, `Ok(None)` without one where no user is required, and the reason otherwise.
fn authenticate(
    shared: &Shared,
    req: &hyper::Request<Incoming>,
    route_requires_user: bool,
) -> Result<Option<(String, super::auth::TokenSource)>, super::auth::AuthError> {
    let required = route_requires_user || shared.config.require_user;
    let Some(secret) = &shared.config.jwt_secret else {
        return if required {
            Err(super::auth::AuthError::Missing)
        } else {
            Ok(None)
        };
    };
    match super::auth::find_token(req.headers(), req.uri().query()) {
        Some((token, source)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            super::auth::verify_hs256(&token, secret, now).map(|user| Some((user, source)))
        }
        None if required => Err(super::auth::AuthError::Missing),
        None => Ok(None),
    }
}

fn reject_text(status: u16) -> &'static str {
    match status {
        403 => "Forbidden",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Rejected",
    }
}
