//! Trivial RPC calls with both vats in this process, on one runner: the
//! workload `scripts/rpc-cost` counts instructions of with callgrind (no
//! wake-ups, no second process, so the count repeats exactly).
//!
//! ```text
//! cargo run --release -p capnp-shm-rpc --example rpc_cost -- 10000       # one call at a time
//! cargo run --release -p capnp-shm-rpc --example rpc_cost -- 10000 100   # 100 in flight
//! ```

#[path = "../schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
#[path = "../schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;

use std::time::Instant;

use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use capnp_shm_rpc::{Runner, ShmNetwork};
use futures::task::LocalSpawnExt;

use kv_capnp::key_value;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls: u32 = std::env::args().nth(1).map_or(Ok(10_000), |n| n.parse())?;
    let window: u32 = std::env::args().nth(2).map_or(Ok(1), |n| n.parse())?;
    let (a, b) = capnp_shm::Channel::pair()?;
    let mut runner = Runner::new();
    let service: key_value::Client = capnp_rpc::new_client(kv_service::KeyValue::default());
    let server = RpcSystem::new(
        Box::new(ShmNetwork::new(a, Side::Server)),
        Some(service.client),
    );
    runner.spawner().spawn_local(async move {
        let _ = server.await;
    })?;
    let mut client = RpcSystem::new(Box::new(ShmNetwork::new(b, Side::Client)), None);
    let kv: key_value::Client = client.bootstrap(Side::Server);
    runner.spawner().spawn_local(async move {
        let _ = client.await;
    })?;
    let elapsed = runner.run_until(async move {
        // The bootstrap and first calls set things up; not counted.
        for _ in 0..100 {
            kv.ping_request().send().promise.await?;
        }
        let start = Instant::now();
        let mut done = 0;
        while done < calls {
            let batch: Vec<_> = (0..window.min(calls - done))
                .map(|_| kv.ping_request().send().promise)
                .collect();
            done += batch.len() as u32;
            futures::future::try_join_all(batch).await?;
        }
        Ok::<_, capnp::Error>(start.elapsed())
    })?;
    println!(
        "{calls} calls, {window} in flight, both vats in one thread: {:.2} µs each",
        elapsed.as_secs_f64() * 1e6 / f64::from(calls)
    );
    Ok(())
}
