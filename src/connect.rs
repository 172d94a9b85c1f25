//! Unrelated processes: a listener on a socket path or abstract name, and
//! `connect` on the other side.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::channel::Channel;
use crate::error::SetupError;
use crate::handshake::SetupDeadline;
use crate::options::Options;
use crate::sys;
use crate::sys::socket::{self, UnixAddr};

/// Who is at the other end of a connection, as the kernel recorded it when
/// the connection was made (`SO_PEERCRED`): for a server deciding whether to
/// talk to a client at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The peer's process id (at connect time).
    pub pid: i32,
    /// The peer's effective user id.
    pub uid: u32,
    /// The peer's effective group id.
    pub gid: u32,
}

impl Credentials {
    pub(crate) fn of(sock: BorrowedFd<'_>) -> std::io::Result<Credentials> {
        let (pid, uid, gid) = socket::peer_credentials(sock)?;
        Ok(Credentials { pid, uid, gid })
    }
}

/// How a [`Listener`] is made.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// let listener = capnp_shm::ListenerOptions::new()
///     .mode(0o660)
///     .replace_stale(true)
///     .bind("/run/my-service.sock")?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    mode: u32,
    replace_stale: bool,
    backlog: i32,
}

impl Default for ListenerOptions {
    fn default() -> ListenerOptions {
        ListenerOptions {
            mode: 0o600,
            replace_stale: false,
            backlog: 128,
        }
    }
}

impl ListenerOptions {
    /// Mode 0600 (only this user may connect), no stale-file replacement,
    /// a backlog of 128.
    pub fn new() -> ListenerOptions {
        ListenerOptions::default()
    }

    /// Permissions of the socket file (connecting needs write permission),
    /// further limited by the umask. The mode is set before the file
    /// exists, so it is never wider, even for a moment.
    pub fn mode(mut self, mode: u32) -> ListenerOptions {
        self.mode = mode & 0o777;
        self
    }

    /// If a socket file is already at the path and nothing listens on it
    /// (left by a crashed server), remove it and bind. A live server's file
    /// is never replaced, nor any file that is not a socket.
    pub fn replace_stale(mut self, replace: bool) -> ListenerOptions {
        self.replace_stale = replace;
        self
    }

    /// Connections the kernel queues before `accept`.
    pub fn backlog(mut self, backlog: i32) -> ListenerOptions {
        self.backlog = backlog.max(1);
        self
    }

    /// Listens on a socket file at `path`. The file is removed when the
    /// listener drops (if it is still the one we made).
    ///
    /// # Errors
    ///
    /// `AddrInUse` when a file is in the way (a live server, or a stale
    /// socket without [`replace_stale`](Self::replace_stale)), with the
    /// reason in the message; what `bind` reports otherwise.
    pub fn bind(&self, path: impl AsRef<Path>) -> std::io::Result<Listener> {
        let path = path.as_ref();
        let socket = match socket::listen_unix(UnixAddr::Path(path), self.mode, self.backlog) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                self.clear_stale(path, e)?;
                socket::listen_unix(UnixAddr::Path(path), self.mode, self.backlog)?
            }
            Err(e) => return Err(e),
        };
        // If the file is gone already (removed by someone else), there is
        // nothing of ours left to clean up: fail without leaving a socket.
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Listener {
            socket,
            path: Some((path.to_path_buf(), (meta.dev(), meta.ino()))),
            owner_pid: sys::getpid(),
        })
    }

    /// Listens on `name` in the Linux abstract socket namespace: no file,
    /// nothing to clean up; the name is free again when the listener drops.
    /// Anyone in the network namespace may connect: check
    /// [`Channel::peer_credentials`] (the mode does not apply).
    ///
    /// # Errors
    ///
    /// `AddrInUse` when the name is taken.
    pub fn bind_abstract(&self, name: &[u8]) -> std::io::Result<Listener> {
        let socket = socket::listen_unix(UnixAddr::Abstract(name), self.mode, self.backlog)?;
        Ok(Listener {
            socket,
            path: None,
            owner_pid: sys::getpid(),
        })
    }

    /// Removes a stale socket file at `path`, or explains why not.
    fn clear_stale(&self, path: &Path, in_use: std::io::Error) -> std::io::Result<()> {
        let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        let hint = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{}: {what}", path.display()),
            )
        };
        if !is_socket {
            return Err(hint("exists and is not a socket"));
        }
        // A probe connection tells a live server from a stale file: a live
        // server sees it come and go (one connection that never says
        // hello). Non-blocking, so a full backlog reads as live.
        match socket::connect_unix_nowait(UnixAddr::Path(path)) {
            Ok(_) => Err(hint("another server is listening there")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(hint(
                "another server is listening there (its queue is full)",
            )),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if !self.replace_stale {
                    return Err(hint(
                        "a stale socket file is in the way (nothing listens on it: left by a \
                         server that exited without removing it); \
                         ListenerOptions::replace_stale removes it",
                    ));
                }
                std::fs::remove_file(path)?;
                Ok(())
            }
            Err(_) => Err(in_use),
        }
    }
}

/// A listening socket that turns each connection into a [`Channel`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::{Channel, Listener};
///
/// // Server
/// let listener = Listener::bind("/tmp/example.sock")?;
/// let channel = listener.accept()?;
///
/// // Client, in another process
/// let channel = Channel::connect("/tmp/example.sock")?;
/// # Ok(()) }
/// ```
pub struct Listener {
    socket: OwnedFd,
    /// The socket file and its (device, inode), to remove it on drop only
    /// if it is still ours.
    path: Option<(PathBuf, (u64, u64))>,
    /// The process that bound it: a copy inherited through `fork` (a
    /// fork-per-connection server) leaves the file alone when it drops.
    owner_pid: u32,
}

impl Listener {
    /// Listens on a socket file at `path` with [`ListenerOptions::new`]
    /// (mode 0600).
    ///
    /// # Errors
    ///
    /// As [`ListenerOptions::bind`].
    pub fn bind(path: impl AsRef<Path>) -> std::io::Result<Listener> {
        ListenerOptions::new().bind(path)
    }

    /// Listens on `name` in the abstract namespace; see
    /// [`ListenerOptions::bind_abstract`].
    ///
    /// # Errors
    ///
    /// As [`ListenerOptions::bind_abstract`].
    pub fn bind_abstract(name: &[u8]) -> std::io::Result<Listener> {
        ListenerOptions::new().bind_abstract(name)
    }

    /// Waits for a connection and sets a channel up over it (default options).
    ///
    /// # Errors
    ///
    /// As [`Channel::from_stream`], and `accept` failures
    /// ([`SetupError::Io`]).
    pub fn accept(&self) -> Result<Channel, SetupError> {
        self.accept_with(&Options::default())
    }

    /// [`accept`](Self::accept) with channel options.
    ///
    /// # Errors
    ///
    /// As [`accept`](Self::accept).
    pub fn accept_with(&self, options: &Options) -> Result<Channel, SetupError> {
        let (stream, _) = self.accept_stream()?;
        Channel::from_stream_with(stream, options)
    }

    /// Waits for a connection and returns it before any set-up, with the
    /// peer's credentials: refuse a stranger by dropping the stream, or go on
    /// with [`Channel::from_stream_with`].
    ///
    /// # Errors
    ///
    /// When `accept` fails.
    pub fn accept_stream(&self) -> std::io::Result<(UnixStream, Credentials)> {
        let fd = socket::accept(self.socket.as_fd())?;
        let credentials = Credentials::of(fd.as_fd())?;
        Ok((UnixStream::from(fd), credentials))
    }

    /// The socket file, for a listener bound to a path.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_ref().map(|(p, _)| p.as_path())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("socket", &self.socket)
            .field("path", &self.path())
            .finish()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Remove the file only in the process that bound it (not in a forked
        // copy), and only if it is still the one we bound: a new server may
        // have replaced it meanwhile.
        if sys::getpid() != self.owner_pid {
            return;
        }
        if let Some((path, id)) = &self.path {
            if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Connects without blocking past `setup_timeout`: a listener whose backlog
/// is full makes a Unix `connect` fail with `EAGAIN` at once (it cannot be
/// waited for with `poll`), so this retries every millisecond until the
/// deadline. The socket stays non-blocking; the channel only ever uses it
/// with `poll` and `MSG_DONTWAIT`.
fn connect_bounded(addr: UnixAddr<'_>, options: &Options) -> Result<OwnedFd, SetupError> {
    let deadline = SetupDeadline::after(options.setup_timeout);
    loop {
        match socket::connect_unix_nowait(addr) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.remaining()?;
                std::thread::sleep(left.min(std::time::Duration::from_millis(1)));
            }
            Err(error) => {
                let to = match addr {
                    UnixAddr::Path(p) => p.display().to_string(),
                    UnixAddr::Abstract(name) => {
                        format!("abstract name {:?}", String::from_utf8_lossy(name))
                    }
                };
                return Err(SetupError::Connect { to, error });
            }
        }
    }
}

impl Channel {
    /// Connects to a [`Listener`] bound to `path` and sets a channel up.
    ///
    /// # Errors
    ///
    /// [`SetupError::Connect`] when the connection fails (`NotFound`,
    /// `ConnectionRefused`: nobody listens); [`SetupError::Timeout`] when the
    /// listener's queue stays full for `setup_timeout`; and the set-up
    /// errors of [`Channel::from_stream`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Channel, SetupError> {
        Channel::connect_with(path, &Options::default())
    }

    /// [`connect`](Channel::connect) with options.
    ///
    /// # Errors
    ///
    /// As [`connect`](Channel::connect).
    pub fn connect_with(path: impl AsRef<Path>, options: &Options) -> Result<Channel, SetupError> {
        let fd = connect_bounded(UnixAddr::Path(path.as_ref()), options)?;
        Channel::from_stream_with(UnixStream::from(fd), options)
    }

    /// Connects to a [`Listener`] on `name` in the abstract namespace.
    ///
    /// # Errors
    ///
    /// As [`connect`](Channel::connect).
    pub fn connect_abstract(name: &[u8]) -> Result<Channel, SetupError> {
        Channel::connect_abstract_with(name, &Options::default())
    }

    /// [`connect_abstract`](Channel::connect_abstract) with options.
    ///
    /// # Errors
    ///
    /// As [`connect`](Channel::connect).
    pub fn connect_abstract_with(name: &[u8], options: &Options) -> Result<Channel, SetupError> {
        let fd = connect_bounded(UnixAddr::Abstract(name), options)?;
        Channel::from_stream_with(UnixStream::from(fd), options)
    }

    /// The credentials of the peer's process, as recorded when the
    /// connection was made (for a [`pair`](Channel::pair) made before
    /// `fork`: this process).
    ///
    /// # Errors
    ///
    /// If the kernel cannot tell.
    pub fn peer_credentials(&self) -> std::io::Result<Credentials> {
        Credentials::of(self.as_fd())
    }
}
