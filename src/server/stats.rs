//! Server counters: connections, frames, layer traffic as this server sees it, and everything
//! refused or dropped.
//!
//! Every label set here is bounded: handshake failures have a fixed list of reasons, and layer
//! message types are the built-in `websocket.*` types plus those the app declares with
//! [`App::message_type`](crate::App::message_type); any other type is counted as `other`, so
//! a type chosen by a client never creates a new time series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a WebSocket handshake did not end in 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// A malformed upgrade request (method, HTTP version, `Connection`, key): 400.
    BadRequest,
    /// A WebSocket version other than 13: 426.
    BadVersion,
    /// No route matched: 404.
    NotFound,
    /// The consumer's static `check` refused the scope (its status).
    Refused,
    /// The consumer closed before accepting: 403.
    Denied,
    /// The consumer neither accepted nor denied within the accept timeout: 403.
    Timeout,
    /// The consumer failed or panicked in `connect`: 500.
    Error,
    /// The server was shutting down: 503.
    ShuttingDown,
    /// The `Origin` is not this server's host nor an allowed origin: 403.
    Origin,
    /// A missing (where a user is required), malformed, wrongly signed or expired token: 403.
    Auth,
}

impl HandshakeFailure {
    /// Every reason, in a stable order.
    pub const ALL: [HandshakeFailure; 10] = [
        HandshakeFailure::BadRequest,
        HandshakeFailure::BadVersion,
        HandshakeFailure::NotFound,
        HandshakeFailure::Refused,
        HandshakeFailure::Denied,
        HandshakeFailure::Timeout,
        HandshakeFailure::Error,
        HandshakeFailure::ShuttingDown,
        HandshakeFailure::Origin,
        HandshakeFailure::Auth,
    ];

    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::BadRequest => "bad_request",
            HandshakeFailure::BadVersion => "bad_version",
            HandshakeFailure::NotFound => "not_found",
            HandshakeFailure::Refused => "refused",
            HandshakeFailure::Denied => "denied",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Error => "error",
            HandshakeFailure::ShuttingDown => "shutting_down",
            HandshakeFailure::Origin => "origin",
            HandshakeFailure::Auth => "auth",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The message types every server counts under their own label.
pub const BUILTIN_MESSAGE_TYPES: [&str; 3] =
    ["websocket.send", "websocket.accept", "websocket.close"];

/// The label for message types nobody declared.
pub const OTHER_TYPE: &str = "other";

/// Upper bounds (seconds) of the layer latency histogram buckets (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// A layer operation whose duration is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerOp {
    /// `send` to one channel.
    Send,
    /// `group_send`.
    GroupSend,
}

impl LayerOp {
    /// Both operations, in a stable order.
    pub const ALL: [LayerOp; 2] = [LayerOp::Send, LayerOp::GroupSend];

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            LayerOp::Send => "send",
            LayerOp::GroupSend => "group_send",
        }
    }
}

/// A snapshot of a latency histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Histogram {
    /// Observations per bucket of [`LATENCY_BUCKETS`] (not cumulative), then the `+Inf` bucket.
    pub buckets: Vec<u64>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations, in nanoseconds.
    pub sum_nanos: u64,
}

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections open now (HTTP and WebSocket).
    pub connections: usize,
    /// WebSocket connections accepted since start.
    pub websocket_accepted: u64,
    /// Accepted WebSocket connections that have ended since start.
    pub websocket_closed: u64,
    /// WebSocket handshakes refused (400/403/404/426/500/503), all reasons together.
    pub websocket_rejected: u64,
    /// WebSocket handshakes refused, by reason (every reason of [`HandshakeFailure::ALL`]).
    pub handshake_failures: Vec<(&'static str, u64)>,
    /// Consumers that neither accepted nor denied in time.
    pub handshake_timeouts: u64,
    /// HTTP requests answered.
    pub http_requests: u64,
    /// Connections refused because the connection limit was reached.
    pub rejected_limit: u64,
    /// Accept calls that failed for lack of resources (EMFILE …).
    pub accept_errors: u64,
    /// Messages received from clients.
    pub frames_in: u64,
    /// Messages queued to clients.
    pub frames_out: u64,
    /// Of `frames_out`, layer messages that a group send's pass of wakes wrote straight to a
    /// sleeping connection's socket, without running the connection's task.
    pub frames_out_direct: u64,
    /// Those direct writes that the socket took only in part (the connection's task wrote
    /// the rest).
    pub direct_partial_writes: u64,
    /// Messages dropped because a client read too slowly.
    pub slow_drops: u64,
    /// Connections closed with 1008 because they read too slowly.
    pub slow_closes: u64,
    /// Clients that broke the protocol.
    pub protocol_errors: u64,
    /// Consumer handlers that failed or panicked.
    pub handler_errors: u64,
    /// Clients dropped for not answering pings.
    pub ping_timeouts: u64,
    /// Pongs not sent because a newer ping from a client that does not read replaced them.
    pub pongs_coalesced: u64,
    /// Requests refused with 400 for a bad header name or value.
    pub bad_headers: u64,
    /// Connections closed with 1008 for passing `max_messages_per_second`.
    pub rate_limited: u64,
    /// Handlers cancelled for running past `handler_timeout` (their connection gets 1011).
    pub handler_timeouts: u64,
    /// TLS handshakes that failed or timed out.
    pub tls_failures: u64,
    /// WebSockets closed with 1008 because the server was over its memory budget.
    pub memory_closes: u64,
    /// Handler polls that held a worker thread longer than the blocking threshold.
    pub blocking_polls: u64,
    /// Bytes buffered by WebSocket connections as they last reported (with a memory budget).
    pub buffered_bytes: u64,
    /// Connections refused with 503 for passing `max_connections_per_ip`.
    pub rejected_per_ip: u64,
    /// Messages this server put into the layer (`send` and `group_send`), by type label.
    pub layer_sent: Vec<(String, u64)>,
    /// Layer messages delivered to this server's connections, by type label.
    pub layer_received: Vec<(String, u64)>,
    /// Layer calls from this server that returned an error, by operation.
    pub layer_errors: Vec<(&'static str, u64)>,
    /// Duration of this server's layer calls, by operation.
    pub layer_latency: Vec<(&'static str, Histogram)>,
    /// Messages accepted by `POST /api/publish`.
    pub published: u64,
}

impl ServerStats {
    /// The count for one handshake failure reason.
    pub fn handshake_failure(&self, reason: HandshakeFailure) -> u64 {
        self.handshake_failures
            .iter()
            .find(|(label, _)| *label == reason.label())
            .map_or(0, |(_, n)| *n)
    }
}

/// Counts by message type, over a fixed list of type labels (the last one is `other`).
#[derive(Debug)]
pub(crate) struct TypeCounts {
    labels: Box<[Box<str>]>,
    counts: Box<[AtomicU64]>,
}

impl TypeCounts {
    fn new(declared: &[String]) -> Self {
        let mut labels: Vec<Box<str>> = BUILTIN_MESSAGE_TYPES.iter().map(|t| (*t).into()).collect();
        for t in declared {
            if t != OTHER_TYPE && !labels.iter().any(|l| **l == **t) {
                labels.push(t.as_str().into());
            }
        }
        labels.push(OTHER_TYPE.into());
        let counts = labels.iter().map(|_| AtomicU64::new(0)).collect();
        TypeCounts {
            labels: labels.into_boxed_slice(),
            counts,
        }
    }

    /// The label index for a type (`other` when it is not declared).
    pub(crate) fn index_of(&self, kind: Option<&str>) -> usize {
        let last = self.labels.len() - 1;
        kind.and_then(|k| self.labels[..last].iter().position(|l| **l == *k))
            .unwrap_or(last)
    }

    pub(crate) fn add(&self, index: usize) {
        if let Some(c) = self.counts.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count(&self, kind: Option<&str>) {
        self.add(self.index_of(kind));
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        self.labels
            .iter()
            .zip(self.counts.iter())
            .map(|(l, c)| (l.to_string(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

#[derive(Debug)]
struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

/// What the server records about its own layer calls.
#[derive(Debug)]
pub(crate) struct LayerMetrics {
    pub(crate) sent: TypeCounts,
    pub(crate) received: TypeCounts,
    errors: [AtomicU64; 2],
    latency: [LatencyHistogram; 2],
}

impl LayerMetrics {
    pub(crate) fn new(declared: &[String]) -> Self {
        LayerMetrics {
            sent: TypeCounts::new(declared),
            received: TypeCounts::new(declared),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| LatencyHistogram::default()),
        }
    }

    pub(crate) fn observe(&self, op: LayerOp, elapsed: Duration, ok: bool) {
        let i = op as usize;
        self.latency[i].observe(elapsed);
        if !ok {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) websocket_accepted: AtomicU64,
    pub(crate) websocket_closed: AtomicU64,
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) rejected_limit: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) frames_out_direct: AtomicU64,
    pub(crate) direct_partial_writes: AtomicU64,
    pub(crate) slow_drops: AtomicU64,
    pub(crate) slow_closes: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) ping_timeouts: AtomicU64,
    pub(crate) pongs_coalesced: AtomicU64,
    pub(crate) bad_headers: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) handler_timeouts: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) memory_closes: AtomicU64,
    pub(crate) blocking_polls: AtomicU64,
    pub(crate) rejected_per_ip: AtomicU64,
    pub(crate) published: AtomicU64,
    pub(crate) layer: std::sync::Arc<LayerMetrics>,
}

impl Counters {
    pub(crate) fn new(declared_types: &[String]) -> Self {
        let z = || AtomicU64::new(0);
        Counters {
            websocket_accepted: z(),
            websocket_closed: z(),
            handshake_failures: std::array::from_fn(|_| z()),
            handshake_timeouts: z(),
            http_requests: z(),
            rejected_limit: z(),
            accept_errors: z(),
            frames_in: z(),
            frames_out: z(),
            frames_out_direct: z(),
            direct_partial_writes: z(),
            slow_drops: z(),
            slow_closes: z(),
            protocol_errors: z(),
            handler_errors: z(),
            ping_timeouts: z(),
            pongs_coalesced: z(),
            bad_headers: z(),
            rate_limited: z(),
            handler_timeouts: z(),
            tls_failures: z(),
            memory_closes: z(),
            blocking_polls: z(),
            rejected_per_ip: z(),
            published: z(),
            layer: std::sync::Arc::new(LayerMetrics::new(declared_types)),
        }
    }

    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, connections: usize) -> ServerStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let handshake_failures: Vec<_> = HandshakeFailure::ALL
            .iter()
            .map(|f| (f.label(), r(&self.handshake_failures[f.index()])))
            .collect();
        ServerStats {
            connections,
            websocket_accepted: r(&self.websocket_accepted),
            websocket_closed: r(&self.websocket_closed),
            websocket_rejected: handshake_failures.iter().map(|(_, n)| n).sum(),
            handshake_failures,
            handshake_timeouts: r(&self.handshake_timeouts),
            http_requests: r(&self.http_requests),
            rejected_limit: r(&self.rejected_limit),
            accept_errors: r(&self.accept_errors),
            frames_in: r(&self.frames_in),
            frames_out: r(&self.frames_out),
            frames_out_direct: r(&self.frames_out_direct),
            direct_partial_writes: r(&self.direct_partial_writes),
            slow_drops: r(&self.slow_drops),
            slow_closes: r(&self.slow_closes),
            protocol_errors: r(&self.protocol_errors),
            handler_errors: r(&self.handler_errors),
            ping_timeouts: r(&self.ping_timeouts),
            pongs_coalesced: r(&self.pongs_coalesced),
            bad_headers: r(&self.bad_headers),
            rate_limited: r(&self.rate_limited),
            handler_timeouts: r(&self.handler_timeouts),
            tls_failures: r(&self.tls_failures),
            memory_closes: r(&self.memory_closes),
            blocking_polls: r(&self.blocking_polls),
            buffered_bytes: 0,
            rejected_per_ip: r(&self.rejected_per_ip),
            layer_sent: self.layer.sent.snapshot(),
            layer_received: self.layer.received.snapshot(),
            layer_errors: LayerOp::ALL
                .iter()
                .map(|op| (op.label(), r(&self.layer.errors[*op as usize])))
                .collect(),
            layer_latency: LayerOp::ALL
                .iter()
                .map(|op| (op.label(), self.layer.latency[*op as usize].snapshot()))
                .collect(),
            published: r(&self.published),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_types_fold_into_other() {
        let counts = TypeCounts::new(&["chat.message".to_owned()]);
        counts.count(Some("chat.message"));
        counts.count(Some("websocket.send"));
        for i in 0..50 {
            counts.count(Some(&format!("client.made.up.{i}")));
        }
        counts.count(None);
        let snap = counts.snapshot();
        assert_eq!(
            snap.len(),
            5,
            "three built-ins, one declared, other: {snap:?}"
        );
        let get = |l: &str| snap.iter().find(|(k, _)| k == l).map(|(_, n)| *n);
        assert_eq!(get("chat.message"), Some(1));
        assert_eq!(get("websocket.send"), Some(1));
        assert_eq!(get("other"), Some(51));
    }

    #[test]
    fn latency_lands_in_the_right_bucket() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_millis(2));
        h.observe(Duration::from_secs(9));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[5], 1, "2 ms is within the 5 ms bucket");
        assert_eq!(s.buckets[LATENCY_BUCKETS.len()], 1, "+Inf");
    }
}
