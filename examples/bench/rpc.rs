//! The RPC rows: the key-value service of capnp-shm-rpc, served in a
//! forked process, called over capnp-shm-rpc's network (shared memory) and
//! over capnp-rpc's two-party network on a Unix socket. Each network runs
//! under the driver its users would pick: shared memory under the crate's
//! built-in runner (which looks for replies for 50 µs before it sleeps,
//! like the core crate's blocking receive), the two-party network under
//! tokio's current-thread runtime. `ShmTokio` is shared memory under tokio
//! (`AsyncFd`: every wait sleeps), to show what the driver is worth.

// Counts and nanosecond timings, far below every limit.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use capnp_shm::Channel;
use capnp_shm_rpc::ShmNetwork;
use futures::AsyncReadExt;

use crate::kv_capnp::key_value;
use crate::kv_service;

/// Which network carries the calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Shm,
    ShmTokio,
    TwoParty,
}

impl Net {
    pub fn name(self) -> &'static str {
        match self {
            Net::Shm => "shm",
            Net::ShmTokio => "shm under tokio",
            Net::TwoParty => "two-party",
        }
    }
}

/// One end of a connection, before its network is made.
enum End {
    Shm(Box<Channel>),
    Socket(UnixStream),
}

fn system(end: End, side: Side, bootstrap: Option<capnp::capability::Client>) -> RpcSystem<Side> {
    let network: Box<dyn capnp_rpc::VatNetwork<Side>> = match end {
        End::Shm(channel) => Box::new(ShmNetwork::new(*channel, side)),
        End::Socket(stream) => {
            stream.set_nonblocking(true).expect("nonblocking");
            let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
            let (reader, writer) =
                tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
            Box::new(twoparty::VatNetwork::new(
                futures::io::BufReader::new(reader),
                futures::io::BufWriter::new(writer),
                side,
                Default::default(),
            ))
        }
    };
    RpcSystem::new(network, bootstrap)
}

fn block_on<F: std::future::Future>(net: Net, f: F) -> F::Output {
    if net == Net::Shm {
        return capnp_shm_rpc::Runner::new().run_until(f);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(f)
}

/// Forks a server on one end of a new connection and runs `client` with
/// the service's capability on the other; waits for the server.
fn with_server<R>(net: Net, client: impl AsyncFnOnce(key_value::Client) -> R) -> R {
    let (ours, theirs) = match net {
        Net::Shm | Net::ShmTokio => {
            let (a, b) = Channel::pair().expect("channel pair");
            (End::Shm(Box::new(a)), End::Shm(Box::new(b)))
        }
        Net::TwoParty => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (End::Socket(a), End::Socket(b))
        }
    };
    crate::fork_peer(
        ours,
        theirs,
        |end| {
            let served = block_on(net, async move {
                let service: key_value::Client =
                    capnp_rpc::new_client(kv_service::KeyValue::default());
                system(end, Side::Server, Some(service.client)).await
            });
            i32::from(served.is_err())
        },
        |end| {
            block_on(net, async move {
                let mut system = system(end, Side::Client, None);
                let kv: key_value::Client = system.bootstrap(Side::Server);
                let disconnector = system.get_disconnector();
                let body = async move {
                    let r = client(kv).await;
                    disconnector.await.expect("clean disconnect");
                    r
                };
                futures::future::join(body, system).await.0
            })
        },
        "RPC server",
    )
}

/// Round trips of the trivial call `ping`: each call's time in
/// nanoseconds, and the client's heap allocations per call.
pub fn trivial_calls(net: Net, warmup: u64, count: u64) -> (Vec<u64>, f64) {
    with_server(net, async move |kv| {
        for _ in 0..warmup {
            kv.ping_request().send().promise.await.expect("ping");
        }
        let mut times = Vec::with_capacity(count as usize);
        let before = crate::ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..count {
            let t = Instant::now();
            kv.ping_request().send().promise.await.expect("ping");
            times.push(t.elapsed().as_nanos() as u64);
        }
        let allocs = crate::ALLOCATIONS.load(Ordering::Relaxed) - before;
        (times, allocs as f64 / count as f64)
    })
}

/// Pipelined calls: `window` calls in flight at a time; calls per second.
pub fn pipelined_calls(net: Net, window: usize, count: u64) -> f64 {
    with_server(net, async move |kv| {
        let start = Instant::now();
        let mut done = 0u64;
        while done < count {
            let batch: Vec<_> = (0..window)
                .map(|i| {
                    let mut req = kv.echo_request();
                    req.get().set_data(&(done + i as u64).to_le_bytes());
                    req.send().promise
                })
                .collect();
            for (i, reply) in futures::future::try_join_all(batch)
                .await
                .expect("echo")
                .iter()
                .enumerate()
            {
                let data = reply.get().expect("reply").get_data().expect("data");
                assert_eq!(data, (done + i as u64).to_le_bytes());
            }
            done += window as u64;
        }
        done as f64 / start.elapsed().as_secs_f64()
    })
}

/// Calls returning `bytes` bytes, each result read in full: each call's
/// time in nanoseconds.
pub fn large_results(net: Net, bytes: u32, count: u64) -> Vec<u64> {
    with_server(net, async move |kv| {
        let mut times = Vec::with_capacity(count as usize);
        let mut sum = 0u64;
        for _ in 0..count {
            let t = Instant::now();
            let mut req = kv.blob_request();
            req.get().set_bytes(bytes);
            let reply = req.send().promise.await.expect("blob");
            let data = reply.get().expect("reply").get_data().expect("data");
            sum += crate::checksum(data);
            times.push(t.elapsed().as_nanos() as u64);
        }
        std::hint::black_box(sum);
        times
    })
}
