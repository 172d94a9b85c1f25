//! Handing a descriptor to a child process across `exec`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;

/// Which descriptor a command's children should inherit: armed with a
/// number until the parent has its child, then disarmed (-1) so a later
/// `spawn` of the same `Command` clears the flag on nothing.
#[derive(Debug, Clone)]
pub(crate) struct Inheritance(Arc<AtomicI32>);

impl Inheritance {
    /// Stops later spawns of the command from handing the descriptor on.
    pub(crate) fn disarm(&self) {
        self.0.store(-1, Ordering::SeqCst);
    }
}

/// Makes `fd` survive the `exec` of `command`'s next child, and only of it:
/// the descriptor stays close-on-exec in this process (so no other child
/// inherits it), and the child clears the flag between `fork` and `exec`,
/// while the returned [`Inheritance`] is armed. The number is the same in
/// the child. `fcntl(2)`, `F_SETFD`
pub(crate) fn inherit_in(command: &mut Command, fd: BorrowedFd<'_>) -> Inheritance {
    let armed = Arc::new(AtomicI32::new(fd.as_raw_fd()));
    let in_child = Arc::clone(&armed);
    let clear = move || {
        // Async-signal-safe: an atomic load and at most one fcntl.
        let raw = in_child.load(Ordering::SeqCst);
        if raw < 0 {
            return Ok(());
        }
        // SAFETY: F_SETFD with an int argument; while armed, `raw` is the
        // parent's open descriptor, inherited by this child.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, 0) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec; it makes
    // one atomic load and one async-signal-safe system call, takes no lock
    // and allocates nothing.
    unsafe { command.pre_exec(clear) };
    Inheritance(armed)
}

/// A close-on-exec duplicate of `fd` numbered 3 or above, so that a child's
/// standard streams can never land on it. `fcntl(2)`, `F_DUPFD_CLOEXEC`
pub(crate) fn dup_above_stdio(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC with an int argument on a valid descriptor.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if raw == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
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
    // The parent made the socket pair, so the kernel names it as the peer.
    let parent = i32::try_from(super::parent_pid()).unwrap_or(-1);
    if super::socket::peer_credentials(borrowed)
        .ok()
        .map(|(pid, _, _)| pid)
        != Some(parent)
    {
        return Err(refuse("not a socket our parent made"));
    }
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(refuse("the inherited descriptor was claimed already"));
    }
    // By the convention the parent followed, the descriptor was handed to
    // this process for this purpose and nothing else here owns it.
    // SAFETY: open (checked above); CLAIMED allows only one owner of it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
