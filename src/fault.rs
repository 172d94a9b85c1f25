//! Deliberately broken variants of the protocol, switched on only by the
//! model checker (`model.rs`) to show that it catches each of them.
//!
//! Outside `cargo test` builds, [`active`] is the constant `false`, so
//! every switched branch compiles away.

/// One deliberate mistake in the protocol code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Fault {
    /// The sleeper announces its sleep and loads the counter without the
    /// `SeqCst` fence between: its re-check is not ordered after the
    /// announcement (`wait::announce`).
    RecheckNotOrdered,
    /// The sleeper does not re-check after announcing: it sleeps on the
    /// counter value it read before (`wait::Waiter::prepare`).
    NoRecheck,
    /// The waker loads the sleeper's flag before it stores its counter
    /// (`wait::wake_peer`).
    WakerChecksFirst,
    /// The sleeper clears its flag before it sleeps, not after.
    FlagClearedBeforeSleep,
    /// The producer stores `published` before the descriptor's tag
    /// (`ring::DescriptorProducer::publish`).
    CounterBeforeTag,
    /// The sleeper waits on one word (its counter, or the word that must
    /// move), not on the peer's `closed` too: what happens where
    /// `futex_waitv` is missing (`wait::sleep`).
    SleepOnCounterOnly,
    /// The receiver's take of a carried message does not wake the sender,
    /// as a take while holding nothing does not (`recv::count_carried`):
    /// but no release follows a carried message.
    CarriedTakeWakesNoOne,
    /// The take's wake tells one sleep of the sender from the next by its
    /// flag alone, not by the peer's `published` too
    /// (`Link::wake_sender_after_take`): a ring kept full by carried
    /// messages sleeps on the same flag value every time.
    TakeWakeKnowsFlagOnly,
}

#[cfg(test)]
thread_local! {
    static ACTIVE: std::cell::Cell<Option<Fault>> = const { std::cell::Cell::new(None) };
}

/// Whether `fault` is switched on (only ever in tests).
#[inline(always)]
pub(crate) fn active(fault: Fault) -> bool {
    #[cfg(test)]
    {
        ACTIVE.with(|a| a.get() == Some(fault))
    }
    #[cfg(not(test))]
    {
        let _ = fault;
        false
    }
}

/// Runs `f` with `fault` switched on for this thread (loom runs a model's
/// threads on the thread that calls it).
#[cfg(test)]
pub(crate) fn with<T>(fault: Option<Fault>, f: impl FnOnce() -> T) -> T {
    let before = ACTIVE.with(|a| a.replace(fault));
    let out = f();
    ACTIVE.with(|a| a.set(before));
    out
}
