//! The stream transport behind the channel API: the behaviour tests that
//! make sense for a byte stream, over TCP on loopback and over a Unix
//! socket without shared memory, each with real processes (a forked peer).
//! Every test holds the `serial` lock: a child forked by one test would
//! hold copies of another test's sockets, and hide its closes.
#![allow(unsafe_code)] // setsockopt(2), to cap a receive buffer
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_shm::{
    wait_any, Channel, Failure, Options, ProtocolError, Readiness, RecvError, RecvTimeoutError,
    SendError, SendTimeoutError, Transport, TryRecvError, TrySendError, WaitAnyError, Wire,
};
use common::{build, check, fork, serial, shape, Watchdog};

/// Where a stream channel runs.
#[derive(Debug, Clone, Copy)]
enum Net {
    /// TCP on loopback.
    Tcp,
    /// A Unix socket with plain framing (no shared memory, no hello).
    Unix,
    /// A Unix socket whose handshake chose the stream: one end asked for
    /// it, as an end that cannot create or map a region does.
    Negotiated,
}

/// Where channel pairs are tested.
const NETS: [Net; 3] = [Net::Tcp, Net::Unix, Net::Negotiated];
/// Where a raw peer socket is (no hello on either).
const RAW_NETS: [Net; 2] = [Net::Tcp, Net::Unix];

fn tcp_sockets() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Caps the receive buffer of `end`'s socket at `bytes` (the kernel
/// doubles it), which also ends its autotuning: a test that needs a peer's
/// buffers full needs to know how much they hold, whatever this host's
/// `net.ipv4.tcp_rmem` lets a TCP buffer grow to (32 MiB on ours, enough
/// to take an 8 MiB message whole once a first one has grown it).
fn cap_receive_buffer(end: &Channel, bytes: libc::c_int) {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
    // SAFETY: `end`'s descriptor is open for the call, and the option is
    // an int whose address and size are given.
    let r = unsafe {
        libc::setsockopt(
            end.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_ref(&bytes).cast(),
            len,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A connected pair of stream channel ends.
fn pair_with(net: Net, options: &Options) -> (Channel, Channel) {
    let (a, b) = match net {
        Net::Tcp => {
            let (a, b) = tcp_sockets();
            (
                Channel::from_tcp_with(a, options).unwrap(),
                Channel::from_tcp_with(b, options).unwrap(),
            )
        }
        Net::Unix => Channel::pair_with(&options.clone().wire(Wire::Plain)).unwrap(),
        Net::Negotiated => {
            // One end asks for the stream; the other is a default end.
            let (a, b) = UnixStream::pair().unwrap();
            let asks = options.clone().wire(Wire::Stream);
            let other = std::thread::spawn({
                let options = options.clone();
                move || Channel::from_stream_with(b, &options).unwrap()
            });
            let a = Channel::from_stream_with(a, &asks).unwrap();
            (a, other.join().unwrap())
        }
    };
    assert_eq!(
        (a.transport(), b.transport()),
        (Transport::Stream, Transport::Stream)
    );
    (a, b)
}

fn pair(net: Net) -> (Channel, Channel) {
    pair_with(net, &Options::new())
}

/// One of our channel ends, and the raw socket of its peer (for peers that
/// speak plain `capnp::serialize`, or nothing sensible at all).
enum Raw {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Raw {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Raw::Tcp(s) => s.read(buf),
            Raw::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Raw {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Raw::Tcp(s) => s.write(buf),
            Raw::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn raw_pair_with(net: Net, options: &Options) -> (Channel, Raw) {
    match net {
        Net::Tcp => {
            let (a, b) = tcp_sockets();
            // A frame goes out in several writes: without this, Nagle holds
            // each back for the delayed ACK.
            b.set_nodelay(true).unwrap();
            (Channel::from_tcp_with(a, options).unwrap(), Raw::Tcp(b))
        }
        Net::Unix | Net::Negotiated => {
            let (a, b) = UnixStream::pair().unwrap();
            let options = options.clone().wire(Wire::Plain);
            (
                Channel::from_stream_with(a, &options).unwrap(),
                Raw::Unix(b),
            )
        }
    }
}

fn raw_pair(net: Net) -> (Channel, Raw) {
    raw_pair_with(net, &Options::new())
}

fn set_u64<A: capnp::message::Allocator>(m: &mut capnp::message::Builder<A>, n: u64) {
    m.set_root::<capnp::primitive_list::Owned<u64>>(&[n][..])
        .unwrap();
}

fn u64_of<S: capnp::message::ReaderSegments>(r: &capnp::message::Reader<S>) -> u64 {
    r.get_root::<capnp::primitive_list::Reader<'_, u64>>()
        .unwrap()
        .get(0)
}

/// Small first segments: many messages have several segments.
fn multi_segment() -> Options {
    Options::new().first_segment_words(32)
}

#[test]
fn requests_and_replies_round_trip() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    for net in NETS {
        let (ours, theirs) = pair_with(net, &multi_segment());
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        let child = fork(|| {
            drop(ours.take());
            let end = theirs.take().unwrap();
            // Echo each message with its number plus one, until the end.
            while let Ok(m) = end.recv() {
                let n = check(&m);
                let (items, len) = shape(n + 1);
                drop(m);
                if end.send(build(&end, n + 1, items, len)).is_err() {
                    return 1;
                }
            }
            0
        });
        drop(theirs.take());
        let end = ours.take().unwrap();
        for n in (0..2000).step_by(2) {
            let (items, len) = shape(n);
            let reply = end.request(build(&end, n, items, len)).unwrap();
            assert_eq!(check(&reply), n + 1, "{net:?}");
        }
        let stats = end.stats();
        assert_eq!((stats.send.messages, stats.recv.messages), (1000, 1000));
        drop(end);
        assert_eq!(child.wait(), 0, "{net:?}");
    }
}

#[test]
fn a_hundred_thousand_varied_messages_arrive_in_order_and_intact() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(400));
    const MESSAGES: u64 = 100_000;
    for net in NETS {
        let (ours, theirs) = pair_with(net, &multi_segment());
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        let child = fork(|| {
            drop(ours.take());
            let tx = theirs.take().unwrap();
            for n in 0..MESSAGES {
                let (items, len) = shape(n);
                if tx.send(build(&tx, n, items, len)).is_err() {
                    return 1;
                }
            }
            0
        });
        drop(theirs.take());
        let rx = ours.take().unwrap();
        // Hold some messages across later receives: the receive buffer
        // moves on and the held ones stay intact.
        let mut held = std::collections::VecDeque::new();
        for n in 0..MESSAGES {
            let m = rx.recv().unwrap();
            assert_eq!(check(&m), n, "{net:?}");
            if n % 10 == 0 {
                held.push_back(m);
                if held.len() > 50 {
                    let old = held.pop_front().unwrap();
                    assert_eq!(check(&old) % 10, 0);
                }
            }
        }
        assert_eq!(rx.stats().recv.held, 50);
        for m in held.drain(..) {
            check(&m);
        }
        assert!(matches!(rx.recv(), Err(RecvError::Disconnected)), "{net:?}");
        assert_eq!(child.wait(), 0, "{net:?}");
    }
}

/// A socket pair the parent writes one byte to, to let a forked child go
/// on (and, the other way, for the child to report a count).
struct Go {
    read: UnixStream,
    write: UnixStream,
}

impl Go {
    fn new() -> Go {
        let (read, write) = UnixStream::pair().unwrap();
        Go { read, write }
    }

    fn wait(&mut self) {
        let mut b = [0u8];
        self.read.read_exact(&mut b).unwrap();
    }

    fn go(&mut self) {
        self.write.write_all(&[1]).unwrap();
    }
}

#[test]
fn backpressure_comes_from_the_socket_and_timeouts_bound_each_wait() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    for net in NETS {
        let (ours, theirs) = pair(net);
        let (mut go, mut report) = (Go::new(), Go::new());
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        let child = fork(|| {
            drop(ours.take());
            let end = theirs.take().unwrap();
            go.wait();
            let mut got = 0u64;
            loop {
                match end.recv() {
                    Ok(m) => {
                        assert_eq!(check(&m), got);
                        got += 1;
                    }
                    Err(RecvError::Disconnected) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            // Tell the parent how many came (the channel has ended both
            // ways: a close ends the stream for both ends).
            report.write.write_all(&got.to_le_bytes()).unwrap();
            0
        });
        drop(theirs.take());
        let end = ours.take().unwrap();
        // Nothing to receive yet: each wait ends when asked.
        assert!(matches!(end.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(
            end.recv_timeout(Duration::from_millis(30)),
            Err(RecvTimeoutError::Timeout)
        ));
        // The peer reads nothing: the socket fills, and a send with no
        // time to wait says so and hands the message back. A TCP socket's
        // buffers may go on growing for a while (autotuning), so a send
        // that waits may still get through: then fill again, until a wait
        // times out.
        let mut sent = 0u64;
        let mut timed_out = false;
        for _ in 0..100 {
            loop {
                match end.try_send(build(&end, sent, 1, 64 << 10)) {
                    Ok(()) => sent += 1,
                    Err(TrySendError::Full(_)) => break,
                    Err(e) => panic!("{net:?}: {e}"),
                }
                assert!(sent < 100_000, "the socket never filled");
            }
            match end.send_timeout(build(&end, sent, 1, 64 << 10), Duration::from_millis(30)) {
                Err(SendTimeoutError::Timeout(_)) => {
                    timed_out = true;
                    break;
                }
                Ok(()) => sent += 1, // the buffers grew
                other => panic!("{net:?}: {:?}", other.map_err(|e| e.to_string())),
            }
        }
        assert!(timed_out, "{net:?}: no send waited out its 30 ms");
        assert!(sent > 0);
        assert!(!end.sender().is_ready());
        assert_eq!(end.sender().arm().unwrap(), Readiness::Writable);
        // Once the peer reads, blocking sends go on, every one delivered.
        go.go();
        for _ in 0..100 {
            end.send(build(&end, sent, 1, 64 << 10)).unwrap();
            sent += 1;
        }
        end.sender().close(); // flushes, then ends the stream
        let mut count = [0u8; 8];
        report.read.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count), sent, "{net:?}");
        assert_eq!(child.wait(), 0, "{net:?}");
        assert!(matches!(end.recv(), Err(RecvError::Disconnected)));
    }
}

#[test]
fn a_closed_peer_is_disconnected_after_everything_it_sent() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for net in NETS {
        let (ours, theirs) = pair(net);
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        let child = fork(|| {
            drop(ours.take());
            let end = theirs.take().unwrap();
            for n in 0..500 {
                let (items, len) = shape(n);
                end.send(build(&end, n, items, len)).unwrap();
            }
            0 // the end drops here (flushing what the socket had not taken)
        });
        drop(theirs.take());
        let end = ours.take().unwrap();
        for n in 0..500 {
            assert_eq!(check(&end.recv().unwrap()), n, "{net:?}");
        }
        assert_eq!(child.wait(), 0);
        for _ in 0..2 {
            assert!(
                matches!(end.recv(), Err(RecvError::Disconnected)),
                "{net:?}"
            );
            assert!(matches!(end.try_recv(), Err(TryRecvError::Disconnected)));
        }
        assert!(matches!(
            end.send(build(&end, 0, 1, 8)),
            Err(SendError::Disconnected(_))
        ));
        assert!(end.receiver().is_ready());
    }
}

#[test]
fn a_killed_peer_is_disconnected_after_everything_it_sent() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    for net in NETS {
        for round in 0..10u64 {
            let (ours, theirs) = pair(net);
            let (mut ours, mut theirs) = (Some(ours), Some(theirs));
            let child = fork(|| {
                common::die_with_parent();
                drop(ours.take());
                let end = theirs.take().unwrap();
                for n in 0.. {
                    let (items, len) = shape(n);
                    if end.send(build(&end, n, items, len)).is_err() {
                        return 1;
                    }
                }
                0
            });
            drop(theirs.take());
            let end = ours.take().unwrap();
            // Kill it at a different point each round, mid-stream.
            for n in 0..(round * 37) {
                assert_eq!(check(&end.recv().unwrap()), n);
            }
            child.kill();
            assert_eq!(child.wait(), 128 + libc::SIGKILL);
            // What it wrote before it died is still delivered, in order;
            // then the end.
            let mut n = round * 37;
            loop {
                match end.recv() {
                    Ok(m) => {
                        assert_eq!(check(&m), n, "{net:?} round {round}");
                        n += 1;
                    }
                    Err(RecvError::Disconnected) => break,
                    // A frame cut by the kill is the one way it may end.
                    Err(RecvError::Failed(Failure::Protocol(ProtocolError::FrameTruncated {
                        ..
                    }))) => break,
                    Err(e) => panic!("{net:?} round {round}: {e}"),
                }
            }
            assert!(matches!(
                end.send(build(&end, 0, 1, 8)),
                Err(SendError::Disconnected(_) | SendError::Failed(..))
            ));
        }
    }
}

#[test]
fn wait_any_sees_shared_memory_and_stream_channels_alike() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let (shm, shm_peer) = Channel::pair().unwrap();
    let (tcp, tcp_peer) = pair(Net::Tcp);
    let (unix, unix_peer) = pair(Net::Unix);
    let mut go = Go::new();
    let (mut ours, mut theirs) = (
        Some((shm, tcp, unix)),
        Some((shm_peer, tcp_peer, unix_peer)),
    );
    let child = fork(|| {
        drop(ours.take());
        let peers = theirs.take().unwrap();
        let peers = [&peers.2, &peers.0, &peers.1];
        // One message on each in turn, when the parent is ready for it.
        for (n, peer) in (0u64..).zip(peers.iter().cycle()).take(30) {
            go.wait();
            peer.send(build(*peer, n, 1, 16)).unwrap();
        }
        go.wait();
        0
    });
    drop(theirs.take());
    let (shm, tcp, unix) = ours.take().unwrap();
    let ends = [&shm, &tcp, &unix];
    assert!(matches!(
        wait_any(&ends, Some(Duration::from_millis(20))),
        Err(WaitAnyError::Timeout)
    ));
    for (n, i) in (0..30u64).zip(0usize..) {
        go.go();
        let ready = wait_any(&ends, Some(Duration::from_secs(20))).unwrap();
        // The child sends on unix, shm, tcp, unix, ...
        assert_eq!(ready, [2, 0, 1][i % 3], "message {n}");
        assert_eq!(check(&ends[ready].try_recv().unwrap()), n);
    }
    go.go();
    assert_eq!(child.wait(), 0);
    // All three peers are gone now: each is ready, with Disconnected.
    for (i, end) in ends.iter().enumerate() {
        let ready = wait_any(&[*end], Some(Duration::from_secs(20))).unwrap();
        assert_eq!(ready, 0, "end {i}");
        assert!(matches!(end.try_recv(), Err(TryRecvError::Disconnected)));
    }
}

#[test]
fn wait_any_is_not_fooled_by_half_a_frame() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for net in RAW_NETS {
        let (end, mut raw) = raw_pair(net);
        let mut frame = Vec::new();
        let mut m = capnp::message::Builder::new_default();
        set_u64(&mut m, 7);
        capnp::serialize::write_message(&mut frame, &m).unwrap();
        raw.write_all(&frame[..frame.len() - 3]).unwrap();
        assert!(matches!(
            wait_any(&[&end], Some(Duration::from_millis(50))),
            Err(WaitAnyError::Timeout)
        ));
        assert!(matches!(end.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(end.receiver().arm().unwrap(), Readiness::Armed);
        raw.write_all(&frame[frame.len() - 3..]).unwrap();
        assert_eq!(wait_any(&[&end], Some(Duration::from_secs(20))).unwrap(), 0);
        assert!(end.receiver().is_ready());
        assert_eq!(u64_of(end.try_recv().unwrap().reader()), 7);
    }
}

/// The message a plain peer sends for `n`: a list of `n % 300` words.
fn plain_message(n: u64) -> capnp::message::Builder<capnp::message::HeapAllocator> {
    let mut m =
        capnp::message::Builder::new(capnp::message::HeapAllocator::new().first_segment_words(16));
    let len = (n % 300) as u32;
    let mut list = m.initn_root::<capnp::primitive_list::Builder<'_, u64>>(len);
    for i in 0..len {
        list.set(i, n ^ u64::from(i));
    }
    m
}

fn check_plain<S: capnp::message::ReaderSegments>(r: &capnp::message::Reader<S>, n: u64) {
    let list: capnp::primitive_list::Reader<'_, u64> = r.get_root().unwrap();
    assert_eq!(list.len(), (n % 300) as u32);
    assert!((0..list.len()).all(|i| list.get(i) == n ^ u64::from(i)));
}

#[test]
fn talks_to_a_peer_that_uses_nothing_but_capnp_serialize() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    const N: u64 = 3000;
    for net in RAW_NETS {
        let (end, raw) = raw_pair(net);
        let (mut end, mut raw) = (Some(end), Some(raw));
        // The peer: read a message, check it, answer with the next one.
        // Blocking std I/O and capnp::serialize, nothing else.
        let child = fork(|| {
            drop(end.take());
            let mut raw = raw.take().unwrap();
            for n in 0..N {
                let m = capnp::serialize::read_message(&mut raw, ReaderOptions::new()).unwrap();
                check_plain(&m, n);
                capnp::serialize::write_message(&mut raw, &plain_message(n + 1)).unwrap();
            }
            0
        });
        drop(raw.take());
        let end = end.take().unwrap();
        for n in 0..N {
            end.sender().send_copy(&plain_message(n)).unwrap();
            let reply = end.recv().unwrap();
            check_plain(reply.reader(), n + 1);
        }
        assert!(matches!(end.recv(), Err(RecvError::Disconnected)));
        assert_eq!(child.wait(), 0, "{net:?}");
    }
}

/// Our end reads `bytes` from a raw peer that then closes: what it gets.
fn after_raw_bytes(
    net: Net,
    options: &Options,
    bytes: &[u8],
) -> (Channel, Vec<Result<u64, RecvError>>) {
    let (end, mut raw) = raw_pair_with(net, options);
    raw.write_all(bytes).unwrap();
    drop(raw);
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = end.recv().map(|m| u64_of(m.reader()));
        let stop = r.is_err();
        got.push(r);
        if stop && got.len() >= 2 && got[got.len() - 2].is_err() {
            break;
        }
    }
    (end, got)
}

fn frame_of(n: u64) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    set_u64(&mut m, n);
    let mut bytes = Vec::new();
    capnp::serialize::write_message(&mut bytes, &m).unwrap();
    bytes
}

fn words(header: &[u32]) -> Vec<u8> {
    header.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn protocol(r: &Result<u64, RecvError>) -> ProtocolError {
    match r {
        Err(RecvError::Failed(Failure::Protocol(p))) => *p,
        other => panic!("not a protocol error: {other:?}"),
    }
}

#[test]
fn bad_frames_fail_the_end_for_good_after_what_came_before() {
    let _s = serial();
    for net in RAW_NETS {
        // A segment count over capnp's 511, after one good message.
        let mut bytes = frame_of(1);
        bytes.extend(words(&[600, 1, 0, 0]));
        let (end, got) = after_raw_bytes(net, &Options::new(), &bytes);
        assert_eq!(got[0].as_ref().unwrap(), &1);
        assert_eq!(
            protocol(&got[1]),
            ProtocolError::FrameSegmentCount { count: 601 }
        );
        // Failed for good: the same error again, and sends fail too.
        assert_eq!(
            protocol(&got[2]),
            ProtocolError::FrameSegmentCount { count: 601 }
        );
        assert!(matches!(
            end.send(end.message()),
            Err(SendError::Failed(..))
        ));
        assert!(end.receiver().is_ready());

        // Lengths beyond the reader's traversal limit: refused from the
        // header, before anything is sized by it (here 511 segments of
        // 4 G words each would be 16 TiB).
        let mut header = vec![510u32];
        header.extend(std::iter::repeat(u32::MAX).take(511));
        let (_, got) = after_raw_bytes(net, &Options::new(), &words(&header));
        assert!(matches!(
            protocol(&got[0]),
            ProtocolError::FrameTooLarge { .. }
        ));
        let mut limits = ReaderOptions::new();
        limits.traversal_limit_in_words(Some(1000));
        let small = Options::new().reader_options(limits);
        let (_, got) = after_raw_bytes(net, &small, &words(&[0, 1001]));
        assert_eq!(
            protocol(&got[0]),
            ProtocolError::FrameTooLarge {
                words: 1001,
                limit: 1000
            }
        );

        // A frame cut short by the close.
        let mut bytes = frame_of(2);
        let next = frame_of(3);
        bytes.extend(&next[..next.len() - 5]);
        let (_, got) = after_raw_bytes(net, &Options::new(), &bytes);
        assert_eq!(got[0].as_ref().unwrap(), &2);
        assert_eq!(
            protocol(&got[1]),
            ProtocolError::FrameTruncated {
                have: next.len() as u64 - 5,
                need: next.len() as u64
            }
        );

        // Trailing garbage after a good frame: it cannot be a frame.
        let mut bytes = frame_of(4);
        bytes.extend([0xff; 12]);
        let (_, got) = after_raw_bytes(net, &Options::new(), &bytes);
        assert_eq!(got[0].as_ref().unwrap(), &4);
        assert_eq!(
            protocol(&got[1]),
            ProtocolError::FrameSegmentCount { count: 0 }
        );

        // Garbage that reads as a header, then the close.
        let mut bytes = frame_of(5);
        bytes.extend(words(&[0, 3, 9]));
        let (_, got) = after_raw_bytes(net, &Options::new(), &bytes);
        assert_eq!(got[0].as_ref().unwrap(), &5);
        assert!(matches!(
            protocol(&got[1]),
            ProtocolError::FrameTruncated { have: 12, .. }
        ));
    }
}

#[test]
fn a_peer_that_dribbles_holds_each_receive_no_longer_than_its_timeout() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for net in RAW_NETS {
        let (end, raw) = raw_pair(net);
        let frame = frame_of(42);
        let dribbler = std::thread::spawn(move || {
            let mut raw = raw;
            for b in frame {
                raw.write_all(&[b]).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            raw
        });
        let mut timeouts = 0;
        let value = loop {
            match end.recv_timeout(Duration::from_millis(20)) {
                Ok(m) => break u64_of(m.reader()),
                Err(RecvTimeoutError::Timeout) => timeouts += 1,
                Err(e) => panic!("{net:?}: {e}"),
            }
        };
        assert_eq!(value, 42);
        // 24 bytes at one per 5 ms outlast a 20 ms receive.
        assert!(timeouts > 0, "{net:?}");
        drop(dribbler.join().unwrap());
        assert!(matches!(end.recv(), Err(RecvError::Disconnected)));
    }
}

#[test]
fn held_messages_stay_intact_while_more_arrive_and_are_counted() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for net in NETS {
        let (a, b) = pair_with(net, &multi_segment());
        let (tx, rx) = a.split();
        let sender = std::thread::spawn(move || {
            for n in 0..2000 {
                let (items, len) = shape(n);
                tx.send(build(&tx, n, items, len)).unwrap();
            }
        });
        let held: Vec<_> = (0..2000).map(|_| b.recv().unwrap()).collect();
        assert_eq!(b.stats().recv.held, 2000);
        for (n, m) in (0..).zip(&held) {
            assert_eq!(check(m), n);
            assert!(m.is_copied());
        }
        drop(held);
        assert_eq!(b.stats().recv.held, 0);
        sender.join().unwrap();
        drop(rx);
        assert!(matches!(b.recv(), Err(RecvError::Disconnected)));
    }
}

#[test]
fn shared_receivers_hand_out_messages_that_own_their_bytes() {
    let _s = serial();
    for net in NETS {
        let (a, b) = pair(net);
        let (_tx, rx) = b.split();
        let rx = rx.into_shared();
        assert_eq!(rx.transport(), Transport::Stream);
        let mut queue = Vec::new();
        for n in 0..300u64 {
            let mut m = a.message();
            set_u64(&mut m, n);
            a.send(m).unwrap();
            queue.push(rx.recv().unwrap());
        }
        let sum: u64 = queue.iter().map(|m| u64_of(m.reader())).sum();
        assert_eq!(sum, 299 * 300 / 2);
        assert_eq!(rx.stats().held, 300);
        drop(queue);
        assert_eq!(rx.stats().held, 0);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    }
}

#[test]
fn an_event_loop_arms_and_polls_the_descriptor() {
    let _s = serial();
    for net in NETS {
        let (a, b) = pair(net);
        let rx = b.receiver();
        assert_eq!(rx.arm().unwrap(), Readiness::Armed);
        let mut ready = [false];
        let n = capnp_shm::poll_readable(&[b.as_fd()], &mut ready, Some(Duration::ZERO)).unwrap();
        assert_eq!(n, 0);
        let mut m = a.message();
        set_u64(&mut m, 9);
        a.send(m).unwrap();
        let n = capnp_shm::poll_readable(&[b.as_fd()], &mut ready, Some(Duration::from_secs(20)));
        assert_eq!(n.unwrap(), 1);
        rx.disarm();
        assert_eq!(u64_of(rx.try_recv().unwrap().reader()), 9);
        assert_eq!(a.sender().arm().unwrap(), Readiness::Ready);
        assert!(a.sender().is_ready());
    }
}

#[test]
fn a_message_larger_than_the_socket_buffer_goes_whole_or_waits_for_a_flush() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    for net in NETS {
        let (ours, theirs) = pair(net);
        // Less than the 8 MiB message below, with the sender's buffer: the
        // second message cannot all leave while the peer does not read.
        cap_receive_buffer(&theirs, 1 << 20);
        let mut go = Go::new();
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        // The peer answers each message with its size; before the second,
        // it waits to be told.
        let child = fork(|| {
            drop(ours.take());
            let end = theirs.take().unwrap();
            let mut n = 0;
            while let Ok(m) = end.recv() {
                let len = m.len_bytes() as u64;
                drop(m);
                let mut reply = end.message();
                set_u64(&mut reply, len);
                if end.send(reply).is_err() {
                    return 1;
                }
                n += 1;
                if n == 1 {
                    go.wait();
                }
            }
            0
        });
        drop(theirs.take());
        let end = ours.take().unwrap();
        // A blocking send writes all of it before returning: the peer
        // answers although we send nothing more.
        let big = build(&end, 1, 1, 8 << 20);
        let reply = end.request(big).unwrap();
        assert!(u64_of(reply.reader()) > 8 << 20, "{net:?}");
        drop(reply);
        // A try_send may leave the tail behind: the sender says so, and
        // try_flush sends it.
        end.try_send(build(&end, 2, 1, 8 << 20)).unwrap();
        // The peer is not reading: most of it is still here.
        assert!(!end.sender().is_ready(), "{net:?}");
        assert_eq!(end.sender().arm().unwrap(), Readiness::Writable);
        assert!(matches!(
            end.sender().try_flush(),
            Err(TrySendError::Full(()))
        ));
        go.go();
        loop {
            match end.sender().try_flush() {
                Ok(()) => break,
                Err(TrySendError::Full(())) => {
                    let mut ready = [false];
                    let fd = [end.as_fd()];
                    capnp_shm::poll_ready(&fd, &[true], &mut ready, None).unwrap();
                }
                Err(e) => panic!("{net:?}: {e}"),
            }
        }
        assert!(end.sender().is_ready());
        assert!(u64_of(end.recv().unwrap().reader()) > 8 << 20);
        drop(end);
        assert_eq!(child.wait(), 0, "{net:?}");
    }
}
