//! A received message's segments as pointers and lengths ([`SegmentRef`]),
//! beside the memory they point into: capnp's reader asks for a segment at
//! every pointer it follows, and [`segment`] answers with a load and a
//! compare, whatever the kind of message. Below the receiving sides, which
//! keep emptied lists of them, and `message.rs`, which holds them.
//!
//! `unsafe` here: the `Send` impl, and [`segment`], whose caller vouches for
//! the memory (the invariants of `Segments` and `OwnedSegments`).

#![allow(unsafe_code)]

use std::ptr::NonNull;

/// A segment's bytes as a pointer and a length: a slice with no lifetime,
/// for the memory may be the message's own.
#[derive(Clone, Copy)]
pub(crate) struct SegmentRef {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a receiving side keeps emptied lists of `SegmentRef`s for the
// next messages (`RecvSide::segment_refs`, `StreamRecv::segment_refs`), and
// without this the receiving halves that own a side (`Receiver`, `Channel`)
// could not move to another thread. A list is emptied when it is kept
// (`Spares::keep_vec`), so a moved side holds no `SegmentRef` at all. The
// segments that do hold them, `Segments` and `OwnedSegments`, are not
// `Send` (their bodies hold the side by `&` or `Rc`, and a side is not
// `Sync`), and only `segment` reads through one.
unsafe impl Send for SegmentRef {}

impl SegmentRef {
    /// No bytes.
    pub(crate) const EMPTY: SegmentRef = SegmentRef {
        ptr: NonNull::dangling(),
        len: 0,
    };

    /// The bytes of `segment`.
    #[inline(always)]
    pub(crate) fn of(segment: &[u8]) -> SegmentRef {
        SegmentRef {
            ptr: NonNull::from(segment).cast(),
            len: segment.len(),
        }
    }
}

/// Segment `idx` of a message whose segment 0 is `first` and whose others
/// are `rest`; `None` past the last. Inline in capnp's reader: a load, a
/// compare, and no call.
///
/// # Safety
///
/// Every reference was made by [`SegmentRef::of`] from bytes that stay
/// valid, and unwritten by this process, for as long as `rest` is borrowed
/// (the slice returned inherits that borrow).
#[inline(always)]
pub(crate) unsafe fn segment(first: SegmentRef, rest: &[SegmentRef], idx: u32) -> Option<&[u8]> {
    let segment = match idx {
        0 => first,
        i => *rest.get(i as usize - 1)?,
    };
    // SAFETY: the caller's duty: made from bytes valid and unwritten for as
    // long as `rest` is borrowed, which the returned slice inherits.
    let bytes = unsafe { std::slice::from_raw_parts(segment.ptr.as_ptr(), segment.len) };
    Some(bytes)
}

/// The references of `segments`, `count` of them: segment 0's, and a list
/// of the others, taken from `spare` (a receiving side's kept lists) only
/// when there are others, so that a message of one segment allocates
/// nothing.
#[inline(always)]
pub(crate) fn split<'a>(
    count: usize,
    mut segments: impl Iterator<Item = &'a [u8]>,
    spare: impl FnOnce() -> Vec<SegmentRef>,
) -> (SegmentRef, Vec<SegmentRef>) {
    let first = segments.next().map_or(SegmentRef::EMPTY, SegmentRef::of);
    let mut rest = Vec::new();
    if count > 1 {
        rest = spare();
        rest.extend(segments.map(SegmentRef::of));
    }
    (first, rest)
}
