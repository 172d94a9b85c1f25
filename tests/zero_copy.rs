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
