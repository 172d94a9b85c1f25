//! The real end checks everything a peer sends before using it: each
//! malformed hello, region file, counter, descriptor or release ends the
//! channel with its own protocol error (or a timeout), never a panic or a
//! hang, and the channel stays closed afterwards. The peer is driven by hand
//! from the documented wire format (see `tests/peer`), so it can send what the
//! crate itself never would.
mod common;
mod peer;

use std::fmt::Debug;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp::message::{AllocationStrategy, HeapAllocator, ReaderOptions};
use capnp::Word;
use capnp_shm::{
    Error, Failure, MessageBuilder, Options, ProtocolError, Received, RecvTimeoutError, SetupError,
    TrySendError,
};
use common::Watchdog;
use peer::{counter, header, Connected, Descriptor, Geometry, HandPeer, Hello, Region};

/// Every test aborts the process if it runs longer than this.
const LIMIT: Duration = Duration::from_secs(30);

/// The hand peer's region in most tests: a ring of 4 and 60 KiB of data
/// (7680 words) after the first page.
const GEOMETRY: Geometry = Geometry::new(64 << 10, 4);

/// The real end's options: a short set-up timeout (a peer that never answers
/// costs the test 2 s, not 5) and a small region.
fn options() -> Options {
    Options::new()
        .setup_timeout(Duration::from_secs(2))
        .region_size(64 << 10)
}

// ---- checking errors -------------------------------------------------------

/// The protocol error inside `error` (of any operation), failing the test
/// on any other error.
fn protocol(error: impl Into<Error>) -> ProtocolError {
    match error.into() {
        Error::Protocol(p) => p,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The protocol error in `result`, failing the test on success or any other
/// error.
fn protocol_error<T: Debug, E: Into<Error> + Debug>(result: Result<T, E>) -> ProtocolError {
    protocol(result.expect_err("expected a protocol error, got success"))
}

/// Asserts that the channel stays closed after failing with `expected`: every
/// later receive and send fails with the same error, without waiting, and the
/// real end has announced its close in its region (so a real peer would stop
/// too).
fn assert_stays_broken(conn: &Connected, expected: ProtocolError) {
    let channel = &conn.channel;
    assert_eq!(protocol_error(channel.try_recv()), expected);
    assert_eq!(protocol_error(channel.recv()), expected);
    assert_eq!(
        protocol_error(channel.recv_timeout(Duration::from_secs(5))),
        expected
    );
    let mut message = channel.message();
    message
        .set_root(capnp::text::Reader::from("after the fault"))
        .unwrap();
    let failed = channel
        .try_send(message)
        .expect_err("a broken channel sends");
    assert_eq!(protocol(failed.into_error()), expected);
    assert_eq!(
        conn.their_counter(counter::CLOSED),
        1,
        "the real end did not announce its close"
    );
}

/// Asserts that the real end's next receive fails with `expected`, and that
/// the channel stays closed.
fn assert_recv_breaks(conn: &Connected, expected: ProtocolError) {
    assert_eq!(protocol_error(conn.channel.try_recv()), expected);
    assert_stays_broken(conn, expected);
}

// ---- messages --------------------------------------------------------------

/// The segments of a capnp message whose root is `text`.
fn text_segments(text: &str) -> Vec<Vec<u8>> {
    let mut message = capnp::message::Builder::new_default();
    message.set_root(capnp::text::Reader::from(text)).unwrap();
    let segments = message.get_segments_for_output();
    segments.iter().map(|s| s.to_vec()).collect()
}

/// The segments of a message whose root is a list of `items` texts, built
/// with one-word fixed-size segments so that it needs far more segments than
/// a descriptor holds inline.
fn many_segment_list(items: u32) -> Vec<Vec<u8>> {
    let allocator = HeapAllocator::new()
        .first_segment_words(1)
        .allocation_strategy(AllocationStrategy::FixedSize);
    let mut message = capnp::message::Builder::new(allocator);
    let mut list = message.initn_root::<capnp::text_list::Builder<'_>>(items);
    for i in 0..items {
        list.set(i, capnp::text::Reader::from(format!("item {i}").as_str()));
    }
    let segments = message.get_segments_for_output();
    segments.iter().map(|s| s.to_vec()).collect()
}

/// The text at the root of a received message.
fn text_of(received: &Received<'_>) -> String {
    let text: capnp::text::Reader<'_> = received.get_root().expect("a text root");
    text.to_str().expect("utf-8").to_owned()
}

/// The text at the root of a single-segment message given as bytes, parsed
/// from a private, word-aligned copy (as a receiver that copies would).
fn text_of_segment(bytes: &[u8]) -> String {
    let mut words = Word::allocate_zeroed_vec(bytes.len() / 8);
    Word::words_to_bytes_mut(&mut words).copy_from_slice(bytes);
    let segments = [Word::words_to_bytes(&words)];
    let reader = capnp::message::Reader::new(
        capnp::message::SegmentArray::new(&segments),
        ReaderOptions::new(),
    );
    let text: capnp::text::Reader<'_> = reader.get_root().expect("a text root");
    text.to_str().expect("utf-8").to_owned()
}

// ---- set-up ----------------------------------------------------------------

/// A sealed region of [`GEOMETRY`], valid in every respect.
fn sealed_region() -> Region {
    let region = Region::new(GEOMETRY);
    region.seal();
    region
}

/// Runs a handshake in which the hand peer answers with `hello` and `fds`,
/// and returns the real end's set-up error, after checking that it closed
/// its socket (a failed set-up leaves nothing behind).
fn setup_error(options: &Options, hello: &Hello, fds: &[BorrowedFd<'_>]) -> Error {
    let mut peer = HandPeer::start(options);
    peer.send_hello(hello, fds);
    let error = peer.setup_result().expect_err("set-up accepted a bad peer");
    peer.assert_hung_up();
    error.into()
}

/// [`setup_error`] with default options, for a protocol error.
fn setup_protocol_error(hello: &Hello, fds: &[BorrowedFd<'_>]) -> ProtocolError {
    protocol(setup_error(&options(), hello, fds))
}

/// A valid hello for a sealed region of [`GEOMETRY`].
fn valid_hello() -> Hello {
    Hello::new(GEOMETRY, true)
}

/// The magic in the wrong byte order: what a big-endian writer would send.
const MAGIC_BYTESWAPPED: u64 = u64::from_be_bytes(*b"CAPNPSHM");

#[test]
fn wrong_magic_is_bad_magic() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    for magic in [u64::from_le_bytes(*b"CAPNPSHN"), 0, MAGIC_BYTESWAPPED] {
        let hello = Hello {
            magic,
            ..valid_hello()
        };
        assert_eq!(
            setup_protocol_error(&hello, &[region.read_only_fd().as_fd()]),
            ProtocolError::BadMagic,
            "magic {magic:#x}"
        );
    }
}

#[test]
fn wrong_version_is_bad_version() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    for version in [0, 1, 2, 3, 4, 5, 6, 8, u32::MAX] {
        let hello = Hello {
            version,
            ..valid_hello()
        };
        assert_eq!(
            setup_protocol_error(&hello, &[region.read_only_fd().as_fd()]),
            ProtocolError::BadVersion { found: version }
        );
    }
}

#[test]
fn unknown_flags_or_reserved_bytes_are_bad_hello_flags() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    let mut reserved_set = valid_hello();
    reserved_set.reserved[23] = 1;
    let hellos = [
        Hello {
            flags: 2 | 1,
            ..valid_hello()
        },
        Hello {
            flags: 1 << 31,
            ..valid_hello()
        },
        reserved_set,
    ];
    for hello in hellos {
        assert_eq!(
            setup_protocol_error(&hello, &[region.read_only_fd().as_fd()]),
            ProtocolError::BadHelloFlags,
            "{hello:?}"
        );
    }
}

#[test]
fn absurd_geometry_is_bad_geometry() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    let cases = [
        (64 << 10, 3),              // ring not a power of two
        (64 << 10, 0),              // no ring at all
        (64 << 10, 1 << 17),        // ring above 65 536
        ((64 << 10) + 8, 4),        // region not a multiple of 4096
        (4096, 4),                  // no room for a data area
        (0, 4),                     // no region at all
        ((1 << 34) + 4096, 4),      // region above 16 GiB
        (u64::MAX - 4095, 1),       // offsets would overflow
        (4096 + 65536 * 24, 65536), // rings fill the whole region
    ];
    for (region_size, ring_capacity) in cases {
        let hello = Hello::new(Geometry::new(region_size, ring_capacity), true);
        assert_eq!(
            setup_protocol_error(&hello, &[region.read_only_fd().as_fd()]),
            ProtocolError::BadGeometry {
                region_size,
                ring_capacity
            }
        );
    }
}

#[test]
fn hello_without_descriptor_is_missing_descriptor() {
    let _w = Watchdog::new(LIMIT);
    assert_eq!(
        setup_protocol_error(&valid_hello(), &[]),
        ProtocolError::MissingDescriptor
    );
}

#[test]
fn hello_with_two_or_three_descriptors_is_extra_descriptors() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    for extra in [1, 2] {
        // The extra descriptors are pipe read ends: once the real end has
        // rejected them, a closed reader shows on the write end.
        let (reader, writer) = peer::pipe();
        assert!(
            !peer::pipe_has_no_reader(writer.as_fd()),
            "a reader is open"
        );
        let mut fds: Vec<OwnedFd> = vec![region.read_only_fd()];
        fds.extend((0..extra).map(|_| reader.try_clone().unwrap()));
        drop(reader);
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        assert_eq!(
            setup_protocol_error(&valid_hello(), &borrowed),
            ProtocolError::ExtraDescriptors { count: extra + 1 }
        );
        drop(fds);
        assert!(
            peer::pipe_has_no_reader(writer.as_fd()),
            "a rejected descriptor stayed open in the real end"
        );
    }
}

#[test]
fn too_many_descriptors_for_the_control_buffer_is_control_truncated() {
    let _w = Watchdog::new(LIMIT);
    let (reader, writer) = peer::pipe();
    let fds: Vec<BorrowedFd<'_>> = (0..32).map(|_| reader.as_fd()).collect();
    let hello = valid_hello();
    let error = setup_error(&options(), &hello, &fds);
    drop(reader);
    assert_eq!(protocol(error), ProtocolError::ControlTruncated);
    assert!(
        peer::pipe_has_no_reader(writer.as_fd()),
        "a descriptor of a truncated hello stayed open in the real end"
    );
}

#[test]
fn descriptor_that_is_not_a_file_is_not_a_regular_file() {
    let _w = Watchdog::new(LIMIT);
    let (reader, writer) = peer::pipe();
    let (socket, _other) = UnixStream::pair().unwrap();
    let directory = std::fs::File::open("/").unwrap();
    let fds: [BorrowedFd<'_>; 3] = [reader.as_fd(), socket.as_fd(), directory.as_fd()];
    for fd in fds {
        assert_eq!(
            setup_protocol_error(&valid_hello(), &[fd]),
            ProtocolError::NotARegularFile,
            "{fd:?}"
        );
    }
    drop(reader);
    assert!(
        peer::pipe_has_no_reader(writer.as_fd()),
        "the rejected pipe stayed open in the real end"
    );
}

#[test]
fn file_of_another_size_is_wrong_file_size() {
    let _w = Watchdog::new(LIMIT);
    for actual in [
        4096,
        GEOMETRY.region_size - 4096,
        GEOMETRY.region_size + 4096,
    ] {
        let region = Region::create(GEOMETRY, actual);
        region.seal();
        assert_eq!(
            setup_protocol_error(&valid_hello(), &[region.read_only_fd().as_fd()]),
            ProtocolError::WrongFileSize {
                announced: GEOMETRY.region_size,
                actual
            }
        );
    }
}

#[test]
fn file_announced_sealed_without_the_seals_is_wrong_seals() {
    let _w = Watchdog::new(LIMIT);
    let partial = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    let no_future_write = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    for seals in [0, partial, no_future_write] {
        let region = Region::new(GEOMETRY);
        region.write_header(GEOMETRY, peer::FLAG_SEALED);
        if seals != 0 {
            region.seal_with(seals);
        }
        assert_eq!(
            setup_protocol_error(&valid_hello(), &[region.read_only_fd().as_fd()]),
            ProtocolError::WrongSeals {
                found: seals.unsigned_abs()
            }
        );
    }
}

/// Under `vm.memfd_noexec=1` the kernel creates every memfd as if with
/// `MFD_NOEXEC_SEAL`, which adds `F_SEAL_EXEC`; the crate's own region then
/// carries one seal more than `REGION_SEALS`, and two unmodified ends refuse
/// each other. The extra seal only forbids `chmod +x`, so it should pass.
#[test]
fn region_with_the_exec_seal_too_is_accepted() {
    let _w = Watchdog::new(LIMIT);
    // What the crate's own memfd looks like under vm.memfd_noexec=1.
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_NOEXEC_SEAL;
    let region = Region::create_with_flags(GEOMETRY, GEOMETRY.region_size, flags);
    region.seal();
    let mut peer = HandPeer::start(&options());
    peer.send_hello(&valid_hello(), &[region.read_only_fd().as_fd()]);
    // The real end maps it ("mapped") and sets up shared memory.
    let channel = peer.finish_shm();
    assert_eq!(channel.transport(), capnp_shm::Transport::SharedMemory);
}

#[test]
fn unsealed_region_is_refused_by_default_and_accepted_on_request() {
    let _w = Watchdog::new(LIMIT);
    let hello = Hello::new(GEOMETRY, false);
    let region = Region::new(GEOMETRY);
    // Refused: the real end says so ("cannot map") and both ends fall back
    // to the stream transport on the socket.
    let mut peer = HandPeer::start(&options());
    peer.send_hello(&hello, &[region.read_only_fd().as_fd()]);
    assert_eq!(&peer.read_verdict(), &peer::REFUSED);
    peer.send_verdict(&peer::MAPPED);
    let channel = peer.setup_result().expect("a stream channel");
    assert_eq!(channel.transport(), capnp_shm::Transport::Stream);
    drop(channel);

    let mut peer = HandPeer::start(&options().allow_unsealed_peer(true));
    peer.send_hello(&hello, &[region.read_only_fd().as_fd()]);
    let channel = peer.finish_shm();
    // It works: a message written by hand arrives.
    region.write_message(0, 0, 0, &text_segments("unsealed"));
    region.publish(1);
    assert_eq!(text_of(&channel.recv().unwrap()), "unsealed");
}

/// Changes one header field of a region after it was written correctly.
type Corruption = fn(&Region);

#[test]
fn control_block_disagreeing_with_the_hello_is_control_block_mismatch() {
    let _w = Watchdog::new(LIMIT);
    let corruptions: [(&str, Corruption); 6] = [
        ("magic", |r| {
            r.map()
                .store_u64(header::MAGIC, u64::from_le_bytes(*b"CAPNPSHX"));
        }),
        ("version", |r| r.map().store_u32(header::VERSION, 4)),
        ("flags", |r| r.map().store_u32(header::FLAGS, 0)),
        ("region size", |r| {
            r.map().store_u64(header::REGION_SIZE, 128 << 10);
        }),
        ("ring capacity", |r| {
            r.map().store_u32(header::RING_CAPACITY, 8);
        }),
        ("held capacity", |r| {
            r.map().store_u32(header::HELD_CAPACITY, 8);
        }),
    ];
    for (field, corrupt) in corruptions {
        let region = sealed_region();
        corrupt(&region);
        assert_eq!(
            setup_protocol_error(&valid_hello(), &[region.read_only_fd().as_fd()]),
            ProtocolError::ControlBlockMismatch,
            "{field}"
        );
    }
    // An unsealed file whose header claims to be sealed.
    let region = Region::new(GEOMETRY);
    region.write_header(GEOMETRY, peer::FLAG_SEALED);
    let error = setup_error(
        &options().allow_unsealed_peer(true),
        &Hello::new(GEOMETRY, false),
        &[region.read_only_fd().as_fd()],
    );
    assert_eq!(protocol(error), ProtocolError::ControlBlockMismatch);
}

#[test]
fn peer_closing_mid_handshake_is_handshake_truncated() {
    let _w = Watchdog::new(LIMIT);
    let region = sealed_region();
    let hello = valid_hello().encode();
    // Nothing at all: a peer that went away, not one that broke the protocol.
    let mut peer = HandPeer::start(&options());
    peer.close_socket();
    assert!(matches!(peer.setup_result(), Err(SetupError::Disconnected)));
    // Ten bytes; all but the last byte, with the descriptor.
    for sent in [10, 63] {
        let mut peer = HandPeer::start(&options());
        {
            let fd = region.read_only_fd();
            peer.send_bytes(&hello[..sent], &[fd.as_fd()]);
        }
        peer.close_socket();
        assert_eq!(
            protocol_error(peer.setup_result()),
            ProtocolError::HandshakeTruncated,
            "after {sent} bytes"
        );
    }
}

#[test]
fn peer_that_never_answers_is_a_timeout() {
    let _w = Watchdog::new(LIMIT);
    let quick = options().setup_timeout(Duration::from_millis(300));
    let hello = valid_hello().encode();
    // Silence; or half a hello, then silence.
    for sent in [0, 32] {
        let mut peer = HandPeer::start(&quick);
        if sent > 0 {
            peer.send_bytes(&hello[..sent], &[]);
        }
        match peer.setup_result() {
            Err(SetupError::Timeout { .. }) => {}
            other => panic!("expected a timeout after {sent} bytes, got {other:?}"),
        }
        peer.assert_hung_up();
    }
}

// ---- after a valid handshake: the descriptor ring --------------------------

/// A real end connected to a hand peer with a sealed region of [`GEOMETRY`].
fn connected() -> Connected {
    Connected::new(&options(), GEOMETRY)
}

#[test]
fn published_past_the_ring_is_published_out_of_range() {
    let _w = Watchdog::new(LIMIT);
    let capacity = GEOMETRY.ring_capacity;
    // Past the ring; or "backwards" from zero by two, which is as far.
    // (u32::MAX, one behind zero, is the legal trailing case.)
    for published in [capacity + 1, u32::MAX - 1] {
        let conn = connected();
        conn.mine.publish(published);
        assert_recv_breaks(
            &conn,
            ProtocolError::PublishedOutOfRange {
                consumed: 0,
                published,
            },
        );
    }
    // Backwards after two messages were taken. (Trailing by one is legal:
    // a receiver may take a message by its descriptor tag before the
    // sender's counter store lands.)
    let conn = connected();
    conn.mine.write_message(0, 0, 0, &text_segments("one"));
    conn.mine.write_message(1, 1, 8, &text_segments("two"));
    conn.mine.publish(2);
    drop(conn.channel.recv().unwrap());
    drop(conn.channel.recv().unwrap());
    conn.mine.publish(0);
    assert_recv_breaks(
        &conn,
        ProtocolError::PublishedOutOfRange {
            consumed: 2,
            published: 0,
        },
    );
}

/// A receive with no deadline whose first look finds the next tag missing
/// waits without reading the peer's `published`: a count the peer stored
/// without writing the entry is caught at the look after the wait, spinning
/// or not, and the receive fails rather than waiting on.
#[test]
fn a_count_without_its_entry_fails_a_receive_with_no_deadline() {
    let _w = Watchdog::new(LIMIT);
    let expected = ProtocolError::DescriptorSequence {
        expected: 0,
        found: u32::MAX,
    };
    for o in [options(), options().spin(Duration::ZERO)] {
        let conn = Connected::new(&o, GEOMETRY);
        conn.mine.publish(1);
        assert_eq!(protocol_error(conn.channel.recv()), expected);
        assert_stays_broken(&conn, expected);
    }
}

#[test]
fn descriptor_with_the_wrong_seq_is_descriptor_sequence() {
    let _w = Watchdog::new(LIMIT);
    // Ahead by one; a lap ahead (same ring position); a stale zero.
    for (at, found) in [(0, 1), (0, GEOMETRY.ring_capacity), (1, 0)] {
        let conn = connected();
        let segments = text_segments("fine otherwise");
        if at == 1 {
            conn.mine.write_message(0, 0, 0, &segments);
            conn.mine.publish(1);
            drop(conn.channel.recv().unwrap());
        }
        let mut d = conn.mine.write_message(at, 0, 16, &segments);
        d.seq = found;
        conn.mine.write_descriptor(at, &d);
        conn.mine.publish(at + 1);
        assert_recv_breaks(
            &conn,
            ProtocolError::DescriptorSequence {
                expected: at,
                found,
            },
        );
    }
}

#[test]
fn zero_or_too_many_segments_is_bad_segment_count() {
    let _w = Watchdog::new(LIMIT);
    // The count is 10 bits on the wire: 1023 is the largest expressible.
    // (0 in area 0 is no retirement either: area 0 is the region's.)
    for count in [0, 513, 0x3ff] {
        let conn = connected();
        let mut d = Descriptor::inline(0, 0, &[(0, 1)]);
        d.seg_count = count;
        conn.mine.write_descriptor(0, &d);
        conn.mine.publish(1);
        assert_recv_breaks(&conn, ProtocolError::BadSegmentCount { count });
    }
}

#[test]
fn segment_outside_the_data_area_is_segment_out_of_bounds() {
    let _w = Watchdog::new(LIMIT);
    let words = GEOMETRY.data_words();
    // (A later segment of a multi-segment message lies in the out-of-line
    // table, covered by the table test below.)
    let cases: [&[(u32, u32)]; 5] = [
        &[(words - 1, 2)],    // runs one word past the end
        &[(0, words + 1)],    // longer than the area
        &[(words, 1)],        // starts at the end
        &[(u32::MAX - 1, 2)], // offset + len overflows u32 (MAX: carried)
        &[(1, u32::MAX)],     // len + offset overflows u32
    ];
    for segments in cases {
        let conn = connected();
        conn.mine
            .write_descriptor(0, &Descriptor::inline(0, 0, segments));
        conn.mine.publish(1);
        let &(offset, len) = segments.last().unwrap();
        assert_recv_breaks(&conn, ProtocolError::SegmentOutOfBounds { offset, len });
    }
}

/// The slot, count and area word of an honest carried descriptor: slot 0,
/// one segment, area 0.
const CARRIED_SLOT_COUNT: u32 = 1 << 16;

#[test]
fn a_message_carried_in_its_descriptor_is_read_from_it_and_never_released() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    for (seq, text) in (0..).zip([
        "carried",
        "",
        "thirteen words of text, less than 112 bytes!!!!!!!!!!!!!!!!!!!!!",
    ]) {
        let segments = text_segments(text);
        let segment = &segments[0];
        assert!(segment.len() <= 112, "{} bytes", segment.len());
        let words = u32::try_from(segment.len() / 8).unwrap();
        conn.mine
            .write_carried(seq, seq, CARRIED_SLOT_COUNT, words, segment);
        conn.mine.publish(seq + 1);
        let got = conn.channel.try_recv().expect("the carried message");
        assert!(got.is_copied(), "carried, so copied out");
        assert_eq!(got.len_bytes(), segment.len());
        assert_eq!(text_of(&got), text);
        drop(got);
    }
    // Nothing to release: the release ring and its counter are untouched.
    assert_eq!(conn.their_counter(counter::RELEASED), 0);
}

#[test]
fn a_malformed_carried_descriptor_is_bad_carried() {
    let _w = Watchdog::new(LIMIT);
    let segment = &text_segments("hi")[0];
    let cases = [
        (CARRIED_SLOT_COUNT | 1, 2),       // a slot
        (2 << 16, 2),                      // two segments
        (CARRIED_SLOT_COUNT | 1 << 26, 2), // area 1
        (600 << 16, 2),                    // a count no descriptor may have
        (CARRIED_SLOT_COUNT, 15),          // more than an entry holds
        (CARRIED_SLOT_COUNT, u32::MAX),
    ];
    for (slot_count, len) in cases {
        let conn = connected();
        conn.mine.write_carried(0, 0, slot_count, len, segment);
        conn.mine.publish(1);
        assert_recv_breaks(&conn, ProtocolError::BadCarried { slot_count, len });
    }
}

#[test]
fn the_real_end_carries_a_small_message_in_its_descriptor() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    let mut message = conn.channel.message();
    message
        .set_root(capnp::text::Reader::from("small"))
        .unwrap();
    conn.channel.send(message).unwrap();
    let d = conn.their_descriptor(0);
    assert_eq!((d.seq, d.slot, d.seg_count, d.area), (0, 0, 1, 0));
    let carried = conn.their_carried(0).expect("carried in the entry");
    assert_eq!(text_of_segment(&carried), "small");
}

/// A carried message that fits on its entry's first line, the tag's,
/// writes that line only: the words past it keep what the message before
/// it in the entry left there, so the entry's second line stays in the
/// receiver's cache. Its descriptor gives the short length, the words
/// past which no receiver reads.
#[test]
fn a_short_carried_message_writes_only_its_entrys_first_line() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    let capacity = conn.their_geometry.ring_capacity;
    let send = |text: &str| {
        let mut message = conn.channel.message();
        message.set_root(capnp::text::Reader::from(text)).unwrap();
        conn.channel.send(message).unwrap();
    };
    send("thirteen words of text, less than 112 bytes!!!!!!!!!!!!!!!!!!!!!");
    let long = conn.their_entry_words(0);
    assert!(
        conn.their_descriptor(0).segments[0].1 > 6,
        "the first message reaches the second line"
    );
    for _ in 1..capacity {
        send("filler");
    }
    // We took them all: the real end may write entry 0 again.
    conn.mine.set_counter(counter::CONSUMED, capacity);
    send("hi");
    let short = conn.their_carried(capacity).expect("carried");
    let bytes = short.len();
    assert!(bytes <= 48, "on the first line: {bytes} bytes");
    assert_eq!(text_of_segment(&short), "hi");
    let entry = conn.their_entry_words(capacity);
    assert_eq!(
        entry[bytes..],
        long[bytes..],
        "the words past the short message are not written"
    );
}

/// One malformed out-of-line segment table.
struct TableCase {
    /// Where the descriptor says the table is, in words.
    offset: u32,
    /// How long the descriptor says the table is (it must equal the count).
    len: u32,
    /// The entries written there, if any.
    entries: Vec<(u32, u32)>,
    /// The extent the error names.
    expected: (u32, u32),
}

#[test]
fn out_of_line_table_outside_the_data_area_is_segment_out_of_bounds() {
    let _w = Watchdog::new(LIMIT);
    let words = GEOMETRY.data_words();
    let count = 8;
    let in_bounds: Vec<(u32, u32)> = (0..count).map(|i| (100 + i, 1)).collect();
    let with_entry = |i: usize, entry: (u32, u32)| {
        let mut entries = in_bounds.clone();
        entries[i] = entry;
        entries
    };
    let cases = [
        // The table runs past the end of the data area.
        TableCase {
            offset: words - 4,
            len: 2 * count,
            entries: Vec::new(),
            expected: (words - 4, 2 * count),
        },
        // The table's offset + length overflows u32.
        TableCase {
            offset: u32::MAX - 2,
            len: 2 * count,
            entries: Vec::new(),
            expected: (u32::MAX - 2, 2 * count),
        },
        // The table is shorter than two words a segment.
        TableCase {
            offset: 0,
            len: 2 * count - 1,
            entries: in_bounds.clone(),
            expected: (0, 2 * count - 1),
        },
        // An entry lies past the end.
        TableCase {
            offset: 0,
            len: 2 * count,
            entries: with_entry(5, (words, 1)),
            expected: (words, 1),
        },
        // An entry's offset + length overflows u32.
        TableCase {
            offset: 0,
            len: 2 * count,
            entries: with_entry(7, (u32::MAX, 1)),
            expected: (u32::MAX, 1),
        },
    ];
    for case in cases {
        let conn = connected();
        conn.mine.write_table(case.offset, &case.entries);
        let d = Descriptor::out_of_line(0, 0, count, case.offset, case.len);
        conn.mine.write_descriptor(0, &d);
        conn.mine.publish(1);
        let (offset, len) = case.expected;
        assert_recv_breaks(&conn, ProtocolError::SegmentOutOfBounds { offset, len });
    }
}

#[test]
fn stray_bytes_on_the_socket_are_unexpected_socket_data() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    conn.peer().send_bytes(b"?", &[]);
    // The real end looks at the socket after a wait slice with no message.
    assert_eq!(
        protocol_error(conn.channel.recv_timeout(Duration::from_secs(10))),
        ProtocolError::UnexpectedSocketData
    );
    assert_stays_broken(&conn, ProtocolError::UnexpectedSocketData);
}

#[test]
fn doorbell_bytes_on_the_socket_are_drained_not_an_error() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    // 0xDB is the doorbell a peer rings for an end waiting in wait_any's
    // poll; it wakes, and is read away wherever the socket is polled.
    conn.peer().send_bytes(&[0xDB; 5], &[]);
    assert!(matches!(
        conn.channel.recv_timeout(Duration::from_millis(300)),
        Err(RecvTimeoutError::Timeout)
    ));
    conn.mine
        .write_message(0, 0, 0, &text_segments("after the bells"));
    conn.mine.publish(1);
    let got = conn.channel.recv().unwrap();
    assert_eq!(text_of(&got), "after the bells");
}

// ---- valid messages by hand ------------------------------------------------

#[test]
fn messages_received_before_a_fault_stay_readable() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    conn.mine.write_message(0, 10, 0, &text_segments("hi"));
    conn.mine.publish(1);
    let first = conn
        .channel
        .recv()
        .expect("a valid message written by hand");
    assert_eq!(text_of(&first), "hi");
    let incoming = conn.channel.incoming_range();
    assert!(
        first
            .segments()
            .all(|s| incoming.contains(&(s.as_ptr() as usize))),
        "the message was not read in place"
    );

    // A second one, received and dropped: the real end takes it and lists
    // it in its release ring, as (slot, seq).
    conn.mine.write_message(1, 11, 16, &text_segments("second"));
    conn.mine.publish(2);
    let second = conn.channel.try_recv().expect("the second message");
    assert_eq!(text_of(&second), "second");
    drop(second);
    assert_eq!(conn.their_counter(counter::CONSUMED), 2);
    assert_eq!(conn.their_counter(counter::RELEASED), 1);
    assert_eq!(conn.their_release(0), (11, 1));

    // Then a bad descriptor breaks the channel...
    conn.mine
        .write_descriptor(2, &Descriptor::inline(7, 12, &[(0, 2)]));
    conn.mine.publish(3);
    let expected = ProtocolError::DescriptorSequence {
        expected: 2,
        found: 7,
    };
    assert_recv_breaks(&conn, expected);
    // ...and the message delivered before it still reads the same.
    assert_eq!(text_of(&first), "hi");
    drop(first);
}

#[test]
fn a_message_with_an_out_of_line_table_is_received() {
    let _w = Watchdog::new(LIMIT);
    let conn = connected();
    let items = 9;
    let segments = many_segment_list(items);
    assert!(segments.len() > peer::INLINE_SEGMENTS, "{}", segments.len());
    let d = conn.mine.write_message(0, 3, 0, &segments);
    assert_eq!(d.seg_count, u32::try_from(segments.len()).unwrap());
    conn.mine.publish(1);
    let received = conn.channel.recv().expect("an out-of-line message");
    assert_eq!(received.segments().count(), segments.len());
    let list: capnp::text_list::Reader<'_> = received.get_root().unwrap();
    assert_eq!(list.len(), items);
    for (i, text) in (0..items).zip(list.iter()) {
        assert_eq!(text.unwrap().to_str().unwrap(), format!("item {i}"));
    }
}

// ---- after a valid handshake: releases of the real end's messages ----------

/// The texts the real end sends in the release tests.
/// Two texts too long to be carried in their descriptors (over 112
/// bytes): read in place, each holding a slot until released.
const SENT: [&str; 2] = [
    "one: a message of more than one hundred and twelve bytes, read where it lies, and released to the sender when it drops",
    "two: a message of more than one hundred and twelve bytes, read where it lies, and released to the sender when it drops",
];

/// A real end that sends through a ring of two and has sent two messages,
/// and their descriptors as the hand peer reads them from its region.
fn sender_with_two_in_flight() -> (Connected, [Descriptor; 2]) {
    // We hold at most two of its messages (our release ring): two slots.
    let ours = Geometry {
        held_capacity: 2,
        ..GEOMETRY
    };
    let conn = Connected::new(&options().ring_capacity(2), ours);
    assert_eq!(conn.their_geometry.ring_capacity, 2);
    for text in SENT {
        let mut message = conn.channel.message();
        message.set_root(capnp::text::Reader::from(text)).unwrap();
        conn.channel.send(message).unwrap();
    }
    assert_eq!(conn.their_counter(counter::PUBLISHED), 2);
    let sent = [conn.their_descriptor(0), conn.their_descriptor(1)];
    // Read them as a receiver would, to be sure the descriptors were
    // understood before releasing them wrongly.
    for (seq, (d, text)) in (0..).zip(sent.iter().zip(SENT)) {
        assert_eq!((d.seq, d.seg_count), (seq, 1));
        let (offset, len) = d.segments[0];
        assert_eq!(text_of_segment(&conn.their_data(offset, len)), text);
    }
    assert_ne!(sent[0].slot, sent[1].slot);
    (conn, sent)
}

/// The hand peer took `consumed` of the real end's messages and released
/// `entries` (`(slot, seq)`), in order; the release counter says how many.
fn release(conn: &Connected, consumed: u32, entries: &[(u32, u32)]) {
    for (n, &(slot, seq)) in (0..).zip(entries) {
        conn.mine.write_release(n, slot, seq);
    }
    conn.mine.set_counter(counter::CONSUMED, consumed);
    let released = u32::try_from(entries.len()).unwrap();
    conn.mine.set_counter(counter::RELEASED, released);
}

/// The third message. With two in flight in a ring of two, sending it finds
/// no free slot, so the real end reclaims: that is when it reads releases.
fn third_message(conn: &Connected) -> MessageBuilder<'_> {
    let mut message = conn.channel.message();
    message
        .set_root(capnp::text::Reader::from(
            "three: a message of more than one hundred and twelve bytes, which needs a slot of its own to be sent to the peer",
        ))
        .unwrap();
    message
}

/// A `try_send` of the third message.
fn send_third(conn: &Connected) -> Result<(), Error> {
    let message = third_message(conn);
    conn.channel.try_send(message).map_err(|e| e.into_error())
}

/// Asserts that a `try_send` of the third message fails with `expected`
/// (checked on the `SendError` itself), and that the channel stays closed.
fn assert_send_breaks(conn: &Connected, expected: ProtocolError) {
    let message = third_message(conn);
    let failed = conn
        .channel
        .try_send(message)
        .expect_err("a bad release went unnoticed");
    assert!(
        matches!(&failed, TrySendError::Failed(_, Failure::Protocol(p)) if *p == expected),
        "expected {expected:?}, got {failed:?}"
    );
    drop(failed);
    assert_stays_broken(conn, expected);
}

#[test]
fn a_valid_release_frees_a_slot() {
    let _w = Watchdog::new(LIMIT);
    let (conn, sent) = sender_with_two_in_flight();
    // Nothing released yet: full, and the channel still works.
    assert!(matches!(send_third(&conn), Err(Error::Full)));
    release(&conn, 2, &[(sent[0].slot, 0)]);
    send_third(&conn).expect("the released slot is reused");
    let third = conn.their_descriptor(2);
    assert_eq!((third.seq, third.slot), (2, sent[0].slot));
}

/// Chooses a release entry `(slot, seq)` given the two messages sent.
type PickRelease = fn(&[Descriptor; 2]) -> (u32, u32);

#[test]
fn releasing_a_message_never_sent_is_bad_release() {
    let _w = Watchdog::new(LIMIT);
    // A sequence number never sent; a slot that does not exist; a slot that
    // exists with the other message's sequence number.
    let cases: [PickRelease; 3] = [
        |sent| (sent[0].slot, 7),
        |_| (5, 0),
        |sent| (sent[0].slot, 1),
    ];
    for case in cases {
        let (conn, sent) = sender_with_two_in_flight();
        let (slot, seq) = case(&sent);
        release(&conn, 2, &[(slot, seq)]);
        assert_send_breaks(&conn, ProtocolError::BadRelease { slot, seq });
    }
}

#[test]
fn releasing_a_message_twice_is_bad_release() {
    let _w = Watchdog::new(LIMIT);
    let (conn, sent) = sender_with_two_in_flight();
    let twice = (sent[0].slot, 0);
    release(&conn, 2, &[twice, twice]);
    assert_send_breaks(
        &conn,
        ProtocolError::BadRelease {
            slot: twice.0,
            seq: twice.1,
        },
    );
}

#[test]
fn releasing_a_message_not_yet_taken_is_bad_release() {
    let _w = Watchdog::new(LIMIT);
    let (conn, sent) = sender_with_two_in_flight();
    // Took only the first, released the second.
    release(&conn, 1, &[(sent[1].slot, 1)]);
    assert_send_breaks(
        &conn,
        ProtocolError::BadRelease {
            slot: sent[1].slot,
            seq: 1,
        },
    );
}

#[test]
fn release_counter_past_what_was_sent_is_released_out_of_range() {
    let _w = Watchdog::new(LIMIT);
    // Three releases of two messages; and a counter gone "backwards".
    for released in [3, u32::MAX] {
        let (conn, _) = sender_with_two_in_flight();
        conn.mine.set_counter(counter::CONSUMED, 2);
        conn.mine.set_counter(counter::RELEASED, released);
        assert_send_breaks(
            &conn,
            ProtocolError::ReleasedOutOfRange { seen: 0, released },
        );
    }
}

#[test]
fn consumed_counter_past_what_was_sent_is_consumed_out_of_range() {
    let _w = Watchdog::new(LIMIT);
    for consumed in [3, u32::MAX] {
        let (conn, sent) = sender_with_two_in_flight();
        release(&conn, consumed, &[(sent[0].slot, 0)]);
        assert_send_breaks(&conn, ProtocolError::ConsumedOutOfRange { consumed });
    }
}
