//! Testing consumers without a network (Channels' `WebsocketCommunicator`).
//!
//! A [`WebsocketCommunicator`] routes a path through an [`App`] exactly as the server would,
//! runs the consumer on the real connection machinery, and talks to it over an in-memory pipe
//! as a WebSocket client would: masked frames in, frames out, close handshake and all.
//!
//! ```
//! use canal::prelude::*;
//! use canal::testing::{Connect, WebsocketCommunicator};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = App::new().websocket(path("/ws/echo/", ws(canal::demo::Echo::default)));
//! let mut client = WebsocketCommunicator::new(app, "/ws/echo/");
//! assert!(matches!(client.connect().await, Connect::Accepted { .. }));
//! client.send_text("hi").await.unwrap();
//! assert_eq!(client.receive_text().await.unwrap(), "hi");
//! client.disconnect(1000).await;
//! # }
//! ```

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;

use crate::Layer;
use crate::consumer::Frame;
use crate::scope::{Scope, ScopeKind};
use crate::server::ws::conn::Decision;
use crate::server::ws::{UpgradeSource, websocket_task};
use crate::server::{App, Server, ServerConfig, ServerHandle};

/// How long `receive_*` waits by default (Channels' communicator uses 1 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// The answer to [`WebsocketCommunicator::connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// Accepted, with the subprotocol the consumer selected.
    Accepted {
        /// The selected subprotocol.
        subprotocol: Option<String>,
        /// Extra response headers.
        headers: Vec<(String, String)>,
    },
    /// Refused with this HTTP status (403 deny, 404 no route, 500 error …).
    Rejected(u16),
}

/// What the client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A data message.
    Frame(Frame),
    /// A close frame with its code (1005 when it had none).
    Close(u16),
}

/// Errors from the communicator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TestError {
    /// Nothing arrived in time.
    #[error("nothing received within the timeout")]
    Timeout,
    /// The server closed the connection (with this code).
    #[error("connection closed with code {0}")]
    Closed(u16),
    /// Something other than what was asked for arrived.
    #[error("unexpected message: {0}")]
    Unexpected(String),
    /// `connect` was not called or did not succeed.
    #[error("not connected")]
    NotConnected,
}

/// Drives one consumer in-process, as a WebSocket client would.
pub struct WebsocketCommunicator {
    handle: ServerHandle,
    path: String,
    headers: Vec<(String, String)>,
    io: Option<DuplexStream>,
    buf: BytesMut,
    closed: Option<u16>,
}

impl std::fmt::Debug for WebsocketCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebsocketCommunicator")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WebsocketCommunicator {
    /// A communicator for `path` (with an optional `?query`) in `app`, on a fresh memory layer.
    pub fn new(app: App, path: &str) -> Self {
        let mut server = Server::new(app);
        WebsocketCommunicator::from_handle(server.handle(), path)
    }

    /// Same, on `layer` (to share one layer between communicators, or test a backend).
    pub fn with_layer(app: App, path: &str, layer: Layer) -> Self {
        let mut server = Server::new(app).with_layer(layer);
        WebsocketCommunicator::from_handle(server.handle(), path)
    }

    /// Same, with server settings.
    pub fn with_config(app: App, path: &str, config: ServerConfig) -> Self {
        let mut server = Server::new(app).with_config(config);
        WebsocketCommunicator::from_handle(server.handle(), path)
    }

    /// Another client of the same app and layer (for chat-style tests).
    pub fn from_handle(handle: ServerHandle, path: &str) -> Self {
        WebsocketCommunicator {
            handle,
            path: path.to_owned(),
            headers: Vec::new(),
            io: None,
            buf: BytesMut::new(),
            closed: None,
        }
    }

    /// The server state behind this communicator (layer, counters).
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Adds a request header (e.g. `sec-websocket-protocol`, `origin`, `cookie`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Performs the handshake: routes the path, runs the consumer's `connect`.
    pub async fn connect(&mut self) -> Connect {
        let shared = self.handle.shared();
        let (path, query) = self
            .path
            .split_once('?')
            .map_or((self.path.as_str(), ""), |(p, q)| (p, q));
        let Ok(path) = percent_encoding::percent_decode_str(path).decode_utf8() else {
            return Connect::Rejected(400);
        };
        let path = path.into_owned();
        let path = path.as_str();
        let Some(found) = shared.app.websocket.resolve(path) else {
            return Connect::Rejected(404);
        };
        let endpoint = found.endpoint.clone();
        let mut headers = http::HeaderMap::new();
        for (name, value) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        let mut scope = Scope::new(
            ScopeKind::WebSocket,
            http::Method::GET,
            path,
            query,
            &headers,
            None,
        );
        scope.set_params(&found.params);
        if let Err(rejection) = endpoint.factory.check(&scope) {
            return Connect::Rejected(rejection.status);
        }
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(websocket_task(
            shared.clone(),
            endpoint,
            scope,
            UpgradeSource::Direct(server),
            tx,
            crate::server::ConnGuard::new(shared, None),
        ));
        match rx.await {
            Ok(Decision::Accept {
                subprotocol,
                headers,
            }) => {
                self.io = Some(client);
                Connect::Accepted {
                    subprotocol,
                    headers,
                }
            }
            Ok(Decision::Reject(status, _)) => Connect::Rejected(status),
            Err(_) => Connect::Rejected(500),
        }
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), TestError> {
        let io = self.io.as_mut().ok_or(TestError::NotConnected)?;
        let frame = client_frame(opcode, payload);
        io.write_all(&frame)
            .await
            .map_err(|_| TestError::Closed(self.closed.unwrap_or(1006)))
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), TestError> {
        self.write_frame(1, text.as_bytes()).await
    }

    /// Sends a binary message.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), TestError> {
        self.write_frame(2, bytes).await
    }

    /// Sends JSON text.
    pub async fn send_json(&mut self, value: &serde_json::Value) -> Result<(), TestError> {
        self.send_text(&value.to_string()).await
    }

    /// The next message or close frame, within `timeout`. Pings are answered on the way.
    pub async fn receive_within(&mut self, timeout: Duration) -> Result<Received, TestError> {
        if let Some(code) = self.closed {
            return Err(TestError::Closed(code));
        }
        match tokio::time::timeout(timeout, self.next_frame()).await {
            Ok(result) => result,
            Err(_) => Err(TestError::Timeout),
        }
    }

    /// The next message or close frame, within [`DEFAULT_TIMEOUT`].
    pub async fn receive(&mut self) -> Result<Received, TestError> {
        self.receive_within(DEFAULT_TIMEOUT).await
    }

    /// The next text message.
    pub async fn receive_text(&mut self) -> Result<String, TestError> {
        match self.receive().await? {
            Received::Frame(Frame::Text(t)) => Ok(t.to_string()),
            Received::Close(code) => Err(TestError::Closed(code)),
            other => Err(TestError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The next text message parsed as JSON.
    pub async fn receive_json(&mut self) -> Result<serde_json::Value, TestError> {
        let text = self.receive_text().await?;
        serde_json::from_str(&text).map_err(|e| TestError::Unexpected(e.to_string()))
    }

    /// True when nothing arrives within `timeout`.
    pub async fn receive_nothing(&mut self, timeout: Duration) -> bool {
        matches!(self.receive_within(timeout).await, Err(TestError::Timeout))
    }

    /// Closes with `code` and waits (up to 1 s) for the server's answer.
    pub async fn disconnect(&mut self, code: u16) {
        if self.closed.is_none() {
            let _ = self.write_frame(8, &code.to_be_bytes()).await;
            let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
            while self.closed.is_none() && tokio::time::Instant::now() < deadline {
                if self.receive_within(DEFAULT_TIMEOUT).await.is_err() {
                    break;
                }
            }
        }
        self.io = None;
    }

    /// Drops the pipe without a close frame (a vanished client).
    pub fn abort(&mut self) {
        self.io = None;
    }

    async fn next_frame(&mut self) -> Result<Received, TestError> {
        loop {
            if let Some((opcode, payload)) = parse_server_frame(&mut self.buf) {
                match opcode {
                    1 => {
                        let text = bytestring::ByteString::try_from(payload)
                            .map_err(|_| TestError::Unexpected("invalid UTF-8 text".into()))?;
                        return Ok(Received::Frame(Frame::Text(text)));
                    }
                    2 => return Ok(Received::Frame(Frame::Binary(payload))),
                    8 => {
                        let code = if payload.len() >= 2 {
                            u16::from_be_bytes([payload[0], payload[1]])
                        } else {
                            1005
                        };
                        if self.closed.is_none() {
                            let _ = self.write_frame(8, &payload[..payload.len().min(2)]).await;
                        }
                        self.closed = Some(code);
                        return Ok(Received::Close(code));
                    }
                    9 => {
                        self.write_frame(10, &payload).await?;
                        continue;
                    }
                    _ => continue,
                }
            }
            let io = self.io.as_mut().ok_or(TestError::NotConnected)?;
            let n = io
                .read_buf(&mut self.buf)
                .await
                .map_err(|_| TestError::Closed(1006))?;
            if n == 0 {
                self.closed = Some(1006);
                return Err(TestError::Closed(1006));
            }
        }
    }
}

/// A masked client frame with FIN set.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
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
    let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Takes one complete unmasked server frame off `buf`, if there is one.
fn parse_server_frame(buf: &mut BytesMut) -> Option<(u8, bytes::Bytes)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    let (len, header) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    buf.advance(header);
    Some((opcode, buf.split_to(len).freeze()))
}
