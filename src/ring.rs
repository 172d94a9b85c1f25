//! The protocol's two rings, each with its producer and consumer halves
//! side by side, and the encoding of their entries.
//!
//! - The **descriptor ring** lies in the sender's region. Its producer
//!   ([`DescriptorProducer`], the sending side) describes each message in an
//!   entry, or carries a small one in it ([`Carried`]), and counts them in
//!   `published`; its consumer ([`DescriptorConsumer`], the peer's
//!   receiving side) takes them in order, validates each into a private
//!   [`SegmentTable`] (or copies a carried one out) and counts them in its
//!   own `consumed`. A carried message has no release.
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
//! - **Carried messages.** Their words are written `Relaxed` with the rest
//!   of the entry, before the tag, and copied out after the consumer's
//!   `Acquire` fence and before its `Release` store of `consumed`; the
//!   producer rewrites the entry only after loading that counter and
//!   fencing `Acquire` (`has_room`), so the copy never overlaps a rewrite
//!   by an honest producer (and a dishonest one yields a mix of words,
//!   which capnp then validates like any message).
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
use crate::layout::{
    CARRIED_OFFSET, CARRIED_WORDS, INLINE_SEGMENTS, MAX_AREA, MAX_RING, MAX_SEGMENTS,
    SECOND_LINE_PAIR, WORD_BYTES,
};
use crate::region::{Extent, OwnRegion, PeerRegion, Span};
use crate::spares::Spares;
use crate::word::{Pair, TheirPairs, Word};

// ---- the descriptor entry ------------------------------------------------------

/// What a descriptor entry says about one message: the sender's slot, the
/// number of segments, and either the one segment (inline) or, with more
/// segments, the out-of-line table (two words per segment, see
/// [`table_words`]), in area `span.area`.
///
/// An offset of [`CARRIED_OFFSET`] says the segment is *carried* in the
/// entry itself (see [`Carried`]): one segment, slot 0, area 0, `len`
/// words of at most [`CARRIED_WORDS`].
///
/// A count of 0 is not a message but a *retirement*: the sender has given
/// back area `span.area` (extent empty) and will not name it again until it
/// hands over a new area of that id. The receiver unmaps it and releases
/// the entry's slot at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub(crate) slot: u32,
    pub(crate) count: u32,
    /// The segment, or the table, or (count 0) the area retired.
    pub(crate) span: Span,
}

impl Descriptor {
    /// `slot_count`: the slot in bits 0..16 (slots are below 2^16), the
    /// segment count in bits 16..26 (at most 512), the area in bits 26..32.
    fn slot_count(self) -> u32 {
        debug_assert!(self.slot < MAX_RING && self.count <= MAX_SEGMENTS);
        debug_assert!(self.span.area <= MAX_AREA);
        (self.slot & 0xffff) | ((self.count & 0x3ff) << 16) | (self.span.area << 26)
    }

    fn from_words(slot_count: u32, offset: u32, len: u32) -> Descriptor {
        Descriptor {
            slot: slot_count & 0xffff,
            count: (slot_count >> 16) & 0x3ff,
            span: Span {
                area: slot_count >> 26,
                extent: Extent { start: offset, len },
            },
        }
    }

    /// A message of one segment of `words` words carried in its entry (see
    /// the type's notes).
    fn carried(words: u32) -> Descriptor {
        Descriptor {
            slot: 0,
            count: 1,
            span: Span {
                area: 0,
                extent: Extent {
                    start: CARRIED_OFFSET,
                    len: words,
                },
            },
        }
    }

    /// The retirement of area `area` (see the type's notes).
    pub(crate) fn retire(slot: u32, area: u32) -> Descriptor {
        Descriptor {
            slot,
            count: 0,
            span: Span {
                area,
                extent: Extent { start: 0, len: 0 },
            },
        }
    }
}

const _: () = assert!(MAX_SEGMENTS < 1 << 10 && MAX_AREA < 1 << 6);

// ---- carried messages ----------------------------------------------------------

/// The most bytes of a message its descriptor entry carries.
pub(crate) const CARRIED_BYTES: usize = CARRIED_WORDS * WORD_BYTES;

/// Whether a message of one segment of `bytes` bytes travels in its
/// descriptor entry rather than in the data area.
///
/// Such a message costs the receiver one line pair, the entry, which it
/// reads anyway, and no release: it is copied out at once (112 bytes at
/// most, less than the lines a release and a read in place would move
/// between the cores). So the sender never lends its words to the peer,
/// and builds the next small message in the same warm lines.
#[inline(always)]
pub(crate) fn carries(bytes: usize) -> bool {
    bytes <= CARRIED_BYTES
}

/// A message of one segment carried in its descriptor entry, copied out of
/// the peer's ring into a buffer of its own: private, 8-byte aligned,
/// released by nothing. The buffer goes back to the receiving side's
/// [`CarriedBuffers`] when the message drops.
///
/// A buffer rather than the words themselves: a received message moves
/// from the take to the caller's variable, and 112 bytes inline made every
/// move a `memcpy` whose wide stores the first reads of the message then
/// waited on.
pub(crate) struct Carried {
    buf: CarriedBuf,
    /// Words of `buf` that hold the segment, at most [`CARRIED_WORDS`].
    words: u32,
}

/// The words a carried message is copied into.
///
/// A vector of [`CARRIED_WORDS`] rather than a box: a received message
/// keeps a pointer into it (`segment_ref::SegmentRef`) while the message
/// moves, and moving a `Box` asserts it is the only way to its memory,
/// where moving a vector does not.
pub(crate) type CarriedBuf = Vec<capnp::Word>;

impl Carried {
    /// The segment.
    #[inline(always)]
    pub(crate) fn segment(&self) -> &[u8] {
        let bytes = capnp::Word::words_to_bytes(&self.buf[..]);
        bytes
            .get(..self.words as usize * WORD_BYTES)
            .unwrap_or(bytes)
    }

    /// Its length in words.
    pub(crate) fn words(&self) -> u32 {
        self.words
    }

    /// Its buffer, for the next carried message.
    pub(crate) fn into_buf(self) -> CarriedBuf {
        self.buf
    }
}

/// The most buffers of carried messages a receiving side keeps: 1024 of
/// 112 bytes.
const KEPT_CARRIED: usize = 1024;

/// The buffers of dropped carried messages, for the next ones: a receiver
/// that holds at most `n` carried messages at a time allocates `n` buffers
/// in all, and none once it has them, up to [`KEPT_CARRIED`] of them.
pub(crate) type CarriedBuffers = Spares<CarriedBuf, KEPT_CARRIED>;

/// A kept buffer for a carried message, or a new one.
#[inline(always)]
fn carried_buf(buffers: &CarriedBuffers) -> CarriedBuf {
    match buffers.take() {
        Some(buf) => buf,
        None => new_carried_buf(),
    }
}

#[cold]
#[inline(never)]
fn new_carried_buf() -> CarriedBuf {
    vec![capnp::word(0, 0, 0, 0, 0, 0, 0, 0); CARRIED_WORDS]
}

impl std::fmt::Debug for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Carried({} words)", self.words)
    }
}

/// What a take found: a message read where it lies in the peer's space
/// (`Shared`, released when dropped), or one carried in its entry and
/// copied out.
#[derive(Debug)]
pub(crate) enum Took<T> {
    Shared(T),
    Carried(Carried),
}

/// The words a carried descriptor holds, if it is a well-formed one (see
/// [`Descriptor`]).
fn carried_words(d: Descriptor) -> Option<u32> {
    let well_formed = d.count == 1
        && d.slot == 0
        && d.span.area == 0
        && d.span.extent.len as usize <= CARRIED_WORDS;
    well_formed.then_some(d.span.extent.len)
}

/// The tag that marks the entry of message `seq` complete: `seq + 1`, so
/// that a fresh, zeroed ring holds no message 0.
fn tag(seq: u32) -> u32 {
    seq.wrapping_add(1)
}

/// Words per segment in an out-of-line table.
pub(crate) const TABLE_WORDS: u32 = 2;

/// The two words of an out-of-line segment table entry: `offset | len <<
/// 32`, then the area id.
pub(crate) fn table_words(segment: Span) -> [u64; 2] {
    let e = segment.extent;
    [
        u64::from(e.start) | (u64::from(e.len) << 32),
        u64::from(segment.area),
    ]
}

/// The segment a table entry describes (unchecked), `None` for an area id
/// beyond any.
fn table_span(first: u64, second: u64) -> Option<Span> {
    let [a, b, c, d, e, f, g, h] = first.to_le_bytes();
    Some(Span {
        area: u32::try_from(second).ok().filter(|&a| a <= MAX_AREA)?,
        extent: Extent {
            start: u32::from_le_bytes([a, b, c, d]),
            len: u32::from_le_bytes([e, f, g, h]),
        },
    })
}

/// The data areas a receiver can read segments from: area 0 (the peer's
/// region) and the areas the peer handed over. Implemented by the receiving
/// side; a plain slice of sizes in tests and fuzzing.
pub(crate) trait Areas {
    /// Words in area `area`, or `None` when the peer has not handed it over.
    fn words(&self, area: u32) -> Option<u32>;
    /// Word `offset` of area `area`, or `None` outside it.
    fn read_word(&self, area: u32, offset: u32) -> Option<u64>;
    /// Words in all areas together.
    fn total_words(&self) -> u64;
}

/// Whether a message of `count` segments needs an out-of-line table.
pub(crate) fn needs_table(count: usize) -> bool {
    count > INLINE_SEGMENTS
}

/// A message's segments, copied out of the shared descriptor and validated:
/// every extent lies inside an area the peer handed over, and together they
/// fit in the areas. Up to [`INLINE_SEGMENTS`] live inline (no allocation).
#[derive(Debug, Clone)]
pub(crate) struct SegmentTable {
    count: u32,
    inline: [Span; INLINE_SEGMENTS],
    more: Vec<Span>,
}

impl SegmentTable {
    /// A table of one segment, `span`, validated by the caller.
    fn one(span: Span) -> SegmentTable {
        SegmentTable {
            count: 1,
            inline: [span],
            more: Vec::new(),
        }
    }

    /// The only segment, when there is one.
    pub(crate) fn single(&self) -> Option<Span> {
        (self.count == 1).then_some(self.inline[0])
    }

    /// Number of segments.
    pub(crate) fn len(&self) -> u32 {
        self.count
    }

    /// Segment `i`.
    pub(crate) fn get(&self, i: u32) -> Option<Span> {
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

    /// Every segment, in order.
    fn spans(&self) -> &[Span] {
        let all: &[Span] = if self.more.is_empty() {
            &self.inline
        } else {
            &self.more
        };
        all.get(..self.count as usize).unwrap_or(all)
    }

    /// Total words in all segments.
    pub(crate) fn words(&self) -> u64 {
        if let Some(only) = self.single() {
            return u64::from(only.extent.len);
        }
        self.spans().iter().map(|s| u64::from(s.extent.len)).sum()
    }

    /// Whether any segment lies outside the peer's region (in an area).
    pub(crate) fn in_areas(&self) -> bool {
        self.spans().iter().any(|s| s.area != 0)
    }

    /// Validates the segments a descriptor describes: `count` (1 to 512)
    /// segments, inline or in the out-of-line table at `first`, each inside
    /// an area of `areas`. Pure apart from those reads, so it is tested
    /// alone (and fuzzed through [`read_into`](Self::read_into)).
    #[cfg(test)]
    pub(crate) fn read(
        count: u32,
        first: Span,
        areas: &dyn Areas,
    ) -> Result<SegmentTable, ProtocolError> {
        SegmentTable::read_into(count, first, areas, &mut Vec::new())
    }

    /// [`read`](Self::read), with an out-of-line table built in `spare`'s
    /// buffer (a dropped message's, see [`take_spans`](Self::take_spans)),
    /// which the table takes. On an error `spare` keeps its buffer.
    pub(crate) fn read_into(
        count: u32,
        first: Span,
        areas: &dyn Areas,
        spare: &mut Vec<Span>,
    ) -> Result<SegmentTable, ProtocolError> {
        if count == 0 || count > MAX_SEGMENTS {
            return Err(ProtocolError::BadSegmentCount { count });
        }
        let check = |s: Span| {
            let words = areas
                .words(s.area)
                .ok_or(ProtocolError::UnknownArea { area: s.area })?;
            let e = s.extent;
            if u64::from(e.start) + u64::from(e.len) <= u64::from(words) {
                Ok(s)
            } else {
                Err(ProtocolError::SegmentOutOfBounds {
                    offset: e.start,
                    len: e.len,
                })
            }
        };
        let none = Span {
            area: 0,
            extent: Extent { start: 0, len: 0 },
        };
        let mut table = SegmentTable {
            count,
            inline: [none; INLINE_SEGMENTS],
            more: Vec::new(),
        };
        if !needs_table(count as usize) {
            // One segment inside an area fits the areas: nothing to add up.
            table.inline[0] = check(first)?;
            return Ok(table);
        } else {
            let out_of_bounds = ProtocolError::SegmentOutOfBounds {
                offset: first.extent.start,
                len: first.extent.len,
            };
            if first.extent.len != count * TABLE_WORDS {
                return Err(out_of_bounds);
            }
            let t = check(first)?;
            spare.clear();
            spare.reserve_exact(count as usize);
            for i in 0..count {
                // t.start + 2i + 1 < t.end() <= the area's words: no overflow.
                let at = t.extent.start + i * TABLE_WORDS;
                let word = |w| areas.read_word(t.area, w).ok_or(out_of_bounds);
                let (a, b) = (word(at)?, word(at + 1)?);
                let span = table_span(a, b).ok_or(ProtocolError::UnknownArea {
                    area: u32::try_from(b).unwrap_or(u32::MAX),
                })?;
                spare.push(check(span)?);
            }
        }
        // An honest sender's segments never overlap, so together they fit
        // in the areas. Checking it bounds what a copy of the message may
        // cost (a hostile table could name a whole area 512 times).
        let words: u64 = spare.iter().map(|s| u64::from(s.extent.len)).sum();
        let data_words = areas.total_words();
        if words > data_words {
            return Err(ProtocolError::SegmentsExceedArea { words, data_words });
        }
        table.more = std::mem::take(spare);
        Ok(table)
    }

    /// Every segment when there are several (the buffer of the out-of-line
    /// table, which the next may reuse: see [`read_into`](Self::read_into));
    /// an empty vector, which holds no memory, for one. Leaves a table of
    /// one empty segment behind.
    pub(crate) fn take_spans(&mut self) -> Vec<Span> {
        let empty = Span {
            area: 0,
            extent: Extent { start: 0, len: 0 },
        };
        std::mem::replace(self, SegmentTable::one(empty)).more
    }
}

// ---- the descriptor ring: producer ----------------------------------------------

/// The sending side's half of its own descriptor ring.
#[derive(Debug)]
pub(crate) struct DescriptorProducer {
    /// Messages published so far (wrapping); equals our `published` counter.
    published: Cell<u32>,
    /// The peer's `consumed` counter as last loaded and validated: entries
    /// below it are free to rewrite. Loaded again only when the cached value
    /// says the ring is full.
    known_consumed: Cell<u32>,
}

impl DescriptorProducer {
    /// A producer whose next message is number `start` (0 for a new
    /// channel; the model checker starts near the wrap).
    pub(crate) fn new(start: u32) -> DescriptorProducer {
        DescriptorProducer {
            published: Cell::new(start),
            known_consumed: Cell::new(start),
        }
    }

    /// Whether the ring has an entry free for the next message: fewer than
    /// `capacity` published messages the peer has not taken. Loads the
    /// peer's `consumed` only when the cached copy says the ring is full.
    ///
    /// # Errors
    ///
    /// `ConsumedOutOfRange` for a counter that went backwards or past what
    /// was published.
    pub(crate) fn has_room<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        capacity: u32,
    ) -> Result<bool, ProtocolError> {
        let published = self.published.get();
        let before = published.wrapping_sub(self.known_consumed.get());
        if before < capacity {
            return Ok(true);
        }
        let consumed = peer.consumed().load();
        // Acquire: pairs with the consumer's Release store of `consumed`
        // after it read the entries it counts, so rewriting them is safe.
        W::fence(Ordering::Acquire);
        let now = published.wrapping_sub(consumed);
        if now > before {
            return Err(ProtocolError::ConsumedOutOfRange { consumed });
        }
        self.known_consumed.set(consumed);
        Ok(now < capacity)
    }

    /// Messages published so far (wrapping).
    pub(crate) fn published(&self) -> u32 {
        self.published.get()
    }

    /// The peer's `consumed` counter as loaded when the ring was last found
    /// full, if the cache says it is full (`has_room` refreshes it then).
    pub(crate) fn full_at(&self, capacity: u32) -> Option<u32> {
        let consumed = self.known_consumed.get();
        (self.published.get().wrapping_sub(consumed) >= capacity).then_some(consumed)
    }

    /// Describes the next message, `d`, whose bytes (and table, if any) are
    /// written: the entry's words, the tag last. Returns the message's
    /// sequence number. The caller then makes it count with
    /// [`store_count`](Self::store_count), as the store half of waking the
    /// peer (`wake::wake_peer`).
    ///
    /// The caller has checked [`has_room`](Self::has_room), so the entry
    /// written here was taken (its `consumed` seen, with its fence) before.
    pub(crate) fn publish<W: Word>(&self, own: &OwnRegion<W>, d: Descriptor) -> u32 {
        let seq = self.published.get();
        let next = seq.wrapping_add(1);
        let entry = own.descriptor(seq);
        // Relaxed: published by the Release store of the tag.
        entry.slot_count.store(d.slot_count(), Ordering::Relaxed);
        entry.offset.store(d.span.extent.start, Ordering::Relaxed);
        entry.len.store(d.span.extent.len, Ordering::Relaxed);
        if fault::active(Fault::CounterBeforeTag) {
            own.published().store(next, Ordering::Release);
        }
        // Release, and last in the entry: the consumer takes the entry once
        // it sees the tag (module notes).
        entry.tag.store(tag(seq), Ordering::Release);
        self.published.set(next);
        seq
    }

    /// Publishes the next message, of one segment small enough to be
    /// carried in its entry ([`carries`]): its words first, then the entry
    /// as [`publish`](Self::publish) writes it, the tag last.
    pub(crate) fn publish_carried<W: Word>(&self, own: &OwnRegion<W>, segment: &[u8]) -> u32 {
        debug_assert!(carries(segment.len()) && segment.len() % WORD_BYTES == 0);
        // Relaxed, all: published by the Release store of the tag. Each
        // word goes straight from the segment to the entry; the pairs past
        // it are left alone (`DescriptorEntry::carried`).
        own.descriptor(self.published.get())
            .carried
            .store_words(segment);
        // At most CARRIED_WORDS.
        let words = u32::try_from(segment.len() / WORD_BYTES).unwrap_or(0);
        self.publish(own, Descriptor::carried(words))
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

/// A message of the common kind taken from the peer's ring: one segment in
/// its region (area 0), validated. Small and `Copy`, so the receive path
/// that returns it keeps it in registers; see [`Taken`] for the rest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TakenOne {
    pub(crate) slot: u32,
    pub(crate) seq: u32,
    pub(crate) extent: Extent,
}

impl Took<TakenOne> {
    /// The same message with a [`Taken`], for the general paths.
    pub(crate) fn into_taken(self) -> Took<Taken> {
        match self {
            Took::Shared(one) => Took::Shared(one.into_taken()),
            Took::Carried(c) => Took::Carried(c),
        }
    }
}

impl TakenOne {
    /// The same message as a [`Taken`], for the general paths.
    pub(crate) fn into_taken(self) -> Taken {
        Taken {
            slot: self.slot,
            seq: self.seq,
            table: SegmentTable::one(Span {
                area: 0,
                extent: self.extent,
            }),
        }
    }
}

/// One entry taken from the peer's ring.
#[derive(Debug)]
pub(crate) enum Entry {
    /// A message read in place.
    Message(Taken),
    /// A message carried in the entry, copied out.
    Carried(Carried),
    /// The peer retired area `area` (see [`Descriptor`]); release
    /// `(slot, seq)` once it is unmapped.
    Retire { slot: u32, seq: u32, area: u32 },
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

    /// The next message, if it is there and of a common kind: carried in
    /// its entry, or one segment inside the peer's region. `None` for
    /// anything else (nothing there, a table, an area, a retirement, a bad
    /// entry), which [`take`](Self::take) then reads again in full: nothing
    /// is consumed here unless it is taken. A carried message is copied
    /// into a buffer from `buffers`.
    #[inline(always)]
    pub(crate) fn take_simple<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        own: &OwnRegion<W>,
        buffers: &CarriedBuffers,
    ) -> Option<Took<TakenOne>> {
        let seq = self.consumed.get();
        let entry = peer.descriptor(seq);
        if entry.tag.load() != tag(seq) {
            return None;
        }
        // Acquire: as in `take`.
        W::fence(Ordering::Acquire);
        let d = Descriptor::from_words(
            entry.slot_count.load(),
            entry.offset.load(),
            entry.len.load(),
        );
        let e = d.span.extent;
        let took = if e.start == CARRIED_OFFSET {
            Took::Carried(copy_carried(
                entry.carried,
                carried_words(d)?,
                carried_buf(buffers),
            ))
        } else if d.count == 1
            && d.span.area == 0
            && u64::from(e.start) + u64::from(e.len) <= u64::from(peer.data_words())
        {
            Took::Shared(TakenOne {
                slot: d.slot,
                seq,
                extent: e,
            })
        } else {
            return None;
        };
        self.advance(own, seq);
        Some(took)
    }

    /// Counts message `seq` taken: after this, the peer may rewrite its
    /// entry.
    #[inline(always)]
    fn advance<W: Word>(&self, own: &OwnRegion<W>, seq: u32) {
        let next = seq.wrapping_add(1);
        self.consumed.set(next);
        // Release: the peer reads it to validate releases, which come after,
        // and to know which entries it may rewrite (all reads of this one,
        // a carried segment's among them, are done).
        own.consumed().store(next, Ordering::Release);
    }

    /// Whether the next message's tag is there: the cheap check to spin on
    /// (no fence: [`take`](Self::take) loads it again and validates).
    ///
    /// It also touches the entry's second cache line, where a carried
    /// message's tail lies, so that the check that sees the tag fetches
    /// both lines at once: the sender stores that line before the tag, and
    /// loads are not reordered, so the touch in the turn that finds the tag
    /// fetches the line as it is written. Otherwise the take would fetch it
    /// only after the tag, a second crossing between the cores: in probes
    /// on the development machine, a 64 B round trip took 0.71-0.74 µs
    /// without the touch and 0.67-0.69 with it, run by run alternately.
    pub(crate) fn next_ready<W: Word>(&self, peer: &PeerRegion<W>) -> bool {
        let seq = self.consumed.get();
        let entry = peer.descriptor(seq);
        let ready = entry.tag.load() == tag(seq);
        entry.carried.touch(SECOND_LINE_PAIR);
        ready
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

    /// Takes the next entry, if the peer has published one, and stores our
    /// `consumed` counter. A message's segments must lie in `areas`; on an
    /// error nothing is taken (so the caller may look for areas the peer
    /// has just handed over, and try again). An out-of-line table is built
    /// in `spare`'s buffer (see [`SegmentTable::read_into`]), a carried
    /// message copied into a buffer from `buffers`.
    pub(crate) fn take<W: Word>(
        &self,
        peer: &PeerRegion<W>,
        own: &OwnRegion<W>,
        areas: &dyn Areas,
        spare: &mut Vec<Span>,
        buffers: &CarriedBuffers,
    ) -> Result<Option<Entry>, ProtocolError> {
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
        let slot_count = entry.slot_count.load();
        let d = Descriptor::from_words(slot_count, entry.offset.load(), entry.len.load());
        let entry = if d.count == 0 {
            let area = d.span.area;
            // Area 0 is the region's, never retired: a message of no
            // segments.
            if area == 0 {
                return Err(ProtocolError::BadSegmentCount { count: 0 });
            }
            let e = d.span.extent;
            if e.len != 0 || e.start != 0 {
                return Err(ProtocolError::BadRetirement {
                    area,
                    offset: e.start,
                    len: e.len,
                });
            }
            if areas.words(area).is_none() {
                return Err(ProtocolError::UnknownArea { area });
            }
            Entry::Retire {
                slot: d.slot,
                seq,
                area,
            }
        } else if d.span.extent.start == CARRIED_OFFSET {
            // The word as the peer wrote it: its count may be past what
            // a descriptor may say (`Descriptor::slot_count` asserts).
            let words = carried_words(d).ok_or(ProtocolError::BadCarried {
                slot_count,
                len: d.span.extent.len,
            })?;
            Entry::Carried(copy_carried(entry.carried, words, carried_buf(buffers)))
        } else {
            Entry::Message(Taken {
                slot: d.slot,
                seq,
                table: SegmentTable::read_into(d.count, d.span, areas, spare)?,
            })
        };
        self.advance(own, seq);
        Ok(Some(entry))
    }
}

/// Copies the pairs of a peer's entry into `buf`, all [`CARRIED_WORDS`]
/// of them, after the `Acquire` fence that made them visible: the message
/// it carries is the first `words` (at most [`CARRIED_WORDS`]).
#[inline(always)]
fn copy_carried<P: Pair>(
    carried: TheirPairs<'_, P, CARRIED_WORDS>,
    words: u32,
    mut buf: CarriedBuf,
) -> Carried {
    // Every pair, each loaded and stored as a word: a copy of a fixed
    // length is unrolled into straight loads and stores, with no loop over
    // the message's words and its remainder, no branch on its length, and
    // 17 fewer instructions for a message of 11 words (one-way 64 B went
    // from 7.7 to 8.3 M messages a second in alternating runs). The pairs
    // past the message hold what earlier messages left there (the copy
    // reads as `words` long: [`Carried::segment`]). The entry's second
    // line, which a short message does not reach, is touched anyway as the
    // receive looks for the tag (`next_ready`), so the copy reads no line
    // the take did not.
    // Every buffer has `CARRIED_WORDS` (`new_carried_buf`); the array
    // tells the compiler how many.
    debug_assert_eq!(buf.len(), CARRIED_WORDS, "a carried buffer's words");
    if let Some(all) = buf.first_chunk_mut::<CARRIED_WORDS>() {
        carried.load_into(capnp::Word::words_to_bytes_mut(all));
    }
    Carried { buf, words }
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
    /// The peer keeps at most `held_capacity` (ours) messages in flight,
    /// and each is released once, so the entry written here was read before.
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

    #[test]
    fn carried_buffers_are_reused_and_kept_up_to_the_bound() {
        let buffers = CarriedBuffers::default();
        // A receiver that holds many at once, then drops them all.
        let held: Vec<CarriedBuf> = (0..KEPT_CARRIED + 100)
            .map(|_| carried_buf(&buffers))
            .collect();
        let addresses: Vec<*const capnp::Word> = held.iter().map(|b| b.as_ptr()).collect();
        for buf in held {
            buffers.keep(buf);
        }
        let kept = buffers.kept();
        assert_eq!(kept, KEPT_CARRIED, "the rest are freed");
        // The kept ones come back, the last kept first, none of them twice.
        let again: Vec<CarriedBuf> = (0..KEPT_CARRIED).map(|_| carried_buf(&buffers)).collect();
        let mut reused: Vec<_> = again.iter().map(|b| b.as_ptr()).collect();
        assert_eq!(reused[0], addresses[KEPT_CARRIED + 99]);
        reused.sort_unstable();
        reused.dedup();
        assert_eq!(reused.len(), KEPT_CARRIED);
        assert!(reused.iter().all(|a| addresses.contains(a)));
        assert_eq!(buffers.kept(), 0);
    }

    fn ext(start: u32, len: u32) -> Extent {
        Extent { start, len }
    }

    fn span(area: u32, start: u32, len: u32) -> Span {
        Span {
            area,
            extent: ext(start, len),
        }
    }

    /// Areas of the given sizes (index = id); area 0's words from 50 on
    /// are `table`, and read as absent elsewhere.
    struct Sizes<'a> {
        words: &'a [u32],
        table: &'a [u64],
    }

    impl Areas for Sizes<'_> {
        fn words(&self, area: u32) -> Option<u32> {
            self.words.get(area as usize).copied().filter(|&w| w > 0)
        }
        fn read_word(&self, area: u32, offset: u32) -> Option<u64> {
            if area != 0 || offset >= self.words[0] {
                return None;
            }
            self.table.get(offset.checked_sub(50)? as usize).copied()
        }
        fn total_words(&self) -> u64 {
            self.words.iter().map(|&w| u64::from(w)).sum()
        }
    }

    fn one(words: u32) -> Sizes<'static> {
        Sizes {
            words: Box::leak(Box::new([words])),
            table: &[],
        }
    }

    /// The words of a table of `segments` (area, offset, len).
    fn table(segments: &[(u32, u32, u32)]) -> Vec<u64> {
        segments
            .iter()
            .flat_map(|&(a, o, l)| table_words(span(a, o, l)))
            .collect()
    }

    #[test]
    fn descriptor_words_round_trip() {
        let d = Descriptor {
            slot: 65_535,
            count: MAX_SEGMENTS,
            span: span(MAX_AREA, 7, 9),
        };
        assert_eq!(Descriptor::from_words(d.slot_count(), 7, 9), d);
        let r = Descriptor::retire(3, 5);
        assert_eq!(Descriptor::from_words(r.slot_count(), 0, 0), r);
        let [a, b] = table_words(span(9, u32::MAX, 3));
        assert_eq!(table_span(a, b), Some(span(9, u32::MAX, 3)));
        assert_eq!(table_span(a, u64::from(MAX_AREA) + 1), None);
        assert_eq!(tag(u32::MAX), 0);
    }

    #[test]
    fn inline_segment() {
        let t = SegmentTable::read(1, span(0, 10, 6), &one(100)).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(0), Some(span(0, 10, 6)));
        assert_eq!(t.get(1), None);
        assert_eq!(t.words(), 6);
        assert!(!t.in_areas());
    }

    #[test]
    fn an_out_of_line_table_reuses_the_spare_buffer() {
        let words = table(&[(0, 0, 10), (0, 10, 20), (0, 30, 5)]);
        let areas = Sizes {
            words: &[100],
            table: &words,
        };
        let mut spare = Vec::with_capacity(8);
        let buffer = spare.as_ptr();
        let mut t = SegmentTable::read_into(3, span(0, 50, 6), &areas, &mut spare).unwrap();
        assert_eq!(t.get(2), Some(span(0, 30, 5)));
        assert_eq!(t.words(), 35);
        let mut spans = t.take_spans();
        assert_eq!(
            spans.as_ptr(),
            buffer,
            "the table was built in the spare buffer"
        );
        assert_eq!(spans.len(), 3);
        // A table that fails keeps the buffer with its caller.
        let err = SegmentTable::read_into(4, span(0, 50, 8), &areas, &mut spans);
        assert_eq!(
            err.unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 50, len: 8 }
        );
        assert_eq!(spans.as_ptr(), buffer);
        // One segment takes nothing from it.
        let mut t = SegmentTable::read_into(1, span(0, 1, 1), &areas, &mut spans).unwrap();
        assert_eq!(t.take_spans().capacity(), 0);
        assert_eq!(spans.as_ptr(), buffer);
    }

    #[test]
    fn segments_in_areas() {
        let areas = Sizes {
            words: &[100, 0, 1000],
            table: &[],
        };
        let t = SegmentTable::read(1, span(2, 900, 100), &areas).unwrap();
        assert!(t.in_areas());
        assert_eq!(
            SegmentTable::read(1, span(2, 901, 100), &areas).unwrap_err(),
            ProtocolError::SegmentOutOfBounds {
                offset: 901,
                len: 100
            }
        );
        assert_eq!(
            SegmentTable::read(1, span(1, 0, 1), &areas).unwrap_err(),
            ProtocolError::UnknownArea { area: 1 }
        );
        assert_eq!(
            SegmentTable::read(1, span(3, 0, 1), &areas).unwrap_err(),
            ProtocolError::UnknownArea { area: 3 }
        );
        // An out-of-line table in area 0 naming area 2 and an unknown one.
        let words = table(&[(0, 0, 10), (2, 0, 1000)]);
        let areas = Sizes {
            words: &[100, 0, 1000],
            table: &words,
        };
        let t = SegmentTable::read(2, span(0, 50, 4), &areas).unwrap();
        assert_eq!(t.get(1), Some(span(2, 0, 1000)));
        let words = table(&[(0, 0, 10), (1, 0, 1)]);
        let areas = Sizes {
            words: &[100, 0, 1000],
            table: &words,
        };
        assert_eq!(
            SegmentTable::read(2, span(0, 50, 4), &areas).unwrap_err(),
            ProtocolError::UnknownArea { area: 1 }
        );
    }

    #[test]
    fn rejects_bad_counts_and_bounds() {
        assert_eq!(
            SegmentTable::read(0, span(0, 0, 0), &one(100)).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 0 }
        );
        assert_eq!(
            SegmentTable::read(513, span(0, 0, 0), &one(100)).unwrap_err(),
            ProtocolError::BadSegmentCount { count: 513 }
        );
        assert_eq!(
            SegmentTable::read(1, span(0, 96, 5), &one(100)).unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 96, len: 5 }
        );
        // offset + length overflowing u32
        assert!(SegmentTable::read(1, span(0, u32::MAX, 2), &one(u32::MAX)).is_err());
        assert!(SegmentTable::read(1, span(0, 100, 0), &one(100)).is_ok());
        // Each in bounds, together more than the area: overlapping.
        let words = table(&[(0, 0, 40), (0, 10, 40), (0, 0, 41)]);
        let areas = Sizes {
            words: &[100],
            table: &words,
        };
        assert_eq!(
            SegmentTable::read(3, span(0, 50, 6), &areas).unwrap_err(),
            ProtocolError::SegmentsExceedArea {
                words: 121,
                data_words: 100
            }
        );
    }

    #[test]
    fn out_of_line_table() {
        let segments: Vec<_> = (0..8u32).map(|i| (0, i * 5, 5)).collect();
        let words = table(&segments);
        let areas = Sizes {
            words: &[100],
            table: &words,
        };
        let t = SegmentTable::read(8, span(0, 50, 16), &areas).unwrap();
        assert_eq!(t.len(), 8);
        assert_eq!(t.get(7), Some(span(0, 35, 5)));
        // The table must be two words a segment, and in bounds.
        assert!(SegmentTable::read(8, span(0, 50, 15), &areas).is_err());
        assert!(SegmentTable::read(8, span(0, 90, 16), &areas).is_err());
        // An entry out of bounds.
        let mut bad = segments.clone();
        bad[3] = (0, 99, 5);
        let words = table(&bad);
        let areas = Sizes {
            words: &[100],
            table: &words,
        };
        assert_eq!(
            SegmentTable::read(8, span(0, 50, 16), &areas).unwrap_err(),
            ProtocolError::SegmentOutOfBounds { offset: 99, len: 5 }
        );
    }

    /// Deterministic sweep: whatever the descriptor holds, the table either
    /// is rejected or describes only extents inside known areas.
    #[test]
    fn random_descriptors_stay_in_bounds() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let sizes = [4096, 0, 512];
        for _ in 0..20_000 {
            let small = |v: u64| u32::try_from(v % 5000).unwrap();
            let count = small(next()) % 600;
            let first = span(small(next()) % 4, small(next()), small(next()) % 1300);
            let words: Vec<u64> = (0..1200).map(|_| next() % (1 << 40)).collect();
            let words: Vec<u64> = words.chunks(2).flat_map(|p| [p[0], p[1] % 4]).collect();
            let areas = Sizes {
                words: &sizes,
                table: &words,
            };
            if let Ok(t) = SegmentTable::read(count, first, &areas) {
                assert!((1..=MAX_SEGMENTS).contains(&t.len()));
                assert!(t.words() <= areas.total_words());
                for i in 0..t.len() {
                    let s = t.get(i).unwrap();
                    let limit = areas.words(s.area).expect("a known area");
                    assert!(
                        u64::from(s.extent.start) + u64::from(s.extent.len) <= u64::from(limit)
                    );
                }
            }
        }
    }
}
