//! A sender facing a receiver that holds everything: `try_send` reports full
//! and hands the message back; `send` blocks until messages are dropped.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use capnp_shm::{Channel, Options, SendTimeoutError, TryRecvError, TrySendError};
use common::{build, check, Watchdog, IN_PLACE};

#[test]
fn try_send_reports_full_and_returns_the_message() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new().max_held(4);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    for n in 0..4 {
        tx.try_send(build(&tx, n, 1, IN_PLACE)).unwrap();
    }
    let held: Vec<_> = (0..4).map(|_| rx.recv().unwrap()).collect();
    let message = match tx.try_send(build(&tx, 4, 1, IN_PLACE)) {
        Err(TrySendError::Full(message)) => message,
        other => panic!("expected Full, got {other:?}"),
    };
    let message = match tx.send_timeout(message, Duration::from_millis(20)) {
        Err(SendTimeoutError::Timeout(message)) => message,
        other => panic!("expected Timeout, got {other:?}"),
    };
    drop(held);
    // The same builder, handed back twice, goes through once there is room.
    tx.try_send(message).unwrap();
    assert_eq!(check(&rx.recv().unwrap()), 4);
}

#[test]
fn send_blocks_until_the_receiver_drops_messages() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new().max_held(8).spin(Duration::ZERO);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let (full_tx, full_rx) = mpsc::channel();
    let receiver = {
        let dropped = dropped.clone();
        thread::spawn(move || {
            // Hold the first eight messages until the sender is known to be stuck.
            let held: Vec<_> = (0..8).map(|_| rx.recv().unwrap()).collect();
            full_rx.recv().unwrap();
            thread::sleep(Duration::from_millis(50));
            dropped.store(true, Ordering::SeqCst);
            drop(held);
            let m = rx.recv().unwrap();
            check(&m)
        })
    };
    for n in 0..8 {
        tx.send(build(&tx, n, 1, 100)).unwrap();
    }
    // No more may be in flight once the receiver holds all eight.
    let message = match tx.try_send(build(&tx, 8, 1, 100)) {
        Err(TrySendError::Full(message)) => message,
        Err(e) => panic!("{e:?}"),
        Ok(()) => panic!("a ninth message went to a receiver that may hold eight"),
    };
    full_tx.send(()).unwrap();
    tx.send(message).unwrap();
    assert!(
        dropped.load(Ordering::SeqCst),
        "send returned before any release"
    );
    assert_eq!(receiver.join().unwrap(), 8);
}

#[test]
fn data_area_backpressure_with_large_messages() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // Room for about three 40 KB messages at a time; the receiver keeps up to
    // three while more are waiting, so the sender keeps running out of data
    // space (not slots) and waits for releases: the limit leaves no room
    // for areas.
    let options = Options::new()
        .region_size(160 << 10)
        .max_outgoing(160 << 10)
        .ring_capacity(64);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let receiver = thread::spawn(move || {
        let mut held = Vec::new();
        for n in 0..300u64 {
            let m = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    held.clear();
                    rx.recv().unwrap()
                }
                Err(e) => panic!("{e:?}"),
            };
            assert_eq!(check(&m), n);
            held.push(m);
            if held.len() == 3 {
                held.clear();
            }
        }
    });
    for n in 0..300u64 {
        tx.send(build(&tx, n, 4, 10_000)).unwrap();
    }
    receiver.join().unwrap();
}
