//! The `canal` command line: `serve` (the demo app), `worker` and `send`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use canal::server::{Builtins, Inherited, OverflowPolicy, ServerConfig, adopt_fd};
use canal::{Server, demo};

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
    Serve(ServeArgs),
    /// Consume channels for background work (needs a shared layer such as Redis).
    Worker(LayerArgs),
    /// Push a message into the layer from a shell (needs a shared layer such as Redis).
    Send(LayerArgs),
}

#[derive(Args, Debug)]
struct LayerArgs {
    /// Channel layer URL (`redis://host:port[,…]`); the in-memory layer is process-local.
    #[arg(long, default_value = "memory://")]
    layer: String,
    /// Channel names, or a channel/group and a message.
    #[arg(trailing_var_arg = true)]
    rest: Vec<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bind: String,
    /// Channel layer: `memory://` (in-process).
    #[arg(long, default_value = "memory://")]
    layer: String,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Worker(args) | Command::Send(args) => {
            if args.layer.starts_with("memory") {
                eprintln!(
                    "canal: this command needs a shared channel layer (--layer redis://HOST:PORT); \
                     the in-memory layer only exists inside one process"
                );
            } else {
                eprintln!(
                    "canal: unsupported layer {:?} (this build has: memory://)",
                    args.layer
                );
            }
            ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    if args.layer != "memory://" && args.layer != "memory" {
        eprintln!(
            "canal: unsupported layer {:?} (this build has: memory://)",
            args.layer
        );
        return ExitCode::from(2);
    }
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
    config.max_outbound_bytes = args.max_outbound_bytes;
    config.max_outbound_messages = args.max_outbound_messages;
    config.overflow = args.overflow;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace);
    config.access_log = !args.no_access_log;
    config.root_path = args.deploy.root_path.clone();
    let root = match config.normalized_root_path() {
        Ok(root) => root,
        Err(e) => {
            eprintln!("canal: {e}");
            return ExitCode::from(2);
        }
    };

    let admin_token = args.deploy.admin_token();
    let mut server = match Server::new(demo::app())
        .with_config(config)
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
                "canal serving on http://{addr}{root}/ (chat page), ws://{addr}{root}/ws/echo/ and \
                 ws://{addr}{root}/ws/chat/{{room}}/ — in-memory layer, up to {limit} connections; \
                 Ctrl-C to stop"
            );
            if let Some(token) = &admin_token {
                let admin = args.deploy.admin_path.trim_end_matches('/');
                println!("canal dashboard on http://{addr}{root}{admin}/?token={token}");
            }
            server.serve(listener, shutdown).await
        }
        Bound::Unix(listener, path) => {
            let shown = path.as_ref().map_or_else(
                || "an inherited socket".to_owned(),
                |p| p.display().to_string(),
            );
            println!(
                "canal serving on unix:{shown} (chat page at {root}/) — in-memory layer, up to \
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
