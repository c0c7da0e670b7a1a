//! canal: a real-time server framework in the spirit of Django Channels.
//!
//! One server speaks HTTP and WebSocket on one port; consumers handle connection events;
//! routes match paths in order; a channel layer of FIFO channels and broadcast groups lets any
//! task push to any connection at any moment.
//!
//! ```
//! use canal::prelude::*;
//!
//! #[derive(Default)]
//! struct Chat {
//!     room: String,
//! }
//!
//! impl WebsocketConsumer for Chat {
//!     async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
//!         self.room = cx.scope().param("room")?.to_owned();
//!         cx.group_add(&self.room).await?;
//!         cx.accept().await
//!     }
//!     async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
//!         cx.group_send(&self.room, msg! { "type": "chat.message", "text": frame.text()? }).await
//!     }
//!     async fn event(&mut self, cx: &mut Context, event: Message) -> canal::Result<()> {
//!         match event.kind() {
//!             Some("chat.message") => cx.send_text(event.str("text")?).await,
//!             _ => Ok(()),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = App::new().websocket(path("/ws/chat/{room}/", ws(Chat::default)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! // Serve until the shutdown future completes (here: at once, to keep the example short).
//! Server::new(app).serve(listener, async {}).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! The modules follow a message's path through the system:
//!
//! - [`message`]: [`Message`] and [`Value`], msgpack-compatible maps shared by reference count.
//! - [`layer`]: the [`ChannelLayer`] trait, name rules, [`MemoryLayer`], and the process-local
//!   mailboxes that connections read from.
//! - [`routing`]: `path()` / `re_path()` routes, first match wins.
//! - [`consumer`]: the [`WebsocketConsumer`] trait, its [`Context`], JSON and HTTP consumers.
//! - [`seed`]: the Channels 1.x style of the seed tutorial (`route`, `reply_channel`, `Group`).
//! - [`server`]: the listener, HTTP via hyper, and the WebSocket connection task.
//! - [`testing`]: a communicator that drives a consumer without a network.
//! - [`worker`]: consumers of named channels for background work.
//! - [`demo`]: the app `canal serve` runs (chat page, `/ws/echo/`, `/ws/chat/{room}/`).
//!
//! # Cancel safety
//!
//! Layer calls and context sends are cancel-safe: dropping one either completed or did nothing.
//! `Inbox::recv` and `ChannelLayer::receive` lose no message when dropped.

pub mod consumer;
pub mod demo;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod layer;
pub mod message;
pub mod routing;
pub mod scope;
pub mod seed;
pub mod server;
pub mod testing;
pub mod worker;

pub use consumer::{
    Context, Frame, Handle, HttpConsumer, JsonWebsocketConsumer, Layer, Rejection, Request,
    Response, WebsocketConsumer, http, login_required, ws, ws_json,
};
pub use error::{Error, Result};
pub use layer::{ChannelLayer, LayerConfig, LayerError, MemoryLayer, RedisConfig, RedisLayer};
pub use message::{Map, Message, Value};
pub use routing::{Router, path, re_path};
pub use scope::Scope;
pub use server::{App, Server, ServerConfig, ServerHandle};

/// The names most programs need: `use canal::prelude::*;`.
pub mod prelude {
    pub use crate::consumer::{
        Context, Frame, JsonWebsocketConsumer, Request, Response, WebsocketConsumer, http,
        login_required, ws, ws_json,
    };
    pub use crate::layer::{ChannelLayer, MemoryLayer};
    pub use crate::message::{Message, Value};
    pub use crate::msg;
    pub use crate::routing::{Router, path, re_path};
    pub use crate::server::{App, Server, ServerConfig};
}
