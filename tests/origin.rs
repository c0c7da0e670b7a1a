//! Origin validation on WebSocket handshakes, over real loopback sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use canal::demo;
use common::*;

fn with_origin(origin: &str, host: &str) -> String {
    format!(
        "GET /ws/echo/ HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

async fn status(server: &TestServer, origin: &str, host: &str) -> u16 {
    status_of(&raw_request(server.addr, &with_origin(origin, host)).await.1)
}

#[tokio::test]
async fn by_default_only_the_servers_own_host_may_open_websockets() {
    let server = TestServer::start(demo::app()).await;
    let host = server.addr.to_string();
    // No Origin at all (non-browser clients): allowed.
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/echo/", "")).await;
    assert_eq!(status_of(&head), 101, "{head}");
    // The page's own origin, as a browser sends it.
    assert_eq!(status(&server, &format!("http://{host}"), &host).await, 101);
    assert_eq!(
        status(&server, &format!("https://{host}"), &host).await,
        101
    );
    // Anything else: 403 before the upgrade.
    for origin in [
        "http://evil.example",
        "http://127.0.0.1:1",
        "null",
        "not an origin",
        &format!("http://{host}.evil.example"),
    ] {
        let (_, head) = raw_request(server.addr, &with_origin(origin, &host)).await;
        assert_eq!(status_of(&head), 403, "{origin}: {head}");
    }
    let stats = server.handle.stats();
    let refused = stats
        .handshake_failures
        .iter()
        .find(|(label, _)| *label == "origin")
        .map(|(_, n)| *n);
    assert_eq!(refused, Some(5));
    // Plain HTTP is not affected, and the server still echoes.
    let resp = http_req(
        server.addr,
        "GET",
        "/health",
        &[("Origin", "http://evil.example")],
        b"",
    )
    .await;
    assert_eq!(resp.status, 200);
    let mut c = connect(&server.url("/ws/echo/")).await;
    send_text(&mut c, "still").await;
    assert_eq!(next_text(&mut c).await, "still");
}

#[tokio::test]
async fn allowed_origins_open_the_door_to_listed_sites_only() {
    let mut config = quiet_config();
    config.allowed_origins = vec![
        "https://app.example.com".to_owned(),
        ".trusted.org".to_owned(),
    ];
    let server = TestServer::start_with(demo::app(), config).await;
    let host = server.addr.to_string();
    assert_eq!(status(&server, "https://app.example.com", &host).await, 101);
    assert_eq!(
        status(&server, "https://chat.trusted.org", &host).await,
        101
    );
    assert_eq!(status(&server, "http://app.example.com", &host).await, 403);
    assert_eq!(status(&server, "https://evil.org", &host).await, 403);
    assert_eq!(status(&server, &format!("http://{host}"), &host).await, 101);

    let mut config = quiet_config();
    config.allowed_origins = vec!["*".to_owned()];
    let server = TestServer::start_with(demo::app(), config).await;
    assert_eq!(status(&server, "https://anyone.example", "x").await, 101);
    assert_eq!(status(&server, "null", "x").await, 101);
}

#[tokio::test]
async fn an_invalid_allowed_origin_stops_the_server() {
    let mut config = quiet_config();
    config.allowed_origins = vec!["http://".to_owned()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = canal::Server::new(demo::app())
        .with_config(config)
        .serve(listener, std::future::pending())
        .await;
    let err = result.expect_err("an invalid origin must be refused");
    assert!(err.to_string().contains("http://"), "{err}");
}

#[test]
fn serve_help_documents_allowed_origins() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canal"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--allowed-origins"), "{help}");
    assert!(
        help.contains("[default: none, only the server's own host]"),
        "{help}"
    );
}
