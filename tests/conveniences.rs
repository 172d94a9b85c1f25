//! What users reached for: iterating over received messages, sending a
//! heap-built message, and keeping a received one as an owned copy.
mod common;

use std::time::Duration;

use capnp_shm::Channel;
use common::{build, check, Watchdog};

#[test]
fn iterate_until_the_peer_is_gone() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    for n in 0..5 {
        a.send(build(&a, n, 1, 16)).unwrap();
    }
    // What is waiting now, without blocking.
    let waiting: Vec<u64> = b.try_iter().map(|m| check(&m.unwrap())).collect();
    assert_eq!(waiting, [0, 1, 2, 3, 4]);
    assert_eq!(b.try_iter().count(), 0);
    for n in 5..8 {
        a.send(build(&a, n, 1, 16)).unwrap();
    }
    drop(a);
    let rest: Vec<u64> = b.iter().map(|m| check(&m.unwrap())).collect();
    assert_eq!(rest, [5, 6, 7]);
    let mut again = b.receiver().into_iter();
    assert!(again.next().is_none(), "after Disconnected, nothing");
}

#[test]
fn a_heap_built_message_is_copied_in() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let mut heap = capnp::message::Builder::new_default();
    common::fill(&mut heap, 42, 3, 1000);
    a.send(heap).unwrap();
    let got = b.recv().unwrap();
    assert_eq!(check(&got), 42);
    let range = b.incoming_range();
    assert!(
        got.segments()
            .all(|s| range.contains(&(s.as_ptr() as usize))),
        "read in place, in the sender's region"
    );
}

#[test]
fn a_detached_copy_outlives_the_message_and_moves_to_another_thread() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    a.send(build(&a, 7, 4, 3000)).unwrap();
    let kept = {
        let got = b.recv().unwrap();
        got.detach()
    }; // released here
    assert_eq!(b.stats().recv.held, 0);
    let n = std::thread::spawn(move || {
        let list: capnp::data_list::Reader<'_> = kept.get_root().unwrap();
        let n = u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap());
        for i in 1..list.len() {
            assert_eq!(list.get(i).unwrap(), &common::pattern(n, i - 1, 3000)[..]);
        }
        n
    })
    .join()
    .unwrap();
    assert_eq!(n, 7);
}
