//! The counters: what each half sent and received, what the peer holds,
//! and why a send waits.
#![allow(unsafe_code)] // gettid(2)
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options, SendTimeoutError};
use common::{build, check, Watchdog, IN_PLACE};

#[test]
fn counters_follow_what_was_sent_received_and_held() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let mut bytes = 0u64;
    for n in 0..10 {
        let m = build(&a, n, 2, 100);
        bytes += m
            .get_segments_for_output()
            .iter()
            .map(|s| s.len() as u64)
            .sum::<u64>();
        a.send(m).unwrap();
    }
    let mut held: Vec<_> = (0..10).map(|_| b.recv().unwrap()).collect();
    held.truncate(4); // drop six
    let sent = a.sender().stats();
    assert_eq!((sent.messages, sent.bytes), (10, bytes));
    assert_eq!(sent.held_by_peer, 4, "{sent:?}");
    assert!(
        sent.held_by_peer_bytes > 0 && sent.held_by_peer_bytes < bytes,
        "{sent:?}"
    );
    assert_eq!(sent.held_limit, 65_536);
    assert_eq!((sent.areas, sent.area_bytes, sent.areas_added), (0, 0, 0));
    assert_eq!(sent.spilled_segments, 0);
    let got = b.receiver().stats();
    assert_eq!((got.messages, got.bytes, got.held), (10, bytes, 4));
    drop(held);
    assert_eq!(b.receiver().stats().held, 0);
    let sent = a.stats().send;
    assert_eq!((sent.held_by_peer, sent.held_by_peer_bytes), (0, 0));
    assert_eq!(sent.free_bytes, a.capacity_bytes() as u64);
    // The Debug form shows them too.
    assert!(format!("{a:?}").contains("held_by_peer"));
}

/// A small message's builder gives its span back at its drop (kept aside
/// for the next builder): the space counts as free again at once.
#[test]
fn carried_messages_leave_every_byte_free() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let all = a.capacity_bytes() as u64;
    assert_eq!(a.stats().send.free_bytes, all);
    for n in 0..100u32 {
        let mut m = a.message();
        m.set_root(capnp::text::Reader::from("hi")).unwrap();
        a.send(m).unwrap();
        assert_eq!(a.stats().send.free_bytes, all, "after send {n}");
        let got = b.recv().unwrap();
        assert!(got.is_copied(), "carried in its descriptor");
        assert_eq!(got.get_root::<capnp::text::Reader<'_>>().unwrap(), "hi");
    }
    // A span lent to a builder is not free; given back, it is again.
    let mut held = a.message();
    held.set_root(capnp::text::Reader::from("held")).unwrap();
    assert!(a.stats().send.free_bytes < all);
    drop(held);
    assert_eq!(a.stats().send.free_bytes, all);
}

/// A receiver that holds as many messages as it may (its `max_held`) makes
/// the sender wait: the timeout comes back, and the counters say why.
#[test]
fn a_send_that_waits_for_held_messages_shows_why() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().ring_capacity(1024)).unwrap();
    // The receiving end's release ring sets the limit.
    let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
    let small = std::thread::spawn(move || {
        Channel::from_stream_with(d, &Options::new().max_held(4)).unwrap()
    });
    let big = Channel::from_stream_with(c, &Options::new().ring_capacity(1024)).unwrap();
    let small = small.join().unwrap();
    let _held: Vec<_> = (0..4)
        .map(|n| {
            big.send(build(&big, n, 1, IN_PLACE)).unwrap();
            small.recv().unwrap()
        })
        .collect();
    match big.send_timeout(build(&big, 4, 1, IN_PLACE), Duration::from_millis(20)) {
        Err(SendTimeoutError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    let stats = big.stats().send;
    assert_eq!((stats.held_by_peer, stats.held_limit), (4, 4), "{stats:?}");
    assert!(stats.sleeps >= 1, "the send slept: {stats:?}");
    assert_eq!(small.stats().recv.held, 4);
    drop((a, b));
}

/// With no spinning, a receiver that waits sleeps, and the sender wakes it.
#[test]
fn sleeps_and_wakes_are_counted() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().spin(Duration::ZERO)).unwrap();
    // Nothing to receive: a wait with no spin sleeps.
    assert!(b.recv_timeout(Duration::from_millis(10)).is_err());
    assert_eq!(b.stats().recv.sleeps, 1);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        let n = check(&b.recv().unwrap());
        (n, b.stats().recv)
    });
    // Send once the receiver sleeps in a futex, so that the send must
    // wake it.
    let tid = tid_rx.recv().unwrap();
    let wchan = format!("/proc/self/task/{tid}/wchan");
    while !std::fs::read_to_string(&wchan).unwrap().contains("futex") {
        std::thread::sleep(Duration::from_millis(1));
    }
    a.send(build(&a, 9, 1, 8)).unwrap();
    let (n, got) = receiver.join().unwrap();
    assert_eq!(n, 9);
    assert!(got.sleeps >= 2, "{got:?}");
    assert_eq!(a.stats().send.wakes, 1, "{:?}", a.stats().send);
}
