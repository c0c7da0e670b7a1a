//! The server over real loopback sockets, with a real WebSocket client (tokio-websockets) and
//! raw sockets for protocol-level checks.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use canal::prelude::*;
use canal::seed::{self, Group, route};
use canal::{Handle, demo};
use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_websockets::Message as WsMessage;

#[tokio::test]
async fn echo_returns_every_message_verbatim() {
    let server = TestServer::start(demo::app()).await;
    let mut c = connect(&server.url("/ws/echo/")).await;
    send_text(&mut c, "hello").await;
    assert_eq!(next_text(&mut c).await, "hello");
    send_text(&mut c, "").await;
    assert_eq!(next_text(&mut c).await, "");
    send_text(&mut c, "héllo ✓").await;
    assert_eq!(next_text(&mut c).await, "héllo ✓");
    c.send(WsMessage::binary(vec![0u8, 1, 255])).await.unwrap();
    let m = next(&mut c).await;
    assert!(m.is_binary());
    assert_eq!(&m.as_payload()[..], &[0u8, 1, 255]);
    // 200 KiB, larger than any single read.
    let big = "x".repeat(200 * 1024);
    send_text(&mut c, &big).await;
    assert_eq!(next_text(&mut c).await, big);
}

#[tokio::test]
async fn echo_reassembles_fragments_and_answers_pings() {
    let server = TestServer::start(demo::app()).await;
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    let mut bytes = frame(false, 1, b"frag");
    bytes.extend(frame(true, 9, b"ping!")); // a ping between fragments
    bytes.extend(frame(false, 0, b"men"));
    bytes.extend(frame(true, 0, b"ted"));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_frame(&mut s).await, Some((10, b"ping!".to_vec())));
    assert_eq!(read_frame(&mut s).await, Some((1, b"fragmented".to_vec())));
    // An empty binary message comes back empty and binary.
    s.write_all(&frame(true, 2, b"")).await.unwrap();
    assert_eq!(read_frame(&mut s).await, Some((2, Vec::new())));
    // Client close is answered with the same code.
    s.write_all(&frame(true, 8, &4000u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s).await, Some(4000));
}

#[tokio::test]
async fn chat_rooms_broadcast_verbatim_and_stay_apart() {
    let server = TestServer::start(demo::app()).await;
    let mut a1 = connect(&server.url("/ws/chat/alpha/")).await;
    let mut a2 = connect(&server.url("/ws/chat/alpha/")).await;
    let mut a3 = connect(&server.url("/ws/chat/alpha/")).await;
    let mut b1 = connect(&server.url("/ws/chat/beta/")).await;
    let mut b2 = connect(&server.url("/ws/chat/beta/")).await;

    send_text(&mut a1, "hi from a1").await;
    for c in [&mut a1, &mut a2, &mut a3] {
        assert_eq!(next_text(c).await, "hi from a1", "sender included");
    }
    send_text(
        &mut b2,
        r#"{"kind":"message","text":"json is verbatim too"}"#,
    )
    .await;
    for c in [&mut b1, &mut b2] {
        assert_eq!(
            next_text(c).await,
            r#"{"kind":"message","text":"json is verbatim too"}"#
        );
    }
    expect_silence(&mut a2, 200).await;
    expect_silence(&mut b1, 100).await;

    // Binary messages are broadcast as binary.
    b1.send(WsMessage::binary(vec![7u8, 8])).await.unwrap();
    for c in [&mut b1, &mut b2] {
        let m = next(c).await;
        assert!(m.is_binary());
        assert_eq!(&m.as_payload()[..], &[7u8, 8]);
    }
}

#[tokio::test]
async fn per_sender_order_is_kept() {
    let server = TestServer::start(demo::app()).await;
    let mut rx = connect(&server.url("/ws/chat/order/")).await;
    let mut tx1 = connect(&server.url("/ws/chat/order/")).await;
    let mut tx2 = connect(&server.url("/ws/chat/order/")).await;
    for i in 0..50 {
        send_text(&mut tx1, &format!("a{i}")).await;
        send_text(&mut tx2, &format!("b{i}")).await;
    }
    let (mut next_a, mut next_b) = (0, 0);
    for _ in 0..100 {
        let t = next_text(&mut rx).await;
        let (who, n) = t.split_at(1);
        let n: i32 = n.parse().unwrap();
        match who {
            "a" => {
                assert_eq!(n, next_a);
                next_a += 1;
            }
            _ => {
                assert_eq!(n, next_b);
                next_b += 1;
            }
        }
    }
}

#[tokio::test]
async fn left_members_no_longer_receive() {
    let server = TestServer::start(demo::app()).await;
    let mut a = connect(&server.url("/ws/chat/leave/")).await;
    let mut b = connect(&server.url("/ws/chat/leave/")).await;
    b.close().await.unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_text(&mut a, "anyone?").await;
    assert_eq!(next_text(&mut a).await, "anyone?");
    let sizes = server.handle.layer().group_sizes().unwrap();
    assert_eq!(sizes, vec![("leave".to_owned(), 1)]);
}

#[tokio::test]
async fn bad_rooms_and_unknown_paths_are_refused_before_the_upgrade() {
    let server = TestServer::start(demo::app()).await;
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/chat/bad%20room/", "")).await;
    assert_eq!(status_of(&head), 400, "{head}");
    let long = format!("/ws/chat/{}/", "r".repeat(100));
    let (_, head) = raw_request(server.addr, &upgrade_request(&long, "")).await;
    assert_eq!(status_of(&head), 400, "{head}");
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/nowhere/", "")).await;
    assert_eq!(status_of(&head), 404, "{head}");
    let (_, head) = raw_request(server.addr, "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&head), 404, "{head}");
    // A WebSocket path fetched as plain HTTP asks for an upgrade.
    let (_, head) = raw_request(server.addr, "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&head), 426, "{head}");
}

#[tokio::test]
async fn malformed_upgrades_get_400_or_426() {
    let server = TestServer::start(demo::app()).await;
    let no_key = "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status_of(&raw_request(server.addr, no_key).await.1), 400);
    let bad_key = "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status_of(&raw_request(server.addr, bad_key).await.1), 400);
    let old = "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let (_, head) = raw_request(server.addr, old).await;
    assert_eq!(status_of(&head), 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{head}"
    );
    let post = "POST /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(status_of(&raw_request(server.addr, post).await.1), 400);
    let no_conn = "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert_eq!(status_of(&raw_request(server.addr, no_conn).await.1), 400);
    // A correct handshake carries the RFC 6455 accept key for the sample nonce.
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/echo/", "")).await;
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
}

#[tokio::test]
async fn oversized_frames_close_with_1009_and_invalid_utf8_with_1007() {
    let mut config = quiet_config();
    config.max_frame_size = 1024;
    config.max_message_size = 4096;
    let server = TestServer::start_with(demo::app(), config).await;

    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    s.write_all(&frame(true, 1, &vec![b'a'; 2000]))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s).await, Some(1009));

    // Fragments under the frame limit adding up past the message limit.
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    s.write_all(&frame(false, 2, &[0u8; 1000])).await.unwrap();
    for _ in 0..4 {
        s.write_all(&frame(false, 0, &[0u8; 1000])).await.unwrap();
    }
    s.write_all(&frame(true, 0, &[0u8; 1000])).await.unwrap();
    assert_eq!(read_close(&mut s).await, Some(1009));

    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    s.write_all(&frame(true, 1, &[0xff, 0xfe, b'x']))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s).await, Some(1007));

    // Unmasked client frames are a protocol error.
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(read_close(&mut s).await, Some(1002));

    // The server is still fine.
    let mut c = connect(&server.url("/ws/echo/")).await;
    send_text(&mut c, "still here").await;
    assert_eq!(next_text(&mut c).await, "still here");
    assert!(server.handle.stats().protocol_errors >= 4);
}

#[derive(Default)]
struct Denier;
impl WebsocketConsumer for Denier {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.deny().await
    }
}

#[derive(Default)]
struct Silent;
impl WebsocketConsumer for Silent {
    async fn connect(&mut self, _cx: &mut Context) -> canal::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct FailsToConnect;
impl WebsocketConsumer for FailsToConnect {
    async fn connect(&mut self, _cx: &mut Context) -> canal::Result<()> {
        Err(canal::Error::msg("database down"))
    }
}

#[derive(Default)]
struct Fragile;
impl WebsocketConsumer for Fragile {
    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        match frame.text()? {
            "panic" => panic!("consumer bug"),
            "fail" => Err(canal::Error::msg("handler error")),
            other => cx.send_text(other.to_owned()).await,
        }
    }
}

#[derive(Default)]
struct Picky;
impl WebsocketConsumer for Picky {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        let chosen = cx
            .scope()
            .subprotocols()
            .find(|p| *p == "chat.v2")
            .map(str::to_owned);
        cx.accept_with(chosen.as_deref(), &[("x-canal", "yes")])
            .await
    }
}

fn test_app() -> App {
    demo::app()
        .websocket(path("/ws/deny/", ws(Denier::default)))
        .websocket(path("/ws/silent/", ws(Silent::default)))
        .websocket(path("/ws/fails/", ws(FailsToConnect::default)))
        .websocket(path("/ws/fragile/", ws(Fragile::default)))
        .websocket(path("/ws/picky/", ws(Picky::default)))
}

#[tokio::test]
async fn deny_is_403_errors_are_500_and_silence_times_out_with_403() {
    let mut config = quiet_config();
    config.accept_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(test_app(), config).await;
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/deny/", "")).await;
    assert_eq!(status_of(&head), 403, "{head}");
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/fails/", "")).await;
    assert_eq!(status_of(&head), 500, "{head}");
    let started = std::time::Instant::now();
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/silent/", "")).await;
    assert_eq!(status_of(&head), 403, "{head}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(server.handle.stats().handshake_timeouts, 1);
}

#[tokio::test]
async fn subprotocol_and_accept_headers() {
    let server = TestServer::start(test_app()).await;
    let (_, head) = raw_request(
        server.addr,
        &upgrade_request("/ws/picky/", "Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n"),
    )
    .await;
    let lower = head.to_ascii_lowercase();
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(lower.contains("sec-websocket-protocol: chat.v2"), "{head}");
    assert!(lower.contains("x-canal: yes"), "{head}");
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/picky/", "")).await;
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
}

#[tokio::test]
async fn a_panicking_or_failing_consumer_closes_with_1011_and_others_go_on() {
    let server = TestServer::start(test_app()).await;
    let mut bystander = connect(&server.url("/ws/echo/")).await;
    let mut victim = connect(&server.url("/ws/fragile/")).await;
    send_text(&mut victim, "ok").await;
    assert_eq!(next_text(&mut victim).await, "ok");
    send_text(&mut victim, "panic").await;
    assert_eq!(close_code(&mut victim).await, 1011);
    let mut victim = connect(&server.url("/ws/fragile/")).await;
    send_text(&mut victim, "fail").await;
    assert_eq!(close_code(&mut victim).await, 1011);
    send_text(&mut bystander, "unaffected").await;
    assert_eq!(next_text(&mut bystander).await, "unaffected");
    assert_eq!(server.handle.stats().handler_errors, 2);
}

/// Joins `crashers` through `groups()` and panics on "panic".
struct GroupedFragile;
impl WebsocketConsumer for GroupedFragile {
    fn groups(&self) -> Vec<String> {
        vec!["crashers".to_owned()]
    }

    async fn receive(&mut self, _cx: &mut Context, frame: Frame) -> canal::Result<()> {
        if frame.text()? == "panic" {
            panic!("consumer bug");
        }
        Ok(())
    }
}

/// The connection asks the consumer for its groups again when it ends, so a consumer whose
/// handler panicked must be kept for that: its membership goes with the connection.
#[tokio::test]
async fn a_consumer_that_panicked_still_leaves_its_groups() {
    let app = App::new().websocket(path("/ws/grouped/", ws(|| GroupedFragile)));
    let server = TestServer::start(app).await;
    let crashers = |server: &TestServer| {
        server
            .handle
            .layer()
            .group_sizes()
            .unwrap_or_default()
            .into_iter()
            .find(|(name, _)| name == "crashers")
            .map_or(0, |(_, size)| size)
    };
    let mut stays = connect(&server.url("/ws/grouped/")).await;
    let mut victim = connect(&server.url("/ws/grouped/")).await;
    assert_eq!(crashers(&server), 2);
    send_text(&mut victim, "panic").await;
    assert_eq!(close_code(&mut victim).await, 1011);
    drop(victim); // the socket ends now, not at the close timeout
    let settles_at = |size: usize, what: &'static str| {
        let server = &server;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while crashers(server) != size {
                assert!(tokio::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    settles_at(1, "the panicked consumer is still in its group").await;
    send_text(&mut stays, "hello").await;
    drop(stays);
    settles_at(0, "the closed consumer is still in its group").await;
}

/// Streams a counter every 100 ms from a task bound to the connection.
struct Streamer {
    ticks: Arc<AtomicUsize>,
}
impl WebsocketConsumer for Streamer {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.accept().await?;
        let handle: Handle = cx.handle();
        let ticks = self.ticks.clone();
        cx.spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                n += 1;
                ticks.fetch_add(1, Ordering::SeqCst);
                if handle.send_text(format!("tick {n}")).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }
}

#[tokio::test]
async fn streaming_consumer_pushes_and_stops_when_the_client_leaves() {
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    let app = App::new().websocket(path(
        "/ws/stream/",
        ws(move || Streamer { ticks: t.clone() }),
    ));
    let server = TestServer::start(app).await;
    let mut c = connect(&server.url("/ws/stream/")).await;
    assert_eq!(next_text(&mut c).await, "tick 1");
    assert_eq!(next_text(&mut c).await, "tick 2");
    assert_eq!(next_text(&mut c).await, "tick 3");
    c.close().await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after_close = ticks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ticks.load(Ordering::SeqCst),
        after_close,
        "the streaming task must end with its connection"
    );
}

/// A seed-style handler that loops and pushes while it is still running.
async fn ws_loop(message: seed::Message) -> canal::Result<()> {
    for i in 0..3 {
        message
            .reply_channel()
            .send(msg! { "text": format!("step {i}") })
            .await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_looping_handler_streams_before_it_returns() {
    let app = App::new().websocket(path(
        "/loop/",
        seed::consumer([route("websocket.receive", ws_loop)]),
    ));
    let server = TestServer::start(app).await;
    let mut c = connect(&server.url("/loop/")).await;
    send_text(&mut c, "go").await;
    let started = std::time::Instant::now();
    assert_eq!(next_text(&mut c).await, "step 0");
    // The first message arrives long before the handler's 450 ms loop returns.
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(next_text(&mut c).await, "step 1");
    assert_eq!(next_text(&mut c).await, "step 2");
}

async fn seed_echo(message: seed::Message) -> canal::Result<()> {
    message
        .reply_channel()
        .send(msg! { "text": message.text()? })
        .await
}
async fn ws_add(message: seed::Message) -> canal::Result<()> {
    message
        .reply_channel()
        .send(msg! { "accept": true })
        .await?;
    Group::new("chat").add(message.reply_channel()).await
}
async fn ws_message(message: seed::Message) -> canal::Result<()> {
    Group::new("chat")
        .send(msg! { "text": format!("[user] {}", message.text()?) })
        .await
}
async fn ws_disconnect(message: seed::Message) -> canal::Result<()> {
    Group::new("chat").discard(message.reply_channel()).await
}

#[tokio::test]
async fn the_seed_examples_work_line_for_line() {
    let app = App::new()
        .websocket(path(
            "/path/",
            seed::consumer([route("websocket.receive", seed_echo)]),
        ))
        .websocket(path(
            "/chat/",
            seed::consumer([
                route("websocket.connect", ws_add),
                route("websocket.receive", ws_message),
                route("websocket.disconnect", ws_disconnect),
            ]),
        ));
    let server = TestServer::start(app).await;
    let mut e = connect(&server.url("/path/")).await;
    send_text(&mut e, "发送数据").await;
    assert_eq!(next_text(&mut e).await, "发送数据");

    let mut w1 = connect(&server.url("/chat/")).await;
    let mut w2 = connect(&server.url("/chat/")).await;
    send_text(&mut w2, "hello world").await;
    assert_eq!(next_text(&mut w1).await, "[user] hello world");
    assert_eq!(next_text(&mut w2).await, "[user] hello world");
    w2.close().await.unwrap();
    drop(w2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.handle.layer().group_sizes().unwrap(),
        vec![("chat".to_owned(), 1)],
        "ws_disconnect discarded the closed window"
    );
}

#[tokio::test]
async fn graceful_shutdown_closes_websockets_with_1001() {
    let mut server = TestServer::start(demo::app()).await;
    let mut c1 = connect(&server.url("/ws/echo/")).await;
    let mut c2 = connect(&server.url("/ws/chat/lobby/")).await;
    let closing =
        tokio::spawn(async move { (close_code(&mut c1).await, close_code(&mut c2).await) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await;
    assert_eq!(closing.await.unwrap(), (1001, 1001));
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn unanswered_pings_drop_the_client() {
    let mut config = quiet_config();
    config.ping_interval = Duration::from_secs(1);
    config.ping_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(demo::app(), config).await;
    let mut s = raw_ws(server.addr, "/ws/echo/").await;
    // The server pings a quiet client ...
    let (op, _) = read_frame(&mut s).await.expect("a ping");
    assert_eq!(op, 9);
    // ... and drops it when no pong comes.
    assert!(closed_within(&mut s, 6).await);
    assert_eq!(server.handle.stats().ping_timeouts, 1);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let mut config = quiet_config();
    config.header_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(demo::app(), config).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut s, 3).await);
    // Idle keep-alive connections are closed too.
    let mut config = quiet_config();
    config.http_idle_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(demo::app(), config).await;
    let (mut s, head) = raw_request(server.addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&head), 200);
    assert!(closed_within(&mut s, 5).await);
}

#[tokio::test]
async fn http_consumers_health_and_body_limit() {
    let mut config = quiet_config();
    config.max_body_size = 16;
    let app = demo::app().http(path(
        "/upper/{word}",
        http(|req: Request| async move {
            let word = req.scope.param("word")?.to_uppercase();
            Ok(Response::text(format!("{word} {}", req.body.len())))
        }),
    ));
    let server = TestServer::start_with(app, config).await;
    let (mut s, head) = raw_request(server.addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&head), 200);
    let mut body = [0u8; 2];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut body)
        .await
        .unwrap();
    assert_eq!(&body, b"ok");
    let (_, head) = raw_request(
        server.addr,
        "POST /upper/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz",
    )
    .await;
    assert_eq!(status_of(&head), 200);
    let (_, head) = raw_request(
        server.addr,
        "POST /upper/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n0123456789012345678901234567890123456789012345678901234567890123",
    )
    .await;
    assert_eq!(status_of(&head), 413);
    let (_, head) = raw_request(server.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(head.contains("text/html"), "{head}");
}

/// Declares a group: joined before connect, left after disconnect.
#[derive(Default)]
struct Broadcaster;
impl WebsocketConsumer for Broadcaster {
    fn groups(&self) -> Vec<String> {
        vec!["announcements".to_owned()]
    }
    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        match frame.text()? {
            "bye" => cx.close(4321, "see you").await,
            text => {
                cx.group_send(
                    "announcements",
                    msg! { "type": "websocket.send", "text": text },
                )
                .await
            }
        }
    }
}

#[tokio::test]
async fn declared_groups_are_joined_and_left_and_close_carries_code_and_reason() {
    let app = App::new().websocket(path("/ws/b/", ws(Broadcaster::default)));
    let server = TestServer::start(app).await;
    let mut a = connect(&server.url("/ws/b/")).await;
    let mut b = connect(&server.url("/ws/b/")).await;
    assert_eq!(
        server.handle.layer().group_sizes().unwrap(),
        vec![("announcements".to_owned(), 2)]
    );
    // A websocket.send group message acts on every member's socket directly.
    send_text(&mut a, "news").await;
    assert_eq!(next_text(&mut a).await, "news");
    assert_eq!(next_text(&mut b).await, "news");
    send_text(&mut b, "bye").await;
    let msg = next(&mut b).await;
    let (code, reason) = msg.as_close().expect("a close frame");
    assert_eq!((u16::from(code), reason), (4321, "see you"));
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.handle.layer().group_sizes().unwrap(),
        vec![("announcements".to_owned(), 1)]
    );
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let mut config = quiet_config();
    config.max_connections = Some(2);
    let server = TestServer::start_with(demo::app(), config).await;
    let _a = connect(&server.url("/ws/echo/")).await;
    let _b = connect(&server.url("/ws/echo/")).await;
    let (_, head) = raw_request(server.addr, &upgrade_request("/ws/echo/", "")).await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert_eq!(server.handle.stats().rejected_limit, 1);
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = connect(&server.url("/ws/echo/")).await;
    send_text(&mut c, "room again").await;
    assert_eq!(next_text(&mut c).await, "room again");
}

/// A synchronous seed handler: blocking sleeps, as a database driver would block.
fn slow_sync_handler(message: seed::Message) -> canal::Result<()> {
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        message
            .reply_channel()
            .send_blocking(msg! { "text": format!("sync {i}: {}", message.text()?) })?;
    }
    Group::new("sync-room").send_blocking(msg! { "text": "group from sync" })
}

fn sync_join(message: seed::Message) -> canal::Result<()> {
    message
        .reply_channel()
        .send_blocking(msg! { "accept": true })?;
    Group::new("sync-room").add_blocking(message.reply_channel())
}

fn sync_panics(_message: seed::Message) -> canal::Result<()> {
    panic!("sync bug")
}

/// `#[tokio::test]` is a single-threaded runtime: if the synchronous handler ran on it, the
/// echo below could not answer until the handler's 600 ms of blocking were over.
#[tokio::test]
async fn synchronous_handlers_run_on_the_blocking_pool() {
    let app = demo::app()
        .websocket(path(
            "/sync/",
            seed::consumer([
                seed::route_sync("websocket.connect", sync_join),
                seed::route_sync("websocket.receive", slow_sync_handler),
            ]),
        ))
        .websocket(path(
            "/sync-panic/",
            seed::consumer([seed::route_sync("websocket.receive", sync_panics)]),
        ));
    let server = TestServer::start(app).await;
    let mut slow = connect(&server.url("/sync/")).await;
    let mut echo = connect(&server.url("/ws/echo/")).await;
    send_text(&mut slow, "go").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    for i in 0..5 {
        send_text(&mut echo, &format!("ping {i}")).await;
        assert_eq!(next_text(&mut echo).await, format!("ping {i}"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "echo waited for the blocking handler: {:?}",
        started.elapsed()
    );
    assert_eq!(next_text(&mut slow).await, "sync 0: go");
    assert_eq!(next_text(&mut slow).await, "sync 1: go");
    assert_eq!(next_text(&mut slow).await, "sync 2: go");
    assert_eq!(next_text(&mut slow).await, "group from sync");
    let mut bad = connect(&server.url("/sync-panic/")).await;
    send_text(&mut bad, "x").await;
    assert_eq!(close_code(&mut bad).await, 1011);
}

/// Spawns a task that blocks its worker thread once, as careless code would.
#[derive(Default)]
struct SpawnsBlocking;
impl WebsocketConsumer for SpawnsBlocking {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.accept().await?;
        cx.spawn(async {
            std::thread::sleep(Duration::from_millis(300));
        });
        Ok(())
    }
}

#[tokio::test]
async fn the_watchdog_reports_spawned_tasks_that_block_a_worker() {
    let mut config = quiet_config();
    config.blocking_threshold = Some(Duration::from_millis(100));
    let app = App::new().websocket(path("/ws/blocker/", ws(SpawnsBlocking::default)));
    let server = TestServer::start_with(app, config).await;
    let _c = connect(&server.url("/ws/blocker/")).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.handle.stats().blocking_polls == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocking poll was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_watchdog_reports_http_consumers_that_block_a_worker() {
    let mut config = quiet_config();
    config.blocking_threshold = Some(Duration::from_millis(100));
    let app = App::new().http(path(
        "/slow",
        http(|_req: Request| async {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Response::text("done"))
        }),
    ));
    let server = TestServer::start_with(app, config).await;
    let (_, head) = raw_request(server.addr, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&head), 200);
    assert_eq!(server.handle.stats().blocking_polls, 1);
}
