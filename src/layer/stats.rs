//! Counters for what the layer delivered and dropped. Nothing is dropped silently: every drop
//! increments a counter here and is logged, at most once a second per reason so that a flood of
//! drops cannot flood the log too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// A `group_send` member was full (a direct `send` gets `ChannelFull` instead, and counts here too).
    ChannelFull,
    /// The message stayed unread past its expiry.
    Expired,
    /// The addressed process-local channel no longer exists (its connection closed).
    NoReceiver,
    /// The backend failed to take the message.
    Backend,
}

impl DropReason {
    /// A short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::ChannelFull => "channel_full",
            DropReason::Expired => "expired",
            DropReason::NoReceiver => "no_receiver",
            DropReason::Backend => "backend",
        }
    }

    const ALL: [DropReason; 4] = [
        DropReason::ChannelFull,
        DropReason::Expired,
        DropReason::NoReceiver,
        DropReason::Backend,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// A snapshot of a layer's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerStats {
    /// Messages accepted by `send` (not counting group deliveries).
    pub sent: u64,
    /// Calls to `group_send`.
    pub group_sends: u64,
    /// Deliveries made by `group_send` (one per member reached).
    pub group_deliveries: u64,
    /// Messages dropped because a channel was full.
    pub dropped_full: u64,
    /// Messages dropped because they expired unread.
    pub dropped_expired: u64,
    /// Messages addressed to a local channel that no longer exists.
    pub dropped_no_receiver: u64,
    /// Messages lost to a backend error.
    pub dropped_backend: u64,
    /// Group memberships removed because they expired or their channel died.
    pub memberships_expired: u64,
}

impl LayerStats {
    /// All drops, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_full + self.dropped_expired + self.dropped_no_receiver + self.dropped_backend
    }
}

/// Live counters (lock-free).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) group_sends: AtomicU64,
    pub(crate) group_deliveries: AtomicU64,
    dropped: [AtomicU64; 4],
    last_log: [AtomicU64; 4],
    pub(crate) memberships_expired: AtomicU64,
}

impl Counters {
    /// Counts `n` drops and logs one line per reason per second at most.
    pub(crate) fn drop(&self, reason: DropReason, n: u64, channel: &str) {
        if n == 0 {
            return;
        }
        let total = self.dropped[reason.index()].fetch_add(n, Ordering::Relaxed) + n;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = &self.last_log[reason.index()];
        let prev = last.load(Ordering::Relaxed);
        if prev != now
            && last
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                reason = reason.label(),
                channel,
                dropped = n,
                total,
                "channel layer dropped messages"
            );
        }
    }

    pub(crate) fn snapshot(&self) -> LayerStats {
        let d = |r: DropReason| self.dropped[r.index()].load(Ordering::Relaxed);
        debug_assert_eq!(DropReason::ALL.len(), self.dropped.len());
        LayerStats {
            sent: self.sent.load(Ordering::Relaxed),
            group_sends: self.group_sends.load(Ordering::Relaxed),
            group_deliveries: self.group_deliveries.load(Ordering::Relaxed),
            dropped_full: d(DropReason::ChannelFull),
            dropped_expired: d(DropReason::Expired),
            dropped_no_receiver: d(DropReason::NoReceiver),
            dropped_backend: d(DropReason::Backend),
            memberships_expired: self.memberships_expired.load(Ordering::Relaxed),
        }
    }
}
