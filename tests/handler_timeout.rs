//! A handler that awaits forever is cut off after the handler timeout (1011), and the other
//! connections keep their latency, compared with a baseline measured in this test.
//!
//! The stuck handler awaits in a loop (it yields on every turn). A future that never yields
//! cannot be preempted in Rust, so that case is documented, not tested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use canal::demo;
use canal::prelude::*;
use common::*;

/// Awaits forever on "hang", in a loop that yields; echoes anything else.
#[derive(Default)]
struct Hangs;
impl WebsocketConsumer for Hangs {
    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        if frame.text()? == "hang" {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        cx.send_text(frame.text()?.to_owned()).await
    }
}

fn app() -> App {
    demo::app().websocket(path("/ws/hang/", ws(Hangs::default)))
}

/// p99 of 200 echo round trips on `c`, in µs.
async fn echo_p99(c: &mut Client) -> u64 {
    let mut lat = Vec::with_capacity(200);
    for i in 0..200 {
        let t = Instant::now();
        let text = format!("m{i}");
        send_text(c, &text).await;
        assert_eq!(next_text(c).await, text);
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    lat[lat.len() * 99 / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_awaits_forever_is_cut_off_with_1011() {
    let mut config = quiet_config();
    config.handler_timeout = Some(Duration::from_millis(800));
    let server = TestServer::start_with(app(), config).await;
    let mut echo = connect(&server.url("/ws/echo/")).await;
    let base = echo_p99(&mut echo).await;

    // 20 connections whose handlers hang; they still echo until then.
    let mut hung = Vec::new();
    for _ in 0..20 {
        let mut c = connect(&server.url("/ws/hang/")).await;
        send_text(&mut c, "before").await;
        assert_eq!(next_text(&mut c).await, "before");
        send_text(&mut c, "hang").await;
        hung.push(c);
    }
    let started = Instant::now();
    let during = echo_p99(&mut echo).await;
    for c in &mut hung {
        assert_eq!(close_code(c).await, 1011);
    }
    let cut_after = started.elapsed();
    eprintln!(
        "echo p99 {base} µs before, {during} µs while 20 handlers hung; cut after {cut_after:?}"
    );
    assert!(
        cut_after >= Duration::from_millis(700),
        "cut off too early: {cut_after:?}"
    );
    assert!(
        cut_after < Duration::from_secs(5),
        "cut off too late: {cut_after:?}"
    );
    assert!(
        during <= 5 * base + 20_000,
        "echo p99 went from {base} µs to {during} µs"
    );
    assert_eq!(server.handle.stats().handler_timeouts, 20);
    // The server goes on.
    let mut fresh = connect(&server.url("/ws/echo/")).await;
    send_text(&mut fresh, "fresh").await;
    assert_eq!(next_text(&mut fresh).await, "fresh");
}

#[tokio::test]
async fn without_a_handler_timeout_a_slow_handler_finishes() {
    assert_eq!(canal::ServerConfig::default().handler_timeout, None);
    let server = TestServer::start(app()).await;
    let mut c = connect(&server.url("/ws/hang/")).await;
    send_text(&mut c, "hang").await;
    // Nothing closes it: the handler is still running after well over a second.
    expect_silence(&mut c, 1500).await;
    assert_eq!(server.handle.stats().handler_timeouts, 0);
}

/// Blocks its worker thread for 300 ms on "block" (what a synchronous database call does).
#[derive(Default)]
struct Blocks;
impl WebsocketConsumer for Blocks {
    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        if frame.text()? == "block" {
            std::thread::sleep(Duration::from_millis(300));
        }
        cx.send_text(frame.text()?.to_owned()).await
    }
}

#[tokio::test]
async fn the_watchdog_reports_a_handler_that_blocks_its_thread() {
    assert_eq!(
        canal::ServerConfig::default().blocking_threshold,
        Some(Duration::from_secs(1))
    );
    let mut config = quiet_config();
    config.blocking_threshold = Some(Duration::from_millis(100));
    let app = app().websocket(path("/ws/blocks/", ws(Blocks::default)));
    let server = TestServer::start_with(app, config).await;
    let mut c = connect(&server.url("/ws/blocks/")).await;
    send_text(&mut c, "quick").await;
    assert_eq!(next_text(&mut c).await, "quick");
    assert_eq!(server.handle.stats().blocking_polls, 0);
    send_text(&mut c, "block").await;
    assert_eq!(next_text(&mut c).await, "block");
    assert_eq!(server.handle.stats().blocking_polls, 1);
    // An awaiting handler is not blocking, however long it takes.
    let mut h = connect(&server.url("/ws/hang/")).await;
    send_text(&mut h, "hang").await;
    expect_silence(&mut h, 400).await;
    assert_eq!(server.handle.stats().blocking_polls, 1);
}
