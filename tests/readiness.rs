//! Readiness for an event loop: `arm`, then `poll` on the channel's
//! descriptor, then `disarm` and drain, in both directions, with no wake-up
//! lost and none needed to notice a close.
#![allow(unsafe_code)] // poll(2)
mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use capnp_shm::{Channel, Options, Readiness, RecvError, TryRecvError, TrySendError};
use common::{build, check, fork, Watchdog, IN_PLACE};

/// Waits up to `ms` for `fd` to become readable; whether it did.
fn readable(fd: BorrowedFd<'_>, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return n == 1;
        }
        assert_eq!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::Interrupted
        );
    }
}

#[test]
fn a_receiver_armed_is_rung_when_a_message_comes() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let rx = b.receiver();
    assert_eq!(rx.arm().unwrap(), Readiness::Armed);
    assert!(!readable(b.as_fd(), 0), "readable before anything came");
    a.send(build(&a, 1, 1, 8)).unwrap();
    assert!(readable(b.as_fd(), 10_000), "the send did not ring");
    rx.disarm();
    assert_eq!(check(&rx.try_recv().unwrap()), 1);
    // Something there already: no need to wait.
    a.send(build(&a, 2, 1, 8)).unwrap();
    assert_eq!(rx.arm().unwrap(), Readiness::Ready);
    assert_eq!(check(&rx.try_recv().unwrap()), 2);
    // Arming again reads away the old doorbell.
    assert_eq!(rx.arm().unwrap(), Readiness::Armed);
    assert!(!readable(b.as_fd(), 0), "an old doorbell was left");
    rx.disarm();
}

#[test]
fn a_sender_armed_is_rung_when_space_is_freed() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().max_held(1)).unwrap();
    a.send(build(&a, 1, 1, IN_PLACE)).unwrap();
    let held = b.recv().unwrap();
    let waiting = match a.try_send(build(&a, 2, 1, IN_PLACE)) {
        Err(TrySendError::Full(m)) => m,
        other => panic!("expected Full, got {other:?}"),
    };
    let tx = a.sender();
    assert_eq!(tx.arm().unwrap(), Readiness::Armed);
    assert!(!readable(a.as_fd(), 0));
    drop(held); // the release rings
    assert!(readable(a.as_fd(), 10_000), "the release did not ring");
    tx.disarm();
    tx.try_send(waiting).unwrap();
    assert_eq!(check(&b.recv().unwrap()), 2);
}

#[test]
fn a_close_rings_armed_ends_in_both_directions() {
    let _w = Watchdog::new(Duration::from_secs(30));
    // A receiver waiting for messages.
    let (a, b) = Channel::pair().unwrap();
    a.send(build(&a, 0, 1, IN_PLACE)).unwrap();
    assert_eq!(check(&b.recv().unwrap()), 0);
    assert_eq!(b.receiver().arm().unwrap(), Readiness::Armed);
    drop(a);
    assert!(readable(b.as_fd(), 10_000), "the close did not ring");
    b.receiver().disarm();
    assert!(matches!(b.try_recv(), Err(TryRecvError::Disconnected)));

    // A sender waiting for room.
    let (a, b) = Channel::pair_with(&Options::new().max_held(1)).unwrap();
    a.send(build(&a, 1, 1, IN_PLACE)).unwrap();
    let _held = b.recv().unwrap();
    assert!(matches!(
        a.try_send(build(&a, 2, 1, IN_PLACE)),
        Err(TrySendError::Full(_))
    ));
    assert_eq!(a.sender().arm().unwrap(), Readiness::Armed);
    drop(_held);
    drop(b);
    assert!(readable(a.as_fd(), 10_000), "the close did not ring");
}

/// An event loop against a peer process that sends and receives at its own
/// pace: every wait ends by a doorbell (a lost wake-up would show as a poll
/// that times out), every message arrives once and in order, and the loop
/// ends with `Disconnected`.
#[test]
fn an_event_loop_loses_no_wake_up_in_either_direction() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    const MESSAGES: u64 = 20_000;
    let options = Options::new().max_held(4).spin(Duration::ZERO);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let ch = child_end.take().unwrap();
        // Echo each message back, pausing now and then so that the parent
        // has to wait both ways.
        for n in 0..MESSAGES {
            let got = match ch.recv() {
                Ok(m) => check(&m),
                Err(_) => return 1,
            };
            if got != n {
                return 2;
            }
            if n % 7 == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
            if ch.send(build(&ch, n, 1, 16)).is_err() {
                return 3;
            }
        }
        0
    });
    drop(child_end);
    let ch = parent.unwrap();
    let (mut sent, mut echoed) = (0u64, 0u64);
    let mut pending = None;
    let mut waits = 0u64;
    while echoed < MESSAGES {
        // Send what there is room for.
        while sent < MESSAGES {
            let m = pending.take().unwrap_or_else(|| build(&ch, sent, 1, 16));
            match ch.try_send(m) {
                Ok(()) => sent += 1,
                Err(TrySendError::Full(m)) => {
                    pending = Some(m);
                    break;
                }
                Err(e) => panic!("send: {e}"),
            }
        }
        // Take what has come.
        let mut took = false;
        while echoed < MESSAGES {
            match ch.try_recv() {
                Ok(m) => {
                    assert_eq!(check(&m), echoed, "lost, duplicated or reordered");
                    echoed += 1;
                    took = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(e) => panic!("recv: {e} after {echoed} echoed, {sent} sent"),
            }
        }
        if took || echoed == MESSAGES {
            continue;
        }
        // Nothing to do: arm what we wait for, and wait.
        let rx_ready = ch.receiver().arm().unwrap() == Readiness::Ready;
        let tx_ready = pending.is_some() && ch.sender().arm().unwrap() == Readiness::Ready;
        if !rx_ready && !tx_ready {
            waits += 1;
            assert!(
                readable(ch.as_fd(), 10_000),
                "a wait was never rung ({echoed} echoed, {sent} sent)"
            );
        }
        ch.receiver().disarm();
        ch.sender().disarm();
    }
    assert_eq!(child.wait(), 0);
    assert!(matches!(ch.recv(), Err(RecvError::Disconnected)));
    assert!(waits > 0, "the loop never waited: the test proved nothing");
    eprintln!("{waits} waits, all rung");
}

#[test]
fn is_ready_tells_a_message_and_the_end_without_a_system_call() {
    let _dog = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let rx = b.receiver();
    assert!(!rx.is_ready());
    let mut kept = capnp::message::Builder::new_default();
    kept.set_root(capnp::text::Reader::from("copied")).unwrap();
    a.sender().send_copy(&kept).unwrap();
    assert!(rx.is_ready());
    let m = rx.try_recv().unwrap();
    assert_eq!(
        m.get_root::<capnp::text::Reader<'_>>()
            .unwrap()
            .to_str()
            .unwrap(),
        "copied"
    );
    drop(m);
    assert!(!rx.is_ready());
    // The heap builder is still the caller's, whole.
    assert_eq!(
        kept.get_root_as_reader::<capnp::text::Reader<'_>>()
            .unwrap()
            .to_str()
            .unwrap(),
        "copied"
    );
    a.sender().close();
    assert!(rx.is_ready(), "the end counts as ready");
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
}

#[test]
fn try_send_copy_says_full_and_sends_once_room_is_freed() {
    let _dog = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().max_held(2)).unwrap();
    // Too large to be carried in its descriptor: each copy is held.
    let text = "again".repeat(30);
    let mut kept = capnp::message::Builder::new_default();
    kept.set_root(capnp::text::Reader::from(&text[..])).unwrap();
    let tx = a.sender();
    tx.try_send_copy(&kept).unwrap();
    tx.try_send_copy(&kept).unwrap();
    let held: Vec<_> = (0..2).map(|_| b.try_recv().unwrap()).collect();
    assert!(matches!(
        tx.try_send_copy(&kept),
        Err(TrySendError::Full(()))
    ));
    drop(held);
    tx.try_send_copy(&kept).unwrap();
    assert_eq!(
        b.try_recv()
            .unwrap()
            .get_root::<capnp::text::Reader<'_>>()
            .unwrap()
            .to_str()
            .unwrap(),
        text
    );
}

#[test]
fn a_closed_sender_is_seen_by_a_poll_readable_waiter() {
    let _dog = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let (tx, rx) = a.split();
    assert_eq!(b.receiver().arm().unwrap(), Readiness::Armed);
    let mut ready = [false];
    assert_eq!(
        capnp_shm::poll_readable(&[b.as_fd()], &mut ready, Some(Duration::ZERO)).unwrap(),
        0
    );
    tx.close();
    assert_eq!(
        capnp_shm::poll_readable(&[b.as_fd()], &mut ready, None).unwrap(),
        1
    );
    assert!(ready[0]);
    b.receiver().disarm();
    assert!(matches!(b.recv(), Err(RecvError::Disconnected)));
    // The other direction stays readable until the halves go: the end
    // still holds its receiver.
    drop(rx);
}

/// `poll_readable` over more descriptors than it keeps on the stack (16)
/// reports each one where it is: only the one whose peer went away.
#[test]
fn poll_readable_over_many_descriptors_reports_each_in_its_place() {
    let _dog = Watchdog::new(Duration::from_secs(30));
    let (mut peers, ends): (Vec<_>, Vec<_>) = (0..20).map(|_| Channel::pair().unwrap()).unzip();
    let fds: Vec<_> = ends.iter().map(AsFd::as_fd).collect();
    let mut ready = [true; 20];
    assert_eq!(
        capnp_shm::poll_readable(&fds, &mut ready, Some(Duration::ZERO)).unwrap(),
        0
    );
    assert_eq!(ready, [false; 20]);
    drop(peers.remove(17));
    assert_eq!(
        capnp_shm::poll_readable(&fds, &mut ready, Some(Duration::from_secs(10))).unwrap(),
        1
    );
    let expected: Vec<bool> = (0..20).map(|i| i == 17).collect();
    assert_eq!(ready.to_vec(), expected);
}
