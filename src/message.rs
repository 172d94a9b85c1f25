//! Received messages: a capnp reader over segments in the peer's region, and
//! the release when it drops.

use std::fmt;
use std::rc::Rc;

use capnp::message::{Reader, ReaderOptions, ReaderSegments};
use capnp::traits::FromPointerReader;
use capnp::Word;

use crate::error::{Failure, ProtocolError};
use crate::recv::RecvSide;
use crate::ring::{SegmentTable, Taken};

/// The methods a received message has, owned or borrowing: one body for
/// both types.
macro_rules! received_methods {
    ($segments:ty, $copied:pat) => {
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

        /// Whether the message was copied into private memory
        /// ([`Options::copy_received`](crate::Options::copy_received)).
        pub fn is_copied(&self) -> bool {
            matches!(self.reader.get_segments().body, $copied)
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
            Reader::new(Detached { words, ends }, self.options)
        }
    };
}

/// A received message, read in place.
///
/// Its segments stay in the peer's shared region (or, with
/// [`Options::copy_received`](crate::Options::copy_received), in a private
/// copy) until it drops; dropping it tells the peer the space may be reused.
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
    reader: Reader<Segments<'c>>,
    /// The limits the reader was made with (for copies of it).
    options: ReaderOptions,
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
    pub(crate) fn new(side: &'c RecvSide, taken: Taken) -> Result<Received<'c>, Failure> {
        let options = side.link().options();
        let limits = options.reader_options_for(taken.table.words());
        let segments = if options.copy_received {
            Segments::copied(side, &taken, limits)?
        } else {
            Segments::in_place(side, &taken)
        };
        Ok(Received {
            reader: Reader::new(segments, limits),
            options: limits,
        })
    }

    received_methods!(Segments<'c>, Body::Copied(_));
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
pub struct Segments<'c> {
    side: &'c RecvSide,
    body: Body<'c>,
    /// `(slot, seq)` to release on drop; `None` once released.
    release: Option<(u32, u32)>,
}

enum Body<'c> {
    /// Slices of the peer's data area, made once from the validated table so
    /// that capnp's many `get_segment` calls are a plain lookup.
    InPlace {
        first: &'c [u8],
        more: Vec<&'c [u8]>,
    },
    /// A private copy, already released.
    Copied(Detached),
}

/// Copies the segments of `taken` out of `side`'s peer region, and releases
/// the message (the copy no longer needs the shared words). What the copy
/// may cost is bounded before anything is allocated: no more than the
/// reader may read, allocated fallibly; otherwise the message is released
/// uncopied and the end fails.
fn copy_out(side: &RecvSide, taken: &Taken, limits: ReaderOptions) -> Result<Detached, Failure> {
    let table: &SegmentTable = &taken.table;
    let peer = side.link().peer();
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
    for i in 0..table.len() {
        // The table was validated: every extent lies in the data area and
        // together they fit in it, so `total` covers them all.
        if let Some(e) = table.get(i) {
            let len = e.len as usize * 8;
            if let Some(dst) = bytes.get_mut(at..at + len) {
                if peer.copy_segment(e, dst) {
                    at += len;
                }
            }
        }
        ends.push(at);
    }
    side.release(taken.slot, taken.seq);
    Ok(Detached { words, ends })
}

impl<'c> Segments<'c> {
    fn in_place(side: &'c RecvSide, taken: &Taken) -> Segments<'c> {
        let peer = side.link().peer();
        let table = &taken.table;
        // The table was validated against the data area, so every lookup
        // succeeds; an empty slice would only make capnp report an error.
        let slice = |i| table.get(i).and_then(|e| peer.segment(e)).unwrap_or(&[]);
        Segments {
            side,
            body: Body::InPlace {
                first: slice(0),
                more: (1..table.len()).map(slice).collect(),
            },
            release: Some((taken.slot, taken.seq)),
        }
    }

    fn copied(
        side: &'c RecvSide,
        taken: &Taken,
        limits: ReaderOptions,
    ) -> Result<Segments<'c>, Failure> {
        Ok(Segments {
            side,
            body: Body::Copied(copy_out(side, taken, limits)?),
            release: None,
        })
    }
}

impl ReaderSegments for Segments<'_> {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        match &self.body {
            Body::InPlace { first, more } => match idx {
                0 => Some(first),
                i => more.get(i as usize - 1).copied(),
            },
            Body::Copied(copy) => copy.get_segment(idx),
        }
    }

    fn len(&self) -> usize {
        match &self.body {
            Body::InPlace { more, .. } => 1 + more.len(),
            Body::Copied(copy) => copy.len(),
        }
    }
}

impl Drop for Segments<'_> {
    fn drop(&mut self) {
        if let Some((slot, seq)) = self.release.take() {
            self.side.release(slot, seq);
        }
    }
}

impl fmt::Debug for Segments<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.body {
            Body::InPlace { .. } => "in place",
            Body::Copied(_) => "copied",
        };
        f.debug_struct("Segments")
            .field("storage", &kind)
            .field("count", &self.len())
            .field("seq", &self.release.map(|(_, seq)| seq))
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
    pub(crate) fn new(side: Rc<RecvSide>, taken: Taken) -> Result<OwnedReceived, Failure> {
        let options = side.link().options();
        let limits = options.reader_options_for(taken.table.words());
        let (body, release) = if options.copy_received {
            (OwnedBody::Copied(copy_out(&side, &taken, limits)?), None)
        } else {
            let release = Some((taken.slot, taken.seq));
            (OwnedBody::InPlace(taken.table), release)
        };
        let segments = OwnedSegments {
            side,
            body,
            release,
        };
        Ok(OwnedReceived {
            reader: Reader::new(segments, limits),
            options: limits,
        })
    }

    received_methods!(OwnedSegments, OwnedBody::Copied(_));
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
pub struct OwnedSegments {
    side: Rc<RecvSide>,
    body: OwnedBody,
    /// `(slot, seq)` to release on drop; `None` once released.
    release: Option<(u32, u32)>,
}

enum OwnedBody {
    /// The validated table: each segment is looked up in the peer's
    /// mapping, which the `Rc` keeps alive.
    InPlace(SegmentTable),
    /// A private copy, already released.
    Copied(Detached),
}

impl ReaderSegments for OwnedSegments {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        match &self.body {
            OwnedBody::InPlace(table) => {
                let extent = table.get(idx)?;
                self.side.link().peer().segment(extent)
            }
            OwnedBody::Copied(copy) => copy.get_segment(idx),
        }
    }

    fn len(&self) -> usize {
        match &self.body {
            OwnedBody::InPlace(table) => table.len() as usize,
            OwnedBody::Copied(copy) => copy.len(),
        }
    }
}

impl Drop for OwnedSegments {
    fn drop(&mut self) {
        if let Some((slot, seq)) = self.release.take() {
            self.side.release(slot, seq);
        }
    }
}

impl fmt::Debug for OwnedSegments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.body {
            OwnedBody::InPlace(_) => "in place",
            OwnedBody::Copied(_) => "copied",
        };
        f.debug_struct("OwnedSegments")
            .field("storage", &kind)
            .field("count", &self.len())
            .field("seq", &self.release.map(|(_, seq)| seq))
            .finish()
    }
}
