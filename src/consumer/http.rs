//! HTTP consumers: plain request → response handlers on the same port as the WebSockets.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::Result;
use crate::scope::Scope;

/// A plain HTTP request: its scope and its whole body (bounded by the server's body limit).
#[derive(Debug, Clone)]
pub struct Request {
    /// Method, path, query, headers, peer, route params.
    pub scope: Scope,
    /// The request body.
    pub body: Bytes,
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// A response with `status` and an empty body.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// 200 with a `text/plain` body.
    pub fn text(body: impl Into<String>) -> Self {
        Response::new(200)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.into())
    }

    /// 200 with a `text/html` body.
    pub fn html(body: impl Into<Bytes>) -> Self {
        Response::new(200)
            .header("content-type", "text/html; charset=utf-8")
            .body(body)
    }

    /// 200 with `value` as JSON.
    pub fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<Self> {
        Ok(Response::new(200)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(value)?))
    }

    /// A JSON error body `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": message }).to_string();
        Response::new(status)
            .header("content-type", "application/json")
            .body(body)
    }

    /// Sets the status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// An HTTP consumer. Any `Fn(Request) -> impl Future<Output = Result<Response>>` is one. An
/// error or a panic becomes a 500 (logged); the server goes on.
pub trait HttpConsumer: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response>> + Send;
}

impl<F, Fut> HttpConsumer for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response>> + Send,
{
    fn handle(&self, request: Request) -> impl Future<Output = Result<Response>> + Send {
        self(request)
    }
}

pub(crate) type HttpFuture = Pin<Box<dyn Future<Output = Result<Response>> + Send>>;

trait DynHttp: Send + Sync {
    fn call(self: Arc<Self>, request: Request) -> HttpFuture;
}

struct HttpFn<H>(H);

impl<H: HttpConsumer> DynHttp for HttpFn<H> {
    fn call(self: Arc<Self>, request: Request) -> HttpFuture {
        Box::pin(async move { self.0.handle(request).await })
    }
}

/// An HTTP route target.
#[derive(Clone)]
pub struct HttpEndpoint {
    handler: Arc<dyn DynHttp>,
}

impl std::fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpEndpoint")
    }
}

impl HttpEndpoint {
    pub(crate) fn call(&self, request: Request) -> HttpFuture {
        self.handler.clone().call(request)
    }
}

/// An HTTP endpoint from a handler: `http(|req| async { Ok(Response::text("ok")) })`.
pub fn http<H: HttpConsumer>(handler: H) -> crate::routing::Target<HttpEndpoint> {
    crate::routing::Target::Endpoint(HttpEndpoint {
        handler: Arc::new(HttpFn(handler)),
    })
}
