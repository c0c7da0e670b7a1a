//! `fanout`: one sender, many receivers in one chat room; delivery, order, loss and latency.
//!
//! Every message is `"{step} {seq} {nanos}"` padded with dots to `--size`, where `nanos` is the
//! send time on a clock shared by sender and receivers (one process). Each receiver checks the
//! sequence numbers arrive in order without gaps; loss is counted per receiver as messages sent
//! minus messages it got.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::procfs::CpuSnap;
use crate::util::{self, fmt_us, round};
use crate::ws::{OP_TEXT, WsConn};

/// Hard cap on ramp steps, whatever `--max-steps` says.
const STEP_CAP: usize = 10;
/// Hard cap on messages in one step.
const MESSAGES_CAP: usize = 5_000_000;

#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// Chat room endpoint all clients join (the sender's, and the receivers' unless
    /// --receiver-urls is given).
    #[arg(long, default_value = "ws://127.0.0.1:8000/ws/chat/bench/")]
    url: String,
    /// Receivers' endpoints, split evenly across them (e.g. one per server process sharing a
    /// Redis layer, the sender on a third process given by --url). Default: --url.
    #[arg(long, value_delimiter = ',')]
    receiver_urls: Vec<String>,
    /// Receiving connections.
    #[arg(long, default_value_t = 1000)]
    receivers: usize,
    /// Messages per second from the sender (the first step's rate with --ramp).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds of sending (per step with --ramp).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Message size in bytes (at least the header text).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Double the rate each step until loss or p99 above --max-p99-ms; report the last clean rate.
    #[arg(long)]
    ramp: bool,
    /// Most steps with --ramp (capped at 10).
    #[arg(long, default_value_t = 8)]
    max_steps: usize,
    /// p99 latency above this (ms) ends the ramp.
    #[arg(long, default_value_t = 1000)]
    max_p99_ms: u64,
    /// Server process id, for its CPU time per delivery.
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

impl FanoutArgs {
    /// Client runtime threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

struct StepStats {
    delivered: AtomicU64,
    gaps: AtomicU64,
    out_of_order: AtomicU64,
    last_ns: AtomicU64,
    recv_by: Vec<AtomicU32>,
    seq_count: Vec<AtomicU32>,
    seq_max_ns: Vec<AtomicU64>,
    hist: Mutex<Histogram<u64>>,
}

impl StepStats {
    fn new(messages: usize, receivers: usize) -> Self {
        StepStats {
            delivered: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            recv_by: (0..receivers).map(|_| AtomicU32::new(0)).collect(),
            seq_count: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            seq_max_ns: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            hist: Mutex::new(util::new_hist()),
        }
    }
}

struct Shared {
    base: std::time::Instant,
    steps: Vec<OnceLock<StepStats>>,
    synced: AtomicUsize,
    dead: AtomicUsize,
    dead_flags: Vec<AtomicBool>,
    last_close_code: AtomicU32,
    other: AtomicU64,
}

#[derive(Default)]
struct RecvState {
    synced: bool,
    last: Option<(usize, u64)>,
    /// Deliveries of the current read not yet added to their step's totals.
    batch: Batch,
}

/// What one receiver read, summed before it is added to the shared totals: one lock of the
/// histogram and one add per counter per read, not per message (the generator runs millions of
/// deliveries a second on one core).
#[derive(Default)]
struct Batch {
    step: usize,
    /// Latencies in microseconds, in arrival order.
    lat_us: Vec<u64>,
}

fn parse_msg(p: &[u8]) -> Option<(usize, u64, u64)> {
    // Read byte by byte: at millions of deliveries a second this runs on the generator's one
    // core, where the `str` version (UTF-8 check, split, trim, three parses) took a fifth of it.
    let (step, rest) = parse_u64(p, Some(b' '))?;
    let (seq, rest) = parse_u64(rest, Some(b' '))?;
    let (ns, rest) = parse_u64(rest, None)?;
    if !rest.iter().all(|&b| b == b'.') {
        return None;
    }
    Some((usize::try_from(step).ok()?, seq, ns))
}

/// A decimal number at the start of `p` (at least one digit, no overflow), then `sep` if given;
/// returns it and what follows.
fn parse_u64(p: &[u8], sep: Option<u8>) -> Option<(u64, &[u8])> {
    let digits = p.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    if digits < 20 {
        // Cannot overflow: no checks in the loop (a checked multiply per digit was most of the
        // parse).
        for &b in &p[..digits] {
            n = n * 10 + u64::from(b - b'0');
        }
    } else {
        for &b in &p[..digits] {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
    }
    let rest = &p[digits..];
    match sep {
        Some(sep) => match rest.split_first() {
            Some((&b, rest)) if b == sep => Some((n, rest)),
            _ => None,
        },
        None => Some((n, rest)),
    }
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn on_message(&self, i: usize, p: &[u8], now: u64, st: &mut RecvState) {
        if p.starts_with(b"sync") {
            if !st.synced {
                st.synced = true;
                self.synced.fetch_add(1, Relaxed);
            }
            return;
        }
        let Some((step, seq, sent)) = parse_msg(p) else {
            self.other.fetch_add(1, Relaxed);
            return;
        };
        let Some(s) = self.steps.get(step).and_then(OnceLock::get) else {
            self.other.fetch_add(1, Relaxed);
            return;
        };
        let Some(count) = s.seq_count.get(seq as usize) else {
            self.other.fetch_add(1, Relaxed);
            return;
        };
        match st.last {
            Some((ls, lq)) if ls == step => {
                if seq <= lq {
                    s.out_of_order.fetch_add(1, Relaxed);
                } else if seq > lq + 1 {
                    s.gaps.fetch_add(1, Relaxed);
                }
            }
            _ if seq != 0 => {
                s.gaps.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        if st.last.is_none_or(|(ls, lq)| ls != step || seq > lq) {
            st.last = Some((step, seq));
        }
        let lat = now.saturating_sub(sent);
        count.fetch_add(1, Relaxed);
        s.seq_max_ns[seq as usize].fetch_max(lat, Relaxed);
        if st.batch.step != step {
            self.count_read(i, now, st);
            st.batch.step = step;
        }
        st.batch.lat_us.push((lat / 1000).max(1));
    }

    /// Adds receiver `i`'s batch, read at `now`, to its step's totals.
    fn count_read(&self, i: usize, now: u64, st: &mut RecvState) {
        let batch = &mut st.batch;
        if batch.lat_us.is_empty() {
            return;
        }
        if let Some(s) = self.steps.get(batch.step).and_then(OnceLock::get) {
            let n = batch.lat_us.len();
            s.delivered.fetch_add(n as u64, Relaxed);
            s.recv_by[i].fetch_add(u32::try_from(n).unwrap_or(u32::MAX), Relaxed);
            s.last_ns.fetch_max(now, Relaxed);
            if let Ok(mut h) = s.hist.lock() {
                for &lat in &batch.lat_us {
                    h.saturating_record(lat);
                }
            }
        }
        batch.lat_us.clear();
    }

    fn mark_dead(&self, i: usize, code: Option<u16>) {
        if !self.dead_flags[i].swap(true, Relaxed) {
            self.dead.fetch_add(1, Relaxed);
        }
        if let Some(c) = code {
            self.last_close_code.store(u32::from(c), Relaxed);
        }
    }
}

async fn receiver(
    i: usize,
    mut conn: WsConn,
    sh: Arc<Shared>,
    mut shut: watch::Receiver<bool>,
) -> bool {
    let mut st = RecvState::default();
    loop {
        tokio::select! {
            biased;
            _ = shut.changed() => break,
            r = conn.fill() => {
                if !matches!(r, Ok(n) if n > 0) {
                    sh.mark_dead(i, None);
                    return false;
                }
                let now = sh.now_ns();
                let ok = conn.drain(|_, p| sh.on_message(i, p, now, &mut st)).is_ok();
                sh.count_read(i, now, &mut st);
                if !ok || conn.flush().await.is_err() || conn.peer_closed().is_some() {
                    sh.mark_dead(i, conn.peer_closed());
                    return false;
                }
            }
        }
    }
    conn.close(1000, Duration::from_secs(3)).await
}

/// Reads and discards what the sender receives (its own broadcasts) until `until`.
async fn pump(conn: &mut WsConn, until: Instant) -> Result<(), String> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return Ok(()),
            r = conn.fill() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return Err("sender connection lost".into());
                }
                discard(conn).await?;
            }
        }
    }
}

async fn discard(conn: &mut WsConn) -> Result<(), String> {
    conn.drain(|_, _| {}).map_err(|e| e.to_string())?;
    conn.flush().await.map_err(|e| e.to_string())?;
    match conn.peer_closed() {
        Some(code) => Err(format!("server closed the sender with {code}")),
        None => Ok(()),
    }
}

async fn run_step(
    sender: &mut WsConn,
    sh: &Shared,
    step: usize,
    rate: f64,
    a: &FanoutArgs,
) -> Result<Value, String> {
    let total = ((rate * a.duration as f64).round() as usize).clamp(1, MESSAGES_CAP);
    let stats = sh.steps[step].get_or_init(|| StepStats::new(total, a.receivers));
    let dead0 = sh.dead.load(Relaxed);
    let alive = a.receivers - dead0;
    let live_at_start: Vec<bool> = sh.dead_flags.iter().map(|f| !f.load(Relaxed)).collect();
    let cpu0 = CpuSnap::take(a.server_pid);
    let t0 = Instant::now();
    let t0_ns = sh.now_ns();
    let period = Duration::from_secs_f64((1.0 / rate).max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0usize;
    let mut msg = String::with_capacity(a.size.max(48));
    while sent < total {
        tokio::select! {
            _ = tick.tick() => {
                let due = ((t0.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
                while sent < due {
                    msg.clear();
                    let _ = write!(msg, "{step} {sent} {}", sh.now_ns());
                    while msg.len() < a.size {
                        msg.push('.');
                    }
                    sender.queue(OP_TEXT, msg.as_bytes());
                    sent += 1;
                }
                sender.flush().await.map_err(|e| format!("sender: {e}"))?;
            }
            r = sender.fill() => {
                if !matches!(r, Ok(n) if n > 0) {
                    return Err("sender connection lost".into());
                }
                discard(sender).await?;
            }
        }
    }
    let send_s = t0.elapsed().as_secs_f64();

    // Let the tail arrive: until every live receiver has everything, progress stops for 3 s,
    // or 30 s pass.
    let expected = total as u64 * alive as u64;
    let drain_end = Instant::now() + Duration::from_secs(30);
    let mut seen = stats.delivered.load(Relaxed);
    let mut last_change = Instant::now();
    while stats.delivered.load(Relaxed) < expected
        && Instant::now() < drain_end
        && last_change.elapsed() < Duration::from_secs(3)
    {
        pump(sender, Instant::now() + Duration::from_millis(50)).await?;
        let d = stats.delivered.load(Relaxed);
        if d != seen {
            seen = d;
            last_change = Instant::now();
        }
    }
    let cpu1 = CpuSnap::take(a.server_pid);

    let delivered = stats.delivered.load(Relaxed);
    let lost = expected.saturating_sub(delivered);
    let dead_now = sh.dead.load(Relaxed);
    let mut with_loss = 0usize;
    let mut max_loss = 0u64;
    for (r, _) in stats
        .recv_by
        .iter()
        .zip(&live_at_start)
        .filter(|(_, l)| **l)
    {
        let missing = (total as u64).saturating_sub(u64::from(r.load(Relaxed)));
        if missing > 0 {
            with_loss += 1;
            max_loss = max_loss.max(missing);
        }
    }
    let mut all_hist = util::new_hist();
    let mut complete = 0u64;
    for (c, m) in stats.seq_count.iter().zip(&stats.seq_max_ns) {
        if c.load(Relaxed) as usize >= alive {
            complete += 1;
            all_hist.saturating_record((m.load(Relaxed) / 1000).max(1));
        }
    }
    let lat = stats
        .hist
        .lock()
        .map(|h| util::hist_json(&h))
        .unwrap_or(Value::Null);
    let span = match stats.last_ns.load(Relaxed) {
        0 => send_s,
        l => (l.saturating_sub(t0_ns) as f64 / 1e9).max(send_s),
    };
    let server_cpu = match (cpu0.server, cpu1.server) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let client_cpu = cpu1.client - cpu0.client;
    let p99 = lat["p99_us"].as_u64().unwrap_or(u64::MAX);
    let out_of_order = stats.out_of_order.load(Relaxed);
    let clean = lost == 0
        && out_of_order == 0
        && dead_now == dead0
        && delivered > 0
        && p99 <= a.max_p99_ms * 1000;
    Ok(json!({
        "step": step,
        "rate": rate,
        "sent": total,
        "send_s": round(send_s, 3),
        "span_s": round(span, 3),
        "receivers_alive": alive,
        "receivers_lost_during_step": dead_now - dead0,
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "gaps": stats.gaps.load(Relaxed),
        "out_of_order": out_of_order,
        "receivers_with_loss": with_loss,
        "max_loss_per_receiver": max_loss,
        "deliveries_per_s": round(delivered as f64 / span, 1),
        "latency": lat,
        "time_to_all": util::hist_json(&all_hist),
        "messages_reaching_all": complete,
        "server_cpu_s": server_cpu.map(|c| round(c, 3)),
        "server_cpu_pct": server_cpu.map(|c| round(c * 100.0 / span, 1)),
        "server_cpu_us_per_delivery": server_cpu
            .filter(|_| delivered > 0)
            .map(|c| round(c * 1e6 / delivered as f64, 3)),
        "client_cpu_pct": round(client_cpu * 100.0 / span, 1),
        "client_cpu_us_per_delivery": (delivered > 0)
            .then(|| round(client_cpu * 1e6 / delivered as f64, 3)),
        "clean": clean,
    }))
}

pub async fn run(a: FanoutArgs) -> Result<Value, String> {
    let target = util::parse_ws_url(&a.url)?;
    let sources = util::parse_sources(&a.sources)?;
    if a.receivers == 0 || a.duration == 0 || !a.rate.is_finite() || a.rate <= 0.0 {
        return Err("--receivers, --duration and --rate must be positive".into());
    }
    util::check_fds(a.receivers + 1)?;
    let steps = if a.ramp {
        a.max_steps.clamp(1, STEP_CAP)
    } else {
        1
    };

    let receiver_targets = if a.receiver_urls.is_empty() {
        vec![target.clone()]
    } else {
        a.receiver_urls
            .iter()
            .map(|u| util::parse_ws_url(u))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut conns = Vec::with_capacity(a.receivers);
    let mut connect_time = Duration::ZERO;
    let k = receiver_targets.len();
    for (j, t) in receiver_targets.iter().enumerate() {
        let n = a.receivers / k + usize::from(j < a.receivers % k);
        let (mut part, took) =
            util::connect_many(t, |_| t.path.clone(), n, a.concurrency, &sources).await?;
        conns.append(&mut part);
        connect_time += took;
    }
    let (mut senders, _) =
        util::connect_many(&target, |_| target.path.clone(), 1, 1, &sources).await?;
    let mut sender = senders.pop().ok_or("no sender connection")?;

    let sh = Arc::new(Shared {
        base: std::time::Instant::now(),
        steps: (0..steps).map(|_| OnceLock::new()).collect(),
        synced: AtomicUsize::new(0),
        dead: AtomicUsize::new(0),
        dead_flags: (0..a.receivers).map(|_| AtomicBool::new(false)).collect(),
        last_close_code: AtomicU32::new(0),
        other: AtomicU64::new(0),
    });
    let (shut_tx, shut_rx) = watch::channel(false);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(receiver(i, c, Arc::clone(&sh), shut_rx.clone())))
        .collect();

    // Barrier: every receiver has seen a message from the sender.
    let sync_end = Instant::now() + Duration::from_secs(20);
    let mut k = 0u32;
    while sh.synced.load(Relaxed) + sh.dead.load(Relaxed) < a.receivers && Instant::now() < sync_end
    {
        sender
            .send(OP_TEXT, format!("sync {k}").as_bytes())
            .await
            .map_err(|e| format!("sender: {e}"))?;
        k += 1;
        pump(&mut sender, Instant::now() + Duration::from_millis(200)).await?;
    }
    let synced = sh.synced.load(Relaxed);
    let mut results = Vec::new();
    let mut error = None;
    if synced < a.receivers {
        error = Some(format!(
            "only {synced} of {} receivers got the sync message",
            a.receivers
        ));
    } else {
        pump(&mut sender, Instant::now() + Duration::from_millis(300)).await?;
        let mut rate = a.rate;
        for step in 0..steps {
            let r = run_step(&mut sender, &sh, step, rate, &a).await;
            match r {
                Ok(v) => {
                    let clean = v["clean"].as_bool().unwrap_or(false);
                    results.push(v);
                    if !clean {
                        break;
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            rate *= 2.0;
            if step + 1 < steps {
                pump(&mut sender, Instant::now() + Duration::from_secs(1)).await?;
            }
        }
    }

    let _ = shut_tx.send(true);
    let mut clean_closes = 0;
    for t in tasks {
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(10), t).await {
            clean_closes += 1;
        }
    }
    sender.close(1000, Duration::from_secs(3)).await;

    let last_clean = results
        .iter()
        .filter(|v| v["clean"].as_bool() == Some(true))
        .filter_map(|v| v["rate"].as_f64())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let code = sh.last_close_code.load(Relaxed);
    Ok(json!({
        "scenario": "fanout",
        "url": a.url,
        "receiver_urls": a.receiver_urls,
        "receivers": a.receivers,
        "size": a.size,
        "duration_s": a.duration,
        "ramp": a.ramp,
        "connect_s": round(connect_time.as_secs_f64(), 3),
        "connect_rate_per_s": round(a.receivers as f64 / connect_time.as_secs_f64(), 1),
        "steps": results,
        "last_clean_rate": last_clean,
        "receivers_lost": sh.dead.load(Relaxed),
        "last_close_code": (code != 0).then_some(code),
        "unparsed_messages": sh.other.load(Relaxed),
        "clean_closes": clean_closes,
        "client_threads": a.threads.max(1),
        "error": error,
    }))
}

pub fn print(v: &Value) {
    println!(
        "fanout  {}  receivers {}  size {} B  {} s per step  (connected in {} s, {}/s)",
        v["url"].as_str().unwrap_or_default(),
        v["receivers"],
        v["size"],
        v["duration_s"],
        v["connect_s"],
        v["connect_rate_per_s"]
    );
    let g = |s: &Value, k: &str| s[k].as_u64();
    println!(
        "  {:>8} {:>8} {:>10} {:>10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6}",
        "rate/s",
        "sent",
        "delivered",
        "deliv/s",
        "lost",
        "ooo",
        "lat p50",
        "lat p99",
        "all p50",
        "all p99",
        "srv µs/d",
        "srv%",
        "cli%"
    );
    let empty = Vec::new();
    for s in v["steps"].as_array().unwrap_or(&empty) {
        let num = |k: &str| s[k].as_f64().map_or("-".to_string(), |x| format!("{x}"));
        println!(
            "  {:>8} {:>8} {:>10} {:>10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>6}{}",
            num("rate"),
            num("sent"),
            num("delivered"),
            num("deliveries_per_s"),
            num("lost"),
            num("out_of_order"),
            fmt_us(g(&s["latency"], "p50_us")),
            fmt_us(g(&s["latency"], "p99_us")),
            fmt_us(g(&s["time_to_all"], "p50_us")),
            fmt_us(g(&s["time_to_all"], "p99_us")),
            num("server_cpu_us_per_delivery"),
            num("server_cpu_pct"),
            num("client_cpu_pct"),
            if s["clean"].as_bool() == Some(true) {
                ""
            } else {
                "  <- not clean"
            }
        );
    }
    if let Some(s) = v["steps"].as_array().and_then(|s| s.last()) {
        println!(
            "  {} rate {} msg/s:",
            if v["ramp"].as_bool() == Some(true) {
                "last step,"
            } else {
                "at"
            },
            s["rate"]
        );
        println!(
            "  latency (send -> receive)   {}",
            util::lat_line(&s["latency"])
        );
        println!(
            "  time to reach all           {}  ({} of {} messages reached every receiver)",
            util::lat_line(&s["time_to_all"]),
            s["messages_reaching_all"],
            s["sent"]
        );
        println!(
            "  loss                        {} lost, {} gap(s), {} out of order, {} receiver(s) with loss (max {} each)",
            s["lost"],
            s["gaps"],
            s["out_of_order"],
            s["receivers_with_loss"],
            s["max_loss_per_receiver"]
        );
    }
    if v["ramp"].as_bool() == Some(true) {
        println!(
            "  last clean rate: {}",
            v["last_clean_rate"]
                .as_f64()
                .map_or("none".to_string(), |r| format!("{r} msg/s"))
        );
    }
    println!(
        "  receivers lost {}{}, clean closes {}/{}, unparsed messages {}",
        v["receivers_lost"],
        v["last_close_code"]
            .as_u64()
            .map_or(String::new(), |c| format!(" (last close code {c})")),
        v["clean_closes"],
        v["receivers"],
        v["unparsed_messages"]
    );
    if let Some(e) = v["error"].as_str() {
        println!("  error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_format() {
        assert_eq!(parse_msg(b"2 17 123456......"), Some((2, 17, 123456)));
        assert_eq!(parse_msg(b"0 0 5"), Some((0, 0, 5)));
        assert_eq!(parse_msg(b"sync 3"), None);
        assert_eq!(parse_msg(b"1 2 3x"), None);
        assert_eq!(parse_msg(b"1  2 3"), None);
        assert_eq!(parse_msg(b"1 2"), None);
        assert_eq!(parse_msg(b"1 2 "), None);
        assert_eq!(parse_msg(b"1 99999999999999999999 3"), None);
        assert_eq!(
            parse_msg(b"1 9999999999999999999 3"),
            Some((1, 9999999999999999999, 3))
        );
        assert_eq!(
            parse_msg(format!("3 4 {}", u64::MAX).as_bytes()),
            Some((3, 4, u64::MAX))
        );
    }

    /// One receiver's shared state with `steps` steps of 10 messages each.
    fn shared(steps: usize) -> Shared {
        let sh = Shared {
            base: std::time::Instant::now(),
            steps: (0..steps).map(|_| OnceLock::new()).collect(),
            synced: AtomicUsize::new(0),
            dead: AtomicUsize::new(0),
            dead_flags: vec![AtomicBool::new(false)],
            last_close_code: AtomicU32::new(0),
            other: AtomicU64::new(0),
        };
        for step in &sh.steps {
            let _ = step.set(StepStats::new(10, 1));
        }
        sh
    }

    #[test]
    fn order_and_gaps() {
        let sh = shared(1);
        let mut st = RecvState::default();
        for seq in [0u64, 1, 3, 2, 4] {
            sh.on_message(0, format!("0 {seq} 0").as_bytes(), 1000, &mut st);
        }
        let s = sh.steps[0].get().unwrap();
        assert_eq!(
            s.delivered.load(Relaxed),
            0,
            "counted once the read is done"
        );
        sh.count_read(0, 1000, &mut st);
        assert_eq!(s.delivered.load(Relaxed), 5);
        assert_eq!(s.hist.lock().unwrap().len(), 5);
        assert_eq!(s.gaps.load(Relaxed), 1);
        assert_eq!(s.out_of_order.load(Relaxed), 1);
        assert_eq!(s.recv_by[0].load(Relaxed), 5);
    }

    #[test]
    fn a_read_spanning_two_steps_counts_each_in_its_own() {
        let sh = shared(2);
        let mut st = RecvState::default();
        for m in ["0 8 0", "0 9 0", "1 0 0", "1 1 0", "1 2 0"] {
            sh.on_message(0, m.as_bytes(), 5_000_000, &mut st);
        }
        sh.count_read(0, 5_000_000, &mut st);
        let (a, b) = (sh.steps[0].get().unwrap(), sh.steps[1].get().unwrap());
        assert_eq!(a.delivered.load(Relaxed), 2);
        assert_eq!(b.delivered.load(Relaxed), 3);
        assert_eq!(a.hist.lock().unwrap().len(), 2);
        assert_eq!(b.hist.lock().unwrap().len(), 3);
        let h = b.hist.lock().unwrap();
        assert!(
            h.equivalent(h.max(), 5000),
            "5 ms recorded as {} µs",
            h.max()
        );
        assert_eq!(b.last_ns.load(Relaxed), 5_000_000);
    }
}
