//! Cap'n Proto RPC over shared memory, between real processes: the
//! behaviours capnp-rpc's own suite covers (bootstrap, pipelining,
//! embargoes, capabilities both ways, cancellation, streaming), plus the
//! held-message budget, a killed peer and a clean shutdown.

#[path = "../schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
#[path = "../schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;

mod common;

use std::time::Duration;

use capnp::ErrorKind;
use capnp_shm::Options;
use capnp_shm_rpc::NetworkOptions;
use futures::FutureExt;

use common::{client, connected, spawn_server, spawn_server_with, Watchdog, LIMIT};
use kv_capnp::{call_order, counter, watcher};
use kv_service::{blob_byte, CallOrder, Recorder};

#[test]
fn bootstrap_and_plain_calls() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    c.runner
        .run_until(async move {
            let mut put = kv.put_request();
            put.get().set_key("k");
            put.get().set_value(b"v1");
            put.send().promise.await?;
            let mut get = kv.get_request();
            get.get().set_key("k");
            let reply = get.send().promise.await?;
            assert_eq!(reply.get()?.get_value()?, b"v1");
            let mut echo = kv.echo_request();
            echo.get().set_data(&[7u8; 3000]);
            let reply = echo.send().promise.await?;
            assert_eq!(reply.get()?.get_data()?, &[7u8; 3000][..]);
            Ok::<(), capnp::Error>(())
        })
        .expect("calls");
    let stats = c.counters.get();
    // The small replies come carried in their descriptors, the 3000 bytes
    // of echo in place.
    assert!(stats.received_in_place >= 1, "{stats:?}");
    assert!(stats.received_private >= 2, "{stats:?}");
    assert_eq!(stats.copied_out, 0, "{stats:?}");
    assert_eq!(stats.held, 0, "every reply dropped: {stats:?}");
    drop(c);
    assert_eq!(
        child.wait(),
        0,
        "the server ends cleanly when the client goes"
    );
}

#[test]
fn bootstrap_both_ways() {
    let _dog = Watchdog::new(LIMIT);
    let (channel, child) = spawn_server_with(&Options::new(), NetworkOptions::new(), true);
    let recorder = Recorder::default();
    let seen = recorder.seen.clone();
    let mine: watcher::Client = capnp_rpc::new_client(recorder);
    let mut c = client(channel, NetworkOptions::new(), Some(mine.client));
    let kv = c.kv.clone();
    c.runner
        .run_until(async move {
            // The server calls our bootstrap as it starts; wait for it with
            // round trips of our own (each one a full exchange).
            for _ in 0..10_000 {
                if !seen.borrow().is_empty() {
                    break;
                }
                kv.ping_request().send().promise.await?;
            }
            assert_eq!(&*seen.borrow(), &[("server".to_string(), b"up".to_vec())]);
            Ok::<(), capnp::Error>(())
        })
        .expect("calls");
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn pipelined_chain() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let value = c
        .runner
        .run_until(async move {
            let mut req = kv.counter_request();
            req.get().set_start(10);
            let first = req.send().pipeline.get_counter();
            // Each call goes to a capability that does not exist yet.
            let mut cap: counter::Client = first;
            for _ in 0..5 {
                cap = cap.next_request().send().pipeline.get_counter();
            }
            let reply = cap.get_request().send().promise.await?;
            Ok::<i64, capnp::Error>(reply.get()?.get_value())
        })
        .expect("pipelined calls");
    assert_eq!(value, 15);
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn embargo_keeps_call_order() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let order = std::rc::Rc::new(CallOrder::default());
    let local: call_order::Client = capnp_rpc::new_client_from_rc(order.clone());
    c.runner
        .run_until(async move {
            let mut req = kv.reflect_request();
            req.get().set_cap(local);
            let reflected = req.send();
            let cap = reflected.pipeline.get_cap();
            // Calls on the promise go to the server and come back to us...
            let mut early = Vec::new();
            for n in 0..4 {
                let mut call = cap.next_request();
                call.get().set_expected(n);
                early.push(call.send().promise);
            }
            // ...and once it resolves to our own capability, later calls
            // go straight to it: the embargo holds them until the earlier
            // ones have come round.
            reflected.promise.await?;
            let mut late = Vec::new();
            for n in 4..8 {
                let mut call = cap.next_request();
                call.get().set_expected(n);
                late.push(call.send().promise);
            }
            for (n, p) in early.into_iter().chain(late).enumerate() {
                assert_eq!(p.await?.get()?.get_n(), n as u32);
            }
            Ok::<(), capnp::Error>(())
        })
        .expect("calls in order");
    assert_eq!(order.next.get(), 8);
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn capabilities_in_both_directions() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let recorder = Recorder::default();
    let seen = recorder.seen.clone();
    c.runner
        .run_until(async move {
            // Ours to the server: it calls back on every put.
            let mut watch = kv.watch_request();
            watch.get().set_watcher(capnp_rpc::new_client(recorder));
            watch.send().promise.await?;
            for (k, v) in [("a", &b"1"[..]), ("b", &b"22"[..])] {
                let mut put = kv.put_request();
                put.get().set_key(k);
                put.get().set_value(v);
                put.send().promise.await?;
            }
            // The server's to us: a counter we call.
            let mut req = kv.counter_request();
            req.get().set_start(-3);
            let cap = req.send().promise.await?.get()?.get_counter()?;
            let value = cap.get_request().send().promise.await?.get()?.get_value();
            assert_eq!(value, -3);
            Ok::<(), capnp::Error>(())
        })
        .expect("calls");
    assert_eq!(
        &*seen.borrow(),
        &[
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"22".to_vec())
        ]
    );
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn dropping_a_pending_call_cancels_it() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    c.runner
        .run_until(async move {
            let mut pending = kv.hang_request().send().promise;
            // Make sure the call reached the server and is running there.
            kv.ping_request().send().promise.await?;
            assert!(
                (&mut pending).now_or_never().is_none(),
                "hang never returns"
            );
            drop(pending);
            let mut count = 0;
            for _ in 0..10_000 {
                count = kv
                    .cancelled_request()
                    .send()
                    .promise
                    .await?
                    .get()?
                    .get_count();
                if count > 0 {
                    break;
                }
            }
            assert_eq!(count, 1, "the server dropped the cancelled call");
            Ok::<(), capnp::Error>(())
        })
        .expect("calls");
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn streaming_calls_with_flow_control() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let (bytes, writes) = c
        .runner
        .run_until(async move {
            let sink = kv.sink_request().send().promise.await?.get()?.get_sink()?;
            let chunk = vec![5u8; 16 * 1024];
            for _ in 0..500 {
                let mut w = sink.write_request();
                w.get().set_chunk(&chunk);
                // Resolves once the flow-control window has room.
                w.send().await?;
            }
            let done = sink.done_request().send().promise.await?;
            let r = done.get()?;
            Ok::<(u64, u64), capnp::Error>((r.get_bytes(), r.get_writes()))
        })
        .expect("stream");
    assert_eq!((bytes, writes), (500 * 16 * 1024, 500));
    drop(c);
    assert_eq!(child.wait(), 0);
}

#[test]
fn large_results() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    c.runner
        .run_until(async move {
            // 1 MiB, and 40 MiB: more than the server's 16 MiB region, so
            // its outgoing space grows for the reply.
            for bytes in [1u32 << 20, 40 << 20] {
                let mut req = kv.blob_request();
                req.get().set_bytes(bytes);
                let reply = req.send().promise.await?;
                let data = reply.get()?.get_data()?;
                assert_eq!(data.len(), bytes as usize);
                assert!(data.iter().enumerate().all(|(i, &b)| b == blob_byte(i)));
            }
            Ok::<(), capnp::Error>(())
        })
        .expect("blob");
    drop(c);
    assert_eq!(child.wait(), 0);
}

/// `count` gather calls at once to a server that may hold 8: the server
/// holds every call's parameters until the last arrives. Returns whether
/// they all returned within `wait`, and the server's counters if so.
fn gather(server: NetworkOptions, count: u32, wait: Duration) -> Option<(u32, u64, u64)> {
    let channel = Options::new().max_held(8);
    let (channel, child) = spawn_server(&channel, server);
    let mut c = client(channel, NetworkOptions::new(), None);
    let kv = c.kv.clone();
    let outcome = c.runner.run_until(async move {
        let calls: Vec<_> = (0..count)
            .map(|_| {
                let mut req = kv.gather_request();
                req.get().set_count(count);
                req.get().init_pad(512);
                req.send().promise
            })
            .collect();
        let all = futures::future::try_join_all(calls);
        let timer = std::pin::pin!(sleep(wait));
        match futures::future::select(all, timer).await {
            futures::future::Either::Left((replies, _)) => {
                let replies = replies.expect("gather");
                let arrived = replies[0].get().expect("reply").get_arrived();
                let s = kv
                    .network_stats_request()
                    .send()
                    .promise
                    .await
                    .expect("stats");
                let s = s.get().expect("stats");
                Some((arrived, s.get_in_place(), s.get_copied_out()))
            }
            futures::future::Either::Right(_) => None,
        }
    });
    drop(c);
    child.kill();
    let _ = child.wait();
    outcome
}

/// A timer for the runner: a thread that wakes the task once.
async fn sleep(d: Duration) {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    let _ = rx.await;
}

#[test]
fn held_calls_beyond_the_budget_are_copied_out() {
    let _dog = Watchdog::new(LIMIT);
    let (arrived, in_place, copied) =
        gather(NetworkOptions::new(), 40, LIMIT).expect("all 40 calls returned");
    assert_eq!(arrived, 40);
    // The default budget is half the 8 it may hold: 4 in place at a time.
    assert!(copied >= 36, "in place {in_place}, copied {copied}");
}

#[test]
fn without_the_budget_the_same_calls_stall() {
    let _dog = Watchdog::new(LIMIT);
    // What the budget prevents: the server holds the 8 calls it may, and
    // the ninth can never be sent.
    let outcome = gather(
        NetworkOptions::new().unlimited(),
        40,
        Duration::from_secs(2),
    );
    assert_eq!(outcome, None, "the calls stall without a budget");
}

#[test]
fn a_killed_server_fails_every_pending_call_with_disconnected() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let victim = &child;
    let errors = c.runner.run_until(async move {
        let pending: Vec<_> = (0..3).map(|_| kv.hang_request().send().promise).collect();
        kv.ping_request().send().promise.await.expect("ping");
        victim.kill();
        let mut kinds = Vec::new();
        for p in pending {
            kinds.push(p.await.err().map(|e| e.kind));
        }
        // New calls fail the same way.
        kinds.push(kv.ping_request().send().promise.await.err().map(|e| e.kind));
        kinds
    });
    assert_eq!(errors, vec![Some(ErrorKind::Disconnected); 4]);
    assert_eq!(child.wait(), 128 + libc::SIGKILL);
}

#[test]
fn clean_shutdown_ends_both_rpc_systems() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let disconnector = c.disconnector;
    c.runner
        .run_until(async move {
            kv.ping_request().send().promise.await?;
            disconnector.await
        })
        .expect("disconnect");
    // The server's RpcSystem finished without error: exit code 0.
    assert_eq!(child.wait(), 0);
}

/// The same killed server, with the client under tokio: the hang-up wakes
/// tokio's reactor on the channel's descriptor.
#[cfg(feature = "tokio")]
#[test]
fn under_tokio_a_killed_server_fails_pending_calls() {
    let _dog = Watchdog::new(LIMIT);
    let (channel, child) = spawn_server(&Options::new(), NetworkOptions::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let victim = &child;
    let kinds = rt.block_on(async move {
        let common::Unstarted { system, kv, .. } =
            common::unstarted_client(channel, NetworkOptions::new(), None);
        let calls = async move {
            let mut req = kv.echo_request();
            req.get().set_data(b"before");
            let reply = req.send().promise.await.expect("echo");
            assert_eq!(reply.get().unwrap().get_data().unwrap(), b"before");
            let pending = kv.hang_request().send().promise;
            kv.ping_request().send().promise.await.expect("ping");
            victim.kill();
            vec![pending.await.err().map(|e| e.kind)]
        };
        futures::future::join(calls, system).await.0
    });
    assert_eq!(kinds, vec![Some(ErrorKind::Disconnected)]);
    assert_eq!(child.wait(), 128 + libc::SIGKILL);
}

/// Connected through a listener by path: two servers' worth of clients,
/// each a process of its own, served by one process, one RPC system per
/// accepted channel on one runner.
#[test]
fn a_listener_serves_rpc_clients_in_other_processes() {
    use capnp_rpc::RpcSystem;
    use capnp_shm_rpc::Side;
    use futures::task::LocalSpawnExt;
    let _dog = Watchdog::new(LIMIT);
    let dir = std::env::temp_dir().join(format!("capnp-shm-rpc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("kv.sock");
    let listener = capnp_shm::Listener::bind(&path).expect("bind");
    let clients: Vec<_> = (0..2u8)
        .map(|n| {
            let path = path.clone();
            common::fork(move || {
                common::die_with_parent();
                let channel = capnp_shm::Channel::connect(&path).expect("connect");
                let mut c = client(channel, NetworkOptions::new(), None);
                let kv = c.kv.clone();
                let echoed = c.runner.run_until(async move {
                    let mut req = kv.echo_request();
                    req.get().set_data(&[n; 100]);
                    let reply = req.send().promise.await?;
                    Ok::<Vec<u8>, capnp::Error>(reply.get()?.get_data()?.to_vec())
                });
                i32::from(echoed.ok() != Some(vec![n; 100]))
            })
        })
        .collect();
    let mut runner = capnp_shm_rpc::Runner::new();
    let mut served = Vec::new();
    for _ in 0..2 {
        let channel = listener.accept().expect("accept");
        let service: kv_capnp::key_value::Client =
            capnp_rpc::new_client(kv_service::KeyValue::default());
        let network = capnp_shm_rpc::ShmNetwork::new(channel, Side::Server);
        let system = RpcSystem::new(Box::new(network), Some(service.client));
        served.push(
            runner
                .spawner()
                .spawn_local_with_handle(system)
                .expect("spawn"),
        );
    }
    // Each system ends when its client goes; every client checked its echo.
    for r in runner.run_until(futures::future::join_all(served)) {
        r.expect("served cleanly");
    }
    for child in clients {
        assert_eq!(child.wait(), 0);
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// Many calls in flight on a small channel, both ways at once: sends queue
/// for room (the writer armed) while replies come in (the receive loop
/// waiting), so each direction's doorbell is read away by the other's
/// arming again and again. Every call must return.
fn crowded(drive: fn(&mut common::Client, kv_capnp::key_value::Client) -> u64) {
    let _dog = Watchdog::new(LIMIT);
    let small = Options::new().ring_capacity(8).region_size(256 << 10);
    let (channel, child) = spawn_server(&small, NetworkOptions::new());
    let mut c = client(channel, NetworkOptions::new(), None);
    let kv = c.kv.clone();
    assert_eq!(drive(&mut c, kv), 3000 * 4096);
    assert!(c.counters.get().queued > 0, "sends waited for room");
    drop(c);
    assert_eq!(child.wait(), 0);
}

async fn crowd(kv: kv_capnp::key_value::Client) -> u64 {
    let mut total = 0u64;
    for round in 0..30u8 {
        let calls: Vec<_> = (0..100)
            .map(|_| {
                let mut req = kv.echo_request();
                req.get().set_data(&[round; 4096]);
                req.send().promise
            })
            .collect();
        for reply in futures::future::try_join_all(calls).await.expect("echo") {
            let data = reply.get().expect("reply").get_data().expect("data");
            assert!(data.iter().all(|&b| b == round));
            total += data.len() as u64;
        }
    }
    total
}

#[test]
fn crowded_calls_all_return_under_the_runner() {
    crowded(|c, kv| c.runner.run_until(crowd(kv)));
}

#[cfg(feature = "tokio")]
#[test]
fn crowded_calls_all_return_under_tokio() {
    let _dog = Watchdog::new(LIMIT);
    let small = Options::new().ring_capacity(8).region_size(256 << 10);
    let (channel, child) = spawn_server(&small, NetworkOptions::new());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let (total, queued) = rt.block_on(async move {
        let common::Unstarted {
            system,
            kv,
            disconnector,
            counters,
        } = common::unstarted_client(channel, NetworkOptions::new(), None);
        let work = async move {
            let total = crowd(kv).await;
            disconnector.await.expect("disconnect");
            total
        };
        let total = futures::future::join(work, system).await.0;
        (total, counters.get().queued)
    });
    assert_eq!(total, 3000 * 4096);
    assert!(queued > 0, "sends waited for room");
    assert_eq!(child.wait(), 0);
}

#[test]
fn dropping_the_rpc_system_closes_the_channel_even_while_replies_are_held() {
    let _dog = Watchdog::new(LIMIT);
    let (mut c, child) = connected();
    let kv = c.kv.clone();
    let held = c
        .runner
        .run_until(async move {
            let mut req = kv.echo_request();
            req.get().set_data(&[b'k'; 200]);
            req.send().promise.await
        })
        .expect("echo");
    // The reply is read in place (too large to be carried in its
    // descriptor): it keeps the receiving side, and the channel's mapping,
    // alive after everything else is dropped.
    assert_eq!(c.counters.get().held, 1);
    drop(c);
    // The server still sees the end of the stream and finishes cleanly.
    assert_eq!(child.wait(), 0);
    assert_eq!(
        held.get().expect("reply").get_data().expect("data"),
        &[b'k'; 200][..]
    );
}

/// An idle connection uses no CPU: after a call, the runner spins its 50 µs
/// and then sleeps in `poll(2)`. Sampled from another thread through
/// `/proc`, the runner's thread is asleep (state `S`) nearly every time.
#[test]
fn an_idle_runner_sleeps() {
    let _dog = Watchdog::new(LIMIT);
    let (channel, child) = spawn_server(&Options::new(), NetworkOptions::new());
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
    let runner_thread = std::thread::spawn(move || {
        let tid = std::fs::read_link("/proc/thread-self").expect("thread-self");
        let mut c = client(channel, NetworkOptions::new(), None);
        let kv = c.kv.clone();
        c.runner.run_until(async move {
            kv.ping_request().send().promise.await.expect("ping");
            tid_tx.send(tid).expect("tid");
            // Idle until told to stop (a waker from another thread).
            let _ = stop_rx.await;
        });
    });
    let tid = tid_rx.recv().expect("runner started");
    let stat = std::path::Path::new("/proc").join(tid).join("stat");
    std::thread::sleep(Duration::from_millis(50));
    let mut running = 0;
    for _ in 0..50 {
        let s = std::fs::read_to_string(&stat).expect("stat");
        // The state follows the command name in parentheses.
        let state = s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if state != Some("S") {
            running += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        running <= 2,
        "the idle runner was running in {running} of 50 samples"
    );
    // A waker called from this thread ends the sleep.
    stop_tx.send(()).expect("stop");
    runner_thread.join().expect("runner thread");
    assert_eq!(child.wait(), 0);
}

/// A server killed at a random moment of crowded traffic, 20 times: every
/// call then ends (answered, or failed with `Disconnected`), nothing hangs
/// or panics, and the client's RPC system ends.
#[test]
fn servers_killed_mid_traffic_end_every_call() {
    let _dog = Watchdog::new(LIMIT);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % 20_000);
        let small = Options::new().ring_capacity(16).region_size(256 << 10);
        let (channel, child) = spawn_server(&small, NetworkOptions::new());
        let mut c = client(channel, NetworkOptions::new(), None);
        let kv = c.kv.clone();
        let victim = &child;
        let (answered, disconnected) = std::thread::scope(|scope| {
            scope.spawn(move || {
                std::thread::sleep(delay);
                victim.kill();
            });
            c.runner.run_until(async move {
                let calls: Vec<_> = (0..400)
                    .map(|i: u32| {
                        let mut req = kv.echo_request();
                        req.get().set_data(&i.to_le_bytes().repeat(256));
                        req.send().promise
                    })
                    .collect();
                let mut answered = 0u32;
                let mut disconnected = 0u32;
                for (i, call) in calls.into_iter().enumerate() {
                    match call.await {
                        Ok(reply) => {
                            let data = reply.get().expect("reply").get_data().expect("data");
                            assert_eq!(data, &(i as u32).to_le_bytes().repeat(256)[..]);
                            answered += 1;
                        }
                        Err(e) => {
                            assert_eq!(e.kind, ErrorKind::Disconnected, "round {round}: {e}");
                            disconnected += 1;
                        }
                    }
                }
                (answered, disconnected)
            })
        });
        assert_eq!(answered + disconnected, 400, "round {round}");
        eprintln!("round {round}: {answered} answered, {disconnected} disconnected");
        let status = child.wait();
        // Killed, or finished first and exited cleanly.
        assert!(
            status == 128 + libc::SIGKILL || status == 0,
            "round {round}: {status}"
        );
        drop(c);
    }
}
