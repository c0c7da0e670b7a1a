//! WebSocket: the frame codec and the connection task.

pub(crate) mod codec;
pub(crate) mod conn;
pub(crate) mod outlet;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use self::conn::{Conn, Decision, OpenTask, Upgraded, decide, finish_upgrade, fmt_peer};
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
    scope: Scope,
    source: UpgradeSource,
    tx: oneshot::Sender<Decision>,
    guard: ConnGuard,
) {
    // The handshake and the cleanup run in boxed futures that exist only while they run, so
    // what an idle connection's task holds is the open loop's state and nothing more.
    let tracker = shared.tracker.clone();
    let opened = Box::pin(open(shared, endpoint, scope, source, tx)).await;
    let Some((conn, upgraded)) = opened else {
        return;
    };
    // The open connection continues as a task of its own, sized to what it holds.
    match upgraded {
        Upgraded::Tcp(stream, _) => match conn.share_socket(stream) {
            Ok(io) => tracker.spawn(OpenTask::new(conn, io, guard)),
            Err(stream) => tracker.spawn(OpenTask::new(conn, stream, guard)),
        },
        Upgraded::Unix(stream, _) => tracker.spawn(OpenTask::new(conn, stream, guard)),
        Upgraded::Other(io) => tracker.spawn(OpenTask::new(conn, io, guard)),
        Upgraded::Duplex(io) => tracker.spawn(OpenTask::new(conn, io, guard)),
    };
}

/// Builds the consumer, runs the handshake and the upgrade. `None` when the connection never
/// opened (its cleanup has run).
async fn open(
    shared: Arc<Shared>,
    endpoint: WebsocketEndpoint,
    scope: Scope,
    source: UpgradeSource,
    tx: oneshot::Sender<Decision>,
) -> Option<(Conn, Upgraded)> {
    let inbox = shared.layer.new_inbox();
    let cx = Context {
        mailbox: inbox.mailbox().clone(),
        scope: scope.clone(),
        layer: shared.layer.clone(),
        tasks: None,
    };
    let consumer = endpoint.factory.make(cx);
    let metered = endpoint.metered;
    let fastlane = endpoint.factory.fastlane();
    drop(endpoint);
    let mut conn = Conn::new(
        shared.clone(),
        scope.clone(),
        inbox,
        consumer,
        metered,
        fastlane,
    );
    let joined = conn.declared_groups();
    let channel = conn.channel_name();
    for group in &joined {
        if let Err(e) = shared.layer.group_add(group, &channel).await {
            tracing::error!(group, error = %e, "could not join a declared group");
            decide(tx, Decision::Reject(500, HandshakeFailure::Error));
            conn.finish().await;
            return None;
        }
    }
    let peer = fmt_peer(scope.client());
    if shared.config.access_log {
        tracing::debug!(target: "canal::access", "{peer} - - \"WSCONNECTING {}\" -", crate::server::auth::logged_target(scope.path(), Some(scope.query_string())));
    }
    let decision = conn.handshake().await;
    let accepted = matches!(decision, Decision::Accept { .. });
    if !decide(tx, decision) || !accepted {
        conn.finish().await;
        return None;
    }
    let upgraded = match source {
        UpgradeSource::Hyper(on_upgrade) => finish_upgrade(on_upgrade).await,
        UpgradeSource::Direct(io) => Some(Upgraded::Duplex(io)),
    };
    let Some(mut upgraded) = upgraded else {
        conn.finish().await;
        return None;
    };
    shared
        .stats
        .websocket_accepted
        .fetch_add(1, Ordering::Relaxed);
    if shared.config.access_log {
        tracing::info!(target: "canal::access", "{peer} - - \"WSCONNECT {}\" -", crate::server::auth::logged_target(scope.path(), Some(scope.query_string())));
    }
    if shared.shutdown.is_cancelled() {
        // Shutdown raced the handshake: the loop sends 1001 and ends.
        conn.shutdown_now();
    }
    if let Upgraded::Tcp(_, early) | Upgraded::Unix(_, early) = &mut upgraded {
        // Bytes hyper read past the handshake; fed now, and their buffer released.
        conn.feed_early(early);
        *early = bytes::Bytes::new();
    }
    Some((conn, upgraded))
}

#[cfg(test)]
mod tests {
    /// What an idle open connection's task holds is its whole per-connection state besides the
    /// mailbox, scope and consumer; keep it from creeping up unnoticed. tokio allocates a task
    /// in 128-byte steps (its cell is 128-aligned) and adds 104 bytes to the future (header,
    /// scheduler, id, stage tag, trailer), and the task tracker adds 8: at 144 bytes the open
    /// task's cell is 256 bytes, one byte more and it is 384 (measured with heaptrack; see
    /// docs/BENCHMARKS.md). A field that an idle connection does not need belongs in `Rare`.
    #[test]
    fn an_open_connection_task_stays_small() {
        let task = std::mem::size_of::<super::conn::OpenTask<tokio::net::TcpStream>>();
        assert!(task <= 144, "OpenTask grew to {task} bytes");
        // With a fastlane the socket lives in an `Outlet` (see outlet.rs), behind one pointer;
        // in its `Arc`, within jemalloc's 64-byte size class.
        let task = std::mem::size_of::<super::conn::OpenTask<super::outlet::OutletIo>>();
        assert!(task <= 144, "OpenTask<OutletIo> grew to {task} bytes");
        let outlet = std::mem::size_of::<super::outlet::Outlet>();
        assert!(outlet + 16 <= 64, "Outlet grew to {outlet} bytes");
        let conn = std::mem::size_of::<super::conn::Conn>();
        assert!(conn <= 104, "Conn grew to {conn} bytes");
        // The mailbox lives in an Arc: 16 bytes of counts plus this, which must stay within
        // jemalloc's 128-byte size class (the `canal` binary's allocator).
        let mailbox = std::mem::size_of::<crate::layer::Mailbox>();
        assert!(mailbox + 16 <= 128, "Mailbox grew to {mailbox} bytes");
        // The demo's consumer box: the room lives in the scope, not here.
        let context = std::mem::size_of::<crate::consumer::Context>();
        assert!(context <= 48, "Context grew to {context} bytes");
    }
}
