//! Consumers: the code that handles a connection's events.
//!
//! Write a [`WebsocketConsumer`] (Channels 2+ style: one value per connection with `connect`,
//! `receive`, `disconnect` and `event` for layer messages) or seed-style functions routed by
//! event name ([`seed`](crate::seed)); both run on the same connection machinery.
//!
//! A consumer handles one event at a time, in arrival order, as in Channels. While a handler
//! runs, what it sends is still written at once, and so is anything sent to its reply channel by
//! other tasks or processes: a handler that loops and pushes (the seed author's "while True")
//! streams to the client as it goes. Tasks started with [`Context::spawn`] live exactly as long
//! as the connection.

mod context;
mod http;
mod json;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;
use futures_util::FutureExt;

pub use self::http::{HttpConsumer, HttpEndpoint, Request, Response, http};
pub(crate) use context::{Command, Outgoing};
pub use context::{Context, Handle, Layer};
pub use json::{JsonWebsocketConsumer, ws_json};

use crate::Result;
use crate::message::Message;
use crate::scope::Scope;

/// A complete message from the client (fragments already reassembled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text message (valid UTF-8, checked by the server).
    Text(ByteString),
    /// A binary message.
    Binary(Bytes),
}

impl Frame {
    /// The text, or [`Error::FrameKind`](crate::Error::FrameKind) for a binary message.
    pub fn text(&self) -> Result<&str> {
        match self {
            Frame::Text(t) => Ok(t),
            Frame::Binary(_) => Err(crate::Error::FrameKind { expected: "text" }),
        }
    }

    /// The bytes of either kind of message.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Frame::Text(t) => t.as_bytes(),
            Frame::Binary(b) => b,
        }
    }

    /// The frame as the layer message Channels would send for it (`websocket.receive`).
    pub fn to_message(&self) -> Message {
        let m = Message::new("websocket.receive");
        match self {
            Frame::Text(t) => m.with("text", t.clone()),
            Frame::Binary(b) => m.with("bytes", b.clone()),
        }
    }
}

/// A WebSocket consumer: one value per connection.
///
/// Every method has a default, so a consumer implements only what it needs. Handlers return
/// [`Result`]: an error (or a panic) closes the connection with 1011, or answers the handshake
/// with 500 before `accept`; other connections are not affected.
///
/// ```
/// use canal::prelude::*;
///
/// #[derive(Default)]
/// struct Echo;
///
/// impl WebsocketConsumer for Echo {
///     async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
///         cx.send(frame).await
///     }
/// }
/// ```
pub trait WebsocketConsumer: Send + 'static {
    /// Checks the handshake request before any consumer is built (route params, headers):
    /// an `Err` answers it with that HTTP status and nothing else runs.
    fn check(scope: &Scope) -> std::result::Result<(), Rejection>
    where
        Self: Sized,
    {
        let _ = scope;
        Ok(())
    }

    /// Layer message types that go straight to the client without running
    /// [`event`](Self::event): the message's `text` is sent as a text frame (or its `bytes`
    /// as a binary frame), at once, exactly as a `websocket.send` message would be. Phoenix
    /// calls this the fastlane. A group send to a large room then costs each member one queue
    /// push and a share of one socket write instead of a handler run.
    ///
    /// Use it for types whose handler would only forward the content; a type listed here never
    /// reaches `event`. One that arrives before the connection is accepted is held and sent
    /// right after the accept.
    ///
    /// ```
    /// use canal::prelude::*;
    ///
    /// #[derive(Default)]
    /// struct Room;
    ///
    /// impl WebsocketConsumer for Room {
    ///     const FASTLANE: &'static [&'static str] = &["chat.message"];
    /// }
    /// ```
    const FASTLANE: &'static [&'static str] = &[];

    /// Groups joined before [`connect`](Self::connect) and left after
    /// [`disconnect`](Self::disconnect) (Channels' `groups` attribute).
    ///
    /// Asked twice, like Channels reads the attribute twice: when the connection opens (to
    /// join) and when it ends (to leave; also after a handler panicked), so it should give the
    /// same list both times. A consumer whose handler was cancelled by a timeout cannot be
    /// asked; its memberships then go the way of a dead consumer's in Channels (see
    /// [`LayerConfig::group_expiry`](crate::layer::LayerConfig)).
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }

    /// The client asks to connect. Call [`Context::accept`] (the default does) or
    /// [`Context::deny`] (HTTP 403). Neither within the accept timeout (5 s) also means 403.
    fn connect(&mut self, cx: &mut Context) -> impl Future<Output = Result<()>> + Send {
        async move { cx.accept().await }
    }

    /// A message arrived from the client.
    fn receive(
        &mut self,
        cx: &mut Context,
        frame: Frame,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (cx, frame);
        async { Ok(()) }
    }

    /// The connection closed with `code` (1005 when the client gave none, 1006 when it vanished).
    fn disconnect(
        &mut self,
        cx: &mut Context,
        code: u16,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (cx, code);
        async { Ok(()) }
    }

    /// A layer message addressed to this consumer (its `type` is not a `websocket.*` command).
    /// Dispatch on [`Message::kind`]. The default logs and ignores it.
    fn event(
        &mut self,
        cx: &mut Context,
        event: Message,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = cx;
        async move {
            tracing::debug!(kind = ?event.kind(), "consumer has no handler for this event; ignored");
            Ok(())
        }
    }
}

/// A handshake refused by [`WebsocketConsumer::check`]: the HTTP status and a short text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status of the answer (400, 401, 403 …).
    pub status: u16,
    /// The body of the answer.
    pub message: String,
}

impl Rejection {
    /// A rejection with `status` and `message`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }
}

/// What the connection hands a consumer.
pub(crate) enum Event {
    Connect,
    Frame(Frame),
    Layer(Message),
    Disconnect(u16),
}

/// A running handler: it owns the consumer and gives it back when done, even when the handler
/// panicked (`Err` holds the panic), so the connection can still leave the consumer's groups.
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = (Box<dyn DynConsumer>, std::thread::Result<Result<()>>)> + Send>>;

/// A consumer with its context, behind one pointer.
pub(crate) trait DynConsumer: Send {
    fn handle(self: Box<Self>, event: Event) -> HandlerFuture;
    fn groups(&self) -> Vec<String>;
    fn context(&mut self) -> &mut Context;
}

struct Driver<C> {
    consumer: C,
    cx: Context,
}

impl<C: WebsocketConsumer> DynConsumer for Driver<C> {
    fn handle(mut self: Box<Self>, event: Event) -> HandlerFuture {
        Box::pin(async move {
            let Driver { consumer, cx } = &mut *self;
            let run = async move {
                match event {
                    Event::Connect => consumer.connect(cx).await,
                    Event::Frame(frame) => consumer.receive(cx, frame).await,
                    Event::Layer(message) => consumer.event(cx, message).await,
                    Event::Disconnect(code) => consumer.disconnect(cx, code).await,
                }
            };
            let result = AssertUnwindSafe(run).catch_unwind().await;
            (self as Box<dyn DynConsumer>, result)
        })
    }

    fn groups(&self) -> Vec<String> {
        self.consumer.groups()
    }

    fn context(&mut self) -> &mut Context {
        &mut self.cx
    }
}

/// Builds a consumer per connection.
pub(crate) trait Factory: Send + Sync {
    fn check(&self, scope: &Scope) -> std::result::Result<(), Rejection>;
    fn make(&self, cx: Context) -> Box<dyn DynConsumer>;
    /// The consumer's [`WebsocketConsumer::FASTLANE`], behind one thin pointer.
    fn fastlane(&self) -> &'static &'static [&'static str];
}

struct FnFactory<F>(F);

impl<F, C> Factory for FnFactory<F>
where
    F: Fn() -> C + Send + Sync + 'static,
    C: WebsocketConsumer,
{
    fn check(&self, scope: &Scope) -> std::result::Result<(), Rejection> {
        C::check(scope)
    }

    fn make(&self, cx: Context) -> Box<dyn DynConsumer> {
        Box::new(Driver {
            consumer: (self.0)(),
            cx,
        })
    }

    fn fastlane(&self) -> &'static &'static [&'static str] {
        const { &C::FASTLANE }
    }
}

/// A WebSocket route target: makes one consumer per connection.
#[derive(Clone)]
pub struct WebsocketEndpoint {
    pub(crate) factory: Arc<dyn Factory>,
    /// Whether the connection's messages count in the server's message totals (the
    /// dashboard's own socket does not).
    pub(crate) metered: bool,
    /// Whether a handshake needs an authenticated user ([`login_required`]).
    pub(crate) requires_user: bool,
}

/// Requires an authenticated user on a WebSocket route (every route of a nested router
/// included): a handshake without a valid token gets 403 before the upgrade.
/// `path("/ws/private/", login_required(ws(Private::default)))`.
pub fn login_required(
    target: crate::routing::Target<WebsocketEndpoint>,
) -> crate::routing::Target<WebsocketEndpoint> {
    match target {
        crate::routing::Target::Endpoint(mut e) => {
            e.requires_user = true;
            crate::routing::Target::Endpoint(e)
        }
        crate::routing::Target::Nested(router) => {
            crate::routing::Target::Nested(router.map_endpoints(|mut e| {
                e.requires_user = true;
                e
            }))
        }
    }
}

impl std::fmt::Debug for WebsocketEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebsocketEndpoint")
    }
}

/// A WebSocket endpoint from a consumer constructor: `ws(Echo::default)`.
pub fn ws<F, C>(make: F) -> crate::routing::Target<WebsocketEndpoint>
where
    F: Fn() -> C + Send + Sync + 'static,
    C: WebsocketConsumer,
{
    crate::routing::Target::Endpoint(WebsocketEndpoint {
        factory: Arc::new(FnFactory(make)),
        metered: true,
        requires_user: false,
    })
}
