//! `canal serve --workers N` as real processes on real sockets, with a private `redis-server`
//! per test: the refusals, one port served by several workers, a room that spans them, a
//! graceful stop, and a restart after a worker is killed.
//!
//! SO_REUSEPORT picks a worker by a hash of each connection's addresses and ports, so the tests
//! open fresh connections (fresh source ports) until they have seen the workers they need,
//! within a bounded number of tries. Without `redis-server` the Redis tests say so loudly and
//! pass outside CI; under `CI=true` they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_websockets::{ClientBuilder, Message, WebSocketStream};

const BIN: &str = env!("CARGO_BIN_EXE_canal");

/// Fresh connections tried before concluding that a worker is never reached.
const TRIES: usize = 400;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A private redis-server on a free port, killed when dropped.
struct Redis {
    port: u16,
    _child: Child,
}

impl Redis {
    async fn start() -> Option<Redis> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(!in_ci(), "redis-server is required under CI=true");
            eprintln!(
                "\n*** SKIPPED: redis-server is missing; run scripts/test.sh to set it up ***\n"
            );
            return None;
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(Redis {
            port,
            _child: child,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// `canal serve --workers N` (the supervisor), killed when dropped; its workers then see
/// their control socket close and stop on their own.
struct Supervisor {
    child: Child,
    addr: SocketAddr,
}

impl Supervisor {
    async fn start(workers: usize, redis: &Redis) -> Supervisor {
        let port = free_port();
        let mut child = Command::new(BIN)
            .args(["--log-level", "warn", "serve", "--no-access-log"])
            .args(["--workers", &workers.to_string()])
            .args(["--layer", &redis.url()])
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--shutdown-grace", "3"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("no startup line within 30 s")
            .unwrap()
            .expect("the supervisor exited before its startup line");
        assert!(
            first.contains(&format!("http://127.0.0.1:{port}/"))
                && first.contains(&format!("{workers} worker processes")),
            "the startup line gives the URL and the number of workers: {first}"
        );
        // Keep reading stdout so nothing the processes print can block them.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Supervisor {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits (bounded) for the supervisor to exit.
    async fn exit_status(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the supervisor did not exit within 30 s")
            .unwrap()
    }
}

/// The worker named by a `/metrics` answer: its index and pid, checked against its
/// `X-Canal-Worker` header.
fn worker_of(resp: &HttpResponse) -> (usize, u32) {
    assert_eq!(resp.status, 200, "{resp:?}");
    let line = resp
        .body
        .lines()
        .find(|l| l.starts_with("canal_worker_info{"))
        .unwrap_or_else(|| panic!("no canal_worker_info in /metrics:\n{}", resp.body));
    let label = |name: &str| -> String {
        let start = line.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        line[start..].split('"').next().unwrap().to_owned()
    };
    let index: usize = label("worker").parse().unwrap();
    assert_eq!(
        resp.header("x-canal-worker"),
        Some(index.to_string().as_str()),
        "the header names the same worker as the metrics"
    );
    (index, label("pid").parse().unwrap())
}

/// The value of a metric line without labels or with exactly `labels`.
fn metric(body: &str, name_and_labels: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens fresh connections until every worker 1..=n has answered `/metrics`; their pids.
async fn worker_pids(addr: SocketAddr, n: usize) -> HashMap<usize, u32> {
    let mut seen = HashMap::new();
    for _ in 0..TRIES {
        let (index, pid) = worker_of(&get(addr, "/metrics").await);
        seen.insert(index, pid);
        if seen.len() == n {
            return seen;
        }
    }
    panic!("after {TRIES} connections only workers {seen:?} answered");
}

/// Reads one HTTP response (head and `Content-Length` body) from a keep-alive connection,
/// leaving the stream right after it.
async fn read_response(s: &mut TcpStream) -> HttpResponse {
    let head = read_head(s).await;
    let mut lines = head.split("\r\n");
    let status = status_of(lines.next().unwrap_or(""));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body))
        .await
        .expect("timed out reading a body")
        .unwrap();
    HttpResponse {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// A connection served by worker `want`: asks `/metrics` on a keep-alive connection (the
/// worker that answers holds the connection), and tries fresh connections until it is `want`.
async fn connection_on(addr: SocketAddr, want: usize) -> TcpStream {
    for _ in 0..TRIES {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let (index, _) = worker_of(&read_response(&mut s).await);
        if index == want {
            return s;
        }
    }
    panic!("no connection reached worker {want} in {TRIES} tries");
}

type Ws = WebSocketStream<TcpStream>;

/// Upgrades `stream` to a WebSocket in chat room `room`.
async fn join(stream: TcpStream, addr: SocketAddr, room: &str) -> Ws {
    let url = format!("ws://{addr}/ws/chat/{room}/");
    let (ws, _resp) = ClientBuilder::new()
        .uri(&url)
        .unwrap()
        .connect_on(stream)
        .await
        .unwrap_or_else(|e| panic!("upgrade to {url}: {e}"));
    ws
}

async fn next_text_on(ws: &mut Ws) -> String {
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("timed out waiting for a message")
        .expect("stream ended")
        .expect("websocket error");
    msg.as_text()
        .unwrap_or_else(|| panic!("expected text, got {msg:?}"))
        .to_owned()
}

/// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn serve_help_explains_workers_and_hides_the_internal_flags() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let at = help.find("--workers <N>").expect("--workers is listed");
    let text: String = help[at..].split("\n\n").next().unwrap().into();
    for part in ["SO_REUSEPORT", "redis://", "[default: 1]"] {
        assert!(text.contains(part), "{part} missing from:\n{text}");
    }
    assert!(!help.contains("--worker-index") && !help.contains("--worker-bind"));
}

#[tokio::test]
async fn workers_are_refused_without_a_shared_layer_or_with_a_unix_socket() {
    let port = free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let out = Command::new(BIN)
        .args(["serve", "--workers", "2", "--bind", &bind])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--workers 2 needs a shared channel layer")
            && err.contains("groups")
            && err.contains("--layer redis://"),
        "says why and how to fix it: {err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("canal serving"),
        "nothing served"
    );

    // The same from the config file.
    let config = std::env::temp_dir().join(format!("canal-workers-{}.toml", std::process::id()));
    std::fs::write(&config, format!("workers = 3\nbind = \"{bind}\"\n")).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&config);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--workers 3 needs a shared channel layer")
    );

    let out = Command::new(BIN)
        .args(["serve", "--workers", "2", "--layer", "redis://127.0.0.1:1"])
        .args(["--unix-socket", "/tmp/canal-workers-never.sock"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot be combined with --unix-socket or --fd")
    );

    let out = Command::new(BIN)
        .args(["serve", "--workers", "0"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "0 workers is not a number of workers"
    );
}

#[tokio::test]
async fn workers_that_cannot_start_make_the_supervisor_give_up() {
    // The port is taken: reported before any worker starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bind = taken.local_addr().unwrap().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .args(["serve", "--workers", "2", "--layer", "redis://127.0.0.1:1"])
            .args(["--bind", &bind])
            .output(),
    )
    .await
    .expect("the supervisor gave up in time")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {bind}")), "{err}");

    // Each worker refuses its settings: the supervisor stops instead of restarting them.
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(BIN)
            .args([
                "serve",
                "--workers",
                "2",
                "--layer",
                "redis://127.0.0.1:notaport",
            ])
            .args(["--bind", &format!("127.0.0.1:{}", free_port())])
            .output(),
    )
    .await
    .expect("the supervisor gave up in time")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exited before it was ready"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("canal serving"),
        "no startup line"
    );
}

#[tokio::test]
async fn two_workers_share_one_port_and_one_room() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let sup = Supervisor::start(2, &redis).await;
    let pids = worker_pids(sup.addr, 2).await;
    assert_ne!(pids[&1], pids[&2], "two processes");

    // `/health` keeps its exact answer, whichever worker serves it.
    for _ in 0..4 {
        let health = get(sup.addr, "/health").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok"));
        assert_eq!(
            health.header("x-canal-worker"),
            None,
            "an app route, untouched"
        );
    }

    let mut a = join(connection_on(sup.addr, 1).await, sup.addr, "spans").await;
    let mut b = join(connection_on(sup.addr, 2).await, sup.addr, "spans").await;
    a.send(Message::text("from worker 1")).await.unwrap();
    assert_eq!(next_text_on(&mut a).await, "from worker 1");
    assert_eq!(
        next_text_on(&mut b).await,
        "from worker 1",
        "crossed to worker 2"
    );
    b.send(Message::text("from worker 2")).await.unwrap();
    assert_eq!(next_text_on(&mut b).await, "from worker 2");
    assert_eq!(
        next_text_on(&mut a).await,
        "from worker 2",
        "crossed to worker 1"
    );
}

#[tokio::test]
async fn sigterm_stops_every_worker_and_the_supervisor_exits_0() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut sup = Supervisor::start(3, &redis).await;
    let pids = worker_pids(sup.addr, 3).await;
    let mut ws = join(connection_on(sup.addr, 2).await, sup.addr, "bye").await;
    sup.signal(rustix::process::Signal::TERM);
    // The open WebSocket is closed as going away (1001).
    let close = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no close frame within 10 s");
        match msg {
            Some(Ok(m)) if m.is_close() => break m.as_close().map(|(c, _)| u16::from(c)),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    let status = sup.exit_status().await;
    assert_eq!(status.code(), Some(0), "a clean stop exits 0");
    for (index, pid) in pids {
        assert!(ended(pid), "worker {index} (pid {pid}) still runs");
    }
    assert!(
        TcpStream::connect(sup.addr).await.is_err(),
        "nobody listens any more"
    );
}

#[tokio::test]
async fn a_killed_worker_is_restarted_in_its_slot() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut sup = Supervisor::start(2, &redis).await;
    let before = worker_pids(sup.addr, 2).await;
    let victim = before[&1];
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();

    // Fresh connections until worker 1 answers from a new process, bounded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        assert!(
            Instant::now() < deadline,
            "worker 1 was not restarted within 30 s"
        );
        // While worker 1 is down, its share of new connections may be refused.
        if let Ok(s) = TcpStream::connect(sup.addr).await {
            let resp = http_on(s, "GET", "/metrics", &[], b"").await;
            if resp.status == 200 {
                let (index, pid) = worker_of(&resp);
                if index == 1 && pid != victim {
                    break resp;
                }
                if index == 2 {
                    assert_eq!(pid, before[&2], "worker 2 was left alone");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric(&restarted.body, "canal_worker_restarts{worker=\"1\"}"),
        Some(1),
        "{}",
        restarted.body
    );
    assert!(ended(victim));

    // The restarted worker takes part in rooms again.
    let mut a = join(connection_on(sup.addr, 1).await, sup.addr, "again").await;
    let mut b = join(connection_on(sup.addr, 2).await, sup.addr, "again").await;
    a.send(Message::text("back")).await.unwrap();
    assert_eq!(next_text_on(&mut b).await, "back");

    sup.signal(rustix::process::Signal::TERM);
    assert_eq!(sup.exit_status().await.code(), Some(0));
}
