//! Errors: one small enum for what went wrong, and a wrapper that hands an
//! unsent message back.

use std::fmt;
use std::io;

/// What went wrong with a channel operation.
///
/// Match on the variant to decide what to do: [`Error::Empty`], [`Error::Full`]
/// and [`Error::Timeout`] are momentary (try again later);
/// [`Error::TooLarge`] concerns one message (the channel still works);
/// [`Error::Disconnected`], [`Error::Protocol`] and [`Error::Io`] end the
/// channel, and every later operation returns the same kind of error.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `try_recv`: no message is waiting right now.
    Empty,
    /// `try_send`: no room for the message right now; the peer has not yet
    /// released enough earlier messages.
    Full,
    /// A `*_timeout` operation, or the set-up, ran out of time.
    Timeout,
    /// The peer closed its end or its process died; every message it
    /// published before that has been delivered.
    Disconnected,
    /// The message cannot fit this end's outgoing region: more words than
    /// its data area ([`TooLargeKind::Words`]), more than 512 segments
    /// ([`TooLargeKind::Segments`]), or a segment larger than the largest
    /// free space while nothing is in flight, so no release can make room
    /// ([`TooLargeKind::Segment`]: space held by other live builders counts
    /// against it). Nothing was sent; the channel still works.
    TooLarge {
        /// Words (or segments, for [`TooLargeKind::Segments`]) the message needs.
        needed: u64,
        /// The limit it exceeds.
        limit: u64,
        /// Which limit.
        kind: TooLargeKind,
    },
    /// The peer broke the protocol (bad handshake, out-of-range counter or
    /// segment, bad release). The channel is closed.
    Protocol(ProtocolError),
    /// The operating system refused an operation (set-up, socket, mapping).
    Io(io::Error),
}

/// Which limit a [`Error::TooLarge`] message exceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TooLargeKind {
    /// Total words against the data area of the outgoing region.
    Words,
    /// One segment against the largest contiguous space the data area can offer.
    Segment,
    /// Segment count against the protocol's maximum.
    Segments,
}

impl Error {
    /// Whether the error ends the channel (every later call fails too).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Disconnected | Error::Protocol(_) | Error::Io(_)
        )
    }

    /// A copy of a fatal error to store on the channel and return again.
    pub(crate) fn replay(&self) -> Error {
        match self {
            Error::Protocol(p) => Error::Protocol(*p),
            Error::Io(e) => Error::Io(io::Error::new(e.kind(), e.to_string())),
            _ => Error::Disconnected,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => f.write_str("no message waiting"),
            Error::Full => f.write_str("channel full: the peer has not released enough messages"),
            Error::Timeout => f.write_str("timed out"),
            Error::Disconnected => f.write_str("peer disconnected"),
            Error::TooLarge {
                needed,
                limit,
                kind: TooLargeKind::Words,
            } => write!(
                f,
                "message too large: {needed} words, the region holds {limit}"
            ),
            Error::TooLarge {
                needed,
                limit,
                kind: TooLargeKind::Segment,
            } => write!(
                f,
                "message segment too large: {needed} words, at most {limit} fit"
            ),
            Error::TooLarge { needed, limit, .. } => {
                write!(
                    f,
                    "message has too many segments: {needed}, at most {limit}"
                )
            }
            Error::Protocol(p) => write!(f, "peer broke the protocol: {p}"),
            Error::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::Protocol(p) => Some(p),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<ProtocolError> for Error {
    fn from(p: ProtocolError) -> Error {
        Error::Protocol(p)
    }
}

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
    /// The connection closed or sent a short hello before the handshake ended.
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
    /// Bytes arrived on the socket after the handshake.
    UnexpectedSocketData,
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
        /// Words in the data area.
        data_words: u32,
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
            UnexpectedSocketData => {
                f.write_str("unexpected bytes on the socket after the handshake")
            }
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
            SegmentOutOfBounds { offset, len } => {
                write!(
                    f,
                    "segment at word {offset} of {len} words lies outside the data area"
                )
            }
            SegmentsExceedArea { words, data_words } => write!(
                f,
                "segments total {words} words, more than the {data_words}-word data area"
            ),
            ConsumedOutOfRange { consumed } => {
                write!(f, "consumed counter {consumed} out of range")
            }
            ReleasedOutOfRange { seen, released } => {
                write!(f, "release counter {released} out of range (seen {seen})")
            }
            BadRelease { slot, seq } => {
                write!(
                    f,
                    "release of message {seq} (slot {slot}) that is not in flight"
                )
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A failed send: why, and the message, handed back unsent.
///
/// The builder is returned so that a [`Error::Full`] or [`Error::Timeout`]
/// can be retried without rebuilding.
pub struct SendError<M> {
    error: Error,
    message: M,
}

impl<M> SendError<M> {
    pub(crate) fn new(error: Error, message: M) -> SendError<M> {
        SendError { error, message }
    }

    /// Why the send failed.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The unsent message.
    pub fn into_message(self) -> M {
        self.message
    }

    /// Splits into the cause and the unsent message.
    pub fn into_parts(self) -> (Error, M) {
        (self.error, self.message)
    }

    /// Drops the message and keeps the cause.
    pub fn into_error(self) -> Error {
        self.error
    }
}

impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "send failed: {}", self.error)
    }
}

impl<M> std::error::Error for SendError<M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<M> From<SendError<M>> for Error {
    fn from(e: SendError<M>) -> Error {
        e.error
    }
}
