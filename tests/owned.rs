//! Received messages that own a handle to their receiver: `'static`, kept
//! in queues and boxes, read in place, released when they drop.
mod common;

use std::collections::VecDeque;
use std::time::Duration;

use capnp_shm::{Channel, Options, OwnedReceived, RecvError};
use common::{build, Watchdog};

fn keep_anywhere<T: 'static>(value: T) -> Box<dyn std::any::Any> {
    Box::new(value)
}

#[test]
fn owned_messages_are_static_read_in_place_and_released_on_drop() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().ring_capacity(8)).unwrap();
    let (_tx, rx) = b.split();
    let rx = rx.into_shared();
    let shared = rx.clone();
    let mut queue: VecDeque<OwnedReceived> = VecDeque::new();
    for n in 0..8 {
        a.send(build(&a, n, 2, 300)).unwrap();
        queue.push_back(rx.recv().unwrap());
    }
    assert_eq!(rx.stats().held, 8);
    assert_eq!(a.sender().stats().held_by_peer, 8);
    // A boxed message keeps its receiver alive on its own.
    let boxed = keep_anywhere(queue.pop_front().unwrap());
    let first = boxed.downcast_ref::<OwnedReceived>().unwrap();
    let list: capnp::data_list::Reader<'_> = first.get_root().unwrap();
    assert_eq!(
        u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap()),
        0
    );
    assert!(!first.is_copied());
    drop(boxed);
    for (n, m) in (1..).zip(&queue) {
        let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
        assert_eq!(
            u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap()),
            n
        );
        for i in 1..list.len() {
            assert_eq!(list.get(i).unwrap(), &common::pattern(n, i - 1, 300)[..]);
        }
    }
    drop(queue);
    assert_eq!(
        shared.stats().held,
        0,
        "every owned message released (seen through a clone)"
    );
    // The space comes back: far more than the ring holds goes through.
    for n in 100..1100 {
        a.send(build(&a, n, 1, 64)).unwrap();
        let m = rx.recv().unwrap();
        let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
        assert_eq!(
            u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap()),
            n
        );
    }
    drop(a);
    assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
}

#[test]
fn owned_messages_in_copy_mode_are_released_at_once() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair_with(&Options::new().copy_received(true)).unwrap();
    let rx = b.split().1.into_shared();
    a.send(build(&a, 5, 1, 100)).unwrap();
    let m = rx.recv().unwrap();
    assert!(m.is_copied());
    assert_eq!(rx.stats().held, 0);
    let detached = m.detach();
    drop(m);
    let list: capnp::data_list::Reader<'_> = detached.get_root().unwrap();
    assert_eq!(list.len(), 2);
}
