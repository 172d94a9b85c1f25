//! A message that can never fit gets a clear error; the channel still works.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options, SendError, TooLarge, TooLargeKind, TryRecvError, TrySendError};
use common::{build, check, Watchdog};

#[test]
fn too_large_message_is_refused_and_the_channel_goes_on() {
    let _w = Watchdog::new(Duration::from_secs(30));
    // No growth: the region is all the outgoing space there is.
    let options = Options::new()
        .region_size(256 << 10)
        .max_outgoing(256 << 10);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let capacity = tx.capacity_bytes();

    let big = build(&tx, 0, 1, capacity + 1000);
    match tx.send(big) {
        Err(SendError::TooLarge(
            _,
            TooLarge {
                needed,
                limit,
                kind: TooLargeKind::Words,
            },
        )) => {
            assert!(needed > limit);
            assert_eq!(limit * 8, capacity as u64);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let err = tx.try_send(build(&tx, 0, 1, capacity * 2)).unwrap_err();
    assert!(matches!(err, TrySendError::TooLarge(..)));
    assert!(err.to_string().contains("too large"), "{err}");
    assert!(!err.is_fatal());

    // Nothing was sent, and the channel still works both ways.
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    for n in 1..100 {
        tx.send(build(&tx, n, 2, 1000)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), n);
    }
    // Almost the whole area in one message still fits.
    tx.send(build(&tx, 100, 1, capacity * 3 / 4)).unwrap();
    assert_eq!(check(&rx.recv().unwrap()), 100);
}

#[test]
fn space_held_by_an_unsent_builder_is_reported_not_waited_for() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new()
        .region_size(128 << 10)
        .max_outgoing(128 << 10);
    let (tx, _rx) = Channel::pair_with(&options).unwrap();
    let capacity = tx.capacity_bytes();
    // One builder keeps most of the region; another needs more than is left,
    // and nothing in flight could ever free it.
    let hog = build(&tx, 0, 1, capacity * 3 / 5);
    let err = tx.send(build(&tx, 1, 1, capacity * 3 / 5)).unwrap_err();
    assert!(
        matches!(
            err,
            SendError::TooLarge(
                _,
                TooLarge {
                    kind: TooLargeKind::Segment,
                    ..
                }
            )
        ),
        "{err:?}"
    );
    drop(hog);
    tx.send(build(&tx, 2, 1, capacity * 3 / 5)).unwrap();
}
