//! The files behind shared regions: memfd, `/dev/shm` fallback, seals, `fstat`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cvt, retry_eintr};

/// The seals a region announces as sealed: nobody may shrink, grow, newly map
/// for writing or write the file, nor change the seals, after we add them.
pub(crate) const REGION_SEALS: u32 =
    (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL)
        .unsigned_abs();

/// The seal that forbids making the file executable (Linux 6.3). A memfd
/// may carry it on top of [`REGION_SEALS`]: `MFD_NOEXEC_SEAL` adds it, and so
/// does the kernel for every memfd under `vm.memfd_noexec=1`. It changes
/// nothing about reading and writing, so a peer's region may carry it.
pub(crate) const EXEC_SEAL: u32 = libc::F_SEAL_EXEC.unsigned_abs();

/// Creates an anonymous memory file, close-on-exec, that accepts seals and
/// can never be made executable. `memfd_create(2)`
///
/// `MFD_NOEXEC_SEAL` keeps the call working under `vm.memfd_noexec=2`, which
/// refuses executable memfds; kernels before 6.3 do not know the flag and
/// fail with `EINVAL`, so the call is repeated without it.
pub(crate) fn memfd_create(name: &CStr) -> io::Result<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = match cvt(unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_NOEXEC_SEAL) })
    {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // SAFETY: as above.
            cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?
        }
        other => other?,
    };
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the size of the file. `ftruncate(2)`
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    retry_eintr(|| {
        // SAFETY: `fd` is a valid descriptor for the duration of the call.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
    })?;
    Ok(())
}

/// Adds seals to a memfd. `fcntl(2)`, `F_ADD_SEALS`
pub(crate) fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    let seals =
        libc::c_int::try_from(seals).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is valid; F_ADD_SEALS takes an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// Reads the seals of a file. `fcntl(2)`, `F_GET_SEALS`. Files that do not
/// support sealing fail with `EINVAL`.
pub(crate) fn get_seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: `fd` is valid; F_GET_SEALS takes no argument.
    let seals = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    Ok(seals.unsigned_abs())
}

/// What `fstat(2)` tells about a descriptor that matters for a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileKind {
    /// A regular file (not a pipe, socket, directory, device).
    pub(crate) regular: bool,
    /// The size in bytes.
    pub(crate) size: u64,
    /// Device and inode: which file it is.
    pub(crate) id: (u64, u64),
}

/// `fstat(2)`
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<FileKind> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is valid and `st` points to writable memory for one `stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled in `st`.
    let st = unsafe { st.assume_init() };
    Ok(FileKind {
        regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        size: u64::try_from(st.st_size).unwrap_or(0),
        id: (st.st_dev, st.st_ino),
    })
}

/// Opens a path with `O_CLOEXEC` added to `flags`. `open(2)`
pub(crate) fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let fd = retry_eintr(|| {
        // SAFETY: `path` is NUL-terminated; `mode` is passed as the variadic
        // third argument, which open reads only with O_CREAT.
        cvt(unsafe {
            libc::open(
                path.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        })
    })?;
    // SAFETY: open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a second, read-only description of the file behind `fd` through
/// `/proc/self/fd`, so the peer never holds a writable descriptor.
pub(crate) fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
    let path = CStr::from_bytes_with_nul(path.as_bytes()).map_err(io::Error::other)?;
    open(path, libc::O_RDONLY, 0)
}

/// Removes a name from the file system. `unlink(2)`
pub(crate) fn unlink(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    cvt(unsafe { libc::unlink(path.as_ptr()) })?;
    Ok(())
}

/// Allocates the blocks of `fd` up to `len`, so a full tmpfs fails now and not
/// as `SIGBUS` later. `posix_fallocate(3)`
pub(crate) fn posix_fallocate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    retry_eintr(|| {
        // SAFETY: `fd` is valid. posix_fallocate returns an error number
        // instead of setting errno.
        match unsafe { libc::posix_fallocate(fd.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            err => Err(io::Error::from_raw_os_error(err)),
        }
    })
}

/// Creates a file in `/dev/shm` for a region that cannot be a memfd: a random
/// name, `O_EXCL`, mode 0600, blocks allocated up to `len`, a second read-only
/// descriptor for the peer, and the name unlinked before returning, so a crash
/// never leaves the file behind. Returns `(read_write, read_only)`.
pub(crate) fn create_shm_file(len: u64) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut attempts = 0;
    loop {
        let mut random = [0u8; 8];
        super::getrandom(&mut random)?;
        let name = format!(
            "/dev/shm/capnp-shm-{}-{:016x}\0",
            super::getpid(),
            u64::from_ne_bytes(random)
        );
        let path = CStr::from_bytes_with_nul(name.as_bytes()).map_err(io::Error::other)?;
        let rw = match open(
            path,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        ) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        // From here on the name must go whatever happens. The read-only
        // open goes by name, so check it reached the same file.
        let rest = open(path, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
            .and_then(|ro| {
                if fstat(ro.as_fd())?.id == fstat(rw.as_fd())?.id {
                    Ok(ro)
                } else {
                    Err(io::Error::other("/dev/shm file replaced while opening it"))
                }
            })
            .and_then(|ro| posix_fallocate(rw.as_fd(), len).map(|()| ro));
        let unlinked = unlink(path);
        let ro = rest?;
        unlinked?;
        return Ok((rw, ro));
    }
}

/// Sets or clears close-on-exec on `fd`. `fcntl(2)`, `F_SETFD`
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: `fd` is valid; F_SETFD takes an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) })?;
    Ok(())
}
