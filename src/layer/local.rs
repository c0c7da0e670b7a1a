//! Process-local mailboxes: the reply channels of this process's connections.
//!
//! A mailbox is the receiving end of one process-local channel (`specific.<process>!<id>`). It is
//! a bounded FIFO of shared [`Message`]s plus a waker, so a sender in any task hands a message to
//! a connection with one lock and one wake, and a group send to N local members pushes N
//! reference counts of one payload.
//!
//! Memory matters here: there is one mailbox per connection, so an idle mailbox owns no buffer
//! (its queue is taken whole when drained) and its bookkeeping is a few words.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use parking_lot::{Mutex, RwLock};
use thin_vec::ThinVec;
use tokio::time::Instant;

use crate::consumer::Command;
use crate::layer::stats::{Counters, DropReason};
use crate::message::Message;
use crate::server::ws::outlet::Outlet;

/// Number of registry shards; a power of two so the shard is a mask of the id.
const SHARDS: usize = 32;

/// Mailboxes a group send or a pass of wakes brings into the cache ahead of the one it works
/// on ([`Mailbox::touch`]). Eight mailboxes are sixteen cache lines, about as many misses as a
/// core keeps in flight.
pub(crate) const TOUCH_AHEAD: usize = 8;

/// A message waiting in a mailbox, with the moment it expires (milliseconds on the layer clock).
pub(crate) struct Envelope {
    pub(crate) message: Message,
    pub(crate) expires_ms: u64,
}

/// Out-of-band signals the server raises on a connection's mailbox (ping due, shutdown …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Signal {
    /// The keep-alive sweeper says a ping is due or a pong is overdue; the connection checks.
    Tick = 1,
    /// The server is shutting down: close with 1001.
    Shutdown = 2,
}

/// Outcome of pushing into a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued; `expired` older messages were purged on the way.
    Queued { expired: u64 },
    /// The mailbox holds its capacity; nothing was queued.
    Full { expired: u64 },
    /// The receiving end is gone.
    Closed,
}

/// Who reads a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Owner {
    /// An [`Inbox`], one message at a time.
    Inbox = 0,
    /// Nobody in particular: a channel made by `new_channel()`, read by whoever asks for it.
    Detached = 1,
    /// A connection, which takes the whole mailbox each time its task runs
    /// ([`LocalChannels::take_all`]), so a sender may wait for it to do so ([`Watch`]).
    Connection = 2,
}

/// The messages of a mailbox, oldest first: none, one held inline, or a buffer.
///
/// A connection takes its whole mailbox each time its task runs, so most of the time it finds
/// one message there. Held inline, that message costs no buffer: nothing to allocate on the
/// push and free after the take, and no separate cache line for the owner to miss when it
/// takes it. The type is as large as the `VecDeque` it wraps (the buffer's capacity has room
/// for the other variants' tags), so a mailbox grows by nothing.
#[derive(Default)]
pub(crate) enum Fifo {
    /// Nothing queued, and no buffer.
    #[default]
    Empty,
    /// One message, inline.
    One(Envelope),
    /// Two or more messages were queued at once (or a buffer was reserved for a busy room).
    Many(VecDeque<Envelope>),
}

impl Fifo {
    /// How many messages are queued.
    pub(crate) fn len(&self) -> usize {
        match self {
            Fifo::Empty => 0,
            Fifo::One(_) => 1,
            Fifo::Many(queue) => queue.len(),
        }
    }

    /// True when nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest message.
    fn front(&self) -> Option<&Envelope> {
        match self {
            Fifo::Empty => None,
            Fifo::One(envelope) => Some(envelope),
            Fifo::Many(queue) => queue.front(),
        }
    }

    /// The queued messages, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Envelope> {
        let (one, many) = match self {
            Fifo::Empty => (None, None),
            Fifo::One(envelope) => (Some(envelope), None),
            Fifo::Many(queue) => (None, Some(queue.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Takes the oldest message; an emptied buffer is kept (see [`Fifo::shrink`]).
    fn pop_front(&mut self) -> Option<Envelope> {
        match self {
            Fifo::Empty => None,
            Fifo::One(_) => match std::mem::take(self) {
                Fifo::One(envelope) => Some(envelope),
                _ => None,
            },
            Fifo::Many(queue) => queue.pop_front(),
        }
    }

    /// Queues `envelope` last. With `reserve` above one and nothing queued, a buffer for that
    /// many is made at once (a member of a busy room that took that many last time).
    fn push_back(&mut self, envelope: Envelope, reserve: usize) {
        match self {
            Fifo::Empty if reserve > 1 => {
                let mut queue = VecDeque::with_capacity(reserve);
                queue.push_back(envelope);
                *self = Fifo::Many(queue);
            }
            Fifo::Empty => *self = Fifo::One(envelope),
            Fifo::One(_) => {
                let mut queue = VecDeque::with_capacity(reserve.max(4));
                if let Fifo::One(first) = std::mem::take(self) {
                    queue.push_back(first);
                }
                queue.push_back(envelope);
                *self = Fifo::Many(queue);
            }
            Fifo::Many(queue) => queue.push_back(envelope),
        }
    }

    /// Lets an empty buffer go.
    fn shrink(&mut self) {
        if self.is_empty() {
            *self = Fifo::Empty;
        }
    }
}

impl IntoIterator for Fifo {
    type Item = Envelope;
    type IntoIter = FifoIter;

    fn into_iter(self) -> FifoIter {
        match self {
            Fifo::Empty => FifoIter::One(None),
            Fifo::One(envelope) => FifoIter::One(Some(envelope)),
            Fifo::Many(queue) => FifoIter::Many(queue.into_iter()),
        }
    }
}

/// The messages of a taken [`Fifo`], oldest first.
pub(crate) enum FifoIter {
    One(Option<Envelope>),
    Many(std::collections::vec_deque::IntoIter<Envelope>),
}

impl Iterator for FifoIter {
    type Item = Envelope;

    fn next(&mut self) -> Option<Envelope> {
        match self {
            FifoIter::One(envelope) => envelope.take(),
            FifoIter::Many(iter) => iter.next(),
        }
    }
}

/// What [`LocalChannels::take_all`] hands the owner.
#[derive(Default)]
pub(crate) struct Taken {
    pub(crate) messages: Fifo,
    pub(crate) commands: ThinVec<Command>,
    /// Expired messages dropped on the way.
    pub(crate) expired: u64,
}

/// The receiving end of one process-local channel.
#[derive(Default)]
struct Queues {
    /// Layer messages addressed to this channel (bounded by `capacity`).
    messages: Fifo,
    /// Socket commands from the owning consumer and its handles (bounded downstream by the
    /// connection's outbound queue). Always taken whole, so a vector, and a thin one (its
    /// length and capacity live in its buffer; empty, it is one pointer to a shared header):
    /// with the outlet beside it, that keeps the whole mailbox in a 128-byte allocation.
    commands: ThinVec<Command>,
    /// The connection's socket, when its task lets a pass of wakes write to it
    /// ([`Mailbox::write_through`]). Dropped when the mailbox closes.
    outlet: Option<Attached>,
}

/// An [`Outlet`] attached to a mailbox, and the layer message types written through it (the
/// consumer's fastlane), kept here so the outlet stays within a 64-byte allocation.
struct Attached {
    outlet: Arc<Outlet>,
    fastlane: &'static &'static [&'static str],
}

/// [`Mailbox::poll_state`]: the owner sleeps; a push wakes it.
const SLEEPING: u8 = 0;
/// [`Mailbox::poll_state`]: the owner's task is being polled and will look at both queues before
/// it sleeps ([`Mailbox::end_poll`]), so a push needs no wake: waking a running task costs it
/// one more whole poll.
const POLLING: u8 = 1;
/// [`Mailbox::poll_state`]: the owner sleeps with nothing of its own left to write, and its
/// mailbox has an outlet: a pass of wakes may write its messages to its socket instead of
/// waking it ([`Mailbox::write_through`]).
const ARMED: u8 = 2;

pub(crate) struct Mailbox {
    queue: Mutex<Queues>,
    waker: AtomicWaker,
    capacity: u32,
    signals: AtomicU8,
    closed: AtomicBool,
    /// Whether the owner is being polled ([`POLLING`]), sleeps ([`SLEEPING`]) or sleeps and
    /// lets a pass of wakes write to its socket ([`ARMED`]). Leaves `POLLING` under the queue
    /// lock, and is read under it by pushers and by the writer.
    poll_state: AtomicU8,
    /// Who reads it ([`Owner`]).
    owner: AtomicU8,
    /// A group send found this mailbox crowded and waits until its owner has taken it (see
    /// [`Watch`]). Set and cleared under the queue lock.
    watched: AtomicBool,
    /// A wake for this mailbox waits in a [`DeferredWakes`] that has not run it yet, so a
    /// deferring push need not list it again. Set by pushers under the queue lock; cleared by
    /// the list when it wakes the owner.
    wake_deferred: AtomicBool,
    /// Coarse activity stamp (seconds) kept by the owner, read by sweepers.
    pub(crate) activity: AtomicU32,
    /// How many messages the owner took at once last time: the first push into the emptied
    /// queue reserves that much, so a member of a busy room does not grow its queue from four
    /// slots by doubling on every visit. Kept under the queue lock.
    batch: AtomicU16,
    /// The local id (in the registry and in the channel name), so an owner holding just the
    /// mailbox knows its name.
    id: u64,
}

impl Mailbox {
    fn new(id: u64, capacity: usize, owner: Owner) -> Self {
        Mailbox {
            id,
            queue: Mutex::new(Queues::default()),
            waker: AtomicWaker::new(),
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            signals: AtomicU8::new(0),
            closed: AtomicBool::new(false),
            poll_state: AtomicU8::new(SLEEPING),
            owner: AtomicU8::new(owner as u8),
            watched: AtomicBool::new(false),
            wake_deferred: AtomicBool::new(false),
            activity: AtomicU32::new(0),
            batch: AtomicU16::new(0),
        }
    }

    /// Whether `owner` reads this mailbox.
    fn owned_by(&self, owner: Owner) -> bool {
        self.owner.load(Ordering::Relaxed) == owner as u8
    }

    /// The local id: the channel is `specific.<process>!<id in hex>`.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Queues a message unless full or closed, purging expired messages at the head first,
    /// and wakes the owner.
    pub(crate) fn push(&self, message: Message, now_ms: u64, expires_ms: u64) -> Push {
        let (outcome, wake, _) = self.enqueue(message, now_ms, expires_ms, None, false);
        if wake == Wake::Now {
            self.waker.wake();
        }
        outcome
    }

    /// [`push`](Self::push) as part of a group send: in a large room the owner's wake is left
    /// to `wakes`, which runs it later (and only once however many pushes come before it
    /// does); a connection's mailbox found crowded is counted in `watch` until its owner
    /// takes it.
    fn push_deferred(
        self: &Arc<Self>,
        message: Message,
        now_ms: u64,
        expires_ms: u64,
        wakes: &mut DeferredWakes,
        watch: &Watch,
    ) -> Push {
        let (outcome, wake, crowded) =
            self.enqueue(message, now_ms, expires_ms, Some(watch), wakes.defer);
        match wake {
            Wake::Now => self.waker.wake(),
            Wake::Listed => wakes.mailboxes.push(self.clone()),
            Wake::No => {}
        }
        wakes.crowded |= crowded;
        outcome
    }

    /// Queues under the lock; also says what wake the owner is owed and whether the queue
    /// now holds seven eighths of its capacity or more. With `watch` (a group send's push), a
    /// crowded connection mailbox is counted in it; with `defer`, the owner's wake is listed
    /// rather than run.
    fn enqueue(
        &self,
        message: Message,
        now_ms: u64,
        expires_ms: u64,
        watch: Option<&Watch>,
        defer: bool,
    ) -> (Push, Wake, bool) {
        if self.closed.load(Ordering::Acquire) {
            return (Push::Closed, Wake::No, false);
        }
        let mut queues = self.queue.lock();
        let queue = &mut queues.messages;
        let expired = purge_expired(queue, now_ms);
        if queue.len() >= self.capacity as usize {
            return (Push::Full { expired }, Wake::No, true);
        }
        let reserve = match usize::from(self.batch.load(Ordering::Relaxed)) {
            batch if batch > 4 => batch.min(self.capacity as usize),
            _ => 0,
        };
        queue.push_back(
            Envelope {
                message,
                expires_ms,
            },
            reserve,
        );
        let crowded = queue.len() * 8 >= self.capacity as usize * 7;
        if crowded
            && let Some(watch) = watch
            && self.owned_by(Owner::Connection)
            && !self.watched.swap(true, Ordering::Relaxed)
        {
            // Under the lock, so the owner's take (which releases it) comes after.
            watch.count.fetch_add(1, Ordering::AcqRel);
        }
        let wake = if self.poll_state.load(Ordering::Relaxed) == POLLING {
            Wake::No
        } else if !defer {
            Wake::Now
        } else if self.wake_deferred.swap(true, Ordering::Relaxed) {
            Wake::No // a list already owes it one
        } else {
            Wake::Listed
        };
        (Push::Queued { expired }, wake, crowded)
    }

    /// Runs a deferred wake: wakes the owner unless another list already did.
    fn wake_if_deferred(&self) {
        if self.wake_deferred.swap(false, Ordering::Relaxed) {
            self.waker.wake();
        }
    }

    /// Runs a deferred wake in a pass of wakes: when the owner sleeps armed, writes its queued
    /// messages to its socket ([`write_through`](Self::write_through)) and wakes it only if
    /// something is left for it to do.
    fn deliver_deferred(&self, registry: &Registry, now_ms: u64) {
        if !self.wake_deferred.swap(false, Ordering::Relaxed) {
            return;
        }
        if self.poll_state.load(Ordering::Relaxed) == ARMED && self.write_through(registry, now_ms)
        {
            return;
        }
        self.waker.wake();
    }

    /// Writes the messages at the head of the queue to the owner's socket through its
    /// [`Outlet`], with one `send`, while the owner sleeps; true when the queue was emptied
    /// that way and the owner need not run.
    ///
    /// Why: in a large room most members sleep between messages, and each delivery used to
    /// cost a wake, a poll of the member's task (take the mailbox, frame, write, sleep) and
    /// the `send`. The `send` is most of it (about 8 µs in the kernel on loopback), but the
    /// rest is what set canal behind uWebSockets.js in CPU per delivery at low rates, where
    /// nothing batches (docs/BENCHMARKS.md). Here a delivery is the `send` plus framing.
    ///
    /// Safety of the stream: the owner arms only with nothing unwritten of its own
    /// ([`end_poll`](Self::end_poll)), and leaves the armed state under this lock before it
    /// writes again ([`begin_poll`](Self::begin_poll)), so its writes and these never
    /// interleave. What the socket takes only in part is handed to the owner as
    /// [`Command::Remainder`] (it writes it before anything else) and disarms the mailbox
    /// until the owner has written everything again. Expired messages at the head are dropped
    /// and counted, as the owner would; the first message the outlet does not write (not of a
    /// fastlane type, too large) and all behind it stay queued, in order, for the owner.
    fn write_through(&self, registry: &Registry, now_ms: u64) -> bool {
        let mut queues = self.queue.lock();
        let Queues {
            messages,
            commands,
            outlet,
        } = &mut *queues;
        let Some(Attached { outlet, fastlane }) = outlet.as_ref() else {
            return false;
        };
        if self.poll_state.load(Ordering::Relaxed) != ARMED
            || !commands.is_empty()
            || messages.is_empty()
        {
            return false;
        }
        let expired = purge_expired(messages, now_ms);
        if expired > 0 {
            registry
                .counters
                .drop(DropReason::Expired, expired, &registry.name_of(self.id));
        }
        let wrote = outlet.write_front(fastlane, messages);
        for _ in 0..wrote.messages {
            messages.pop_front();
        }
        if let Some(rest) = wrote.rest {
            commands.push(Command::Remainder(rest));
            // The owner has bytes of its own to write now: no more writes from here until
            // it has written them. Release: its next poll sees this write done.
            self.poll_state.store(SLEEPING, Ordering::Release);
            return false;
        }
        if !messages.is_empty() {
            return false;
        }
        messages.shrink();
        registry
            .watch
            .release(self.watched.swap(false, Ordering::Relaxed));
        true
    }

    /// Lets a pass of wakes write this connection's messages of the `fastlane` types to its
    /// socket while its task sleeps ([`write_through`](Self::write_through)); the mailbox keeps
    /// the outlet until it closes.
    pub(crate) fn attach_outlet(
        &self,
        outlet: Arc<Outlet>,
        fastlane: &'static &'static [&'static str],
    ) {
        if !self.closed.load(Ordering::Acquire) {
            self.queue.lock().outlet = Some(Attached { outlet, fastlane });
        }
    }

    /// Empties the queue of messages (its buffer goes too); true if a sender was watching it.
    fn clear(&self) -> bool {
        let mut queues = self.queue.lock();
        queues.messages = Fifo::Empty;
        self.watched.swap(false, Ordering::Relaxed)
    }

    /// Takes every queued message and command under one lock (their buffers go with them),
    /// expired ones too. True too if a sender was watching the mailbox (see [`Watch`]).
    fn take_whole(&self) -> (Taken, bool) {
        let mut queues = self.queue.lock();
        let watched = self.watched.swap(false, Ordering::Relaxed);
        if queues.messages.is_empty() && queues.commands.is_empty() {
            return (Taken::default(), watched);
        }
        let batch = u16::try_from(queues.messages.len()).unwrap_or(u16::MAX);
        self.batch.store(batch, Ordering::Relaxed);
        let taken = Taken {
            messages: std::mem::take(&mut queues.messages),
            commands: std::mem::take(&mut queues.commands),
            expired: 0,
        };
        (taken, watched)
    }

    /// Queues a socket command for the owner; false once the mailbox is closed.
    pub(crate) fn push_command(&self, command: Command) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let wake = {
            let mut queues = self.queue.lock();
            queues.commands.push(command);
            self.poll_state.load(Ordering::Relaxed) != POLLING
        };
        if wake {
            self.waker.wake();
        }
        true
    }

    /// The owner starts a poll in which it will call [`end_poll`](Self::end_poll) before it
    /// sleeps: pushes meanwhile skip the wake, and no pass of wakes writes to its socket.
    pub(crate) fn begin_poll(&self) {
        // Acquire: a writer that disarmed the mailbox (a partial write) is done writing.
        let armed = self.poll_state.load(Ordering::Acquire) == ARMED;
        // Armed, a pass of wakes may be writing to the socket right now, under the lock: wait
        // for it, and leave the armed state where the next one looks.
        let _queues = armed.then(|| self.queue.lock());
        self.poll_state.store(POLLING, Ordering::Relaxed);
    }

    /// The owner is about to sleep: from now on pushes wake it again, and with `armed` (it has
    /// nothing unwritten of its own) and an outlet, a pass of wakes may write its messages to
    /// its socket instead ([`write_through`](Self::write_through)). True when something
    /// arrived that it has not taken yet (it must keep going instead of sleeping).
    pub(crate) fn end_poll(&self, armed: bool) -> bool {
        let queues = self.queue.lock();
        // Changed under the lock that pushers hold when they read it: a push either lands
        // before this check (and is seen here) or after it (and sees the owner sleeping).
        let state = if armed && queues.outlet.is_some() {
            ARMED
        } else {
            SLEEPING
        };
        self.poll_state.store(state, Ordering::Relaxed);
        !queues.messages.is_empty() || !queues.commands.is_empty()
    }

    /// Pops one live message, registering the waker when empty. Returns the expired count too.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>, now_ms: u64) -> (Poll<Message>, u64) {
        let mut expired = 0;
        for attempt in 0..2 {
            {
                let mut queues = self.queue.lock();
                let queue = &mut queues.messages;
                expired += purge_expired(queue, now_ms);
                if let Some(env) = queue.pop_front() {
                    queue.shrink();
                    return (Poll::Ready(env.message), expired);
                }
            }
            if attempt == 0 {
                self.waker.register(cx.waker());
            }
        }
        (Poll::Pending, expired)
    }

    /// Registers the task to wake on the next push or signal.
    pub(crate) fn register(&self, cx: &mut Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// True when messages are waiting.
    pub(crate) fn has_messages(&self) -> bool {
        !self.queue.lock().messages.is_empty()
    }

    /// Raises a signal and wakes the owner.
    pub(crate) fn raise(&self, signal: Signal) {
        self.signals.fetch_or(signal as u8, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Takes the raised signals (bit set of [`Signal`]).
    pub(crate) fn take_signals(&self) -> u8 {
        self.signals.swap(0, Ordering::AcqRel)
    }

    /// Marks the channel dead: pushes and commands fail from now on, and what was queued is
    /// dropped. True if a sender was watching it.
    fn close(&self) -> bool {
        self.closed.store(true, Ordering::Release);
        let watched = {
            let mut queues = self.queue.lock();
            drop(std::mem::take(&mut *queues));
            self.watched.swap(false, Ordering::Relaxed)
        };
        self.waker.wake();
        watched
    }

    /// Reads a word from each of the two cache lines this `Arc`'d mailbox spans (the counts
    /// and the lock on the first, the flags on the second), and nothing else.
    ///
    /// A push takes the mailbox's lock: a locked instruction, which waits for every load
    /// before it. In a large room's group send each push then waited for its own mailbox's
    /// cache miss, one after another (`perf` at 320 msg/s into 10,000 receivers: the pushes
    /// were 17–28 % of canal's samples, most of it on the first load of each mailbox). Touching
    /// the next few mailboxes first, with plain loads and no lock between them, lets their
    /// misses overlap; the pushes then find them in the cache. A hint only: nothing depends
    /// on the values read.
    pub(crate) fn touch(self: &Arc<Self>) {
        std::hint::black_box((Arc::strong_count(self), self.closed.load(Ordering::Relaxed)));
    }

    /// Reads a word of this mailbox's outlet when its owner sleeps armed (a pass of wakes is
    /// about to write through it): a hint, like [`touch`](Self::touch).
    fn touch_outlet(&self) {
        if self.poll_state.load(Ordering::Relaxed) == ARMED
            && let Some(attached) = self.queue.lock().outlet.as_ref()
        {
            // The counts share the outlet's cache line (a 64-byte allocation).
            std::hint::black_box(Arc::strong_count(&attached.outlet));
        }
    }

    /// True once the owner is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Drops the expired messages at the head, in place; returns how many.
    fn purge(&self, now_ms: u64) -> u64 {
        purge_expired(&mut self.queue.lock().messages, now_ms)
    }
}

/// What a push owes the owner.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    No,
    Now,
    /// A deferred wake, to be listed.
    Listed,
}

/// The wakes one large group send owes its members, listed while it pushes and then handed
/// to [`LocalChannels::run_wakes`].
///
/// A group send to N members used to wake N tasks at once: they all queued behind one another,
/// and the sender's connection, woken by its socket, queued behind all of them, so a message
/// that arrived meanwhile waited for that whole pass before it was even pushed, then for its
/// own pass. Waking [`WAKE_CHUNK`] members at a time, with a yield between chunks, lets the
/// sender run within about one chunk: a later message lands in the mailboxes of the members
/// not woken yet and goes out with the earlier one in the same pass. Members are still woken
/// (or written for, [`Mailbox::write_through`]) once per pass, and everything queued for them
/// goes out with one write, so the CPU per delivery is the same; the wait for a whole earlier
/// pass is gone.
///
/// Every group send carries one, to note whether a member was crowded ([`Watch`]); only a
/// large room's ([`DeferredWakes::for_room`]) defers wakes.
///
/// Dropping a list that was not handed over wakes whoever it owes, so no wake is lost.
pub(crate) struct DeferredWakes {
    /// Wakes are listed here rather than run at once.
    defer: bool,
    mailboxes: Vec<Arc<Mailbox>>,
    /// A push found its mailbox seven eighths full or more: the members are falling behind
    /// the sends, and the sender should wait for them ([`LocalChannels::run_wakes`]).
    crowded: bool,
}

impl DeferredWakes {
    /// For a group send to `members` local members: deferring when [`defers_wakes`] says so.
    pub(crate) fn for_room(members: usize) -> Self {
        Self::new(defers_wakes(members))
    }

    fn new(defer: bool) -> Self {
        DeferredWakes {
            defer,
            mailboxes: Vec::new(),
            crowded: false,
        }
    }
}

/// Members woken per chunk: about the most a socket-woken task waits behind a large group send.
pub(crate) const WAKE_CHUNK: usize = 128;

/// Group sends to more members than this defer their wakes. A deferring send into an idle wake
/// queue spawns the task that runs it, and many of those among connections being set up leave
/// memory behind in the allocator: with deferral from 129 members, 18,000 idle connections in
/// rooms of 180 cost 5 MiB more RSS (docs/BENCHMARKS.md). A smaller room's pass of wakes is
/// short anyway.
pub(crate) const DEFER_WAKES_ABOVE: usize = 4 * WAKE_CHUNK;

/// On tokio's multi-thread scheduler, group sends to more members than this defer their wakes
/// too. A worker keeps the tasks it wakes in a local queue of 256 (and one LIFO slot) and moves
/// half of it to the global queue when it overflows; a busy worker looks there only every 61
/// tasks. Woken all at once, the members past 256 could wait while the sender, at the front
/// of the local queue, kept sending, until their mailboxes overflowed (measured: a room of 500
/// at 6,400 msg/s on two workers lost 52,335 messages, none on one thread). Deferred, they are
/// woken a chunk at a time in the wake queue's order, and the sender waits when they fall
/// behind.
pub(crate) const MULTI_THREAD_DEFER_WAKES_ABOVE: usize = 2 * WAKE_CHUNK;

/// Whether a group send to `members` local members defers their wakes ([`DeferredWakes`]).
pub(crate) fn defers_wakes(members: usize) -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    members > DEFER_WAKES_ABOVE
        || (members > MULTI_THREAD_DEFER_WAKES_ABOVE
            && Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread))
}

impl Drop for DeferredWakes {
    fn drop(&mut self) {
        for mailbox in self.mailboxes.drain(..) {
            mailbox.wake_if_deferred();
        }
    }
}

/// The wakes deferred by group sends, in the order they became owed, so that every member is
/// woken once per pass in turn: a member woken recently is listed again behind the ones still
/// waiting, never ahead of them.
#[derive(Default)]
struct WakeQueue {
    owed: VecDeque<Arc<Mailbox>>,
    /// A task (or the caller) is working through `owed`.
    running: bool,
}

/// The task that works through the wake queue; if it is dropped unfinished (its runtime shut
/// down), it wakes everyone still owed, and the next group send starts a new one.
struct WakeRunner {
    registry: Arc<Registry>,
    done: bool,
}

impl WakeRunner {
    /// Wakes one chunk; true when nothing is owed any more.
    fn step(&mut self) -> bool {
        self.done = self.registry.wake_chunk(WAKE_CHUNK);
        self.done
    }
}

impl Drop for WakeRunner {
    fn drop(&mut self) {
        if !self.done {
            // One call takes everything owed and leaves the queue idle.
            self.registry.wake_chunk(usize::MAX);
        }
    }
}

impl Registry {
    /// Milliseconds on the layer clock (follows tokio's clock, so paused-time tests work).
    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.clock_base)
            .as_millis() as u64
    }

    /// The channel name of local id `id`.
    fn name_of(&self, id: u64) -> String {
        format!("{}{id:x}", self.prefix)
    }

    /// Wakes up to `n` owed members, oldest first, or writes their messages to their sockets
    /// for those that sleep armed ([`Mailbox::write_through`]); true when the queue is empty
    /// (and no one is running it any more).
    fn wake_chunk(&self, n: usize) -> bool {
        let (chunk, done) = {
            let mut queue = self.wakes.lock();
            let n = n.min(queue.owed.len());
            let chunk: Vec<Arc<Mailbox>> = queue.owed.drain(..n).collect();
            let done = queue.owed.is_empty();
            if done {
                queue.owed = VecDeque::new();
                queue.running = false;
            }
            (chunk, done)
        };
        // One clock read for the chunk's expiry checks (the owners' own takes read it once
        // per take).
        let now_ms = if chunk.is_empty() { 0 } else { self.now_ms() };
        // Most of these mailboxes, their outlets and their sockets are not in the cache: each
        // delivery's misses would come one after another, and the lock each takes waits for
        // them. So the mailbox TOUCH_AHEAD places ahead is touched (plain loads), and the
        // outlet of the one half as far ahead, whose mailbox is cached by then; their misses
        // then overlap with the `send`s in between.
        for mailbox in chunk.iter().take(TOUCH_AHEAD) {
            mailbox.touch();
        }
        for (i, mailbox) in chunk.iter().enumerate() {
            if let Some(ahead) = chunk.get(i + TOUCH_AHEAD / 2) {
                ahead.touch_outlet();
            }
            if let Some(ahead) = chunk.get(i + TOUCH_AHEAD) {
                ahead.touch();
            }
            mailbox.deliver_deferred(self, now_ms);
        }
        if done {
            self.wakes_done.notify_waiters();
        }
        done
    }
}

/// Waits until `done()`, checking it again each time `notify` wakes its waiters (it is asked
/// after the wait is armed, so a notification between the check and the wait is not missed).
async fn wait_until(notify: &tokio::sync::Notify, done: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

fn purge_expired(queue: &mut Fifo, now_ms: u64) -> u64 {
    let mut n = 0;
    while queue.front().is_some_and(|e| e.expires_ms <= now_ms) {
        queue.pop_front();
        n += 1;
    }
    n
}

/// The connection mailboxes that group sends found crowded, until their owners take them.
///
/// A group send that finds a member's mailbox seven eighths full waits
/// ([`LocalChannels::run_wakes`]). In a large room it waits for the pass of wakes under way,
/// which on the current-thread scheduler is enough: the members woken run first in, first
/// out, before the sender. But a multi-thread worker runs the task it woke last first (its
/// LIFO slot) and others steal, so there the sender, woken when the pass ends, could run again
/// before the members of the last chunk and overflow them; and a small room's members are
/// woken at once, with no pass to wait for. So the sender waits until every crowded
/// connection mailbox has been taken. Only connections are counted: their task takes the
/// whole mailbox each time it runs, and it is woken for what was pushed, so the wait ends; an
/// [`Inbox`] or a `new_channel()` may never be read. The count is per process, not per room:
/// a sender held back waits for every crowded member, its room's and others'. That is
/// simpler, and every sender that flags a member waits too, so under overload the senders
/// stop and the count runs down to zero.
#[derive(Default)]
struct Watch {
    /// Mailboxes flagged `watched`.
    count: AtomicUsize,
    /// Notified when `count` falls to zero.
    drained: tokio::sync::Notify,
}

impl Watch {
    /// One watched mailbox was taken (or closed, or emptied).
    fn release(&self, watched: bool) {
        if watched && self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

/// One shard of the registry: local id → mailbox.
type Shard = RwLock<HashMap<u64, Arc<Mailbox>>>;

struct Registry {
    /// `specific.<process>!`: every local name starts with it.
    prefix: Box<str>,
    next_id: AtomicU64,
    shards: Box<[Shard]>,
    clock_base: Instant,
    counters: Counters,
    wakes: Mutex<WakeQueue>,
    /// Notified each time the wake queue runs empty.
    wakes_done: tokio::sync::Notify,
    watch: Watch,
}

/// The registry of this process's local channels, shared by the layer and the server.
///
/// Names are `specific.<process>!<id in hex>`; the id indexes a sharded map, so resolving a name
/// to its mailbox parses a number instead of hashing a string.
#[derive(Clone)]
pub struct LocalChannels {
    inner: Arc<Registry>,
}

impl std::fmt::Debug for LocalChannels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalChannels")
            .field("prefix", &self.inner.prefix)
            .field("len", &self.len())
            .finish()
    }
}

impl LocalChannels {
    /// A registry whose names start with `specific.<process>!`.
    pub fn new(process: &str) -> Self {
        LocalChannels {
            inner: Arc::new(Registry {
                prefix: format!("specific.{process}!").into_boxed_str(),
                next_id: AtomicU64::new(1),
                shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
                clock_base: Instant::now(),
                counters: Counters::default(),
                wakes: Mutex::new(WakeQueue::default()),
                wakes_done: tokio::sync::Notify::new(),
                watch: Watch::default(),
            }),
        }
    }

    /// The prefix of every local name (`specific.<process>!`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Milliseconds on the layer clock (follows tokio's clock, so paused-time tests work).
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.inner.shards[(id as usize) & (SHARDS - 1)]
    }

    fn register(&self, capacity: usize, owner: Owner) -> (u64, Arc<Mailbox>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new(id, capacity, owner));
        self.shard(id).write().insert(id, mailbox.clone());
        (id, mailbox)
    }

    /// Opens a mailbox owned by the returned [`Inbox`]; dropping the inbox closes it.
    pub fn open(&self, capacity: usize) -> Inbox {
        let (_, mailbox) = self.register(capacity, Owner::Inbox);
        Inbox {
            mailbox,
            owner: self.clone(),
            handed_off: false,
        }
    }

    /// Opens a mailbox that lives in the registry until it is flushed or goes unused past
    /// expiry (what `new_channel()` hands out); returns its name.
    pub(crate) fn open_detached(&self, capacity: usize) -> String {
        let (id, _) = self.register(capacity, Owner::Detached);
        self.name_of(id)
    }

    /// The channel name of local id `id`.
    pub fn name_of(&self, id: u64) -> String {
        self.inner.name_of(id)
    }

    /// The local id named by `name`, if it is one of this registry's names.
    pub fn parse(&self, name: &str) -> Option<u64> {
        let rest = name.strip_prefix(&*self.inner.prefix)?;
        if rest.is_empty() || rest.len() > 16 || rest.starts_with('+') {
            return None;
        }
        u64::from_str_radix(rest, 16).ok()
    }

    /// True when `name` is in this process's local namespace (whether or not it still exists).
    pub fn is_local(&self, name: &str) -> bool {
        name.starts_with(&*self.inner.prefix)
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Mailbox>> {
        self.shard(id).read().get(&id).cloned()
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Mailbox>> {
        self.get(self.parse(name)?)
    }

    fn remove(&self, id: u64) {
        self.shard(id).write().remove(&id);
    }

    /// Closes a mailbox taken out of its [`Inbox`] with [`Inbox::into_mailbox`] and removes it
    /// from the registry: what dropping the inbox would have done.
    pub(crate) fn release(&self, mailbox: &Mailbox) {
        self.close_early(mailbox);
        self.remove(mailbox.id);
    }

    /// Marks a connection's channel dead (its socket is gone) before the connection releases
    /// it: pushes and commands fail from now on.
    pub(crate) fn close_early(&self, mailbox: &Mailbox) {
        self.inner.watch.release(mailbox.close());
    }

    /// What a connection does each time its task runs: takes every queued message and
    /// command under one lock (their buffers go with them; the expired messages are dropped
    /// and counted in `Taken::expired`), which ends any sender's wait on this mailbox. The
    /// clock is read only when there are messages.
    pub(crate) fn take_all(&self, mailbox: &Mailbox) -> Taken {
        let (mut taken, watched) = mailbox.take_whole();
        self.inner.watch.release(watched);
        if !taken.messages.is_empty() {
            taken.expired = purge_expired(&mut taken.messages, self.now_ms());
        }
        taken
    }

    /// Number of open local channels.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.read().len()).sum()
    }

    /// True when no local channel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` on every open mailbox (shard by shard; no lock is held while `f` runs on
    /// another shard's entries).
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, &Arc<Mailbox>)) {
        let mut batch = Vec::new();
        for shard in self.inner.shards.iter() {
            batch.clear();
            batch.extend(shard.read().iter().map(|(id, mb)| (*id, mb.clone())));
            for (id, mailbox) in &batch {
                f(*id, mailbox);
            }
        }
    }

    /// Waits for the next message on local channel `name` (one reader at a time). Cancel-safe.
    pub(crate) async fn receive(&self, name: &str) -> Result<Message, super::LayerError> {
        let mailbox = self
            .lookup(name)
            .ok_or_else(|| super::LayerError::NotLocal(name.to_owned()))?;
        let message = std::future::poll_fn(|cx| {
            let now = self.now_ms();
            mailbox
                .activity
                .store((now / 1000) as u32, Ordering::Relaxed);
            let (poll, expired) = mailbox.poll_pop(cx, now);
            self.counters().drop(DropReason::Expired, expired, name);
            poll
        })
        .await;
        Ok(message)
    }

    /// Pushes `message` into a local channel's mailbox, to expire `expiry_ms` from now, and
    /// counts the expired messages the push purged on the way (the caller counts the rest).
    pub(crate) fn deliver(&self, mailbox: &Arc<Mailbox>, message: Message, expiry_ms: u64) -> Push {
        self.deliver_at(mailbox, message, self.now_ms(), expiry_ms, None)
    }

    /// [`deliver`](Self::deliver) at a time the caller read once for many deliveries (a group
    /// send reads the clock once, not once per member), leaving the owner's wake to `wakes`
    /// when given.
    pub(crate) fn deliver_at(
        &self,
        mailbox: &Arc<Mailbox>,
        message: Message,
        now: u64,
        expiry_ms: u64,
        wakes: Option<&mut DeferredWakes>,
    ) -> Push {
        let id = mailbox.id;
        let outcome = match wakes {
            Some(wakes) => {
                mailbox.push_deferred(message, now, now + expiry_ms, wakes, &self.inner.watch)
            }
            None => mailbox.push(message, now, now + expiry_ms),
        };
        if let Push::Queued { expired } | Push::Full { expired } = outcome
            && expired > 0
        {
            self.counters()
                .drop(DropReason::Expired, expired, &self.name_of(id));
        }
        outcome
    }

    /// Runs the wakes a group send deferred, behind those still owed from earlier sends: the
    /// first chunk at once when none are, the rest from a task, a chunk per turn of the
    /// scheduler (all at once when there is no Tokio runtime to run that task).
    ///
    /// When a push found its mailbox seven eighths full or more, this also waits until the
    /// wake queue has run empty and every crowded connection mailbox has been taken ([`Watch`]).
    /// (Only the latter when the wakes were not deferred.) That is the back-pressure of a room
    /// that is outrun: the members are falling behind the sends, so the sender's handler
    /// waits, the sender's connection stops reading, and its client's socket fills, instead of
    /// members' mailboxes overflowing. (On the current-thread scheduler, a sender that ran
    /// only after every member, as when all were woken at once, got the same back-pressure
    /// from the scheduler.)
    pub(crate) async fn run_wakes(&self, wakes: DeferredWakes) {
        let (crowded, deferred) = (wakes.crowded, wakes.defer);
        self.start_wakes(wakes);
        if crowded {
            if deferred {
                self.wait_for_wakes().await;
            }
            self.wait_for_drains().await;
        }
    }

    /// Waits until no crowded connection mailbox is left untaken.
    async fn wait_for_drains(&self) {
        let watch = &self.inner.watch;
        wait_until(&watch.drained, || watch.count.load(Ordering::Acquire) == 0).await;
    }

    /// Waits until the wake queue is empty.
    async fn wait_for_wakes(&self) {
        wait_until(&self.inner.wakes_done, || !self.inner.wakes.lock().running).await;
    }

    fn start_wakes(&self, mut wakes: DeferredWakes) {
        if wakes.mailboxes.is_empty() {
            return;
        }
        {
            let mut queue = self.inner.wakes.lock();
            queue.owed.extend(wakes.mailboxes.drain(..));
            if queue.running {
                return;
            }
            queue.running = true;
        }
        if self.inner.wake_chunk(WAKE_CHUNK) {
            return;
        }
        let mut runner = WakeRunner {
            registry: self.inner.clone(),
            done: false,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while !runner.step() {
                    tokio::task::yield_now().await;
                }
            });
        }
        // Without a runtime, dropping the runner here wakes the rest.
    }

    /// Calls `f` with the name of every open local channel.
    pub fn for_each_name(&self, mut f: impl FnMut(String)) {
        self.for_each(|id, _| f(self.name_of(id)));
    }

    /// Removes detached mailboxes that are empty and were not read for `idle_secs` (coarse).
    pub(crate) fn sweep_detached(&self, now_secs: u32, idle_secs: u32) {
        for shard in self.inner.shards.iter() {
            shard.write().retain(|_, mb| {
                !(mb.owned_by(Owner::Detached)
                    && !mb.has_messages()
                    && now_secs.saturating_sub(mb.activity.load(Ordering::Relaxed)) > idle_secs)
            });
        }
    }

    /// Drops expired messages from every mailbox in place; returns (id, how many) for each
    /// mailbox that had some (its channel then leaves its groups).
    pub(crate) fn purge_expired(&self, now_ms: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        self.for_each(|id, mb| {
            let expired = mb.purge(now_ms);
            if expired > 0 {
                out.push((id, expired));
            }
        });
        out
    }

    /// Empties every mailbox and forgets detached ones (flush). Connection mailboxes stay
    /// registered: their connections are still alive.
    pub(crate) fn clear(&self) {
        for shard in self.inner.shards.iter() {
            shard.write().retain(|_, mb| {
                if mb.owned_by(Owner::Detached) {
                    mb.close();
                    false
                } else {
                    self.inner.watch.release(mb.clear());
                    true
                }
            });
        }
    }

    /// The drop counters shared with the layer that owns this registry.
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }
}

/// The owned receiving end of a local channel: a connection's reply channel.
///
/// Dropping it closes the mailbox and removes it from the registry; later sends to its name
/// are counted as [`DropReason::NoReceiver`].
pub struct Inbox {
    /// Knows its own id.
    mailbox: Arc<Mailbox>,
    owner: LocalChannels,
    /// Set once the mailbox was handed to an owner that releases it itself.
    handed_off: bool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("id", &self.id()).finish()
    }
}

impl Inbox {
    /// The local id.
    pub fn id(&self) -> u64 {
        self.mailbox.id()
    }

    /// The channel name (`specific.<process>!<id>`).
    pub fn name(&self) -> String {
        self.owner.name_of(self.id())
    }

    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// The registry this inbox belongs to.
    pub fn registry(&self) -> &LocalChannels {
        &self.owner
    }

    /// The mailbox alone, for a connection (`server::ws::conn`): it keeps the mailbox in less
    /// room than an inbox takes, takes it whole with [`LocalChannels::take_all`] each time its
    /// task runs, and calls [`LocalChannels::release`] itself when done.
    pub(crate) fn into_mailbox(mut self) -> Arc<Mailbox> {
        self.handed_off = true;
        self.mailbox
            .owner
            .store(Owner::Connection as u8, Ordering::Relaxed);
        self.mailbox.clone()
    }

    /// Waits for the next message. Cancel-safe: a message is taken only when returned.
    pub async fn recv(&self) -> Message {
        std::future::poll_fn(|cx| {
            let (poll, expired) = self.mailbox.poll_pop(cx, self.owner.now_ms());
            let name = if expired > 0 {
                self.name()
            } else {
                String::new()
            };
            self.owner
                .counters()
                .drop(DropReason::Expired, expired, &name);
            poll
        })
        .await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        if !self.handed_off {
            self.owner.release(&self.mailbox);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    use super::*;
    use crate::msg;

    fn envelope(n: i64, expires_ms: u64) -> Envelope {
        Envelope {
            message: msg! { "type": "x", "n": n },
            expires_ms,
        }
    }

    fn numbers(fifo: Fifo) -> Vec<i64> {
        fifo.into_iter()
            .map(|e| e.message.get("n").and_then(|v| v.as_i64()).unwrap_or(-1))
            .collect()
    }

    #[test]
    fn a_fifo_holds_one_message_inline_and_keeps_order_as_it_grows() {
        // As large as the VecDeque it wraps: the mailbox does not grow.
        assert_eq!(
            std::mem::size_of::<Fifo>(),
            std::mem::size_of::<VecDeque<Envelope>>()
        );
        let mut fifo = Fifo::default();
        fifo.push_back(envelope(1, 10), 0);
        assert!(matches!(fifo, Fifo::One(_)), "one message needs no buffer");
        fifo.push_back(envelope(2, 20), 0);
        fifo.push_back(envelope(3, 30), 0);
        assert!(matches!(fifo, Fifo::Many(_)));
        assert_eq!(fifo.len(), 3);
        assert_eq!(numbers(fifo), [1, 2, 3]);

        // Popping the inline message empties it; a reserve asks for a buffer at once.
        let mut fifo = Fifo::default();
        fifo.push_back(envelope(1, 10), 0);
        assert_eq!(fifo.pop_front().map(|e| e.expires_ms), Some(10));
        assert!(matches!(fifo, Fifo::Empty) && fifo.pop_front().is_none());
        fifo.push_back(envelope(4, 40), 16);
        assert!(matches!(&fifo, Fifo::Many(q) if q.capacity() >= 16));
        fifo.push_back(envelope(5, 50), 16);
        assert_eq!(fifo.pop_front().map(|e| e.expires_ms), Some(40));
        assert_eq!(fifo.pop_front().map(|e| e.expires_ms), Some(50));
        fifo.shrink();
        assert!(
            matches!(fifo, Fifo::Empty),
            "an emptied buffer can be let go"
        );

        // Expiry purges from the head, across the inline message and the buffer alike.
        let mut fifo = Fifo::default();
        fifo.push_back(envelope(1, 10), 0);
        assert_eq!(purge_expired(&mut fifo, 10), 1);
        assert!(fifo.is_empty());
        for (n, at) in [(1, 10), (2, 20), (3, 30)] {
            fifo.push_back(envelope(n, at), 0);
        }
        assert_eq!(purge_expired(&mut fifo, 25), 2);
        assert_eq!(numbers(fifo), [3]);
    }

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::Relaxed)
    }

    /// A deferring push of a message that never expires.
    fn push_x(registry: &LocalChannels, mailbox: &Arc<Mailbox>, wakes: &mut DeferredWakes) -> Push {
        mailbox.push_deferred(
            msg! { "type": "x" },
            0,
            u64::MAX,
            wakes,
            &registry.inner.watch,
        )
    }

    #[test]
    fn a_deferred_wake_is_listed_once_and_never_lost() {
        let registry = LocalChannels::new("test");
        let inbox = registry.open(10);
        let mailbox = inbox.mailbox().clone();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        mailbox.register(&mut Context::from_waker(&waker));

        let mut wakes = DeferredWakes::new(true);
        for _ in 0..3 {
            let pushed = push_x(&registry, &mailbox, &mut wakes);
            assert_eq!(pushed, Push::Queued { expired: 0 });
        }
        assert_eq!(wakes.mailboxes.len(), 1, "three pushes, one wake owed");
        assert_eq!(woken(&count), 0, "the wake waits for the list");
        drop(wakes);
        assert_eq!(woken(&count), 1, "a dropped list runs the wakes it owed");

        // Once run, the next deferring push lists the mailbox again.
        mailbox.register(&mut Context::from_waker(&waker));
        let mut wakes = DeferredWakes::new(true);
        push_x(&registry, &mailbox, &mut wakes);
        assert_eq!(wakes.mailboxes.len(), 1);
        registry.start_wakes(wakes); // no runtime here: all at once
        assert_eq!(woken(&count), 2);
        assert_eq!(registry.take_all(inbox.mailbox()).messages.len(), 4);
    }

    #[test]
    fn a_polling_owner_is_not_listed_and_finds_the_message_before_it_sleeps() {
        let registry = LocalChannels::new("test");
        let inbox = registry.open(10);
        let mailbox = inbox.mailbox().clone();
        mailbox.begin_poll();
        let mut wakes = DeferredWakes::new(true);
        push_x(&registry, &mailbox, &mut wakes);
        assert!(wakes.mailboxes.is_empty());
        assert!(mailbox.end_poll(false), "the owner sees it before sleeping");
    }
}
