//! An epoll instance: one descriptor that becomes readable when any of the
//! descriptors it watches does. `epoll(7)`

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cvt, retry_eintr};

/// An epoll instance watching descriptors for reading (and hang-up).
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    /// A new instance, close-on-exec. `epoll_create1(2)`
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain flags; the result is a new descriptor or -1.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: epoll_create1 returned a new descriptor nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for reading and hang-up. The caller removes it (or
    /// closes it) before `fd` is closed. `epoll_ctl(2)`, `EPOLL_CTL_ADD`
    pub(crate) fn add(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP).unsigned_abs(),
            u64: 0,
        };
        // SAFETY: both descriptors are valid; `event` is a valid event.
        cvt(unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut event,
            )
        })?;
        Ok(())
    }

    /// Stops watching `fd`. `epoll_ctl(2)`, `EPOLL_CTL_DEL`
    pub(crate) fn remove(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: both descriptors are valid; DEL ignores the event.
        cvt(unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        })?;
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: no limit) for any watched descriptor to
    /// be ready; returns whether one is. `epoll_wait(2)`
    pub(crate) fn wait(&self, timeout_ms: libc::c_int) -> io::Result<bool> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        let n = retry_eintr(|| {
            // SAFETY: room for one event; the descriptor is valid.
            cvt(unsafe { libc::epoll_wait(self.0.as_raw_fd(), &mut event, 1, timeout_ms) })
        })?;
        Ok(n > 0)
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
