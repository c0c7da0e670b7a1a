//! Shared helpers: target URLs, source addresses, histograms, connecting many clients.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::ws::{self, WsConn};

/// Where the load goes: a loopback socket address, the `Host` header and the request path.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

/// Parses `ws://HOST[:PORT][/PATH]`. Only loopback hosts are accepted.
pub fn parse_ws_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let close = v6
            .find(']')
            .ok_or_else(|| format!("{url}: bad IPv6 host"))?;
        let port = v6[close + 1..].strip_prefix(':');
        (&v6[..close], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port: u16 = match port {
        Some(p) => p.parse().map_err(|_| format!("{url}: bad port"))?,
        None => 80,
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("{url}: host must be an IP literal or localhost"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{url}: refusing a non-loopback target (only 127.0.0.0/8 and ::1)"
        ));
    }
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// Parses source addresses: `A,B,...`, where an item may be an IPv4 range `A-B`
/// (`127.0.0.1-127.0.0.4`, or `127.0.0.1-4` for the last octet). Only loopback addresses.
pub fn parse_sources(items: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a.parse().map_err(|_| format!("bad source range {item}"))?;
            let b: Ipv4Addr = match b.parse::<u8>() {
                Ok(last) => {
                    let o = a.octets();
                    Ipv4Addr::new(o[0], o[1], o[2], last)
                }
                Err(_) => b.parse().map_err(|_| format!("bad source range {item}"))?,
            };
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 4096 {
                return Err(format!("bad source range {item}"));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(
                item.parse()
                    .map_err(|_| format!("bad source address {item}"))?,
            );
        }
    }
    if let Some(bad) = out.iter().find(|ip| !ip.is_loopback()) {
        return Err(format!("source {bad} is not a loopback address"));
    }
    Ok(out)
}

/// A latency histogram in microseconds, 1 µs to 100 s, 3 significant figures.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration in microseconds (at least 1).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Percentiles of a µs histogram as JSON.
pub fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({ "count": 0 });
    }
    json!({
        "count": h.len(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

/// A µs value for a table: `850µs`, `12.3ms`, `1.20s`.
pub fn fmt_us(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(us) if us < 1_000 => format!("{us}µs"),
        Some(us) if us < 1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// One-line latency summary from [`hist_json`] output.
pub fn lat_line(v: &Value) -> String {
    let g = |k: &str| v.get(k).and_then(Value::as_u64);
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        fmt_us(g("p50_us")),
        fmt_us(g("p90_us")),
        fmt_us(g("p99_us")),
        fmt_us(g("p999_us")),
        fmt_us(g("max_us"))
    )
}

/// Rounds to `d` decimals for JSON output.
pub fn round(v: f64, d: i32) -> f64 {
    let f = 10f64.powi(d);
    (v * f).round() / f
}

/// Fails when `needed` more sockets would not fit under this process's open-file limit.
pub fn check_fds(needed: usize) -> Result<(), String> {
    if let Some(limit) = crate::procfs::open_file_limit()
        && needed as u64 + 32 > limit
    {
        return Err(format!(
            "{needed} sockets do not fit under this process's open-file limit of {limit}"
        ));
    }
    Ok(())
}

/// Opens `n` connections, at most `concurrency` handshakes in flight, client `i` to `path(i)`
/// from `sources[i % len]` (kernel's choice when empty). Fails on the first error.
pub async fn connect_many(
    target: &Target,
    path: impl Fn(usize) -> String,
    n: usize,
    concurrency: usize,
    sources: &[IpAddr],
) -> Result<(Vec<WsConn>, Duration), String> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut next = 0;
    let target = Arc::new(target.clone());
    while conns.len() < n {
        while next < n && set.len() < concurrency.max(1) {
            let t = Arc::clone(&target);
            let p = path(next);
            let src = (!sources.is_empty()).then(|| sources[next % sources.len()]);
            set.spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    ws::connect(t.addr, src, &t.host, &p),
                )
                .await
                .map_err(|_| "connect timed out after 10 s".to_string())?
                .map_err(|e| e.to_string())
            });
            next += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(c))) => conns.push(c),
            Some(Ok(Err(e))) => return Err(format!("connection {} failed: {e}", conns.len())),
            Some(Err(e)) => return Err(format!("connect task failed: {e}")),
            None => break,
        }
    }
    Ok((conns, started.elapsed()))
}

/// A tokio runtime: current-thread for `threads <= 1`, else multi-thread.
pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all().build().expect("tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_ws_url("ws://127.0.0.1:9000/ws/echo/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9000");
        assert_eq!(t.path, "/ws/echo/");
        assert_eq!(parse_ws_url("ws://localhost").unwrap().path, "/");
        assert_eq!(parse_ws_url("ws://[::1]:80/x").unwrap().addr.port(), 80);
        assert!(parse_ws_url("ws://10.0.0.1:80/").is_err());
        assert!(parse_ws_url("ws://example.com/").is_err());
        assert!(parse_ws_url("wss://127.0.0.1/").is_err());
    }

    #[test]
    fn sources() {
        let s = parse_sources(&["127.0.0.1-4".into()]).unwrap();
        assert_eq!(s.len(), 4);
        let s = parse_sources(&["127.0.0.1".into(), "127.0.0.2-127.0.0.3".into()]).unwrap();
        assert_eq!(s.len(), 3);
        assert!(parse_sources(&["192.168.1.1".into()]).is_err());
        assert!(parse_sources(&[]).unwrap().is_empty());
    }
}
