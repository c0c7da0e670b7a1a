//! The `canal` command line: `serve` (the demo app), `worker` and `send`.

// In its own directory so Cargo does not take it for a binary of its own.
#[path = "canal/supervisor.rs"]
mod supervisor;

/// jemalloc's size classes (…, 96, 112, 128, 160, …, 256, 320, 384) and its lack of a per-chunk
/// header fit the many small per-connection objects better than glibc's malloc: an idle
/// connection costs about 150 bytes less (docs/BENCHMARKS.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use std::sync::Arc;

use canal::layer::{CapacityRule, LayerConfig};
use canal::server::{
    Builtins, Inherited, OverflowPolicy, ServerConfig, WorkerIdentity, adopt_fd, bind_reuseport,
};
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
    /// Messages a channel holds before a send to it fails with ChannelFull and group sends
    /// skip it (Channels' `capacity`).
    #[arg(long, value_name = "N", default_value_t = 100)]
    capacity: usize,
    /// Capacity for channels whose name matches a glob pattern, as `PATTERN=N` (Channels'
    /// `channel_capacity`; a pattern starting with `^` is a regular expression). Repeatable; the
    /// first match wins. With Redis, `specific.*=1000` gives each process's shared key room for a
    /// burst of group sends from other processes.
    #[arg(long, value_name = "PATTERN=N")]
    channel_capacity: Vec<String>,
}

impl LayerOpts {
    /// The capacity settings as a layer configuration.
    fn layer_config(&self) -> Result<LayerConfig, String> {
        let mut config = LayerConfig::default().with_capacity(self.capacity);
        for spec in &self.channel_capacity {
            let (pattern, n) = spec.rsplit_once('=').ok_or_else(|| {
                format!("--channel-capacity {spec:?}: expected PATTERN=N, e.g. 'specific.*=1000'")
            })?;
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| format!("--channel-capacity {spec:?}: {n:?} is not a count"))?;
            let rule = if pattern.starts_with('^') {
                CapacityRule::regex(pattern, n)
            } else {
                CapacityRule::glob(pattern, n)
            }
            .map_err(|e| format!("--channel-capacity {spec:?}: {e}"))?;
            config = config.with_channel_capacity(rule);
        }
        Ok(config)
    }
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
    /// it is logged as blocking, timed to the kernel's tick of a few ms (0 turns the watchdog
    /// off)
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
    /// Worker processes sharing the TCP port (SO_REUSEPORT; the kernel spreads connections
    /// over them). With more than 1, a supervisor starts them, restarts one that dies (with a
    /// backoff) and stops them on SIGINT/SIGTERM. Needs a shared layer (--layer
    /// redis://HOST:PORT) so that groups span the processes; not with --unix-socket or --fd.
    /// 1 is a single process with no supervisor
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::value_parser!(u16).range(1..=256)
    )]
    workers: u16,
    /// Threads of the async runtime. 1 runs every connection on one thread with a strictly
    /// first-in, first-out scheduler, which keeps a large room fair: each member gets its turn
    /// before any member gets a second one. Default: the CPUs this process may run on (1 under
    /// `taskset -c 0`), and 1 in each worker of --workers
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Internal: this process is worker N of `--workers`, started by the supervisor.
    #[arg(long, hide = true, value_name = "N")]
    worker_index: Option<usize>,
    /// Internal: how many times the supervisor restarted this worker's slot.
    #[arg(long, hide = true, default_value_t = 0)]
    worker_restarts: u32,
    /// Internal: the address every worker binds (resolved once by the supervisor).
    #[arg(long, hide = true, value_name = "ADDR")]
    worker_bind: Option<SocketAddr>,
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

    /// This process's identity as a worker of `--workers N`, if it is one.
    fn worker(&self) -> Option<WorkerIdentity> {
        self.worker_index
            .map(|index| WorkerIdentity::new(index, self.worker_restarts))
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
        if let Some(worker) = self.worker() {
            builtins = builtins.worker(worker);
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
    if let Some(addr) = args.deploy.worker_bind {
        return bind_reuseport(addr)
            .map(Bound::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}"));
    }
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
        .filter(|a| !a.is_hide_set())
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
    let threads = match &cli.command {
        Command::Serve(args) => args.deploy.threads.map(usize::from).or_else(|| {
            // Each worker of --workers is one process per core: one thread each.
            args.deploy.worker_index.map(|_| 1)
        }),
        _ => None,
    };
    let runtime = match build_runtime(threads) {
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

/// The async runtime: single-threaded (tokio's current-thread scheduler) for one thread,
/// multi-threaded otherwise.
///
/// The current-thread scheduler runs woken tasks in wake order, so in a large room every member
/// gets its turn before any gets a second one. The multi-thread scheduler keeps 256 wake-ups in
/// a worker's local queue and a LIFO slot and moves the rest to a global queue it visits
/// rarely; before group sends woke large rooms in chunks and held back a sender that outruns a
/// room, that starved members until their mailboxes overflowed (`channel_full` drops at 1,600
/// msg/s into a 1,000-member room on one CPU, docs/BENCHMARKS.md). With both, the rooms
/// measured lose nothing on either scheduler.
fn build_runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Builds the layer named by `--layer`.
fn build_layer(opts: &LayerOpts) -> Result<Layer, String> {
    let spec = opts.layer.trim();
    if spec == "memory://" || spec == "memory" {
        return Ok(Arc::new(MemoryLayer::new(opts.layer_config()?)));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        let mut config = RedisConfig::from_urls(spec);
        config.layer = opts.layer_config()?;
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

/// Refuses `--workers N` (N > 1) where the processes could not work as one server.
fn check_workers(args: &ServeArgs) -> Result<(), String> {
    let n = args.deploy.workers;
    if args.deploy.unix_socket.is_some() || args.deploy.fd.is_some() {
        return Err(format!(
            "--workers {n} cannot be combined with --unix-socket or --fd: the workers share a \
             TCP port with SO_REUSEPORT (--bind HOST:PORT); run one canal per socket instead"
        ));
    }
    let spec = args.layer.layer.trim();
    if !(spec.starts_with("redis://") || spec.starts_with("rediss://")) {
        return Err(format!(
            "--workers {n} needs a shared channel layer: with the in-memory layer each worker \
             process would keep its own groups, and a message sent in a room would reach only \
             the members connected to the same worker. Start Redis and add \
             --layer redis://127.0.0.1:6379 (or set `layer` in the config file)"
        ));
    }
    Ok(())
}

/// The first `host:port` that `--bind` resolves to, checked free: bound (not listening) and
/// released at once, so a port already in use is reported before any worker starts, and
/// port 0 becomes one port for every worker.
async fn resolve_bind(bind: &str) -> Result<SocketAddr, String> {
    let addr = tokio::net::lookup_host(bind)
        .await
        .map_err(|e| format!("cannot resolve {bind}: {e}"))?
        .next()
        .ok_or_else(|| format!("{bind} resolves to no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    let probe = socket
        .and_then(|s| s.set_reuseaddr(true).map(|()| s))
        .and_then(|s| s.bind(addr).map(|()| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(probe)
}

/// The worker's end of the supervisor's control socket: its standard input.
fn control_socket() -> Result<tokio::net::UnixStream, String> {
    use std::os::fd::AsFd;
    let internal = "--worker-index is internal to `canal serve --workers N`";
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("{internal}: cannot take standard input: {e}"))?;
    if rustix::net::sockopt::socket_domain(&fd).ok() != Some(rustix::net::AddressFamily::UNIX) {
        return Err(format!(
            "{internal}: its standard input must be the supervisor's socket"
        ));
    }
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(std))
        .map_err(|e| format!("{internal}: {e}"))
}

/// Completes when the supervisor's end of the control socket closes: the supervisor is gone.
async fn supervisor_gone(mut control: tokio::net::UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    while let Ok(n) = control.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// The startup line for a TCP address.
struct Banner<'a> {
    http: &'a str,
    ws: &'a str,
    root: &'a str,
    layer: &'a str,
    limit: usize,
}

impl Banner<'_> {
    fn lines(&self, addr: &str, workers: Option<u16>, admin: Option<(&str, &str)>) -> Vec<String> {
        let Banner {
            http,
            ws,
            root,
            layer,
            limit,
        } = self;
        let scale = match workers {
            Some(n) => format!("{n} worker processes on one port, up to {limit} connections each"),
            None => format!("up to {limit} connections"),
        };
        let mut lines = vec![format!(
            "canal serving on {http}://{addr}{root}/ (chat page), \
             {ws}://{addr}{root}/ws/echo/ and {ws}://{addr}{root}/ws/chat/{{room}}/ \
             — {layer}, {scale}; Ctrl-C to stop"
        )];
        if let Some((path, token)) = admin {
            let admin = path.trim_end_matches('/');
            lines.push(format!(
                "canal dashboard on {http}://{addr}{root}{admin}/?token={token}"
            ));
        }
        lines
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let workers = args.deploy.workers;
    if workers > 1
        && let Err(e) = check_workers(&args)
    {
        eprintln!("canal: {e}");
        return ExitCode::from(2);
    }
    // With --workers N the first process only supervises: the workers build the layer.
    let supervising = workers > 1 && args.deploy.worker_index.is_none();
    let layer = if supervising {
        None
    } else {
        match build_layer(&args.layer) {
            Ok(layer) => Some(layer),
            Err(e) => {
                eprintln!("canal: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let layer_name = if layer.as_ref().is_some_and(|l| !l.is_shared()) {
        "in-memory layer".to_owned()
    } else {
        canal::layer::redact(&args.layer.layer)
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
    let limit = config.connection_limit();
    let mut server = Server::new(demo::app()).with_config(config);
    if let Some(layer) = layer {
        server = server.with_layer(layer);
    }
    let mut server = match server.with_builtins(args.deploy.builtins(admin_token.as_deref())) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };
    let banner = Banner {
        http: http_scheme,
        ws: ws_scheme,
        root: &root,
        layer: &layer_name,
        limit,
    };
    let admin = admin_token
        .as_deref()
        .map(|t| (args.deploy.admin_path.as_str(), t));
    if supervising {
        // The settings are valid (the server above was built from them); the workers serve.
        drop(server);
        return supervise(&args, &banner, admin).await;
    }
    let worker = args.deploy.worker();
    let bound = match bind(&args).await {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = server.handle();
    let limit = handle.connection_limit();
    let signal = shutdown_signal();
    let result = match bound {
        Bound::Tcp(listener) if worker.is_some() => {
            // A worker: tell the supervisor it listens, and stop when the supervisor is gone.
            let mut control = match control_socket() {
                Ok(control) => control,
                Err(e) => {
                    eprintln!("canal: {e}");
                    return ExitCode::from(2);
                }
            };
            let addr = listener
                .local_addr()
                .map_or(args.bind.clone(), |a| a.to_string());
            let ready = format!("ready {addr}\n");
            if let Err(e) =
                tokio::io::AsyncWriteExt::write_all(&mut control, ready.as_bytes()).await
            {
                eprintln!("canal: cannot reach the supervisor: {e}");
                return ExitCode::FAILURE;
            }
            let shutdown = async move {
                tokio::select! {
                    () = signal => {}
                    () = supervisor_gone(control) => {
                        tracing::warn!("the supervisor is gone; stopping this worker");
                    }
                }
            };
            server.serve(listener, shutdown).await
        }
        Bound::Tcp(listener) => {
            let addr = listener
                .local_addr()
                .map_or(args.bind.clone(), |a| a.to_string());
            for line in banner.lines(&addr, None, admin) {
                println!("{line}");
            }
            server.serve(listener, signal).await
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
            let result = server.serve(listener, signal).await;
            if let Some(path) = path {
                let _ = std::fs::remove_file(path);
            }
            result
        }
    };
    stopped(result)
}

/// The exit of a server or a supervisor: 0 after a clean stop, 1 with the reason otherwise.
fn stopped<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
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

/// Runs the supervisor of `--workers N`.
async fn supervise(args: &ServeArgs, banner: &Banner<'_>, admin: Option<(&str, &str)>) -> ExitCode {
    let bind = match resolve_bind(&args.bind).await {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = args.deploy.workers;
    let mut env = Vec::new();
    if let Some((_, token)) = admin {
        // A token made up here must be the same in every worker.
        env.push(("CANAL_ADMIN_TOKEN".to_owned(), token.to_owned()));
    }
    let plan = supervisor::Plan {
        workers: usize::from(workers),
        bind,
        args: std::env::args_os().skip(1).collect(),
        grace: Duration::from_secs(args.shutdown_grace),
        env,
        startup: banner.lines(&bind.to_string(), Some(workers), admin),
    };
    stopped(supervisor::run(plan).await)
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
