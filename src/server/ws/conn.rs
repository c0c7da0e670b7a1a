//! One WebSocket connection: the task that owns its socket, its consumer and its inbox.
//!
//! The task runs in three phases. **Handshake**: the consumer's `connect` runs while the HTTP
//! request waits for its answer; an accept (from the consumer, or a `websocket.accept` sent to
//! its reply channel) becomes the 101, a close becomes 403, an error 500, and silence past the
//! accept timeout 403. **Open**: one poll loop reads frames, drains the inbox, runs handlers one at
//! a time and writes queued frames, all without locks on the socket. **Closed**: the consumer's
//! `disconnect` runs, its groups are left, its tasks are aborted and the inbox is closed.
//!
//! What an idle open connection holds is deliberately small: the socket, an `Arc` to its mailbox,
//! the consumer (boxed), a decoder with no buffer, and no timer. Reads go into a per-thread
//! scratch buffer; keep-alive pings are driven by the server's sweeper, which raises a signal on
//! connections that have been quiet for the ping interval.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::codec::{Decoder, FrameHead, Incoming, Limits, OpCode, close_code, close_payload};
use super::outlet::{Outlet, OutletIo};
use crate::consumer::{Command, DynConsumer, Event, Frame, HandlerFuture, Outgoing};
use crate::layer::{DropReason, Inbox, Mailbox, Signal};
use crate::message::Message;
use crate::scope::Scope;
use crate::server::config::OverflowPolicy;
use crate::server::stats::HandshakeFailure;
use crate::server::watchdog::PollTimer;
use crate::server::{Shared, coarse_secs};

/// Size of the per-thread read buffer: one read takes at most this much from a socket.
const SCRATCH: usize = 64 * 1024;

/// Frames handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Events one poll hands to the consumer before the task yields to the others. A handler that
/// finishes without awaiting (a group send to a local room does) would otherwise let one
/// connection with a backlog of client messages run thousands of group sends in a row, while
/// the members it sends to cannot run to drain their mailboxes (which then overflow). 64 stays
/// under the default channel capacity (100): each member drains its whole mailbox when it runs,
/// so one flooding sender cannot overflow it within a round of the scheduler. It is also the
/// most a member gets to write per round from that sender; measured on a 1,000-member room,
/// 16 capped the batches and the room's rate at about half of what 64 sustains.
const EVENTS_PER_POLL: u8 = 64;

thread_local! {
    pub(super) static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// How the handshake ended, sent to the HTTP side that answers the upgrade request.
#[derive(Debug)]
pub(crate) enum Decision {
    Accept {
        subprotocol: Option<String>,
        headers: Vec<(String, String)>,
    },
    /// Refused with this HTTP status (403 deny or timeout, 500 error, 503 shutting down).
    Reject(u16, HandshakeFailure),
}

/// One queued outbound frame: an inline header and a shared payload.
struct OutFrame {
    head: FrameHead,
    payload: Bytes,
}

/// Frames waiting for the socket; allocated only while something is queued.
#[derive(Default)]
struct WriteQueue {
    frames: VecDeque<OutFrame>,
    /// Bytes of the front frame (head then payload) already written.
    written: usize,
    /// Bytes queued in all frames.
    bytes: usize,
}

/// Frames up to this size (header included) are copied into one buffer by [`gather`]; a larger
/// one is written from where it lies.
pub(super) const GATHER_PART: usize = 4096 + 14;

impl WriteQueue {
    /// How many frames at the front have begun going out and must go out whole: the front
    /// frame once part of it is written, or a [`Command::Remainder`] (the rest of frames begun
    /// by a direct write). The overflow policy never drops those.
    fn started(&self) -> usize {
        usize::from(self.written > 0 || self.frames.front().is_some_and(|f| f.head.is_none()))
    }

    /// The unwritten parts of the queued frames as I/O slices (at most `MAX_IOVECS`).
    fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_IOVECS]) -> usize {
        let mut n = 0;
        let mut skip = self.written;
        for frame in self.frames.iter() {
            if n + 2 > MAX_IOVECS {
                break;
            }
            for part in [frame.head.as_slice(), &frame.payload[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices[n] = IoSlice::new(&part[skip..]);
                skip = 0;
                n += 1;
            }
        }
        n
    }

    /// Drops `written` bytes from the front of the queue (whole frames, then part of one).
    fn consume(&mut self, mut written: usize) {
        self.bytes = self.bytes.saturating_sub(written);
        while written > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let total = front.head.as_slice().len() + front.payload.len();
            let left = total - self.written;
            if written >= left {
                written -= left;
                self.written = 0;
                self.frames.pop_front();
            } else {
                self.written += written;
                written = 0;
            }
        }
    }
}

/// Copies the unwritten bytes of the first queued frames into `buf`, whole frames in order,
/// as long as each is small and fits; returns how many bytes it copied (0: write the queue
/// with `writev`).
fn gather(queue: &WriteQueue, buf: &mut [u8]) -> usize {
    let mut len = 0;
    let mut skip = queue.written;
    for frame in queue.frames.iter() {
        let (head, payload) = (frame.head.as_slice(), &frame.payload[..]);
        let left = head.len() + payload.len() - skip;
        if left > GATHER_PART || len + left > buf.len() {
            break;
        }
        for part in [head, payload] {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            let part = &part[skip..];
            skip = 0;
            buf[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
    }
    len
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Open,
    /// Our close frame is queued or sent; waiting for the client's.
    Closing,
    /// No more reading; flush what is queued and end.
    Closed,
}

enum Slot {
    Idle(Box<dyn DynConsumer>),
    Busy(HandlerFuture),
    /// A handler panicked: no more handlers run, but the consumer is kept for its
    /// `groups()`, which the connection leaves when it ends.
    Crashed(Box<dyn DynConsumer>),
    /// The consumer panicked; it is gone.
    Gone,
}

pub(crate) struct Conn {
    shared: Arc<Shared>,
    scope: Scope,
    /// The reply channel's mailbox, out of its [`Inbox`] (one pointer instead of three); the
    /// connection releases it from the registry when dropped.
    mailbox: Arc<Mailbox>,
    slot: Slot,
    pending: Backlog,
    decoder: Decoder,
    out: Option<Box<WriteQueue>>,
    /// What few open connections use, allocated on first use and freed when empty.
    rare: Option<Box<Rare>>,
    phase: Phase,
    accepted: bool,
    close_sent: bool,
    /// The code reported to `disconnect`.
    close_code: u16,
    ping_outstanding: bool,
    ping_sent: u32,
    /// Bytes this connection last reported into the server's memory budget.
    reported: u32,
    /// Whether this connection's messages count in the server's totals.
    metered: bool,
    /// Handler runs started in the current poll (at most [`EVENTS_PER_POLL`]).
    handled: u8,
    /// Layer message types written straight to the socket ([`WebsocketConsumer::FASTLANE`];
    /// a thin pointer, as this struct is per connection).
    ///
    /// [`WebsocketConsumer::FASTLANE`]: crate::consumer::WebsocketConsumer::FASTLANE
    fastlane: &'static &'static [&'static str],
}

/// The part of a connection's state that an idle open connection does not use. Kept out of
/// [`Conn`] so the open connection's task stays within tokio's 256-byte task cell (the size
/// test in `ws/mod.rs` says why that matters).
#[derive(Default)]
struct Rare {
    /// When the running handler is cut off (`handler_timeout`); the timer is reused.
    handler_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When a closing connection is dropped if the client does not finish the close.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Accept headers and subprotocol wait here until the handshake answer is sent.
    decision: Option<Decision>,
    /// Start (coarse seconds) of the current one-second window of the message rate limit.
    rate_window: u32,
    /// Client messages received in that window.
    rate_count: u32,
    /// The client address counted against `max_connections_per_ip` (see [`ConnGuard`]).
    ///
    /// [`ConnGuard`]: crate::server::ConnGuard
    ip: Option<Box<std::net::IpAddr>>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.handler_deadline.is_none()
            && self.deadline.is_none()
            && self.decision.is_none()
            && self.rate_window == 0
            && self.rate_count == 0
            && self.ip.is_none()
    }
}

/// Events waiting for the consumer. Most connections never queue one (an event for an idle
/// consumer starts its handler at once), so the queue is boxed and exists only while a
/// backlog does: an idle connection holds one null pointer here.
#[derive(Default)]
#[allow(
    clippy::box_collection,
    reason = "one pointer per connection instead of four"
)]
struct Backlog(Option<Box<VecDeque<Event>>>);

impl Backlog {
    fn push_back(&mut self, event: Event) {
        self.0.get_or_insert_with(Box::default).push_back(event);
    }

    /// The next event; the queue is freed with the last one.
    fn pop_front(&mut self) -> Option<Event> {
        let queue = self.0.as_mut()?;
        let event = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        event
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn clear(&mut self) {
        self.0 = None;
    }

    fn retain(&mut self, keep: impl FnMut(&Event) -> bool) {
        if let Some(queue) = self.0.as_mut() {
            queue.retain(keep);
            if queue.is_empty() {
                self.0 = None;
            }
        }
    }
}

impl Drop for Conn {
    /// Closes the reply channel and removes it from the registry (what dropping its
    /// [`Inbox`] does).
    fn drop(&mut self) {
        self.shared.layer.local().release(&self.mailbox);
    }
}

/// What ended a handler run.
enum HandlerOutcome {
    Ok,
    Failed(String),
    Panicked,
    /// The handler ran past `handler_timeout` and was dropped (with the consumer).
    TimedOut,
}

impl Conn {
    pub(crate) fn new(
        shared: Arc<Shared>,
        scope: Scope,
        inbox: Inbox,
        consumer: Box<dyn DynConsumer>,
        metered: bool,
        fastlane: &'static &'static [&'static str],
    ) -> Conn {
        Conn {
            shared,
            scope,
            mailbox: inbox.into_mailbox(),
            slot: Slot::Idle(consumer),
            pending: Backlog::default(),
            decoder: Decoder::new(),
            out: None,
            rare: None,
            phase: Phase::Open,
            accepted: false,
            close_sent: false,
            close_code: close_code::ABNORMAL,
            ping_outstanding: false,
            ping_sent: 0,
            reported: 0,
            metered,
            fastlane,
            handled: 0,
        }
    }

    /// The rarely used state, allocated now if it was not.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the rarely used state once nothing is left in it.
    fn trim_rare(&mut self) {
        if self.rare.as_deref().is_some_and(Rare::is_empty) {
            self.rare = None;
        }
    }

    /// The frame limits from the server's configuration.
    fn limits(&self) -> Limits {
        Limits {
            max_frame_size: self.shared.config.max_frame_size,
            max_message_size: self.shared.config.max_message_size,
        }
    }

    /// The deadline of a closing connection, if one is set.
    fn close_deadline(&mut self) -> Option<&mut Pin<Box<tokio::time::Sleep>>> {
        self.rare.as_deref_mut()?.deadline.as_mut()
    }

    /// Takes the connection's count (and its client-address count, if one is kept) over from
    /// the handshake's guard: the open connection holds it from now on and gives it back with
    /// [`Conn::resume_guard`].
    pub(crate) fn adopt_guard(&mut self, guard: crate::server::ConnGuard) {
        if let Some(ip) = guard.into_ip() {
            self.rare().ip = Some(ip);
        }
    }

    /// A guard holding this connection's count again (dropping it uncounts the connection).
    fn resume_guard(&mut self) -> crate::server::ConnGuard {
        let ip = self.rare.as_deref_mut().and_then(|rare| rare.ip.take());
        crate::server::ConnGuard::resume(self.shared.clone(), ip)
    }

    // ---------------------------------------------------------------- handlers

    fn start_handler(&mut self, event: Event) {
        let slot = std::mem::replace(&mut self.slot, Slot::Gone);
        match slot {
            Slot::Idle(consumer) => {
                let layer = self.shared.layer.clone();
                let fut = crate::server::watchdog::with_server(
                    self.shared.clone(),
                    crate::seed::with_layer(layer, consumer.handle(event)),
                );
                self.slot = Slot::Busy(Box::pin(fut));
                if let Some(limit) = self.shared.config.handler_timeout {
                    let at = tokio::time::Instant::now() + limit;
                    let rare = self.rare();
                    match rare.handler_deadline.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(at),
                        None => {
                            rare.handler_deadline = Some(Box::pin(tokio::time::sleep_until(at)))
                        }
                    }
                }
            }
            other => self.slot = other,
        }
    }

    /// Polls a running handler; on completion puts the consumer back and reports the outcome.
    fn poll_handler(&mut self, cx: &mut TaskContext<'_>) -> Option<HandlerOutcome> {
        let Slot::Busy(fut) = &mut self.slot else {
            return None;
        };
        let timer = PollTimer::start(&self.shared);
        let result = AssertUnwindSafe(fut.as_mut()).catch_unwind().poll_unpin(cx);
        if let Some(held) = timer.overran(&self.shared) {
            tracing::warn!(
                path = self.scope.path(),
                held_ms = held.as_millis() as u64,
                "a consumer handler held a worker thread without yielding; blocking code \
                 belongs in tokio::task::spawn_blocking"
            );
        }
        match result {
            Poll::Pending => {
                // Only a handler that yields can be cut off here: one that never returns from
                // a poll holds its worker thread, and nothing in Rust can preempt it.
                if let Some(deadline) = self
                    .rare
                    .as_deref_mut()
                    .and_then(|rare| rare.handler_deadline.as_mut())
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    self.slot = Slot::Gone;
                    return Some(HandlerOutcome::TimedOut);
                }
                None
            }
            Poll::Ready(Ok((consumer, Ok(result)))) => {
                self.slot = Slot::Idle(consumer);
                Some(match result {
                    Ok(()) => HandlerOutcome::Ok,
                    Err(e) => HandlerOutcome::Failed(e.to_string()),
                })
            }
            Poll::Ready(Ok((consumer, Err(_panic)))) => {
                self.slot = Slot::Crashed(consumer);
                Some(HandlerOutcome::Panicked)
            }
            Poll::Ready(Err(_panic)) => {
                self.slot = Slot::Gone;
                Some(HandlerOutcome::Panicked)
            }
        }
    }

    fn report(&self, outcome: &HandlerOutcome) {
        match outcome {
            HandlerOutcome::Ok => {}
            HandlerOutcome::Failed(e) => {
                tracing::error!(path = self.scope.path(), error = %e, "consumer failed");
                self.shared
                    .stats
                    .handler_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            HandlerOutcome::Panicked => {
                tracing::error!(path = self.scope.path(), "consumer panicked");
                self.shared
                    .stats
                    .handler_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
            HandlerOutcome::TimedOut => {
                tracing::error!(
                    path = self.scope.path(),
                    timeout = ?self.shared.config.handler_timeout,
                    "handler ran past the handler timeout; cancelled"
                );
                self.shared
                    .stats
                    .handler_timeouts
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    // ---------------------------------------------------------------- handshake

    /// Runs `connect` until the consumer accepts, refuses, fails or times out.
    pub(crate) async fn handshake(&mut self) -> Decision {
        self.start_handler(Event::Connect);
        let timeout = tokio::time::sleep(self.shared.config.accept_timeout);
        tokio::pin!(timeout);
        std::future::poll_fn(|cx| {
            if let Some(d) = self.poll_handshake(cx) {
                return Poll::Ready(d);
            }
            if timeout.as_mut().poll(cx).is_ready() {
                tracing::warn!(
                    path = self.scope.path(),
                    "consumer neither accepted nor denied within the accept timeout"
                );
                self.shared
                    .stats
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Decision::Reject(403, HandshakeFailure::Timeout));
            }
            Poll::Pending
        })
        .await
    }

    fn poll_handshake(&mut self, cx: &mut TaskContext<'_>) -> Option<Decision> {
        self.mailbox.register(cx);
        loop {
            if self.mailbox.take_signals() & Signal::Shutdown as u8 != 0 {
                return Some(Decision::Reject(503, HandshakeFailure::ShuttingDown));
            }
            if let Some(outcome) = self.poll_handler(cx) {
                self.report(&outcome);
                if !matches!(outcome, HandlerOutcome::Ok) {
                    return Some(Decision::Reject(500, HandshakeFailure::Error));
                }
            }
            self.absorb_all();
            if let Some(decision) = self.rare.as_deref_mut().and_then(|r| r.decision.take()) {
                self.trim_rare();
                return Some(decision);
            }
            if matches!(self.slot, Slot::Busy(_)) {
                // The handler is pending; its waker is registered.
                return None;
            }
            // connect returned without deciding: a decision may still come through the inbox.
            if self.mailbox.has_messages() {
                continue;
            }
            return None;
        }
    }

    /// Takes layer messages and socket commands under one lock and applies them (socket
    /// commands act on the socket, the rest queue up as events for the consumer).
    fn absorb_all(&mut self) {
        let taken = self.shared.layer.local().take_all(&self.mailbox);
        self.count_expired(taken.expired);
        if taken.messages.len() > 1 && self.accepted && self.phase == Phase::Open {
            // Most become frames (a busy room's fastlane): room for them at once rather than
            // growing the queue by doubling.
            let queue = self.out.get_or_insert_with(Box::default);
            queue.frames.reserve(taken.messages.len());
        }
        for env in taken.messages {
            self.apply_message(env.message);
        }
        for command in taken.commands {
            self.apply_command(command);
        }
    }

    fn count_expired(&self, expired: u64) {
        if expired > 0 {
            self.shared.layer.local().counters().drop(
                DropReason::Expired,
                expired,
                &self.channel_name(),
            );
        }
    }

    /// The one rule for layer messages: `websocket.send` / `websocket.accept` /
    /// `websocket.close` act on the socket; every other type goes to the consumer.
    fn apply_message(&mut self, message: Message) {
        let kind = message.kind();
        if self.metered {
            self.shared.stats.layer.received.count(kind);
        }
        match kind {
            Some("websocket.send") => {
                // Channels 1: sending content before accepting accepts.
                if message.get("accept").and_then(|v| v.as_bool()) == Some(true) || !self.accepted {
                    self.apply_command(Command::Accept {
                        subprotocol: None,
                        headers: Vec::new(),
                    });
                }
                self.send_content(&message);
                if let Some(close) = message.get("close") {
                    let code = match close.as_i64() {
                        Some(code) => u16::try_from(code).unwrap_or(close_code::NORMAL),
                        None if close.as_bool() == Some(true) => close_code::NORMAL,
                        None => return,
                    };
                    self.apply_command(Command::Close {
                        code,
                        reason: String::new(),
                    });
                }
            }
            Some("websocket.accept") => {
                let subprotocol = message
                    .get("subprotocol")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned);
                self.apply_command(Command::Accept {
                    subprotocol,
                    headers: Vec::new(),
                });
            }
            Some("websocket.close") => {
                let code = message
                    .get("code")
                    .and_then(|v| v.as_i64())
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(close_code::NORMAL);
                let reason = message
                    .get("reason")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_owned();
                self.apply_command(Command::Close { code, reason });
            }
            Some(kind) if self.fastlane.contains(&kind) => {
                if self.accepted {
                    self.send_content(&message);
                } else if self.phase == Phase::Open {
                    // Held until the accept (a group may be joined before it), then sent.
                    self.pending.push_back(Event::Layer(message));
                }
            }
            _ => {
                if self.phase == Phase::Open {
                    self.queue_event(Event::Layer(message));
                }
            }
        }
    }

    /// Hands an event to the consumer: at once when it is idle and nothing waits before it (no
    /// queue is allocated for the usual one-at-a-time traffic), else behind the others.
    fn queue_event(&mut self, event: Event) {
        if self.accepted
            && self.pending.is_empty()
            && matches!(self.slot, Slot::Idle(_))
            && self.handled < EVENTS_PER_POLL
        {
            self.handled += 1;
            self.start_handler(event);
        } else {
            self.pending.push_back(event);
        }
    }

    /// Sends the fastlane messages that arrived before the accept, in their order.
    fn release_fastlane(&mut self) {
        if self.fastlane.is_empty() || self.pending.is_empty() {
            return;
        }
        let fastlane: &[&str] = self.fastlane;
        let mut held = Vec::new();
        self.pending.retain(|e| match e {
            Event::Layer(m) if m.kind().is_some_and(|k| fastlane.contains(&k)) => {
                held.push(m.clone());
                false
            }
            _ => true,
        });
        for message in held {
            self.send_content(&message);
        }
    }

    /// Writes a message's `text` (a text frame) or `bytes` (a binary frame) to the client.
    fn send_content(&mut self, message: &Message) {
        if let Some(text) = message.text_value("text") {
            self.apply_command(Command::Send(Outgoing::Text(text.clone())));
        } else if let Ok(bytes) = message.bytes("bytes") {
            self.apply_command(Command::Send(Outgoing::Binary(bytes.clone())));
        } else {
            tracing::warn!(
                path = self.scope.path(),
                kind = message.kind(),
                "a message for the socket without text or bytes was ignored"
            );
        }
    }

    fn apply_command(&mut self, command: Command) {
        match command {
            Command::Accept {
                subprotocol,
                headers,
            } => {
                if !self.accepted {
                    self.accepted = true;
                    self.rare().decision = Some(Decision::Accept {
                        subprotocol,
                        headers,
                    });
                    self.release_fastlane();
                }
            }
            Command::Send(outgoing) => {
                if self.phase != Phase::Open {
                    return;
                }
                if !self.accepted {
                    tracing::warn!(
                        path = self.scope.path(),
                        "send before accept: the message was dropped"
                    );
                    return;
                }
                let (opcode, payload) = match outgoing {
                    Outgoing::Text(t) => (OpCode::Text, t.into_bytes()),
                    Outgoing::Binary(b) => (OpCode::Binary, b),
                };
                if self.metered {
                    self.shared.stats.frames_out.fetch_add(1, Ordering::Relaxed);
                }
                self.enqueue(opcode, payload, false);
            }
            Command::Remainder(rest) => {
                if self.phase == Phase::Closed {
                    return;
                }
                // Ahead of everything queued: its frames are on the wire already, in part.
                // Nothing of this connection's own was written since it armed its mailbox
                // (it arms only with nothing queued), so nothing queued has begun either.
                let queue = self.out.get_or_insert_with(Box::default);
                debug_assert_eq!(queue.written, 0, "a remainder behind a frame begun");
                queue.bytes += rest.len();
                queue.frames.push_front(OutFrame {
                    head: FrameHead::none(),
                    payload: rest,
                });
            }
            Command::Close { code, reason } => {
                if !self.accepted {
                    if self.rare.as_ref().is_none_or(|r| r.decision.is_none()) {
                        self.accepted = true; // nothing more to decide
                        self.rare().decision =
                            Some(Decision::Reject(403, HandshakeFailure::Denied));
                    }
                    return;
                }
                let code = if super::codec::is_valid_close_code(code) {
                    code
                } else {
                    close_code::NORMAL
                };
                self.start_close(code, &reason);
            }
        }
    }

    // ---------------------------------------------------------------- writing

    /// Queues a frame, applying the overflow policy to data frames (control frames always fit).
    fn enqueue(&mut self, opcode: OpCode, payload: Bytes, control: bool) {
        let cfg = &self.shared.config;
        let queue = self.out.get_or_insert_with(Box::default);
        let len = payload.len();
        // A client that floods pings without reading would grow the queue without bound with
        // pongs. Past the bounds, answer only the most recent ping (RFC 6455 §5.5.3 allows
        // it): the newest unsent pong takes the new payload.
        if opcode == OpCode::Pong
            && (queue.bytes + len > cfg.max_outbound_bytes
                || queue.frames.len() >= cfg.max_outbound_messages)
        {
            let start = queue.started();
            if let Some(pong) = queue
                .frames
                .iter_mut()
                .skip(start)
                .rev()
                .find(|f| f.head.as_slice().first() == Some(&(0x80 | OpCode::Pong.as_u8())))
            {
                queue.bytes = queue.bytes + len - pong.payload.len();
                pong.head = FrameHead::new(OpCode::Pong, len);
                pong.payload = payload;
                self.shared
                    .stats
                    .pongs_coalesced
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // One message always fits an empty queue, whatever its size (it is bounded by the
        // message size limit already); the bounds are about messages piling up.
        if !control
            && !queue.frames.is_empty()
            && (queue.bytes + len > cfg.max_outbound_bytes
                || queue.frames.len() >= cfg.max_outbound_messages)
        {
            match cfg.overflow {
                OverflowPolicy::DropNewest => {
                    self.slow_drop(1);
                    return;
                }
                OverflowPolicy::DropOldest => {
                    // Never drop the front frame once it started going out.
                    let start = queue.started();
                    let mut dropped = 0;
                    while (queue.bytes + len > cfg.max_outbound_bytes
                        || queue.frames.len() >= cfg.max_outbound_messages)
                        && queue.frames.len() > start
                    {
                        if let Some(old) = queue.frames.remove(start) {
                            queue.bytes -= old.head.as_slice().len() + old.payload.len();
                            dropped += 1;
                        }
                    }
                    self.slow_drop(dropped);
                    let queue = self.out.get_or_insert_with(Box::default);
                    if queue.bytes + len > cfg.max_outbound_bytes {
                        self.slow_drop(1);
                        return;
                    }
                    return self.push_frame(opcode, payload);
                }
                OverflowPolicy::Close => {
                    if !self.close_sent {
                        tracing::warn!(
                            path = self.scope.path(),
                            client = ?self.scope.client(),
                            "client too slow: outbound queue full, closing with 1008"
                        );
                        self.shared
                            .stats
                            .slow_closes
                            .fetch_add(1, Ordering::Relaxed);
                        self.slow_drop(1);
                        self.start_close(close_code::POLICY, "client too slow");
                    }
                    return;
                }
            }
        }
        self.push_frame(opcode, payload);
    }

    fn push_frame(&mut self, opcode: OpCode, payload: Bytes) {
        let queue = self.out.get_or_insert_with(Box::default);
        let head = FrameHead::new(opcode, payload.len());
        queue.bytes += head.as_slice().len() + payload.len();
        queue.frames.push_back(OutFrame { head, payload });
    }

    fn slow_drop(&self, n: u64) {
        if n > 0 {
            let total = self.shared.stats.slow_drops.fetch_add(n, Ordering::Relaxed) + n;
            tracing::debug!(
                path = self.scope.path(),
                dropped = n,
                total,
                "slow client: messages dropped"
            );
        }
    }

    /// Writes queued frames until the socket would block. `Err` means the socket is dead.
    ///
    /// Small frames, one or several, are copied into the thread's scratch buffer and written
    /// with one `write`: a member of a busy room that falls behind then catches up with one
    /// system call for hundreds of messages (uWebSockets corks the same way), where a vectored
    /// write stops at 32 frames and costs the kernel per piece; and for a lone frame the
    /// kernel's `send` path is cheaper than `writev` of its header and payload (measured in
    /// docs/BENCHMARKS.md). Large frames go out with `writev`, uncopied.
    fn poll_flush<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut TaskContext<'_>,
        io: &mut S,
    ) -> Result<(), ()> {
        loop {
            let Some(queue) = self.out.as_deref_mut() else {
                return Ok(());
            };
            if queue.frames.is_empty() {
                self.out = None;
                return Ok(());
            }
            let result = SCRATCH_BUF.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let len = gather(queue, &mut scratch[..]);
                if len == 0 {
                    None
                } else {
                    Some(Pin::new(&mut *io).poll_write(cx, &scratch[..len]))
                }
            });
            let result = match result {
                Some(result) => result,
                None => {
                    let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
                    let n = queue.slices(&mut slices);
                    Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
                }
            };
            match result {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(_)) | Poll::Ready(Ok(0)) => return Err(()),
                Poll::Ready(Ok(written)) => queue.consume(written),
            }
        }
    }

    // ---------------------------------------------------------------- closing

    fn start_close(&mut self, code: u16, reason: &str) {
        if self.close_sent || self.phase == Phase::Closed {
            return;
        }
        self.close_sent = true;
        self.close_code = code;
        self.phase = Phase::Closing;
        self.pending.clear();
        self.enqueue(OpCode::Close, close_payload(code, reason), true);
        let timeout = self.shared.config.close_timeout;
        self.rare().deadline = Some(Box::pin(tokio::time::sleep(timeout)));
    }

    fn set_closed(&mut self) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.pending.clear();
            if self.close_deadline().is_none() {
                let timeout = self.shared.config.close_timeout;
                self.rare().deadline = Some(Box::pin(tokio::time::sleep(timeout)));
            }
        }
    }

    // ---------------------------------------------------------------- reading

    /// With a memory budget: reports what this connection buffers (outbound queue and partial
    /// inbound frame) into the server's total, and if the total is over the budget while this
    /// connection holds more than an even share of it, closes it with 1008 and frees its
    /// buffers. Returns true when it closed the connection (the task must be polled again).
    fn account_memory(&mut self) -> bool {
        let Some(budget) = self.shared.config.memory_budget else {
            return false;
        };
        let holding = self.report_memory();
        if self.close_sent || self.shared.buffered.load(Ordering::Relaxed) <= budget {
            return false;
        }
        let share = budget / self.shared.connections.load(Ordering::Relaxed).max(1);
        if holding <= share {
            return false;
        }
        tracing::warn!(
            path = self.scope.path(),
            client = ?self.scope.client(),
            holding,
            budget,
            "server over its memory budget: closing one of the largest holders with 1008"
        );
        self.shared
            .stats
            .memory_closes
            .fetch_add(1, Ordering::Relaxed);
        if let Some(queue) = self.out.as_mut() {
            // Keep only a frame that started going out; the close frame follows it.
            let keep = queue.started();
            queue.frames.truncate(keep);
            queue.bytes = queue
                .frames
                .iter()
                .map(|f| f.head.as_slice().len() + f.payload.len())
                .sum();
        }
        self.decoder.abandon();
        self.start_close(close_code::POLICY, "server memory budget exceeded");
        self.set_closed();
        self.report_memory();
        true
    }

    /// Updates this connection's share of the server's buffered bytes; returns what it holds.
    fn report_memory(&mut self) -> usize {
        let holding = self.out.as_ref().map_or(0, |q| q.bytes) + self.decoder.buffered();
        let now = u32::try_from(holding).unwrap_or(u32::MAX);
        if now > self.reported {
            self.shared
                .buffered
                .fetch_add((now - self.reported) as usize, Ordering::Relaxed);
        } else if now < self.reported {
            self.shared
                .buffered
                .fetch_sub((self.reported - now) as usize, Ordering::Relaxed);
        }
        self.reported = now;
        holding
    }

    /// Takes this connection's bytes out of the server's total (it is ending).
    fn release_memory(&mut self) {
        if self.reported > 0 {
            self.shared
                .buffered
                .fetch_sub(self.reported as usize, Ordering::Relaxed);
            self.reported = 0;
        }
    }

    /// Counts one client message against `max_messages_per_second`; true when it is over
    /// (the connection is then closed with 1008). Windows are whole seconds of the coarse
    /// clock, so a burst straddling a boundary may pass up to twice the limit.
    fn over_rate(&mut self) -> bool {
        let Some(limit) = self.shared.config.max_messages_per_second else {
            return false;
        };
        let now = coarse_secs();
        let rare = self.rare();
        if now != rare.rate_window {
            rare.rate_window = now;
            rare.rate_count = 0;
        }
        rare.rate_count = rare.rate_count.saturating_add(1);
        if rare.rate_count <= limit {
            return false;
        }
        if !self.close_sent {
            tracing::warn!(
                path = self.scope.path(),
                client = ?self.scope.client(),
                limit,
                "client over the message rate limit, closing with 1008"
            );
            self.shared
                .stats
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            self.start_close(close_code::POLICY, "message rate limit exceeded");
        }
        true
    }

    fn on_incoming(&mut self, event: Incoming) {
        if matches!(event, Incoming::Text(_) | Incoming::Binary(_)) && self.over_rate() {
            return;
        }
        match event {
            Incoming::Text(text) => {
                if self.metered {
                    self.shared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                }
                if self.phase == Phase::Open {
                    self.queue_event(Event::Frame(Frame::Text(text)));
                }
            }
            Incoming::Binary(bytes) => {
                if self.metered {
                    self.shared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                }
                if self.phase == Phase::Open {
                    self.queue_event(Event::Frame(Frame::Binary(bytes)));
                }
            }
            Incoming::Ping(payload) => {
                if !self.close_sent {
                    self.enqueue(OpCode::Pong, payload, true);
                }
            }
            Incoming::Pong(_) => self.ping_outstanding = false,
            Incoming::Close(frame) => {
                if self.close_sent {
                    // Our close was answered: the closing handshake is complete.
                    self.set_closed();
                } else {
                    let (code, echo) = match &frame {
                        Some((code, _)) => (*code, *code),
                        None => (close_code::NO_STATUS, close_code::NORMAL),
                    };
                    self.enqueue(OpCode::Close, close_payload(echo, ""), true);
                    self.close_sent = true;
                    self.close_code = code;
                    self.set_closed();
                }
            }
        }
    }

    /// Reads once into the thread's scratch buffer and decodes. `Ready(false)`: the peer is
    /// gone (EOF or error).
    fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut TaskContext<'_>,
        io: &mut S,
    ) -> Poll<bool> {
        let mut events = Vec::new();
        let limits = self.limits();
        let result = SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Ok(false)),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Ok(false)),
                Poll::Ready(Ok(())) => Poll::Ready(
                    self.decoder
                        .feed(&limits, buf.filled(), &mut events)
                        .map(|()| true),
                ),
            }
        });
        if let Poll::Ready(Ok(true)) | Poll::Ready(Err(_)) = &result {
            self.mailbox
                .activity
                .store(coarse_secs(), Ordering::Relaxed);
        }
        for event in events {
            self.on_incoming(event);
        }
        match result {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(alive)) => Poll::Ready(alive),
            Poll::Ready(Err(e)) => {
                tracing::debug!(path = self.scope.path(), error = %e, "protocol error from client");
                self.shared
                    .stats
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                if !self.close_sent {
                    self.enqueue(OpCode::Close, close_payload(e.close_code(), ""), true);
                    self.close_sent = true;
                    self.close_code = e.close_code();
                }
                self.set_closed();
                Poll::Ready(true)
            }
        }
    }

    /// Handles bytes hyper read past the handshake (a client that did not wait for the 101).
    pub(crate) fn feed_early(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut events = Vec::new();
        let limits = self.limits();
        if let Err(e) = self.decoder.feed(&limits, bytes, &mut events) {
            self.enqueue(OpCode::Close, close_payload(e.close_code(), ""), true);
            self.close_sent = true;
            self.close_code = e.close_code();
            self.set_closed();
        }
        for event in events {
            self.on_incoming(event);
        }
    }

    fn keepalive(&mut self) {
        let now = coarse_secs();
        let cfg = &self.shared.config;
        let quiet = now.saturating_sub(self.mailbox.activity.load(Ordering::Relaxed));
        if self.ping_outstanding {
            if now.saturating_sub(self.ping_sent) >= cfg.ping_timeout.as_secs() as u32 {
                tracing::info!(
                    path = self.scope.path(),
                    "no pong within the ping timeout; dropping"
                );
                self.shared
                    .stats
                    .ping_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                self.close_code = close_code::ABNORMAL;
                self.phase = Phase::Closed;
                self.out = None;
            }
        } else if quiet >= cfg.ping_interval.as_secs() as u32 && self.phase == Phase::Open {
            self.ping_outstanding = true;
            self.ping_sent = now;
            self.enqueue(OpCode::Ping, Bytes::new(), true);
        }
    }

    // ---------------------------------------------------------------- open loop

    /// For a plain TCP socket: when the consumer has a fastlane (and the connection counts in
    /// the server's totals, as all but the dashboard's own do), the socket goes into an
    /// [`Outlet`] that the mailbox shares, so a pass of wakes can write to it (see
    /// `Mailbox::write_through`); otherwise it is handed back as it is.
    pub(crate) fn share_socket(
        &self,
        socket: tokio::net::TcpStream,
    ) -> Result<OutletIo, tokio::net::TcpStream> {
        if self.fastlane.is_empty() || !self.metered {
            return Err(socket);
        }
        let outlet = Outlet::new(socket, self.shared.clone());
        self.mailbox.attach_outlet(outlet.clone(), self.fastlane);
        Ok(OutletIo(outlet))
    }

    /// Stamps the connection as active now (its keep-alive clock starts at the upgrade).
    pub(crate) fn mark_open(&self) {
        self.mailbox
            .activity
            .store(coarse_secs(), Ordering::Relaxed);
    }

    fn poll_open<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut TaskContext<'_>,
        io: &mut S,
    ) -> Poll<()> {
        self.mailbox.register(cx);
        self.handled = 0;
        let mut yielding = false;
        loop {
            // Pushes while this poll runs (the handler's own sends, a group send from this
            // connection's handler) need not wake the task: end_poll looks before it sleeps.
            self.mailbox.begin_poll();
            // `again`: what happened may have made more work for this same loop (bytes read,
            // a handler done). Taking from the mailbox and writing do not: after them the
            // mailbox is asked once more, under its lock, before the task sleeps.
            let mut again = false;

            let signals = self.mailbox.take_signals();
            if signals & Signal::Shutdown as u8 != 0 {
                self.start_close(close_code::GOING_AWAY, "server shutting down");
            }
            if signals & Signal::Tick as u8 != 0 {
                self.keepalive();
            }

            if self.phase != Phase::Closed
                && self.pending.len() < self.shared.config.max_pending_events
            {
                match self.poll_read(cx, io) {
                    Poll::Ready(true) => again = true,
                    Poll::Ready(false) => {
                        // EOF or reset without a close frame.
                        if !self.close_sent {
                            self.close_code = close_code::ABNORMAL;
                        }
                        self.phase = Phase::Closed;
                        self.out = None;
                    }
                    Poll::Pending => {}
                }
            }

            if self.phase != Phase::Closed {
                self.absorb_all();
            }

            if let Some(outcome) = self.poll_handler(cx) {
                again = true;
                self.report(&outcome);
                if !matches!(outcome, HandlerOutcome::Ok) {
                    self.start_close(close_code::INTERNAL, "");
                }
            }
            if self.phase == Phase::Open
                && matches!(self.slot, Slot::Idle(_))
                && !self.pending.is_empty()
            {
                if self.handled < EVENTS_PER_POLL
                    && let Some(event) = self.pending.pop_front()
                {
                    self.handled += 1;
                    self.start_handler(event);
                    continue;
                }
                yielding = true;
            }

            if self.poll_flush(cx, io).is_err() {
                self.phase = Phase::Closed;
                self.out = None;
            }

            if self.phase == Phase::Closed && self.out.is_none() {
                self.mailbox.end_poll(false);
                return Poll::Ready(());
            }
            if let Some(deadline) = self.close_deadline()
                && deadline.as_mut().poll(cx).is_ready()
            {
                // The peer did not answer our close (or would not take our last bytes).
                self.mailbox.end_poll(false);
                return Poll::Ready(());
            }
            if yielding {
                // Back of the run queue; what is pending is handled in the next poll.
                self.mailbox.end_poll(self.may_write_through());
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !again {
                let more = self.mailbox.end_poll(self.may_write_through());
                // A closed connection takes nothing more from its mailbox.
                if !more || self.phase == Phase::Closed {
                    return Poll::Pending;
                }
            }
        }
    }

    /// Whether a pass of wakes may write this connection's layer messages to its socket while
    /// it sleeps (see `Mailbox::write_through`): open, accepted, and nothing of its own
    /// queued, so those frames cannot come between frames of its own.
    fn may_write_through(&self) -> bool {
        self.out.is_none() && self.accepted && self.phase == Phase::Open && !self.close_sent
    }

    // ---------------------------------------------------------------- the end

    /// After the socket is done: let a running handler finish (sends now fail), run
    /// `disconnect`, leave the groups, abort the consumer's tasks.
    ///
    /// The groups to leave are asked of the consumer again (`groups()`, as Channels reads its
    /// `groups` attribute again in `websocket_disconnect`) rather than kept from the join: an
    /// open connection then holds no list. A consumer that panicked is still asked; one whose
    /// handler was cancelled (handler or app close timeout) is gone with its future, and its
    /// memberships are left to the layer (the memory layer drops members whose channel is
    /// closed at the next send to the group; Redis lets them expire after `group_expiry`, as
    /// channels_redis does for a consumer that died).
    pub(crate) async fn finish(mut self) {
        self.shared.layer.local().close_early(&self.mailbox);
        if matches!(self.slot, Slot::Busy(_)) && !self.await_handler().await {
            tracing::warn!(
                path = self.scope.path(),
                "handler still running after the connection closed; cancelled"
            );
            self.slot = Slot::Gone;
        }
        let joined = self.declared_groups();
        if (self.accepted || !joined.is_empty()) && matches!(self.slot, Slot::Idle(_)) {
            self.start_handler(Event::Disconnect(self.close_code));
            if !self.await_handler().await {
                tracing::warn!(path = self.scope.path(), "disconnect handler timed out");
            }
        }
        let channel = self.channel_name();
        for group in joined {
            if let Err(e) = self.shared.layer.group_discard(&group, &channel).await {
                tracing::warn!(group, error = %e, "could not leave group on disconnect");
            }
        }
        if let Slot::Idle(consumer) | Slot::Crashed(consumer) = &mut self.slot {
            consumer.context().abort_tasks();
        }
        if self.accepted && self.shared.config.access_log {
            tracing::info!(
                target: "canal::access",
                "{} - - \"WSDISCONNECT {}\" {}",
                fmt_peer(self.scope.client()),
                crate::server::auth::logged_target(
                    self.scope.path(),
                    Some(self.scope.query_string())
                ),
                self.close_code
            );
        }
    }

    /// Lets the running handler finish within the app close timeout, reporting its outcome.
    /// False when it did not finish in time.
    async fn await_handler(&mut self) -> bool {
        let grace = self.shared.config.app_close_timeout;
        let done = tokio::time::timeout(
            grace,
            std::future::poll_fn(|cx| match self.poll_handler(cx) {
                Some(outcome) => Poll::Ready(outcome),
                None => Poll::Pending,
            }),
        )
        .await;
        match done {
            Ok(outcome) => {
                self.report(&outcome);
                true
            }
            Err(_) => false,
        }
    }

    /// Groups from the consumer's `groups()`: joined before connect, left at the end. A
    /// `groups()` that panics counts as none.
    pub(crate) fn declared_groups(&self) -> Vec<String> {
        match &self.slot {
            Slot::Idle(consumer) | Slot::Crashed(consumer) => {
                std::panic::catch_unwind(AssertUnwindSafe(|| consumer.groups())).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    pub(crate) fn channel_name(&self) -> String {
        self.shared.layer.local().name_of(self.mailbox.id())
    }

    /// Starts closing with 1001 (server going away).
    pub(crate) fn shutdown_now(&mut self) {
        self.start_close(close_code::GOING_AWAY, "server shutting down");
    }
}

pub(crate) fn fmt_peer(peer: Option<std::net::SocketAddr>) -> String {
    peer.map_or_else(|| "-".to_owned(), |p| p.to_string())
}

/// An open connection as a task of its own: exactly the connection state and its socket, so an
/// idle connection's task is no bigger than that (a compiler-built `async fn` state machine
/// would also keep room for every other phase).
///
/// The connection counts against the limits until its cleanup is done: the open connection
/// holds the count ([`Conn::adopt_guard`]) and the cleanup holds it as a guard.
pub(crate) struct OpenTask<S> {
    state: TaskState<S>,
}

/// The open loop, then the cleanup; one or the other, so the task is sized to the larger.
enum TaskState<S> {
    Open {
        conn: Conn,
        io: S,
    },
    /// Shutdown of the socket and the consumer's cleanup, once the socket is done.
    Tail(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

impl<S> OpenTask<S> {
    pub(crate) fn new(mut conn: Conn, io: S, guard: crate::server::ConnGuard) -> Self {
        conn.mark_open();
        conn.adopt_guard(guard);
        OpenTask {
            state: TaskState::Open { conn, io },
        }
    }
}

impl<S> Drop for OpenTask<S> {
    fn drop(&mut self) {
        if let TaskState::Open { conn, .. } = &mut self.state {
            conn.release_memory();
            drop(conn.resume_guard());
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Future for OpenTask<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let TaskState::Open { conn, io, .. } = &mut this.state {
            if conn.poll_open(cx, io).is_pending() {
                if conn.account_memory() {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
            conn.release_memory();
            let guard = conn.resume_guard();
            let TaskState::Open { conn, mut io } =
                std::mem::replace(&mut this.state, TaskState::Done)
            else {
                return Poll::Ready(());
            };
            this.state = TaskState::Tail(Box::pin(async move {
                // Best effort: tell the peer we are done writing.
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    tokio::io::AsyncWriteExt::shutdown(&mut io),
                )
                .await;
                drop(io);
                let shared = conn.shared.clone();
                conn.finish().await;
                shared
                    .stats
                    .websocket_closed
                    .fetch_add(1, Ordering::Relaxed);
                drop(guard);
            }));
        }
        if let TaskState::Tail(tail) = &mut this.state
            && tail.as_mut().poll(cx).is_pending()
        {
            return Poll::Pending;
        }
        this.state = TaskState::Done;
        Poll::Ready(())
    }
}

/// Waits for the HTTP side to deliver the upgraded socket.
pub(crate) async fn finish_upgrade(on_upgrade: hyper::upgrade::OnUpgrade) -> Option<Upgraded> {
    let upgraded = match tokio::time::timeout(Duration::from_secs(10), on_upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
        Err(_) => return None,
    };
    let upgraded = match upgraded.downcast::<hyper_util::rt::TokioIo<tokio::net::TcpStream>>() {
        Ok(parts) => return Some(Upgraded::Tcp(parts.io.into_inner(), parts.read_buf)),
        Err(other) => other,
    };
    Some(
        match upgraded.downcast::<hyper_util::rt::TokioIo<tokio::net::UnixStream>>() {
            Ok(parts) => Upgraded::Unix(parts.io.into_inner(), parts.read_buf),
            Err(other) => Upgraded::Other(hyper_util::rt::TokioIo::new(other)),
        },
    )
}

/// The socket after the upgrade: the raw TCP stream when possible (no hyper wrapper kept).
pub(crate) enum Upgraded {
    Tcp(tokio::net::TcpStream, Bytes),
    Unix(tokio::net::UnixStream, Bytes),
    Other(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
    Duplex(tokio::io::DuplexStream),
}

/// Sends the handshake decision; false if the HTTP side is gone.
pub(crate) fn decide(tx: oneshot::Sender<Decision>, decision: Decision) -> bool {
    tx.send(decision).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(payloads: &[&[u8]]) -> (WriteQueue, Vec<u8>) {
        let mut q = WriteQueue::default();
        let mut wire = Vec::new();
        for p in payloads {
            let head = FrameHead::new(OpCode::Text, p.len());
            wire.extend_from_slice(head.as_slice());
            wire.extend_from_slice(p);
            q.bytes += head.as_slice().len() + p.len();
            q.frames.push_back(OutFrame {
                head,
                payload: Bytes::copy_from_slice(p),
            });
        }
        (q, wire)
    }

    /// What a socket taking `limit` bytes per write would receive from the gather path (with
    /// `writev` for what gather leaves), until the queue is empty.
    fn drain(mut q: WriteQueue, buf_len: usize, limit: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; buf_len];
        while !q.frames.is_empty() {
            let len = gather(&q, &mut buf);
            let chunk: Vec<u8> = if len > 0 {
                buf[..len].to_vec()
            } else {
                let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
                let n = q.slices(&mut slices);
                slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
            };
            let n = chunk.len().min(limit);
            out.extend_from_slice(&chunk[..n]);
            q.consume(n);
        }
        assert_eq!(q.bytes, 0);
        out
    }

    #[test]
    fn gathered_and_vectored_writes_put_the_frames_on_the_wire_in_order() {
        let big = vec![7u8; GATHER_PART + 100];
        let payloads: Vec<&[u8]> = vec![b"a", b"bc", &big, b"", b"def", &big, b"g"];
        let (q, wire) = queue(&payloads);
        for (buf_len, limit) in [(64 * 1024, usize::MAX), (64 * 1024, 5), (16, 3), (8, 1)] {
            let (q2, _) = queue(&payloads);
            assert_eq!(
                drain(q2, buf_len, limit),
                wire,
                "buffer {buf_len}, writes of {limit}"
            );
        }
        // Small frames go out in one gathered write; a large one stops the gathering.
        let mut buf = vec![0u8; 64 * 1024];
        assert_eq!(gather(&q, &mut buf), 2 + 1 + 2 + 2);
    }
}
