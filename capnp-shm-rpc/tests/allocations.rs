//! Heap allocations the network adds per received message: the one box
//! capnp-rpc's `Connection::receive_incoming_message` requires, nothing
//! else, while the message is read in place; and none to release it.

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
    let mut total = 0u64;
    for n in 0..N {
        // The peer sends (its allocations are not the network's).
        let mut m = a.message();
        m.set_root::<capnp::primitive_list::Owned<u64>>(&[n, n + 1][..])
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
        total += list.get(0) + list.get(1);
        drop(incoming);
        let after = counting_alloc::this_thread();
        assert_eq!(
            after - before,
            1,
            "message {n}: only the Box<dyn IncomingMessage>"
        );
    }
    assert_eq!(total, N * N);
    assert_eq!(network.counters().get().received_in_place, N);
    assert_eq!(network.counters().get().held, 0);
}
