//! Seed-style consumers: the Channels 1.x API of the tutorial this project grew from.
//!
//! Plain async functions are routed by event name, receive a [`Message`] with a
//! [`reply_channel`](Message::reply_channel), and reach groups through [`Group`]:
//!
//! ```no_run
//! use canal::seed::{consumer, route, Group, Message};
//! use canal::msg;
//!
//! async fn ws_add(message: Message) -> canal::Result<()> {
//!     message.reply_channel().send(msg! { "accept": true }).await?;
//!     Group::new("chat").add(message.reply_channel()).await
//! }
//! async fn ws_message(message: Message) -> canal::Result<()> {
//!     Group::new("chat").send(msg! { "text": format!("[user] {}", message.text()?) }).await
//! }
//! async fn ws_disconnect(message: Message) -> canal::Result<()> {
//!     Group::new("chat").discard(message.reply_channel()).await
//! }
//!
//! let channel_routing = [
//!     route("websocket.connect", ws_add),
//!     route("websocket.receive", ws_message),
//!     route("websocket.disconnect", ws_disconnect),
//! ];
//! let app = canal::App::new().websocket(canal::path("/chat/", consumer(channel_routing)));
//! ```
//!
//! Without a `websocket.connect` route the connection is accepted, as in Channels 1. Messages
//! without a `type` (`{"text": …}`, `{"accept": true}`, `{"close": true}`) are turned into the
//! typed `websocket.*` commands they stand for before they travel.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::consumer::{Context, Frame, Layer, WebsocketConsumer, WebsocketEndpoint, ws};
use crate::routing::Target;
use crate::{Error, Result, msg};

tokio::task_local! {
    static LAYER: Layer;
}

/// Runs `future` with `layer` as the layer [`Group::new`] and [`Channel::new`] use.
pub fn with_layer<F: Future>(layer: Layer, future: F) -> impl Future<Output = F::Output> {
    LAYER.scope(layer, future)
}

/// The layer of the consumer running on this task, if any.
pub fn current_layer() -> Option<Layer> {
    LAYER.try_with(Clone::clone).ok()
}

fn no_layer() -> Error {
    Error::msg(
        "no channel layer here: seed-style Group/Channel work inside consumers; elsewhere use Group::with_layer",
    )
}

/// A connection event handed to a seed-style handler.
#[derive(Debug, Clone)]
pub struct Message {
    content: crate::Message,
    reply_channel: ReplyChannel,
}

impl Message {
    /// The event's content (`type`, `text`/`bytes`, `path`, `code` …).
    pub fn content(&self) -> &crate::Message {
        &self.content
    }

    /// The connection's own channel: what is sent there goes to this client.
    pub fn reply_channel(&self) -> &ReplyChannel {
        &self.reply_channel
    }

    /// `content["text"]`.
    pub fn text(&self) -> Result<&str> {
        Ok(self.content.str("text")?)
    }

    /// `content["bytes"]`.
    pub fn bytes(&self) -> Result<&bytes::Bytes> {
        Ok(self.content.bytes("bytes")?)
    }

    /// The request path.
    pub fn path(&self) -> &str {
        self.content
            .get("path")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }
}

/// A channel that reaches one connection (Channels 1 `message.reply_channel`).
#[derive(Clone)]
pub struct ReplyChannel {
    name: String,
    layer: Layer,
}

impl std::fmt::Debug for ReplyChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReplyChannel").field(&self.name).finish()
    }
}

impl AsRef<str> for ReplyChannel {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl ReplyChannel {
    /// The channel name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends a message: `{"text": …}` or `{"bytes": …}` reaches the client, `{"accept": true}`
    /// accepts, `{"close": true | code}` closes.
    pub async fn send(&self, message: crate::Message) -> Result<()> {
        Ok(self.layer.send(&self.name, message).await?)
    }

    /// [`send`](Self::send) for synchronous handlers ([`route_sync`]); panics if called on an
    /// async worker thread, as Tokio's `block_on` does.
    pub fn send_blocking(&self, message: crate::Message) -> Result<()> {
        block_on(self.send(message))?
    }
}

/// A named channel (Channels 1 `Channel("name")`).
#[derive(Clone)]
pub struct Channel {
    name: String,
    layer: Option<Layer>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Channel").field(&self.name).finish()
    }
}

impl Channel {
    /// The channel `name` on the current consumer's layer.
    pub fn new(name: impl Into<String>) -> Self {
        Channel {
            name: name.into(),
            layer: current_layer(),
        }
    }

    /// Sends `message` to the channel.
    pub async fn send(&self, message: crate::Message) -> Result<()> {
        let layer = self.layer.as_ref().ok_or_else(no_layer)?;
        Ok(layer.send(&self.name, message).await?)
    }

    /// [`send`](Self::send) for synchronous handlers ([`route_sync`]).
    pub fn send_blocking(&self, message: crate::Message) -> Result<()> {
        block_on(self.send(message))?
    }
}

/// A group of channels (Channels 1 `Group("chat")`).
#[derive(Clone)]
pub struct Group {
    name: String,
    layer: Option<Layer>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Group").field(&self.name).finish()
    }
}

impl Group {
    /// The group `name` on the layer of the consumer running now.
    pub fn new(name: impl Into<String>) -> Self {
        Group {
            name: name.into(),
            layer: current_layer(),
        }
    }

    /// The group `name` on `layer` (outside consumers).
    pub fn with_layer(name: impl Into<String>, layer: Layer) -> Self {
        Group {
            name: name.into(),
            layer: Some(layer),
        }
    }

    fn layer(&self) -> Result<&Layer> {
        self.layer.as_ref().ok_or_else(no_layer)
    }

    /// Adds a channel (a reply channel, or any channel name).
    pub async fn add(&self, channel: impl AsRef<str>) -> Result<()> {
        Ok(self
            .layer()?
            .group_add(&self.name, channel.as_ref())
            .await?)
    }

    /// Removes a channel.
    pub async fn discard(&self, channel: impl AsRef<str>) -> Result<()> {
        Ok(self
            .layer()?
            .group_discard(&self.name, channel.as_ref())
            .await?)
    }

    /// Sends to every member. `{"text": …}` goes straight to the members' sockets.
    pub async fn send(&self, message: crate::Message) -> Result<()> {
        Ok(self.layer()?.group_send(&self.name, message).await?)
    }

    /// [`add`](Self::add) for synchronous handlers ([`route_sync`]).
    pub fn add_blocking(&self, channel: impl AsRef<str>) -> Result<()> {
        block_on(self.add(channel))?
    }

    /// [`discard`](Self::discard) for synchronous handlers ([`route_sync`]).
    pub fn discard_blocking(&self, channel: impl AsRef<str>) -> Result<()> {
        block_on(self.discard(channel))?
    }

    /// [`send`](Self::send) for synchronous handlers ([`route_sync`]).
    pub fn send_blocking(&self, message: crate::Message) -> Result<()> {
        block_on(self.send(message))?
    }
}

type HandlerFn =
    Arc<dyn Fn(Message) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// One seed-style route: an event name and its handler.
#[derive(Clone)]
pub struct SeedRoute {
    channel: String,
    handler: HandlerFn,
}

impl std::fmt::Debug for SeedRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("route").field(&self.channel).finish()
    }
}

/// Routes the event `channel` (`"websocket.connect"`, `"websocket.receive"`,
/// `"websocket.disconnect"`, or any message type sent to the connection) to `handler`.
pub fn route<H, Fut>(channel: &str, handler: H) -> SeedRoute
where
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    SeedRoute {
        channel: channel.to_owned(),
        handler: Arc::new(move |m| Box::pin(handler(m))),
    }
}

/// Routes the event `channel` to a *synchronous* handler: plain blocking code, such as a
/// database driver call, as Channels' `SyncConsumer` allows.
///
/// The handler runs on Tokio's blocking pool, never on an async worker, so while it blocks every
/// other connection keeps being served. Inside it, use the `*_blocking` methods of
/// [`ReplyChannel`], [`Group`] and [`Channel`] (they wait for the layer on the blocking thread);
/// `Group::new` finds the consumer's layer there too. A panic in the handler closes the
/// connection with 1011 like any other consumer failure.
pub fn route_sync<H>(channel: &str, handler: H) -> SeedRoute
where
    H: Fn(Message) -> Result<()> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    SeedRoute {
        channel: channel.to_owned(),
        handler: Arc::new(move |message| {
            let handler = handler.clone();
            Box::pin(async move {
                let layer = current_layer();
                let run = move || match layer {
                    Some(layer) => LAYER.sync_scope(layer, || handler(message)),
                    None => handler(message),
                };
                match tokio::task::spawn_blocking(run).await {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => Err(Error::msg("synchronous handler panicked")),
                    Err(_) => Err(Error::msg("synchronous handler was cancelled")),
                }
            })
        }),
    }
}

/// Runs `future` to completion from a synchronous handler on the blocking pool.
fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::msg("blocking layer calls need a Tokio runtime"))?;
    Ok(handle.block_on(future))
}

/// A WebSocket endpoint made of seed-style routes (the tutorial's `channel_routing`).
pub fn consumer(routes: impl IntoIterator<Item = SeedRoute>) -> Target<WebsocketEndpoint> {
    let table: Arc<HashMap<String, HandlerFn>> =
        Arc::new(routes.into_iter().map(|r| (r.channel, r.handler)).collect());
    ws(move || SeedConsumer {
        routes: table.clone(),
    })
}

struct SeedConsumer {
    routes: Arc<HashMap<String, HandlerFn>>,
}

impl SeedConsumer {
    async fn dispatch(&self, cx: &Context, content: crate::Message) -> Result<bool> {
        let Some(kind) = content.kind() else {
            return Ok(false);
        };
        let Some(handler) = self.routes.get(kind).cloned() else {
            return Ok(false);
        };
        let content = content.with("path", cx.scope().path());
        let message = Message {
            content,
            reply_channel: ReplyChannel {
                name: cx.channel_name(),
                layer: cx.layer().clone(),
            },
        };
        handler(message).await?;
        Ok(true)
    }
}

impl WebsocketConsumer for SeedConsumer {
    async fn connect(&mut self, cx: &mut Context) -> Result<()> {
        if !self
            .dispatch(cx, msg! { "type": "websocket.connect" })
            .await?
        {
            cx.accept().await?;
        }
        Ok(())
    }

    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> Result<()> {
        self.dispatch(cx, frame.to_message()).await?;
        Ok(())
    }

    async fn disconnect(&mut self, cx: &mut Context, code: u16) -> Result<()> {
        self.dispatch(cx, msg! { "type": "websocket.disconnect", "code": code })
            .await?;
        Ok(())
    }

    async fn event(&mut self, cx: &mut Context, event: crate::Message) -> Result<()> {
        if !self.dispatch(cx, event.clone()).await? {
            tracing::debug!(kind = ?event.kind(), "no seed route for this event; ignored");
        }
        Ok(())
    }
}
