//! Zero-copy Cap'n Proto messages between processes on one Linux host.
//!
//! Two processes share a Unix socket. Each end creates a sealed memfd, maps
//! it read-write as its *outgoing region*, and hands the peer a read-only
//! descriptor; the peer maps it read-only. A message is built directly in the
//! outgoing region by a capnp allocator, its segment table travels through a
//! ring in shared memory, `futex(2)` wakes a receiver that sleeps, and the
//! receiver reads the message where it lies. When the receiver drops the
//! message, the sender reuses the space.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use capnp_shm::Channel;
//!
//! let (client, server) = Channel::pair()?;
//!
//! let mut request = client.message();
//! request.set_root(capnp::text::Reader::from("ping"))?;
//! client.send(request)?;
//!
//! let received = server.recv()?; // no copy: the bytes stay in client's region
//! let text: capnp::text::Reader<'_> = received.get_root()?;
//! assert_eq!(text.to_str()?, "ping");
//! drop(received); // client may now reuse the space
//!
//! drop(client);
//! assert!(matches!(server.recv(), Err(capnp_shm::Error::Disconnected)));
//! # Ok(()) }
//! ```
//!
//! # Blocking, and the other end
//!
//! Every call blocks the calling thread, never longer than asked:
//! [`Channel::send`] waits while the peer holds too many messages,
//! [`Channel::recv`] waits for one, and their `try_` and `_timeout` forms
//! bound the wait. There are no background threads. A peer that closes is
//! noticed at once; one that dies, even by `SIGKILL`, within one wait slice
//! (100 ms by default) by a waiting or polling call, and by a sender that
//! never waits within 64 sends once a slice has passed. Messages it sent
//! before are still delivered, then [`Error::Disconnected`].
//!
//! # Trust
//!
//! The peer can never write this process's memory (its view of our region is
//! read-only and the memfd is sealed against new writable mappings), never
//! shrink a region under us, and never make us read outside its region: every
//! counter, offset and length it publishes is checked, and a violation ends
//! the channel with [`Error::Protocol`]. Reading in place does assume the peer
//! leaves a message alone between sending it and our release, as this crate
//! does; for a peer not trusted with that, [`Options::copy_received`] copies
//! each message into private memory first.
//!
//! # Where `unsafe` lives
//!
//! `unsafe_code` is denied crate-wide and allowed only in: `src/sys/` (every
//! system call), `src/region.rs` (references into mapped memory), and
//! `src/alloc.rs` (implementing capnp's `Allocator`, an unsafe trait).

#![cfg(target_os = "linux")]

mod alloc;
mod channel;
mod connect;
mod error;
mod handshake;
mod layout;
mod message;
mod options;
mod receiver;
mod region;
mod select;
mod sender;
mod spawn;
mod spin;
mod sys;

pub use alloc::RegionAllocator;
pub use channel::{Channel, MessageBuilder};
pub use connect::{Credentials, Listener, ListenerOptions};
pub use error::{Error, ProtocolError, SendError, TooLargeKind};
pub use message::{Received, Segments};
pub use options::{Backing, Options};
pub use select::{wait_any, wait_any_with, WaitMethod};
pub use spawn::{PendingChild, ENV_VAR};

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the
/// validators that read what a peer wrote, without processes or memory maps.
/// Not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use crate::handshake::{Hello, HELLO_LEN};
    use crate::receiver::SegmentTable;

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
    /// `(offset, len)`, a data area of `data_words` words whose words (for an
    /// out-of-line table) come from `area` (missing words read as absent).
    /// Returns the segments as `(start, len)` or the protocol error's text.
    pub fn read_segment_table(
        count: u32,
        offset: u32,
        len: u32,
        data_words: u32,
        area: &[u64],
    ) -> Result<Vec<(u32, u32)>, String> {
        let table = SegmentTable::read(count, [[offset, len]], data_words, |w| {
            (w < data_words).then(|| area.get(w as usize).copied().unwrap_or(0))
        })
        .map_err(|e| e.to_string())?;
        Ok((0..table.len())
            .filter_map(|i| table.get(i))
            .map(|e| (e.start, e.len))
            .collect())
    }
}
