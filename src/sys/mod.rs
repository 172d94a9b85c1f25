//! Every call into the operating system, and nothing else.
//!
//! This is the only place in the crate that names `libc`. Each wrapper does one
//! system call, is named after it, returns `io::Result`, and hands out descriptors
//! only as [`OwnedFd`](std::os::fd::OwnedFd) the moment they exist. The man page
//! of each call is named on its wrapper.

#![allow(unsafe_code)]

pub(crate) mod epoll;
pub(crate) mod file;
pub(crate) mod futex;
pub(crate) mod mapping;
pub(crate) mod process;
pub(crate) mod socket;

use std::io;

/// The error numbers callers outside `sys/` match on.
pub(crate) mod errno {
    pub(crate) const ENOSYS: i32 = libc::ENOSYS;
    pub(crate) const EPERM: i32 = libc::EPERM;
    pub(crate) const EACCES: i32 = libc::EACCES;
    pub(crate) const EINVAL: i32 = libc::EINVAL;
    pub(crate) const ECONNABORTED: i32 = libc::ECONNABORTED;
}

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
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // A non-negative ssize_t always fits in usize.
        Ok(ret.unsigned_abs())
    }
}

/// Retries `f` while it fails with `EINTR` (a signal arrived; nothing happened).
fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The id of the calling process. `getpid(2)`
pub(crate) fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() };
    pid.unsigned_abs()
}

/// The id of the parent process. `getppid(2)`
pub(crate) fn parent_pid() -> u32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    let pid = unsafe { libc::getppid() };
    pid.unsigned_abs()
}

/// Fills `buf` with random bytes from the kernel. `getrandom(2)`
pub(crate) fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let n = retry_eintr(|| {
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
            cvt_size(unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) })
        })?;
        filled += n;
    }
    Ok(())
}

/// Offers the CPU to another runnable thread, if any. `sched_yield(2)`
pub(crate) fn sched_yield() {
    // SAFETY: sched_yield has no preconditions; it cannot fail on Linux.
    unsafe { libc::sched_yield() };
}

/// Bytes of physical memory (`_SC_PHYS_PAGES` pages of `_SC_PAGESIZE`),
/// or 1 GiB when the kernel does not say. `sysconf(3)`
pub(crate) fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    match (u64::try_from(pages), u64::try_from(page)) {
        (Ok(pages), Ok(page)) if pages > 0 && page > 0 => pages.saturating_mul(page),
        _ => 1 << 30,
    }
}
