//! The channel layer: named FIFO channels and broadcast groups that any task (or, with a shared
//! backend, any process) can send to.
//!
//! [`ChannelLayer`] is the interface; [`MemoryLayer`] is the in-process default. Every layer owns
//! a [`LocalChannels`] registry of process-local mailboxes: a connection's reply channel is one
//! of them, and a message addressed to it is handed over directly, without serialization.
//!
//! Semantics follow Channels: at-most-once delivery, FIFO per channel, messages expire (60 s by
//! default), channels are bounded (100 by default) and a full channel is a
//! [`LayerError::ChannelFull`] to the sender, while `group_send` skips full members. Every message
//! dropped anywhere is counted in [`LayerStats`] and logged (at most once a second per reason).

mod capacity;
mod local;
mod memory;
mod names;
mod redis;
mod stats;

use std::time::Duration;

use async_trait::async_trait;

pub use self::redis::{
    PROCESS_KEY_CAPACITY_FACTOR, RedisConfig, RedisLayer, consistent_hash, redact,
};
pub use capacity::CapacityRule;
pub(crate) use local::{Fifo, Mailbox, Signal};
pub use local::{Inbox, LocalChannels};
pub use memory::MemoryLayer;
pub use names::{
    MAX_NAME_LENGTH, NameProblem, check_channel_name, check_group_name, non_local_name,
};
pub use stats::{DropReason, LayerStats};

use crate::message::{Message, MessageError};

/// The reserved key `channels_redis` uses to route process-local messages; callers may not set it.
pub const RESERVED_CHANNEL_KEY: &str = "__asgi_channel__";

/// Errors from the channel layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// A channel name broke the naming rules.
    #[error("invalid channel name {name:?}: {problem}")]
    InvalidChannelName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// A group name broke the naming rules.
    #[error("invalid group name {name:?}: {problem}")]
    InvalidGroupName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        problem: NameProblem,
    },
    /// The channel holds its capacity of unread messages; the message was not sent.
    #[error("channel {0:?} is full")]
    ChannelFull(String),
    /// The message is larger than the layer accepts.
    #[error("message of {size} bytes is larger than the layer's limit of {limit} bytes")]
    MessageTooLarge {
        /// Encoded size of the message.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message is not one a consumer can handle (no `type`, or a reserved key).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A process-local channel that belongs to another process, or no longer exists, was read.
    #[error("channel {0:?} cannot be received from in this process")]
    NotLocal(String),
    /// The layer was closed (server shutting down).
    #[error("the channel layer is closed")]
    Closed,
    /// The backend could not be reached or answered with an error.
    #[error("channel layer backend unavailable: {0}")]
    Backend(String),
    /// A message read from the backend could not be decoded.
    #[error(transparent)]
    Codec(#[from] MessageError),
}

impl LayerError {
    pub(crate) fn channel_name(name: &str, problem: NameProblem) -> Self {
        LayerError::InvalidChannelName {
            name: truncate(name),
            problem,
        }
    }

    pub(crate) fn group_name(name: &str, problem: NameProblem) -> Self {
        LayerError::InvalidGroupName {
            name: truncate(name),
            problem,
        }
    }
}

/// Keeps error messages bounded when a client sends a megabyte-long "name".
fn truncate(name: &str) -> String {
    let mut end = name.len().min(120);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Validates a channel name into a typed error.
pub fn validate_channel(name: &str) -> Result<(), LayerError> {
    check_channel_name(name).map_err(|p| LayerError::channel_name(name, p))
}

/// Validates a group name into a typed error.
pub fn validate_group(name: &str) -> Result<(), LayerError> {
    check_group_name(name).map_err(|p| LayerError::group_name(name, p))
}

/// Settings shared by every layer, with Channels' defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LayerConfig {
    /// How long an unread message lives (Channels: 60 s).
    pub expiry: Duration,
    /// How long a group membership lives after its latest `group_add` (Channels: 86400 s).
    pub group_expiry: Duration,
    /// Unread messages a channel holds before `send` fails with `ChannelFull` (Channels: 100).
    pub capacity: usize,
    /// Per-channel capacity overrides, first match wins, matched against the full channel name.
    pub channel_capacity: Vec<CapacityRule>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig {
            expiry: Duration::from_secs(60),
            group_expiry: Duration::from_secs(86_400),
            capacity: 100,
            channel_capacity: Vec::new(),
        }
    }
}

impl LayerConfig {
    /// The capacity that applies to `channel`.
    pub fn capacity_for(&self, channel: &str) -> usize {
        self.rule_for(channel).unwrap_or(self.capacity)
    }

    /// The capacity of the first `channel_capacity` rule matching `channel`, if one does.
    pub fn rule_for(&self, channel: &str) -> Option<usize> {
        self.channel_capacity
            .iter()
            .find(|rule| rule.matches(channel))
            .map(|rule| rule.capacity)
    }

    /// Sets the expiry of unread messages.
    pub fn with_expiry(mut self, expiry: Duration) -> Self {
        self.expiry = expiry;
        self
    }

    /// Sets the group membership expiry.
    pub fn with_group_expiry(mut self, expiry: Duration) -> Self {
        self.group_expiry = expiry;
        self
    }

    /// Sets the default channel capacity.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Adds a capacity override.
    pub fn with_channel_capacity(mut self, rule: CapacityRule) -> Self {
        self.channel_capacity.push(rule);
        self
    }
}

/// A channel layer backend.
///
/// All methods are cancel-safe: dropping a `send`/`group_*` future either completed the
/// operation or did nothing; dropping a `receive` future loses no message.
#[async_trait]
pub trait ChannelLayer: Send + Sync + 'static {
    /// Sends `message` to `channel`. Never waits for room: a full channel is
    /// [`LayerError::ChannelFull`].
    async fn send(&self, channel: &str, message: Message) -> Result<(), LayerError>;

    /// Waits for the next message on `channel`. Process-local channels (`…!…`) can only be read
    /// by the process that created them, by one reader at a time.
    async fn receive(&self, channel: &str) -> Result<Message, LayerError>;

    /// Creates a process-local channel and returns its name; read it with [`receive`](Self::receive).
    async fn new_channel(&self) -> Result<String, LayerError>;

    /// Adds `channel` to `group` (idempotent; refreshes the membership's expiry).
    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Removes `channel` from `group` (a no-op if it is not a member).
    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError>;

    /// Sends `message` to every member of `group`. Full members are skipped and counted; this
    /// never fails with `ChannelFull`.
    async fn group_send(&self, group: &str, message: Message) -> Result<(), LayerError>;

    /// Drops every channel, message and group.
    async fn flush(&self) -> Result<(), LayerError>;

    /// The registry of this process's local mailboxes (connection reply channels).
    fn local(&self) -> &LocalChannels;

    /// Opens a process-local channel owned by the returned inbox (a connection's reply
    /// channel), with the capacity configured for local channels.
    fn new_inbox(&self) -> Inbox;

    /// Groups known to this process with their member counts, if the layer can tell.
    fn group_sizes(&self) -> Option<Vec<(String, usize)>> {
        None
    }

    /// A snapshot of the layer's counters.
    fn stats(&self) -> LayerStats;

    /// Whether messages sent here can reach other processes (Redis: yes; memory: no).
    fn is_shared(&self) -> bool {
        false
    }
}

/// Checks a message a caller wants to send: it must not carry the reserved routing key.
pub(crate) fn check_outgoing(message: &Message) -> Result<(), LayerError> {
    if message.get(RESERVED_CHANNEL_KEY).is_some() {
        return Err(LayerError::InvalidMessage(format!(
            "the {RESERVED_CHANNEL_KEY:?} key is reserved for the layer"
        )));
    }
    Ok(())
}

/// Turns a Channels-1-style message without a `type` into the typed command it stands for, so
/// what travels through the layer is always typed: `{"text": …}`/`{"bytes": …}` →
/// `websocket.send`, `{"accept": true}` → `websocket.accept`, `{"accept": false}` or
/// `{"close": true | code}` → `websocket.close`. Other keys are kept (`websocket.send` honours a
/// `close` key after sending, as Channels 1 did). Typed messages pass through untouched.
pub fn normalize(message: Message) -> Message {
    if message.get(crate::message::TYPE_KEY).is_some() {
        return message;
    }
    let has_payload = message.get("text").is_some() || message.get("bytes").is_some();
    let kind = if has_payload {
        "websocket.send"
    } else if let Some(accept) = message.get("accept").and_then(|v| v.as_bool()) {
        if accept {
            "websocket.accept"
        } else {
            "websocket.close"
        }
    } else if message.get("close").is_some() {
        "websocket.close"
    } else {
        return message;
    };
    let mut message = message;
    if kind == "websocket.close"
        && let Some(code) = message.get("close").and_then(|v| v.as_i64())
    {
        message.insert("code", code);
    }
    message.with(crate::message::TYPE_KEY, kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg;

    #[test]
    fn seed_style_messages_become_typed_commands() {
        let m = normalize(msg! { "text": "hi" });
        assert_eq!(m.kind(), Some("websocket.send"));
        assert_eq!(
            normalize(msg! { "accept": true }).kind(),
            Some("websocket.accept")
        );
        assert_eq!(
            normalize(msg! { "accept": false }).kind(),
            Some("websocket.close")
        );
        let closed = normalize(msg! { "close": 4000 });
        assert_eq!(closed.kind(), Some("websocket.close"));
        assert_eq!(closed.int("code"), Ok(4000));
        assert_eq!(
            normalize(msg! { "close": true }).kind(),
            Some("websocket.close")
        );
        // Typed messages are left alone, untyped unknown ones too.
        let typed = msg! { "type": "chat.message", "text": "x" };
        assert!(normalize(typed.clone()).ptr_eq(&typed));
        assert_eq!(normalize(msg! { "foo": 1 }).kind(), None);
    }

    #[test]
    fn capacity_overrides_first_match_wins() {
        let config = LayerConfig::default()
            .with_channel_capacity(CapacityRule::glob("http.response!*", 10).unwrap())
            .with_channel_capacity(CapacityRule::regex(r"^http\.", 20).unwrap());
        assert_eq!(config.capacity_for("http.response!abc"), 10);
        assert_eq!(config.capacity_for("http.request"), 20);
        assert_eq!(config.capacity_for("chat"), 100);
    }
}
