//! Built-in routes the server can mount next to an app's own: `/metrics` (Prometheus text),
//! `/ready` (layer health), `/api/rooms`, `/api/publish` and the dashboard (`/admin/`, with
//! its WebSocket at `/admin/ws`).
//!
//! Each can be moved or switched off with [`Builtins`]. They are exact paths, mounted by
//! [`Server::with_builtins`](super::Server::with_builtins), which refuses to start when an
//! app route would match one of them (or two built-ins share a path): a built-in never
//! shadows a user's route silently, and a user's route never hides a built-in.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};

use super::stats::{LATENCY_BUCKETS, ServerStats};
use super::{App, ServerError, Shared};
use crate::layer::{LayerError, LayerStats, check_channel_name, check_group_name};
use crate::message::Message;

type Body = Full<Bytes>;

/// Where the built-in routes live. `None` switches a route off.
///
/// The default mounts `/metrics`, `/ready` and `/api/rooms`; `/api/publish` is mounted only
/// when a publish token is set.
#[derive(Clone)]
#[non_exhaustive]
pub struct Builtins {
    /// Path of the Prometheus endpoint (default `/metrics`).
    pub metrics: Option<String>,
    /// Path of the readiness endpoint (default `/ready`).
    pub ready: Option<String>,
    /// Prefix of the JSON API: `{api}rooms` and `{api}publish` (default `/api/`).
    pub api: Option<String>,
    /// Bearer token that `POST {api}publish` requires; without one the endpoint is off (404).
    pub publish_token: Option<String>,
    /// Prefix of the live dashboard: the page at `{admin}`, its WebSocket at `{admin}ws`
    /// (default: off).
    pub admin: Option<String>,
    /// Token the dashboard requires (`?token=` or `Authorization: Bearer`); needed when the
    /// dashboard is on.
    pub admin_token: Option<String>,
    /// Which worker process of `canal serve --workers N` this server is: `/metrics` then
    /// says so (`canal_worker_info`), and every built-in route answers with an
    /// `X-Canal-Worker` header. `None` (the default): a single process, nothing added.
    pub worker: Option<WorkerIdentity>,
}

/// Who a worker process is, as the built-in routes report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerIdentity {
    /// The worker's slot, 1 to N; a restarted worker keeps its slot.
    pub index: usize,
    /// How many times the supervisor restarted this slot before this process.
    pub restarts: u32,
    /// This process's id.
    pub pid: u32,
}

impl WorkerIdentity {
    /// The identity of this process as worker `index` after `restarts` restarts.
    pub fn new(index: usize, restarts: u32) -> Self {
        WorkerIdentity {
            index,
            restarts,
            pid: std::process::id(),
        }
    }
}

impl std::fmt::Debug for Builtins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builtins")
            .field("metrics", &self.metrics)
            .field("ready", &self.ready)
            .field("api", &self.api)
            .field("publish_token", &self.publish_token.as_ref().map(|_| "…"))
            .field("admin", &self.admin)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "…"))
            .field("worker", &self.worker)
            .finish()
    }
}

impl Default for Builtins {
    fn default() -> Self {
        Builtins {
            metrics: Some("/metrics".to_owned()),
            ready: Some("/ready".to_owned()),
            api: Some("/api/".to_owned()),
            publish_token: None,
            admin: None,
            admin_token: None,
            worker: None,
        }
    }
}

impl Builtins {
    /// No built-in route at all.
    pub fn none() -> Self {
        Builtins {
            metrics: None,
            ready: None,
            api: None,
            publish_token: None,
            admin: None,
            admin_token: None,
            worker: None,
        }
    }

    /// Marks this server as worker process `worker` of several sharing one port.
    pub fn worker(mut self, worker: WorkerIdentity) -> Self {
        self.worker = Some(worker);
        self
    }

    /// Moves (`Some(path)`) or switches off (`None`) the metrics endpoint.
    pub fn metrics(mut self, path: Option<&str>) -> Self {
        self.metrics = path.map(str::to_owned);
        self
    }

    /// Moves or switches off the readiness endpoint.
    pub fn ready(mut self, path: Option<&str>) -> Self {
        self.ready = path.map(str::to_owned);
        self
    }

    /// Moves or switches off the JSON API (rooms and publish).
    pub fn api(mut self, prefix: Option<&str>) -> Self {
        self.api = prefix.map(str::to_owned);
        self
    }

    /// Turns on `POST {api}publish`, guarded by `token` (an empty token is refused).
    pub fn publish_token(mut self, token: impl Into<String>) -> Self {
        self.publish_token = Some(token.into());
        self
    }

    /// Turns on the live dashboard under `prefix` (`/admin/`), guarded by `token`.
    pub fn admin(mut self, prefix: &str, token: impl Into<String>) -> Self {
        self.admin = Some(prefix.to_owned());
        self.admin_token = Some(token.into());
        self
    }
}

/// One built-in endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Metrics,
    Ready,
    Rooms,
    Publish,
    AdminPage,
    AdminSocket,
}

impl Builtin {
    fn name(self) -> &'static str {
        match self {
            Builtin::Metrics => "metrics",
            Builtin::Ready => "ready",
            Builtin::Rooms => "rooms",
            Builtin::Publish => "publish",
            Builtin::AdminPage => "admin",
            Builtin::AdminSocket => "admin WebSocket",
        }
    }
}

/// The built-in routes of one server, by exact path.
#[derive(Default)]
pub(crate) struct Mounted {
    routes: HashMap<String, Builtin>,
    publish_token: Option<Box<[u8]>>,
    admin_token: Option<Box<[u8]>>,
    /// The worker identity and its `X-Canal-Worker` header value, with `--workers N`.
    worker: Option<(WorkerIdentity, HeaderValue)>,
}

impl Mounted {
    pub(crate) fn get(&self, path: &str) -> Option<Builtin> {
        self.routes.get(path).copied()
    }

    pub(crate) fn admin_on(&self) -> bool {
        self.admin_token.is_some()
    }

    /// Whether a request carries the dashboard token (`?token=` or `Authorization: Bearer`).
    pub(crate) fn admin_allowed(&self, headers: &hyper::HeaderMap, query: Option<&str>) -> bool {
        let Some(expected) = self.admin_token.as_deref() else {
            return false;
        };
        if let Some(presented) = bearer(headers) {
            return token_matches(presented, expected);
        }
        let presented = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == "token").then(|| percent_encoding::percent_decode_str(v).collect::<Vec<u8>>())
            })
        });
        presented.is_some_and(|p| token_matches(&p, expected))
    }
}

fn check_path(builtin: &'static str, path: &str, prefix: bool) -> Result<String, ServerError> {
    if !path.starts_with('/') {
        return Err(ServerError::BuiltinPath {
            builtin,
            path: path.to_owned(),
            problem: "it must start with '/'",
        });
    }
    if path
        .chars()
        .any(|c| c.is_whitespace() || c == '?' || c == '#')
    {
        return Err(ServerError::BuiltinPath {
            builtin,
            path: path.to_owned(),
            problem: "it may not hold whitespace, '?' or '#'",
        });
    }
    if prefix && !path.ends_with('/') {
        return Ok(format!("{path}/"));
    }
    Ok(path.to_owned())
}

/// Resolves the built-in paths and checks them against the app's routes and each other.
pub(crate) fn mount(app: &App, builtins: &Builtins) -> Result<Mounted, ServerError> {
    let mut wanted: Vec<(String, Builtin)> = Vec::new();
    if let Some(p) = &builtins.metrics {
        wanted.push((check_path("metrics", p, false)?, Builtin::Metrics));
    }
    if let Some(p) = &builtins.ready {
        wanted.push((check_path("ready", p, false)?, Builtin::Ready));
    }
    let token = match builtins.publish_token.as_deref() {
        Some("") => return Err(ServerError::Config("the publish token is empty".to_owned())),
        Some(t) => Some(t.as_bytes().to_vec().into_boxed_slice()),
        None => None,
    };
    if let Some(p) = &builtins.api {
        let api = check_path("api", p, true)?;
        wanted.push((format!("{api}rooms"), Builtin::Rooms));
        if token.is_some() {
            wanted.push((format!("{api}publish"), Builtin::Publish));
        }
    }
    let admin_token = match (&builtins.admin, builtins.admin_token.as_deref()) {
        (None, _) => None,
        (Some(_), None | Some("")) => {
            return Err(ServerError::Config(
                "the dashboard needs a token (--admin-token or CANAL_ADMIN_TOKEN)".to_owned(),
            ));
        }
        (Some(p), Some(t)) => {
            let admin = check_path("admin", p, true)?;
            wanted.push((admin.clone(), Builtin::AdminPage));
            wanted.push((format!("{admin}ws"), Builtin::AdminSocket));
            Some(t.as_bytes().to_vec().into_boxed_slice())
        }
    };
    let mut routes = HashMap::new();
    for (path, builtin) in wanted {
        if let Some(found) = app.http.resolve(&path) {
            return Err(ServerError::RouteClash {
                builtin: builtin.name(),
                path,
                with: format!("the app's HTTP route {:?}", found.pattern),
            });
        }
        if let Some(found) = app.websocket.resolve(&path) {
            return Err(ServerError::RouteClash {
                builtin: builtin.name(),
                path,
                with: format!("the app's WebSocket route {:?}", found.pattern),
            });
        }
        if let Some(other) = routes.insert(path.clone(), builtin) {
            return Err(ServerError::RouteClash {
                builtin: builtin.name(),
                path,
                with: format!("the built-in route {}", other.name()),
            });
        }
    }
    let worker = builtins
        .worker
        .map(|w| (w, HeaderValue::from(w.index as u64)));
    Ok(Mounted {
        routes,
        publish_token: token,
        admin_token,
        worker,
    })
}

fn json(status: u16, value: &serde_json::Value) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: u16, message: &str) -> hyper::Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn method_not_allowed(allow: &'static str) -> hyper::Response<Body> {
    let mut resp = error(405, &format!("use {allow}"));
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The header that names the worker process which answered (with `--workers N`).
const WORKER_HEADER: &str = "x-canal-worker";

/// Answers a request for a built-in route.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    builtin: Builtin,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let mut resp = answer(shared, builtin, req).await;
    if let Some((_, value)) = &shared.builtins.worker {
        resp.headers_mut().insert(WORKER_HEADER, value.clone());
    }
    resp
}

async fn answer(
    shared: &Arc<Shared>,
    builtin: Builtin,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let read_only = matches!(*req.method(), hyper::Method::GET | hyper::Method::HEAD);
    match builtin {
        Builtin::Metrics if read_only => {
            let text = render_metrics(&super::ServerHandle {
                shared: shared.clone(),
            });
            let mut resp = hyper::Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Builtin::Ready if read_only => ready(shared).await,
        Builtin::Rooms if read_only => match shared.layer.group_sizes() {
            Some(sizes) => {
                let rooms: Vec<_> = sizes
                    .into_iter()
                    .map(|(name, members)| serde_json::json!({ "name": name, "members": members }))
                    .collect();
                json(200, &serde_json::json!({ "rooms": rooms }))
            }
            None => error(404, "this layer cannot list rooms"),
        },
        Builtin::Publish if req.method() == hyper::Method::POST => publish(shared, req).await,
        Builtin::Publish => method_not_allowed("POST"),
        Builtin::AdminPage if read_only => {
            if !shared
                .builtins
                .admin_allowed(req.headers(), req.uri().query())
            {
                return error(401, "the dashboard needs ?token=<admin token>");
            }
            let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                super::admin::ADMIN_HTML.as_bytes(),
            )));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            h.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            resp
        }
        Builtin::AdminSocket => {
            let mut resp = error(426, "this path speaks WebSocket");
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            resp
        }
        Builtin::Metrics | Builtin::Ready | Builtin::Rooms | Builtin::AdminPage => {
            method_not_allowed("GET, HEAD")
        }
    }
}

// ------------------------------------------------------------------ ready

/// How long the readiness round trip may take.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends a message to a fresh named channel and reads it back.
async fn ready(shared: &Arc<Shared>) -> hyper::Response<Body> {
    let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(16)
        .collect();
    let channel = format!("canal.ready.{suffix}");
    let probe = Message::new("canal.ready").with("nonce", suffix.as_str());
    let layer = shared.layer.clone();
    let round_trip = async {
        layer.send(&channel, probe).await?;
        let back = layer.receive(&channel).await?;
        if back.str("nonce").ok() == Some(suffix.as_str()) {
            Ok(())
        } else {
            Err(LayerError::Backend(
                "the readiness probe came back changed".to_owned(),
            ))
        }
    };
    match tokio::time::timeout(READY_TIMEOUT, round_trip).await {
        Ok(Ok(())) if !shared.shutdown.is_cancelled() => {
            json(200, &serde_json::json!({ "layer": "ok" }))
        }
        Ok(Ok(())) => json(
            503,
            &serde_json::json!({ "layer": "ok", "error": "server shutting down" }),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness probe failed");
            json(
                503,
                &serde_json::json!({ "layer": "error", "error": e.to_string() }),
            )
        }
        Err(_) => {
            tracing::warn!("readiness probe timed out");
            json(
                503,
                &serde_json::json!({ "layer": "error", "error": "the layer did not answer within 2 s" }),
            )
        }
    }
}

// ------------------------------------------------------------------ publish

/// Compares a presented token with the expected one in time that depends only on the
/// expected token's length.
fn token_matches(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(!*e);
        diff |= std::hint::black_box(p ^ e);
    }
    diff == 0
}

fn bearer(headers: &hyper::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

async fn publish(shared: &Arc<Shared>, req: hyper::Request<Incoming>) -> hyper::Response<Body> {
    let Some(expected) = shared.builtins.publish_token.as_deref() else {
        return error(404, "publishing is off");
    };
    let authorized = bearer(req.headers()).is_some_and(|p| token_matches(p, expected));
    if !authorized {
        let mut resp = error(
            401,
            if req.headers().contains_key(header::AUTHORIZATION) {
                "wrong token"
            } else {
                "missing 'Authorization: Bearer <token>'"
            },
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"canal publish\""),
        );
        return resp;
    }
    let limit = shared.config.max_body_size;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                413,
                &format!("the body is larger than the limit of {limit} bytes"),
            );
        }
        Err(_) => return error(400, "could not read the request body"),
    };
    let (target, message) = match parse_publish(&body) {
        Ok(parsed) => parsed,
        Err(problem) => return error(400, &problem),
    };
    let result = match &target {
        Target::Group(group) => shared.layer.group_send(group, message).await,
        Target::Channel(channel) => shared.layer.send(channel, message).await,
    };
    match result {
        Ok(()) => {
            shared
                .stats
                .published
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            json(202, &serde_json::json!({ "ok": true }))
        }
        Err(e @ (LayerError::InvalidMessage(_) | LayerError::MessageTooLarge { .. })) => {
            error(400, &e.to_string())
        }
        Err(e @ LayerError::ChannelFull(_)) => error(503, &e.to_string()),
        Err(e) => {
            tracing::warn!(error = %e, "publish failed");
            error(503, &e.to_string())
        }
    }
}

enum Target {
    Group(String),
    Channel(String),
}

/// Checks a publish body: `{"group" | "channel": name, "message": {…}}`.
fn parse_publish(body: &[u8]) -> Result<(Target, Message), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err("the body must be a JSON object".to_owned());
    };
    let name =
        |fields: &serde_json::Map<String, serde_json::Value>, key: &str| match fields.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{key:?} must be a string")),
        };
    let target = match (name(&fields, "group")?, name(&fields, "channel")?) {
        (Some(_), Some(_)) => {
            return Err("give either \"group\" or \"channel\", not both".to_owned());
        }
        (None, None) => return Err("missing \"group\" or \"channel\"".to_owned()),
        (Some(group), None) => {
            check_group_name(&group).map_err(|p| format!("invalid group name: {p}"))?;
            Target::Group(group)
        }
        (None, Some(channel)) => {
            check_channel_name(&channel).map_err(|p| format!("invalid channel name: {p}"))?;
            Target::Channel(channel)
        }
    };
    let message = match fields.remove("message") {
        None => return Err("missing \"message\"".to_owned()),
        Some(m @ serde_json::Value::Object(_)) => match crate::message::from_json_value(m) {
            Ok(crate::message::Value::Map(map)) => Message::from(map),
            Ok(_) => return Err("\"message\" must be a JSON object".to_owned()),
            Err(e) => return Err(format!("\"message\": {e}")),
        },
        Some(_) => return Err("\"message\" must be a JSON object".to_owned()),
    };
    let message = crate::layer::normalize(message);
    match message.get(crate::message::TYPE_KEY) {
        Some(t) if t.as_str().is_some() => {}
        Some(_) => return Err("\"message\".\"type\" must be a string".to_owned()),
        None => {
            return Err(
                "\"message\" has no \"type\" (and no \"text\", \"bytes\", \"accept\" \
                        or \"close\" to stand for one)"
                    .to_owned(),
            );
        }
    }
    Ok((target, message))
}

// ------------------------------------------------------------------ metrics

fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders a server's figures in the Prometheus text exposition format (version 0.0.4).
pub(crate) fn render_metrics(handle: &super::ServerHandle) -> String {
    let s: ServerStats = handle.stats();
    let l: LayerStats = handle.layer().stats();
    let mut out = Exposition(String::with_capacity(8 * 1024));
    if let Some((w, _)) = &handle.shared().builtins.worker {
        let (index, pid) = (w.index.to_string(), w.pid.to_string());
        out.family(
            "canal_worker_info",
            "gauge",
            "Which worker process of `canal serve --workers N` answered (always 1).",
        );
        out.sample("canal_worker_info", &[("worker", &index), ("pid", &pid)], 1);
        out.family(
            "canal_worker_restarts",
            "gauge",
            "Times the supervisor restarted this worker slot before this process started.",
        );
        out.sample("canal_worker_restarts", &[("worker", &index)], w.restarts);
    }
    out.single(
        "canal_connections",
        "gauge",
        "Connections open now (HTTP and WebSocket).",
        s.connections,
    );
    out.single(
        "canal_websocket_connections",
        "gauge",
        "WebSocket connections open now.",
        s.websocket_accepted.saturating_sub(s.websocket_closed),
    );
    out.single(
        "canal_websocket_accepted_total",
        "counter",
        "WebSocket connections accepted.",
        s.websocket_accepted,
    );
    out.family(
        "canal_handshake_failures_total",
        "counter",
        "WebSocket handshakes that did not end in 101, by reason.",
    );
    for (reason, n) in &s.handshake_failures {
        out.sample("canal_handshake_failures_total", &[("reason", reason)], n);
    }
    out.single(
        "canal_http_requests_total",
        "counter",
        "Plain HTTP requests answered.",
        s.http_requests,
    );
    out.single(
        "canal_connections_refused_total",
        "counter",
        "Connections refused at the connection limit.",
        s.rejected_limit,
    );
    out.family(
        "canal_websocket_messages_total",
        "counter",
        "WebSocket data messages, by direction (in: from clients, out: queued to clients).",
    );
    out.sample(
        "canal_websocket_messages_total",
        &[("direction", "in")],
        s.frames_in,
    );
    out.sample(
        "canal_websocket_messages_total",
        &[("direction", "out")],
        s.frames_out,
    );
    out.single(
        "canal_websocket_direct_messages_total",
        "counter",
        "Of the messages out, layer messages a group send wrote straight to a sleeping \
         connection's socket, without running its task.",
        s.frames_out_direct,
    );
    out.single(
        "canal_websocket_direct_partial_writes_total",
        "counter",
        "Direct writes the socket took only in part; the connection's task wrote the rest.",
        s.direct_partial_writes,
    );
    out.family(
        "canal_layer_messages_total",
        "counter",
        "Layer messages by direction (sent: put into the layer by this server; received: \
         delivered to this server's connections) and type (undeclared types are 'other').",
    );
    for (direction, counts) in [("sent", &s.layer_sent), ("received", &s.layer_received)] {
        for (kind, n) in counts {
            out.sample(
                "canal_layer_messages_total",
                &[("direction", direction), ("type", kind)],
                n,
            );
        }
    }
    out.single(
        "canal_layer_group_sends_total",
        "counter",
        "group_send calls the layer handled.",
        l.group_sends,
    );
    out.single(
        "canal_layer_group_deliveries_total",
        "counter",
        "Deliveries made by group_send (the fan-out: one per member reached).",
        l.group_deliveries,
    );
    out.family(
        "canal_dropped_messages_total",
        "counter",
        "Messages dropped, by reason.",
    );
    for (reason, n) in [
        ("channel_full", l.dropped_full),
        ("expired", l.dropped_expired),
        ("no_receiver", l.dropped_no_receiver),
        ("backend", l.dropped_backend),
        ("slow_client", s.slow_drops),
    ] {
        out.sample("canal_dropped_messages_total", &[("reason", reason)], n);
    }
    out.single(
        "canal_slow_client_closes_total",
        "counter",
        "Connections closed with 1008 because they read too slowly.",
        s.slow_closes,
    );
    out.family(
        "canal_layer_errors_total",
        "counter",
        "Layer calls from this server that returned an error, by operation.",
    );
    for (op, n) in &s.layer_errors {
        out.sample("canal_layer_errors_total", &[("op", op)], n);
    }
    out.family(
        "canal_layer_latency_seconds",
        "histogram",
        "Duration of this server's layer calls, by operation.",
    );
    for (op, h) in &s.layer_latency {
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += h.buckets.get(i).copied().unwrap_or(0);
            out.sample(
                "canal_layer_latency_seconds_bucket",
                &[("op", op), ("le", &bound.to_string())],
                cumulative,
            );
        }
        out.sample(
            "canal_layer_latency_seconds_bucket",
            &[("op", op), ("le", "+Inf")],
            h.count,
        );
        out.sample(
            "canal_layer_latency_seconds_sum",
            &[("op", op)],
            h.sum_nanos as f64 / 1e9,
        );
        out.sample("canal_layer_latency_seconds_count", &[("op", op)], h.count);
    }
    out.single(
        "canal_published_total",
        "counter",
        "Messages accepted by the publish endpoint.",
        s.published,
    );
    out.single(
        "canal_protocol_errors_total",
        "counter",
        "Clients that broke the WebSocket protocol.",
        s.protocol_errors,
    );
    out.single(
        "canal_bad_headers_total",
        "counter",
        "Requests refused with 400 or 431 for a bad or oversized header.",
        s.bad_headers,
    );
    out.single(
        "canal_blocking_polls_total",
        "counter",
        "Consumer handler polls that held a worker thread longer than the blocking threshold.",
        s.blocking_polls,
    );
    out.single(
        "canal_memory_budget_closes_total",
        "counter",
        "WebSockets closed with 1008 because the server was over its memory budget.",
        s.memory_closes,
    );
    out.single(
        "canal_buffered_bytes",
        "gauge",
        "Bytes WebSockets buffer (outbound queues, partial frames), counted with a memory budget.",
        s.buffered_bytes,
    );
    out.single(
        "canal_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or did not finish within the header timeout.",
        s.tls_failures,
    );
    out.single(
        "canal_handler_timeouts_total",
        "counter",
        "Consumer handlers cancelled for running past the handler timeout.",
        s.handler_timeouts,
    );
    out.single(
        "canal_rate_limited_total",
        "counter",
        "WebSockets closed with 1008 for sending more messages per second than allowed.",
        s.rate_limited,
    );
    out.single(
        "canal_connections_refused_per_ip_total",
        "counter",
        "Connections refused with 503 for passing the per-address limit.",
        s.rejected_per_ip,
    );
    out.single(
        "canal_pongs_coalesced_total",
        "counter",
        "Pongs replaced by a newer one for a client that floods pings without reading.",
        s.pongs_coalesced,
    );
    out.single(
        "canal_handler_errors_total",
        "counter",
        "Consumer handlers that failed or panicked.",
        s.handler_errors,
    );
    out.single(
        "canal_ping_timeouts_total",
        "counter",
        "Clients dropped for not answering pings.",
        s.ping_timeouts,
    );
    out.single(
        "canal_accept_errors_total",
        "counter",
        "Accept calls that failed for lack of resources.",
        s.accept_errors,
    );
    if let Some(groups) = handle.layer().group_sizes() {
        out.single(
            "canal_groups",
            "gauge",
            "Groups with at least one member.",
            groups.len(),
        );
    }
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cre", b"s3cret"));
        assert!(!token_matches(b"s3cretX", b"s3cret"));
        assert!(!token_matches(b"", b"s3cret"));
        assert!(!token_matches(b"S3cret", b"s3cret"));
    }

    #[test]
    fn publish_bodies_are_checked() {
        let ok = |b: &str| parse_publish(b.as_bytes()).map(|(_, m)| m);
        let err = |b: &str| match parse_publish(b.as_bytes()) {
            Err(e) => e,
            Ok(_) => panic!("accepted {b}"),
        };
        let m = ok(r#"{"group":"lobby","message":{"type":"chat.message","text":"hi"}}"#).unwrap();
        assert_eq!(m.kind(), Some("chat.message"));
        let m = ok(r#"{"channel":"jobs","message":{"text":"hi"}}"#).unwrap();
        assert_eq!(
            m.kind(),
            Some("websocket.send"),
            "normalized as the layer does"
        );
        assert!(err("not json").contains("not valid JSON"));
        assert!(err("[]").contains("JSON object"));
        assert!(err(r#"{"message":{"type":"x"}}"#).contains("missing"));
        assert!(err(r#"{"group":"a b","message":{"type":"x"}}"#).contains("invalid group name"));
        assert!(err(r#"{"group":"a","channel":"b","message":{"type":"x"}}"#).contains("not both"));
        assert!(err(r#"{"group":"a"}"#).contains("missing \"message\""));
        assert!(err(r#"{"group":"a","message":"hi"}"#).contains("JSON object"));
        assert!(err(r#"{"group":"a","message":{"foo":1}}"#).contains("no \"type\""));
        assert!(err(r#"{"group":"a","message":{"type":3}}"#).contains("must be a string"));
    }
}
