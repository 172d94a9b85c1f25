//! One owning type for one shared mapping of a file.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A `MAP_SHARED` mapping of a whole file, unmapped on drop.
///
/// The mapping owns its address range: nothing else unmaps it, and it never
/// moves. It does not hand out references itself; `Region` (in `region.rs`)
/// builds typed, bounds-checked views on top of [`Mapping::as_ptr`].
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
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
        Ok(Mapping { ptr, len })
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
        // SAFETY: exactly the range mmap returned, still mapped (only this
        // drop unmaps it); every borrow of it is tied to its owner's lifetime.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
