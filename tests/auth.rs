//! JWT authentication of WebSocket handshakes over real sockets: tokens from the query, a
//! cookie or `Sec-WebSocket-Protocol: bearer, <token>`; routes that require a user; 403 for
//! missing, forged or expired tokens; the token redacted in the access log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use canal::demo;
use canal::prelude::*;
use canal::server::auth::{JwtSecret, sign_hs256};
use common::*;
use serde_json::json;

/// Accepts and says who the user is.
#[derive(Default)]
struct WhoAmI;
impl WebsocketConsumer for WhoAmI {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.accept().await?;
        let user = cx.scope().user().unwrap_or("anonymous").to_owned();
        cx.send_text(user).await
    }
}

fn app() -> App {
    demo::app()
        .websocket(path(
            "/ws/private/",
            canal::login_required(ws(WhoAmI::default)),
        ))
        .websocket(path("/ws/whoami/", ws(WhoAmI::default)))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn secret() -> JwtSecret {
    JwtSecret::new("test-secret-not-for-production")
}

fn token(sub: &str, exp_in: i64) -> String {
    let exp = now() as i64 + exp_in;
    sign_hs256(&json!({"sub": sub, "exp": exp}), &secret())
}

async fn handshake(server: &TestServer, target: &str, extra: &str) -> String {
    raw_request(server.addr, &upgrade_request(target, extra))
        .await
        .1
}

#[tokio::test]
async fn tokens_authenticate_and_bad_ones_get_403() {
    let mut config = quiet_config();
    config.jwt_secret = Some(secret());
    let server = TestServer::start_with(app(), config).await;

    // No token on a route that requires a user.
    assert_eq!(
        status_of(&handshake(&server, "/ws/private/", "").await),
        403
    );
    // From the query.
    let mut c = connect(&server.url(&format!("/ws/private/?token={}", token("alice", 60)))).await;
    assert_eq!(next_text(&mut c).await, "alice");
    // From a cookie.
    let (mut s, head) = raw_request(
        server.addr,
        &upgrade_request(
            "/ws/private/",
            &format!("Cookie: theme=dark; token={}\r\n", token("bob", 60)),
        ),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(read_frame(&mut s).await, Some((1, b"bob".to_vec())));
    // From the subprotocol pair: the server selects `bearer`.
    let (mut s, head) = raw_request(
        server.addr,
        &upgrade_request(
            "/ws/private/",
            &format!("Sec-WebSocket-Protocol: bearer, {}\r\n", token("carol", 60)),
        ),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: bearer\r\n"),
        "{head}"
    );
    assert_eq!(read_frame(&mut s).await, Some((1, b"carol".to_vec())));

    // Expired, forged, another secret, alg none, garbage: 403, on any route.
    let expired = token("alice", -3600);
    let other = sign_hs256(
        &json!({"sub": "mallory", "exp": now() + 60}),
        &JwtSecret::new("guess"),
    );
    let mut forged: Vec<String> = token("alice", 60).split('.').map(str::to_owned).collect();
    forged[1] = base64_url(&json!({"sub": "admin", "exp": now() + 60}).to_string());
    let forged = forged.join(".");
    let none = format!(
        "{}.{}.",
        base64_url(r#"{"alg":"none"}"#),
        base64_url(&json!({"sub": "admin", "exp": now() + 60}).to_string())
    );
    for bad in [
        expired.as_str(),
        other.as_str(),
        forged.as_str(),
        none.as_str(),
        "garbage",
    ] {
        for route in ["/ws/private/", "/ws/whoami/"] {
            let head = handshake(&server, &format!("{route}?token={bad}"), "").await;
            assert_eq!(status_of(&head), 403, "{route} with {bad}: {head}");
        }
    }
    let refused = server
        .handle
        .stats()
        .handshake_failures
        .iter()
        .find(|(l, _)| *l == "auth")
        .map(|(_, n)| *n);
    assert_eq!(refused, Some(11));

    // A route that does not require a user still works without a token.
    let mut c = connect(&server.url("/ws/whoami/")).await;
    assert_eq!(next_text(&mut c).await, "anonymous");
    let mut e = connect(&server.url("/ws/echo/")).await;
    send_text(&mut e, "open").await;
    assert_eq!(next_text(&mut e).await, "open");
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text.as_bytes())
}

#[tokio::test]
async fn require_user_covers_every_route_and_no_secret_fails_closed() {
    let mut config = quiet_config();
    config.jwt_secret = Some(secret());
    config.require_user = true;
    let server = TestServer::start_with(app(), config).await;
    assert_eq!(status_of(&handshake(&server, "/ws/echo/", "").await), 403);
    let mut c = connect(&server.url(&format!("/ws/echo/?token={}", token("dave", 60)))).await;
    send_text(&mut c, "hi").await;
    assert_eq!(next_text(&mut c).await, "hi");
    // Plain HTTP is not affected.
    assert_eq!(get(server.addr, "/health").await.status, 200);

    // A route that requires a user on a server without a secret: nobody gets in.
    let server = TestServer::start(app()).await;
    let target = format!("/ws/private/?token={}", token("alice", 60));
    assert_eq!(status_of(&handshake(&server, &target, "").await), 403);
    // And without a secret tokens are not read at all.
    let mut c = connect(&server.url("/ws/whoami/?token=garbage")).await;
    assert_eq!(next_text(&mut c).await, "anonymous");
}

/// A writer that keeps what the access log writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_token_is_redacted_in_the_access_log() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("canal::access=debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut config = quiet_config();
    config.access_log = true;
    config.jwt_secret = Some(secret());
    let server = TestServer::start_with(app(), config).await;
    let good = token("alice", 60);
    let mut c = connect(&server.url(&format!("/ws/private/?room=1&token={good}"))).await;
    assert_eq!(next_text(&mut c).await, "alice");
    drop(c);
    let bad = token("alice", -3600);
    let head = handshake(&server, &format!("/ws/private/?token={bad}"), "").await;
    assert_eq!(status_of(&head), 403);
    let resp = get(server.addr, &format!("/health?token={good}")).await;
    assert_eq!(resp.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("WSCONNECT /ws/private/?room=1&token=[redacted]"),
        "{log}"
    );
    assert!(
        log.contains("WSREJECT /ws/private/?token=[redacted]"),
        "{log}"
    );
    assert!(log.contains("GET /health?token=[redacted]"), "{log}");
    assert!(
        !log.contains(&good) && !log.contains(&bad),
        "a token leaked: {log}"
    );
}
