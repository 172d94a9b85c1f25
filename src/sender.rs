//! The sending side's private bookkeeping: free space, segments lent to
//! builders, messages in flight, and reading the peer's releases.
//!
//! # Message life cycle (sender's view)
//!
//! 1. A builder's allocator takes an extent from the free list; the extent is
//!    *open* (recorded in `open`) while the builder lives.
//! 2. `send` moves the builder's extents, trimmed to the words capnp used, into
//!    a free *slot* (the unused tails go back to the free list: they were never
//!    written, so they are still zero), copies heap segments in, writes the
//!    descriptor and bumps `published`. Dropping the builder afterwards finds
//!    its extents no longer open and leaves them alone.
//! 3. The peer reads the message in place and, when its reader drops, appends
//!    `(slot, seq)` to its release ring and bumps its `released` counter.
//! 4. `reclaim` validates each release, zeroes the slot's extents (exactly the
//!    words that were written) and frees them and the slot.
//!
//! Slots are independent of ring positions, so a message the peer holds
//! forever pins one slot and its own words, nothing else.
//!
//! # Notes about memory ordering
//!
//! - The message bytes and the descriptor are written before the
//!   descriptor's tag is stored with Release, and the tag before `published`
//!   is stored with `SeqCst`: the peer's `Acquire` load of either makes the
//!   entry and the message visible.
//! - The peer stores its release entries before its `released` counter
//!   (Release); `reclaim` loads the counter with `Acquire` before reading
//!   entries, and only then zeroes and reuses the words the peer has finished
//!   reading (its reads happen before its Release store).

use std::sync::atomic::Ordering;

use crate::alloc::FreeList;
use crate::error::{Error, ProtocolError, TooLargeKind};
use crate::layout::{DescriptorEntry, Geometry, INLINE_SEGMENTS, MAX_SEGMENTS, WORD};
use crate::region::{Extent, OutRegion, Region};

/// One message in flight, or a free place for one.
#[derive(Debug)]
struct Slot {
    /// Sequence number of the message occupying the slot.
    seq: u32,
    in_flight: bool,
    /// Every extent the message occupies: segments and out-of-line table,
    /// each exactly the words written.
    extents: Vec<Extent>,
}

/// Where one segment of a message being sent comes from.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Already in our data area: open extent `open`, `used` words written.
    InRegion { open: Extent, used: u32 },
    /// On the heap (or elsewhere): copied into `to` at send.
    Copied { to: Extent },
}

/// The sender's books. Lives in a `RefCell` in the channel; every method runs
/// to completion without calling user code.
#[derive(Debug)]
pub(crate) struct TxBook {
    geometry: Geometry,
    /// The most messages in flight at once: our ring capacity, or the
    /// peer's if smaller, since the peer's release ring (in its region, sized
    /// by its capacity) must hold a release for every message in flight.
    max_in_flight: u32,
    free: FreeList,
    /// End of the highest word ever handed out. Below it, pages are already
    /// faulted in and likely cached; an allocation that would cross it first
    /// reclaims what the peer has released (see `allocate`).
    high_water: u32,
    /// Extents lent to live builders, in allocation order.
    open: Vec<Extent>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Scratch for `try_publish`, kept to reuse its allocation.
    plan: Vec<Placement>,
    /// Messages published so far (wrapping); equals our `published` counter.
    published: u32,
    /// Peer release entries read so far (wrapping).
    reclaimed: u32,
    /// The peer's `consumed` counter as last validated.
    peer_consumed: u32,
}

impl TxBook {
    pub(crate) fn new(geometry: Geometry, peer_ring_capacity: u32) -> TxBook {
        let cap = geometry.ring_capacity.min(peer_ring_capacity);
        TxBook {
            geometry,
            max_in_flight: cap,
            free: FreeList::new(geometry.data_words()),
            high_water: 0,
            open: Vec::with_capacity(16),
            slots: (0..cap)
                .map(|_| Slot {
                    seq: 0,
                    in_flight: false,
                    extents: Vec::new(),
                })
                .collect(),
            // Popped from the back: slot 0 first.
            free_slots: (0..cap).rev().collect(),
            plan: Vec::with_capacity(INLINE_SEGMENTS),
            published: 0,
            reclaimed: 0,
            peer_consumed: 0,
        }
    }

    /// Messages sent and not yet released.
    pub(crate) fn in_flight(&self) -> u32 {
        // free_slots.len() <= max_in_flight <= 2^16.
        self.max_in_flight - u32::try_from(self.free_slots.len()).unwrap_or(0)
    }

    /// Our `published` counter.
    pub(crate) fn published(&self) -> u32 {
        self.published
    }

    /// Release entries read from the peer so far.
    pub(crate) fn reclaimed(&self) -> u32 {
        self.reclaimed
    }

    /// Lends an extent of at least `min` (ideally `want`) words to a builder.
    ///
    /// Releases are read lazily, to keep the peer's `released` line out of
    /// the hot path: only when the free list cannot serve the request from
    /// memory already used (below `high_water`). So a steady stream keeps
    /// reusing the same warm pages instead of walking the whole region, and
    /// pages are faulted in once, not once per lap.
    pub(crate) fn allocate(
        &mut self,
        out: &OutRegion,
        peer: &Region,
        min: u32,
        want: u32,
    ) -> Result<Option<Extent>, ProtocolError> {
        let mut extent = self.free.allocate(min, want);
        // Only the first `min` words are sure to be written; the rest of a
        // generous segment is usually trimmed away at send.
        let cold = |e: &Extent| e.start + min > self.high_water;
        if !extent.as_ref().is_some_and(|e| !cold(e)) && self.pending_releases(peer) {
            if let Some(e) = extent.take() {
                self.free.free(e); // untouched, still zero
            }
            self.reclaim(out, peer)?;
            extent = self.free.allocate(min, want);
        }
        let Some(extent) = extent else {
            return Ok(None);
        };
        self.high_water = self.high_water.max(extent.end());
        self.open.push(extent);
        Ok(Some(extent))
    }

    /// Whether the peer has released messages we have not reclaimed yet.
    fn pending_releases(&self, peer: &Region) -> bool {
        // Relaxed: only a hint; `reclaim` loads it again with Acquire.
        peer.control().released.0.load(Ordering::Relaxed) != self.reclaimed
    }

    /// Takes back the open extent starting at `start` from a builder dropped
    /// unsent: zeroes the `used` words and frees it. Returns `false` when no
    /// open extent starts there (the message was sent, or the pointer is not
    /// ours).
    pub(crate) fn deallocate(&mut self, out: &OutRegion, start: u32, used: u32) -> bool {
        let Some(i) = self.open.iter().rposition(|e| e.start == start) else {
            return false;
        };
        let extent = self.open.swap_remove(i);
        out.zero(Extent {
            start,
            len: used.min(extent.len),
        });
        self.free.free(extent);
        true
    }

    /// Reads and applies the peer's new releases. Returns how many.
    ///
    /// Every entry is validated: the counter may advance by at most the
    /// messages in flight, and each entry must name an in-flight slot with the
    /// matching sequence number that the peer has already consumed.
    pub(crate) fn reclaim(&mut self, out: &OutRegion, peer: &Region) -> Result<u32, ProtocolError> {
        // Acquire: pairs with the peer's Release store after it wrote the
        // entries and finished reading the messages they name.
        let released = peer.control().released.0.load(Ordering::Acquire);
        let pending = released.wrapping_sub(self.reclaimed);
        if pending == 0 {
            return Ok(0);
        }
        if pending > self.in_flight() {
            return Err(ProtocolError::ReleasedOutOfRange {
                seen: self.reclaimed,
                released,
            });
        }
        let unconsumed = self.check_peer_consumed(peer)?;
        for _ in 0..pending {
            let entry = peer.release_entry(self.reclaimed);
            // Relaxed: ordered by the Acquire load of `released` above.
            let slot = entry.slot.load(Ordering::Relaxed);
            let seq = entry.seq.load(Ordering::Relaxed);
            let bad = ProtocolError::BadRelease { slot, seq };
            let index = usize::try_from(slot).map_err(|_| bad)?;
            let s = self.slots.get_mut(index).ok_or(bad)?;
            // Consumed means: among the messages the peer has taken, i.e.
            // further back from `published` than the unconsumed ones.
            let consumed = self.published.wrapping_sub(seq) > unconsumed;
            if !s.in_flight || s.seq != seq || !consumed {
                return Err(bad);
            }
            for e in s.extents.drain(..) {
                out.zero(e);
                self.free.free(e);
            }
            s.in_flight = false;
            self.free_slots.push(slot);
            self.reclaimed = self.reclaimed.wrapping_add(1);
        }
        Ok(pending)
    }

    /// Loads and validates the peer's `consumed` counter: it never goes
    /// backwards and never passes `published`. Returns how many published
    /// messages the peer has not taken yet.
    fn check_peer_consumed(&mut self, peer: &Region) -> Result<u32, ProtocolError> {
        let consumed = peer.control().consumed.0.load(Ordering::Acquire);
        let before = self.published.wrapping_sub(self.peer_consumed);
        let now = self.published.wrapping_sub(consumed);
        if now > before {
            return Err(ProtocolError::ConsumedOutOfRange { consumed });
        }
        self.peer_consumed = consumed;
        Ok(now)
    }

    /// Checks what no amount of waiting can fix: too many segments, or more
    /// words than the data area holds.
    pub(crate) fn check_fits(&self, segments: &[&[u8]]) -> Result<(), Error> {
        let count = segments.len() as u64;
        if count > u64::from(MAX_SEGMENTS) {
            return Err(Error::TooLarge {
                needed: count,
                limit: u64::from(MAX_SEGMENTS),
                kind: TooLargeKind::Segments,
            });
        }
        let table = if segments.len() > INLINE_SEGMENTS {
            count
        } else {
            0
        };
        let words: u64 = segments.iter().map(|s| s.len() as u64 / WORD).sum::<u64>() + table;
        let limit = u64::from(self.geometry.data_words());
        if words > limit {
            return Err(Error::TooLarge {
                needed: words,
                limit,
                kind: TooLargeKind::Words,
            });
        }
        Ok(())
    }

    /// The error to give when a message cannot be placed and nothing is in
    /// flight, so no release will ever make room: the largest segment to copy
    /// against the largest free extent.
    pub(crate) fn cannot_place(&self, out: &OutRegion, segments: &[&[u8]]) -> Error {
        let needed = segments
            .iter()
            .filter(|s| self.find_open(out, s).is_none())
            .map(|s| s.len() as u64 / WORD)
            .max()
            .unwrap_or(0);
        Error::TooLarge {
            needed,
            limit: u64::from(self.free.largest()),
            kind: TooLargeKind::Segment,
        }
    }

    /// The open extent a segment lies at the start of, if any.
    fn find_open(&self, out: &OutRegion, segment: &[u8]) -> Option<Extent> {
        let start = out.offset_of(segment.as_ptr())?;
        let e = *self.open.iter().rev().find(|e| e.start == start)?;
        (segment.len() as u64 <= u64::from(e.len) * WORD).then_some(e)
    }

    /// Publishes a message if a slot and space for its copied segments (and
    /// out-of-line table) are free now; otherwise changes nothing and returns
    /// `false`. `segments` passed [`check_fits`](Self::check_fits), is not
    /// empty, and every segment is a whole number of words.
    pub(crate) fn try_publish(&mut self, out: &OutRegion, segments: &[&[u8]]) -> bool {
        debug_assert!(!segments.is_empty() && segments.len() <= MAX_SEGMENTS as usize);
        let Some(&slot) = self.free_slots.last() else {
            return false;
        };
        // Plan: find each segment's place, taking space for the copies. The
        // unused tails of in-region segments are freed first (never written,
        // so still zero): a copy may need that space.
        let mut plan = std::mem::take(&mut self.plan);
        plan.clear();
        for s in segments {
            let words = u32::try_from(s.len() as u64 / WORD).unwrap_or(u32::MAX);
            if let Some(open) = self.find_open(out, s) {
                self.free.free(tail(open, words));
                plan.push(Placement::InRegion { open, used: words });
            } else {
                plan.push(Placement::Copied {
                    to: Extent { start: 0, len: 0 },
                });
            }
        }
        let mut complete = true;
        for (p, s) in plan.iter_mut().zip(segments) {
            if let Placement::Copied { to } = p {
                let words = u32::try_from(s.len() as u64 / WORD)
                    .unwrap_or(u32::MAX)
                    .max(1);
                match self.free.allocate(words, words) {
                    Some(e) => *to = e,
                    None => {
                        complete = false;
                        break;
                    }
                }
            }
        }
        let count = u32::try_from(segments.len()).unwrap_or(u32::MAX);
        let table = if !complete || segments.len() <= INLINE_SEGMENTS {
            None
        } else {
            let t = self.free.allocate(count, count);
            complete = t.is_some();
            t
        };
        if !complete {
            // Undo in reverse: the copy targets were never written (still
            // zero), and once they are back the tails are free to re-take.
            for p in &plan {
                if let Placement::Copied { to } = *p {
                    self.free.free(to);
                }
            }
            for p in &plan {
                if let Placement::InRegion { open, used } = *p {
                    let taken = self.free.take(tail(open, used));
                    debug_assert!(taken, "a freed tail was not free again");
                }
            }
            self.plan = plan;
            return false;
        }

        // Commit: nothing below can fail.
        self.free_slots.pop();
        let seq = self.published;
        let index = slot as usize;
        let mut extents = std::mem::take(&mut self.slots[index].extents);
        let entry = out.region().descriptor(seq);
        for (i, (p, s)) in plan.iter().zip(segments).enumerate() {
            let placed = match *p {
                Placement::InRegion { open, used } => {
                    if let Some(k) = self.open.iter().rposition(|e| *e == open) {
                        self.open.swap_remove(k);
                    }
                    Extent {
                        start: open.start,
                        len: used,
                    }
                }
                Placement::Copied { to } => {
                    out.write(to, s);
                    to
                }
            };
            if placed.len > 0 {
                extents.push(placed);
            }
            match table {
                Some(t) => {
                    let word = u64::from(placed.start) | (u64::from(placed.len) << 32);
                    let at = Extent {
                        start: t.start + u32::try_from(i).unwrap_or(0),
                        len: 1,
                    };
                    out.write(at, &word.to_le_bytes());
                }
                None => store_extent(entry, placed),
            }
        }
        if let Some(t) = table {
            extents.push(t);
            store_extent(entry, t);
        }
        self.plan = plan;
        let s = &mut self.slots[index];
        s.extents = extents;
        s.seq = seq;
        s.in_flight = true;
        write_header(entry, seq, slot, count);
        self.published = seq.wrapping_add(1);
        // SeqCst: Release for the descriptor and message bytes above, and one
        // half of the Dekker pair with the peer's `rx_sleeping` (see channel.rs).
        out.region()
            .control()
            .published
            .0
            .store(self.published, Ordering::SeqCst);
        true
    }
}

/// The words of open extent `open` after its first `used`.
fn tail(open: Extent, used: u32) -> Extent {
    Extent {
        start: open.start + used,
        len: open.len - used,
    }
}

fn store_extent(entry: &DescriptorEntry, e: Extent) {
    // Relaxed: published by the store of `published`.
    entry.offset.store(e.start, Ordering::Relaxed);
    entry.len.store(e.len, Ordering::Relaxed);
}

fn write_header(entry: &DescriptorEntry, seq: u32, slot: u32, count: u32) {
    // Relaxed: published by the Release store of the tag below.
    entry
        .slot_count
        .store(DescriptorEntry::pack(slot, count), Ordering::Relaxed);
    // Release, and last: the receiver takes the entry once it sees the tag.
    entry
        .seq
        .store(DescriptorEntry::tag(seq), Ordering::Release);
}
