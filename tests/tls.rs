//! TLS over loopback with a real rustls client: HTTPS, a `wss://` echo, a plain-text client on
//! the TLS port, a client that never finishes its handshake, and `canal serve --tls-cert`.
//! The certificate is made for the test with the `openssl` command (it is in Debian's base
//! images; the test says so loudly and passes if it is missing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use canal::demo;
use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A self-signed certificate for localhost / 127.0.0.1 in a fresh directory.
fn make_cert() -> Option<(PathBuf, PathBuf)> {
    let dir = std::env::temp_dir().join(format!(
        "canal-tls-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Some((cert, key)),
        _ => {
            eprintln!("SKIPPED: the openssl command is missing or failed; TLS is not tested");
            None
        }
    }
}

fn connector(cert: &PathBuf) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn https_and_wss_over_loopback() {
    let Some((cert, key)) = make_cert() else {
        return;
    };
    let mut config = quiet_config();
    config.tls = Some(canal::server::tls::load(&cert, &key).expect("load the test certificate"));
    config.header_timeout = Duration::from_secs(1);
    let server = TestServer::start_with(demo::app(), config).await;
    let connector = connector(&cert);

    // HTTPS.
    let tls = tls_connect(server.addr, &connector).await;
    let resp = http_on(tls, "GET", "/health", &[], b"").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.trim(), "ok");

    // wss:// echo, frames by hand over the TLS stream.
    let mut tls = tls_connect(server.addr, &connector).await;
    tls.write_all(upgrade_request("/ws/echo/", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tls.read(&mut byte).await.unwrap(),
            1,
            "EOF in the handshake answer"
        );
        head.push(byte[0]);
    }
    assert_eq!(status_of(&String::from_utf8_lossy(&head)), 101);
    tls.write_all(&frame(true, 1, b"over tls")).await.unwrap();
    let mut answer = [0u8; 10];
    tls.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], 0x81);
    assert_eq!(&answer[2..], b"over tls");

    // A plain-text client on the TLS port gets nothing but a close.
    let (mut plain, _) = (TcpStream::connect(server.addr).await.unwrap(), ());
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "a plain client on the TLS port was left hanging"
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "plain HTTP answered on the TLS port"
    );

    // A client that opens TCP and never says hello is cut off by the header timeout.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_within(&mut silent, 5).await);
    assert!(server.handle.stats().tls_failures >= 2);

    // The server still serves TLS.
    let tls = tls_connect(server.addr, &connector).await;
    assert_eq!(http_on(tls, "GET", "/health", &[], b"").await.status, 200);
}

#[test]
fn bad_pem_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("canal-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let missing = dir.join("missing.pem");
    let err = canal::server::tls::load(&missing, &junk).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = canal::server::tls::load(&junk, &junk).unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
}

#[tokio::test]
async fn canal_serve_speaks_tls_with_the_flags() {
    let Some((cert, key)) = make_cert() else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_canal"))
        .args(["--log-level", "error", "serve", "--fd", "0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            listener,
        )))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let connector = connector(&cert);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            let name = ServerName::try_from("localhost").unwrap();
            if let Ok(tls) = connector.connect(name, tcp).await {
                ok = http_on(tls, "GET", "/health", &[], b"").await.status == 200;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    let _ = child.wait();
    assert!(ok, "canal serve --tls-cert did not answer over TLS");
    assert!(out.contains("https://") && out.contains("wss://"), "{out}");
}
