//! Waiting for the peer, in both directions and in `wait_any`: one
//! [`Waiter`] spins briefly (an adaptive budget, `spin.rs`), announces the
//! sleep and re-checks (`wake.rs`, where the argument why no wake is lost
//! lives), and sleeps on the peer's counter, one slice at a time.
//!
//! # The peer's death and close
//!
//! A futex cannot see a dead process, so every sleep lasts at most
//! `Options::wait_slice`. After a slice that brought nothing, the waiter
//! polls the socket: a peer that died (even by `SIGKILL`) has had its end of
//! the socket closed by the kernel, which shows as hang-up. A peer that
//! closes cleanly sets `closed` (after its last publish) and wakes every
//! word. Waiters sleep on their counter *and* on the peer's `closed` word
//! (`futex_waitv`, Linux 5.16), so a close that lands between a waiter's
//! check and its sleep changes a word it sleeps on and cannot be slept
//! through. A sender that found the descriptor ring full sleeps on the
//! peer's `consumed` as well ([`Condition::also`]): the peer's take, not
//! only its release, ends that wait. Without `futex_waitv` the waiter
//! sleeps on the counter alone, and such a close (or take) is seen when
//! the slice ends.

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::error::{Failure, Halt};
use crate::fault::{self, Fault};
use crate::layout::{SLEEPING_ON_FUTEX, SLEEPING_ON_SOCKET};
use crate::link::Link;
use crate::spin::SpinBudget;
use crate::wake::{self, announce, withdraw};
use crate::word::{Mine, Theirs, Word};

/// What one direction waits for.
pub(crate) trait Condition<W: Word> {
    /// Our flag that announces the sleep.
    fn flag(&self) -> Mine<'_, W>;
    /// The peer's counter to sleep on.
    fn counter(&self) -> Theirs<'_, W>;
    /// Whether the counter holding `seen` means there is nothing new.
    fn idle(&self, seen: u32) -> bool;
    /// The cheap check to spin on: something may be there.
    fn ready(&self) -> bool;
    /// A second peer word whose change also ends the wait, with the value
    /// it held when the wait began (slept on too, where the kernel can).
    fn also(&self) -> Option<(Theirs<'_, W>, u32)> {
        None
    }
}

/// What [`Receiver::arm`](crate::Receiver::arm) or [`Sender::arm`](crate::Sender::arm) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Something is there already (a message, a release, the end of the
    /// channel): go ahead without waiting. Nothing is armed.
    Ready,
    /// Armed: the channel's descriptor (`AsFd`) becomes readable when the
    /// peer publishes (for a receiver) or releases (for a sender), or
    /// closes, or dies. Wait for that in your event loop, then `disarm`.
    Armed,
    /// A [stream channel](crate::Transport::Stream)'s sender whose socket
    /// is full: wait for the descriptor to become *writable* (or hung up),
    /// then send again. Nothing is armed, so there is nothing to disarm.
    Writable,
}

/// Sleeps while `counter` holds `seen`, `also` (if any) its value, and the
/// peer has not closed, for at most `slice`: on every word where the kernel
/// can. Where it cannot, on one word: `also` if there is one, else the
/// counter (then a change of the other, or a close, is seen when the slice
/// ends).
///
/// `also` first, because it is the word that must move: a sender's
/// `also` is the peer's `consumed`, given only when the descriptor ring was
/// full, and then only a take makes room (a release does not). A message
/// carried in its descriptor is taken and never released, so a sender
/// asleep on `released` alone would wait out every slice of a full ring.
fn sleep<W: Word>(
    counter: &W,
    seen: u32,
    also: Option<(&W, u32)>,
    closed: &W,
    slice: Duration,
) -> io::Result<()> {
    let (one, one_seen) = also.unwrap_or((counter, seen));
    if fault::active(Fault::SleepOnCounterOnly) {
        return one.wait(one_seen, slice);
    }
    let many = [(counter, seen), (closed, 0), also.unwrap_or((closed, 0))];
    let words = if also.is_some() {
        &many[..]
    } else {
        &many[..2]
    };
    match W::wait_many(words, slice) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => one.wait(one_seen, slice),
        other => other,
    }
}

/// One direction's way of waiting: its spin budget, how long one sleep may
/// last, and when it last looked for a dead peer without sleeping.
#[derive(Debug)]
pub(crate) struct Waiter {
    spin: SpinBudget,
    slice: Duration,
    last_poll: Cell<Option<Instant>>,
    /// Waits that slept in the kernel.
    sleeps: Cell<u64>,
}

impl Waiter {
    pub(crate) fn new(spin: Duration, slice: Duration) -> Waiter {
        Waiter {
            spin: SpinBudget::new(spin),
            slice,
            last_poll: Cell::new(None),
            sleeps: Cell::new(0),
        }
    }

    /// Waits that slept in the kernel so far.
    pub(crate) fn sleeps(&self) -> u64 {
        self.sleeps.get()
    }

    /// The longest single sleep.
    pub(crate) fn slice(&self) -> Duration {
        self.slice
    }

    /// Spins until `ready`, within this direction's adaptive budget.
    pub(crate) fn spin(&self, ready: impl FnMut() -> bool) -> bool {
        self.spin.spin(ready)
    }

    /// Waits until `cond` may be ready, the peer closes or dies, or one
    /// slice (or the deadline) passes. The caller re-checks and loops.
    ///
    /// # Errors
    ///
    /// `Expired` when the deadline had passed on entry; `Failed` when the
    /// kernel refused to sleep or the socket showed something wrong.
    pub(crate) fn wait<W: Word>(
        &self,
        link: &Link<W>,
        cond: &(impl Condition<W> + ?Sized),
        deadline: Deadline,
    ) -> Result<(), Halt> {
        // Before spinning too, so a peer that keeps changing the counter
        // cannot stretch a timeout.
        let slice = deadline.slice(self.slice).ok_or(Halt::Expired)?;
        if self.spin.spin(|| cond.ready()) {
            return Ok(());
        }
        let Some(seen) = self.prepare(link, cond, SLEEPING_ON_FUTEX) else {
            return Ok(());
        };
        let flag_early = fault::active(Fault::FlagClearedBeforeSleep);
        if flag_early {
            withdraw(cond.flag());
        }
        self.sleeps.set(self.sleeps.get() + 1);
        let also = cond.also().map(|(word, value)| (word.futex(), value));
        let slept = sleep(
            cond.counter().futex(),
            seen,
            also,
            link.peer_closed_word(),
            slice,
        );
        if !flag_early {
            withdraw(cond.flag());
        }
        slept.map_err(|e| link.fail(Failure::Io(e)))?;
        if !cond.ready() && cond.counter().load() == seen {
            // Nothing new for a whole slice: make sure the peer still
            // exists (its death shows as hang-up; the caller then sees it).
            link.poll_peer()?;
        }
        Ok(())
    }

    /// Arms readiness for an event loop: announces a sleep on the socket
    /// and re-checks (see `Receiver::arm`).
    pub(crate) fn arm<W: Word>(
        &self,
        link: &Link<W>,
        cond: &(impl Condition<W> + ?Sized),
    ) -> Readiness {
        match self.prepare(link, cond, SLEEPING_ON_SOCKET) {
            Some(_) => Readiness::Armed,
            None => Readiness::Ready,
        }
    }

    /// Announces the sleep in `mode` (an `rx_sleeping` or `tx_sleeping`
    /// value) and re-checks. Returns the counter value to sleep on, or
    /// `None` (announcement withdrawn) when something is there after all.
    pub(crate) fn prepare<W: Word>(
        &self,
        link: &Link<W>,
        cond: &(impl Condition<W> + ?Sized),
        mode: u32,
    ) -> Option<u32> {
        if fault::active(Fault::NoRecheck) {
            let before = cond.counter().load();
            cond.flag().store(mode, Ordering::Relaxed);
            return Some(before);
        }
        let seen = announce(cond.flag(), mode, cond.counter());
        // Only a sleep on the value announced (`wake.rs`): a counter that
        // moved meanwhile means something new anyway.
        if wake::announced_for(cond.flag().load(Ordering::Relaxed), seen)
            && cond.idle(seen)
            && !cond.ready()
            && !link.peer_closed()
        {
            Some(seen)
        } else {
            withdraw(cond.flag());
            None
        }
    }

    /// For calls that do not wait: polls the socket for a dead peer if a
    /// slice has passed since the last such poll, so that `try_recv` in a
    /// loop notices a killed peer as fast as `recv` does, without a system
    /// call each time.
    ///
    /// # Errors
    ///
    /// As [`Link::poll_peer`].
    pub(crate) fn poll_peer_if_due<W: Word>(&self, link: &Link<W>) -> Result<(), Failure> {
        let now = Instant::now();
        match self.last_poll.get() {
            Some(t) if now.duration_since(t) < self.slice => Ok(()),
            _ => {
                self.last_poll.set(Some(now));
                link.poll_peer()
            }
        }
    }
}
