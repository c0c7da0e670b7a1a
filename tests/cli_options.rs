//! The `canal` binary: help text, the config file, the startup line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_canal");

#[test]
fn serve_help_lists_every_flag_with_its_default() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, default) in [
        ("--bind", "127.0.0.1:8000"),
        ("--layer", "memory://"),
        ("--max-message-size", "1048576"),
        ("--max-frame-size", "1048576"),
        ("--ping-interval", "20"),
        ("--ping-timeout", "30"),
        ("--header-timeout", "5"),
        ("--accept-timeout", "5"),
        ("--http-idle-timeout", "5"),
        ("--max-body-size", "1048576"),
        ("--overflow", "close"),
        ("--shutdown-grace", "10"),
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
        assert!(
            help.contains(&format!("[default: {default}]")),
            "default of {flag} missing"
        );
    }
    assert!(help.contains("--max-connections") && help.contains("open-file limit"));
}

#[tokio::test]
async fn config_file_sets_options_and_flags_win() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("canal-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("canal.toml");
    std::fs::write(
        &config,
        "bind = \"127.0.0.1:1\"\nmax_message_size = 2048\nno_access_log = true\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.contains(&format!("http://127.0.0.1:{port}/")),
        "startup line prints the URL: {first}"
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // max_message_size from the file applies: 3000 bytes is too big.
    let mut s = raw_ws(addr, "/ws/echo/").await;
    s.write_all(&frame(true, 1, &[b'a'; 3000])).await.unwrap();
    assert_eq!(read_close(&mut s).await, Some(1009));
    child.kill().await.unwrap();

    std::fs::write(&config, "bogus_option = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option"));
    let _ = std::fs::remove_dir_all(&dir);
}
