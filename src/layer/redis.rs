//! The Redis channel layer, byte-compatible with Python's `channels_redis` (core layer, 4.x).
//!
//! Storage is exactly what `channels_redis` stores, so Django processes and canal processes share
//! one layer:
//!
//! - a channel `foo` is the sorted set `<prefix>foo`; a process-local channel
//!   `specific.<process>!<id>` lives in its process's set `<prefix>specific.<process>!`;
//! - a member is 12 random bytes followed by the msgpack of the message (optionally Fernet-
//!   encrypted), scored by the sender's unix time; the set expires 60 s after the last send;
//! - process-local messages carry `__asgi_channel__`: a string on `send`, a list on `group_send`
//!   (one bundled copy per process key);
//! - a group `g` is the sorted set `<prefix>:group:g` of channel names scored by join time,
//!   expiring after `group_expiry`;
//! - several hosts are a shard ring keyed by `crc32(name) & 0xfff`.
//!
//! canal fixes three `channels_redis` bugs without changing the format: a direct send to a
//! process channel goes to the shard its receiver reads (B1; canal also reads its own process key
//! on every shard, so it still gets such messages from Python senders); a group send purges
//! expired entries on the shard it writes to (B2); and receives use a plain `BZPOPMIN` with no
//! `$inflight` backup, so no message is ever delivered twice (B3).
//!
//! Each shard has one managed connection for commands and, per process, one dedicated connection
//! (no response timeout) running the `BZPOPMIN` loop on this process's key, which demultiplexes
//! into the local mailboxes. Messages to local channels never touch Redis. Memberships of live
//! local channels are refreshed before they expire and re-added after Redis comes back from an
//! outage. Messages that were inside Redis when it died are gone: Redis without persistence keeps
//! nothing, and canal cannot know what it held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use parking_lot::Mutex;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use sha2::Digest;

use super::local::Push;
use super::stats::{Counters, DropReason};
use super::{
    ChannelLayer, Inbox, LayerConfig, LayerError, LayerStats, LocalChannels, RESERVED_CHANNEL_KEY,
    check_outgoing, non_local_name, normalize, validate_channel, validate_group,
};
use crate::message::{Message, Value};

/// What `BZPOPMIN` answers: key, member, score (nil on timeout).
type Popped = Option<(Vec<u8>, Vec<u8>, f64)>;

/// `channels_redis`'s `brpop_timeout`: how long one blocking pop waits.
const BLOCK_SECS: u64 = 5;
/// Messages taken per `ZPOPMIN` when the receive loop drains a backlog: a process's key holds
/// at most its capacity (100 by default) for all its connections together, so a loop that
/// popped one message per round trip could fall behind a burst of group sends from other
/// processes, and the key would refuse the rest as full.
const DRAIN_BATCH: usize = 256;

/// A process key (`specific.<process>!`) carries the messages of every channel of one
/// process (thousands of connections under `canal serve --workers`), so unless a
/// `channel_capacity` rule names the channel, canal checks it against this many times the
/// channel capacity: 1,000 by default. channels_redis checks it against the channel's own
/// capacity (100); Python senders keep doing that, with their own settings.
pub const PROCESS_KEY_CAPACITY_FACTOR: usize = 10;
/// Cap of the reconnect backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Connect timeout for every Redis connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout for ordinary commands (blocking pops use their own connections).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Send with capacity check, as `channels_redis`' four round trips but atomic and in one.
/// `KEYS[1]` channel key; `ARGV`: member, capacity, purge-until score, score, expiry.
static SEND_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[3])
if redis.call('ZCOUNT', KEYS[1], '-inf', '+inf') >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
",
    )
});

/// `channels_redis`' group send script: KEYS = channel keys; ARGV = messages, capacities, now,
/// expiry. Returns how many keys were over capacity.
static GROUP_SEND_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local over_capacity = 0
local current_time = ARGV[#ARGV - 1]
local expiry = ARGV[#ARGV]
for i=1,#KEYS do
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], current_time, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
",
    )
});

/// `channels_redis`' flush script: deletes every key under the prefix.
static FLUSH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local keys = redis.call('keys', ARGV[1])
for i=1,#keys,5000 do
    redis.call('del', unpack(keys, i, math.min(i+4999, #keys)))
end
return #keys
",
    )
});

/// Settings of the Redis layer, with `channels_redis`' defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Redis URLs (`redis://[:password@]host:port[/db]`, `rediss://…` needs a TLS build); several
    /// form a shard ring, in this order (the order must match the Python processes').
    pub hosts: Vec<String>,
    /// Key prefix (`channels_redis`: `"asgi"`).
    pub prefix: String,
    /// Expiry, group expiry, capacity and capacity overrides.
    pub layer: LayerConfig,
    /// Random bytes before each stored message (`channels_redis`: 12).
    pub random_prefix_length: usize,
    /// `symmetric_encryption_keys`: the first encrypts, all decrypt. Empty: no encryption.
    pub symmetric_encryption_keys: Vec<String>,
    /// How often memberships of live local channels are refreshed (default: a quarter of the
    /// group expiry, at most an hour).
    pub refresh_interval: Option<Duration>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field(
                "hosts",
                &self.hosts.iter().map(|h| redact(h)).collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("layer", &self.layer)
            .field("random_prefix_length", &self.random_prefix_length)
            .field("encrypted", &!self.symmetric_encryption_keys.is_empty())
            .finish()
    }
}

impl RedisConfig {
    /// Settings for `hosts` with every default.
    pub fn new(hosts: Vec<String>) -> Self {
        RedisConfig {
            hosts,
            prefix: "asgi".to_owned(),
            layer: LayerConfig::default(),
            random_prefix_length: 12,
            symmetric_encryption_keys: Vec::new(),
            refresh_interval: None,
        }
    }

    /// Parses `redis://a:6379,redis://b:6379` (entries without a scheme get `redis://`).
    pub fn from_urls(list: &str) -> Self {
        let hosts = list
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains("://") {
                    h.to_owned()
                } else {
                    format!("redis://{h}")
                }
            })
            .collect();
        RedisConfig::new(hosts)
    }
}

/// A URL with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_auth, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `channels_redis`' `_consistent_hash`: `(crc32(name) & 0xfff) * n / 4096`.
pub fn consistent_hash(name: &str, ring_size: usize) -> usize {
    if ring_size <= 1 {
        return 0;
    }
    let big = (crc32fast::hash(name.as_bytes()) & 0xFFF) as usize;
    big * ring_size / 4096
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Fernet keys derived as `channels_redis` does: `urlsafe_b64(sha256(key))`.
struct Crypto {
    keys: Vec<fernet::Fernet>,
    ttl: u64,
}

impl Crypto {
    fn new(keys: &[String], ttl: u64) -> Result<Option<Crypto>, LayerError> {
        if keys.is_empty() {
            return Ok(None);
        }
        let mut fernets = Vec::new();
        for key in keys {
            let digest = sha2::Sha256::digest(key.as_bytes());
            let encoded = base64::engine::general_purpose::URL_SAFE.encode(digest);
            let fernet = fernet::Fernet::new(&encoded)
                .ok_or_else(|| LayerError::Backend("invalid encryption key".into()))?;
            fernets.push(fernet);
        }
        Ok(Some(Crypto { keys: fernets, ttl }))
    }

    fn encrypt(&self, data: &[u8]) -> Vec<u8> {
        match self.keys.first() {
            Some(k) => k.encrypt(data).into_bytes(),
            None => data.to_vec(),
        }
    }

    fn decrypt(&self, token: &[u8]) -> Option<Vec<u8>> {
        let token = std::str::from_utf8(token).ok()?;
        self.keys
            .iter()
            .find_map(|k| k.decrypt_with_ttl(token, self.ttl).ok())
    }
}

struct Shard {
    client: redis::Client,
    /// host:port for logs (never the password).
    label: String,
    manager: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Dedicated connections for blocking pops on named channels, reused between receives.
    blocking: Mutex<Vec<MultiplexedConnection>>,
}

impl Shard {
    async fn manager(&self) -> Result<ConnectionManager, LayerError> {
        let mut slot = self.manager.lock().await;
        if let Some(m) = slot.as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(MAX_BACKOFF);
        let manager = self
            .client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| backend(&self.label, &e))?;
        *slot = Some(manager.clone());
        Ok(manager)
    }

    async fn blocking_conn(&self) -> Result<MultiplexedConnection, LayerError> {
        if let Some(conn) = self.blocking.lock().pop() {
            return Ok(conn);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| backend(&self.label, &e))
    }
}

fn backend(label: &str, e: &redis::RedisError) -> LayerError {
    // redis-rs errors name the address, not the URL, so no password can leak here.
    LayerError::Backend(format!("redis {label}: {e}"))
}

/// The Redis channel layer. Cheap to clone.
#[derive(Clone)]
pub struct RedisLayer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLayer")
            .field("config", &self.inner.config)
            .field("process", &self.inner.local.prefix())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: RedisConfig,
    shards: Vec<Shard>,
    local: LocalChannels,
    crypto: Option<Crypto>,
    /// group → ids of local channels that joined it (refreshed, re-added after outages).
    memberships: Mutex<HashMap<Box<str>, HashSet<u64>>>,
    /// Messages popped for a named-channel receive that was cancelled meanwhile.
    orphans: Mutex<HashMap<Box<str>, VecDeque<Message>>>,
    loops_started: AtomicBool,
    /// Shards whose receive loop is connected right now.
    shards_up: AtomicUsize,
    round_robin: AtomicUsize,
}

impl RedisLayer {
    /// A layer on `config.hosts`. Connects lazily: building it never fails for a Redis that is
    /// down (calls fail with [`LayerError::Backend`] until it is back), only for bad URLs or keys.
    pub fn new(config: RedisConfig) -> Result<Self, LayerError> {
        if config.hosts.is_empty() {
            return Err(LayerError::Backend("no Redis host given".into()));
        }
        let mut shards = Vec::new();
        for url in &config.hosts {
            let client = redis::Client::open(url.as_str()).map_err(|e| {
                LayerError::Backend(format!("invalid Redis URL {}: {e}", redact(url)))
            })?;
            let label = match &client.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
                other => format!("{other:?}"),
            };
            shards.push(Shard {
                client,
                label,
                manager: tokio::sync::Mutex::new(None),
                blocking: Mutex::new(Vec::new()),
            });
        }
        let ttl = config.layer.expiry.as_secs() + 10;
        let crypto = Crypto::new(&config.symmetric_encryption_keys, ttl)?;
        let process: String = (0..32)
            .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
            .collect();
        Ok(RedisLayer {
            inner: Arc::new(Inner {
                local: LocalChannels::new(&process),
                config,
                shards,
                crypto,
                memberships: Mutex::new(HashMap::new()),
                orphans: Mutex::new(HashMap::new()),
                loops_started: AtomicBool::new(false),
                shards_up: AtomicUsize::new(0),
                round_robin: AtomicUsize::new(0),
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// True when every shard's receive loop is connected.
    pub fn is_healthy(&self) -> bool {
        self.inner.shards_up.load(Ordering::Relaxed) == self.inner.shards.len()
    }

    /// Re-adds every membership of this process's live channels now (done automatically on a
    /// timer and after an outage).
    pub async fn refresh_memberships(&self) -> Result<(), LayerError> {
        self.inner.refresh_memberships().await
    }

    /// Starts the receive loops (one per shard) on a thread of their own, and the membership
    /// refresher on the caller's runtime.
    ///
    /// The receive loops drain this process's key into the local mailboxes. On the server's
    /// runtime they would wait their turn behind every connection task a broadcast woke (with
    /// one thread per `--workers` process, thousands of them), while other processes keep
    /// adding to the key, whose capacity is bounded ([`Inner::key_capacity`]): on a thread of
    /// their own they drain as soon as Redis answers. If that thread cannot be started they
    /// run on the server's runtime.
    fn ensure_loops(&self) {
        if self.inner.loops_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.inner.loops_started.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let shards = self.inner.shards.len();
        let main = handle.clone();
        let started = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|runtime| {
                std::thread::Builder::new()
                    .name("canal-redis-rx".to_owned())
                    .spawn(move || {
                        runtime.block_on(async move {
                            let mut loops = tokio::task::JoinSet::new();
                            for index in 0..shards {
                                loops.spawn(receive_loop(weak.clone(), index, main.clone()));
                            }
                            while loops.join_next().await.is_some() {}
                        });
                    })
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "could not start the Redis receive thread; receiving on the server's runtime");
            for index in 0..shards {
                handle.spawn(receive_loop(
                    Arc::downgrade(&self.inner),
                    index,
                    handle.clone(),
                ));
            }
        }
        handle.spawn(refresher(Arc::downgrade(&self.inner)));
    }
}

impl Inner {
    fn counters(&self) -> &Counters {
        self.local.counters()
    }

    /// The capacity a send to `channel` checks its Redis key against: the channel's own, or
    /// for a process-specific channel without a rule of its own, the process key's
    /// ([`PROCESS_KEY_CAPACITY_FACTOR`]).
    fn key_capacity(&self, channel: &str) -> usize {
        let layer = &self.config.layer;
        match layer.rule_for(channel) {
            Some(capacity) => capacity,
            None if channel.contains('!') => {
                layer.capacity.saturating_mul(PROCESS_KEY_CAPACITY_FACTOR)
            }
            None => layer.capacity,
        }
    }

    /// Capacity of this process's local channels (overrides match the process prefix).
    fn local_capacity(&self) -> usize {
        self.config.layer.capacity_for(self.local.prefix())
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.config.prefix)
    }

    fn group_key(&self, group: &str) -> String {
        format!("{}:group:{group}", self.config.prefix)
    }

    fn expiry(&self) -> u64 {
        self.config.layer.expiry.as_secs().max(1)
    }

    /// The stored form: random prefix, then msgpack (encrypted when configured).
    fn serialize(&self, message: &Message) -> Vec<u8> {
        let n = self.config.random_prefix_length;
        let mut out = Vec::with_capacity(n + 64);
        out.extend((0..n).map(|_| fastrand::u8(..)));
        match &self.crypto {
            None => message.write_msgpack(&mut out),
            Some(crypto) => out.extend(crypto.encrypt(&message.to_msgpack())),
        }
        out
    }

    fn deserialize(&self, member: &[u8]) -> Result<Message, LayerError> {
        let body = member
            .get(self.config.random_prefix_length..)
            .ok_or_else(|| LayerError::Backend("stored message shorter than its prefix".into()))?;
        match &self.crypto {
            None => Ok(Message::from_msgpack(body)?),
            Some(crypto) => {
                let plain = crypto.decrypt(body).ok_or_else(|| {
                    LayerError::Backend(
                        "message could not be decrypted (wrong key or expired)".into(),
                    )
                })?;
                Ok(Message::from_msgpack(&plain)?)
            }
        }
    }

    fn deliver_local(&self, id: u64, message: Message) -> bool {
        let Some(mailbox) = self.local.get(id) else {
            self.counters()
                .drop(DropReason::NoReceiver, 1, &self.local.name_of(id));
            return false;
        };
        let expiry = self.config.layer.expiry.as_millis() as u64;
        match self.local.deliver(&mailbox, message, expiry) {
            Push::Queued { .. } => true,
            Push::Full { .. } => {
                self.counters()
                    .drop(DropReason::ChannelFull, 1, &self.local.name_of(id));
                false
            }
            Push::Closed => {
                self.counters()
                    .drop(DropReason::NoReceiver, 1, &self.local.name_of(id));
                false
            }
        }
    }

    /// Routes a message popped from this process's key to the local channels it names.
    fn demultiplex(&self, member: &[u8], score: f64) {
        let mut message = match self.deserialize(member) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message on the process channel dropped");
                self.counters()
                    .drop(DropReason::Backend, 1, self.local.prefix());
                return;
            }
        };
        let targets = match message.remove(RESERVED_CHANNEL_KEY) {
            Some(Value::Str(name)) => vec![name.to_string()],
            Some(Value::List(names)) => names
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => {
                self.counters()
                    .drop(DropReason::NoReceiver, 1, self.local.prefix());
                return;
            }
        };
        if score < now_secs() - self.expiry() as f64 {
            self.counters().drop(
                DropReason::Expired,
                targets.len() as u64,
                self.local.prefix(),
            );
            return;
        }
        for name in targets {
            match self.local.parse(&name) {
                Some(id) => {
                    self.deliver_local(id, message.clone());
                }
                None => self.counters().drop(DropReason::NoReceiver, 1, &name),
            }
        }
    }

    async fn refresh_memberships(&self) -> Result<(), LayerError> {
        let snapshot: Vec<(String, Vec<u64>)> = self
            .memberships
            .lock()
            .iter()
            .map(|(g, ids)| (g.to_string(), ids.iter().copied().collect()))
            .collect();
        let now = now_secs();
        let group_expiry = self.config.layer.group_expiry.as_secs().max(1);
        for (group, ids) in snapshot {
            let (live, dead): (Vec<u64>, Vec<u64>) = ids
                .into_iter()
                .partition(|id| self.local.get(*id).is_some());
            let shard = &self.shards[consistent_hash(&group, self.shards.len())];
            let mut conn = shard.manager().await?;
            let key = self.group_key(&group);
            let mut pipe = redis::pipe();
            for id in &live {
                pipe.zadd(&key, self.local.name_of(*id), now).ignore();
            }
            for id in &dead {
                pipe.zrem(&key, self.local.name_of(*id)).ignore();
            }
            if !live.is_empty() {
                pipe.expire(&key, group_expiry as i64).ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| backend(&shard.label, &e))?;
            if !dead.is_empty() {
                let mut memberships = self.memberships.lock();
                if let Some(set) = memberships.get_mut(group.as_str()) {
                    for id in dead {
                        set.remove(&id);
                    }
                    if set.is_empty() {
                        memberships.remove(group.as_str());
                    }
                }
            }
        }
        Ok(())
    }

    /// One blocking pop on a named channel, trying the shards in turn.
    async fn pop_named(&self, channel: &str) -> Result<Message, LayerError> {
        let key = self.key(channel);
        let n = self.shards.len();
        let block = if n == 1 { BLOCK_SECS as f64 } else { 1.0 };
        loop {
            let index = self.round_robin.fetch_add(1, Ordering::Relaxed) % n;
            let shard = &self.shards[index];
            let mut conn = shard.blocking_conn().await?;
            let popped: Popped = redis::cmd("BZPOPMIN")
                .arg(&key)
                .arg(block)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&shard.label, &e))?;
            shard.blocking.lock().push(conn);
            let Some((_key, member, score)) = popped else {
                continue;
            };
            if score < now_secs() - self.expiry() as f64 {
                self.counters().drop(DropReason::Expired, 1, channel);
                continue;
            }
            let mut message = self.deserialize(&member)?;
            message.remove(RESERVED_CHANNEL_KEY);
            return Ok(message);
        }
    }
}

/// The process's receive loop on one shard: `BZPOPMIN <prefix>specific.<process>!` forever,
/// reconnecting with a backoff capped at one second, demultiplexing into local mailboxes.
/// `main` is the server's runtime: the membership refresh after a reconnect runs there, where
/// the layer's other Redis connections live.
async fn receive_loop(inner: Weak<Inner>, index: usize, main: tokio::runtime::Handle) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let key = strong.key(strong.local.prefix());
    let label = strong.shards[index].label.clone();
    drop(strong);
    let mut backoff = Duration::from_millis(50);
    let mut ever_up = false;
    let mut down_logged = false;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let connected = strong.shards[index]
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                if !down_logged {
                    tracing::warn!(redis = %label, error = %e, "Redis unreachable; retrying every second at most");
                    down_logged = true;
                }
                drop(strong);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        strong.shards_up.fetch_add(1, Ordering::Relaxed);
        if down_logged || ever_up {
            tracing::info!(redis = %label, "Redis is back; re-adding group memberships");
            let inner2 = strong.clone();
            main.spawn(async move {
                if let Err(e) = inner2.refresh_memberships().await {
                    tracing::warn!(error = %e, "could not re-add memberships yet");
                }
            });
        } else {
            tracing::debug!(redis = %label, "receive loop connected");
        }
        ever_up = true;
        drop(strong);
        loop {
            let popped: redis::RedisResult<Popped> = redis::cmd("BZPOPMIN")
                .arg(&key)
                .arg(BLOCK_SECS)
                .query_async(&mut conn)
                .await;
            let Some(strong) = inner.upgrade() else {
                return;
            };
            // After a blocking pop, whatever else is waiting is taken in batches.
            let popped = match popped {
                Ok(Some((_key, member, score))) => {
                    strong.demultiplex(&member, score);
                    drain_backlog(&strong, &mut conn, &key).await
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = popped {
                strong.shards_up.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(redis = %label, error = %e, "Redis connection lost; reconnecting");
                down_logged = true;
                break;
            }
        }
    }
}

/// Takes what waits in this process's key, [`DRAIN_BATCH`] messages per round trip, oldest
/// (lowest score) first, until a batch comes back short.
async fn drain_backlog(
    inner: &Inner,
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> redis::RedisResult<()> {
    loop {
        let batch: Vec<(Vec<u8>, f64)> = redis::cmd("ZPOPMIN")
            .arg(key)
            .arg(DRAIN_BATCH)
            .query_async(conn)
            .await?;
        for (member, score) in &batch {
            inner.demultiplex(member, *score);
        }
        if batch.len() < DRAIN_BATCH {
            return Ok(());
        }
    }
}

/// Refreshes memberships of live local channels well before `group_expiry` runs out.
async fn refresher(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(strong) => strong.config.refresh_interval.unwrap_or_else(|| {
            (strong.config.layer.group_expiry / 4)
                .min(Duration::from_secs(3600))
                .max(Duration::from_secs(1))
        }),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if let Err(e) = strong.refresh_memberships().await {
            tracing::warn!(error = %e, "membership refresh failed; will retry");
        }
    }
}

#[async_trait]
impl ChannelLayer for RedisLayer {
    async fn send(&self, channel: &str, message: Message) -> Result<(), LayerError> {
        validate_channel(channel)?;
        check_outgoing(&message)?;
        let message = normalize(message);
        let inner = &self.inner;
        if let Some(id) = inner.local.parse(channel) {
            // Our own process: straight into the mailbox, no Redis, no serialization.
            return match inner.local.get(id) {
                None => {
                    inner.counters().drop(DropReason::NoReceiver, 1, channel);
                    Ok(())
                }
                Some(_) if inner.deliver_local(id, message) => {
                    inner.counters().sent.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Some(_) => Err(LayerError::ChannelFull(channel.to_owned())),
            };
        }
        let (key, shard_index, message) = if channel.contains('!') {
            let non_local = non_local_name(channel);
            (
                inner.key(non_local),
                // B1: the receiver reads the shard of the non-local name; send there.
                consistent_hash(non_local, inner.shards.len()),
                message.with(RESERVED_CHANNEL_KEY, channel),
            )
        } else {
            let index = inner.round_robin.fetch_add(1, Ordering::Relaxed) % inner.shards.len();
            (inner.key(channel), index, message)
        };
        let shard = &inner.shards[shard_index];
        let now = now_secs();
        let member = inner.serialize(&message);
        let capacity = inner.key_capacity(channel);
        let result: Result<i64, LayerError> = async {
            let mut conn = shard.manager().await?;
            SEND_SCRIPT
                .key(&key)
                .arg(member)
                .arg(capacity)
                .arg(now as i64 - inner.expiry() as i64)
                .arg(now)
                .arg(inner.expiry())
                .invoke_async(&mut conn)
                .await
                .map_err(|e| backend(&shard.label, &e))
        }
        .await;
        match result {
            Ok(1) => {
                inner.counters().sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(_) => {
                inner.counters().drop(DropReason::ChannelFull, 1, channel);
                Err(LayerError::ChannelFull(channel.to_owned()))
            }
            Err(e) => {
                inner.counters().drop(DropReason::Backend, 1, channel);
                Err(e)
            }
        }
    }

    async fn receive(&self, channel: &str) -> Result<Message, LayerError> {
        validate_channel(channel)?;
        let inner = &self.inner;
        if inner.local.is_local(channel) {
            self.ensure_loops();
            return inner.local.receive(channel).await;
        }
        if channel.contains('!') {
            return Err(LayerError::NotLocal(channel.to_owned()));
        }
        if let Some(message) = inner
            .orphans
            .lock()
            .get_mut(channel)
            .and_then(VecDeque::pop_front)
        {
            return Ok(message);
        }
        // The pop runs in its own task: if this receive is cancelled, a popped message is kept
        // for the next receive instead of being lost.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task_inner = inner.clone();
        let name = channel.to_owned();
        tokio::spawn(async move {
            let result = task_inner.pop_named(&name).await;
            if let Err(Ok(message)) = tx.send(result) {
                task_inner
                    .orphans
                    .lock()
                    .entry(name.into_boxed_str())
                    .or_default()
                    .push_back(message);
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(LayerError::Backend("receive task ended".into())))
    }

    async fn new_channel(&self) -> Result<String, LayerError> {
        self.ensure_loops();
        Ok(self.inner.local.open_detached(self.inner.local_capacity()))
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group(group)?;
        validate_channel(channel)?;
        let inner = &self.inner;
        if let Some(id) = inner.local.parse(channel) {
            inner
                .memberships
                .lock()
                .entry(Box::from(group))
                .or_default()
                .insert(id);
        }
        let shard = &inner.shards[consistent_hash(group, inner.shards.len())];
        let key = inner.group_key(group);
        let mut conn = shard.manager().await?;
        redis::pipe()
            .zadd(&key, channel, now_secs())
            .ignore()
            .expire(
                &key,
                inner.config.layer.group_expiry.as_secs().max(1) as i64,
            )
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| backend(&shard.label, &e))
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        validate_group(group)?;
        validate_channel(channel)?;
        let inner = &self.inner;
        if let Some(id) = inner.local.parse(channel) {
            let mut memberships = inner.memberships.lock();
            if let Some(set) = memberships.get_mut(group) {
                set.remove(&id);
                if set.is_empty() {
                    memberships.remove(group);
                }
            }
        }
        let shard = &inner.shards[consistent_hash(group, inner.shards.len())];
        let mut conn = shard.manager().await?;
        conn.zrem::<_, _, ()>(inner.group_key(group), channel)
            .await
            .map_err(|e| backend(&shard.label, &e))
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<(), LayerError> {
        validate_group(group)?;
        check_outgoing(&message)?;
        let message = normalize(message);
        let inner = &self.inner;
        inner.counters().group_sends.fetch_add(1, Ordering::Relaxed);
        let now = now_secs();
        let n = inner.shards.len();
        let group_shard = &inner.shards[consistent_hash(group, n)];
        let key = inner.group_key(group);
        let group_expiry = inner.config.layer.group_expiry.as_secs().max(1) as i64;
        let members: Vec<String> = async {
            let mut conn = group_shard.manager().await?;
            let (_, members): ((), Vec<String>) = redis::pipe()
                .zrembyscore(&key, 0, now as i64 - group_expiry)
                .zrange(&key, 0, -1)
                .query_async(&mut conn)
                .await
                .map_err(|e| backend(&group_shard.label, &e))?;
            Ok::<_, LayerError>(members)
        }
        .await
        .inspect_err(|_| inner.counters().drop(DropReason::Backend, 1, group))?;

        // Local members get the shared message directly, and only directly.
        let mut delivered = 0u64;
        let mut remote: Vec<&str> = Vec::new();
        for name in &members {
            match inner.local.parse(name) {
                Some(id) => {
                    if inner.deliver_local(id, message.clone()) {
                        delivered += 1;
                    }
                }
                None => remote.push(name),
            }
        }
        inner
            .counters()
            .group_deliveries
            .fetch_add(delivered, Ordering::Relaxed);
        if remote.is_empty() {
            return Ok(());
        }

        // Bundle the others by Redis key, one copy per key, as channels_redis does.
        struct Bundle<'a> {
            names: Vec<&'a str>,
            capacity: usize,
        }
        let mut by_shard: Vec<Vec<(String, Bundle<'_>)>> = (0..n).map(|_| Vec::new()).collect();
        let mut index_of: HashMap<String, (usize, usize)> = HashMap::new();
        for name in remote {
            let non_local = non_local_name(name);
            let key = inner.key(non_local);
            match index_of.get(&key) {
                Some(&(s, i)) => by_shard[s][i].1.names.push(name),
                None => {
                    let s = consistent_hash(non_local, n);
                    index_of.insert(key.clone(), (s, by_shard[s].len()));
                    by_shard[s].push((
                        key,
                        Bundle {
                            names: vec![name],
                            capacity: inner.key_capacity(name),
                        },
                    ));
                }
            }
        }
        let expiry = inner.expiry();
        let mut failed = None;
        for (s, bundles) in by_shard.into_iter().enumerate() {
            if bundles.is_empty() {
                continue;
            }
            let shard = &inner.shards[s];
            let mut script = GROUP_SEND_SCRIPT.prepare_invoke();
            let mut purge = redis::pipe();
            for (key, _) in &bundles {
                script.key(key);
                // B2: purge expired entries on this shard's own connection.
                purge
                    .zrembyscore(key, 0, now as i64 - expiry as i64)
                    .ignore();
            }
            for (_, bundle) in &bundles {
                let names = Value::List(bundle.names.iter().map(|n| Value::from(*n)).collect());
                script.arg(inner.serialize(&message.clone().with(RESERVED_CHANNEL_KEY, names)));
            }
            for (_, bundle) in &bundles {
                script.arg(bundle.capacity);
            }
            script.arg(now).arg(expiry);
            let result: Result<u64, LayerError> = async {
                let mut conn = shard.manager().await?;
                purge
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| backend(&shard.label, &e))?;
                script
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| backend(&shard.label, &e))
            }
            .await;
            let keys = bundles.len() as u64;
            match result {
                Ok(over) => {
                    inner
                        .counters()
                        .group_deliveries
                        .fetch_add(keys - over.min(keys), Ordering::Relaxed);
                    if over > 0 {
                        inner.counters().drop(DropReason::ChannelFull, over, group);
                    }
                }
                Err(e) => {
                    inner.counters().drop(DropReason::Backend, keys, group);
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn flush(&self) -> Result<(), LayerError> {
        let inner = &self.inner;
        for shard in &inner.shards {
            let mut conn = shard.manager().await?;
            FLUSH_SCRIPT
                .arg(format!("{}*", inner.config.prefix))
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| backend(&shard.label, &e))?;
        }
        inner.memberships.lock().clear();
        inner.orphans.lock().clear();
        inner.local.clear();
        Ok(())
    }

    fn local(&self) -> &LocalChannels {
        &self.inner.local
    }

    fn new_inbox(&self) -> Inbox {
        self.ensure_loops();
        self.inner.local.open(self.inner.local_capacity())
    }

    fn stats(&self) -> LayerStats {
        self.inner.counters().snapshot()
    }

    fn is_shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistent_hash_matches_channels_redis() {
        // Python: binascii.crc32(b"room1") & 0xfff = 2602 → int(2702 / (4096 / 2)) = 1.
        assert_eq!(crc32fast::hash(b"room1") & 0xFFF, 2602);
        assert_eq!(consistent_hash("room1", 2), 1);
        assert_eq!(consistent_hash("room1", 1), 0);
        for n in 1..=8 {
            for name in ["a", "chat", "specific.abc!", "x.y-z_0"] {
                assert!(consistent_hash(name, n) < n);
            }
        }
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("redis://:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("rediss://user:pw@h:1"), "rediss://***@h:1");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let config = RedisConfig::from_urls("redis://:hunter2@a:1,b:2");
        assert_eq!(config.hosts, ["redis://:hunter2@a:1", "redis://b:2"]);
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn encrypted_round_trip_with_key_rotation() {
        let old = Crypto::new(&["old-key".to_owned()], 70).unwrap().unwrap();
        let both = Crypto::new(&["new-key".to_owned(), "old-key".to_owned()], 70)
            .unwrap()
            .unwrap();
        let token = old.encrypt(b"payload");
        assert!(token.starts_with(b"gAAAAA"));
        assert_eq!(both.decrypt(&token).as_deref(), Some(&b"payload"[..]));
        let new_token = both.encrypt(b"x");
        assert!(old.decrypt(&new_token).is_none());
    }
}
