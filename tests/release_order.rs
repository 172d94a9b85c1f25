//! Releases in any order: a message held while thousands more stream through
//! a small region does not stall the stream.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options};
use common::{build, check, Watchdog, IN_PLACE};

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

#[test]
fn a_batch_of_releases_comes_back_whole_and_zeroed() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // Messages of varied sizes lie one after another in the data area;
    // the sender reads their releases in batches and gives them back a run
    // of neighbours at a time. After each round every word is free again,
    // in one piece (a message as large as the data area fits without
    // spilling to the heap), and zero (capnp builds on what it is given).
    let options = Options::new()
        .region_size(96 << 10)
        .ring_capacity(32)
        .first_segment_words(16);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let data_bytes = tx.stats().send.free_bytes;
    let mut seed = 11u64;
    for round in 0..100u32 {
        let burst = 2 + round % 30;
        let held_at = (round % burst) as usize;
        let mut received = Vec::new();
        for i in 0..burst {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Each too large to be carried in its descriptor.
            let len = IN_PLACE + (seed >> 40) as usize % 300;
            tx.try_send(build(&tx, u64::from(round * 100 + i), 1 + i % 3, len))
                .expect("room after a whole release");
            received.push(rx.recv().unwrap());
        }
        // All but one released in order, read in one batch (stats reads the
        // releases), then the last one.
        let held = received.remove(held_at);
        for m in received {
            check(&m);
        }
        let send = tx.stats().send;
        assert_eq!(send.held_by_peer, 1);
        assert_eq!(send.free_bytes + send.held_by_peer_bytes, data_bytes);
        check(&held);
        drop(held);
        assert_eq!(tx.stats().send.free_bytes, data_bytes);

        // The rest of the data area in one segment: after the first
        // segment (16 words, where the root pointer lies), a list of words
        // with a landing pad before it. It fits only if the free words
        // are in one piece, and it is built on words the burst used.
        let words = u32::try_from(data_bytes / 8 - 16 - 1).unwrap();
        let mut whole = tx.message();
        let mut list = whole.initn_root::<capnp::primitive_list::Builder<'_, u64>>(words);
        for i in 0..words {
            assert_eq!(list.get(i), 0, "round {round}: word {i} not zeroed");
            list.set(i, u64::from(i ^ round));
        }
        tx.try_send(whole).expect("the whole data area, free");
        let send = tx.stats().send;
        assert_eq!(send.spilled_segments, 0);
        assert_eq!(send.areas_added, 0, "round {round}: free space in pieces");
        let m = rx.recv().unwrap();
        let list: capnp::primitive_list::Reader<'_, u64> = m.get_root().unwrap();
        assert_eq!(list.len(), words);
        assert_eq!(list.get(words - 1), u64::from((words - 1) ^ round));
    }
}

#[test]
fn large_released_segments_are_lent_again_zeroed() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // Large segments (256 KiB and more, placed at their phase in a page)
    // the peer releases are lent again: each must reach capnp all zero,
    // count as free once released, and give way to a message that needs
    // the whole data area.
    let options = Options::new().region_size(4 << 20).first_segment_words(16);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let data_bytes = tx.stats().send.free_bytes;
    let mut seed = 7u64;
    for round in 0..40u32 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // 256 KiB to about 1.3 MiB of list words.
        let words = (1u32 << 15) + (seed >> 45) as u32 % (1 << 17);
        let mut m = tx.message();
        let mut list = m.initn_root::<capnp::primitive_list::Builder<'_, u64>>(words);
        for i in 0..words {
            assert_eq!(list.get(i), 0, "round {round}: word {i} not zeroed");
            list.set(i, u64::MAX ^ u64::from(i));
        }
        tx.try_send(m).expect("room after the release");
        let got = rx.recv().unwrap();
        let list: capnp::primitive_list::Reader<'_, u64> = got.get_root().unwrap();
        assert_eq!(list.len(), words);
        assert_eq!(list.get(words / 2), u64::MAX ^ u64::from(words / 2));
        drop(got);
        // Released: free again.
        let send = tx.stats().send;
        assert_eq!(send.held_by_peer, 0);
        assert_eq!(send.free_bytes, data_bytes, "round {round}");
    }
    // The whole data area in one segment (after the first 16 words, and a
    // landing pad): it fits only if the released spans are free in one
    // piece, and every word of it reads zero.
    let words = u32::try_from(data_bytes / 8 - 16 - 1).unwrap();
    let mut whole = tx.message();
    let list = whole.initn_root::<capnp::primitive_list::Builder<'_, u64>>(words);
    for i in 0..words {
        assert_eq!(list.get(i), 0, "word {i} of the whole area not zeroed");
    }
    tx.try_send(whole).expect("the whole data area, free");
    let send = tx.stats().send;
    assert_eq!(send.spilled_segments, 0);
    assert_eq!(send.areas_added, 0, "free space in pieces");
    drop(rx.recv().unwrap());
}
