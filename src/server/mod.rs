//! The server: one port for HTTP and WebSocket, the accept loop, limits and shutdown.
//!
//! [`Server::serve`] takes a bound listener and a shutdown future, so tests bind port 0 and end
//! the server when they like. Each TCP connection is served by hyper (HTTP/1.1, keep-alive,
//! header timeout); a WebSocket upgrade hands the raw socket to a connection task of our own
//! (`ws::conn`) and hyper lets go of it.

mod admin;
pub mod auth;
mod builtins;
pub mod config;
mod http;
mod instrument;
pub mod listener;
pub mod origin;
mod proxy;
mod stats;
pub mod tls;
pub(crate) mod watchdog;
pub(crate) mod ws;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builtins::{Builtins, WorkerIdentity};
pub(crate) use http::{accept_key as http_accept_key, check_headers as http_check_headers};

/// The proxy-header resolution, for the property harness.
pub(crate) fn proxy_resolve(
    trusted: &[std::net::IpAddr],
    peer: Option<SocketAddr>,
    headers: &hyper::HeaderMap,
) -> (Option<SocketAddr>, bool) {
    proxy::resolve(trusted, peer, headers, false)
}
pub use config::{OverflowPolicy, ServerConfig};
pub use listener::{AdoptError, Inherited, Listener, adopt_fd, bind_reuseport};
pub use stats::{
    BUILTIN_MESSAGE_TYPES, HandshakeFailure, Histogram, LATENCY_BUCKETS, LayerOp, OTHER_TYPE,
    ServerStats,
};

use crate::consumer::{HttpEndpoint, Layer, WebsocketEndpoint};
use crate::layer::{MemoryLayer, Signal};
use crate::routing::{Route, Router};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listener could not be used.
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A built-in route would share its path with an app route or another built-in.
    #[error(
        "the built-in {builtin} route {path:?} clashes with {with}; move the built-in route \
         or switch it off"
    )]
    RouteClash {
        /// The built-in route (`metrics`, `ready`, `rooms`, `publish`).
        builtin: &'static str,
        /// The path both would answer.
        path: String,
        /// What it clashes with.
        with: String,
    },
    /// A built-in route was given a path it cannot have.
    #[error("invalid path {path:?} for the built-in {builtin} route: {problem}")]
    BuiltinPath {
        /// The built-in route.
        builtin: &'static str,
        /// The path given.
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// The application: what runs for HTTP requests and for WebSocket connections, routed by path
/// (Channels' `ProtocolTypeRouter` of two `URLRouter`s).
#[derive(Default)]
pub struct App {
    pub(crate) http: Router<HttpEndpoint>,
    pub(crate) websocket: Router<WebsocketEndpoint>,
    pub(crate) message_types: Vec<String>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("http", &self.http)
            .field("websocket", &self.websocket)
            .finish()
    }
}

impl App {
    /// An app with no routes (everything answers 404).
    pub fn new() -> Self {
        App::default()
    }

    /// Adds a WebSocket route (tried in the order added).
    pub fn websocket(mut self, route: Route<WebsocketEndpoint>) -> Self {
        self.websocket.push(route);
        self
    }

    /// Adds an HTTP route (tried in the order added).
    pub fn http(mut self, route: Route<HttpEndpoint>) -> Self {
        self.http.push(route);
        self
    }

    /// Replaces the WebSocket router.
    pub fn websocket_router(mut self, router: Router<WebsocketEndpoint>) -> Self {
        self.websocket = router;
        self
    }

    /// Replaces the HTTP router.
    pub fn http_router(mut self, router: Router<HttpEndpoint>) -> Self {
        self.http = router;
        self
    }

    /// Declares a layer message type the app uses (`"chat.message"`), so metrics count it
    /// under its own label. Undeclared types are counted as `other`, which keeps the number of
    /// time series bounded whatever clients send.
    pub fn message_type(mut self, kind: &str) -> Self {
        if !self.message_types.iter().any(|t| t == kind) {
            self.message_types.push(kind.to_owned());
        }
        self
    }
}

/// State shared by every connection task of one server.
pub(crate) struct Shared {
    pub(crate) app: App,
    pub(crate) config: ServerConfig,
    pub(crate) layer: Layer,
    pub(crate) stats: stats::Counters,
    pub(crate) builtins: builtins::Mounted,
    /// The dashboard's state, when it is on.
    pub(crate) admin: Option<admin::Admin>,
    /// `--root-path`, normalized (empty, or `/x` without a trailing slash).
    pub(crate) root_path: String,
    /// The compiled `allowed_origins`.
    pub(crate) origins: origin::OriginPolicy,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) connections: AtomicUsize,
    /// Bytes buffered by WebSocket connections, as they last reported (with a memory budget).
    pub(crate) buffered: AtomicUsize,
    /// Open connections per client address (only kept with `max_connections_per_ip`).
    pub(crate) per_ip: parking_lot::Mutex<HashMap<IpAddr, usize>>,
    pub(crate) limit: usize,
}

/// Counts a live connection (and, with a per-address limit, its client address); dropping it
/// frees the slot.
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    /// The client address counted in `per_ip` (boxed: `None` unless the limit is on).
    ip: Option<Box<IpAddr>>,
    /// False once the count was handed to an open connection ([`ConnGuard::into_ip`]).
    armed: bool,
}

impl ConnGuard {
    /// Counts a connection from `peer` without checking any limit (it was admitted already).
    pub(crate) fn new(shared: &Arc<Shared>, peer: Option<SocketAddr>) -> Self {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let ip = match (shared.config.max_connections_per_ip, peer) {
            (Some(_), Some(peer)) => {
                *shared.per_ip.lock().entry(peer.ip()).or_insert(0) += 1;
                Some(Box::new(peer.ip()))
            }
            _ => None,
        };
        ConnGuard {
            shared: shared.clone(),
            ip,
            armed: true,
        }
    }

    /// Hands the count to an open connection, which keeps only the address (if one is
    /// counted) and takes a guard back with [`ConnGuard::resume`] when it ends: its task then
    /// holds one pointer fewer.
    pub(crate) fn into_ip(mut self) -> Option<Box<IpAddr>> {
        self.armed = false;
        self.ip.take()
    }

    /// The guard of a connection counted earlier (the other half of [`ConnGuard::into_ip`]).
    pub(crate) fn resume(shared: Arc<Shared>, ip: Option<Box<IpAddr>>) -> Self {
        ConnGuard {
            shared,
            ip,
            armed: true,
        }
    }

    /// Counts a new connection from `peer`, or `None` when its address is at the per-address
    /// limit.
    fn admit(shared: &Arc<Shared>, peer: Option<SocketAddr>) -> Option<Self> {
        if let (Some(limit), Some(peer)) = (shared.config.max_connections_per_ip, peer) {
            let mut map = shared.per_ip.lock();
            let count = map.entry(peer.ip()).or_insert(0);
            if *count >= limit {
                return None;
            }
            *count += 1;
            drop(map);
            shared.connections.fetch_add(1, Ordering::Relaxed);
            return Some(ConnGuard {
                shared: shared.clone(),
                ip: Some(Box::new(peer.ip())),
                armed: true,
            });
        }
        Some(ConnGuard::new(shared, peer))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip.take() {
            let mut map = self.shared.per_ip.lock();
            if let Some(count) = map.get_mut(&*ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(&*ip);
                }
            }
        }
    }
}

/// Seconds since the process started, on a coarse clock (used for keep-alive bookkeeping).
pub(crate) fn coarse_secs() -> u32 {
    static BASE: OnceLock<Duration> = OnceLock::new();
    let base = *BASE.get_or_init(coarse_now);
    coarse_now().saturating_sub(base).as_secs() as u32
}

/// The monotonic clock at the kernel's tick (a few milliseconds): `CLOCK_MONOTONIC_COARSE`,
/// which the vDSO answers by reading a variable, where `Instant::now` reads the CPU's counter.
/// For what runs on every message and needs no finer time: the keep-alive stamps and the
/// watchdog's one-second threshold. (Precise clock reads were 2.7 % of the server's profile
/// under echo load, docs/BENCHMARKS.md.)
pub(crate) fn coarse_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// A server ready to run: an app, a layer and settings.
pub struct Server {
    app: App,
    config: ServerConfig,
    layer: Option<Layer>,
    builtins: Option<builtins::Mounted>,
    stats: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("app", &self.app)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A view of a running server, for tests, dashboards and metrics.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Counters of the server.
    pub fn stats(&self) -> ServerStats {
        let mut stats = self
            .shared
            .stats
            .snapshot(self.shared.connections.load(Ordering::Relaxed));
        stats.buffered_bytes = self.shared.buffered.load(Ordering::Relaxed) as u64;
        stats
    }

    /// The channel layer the server runs with.
    pub fn layer(&self) -> &Layer {
        &self.shared.layer
    }

    /// The connection limit in force.
    pub fn connection_limit(&self) -> usize {
        self.shared.limit
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The server's figures in the Prometheus text exposition format (what the built-in
    /// metrics route serves), for apps that expose them their own way.
    pub fn prometheus(&self) -> String {
        builtins::render_metrics(self)
    }
}

impl Server {
    /// A server for `app` with the in-memory layer and default settings.
    pub fn new(app: App) -> Self {
        Server {
            app,
            config: ServerConfig::default(),
            layer: None,
            builtins: None,
            stats: None,
        }
    }

    /// Mounts the built-in routes ([`Builtins`]: metrics, readiness, rooms, publish) next to
    /// the app's routes. Fails when one of them would answer a path an app route matches (or
    /// two built-ins share a path): move it or switch it off. Call it after the app is
    /// complete and before [`handle`](Self::handle) or [`serve`](Self::serve).
    pub fn with_builtins(mut self, builtins: Builtins) -> Result<Self, ServerError> {
        if self.stats.is_some() {
            return Err(ServerError::Config(
                "with_builtins must be called before handle() or serve()".to_owned(),
            ));
        }
        self.builtins = Some(builtins::mount(&self.app, &builtins)?);
        Ok(self)
    }

    /// Uses `layer` instead of a fresh [`MemoryLayer`].
    pub fn with_layer(mut self, layer: Layer) -> Self {
        self.layer = Some(layer);
        self
    }

    /// Uses `config`.
    pub fn with_config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the shared state now, returning a handle to observe the server before it runs.
    pub fn handle(&mut self) -> ServerHandle {
        let shared = self.shared();
        ServerHandle { shared }
    }

    fn shared(&mut self) -> Arc<Shared> {
        if let Some(shared) = &self.stats {
            return shared.clone();
        }
        let layer = self
            .layer
            .take()
            .unwrap_or_else(|| Arc::new(MemoryLayer::default()));
        let app = std::mem::take(&mut self.app);
        let limit = self.config.connection_limit();
        let counters = stats::Counters::new(&app.message_types);
        let builtins = self.builtins.take().unwrap_or_default();
        let admin = builtins.admin_on().then(admin::Admin::new);
        let layer = instrument::Instrumented::wrap(
            layer,
            counters.layer.clone(),
            admin.as_ref().map(|a| a.traffic.clone()),
        );
        let shared = Arc::new(Shared {
            app,
            config: self.config.clone(),
            layer,
            stats: counters,
            builtins,
            admin,
            root_path: self
                .config
                .normalized_root_path()
                .unwrap_or_else(|_| self.config.root_path.clone()),
            // An invalid list fails `serve`; until then, allow only the server's own host.
            origins: origin::OriginPolicy::new(&self.config.allowed_origins).unwrap_or_default(),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            connections: AtomicUsize::new(0),
            buffered: AtomicUsize::new(0),
            per_ip: parking_lot::Mutex::new(HashMap::new()),
            limit,
        });
        self.stats = Some(shared.clone());
        shared
    }

    /// Serves connections from `listener` (a [`tokio::net::TcpListener`], a
    /// [`tokio::net::UnixListener`] or any other [`Listener`]) until `shutdown` completes,
    /// then shuts down gracefully: stops accepting, closes WebSockets with 1001, lets handlers
    /// finish within the grace period.
    pub async fn serve<L: Listener>(
        mut self,
        mut listener: L,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        self.config
            .normalized_root_path()
            .map_err(ServerError::Config)?;
        let origins =
            origin::OriginPolicy::new(&self.config.allowed_origins).map_err(ServerError::Config)?;
        if origins.allows_all() {
            tracing::warn!(
                "allowed origins include \"*\": any web page can open WebSockets to this \
                 server with its visitors' cookies"
            );
        }
        if let Some(bytes) = self.config.socket_send_buffer {
            listener.set_send_buffer(bytes).map_err(|e| {
                ServerError::Config(format!("cannot set the socket send buffer: {e}"))
            })?;
        }
        let shared = self.shared();
        tracing::debug!(local = listener.describe(), limit = shared.limit, "serving");
        let sweeper = tokio::spawn(sweeper(shared.clone()));
        let sampler = shared
            .admin
            .is_some()
            .then(|| tokio::spawn(admin::sampler(Arc::downgrade(&shared))));
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(5);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(5);
                        let shared2 = shared.clone();
                        if shared.connections.load(Ordering::Relaxed) >= shared.limit {
                            shared.stats.rejected_limit.fetch_add(1, Ordering::Relaxed);
                            shared.tracker.spawn(http::refuse_busy(stream));
                            continue;
                        }
                        let Some(guard) = ConnGuard::admit(&shared, peer) else {
                            shared.stats.rejected_per_ip.fetch_add(1, Ordering::Relaxed);
                            shared.tracker.spawn(http::refuse_busy_ip(stream));
                            continue;
                        };
                        match &shared.config.tls {
                            Some(tls) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                                shared.tracker.spawn(http::serve_tls(shared2, acceptor, stream, peer, guard));
                            }
                            None => {
                                shared.tracker.spawn(http::serve_connection(shared2, stream, peer, guard));
                            }
                        }
                    }
                    Err(e) => {
                        if is_resource_exhaustion(&e) {
                            // Out of file descriptors (or memory): wait for connections to end
                            // instead of spinning on accept.
                            tracing::warn!(error = %e, retry_in = ?backoff, "accept failed: out of resources");
                            shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        } else {
                            tracing::debug!(error = %e, "accept failed");
                        }
                    }
                }
            }
        }
        drop(listener);
        tracing::info!("shutting down: closing connections");
        shared.shutdown.cancel();
        shared
            .layer
            .local()
            .for_each(|_, mailbox| mailbox.raise(Signal::Shutdown));
        shared.tracker.close();
        if tokio::time::timeout(shared.config.shutdown_grace, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = shared.tracker.len(),
                "connections still open after the shutdown grace period; abandoning them"
            );
        }
        sweeper.abort();
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        Ok(())
    }
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == 24 /* EMFILE */ || code == 23 /* ENFILE */
            || code == 105 /* ENOBUFS */ || code == 12 /* ENOMEM */
    )
}

/// Once a second: raise the keep-alive tick on connections quiet for the ping interval.
async fn sweeper(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval = shared.config.ping_interval.as_secs() as u32;
    loop {
        tick.tick().await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        let now = coarse_secs();
        shared.layer.local().for_each(|_, mailbox| {
            if now.saturating_sub(mailbox.activity.load(Ordering::Relaxed)) >= interval {
                mailbox.raise(Signal::Tick);
            }
        });
    }
}
