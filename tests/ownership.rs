//! An end belongs to the first process that uses it. After `fork`, a copy
//! in any other process fails every operation with `NotOwner`, and dropping
//! that copy (or a received message or builder of it) touches nothing
//! shared: the owner's stream goes on intact.
#![allow(unsafe_code)] // reading the child's copy of an end out, to drop it
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp_shm::{
    Channel, Failure, NotOwner, Options, RecvError, SendError, TryRecvError, TrySendError,
};
use common::{build, check, fork, Watchdog};

/// Messages in each stream.
const MESSAGES: u64 = 10_000;

/// Whether `f` is the ownership error naming `owner`.
fn is_not_owner(f: &Failure, owner: u32) -> bool {
    matches!(f, Failure::NotOwner(NotOwner { owner: o, caller }) if *o == owner && *caller == std::process::id())
}

/// A feeder process: streams `MESSAGES` checked messages on `tx`, then
/// expects one message back (number `reply`, checked byte by byte) and the
/// end of the channel. Exits 0 when all of that held.
fn feed(tx: &Channel, reply: u64) -> i32 {
    for n in 0..MESSAGES {
        if let Err(e) = tx.send(build(tx, n, 2, 40)) {
            eprintln!("feeder: send {n}: {e}");
            return 1;
        }
    }
    match tx.recv() {
        Ok(m) if check(&m) == reply => {}
        Ok(m) => {
            eprintln!("feeder: reply {} instead of {reply}", check(&m));
            return 2;
        }
        Err(e) => {
            eprintln!("feeder: no reply: {e}");
            return 3;
        }
    }
    match tx.recv() {
        Err(RecvError::Disconnected) => 0,
        other => {
            eprintln!("feeder: after the reply: {other:?}");
            4
        }
    }
}

/// (a) Receive, fork: the child drops its copies of a received message and
/// of a builder, finds every operation on the end refused, and drops the
/// end. The parent holds the message and the builder meanwhile, and goes on:
/// the message is intact, the builder's words too (the feeder checks them),
/// every later message arrives once and in order, and the feeder sees no
/// stray release (which it would reject) and no close.
#[test]
fn a_forked_child_cannot_use_or_disturb_its_parents_end() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let (tx, rx) = Channel::pair_with(&Options::new().ring_capacity(16)).unwrap();
    let (mut tx, mut rx) = (Some(tx), Some(rx));
    let feeder = fork(|| {
        drop(rx.take());
        feed(&tx.take().unwrap(), 777)
    });
    drop(tx);
    let rx = rx.unwrap();
    let mut held = Some(rx.recv().unwrap());
    assert_eq!(check(held.as_ref().unwrap()), 0);
    let mut builder = Some(build(&rx, 777, 3, 500));
    let parent = std::process::id();

    let child = fork(|| {
        // The inherited message and builder: their drops must not release
        // the message or zero the builder's words in the shared region.
        drop(held.take());
        drop(builder.take());
        // Every operation on the end is refused.
        let refused_recv =
            matches!(rx.try_recv(), Err(TryRecvError::Failed(f)) if is_not_owner(&f, parent));
        let refused_blocking =
            matches!(rx.recv(), Err(RecvError::Failed(f)) if is_not_owner(&f, parent));
        let refused_send = matches!(
            rx.try_send(build(&rx, 5, 1, 8)),
            Err(TrySendError::Failed(_, f)) if is_not_owner(&f, parent)
        );
        let refused_blocking_send = matches!(
            rx.send(build(&rx, 6, 1, 8)),
            Err(SendError::Failed(_, f)) if is_not_owner(&f, parent)
        );
        // Builders of a process that does not own the end live on the heap.
        let on_heap = {
            let m = build(&rx, 7, 1, 64);
            let range = rx.incoming_range();
            m.get_segments_for_output()
                .iter()
                .all(|s| !range.contains(&(s.as_ptr() as usize)))
        };
        // SAFETY: the child's own copy of the end, moved out to drop it: the
        // message and builder that borrowed it are gone, nothing else uses
        // `rx` in this process afterwards, and the child then ends with
        // `_exit`, which never drops the original.
        drop(unsafe { std::ptr::read(&rx) });
        let results = [
            refused_recv,
            refused_blocking,
            refused_send,
            refused_blocking_send,
            on_heap,
        ];
        match results.iter().position(|ok| !ok) {
            None => 0,
            Some(i) => 10 + i32::try_from(i).unwrap(),
        }
    });
    assert_eq!(
        child.wait(),
        0,
        "the child's copy was not refused everywhere"
    );

    // The parent's end is untouched: the held message, then the stream.
    assert_eq!(check(held.as_ref().unwrap()), 0, "the held message changed");
    drop(held);
    for n in 1..MESSAGES {
        assert_eq!(
            check(&rx.recv().unwrap()),
            n,
            "lost, duplicated or reordered"
        );
    }
    rx.send(builder.take().unwrap()).unwrap();
    drop(builder);
    drop(rx);
    assert_eq!(feeder.wait(), 0, "the feeder saw something wrong");
}

/// (b) Two processes hold copies of one end that neither has used, and
/// both try to receive on it at once: one claims it and receives every
/// message once and in order; the other gets `NotOwner` at once, and its
/// drop leaves the channel alone.
#[test]
fn two_processes_racing_for_one_end_one_wins_nothing_is_lost() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    for round in 0..4 {
        let (tx, rx) = Channel::pair_with(&Options::new().ring_capacity(64)).unwrap();
        let (mut tx, mut rx) = (Some(tx), Some(rx));
        let feeder = fork(|| {
            drop(rx.take());
            feed(&tx.take().unwrap(), 999)
        });
        drop(tx.take());
        let rx = rx.unwrap();
        // Each racer reports what it got on its own socket: how many
        // messages, and whether it was refused.
        let (mut report_rx, mut report_tx) = UnixStream::pair().unwrap();
        let (mut go_rx, mut go_tx) = UnixStream::pair().unwrap();
        go_rx
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let race = |rx: &Channel| -> (u64, bool) {
            let mut received = 0;
            loop {
                match rx.recv() {
                    Ok(m) => {
                        assert_eq!(check(&m), received, "lost, duplicated or reordered");
                        received += 1;
                        if received == MESSAGES {
                            rx.send(build(rx, 999, 1, 64)).unwrap();
                            return (received, false);
                        }
                    }
                    Err(RecvError::Failed(Failure::NotOwner(_))) => return (received, true),
                    Err(e) => panic!("racer: {e}"),
                }
            }
        };
        let child = fork(|| {
            let mut go = [0u8];
            go_rx.read_exact(&mut go).unwrap();
            let (n, refused) = race(&rx);
            report_tx.write_all(&n.to_le_bytes()).unwrap();
            report_tx.write_all(&[u8::from(refused)]).unwrap();
            0
        });
        go_tx.write_all(&[1]).unwrap();
        let (ours, we_were_refused) = race(&rx);
        drop(rx);
        assert_eq!(child.wait(), 0);
        drop(report_tx);
        let mut report = [0u8; 9];
        report_rx.read_exact(&mut report).unwrap();
        let theirs = u64::from_le_bytes(report[..8].try_into().unwrap());
        let they_were_refused = report[8] == 1;
        assert!(
            we_were_refused != they_were_refused,
            "round {round}: exactly one racer must be refused (parent {we_were_refused}, child {they_were_refused})"
        );
        let (winner, loser) = if we_were_refused {
            (theirs, ours)
        } else {
            (ours, theirs)
        };
        assert_eq!(winner, MESSAGES, "round {round}: the owner missed messages");
        assert_eq!(
            loser, 0,
            "round {round}: the refused racer received messages"
        );
        assert_eq!(
            feeder.wait(),
            0,
            "round {round}: the feeder saw something wrong"
        );
    }
}

/// A forked child may use an end its parent never touched, the parent's
/// copy is then refused, and the child's stream is intact.
#[test]
fn a_child_may_own_an_end_its_parent_never_used() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let (tx, rx) = Channel::pair().unwrap();
    let (mut tx, mut rx) = (Some(tx), Some(rx));
    let child = fork(|| {
        drop(tx.take());
        let rx = rx.take().unwrap();
        for n in 0..1000 {
            if check(&rx.recv().unwrap()) != n {
                return 1;
            }
        }
        0
    });
    let child_pid = u32::try_from(child.pid).unwrap();
    let tx = tx.take().unwrap();
    for n in 0..1000 {
        tx.send(build(&tx, n, 1, 32)).unwrap();
    }
    let rx = rx.take().unwrap();
    // Wait until the child has claimed its end (it answers nothing; its
    // first receive claims it, and it has received by the time it exits).
    assert_eq!(child.wait(), 0);
    match rx.try_recv() {
        Err(TryRecvError::Failed(Failure::NotOwner(n))) => {
            assert_eq!(n.owner, child_pid);
            assert_eq!(n.caller, std::process::id());
        }
        other => panic!("the parent's copy was not refused: {other:?}"),
    };
}
