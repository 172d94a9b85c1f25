//! Handing a descriptor to a child process across `exec`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

/// Makes `fd` survive the `exec` of `command`, and only of it: the
/// descriptor stays close-on-exec in this process (so no other child
/// inherits it), and the child clears the flag between `fork` and `exec`.
/// The number is the same in the child. `fcntl(2)`, `F_SETFD`
pub(crate) fn inherit_in(command: &mut Command, fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    let clear = move || {
        // Async-signal-safe: a single fcntl on a number we know is open.
        // SAFETY: F_SETFD with an int argument on an open descriptor.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes one async-signal-safe system call; it touches no memory shared
    // with other threads and allocates nothing.
    unsafe { command.pre_exec(clear) };
}

/// Whether this process has claimed its inherited descriptor already.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Takes ownership of descriptor `fd`, which the parent process handed to
/// this one across `exec` (see `spawn.rs` for the convention that names it).
/// At most once per process: a second call fails, so no two `OwnedFd`s are
/// ever made of the same number. Fails if `fd` is not an open descriptor or
/// is one of the standard streams. `fcntl(2)`, `F_GETFD`
pub(crate) fn claim_inherited(fd: RawFd) -> std::io::Result<OwnedFd> {
    let refuse = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string());
    if fd < 3 {
        return Err(refuse("a standard stream is not a channel"));
    }
    // SAFETY: F_GETFD on any number is harmless; -1 (EBADF) when not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(refuse("names no open descriptor"));
    }
    // Checked before claiming, so a refused descriptor stays open and
    // untouched (it may be something else of this process's).
    // SAFETY: `fd` is open (checked above) and only borrowed for the check.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !super::socket::is_unix_stream(borrowed).unwrap_or(false) {
        return Err(refuse("not a Unix stream socket"));
    }
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(refuse("the inherited descriptor was claimed already"));
    }
    // By the convention the parent followed, the descriptor was handed to
    // this process for this purpose and nothing else here owns it.
    // SAFETY: open (checked above); CLAIMED allows only one owner of it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
