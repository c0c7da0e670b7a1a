//! `echo`: closed-loop round trips against `/ws/echo/`.

use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::procfs::CpuSnap;
use crate::util::{self, round};
use crate::ws::{OP_BINARY, OP_TEXT, WsConn};

#[derive(Args, Debug)]
pub struct EchoArgs {
    /// Echo endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/echo/")]
    url: String,
    /// Concurrent connections, each with one message in flight.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of traffic before measuring (not counted).
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Send binary messages (random bytes) instead of text.
    #[arg(long)]
    binary: bool,
    /// Server process id, for its CPU time per message.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Client runtime threads (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Loopback source addresses to bind clients to, e.g. 127.0.0.1-4 (default: kernel's choice).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<String>,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

impl EchoArgs {
    /// Client runtime threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

struct LoopResult {
    hist: Histogram<u64>,
    round_trips: u64,
    mismatches: u64,
    error: Option<String>,
}

async fn echo_loop(
    mut conn: WsConn,
    payload: Vec<u8>,
    op: u8,
    measure_from: Instant,
    end: Instant,
) -> LoopResult {
    let mut r = LoopResult {
        hist: util::new_hist(),
        round_trips: 0,
        mismatches: 0,
        error: None,
    };
    while Instant::now() < end {
        let sent = Instant::now();
        if let Err(e) = conn.send(op, &payload).await {
            r.error = Some(format!("send: {e}"));
            break;
        }
        let mut same = true;
        let got = conn
            .wait_for(end + Duration::from_secs(5), |rop, p| {
                same = rop == op && p == payload.as_slice();
                true
            })
            .await;
        let done = Instant::now();
        match got {
            Ok(true) => {}
            Ok(false) => {
                r.error = Some("no echo within 5 s after the end".into());
                break;
            }
            Err(e) => {
                r.error = Some(format!("receive: {e}"));
                break;
            }
        }
        if !same {
            r.mismatches += 1;
        }
        if sent >= measure_from && done <= end {
            util::record(&mut r.hist, done - sent);
            r.round_trips += 1;
        }
    }
    conn.close(1000, Duration::from_secs(2)).await;
    r
}

pub async fn run(a: EchoArgs) -> Result<Value, String> {
    let target = util::parse_ws_url(&a.url)?;
    let sources = util::parse_sources(&a.sources)?;
    util::check_fds(a.connections)?;
    if a.connections == 0 || a.duration == 0 {
        return Err("--connections and --duration must be positive".into());
    }
    let (conns, connect_time) = util::connect_many(
        &target,
        |_| target.path.clone(),
        a.connections,
        a.concurrency,
        &sources,
    )
    .await?;

    let op = if a.binary { OP_BINARY } else { OP_TEXT };
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(a.warmup);
    let end = measure_from + Duration::from_secs(a.duration);
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, conn) in conns.into_iter().enumerate() {
        let payload = if a.binary {
            let mut p = vec![0u8; a.size];
            fastrand::fill(&mut p);
            p
        } else {
            let mut p = format!("{i} ").into_bytes();
            p.resize(a.size.max(p.len()), b'.');
            p
        };
        tasks.push(tokio::spawn(echo_loop(
            conn,
            payload,
            op,
            measure_from,
            end,
        )));
    }

    tokio::time::sleep_until(measure_from).await;
    let cpu0 = CpuSnap::take(a.server_pid);
    tokio::time::sleep_until(end).await;
    let cpu1 = CpuSnap::take(a.server_pid);
    let secs = a.duration as f64;

    let mut hist = util::new_hist();
    let (mut rts, mut mism, mut errors) = (0u64, 0u64, Vec::new());
    for t in tasks {
        match t.await {
            Ok(r) => {
                hist.add(&r.hist).map_err(|e| e.to_string())?;
                rts += r.round_trips;
                mism += r.mismatches;
                errors.extend(r.error);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let server_cpu = match (cpu0.server, cpu1.server) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu = cpu1.client - cpu0.client;
    let per_rt = |cpu: f64| (rts > 0).then(|| round(cpu * 1e6 / rts as f64, 2));
    let error_count = errors.len();
    errors.truncate(5);
    Ok(json!({
        "scenario": "echo",
        "url": a.url,
        "connections": a.connections,
        "size": a.size,
        "binary": a.binary,
        "duration_s": a.duration,
        "connect_s": round(connect_time.as_secs_f64(), 3),
        "round_trips": rts,
        "round_trips_per_s": round(rts as f64 / secs, 1),
        "latency": util::hist_json(&hist),
        "mismatches": mism,
        "error_count": error_count,
        "errors": errors,
        "server_cpu_s": server_cpu.map(|c| round(c, 3)),
        "server_cpu_pct": server_cpu.map(|c| round(c * 100.0 / secs, 1)),
        "server_cpu_us_per_round_trip": server_cpu.and_then(per_rt),
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_pct": round(client_cpu * 100.0 / secs, 1),
        "client_cpu_us_per_round_trip": per_rt(client_cpu),
        "client_threads": a.threads.max(1),
    }))
}

pub fn print(v: &Value) {
    let s = |k: &str| v[k].to_string();
    let opt = |k: &str, unit: &str| {
        if v[k].is_null() {
            "-".to_string()
        } else {
            format!("{}{unit}", v[k])
        }
    };
    println!(
        "echo  {}  connections {}  size {} B  {} s measured",
        v["url"].as_str().unwrap_or_default(),
        s("connections"),
        s("size"),
        s("duration_s")
    );
    println!("  round trips        {}", s("round_trips"));
    println!("  round trips/s      {}", s("round_trips_per_s"));
    println!("  latency            {}", util::lat_line(&v["latency"]));
    println!(
        "  server CPU         {} s ({} of one core), {} per round trip",
        opt("server_cpu_s", ""),
        opt("server_cpu_pct", "%"),
        opt("server_cpu_us_per_round_trip", " µs")
    );
    println!(
        "  client CPU         {} s ({} of one core, {} thread(s)), {} per round trip",
        s("client_cpu_s"),
        opt("client_cpu_pct", "%"),
        s("client_threads"),
        opt("client_cpu_us_per_round_trip", " µs")
    );
    println!("  mismatched echoes  {}", s("mismatches"));
    if let Some(errs) = v["errors"].as_array().filter(|e| !e.is_empty()) {
        println!("  errors             {}", s("error_count"));
        for e in errs {
            println!("    {}", e.as_str().unwrap_or_default());
        }
    }
}
