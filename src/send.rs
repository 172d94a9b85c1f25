//! The sending side of one end: our outgoing space (the region's data area
//! and the areas added to it), a free list per area, the books of messages
//! in flight, the backend of the capnp allocator, growth and retirement of
//! areas, and the send loop.
//!
//! # Message life cycle (sender's view)
//!
//! 1. A builder's allocator takes an extent from the free list; the extent is
//!    *open* (recorded in `open`) while the builder lives.
//! 2. `send` moves the builder's extents, trimmed to the words capnp used, into
//!    a free *slot* (the unused tails go back to the free list: they were never
//!    written, so they are still zero), copies heap segments in, writes the
//!    descriptor (`ring.rs`) and wakes the peer if it sleeps (`wake.rs`).
//!    Dropping the builder afterwards finds its extents no longer open and
//!    leaves them alone.
//! 3. The peer reads the message in place and, when its reader drops, appends
//!    `(slot, seq)` to its release ring.
//! 4. `reclaim` validates each release, zeroes the slot's extents (exactly the
//!    words that were written) and frees them and the slot.
//!
//! Slots are independent of ring positions, so a message the peer holds
//! forever pins one slot and its own words, nothing else. The descriptor
//! ring bounds only messages the peer has not taken (`has_room`); slots are
//! made as needed, up to the peer's release ring capacity.
//!
//! # Areas
//!
//! When nothing has room for a segment, the sending side adds an area
//! (`grow`): a new file, mapped here, handed to the peer on the socket
//! *before* any descriptor names it, and recorded under a free id. An area
//! found empty (every word free, so nothing open or in flight) for
//! `Options::area_idle` is retired (`retire_idle`): unmapped here, then a
//! descriptor of count 0 tells the peer, which unmaps its view and releases
//! the entry like a message; only then may the id be reused, so the peer
//! never sees an id handed over twice while it still maps it.
//!
//! The books decide which words of the data area are free, lent to a
//! builder, or in flight, so they are what makes every write into the data
//! area sound: each `unsafe` block below names the entry of the books that
//! gives this process the words it writes.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::error::{Failure, Halt, ProtocolError, SendHalt, TooLarge, TooLargeKind};
use crate::free::FreeList;
use crate::layout::{
    Geometry, AWAKE, DATA_ALIGN, MAX_AREA, MAX_REGION, MAX_SEGMENTS, WORD, WORD_BYTES,
};
use crate::link::{Link, Wakes};
use crate::region::{Extent, OwnArea, OwnRegion, PeerRegion, Span};
use crate::ring::{self, Descriptor, DescriptorProducer, Release, ReleaseConsumer, TABLE_WORDS};
use crate::stats::SendStats;
use crate::wait::{Condition, Readiness, Waiter};
use crate::wake;
use crate::word::{Mine, Theirs, Word};

/// How often (in sends) a sender that never waits checks the socket for
/// hang-up, subject to at most one check per wait slice, and looks for
/// areas to give back.
const SENDS_PER_LIVENESS_CHECK: u32 = 64;

/// Slots made before a sender with none free first reads the peer's
/// releases (see `Books::try_publish`).
const EAGER_SLOTS: usize = 256;

/// Segments of at least this many words (8 KiB) that capnp must fill
/// (its `min`: one large object, a payload) start [`LARGE_PHASE`] words
/// past a page (4 KiB, [`PAGE_WORDS`]) rather than anywhere.
///
/// A large payload is copied into its segment by `memcpy` (capnp's
/// `set_data`), from wherever the user's buffer lies, and lands a word or
/// a few past the segment's start (after a far pointer's landing pad).
/// From a page-aligned buffer (an mmapped file, jemalloc's large sizes, an
/// aligned allocation) to a segment that starts on a page, the destination
/// is then 8 to 24 bytes ahead of the source modulo 4096, and on this
/// machine (AMD EPYC, glibc 2.36) `memcpy` at those distances took 2.09 µs
/// for 4 KiB (0.07 elsewhere), 5.76 for 16 KiB (0.18) and, for 64 KiB,
/// ran at 2.9 GB/s against 45. 3 KiB into the page keeps both
/// page-aligned buffers and glibc's large blocks (16 bytes into a page)
/// clear of it; the words skipped stay free for smaller messages. A large
/// segment built on the heap and copied in at send starts there too,
/// rather than wherever first fit would put it. (A payload that fits in
/// the first segment lands wherever that segment starts: capnp asks for
/// the first segment before it knows what goes in it.)
const LARGE_SEGMENT_WORDS: u32 = 1024;
/// Words in a page, the period of [`LARGE_PHASE`].
const PAGE_WORDS: u32 = 512;
/// Where in its page a large segment starts: 3 KiB in, in words.
const LARGE_PHASE: u32 = 384;

/// No span: a slot's empty `first`, a placeholder.
const NO_SPAN: Span = Span {
    area: 0,
    extent: Extent { start: 0, len: 0 },
};

/// One message in flight, or a free place for one.
#[derive(Debug)]
struct Slot {
    /// Sequence number of the message occupying the slot.
    seq: u32,
    in_flight: bool,
    /// The extents the message occupies (segments and out-of-line table,
    /// each exactly the words written): the first inline (`NO_SPAN` for
    /// none), so that a one-segment message touches no `Vec`.
    first: Span,
    more: Vec<Span>,
    /// For a retirement (not a message): the area id it gives back, free to
    /// reuse once the peer releases the entry (it has unmapped the area).
    retires: Option<u32>,
}

/// Where one segment of a message being sent comes from.
#[derive(Debug, Clone, Copy)]
enum Placement {
    /// Already in our outgoing space: open span `open`, `used` words written.
    InPlace { open: Span, used: u32 },
    /// On the heap (or another channel's region): copied into `to` at send.
    Copied { to: Span },
}

/// An area added to the outgoing space, and its free words.
#[derive(Debug)]
struct Grown {
    area: OwnArea,
    free: FreeList,
    /// When the area was first seen empty (nothing open, nothing in flight)
    /// since it was last used.
    empty_since: Option<Instant>,
}

/// Why a message could not be published now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoRoom {
    /// Every slot is in flight, or the descriptor ring is full: only the
    /// peer (taking or releasing) can help.
    Peer,
    /// No free extent of `words` words for a copied segment or the table:
    /// a release, or a new area, can help.
    Space { words: u32 },
}

/// The sender's books. Every method runs to completion without calling
/// user code. Callers hold the end (`Link::enter`, or `owned_here` for
/// drops), so this process may write the words the books give it.
#[derive(Debug)]
struct Books {
    geometry: Geometry,
    /// Words of area 0 (`geometry.data_words()`, which computes).
    data_words: u32,
    /// The most messages in flight at once: the peer's release ring
    /// capacity (its `held_capacity`), which must hold a release for every
    /// message in flight. Slots are made as needed, up to this many.
    max_in_flight: u32,
    /// The free words of area 0, the region's data area, but for `kept`.
    free: FreeList,
    /// A span of area 0 given back by the builder that had it, kept out of
    /// `free` for the next builder (empty: none). Every builder of a small
    /// message, which its send carries in its descriptor entry, gives its
    /// span back at its drop, and the next one takes it: kept aside, the
    /// two are a compare and a store rather than a search of the free list
    /// and a merge. Its words are zero and free; every other way of taking
    /// words from area 0 first returns it to `free` (`unkeep`).
    kept: Extent,
    /// End of the highest word of area 0 ever handed out. Below it, pages
    /// are already faulted in and likely cached; an allocation that would
    /// cross it first reclaims what the peer has released (see `allocate`).
    high_water: u32,
    /// The areas added, by id - 1 (`None`: id free, or retiring).
    grown: Vec<Option<Grown>>,
    /// Ids retired whose retirement the peer has not released yet (bit
    /// `id`): not to be reused until it has.
    retiring: u64,
    /// The most bytes the outgoing space may take (region included), and
    /// what the areas take now.
    limit_bytes: u64,
    grown_bytes: u64,
    areas_added: u64,
    areas_retired: u64,
    /// Spans lent to live builders, in allocation order.
    open: Vec<Span>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Messages sent and not yet released: the slots in use.
    in_flight: u32,
    /// Words the messages in flight occupy.
    in_flight_words: u64,
    /// Scratch for `try_publish`, kept to reuse its allocation.
    plan: Vec<Placement>,
    descriptors: DescriptorProducer,
    releases: ReleaseConsumer,
}

impl Books {
    fn new(geometry: Geometry, peer_held_capacity: u32, limit_bytes: u64, start: u32) -> Books {
        Books {
            geometry,
            data_words: geometry.data_words(),
            max_in_flight: peer_held_capacity,
            free: FreeList::new(geometry.data_words()),
            kept: Extent::default(),
            high_water: 0,
            grown: Vec::new(),
            retiring: 0,
            limit_bytes,
            grown_bytes: 0,
            areas_added: 0,
            areas_retired: 0,
            open: Vec::with_capacity(16),
            slots: Vec::with_capacity(EAGER_SLOTS.min(peer_held_capacity as usize)),
            free_slots: Vec::with_capacity(EAGER_SLOTS.min(peer_held_capacity as usize)),
            in_flight: 0,
            in_flight_words: 0,
            plan: Vec::with_capacity(1),
            descriptors: DescriptorProducer::new(start),
            releases: ReleaseConsumer::new(start),
        }
    }

    /// Messages sent and not yet released.
    fn in_flight(&self) -> u32 {
        debug_assert_eq!(
            u64::from(self.in_flight) + self.free_slots.len() as u64,
            self.slots.len() as u64
        );
        self.in_flight
    }

    /// A free slot for the next message, making one if all are in flight
    /// and the peer may hold more. Not taken yet: see `take_slot`.
    fn next_slot(&mut self) -> Option<u32> {
        if let Some(&slot) = self.free_slots.last() {
            return Some(slot);
        }
        let made = u32::try_from(self.slots.len()).ok()?;
        if made >= self.max_in_flight {
            return None;
        }
        self.slots.push(Slot {
            seq: 0,
            in_flight: false,
            first: NO_SPAN,
            more: Vec::new(),
            retires: None,
        });
        self.free_slots.push(made);
        Some(made)
    }

    /// The free list of area `area`, if it exists. The books name only
    /// areas that do: for any of their spans, `None` is a bug.
    fn free_list(&mut self, area: u32) -> Option<&mut FreeList> {
        let free = match area {
            0 => Some(&mut self.free),
            id => self
                .grown
                .get_mut(id as usize - 1)
                .and_then(Option::as_mut)
                .map(|g| &mut g.free),
        };
        debug_assert!(free.is_some(), "the books name area {area}, not there");
        free
    }

    /// Area `id` (1 and up), if it exists: as for
    /// [`free_list`](Self::free_list), `None` is a bug.
    fn grown_area(&self, id: u32) -> Option<&OwnArea> {
        let found = self.grown.get((id as usize).wrapping_sub(1));
        let area = found.and_then(Option::as_ref).map(|g| &g.area);
        debug_assert!(area.is_some(), "the books name area {id}, not there");
        area
    }

    /// Returns `span` to its area's free list. Its words are zero.
    fn free_span(&mut self, span: Span) {
        if let Some(free) = self.free_list(span.area) {
            free.free(span.extent);
        }
    }

    /// Zeroes `span`'s words.
    ///
    /// # Safety
    ///
    /// As for [`OwnRegion::zero`]: the books give the caller these words.
    unsafe fn zero<W: Word>(&self, own: &OwnRegion<W>, span: Span) {
        match span.area {
            // SAFETY: passed on from the caller.
            0 => unsafe { own.zero(span.extent) },
            id => {
                if let Some(area) = self.grown_area(id) {
                    // SAFETY: passed on from the caller.
                    unsafe { area.zero(span.extent) }
                }
            }
        }
    }

    /// Copies `bytes` to the start of `span`.
    ///
    /// # Safety
    ///
    /// As for [`OwnRegion::write`]: the books give the caller these words.
    unsafe fn write<W: Word>(&self, own: &OwnRegion<W>, span: Span, bytes: &[u8]) {
        match span.area {
            // SAFETY: passed on from the caller.
            0 => unsafe { own.write(span.extent, bytes) },
            id => {
                if let Some(area) = self.grown_area(id) {
                    // SAFETY: passed on from the caller.
                    unsafe { area.write(span.extent, bytes) }
                }
            }
        }
    }

    /// The address of `span`'s first word, for capnp; `None` (a bug, see
    /// [`grown_area`](Self::grown_area)) for an area not there.
    fn span_ptr<W: Word>(&self, own: &OwnRegion<W>, span: Span) -> Option<NonNull<u8>> {
        match span.area {
            0 => Some(own.extent_ptr(span.extent)),
            id => Some(self.grown_area(id)?.extent_ptr(span.extent)),
        }
    }

    /// The area and word offset of `ptr`, when it lies in our outgoing
    /// space (word aligned).
    fn locate<W: Word>(&self, own: &OwnRegion<W>, ptr: *const u8) -> Option<(u32, u32)> {
        if let Some(start) = own.offset_of(ptr) {
            return Some((0, start));
        }
        (1u32..).zip(&self.grown).find_map(|(id, g)| {
            let start = g.as_ref()?.area.offset_of(ptr)?;
            Some((id, start))
        })
    }

    /// Takes a free extent of at least `min` (ideally `want`) words from
    /// the areas added, lowest id first; a large one at its phase (see
    /// [`LARGE_SEGMENT_WORDS`]) where the area has room for it.
    fn allocate_grown(&mut self, min: u32, want: u32) -> Option<Span> {
        (1u32..).zip(&mut self.grown).find_map(|(id, g)| {
            let g = g.as_mut()?;
            let extent = allocate_placed(&mut g.free, min, want)?;
            g.empty_since = None;
            Some(Span { area: id, extent })
        })
    }

    /// The common case of [`allocate`](Self::allocate), in a few compares:
    /// lends the kept span if it has `want` words; failing that, `want`
    /// words from the lowest free extent of area 0, if it has more than
    /// that and its first `min` lie in memory already used (below
    /// `high_water`): the extent that first fit would choose, and no
    /// release needs reading for it. `None` (nothing changed) otherwise.
    #[inline(always)]
    fn allocate_warm(&mut self, min: u32, want: u32) -> Option<Span> {
        // A large segment has its place in a page: `allocate_placed`.
        if min >= LARGE_SEGMENT_WORDS {
            return None;
        }
        let want = want.max(min);
        let extent = if self.kept.len >= want {
            // Below `high_water`: it was lent before.
            std::mem::take(&mut self.kept)
        } else {
            let warm_below = self.high_water.checked_sub(min)?;
            let extent = self.free.allocate_first(want, warm_below)?;
            self.high_water = self.high_water.max(extent.end());
            extent
        };
        let span = Span { area: 0, extent };
        self.open.push(span);
        Some(span)
    }

    /// Returns the kept span to the free list, before a search of it.
    #[inline]
    fn unkeep(&mut self) {
        if self.kept.len > 0 {
            let kept = std::mem::take(&mut self.kept);
            self.free.free(kept);
        }
    }

    /// Lends a span of at least `min` (ideally `want`) words to a builder.
    ///
    /// Area 0 first. Releases are read lazily, to keep the peer's
    /// `released` line out of the hot path: only when area 0 cannot serve
    /// the request from memory already used (below `high_water`). So a
    /// steady stream keeps reusing the same warm pages instead of walking
    /// the whole region, and pages are faulted in once, not once per lap.
    /// Then the areas added; `None` when nothing has room (the caller may
    /// add an area). A large segment starts at its place in a page where
    /// there is room for it (see [`LARGE_SEGMENT_WORDS`]).
    fn allocate<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
        min: u32,
        want: u32,
    ) -> Result<Option<Span>, ProtocolError> {
        self.unkeep();
        let mut extent = allocate_placed(&mut self.free, min, want);
        // Only the first `min` words are sure to be written; the rest of a
        // generous segment is usually trimmed away at send.
        let high_water = self.high_water;
        let cold = |e: &Extent| u64::from(e.start) + u64::from(min) > u64::from(high_water);
        if !extent.as_ref().is_some_and(|e| !cold(e)) && self.releases.pending(peer) {
            if let Some(e) = extent.take() {
                self.free.free(e); // untouched, still zero
            }
            self.reclaim(own, peer)?;
            extent = allocate_placed(&mut self.free, min, want);
        }
        let span = match extent {
            Some(extent) => {
                self.high_water = self.high_water.max(extent.end());
                Span { area: 0, extent }
            }
            None => match self.allocate_grown(min, want) {
                Some(span) => span,
                None => return Ok(None),
            },
        };
        self.open.push(span);
        Ok(Some(span))
    }

    /// Takes back the open span at `(area, start)` from a builder dropped
    /// unsent (or whose message was carried in its descriptor). Returns
    /// `false` when no open span starts there (the message was sent).
    fn deallocate<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        area: u32,
        start: u32,
        used: u32,
    ) -> bool {
        let Some(i) = self
            .open
            .iter()
            .rposition(|s| s.area == area && s.extent.start == start)
        else {
            return false;
        };
        let span = self.open.swap_remove(i);
        self.give_back_open(own, span, used);
        true
    }

    /// Takes `span`, just removed from `open`, back from its builder:
    /// zeroes the `used` words it wrote and frees it (or keeps it: see
    /// `kept`).
    #[inline]
    fn give_back_open<W: Word>(&mut self, own: &OwnRegion<W>, span: Span, used: u32) {
        let written = Span {
            area: span.area,
            extent: Extent {
                start: span.extent.start,
                len: used.min(span.extent.len),
            },
        };
        // SAFETY: `span` was open, lent to the builder now giving it back:
        // capnp is done with it and nothing else refers to it; our caller
        // holds the end.
        unsafe { self.zero(own, written) };
        if span.area == 0 && self.kept.len == 0 {
            self.kept = span.extent;
        } else {
            self.free_span(span);
        }
    }

    /// Reads and applies the peer's new releases. Returns how many.
    fn reclaim<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
    ) -> Result<u32, ProtocolError> {
        let in_flight = self.in_flight();
        let published = self.descriptors.published();
        let releases = std::mem::replace(&mut self.releases, ReleaseConsumer::new(0));
        // Spans given back, zeroed and not yet freed: a run of neighbours
        // (see `give_back_joined`).
        let mut run = NO_SPAN;
        let result = releases.reclaim(peer, published, in_flight, |Release { slot, seq }| {
            let bad = ProtocolError::BadRelease { slot, seq };
            let s = self.slots.get_mut(slot as usize).ok_or(bad)?;
            if !s.in_flight || s.seq != seq {
                return Err(bad);
            }
            s.in_flight = false;
            if let Some(id) = s.retires.take() {
                self.retiring &= !(1u64 << id);
            }
            let first = std::mem::replace(&mut s.first, NO_SPAN);
            let more = (!s.more.is_empty()).then(|| std::mem::take(&mut s.more));
            // SAFETY: message `seq`'s span, released by the peer
            // (validated): nobody reads or refers to it any more.
            unsafe { self.give_back_joined(own, &mut run, first) };
            if let Some(mut more) = more {
                for e in more.drain(..) {
                    // SAFETY: the message's other spans, released with it.
                    unsafe { self.give_back(own, e) };
                }
                self.slots[slot as usize].more = more;
            }
            self.free_slots.push(slot);
            self.in_flight -= 1;
            Ok(())
        });
        self.releases = releases;
        // Released, whatever the rest of the batch held.
        self.free_span(run);
        result
    }

    /// Zeroes and frees `span` of a released message (nothing, if empty).
    ///
    /// # Safety
    ///
    /// As for [`zero`](Self::zero): nothing refers to `span` any more.
    unsafe fn give_back<W: Word>(&mut self, own: &OwnRegion<W>, span: Span) {
        if span.extent.len == 0 {
            return;
        }
        self.in_flight_words -= u64::from(span.extent.len);
        // SAFETY: passed on from the caller.
        unsafe { self.zero(own, span) };
        self.free_span(span);
    }

    /// As [`give_back`](Self::give_back) for the first span of a released
    /// message, but freed with its neighbours: joined to `run` when it
    /// follows it, else `run` is freed and `span` starts the next run. A
    /// stream's messages lie one after another and come back in order, so
    /// a batch of releases is freed a run at a time rather than a message
    /// at a time. The caller frees the last run.
    ///
    /// Only first spans join: the others of a message of several segments
    /// seldom follow the run, and checking cost more than it saved
    /// (callgrind, four segments: 77 instructions a message more). Each
    /// span is still zeroed on its own: one `memset` of a whole run counted
    /// more instructions (64 B stream: 83 a message in `memset` against
    /// 29).
    ///
    /// # Safety
    ///
    /// As for [`zero`](Self::zero): nothing refers to `span` any more.
    #[inline]
    unsafe fn give_back_joined<W: Word>(&mut self, own: &OwnRegion<W>, run: &mut Span, span: Span) {
        if span.extent.len == 0 {
            return;
        }
        self.in_flight_words -= u64::from(span.extent.len);
        // SAFETY: passed on from the caller.
        unsafe { self.zero(own, span) };
        if run.area == span.area && run.extent.end() == span.extent.start {
            run.extent.len += span.extent.len;
        } else {
            self.free_span(std::mem::replace(run, span));
        }
    }

    /// Words the outgoing space may hold: area 0, and what the limit leaves
    /// for areas.
    fn capacity_words(&self) -> u64 {
        let for_areas = self.limit_bytes.saturating_sub(self.geometry.region_size);
        u64::from(self.geometry.data_words()) + for_areas / WORD
    }

    /// Checks what no amount of waiting can fix: too many segments, or more
    /// words than the outgoing space may hold. Returns the number of
    /// segments.
    #[inline]
    fn check_fits(&self, segments: &[&[u8]]) -> Result<u32, TooLarge> {
        // The common case, one segment that fits area 0, in a few compares.
        if let [only] = segments {
            if only.len() as u64 <= u64::from(self.data_words) * WORD {
                return Ok(1);
            }
        }
        let too_many = TooLarge {
            needed: segments.len() as u64,
            limit: u64::from(MAX_SEGMENTS),
            kind: TooLargeKind::Segments,
        };
        let n = u32::try_from(segments.len()).map_err(|_| too_many)?;
        if n > MAX_SEGMENTS {
            return Err(too_many);
        }
        let table = if ring::needs_table(segments.len()) {
            u64::from(n * TABLE_WORDS)
        } else {
            0
        };
        // capnp's segments are whole words.
        let words: u64 = segments.iter().map(|s| s.len() as u64 / WORD).sum::<u64>() + table;
        let limit = self.capacity_words();
        let largest = segments.iter().map(|s| s.len() as u64 / WORD).max();
        if words > limit || largest.is_some_and(|w| w * WORD > MAX_REGION) {
            return Err(TooLarge {
                needed: words,
                limit,
                kind: TooLargeKind::Words,
            });
        }
        Ok(n)
    }

    /// The error to give when a message cannot be placed, nothing is in
    /// flight (so no release will ever make room) and no area can be added:
    /// the largest segment to copy against the largest free extent.
    fn cannot_place<W: Word>(&self, own: &OwnRegion<W>, segments: &[&[u8]]) -> TooLarge {
        let needed = segments
            .iter()
            .filter(|s| self.find_open(own, s).is_none())
            .map(|s| s.len() as u64 / WORD)
            .max()
            .unwrap_or(0);
        let largest = self
            .grown
            .iter()
            .flatten()
            .map(|g| g.free.largest())
            .chain([self.free.largest(), self.kept.len])
            .max()
            .unwrap_or(0);
        TooLarge {
            needed,
            limit: u64::from(largest),
            kind: TooLargeKind::Segment,
        }
    }

    /// The open span a segment lies at the start of, if any.
    fn find_open<W: Word>(&self, own: &OwnRegion<W>, segment: &[u8]) -> Option<Span> {
        let (area, start) = self.locate(own, segment.as_ptr())?;
        let s = *self
            .open
            .iter()
            .rev()
            .find(|s| s.area == area && s.extent.start == start)?;
        (segment.len() as u64 <= u64::from(s.extent.len) * WORD).then_some(s)
    }

    /// Takes a free extent of exactly `words` words from any area (a large
    /// one at its phase where there is room: see [`LARGE_SEGMENT_WORDS`]).
    fn take_exact(&mut self, words: u32) -> Option<Span> {
        self.unkeep();
        match allocate_placed(&mut self.free, words, words) {
            Some(extent) => Some(Span { area: 0, extent }),
            None => self.allocate_grown(words, words),
        }
    }

    /// The common case of [`try_publish`](Self::try_publish): a message of
    /// one segment, built in the span lent last, with room in the ring and a
    /// slot free now. Publishes it and returns `true`; `false` (nothing
    /// changed) otherwise, for `try_publish` to handle in full.
    #[inline(always)]
    fn try_publish_one<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
        segment: &[u8],
    ) -> Result<bool, ProtocolError> {
        if ring::carries(segment.len()) {
            if !self
                .descriptors
                .has_room(peer, self.geometry.ring_capacity)?
            {
                return Ok(false);
            }
            self.publish_carried(own, segment);
            return Ok(true);
        }
        let Some(&slot) = self.free_slots.last() else {
            return Ok(false);
        };
        // Nothing open (a copy: `send_copy`, a heap builder), or another
        // segment: decided before anything shared is read.
        let Some((open, words)) = self.last_open_holding(own, segment) else {
            return Ok(false);
        };
        if !self
            .descriptors
            .has_room(peer, self.geometry.ring_capacity)?
        {
            return Ok(false);
        }
        self.publish_open(own, open, words, slot);
        Ok(true)
    }

    /// Publishes a message if a slot, an entry of the ring and space for its
    /// copied segments (and out-of-line table) are free now; otherwise
    /// changes nothing and says what is missing. `segments` passed
    /// [`check_fits`](Self::check_fits), which counted `count` of them, and
    /// is not empty.
    fn try_publish<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
        segments: &[&[u8]],
        count: u32,
    ) -> Result<Result<(), NoRoom>, ProtocolError> {
        debug_assert!(!segments.is_empty() && segments.len() == count as usize);
        if !self
            .descriptors
            .has_room(peer, self.geometry.ring_capacity)?
        {
            return Ok(Err(NoRoom::Peer));
        }
        if let [segment] = segments {
            if ring::carries(segment.len()) {
                self.publish_carried(own, segment);
                return Ok(Ok(()));
            }
        }
        // Up to EAGER_SLOTS slots are made as needed; beyond, only while the
        // peer has released nothing: a stream reuses a few hundred slots (and
        // their warm words), a receiver that holds gets as many as it may.
        if self.free_slots.is_empty()
            && self.slots.len() >= EAGER_SLOTS
            && self.releases.pending(peer)
        {
            self.reclaim(own, peer)?;
        }
        let Some(slot) = self.next_slot() else {
            return Ok(Err(NoRoom::Peer));
        };
        if let [segment] = segments {
            if self.publish_in_place(own, segment, slot) {
                return Ok(Ok(()));
            }
        }
        Ok(self.publish_planned(own, segments, count, slot))
    }

    /// The general case of [`try_publish`](Self::try_publish), which has
    /// found room in the ring and free `slot`: segments in place or to copy,
    /// in any area, with an out-of-line table when there are several. Kept
    /// out of line so the common case stays small.
    #[inline(never)]
    fn publish_planned<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        segments: &[&[u8]],
        count: u32,
        slot: u32,
    ) -> Result<(), NoRoom> {
        // Plan: find each segment's place, taking space for the copies. The
        // unused tails of in-place segments are freed first (never written,
        // so still zero): a copy may need that space.
        let mut plan = std::mem::take(&mut self.plan);
        plan.clear();
        for s in segments {
            let words = words_of(s);
            if let Some(open) = self.find_open(own, s) {
                self.free_span(tail(open, words));
                plan.push(Placement::InPlace { open, used: words });
            } else {
                plan.push(Placement::Copied {
                    to: Span {
                        area: 0,
                        extent: Extent { start: 0, len: 0 },
                    },
                });
            }
        }
        let mut missing = None;
        for (p, s) in plan.iter_mut().zip(segments) {
            if let Placement::Copied { to } = p {
                let words = words_of(s).max(1);
                match self.take_exact(words) {
                    Some(span) => *to = span,
                    None => {
                        missing = Some(words);
                        break;
                    }
                }
            }
        }
        let table = if missing.is_some() || !ring::needs_table(segments.len()) {
            None
        } else {
            let words = count * TABLE_WORDS;
            let t = self.take_exact(words);
            if t.is_none() {
                missing = Some(words);
            }
            t
        };
        if let Some(words) = missing {
            // Undo in reverse: the copy targets were never written (still
            // zero), and once they are back the tails are free to re-take.
            for p in &plan {
                if let Placement::Copied { to } = *p {
                    if to.extent.len > 0 {
                        self.free_span(to);
                    }
                }
            }
            for p in &plan {
                if let Placement::InPlace { open, used } = *p {
                    let t = tail(open, used);
                    let taken = self.free_list(t.area).is_some_and(|f| f.take(t.extent));
                    debug_assert!(taken, "a freed tail was not free again");
                }
            }
            self.plan = plan;
            return Err(NoRoom::Space { words });
        }

        // Write: nothing below can fail.
        let mut extents = std::mem::take(&mut self.slots[slot as usize].more);
        let mut described = NO_SPAN;
        for (i, (p, s)) in (0u32..).zip(plan.iter().zip(segments)) {
            let placed = match *p {
                Placement::InPlace { open, used } => {
                    if let Some(k) = self.open.iter().rposition(|e| *e == open) {
                        self.open.swap_remove(k);
                    }
                    Span {
                        area: open.area,
                        extent: Extent {
                            start: open.extent.start,
                            len: used,
                        },
                    }
                }
                Placement::Copied { to } => {
                    // SAFETY: `to` was just taken from a free list for this
                    // message: nothing else refers to it; `s` is the
                    // builder's memory (heap or another region), not ours.
                    unsafe { self.write(own, to, s) };
                    to
                }
            };
            if placed.extent.len > 0 {
                extents.push(placed);
            }
            match table {
                Some(t) => {
                    let at = Span {
                        area: t.area,
                        extent: Extent {
                            start: t.extent.start + i * TABLE_WORDS,
                            len: TABLE_WORDS,
                        },
                    };
                    let [a, b] = ring::table_words(placed);
                    let mut entry = [0u8; 16];
                    entry[..8].copy_from_slice(&a.to_le_bytes());
                    entry[8..].copy_from_slice(&b.to_le_bytes());
                    // SAFETY: entry `i` of the table span, just taken from
                    // a free list for this message (i < count).
                    unsafe { self.write(own, at, &entry) };
                }
                None => described = placed,
            }
        }
        if let Some(t) = table {
            extents.push(t);
            described = t;
        }
        self.plan = plan;
        let first = if extents.is_empty() {
            NO_SPAN
        } else {
            extents.swap_remove(0)
        };
        self.commit(own, slot, first, Some(extents), count, described);
        Ok(())
    }

    /// Publishes a message of one small segment ([`ring::carries`]) in
    /// its descriptor entry, for which the caller found room: no slot, no
    /// words in flight. Where the segment was built in a span lent to its
    /// builder, the span stays open: the builder's drop, right after the
    /// send, zeroes and frees it as for a builder dropped unsent, so the
    /// next small message is built in the same warm words.
    fn publish_carried<W: Word>(&mut self, own: &OwnRegion<W>, segment: &[u8]) {
        self.descriptors.publish_carried(own, segment);
    }

    /// Records the message now in `slot` (occupying `first` and `more`,
    /// empty spans excluded; `None`: nothing more, the slot keeps its empty
    /// vector) and publishes its descriptor (`count` segments, described by
    /// `described`).
    fn commit<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        slot: u32,
        first: Span,
        more: Option<Vec<Span>>,
        count: u32,
        described: Span,
    ) {
        self.occupy(first);
        for &e in more.iter().flatten() {
            self.occupy(e);
        }
        self.free_slots.pop();
        self.in_flight += 1;
        let seq = self.descriptors.published();
        let s = &mut self.slots[slot as usize];
        s.first = first;
        if let Some(more) = more {
            s.more = more;
        }
        s.seq = seq;
        s.in_flight = true;
        let published = self.descriptors.publish(
            own,
            Descriptor {
                slot,
                count,
                span: described,
            },
        );
        debug_assert_eq!(published, seq);
    }

    /// Counts `span` in flight; an area it lies in is in use again.
    fn occupy(&mut self, span: Span) {
        self.in_flight_words += u64::from(span.extent.len);
        if span.area != 0 {
            let g = self.grown.get_mut(span.area as usize - 1);
            let g = g.and_then(Option::as_mut);
            debug_assert!(g.is_some(), "a message in area {}, not there", span.area);
            if let Some(g) = g {
                g.empty_since = None;
            }
        }
    }

    /// A one-segment message built in place, for
    /// [`try_publish`](Self::try_publish), which has found room in the ring
    /// and free `slot`: publishes it and returns `true`; `false` (nothing
    /// changed) for any other message.
    fn publish_in_place<W: Word>(&mut self, own: &OwnRegion<W>, segment: &[u8], slot: u32) -> bool {
        let Some((open, words)) = self.last_open_holding(own, segment) else {
            return false;
        };
        self.publish_open(own, open, words, slot);
        true
    }

    /// The span lent last, and `segment`'s words, when `segment` starts at
    /// that span and fits in it: a one-segment message built in place.
    /// Reads nothing shared.
    #[inline]
    fn last_open_holding<W: Word>(
        &self,
        own: &OwnRegion<W>,
        segment: &[u8],
    ) -> Option<(Span, u32)> {
        let &open = self.open.last()?;
        if segment.len() as u64 > u64::from(open.extent.len) * WORD
            || self.locate(own, segment.as_ptr()) != Some((open.area, open.extent.start))
        {
            return None;
        }
        Some((open, words_of(segment)))
    }

    /// Publishes the one-segment message of `words` words built in `open`,
    /// the span lent last ([`last_open_holding`](Self::last_open_holding)),
    /// in free `slot`, which has room in the ring.
    fn publish_open<W: Word>(&mut self, own: &OwnRegion<W>, open: Span, words: u32, slot: u32) {
        self.open.pop();
        // The tail was never written: still zero.
        self.free_span(tail(open, words));
        let placed = Span {
            area: open.area,
            extent: Extent {
                start: open.extent.start,
                len: words,
            },
        };
        // An empty segment occupies nothing (it is described all the same).
        let first = if words > 0 { placed } else { NO_SPAN };
        self.commit(own, slot, first, None, 1, placed);
    }

    /// Total bytes of outgoing space now: the region and the areas.
    fn space_bytes(&self) -> u64 {
        self.geometry.region_size + self.grown_bytes
    }

    /// The size of a new area for a need of `words` words, within the
    /// limit, and a free id for it; `None` when the limit (or the ids)
    /// leave no room. Areas at least double the outgoing space, so there
    /// are few of them; a need larger than that gets an area of its size.
    fn plan_area(&self, words: u32) -> Option<(u32, u64)> {
        self.plan_area_in(words, self.space_bytes())
    }

    /// Whether [`plan_area`](Self::plan_area) would find room for `words`
    /// once every empty area is given back. (Their ids stay taken until
    /// the peer releases the retirements, as they are now.)
    fn plan_area_without_empty(&self, words: u32) -> bool {
        let empty: u64 = self
            .grown
            .iter()
            .flatten()
            .filter(|g| g.free.free_words() == u64::from(g.area.words()))
            .map(|g| g.area.bytes())
            .sum();
        empty > 0
            && self
                .plan_area_in(words, self.space_bytes() - empty)
                .is_some()
    }

    /// [`plan_area`](Self::plan_area) for an outgoing space of `space`
    /// bytes.
    fn plan_area_in(&self, words: u32, space: u64) -> Option<(u32, u64)> {
        let needed = (u64::from(words) * WORD).next_multiple_of(DATA_ALIGN);
        let remaining = self.limit_bytes.checked_sub(space)?;
        if needed > remaining || needed > MAX_REGION {
            return None;
        }
        let size = space
            .min(remaining)
            .min(MAX_REGION)
            .max(needed)
            .next_multiple_of(DATA_ALIGN);
        let size = if size > remaining { needed } else { size };
        let id = (1..=MAX_AREA).find(|&id| {
            self.retiring & (1u64 << id) == 0
                && self
                    .grown
                    .get(id as usize - 1)
                    .map_or(true, Option::is_none)
        })?;
        Some((id, size))
    }

    /// Records a new area, handed over to the peer already.
    fn add_area(&mut self, id: u32, area: OwnArea) {
        let index = id as usize - 1;
        if self.grown.len() <= index {
            self.grown.resize_with(index + 1, || None);
        }
        self.grown_bytes += area.bytes();
        self.areas_added += 1;
        let free = FreeList::new(area.words());
        self.grown[index] = Some(Grown {
            area,
            free,
            empty_since: None,
        });
    }

    /// Whether any area has been added and not given back.
    fn has_areas(&self) -> bool {
        self.grown_bytes > 0
    }

    /// The next area that has been empty for `idle` (as of `now`), noting
    /// when each empty one was first seen empty.
    fn idle_area(&mut self, idle: Duration, now: Instant) -> Option<u32> {
        let mut found = None;
        for (id, g) in (1u32..).zip(&mut self.grown) {
            let Some(g) = g else { continue };
            if g.free.free_words() != u64::from(g.area.words()) {
                g.empty_since = None;
                continue;
            }
            let since = *g.empty_since.get_or_insert(now);
            if found.is_none() && now.duration_since(since) >= idle {
                found = Some(id);
            }
        }
        found
    }

    /// Publishes the retirement of empty area `id` and unmaps it here, if
    /// a slot and an entry of the ring are free; `false` otherwise.
    fn retire<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
        id: u32,
    ) -> Result<bool, ProtocolError> {
        if !self
            .descriptors
            .has_room(peer, self.geometry.ring_capacity)?
        {
            return Ok(false);
        }
        let Some(slot) = self.next_slot() else {
            return Ok(false);
        };
        let Some(g) = self.grown.get_mut(id as usize - 1).and_then(Option::take) else {
            return Ok(false);
        };
        debug_assert_eq!(g.free.free_words(), u64::from(g.area.words()));
        self.grown_bytes -= g.area.bytes();
        self.areas_retired += 1;
        self.retiring |= 1u64 << id;
        self.free_slots.pop();
        self.in_flight += 1;
        let seq = self.descriptors.published();
        let s = &mut self.slots[slot as usize];
        s.seq = seq;
        s.in_flight = true;
        s.retires = Some(id);
        self.descriptors.publish(own, Descriptor::retire(slot, id));
        // Unmapped here: nothing of ours refers to it (it was empty). The
        // peer unmaps its view when it takes the entry.
        drop(g);
        Ok(true)
    }
}

/// [`FreeList::allocate`] for a segment lent to a builder: a large one
/// ([`LARGE_SEGMENT_WORDS`]) at its phase in the page if `free` has room
/// for it there, anywhere otherwise.
#[inline]
fn allocate_placed(free: &mut FreeList, min: u32, want: u32) -> Option<Extent> {
    if min >= LARGE_SEGMENT_WORDS {
        if let Some(extent) = free.allocate_at_phase(min, want, LARGE_PHASE, PAGE_WORDS) {
            return Some(extent);
        }
    }
    free.allocate(min, want)
}

/// The words of `segment`, a segment of a message that passed
/// [`Books::check_fits`] or one that fits in an open span: at most
/// [`MAX_REGION`] bytes, so the words fit a `u32`.
fn words_of(segment: &[u8]) -> u32 {
    let words = segment.len() / WORD_BYTES;
    debug_assert!(u32::try_from(words).is_ok(), "check_fits let it through");
    // Cannot truncate: checked against MAX_REGION (see above).
    #[allow(clippy::cast_possible_truncation)]
    let words = words as u32;
    words
}

/// The words of open span `open` after its first `used`.
fn tail(open: Span, used: u32) -> Span {
    debug_assert!(used <= open.extent.len);
    Span {
        area: open.area,
        extent: Extent {
            start: open.extent.start + used,
            len: open.extent.len - used,
        },
    }
}

/// The sending side of one end.
///
/// All its mutable state sits in one `RefCell`, which is also what makes a
/// sender `!Sync`: misuse across threads names that one type.
#[derive(Debug)]
pub(crate) struct SendSide<W: Word = AtomicU32> {
    link: Arc<Link<W>>,
    state: RefCell<SendState>,
}

/// What the sending side changes as it goes.
#[derive(Debug)]
pub(crate) struct SendState {
    books: Books,
    waiter: Waiter,
    /// Sends since the counter wrapped (see `SENDS_PER_LIVENESS_CHECK`).
    sends: u32,
    /// Segments the allocator had to take from the heap (region full).
    spilled: u64,
    /// Messages and bytes sent, and wakes sent to a sleeping receiver.
    messages: u64,
    bytes: u64,
    wakes: u64,
}

/// What a blocked sender waits for: the peer's `released` counter moving
/// past `seen`, or, when the descriptor ring was full, its `consumed`
/// counter moving past the value the full ring was seen with (a peer that
/// takes a message while holding others wakes the `released` word, see
/// `recv.rs`). Both values are from the failed attempt to publish, so that
/// whatever the peer did since counts.
struct SpaceFreed<'a, W: Word> {
    link: &'a Link<W>,
    seen: u32,
    ring_full_at: Option<u32>,
}

impl<'a, W: Word> SpaceFreed<'a, W> {
    fn new(link: &'a Link<W>, books: &Books) -> SpaceFreed<'a, W> {
        SpaceFreed {
            link,
            seen: books.releases.reclaimed(),
            ring_full_at: books.descriptors.full_at(books.geometry.ring_capacity),
        }
    }
}

impl<W: Word> Condition<W> for SpaceFreed<'_, W> {
    fn flag(&self) -> Mine<'_, W> {
        self.link.own().tx_sleeping()
    }

    fn counter(&self) -> Theirs<'_, W> {
        self.link.peer().released()
    }

    fn idle(&self, seen: u32) -> bool {
        seen == self.seen
    }

    /// The ring was full: the peer's take, which stores `consumed`, ends
    /// the wait too (slept on, so a take that wakes us before we sleep is
    /// not lost).
    fn also(&self) -> Option<(Theirs<'_, W>, u32)> {
        Some((self.link.peer().consumed(), self.ring_full_at?))
    }

    fn ready(&self) -> bool {
        let peer = self.link.peer();
        peer.released().load() != self.seen
            || self
                .ring_full_at
                .is_some_and(|consumed| peer.consumed().load() != consumed)
    }
}

impl<W: Word> SendSide<W> {
    /// The sending side over `link`, whose first message is number `start`
    /// (0 for a new channel).
    pub(crate) fn new(link: Arc<Link<W>>, start: u32) -> SendSide<W> {
        let geometry = link.own().geometry();
        let peer_capacity = link.peer().geometry().held_capacity;
        let options = link.options();
        let waiter = Waiter::new(options.spin, options.wait_slice);
        let limit = link.outgoing_limit();
        SendSide {
            state: RefCell::new(SendState {
                books: Books::new(geometry, peer_capacity, limit, start),
                waiter,
                sends: 0,
                spilled: 0,
                messages: 0,
                bytes: 0,
                wakes: 0,
            }),
            link,
        }
    }

    pub(crate) fn link(&self) -> &Arc<Link<W>> {
        &self.link
    }

    /// The side's counters.
    pub(crate) fn stats(&self) -> SendStats {
        let Ok(mut state) = self.state.try_borrow_mut() else {
            return SendStats::default();
        };
        // Read the releases that came since the last send, so that what the
        // peer holds is current: only in the process that has claimed the
        // end (asking for counters claims nothing).
        let link = &self.link;
        if link.owned_here() {
            if let Err(p) = state.books.reclaim(link.own(), link.peer()) {
                link.fail(Failure::Protocol(p));
            }
        }
        let books = &state.books;
        let grown_free: u64 = books
            .grown
            .iter()
            .flatten()
            .map(|g| g.free.free_words())
            .sum();
        SendStats {
            messages: state.messages,
            bytes: state.bytes,
            spilled_segments: state.spilled,
            sleeps: state.waiter.sleeps(),
            wakes: state.wakes,
            held_by_peer: books.in_flight(),
            held_by_peer_bytes: books.in_flight_words * WORD,
            held_limit: books.max_in_flight,
            free_bytes: (books.free.free_words() + u64::from(books.kept.len) + grown_free) * WORD,
            areas: u32::try_from(books.grown.iter().flatten().count()).unwrap_or(u32::MAX),
            area_bytes: books.grown_bytes,
            areas_added: books.areas_added,
            areas_retired: books.areas_retired,
        }
    }

    // ---- the allocator's backend -------------------------------------------

    /// Claims the end for this process: `false` when another process owns
    /// it.
    #[cfg(test)]
    pub(crate) fn claim(&self) -> bool {
        self.link.enter().is_ok()
    }

    /// A zeroed span of at least `min` words for a builder, reclaiming
    /// released messages if area 0 is short, and adding an area if nothing
    /// has room. `None`: use the heap.
    #[inline(always)]
    pub(crate) fn allocate_segment(&self, min: u32, want: u32) -> Option<(NonNull<u8>, u32)> {
        if self.link.enter().is_err() {
            return None;
        }
        // Not borrowed elsewhere: no send runs while capnp builds.
        let mut state = self.state.try_borrow_mut().ok()?;
        // The common case inline: `want` words at the bottom of area 0, in
        // memory already used.
        if let Some(span) = state.books.allocate_warm(min, want) {
            return Some((self.link.own().extent_ptr(span.extent), span.extent.len));
        }
        self.allocate_segment_slowly(&mut state, min, want)
    }

    /// [`allocate_segment`](Self::allocate_segment) in full, for the
    /// process that owns the end, with the side's state borrowed.
    #[inline(never)]
    fn allocate_segment_slowly(
        &self,
        state: &mut SendState,
        min: u32,
        want: u32,
    ) -> Option<(NonNull<u8>, u32)> {
        let link = &self.link;
        let mut span = state
            .books
            .allocate(link.own(), link.peer(), min, want)
            .map_err(|p| drop(link.fail(Failure::Protocol(p))))
            .ok()?;
        // Room for what capnp would like, or failing that for what it needs.
        // Building waits for nothing (capnp's allocator has no deadline to
        // keep, and a user does not expect `set_root` to block): an area
        // is added only if the socket takes its record at once. Otherwise
        // the segment comes from the heap, and `send` copies it in, growing
        // then within the send's deadline.
        let mut grow = |words| self.grow(&mut state.books, &state.waiter, words, Deadline::Now);
        let grown = span.is_none()
            && match grow(want.max(min)) {
                Ok(grown) => grown || (want > min && matches!(grow(min), Ok(true))),
                Err(_) => false,
            };
        if grown {
            span = state.books.allocate_grown(min, want);
            if let Some(s) = span {
                state.books.open.push(s);
            }
        }
        let placed = span.and_then(|s| {
            let ptr = state.books.span_ptr(link.own(), s);
            if ptr.is_none() {
                // Never (debug-asserted): not lent after all.
                state.books.open.pop();
            }
            Some((ptr?, s.extent.len))
        });
        if placed.is_none() {
            state.spilled += 1;
        }
        placed
    }

    /// Takes back a builder's segment that this side lent it, as
    /// [`deallocate_segment`](Self::deallocate_segment) does, for a caller
    /// that knows `ptr` is ours: a sent message's segments (nothing open)
    /// cost a look at the books and no search.
    ///
    /// The span lent last, the common case (a builder of one segment
    /// dropped after a send that carried it, or unsent), is taken back
    /// here without a search.
    #[inline]
    pub(crate) fn deallocate_own_segment(&self, ptr: NonNull<u8>, words_used: u32) {
        if let Ok(mut state) = self.state.try_borrow_mut() {
            let books = &mut state.books;
            let Some(&last) = books.open.last() else {
                return; // sent: the segment is the peer's until released
            };
            let own = self.link.own();
            if last.area == 0 && own.is_at(ptr.as_ptr(), last.extent.start) {
                // In a process that does not own the end (a builder
                // inherited through fork), the words are the owner's.
                if self.link.owned_here() {
                    books.open.pop();
                    books.give_back_open(own, last, words_used);
                }
                return;
            }
        }
        let ours = self.deallocate_segment(ptr, words_used);
        debug_assert!(ours, "a segment the side lent is in its space");
    }

    /// Takes back a builder's segment. Returns `false` when `ptr` is not in
    /// our outgoing space (a heap segment, for the caller to free).
    #[inline(never)]
    pub(crate) fn deallocate_segment(&self, ptr: NonNull<u8>, words_used: u32) -> bool {
        let own = self.link.own();
        let Ok(mut state) = self.state.try_borrow_mut() else {
            // Never happens (no builder drops while this side is busy); if
            // it did, claiming the pointer leaks a heap segment, where
            // disowning it could free memory of an area.
            return true;
        };
        let Some((area, start)) = state.books.locate(own, ptr.as_ptr()) else {
            return false;
        };
        // A sent message's segment: nothing is open once it is published.
        if state.books.open.is_empty() {
            return true;
        }
        // In a process that does not own the end (a builder inherited
        // through fork), the words are the owner's: touch nothing.
        if !self.link.owned_here() {
            return true;
        }
        // A segment that was sent is no longer open; `deallocate` leaves it.
        state.books.deallocate(own, area, start, words_used);
        true
    }

    /// Adds an area with room for `words` words and hands it to the peer,
    /// if the limits allow (first giving back areas idle long enough),
    /// waiting for room on the socket until `deadline`. `Ok(false)` when
    /// no area could be added: the limits, the ids, or the system (a
    /// descriptor, memory) said no.
    ///
    /// # Errors
    ///
    /// What stopped the hand-over (see [`hand_over`](Self::hand_over)):
    /// `Expired` leaves everything as it was, the channel usable.
    fn grow(
        &self,
        books: &mut Books,
        waiter: &Waiter,
        words: u32,
        deadline: Deadline,
    ) -> Result<bool, Halt> {
        let link = &*self.link;
        if !link.can_grow() {
            return Ok(false);
        }
        let _ = self.retire_idle(books, link.options().area_idle);
        let mut planned = books.plan_area(words);
        if planned.is_none() && books.plan_area_without_empty(words) {
            // Empty areas not idle long enough yet are all that stand in
            // the way: give them back now rather than refuse the message
            // (or spill it) while nothing in flight may ever free room.
            let _ = self.retire_idle(books, Duration::ZERO);
            planned = books.plan_area(words);
        }
        let Some((id, bytes)) = planned else {
            return Ok(false);
        };
        let Ok((area, fd)) = OwnArea::create(bytes, link.own().is_sealed()) else {
            return Ok(false);
        };
        // Ours from before the peer has it, so that it cannot hand it back.
        link.note_own_area(id, area.file_id());
        if let Err(halt) = self.hand_over(waiter, id, bytes, &fd, deadline) {
            // Not handed over: the area unmaps and its file closes here,
            // and the peer never heard of it.
            link.forget_own_area(id);
            return Err(halt);
        }
        books.add_area(id, area);
        Ok(true)
    }

    /// Sends the record of area `id` with its descriptor on the socket,
    /// waiting (in slices, watching for a dead peer) while the socket is
    /// full, until `deadline`. The peer reads it before any descriptor
    /// that names the area: `sendmsg` has queued it on the peer's socket
    /// before we publish.
    ///
    /// # Errors
    ///
    /// `Expired` when the socket stayed full until `deadline` and nothing
    /// of the record went out: the channel goes on. `Disconnected` for a
    /// peer that is gone. A record begun cannot be withdrawn from the
    /// stream, and the peer cannot parse what follows half a record, so
    /// its rest waits up to `setup_timeout`, whatever `deadline` says, and
    /// the channel fails if it cannot go out then. (Linux queues a record
    /// this small on a Unix socket whole or not at all, so with a full
    /// socket it is the first case.)
    fn hand_over(
        &self,
        waiter: &Waiter,
        id: u32,
        bytes: u64,
        fd: &OwnedFd,
        deadline: Deadline,
    ) -> Result<(), Halt> {
        let link = &*self.link;
        let mut finish_by = None;
        let sent = link.send_area_record(id, bytes, fd, |started| {
            if link.peer_closed() {
                return Err(Halt::Disconnected);
            }
            let until = if started {
                *finish_by.get_or_insert_with(|| Deadline::after(link.options().setup_timeout))
            } else {
                deadline
            };
            let slice = until.slice(waiter.slice()).ok_or(Halt::Expired)?;
            link.wait_writable(slice)
        });
        sent.map_err(|h| match h {
            Halt::Failed(f) => Halt::Failed(link.fail(f)),
            h => h,
        })
    }

    /// Gives back the areas empty for `idle` (`Options::area_idle`, or
    /// zero: every empty one), reading the peer's releases first, so that
    /// an area emptied by them counts.
    fn retire_idle(&self, books: &mut Books, idle: Duration) -> Result<(), Failure> {
        let link = &*self.link;
        if !books.has_areas() {
            return Ok(());
        }
        if books.releases.pending(link.peer()) {
            books
                .reclaim(link.own(), link.peer())
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
        }
        let now = Instant::now();
        while let Some(id) = books.idle_area(idle, now) {
            let retired = books
                .retire(link.own(), link.peer(), id)
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
            if !retired {
                break;
            }
            link.forget_own_area(id);
            self.announce(books);
        }
        Ok(())
    }

    /// Makes everything published count, and wakes the peer if it sleeps.
    /// Returns how it slept.
    fn announce(&self, books: &Books) -> u32 {
        let link = &*self.link;
        let own = link.own();
        link.wake_peer(
            || books.descriptors.store_count(own),
            own.published(),
            link.peer().rx_sleeping(),
            Wakes::Receiver,
        )
    }

    // ---- readiness for event loops -----------------------------------------

    /// Asks the peer to ring the socket when it releases a message (or
    /// closes), for an event loop that waits in `poll` after a send found
    /// no room; `Ready` (nothing armed) when a release came already. Polls the socket first (old doorbells,
    /// a peer that is gone).
    ///
    /// # Errors
    ///
    /// The end failed, or is not this process's.
    pub(crate) fn arm(&self) -> Result<Readiness, Failure> {
        let link = &*self.link;
        link.enter()?;
        link.poll_peer()?;
        let state = self.state.borrow();
        let cond = SpaceFreed::new(link, &state.books);
        Ok(state.waiter.arm(link, &cond))
    }

    /// Withdraws [`arm`](Self::arm).
    pub(crate) fn disarm(&self) {
        if self.link.owned_here() {
            wake::withdraw(self.link.own().tx_sleeping());
        }
    }

    /// Whether a send that found no room could find some now: the peer
    /// released (or took) a message not yet seen, or the end closed or
    /// failed. Loads only.
    pub(crate) fn ready(&self) -> bool {
        let link = &*self.link;
        let state = self.state.borrow();
        let cond = SpaceFreed::new(link, &state.books);
        cond.ready() || link.peer_closed() || link.enter().is_err()
    }

    // ---- sending -----------------------------------------------------------

    /// Publishes `segments` (capnp's output of one message, at least one),
    /// waiting for room until `deadline`.
    ///
    /// # Errors
    ///
    /// `Expired` when there was no room in time, and the other [`Halt`]s;
    /// `TooLarge` for a message that can never fit.
    pub(crate) fn send(&self, segments: &[&[u8]], deadline: Deadline) -> Result<(), SendHalt> {
        let link = &*self.link;
        link.enter()?;
        if link.peer_closed() || link.closed_here() {
            return Err(Halt::Disconnected.into());
        }
        // Held for the whole send: nothing else of this side runs meanwhile
        // (the builder is not touched until `send` returns).
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        // A sender that never has to wait would not notice a killed peer
        // until the ring filled: every so many sends, look for hang-up (at
        // most once per wait slice, so a stream pays nothing measurable),
        // and for areas to give back.
        state.sends = state.sends.wrapping_add(1);
        if state.sends % SENDS_PER_LIVENESS_CHECK == 0 {
            state.waiter.poll_peer_if_due(link)?;
            if link.peer_closed() {
                return Err(Halt::Disconnected.into());
            }
            self.retire_idle(&mut state.books, link.options().area_idle)?;
        } else if state.books.has_areas() && link.options().area_idle.is_zero() {
            self.retire_idle(&mut state.books, Duration::ZERO)?;
        }
        let books = &mut state.books;
        // The common case first: a message of one segment, built in the
        // span lent last, with room in the ring and a free slot now.
        if let [segment] = segments {
            let published = books
                .try_publish_one(link.own(), link.peer(), segment)
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
            if published {
                self.sent(state, segment.len() as u64);
                return Ok(());
            }
        }
        self.send_slowly(state, segments, deadline)
    }

    /// [`send`](Self::send) of anything but the common case, or when it
    /// found no room at once: out of line, so that the common case saves
    /// and restores no more registers than it uses.
    #[inline(never)]
    fn send_slowly(
        &self,
        state: &mut SendState,
        segments: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), SendHalt> {
        let link = &*self.link;
        let books = &mut state.books;
        let count = books.check_fits(segments).map_err(SendHalt::TooLarge)?;
        loop {
            let missing = books
                .try_publish(link.own(), link.peer(), segments, count)
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
            let Err(missing) = missing else { break };
            let reclaimed = books
                .reclaim(link.own(), link.peer())
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
            if reclaimed > 0 {
                continue;
            }
            if let NoRoom::Space { words } = missing {
                if self.grow(books, &state.waiter, words, deadline)? {
                    continue;
                }
                if books.in_flight() == 0 {
                    // Nothing will ever be released: no wait can help.
                    return Err(SendHalt::TooLarge(books.cannot_place(link.own(), segments)));
                }
            }
            let cond = SpaceFreed::new(link, books);
            wait_for_release(link, &state.waiter, &cond, deadline)?;
        }
        let bytes = match segments {
            [only] => only.len() as u64,
            all => all.iter().map(|s| s.len() as u64).sum(),
        };
        self.sent(state, bytes);
        Ok(())
    }

    /// After a publish: the message counts from here on; wake the peer if
    /// it sleeps.
    #[inline(always)]
    fn sent(&self, state: &mut SendState, bytes: u64) {
        let how = self.announce(&state.books);
        state.messages += 1;
        state.bytes += bytes;
        state.wakes += u64::from(how != AWAKE);
    }
}

/// Waits until the peer releases or takes something past what `cond` saw
/// (or the deadline passes, or the peer goes away).
fn wait_for_release<W: Word>(
    link: &Link<W>,
    waiter: &Waiter,
    cond: &SpaceFreed<'_, W>,
    deadline: Deadline,
) -> Result<(), Halt> {
    if let Deadline::Now = deadline {
        waiter.poll_peer_if_due(link)?;
    } else {
        waiter.wait(link, cond, deadline)?;
    }
    if !cond.ready() && link.peer_closed() {
        return Err(Halt::Disconnected);
    }
    match deadline {
        Deadline::Now => Err(Halt::Expired),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Backing;

    /// Books over a real 64 KiB region, with no area added.
    fn books() -> (Books, OwnRegion) {
        let geometry = Geometry {
            region_size: 64 << 10,
            ring_capacity: 4,
            held_capacity: 4,
        };
        let (own, _fd) = OwnRegion::create(geometry, Backing::Memfd).unwrap();
        (Books::new(geometry, 4, u64::MAX, 0), own)
    }

    fn in_area(area: u32) -> Span {
        Span {
            area,
            extent: Extent { start: 0, len: 1 },
        }
    }

    fn span(area: u32, start: u32, len: u32) -> Span {
        Span {
            area,
            extent: Extent { start, len },
        }
    }

    // A run joins only the span that follows it in the same area: word 8
    // of area 1 follows word 7 of area 0 by number, not in memory.
    #[test]
    fn a_run_of_released_spans_joins_neighbours_in_one_area_only() {
        let (mut books, own) = books();
        let (area, _fd) = OwnArea::create(64 << 10, false).unwrap();
        books.add_area(1, area);
        let (words_0, words_1) = (books.free.free_words(), 8192);
        assert_eq!(books.free.allocate(8, 8), Some(Extent { start: 0, len: 8 }));
        let held = books.free_list(1).and_then(|f| f.allocate(24, 24));
        assert_eq!(held, Some(Extent { start: 0, len: 24 }));
        books.in_flight_words = 24;
        let mut run = NO_SPAN;
        for s in [span(0, 0, 8), span(1, 8, 8), span(1, 16, 8)] {
            // SAFETY: taken above and never lent: nothing refers to them.
            unsafe { books.give_back_joined(&own, &mut run, s) };
        }
        assert_eq!(run, span(1, 8, 16), "the two spans of area 1 joined");
        books.free_span(run);
        assert_eq!(books.free.free_words(), words_0);
        let free_1 = books.free_list(1).map(|f| f.free_words());
        assert_eq!(
            free_1,
            Some(words_1 - 8),
            "area 1's first 8 words still held"
        );
        assert_eq!(books.in_flight_words, 0);
    }

    // A builder's span given back is zeroed and kept for the next builder,
    // out of the free list; a search of the free list gets it back first.
    #[test]
    fn a_span_given_back_is_kept_for_the_next_builder_and_returned_before_a_search() {
        let (mut books, own) = books();
        let total = books.free.free_words();
        books.high_water = 1024; // as if lent before: warm
        let lent = books.allocate_warm(1, 64).expect("warm words");
        assert_eq!(lent, span(0, 0, 64));
        let ptr = books.span_ptr(&own, lent).unwrap().as_ptr();
        // SAFETY: the span is lent to us, as to a builder: nothing else
        // refers to its words.
        unsafe { std::ptr::write_bytes(ptr, 0xff, 3 * WORD_BYTES) };
        books.open.pop();
        books.give_back_open(&own, lent, 3);
        // SAFETY: as above; given back, and nobody writes it.
        let words = unsafe { std::slice::from_raw_parts(ptr, 64 * WORD_BYTES) };
        assert!(words.iter().all(|&b| b == 0), "the written words zeroed");
        assert_eq!(books.kept, lent.extent);
        assert_eq!(books.free.free_words(), total - 64, "kept out of the list");

        assert_eq!(books.allocate_warm(1, 64), Some(lent), "the same words");
        assert_eq!(books.kept.len, 0);
        books.open.pop();
        books.give_back_open(&own, lent, 0);
        assert_eq!(books.kept, lent.extent);

        // Every word of area 0 at once: only with the kept span merged back.
        let all = u32::try_from(total).unwrap();
        assert_eq!(books.take_exact(all), Some(span(0, 0, all)));
        assert_eq!(books.kept.len, 0);
    }

    #[test]
    fn spans_in_area_0_need_no_area() {
        let (mut books, own) = books();
        assert!(books.span_ptr(&own, in_area(0)).is_some());
        assert!(books.free_list(0).is_some());
    }

    // The books name only areas that exist: a span of another is a bug,
    // asserted, never a dangling pointer for capnp or a silent no-op.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "area 3, not there")]
    fn the_address_of_a_span_in_an_absent_area_is_a_bug() {
        let (books, own) = books();
        let _ = books.span_ptr(&own, in_area(3));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "area 2, not there")]
    fn freeing_a_span_in_an_absent_area_is_a_bug() {
        let (mut books, _own) = books();
        books.free_span(in_area(2));
    }
}
