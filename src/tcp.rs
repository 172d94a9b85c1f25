//! Channels over TCP: the stream transport to another host. Both ends speak
//! capnp's standard framing from the first byte (there is nothing to
//! negotiate: shared memory cannot cross a network), so either end may as
//! well be any other Cap'n Proto implementation.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use crate::channel::Channel;
use crate::connect::AcceptError;
use crate::deadline::Deadline;
use crate::error::SetupError;
use crate::handshake::SetupDeadline;
use crate::options::Options;
use crate::sys::{errno, socket};

/// A TCP listening socket that hands out [stream channels](crate::Transport::Stream):
/// each accepted connection gets `TCP_NODELAY` and capnp's standard framing,
/// so clients may be this crate ([`Channel::connect_tcp`]) or anything that
/// speaks Cap'n Proto's stream format.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::{Channel, TcpListener};
/// let listener = TcpListener::bind("127.0.0.1:0")?;
/// let client = Channel::connect_tcp(listener.local_addr()?)?;
/// let (server, _peer) = listener.accept()?;
/// let mut m = client.message();
/// m.set_root(capnp::text::Reader::from("hello, host"))?;
/// client.send(m).map_err(|e| e.into_error())?;
/// let got = server.recv()?;
/// assert_eq!(got.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "hello, host");
/// # Ok(()) }
/// ```
pub struct TcpListener {
    inner: std::net::TcpListener,
}

impl TcpListener {
    /// Listens on `addr` (`"0.0.0.0:7000"`, `"[::1]:0"`, ...).
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
        TcpListener::from_std(std::net::TcpListener::bind(addr)?)
    }

    /// A listener over a socket already bound and listening (inherited,
    /// or set up with options of your own).
    ///
    /// # Errors
    ///
    /// When it cannot be made non-blocking.
    pub fn from_std(inner: std::net::TcpListener) -> io::Result<TcpListener> {
        inner.set_nonblocking(true)?;
        Ok(TcpListener { inner })
    }

    /// The address it listens on (with the port the system chose for 0).
    ///
    /// # Errors
    ///
    /// As `getsockname(2)`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Waits for a connection and returns its channel (default options)
    /// and the client's address.
    ///
    /// # Errors
    ///
    /// When the listening socket fails.
    pub fn accept(&self) -> io::Result<(Channel, SocketAddr)> {
        self.accept_with(&Options::default())
    }

    /// [`accept`](Self::accept) with channel options.
    ///
    /// # Errors
    ///
    /// As [`accept`](Self::accept).
    pub fn accept_with(&self, options: &Options) -> io::Result<(Channel, SocketAddr)> {
        match self.accept_until(options, Deadline::Never) {
            Ok(accepted) => Ok(accepted),
            Err(AcceptError::Io(e)) => Err(e),
            // No deadline: nothing else ends the wait.
            Err(e) => Err(io::Error::other(e)),
        }
    }

    /// [`accept`](Self::accept), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`AcceptError::Timeout`]; [`AcceptError::Io`] when the listening
    /// socket fails.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<(Channel, SocketAddr), AcceptError> {
        self.accept_timeout_with(&Options::default(), timeout)
    }

    /// [`accept_timeout`](Self::accept_timeout) with channel options.
    ///
    /// # Errors
    ///
    /// As [`accept_timeout`](Self::accept_timeout).
    pub fn accept_timeout_with(
        &self,
        options: &Options,
        timeout: Duration,
    ) -> Result<(Channel, SocketAddr), AcceptError> {
        self.accept_until(options, Deadline::after(timeout))
    }

    /// A waiting connection's channel, without waiting: for an event loop
    /// that polls the listener's descriptor for reading.
    ///
    /// # Errors
    ///
    /// [`AcceptError::WouldBlock`] when none is waiting;
    /// [`AcceptError::Io`] when the listening socket fails.
    pub fn try_accept(&self) -> Result<(Channel, SocketAddr), AcceptError> {
        self.try_accept_with(&Options::default())
    }

    /// [`try_accept`](Self::try_accept) with channel options.
    ///
    /// # Errors
    ///
    /// As [`try_accept`](Self::try_accept).
    pub fn try_accept_with(&self, options: &Options) -> Result<(Channel, SocketAddr), AcceptError> {
        self.accept_until(options, Deadline::Now)
    }

    fn accept_until(
        &self,
        options: &Options,
        deadline: Deadline,
    ) -> Result<(Channel, SocketAddr), AcceptError> {
        loop {
            match self.inner.accept() {
                Ok((stream, addr)) => match Channel::from_tcp_with(stream, options) {
                    Ok(channel) => return Ok((channel, addr)),
                    // The connection could not be configured (it reset
                    // already, say): its loss only.
                    Err(_) => continue,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The connection went before we took it.
                Err(e) if e.raw_os_error() == Some(errno::ECONNABORTED) => continue,
                Err(e) => return Err(AcceptError::Io(e)),
            }
            let wait = match deadline {
                Deadline::Now => return Err(AcceptError::WouldBlock),
                _ => deadline.remaining().ok_or(AcceptError::Timeout)?,
            };
            socket::poll_one(self.inner.as_fd(), false, wait).map_err(AcceptError::Io)?;
        }
    }
}

impl AsFd for TcpListener {
    /// The listening socket: readable when a connection is waiting.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpListener")
            .field("addr", &self.inner.local_addr().ok())
            .finish()
    }
}

impl Channel {
    /// Connects to a TCP address (`"host:port"`, a `SocketAddr`, ...) and
    /// makes a [stream channel](crate::Transport::Stream) over it, trying
    /// each address the name resolves to, all within `setup_timeout`.
    ///
    /// # Errors
    ///
    /// [`SetupError::Timeout`] when no address answered in time;
    /// [`SetupError::Io`] with the last address's error otherwise.
    pub fn connect_tcp(addr: impl ToSocketAddrs) -> Result<Channel, SetupError> {
        Channel::connect_tcp_with(addr, &Options::default())
    }

    /// [`connect_tcp`](Channel::connect_tcp) with options.
    ///
    /// # Errors
    ///
    /// As [`connect_tcp`](Channel::connect_tcp).
    pub fn connect_tcp_with(
        addr: impl ToSocketAddrs,
        options: &Options,
    ) -> Result<Channel, SetupError> {
        let deadline = SetupDeadline::after(options.setup_timeout);
        let mut last = None;
        for addr in addr.to_socket_addrs()? {
            let left = deadline.remaining()?;
            match TcpStream::connect_timeout(&addr, left) {
                Ok(stream) => return Channel::from_tcp_with(stream, options),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(deadline.expired()),
                Err(e) => {
                    last = Some(io::Error::new(
                        e.kind(),
                        format!("connecting to {addr}: {e}"),
                    ))
                }
            }
        }
        Err(SetupError::Io(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the address resolved to nothing",
            )
        })))
    }
}
