//! JSON consumers (Channels' `JsonWebsocketConsumer`): text frames parsed as JSON on the way in.

use std::future::Future;

use super::{Context, Frame, WebsocketConsumer};
use crate::Result;
use crate::message::Message;

/// A consumer that speaks JSON: every text frame is parsed before it reaches
/// [`receive_json`](Self::receive_json); send with [`Context::send_json`]. A frame that is not
/// valid JSON, or a binary frame, is an error (the connection closes with 1011), as in Channels.
pub trait JsonWebsocketConsumer: Send + 'static {
    /// Groups joined before connect and left after disconnect.
    fn groups(&self) -> Vec<String> {
        Vec::new()
    }

    /// See [`WebsocketConsumer::connect`]; accepts by default.
    fn connect(&mut self, cx: &mut Context) -> impl Future<Output = Result<()>> + Send {
        async move { cx.accept().await }
    }

    /// A JSON document arrived.
    fn receive_json(
        &mut self,
        cx: &mut Context,
        content: serde_json::Value,
    ) -> impl Future<Output = Result<()>> + Send;

    /// See [`WebsocketConsumer::disconnect`].
    fn disconnect(
        &mut self,
        cx: &mut Context,
        code: u16,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (cx, code);
        async { Ok(()) }
    }

    /// See [`WebsocketConsumer::event`].
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

/// Adapts a [`JsonWebsocketConsumer`] to the connection machinery.
struct Json<C>(C);

impl<C: JsonWebsocketConsumer> WebsocketConsumer for Json<C> {
    fn groups(&self) -> Vec<String> {
        self.0.groups()
    }

    async fn connect(&mut self, cx: &mut Context) -> Result<()> {
        self.0.connect(cx).await
    }

    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> Result<()> {
        let content = serde_json::from_str(frame.text()?)?;
        self.0.receive_json(cx, content).await
    }

    async fn disconnect(&mut self, cx: &mut Context, code: u16) -> Result<()> {
        self.0.disconnect(cx, code).await
    }

    async fn event(&mut self, cx: &mut Context, event: Message) -> Result<()> {
        self.0.event(cx, event).await
    }
}

/// A WebSocket endpoint for a JSON consumer: `ws_json(Api::default)`.
pub fn ws_json<F, C>(make: F) -> crate::routing::Target<super::WebsocketEndpoint>
where
    F: Fn() -> C + Send + Sync + 'static,
    C: JsonWebsocketConsumer,
{
    super::ws(move || Json(make()))
}
