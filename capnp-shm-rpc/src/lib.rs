//! Cap'n Proto RPC over [`capnp-shm`](capnp_shm) channels.
//!
//! [`ShmNetwork`] is a [`capnp_rpc::VatNetwork`] over one channel between
//! two processes on one host: a drop-in for capnp-rpc's two-party network
//! (same [`Side`] vat ids, same `RpcSystem`), with every received message
//! read in place in shared memory and released when the RPC system (or
//! your code, holding `Params` or a `Response`) drops it. Sending costs
//! one copy: capnp-rpc builds messages on the heap and keeps them, so each
//! is copied into the region at send.
//!
//! Connect the channel the way the core crate does (a pair before `fork`,
//! a [spawned child](capnp_shm::PendingChild), a
//! [listener](capnp_shm::Listener)), then drive the RPC system with the
//! built-in [`Runner`] (no tokio; it sleeps in `poll(2)`), or, with the
//! `tokio` feature, in a tokio `LocalSet`. The example below keeps both
//! vats in one process to stay self-contained; `examples/kv.rs` spawns the
//! server as a child process (`Channel::for_command`, then
//! `Channel::from_env` in the child), with a real service, and shuts down
//! with the `RpcSystem`'s `get_disconnector()`.
//!
//! ```
//! use capnp_rpc::RpcSystem;
//! use capnp_shm_rpc::{Runner, ShmNetwork, Side};
//! use futures::task::LocalSpawnExt;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (a, b) = capnp_shm::Channel::pair()?; // then fork, or spawn a child
//! let mut runner = Runner::new();
//! // The server's bootstrap capability: any capnp client (here, a broken
//! // one, to keep the example free of generated code).
//! let cap = capnp_rpc::new_broken_cap(capnp::Error::failed("no service".into()));
//! let server = RpcSystem::new(Box::new(ShmNetwork::new(a, Side::Server)), Some(cap));
//! runner.spawner().spawn_local(async move { let _ = server.await; })?;
//!
//! let mut client = RpcSystem::new(Box::new(ShmNetwork::new(b, Side::Client)), None);
//! let bootstrap: capnp::capability::Client = client.bootstrap(Side::Server);
//! runner.spawner().spawn_local(async move { let _ = client.await; })?;
//! // A call of method 0 of some interface, as generated code would make it.
//! let call = bootstrap.new_call::<capnp::any_pointer::Owned, capnp::any_pointer::Owned>(0x1234, 0, None);
//! let answer = runner.run_until(call.send().promise);
//! // The server's answer, over shared memory: its capability is broken.
//! assert!(answer.err().is_some_and(|e| e.to_string().contains("no service")));
//! # Ok(()) }
//! ```
//!
//! # The held-message budget
//!
//! A message read in place keeps its space in the peer's region. Calls and
//! Returns live as long as the application keeps them; two vats that hold
//! each other's could each wait for the other to make room. Past a budget
//! ([`NetworkOptions`]; by default half of what the peer may have in
//! flight), further messages are copied out and released at once, so the
//! peer always has room to send.

#![forbid(unsafe_code)]

mod io;
mod network;
mod runner;

pub use capnp_rpc::rpc_twoparty_capnp::Side;
pub use network::{Counters, NetworkOptions, NetworkStats, ShmNetwork};
pub use runner::{Runner, Spawner, DEFAULT_SPIN};
