//! Proxy headers are believed only from configured proxies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use canal::demo;
use canal::prelude::*;
use common::*;

/// Tells the client what the server believes about it: "<ip> <scheme>".
#[derive(Default)]
struct Where;
impl WebsocketConsumer for Where {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.accept().await?;
        let ip = cx
            .scope()
            .client()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let scheme = cx.scope().scheme();
        cx.send_text(format!("{ip} {scheme}")).await
    }
}

fn app() -> App {
    demo::app().websocket(path("/ws/where/", ws(Where::default)))
}

async fn seen(server: &TestServer, extra: &str) -> String {
    let (mut s, head) = raw_request(server.addr, &upgrade_request("/ws/where/", extra)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let (_, payload) = read_frame(&mut s).await.expect("a frame");
    String::from_utf8(payload).expect("text")
}

const FORWARDED: &str = "X-Forwarded-For: 6.6.6.6, 203.0.113.9\r\nX-Forwarded-Proto: https\r\n";

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_set_client_and_scheme() {
    let mut config = quiet_config();
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    let server = TestServer::start_with(app(), config).await;
    // The rightmost untrusted hop is the client; what it claimed further left is ignored.
    assert_eq!(seen(&server, FORWARDED).await, "203.0.113.9 wss");
    // A trusted hop on the right is skipped.
    assert_eq!(
        seen(&server, "X-Forwarded-For: 198.51.100.7, 127.0.0.1\r\n").await,
        "198.51.100.7 ws"
    );
    // Without the headers, the peer.
    assert_eq!(seen(&server, "").await, "127.0.0.1 ws");
}

#[tokio::test]
async fn forwarded_headers_from_anyone_else_are_ignored() {
    assert!(canal::ServerConfig::default().trusted_proxies.is_empty());
    let server = TestServer::start(app()).await;
    assert_eq!(seen(&server, FORWARDED).await, "127.0.0.1 ws");
    // A proxy listed that is not this peer changes nothing either.
    let mut config = quiet_config();
    config.trusted_proxies = vec!["10.9.9.9".parse().unwrap()];
    let server = TestServer::start_with(app(), config).await;
    assert_eq!(seen(&server, FORWARDED).await, "127.0.0.1 ws");
}
