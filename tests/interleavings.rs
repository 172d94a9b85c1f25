//! An exhaustive interleaving check of the wait/wake protocol (the module
//! notes of `src/channel.rs`, "Waiting, and why no wake is lost").
//!
//! loom is not available offline, so this is a small explicit-state model
//! checker, written for this protocol and nothing else.
//!
//! # The model
//!
//! Two ends run side by side. The *sending end* publishes messages and, when
//! its ring is full, waits for releases (`publish`, `wait_for_release`); the
//! *receiving end* receives them and releases them (`recv_until`, `take`,
//! `wait_for_message`, `release`). Either may close (`close_shared`). Each end
//! is a state machine whose steps ([`RxStep`], [`TxStep`]) are the protocol's
//! accesses to shared memory and its futex calls, one atomic step each; the
//! private bookkeeping between two accesses is folded into the step before.
//! [`RxStep::source`] and [`TxStep::source`] map every step to its line
//! (line numbers of commit 84f4259; the quoted code is what to search for
//! when they drift).
//!
//! The shared words ([`Shared`]) are sequentially consistent: every step
//! reads the latest value. That is exact for the Dekker pairs, whose four
//! accesses are `SeqCst` in the code, and for the kernel's futex compare.
//! The other loads in the wait paths are `Relaxed` or `Acquire` hints (the
//! descriptor tag, the released counter while spinning, `closed` before a
//! wait); with `stale_hints` the model lets each of them also return an older
//! value, as far as coherence (never older than this end already saw) and
//! happens-before (never older than an `Acquire` that synchronised) allow.
//! That only adds executions. The `Relaxed` clears of the sleeping flags are
//! modelled as taking effect in program order.
//!
//! `FUTEX_WAIT(word, seen)` is one atomic step: the kernel compares the word
//! with `seen` and queues the caller in one go, so a wake is either before
//! the compare (and the word has changed, since every waker stores before it
//! wakes) or finds the caller queued. `FUTEX_WAKE` is one step that moves a
//! queued sleeper on. A sleep has no time limit unless `slices` is set: then a
//! sleeper's slice (`Options::wait_slice`) may end, but only when nothing
//! else can happen, which is the worst case for how long a lost wake costs.
//!
//! # What is checked
//!
//! A depth-first search visits every interleaving of the two ends' steps
//! (states are memoised, and the number of complete interleavings is counted
//! exactly over the state graph). It reports a *lost wake* when an end sleeps
//! in `FUTEX_WAIT`, nothing else can run, and it has a reason to be awake: a
//! message it can take, a release it waits for, or the peer's close. It also
//! checks that every execution ends with the expected outcome (every message
//! received in order, `Disconnected` exactly when due) and no protocol error,
//! and it fails on a cycle (an end that could spin forever without progress).
//!
//! # Findings
//!
//! - No wake for a message or a release is lost, in any interleaving, also
//!   when `published` trails `consumed` by one.
//! - With `FUTEX_WAIT` on the counter alone, the wake that `close_shared`
//!   sends could be lost: a sleeper that loaded `closed == 0` and had not yet
//!   entered `FUTEX_WAIT` missed the wake, and `closed` was not a futex word,
//!   so the kernel's compare did not catch the change; the sleeper then slept
//!   a whole slice. This model found it; the code now sleeps on the counter
//!   and on `closed` at once ([`Sleep::OnCounterAndClosed`], `futex_waitv`),
//!   which loses no wake. Kernels without `futex_waitv` keep the old
//!   behaviour, bounded by one slice:
//!   [`without_futex_waitv_a_close_can_lose_its_wake_for_one_slice`].
//! - The sleeper's half of each Dekker pair is its flag store against the
//!   kernel's compare in `FUTEX_WAIT`, not against its own load of the
//!   counter: swapping the store and the load loses nothing (the load only
//!   supplies `seen`), while clearing the flag before `FUTEX_WAIT` does.
//! - `take`'s `Acquire` on the descriptor tag is what keeps `published`
//!   within one of `consumed`: with a `Relaxed` load an honest peer can
//!   trip `PublishedOutOfRange`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

// ============================================================================
// The protocol, as written and in variants
// ============================================================================

/// How a sleeper announces itself and re-checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sleeper {
    /// As written: store the sleeping flag, then load the counter; clear the
    /// flag after `FUTEX_WAIT`.
    FlagThenLoad,
    /// Swapped: load the counter, then store the flag. Harmless, as the
    /// checker shows: `FUTEX_WAIT` compares the very counter that was
    /// loaded, so the flag only has to be stored before that compare.
    LoadThenFlag,
    /// Broken on purpose: clear the flag before `FUTEX_WAIT`, not after.
    ClearsFlagBeforeSleeping,
}

/// How a waker (a publish, or a release) decides to wake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waker {
    /// As written: store the counter, then load the peer's flag; wake if set.
    StoreThenCheck,
    /// Broken on purpose: load the flag before storing the counter.
    CheckThenStore,
    /// Broken on purpose: never look at the flag, never wake.
    NeverWakes,
}

/// One Dekker handshake: a sleeper and its waker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Handshake {
    sleeper: Sleeper,
    waker: Waker,
}

impl Handshake {
    const AS_WRITTEN: Handshake = Handshake {
        sleeper: Sleeper::FlagThenLoad,
        waker: Waker::StoreThenCheck,
    };
}

/// What the kernel compares before a sleeper goes to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sleep {
    /// The fallback without `futex_waitv`: `FUTEX_WAIT` on the counter alone.
    OnCounter,
    /// As written (`futex_wait_either`): `futex_waitv` on the counter (expected `seen`) and
    /// on the peer's `closed` (expected 0), modelled as one compare of both
    /// words. The kernel queues the waiter on each word in turn, comparing
    /// as it goes, and a wake of any word it is queued on ends the wait; that
    /// is the same as one compare provided `close_shared` wakes `closed`
    /// too, after storing it (a close between the two compares then either
    /// shows in the second compare or wakes the first queue).
    OnCounterAndClosed,
}

/// The protocol to check.
#[derive(Clone, Copy, Debug)]
struct Protocol {
    /// `rx_sleeping` and `published`: the receiving end waits for messages.
    messages: Handshake,
    /// `tx_sleeping` and `released`: the sending end waits for space.
    releases: Handshake,
    sleep: Sleep,
    /// `take` loads the tag with `Acquire` (receiver.rs:195), as written.
    /// `false` is broken on purpose: a `Relaxed` load.
    acquire_tag: bool,
    /// Let the `Relaxed`/`Acquire` hint loads return older values.
    stale_hints: bool,
    /// Let a sleeper's slice end when nothing else can happen.
    slices: bool,
}

impl Protocol {
    /// The protocol as the code has it (on a kernel with `futex_waitv`).
    const AS_WRITTEN: Protocol = Protocol {
        messages: Handshake::AS_WRITTEN,
        releases: Handshake::AS_WRITTEN,
        sleep: Sleep::OnCounterAndClosed,
        acquire_tag: true,
        stale_hints: true,
        slices: false,
    };

    /// The code's fallback on kernels without `futex_waitv` (before 5.16):
    /// `FUTEX_WAIT` on the counter alone.
    const WITHOUT_FUTEX_WAITV: Protocol = Protocol {
        sleep: Sleep::OnCounter,
        ..Protocol::AS_WRITTEN
    };
}

/// What the two ends do.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    /// The most messages in flight (`TxBook::max_in_flight`).
    ring: u32,
    /// Messages the sending end sends.
    messages: u32,
    /// The sending end closes after its sends.
    sender_closes: bool,
    /// `recv` calls the receiving end makes. One more than `messages` (with
    /// `sender_closes`) expects `Disconnected`.
    recvs: u32,
    /// The receiving end drops each message as soon as it has it.
    releases: bool,
    /// The receiving end closes after its `recv` calls.
    receiver_closes: bool,
}

impl Scenario {
    /// `messages` published against as many `recv`s; nobody closes.
    fn publishes(messages: u32) -> Scenario {
        Scenario {
            ring: messages.max(1),
            messages,
            sender_closes: false,
            recvs: messages,
            releases: false,
            receiver_closes: false,
        }
    }

    /// Checks that, with no wake lost, both ends can finish: no end waits for
    /// something its peer never does.
    fn assert_finishes(self) {
        assert!(self.recvs <= self.messages + 1);
        assert!(self.recvs <= self.messages || self.sender_closes);
        assert!(self.releases || self.receiver_closes || self.messages <= self.ring);
        assert!(!self.receiver_closes || self.recvs <= self.messages);
    }
}

// ============================================================================
// The steps, mapped to the code
// ============================================================================

/// The receiving end's next step: `recv_until` (channel.rs:490-508), `take`
/// (receiver.rs:185-222), `wait_for_message` (channel.rs:527-560),
/// `release` (receiver.rs:226-241) and `close_shared` (channel.rs:705-712).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum RxStep {
    /// Is the tag of message `consumed` there? Then take it. `after_closed`:
    /// the second `take` of channel.rs:498, after `closed` was seen.
    TakeLoadTag {
        after_closed: bool,
    },
    /// No tag: `available` loads `published` (skipped when the cached
    /// counter already says the message is there).
    TakeLoadPublished {
        after_closed: bool,
    },
    /// `published` says the message is there: its tag must be.
    TakeReloadTag {
        after_closed: bool,
    },
    /// `take` found nothing: has the peer closed?
    LoadClosedBeforeWait,
    /// `wait_for_message` spins on the tag first. One load stands for the
    /// whole spin: more loads only add chances to see the tag.
    SpinLoadTag,
    /// The sleeper's announcement.
    SetFlag,
    /// The sleeper's re-check, after the announcement.
    LoadPublished,
    /// `idle && !ready()`.
    ReadyLoadTag,
    /// `&& closed == 0`.
    LoadClosed,
    /// Only with [`Sleeper::ClearsFlagBeforeSleeping`].
    ClearFlagEarly,
    /// Compare `published` with `seen` and sleep, atomically.
    FutexWait,
    /// Queued in `FUTEX_WAIT` on the sending end's `published`.
    Asleep,
    /// Clear the flag; `wait_for_message` returns and `recv_until` loops.
    /// (channel.rs:554 loads again only to decide whether to poll the
    /// socket: nothing to model.)
    ClearFlag,
    /// The received message drops: `release`.
    StoreReleased,
    LoadTxSleeping,
    WakeReleased,
    /// The receiving end drops: `close_shared`.
    StoreClosed,
    WakeOwnPublished,
    WakeOwnReleased,
    Done,
}

impl RxStep {
    /// Where the step is in the code (commit 84f4259).
    fn source(self) -> &'static str {
        match self {
            RxStep::TakeLoadTag { .. } => "receiver.rs:195 take: entry.seq.load(Acquire) == tag",
            RxStep::TakeLoadPublished { .. } => {
                "receiver.rs:153 take > available: published.load(Acquire)"
            }
            RxStep::TakeReloadTag { .. } => "receiver.rs:201 take: entry.seq.load(Relaxed) == tag",
            RxStep::LoadClosedBeforeWait => {
                "channel.rs:496  recv_until: peer_closed(): closed.load(Acquire)"
            }
            RxStep::SpinLoadTag => "channel.rs:537  spin(ready): entry.seq.load(Relaxed) == tag",
            RxStep::SetFlag => "channel.rs:542  rx_sleeping.store(1, SeqCst)",
            RxStep::LoadPublished => "channel.rs:543  seen = published.load(SeqCst)",
            RxStep::ReadyLoadTag => "channel.rs:548  idle && !ready(): entry.seq.load(Relaxed)",
            RxStep::LoadClosed => "channel.rs:548  && closed.load(SeqCst) == 0",
            RxStep::ClearFlagEarly => "(broken) rx_sleeping.store(0) before futex_wait",
            RxStep::FutexWait => "channel.rs:550  futex_wait(published, seen)",
            RxStep::Asleep => "asleep on published",
            RxStep::ClearFlag => "channel.rs:553  rx_sleeping.store(0, Relaxed)",
            RxStep::StoreReleased => "receiver.rs:237 release: released.store(n + 1, SeqCst)",
            RxStep::LoadTxSleeping => "receiver.rs:238 release: tx_sleeping.load(SeqCst)",
            RxStep::WakeReleased => "receiver.rs:239 release: futex_wake(released)",
            RxStep::StoreClosed => "channel.rs:709  close_shared: closed.store(1, SeqCst)",
            RxStep::WakeOwnPublished => "channel.rs:710  close_shared: futex_wake(published)",
            RxStep::WakeOwnReleased => "channel.rs:711  close_shared: futex_wake(released)",
            RxStep::Done => "done",
        }
    }
}

/// The sending end's next step: `publish` (channel.rs:408-447) with
/// `try_publish` (sender.rs:299-420) and `reclaim` (sender.rs:189-227),
/// `wait_for_release` (channel.rs:451-486) and `close_shared`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TxStep {
    /// `send` starts: has the peer closed?
    LoadClosedBeforeSend,
    /// A slot is free: the descriptor's tag, stored last in the entry.
    StoreTag,
    /// The waker's store.
    StorePublished,
    /// The waker's check of the peer's flag.
    LoadRxSleeping,
    WakePublished,
    /// No slot: read the peer's releases.
    ReclaimLoadReleased,
    /// `wait_for_release` spins on `released` first (one load for the spin).
    SpinLoadReleased,
    /// The sleeper's announcement.
    SetFlag,
    /// The sleeper's re-check.
    LoadReleased,
    /// `&& closed == 0`.
    LoadClosed,
    /// Only with [`Sleeper::ClearsFlagBeforeSleeping`].
    ClearFlagEarly,
    /// Compare `released` with `seen` and sleep, atomically.
    FutexWait,
    /// Queued in `FUTEX_WAIT` on the receiving end's `released`.
    Asleep,
    ClearFlag,
    /// After the wait: `released()`...
    AfterLoadReleased,
    /// ...else `peer_closed()`. (`peer_alive` polls the socket: not modelled.)
    AfterLoadClosed,
    /// The sending end drops: `close_shared`.
    StoreClosed,
    WakeOwnPublished,
    WakeOwnReleased,
    Done,
}

impl TxStep {
    /// Where the step is in the code (commit 84f4259).
    fn source(self) -> &'static str {
        match self {
            TxStep::LoadClosedBeforeSend => {
                "channel.rs:411  publish: peer_closed(): closed.load(Acquire)"
            }
            TxStep::StoreTag => "sender.rs:442   write_header: entry.seq.store(tag, Release)",
            TxStep::StorePublished => "sender.rs:415   try_publish: published.store(n + 1, SeqCst)",
            TxStep::LoadRxSleeping => "channel.rs:441  publish: rx_sleeping.load(SeqCst)",
            TxStep::WakePublished => "channel.rs:444  publish: futex_wake(published)",
            TxStep::ReclaimLoadReleased => "sender.rs:192   reclaim: released.load(Acquire)",
            TxStep::SpinLoadReleased => "channel.rs:466  spin(released): released.load(Relaxed)",
            TxStep::SetFlag => "channel.rs:471  tx_sleeping.store(1, SeqCst)",
            TxStep::LoadReleased => "channel.rs:472  released.load(SeqCst) == seen",
            TxStep::LoadClosed => "channel.rs:473  && closed.load(SeqCst) == 0",
            TxStep::ClearFlagEarly => "(broken) tx_sleeping.store(0) before futex_wait",
            TxStep::FutexWait => "channel.rs:475  futex_wait(released, seen)",
            TxStep::Asleep => "asleep on released",
            TxStep::ClearFlag => "channel.rs:478  tx_sleeping.store(0, Relaxed)",
            TxStep::AfterLoadReleased => "channel.rs:479  released(): released.load(Relaxed)",
            TxStep::AfterLoadClosed => "channel.rs:482  peer_closed(): closed.load(Acquire)",
            TxStep::StoreClosed => "channel.rs:709  close_shared: closed.store(1, SeqCst)",
            TxStep::WakeOwnPublished => "channel.rs:710  close_shared: futex_wake(published)",
            TxStep::WakeOwnReleased => "channel.rs:711  close_shared: futex_wake(released)",
            TxStep::Done => "done",
        }
    }
}

// ============================================================================
// The state
// ============================================================================

/// The shared words the protocol uses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Shared {
    // In the sending end's region.
    /// Messages whose descriptor tag is stored (tags are stored in order).
    tagged: u32,
    published: u32,
    tx_sleeping: bool,
    tx_closed: bool,
    // In the receiving end's region.
    released: u32,
    rx_sleeping: bool,
    rx_closed: bool,
}

/// The receiving end's private state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Receiver {
    next: RxStep,
    /// `RxBook::consumed`.
    consumed: u32,
    /// `RxBook::known_published`.
    known_published: u32,
    /// The largest `published` this end has read (coherence: no later load
    /// of it returns less).
    published_floor: u32,
    /// This end has read `closed == 1`.
    saw_closed: bool,
    /// This end has read the tag of message `consumed` (coherence: no later
    /// load of it returns the old tag).
    saw_tag: bool,
    /// `seen` of channel.rs:543.
    seen: u32,
    /// The flag as loaded before the store, for [`Waker::CheckThenStore`].
    flag_seen: bool,
    /// `recv` calls finished.
    recvs: u32,
    disconnected: bool,
    failed: Option<&'static str>,
}

/// The sending end's private state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Sender {
    next: TxStep,
    /// `TxBook::published`: messages published.
    sent: u32,
    /// `TxBook::reclaimed`.
    reclaimed: u32,
    /// The largest `released` this end has read.
    released_floor: u32,
    saw_closed: bool,
    /// `seen` of channel.rs:453: `reclaimed` when the wait began.
    seen: u32,
    /// What the sleeper's re-check loaded, for [`Sleeper::LoadThenFlag`].
    observed: u32,
    flag_seen: bool,
    disconnected: bool,
    failed: Option<&'static str>,
}

/// Everything: the explicit state the checker enumerates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    shared: Shared,
    rx: Receiver,
    tx: Sender,
}

impl State {
    fn initial(scenario: Scenario) -> State {
        State {
            shared: Shared {
                tagged: 0,
                published: 0,
                tx_sleeping: false,
                tx_closed: false,
                released: 0,
                rx_sleeping: false,
                rx_closed: false,
            },
            rx: Receiver {
                next: rx_next_recv(scenario, 0),
                consumed: 0,
                known_published: 0,
                published_floor: 0,
                saw_closed: false,
                saw_tag: false,
                seen: 0,
                flag_seen: false,
                recvs: 0,
                disconnected: false,
                failed: None,
            },
            tx: Sender {
                next: tx_next_send(scenario, 0),
                sent: 0,
                reclaimed: 0,
                released_floor: 0,
                saw_closed: false,
                seen: 0,
                observed: 0,
                flag_seen: false,
                disconnected: false,
                failed: None,
            },
        }
    }

    fn done(&self) -> bool {
        self.rx.next == RxStep::Done && self.tx.next == TxStep::Done
    }
}

// ============================================================================
// Transitions
// ============================================================================

/// Which end took a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum End {
    Receiver,
    Sender,
}

/// A step an end took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Rx(RxStep),
    Tx(TxStep),
    /// A sleeper's slice ended (only with `slices`).
    SliceEnds(End),
}

/// One step of an execution, and the value it read, if any.
#[derive(Clone, Copy, Debug)]
struct Event {
    step: Step,
    read: Option<u32>,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            Step::Rx(s) => write!(f, "receiving end  {}", s.source())?,
            Step::Tx(s) => write!(f, "sending end    {}", s.source())?,
            Step::SliceEnds(end) => write!(f, "{end:?}: the wait slice ends")?,
        }
        match self.read {
            Some(v) => write!(f, "  -> {v}"),
            None => Ok(()),
        }
    }
}

/// What the search counts as it goes, to show that the interesting cases
/// were reached (so a clean result is not a vacuous one).
#[derive(Debug, Default)]
struct Coverage {
    /// The receiving end went to sleep in `FUTEX_WAIT`...
    rx_sleeps: usize,
    /// ...and was woken by a `FUTEX_WAKE`.
    rx_woken: usize,
    tx_sleeps: usize,
    tx_woken: usize,
    /// A message was taken by its tag before `published` covered it.
    taken_before_published: usize,
    /// The sleeper's re-check loaded `published == consumed - 1`...
    trailing_rechecks: usize,
    /// ...and went to sleep on that value.
    trailing_sleeps: usize,
    /// A hint load returned an older value.
    stale_reads: usize,
    /// A slice had to end to move on.
    slices_ended: usize,
}

/// The search's results for one protocol and scenario.
#[derive(Debug, Default)]
struct Report {
    /// Distinct states visited.
    states: usize,
    /// Steps explored between them.
    transitions: usize,
    /// Complete interleavings (maximal executions), counted exactly.
    executions: u128,
    /// Each kind of problem found, with how many states show it and the
    /// first execution that reached one.
    findings: BTreeMap<Finding, (usize, Vec<Event>)>,
    coverage: Coverage,
}

/// Why a sleeper should be awake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Reason {
    /// A message it can take is there.
    Message,
    /// The release it waits for has happened.
    Release,
    /// The peer has closed.
    Close,
}

/// A problem the checker found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Finding {
    /// An end sleeps in `FUTEX_WAIT`, nothing else can run, and it has a
    /// reason to be awake.
    LostWake { sleeper: End, reason: Reason },
    /// An end sleeps and nothing will ever wake it, for good reason: the
    /// scenario makes it wait for something its peer never does.
    SleepsForNothing { sleeper: End },
    /// An honest run hit a protocol error.
    ProtocolError(End, &'static str),
    /// An execution ended with the wrong outcome.
    WrongOutcome(&'static str),
}

/// The receiving end's next step once a `recv` finished (or at the start).
fn rx_next_recv(scenario: Scenario, recvs: u32) -> RxStep {
    if recvs < scenario.recvs {
        RxStep::TakeLoadTag {
            after_closed: false,
        }
    } else if scenario.receiver_closes {
        RxStep::StoreClosed
    } else {
        RxStep::Done
    }
}

/// The sending end's next step once a `send` finished (or at the start).
fn tx_next_send(scenario: Scenario, sent: u32) -> TxStep {
    if sent < scenario.messages {
        TxStep::LoadClosedBeforeSend
    } else {
        tx_script_end(scenario)
    }
}

fn tx_script_end(scenario: Scenario) -> TxStep {
    if scenario.sender_closes {
        TxStep::StoreClosed
    } else {
        TxStep::Done
    }
}

/// Generates the successors of one state.
struct Stepper<'a> {
    protocol: Protocol,
    scenario: Scenario,
    coverage: &'a mut Coverage,
    out: Vec<(Event, State)>,
}

impl Stepper<'_> {
    fn push(&mut self, from: &State, step: Step, read: Option<u32>, f: impl FnOnce(&mut State)) {
        let mut next = from.clone();
        f(&mut next);
        self.out.push((Event { step, read }, next));
    }

    /// The values a load of a word may return: `current`, and with stale
    /// hints every value from `floor` (the least this end may still read)
    /// up. Counters only grow, one at a time, so each of these was stored.
    fn counter_reads(&mut self, floor: u32, current: u32, may_be_stale: bool) -> Vec<u32> {
        if may_be_stale && self.protocol.stale_hints && floor < current {
            self.coverage.stale_reads += usize::try_from(current - floor).unwrap_or(0);
            (floor..=current).rev().collect()
        } else {
            vec![current]
        }
    }

    /// The values a load of a flag that only goes 0 to 1 may return.
    fn flag_reads(&mut self, current: bool, already_seen: bool, may_be_stale: bool) -> Vec<bool> {
        if current && !already_seen && may_be_stale && self.protocol.stale_hints {
            self.coverage.stale_reads += 1;
            vec![true, false]
        } else {
            vec![current]
        }
    }

    /// What a load of the tag of message `consumed` may return: absent
    /// though it is stored, with stale hints, unless this end has read the
    /// tag before, or a `published` that covers the message, or `closed`
    /// (both stored after the tag; their loads synchronise).
    fn tag_reads(&mut self, s: &State) -> Vec<bool> {
        let present = s.shared.tagged > s.rx.consumed;
        let synchronised = s.rx.published_floor > s.rx.consumed || s.rx.saw_closed;
        self.flag_reads(present, s.rx.saw_tag, !synchronised)
    }

    /// The receiving end takes message `consumed` (receiver.rs:216-220) and
    /// `recv` returns it.
    fn take(&mut self, n: &mut State) {
        if n.shared.published <= n.rx.consumed {
            self.coverage.taken_before_published += 1;
        }
        if self.protocol.acquire_tag {
            // The sending end stored `published = consumed` (for the message
            // before) ahead of this tag, and the Acquire load of the tag
            // synchronises with its Release store: from now on this end reads
            // at least that. This is what bounds the trail to one message.
            n.rx.published_floor = n.rx.published_floor.max(n.rx.consumed);
        }
        n.rx.consumed += 1;
        n.rx.saw_tag = false;
        n.rx.recvs += 1;
        n.rx.next = if self.scenario.releases {
            match self.protocol.releases.waker {
                Waker::StoreThenCheck | Waker::NeverWakes => RxStep::StoreReleased,
                Waker::CheckThenStore => RxStep::LoadTxSleeping,
            }
        } else {
            rx_next_recv(self.scenario, n.rx.recvs)
        };
    }

    /// `take` found nothing (receiver.rs:197): the second `take` of
    /// channel.rs:498 makes `recv` return `Disconnected`; the first goes
    /// on to `peer_closed`.
    fn nothing_taken(&mut self, n: &mut State, after_closed: bool) {
        if after_closed {
            n.rx.disconnected = true;
            n.rx.recvs += 1;
            n.rx.next = rx_next_recv(self.scenario, self.scenario.recvs);
        } else {
            n.rx.next = RxStep::LoadClosedBeforeWait;
        }
    }

    /// The sleeper's decision after its re-check (channel.rs:547).
    fn rx_decide(n: &mut State) {
        let (seen, consumed) = (n.rx.seen, n.rx.consumed);
        let idle = seen == consumed || seen == consumed.wrapping_sub(1);
        n.rx.next = if idle {
            RxStep::ReadyLoadTag
        } else {
            RxStep::ClearFlag
        };
    }

    /// The step after `try_publish` (sender.rs:299): a slot is free, or
    /// `reclaim` runs.
    fn tx_try_publish(&self, n: &mut State) {
        let in_flight = n.tx.sent - n.tx.reclaimed;
        n.tx.next = if in_flight < self.scenario.ring {
            TxStep::StoreTag
        } else {
            TxStep::ReclaimLoadReleased
        };
    }

    fn tx_sent(&self, n: &mut State) {
        n.tx.next = tx_next_send(self.scenario, n.tx.sent);
    }

    fn tx_decide(n: &mut State) {
        n.tx.next = if n.tx.observed == n.tx.seen {
            TxStep::LoadClosed
        } else {
            TxStep::ClearFlag
        };
    }

    /// `FUTEX_WAKE` on the sending end's `published`.
    fn wake_receiver(&mut self, n: &mut State) {
        if n.rx.next == RxStep::Asleep {
            n.rx.next = RxStep::ClearFlag;
            self.coverage.rx_woken += 1;
        }
    }

    /// `FUTEX_WAKE` on the receiving end's `released`.
    fn wake_sender(&mut self, n: &mut State) {
        if n.tx.next == TxStep::Asleep {
            n.tx.next = TxStep::ClearFlag;
            self.coverage.tx_woken += 1;
        }
    }

    fn receiver(&mut self, s: &State) {
        let step = s.rx.next;
        let at = Step::Rx(step);
        let handshake = self.protocol.messages;
        match step {
            RxStep::TakeLoadTag { after_closed } => {
                for present in self.tag_reads(s) {
                    let mut n = s.clone();
                    if present {
                        self.take(&mut n);
                    } else {
                        // receiver.rs:147-150: the cached counter may answer.
                        let known = n.rx.known_published.wrapping_sub(n.rx.consumed);
                        n.rx.next = if known != 0 && known <= self.scenario.ring {
                            RxStep::TakeReloadTag { after_closed }
                        } else {
                            RxStep::TakeLoadPublished { after_closed }
                        };
                    }
                    self.push(&n, at, Some(u32::from(present)), |_| {});
                }
            }
            RxStep::TakeLoadPublished { after_closed } => {
                // Once `closed` was seen (Acquire or SeqCst, after the last
                // publish), `published` is final.
                let reads =
                    self.counter_reads(s.rx.published_floor, s.shared.published, !s.rx.saw_closed);
                for v in reads {
                    let mut n = s.clone();
                    n.rx.published_floor = n.rx.published_floor.max(v);
                    let available = v.wrapping_sub(n.rx.consumed);
                    if available == 0 || available == u32::MAX {
                        // receiver.rs:155-159: nothing, or one behind.
                        self.nothing_taken(&mut n, after_closed);
                    } else if available > self.scenario.ring {
                        n.rx.failed = Some("PublishedOutOfRange");
                        n.rx.next = RxStep::Done;
                    } else {
                        n.rx.known_published = v;
                        n.rx.next = RxStep::TakeReloadTag { after_closed };
                    }
                    self.push(&n, at, Some(v), |_| {});
                }
            }
            RxStep::TakeReloadTag { .. } => {
                let present = s.shared.tagged > s.rx.consumed;
                let mut n = s.clone();
                if present {
                    self.take(&mut n);
                } else {
                    n.rx.failed = Some("DescriptorSequence");
                    n.rx.next = RxStep::Done;
                }
                self.push(&n, at, Some(u32::from(present)), |_| {});
            }
            RxStep::LoadClosedBeforeWait => {
                for closed in self.flag_reads(s.shared.tx_closed, s.rx.saw_closed, true) {
                    self.push(s, at, Some(u32::from(closed)), |n| {
                        if closed {
                            n.rx.saw_closed = true;
                            n.rx.next = RxStep::TakeLoadTag { after_closed: true };
                        } else {
                            n.rx.next = RxStep::SpinLoadTag;
                        }
                    });
                }
            }
            RxStep::SpinLoadTag => {
                for present in self.tag_reads(s) {
                    self.push(s, at, Some(u32::from(present)), |n| {
                        n.rx.saw_tag |= present;
                        n.rx.next = match (present, handshake.sleeper) {
                            (true, _) => RxStep::TakeLoadTag {
                                after_closed: false,
                            },
                            (false, Sleeper::LoadThenFlag) => RxStep::LoadPublished,
                            (false, _) => RxStep::SetFlag,
                        };
                    });
                }
            }
            RxStep::SetFlag => self.push(s, at, None, |n| {
                n.shared.rx_sleeping = true;
                match handshake.sleeper {
                    Sleeper::LoadThenFlag => Self::rx_decide(n),
                    _ => n.rx.next = RxStep::LoadPublished,
                }
            }),
            RxStep::LoadPublished => {
                let v = s.shared.published;
                if s.rx.consumed > 0 && v == s.rx.consumed - 1 {
                    self.coverage.trailing_rechecks += 1;
                }
                self.push(s, at, Some(v), |n| {
                    n.rx.seen = v;
                    n.rx.published_floor = n.rx.published_floor.max(v);
                    match handshake.sleeper {
                        Sleeper::LoadThenFlag => n.rx.next = RxStep::SetFlag,
                        _ => Self::rx_decide(n),
                    }
                });
            }
            RxStep::ReadyLoadTag => {
                for present in self.tag_reads(s) {
                    self.push(s, at, Some(u32::from(present)), |n| {
                        n.rx.saw_tag |= present;
                        n.rx.next = if present {
                            RxStep::ClearFlag
                        } else {
                            RxStep::LoadClosed
                        };
                    });
                }
            }
            RxStep::LoadClosed => {
                let closed = s.shared.tx_closed;
                self.push(s, at, Some(u32::from(closed)), |n| {
                    n.rx.saw_closed |= closed;
                    n.rx.next = match handshake.sleeper {
                        _ if closed => RxStep::ClearFlag,
                        Sleeper::ClearsFlagBeforeSleeping => RxStep::ClearFlagEarly,
                        _ => RxStep::FutexWait,
                    };
                });
            }
            RxStep::FutexWait => {
                let unchanged = s.shared.published == s.rx.seen
                    && (self.protocol.sleep == Sleep::OnCounter || !s.shared.tx_closed);
                if unchanged {
                    self.coverage.rx_sleeps += 1;
                    if s.rx.seen.wrapping_add(1) == s.rx.consumed {
                        self.coverage.trailing_sleeps += 1;
                    }
                }
                self.push(s, at, Some(s.shared.published), |n| {
                    n.rx.next = if unchanged {
                        RxStep::Asleep
                    } else {
                        RxStep::ClearFlag
                    };
                });
            }
            RxStep::ClearFlagEarly => self.push(s, at, None, |n| {
                n.shared.rx_sleeping = false;
                n.rx.next = RxStep::FutexWait;
            }),
            RxStep::Asleep | RxStep::Done => {}
            RxStep::ClearFlag => self.push(s, at, None, |n| {
                n.shared.rx_sleeping = false;
                n.rx.next = RxStep::TakeLoadTag {
                    after_closed: false,
                };
            }),
            RxStep::StoreReleased => {
                let waker = self.protocol.releases.waker;
                let scenario = self.scenario;
                self.push(s, at, None, |n| {
                    n.shared.released += 1;
                    n.rx.next = match waker {
                        Waker::StoreThenCheck => RxStep::LoadTxSleeping,
                        Waker::CheckThenStore if n.rx.flag_seen => RxStep::WakeReleased,
                        Waker::CheckThenStore | Waker::NeverWakes => {
                            rx_next_recv(scenario, n.rx.recvs)
                        }
                    };
                });
            }
            RxStep::LoadTxSleeping => {
                let flag = s.shared.tx_sleeping;
                let waker = self.protocol.releases.waker;
                let scenario = self.scenario;
                self.push(s, at, Some(u32::from(flag)), |n| {
                    n.rx.next = match waker {
                        Waker::CheckThenStore => {
                            n.rx.flag_seen = flag;
                            RxStep::StoreReleased
                        }
                        _ if flag => RxStep::WakeReleased,
                        _ => rx_next_recv(scenario, n.rx.recvs),
                    };
                });
            }
            RxStep::WakeReleased => {
                let mut n = s.clone();
                self.wake_sender(&mut n);
                n.rx.next = rx_next_recv(self.scenario, n.rx.recvs);
                self.push(&n, at, None, |_| {});
            }
            RxStep::StoreClosed => self.push(s, at, None, |n| {
                n.shared.rx_closed = true;
                n.rx.next = RxStep::WakeOwnPublished;
            }),
            // Nobody sleeps on the receiving end's `published` here.
            RxStep::WakeOwnPublished => self.push(s, at, None, |n| {
                n.rx.next = RxStep::WakeOwnReleased;
            }),
            RxStep::WakeOwnReleased => {
                let mut n = s.clone();
                self.wake_sender(&mut n);
                n.rx.next = RxStep::Done;
                self.push(&n, at, None, |_| {});
            }
        }
    }

    fn sender(&mut self, s: &State) {
        let step = s.tx.next;
        let at = Step::Tx(step);
        let handshake = self.protocol.releases;
        let waker = self.protocol.messages.waker;
        match step {
            TxStep::LoadClosedBeforeSend => {
                for closed in self.flag_reads(s.shared.rx_closed, s.tx.saw_closed, true) {
                    let mut n = s.clone();
                    if closed {
                        n.tx.saw_closed = true;
                        n.tx.disconnected = true;
                        n.tx.next = tx_script_end(self.scenario);
                    } else {
                        self.tx_try_publish(&mut n);
                    }
                    self.push(&n, at, Some(u32::from(closed)), |_| {});
                }
            }
            TxStep::StoreTag => self.push(s, at, None, |n| {
                n.shared.tagged += 1;
                n.tx.next = match waker {
                    Waker::StoreThenCheck | Waker::NeverWakes => TxStep::StorePublished,
                    Waker::CheckThenStore => TxStep::LoadRxSleeping,
                };
            }),
            TxStep::StorePublished => {
                let mut n = s.clone();
                n.tx.sent += 1;
                n.shared.published = n.tx.sent;
                match waker {
                    Waker::StoreThenCheck => n.tx.next = TxStep::LoadRxSleeping,
                    Waker::CheckThenStore if n.tx.flag_seen => n.tx.next = TxStep::WakePublished,
                    Waker::CheckThenStore | Waker::NeverWakes => self.tx_sent(&mut n),
                }
                self.push(&n, at, None, |_| {});
            }
            TxStep::LoadRxSleeping => {
                let flag = s.shared.rx_sleeping;
                let mut n = s.clone();
                match waker {
                    Waker::CheckThenStore => {
                        n.tx.flag_seen = flag;
                        n.tx.next = TxStep::StorePublished;
                    }
                    _ if flag => n.tx.next = TxStep::WakePublished,
                    _ => self.tx_sent(&mut n),
                }
                self.push(&n, at, Some(u32::from(flag)), |_| {});
            }
            TxStep::WakePublished => {
                let mut n = s.clone();
                self.wake_receiver(&mut n);
                self.tx_sent(&mut n);
                self.push(&n, at, None, |_| {});
            }
            TxStep::ReclaimLoadReleased => {
                let reads =
                    self.counter_reads(s.tx.released_floor, s.shared.released, !s.tx.saw_closed);
                for v in reads {
                    let mut n = s.clone();
                    n.tx.released_floor = n.tx.released_floor.max(v);
                    let pending = v.wrapping_sub(n.tx.reclaimed);
                    let in_flight = n.tx.sent - n.tx.reclaimed;
                    if pending > in_flight {
                        n.tx.failed = Some("ReleasedOutOfRange");
                        n.tx.next = TxStep::Done;
                    } else if pending > 0 {
                        n.tx.reclaimed = v;
                        self.tx_try_publish(&mut n);
                    } else if in_flight == 0 {
                        n.tx.failed = Some("TooLarge with nothing in flight");
                        n.tx.next = TxStep::Done;
                    } else {
                        n.tx.seen = n.tx.reclaimed;
                        n.tx.next = TxStep::SpinLoadReleased;
                    }
                    self.push(&n, at, Some(v), |_| {});
                }
            }
            TxStep::SpinLoadReleased => {
                let reads =
                    self.counter_reads(s.tx.released_floor, s.shared.released, !s.tx.saw_closed);
                for v in reads {
                    let mut n = s.clone();
                    n.tx.released_floor = n.tx.released_floor.max(v);
                    if v != n.tx.seen {
                        self.tx_try_publish(&mut n);
                    } else {
                        n.tx.next = match handshake.sleeper {
                            Sleeper::LoadThenFlag => TxStep::LoadReleased,
                            _ => TxStep::SetFlag,
                        };
                    }
                    self.push(&n, at, Some(v), |_| {});
                }
            }
            TxStep::SetFlag => self.push(s, at, None, |n| {
                n.shared.tx_sleeping = true;
                match handshake.sleeper {
                    Sleeper::LoadThenFlag => Self::tx_decide(n),
                    _ => n.tx.next = TxStep::LoadReleased,
                }
            }),
            TxStep::LoadReleased => {
                let v = s.shared.released;
                self.push(s, at, Some(v), |n| {
                    n.tx.observed = v;
                    n.tx.released_floor = n.tx.released_floor.max(v);
                    match handshake.sleeper {
                        Sleeper::LoadThenFlag => n.tx.next = TxStep::SetFlag,
                        _ => Self::tx_decide(n),
                    }
                });
            }
            TxStep::LoadClosed => {
                let closed = s.shared.rx_closed;
                self.push(s, at, Some(u32::from(closed)), |n| {
                    n.tx.saw_closed |= closed;
                    n.tx.next = match handshake.sleeper {
                        _ if closed => TxStep::ClearFlag,
                        Sleeper::ClearsFlagBeforeSleeping => TxStep::ClearFlagEarly,
                        _ => TxStep::FutexWait,
                    };
                });
            }
            TxStep::FutexWait => {
                let unchanged = s.shared.released == s.tx.seen
                    && (self.protocol.sleep == Sleep::OnCounter || !s.shared.rx_closed);
                if unchanged {
                    self.coverage.tx_sleeps += 1;
                }
                self.push(s, at, Some(s.shared.released), |n| {
                    n.tx.next = if unchanged {
                        TxStep::Asleep
                    } else {
                        TxStep::ClearFlag
                    };
                });
            }
            TxStep::ClearFlagEarly => self.push(s, at, None, |n| {
                n.shared.tx_sleeping = false;
                n.tx.next = TxStep::FutexWait;
            }),
            TxStep::Asleep | TxStep::Done => {}
            TxStep::ClearFlag => self.push(s, at, None, |n| {
                n.shared.tx_sleeping = false;
                n.tx.next = TxStep::AfterLoadReleased;
            }),
            TxStep::AfterLoadReleased => {
                let reads =
                    self.counter_reads(s.tx.released_floor, s.shared.released, !s.tx.saw_closed);
                for v in reads {
                    let mut n = s.clone();
                    n.tx.released_floor = n.tx.released_floor.max(v);
                    if v != n.tx.seen {
                        self.tx_try_publish(&mut n);
                    } else {
                        n.tx.next = TxStep::AfterLoadClosed;
                    }
                    self.push(&n, at, Some(v), |_| {});
                }
            }
            TxStep::AfterLoadClosed => {
                for closed in self.flag_reads(s.shared.rx_closed, s.tx.saw_closed, true) {
                    let mut n = s.clone();
                    if closed {
                        n.tx.saw_closed = true;
                        n.tx.disconnected = true;
                        n.tx.next = tx_script_end(self.scenario);
                    } else {
                        // `wait_for_release` returns Ok; `publish` loops.
                        self.tx_try_publish(&mut n);
                    }
                    self.push(&n, at, Some(u32::from(closed)), |_| {});
                }
            }
            TxStep::StoreClosed => self.push(s, at, None, |n| {
                n.shared.tx_closed = true;
                n.tx.next = TxStep::WakeOwnPublished;
            }),
            TxStep::WakeOwnPublished => {
                let mut n = s.clone();
                self.wake_receiver(&mut n);
                n.tx.next = TxStep::WakeOwnReleased;
                self.push(&n, at, None, |_| {});
            }
            // Nobody sleeps on the sending end's `released` here.
            TxStep::WakeOwnReleased => self.push(s, at, None, |n| {
                n.tx.next = TxStep::Done;
            }),
        }
    }

    /// A sleeper's slice ends: it goes on as after a wake.
    fn slices_end(&mut self, s: &State) {
        if s.rx.next == RxStep::Asleep {
            self.coverage.slices_ended += 1;
            self.push(s, Step::SliceEnds(End::Receiver), None, |n| {
                n.rx.next = RxStep::ClearFlag;
            });
        }
        if s.tx.next == TxStep::Asleep {
            self.coverage.slices_ended += 1;
            self.push(s, Step::SliceEnds(End::Sender), None, |n| {
                n.tx.next = TxStep::ClearFlag;
            });
        }
    }
}

// ============================================================================
// The search
// ============================================================================

struct Checker {
    protocol: Protocol,
    scenario: Scenario,
    /// Complete interleavings from each state visited.
    memo: HashMap<State, u128>,
    /// The states on the current path, to detect cycles.
    on_path: HashSet<State>,
    /// The current path.
    path: Vec<Event>,
    report: Report,
}

/// Explores every interleaving of `scenario` under `protocol`.
fn check(protocol: Protocol, scenario: Scenario) -> Report {
    scenario.assert_finishes();
    let mut checker = Checker {
        protocol,
        scenario,
        memo: HashMap::new(),
        on_path: HashSet::new(),
        path: Vec::new(),
        report: Report::default(),
    };
    checker.report.executions = checker.explore(&State::initial(scenario));
    checker.report
}

impl Checker {
    /// Returns the number of complete interleavings from `state`.
    fn explore(&mut self, state: &State) -> u128 {
        if let Some(&n) = self.memo.get(state) {
            return n;
        }
        assert!(
            self.on_path.insert(state.clone()),
            "the model loops without progress:\n{}",
            trace(&self.path)
        );
        self.report.states += 1;

        let mut stepper = Stepper {
            protocol: self.protocol,
            scenario: self.scenario,
            coverage: &mut self.report.coverage,
            out: Vec::new(),
        };
        stepper.receiver(state);
        stepper.sender(state);
        // Nothing can happen: both ends are done, or whoever is not done
        // sleeps and nothing will wake it. With slices, a slice ends (the
        // lost wake is still reported).
        let stuck = stepper.out.is_empty();
        if stuck && !state.done() && self.protocol.slices {
            stepper.slices_end(state);
        }
        let successors = stepper.out;
        if stuck {
            self.judge(state);
        }

        let mut executions: u128 = 0;
        if successors.is_empty() {
            executions = 1;
        }
        for (event, next) in successors {
            self.report.transitions += 1;
            self.path.push(event);
            executions += self.explore(&next);
            self.path.pop();
        }
        self.on_path.remove(state);
        self.memo.insert(state.clone(), executions);
        executions
    }

    /// Judges a state where nothing but a slice's end can happen: a final
    /// state (both ends done), or a stuck one.
    fn judge(&mut self, s: &State) {
        let mut found = Vec::new();
        if s.rx.next == RxStep::Asleep {
            let reason = if s.shared.tagged > s.rx.consumed {
                Some(Reason::Message)
            } else if s.shared.tx_closed {
                Some(Reason::Close)
            } else {
                None
            };
            found.push(match reason {
                Some(reason) => Finding::LostWake {
                    sleeper: End::Receiver,
                    reason,
                },
                None => Finding::SleepsForNothing {
                    sleeper: End::Receiver,
                },
            });
        }
        if s.tx.next == TxStep::Asleep {
            let reason = if s.shared.released != s.tx.seen {
                Some(Reason::Release)
            } else if s.shared.rx_closed {
                Some(Reason::Close)
            } else {
                None
            };
            found.push(match reason {
                Some(reason) => Finding::LostWake {
                    sleeper: End::Sender,
                    reason,
                },
                None => Finding::SleepsForNothing {
                    sleeper: End::Sender,
                },
            });
        }
        if s.done() {
            found.extend(self.wrong_outcome(s));
        }
        for finding in found {
            let entry = self
                .report
                .findings
                .entry(finding)
                .or_insert_with(|| (0, self.path.clone()));
            entry.0 += 1;
        }
    }

    /// Checks how a finished execution ended.
    fn wrong_outcome(&self, s: &State) -> Vec<Finding> {
        let sc = self.scenario;
        let mut wrong = Vec::new();
        if let Some(e) = s.rx.failed {
            wrong.push(Finding::ProtocolError(End::Receiver, e));
        }
        if let Some(e) = s.tx.failed {
            wrong.push(Finding::ProtocolError(End::Sender, e));
        }
        if !wrong.is_empty() {
            // A failed end stops early: the outcome says nothing more.
            return wrong;
        }
        if s.rx.consumed != sc.recvs.min(sc.messages) {
            wrong.push(Finding::WrongOutcome("the receiving end missed a message"));
        }
        if s.rx.disconnected != (sc.recvs > sc.messages) {
            wrong.push(Finding::WrongOutcome(
                "Disconnected when not due, or not when due",
            ));
        }
        // Everything was sent, or the receiving end closed and the sending
        // end saw it.
        let all_sent = s.tx.sent == sc.messages && !s.tx.disconnected;
        let cut_short = sc.receiver_closes && s.tx.disconnected;
        if !(all_sent || cut_short) {
            wrong.push(Finding::WrongOutcome(
                "the sending end did not send everything",
            ));
        }
        wrong
    }
}

/// An execution, one step a line.
fn trace(path: &[Event]) -> String {
    path.iter()
        .enumerate()
        .map(|(i, e)| format!("{i:4}  {e}\n"))
        .collect()
}

impl Report {
    fn summary(&self, name: &str) -> String {
        format!(
            "{name}: {} interleavings, {} states, {} steps; coverage {:?}; findings {:?}",
            self.executions,
            self.states,
            self.transitions,
            self.coverage,
            self.findings.keys().collect::<Vec<_>>()
        )
    }

    /// Fails the test, with the first execution of each finding, unless
    /// nothing was found.
    fn assert_clean(&self, name: &str) {
        eprintln!("{}", self.summary(name));
        if self.findings.is_empty() {
            return;
        }
        let mut text = String::new();
        for (finding, (states, path)) in &self.findings {
            text += &format!("\n{finding:?} in {states} states, first reached by:\n");
            text += &trace(path);
        }
        panic!("{name}: the checker found problems:{text}");
    }

    /// The first execution that ends in `finding`, failing the test when the
    /// checker did not find it.
    fn counterexample(&self, name: &str, finding: Finding) -> &[Event] {
        eprintln!("{}", self.summary(name));
        let Some((_, path)) = self.findings.get(&finding) else {
            panic!("{name}: the checker did not find {finding:?}");
        };
        eprintln!("{name}: {finding:?}, first reached by:\n{}", trace(path));
        path
    }
}

/// The index of the last step `step` in `path` (before `before`).
fn last(path: &[Event], before: usize, step: Step) -> Option<usize> {
    path[..before].iter().rposition(|e| e.step == step)
}

// ============================================================================
// The protocol as written: no wake is lost
// ============================================================================

#[test]
fn one_publish_against_one_wait() {
    let report = check(Protocol::AS_WRITTEN, Scenario::publishes(1));
    report.assert_clean("one publish");
    let c = &report.coverage;
    assert!(c.rx_sleeps > 0 && c.rx_woken > 0, "{c:?}");
    assert!(c.stale_reads > 0, "{c:?}");
}

#[test]
fn two_publishes_against_two_receives() {
    let report = check(Protocol::AS_WRITTEN, Scenario::publishes(2));
    report.assert_clean("two publishes");
    let c = &report.coverage;
    assert!(c.rx_sleeps > 0 && c.rx_woken > 0, "{c:?}");
}

/// The receiving end takes message `n` by its tag before the sending end
/// has stored `published = n + 1`, so on its next `recv` the counter trails
/// `consumed` by one. It may even go to sleep on that trailing value: the
/// sending end's store then changes the futex word (a sleep that has not
/// begun returns at once) and its flag check wakes a sleep that has. Either
/// way it loops, re-checks, and sleeps only on the current value: it never
/// sleeps through a message.
#[test]
fn published_trailing_consumed_never_sleeps_through_a_message() {
    for messages in [1, 2] {
        let name = format!("trailing, {messages} publishes");
        let report = check(Protocol::AS_WRITTEN, Scenario::publishes(messages));
        report.assert_clean(&name);
        let c = &report.coverage;
        assert!(c.taken_before_published > 0, "{name}: {c:?}");
        if messages == 2 {
            assert!(c.trailing_rechecks > 0, "{name}: {c:?}");
            assert!(c.trailing_sleeps > 0, "{name}: {c:?}");
        }
    }
}

/// The same without stale hint loads: every load reads the latest value.
#[test]
fn sequentially_consistent_hints_lose_no_wake_either() {
    let protocol = Protocol {
        stale_hints: false,
        ..Protocol::AS_WRITTEN
    };
    for messages in [1, 2] {
        let report = check(protocol, Scenario::publishes(messages));
        report.assert_clean(&format!("{messages} publishes, no stale hints"));
        assert_eq!(report.coverage.stale_reads, 0);
    }
}

/// Backpressure: a ring of one, so the sending end waits in
/// `wait_for_release` for the receiving end to drop each message.
#[test]
fn backpressure_wait_against_releases() {
    for messages in [2, 3] {
        let name = format!("backpressure, {messages} messages through a ring of 1");
        let scenario = Scenario {
            ring: 1,
            releases: true,
            ..Scenario::publishes(messages)
        };
        let report = check(Protocol::AS_WRITTEN, scenario);
        report.assert_clean(&name);
        let c = &report.coverage;
        assert!(c.tx_sleeps > 0 && c.tx_woken > 0, "{name}: {c:?}");
        assert!(c.rx_sleeps > 0 && c.rx_woken > 0, "{name}: {c:?}");
    }
}

// ============================================================================
// Closing: the wake can be lost (bounded by one slice), and a fix
// ============================================================================

/// The sending end publishes `messages` and closes; the receiving end
/// receives them and then `Disconnected`.
fn publishes_then_close(messages: u32) -> Scenario {
    Scenario {
        sender_closes: true,
        recvs: messages + 1,
        ..Scenario::publishes(messages)
    }
}

/// The sending end fills a ring of one and waits for space; the receiving
/// end closes without receiving.
fn receiver_closes_on_a_waiting_sender() -> Scenario {
    Scenario {
        ring: 1,
        messages: 2,
        sender_closes: false,
        recvs: 0,
        releases: false,
        receiver_closes: true,
    }
}

/// The close race on the receiving end: it loads `closed == 0`
/// (channel.rs:548), the peer stores `closed` and wakes `published`
/// (channel.rs:709-710) while nobody is queued yet, and then `FUTEX_WAIT`
/// compares `published`, which did not change, and sleeps. The wake is
/// lost; in the real code the receiver notices the close when its slice
/// (`wait_slice`, 100 ms by default) ends. No message wake is ever lost.
#[test]
fn without_futex_waitv_a_close_can_lose_its_wake_for_one_slice() {
    for messages in [0, 1, 2] {
        let name = format!("{messages} publishes, then close");
        let report = check(
            Protocol::WITHOUT_FUTEX_WAITV,
            publishes_then_close(messages),
        );
        let lost = Finding::LostWake {
            sleeper: End::Receiver,
            reason: Reason::Close,
        };
        let path = report.counterexample(&name, lost);
        assert_eq!(
            report.findings.keys().collect::<Vec<_>>(),
            [&lost],
            "{name}: only the close wake may be lost"
        );
        // The shape of the race, at the end of the counterexample.
        let wait = last(path, path.len(), Step::Rx(RxStep::FutexWait)).expect("a futex wait");
        let closed_check =
            last(path, wait, Step::Rx(RxStep::LoadClosed)).expect("the closed check");
        let store = last(path, wait, Step::Tx(TxStep::StoreClosed)).expect("the close");
        let wake = last(path, wait, Step::Tx(TxStep::WakeOwnPublished)).expect("its wake");
        assert!(
            closed_check < store && store < wake && wake < wait,
            "{name}"
        );

        // Bounded: with slices, every execution still ends as it should.
        let sliced = Protocol {
            slices: true,
            ..Protocol::WITHOUT_FUTEX_WAITV
        };
        let report = check(sliced, publishes_then_close(messages));
        eprintln!("{}", report.summary(&format!("{name}, with slices")));
        assert_eq!(report.findings.keys().collect::<Vec<_>>(), [&lost]);
        assert!(report.coverage.slices_ended > 0);
    }
}

/// The same race on the sending end, waiting for space while the receiving
/// end closes (channel.rs:473 against :709-711).
#[test]
fn without_futex_waitv_a_close_can_lose_its_wake_on_a_waiting_sender_too() {
    let report = check(
        Protocol::WITHOUT_FUTEX_WAITV,
        receiver_closes_on_a_waiting_sender(),
    );
    let lost = Finding::LostWake {
        sleeper: End::Sender,
        reason: Reason::Close,
    };
    report.counterexample("receiver closes on a waiting sender", lost);
    assert_eq!(report.findings.keys().collect::<Vec<_>>(), [&lost]);
}

/// As written: sleep on the counter and on `closed` at once (`futex_waitv`,
/// Linux 5.16; `close_shared` wakes `closed` as well). Then no wake is lost,
/// for messages, releases or closes.
#[test]
fn sleeping_on_closed_too_loses_no_close_wake() {
    let fixed = Protocol::AS_WRITTEN;
    for messages in [0, 1, 2] {
        check(fixed, publishes_then_close(messages))
            .assert_clean(&format!("fixed: {messages} publishes, then close"));
    }
    check(fixed, receiver_closes_on_a_waiting_sender())
        .assert_clean("fixed: receiver closes on a waiting sender");
    let backpressure = Scenario {
        ring: 1,
        releases: true,
        sender_closes: true,
        recvs: 3,
        ..Scenario::publishes(2)
    };
    check(fixed, backpressure).assert_clean("fixed: backpressure, then close");
}

// ============================================================================
// Variants: what matters and what does not
// ============================================================================

/// The protocol as written, with the message handshake replaced.
fn messages(handshake: Handshake) -> Protocol {
    Protocol {
        messages: handshake,
        ..Protocol::AS_WRITTEN
    }
}

/// The protocol as written, with the backpressure handshake replaced.
fn releases(handshake: Handshake) -> Protocol {
    Protocol {
        releases: handshake,
        ..Protocol::AS_WRITTEN
    }
}

/// Two messages through a ring of one, each released at once.
fn backpressure() -> Scenario {
    Scenario {
        ring: 1,
        releases: true,
        ..Scenario::publishes(2)
    }
}

const RECEIVER_MISSES_A_MESSAGE: Finding = Finding::LostWake {
    sleeper: End::Receiver,
    reason: Reason::Message,
};

const SENDER_MISSES_A_RELEASE: Finding = Finding::LostWake {
    sleeper: End::Sender,
    reason: Reason::Release,
};

/// Swapping the sleeper's flag store and counter load loses nothing: the
/// waker can now publish between the load and the flag store and skip the
/// wake, but then the counter differs from `seen` and `FUTEX_WAIT` returns
/// at once. The sleeper's half of the Dekker pair is its flag store against
/// the kernel's compare, which always comes after the store. The load only
/// supplies `seen`.
#[test]
fn swapping_the_sleepers_flag_store_and_load_loses_no_wake() {
    let swapped = Handshake {
        sleeper: Sleeper::LoadThenFlag,
        ..Handshake::AS_WRITTEN
    };
    for n in [1, 2] {
        check(messages(swapped), Scenario::publishes(n))
            .assert_clean(&format!("receiver swapped, {n} publishes"));
    }
    check(releases(swapped), backpressure()).assert_clean("sending end swapped, backpressure");
}

/// A sleeper that clears its flag before `FUTEX_WAIT` instead of after: a
/// publish after the kernel's compare finds the flag clear and does not wake.
#[test]
fn sleeper_clearing_its_flag_before_sleeping_loses_a_wake() {
    let early = Handshake {
        sleeper: Sleeper::ClearsFlagBeforeSleeping,
        ..Handshake::AS_WRITTEN
    };
    check(messages(early), Scenario::publishes(1))
        .counterexample("receiver clears early", RECEIVER_MISSES_A_MESSAGE);
    check(releases(early), backpressure())
        .counterexample("sending end clears early", SENDER_MISSES_A_RELEASE);
}

/// A waker that checks the flag before it stores the counter: the sleeper
/// can announce itself and compare the old counter in between, and sleep
/// with no wake coming.
#[test]
fn waker_checking_the_flag_before_storing_loses_a_wake() {
    let swapped = Handshake {
        waker: Waker::CheckThenStore,
        ..Handshake::AS_WRITTEN
    };
    let path = check(messages(swapped), Scenario::publishes(1))
        .counterexample("publish swapped", RECEIVER_MISSES_A_MESSAGE)
        .to_vec();
    // The shape: the flag check, then the sleeper's flag store and compare,
    // then the store.
    let sleep = last(&path, path.len(), Step::Rx(RxStep::FutexWait)).expect("a sleep");
    let flag_check = last(&path, sleep, Step::Tx(TxStep::LoadRxSleeping)).expect("a check");
    let announce = last(&path, sleep, Step::Rx(RxStep::SetFlag)).expect("an announcement");
    assert!(flag_check < announce);
    assert!(last(&path, sleep, Step::Tx(TxStep::StorePublished)).is_none());
    check(releases(swapped), backpressure())
        .counterexample("release swapped", SENDER_MISSES_A_RELEASE);
}

/// A waker that never checks the flag never wakes anyone.
#[test]
fn waker_never_checking_the_flag_loses_a_wake() {
    let never = Handshake {
        waker: Waker::NeverWakes,
        ..Handshake::AS_WRITTEN
    };
    check(messages(never), Scenario::publishes(1))
        .counterexample("publish never wakes", RECEIVER_MISSES_A_MESSAGE);
    check(releases(never), backpressure())
        .counterexample("release never wakes", SENDER_MISSES_A_RELEASE);
}

/// `take` loading the tag with `Relaxed` instead of `Acquire`: the receiving
/// end can take messages by their tags and still read an old `published`,
/// more than one behind, which `available` rightly rejects as a counter that
/// went backwards. The `Acquire` is what makes "trails by at most one" true.
#[test]
fn relaxed_tag_load_lets_published_trail_by_more_than_one() {
    let broken = Protocol {
        acquire_tag: false,
        ..Protocol::AS_WRITTEN
    };
    let error = Finding::ProtocolError(End::Receiver, "PublishedOutOfRange");
    check(broken, publishes_then_close(2)).counterexample("relaxed tag load", error);
}
