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
//! # One wake per sleep
//!
//! The flag's low bits say how the sleeper sleeps (`SLEEP_MODE`); the bits
//! above hold the counter value it sleeps on (its low 30 bits): S1 stores
//! the value loaded just before, and the sleeper sleeps only if S2 loads
//! the same (`Waiter::prepare`). So the waker knows what would end the
//! sleep, and wakes each sleep once:
//!
//! - a sleep on the value our counter holds now waits for our *next*
//!   store, which will wake it: no wake now;
//! - once we have woken a sleep after storing another value, it ends: the
//!   sleeper is woken, or its `FUTEX_WAIT` finds the counter changed and
//!   returns at once. A second wake of the same flag value is skipped (the
//!   same value can only come back once the counter returns to it, 2^30
//!   steps on; a wake skipped then costs one wait slice, not a hang).
//!
//! Without it, a sender that announced a sleep on a full ring and was
//! woken cost the receiver a system call on *every* release until the
//! scheduler ran it and it withdrew: 150 000 wakes in a 2-million-message
//! stream, whose throughput halved in some runs. A wake that must reach a
//! sleeper whatever (the close) passes no `woken` and always wakes. A take
//! stores `consumed`, which the sender's flag does not name, so its wake
//! tells one sleep from the next by the flag and the sender's `published`
//! (`Link::wake_sender_after_take`; the Release fence in [`announce`] is
//! for it). loom found the first version of this wrong (it assumed the
//! woken store came after the sleeper's load).
//!
//! `model.rs` checks this exhaustively with loom, running this code, the
//! waiter's and the rings', and shows that each broken variant in
//! `fault.rs` is caught.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::fault::{self, Fault};
use crate::layout::{AWAKE, SLEEP_MODE};
use crate::word::{Mine, Theirs, Word};

/// The sleeper's half of the handshake: stores `mode` in our `flag`, then
/// re-checks the peer's `counter` (S1, F1, S2 above). Returns the value seen.
pub(crate) fn announce<W: Word>(flag: Mine<'_, W>, mode: u32, counter: Theirs<'_, W>) -> u32 {
    debug_assert!(mode != AWAKE && mode & !SLEEP_MODE == 0);
    // What the sleep will wait on, for the waker (module notes); the
    // caller sleeps only if the load below finds the same.
    let expected = counter.load();
    // Release: what this end published before is visible to a waker that
    // reads the announcement and fences Acquire (`Link::wake_sender_after_take`
    // tells one sleep from the next by it).
    W::fence(Ordering::Release);
    flag.store(expected.wrapping_shl(2) | mode, Ordering::Relaxed);
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

/// Whether `flag` (as [`announce`] stored it) announces a sleep on the
/// counter value `seen`: the sleeper may sleep only then (module notes).
pub(crate) fn announced_for(flag: u32, seen: u32) -> bool {
    flag >> 2 == seen & (u32::MAX >> 2)
}

/// How the owner of `flag` (a value of `rx_sleeping` or `tx_sleeping`)
/// sleeps: [`AWAKE`] or a sleeping mode.
pub(crate) fn sleep_mode(flag: u32) -> u32 {
    flag & SLEEP_MODE
}

/// The waker's half: `store` our `counter` (W1), then check whether the
/// peer announced a sleep in `peer_flag` and wake it (F2, W2, W3). Returns
/// how the peer sleeps, so that the caller can also ring the doorbell for a
/// peer that sleeps on the socket; [`AWAKE`] when it is awake, or when
/// `woken` (the flag value this waker last woke) shows this sleep was woken
/// already (module notes). `woken` is `None` for a wake that must happen
/// whatever came before (a close) or that stores nothing.
pub(crate) fn wake_peer<W: Word>(
    store: impl FnOnce(),
    counter: Mine<'_, W>,
    peer_flag: Theirs<'_, W>,
    woken: Option<&AtomicU32>,
) -> u32 {
    let flag = if fault::active(Fault::WakerChecksFirst) {
        let flag = peer_flag.load();
        store();
        flag
    } else {
        store();
        // SeqCst: F2, the waker's half of the pair (module notes).
        W::fence(Ordering::SeqCst);
        peer_flag.load()
    };
    let mode = sleep_mode(flag);
    if mode == AWAKE {
        return AWAKE;
    }
    if let Some(woken) = woken {
        // Our own counter: what `store` just stored.
        if announced_for(flag, counter.load(Ordering::Relaxed)) {
            return AWAKE; // it waits for our next store
        }
        // Relaxed: only this thread wakes this flag (module notes).
        if woken.swap(flag, Ordering::Relaxed) == flag {
            return AWAKE; // woken already
        }
    }
    counter.wake();
    mode
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SLEEPING_ON_FUTEX;

    #[test]
    fn each_sleep_is_woken_once() {
        let (flag, counter) = (AtomicU32::new(0), AtomicU32::new(7));
        let woken = AtomicU32::new(0);
        let wake = |step: u32| {
            wake_peer(
                || {
                    counter.fetch_add(step, Ordering::Relaxed);
                },
                Mine::new(&counter),
                Theirs::new(&flag),
                Some(&woken),
            )
        };
        assert_eq!(wake(0), AWAKE, "nobody sleeps");
        let seen = announce(Mine::new(&flag), SLEEPING_ON_FUTEX, Theirs::new(&counter));
        let f = flag.load(Ordering::Relaxed);
        assert!(announced_for(f, seen) && sleep_mode(f) == SLEEPING_ON_FUTEX);
        assert_eq!(
            wake(0),
            AWAKE,
            "a sleep on the value stored waits for the next"
        );
        assert_eq!(wake(1), SLEEPING_ON_FUTEX, "the next store wakes it");
        assert_eq!(wake(1), AWAKE, "and only once");
        withdraw(Mine::new(&flag));
        assert_eq!(sleep_mode(flag.load(Ordering::Relaxed)), AWAKE);
        let again = announce(Mine::new(&flag), SLEEPING_ON_FUTEX, Theirs::new(&counter));
        assert_eq!(again, seen + 2);
        assert_eq!(wake(1), SLEEPING_ON_FUTEX, "a new sleep is woken");
        // A wake that must happen whatever came before.
        let always = wake_peer(|| {}, Mine::new(&counter), Theirs::new(&flag), None);
        assert_eq!(always, SLEEPING_ON_FUTEX);
    }
}
