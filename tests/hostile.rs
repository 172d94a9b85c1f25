//! What a hostile peer tried, and what it gets: a closed end stays closed,
//! copy mode bounds what it copies, racing rewrites read zeros and never
//! our memory, our own region is refused, and a file we cannot map is the
//! peer's fault. The peer is driven by hand (see `tests/peer`).
mod common;
mod peer;

use std::os::fd::AsFd;
use std::time::Duration;

use capnp_shm::{Failure, Options, ProtocolError, RecvError, SendError, SetupError, TryRecvError};
use common::Watchdog;
use peer::{counter, Connected, Geometry, HandPeer, Region};

const LIMIT: Duration = Duration::from_secs(60);

/// The hand peer's region: a ring of 4 and 60 KiB of data.
const GEOMETRY: Geometry = Geometry::new(64 << 10, 4);

fn options() -> Options {
    Options::new()
        .setup_timeout(Duration::from_secs(2))
        .region_size(64 << 10)
}

/// The segments of a capnp message whose root is `text`.
fn text_segments(text: &str) -> Vec<Vec<u8>> {
    let mut message = capnp::message::Builder::new_default();
    message.set_root(capnp::text::Reader::from(text)).unwrap();
    let segments = message.get_segments_for_output();
    segments.iter().map(|s| s.to_vec()).collect()
}

fn text_of(received: &capnp_shm::Received<'_>) -> String {
    let text: capnp::text::Reader<'_> = received.get_root().expect("a text root");
    text.to_str().expect("utf-8").to_owned()
}

/// A peer that closes, reopens (clears `closed`) and publishes again gets
/// nothing through: every later receive and send is `Disconnected`.
#[test]
fn a_close_is_sticky_whatever_the_peer_writes_afterwards() {
    let _w = Watchdog::new(LIMIT);
    let conn = Connected::new(&options(), GEOMETRY);
    conn.mine
        .write_message(0, 0, 0, &text_segments("before the close"));
    conn.mine.publish(1);
    conn.mine.set_counter(counter::CLOSED, 1);
    // Published before the close: delivered.
    assert_eq!(text_of(&conn.channel.recv().unwrap()), "before the close");
    assert!(matches!(conn.channel.recv(), Err(RecvError::Disconnected)));

    // The peer reopens and publishes again.
    conn.mine.set_counter(counter::CLOSED, 0);
    conn.mine
        .write_message(1, 1, 16, &text_segments("after the close"));
    conn.mine.publish(2);
    assert!(matches!(conn.channel.recv(), Err(RecvError::Disconnected)));
    assert!(matches!(
        conn.channel.try_recv(),
        Err(TryRecvError::Disconnected)
    ));
    let mut message = conn.channel.message();
    message
        .set_root(capnp::text::Reader::from("to a closed peer"))
        .unwrap();
    assert!(matches!(
        conn.channel.send(message),
        Err(SendError::Disconnected(_))
    ));
    assert_eq!(
        conn.their_counter(counter::PUBLISHED),
        0,
        "a send reached the peer after its close"
    );
}

/// The same when the close is first seen by a send: the receive side does
/// not take what the peer publishes after reopening.
#[test]
fn a_close_seen_by_a_send_is_sticky_for_receives_too() {
    let _w = Watchdog::new(LIMIT);
    let conn = Connected::new(&options(), GEOMETRY);
    conn.mine.set_counter(counter::CLOSED, 1);
    let message = conn.channel.message();
    assert!(matches!(
        conn.channel.send(message),
        Err(SendError::Disconnected(_))
    ));
    conn.mine.set_counter(counter::CLOSED, 0);
    conn.mine
        .write_message(0, 0, 0, &text_segments("after the close"));
    conn.mine.publish(1);
    assert!(matches!(
        conn.channel.try_recv(),
        Err(TryRecvError::Disconnected)
    ));
}

/// A peer that sends back our own hello and our own region: refused, not
/// a channel to ourselves.
#[test]
fn our_own_region_sent_back_is_refused() {
    let _w = Watchdog::new(LIMIT);
    let mut p = HandPeer::start(&options());
    let hello = p.their_hello();
    let fd = p.their_fd().try_clone_to_owned().unwrap();
    p.send_hello(&hello, &[fd.as_fd()]);
    match p.setup_result() {
        Err(SetupError::Protocol(ProtocolError::OwnRegion)) => {}
        other => panic!("a loopback was accepted: {other:?}"),
    }
    p.assert_hung_up();
}

/// The real end's answer to a region it cannot map: the verdict "cannot
/// map", then a stream channel on the same socket, which carries a plain
/// frame the hand peer writes.
fn falls_back_to_the_stream(hello: &peer::Hello, fd: std::os::fd::BorrowedFd<'_>) {
    let mut p = HandPeer::start(&options());
    p.send_hello(hello, &[fd]);
    assert_eq!(
        &p.read_verdict(),
        &peer::REFUSED,
        "the real end refused the region"
    );
    p.send_verdict(&peer::MAPPED);
    let channel = p.setup_result().expect("a stream channel");
    assert_eq!(channel.transport(), capnp_shm::Transport::Stream);
    let mut m = capnp::message::Builder::new_default();
    m.set_root(capnp::text::Reader::from("framed")).unwrap();
    let mut frame = Vec::new();
    capnp::serialize::write_message(&mut frame, &m).unwrap();
    p.send_bytes(&frame, &[]);
    let got = channel.recv().unwrap();
    assert_eq!(
        got.get_root::<capnp::text::Reader<'_>>()
            .unwrap()
            .to_str()
            .unwrap(),
        "framed"
    );
}

/// A sealed region the peer opened write-only cannot be mapped for reading:
/// not an i/o error of ours, and no channel over shared memory; both ends
/// fall back to the stream transport.
#[test]
fn a_write_only_region_descriptor_falls_back_to_the_stream() {
    let _w = Watchdog::new(LIMIT);
    let region = Region::new(GEOMETRY);
    region.seal();
    let write_only = peer::reopen(region.read_only_fd().as_fd(), libc::O_WRONLY);
    falls_back_to_the_stream(&peer::Hello::new(GEOMETRY, true), write_only.as_fd());
}

/// A hugetlb memfd, sealed and of the right size: `mmap` refuses it here
/// (`ENOMEM` without huge pages; `EINVAL` at an address not aligned for
/// them, as the guarded mapping's is): the stream instead.
#[test]
fn a_hugetlb_region_falls_back_to_the_stream() {
    let _w = Watchdog::new(LIMIT);
    let huge = Geometry::new(2 << 20, 4);
    let fd = peer::memfd_create(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB);
    peer::ftruncate(fd.as_fd(), huge.region_size);
    peer::add_seals(fd.as_fd(), peer::REGION_SEALS);
    falls_back_to_the_stream(&peer::Hello::new(huge, true), fd.as_fd());
}

#[path = "../examples/bench/bench_capnp.rs"]
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    missing_debug_implementations,
    unused
)]
mod bench_capnp;

/// A struct pointer to the next word: kind 0, offset 0, `data` words of
/// data and `pointers` pointers.
fn struct_pointer(data: u16, pointers: u16) -> u64 {
    (u64::from(data) << 32) | (u64::from(pointers) << 48)
}

/// A peer rewrites the root pointer of a message it sent, between the
/// sizes capnp reads, while we read the message in place over and over.
/// The message lies at the very end of the peer's region, so an inflated
/// size reaches past it: every byte capnp hands out must lie in the peer's
/// mapping or in the zero guard after it, never in our own memory, and
/// nothing may fault.
#[test]
fn racing_rewrites_of_a_struct_pointer_read_zeros_never_our_memory() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let reader_options = capnp::message::ReaderOptions {
        traversal_limit_in_words: None,
        nesting_limit: 64,
    };
    let conn = Connected::new(&options().reader_options(reader_options), GEOMETRY);
    let last = GEOMETRY.data_words() - 2;
    let pointer_at = GEOMETRY.data_offset() + u64::from(last) * 8;
    conn.mine
        .write_data(last, &struct_pointer(1, 0).to_le_bytes());
    conn.mine.write_data(last + 1, &42u64.to_le_bytes());
    conn.mine
        .write_descriptor(0, &peer::Descriptor::inline(0, 0, &[(last, 2)]));
    conn.mine.publish(1);
    let received = conn.channel.recv().unwrap();
    let range = conn.channel.incoming_range();
    let guard_end = range.end + (1 << 20);

    // The racer flips the root pointer between an honest and a huge size,
    // through its own copy of the shared mapping.
    let racer = common::fork(|| {
        common::die_with_parent();
        loop {
            conn.mine
                .map()
                .store_u64(pointer_at, struct_pointer(0xffff, 0xffff));
            conn.mine.map().store_u64(pointer_at, struct_pointer(1, 0));
        }
    });
    let (mut reads, mut inflated, mut refused) = (0u64, 0u64, 0u64);
    while reads < 200_000 {
        reads += 1;
        let Ok(root) = received.get_root::<bench_capnp::blob::Reader<'_>>() else {
            refused += 1;
            continue;
        };
        let data = capnp::raw::get_struct_data_section(root);
        let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
        assert!(
            start >= range.start && end <= guard_end,
            "a slice {start:#x}..{end:#x} outside the peer's region and guard {:#x}..{guard_end:#x}",
            range.start
        );
        if end > range.end {
            inflated += 1;
            // Past the region's end: the guard's zeros.
            let past = &data[range.end - start..];
            assert!(past.iter().all(|&b| b == 0), "the guard was not zeros");
        }
    }
    racer.kill();
    racer.wait();
    eprintln!("{reads} reads: {inflated} inflated past the region into the guard, {refused} refused by capnp");
}

/// A sealed, sparse 512 MiB region and one descriptor whose single segment
/// spans its whole data area: in copy mode, the message is refused before
/// anything is copied, because it exceeds what the reader may read.
#[test]
fn copy_mode_refuses_a_message_over_the_read_limit_before_copying() {
    let _w = Watchdog::new(LIMIT);
    let huge = Geometry::new(512 << 20, 4);
    let conn = Connected::new(&options().copy_received(true), huge);
    conn.mine.write_descriptor(
        0,
        &peer::Descriptor::inline(0, 0, &[(0, huge.data_words())]),
    );
    conn.mine.publish(1);
    let expected = |e: &TryRecvError| {
        matches!(
            e,
            TryRecvError::Failed(Failure::Protocol(ProtocolError::ExceedsReadLimit { words, limit }))
                if *words == u64::from(huge.data_words()) && *limit == 8 << 20
        )
    };
    let e = conn.channel.try_recv().unwrap_err();
    assert!(expected(&e), "{e:?}");
    let e = conn.channel.try_recv().unwrap_err();
    assert!(expected(&e), "not sticky: {e:?}");
    // Released uncopied, and the close announced.
    assert_eq!(conn.their_counter(counter::RELEASED), 1);
    assert_eq!(conn.their_counter(counter::CLOSED), 1);
}

/// The same message with no read limit, in a process whose address space
/// cannot hold a copy: a specific error, not an abort.
#[test]
fn copy_mode_reports_a_copy_it_cannot_allocate() {
    let _serial = common::serial();
    let _w = Watchdog::new(LIMIT);
    let child = common::fork(|| {
        let unlimited = capnp::message::ReaderOptions {
            traversal_limit_in_words: None,
            nesting_limit: 64,
        };
        let huge = Geometry::new(512 << 20, 4);
        let conn = Connected::new(
            &options().copy_received(true).reader_options(unlimited),
            huge,
        );
        conn.mine.write_descriptor(
            0,
            &peer::Descriptor::inline(0, 0, &[(0, huge.data_words())]),
        );
        conn.mine.publish(1);
        // Room for 128 MiB more than now: not for a 512 MiB copy.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        let limit = libc::rlimit {
            rlim_cur: (vm_kb << 10) + (128 << 20),
            rlim_max: libc::RLIM_INFINITY,
        };
        common::set_address_space_limit(&limit);
        let code = match conn.channel.try_recv() {
            Err(TryRecvError::Failed(Failure::Io(e)))
                if e.kind() == std::io::ErrorKind::OutOfMemory =>
            {
                0
            }
            other => {
                eprintln!(
                    "expected an out-of-memory failure, got {:?}",
                    other.map(|_| ())
                );
                1
            }
        };
        code
    });
    assert_eq!(child.wait(), 0, "the child aborted or got another error");
}
