//! The sending side of one end: our region's data area, the free list, the
//! books of messages in flight, the backend of the capnp allocator, and the
//! send loop.
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
//! forever pins one slot and its own words, nothing else.
//!
//! The books decide which words of the data area are free, lent to a
//! builder, or in flight, so they are what makes every write into the data
//! area sound: each `unsafe` block below names the entry of the books that
//! gives this process the words it writes.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use crate::deadline::Deadline;
use crate::error::{Failure, Halt, ProtocolError, SendHalt, TooLarge, TooLargeKind};
use crate::free::FreeList;
use crate::layout::{Geometry, AWAKE, MAX_SEGMENTS, SLEEPING_ON_SOCKET, WORD, WORD_BYTES};
use crate::link::Link;
use crate::region::{Extent, OwnRegion, PeerRegion};
use crate::ring::{self, Descriptor, DescriptorProducer, Release, ReleaseConsumer};
use crate::stats::SendStats;
use crate::wait::{Condition, Readiness, Waiter};
use crate::wake;
use crate::word::{Mine, Theirs, Word};

/// How often (in sends) a sender that never waits checks the socket for
/// hang-up, subject to at most one check per wait slice.
const SENDS_PER_LIVENESS_CHECK: u32 = 64;

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
    /// On the heap (or another region): copied into `to` at send.
    Copied { to: Extent },
}

/// The sender's books. Every method runs to completion without calling
/// user code. Callers hold the end (`Link::enter`, or `owned_here` for
/// drops), so this process may write the words the books give it.
#[derive(Debug)]
struct Books {
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
    /// Messages sent and not yet released: `max_in_flight` minus the free
    /// slots.
    in_flight: u32,
    /// Words the messages in flight occupy.
    in_flight_words: u64,
    /// Scratch for `try_publish`, kept to reuse its allocation.
    plan: Vec<Placement>,
    descriptors: DescriptorProducer,
    releases: ReleaseConsumer,
}

impl Books {
    fn new(geometry: Geometry, peer_ring_capacity: u32, start: u32) -> Books {
        let cap = geometry.ring_capacity.min(peer_ring_capacity);
        Books {
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
            u64::from(self.max_in_flight)
        );
        self.in_flight
    }

    /// Lends an extent of at least `min` (ideally `want`) words to a builder.
    ///
    /// Releases are read lazily, to keep the peer's `released` line out of
    /// the hot path: only when the free list cannot serve the request from
    /// memory already used (below `high_water`). So a steady stream keeps
    /// reusing the same warm pages instead of walking the whole region, and
    /// pages are faulted in once, not once per lap.
    fn allocate<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
        min: u32,
        want: u32,
    ) -> Result<Option<Extent>, ProtocolError> {
        let mut extent = self.free.allocate(min, want);
        // Only the first `min` words are sure to be written; the rest of a
        // generous segment is usually trimmed away at send.
        let high_water = self.high_water;
        let cold = |e: &Extent| u64::from(e.start) + u64::from(min) > u64::from(high_water);
        if !extent.as_ref().is_some_and(|e| !cold(e)) && self.releases.pending(peer) {
            if let Some(e) = extent.take() {
                self.free.free(e); // untouched, still zero
            }
            self.reclaim(own, peer)?;
            extent = self.free.allocate(min, want);
        }
        let Some(extent) = extent else {
            return Ok(None);
        };
        self.high_water = self.high_water.max(extent.end());
        self.open.push(extent);
        Ok(Some(extent))
    }

    /// Takes back the open extent starting at `start` from a builder dropped
    /// unsent: zeroes the `used` words and frees it. Returns `false` when no
    /// open extent starts there (the message was sent, or the pointer is not
    /// ours).
    fn deallocate<W: Word>(&mut self, own: &OwnRegion<W>, start: u32, used: u32) -> bool {
        let Some(i) = self.open.iter().rposition(|e| e.start == start) else {
            return false;
        };
        let extent = self.open.swap_remove(i);
        let written = Extent {
            start,
            len: used.min(extent.len),
        };
        // SAFETY: `extent` was open, lent to the builder now giving it back:
        // capnp is done with it and nothing else refers to it; our caller
        // holds the end.
        unsafe { own.zero(written) };
        self.free.free(extent);
        true
    }

    /// Reads and applies the peer's new releases. Returns how many.
    fn reclaim<W: Word>(
        &mut self,
        own: &OwnRegion<W>,
        peer: &PeerRegion<W>,
    ) -> Result<u32, ProtocolError> {
        let in_flight = self.in_flight();
        let published = self.descriptors.published();
        let (slots, free, free_slots) = (&mut self.slots, &mut self.free, &mut self.free_slots);
        let count = &mut self.in_flight;
        let words = &mut self.in_flight_words;
        self.releases
            .reclaim(peer, published, in_flight, |Release { slot, seq }| {
                let bad = ProtocolError::BadRelease { slot, seq };
                let s = slots.get_mut(slot as usize).ok_or(bad)?;
                if !s.in_flight || s.seq != seq {
                    return Err(bad);
                }
                for e in s.extents.drain(..) {
                    *words -= u64::from(e.len);
                    // SAFETY: message `seq`'s extent, released by the peer
                    // (validated): nobody reads or refers to it any more.
                    unsafe { own.zero(e) };
                    free.free(e);
                }
                s.in_flight = false;
                free_slots.push(slot);
                *count -= 1;
                Ok(())
            })
    }

    /// Checks what no amount of waiting can fix: too many segments, or more
    /// words than the data area holds. Returns the number of segments.
    fn check_fits(&self, segments: &[&[u8]]) -> Result<u32, TooLarge> {
        let too_many = TooLarge {
            needed: segments.len() as u64,
            limit: u64::from(MAX_SEGMENTS),
            kind: TooLargeKind::Segments,
        };
        let n = u32::try_from(segments.len()).map_err(|_| too_many)?;
        if n > MAX_SEGMENTS {
            return Err(too_many);
        }
        let count = u64::from(n);
        let table = if ring::needs_table(segments.len()) {
            count
        } else {
            0
        };
        // capnp's segments are whole words.
        let words: u64 = segments.iter().map(|s| s.len() as u64 / WORD).sum::<u64>() + table;
        let limit = u64::from(self.geometry.data_words());
        if words > limit {
            return Err(TooLarge {
                needed: words,
                limit,
                kind: TooLargeKind::Words,
            });
        }
        Ok(n)
    }

    /// The error to give when a message cannot be placed and nothing is in
    /// flight, so no release will ever make room: the largest segment to copy
    /// against the largest free extent.
    fn cannot_place<W: Word>(&self, own: &OwnRegion<W>, segments: &[&[u8]]) -> TooLarge {
        let needed = segments
            .iter()
            .filter(|s| self.find_open(own, s).is_none())
            .map(|s| s.len() as u64 / WORD)
            .max()
            .unwrap_or(0);
        TooLarge {
            needed,
            limit: u64::from(self.free.largest()),
            kind: TooLargeKind::Segment,
        }
    }

    /// The open extent a segment lies at the start of, if any.
    fn find_open<W: Word>(&self, own: &OwnRegion<W>, segment: &[u8]) -> Option<Extent> {
        let start = own.offset_of(segment.as_ptr())?;
        let e = *self.open.iter().rev().find(|e| e.start == start)?;
        (segment.len() as u64 <= u64::from(e.len) * WORD).then_some(e)
    }

    /// Publishes a message if a slot and space for its copied segments (and
    /// out-of-line table) are free now; otherwise changes nothing and returns
    /// `false`. `segments` passed [`check_fits`](Self::check_fits), which
    /// counted `count` of them, and is not empty.
    fn try_publish<W: Word>(&mut self, own: &OwnRegion<W>, segments: &[&[u8]], count: u32) -> bool {
        debug_assert!(!segments.is_empty() && segments.len() == count as usize);
        let Some(&slot) = self.free_slots.last() else {
            return false;
        };
        // Plan: find each segment's place, taking space for the copies. The
        // unused tails of in-region segments are freed first (never written,
        // so still zero): a copy may need that space.
        let mut plan = std::mem::take(&mut self.plan);
        plan.clear();
        for s in segments {
            let words = words_of(s);
            if let Some(open) = self.find_open(own, s) {
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
                let words = words_of(s).max(1);
                match self.free.allocate(words, words) {
                    Some(e) => *to = e,
                    None => {
                        complete = false;
                        break;
                    }
                }
            }
        }
        let table = if !complete || !ring::needs_table(segments.len()) {
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
        self.in_flight += 1;
        let seq = self.descriptors.published();
        let index = slot as usize;
        let mut extents = std::mem::take(&mut self.slots[index].extents);
        let mut described = Extent { start: 0, len: 0 };
        for (i, (p, s)) in (0u32..).zip(plan.iter().zip(segments)) {
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
                    // SAFETY: `to` was just taken from the free list for this
                    // message: nothing else refers to it; `s` is the
                    // builder's memory (heap or another region), not ours.
                    unsafe { own.write(to, s) };
                    to
                }
            };
            if placed.len > 0 {
                extents.push(placed);
            }
            match table {
                Some(t) => {
                    let at = Extent {
                        start: t.start + i,
                        len: 1,
                    };
                    let word = ring::table_word(placed).to_le_bytes();
                    // SAFETY: word `i` of the table extent, just taken from
                    // the free list for this message (i < count = t.len).
                    unsafe { own.write(at, &word) };
                }
                None => described = placed,
            }
        }
        if let Some(t) = table {
            extents.push(t);
            described = t;
        }
        self.plan = plan;
        let s = &mut self.slots[index];
        self.in_flight_words += extents.iter().map(|e| u64::from(e.len)).sum::<u64>();
        s.extents = extents;
        s.seq = seq;
        s.in_flight = true;
        let published = self.descriptors.publish(
            own,
            Descriptor {
                slot,
                count,
                extent: described,
            },
        );
        debug_assert_eq!(published, seq);
        true
    }
}

/// The words of `segment`, a segment of a message that passed
/// [`Books::check_fits`]: at most the data area's words, which fit a `u32`.
fn words_of(segment: &[u8]) -> u32 {
    let words = segment.len() / WORD_BYTES;
    debug_assert!(u32::try_from(words).is_ok(), "check_fits let it through");
    // Cannot truncate: checked against the data area (see above).
    #[allow(clippy::cast_possible_truncation)]
    let words = words as u32;
    words
}

/// The words of open extent `open` after its first `used`.
fn tail(open: Extent, used: u32) -> Extent {
    debug_assert!(used <= open.len);
    Extent {
        start: open.start + used,
        len: open.len - used,
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
/// past `seen`.
struct SpaceFreed<'a, W: Word> {
    link: &'a Link<W>,
    seen: u32,
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

    fn ready(&self) -> bool {
        self.link.peer().released().load() != self.seen
    }
}

impl<W: Word> SendSide<W> {
    /// The sending side over `link`, whose first message is number `start`
    /// (0 for a new channel).
    pub(crate) fn new(link: Arc<Link<W>>, start: u32) -> SendSide<W> {
        let geometry = link.own().geometry();
        let peer_capacity = link.peer().geometry().ring_capacity;
        let options = link.options();
        let waiter = Waiter::new(options.spin, options.wait_slice);
        SendSide {
            state: RefCell::new(SendState {
                books: Books::new(geometry, peer_capacity, start),
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
        SendStats {
            messages: state.messages,
            bytes: state.bytes,
            spilled_segments: state.spilled,
            sleeps: state.waiter.sleeps(),
            wakes: state.wakes,
            held_by_peer: books.in_flight(),
            held_by_peer_bytes: books.in_flight_words * WORD,
            held_limit: books.max_in_flight,
            free_bytes: books.free.free_words() * WORD,
        }
    }

    // ---- the allocator's backend -------------------------------------------

    /// Claims the end for this process: `false` when another process owns
    /// it.
    #[cfg(test)]
    pub(crate) fn claim(&self) -> bool {
        self.link.enter().is_ok()
    }

    /// A zeroed extent of at least `min` words for a builder, reclaiming
    /// released messages if the free list is short. `None`: use the heap.
    pub(crate) fn allocate_segment(&self, min: u32, want: u32) -> Option<(NonNull<u8>, u32)> {
        if self.link.enter().is_err() {
            return None;
        }
        let link = &self.link;
        // Not borrowed elsewhere: no send runs while capnp builds.
        let mut state = self.state.try_borrow_mut().ok()?;
        let extent = state
            .books
            .allocate(link.own(), link.peer(), min, want)
            .map_err(|p| drop(link.fail(Failure::Protocol(p))))
            .ok()
            .flatten();
        match extent {
            Some(e) => Some((link.own().extent_ptr(e), e.len)),
            None => {
                state.spilled += 1;
                None
            }
        }
    }

    /// Takes back a builder's segment. Returns `false` when `ptr` is not in
    /// our region (a heap segment, for the caller to free).
    pub(crate) fn deallocate_segment(&self, ptr: NonNull<u8>, words_used: u32) -> bool {
        let own = self.link.own();
        let Some(start) = own.offset_of(ptr.as_ptr()) else {
            return false;
        };
        // In a process that does not own the end (a builder inherited
        // through fork), the words are the owner's: touch nothing.
        if !self.link.owned_here() {
            return true;
        }
        // A segment that was sent is no longer open; `deallocate` leaves it.
        if let Ok(mut state) = self.state.try_borrow_mut() {
            state.books.deallocate(own, start, words_used);
        }
        true
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
        let cond = SpaceFreed {
            link,
            seen: state.books.releases.reclaimed(),
        };
        Ok(state.waiter.arm(link, &cond))
    }

    /// Withdraws [`arm`](Self::arm).
    pub(crate) fn disarm(&self) {
        if self.link.owned_here() {
            wake::withdraw(self.link.own().tx_sleeping());
        }
    }

    /// Whether a send that found no room could find some now: the peer
    /// released a message not yet reclaimed, or the end closed or failed.
    /// Loads only.
    pub(crate) fn ready(&self) -> bool {
        let link = &*self.link;
        let state = self.state.borrow();
        let cond = SpaceFreed {
            link,
            seen: state.books.releases.reclaimed(),
        };
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
        // most once per wait slice, so a stream pays nothing measurable).
        state.sends = state.sends.wrapping_add(1);
        if state.sends % SENDS_PER_LIVENESS_CHECK == 0 {
            state.waiter.poll_peer_if_due(link)?;
            if link.peer_closed() {
                return Err(Halt::Disconnected.into());
            }
        }
        let books = &mut state.books;
        let count = books.check_fits(segments).map_err(SendHalt::TooLarge)?;
        while !books.try_publish(link.own(), segments, count) {
            let reclaimed = books
                .reclaim(link.own(), link.peer())
                .map_err(|p| link.fail(Failure::Protocol(p)))?;
            if reclaimed > 0 {
                continue;
            }
            if books.in_flight() == 0 {
                // Nothing will ever be released: no wait can help.
                return Err(SendHalt::TooLarge(books.cannot_place(link.own(), segments)));
            }
            let seen = books.releases.reclaimed();
            wait_for_release(link, &state.waiter, seen, deadline)?;
        }
        // The message counts from here on; wake the peer if it sleeps.
        let own = link.own();
        let how = wake::wake_peer(
            || books.descriptors.store_count(own),
            own.published(),
            link.peer().rx_sleeping(),
        );
        if how == SLEEPING_ON_SOCKET {
            link.ring_doorbell();
        }
        state.messages += 1;
        state.bytes += segments.iter().map(|s| s.len() as u64).sum::<u64>();
        state.wakes += u64::from(how != AWAKE);
        Ok(())
    }
}

/// Waits until the peer releases something past `seen` (or the deadline
/// passes, or the peer goes away).
fn wait_for_release<W: Word>(
    link: &Link<W>,
    waiter: &Waiter,
    seen: u32,
    deadline: Deadline,
) -> Result<(), Halt> {
    if let Deadline::Now = deadline {
        waiter.poll_peer_if_due(link)?;
    } else {
        waiter.wait(link, &SpaceFreed { link, seen }, deadline)?;
    }
    if link.peer().released().load() == seen && link.peer_closed() {
        return Err(Halt::Disconnected);
    }
    match deadline {
        Deadline::Now => Err(Halt::Expired),
        _ => Ok(()),
    }
}
