//! Handing a descriptor to a child process across `exec`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

/// Which descriptor a command's children should inherit: armed with a
/// number until the parent has its child, then disarmed (-1) so a later
/// `spawn` of the same `Command` clears the flag on nothing.
/// Dropping it disarms it too.
#[derive(Debug)]
pub(crate) struct Inheritance(Arc<AtomicI32>);

impl Inheritance {
    /// Stops later spawns of the command from handing the descriptor on.
    pub(crate) fn disarm(&self) {
        self.0.store(-1, Ordering::SeqCst);
    }
}

impl Drop for Inheritance {
    fn drop(&mut self) {
        // A later spawn of the same Command must not hand on whatever
        // descriptor reuses the number.
        self.disarm();
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

/// Why [`claim_inherited`] refused a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not an open descriptor, or a standard stream.
    NotOpen,
    /// Not a Unix stream socket.
    NotUnixStream,
    /// Its peer is not our parent process.
    NotFromParent,
    /// This process claimed its inherited descriptor already.
    ClaimedAlready,
}

/// Takes ownership of descriptor `fd`, which the parent process handed to
/// this one across `exec` (see `spawn.rs` for the convention that names it).
/// At most once per process: a second call fails, so no two `OwnedFd`s are
/// ever made of the same number. A refused descriptor is left open and
/// untouched (it may be something else of this process's). `fcntl(2)`,
/// `F_GETFD`
pub(crate) fn claim_inherited(fd: RawFd) -> Result<OwnedFd, Refusal> {
    if fd < 3 {
        return Err(Refusal::NotOpen);
    }
    // SAFETY: F_GETFD on any number is harmless; -1 (EBADF) when not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(Refusal::NotOpen);
    }
    // SAFETY: `fd` is open (checked above) and only borrowed for the checks.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    if !super::socket::is_unix_stream(borrowed).unwrap_or(false) {
        return Err(Refusal::NotUnixStream);
    }
    // The parent made the socket pair, so the kernel names it as the peer.
    let parent = i32::try_from(super::parent_pid()).unwrap_or(-1);
    if super::socket::peer_credentials(borrowed)
        .ok()
        .map(|(pid, _, _)| pid)
        != Some(parent)
    {
        return Err(Refusal::NotFromParent);
    }
    if CLAIMED.swap(true, Ordering::SeqCst) {
        return Err(Refusal::ClaimedAlready);
    }
    // By the convention the parent followed, the descriptor was handed to
    // this process for this purpose and nothing else here owns it.
    // SAFETY: open (checked above); CLAIMED allows only one owner of it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Forks in this process's line of descent since [`watch_forks`]: 0 in the
/// process that first called it, one more in each child of a `fork`.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Whether the handler that counts forks is registered (or being registered).
static WATCHING: AtomicBool = AtomicBool::new(false);

/// Runs in the child of every `fork` (through `pthread_atfork`): one atomic
/// increment, which is async-signal-safe.
extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Starts counting forks, once per process: after this, [`forks`] differs
/// in a child from what its parent read before the `fork`. Counts every
/// `fork(2)` made through the C library (Rust's `libc::fork`, `nix`, C
/// code); a raw `clone` system call that bypasses it is not seen.
/// `pthread_atfork(3)`
pub(crate) fn watch_forks() -> std::io::Result<()> {
    if WATCHING.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: registers a child handler that makes one atomic increment;
    // a `extern "C" fn` with no arguments is what pthread_atfork takes.
    let r = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
    if r != 0 {
        WATCHING.store(false, Ordering::SeqCst);
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// The fork count of this process; see [`watch_forks`].
#[inline]
pub(crate) fn forks() -> u64 {
    FORKS.load(Ordering::Relaxed)
}
