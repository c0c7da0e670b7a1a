//! WebSocket: the frame codec and the connection task.

pub(crate) mod codec;
pub(crate) mod conn;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use self::conn::{Conn, Decision, Upgraded, decide, finish_upgrade, fmt_peer};
use super::{ConnGuard, Shared};
use crate::consumer::{Context, WebsocketEndpoint};
use crate::scope::Scope;
use crate::server::stats::HandshakeFailure;

/// Where the socket comes from once the handshake is accepted.
pub(crate) enum UpgradeSource {
    /// A real HTTP upgrade through hyper.
    Hyper(hyper::upgrade::OnUpgrade),
    /// An in-memory pipe (the testing communicator).
    Direct(tokio::io::DuplexStream),
}

/// The life of one WebSocket: handshake, upgrade, open loop, cleanup.
pub(crate) async fn websocket_task(
    shared: Arc<Shared>,
    endpoint: WebsocketEndpoint,
    scope: Arc<Scope>,
    source: UpgradeSource,
    tx: oneshot::Sender<Decision>,
    guard: Option<ConnGuard>,
) {
    let inbox = shared.layer.new_inbox();
    let cx = Context {
        mailbox: inbox.mailbox().clone(),
        id: inbox.id(),
        scope: scope.clone(),
        layer: shared.layer.clone(),
        tasks: Vec::new(),
    };
    let consumer = endpoint.factory.make(cx);
    let metered = endpoint.metered;
    drop(endpoint);
    let mut conn = Conn::new(shared.clone(), scope.clone(), inbox, consumer, metered);
    let joined = conn.declared_groups();
    let channel = conn.channel_name();
    for group in &joined {
        if let Err(e) = shared.layer.group_add(group, &channel).await {
            tracing::error!(group, error = %e, "could not join a declared group");
            decide(tx, Decision::Reject(500, HandshakeFailure::Error));
            conn.finish(joined).await;
            return;
        }
    }
    let peer = fmt_peer(scope.client());
    if shared.config.access_log {
        tracing::debug!(target: "canal::access", "{peer} - - \"WSCONNECTING {}\" -", scope.path());
    }
    let decision = conn.handshake().await;
    let accepted = matches!(decision, Decision::Accept { .. });
    if !decide(tx, decision) || !accepted {
        conn.finish(joined).await;
        return;
    }
    let upgraded = match source {
        UpgradeSource::Hyper(on_upgrade) => finish_upgrade(on_upgrade).await,
        UpgradeSource::Direct(io) => Some(Upgraded::Duplex(io)),
    };
    let Some(upgraded) = upgraded else {
        conn.finish(joined).await;
        return;
    };
    shared
        .stats
        .websocket_accepted
        .fetch_add(1, Ordering::Relaxed);
    if shared.config.access_log {
        tracing::info!(target: "canal::access", "{peer} - - \"WSCONNECT {}\" -", scope.path());
    }
    if shared.shutdown.is_cancelled() {
        // Shutdown raced the handshake: the loop sends 1001 and ends.
        conn.shutdown_now();
    }
    match upgraded {
        Upgraded::Tcp(mut stream, early) => {
            conn.feed_early(&early);
            drop(early);
            conn.run(&mut stream).await;
        }
        Upgraded::Unix(mut stream, early) => {
            conn.feed_early(&early);
            drop(early);
            conn.run(&mut stream).await;
        }
        Upgraded::Other(mut io) => conn.run(&mut io).await,
        Upgraded::Duplex(mut io) => conn.run(&mut io).await,
    }
    conn.finish(joined).await;
    shared
        .stats
        .websocket_closed
        .fetch_add(1, Ordering::Relaxed);
    drop(guard);
}
