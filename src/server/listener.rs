//! What the server accepts connections from: a TCP listener, a Unix socket listener, or a
//! listening socket inherited from a supervisor (`--fd N`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of connections. [`Server::serve`](super::Server::serve) takes any of them; the
/// connection code is the same for all.
pub trait Listener: Send + 'static {
    /// One accepted connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection, with the peer's address when it has one (TCP).
    fn accept(&mut self)
    -> impl Future<Output = io::Result<(Self::Io, Option<SocketAddr>)>> + Send;

    /// Where the listener listens, for logs (`127.0.0.1:8000`, `unix:/run/canal.sock`).
    fn describe(&self) -> String;

    /// Sets the kernel send buffer (`SO_SNDBUF`) of the listening socket, which accepted
    /// connections inherit. Listeners without a socket answer `Unsupported`.
    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        let _ = bytes;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this listener has no socket buffer to set",
        ))
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, Option<SocketAddr>)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Some(peer)))
    }

    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        rustix::net::sockopt::set_socket_send_buffer_size(self, bytes).map_err(io::Error::from)
    }

    fn describe(&self) -> String {
        self.local_addr()
            .map_or_else(|_| "tcp".to_owned(), |a| a.to_string())
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, Option<SocketAddr>)> {
        let (stream, _peer) = tokio::net::UnixListener::accept(self).await?;
        Ok((stream, None))
    }

    fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        rustix::net::sockopt::set_socket_send_buffer_size(self, bytes).map_err(io::Error::from)
    }

    fn describe(&self) -> String {
        match self.local_addr() {
            Ok(addr) => match addr.as_pathname() {
                Some(path) => format!("unix:{}", path.display()),
                None => "unix:(unnamed)".to_owned(),
            },
            Err(_) => "unix".to_owned(),
        }
    }
}

/// Errors from adopting an inherited socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdoptError {
    /// The descriptor could not be duplicated (not open, or the kernel refused).
    #[error("cannot take file descriptor {fd}: {source}")]
    Dup {
        /// The descriptor number.
        fd: i32,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a listening stream socket.
    #[error("file descriptor {fd} is not a listening stream socket: {problem}")]
    NotListening {
        /// The descriptor number.
        fd: i32,
        /// What is wrong with it.
        problem: String,
    },
    /// The socket is neither TCP (IPv4/IPv6) nor a Unix socket.
    #[error("file descriptor {fd} is a socket of an unsupported family")]
    Family {
        /// The descriptor number.
        fd: i32,
    },
    /// The runtime could not register the socket.
    #[error("cannot register the socket: {0}")]
    Register(#[source] io::Error),
}

/// A listening socket inherited from a supervisor: TCP or Unix.
#[derive(Debug)]
pub enum Inherited {
    /// A TCP listener.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket listener.
    Unix(tokio::net::UnixListener),
}

/// Adopts listening socket `fd`, which a supervisor (systemd, circus, a shell script) opened
/// and passed to this process, as daphne's `--fd` does.
///
/// The descriptor is duplicated through `pidfd_getfd(2)` on this very process (Linux 5.6+),
/// which hands back a new descriptor this code owns, so no `unsafe` is needed and nothing that
/// owns `fd` is disturbed; the original stays open until the process exits. Must be called
/// inside a Tokio runtime.
pub fn adopt_fd(fd: i32) -> Result<Inherited, AdoptError> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    let dup = |e: rustix::io::Errno| AdoptError::Dup {
        fd,
        source: io::Error::from(e),
    };
    let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).map_err(dup)?;
    let owned: OwnedFd = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(dup)?;
    drop(pidfd);
    let not_listening = |problem: String| AdoptError::NotListening { fd, problem };
    match sockopt::socket_type(&owned) {
        Ok(SocketType::STREAM) => {}
        Ok(other) => return Err(not_listening(format!("socket type {other:?}"))),
        Err(e) => return Err(not_listening(io::Error::from(e).to_string())),
    }
    match sockopt::socket_acceptconn(&owned) {
        Ok(true) => {}
        Ok(false) => return Err(not_listening("listen() was not called on it".to_owned())),
        Err(e) => return Err(not_listening(io::Error::from(e).to_string())),
    }
    let family = sockopt::socket_domain(&owned).map_err(|e| not_listening(e.to_string()))?;
    if family == AddressFamily::INET || family == AddressFamily::INET6 {
        let std = std::net::TcpListener::from(owned);
        std.set_nonblocking(true).map_err(AdoptError::Register)?;
        Ok(Inherited::Tcp(
            tokio::net::TcpListener::from_std(std).map_err(AdoptError::Register)?,
        ))
    } else if family == AddressFamily::UNIX {
        let std = std::os::unix::net::UnixListener::from(owned);
        std.set_nonblocking(true).map_err(AdoptError::Register)?;
        Ok(Inherited::Unix(
            tokio::net::UnixListener::from_std(std).map_err(AdoptError::Register)?,
        ))
    } else {
        Err(AdoptError::Family { fd })
    }
}

/// Binds a TCP listener on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so several
/// processes can listen on the same address and the kernel spreads new connections over them
/// by a hash of each connection's addresses and ports (`canal serve --workers N`). Only
/// processes of the same user may share a port this way. Must be called inside a Tokio
/// runtime.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // Each process has its own accept queue; the kernel caps this at `net.core.somaxconn`.
    socket.listen(4096)
}
