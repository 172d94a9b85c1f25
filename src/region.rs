//! Mapped regions: creating this end's outgoing region, and typed,
//! bounds-checked views of both regions.
//!
//! This file turns raw mapped addresses into references. Every view is
//! checked against the region's validated [`Geometry`], and every shared field
//! is an atomic, so a reference stays sound whatever the other process does to
//! the bytes. The data area is the one exception: message payloads are plain
//! bytes (capnp reads them), see [`InRegion::segment`].

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use crate::layout::{
    ControlBlock, DescriptorEntry, Geometry, ReleaseEntry, FLAG_SEALED, MAGIC, VERSION, WORD,
};
use crate::options::Backing;
use crate::sys::errno as libc_errno;
use crate::sys::file;
use crate::sys::mapping::Mapping;

/// A run of words in a data area: `start..start + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) start: u32,
    pub(crate) len: u32,
}

impl Extent {
    pub(crate) fn end(self) -> u32 {
        self.start + self.len
    }
}

/// A mapped region and its validated geometry: the views both ends share.
#[derive(Debug)]
pub(crate) struct Region {
    map: Mapping,
    geometry: Geometry,
}

impl Region {
    /// Wraps a mapping of a region with a geometry already validated against
    /// the mapping's length.
    fn new(map: Mapping, geometry: Geometry) -> Region {
        debug_assert_eq!(Ok(geometry), geometry.validate());
        debug_assert_eq!(u64::try_from(map.len()).ok(), Some(geometry.region_size));
        Region { map, geometry }
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The control block at offset 0.
    pub(crate) fn control(&self) -> &ControlBlock {
        // The mapping is page aligned and at least CONTROL_BYTES long (the
        // geometry was validated against its length); the reference cannot
        // outlive `self`, which owns the mapping.
        // SAFETY: aligned, in bounds, all atomics (any bytes valid, shared ok).
        unsafe { &*self.map.as_ptr().cast::<ControlBlock>() }
    }

    /// The descriptor ring entry for sequence number `seq`.
    pub(crate) fn descriptor(&self, seq: u32) -> &DescriptorEntry {
        let index = u64::from(self.geometry.ring_index(seq));
        let offset =
            self.geometry.descriptors_offset() + index * size_of::<DescriptorEntry>() as u64;
        debug_assert!(
            offset + size_of::<DescriptorEntry>() as u64 <= self.geometry.releases_offset()
        );
        let ptr = self.at(offset).cast::<DescriptorEntry>();
        // SAFETY: index < ring_capacity, so the entry lies inside the
        // descriptor ring, inside the mapping; the offset is a multiple of 64
        // from a page-aligned base; the entry is all atomics (see `control`).
        unsafe { &*ptr }
    }

    /// The release ring entry for release number `n`.
    pub(crate) fn release_entry(&self, n: u32) -> &ReleaseEntry {
        let index = u64::from(self.geometry.ring_index(n));
        let offset = self.geometry.releases_offset() + index * size_of::<ReleaseEntry>() as u64;
        debug_assert!(offset + size_of::<ReleaseEntry>() as u64 <= self.geometry.data_offset());
        let ptr = self.at(offset).cast::<ReleaseEntry>();
        // SAFETY: index < ring_capacity, so the entry lies inside the release
        // ring, inside the mapping, 8-byte aligned; it is all atomics.
        unsafe { &*ptr }
    }

    /// The address `offset` bytes into the mapping; clamped to one past its
    /// end, which no caller reaches (their offsets come from the validated
    /// geometry).
    fn at(&self, offset: u64) -> *mut u8 {
        let offset = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.map.len());
        // SAFETY: `offset <= len`, so the result is inside the mapping or one
        // past its end.
        unsafe { self.map.as_ptr().add(offset) }
    }

    /// Whether `extent` lies inside the data area.
    pub(crate) fn contains(&self, extent: Extent) -> bool {
        u64::from(extent.start) + u64::from(extent.len) <= u64::from(self.geometry.data_words())
    }

    /// The address of word `offset` of the data area. `offset` must be at most
    /// the data area's length (checked in debug builds).
    fn data_ptr(&self, offset: u32) -> *mut u8 {
        debug_assert!(offset <= self.geometry.data_words());
        self.at(self.geometry.data_offset() + u64::from(offset) * WORD)
    }
}

/// Whether a failure of the memfd path means memfd regions are not to be had
/// here (so `Backing::Auto` falls back to `/dev/shm`): no `memfd_create`
/// (`ENOSYS`), refused by policy (`EPERM`, `EACCES`: seccomp, memfd_noexec),
/// or a seal this kernel does not know (`EINVAL`: `F_SEAL_FUTURE_WRITE`
/// needs Linux 5.1). Anything else (out of memory, descriptors) is an error
/// the fallback would not cure.
fn memfd_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::ENOSYS | libc_errno::EPERM | libc_errno::EACCES | libc_errno::EINVAL)
    )
}

/// This end's outgoing region, mapped read-write. Only this process writes it.
#[derive(Debug)]
pub(crate) struct OutRegion {
    region: Region,
    sealed: bool,
}

impl OutRegion {
    /// Creates the outgoing region: the file, its size, a read-write mapping,
    /// then the seals (after the mapping, so we keep writing while nobody else
    /// ever can), and finally the header. Returns the region and a read-only
    /// descriptor for the peer.
    pub(crate) fn create(geometry: Geometry, backing: Backing) -> io::Result<(OutRegion, OwnedFd)> {
        let geometry = geometry
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (region, peer_fd) = match backing {
            Backing::Memfd => Self::create_memfd(geometry)?,
            Backing::ShmFile => Self::create_shm_file(geometry)?,
            Backing::Auto => match Self::create_memfd(geometry) {
                Ok(made) => made,
                Err(e) if memfd_unavailable(&e) => {
                    Self::create_shm_file(geometry).map_err(|shm_err| {
                        io::Error::new(
                            shm_err.kind(),
                            format!("memfd unavailable ({e}); /dev/shm failed ({shm_err})"),
                        )
                    })?
                }
                Err(e) => return Err(e),
            },
        };
        let header = &region.region.control().header.0;
        header.magic.store(MAGIC, Ordering::Relaxed);
        header.version.store(VERSION, Ordering::Relaxed);
        header.flags.store(
            if region.sealed { FLAG_SEALED } else { 0 },
            Ordering::Relaxed,
        );
        header
            .region_size
            .store(geometry.region_size, Ordering::Relaxed);
        header
            .ring_capacity
            .store(geometry.ring_capacity, Ordering::Relaxed);
        // The peer reads the header only after receiving our hello over the
        // socket; the sendmsg system call orders these stores before it.
        Ok((region, peer_fd))
    }

    fn create_memfd(geometry: Geometry) -> io::Result<(OutRegion, OwnedFd)> {
        let fd = file::memfd_create(c"capnp-shm")?;
        file::ftruncate(fd.as_fd(), geometry.region_size)?;
        let map = Mapping::map(fd.as_fd(), Self::len(geometry)?, true)?;
        file::add_seals(fd.as_fd(), file::REGION_SEALS)?;
        // A read-only description for the peer where /proc allows one. The
        // seals are what protect the region (a peer could reopen its
        // descriptor read-write through its own /proc, and the seals still
        // refuse every write, resize and writable mapping), so without /proc
        // the peer gets our descriptor instead of losing the sealed region.
        let peer_fd = file::reopen_read_only(fd.as_fd()).unwrap_or(fd);
        // Our descriptor (if not sent) closes here; the mapping keeps the
        // file alive.
        Ok((
            OutRegion {
                region: Region::new(map, geometry),
                sealed: true,
            },
            peer_fd,
        ))
    }

    fn create_shm_file(geometry: Geometry) -> io::Result<(OutRegion, OwnedFd)> {
        let (rw, ro) = file::create_shm_file(geometry.region_size)?;
        let map = Mapping::map(rw.as_fd(), Self::len(geometry)?, true)?;
        Ok((
            OutRegion {
                region: Region::new(map, geometry),
                sealed: false,
            },
            ro,
        ))
    }

    fn len(geometry: Geometry) -> io::Result<usize> {
        usize::try_from(geometry.region_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }

    /// Whether the region is a sealed memfd.
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// The word offset of `ptr` in the data area, when `ptr` is a word-aligned
    /// address inside it.
    pub(crate) fn offset_of(&self, ptr: *const u8) -> Option<u32> {
        let base = self.region.data_ptr(0) as usize;
        let byte = u64::try_from((ptr as usize).checked_sub(base)?).ok()?;
        let word = u32::try_from(byte / WORD).ok()?;
        (byte % WORD == 0 && word < self.region.geometry.data_words()).then_some(word)
    }

    /// The address of the first word of `extent`, for handing to capnp.
    pub(crate) fn extent_ptr(&self, extent: Extent) -> NonNull<u8> {
        debug_assert!(self.region.contains(extent));
        debug_assert!(self.region.map.is_writable());
        NonNull::new(self.region.data_ptr(extent.start)).unwrap_or(NonNull::dangling())
    }

    /// Zeroes the words of `extent`.
    ///
    /// The caller guarantees no reference into `extent` is alive: the words
    /// are free, or owned by a message the peer has released.
    pub(crate) fn zero(&self, extent: Extent) {
        assert!(
            self.region.contains(extent),
            "zeroing outside the data area"
        );
        // SAFETY: the extent lies inside our writable mapping (asserted), no
        // reference into it exists (caller's guarantee), and bytes have no
        // invalid values.
        unsafe {
            std::ptr::write_bytes(
                self.region.data_ptr(extent.start),
                0,
                extent.len as usize * 8,
            )
        };
    }

    /// Copies `bytes` (a whole number of words) to the start of `extent`.
    ///
    /// The caller guarantees `extent` is free (no reference into it) and at
    /// least as long as `bytes`.
    pub(crate) fn write(&self, extent: Extent, bytes: &[u8]) {
        assert!(
            self.region.contains(extent) && bytes.len() <= extent.len as usize * 8,
            "write outside its extent"
        );
        // SAFETY: the destination lies inside our writable mapping and inside
        // `extent` (asserted); `bytes` is private memory, so they cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.region.data_ptr(extent.start),
                bytes.len(),
            )
        };
    }
}

/// The peer's region, mapped read-only. The peer writes it; we only read.
#[derive(Debug)]
pub(crate) struct InRegion {
    region: Region,
}

impl InRegion {
    /// Maps the peer's region read-only. The caller has validated the file
    /// (regular, size equal to `geometry.region_size`) and the geometry.
    pub(crate) fn map(fd: &OwnedFd, geometry: Geometry) -> io::Result<InRegion> {
        let len = usize::try_from(geometry.region_size)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let map = Mapping::map(fd.as_fd(), len, false)?;
        Ok(InRegion {
            region: Region::new(map, geometry),
        })
    }

    pub(crate) fn region(&self) -> &Region {
        &self.region
    }

    /// The bytes of a segment in place, or `None` when it lies outside the
    /// data area.
    ///
    /// The slice aliases memory the peer can write. The protocol forbids the
    /// peer to write a message between publishing it and our release, and the
    /// slice lives only as long as the received message that holds it. A peer
    /// that breaks this rule is outside what zero-copy reading can defend
    /// against: capnp reads some words twice (check, then use), so bytes
    /// changing underneath can make it read wrong values or crash the reader.
    /// `Options::copy_received` (see [`copy_segment`](Self::copy_segment))
    /// exists for peers not trusted with this.
    pub(crate) fn segment(&self, extent: Extent) -> Option<&[u8]> {
        if !self.region.contains(extent) {
            return None;
        }
        // The extent lies inside the data area, inside our read-only mapping,
        // which lives as long as `self`; the protocol excludes concurrent
        // writes by the peer (see above).
        // SAFETY: in bounds, alive as long as the borrow; any bytes are valid u8.
        Some(unsafe {
            std::slice::from_raw_parts(self.region.data_ptr(extent.start), extent.len as usize * 8)
        })
    }

    /// Copies a segment into `dst` (exactly `extent.len` words long) with
    /// volatile word reads: the peer may be rewriting the words meanwhile,
    /// and the copy then holds some mix of old and new words, never anything
    /// worse. Returns `false` when the extent lies outside the data area.
    pub(crate) fn copy_segment(&self, extent: Extent, dst: &mut [u8]) -> bool {
        if !self.region.contains(extent) || dst.len() != extent.len as usize * 8 {
            return false;
        }
        let src = self.region.data_ptr(extent.start).cast::<u64>();
        for (i, out) in dst.chunks_exact_mut(8).enumerate() {
            // SAFETY: `i < extent.len`, so the word lies inside the extent,
            // inside the mapping.
            let at = unsafe { src.add(i) };
            // SAFETY: an aligned u64 inside our mapping; a volatile read is
            // valid whatever the peer is writing there.
            let word = unsafe { at.read_volatile() };
            out.copy_from_slice(&word.to_ne_bytes());
        }
        true
    }

    /// Reads word `offset` of the data area (for out-of-line segment tables).
    pub(crate) fn read_word(&self, offset: u32) -> Option<u64> {
        if !self.region.contains(Extent {
            start: offset,
            len: 1,
        }) {
            return None;
        }
        // SAFETY: the word lies inside the mapping and is 8-byte aligned; a
        // volatile read of a u64 is valid whatever the peer is writing there.
        Some(unsafe { std::ptr::read_volatile(self.region.data_ptr(offset).cast::<u64>()) })
    }
}
