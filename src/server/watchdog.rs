//! The watchdog for tasks a consumer spawns and for HTTP consumers: a poll that holds its worker
//! thread longer than `blocking_threshold` is logged and counted (`canal_blocking_polls_total`),
//! as WebSocket consumer handlers' polls are in the connection task (both time their polls with
//! [`PollTimer`]). It cannot stop such a poll: nothing in Rust can preempt a future that does not
//! yield; it makes the offender visible.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use super::{Shared, coarse_now};

tokio::task_local! {
    /// The server whose consumer handler is running on this task.
    static SERVER: Arc<Shared>;
}

/// Runs a consumer handler with its server known to [`watched`].
pub(crate) fn with_server<F: Future>(
    shared: Arc<Shared>,
    future: F,
) -> impl Future<Output = F::Output> {
    SERVER.scope(shared, future)
}

/// Wraps a task spawned from a consumer so the watchdog times each of its polls.
pub(crate) fn watched<F: Future>(task: F) -> Watched<F> {
    Watched {
        inner: Box::pin(task),
        shared: SERVER
            .try_with(Clone::clone)
            .ok()
            .filter(|s| s.config.blocking_threshold.is_some()),
    }
}

/// Wraps a future (an HTTP consumer's call) so the watchdog of `shared` times its polls.
pub(crate) fn watched_by<F: Future>(shared: Arc<Shared>, future: F) -> Watched<F> {
    Watched {
        inner: Box::pin(future),
        shared: shared.config.blocking_threshold.map(|_| shared),
    }
}

/// A future whose polls are timed against the server's blocking threshold.
pub(crate) struct Watched<F> {
    inner: Pin<Box<F>>,
    shared: Option<Arc<Shared>>,
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let Some(shared) = this.shared.as_deref() else {
            return this.inner.as_mut().poll(cx);
        };
        let timer = PollTimer::start(shared);
        let result = this.inner.as_mut().poll(cx);
        if let Some(held) = timer.overran(shared) {
            tracing::warn!(
                held_ms = held.as_millis() as u64,
                "a task spawned by a consumer held a worker thread without yielding; \
                 blocking code belongs in tokio::task::spawn_blocking"
            );
        }
        result
    }
}

/// Times one poll against the server's blocking threshold, to the kernel's tick (the coarse
/// clock): the connection task times its handler's polls with it, [`Watched`] the polls of
/// spawned tasks and HTTP consumers.
pub(crate) struct PollTimer(Option<Duration>);

impl PollTimer {
    /// Starts timing, if the server has a threshold (else nothing is read).
    pub(crate) fn start(shared: &Shared) -> PollTimer {
        PollTimer(shared.config.blocking_threshold.map(|_| coarse_now()))
    }

    /// After the poll: when it held its thread past the threshold, counts it
    /// (`canal_blocking_polls_total`) and says for how long, for the caller's warning.
    pub(crate) fn overran(self, shared: &Shared) -> Option<Duration> {
        let (started, threshold) = (self.0?, shared.config.blocking_threshold?);
        let held = coarse_now().saturating_sub(started);
        if held <= threshold {
            return None;
        }
        shared.stats.blocking_polls.fetch_add(1, Ordering::Relaxed);
        Some(held)
    }
}
