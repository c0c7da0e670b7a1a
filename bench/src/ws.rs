//! A minimal WebSocket client over a raw TCP stream.
//!
//! Only what a load generator needs: a bare handshake request, masked client frames, parsing of
//! unmasked server frames (fragmented messages are reassembled), a pong for every ping, other
//! control frames ignored, and a clean close. Reading is split in two so that it can sit in a
//! `select!`: [`WsConn::fill`] is a cancel-safe read into the buffer, [`WsConn::drain`] parses the
//! complete frames it holds without awaiting, and [`WsConn::flush`] writes whatever was queued
//! (pongs, close replies, batched messages).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest message (and read buffer) accepted from the server.
const MAX_MESSAGE: usize = 64 << 20;
/// Largest handshake response accepted.
const MAX_HEAD: usize = 16 << 10;
/// Initial read buffer: small, since idle connections are many and mostly silent.
const INITIAL_BUF: usize = 256;
/// A connection whose reads keep filling its buffer grows it up to this, so a member of a busy
/// room takes hundreds of small frames per `read` rather than seven.
const BUSY_BUF: usize = 8 << 10;

/// One client connection after a successful upgrade.
pub struct WsConn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
    frag: Vec<u8>,
    frag_op: u8,
    peer_closed: Option<u16>,
    close_sent: bool,
}

fn proto(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Appends one masked client frame to `out`.
fn write_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    let len = payload.len();
    out.push(0x80 | op);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = fastrand::u32(..).to_ne_bytes();
    out.extend_from_slice(&mask);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], mask);
}

fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m8 = [mask, mask].concat();
    let mut wide = [0u8; 8];
    wide.copy_from_slice(&m8);
    let wide = u64::from_ne_bytes(wide);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *b ^= m;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Opens a TCP connection (bound to `source` first, when given) and performs the upgrade.
///
/// `host` is the `Host` header value, `path` the request target.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    host: &str,
    path: &str,
) -> io::Result<WsConn> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut key = [0u8; 16];
    fastrand::fill(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut conn = WsConn {
        stream,
        rbuf: vec![0; INITIAL_BUF],
        start: 0,
        end: 0,
        wbuf: Vec::new(),
        frag: Vec::new(),
        frag_op: 0,
        peer_closed: None,
        close_sent: false,
    };
    conn.stream.write_all(req.as_bytes()).await?;
    loop {
        if let Some(pos) = find(&conn.rbuf[..conn.end], b"\r\n\r\n") {
            let head = &conn.rbuf[..pos];
            if !head.starts_with(b"HTTP/1.1 101") {
                let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("upgrade refused: {}", String::from_utf8_lossy(line)),
                ));
            }
            conn.start = pos + 4;
            return Ok(conn);
        }
        if conn.end == conn.rbuf.len() {
            if conn.rbuf.len() >= MAX_HEAD {
                return Err(proto("handshake response too large"));
            }
            conn.rbuf.resize(conn.rbuf.len() * 2, 0);
        }
        let n = conn.stream.read(&mut conn.rbuf[conn.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        conn.end += n;
    }
}

impl WsConn {
    /// Queues one message (or control frame) without writing it.
    pub fn queue(&mut self, op: u8, payload: &[u8]) {
        write_frame(&mut self.wbuf, op, payload);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Queues and writes one message.
    pub async fn send(&mut self, op: u8, payload: &[u8]) -> io::Result<()> {
        self.queue(op, payload);
        self.flush().await
    }

    /// Reads more bytes into the buffer; `Ok(0)` is end of stream. Cancel-safe.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.rbuf.len() {
            if self.start > 0 {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.rbuf.len() * 2).min(MAX_MESSAGE + 16);
                if grown == self.rbuf.len() {
                    return Err(proto("frame larger than the read buffer limit"));
                }
                self.rbuf.resize(grown, 0);
            }
        }
        let space = self.rbuf.len() - self.end;
        let n = self.stream.read(&mut self.rbuf[self.end..]).await?;
        self.end += n;
        if n == space && self.rbuf.len() < BUSY_BUF {
            // More was probably waiting.
            self.rbuf.resize(self.rbuf.len() * 2, 0);
        }
        Ok(n)
    }

    /// The close code the server sent, once it sent a close frame.
    pub fn peer_closed(&self) -> Option<u16> {
        self.peer_closed
    }

    /// Parses every complete frame in the buffer. Data messages go to `on_msg` (opcode,
    /// payload); a ping queues a pong, a close frame is recorded and answered (call
    /// [`flush`](Self::flush) afterwards); frames after a close are left unread.
    pub fn drain(&mut self, mut on_msg: impl FnMut(u8, &[u8])) -> io::Result<()> {
        while self.peer_closed.is_none() {
            let avail = &self.rbuf[self.start..self.end];
            if avail.len() < 2 {
                return Ok(());
            }
            let (b0, b1) = (avail[0], avail[1]);
            let fin = b0 & 0x80 != 0;
            let op = b0 & 0x0F;
            let masked = b1 & 0x80 != 0;
            let mut len = u64::from(b1 & 0x7F);
            let mut hdr = 2usize;
            if len == 126 {
                if avail.len() < 4 {
                    return Ok(());
                }
                len = u64::from(u16::from_be_bytes([avail[2], avail[3]]));
                hdr = 4;
            } else if len == 127 {
                if avail.len() < 10 {
                    return Ok(());
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                len = u64::from_be_bytes(b);
                hdr = 10;
            }
            if len > MAX_MESSAGE as u64 {
                return Err(proto("frame too large"));
            }
            if masked {
                hdr += 4;
            }
            let total = hdr + len as usize;
            if avail.len() < total {
                return Ok(());
            }
            let p0 = self.start + hdr;
            let p1 = self.start + total;
            if masked {
                let mut mask = [0u8; 4];
                mask.copy_from_slice(&self.rbuf[p0 - 4..p0]);
                apply_mask(&mut self.rbuf[p0..p1], mask);
            }
            self.start += total;
            let payload = &self.rbuf[p0..p1];
            match op {
                OP_PING => write_frame(&mut self.wbuf, OP_PONG, payload),
                OP_PONG => {}
                OP_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    self.peer_closed = Some(code);
                    if !self.close_sent {
                        let reply = if code == 1005 { 1000 } else { code };
                        write_frame(&mut self.wbuf, OP_CLOSE, &reply.to_be_bytes());
                        self.close_sent = true;
                    }
                }
                OP_CONT => {
                    if self.frag_op == 0 {
                        return Err(proto("continuation without a first frame"));
                    }
                    if self.frag.len() + payload.len() > MAX_MESSAGE {
                        return Err(proto("message too large"));
                    }
                    self.frag.extend_from_slice(payload);
                    if fin {
                        on_msg(self.frag_op, &self.frag);
                        self.frag.clear();
                        self.frag_op = 0;
                    }
                }
                OP_TEXT | OP_BINARY => {
                    if self.frag_op != 0 {
                        return Err(proto("new message inside a fragmented one"));
                    }
                    if fin {
                        on_msg(op, payload);
                    } else {
                        self.frag_op = op;
                        self.frag.extend_from_slice(payload);
                    }
                }
                _ => return Err(proto("reserved opcode")),
            }
        }
        Ok(())
    }

    /// Drains, flushes, and reads until `pred` accepts a data message or `deadline` passes.
    /// Returns whether one was accepted; errors on end of stream or a close from the server.
    pub async fn wait_for(
        &mut self,
        deadline: tokio::time::Instant,
        mut pred: impl FnMut(u8, &[u8]) -> bool,
    ) -> io::Result<bool> {
        let work = async {
            loop {
                let mut hit = false;
                self.drain(|op, p| hit |= pred(op, p))?;
                self.flush().await?;
                if hit {
                    return Ok(true);
                }
                if let Some(code) = self.peer_closed {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("server closed with {code}"),
                    ));
                }
                if self.fill().await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(r) => r,
            Err(_) => Ok(false),
        }
    }

    /// Sends a close frame (unless one was already sent) and waits up to `wait` for the server's.
    /// Returns true when the closing handshake completed.
    pub async fn close(&mut self, code: u16, wait: Duration) -> bool {
        if !self.close_sent {
            self.queue(OP_CLOSE, &code.to_be_bytes());
            self.close_sent = true;
        }
        if self.flush().await.is_err() {
            return false;
        }
        let work = async {
            loop {
                self.drain(|_, _| {})?;
                if self.peer_closed.is_some() {
                    return Ok::<bool, io::Error>(true);
                }
                if self.fill().await? == 0 {
                    return Ok(false);
                }
            }
        };
        let clean = matches!(tokio::time::timeout(wait, work).await, Ok(Ok(true)));
        let _ = self.stream.shutdown().await;
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_round_trips_every_length() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut buf = data.clone();
            let mask = [0x12, 0x34, 0x56, 0x78];
            apply_mask(&mut buf, mask);
            for (i, (b, d)) in buf.iter().zip(&data).enumerate() {
                assert_eq!(*b, d ^ mask[i % 4], "len {len} byte {i}");
            }
            apply_mask(&mut buf, mask);
            assert_eq!(buf, data);
        }
    }

    #[test]
    fn frame_header_lengths() {
        for (len, hdr) in [
            (0usize, 6usize),
            (125, 6),
            (126, 8),
            (65535, 8),
            (65536, 14),
        ] {
            let mut out = Vec::new();
            write_frame(&mut out, OP_BINARY, &vec![7u8; len]);
            assert_eq!(out.len(), hdr + len);
            assert_eq!(out[0], 0x80 | OP_BINARY);
            assert_eq!(out[1] & 0x80, 0x80);
            let mut mask = [0u8; 4];
            mask.copy_from_slice(&out[hdr - 4..hdr]);
            let mut payload = out[hdr..].to_vec();
            apply_mask(&mut payload, mask);
            assert!(payload.iter().all(|&b| b == 7));
        }
    }

    /// A connection that keeps receiving full reads grows its buffer (bounded), and every frame
    /// still comes out whole and in order.
    #[tokio::test]
    async fn a_busy_connection_reads_more_at_once() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                let n = s.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
            }
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
            for i in 0..2000u32 {
                let text = format!("{i:032}");
                out.extend_from_slice(&[0x81, 32]);
                out.extend_from_slice(text.as_bytes());
            }
            s.write_all(&out).await.unwrap();
            s
        });
        let mut conn = connect(addr, None, "x", "/").await.unwrap();
        let _keep = server.await.unwrap();
        let mut seen = 0u32;
        while seen < 2000 {
            assert!(conn.fill().await.unwrap() > 0);
            conn.drain(|op, p| {
                assert_eq!(op, OP_TEXT);
                assert_eq!(p, format!("{seen:032}").as_bytes());
                seen += 1;
            })
            .unwrap();
        }
        assert!(conn.rbuf.len() > INITIAL_BUF, "the buffer grew");
        assert!(conn.rbuf.len() <= BUSY_BUF, "up to its bound");
    }
}
