//! Outgoing space that grows: messages larger than the region, receivers
//! that hold many messages, areas given back when idle, and nothing left
//! mapped or open afterwards.
#![allow(unsafe_code)] // getrusage(2)
mod common;

use std::thread;
use std::time::Duration;

use capnp_shm::{Channel, MessageBuilder, Options, RecvError, SendError, TooLargeKind};
use common::{build, check, fd_count, shm_map_count, Watchdog};

const MIB: usize = 1 << 20;

/// A list of byte lists: blobs of any size (a capnp `Data` holds less than
/// 512 MiB; so does each of these), writable in place.
type Blobs<'a> = capnp::list_list::Builder<'a, capnp::primitive_list::Owned<u8>>;
type BlobsReader<'a> = capnp::list_list::Reader<'a, capnp::primitive_list::Owned<u8>>;

/// One MiB of bytes that differ from one MiB to the next: byte `i` of MiB
/// `k` is a function of both.
fn chunk(k: usize) -> Vec<u8> {
    (0..MIB)
        .map(|i| u8::try_from(i.wrapping_mul(2_654_435_761).wrapping_add(k * 97) % 251).unwrap())
        .collect()
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap()
}

/// A message whose root is a list of `blobs` data blobs of `mib` MiB each,
/// written in place (no heap copy): blob `b`, MiB `m` holds `chunk(b * mib + m)`.
fn big_message<'a>(tx: &'a Channel, blobs: usize, mib: usize) -> MessageBuilder<'a> {
    let mut message = tx.message();
    let mut root = message.initn_root::<Blobs<'_>>(u32_of(blobs));
    for b in 0..blobs {
        let mut blob = root.reborrow().init(u32_of(b), u32_of(mib * MIB));
        let bytes = blob.as_slice().expect("bytes in place");
        for (m, dst) in bytes.chunks_exact_mut(MIB).enumerate() {
            dst.copy_from_slice(&chunk(b * mib + m));
        }
    }
    message
}

/// Checks a message made by [`big_message`], MiB by MiB.
fn check_big(received: &capnp_shm::Received<'_>, blobs: usize, mib: usize) {
    check_blobs(received.get_root().unwrap(), blobs, mib);
}

/// Checks the root of a message made by [`big_message`], MiB by MiB.
fn check_blobs(root: BlobsReader<'_>, blobs: usize, mib: usize) {
    assert_eq!(root.len() as usize, blobs);
    for b in 0..blobs {
        let blob = root.get(u32_of(b)).unwrap();
        let blob = blob.as_slice().expect("bytes in place");
        assert_eq!(blob.len(), mib * MIB);
        for (m, got) in blob.chunks_exact(MIB).enumerate() {
            assert!(
                got == chunk(b * mib + m).as_slice(),
                "blob {b}, MiB {m} differs"
            );
        }
    }
}

#[test]
fn a_256_mib_message_then_a_thousand_small_ones_with_default_options() {
    let _serial = common::serial(); // memory, and counts of mappings
    let _w = Watchdog::new(Duration::from_secs(300));
    let (tx, rx) = Channel::pair().unwrap();
    let region = tx.capacity_bytes();
    assert!(
        region < 256 * MIB,
        "the default region is smaller than the message"
    );
    let sender = thread::spawn(move || {
        tx.send(big_message(&tx, 1, 256)).unwrap();
        let grown = tx.stats().send;
        for n in 0..1000 {
            tx.send(build(&tx, n, 1 + (n % 3) as u32, 200)).unwrap();
        }
        (grown, tx)
    });
    let big = rx.recv().unwrap();
    check_big(&big, 1, 256);
    drop(big);
    for n in 0..1000 {
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    let (grown, tx) = sender.join().unwrap();
    assert_eq!(grown.areas, 1, "{grown:?}");
    assert!(grown.area_bytes >= 256 << 20, "{grown:?}");
    // Small messages never took the growth path.
    assert_eq!(tx.stats().send.areas_added, 1);
    assert_eq!(tx.stats().send.spilled_segments, 0);
}

#[test]
fn a_receiver_holds_ten_thousand_messages_while_the_sender_keeps_sending() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(300));
    const HELD: u64 = 10_000;
    const MORE: u64 = 2_000;
    let (tx, rx) = Channel::pair().unwrap();
    let sender = thread::spawn(move || {
        for n in 0..HELD + MORE {
            // 4 KiB each: ten thousand of them do not fit the region.
            tx.send(build(&tx, n, 1, 4096)).unwrap();
        }
        tx.stats().send
    });
    let held: Vec<_> = (0..HELD).map(|_| rx.recv().unwrap()).collect();
    for n in HELD..HELD + MORE {
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    for (n, m) in (0..).zip(&held) {
        assert_eq!(check(m), n);
    }
    assert_eq!(u64::from(rx.stats().recv.held), HELD);
    let sent = sender.join().unwrap();
    assert_eq!(sent.messages, HELD + MORE);
    assert!(
        sent.areas_added >= 1,
        "ten thousand held messages outgrew the region: {sent:?}"
    );
    drop(held);
    assert_eq!(rx.stats().recv.held, 0);
}

#[test]
fn a_one_gib_message_within_the_default_limits() {
    let _serial = common::serial(); // a lot of memory at once
    let _w = Watchdog::new(Duration::from_secs(600));
    let physical = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    // The default limits are a quarter of physical memory; the test needs
    // twice the message (our area and the reading) to be comfortable.
    if physical / 4 < 2 << 30 {
        eprintln!("skipped: {physical} bytes of memory, the default limit is below 2 GiB");
        return;
    }
    let (tx, rx) = Channel::pair().unwrap();
    let sender = thread::spawn(move || {
        // Four blobs of 256 MiB (a capnp blob holds less than 512 MiB).
        tx.send(big_message(&tx, 4, 256)).unwrap();
        tx.stats().send
    });
    let got = rx.recv().unwrap();
    assert!(got.len_bytes() >= 1 << 30, "{} bytes", got.len_bytes());
    check_big(&got, 4, 256);
    drop(got);
    let sent = sender.join().unwrap();
    assert!(sent.area_bytes >= 1 << 30, "{sent:?}");
}

#[test]
fn beyond_the_limit_a_message_is_too_large() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    // Our limit, and (separately) what the peer accepts.
    for (ours, theirs) in [(32 << 20, u64::MAX / 2), (u64::MAX / 2, 32 << 20)] {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = thread::spawn(move || {
            Channel::from_stream_with(b, &Options::new().max_incoming(theirs)).unwrap()
        });
        let tx = Channel::from_stream_with(a, &Options::new().max_outgoing(ours)).unwrap();
        let rx = peer.join().unwrap();
        // 12 MiB fits (in a 16 MiB area: the limit leaves no more); 40
        // MiB is more than the whole space may hold.
        tx.send(big_message(&tx, 1, 12)).unwrap();
        check_big(&rx.recv().unwrap(), 1, 12);
        match tx.send(big_message(&tx, 1, 40)) {
            Err(SendError::TooLarge(_, t)) => {
                assert_eq!(t.kind, TooLargeKind::Words, "{t:?}");
                assert!(t.limit * 8 < 32 << 20, "{t:?}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The channel goes on.
        tx.send(build(&tx, 7, 1, 100)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), 7);
    }
}

/// Mappings of shared memory (ours, the peer's, and their areas) and open
/// descriptors in this process.
fn footprint() -> (usize, usize) {
    (shm_map_count(), fd_count())
}

#[test]
fn idle_areas_are_given_back_and_nothing_stays_mapped() {
    let _serial = common::serial(); // counts process-wide descriptors
    let _w = Watchdog::new(Duration::from_secs(120));
    let options = Options::new()
        .region_size(1 << 20)
        .area_idle(Duration::ZERO);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let base = footprint();
    tx.send(big_message(&tx, 1, 8)).unwrap();
    let big = rx.recv().unwrap();
    // An area, mapped here twice (its owner's view and the peer's, with its
    // guard zone); no descriptor stays open for it.
    let (maps, fds) = footprint();
    assert!(maps > base.0, "no area mapped");
    assert_eq!(fds, base.1, "a descriptor of the area stayed open");
    check_big(&big, 1, 8);
    drop(big);
    // The sender reads the release as it sends, finds the area empty and
    // gives it back; the receiver unmaps it when it takes the retirement.
    for n in 0..3 {
        tx.send(build(&tx, n, 1, 10)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    let sent = tx.stats().send;
    assert_eq!((sent.areas, sent.areas_retired), (0, 1), "{sent:?}");
    assert_eq!(footprint(), base);
    // It grows again when needed, and gives back again.
    tx.send(big_message(&tx, 1, 4)).unwrap();
    check_big(&rx.recv().unwrap(), 1, 4);
    for n in 0..3 {
        tx.send(build(&tx, n, 1, 10)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    assert_eq!(tx.stats().send.areas_retired, 2);
    assert_eq!(footprint(), base);
    drop((tx, rx));
}

#[test]
fn an_area_stays_while_a_message_in_it_is_held() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let options = Options::new()
        .region_size(1 << 20)
        .area_idle(Duration::ZERO);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    tx.send(big_message(&tx, 1, 4)).unwrap();
    let held = rx.recv().unwrap();
    for n in 0..100 {
        tx.send(build(&tx, n, 1, 10)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    assert_eq!(tx.stats().send.areas, 1, "an area in use was given back");
    check_big(&held, 1, 4);
}

#[test]
fn a_peer_killed_mid_growth_leaves_nothing_mapped_or_open() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    // Warm up process state that is created once (and not a leak).
    drop(Channel::pair().unwrap());
    let base = footprint();
    let options = Options::new().region_size(1 << 20);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let (ready_r, ready_w) = std::os::unix::net::UnixStream::pair().unwrap();
    let child = common::fork(|| {
        common::die_with_parent();
        drop(parent.take());
        let tx = child_end.take().unwrap();
        // Builds a message larger than the region: the areas are made and
        // handed over as capnp asks for space, before anything is sent.
        let message = big_message(&tx, 1, 8);
        use std::io::Write;
        (&ready_w).write_all(b"!").unwrap();
        std::mem::forget(message);
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    });
    drop(child_end);
    drop(ready_w);
    let rx = parent.unwrap();
    let with_channel = footprint();
    let mut byte = [0u8; 1];
    use std::io::Read;
    (&ready_r).read_exact(&mut byte).unwrap();
    // The receiver maps the areas as soon as it looks at the socket.
    assert!(matches!(rx.try_recv(), Err(capnp_shm::TryRecvError::Empty)));
    assert!(
        footprint().0 > with_channel.0,
        "the peer's area is not mapped"
    );
    child.kill();
    assert_eq!(child.wait(), 128 + libc::SIGKILL);
    assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
    drop(rx);
    drop(ready_r);
    assert_eq!(footprint(), base);
}

/// Minor page faults of the calling thread so far.
fn thread_faults() -> i64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage to write; RUSAGE_THREAD is Linux's.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    assert_eq!(rc, 0);
    usage.ru_minflt
}

#[test]
fn after_growth_small_messages_reuse_their_pages() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let (tx, rx) = Channel::pair().unwrap();
    // Grow, and warm up the small-message path (slots, free list, pages).
    tx.send(big_message(&tx, 1, 32)).unwrap();
    check_big(&rx.recv().unwrap(), 1, 32);
    for n in 0..2_000 {
        tx.send(build(&tx, n, 1, 200)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    // Both ends in this thread: its faults are all the channel's.
    let before = thread_faults();
    for n in 0..20_000 {
        tx.send(build(&tx, n, 1, 200)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    let faults = thread_faults() - before;
    assert!(
        faults < 100,
        "{faults} page faults for 20 000 small messages"
    );
    assert_eq!(
        tx.stats().send.areas_added,
        1,
        "small messages grew the space"
    );
}

/// A heap-built message of one segment: a root `Data` of `bytes` bytes.
fn one_segment(bytes: usize) -> capnp::message::Builder<capnp::message::HeapAllocator> {
    let words = u32_of(bytes / 8 + 16);
    let mut message = capnp::message::Builder::new(
        capnp::message::HeapAllocator::new().first_segment_words(words),
    );
    message
        .set_root::<capnp::data::Owned>(&vec![5u8; bytes][..])
        .unwrap();
    assert_eq!(message.get_segments_for_output().len(), 1);
    message
}

#[test]
fn an_empty_area_not_yet_idle_is_given_back_rather_than_too_large() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    // Room for the region and 8 MiB of areas; areas idle for an hour only
    // are given back by time.
    let options = Options::new()
        .region_size(MIB)
        .max_outgoing(9 << 20)
        .area_idle(Duration::from_secs(3600));
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    // A 3 MiB area, empty again once the message is dropped.
    tx.sender().send_copy(&one_segment(3 * MIB)).unwrap();
    assert_eq!(rx.recv().unwrap().len_bytes() / MIB, 3);
    let sent = tx.stats().send;
    assert_eq!((sent.areas, sent.areas_retired), (1, 0), "{sent:?}");
    // 6 MiB does not fit beside it, but fits in its place: nothing is in
    // flight, so only giving it back makes room.
    tx.sender().send_copy(&one_segment(6 * MIB)).unwrap();
    assert_eq!(rx.recv().unwrap().len_bytes() / MIB, 6);
    let sent = tx.stats().send;
    assert_eq!((sent.areas, sent.areas_retired), (1, 1), "{sent:?}");
}

#[test]
fn messages_in_areas_are_read_in_place_owned_and_copied() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    for copy in [false, true] {
        let options = Options::new()
            .region_size(MIB)
            .area_idle(Duration::ZERO)
            .copy_received(copy);
        let (tx, rx) = Channel::pair_with(&options).unwrap();
        // Borrowing messages, one at a time, then two held at once.
        for _ in 0..3 {
            tx.send(big_message(&tx, 2, 2)).unwrap();
            check_big(&rx.recv().unwrap(), 2, 2);
        }
        tx.send(big_message(&tx, 1, 2)).unwrap();
        tx.send(big_message(&tx, 2, 1)).unwrap();
        let (first, second) = (rx.recv().unwrap(), rx.recv().unwrap());
        assert_eq!(first.is_copied(), copy);
        check_big(&second, 2, 1);
        drop(second);
        check_big(&first, 1, 2);
        drop(first);
        // Owned messages, kept in a queue.
        let (_rx_tx, shared) = rx.split();
        let shared = shared.into_shared();
        let mut queue = std::collections::VecDeque::new();
        for blobs in 1..4 {
            tx.send(big_message(&tx, blobs, 1)).unwrap();
            queue.push_back(shared.recv().unwrap());
        }
        for (blobs, m) in (1..).zip(&queue) {
            check_blobs(m.get_root().unwrap(), blobs, 1);
        }
        drop(queue);
        // Everything released: the areas go back at the next sends.
        for n in 0..3 {
            tx.send(build(&tx, n, 1, 10)).unwrap();
            assert!(shared.recv().unwrap().len_bytes() > 0);
        }
        let sent = tx.stats().send;
        assert!(sent.areas_added > 0, "{sent:?}");
        assert_eq!(sent.areas, 0, "{sent:?}");
    }
}
