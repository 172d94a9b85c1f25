//! One owning type for one shared mapping of a file.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop, optionally
/// followed by a guard zone of read-only zero pages.
///
/// The mapping owns its address range (the file's pages and the guard):
/// nothing else unmaps it, and it never moves. It does not hand out
/// references itself; `region.rs` builds typed, bounds-checked views on top
/// of [`Mapping::as_ptr`].
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    /// Bytes of the file mapped.
    len: usize,
    /// Bytes of the whole range: `len` plus the guard zone.
    reserved: usize,
}

// SAFETY: a Mapping is a plain address range owned by this value; moving it to
// another thread moves the ownership, and unmapping happens once, in `Drop`.
unsafe impl Send for Mapping {}

// SAFETY: a shared `&Mapping` hands out only the address and the length; it
// never reads or writes the bytes itself. What may be done with the address
// from several threads is the business of the views built on it
// (`region.rs`: atomics, and data-area access behind `unsafe fn`s).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared, readable, and writable
    /// when `writable` is set. `mmap(2)`
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing cannot
        // overlap memory Rust knows about; `fd` is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping {
            ptr,
            len,
            reserved: len,
        })
    }

    /// Maps `len` bytes of `fd` read-only and shared, followed by `guard`
    /// bytes of private, read-only zero pages (a multiple of the page
    /// size): reads that run past the file's end find zeros, not whatever
    /// mapping happens to follow. First reserves the whole range as an
    /// anonymous read-only mapping (no memory is committed to it), then maps
    /// the file over its start. `mmap(2)`
    pub(crate) fn map_with_guard(
        fd: BorrowedFd<'_>,
        len: usize,
        guard: usize,
    ) -> io::Result<Mapping> {
        let reserved = len
            .checked_add(guard)
            .filter(|_| len > 0)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing cannot overlap memory Rust knows about.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: replaces the first `len` bytes of the reservation just
        // made (MAP_FIXED), which nothing else refers to; `fd` is valid.
        let file = unsafe {
            libc::mmap(
                base,
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if file == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: the reservation made above, not handed out.
            unsafe { libc::munmap(base, reserved) };
            return Err(e);
        }
        let ptr = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len, reserved })
    }

    /// The first byte of the mapping (page aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The length of the mapping in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // munmap cannot fail for such a range; an error would be ignored
        // rather than panic in drop.
        // SAFETY: exactly the range mmap returned (the file and any guard),
        // still mapped (only this drop unmaps it); every borrow of it is tied
        // to its owner's lifetime.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.reserved) };
    }
}
