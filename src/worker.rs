//! Workers: consume named channels for background work (Channels' `runworker` with a
//! `ChannelNameRouter`).
//!
//! ```no_run
//! use canal::worker::Worker;
//! # async fn run(layer: canal::Layer) {
//! Worker::new(layer)
//!     .route("thumbnails", |message: canal::Message| async move {
//!         println!("make a thumbnail for {:?}", message.get("id"));
//!         Ok(())
//!     })
//!     .run(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await;
//! # }
//! ```
//!
//! Each channel is consumed by one loop that handles its messages one at a time, in order. Run
//! several workers (tasks or processes) on the same channel to share the load: on a shared layer
//! every message goes to exactly one of them, at most once. A handler error is logged and counted;
//! the worker goes on with the next message.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::consumer::Layer;
use crate::message::Message;
use crate::{Error, Result};

type Handler =
    Arc<dyn Fn(Message) -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// Consumes named channels and hands each message to its channel's handler.
pub struct Worker {
    layer: Layer,
    routes: Vec<(String, Handler)>,
    handled: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field(
                "channels",
                &self.routes.iter().map(|(c, _)| c).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker on `layer` with no channels yet.
    pub fn new(layer: Layer) -> Self {
        Worker {
            layer,
            routes: Vec::new(),
            handled: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Routes messages of `channel` to `handler` (a `ChannelNameRouter` entry).
    pub fn route<H, Fut>(mut self, channel: &str, handler: H) -> Self
    where
        H: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.routes
            .push((channel.to_owned(), Arc::new(move |m| Box::pin(handler(m)))));
        self
    }

    /// Messages handled and handler failures so far, shared counters.
    pub fn counters(&self) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        (self.handled.clone(), self.failed.clone())
    }

    /// Consumes every routed channel until `shutdown` completes. Invalid channel names are an
    /// error before anything runs.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        for (channel, _) in &self.routes {
            crate::layer::validate_channel(channel)?;
            if channel.contains('!') {
                return Err(Error::msg(format!(
                    "{channel:?} is a process-local channel; workers consume named channels"
                )));
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (channel, handler) in self.routes {
            let layer = self.layer.clone();
            let handled = self.handled.clone();
            let failed = self.failed.clone();
            tasks.spawn(crate::seed::with_layer(layer.clone(), async move {
                let mut backoff = Duration::from_millis(50);
                loop {
                    match layer.receive(&channel).await {
                        Ok(message) => {
                            backoff = Duration::from_millis(50);
                            if let Err(e) = handler(message).await {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tracing::error!(channel, error = %e, "worker handler failed");
                            }
                            handled.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(channel, error = %e, "worker receive failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            }));
        }
        shutdown.await;
        tasks.shutdown().await;
        Ok(())
    }
}
