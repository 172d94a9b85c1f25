//! Copy mode (`Options::copy_received`), for a peer that is not trusted to
//! leave a message alone after sending it.
//!
//! A hand-driven peer (see `tests/peer`) publishes a valid capnp message,
//! the real end receives it, and then the peer rewrites the message's bytes
//! in its own data area, which it is always able to do: the region is its
//! own. In copy mode the received message keeps reading what was sent, and
//! its shared space was released at once, while the message is still held.
//! Read in place (the default), the same rewrite shows through the received
//! message: this is why copy mode exists.
//!
//! The payload is a capnp Data blob, so the rewrite changes only bytes that
//! capnp hands back as they are, and the in-place reader shows the change
//! instead of failing on a broken pointer.
mod common;
mod peer;

use std::time::Duration;

use capnp_shm::{Options, Received};
use common::Watchdog;
use peer::{counter, Connected, Geometry};

/// Every test aborts the process if it runs longer than this.
const LIMIT: Duration = Duration::from_secs(30);

/// The hand peer's region: a ring of 4 and 60 KiB of data.
const GEOMETRY: Geometry = Geometry::new(64 << 10, 4);

/// What the peer sends...
const ORIGINAL: &[u8] = b"the payload as it was sent, 40 bytes long";
/// ...and what it writes over the payload once the message was received.
const REWRITTEN: &[u8] = b"THE PAYLOAD AS THE PEER REWROTE IT LATER!";

/// The peer's token for the message, echoed back in the release entry.
const SLOT: u32 = 7;
/// Where in its data area (in words) the peer puts the message.
const FIRST_WORD: u32 = 16;

const _: () = assert!(ORIGINAL.len() == REWRITTEN.len());

/// The real end's options: a short set-up timeout and a small region.
fn options(copy: bool) -> Options {
    Options::new()
        .setup_timeout(Duration::from_secs(2))
        .region_size(64 << 10)
        .copy_received(copy)
}

/// The single segment of a capnp message whose root is the Data blob
/// `payload`, serialised by capnp's own heap builder.
fn data_segment(payload: &[u8]) -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    message
        .set_root::<capnp::data::Owned>(payload)
        .expect("set a data root");
    let segments = message.get_segments_for_output();
    assert_eq!(segments.len(), 1, "a small message has one segment");
    segments[0].to_vec()
}

/// `segment` with the payload bytes `from` replaced by `to` (same length):
/// the same message, pointers and all, carrying other bytes.
fn with_payload(segment: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = segment
        .windows(from.len())
        .position(|w| w == from)
        .expect("the payload lies in the segment as it is");
    let mut rewritten = segment.to_vec();
    rewritten[at..at + to.len()].copy_from_slice(to);
    rewritten
}

/// The Data blob at the root of a received message, as it reads now.
fn payload_of(received: &Received<'_>) -> Vec<u8> {
    let data: capnp::data::Reader<'_> = received.get_root().expect("a data root");
    data.to_vec()
}

/// Whether every segment of `received` lies outside the incoming mapping.
fn reads_private_memory(conn: &Connected, received: &Received<'_>) -> bool {
    let incoming = conn.channel.incoming_range();
    received.segments().all(|s| {
        let start = s.as_ptr() as usize;
        start + s.len() <= incoming.start || start >= incoming.end
    })
}

/// Whether every segment of `received` lies inside the incoming mapping.
fn reads_in_place(conn: &Connected, received: &Received<'_>) -> bool {
    let incoming = conn.channel.incoming_range();
    received.segments().all(|s| {
        let start = s.as_ptr() as usize;
        incoming.contains(&start) && start + s.len() <= incoming.end
    })
}

/// A real end with `copy` mode, connected to a hand peer that has written
/// message 0 (a Data root of [`ORIGINAL`]) at [`FIRST_WORD`] and published
/// it. Returns the connection and the message's segment as written.
fn peer_published_original(copy: bool) -> (Connected, Vec<u8>) {
    let conn = Connected::new(&options(copy), GEOMETRY);
    let segment = data_segment(ORIGINAL);
    conn.mine
        .write_message(0, SLOT, FIRST_WORD, std::slice::from_ref(&segment));
    conn.mine.publish(1);
    assert_eq!(conn.their_counter(counter::RELEASED), 0);
    (conn, segment)
}

#[test]
fn copy_mode_keeps_the_sent_bytes_when_the_peer_rewrites_them() {
    let _w = Watchdog::new(LIMIT);
    let (conn, segment) = peer_published_original(true);

    let received = conn.channel.recv().expect("a valid message");
    assert!(received.is_copied());
    assert!(reads_private_memory(&conn, &received));
    assert_eq!(received.len_bytes(), segment.len());
    assert_eq!(payload_of(&received), ORIGINAL);

    // Released at once, with the message still held: the real end no longer
    // needs the shared words, so the peer may reuse (or rewrite) them.
    assert_eq!(conn.their_counter(counter::CONSUMED), 1);
    assert_eq!(
        conn.their_counter(counter::RELEASED),
        1,
        "copy mode did not release the message at recv"
    );
    assert_eq!(conn.their_release(0), (SLOT, 0));

    // The peer rewrites the payload where it lies...
    conn.mine
        .write_data(FIRST_WORD, &with_payload(&segment, ORIGINAL, REWRITTEN));
    // ...and the received message still reads what was sent.
    assert_eq!(payload_of(&received), ORIGINAL);

    // Even scribbling over every word, pointers included, changes nothing.
    conn.mine.write_data(FIRST_WORD, &vec![0xa5; segment.len()]);
    assert_eq!(payload_of(&received), ORIGINAL);

    // Dropping the copy releases nothing more: a second release of the same
    // message would be a protocol error at the peer.
    drop(received);
    assert_eq!(conn.their_counter(counter::RELEASED), 1);
}

#[test]
fn in_place_reading_shows_the_peers_rewrite() {
    let _w = Watchdog::new(LIMIT);
    let (conn, segment) = peer_published_original(false);

    let received = conn.channel.recv().expect("a valid message");
    assert!(!received.is_copied());
    assert!(reads_in_place(&conn, &received));
    assert_eq!(payload_of(&received), ORIGINAL);
    // Read in place, the message keeps the shared words until it drops.
    assert_eq!(conn.their_counter(counter::CONSUMED), 1);
    assert_eq!(conn.their_counter(counter::RELEASED), 0);

    // The same rewrite as in copy mode. This breaks the assumption zero-copy
    // reading rests on (DESIGN.md §6: the peer leaves a sent message alone),
    // on purpose: the received message reads the peer's new bytes. The
    // rewrite goes through the peer's own mapping of the file, so nothing
    // here can tell the compiler the bytes changed; capnp reads them afresh
    // on each `get_root`, after the write has returned.
    conn.mine
        .write_data(FIRST_WORD, &with_payload(&segment, ORIGINAL, REWRITTEN));
    assert_eq!(
        payload_of(&received),
        REWRITTEN,
        "an in-place reader should see the peer's rewrite"
    );

    drop(received);
    assert_eq!(conn.their_counter(counter::RELEASED), 1);
    assert_eq!(conn.their_release(0), (SLOT, 0));
}

#[test]
fn copy_mode_releases_each_message_at_recv_in_order() {
    let _w = Watchdog::new(LIMIT);
    let conn = Connected::new(&options(true), GEOMETRY);
    // A full ring of messages, each held after it is received: every one is
    // released at its recv, in order, before any of them drops.
    let mut held = Vec::new();
    let mut word = 0;
    for seq in 0..GEOMETRY.ring_capacity {
        let payload = format!("message number {seq}");
        let segment = data_segment(payload.as_bytes());
        let words = u32::try_from(segment.len() / 8).expect("small");
        conn.mine
            .write_message(seq, SLOT + seq, word, std::slice::from_ref(&segment));
        word += words;
        conn.mine.publish(seq + 1);
        let received = conn.channel.recv().expect("a valid message");
        assert!(received.is_copied());
        assert_eq!(conn.their_counter(counter::RELEASED), seq + 1);
        assert_eq!(conn.their_release(seq), (SLOT + seq, seq));
        // The peer wipes the words it got back.
        conn.mine.write_data(word - words, &vec![0; segment.len()]);
        held.push((payload, received));
    }
    for (payload, received) in &held {
        assert_eq!(payload_of(received), payload.as_bytes());
    }
    drop(held);
    assert_eq!(
        conn.their_counter(counter::RELEASED),
        GEOMETRY.ring_capacity
    );
}
