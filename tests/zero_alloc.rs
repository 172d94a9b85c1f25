//! Steady-state send and receive of small messages make no heap allocations
//! of their own. Counted with a global allocator, in this binary alone.
//!
//! capnp's `message::Builder` allocates one small vector (its segment list)
//! per builder, whatever the allocator. That allocation is capnp's, and the
//! test measures it separately as the baseline: the shm path must add
//! nothing to it, and the receive path must allocate nothing at all.
mod common;

use std::time::Duration;

use capnp::message::{Builder, SingleSegmentAllocator};
use capnp_shm::Channel;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

const PAYLOAD: [u8; 64] = [7; 64];

fn fill<A: capnp::message::Allocator>(message: &mut Builder<A>, n: u64) {
    let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(2);
    list.set(0, &n.to_le_bytes());
    list.set(1, &PAYLOAD);
}

fn read(m: &capnp_shm::Received<'_>) -> u64 {
    let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
    assert_eq!(list.get(1).unwrap(), &PAYLOAD[..]);
    u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap())
}

/// Allocations `f` makes on the calling thread: both ends of these
/// channels run on it, and the crate starts no thread, while the test
/// harness allocates on its own threads at any time (to print the result
/// of a test that has just ended, say).
fn count(f: impl FnOnce()) -> u64 {
    let before = counting_alloc::this_thread();
    f();
    counting_alloc::this_thread() - before
}

/// Waits that sleep in the kernel allocate nothing either: a receiver that
/// sleeps for every message, and a sender that sleeps for every release.
#[test]
fn sleeping_allocates_nothing() {
    let _s = common::serial(); // the other tests count process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 200;
    let options = capnp_shm::Options::new().spin(Duration::ZERO).max_held(1);
    let (a, b) = Channel::pair_with(&options).unwrap();
    let (tx, _a_rx) = a.split();
    let (_b_tx, rx) = b.split();
    let receiver = std::thread::spawn(move || {
        // Warm up; then every receive finds nothing and sleeps.
        drop(rx.recv().unwrap());
        let before = counting_alloc::this_thread();
        for n in 0..N {
            let got = rx.recv().unwrap();
            if n % 2 == 1 {
                // Held: the sender (one message in flight at most) sleeps.
                std::thread::sleep(Duration::from_micros(500));
            }
            drop(got);
        }
        (counting_alloc::this_thread() - before, rx.stats().sleeps)
    });
    let send_one = |n: u64| {
        let mut m = tx.message();
        // Too large to be carried in its descriptor: the sender waits
        // for its release.
        let mut payload = [0u8; 128];
        payload[..8].copy_from_slice(&n.to_le_bytes());
        m.set_root::<capnp::data::Owned>(&payload[..]).unwrap();
        tx.send(m).unwrap();
    };
    send_one(0);
    std::thread::sleep(Duration::from_millis(20));
    let before = counting_alloc::this_thread();
    for n in 0..N {
        if n % 2 == 0 {
            // Nothing to receive: the receiver sleeps.
            std::thread::sleep(Duration::from_micros(500));
        }
        send_one(n);
    }
    let sent = counting_alloc::this_thread() - before;
    let (received, rx_sleeps) = receiver.join().unwrap();
    let tx_sleeps = tx.stats().sleeps;
    assert!(rx_sleeps > 0, "the receiver slept ({rx_sleeps} sleeps)");
    assert!(tx_sleeps > 0, "the sender slept ({tx_sleeps} sleeps)");
    assert_eq!(received, 0, "a sleeping receiver allocated");
    assert!(
        sent <= N,
        "a sleeping sender allocated beyond capnp's one builder vector per message: {sent} for {N}"
    );
}

/// A wait on several receivers that sleeps in `poll(2)` on their sockets
/// (the doorbell method, and every wait that includes a stream channel)
/// allocates nothing either.
#[test]
fn waiting_on_sockets_allocates_nothing() {
    let _s = common::serial(); // the other tests count process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 100;
    let options = capnp_shm::Options::new().spin(Duration::ZERO);
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..3)
        .map(|_| {
            let (a, b) = Channel::pair_with(&options).unwrap();
            (a.split().0, b.split().1)
        })
        .unzip();
    let waiter = std::thread::spawn(move || {
        let wait =
            || capnp_shm::wait_any_with(&rxs, None, capnp_shm::WaitMethod::Doorbell).unwrap();
        // Warm up; then every wait finds nothing and sleeps.
        let i = wait();
        drop(rxs[i].recv().unwrap());
        let before = counting_alloc::this_thread();
        for _ in 0..N {
            let i = wait();
            drop(rxs[i].recv().unwrap());
        }
        counting_alloc::this_thread() - before
    });
    for n in 0..=N {
        std::thread::sleep(Duration::from_micros(500));
        let tx = &txs[(n % 3) as usize];
        let mut m = tx.message();
        // Too large to be carried in its descriptor: the sender waits
        // for its release.
        let mut payload = [0u8; 128];
        payload[..8].copy_from_slice(&n.to_le_bytes());
        m.set_root::<capnp::data::Owned>(&payload[..]).unwrap();
        tx.send(m).unwrap();
    }
    let allocated = waiter.join().unwrap();
    // A sender whose receiver sleeps on its socket rings the doorbell: a wake.
    let rung: u64 = txs.iter().map(|tx| tx.stats().wakes).sum();
    assert!(rung > 0, "the waiter slept ({rung} doorbells)");
    assert_eq!(allocated, 0, "a wait sleeping on sockets allocated");
}

/// `poll_ready`, the sleep of an event loop (the RPC crate's runner sleeps
/// there on every connection that waits), allocates nothing either, for a
/// few descriptors.
#[test]
fn polling_descriptors_allocates_nothing() {
    use std::os::fd::AsFd;
    let _s = common::serial(); // the other tests count process-wide
    let pairs: Vec<_> = (0..3).map(|_| Channel::pair().unwrap()).collect();
    let fds: Vec<_> = pairs.iter().map(|(_, b)| b.as_fd()).collect();
    let mut ready = [true; 3];
    let before = counting_alloc::this_thread();
    for _ in 0..100 {
        let n = capnp_shm::poll_ready(&fds, &[true, false], &mut ready, Some(Duration::ZERO));
        // Nothing to read; the first, which asked, can take bytes.
        assert_eq!(n.unwrap(), 1);
    }
    let allocated = counting_alloc::this_thread() - before;
    assert_eq!(ready, [true, false, false]);
    assert_eq!(allocated, 0, "poll_ready allocated");
}

#[test]
fn steady_state_adds_no_allocations_to_capnps_own() {
    let _s = common::serial(); // the count is process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 10_000;
    let (tx, rx) = Channel::pair().unwrap();
    // Warm up: every slot, the free list and the scratch vectors reach
    // their steady size.
    for n in 0..2_000 {
        let mut m = tx.message();
        fill(&mut m, n);
        tx.send(m).unwrap();
        assert_eq!(read(&rx.recv().unwrap()), n);
    }

    // capnp's own cost of building this message, with no channel at all.
    let mut scratch = vec![0u8; 4096];
    let baseline = count(|| {
        for n in 0..N {
            let mut m = Builder::new(SingleSegmentAllocator::new(&mut scratch));
            fill(&mut m, n);
            std::hint::black_box(m.get_segments_for_output().len());
        }
    });

    let send = count(|| {
        for n in 0..N {
            let mut m = tx.message();
            fill(&mut m, n);
            tx.send(m).unwrap();
            let got = rx.recv().unwrap();
            assert_eq!(read(&got), n);
        }
    });
    let recv_only = {
        let mut total = 0;
        for n in 0..N {
            let mut m = tx.message();
            fill(&mut m, n);
            tx.send(m).unwrap();
            total += count(|| {
                let got = rx.recv().unwrap();
                assert_eq!(read(&got), n);
            });
        }
        total
    };

    println!(
        "allocations per message: capnp builder alone {}, shm send+recv {}, shm recv {}",
        baseline as f64 / N as f64,
        send as f64 / N as f64,
        recv_only as f64 / N as f64
    );
    assert_eq!(recv_only, 0, "receiving and releasing allocated");
    assert_eq!(
        send, baseline,
        "the shm path allocated beyond capnp's builder"
    );
    assert!(
        baseline <= N,
        "capnp's builder itself allocates at most once per message"
    );
}

#[test]
fn a_copied_message_frees_its_copy_when_dropped() {
    let _s = common::serial(); // the count is process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 1_000;
    let options = capnp_shm::Options::new().copy_received(true);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    // A message too large to be carried in its descriptor: it is read
    // in place, copied out and released at the receive.
    let fill_large = |m: &mut Builder<_>, n: u64| {
        let mut list = m.initn_root::<capnp::data_list::Builder<'_>>(2);
        list.set(0, &n.to_le_bytes());
        list.set(1, &[7; 256]);
    };
    let mut round = |n: u64| {
        let mut m = tx.message();
        fill_large(&mut m, n);
        tx.send(m).unwrap();
        let (allocs, frees) = (
            counting_alloc::this_thread(),
            counting_alloc::frees_this_thread(),
        );
        let got = rx.recv().unwrap();
        assert!(got.is_copied());
        let list: capnp::data_list::Reader<'_> = got.get_root().unwrap();
        assert_eq!(list.get(0).unwrap(), &n.to_le_bytes()[..]);
        drop(got);
        (
            counting_alloc::this_thread() - allocs,
            counting_alloc::frees_this_thread() - frees,
        )
    };
    for n in 0..100 {
        round(n);
    }
    let (allocs, frees) = (0..N)
        .map(&mut round)
        .fold((0, 0), |(a, f), (da, df)| (a + da, f + df));
    assert!(allocs >= N, "each receive copies: {allocs} allocations");
    assert_eq!(
        frees, allocs,
        "a dropped copy freed what its receive allocated"
    );
}

#[test]
fn a_stream_channel_receives_without_allocating_in_the_steady_state() {
    let _s = common::serial(); // the count is process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 10_000;
    let options = capnp_shm::Options::new().wire(capnp_shm::Wire::Plain);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    // Every other message is held across the next receive: the reader
    // moves to a spare buffer and back.
    let mut held = None;
    let mut recv = |n: u64| {
        let mut m = tx.message();
        fill(&mut m, n);
        tx.send(m).unwrap();
        count(|| {
            let got = rx.recv().unwrap();
            assert_eq!(read(&got), n);
            held = (n % 2 == 0).then_some(got);
        })
    };
    // Warm up: the receive buffers reach their steady size and number.
    for n in 0..2_000 {
        recv(n);
    }
    let recv_only: u64 = (0..N).map(&mut recv).sum();
    println!(
        "allocations per message received on a stream: {}",
        recv_only as f64 / N as f64
    );
    assert_eq!(recv_only, 0, "receiving from the stream allocated");
}

#[test]
fn a_message_in_an_area_is_received_without_allocating_in_the_steady_state() {
    let _s = common::serial(); // the other tests count process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 200;
    // A one-segment message twice the region: copied into an area, and
    // read from there in place. Areas stay (no idle time passes).
    let options = capnp_shm::Options::new()
        .region_size(256 << 10)
        .area_idle(Duration::from_secs(3600));
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let heap = capnp::message::HeapAllocator::new().first_segment_words((512 << 10) / 8 + 16);
    let mut big = Builder::new(heap);
    big.set_root::<capnp::data::Owned>(&[9u8; 512 << 10][..])
        .unwrap();
    assert_eq!(big.get_segments_for_output().len(), 1);
    let recv = || {
        tx.sender().send_copy(&big).unwrap();
        let before = counting_alloc::this_thread();
        let got = rx.recv().unwrap();
        let data: capnp::data::Reader<'_> = got.get_root().unwrap();
        assert_eq!(data.len(), 512 << 10);
        drop(got);
        counting_alloc::this_thread() - before
    };
    // Warm up: the area is added, slots and buffers reach their size.
    for _ in 0..10 {
        recv();
    }
    let recv_only: u64 = (0..N).map(|_| recv()).sum();
    assert_eq!(tx.stats().send.areas, 1);
    assert_eq!(recv_only, 0, "receiving from an area allocated");
}

/// capnp's allocator contract, met by a bump allocator over one zeroed
/// buffer: the baseline of a message of several segments with no channel.
/// Segments grow as the channel's do (each at least all before together).
struct Bump {
    words: Vec<capnp::Word>,
    used: usize,
    next: u32,
}

impl Bump {
    fn new(first: u32) -> Bump {
        Bump {
            words: vec![capnp::word(0, 0, 0, 0, 0, 0, 0, 0); 4096],
            used: 0,
            next: first,
        }
    }
}

// SAFETY: each segment is a distinct, zeroed, 8-byte aligned run of
// `self.words` (a bump pointer that never goes back while a builder lives:
// the test resets it only between builders); `words` is never resized, so the
// memory stays valid until the allocator drops, after its builder.
#[allow(unsafe_code)]
unsafe impl capnp::message::Allocator for &mut Bump {
    fn allocate_segment(&mut self, minimum_size: u32) -> (std::ptr::NonNull<u8>, u32) {
        let len = self.next.max(minimum_size);
        let run = &mut self.words[self.used..self.used + len as usize];
        self.used += len as usize;
        self.next += len;
        let ptr = std::ptr::NonNull::from(capnp::Word::words_to_bytes_mut(run)).cast();
        (ptr, len)
    }

    unsafe fn deallocate_segment(&mut self, ptr: std::ptr::NonNull<u8>, _: u32, words_used: u32) {
        // SAFETY: `ptr` is a segment of ours and capnp wrote only its first
        // `words_used` words: zeroed again for the next builder.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, words_used as usize * 8) };
    }
}

/// Four texts of 64 B, each in a segment of its own when segments start
/// at 4 words.
fn fill_four<A: capnp::message::Allocator>(message: &mut Builder<A>, n: u64) {
    let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(4);
    list.set(0, &n.to_le_bytes());
    for i in 1..4 {
        list.set(i, &PAYLOAD);
    }
}

/// A message of several segments costs the shm path no allocation either:
/// its receive allocates nothing, and its send no more than capnp does for
/// the same message with no channel (its list of segments, and the list of
/// slices `get_segments_for_output` returns for several).
#[test]
fn a_message_of_several_segments_allocates_nothing_of_its_own() {
    let _s = common::serial(); // the other tests count process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 2_000;
    let options = capnp_shm::Options::new().first_segment_words(4);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let send = |n: u64| {
        let mut m = tx.message();
        fill_four(&mut m, n);
        tx.send(m).unwrap();
    };
    let recv = |n: u64| {
        let got = rx.recv().unwrap();
        let list: capnp::data_list::Reader<'_> = got.get_root().unwrap();
        assert_eq!(list.get(3).unwrap(), &PAYLOAD[..]);
        let first = list.get(0).unwrap();
        assert_eq!(u64::from_le_bytes(first.try_into().unwrap()), n);
        got.segments().count()
    };
    // Warm up: every slot, the free list and the spare buffers reach their
    // size.
    for n in 0..1_000 {
        send(n);
        recv(n);
    }
    let mut bump = Bump::new(4);
    let baseline = {
        let before = counting_alloc::this_thread();
        for n in 0..N {
            bump.used = 0;
            bump.next = 4;
            let mut m = Builder::new(&mut bump);
            fill_four(&mut m, n);
            assert!(std::hint::black_box(m.get_segments_for_output().len()) > 2);
        }
        counting_alloc::this_thread() - before
    };
    let (mut sent, mut received, mut segments) = (0, 0, 0);
    for n in 0..N {
        let before = counting_alloc::this_thread();
        send(n);
        let between = counting_alloc::this_thread();
        segments = segments.max(recv(n));
        received += counting_alloc::this_thread() - between;
        sent += between - before;
    }
    println!(
        "{segments} segments: allocations per message: capnp alone {}, shm send {}, shm recv {}",
        baseline as f64 / N as f64,
        sent as f64 / N as f64,
        received as f64 / N as f64
    );
    assert!(segments > 2, "the message has {segments} segments");
    assert_eq!(
        received, 0,
        "receiving a message of several segments allocated"
    );
    assert_eq!(sent, baseline, "the shm path allocated beyond capnp's own");
}

/// The same through a [`SharedReceiver`](capnp_shm::SharedReceiver): an
/// owned message of several segments gives its segment list back when it
/// drops, so receiving it allocates nothing either.
#[test]
fn an_owned_message_of_several_segments_allocates_nothing() {
    let _s = common::serial(); // the other tests count process-wide
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const N: u64 = 2_000;
    let options = capnp_shm::Options::new().first_segment_words(4);
    let (a, b) = Channel::pair_with(&options).unwrap();
    let rx = b.split().1.into_shared();
    let mut round = |n: u64| {
        let mut m = a.message();
        fill_four(&mut m, n);
        a.send(m).unwrap();
        let before = counting_alloc::this_thread();
        let got = rx.recv().unwrap();
        let list: capnp::data_list::Reader<'_> = got.get_root().unwrap();
        let first = list.get(0).unwrap();
        assert_eq!(u64::from_le_bytes(first.try_into().unwrap()), n);
        assert!(got.segments().count() > 2);
        drop(got);
        counting_alloc::this_thread() - before
    };
    for n in 0..1_000 {
        round(n);
    }
    let received: u64 = (0..N).map(&mut round).sum();
    assert_eq!(
        received, 0,
        "receiving an owned message of several segments allocated"
    );
}

/// A receiver that holds several carried messages at a time allocates a
/// buffer for each only until it has held that many at once: their
/// buffers are kept when they drop and reused, borrowed messages and owned
/// ones alike. Each held message keeps its own words meanwhile.
#[test]
fn carried_messages_held_together_reuse_their_buffers() {
    let _w = common::Watchdog::new(Duration::from_secs(60));
    const HELD: u64 = 16;
    const ROUNDS: u64 = 200;
    let options = capnp_shm::Options::new().ring_capacity(64);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let (owner_tx, owner) = Channel::pair_with(&options).unwrap();
    let owned_rx = owner.split().1.into_shared();

    // One round: HELD messages sent, then received and held, each checked
    // (that it was carried, and its number), then all dropped; returns the
    // allocations on this thread while receiving, reading and dropping.
    fn hold<M>(
        tx: &Channel,
        round: u64,
        recv: impl Fn() -> M,
        read: impl Fn(&M) -> (bool, u64),
    ) -> u64 {
        for n in 0..HELD {
            let mut m = tx.message();
            fill(&mut m, round * HELD + n);
            tx.send(m).unwrap();
        }
        count(|| {
            let held: Vec<M> = (0..HELD).map(|_| recv()).collect();
            for (n, m) in (0..).zip(&held) {
                let (carried, number) = read(m);
                assert!(carried, "carried");
                assert_eq!(number, round * HELD + n);
            }
            drop(held);
        })
    }
    let borrowed_round = |round: u64| {
        hold(
            &tx,
            round,
            || rx.recv().unwrap(),
            |m| (m.is_copied(), read(m)),
        )
    };
    let owned_round = |round: u64| {
        hold(
            &owner_tx,
            round,
            || owned_rx.recv().unwrap(),
            |m| {
                let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
                let number = u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap());
                (m.is_copied(), number)
            },
        )
    };
    // Warm up: HELD buffers for each receiver.
    let warm = (borrowed_round(0), owned_round(0));
    assert!(
        warm.0 >= HELD && warm.1 >= HELD,
        "a buffer each, first: {warm:?}"
    );
    let borrowed: u64 = (1..ROUNDS).map(borrowed_round).sum();
    let owned: u64 = (1..ROUNDS).map(owned_round).sum();
    // One allocation a round, the test's own: the vector that holds them.
    assert_eq!(borrowed, ROUNDS - 1, "held messages allocated");
    assert_eq!(owned, ROUNDS - 1, "held owned messages allocated");
}
