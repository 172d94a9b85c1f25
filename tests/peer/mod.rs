//! A hand-driven peer: the other end of a channel, written out by hand from
//! the documented wire format instead of through the crate.
//!
//! The crate's own two ends never send a wrong hello, a wrong file or a wrong
//! counter, so they cannot show that the real end rejects them. This peer can:
//! every byte it sends and every word it writes into its region is chosen by
//! the test. The real end (`Channel::from_stream_with`) runs its set-up on a
//! helper thread, because set-up blocks until our hello arrives; once it is
//! done the test drives both ends from its own thread.
//!
//! The format constants are copied from the format descriptions at the top of
//! `src/handshake.rs` and `src/layout.rs` on purpose, not imported: a change
//! to the wire format that forgets to bump the version breaks these tests.
//!
//! Every order here is `SeqCst`: a test peer has no speed to win, and the
//! strongest order keeps the reasoning trivial.

#![allow(unsafe_code)]
// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use capnp_shm::{Channel, Options, SetupError};

// ---- the wire format -------------------------------------------------------

/// `"CAPNPSHM"` as a little-endian `u64`: the first field of hello and header.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CAPNPSHM");
/// The format version this peer speaks.
pub const VERSION: u32 = 7;
/// The verdict on a peer's region that says "mapped": shared memory.
pub const MAPPED: [u8; 8] = *b"CSHM-MAP";
/// The verdict that says "cannot map": both ends use the stream.
pub const REFUSED: [u8; 8] = *b"CSHM-NOM";
/// Hello and header flag: the region is a sealed memfd.
pub const FLAG_SEALED: u32 = 1;
/// Bytes in a hello.
pub const HELLO_LEN: usize = 64;
/// Bytes of the control block at the start of a region.
pub const CONTROL_BYTES: u64 = 1024;
/// Bytes of one descriptor ring entry.
pub const DESCRIPTOR_BYTES: u64 = 128;
/// The offset that says a descriptor carries its one segment in the entry,
/// from byte 16 on.
pub const CARRIED_OFFSET: u32 = u32::MAX;
/// The most words an entry carries.
pub const CARRIED_WORDS: u32 = 14;
/// Bytes of one release ring entry.
pub const RELEASE_BYTES: u64 = 8;
/// Alignment of the data area and granularity of region sizes.
pub const DATA_ALIGN: u64 = 4096;
/// Segments a descriptor holds inline; more go to an out-of-line table.
pub const INLINE_SEGMENTS: usize = 1;
/// Bytes in a capnp word, the unit of data-area offsets and lengths.
pub const WORD: u64 = 8;

/// Byte offsets of the header fields at the start of the control block.
pub mod header {
    /// `u64`, [`MAGIC`](super::MAGIC).
    pub const MAGIC: u64 = 0;
    /// `u32`, [`VERSION`](super::VERSION).
    pub const VERSION: u64 = 8;
    /// `u32`, bit 0 [`FLAG_SEALED`](super::FLAG_SEALED).
    pub const FLAGS: u64 = 12;
    /// `u64`, total bytes of the region.
    pub const REGION_SIZE: u64 = 16;
    /// `u32`, entries in the descriptor ring.
    pub const RING_CAPACITY: u64 = 24;
    /// `u32`, entries in the release ring.
    pub const HELD_CAPACITY: u64 = 28;
}

/// Byte offsets of the control block counters (`u32`), each on its own
/// 128-byte line.
pub mod counter {
    /// Messages the owner has published.
    pub const PUBLISHED: u64 = 128;
    /// Peer messages the owner has taken.
    pub const CONSUMED: u64 = 256;
    /// Entries the owner has appended to its release ring.
    pub const RELEASED: u64 = 384;
    /// The owner sleeps on the peer's `published`.
    pub const RX_SLEEPING: u64 = 512;
    /// The owner sleeps on the peer's `released`.
    pub const TX_SLEEPING: u64 = 640;
    /// The owner has closed its end.
    pub const CLOSED: u64 = 768;
    /// The pid of the process that owns the end (0: nobody yet); only the
    /// owner's own copies read it.
    pub const OWNER: u64 = 896;
}

/// The seals a sealed region must carry, exactly.
pub const REGION_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;

/// The shape of a region, as a hello announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Total bytes.
    pub region_size: u64,
    /// Entries in the descriptor ring.
    pub ring_capacity: u32,
    /// Entries in the release ring.
    pub held_capacity: u32,
}

impl Geometry {
    /// A geometry with rings of one capacity; nothing is checked (tests
    /// announce bad ones on purpose).
    pub const fn new(region_size: u64, ring_capacity: u32) -> Geometry {
        Geometry {
            region_size,
            ring_capacity,
            held_capacity: ring_capacity,
        }
    }

    /// Byte offset of the descriptor ring.
    pub fn descriptors_offset(self) -> u64 {
        CONTROL_BYTES
    }

    /// Byte offset of the release ring.
    pub fn releases_offset(self) -> u64 {
        CONTROL_BYTES + u64::from(self.ring_capacity) * DESCRIPTOR_BYTES
    }

    /// Byte offset of the data area.
    pub fn data_offset(self) -> u64 {
        (self.releases_offset() + u64::from(self.held_capacity) * RELEASE_BYTES)
            .next_multiple_of(DATA_ALIGN)
    }

    /// Words in the data area.
    pub fn data_words(self) -> u32 {
        let words = (self.region_size - self.data_offset()) / WORD;
        u32::try_from(words).expect("data area larger than u32 words")
    }

    /// The descriptor ring position of message number `n`.
    pub fn ring_index(self, n: u32) -> u32 {
        n & (self.ring_capacity - 1)
    }

    /// The release ring position of release number `n`.
    pub fn release_index(self, n: u32) -> u32 {
        n & (self.held_capacity - 1)
    }
}

// ---- the hello -------------------------------------------------------------

/// Every field of a hello, so that a test can set any of them to anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Bytes 0..8.
    pub magic: u64,
    /// Bytes 8..12.
    pub version: u32,
    /// Bytes 12..16.
    pub flags: u32,
    /// Bytes 16..24.
    pub region_size: u64,
    /// Bytes 24..28.
    pub ring_capacity: u32,
    /// Bytes 28..32.
    pub held_capacity: u32,
    /// Bytes 32..40: the most bytes of the real end's outgoing space we
    /// map (0: it may add no areas).
    pub accept_bytes: u64,
    /// Bytes 40..64, zero in a valid hello.
    pub reserved: [u8; 24],
}

impl Hello {
    /// The valid hello for a region of `geometry`.
    pub fn new(geometry: Geometry, sealed: bool) -> Hello {
        Hello {
            magic: MAGIC,
            version: VERSION,
            flags: if sealed { FLAG_SEALED } else { 0 },
            region_size: geometry.region_size,
            ring_capacity: geometry.ring_capacity,
            held_capacity: geometry.held_capacity,
            accept_bytes: 0,
            reserved: [0; 24],
        }
    }

    /// The 64 bytes on the wire, all integers little-endian.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.region_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.ring_capacity.to_le_bytes());
        b[28..32].copy_from_slice(&self.held_capacity.to_le_bytes());
        b[32..40].copy_from_slice(&self.accept_bytes.to_le_bytes());
        b[40..].copy_from_slice(&self.reserved);
        b
    }

    /// Parses the 64 bytes, checking nothing.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Hello {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Hello {
            magic: u64_at(0),
            version: u32_at(8),
            flags: u32_at(12),
            region_size: u64_at(16),
            ring_capacity: u32_at(24),
            held_capacity: u32_at(28),
            accept_bytes: u64_at(32),
            reserved: b[40..].try_into().expect("24 bytes"),
        }
    }

    /// The geometry it announces.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            region_size: self.region_size,
            ring_capacity: self.ring_capacity,
            held_capacity: self.held_capacity,
        }
    }
}

// ---- system calls ----------------------------------------------------------

/// Converts a `-1`-on-error return code into an `io::Result`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for calls returning `ssize_t`.
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Owns a descriptor a system call just returned.
fn owned(fd: libc::c_int) -> OwnedFd {
    assert!(fd >= 0, "not a descriptor: {fd}");
    // SAFETY: the caller got `fd` from a call that creates a new descriptor,
    // and hands it over here at once, so nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A new memory file. `memfd_create(2)`
pub fn memfd_create(flags: libc::c_uint) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the kernel checks `flags`.
    let fd = unsafe { libc::memfd_create(c"capnp-shm-hand-peer".as_ptr(), flags) };
    owned(cvt(fd).expect("memfd_create"))
}

/// Sets the size of a file. `ftruncate(2)`
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) {
    let len = libc::off_t::try_from(len).expect("file size fits off_t");
    // SAFETY: `fd` is a valid descriptor for the duration of the call.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).expect("ftruncate");
}

/// Adds seals to a memfd. `fcntl(2)`, `F_ADD_SEALS`
pub fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) {
    // SAFETY: `fd` is valid; F_ADD_SEALS takes an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).expect("F_ADD_SEALS");
}

/// A second, read-only open file description of the file behind `fd`, as the
/// crate hands its peer: through `/proc/self/fd`, never a writable descriptor.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> OwnedFd {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("no NUL in a path made of digits");
    // SAFETY: `path` is NUL-terminated; without O_CREAT no mode is read.
    let ro = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    owned(cvt(ro).expect("open /proc/self/fd"))
}

/// A second open file description of the file behind `fd`, opened with
/// `flags` (say `O_WRONLY`) through `/proc/self/fd`.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> OwnedFd {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("no NUL in a path made of digits");
    // SAFETY: `path` is NUL-terminated; without O_CREAT no mode is read.
    let new = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    owned(cvt(new).expect("open /proc/self/fd"))
}

/// A pipe: `(read end, write end)`. `pipe2(2)`
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).expect("pipe2");
    (owned(fds[0]), owned(fds[1]))
}

/// Whether every read end of the pipe behind `write_end` is closed. Used to
/// check that the real end closed a descriptor it rejected: the kernel flags
/// a pipe's write end with `POLLERR` once no reader is left. `poll(2)`
pub fn pipe_has_no_reader(write_end: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: write_end.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd; a zero timeout only checks.
    cvt(unsafe { libc::poll(&mut pfd, 1, 0) }).expect("poll");
    pfd.revents & libc::POLLERR != 0
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`; none when empty).
/// Returns the bytes sent. `sendmsg(2)`, `unix(7)`
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> usize {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let data_len = u32::try_from(size_of_val(raw.as_slice())).expect("a few descriptors");
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(data_len) };
    // A u64 buffer is aligned for cmsghdr.
    let mut control = vec![0u64; usize::try_from(space).expect("small").div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid, empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = usize::try_from(space).expect("small");
        // SAFETY: msg_control points to `space` bytes, room for one header.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        assert!(!cmsg.is_null(), "no room for the control header");
        // SAFETY: CMSG_LEN only computes a size.
        let cmsg_len = unsafe { libc::CMSG_LEN(data_len) };
        let header = libc::cmsghdr {
            cmsg_len: usize::try_from(cmsg_len).expect("small"),
            cmsg_level: libc::SOL_SOCKET,
            cmsg_type: libc::SCM_RIGHTS,
        };
        // SAFETY: `cmsg` points into `control`, aligned for cmsghdr, with room
        // for a header (CMSG_FIRSTHDR returned it).
        unsafe { cmsg.write(header) };
        // SAFETY: the header's data area lies inside `control` (CMSG_SPACE
        // counted room for `raw`).
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: `data` has room for `raw.len()` descriptors (see above), and
        // the source is a separate Vec; the destination may be unaligned.
        unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), data, raw.len() * 4) };
    }
    // SAFETY: `msg` and everything it points to live for the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    cvt_size(sent).expect("sendmsg")
}

/// Writes doorbell bytes on `sock` without waiting until the kernel takes
/// no more: a socket whose peer does not read is full. Returns the bytes
/// written. `send(2)`
pub fn fill_socket(sock: BorrowedFd<'_>) -> usize {
    let bytes = [0xDBu8; 4096];
    let mut total = 0;
    loop {
        // SAFETY: `bytes` is valid for reads of its length during the call.
        let sent = unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match cvt_size(sent) {
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// Receives bytes and any descriptors that come with them (blocking, up to the
/// socket's read timeout). `recvmsg(2)`
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Aligned for cmsghdr, room for a few descriptors.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid, empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` points to an iovec over `buf` and to `control`, both live
    // for the call.
    let len =
        cvt_size(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })?;
    assert_eq!(
        msg.msg_flags & libc::MSG_CTRUNC,
        0,
        "the real end sent too many descriptors"
    );
    let mut fds = Vec::new();
    // SAFETY: recvmsg filled `msg`; CMSG_FIRSTHDR reads only its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside
        // the control buffer the kernel filled.
        let header = unsafe { cmsg.read_unaligned() };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let data_offset = unsafe { libc::CMSG_LEN(0) };
            let count = (header.cmsg_len - usize::try_from(data_offset).expect("small")) / 4;
            // SAFETY: the data of this header lies inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                let at = data.wrapping_add(i);
                // SAFETY: `i < count`: the read stays inside this header's
                // data, which the kernel wrote; it may be unaligned.
                let raw = unsafe { at.read_unaligned() };
                fds.push(owned(raw));
            }
        }
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((len, fds))
}

// ---- mappings --------------------------------------------------------------

/// A `MAP_SHARED` mapping of a file, unmapped on drop. It hands out no
/// references: every access is a bounds-checked atomic load or store, or a
/// copy, so the other end writing the same memory is never a data race here.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0. `mmap(2)`
    pub fn map(fd: BorrowedFd<'_>, len: u64, writable: bool) -> Mapping {
        let len = usize::try_from(len).expect("mapping fits usize");
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing
        // overlaps no memory Rust knows about; `fd` is valid for the call.
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
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len,
            writable,
        }
    }

    /// The address of `size` bytes at `offset`, checked to lie inside the
    /// mapping and to be aligned to `align` (the base is page aligned).
    fn at(&self, offset: u64, size: usize, align: u64) -> *mut u8 {
        let end = offset.checked_add(size as u64).expect("offset overflows");
        assert!(
            end <= self.len as u64,
            "{offset}+{size} outside the mapping"
        );
        assert_eq!(offset % align, 0, "misaligned offset {offset}");
        self.ptr
            .as_ptr()
            .wrapping_add(usize::try_from(offset).expect("inside the mapping"))
    }

    /// The `u32` at byte `offset`, as an atomic.
    fn atomic_u32(&self, offset: u64) -> &AtomicU32 {
        let p = self.at(offset, 4, 4);
        // SAFETY: `at` checked that the 4 bytes lie inside the mapping (which
        // lives as long as `&self`) and are 4-aligned; any bits are a valid
        // AtomicU32, and atomics allow the other end's concurrent access. On a
        // read-only mapping callers only load (see `store_u32`), and atomic
        // loads of read-only memory are allowed.
        unsafe { &*p.cast::<AtomicU32>() }
    }

    /// The `u64` at byte `offset`, as an atomic.
    fn atomic_u64(&self, offset: u64) -> &AtomicU64 {
        let p = self.at(offset, 8, 8);
        // SAFETY: as in `atomic_u32`, for 8 bytes, 8-aligned.
        unsafe { &*p.cast::<AtomicU64>() }
    }

    /// Loads the `u32` at byte `offset`.
    pub fn load_u32(&self, offset: u64) -> u32 {
        self.atomic_u32(offset).load(Ordering::SeqCst)
    }

    /// Stores the `u32` at byte `offset`.
    pub fn store_u32(&self, offset: u64, value: u32) {
        assert!(self.writable, "store into a read-only mapping");
        self.atomic_u32(offset).store(value, Ordering::SeqCst);
    }

    /// Loads the `u64` at byte `offset`.
    pub fn load_u64(&self, offset: u64) -> u64 {
        self.atomic_u64(offset).load(Ordering::SeqCst)
    }

    /// Stores the `u64` at byte `offset`.
    pub fn store_u64(&self, offset: u64, value: u64) {
        assert!(self.writable, "store into a read-only mapping");
        self.atomic_u64(offset).store(value, Ordering::SeqCst);
    }

    /// Copies `bytes` to byte `offset`. The tests only write words the real
    /// end has not been told about yet, so nothing reads them meanwhile.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        assert!(self.writable, "write into a read-only mapping");
        let p = self.at(offset, bytes.len(), 1);
        // SAFETY: the destination lies inside our writable mapping (checked
        // above); `bytes` is private memory, so the two cannot overlap; no
        // reference into the destination exists (the mapping hands none out).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    /// Copies `len` bytes from byte `offset` into private memory.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let p = self.at(offset, len, 1);
        let mut out = vec![0u8; len];
        // SAFETY: the source lies inside the mapping (checked above) and the
        // destination is a fresh Vec of `len` bytes; they cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned, still mapped, and no
        // reference into it exists (none is ever handed out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// ---- this peer's region ----------------------------------------------------

/// One message in a descriptor ring, every field settable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// The message's sequence number.
    pub seq: u32,
    /// The sender's token for it, echoed back on release.
    pub slot: u32,
    /// Number of segments (0: the retirement of area `area`).
    pub seg_count: u32,
    /// The area the segment (or table) lies in; 0 is the region's.
    pub area: u32,
    /// `(offset, len)` in words, relative to the data area; with more than
    /// [`INLINE_SEGMENTS`] segments, pair 0 locates the out-of-line table.
    pub segments: [(u32, u32); INLINE_SEGMENTS],
}

impl Descriptor {
    /// A descriptor holding `segments` inline.
    pub fn inline(seq: u32, slot: u32, segments: &[(u32, u32)]) -> Descriptor {
        let mut d = Descriptor {
            seq,
            slot,
            seg_count: u32::try_from(segments.len()).expect("a few segments"),
            area: 0,
            segments: [(0, 0); INLINE_SEGMENTS],
        };
        d.segments[..segments.len()].copy_from_slice(segments);
        d
    }

    /// A descriptor of `seg_count` segments listed in an out-of-line table of
    /// `table_len` words at word `table_offset` (a valid one has
    /// `table_len == 2 * seg_count`: two words a segment).
    pub fn out_of_line(
        seq: u32,
        slot: u32,
        seg_count: u32,
        table_offset: u32,
        table_len: u32,
    ) -> Descriptor {
        let mut d = Descriptor {
            seq,
            slot,
            seg_count,
            area: 0,
            segments: [(0, 0); INLINE_SEGMENTS],
        };
        d.segments[0] = (table_offset, table_len);
        d
    }
}

/// The hand peer's outgoing region: a memfd it maps read-write and describes
/// to the real end, with every part of it under the test's control.
#[derive(Debug)]
pub struct Region {
    file: OwnedFd,
    map: Mapping,
    geometry: Geometry,
}

impl Region {
    /// A memfd of exactly `geometry.region_size` bytes with a valid, unsealed
    /// header; see [`create`](Region::create).
    pub fn new(geometry: Geometry) -> Region {
        Region::create(geometry, geometry.region_size)
    }

    /// A memfd that accepts seals, `file_size` bytes long (tests make it
    /// differ from the geometry on purpose), mapped read-write, with the
    /// header for `geometry` written (flags 0: call
    /// [`seal`](Region::seal) to make it a sealed region).
    pub fn create(geometry: Geometry, file_size: u64) -> Region {
        Region::create_with_flags(
            geometry,
            file_size,
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    }

    /// [`create`](Region::create) with the given `memfd_create` flags (for
    /// example `MFD_NOEXEC_SEAL`, which the kernel implies under
    /// `vm.memfd_noexec=1`).
    pub fn create_with_flags(geometry: Geometry, file_size: u64, flags: libc::c_uint) -> Region {
        let file = memfd_create(flags);
        ftruncate(file.as_fd(), file_size);
        let map = Mapping::map(file.as_fd(), file_size, true);
        let region = Region {
            file,
            map,
            geometry,
        };
        if file_size >= CONTROL_BYTES {
            region.write_header(geometry, 0);
        }
        region
    }

    /// Writes the control block header.
    pub fn write_header(&self, geometry: Geometry, flags: u32) {
        self.map.store_u64(header::MAGIC, MAGIC);
        self.map.store_u32(header::VERSION, VERSION);
        self.map.store_u32(header::FLAGS, flags);
        self.map
            .store_u64(header::REGION_SIZE, geometry.region_size);
        self.map
            .store_u32(header::RING_CAPACITY, geometry.ring_capacity);
        self.map
            .store_u32(header::HELD_CAPACITY, geometry.held_capacity);
    }

    /// Seals the file as a sealed region must be and sets the header's flag.
    /// The seals come after our writable mapping exists, as in the crate.
    pub fn seal(&self) {
        self.seal_with(REGION_SEALS);
        self.map.store_u32(header::FLAGS, FLAG_SEALED);
    }

    /// Adds exactly `seals` and nothing else (the header is left alone).
    pub fn seal_with(&self, seals: libc::c_int) {
        add_seals(self.file.as_fd(), seals);
    }

    /// A read-only descriptor of the file, to send with the hello.
    pub fn read_only_fd(&self) -> OwnedFd {
        reopen_read_only(self.file.as_fd())
    }

    /// The region's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The whole mapping, for writing fields by hand.
    pub fn map(&self) -> &Mapping {
        &self.map
    }

    /// Writes the descriptor ring entry for message `at` (its ring position
    /// comes from `at`; the `seq` field written is `d.seq`).
    pub fn write_descriptor(&self, at: u32, d: &Descriptor) {
        let base = self.geometry.descriptors_offset()
            + u64::from(self.geometry.ring_index(at)) * DESCRIPTOR_BYTES;
        // slot in bits 0..16, segment count in 16..26, area in 26..32
        self.map.store_u32(
            base + 4,
            (d.slot & 0xffff) | ((d.seg_count & 0x3ff) << 16) | (d.area << 26),
        );
        let (offset, len) = d.segments[0];
        self.map.store_u32(base + 8, offset);
        self.map.store_u32(base + 12, len);
        // The tag, seq + 1, goes last: it marks the entry complete.
        self.map.store_u32(base, d.seq.wrapping_add(1));
    }

    /// Writes the entry for message `at` carrying `segment` (whole words)
    /// in it, with the slot and count words as given (0 and 1 when honest)
    /// and `len` words announced.
    pub fn write_carried(&self, at: u32, seq: u32, slot_count: u32, len: u32, segment: &[u8]) {
        let base = self.geometry.descriptors_offset()
            + u64::from(self.geometry.ring_index(at)) * DESCRIPTOR_BYTES;
        self.map.write_bytes(base + 16, segment);
        self.map.store_u32(base + 4, slot_count);
        self.map.store_u32(base + 8, CARRIED_OFFSET);
        self.map.store_u32(base + 12, len);
        self.map.store_u32(base, seq.wrapping_add(1));
    }

    /// Copies `bytes` to word `word` of the data area.
    pub fn write_data(&self, word: u32, bytes: &[u8]) {
        let offset = self.geometry.data_offset() + u64::from(word) * WORD;
        self.map.write_bytes(offset, bytes);
    }

    /// Writes an out-of-line segment table at word `word`: two words per
    /// segment, `offset | len << 32` and the area (0 here).
    pub fn write_table(&self, word: u32, segments: &[(u32, u32)]) {
        for (i, &(offset, len)) in (0u32..).zip(segments) {
            let entry = u64::from(offset) | (u64::from(len) << 32);
            self.write_data(word + 2 * i, &entry.to_le_bytes());
            self.write_data(word + 2 * i + 1, &0u64.to_le_bytes());
        }
    }

    /// Lays `segments` (whole words each) out back to back from word `first`,
    /// and writes descriptor `seq` for them, with an out-of-line table after
    /// the segments when there are more than [`INLINE_SEGMENTS`]. Does not
    /// publish. Returns the descriptor.
    pub fn write_message(
        &self,
        seq: u32,
        slot: u32,
        first: u32,
        segments: &[Vec<u8>],
    ) -> Descriptor {
        let mut extents = Vec::with_capacity(segments.len());
        let mut at = first;
        for s in segments {
            assert_eq!(s.len() as u64 % WORD, 0, "segments are whole words");
            let words = u32::try_from(s.len() as u64 / WORD).expect("small segment");
            self.write_data(at, s);
            extents.push((at, words));
            at += words;
        }
        let count = u32::try_from(segments.len()).expect("a few segments");
        let d = if segments.len() <= INLINE_SEGMENTS {
            Descriptor::inline(seq, slot, &extents)
        } else {
            self.write_table(at, &extents);
            Descriptor::out_of_line(seq, slot, count, at, 2 * count)
        };
        self.write_descriptor(seq, &d);
        d
    }

    /// Writes release ring entry `n`: we dropped the peer's message `(slot, seq)`.
    pub fn write_release(&self, n: u32, slot: u32, seq: u32) {
        let base = self.geometry.releases_offset()
            + u64::from(self.geometry.release_index(n)) * RELEASE_BYTES;
        self.map.store_u32(base, slot);
        self.map.store_u32(base + 4, seq);
    }

    /// Stores one of the control block counters (see [`counter`]).
    pub fn set_counter(&self, offset: u64, value: u32) {
        self.map.store_u32(offset, value);
    }

    /// Sets `published`: the real end may now take messages up to `n`. No
    /// futex wake is needed: the tests publish before the real end looks, and
    /// a real end that does sleep re-checks after every wait slice anyway.
    pub fn publish(&self, n: u32) {
        self.set_counter(counter::PUBLISHED, n);
    }
}

// ---- areas -----------------------------------------------------------------

/// The first byte of an area record.
pub const AREA_RECORD: u8 = 0x5E;

/// The 16 bytes that hand over area `id` of `bytes` bytes (its descriptor
/// goes with them): `[0x5E, id, 0, 0, 0, 0, 0, 0]`, then `bytes` (LE).
pub fn area_record(id: u8, bytes: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0] = AREA_RECORD;
    r[1] = id;
    r[8..].copy_from_slice(&bytes.to_le_bytes());
    r
}

/// An area of the hand peer's outgoing space: a memfd of plain data,
/// mapped read-write.
#[derive(Debug)]
pub struct Area {
    file: OwnedFd,
    map: Mapping,
}

impl Area {
    /// A memfd of `bytes` bytes that accepts seals (not sealed yet).
    pub fn new(bytes: u64) -> Area {
        let file = memfd_create(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        ftruncate(file.as_fd(), bytes);
        let map = Mapping::map(file.as_fd(), bytes, true);
        Area { file, map }
    }

    /// A sealed area, as a sealed region's areas must be.
    pub fn sealed(bytes: u64) -> Area {
        let area = Area::new(bytes);
        add_seals(area.file.as_fd(), REGION_SEALS);
        area
    }

    /// A read-only descriptor of the file, to hand over.
    pub fn read_only_fd(&self) -> OwnedFd {
        reopen_read_only(self.file.as_fd())
    }

    /// Copies `bytes` to word `word` of the area.
    pub fn write_data(&self, word: u32, bytes: &[u8]) {
        self.map.write_bytes(u64::from(word) * WORD, bytes);
    }
}

// ---- the handshake ---------------------------------------------------------

/// How long our reads on the socket wait before the test fails instead of
/// hanging (the watchdog is the last resort).
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Our end of the socket, and the real end's set-up running on a helper
/// thread until [`setup_result`](HandPeer::setup_result) collects it.
#[derive(Debug)]
pub struct HandPeer {
    socket: Option<UnixStream>,
    real_end: Option<JoinHandle<Result<Channel, SetupError>>>,
    their_hello: Hello,
    their_fd: OwnedFd,
}

impl HandPeer {
    /// Starts the real end's set-up with `options` on a helper thread, and
    /// receives its hello and descriptor (it sends before it receives).
    pub fn start(options: &Options) -> HandPeer {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_read_timeout(Some(SOCKET_TIMEOUT))
            .expect("read timeout");
        let options = options.clone();
        let real_end = std::thread::spawn(move || Channel::from_stream_with(theirs, &options));
        let mut bytes = [0u8; HELLO_LEN];
        let mut filled = 0;
        let mut fds = Vec::new();
        while filled < HELLO_LEN {
            let (n, more) =
                recv_with_fds(ours.as_fd(), &mut bytes[filled..]).expect("the real end's hello");
            assert_ne!(n, 0, "the real end closed before its hello");
            filled += n;
            fds.extend(more);
        }
        assert_eq!(fds.len(), 1, "the real end sends exactly one descriptor");
        HandPeer {
            socket: Some(ours),
            real_end: Some(real_end),
            their_hello: Hello::decode(&bytes),
            their_fd: fds.pop().expect("one descriptor"),
        }
    }

    /// The hello the real end sent.
    pub fn their_hello(&self) -> Hello {
        self.their_hello
    }

    /// The descriptor the real end sent us for its region.
    pub fn their_fd(&self) -> BorrowedFd<'_> {
        self.their_fd.as_fd()
    }

    /// The real end's region, mapped read-only as its descriptor allows.
    pub fn map_their_region(&self) -> Mapping {
        Mapping::map(self.their_fd.as_fd(), self.their_hello.region_size, false)
    }

    fn socket(&self) -> &UnixStream {
        self.socket.as_ref().expect("socket already closed")
    }

    /// Sends `hello` with `fds` attached.
    pub fn send_hello(&self, hello: &Hello, fds: &[BorrowedFd<'_>]) {
        self.send_bytes(&hello.encode(), fds);
    }

    /// Sends raw bytes (a partial hello, or stray bytes) with `fds` attached.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let sent = send_with_fds(self.socket().as_fd(), bytes, fds);
        assert_eq!(sent, bytes.len(), "a short send on an empty socket");
    }

    /// Whether no byte waits on our end of the socket (nothing sent since
    /// the handshake). Reads one if there is.
    pub fn nothing_to_read(&self) -> bool {
        let mut socket = self.socket();
        socket.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let got = socket.read(&mut byte);
        let empty = matches!(got, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        socket.set_nonblocking(false).expect("blocking");
        empty
    }

    /// Everything that waits on our end of the socket now: its bytes, and
    /// the descriptors that came with them (without waiting for more).
    pub fn read_available(&self) -> (Vec<u8>, Vec<OwnedFd>) {
        let socket = self.socket();
        socket.set_nonblocking(true).expect("nonblocking");
        let (mut bytes, mut fds) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 4096];
        loop {
            match recv_with_fds(socket.as_fd(), &mut buf) {
                Ok((0, more)) if more.is_empty() => break,
                Ok((n, more)) => {
                    bytes.extend_from_slice(&buf[..n]);
                    fds.extend(more);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading our socket: {e}"),
            }
        }
        socket.set_nonblocking(false).expect("blocking");
        (bytes, fds)
    }

    /// Closes our end of the socket (a peer that goes away mid-handshake).
    pub fn close_socket(&mut self) {
        self.socket = None;
    }

    /// Sends our verdict on the real end's region (after both hellos).
    pub fn send_verdict(&self, verdict: &[u8; 8]) {
        self.send_bytes(verdict, &[]);
    }

    /// Reads the real end's verdict on our region.
    pub fn read_verdict(&self) -> [u8; 8] {
        let mut verdict = [0u8; 8];
        self.socket()
            .read_exact(&mut verdict)
            .expect("the real end's verdict");
        verdict
    }

    /// For a hello the real end accepts: says "mapped", collects the
    /// channel and checks the real end said "mapped" too.
    pub fn finish_shm(&mut self) -> Channel {
        self.send_verdict(&MAPPED);
        let channel = self.setup_result().expect("a valid handshake");
        assert_eq!(
            &self.read_verdict(),
            &MAPPED,
            "the real end mapped our region"
        );
        channel
    }

    /// Waits for the real end's set-up and returns its outcome.
    pub fn setup_result(&mut self) -> Result<Channel, SetupError> {
        self.real_end
            .take()
            .expect("set-up result already taken")
            .join()
            .expect("the real end panicked during set-up")
    }

    /// Asserts that the real end has closed its socket: after a failed
    /// set-up nothing of it may linger. A reset counts as closed too (the
    /// kernel reports one when unread bytes were left behind).
    pub fn assert_hung_up(&self) {
        let mut byte = [0u8; 1];
        let mut socket = self.socket();
        match socket.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("the real end's socket is still open: {other:?}"),
        }
    }
}

/// The hand peer after a valid handshake: the real end's channel, our region,
/// and a read-only view of the real end's region.
#[derive(Debug)]
pub struct Connected {
    /// The real end.
    pub channel: Channel,
    /// Our region, which the real end receives from.
    pub mine: Region,
    /// The real end's region, mapped read-only.
    pub theirs: Mapping,
    /// The real end's geometry, from its hello.
    pub their_geometry: Geometry,
    /// Keeps our end of the socket open: closing it would disconnect.
    peer: HandPeer,
}

impl Connected {
    /// Connects a real end made with `options` to a hand peer with a sealed
    /// region of `geometry`.
    pub fn new(options: &Options, geometry: Geometry) -> Connected {
        Connected::accepting(options, geometry, 0)
    }

    /// As [`new`](Connected::new), with a hello that lets the real end's
    /// outgoing space take `accept_bytes` (its region included): beyond its
    /// region, it may hand us areas.
    pub fn accepting(options: &Options, geometry: Geometry, accept_bytes: u64) -> Connected {
        let mine = Region::new(geometry);
        mine.seal();
        let mut peer = HandPeer::start(options);
        let mut hello = Hello::new(geometry, true);
        hello.accept_bytes = accept_bytes;
        peer.send_hello(&hello, &[mine.read_only_fd().as_fd()]);
        let channel = peer.finish_shm();
        Connected {
            channel,
            theirs: peer.map_their_region(),
            their_geometry: peer.their_hello().geometry(),
            mine,
            peer,
        }
    }

    /// Our end of the socket.
    pub fn peer(&self) -> &HandPeer {
        &self.peer
    }

    /// Hands over area `id` of `bytes` bytes with descriptor `fd`.
    pub fn send_area(&self, id: u8, bytes: u64, fd: BorrowedFd<'_>) {
        self.peer.send_bytes(&area_record(id, bytes), &[fd]);
    }

    /// The real end's descriptor ring entry for message `seq`.
    pub fn their_descriptor(&self, seq: u32) -> Descriptor {
        let g = self.their_geometry;
        let base = g.descriptors_offset() + u64::from(g.ring_index(seq)) * DESCRIPTOR_BYTES;
        let slot_count = self.theirs.load_u32(base + 4);
        Descriptor {
            seq: self.theirs.load_u32(base).wrapping_sub(1),
            slot: slot_count & 0xffff,
            seg_count: (slot_count >> 16) & 0x3ff,
            area: slot_count >> 26,
            segments: [(
                self.theirs.load_u32(base + 8),
                self.theirs.load_u32(base + 12),
            )],
        }
    }

    /// The segment the real end's entry for message `seq` carries, if it
    /// carries one.
    pub fn their_carried(&self, seq: u32) -> Option<Vec<u8>> {
        let d = self.their_descriptor(seq);
        let (offset, len) = d.segments[0];
        if offset != CARRIED_OFFSET {
            return None;
        }
        assert!(
            len <= CARRIED_WORDS,
            "an honest end carries at most 14 words"
        );
        let mut words = self.their_entry_words(seq);
        words.truncate(len as usize * 8);
        Some(words)
    }

    /// All [`CARRIED_WORDS`] words of the real end's entry for message
    /// `seq`, as bytes: the carried message's words first, whatever the
    /// rest hold after them.
    pub fn their_entry_words(&self, seq: u32) -> Vec<u8> {
        let g = self.their_geometry;
        let base = g.descriptors_offset() + u64::from(g.ring_index(seq)) * DESCRIPTOR_BYTES;
        (0..CARRIED_WORDS * 2)
            .flat_map(|i| {
                self.theirs
                    .load_u32(base + 16 + u64::from(i) * 4)
                    .to_le_bytes()
            })
            .collect()
    }

    /// A private copy of `len` words at word `offset` of the real end's data area.
    pub fn their_data(&self, offset: u32, len: u32) -> Vec<u8> {
        let g = self.their_geometry;
        let bytes = usize::try_from(u64::from(len) * WORD).expect("small");
        self.theirs
            .read_bytes(g.data_offset() + u64::from(offset) * WORD, bytes)
    }

    /// One of the real end's control block counters (see [`counter`]).
    pub fn their_counter(&self, offset: u64) -> u32 {
        self.theirs.load_u32(offset)
    }

    /// The real end's release ring entry `n`: `(slot, seq)`.
    pub fn their_release(&self, n: u32) -> (u32, u32) {
        let g = self.their_geometry;
        let base = g.releases_offset() + u64::from(g.release_index(n)) * RELEASE_BYTES;
        (self.theirs.load_u32(base), self.theirs.load_u32(base + 4))
    }
}
