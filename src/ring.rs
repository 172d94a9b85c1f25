//! The protocol's two rings, each with its producer and consumer halves
//! side by side, and the encoding of their entries.
//!
//! - The **descriptor ring** lies in the sender's region. Its producer
//!   ([`DescriptorProducer`], the sending side) describes each message in an
//!   entry and counts them in `published`; its consumer
//!   ([`DescriptorConsumer`], the peer's receiving side) takes them in order,
//!   validates each into a private [`SegmentTable`] and counts them in its
//!   own `consumed`.
//! - The **release ring** lies in the receiver's region. Its producer
//!   ([`ReleaseProducer`], the receiving side) appends `(slot, seq)` for each
//!   message it has dropped and counts them in `released`; its consumer
//!   ([`ReleaseConsumer`], the peer's sending side) validates each release
//!   against the messages in flight before the sender reuses the space.
//!
//! Each half owns its cursor (a `Cell`: one thread of this process writes
//! it) and, where it pays, a cached copy of the other side's counter that it
//! refreshes only when the cache runs out (rtrb's shape). Counters wrap at
//! 2^32; every comparison is a wrapping distance. Waking a sleeping peer
//! after a store is `wait.rs`'s business.
//!
//! # Notes about memory ordering
//!
//! Loads from the peer's region are `Relaxed` (it is mapped read-only; see
//! `word.rs`), each followed by an `Acquire` fence where it must see what the
//! peer wrote before.
//!
//! - **Descriptors.** The producer writes the message bytes and the entry's
//!   other words, then stores the tag with `Release`, then `published` with
//!   `Release`. The consumer loads the tag and, when it is the expected one,
//!   fences `Acquire`: that pairs with the tag's `Release`, so the entry and
//!   the bytes are visible. When the tag is not there yet it loads
//!   `published` (and fences) to tell "not yet" from "broken": after that
//!   fence every tag stored before the counter is visible, so a counter that
//!   covers the message with the tag still missing is a protocol error.
//!   Because the tag comes first, `published` may trail the messages the
//!   consumer has taken by one (the tag seen, the counter not yet).
//! - **Releases.** The producer writes the entry, then stores `released` with
//!   `Release`: that orders the entry, and every read of the released
//!   message, before the count. The consumer loads `released`, fences
//!   `Acquire`, then reads the entries; only then does the sender zero and
//!   reuse the words the peer has finished reading.
//! - `consumed` is stored with `Release` by the consumer after each take,
//!   before it can release that message; the release consumer loads it after
//!   its fence on `released`, so it sees at least every take that preceded
//!   a release it reads.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use crate::error::ProtocolError;
use crate::fault::{self, Fault};
use crate::layout::{INLINE_SEGMENTS, MAX_RING, MAX_SEGMENTS};
use crate::region::{Extent, OwnRegion, PeerRegion};
use crate::word::Word;

// ---- the descriptor entry ------------------------------------------------------

/// What a descriptor entry says about one message: the sender's slot, the
/// number of segments, and either the one segment (inline) or, with more
/// segments, the out-of-line table (`count` words in the data area, one per
/// segment, see [`table_word`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) slot: u32,
    pub(crate) count: u32,
    /// The segment, or the table.
    pub(crate) extent: Extent,
}

impl Descriptor {
    /// `slot_count`: the slot below 2^16 (rings hold at most 2^16), the
    /// segment count above.
    fn slot_count(self) -> u32 {
        debug_assert!(self.slot < MAX_RING && self.count >= 1 && self.count <= MAX_SEGMENTS);
        (self.slot & 0xffff) | (self.count << 16)
    }

    fn from_words(slot_count: u32, offset: u32, len: u32) -> Descriptor {
        Descriptor {
            slot: slot_count & 0xffff,
            count: slot_count >> 16,
            extent: Extent { start: offset, len },
        }
    }
}

/// The tag that marks the entry of message `seq` complete: `seq + 1`, so
/// that a fresh, zeroed ring holds no message 0.
fn tag(seq: u32) -> u32 {
    seq.wrapping_add(1)
}

/// One word of an out-of-line segment table: `offset | len << 32`.
pub(crate) fn table_word(segment: Extent) -> u64 {
    u64::from(segment.start) | (u64::from(segment.len) << 32)
}

/// The segment a table word describes (unchecked).
fn table_extent(word: u64) -> Extent {
    let [a, b, c, d, e, f, g, h] = word.to_le_bytes();
    Extent {
        start: u32::from_le_bytes([a, b, c, d]),
        len: u32::from_le_bytes([e, f, g, h]),
    }
}

/// Whether a message of `count` segments needs an out-of-line table.
pub(crate) fn needs_table(count: usize) -> bool {
    count > INLINE_SEGMENTS
}

/// A message's segments, copied out of the shared descriptor and validated:
/// every extent lies inside the peer's data area, and together they fit in
/// it. Up to [`INLINE_SEGMENTS`] live inline (no allocation).
#[derive(Debug, Clone)]
pub(crate) struct SegmentTable {
    count: u32,
    inline: [Extent; INLINE_SEGMENTS],
    more: Vec<Extent>,
}

impl SegmentTable {
    /// Number of segments.
    pub(crate) fn len(&self) -> u32 {
        self.count
    }

    /// Segment `i`.
    pub(crate) fn get(&self, i: u32) -> Option<Extent> {
        if i >= self.count {
            return None;
        }
        let i = i as usize;
        if self.more.is_empty() {
            self.inline.get(i).copied()
        } else {
            self.more.get(i).copied()
        }
    }

    /// Total words in all segments.
    pub(crate) fn words(&self) -> u64 {
        (0..self.count)
            .filter_map(|i| self.get(i))
            .map(|e| u64::from(e.len))
            .sum()
    }

    /// Validates the segments a descriptor describes. `data_words` is the
    /// size of the data area; `read_word` reads a word of it (for
    /// out-of-line tables). Pure apart from those reads, so it is tested and
    /// fuzzed alone.
    pub(crate) fn read(
        count: u32,
        first: Extent,
        data_words: u32,
        mut read_word: impl FnMut(u32) -> Option<u64>,
    ) -> Result<SegmentTable, ProtocolError> {
        if count == 0 || count > MAX_SEGMENTS {
            return Err(ProtocolError::BadSegmentCount { count });
        }
        let check = |e: Extent| {
            if u64::from(e.start) + u64::from(e.len) <= u64::from(data_words) {
                Ok(e)
            } else {
                Err(ProtocolError::SegmentOutOfBounds {
                    offset: e.start,
                    len: e.len,
                })
            }
        };
        let mut table = SegmentTable {
            count,
            inline: [Extent { start: 0, len: 0 }; INLINE_SEGMENTS],
            more: Vec::new(),
        };
        if !needs_table(count as usize) {
            table.inline[0] = check(first)?;
        } else {
            let out_of_bounds = ProtocolError::SegmentOutOfBounds {
                offset: first.start,
                len: first.len,
            };
            if first.len != count {
                return Err(out_of_bounds);
            }
            let t = check(first)?;
            table.more.reserve_exact(count as usize);
            for i in 0..count {
                // t.start + i < t.end() <= data_words: no overflow.
                let word = read_word(t.start + i).ok_or(out_of_bounds)?;
                table.more.push(check(table_extent(word))?);
            }
        }
        // An honest sender's segments never overlap, so together they fit
        // in the data area. Checking it bounds what a copy of the message
        // may cost (a hostile table could name the whole area 512 times).
        let words = table.words();
        if words > u64::from(data_words) {
            return Err(ProtocolError::SegmentsExceedArea { words, data_words });
        }
        Ok(table)
    }
}

// ---- the descriptor ring: producer ----------------------------------------------

/// The sending side's half of its own descriptor ring.
#[derive(Debug)]
pub(crate) struct DescriptorProducer {
    /// Messages published so far (wrapping); equals our `published` counter.
    published: Cell<u32>,
}

impl DescriptorProducer {
    /// A producer whose next message is number `start` (0 for a new
    /// channel; the model checker starts near the wrap).
    pub(crate) fn new(start: u32) -> DescriptorProducer {
        DescriptorProducer {
            published: Cell::new(start),
        }
    }

    /// Messages published so far (wrapping).
    pub(crate) fn published(&self) -> u32 {
        self.published.get()
    }

    /// Describes the next message, `d`, whose bytes (and table, if any) are
    /// written: the entry's words, the tag last. Returns the message's
    /// sequence number. The caller then makes it count with
    /// [`store_count`](Self::store_count), as the store half of waking the
    /// peer (`wake::wake_peer`).
    ///
    /// The caller keeps at most `ring_capacity` messages unreleased (every
    /// message holds a slot until released, and there are no more slots than
    /// entries), so the entry written here was released, hence taken, before.
    pub(crate) fn publish<W: Word>(&self, own: &OwnRegion<W>, d: Descriptor) -> u32 {
        let seq = self.published.get();
        let next = seq.wrapping_add(1);
        let entry = own.descriptor(seq);
        // Relaxed: published by the Release store of the tag.
        entry.slot_count.store(d.slot_count(), Ordering::Relaxed);
        entry.offset.store(d.extent.start, Ordering::Relaxed);
        entry.len.store(d.extent.len, Ordering::Relaxed);
        if fault::active(Fault::CounterBeforeTag) {
            own.published().store(next, Ordering::Release);
        }
        // Release, and last in the entry: the consumer takes the entry once
        // it sees the tag (module notes).
        entry.tag.store(tag(seq), Ordering::Release);
        self.published.set(next);
        seq
    }

    /// Stores `published`: every message described so far counts.
    pub(crate) fn store_count<W: Word>(&self, own: &OwnRegion<W>) {
        // Release: after the tags, so a consumer that sees the counter sees
        // them (module notes). The futex word the peer sleeps on.
        own.published()
            .store(self.published.get(), Ordering::Release);
    }
}

// ---- the descriptor ring: consumer ----------------------------------------------

/// One message taken from the peer's ring.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) slot: u32,
    pub(crate) seq: u32,
    pub(crate) table: SegmentTable,
}

/// The receiving side's half of the peer's descriptor ring.
#[derive(Debug)]
pub(crate) struct DescriptorConsumer {
    /// Peer messages taken so far (wrapping); equals our `consumed` counter.
    consumed: Cell<u32>,
    /// The peer's `published` counter as last loaded and validated. Messages
    /// below it are taken without loading the counter again: in a stream,
    /// that line is being rewritten by the peer, and each load is a miss.
    known_published: Cell<u32>,
}

impl DescriptorConsumer {
    /// A consumer whose next message is number `start`.
    pub(crate) fn new(start: u32) -> DescriptorConsumer {
        DescriptorConsumer {
            consumed: Cell::new(start),
            known_published: Cell::new(start),
        }
    }

    /// The sequence number of the next message to take.
    pub(crate) fn consumed(&self) -> u32 {
        self.consumed.get()
    }

    /// Whether a `published` value means nothing to take: equal to what we
    /// took, or trailing it by the one message whose tag we saw first.
    pub(crate) fn nothing_published(&self, published: u32) -> bool {
        let ahead = published.wrapping_sub(self.consumed.get());
        ahead == 0 || ahead == u32::MAX
    }

    /// Whether the next message's tag is there: the cheap check to spin on
    /// (no fence: [`take`](Self::take) loads it again and validates).
    pub(crate) fn next_ready<W: Word>(&self, peer: &PeerRegion<W>) -> bool {
        let seq = self.consumed.get();
        peer.descriptor(seq).tag.load() == tag(seq)
    }

    /// Messages the peer has published that we have not taken, validated
    /// against the ring capacity (a counter that went backwards shows up as a
    /// huge distance). Uses the cached counter while it covers the next
    /// message; otherwise loads `published` and fences `Acquire`.
    fn available<W: Word>(&self, peer: &PeerRegion<W>) -> Result<u32, ProtocolError> {
        let consumed = self.consumed.get();
        let capacity = peer.geometry().ring_capacity;
        let known = self.known_published.get().wrapping_sub(consumed);
        if known != 0 && known <= capacity {
            return Ok(known);
        }
        let published = peer.published().load();
        // Acquire: pairs with the peer's Release store of the counter, which
        // follows the tags of every message it counts (module notes).
        W::fence(Ordering::Acquire);
        let available = published.wrapping_sub(consumed);
        if available == u32::MAX {
            // One behind: we took the last message by its tag, and the peer
            // has not stored the counter for it yet (it does right after).
            return Ok(0);
        }
        if available > capacity {
            return Err(ProtocolError::PublishedOutOfRange {
                consumed,
                published,
            });
        }
        self.known_published.set(published);
        Ok(available)
    }

    /// Takes the next message, if the peer has published one, and stores
    /// our `consumed` counter.
    pub(crate) fn take<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        own: &OwnRegion<W>,
    ) -> Result<Option<Taken>, ProtocolError> {
        let seq = self.consumed.get();
        let entry = peer.descriptor(seq);
        if entry.tag.load() != tag(seq) {
            // Not there yet, or the peer wrote it wrongly: `published` decides.
            if self.available(peer)? == 0 {
                return Ok(None);
            }
            // After available()'s fence: the tag of a counted message is
            // visible, so anything else is the peer's mistake.
            let found = entry.tag.load();
            if found != tag(seq) {
                return Err(ProtocolError::DescriptorSequence {
                    expected: seq,
                    found: found.wrapping_sub(1),
                });
            }
        }
        // Acquire: pairs with the producer's Release store of the tag, after
        // the rest of the entry and the message bytes.
        W::fence(Ordering::Acquire);
        let d = Descriptor::from_words(
            entry.slot_count.load(),
            entry.offset.load(),
            entry.len.load(),
        );
        let table = SegmentTable::read(d.count, d.extent, peer.geometry().data_words(), |w| {
            peer.read_word(w)
        })?;
        let next = seq.wrapping_add(1);
        self.consumed.set(next);
        // Release: the peer reads it to validate releases, which come after.
        own.consumed().store(next, Ordering::Release);
        Ok(Some(Taken {
            slot: d.slot,
            seq,
            table,
        }))
    }
}

// ---- the release ring: producer -------------------------------------------------

/// The receiving side's half of its own release ring.
#[derive(Debug)]
pub(crate) struct ReleaseProducer {
    /// Release entries written so far (wrapping); equals our `released`.
    released: Cell<u32>,
}

impl ReleaseProducer {
    /// A producer whose next release is number `start`.
    pub(crate) fn new(start: u32) -> ReleaseProducer {
        ReleaseProducer {
            released: Cell::new(start),
        }
    }

    /// Tells the peer we are done with its message `(slot, seq)`: writes
    /// the entry. The caller then makes it count with
    /// [`store_count`](Self::store_count), as the store half of waking the
    /// peer (`wake::wake_peer`).
    ///
    /// The peer keeps at most `ring_capacity` (ours) messages in flight, and
    /// each is released once, so the entry written here was read before.
    pub(crate) fn release<W: Word>(&self, own: &OwnRegion<W>, slot: u32, seq: u32) {
        let n = self.released.get();
        let entry = own.release_entry(n);
        // Relaxed: published by the Release store of the counter.
        entry.slot.store(slot, Ordering::Relaxed);
        entry.seq.store(seq, Ordering::Relaxed);
        self.released.set(n.wrapping_add(1));
    }

    /// Stores `released`: every release written so far counts.
    pub(crate) fn store_count<W: Word>(&self, own: &OwnRegion<W>) {
        // Release: for the entries, and for every read of the messages we
        // finished, before the peer zeroes and reuses their words.
        own.released().store(self.released.get(), Ordering::Release);
    }
}

// ---- the release ring: consumer -------------------------------------------------

/// The sending side's half of the peer's release ring.
#[derive(Debug)]
pub(crate) struct ReleaseConsumer {
    /// Peer release entries read so far (wrapping).
    reclaimed: Cell<u32>,
    /// The peer's `consumed` counter as last validated.
    peer_consumed: Cell<u32>,
}

/// One validated release: the peer has taken message `seq` and is done
/// with it. Whether `slot` holds that message is for the sender's books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Release {
    pub(crate) slot: u32,
    pub(crate) seq: u32,
}

impl ReleaseConsumer {
    /// A consumer whose next release is number `start`, of a sender whose
    /// next message is `start` as well (nothing in flight).
    pub(crate) fn new(start: u32) -> ReleaseConsumer {
        ReleaseConsumer {
            reclaimed: Cell::new(start),
            peer_consumed: Cell::new(start),
        }
    }

    /// Releases read so far: the value of the peer's `released` counter
    /// while nothing new is there (what a blocked sender sleeps on).
    pub(crate) fn reclaimed(&self) -> u32 {
        self.reclaimed.get()
    }

    /// Whether the peer has released messages we have not read yet: a hint
    /// (no fence; [`reclaim`](Self::reclaim) loads again).
    pub(crate) fn pending<W: Word>(&self, peer: &PeerRegion<W>) -> bool {
        peer.released().load() != self.reclaimed.get()
    }

    /// Reads the peer's new releases and hands each to `apply`, in order.
    /// Returns how many were read.
    ///
    /// `published` is our producer's count and `in_flight` the messages sent
    /// and not yet released. Every release is validated: the counter may
    /// advance by at most `in_flight`, and each entry must name a message
    /// the peer has consumed; `apply` checks that the slot holds it.
    pub(crate) fn reclaim<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        published: u32,
        in_flight: u32,
        mut apply: impl FnMut(Release) -> Result<(), ProtocolError>,
    ) -> Result<u32, ProtocolError> {
        let reclaimed = self.reclaimed.get();
        let released = peer.released().load();
        let pending = released.wrapping_sub(reclaimed);
        if pending == 0 {
            return Ok(0);
        }
        // Acquire: pairs with the peer's Release store of the counter after
        // it wrote the entries and finished reading the messages they name.
        W::fence(Ordering::Acquire);
        if pending > in_flight {
            return Err(ProtocolError::ReleasedOutOfRange {
                seen: reclaimed,
                released,
            });
        }
        let unconsumed = self.check_peer_consumed(peer, published)?;
        for _ in 0..pending {
            let entry = peer.release_entry(self.reclaimed.get());
            let release = Release {
                slot: entry.slot.load(),
                seq: entry.seq.load(),
            };
            // Consumed means: among the messages the peer has taken, i.e.
            // further back from `published` than the unconsumed ones.
            if published.wrapping_sub(release.seq) <= unconsumed {
                return Err(ProtocolError::BadRelease {
                    slot: release.slot,
                    seq: release.seq,
                });
            }
            apply(release)?;
            self.reclaimed.set(self.reclaimed.get().wrapping_add(1));
        }
        Ok(pending)
    }

    /// Loads and validates the peer's `consumed` counter (after the caller's
    /// fence): it never goes backwards and never passes `published`. Returns
    /// how many published messages the peer has not taken yet.
    fn check_peer_consumed<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        published: u32,
    ) -> Result<u32, ProtocolError> {
        let consumed = peer.consumed().load();
        let before = published.wrapping_sub(self.peer_consumed.get());
        let now = published.wrapping_sub(consumed);
        if now > before {
            return Err(ProtocolError::ConsumedOutOfRange { consumed });
        }
        self.peer_consumed.set(consumed);
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u32, len: u32) -> Extent {
        Extent { start, len }
    }

    fn no_words(_: u32) -> Option<u64> {
        None
    }

    /// Reads words of a table stored at word 50.
    fn table_at_50(words: &[u64]) -> impl Fn(u32) -> Option<u64> + Copy + '_ {
        move |w| words.get(w.checked_sub(50)? as usize).copied()
    }

    fn pair(offset: u32, len: u32) -> u64 {
        table_word(ext(offset, len))
    }

    #[test]
    fn descriptor_words_round_trip() {
        let d = Descriptor {
            slot: 65_535,
            count: MAX_SEGMENTS,
            extent: ext(7, 9),
        };
        assert_eq!(Descriptor::from_words(d.slot_count(), 7, 9), d);
        assert_eq!(table_extent(table_word(ext(u32::MAX, 3))), ext(u32::MAX, 3));
        assert_eq!(tag(u32::MAX), 0);
    }

    #[test]
    fn inline_segment() {
        let t = SegmentTable::read(1, ext(10, 6), 100, no_words).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(0), Some(ext(10, 6)));
        assert_eq!(t.get(1), None);
        assert_eq!(t.words(), 6);
    }

    #[test]
    fn rejects_bad_counts_and_bounds() {
        assert_eq!(
            SegmentTable::read(0, ext(0, 0), 100, no_words).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 0 }
        );
        assert_eq!(
            SegmentTable::read(513, ext(0, 0), 100, no_words).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 513 }
        );
        assert_eq!(
            SegmentTable::read(1, ext(96, 5), 100, no_words).unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 96, len: 5 }
        );
        // offset + length overflowing u32
        assert!(SegmentTable::read(1, ext(u32::MAX, 2), u32::MAX, no_words).is_err());
        assert!(SegmentTable::read(1, ext(100, 0), 100, no_words).is_ok());
        // Each in bounds, together more than the area: overlapping.
        let words = [pair(0, 40), pair(10, 40), pair(0, 41)];
        assert_eq!(
            SegmentTable::read(3, ext(50, 3), 100, table_at_50(&words)).unwrap_err(),
            ProtocolError::SegmentsExceedArea {
                words: 121,
                data_words: 100
            }
        );
    }

    #[test]
    fn out_of_line_table() {
        let words: Vec<u64> = (0..8u32).map(|i| pair(i * 5, 5)).collect();
        let read = table_at_50(&words);
        let t = SegmentTable::read(8, ext(50, 8), 100, read).unwrap();
        assert_eq!(t.len(), 8);
        assert_eq!(t.get(7), Some(ext(35, 5)));
        // The table must be as long as the count, and in bounds.
        assert!(SegmentTable::read(8, ext(50, 7), 100, read).is_err());
        assert!(SegmentTable::read(8, ext(95, 8), 100, read).is_err());
        // An entry out of bounds.
        let bad = |w: u32| Some(if w == 53 { pair(99, 5) } else { pair(w, 1) });
        assert_eq!(
            SegmentTable::read(8, ext(50, 8), 100, bad).unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 99, len: 5 }
        );
    }

    /// Deterministic sweep: whatever the descriptor holds, the table either
    /// is rejected or describes only extents inside the data area.
    #[test]
    fn random_descriptors_stay_in_bounds() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let data_words = 4096;
        for _ in 0..50_000 {
            let small = |v: u64| u32::try_from(v % 5000).unwrap();
            let count = small(next()) % 600;
            let first = ext(small(next()), small(next()) % 64);
            let fill = next();
            let read = |w: u32| (w < data_words).then(|| fill.rotate_left(w) % (1 << 40));
            if let Ok(t) = SegmentTable::read(count, first, data_words, read) {
                assert!((1..=MAX_SEGMENTS).contains(&t.len()));
                assert!(t.words() <= u64::from(data_words));
                for i in 0..t.len() {
                    let e = t.get(i).unwrap();
                    assert!(u64::from(e.start) + u64::from(e.len) <= u64::from(data_words));
                }
            }
        }
    }
}
