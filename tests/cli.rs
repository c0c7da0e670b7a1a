//! `canal serve` as a process, deployed the daphne way: an inherited socket (`--fd`), a Unix
//! socket (`--unix-socket`), the publish token from the environment, and a clash between a
//! moved built-in route and an app route refused at startup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn canal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canal"));
    cmd.args(["--log-level", "warn"]);
    cmd.env_remove("CANAL_PUBLISH_TOKEN");
    cmd
}

/// A `canal serve` child. [`Running::stop`] ends it with SIGTERM; a test that panics first
/// kills it instead, so a failed run leaves no server behind. Its stderr (warnings and errors)
/// goes to a file that [`Running::log`] reads back for assertion messages.
struct Running {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let log = std::env::temp_dir().join(format!(
            "canal-cli-{}-{}.log",
            std::process::id(),
            fastrand::u32(..)
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd.stderr(Stdio::from(file)).spawn().unwrap();
        Running {
            child: Some(child),
            log,
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is running")
    }

    /// What the child wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> std::process::ExitStatus {
        stop(self.child.take().expect("the child is running"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Ends the child with SIGTERM (a graceful stop) and returns its exit status.
fn stop(mut child: Child) -> std::process::ExitStatus {
    let pid = rustix::process::Pid::from_child(&child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("canal did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Retries `probe` until it answers (the server may still be starting).
async fn until_up<F, Fut>(mut probe: F) -> HttpResponse
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<HttpResponse>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(resp) = probe().await {
            return resp;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "canal never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nothing listens on the socket at `path` any more.
///
/// The tests of this file run in parallel threads, and each spawns processes: a child forked
/// while a test holds a listener has a copy of it until the child's `exec` closes it. So a
/// listener dropped here can live on for a moment in another test's child, and a connection
/// made meanwhile is accepted into its backlog and reset at the `exec`: the request gets an
/// empty answer. (This made the unix-socket test fail about once in forty runs.) Once a
/// connection is refused, no copy is left, and none can appear.
fn wait_until_refused(path: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a dropped listener still answers"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn socket_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "canal-cli-{tag}-{}-{}.sock",
        std::process::id(),
        fastrand::u32(..)
    ))
}

#[tokio::test]
async fn serves_on_an_inherited_tcp_socket() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // The supervisor's socket arrives as the child's stdin: `--fd 0`.
    let child = Running::spawn(
        canal()
            .args(["serve", "--fd", "0", "--publish-token", "t0k"])
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null()),
    );
    let resp = until_up(|| async move {
        tokio::net::TcpStream::connect(addr).await.ok()?;
        Some(get(addr, "/health").await)
    })
    .await;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "ok"),
        "{resp:?}; canal's stderr: {}",
        child.log()
    );
    assert_eq!(get(addr, "/ready").await.status, 200);
    let mut a = connect(&format!("ws://{addr}/ws/chat/fd/")).await;
    let resp = http_req(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", "Bearer t0k")],
        br#"{"group":"fd","message":{"type":"chat.message","text":"pushed"}}"#,
    )
    .await;
    assert_eq!(resp.status, 202, "{resp:?}");
    assert_eq!(next_text(&mut a).await, "pushed");
    futures_util::SinkExt::close(&mut a).await.unwrap();
    assert!(child.stop().success());
}

#[tokio::test]
async fn serves_on_an_inherited_unix_socket_and_refuses_what_is_not_one() {
    let path = socket_path("fd");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let child = Running::spawn(
        canal()
            .args(["serve", "--fd", "0"])
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null()),
    );
    let p = path.clone();
    let resp = until_up(|| {
        let p = p.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&p).await.ok()?;
            Some(http_on(s, "GET", "/health", &[], b"").await)
        }
    })
    .await;
    assert_eq!(
        resp.status,
        200,
        "{resp:?}; canal's stderr: {}",
        child.log()
    );
    assert!(child.stop().success());
    let _ = std::fs::remove_file(&path);

    // Not a socket at all.
    let out = canal()
        .args(["serve", "--fd", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("file descriptor 0"), "{err}");
    // A socket that is not listening.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let out = canal()
        .args(["serve", "--fd", "0"])
        .stdin(Stdio::from(OwnedFd::from(a)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a listening stream socket"), "{err}");
}

#[tokio::test]
async fn serves_on_a_unix_socket_path_with_a_root_path() {
    let path = socket_path("path");
    // A stale socket file from a previous run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    wait_until_refused(&path);
    let child = Running::spawn(
        canal()
            .args(["serve", "--root-path", "/rt", "--unix-socket"])
            .arg(&path)
            .env("CANAL_PUBLISH_TOKEN", "from-env")
            .stdout(Stdio::null()),
    );
    let p = path.clone();
    let resp = until_up(|| {
        let p = p.clone();
        async move {
            let s = tokio::net::UnixStream::connect(&p).await.ok()?;
            Some(http_on(s, "GET", "/rt/health", &[], b"").await)
        }
    })
    .await;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "ok"),
        "{resp:?}; canal's stderr: {}",
        child.log()
    );
    let s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let resp = http_on(
        s,
        "POST",
        "/rt/api/publish",
        &[("Authorization", "Bearer from-env")],
        br#"{"group":"x","message":{"type":"chat.message","text":"hi"}}"#,
    )
    .await;
    assert_eq!(
        resp.status,
        202,
        "{resp:?}; canal's stderr: {}",
        child.log()
    );
    assert!(child.stop().success());
    assert!(!path.exists(), "the socket file is removed on exit");
}

#[tokio::test]
async fn a_builtin_moved_onto_an_app_route_is_an_error_at_startup() {
    let clash = [
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--metrics-path",
        "/health",
    ];
    let out = canal().args(clash).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("built-in metrics route \"/health\" clashes with the app's HTTP route"),
        "{err}"
    );
    // Switched off, the clash is gone.
    let mut child = Running::spawn(
        canal()
            .args(clash)
            .arg("--no-metrics")
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.child().stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(
        line.starts_with("canal serving on http://127.0.0.1:"),
        "{line}"
    );
    assert!(child.stop().success());
    drop(stdout);
}
