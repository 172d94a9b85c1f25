//! What a hostile peer tried, and what it gets: a closed end stays closed,
//! copy mode bounds what it copies, racing rewrites read zeros and never
//! our memory, our own region is refused, and a file we cannot map is the
//! peer's fault. The peer is driven by hand (see `tests/peer`).
mod common;
mod peer;

use std::os::fd::AsFd;
use std::time::Duration;

use capnp_shm::{Options, ProtocolError, RecvError, SendError, SetupError, TryRecvError};
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
    conn.mine.write_message(0, 0, 0, &text_segments("before the close"));
    conn.mine.publish(1);
    conn.mine.set_counter(counter::CLOSED, 1);
    // Published before the close: delivered.
    assert_eq!(text_of(&conn.channel.recv().unwrap()), "before the close");
    assert!(matches!(conn.channel.recv(), Err(RecvError::Disconnected)));

    // The peer reopens and publishes again.
    conn.mine.set_counter(counter::CLOSED, 0);
    conn.mine.write_message(1, 1, 16, &text_segments("after the close"));
    conn.mine.publish(2);
    assert!(matches!(conn.channel.recv(), Err(RecvError::Disconnected)));
    assert!(matches!(conn.channel.try_recv(), Err(TryRecvError::Disconnected)));
    let mut message = conn.channel.message();
    message.set_root(capnp::text::Reader::from("to a closed peer")).unwrap();
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
    conn.mine.write_message(0, 0, 0, &text_segments("after the close"));
    conn.mine.publish(1);
    assert!(matches!(conn.channel.try_recv(), Err(TryRecvError::Disconnected)));
}

/// The set-up error when the hand peer answers with `hello` and `fd`.
fn setup_error(hello: &peer::Hello, fd: std::os::fd::BorrowedFd<'_>) -> SetupError {
    let mut p = HandPeer::start(&options());
    p.send_hello(hello, &[fd]);
    let error = p.setup_result().expect_err("set-up accepted a bad peer");
    p.assert_hung_up();
    error
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

/// A sealed region the peer opened write-only cannot be mapped for reading:
/// the peer's mistake, named as such (not an i/o error of ours).
#[test]
fn a_write_only_region_descriptor_is_the_peers_fault() {
    let _w = Watchdog::new(LIMIT);
    let region = Region::new(GEOMETRY);
    region.seal();
    let write_only = peer::reopen(region.read_only_fd().as_fd(), libc::O_WRONLY);
    let error = setup_error(&peer::Hello::new(GEOMETRY, true), write_only.as_fd());
    assert!(
        matches!(
            error,
            SetupError::Protocol(ProtocolError::UnmappableRegion { os_error }) if os_error == libc::EACCES
        ),
        "{error:?}"
    );
}

/// A hugetlb memfd, sealed and of the right size, on a machine without huge
/// pages: `mmap` fails with `ENOMEM`, the peer's mistake. (Where huge pages
/// are configured the file maps, and the header the peer never wrote is
/// what fails instead.)
#[test]
fn a_hugetlb_region_without_huge_pages_is_the_peers_fault() {
    let _w = Watchdog::new(LIMIT);
    let huge = Geometry::new(2 << 20, 4);
    let fd = peer::memfd_create(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB);
    peer::ftruncate(fd.as_fd(), huge.region_size);
    peer::add_seals(fd.as_fd(), peer::REGION_SEALS);
    let error = setup_error(&peer::Hello::new(huge, true), fd.as_fd());
    let pages = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
    if pages.trim() == "0" {
        assert!(
            matches!(
                error,
                SetupError::Protocol(ProtocolError::UnmappableRegion { os_error }) if os_error == libc::ENOMEM
            ),
            "{error:?}"
        );
    } else {
        assert!(
            matches!(error, SetupError::Protocol(ProtocolError::ControlBlockMismatch)),
            "{error:?}"
        );
    }
}
