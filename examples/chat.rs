//! A chat room with the consumer trait (Channels 2+ style): join the room from the path,
//! group-send what arrives, relay `chat.message` events to the socket.
//!
//! Run: `cargo run --example chat`, then open two WebSocket clients on
//! ws://127.0.0.1:8000/ws/chat/lobby/.

use canal::prelude::*;

#[derive(Default)]
struct Chat {
    room: String,
}

impl WebsocketConsumer for Chat {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        self.room = cx.scope().param("room")?.to_owned();
        cx.group_add(&self.room).await?;
        cx.accept().await
    }

    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        let text = frame.text()?;
        cx.group_send(&self.room, msg! { "type": "chat.message", "text": text })
            .await
    }

    async fn event(&mut self, cx: &mut Context, event: Message) -> canal::Result<()> {
        match event.kind() {
            Some("chat.message") => cx.send_text(event.str("text")?.to_owned()).await,
            _ => Ok(()),
        }
    }

    async fn disconnect(&mut self, cx: &mut Context, _code: u16) -> canal::Result<()> {
        cx.group_discard(&self.room).await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::new().websocket(re_path(
        r"^/ws/chat/(?P<room>[A-Za-z0-9_.-]+)/$",
        ws(Chat::default),
    ));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("chat on ws://{bind}/ws/chat/{{room}}/");
    Server::new(app)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
