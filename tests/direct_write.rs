//! A large room's group send writes to its sleeping members' sockets itself (the pass of wakes
//! and `Mailbox::write_through`), instead of waking each member's task to do it. These tests
//! check that the frames those writes put on the wire are whole and in order: when the members
//! also make their connections write frames of their own (pongs), when a member's socket takes
//! a write only in part, and for every member of the room.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use canal::demo;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// More than the 512 members above which a group send defers its wakes to a pass of wakes.
const MEMBERS: usize = 600;

/// A frame from the server: (opcode, payload), parsed from the front of `buf`.
fn parse_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    assert_eq!(b0 & 0x70, 0, "reserved bits set: the stream is corrupt");
    assert_eq!(b1 & 0x80, 0, "a masked server frame: the stream is corrupt");
    let (len, at) = match b1 & 0x7F {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => panic!("a frame over 64 KiB: the stream is corrupt"),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?;
    Some(((b0 & 0x0F, payload.to_vec()), at + len))
}

/// Reads frames from `s` until `texts` text frames arrived, checking that they carry
/// `0, 1, 2, …` in order; every pong must answer one of the pings sent (`ping <n>`). Returns
/// how many pongs came. With `pause`, it sleeps that long after each read (a slow reader).
async fn read_room(s: &mut (impl AsyncRead + Unpin), texts: u64, pause: Option<Duration>) -> u64 {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut next, mut pongs) = (0u64, 0u64);
    loop {
        while let Some(((opcode, payload), used)) = parse_frame(&buf) {
            buf.drain(..used);
            match opcode {
                1 => {
                    let Ok(text) = std::str::from_utf8(&payload) else {
                        panic!("a text frame that is not UTF-8 at message {next}: corrupt");
                    };
                    let seq: u64 = text
                        .split(' ')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .expect("a sequence number");
                    assert_eq!(seq, next, "lost or out of order");
                    next += 1;
                }
                10 => {
                    assert!(payload.starts_with(b"ping "), "a pong for no ping");
                    pongs += 1;
                }
                other => panic!("unexpected opcode {other} at message {next}"),
            }
        }
        if next >= texts {
            break;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("20 s without a byte from the room")
            .expect("read");
        assert!(n > 0, "the server closed a member at message {next}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    assert!(buf.is_empty(), "bytes after the last message");
    pongs
}

/// A frame carrying `seq` and some padding, as the sender sends it.
fn message(seq: u64, padding: &str) -> Vec<u8> {
    frame(true, 1, format!("{seq} {padding}").as_bytes())
}

/// Sends `count` messages into `/ws/chat/big/` from a member of its own, `gap` apart, and
/// returns once the sender got its own copies of all of them, in order.
async fn send_room(addr: std::net::SocketAddr, count: u64, padding: &str, gap: Duration) {
    let (mut rd, mut wr) = raw_ws(addr, "/ws/chat/big/").await.into_split();
    let own = tokio::spawn(async move { read_room(&mut rd, count, None).await });
    for seq in 0..count {
        wr.write_all(&message(seq, padding)).await.expect("send");
        tokio::time::sleep(gap).await;
    }
    own.await.expect("the sender's copies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_ping_get_every_message_whole_and_in_order() {
    const MESSAGES: u64 = 200;
    let server = TestServer::start(demo::app()).await;
    let addr = server.addr;
    // Every member pings its connection while the room is busy, so the connections write
    // pongs of their own in between the group send's writes.
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let s = raw_ws(addr, "/ws/chat/big/").await;
        members.push(tokio::spawn(async move {
            let (mut rd, mut wr) = s.into_split();
            let pinger = async move {
                for i in 0..20 {
                    tokio::time::sleep(Duration::from_millis(7)).await;
                    wr.write_all(&frame(true, 9, format!("ping {i}").as_bytes()))
                        .await
                        .expect("ping");
                }
                wr
            };
            let (_wr, pongs) = tokio::join!(pinger, read_room(&mut rd, MESSAGES, None));
            pongs
        }));
    }
    send_room(addr, MESSAGES, "x", Duration::from_millis(1)).await;
    let mut pongs = 0;
    for m in members {
        pongs += m.await.expect("member");
    }
    let stats = server.handle.stats();
    assert!(pongs > 0, "no pong came back while the room was busy");
    assert!(
        stats.frames_out_direct > 0,
        "no message was written by a pass of wakes: {stats:?}"
    );
    // Every message out is counted once, by whoever wrote it: the members' and the sender's
    // copies, and nothing else (pongs are not messages).
    assert_eq!(stats.frames_out, (MEMBERS as u64 + 1) * MESSAGES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_socket_fills_gets_the_rest_of_a_partial_write_whole() {
    const MESSAGES: u64 = 150;
    const STALLED: usize = 5;
    let mut config = quiet_config();
    // A small send buffer, so a few messages fill a member that does not read.
    config.socket_send_buffer = Some(32 * 1024);
    let server = TestServer::start_with(demo::app(), config).await;
    let addr = server.addr;
    let mut readers = Vec::new();
    for _ in 0..MEMBERS - STALLED {
        let mut s = raw_ws(addr, "/ws/chat/big/").await;
        readers.push(tokio::spawn(async move {
            read_room(&mut s, MESSAGES, None).await;
        }));
    }
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut s = slow_reader_ws(addr, "/ws/chat/big/").await;
        // It reads nothing for a while, then slowly: the rest of a partial write must come
        // first, whole, then what its connection queued meanwhile, and no later message may
        // overtake those while the connection is still writing them.
        stalled.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            read_room(&mut s, MESSAGES, Some(Duration::from_millis(2))).await;
        }));
    }
    // 300 KB to each member, far past a stalled member's buffers.
    let padding = "p".repeat(2000);
    send_room(addr, MESSAGES, &padding, Duration::from_millis(2)).await;
    for r in readers.into_iter().chain(stalled) {
        r.await.expect("reader");
    }
    let stats = server.handle.stats();
    assert!(
        stats.direct_partial_writes > 0,
        "no direct write was partial: {stats:?}"
    );
    assert_eq!(stats.slow_closes, 0);
}
