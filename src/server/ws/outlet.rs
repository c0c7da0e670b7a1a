//! A connection's TCP socket shared with its mailbox, so a group send's pass of wakes can write
//! the connection's messages while its task sleeps.
//!
//! A connection whose consumer has a fastlane ([`WebsocketConsumer::FASTLANE`]) and whose
//! socket is plain TCP keeps the socket in an [`Outlet`]: its task reads and writes through an
//! [`OutletIo`], and its mailbox holds the same `Arc`. When a large room's group send reaches a
//! member that sleeps with nothing of its own to write, the pass of wakes frames the member's
//! queued fastlane messages and writes them with one `send`
//! ([`Mailbox::write_through`](crate::layer::Mailbox)), instead of waking its task to do the same.
//! The mailbox's state says who may write when; this module only frames and writes.
//!
//! It costs an idle connection the `Arc`'s allocation (the socket moves out of the task into it):
//! 64 bytes, one of jemalloc's size classes (the fastlane list stays with the mailbox).
//!
//! [`WebsocketConsumer::FASTLANE`]: crate::consumer::WebsocketConsumer::FASTLANE

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::codec::{FrameHead, OpCode};
use super::conn::{GATHER_PART, SCRATCH_BUF};
use crate::layer::Fifo;
use crate::server::Shared;

/// A connection's socket, and the server whose totals count what is written through it.
pub(crate) struct Outlet {
    socket: TcpStream,
    shared: Arc<Shared>,
}

/// What [`Outlet::write_front`] did.
#[derive(Debug, Default)]
pub(crate) struct Wrote {
    /// Messages at the head of the queue that are written (whole, or begun: see `rest`); the
    /// caller pops them.
    pub(crate) messages: usize,
    /// The bytes of those messages' frames that the socket did not take, to be written next.
    pub(crate) rest: Option<Bytes>,
}

impl Outlet {
    /// A connection's socket. Only for a connection whose messages count in the server's
    /// totals (all but the dashboard's own): the outlet counts its writes there.
    pub(crate) fn new(socket: TcpStream, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Outlet { socket, shared })
    }

    /// Frames the longest run of messages at the head of `queue` that go to the socket as they
    /// are (a `fastlane` type with `text` or `bytes`, each frame small enough to gather) into the
    /// thread's scratch buffer and writes them with one `send`. Nothing is written when the
    /// first message is not one of those, or when the socket would block or failed (the
    /// connection's task finds out for itself when it runs).
    pub(crate) fn write_front(&self, fastlane: &[&str], queue: &Fifo) -> Wrote {
        SCRATCH_BUF.with(|scratch| {
            // Not re-entered in practice (a pass of wakes never runs inside a socket write);
            // if it were, the connection's task writes instead.
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                return Wrote::default();
            };
            let mut len = 0;
            let mut messages = 0;
            for envelope in queue.iter() {
                let message = &envelope.message;
                if !message.kind().is_some_and(|k| fastlane.contains(&k)) {
                    break;
                }
                let (opcode, payload) = if let Some(text) = message.text_value("text") {
                    (OpCode::Text, &text.as_bytes()[..])
                } else if let Ok(bytes) = message.bytes("bytes") {
                    (OpCode::Binary, &bytes[..])
                } else {
                    break; // the connection's task warns about it
                };
                let head = FrameHead::new(opcode, payload.len());
                let head = head.as_slice();
                let size = head.len() + payload.len();
                if size > GATHER_PART {
                    break;
                }
                let Some(frame) = scratch.get_mut(len..len + size) else {
                    break;
                };
                let (h, p) = frame.split_at_mut(head.len());
                h.copy_from_slice(head);
                p.copy_from_slice(payload);
                len += size;
                messages += 1;
            }
            if messages == 0 {
                return Wrote::default();
            }
            // A plain `send`, not tokio's `try_write`: that one first reads the socket's
            // readiness in tokio's per-socket state, one more cache line to miss per member
            // (3 % of canal's samples at 5 msg/s into 10,000). Its readiness is left as it is;
            // after an EAGAIN here the task's own write finds out and clears it.
            let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
            let written = match rustix::net::send(&self.socket, &scratch[..len], flags) {
                Ok(n) if n > 0 => n,
                _ => return Wrote::default(),
            };
            self.count(queue, messages, written < len);
            Wrote {
                messages,
                rest: (written < len).then(|| Bytes::copy_from_slice(&scratch[written..len])),
            }
        })
    }

    /// Counts `n` messages from the head of `queue` as the connection's task counts what it
    /// sends (by type, and as messages out), and as direct writes.
    fn count(&self, queue: &Fifo, n: usize, partial: bool) {
        let stats = &self.shared.stats;
        for envelope in queue.iter().take(n) {
            stats.layer.received.count(envelope.message.kind());
        }
        stats.frames_out.fetch_add(n as u64, Ordering::Relaxed);
        stats
            .frames_out_direct
            .fetch_add(n as u64, Ordering::Relaxed);
        if partial {
            stats.direct_partial_writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The connection task's side of an [`Outlet`]: reads and writes its socket.
pub(crate) struct OutletIo(pub(crate) Arc<Outlet>);

impl AsyncRead for OutletIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let socket = &self.0.socket;
        loop {
            ready!(socket.poll_read_ready(cx))?;
            match socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl OutletIo {
    /// Runs `write` on the socket once it is writable, again after each spurious readiness.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let socket = &self.0.socket;
        loop {
            ready!(socket.poll_write_ready(cx))?;
            match write(socket) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for OutletIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |socket| socket.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |socket| socket.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts the write side down (what `TcpStream`'s own `poll_shutdown` does).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&self.0.socket, rustix::net::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }
}
