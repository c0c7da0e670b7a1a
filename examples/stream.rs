//! The seed author's unsolved "while loop": a consumer that streams a clock every 100 ms for as
//! long as the client stays, pushed from a task bound to the connection.
//!
//! Run: `cargo run --example stream`, then connect to ws://127.0.0.1:8000/ws/clock/
//! (for example `websocat ws://127.0.0.1:8000/ws/clock/`). Send "stop" to end the stream.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canal::prelude::*;

#[derive(Default)]
struct Clock;

impl WebsocketConsumer for Clock {
    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.accept().await?;
        let handle = cx.handle();
        // Lives exactly as long as the connection: aborted when the client leaves.
        cx.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for n in 0u64.. {
                tick.tick().await;
                let ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                if handle.send_text(format!("{n} {ms}")).is_err() {
                    break; // the connection is gone
                }
            }
        });
        Ok(())
    }

    async fn receive(&mut self, cx: &mut Context, frame: Frame) -> canal::Result<()> {
        if frame.text()? == "stop" {
            cx.close(1000, "stopped").await?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::new().websocket(path("/ws/clock/", ws(Clock::default)));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("streaming a clock on ws://{bind}/ws/clock/");
    Server::new(app)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
