//! The sleep/wake handshake between a waiting end and the peer that can
//! end its wait: the sleeper's half and the waker's half, side by side, and
//! why no wake is lost.
//!
//! A receiver with nothing to read waits for the peer's `published`
//! counter to move; a sender with no room waits for the peer's `released`.
//! Each announces the sleep in a flag of its own region (`rx_sleeping`,
//! `tx_sleeping`), re-checks, and sleeps in `FUTEX_WAIT` on the peer's
//! counter (`wait.rs`). The peer, after storing its counter, checks the flag
//! and wakes only if it is set, so a stream between two busy ends makes no
//! system call at all.
//!
//! # Why no wake is lost
//!
//! ```text
//! sleeper (announce)                        waker (wake_peer)
//! S1 flag = SLEEPING       (Relaxed store)  W1 counter = n          (Release store)
//! F1 fence(SeqCst)                          F2 fence(SeqCst)
//! S2 seen = counter        (Relaxed load)   W2 flag?                (Relaxed load)
//! S3 if seen says nothing new: FUTEX_WAIT(counter, seen)
//!                                           W3 if flag set: FUTEX_WAKE(counter)
//! ```
//!
//! The two `SeqCst` fences are ordered one way or the other (also across
//! processes: it is the same coherent memory). If F1 comes first, W2 sees
//! S1 and the waker wakes. If F2 comes first, S2 sees `n` and the sleeper
//! does not sleep. A wake that lands between S2 and S3 is not lost either:
//! `FUTEX_WAIT` compares the word with `seen` inside the kernel and returns
//! at once when it changed. (Fences rather than `SeqCst` accesses, because
//! the counter lies in the peer's read-only mapping, where only `Relaxed`
//! loads are allowed; see `word.rs`.) The re-check matters as much as its
//! order: a `seen` that already shows something new must not be slept on.
//!
//! `model.rs` checks this exhaustively with loom, running this code, the
//! waiter's and the rings', and shows that each broken variant in
//! `fault.rs` is caught.

use std::sync::atomic::Ordering;

use crate::fault::{self, Fault};
use crate::layout::AWAKE;
use crate::word::{Mine, Theirs, Word};

/// The sleeper's half of the handshake: stores `mode` in our `flag`, then
/// re-checks the peer's `counter` (S1, F1, S2 above). Returns the value seen.
pub(crate) fn announce<W: Word>(flag: Mine<'_, W>, mode: u32, counter: Theirs<'_, W>) -> u32 {
    flag.store(mode, Ordering::Relaxed);
    if !fault::active(Fault::RecheckNotOrdered) {
        // SeqCst: F1, the sleeper's half of the pair (module notes).
        W::fence(Ordering::SeqCst);
    }
    counter.load()
}

/// Takes the announcement back. Relaxed: a stale flag seen by the peer
/// costs one spurious wake, nothing else.
pub(crate) fn withdraw<W: Word>(flag: Mine<'_, W>) {
    flag.store(AWAKE, Ordering::Relaxed);
}

/// The waker's half: `store` our `counter` (W1), then check whether the
/// peer announced a sleep in `peer_flag` and wake it (F2, W2, W3). Returns
/// how the peer sleeps, so that the caller can also ring the doorbell for a
/// peer that sleeps on the socket.
pub(crate) fn wake_peer<W: Word>(
    store: impl FnOnce(),
    counter: Mine<'_, W>,
    peer_flag: Theirs<'_, W>,
) -> u32 {
    let mode = if fault::active(Fault::WakerChecksFirst) {
        let mode = peer_flag.load();
        store();
        mode
    } else {
        store();
        // SeqCst: F2, the waker's half of the pair (module notes).
        W::fence(Ordering::SeqCst);
        peer_flag.load()
    };
    if mode != AWAKE {
        counter.wake();
    }
    mode
}
