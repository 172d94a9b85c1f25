//! The RPC tests' harness: a key-value server in a forked child over a
//! `capnp-shm` channel, a client driven by the built-in runner, and the
//! core crate's watchdog and process helpers.
#![allow(dead_code)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use capnp_shm::{Channel, Options};
use capnp_shm_rpc::{NetworkOptions, Runner, ShmNetwork};
use futures::task::LocalSpawnExt;

#[path = "../../../tests/common/mod.rs"]
mod core_common;
#[allow(unused_imports)] // each test binary uses some
pub use core_common::{die_with_parent, fork, serial, Child, Watchdog};

use crate::kv_capnp::{key_value, watcher};
use crate::kv_service::KeyValue;

/// How long any one test may run before the watchdog aborts it.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Serves the key-value store on `channel` until the client disconnects;
/// returns the exit code: 0 for a clean end.
pub fn serve(channel: Channel, options: NetworkOptions) -> i32 {
    serve_with(channel, options, false)
}

/// As [`serve`]; at start, calls the client's bootstrap watcher with
/// `("server", b"up")` when `greet` is set.
pub fn serve_with(channel: Channel, options: NetworkOptions, greet: bool) -> i32 {
    let mut runner = Runner::new();
    let network = ShmNetwork::with_options(channel, Side::Server, options);
    let counters = network.counters();
    let service = KeyValue::with_stats(Box::new(move || {
        let s = counters.get();
        (s.received_in_place, s.copied_out)
    }));
    let client: key_value::Client = capnp_rpc::new_client(service);
    let mut system = RpcSystem::new(Box::new(network), Some(client.client));
    if greet {
        let theirs: watcher::Client = system.bootstrap(Side::Client);
        let spawner = runner.spawner();
        spawner
            .spawn_local(async move {
                let mut req = theirs.changed_request();
                req.get().set_key("server");
                req.get().set_value(b"up");
                let _ = req.send().promise.await;
            })
            .expect("spawn");
    }
    match runner.run_until(system) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("server: {e}");
            1
        }
    }
}

/// A server in a forked child, and the parent's end of its channel.
pub fn spawn_server(channel_options: &Options, options: NetworkOptions) -> (Channel, Child) {
    spawn_server_with(channel_options, options, false)
}

/// As [`spawn_server`], with `greet` as for [`serve_with`].
pub fn spawn_server_with(
    channel_options: &Options,
    options: NetworkOptions,
    greet: bool,
) -> (Channel, Child) {
    let (a, b) = Channel::pair_with(channel_options).expect("pair");
    // The closure is dropped unrun in the parent: it only borrows the ends.
    let ours = RefCell::new(Some(a));
    let theirs = RefCell::new(Some(b));
    let child = fork(|| {
        die_with_parent();
        drop(ours.take());
        serve_with(theirs.take().expect("the server's end"), options, greet)
    });
    drop(theirs);
    (ours.take().expect("our end"), child)
}

/// The client's side: a runner with the RPC system spawned in it, and the
/// server's bootstrap capability.
pub struct Client {
    pub runner: Runner,
    pub kv: key_value::Client,
    /// Resolves once the connection has been shut down cleanly.
    pub disconnector: Pin<Box<dyn Future<Output = Result<(), capnp::Error>>>>,
    pub counters: capnp_shm_rpc::Counters,
}

/// A client's RPC system on `channel` (offering `bootstrap` to the
/// server), not yet driven, and the server's capability in it.
pub struct Unstarted {
    pub system: RpcSystem<Side>,
    pub kv: key_value::Client,
    /// Resolves once the connection has been shut down cleanly.
    pub disconnector: Pin<Box<dyn Future<Output = Result<(), capnp::Error>>>>,
    pub counters: capnp_shm_rpc::Counters,
}

/// Makes a client's RPC system on `channel`; drive it with any executor.
pub fn unstarted_client(
    channel: Channel,
    options: NetworkOptions,
    bootstrap: Option<capnp::capability::Client>,
) -> Unstarted {
    let network = ShmNetwork::with_options(channel, Side::Client, options);
    let counters = network.counters();
    let mut system = RpcSystem::new(Box::new(network), bootstrap);
    let kv: key_value::Client = system.bootstrap(Side::Server);
    let disconnector = Box::pin(system.get_disconnector());
    Unstarted {
        system,
        kv,
        disconnector,
        counters,
    }
}

/// Connects a client on `channel`, offering `bootstrap` to the server, with
/// its RPC system spawned on a runner.
pub fn client(
    channel: Channel,
    options: NetworkOptions,
    bootstrap: Option<capnp::capability::Client>,
) -> Client {
    let Unstarted {
        system,
        kv,
        disconnector,
        counters,
    } = unstarted_client(channel, options, bootstrap);
    let runner = Runner::new();
    runner
        .spawner()
        .spawn_local(async move {
            let _ = system.await;
        })
        .expect("spawn");
    Client {
        runner,
        kv,
        disconnector,
        counters,
    }
}

/// A server in a child and a client here, with default options.
pub fn connected() -> (Client, Child) {
    let (channel, child) = spawn_server(&Options::new(), NetworkOptions::new());
    (client(channel, NetworkOptions::new(), None), child)
}
