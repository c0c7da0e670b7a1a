//! Limits that are off by default: connections per client address and messages per second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use canal::demo;
use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn connections_per_address_past_the_limit_get_503() {
    let mut config = quiet_config();
    config.max_connections_per_ip = Some(3);
    let server = TestServer::start_with(demo::app(), config).await;
    let mut a = connect(&server.url("/ws/echo/")).await;
    let _b = connect(&server.url("/ws/echo/")).await;
    let _c = connect(&server.url("/ws/echo/")).await;
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/echo/", "")).await;
    assert_eq!(status_of(&head), 503, "{head}");
    // Plain HTTP from the same address is refused as well.
    assert_eq!(get(server.addr, "/health").await.status, 503);
    assert_eq!(server.handle.stats().rejected_per_ip, 2);
    // Those within the limit are served.
    send_text(&mut a, "inside").await;
    assert_eq!(next_text(&mut a).await, "inside");
    // A slot frees when a connection ends.
    drop(_b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut d = connect(&server.url("/ws/echo/")).await;
    send_text(&mut d, "room again").await;
    assert_eq!(next_text(&mut d).await, "room again");
}

#[tokio::test]
async fn no_per_address_or_rate_limit_by_default() {
    let config = canal::ServerConfig::default();
    assert_eq!(config.max_connections_per_ip, None);
    assert_eq!(config.max_messages_per_second, None);
    let server = TestServer::start(demo::app()).await;
    // 50 connections from one address, 500 messages in a burst on one of them (under the
    // outbound queue bound of 1,024).
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(&server.url("/ws/echo/")).await);
    }
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    let burst: Vec<u8> = (0..500).flat_map(|_| frame(true, 1, b"x")).collect();
    s.write_all(&burst).await.unwrap();
    for _ in 0..500 {
        assert_eq!(read_frame(&mut s).await, Some((1, b"x".to_vec())));
    }
    assert_eq!(server.handle.stats().rate_limited, 0);
    assert_eq!(server.handle.stats().rejected_per_ip, 0);
}

#[tokio::test]
async fn a_client_over_the_message_rate_is_closed_with_1008() {
    let mut config = quiet_config();
    config.max_messages_per_second = Some(50);
    let server = TestServer::start_with(demo::app(), config).await;
    // Within the rate: 20 messages, 20 echoes.
    let mut polite = connect(&server.url("/ws/echo/")).await;
    for i in 0..20 {
        send_text(&mut polite, &format!("m{i}")).await;
        assert_eq!(next_text(&mut polite).await, format!("m{i}"));
    }
    // 500 in a burst: closed with 1008.
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    let burst: Vec<u8> = (0..500).flat_map(|_| frame(true, 1, b"x")).collect();
    let _ = s.write_all(&burst).await;
    assert_eq!(read_close(&mut s).await, Some(1008));
    assert_eq!(server.handle.stats().rate_limited, 1);
    // Others go on.
    send_text(&mut polite, "after").await;
    assert_eq!(next_text(&mut polite).await, "after");
}

#[test]
fn serve_help_shows_the_hardening_options_as_off_by_default() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canal"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    // One entry per option: its line and the indented description lines under it.
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut entries: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("--") || trimmed.starts_with("-h") {
            entries.push(trimmed.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    for flag in [
        "--max-connections-per-ip",
        "--max-messages-per-second",
        "--socket-send-buffer",
        "--handler-timeout",
        "--jwt-secret",
        "--require-user",
        "--tls-cert",
        "--tls-key",
        "--memory-budget",
    ] {
        let entry = entries
            .iter()
            .find(|e| e.split_whitespace().next() == Some(flag))
            .unwrap_or_else(|| panic!("{flag} missing:\n{text}"));
        assert!(entry.contains("[default: off"), "{flag}: {entry}");
    }
}
