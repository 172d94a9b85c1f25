//! Both vats in one process, on one runner (and under tokio).

#[path = "../schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
#[path = "../schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;

mod common;

use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use capnp_shm_rpc::{Runner, ShmNetwork};
use futures::task::LocalSpawnExt;

use kv_capnp::key_value;

/// Both vats over one channel pair in this process: the server's RPC
/// system (serving the key-value store), the client's, and the server's
/// capability as the client sees it. Nothing runs until they are driven.
fn vats() -> (RpcSystem<Side>, RpcSystem<Side>, key_value::Client) {
    let (a, b) = capnp_shm::Channel::pair().expect("pair");
    let service: key_value::Client = capnp_rpc::new_client(kv_service::KeyValue::default());
    let server = RpcSystem::new(
        Box::new(ShmNetwork::new(a, Side::Server)),
        Some(service.client),
    );
    let mut client = RpcSystem::new(Box::new(ShmNetwork::new(b, Side::Client)), None);
    let kv: key_value::Client = client.bootstrap(Side::Server);
    (server, client, kv)
}

#[test]
fn both_vats_on_one_runner() {
    let _dog = common::Watchdog::new(common::LIMIT);
    let (server, client, kv) = vats();
    let mut runner = Runner::new();
    runner
        .spawner()
        .spawn_local(async move {
            let _ = server.await;
        })
        .expect("spawn");
    runner
        .spawner()
        .spawn_local(async move {
            let _ = client.await;
        })
        .expect("spawn");
    let echoed = runner.run_until(async move {
        let mut req = kv.echo_request();
        req.get().set_data(b"in process");
        let reply = req.send().promise.await?;
        Ok::<Vec<u8>, capnp::Error>(reply.get()?.get_data()?.to_vec())
    });
    assert_eq!(echoed.expect("echo"), b"in process");
}

/// The same under tokio: both vats in one `LocalSet`, woken through
/// tokio's reactor on the channels' descriptors.
#[cfg(feature = "tokio")]
#[test]
fn both_vats_under_tokio() {
    let _dog = common::Watchdog::new(common::LIMIT);
    let (server, client, kv) = vats();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let sums = local.block_on(&rt, async move {
        tokio::task::spawn_local(server);
        tokio::task::spawn_local(client);
        let mut sums = Vec::new();
        // Enough round trips that both sides sleep and wake many times.
        for n in 0..200u32 {
            let mut req = kv.blob_request();
            req.get().set_bytes(n * 100);
            let reply = req.send().promise.await?;
            sums.push(
                reply
                    .get()?
                    .get_data()?
                    .iter()
                    .map(|&b| u64::from(b))
                    .sum::<u64>(),
            );
        }
        Ok::<Vec<u64>, capnp::Error>(sums)
    });
    let expected: Vec<u64> = (0..200usize)
        .map(|n| {
            (0..n * 100)
                .map(|i| u64::from(kv_service::blob_byte(i)))
                .sum()
        })
        .collect();
    assert_eq!(sums.expect("calls"), expected);
}

/// A peer that speaks the channel's protocol but not Cap'n Proto RPC: a
/// message whose root is not an RPC `Message`. The pending call fails, the
/// RPC system ends, nothing panics or hangs, and the bad peer then sees
/// the end of the stream.
#[test]
fn a_peer_sending_garbage_fails_the_calls_and_closes() {
    let _dog = common::Watchdog::new(common::LIMIT);
    let (raw, b) = capnp_shm::Channel::pair().expect("pair");
    let mut runner = Runner::new();
    let mut client = RpcSystem::new(Box::new(ShmNetwork::new(b, Side::Client)), None);
    let kv: key_value::Client = client.bootstrap(Side::Server);
    let system = runner
        .spawner()
        .spawn_local_with_handle(client)
        .expect("spawn");
    let call = kv.ping_request().send().promise;
    // Let the client send its Bootstrap and Call, then answer with a text.
    let (reply, ()) = runner.run_until(futures::future::join(call, async {
        // The client's first messages (Bootstrap, Call) arrive here.
        while raw.try_recv().is_ok() {}
        let mut m = raw.message();
        m.set_root(capnp::text::Reader::from("not an RPC message"))
            .expect("build");
        raw.send(m).map_err(|e| e.into_error()).expect("send");
    }));
    let error = reply.err().expect("the call fails");
    assert!(
        error.to_string().contains("struct pointer"),
        "the error names what could not be read: {error}"
    );
    // The RPC system ends. (capnp-rpc reports a peer's protocol error
    // through the calls and the Abort it sends back, not its own result.)
    let _ = runner.run_until(system);
    // The client closed its end: what is left to read, then Disconnected.
    loop {
        match raw.recv() {
            Ok(_) => continue,
            Err(capnp_shm::RecvError::Disconnected) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

/// After capnp-rpc disconnects a connection (here: the client's
/// `Disconnector`) it drops the connection's state but may go on polling
/// the receive it had asked for. The end of the stream must not be
/// reported then: capnp-rpc 0.27 panics on it ("message loop outlived
/// connection state?"). The server then going away changes nothing.
#[test]
fn the_end_of_the_stream_after_a_disconnect_is_not_reported() {
    let _dog = common::Watchdog::new(common::LIMIT);
    let (server, client, kv) = vats();
    let mut runner = Runner::new();
    let disconnector = client.get_disconnector();
    let client = runner
        .spawner()
        .spawn_local_with_handle(client)
        .expect("spawn");
    let server = runner
        .spawner()
        .spawn_local_with_handle(futures::future::abortable(server).0)
        .expect("spawn");
    runner
        .run_until(async move {
            kv.ping_request().send().promise.await?;
            disconnector.await
        })
        .expect("disconnect");
    // The server's end closes after the client's state is gone.
    drop(server);
    let ended = runner.run_until(client);
    assert!(ended.is_ok(), "{ended:?}");
}
