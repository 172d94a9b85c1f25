//! A message goes from one end to the other and back, in one process and
//! across fork().
mod common;

use std::time::Duration;

use capnp_shm::{Channel, RecvError, RecvTimeoutError, TryRecvError};
use common::{build, check, fork, Watchdog};

#[test]
fn round_trip_in_one_process() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let (a, b) = Channel::pair().unwrap();
    for n in 0..1000 {
        a.send(build(&a, n, 3, usize::try_from(n * 7 % 300).unwrap()))
            .unwrap();
        let got = b.recv().unwrap();
        assert_eq!(check(&got), n);
        drop(got);
        b.send(build(&b, n + 1, 1, 16)).unwrap();
        assert_eq!(check(&a.recv().unwrap()), n + 1);
    }
    assert!(matches!(a.try_recv(), Err(TryRecvError::Empty)));
    assert!(matches!(
        b.recv_timeout(Duration::from_millis(10)),
        Err(RecvTimeoutError::Timeout)
    ));
}

#[test]
fn round_trip_across_fork() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let (parent, child_end) = Channel::pair().unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let child_end = child_end.take().unwrap();
        // Echo every message back with n + 1, until the parent hangs up.
        loop {
            let n = match child_end.recv() {
                Ok(m) => check(&m),
                Err(RecvError::Disconnected) => return 0,
                Err(_) => return 1,
            };
            if child_end.send(build(&child_end, n + 1, 2, 100)).is_err() {
                return 2;
            }
        }
    });
    drop(child_end);
    let parent = parent.unwrap();
    for n in 0..10_000u64 {
        parent.send(build(&parent, n * 2, 2, 50)).unwrap();
        let reply = parent.recv().unwrap();
        assert_eq!(check(&reply), n * 2 + 1);
    }
    drop(parent);
    assert_eq!(child.wait(), 0);
}

/// Each end sizes its own ring; the sender keeps no more messages in flight
/// than the smaller ring holds, so the receiver's release ring never wraps
/// over releases the sender has not read.
#[test]
fn ends_with_different_ring_capacities_interoperate() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for (tx_ring, rx_ring) in [(256, 1), (1, 256), (64, 8)] {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let tx =
                Channel::from_stream_with(a, &capnp_shm::Options::new().ring_capacity(tx_ring))
                    .unwrap();
            for n in 0..2000 {
                tx.send(build(&tx, n, 1, 40)).unwrap();
            }
        });
        let rx = Channel::from_stream_with(b, &capnp_shm::Options::new().ring_capacity(rx_ring))
            .unwrap();
        for n in 0..2000 {
            assert_eq!(check(&rx.recv().unwrap()), n);
        }
        sender.join().unwrap();
    }
}

/// Absurdly large durations in the options are clamped, not a panic.
#[test]
fn huge_durations_in_options_do_not_panic() {
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = capnp_shm::Options::new()
        .spin(Duration::MAX)
        .setup_timeout(Duration::MAX)
        .wait_slice(Duration::MAX);
    let (a, b) = Channel::pair_with(&options).unwrap();
    for n in 0..100 {
        a.send(build(&a, n, 1, 8)).unwrap();
        assert_eq!(check(&b.recv().unwrap()), n);
    }
}
