//! The capnp [`Allocator`](capnp::message::Allocator) that builds messages
//! in place, in the sending side's data area.

#![allow(unsafe_code)]

use std::fmt;
use std::ptr::NonNull;

use capnp::message::{Allocator, HeapAllocator};

use crate::send::SendSide;

/// The capnp allocator of one message being built in a channel's outgoing
/// region. Get one through [`Sender::message`](crate::Sender::message).
///
/// Segments come from the channel's data area: zeroed, 8-byte aligned,
/// growing (each new segment at least as large as all before it together). When
/// the area is momentarily full the segment comes from the heap instead and
/// `send` copies it in; allocation itself never fails, blocks or panics.
/// On a [stream channel](crate::Transport::Stream), which has no region,
/// every segment comes from the heap.
pub struct RegionAllocator<'s> {
    /// `None` on a stream channel.
    side: Option<&'s SendSide>,
    next_words: u32,
    heap: HeapAllocator,
    /// Whether `heap` gave a segment: until it does, every segment is the
    /// side's.
    used_heap: bool,
}

impl<'s> RegionAllocator<'s> {
    /// An allocator over `side`. In a process that does not own the end,
    /// every segment comes from the heap (the region is the owner's).
    pub(crate) fn new(side: &'s SendSide, first_segment_words: u32) -> RegionAllocator<'s> {
        RegionAllocator {
            side: Some(side),
            next_words: first_segment_words,
            heap: HeapAllocator::new(),
            used_heap: false,
        }
    }

    /// An allocator with no region (a stream channel's): capnp's heap
    /// allocator, starting with `first_segment_words`.
    pub(crate) fn heap(first_segment_words: u32) -> RegionAllocator<'s> {
        RegionAllocator {
            side: None,
            next_words: first_segment_words,
            heap: HeapAllocator::new().first_segment_words(first_segment_words.max(1)),
            used_heap: false,
        }
    }
}

impl fmt::Debug for RegionAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionAllocator")
            .field("next_words", &self.next_words)
            .finish_non_exhaustive()
    }
}

// SAFETY: the contract of `Allocator`:
// - `allocate_segment` returns `len >= minimum_size` words of zeroed, 8-byte
//   aligned memory: region extents are word offsets in a page-aligned data
//   area, and the free list holds only zeroed words (see `FreeList`); heap
//   segments come from capnp's own `HeapAllocator`, which meets the contract.
// - The memory stays valid and unaliased until `deallocate_segment`: region
//   extents are recorded as open in the sending side's books and handed to
//   nobody else until this allocator gives them back, or until `send` moves
//   them to an in-flight message (the builder is then consumed, so capnp
//   never touches them again); the mapping outlives every allocator, which
//   borrows the sending side. Only the process that owns the end gets
//   region extents (`SendSide::allocate_segment` checks).
unsafe impl Allocator for RegionAllocator<'_> {
    fn allocate_segment(&mut self, minimum_size: u32) -> (NonNull<u8>, u32) {
        let min = minimum_size.max(1);
        let want = self.next_words.max(min);
        let region = self.side.and_then(|side| side.allocate_segment(min, want));
        if let Some((ptr, words)) = region {
            self.next_words = self.next_words.saturating_add(words);
            return (ptr, words);
        }
        self.used_heap = true;
        self.heap.allocate_segment(minimum_size)
    }

    #[inline]
    unsafe fn deallocate_segment(&mut self, ptr: NonNull<u8>, word_size: u32, words_used: u32) {
        if let Some(side) = self.side {
            if !self.used_heap {
                // The common case: a builder whose segments all came from
                // the side (and were usually sent).
                side.deallocate_own_segment(ptr, words_used);
                return;
            }
            if side.deallocate_segment(ptr, words_used) {
                return;
            }
        }
        // The side recognises every pointer into its region (open or
        // sent), so `ptr` came from `self.heap` (as every pointer does
        // without a side).
        // SAFETY: a heap segment of ours; capnp's arguments passed unchanged.
        unsafe { self.heap.deallocate_segment(ptr, word_size, words_used) }
    }
}
