//! WebSocket: the frame codec and the connection task.

pub(crate) mod codec;
pub(crate) mod conn;
