//! A global memory budget for what WebSockets buffer: past it the largest holders are closed
//! with 1008, the server stays up, and connections within it are served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use canal::demo;
use common::*;
use tokio::io::AsyncWriteExt;

const BUDGET: usize = 256 * 1024;
const FRAME: usize = 200 * 1024;

/// A masked binary frame header announcing `len` bytes, and its masked payload.
fn big_frame(len: usize) -> (Vec<u8>, Vec<u8>) {
    let f = frame(true, 2, &vec![7u8; len]);
    let head = 2 + 8 + 4;
    (f[..head].to_vec(), f[head..].to_vec())
}

#[tokio::test]
async fn past_the_budget_the_largest_holders_are_closed_with_1008() {
    assert_eq!(canal::ServerConfig::default().memory_budget, None);
    let mut config = quiet_config();
    config.memory_budget = Some(BUDGET);
    let server = TestServer::start_with(demo::app(), config).await;
    let mut bystander = connect(&server.url("/ws/echo/")).await;

    // Four clients announce 200 KiB frames and send half: each holds a 200 KiB buffer.
    let (head, payload) = big_frame(FRAME);
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut s = raw_ws(server.addr, "/ws/echo/").await;
        s.write_all(&head).await.unwrap();
        s.write_all(&payload[..FRAME / 2]).await.unwrap();
        holders.push(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = server.handle.stats();
    assert!(stats.memory_closes >= 2, "{} closed", stats.memory_closes);
    assert!(stats.memory_closes <= 3, "everyone was closed");
    assert!(
        stats.buffered_bytes as usize <= BUDGET,
        "{} bytes still buffered",
        stats.buffered_bytes
    );

    // The closed ones got 1008; the survivor finishes its frame and gets its echo.
    let mut closed = 0;
    let mut survivors = Vec::new();
    for mut s in holders {
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), s.peek(&mut probe)).await {
            Ok(_) => {
                assert_eq!(read_close(&mut s).await, Some(1008));
                closed += 1;
            }
            Err(_) => survivors.push(s),
        }
    }
    assert_eq!(closed as u64, stats.memory_closes);
    for mut s in survivors {
        s.write_all(&payload[FRAME / 2..]).await.unwrap();
        let (op, echoed) = read_frame(&mut s).await.expect("echo");
        assert_eq!((op, echoed.len()), (2, FRAME));
    }
    send_text(&mut bystander, "still here").await;
    assert_eq!(next_text(&mut bystander).await, "still here");
    // Everything released once the connections are done.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.handle.stats().buffered_bytes, 0);
}
