//! Cap'n Proto RPC beyond shared memory: this crate's network over TCP (a
//! stream channel), against capnp-rpc's two-party network over TCP in both
//! directions, and one Unix listener that serves a two-party client and a
//! shared-memory client at once. Real processes throughout; one test at a
//! time (`serial`).

#[path = "../schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
#[path = "../schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;

mod common;

use std::cell::RefCell;

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem, VatNetwork};
use capnp_shm::{Channel, Listener, TcpListener, Transport};
use capnp_shm_rpc::NetworkOptions;
use futures::AsyncReadExt;

use common::{client, die_with_parent, fork, serial, serve, Watchdog, LIMIT};
use kv_capnp::{counter, key_value};
use kv_service::KeyValue;

/// What every client does: plain calls, a megabyte each way, a pipelined
/// chain, and a stream that fills the socket (flow control on a stream
/// channel waits for the socket to take bytes).
async fn exercise(kv: key_value::Client) -> Result<(), capnp::Error> {
    let mut put = kv.put_request();
    put.get().set_key("k");
    put.get().set_value(b"over the wire");
    put.send().promise.await?;
    let mut get = kv.get_request();
    get.get().set_key("k");
    assert_eq!(
        get.send().promise.await?.get()?.get_value()?,
        b"over the wire"
    );
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut echo = kv.echo_request();
    echo.get().set_data(&big);
    assert!(echo.send().promise.await?.get()?.get_data()? == &big[..]);
    let mut req = kv.counter_request();
    req.get().set_start(40);
    let mut cap: counter::Client = req.send().pipeline.get_counter();
    for _ in 0..2 {
        cap = cap.next_request().send().pipeline.get_counter();
    }
    assert_eq!(
        cap.get_request().send().promise.await?.get()?.get_value(),
        42
    );
    let sink = kv.sink_request().send().promise.await?.get()?.get_sink()?;
    let chunk = vec![3u8; 64 << 10];
    for _ in 0..64 {
        let mut w = sink.write_request();
        w.get().set_chunk(&chunk);
        w.send().await?;
    }
    let done = sink.done_request().send().promise.await?;
    assert_eq!(done.get()?.get_bytes(), 64 * (64 << 10));
    Ok(())
}

/// capnp-rpc's two-party network over any tokio stream.
fn two_party<S>(stream: S, side: Side) -> Box<dyn VatNetwork<Side>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    Box::new(twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        Default::default(),
    ))
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime")
}

/// A two-party client: connects with `connect`, runs [`exercise`], ends.
fn two_party_client<S, F>(connect: F) -> i32
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    F: std::future::Future<Output = std::io::Result<S>>,
{
    let rt = tokio_runtime();
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&rt, async move {
        let stream = connect
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        let mut system = RpcSystem::new(two_party(stream, Side::Client), None);
        let kv: key_value::Client = system.bootstrap(Side::Server);
        let disconnector = system.get_disconnector();
        tokio::task::spawn_local(system);
        exercise(kv).await?;
        disconnector.await
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("two-party client: {e}");
            1
        }
    }
}

/// This crate's client on `channel`. On a stream channel, nothing is
/// copied out: held messages cost the peer nothing, so there is no budget.
fn shm_network_client(channel: Channel) {
    let stream = channel.transport() == Transport::Stream;
    let mut c = client(channel, NetworkOptions::new(), None);
    let kv = c.kv.clone();
    c.runner.run_until(exercise(kv)).expect("calls");
    let stats = c.counters.get();
    assert!(
        stats.received_in_place + stats.received_private > 60,
        "{stats:?}"
    );
    if stream {
        assert_eq!(stats.copied_out, 0, "{stats:?}");
    }
}

/// This crate's key-value server in a forked child, on a TCP port of
/// loopback: its address, and the child.
fn spawn_tcp_server() -> (std::net::SocketAddr, common::Child) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = RefCell::new(Some(listener));
    let server = fork(|| {
        die_with_parent();
        let (channel, _) = listener.take().unwrap().accept().unwrap();
        serve(channel, NetworkOptions::new())
    });
    drop(listener.take());
    (addr, server)
}

#[test]
fn this_crates_network_runs_over_tcp() {
    // A child forked by one test would hold copies of another's sockets.
    let _serial = serial();
    let _dog = Watchdog::new(LIMIT);
    let (addr, server) = spawn_tcp_server();
    let channel = Channel::connect_tcp(addr).unwrap();
    assert_eq!(channel.transport(), Transport::Stream);
    shm_network_client(channel);
    assert_eq!(server.wait(), 0);
}

#[test]
fn a_two_party_client_over_tcp_calls_this_crates_server() {
    // A child forked by one test would hold copies of another's sockets.
    let _serial = serial();
    let _dog = Watchdog::new(LIMIT);
    let (addr, server) = spawn_tcp_server();
    assert_eq!(two_party_client(tokio::net::TcpStream::connect(addr)), 0);
    assert_eq!(server.wait(), 0);
}

#[test]
fn this_crates_client_calls_a_two_party_server_over_tcp() {
    // A child forked by one test would hold copies of another's sockets.
    let _serial = serial();
    let _dog = Watchdog::new(LIMIT);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = RefCell::new(Some(listener));
    let server = fork(|| {
        die_with_parent();
        let (stream, _) = listener.take().unwrap().accept().unwrap();
        stream.set_nodelay(true).unwrap();
        stream.set_nonblocking(true).unwrap();
        let rt = tokio_runtime();
        let local = tokio::task::LocalSet::new();
        let served = local.block_on(&rt, async move {
            let stream = tokio::net::TcpStream::from_std(stream).expect("register");
            let kv: key_value::Client = capnp_rpc::new_client(KeyValue::default());
            RpcSystem::new(two_party(stream, Side::Server), Some(kv.client)).await
        });
        i32::from(served.is_err())
    });
    drop(listener.take());
    shm_network_client(Channel::connect_tcp(addr).unwrap());
    assert_eq!(server.wait(), 0);
}

#[test]
fn one_unix_listener_serves_two_party_and_shared_memory_clients() {
    // A child forked by one test would hold copies of another's sockets.
    let _serial = serial();
    let _dog = Watchdog::new(LIMIT);
    let path =
        std::env::temp_dir().join(format!("capnp-shm-rpc-mixed-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = Listener::bind(&path).unwrap();
    // capnp-rpc's own client, knowing nothing of this crate.
    let plain = fork(|| {
        die_with_parent();
        two_party_client(tokio::net::UnixStream::connect(&path))
    });
    // This crate's client: shared memory.
    let shm = fork(|| {
        die_with_parent();
        let channel = Channel::connect(&path).unwrap();
        if channel.transport() != Transport::SharedMemory {
            return 2;
        }
        shm_network_client(channel);
        0
    });
    // Serve both at once, each connection on a thread of its own.
    let mut transports = Vec::new();
    let servers: Vec<_> = (0..2)
        .map(|_| {
            let channel = listener.accept().unwrap();
            transports.push(channel.transport());
            std::thread::spawn(move || serve(channel, NetworkOptions::new()))
        })
        .collect();
    for server in servers {
        assert_eq!(server.join().unwrap(), 0);
    }
    assert_eq!(plain.wait(), 0);
    assert_eq!(shm.wait(), 0);
    transports.sort_by_key(|t| *t == Transport::SharedMemory);
    assert_eq!(transports, [Transport::Stream, Transport::SharedMemory]);
    let _ = std::fs::remove_file(&path);
}
