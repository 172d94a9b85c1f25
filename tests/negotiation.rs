//! Choosing the transport: on a Unix socket, two ends that can both use
//! shared memory do; an end that asks for the stream, or cannot create a
//! region, gets the stream on both sides; a listener serves plain capnp
//! clients and channel clients on one socket; a connecting end can speak
//! plain framing to an old server; TCP listens and connects. Real
//! processes throughout.
mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_shm::{
    AcceptError, Backing, Channel, Listener, Options, RecvError, SetupError, TcpListener,
    Transport, Wire,
};
use common::{build, check, fork, serial, SocketPath, Watchdog};

/// Sends `count` messages numbered from `first`, and checks each reply is
/// the same number plus one.
fn ask(end: &Channel, first: u64, count: u64) {
    for n in first..first + count {
        let reply = end.request(build(end, n, 2, (n % 300) as usize)).unwrap();
        assert_eq!(check(&reply), n + 1);
    }
}

/// Answers every message with its number plus one, until the peer goes.
fn answer(end: &Channel) {
    loop {
        let n = match end.recv() {
            Ok(m) => check(&m),
            Err(RecvError::Disconnected) => return,
            Err(e) => panic!("{e}"),
        };
        end.send(build(end, n + 1, 1, 16)).unwrap();
    }
}

/// A connected pair over a Unix socket: `ours` set up here, `theirs` in a
/// forked child that then answers; returns our end and the child.
fn with_child(ours: &Options, theirs: impl FnOnce() -> Options) -> (Channel, common::Child) {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (Some(a), Some(b));
    let child = fork(|| {
        drop(a.take());
        let end = Channel::from_stream_with(b.take().unwrap(), &theirs()).unwrap();
        let transport = end.transport();
        answer(&end);
        i32::from(transport != Transport::Stream) * 10
    });
    drop(b.take());
    (
        Channel::from_stream_with(a.take().unwrap(), ours).unwrap(),
        child,
    )
}

#[test]
fn two_default_ends_use_shared_memory() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let (a, b) = Channel::pair().unwrap();
    assert_eq!(
        (a.transport(), b.transport()),
        (Transport::SharedMemory, Transport::SharedMemory)
    );
}

#[test]
fn an_end_that_asks_for_the_stream_gets_it_on_both_sides() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    // Either side may ask.
    for asks_here in [true, false] {
        let stream = Options::new().wire(Wire::Stream);
        let (here, there) = if asks_here {
            (stream, Options::new())
        } else {
            (Options::new(), stream)
        };
        let (end, child) = with_child(&here, move || there);
        assert_eq!(end.transport(), Transport::Stream);
        assert!(!end.is_sealed());
        ask(&end, 0, 1000);
        drop(end);
        // The child exits 0 only if it was on the stream too.
        assert_eq!(child.wait(), 0);
    }
}

#[test]
fn an_end_that_cannot_create_a_region_falls_back_to_the_stream() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    // In the child, a file size limit of 0 makes every region fail (a memfd
    // and a /dev/shm file alike cannot grow): a policy that refuses shared
    // memory. Its end says so in its hello; ours follows.
    let (end, child) = with_child(&Options::new(), || {
        common::refuse_file_growth();
        // A memfd or nothing: refused here, an error, not a fallback.
        let (x, _y) = UnixStream::pair().unwrap();
        let strict = Options::new().backing(Backing::Memfd);
        assert!(matches!(
            Channel::from_stream_with(x, &strict),
            Err(SetupError::Io(_))
        ));
        Options::new()
    });
    assert_eq!(end.transport(), Transport::Stream);
    ask(&end, 0, 1000);
    drop(end);
    assert_eq!(child.wait(), 0);
}

#[test]
fn a_listener_serves_plain_capnp_clients_and_channel_clients_on_one_socket() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let path = SocketPath::new("mixed");
    let listener = Listener::bind(&path.0).unwrap();
    const N: u64 = 200;
    // An old client: plain capnp::serialize on a plain Unix socket.
    let plain = fork(|| {
        let mut s = UnixStream::connect(&path.0).unwrap();
        for n in 0..N {
            let mut m = capnp::message::Builder::new_default();
            common::fill(&mut m, n, 1, 32);
            capnp::serialize::write_message(&mut s, &m).unwrap();
            s.flush().unwrap();
            let r = capnp::serialize::read_message(&mut s, ReaderOptions::new()).unwrap();
            let list: capnp::data_list::Reader<'_> = r.get_root().unwrap();
            let got = u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap());
            assert_eq!(got, n + 1);
        }
        0
    });
    // A new client: shared memory.
    let shm = fork(|| {
        let end = Channel::connect(&path.0).unwrap();
        assert_eq!(end.transport(), Transport::SharedMemory);
        ask(&end, 1000, N);
        0
    });
    // A new client that asks for the stream.
    let stream = fork(|| {
        let end = Channel::connect_with(&path.0, &Options::new().wire(Wire::Stream)).unwrap();
        assert_eq!(end.transport(), Transport::Stream);
        ask(&end, 2000, N);
        0
    });
    let mut transports = Vec::new();
    let servers: Vec<_> = (0..3)
        .map(|_| {
            let end = listener.accept().unwrap();
            transports.push(end.transport());
            std::thread::spawn(move || answer(&end))
        })
        .collect();
    for server in servers {
        server.join().unwrap();
    }
    assert_eq!(plain.wait(), 0);
    assert_eq!(shm.wait(), 0);
    assert_eq!(stream.wait(), 0);
    transports.sort_by_key(|t| *t == Transport::SharedMemory);
    assert_eq!(
        transports,
        [
            Transport::Stream,
            Transport::Stream,
            Transport::SharedMemory
        ]
    );
    assert_eq!(listener.client_failures().1, 0);
}

#[test]
fn a_connecting_end_speaks_plain_framing_to_an_old_server() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let path = SocketPath::new("old-server");
    let listener = UnixListener::bind(&path.0).unwrap();
    let mut listener = Some(listener);
    // The old server: plain capnp::serialize, answering n with n + 1.
    let server = fork(|| {
        let (mut s, _) = listener.take().unwrap().accept().unwrap();
        while let Ok(r) = capnp::serialize::read_message(&mut s, ReaderOptions::new()) {
            let list: capnp::data_list::Reader<'_> = r.get_root().unwrap();
            let n = u64::from_le_bytes(list.get(0).unwrap().try_into().unwrap());
            let mut m = capnp::message::Builder::new_default();
            common::fill(&mut m, n + 1, 1, 8);
            capnp::serialize::write_message(&mut s, &m).unwrap();
        }
        0
    });
    drop(listener.take());
    let end = Channel::connect_with(&path.0, &Options::new().wire(Wire::Plain)).unwrap();
    assert_eq!(end.transport(), Transport::Stream);
    ask(&end, 0, 500);
    drop(end);
    assert_eq!(server.wait(), 0);
}

#[test]
fn tcp_listens_and_connects() {
    let _s = serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    assert!(matches!(
        listener.try_accept(),
        Err(AcceptError::WouldBlock)
    ));
    assert!(matches!(
        listener.accept_timeout(Duration::from_millis(20)),
        Err(AcceptError::Timeout)
    ));
    let client = fork(|| {
        let end = Channel::connect_tcp(addr).unwrap();
        assert_eq!(end.transport(), Transport::Stream);
        ask(&end, 0, 1000);
        0
    });
    let (end, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());
    answer(&end);
    assert_eq!(client.wait(), 0);
    // Nobody listening: a prompt, specific error.
    drop(listener);
    match Channel::connect_tcp(addr) {
        Err(SetupError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
}
