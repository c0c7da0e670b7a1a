//! Built-in routes over real sockets: `/metrics` parsed after known traffic, `/api/publish`
//! with every answer it can give, `/ready`, moving and switching routes off, clashes with app
//! routes, `--root-path`, and serving on a Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use canal::layer::{Inbox, LayerStats, LocalChannels};
use canal::prelude::*;
use canal::server::{Builtins, HandshakeFailure, ServerError};
use canal::{ChannelLayer, LayerError, demo};
use common::*;
use futures_util::SinkExt;

const TOKEN: &str = "pub-s3cret";

async fn demo_server() -> TestServer {
    start_with_builtins(
        demo::app(),
        quiet_config(),
        Builtins::default().publish_token(TOKEN),
    )
    .await
}

async fn publish(addr: std::net::SocketAddr, body: &str) -> HttpResponse {
    let auth = format!("Bearer {TOKEN}");
    http_req(
        addr,
        "POST",
        "/api/publish",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

#[tokio::test]
async fn metrics_are_parsed_and_match_known_traffic() {
    const N: usize = 3; // chat clients in one room
    const M: usize = 4; // messages each
    let mut server = demo_server().await;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(connect(&server.url("/ws/chat/metered/")).await);
    }
    let mut echo = connect(&server.url("/ws/echo/")).await;
    for client in clients.iter_mut() {
        for m in 0..M {
            send_text(client, &format!("m{m}")).await;
        }
    }
    for client in clients.iter_mut() {
        for _ in 0..N * M {
            next_text(client).await;
        }
    }
    send_text(&mut echo, "a").await;
    send_text(&mut echo, "b").await;
    next_text(&mut echo).await;
    next_text(&mut echo).await;
    // Three refused handshakes, three reasons.
    let (_s, head) = raw_request(server.addr, &upgrade_request("/nowhere/", "")).await;
    assert_eq!(status_of(&head), 404);
    let (_s, head) = raw_request(server.addr, &upgrade_request("/ws/chat/a%20b/", "")).await;
    assert_eq!(status_of(&head), 400);
    let bad_version = "GET /ws/echo/ HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
    let (_s, head) = raw_request(server.addr, bad_version).await;
    assert_eq!(status_of(&head), 426);
    // Two published messages with made-up types: counted as "other", no new series.
    for kind in ["made.up.one", "made.up.two"] {
        let body = format!(r#"{{"group":"nobody-here","message":{{"type":"{kind}"}}}}"#);
        assert_eq!(publish(server.addr, &body).await.status, 202);
    }

    let resp = get(server.addr, "/metrics").await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let s = parse_prometheus(&resp.body);
    let v = |name: &str, labels: &[(&str, &str)]| sample(&s, name, labels);
    let total = (N * M) as f64;
    assert_eq!(v("canal_websocket_accepted_total", &[]), (N + 1) as f64);
    assert_eq!(v("canal_websocket_connections", &[]), (N + 1) as f64);
    assert_eq!(
        v("canal_websocket_messages_total", &[("direction", "in")]),
        total + 2.0
    );
    assert_eq!(
        v("canal_websocket_messages_total", &[("direction", "out")]),
        total * N as f64 + 2.0
    );
    let layer = |dir: &str, kind: &str| {
        v(
            "canal_layer_messages_total",
            &[("direction", dir), ("type", kind)],
        )
    };
    assert_eq!(layer("sent", "chat.message"), total);
    assert_eq!(layer("received", "chat.message"), total * N as f64);
    assert_eq!(layer("sent", "other"), 2.0);
    assert_eq!(layer("received", "other"), 0.0);
    assert!(
        !resp.body.contains("made.up"),
        "a made-up type got its own series"
    );
    assert_eq!(v("canal_layer_group_sends_total", &[]), total + 2.0);
    assert_eq!(
        v("canal_layer_group_deliveries_total", &[]),
        total * N as f64
    );
    for (reason, n) in [
        ("not_found", 1.0),
        ("refused", 1.0),
        ("bad_version", 1.0),
        ("denied", 0.0),
        ("timeout", 0.0),
    ] {
        assert_eq!(
            v("canal_handshake_failures_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    for reason in [
        "channel_full",
        "expired",
        "no_receiver",
        "backend",
        "slow_client",
    ] {
        assert_eq!(
            v("canal_dropped_messages_total", &[("reason", reason)]),
            0.0
        );
    }
    // The group_send histogram saw every group send; buckets are cumulative.
    let count = v("canal_layer_latency_seconds_count", &[("op", "group_send")]);
    assert_eq!(count, total + 2.0);
    assert_eq!(
        v(
            "canal_layer_latency_seconds_bucket",
            &[("op", "group_send"), ("le", "+Inf")]
        ),
        count
    );
    let buckets: Vec<f64> = s
        .iter()
        .filter(|(n, l, _)| {
            n == "canal_layer_latency_seconds_bucket"
                && l.iter().any(|(k, v)| k == "op" && v == "group_send")
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(buckets.len(), canal::server::LATENCY_BUCKETS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(v("canal_published_total", &[]), 2.0);
    assert_eq!(v("canal_groups", &[]), 1.0);
    let stats = server.handle.stats();
    assert_eq!(stats.handshake_failure(HandshakeFailure::NotFound), 1);
    assert_eq!(stats.websocket_rejected, 3);

    // Closing the clients brings the gauge down.
    for mut c in clients {
        c.close().await.unwrap();
    }
    echo.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = parse_prometheus(&get(server.addr, "/metrics").await.body);
        if sample(&s, "canal_websocket_connections", &[]) == 0.0 {
            assert_eq!(sample(&s, "canal_groups", &[]), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn publish_pushes_into_groups_and_channels_and_says_what_was_wrong() {
    let mut server = demo_server().await;
    let mut a = connect(&server.url("/ws/chat/lobby/")).await;
    let mut b = connect(&server.url("/ws/chat/lobby/")).await;

    let resp = publish(
        server.addr,
        r#"{"group":"lobby","message":{"type":"chat.message","text":"from outside"}}"#,
    )
    .await;
    assert_eq!(resp.status, 202, "{resp:?}");
    assert_eq!(resp.json(), serde_json::json!({ "ok": true }));
    assert_eq!(next_text(&mut a).await, "from outside");
    assert_eq!(next_text(&mut b).await, "from outside");
    // A Channels 1 message without a type is normalized: websocket.send, straight out.
    let resp = publish(server.addr, r#"{"group":"lobby","message":{"text":"raw"}}"#).await;
    assert_eq!(resp.status, 202);
    assert_eq!(next_text(&mut a).await, "raw");
    assert_eq!(next_text(&mut b).await, "raw");
    // To a named channel: it is in the layer.
    let resp = publish(
        server.addr,
        r#"{"channel":"jobs.thumbnail","message":{"type":"job","id":7}}"#,
    )
    .await;
    assert_eq!(resp.status, 202);
    let job = tokio::time::timeout(
        Duration::from_secs(2),
        server.handle.layer().receive("jobs.thumbnail"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(job.kind(), Some("job"));
    assert_eq!(job.int("id"), Ok(7));

    let err = |resp: &HttpResponse| {
        resp.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text: {resp:?}"))
            .to_owned()
    };
    // 401: no token, wrong token, wrong scheme.
    let body = br#"{"group":"lobby","message":{"type":"chat.message","text":"x"}}"#;
    let resp = http_req(server.addr, "POST", "/api/publish", &[], body).await;
    assert_eq!(resp.status, 401);
    assert!(err(&resp).contains("missing"), "{resp:?}");
    assert!(resp.header("www-authenticate").is_some());
    for auth in ["Bearer pub-s3cre", "Bearer pub-s3cretX", "Basic pub-s3cret"] {
        let resp = http_req(
            server.addr,
            "POST",
            "/api/publish",
            &[("Authorization", auth)],
            body,
        )
        .await;
        assert_eq!(resp.status, 401, "{auth}");
        assert!(err(&resp).contains("wrong token"));
    }
    // 400s say what was wrong.
    for (body, says) in [
        ("{not json", "not valid JSON"),
        (r#"["group"]"#, "JSON object"),
        (
            r#"{"message":{"type":"x"}}"#,
            "missing \"group\" or \"channel\"",
        ),
        (r#"{"group":"lobby"}"#, "missing \"message\""),
        (
            r#"{"group":"no spaces","message":{"type":"x"}}"#,
            "invalid group name",
        ),
        (
            r#"{"channel":"","message":{"type":"x"}}"#,
            "invalid channel name",
        ),
        (
            r#"{"group":"lobby","message":"hi"}"#,
            "must be a JSON object",
        ),
        (r#"{"group":"lobby","message":{"foo":1}}"#, "no \"type\""),
        (
            r#"{"group":"lobby","channel":"c","message":{"type":"x"}}"#,
            "not both",
        ),
        (
            r#"{"group":"lobby","message":{"type":"x","__asgi_channel__":"y"}}"#,
            "reserved",
        ),
    ] {
        let resp = publish(server.addr, body).await;
        assert_eq!(resp.status, 400, "{body}");
        assert!(
            err(&resp).contains(says),
            "{body}: {:?} should say {says:?}",
            err(&resp)
        );
    }
    // Only POST.
    let resp = get(server.addr, "/api/publish").await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("POST"));
    // Nothing of the refused requests reached the room.
    expect_silence(&mut a, 200).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
    server.shutdown().await;

    // 413 over the body limit.
    let mut config = quiet_config();
    config.max_body_size = 256;
    let mut small = start_with_builtins(
        demo::app(),
        config,
        Builtins::default().publish_token(TOKEN),
    )
    .await;
    let big = format!(
        r#"{{"group":"lobby","message":{{"type":"chat.message","text":"{}"}}}}"#,
        "x".repeat(300)
    );
    let resp = publish(small.addr, &big).await;
    assert_eq!(resp.status, 413);
    assert!(err(&resp).contains("256"));
    small.shutdown().await;

    // Off (404) without a token.
    let mut off = start_with_builtins(demo::app(), quiet_config(), Builtins::default()).await;
    let resp = http_req(
        off.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer anything")],
        body,
    )
    .await;
    assert_eq!(resp.status, 404);
    off.shutdown().await;
}

/// A layer whose sends fail, as a Redis layer does when Redis is gone.
struct BrokenLayer(MemoryLayer);

#[async_trait]
impl ChannelLayer for BrokenLayer {
    async fn send(&self, _channel: &str, _message: Message) -> Result<(), LayerError> {
        Err(LayerError::Backend("connection refused".to_owned()))
    }
    async fn receive(&self, channel: &str) -> Result<Message, LayerError> {
        self.0.receive(channel).await
    }
    async fn new_channel(&self) -> Result<String, LayerError> {
        self.0.new_channel().await
    }
    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.0.group_add(group, channel).await
    }
    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.0.group_discard(group, channel).await
    }
    async fn group_send(&self, _group: &str, _message: Message) -> Result<(), LayerError> {
        Err(LayerError::Backend("connection refused".to_owned()))
    }
    async fn flush(&self) -> Result<(), LayerError> {
        self.0.flush().await
    }
    fn local(&self) -> &LocalChannels {
        self.0.local()
    }
    fn new_inbox(&self) -> Inbox {
        self.0.new_inbox()
    }
    fn stats(&self) -> LayerStats {
        self.0.stats()
    }
}

#[tokio::test]
async fn ready_reports_the_layer_separately_from_health() {
    let mut server = demo_server().await;
    let resp = get(server.addr, "/ready").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json(), serde_json::json!({ "layer": "ok" }));
    server.shutdown().await;

    // A layer that fails: /health stays 200, /ready is 503, publish is 503, and the failed
    // calls are counted as layer errors.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut srv = Server::new(demo::app())
        .with_config(quiet_config())
        .with_layer(Arc::new(BrokenLayer(MemoryLayer::default())))
        .with_builtins(Builtins::default().publish_token(TOKEN))
        .unwrap();
    let handle = srv.handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(srv.serve(listener, async {
        let _ = rx.await;
    }));
    assert_eq!(get(addr, "/health").await.status, 200);
    let resp = get(addr, "/ready").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.json()["layer"], "error");
    assert!(
        resp.json()["error"]
            .as_str()
            .unwrap()
            .contains("connection refused")
    );
    let resp = publish(addr, r#"{"group":"g","message":{"type":"x"}}"#).await;
    assert_eq!(resp.status, 503);
    let stats = handle.stats();
    let errors = |op: &str| stats.layer_errors.iter().find(|(o, _)| *o == op).unwrap().1;
    assert_eq!(errors("send"), 1);
    assert_eq!(errors("group_send"), 1);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn builtin_routes_move_switch_off_and_never_shadow_app_routes() {
    let mine = || http(|_req: Request| async { Ok(Response::text("mine")) });
    // An app route on a built-in path is an error at startup, with a clear message.
    let clash = |app: App, builtins: Builtins| match Server::new(app).with_builtins(builtins) {
        Err(e) => e,
        Ok(_) => panic!("clash not detected"),
    };
    let e = clash(
        App::new().http(path("/metrics", mine())),
        Builtins::default(),
    );
    assert!(
        matches!(&e, ServerError::RouteClash { builtin: "metrics", path, .. } if path == "/metrics"),
        "{e:?}"
    );
    assert!(e.to_string().contains("\"/metrics\""), "{e}");
    // Patterns count too: a parameter that would swallow a built-in path.
    let e = clash(
        App::new().http(path("/api/{name}", mine())),
        Builtins::default(),
    );
    assert!(
        matches!(
            &e,
            ServerError::RouteClash {
                builtin: "rooms",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("/api/{name}"), "{e}");
    // WebSocket routes too.
    let e = clash(
        App::new().websocket(path("/ready", ws(demo::Echo::default))),
        Builtins::default(),
    );
    assert!(
        matches!(
            &e,
            ServerError::RouteClash {
                builtin: "ready",
                ..
            }
        ),
        "{e:?}"
    );
    // Two built-ins on one path.
    let e = clash(App::new(), Builtins::default().ready(Some("/metrics")));
    assert!(matches!(&e, ServerError::RouteClash { .. }), "{e:?}");
    // A path that is not one.
    let e = clash(App::new(), Builtins::default().metrics(Some("metrics")));
    assert!(
        matches!(
            &e,
            ServerError::BuiltinPath {
                builtin: "metrics",
                ..
            }
        ),
        "{e:?}"
    );

    // Moved and switched off: the app keeps its /metrics, the built-in lives elsewhere.
    let app = App::new()
        .http(path("/metrics", mine()))
        .http(path("/api/{name}", mine()));
    let mut server = start_with_builtins(
        app,
        quiet_config(),
        Builtins::default()
            .metrics(Some("/internal/metrics"))
            .api(Some("/internal/api"))
            .ready(None),
    )
    .await;
    assert_eq!(get(server.addr, "/metrics").await.body, "mine");
    assert_eq!(get(server.addr, "/api/rooms").await.body, "mine");
    let resp = get(server.addr, "/internal/metrics").await;
    assert_eq!(resp.status, 200);
    assert!(resp.body.contains("# TYPE canal_connections gauge"));
    let resp = get(server.addr, "/internal/api/rooms").await;
    assert_eq!(resp.json(), serde_json::json!({ "rooms": [] }));
    assert_eq!(get(server.addr, "/ready").await.status, 404);
    server.shutdown().await;

    // Without with_builtins, no built-in route at all.
    let mut bare = TestServer::start(demo::app()).await;
    for p in ["/metrics", "/ready", "/api/rooms"] {
        assert_eq!(get(bare.addr, p).await.status, 404, "{p}");
    }
    bare.shutdown().await;
}

#[tokio::test]
async fn root_path_is_stripped_before_routing() {
    let app = demo::app().http(path(
        "/whoami",
        http(|req: Request| async move {
            Ok(Response::text(format!(
                "{} {}",
                req.scope.root_path(),
                req.scope.path()
            )))
        }),
    ));
    let mut config = quiet_config();
    config.root_path = "/chat-app/".to_owned();
    let mut server = start_with_builtins(app, config, Builtins::default()).await;
    assert_eq!(get(server.addr, "/chat-app/health").await.body, "ok");
    assert_eq!(
        get(server.addr, "/chat-app/whoami").await.body,
        "/chat-app /whoami"
    );
    assert_eq!(get(server.addr, "/health").await.status, 404);
    assert_eq!(get(server.addr, "/chat-appx/health").await.status, 404);
    let resp = get(server.addr, "/chat-app?x=1").await;
    assert_eq!(resp.status, 308);
    assert_eq!(resp.header("location"), Some("/chat-app/?x=1"));
    let page = get(server.addr, "/chat-app/chat/lobby/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>"));
    assert_eq!(get(server.addr, "/chat-app/api/rooms").await.status, 200);
    assert_eq!(get(server.addr, "/chat-app/metrics").await.status, 200);
    let mut echo = connect(&server.url("/chat-app/ws/echo/")).await;
    send_text(&mut echo, "under a prefix").await;
    assert_eq!(next_text(&mut echo).await, "under a prefix");
    let (_s, head) = raw_request(server.addr, &upgrade_request("/ws/echo/", "")).await;
    assert_eq!(status_of(&head), 404);
    echo.close().await.unwrap();
    server.shutdown().await;

    // A root path that is not a path is refused at startup.
    let mut config = quiet_config();
    config.root_path = "chat-app".to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = Server::new(demo::app())
        .with_config(config)
        .serve(listener, async {})
        .await;
    assert!(matches!(result, Err(ServerError::Config(_))), "{result:?}");
}

fn socket_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "canal-test-{tag}-{}-{}.sock",
        std::process::id(),
        fastrand::u32(..)
    ))
}

#[tokio::test]
async fn serves_http_and_websockets_on_a_unix_socket() {
    let sock = socket_path("unix");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let mut server = Server::new(demo::app())
        .with_config(quiet_config())
        .with_builtins(Builtins::default())
        .unwrap();
    let handle = server.handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = rx.await;
    }));
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let resp = http_on(stream, "GET", "/health", &[], b"").await;
    assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));

    let mut clients = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let (client, _) = tokio_websockets::ClientBuilder::new()
            .uri("ws://localhost/ws/chat/unix/")
            .unwrap()
            .connect_on(stream)
            .await
            .unwrap();
        clients.push(client);
    }
    clients[0]
        .send(tokio_websockets::Message::text("over a unix socket"))
        .await
        .unwrap();
    for c in clients.iter_mut() {
        let msg = tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(c))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(msg.as_text(), Some("over a unix socket"));
    }
    assert_eq!(handle.stats().websocket_accepted, 2);
    for mut c in clients {
        c.close().await.unwrap();
    }
    let _ = tx.send(());
    task.await.unwrap().unwrap();
    let _ = std::fs::remove_file(&sock);
}

/// Reads dashboard updates until one satisfies `done` (the sampler ticks once a second).
async fn dashboard_until(
    admin: &mut Client,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard never showed the expected numbers"
        );
        let update: serde_json::Value = serde_json::from_str(&next_text(admin).await).unwrap();
        if done(&update) {
            return update;
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_known_traffic_live() {
    const N: usize = 3; // chat clients in the busy room
    const M: usize = 5; // messages each
    const ADMIN: &str = "adm1n-t0ken";
    let mut server = start_with_builtins(
        demo::app(),
        quiet_config(),
        Builtins::default().admin("/admin/", ADMIN),
    )
    .await;
    // The page and its socket need the token.
    assert_eq!(get(server.addr, "/admin/").await.status, 401);
    assert_eq!(get(server.addr, "/admin/?token=wrong").await.status, 401);
    let page = get(server.addr, &format!("/admin/?token={ADMIN}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<canvas id=\"chart-connections\""));
    let page = http_req(
        server.addr,
        "GET",
        "/admin/",
        &[("Authorization", &format!("Bearer {ADMIN}"))],
        b"",
    )
    .await;
    assert_eq!(page.status, 200);
    let (s, head) = raw_request(server.addr, &upgrade_request("/admin/ws", "")).await;
    assert_eq!(status_of(&head), 401);
    drop(s);

    let mut admin = connect(&server.url(&format!("/admin/ws?token={ADMIN}"))).await;
    let first: serde_json::Value = serde_json::from_str(&next_text(&mut admin).await).unwrap();
    assert!(first["history"].is_array(), "{first}");

    let mut busy = Vec::new();
    for _ in 0..N {
        busy.push(connect(&server.url("/ws/chat/busy/")).await);
    }
    let mut quiet = connect(&server.url("/ws/chat/quiet/")).await;
    for client in busy.iter_mut() {
        for m in 0..M {
            send_text(client, &format!("m{m}")).await;
        }
    }
    for client in busy.iter_mut() {
        for _ in 0..N * M {
            next_text(client).await;
        }
    }
    let total = (N * M) as u64;
    // Chat clients plus the dashboard's own socket (whose messages are not counted); the
    // HTTP connections of the checks above close soon.
    let update = dashboard_until(&mut admin, |u| {
        u["sample"]["messages_in"] == total
            && u["sample"]["messages_out"] == total * N as u64
            && u["sample"]["connections"] == (N + 2) as u64
    })
    .await;
    let s = &update["sample"];
    assert_eq!(s["websockets"], (N + 2) as u64, "{update}");
    assert_eq!(s["slow_drops"], 0);
    assert_eq!(s["layer_errors"], 0);
    assert_eq!(s["layer_dropped"], 0);
    assert_eq!(update["group_count"], 2);
    assert_eq!(
        update["groups"],
        serde_json::json!([
            { "name": "busy", "members": N },
            { "name": "quiet", "members": 1 }
        ])
    );
    assert_eq!(update["busiest"][0]["name"], "busy", "{update}");
    assert_eq!(update["busiest"][0]["sends"], total, "{update}");
    assert_eq!(update["busiest"].as_array().unwrap().len(), 1);
    assert_eq!(update["dropped"]["slow_client"], 0);

    // Leaving shows up too; the history keeps the earlier samples.
    for mut c in busy {
        c.close().await.unwrap();
    }
    let update = dashboard_until(&mut admin, |u| u["sample"]["websockets"] == 2).await;
    assert_eq!(update["group_count"], 1);
    quiet.close().await.unwrap();
    admin.close().await.unwrap();
    let mut again = connect(&server.url(&format!("/admin/ws?token={ADMIN}"))).await;
    let first: serde_json::Value = serde_json::from_str(&next_text(&mut again).await).unwrap();
    let history = first["history"].as_array().unwrap();
    assert!(history.len() >= 2, "{first}");
    assert!(
        history
            .iter()
            .any(|s| s["websockets"] == (N + 2) as u64 && s["messages_in"] == total),
        "the earlier minutes are kept: {first}"
    );
    again.close().await.unwrap();
    server.shutdown().await;

    // Off unless asked for, and never on without a token.
    let mut off = start_with_builtins(demo::app(), quiet_config(), Builtins::default()).await;
    assert_eq!(get(off.addr, "/admin/").await.status, 404);
    off.shutdown().await;
    let mut no_token = Builtins::default();
    no_token.admin = Some("/admin/".to_owned());
    assert!(matches!(
        Server::new(demo::app()).with_builtins(no_token),
        Err(ServerError::Config(_))
    ));
}
