//! Zero-copy Cap'n Proto messages between processes on one Linux host, and
//! the same API over Cap'n Proto's standard stream framing beyond it (TCP,
//! or a Unix socket without shared memory: see [`Transport`]).
//!
//! Two processes share a Unix socket. Each end creates a sealed memfd, maps
//! it read-write as its *outgoing region*, and hands the peer a read-only
//! descriptor; the peer maps it read-only. A message that does not fit gets
//! further sealed *areas*, added and given back as needed within limits
//! ([`Options::max_outgoing`]): nothing needs sizing. A message is built directly in the
//! outgoing region by a capnp allocator, its segment table travels through a
//! ring in shared memory, `futex(2)` wakes a receiver that sleeps, and the
//! receiver reads the message where it lies. When the receiver drops the
//! message, the sender reuses the space. A message of one segment of at most
//! 112 bytes travels inside its ring entry instead, copied in at send and
//! out as it is taken: for so little, two short copies cost less than the
//! cache lines a read in place and its release move between the cores.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use capnp_shm::{Channel, RecvError};
//!
//! let (client, server) = Channel::pair()?;
//!
//! let mut request = client.message();
//! request.set_root::<capnp::data::Owned>(&[7u8; 4096][..])?;
//! client.send(request).map_err(|e| e.into_error())?;
//!
//! let received = server.recv()?; // no copy: the bytes stay in client's region
//! let data: capnp::data::Reader<'_> = received.get_root()?;
//! assert_eq!(data, &[7u8; 4096][..]);
//! drop(received); // client may now reuse the space
//!
//! let mut request = client.message();
//! request.set_root(capnp::text::Reader::from("ping"))?;
//! client.send(request).map_err(|e| e.into_error())?;
//! let small = server.recv()?; // carried in its ring entry, copied out
//! assert!(small.is_copied());
//! assert_eq!(small.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "ping");
//!
//! drop(client);
//! assert!(matches!(server.recv(), Err(RecvError::Disconnected)));
//! # Ok(()) }
//! ```
//!
//! (A send error hands the unsent builder back, and the builder borrows its
//! channel; `into_error` drops it, for `?` into a `Box<dyn Error>`.)
//!
//! # Blocking, threads, and the other end
//!
//! Every call blocks the calling thread, never longer than asked:
//! [`Channel::send`] waits while the peer holds too many messages,
//! [`Channel::recv`] waits for one, and their `try_` and `_timeout` forms
//! bound the wait. There are no background threads. A [`Channel`] is used
//! by one thread at a time; [`Channel::split`] gives a [`Sender`] and a
//! [`Receiver`] for two threads. A peer that closes is noticed at once; one
//! that dies, even by `SIGKILL`, within one wait slice (100 ms by default)
//! by a waiting or polling call, and by a sender that never waits within 64
//! sends once a slice has passed. Messages it sent before are still
//! delivered, then `Disconnected`.
//!
//! # Errors
//!
//! Each operation has its own error type ([`RecvError`], [`TryRecvError`],
//! [`SendError`], [`TrySendError`], [`SetupError`], ...), shaped like
//! crossbeam's: a failed send hands the message back
//! (`Err(TrySendError::Full(message))`). What ends an end for good is the
//! peer going away (`Disconnected`) or a [`Failure`]; once seen, every later
//! call returns it again. [`Error`] is the union of them all, for `?`.
//!
//! # Trust
//!
//! The peer can never write this process's memory (its view of our region is
//! read-only and the memfd is sealed against new writable mappings), never
//! shrink a region under us, and never make us read outside its region and
//! the areas it handed over: every counter, offset and length it publishes,
//! and every area (at most 63, within [`Options::max_incoming`]), is checked,
//! and a violation ends the channel with [`Failure::Protocol`]. Reading in place does assume the
//! peer leaves a message alone between sending it and our release, as this
//! crate does; for a peer not trusted with that, [`Options::copy_received`]
//! copies each message into private memory first.
//!
//! # Fork
//!
//! An end belongs to the first process that uses it. A copy inherited
//! through `fork` fails every operation with [`Failure::NotOwner`], and
//! dropping it (or a received message or builder of it) touches nothing
//! shared.
//!
//! # How the code is laid out
//!
//! ```text
//! channel    Channel, Sender, Receiver: thin facades over
//!   send       the sending side: books of messages in flight, publish, send loop
//!   alloc        the capnp Allocator over the sending side (free list: free)
//!   recv       the receiving side: take, receive loop, release
//!   message      Received, reading in place over the receiving side
//!   segment_ref  a received message's segments as pointers (below recv,
//!                stream and message, which all hold them)
//!   link       what both sides share: socket, regions, the peer's areas,
//!              owner claim, failure
//! ring       descriptor ring and release ring: both halves of each, encodings
//! wait       the Waiter: spin (spin), announce, sleep, liveness; deadline
//! wake       the sleep/wake handshake, both halves, and why no wake is lost
//! word       the Word trait the rings and waits run on (AtomicU32 + futex)
//! region     typed views of our region and areas (stores) and the peer's
//!            (loads only)
//! layout     the frozen shared format        handshake  hellos, verdicts, checks
//! select     wait_any, poll_ready            connect, spawn  topologies
//! error      the error types                 options    Options, Wire
//! stream     the stream transport: a framed socket end (TCP or Unix) with
//!            deadlines, and the sides Sender and Receiver drive over it
//!   framing    capnp's stream framing: incremental decoder, encoder
//! tcp        TcpListener, Channel::connect_tcp
//! sys/       every libc call                 fault      broken variants (tests)
//! ```
//!
//! `model.rs` (tests only) runs the rings, the waits and the sides under
//! loom, exhaustively.
//!
//! # Where `unsafe` lives
//!
//! `unsafe_code` is denied crate-wide and allowed only in: `src/sys/` (every
//! system call), `src/region.rs` (references into mapped memory, and the
//! data-area writes behind `unsafe fn`s), `src/send.rs` (the calls of those
//! writes, each justified by the sending side's books), `src/alloc.rs`
//! (implementing capnp's `Allocator`, an unsafe trait), `src/segment_ref.rs`
//! (a received message's segments kept as pointers beside the memory they
//! point into, and the `unsafe fn` that reads one, so that capnp's reader
//! finds a segment with no branch on the kind of message), and
//! `src/message.rs` (its two calls, under the invariants of `Segments` and
//! of `OwnedSegments`).

#![cfg(target_os = "linux")]

mod alloc;
mod channel;
mod connect;
mod deadline;
mod error;
mod fault;
mod framing;
mod free;
mod handshake;
mod layout;
mod link;
mod message;
#[cfg(test)]
mod model;
mod options;
mod recv;
mod region;
mod ring;
mod segment_ref;
mod select;
mod send;
mod spares;
mod spawn;
mod spin;
mod stats;
mod stream;
mod sys;
mod tcp;
mod wait;
mod wake;
mod word;

pub use alloc::RegionAllocator;
pub use channel::{Channel, MessageBuilder, Receiver, Sender, SharedReceiver, Transport};
pub use channel::{Iter, TryIter};
pub use connect::{AcceptError, Credentials, Listener, ListenerOptions};
pub use error::{
    Error, Failure, InvalidOptions, NotInherited, NotOwner, ProtocolError, RecvError,
    RecvTimeoutError, SendError, SendTimeoutError, SetupError, TooLarge, TooLargeKind,
    TryRecvError, TrySendError,
};
pub use message::{Detached, OwnedReceived, OwnedSegments, Received, Segments};
pub use options::{Backing, Options, Wire};
pub use select::{poll_readable, poll_ready, wait_any, wait_any_with, WaitAnyError, WaitMethod};
pub use spawn::{PendingChild, ENV_VAR};
pub use stats::{RecvStats, SendStats, Stats};
pub use tcp::TcpListener;
pub use wait::Readiness;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the
/// validators that read what a peer wrote, without processes or memory maps.
/// Not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use crate::handshake::{Hello, HELLO_LEN};
    use crate::region::{Extent, Span};
    use crate::ring::{Areas, SegmentTable};

    /// Parses a hello; `Ok((region_size, ring_capacity, sealed))` or the
    /// protocol error's text. Shorter input is padded with zeros.
    pub fn decode_hello(bytes: &[u8]) -> Result<(u64, u32, bool), String> {
        let mut hello = [0u8; HELLO_LEN];
        let n = bytes.len().min(HELLO_LEN);
        hello[..n].copy_from_slice(&bytes[..n]);
        Hello::decode(&hello)
            .map(|h| (h.geometry.region_size, h.geometry.ring_capacity, h.sealed))
            .map_err(|e| e.to_string())
    }

    /// Validates a descriptor's segment table: `count` segments, inline pair
    /// `(offset, len)`, in area 0 of `data_words` words whose words (for an
    /// out-of-line table, two per segment) come from `area` (missing words
    /// read as absent); no other area exists. Returns the segments as
    /// `(start, len)` or the protocol error's text.
    pub fn read_segment_table(
        count: u32,
        offset: u32,
        len: u32,
        data_words: u32,
        area: &[u64],
    ) -> Result<Vec<(u32, u32)>, String> {
        struct One<'a> {
            words: u32,
            area: &'a [u64],
        }
        impl Areas for One<'_> {
            fn words(&self, id: u32) -> Option<u32> {
                (id == 0).then_some(self.words)
            }
            fn read_word(&self, id: u32, offset: u32) -> Option<u64> {
                (id == 0 && offset < self.words)
                    .then(|| self.area.get(offset as usize).copied().unwrap_or(0))
            }
            fn total_words(&self) -> u64 {
                u64::from(self.words)
            }
        }
        let first = Span {
            area: 0,
            extent: Extent { start: offset, len },
        };
        let areas = One {
            words: data_words,
            area,
        };
        // Into a buffer that still holds an earlier message's spans, as the
        // receiver's reused buffers do.
        let stale = Span {
            area: 0,
            extent: Extent { start: 1, len: 1 },
        };
        let mut spare = vec![stale; 3];
        let table =
            SegmentTable::read_into(count, first, &areas, &mut spare).map_err(|e| e.to_string())?;
        Ok((0..table.len())
            .filter_map(|i| table.get(i))
            .map(|s| (s.extent.start, s.extent.len))
            .collect())
    }
}
