//! 100 000 messages of varying size and segment count from a forked child to
//! its parent: nothing lost, duplicated, reordered or corrupted.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options, RecvError};
use common::{build, check, fork, shape, Watchdog};

const MESSAGES: u64 = 100_000;

#[test]
fn every_message_arrives_once_in_order_and_intact() {
    let _w = Watchdog::new(Duration::from_secs(240));
    // Small first segments force multi-segment messages; a small ring and
    // region force constant reuse and backpressure.
    let options = Options::new()
        .first_segment_words(32)
        .ring_capacity(64)
        .region_size(1 << 20);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let tx = child_end.take().unwrap();
        for n in 0..MESSAGES {
            let (items, len) = shape(n);
            if tx.send(build(&tx, n, items, len)).is_err() {
                return 1;
            }
        }
        0
    });
    drop(child_end);
    let rx = parent.unwrap();
    let mut multi_segment = 0;
    for n in 0..MESSAGES {
        let m = rx.recv().unwrap();
        assert_eq!(check(&m), n, "lost, duplicated or reordered");
        let (items, _) = shape(n);
        let list: capnp::data_list::Reader<'_> = m.get_root().unwrap();
        assert_eq!(list.len(), items + 1);
        if m.segments().count() > 1 {
            multi_segment += 1;
        }
    }
    assert!(matches!(rx.recv(), Err(RecvError::Disconnected)));
    assert_eq!(child.wait(), 0);
    assert!(
        multi_segment > MESSAGES / 10,
        "only {multi_segment} multi-segment messages"
    );
}
