//! Errors, one type per operation (crossbeam's shape), and the union
//! [`Error`] for code that does several kinds of operation.
//!
//! - Set-up ([`Channel::pair`](crate::Channel::pair), `from_stream`,
//!   `connect`, `accept`, `from_env`): [`SetupError`].
//! - Receiving: [`RecvError`], [`TryRecvError`], [`RecvTimeoutError`].
//! - Sending: [`SendError`], [`TrySendError`], [`SendTimeoutError`]; each
//!   hands the unsent message back.
//! - What ends an end for good: the peer going away (`Disconnected`), or a
//!   [`Failure`]: the peer broke the protocol, the OS refused, or the end is
//!   used from a process that does not own it. Once an end has seen one,
//!   every later call returns it again.

use std::fmt;
use std::io;

/// Why an end stopped working, other than the peer going away. Every later
/// call on the end returns the same failure.
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// The peer broke the protocol (an out-of-range counter or segment, a
    /// bad release, stray bytes on the socket). This end is closed.
    Protocol(ProtocolError),
    /// The operating system refused an operation this end needed (a futex
    /// refused by a seccomp filter, a broken socket). This end is closed.
    Io(io::Error),
    /// The end is used from a process that does not own it: an end belongs
    /// to the first process that uses it, and a copy inherited through
    /// `fork` can only be dropped (which touches nothing shared).
    NotOwner(NotOwner),
}

/// The end belongs to another process; see [`Failure::NotOwner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotOwner {
    /// The process that owns the end.
    pub owner: u32,
    /// The process that tried to use it.
    pub caller: u32,
}

impl Failure {
    /// A copy to return again later: the os error code (and kind and text)
    /// of an io error survives.
    pub(crate) fn replay(&self) -> Failure {
        match self {
            Failure::Protocol(p) => Failure::Protocol(*p),
            Failure::NotOwner(n) => Failure::NotOwner(*n),
            Failure::Io(e) => Failure::Io(replay_io(e)),
        }
    }
}

/// A copy of an io error: the same os error code where it has one, else
/// the same kind and text.
pub(crate) fn replay_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Protocol(p) => write!(f, "peer broke the protocol: {p}"),
            Failure::Io(e) => write!(f, "i/o error: {e}"),
            Failure::NotOwner(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for NotOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "channel end owned by process {}, used from process {} (an end inherited \
             through fork can only be dropped)",
            self.owner, self.caller
        )
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Protocol(p) => Some(p),
            Failure::Io(e) => Some(e),
            Failure::NotOwner(n) => Some(n),
        }
    }
}

impl std::error::Error for NotOwner {}

/// A message that can never fit this end's outgoing region: nothing was
/// sent, and the channel still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// Words (or segments, for [`TooLargeKind::Segments`]) the message needs.
    pub needed: u64,
    /// The limit it exceeds.
    pub limit: u64,
    /// Which limit.
    pub kind: TooLargeKind,
}

/// Which limit a [`TooLarge`] message exceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TooLargeKind {
    /// Total words against what the outgoing space may hold: the limit on
    /// it ([`Options::max_outgoing`](crate::Options::max_outgoing), and
    /// what the peer accepts), less the region's rings.
    Words,
    /// One segment against the largest contiguous space the outgoing space
    /// can offer, growth included, while nothing is in flight (space held by
    /// other live builders counts against it), so no release can make room.
    Segment,
    /// Segment count against the protocol's maximum (512).
    Segments,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (needed, limit) = (self.needed, self.limit);
        match self.kind {
            TooLargeKind::Words => write!(
                f,
                "message too large: {} bytes, the outgoing space may hold {} \
                 (raise Options::max_outgoing here and Options::max_incoming at the peer)",
                needed.saturating_mul(8),
                limit.saturating_mul(8)
            ),
            TooLargeKind::Segment => write!(
                f,
                "message segment too large: {} bytes, at most {} fit while other \
                 builders hold the rest",
                needed.saturating_mul(8),
                limit.saturating_mul(8)
            ),
            TooLargeKind::Segments => write!(
                f,
                "message has too many segments: {needed}, at most {limit}"
            ),
        }
    }
}

impl std::error::Error for TooLarge {}

// ---- receiving --------------------------------------------------------------

/// Why [`recv`](crate::Receiver::recv) returned no message.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer closed its end or its process died, and every message it
    /// sent before has been received.
    Disconnected,
    /// This end failed; see [`Failure`].
    Failed(Failure),
}

/// Why [`try_recv`](crate::Receiver::try_recv) returned no message.
#[derive(Debug)]
#[non_exhaustive]
pub enum TryRecvError {
    /// No message is waiting right now.
    Empty,
    /// As [`RecvError::Disconnected`].
    Disconnected,
    /// This end failed; see [`Failure`].
    Failed(Failure),
}

/// Why [`recv_timeout`](crate::Receiver::recv_timeout) returned no message.
#[derive(Debug)]
#[non_exhaustive]
pub enum RecvTimeoutError {
    /// No message came in time.
    Timeout,
    /// As [`RecvError::Disconnected`].
    Disconnected,
    /// This end failed; see [`Failure`].
    Failed(Failure),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Disconnected => f.write_str(DISCONNECTED),
            RecvError::Failed(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TryRecvError::Empty => f.write_str("no message waiting"),
            TryRecvError::Disconnected => f.write_str(DISCONNECTED),
            TryRecvError::Failed(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for RecvTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvTimeoutError::Timeout => f.write_str("timed out waiting for a message"),
            RecvTimeoutError::Disconnected => f.write_str(DISCONNECTED),
            RecvTimeoutError::Failed(e) => e.fmt(f),
        }
    }
}

const DISCONNECTED: &str = "peer disconnected";

macro_rules! source_is_failure {
    ($($t:ident),*) => {$(
        impl std::error::Error for $t {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                match self {
                    $t::Failed(e) => Some(e),
                    _ => None,
                }
            }
        }
    )*};
}
source_is_failure!(RecvError, TryRecvError, RecvTimeoutError);

// ---- sending ----------------------------------------------------------------

/// Why [`send`](crate::Sender::send) did not send; the message comes back.
///
/// The message borrows its channel, so this error is not `'static`: to
/// pass it up with `?` as a `Box<dyn Error>`, drop the message first with
/// [`into_error`](SendError::into_error).
#[non_exhaustive]
pub enum SendError<M> {
    /// The peer closed its end or died.
    Disconnected(M),
    /// The message can never fit; the channel still works.
    TooLarge(M, TooLarge),
    /// This end failed; see [`Failure`].
    Failed(M, Failure),
}

/// Why [`try_send`](crate::Sender::try_send) did not send; the message
/// comes back.
#[non_exhaustive]
pub enum TrySendError<M> {
    /// No room now: the peer has not yet released enough earlier messages.
    Full(M),
    /// The peer closed its end or died.
    Disconnected(M),
    /// The message can never fit; the channel still works.
    TooLarge(M, TooLarge),
    /// This end failed; see [`Failure`].
    Failed(M, Failure),
}

/// Why [`send_timeout`](crate::Sender::send_timeout) did not send; the
/// message comes back.
#[non_exhaustive]
pub enum SendTimeoutError<M> {
    /// No room came in time.
    Timeout(M),
    /// The peer closed its end or died.
    Disconnected(M),
    /// The message can never fit; the channel still works.
    TooLarge(M, TooLarge),
    /// This end failed; see [`Failure`].
    Failed(M, Failure),
}

/// The shared methods of the three send errors.
macro_rules! send_error {
    ($t:ident { $($momentary:ident => $text:literal)? }) => {
        impl<M> $t<M> {
            /// The unsent message.
            pub fn into_inner(self) -> M {
                match self {
                    $($t::$momentary(m) => m,)?
                    $t::Disconnected(m) | $t::TooLarge(m, _) | $t::Failed(m, _) => m,
                }
            }

            /// The cause without the message, as a `'static` [`Error`].
            pub fn into_error(self) -> Error {
                match self {
                    $($t::$momentary(_) => Error::$momentary,)?
                    $t::Disconnected(_) => Error::Disconnected,
                    $t::TooLarge(_, t) => Error::TooLarge(t),
                    $t::Failed(_, f) => Error::from(f),
                }
            }

            /// Whether the end is finished: every later send fails too.
            pub fn is_fatal(&self) -> bool {
                matches!(self, $t::Disconnected(_) | $t::Failed(..))
            }
        }

        impl<M> fmt::Debug for $t<M> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $($t::$momentary(_) => f.write_str(concat!(stringify!($momentary), "(..)")),)?
                    $t::Disconnected(_) => f.write_str("Disconnected(..)"),
                    $t::TooLarge(_, t) => f.debug_tuple("TooLarge").field(&"..").field(t).finish(),
                    $t::Failed(_, e) => f.debug_tuple("Failed").field(&"..").field(e).finish(),
                }
            }
        }

        impl<M> fmt::Display for $t<M> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    $($t::$momentary(_) => f.write_str($text),)?
                    $t::Disconnected(_) => f.write_str(DISCONNECTED),
                    $t::TooLarge(_, t) => t.fmt(f),
                    $t::Failed(_, e) => e.fmt(f),
                }
            }
        }

        impl<M> std::error::Error for $t<M> {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                match self {
                    $t::TooLarge(_, t) => Some(t),
                    $t::Failed(_, e) => Some(e),
                    _ => None,
                }
            }
        }

        impl<M> From<$t<M>> for Error {
            fn from(e: $t<M>) -> Error {
                e.into_error()
            }
        }
    };
}
send_error!(SendError {});
send_error!(TrySendError { Full => "channel full: the peer has not released enough messages" });
send_error!(SendTimeoutError { Timeout => "timed out waiting for room to send" });

// ---- set-up -----------------------------------------------------------------

/// Why setting up a channel failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SetupError {
    /// The peer did not complete the handshake within
    /// [`Options::setup_timeout`](crate::Options::setup_timeout) (or a
    /// listener's queue stayed full that long).
    Timeout {
        /// How long the set-up waited.
        after: std::time::Duration,
    },
    /// The peer closed the connection (or its process died) before sending
    /// anything: a peer that went away, not one that broke the protocol.
    Disconnected,
    /// Connecting to a listener failed (`NotFound`, `ConnectionRefused`:
    /// nobody listens there).
    Connect {
        /// The socket path or abstract name tried.
        to: String,
        /// Why.
        error: io::Error,
    },
    /// The peer's hello, descriptor or region is unacceptable.
    Protocol(ProtocolError),
    /// The options ask for something the format does not allow.
    InvalidOptions(InvalidOptions),
    /// [`Channel::from_env`](crate::Channel::from_env) found no channel
    /// handed to this process.
    NotInherited(NotInherited),
    /// The operating system refused (socket, memfd, mapping, connect).
    Io(io::Error),
}

/// An option value the format does not allow; see [`SetupError::InvalidOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidOptions {
    /// `region_size` is outside what a region may be.
    RegionSize {
        /// The size asked for, in bytes.
        requested: usize,
        /// The smallest region with the asked ring capacity.
        min: u64,
        /// The largest region the format allows.
        max: u64,
    },
}

/// Why [`Channel::from_env`](crate::Channel::from_env) found no channel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotInherited {
    /// `CAPNP_SHM_FD` is not set.
    NotSet,
    /// `CAPNP_SHM_FD` is not `<fd>:<parent pid>`.
    Malformed,
    /// The variable names another parent (a grandchild inherited it).
    OtherParent,
    /// The descriptor is not open, or is a standard stream.
    NotOpen,
    /// The descriptor is not a Unix stream socket.
    NotAUnixStream,
    /// The socket's peer is not our parent process.
    NotFromParent,
    /// This process has claimed its inherited descriptor already.
    ClaimedAlready,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Timeout { after } => write!(
                f,
                "timed out setting up the channel after {after:?} (Options::setup_timeout)"
            ),
            SetupError::Disconnected => {
                f.write_str("the peer went away before the handshake (closed or died)")
            }
            SetupError::Connect { to, error } => write!(f, "connecting to {to}: {error}"),
            SetupError::Protocol(p) => write!(f, "peer broke the protocol: {p}"),
            SetupError::InvalidOptions(o) => write!(f, "invalid options: {o}"),
            SetupError::NotInherited(n) => write!(f, "CAPNP_SHM_FD: {n}"),
            SetupError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl fmt::Display for InvalidOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidOptions::RegionSize {
                requested,
                min,
                max,
            } => write!(f, "region size {requested} is outside {min}..={max} bytes"),
        }
    }
}

impl fmt::Display for NotInherited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotInherited::NotSet => "not set",
            NotInherited::Malformed => "malformed (expected <fd>:<parent pid>)",
            NotInherited::OtherParent => "set by another process than our parent",
            NotInherited::NotOpen => "names no open descriptor (or a standard stream)",
            NotInherited::NotAUnixStream => "not a Unix stream socket",
            NotInherited::NotFromParent => "not a socket our parent made",
            NotInherited::ClaimedAlready => "the inherited descriptor was claimed already",
        })
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Protocol(p) => Some(p),
            SetupError::InvalidOptions(o) => Some(o),
            SetupError::NotInherited(n) => Some(n),
            SetupError::Io(e) | SetupError::Connect { error: e, .. } => Some(e),
            SetupError::Timeout { .. } | SetupError::Disconnected => None,
        }
    }
}

impl std::error::Error for InvalidOptions {}
impl std::error::Error for NotInherited {}

impl From<io::Error> for SetupError {
    fn from(e: io::Error) -> SetupError {
        SetupError::Io(e)
    }
}

impl From<ProtocolError> for SetupError {
    fn from(p: ProtocolError) -> SetupError {
        SetupError::Protocol(p)
    }
}

// ---- the union ----------------------------------------------------------------

/// Any error of this crate, for code that sets up, sends and receives in
/// one function and passes errors on with `?`. Every per-operation error
/// converts into it (a send error drops its message).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// See [`TryRecvError::Empty`].
    Empty,
    /// See [`TrySendError::Full`].
    Full,
    /// A `*_timeout` operation, or the set-up, ran out of time.
    Timeout,
    /// The peer closed its end or died.
    Disconnected,
    /// See [`TooLarge`].
    TooLarge(TooLarge),
    /// See [`Failure::Protocol`] and [`SetupError::Protocol`].
    Protocol(ProtocolError),
    /// See [`Failure::Io`] and [`SetupError::Io`].
    Io(io::Error),
    /// See [`Failure::NotOwner`].
    NotOwner(NotOwner),
    /// See [`SetupError::InvalidOptions`].
    InvalidOptions(InvalidOptions),
    /// See [`SetupError::NotInherited`].
    NotInherited(NotInherited),
}

impl Error {
    /// Whether the error ends the channel (every later call fails too).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            Error::Empty | Error::Full | Error::Timeout | Error::TooLarge(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => f.write_str("no message waiting"),
            Error::Full => f.write_str("channel full: the peer has not released enough messages"),
            Error::Timeout => f.write_str("timed out"),
            Error::Disconnected => f.write_str(DISCONNECTED),
            Error::TooLarge(t) => t.fmt(f),
            Error::Protocol(p) => write!(f, "peer broke the protocol: {p}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::NotOwner(n) => n.fmt(f),
            Error::InvalidOptions(o) => write!(f, "invalid options: {o}"),
            Error::NotInherited(n) => write!(f, "CAPNP_SHM_FD: {n}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::TooLarge(t) => Some(t),
            Error::Protocol(p) => Some(p),
            Error::Io(e) => Some(e),
            Error::NotOwner(n) => Some(n),
            Error::InvalidOptions(o) => Some(o),
            Error::NotInherited(n) => Some(n),
            _ => None,
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Protocol(p) => Error::Protocol(p),
            Failure::Io(e) => Error::Io(e),
            Failure::NotOwner(n) => Error::NotOwner(n),
        }
    }
}

impl From<SetupError> for Error {
    fn from(e: SetupError) -> Error {
        match e {
            SetupError::Timeout { .. } => Error::Timeout,
            SetupError::Disconnected => Error::Disconnected,
            SetupError::Connect { error, .. } => Error::Io(error),
            SetupError::Protocol(p) => Error::Protocol(p),
            SetupError::InvalidOptions(o) => Error::InvalidOptions(o),
            SetupError::NotInherited(n) => Error::NotInherited(n),
            SetupError::Io(e) => Error::Io(e),
        }
    }
}

impl From<RecvError> for Error {
    fn from(e: RecvError) -> Error {
        match e {
            RecvError::Disconnected => Error::Disconnected,
            RecvError::Failed(f) => f.into(),
        }
    }
}

impl From<TryRecvError> for Error {
    fn from(e: TryRecvError) -> Error {
        match e {
            TryRecvError::Empty => Error::Empty,
            TryRecvError::Disconnected => Error::Disconnected,
            TryRecvError::Failed(f) => f.into(),
        }
    }
}

impl From<RecvTimeoutError> for Error {
    fn from(e: RecvTimeoutError) -> Error {
        match e {
            RecvTimeoutError::Timeout => Error::Timeout,
            RecvTimeoutError::Disconnected => Error::Disconnected,
            RecvTimeoutError::Failed(f) => f.into(),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

// ---- inside the crate ---------------------------------------------------------

/// Why a send or receive stopped, before the public wrapper names it for
/// its operation: `Expired` is "empty" or "full" for a `try_` call and
/// "timed out" for a `_timeout` call (a call without deadline never
/// expires; it loops instead).
#[derive(Debug)]
pub(crate) enum Halt {
    Expired,
    Disconnected,
    Failed(Failure),
}

impl From<Failure> for Halt {
    fn from(f: Failure) -> Halt {
        Halt::Failed(f)
    }
}

/// Why a send stopped: a [`Halt`], or a message that can never fit.
#[derive(Debug)]
pub(crate) enum SendHalt {
    Halt(Halt),
    TooLarge(TooLarge),
}

impl SendHalt {
    /// The error of a send that waits as long as it takes, with the message
    /// back; `Ok(message)` for an expired wait, which such a send retries.
    pub(crate) fn into_send_error<M>(self, message: M) -> Result<M, SendError<M>> {
        match self {
            SendHalt::Halt(Halt::Expired) => Ok(message),
            SendHalt::Halt(Halt::Disconnected) => Err(SendError::Disconnected(message)),
            SendHalt::Halt(Halt::Failed(f)) => Err(SendError::Failed(message, f)),
            SendHalt::TooLarge(t) => Err(SendError::TooLarge(message, t)),
        }
    }

    /// The error of a send that does not wait, with the message back.
    pub(crate) fn into_try_send_error<M>(self, message: M) -> TrySendError<M> {
        match self {
            SendHalt::Halt(Halt::Expired) => TrySendError::Full(message),
            SendHalt::Halt(Halt::Disconnected) => TrySendError::Disconnected(message),
            SendHalt::Halt(Halt::Failed(f)) => TrySendError::Failed(message, f),
            SendHalt::TooLarge(t) => TrySendError::TooLarge(message, t),
        }
    }

    /// The error of a send that waits at most a timeout, with the message
    /// back.
    pub(crate) fn into_send_timeout_error<M>(self, message: M) -> SendTimeoutError<M> {
        match self {
            SendHalt::Halt(Halt::Expired) => SendTimeoutError::Timeout(message),
            SendHalt::Halt(Halt::Disconnected) => SendTimeoutError::Disconnected(message),
            SendHalt::Halt(Halt::Failed(f)) => SendTimeoutError::Failed(message, f),
            SendHalt::TooLarge(t) => SendTimeoutError::TooLarge(message, t),
        }
    }
}

impl From<Halt> for SendHalt {
    fn from(h: Halt) -> SendHalt {
        SendHalt::Halt(h)
    }
}

impl From<Failure> for SendHalt {
    fn from(f: Failure) -> SendHalt {
        SendHalt::Halt(Halt::Failed(f))
    }
}

// ---- the peer's mistakes ------------------------------------------------------

/// How the peer broke the protocol. Each variant names one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The hello or the region's control block does not start with the magic.
    BadMagic,
    /// The peer speaks another version of the format.
    BadVersion {
        /// The version the peer announced.
        found: u32,
    },
    /// The hello announced an unusable region shape.
    BadGeometry {
        /// Announced region size in bytes.
        region_size: u64,
        /// Announced ring capacity.
        ring_capacity: u32,
    },
    /// The hello had unknown flag bits or reserved bytes set.
    BadHelloFlags,
    /// The connection closed after part of a hello, before the handshake
    /// ended. (Closed before any byte: [`SetupError::Disconnected`].)
    HandshakeTruncated,
    /// The hello came without a descriptor.
    MissingDescriptor,
    /// The hello came with more than one descriptor.
    ExtraDescriptors {
        /// How many arrived.
        count: usize,
    },
    /// The kernel truncated the hello's control data (`MSG_CTRUNC`).
    ControlTruncated,
    /// The descriptor is not a regular file (a pipe, socket, directory...).
    NotARegularFile,
    /// The file's size differs from the announced region size.
    WrongFileSize {
        /// Announced in the hello.
        announced: u64,
        /// Found by `fstat`.
        actual: u64,
    },
    /// The file's seals differ from what a sealed region must carry.
    WrongSeals {
        /// Seals found by `F_GET_SEALS` (0 when the file cannot be sealed).
        found: u32,
    },
    /// The peer's region is unsealed and this end does not accept that
    /// (see `Options::allow_unsealed_peer`).
    UnsealedRegion,
    /// The mapped control block disagrees with the hello.
    ControlBlockMismatch,
    /// The peer's region is this end's own (the peer sent back our own
    /// hello and descriptor: a loopback).
    OwnRegion,
    /// The peer handed over as its area one of this end's own areas (a
    /// loopback of an area we handed it).
    OwnArea {
        /// The area id the peer announced.
        announced: u32,
        /// The id of ours the file is.
        ours: u32,
    },
    /// The peer's descriptor cannot be mapped read-only here (a file opened
    /// write-only, a hugetlb file without huge pages, ...): the peer chose
    /// a file this end cannot read. (`ENOMEM` may also mean this process is
    /// out of address space.)
    UnmappableRegion {
        /// The error number `mmap` gave.
        os_error: i32,
    },
    /// Bytes arrived on the socket after the handshake.
    UnexpectedSocketData,
    /// The peer's verdict on our region (the handshake's last 8 bytes) is
    /// neither "mapped" nor "refused".
    BadVerdict,
    /// The peer's `published` counter went backwards or past the ring capacity.
    PublishedOutOfRange {
        /// Messages taken so far.
        consumed: u32,
        /// The counter the peer published.
        published: u32,
    },
    /// A descriptor carries the wrong sequence number.
    DescriptorSequence {
        /// The expected sequence number.
        expected: u32,
        /// The one found.
        found: u32,
    },
    /// A descriptor announces zero or more than 512 segments.
    BadSegmentCount {
        /// The announced count.
        count: u32,
    },
    /// A segment (or an out-of-line segment table) lies outside the data area.
    SegmentOutOfBounds {
        /// Word offset.
        offset: u32,
        /// Length in words.
        len: u32,
    },
    /// A message's segments add up to more words than the data area holds:
    /// they overlap, which an honest sender never does.
    SegmentsExceedArea {
        /// Total words of all segments.
        words: u64,
        /// Words in the peer's data areas together.
        data_words: u64,
    },
    /// A descriptor or segment table names an area the peer has not handed
    /// over (never, or not since it retired it), or a retirement names one.
    UnknownArea {
        /// The area id named.
        area: u32,
    },
    /// An area record on the socket is malformed: an id out of range or
    /// already in use, a size that is not a whole number of pages or too
    /// large, or reserved bytes set.
    BadAreaRecord {
        /// The area id announced.
        area: u32,
        /// The size announced, in bytes.
        bytes: u64,
    },
    /// An area record's first byte came with `count` descriptors, not
    /// exactly one.
    AreaRecordDescriptors {
        /// How many came.
        count: usize,
    },
    /// Descriptors came with socket bytes that do not start an area record
    /// (doorbells, or the rest of a record).
    StrayDescriptors {
        /// How many came.
        count: usize,
    },
    /// A retirement (a descriptor of 0 segments, naming an area other than
    /// 0) carries an extent, where it must carry none.
    BadRetirement {
        /// The area it names.
        area: u32,
        /// The extent's word offset.
        offset: u32,
        /// The extent's length in words.
        len: u32,
    },
    /// A descriptor that carries its segment in its entry (offset
    /// `u32::MAX`) names a slot, an area or a segment count other than 1,
    /// or more words than an entry holds (14).
    BadCarried {
        /// The entry's slot, segment count and area word.
        slot_count: u32,
        /// The words it says it carries.
        len: u32,
    },
    /// The peer's areas would take more than this end accepts
    /// (`Options::max_incoming`, which the peer was told).
    AreaLimit {
        /// Bytes of the peer's region and areas, with the one announced.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// In copy mode, a message larger than the reader's traversal limit
    /// (`Options::reader_options`): it could not be read, and copying it
    /// would cost what the limit is there to prevent. It is released
    /// uncopied.
    ExceedsReadLimit {
        /// Words in the message.
        words: u64,
        /// The traversal limit, in words.
        limit: u64,
    },
    /// The peer's `consumed` counter went backwards or past what was sent.
    ConsumedOutOfRange {
        /// The counter the peer published.
        consumed: u32,
    },
    /// The peer's release counter jumped past what could have been released.
    ReleasedOutOfRange {
        /// Entries read so far.
        seen: u32,
        /// The counter the peer published.
        released: u32,
    },
    /// A release names a message that is not in flight (never sent, already
    /// released, or not yet received).
    BadRelease {
        /// The slot named.
        slot: u32,
        /// The sequence number named.
        seq: u32,
    },
    /// On a stream channel, a frame header claims 0 segments or more than
    /// 511 (capnp's limit).
    FrameSegmentCount {
        /// The segment count the header implies.
        count: u64,
    },
    /// On a stream channel, a frame header announces more words than the
    /// reader's traversal limit (`Options::reader_options`): it is refused
    /// before any buffer is sized for it.
    FrameTooLarge {
        /// Words the header announces.
        words: u64,
        /// The traversal limit, in words.
        limit: u64,
    },
    /// On a stream channel, the peer closed inside a frame.
    FrameTruncated {
        /// Bytes of the frame that came.
        have: u64,
        /// Bytes the frame needs, at least.
        need: u64,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProtocolError::*;
        match *self {
            BadMagic => f.write_str("bad magic"),
            BadVersion { found } => write!(f, "unsupported version {found}"),
            BadGeometry {
                region_size,
                ring_capacity,
            } => write!(
                f,
                "unusable geometry: region of {region_size} bytes, ring of {ring_capacity}"
            ),
            BadHelloFlags => f.write_str("unknown flags or reserved bytes in hello"),
            HandshakeTruncated => f.write_str("connection ended during the handshake"),
            MissingDescriptor => f.write_str("hello without a descriptor"),
            ExtraDescriptors { count } => write!(f, "hello with {count} descriptors, expected one"),
            ControlTruncated => f.write_str("hello control data truncated"),
            NotARegularFile => f.write_str("region descriptor is not a regular file"),
            WrongFileSize { announced, actual } => {
                write!(f, "region file is {actual} bytes, announced {announced}")
            }
            WrongSeals { found } => write!(f, "region seals are {found:#x}, not the required set"),
            UnsealedRegion => {
                f.write_str("peer region is unsealed and unsealed regions are not accepted")
            }
            ControlBlockMismatch => f.write_str("region control block disagrees with the hello"),
            OwnRegion => f.write_str("the peer's region is this end's own region (a loopback)"),
            OwnArea { announced, ours } => write!(
                f,
                "the peer's area {announced} is this end's own area {ours} (a loopback)"
            ),
            UnmappableRegion { os_error } => write!(
                f,
                "the peer's region file cannot be mapped read-only: {}",
                std::io::Error::from_raw_os_error(os_error)
            ),
            UnexpectedSocketData => {
                f.write_str("unexpected bytes on the socket after the handshake")
            }
            BadVerdict => f.write_str("the peer's verdict on our region is garbled"),
            PublishedOutOfRange {
                consumed,
                published,
            } => write!(
                f,
                "published counter {published} out of range (consumed {consumed})"
            ),
            DescriptorSequence { expected, found } => {
                write!(f, "descriptor sequence {found}, expected {expected}")
            }
            BadSegmentCount { count } => write!(f, "bad segment count {count}"),
            SegmentOutOfBounds { offset, len } => write!(
                f,
                "segment at word {offset} of {len} words lies outside the data area"
            ),
            SegmentsExceedArea { words, data_words } => write!(
                f,
                "segments total {words} words, more than the {data_words} words of data areas"
            ),
            UnknownArea { area } => write!(
                f,
                "the peer named area {area}, which it has not handed over"
            ),
            BadAreaRecord { area, bytes } => {
                write!(f, "malformed area record (area {area}, {bytes} bytes)")
            }
            AreaRecordDescriptors { count } => write!(
                f,
                "an area record came with {count} descriptors, expected one"
            ),
            StrayDescriptors { count } => write!(
                f,
                "{count} descriptors came with socket bytes that start no area record"
            ),
            BadRetirement { area, offset, len } => write!(
                f,
                "the retirement of area {area} carries an extent (word {offset}, {len} words)"
            ),
            BadCarried { slot_count, len } => write!(
                f,
                "a carried message of {len} words with slot, count and area {slot_count:#x} \
                 (at most 14 words, in slot 0, one segment, area 0)"
            ),
            AreaLimit { bytes, limit } => write!(
                f,
                "the peer's areas would take {bytes} bytes, over the {limit} this end accepts \
                 (Options::max_incoming)"
            ),
            ExceedsReadLimit { words, limit } => write!(
                f,
                "a message of {} bytes to copy, over the reader's traversal limit of {} bytes \
                 (raise the receiver's Options::reader_options)",
                words.saturating_mul(8),
                limit.saturating_mul(8)
            ),
            ConsumedOutOfRange { consumed } => {
                write!(f, "consumed counter {consumed} out of range")
            }
            ReleasedOutOfRange { seen, released } => {
                write!(f, "release counter {released} out of range (seen {seen})")
            }
            BadRelease { slot, seq } => write!(
                f,
                "release of message {seq} (slot {slot}) that is not in flight"
            ),
            FrameSegmentCount { count } => {
                write!(f, "stream frame of {count} segments (1 to 511 allowed)")
            }
            FrameTooLarge { words, limit } => write!(
                f,
                "stream frame of {} bytes, over the reader's traversal limit of {} bytes \
                 (raise the receiver's Options::reader_options)",
                words.saturating_mul(8),
                limit.saturating_mul(8)
            ),
            FrameTruncated { have, need } => write!(
                f,
                "stream closed {have} bytes into a frame of at least {need} bytes"
            ),
        }
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_os_error_code() {
        // EPERM on Linux (error.rs names no libc).
        const EPERM: i32 = 1;
        let e = io::Error::from_raw_os_error(EPERM);
        let again = Failure::Io(e).replay();
        match again {
            Failure::Io(e) => assert_eq!(e.raw_os_error(), Some(EPERM)),
            other => panic!("{other:?}"),
        }
        let custom = Failure::Io(io::Error::new(io::ErrorKind::InvalidData, "odd"));
        match custom.replay() {
            Failure::Io(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                assert_eq!(e.to_string(), "odd");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn send_errors_hand_the_message_back_and_convert() {
        let e = TrySendError::Full(7);
        assert!(!e.is_fatal());
        assert_eq!(
            e.to_string(),
            "channel full: the peer has not released enough messages"
        );
        assert!(matches!(e.into_error(), Error::Full));
        let e = SendError::TooLarge(
            8,
            TooLarge {
                needed: 10,
                limit: 5,
                kind: TooLargeKind::Words,
            },
        );
        assert_eq!(
            e.to_string(),
            "message too large: 80 bytes, the outgoing space may hold 40 (raise Options::max_outgoing here and Options::max_incoming at the peer)"
        );
        assert_eq!(e.into_inner(), 8);
        let e = SendTimeoutError::Failed(
            9,
            Failure::NotOwner(NotOwner {
                owner: 1,
                caller: 2,
            }),
        );
        assert!(e.is_fatal());
        assert!(format!("{e:?}").starts_with("Failed"));
        assert!(matches!(Error::from(e), Error::NotOwner(_)));
    }
}
