//! Reading a process's memory and CPU time from `/proc`.

use std::fs;
use std::sync::OnceLock;

/// `VmRSS` of a process in kB (`pid` is a number or `"self"`).
pub fn rss_kb(pid: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, in seconds (`pid` is a number or `"self"`).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck() as f64)
}

/// Clock ticks per second (`AT_CLKTCK` from the auxiliary vector; 100 if unreadable).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        const AT_CLKTCK: u64 = 17;
        let Ok(auxv) = fs::read("/proc/self/auxv") else {
            return 100;
        };
        for pair in auxv.chunks_exact(16) {
            let mut k = [0u8; 8];
            let mut v = [0u8; 8];
            k.copy_from_slice(&pair[..8]);
            v.copy_from_slice(&pair[8..]);
            if u64::from_ne_bytes(k) == AT_CLKTCK {
                let v = u64::from_ne_bytes(v);
                return if v > 0 { v } else { 100 };
            }
        }
        100
    })
}

/// The soft open-file limit of this process.
pub fn open_file_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A CPU-time reading of the server (when a pid is known) and of this process.
#[derive(Clone, Copy)]
pub struct CpuSnap {
    pub server: Option<f64>,
    pub client: f64,
}

impl CpuSnap {
    pub fn take(server_pid: Option<u32>) -> Self {
        CpuSnap {
            server: server_pid.and_then(|p| cpu_secs(&p.to_string())),
            client: cpu_secs("self").unwrap_or(0.0),
        }
    }
}
