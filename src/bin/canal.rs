//! The `canal` command line: `serve` (the demo app), `worker` and `send`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use std::sync::Arc;

use canal::server::{Builtins, Inherited, OverflowPolicy, ServerConfig, adopt_fd};
use canal::worker::Worker;
use canal::{Layer, LayerError, MemoryLayer, Message, RedisConfig, RedisLayer, Server, demo};

/// canal: HTTP and WebSocket on one port, consumers, groups and a channel layer.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log filter (tracing syntax): error, warn, info, debug, or per target like
    /// `info,canal::access=warn`. RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the chat page and the demo endpoints (/ws/echo/, /ws/chat/{room}/, /health).
    Serve(Box<ServeArgs>),
    /// Consume named channels: log each message, print it as a JSON line, and answer on its
    /// `reply_to` channel if it names one (needs a shared layer such as Redis).
    Worker(WorkerArgs),
    /// Push a message into the layer from a shell (needs a shared layer such as Redis).
    Send(SendArgs),
}

#[derive(Args, Debug, Clone)]
struct LayerOpts {
    /// Channel layer: `memory://` (this process only) or `redis://[:password@]host:port[,…]`
    /// (several hosts form a shard ring, as in channels_redis).
    #[arg(long, default_value = "memory://")]
    layer: String,
    /// Key prefix in Redis (channels_redis `prefix`).
    #[arg(long, default_value = "asgi")]
    redis_prefix: String,
    /// Encryption key (channels_redis `symmetric_encryption_keys`); repeat for rotation, the
    /// first encrypts. Prefer the CANAL_REDIS_KEYS environment variable (comma-separated).
    #[arg(
        long = "redis-key",
        env = "CANAL_REDIS_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    redis_keys: Vec<String>,
}

#[derive(Args, Debug)]
struct WorkerArgs {
    #[command(flatten)]
    layer: LayerOpts,
    /// Channels to consume.
    #[arg(required = true)]
    channels: Vec<String>,
}

#[derive(Args, Debug)]
struct SendArgs {
    #[command(flatten)]
    layer: LayerOpts,
    /// Send to every member of this group instead of to a channel.
    #[arg(long)]
    group: Option<String>,
    /// `CHANNEL MESSAGE`, or just `MESSAGE` with --group. MESSAGE is a JSON object.
    #[arg(required = true, num_args = 1..=2)]
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A TOML file with any of these options (`bind = "0.0.0.0:8000"`, `layer = "redis://…"`,
    /// `max_message_size = 1048576`, `redis_key = ["k1", "k2"]` …); flags given on the command
    /// line win over the file.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: String,
    #[command(flatten)]
    layer: LayerOpts,
    /// Largest WebSocket message, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_message_size: usize,
    /// Largest WebSocket frame payload, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_frame_size: usize,
    /// Seconds of client silence before a ping.
    #[arg(long, default_value_t = 20)]
    ping_interval: u64,
    /// Seconds to wait for a pong before dropping the client.
    #[arg(long, default_value_t = 30)]
    ping_timeout: u64,
    /// Seconds a client has to send its request headers.
    #[arg(long, default_value_t = 5)]
    header_timeout: u64,
    /// Seconds a consumer has to accept or deny a WebSocket (then 403).
    #[arg(long, default_value_t = 5)]
    accept_timeout: u64,
    /// Seconds an idle HTTP keep-alive connection stays open.
    #[arg(long, default_value_t = 5)]
    http_idle_timeout: u64,
    /// Largest HTTP request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_size: usize,
    /// Most connections at once (default: the open-file limit minus 64).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections at once from one client IP address; more get 503 [default: off]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Most messages per second a client may send on one WebSocket; past it the connection
    /// is closed with 1008 [default: off]
    #[arg(long, value_name = "N")]
    max_messages_per_second: Option<u32>,
    /// Kernel send buffer of each connection (SO_SNDBUF), in bytes: bounds what a client that
    /// stops reading pins in the kernel, so the overflow policy applies sooner [default: off,
    /// the kernel tunes it]
    #[arg(long, value_name = "BYTES")]
    socket_send_buffer: Option<usize>,
    /// Seconds one consumer handler run may take before it is cancelled and its connection
    /// closed with 1011 (only handlers that await can be cut off) [default: off]
    #[arg(long, value_name = "SECONDS")]
    handler_timeout: Option<f64>,
    /// HS256 secret for WebSocket tokens (`token` query parameter, `token` cookie, or
    /// `Sec-WebSocket-Protocol: bearer, <token>`); prefer the CANAL_JWT_SECRET environment
    /// variable [default: off, tokens are not read]
    #[arg(
        long,
        value_name = "SECRET",
        env = "CANAL_JWT_SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// Require a valid token (an authenticated user) on every WebSocket route (403 otherwise)
    /// [default: off]
    #[arg(long)]
    require_user: bool,
    /// PEM certificate chain: serve HTTPS and wss:// (with --tls-key) [default: off]
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert [default: off]
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Proxy addresses whose X-Forwarded-For / X-Forwarded-Proto are believed,
    /// comma-separated [default: none, the headers are ignored]
    #[arg(long, value_name = "IPS", value_delimiter = ',')]
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Bytes all WebSockets may buffer together (outbound queues, partial inbound frames);
    /// past it the largest holders are closed with 1008 [default: off]
    #[arg(long, value_name = "BYTES")]
    memory_budget: Option<usize>,
    /// Watchdog: milliseconds a consumer handler may hold a worker thread in one poll before
    /// it is logged as blocking (0 turns the watchdog off)
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    blocking_threshold_ms: u64,
    /// Bytes queued towards one client before the overflow policy applies.
    #[arg(long, default_value_t = 1 << 20)]
    max_outbound_bytes: usize,
    /// Messages queued towards one client before the overflow policy applies.
    #[arg(long, default_value_t = 1024)]
    max_outbound_messages: usize,
    /// What to do with a client that reads too slowly: close (1008), drop-oldest, drop-newest.
    #[arg(long, default_value = "close")]
    overflow: OverflowPolicy,
    /// Seconds handlers get to finish at shutdown.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Turn off the access log (one line per request / WebSocket connect / disconnect).
    #[arg(long)]
    no_access_log: bool,
    /// Origins allowed to open WebSockets besides this server's own host, comma-separated:
    /// `https://app.example.com`, `localhost:3000`, `.example.com` (and subdomains), `null`,
    /// or `*` for all (warned about at startup). A handshake without Origin is always allowed
    /// [default: none, only the server's own host]
    #[arg(long, value_name = "ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    #[command(flatten)]
    deploy: Box<DeployArgs>,
}

/// Running behind a proxy or a supervisor, and the built-in routes.
#[derive(Args, Debug)]
struct DeployArgs {
    /// Listen on this Unix socket instead of TCP (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["fd"])]
    unix_socket: Option<std::path::PathBuf>,
    /// Serve on an already-bound listening socket (TCP or Unix) handed over by a supervisor.
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// Path prefix the server is mounted under behind a proxy; it is stripped before routing.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    root_path: String,
    /// Bearer token that turns on `POST <api>publish` (or set CANAL_PUBLISH_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    publish_token: Option<String>,
    /// Path of the Prometheus metrics endpoint.
    #[arg(long, value_name = "PATH", default_value = "/metrics")]
    metrics_path: String,
    /// Switch the metrics endpoint off.
    #[arg(long)]
    no_metrics: bool,
    /// Path of the readiness endpoint (checks the channel layer).
    #[arg(long, value_name = "PATH", default_value = "/ready")]
    ready_path: String,
    /// Switch the readiness endpoint off.
    #[arg(long)]
    no_ready: bool,
    /// Prefix of the JSON API (`<prefix>rooms`, `<prefix>publish`).
    #[arg(long, value_name = "PREFIX", default_value = "/api/")]
    api_path: String,
    /// Switch the JSON API off (the room list on `/` then shows no rooms).
    #[arg(long)]
    no_api: bool,
    /// Turn on the live dashboard (off by default).
    #[arg(long)]
    admin: bool,
    /// Prefix of the dashboard (`<prefix>` page, `<prefix>ws` WebSocket).
    #[arg(long, value_name = "PREFIX", default_value = "/admin/")]
    admin_path: String,
    /// Token the dashboard requires (or set CANAL_ADMIN_TOKEN; default: a random one, printed).
    #[arg(long, value_name = "TOKEN")]
    admin_token: Option<String>,
}

impl DeployArgs {
    /// The dashboard token: given, from the environment, or made up now.
    fn admin_token(&self) -> Option<String> {
        if !self.admin {
            return None;
        }
        let given = self
            .admin_token
            .clone()
            .or_else(|| std::env::var("CANAL_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty());
        Some(given.unwrap_or_else(|| {
            std::iter::repeat_with(fastrand::alphanumeric)
                .take(24)
                .collect()
        }))
    }

    fn builtins(&self, admin_token: Option<&str>) -> Builtins {
        let publish_token = self
            .publish_token
            .clone()
            .or_else(|| std::env::var("CANAL_PUBLISH_TOKEN").ok())
            .filter(|t| !t.is_empty());
        let mut builtins = Builtins::default()
            .metrics((!self.no_metrics).then_some(self.metrics_path.as_str()))
            .ready((!self.no_ready).then_some(self.ready_path.as_str()))
            .api((!self.no_api).then_some(self.api_path.as_str()));
        if let Some(token) = publish_token {
            builtins = builtins.publish_token(token);
        }
        if let Some(token) = admin_token {
            builtins = builtins.admin(&self.admin_path, token);
        }
        builtins
    }
}

/// Where `canal serve` listens.
enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, Option<std::path::PathBuf>),
}

/// Binds the Unix socket at `path`, replacing a stale socket file nobody listens on.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

async fn bind(args: &ServeArgs) -> Result<Bound, String> {
    if let Some(path) = &args.deploy.unix_socket {
        return bind_unix(path)
            .map(|l| Bound::Unix(l, Some(path.clone())))
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()));
    }
    if let Some(fd) = args.deploy.fd {
        return match adopt_fd(fd) {
            Ok(Inherited::Tcp(l)) => Ok(Bound::Tcp(l)),
            Ok(Inherited::Unix(l)) => Ok(Bound::Unix(l, None)),
            Err(e) => Err(e.to_string()),
        };
    }
    tokio::net::TcpListener::bind(&args.bind)
        .await
        .map(Bound::Tcp)
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .init();
}

/// Parses the command line, folding in `serve --config FILE` (command-line flags win).
fn parse_cli() -> Result<Cli, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Cli::command().get_matches_from(&argv);
    let Some(serve) = matches.subcommand_matches("serve") else {
        return Cli::from_arg_matches(&matches).map_err(|e| e.to_string());
    };
    let Some(path) = serve.get_one::<std::path::PathBuf>("config") else {
        return Cli::from_arg_matches(&matches).map_err(|e| e.to_string());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("invalid config file {}: {e}", path.display()))?;
    let command = Cli::command();
    let serve_cmd = command.find_subcommand("serve").ok_or("no serve command")?;
    let known: Vec<String> = serve_cmd
        .get_arguments()
        .map(|a| a.get_id().as_str().to_owned())
        .chain(["log_level".to_owned()])
        .collect();
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        if !known.contains(&id) || id == "config" {
            return Err(format!(
                "config file {}: unknown option {key:?}",
                path.display()
            ));
        }
        let given = if id == "log_level" {
            matches.value_source(&id)
        } else {
            serve.value_source(&id)
        };
        if given == Some(clap::parser::ValueSource::CommandLine) {
            continue;
        }
        let flag = format!("--{}", id.replace('_', "-"));
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) => extra.push(flag.clone().into()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => {
                    extra.push(flag.clone().into());
                    extra.push(s.into());
                }
                toml::Value::Integer(i) => {
                    extra.push(flag.clone().into());
                    extra.push(i.to_string().into());
                }
                other => {
                    return Err(format!(
                        "config file {}: {key} has an unsupported value {other}",
                        path.display()
                    ));
                }
            }
        }
    }
    let mut full = argv;
    full.extend(extra);
    let matches = Cli::command()
        .try_get_matches_from(&full)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("canal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Worker(args) => runtime.block_on(worker(args)),
        Command::Send(args) => runtime.block_on(send(args)),
    }
}

/// Builds the layer named by `--layer`.
fn build_layer(opts: &LayerOpts) -> Result<Layer, String> {
    let spec = opts.layer.trim();
    if spec == "memory://" || spec == "memory" {
        return Ok(Arc::new(MemoryLayer::default()));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let mut config = RedisConfig::from_urls(spec);
        config.prefix = opts.redis_prefix.clone();
        config.symmetric_encryption_keys = opts
            .redis_keys
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect();
        return RedisLayer::new(config)
            .map(|l| Arc::new(l) as Layer)
            .map_err(|e| e.to_string());
    }
    Err(format!(
        "unsupported layer {:?}: use memory:// or redis://host:port[,…]",
        canal::layer::redact(spec)
    ))
}

/// A layer shared with other processes, or the reason there is none.
fn shared_layer(opts: &LayerOpts) -> Result<Layer, String> {
    let layer = build_layer(opts)?;
    if !layer.is_shared() {
        return Err(
            "this command needs a shared channel layer (--layer redis://HOST:PORT); \
             the in-memory layer only exists inside one process"
                .to_owned(),
        );
    }
    Ok(layer)
}

async fn worker(args: WorkerArgs) -> ExitCode {
    let layer = match shared_layer(&args.layer) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let mut worker = Worker::new(layer.clone());
    for channel in &args.channels {
        let layer = layer.clone();
        let name = channel.clone();
        worker = worker.route(channel, move |message: Message| {
            let layer = layer.clone();
            let channel = name.clone();
            async move {
                let json = message.to_json();
                tracing::info!(channel, message = %json, "worker received");
                println!(
                    "{}",
                    serde_json::json!({ "channel": channel, "message": json })
                );
                if let Some(reply_to) = message.get("reply_to").and_then(|v| v.as_str()) {
                    let mut answer = message.clone();
                    answer.remove("reply_to");
                    let reply = canal::msg! {
                        "type": "worker.reply",
                        "channel": channel.as_str(),
                        "message": answer,
                    };
                    layer.send(reply_to, reply).await?;
                }
                Ok(())
            }
        });
    }
    eprintln!("canal worker consuming {:?}; Ctrl-C to stop", args.channels);
    match worker.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canal: {e}");
            ExitCode::from(2)
        }
    }
}

async fn send(args: SendArgs) -> ExitCode {
    let layer = match shared_layer(&args.layer) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let (target, text) = match (&args.group, args.args.as_slice()) {
        (Some(group), [text]) => (group.clone(), text.clone()),
        (None, [channel, text]) => (channel.clone(), text.clone()),
        (Some(_), _) => {
            eprintln!("canal: with --group, give only the MESSAGE");
            return ExitCode::from(2);
        }
        (None, _) => {
            eprintln!("canal: give CHANNEL and MESSAGE (or --group GROUP MESSAGE)");
            return ExitCode::from(2);
        }
    };
    let message = match Message::from_json(&text) {
        Ok(message) => message,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.group {
        Some(group) => layer.group_send(group, message).await,
        None => layer.send(&target, message).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (LayerError::InvalidChannelName { .. }
            | LayerError::InvalidGroupName { .. }
            | LayerError::InvalidMessage(_)),
        ) => {
            eprintln!("canal: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("canal: could not send to {target:?}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let layer = match build_layer(&args.layer) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let layer_name = if layer.is_shared() {
        canal::layer::redact(&args.layer.layer)
    } else {
        "in-memory layer".to_owned()
    };
    // Use every file descriptor the hard limit allows; the connection limit follows it.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!(error = %e, "could not raise the open-file limit");
    }
    let mut config = ServerConfig::default();
    config.max_message_size = args.max_message_size;
    config.max_frame_size = args.max_frame_size;
    config.ping_interval = Duration::from_secs(args.ping_interval);
    config.ping_timeout = Duration::from_secs(args.ping_timeout);
    config.header_timeout = Duration::from_secs(args.header_timeout);
    config.accept_timeout = Duration::from_secs(args.accept_timeout);
    config.http_idle_timeout = Duration::from_secs(args.http_idle_timeout);
    config.max_body_size = args.max_body_size;
    config.max_connections = args.max_connections;
    config.max_connections_per_ip = args.max_connections_per_ip;
    config.max_messages_per_second = args.max_messages_per_second;
    config.socket_send_buffer = args.socket_send_buffer;
    config.jwt_secret = match args.jwt_secret.as_deref() {
        Some("") => {
            eprintln!("canal: the JWT secret is empty");
            return ExitCode::from(2);
        }
        Some(secret) => Some(canal::server::auth::JwtSecret::new(secret)),
        None => None,
    };
    config.require_user = args.require_user;
    config.trusted_proxies = args.trusted_proxies.clone();
    config.memory_budget = args.memory_budget;
    config.blocking_threshold =
        (args.blocking_threshold_ms > 0).then(|| Duration::from_millis(args.blocking_threshold_ms));
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        match canal::server::tls::load(cert, key) {
            Ok(tls) => config.tls = Some(tls),
            Err(e) => {
                eprintln!("canal: {e}");
                return ExitCode::from(2);
            }
        }
    }
    config.handler_timeout = match args.handler_timeout.map(Duration::try_from_secs_f64) {
        None => None,
        Some(Ok(d)) if !d.is_zero() => Some(d),
        Some(_) => {
            eprintln!("canal: --handler-timeout must be a positive number of seconds");
            return ExitCode::from(2);
        }
    };
    config.max_outbound_bytes = args.max_outbound_bytes;
    config.max_outbound_messages = args.max_outbound_messages;
    config.overflow = args.overflow;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace);
    config.access_log = !args.no_access_log;
    config.root_path = args.deploy.root_path.clone();
    config.allowed_origins = args.allowed_origins.clone();
    let root = match config.normalized_root_path() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };

    let (http_scheme, ws_scheme) = if config.tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let admin_token = args.deploy.admin_token();
    let mut server = match Server::new(demo::app())
        .with_config(config)
        .with_layer(layer)
        .with_builtins(args.deploy.builtins(admin_token.as_deref()))
    {
        Ok(server) => server,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let bound = match bind(&args).await {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = server.handle();
    let limit = handle.connection_limit();
    let shutdown = shutdown_signal();
    let result = match bound {
        Bound::Tcp(listener) => {
            let addr = listener
                .local_addr()
                .map_or(args.bind.clone(), |a| a.to_string());
            println!(
                "canal serving on {http_scheme}://{addr}{root}/ (chat page), \
                 {ws_scheme}://{addr}{root}/ws/echo/ and {ws_scheme}://{addr}{root}/ws/chat/{{room}}/ \
                 — {layer_name}, up to {limit} connections; Ctrl-C to stop"
            );
            if let Some(token) = &admin_token {
                let admin = args.deploy.admin_path.trim_end_matches('/');
                println!("canal dashboard on {http_scheme}://{addr}{root}{admin}/?token={token}");
            }
            server.serve(listener, shutdown).await
        }
        Bound::Unix(listener, path) => {
            let shown = path.as_ref().map_or_else(
                || "an inherited socket".to_owned(),
                |p| p.display().to_string(),
            );
            println!(
                "canal serving on unix:{shown} (chat page at {root}/) — {layer_name}, up to \
                 {limit} connections; Ctrl-C to stop"
            );
            if let Some(token) = &admin_token {
                let admin = args.deploy.admin_path.trim_end_matches('/');
                println!("canal dashboard at {root}{admin}/?token={token}");
            }
            let result = server.serve(listener, shutdown).await;
            if let Some(path) = path {
                let _ = std::fs::remove_file(path);
            }
            result
        }
    };
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("canal: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, so a
/// signal that arrives after the "serving" line is always a graceful stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}
