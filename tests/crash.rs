//! Crash suite: a forked peer killed by `SIGKILL` at a random point, over and
//! over. However the kill lands (mid-stream, mid-echo, while it holds our
//! messages, before it even ran), the parent — blocked in or looping over
//! `recv`/`send` — gets `Disconnected`, every message it received
//! before is still intact, and nothing is left behind: descriptors and file
//! mappings return to where they were, and no `/dev/shm` file remains.
//!
//! Each iteration draws everything from a PRNG seeded by its number, so a
//! failure names an iteration that replays the same choices (the timing of a
//! delayed kill is the only thing not replayed exactly).
//!
//! Three tests, one per kind of peer, 100 iterations each after one warm-up
//! iteration: 300 kills in all. Iterations cycle through three set-ups:
//! default options, a small ring and region, and the `/dev/shm` fallback.
//! Short wait slices keep each kill's detection to a few milliseconds.
mod common;

use std::thread::JoinHandle;
use std::time::Duration;

use capnp_shm::{Backing, Channel, Error, Options, Received};
use common::{build, check, fd_count, fork, map_count, shm_files, shm_map_count, Child, Watchdog};

/// Killed and checked iterations per test, after the warm-up.
const ITERATIONS: u64 = 100;

/// Every wait sleeps at most this long before checking the peer is alive.
const SLICE: Duration = Duration::from_millis(10);

/// The longest delay before a timed kill.
const MAX_KILL_DELAY_US: u64 = 4000;

/// The most messages (sent plus received by the parent) before a counted kill.
const MAX_KILL_COUNT: u64 = 200;

/// A small deterministic PRNG (splitmix64): the same seed, the same choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Which end talks how.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// The child streams messages; the parent receives.
    Streams,
    /// The parent sends requests; the child answers each with a copy.
    Echoes,
    /// The parent streams; the child receives and holds some (or all) of them.
    Holds,
}

/// How the channel is set up.
#[derive(Debug, Clone, Copy)]
enum Setup {
    Default,
    /// A 4-message ring, a 64 KiB region and small first segments: constant
    /// backpressure, and multi-segment messages.
    Small,
    /// An unlinked `/dev/shm` file instead of a memfd.
    ShmFile,
}

impl Setup {
    fn of(iteration: u64) -> Setup {
        match iteration % 3 {
            0 => Setup::Default,
            1 => Setup::Small,
            _ => Setup::ShmFile,
        }
    }

    fn options(self, rng: &mut Rng) -> Options {
        let mut options = Options::new().wait_slice(SLICE);
        if rng.chance(1, 3) {
            // Sleep in the futex at once rather than spinning first.
            options = options.spin(Duration::ZERO);
        }
        match self {
            Setup::Default => options,
            Setup::Small => options
                .ring_capacity(4)
                .region_size(64 << 10)
                .first_segment_words(64),
            Setup::ShmFile => options.backing(Backing::ShmFile),
        }
    }

    /// Messages the parent may keep without ever stalling the other side
    /// for good: fewer than the ring holds.
    fn parent_holds(self) -> usize {
        match self {
            Setup::Small => 2,
            Setup::Default | Setup::ShmFile => 8,
        }
    }

    /// The most messages that can be in flight (ring capacity).
    fn ring(self) -> usize {
        match self {
            Setup::Small => 4,
            Setup::Default | Setup::ShmFile => 256,
        }
    }
}

/// Items and item length of a random small message: one to three items of
/// up to 2 KiB, mostly much smaller.
fn shape(rng: &mut Rng) -> (u32, usize) {
    let items = 1 + u32::try_from(rng.below(3)).unwrap();
    let len = match rng.below(10) {
        0..=5 => rng.below(64),
        6..=8 => 64 + rng.below(500),
        _ => 500 + rng.below(1548),
    };
    (items, usize::try_from(len).unwrap())
}

/// What a child that receives keeps.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Every message, never released: the parent ends up blocked in `send`.
    All,
    /// A random half, at most this many at a time: the parent keeps going.
    Some(usize),
}

/// When the child dies.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// A helper thread kills it after this long, wherever the parent is.
    Delay(Duration),
    /// The parent kills it itself once it has sent plus received this many
    /// messages, then goes on with its loop.
    Count(u64),
}

/// The kill, pending or done, and the child's exit status.
enum Killer {
    Thread(JoinHandle<i32>),
    Inline { child: Child, at: u64, done: bool },
}

impl Killer {
    fn start(child: Child, trigger: Trigger) -> Killer {
        match trigger {
            Trigger::Delay(delay) => Killer::Thread(std::thread::spawn(move || {
                std::thread::sleep(delay);
                child.kill();
                child.wait()
            })),
            Trigger::Count(at) => Killer::Inline {
                child,
                at,
                done: false,
            },
        }
    }

    /// Called by the parent with its running message count.
    fn observe(&mut self, count: u64) {
        if let Killer::Inline { child, at, done } = self {
            if !*done && count >= *at {
                child.kill();
                *done = true;
            }
        }
    }

    /// Waits for the child, killing it first if the loop ended before its
    /// `Count` (a bug in the test). Returns its exit status, and whether the
    /// kill came as planned.
    fn finish(self) -> (i32, bool) {
        match self {
            Killer::Thread(t) => (t.join().unwrap(), true),
            Killer::Inline { child, done, .. } => {
                child.kill();
                (child.wait(), done)
            }
        }
    }
}

/// Expects `Disconnected`; anything else fails the iteration.
fn expect_disconnected<T: std::fmt::Debug, E: Into<Error>>(
    what: &str,
    result: Result<T, E>,
    tag: &str,
) {
    match result.map_err(Into::into) {
        Err(Error::Disconnected) => {}
        other => panic!("{tag}: {what} after the kill gave {other:?}, not Disconnected"),
    }
}

/// One iteration: set up, fork, kill, check.
fn iteration(peer: Peer, iteration: u64) {
    let seed = iteration.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (peer as u64 + 1);
    let mut rng = Rng::new(seed);
    let setup = Setup::of(iteration);
    let options = setup.options(&mut rng);
    let child_seed = rng.next();
    // A child that holds everything blocks the parent's send for good, so
    // only a timed kill can end that iteration.
    let hold = match peer {
        Peer::Holds if rng.chance(1, 3) => Hold::All,
        Peer::Holds => Hold::Some(usize::try_from(rng.below(setup.ring().min(17) as u64)).unwrap()),
        Peer::Streams | Peer::Echoes => Hold::Some(0),
    };
    let trigger = if matches!(hold, Hold::All) || rng.chance(1, 2) {
        Trigger::Delay(Duration::from_micros(rng.below(MAX_KILL_DELAY_US + 1)))
    } else {
        Trigger::Count(rng.below(MAX_KILL_COUNT + 1))
    };
    let tag = format!("iteration {iteration} ({peer:?}, {setup:?}, {trigger:?}, {hold:?})");

    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    if let Setup::ShmFile = setup {
        assert!(!parent.is_sealed(), "{tag}: fallback region is sealed");
    }
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let channel = child_end.take().unwrap();
        let mut rng = Rng::new(child_seed);
        match peer {
            Peer::Streams => child_streams(&channel, &mut rng),
            Peer::Echoes => child_echoes(&channel),
            Peer::Holds => child_holds(&channel, &mut rng, hold),
        }
    });
    drop(child_end);
    let channel = parent.unwrap();
    let mut killer = Killer::start(child, trigger);

    let kept = match peer {
        Peer::Streams => parent_receives(&channel, &mut rng, &mut killer, setup, &tag),
        Peer::Echoes => parent_asks(&channel, &mut rng, &mut killer, setup, &tag),
        Peer::Holds => parent_sends(&channel, &mut rng, &mut killer, &tag),
    };
    let (status, killed_in_loop) = killer.finish();
    assert!(killed_in_loop, "{tag}: the loop ended before the kill");
    assert_eq!(
        status,
        128 + libc::SIGKILL,
        "{tag}: the child ended by itself (101: it panicked)"
    );

    // The channel stays ended, both ways, with the same error.
    expect_disconnected("recv", channel.recv().map(|_| ()), &tag);
    expect_disconnected("try_recv", channel.try_recv().map(|_| ()), &tag);
    let sent = channel.send(build(&channel, 0, 1, 8));
    expect_disconnected("send", sent, &tag);
    // What we received before the kill still reads back intact, although
    // its sender is dead: the mapping of its region lives on with us.
    for (n, m) in kept {
        assert_eq!(check(&m), n, "{tag}: a kept message changed");
    }
    drop(channel);

    if let Setup::ShmFile = setup {
        // Names made by this process (the pid is part of them): another
        // test run on the machine may be between its open and its unlink.
        let prefix = format!("capnp-shm-{}-", std::process::id());
        let left: Vec<String> = shm_files()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(left.is_empty(), "{tag}: files left in /dev/shm: {left:?}");
    }
}

// ---- the children ----------------------------------------------------------

/// Sends messages 0, 1, 2, … until it is killed, pausing now and then so the
/// parent also waits in `recv`.
fn child_streams(channel: &Channel, rng: &mut Rng) -> i32 {
    for n in 0.. {
        let (items, len) = shape(rng);
        if channel.send(build(channel, n, items, len)).is_err() {
            return 1;
        }
        if rng.chance(1, 50) {
            std::thread::sleep(Duration::from_micros(rng.below(500)));
        }
    }
    unreachable!()
}

/// Answers each request with a message of the same number and shape.
fn child_echoes(channel: &Channel) -> i32 {
    loop {
        let (n, items, len) = match channel.recv() {
            Ok(m) => {
                let n = check(&m);
                let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
                let len = if list.len() > 1 {
                    list.get(1).unwrap().len()
                } else {
                    0
                };
                (n, list.len() - 1, len)
            }
            Err(_) => return 1,
        };
        if channel.send(build(channel, n, items, len)).is_err() {
            return 2;
        }
    }
}

/// Receives and checks every message, keeping all of them or a random
/// subset of at most `max` (dropping the oldest kept one to make room).
fn child_holds(channel: &Channel, rng: &mut Rng, hold: Hold) -> i32 {
    let mut held: Vec<Received<'_>> = Vec::new();
    let mut expected = 0;
    loop {
        let Ok(m) = channel.recv() else {
            return 1;
        };
        if check(&m) != expected {
            return 3;
        }
        expected += 1;
        match hold {
            Hold::All => held.push(m),
            Hold::Some(max) if max > 0 && rng.chance(1, 2) => {
                if held.len() >= max {
                    held.remove(0);
                }
                held.push(m);
            }
            Hold::Some(_) => drop(m),
        }
    }
}

// ---- the parent ------------------------------------------------------------

/// Messages the parent kept, with their numbers, to check after the kill.
type Kept<'c> = Vec<(u64, Received<'c>)>;

/// Receives the child's stream until `Disconnected`.
fn parent_receives<'c>(
    channel: &'c Channel,
    rng: &mut Rng,
    killer: &mut Killer,
    setup: Setup,
    tag: &str,
) -> Kept<'c> {
    let mut kept = Kept::new();
    let mut expected = 0;
    loop {
        killer.observe(expected);
        match channel.recv() {
            Ok(m) => {
                assert_eq!(check(&m), expected, "{tag}: lost or reordered");
                keep(&mut kept, expected, m, rng, setup);
                expected += 1;
            }
            Err(e) => {
                expect_disconnected("recv", Err::<(), _>(e), tag);
                return kept;
            }
        }
    }
}

/// Sends requests and receives their answers until `Disconnected`; the kill
/// may land between a request and its answer.
fn parent_asks<'c>(
    channel: &'c Channel,
    rng: &mut Rng,
    killer: &mut Killer,
    setup: Setup,
    tag: &str,
) -> Kept<'c> {
    let mut kept = Kept::new();
    let mut count = 0;
    for n in 0.. {
        killer.observe(count);
        let (items, len) = shape(rng);
        if let Err(e) = channel.send(build(channel, n, items, len)) {
            expect_disconnected("send", Err::<(), _>(e), tag);
            return kept;
        }
        count += 1;
        killer.observe(count);
        match channel.recv() {
            Ok(m) => {
                assert_eq!(check(&m), n, "{tag}: wrong answer");
                keep(&mut kept, n, m, rng, setup);
                count += 1;
            }
            Err(e) => {
                expect_disconnected("recv", Err::<(), _>(e), tag);
                return kept;
            }
        }
    }
    unreachable!()
}

/// Streams messages to a child that holds some until `Disconnected`; with a
/// child that holds everything, this blocks in `send` until the kill.
fn parent_sends<'c>(
    channel: &'c Channel,
    rng: &mut Rng,
    killer: &mut Killer,
    tag: &str,
) -> Kept<'c> {
    for n in 0.. {
        killer.observe(n);
        let (items, len) = shape(rng);
        if let Err(e) = channel.send(build(channel, n, items, len)) {
            expect_disconnected("send", Err::<(), _>(e), tag);
            return Kept::new();
        }
    }
    unreachable!()
}

/// Keeps a received message now and then (up to the set-up's bound), or
/// drops a kept one, so releases also come out of order.
fn keep<'c>(kept: &mut Kept<'c>, n: u64, m: Received<'c>, rng: &mut Rng, setup: Setup) {
    if !kept.is_empty() && rng.chance(1, 4) {
        let i = usize::try_from(rng.below(kept.len() as u64)).unwrap();
        kept.swap_remove(i);
    }
    if kept.len() < setup.parent_holds() && rng.chance(1, 8) {
        kept.push((n, m));
    }
}

// ---- the tests -------------------------------------------------------------

/// Runs one warm-up iteration (lazily created process state is not a leak),
/// then [`ITERATIONS`] checked ones: after each, the descriptors and file
/// mappings are back to the warm-up's figures and no region is mapped.
fn run(peer: Peer) {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    iteration(peer, 0);
    let fds = fd_count();
    let maps = map_count();
    for i in 1..=ITERATIONS {
        iteration(peer, i);
        assert_eq!(
            fd_count(),
            fds,
            "iteration {i} ({peer:?}): descriptors leaked"
        );
        assert_eq!(
            map_count(),
            maps,
            "iteration {i} ({peer:?}): file mappings leaked:\n{}",
            std::fs::read_to_string("/proc/self/maps").unwrap()
        );
        assert_eq!(
            shm_map_count(),
            0,
            "iteration {i} ({peer:?}): region still mapped"
        );
    }
}

#[test]
fn a_streaming_peer_killed_at_random_ends_recv_with_disconnected() {
    run(Peer::Streams);
}

#[test]
fn an_echoing_peer_killed_at_random_ends_the_exchange_with_disconnected() {
    run(Peer::Echoes);
}

#[test]
fn a_peer_holding_messages_killed_at_random_ends_send_with_disconnected() {
    run(Peer::Holds);
}
