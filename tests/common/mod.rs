//! Helpers shared by the integration tests: a server on a free loopback port, a real
//! WebSocket client (tokio-websockets), and raw-socket tools for protocol-level checks.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use canal::{App, Server, ServerConfig, ServerHandle};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), canal::server::ServerError>>>,
}

impl TestServer {
    pub async fn start(app: App) -> TestServer {
        TestServer::start_with(app, quiet_config()).await
    }

    pub async fn start_with(app: App, config: ServerConfig) -> TestServer {
        TestServer::start_full(app, config, None).await
    }

    pub async fn start_full(
        app: App,
        config: ServerConfig,
        layer: Option<canal::Layer>,
    ) -> TestServer {
        let mut server = Server::new(app).with_config(config);
        if let Some(layer) = layer {
            server = server.with_layer(layer);
        }
        TestServer::run(server).await
    }

    /// Serves `server` on a free loopback port until `shutdown` (or drop).
    pub async fn run(mut server: Server) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = server.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            handle,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server did not stop in time")
                .expect("server task panicked")
                .expect("server returned an error");
        }
    }
}

/// A loopback port that was free a moment ago (for servers started as child processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn quiet_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.access_log = false;
    config.shutdown_grace = Duration::from_secs(5);
    config
}

pub async fn connect(url: &str) -> Client {
    let (client, _resp) = ClientBuilder::new()
        .uri(url)
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    client
}

/// The next data or close message, within 5 s.
pub async fn next(client: &mut Client) -> Message {
    tokio::time::timeout(Duration::from_secs(5), client.next())
        .await
        .expect("timed out waiting for a message")
        .expect("stream ended")
        .expect("websocket error")
}

pub async fn next_text(client: &mut Client) -> String {
    let msg = next(client).await;
    msg.as_text()
        .unwrap_or_else(|| panic!("expected text, got {msg:?}"))
        .to_owned()
}

pub async fn send_text(client: &mut Client, text: &str) {
    client.send(Message::text(text.to_owned())).await.unwrap();
}

/// Waits for the close frame and returns its code.
pub async fn close_code(client: &mut Client) -> u16 {
    loop {
        let msg = next(client).await;
        if let Some((code, _)) = msg.as_close() {
            return code.into();
        }
    }
}

pub async fn expect_silence(client: &mut Client, ms: u64) {
    if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(ms), client.next()).await {
        panic!("expected nothing, got {msg:?}");
    }
}

// ------------------------------------------------------------------ raw sockets

/// Sends `request` and returns the response head (status line + headers).
pub async fn raw_request(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("timed out reading a response head")
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A raw WebSocket connection after a successful handshake.
pub async fn raw_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let (s, head) = raw_request(addr, &upgrade_request(path, "")).await;
    assert_eq!(status_of(&head), 101, "{head}");
    s
}

/// A raw WebSocket connection with a 4 KiB receive buffer, for a member that reads slowly or
/// not at all: the server's writes to it fill its buffers soon.
pub async fn slow_reader_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(upgrade_request(path, "").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert_eq!(status_of(&head), 101, "{head}");
    s
}

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads one server frame: (opcode, payload). `None` on EOF.
pub async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.ok()?;
        let len = match h[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                s.read_exact(&mut b).await.ok()?;
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0F, payload))
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("timed out reading a frame")
}

/// Reads frames until a close frame; returns its code (1005 if empty), or None on EOF.
pub async fn read_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (op, payload) = read_frame(s).await?;
        if op == 8 {
            return Some(if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            });
        }
    }
}

/// True when the server closes the TCP connection within `secs`.
pub async fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

// ------------------------------------------------------------------ plain HTTP

/// A whole HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one request with `Connection: close` on `stream` and reads the whole response.
pub async fn http_on<S>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("timed out reading a response")
        .ok();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = status_of(lines.next().unwrap_or(""));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// One HTTP request over TCP.
pub async fn http_req(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let s = TcpStream::connect(addr).await.unwrap();
    http_on(s, method, path, headers, body).await
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_req(addr, "GET", path, &[], b"").await
}

/// Starts a server with built-in routes on a free loopback port.
pub async fn start_with_builtins(
    app: App,
    config: ServerConfig,
    builtins: canal::server::Builtins,
) -> TestServer {
    let server = Server::new(app)
        .with_config(config)
        .with_builtins(builtins)
        .unwrap();
    TestServer::run(server).await
}

/// Prometheus text parsed into samples: (name, sorted labels) → value. Panics on any line
/// that is not valid exposition format, or a sample without a `# TYPE` line before it.
pub type Sample = (String, Vec<(String, String)>, f64);

pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut typed: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type line {line:?}"
            );
            typed.push(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("unclosed labels");
                let mut labels = Vec::new();
                for pair in body.split(',') {
                    let (k, v) = pair.split_once('=').expect("label without =");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("unquoted label value");
                    labels.push((k.to_owned(), v.to_owned()));
                }
                labels.sort();
                (name.to_owned(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.iter().any(|t| t == f))
            })
            .unwrap_or(&name);
        assert!(
            typed.iter().any(|t| t == family),
            "sample {name} has no # TYPE line"
        );
        samples.push((name, labels, value));
    }
    samples
}

/// The value of one sample (labels in any order); panics when absent.
pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}
