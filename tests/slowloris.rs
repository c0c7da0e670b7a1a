//! Slowloris: 500 connections that send their request headers one byte at a time are cut off
//! by the header timeout, while a normal client keeps being served.
//!
//! Sockets: 500 slow clients + a few normal ones, twice (client and server side) in this
//! process: about 1,010 open files, far under the 20,000 cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use canal::demo;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW_CLIENTS: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_senders_are_cut_off_while_others_are_served() {
    let mut config = quiet_config();
    config.header_timeout = Duration::from_secs(2);
    let server = TestServer::start_with(demo::app(), config).await;
    let addr = server.addr;

    let cut = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::with_capacity(SLOW_CLIENTS);
    for _ in 0..SLOW_CLIENTS {
        let cut = cut.clone();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        slow.push(tokio::spawn(async move {
            let start = Instant::now();
            // A head that never ends: one byte every 100 ms, for up to 30 s.
            let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
                .iter()
                .copied();
            let mut bytes = head.chain(std::iter::repeat(b'a')).take(300);
            let mut buf = [0u8; 256];
            loop {
                let b = bytes.next()?;
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                // Has the server closed (or answered and closed) meanwhile?
                match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {} // a 408 or similar, then the close
                    Err(_) => {}
                }
            }
            cut.fetch_add(1, Ordering::Relaxed);
            Some(start.elapsed())
        }));
    }

    // Meanwhile a normal client is served, over and over, each time promptly.
    let mut echo = connect(&server.url("/ws/echo/")).await;
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let health = tokio::time::timeout(Duration::from_secs(2), get(addr, "/health"))
            .await
            .expect("/health took over 2 s during the slowloris");
        assert_eq!(health.status, 200);
        let text = format!("round {rounds}");
        send_text(&mut echo, &text).await;
        assert_eq!(next_text(&mut echo).await, text);
        let mut fresh = connect(&server.url("/ws/echo/")).await;
        send_text(&mut fresh, "fresh").await;
        assert_eq!(next_text(&mut fresh).await, "fresh");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a normal round took {:?}",
            t.elapsed()
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rounds >= 5, "only {rounds} rounds were served");

    let mut longest = Duration::ZERO;
    for task in slow {
        let elapsed = task
            .await
            .expect("slow client task")
            .expect("a slow client sent 300 bytes without being cut off");
        longest = longest.max(elapsed);
    }
    assert_eq!(cut.load(Ordering::Relaxed), SLOW_CLIENTS);
    eprintln!(
        "{SLOW_CLIENTS} slow clients cut off, the slowest after {longest:?}; {rounds} normal rounds served"
    );
    // The header timeout is 2 s; allow for scheduling on a loaded 2-core machine.
    assert!(
        longest < Duration::from_secs(15),
        "slowest cut-off took {longest:?}"
    );
    // Once they are gone the server holds no connection for them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server.handle.stats().connections <= 2,
        "connections still open: {}",
        server.handle.stats().connections
    );
}
