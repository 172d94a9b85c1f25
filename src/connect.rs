//! Unrelated processes: a listener on a socket path or abstract name, and
//! `connect` on the other side.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::channel::{AwaitingVerdict, Channel, HalfOpen, Negotiated};
use crate::deadline::Deadline;
use crate::error::SetupError;
use crate::handshake::{Greeted, HelloReader, SetupDeadline};
use crate::options::Options;
use crate::stream::Socket;
use crate::sys;
use crate::sys::epoll::Epoll;
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
        Listener::new(socket, Some((path.to_path_buf(), (meta.dev(), meta.ino()))))
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
        Listener::new(socket, None)
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
/// A listener serves every connecting client at once: it accepts each
/// connection as soon as it comes, reads the client's hello as it arrives,
/// and only then sets up its own end, so a client that is slow or never
/// says hello holds up nobody (it costs a descriptor until its
/// `setup_timeout` ends). A client whose set-up fails is dropped and
/// counted ([`client_failures`](Listener::client_failures)); it is never an
/// error of the listener.
///
/// For an event loop, the listener's descriptor ([`AsFd`]) becomes readable
/// when [`try_accept`](Listener::try_accept) may have something: poll it,
/// then call `try_accept` until it says [`AcceptError::WouldBlock`].
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::{Channel, Listener};
///
/// // Server: serve clients one after another; a silent one stalls nobody.
/// let listener = Listener::bind("/tmp/example.sock")?;
/// loop {
///     let channel = listener.accept()?; // fails only if the listener does
///     std::thread::spawn(move || {
///         // ... serve `channel` ...
///         # drop(channel);
///     });
/// #   break;
/// }
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
    /// Watches the listening socket and every client whose hello is due.
    epoll: Epoll,
    clients: Mutex<Clients>,
}

/// Connections accepted whose hello has not fully arrived, and what became
/// of those that failed.
#[derive(Debug, Default)]
struct Clients {
    greeting: Vec<Greeting>,
    failures: VecDeque<SetupError>,
    failed: u64,
}

/// One accepted connection, its set-up under way.
#[derive(Debug)]
struct Greeting {
    stage: Stage,
    deadline: SetupDeadline,
}

/// What an accepted connection waits for.
#[derive(Debug)]
enum Stage {
    /// The client's first bytes: a hello, or plain capnp framing.
    Hello { socket: OwnedFd, hello: HelloReader },
    /// The client's verdict on our region (both offered shared memory).
    /// Boxed: it holds both mapped regions, and few clients are in it.
    Verdict(Box<AwaitingVerdict>),
}

impl Stage {
    fn socket(&self) -> BorrowedFd<'_> {
        match self {
            Stage::Hello { socket, .. } => socket.as_fd(),
            Stage::Verdict(v) => v.socket(),
        }
    }
}

/// What a client in set-up sent.
#[derive(Debug)]
enum Heard {
    Greeted(Greeted),
    Verdict(bool),
}

/// Where one client's set-up went. (Short-lived: the size of a channel
/// costs nothing here.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Advanced {
    Channel(Channel),
    Waiting(Stage),
}

/// The most connections a listener keeps waiting for their hello; more stay
/// in the kernel's queue until one finishes or gives up.
const MAX_GREETING: usize = 256;

/// The most recent client failures kept for
/// [`client_failures`](Listener::client_failures).
const MAX_FAILURES: usize = 32;

/// Why [`Listener::accept_timeout`] or [`Listener::try_accept`] returned no
/// channel.
#[derive(Debug)]
#[non_exhaustive]
pub enum AcceptError {
    /// No client completed its set-up in time (`accept_timeout`).
    Timeout,
    /// No client has completed its set-up yet (`try_accept`): poll the
    /// listener's descriptor and try again.
    WouldBlock,
    /// The listening socket failed: the listener is finished.
    Io(std::io::Error),
}

impl fmt::Display for AcceptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcceptError::Timeout => f.write_str("no client set up a channel in time"),
            AcceptError::WouldBlock => f.write_str("no client has set up a channel yet"),
            AcceptError::Io(e) => write!(f, "the listener failed: {e}"),
        }
    }
}

impl std::error::Error for AcceptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AcceptError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl Clients {
    fn fail(&mut self, e: SetupError) {
        self.failed += 1;
        if self.failures.len() == MAX_FAILURES {
            self.failures.pop_front();
        }
        self.failures.push_back(e);
    }
}

impl Listener {
    fn new(socket: OwnedFd, path: Option<(PathBuf, (u64, u64))>) -> std::io::Result<Listener> {
        let epoll = Epoll::new()?;
        epoll.add(socket.as_fd())?;
        Ok(Listener {
            socket,
            path,
            owner_pid: sys::getpid(),
            epoll,
            clients: Mutex::new(Clients::default()),
        })
    }

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

    /// Waits until a client has set up a channel (default options), serving
    /// every connecting client meanwhile.
    ///
    /// # Errors
    ///
    /// Only when the listening socket fails. A client whose set-up fails is
    /// dropped and counted, not returned (see
    /// [`client_failures`](Self::client_failures)).
    pub fn accept(&self) -> std::io::Result<Channel> {
        self.accept_with(&Options::default())
    }

    /// [`accept`](Self::accept) with channel options (for this end; each
    /// client's `setup_timeout` bounds its set-up).
    ///
    /// # Errors
    ///
    /// As [`accept`](Self::accept).
    pub fn accept_with(&self, options: &Options) -> std::io::Result<Channel> {
        loop {
            match self.accept_until(options, Deadline::Never) {
                Ok(channel) => return Ok(channel),
                Err(AcceptError::Io(e)) => return Err(e),
                // Without a deadline nothing expires; wait again.
                Err(_) => continue,
            }
        }
    }

    /// [`accept`](Self::accept), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`AcceptError::Timeout`] when no client completed its set-up in
    /// time; [`AcceptError::Io`] when the listening socket failed.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Channel, AcceptError> {
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
    ) -> Result<Channel, AcceptError> {
        self.accept_until(options, Deadline::after(timeout))
    }

    /// Without waiting: accepts waiting connections, reads what their
    /// hellos sent, and returns a channel if one is complete. For an event
    /// loop: poll the listener's descriptor for reading first.
    ///
    /// # Errors
    ///
    /// [`AcceptError::WouldBlock`] when no client is set up yet;
    /// [`AcceptError::Io`] when the listening socket failed.
    pub fn try_accept(&self) -> Result<Channel, AcceptError> {
        self.try_accept_with(&Options::default())
    }

    /// [`try_accept`](Self::try_accept) with channel options.
    ///
    /// # Errors
    ///
    /// As [`try_accept`](Self::try_accept).
    pub fn try_accept_with(&self, options: &Options) -> Result<Channel, AcceptError> {
        self.accept_until(options, Deadline::Now)
    }

    /// The failures of the most recent clients that did not get a channel
    /// (at most 32, oldest first), taken out of the listener; and how many
    /// failed in all since it was bound.
    pub fn client_failures(&self) -> (Vec<SetupError>, u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let failed = clients.failed;
        (clients.failures.drain(..).collect(), failed)
    }

    fn accept_until(&self, options: &Options, deadline: Deadline) -> Result<Channel, AcceptError> {
        loop {
            let next = {
                let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(channel) = self.serve(&mut clients, options)? {
                    return Ok(channel);
                }
                clients
                    .greeting
                    .iter()
                    .filter_map(|g| g.deadline.remaining().ok())
                    .min()
            };
            let slice = match deadline {
                Deadline::Now => return Err(AcceptError::WouldBlock),
                _ => deadline.slice(next.unwrap_or(Duration::MAX)),
            };
            let Some(slice) = slice else {
                return Err(AcceptError::Timeout);
            };
            let ms = libc_ms(slice);
            self.epoll.wait(ms).map_err(AcceptError::Io)?;
        }
    }

    /// One round: takes every waiting connection, reads every hello, ends
    /// the set-ups that are due or complete. Returns the first channel set
    /// up.
    fn serve(
        &self,
        clients: &mut Clients,
        options: &Options,
    ) -> Result<Option<Channel>, AcceptError> {
        while clients.greeting.len() < MAX_GREETING {
            match socket::accept(self.socket.as_fd()) {
                Ok(fd) => {
                    if let Err(e) = self.epoll.add(fd.as_fd()) {
                        clients.fail(SetupError::Io(e));
                        continue;
                    }
                    clients.greeting.push(Greeting {
                        stage: Stage::Hello {
                            socket: fd,
                            hello: HelloReader::new(true),
                        },
                        deadline: SetupDeadline::after(options.setup_timeout),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // The connection went before we took it: its loss only.
                Err(e) if e.raw_os_error() == Some(sys::errno::ECONNABORTED) => continue,
                Err(e) => return Err(AcceptError::Io(e)),
            }
        }
        let mut i = 0;
        while i < clients.greeting.len() {
            let g = &mut clients.greeting[i];
            let heard = match &mut g.stage {
                Stage::Hello { socket, hello } => {
                    hello.read(socket.as_fd()).map(|h| h.map(Heard::Greeted))
                }
                Stage::Verdict(v) => v.poll().map(|m| m.map(Heard::Verdict)),
            };
            let heard = match heard {
                Ok(None) => match g.deadline.remaining() {
                    Ok(_) => {
                        i += 1;
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Ok(Some(heard)) => Ok(heard),
                Err(e) => Err(e),
            };
            let g = clients.greeting.swap_remove(i);
            let deadline = g.deadline;
            match self.advance(g.stage, heard, options) {
                Ok(Advanced::Channel(channel)) => return Ok(Some(channel)),
                // Back in the list (at its end), with the same deadline.
                Ok(Advanced::Waiting(stage)) => clients.greeting.push(Greeting { stage, deadline }),
                Err(e) => clients.fail(e),
            }
        }
        Ok(None)
    }

    /// The next step of one client's set-up, from what it sent.
    fn advance(
        &self,
        stage: Stage,
        heard: Result<Heard, SetupError>,
        options: &Options,
    ) -> Result<Advanced, SetupError> {
        let heard = match heard {
            Ok(heard) => heard,
            Err(e) => {
                let _ = self.epoll.remove(stage.socket());
                return Err(e);
            }
        };
        match (stage, heard) {
            (Stage::Hello { socket, .. }, Heard::Greeted(Greeted::Plain(prefix))) => {
                // An old client, or anything else that speaks capnp's
                // framing: a stream channel, with what it sent so far.
                let _ = self.epoll.remove(socket.as_fd());
                let stream = UnixStream::from(socket);
                Channel::over_stream_with(Socket::Unix(stream), options, &prefix)
                    .map(Advanced::Channel)
            }
            (Stage::Hello { socket, .. }, Heard::Greeted(Greeted::Hello(hello, fd))) => {
                let _ = self.epoll.remove(socket.as_fd());
                // Our hello only now, for a client that said hello.
                let step = HalfOpen::start(UnixStream::from(socket), options)
                    .and_then(|h| h.complete(hello, fd))?;
                match step {
                    Negotiated::Done(channel) => Ok(Advanced::Channel(channel)),
                    Negotiated::Verdict(v) => {
                        // Its verdict is due: watched again until it comes.
                        self.epoll.add(v.socket())?;
                        Ok(Advanced::Waiting(Stage::Verdict(Box::new(v))))
                    }
                }
            }
            (Stage::Verdict(v), Heard::Verdict(mapped)) => {
                let _ = self.epoll.remove(v.socket());
                v.conclude(mapped).map(Advanced::Channel)
            }
            (stage, _) => {
                // A reader reports only what its own stage waits for.
                let _ = self.epoll.remove(stage.socket());
                Err(SetupError::Io(std::io::Error::other("set-up out of step")))
            }
        }
    }

    /// Waits for a connection and returns it before any set-up, with the
    /// peer's credentials: refuse a stranger by dropping the stream, or go on
    /// with [`Channel::from_stream_with`].
    ///
    /// # Errors
    ///
    /// When `accept` fails.
    pub fn accept_stream(&self) -> std::io::Result<(UnixStream, Credentials)> {
        loop {
            match socket::accept(self.socket.as_fd()) {
                Ok(fd) => {
                    let credentials = Credentials::of(fd.as_fd())?;
                    return Ok((UnixStream::from(fd), credentials));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    socket::poll_one(self.socket.as_fd(), false, Duration::MAX)?;
                }
                Err(e) if e.raw_os_error() == Some(sys::errno::ECONNABORTED) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The socket file, for a listener bound to a path.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_ref().map(|(p, _)| p.as_path())
    }
}

/// A wait in whole milliseconds for `epoll_wait`, rounded up (a
/// sub-millisecond wait still waits), at most `i32::MAX`.
fn libc_ms(d: Duration) -> i32 {
    i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
}

impl AsFd for Listener {
    /// A descriptor that becomes readable when [`Listener::try_accept`] may
    /// have something to do: a new connection, or a hello arriving (an
    /// epoll instance over the listening socket and the clients' sockets).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Listener")
            .field("socket", &self.socket)
            .field("path", &self.path())
            .field("greeting", &clients.greeting.len())
            .field("failed_clients", &clients.failed)
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
