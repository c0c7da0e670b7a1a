//! The Redis layer against real `redis-server` processes (one private server per test, on a free
//! port, killed with SIGKILL) and the real Python `channels_redis` package.
//!
//! When `redis-server` or the Python venv (`~/.cache/canal/py-venv`, made by `scripts/test.sh`)
//! is missing, these tests say so loudly and pass without running outside CI; under `CI=true`
//! they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canal::layer::{CapacityRule, RedisConfig, RedisLayer};
use canal::prelude::*;
use canal::{Layer, LayerError, demo};
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says loudly that an outside part is missing: a failure in CI, a skip elsewhere.
fn missing(what: &str) -> Option<std::convert::Infallible> {
    if in_ci() {
        panic!("{what} is required under CI=true");
    }
    eprintln!("\n*** SKIPPED: {what} is missing; run scripts/test.sh to set it up ***\n");
    None
}

struct Redis {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Redis {
    async fn start() -> Option<Redis> {
        Redis::start_with(Vec::new()).await
    }

    /// A private redis-server with extra arguments (`{port}` is replaced by its port).
    async fn start_with(extra: Vec<String>) -> Option<Redis> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            missing("redis-server")?;
        }
        let port = free_port();
        let mut redis = Redis {
            port,
            child: None,
            extra,
        };
        redis.spawn().await;
        Some(redis)
    }

    async fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if self.extra.is_empty() {
            args.extend(["--port".to_owned(), port.clone()]);
        }
        args.extend(self.extra.iter().map(|a| a.replace("{port}", &port)));
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no save, no goodbye, as in a crash.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
            let _ = child.wait().await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn python() -> Option<PathBuf> {
    let path = std::env::var_os("CANAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/canal/py-venv/bin/python")
        });
    let ok = std::process::Command::new(&path)
        .args(["-c", "import channels_redis, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(path)
    } else {
        missing("the Python venv with channels, channels-redis and cryptography")?;
        None
    }
}

fn interop_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/interop.py")
}

fn py_command(python: &PathBuf, hosts: &str, keys: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(interop_script()).arg(hosts);
    for key in keys {
        cmd.args(["--key", key]);
    }
    cmd.kill_on_drop(true);
    cmd
}

async fn py_run(python: &PathBuf, hosts: &str, keys: &[&str], args: &[&str]) {
    let out = py_command(python, hosts, keys)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn layer(hosts: &str, keys: &[&str]) -> RedisLayer {
    let mut config = RedisConfig::from_urls(hosts);
    config.symmetric_encryption_keys = keys.iter().map(|k| (*k).to_owned()).collect();
    RedisLayer::new(config).unwrap()
}

async fn server_on(layer: RedisLayer) -> TestServer {
    let layer: Layer = Arc::new(layer);
    TestServer::start_full(demo::app(), quiet_config(), Some(layer)).await
}

fn rich_message() -> Message {
    msg! {
        "type": "interop.rich",
        "text": "héllo ✓",
        "bytes": vec![0u8, 1, 255],
        "big": 1u64 << 40,
        "neg": -3,
        "f": 1.5,
        "t": true,
        "none": Value::Nil,
        "nested": Message::from(canal::Map::from_iter([
            ("l", Value::List(vec![Value::Int(1), Value::from("a"), Value::Nil, Value::from(vec![2u8])])),
            ("m", Value::from(Message::from(canal::Map::from_iter([("k", "v")])))),
        ])),
    }
}

/// The three layouts every interop test runs in.
fn variants(r1: &Redis, r2: &Redis) -> Vec<(String, Vec<&'static str>)> {
    vec![
        (r1.url(), vec![]),
        (r1.url(), vec!["secret-one", "older-secret"]),
        (format!("{},{}", r1.url(), r2.url()), vec![]),
    ]
}

#[tokio::test]
async fn python_group_send_reaches_a_canal_websocket() {
    let (Some(r1), Some(r2), Some(py)) = (Redis::start().await, Redis::start().await, python())
    else {
        return;
    };
    for (hosts, keys) in variants(&r1, &r2) {
        let server = server_on(layer(&hosts, &keys)).await;
        let mut c = connect(&server.url("/ws/chat/djangoroom/")).await;
        let mut other = connect(&server.url("/ws/chat/elsewhere/")).await;
        py_run(
            &py,
            &hosts,
            &keys,
            &["group_send", "djangoroom", "from django"],
        )
        .await;
        assert_eq!(next_text(&mut c).await, "from django", "{hosts} {keys:?}");
        expect_silence(&mut other, 200).await;
        // And canal → the same room reaches only once (local members never get duplicates).
        send_text(&mut c, "from canal").await;
        assert_eq!(next_text(&mut c).await, "from canal");
        expect_silence(&mut c, 300).await;
    }
}

#[tokio::test]
async fn canal_sends_to_a_python_channel_with_exact_types() {
    let (Some(r1), Some(r2), Some(py)) = (Redis::start().await, Redis::start().await, python())
    else {
        return;
    };
    for (hosts, keys) in variants(&r1, &r2) {
        let mut child = py_command(&py, &hosts, &keys)
            .arg("receive_new")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let name = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("python printed its channel name");
        assert!(
            name.starts_with("specific.") && name.contains('!'),
            "{name}"
        );
        let canal = layer(&hosts, &keys);
        canal.send(&name, rich_message()).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("python printed the message");
        let got: serde_json::Value = serde_json::from_str(&got).unwrap();
        let v = &got["v"];
        assert_eq!(
            v["type"],
            serde_json::json!({"t": "str", "v": "interop.rich"})
        );
        assert_eq!(v["text"], serde_json::json!({"t": "str", "v": "héllo ✓"}));
        assert_eq!(
            v["bytes"],
            serde_json::json!({"t": "bytes", "v": [0, 1, 255]})
        );
        assert_eq!(v["big"], serde_json::json!({"t": "int", "v": 1u64 << 40}));
        assert_eq!(v["neg"], serde_json::json!({"t": "int", "v": -3}));
        assert_eq!(v["f"], serde_json::json!({"t": "float", "v": 1.5}));
        assert_eq!(v["t"], serde_json::json!({"t": "bool", "v": true}));
        assert_eq!(v["none"], serde_json::json!({"t": "none"}));
        assert_eq!(
            v["nested"]["v"]["l"]["v"][3],
            serde_json::json!({"t": "bytes", "v": [2]})
        );
        assert_eq!(
            v["nested"]["v"]["m"],
            serde_json::json!({"t": "dict", "v": {"k": {"t": "str", "v": "v"}}})
        );
        assert!(v.get("__asgi_channel__").is_none(), "routing key removed");
        let _ = child.wait().await;
    }
}

#[tokio::test]
async fn python_sends_reach_canal_worker_and_process_channels() {
    let (Some(r1), Some(r2), Some(py)) = (Redis::start().await, Redis::start().await, python())
    else {
        return;
    };
    for (hosts, keys) in variants(&r1, &r2) {
        let canal = layer(&hosts, &keys);
        // A named (worker) channel.
        let receiver = {
            let canal = canal.clone();
            tokio::spawn(async move { canal.receive("interop.jobs").await })
        };
        py_run(&py, &hosts, &keys, &["send", "interop.jobs"]).await;
        let got = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, rich_message(), "{hosts} {keys:?}");
        // A canal process channel: Python hashes the full name (channels_redis bug B1); canal
        // reads its process key on every shard, so it still arrives. With two hosts, pick names
        // whose full-name shard differs from the receiving shard, so the bug path is exercised.
        let shards = hosts.split(',').count();
        let mut names = Vec::new();
        while names.len() < 2 {
            let name = canal.new_channel().await.unwrap();
            let non_local = canal::layer::non_local_name(&name);
            if shards == 1
                || canal::layer::consistent_hash(&name, shards)
                    != canal::layer::consistent_hash(non_local, shards)
            {
                names.push(name);
            }
        }
        for name in names {
            py_run(&py, &hosts, &keys, &["send", &name]).await;
            let got = tokio::time::timeout(Duration::from_secs(10), canal.receive(&name))
                .await
                .expect("message for a process channel from Python")
                .unwrap();
            assert_eq!(got, rich_message());
        }
    }
}

#[tokio::test]
async fn storage_is_what_channels_redis_stores() {
    let Some(r) = Redis::start().await else {
        return;
    };
    let canal = layer(&r.url(), &[]);
    let message = msg! { "type": "wire.check", "text": "x" };
    canal.send("wire.chan", message.clone()).await.unwrap();
    canal.group_add("wire-group", "wire.chan").await.unwrap();
    let client = redis::Client::open(r.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let members: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
        .arg("asgiwire.chan")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    let (member, score) = &members[0];
    assert_eq!(
        &member[12..],
        &message.to_msgpack()[..],
        "12 random bytes, then msgpack"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - score).abs() < 5.0, "scored by unix time");
    let ttl: i64 = redis::cmd("TTL")
        .arg("asgiwire.chan")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((55..=60).contains(&ttl), "expiry 60 s, got {ttl}");
    let group: Vec<String> = redis::cmd("ZRANGE")
        .arg("asgi:group:wire-group")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(group, ["wire.chan"]);
    let ttl: i64 = redis::cmd("TTL")
        .arg("asgi:group:wire-group")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 86_000, "group expiry 86400 s, got {ttl}");
    // Capacity 100: the 101st unread message is refused.
    for _ in 1..100 {
        canal.send("wire.chan", message.clone()).await.unwrap();
    }
    assert!(matches!(
        canal.send("wire.chan", message.clone()).await,
        Err(LayerError::ChannelFull(_))
    ));
}

/// A process key carries every channel of its process, so canal checks it against ten times
/// the channel capacity (1,000 by default) unless a `channel_capacity` rule names the channel;
/// other channels keep the channel capacity.
#[tokio::test]
async fn process_keys_hold_ten_times_the_channel_capacity() {
    let Some(r) = Redis::start().await else {
        return;
    };
    let canal = layer(&r.url(), &[]);
    let message = msg! { "type": "t" };
    // A process that never reads its key.
    let far = "specific.elsewhere!abc";
    for _ in 0..1000 {
        canal.send(far, message.clone()).await.unwrap();
    }
    assert!(matches!(
        canal.send(far, message.clone()).await,
        Err(LayerError::ChannelFull(_))
    ));
    // A rule naming the channel wins over the process-key default.
    let mut config = RedisConfig::from_urls(&r.url());
    config.layer = config
        .layer
        .with_channel_capacity(CapacityRule::glob("specific.ruled!*", 100).unwrap());
    let ruled = RedisLayer::new(config).unwrap();
    for _ in 0..100 {
        ruled
            .send("specific.ruled!abc", message.clone())
            .await
            .unwrap();
    }
    assert!(matches!(
        ruled.send("specific.ruled!abc", message.clone()).await,
        Err(LayerError::ChannelFull(_))
    ));
}

/// A `canal serve` child process on a free port, on `layer`.
async fn serve_process(layer: &str) -> (Child, String) {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_canal"))
        .args([
            "--log-level",
            "warn",
            "serve",
            "--no-access-log",
            "--layer",
            layer,
        ])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("canal serving"), "{line}");
    (child, format!("ws://127.0.0.1:{port}"))
}

#[tokio::test]
async fn two_canal_serve_processes_share_one_chat() {
    let Some(r) = Redis::start().await else {
        return;
    };
    let (_a, a) = serve_process(&r.url()).await;
    let (_b, b) = serve_process(&r.url()).await;
    let mut ca = connect(&format!("{a}/ws/chat/shared/")).await;
    let mut cb = connect(&format!("{b}/ws/chat/shared/")).await;
    let mut cb2 = connect(&format!("{b}/ws/chat/shared/")).await;
    send_text(&mut ca, "typed on A").await;
    for c in [&mut ca, &mut cb, &mut cb2] {
        assert_eq!(next_text(c).await, "typed on A");
    }
    send_text(&mut cb2, "typed on B").await;
    for c in [&mut ca, &mut cb, &mut cb2] {
        assert_eq!(next_text(c).await, "typed on B");
    }
    expect_silence(&mut cb, 300).await;
}

#[tokio::test]
async fn memberships_are_refreshed_before_they_expire() {
    let (Some(r), Some(py)) = (Redis::start().await, python()) else {
        return;
    };
    let mut config = RedisConfig::from_urls(&r.url());
    config.layer = canal::LayerConfig::default().with_group_expiry(Duration::from_secs(2));
    config.refresh_interval = Some(Duration::from_millis(500));
    let server = server_on(RedisLayer::new(config).unwrap()).await;
    let mut c = connect(&server.url("/ws/chat/longlived/")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // channels_redis purges members older than its own group_expiry (86400 s) only, so this
    // checks that canal kept the membership alive in Redis (its 2 s key TTL passed twice).
    py_run(
        &py,
        &r.url(),
        &[],
        &["group_send", "longlived", "still here"],
    )
    .await;
    assert_eq!(next_text(&mut c).await, "still here");
}

#[tokio::test]
async fn a_pool_of_three_worker_processes_gets_each_message_once() {
    let Some(r) = Redis::start().await else {
        return;
    };
    let mut workers = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_canal"))
            .args([
                "--log-level",
                "warn",
                "worker",
                "--layer",
                &r.url(),
                "pool.jobs",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        workers.push(child);
    }
    let canal = layer(&r.url(), &[]);
    let total = 3000;
    for n in 0..total {
        loop {
            match canal
                .send("pool.jobs", msg! { "type": "job", "n": n })
                .await
            {
                Ok(()) => break,
                Err(LayerError::ChannelFull(_)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < total as usize {
        let line = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .expect("workers stopped delivering")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let n = v["message"]["n"].as_i64().unwrap();
        assert!(seen.insert(n), "message {n} delivered twice");
    }
    // Nothing more trickles in.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err()
    );
    // canal never uses the `$inflight` backup key that Python workers restore (bug B3).
    let client = redis::Client::open(r.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*inflight*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");

    // A job naming `reply_to` gets an answer there.
    let reply_to = canal.new_channel().await.unwrap();
    canal
        .send(
            "pool.jobs",
            msg! { "type": "job", "n": -1, "reply_to": reply_to.as_str() },
        )
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), canal.receive(&reply_to))
        .await
        .expect("a worker answered")
        .unwrap();
    assert_eq!(reply.kind(), Some("worker.reply"));
    assert_eq!(reply.str("channel").unwrap(), "pool.jobs");
}

#[tokio::test]
async fn group_send_purges_expired_entries_on_the_destination_shard() {
    // channels_redis bug B2: with several hosts, expired entries of a destination key on another
    // shard are never purged, so the key reads as full and the group message is dropped. canal
    // purges on the shard it writes to. The member here belongs to a process that is not running,
    // so nothing pops the key while the test looks at it.
    let (Some(r1), Some(r2)) = (Redis::start().await, Redis::start().await) else {
        return;
    };
    let hosts = format!("{},{}", r1.url(), r2.url());
    let member = "specific.deadbeef!conn1";
    let key = "asgispecific.deadbeef!";
    let shard = canal::layer::consistent_hash("specific.deadbeef!", 2);
    let url = if shard == 0 { r1.url() } else { r2.url() };
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        - 120.0;
    for i in 0..100 {
        let _: () = redis::cmd("ZADD")
            .arg(key)
            .arg(old)
            .arg(format!("stale-{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let sender = layer(&hosts, &[]);
    sender.group_add("b2room", member).await.unwrap();
    sender
        .group_send(
            "b2room",
            msg! { "type": "chat.message", "text": "not dropped" },
        )
        .await
        .unwrap();
    assert_eq!(sender.stats().dropped_full, 0);
    let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        members.len(),
        1,
        "stale entries purged, the new message stored"
    );
    let stored = Message::from_msgpack(&members[0][12..]).unwrap();
    assert_eq!(stored.str("text").unwrap(), "not dropped");
    assert_eq!(
        stored.get("__asgi_channel__"),
        Some(&Value::List(vec![Value::from(member)]))
    );
}

#[tokio::test]
async fn redis_killed_and_restarted_under_traffic() {
    let Some(mut r) = Redis::start().await else {
        return;
    };
    let canal = layer(&r.url(), &[]);
    let server = server_on(canal.clone()).await;
    let mut echo = connect(&server.url("/ws/echo/")).await;
    let mut a = connect(&server.url("/ws/chat/outage/")).await;
    let mut b = connect(&server.url("/ws/chat/outage/")).await;
    send_text(&mut a, "before").await;
    assert_eq!(next_text(&mut b).await, "before");
    assert_eq!(next_text(&mut a).await, "before");

    r.kill().await;
    // Local traffic is unaffected; group traffic fails, is counted, and keeps the sockets.
    for i in 0..5 {
        send_text(&mut echo, &format!("local {i}")).await;
        assert_eq!(next_text(&mut echo).await, format!("local {i}"));
        send_text(&mut a, "lost").await;
    }
    expect_silence(&mut b, 300).await;
    assert!(
        canal.stats().dropped_backend > 0,
        "failed sends are counted"
    );

    r.spawn().await; // same port, empty: the memberships were lost with the data
    let back = Instant::now();
    // Sends made during the outage either failed (counted above) or were retried by the
    // connection manager once Redis answered again; "after" must arrive within 5 s.
    'outer: loop {
        send_text(&mut a, "after").await;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(
            Duration::from_millis(200),
            futures_util::StreamExt::next(&mut b),
        )
        .await
        {
            match m.as_text() {
                Some("after") => break 'outer,
                Some("lost") => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "group traffic must resume within 5 s of Redis returning"
        );
    }
    send_text(&mut echo, "still local").await;
    assert_eq!(next_text(&mut echo).await, "still local");
}

#[tokio::test]
async fn canal_send_from_the_shell() {
    let Some(r) = Redis::start().await else {
        return;
    };
    let server = server_on(layer(&r.url(), &[])).await;
    let mut c = connect(&server.url("/ws/chat/shell/")).await;
    let bin = env!("CARGO_BIN_EXE_canal");
    let out = Command::new(bin)
        .args([
            "send",
            "--layer",
            &r.url(),
            "--group",
            "shell",
            r#"{"type":"chat.message","text":"hi from bash"}"#,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next_text(&mut c).await, "hi from bash");

    let run =
        |args: Vec<String>| async move { Command::new(bin).args(&args).output().await.unwrap() };
    let out = run(vec![
        "send".into(),
        "--group".into(),
        "shell".into(),
        "{}".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shared channel layer"));
    let out = run(vec![
        "send".into(),
        "--layer".into(),
        r.url(),
        "bad name".into(),
        "{}".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid channel name"));
    let out = run(vec![
        "send".into(),
        "--layer".into(),
        r.url(),
        "chan".into(),
        "{oops".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON"));
    let secret = format!("redis://:hunter2@127.0.0.1:{}", r.port);
    let out = run(vec![
        "send".into(),
        "--layer".into(),
        secret,
        "chan".into(),
        "{}".into(),
    ])
    .await;
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("hunter2"),
        "passwords never printed"
    );

    // --capacity and --channel-capacity (Channels' capacity and channel_capacity): a channel
    // matching the pattern holds 2 messages, the third send is refused.
    let capped = |channel: &str| {
        vec![
            "send".to_owned(),
            "--layer".to_owned(),
            r.url(),
            "--capacity".to_owned(),
            "1".to_owned(),
            "--channel-capacity".to_owned(),
            "capped.*=2".to_owned(),
            channel.to_owned(),
            r#"{"type":"t"}"#.to_owned(),
        ]
    };
    for _ in 0..2 {
        let out = run(capped("capped.jobs")).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(capped("capped.jobs")).await;
    assert!(!out.status.success(), "the third message must not fit");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("full"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Other channels get --capacity 1.
    assert!(run(capped("other.jobs")).await.status.success());
    assert!(!run(capped("other.jobs")).await.status.success());
    let mut bad = capped("x");
    bad[6] = "capped.*".to_owned();
    let out = run(bad).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PATTERN=N"));
}

#[tokio::test]
async fn urls_with_passwords_and_tls() {
    // A password-protected Redis: the URL carries it, errors never show it.
    let Some(r) = Redis::start_with(vec![
        "--port".into(),
        "{port}".into(),
        "--requirepass".into(),
        "s3cret-pw".into(),
    ])
    .await
    else {
        return;
    };
    let good = layer(&format!("redis://:s3cret-pw@127.0.0.1:{}", r.port), &[]);
    good.send("auth.jobs", msg! { "type": "t", "n": 1 })
        .await
        .unwrap();
    assert_eq!(good.receive("auth.jobs").await.unwrap().int("n"), Ok(1));
    let bad = layer(&format!("redis://:wrong-pw@127.0.0.1:{}", r.port), &[]);
    let err = bad
        .send("auth.jobs", msg! { "type": "t" })
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::Backend(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-pw"), "{err}");

    // TLS (rediss://) with a self-signed certificate, accepted with the #insecure marker.
    let dir = std::env::temp_dir().join(format!("canal-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    if !made.is_ok_and(|o| o.status.success()) {
        missing("openssl (to make a test certificate)");
        return;
    }
    let Some(t) = Redis::start_with(vec![
        "--port".into(),
        "0".into(),
        "--tls-port".into(),
        "{port}".into(),
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
        "--tls-ca-cert-file".into(),
        cert.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
    ])
    .await
    else {
        return;
    };
    let tls = layer(&format!("rediss://127.0.0.1:{}/#insecure", t.port), &[]);
    tls.send("tls.jobs", msg! { "type": "t", "text": "over tls" })
        .await
        .unwrap();
    assert_eq!(
        tls.receive("tls.jobs").await.unwrap().str("text").unwrap(),
        "over tls"
    );
    let server = server_on(tls.clone()).await;
    let mut a = connect(&server.url("/ws/chat/tlsroom/")).await;
    tls.group_send(
        "tlsroom",
        msg! { "type": "chat.message", "text": "via rediss" },
    )
    .await
    .unwrap();
    assert_eq!(next_text(&mut a).await, "via rediss");
    let _ = std::fs::remove_dir_all(&dir);
}
