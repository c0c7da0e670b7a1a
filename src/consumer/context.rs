//! A consumer's view of its connection: send, close, join groups, spawn tasks.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;
use tokio::task::AbortHandle;

use super::Frame;
use crate::layer::{ChannelLayer, Mailbox};
use crate::message::Message;
use crate::scope::Scope;
use crate::server::ws::codec::is_valid_close_code;
use crate::{Error, Result};

/// The shared channel layer a server runs with.
pub type Layer = Arc<dyn ChannelLayer>;

/// A message for the socket, queued by a consumer.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Text(ByteString),
    Binary(Bytes),
}

/// What a consumer (or a handle held by one of its tasks) asks its connection to do.
#[derive(Debug)]
pub(crate) enum Command {
    Accept {
        subprotocol: Option<String>,
        headers: Vec<(String, String)>,
    },
    Send(Outgoing),
    Close {
        code: u16,
        reason: String,
    },
    /// Not from a consumer: the unwritten rest of frames that a pass of wakes wrote straight
    /// to the socket and the socket took only in part (`Mailbox::write_through`). The
    /// connection writes it before anything else.
    Remainder(Bytes),
}

/// The connection a consumer serves. Passed to every handler.
///
/// Sends are queued to the connection's writer and go out at once, even while the handler is
/// still running; none of these methods waits for the client. All are cancel-safe.
pub struct Context {
    /// The reply channel's mailbox (it knows its id).
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) scope: Scope,
    pub(crate) layer: Layer,
    /// Tasks from [`spawn`](Self::spawn); boxed, as most consumers spawn none.
    #[allow(
        clippy::box_collection,
        reason = "one pointer per connection instead of three"
    )]
    pub(crate) tasks: Option<Box<Vec<AbortHandle>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("channel", &self.channel_name())
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

fn check_close_code(code: u16) -> Result<()> {
    if is_valid_close_code(code) {
        Ok(())
    } else {
        Err(Error::InvalidCloseCode(code))
    }
}

impl Context {
    /// What is known about the connection.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// This connection's reply channel name (`specific.<process>!<id>`).
    pub fn channel_name(&self) -> String {
        self.layer.local().name_of(self.mailbox.id())
    }

    /// The channel layer.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    fn push(&self, command: Command) -> Result<()> {
        if self.mailbox.push_command(command) {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// Accepts the connection (no subprotocol).
    pub async fn accept(&mut self) -> Result<()> {
        self.push(Command::Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    /// Accepts, selecting `subprotocol` (one the client offered, see
    /// [`Scope::subprotocols`]) and adding response `headers`.
    pub async fn accept_with(
        &mut self,
        subprotocol: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<()> {
        self.push(Command::Accept {
            subprotocol: subprotocol.map(str::to_owned),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
    }

    /// Refuses the connection before accepting it: the client gets HTTP 403.
    pub async fn deny(&mut self) -> Result<()> {
        self.push(Command::Close {
            code: 1000,
            reason: String::new(),
        })
    }

    /// Closes with `code` and `reason` (before accept this is a 403, as in Channels). Codes that
    /// may not be sent (1005, 1006, 1015, below 1000 …) are refused.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<()> {
        check_close_code(code)?;
        self.push(Command::Close {
            code,
            reason: reason.to_owned(),
        })
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        self.push(Command::Send(match frame {
            Frame::Text(t) => Outgoing::Text(t),
            Frame::Binary(b) => Outgoing::Binary(b),
        }))
    }

    /// Sends a text message (a shared buffer is written without copying).
    pub async fn send_text(&mut self, text: impl Into<ByteString>) -> Result<()> {
        self.push(Command::Send(Outgoing::Text(text.into())))
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, bytes: impl Into<Bytes>) -> Result<()> {
        self.push(Command::Send(Outgoing::Binary(bytes.into())))
    }

    /// Sends `value` as a JSON text message.
    pub async fn send_json<T: serde::Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let text = serde_json::to_string(value)?;
        self.send_text(text).await
    }

    /// Sends `message` to `channel` through the layer.
    pub async fn send_to(&self, channel: &str, message: Message) -> Result<()> {
        Ok(self.layer.send(channel, message).await?)
    }

    /// Adds this connection to `group`.
    pub async fn group_add(&self, group: &str) -> Result<()> {
        Ok(self.layer.group_add(group, &self.channel_name()).await?)
    }

    /// Removes this connection from `group`.
    pub async fn group_discard(&self, group: &str) -> Result<()> {
        Ok(self
            .layer
            .group_discard(group, &self.channel_name())
            .await?)
    }

    /// Sends `message` to every member of `group`.
    pub async fn group_send(&self, group: &str, message: Message) -> Result<()> {
        Ok(self.layer.group_send(group, message).await?)
    }

    /// A cloneable handle that sends to this connection from any task.
    pub fn handle(&self) -> Handle {
        Handle {
            mailbox: self.mailbox.clone(),
        }
    }

    /// Runs `task` alongside the connection; it is aborted when the connection ends. This is
    /// how a consumer pushes whenever it likes: give the task a [`handle`](Self::handle).
    pub fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tasks = self.tasks.get_or_insert_with(Box::default);
        tasks.retain(|t| !t.is_finished());
        // Timed by the server's watchdog; the layer stays reachable for seed-style calls.
        let task =
            crate::server::watchdog::watched(crate::seed::with_layer(self.layer.clone(), task));
        tasks.push(tokio::spawn(task).abort_handle());
    }

    pub(crate) fn abort_tasks(&mut self) {
        for task in self.tasks.take().into_iter().flat_map(|t| t.into_iter()) {
            task.abort();
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.abort_tasks();
    }
}

/// Sends to one connection from anywhere in the process (a task spawned by its consumer, a
/// timer, another consumer). Cheap to clone. Every method fails with
/// [`Error::Closed`] once the connection is gone.
#[derive(Clone)]
pub struct Handle {
    mailbox: Arc<Mailbox>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handle")
    }
}

impl Handle {
    fn push(&self, command: Command) -> Result<()> {
        if self.mailbox.push_command(command) {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// Sends a text message.
    pub fn send_text(&self, text: impl Into<ByteString>) -> Result<()> {
        self.push(Command::Send(Outgoing::Text(text.into())))
    }

    /// Sends a binary message.
    pub fn send_binary(&self, bytes: impl Into<Bytes>) -> Result<()> {
        self.push(Command::Send(Outgoing::Binary(bytes.into())))
    }

    /// Sends `value` as JSON text.
    pub fn send_json<T: serde::Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        self.send_text(serde_json::to_string(value)?)
    }

    /// Closes the connection.
    pub fn close(&self, code: u16, reason: &str) -> Result<()> {
        check_close_code(code)?;
        self.push(Command::Close {
            code,
            reason: reason.to_owned(),
        })
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.mailbox.is_closed()
    }
}
