//! A key-value service in a spawned child process, called over Cap'n Proto
//! RPC: over shared memory (capnp-shm-rpc) by default, or over capnp-rpc's
//! two-party network on a Unix socket with `--two-party`. The service and
//! the client code are the same for both; only the network (and the
//! executor that drives it) differ.
//!
//! ```text
//! cargo run --release -p capnp-shm-rpc --example kv
//! cargo run --release -p capnp-shm-rpc --example kv -- --two-party
//! cargo run --release -p capnp-shm-rpc --example kv -- --tcp     # this crate's network over TCP
//! cargo run --release -p capnp-shm-rpc --example kv -- --mixed   # one Unix socket, two kinds of client
//! ```
//!
//! Or by address, across processes (and, with `tcp:`, hosts) of your own:
//!
//! ```text
//! kv --serve unix:/tmp/kv.sock        # or tcp:0.0.0.0:7000; serves any number of clients
//! kv --connect unix:/tmp/kv.sock      # this crate's client: shared memory on a Unix socket
//! kv --connect tcp:server:7000        # ... or the stream transport over TCP
//! kv --connect-two-party unix:/tmp/kv.sock   # capnp-rpc's own client: served on the same socket
//! ```
//!
//! The client stores and reads keys, follows a chain of pipelined calls
//! (each on a capability that does not exist yet when it is sent), hands
//! the server a capability of its own that the server calls back on every
//! put, streams a megabyte, and times a thousand trivial calls.

#[path = "../schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
#[path = "../schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;

use std::error::Error;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use capnp_shm::Channel;
use capnp_shm_rpc::{Runner, ShmNetwork};
use futures::AsyncReadExt;

use kv_capnp::{counter, key_value, watcher};
use kv_service::{KeyValue, Recorder};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--serve-shm") => serve_shm(),
        Some("--serve-two-party") => serve_two_party(&args[1]),
        Some("--two-party") => client_two_party(),
        Some("--serve") => serve(&Addr::parse(args.get(1))?, None),
        Some("--connect") => client_at(&Addr::parse(args.get(1))?),
        Some("--connect-two-party") => client_two_party_at(&Addr::parse(args.get(1))?),
        Some("--tcp") => demo_tcp(),
        Some("--mixed") => demo_mixed(),
        None => client_shm(),
        Some(other) => Err(format!(
            "unknown argument {other:?}: try --two-party, --tcp, --mixed, --serve ADDR, \
             --connect ADDR or --connect-two-party ADDR (ADDR: unix:PATH or tcp:HOST:PORT)"
        )
        .into()),
    }
}

// ---- addresses ----------------------------------------------------------

/// Where a server listens or a client connects.
enum Addr {
    Unix(String),
    Tcp(String),
}

impl Addr {
    fn parse(arg: Option<&String>) -> Result<Addr, Box<dyn Error>> {
        let arg = arg.ok_or("an address is needed: unix:PATH or tcp:HOST:PORT")?;
        if let Some(path) = arg.strip_prefix("unix:") {
            Ok(Addr::Unix(path.to_string()))
        } else if let Some(host) = arg.strip_prefix("tcp:") {
            Ok(Addr::Tcp(host.to_string()))
        } else {
            Err(format!("{arg:?} is not unix:PATH or tcp:HOST:PORT").into())
        }
    }

    fn show(&self) -> String {
        match self {
            Addr::Unix(p) => format!("unix:{p}"),
            Addr::Tcp(h) => format!("tcp:{h}"),
        }
    }
}

/// Serves every client that connects to `addr` (or only the first
/// `clients`), each on a thread of its own with its own runner. On a Unix
/// socket, this crate's clients get shared memory and capnp-rpc's own
/// two-party clients (plain framing) the stream transport, on one socket.
fn serve(addr: &Addr, clients: Option<usize>) -> Result<(), Box<dyn Error>> {
    let listening = match addr {
        Addr::Unix(path) => Listening::Unix(capnp_shm::Listener::bind(path)?),
        Addr::Tcp(host) => Listening::Tcp(capnp_shm::TcpListener::bind(host.as_str())?),
    };
    serve_on(&listening, clients)
}

/// A listener of either kind.
enum Listening {
    Unix(capnp_shm::Listener),
    Tcp(capnp_shm::TcpListener),
}

impl Listening {
    fn accept(&self) -> std::io::Result<Channel> {
        match self {
            Listening::Unix(l) => l.accept(),
            Listening::Tcp(l) => l.accept().map(|(channel, _)| channel),
        }
    }
}

fn serve_on(listening: &Listening, clients: Option<usize>) -> Result<(), Box<dyn Error>> {
    let mut served = Vec::new();
    for n in 0.. {
        if clients.is_some_and(|c| n >= c) {
            break;
        }
        let channel = listening.accept()?;
        println!("server: client {n} over {:?}", channel.transport());
        served.push(std::thread::spawn(move || -> Result<(), String> {
            let network = ShmNetwork::new(channel, Side::Server);
            Runner::new()
                .run_until(RpcSystem::new(Box::new(network), Some(service())))
                .map_err(|e| e.to_string())
        }));
    }
    for s in served {
        s.join().map_err(|_| "a server thread panicked")??;
    }
    Ok(())
}

/// This crate's client at `addr`.
fn client_at(addr: &Addr) -> Result<(), Box<dyn Error>> {
    let channel = match addr {
        Addr::Unix(path) => Channel::connect(path)?,
        Addr::Tcp(host) => Channel::connect_tcp(host.as_str())?,
    };
    let over = format!("{} ({:?})", addr.show(), channel.transport());
    let network = ShmNetwork::new(channel, Side::Client);
    Runner::new().run_until(client(Box::new(network), &over))
}

/// capnp-rpc's own two-party client at `addr`.
fn client_two_party_at(addr: &Addr) -> Result<(), Box<dyn Error>> {
    let rt = tokio_runtime()?;
    let over = format!("{} (capnp-rpc's two-party network)", addr.show());
    let network: Box<dyn capnp_rpc::VatNetwork<Side>> = match addr {
        Addr::Unix(path) => two_party(UnixStream::connect(path)?, Side::Client, &rt)?,
        Addr::Tcp(host) => {
            let stream = std::net::TcpStream::connect(host.as_str())?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            let _entered = rt.enter();
            let stream = tokio::net::TcpStream::from_std(stream)?;
            let (reader, writer) =
                tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
            Box::new(twoparty::VatNetwork::new(
                futures::io::BufReader::new(reader),
                futures::io::BufWriter::new(writer),
                Side::Client,
                Default::default(),
            ))
        }
    };
    rt.block_on(client(network, &over))
}

/// This crate's network over TCP on loopback: a child connects by address.
fn demo_tcp() -> Result<(), Box<dyn Error>> {
    let listener = capnp_shm::TcpListener::bind("127.0.0.1:0")?;
    let addr = format!("tcp:{}", listener.local_addr()?);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--connect", &addr])
        .spawn()?;
    serve_on(&Listening::Tcp(listener), Some(1))?;
    check_exit(child.wait()?)
}

/// One Unix socket, two clients: this crate's (shared memory) and
/// capnp-rpc's own (two-party, plain framing), served side by side.
fn demo_mixed() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("capnp-shm-rpc-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("socket");
    let listener = capnp_shm::Listener::bind(&path)?;
    let addr = format!("unix:{}", path.display());
    let mut children = Vec::new();
    for how in ["--connect", "--connect-two-party"] {
        children.push(
            Command::new(std::env::current_exe()?)
                .args([how, &addr])
                .spawn()?,
        );
    }
    serve_on(&Listening::Unix(listener), Some(2))?;
    for mut c in children {
        check_exit(c.wait()?)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn check_exit(status: std::process::ExitStatus) -> Result<(), Box<dyn Error>> {
    if status.success() {
        Ok(())
    } else {
        Err(format!("a client failed: {status}").into())
    }
}

// ---- the server: one per process, over either network -------------------

fn service() -> capnp::capability::Client {
    let kv: key_value::Client = capnp_rpc::new_client(KeyValue::default());
    kv.client
}

/// The child, over shared memory: the channel comes from the parent.
fn serve_shm() -> Result<(), Box<dyn Error>> {
    let channel = Channel::from_env()?;
    let network = ShmNetwork::new(channel, Side::Server);
    Runner::new().run_until(RpcSystem::new(Box::new(network), Some(service())))?;
    Ok(())
}

/// The child, over the two-party network: it connects to the parent's
/// socket.
fn serve_two_party(path: &str) -> Result<(), Box<dyn Error>> {
    let stream = UnixStream::connect(path)?;
    let rt = tokio_runtime()?;
    let network = two_party(stream, Side::Server, &rt)?;
    rt.block_on(RpcSystem::new(network, Some(service())))?;
    Ok(())
}

// ---- the client: the same code over either network ---------------------

fn client_shm() -> Result<(), Box<dyn Error>> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--serve-shm");
    let pending = Channel::for_command(&mut command)?;
    let mut child = command.spawn()?;
    let channel = pending.connect()?;
    let network = ShmNetwork::new(channel, Side::Client);
    let counters = network.counters();
    Runner::new().run_until(client(Box::new(network), "shared memory"))?;
    let s = counters.get();
    println!(
        "network: {} messages read in place, {} copied out, {} sent ({} queued for room)",
        s.received_in_place, s.copied_out, s.sent, s.queued
    );
    child.wait()?;
    Ok(())
}

fn client_two_party() -> Result<(), Box<dyn Error>> {
    let dir = std::env::temp_dir().join(format!("capnp-shm-rpc-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("socket");
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve-two-party")
        .arg(&path)
        .spawn()?;
    let (stream, _) = listener.accept()?;
    std::fs::remove_dir_all(&dir)?;
    let rt = tokio_runtime()?;
    let network = two_party(stream, Side::Client, &rt)?;
    rt.block_on(client(network, "capnp-rpc's two-party network"))?;
    child.wait()?;
    Ok(())
}

/// Everything the client does, against any network.
async fn client(
    network: Box<dyn capnp_rpc::VatNetwork<Side>>,
    over: &str,
) -> Result<(), Box<dyn Error>> {
    let mut system = RpcSystem::new(network, None);
    let kv: key_value::Client = system.bootstrap(Side::Server);
    let disconnector = system.get_disconnector();
    let work = async move {
        println!("calling a key-value server in another process over {over}");

        // A capability of ours, which the server calls on every put.
        let recorder = Recorder::default();
        let seen = recorder.seen.clone();
        let mut watch = kv.watch_request();
        watch
            .get()
            .set_watcher(capnp_rpc::new_client::<watcher::Client, _>(recorder));
        watch.send().promise.await?;

        for (key, value) in [("apple", "red"), ("banana", "yellow")] {
            let mut put = kv.put_request();
            put.get().set_key(key);
            put.get().set_value(value.as_bytes());
            put.send().promise.await?;
        }
        let mut get = kv.get_request();
        get.get().set_key("banana");
        let reply = get.send().promise.await?;
        println!(
            "get banana -> {:?}",
            std::str::from_utf8(reply.get()?.get_value()?)?
        );
        println!(
            "the server called our watcher {} times",
            seen.borrow().len()
        );

        // Pipelining: five calls on capabilities that do not exist yet,
        // then one wait for the last answer.
        let mut req = kv.counter_request();
        req.get().set_start(100);
        let mut cap: counter::Client = req.send().pipeline.get_counter();
        for _ in 0..5 {
            cap = cap.next_request().send().pipeline.get_counter();
        }
        let value = cap.get_request().send().promise.await?.get()?.get_value();
        println!("counter(100).next() x5 .get() -> {value} (pipelined)");

        // Streaming with flow control.
        let sink = kv.sink_request().send().promise.await?.get()?.get_sink()?;
        let chunk = vec![1u8; 64 << 10];
        for _ in 0..16 {
            let mut w = sink.write_request();
            w.get().set_chunk(&chunk);
            w.send().await?;
        }
        let done = sink.done_request().send().promise.await?;
        println!(
            "streamed {} bytes in {} writes",
            done.get()?.get_bytes(),
            done.get()?.get_writes()
        );

        let start = Instant::now();
        for _ in 0..1000 {
            kv.ping_request().send().promise.await?;
        }
        let each = start.elapsed() / 1000;
        println!("1000 trivial calls: {} µs each", micros(each));
        disconnector.await?;
        Ok::<(), Box<dyn Error>>(())
    };
    let (result, system_result) = futures::future::join(work, system).await;
    result?;
    system_result?;
    Ok(())
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

// ---- the two-party network, as capnp-rpc's examples set it up ------------

fn two_party(
    stream: UnixStream,
    side: Side,
    rt: &tokio::runtime::Runtime,
) -> Result<Box<dyn capnp_rpc::VatNetwork<Side>>, Box<dyn Error>> {
    stream.set_nonblocking(true)?;
    // Registering the socket needs the runtime entered.
    let _entered = rt.enter();
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (reader, writer) = tokio_util::compat::TokioAsyncReadCompatExt::compat(stream).split();
    Ok(Box::new(twoparty::VatNetwork::new(
        futures::io::BufReader::new(reader),
        futures::io::BufWriter::new(writer),
        side,
        Default::default(),
    )))
}

/// A current-thread tokio runtime (I/O only), as capnp-rpc's examples use.
fn tokio_runtime() -> Result<tokio::runtime::Runtime, Box<dyn Error>> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?)
}
