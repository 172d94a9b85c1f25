//! Regions: this end's outgoing region (created here, mapped read-write)
//! and the peer's (mapped read-only), as typed views.
//!
//! This file turns raw mapped addresses into references. Every view is
//! checked against the region's validated [`Geometry`], and every shared
//! field is a [`Word`], so a reference stays sound whatever the other
//! process does to the bytes. Who may write is in the type:
//! [`OwnRegion`] hands out [`Mine`] words (loads and stores) and writes its
//! data area behind `unsafe fn`s whose callers own the words they touch;
//! [`PeerRegion`] hands out [`Theirs`] words (`Relaxed` loads only) and
//! reads its data area, so a store into the peer's mapping does not
//! compile. The data area is the one place with plain bytes: message
//! payloads, which capnp reads (see [`PeerRegion::segment`]).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::layout::{
    ControlBlock, DescriptorEntry, Geometry, ReleaseEntry, CARRIED_WORDS, FLAG_SEALED, MAGIC,
    VERSION, WORD, WORD_BYTES,
};
use crate::options::Backing;
use crate::sys::errno as libc_errno;
use crate::sys::file;
use crate::sys::mapping::Mapping;
use crate::word::{Mine, MinePairs, TheirPairs, Theirs, Word};

/// A run of words in a data area: `start..start + len` (by default empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Extent {
    pub(crate) start: u32,
    pub(crate) len: u32,
}

impl Extent {
    /// One past the last word. Extents of a free list or a validated table
    /// lie inside a data area of at most 2^31 words, so this cannot overflow.
    pub(crate) fn end(self) -> u32 {
        debug_assert!(self.start.checked_add(self.len).is_some());
        self.start.wrapping_add(self.len)
    }
}

/// A run of words in one of an end's data areas: area 0 is the region's,
/// the others the areas added to it (see `layout.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) area: u32,
    pub(crate) extent: Extent,
}

/// The words of one descriptor ring entry, as views of one kind (`V`
/// for the words, `C` for the carried pairs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DescriptorWords<V, C> {
    pub(crate) tag: V,
    pub(crate) slot_count: V,
    pub(crate) offset: V,
    pub(crate) len: V,
    pub(crate) carried: C,
}

/// The words of one release ring entry, as views of one kind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReleaseWords<V> {
    pub(crate) slot: V,
    pub(crate) seq: V,
}

/// What keeps a region's memory where its pointers say: held only for its
/// `Drop` (the unmap, or the last reference to the model's memory).
#[derive(Debug)]
#[allow(dead_code)]
enum Memory {
    /// A shared mapping of the region's file (the crate).
    Mapped(Mapping),
    /// Heap memory built by the model checker.
    #[cfg(test)]
    Model(std::sync::Arc<dyn std::any::Any + Send + Sync>),
}

/// Where the parts of one region lie, and the memory that holds them.
///
/// Invariant: every pointer points into `memory`, which does not move or
/// unmap while `self` lives: `control` to one `ControlBlock<W>`,
/// `descriptors` to `geometry.ring_capacity` entries, `releases` to
/// `geometry.held_capacity`, `area` to `geometry.data_words()` words. All of
/// it but the data area is `W` words and plain integers, valid for any bits.
#[derive(Debug)]
struct Parts<W: Word> {
    control: NonNull<ControlBlock<W>>,
    descriptors: NonNull<DescriptorEntry<W>>,
    releases: NonNull<ReleaseEntry<W>>,
    area: Area,
    geometry: Geometry,
    /// Held for its `Drop` (the unmap), after every use of the pointers.
    _memory: Memory,
}

// SAFETY: the pointers refer to `memory`, which moves with the value (a
// mapping's address and a heap allocation's do not change when their owner
// moves). Through a shared reference, the shared fields are reached only as
// `W: Sync` atomics; the data area only through the `unsafe fn`s of
// `OwnRegion` (whose callers own the words) and by reading `PeerRegion`
// bytes that this process never writes.
unsafe impl<W: Word> Send for Parts<W> {}
// SAFETY: as for `Send`.
unsafe impl<W: Word> Sync for Parts<W> {}

impl Parts<AtomicU32> {
    /// The parts of a region mapped at `map`, for a geometry validated
    /// against the mapping's length.
    fn mapped(map: Mapping, geometry: Geometry) -> Parts<AtomicU32> {
        debug_assert_eq!(Ok(geometry), geometry.validate());
        debug_assert_eq!(u64::try_from(map.len()).ok(), Some(geometry.region_size));
        let at = |offset: u64| {
            let offset = usize::try_from(offset).unwrap_or(usize::MAX);
            assert!(offset < map.len(), "geometry larger than its mapping");
            // SAFETY: `offset < len`: inside the mapping.
            let ptr = unsafe { map.as_ptr().add(offset) };
            NonNull::new(ptr).unwrap_or(NonNull::dangling())
        };
        // Offsets from a validated geometry: the control block at 0, the
        // rings after it, the data area (page aligned) last, all inside.
        Parts {
            control: at(0).cast(),
            descriptors: at(geometry.descriptors_offset()).cast(),
            releases: at(geometry.releases_offset()).cast(),
            area: Area {
                data: at(geometry.data_offset()),
                words: geometry.data_words(),
            },
            geometry,
            _memory: Memory::Mapped(map),
        }
    }
}

impl<W: Word> Parts<W> {
    fn control(&self) -> &ControlBlock<W> {
        // SAFETY: see the invariant on `Parts`: a live, aligned control
        // block of atomics (any bits valid, shared access allowed), borrowed
        // no longer than `self`, which keeps the memory.
        unsafe { self.control.as_ref() }
    }

    fn descriptor(&self, seq: u32) -> &DescriptorEntry<W> {
        let index = self.geometry.ring_index(seq) as usize;
        // SAFETY: `index < ring_capacity` (ring_index masks with capacity - 1),
        // so the entry lies inside the descriptor ring.
        let entry = unsafe { self.descriptors.add(index) };
        // SAFETY: a live, aligned entry of atomics; see `control`.
        unsafe { entry.as_ref() }
    }

    fn release_entry(&self, n: u32) -> &ReleaseEntry<W> {
        let index = self.geometry.release_index(n) as usize;
        // SAFETY: `index < held_capacity` (release_index masks with
        // capacity - 1), so the entry lies inside the release ring.
        let entry = unsafe { self.releases.add(index) };
        // SAFETY: a live, aligned entry of atomics; see `control`.
        unsafe { entry.as_ref() }
    }
}

/// Where one data area lies: `words` words from `data`, 8-byte aligned.
///
/// Invariant: the memory stays mapped while the holder of the `Area` lives
/// (a region's [`Parts`], an [`OwnArea`], a [`PeerArea`]), so the methods
/// below may form pointers into it; who may write which words, and for how
/// long a slice of it stays valid, are the duties of their `unsafe fn`s.
#[derive(Debug, Clone, Copy)]
struct Area {
    data: NonNull<u8>,
    words: u32,
}

impl Area {
    /// Whether `extent` lies inside the area.
    fn contains(self, extent: Extent) -> bool {
        u64::from(extent.start) + u64::from(extent.len) <= u64::from(self.words)
    }

    /// The address of word `offset`, for an `offset` at most the area's
    /// length.
    fn ptr(self, offset: u32) -> *mut u8 {
        assert!(offset <= self.words, "outside the data area");
        // SAFETY: at most one past the end of the area (asserted).
        unsafe { self.data.as_ptr().add(offset as usize * WORD_BYTES) }
    }

    /// The word offset of `ptr`, when it is a word-aligned address inside.
    fn offset_of(self, ptr: *const u8) -> Option<u32> {
        let base = self.data.as_ptr() as usize;
        let byte = u64::try_from((ptr as usize).checked_sub(base)?).ok()?;
        let word = u32::try_from(byte / WORD).ok()?;
        (byte % WORD == 0 && word < self.words).then_some(word)
    }

    /// Whether `ptr` is the address of word `offset`: as
    /// `offset_of(ptr) == Some(offset)` for an offset inside, in a compare.
    fn is_at(self, ptr: *const u8, offset: u32) -> bool {
        let base = self.data.as_ptr() as usize;
        ptr as usize == base.wrapping_add(offset as usize * WORD_BYTES)
    }

    /// The address of the first word of `extent` (inside: checked).
    fn extent_ptr(self, extent: Extent) -> NonNull<u8> {
        assert!(self.contains(extent), "extent outside the data area");
        NonNull::new(self.ptr(extent.start)).unwrap_or(NonNull::dangling())
    }

    /// Zeroes `extent` (inside: checked).
    ///
    /// # Safety
    ///
    /// The area is writable here, no reference into `extent` is alive, and
    /// nobody else writes it meanwhile.
    unsafe fn zero(self, extent: Extent) {
        assert!(self.contains(extent), "zeroing outside the data area");
        let dst = self.ptr(extent.start);
        // SAFETY: inside the area (asserted), writable and unaliased (the
        // caller's duties); bytes have no invalid values.
        unsafe { std::ptr::write_bytes(dst, 0, extent.len as usize * WORD_BYTES) };
    }

    /// Copies `bytes` (at most `extent.len` words, checked) to the start of
    /// `extent` (inside: checked).
    ///
    /// # Safety
    ///
    /// As for [`zero`](Self::zero); `bytes` does not overlap `extent`.
    unsafe fn write(self, extent: Extent, bytes: &[u8]) {
        assert!(
            self.contains(extent) && bytes.len() <= extent.len as usize * WORD_BYTES,
            "write outside its extent"
        );
        let dst = self.ptr(extent.start);
        // SAFETY: the destination lies inside `extent` (asserted), writable
        // and unaliased, and `bytes` lies elsewhere (the caller's duties).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
    }

    /// The bytes of `extent` in place, or `None` outside the area.
    ///
    /// # Safety
    ///
    /// The area stays mapped for `'a`.
    unsafe fn slice<'a>(self, extent: Extent) -> Option<&'a [u8]> {
        if !self.contains(extent) {
            return None;
        }
        let ptr = self.ptr(extent.start);
        // SAFETY: inside the area, mapped for 'a (the caller's duty), any
        // bytes valid; this process never writes a peer's area (see
        // `PeerRegion::segment` for what the peer may do).
        Some(unsafe { std::slice::from_raw_parts(ptr, extent.len as usize * WORD_BYTES) })
    }

    /// A `Relaxed` atomic load of word `offset`, which lies inside.
    fn load_word(self, offset: u32) -> u64 {
        debug_assert!(offset < self.words);
        let ptr = self.ptr(offset).cast::<u64>();
        // SAFETY: an aligned word inside the area, mapped while its holder
        // lives (the invariant); a Relaxed 8-byte atomic load is allowed on
        // read-only memory.
        let word = unsafe { AtomicU64::from_ptr(ptr) };
        word.load(Ordering::Relaxed)
    }

    /// Word `offset` (a `Relaxed` load), or `None` outside the area.
    fn read_word(self, offset: u32) -> Option<u64> {
        let inside = self.contains(Extent {
            start: offset,
            len: 1,
        });
        inside.then(|| self.load_word(offset))
    }

    /// Copies `extent` into `dst` (exactly as long) with `Relaxed` loads;
    /// `false` outside the area or for a wrong length.
    fn copy_segment(self, extent: Extent, dst: &mut [u8]) -> bool {
        if !self.contains(extent) || dst.len() != extent.len as usize * WORD_BYTES {
            return false;
        }
        for (i, out) in (extent.start..extent.end()).zip(dst.chunks_exact_mut(WORD_BYTES)) {
            out.copy_from_slice(&self.load_word(i).to_ne_bytes());
        }
        true
    }
}

/// Makes the accessors of the control block's counters, returning `$view`.
macro_rules! counters {
    ($view:ident: $($name:ident),*) => {$(
        #[doc = concat!("The control block's `", stringify!($name), "` word.")]
        #[inline]
        pub(crate) fn $name(&self) -> $view<'_, W> {
            $view::new(&self.parts.control().$name.0)
        }
    )*};
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

/// Read-only zero pages mapped after the peer's region: 1 MiB, the furthest
/// a struct can reach from a start inside the region (a data section and a
/// pointer section of at most 2^16 - 1 words each). capnp reads a struct
/// pointer's sizes more than once; if a peer rewrites them in between, the
/// slices capnp makes may run past the checked segment, and past the
/// region's end they find these zeros instead of whatever mapping follows.
pub(crate) const GUARD_BYTES: usize = 1 << 20;

/// This end's outgoing region. Only this end's owner process writes it.
#[derive(Debug)]
pub(crate) struct OwnRegion<W: Word = AtomicU32> {
    parts: Parts<W>,
    sealed: bool,
    /// The file's (device, inode), to recognise it if a peer sends it back.
    file_id: (u64, u64),
}

impl OwnRegion<AtomicU32> {
    /// Creates the outgoing region: the file, its size, a read-write mapping,
    /// then the seals (after the mapping, so we keep writing while nobody else
    /// ever can), and finally the header. Returns the region and a read-only
    /// descriptor for the peer. `geometry` is validated.
    pub(crate) fn create(geometry: Geometry, backing: Backing) -> io::Result<(OwnRegion, OwnedFd)> {
        debug_assert_eq!(Ok(geometry), geometry.validate());
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
        let header = &region.parts.control().header.0;
        header.magic.store(MAGIC, Ordering::Relaxed);
        header.version.store(VERSION, Ordering::Relaxed);
        let flags = if region.sealed { FLAG_SEALED } else { 0 };
        header.flags.store(flags, Ordering::Relaxed);
        header
            .region_size
            .store(geometry.region_size, Ordering::Relaxed);
        header
            .ring_capacity
            .store(geometry.ring_capacity, Ordering::Relaxed);
        header
            .held_capacity
            .store(geometry.held_capacity, Ordering::Relaxed);
        // The peer reads the header only after receiving our hello over the
        // socket; the sendmsg system call orders these stores before it.
        Ok((region, peer_fd))
    }

    fn create_memfd(geometry: Geometry) -> io::Result<(OwnRegion, OwnedFd)> {
        let fd = file::memfd_create(c"capnp-shm")?;
        file::ftruncate(fd.as_fd(), geometry.region_size)?;
        let map = Mapping::map(fd.as_fd(), region_len(geometry)?, true)?;
        file::add_seals(fd.as_fd(), file::REGION_SEALS)?;
        // A read-only description for the peer where /proc allows one. The
        // seals are what protect the region (a peer could reopen its
        // descriptor read-write through its own /proc, and the seals still
        // refuse every write, resize and writable mapping), so without /proc
        // the peer gets our descriptor instead of losing the sealed region.
        let peer_fd = file::reopen_read_only(fd.as_fd()).unwrap_or(fd);
        // Our descriptor (if not sent) closes here; the mapping keeps the
        // file alive.
        let parts = Parts::mapped(map, geometry);
        let file_id = file::fstat(peer_fd.as_fd())?.id;
        Ok((
            OwnRegion {
                parts,
                sealed: true,
                file_id,
            },
            peer_fd,
        ))
    }

    fn create_shm_file(geometry: Geometry) -> io::Result<(OwnRegion, OwnedFd)> {
        let (rw, ro) = file::create_shm_file(geometry.region_size)?;
        let map = Mapping::map(rw.as_fd(), region_len(geometry)?, true)?;
        let parts = Parts::mapped(map, geometry);
        let file_id = file::fstat(ro.as_fd())?.id;
        Ok((
            OwnRegion {
                parts,
                sealed: false,
                file_id,
            },
            ro,
        ))
    }
}

fn region_len(geometry: Geometry) -> io::Result<usize> {
    usize::try_from(geometry.region_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl<W: Word> OwnRegion<W> {
    counters!(Mine: published, consumed, released, rx_sleeping, tx_sleeping, closed, owner);

    /// Whether the region is a sealed memfd.
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// The region file's (device, inode).
    pub(crate) fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.parts.geometry
    }

    /// The descriptor ring entry for sequence number `seq`.
    pub(crate) fn descriptor(
        &self,
        seq: u32,
    ) -> DescriptorWords<Mine<'_, W>, MinePairs<'_, W::Pair, CARRIED_WORDS>> {
        let e = self.parts.descriptor(seq);
        DescriptorWords {
            tag: Mine::new(&e.tag),
            slot_count: Mine::new(&e.slot_count),
            offset: Mine::new(&e.offset),
            len: Mine::new(&e.len),
            carried: MinePairs::new(&e.carried),
        }
    }

    /// The release ring entry for release number `n`.
    pub(crate) fn release_entry(&self, n: u32) -> ReleaseWords<Mine<'_, W>> {
        let e = self.parts.release_entry(n);
        ReleaseWords {
            slot: Mine::new(&e.slot),
            seq: Mine::new(&e.seq),
        }
    }

    /// The word offset of `ptr` in the data area, when `ptr` is a word-aligned
    /// address inside it.
    pub(crate) fn offset_of(&self, ptr: *const u8) -> Option<u32> {
        self.parts.area.offset_of(ptr)
    }

    /// Whether `ptr` is the address of word `offset` of the data area,
    /// which lies inside it.
    pub(crate) fn is_at(&self, ptr: *const u8, offset: u32) -> bool {
        self.parts.area.is_at(ptr, offset)
    }

    /// The address of the first word of `extent`, for handing to capnp.
    /// `extent` lies inside the data area (checked).
    pub(crate) fn extent_ptr(&self, extent: Extent) -> NonNull<u8> {
        self.parts.area.extent_ptr(extent)
    }

    /// Zeroes the words of `extent`, which must lie inside the data area
    /// (checked).
    ///
    /// # Safety
    ///
    /// - No reference into `extent` is alive, and nobody else writes it
    ///   meanwhile: its words are free, or belong to a message the peer has
    ///   released, in this end's books.
    /// - This process owns the end (a forked copy must not write words its
    ///   parent uses).
    pub(crate) unsafe fn zero(&self, extent: Extent) {
        // SAFETY: our own data area, mapped writable; the rest is the
        // caller's duty, passed on.
        unsafe { self.parts.area.zero(extent) }
    }

    /// Copies `bytes` (at most `extent.len` words, checked) to the start of
    /// `extent`, which must lie inside the data area (checked).
    ///
    /// # Safety
    ///
    /// As for [`zero`](Self::zero): the caller owns the words of `extent`,
    /// and `bytes` lies elsewhere.
    pub(crate) unsafe fn write(&self, extent: Extent, bytes: &[u8]) {
        // SAFETY: as for `zero`.
        unsafe { self.parts.area.write(extent, bytes) }
    }

    /// Bytes in the data area.
    pub(crate) fn data_bytes(&self) -> u64 {
        u64::from(self.parts.area.words) * WORD
    }
}

/// The peer's region, mapped read-only. The peer writes it; we only read.
#[derive(Debug)]
pub(crate) struct PeerRegion<W: Word = AtomicU32> {
    parts: Parts<W>,
}

impl PeerRegion<AtomicU32> {
    /// Maps the peer's region read-only. The caller has validated the file
    /// (regular, size equal to `geometry.region_size`) and the geometry.
    ///
    /// # Errors
    ///
    /// What `mmap` reports: for a file the peer chose, the peer's mistake.
    pub(crate) fn map(fd: &OwnedFd, geometry: Geometry) -> io::Result<PeerRegion> {
        let map = Mapping::map_with_guard(fd.as_fd(), region_len(geometry)?, GUARD_BYTES)?;
        Ok(PeerRegion {
            parts: Parts::mapped(map, geometry),
        })
    }

    /// The address range of the mapping.
    pub(crate) fn address_range(&self) -> std::ops::Range<usize> {
        let base = self.parts.control.as_ptr() as usize;
        let len = usize::try_from(self.parts.geometry.region_size).unwrap_or(0);
        base..base + len
    }
}

impl<W: Word> PeerRegion<W> {
    counters!(Theirs: published, consumed, released, rx_sleeping, tx_sleeping, closed);

    /// Words in the data area (area 0).
    #[inline]
    pub(crate) fn data_words(&self) -> u32 {
        self.parts.area.words
    }

    /// The header, as the peer wrote it, for the handshake's checks.
    pub(crate) fn header(&self) -> &crate::layout::Header {
        &self.parts.control().header.0
    }

    pub(crate) fn geometry(&self) -> Geometry {
        self.parts.geometry
    }

    /// The peer's descriptor ring entry for sequence number `seq`.
    pub(crate) fn descriptor(
        &self,
        seq: u32,
    ) -> DescriptorWords<Theirs<'_, W>, TheirPairs<'_, W::Pair, CARRIED_WORDS>> {
        let e = self.parts.descriptor(seq);
        DescriptorWords {
            tag: Theirs::new(&e.tag),
            slot_count: Theirs::new(&e.slot_count),
            offset: Theirs::new(&e.offset),
            len: Theirs::new(&e.len),
            carried: TheirPairs::new(&e.carried),
        }
    }

    /// The peer's release ring entry for release number `n`.
    pub(crate) fn release_entry(&self, n: u32) -> ReleaseWords<Theirs<'_, W>> {
        let e = self.parts.release_entry(n);
        ReleaseWords {
            slot: Theirs::new(&e.slot),
            seq: Theirs::new(&e.seq),
        }
    }

    /// The bytes of a segment in place, or `None` when it lies outside the
    /// data area.
    ///
    /// The slice aliases memory the peer can write. The protocol forbids the
    /// peer to write a message between publishing it and our release, and the
    /// slice lives only as long as the received message that holds it. A peer
    /// that breaks this rule is outside what zero-copy reading can defend
    /// against: capnp reads some words twice (check, then use), so bytes
    /// changing underneath can make it read wrong values. `Options::copy_received`
    /// (see [`copy_segment`](Self::copy_segment)) exists for peers not
    /// trusted with this.
    pub(crate) fn segment(&self, extent: Extent) -> Option<&[u8]> {
        // SAFETY: the data area stays mapped as long as `self`.
        unsafe { self.parts.area.slice(extent) }
    }

    /// Copies a segment into `dst` (exactly `extent.len` words long) with
    /// `Relaxed` atomic loads, word by word: the peer may be rewriting the
    /// words meanwhile, and the copy then holds some mix of old and new
    /// words, never anything worse. Returns `false` when the extent lies
    /// outside the data area or `dst` has the wrong length.
    pub(crate) fn copy_segment(&self, extent: Extent, dst: &mut [u8]) -> bool {
        self.parts.area.copy_segment(extent, dst)
    }

    /// Reads word `offset` of the data area (for out-of-line segment
    /// tables), or `None` outside it.
    pub(crate) fn read_word(&self, offset: u32) -> Option<u64> {
        self.parts.area.read_word(offset)
    }
}

// ---- areas ----------------------------------------------------------------------

/// An area this end added to its outgoing space: a file of plain data
/// (sealed like the region, or not when the region is not), mapped
/// read-write. Only this end's owner process writes it.
#[derive(Debug)]
pub(crate) struct OwnArea {
    area: Area,
    /// Held for its `Drop` (the unmap), after every use of `area`.
    _map: Mapping,
    bytes: u64,
    /// The file's (device, inode), to recognise it if a peer sends it back.
    file_id: (u64, u64),
}

impl OwnArea {
    /// Creates an area of `bytes` (a multiple of [`DATA_ALIGN`](crate::layout::DATA_ALIGN), at most
    /// [`MAX_REGION`](crate::layout::MAX_REGION)): a sealed memfd when `sealed`, else a `/dev/shm` file
    /// as the unsealed region is. Returns it and a read-only descriptor for
    /// the peer.
    pub(crate) fn create(bytes: u64, sealed: bool) -> io::Result<(OwnArea, OwnedFd)> {
        let len =
            usize::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let words = u32::try_from(bytes / WORD)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (map, peer_fd) = if sealed {
            let fd = file::memfd_create(c"capnp-shm-area")?;
            file::ftruncate(fd.as_fd(), bytes)?;
            let map = Mapping::map(fd.as_fd(), len, true)?;
            file::add_seals(fd.as_fd(), file::REGION_SEALS)?;
            (map, file::reopen_read_only(fd.as_fd()).unwrap_or(fd))
        } else {
            let (rw, ro) = file::create_shm_file(bytes)?;
            (Mapping::map(rw.as_fd(), len, true)?, ro)
        };
        let file_id = file::fstat(peer_fd.as_fd())?.id;
        let data = NonNull::new(map.as_ptr()).unwrap_or(NonNull::dangling());
        Ok((
            OwnArea {
                area: Area { data, words },
                _map: map,
                bytes,
                file_id,
            },
            peer_fd,
        ))
    }

    /// Bytes in the area.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The area file's (device, inode).
    pub(crate) fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Words in the area.
    pub(crate) fn words(&self) -> u32 {
        self.area.words
    }

    /// As [`OwnRegion::offset_of`].
    pub(crate) fn offset_of(&self, ptr: *const u8) -> Option<u32> {
        self.area.offset_of(ptr)
    }

    /// As [`OwnRegion::extent_ptr`].
    pub(crate) fn extent_ptr(&self, extent: Extent) -> NonNull<u8> {
        self.area.extent_ptr(extent)
    }

    /// As [`OwnRegion::zero`].
    ///
    /// # Safety
    ///
    /// As for [`OwnRegion::zero`].
    pub(crate) unsafe fn zero(&self, extent: Extent) {
        // SAFETY: our own area, mapped writable; the rest is the caller's
        // duty, passed on.
        unsafe { self.area.zero(extent) }
    }

    /// As [`OwnRegion::write`].
    ///
    /// # Safety
    ///
    /// As for [`OwnRegion::write`].
    pub(crate) unsafe fn write(&self, extent: Extent, bytes: &[u8]) {
        // SAFETY: as for `zero`.
        unsafe { self.area.write(extent, bytes) }
    }
}

/// An area the peer added to its outgoing space, mapped read-only with the
/// same guard zone as its region. Shared (`Arc`) by the end's table of the
/// peer's areas and by every received message that lies in it, so that the
/// mapping outlives both: the peer retiring an area unmaps nothing a
/// message still reads.
#[derive(Debug)]
pub(crate) struct PeerArea {
    area: Area,
    /// Held for its `Drop` (the unmap), after every use of `area`.
    _map: Mapping,
    bytes: u64,
}

impl PeerArea {
    /// Maps `bytes` of the peer's area file read-only. The caller has
    /// checked the file (regular, exactly `bytes` long, sealed as the
    /// region is).
    ///
    /// # Errors
    ///
    /// What `mmap` reports, and `InvalidInput` for a size that does not fit
    /// the format (the caller checked it).
    pub(crate) fn map(fd: &OwnedFd, bytes: u64) -> io::Result<PeerArea> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        let len = usize::try_from(bytes).map_err(|_| invalid())?;
        let words = u32::try_from(bytes / WORD).map_err(|_| invalid())?;
        let map = Mapping::map_with_guard(fd.as_fd(), len, GUARD_BYTES)?;
        let data = NonNull::new(map.as_ptr()).unwrap_or(NonNull::dangling());
        Ok(PeerArea {
            area: Area { data, words },
            _map: map,
            bytes,
        })
    }

    /// Bytes in the area.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Words in the area.
    pub(crate) fn words(&self) -> u32 {
        self.area.words
    }

    /// As [`PeerRegion::segment`].
    pub(crate) fn segment(&self, extent: Extent) -> Option<&[u8]> {
        // SAFETY: the area stays mapped as long as `self`.
        unsafe { self.area.slice(extent) }
    }

    /// As [`PeerRegion::copy_segment`].
    pub(crate) fn copy_segment(&self, extent: Extent, dst: &mut [u8]) -> bool {
        self.area.copy_segment(extent, dst)
    }

    /// As [`PeerRegion::read_word`].
    pub(crate) fn read_word(&self, offset: u32) -> Option<u64> {
        self.area.read_word(offset)
    }
}

// SAFETY: as for `Parts`: the pointer refers to the mapping, which moves
// with the value; a shared `OwnArea` writes only through its `unsafe fn`s,
// whose callers own the words.
unsafe impl Send for OwnArea {}
// SAFETY: as for `Send`.
unsafe impl Sync for OwnArea {}
// SAFETY: as for `Parts`: a shared `PeerArea` only reads (atomically, or
// bytes this process never writes).
unsafe impl Send for PeerArea {}
// SAFETY: as for `Send`.
unsafe impl Sync for PeerArea {}

/// Regions in heap memory, for the model checker: the same views over
/// words of any [`Word`] type.
#[cfg(test)]
pub(crate) mod model {
    use super::*;
    use std::cell::UnsafeCell;
    use std::sync::Arc;

    /// The memory of one model region.
    pub(crate) struct Memory<W: Word> {
        pub(crate) control: Box<ControlBlock<W>>,
        pub(crate) descriptors: Box<[DescriptorEntry<W>]>,
        pub(crate) releases: Box<[ReleaseEntry<W>]>,
        pub(crate) data: Box<[UnsafeCell<u64>]>,
    }

    // SAFETY: the words (and pairs) are `Sync`; the data area is written only by its
    // owner end under the same rules as a mapped data area (see `Parts`).
    unsafe impl<W: Word> Sync for Memory<W> {}
    // SAFETY: owned heap memory.
    unsafe impl<W: Word> Send for Memory<W> {}

    fn parts<W: Word>(memory: &Arc<Memory<W>>, geometry: Geometry) -> Parts<W> {
        assert!(memory.descriptors.len() == geometry.ring_capacity as usize);
        assert!(memory.releases.len() == geometry.held_capacity as usize);
        assert!(memory.data.len() == geometry.data_words() as usize);
        let keep: Arc<dyn std::any::Any + Send + Sync> = memory.clone();
        Parts {
            control: NonNull::from(&*memory.control),
            descriptors: NonNull::new(memory.descriptors.as_ptr().cast_mut())
                .expect("a boxed slice is not null"),
            releases: NonNull::new(memory.releases.as_ptr().cast_mut())
                .expect("a boxed slice is not null"),
            // UnsafeCell<u64> is transparent: the slice's cells, as bytes,
            // writable through the shared reference.
            area: super::Area {
                data: NonNull::new(UnsafeCell::raw_get(memory.data.as_ptr()).cast::<u8>())
                    .expect("a boxed slice is not null"),
                words: geometry.data_words(),
            },
            geometry,
            _memory: super::Memory::Model(keep),
        }
    }

    /// The owner's view and the peer's view of one model region.
    pub(crate) fn views<W: Word>(
        memory: &Arc<Memory<W>>,
        geometry: Geometry,
    ) -> (OwnRegion<W>, PeerRegion<W>) {
        (
            OwnRegion {
                parts: parts(memory, geometry),
                sealed: true,
                file_id: (0, 0),
            },
            PeerRegion {
                parts: parts(memory, geometry),
            },
        )
    }
}
