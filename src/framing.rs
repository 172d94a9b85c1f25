//! Cap'n Proto's standard stream framing, for the stream transport (the
//! same channel API over TCP, and over a Unix socket when shared memory is
//! not used; `stream.rs`). Tested against `capnp::serialize` both ways.
//!
//! The framing (the encoding spec's "stream" format, unpacked): a `u32`
//! segment count minus one, a `u32` length in words per segment, zero
//! padding to a whole word, then the segments, all little-endian.
//!
//! [`FrameReader`] decodes incrementally from a byte source that may stop
//! anywhere (a non-blocking socket, a peer that dribbles a byte a second)
//! into one private, word-aligned buffer that is reused: once it has grown
//! to the largest frame seen, decoding allocates nothing. A frame the caller
//! keeps past the next read ([`FrameReader::hold`], for a message the
//! application still holds) shares that buffer; the reader then moves to a
//! spare one, copying only the bytes it has not handed out, and the old one
//! is reused once the frame is dropped. Everything in a
//! header is checked before a byte of buffer is sized by it: a segment
//! count of 0 or over capnp's 512, a total beyond the reader's traversal
//! limit, and a stream that ends inside a frame each get their own
//! [`FrameError`].

use std::fmt;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;

use capnp::message::ReaderSegments;
use capnp::Word;

/// The most segments a frame may have: `capnp::serialize` refuses 512 and
/// more, and so does this reader.
pub(crate) const MAX_SEGMENTS: usize = capnp::serialize::SEGMENTS_COUNT_LIMIT - 1;

/// Bytes of buffer to start with.
const MIN_READ: usize = 8 << 10;

/// Frames longer than this are read to their end and no further (see
/// [`FrameReader::fill`]).
const LARGE_FRAME: usize = 64 << 10;

const WORD: usize = 8;

/// A frame the peer sent that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The header's segment count is 0 (a raw count of `u32::MAX`) or over
    /// [`MAX_SEGMENTS`].
    SegmentCount { count: u64 },
    /// The segments add up to more words than the reader may traverse.
    TooLarge { words: u64, limit: u64 },
    /// The stream ended `have` bytes into a frame of at least `need`.
    Truncated { have: usize, need: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::SegmentCount { count } => write!(
                f,
                "stream frame claims {count} segments (1 to {MAX_SEGMENTS} allowed)"
            ),
            FrameError::TooLarge { words, limit } => write!(
                f,
                "stream frame of {words} words is over the traversal limit of {limit} words"
            ),
            FrameError::Truncated { have, need } => write!(
                f,
                "stream ended {have} bytes into a frame of at least {need} bytes"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// What one [`FrameReader::fill`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filled {
    /// This many bytes (at least one).
    Bytes(usize),
    /// The source has ended.
    End,
}

/// An incremental decoder of standard stream frames over a reused,
/// word-aligned buffer.
pub(crate) struct FrameReader {
    /// The buffer reads go into. Shared with [`HeldFrame`]s the caller
    /// keeps; written only while this reader is its sole owner (it moves to
    /// another buffer first otherwise: see [`buffer_mut`](Self::buffer_mut)).
    buf: Arc<Vec<Word>>,
    /// Buffers that held frames; reused once no frame holds them.
    spare: Vec<Arc<Vec<Word>>>,
    /// Buffers allocated so far (tests of reuse).
    #[cfg(test)]
    allocated: usize,
    /// Bytes of `buf` holding stream data, from `start`.
    filled: usize,
    /// Where the current frame begins (always a whole word: headers and
    /// segments are).
    start: usize,
    limit_words: u64,
    /// The current frame's segments, as byte ranges of `buf`, once it is
    /// whole (reused).
    segments: Vec<Range<usize>>,
    /// The current frame's length in bytes, once it is whole.
    frame: Option<usize>,
}

impl fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffer_bytes", &(self.buf.len() * WORD))
            .field("pending_bytes", &(self.filled - self.start))
            .field("frame", &self.frame)
            .finish()
    }
}

impl FrameReader {
    /// A reader that refuses frames over `limit_words` words (capnp's
    /// `ReaderOptions::traversal_limit_in_words`; `None`: no limit beyond
    /// what a `u32` segment table can say).
    pub(crate) fn new(limit_words: Option<usize>) -> FrameReader {
        FrameReader {
            buf: Arc::new(Word::allocate_zeroed_vec(MIN_READ / WORD)),
            spare: Vec::new(),
            #[cfg(test)]
            allocated: 1,
            filled: 0,
            start: 0,
            limit_words: limit_words.map_or(u64::MAX, |l| l as u64),
            segments: Vec::new(),
            frame: None,
        }
    }

    /// Bytes of the stream that were read before this reader existed (a
    /// listener's look at a client's first bytes): they come first.
    pub(crate) fn preload(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        // A slice reads what it has, and `fill` always makes room for a
        // byte at least: every round takes some.
        while !rest.is_empty() {
            let _ = self.fill(&mut rest);
        }
    }

    /// One read from `src` into the buffer (compacting or growing it first
    /// if the current frame needs room): how many bytes came, or the end.
    /// `WouldBlock` and `Interrupted` come back as errors for the caller's
    /// loop. Call [`next_frame`](Self::next_frame) afterwards.
    pub(crate) fn fill(&mut self, src: &mut impl Read) -> io::Result<Filled> {
        self.make_room();
        let filled = self.filled;
        // Small frames: read as much as has come (many frames a read). A
        // large one: read to its end and no further, so the next frame
        // starts at the front of the buffer instead of being moved there.
        let end = match self.header() {
            Ok(Some((header, words))) if header + words_to_bytes(words) > LARGE_FRAME => {
                self.start + header + words_to_bytes(words)
            }
            _ => usize::MAX,
        };
        let bytes = Word::words_to_bytes_mut(self.buffer_mut());
        let end = end.min(bytes.len());
        match src.read(&mut bytes[filled..end])? {
            0 => Ok(Filled::End),
            n => {
                self.filled += n;
                Ok(Filled::Bytes(n))
            }
        }
    }

    /// Whether a whole frame is ready: `Ok(true)` when it is (read it with
    /// [`segments`](Self::segments), then [`consume`](Self::consume));
    /// `Ok(false)` when more bytes are needed.
    ///
    /// # Errors
    ///
    /// A header that cannot be right.
    pub(crate) fn next_frame(&mut self) -> Result<bool, FrameError> {
        if self.frame.is_some() {
            return Ok(true);
        }
        let Some((header, words)) = self.header()? else {
            return Ok(false);
        };
        let total = header + words_to_bytes(words);
        if self.filled - self.start < total {
            return Ok(false);
        }
        let bytes = Word::words_to_bytes(&self.buf);
        let table = &bytes[self.start..];
        let count = u32_at(table, 0) as usize + 1;
        self.segments.clear();
        let mut at = self.start + header;
        for i in 0..count {
            let len = u32_at(table, 4 * (i + 1)) as usize * WORD;
            self.segments.push(at..at + len);
            at += len;
        }
        self.frame = Some(total);
        Ok(true)
    }

    /// The current frame's segments, for `capnp::message::Reader::new`.
    /// Only after [`next_frame`](Self::next_frame) said `true`.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> FrameSegments<'_> {
        debug_assert!(self.frame.is_some());
        FrameSegments {
            bytes: Word::words_to_bytes(&self.buf),
            segments: &self.segments,
        }
    }

    /// Done with the current frame: its bytes may be reused.
    pub(crate) fn consume(&mut self) {
        if let Some(len) = self.frame.take() {
            self.start += len;
            if self.start == self.filled {
                self.start = 0;
                self.filled = 0;
            }
        }
    }

    /// The source ended: an error if it ended inside a frame.
    ///
    /// # Errors
    ///
    /// [`FrameError::Truncated`] with what was there and what was needed.
    pub(crate) fn check_end(&self) -> Result<(), FrameError> {
        let have = self.filled - self.start;
        if have == 0 || self.frame.is_some() {
            return Ok(());
        }
        let need = match self.header() {
            Ok(Some((header, words))) => header + words_to_bytes(words),
            // The header itself is short (or its count was bad, which the
            // caller heard from `next_frame` already): its first word says
            // how long it is, once that is here.
            _ if have >= WORD => {
                let raw = u32_at(Word::words_to_bytes(&self.buf), self.start);
                header_bytes(usize::try_from(raw).unwrap_or(usize::MAX).saturating_add(1))
            }
            _ => WORD,
        };
        Err(FrameError::Truncated { have, need })
    }

    /// Keeps the current frame beyond the next read: the caller gets it
    /// with its buffer, and the reader moves to another buffer (a spare one
    /// no frame holds any more, or a new one) the next time it writes.
    /// That costs one copy of the bytes read past the frame. Then
    /// [`consume`](Self::consume) as usual. Only after
    /// [`next_frame`](Self::next_frame) said `true`.
    pub(crate) fn hold(&self) -> HeldFrame {
        debug_assert!(self.frame.is_some());
        let (first, more) = match self.segments.split_first() {
            Some((first, [])) => (first.clone(), Vec::new()),
            Some((first, more)) => (first.clone(), more.to_vec()),
            None => (0..0, Vec::new()),
        };
        HeldFrame {
            buf: Arc::clone(&self.buf),
            first,
            more,
        }
    }

    /// The buffer, for writing: moves to a buffer of its own first when a
    /// held frame shares the current one (copying the unread bytes).
    fn buffer_mut(&mut self) -> &mut Vec<Word> {
        if Arc::get_mut(&mut self.buf).is_none() {
            let len = self.buf.len();
            let reuse = self
                .spare
                .iter()
                .position(|b| Arc::strong_count(b) == 1 && b.len() >= len);
            let mut next = match reuse {
                Some(i) => self.spare.swap_remove(i),
                None => {
                    #[cfg(test)]
                    {
                        self.allocated += 1;
                    }
                    Arc::new(Word::allocate_zeroed_vec(len))
                }
            };
            let pending = self.filled - self.start;
            if let Some(words) = Arc::get_mut(&mut next) {
                Word::words_to_bytes_mut(words)[..pending]
                    .copy_from_slice(&Word::words_to_bytes(&self.buf)[self.start..self.filled]);
            }
            self.retire(next);
            self.start = 0;
            self.filled = pending;
        }
        Arc::get_mut(&mut self.buf).expect("a buffer of its own")
    }

    /// Makes `next` the current buffer; the old one waits among the spares
    /// while a held frame shares it (spares no frame holds are dropped
    /// beyond a few, so the pool stays as large as what is held).
    fn retire(&mut self, next: Arc<Vec<Word>>) {
        let old = std::mem::replace(&mut self.buf, next);
        if Arc::strong_count(&old) > 1 {
            self.spare.push(old);
        }
        let mut idle = 0;
        self.spare.retain(|b| {
            idle += usize::from(Arc::strong_count(b) == 1);
            Arc::strong_count(b) > 1 || idle <= 2
        });
    }

    /// Bytes of buffer, for tests of reuse.
    #[cfg(test)]
    fn capacity_bytes(&self) -> usize {
        self.buf.len() * WORD
    }

    /// The header's length and the frame's words, once the header is here.
    fn header(&self) -> Result<Option<(usize, u64)>, FrameError> {
        let have = self.filled - self.start;
        if have < WORD {
            return Ok(None);
        }
        let bytes = &Word::words_to_bytes(&self.buf)[self.start..self.filled];
        // The raw count plus one, in u64: a raw u32::MAX is 2^32, not 0.
        let count = u64::from(u32_at(bytes, 0)) + 1;
        if count > MAX_SEGMENTS as u64 || count == 1 << 32 {
            return Err(FrameError::SegmentCount {
                count: count & 0xFFFF_FFFF,
            });
        }
        // At most MAX_SEGMENTS, checked above.
        let count = usize::try_from(count).unwrap_or(MAX_SEGMENTS);
        // The lengths are checked as soon as they are here, before the
        // padding word.
        if have < 4 + 4 * count {
            return Ok(None);
        }
        let words: u64 = (0..count)
            .map(|i| u64::from(u32_at(bytes, 4 * (i + 1))))
            .sum();
        if words > self.limit_words {
            return Err(FrameError::TooLarge {
                words,
                limit: self.limit_words,
            });
        }
        let header = header_bytes(count);
        if have < header {
            return Ok(None);
        }
        Ok(Some((header, words)))
    }

    /// Room for the next read: the current frame moved to the front when
    /// that makes room, the buffer grown to the whole frame when its header
    /// (already checked) says it is larger.
    fn make_room(&mut self) {
        // A held frame shares the buffer: move to one of our own first
        // (which also moves the unread bytes to its front).
        self.buffer_mut();
        let pending = self.filled - self.start;
        // Room for one more byte at least, and for the whole frame once its
        // header (checked) says how long it is; nothing else sizes it.
        let need = match self.header() {
            Ok(Some((header, words))) => (header + words_to_bytes(words)).max(pending + 1),
            _ => pending + 1,
        };
        let capacity = self.buf.len() * WORD;
        if self.start + need <= capacity {
            return;
        }
        if need <= capacity {
            let (start, filled) = (self.start, self.filled);
            let bytes = Word::words_to_bytes_mut(self.buffer_mut());
            bytes.copy_within(start..filled, 0);
        } else {
            #[cfg(test)]
            {
                self.allocated += 1;
            }
            let mut grown = Word::allocate_zeroed_vec(need.next_power_of_two() / WORD);
            Word::words_to_bytes_mut(&mut grown)[..pending]
                .copy_from_slice(&Word::words_to_bytes(&self.buf)[self.start..self.filled]);
            self.retire(Arc::new(grown));
        }
        self.start = 0;
        self.filled = pending;
    }
}

/// Bytes of the header of a frame of `count` segments: 4 for the count, 4
/// per segment, padded to a whole word.
fn header_bytes(count: usize) -> usize {
    count.saturating_mul(4).saturating_add(4 + WORD - 1) & !(WORD - 1)
}

/// Byte length of `words` words; the caller checked `words` against the
/// traversal limit, which keeps this far from overflowing.
fn words_to_bytes(words: u64) -> usize {
    usize::try_from(words)
        .ok()
        .and_then(|w| w.checked_mul(WORD))
        .unwrap_or(usize::MAX)
}

/// The little-endian `u32` at byte `at` of `bytes` (which holds it).
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// The segments of a decoded frame, borrowed from the reader's buffer.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct FrameSegments<'r> {
    bytes: &'r [u8],
    segments: &'r [Range<usize>],
}

#[cfg(test)]
impl ReaderSegments for FrameSegments<'_> {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let range = self.segments.get(idx as usize)?;
        self.bytes.get(range.clone())
    }

    fn len(&self) -> usize {
        self.segments.len()
    }
}

/// A frame kept past the next read ([`FrameReader::hold`]): it shares the
/// reader's buffer until the reader moves on, and gives it back for reuse
/// when dropped. Read it with `capnp::message::Reader::new`.
#[derive(Debug)]
pub(crate) struct HeldFrame {
    buf: Arc<Vec<Word>>,
    first: Range<usize>,
    /// The other segments (none, and no allocation, for most messages).
    more: Vec<Range<usize>>,
}

impl HeldFrame {
    /// Words in the frame's segments.
    pub(crate) fn words(&self) -> u64 {
        let bytes: usize = std::iter::once(&self.first)
            .chain(&self.more)
            .map(ExactSizeIterator::len)
            .sum();
        (bytes / WORD) as u64
    }
}

impl ReaderSegments for HeldFrame {
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let range = match idx {
            0 => &self.first,
            i => self.more.get(i as usize - 1)?,
        };
        Word::words_to_bytes(&self.buf).get(range.clone())
    }

    fn len(&self) -> usize {
        1 + self.more.len()
    }
}

/// Appends one frame of `segments` (capnp's output of one message, whole
/// words each) to `out`: the header, its padding, the segments.
#[cfg(test)]
pub(crate) fn write_frame(out: &mut Vec<u8>, segments: &[&[u8]]) {
    write_header(out, segments);
    for s in segments {
        out.extend_from_slice(s);
    }
}

/// Appends the header of a frame of `segments` to `out`: the segment
/// count, the lengths, the padding (the segments follow it on the wire).
pub(crate) fn write_header(out: &mut Vec<u8>, segments: &[&[u8]]) {
    debug_assert!(!segments.is_empty() && segments.len() <= MAX_SEGMENTS);
    debug_assert!(segments.iter().all(|s| s.len() % WORD == 0));
    let count = segments.len();
    // At most 511 segments of whole words below 2^32 each (checked by the
    // caller against the same limits the reader applies).
    #[allow(clippy::cast_possible_truncation)]
    {
        out.extend_from_slice(&(count as u32 - 1).to_le_bytes());
        for s in segments {
            out.extend_from_slice(&((s.len() / WORD) as u32).to_le_bytes());
        }
    }
    if count % 2 == 0 {
        out.extend_from_slice(&[0; 4]);
    }
}

#[cfg(test)]
// Small test counts and bytes cut from random words on purpose.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use capnp::message::{Builder, HeapAllocator, Reader, ReaderOptions};

    /// A message of `segments` segments (first segment kept small), whose
    /// root is a list of `n` words, each `seed + i`.
    fn message(seed: u64, n: u32, small_first: bool) -> Builder<HeapAllocator> {
        let alloc = if small_first {
            HeapAllocator::new().first_segment_words(4)
        } else {
            HeapAllocator::new()
        };
        let mut m = Builder::new(alloc);
        let mut list = m
            .get_root::<capnp::any_pointer::Builder<'_>>()
            .expect("root")
            .initn_as::<capnp::primitive_list::Builder<'_, u64>>(n);
        for i in 0..n {
            list.set(i, seed + u64::from(i));
        }
        m
    }

    fn check<S: ReaderSegments>(r: &Reader<S>, seed: u64, n: u32) {
        let list: capnp::primitive_list::Reader<'_, u64> = r.get_root().expect("root");
        assert_eq!(list.len(), n);
        for i in 0..n {
            assert_eq!(list.get(i), seed + u64::from(i));
        }
    }

    /// A source that hands out at most `chunk` bytes per read.
    struct Dribble<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Decodes everything in `src`; returns the (seed, n) checks done and
    /// how the stream ended.
    fn decode_all(
        reader: &mut FrameReader,
        src: &mut impl Read,
        expect: &[(u64, u32)],
    ) -> Result<usize, FrameError> {
        let mut seen = 0;
        loop {
            while reader.next_frame()? {
                let (seed, n) = expect[seen];
                let r = Reader::new(reader.segments(), ReaderOptions::new());
                check(&r, seed, n);
                seen += 1;
                reader.consume();
            }
            match reader.fill(src).expect("read") {
                Filled::Bytes(_) => {}
                Filled::End => {
                    reader.check_end()?;
                    return Ok(seen);
                }
            }
        }
    }

    #[test]
    fn reads_what_capnp_serialize_writes_in_any_chunks() {
        let expect: Vec<(u64, u32)> = (0..300u64)
            .map(|i| (i * 1000, (i as u32 * 37) % 3000))
            .collect();
        let mut stream = Vec::new();
        for (k, &(seed, n)) in expect.iter().enumerate() {
            // Every third message spans several segments.
            capnp::serialize::write_message(&mut stream, &message(seed, n, k % 3 == 0))
                .expect("write");
        }
        for chunk in [1, 7, 4096, usize::MAX] {
            let mut reader = FrameReader::new(Some(1 << 20));
            let mut src = Dribble {
                data: &stream,
                chunk,
            };
            assert_eq!(
                decode_all(&mut reader, &mut src, &expect),
                Ok(300),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn capnp_serialize_reads_what_write_frame_writes() {
        let mut stream = Vec::new();
        for i in 0..100u64 {
            let m = message(i, (i as u32 * 91) % 2000, i % 2 == 0);
            write_frame(&mut stream, &m.get_segments_for_output());
        }
        let mut src = &stream[..];
        for i in 0..100u64 {
            let r = capnp::serialize::read_message(&mut src, ReaderOptions::new()).expect("read");
            check(&r, i, (i as u32 * 91) % 2000);
        }
        assert!(src.is_empty());
    }

    #[test]
    fn the_buffer_is_reused_in_the_steady_state() {
        let mut stream = Vec::new();
        for i in 0..1000u64 {
            capnp::serialize::write_message(&mut stream, &message(i, 500, false)).expect("write");
        }
        let mut reader = FrameReader::new(None);
        let mut src = Dribble {
            data: &stream,
            chunk: 3000,
        };
        let mut capacities = std::collections::BTreeSet::new();
        let mut frames = 0;
        while frames < 1000 {
            while reader.next_frame().expect("frame") {
                let r = Reader::new(reader.segments(), ReaderOptions::new());
                check(&r, frames, 500);
                frames += 1;
                reader.consume();
            }
            if frames < 1000 {
                reader.fill(&mut src).expect("read");
            }
            // From the first frame on, the buffer is as large as it gets.
            if frames > 0 {
                capacities.insert(reader.capacity_bytes());
            }
        }
        assert_eq!(capacities.len(), 1, "no growth: {capacities:?}");
    }

    fn header(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn first_error(stream: &[u8], limit: Option<usize>) -> FrameError {
        let mut reader = FrameReader::new(limit);
        let mut src = stream;
        loop {
            match reader.next_frame() {
                Err(e) => return e,
                Ok(true) => reader.consume(),
                Ok(false) => {}
            }
            if reader.fill(&mut src).expect("read") == Filled::End {
                return reader.check_end().expect_err("the stream is bad");
            }
        }
    }

    #[test]
    fn a_bad_segment_count_is_refused() {
        assert_eq!(
            first_error(&header(&[u32::MAX, 0]), None),
            FrameError::SegmentCount { count: 0 }
        );
        assert_eq!(
            first_error(&header(&[511, 0]), None),
            FrameError::SegmentCount { count: 512 }
        );
        // 511 segments is the most capnp::serialize takes, and so do we.
        let mut most = header(&[510]);
        most.extend(header(&[0; 511]));
        let mut reader = FrameReader::new(None);
        let mut src = &most[..];
        reader.fill(&mut src).expect("read");
        assert_eq!(reader.next_frame(), Ok(true));
        assert_eq!(reader.segments().len(), 511);
    }

    #[test]
    fn lengths_beyond_the_limit_are_refused_before_any_buffer_is_sized() {
        let mut reader = FrameReader::new(Some(1 << 20));
        let before = reader.capacity_bytes();
        let mut src = &header(&[1, u32::MAX, u32::MAX])[..];
        reader.fill(&mut src).expect("read");
        assert_eq!(
            reader.next_frame(),
            Err(FrameError::TooLarge {
                words: 2 * u64::from(u32::MAX),
                limit: 1 << 20
            })
        );
        // Asking for room again does not size the buffer by a bad header.
        reader.make_room();
        assert_eq!(reader.capacity_bytes(), before);
    }

    #[test]
    fn a_frame_cut_short_by_the_end_of_the_stream_is_truncated() {
        let mut stream = Vec::new();
        capnp::serialize::write_message(&mut stream, &message(5, 100, false)).expect("write");
        let whole = stream.len();
        // The first frame whole, then half of a second one.
        capnp::serialize::write_message(&mut stream, &message(6, 100, false)).expect("write");
        stream.truncate(whole + whole / 2);
        let mut reader = FrameReader::new(None);
        let mut src = &stream[..];
        assert_eq!(
            decode_all(&mut reader, &mut src, &[(5, 100)]),
            Err(FrameError::Truncated {
                have: whole / 2,
                need: whole
            })
        );
        // A header cut short.
        assert_eq!(
            first_error(&[0, 0, 0], None),
            FrameError::Truncated { have: 3, need: 8 }
        );
    }

    #[test]
    fn trailing_garbage_after_a_frame_is_an_error_not_a_message() {
        let mut stream = Vec::new();
        capnp::serialize::write_message(&mut stream, &message(9, 10, false)).expect("write");
        stream.extend_from_slice(&[0xFF; 8]); // a count of 2^32: nonsense
        let mut reader = FrameReader::new(None);
        let mut src = &stream[..];
        assert_eq!(
            decode_all(&mut reader, &mut src, &[(9, 10)]),
            Err(FrameError::SegmentCount { count: 0 })
        );
        let mut stream = Vec::new();
        capnp::serialize::write_message(&mut stream, &message(9, 10, false)).expect("write");
        stream.extend_from_slice(b"junk");
        let mut src = &stream[..];
        let mut reader = FrameReader::new(None);
        assert_eq!(
            decode_all(&mut reader, &mut src, &[(9, 10)]),
            Err(FrameError::Truncated { have: 4, need: 8 })
        );
    }

    /// Random streams (and random damage to good ones), fed in random
    /// chunks: never a panic, never a buffer larger than the limit allows,
    /// and every frame that decodes is one capnp can be given.
    #[test]
    fn random_and_damaged_streams_are_refused_or_read_never_crash() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut good = Vec::new();
        for i in 0..20u64 {
            capnp::serialize::write_message(&mut good, &message(i, 64, i % 2 == 0)).expect("write");
        }
        const LIMIT_WORDS: usize = 1 << 16;
        for round in 0..2000 {
            let stream: Vec<u8> = if round % 2 == 0 {
                (0..(next() % 512) as usize).map(|_| next() as u8).collect()
            } else {
                let mut s = good.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % s.len();
                    s[at] = next() as u8;
                }
                s.truncate((next() as usize) % (s.len() + 1));
                s
            };
            let mut reader = FrameReader::new(Some(LIMIT_WORDS));
            let mut src = Dribble {
                data: &stream,
                chunk: 1 + (next() % 300) as usize,
            };
            'stream: loop {
                loop {
                    match reader.next_frame() {
                        Ok(true) => {
                            let r = Reader::new(reader.segments(), ReaderOptions::new());
                            let _ = r.get_root::<capnp::any_pointer::Reader<'_>>();
                            reader.consume();
                        }
                        Ok(false) => break,
                        Err(_) => break 'stream,
                    }
                }
                if reader.fill(&mut src).expect("read") == Filled::End {
                    let _ = reader.check_end();
                    break;
                }
            }
            assert!(
                reader.capacity_bytes() <= (LIMIT_WORDS * WORD + 4096).next_power_of_two(),
                "round {round}: buffer of {} bytes",
                reader.capacity_bytes()
            );
        }
    }

    #[test]
    fn held_frames_stay_readable_and_their_buffers_come_back() {
        let mut stream = Vec::new();
        for i in 0..2000u64 {
            capnp::serialize::write_message(
                &mut stream,
                &message(i, 100 + (i % 7) as u32, i % 5 == 0),
            )
            .expect("write");
        }
        let mut reader = FrameReader::new(None);
        let mut src = Dribble {
            data: &stream,
            chunk: 5000,
        };
        // Keep the last three frames alive while reading on, the way a
        // caller holding a few messages would; check each when it goes.
        let mut held: std::collections::VecDeque<(u64, HeldFrame)> = Default::default();
        let mut next = 0u64;
        let mut allocated_after_warm_up = None;
        while next < 2000 {
            while reader.next_frame().expect("frame") {
                held.push_back((next, reader.hold()));
                reader.consume();
                next += 1;
                if held.len() > 3 {
                    let (i, frame) = held.pop_front().expect("held");
                    check(
                        &Reader::new(frame, ReaderOptions::new()),
                        i,
                        100 + (i % 7) as u32,
                    );
                }
                if next == 100 {
                    allocated_after_warm_up = Some(reader.allocated);
                }
            }
            if next < 2000 {
                reader.fill(&mut src).expect("read");
            }
        }
        for (i, frame) in held {
            check(
                &Reader::new(frame, ReaderOptions::new()),
                i,
                100 + (i % 7) as u32,
            );
        }
        assert_eq!(
            Some(reader.allocated),
            allocated_after_warm_up,
            "buffers are reused once warmed up"
        );
        assert!(
            reader.spare.len() <= 6,
            "{} spare buffers",
            reader.spare.len()
        );
    }
}
