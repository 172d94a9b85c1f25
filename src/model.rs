//! The exhaustive interleaving check of the protocol, on the production
//! code: the sending and receiving sides (`send.rs`, `recv.rs`), their rings
//! (`ring.rs`), the waiter (`wait.rs`), the sleep/wake handshake (`wake.rs`)
//! and the close (`link.rs`), instantiated over loom's atomics instead of
//! `AtomicU32` in a mapping.
//!
//! loom runs the two ends' threads in every interleaving of their accesses
//! to shared words that can matter, and lets each `Relaxed` or `Acquire`
//! load return any value the memory model allows (fences are modelled
//! exactly; that is why the protocol orders its Dekker pairs with `SeqCst`
//! fences rather than `SeqCst` accesses, which loom models too weakly).
//!
//! The futex is modelled below as the kernel has it: `FUTEX_WAIT` compares
//! every word with its expected value and queues the caller in one step
//! under a lock, and `FUTEX_WAKE` takes the lock and wakes the callers
//! queued on that word. A sleep never times out here: that is the worst
//! case for a lost wake, which then shows as a deadlock (every thread
//! blocked), and loom reports it. Socket polls are real (a socketpair per
//! execution), but hang-up is kept out of the model (see `pair`): ends
//! close through their `closed` word.
//!
//! Counters start two messages before they wrap (`START`), with the rings
//! holding what the lap before would have left, so every execution also
//! crosses the wrap of every `u32` counter.
//!
//! Each scenario must end with the outcome the protocol promises (every
//! message delivered once, in order, with its bytes; `Disconnected` exactly
//! when due; no protocol error). Then each deliberately broken variant of
//! `fault.rs`, switched on in the production code, must make the check fail.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loom::sync::{Condvar, Mutex};

use crate::deadline::Deadline;
use crate::error::{Halt, SendHalt};
use crate::fault::{self, Fault};
use crate::layout::{
    ControlBlock, DescriptorEntry, Geometry, Header, Line, ReleaseEntry, CARRIED_WORDS,
};
use crate::link::Link;
use crate::options::Options;
use crate::recv::RecvSide;
use crate::region::{self, Extent};
use crate::ring::Took;
use crate::send::SendSide;
use crate::word::{Pair, Word};

/// Where every counter starts: two messages before `u32` wraps.
const START: u32 = u32::MAX - 1;

/// A shared word: a loom atomic, slept on through the modelled kernel.
#[derive(Debug)]
pub(crate) struct ModelWord(loom::sync::atomic::AtomicU32);

impl ModelWord {
    fn new(value: u32) -> ModelWord {
        ModelWord(loom::sync::atomic::AtomicU32::new(value))
    }

    fn address(&self) -> usize {
        self as *const ModelWord as usize
    }
}

/// The futex: who sleeps on which words, under one lock.
struct Kernel {
    queue: Mutex<Queue>,
    woken: Condvar,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    /// `(ticket, addresses slept on, woken)`.
    sleepers: Vec<(u64, Vec<usize>, bool)>,
}

loom::lazy_static! {
    static ref KERNEL: Kernel = Kernel {
        queue: Mutex::new(Queue::default()),
        woken: Condvar::new(),
    };
}

impl Kernel {
    fn wait(&self, words: &[(&ModelWord, u32)]) {
        let mut queue = self.queue.lock().unwrap();
        // The compare, under the lock, as FUTEX_WAIT does it.
        if words
            .iter()
            .any(|(w, expected)| w.0.load(Ordering::Relaxed) != *expected)
        {
            return;
        }
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        let addresses = words.iter().map(|(w, _)| w.address()).collect();
        queue.sleepers.push((ticket, addresses, false));
        loop {
            queue = self.woken.wait(queue).unwrap();
            let at = queue.sleepers.iter().position(|s| s.0 == ticket).unwrap();
            if queue.sleepers[at].2 {
                queue.sleepers.remove(at);
                return;
            }
        }
    }

    fn wake(&self, word: &ModelWord) {
        let mut queue = self.queue.lock().unwrap();
        let address = word.address();
        for sleeper in &mut queue.sleepers {
            if sleeper.1.contains(&address) {
                sleeper.2 = true;
            }
        }
        self.woken.notify_all();
    }
}

/// Two shared words as one: a loom atomic of 64 bits.
#[derive(Debug)]
pub(crate) struct ModelPair(loom::sync::atomic::AtomicU64);

impl Pair for ModelPair {
    fn load(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn store(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Nothing: a touch orders nothing and reads nothing that is used, and
    /// each load would only multiply the interleavings to explore.
    fn touch(&self) {}
}

impl Word for ModelWord {
    type Pair = ModelPair;

    fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }

    fn store(&self, value: u32, order: Ordering) {
        self.0.store(value, order);
    }

    fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32> {
        self.0
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
    }

    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order);
    }

    fn wait(&self, expected: u32, _timeout: Duration) -> io::Result<()> {
        KERNEL.wait(&[(self, expected)]);
        Ok(())
    }

    fn wait_many(words: &[(&Self, u32)], _timeout: Duration) -> io::Result<()> {
        KERNEL.wait(words);
        Ok(())
    }

    fn wake(&self) {
        KERNEL.wake(self);
    }
}

// ---- building two ends ------------------------------------------------------

/// The geometry of both model regions: a ring of `capacity`, a release
/// ring for `held` messages, the smallest data area.
fn geometry(capacity: u32, held: u32) -> Geometry {
    let g = Geometry {
        region_size: Geometry::region_for(capacity, held, 4096),
        ring_capacity: capacity,
        held_capacity: held,
    };
    g.validate().expect("a valid model geometry")
}

/// One region's memory, as its owner would leave it after `START` messages
/// and releases: counters at `START`, each ring entry holding what the
/// message (or release) before `START` at its index wrote.
fn memory(g: Geometry) -> Arc<region::model::Memory<ModelWord>> {
    let line = |v: u32| Line(ModelWord::new(v));
    let capacity = g.ring_capacity;
    let mut tags = vec![0; capacity as usize];
    for back in 1..=capacity {
        let previous = START.wrapping_sub(back);
        tags[g.ring_index(previous) as usize] = previous.wrapping_add(1);
    }
    let descriptors = tags
        .into_iter()
        .map(|tag| DescriptorEntry {
            tag: ModelWord::new(tag),
            slot_count: ModelWord::new(0),
            offset: ModelWord::new(0),
            len: ModelWord::new(0),
            carried: std::array::from_fn(|_| ModelPair(loom::sync::atomic::AtomicU64::new(0))),
        })
        .collect();
    let releases = (0..g.held_capacity)
        .map(|_| ReleaseEntry {
            slot: ModelWord::new(0),
            seq: ModelWord::new(0),
        })
        .collect();
    Arc::new(region::model::Memory {
        control: Box::new(ControlBlock {
            header: Line(Header::default()),
            published: line(START),
            consumed: line(START),
            released: line(START),
            rx_sleeping: line(0),
            tx_sleeping: line(0),
            closed: line(0),
            owner: line(0),
        }),
        descriptors,
        releases,
        data: (0..g.data_words()).map(|_| UnsafeCell::new(0)).collect(),
    })
}

/// Both sides of one end, and a second descriptor of the other end's
/// socket, so that the socket never shows hang-up while the execution runs
/// (see `pair`).
struct End {
    tx: SendSide<ModelWord>,
    rx: RecvSide<ModelWord>,
    _peer_socket: UnixStream,
}

/// Two connected ends over model regions with ring `capacity`.
fn pair(capacity: u32) -> (End, End) {
    pair_held(capacity, capacity)
}

/// As [`pair`], with release rings for `held` messages.
fn pair_held(capacity: u32, held: u32) -> (End, End) {
    let g = geometry(capacity, held);
    let (a, b) = (memory(g), memory(g));
    let (a_own, a_peer) = region::model::views(&a, g);
    let (b_own, b_peer) = region::model::views(&b, g);
    // Socket hang-up is not modelled: a peer's death or drop is seen
    // through the kernel, whose own locking orders it after everything the
    // peer stored, and loom cannot see that order. Each end keeps a copy of
    // the other's socket, so no hang-up shows until the execution is over;
    // ends are closed through `closed` alone.
    let (sa, sb) = UnixStream::pair().expect("socketpair");
    let (sa_copy, sb_copy) = (sa.try_clone().expect("dup"), sb.try_clone().expect("dup"));
    // No spin (a spin is a loop of loads loom would have to unroll) and a
    // slice longer than any execution: sleeps end by wakes only.
    let options = Options::new()
        .spin(Duration::ZERO)
        .wait_slice(Duration::from_secs(3600));
    let end = |socket: UnixStream, peer_socket, own, peer| {
        let link = Arc::new(Link::new(
            OwnedFd::from(socket),
            own,
            peer,
            options.clone(),
            0,
            true,
        ));
        End {
            tx: SendSide::new(Arc::clone(&link), START),
            rx: RecvSide::new(link, START),
            _peer_socket: peer_socket,
        }
    };
    (
        end(sa, sb_copy, a_own, b_peer),
        end(sb, sa_copy, b_own, a_peer),
    )
}

/// Message number `n`: one word, which its descriptor carries, or (not
/// `CARRIED`) fifteen, one more than an entry holds, read in place.
fn message<const CARRIED: bool>(n: u32) -> Vec<u8> {
    let words = if CARRIED { 1 } else { CARRIED_WORDS as u64 + 1 };
    (0..words)
        .flat_map(|i| {
            (u64::from(n) + (i << 32))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes()
        })
        .collect()
}

/// Sends message `n` and returns how the send ended.
fn send<const CARRIED: bool>(end: &End, n: u32) -> Result<(), &'static str> {
    let bytes = message::<CARRIED>(n);
    match end.tx.send(&[&bytes], Deadline::Never) {
        Ok(()) => Ok(()),
        Err(SendHalt::Halt(Halt::Disconnected)) => Err("disconnected"),
        Err(e) => panic!("send {n}: {e:?}"),
    }
}

/// What a receive gives the scenario: the `(slot, seq)` to release of a
/// message read in place, `None` for a carried one (nothing to release).
type Got = Option<(u32, u32)>;

/// Receives the next message as the channel does (the common kinds first,
/// then the receive loop), checks it is number `n`, of its kind, with its
/// bytes; `None` on `Disconnected`.
fn recv<const CARRIED: bool>(end: &End, n: u32) -> Option<Got> {
    let got = match end.rx.take_one() {
        Some(one) => Ok(one.into_taken()),
        None => end.rx.recv(Deadline::Never),
    };
    match got {
        Ok(Took::Shared(taken)) => {
            assert!(!CARRIED, "message {n} read in place, not carried");
            assert_eq!(taken.seq, START.wrapping_add(n), "message out of order");
            assert_eq!(taken.table.len(), 1);
            let extent: Extent = taken.table.get(0).unwrap().extent;
            let bytes = end.rx.link().peer().segment(extent).unwrap();
            assert_eq!(bytes, &message::<CARRIED>(n)[..], "message {n} corrupted");
            Some(Some((taken.slot, taken.seq)))
        }
        Ok(Took::Carried(carried)) => {
            assert!(CARRIED, "message {n} carried, not read in place");
            let bytes = carried.segment();
            assert_eq!(bytes, &message::<CARRIED>(n)[..], "message {n} corrupted");
            Some(None)
        }
        Err(Halt::Disconnected) => None,
        Err(e) => panic!("recv {n}: {e:?}"),
    }
}

/// Releases what [`recv`] got (nothing, for a carried message).
fn release(end: &End, got: Got) {
    if let Some((slot, seq)) = got {
        end.rx.release(slot, seq);
    }
}

// ---- the scenarios --------------------------------------------------------------

/// What one model execution does.
type Scenario = fn();

/// Interleavings explored, over all scenarios run by one test.
static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

/// Runs `scenario` in every interleaving with at most `preemptions`
/// preemptions (`None`: all of them); returns how many executions.
fn check(scenario: Scenario, preemptions: Option<usize>) -> usize {
    let before = EXECUTIONS.load(Ordering::Relaxed);
    let mut builder = loom::model::Builder::new();
    builder.max_branches = 10_000;
    // LOOM_MAX_PREEMPTIONS (read by the builder) overrides, for deeper runs.
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = preemptions;
    }
    builder.check(move || {
        EXECUTIONS.fetch_add(1, Ordering::Relaxed);
        scenario();
    });
    EXECUTIONS.load(Ordering::Relaxed) - before
}

/// Two messages through a ring of one: the sender must wait for the first
/// release (or, carried, the first take), the receiver for each message;
/// then the sender closes and the receiver's third receive is
/// `Disconnected`.
fn stream_then_close<const CARRIED: bool>() {
    let (a, b) = pair(1);
    let sender = loom::thread::spawn(move || {
        send::<CARRIED>(&a, 0).unwrap();
        send::<CARRIED>(&a, 1).unwrap();
        drop(a); // the close
    });
    for n in 0..2 {
        let got = recv::<CARRIED>(&b, n).expect("a message, not Disconnected");
        release(&b, got);
    }
    assert_eq!(
        recv::<CARRIED>(&b, 2),
        None,
        "Disconnected after the last message"
    );
    sender.join().unwrap();
}

/// [`stream_then_close`] without the close: the two messages only.
fn stream<const CARRIED: bool>() {
    let (a, b) = pair(1);
    let sender = loom::thread::spawn(move || {
        send::<CARRIED>(&a, 0).unwrap();
        send::<CARRIED>(&a, 1).unwrap();
        a
    });
    for n in 0..2 {
        let got = recv::<CARRIED>(&b, n).expect("a message, not Disconnected");
        release(&b, got);
    }
    let a = sender.join().unwrap();
    drop((a, b));
}

/// Three messages through a ring of one, each released (if read in place)
/// once taken: the sender sleeps on a full ring again and again, with the
/// same flag value when they are carried (no release moves `released`).
fn stream_of_three<const CARRIED: bool>() {
    let (a, b) = pair(1);
    let sender = loom::thread::spawn(move || {
        for n in 0..3 {
            send::<CARRIED>(&a, n).unwrap();
        }
        a
    });
    for n in 0..3 {
        let got = recv::<CARRIED>(&b, n).expect("a message, not Disconnected");
        release(&b, got);
    }
    let a = sender.join().unwrap();
    drop((a, b));
}

/// The receiver holds the first message and closes while the sender waits
/// for room for the second: the sender's wait must end in `Disconnected`.
/// (Read in place only: a carried message holds nothing once taken.)
fn close_while_sender_waits() {
    let (a, b) = pair(1);
    let sender = loom::thread::spawn(move || {
        send::<false>(&a, 0).unwrap();
        assert_eq!(send::<false>(&a, 1), Err("disconnected"));
    });
    let held = recv::<false>(&b, 0).expect("the first message");
    drop(b); // closes without releasing it
    let _ = held;
    sender.join().unwrap();
}

/// A receiver that waits for a message that never comes must see the
/// close. (The closing end is used first: an end dropped unused is left
/// for its copies after a `fork`, and the peer sees its socket hang up
/// when the slice ends, which never happens here.)
fn close_while_receiver_waits() {
    let (a, b) = pair(1);
    let closer = loom::thread::spawn(move || {
        assert!(a.tx.claim(), "claims the end");
        drop(a);
    });
    assert_eq!(recv::<false>(&b, 0), None);
    closer.join().unwrap();
}

/// Two messages in a ring of two, both released at the end: the second
/// publish and the receiver's sleep race without any wait for space.
fn two_in_flight<const CARRIED: bool>() {
    two_held::<CARRIED>(pair(2));
}

/// A ring of one, and room to hold two: the receiver holds the first
/// message, so the sender's wait for the second is for the receiver to
/// *take* (not release) the first, and only the take can wake it.
fn full_ring_while_receiver_holds<const CARRIED: bool>() {
    two_held::<CARRIED>(pair_held(1, 2));
}

/// Sends two messages over `(a, b)`; the receiver holds the first while it
/// receives the second, then releases both.
fn two_held<const CARRIED: bool>((a, b): (End, End)) {
    let sender = loom::thread::spawn(move || {
        send::<CARRIED>(&a, 0).unwrap();
        send::<CARRIED>(&a, 1).unwrap();
        a
    });
    let first = recv::<CARRIED>(&b, 0).unwrap();
    let second = recv::<CARRIED>(&b, 1).unwrap();
    release(&b, first);
    release(&b, second);
    let a = sender.join().unwrap();
    drop((a, b));
}

/// Each scenario, and the most preemptions its check explores (`None`:
/// every interleaving). The bounds keep `cargo test` to seconds; deeper
/// runs (`LOOM_MAX_PREEMPTIONS=4`, minutes) are for changes to the
/// protocol. Messages are read in place unless the name says carried.
const SCENARIOS: [(&str, Scenario, Option<usize>); 9] = [
    ("stream_then_close", stream_then_close::<false>, Some(3)),
    (
        "close_while_sender_waits",
        close_while_sender_waits,
        Some(3),
    ),
    (
        "close_while_receiver_waits",
        close_while_receiver_waits,
        None,
    ),
    ("two_in_flight", two_in_flight::<false>, Some(3)),
    (
        "full_ring_while_receiver_holds",
        full_ring_while_receiver_holds::<false>,
        Some(3),
    ),
    (
        "carried_stream_then_close",
        stream_then_close::<true>,
        Some(3),
    ),
    ("carried_two_in_flight", two_in_flight::<true>, Some(3)),
    (
        "carried_full_ring",
        full_ring_while_receiver_holds::<true>,
        Some(3),
    ),
    ("carried_stream_of_three", stream_of_three::<true>, Some(2)),
];

#[test]
fn the_protocol_loses_no_wake_and_no_message() {
    for (name, scenario, preemptions) in SCENARIOS {
        let n = check(scenario, preemptions);
        eprintln!("{name}: {n} executions (preemptions: {preemptions:?})");
        assert!(n > 1, "{name}: loom explored only one execution");
    }
}

/// Where `futex_waitv` is missing (modelled by the one-word sleep of
/// `Fault::SleepOnCounterOnly`), a sender asleep on a full descriptor ring
/// sleeps on the peer's `consumed`, the word a take moves, and is woken on
/// it by a carried take, a take while holding, or a release (the take
/// before which woke no one): every full-ring scenario without a close
/// ends, read in place and carried. (Asleep on `released`, the carried
/// ones and a receiver that holds deadlock; asleep on `consumed` but woken
/// only on `released` by a release, a stream read in place does.)
#[test]
fn without_futex_waitv_a_take_ends_a_full_ring_wait() {
    let scenarios: [(&str, Scenario); 4] = [
        ("stream", stream::<false>),
        ("carried_stream", stream::<true>),
        (
            "full_ring_while_receiver_holds",
            full_ring_while_receiver_holds::<false>,
        ),
        ("carried_full_ring", full_ring_while_receiver_holds::<true>),
    ];
    for (name, scenario) in scenarios {
        let n = fault::with(Some(Fault::SleepOnCounterOnly), || check(scenario, Some(3)));
        eprintln!("{name}, one-word sleeps: {n} executions");
        assert!(n > 1, "{name}: loom explored only one execution");
    }
}

/// The broken variants, each with the scenario that must catch it and how
/// the failure shows: a lost wake is a deadlock (every thread asleep), a
/// tag stored after its counter a protocol error an honest peer never gets.
const VARIANTS: [(Fault, &str, Scenario, &str); 8] = [
    (
        Fault::RecheckNotOrdered,
        "stream_then_close",
        stream_then_close::<false>,
        "deadlock",
    ),
    (
        Fault::NoRecheck,
        "stream_then_close",
        stream_then_close::<false>,
        "deadlock",
    ),
    (
        Fault::WakerChecksFirst,
        "stream_then_close",
        stream_then_close::<false>,
        "deadlock",
    ),
    (
        Fault::FlagClearedBeforeSleep,
        "stream_then_close",
        stream_then_close::<false>,
        "deadlock",
    ),
    (
        Fault::CounterBeforeTag,
        "two_in_flight",
        two_in_flight::<false>,
        "DescriptorSequence",
    ),
    (
        Fault::SleepOnCounterOnly,
        "close_while_receiver_waits",
        close_while_receiver_waits,
        "deadlock",
    ),
    (
        Fault::CarriedTakeWakesNoOne,
        "carried_full_ring",
        full_ring_while_receiver_holds::<true>,
        "deadlock",
    ),
    (
        Fault::TakeWakeKnowsFlagOnly,
        "carried_stream_of_three",
        stream_of_three::<true>,
        "deadlock",
    ),
];

/// Selects the broken variant [`broken_variant`] checks, in a re-run of
/// this test binary.
const VARIANT_VAR: &str = "CAPNP_SHM_MODEL_VARIANT";

/// The child side of [`every_broken_variant_is_caught`]: checks one
/// variant, and fails (a panic, or loom's abort) when the checker catches
/// it. A no-op in an ordinary run.
#[test]
fn broken_variant() {
    let Ok(name) = std::env::var(VARIANT_VAR) else {
        return;
    };
    let (fault, _, scenario, _) = VARIANTS
        .into_iter()
        .find(|(f, ..)| format!("{f:?}") == name)
        .expect("a known variant");
    fault::with(Some(fault), || check(scenario, Some(3)));
}

/// Each broken variant, switched on in the production code, makes the
/// check of its scenario fail. Each runs in a child process: loom reports
/// a failure by panicking inside its scheduler, which may abort.
#[test]
fn every_broken_variant_is_caught() {
    let exe = std::env::current_exe().expect("the test binary");
    for (fault, name, _, symptom) in VARIANTS {
        let output = std::process::Command::new(&exe)
            .args([
                "--exact",
                "model::broken_variant",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(VARIANT_VAR, format!("{fault:?}"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run the test binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{fault:?} not caught by {name}");
        let why = stderr.lines().find(|l| l.contains(symptom));
        assert!(
            why.is_some(),
            "{fault:?} failed {name}, but not with {symptom}:\n{stderr}"
        );
        eprintln!(
            "{fault:?}: caught by {name}: {}",
            why.unwrap_or_default().trim()
        );
    }
}
