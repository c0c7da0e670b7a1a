//! The seed tutorial's two examples, almost line for line (Channels 1.x style).
//!
//! Run: `cargo run --example seed`, then in a browser console on http://127.0.0.1:8000/:
//! ```js
//! socket = new WebSocket("ws://" + window.location.host + "/chat/");
//! socket.onmessage = function(e) { alert(e.data); }
//! socket.onopen = function() { socket.send("hello world"); }
//! ```
//! Two windows see each other's messages, prefixed with "[user] ". `/path/` echoes.

use canal::msg;
use canal::seed::{Group, Message, consumer, route};
use canal::{App, Server, path};

// consumers.py, first example: echo.
async fn ws_echo(message: Message) -> canal::Result<()> {
    message
        .reply_channel()
        .send(msg! { "text": message.text()? })
        .await
}

// consumers.py, second example: a group chat.
// Connected to websocket.connect
async fn ws_add(message: Message) -> canal::Result<()> {
    message
        .reply_channel()
        .send(msg! { "accept": true })
        .await?;
    Group::new("chat").add(message.reply_channel()).await
}

// Connected to websocket.receive
async fn ws_message(message: Message) -> canal::Result<()> {
    Group::new("chat")
        .send(msg! { "text": format!("[user] {}", message.text()?) })
        .await
}

// Connected to websocket.disconnect
async fn ws_disconnect(message: Message) -> canal::Result<()> {
    Group::new("chat").discard(message.reply_channel()).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    // routing.py
    let echo_routing = [route("websocket.receive", ws_echo)];
    let channel_routing = [
        route("websocket.connect", ws_add),
        route("websocket.receive", ws_message),
        route("websocket.disconnect", ws_disconnect),
    ];
    let app = App::new()
        .websocket(path("/path/", consumer(echo_routing)))
        .websocket(path("/chat/", consumer(channel_routing)))
        .http(path(
            "/",
            canal::http(|_req| async { Ok(canal::Response::html(canal::demo::INDEX_HTML)) }),
        ));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("seed example on ws://{bind}/path/ (echo) and ws://{bind}/chat/ (group chat)");
    Server::new(app)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
