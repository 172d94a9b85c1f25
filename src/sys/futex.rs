//! Shared futex wait and wake. `futex(2)`
//!
//! The words live in shared file mappings seen by two processes, so these are
//! *shared* futexes: `FUTEX_PRIVATE_FLAG` is never set. The kernel keys a shared
//! futex on the file and offset, so a waiter on the peer's read-only mapping is
//! woken by a wake on the owner's writable mapping of the same page.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::Duration;

/// Sleeps while `*word == expected`, for at most `timeout`.
///
/// Returns when woken, when the value differs (checked by the kernel
/// atomically with going to sleep, so a change just before the call is never
/// missed), on timeout, on a signal, or spuriously: the caller re-checks its
/// condition in every case. `word` may live in a read-only mapping.
///
/// # Errors
///
/// When the kernel refuses the call (`ENOSYS`, or `EPERM` from a seccomp
/// filter): the caller cannot sleep and must not silently spin instead.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> io::Result<()> {
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
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The value differed, the time ran out, or a signal came: the
        // caller re-checks its condition and its deadline in every case.
        Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
        _ => Err(e),
    }
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

/// One futex of a [`futex_waitv`] call: `struct futex_waitv` of the kernel.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// `struct __kernel_timespec`: 64-bit seconds and nanoseconds everywhere.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

const _: () = {
    assert!(size_of::<FutexWaitv>() == 24);
    assert!(size_of::<KernelTimespec>() == 16);
};

/// `FUTEX2_SIZE_U32`: a 32-bit futex. Without `FUTEX2_PRIVATE`: shared.
const FUTEX2_SIZE_U32: u32 = 0x02;

/// The most futexes one `futex_waitv` call takes.
pub(crate) const FUTEX_WAITV_MAX: usize = 128;

/// Sleeps until any of `words` is woken (or no longer holds its expected
/// value), for at most `timeout`. `futex_waitv(2)`, Linux 5.16.
///
/// Returns `Ok` when woken, on timeout, value mismatch, or signal (the
/// caller re-checks everything anyway). Builds the kernel's array on the
/// stack: no allocation.
///
/// # Errors
///
/// `Unsupported` when this process cannot use `futex_waitv` (`ENOSYS` on
/// kernels before 5.16; `EPERM`, `EACCES` or `EINVAL` from a seccomp
/// filter; remembered, so later calls fail at once); `InvalidInput` for no
/// words or more than [`FUTEX_WAITV_MAX`]; other refusals as they come.
pub(crate) fn futex_waitv(words: &[(&AtomicU32, u32)], timeout: Duration) -> io::Result<()> {
    if HAS_WAITV.load(Ordering::Relaxed) == NO {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    if words.is_empty() || words.len() > FUTEX_WAITV_MAX {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut waiters = [const {
        FutexWaitv {
            val: 0,
            uaddr: 0,
            flags: 0,
            reserved: 0,
        }
    }; FUTEX_WAITV_MAX];
    for (w, (word, expected)) in waiters.iter_mut().zip(words) {
        *w = FutexWaitv {
            val: u64::from(*expected),
            uaddr: word.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        };
    }
    let deadline = monotonic_after(timeout);
    // At most FUTEX_WAITV_MAX (128), checked above.
    let count = u32::try_from(words.len()).unwrap_or(0);
    // SAFETY: the first `count` entries of `waiters` are valid and point to
    // live, aligned u32 words (borrowed for the call); `deadline` is valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            count,
            0u32,
            &deadline as *const KernelTimespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if r >= 0 {
        HAS_WAITV.store(YES, Ordering::Relaxed);
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
        Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EINVAL) => {
            HAS_WAITV.store(NO, Ordering::Relaxed);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("futex_waitv unavailable: {e}"),
            ))
        }
        _ => Err(e),
    }
}

/// `timeout` from now on `CLOCK_MONOTONIC`, as the kernel's 64-bit
/// `struct __kernel_timespec` (also on 32-bit targets). Saturates.
fn monotonic_after(timeout: Duration) -> KernelTimespec {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always
    // exists, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    // (`i64::from` is a no-op on 64-bit targets, a widening on 32-bit ones.)
    #[allow(clippy::useless_conversion)]
    let (now_sec, now_nsec) = (i64::from(now.tv_sec), i64::from(now.tv_nsec));
    let nanos = now_nsec + i64::from(timeout.subsec_nanos());
    KernelTimespec {
        tv_sec: now_sec
            .saturating_add(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX))
            .saturating_add(i64::from(nanos >= 1_000_000_000)),
        tv_nsec: nanos % 1_000_000_000,
    }
}

/// Whether this process can use `futex_waitv`: [`UNKNOWN`], [`YES`], [`NO`].
static HAS_WAITV: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

/// Whether `futex_waitv` may be tried (not known to be unavailable).
pub(crate) fn waitv_available() -> bool {
    HAS_WAITV.load(Ordering::Relaxed) != NO
}
