//! `idle`: many mostly silent chat connections; server memory per connection.
//!
//! The parent process holds no sockets. It starts `--processes` copies of itself
//! (`canal-bench idle-worker`, hidden), each holding an equal share of the connections, and
//! drives them over stdin/stdout, one line per command:
//!
//! - `grow N` -> the worker opens connections until it holds `N`, then answers
//!   `ready HELD OPENED FAILED NO_ECHO DROPPED RSS_KB`;
//! - `expect TEXT` -> from now on it counts its connections that receive the text message
//!   `TEXT` (once each), and answers `expecting`;
//! - `count` -> answers `count GOT LAST_NS`: connections that received it so far and when the
//!   last one did (nanoseconds since the Unix epoch; both processes read the same clock);
//! - `close` -> it closes every connection (close frame, waits for the server's) and answers
//!   `closed CLEAN TOTAL`, then exits.
//!
//! With `--publish-url`, after the last step the parent checks a group send: it tells every
//! worker to expect one fresh text, publishes it to every room (`POST /api/publish`, one group
//! send per room, so the rooms together hold every connection), and waits until every held
//! connection got it.
//!
//! Worker `k` of `P` owns the global client indices `k, k+P, k+2P, ...`; client `i` joins room
//! `i % rooms` and binds to source address `i % sources`. Each client sends one short text
//! message after the upgrade and counts as connected once the room's broadcast of it came back.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::procfs;
use crate::util::{self, Target, round};
use crate::ws::{self, OP_TEXT};

/// Sockets one worker may hold (the open-file cap here is 20,000 per process).
const PER_PROCESS_MAX: usize = 19_000;
/// Connections per source address (the ephemeral port range holds about 28,000).
const PER_SOURCE_MAX: usize = 27_000;

#[derive(Args, Debug)]
pub struct IdleArgs {
    /// Server base URL (the path comes from --path).
    #[arg(long, default_value = "ws://127.0.0.1:8000")]
    url: String,
    /// Request path; `{room}` becomes the room number.
    #[arg(long, default_value = "/ws/chat/room-{room}/")]
    path: String,
    /// Server process ids (comma-separated: several worker processes), whose summed VmRSS is
    /// recorded at each step.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Connection counts to step through (ascending).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,6000,10000,14000,18000"
    )]
    counts: Vec<usize>,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Loopback source addresses, e.g. 127.0.0.1,127.0.0.2 or 127.0.0.1-4 (default: kernel's choice).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// Worker processes holding the connections (each holds at most 19,000).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Most seconds to wait for the server's RSS to settle at each step.
    #[arg(long, default_value_t = 30)]
    settle_max: u64,
    /// After the last step, publish one message to every room through this endpoint
    /// (`http://127.0.0.1:PORT/api/publish`) and check that every connection receives it.
    #[arg(long)]
    publish_url: Option<String>,
    /// Bearer token for --publish-url.
    #[arg(long, default_value = "")]
    publish_token: String,
    /// Group name of a room; `{room}` becomes the room number.
    #[arg(long, default_value = "room-{room}")]
    publish_group: String,
    /// Most seconds to wait for the published message to reach every connection.
    #[arg(long, default_value_t = 120)]
    publish_wait: u64,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    path: String,
    #[arg(long)]
    rooms: usize,
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    #[arg(long)]
    index: usize,
    #[arg(long)]
    stride: usize,
    #[arg(long)]
    concurrency: usize,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn send(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("worker {}: {e}", self.child.id()))
    }

    fn reply(&mut self) -> Result<Vec<u64>, String> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| format!("worker {}: {e}", self.child.id()))?;
        if n == 0 {
            return Err(format!("worker {} exited", self.child.id()));
        }
        line.split_whitespace()
            .skip(1)
            .map(|f| {
                f.parse::<u64>()
                    .map_err(|_| format!("bad worker line: {line}"))
            })
            .collect()
    }
}

/// The summed VmRSS of `pids` in kB, if every one is readable.
fn total_rss_kb(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| procfs::rss_kb(&p.to_string())).sum()
}

fn rss_samples(pids: &[u32], settle_max: u64) -> (Option<u64>, bool, f64) {
    if pids.is_empty() {
        return (None, false, 0.0);
    }
    let started = Instant::now();
    let mut last: Vec<u64> = Vec::new();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(v) = total_rss_kb(pids) else {
            return (None, false, started.elapsed().as_secs_f64());
        };
        last.push(v);
        if last.len() > 3 {
            last.remove(0);
        }
        if last.len() == 3 {
            let (lo, hi) = (
                last.iter().copied().min().unwrap_or(0),
                last.iter().copied().max().unwrap_or(0),
            );
            // Stable: three readings 1 s apart within 0.5 % (at least 256 kB).
            if hi - lo <= (hi / 200).max(256) {
                return (Some(v), true, started.elapsed().as_secs_f64());
            }
        }
        if started.elapsed() >= Duration::from_secs(settle_max) {
            return (Some(v), false, started.elapsed().as_secs_f64());
        }
    }
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

pub fn run(a: IdleArgs) -> Result<Value, String> {
    util::parse_ws_url(&a.url)?;
    let sources = util::parse_sources(&a.sources)?;
    if a.counts.is_empty() || a.counts.windows(2).any(|w| w[1] < w[0]) {
        return Err("--counts must be a non-empty ascending list".into());
    }
    if a.processes == 0 || a.rooms == 0 || !a.path.starts_with('/') {
        return Err("--processes and --rooms must be positive, --path must start with /".into());
    }
    let max = *a.counts.last().unwrap_or(&0);
    if max.div_ceil(a.processes) > PER_PROCESS_MAX {
        return Err(format!(
            "{max} connections over {} process(es) is more than {PER_PROCESS_MAX} sockets each: raise --processes",
            a.processes
        ));
    }
    if max.div_ceil(sources.len().max(1)) > PER_SOURCE_MAX {
        return Err(format!(
            "{max} connections over {} source address(es) exhausts the ephemeral ports: add --sources",
            sources.len().max(1)
        ));
    }
    if let Some(pid) = a
        .server_pid
        .iter()
        .find(|p| procfs::rss_kb(&p.to_string()).is_none())
    {
        return Err(format!("cannot read /proc/{pid}/status"));
    }
    if let Some(url) = &a.publish_url {
        publish_target(url)?;
    }

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    for k in 0..a.processes {
        let mut cmd = Command::new(&exe);
        cmd.arg("idle-worker")
            .args(["--url", &a.url, "--path", &a.path])
            .args(["--rooms", &a.rooms.to_string()])
            .args([
                "--index",
                &k.to_string(),
                "--stride",
                &a.processes.to_string(),
            ])
            .args(["--concurrency", &a.concurrency.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !a.sources.is_empty() {
            cmd.args(["--sources", &a.sources.join(",")]);
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err("worker without pipes".into());
        };
        workers.push(Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        });
    }
    let result = drive(&a, &mut workers);
    for w in &mut workers {
        // Workers exit after `close`; one still running here failed somewhere.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match w.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
            }
        }
    }
    result
}

fn drive(a: &IdleArgs, workers: &mut [Worker]) -> Result<Value, String> {
    let p = workers.len();
    let pid = a.server_pid.as_slice();
    let base_rss = total_rss_kb(pid);
    let mut steps = Vec::new();
    let mut connect_secs = 0.0;
    let mut connected = 0u64;
    let mut failure = None;
    for &count in &a.counts {
        let started = Instant::now();
        for (k, w) in workers.iter_mut().enumerate() {
            // Indices i < count with i % p == k.
            let share = (count + p - 1 - k) / p;
            w.send(&format!("grow {share}"))?;
        }
        let mut tot = [0u64; 6];
        for w in workers.iter_mut() {
            let r = w.reply()?;
            if r.len() != 6 {
                return Err(format!("bad worker reply {r:?}"));
            }
            for (t, v) in tot.iter_mut().zip(r) {
                *t += v;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let [held, opened, failed, no_echo, dropped, client_rss] = tot;
        let (rss, stable, settle_s) = rss_samples(pid, a.settle_max);
        connect_secs += secs;
        connected += opened;
        steps.push(json!({
            "target": count,
            "connections": held,
            "server_rss_kb": rss,
            "rss_stable": stable,
            "settle_s": round(settle_s, 1),
            "opened": opened,
            "failed": failed,
            "no_echo": no_echo,
            "dropped": dropped,
            "connect_s": round(secs, 3),
            "connect_rate_per_s": round(opened as f64 / secs, 1),
            "client_rss_kb": client_rss,
        }));
        if held < count as u64 {
            failure = Some(format!("held only {held} of {count} connections"));
            break;
        }
    }
    let per_process_rss: Vec<Option<u64>> =
        pid.iter().map(|p| procfs::rss_kb(&p.to_string())).collect();
    let group_send = match (&a.publish_url, &failure) {
        (Some(url), None) => {
            let held = steps
                .last()
                .and_then(|s| s["connections"].as_u64())
                .unwrap_or(0);
            let g = group_send(a, url, workers, held);
            if let Some(e) = g["error"].as_str() {
                failure = Some(format!("group send: {e}"));
            }
            Some(g)
        }
        _ => None,
    };

    for w in workers.iter_mut() {
        w.send("close")?;
    }
    let (mut clean, mut total) = (0u64, 0u64);
    for w in workers.iter_mut() {
        let r = w.reply()?;
        clean += r.first().copied().unwrap_or(0);
        total += r.get(1).copied().unwrap_or(0);
    }
    let after_rss = (!pid.is_empty())
        .then(|| {
            std::thread::sleep(Duration::from_secs(2));
            total_rss_kb(pid)
        })
        .flatten();

    let pts: Vec<(f64, f64)> = steps
        .iter()
        .filter_map(|s| {
            Some((
                s["connections"].as_f64()?,
                s["server_rss_kb"].as_f64()? * 1024.0,
            ))
        })
        .collect();
    let endpoints = match (pts.first(), pts.last()) {
        (Some(f), Some(l)) if l.0 > f.0 => Some((l.1 - f.1) / (l.0 - f.0)),
        _ => None,
    };
    let fit = slope(&pts);
    Ok(json!({
        "scenario": "idle",
        "url": a.url,
        "rooms": a.rooms,
        "processes": p,
        "sources": a.sources,
        "server_rss_before_kb": base_rss,
        "steps": steps,
        "bytes_per_connection_first_last": endpoints.map(|v| round(v, 0)),
        "bytes_per_connection_least_squares": fit.map(|v| round(v, 0)),
        "connect_rate_per_s": (connect_secs > 0.0).then(|| round(connected as f64 / connect_secs, 1)),
        "closed_cleanly": clean,
        "closed_total": total,
        "server_rss_after_close_kb": after_rss,
        "server_pids": a.server_pid,
        "server_rss_per_process_kb": per_process_rss,
        "group_send": group_send,
        "error": failure,
    }))
}

/// The socket address of `http://HOST:PORT/PATH` (loopback only) and its path.
fn publish_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: --publish-url must be an http:// URL"))?;
    util::parse_ws_url(&format!("ws://{rest}"))
}

/// Nanoseconds since the Unix epoch (the clock every process on the machine shares).
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One `POST` on a keep-alive connection; the response status.
fn post(
    conn: &mut BufReader<std::net::TcpStream>,
    target: &Target,
    token: &str,
    body: &str,
) -> Result<u16, String> {
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        target.path,
        target.host,
        body.len()
    );
    conn.get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| format!("publish: {e}"))?;
    let mut status = 0u16;
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        let n = conn
            .read_line(&mut line)
            .map_err(|e| format!("publish: {e}"))?;
        if n == 0 {
            return Err("publish: the server closed the connection".into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if status == 0 {
            status = l
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        } else if let Some((name, value)) = l.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    std::io::Read::read_exact(conn, &mut body).map_err(|e| format!("publish: {e}"))?;
    Ok(status)
}

/// Publishes one fresh text to every room and waits until every held connection got it.
fn group_send(a: &IdleArgs, url: &str, workers: &mut [Worker], held: u64) -> Value {
    let mut run = || -> Result<Value, String> {
        let target = publish_target(url)?;
        let text = format!("canal-bench group send {:016x}", fastrand::u64(..));
        for w in workers.iter_mut() {
            w.send(&format!("expect {text}"))?;
        }
        for w in workers.iter_mut() {
            w.reply()?;
        }
        let stream = std::net::TcpStream::connect(target.addr)
            .map_err(|e| format!("publish: connect {}: {e}", target.addr))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = BufReader::new(stream);
        let t0 = now_ns();
        let started = Instant::now();
        for r in 0..a.rooms {
            let group = a.publish_group.replace("{room}", &r.to_string());
            let body = json!({
                "group": group,
                "message": {"type": "chat.message", "text": text},
            })
            .to_string();
            let status = post(&mut conn, &target, &a.publish_token, &body)?;
            if status != 202 {
                return Err(format!("publishing to {group} answered {status}"));
            }
        }
        let publish_s = started.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(a.publish_wait);
        let (got, last_ns) = loop {
            for w in workers.iter_mut() {
                w.send("count")?;
            }
            let (mut got, mut last) = (0u64, 0u64);
            for w in workers.iter_mut() {
                let r = w.reply()?;
                got += r.first().copied().unwrap_or(0);
                last = last.max(r.get(1).copied().unwrap_or(0));
            }
            if got >= held || Instant::now() >= deadline {
                break (got, last);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let last_arrival_s = last_ns.saturating_sub(t0) as f64 / 1e9;
        Ok(json!({
            "rooms": a.rooms,
            "expected": held,
            "reached": got,
            "publish_s": round(publish_s, 3),
            "reach_all_s": (got >= held).then(|| round(last_arrival_s, 3)),
            "last_arrival_s": round(last_arrival_s, 3),
            "error": (got < held).then(|| format!(
                "{got} of {held} connections got it within {} s", a.publish_wait
            )),
        }))
    };
    run().unwrap_or_else(|e| json!({ "error": e }))
}

pub fn print(v: &Value) {
    println!(
        "idle  {}  rooms {}  worker processes {}",
        v["url"].as_str().unwrap_or_default(),
        v["rooms"],
        v["processes"]
    );
    println!(
        "  {:>11} {:>14} {:>12} {:>7} {:>9} {:>10} {:>7} {:>8} {:>14}",
        "connections",
        "server RSS kB",
        "delta kB",
        "stable",
        "connect s",
        "conn/s",
        "failed",
        "no echo",
        "client RSS kB"
    );
    let mut prev: Option<u64> = v["server_rss_before_kb"].as_u64();
    let empty = Vec::new();
    for s in v["steps"].as_array().unwrap_or(&empty) {
        let rss = s["server_rss_kb"].as_u64();
        let delta = match (rss, prev) {
            (Some(r), Some(p)) => format!("{:+}", r as i64 - p as i64),
            _ => "-".into(),
        };
        prev = rss.or(prev);
        println!(
            "  {:>11} {:>14} {:>12} {:>7} {:>9} {:>10} {:>7} {:>8} {:>14}",
            s["connections"].to_string(),
            rss.map_or("-".into(), |r| r.to_string()),
            delta,
            if s["rss_stable"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s["connect_s"].to_string(),
            s["connect_rate_per_s"].to_string(),
            s["failed"].to_string(),
            s["no_echo"].to_string(),
            s["client_rss_kb"].to_string()
        );
    }
    let b = |k: &str| {
        v[k].as_f64()
            .map_or("-".to_string(), |x| format!("{x:.0} B"))
    };
    println!(
        "  server RSS per connection: {} (first to last step), {} (least squares)",
        b("bytes_per_connection_first_last"),
        b("bytes_per_connection_least_squares")
    );
    println!(
        "  connect rate: {} connections/s (upgrade + join + own broadcast back)",
        v["connect_rate_per_s"]
    );
    println!(
        "  closed cleanly: {}/{}; server RSS before {} kB, after close {} kB",
        v["closed_cleanly"],
        v["closed_total"],
        v["server_rss_before_kb"],
        v["server_rss_after_close_kb"]
    );
    if let Some(pids) = v["server_pids"].as_array()
        && pids.len() > 1
    {
        let per: Vec<String> = pids
            .iter()
            .zip(v["server_rss_per_process_kb"].as_array().unwrap_or(&empty))
            .map(|(p, r)| format!("{p}: {r} kB"))
            .collect();
        println!(
            "  server RSS per process at the last step: {}",
            per.join(", ")
        );
    }
    let g = &v["group_send"];
    if !g.is_null() {
        println!(
            "  group send: one message to each of {} rooms (publish took {} s); reached {} of {} \
             connections; last arrival {} s after the first publish",
            g["rooms"], g["publish_s"], g["reached"], g["expected"], g["last_arrival_s"]
        );
    }
    if let Some(e) = v["error"].as_str() {
        println!("  error: {e}");
    }
}

// ---- worker process ----

enum Cmd {
    Grow(usize),
    Expect(Arc<[u8]>),
    Count,
    Close,
}

/// What a client reports into: the worker's count of held connections, and the group send
/// check.
struct Tallies {
    live: Arc<AtomicUsize>,
    expect: Arc<Expect>,
}

/// The text a `--publish-url` check waits for, and who got it.
#[derive(Default)]
struct Expect {
    text: Mutex<Option<Arc<[u8]>>>,
    got: AtomicU64,
    last_ns: AtomicU64,
}

impl Expect {
    fn matches(&self, payload: &[u8]) -> bool {
        self.text
            .lock()
            .is_ok_and(|t| t.as_deref().is_some_and(|t| t == payload))
    }

    fn hit(&self) {
        self.got.fetch_add(1, Relaxed);
        self.last_ns.fetch_max(now_ns(), Relaxed);
    }
}

pub fn worker(a: WorkerArgs) -> Result<(), String> {
    let target = Arc::new(util::parse_ws_url(&a.url)?);
    let sources: Arc<[IpAddr]> = util::parse_sources(&a.sources)?.into();
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let cmd = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["grow", n] => n.parse().ok().map(Cmd::Grow),
                ["expect", ..] => line
                    .strip_prefix("expect ")
                    .map(|t| Cmd::Expect(t.as_bytes().into())),
                ["count"] => Some(Cmd::Count),
                ["close"] => Some(Cmd::Close),
                _ => None,
            };
            if let Some(cmd) = cmd
                && tx.blocking_send(cmd).is_err()
            {
                break;
            }
        }
        // Parent gone: close everything.
        let _ = tx.blocking_send(Cmd::Close);
    });
    util::runtime(1).block_on(worker_loop(a, target, sources, rx));
    Ok(())
}

async fn worker_loop(
    a: WorkerArgs,
    target: Arc<Target>,
    sources: Arc<[IpAddr]>,
    mut cmds: mpsc::Receiver<Cmd>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let (shut_tx, shut_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Option<bool>>();
    let mut handles = Vec::new();
    let mut next_n = 0usize;
    let mut ever_ready = 0u64;
    let path = Arc::new(a.path.clone());
    let expect = Arc::new(Expect::default());
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Cmd::Expect(text) => {
                if let Ok(mut t) = expect.text.lock() {
                    *t = Some(text);
                }
                expect.got.store(0, Relaxed);
                expect.last_ns.store(0, Relaxed);
                println!("expecting");
            }
            Cmd::Count => {
                println!(
                    "count {} {}",
                    expect.got.load(Relaxed),
                    expect.last_ns.load(Relaxed)
                );
            }
            Cmd::Grow(target_n) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
                let fail_limit = 50 + target_n as u64 / 20;
                let (mut opened, mut failed, mut no_echo, mut in_flight) = (0u64, 0u64, 0u64, 0);
                loop {
                    while live.load(Relaxed) + in_flight < target_n
                        && in_flight < a.concurrency.max(1)
                        && failed <= fail_limit
                    {
                        let i = a.index + next_n * a.stride;
                        next_n += 1;
                        let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                        let room_path = path.replace("{room}", &(i % a.rooms).to_string());
                        handles.push(tokio::spawn(hold(
                            i,
                            Arc::clone(&target),
                            src,
                            room_path,
                            ready_tx.clone(),
                            Tallies {
                                live: Arc::clone(&live),
                                expect: Arc::clone(&expect),
                            },
                            shut_rx.clone(),
                        )));
                        in_flight += 1;
                    }
                    if in_flight == 0 {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                        Ok(Some(r)) => {
                            in_flight -= 1;
                            match r {
                                Some(echoed) => {
                                    opened += 1;
                                    ever_ready += 1;
                                    no_echo += u64::from(!echoed);
                                }
                                None => failed += 1,
                            }
                        }
                        _ => break,
                    }
                }
                let held = live.load(Relaxed) as u64;
                let rss = procfs::rss_kb("self").unwrap_or(0);
                println!(
                    "ready {held} {opened} {failed} {no_echo} {} {rss}",
                    ever_ready - held
                );
            }
            Cmd::Close => {
                let _ = shut_tx.send(true);
                let mut clean = 0u64;
                let mut closed = 0u64;
                for h in handles.drain(..) {
                    match tokio::time::timeout(Duration::from_secs(30), h).await {
                        Ok(Ok(Some(c))) => {
                            closed += 1;
                            clean += u64::from(c);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                println!("closed {clean} {closed}");
                return;
            }
        }
    }
}

/// One client: connect, send one message, wait for its broadcast, then idle (answering pings)
/// until shutdown. Reports `Some(echoed)` once connected or `None` on failure; returns
/// `Some(clean)` if it was still connected at shutdown.
async fn hold(
    i: usize,
    target: Arc<Target>,
    src: Option<IpAddr>,
    path: String,
    ready: mpsc::UnboundedSender<Option<bool>>,
    tallies: Tallies,
    mut shut: watch::Receiver<bool>,
) -> Option<bool> {
    let Tallies { live, expect } = tallies;
    let t = Duration::from_secs(10);
    let conn = tokio::time::timeout(t, ws::connect(target.addr, src, &target.host, &path)).await;
    let Ok(Ok(mut conn)) = conn else {
        let _ = ready.send(None);
        return None;
    };
    let msg = format!("hi {i}");
    if conn.send(OP_TEXT, msg.as_bytes()).await.is_err() {
        let _ = ready.send(None);
        return None;
    }
    let deadline = tokio::time::Instant::now() + t;
    let echoed = match conn.wait_for(deadline, |_, p| p == msg.as_bytes()).await {
        Ok(e) => e,
        Err(_) => {
            let _ = ready.send(None);
            return None;
        }
    };
    drop(msg);
    live.fetch_add(1, Relaxed);
    let _ = ready.send(Some(echoed));
    let mut seen = false;
    loop {
        tokio::select! {
            biased;
            _ = shut.changed() => break,
            r = conn.fill() => {
                let mut on_msg = |op: u8, p: &[u8]| {
                    if !seen && op == OP_TEXT && expect.matches(p) {
                        seen = true;
                        expect.hit();
                    }
                };
                let ok = matches!(r, Ok(n) if n > 0)
                    && conn.drain(&mut on_msg).is_ok()
                    && conn.flush().await.is_ok()
                    && conn.peer_closed().is_none();
                if !ok {
                    live.fetch_sub(1, Relaxed);
                    return None;
                }
            }
        }
    }
    let clean = conn.close(1000, Duration::from_secs(5)).await;
    live.fetch_sub(1, Relaxed);
    Some(clean)
}
