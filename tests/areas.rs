//! What a peer may do with areas, checked: every area record, area file,
//! descriptor that names an area, and retirement is validated, and each
//! violation ends the channel with its own protocol error, leaving this
//! process's mappings and descriptors bounded. The peer is driven by hand
//! (see `tests/peer`).
mod common;
mod peer;

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use capnp_shm::{Error, Options, ProtocolError, Received};
use common::{fd_count, shm_map_count, Watchdog};
use peer::{area_record, counter, Area, Connected, Descriptor, Geometry};

const LIMIT: Duration = Duration::from_secs(30);

/// The hand peer's region: a ring of 4 and 60 KiB of data.
const GEOMETRY: Geometry = Geometry::new(64 << 10, 4);

/// A small area.
const AREA: u64 = 64 << 10;

fn options() -> Options {
    Options::new()
        .setup_timeout(Duration::from_secs(2))
        .region_size(64 << 10)
}

fn connected() -> Connected {
    Connected::new(&options(), GEOMETRY)
}

/// The single segment of a message whose root is `text`.
fn text_segment(text: &str) -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    message.set_root(capnp::text::Reader::from(text)).unwrap();
    let segments = message.get_segments_for_output();
    assert_eq!(segments.len(), 1);
    segments[0].to_vec()
}

fn text_of(received: &Received<'_>) -> String {
    let text: capnp::text::Reader<'_> = received.get_root().unwrap();
    text.to_str().unwrap().to_owned()
}

fn words(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len() / 8).unwrap()
}

/// Publishes message `seq` whose one segment lies at word `at` of `area`,
/// `len` words long.
fn publish_in_area(conn: &Connected, seq: u32, area: u32, at: u32, len: u32) {
    let mut d = Descriptor::inline(seq, seq, &[(at, len)]);
    d.area = area;
    conn.mine.write_descriptor(seq, &d);
    conn.mine.publish(seq + 1);
}

/// Publishes message `seq`: the retirement of `area` (count 0), in slot `seq`.
fn retire_area(conn: &Connected, seq: u32, area: u32) {
    let mut retire = Descriptor::inline(seq, seq, &[(0, 0)]);
    retire.seg_count = 0;
    retire.area = area;
    conn.mine.write_descriptor(seq, &retire);
    conn.mine.publish(seq + 1);
}

fn protocol<T: std::fmt::Debug, E: Into<Error> + std::fmt::Debug>(
    r: Result<T, E>,
) -> ProtocolError {
    match r.expect_err("expected a protocol error").into() {
        Error::Protocol(p) => p,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The real end's next receive fails with `expected`, and so does every
/// later one: the channel stays closed.
fn assert_recv_breaks(conn: &Connected, expected: ProtocolError) {
    assert_eq!(protocol(conn.channel.try_recv()), expected);
    assert_eq!(protocol(conn.channel.try_recv()), expected);
    assert_eq!(
        protocol(conn.channel.recv_timeout(Duration::from_secs(5))),
        expected
    );
    assert_eq!(conn.their_counter(counter::CLOSED), 1, "no close announced");
}

#[test]
fn a_message_in_an_area_is_read_in_place() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    let area = Area::sealed(AREA);
    let segment = text_segment("in an area");
    area.write_data(100, &segment);
    conn.send_area(1, AREA, area.read_only_fd().as_fd());
    publish_in_area(&conn, 0, 1, 100, words(&segment));
    let got = conn.channel.recv().unwrap();
    assert_eq!(text_of(&got), "in an area");
    drop(got);
    // Released like any message.
    assert_eq!(conn.their_counter(counter::RELEASED), 1);
    assert_eq!(conn.their_release(0), (0, 0));
}

#[test]
fn a_retired_area_is_released_unmapped_and_may_not_be_named_again() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    let base = shm_map_count();
    let area = Area::sealed(AREA);
    let segment = text_segment("before");
    area.write_data(0, &segment);
    conn.send_area(3, AREA, area.read_only_fd().as_fd());
    publish_in_area(&conn, 0, 3, 0, words(&segment));
    assert_eq!(text_of(&conn.channel.recv().unwrap()), "before");
    let mapped = shm_map_count();
    // The hand peer's memfd and the real end's view of it.
    assert!(mapped > base, "the area is not mapped");
    // Retire area 3 (count 0): taken, unmapped and released at once.
    retire_area(&conn, 1, 3);
    assert!(matches!(
        conn.channel.try_recv(),
        Err(capnp_shm::TryRecvError::Empty)
    ));
    assert_eq!(conn.their_counter(counter::RELEASED), 2);
    assert_eq!(conn.their_release(1), (1, 1));
    assert_eq!(shm_map_count(), mapped - 1, "the view of the area stayed");
    // Naming it after the retirement.
    publish_in_area(&conn, 2, 3, 0, words(&segment));
    assert_recv_breaks(&conn, ProtocolError::UnknownArea { area: 3 });
}

#[test]
fn an_area_never_handed_over_is_unknown() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    for area in [1, 5, 63] {
        let conn = connected();
        publish_in_area(&conn, 0, area, 0, 1);
        assert_recv_breaks(&conn, ProtocolError::UnknownArea { area });
    }
    // Retiring one.
    let conn = connected();
    retire_area(&conn, 0, 2);
    assert_recv_breaks(&conn, ProtocolError::UnknownArea { area: 2 });
}

#[test]
fn a_segment_outside_its_area_is_out_of_bounds() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let words_in_area = u32::try_from(AREA / 8).unwrap();
    // (u32::MAX says "carried in the entry": validation.rs.)
    for (at, len) in [
        (words_in_area - 1, 2),
        (u32::MAX - 1, 2),
        (0, words_in_area + 1),
    ] {
        let conn = connected();
        let area = Area::sealed(AREA);
        conn.send_area(1, AREA, area.read_only_fd().as_fd());
        publish_in_area(&conn, 0, 1, at, len);
        assert_recv_breaks(&conn, ProtocolError::SegmentOutOfBounds { offset: at, len });
    }
}

#[test]
fn an_area_file_must_be_what_the_record_says() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    // Each case: the file to hand over, the size announced, the error.
    let unsealed = Area::new(AREA);
    let wrong_size = Area::sealed(2 * AREA);
    let (pipe_r, _pipe_w) = peer::pipe();
    let cases: [(&str, OwnedFd, u64, ProtocolError); 3] = [
        (
            "unsealed",
            unsealed.read_only_fd(),
            AREA,
            ProtocolError::WrongSeals { found: 0 },
        ),
        (
            "wrong size",
            wrong_size.read_only_fd(),
            AREA,
            ProtocolError::WrongFileSize {
                announced: AREA,
                actual: 2 * AREA,
            },
        ),
        ("a pipe", pipe_r, AREA, ProtocolError::NotARegularFile),
    ];
    for (what, fd, bytes, expected) in cases {
        let conn = connected();
        conn.send_area(1, bytes, fd.as_fd());
        publish_in_area(&conn, 0, 1, 0, 1);
        assert_eq!(protocol(conn.channel.try_recv()), expected, "{what}");
    }
    // The real end's own region, sent back as an area.
    let conn = connected();
    let size = conn.their_geometry.region_size;
    conn.send_area(1, size, conn.peer().their_fd());
    publish_in_area(&conn, 0, 1, 0, 1);
    assert_recv_breaks(&conn, ProtocolError::OwnRegion);
}

#[test]
fn a_malformed_area_record_is_bad_area_record() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let area = Area::sealed(AREA);
    let mut padded = area_record(1, AREA);
    padded[4] = 1;
    let bad = |area, bytes| ProtocolError::BadAreaRecord { area, bytes };
    // (record bytes, descriptors with it, the error)
    let cases: Vec<([u8; 16], usize, ProtocolError)> = vec![
        (area_record(0, AREA), 1, bad(0, AREA)),
        (area_record(64, AREA), 1, bad(64, AREA)),
        (area_record(255, AREA), 1, bad(255, AREA)),
        (area_record(1, 0), 1, bad(1, 0)),
        (area_record(1, AREA + 8), 1, bad(1, AREA + 8)),
        (area_record(1, 1 << 40), 1, bad(1, 1 << 40)),
        (padded, 1, bad(1, AREA)),
        (
            area_record(1, AREA),
            0,
            ProtocolError::AreaRecordDescriptors { count: 0 },
        ),
        (
            area_record(1, AREA),
            2,
            ProtocolError::AreaRecordDescriptors { count: 2 },
        ),
    ];
    for (record, fds, expected) in cases {
        let conn = connected();
        let fd = area.read_only_fd();
        let attached: Vec<_> = (0..fds).map(|_| fd.as_fd()).collect();
        conn.peer().send_bytes(&record, &attached);
        publish_in_area(&conn, 0, 1, 0, 1);
        assert_recv_breaks(&conn, expected);
    }
    // A descriptor with a doorbell byte instead of a record.
    let conn = connected();
    conn.peer()
        .send_bytes(&[0xDB], &[area.read_only_fd().as_fd()]);
    publish_in_area(&conn, 0, 1, 0, 1);
    assert_recv_breaks(&conn, ProtocolError::StrayDescriptors { count: 1 });
    // One with the second half of a record.
    let conn = connected();
    let record = area_record(1, AREA);
    conn.peer()
        .send_bytes(&record[..8], &[area.read_only_fd().as_fd()]);
    conn.peer()
        .send_bytes(&record[8..], &[area.read_only_fd().as_fd()]);
    publish_in_area(&conn, 0, 1, 0, 1);
    assert_recv_breaks(&conn, ProtocolError::StrayDescriptors { count: 1 });
}

#[test]
fn a_retirement_with_an_extent_is_bad_retirement() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    for (offset, len) in [(0, 1), (5, 0), (u32::MAX, u32::MAX)] {
        let conn = connected();
        let area = Area::sealed(AREA);
        conn.send_area(2, AREA, area.read_only_fd().as_fd());
        let mut retire = Descriptor::inline(0, 0, &[(offset, len)]);
        retire.seg_count = 0;
        retire.area = 2;
        conn.mine.write_descriptor(0, &retire);
        conn.mine.publish(1);
        assert_recv_breaks(
            &conn,
            ProtocolError::BadRetirement {
                area: 2,
                offset,
                len,
            },
        );
    }
}

#[test]
fn an_id_in_use_is_bad_and_the_ids_bound_the_mappings() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let base = (shm_map_count(), fd_count());
    let conn = connected();
    let (maps, fds) = (shm_map_count(), fd_count());
    // Every id, each area 4 KiB: all accepted.
    let small = 4096;
    let areas: Vec<Area> = (1..=63).map(|_| Area::sealed(small)).collect();
    for (id, area) in (1u8..).zip(&areas) {
        conn.send_area(id, small, area.read_only_fd().as_fd());
    }
    let segment = text_segment("63");
    areas[62].write_data(0, &segment);
    publish_in_area(&conn, 0, 63, 0, words(&segment));
    assert_eq!(text_of(&conn.channel.recv().unwrap()), "63");
    // The hand peer's 63 memfds and the real end's 63 views; no descriptor
    // of the real end's stays open for them.
    assert_eq!(shm_map_count(), maps + 63 + 63);
    assert_eq!(fd_count(), fds + 63, "only the hand peer's memfds");
    // Id 5 again, while it is in use: read when the waiting receive looks
    // at the socket (after a wait slice).
    let again = Area::sealed(small);
    conn.send_area(5, small, again.read_only_fd().as_fd());
    assert_eq!(
        protocol(conn.channel.recv_timeout(Duration::from_secs(5))),
        ProtocolError::BadAreaRecord {
            area: 5,
            bytes: small
        }
    );
    assert_recv_breaks(
        &conn,
        ProtocolError::BadAreaRecord {
            area: 5,
            bytes: small,
        },
    );
    drop(conn);
    drop(areas);
    drop(again);
    assert_eq!((shm_map_count(), fd_count()), base);
}

#[test]
fn areas_beyond_what_the_end_accepts_are_area_limit() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    // This end maps at most the peer's 64 KiB region and 64 KiB more.
    let limit = (64 << 10) + AREA;
    let conn = Connected::new(&options().max_incoming(limit), GEOMETRY);
    let first = Area::sealed(AREA);
    conn.send_area(1, AREA, first.read_only_fd().as_fd());
    let second = Area::sealed(4096);
    conn.send_area(2, 4096, second.read_only_fd().as_fd());
    publish_in_area(&conn, 0, 2, 0, 1);
    assert_recv_breaks(
        &conn,
        ProtocolError::AreaLimit {
            bytes: limit + 4096,
            limit,
        },
    );
}

#[test]
fn the_limit_is_announced_and_the_real_end_grows_within_what_we_accept() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    // The hand peer accepts nothing beyond the real end's region (its hello
    // says 0): a message larger than that region is TooLarge there, and no
    // area record is ever sent.
    let conn = connected();
    let mut m = conn.channel.message();
    m.set_root::<capnp::data::Owned>(&vec![7u8; 256 << 10][..])
        .unwrap();
    match conn.channel.send(m) {
        Err(capnp_shm::SendError::TooLarge(_, t)) => {
            assert_eq!(t.kind, capnp_shm::TooLargeKind::Words, "{t:?}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(conn.peer().nothing_to_read(), "the real end sent something");
}

/// A message of 256 KiB built by the real end: more than its 64 KiB
/// region, so building and sending it needs an area.
fn large(conn: &Connected) -> capnp_shm::MessageBuilder<'_> {
    let mut m = conn.channel.message();
    m.set_root::<capnp::data::Owned>(&vec![7u8; 256 << 10][..])
        .unwrap();
    m
}

#[test]
fn a_full_socket_holds_growth_back_within_the_deadline_and_breaks_nothing() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let conn = Connected::accepting(&options(), GEOMETRY, 16 << 20);
    // We do not read our socket: the real end's side of it fills up.
    let filled = peer::fill_socket(conn.channel.as_fd());
    assert!(filled > 0);
    // Building does not wait for the socket: the segment that needs an
    // area comes from the heap.
    let m = large(&conn);
    assert_eq!(conn.channel.stats().send.spilled_segments, 1);
    // The sends that would hand an area over give up at their deadline,
    // the message handed back, the channel intact.
    let m = match conn.channel.try_send(m) {
        Err(capnp_shm::TrySendError::Full(m)) => m,
        other => panic!("expected Full, got {other:?}"),
    };
    let m = match conn.channel.send_timeout(m, Duration::from_millis(50)) {
        Err(capnp_shm::SendTimeoutError::Timeout(m)) => m,
        other => panic!("expected Timeout, got {other:?}"),
    };
    assert_eq!(conn.their_counter(counter::CLOSED), 0, "the channel failed");
    // Nothing of a record went out with the doorbells.
    let (bytes, fds) = conn.peer().read_available();
    assert_eq!(bytes.len(), filled);
    assert!(bytes.iter().all(|&b| b == 0xDB) && fds.is_empty());
    // With room on the socket, the same message goes, in an area handed
    // over first.
    conn.channel.try_send(m).unwrap();
    let (bytes, fds) = conn.peer().read_available();
    assert_eq!(
        (bytes.len(), bytes[0], bytes[1], fds.len()),
        (16, 0x5E, 1, 1)
    );
    assert_eq!(conn.their_counter(counter::PUBLISHED), 1);
}

#[test]
fn our_own_area_sent_back_as_an_area_is_own_area() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    let conn = Connected::accepting(&options(), GEOMETRY, 16 << 20);
    // The real end grows and hands us its area 1.
    conn.channel.send(large(&conn)).unwrap();
    let (record, fds) = conn.peer().read_available();
    assert_eq!((record.len(), record[1], fds.len()), (16, 1, 1));
    let bytes = u64::from_le_bytes(record[8..].try_into().unwrap());
    // Handed back as our area 2, and named.
    conn.send_area(2, bytes, fds[0].as_fd());
    publish_in_area(&conn, 0, 2, 0, 1);
    assert_recv_breaks(
        &conn,
        ProtocolError::OwnArea {
            announced: 2,
            ours: 1,
        },
    );
}

#[test]
fn a_retired_area_counts_against_max_incoming_while_a_message_holds_it() {
    // Every test here: the counting ones see this process's mappings.
    let _s = common::serial();
    let _w = Watchdog::new(LIMIT);
    // This end maps at most the peer's 64 KiB region and one area.
    let limit = (64 << 10) + AREA;
    for dropped_first in [false, true] {
        let conn = Connected::new(&options().max_incoming(limit), GEOMETRY);
        let first = Area::sealed(AREA);
        let segment = text_segment("held");
        first.write_data(0, &segment);
        conn.send_area(1, AREA, first.read_only_fd().as_fd());
        publish_in_area(&conn, 0, 1, 0, words(&segment));
        let held = conn.channel.recv().unwrap();
        // Retired while we hold the message: still mapped for it.
        retire_area(&conn, 1, 1);
        assert!(matches!(
            conn.channel.try_recv(),
            Err(capnp_shm::TryRecvError::Empty)
        ));
        assert_eq!(text_of(&held), "held");
        // Another area as large fits once the first is unmapped, not before.
        let second = Area::sealed(AREA);
        let segment = text_segment("second");
        second.write_data(0, &segment);
        if dropped_first {
            drop(held);
            conn.send_area(2, AREA, second.read_only_fd().as_fd());
            publish_in_area(&conn, 2, 2, 0, words(&segment));
            assert_eq!(text_of(&conn.channel.recv().unwrap()), "second");
        } else {
            conn.send_area(2, AREA, second.read_only_fd().as_fd());
            publish_in_area(&conn, 2, 2, 0, words(&segment));
            assert_recv_breaks(
                &conn,
                ProtocolError::AreaLimit {
                    bytes: limit + AREA,
                    limit,
                },
            );
            drop(held);
        }
    }
}
