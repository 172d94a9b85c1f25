//! How long a wait spins before it sleeps, adapted to what spinning buys.
//!
//! Spinning answers in well under a microsecond when the peer is running on
//! another core, and wastes a core when it is not: on a 2-core machine with
//! more busy processes than cores, a spinning waiter steals the very CPU its
//! peer needs. So the budget adapts: a wait that ends during the spin doubles
//! it (up to `Options::spin`), a wait that has to sleep halves it (down to
//! zero). At zero, a wait still spins [`FLOOR`] (a sleep costs more), one
//! wait in [`PROBE_EVERY`] spins the full budget, and a probe that pays
//! restores it, so the budget comes back once spinning pays again. While spinning, a waiter past the first [`FLOOR`] yields the
//! CPU each round, so an overloaded machine loses little to it.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The shortest spin worth trying: a round trip between two cores here is
/// about a microsecond.
const FLOOR: Duration = Duration::from_micros(2);

/// At a zero budget, one wait in this many probes with the full budget.
const PROBE_EVERY: u32 = 16;

/// How long a spin looks without pausing between looks, from its start.
/// A pause (`spin_loop`: x86's `pause`, up to ~140 cycles) in progress
/// when the awaited line lands holds the waiter back for the rest of it,
/// and the answer to a small request lands a few hundred nanoseconds after
/// the request left: a 64-byte round trip took 3-4% less with no pauses
/// for its first microsecond. Past this, the pauses spare a hyperthread
/// sibling (which may be the peer) and the power budget.
const EAGER: Duration = Duration::from_micros(1);

/// One direction's spin budget (a receiver's, or a blocked sender's).
#[derive(Debug)]
pub(crate) struct SpinBudget {
    max: Duration,
    current: Cell<Duration>,
    waits_at_zero: Cell<u32>,
}

impl SpinBudget {
    /// A budget that starts at, and never exceeds, `max`.
    pub(crate) fn new(max: Duration) -> SpinBudget {
        SpinBudget {
            max,
            current: Cell::new(max),
            waits_at_zero: Cell::new(0),
        }
    }

    /// Takes the spin budget for a new wait (counting it towards the next
    /// probe while the budget is zero).
    pub(crate) fn take_budget(&self) -> Duration {
        let current = self.current.get();
        if !current.is_zero() || self.max.is_zero() {
            return current;
        }
        let n = self.waits_at_zero.get().wrapping_add(1);
        self.waits_at_zero.set(n);
        if n % PROBE_EVERY == 0 {
            // A probe with the full budget: a wait that needs it (say, a
            // peer that takes 20 us to answer) must be able to win it back.
            self.max
        } else {
            Duration::ZERO
        }
    }

    /// The wait ended while spinning: spinning pays. (After a successful
    /// probe from zero, that means the full budget again.)
    pub(crate) fn paid(&self) {
        let current = self.current.get();
        let grown = if current.is_zero() {
            self.max
        } else {
            current.saturating_mul(2).max(FLOOR)
        };
        self.current.set(grown.min(self.max));
    }

    /// The wait had to sleep: spinning did not pay.
    pub(crate) fn wasted(&self) {
        let halved = self.current.get() / 2;
        // Below the floor a spin catches nothing: go to zero.
        self.current.set(if halved < FLOOR {
            Duration::ZERO
        } else {
            halved
        });
    }

    /// Spins until `ready` or the budget runs out, and adapts the budget.
    ///
    /// The first [`FLOOR`] is a pure spin (the fast path of a ping-pong
    /// between two cores), its first [`EAGER`] without pauses. After that
    /// each round also offers the CPU to another runnable thread
    /// (`sched_yield`): with more busy processes than cores, the peer that
    /// would answer may be waiting for this very core; with idle cores the
    /// yield returns at once.
    pub(crate) fn spin(&self, mut ready: impl FnMut() -> bool) -> bool {
        let budget = self.take_budget();
        if budget.is_zero() {
            // Even at zero, a wait spins the floor before it sleeps (unless
            // spinning is off): a sleep and its wake cost both ends several
            // microseconds and a system call each, and a stream whose
            // receiver slept at every gap ran at half its speed.
            if self.max.is_zero() {
                return ready();
            }
            return spin_for(FLOOR, EAGER, &mut ready) || ready();
        }
        let start = Instant::now();
        let mut ok = spin_for(FLOOR.min(budget), EAGER, &mut ready);
        while !ok && start.elapsed() < budget {
            crate::sys::sched_yield();
            ok = spin_for(Duration::ZERO, Duration::ZERO, &mut ready); // one round
        }
        let ok = ok || ready();
        if ok {
            self.paid();
        } else {
            self.wasted();
        }
        ok
    }
}

/// Spins on `ready` for at most `span` (at least one round of 64 checks),
/// without yielding, pausing between checks once `eager` has passed.
/// Whether it became ready.
fn spin_for(span: Duration, eager: Duration, ready: &mut impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = eager.is_zero();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            if pause {
                std::hint::spin_loop();
            }
        }
        let spun = start.elapsed();
        if spun >= span {
            return false;
        }
        pause = spun >= eager;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_to_zero_and_probes_back() {
        let b = SpinBudget::new(Duration::from_micros(50));
        assert_eq!(b.take_budget(), Duration::from_micros(50));
        for _ in 0..10 {
            b.wasted();
        }
        assert_eq!(b.current.get(), Duration::ZERO);
        let probes: Vec<Duration> = (0..PROBE_EVERY * 4)
            .map(|_| b.take_budget())
            .filter(|d| !d.is_zero())
            .collect();
        assert_eq!(
            probes,
            vec![Duration::from_micros(50); 4],
            "one full probe in {PROBE_EVERY}"
        );
        b.paid();
        assert_eq!(
            b.take_budget(),
            Duration::from_micros(50),
            "a paying probe restores the budget"
        );
        b.wasted();
        assert_eq!(b.take_budget(), Duration::from_micros(25));
        for _ in 0..10 {
            b.paid();
        }
        assert_eq!(
            b.take_budget(),
            Duration::from_micros(50),
            "never above the maximum"
        );
    }

    #[test]
    fn a_zero_budget_still_spins_the_floor() {
        let b = SpinBudget::new(Duration::from_micros(50));
        for _ in 0..10 {
            b.wasted();
        }
        assert_eq!(b.current.get(), Duration::ZERO);
        let mut calls = 0;
        assert!(
            b.spin(|| {
                calls += 1;
                calls == 3
            }),
            "caught within the floor"
        );
        assert!(calls >= 3);
    }

    #[test]
    fn zero_maximum_never_spins() {
        let b = SpinBudget::new(Duration::ZERO);
        b.paid();
        assert!((0..100).all(|_| b.take_budget().is_zero()));
        assert!(!b.spin(|| false));
        assert!(b.spin(|| true));
    }

    #[test]
    fn spin_reports_readiness() {
        let b = SpinBudget::new(Duration::from_micros(20));
        let mut calls = 0;
        assert!(b.spin(|| {
            calls += 1;
            calls == 10
        }));
        assert!(!b.spin(|| false));
        assert_eq!(b.current.get(), Duration::from_micros(10));
    }
}
