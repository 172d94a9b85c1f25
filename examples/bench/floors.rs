//! Physical floors: what the hardware and the kernel allow, measured in the
//! same run as the transports.
//!
//! - spin floor: one cache line bounced between two spinning processes (a
//!   parent and a forked child, as for every other row);
//! - futex floor: the same ping-pong where every hop sleeps in `futex(2)` and
//!   is woken, the floor of a transport that never spins;
//! - memory floors: `memcpy` and the bench's checksum over 1 MiB in one
//!   process, the floor of a one-way transfer that the receiver reads; and
//!   a 1 MiB message's memory work done in one process: zero the segment
//!   (capnp's allocator contract), copy the payload in (`set_data`), sum it
//!   (the receiver);
//! - build floor: capnp building the one-way 64 B row's message in one
//!   process, on a reused buffer, with no transport: the most messages a
//!   second that any sender building each one could send;
//! - ring floor: the one-way 64 B row's workload between a parent and a
//!   forked child over a bare ring in shared memory (build as the build
//!   floor does, copy the segment into a slot, store a tag; read it in
//!   place): the most messages a second any transport between two
//!   processes could carry on the machine as it is during the run;
//! - echo floor: capnp's work in one 64 B round trip (build the request,
//!   read it, build the answer, read it), in one process with no
//!   transport: what a round trip costs on top of the spin floor, since
//!   the two sides of a ping-pong never work at once;
//! - ring echo floor: that round trip between a parent and a forked child
//!   over one slot each way in shared memory, the message and its tag on
//!   the same lines: the round trip of a transport with nothing to check
//!   and nothing to manage;
//! - stall floor: how often, and for how long, a process that spins on the
//!   clock loses its vCPU all the same (see [`stalls`]): what bounds the
//!   round trips' tail.
//!
//! # Notes about memory ordering
//!
//! The ball is passed with a `Release` store and seen with an `Acquire` load,
//! as a real transport would publish a message with it; no other data rides
//! on it here. On x86 both are plain moves, so the floor is not inflated by
//! fences.

use std::hint::{black_box, spin_loop};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{checksum, fill_blob, fork_peer, payload, read_blob};

/// How long one side waits for the other before it gives up: the
/// ping-pong has no other way to notice a peer that died.
const STALL: Duration = Duration::from_secs(10);

/// Spins of a waiting spin-floor or ring-floor side before it starts yielding the CPU as
/// well: only reached when both processes share one vCPU, where spinning
/// alone would wait for the scheduler's time slice on every hop.
const SPINS_BEFORE_YIELD: u32 = 1 << 16;

/// How long one `FUTEX_WAIT` sleeps before the waiter looks again.
const FUTEX_TIMEOUT: Duration = Duration::from_millis(100);

/// A word alone on its 128 bytes (two cache lines, as crossbeam's
/// `CachePadded`, so the adjacent-line prefetcher does not couple them).
#[repr(C, align(128))]
struct CacheLine<T>(T);

/// The shared page of a ping-pong. Every field is an atomic, so the zeroed
/// page the kernel hands out is a valid value.
#[repr(C)]
struct PingPong {
    /// The spin floor's ball: odd when the parent has served it, even when
    /// the peer has returned it.
    spin: CacheLine<AtomicU64>,
    /// The futex floor's ball, as `spin`; 32 bits, as `futex(2)` needs.
    futex: CacheLine<AtomicU32>,
    /// The peer's CPU plus one, sampled mid-measurement; 0 until it writes
    /// it, or when it could not tell. Written by the peer only.
    peer_cpu: CacheLine<AtomicU32>,
}

const _: () = assert!(std::mem::size_of::<PingPong>() == 384);

/// A `T` in its own `MAP_SHARED | MAP_ANONYMOUS` mapping, zero-filled, so
/// a forked child shares it; unmapped on drop. For types of atomics (and
/// cells of plain words) only, for which all-zero bytes are a valid value:
/// see [`ZeroValid`].
struct Shared<T: ZeroValid> {
    ptr: NonNull<T>,
}

/// A type for which all-zero bytes are a valid value.
///
/// # Safety
///
/// Implement it only for such types.
unsafe trait ZeroValid {}

// SAFETY: atomics only.
unsafe impl ZeroValid for PingPong {}

impl<T: ZeroValid> Shared<T> {
    /// Maps a zeroed `T`.
    fn new() -> Shared<T> {
        // SAFETY: a fresh anonymous mapping: no address hint, no descriptor;
        // it overlaps nothing of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                std::mem::size_of::<T>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            p != libc::MAP_FAILED,
            "mmap failed: {}",
            io::Error::last_os_error()
        );
        let ptr = NonNull::new(p.cast::<T>()).expect("mmap returned null");
        // Page-aligned, so aligned for the 128-byte lines.
        assert!(ptr.as_ptr().is_aligned(), "mmap returned an unaligned page");
        Shared { ptr }
    }

    fn get(&self) -> &T {
        // SAFETY: the mapping is live until `self` drops (the reference
        // borrows `self`), aligned (checked in `new`), zero-filled by the
        // kernel, and all-zero bytes are a valid `T` (`ZeroValid`); only
        // shared references are ever made.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ZeroValid> Drop for Shared<T> {
    fn drop(&mut self) {
        // SAFETY: this is exactly the range `new` mapped, and no reference
        // into it outlives `self`. A failure would leave a page mapped:
        // nothing to do about it here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), std::mem::size_of::<T>()) };
    }
}

/// Spins until `ready()`; after [`SPINS_BEFORE_YIELD`] spins, yields the CPU
/// between looks as well.
///
/// # Panics
///
/// If `ready()` stays false for [`STALL`] after the spinning: the other
/// process is gone or stuck (`what` names it).
fn spin_until(mut ready: impl FnMut() -> bool, what: &str) {
    let mut spins = 0u32;
    let mut since = None;
    while !ready() {
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            spin_loop();
        } else {
            std::thread::yield_now();
            let since = *since.get_or_insert_with(Instant::now);
            assert!(since.elapsed() < STALL, "{what} stalled");
        }
    }
}

impl CacheLine<AtomicU64> {
    /// Waits until a ring of `slots` slots has room for message `seq`:
    /// until this count of messages the receiver is done with (last seen
    /// as `seen`, updated) is within `slots` of it. `what` names the
    /// receiver, for [`spin_until`].
    fn wait_for_room(&self, seen: &mut u64, seq: u64, slots: usize, what: &str) {
        let slots = slots as u64;
        if seq - *seen >= slots {
            spin_until(
                || {
                    // Acquire: the receiver is done with the slot.
                    *seen = self.0.load(Ordering::Acquire);
                    seq - *seen < slots
                },
                what,
            );
        }
    }
}

/// How a side waits for the ball.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Spins on the cache line (`std::hint::spin_loop`).
    Spin,
    /// Sleeps in `FUTEX_WAIT`; the passer always calls `FUTEX_WAKE`.
    Futex,
}

impl Hop {
    /// Hands the ball over: stores `value` (and, for the futex, wakes the
    /// other side, every time).
    fn pass(self, line: &PingPong, value: u32) {
        match self {
            // Release: publishes, as a transport's store would (see the
            // module notes).
            Hop::Spin => line.spin.0.store(u64::from(value), Ordering::Release),
            Hop::Futex => {
                // Release: as above.
                line.futex.0.store(value, Ordering::Release);
                futex_wake(&line.futex.0);
            }
        }
    }

    /// Waits until the ball holds `value`.
    ///
    /// # Panics
    ///
    /// If the other side has not passed it within [`STALL`].
    fn wait(self, line: &PingPong, value: u32) {
        match self {
            Hop::Spin => {
                // Acquire: pairs with the Release in `pass`.
                let arrived = || line.spin.0.load(Ordering::Acquire) == u64::from(value);
                spin_until(arrived, "spin ping-pong");
            }
            Hop::Futex => {
                let since = Instant::now();
                loop {
                    // Acquire: pairs with the Release in `pass`.
                    let seen = line.futex.0.load(Ordering::Acquire);
                    if seen == value {
                        break;
                    }
                    futex_wait(&line.futex.0, seen, FUTEX_TIMEOUT);
                    assert!(since.elapsed() < STALL, "futex ping-pong stalled");
                }
            }
        }
    }
}

/// Sleeps while `*word == expected`, for at most `timeout` (`futex(2)`,
/// `FUTEX_WAIT`; shared, not private: the word is in memory two processes
/// map). Returns on a wake, a signal, a timeout, or at once when the word
/// already differs: the caller re-checks in every case.
///
/// # Panics
///
/// If the kernel refuses the call (`ENOSYS`, a seccomp filter): there is no
/// futex floor to measure then.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    // c_long is 32 bits on 32-bit targets; nanoseconds always fit.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always below 1e9, so it fits.
        tv_nsec: libc::c_long::try_from(timeout.subsec_nanos()).unwrap_or(0),
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call and
    // FUTEX_WAIT only reads it; `ts` is a valid relative timeout; the last two
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
    if r != 0 {
        let e = io::Error::last_os_error();
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR)
            ),
            "FUTEX_WAIT failed: {e}"
        );
    }
}

/// Wakes the waiter on `word` (`futex(2)`, `FUTEX_WAKE`, shared).
///
/// # Panics
///
/// If the kernel refuses the call.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it
    // beyond computing its key; the last three arguments are ignored.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    assert!(r >= 0, "FUTEX_WAKE failed: {}", io::Error::last_os_error());
}

/// The CPU this thread runs on now (`sched_getcpu(3)`), if it can tell.
fn current_cpu() -> Option<u32> {
    // SAFETY: no arguments; returns -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).ok()
}

/// Where the two processes of one ping-pong ran, sampled half-way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) parent: Option<u32>,
    pub(crate) peer: Option<u32>,
}

/// Ping-pong round trips between this process and a forked child, in
/// nanoseconds, timed exactly as `round_trips` times the transports: we
/// pass the ball (odd), the peer waits for it and passes it back (even).
/// `warmup` trips first, not recorded. Also returns where both sides ran.
pub(crate) fn ping_pong(hop: Hop, warmup: u64, count: u64) -> (Vec<u64>, Placement) {
    let page = Shared::<PingPong>::new();
    let trips = u32::try_from(warmup + count).expect("fewer than 2^31 round trips");
    assert!(trips < u32::MAX / 2, "fewer than 2^31 round trips");
    let middle = warmup + count / 2;
    let (samples, parent) = fork_peer(
        page.get(),
        page.get(),
        |line| {
            for i in 0..trips {
                hop.wait(line, 2 * i + 1);
                hop.pass(line, 2 * i + 2);
                // After the pass, so the sample is not on the timed path.
                if u64::from(i) == middle {
                    let cpu = current_cpu().map_or(0, |c| c.saturating_add(1));
                    // Relaxed: read only after the peer has exited (waitpid).
                    line.peer_cpu.0.store(cpu, Ordering::Relaxed);
                }
            }
            0
        },
        |line| {
            let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            let mut parent = None;
            for i in 0..trips {
                let t = Instant::now();
                hop.pass(line, 2 * i + 1);
                hop.wait(line, 2 * i + 2);
                let elapsed = t.elapsed();
                if u64::from(i) == middle {
                    parent = current_cpu();
                }
                if u64::from(i) >= warmup {
                    samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                }
            }
            (samples, parent)
        },
        "ping-pong peer",
    );
    // The peer has exited: what it wrote is final. It is our own child, but
    // still data: 0 means it could not tell.
    let peer = page.get().peer_cpu.0.load(Ordering::Relaxed).checked_sub(1);
    (samples, Placement { parent, peer })
}

/// Rounds of [`core_sharing`]'s loops together: the fastest counts.
const CONTENTION_ROUNDS: usize = 3;

/// The shared memory of [`core_sharing`].
#[repr(C)]
struct Contention {
    /// The round the parent has started (0: none yet); before round 1, the
    /// peer stores [`READY`] once it is pinned and warmed up, or
    /// [`UNPINNED`].
    round: CacheLine<AtomicU32>,
    /// The peer's loop time in each round, in nanoseconds, plus one; 0
    /// until it writes it.
    peer_nanos: CacheLine<[AtomicU64; CONTENTION_ROUNDS]>,
}

// SAFETY: atomics only.
unsafe impl ZeroValid for Contention {}

/// [`Contention::round`] when the peer is ready for round 1.
const READY: u32 = u32::MAX;

/// [`Contention::round`] when the peer could not pin itself to its CPU.
const UNPINNED: u32 = u32::MAX - 1;

/// Iterations of [`busy_loop`] in [`core_sharing`]: about 0.05 s a run.
const BUSY_ITERATIONS: u64 = 20_000_000;

/// Work that keeps one core's multiplier busy: eight independent
/// multiply-add chains, one multiply a cycle. Two hyperthreads of one core
/// share that unit, so each runs it at about half speed beside the other;
/// two cores each run it at full speed.
fn busy_loop(iterations: u64) -> u64 {
    let mut chains = [1u64, 2, 3, 4, 5, 6, 7, 8];
    for i in 0..iterations {
        for (k, x) in (0u64..).zip(chains.iter_mut()) {
            *x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(i ^ k);
        }
    }
    chains.iter().fold(0, |acc, x| acc ^ x)
}

/// An empty CPU set.
fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    unsafe { std::mem::zeroed() }
}

/// Pins the calling thread to `cpu`; `false` when the kernel refuses (a
/// CPU outside the process's set, or one that does not exist).
fn pin_to(cpu: u32) -> bool {
    let Ok(cpu) = usize::try_from(cpu) else {
        return false;
    };
    let mut set = empty_cpu_set();
    // SAFETY: CPU_SET ignores a CPU beyond the set's size.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the kernel only reads the set, of the size given.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
}

/// The calling thread's CPU set, to restore after [`pin_to`].
fn affinity() -> Option<libc::cpu_set_t> {
    let mut set = empty_cpu_set();
    // SAFETY: the kernel writes at most the size given.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (r == 0).then_some(set)
}

/// The CPU a peer forked during [`apart`] pins itself to, plus one (0: no
/// pinning).
static PEER_CPU: AtomicU32 = AtomicU32::new(0);

/// In a peer just forked (`fork_peer`): pins it to the CPU [`apart`] chose,
/// if one is chosen.
pub(crate) fn place_peer() {
    if let Some(cpu) = PEER_CPU.load(Ordering::Relaxed).checked_sub(1) {
        pin_to(cpu);
    }
}

/// Runs `f` with this process pinned to one CPU and each peer it forks
/// meanwhile pinned to another (the first two it may use), so that every
/// wake crosses between the two: a process that sleeps on every hop is
/// otherwise moved next to its waker on some machines, or not, as the
/// scheduler pleases (here a futex round trip took 2 µs with both on one
/// vCPU and 53 µs apart), and two rows compared would not be measured
/// alike. Runs `f` as it is when there are not two CPUs to pin to. The
/// calling thread's CPU set is restored.
pub(crate) fn apart<R>(f: impl FnOnce() -> R) -> R {
    let Some(saved) = affinity() else {
        return f();
    };
    // SAFETY: CPU_ISSET only reads the set, and ignores a CPU beyond it.
    let mut cpus =
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &saved) });
    let (Some(a), Some(b)) = (cpus.next(), cpus.next()) else {
        return f();
    };
    let (Ok(a), Ok(b)) = (u32::try_from(a), u32::try_from(b)) else {
        return f();
    };
    if !pin_to(a) {
        return f();
    }
    PEER_CPU.store(b + 1, Ordering::Relaxed);
    let result = f();
    PEER_CPU.store(0, Ordering::Relaxed);
    // SAFETY: `saved` is the set the kernel gave us.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &saved) };
    result
}

/// Whether CPUs `a` and `b` share a physical core, measured: how many
/// times longer [`busy_loop`] takes on `a` while a forked child runs it on
/// `b` at the same time than on `a` alone (about 2 for hyperthreads of one
/// core, about 1 for two cores). `None` when a CPU cannot be pinned to.
/// The calling thread's CPU set is restored.
pub(crate) fn core_sharing(a: u32, b: u32) -> Option<f64> {
    let saved = affinity()?;
    let restore = || {
        // SAFETY: `saved` is the set the kernel gave us.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &saved) };
    };
    if !pin_to(a) {
        restore();
        return None;
    }
    let timed = || {
        let start = Instant::now();
        black_box(busy_loop(black_box(BUSY_ITERATIONS)));
        start.elapsed()
    };
    // The first run warms the CPU up (it may start at a lower clock); the
    // faster of two more is the figure.
    timed();
    let alone = timed().min(timed());
    let shared = Shared::<Contention>::new();
    let together = fork_peer(
        shared.get(),
        shared.get(),
        |c| {
            if !pin_to(b) {
                c.round.0.store(UNPINNED, Ordering::Release);
                return 0;
            }
            timed();
            c.round.0.store(READY, Ordering::Release);
            for (round, nanos) in (1..).zip(&c.peer_nanos.0) {
                spin_until(
                    || c.round.0.load(Ordering::Acquire) == round,
                    "core test parent",
                );
                let took = u64::try_from(timed().as_nanos()).unwrap_or(u64::MAX - 1);
                nanos.store(took + 1, Ordering::Release);
            }
            0
        },
        |c| {
            let mut said = 0;
            let answered = || {
                said = c.round.0.load(Ordering::Acquire);
                said >= UNPINNED
            };
            spin_until(answered, "core test peer");
            let mut ours = Vec::with_capacity(CONTENTION_ROUNDS);
            if said == UNPINNED {
                return ours; // no times: `None` below
            }
            for (round, nanos) in (1..).zip(&c.peer_nanos.0) {
                c.round.0.store(round, Ordering::Release);
                ours.push(timed());
                // The peer's loop ends about when ours does.
                spin_until(|| nanos.load(Ordering::Acquire) != 0, "core test peer");
            }
            ours
        },
        "core test peer",
    );
    restore();
    // The peer has exited (fork_peer waits): its times are final. In each
    // round the slower of the two loops says how much they got in each
    // other's way; the least of the rounds is the figure.
    let rounds = together.iter().zip(&shared.get().peer_nanos.0);
    let slowest = rounds.map(|(ours, theirs)| {
        let theirs = theirs.load(Ordering::Acquire).checked_sub(1)?;
        Some(ours.as_secs_f64().max(theirs as f64 / 1e9))
    });
    let slowest = slowest.collect::<Option<Vec<f64>>>()?;
    let least = slowest.into_iter().reduce(f64::min)?;
    Some(least / alone.as_secs_f64())
}

/// A pause in a spinning process longer than this is a stall: one turn of
/// [`stalls`]' loop takes some 25 ns here.
const STALL_FROM: Duration = Duration::from_micros(1);

/// What [`stalls`] measured: how often, and for how long, a process that
/// never sleeps loses its vCPU anyway.
pub(crate) struct Stalls {
    /// The median stall, in µs.
    pub(crate) length: f64,
    /// The median time from one stall to the next, in µs.
    pub(crate) every: f64,
    /// The share of the time lost to stalls.
    pub(crate) lost: f64,
}

/// Spins on the clock for `span` and notes every pause between two
/// readings longer than [`STALL_FROM`]: time the vCPU was taken away from
/// a process that never sleeps and makes no system call (by the host, on
/// the development machine: the guest counts no interrupt and no steal
/// for them). A round trip between two spinning processes meets one with
/// a chance of about its length over `every`: on the development machine,
/// with a stall of about 3 µs every 55-58 µs, 1.2-1.5% of 0.68 µs round
/// trips took over 2 µs. The two vCPUs stall together: spinning on both
/// at once, 96% of one's stalls overlapped a stall of the other.
pub(crate) fn stalls(span: Duration) -> Stalls {
    // Room for a stall every 5 µs, made before the clock starts: growing a
    // vector in the loop would itself pause it.
    let room = usize::try_from(span.as_micros() / 5).unwrap_or(0);
    let (mut at, mut lengths) = (Vec::with_capacity(room), Vec::with_capacity(room));
    let start = Instant::now();
    let mut last = start;
    let mut lost = Duration::ZERO;
    while last - start < span {
        let now = Instant::now();
        let pause = now - last;
        if pause > STALL_FROM {
            at.push(now - start);
            lengths.push(pause.as_secs_f64() * 1e6);
            lost += pause;
        }
        last = now;
    }
    let every = at
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e6)
        .collect();
    Stalls {
        length: super::median(lengths),
        every: super::median(every),
        lost: lost.as_secs_f64() / (last - start).as_secs_f64(),
    }
}

/// Size of the buffers of the memory floors.
const MEMORY_BUFFER: usize = 1 << 20;

/// One-process memory floors, each over about `total` bytes in 1 MiB
/// passes, in bytes per second. Each is timed after one untimed pass, so
/// page faults are not counted.
pub(crate) fn memory_floors(total: u64) -> MemoryFloors {
    let src = payload(MEMORY_BUFFER);
    let mut dst = vec![0u8; MEMORY_BUFFER];
    let passes = (total / MEMORY_BUFFER as u64).max(1);
    let bytes = (passes * MEMORY_BUFFER as u64) as f64;
    let timed = |pass: &mut dyn FnMut()| {
        pass();
        let start = Instant::now();
        for _ in 0..passes {
            pass();
        }
        bytes / start.elapsed().as_secs_f64()
    };
    let copy = timed(&mut || black_box(&mut dst[..]).copy_from_slice(black_box(&src)));
    let sum = timed(&mut || {
        black_box(checksum(black_box(&src)));
    });
    let message = timed(&mut || {
        let segment = black_box(&mut dst[..]);
        segment.fill(0);
        segment.copy_from_slice(black_box(&src));
        black_box(checksum(segment));
    });
    MemoryFloors { copy, sum, message }
}

/// Messages a second that capnp builds the 64 B blob of the one-way 64 B
/// row (`fill_blob`), `count` times in one process: the builder on one
/// reused scratch buffer (capnp's `ScratchSpaceHeapAllocator`, kept from
/// message to message, which zeroes the words a message used when it is
/// dropped, as a segment must start zeroed; a new one would zero its whole
/// buffer each time), then its segments for output, as a send asks for them. No
/// transport and no segment from the heap: the least a sender does for
/// each message, so the most messages a second any sender that builds each
/// one can send.
pub(crate) fn build_floor(count: u64) -> f64 {
    let payload = payload(64);
    let mut scratch = Scratch::default();
    let mut allocator = scratch.allocator();
    let mut build = |seq: u64| {
        let mut message = capnp::message::Builder::new(&mut allocator);
        fill_blob(&mut message, seq, black_box(&payload));
        black_box(message.get_segments_for_output()[0].len());
    };
    for seq in 0..count.min(10_000) {
        build(seq);
    }
    let start = Instant::now();
    for seq in 0..count {
        build(seq);
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// A floor's capnp allocator: the first segment on a reused scratch buffer.
type Allocator<'a> = capnp::message::ScratchSpaceHeapAllocator<'a>;

/// The scratch buffer of a floor's builder: 1 KiB of words, enough for
/// every message a floor builds.
struct Scratch([capnp::Word; 128]);

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch([capnp::word(0, 0, 0, 0, 0, 0, 0, 0); 128])
    }
}

impl Scratch {
    /// An allocator over the buffer, to be kept for every message: made
    /// once, it zeroes the whole buffer once, and then only the words each
    /// message used as the message drops.
    fn allocator(&mut self) -> Allocator<'_> {
        capnp::message::ScratchSpaceHeapAllocator::new(capnp::Word::words_to_bytes_mut(&mut self.0))
    }
}

/// Slots of the ring floor's ring.
const RING_SLOTS: usize = 1024;

/// Words of one ring slot's segment: room for the 64 B blob's one segment
/// (11 words).
const SLOT_WORDS: usize = 15;

/// One slot of the ring floor: a tag and a copy of one message's segment,
/// alone on its 128 bytes.
#[repr(C, align(128))]
struct Slot {
    /// `(seq + 1) << 32 | segment bytes` of the message in the slot, stored
    /// after its words (`Release`); the receiver waits on it.
    tag: AtomicU64,
    /// The segment: written by the sender only while the receiver has read
    /// the slot's last message (`consumed`), read by the receiver only once
    /// the tag names the message it waits for.
    words: std::cell::UnsafeCell<[u64; SLOT_WORDS]>,
}

impl Slot {
    /// Builds the bench's blob (`fill_blob`: `value`, `payload`) with capnp
    /// on `scratch`, as [`build_floor`] does, copies its segment into the
    /// slot and stores the tag naming it message `seq`.
    ///
    /// # Safety
    ///
    /// The reader of the slot is done with its last message and reads none
    /// of its words until it sees the new tag.
    unsafe fn put(&self, scratch: &mut Allocator<'_>, seq: u64, value: u64, payload: &[u8]) {
        let mut message = capnp::message::Builder::new(scratch);
        fill_blob(&mut message, value, black_box(payload));
        let output = message.get_segments_for_output();
        let segment = output[0];
        assert!(output.len() == 1 && segment.len() <= SLOT_WORDS * 8);
        // SAFETY: nobody reads the words now (the caller's duty); the
        // segment fits (asserted).
        unsafe {
            let words = self.words.get().cast::<u8>();
            std::ptr::copy_nonoverlapping(segment.as_ptr(), words, segment.len());
        }
        // Release: publishes the words above.
        self.tag
            .store((seq + 1) << 32 | segment.len() as u64, Ordering::Release);
    }

    /// Waits until the slot holds message `seq`, then reads it with capnp
    /// in place (`read_blob`): its `(value, checksum)`.
    ///
    /// # Safety
    ///
    /// The writer of the slot does not write its words again until this
    /// side has said it is done with message `seq`.
    unsafe fn take(&self, seq: u64, what: &str) -> (u64, u64) {
        let mut tag = 0;
        spin_until(
            || {
                // Acquire: pairs with the Release in `put`.
                tag = self.tag.load(Ordering::Acquire);
                tag >> 32 == seq + 1
            },
            what,
        );
        let len = usize::try_from(tag & 0xffff_ffff).unwrap_or(usize::MAX);
        assert!(len <= SLOT_WORDS * 8, "a segment larger than its slot");
        // SAFETY: the tag names message `seq`, whose words the writer
        // stored before it (Acquire above), and it writes none of them
        // while we read (the caller's duty); `len` is within the slot
        // (asserted).
        let bytes = unsafe { std::slice::from_raw_parts(self.words.get().cast::<u8>(), len) };
        let segments = [bytes];
        let message = capnp::message::Reader::new(
            capnp::message::SegmentArray::new(&segments),
            capnp::message::ReaderOptions::new(),
        );
        read_blob(&message)
    }
}

/// The shared memory of the ring floor.
#[repr(C)]
struct Ring {
    /// Messages the receiver has read: a slot is the sender's again once
    /// this passes the message in it.
    consumed: CacheLine<AtomicU64>,
    slots: [Slot; RING_SLOTS],
}

/// The index of message `seq`'s slot in a ring of `slots` slots.
fn slot_index(seq: u64, slots: usize) -> usize {
    // The remainder is below `slots`, a usize.
    #[allow(clippy::cast_possible_truncation)]
    let i = (seq % slots as u64) as usize;
    i
}

impl Ring {
    /// The slot of message `seq`.
    fn slot(&self, seq: u64) -> &Slot {
        &self.slots[slot_index(seq, RING_SLOTS)]
    }
}

// SAFETY: atomics and cells of plain words only.
unsafe impl ZeroValid for Ring {}

// SAFETY: `Slot::words` is written and read only in the turns the tag and
// `consumed` hand out (see `Slot`); everything else is atomic.
unsafe impl Sync for Ring {}

/// Messages a second through the least a transport between two processes
/// can be: the one-way 64 B row's workload (the peer builds each blob as
/// in [`build_floor`]; we read it with `read_blob` and check it) over a
/// bare ring in shared memory. The sender copies the message's segment into
/// a slot and stores its tag; the receiver waits on the tag, reads the
/// segment in place with capnp, and stores its count. No validation, no
/// sleeping, no space to manage: the floor of the one-way 64 B row between
/// the same two kinds of processes, on the machine as it is at the time.
/// Timed as `throughput` times the row, from the first message on.
///
/// # Panics
///
/// If a message arrives wrong, or a side stalls (see [`spin_until`]).
pub(crate) fn ring_floor(count: u64) -> f64 {
    assert!(count < u64::from(u32::MAX), "the tag holds a 32-bit count");
    let payload = payload(64);
    let expected = checksum(&payload);
    let ring = Shared::<Ring>::new();
    fork_peer(
        ring.get(),
        ring.get(),
        |ring| {
            let mut scratch = Scratch::default();
            let mut scratch = scratch.allocator();
            let mut consumed = 0;
            for seq in 0..count {
                ring.consumed
                    .wait_for_room(&mut consumed, seq, RING_SLOTS, "ring floor receiver");
                // SAFETY: the receiver has read the slot's last message
                // (`consumed` is past it), and reads it again only for
                // message `seq`, once tagged.
                unsafe { ring.slot(seq).put(&mut scratch, seq, seq, &payload) };
            }
            0
        },
        |ring| {
            let mut start = Instant::now();
            for seq in 0..count {
                // SAFETY: the sender rewrites the slot only once `consumed`
                // passes `seq`, which we store below, after reading.
                let (got, sum) = unsafe { ring.slot(seq).take(seq, "ring floor sender") };
                // The clock starts at the first message, as for the row.
                if seq == 0 {
                    start = Instant::now();
                }
                assert_eq!((got, sum), (seq, expected), "ring floor: lost or corrupted");
                // Release: our reads of the slot are done.
                ring.consumed.0.store(seq + 1, Ordering::Release);
            }
            (count - 1) as f64 / start.elapsed().as_secs_f64()
        },
        "ring floor peer",
    )
}

/// The shared memory of the echo ring floor: a slot each way.
#[repr(C)]
struct EchoRing {
    request: Slot,
    answer: Slot,
}

// SAFETY: cells of plain words and atomics only.
unsafe impl ZeroValid for EchoRing {}

// SAFETY: each slot's words are written and read in the turns its tag and
// the other slot's hand out (see `ring_echo`); everything else is atomic.
unsafe impl Sync for EchoRing {}

/// Round trips of the 64 B round-trip row's workload over the least a
/// transport between two processes can be: one slot each way, the message
/// and its tag on the same lines (as in [`ring_floor`]). We build the
/// request in our slot; the peer reads it in place and builds the answer
/// (`seq ^ checksum`, no payload, as the row's peer does) in its slot; we
/// read that. Each round trip's nanoseconds, timed as the row times its
/// own, after `warmup` more.
///
/// # Panics
///
/// If an answer arrives wrong, or a side stalls (see [`spin_until`]).
pub(crate) fn ring_echo(warmup: u64, count: u64) -> Vec<u64> {
    let trips = warmup + count;
    assert!(trips < u64::from(u32::MAX), "the tag holds a 32-bit count");
    let payload = payload(64);
    let expected = checksum(&payload);
    let ring = Shared::<EchoRing>::new();
    fork_peer(
        ring.get(),
        ring.get(),
        |ring| {
            let mut scratch = Scratch::default();
            let mut scratch = scratch.allocator();
            for seq in 0..trips {
                // SAFETY: the parent writes the request slot again only
                // after it has our answer to `seq`, which we put after
                // reading; and it reads our answer slot only for `seq`,
                // once tagged, after which we write it again only once its
                // next request shows it is done.
                let (got, sum) = unsafe { ring.request.take(seq, "ring echo parent") };
                // SAFETY: as above.
                unsafe { ring.answer.put(&mut scratch, seq, got ^ sum, &[]) };
            }
            0
        },
        |ring| {
            let mut scratch = Scratch::default();
            let mut scratch = scratch.allocator();
            let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for seq in 0..trips {
                let start = Instant::now();
                // SAFETY: the peer has read our last request (we have its
                // answer) and reads the slot again only for `seq`, once
                // tagged.
                unsafe { ring.request.put(&mut scratch, seq, seq, &payload) };
                // SAFETY: the peer writes its answer slot again only after
                // our next request, which we put after reading this.
                let (answer, _) = unsafe { ring.answer.take(seq, "ring echo peer") };
                let elapsed = start.elapsed();
                assert_eq!(answer, seq ^ expected, "ring echo: wrong answer");
                if seq >= warmup {
                    samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                }
            }
            samples
        },
        "ring echo peer",
    )
}

/// capnp's work in `count` round trips of the 64 B round-trip row, in one
/// process (after `warmup` more): build the request on one reused scratch
/// buffer, read it (`read_blob`, which sums the payload), build the answer
/// on another, read it. Returns each round trip's nanoseconds, timed as
/// the row times its own.
pub(crate) fn echo_floor(warmup: u64, count: u64) -> Vec<u64> {
    let payload = payload(64);
    let (mut a, mut b) = (Scratch::default(), Scratch::default());
    let (mut a, mut b) = (a.allocator(), b.allocator());
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for seq in 0..warmup + count {
        let start = Instant::now();
        let mut request = capnp::message::Builder::new(&mut a);
        fill_blob(&mut request, seq, black_box(&payload));
        let (got, sum) = read_blob(&request.into_reader());
        let mut answer = capnp::message::Builder::new(&mut b);
        fill_blob(&mut answer, got ^ sum, &[]);
        let (back, _) = read_blob(&answer.into_reader());
        let elapsed = start.elapsed();
        black_box(back);
        if seq >= warmup {
            samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
        }
    }
    samples
}

/// What [`memory_floors`] measured, in bytes per second.
pub(crate) struct MemoryFloors {
    /// `memcpy` into another, reused buffer.
    pub(crate) copy: f64,
    /// The bench's `checksum`.
    pub(crate) sum: f64,
    /// A one-way 1 MiB message's work on its bytes, in one process and one
    /// reused buffer: zeroing (a capnp segment must start zeroed), the copy
    /// of the payload in, and the receiver's checksum.
    pub(crate) message: f64,
}

/// Slots of the pipe floor, of 1 MiB each.
const PIPE_SLOTS: usize = 8;

/// The shared memory of the pipe floor: a tag and 1 MiB per slot.
#[repr(C)]
struct Pipe {
    /// Messages the receiver has summed: a slot is the sender's again once
    /// this passes the message in it.
    consumed: CacheLine<AtomicU64>,
    /// `seq + 1` of the message in each slot, stored after its bytes
    /// (`Release`); the receiver waits on it.
    tags: [CacheLine<AtomicU64>; PIPE_SLOTS],
    /// Written by the sender only while the receiver has summed the slot's
    /// last message (`consumed`), read by the receiver only once the tag
    /// names the message it waits for.
    bytes: [std::cell::UnsafeCell<[u8; MEMORY_BUFFER]>; PIPE_SLOTS],
}

// SAFETY: atomics and cells of plain bytes only.
unsafe impl ZeroValid for Pipe {}

// SAFETY: each slot's bytes are written and read in the turns its tag and
// `consumed` hand out (see `pipe_floor`); everything else is atomic.
unsafe impl Sync for Pipe {}

/// Bytes a second of the one-way 1 MiB row's byte work over the least a
/// transport between two processes can be: [`PIPE_SLOTS`] slots of 1 MiB
/// in shared memory. The peer zeroes a free slot (as a segment must start
/// zeroed: `zero`) and copies the payload into it, then stores its tag; we
/// wait on the tag, sum the slot in place and check it, and store our
/// count. No capnp, no validation, no space to manage: the bytes cross from
/// one core to the other as the row's must. `count` messages are timed,
/// after two laps of the slots untimed, so that no page fault of either
/// process counts.
///
/// # Panics
///
/// If a message arrives wrong, or a side stalls (see [`spin_until`]).
pub(crate) fn pipe_floor(count: u64, zero: bool) -> f64 {
    let payload = payload(MEMORY_BUFFER);
    let expected = checksum(&payload);
    let warmup = 2 * PIPE_SLOTS as u64;
    let total = warmup + count;
    let pipe = Shared::<Pipe>::new();
    fork_peer(
        pipe.get(),
        pipe.get(),
        |pipe| {
            let mut consumed = 0;
            for seq in 0..total {
                pipe.consumed
                    .wait_for_room(&mut consumed, seq, PIPE_SLOTS, "pipe floor receiver");
                let i = slot_index(seq, PIPE_SLOTS);
                // SAFETY: the receiver has summed the slot's last message
                // (`consumed` is past it), and reads it again only for
                // message `seq`, once tagged.
                let bytes = unsafe { &mut *pipe.bytes[i].get() };
                if zero {
                    black_box(&mut bytes[..]).fill(0);
                }
                black_box(&mut bytes[..]).copy_from_slice(black_box(&payload));
                // Release: publishes the bytes above.
                pipe.tags[i].0.store(seq + 1, Ordering::Release);
            }
            0
        },
        |pipe| {
            let mut start = Instant::now();
            for seq in 0..total {
                let i = slot_index(seq, PIPE_SLOTS);
                spin_until(
                    // Acquire: pairs with the Release of the tag.
                    || pipe.tags[i].0.load(Ordering::Acquire) == seq + 1,
                    "pipe floor sender",
                );
                // The clock starts once the warm-up has come.
                if seq + 1 == warmup {
                    start = Instant::now();
                }
                // SAFETY: the tag names message `seq`, whose bytes the
                // sender stored before it (Acquire above), and it writes
                // none of them until `consumed` passes `seq`, below.
                let bytes = unsafe { &*pipe.bytes[i].get() };
                assert_eq!(
                    checksum(black_box(bytes)),
                    expected,
                    "pipe floor: corrupted"
                );
                // Release: our reads of the slot are done.
                pipe.consumed.0.store(seq + 1, Ordering::Release);
            }
            (count * MEMORY_BUFFER as u64) as f64 / start.elapsed().as_secs_f64()
        },
        "pipe floor peer",
    )
}
