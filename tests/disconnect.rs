//! Shutdown: a peer that drops its end, or is killed, ends the channel after
//! everything it sent has been delivered.
mod common;

use std::time::Duration;

use capnp_shm::{
    Channel, Options, RecvError, RecvTimeoutError, SendError, TryRecvError, TrySendError,
};
use common::{build, check, fork, Watchdog, IN_PLACE};

#[test]
fn pending_messages_are_delivered_then_disconnected() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let (tx, rx) = Channel::pair().unwrap();
    for n in 0..10 {
        tx.send(build(&tx, n, 1, 100)).unwrap();
    }
    drop(tx);
    for n in 0..10 {
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(5)),
        Err(RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn sending_to_a_closed_peer_fails() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let (tx, rx) = Channel::pair().unwrap();
    rx.try_recv().unwrap_err(); // use the end, so its drop is announced at once
    drop(rx);
    let err = tx.send(build(&tx, 0, 1, 10)).unwrap_err();
    assert!(matches!(err, SendError::Disconnected(_)), "{err:?}");
    assert!(err.is_fatal());
    let err = tx.try_send(build(&tx, 0, 1, 10)).unwrap_err();
    assert!(matches!(err, TrySendError::Disconnected(_)));
}

#[test]
fn a_sleeping_receiver_wakes_when_the_peer_drops() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    // A wait slice far longer than the watchdog: only the wake on drop can
    // end the recv in time.
    let options = Options::new().wait_slice(Duration::from_secs(600));
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let receiver = std::thread::spawn(move || match rx.recv() {
        Err(RecvError::Disconnected) => true,
        other => panic!("{other:?}"),
    });
    std::thread::sleep(Duration::from_millis(50));
    tx.try_recv().unwrap_err();
    drop(tx);
    assert!(receiver.join().unwrap());
}

#[test]
fn an_unused_end_dropped_is_seen_as_hang_up() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new().wait_slice(Duration::from_millis(10));
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    drop(tx);
    assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
}

#[test]
fn a_killed_peer_is_noticed_while_waiting_in_recv() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for round in 0..5 {
        let (parent, child_end) = Channel::pair().unwrap();
        let (mut parent, mut child_end) = (Some(parent), Some(child_end));
        let child = fork(|| {
            drop(parent.take());
            let tx = child_end.take().unwrap();
            tx.send(build(&tx, 42, 1, 64)).unwrap();
            // Then hang forever, never closing: only SIGKILL ends this.
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        drop(child_end);
        let rx = parent.unwrap();
        assert_eq!(check(&rx.recv().unwrap()), 42);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20 * round));
            child.kill();
            child.wait()
        });
        // Blocks in recv (spin, then futex slices) until the kill is seen.
        assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
        assert_eq!(killer.join().unwrap(), 128 + libc::SIGKILL);
        let err = rx.send(build(&rx, 0, 1, 8)).unwrap_err();
        assert!(matches!(err, SendError::Disconnected(_)), "{err:?}");
    }
}

#[test]
fn a_killed_peer_is_noticed_by_a_blocked_sender() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = Options::new().max_held(2);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let rx = child_end.take().unwrap();
        // Hold everything and never release.
        let _held: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    drop(child_end);
    let tx = parent.unwrap();
    tx.send(build(&tx, 0, 1, IN_PLACE)).unwrap();
    tx.send(build(&tx, 1, 1, IN_PLACE)).unwrap();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        child.kill();
        child.wait()
    });
    let err = tx.send(build(&tx, 2, 1, IN_PLACE)).unwrap_err();
    assert!(matches!(err, SendError::Disconnected(_)), "{err:?}");
    assert_eq!(killer.join().unwrap(), 128 + libc::SIGKILL);
}

#[test]
fn try_recv_and_try_send_notice_a_killed_peer() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = Options::new()
        .wait_slice(Duration::from_millis(20))
        .ring_capacity(4);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let tx = child_end.take().unwrap();
        tx.send(build(&tx, 7, 1, 64)).unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    drop(child_end);
    let ch = parent.unwrap();
    assert_eq!(check(&ch.recv().unwrap()), 7);
    child.kill();
    assert_eq!(child.wait(), 128 + libc::SIGKILL);
    // Polling without blocking: Empty until a liveness check falls due.
    let got = loop {
        match ch.try_recv() {
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(1)),
            other => break other,
        }
    };
    assert!(matches!(got, Err(TryRecvError::Disconnected)), "{got:?}");
    let err = ch.try_send(build(&ch, 1, 1, 8)).unwrap_err();
    assert!(matches!(err, TrySendError::Disconnected(_)), "{err:?}");
}

#[test]
fn a_sender_that_never_waits_notices_a_killed_peer_before_the_ring_fills() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = Options::new()
        .wait_slice(Duration::from_millis(10))
        .ring_capacity(1024)
        .region_size(4 << 20);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let _rx = child_end.take().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    drop(child_end);
    let tx = parent.unwrap();
    child.kill();
    assert_eq!(child.wait(), 128 + libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(20));
    // Far fewer sends than the ring holds: the sender never has to wait.
    let sent = (0..512)
        .take_while(|&n| tx.send(build(&tx, n, 1, 16)).is_ok())
        .count();
    assert!(sent < 512, "all 512 sends to a dead peer succeeded");
    assert!(matches!(
        tx.send(build(&tx, 0, 1, 16)),
        Err(SendError::Disconnected(_))
    ));
}
