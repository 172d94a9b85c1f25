//! Zero copy: received segments lie inside the incoming mapping (unless copy
//! mode is asked for), and the sender builds in place.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options};
use common::{build, check, Watchdog};

#[test]
fn received_segments_lie_in_the_peers_region() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new().first_segment_words(64);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    tx.send(build(&tx, 1, 5, 3000)).unwrap();
    let m = rx.recv().unwrap();
    assert!(!m.is_copied());
    let range = rx.incoming_range();
    let mut count = 0;
    for segment in m.segments() {
        let start = segment.as_ptr() as usize;
        assert!(range.contains(&start) && start + segment.len() <= range.end);
        assert_eq!(start % 8, 0);
        count += 1;
    }
    assert!(count > 1, "expected a multi-segment message");
    assert_eq!(check(&m), 1);
    assert_eq!(
        tx.spilled_segments(),
        0,
        "built in place, nothing copied at send"
    );
}

#[test]
fn copy_mode_reads_private_memory_and_releases_at_once() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new().copy_received(true).ring_capacity(2);
    let (tx, rx) = Channel::pair_with(&options).unwrap();
    let mut held = Vec::new();
    for n in 0..10 {
        // With two slots, holding ten copied messages only works because
        // each was released at receive time.
        tx.try_send(build(&tx, n, 3, 500)).unwrap();
        let m = rx.recv().unwrap();
        assert!(m.is_copied());
        let range = rx.incoming_range();
        for segment in m.segments() {
            assert!(!range.contains(&(segment.as_ptr() as usize)));
            assert_eq!(segment.as_ptr() as usize % 8, 0);
        }
        held.push(m);
    }
    for (n, m) in held.iter().enumerate() {
        assert_eq!(check(m), n as u64);
    }
}

#[test]
fn a_large_segment_starts_3_kib_into_a_page() {
    let _w = Watchdog::new(Duration::from_secs(30));
    large_segments_start_3_kib_into_a_page(&Options::new(), 100 << 10);
    // Past the first segment (8 KiB by default), a payload of 16 KiB.
    large_segments_start_3_kib_into_a_page(&Options::new(), 16 << 10);
}

#[test]
fn a_large_segment_in_an_added_area_starts_3_kib_into_a_page() {
    let _w = Watchdog::new(Duration::from_secs(30));
    // Larger than the region: the payload's segment is in an area.
    let tx = large_segments_start_3_kib_into_a_page(&Options::new().region_size(1 << 20), 3 << 20);
    assert!(tx.stats().send.areas_added >= 1);
}

/// Sends ten messages of a `len`-byte payload copied in from a page-aligned
/// buffer, each followed by a small one, and checks where the payload's
/// segment lies. Returns the sending end.
fn large_segments_start_3_kib_into_a_page(options: &Options, len: usize) -> Channel {
    // A payload copied in from a page-aligned buffer would otherwise land
    // a word past a page's start, a few bytes ahead of its source modulo
    // 4096, where memcpy is many times slower (see send.rs,
    // LARGE_SEGMENT_WORDS). The copy below is such a copy; the test checks
    // the placement, not the speed.
    let (tx, rx) = Channel::pair_with(options).unwrap();
    let mut source = vec![0u8; len + 4096];
    let skip = source.as_ptr().align_offset(4096);
    let payload = &mut source[skip..skip + len];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap();
    }
    let payload = &*payload;
    for round in 0..10 {
        let mut m = tx.message();
        m.set_root::<capnp::data::Owned>(payload).unwrap();
        tx.send(m).unwrap();
        let m = rx.recv().unwrap();
        let segments: Vec<&[u8]> = m.segments().collect();
        assert_eq!(segments.len(), 2, "the payload in a segment of its own");
        assert_eq!(segments[1].as_ptr() as usize % 4096, 3072, "round {round}");
        let got: capnp::data::Reader<'_> = m.get_root().unwrap();
        assert!(got == payload);
        drop(m);
        // A small message in between may take the words skipped.
        tx.send(build(&tx, round, 1, 100)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), round);
        if round % 2 == 1 {
            // Read the releases now (stats does), so that the next message
            // finds its space already used and free: the warm path, which
            // must leave a large segment to the placed one.
            let _ = tx.stats();
        }
    }
    tx
}

#[test]
fn a_large_segment_copied_in_at_send_starts_3_kib_into_a_page() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (tx, rx) = Channel::pair().unwrap();
    let payload: Vec<u8> = (0..100u32 << 10).map(|i| (i % 251) as u8).collect();
    for round in 0..10 {
        // Built on the heap: its segments are copied into the region.
        let mut m = capnp::message::Builder::new_default();
        m.set_root::<capnp::data::Owned>(&payload[..]).unwrap();
        tx.sender().send_copy(&m).unwrap();
        let m = rx.recv().unwrap();
        let large = m
            .segments()
            .find(|s| s.len() >= 100 << 10)
            .expect("the payload's segment");
        assert_eq!(large.as_ptr() as usize % 4096, 3072, "round {round}");
        let got: capnp::data::Reader<'_> = m.get_root().unwrap();
        assert!(got == &payload[..]);
        tx.send(build(&tx, round, 1, 100)).unwrap();
        assert_eq!(check(&rx.recv().unwrap()), round);
    }
}
