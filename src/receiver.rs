//! The receiving side: taking descriptors from the peer's ring, validating
//! them into a private segment table, and releasing messages.
//!
//! # Notes about memory ordering
//!
//! - `take` loads the descriptor's tag with `Acquire`, pairing with the
//!   peer's Release store of the tag after it wrote the rest of the entry and
//!   the message: the descriptor, table and bytes are then visible. When the
//!   tag is not there, it loads `published` with `Acquire` (pairing with the
//!   peer's `SeqCst` store after the tag) to tell "not yet" from "broken".
//! - `release` writes the entry, then stores `released` with `SeqCst`
//!   (Release for the entry and for every read of the message we finished,
//!   so the peer may zero the words; SeqCst for the Dekker pair with the
//!   peer's `tx_sleeping`, see channel.rs).

use std::cell::Cell;
use std::sync::atomic::Ordering;

use crate::error::ProtocolError;
use crate::layout::{DescriptorEntry, INLINE_SEGMENTS, MAX_SEGMENTS};
use crate::region::{Extent, InRegion, Region};
use crate::sys::futex;

/// A message's segments, copied out of the shared descriptor and validated:
/// every extent lies inside the peer's data area. Up to
/// [`INLINE_SEGMENTS`] live inline (no allocation).
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

    /// Reads and validates the segment table of `entry`. `data_words` is the
    /// size of the data area; `read_word` reads a word of it (for out-of-line
    /// tables). Pure apart from those reads, so it is tested and fuzzed alone.
    pub(crate) fn read(
        count: u32,
        inline: [[u32; 2]; INLINE_SEGMENTS],
        data_words: u32,
        mut read_word: impl FnMut(u32) -> Option<u64>,
    ) -> Result<SegmentTable, ProtocolError> {
        if count == 0 || count > MAX_SEGMENTS {
            return Err(ProtocolError::BadSegmentCount { count });
        }
        let check = |start: u32, len: u32| {
            if u64::from(start) + u64::from(len) <= u64::from(data_words) {
                Ok(Extent { start, len })
            } else {
                Err(ProtocolError::SegmentOutOfBounds { offset: start, len })
            }
        };
        let mut table = SegmentTable {
            count,
            inline: [Extent { start: 0, len: 0 }; INLINE_SEGMENTS],
            more: Vec::new(),
        };
        if count as usize <= INLINE_SEGMENTS {
            for (slot, pair) in table.inline.iter_mut().zip(&inline).take(count as usize) {
                *slot = check(pair[0], pair[1])?;
            }
        } else {
            let [start, len] = inline[0];
            if len != count {
                return Err(ProtocolError::SegmentOutOfBounds { offset: start, len });
            }
            let t = check(start, len)?;
            table.more.reserve_exact(count as usize);
            for i in 0..count {
                let word = read_word(t.start + i).ok_or(ProtocolError::SegmentOutOfBounds {
                    offset: t.start,
                    len: t.len,
                })?;
                let lo = u32::try_from(word & 0xffff_ffff).unwrap_or(u32::MAX);
                let hi = u32::try_from(word >> 32).unwrap_or(u32::MAX);
                table.more.push(check(lo, hi)?);
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

/// One message taken from the ring.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) slot: u32,
    pub(crate) seq: u32,
    pub(crate) table: SegmentTable,
}

/// The receiver's counters. Plain cells: only this process writes them, and
/// the shared copies are stored after each change.
#[derive(Debug, Default)]
pub(crate) struct RxBook {
    /// Peer messages taken so far (wrapping).
    consumed: Cell<u32>,
    /// The peer's `published` counter as last loaded and validated. Messages
    /// below it are taken without loading the counter again: in a stream,
    /// that line is being rewritten by the peer, and each load is a miss.
    known_published: Cell<u32>,
    /// Release entries written so far (wrapping).
    released: Cell<u32>,
}

impl RxBook {
    /// Messages the peer has published that we have not taken, validated
    /// against the ring capacity (a counter that went backwards shows up as a
    /// huge distance). The counter may trail `consumed` by one: the peer
    /// stores it just after the descriptor tag we may already have seen.
    pub(crate) fn available(&self, peer: &Region) -> Result<u32, ProtocolError> {
        let consumed = self.consumed.get();
        // Messages taken by their tag alone move `consumed` past the cached
        // counter; a distance beyond the ring means the cache is stale.
        let known = self.known_published.get().wrapping_sub(consumed);
        if known != 0 && known <= peer.geometry().ring_capacity {
            return Ok(known);
        }
        // Acquire: see the module notes.
        let published = peer.control().published.0.load(Ordering::Acquire);
        let available = published.wrapping_sub(consumed);
        if available == u32::MAX {
            // One behind: we took the last message by its tag, and the peer
            // has not stored the counter for it yet (it does right after).
            return Ok(0);
        }
        if available > peer.geometry().ring_capacity {
            return Err(ProtocolError::PublishedOutOfRange {
                consumed,
                published,
            });
        }
        self.known_published.set(published);
        Ok(available)
    }

    /// The sequence number of the next message to take; the value of the
    /// peer's `published` counter while nothing is waiting.
    pub(crate) fn consumed(&self) -> u32 {
        self.consumed.get()
    }

    /// Whether a `published` value means nothing to take: equal to what we
    /// took, or trailing it by the one message whose tag we saw first.
    pub(crate) fn nothing_published(&self, published: u32) -> bool {
        let ahead = published.wrapping_sub(self.consumed.get());
        ahead == 0 || ahead == u32::MAX
    }

    /// Whether the next message's descriptor looks complete: the cheap check
    /// to spin on. `take` validates what it finds.
    pub(crate) fn next_ready(&self, peer: &Region) -> bool {
        let seq = self.consumed.get();
        // Relaxed: only a hint; `take` loads it again with Acquire.
        peer.descriptor(seq).seq.load(Ordering::Relaxed) == DescriptorEntry::tag(seq)
    }

    /// Takes the next message, if the peer has published one.
    pub(crate) fn take(
        &self,
        peer: &InRegion,
        mine: &Region,
    ) -> Result<Option<Taken>, ProtocolError> {
        let region = peer.region();
        let seq = self.consumed.get();
        let entry: &DescriptorEntry = region.descriptor(seq);
        // Acquire: pairs with the sender's Release store of the tag, after
        // the rest of the entry and the message. It also keeps `published`
        // within one of `consumed`: the sender stores the counter for an
        // earlier message before this tag, so it is visible now (a Relaxed
        // load here could make an honest peer look out of range).
        if entry.seq.load(Ordering::Acquire) != DescriptorEntry::tag(seq) {
            // Not there yet, or the peer wrote it wrongly: `published` decides.
            if self.available(region)? == 0 {
                return Ok(None);
            }
            // Relaxed: ordered after the Acquire load of `published`.
            let found = entry.seq.load(Ordering::Relaxed);
            if found != DescriptorEntry::tag(seq) {
                return Err(ProtocolError::DescriptorSequence {
                    expected: seq,
                    found: found.wrapping_sub(1),
                });
            }
        }
        let (slot, count) = DescriptorEntry::unpack(entry.slot_count.load(Ordering::Relaxed));
        let inline = [[
            entry.offset.load(Ordering::Relaxed),
            entry.len.load(Ordering::Relaxed),
        ]];
        let table = SegmentTable::read(count, inline, region.geometry().data_words(), |w| {
            peer.read_word(w)
        })?;
        let next = seq.wrapping_add(1);
        self.consumed.set(next);
        // Release: the peer reads it only to validate releases.
        mine.control().consumed.0.store(next, Ordering::Release);
        Ok(Some(Taken { slot, seq, table }))
    }

    /// Tells the peer we are done with message `(slot, seq)`, and wakes it if
    /// it sleeps waiting for space.
    pub(crate) fn release(&self, mine: &Region, peer: &Region, slot: u32, seq: u32) {
        let n = self.released.get();
        let entry = mine.release_entry(n);
        // Relaxed: published by the SeqCst store of `released` below.
        entry.slot.store(slot, Ordering::Relaxed);
        entry.seq.store(seq, Ordering::Relaxed);
        let next = n.wrapping_add(1);
        self.released.set(next);
        let control = mine.control();
        // SeqCst: Release for the entry and our reads of the message; and the
        // store half of the Dekker pair with the peer's `tx_sleeping`.
        control.released.0.store(next, Ordering::SeqCst);
        if peer.control().tx_sleeping.0.load(Ordering::SeqCst) != 0 {
            futex::futex_wake(&control.released.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(pairs: &[[u32; 2]]) -> [[u32; 2]; INLINE_SEGMENTS] {
        let mut a = [[0; 2]; INLINE_SEGMENTS];
        a[..pairs.len()].copy_from_slice(pairs);
        a
    }

    fn no_words(_: u32) -> Option<u64> {
        None
    }

    /// Reads words of a table stored at word 50.
    fn table_at_50(words: &[u64]) -> impl Fn(u32) -> Option<u64> + Copy + '_ {
        move |w| words.get(w.checked_sub(50)? as usize).copied()
    }

    fn pair(offset: u32, len: u32) -> u64 {
        u64::from(offset) | (u64::from(len) << 32)
    }

    #[test]
    fn inline_segment() {
        let t = SegmentTable::read(1, inline(&[[10, 6]]), 100, no_words).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(0), Some(Extent { start: 10, len: 6 }));
        assert_eq!(t.get(1), None);
        assert_eq!(t.words(), 6);
    }

    #[test]
    fn rejects_bad_counts_and_bounds() {
        assert_eq!(
            SegmentTable::read(0, inline(&[]), 100, no_words).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 0 }
        );
        assert_eq!(
            SegmentTable::read(513, inline(&[]), 100, no_words).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 513 }
        );
        assert_eq!(
            SegmentTable::read(1, inline(&[[96, 5]]), 100, no_words).unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 96, len: 5 }
        );
        // offset + length overflowing u32
        assert!(SegmentTable::read(1, inline(&[[u32::MAX, 2]]), u32::MAX, no_words).is_err());
        assert!(SegmentTable::read(1, inline(&[[100, 0]]), 100, no_words).is_ok());
        // Each in bounds, together more than the area: overlapping.
        let words = [pair(0, 40), pair(10, 40), pair(0, 41)];
        assert_eq!(
            SegmentTable::read(3, inline(&[[50, 3]]), 100, table_at_50(&words)).unwrap_err(),
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
        let t = SegmentTable::read(8, inline(&[[50, 8]]), 100, read).unwrap();
        assert_eq!(t.len(), 8);
        assert_eq!(t.get(7), Some(Extent { start: 35, len: 5 }));
        // The table must be as long as the count, and in bounds.
        assert!(SegmentTable::read(8, inline(&[[50, 7]]), 100, read).is_err());
        assert!(SegmentTable::read(8, inline(&[[95, 8]]), 100, read).is_err());
        // An entry out of bounds.
        let bad = |w: u32| {
            Some(if w == 53 {
                99 | (5 << 32)
            } else {
                u64::from(w) | (1 << 32)
            })
        };
        assert_eq!(
            SegmentTable::read(8, inline(&[[50, 8]]), 100, bad).unwrap_err(),
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
            let pairs = std::array::from_fn(|_| [small(next()), small(next()) % 64]);
            let fill = next();
            let read = |w: u32| (w < data_words).then(|| fill.rotate_left(w) % (1 << 40));
            if let Ok(t) = SegmentTable::read(count, pairs, data_words, read) {
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
