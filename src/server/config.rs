//! Server settings, with defaults that match daphne where daphne has one.

use std::time::Duration;

/// What happens when a client does not read fast enough and its outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Close the connection with 1008 (the default: a client that cannot keep up learns it).
    #[default]
    Close,
    /// Drop the oldest queued message that has not started going out.
    DropOldest,
    /// Drop the message that did not fit.
    DropNewest,
}

impl std::str::FromStr for OverflowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "close" => Ok(OverflowPolicy::Close),
            "drop-oldest" => Ok(OverflowPolicy::DropOldest),
            "drop-newest" => Ok(OverflowPolicy::DropNewest),
            other => Err(format!(
                "unknown overflow policy {other:?} (use close, drop-oldest or drop-newest)"
            )),
        }
    }
}

/// Server settings. Build with [`ServerConfig::default`] and the `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Send a ping after this long without hearing from a client (daphne: 20 s).
    pub ping_interval: Duration,
    /// Drop a client that has not answered a ping after this long (daphne: 30 s).
    pub ping_timeout: Duration,
    /// Time a client has to send its request headers (slowloris guard).
    pub header_timeout: Duration,
    /// Time a consumer has to accept or deny a WebSocket before the handshake gets 403.
    pub accept_timeout: Duration,
    /// Largest reassembled WebSocket message, in bytes (daphne 4.2.2: 1 MiB).
    pub max_message_size: usize,
    /// Largest single WebSocket frame payload, in bytes (daphne 4.2.2: 1 MiB).
    pub max_frame_size: usize,
    /// Close an HTTP keep-alive connection after this long without a request.
    pub http_idle_timeout: Duration,
    /// Largest plain HTTP request body, in bytes (413 beyond).
    pub max_body_size: usize,
    /// Most connections served at once; `None` derives it from the open-file limit.
    pub max_connections: Option<usize>,
    /// Bytes queued towards one client before the overflow policy applies.
    pub max_outbound_bytes: usize,
    /// Messages queued towards one client before the overflow policy applies.
    pub max_outbound_messages: usize,
    /// What to do when a client's outbound queue is full.
    pub overflow: OverflowPolicy,
    /// Client messages queued for a busy consumer before the server stops reading the socket.
    pub max_pending_events: usize,
    /// How long to wait for the client's answer to our close frame.
    pub close_timeout: Duration,
    /// How long handlers get to finish after a connection closes (daphne: 10 s).
    pub app_close_timeout: Duration,
    /// How long shutdown waits for connections to finish before giving up on them.
    pub shutdown_grace: Duration,
    /// Log one line per request, WebSocket connect and disconnect.
    pub access_log: bool,
    /// A prefix the server is mounted under behind a proxy (`/chat-app`, daphne's
    /// `--root-path`): it is stripped from request paths before routing, a path outside it
    /// gets 404, and the bare prefix is redirected to the prefix with a slash. Empty: none.
    pub root_path: String,
    /// Origins allowed to open WebSockets besides the server's own host (see
    /// [`origin`](super::origin)). Empty (the default): a handshake without `Origin`, or with
    /// an `Origin` matching its `Host`, is allowed, any other gets 403. Entries: `*` (all, with
    /// a startup warning), `https://app.example.com`, `localhost:3000`, `.example.com`.
    pub allowed_origins: Vec<String>,
    /// Most connections at once from one client IP address (503 past it, before any request is
    /// read). `None` (the default): no per-address limit, so load tools and proxies that
    /// open many connections from one address are not throttled.
    pub max_connections_per_ip: Option<usize>,
    /// Most messages a client may send on one WebSocket per second (a window of one
    /// second); past it the connection is closed with 1008. `None` (the default): no limit.
    pub max_messages_per_second: Option<u32>,
    /// The kernel send buffer of each accepted socket (`SO_SNDBUF`, set on the listener), in
    /// bytes. It bounds the kernel memory a client that stops reading can pin (up to 4 MiB
    /// each with Linux's autotuning), and makes the outbound queue bound, hence the overflow
    /// policy, apply sooner. `None` (the default): the kernel tunes it.
    pub socket_send_buffer: Option<usize>,
    /// How long one handler run (`connect`, `receive`, an event) may take; past it the handler
    /// is dropped and the connection closed with 1011. `None` (the default): no limit.
    ///
    /// Only a handler that yields (awaits) can be cut off. A future that never returns from a
    /// poll (a busy loop, blocking I/O) holds its worker thread and cannot be preempted in
    /// Rust; run blocking code with `tokio::task::spawn_blocking`.
    pub handler_timeout: Option<Duration>,
    /// The HS256 secret that WebSocket handshake tokens are checked with (see
    /// [`auth`](super::auth)); give it from the environment or a config file, never from the
    /// repository. `None` (the default): tokens are not read and no user is set.
    pub jwt_secret: Option<super::auth::JwtSecret>,
    /// Require an authenticated user on every WebSocket route (403 before the upgrade
    /// without a valid token). Default `false`: only routes wrapped in
    /// [`login_required`](crate::login_required), or consumers whose `check` asks for
    /// [`Scope::user`](crate::Scope::user), require one.
    pub require_user: bool,
    /// Serve HTTPS and `wss://` with this rustls configuration (see
    /// [`tls::load`](super::tls::load) for PEM files). `None` (the default): plain TCP.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed (exact
    /// addresses). Empty (the default): those headers never change the scope's client or
    /// scheme. Limits per client address still count the proxy's address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// A budget, in bytes, for what all WebSocket connections buffer together (outbound
    /// queues and partial inbound frames, which are allocated at their announced length).
    /// Past it, a connection that holds more than an even share is closed with 1008 when it
    /// next does something, and counted. `None` (the default): each connection is bounded on
    /// its own only (frame and message limits, outbound queue bounds).
    pub memory_budget: Option<usize>,
    /// Watchdog: log (and count) a consumer handler that holds its worker thread longer than
    /// this in one poll, without yielding (blocking I/O, a long computation). Default 1 s;
    /// `None` turns the two clock reads per handler poll off. Polls are timed on the kernel's
    /// coarse monotonic clock, whose tick is a few milliseconds (4 ms on a 250 Hz kernel), so
    /// a threshold of a few ticks is approximate.
    pub blocking_threshold: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(5),
            accept_timeout: Duration::from_secs(5),
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            http_idle_timeout: Duration::from_secs(5),
            max_body_size: 1 << 20,
            max_connections: None,
            max_outbound_bytes: 1 << 20,
            max_outbound_messages: 1024,
            overflow: OverflowPolicy::Close,
            max_pending_events: 64,
            close_timeout: Duration::from_secs(5),
            app_close_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            access_log: true,
            root_path: String::new(),
            allowed_origins: Vec::new(),
            max_connections_per_ip: None,
            max_messages_per_second: None,
            socket_send_buffer: None,
            handler_timeout: None,
            jwt_secret: None,
            require_user: false,
            tls: None,
            trusted_proxies: Vec::new(),
            memory_budget: None,
            blocking_threshold: Some(Duration::from_secs(1)),
        }
    }
}

impl ServerConfig {
    /// The root path in canonical form: empty, or `/` followed by text, with no trailing
    /// slash. A value that is not a path (no leading `/`, or holding `?` or `#`) is an error.
    pub fn normalized_root_path(&self) -> Result<String, String> {
        let root = self.root_path.trim_end_matches('/');
        if root.is_empty() {
            return Ok(String::new());
        }
        if !root.starts_with('/') || root.contains(['?', '#']) || root.contains(char::is_whitespace)
        {
            return Err(format!(
                "root path {:?} must start with '/' and hold no '?', '#' or whitespace",
                self.root_path
            ));
        }
        Ok(root.to_owned())
    }

    /// The connection limit in force: the configured one, or the open-file limit minus a
    /// reserve for the listener, log files, Redis connections and the like.
    pub fn connection_limit(&self) -> usize {
        self.max_connections
            .unwrap_or_else(default_connection_limit)
    }
}

/// Open files the server keeps for itself when deriving the connection limit.
const FD_RESERVE: u64 = 64;

/// The soft `RLIMIT_NOFILE` minus a reserve (1024 if it cannot be read).
pub fn default_connection_limit() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _hard)) if soft != rlimit::INFINITY => {
            soft.saturating_sub(FD_RESERVE).max(16) as usize
        }
        _ => 1024,
    }
}
