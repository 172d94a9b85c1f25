//! Received messages: a capnp reader over segments in the peer's region, and
//! the release when it drops; or over a small message copied out of its
//! descriptor, or a private copy, which release nothing.
//!
//! `unsafe` here: capnp's reader asks for a segment at every pointer it
//! follows, so a [`Segments`] (and an [`OwnedSegments`]) keeps each segment
//! as a pointer and a length (`SegmentRef`) beside the memory it points
//! into, and reads one with `segment_ref::segment`, whose duty their
//! invariants meet.

#![allow(unsafe_code)]

use std::fmt;
use std::mem::{self, ManuallyDrop};
use std::rc::Rc;

use capnp::message::{Reader, ReaderOptions, ReaderSegments};
use capnp::traits::FromPointerReader;
use capnp::Word;

use crate::error::{Failure, ProtocolError};
use crate::framing::HeldFrame;
use crate::layout::WORD_BYTES;
use crate::recv::{Place, RecvSide};
use crate::region::Span;
use crate::ring::{Carried, SegmentTable, Taken, TakenOne, Took};
use crate::segment_ref::{self, SegmentRef};
use crate::stream::StreamRecv;

/// The methods a received message has, owned or borrowing: one body for
/// both types.
macro_rules! received_methods {
    ($segments:ty) => {
        /// Gets the root of the message as the given type.
        ///
        /// # Errors
        ///
        /// Whatever capnp reports for a malformed message or an exceeded
        /// traversal or nesting limit.
        pub fn get_root<'a, T: FromPointerReader<'a>>(&'a self) -> capnp::Result<T> {
            self.reader.get_root().map_err(|e| self.explain(e))
        }

        /// Adds to capnp's "read limit exceeded" which limit it was and how to
        /// raise it.
        fn explain(&self, mut e: capnp::Error) -> capnp::Error {
            if e.kind == capnp::ErrorKind::ReadLimitExceeded {
                e.extra = format!(
                    "{}{}the message is {} bytes; the receiving end's \
                 Options::reader_options traversal limit bounds what may be read",
                    e.extra,
                    if e.extra.is_empty() { "" } else { "; " },
                    self.len_bytes()
                );
            }
            e
        }

        /// The capnp reader, for everything else a reader does.
        pub fn reader(&self) -> &Reader<$segments> {
            &self.reader
        }

        /// The capnp reader by value; the message is released when it drops.
        pub fn into_reader(self) -> Reader<$segments> {
            self.reader
        }

        /// The message's segments, as the bytes capnp reads.
        pub fn segments(&self) -> impl Iterator<Item = &[u8]> + '_ {
            let segments = self.reader.get_segments();
            (0..).map_while(move |i| segments.get_segment(i))
        }

        /// Whether the message lies in private memory rather than in the
        /// peer's region: copied there
        /// ([`Options::copy_received`](crate::Options::copy_received)),
        /// carried in its descriptor (a message of one segment of at most
        /// 112 bytes, copied out as it is taken: cheaper than reading it in
        /// place and releasing it), or read from a [stream
        /// channel](crate::Transport::Stream)'s socket into its receive
        /// buffer (always).
        pub fn is_copied(&self) -> bool {
            self.reader.get_segments().is_private()
        }

        /// Total size of the message in bytes.
        pub fn len_bytes(&self) -> usize {
            self.segments().map(<[u8]>::len).sum()
        }

        /// A private copy of the message that owns its memory: `Send`,
        /// `'static`, independent of the channel (the original can be dropped,
        /// releasing the shared space). One copy of the message's bytes; the
        /// copy keeps this message's reader limits.
        ///
        /// ```
        /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
        /// let (a, b) = capnp_shm::Channel::pair()?;
        /// let mut m = a.message();
        /// m.set_root(capnp::text::Reader::from("keep me"))?;
        /// a.send(m).map_err(|e| e.into_error())?;
        /// let kept = b.recv()?.detach(); // the received message drops here
        /// let text = std::thread::spawn(move || {
        ///     let text = kept.get_root::<capnp::text::Reader<'_>>().expect("a text root");
        ///     text.to_string().expect("utf-8")
        /// })
        /// .join()
        /// .unwrap();
        /// assert_eq!(text, "keep me");
        /// # Ok(()) }
        /// ```
        pub fn detach(&self) -> Reader<Detached> {
            let total = self.segments().map(|s| s.len() / 8).sum();
            let mut words = Word::allocate_zeroed_vec(total);
            let mut ends = Vec::with_capacity(self.reader.get_segments().len());
            let bytes = Word::words_to_bytes_mut(&mut words);
            let mut at = 0;
            for s in self.segments() {
                bytes[at..at + s.len()].copy_from_slice(s);
                at += s.len();
                ends.push(at);
            }
            Reader::new(Detached { words, ends }, self.limits())
        }
    };
}

/// A received message, read in place.
///
/// Its segments stay in the peer's shared region (or, with
/// [`Options::copy_received`](crate::Options::copy_received), in a private
/// copy) until it drops; dropping it tells the peer the space may be reused.
/// A message of one segment of at most 112 bytes came inside its
/// descriptor and was copied out as it was taken
/// ([`is_copied`](Self::is_copied)): it holds nothing of the peer's.
/// It borrows the receiving end, so the mapping outlives it. A `Received`
/// inherited through `fork` and dropped in the child touches nothing
/// shared: only the process that owns the end releases.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (a, b) = capnp_shm::Channel::pair()?;
/// let mut message = a.message();
/// message.set_root(capnp::text::Reader::from("hi"))?;
/// a.send(message).map_err(|e| e.into_error())?;
/// let received = b.recv()?;
/// let text: capnp::text::Reader<'_> = received.get_root()?;
/// assert_eq!(text.to_str()?, "hi");
/// # Ok(()) }
/// ```
pub struct Received<'c> {
    /// No more than this: a `Received` moves from the take to the caller's
    /// variable, and a few words more made each move a call of `memcpy`
    /// whose wide stores the message's first reads then waited on. (The
    /// reader's limits, which a copy keeps, are worked out again by
    /// [`Segments::limits`].)
    reader: Reader<Segments<'c>>,
}

impl<'c> Received<'c> {
    /// The message `taken` from `side`'s peer: read in place, or copied
    /// (and released at once) when the options say so.
    ///
    /// # Errors
    ///
    /// In copy mode, a message over the reader's traversal limit, or one
    /// whose copy cannot be allocated: the message is released uncopied and
    /// the end fails.
    #[inline(always)]
    pub(crate) fn new(side: &'c RecvSide, took: Took<Taken>) -> Result<Received<'c>, Failure> {
        let taken = match took {
            Took::Shared(taken) => taken,
            Took::Carried(c) => return Ok(Received::carried(side, c)),
        };
        let options = side.link().options();
        let limits = options.reader_options_for(taken.table.words());
        let segments = if options.copy_received {
            Segments::copied(side, taken, limits)?
        } else {
            Segments::in_place(side, taken)
        };
        Ok(Received {
            reader: Reader::new(segments, limits),
        })
    }

    /// The message `one` from `side`'s peer, as [`new`](Self::new): the
    /// common kind, one segment in the region, built where it is returned
    /// (hence `failed`, which makes the caller's error).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    #[inline(always)]
    pub(crate) fn one<E>(
        side: &'c RecvSide,
        took: Took<TakenOne>,
        failed: impl FnOnce(Failure) -> E,
    ) -> Result<Received<'c>, E> {
        let one = match took {
            Took::Shared(one) => one,
            Took::Carried(c) => return Ok(Received::carried(side, c)),
        };
        let options = side.link().options();
        if options.copy_received {
            return Received::one_copied(side, one).map_err(failed);
        }
        let limits = options.reader_options_for(u64::from(one.extent.len));
        Ok(Received {
            reader: Reader::new(Segments::one(side, one), limits),
        })
    }

    /// [`one`](Self::one) in copy mode, out of line.
    #[inline(never)]
    fn one_copied(side: &'c RecvSide, one: TakenOne) -> Result<Received<'c>, Failure> {
        Received::new(side, Took::Shared(one.into_taken()))
    }

    /// A message `side`'s peer carried in its descriptor, copied out: in
    /// private memory already, with nothing to release (copy mode or not).
    #[inline(always)]
    fn carried(side: &'c RecvSide, carried: Carried) -> Received<'c> {
        Received {
            reader: Reader::new(
                Segments {
                    first: SegmentRef::of(carried.segment()),
                    rest: Vec::new(),
                    body: ManuallyDrop::new(Body::Carried {
                        side,
                        carried: Some(carried),
                    }),
                },
                side.carried_limits(),
            ),
        }
    }

    /// A message `rx` read from its stream, into its receive buffer.
    pub(crate) fn framed(rx: &'c StreamRecv, frame: HeldFrame) -> Received<'c> {
        let limits = rx.link().options().reader_options_for(frame.words());
        let segments = (0..).map_while(|i| frame.get_segment(i));
        let (first, rest) = segment_ref::split(frame.len(), segments, || rx.segment_refs());
        Received {
            reader: Reader::new(
                Segments {
                    first,
                    rest,
                    body: ManuallyDrop::new(Body::Framed { rx, frame }),
                },
                limits,
            ),
        }
    }

    /// The limits the reader was made with, for a copy of it.
    fn limits(&self) -> ReaderOptions {
        self.reader.get_segments().limits()
    }

    received_methods!(Segments<'c>);
}

/// A message carried in its descriptor: one segment, in the copy.
impl ReaderSegments for Carried {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        (idx == 0).then(|| self.segment())
    }

    fn len(&self) -> usize {
        1
    }
}

/// The segments of a [detached](Received::detach) message: a private copy
/// that owns its memory.
#[derive(Debug, Clone)]
pub struct Detached {
    words: Vec<Word>,
    /// Where each segment ends, in bytes.
    ends: Vec<usize>,
}

impl ReaderSegments for Detached {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let i = idx as usize;
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Word::words_to_bytes(&self.words).get(start..end)
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

impl fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("segments", self.reader.get_segments())
            .finish()
    }
}

/// The segments of a [`Received`] message; implements capnp's
/// [`ReaderSegments`]. Dropping it releases the message to the peer.
//
// Invariant: `first` and every entry of `rest` were made by
// `SegmentRef::of` from a slice that stays valid, and unwritten by this
// process, until this `Segments` drops: a slice of the peer's region or
// area, mapped for as long as the receiving side lives (`'c`) or an area's
// `Place` in `body` keeps it; or of memory that `body` owns and that does
// not move when the body moves (the heap buffer of a vector: a carried
// message's words, a copy's words, a frame's shared buffer, which nobody
// writes while a frame holds it). `body` gives that memory up only in
// `Segments::release`, as this drops, after which nothing reads the
// segments.
pub struct Segments<'c> {
    /// Segment 0: capnp asks for a segment on every pointer it follows,
    /// and segment 0 nearly always.
    first: SegmentRef,
    /// Segments 1 and on: empty (no allocation) for a message of one
    /// segment; a buffer kept by the receiving side otherwise.
    rest: Vec<SegmentRef>,
    /// Dropped by hand in [`Drop`], so that `Segments` has no drop glue of
    /// its own: a carried or in-place message leaves nothing in its body to
    /// drop once its buffer or its release is given back, and without the
    /// glue its drop is that and no more (no match over the kinds again).
    /// The kinds that own buffers are moved out and dropped in
    /// [`release`](Segments::release).
    body: ManuallyDrop<Body<'c>>,
}

enum Body<'c> {
    /// A message in the peer's data area, of one segment (the common kind)
    /// or several. Nothing in it needs dropping, so its drop is the release
    /// (and `Segments::rest` back to `side`).
    InPlace {
        side: &'c RecvSide,
        /// `(slot, seq)` to release on drop; `None` once released.
        release: Option<(u32, u32)>,
    },
    /// A message with segments in the peer's areas: each kept mapped by
    /// its `Place` for as long as the message lives.
    InAreas {
        side: &'c RecvSide,
        places: Vec<Place>,
        release: Option<(u32, u32)>,
    },
    /// A private copy, already released: its words, segment after segment.
    Copied {
        side: &'c RecvSide,
        words: Vec<Word>,
    },
    /// A small message the peer carried in its descriptor, copied out at
    /// the take: nothing to release. Its buffer goes back to `side` on
    /// drop (`None` once it has).
    Carried {
        side: &'c RecvSide,
        carried: Option<Carried>,
    },
    /// A frame in a stream channel's receive buffer (shared with the
    /// receiver until it moves on; reused once this drops).
    Framed {
        rx: &'c StreamRecv,
        frame: HeldFrame,
    },
    /// What [`Segments::release`] leaves behind once it has moved the body
    /// out to drop it: nothing to read, nothing to release.
    Dropped,
}

/// Copies the segments of `taken` out of `side`'s peer region, and releases
/// the message (the copy no longer needs the shared words). What the copy
/// may cost is bounded before anything is allocated: no more than the
/// reader may read, allocated fallibly; otherwise the message is released
/// uncopied and the end fails.
fn copy_out(side: &RecvSide, taken: &Taken, limits: ReaderOptions) -> Result<Detached, Failure> {
    let table: &SegmentTable = &taken.table;
    let refuse = |failure: Failure| {
        side.release(taken.slot, taken.seq);
        side.link().fail(failure)
    };
    let total = table.words();
    if let Some(limit) = limits.traversal_limit_in_words {
        let limit = limit as u64;
        if total > limit {
            return Err(refuse(Failure::Protocol(ProtocolError::ExceedsReadLimit {
                words: total,
                limit,
            })));
        }
    }
    // At most the peer's data area (validated), mapped here, so it fits.
    let total = usize::try_from(total).unwrap_or(usize::MAX);
    let mut words: Vec<Word> = Vec::new();
    if let Err(e) = words.try_reserve_exact(total) {
        let why = format!("copying a received message of {total} words: {e}");
        return Err(refuse(Failure::Io(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            why,
        ))));
    }
    words.resize(total, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
    let mut ends = Vec::with_capacity(table.len() as usize);
    let bytes = Word::words_to_bytes_mut(&mut words);
    let mut at = 0;
    // A message in the peer's areas: its areas looked up once.
    let mut places = if table.in_areas() {
        side.places(table)
    } else {
        Vec::new()
    };
    for i in 0..table.len() {
        // The table was validated: every extent lies in the data area and
        // together they fit in it, so `total` covers them all.
        if let Some(e) = table.get(i) {
            let len = e.extent.len as usize * 8;
            if let Some(dst) = bytes.get_mut(at..at + len) {
                let copied = match places.get(i as usize) {
                    Some(place) => place.copy(side, dst),
                    None => side.link().peer().copy_segment(e.extent, dst),
                };
                if copied {
                    at += len;
                }
            }
        }
        ends.push(at);
    }
    side.recycle_places(&mut places);
    side.release(taken.slot, taken.seq);
    Ok(Detached { words, ends })
}

impl<'c> Segments<'c> {
    /// The segments of `taken`, read where they lie. The common case, one
    /// segment in the peer's region, inline; the rest out of line.
    #[inline(always)]
    fn in_place(side: &'c RecvSide, taken: Taken) -> Segments<'c> {
        if let Some(Span { area: 0, extent }) = taken.table.single() {
            let (slot, seq) = (taken.slot, taken.seq);
            return Segments::one(side, TakenOne { slot, seq, extent });
        }
        Segments::in_place_spread(side, taken)
    }

    /// The segment of `one`, read where it lies.
    #[inline(always)]
    fn one(side: &'c RecvSide, one: TakenOne) -> Segments<'c> {
        // Validated against the region: found.
        let first = side.link().peer().segment(one.extent).unwrap_or(&[]);
        Segments {
            first: SegmentRef::of(first),
            rest: Vec::new(),
            body: ManuallyDrop::new(Body::InPlace {
                side,
                release: Some((one.slot, one.seq)),
            }),
        }
    }

    /// [`in_place`](Self::in_place) of several segments, or of one in an
    /// area.
    #[inline(never)]
    fn in_place_spread(side: &'c RecvSide, mut taken: Taken) -> Segments<'c> {
        let peer = side.link().peer();
        let release = Some((taken.slot, taken.seq));
        let table = &mut taken.table;
        let spare = || side.segment_refs();
        let ((first, rest), body) = if table.in_areas() {
            let places = side.places(table);
            let segments = places.iter().map(|p| p.bytes(side).unwrap_or(&[]));
            let refs = segment_ref::split(places.len(), segments, spare);
            let body = Body::InAreas {
                side,
                places,
                release,
            };
            (refs, body)
        } else {
            // The table was validated against the data area, so every
            // lookup succeeds; an empty slice would only make capnp report
            // an error.
            let segments = (0..table.len()).map(|i| {
                table
                    .get(i)
                    .and_then(|s| peer.segment(s.extent))
                    .unwrap_or(&[])
            });
            let refs = segment_ref::split(table.len() as usize, segments, spare);
            (refs, Body::InPlace { side, release })
        };
        side.recycle_spans(&mut table.take_spans());
        Segments {
            first,
            rest,
            body: ManuallyDrop::new(body),
        }
    }

    fn copied(
        side: &'c RecvSide,
        mut taken: Taken,
        limits: ReaderOptions,
    ) -> Result<Segments<'c>, Failure> {
        let copy = copy_out(side, &taken, limits);
        side.recycle_spans(&mut taken.table.take_spans());
        let Detached { words, ends } = copy?;
        let bytes = Word::words_to_bytes(&words);
        let segments = ends.iter().scan(0, |start, &end| {
            let segment = bytes.get(*start..end).unwrap_or(&[]);
            *start = end;
            Some(segment)
        });
        let (first, rest) = segment_ref::split(ends.len(), segments, || side.segment_refs());
        Ok(Segments {
            first,
            rest,
            body: ManuallyDrop::new(Body::Copied { side, words }),
        })
    }

    /// The limits the reader was made with (see [`Received::limits`]).
    fn limits(&self) -> ReaderOptions {
        let words = self.segments().map(|s| s.len() / WORD_BYTES).sum::<usize>() as u64;
        match &*self.body {
            Body::Carried { side, .. } => side.carried_limits(),
            Body::InPlace { side, .. } | Body::InAreas { side, .. } | Body::Copied { side, .. } => {
                side.link().options().reader_options_for(words)
            }
            Body::Framed { rx, .. } => rx.link().options().reader_options_for(words),
            Body::Dropped => ReaderOptions::new(),
        }
    }

    /// Every segment, in order.
    fn segments(&self) -> impl Iterator<Item = &[u8]> {
        (0..).map_while(|i| self.get_segment(i))
    }
}

impl ReaderSegments for Segments<'_> {
    /// Inline in capnp's reader, which asks for a segment at every pointer
    /// it follows (a hundred times for a message of 50 texts): a load, a
    /// compare, and no call, whatever the kind of message.
    #[inline(always)]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        // The bytes lie in a mapping or a vector's heap block, which no
        // move of the body retags; nothing makes a `&mut` to them while
        // held (a frame's buffer is written only through `Arc::get_mut`, a
        // carried buffer only once back in the pool).
        // SAFETY: the invariant of `Segments`: valid and unwritten by this
        // process until `self` drops, so for the borrow of `self`.
        unsafe { segment_ref::segment(self.first, &self.rest, idx) }
    }

    fn len(&self) -> usize {
        match *self.body {
            Body::Dropped => 0,
            _ => 1 + self.rest.len(),
        }
    }
}

impl Segments<'_> {
    /// Whether the message lies in private memory (see
    /// [`Received::is_copied`]).
    fn is_private(&self) -> bool {
        matches!(
            *self.body,
            Body::Copied { .. } | Body::Carried { .. } | Body::Framed { .. }
        )
    }
}

impl Drop for Segments<'_> {
    fn drop(&mut self) {
        // A carried message first, inline: its buffer goes back, and the
        // body holds nothing more to drop (`carried` is `None`). The other
        // kinds out of line, so that it pays for none of their code.
        if let Body::Carried { side, carried } = &mut *self.body {
            side.recycle_carried(carried);
            return;
        }
        self.release();
    }
}

impl Segments<'_> {
    /// [`drop`](Drop::drop) for every kind but a carried message: the
    /// release, and the buffers back to the side; then the body's own
    /// drop, for the kinds that own buffers. Nothing reads the segments
    /// after (they may point into what is dropped here).
    #[inline(never)]
    fn release(&mut self) {
        self.first = SegmentRef::EMPTY;
        if let Body::InPlace { side, release } = &mut *self.body {
            // Nothing in the body to drop: references and integers.
            if let Some((slot, seq)) = release.take() {
                side.release(slot, seq);
            }
            side.recycle_segment_refs(&mut self.rest);
            return;
        }
        match mem::replace(&mut *self.body, Body::Dropped) {
            Body::InPlace { side, release } => {
                if let Some((slot, seq)) = release {
                    side.release(slot, seq);
                }
                side.recycle_segment_refs(&mut self.rest);
            }
            Body::InAreas {
                side,
                mut places,
                mut release,
            } => {
                side.let_go(&mut release, &mut places);
                side.recycle_segment_refs(&mut self.rest);
            }
            Body::Carried { side, mut carried } => side.recycle_carried(&mut carried),
            Body::Copied { side, words } => {
                side.recycle_segment_refs(&mut self.rest);
                drop(words);
            }
            Body::Framed { rx, frame } => {
                rx.recycle_segment_refs(&mut self.rest);
                rx.dropped();
                drop(frame);
            }
            Body::Dropped => {}
        }
    }
}

impl fmt::Debug for Segments<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, seq) = match &*self.body {
            Body::InPlace { release, .. } => ("in place", release.map(|(_, seq)| seq)),
            Body::InAreas { release, .. } => ("in place, areas", release.map(|(_, seq)| seq)),
            Body::Copied { .. } => ("copied", None),
            Body::Carried { .. } => ("carried in its descriptor", None),
            Body::Framed { .. } => ("stream buffer", None),
            Body::Dropped => ("dropped", None),
        };
        f.debug_struct("Segments")
            .field("storage", &kind)
            .field("count", &self.len())
            .field("seq", &seq)
            .finish()
    }
}

// ---- owned ------------------------------------------------------------------

/// A received message that owns a handle to its receiver: `'static`, so it
/// can be stored, queued or boxed (capnp-rpc keeps incoming messages for as
/// long as the application holds their `Params` or `Response`). From a
/// [`SharedReceiver`](crate::SharedReceiver); not `Send` (the receiver is
/// shared by reference counting in one thread). Read in place like a
/// [`Received`], and released when it drops.
pub struct OwnedReceived {
    reader: Reader<OwnedSegments>,
    /// The limits the reader was made with (for copies of it).
    options: ReaderOptions,
}

impl OwnedReceived {
    /// The message `taken` from `side`'s peer, as [`Received::new`].
    pub(crate) fn new(side: Rc<RecvSide>, took: Took<Taken>) -> Result<OwnedReceived, Failure> {
        let options = side.link().options();
        let mut taken = match took {
            Took::Shared(taken) => taken,
            Took::Carried(c) => {
                let limits = side.carried_limits();
                return Ok(OwnedReceived {
                    reader: Reader::new(
                        OwnedSegments::new(OwnedBody::Carried {
                            side,
                            carried: Some(c),
                        }),
                        limits,
                    ),
                    options: limits,
                });
            }
        };
        let limits = options.reader_options_for(taken.table.words());
        let body = if options.copy_received {
            let copy = copy_out(&side, &taken, limits);
            side.recycle_spans(&mut taken.table.take_spans());
            OwnedBody::Copied { side, copy: copy? }
        } else {
            OwnedBody::InPlace {
                release: Some((taken.slot, taken.seq)),
                places: if taken.table.in_areas() {
                    side.places(&taken.table)
                } else {
                    Vec::new()
                },
                table: taken.table,
                side,
            }
        };
        Ok(OwnedReceived {
            reader: Reader::new(OwnedSegments::new(body), limits),
            options: limits,
        })
    }

    /// A message `rx` read from its stream, as [`Received::framed`].
    pub(crate) fn framed(rx: Rc<StreamRecv>, frame: HeldFrame) -> OwnedReceived {
        let limits = rx.link().options().reader_options_for(frame.words());
        OwnedReceived {
            reader: Reader::new(OwnedSegments::new(OwnedBody::Framed { rx, frame }), limits),
            options: limits,
        }
    }

    /// The limits the reader was made with, for a copy of it.
    fn limits(&self) -> ReaderOptions {
        self.options
    }

    received_methods!(OwnedSegments);
}

impl fmt::Debug for OwnedReceived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedReceived")
            .field("segments", self.reader.get_segments())
            .finish()
    }
}

/// The segments of an [`OwnedReceived`] message; implements capnp's
/// [`ReaderSegments`]. Dropping it releases the message to the peer.
//
// Invariant, as for `Segments`: `first` and every entry of `rest` were
// made by `SegmentRef::of` from a slice that stays valid, and unwritten
// by this process, until this drops: of the peer's region (mapped for as
// long as the `Rc` in `body` keeps the receiving side) or an area (kept
// mapped by its `Place` in `body`), or of a heap buffer `body` owns (a
// carried message's words, a copy's words, a frame's shared buffer),
// which does not move when the body moves and is freed only as this
// drops.
pub struct OwnedSegments {
    /// Segment 0.
    first: SegmentRef,
    /// Segments 1 and on: empty (no allocation) for a message of one
    /// segment; a buffer kept by the receiving side otherwise.
    rest: Vec<SegmentRef>,
    body: OwnedBody,
}

enum OwnedBody {
    /// The validated table: each segment is in the peer's mapping, which
    /// the `Rc` keeps alive.
    InPlace {
        side: Rc<RecvSide>,
        table: SegmentTable,
        /// For a message with segments in the peer's areas, every segment's
        /// place (which keeps its area mapped); empty otherwise.
        places: Vec<Place>,
        /// `(slot, seq)` to release on drop; `None` once released.
        release: Option<(u32, u32)>,
    },
    /// A private copy, already released.
    Copied { side: Rc<RecvSide>, copy: Detached },
    /// A small message carried in its descriptor, copied out; its buffer
    /// goes back to `side` on drop (`None` once it has).
    Carried {
        side: Rc<RecvSide>,
        carried: Option<Carried>,
    },
    /// A frame in a stream channel's receive buffer.
    Framed {
        rx: Rc<StreamRecv>,
        frame: HeldFrame,
    },
}

impl OwnedSegments {
    /// The segments of `body`, found once: each lookup after is a load.
    fn new(body: OwnedBody) -> OwnedSegments {
        let count = body.len();
        let segments = (0..count).map(|i| body.segment(i).unwrap_or(&[]));
        let (first, rest) = segment_ref::split(count as usize, segments, || match &body {
            OwnedBody::InPlace { side, .. }
            | OwnedBody::Copied { side, .. }
            | OwnedBody::Carried { side, .. } => side.segment_refs(),
            OwnedBody::Framed { rx, .. } => rx.segment_refs(),
        });
        OwnedSegments { first, rest, body }
    }
}

impl OwnedBody {
    /// Segment `idx`, looked up (once, by [`OwnedSegments::new`]).
    fn segment(&self, idx: u32) -> Option<&[u8]> {
        match self {
            OwnedBody::InPlace {
                side,
                table,
                places,
                ..
            } => {
                if places.is_empty() {
                    side.link().peer().segment(table.get(idx)?.extent)
                } else {
                    places.get(idx as usize)?.bytes(side)
                }
            }
            OwnedBody::Copied { copy, .. } => copy.get_segment(idx),
            OwnedBody::Carried { carried, .. } => carried.as_ref()?.get_segment(idx),
            OwnedBody::Framed { frame, .. } => frame.get_segment(idx),
        }
    }

    /// How many segments.
    fn len(&self) -> u32 {
        let n = match self {
            OwnedBody::InPlace { table, .. } => table.len() as usize,
            OwnedBody::Copied { copy, .. } => copy.len(),
            OwnedBody::Carried { .. } => 1,
            OwnedBody::Framed { frame, .. } => frame.len(),
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

impl ReaderSegments for OwnedSegments {
    /// As [`Segments`]' own: a load and a compare, no call.
    #[inline(always)]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        // SAFETY: the invariant of `OwnedSegments`, as for `Segments`' own
        // (see there why moving the body keeps the pointers good): valid
        // and unwritten by this process until `self` drops.
        unsafe { segment_ref::segment(self.first, &self.rest, idx) }
    }

    fn len(&self) -> usize {
        1 + self.rest.len()
    }
}

impl OwnedSegments {
    /// Whether the message lies in private memory (see
    /// [`OwnedReceived::is_copied`]).
    fn is_private(&self) -> bool {
        matches!(
            self.body,
            OwnedBody::Copied { .. } | OwnedBody::Carried { .. } | OwnedBody::Framed { .. }
        )
    }
}

impl Drop for OwnedSegments {
    /// The release and the buffers back to the side; the body's own drop
    /// follows. Nothing reads the segments after (they may point into
    /// what the body frees).
    fn drop(&mut self) {
        self.first = SegmentRef::EMPTY;
        match &mut self.body {
            OwnedBody::InPlace {
                side,
                table,
                places,
                release,
            } => {
                side.let_go(release, places);
                side.recycle_spans(&mut table.take_spans());
                side.recycle_segment_refs(&mut self.rest);
            }
            OwnedBody::Carried { side, carried } => side.recycle_carried(carried),
            OwnedBody::Copied { side, .. } => side.recycle_segment_refs(&mut self.rest),
            OwnedBody::Framed { rx, .. } => {
                rx.recycle_segment_refs(&mut self.rest);
                rx.dropped();
            }
        }
    }
}

impl fmt::Debug for OwnedSegments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, seq) = match &self.body {
            OwnedBody::InPlace { release, .. } => ("in place", release.map(|(_, seq)| seq)),
            OwnedBody::Copied { .. } => ("copied", None),
            OwnedBody::Carried { .. } => ("carried in its descriptor", None),
            OwnedBody::Framed { .. } => ("stream buffer", None),
        };
        f.debug_struct("OwnedSegments")
            .field("storage", &kind)
            .field("count", &self.len())
            .field("seq", &seq)
            .finish()
    }
}
