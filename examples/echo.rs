//! Echo two ways: raw frames, and a JSON consumer that answers `{"echo": <what you sent>}`.
//!
//! Run: `cargo run --example echo`; connect to ws://127.0.0.1:8000/ws/echo/ or
//! ws://127.0.0.1:8000/ws/json/.

use canal::prelude::*;

#[derive(Default)]
struct JsonEcho;

impl JsonWebsocketConsumer for JsonEcho {
    async fn receive_json(
        &mut self,
        cx: &mut Context,
        content: serde_json::Value,
    ) -> canal::Result<()> {
        cx.send_json(&serde_json::json!({ "echo": content })).await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::new()
        .websocket(path("/ws/echo/", ws(canal::demo::Echo::default)))
        .websocket(path("/ws/json/", ws_json(JsonEcho::default)));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("echo on ws://{bind}/ws/echo/ and ws://{bind}/ws/json/");
    Server::new(app)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
