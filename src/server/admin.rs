//! The live dashboard (`/admin/`, off unless turned on, guarded by a token).
//!
//! A sampler task reads the server's counters once a second and keeps the last five minutes
//! of samples, so a dashboard opened now still shows the minutes before. The page connects to
//! `{admin}ws` and gets the whole history first, then one update a second: connections, messages
//! in and out per second, groups with their member counts, the busiest groups (by group sends
//! over the last ten seconds), slow-client drops, layer drops and errors.
//!
//! Per-group traffic is counted only while the dashboard is on, in a map bounded to
//! [`MAX_TRACKED_GROUPS`] names (later groups are counted together as `(other)`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use super::Shared;
use crate::consumer::{Context, WebsocketConsumer};

/// The dashboard page.
pub(crate) const ADMIN_HTML: &str = include_str!("../../static/admin.html");

/// Samples kept: one a second for five minutes.
const HISTORY: usize = 300;
/// The window over which the busiest groups are ranked, in samples (seconds).
const BUSY_WINDOW: usize = 10;
/// Distinct group names whose traffic is counted; the rest are counted as `(other)`.
pub(crate) const MAX_TRACKED_GROUPS: usize = 1024;
const OTHER_GROUPS: &str = "(other)";

/// Group sends per group, bounded.
#[derive(Default)]
pub(crate) struct GroupTraffic {
    counts: Mutex<HashMap<Box<str>, u64>>,
}

impl GroupTraffic {
    pub(crate) fn count(&self, group: &str) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(group) {
            *n += 1;
        } else if counts.len() < MAX_TRACKED_GROUPS {
            counts.insert(group.into(), 1);
        } else {
            *counts.entry(OTHER_GROUPS.into()).or_insert(0) += 1;
        }
    }

    fn snapshot(&self) -> HashMap<Box<str>, u64> {
        self.counts.lock().clone()
    }
}

/// One second of the server's life, as the dashboard shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Sample {
    /// Unix time, milliseconds.
    t: u64,
    connections: usize,
    websockets: u64,
    messages_in: u64,
    messages_out: u64,
    in_per_sec: f64,
    out_per_sec: f64,
    slow_drops: u64,
    slow_closes: u64,
    layer_errors: u64,
    layer_dropped: u64,
    group_sends: u64,
}

#[derive(Debug, Clone, Serialize)]
struct GroupSize {
    name: String,
    members: usize,
}

#[derive(Debug, Clone, Serialize)]
struct Busy {
    name: String,
    sends: u64,
    per_sec: f64,
}

/// What one update carries besides the latest sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Update {
    sample: Sample,
    group_count: usize,
    groups: Vec<GroupSize>,
    busiest: Vec<Busy>,
    dropped: HashMap<&'static str, u64>,
    handshake_failures: u64,
    layer_shared: bool,
}

/// The dashboard's state inside a server.
pub(crate) struct Admin {
    pub(crate) traffic: Arc<GroupTraffic>,
    history: Mutex<VecDeque<Sample>>,
    latest: watch::Sender<Option<Arc<Update>>>,
}

impl Admin {
    pub(crate) fn new() -> Self {
        Admin {
            traffic: Arc::new(GroupTraffic::default()),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            latest: watch::channel(None).0,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Once a second: sample the counters, keep the history, publish an update.
pub(crate) async fn sampler(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(tokio::time::Instant, u64, u64)> = None;
    let mut windows: VecDeque<HashMap<Box<str>, u64>> = VecDeque::with_capacity(BUSY_WINDOW + 1);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.shutdown.is_cancelled() {
            return;
        }
        let Some(admin) = &shared.admin else {
            return;
        };
        let now = tokio::time::Instant::now();
        let s = shared
            .stats
            .snapshot(shared.connections.load(Ordering::Relaxed));
        let l = shared.layer.stats();
        let (in_per_sec, out_per_sec) = match last {
            Some((at, fin, fout)) => {
                let secs = now.duration_since(at).as_secs_f64().max(0.001);
                (
                    s.frames_in.saturating_sub(fin) as f64 / secs,
                    s.frames_out.saturating_sub(fout) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        last = Some((now, s.frames_in, s.frames_out));
        let sample = Sample {
            t: unix_ms(),
            connections: s.connections,
            websockets: s.websocket_accepted.saturating_sub(s.websocket_closed),
            messages_in: s.frames_in,
            messages_out: s.frames_out,
            in_per_sec,
            out_per_sec,
            slow_drops: s.slow_drops,
            slow_closes: s.slow_closes,
            layer_errors: s.layer_errors.iter().map(|(_, n)| n).sum(),
            layer_dropped: l.dropped(),
            group_sends: l.group_sends,
        };
        {
            let mut history = admin.history.lock();
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(sample.clone());
        }
        // Busiest groups: sends over the last BUSY_WINDOW seconds.
        let current = admin.traffic.snapshot();
        let oldest = windows.front();
        let window_secs = windows.len().max(1) as f64;
        let mut busiest: Vec<Busy> = current
            .iter()
            .map(|(name, n)| {
                let before = oldest.and_then(|o| o.get(name)).copied().unwrap_or(0);
                let sends = n.saturating_sub(before);
                Busy {
                    name: name.to_string(),
                    sends,
                    per_sec: sends as f64 / window_secs,
                }
            })
            .filter(|b| b.sends > 0)
            .collect();
        busiest.sort_by(|a, b| b.sends.cmp(&a.sends).then_with(|| a.name.cmp(&b.name)));
        busiest.truncate(5);
        if windows.len() == BUSY_WINDOW {
            windows.pop_front();
        }
        windows.push_back(current);

        let mut groups: Vec<GroupSize> = shared
            .layer
            .group_sizes()
            .unwrap_or_default()
            .into_iter()
            .map(|(name, members)| GroupSize { name, members })
            .collect();
        let group_count = groups.len();
        groups.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.name.cmp(&b.name)));
        groups.truncate(50);
        let dropped = HashMap::from([
            ("channel_full", l.dropped_full),
            ("expired", l.dropped_expired),
            ("no_receiver", l.dropped_no_receiver),
            ("backend", l.dropped_backend),
            ("slow_client", s.slow_drops),
        ]);
        let update = Update {
            sample,
            group_count,
            groups,
            busiest,
            dropped,
            handshake_failures: s.websocket_rejected,
            layer_shared: shared.layer.is_shared(),
        };
        admin.latest.send_replace(Some(Arc::new(update)));
    }
}

/// The dashboard's WebSocket: the history first, then one update a second.
pub(crate) struct AdminSocket {
    pub(crate) shared: Weak<Shared>,
}

impl WebsocketConsumer for AdminSocket {
    async fn connect(&mut self, cx: &mut Context) -> crate::Result<()> {
        let Some(shared) = self.shared.upgrade() else {
            return cx.close(1001, "server shutting down").await;
        };
        let Some(admin) = &shared.admin else {
            return cx.close(1008, "dashboard off").await;
        };
        cx.accept().await?;
        let history: Vec<Sample> = admin.history.lock().iter().cloned().collect();
        cx.send_json(&serde_json::json!({ "history": history }))
            .await?;
        let mut updates = admin.latest.subscribe();
        let handle = cx.handle();
        drop(shared);
        cx.spawn(async move {
            loop {
                if updates.changed().await.is_err() {
                    return;
                }
                let update = updates.borrow_and_update().clone();
                if let Some(update) = update
                    && handle.send_json(&*update).is_err()
                {
                    return;
                }
            }
        });
        Ok(())
    }
}
