//! Consumers driven in-process through `canal::testing`, without sockets.

use std::time::Duration;

use canal::demo;
use canal::prelude::*;
use canal::testing::{Connect, Received, WebsocketCommunicator};

#[derive(Default)]
struct Api;

impl JsonWebsocketConsumer for Api {
    async fn receive_json(
        &mut self,
        cx: &mut Context,
        content: serde_json::Value,
    ) -> canal::Result<()> {
        cx.send_json(&serde_json::json!({ "got": content, "user": cx.scope().query("user") }))
            .await
    }

    async fn event(&mut self, cx: &mut Context, event: Message) -> canal::Result<()> {
        match event.kind() {
            Some("notify") => cx.send_text(event.str("text")?.to_owned()).await,
            _ => Ok(()),
        }
    }
}

fn app() -> App {
    demo::app().websocket(path("/ws/api/", ws_json(Api::default)))
}

#[tokio::test]
async fn json_consumer_round_trip_with_query() {
    let mut c = WebsocketCommunicator::new(app(), "/ws/api/?user=ann");
    assert!(matches!(
        c.connect().await,
        Connect::Accepted {
            subprotocol: None,
            ..
        }
    ));
    c.send_json(&serde_json::json!({"a": 1})).await.unwrap();
    assert_eq!(
        c.receive_json().await.unwrap(),
        serde_json::json!({"got": {"a": 1}, "user": "ann"})
    );
    // Invalid JSON is a consumer error: 1011.
    c.send_text("{not json").await.unwrap();
    assert_eq!(c.receive().await.unwrap(), Received::Close(1011));
}

#[tokio::test]
async fn layer_events_reach_the_consumer_through_its_reply_channel() {
    let mut c = WebsocketCommunicator::new(app(), "/ws/api/");
    assert!(matches!(c.connect().await, Connect::Accepted { .. }));
    let layer = c.handle().layer().clone();
    // The only local channel is this connection's.
    let mut names = Vec::new();
    layer.local().for_each_name(|n| names.push(n));
    assert_eq!(names.len(), 1);
    layer
        .send(&names[0], msg! { "type": "notify", "text": "pushed" })
        .await
        .unwrap();
    assert_eq!(c.receive_text().await.unwrap(), "pushed");
    // websocket.send acts on the socket directly, without the consumer.
    layer
        .send(
            &names[0],
            msg! { "type": "websocket.send", "text": "direct" },
        )
        .await
        .unwrap();
    assert_eq!(c.receive_text().await.unwrap(), "direct");
    // websocket.close closes with the given code.
    layer
        .send(&names[0], msg! { "type": "websocket.close", "code": 4001 })
        .await
        .unwrap();
    assert_eq!(c.receive().await.unwrap(), Received::Close(4001));
}

#[tokio::test]
async fn two_clients_share_a_room() {
    let mut a = WebsocketCommunicator::new(app(), "/ws/chat/room1/");
    assert!(matches!(a.connect().await, Connect::Accepted { .. }));
    let mut b = WebsocketCommunicator::from_handle(a.handle().clone(), "/ws/chat/room1/");
    assert!(matches!(b.connect().await, Connect::Accepted { .. }));
    a.send_text("hello").await.unwrap();
    assert_eq!(a.receive_text().await.unwrap(), "hello");
    assert_eq!(b.receive_text().await.unwrap(), "hello");
    b.disconnect(1000).await;
    a.send_text("alone").await.unwrap();
    assert_eq!(a.receive_text().await.unwrap(), "alone");
    assert!(a.receive_nothing(Duration::from_millis(100)).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        a.handle().layer().group_sizes().unwrap(),
        vec![("room1".to_owned(), 1)]
    );
    let mut bad = WebsocketCommunicator::from_handle(a.handle().clone(), "/ws/chat/no%20pe/");
    assert_eq!(bad.connect().await, Connect::Rejected(400));
    let mut missing = WebsocketCommunicator::from_handle(a.handle().clone(), "/ws/none/");
    assert_eq!(missing.connect().await, Connect::Rejected(404));
}

/// A room whose `chat.message` goes out on the fastlane; any other event is echoed with a
/// prefix by the handler, so a test can tell which path a message took.
#[derive(Default)]
struct FastRoom;

impl WebsocketConsumer for FastRoom {
    const FASTLANE: &'static [&'static str] = &["chat.message"];

    async fn connect(&mut self, cx: &mut Context) -> canal::Result<()> {
        cx.group_add("fast").await?;
        // A group message sent between the join and the accept is held, then sent.
        cx.group_send("fast", msg! { "type": "chat.message", "text": "early" })
            .await?;
        cx.accept().await
    }

    async fn event(&mut self, cx: &mut Context, event: Message) -> canal::Result<()> {
        cx.send_text(format!("handler saw {}", event.kind().unwrap_or("-")))
            .await
    }
}

#[tokio::test]
async fn fastlane_types_skip_the_handler_and_keep_their_order() {
    let app = App::new().websocket(path("/ws/fast/", ws(FastRoom::default)));
    let mut c = WebsocketCommunicator::new(app, "/ws/fast/");
    assert!(matches!(c.connect().await, Connect::Accepted { .. }));
    assert_eq!(c.receive_text().await.unwrap(), "early");
    let layer = c.handle().layer().clone();
    for i in 0..5 {
        layer
            .group_send(
                "fast",
                msg! { "type": "chat.message", "text": format!("m{i}") },
            )
            .await
            .unwrap();
    }
    layer
        .group_send("fast", msg! { "type": "chat.bytes", "bytes": vec![1u8, 2] })
        .await
        .unwrap();
    layer
        .group_send("fast", msg! { "type": "chat.message", "bytes": vec![7u8] })
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(c.receive_text().await.unwrap(), format!("m{i}"));
    }
    // Bytes go out as a binary frame, and like a `websocket.send` a fastlane message does
    // not wait behind the handler run of the message before it.
    assert_eq!(
        c.receive().await.unwrap(),
        Received::Frame(Frame::Binary(bytes::Bytes::from_static(&[7])))
    );
    // Not a fastlane type: the handler runs.
    assert_eq!(c.receive_text().await.unwrap(), "handler saw chat.bytes");
}
