//! Releases in any order: a message held while thousands more stream through
//! a small region does not stall the stream.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options};
use common::{build, check, Watchdog};

#[test]
fn a_held_message_does_not_stall_the_stream() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // 64 KiB data area, 16 slots: the stream below cycles through both
    // hundreds of times while message 1 stays held.
    let options = Options::new()
        .region_size(96 << 10)
        .ring_capacity(16)
        .first_segment_words(64);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    tx.send(build(&tx, 0, 1, 8)).unwrap();
    tx.send(build(&tx, 1, 2, 500)).unwrap();
    let first = rx.recv().unwrap();
    drop(first);
    let held = rx.recv().unwrap();
    for n in 2..5000u64 {
        // try_send: a stall would show as Full, not as a hang.
        tx.try_send(build(&tx, n, 3, 300))
            .expect("stream stalled behind the held message");
        let m = rx.recv().unwrap();
        assert_eq!(check(&m), n);
    }
    assert_eq!(
        check(&held),
        1,
        "the held message changed while others streamed"
    );
    assert_eq!(tx.spilled_segments(), 0);
}

#[test]
fn releases_in_reverse_and_random_order_reclaim_everything() {
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = Options::new().region_size(64 << 10).ring_capacity(32);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let mut seed = 7u64;
    for round in 0..200u64 {
        let mut held = Vec::new();
        for i in 0..32 {
            tx.try_send(build(&tx, round * 100 + i, 1, 200))
                .expect("room after full release");
            held.push(rx.recv().unwrap());
        }
        // Drop in a scrambled order.
        while !held.is_empty() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (seed >> 33) as usize % held.len();
            let m = held.swap_remove(i);
            check(&m);
        }
    }
}
