//! Shutdown under load: handlers in flight finish within the grace period, every client gets
//! 1001, and `serve` returns cleanly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use canal::demo;
use canal::prelude::*;
use common::*;

static FINISHED: AtomicUsize = AtomicUsize::new(0);

/// Takes 500 ms over each message, then counts it as finished.
#[derive(Default)]
struct Slow;
impl WebsocketConsumer for Slow {
    async fn receive(&mut self, _cx: &mut Context, _frame: Frame) -> canal::Result<()> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        FINISHED.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_handlers_finish_and_everyone_gets_1001() {
    let app = demo::app().websocket(path("/ws/slow/", ws(Slow::default)));
    let mut server = TestServer::start(app).await;
    // Load: 50 echo clients sending continuously.
    let mut load = Vec::new();
    for i in 0..50 {
        let mut c = connect(&server.url("/ws/echo/")).await;
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                if c.send(tokio_websockets::Message::text(format!("{i}:{n}")))
                    .await
                    .is_err()
                {
                    break;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
                // Drain whatever came back, and stop at the close.
                while let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_millis(1), c.next()).await
                {
                    match msg {
                        Ok(m) if m.is_close() => {
                            return m.as_close().map(|(code, _)| u16::from(code));
                        }
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            }
            None
        }));
    }
    // Ten handlers in flight when the shutdown comes.
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut c = connect(&server.url("/ws/slow/")).await;
        send_text(&mut c, "work").await;
        slow.push(c);
    }
    // They read (and answer the server's close) while the server shuts down.
    let slow: Vec<_> = slow
        .into_iter()
        .map(|mut c| tokio::spawn(async move { close_code(&mut c).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown().await; // panics if serve returned an error or panicked
    let took = started.elapsed();
    assert_eq!(
        FINISHED.load(Ordering::SeqCst),
        10,
        "in-flight handlers were cut"
    );
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} (grace 5 s)"
    );
    for task in slow {
        assert_eq!(task.await.unwrap(), 1001);
    }
    for task in load {
        let code = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("a load client never saw the end")
            .unwrap();
        assert_eq!(code, Some(1001));
    }
}

use futures_util::{SinkExt, StreamExt};
