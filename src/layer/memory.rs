//! The in-memory channel layer: the default, for one process.
//!
//! Named channels are FIFO queues with waiting receivers; process-local channels are the
//! mailboxes of [`LocalChannels`]; groups map to their members with the time each joined. A
//! group send takes a cached snapshot of its members' mailboxes under the lock, then pushes one
//! shared [`Message`] to each with no lock held, so sending to N members costs N reference counts
//! and N wakes, not N copies. Above 512 members (256 on the multi-thread scheduler) the wakes
//! go out 128 at a time (`local::DeferredWakes`), and in a room of any size a sender that finds
//! a member's mailbox seven eighths full waits until that member has taken it.
//!
//! Expiry is enforced on every push and pop, and a janitor task (started when the layer is built
//! inside a Tokio runtime) sweeps every two seconds: expired messages are dropped and counted,
//! and, as Channels requires, a channel whose message expired unread leaves all its groups.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::local::{DeferredWakes, Envelope, Mailbox, Push, TOUCH_AHEAD};
use super::stats::{Counters, DropReason};
use super::{
    ChannelLayer, LayerConfig, LayerError, LayerStats, LocalChannels, check_outgoing, normalize,
    validate_channel, validate_group,
};
use crate::message::Message;

/// How often the janitor sweeps expired messages and memberships.
const JANITOR_PERIOD: Duration = Duration::from_secs(2);

/// A channel layer that lives in this process's memory (Channels' `InMemoryChannelLayer`,
/// without its bugs: capacity overrides work, and drops are counted).
#[derive(Clone)]
pub struct MemoryLayer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLayer")
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: LayerConfig,
    local: LocalChannels,
    named: Mutex<HashMap<Box<str>, Named>>,
    groups: Mutex<HashMap<Box<str>, Group>>,
}

struct Named {
    queue: VecDeque<Envelope>,
    notify: Arc<Notify>,
    capacity: usize,
    /// Receivers waiting right now; the entry is kept while any wait on its `notify`.
    waiters: usize,
}

/// One member of a group: 16 bytes, as there is one per connection in a room (a thin `Arc`
/// for the rare named member keeps the local ones from paying for a wide pointer).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Member {
    /// A mailbox of this process, by id (no name string kept per membership).
    Local(u64),
    /// Any other channel, by name.
    Named(Arc<String>),
}

/// Where a group send delivers (16 bytes a member, cached per group).
enum Target {
    /// A local mailbox (it knows its id).
    Local(Arc<Mailbox>),
    Named(Arc<String>),
}

#[derive(Default)]
struct Group {
    /// Member → moment of its latest `group_add` (layer clock, ms).
    members: HashMap<Member, u64>,
    /// Resolved delivery targets, rebuilt after membership changes.
    targets: Option<Arc<[Target]>>,
}

impl Default for MemoryLayer {
    fn default() -> Self {
        MemoryLayer::new(LayerConfig::default())
    }
}

impl MemoryLayer {
    /// A memory layer with `config`. Inside a Tokio runtime this also starts the janitor, which
    /// stops when the last clone of the layer is dropped.
    pub fn new(config: LayerConfig) -> Self {
        let process: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(12)
            .collect();
        let layer = MemoryLayer {
            inner: Arc::new(Inner {
                config,
                local: LocalChannels::new(&format!("inmemory.{process}")),
                named: Mutex::new(HashMap::new()),
                groups: Mutex::new(HashMap::new()),
            }),
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(janitor(Arc::downgrade(&layer.inner)));
        }
        layer
    }

    /// The layer's settings.
    pub fn config(&self) -> &LayerConfig {
        &self.inner.config
    }

    /// Group names with their member counts (for dashboards and room lists).
    pub fn group_sizes(&self) -> Vec<(String, usize)> {
        let groups = self.inner.groups.lock();
        let mut out: Vec<_> = groups
            .iter()
            .map(|(name, g)| (name.to_string(), g.members.len()))
            .collect();
        out.sort();
        out
    }

    /// Runs one janitor pass now (the janitor task does this every two seconds).
    pub fn sweep(&self) {
        self.inner.sweep();
    }
}

impl Inner {
    fn counters(&self) -> &Counters {
        self.local.counters()
    }

    fn expiry_ms(&self) -> u64 {
        self.config.expiry.as_millis() as u64
    }

    fn member_of(&self, channel: &str) -> Member {
        match self.local.parse(channel) {
            Some(id) => Member::Local(id),
            None => Member::Named(Arc::new(channel.to_owned())),
        }
    }

    fn channel_of(&self, member: &Member) -> String {
        match member {
            Member::Local(id) => self.local.name_of(*id),
            Member::Named(name) => name.to_string(),
        }
    }

    /// Pushes to a named channel; returns whether it was queued (false: full).
    fn push_named(&self, name: &str, message: Message, now: u64) -> bool {
        let mut expired = 0;
        let queued = {
            let mut named = self.named.lock();
            let entry = match named.get_mut(name) {
                Some(entry) => entry,
                None => named.entry(Box::from(name)).or_insert_with(|| Named {
                    queue: VecDeque::new(),
                    notify: Arc::new(Notify::new()),
                    capacity: self.config.capacity_for(name),
                    waiters: 0,
                }),
            };
            while entry.queue.front().is_some_and(|e| e.expires_ms <= now) {
                entry.queue.pop_front();
                expired += 1;
            }
            if entry.queue.len() >= entry.capacity {
                false
            } else {
                entry.queue.push_back(Envelope {
                    message,
                    expires_ms: now + self.expiry_ms(),
                });
                entry.notify.notify_one();
                true
            }
        };
        if expired > 0 {
            self.counters().drop(DropReason::Expired, expired, name);
            self.remove_from_groups(&Member::Named(Arc::new(name.to_owned())));
        }
        queued
    }

    fn push_local(
        &self,
        mailbox: &Arc<Mailbox>,
        message: Message,
        now: u64,
        wakes: Option<&mut DeferredWakes>,
    ) -> Push {
        let outcome = self
            .local
            .deliver_at(mailbox, message, now, self.expiry_ms(), wakes);
        if let Push::Queued { expired } | Push::Full { expired } = outcome
            && expired > 0
        {
            // A message expired unread: its channel leaves its groups, as Channels requires.
            self.remove_from_groups(&Member::Local(mailbox.id()));
        }
        outcome
    }

    fn remove_from_groups(&self, member: &Member) {
        let mut groups = self.groups.lock();
        let mut removed = 0;
        groups.retain(|_, group| {
            if group.members.remove(member).is_some() {
                group.targets = None;
                removed += 1;
            }
            !group.members.is_empty()
        });
        if removed > 0 {
            self.counters()
                .memberships_expired
                .fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn sweep(&self) {
        let now = self.local.now_ms();
        // Named channels: drop expired messages; each such channel leaves its groups.
        let mut expired_channels = Vec::new();
        {
            let mut named = self.named.lock();
            named.retain(|name, ch| {
                let mut n = 0;
                while ch.queue.front().is_some_and(|e| e.expires_ms <= now) {
                    ch.queue.pop_front();
                    n += 1;
                }
                if n > 0 {
                    expired_channels.push((name.to_string(), n));
                }
                !(ch.queue.is_empty() && ch.waiters == 0)
            });
        }
        for (name, n) in expired_channels {
            self.counters().drop(DropReason::Expired, n, &name);
            self.remove_from_groups(&Member::Named(Arc::new(name.clone())));
        }
        // Local mailboxes whose oldest message expired unread (a stuck consumer).
        for (id, expired) in self.local.purge_expired(now) {
            self.counters()
                .drop(DropReason::Expired, expired, &self.local.name_of(id));
            self.remove_from_groups(&Member::Local(id));
        }
        // Group memberships past group_expiry.
        let group_expiry = self.config.group_expiry.as_millis() as u64;
        let mut removed = 0u64;
        self.groups.lock().retain(|_, group| {
            let before = group.members.len();
            group
                .members
                .retain(|_, joined| joined.saturating_add(group_expiry) > now);
            if group.members.len() != before {
                removed += (before - group.members.len()) as u64;
                group.targets = None;
            }
            !group.members.is_empty()
        });
        if removed > 0 {
            self.counters()
                .memberships_expired
                .fetch_add(removed, std::sync::atomic::Ordering::Relaxed);
        }
        let expiry_secs = u32::try_from(self.config.expiry.as_secs()).unwrap_or(u32::MAX);
        self.local
            .sweep_detached((now / 1000) as u32, expiry_secs.saturating_mul(2));
    }
}

async fn janitor(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(JANITOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match inner.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl ChannelLayer for MemoryLayer {
    async fn send(&self, channel: &str, message: Message) -> Result<(), LayerError> {
        validate_channel(channel)?;
        check_outgoing(&message)?;
        let message = normalize(message);
        let inner = &self.inner;
        let now = inner.local.now_ms();
        if let Some(id) = inner.local.parse(channel) {
            let Some(mailbox) = inner.local.get(id) else {
                inner.counters().drop(DropReason::NoReceiver, 1, channel);
                return Ok(());
            };
            return match inner.push_local(&mailbox, message, inner.local.now_ms(), None) {
                Push::Queued { .. } => {
                    inner
                        .counters()
                        .sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
                Push::Full { .. } => {
                    inner.counters().drop(DropReason::ChannelFull, 1, channel);
                    Err(LayerError::ChannelFull(channel.to_owned()))
                }
                Push::Closed => {
                    inner.counters().drop(DropReason::NoReceiver, 1, channel);
                    Ok(())
                }
            };
        }
        if inner.push_named(channel, message, now) {
            inner
                .counters()
                .sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        } else {
            inner.counters().drop(DropReason::ChannelFull, 1, channel);
            Err(LayerError::ChannelFull(channel.to_owned()))
        }
    }

    async fn receive(&self, channel: &str) -> Result<Message, LayerError> {
        validate_channel(channel)?;
        let inner = &self.inner;
        if inner.local.is_local(channel) {
            return inner.local.receive(channel).await;
        }
        loop {
            let notify = {
                let now = inner.local.now_ms();
                let mut named = inner.named.lock();
                let entry = named.entry(Box::from(channel)).or_insert_with(|| Named {
                    queue: VecDeque::new(),
                    notify: Arc::new(Notify::new()),
                    capacity: inner.config.capacity_for(channel),
                    waiters: 0,
                });
                let mut expired = 0;
                while entry.queue.front().is_some_and(|e| e.expires_ms <= now) {
                    entry.queue.pop_front();
                    expired += 1;
                }
                if expired > 0 {
                    inner.counters().drop(DropReason::Expired, expired, channel);
                }
                if let Some(env) = entry.queue.pop_front() {
                    if !entry.queue.is_empty() {
                        // Pass the turn on: another waiter may take the next one.
                        entry.notify.notify_one();
                    }
                    return Ok(env.message);
                }
                entry.waiters += 1;
                entry.notify.clone()
            };
            let _guard = WaiterGuard { inner, channel };
            notify.notified().await;
        }
    }

    async fn new_channel(&self) -> Result<String, LayerError> {
        let capacity = self.inner.config.capacity_for(self.inner.local.prefix());
        Ok(self.inner.local.open_detached(capacity))
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group(group)?;
        validate_channel(channel)?;
        let inner = &self.inner;
        let member = inner.member_of(channel);
        let now = inner.local.now_ms();
        let mut groups = inner.groups.lock();
        let entry = match groups.get_mut(group) {
            Some(entry) => entry,
            None => groups.entry(Box::from(group)).or_default(),
        };
        if entry.members.insert(member, now).is_none() {
            entry.targets = None;
        }
        Ok(())
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group(group)?;
        validate_channel(channel)?;
        let inner = &self.inner;
        let member = inner.member_of(channel);
        let mut groups = inner.groups.lock();
        if let Some(entry) = groups.get_mut(group) {
            if entry.members.remove(&member).is_some() {
                entry.targets = None;
            }
            if entry.members.is_empty() {
                groups.remove(group);
            }
        }
        Ok(())
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<(), LayerError> {
        validate_group(group)?;
        check_outgoing(&message)?;
        let message = normalize(message);
        let inner = &self.inner;
        inner
            .counters()
            .group_sends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = inner.local.now_ms();
        let group_expiry = inner.config.group_expiry.as_millis() as u64;
        let targets = {
            let mut groups = inner.groups.lock();
            let Some(entry) = groups.get_mut(group) else {
                return Ok(());
            };
            let before = entry.members.len();
            entry
                .members
                .retain(|_, joined| joined.saturating_add(group_expiry) > now);
            if entry.members.len() != before {
                entry.targets = None;
                inner.counters().memberships_expired.fetch_add(
                    (before - entry.members.len()) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            match &entry.targets {
                Some(targets) => targets.clone(),
                None => {
                    let mut dead = Vec::new();
                    let mut targets = Vec::with_capacity(entry.members.len());
                    for member in entry.members.keys() {
                        match member {
                            Member::Local(id) => match inner.local.get(*id) {
                                Some(mb) => targets.push(Target::Local(mb)),
                                None => dead.push(member.clone()),
                            },
                            Member::Named(name) => targets.push(Target::Named(name.clone())),
                        }
                    }
                    for member in dead {
                        entry.members.remove(&member);
                    }
                    // Local members in the order their channels were made, which is mostly
                    // the order their connections came: a send then walks their mailboxes, and
                    // the kernel its sockets' file and socket objects, in the order they were
                    // allocated rather than in the map's hash order.
                    targets.sort_unstable_by_key(|target| match target {
                        Target::Local(mailbox) => (false, mailbox.id()),
                        Target::Named(_) => (true, 0),
                    });
                    let targets: Arc<[Target]> = targets.into();
                    entry.targets = Some(targets.clone());
                    if entry.members.is_empty() {
                        groups.remove(group);
                    }
                    targets
                }
            }
        };
        let mut delivered = 0u64;
        let mut full = 0u64;
        let mut gone = Vec::new();
        // A large room's wakes go out a chunk at a time, and a member found crowded holds the
        // sender back (see `DeferredWakes`).
        let mut wakes = DeferredWakes::for_room(targets.len());
        for chunk in targets.chunks(TOUCH_AHEAD) {
            // Bring the chunk's mailboxes into the cache together (see `Mailbox::touch`).
            for target in chunk {
                if let Target::Local(mailbox) = target {
                    mailbox.touch();
                }
            }
            for target in chunk {
                match target {
                    Target::Local(mailbox) => {
                        match inner.push_local(mailbox, message.clone(), now, Some(&mut wakes)) {
                            Push::Queued { .. } => delivered += 1,
                            Push::Full { .. } => full += 1,
                            Push::Closed => gone.push(Member::Local(mailbox.id())),
                        }
                    }
                    Target::Named(name) => {
                        if inner.push_named(name, message.clone(), now) {
                            delivered += 1;
                        } else {
                            full += 1;
                        }
                    }
                }
            }
        }
        inner
            .counters()
            .group_deliveries
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        if full > 0 {
            inner.counters().drop(DropReason::ChannelFull, full, group);
            tracing::debug!(group, full, "group_send skipped full members");
        }
        if !gone.is_empty() {
            let names: Vec<_> = gone.iter().map(|m| inner.channel_of(m)).collect();
            inner
                .counters()
                .drop(DropReason::NoReceiver, gone.len() as u64, group);
            tracing::debug!(
                group,
                ?names,
                "group members whose channel closed were removed"
            );
            for member in gone {
                inner.remove_from_groups(&member);
            }
        }
        inner.local.run_wakes(wakes).await;
        Ok(())
    }

    async fn flush(&self) -> Result<(), LayerError> {
        self.inner.named.lock().clear();
        self.inner.groups.lock().clear();
        self.inner.local.clear();
        Ok(())
    }

    fn local(&self) -> &LocalChannels {
        &self.inner.local
    }

    fn new_inbox(&self) -> super::Inbox {
        let capacity = self.inner.config.capacity_for(self.inner.local.prefix());
        self.inner.local.open(capacity)
    }

    fn group_sizes(&self) -> Option<Vec<(String, usize)>> {
        Some(MemoryLayer::group_sizes(self))
    }

    fn stats(&self) -> LayerStats {
        self.inner.counters().snapshot()
    }
}

/// Keeps a named channel's entry alive while a receiver waits on it, and lets it go after.
struct WaiterGuard<'a> {
    inner: &'a Inner,
    channel: &'a str,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        let mut named = self.inner.named.lock();
        if let Some(entry) = named.get_mut(self.channel) {
            entry.waiters = entry.waiters.saturating_sub(1);
            if entry.waiters == 0 && entry.queue.is_empty() {
                named.remove(self.channel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::layer::CapacityRule;
    use crate::layer::local::{DEFER_WAKES_ABOVE, MULTI_THREAD_DEFER_WAKES_ABOVE};
    use crate::msg;

    fn layer() -> MemoryLayer {
        MemoryLayer::new(LayerConfig::default().with_capacity(3))
    }

    #[tokio::test]
    async fn named_channels_are_fifo() {
        let l = layer();
        for i in 0..3 {
            l.send("jobs", msg! { "type": "job", "n": i })
                .await
                .unwrap();
        }
        for i in 0..3 {
            assert_eq!(l.receive("jobs").await.unwrap().int("n"), Ok(i));
        }
    }

    #[tokio::test]
    async fn full_channels_raise_channel_full_and_count_it() {
        let l = layer();
        for _ in 0..3 {
            l.send("jobs", msg! { "type": "job" }).await.unwrap();
        }
        let err = l.send("jobs", msg! { "type": "job" }).await.unwrap_err();
        assert_eq!(err, LayerError::ChannelFull("jobs".into()));
        assert_eq!(l.stats().dropped_full, 1);
        assert_eq!(l.stats().sent, 3);
    }

    #[tokio::test]
    async fn capacity_overrides_apply_per_channel() {
        let l = MemoryLayer::new(
            LayerConfig::default()
                .with_capacity(2)
                .with_channel_capacity(CapacityRule::glob("big.*", 5).unwrap()),
        );
        for _ in 0..5 {
            l.send("big.queue", msg! { "type": "x" }).await.unwrap();
        }
        assert!(l.send("big.queue", msg! { "type": "x" }).await.is_err());
        for _ in 0..2 {
            l.send("small", msg! { "type": "x" }).await.unwrap();
        }
        assert!(l.send("small", msg! { "type": "x" }).await.is_err());
    }

    #[tokio::test]
    async fn each_message_reaches_exactly_one_of_competing_receivers() {
        let l = MemoryLayer::new(LayerConfig::default().with_capacity(10_000));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let l = l.clone();
            workers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Ok(Ok(m)) =
                    tokio::time::timeout(Duration::from_millis(300), l.receive("work")).await
                {
                    got.push(m.int("n").unwrap());
                }
                got
            }));
        }
        for n in 0..1000 {
            l.send("work", msg! { "type": "job", "n": n })
                .await
                .unwrap();
            if n % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "none lost, none twice");
    }

    #[tokio::test(start_paused = true)]
    async fn messages_expire_and_take_their_channel_out_of_groups() {
        let l = MemoryLayer::default();
        let name = l.new_channel().await.unwrap();
        l.group_add("room", &name).await.unwrap();
        l.group_add("room", "named.member").await.unwrap();
        l.send(&name, msg! { "type": "old" }).await.unwrap();
        l.send("named.member", msg! { "type": "old" })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        l.sweep();
        assert_eq!(l.stats().dropped_expired, 2);
        assert!(l.group_sizes().is_empty(), "both members left the group");
        // A fresh message is delivered normally.
        l.send(&name, msg! { "type": "new" }).await.unwrap();
        assert_eq!(l.receive(&name).await.unwrap().kind(), Some("new"));
    }

    #[tokio::test(start_paused = true)]
    async fn group_memberships_expire() {
        let l = MemoryLayer::default();
        let inbox = l.new_inbox();
        l.group_add("g", &inbox.name()).await.unwrap();
        tokio::time::advance(Duration::from_secs(86_000)).await;
        l.group_add("g", &inbox.name()).await.unwrap(); // refreshes
        tokio::time::advance(Duration::from_secs(1_000)).await;
        l.group_send("g", msg! { "type": "still" }).await.unwrap();
        assert_eq!(inbox.recv().await.kind(), Some("still"));
        tokio::time::advance(Duration::from_secs(86_401)).await;
        l.group_send("g", msg! { "type": "gone" }).await.unwrap();
        assert!(l.group_sizes().is_empty());
        assert_eq!(l.stats().memberships_expired, 1);
    }

    /// A room holds one member and one cached target per connection: keep them at two words.
    #[test]
    fn a_membership_is_two_words() {
        assert_eq!(std::mem::size_of::<Member>(), 16);
        assert_eq!(std::mem::size_of::<Target>(), 16);
    }

    #[tokio::test]
    async fn group_send_shares_one_payload_and_skips_full_members() {
        let l = layer();
        let a = l.new_inbox();
        let b = l.new_inbox();
        l.group_add("room", &a.name()).await.unwrap();
        l.group_add("room", &b.name()).await.unwrap();
        let m = msg! { "type": "chat.message", "text": "x".repeat(1000) };
        l.group_send("room", m.clone()).await.unwrap();
        let (ra, rb) = (a.recv().await, b.recv().await);
        assert!(ra.ptr_eq(&m) && rb.ptr_eq(&m), "no per-member copy");
        // Fill b (capacity 3); a keeps receiving, b's drops are counted, nothing raises.
        for _ in 0..3 {
            l.send(&b.name(), msg! { "type": "filler" }).await.unwrap();
        }
        l.group_send("room", msg! { "type": "more" }).await.unwrap();
        assert_eq!(a.recv().await.kind(), Some("more"));
        assert_eq!(l.stats().dropped_full, 1);
        assert_eq!(l.stats().group_deliveries, 3);
    }

    /// A large room's wakes go out a chunk at a time, so a task that becomes ready after the
    /// group send (here the sender itself, after a yield) runs before most members do, not
    /// after all of them: a message that reaches a busy sender's socket meanwhile is pushed
    /// within about one chunk, and goes out in the same pass as this one to every member not
    /// woken yet.
    #[test]
    fn a_large_group_send_lets_other_tasks_run_between_chunks_of_wakes() {
        const N: usize = 2 * DEFER_WAKES_ABOVE;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let l = MemoryLayer::new(LayerConfig::default());
            let sender_went_on = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for _ in 0..N {
                let inbox = l.new_inbox();
                l.group_add("big", &inbox.name()).await.unwrap();
                let (flag, tx) = (sender_went_on.clone(), tx.clone());
                tokio::spawn(async move {
                    let m = inbox.recv().await;
                    let _ = tx.send((m, flag.load(std::sync::atomic::Ordering::Relaxed)));
                });
            }
            drop(tx);
            // Every member is now waiting on its inbox.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sender = {
                let (l, flag) = (l.clone(), sender_went_on.clone());
                tokio::spawn(async move {
                    let m = msg! { "type": "chat.message", "text": "hi" };
                    l.group_send("big", m).await.unwrap();
                    tokio::task::yield_now().await;
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                })
            };
            sender.await.unwrap();
            let (mut received, mut after_sender) = (0, 0);
            while let Some((m, went_on)) = rx.recv().await {
                assert_eq!(m.str("text").unwrap(), "hi");
                received += 1;
                after_sender += usize::from(went_on);
            }
            assert_eq!(received, N, "every member woken, none lost");
            assert!(
                after_sender >= N / 2,
                "the sender ran again before most members ({after_sender} of {N} after it)"
            );
        });
    }

    /// A sender that outruns a room waits for the members instead of overflowing their
    /// mailboxes: nothing is dropped and everyone gets everything, in order. In a small room
    /// (wakes at once) and a large one (wakes in chunks).
    #[test]
    fn a_room_holds_back_a_sender_that_outruns_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for n in [100, DEFER_WAKES_ABOVE + 100] {
            sender_outruns_a_room(&runtime, n);
        }
    }

    /// The same on the multi-thread scheduler, where a worker runs the task it woke last first
    /// and the others steal: the sender could run again before the members it woke. Also in a
    /// room that fits the current-thread scheduler's single pass but not a worker's local run
    /// queue, whose members spilled to the global queue would starve while the sender kept
    /// running (see `MULTI_THREAD_DEFER_WAKES_ABOVE`).
    #[test]
    fn a_room_holds_back_a_sender_that_outruns_it_on_the_multi_thread_scheduler() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let between = MULTI_THREAD_DEFER_WAKES_ABOVE + 100;
        assert!(
            between <= DEFER_WAKES_ABOVE,
            "a room only the multi-thread scheduler defers"
        );
        for n in [100, between, DEFER_WAKES_ABOVE + 100] {
            sender_outruns_a_room(&runtime, n);
        }
    }

    /// `n` members with mailboxes of 8, each read as a connection reads its own (the whole
    /// mailbox each time its task runs), and a sender that never yields of its own accord
    /// sending 500 messages: every member gets all of them, in order, and nothing is dropped.
    fn sender_outruns_a_room(runtime: &tokio::runtime::Runtime, n: usize) {
        const SENDS: usize = 500;
        runtime.block_on(async {
            let l = MemoryLayer::new(LayerConfig::default().with_capacity(8));
            let mut members = Vec::new();
            for _ in 0..n {
                let inbox = l.new_inbox();
                l.group_add("big", &inbox.name()).await.unwrap();
                let registry = inbox.registry().clone();
                let mailbox = inbox.into_mailbox();
                members.push(tokio::spawn(async move {
                    let mut next = 0;
                    while next < SENDS {
                        let taken = std::future::poll_fn(|cx| {
                            mailbox.register(cx);
                            let taken = registry.take_all(&mailbox);
                            if taken.messages.is_empty() {
                                std::task::Poll::Pending
                            } else {
                                std::task::Poll::Ready(taken)
                            }
                        });
                        let taken = tokio::time::timeout(Duration::from_secs(10), taken)
                            .await
                            .expect("a message was lost");
                        for env in taken.messages {
                            let m = env.message;
                            assert_eq!(m.get("n").and_then(|v| v.as_i64()), Some(next as i64));
                            next += 1;
                        }
                    }
                    registry.release(&mailbox);
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let sender = {
                let l = l.clone();
                // Never yields of its own accord: only a waiting group_send lets members run.
                tokio::spawn(async move {
                    for n in 0..SENDS {
                        l.group_send("big", msg! { "type": "x", "n": n as i64 })
                            .await
                            .unwrap();
                    }
                })
            };
            sender.await.unwrap();
            for member in members {
                member.await.unwrap();
            }
            assert_eq!(l.stats().dropped_full, 0);
            assert_eq!(l.stats().group_deliveries, (n * SENDS) as u64);
        });
    }

    #[tokio::test]
    async fn closed_local_channels_leave_their_groups() {
        let l = layer();
        let a = l.new_inbox();
        let name = a.name();
        l.group_add("room", &name).await.unwrap();
        drop(a);
        l.group_send("room", msg! { "type": "x" }).await.unwrap();
        assert!(l.group_sizes().is_empty());
        l.send(&name, msg! { "type": "x" }).await.unwrap();
        assert_eq!(l.stats().dropped_no_receiver, 1);
    }

    #[tokio::test]
    async fn invalid_names_and_reserved_keys_are_typed_errors() {
        let l = layer();
        assert!(matches!(
            l.send("bad name", msg! { "type": "x" }).await,
            Err(LayerError::InvalidChannelName { .. })
        ));
        assert!(matches!(
            l.group_add("bad!group", "chan").await,
            Err(LayerError::InvalidGroupName { .. })
        ));
        assert!(matches!(
            l.group_send(&"g".repeat(100), msg! { "type": "x" }).await,
            Err(LayerError::InvalidGroupName { .. })
        ));
        assert!(matches!(
            l.send("chan", msg! { "type": "x", "__asgi_channel__": "y" })
                .await,
            Err(LayerError::InvalidMessage(_))
        ));
        // A local name of this process that was never opened cannot be read.
        let never = format!("{}ffff", l.local().prefix());
        assert!(matches!(
            l.receive(&never).await,
            Err(LayerError::NotLocal(_))
        ));
    }

    #[tokio::test]
    async fn seed_style_messages_travel_typed_and_flush_empties_everything() {
        let l = layer();
        let inbox = l.new_inbox();
        l.send(&inbox.name(), msg! { "text": "hi" }).await.unwrap();
        assert_eq!(inbox.recv().await.kind(), Some("websocket.send"));
        l.group_add("g", &inbox.name()).await.unwrap();
        l.send("jobs", msg! { "type": "x" }).await.unwrap();
        l.flush().await.unwrap();
        assert!(l.group_sizes().is_empty());
        let pending = tokio::time::timeout(Duration::from_millis(50), l.receive("jobs")).await;
        assert!(pending.is_err(), "flush dropped the queued job");
    }
}
