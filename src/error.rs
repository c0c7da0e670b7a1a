//! The error consumers return, and what the server makes of it.

use crate::layer::LayerError;
use crate::message::MessageError;

/// The result type of consumer handlers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from a consumer or from what it called.
///
/// A consumer that returns one closes its connection with 1011 (or, before accepting, answers
/// the handshake with 500); the error is logged and every other connection goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The channel layer refused or failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A message lacked a key or held the wrong type.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// JSON that did not parse or serialize.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    /// A frame of the wrong kind (binary where text was expected, or the reverse).
    #[error("expected a {expected} frame")]
    FrameKind {
        /// What the consumer wanted.
        expected: &'static str,
    },
    /// The connection is closed; nothing more can be sent on it.
    #[error("the connection is closed")]
    Closed,
    /// A close code that may not be sent (RFC 6455 §7.4).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// Anything else, with a message.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An error with a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Error::Other(message.into())
    }
}
