//! A global allocator that counts allocations (`alloc`, `alloc_zeroed`,
//! `realloc`) and frees (`dealloc`), and forwards every call to the system allocator, for the
//! tests and the benchmark that measure allocations per message. Include it
//! at a binary's root with `#[path]`: it installs itself as the binary's
//! global allocator.
#![allow(unsafe_code, dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The counting allocator.
pub struct Counting;

/// Allocations made so far, in the whole process.
pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // Const-initialised, no destructor: usable inside the allocator.
    static THIS_THREAD: Cell<u64> = const { Cell::new(0) };
    static FREES_THIS_THREAD: Cell<u64> = const { Cell::new(0) };
}

/// Allocations made so far by the calling thread.
pub fn this_thread() -> u64 {
    THIS_THREAD.with(Cell::get)
}

/// Frees made so far by the calling thread (a `realloc` counts as an
/// allocation only).
pub fn frees_this_thread() -> u64 {
    FREES_THIS_THREAD.with(Cell::get)
}

fn counted() {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    THIS_THREAD.with(|n| n.set(n.get() + 1));
}

// SAFETY: forwards every call to the system allocator unchanged; only
// counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREES_THIS_THREAD.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;
