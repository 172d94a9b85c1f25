//! The peer cannot shrink, grow, write or newly map for writing a sealed
//! region: not through the descriptor it receives, and not through a
//! read-write reopen of it via /proc. (An unsealed fallback region can be
//! reopened and written: that is why a sealed end refuses one by default.)
#![allow(unsafe_code)]
mod common;
mod peer;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use capnp_shm::{Backing, Options};
use common::Watchdog;
use peer::HandPeer;

fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    // SAFETY: a valid C string; the result is a new descriptor or -1.
    let raw = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ftruncate(fd: BorrowedFd<'_>, len: i64) -> io::Result<()> {
    // SAFETY: plain system call on a valid descriptor.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

fn pwrite(fd: BorrowedFd<'_>, at: i64) -> io::Result<()> {
    let byte = [0xAAu8];
    // SAFETY: `byte` is readable for one byte.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), byte.as_ptr().cast(), 1, at) };
    if n == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn punch_hole(fd: BorrowedFd<'_>, len: i64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain system call on a valid descriptor.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, 0, len) })
}

fn map_writable(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unmapping exactly what mmap returned.
    unsafe { libc::munmap(p, len) };
    Ok(())
}

fn add_seal(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS with an int argument.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) })
}

/// Refused by the seals themselves.
fn sealed(r: io::Result<()>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}");
}

/// Refused (by the read-only descriptor or by the seals).
fn refused(r: io::Result<()>, what: &str) {
    let e = r.expect_err(what);
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::EBADF | libc::EINVAL | libc::EACCES)
        ),
        "{what}: {e}"
    );
}

#[test]
fn a_sealed_region_cannot_be_changed_by_the_peer() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let mut hand = HandPeer::start(&Options::new().setup_timeout(Duration::from_millis(200)));
    let len = i64::try_from(hand.their_hello().region_size).unwrap();
    let fd = hand.their_fd();
    // The descriptor as received: read-only.
    refused(
        ftruncate(fd, 0),
        "ftruncate through the received descriptor",
    );
    refused(
        ftruncate(fd, len * 2),
        "growing through the received descriptor",
    );
    refused(pwrite(fd, 0), "write through the received descriptor");
    refused(
        map_writable(fd, 4096),
        "writable mapping of the received descriptor",
    );
    // A read-write reopen through /proc works (same user), and still every
    // change is refused by the seals.
    let rw = reopen(fd, libc::O_RDWR).expect("reopen read-write through /proc");
    sealed(
        ftruncate(rw.as_fd_borrowed(), 0),
        "ftruncate through a /proc reopen",
    );
    sealed(
        ftruncate(rw.as_fd_borrowed(), len * 2),
        "growing through a /proc reopen",
    );
    sealed(
        pwrite(rw.as_fd_borrowed(), 0),
        "write through a /proc reopen",
    );
    sealed(
        punch_hole(rw.as_fd_borrowed(), len),
        "punching a hole through a /proc reopen",
    );
    sealed(
        map_writable(rw.as_fd_borrowed(), 4096),
        "writable mapping through a /proc reopen",
    );
    sealed(add_seal(rw.as_fd_borrowed()), "changing the seals");
    drop(rw);
    drop(hand.setup_result());
}

#[test]
fn an_unsealed_fallback_region_can_be_reopened_for_writing() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let mut hand = HandPeer::start(
        &Options::new()
            .backing(Backing::ShmFile)
            .setup_timeout(Duration::from_millis(200)),
    );
    assert_eq!(hand.their_hello().flags & 1, 0, "announced unsealed");
    let len = i64::try_from(hand.their_hello().region_size).unwrap();
    let rw = reopen(hand.their_fd(), libc::O_RDWR).expect("reopen read-write through /proc");
    // Same size, so the real end is not hurt; the point is that it is allowed.
    ftruncate(rw.as_fd_borrowed(), len).expect("an unsealed file can be resized");
    map_writable(rw.as_fd_borrowed(), 4096).expect("and mapped for writing");
    drop(rw);
    drop(hand.setup_result());
}

trait Borrow {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl Borrow for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}
