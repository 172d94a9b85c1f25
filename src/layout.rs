//! The frozen shared-memory format of one region.
//!
//! A region is written only by its owner and read by the peer. From offset 0:
//!
//! ```text
//! 0                         control block (CONTROL_BYTES): header + counters,
//!                           each on its own 128-byte line
//! CONTROL_BYTES             descriptor ring: ring_capacity x DescriptorEntry (128 B)
//! releases_offset()         release ring:    held_capacity x ReleaseEntry (8 B)
//! data_offset()             data area, DATA_ALIGN aligned, to the end of the region
//! ```
//!
//! Besides its region, an end may add *areas*: further sealed files of
//! plain data, each handed to the peer once over the socket (see
//! [`AREA_RECORD`]) and named by a small id in the descriptors that refer
//! to it. Area 0 is the region's data area.
//!
//! Every field is a fixed-width atomic so that either process may read any
//! field at any time without a data race, and any bit pattern is a valid value:
//! what the peer wrote is data to validate, never a value to trust. Changing
//! anything here changes the wire format: bump [`VERSION`].
//!
//! The structs are generic over the type of their 32-bit words, `W`: in the
//! crate always `AtomicU32` (the default, and the only type whose layout
//! the const asserts below pin down), with `AtomicU64` for the pairs a
//! carried message's bytes travel in; the model checker (`model.rs`)
//! instantiates them with loom's atomics. What each field means, and who
//! writes it, is the same for every `W`.
//!
//! Units: offsets and lengths inside the data area are in 8-byte *words*, so a
//! misaligned segment cannot be expressed at all.

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::error::ProtocolError;
use crate::word::Word;

/// The first 8 bytes of every region and hello: `"CAPNPSHM"` read as a
/// little-endian `u64`.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"CAPNPSHM");

/// The format version. Any change to this file or to the handshake
/// changes it. (3: the control block's `owner` line; 4: stream hellos and
/// the verdicts that choose the transport; 5: areas that grow, a release
/// ring sized apart from the descriptor ring, limits in the hello; 7:
/// descriptor entries of 128 bytes that carry small messages.)
pub(crate) const VERSION: u32 = 7;

/// Bytes reserved for the control block at the start of a region.
pub(crate) const CONTROL_BYTES: u64 = 1024;

/// Alignment of the data area (and granularity of region sizes).
pub(crate) const DATA_ALIGN: u64 = 4096;

/// Segments described inside a descriptor entry; more go out of line.
pub(crate) const INLINE_SEGMENTS: usize = 1;

/// The most words of a message of one segment that its descriptor entry
/// carries (see [`DescriptorEntry::carried`]): 112 bytes.
pub(crate) const CARRIED_WORDS: usize = 14;

/// The first pair of [`DescriptorEntry::carried`] on the entry's second
/// 64-byte cache line (the tag, the other words and the first six pairs
/// fill the first).
pub(crate) const SECOND_LINE_PAIR: usize = 6;

/// The `offset` of a descriptor whose segment is carried in the entry
/// itself. No segment starts there: offsets are below 2^31 words.
pub(crate) const CARRIED_OFFSET: u32 = u32::MAX;

/// The most segments one message may have.
pub(crate) const MAX_SEGMENTS: u32 = 512;

/// The smallest and largest ring capacities (power of two).
pub(crate) const MIN_RING: u32 = 1;
/// See [`MIN_RING`].
pub(crate) const MAX_RING: u32 = 1 << 16;

/// The largest region: keeps every word offset and length within `u32`.
pub(crate) const MAX_REGION: u64 = 1 << 34;

/// Area ids: 0 is the region's data area; grown areas are 1..=MAX_AREA.
pub(crate) const MAX_AREA: u32 = 63;

/// The first byte of an area record on the socket: 16 bytes, `[AREA_RECORD,
/// id, 0, 0, 0, 0, 0, 0]` then the area's size in bytes (`u64` LE), with
/// exactly one read-only descriptor of the area's file attached.
pub(crate) const AREA_RECORD: u8 = 0x5E;

/// Bytes in an area record.
pub(crate) const AREA_RECORD_LEN: usize = 16;

/// The smallest data area a region may have.
pub(crate) const MIN_DATA: u64 = 4096;

/// Bytes in a capnp word.
pub(crate) const WORD: u64 = 8;

/// [`WORD`] as a `usize`, for lengths of memory.
pub(crate) const WORD_BYTES: usize = 8;

/// Flag in [`Header::flags`] and in the hello: the region is a sealed memfd.
pub(crate) const FLAG_SEALED: u32 = 1;

/// Flag in the hello only: this end offers no region and asks for the
/// stream transport (no descriptor travels with the hello).
pub(crate) const FLAG_STREAM: u32 = 2;

/// The low bits of `rx_sleeping` and `tx_sleeping`: how the owner sleeps
/// ([`AWAKE`], [`SLEEPING_ON_FUTEX`], [`SLEEPING_ON_SOCKET`]). The bits
/// above hold the low 30 bits of the peer counter value the owner sleeps
/// on, so that the waker wakes each sleep once (see `wake.rs`).
pub(crate) const SLEEP_MODE: u32 = 3;
/// `rx_sleeping`: the owner is not asleep.
pub(crate) const AWAKE: u32 = 0;
/// `rx_sleeping`: the owner sleeps on the peer's `published` futex.
pub(crate) const SLEEPING_ON_FUTEX: u32 = 1;
/// `rx_sleeping`: the owner sleeps in `poll` on the socket; wake it with a
/// [`DOORBELL`] byte (and a futex wake, which costs nothing extra).
pub(crate) const SLEEPING_ON_SOCKET: u32 = 2;
/// The one byte either end may write to the socket after the handshake.
pub(crate) const DOORBELL: u8 = 0xDB;

/// A value alone on a 128-byte line, so that fields written by different
/// processes (or at different rates) never share a cache line. 128 rather
/// than 64 because adjacent-line prefetch pairs lines on x86.
#[repr(C, align(128))]
#[derive(Debug)]
pub(crate) struct Line<T>(pub(crate) T);

/// Written once by the owner before the hello is sent; the peer checks it
/// against the hello.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct Header {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) flags: AtomicU32,
    pub(crate) region_size: AtomicU64,
    pub(crate) ring_capacity: AtomicU32,
    pub(crate) held_capacity: AtomicU32,
}

/// The control block at offset 0 of every region.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct ControlBlock<W = AtomicU32> {
    pub(crate) header: Line<Header>,
    /// Messages the owner has published (wrapping). A futex word: the peer's
    /// receiver sleeps on it.
    pub(crate) published: Line<W>,
    /// Peer messages the owner has taken from the peer's descriptor ring.
    pub(crate) consumed: Line<W>,
    /// Entries the owner has appended to its release ring (wrapping). A futex
    /// word: the peer's blocked sender sleeps on it (and is woken on it,
    /// unchanged, when its descriptor ring was full and the owner took a
    /// message; see `recv.rs`).
    pub(crate) released: Line<W>,
    /// How the owner waits for the peer's messages: [`AWAKE`],
    /// [`SLEEPING_ON_FUTEX`] (on the peer's `published`, alone or with other
    /// channels through `futex_waitv`), or [`SLEEPING_ON_SOCKET`] (in `poll`
    /// on the socket: the peer must also write a [`DOORBELL`] byte).
    pub(crate) rx_sleeping: Line<W>,
    /// Non-zero while the owner sleeps (or is about to) on the peer's `released`.
    pub(crate) tx_sleeping: Line<W>,
    /// Non-zero once the owner has closed its end. Set after its last publish.
    pub(crate) closed: Line<W>,
    /// The id of the process that owns this end (0: nobody yet), claimed by
    /// compare-and-swap on first use. Only the processes that share this
    /// end's mapping after a `fork` read it; the peer never does.
    pub(crate) owner: Line<W>,
}

/// One message in the descriptor ring: 128 bytes, a line pair of its own
/// (see [`Line`]), so that the sender writing one entry never takes a line
/// from the receiver reading the one before. A message of one segment of
/// up to [`CARRIED_WORDS`] words travels *in* its entry ([`carried`]):
/// the receiver copies it out and the entry is the only memory it
/// touches, with no release to send back. Anything larger is described
/// here and read where it lies. How the fields encode a message is
/// `ring.rs`'s business (`Descriptor`).
///
/// [`carried`]: DescriptorEntry::carried
#[repr(C)]
#[derive(Debug)]
pub(crate) struct DescriptorEntry<W: Word = AtomicU32> {
    /// The message's sequence number plus one (wrapping), stored last: the
    /// entry of message `n` is complete once this reads `n + 1`.
    pub(crate) tag: W,
    /// `slot | seg_count << 16`: the sender's private token for the message
    /// (echoed back on release; below 2^16 as rings are at most 2^16) and the
    /// number of segments, 1..=MAX_SEGMENTS.
    pub(crate) slot_count: W,
    /// Word offset in the data area of the segment, or of the table, or
    /// [`CARRIED_OFFSET`].
    pub(crate) offset: W,
    /// Length in words of the segment, or of the table.
    pub(crate) len: W,
    /// A carried segment's bytes, as little-endian 64-bit words (the
    /// bytes in order): the first `len` hold it; the rest are left as
    /// earlier messages wrote them, and read by no one. The first
    /// [`SECOND_LINE_PAIR`] share the first 64-byte line with the tag, so
    /// a message of that many words or fewer (an answer, an
    /// acknowledgement) writes one line, and the receiver, which keeps
    /// the second line of the entry it waits on cached, takes one line
    /// from the sender rather than two.
    pub(crate) carried: [W::Pair; CARRIED_WORDS],
}

/// One released message in the release ring: which peer message the owner
/// has dropped.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct ReleaseEntry<W = AtomicU32> {
    pub(crate) slot: W,
    pub(crate) seq: W,
}

const _: () = {
    assert!(size_of::<Line<AtomicU32>>() == 128);
    assert!(size_of::<Header>() == 32);
    assert!(size_of::<ControlBlock>() == 8 * 128);
    assert!(size_of::<ControlBlock>() as u64 <= CONTROL_BYTES);
    assert!(std::mem::offset_of!(ControlBlock, published) == 128);
    assert!(std::mem::offset_of!(ControlBlock, consumed) == 256);
    assert!(std::mem::offset_of!(ControlBlock, released) == 384);
    assert!(std::mem::offset_of!(ControlBlock, rx_sleeping) == 512);
    assert!(std::mem::offset_of!(ControlBlock, tx_sleeping) == 640);
    assert!(std::mem::offset_of!(ControlBlock, closed) == 768);
    assert!(std::mem::offset_of!(ControlBlock, owner) == 896);
    assert!(size_of::<DescriptorEntry>() == 128);
    assert!(std::mem::offset_of!(DescriptorEntry, offset) == 8);
    assert!(std::mem::offset_of!(DescriptorEntry, carried) == 16);
    assert!(16 + SECOND_LINE_PAIR * 8 == 64);
    assert!(CARRIED_OFFSET as u64 >= MAX_REGION / WORD);
    assert!(MAX_RING <= 1 << 16 && MAX_SEGMENTS < 1 << 16);
    assert!(size_of::<ReleaseEntry>() == 8);
    assert!(CONTROL_BYTES % 128 == 0);
};

/// The shape of one region, as announced in the hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Total bytes, a multiple of [`DATA_ALIGN`].
    pub(crate) region_size: u64,
    /// Descriptor ring entries: the most messages published and not yet
    /// taken by the peer. A power of two.
    pub(crate) ring_capacity: u32,
    /// Release ring entries: the most of the *peer's* messages the owner
    /// may hold (taken or not, not yet released). A power of two.
    pub(crate) held_capacity: u32,
}

impl Geometry {
    /// Checks that the geometry describes a usable region: ring capacities
    /// powers of two in range, size a multiple of [`DATA_ALIGN`], at most
    /// [`MAX_REGION`], and room for a data area of at least [`MIN_DATA`].
    pub(crate) fn validate(self) -> Result<Geometry, ProtocolError> {
        let bad = ProtocolError::BadGeometry {
            region_size: self.region_size,
            ring_capacity: self.ring_capacity,
        };
        let in_range = |c: u32| c.is_power_of_two() && (MIN_RING..=MAX_RING).contains(&c);
        if !in_range(self.ring_capacity)
            || !in_range(self.held_capacity)
            || self.region_size % DATA_ALIGN != 0
            || self.region_size > MAX_REGION
        {
            return Err(bad);
        }
        // ring_capacity <= 2^16, so this cannot overflow.
        if self.data_offset() + MIN_DATA > self.region_size {
            return Err(bad);
        }
        Ok(self)
    }

    /// Byte offset of the descriptor ring.
    pub(crate) fn descriptors_offset(self) -> u64 {
        CONTROL_BYTES
    }

    /// Byte offset of the release ring.
    pub(crate) fn releases_offset(self) -> u64 {
        CONTROL_BYTES + u64::from(self.ring_capacity) * size_of::<DescriptorEntry>() as u64
    }

    /// Byte offset of the data area.
    pub(crate) fn data_offset(self) -> u64 {
        let end = self.releases_offset()
            + u64::from(self.held_capacity) * size_of::<ReleaseEntry>() as u64;
        end.next_multiple_of(DATA_ALIGN)
    }

    /// Size of the data area in words, for a validated geometry (whose
    /// data area is at most [`MAX_REGION`] bytes, 2^31 words).
    pub(crate) fn data_words(self) -> u32 {
        let words = self.region_size.saturating_sub(self.data_offset()) / WORD;
        debug_assert!(words <= MAX_REGION / WORD, "geometry not validated");
        // MAX_REGION / WORD = 2^31 fits; an unvalidated geometry is a bug,
        // and zero words make every extent out of bounds.
        u32::try_from(words).unwrap_or(0)
    }

    /// The descriptor ring index of sequence number `seq`.
    pub(crate) fn ring_index(self, seq: u32) -> u32 {
        seq & (self.ring_capacity - 1)
    }

    /// The release ring index of release number `n`.
    pub(crate) fn release_index(self, n: u32) -> u32 {
        n & (self.held_capacity - 1)
    }

    /// The smallest region (rounded up to [`DATA_ALIGN`]) with these ring
    /// capacities and a data area of at least `data_bytes`.
    pub(crate) fn region_for(ring_capacity: u32, held_capacity: u32, data_bytes: u64) -> u64 {
        let probe = Geometry {
            region_size: 0,
            ring_capacity,
            held_capacity,
        };
        probe.data_offset() + data_bytes.next_multiple_of(DATA_ALIGN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(region_size: u64, ring_capacity: u32) -> Geometry {
        Geometry {
            region_size,
            ring_capacity,
            held_capacity: ring_capacity.max(1),
        }
    }

    #[test]
    fn offsets_follow_the_documented_layout() {
        let g = geo(1 << 20, 256).validate().unwrap();
        assert_eq!(g.descriptors_offset(), 1024);
        assert_eq!(g.releases_offset(), 1024 + 256 * 128);
        assert_eq!(
            g.data_offset(),
            (1024 + 256 * 136u64).next_multiple_of(4096)
        );
        assert_eq!(u64::from(g.data_words()) * 8, (1 << 20) - g.data_offset());
        assert_eq!(g.ring_index(257), 1);
        let g = Geometry {
            held_capacity: 1024,
            ..g
        };
        assert_eq!(
            g.data_offset(),
            (1024 + 256 * 128 + 1024 * 8u64).next_multiple_of(4096)
        );
        assert_eq!(g.release_index(1025), 1);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(geo(1 << 20, 0).validate().is_err());
        assert!(geo(1 << 20, 3).validate().is_err());
        assert!(geo(1 << 20, MAX_RING * 2).validate().is_err());
        assert!(geo((1 << 20) + 1, 4).validate().is_err());
        assert!(geo(0, 4).validate().is_err());
        assert!(geo(4096, 4).validate().is_err(), "no room for data");
        assert!(geo(MAX_REGION + DATA_ALIGN, 4).validate().is_err());
        assert!(geo(MAX_REGION, MAX_RING).validate().is_ok());
        assert!(geo(8192, 1).validate().is_ok());
    }

    #[test]
    fn data_words_fit_u32_at_the_largest_region() {
        let g = geo(MAX_REGION, 1).validate().unwrap();
        assert!(u64::from(g.data_words()) * 8 + g.data_offset() == MAX_REGION);
    }

    #[test]
    fn region_for_gives_room_for_the_data() {
        let size = Geometry::region_for(64, 64, 10_000);
        let g = geo(size, 64).validate().unwrap();
        assert!(u64::from(g.data_words()) * 8 >= 10_000);
    }
}
