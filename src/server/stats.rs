//! Server counters: connections, frames, and everything refused or dropped.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections open now (HTTP and WebSocket).
    pub connections: usize,
    /// WebSocket connections accepted since start.
    pub websocket_accepted: u64,
    /// WebSocket handshakes refused (400/403/404/426/500/503).
    pub websocket_rejected: u64,
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
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) websocket_accepted: AtomicU64,
    pub(crate) websocket_rejected: AtomicU64,
    pub(crate) handshake_timeouts: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) rejected_limit: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) slow_drops: AtomicU64,
    pub(crate) slow_closes: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) ping_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self, connections: usize) -> ServerStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStats {
            connections,
            websocket_accepted: r(&self.websocket_accepted),
            websocket_rejected: r(&self.websocket_rejected),
            handshake_timeouts: r(&self.handshake_timeouts),
            http_requests: r(&self.http_requests),
            rejected_limit: r(&self.rejected_limit),
            accept_errors: r(&self.accept_errors),
            frames_in: r(&self.frames_in),
            frames_out: r(&self.frames_out),
            slow_drops: r(&self.slow_drops),
            slow_closes: r(&self.slow_closes),
            protocol_errors: r(&self.protocol_errors),
            handler_errors: r(&self.handler_errors),
            ping_timeouts: r(&self.ping_timeouts),
        }
    }
}
