//! What users reached for: iterating over received messages, sending a
//! heap-built message, and keeping a received one as an owned copy.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options};
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

/// Reads every blob of a message whose root is a list of blobs.
fn read_all<S: capnp::message::ReaderSegments>(
    message: &capnp::message::Reader<S>,
) -> capnp::Result<()> {
    let list: capnp::data_list::Reader<'_> = message.get_root()?;
    for i in 0..list.len() {
        list.get(i)?;
    }
    Ok(())
}

/// How many times in a row the whole message can be read before the
/// reader's traversal limit refuses (at most 100).
fn reads_allowed<S: capnp::message::ReaderSegments>(message: &capnp::message::Reader<S>) -> usize {
    (0..100).take_while(|_| read_all(message).is_ok()).count()
}

/// A detached copy keeps the reader limits of the message it copies, for
/// every kind of received message (the limits are worked out again from
/// the kind and the size of the message): a limit of five reads of the
/// message allows as many reads of the copy.
#[test]
fn a_detached_copy_keeps_the_reader_limits_of_every_kind_of_message() {
    use capnp::message::{Builder, HeapAllocator, ReaderOptions};
    use capnp_shm::{Transport, Wire};
    let _w = Watchdog::new(Duration::from_secs(30));
    // (what, options, blobs, bytes each, built on the heap in segments of 4 words)
    let kinds: [(&str, Options, u32, usize, bool); 5] = [
        ("carried", Options::new(), 1, 8, false),
        ("in place", Options::new(), 4, 300, false),
        ("several segments", Options::new(), 4, 64, true),
        ("copied", Options::new().copy_received(true), 4, 300, true),
        ("stream", Options::new().wire(Wire::Plain), 4, 300, true),
    ];
    for (what, options, blobs, bytes, in_segments) in kinds {
        let mut message = Builder::new(HeapAllocator::new().first_segment_words(if in_segments {
            4
        } else {
            1024
        }));
        let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(blobs);
        for i in 0..blobs {
            list.set(i, &vec![7; bytes]);
        }
        let segments = message.get_segments_for_output();
        let words: usize = segments.iter().map(|s| s.len() / 8).sum();
        assert_eq!(segments.len() > 1, in_segments, "{what}: segments");
        drop(segments);
        let mut limits = ReaderOptions::new();
        limits.traversal_limit_in_words(Some(5 * words));
        let (a, b) = Channel::pair_with(&options.reader_options(limits)).unwrap();
        assert_eq!(
            b.transport() == Transport::Stream,
            what == "stream",
            "{what}: transport"
        );
        a.sender().send_copy(&message).unwrap();
        let got = b.recv().unwrap();
        assert_eq!(
            got.segments().count() > 1,
            in_segments,
            "{what}: received segments"
        );
        let private = matches!(what, "carried" | "copied" | "stream");
        assert_eq!(got.is_copied(), private, "{what}: private memory");
        let copy = got.detach();
        let original = reads_allowed(got.reader());
        assert!(
            (5..100).contains(&original),
            "{what}: {original} reads allowed"
        );
        assert_eq!(reads_allowed(&copy), original, "{what}: reads of the copy");
    }
}
