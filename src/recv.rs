//! The receiving side of one end: taking the peer's messages, the receive
//! loop, and releasing what was read.

use std::cell::{Cell, RefCell};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use capnp::message::ReaderOptions;

use crate::deadline::Deadline;
use crate::error::ProtocolError;
use crate::error::{Failure, Halt};
use crate::fault::{self, Fault};
use crate::layout::{AWAKE, CARRIED_WORDS, WORD};
use crate::link::{Link, Wakes};
use crate::region::{Extent, PeerArea, Span};
use crate::ring::{
    Carried, CarriedBuffers, DescriptorConsumer, Entry, ReleaseProducer, SegmentTable, Taken,
    TakenOne, Took,
};
use crate::segment_ref::SegmentRef;
use crate::spares::Spares;
use crate::stats::RecvStats;
use crate::wait::{Condition, Readiness, Waiter};
use crate::wake::withdraw;
use crate::word::{Mine, Theirs, Word};

/// The receiving side of one end.
///
/// Its state changes only through the `Cell`s of its ring halves and its
/// waiter, always through shared references (a received message releases
/// itself through one). It sits in one `RefCell`, borrowed shared, so that
/// misuse across threads names one type; the buffers kept for the next
/// messages sit beside it, each pool in a `RefCell` of its own.
#[derive(Debug)]
pub(crate) struct RecvSide<W: Word = AtomicU32> {
    link: Arc<Link<W>>,
    state: RefCell<RecvState>,
    /// Place buffers of dropped messages that lay in the peer's areas.
    spare_places: Spares<Vec<Place>, SPARES>,
    /// Out-of-line segment tables of dropped messages.
    spare_tables: Spares<Vec<Span>, SPARES>,
    /// The lists of segments past the first of dropped messages.
    spare_segment_refs: Spares<Vec<SegmentRef>, SPARES>,
    /// The buffers of dropped carried messages.
    carried: CarriedBuffers,
    /// The reader limits of every carried message: those of a message of
    /// [`CARRIED_WORDS`], worked out once (for a message so small they do
    /// not depend on its size).
    carried_limits: ReaderOptions,
}

/// The receiving side's halves of both rings, and its waiter.
#[derive(Debug)]
pub(crate) struct RecvState {
    descriptors: DescriptorConsumer,
    releases: ReleaseProducer,
    waiter: Waiter,
    /// Messages and bytes taken, messages taken and not yet released, and
    /// wakes sent to a sender waiting for room.
    messages: Cell<u64>,
    bytes: Cell<u64>,
    held: Cell<u32>,
    wakes: Cell<u64>,
}

/// Vectors of dropped messages of several segments kept for the next
/// ones, of each kind: enough for a receiver that holds a few such
/// messages at a time.
const SPARES: usize = 8;

/// Where one segment of a received message that lies (partly) in the
/// peer's areas is.
#[derive(Debug)]
pub(crate) enum Place {
    /// In the peer's region, read through the receiving side.
    Region(Extent),
    /// In one of its areas, which the `Arc` keeps mapped even after the
    /// peer retires it.
    Area(Arc<PeerArea>, Extent),
    /// In an area that is not there. Never: the table was validated
    /// against the areas just before, and only this receiving side retires
    /// them (debug-asserted). Read as no segment, which capnp reports, not
    /// as bytes of another area.
    Missing,
}

impl Place {
    /// The segment's bytes in place. The table was validated against the
    /// areas, so this succeeds; an empty slice would only make capnp report
    /// an error.
    pub(crate) fn bytes<'a, W: Word>(&'a self, side: &'a RecvSide<W>) -> Option<&'a [u8]> {
        let found = match self {
            Place::Region(extent) => side.link.peer().segment(*extent),
            Place::Area(area, extent) => area.segment(*extent),
            Place::Missing => return None,
        };
        Some(found.unwrap_or(&[]))
    }

    /// Copies the segment into `dst` (exactly as long) with `Relaxed`
    /// loads (see `PeerRegion::copy_segment`); `false` if it is not there.
    pub(crate) fn copy<W: Word>(&self, side: &RecvSide<W>, dst: &mut [u8]) -> bool {
        match self {
            Place::Region(extent) => side.link.peer().copy_segment(*extent, dst),
            Place::Area(area, extent) => area.copy_segment(*extent, dst),
            Place::Missing => false,
        }
    }
}

/// What a waiting receiver waits for: the peer's next message.
struct MessageReady<'a, W: Word> {
    link: &'a Link<W>,
    descriptors: &'a DescriptorConsumer,
}

impl<W: Word> Condition<W> for MessageReady<'_, W> {
    fn flag(&self) -> Mine<'_, W> {
        self.link.own().rx_sleeping()
    }

    fn counter(&self) -> Theirs<'_, W> {
        self.link.peer().published()
    }

    fn idle(&self, seen: u32) -> bool {
        self.descriptors.nothing_published(seen)
    }

    /// The next descriptor's tag: it is stored before `published` and sits
    /// on the line the receiver reads next anyway.
    fn ready(&self) -> bool {
        self.descriptors.next_ready(self.link.peer())
    }
}

impl<W: Word> RecvSide<W> {
    /// The receiving side over `link`, whose first message from the peer
    /// (and first release) is number `start` (0 for a new channel).
    pub(crate) fn new(link: Arc<Link<W>>, start: u32) -> RecvSide<W> {
        let options = link.options();
        let waiter = Waiter::new(options.spin, options.wait_slice);
        let carried_limits = options.reader_options_for(CARRIED_WORDS as u64);
        RecvSide {
            link,
            state: RefCell::new(RecvState {
                descriptors: DescriptorConsumer::new(start),
                releases: ReleaseProducer::new(start),
                waiter,
                messages: Cell::new(0),
                bytes: Cell::new(0),
                held: Cell::new(0),
                wakes: Cell::new(0),
            }),
            spare_places: Spares::default(),
            spare_tables: Spares::default(),
            spare_segment_refs: Spares::default(),
            carried: CarriedBuffers::default(),
            carried_limits,
        }
    }

    /// The reader limits of a carried message.
    #[inline(always)]
    pub(crate) fn carried_limits(&self) -> ReaderOptions {
        self.carried_limits
    }

    pub(crate) fn link(&self) -> &Arc<Link<W>> {
        &self.link
    }

    /// Runs `f` with this side's waiter and the condition it sleeps on
    /// (for `wait_any`).
    pub(crate) fn with_waiter<R>(&self, f: impl FnOnce(&Waiter, &dyn Condition<W>) -> R) -> R {
        let state = self.state.borrow();
        self.before_waiting(&state);
        let cond = MessageReady {
            link: &self.link,
            descriptors: &state.descriptors,
        };
        f(&state.waiter, &cond)
    }

    /// The side's counters.
    pub(crate) fn stats(&self) -> RecvStats {
        let state = self.state.borrow();
        RecvStats {
            messages: state.messages.get(),
            bytes: state.bytes.get(),
            sleeps: state.waiter.sleeps(),
            wakes: state.wakes.get(),
            held: state.held.get(),
            held_limit: self.link.own().geometry().held_capacity,
        }
    }

    /// The next message, if it is of the common kind (one segment in the
    /// peer's region) and there now, in a process that owns the end and has
    /// seen no close: the fast path of every receive, inline in the caller.
    /// `None` for anything else, which [`recv`](Self::recv) then handles
    /// in full (nothing is taken here unless it is returned).
    #[inline(always)]
    pub(crate) fn take_one(&self) -> Option<Took<TakenOne>> {
        let link = &*self.link;
        if link.has_seen_close() || link.enter().is_err() {
            return None;
        }
        let state = self.state.try_borrow().ok()?;
        self.take_simple_counted(&state)
    }

    /// Takes the next message the peer published, waiting until `deadline`.
    /// Once the peer has closed (or died), messages it published before
    /// are still delivered, then `Disconnected`.
    ///
    /// For the receives after [`take_one`](Self::take_one) found no message
    /// of the common kind: the first look goes straight to the general
    /// path, as the common kind's test would only read the same descriptor
    /// again (an empty poll of an event loop, a message of several
    /// segments); what the peer published since is taken all the same.
    /// Without a deadline, a first look that finds the next tag missing
    /// waits at once. Every later look (after a wait) tries the common
    /// kind first.
    ///
    /// # Errors
    ///
    /// `Expired` when nothing came in time, and the other [`Halt`]s.
    pub(crate) fn recv(&self, deadline: Deadline) -> Result<Took<Taken>, Halt> {
        let mut simple = false;
        let link = &*self.link;
        let state = self.state.borrow();
        loop {
            if link.has_seen_close() {
                return self.drain(&state);
            }
            let forever = matches!(deadline, Deadline::Never);
            let taken = if !simple && forever && !state.descriptors.next_ready(link.peer()) {
                // The first look of a receive that waits as long as it
                // takes, after `take_one` found nothing there: nothing to
                // take, and no need to read the peer's `published` to say
                // so, a line its next send would then have to take back
                // from us. A count stored without its entry is caught at
                // the next look, after the wait; a receive with a deadline
                // looks in full, as it may not look again.
                link.enter()?;
                None
            } else {
                self.take_counted(&state, simple)?
            };
            simple = true;
            if let Some(taken) = taken {
                return Ok(taken);
            }
            if link.peer_closed() {
                return self.drain(&state);
            }
            if let Deadline::Now = deadline {
                state.waiter.poll_peer_if_due(link)?;
                if link.peer_closed() {
                    continue; // gone: drain what it sent, then Disconnected
                }
                return Err(Halt::Expired);
            }
            self.before_waiting(&state);
            let cond = MessageReady {
                link,
                descriptors: &state.descriptors,
            };
            state.waiter.wait(link, &cond, deadline)?;
        }
    }

    /// Before this receiver waits while it holds messages: a sender that
    /// found the descriptor ring full may be waiting for a take it was not
    /// woken for (the first take after holding nothing wakes no one, as its
    /// release usually follows), and would otherwise wait its whole slice
    /// while we wait for its next message. loom found this one
    /// (`model.rs`, `full_ring_while_receiver_holds`).
    fn before_waiting(&self, state: &RecvState) {
        if state.held.get() > 0 {
            self.wake_after_take(state);
        }
    }

    /// Takes the peer's next message, if there is one, and counts it: the
    /// common kind directly (if `simple`: not when the caller has just
    /// looked for it), anything else through
    /// [`take_message`](Self::take_message).
    #[inline(always)]
    fn take_counted(
        &self,
        state: &RecvState,
        simple: bool,
    ) -> Result<Option<Took<Taken>>, Failure> {
        let link = &*self.link;
        link.enter()?;
        if simple {
            if let Some(took) = self.take_simple_counted(state) {
                return Ok(Some(took.into_taken()));
            }
        }
        self.take_counted_slowly(state)
    }

    /// [`take_counted`](Self::take_counted) of anything but the common
    /// kind (or of nothing): out of line, so the common case stays small.
    #[inline(never)]
    fn take_counted_slowly(&self, state: &RecvState) -> Result<Option<Took<Taken>>, Failure> {
        let link = &*self.link;
        let taken = self
            .take_message(state)
            .map_err(|p| link.fail(Failure::Protocol(p)))?;
        match &taken {
            Some(Took::Shared(t)) => self.count_taken(state, t.table.words()),
            Some(Took::Carried(c)) => self.count_carried(state, c.words()),
            None => {}
        }
        Ok(taken)
    }

    /// The next message if it is of a common kind, taken and counted.
    #[inline(always)]
    fn take_simple_counted(&self, state: &RecvState) -> Option<Took<TakenOne>> {
        let link = &*self.link;
        let took = state
            .descriptors
            .take_simple(link.peer(), link.own(), &self.carried)?;
        match &took {
            Took::Shared(one) => self.count_taken(state, u64::from(one.extent.len)),
            Took::Carried(c) => self.count_carried(state, c.words()),
        }
        Some(took)
    }

    /// Counts a message of `words` words taken, and wakes a sender that
    /// may wait for it.
    #[inline(always)]
    fn count_taken(&self, state: &RecvState, words: u64) {
        state.messages.set(state.messages.get() + 1);
        state.bytes.set(state.bytes.get() + words * WORD);
        let held = state.held.get();
        state.held.set(held + 1);
        if held > 0 {
            self.wake_after_take(state);
        }
    }

    /// Counts a carried message of `words` words taken. No release will
    /// follow, so the take itself wakes a sender that found the ring full.
    #[inline(always)]
    fn count_carried(&self, state: &RecvState, words: u32) {
        state.messages.set(state.messages.get() + 1);
        state.bytes.set(state.bytes.get() + u64::from(words) * WORD);
        if !fault::active(Fault::CarriedTakeWakesNoOne) {
            self.wake_after_take(state);
        }
    }

    /// Takes the peer's next message, handling the retirements before it.
    /// A descriptor that names an area not handed over yet makes us read
    /// the socket first: the peer queued the area's record there before it
    /// published the descriptor.
    fn take_message(&self, state: &RecvState) -> Result<Option<Took<Taken>>, ProtocolError> {
        let link = &*self.link;
        let mut looked = false;
        let mut spare = self.spare_tables.take_vec();
        let taken = loop {
            let entry = state.descriptors.take(
                link.peer(),
                link.own(),
                &link.peer_areas(),
                &mut spare,
                &self.carried,
            );
            match entry {
                Ok(None) => break Ok(None),
                Ok(Some(Entry::Message(taken))) => break Ok(Some(Took::Shared(taken))),
                Ok(Some(Entry::Carried(c))) => break Ok(Some(Took::Carried(c))),
                Ok(Some(Entry::Retire { slot, seq, area })) => {
                    link.retire_peer_area(area)?;
                    self.release_entry(state, slot, seq);
                }
                Err(ProtocolError::UnknownArea { .. }) if !looked => {
                    looked = true;
                    if let Err(Failure::Protocol(p)) = link.drain_doorbells() {
                        break Err(p);
                    }
                }
                Err(p) => break Err(p),
            }
        };
        self.spare_tables.keep_vec(&mut spare); // unless a message's table took it
        taken
    }

    /// After taking a carried message, or any while holding others: a
    /// sender that found the descriptor ring full waits for a take, and no
    /// release may come soon (none ever, of a carried message); wake it,
    /// once per sleep (the Dekker pair of `wake.rs`, with `consumed`,
    /// stored by the take, as the store; `Link::wake_sender_after_take`).
    /// A receiver that holds nothing releases each message read in place,
    /// and that release wakes the sender: it pays nothing here.
    fn wake_after_take(&self, state: &RecvState) {
        let how = self.link.wake_sender_after_take();
        state.wakes.set(state.wakes.get() + u64::from(how != AWAKE));
    }

    /// After the peer closed or died: the next of the messages it published
    /// before, or `Disconnected`. Everything published before `closed` is
    /// visible by now; after a clean close, nothing published past the count
    /// seen with it is delivered (a peer that reopens and publishes more
    /// stays disconnected).
    fn drain(&self, state: &RecvState) -> Result<Took<Taken>, Halt> {
        if let Some(last) = self.link.closed_at() {
            let left = last.wrapping_sub(state.descriptors.consumed());
            if left == 0 || left > self.link.peer().geometry().ring_capacity {
                return Err(Halt::Disconnected);
            }
        }
        self.take_counted(state, true)?.ok_or(Halt::Disconnected)
    }

    /// Asks the peer to ring the socket when it publishes (or closes), for
    /// an event loop that waits in `poll`; `Ready` (nothing armed) when
    /// something is there already. Polls the socket first, which drains old
    /// doorbells and notices a peer that is gone.
    ///
    /// # Errors
    ///
    /// The end failed, or is not this process's.
    pub(crate) fn arm(&self) -> Result<Readiness, Failure> {
        let link = &*self.link;
        link.enter()?;
        link.poll_peer()?;
        let state = self.state.borrow();
        self.before_waiting(&state);
        let cond = MessageReady {
            link,
            descriptors: &state.descriptors,
        };
        Ok(state.waiter.arm(link, &cond))
    }

    /// Withdraws [`arm`](Self::arm).
    pub(crate) fn disarm(&self) {
        if self.link.owned_here() {
            withdraw(self.link.own().rx_sleeping());
        }
    }

    /// Whether a non-waiting receive would return something other than
    /// "empty" now: a message, or the end of the channel.
    pub(crate) fn ready(&self) -> bool {
        let link = &*self.link;
        let state = self.state.borrow();
        let cond = MessageReady {
            link,
            descriptors: &state.descriptors,
        };
        cond.ready()
            || !cond.idle(cond.counter().load())
            || link.peer_closed()
            || link.enter().is_err()
    }

    /// The place of every segment of `table`, a validated table, each area
    /// kept mapped while the places live: looked up under one lock, in a
    /// buffer a dropped message gave back (see
    /// [`recycle_places`](Self::recycle_places)).
    pub(crate) fn places(&self, table: &SegmentTable) -> Vec<Place> {
        let mut places = self.spare_places.take_vec();
        let areas = self.link.peer_area_table();
        let spans = (0..table.len()).filter_map(|i| table.get(i));
        places.extend(spans.map(|s| match s.area {
            0 => Place::Region(s.extent),
            id => {
                let area = areas.get(id);
                debug_assert!(area.is_some(), "validated area {id} is not there");
                area.map_or(Place::Missing, |a| Place::Area(Arc::clone(a), s.extent))
            }
        }));
        places
    }

    /// Takes back the places of a message that dropped: its areas are let
    /// go (unmapped here once no message holds one the peer retired), the
    /// buffer kept for the next message.
    pub(crate) fn recycle_places(&self, places: &mut Vec<Place>) {
        self.spare_places.keep_vec(places);
    }

    /// Takes back the spans of a message that dropped (the buffer of its
    /// out-of-line table, see [`SegmentTable::take_spans`]), for the next
    /// message of several segments.
    pub(crate) fn recycle_spans(&self, spans: &mut Vec<Span>) {
        self.spare_tables.keep_vec(spans);
    }

    /// An empty list for the segments past the first of a message of
    /// several: a dropped message's, or a new one.
    pub(crate) fn segment_refs(&self) -> Vec<SegmentRef> {
        self.spare_segment_refs.take_vec()
    }

    /// Takes back the list of a dropped message (see
    /// [`segment_refs`](Self::segment_refs)), if it has one.
    #[inline(always)]
    pub(crate) fn recycle_segment_refs(&self, refs: &mut Vec<SegmentRef>) {
        self.spare_segment_refs.keep_vec(refs);
    }

    /// Keeps the buffer of a dropped carried message for the next one
    /// (leaving `None`, if it was not already).
    #[inline(always)]
    pub(crate) fn recycle_carried(&self, carried: &mut Option<Carried>) {
        if let Some(c) = carried.take() {
            self.carried.keep(c.into_buf());
        }
    }

    /// What a dropped message read in place gives back: its release, if
    /// not given already, and its places.
    pub(crate) fn let_go(&self, release: &mut Option<(u32, u32)>, places: &mut Vec<Place>) {
        if let Some((slot, seq)) = release.take() {
            self.release(slot, seq);
        }
        self.recycle_places(places);
    }

    /// Tells the peer we are done with its message `(slot, seq)`, and wakes
    /// it if it sleeps waiting for space. In a process that does not own the
    /// end (a message inherited through fork), does nothing.
    #[inline]
    pub(crate) fn release(&self, slot: u32, seq: u32) {
        if !self.link.owned_here() {
            return;
        }
        let state = self.state.borrow();
        self.release_entry(&state, slot, seq);
        state.held.set(state.held.get().saturating_sub(1));
    }

    /// Appends the release of `(slot, seq)` and wakes the peer if it waits.
    fn release_entry(&self, state: &RecvState, slot: u32, seq: u32) {
        let link = &*self.link;
        let own = link.own();
        state.releases.release(own, slot, seq);
        // A sender armed for space in an event loop waits in poll: the
        // link rings it too.
        let how = link.wake_peer(
            || state.releases.store_count(own),
            own.released(),
            link.peer().tx_sleeping(),
            Wakes::Sender,
        );
        state.wakes.set(state.wakes.get() + u64::from(how != AWAKE));
    }
}
