//! The layer as the server uses it: every call from this server's consumers, seed handlers and
//! built-in endpoints goes through [`Instrumented`], which counts what is sent by type and
//! times `send` and `group_send`, whatever the backend.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::admin::GroupTraffic;
use super::stats::{LayerMetrics, LayerOp};
use crate::consumer::Layer;
use crate::layer::{ChannelLayer, Inbox, LayerError, LayerStats, LocalChannels, normalize};
use crate::message::Message;

/// A layer wrapped with this server's layer metrics.
pub(crate) struct Instrumented {
    inner: Layer,
    metrics: Arc<LayerMetrics>,
    /// Group sends per group, only while the dashboard is on.
    traffic: Option<Arc<GroupTraffic>>,
}

impl Instrumented {
    pub(crate) fn wrap(
        inner: Layer,
        metrics: Arc<LayerMetrics>,
        traffic: Option<Arc<GroupTraffic>>,
    ) -> Layer {
        Arc::new(Instrumented {
            inner,
            metrics,
            traffic,
        })
    }
}

#[async_trait]
impl ChannelLayer for Instrumented {
    async fn send(&self, channel: &str, message: Message) -> Result<(), LayerError> {
        let message = normalize(message);
        let label = self.metrics.sent.index_of(message.kind());
        let start = Instant::now();
        let result = self.inner.send(channel, message).await;
        self.metrics
            .observe(LayerOp::Send, start.elapsed(), result.is_ok());
        if result.is_ok() {
            self.metrics.sent.add(label);
        }
        result
    }

    async fn receive(&self, channel: &str) -> Result<Message, LayerError> {
        self.inner.receive(channel).await
    }

    async fn new_channel(&self) -> Result<String, LayerError> {
        self.inner.new_channel().await
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.inner.group_add(group, channel).await
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        self.inner.group_discard(group, channel).await
    }

    async fn group_send(&self, group: &str, message: Message) -> Result<(), LayerError> {
        let message = normalize(message);
        let label = self.metrics.sent.index_of(message.kind());
        let start = Instant::now();
        let result = self.inner.group_send(group, message).await;
        self.metrics
            .observe(LayerOp::GroupSend, start.elapsed(), result.is_ok());
        if result.is_ok() {
            self.metrics.sent.add(label);
            if let Some(traffic) = &self.traffic {
                traffic.count(group);
            }
        }
        result
    }

    async fn flush(&self) -> Result<(), LayerError> {
        self.inner.flush().await
    }

    fn local(&self) -> &LocalChannels {
        self.inner.local()
    }

    fn new_inbox(&self) -> Inbox {
        self.inner.new_inbox()
    }

    fn group_sizes(&self) -> Option<Vec<(String, usize)>> {
        self.inner.group_sizes()
    }

    fn stats(&self) -> LayerStats {
        self.inner.stats()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
}
