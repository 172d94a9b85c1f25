//! Heap allocations the network adds per received message: the one box
//! capnp-rpc's `Connection::receive_incoming_message` requires, nothing
//! else, for a message read in place or carried in its descriptor (once
//! the receiver has the buffer carried messages are copied into); and none
//! to release it.

use capnp_rpc::{rpc_twoparty_capnp::Side, VatNetwork};
use capnp_shm::Channel;
use capnp_shm_rpc::ShmNetwork;
use futures::FutureExt;

#[path = "../../tests/common/counting_alloc.rs"]
mod counting_alloc;

#[test]
fn one_box_per_received_message_and_none_to_release_it() {
    let (a, b) = Channel::pair().expect("pair");
    let mut network = ShmNetwork::new(b, Side::Client);
    let mut connection = network
        .accept()
        .now_or_never()
        .expect("accept resolves at once")
        .expect("connection");
    const N: u64 = 1000;
    // Two words of list are carried in the descriptor; twenty are read in
    // place. Every other message is of each kind.
    let len = |n: u64| if n % 2 == 0 { 2 } else { 20 };
    let mut total = 0u64;
    for n in 0..N {
        // The peer sends (its allocations are not the network's).
        let mut m = a.message();
        let list: Vec<u64> = (n..n + len(n)).collect();
        m.set_root::<capnp::primitive_list::Owned<u64>>(&list[..])
            .expect("build");
        a.send(m).map_err(|e| e.into_error()).expect("send");
        // Counted in this thread only: the test harness's own threads
        // may allocate meanwhile (this test failed so, now and then).
        let before = counting_alloc::this_thread();
        let incoming = connection
            .receive_incoming_message()
            .now_or_never()
            .expect("a message is there: ready at once")
            .expect("receive")
            .expect("not the end");
        let body = incoming.get_body().expect("body");
        let list: capnp::primitive_list::Reader<'_, u64> = body.get_as().expect("list");
        assert_eq!(u64::from(list.len()), len(n));
        total += list.get(0) + list.get(1);
        drop(incoming);
        let after = counting_alloc::this_thread();
        // The first carried message also gets the buffer that the carried
        // messages after it reuse (capnp-shm keeps it when one drops).
        let warm_up = u64::from(n == 0);
        assert_eq!(
            after - before,
            1 + warm_up,
            "message {n}: only the Box<dyn IncomingMessage>"
        );
    }
    assert_eq!(total, N * N);
    let counters = network.counters().get();
    assert_eq!(counters.received_in_place, N / 2);
    assert_eq!(counters.received_private, N / 2);
    assert_eq!(counters.held, 0);
}

/// A runner that sleeps (spin 0: every wait that finds nothing to do ends
/// in `poll(2)`) and is woken from another thread allocates nothing for the
/// sleep: a wait is on the path of every message that finds its receiver
/// idle.
#[test]
fn a_runner_sleeps_and_wakes_without_allocating() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Poll, Waker};
    use std::time::Duration;

    const WARMUP: u32 = 10;
    const SLEEPS: u32 = 100;
    let parked: Arc<Mutex<Option<Waker>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    // Wakes whatever waker is parked, a little later: by then the runner,
    // which never spins, is asleep in `poll`.
    let waking = {
        let (parked, done) = (Arc::clone(&parked), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
                let waker = parked.lock().expect("lock").take();
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        })
    };
    let mut runner = capnp_shm_rpc::Runner::new().with_spin(Duration::ZERO);
    let mut polls = 0u32;
    let mut before = 0u64;
    runner.run_until(std::future::poll_fn(|cx| {
        if polls == WARMUP {
            before = counting_alloc::this_thread();
        }
        if polls == WARMUP + SLEEPS {
            return Poll::Ready(());
        }
        polls += 1;
        *parked.lock().expect("lock") = Some(cx.waker().clone());
        Poll::Pending
    }));
    let allocated = counting_alloc::this_thread() - before;
    done.store(true, Ordering::Relaxed);
    waking.join().expect("waking thread");
    assert_eq!(polls, WARMUP + SLEEPS);
    assert_eq!(allocated, 0, "allocations in {SLEEPS} sleeps and wakes");
}
