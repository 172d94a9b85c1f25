//! Shared futex wait and wake. `futex(2)`
//!
//! The words live in shared file mappings seen by two processes, so these are
//! *shared* futexes: `FUTEX_PRIVATE_FLAG` is never set. The kernel keys a shared
//! futex on the file and offset, so a waiter on the peer's read-only mapping is
//! woken by a wake on the owner's writable mapping of the same page.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`.
///
/// Returns when woken, when the value differs (checked by the kernel
/// atomically with going to sleep, so a change just before the call is never
/// missed), on timeout, on a signal, or spuriously: the caller re-checks its
/// condition in every case. `word` may live in a read-only mapping.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> bool {
    // c_long is 32 bits on 32-bit targets; nanoseconds always fit.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always below 1e9, so it fits.
        tv_nsec: libc::c_long::try_from(timeout.subsec_nanos()).unwrap_or(0),
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // FUTEX_WAIT only reads it. `ts` is a valid relative timeout. The extra
    // arguments are ignored by FUTEX_WAIT.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    // 0: woken (or spurious). -1: EAGAIN (value differed), ETIMEDOUT, EINTR.
    // The caller re-checks its condition and its deadline in every case, so
    // the only information worth returning is "we may have been woken".
    r == 0
}

/// Wakes every waiter on `word`. Returns how many were woken.
pub(crate) fn futex_wake(word: &AtomicU32) -> usize {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it
    // beyond computing its key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    usize::try_from(r).unwrap_or(0)
}
