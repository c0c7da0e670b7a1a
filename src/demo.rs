//! The app `canal serve` runs: the chat page, the demo endpoints and `/health`.
//!
//! These are ordinary consumers built with the public API, and their behaviour is a contract
//! that benchmarks and other tools rely on:
//!
//! - `/ws/echo/` echoes every message verbatim (same opcode, same bytes, empty ones too);
//! - `/ws/chat/{room}/` joins the group named exactly `{room}` and group-sends every message as
//!   `{"type": "chat.message", "text" | "bytes": …}`; every member, sender included, gets it
//!   verbatim. A room that is not a valid group name is refused before the upgrade with 400;
//! - `/health` answers 200 `ok`;
//! - `/` and `/chat/{room}/` serve the chat page.
//!
//! The room list the page shows comes from the server's built-in `/api/rooms`
//! ([`Builtins`](crate::server::Builtins)), which `canal serve` mounts next to this app.

use crate::consumer::{Context, Frame, Rejection, Request, Response, WebsocketConsumer, http, ws};
use crate::layer::{LayerError, check_group_name};
use crate::routing::path;
use crate::scope::Scope;
use crate::server::App;
use crate::{Result, msg};

/// The room list page.
pub const INDEX_HTML: &str = include_str!("../static/index.html");
/// The chat room page.
pub const CHAT_HTML: &str = include_str!("../static/chat.html");

/// Echoes every message back, unchanged.
#[derive(Debug, Default)]
pub struct Echo;

impl WebsocketConsumer for Echo {
    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> Result<()> {
        cx.send(frame).await
    }
}

/// A chat room: every message goes to everyone in the room, verbatim.
///
/// It keeps no state of its own: the room is the route's `{room}` parameter, read from the
/// scope when needed, so an idle member costs only what its connection costs.
#[derive(Debug, Default)]
pub struct ChatRoom;

impl WebsocketConsumer for ChatRoom {
    /// A room message goes to each member's socket as it is, without a handler run.
    const FASTLANE: &'static [&'static str] = &["chat.message"];

    fn check(scope: &Scope) -> std::result::Result<(), Rejection> {
        let room = scope
            .param("room")
            .map_err(|e| Rejection::new(400, e.to_string()))?;
        check_group_name(room)
            .map_err(|problem| Rejection::new(400, format!("invalid room name: {problem}")))
    }

    async fn connect(&mut self, cx: &mut Context) -> Result<()> {
        let room = cx.scope().param("room")?;
        // With the backend down the membership is still recorded and re-added when it returns.
        tolerate_outage(cx.group_add(room).await)?;
        cx.accept().await
    }

    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> Result<()> {
        let message = match frame {
            Frame::Text(text) => msg! { "type": "chat.message", "text": text },
            Frame::Binary(bytes) => msg! { "type": "chat.message", "bytes": bytes },
        };
        // A backend outage loses this message (counted by the layer), not the connection.
        tolerate_outage(cx.group_send(cx.scope().param("room")?, message).await)
    }

    async fn disconnect(&mut self, cx: &mut Context, _code: u16) -> Result<()> {
        // Runs only after connect, which joined the room.
        tolerate_outage(cx.group_discard(cx.scope().param("room")?).await)
    }
}

/// Layer backend errors (Redis away) are logged and counted by the layer; the connection stays.
fn tolerate_outage(result: Result<()>) -> Result<()> {
    match result {
        Err(crate::Error::Layer(LayerError::Backend(e))) => {
            tracing::debug!(error = %e, "channel layer unavailable; message dropped");
            Ok(())
        }
        other => other,
    }
}

/// The demo app: chat page, `/ws/echo/`, `/ws/chat/{room}/`, `/health`.
pub fn app() -> App {
    App::new()
        .message_type("chat.message")
        .websocket(path("/ws/echo/", ws(Echo::default)))
        .websocket(path("/ws/chat/{room}/", ws(ChatRoom::default)))
        .http(path(
            "/health",
            http(|_req: Request| async { Ok(Response::text("ok")) }),
        ))
        .http(path(
            "/",
            http(|_req: Request| async { Ok(Response::html(INDEX_HTML)) }),
        ))
        .http(path(
            "/chat/{room}/",
            http(|_req: Request| async { Ok(Response::html(CHAT_HTML)) }),
        ))
}
