//! `canal serve --workers N`: a supervisor process and N worker processes on one port.
//!
//! The supervisor holds no socket that clients reach. It re-executes this binary with the same
//! arguments plus hidden `--worker-index`, `--worker-restarts` and `--worker-bind` flags; each
//! worker binds the same address with `SO_REUSEPORT` and the kernel spreads new connections
//! over them. A worker's standard input is one end of a Unix socket pair whose other end the
//! supervisor keeps:
//!
//! - the worker writes `ready ADDR` on it once it listens, so the supervisor prints the
//!   startup line only when every worker serves;
//! - the worker reads it to its end: when the supervisor is gone (even killed with SIGKILL),
//!   the worker sees EOF and shuts down instead of serving on as an orphan.
//!
//! A worker that exits while the supervisor is not stopping is logged and restarted after a
//! backoff (0.25 s doubling up to 10 s), keeping its slot number. The supervisor gives up,
//! stops the others and exits 1 when a worker's first start never gets ready (port in use, a
//! Redis URL it refuses …) or when one slot fails [`MAX_RAPID_FAILURES`] times in a row within
//! [`RAPID`] of starting. On SIGINT or SIGTERM it sends SIGTERM to every worker, waits up to
//! the shutdown grace plus [`STOP_MARGIN`], kills what is left, and exits 0 only if every
//! worker stopped cleanly.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A worker that exits this soon after it got ready (or before) counts as a rapid failure.
const RAPID: Duration = Duration::from_secs(10);
/// Rapid failures in a row of one slot after which the supervisor gives up.
const MAX_RAPID_FAILURES: u32 = 5;
/// The first restart delay; it doubles with each rapid failure in a row.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long every worker has to get ready at startup (they bind, then say so).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time on top of the shutdown grace a worker gets to exit before it is killed: the grace
/// bounds its connections, this covers the rest (the layer, logs).
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// What the supervisor needs to run its workers.
pub(crate) struct Plan {
    /// How many workers.
    pub(crate) workers: usize,
    /// The address every worker binds (resolved once, so port 0 means one port for all).
    pub(crate) bind: SocketAddr,
    /// This process's arguments after the program name; each worker gets them again.
    pub(crate) args: Vec<OsString>,
    /// The shutdown grace each worker has for its connections.
    pub(crate) grace: Duration,
    /// Environment variables to set in every worker (a generated dashboard token).
    pub(crate) env: Vec<(String, String)>,
    /// Lines to print once every worker is ready.
    pub(crate) startup: Vec<String>,
}

/// Why the supervisor stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SupervisorError {
    /// The binary could not be found or started.
    #[error("cannot start worker {index}: {source}")]
    Spawn {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    /// A worker's first process exited before it listened.
    #[error("worker {index} exited before it was ready ({status}); its own error is printed above")]
    NotReady { index: usize, status: String },
    /// One slot kept failing right after starting.
    #[error(
        "worker {index} failed {failures} times in a row within {}s of starting (last: {status}); \
         giving up",
        RAPID.as_secs()
    )]
    CrashLoop {
        index: usize,
        failures: u32,
        status: String,
    },
    /// Not every worker got ready in time.
    #[error("only {ready} of {workers} workers were ready after {}s", STARTUP_TIMEOUT.as_secs())]
    StartTimeout { ready: usize, workers: usize },
    /// Some workers did not stop in time, or stopped with an error.
    #[error("{0} worker(s) did not stop cleanly")]
    Unclean(usize),
}

/// What a worker slot reports to the supervisor.
enum Event {
    /// The worker listens.
    Ready { index: usize, pid: u32 },
    /// The slot gave up; the supervisor stops everything.
    Fatal(SupervisorError),
}

/// How a slot ended at shutdown.
enum SlotEnd {
    /// Its worker exited with status 0 (or it had none running).
    Clean,
    /// Its worker exited with an error or had to be killed.
    Unclean,
}

struct Ctx {
    plan: Plan,
    exe: std::path::PathBuf,
    stop: CancellationToken,
    restarts: AtomicU64,
}

/// Runs the workers until SIGINT or SIGTERM (or a failure the supervisor cannot mend).
pub(crate) async fn run(plan: Plan) -> Result<(), SupervisorError> {
    let exe =
        std::env::current_exe().map_err(|source| SupervisorError::Spawn { index: 1, source })?;
    let signal = crate::shutdown_signal();
    let workers = plan.workers;
    let ctx = Arc::new(Ctx {
        plan,
        exe,
        stop: CancellationToken::new(),
        restarts: AtomicU64::new(0),
    });
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut slots = JoinSet::new();
    for index in 1..=workers {
        slots.spawn(run_slot(ctx.clone(), index, events_tx.clone()));
    }
    drop(events_tx);

    tokio::pin!(signal);
    let startup = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(startup);
    let mut ready = vec![false; workers + 1];
    let mut announced = false;
    let mut failure = None;
    loop {
        tokio::select! {
            () = &mut signal => {
                tracing::info!("stopping {workers} workers");
                break;
            }
            () = &mut startup, if !announced => {
                let ready = ready.iter().filter(|r| **r).count();
                failure = Some(SupervisorError::StartTimeout { ready, workers });
                break;
            }
            event = events.recv() => match event {
                Some(Event::Ready { index, pid }) => {
                    if let Some(slot) = ready.get_mut(index) {
                        *slot = true;
                    }
                    tracing::debug!(worker = index, pid, "worker ready");
                    if !announced && ready.iter().filter(|r| **r).count() == workers {
                        announced = true;
                        for line in &ctx.plan.startup {
                            println!("{line}");
                        }
                    }
                }
                Some(Event::Fatal(e)) => {
                    failure = Some(e);
                    break;
                }
                None => break,
            },
        }
    }
    ctx.stop.cancel();
    let mut unclean = 0;
    while let Some(end) = slots.join_next().await {
        if !matches!(end, Ok(SlotEnd::Clean)) {
            unclean += 1;
        }
    }
    let restarts = ctx.restarts.load(Ordering::Relaxed);
    if restarts > 0 {
        tracing::info!(restarts, "workers were restarted {restarts} time(s) in all");
    }
    match (failure, unclean) {
        (Some(e), _) => Err(e),
        (None, 0) => Ok(()),
        (None, n) => Err(SupervisorError::Unclean(n)),
    }
}

/// Keeps worker `index` running until the supervisor stops.
async fn run_slot(ctx: Arc<Ctx>, index: usize, events: mpsc::UnboundedSender<Event>) -> SlotEnd {
    let mut restarts: u32 = 0;
    let mut rapid_in_a_row: u32 = 0;
    let mut ever_ready = false;
    loop {
        let (mut child, control) = match spawn(&ctx, index, restarts) {
            Ok(spawned) => spawned,
            Err(source) => {
                let _ = events.send(Event::Fatal(SupervisorError::Spawn { index, source }));
                return SlotEnd::Clean;
            }
        };
        let pid = child.id().unwrap_or(0);
        let started = Instant::now();
        let mut ready_at = None;
        // Kept open for the worker's whole life: its end of the pair sees EOF only when the
        // supervisor is gone.
        let mut control = BufReader::new(control).lines();
        let mut control_open = true;
        let status = loop {
            tokio::select! {
                biased;
                () = ctx.stop.cancelled() => return terminate(child, index, ctx.plan.grace).await,
                status = child.wait() => break status,
                line = control.next_line(), if control_open => match line {
                    Ok(Some(line)) if line.starts_with("ready") && ready_at.is_none() => {
                        ready_at = Some(Instant::now());
                        if ever_ready {
                            tracing::info!(worker = index, pid, "worker restarted and ready");
                        }
                        ever_ready = true;
                        let _ = events.send(Event::Ready { index, pid });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => control_open = false,
                },
            }
        };
        if ctx.stop.is_cancelled() {
            return match status {
                Ok(s) if s.success() => SlotEnd::Clean,
                _ => SlotEnd::Unclean,
            };
        }
        let status = describe(&status);
        if !ever_ready {
            let _ = events.send(Event::Fatal(SupervisorError::NotReady { index, status }));
            return SlotEnd::Clean;
        }
        let rapid = ready_at.is_none() || started.elapsed() < RAPID;
        rapid_in_a_row = if rapid { rapid_in_a_row + 1 } else { 0 };
        if rapid_in_a_row >= MAX_RAPID_FAILURES {
            let _ = events.send(Event::Fatal(SupervisorError::CrashLoop {
                index,
                failures: rapid_in_a_row,
                status,
            }));
            return SlotEnd::Clean;
        }
        let backoff = BACKOFF_BASE
            .saturating_mul(1 << rapid_in_a_row.min(6))
            .min(BACKOFF_MAX);
        restarts += 1;
        let total = ctx.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            worker = index,
            pid,
            restarts_of_this_worker = restarts,
            restarts_in_all = total,
            "worker {index} (pid {pid}) exited unexpectedly ({status}); restarting it in {:.2}s",
            backoff.as_secs_f64()
        );
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = ctx.stop.cancelled() => return SlotEnd::Clean,
        }
    }
}

/// Starts worker `index` with its control socket as standard input.
fn spawn(
    ctx: &Ctx,
    index: usize,
    restarts: u32,
) -> std::io::Result<(Child, tokio::net::UnixStream)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let mut cmd = Command::new(&ctx.exe);
    cmd.args(&ctx.plan.args)
        .arg("--worker-index")
        .arg(index.to_string())
        .arg("--worker-restarts")
        .arg(restarts.to_string())
        .arg("--worker-bind")
        .arg(ctx.plan.bind.to_string())
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .kill_on_drop(true);
    for (key, value) in &ctx.plan.env {
        cmd.env(key, value);
    }
    let child = cmd.spawn()?;
    // The command holds the worker's end; drop it so only the worker has it.
    drop(cmd);
    ours.set_nonblocking(true)?;
    Ok((child, tokio::net::UnixStream::from_std(ours)?))
}

/// Asks a worker to stop (SIGTERM), waits for it within the grace, kills it past that.
async fn terminate(mut child: Child, index: usize, grace: Duration) -> SlotEnd {
    if let Some(pid) = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    match tokio::time::timeout(grace + STOP_MARGIN, child.wait()).await {
        Ok(Ok(status)) if status.success() => SlotEnd::Clean,
        Ok(status) => {
            tracing::warn!(worker = index, "worker stopped with {}", describe(&status));
            SlotEnd::Unclean
        }
        Err(_) => {
            tracing::warn!(
                worker = index,
                "worker did not stop within {}s; killing it",
                (grace + STOP_MARGIN).as_secs()
            );
            let _ = child.kill().await;
            SlotEnd::Unclean
        }
    }
}

/// `exit status 1`, `signal 9 (SIGKILL)`.
fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => {
                let name = match sig {
                    2 => " (SIGINT)",
                    6 => " (SIGABRT)",
                    9 => " (SIGKILL)",
                    11 => " (SIGSEGV)",
                    15 => " (SIGTERM)",
                    _ => "",
                };
                format!("signal {sig}{name}")
            }
            (None, None) => s.to_string(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}
