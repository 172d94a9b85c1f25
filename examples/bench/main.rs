//! capnp-shm against Cap'n Proto over a Unix socket, side by side, in one run.
//!
//! ```text
//! cargo run --release --example bench                  # full run, a few minutes
//! cargo run --release --example bench -- --quick       # smoke run, seconds
//! cargo run --release --example bench -- --json r.json --svg chart.svg
//! ```
//!
//! Every measurement forks a peer process. Two transports do the same work:
//!
//! - `shm`: this crate (`Channel::pair`, then fork);
//! - `socket`: what a user would pick instead: `capnp::serialize::write_message`
//!   into a `BufWriter<UnixStream>` flushed per message, and
//!   `capnp::serialize::read_message` from a `BufReader<UnixStream>`.
//!
//! Messages are real Cap'n Proto structs (`bench.capnp`). The receiver reads
//! every byte it is sent (a checksum over the payload, checked against the
//! sender's) on both transports.
//!
//! Beside them, the same run measures physical floors ([`floors`]), the
//! best any transport could do here, and shows `shm/floor` for the rows
//! that have one:
//!
//! - spin floor: one cache line bounced between two spinning processes
//!   (parent and forked child, as above), for "round trip 64 B";
//! - futex floor: the same ping-pong with a `FUTEX_WAIT` and a `FUTEX_WAKE`
//!   on every hop, for "round trip 64 B no spin";
//! - memcpy of 1 MiB into a reused buffer in one process, for the one-way
//!   bandwidth rows; "sum", the receiver's checksum over 1 MiB alone; and
//!   "zero+copy+sum", all that a 1 MiB message does to its bytes, done
//!   in one process;
//! - 1 MiB over a bare pipe between two processes (`floors::pipe_floor`):
//!   the peer copies the payload into one of a few 1 MiB slots in shared
//!   memory (zeroing the slot first, in the second of the two), we sum it
//!   in place; the bytes cross from one core to the other as the one-way
//!   1 MiB row's must, with nothing else;
//! - capnp building the 64 B message in one process on a reused buffer,
//!   with no transport: no sender that builds each message sends faster;
//! - the one-way 64 B workload over a bare ring in shared memory between
//!   two processes (the message built as above, its segment copied into a
//!   slot, read in place), for "one-way 64 B messages": a transport with
//!   no validation, no sleeping and no space to manage, on the machine as
//!   it is during the run;
//! - capnp's work in a 64 B round trip (build, read, build the answer,
//!   read it) in one process: a round trip costs at least this plus the
//!   spin floor, as the two sides of a ping-pong never work at once; and
//!   the same round trip between two processes over a bare ring (one slot
//!   each way, the message and its tag on the same lines).
//!
//! The core rows (round trip 64 B with and without spinning, one-way 64 B
//! messages, one-way 1 MiB, and the floors) run in several repetitions,
//! interleaved (floor, shm, socket, floor, ...); the table shows their
//! median and the spread of the shm figure (highest over lowest). Where the
//! spin floor's two processes ran (`sched_getcpu`) is printed under the
//! table, with what the floor suggests about the host's cores.

#![allow(unsafe_code)] // fork and waitpid; the floors' mmap and futex.

#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::cast_possible_truncation,
    clippy::undocumented_unsafe_blocks,
    clippy::missing_safety_doc
)]
#[rustfmt::skip]
mod bench_capnp;
// The RPC rows' service, shared with capnp-shm-rpc's tests and examples.
#[path = "../../capnp-shm-rpc/schema/kv_capnp.rs"]
#[allow(clippy::all, unused, missing_docs, missing_debug_implementations)]
#[rustfmt::skip]
mod kv_capnp;
mod floors;
#[path = "../../capnp-shm-rpc/schema/kv_service.rs"]
#[allow(dead_code)]
mod kv_service;
mod rpc;

use std::fmt::Write as _;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bench_capnp::{blob, order};
use capnp::message::ReaderOptions;
use capnp_shm::{Channel, Options};

// ---- allocation counting -------------------------------------------------

// Counts heap allocations, so the table can show allocations per message.
#[path = "../../tests/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::ALLOCATIONS;

// ---- the two transports ----------------------------------------------------

/// One end of a transport, as the workloads use it.
trait Link {
    /// Sends a blob: `seq` and a payload.
    fn send_blob(&mut self, seq: u64, payload: &[u8]);
    /// Receives a blob; returns `(seq, checksum of the payload)`, `None` when
    /// the peer has gone.
    fn recv_blob(&mut self) -> Option<(u64, u64)>;
    /// Sends order number `seq` (50 line items).
    fn send_order(&mut self, seq: u64);
    /// Receives an order; returns `(seq, checksum over every field)`.
    fn recv_order(&mut self) -> Option<(u64, u64)>;
    /// Sends a payload of any size, in blobs (see [`fill_chunks`]).
    fn send_chunks(&mut self, seq: u64, payload: &[u8]);
    /// Receives one; returns `(seq, checksum of the payload)`.
    fn recv_chunks(&mut self) -> Option<(u64, u64)>;
}

/// A capnp blob holds less than 512 MiB: larger payloads go in pieces of
/// this many bytes (a multiple of 8, so the checksums of the pieces add up
/// to the checksum of the whole).
const CHUNK: usize = 256 << 20;

/// A list of byte lists written in place: list 0 holds `seq`, the others
/// the payload in pieces of at most [`CHUNK`] bytes.
type Chunks<'a> = capnp::list_list::Builder<'a, capnp::primitive_list::Owned<u8>>;
type ChunksReader<'a> = capnp::list_list::Reader<'a, capnp::primitive_list::Owned<u8>>;

fn fill_chunks<A: capnp::message::Allocator>(
    m: &mut capnp::message::Builder<A>,
    seq: u64,
    payload: &[u8],
) {
    let pieces = u32::try_from(payload.len().div_ceil(CHUNK)).expect("pieces");
    let mut root = m.initn_root::<Chunks<'_>>(pieces + 1);
    let mut write = |i: u32, bytes: &[u8]| {
        let len = u32::try_from(bytes.len()).expect("a piece");
        let mut list = root.reborrow().init(i, len);
        list.as_slice().expect("bytes").copy_from_slice(bytes);
    };
    write(0, &seq.to_le_bytes());
    for (i, piece) in (1..).zip(payload.chunks(CHUNK)) {
        write(i, piece);
    }
}

fn read_chunks<S: capnp::message::ReaderSegments>(m: &capnp::message::Reader<S>) -> (u64, u64) {
    let root: ChunksReader<'_> = m.get_root().expect("chunks");
    let mut pieces = root.iter().map(|p| p.expect("piece"));
    let seq = pieces.next().expect("seq");
    let seq = u64::from_le_bytes(seq.as_slice().expect("bytes").try_into().expect("8 bytes"));
    let sum = pieces.fold(0u64, |sum, p| {
        sum.wrapping_add(checksum(p.as_slice().expect("bytes")))
    });
    (seq, sum)
}

/// Sum of the payload as little-endian words: touches every byte.
fn checksum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut sum = 0u64;
    for w in &mut words {
        sum = sum.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
    }
    for &b in words.remainder() {
        sum = sum.wrapping_add(u64::from(b));
    }
    sum
}

fn fill_blob<A: capnp::message::Allocator>(
    m: &mut capnp::message::Builder<A>,
    seq: u64,
    payload: &[u8],
) {
    let mut b = m.init_root::<blob::Builder<'_>>();
    b.set_seq(seq);
    b.set_payload(payload);
}

fn read_blob<S: capnp::message::ReaderSegments>(m: &capnp::message::Reader<S>) -> (u64, u64) {
    let b = m.get_root::<blob::Reader<'_>>().expect("blob");
    (b.get_seq(), checksum(b.get_payload().expect("payload")))
}

const ITEMS: u32 = 50;

fn fill_order<A: capnp::message::Allocator>(m: &mut capnp::message::Builder<A>, seq: u64) {
    let mut o = m.init_root::<order::Builder<'_>>();
    o.set_id(seq);
    o.set_placed_at_micros(1_700_000_000_000_000 + seq);
    o.set_note("leave at the door; ring twice");
    {
        let mut c = o.reborrow().init_customer();
        c.set_id(seq % 1000);
        c.set_name("Ada Lovelace");
        c.set_email("ada@example.org");
        let mut a = c.init_address();
        a.set_street("12 Analytical Row");
        a.set_city("London");
        a.set_postcode("NW1 2DB");
        a.set_country("GB");
    }
    let mut items = o.init_items(ITEMS);
    for i in 0..ITEMS {
        let mut item = items.reborrow().get(i);
        item.set_sku("SKU-000123-XL");
        item.set_description("stainless steel widget, extra large");
        item.set_quantity(1 + i % 5);
        item.set_unit_price_cents(1999 + u64::from(i));
        item.set_discount(0.05);
        let mut tags = item.init_tags(2);
        tags.set(0, "hardware");
        tags.set(1, "fragile");
    }
}

fn read_order<S: capnp::message::ReaderSegments>(m: &capnp::message::Reader<S>) -> (u64, u64) {
    let o = m.get_root::<order::Reader<'_>>().expect("order");
    let text = |t: capnp::Result<capnp::text::Reader<'_>>| checksum(t.expect("text").as_bytes());
    let mut sum = o.get_placed_at_micros().wrapping_add(text(o.get_note()));
    let c = o.get_customer().expect("customer");
    sum = sum.wrapping_add(c.get_id()) ^ text(c.get_name()) ^ text(c.get_email());
    let a = c.get_address().expect("address");
    sum = sum.wrapping_add(
        text(a.get_street()) ^ text(a.get_city()) ^ text(a.get_postcode()) ^ text(a.get_country()),
    );
    for item in o.get_items().expect("items") {
        sum = sum
            .wrapping_add(text(item.get_sku()))
            .wrapping_add(text(item.get_description()))
            .wrapping_add(u64::from(item.get_quantity()))
            .wrapping_add(item.get_unit_price_cents())
            .wrapping_add(u64::from(item.get_discount().to_bits()));
        for tag in item.get_tags().expect("tags") {
            sum = sum.wrapping_add(text(tag));
        }
    }
    (o.get_id(), sum)
}

struct ShmLink(Channel);

impl Link for ShmLink {
    fn send_blob(&mut self, seq: u64, payload: &[u8]) {
        let mut m = self.0.message();
        fill_blob(&mut m, seq, payload);
        self.0.send(m).expect("shm send");
    }
    fn recv_blob(&mut self) -> Option<(u64, u64)> {
        let m = self.0.recv().ok()?;
        Some(read_blob(m.reader()))
    }
    fn send_order(&mut self, seq: u64) {
        let mut m = self.0.message();
        fill_order(&mut m, seq);
        self.0.send(m).expect("shm send");
    }
    fn recv_order(&mut self) -> Option<(u64, u64)> {
        let m = self.0.recv().ok()?;
        Some(read_order(m.reader()))
    }
    fn send_chunks(&mut self, seq: u64, payload: &[u8]) {
        let mut m = self.0.message();
        fill_chunks(&mut m, seq, payload);
        self.0.send(m).expect("shm send");
    }
    fn recv_chunks(&mut self) -> Option<(u64, u64)> {
        let m = self.0.recv().ok()?;
        Some(read_chunks(m.reader()))
    }
}

/// Plain capnp over a socket: a `BufWriter` flushed per message, a
/// `BufReader`.
struct SocketLink<S: Read + Write> {
    reader: BufReader<S>,
    writer: BufWriter<S>,
}

impl SocketLink<UnixStream> {
    fn new(stream: UnixStream) -> SocketLink<UnixStream> {
        let other = stream.try_clone().expect("clone socket");
        SocketLink {
            reader: BufReader::new(stream),
            writer: BufWriter::new(other),
        }
    }
}

impl SocketLink<TcpStream> {
    /// With `TCP_NODELAY`, as a latency-minded user would set it.
    fn tcp(stream: TcpStream) -> SocketLink<TcpStream> {
        stream.set_nodelay(true).expect("nodelay");
        let other = stream.try_clone().expect("clone socket");
        SocketLink {
            reader: BufReader::new(stream),
            writer: BufWriter::new(other),
        }
    }
}

impl<S: Read + Write> SocketLink<S> {
    fn write(&mut self, m: &capnp::message::Builder<capnp::message::HeapAllocator>) {
        capnp::serialize::write_message(&mut self.writer, m).expect("socket write");
        self.writer.flush().expect("socket flush");
    }

    fn read(&mut self) -> Option<capnp::message::Reader<capnp::serialize::OwnedSegments>> {
        let options = *ReaderOptions::new().traversal_limit_in_words(None);
        capnp::serialize::read_message(&mut self.reader, options).ok()
    }
}

impl<S: Read + Write> Link for SocketLink<S> {
    fn send_blob(&mut self, seq: u64, payload: &[u8]) {
        let mut m = capnp::message::Builder::new_default();
        fill_blob(&mut m, seq, payload);
        self.write(&m);
    }
    fn recv_blob(&mut self) -> Option<(u64, u64)> {
        self.read().map(|m| read_blob(&m))
    }
    fn send_order(&mut self, seq: u64) {
        let mut m = capnp::message::Builder::new_default();
        fill_order(&mut m, seq);
        self.write(&m);
    }
    fn recv_order(&mut self) -> Option<(u64, u64)> {
        self.read().map(|m| read_order(&m))
    }
    fn send_chunks(&mut self, seq: u64, payload: &[u8]) {
        let mut m = capnp::message::Builder::new_default();
        fill_chunks(&mut m, seq, payload);
        self.write(&m);
    }
    fn recv_chunks(&mut self) -> Option<(u64, u64)> {
        self.read().map(|m| read_chunks(&m))
    }
}

// ---- processes ---------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Shm,
    Socket,
    /// This crate's stream transport over TCP loopback.
    TcpStream,
    /// Plain `capnp::serialize` over TCP loopback.
    TcpPlain,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Socket => "socket",
            Transport::TcpStream => "tcp stream",
            Transport::TcpPlain => "tcp plain",
        }
    }
}

/// Two connected TCP sockets on loopback.
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    (a, b)
}

/// Forks a peer running `peer` on its end of a new connection and runs
/// `main` on ours; waits for the peer and checks it exited cleanly.
fn with_peer<R>(
    transport: Transport,
    options: &Options,
    peer: impl FnOnce(&mut dyn Link),
    main: impl FnOnce(&mut dyn Link) -> R,
) -> R {
    type End = Box<dyn Link>;
    let (ours, theirs): (End, End) = match transport {
        Transport::Shm => {
            let (a, b) = Channel::pair_with(options).expect("channel pair");
            (Box::new(ShmLink(a)), Box::new(ShmLink(b)))
        }
        Transport::Socket => {
            let (a, b) = UnixStream::pair().expect("socketpair");
            (Box::new(SocketLink::new(a)), Box::new(SocketLink::new(b)))
        }
        Transport::TcpStream => {
            let (a, b) = tcp_pair();
            let a = Channel::from_tcp_with(a, options).expect("tcp channel");
            let b = Channel::from_tcp_with(b, options).expect("tcp channel");
            (Box::new(ShmLink(a)), Box::new(ShmLink(b)))
        }
        Transport::TcpPlain => {
            let (a, b) = tcp_pair();
            (Box::new(SocketLink::tcp(a)), Box::new(SocketLink::tcp(b)))
        }
    };
    fork_peer(
        ours,
        theirs,
        |mut link| {
            peer(&mut *link);
            0
        },
        |mut link| main(&mut *link),
        "peer process",
    )
}

/// Forks a peer: the child drops `ours`, runs `peer` on `theirs` and exits
/// with the code it returns; here, `theirs` is dropped and `main` runs on
/// `ours` (dropped when it returns); then waits for the child and checks it
/// exited with 0 (`what` names it if not).
fn fork_peer<E, R>(
    ours: E,
    theirs: E,
    peer: impl FnOnce(E) -> i32,
    main: impl FnOnce(E) -> R,
    what: &str,
) -> R {
    let mut ours = Some(ours);
    let mut theirs = Some(theirs);
    // SAFETY: this program is single-threaded (no runtime exists yet); the
    // child runs `peer` and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        floors::place_peer();
        drop(ours.take());
        let code = peer(theirs.take().expect("peer end"));
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(theirs.take());
    let result = main(ours.take().expect("our end"));
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed (status {status:#x})"
    );
    result
}

/// Forks one worker per connection, each running `worker` on its end; runs
/// `serve` on all our ends; waits for every worker and checks each exited
/// cleanly. Each worker drops every end but its own.
fn with_workers<E, R>(ends: Vec<(E, E)>, worker: impl Fn(E), serve: impl FnOnce(Vec<E>) -> R) -> R {
    let mut ours = Vec::new();
    let mut theirs: Vec<Option<E>> = Vec::new();
    for (a, b) in ends {
        ours.push(Some(a));
        theirs.push(Some(b));
    }
    let mut pids = Vec::new();
    for i in 0..theirs.len() {
        // SAFETY: this program is single-threaded; the child runs `worker`
        // and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mine = theirs[i].take().expect("worker end");
            ours.clear();
            theirs.clear();
            worker(mine);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        pids.push(pid);
        drop(theirs[i].take());
    }
    let result = serve(ours.into_iter().flatten().collect());
    for pid in pids {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "worker failed (status {status:#x})"
        );
    }
    result
}

/// Requests per second of a pool: `workers` forked workers each send
/// `per_worker` 64-byte requests and wait for every answer; this process
/// serves them all, waiting on every connection at once (shm: `wait_any`;
/// socket: `poll`).
fn worker_pool(transport: Transport, options: &Options, workers: usize, per_worker: u64) -> f64 {
    let payload = payload(64);
    let expected = checksum(&payload);
    let worker = |link: &mut dyn Link| {
        for seq in 0..per_worker {
            link.send_blob(seq, &payload);
            let (answer, _) = link.recv_blob().expect("answer");
            assert_eq!(answer, seq ^ expected, "wrong answer");
        }
    };
    let start = Instant::now();
    let served = match transport {
        Transport::TcpStream | Transport::TcpPlain => unreachable!("no TCP pool rows"),
        Transport::Shm => {
            let ends = (0..workers)
                .map(|_| Channel::pair_with(options).expect("pair"))
                .collect();
            with_workers(
                ends,
                |end| worker(&mut ShmLink(end)),
                |ends| {
                    let mut live: Vec<Channel> = ends;
                    let mut served = 0u64;
                    while !live.is_empty() {
                        let refs: Vec<&Channel> = live.iter().collect();
                        capnp_shm::wait_any(&refs, None).expect("wait_any");
                        // Serve every ready channel, in turn.
                        let mut gone = Vec::new();
                        for (i, c) in live.iter().enumerate() {
                            match c.try_recv() {
                                Ok(m) => {
                                    let (seq, sum) = read_blob(m.reader());
                                    drop(m);
                                    let mut reply = c.message();
                                    fill_blob(&mut reply, seq ^ sum, &[]);
                                    c.send(reply).expect("reply");
                                    served += 1;
                                }
                                Err(capnp_shm::TryRecvError::Empty) => {}
                                Err(capnp_shm::TryRecvError::Disconnected) => gone.push(i),
                                Err(e) => panic!("serve: {e}"),
                            }
                        }
                        for i in gone.into_iter().rev() {
                            live.remove(i);
                        }
                    }
                    served
                },
            )
        }
        Transport::Socket => {
            let ends = (0..workers)
                .map(|_| UnixStream::pair().expect("socketpair"))
                .collect();
            with_workers(
                ends,
                |end| worker(&mut SocketLink::new(end)),
                |ends| {
                    use std::os::fd::AsRawFd;
                    let mut live: Vec<SocketLink<UnixStream>> =
                        ends.into_iter().map(SocketLink::new).collect();
                    let mut served = 0u64;
                    while !live.is_empty() {
                        let mut fds: Vec<libc::pollfd> = live
                            .iter()
                            .map(|l| libc::pollfd {
                                fd: l.reader.get_ref().as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            })
                            .collect();
                        let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
                        // SAFETY: `fds` holds `n` valid pollfds.
                        unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
                        let mut gone = Vec::new();
                        for (i, (l, p)) in live.iter_mut().zip(&fds).enumerate() {
                            if p.revents == 0 {
                                continue;
                            }
                            match l.recv_blob() {
                                Some((seq, sum)) => {
                                    l.send_blob(seq ^ sum, &[]);
                                    served += 1;
                                }
                                None => gone.push(i),
                            }
                        }
                        for i in gone.into_iter().rev() {
                            live.remove(i);
                        }
                    }
                    served
                },
            )
        }
    };
    assert_eq!(served, workers as u64 * per_worker, "requests lost");
    served as f64 / start.elapsed().as_secs_f64()
}

// ---- workloads ---------------------------------------------------------------

/// Round-trip latencies in nanoseconds: we send a blob of `size` bytes, the
/// peer checksums it and answers with the checksum.
fn round_trips(
    transport: Transport,
    options: &Options,
    size: usize,
    warmup: u64,
    count: u64,
) -> Vec<u64> {
    let payload = payload(size);
    let expected = checksum(&payload);
    with_peer(
        transport,
        options,
        |link| {
            while let Some((seq, sum)) = link.recv_blob() {
                link.send_blob(seq ^ sum, &[]);
            }
        },
        |link| {
            let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for seq in 0..warmup + count {
                let t = Instant::now();
                link.send_blob(seq, &payload);
                let (answer, _) = link.recv_blob().expect("reply");
                let elapsed = t.elapsed();
                assert_eq!(answer, seq ^ expected, "peer read wrong bytes");
                if seq >= warmup {
                    samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                }
            }
            samples
        },
    )
}

/// Round trips of orders; latencies in nanoseconds, and allocations per
/// round trip counted in this process.
fn order_round_trips(
    transport: Transport,
    options: &Options,
    warmup: u64,
    count: u64,
) -> (Vec<u64>, f64) {
    with_peer(
        transport,
        options,
        |link| {
            while let Some((seq, _)) = link.recv_order() {
                link.send_order(seq);
            }
        },
        |link| {
            let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            let mut allocations = 0;
            for seq in 0..warmup + count {
                let before = ALLOCATIONS.load(Ordering::Relaxed);
                let t = Instant::now();
                link.send_order(seq);
                let (answer, _) = link.recv_order().expect("reply");
                let elapsed = t.elapsed();
                assert_eq!(answer, seq);
                if seq >= warmup {
                    samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                    allocations += ALLOCATIONS.load(Ordering::Relaxed) - before;
                }
            }
            (samples, allocations as f64 / count as f64)
        },
    )
}

/// One-way throughput: the peer sends `count` blobs of `size` bytes as fast as
/// it can; we receive and checksum each. Returns (messages/s, bytes/s,
/// allocations per message received here).
fn throughput(transport: Transport, options: &Options, size: usize, count: u64) -> (f64, f64, f64) {
    let payload = payload(size);
    let expected = checksum(&payload);
    with_peer(
        transport,
        options,
        |link| {
            for seq in 0..count {
                link.send_blob(seq, &payload);
            }
        },
        |link| {
            // The clock starts at the first message, so set-up is not counted.
            let (first, sum) = link.recv_blob().expect("first");
            assert_eq!((first, sum), (0, expected));
            let allocations_before = ALLOCATIONS.load(Ordering::Relaxed);
            let start = Instant::now();
            for seq in 1..count {
                let (got, sum) = link.recv_blob().expect("message");
                assert_eq!(got, seq, "lost or reordered");
                assert_eq!(sum, expected, "corrupted");
            }
            let secs = start.elapsed().as_secs_f64();
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
            let n = (count - 1) as f64;
            (n / secs, n * size as f64 / secs, allocations as f64 / n)
        },
    )
}

/// Large messages, in pieces (see [`fill_chunks`]): round-trip latencies
/// in nanoseconds (we send, the peer checksums and answers with a small
/// message), then one-way bytes per second over `count` messages.
fn large(
    transport: Transport,
    options: &Options,
    size: usize,
    trips: u64,
    count: u64,
) -> (Vec<u64>, f64) {
    let payload = payload(size);
    let expected = checksum(&payload);
    with_peer(
        transport,
        options,
        |link| {
            for _ in 0..trips {
                let Some((seq, sum)) = link.recv_chunks() else {
                    return;
                };
                link.send_chunks(seq ^ sum, &[]);
            }
            for seq in 0..count {
                link.send_chunks(seq, &payload);
            }
        },
        |link| {
            let mut samples = Vec::new();
            for seq in 0..trips {
                let t = Instant::now();
                link.send_chunks(seq, &payload);
                let (answer, _) = link.recv_chunks().expect("reply");
                let elapsed = t.elapsed();
                assert_eq!(answer, seq ^ expected, "peer read wrong bytes");
                samples.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
            }
            let (first, sum) = link.recv_chunks().expect("first");
            assert_eq!((first, sum), (0, expected));
            let start = Instant::now();
            for seq in 1..count {
                let (got, sum) = link.recv_chunks().expect("message");
                assert_eq!((got, sum), (seq, expected), "lost or corrupted");
            }
            let n = (count - 1) as f64;
            (samples, n * size as f64 / start.elapsed().as_secs_f64())
        },
    )
}

/// One-way throughput of orders, in messages per second.
fn order_throughput(transport: Transport, options: &Options, count: u64) -> f64 {
    with_peer(
        transport,
        options,
        |link| {
            for seq in 0..count {
                link.send_order(seq);
            }
        },
        |link| {
            let (first, reference) = link.recv_order().expect("first");
            assert_eq!(first, 0);
            let start = Instant::now();
            for seq in 1..count {
                let (got, sum) = link.recv_order().expect("order");
                assert_eq!(got, seq);
                std::hint::black_box((sum, reference));
            }
            (count - 1) as f64 / start.elapsed().as_secs_f64()
        },
    )
}

fn payload(size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)).to_le_bytes()[0])
        .collect()
}

// The rank is finite, non-negative and below the slice length.
#[allow(clippy::cast_possible_truncation)]
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

// ---- results -----------------------------------------------------------------

/// One row of the table: a workload measured on both transports.
struct Row {
    workload: String,
    unit: &'static str,
    /// Whether a lower figure is better (latencies, allocations).
    lower_is_better: bool,
    shm: f64,
    /// NaN for the floor rows, which have no socket figure.
    socket: f64,
    /// What the hardware allows for this workload, in the same unit (see
    /// [`floors`]); `None` when it has no natural floor.
    floor: Option<f64>,
    /// The shm figure of each interleaved repetition (of every run, once
    /// summarised); empty when the row is measured once per run.
    shm_reps: Vec<f64>,
    /// Over several runs: the lowest and highest advantage.
    advantage_range: Option<(f64, f64)>,
}

impl Row {
    /// A row where a lower figure is better (latencies, allocations).
    fn lower(workload: impl Into<String>, unit: &'static str, shm: f64, socket: f64) -> Row {
        Row {
            workload: workload.into(),
            unit,
            lower_is_better: true,
            shm,
            socket,
            floor: None,
            shm_reps: Vec::new(),
            advantage_range: None,
        }
    }

    /// A row where a higher figure is better (rates, bandwidth).
    fn higher(workload: impl Into<String>, unit: &'static str, shm: f64, socket: f64) -> Row {
        Row {
            lower_is_better: false,
            ..Row::lower(workload, unit, shm, socket)
        }
    }

    /// Sets the floor this row's shm figure is compared with.
    fn with_floor(self, floor: f64) -> Row {
        Row {
            floor: Some(floor),
            ..self
        }
    }

    /// Records the shm figure of each repetition.
    fn with_reps(self, shm: &Repeated) -> Row {
        Row {
            shm_reps: shm.0.clone(),
            ..self
        }
    }

    fn ratio(&self) -> f64 {
        self.shm / self.socket
    }

    /// How many times better shm is (above 1: shm wins).
    fn advantage(&self) -> f64 {
        if self.lower_is_better {
            self.socket / self.shm
        } else {
            self.shm / self.socket
        }
    }

    /// shm over its floor: above 1 for latencies, below 1 for bandwidth.
    fn floor_ratio(&self) -> Option<f64> {
        self.floor.map(|f| self.shm / f)
    }

    /// The highest shm figure of the repetitions over the lowest: 1.00 is
    /// steady; `None` when measured once.
    fn spread(&self) -> Option<f64> {
        if self.shm_reps.len() < 2 {
            return None;
        }
        let lo = self.shm_reps.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = self
            .shm_reps
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        Some(hi / lo)
    }
}

/// One figure measured in several interleaved repetitions, one value each.
#[derive(Debug, Clone, Default)]
struct Repeated(Vec<f64>);

impl Repeated {
    fn median(&self) -> f64 {
        median(self.0.clone())
    }
}

/// The middle value (the upper middle of an even count); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// p50, p99 and p99.9 of latencies in nanoseconds, in microseconds.
fn percentiles(mut samples: Vec<u64>) -> [f64; 3] {
    samples.sort_unstable();
    [50.0, 99.0, 99.9].map(|p| percentile(&samples, p))
}

fn fmt_figure(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn print_table(rows: &[Row], runs: usize) {
    println!();
    println!(
        "{:<36} {:>12} {:>12} {:<9} {:>10} {:>10} {:>9} {:>6} {:>15}",
        "workload",
        "shm",
        "socket",
        "unit",
        "shm/socket",
        "shm better",
        "shm/floor",
        "spread",
        if runs > 1 { "over runs" } else { "" }
    );
    println!("{}", "-".repeat(if runs > 1 { 126 } else { 110 }));
    for r in rows {
        let over_runs = match r.advantage_range {
            Some((lo, hi)) if runs > 1 => {
                format!("{}-{}", fmt_advantage(lo), fmt_advantage(hi))
            }
            _ => String::new(),
        };
        println!(
            "{:<36} {:>12} {:>12} {:<9} {:>10} {:>10} {:>9} {:>6} {:>15}",
            r.workload,
            fmt_figure(r.shm),
            fmt_figure(r.socket),
            r.unit,
            fmt_ratio(r.ratio()),
            fmt_advantage(r.advantage()),
            r.floor_ratio().map_or("-".into(), fmt_ratio),
            r.spread().map_or("-".into(), fmt_spread),
            over_runs
        );
    }
    println!();
}

/// "1.08"; "123" from 100 up.
fn fmt_spread(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// "0.123"; "-" when there is nothing to divide by.
fn fmt_ratio(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "-".into()
    }
}

/// "12.3x"; "1000x+" past that (an allocation count near zero, say); "-"
/// when there is no socket figure.
fn fmt_advantage(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 1000.0 {
        "1000x+".into()
    } else {
        format!("{v:.1}x")
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_option(v: Option<f64>) -> String {
    v.map_or("null".into(), json_number)
}

fn to_json(rows: &[Row], quick: bool, runs: usize) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"quick\": {quick},");
    let _ = writeln!(s, "  \"runs\": {runs},");
    s.push_str("  \"results\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"workload\": {}, \"unit\": {}, \"lower_is_better\": {}, \"shm\": {}, \"socket\": {}, \"ratio_shm_over_socket\": {}, \"shm_advantage\": {}, \"shm_advantage_min\": {}, \"shm_advantage_max\": {}, \"floor\": {}, \"ratio_shm_over_floor\": {}, \"shm_repetitions\": [{}], \"spread\": {}}}",
            json_string(&r.workload),
            json_string(r.unit),
            r.lower_is_better,
            json_number(r.shm),
            json_number(r.socket),
            json_number(r.ratio()),
            json_number(r.advantage()),
            json_number(r.advantage_range.map_or(r.advantage(), |s| s.0)),
            json_number(r.advantage_range.map_or(r.advantage(), |s| s.1)),
            json_option(r.floor),
            json_option(r.floor_ratio()),
            r.shm_reps
                .iter()
                .map(|&v| json_number(v))
                .collect::<Vec<_>>()
                .join(", "),
            json_option(r.spread()),
        );
        s.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ]\n}\n");
    s
}

// ---- the chart ---------------------------------------------------------------

/// A series of (payload bytes, value) points for one transport.
struct Series {
    shm: Vec<(f64, f64)>,
    socket: Vec<(f64, f64)>,
}

/// Draws one log-log panel at `(x0, y0)`.
// Axis exponents are small whole numbers (floor/ceil of log10).
#[allow(clippy::cast_possible_truncation)]
fn panel(svg: &mut String, x0: f64, y0: f64, title: &str, y_label: &str, series: &Series) {
    let (w, h) = (400.0, 280.0);
    let all: Vec<(f64, f64)> = series.shm.iter().chain(&series.socket).copied().collect();
    let lg = |v: f64| v.max(1e-12).log10();
    // x: the payload sizes are the ticks, with a little margin around them.
    let (xmin, xmax) = (
        all.iter().map(|p| lg(p.0)).fold(f64::INFINITY, f64::min) - 0.3,
        all.iter()
            .map(|p| lg(p.0))
            .fold(f64::NEG_INFINITY, f64::max)
            + 0.3,
    );
    let (ymin, ymax) = (
        all.iter()
            .map(|p| lg(p.1))
            .fold(f64::INFINITY, f64::min)
            .floor(),
        all.iter()
            .map(|p| lg(p.1))
            .fold(f64::NEG_INFINITY, f64::max)
            .ceil(),
    );
    let (ymin, ymax) = if ymax <= ymin {
        (ymin - 1.0, ymin + 1.0)
    } else {
        (ymin, ymax)
    };
    let px = |v: f64| x0 + (lg(v) - xmin) / (xmax - xmin) * w;
    let py = |v: f64| y0 + h - (lg(v) - ymin) / (ymax - ymin) * h;
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="15" font-weight="bold" text-anchor="middle">{title}</text>"##,
        x0 + w / 2.0,
        y0 - 14.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##
    );
    let mut sizes: Vec<f64> = all.iter().map(|p| p.0).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    for size in sizes {
        let x = px(size);
        let label = size_label(size as usize);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" font-size="11" text-anchor="middle">{label}</text>"##,
            y0 + h,
            y0 + h + 16.0
        );
    }
    let mut e = ymin;
    while e <= ymax + 1e-9 {
        let y = y0 + h - (e - ymin) / (ymax - ymin) * h;
        let _ = writeln!(
            svg,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"##,
            x0 + w,
            x0 - 6.0,
            y + 4.0,
            shorten(&format!("{}", 10f64.powi(e as i32)))
        );
        e += 1.0;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">payload size</text>"##,
        x0 + w / 2.0,
        y0 + h + 36.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 {} {})">{y_label}</text>"##,
        x0 - 46.0,
        y0 + h / 2.0,
        x0 - 46.0,
        y0 + h / 2.0
    );
    for (points, colour) in [(&series.shm, "#1f77b4"), (&series.socket, "#ff7f0e")] {
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##,
            path.join(" ")
        );
        for &(x, y) in points.iter() {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {}</title></circle>"##,
                px(x),
                py(y),
                x,
                fmt_figure(y)
            );
        }
    }
}

/// "1024 B" -> "1 KiB" style cleanup of tick labels built from powers of ten.
fn shorten(s: &str) -> String {
    let mut parts = s.splitn(2, ' ');
    let number: f64 = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
    let unit = parts.next().unwrap_or("");
    let n = if number >= 100.0 {
        format!("{number:.0}")
    } else if number >= 1.0 {
        format!("{:.3}", number)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{number:.3}").trim_end_matches('0').to_string()
    };
    if unit.is_empty() {
        n
    } else {
        format!("{n} {unit}")
    }
}

fn to_svg(latency: &Series, bandwidth: &Series, note: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="420" font-family="sans-serif" viewBox="0 0 1000 420">"##
    );
    svg.push_str("<rect width=\"1000\" height=\"420\" fill=\"white\"/>\n");
    panel(
        &mut svg,
        80.0,
        50.0,
        "round-trip latency, p50",
        "microseconds (log)",
        latency,
    );
    panel(
        &mut svg,
        570.0,
        50.0,
        "one-way throughput",
        "GB/s (log)",
        bandwidth,
    );
    let _ = writeln!(
        svg,
        r##"<rect x="380" y="378" width="14" height="4" fill="#1f77b4"/><text x="400" y="384" font-size="12">shm (capnp-shm)</text><rect x="520" y="378" width="14" height="4" fill="#ff7f0e"/><text x="540" y="384" font-size="12">socket (capnp::serialize over UnixStream)</text>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="500" y="408" font-size="11" fill="#555" text-anchor="middle">{}</text>"##,
        note
    );
    svg.push_str("</svg>\n");
    svg
}

// ---- main --------------------------------------------------------------------

struct Args {
    quick: bool,
    /// Only the RPC rows.
    rpc_only: bool,
    tcp_only: bool,
    /// Whole runs of every workload, one after another.
    runs: usize,
    json: Option<String>,
    svg: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        quick: false,
        rpc_only: false,
        tcp_only: false,
        runs: 1,
        json: None,
        svg: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--rpc" => args.rpc_only = true,
            "--tcp" => args.tcp_only = true,
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n >= 1)
                    .ok_or("--runs needs a whole number, at least 1")?;
            }
            "--json" => args.json = Some(it.next().ok_or("--json needs a path")?),
            "--svg" => args.svg = Some(it.next().ok_or("--svg needs a path")?),
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick] [--rpc | --tcp] [--runs N] [--json PATH] [--svg PATH]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// Prints progress: on a terminal, one line that each step overwrites;
/// elsewhere (a file, a pipe, CI), a plain line per step.
struct Progress {
    step: usize,
    total: usize,
    run: usize,
    runs: usize,
    started: Instant,
    terminal: bool,
}

impl Progress {
    fn new(runs: usize) -> Progress {
        Progress {
            step: 0,
            total: 0,
            run: 0,
            runs,
            started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// A new run of `total` steps.
    fn begin(&mut self, total: usize) {
        self.run += 1;
        self.step = 0;
        self.total = total;
    }

    fn show(&mut self, what: &str) {
        self.step += 1;
        let run = if self.runs > 1 {
            format!("run {}/{} ", self.run, self.runs)
        } else {
            String::new()
        };
        let line = format!(
            "{run}[{:>2}/{}] {:>5.1}s  {what}",
            self.step,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        if self.terminal {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&self, started: Instant) {
        let clear = if self.terminal { "\r\x1b[2K" } else { "" };
        eprintln!("{clear}done in {:.1}s", started.elapsed().as_secs_f64());
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut progress = Progress::new(args.runs);
    let runs: Vec<Run> = (0..args.runs)
        .map(|_| measure(&args, &mut progress))
        .collect();
    progress.done(started);
    let summary = Run::summarise(&runs);
    print_table(&summary.rows, args.runs);
    print_footer(&args);
    // Measured last, alone: a property of the host, not of a transport.
    let sharing = cpu_pair(&summary.placements).and_then(|(a, b)| floors::core_sharing(a, b));
    if let Some(line) = describe_placement(&summary.placements, summary.spin_p50.median(), sharing)
    {
        println!("{line}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, to_json(&summary.rows, args.quick, args.runs)).expect("write json");
        println!("wrote {path}");
    }
    if let Some(path) = &args.svg {
        let note = format!(
            "{} of {} run(s), {} cores; each point forks a peer process; payload read in full by the receiver",
            if args.runs > 1 { "medians" } else { "figures" },
            args.runs,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        std::fs::write(path, to_svg(&summary.latency, &summary.bandwidth, &note))
            .expect("write svg");
        println!("wrote {path}");
    }
}

/// The notes under the table.
fn print_footer(args: &Args) {
    println!(
        "shm: capnp-shm, default options (64 MiB region, spin 50 µs) unless noted; socket: \
         capnp::serialize over a buffered UnixStream, flushed per message."
    );
    if !(args.tcp_only || args.rpc_only) {
        println!(
            "floor: what the hardware allows, measured in this run: a cache line bounced \
             between two spinning processes (for round trip 64 B), the same with a futex wait \
             and wake on every hop (for no spin; it, the no-spin rows and the socket's 64 B \
             round trip run with the two processes pinned to two vCPUs, as a sleeper woken by \
             its peer may otherwise be moved next to it), the one-way 64 B workload over a bare ring \
             between two processes, no validation and no space to manage (for one-way 64 B \
             messages); capnp build is that message built on a reused buffer in one process, \
             no transport; capnp echo is capnp's work in one 64 B round trip, done in one \
             process (a round trip takes at least the spin floor plus this); capnp echo, bare \
             ring is the 64 B round trip between two processes over one slot each way, \
             message and tag on the same lines, no validation; a vCPU stall is a pause of \
             over 1 µs in a process spinning on the clock (the host's: a round trip between \
             two spinning processes meets one with a chance of about its length over the \
             time between stalls, so once that passes 1%, p99 is a stall); memcpy of 1 MiB in one process (for one-way \
             bandwidth); sum is the receiver's checksum over 1 MiB in one process; zero+copy+sum \
             is all that a 1 MiB message does to its bytes (a zeroed segment, the \
             payload copied in, the receiver's checksum), done in one process; bare pipe is \
             1 MiB copied into shared memory by one process and summed by another, over 8 \
             slots with a tag each, no capnp (copy+sum, for one-way 1 MiB between two \
             processes), and the same with each slot zeroed before the copy, as a segment \
             must be.\n\
             Rows with a spread ran {} times, interleaved (floor, shm, socket, ...): the \
             median, and the spread of the shm figure (highest over lowest repetition).",
            repetitions(args.quick)
        );
    }
    println!(
        "{} The machine is shared: compare columns, not runs.",
        if args.runs > 1 {
            format!(
                "Medians of {} runs (a spread is over the repetitions of every run); over \
                 runs: the lowest and highest shm/socket advantage.",
                args.runs
            )
        } else {
            "One run; --runs N gives medians of N runs.".to_string()
        }
    );
}

/// From this slowdown of a busy loop run on two vCPUs at once (against one
/// alone), the two share a physical core (hyperthreads: about 2); up to
/// [`SEPARATE_CORES_BELOW`], they are separate cores (about 1).
const SHARED_CORE_FROM: f64 = 1.5;
const SEPARATE_CORES_BELOW: f64 = 1.15;

/// "placement: parent on cpu 0, peer on cpu 1 (different vCPUs; ...)",
/// from the CPUs sampled during the spin floor (`spin_p50` in µs) and
/// whether they share a core (`sharing`: see [`floors::core_sharing`]);
/// `None` when the run measured no floor (`--tcp`, `--rpc`).
fn describe_placement(
    placements: &[floors::Placement],
    spin_p50: f64,
    sharing: Option<f64>,
) -> Option<String> {
    let first = *placements.first()?;
    let cpu = |c: Option<u32>| c.map_or("?".to_string(), |c| c.to_string());
    let cpus = if placements.iter().all(|p| *p == first) {
        format!(
            "parent on cpu {}, peer on cpu {}",
            cpu(first.parent),
            cpu(first.peer)
        )
    } else {
        let each: Vec<String> = placements
            .iter()
            .map(|p| format!("{}/{}", cpu(p.parent), cpu(p.peer)))
            .collect();
        format!("parent/peer cpu by repetition {}", each.join(", "))
    };
    let known = placements
        .iter()
        .filter(|p| p.parent.is_some() && p.peer.is_some())
        .count();
    let same = placements
        .iter()
        .filter(|p| p.parent.is_some() && p.parent == p.peer)
        .count();
    let vcpus = match same {
        _ if known == 0 => "vCPUs unknown".to_string(),
        0 => "different vCPUs".to_string(),
        n if n == placements.len() => "same vCPU".to_string(),
        n => format!("same vCPU in {n} of {} repetitions", placements.len()),
    };
    let inference = if known > 0 && same == placements.len() {
        "the floor measures the scheduler, not the cache".to_string()
    } else {
        match sharing {
            None => "whether they share a physical core was not measured".to_string(),
            Some(x) => {
                let verdict = if x >= SHARED_CORE_FROM {
                    "they share a physical core"
                } else if x < SEPARATE_CORES_BELOW {
                    "separate physical cores"
                } else {
                    "unclear whether they share a physical core"
                };
                format!(
                    "a multiply-bound loop took {x:.2}x as long on both vCPUs at once as on \
                     one: {verdict}"
                )
            }
        }
    };
    Some(format!(
        "placement: {cpus} ({vcpus}; spin floor {spin_p50:.2} µs; {inference})"
    ))
}

/// The two different CPUs the spin floor's processes ran on most often,
/// if any repetition saw two.
fn cpu_pair(placements: &[floors::Placement]) -> Option<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = placements
        .iter()
        .filter_map(|p| Some((p.parent?.min(p.peer?), p.parent?.max(p.peer?))))
        .filter(|(a, b)| a != b)
        .collect();
    pairs.sort_unstable();
    let count = |pair: &(u32, u32)| pairs.iter().filter(|p| *p == pair).count();
    pairs.iter().copied().max_by_key(count)
}

/// What one run of every workload measured.
struct Run {
    rows: Vec<Row>,
    latency: Series,
    bandwidth: Series,
    /// Where the spin floor's two processes ran, one per repetition.
    placements: Vec<floors::Placement>,
    /// The spin floor's p50 of each repetition, in µs.
    spin_p50: Repeated,
}

impl Run {
    /// A run of table rows only (`--tcp`, `--rpc`): no chart series, no
    /// floors.
    fn rows_only(rows: Vec<Row>) -> Run {
        let empty = || Series {
            shm: vec![],
            socket: vec![],
        };
        Run {
            rows,
            latency: empty(),
            bandwidth: empty(),
            placements: Vec::new(),
            spin_p50: Repeated::default(),
        }
    }

    /// Medians over runs, row by row (and point by point), with the range
    /// of each row's advantage; the repetitions of every run pooled.
    fn summarise(runs: &[Run]) -> Run {
        let first = &runs[0];
        let rows = (0..first.rows.len())
            .map(|i| {
                let all: Vec<&Row> = runs.iter().map(|r| &r.rows[i]).collect();
                // None for the floor rows: no socket figure, no advantage.
                let advantages: Vec<f64> = all
                    .iter()
                    .map(|r| r.advantage())
                    .filter(|a| !a.is_nan())
                    .collect();
                Row {
                    workload: all[0].workload.clone(),
                    unit: all[0].unit,
                    lower_is_better: all[0].lower_is_better,
                    shm: median(all.iter().map(|r| r.shm).collect()),
                    socket: median(all.iter().map(|r| r.socket).collect()),
                    floor: all[0]
                        .floor
                        .map(|_| median(all.iter().filter_map(|r| r.floor).collect())),
                    shm_reps: all
                        .iter()
                        .flat_map(|r| r.shm_reps.iter().copied())
                        .collect(),
                    advantage_range: (!advantages.is_empty()).then(|| {
                        (
                            advantages.iter().copied().fold(f64::INFINITY, f64::min),
                            advantages.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        )
                    }),
                }
            })
            .collect();
        let points = |pick: fn(&Run) -> &Vec<(f64, f64)>| -> Vec<(f64, f64)> {
            (0..pick(first).len())
                .map(|i| {
                    (
                        pick(first)[i].0,
                        median(runs.iter().map(|r| pick(r)[i].1).collect()),
                    )
                })
                .collect()
        };
        Run {
            rows,
            latency: Series {
                shm: points(|r| &r.latency.shm),
                socket: points(|r| &r.latency.socket),
            },
            bandwidth: Series {
                shm: points(|r| &r.bandwidth.shm),
                socket: points(|r| &r.bandwidth.socket),
            },
            placements: runs.iter().flat_map(|r| r.placements.clone()).collect(),
            spin_p50: Repeated(runs.iter().flat_map(|r| r.spin_p50.0.clone()).collect()),
        }
    }
}

/// Repetitions of the core rows in one run.
fn repetitions(quick: bool) -> u64 {
    if quick {
        3
    } else {
        5
    }
}

const MIB: usize = 1 << 20;

/// Steps of one repetition of [`measure_core`], for the progress line.
const CORE_STEPS: usize = 16;

/// How much work the core rows do in one run, shared out over `reps`
/// repetitions.
struct CoreCounts {
    reps: u64,
    rtt_warmup: u64,
    rtt_count: u64,
    /// 64-byte messages, one way.
    small_count: u64,
    /// Bytes of the 1 MiB one-way rows and of each memory floor.
    bytes: u64,
    /// How long the stall floor spins.
    stall_span: Duration,
}

/// The core rows' figures and their floors, one value per repetition.
/// Latencies are p50, p99, p99.9 in µs; bandwidths in GB/s.
#[derive(Default)]
struct Core {
    spin: [Repeated; 3],
    futex: [Repeated; 3],
    shm_rtt: [Repeated; 3],
    shm_no_spin: [Repeated; 3],
    socket_rtt: [Repeated; 3],
    /// One-way 64-byte messages per second.
    shm_small: Repeated,
    socket_small: Repeated,
    /// capnp's work in a 64 B round trip, in one process: p50 in µs.
    echo: Repeated,
    /// The 64 B round trip over a bare ring between two processes: p50 and
    /// p99 in µs.
    ring_echo: [Repeated; 2],
    /// A spinning process's vCPU stalls (see [`floors::stalls`]): the
    /// median stall and the median time between two, in µs, and the share
    /// of the time lost.
    stall_length: Repeated,
    stall_every: Repeated,
    stall_lost: Repeated,
    /// Messages a second capnp builds the 64 B message in one process.
    build: Repeated,
    /// Messages a second of the one-way 64 B workload over a bare ring
    /// between two processes.
    ring: Repeated,
    /// Heap allocations per received 64-byte message (shm, socket), of the
    /// last repetition.
    allocations: (f64, f64),
    memcpy: Repeated,
    sum: Repeated,
    /// A 1 MiB message's memory work in one process (zero, copy, sum).
    message_work: Repeated,
    /// 1 MiB copied in by one process and summed by another over a bare
    /// pipe in shared memory; and the same with the slot zeroed first.
    pipe: Repeated,
    pipe_zero: Repeated,
    shm_mib: Repeated,
    socket_mib: Repeated,
    /// Where the spin floor's processes ran.
    placements: Vec<floors::Placement>,
}

/// Adds one repetition's p50, p99 and p99.9 (of samples in nanoseconds).
fn push_percentiles(into: &mut [Repeated; 3], samples: Vec<u64>) {
    for (r, p) in into.iter_mut().zip(percentiles(samples)) {
        r.0.push(p);
    }
}

/// Measures the core rows and their floors in `counts.reps` repetitions,
/// interleaved (floor, shm, socket, floor, shm, socket, ...), so that a
/// slow spell of the shared machine hits every column alike. `mib` holds
/// the options of the 1 MiB shm row.
fn measure_core(
    counts: &CoreCounts,
    default: &Options,
    sleepy: &Options,
    mib: &Options,
    progress: &mut Progress,
) -> Core {
    let per = |n: u64| (n / counts.reps).max(1);
    let (warmup, trips) = (per(counts.rtt_warmup), per(counts.rtt_count));
    let small = per(counts.small_count).max(2);
    let mib_count = per(counts.bytes / MIB as u64).max(32);
    let mut core = Core::default();
    for rep in 1..=counts.reps {
        let reps = counts.reps;
        let mut step = |what: &str| progress.show(&format!("{what} ({rep}/{reps})"));

        step("spin floor");
        let (samples, placement) = floors::ping_pong(floors::Hop::Spin, warmup, trips);
        push_percentiles(&mut core.spin, samples);
        core.placements.push(placement);
        step("echo floor");
        let p50 = percentiles(floors::echo_floor(warmup, trips))[0];
        core.echo.0.push(p50);
        step("ring echo floor");
        let [p50, p99, _] = percentiles(floors::ring_echo(warmup, trips));
        core.ring_echo[0].0.push(p50);
        core.ring_echo[1].0.push(p99);
        step("stall floor");
        let stalls = floors::stalls(counts.stall_span);
        core.stall_length.0.push(stalls.length);
        core.stall_every.0.push(stalls.every);
        core.stall_lost.0.push(stalls.lost * 100.0);
        step("round trip 64 B shm");
        push_percentiles(
            &mut core.shm_rtt,
            round_trips(Transport::Shm, default, 64, warmup, trips),
        );
        // Every hop of these three sleeps: measured alike, the two
        // processes on two vCPUs (`floors::apart`).
        step("futex floor");
        let (samples, _) = floors::apart(|| floors::ping_pong(floors::Hop::Futex, warmup, trips));
        push_percentiles(&mut core.futex, samples);
        step("round trip 64 B, no spin shm");
        push_percentiles(
            &mut core.shm_no_spin,
            floors::apart(|| round_trips(Transport::Shm, sleepy, 64, warmup, trips)),
        );
        step("round trip 64 B socket");
        push_percentiles(
            &mut core.socket_rtt,
            floors::apart(|| round_trips(Transport::Socket, default, 64, warmup, trips)),
        );

        step("build floor");
        core.build.0.push(floors::build_floor(small));
        step("ring floor");
        core.ring.0.push(floors::ring_floor(small));
        step("throughput 64 B shm");
        let (s_msgs, _, s_alloc) = throughput(Transport::Shm, default, 64, small);
        step("throughput 64 B socket");
        let (k_msgs, _, k_alloc) = throughput(Transport::Socket, default, 64, small);
        core.shm_small.0.push(s_msgs);
        core.socket_small.0.push(k_msgs);
        core.allocations = (s_alloc, k_alloc);

        step("memory floors");
        let memory = floors::memory_floors(per(counts.bytes));
        core.memcpy.0.push(memory.copy / 1e9);
        core.sum.0.push(memory.sum / 1e9);
        core.message_work.0.push(memory.message / 1e9);
        step("pipe floors");
        core.pipe.0.push(floors::pipe_floor(mib_count, false) / 1e9);
        core.pipe_zero
            .0
            .push(floors::pipe_floor(mib_count, true) / 1e9);
        step("throughput 1 MiB shm");
        let (_, s_bytes, _) = throughput(Transport::Shm, mib, MIB, mib_count);
        step("throughput 1 MiB socket");
        let (_, k_bytes, _) = throughput(Transport::Socket, default, MIB, mib_count);
        core.shm_mib.0.push(s_bytes / 1e9);
        core.socket_mib.0.push(k_bytes / 1e9);
    }
    core
}

/// Runs every workload once.
fn measure(args: &Args, progress: &mut Progress) -> Run {
    let scale = if args.quick { 20 } else { 1 };
    let rtt_count = 200_000 / scale;
    let rtt_warmup = 20_000 / scale;
    let small_count = 2_000_000 / scale;
    let order_count = 200_000 / scale;
    let pool_requests = 200_000 / scale;
    let default = Options::new().region_size(64 << 20);
    let sleepy = default.clone().spin(Duration::ZERO);
    let big = |size: usize| {
        default
            .clone()
            .region_size((4 * size + (4 << 20)).max(64 << 20))
    };
    let sizes: [usize; 5] = [64, 4 << 10, 64 << 10, MIB, 16 << 20];
    let large_sizes: &[usize] = if args.quick {
        &[64 << 20]
    } else {
        &[64 << 20, 256 << 20, 1 << 30]
    };
    let latency_sizes: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];

    if args.tcp_only {
        progress.begin(TCP_STEPS);
        return Run::rows_only(tcp_rows(
            &default,
            rtt_count,
            rtt_warmup,
            small_count,
            scale,
            progress,
        ));
    }
    if args.rpc_only {
        progress.begin(RPC_STEPS);
        return Run::rows_only(rpc_rows(args, progress));
    }
    progress.begin(
        CORE_STEPS * usize::try_from(repetitions(args.quick)).unwrap_or(0)
            + 2 * (latency_sizes.len() - 1)
            + 2 * (sizes.len() - 2)
            + 2 * large_sizes.len()
            + 3
            + 8
            + 4
            + TCP_STEPS
            + RPC_STEPS,
    );
    let mut rows = Vec::new();
    let mut latency = Series {
        shm: vec![],
        socket: vec![],
    };
    let mut bandwidth = Series {
        shm: vec![],
        socket: vec![],
    };

    // 0. The core rows and their floors, interleaved repetitions.
    let counts = CoreCounts {
        reps: repetitions(args.quick),
        rtt_warmup,
        rtt_count,
        small_count,
        bytes: (2u64 << 30) / scale,
        stall_span: Duration::from_millis(if args.quick { 20 } else { 100 }),
    };
    let core = measure_core(&counts, &default, &sleepy, &big(MIB), progress);
    let memcpy = core.memcpy.median();
    for (name, floor) in [("spin", &core.spin), ("futex", &core.futex)] {
        for (i, p) in ["p50", "p99"].iter().enumerate() {
            let workload = format!("floor: {name} ping-pong, {p}");
            rows.push(Row::lower(workload, "µs", floor[i].median(), f64::NAN).with_reps(&floor[i]));
        }
    }
    rows.push(
        Row::lower(
            "floor: capnp echo 64 B, p50",
            "µs",
            core.echo.median(),
            f64::NAN,
        )
        .with_reps(&core.echo),
    );
    for (i, p) in ["p50", "p99"].iter().enumerate() {
        let floor = &core.ring_echo[i];
        let workload = format!("floor: capnp echo, bare ring, {p}");
        rows.push(Row::lower(workload, "µs", floor.median(), f64::NAN).with_reps(floor));
    }
    for (workload, unit, floor) in [
        ("floor: vCPU stall, p50", "µs", &core.stall_length),
        ("floor: vCPU stalls, one every", "µs", &core.stall_every),
        ("floor: time lost to vCPU stalls", "%", &core.stall_lost),
    ] {
        rows.push(Row::lower(workload, unit, floor.median(), f64::NAN).with_reps(floor));
    }
    rows.push(
        Row::higher(
            "floor: capnp build 64 B",
            "msg/s",
            core.build.median(),
            f64::NAN,
        )
        .with_reps(&core.build),
    );
    rows.push(
        Row::higher(
            "floor: capnp over a bare ring 64 B",
            "msg/s",
            core.ring.median(),
            f64::NAN,
        )
        .with_reps(&core.ring),
    );
    for (workload, floor) in [
        ("floor: memcpy 1 MiB, one process", &core.memcpy),
        ("floor: sum 1 MiB, one process", &core.sum),
        ("floor: zero+copy+sum 1 MiB", &core.message_work),
        ("floor: copy+sum 1 MiB, bare pipe", &core.pipe),
        ("floor: zero+copy+sum, bare pipe", &core.pipe_zero),
    ] {
        rows.push(Row::higher(workload, "GB/s", floor.median(), f64::NAN).with_reps(floor));
    }

    // 1. Round-trip latency, 64-byte payload: default options and no spin.
    let socket = core.socket_rtt.each_ref().map(Repeated::median);
    for (i, p) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let shm = &core.shm_rtt[i];
        rows.push(
            Row::lower(
                format!("round trip 64 B, {p}"),
                "µs",
                shm.median(),
                socket[i],
            )
            .with_floor(core.spin[i].median())
            .with_reps(shm),
        );
    }
    for (i, p) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let shm = &core.shm_no_spin[i];
        rows.push(
            Row::lower(
                format!("round trip 64 B no spin, {p}"),
                "µs",
                shm.median(),
                socket[i],
            )
            .with_floor(core.futex[i].median())
            .with_reps(shm),
        );
    }
    latency.shm.push((64.0, core.shm_rtt[0].median()));
    latency.socket.push((64.0, socket[0]));
    let mut rtt = |t: Transport, options: &Options, size: usize, label: &str| {
        progress.show(&format!("round trip {label} {}", t.name()));
        let count = rtt_count / if size >= 64 << 10 { 20 } else { 1 } as u64;
        percentiles(round_trips(t, options, size, rtt_warmup.min(count), count))
    };
    for &size in &latency_sizes[1..] {
        let label = size_label(size);
        let s = rtt(Transport::Shm, &big(size), size, &label);
        let k = rtt(Transport::Socket, &default, size, &label);
        rows.push(Row::lower(
            format!("round trip {label}, p50"),
            "µs",
            s[0],
            k[0],
        ));
        latency.shm.push((size as f64, s[0]));
        latency.socket.push((size as f64, k[0]));
    }

    // 2-3. One-way throughput by payload size (64 B and 1 MiB: the core
    // rows); 5. allocations per message.
    for &size in &sizes {
        let label = size_label(size);
        // GB/s on each transport; whether the figure is a repeated core one.
        let (shm, socket, repeated) = match size {
            64 => {
                rows.push(
                    Row::higher(
                        "one-way 64 B messages",
                        "msg/s",
                        core.shm_small.median(),
                        core.socket_small.median(),
                    )
                    .with_floor(core.ring.median())
                    .with_reps(&core.shm_small),
                );
                let gb = |r: &Repeated| Repeated(r.0.iter().map(|m| m * 64.0 / 1e9).collect());
                (gb(&core.shm_small), gb(&core.socket_small), true)
            }
            MIB => (core.shm_mib.clone(), core.socket_mib.clone(), true),
            _ => {
                // About 2 GiB per run (100 MiB quick), at least 32 messages.
                let count = ((2u64 << 30) / scale / size as u64).max(32);
                progress.show(&format!("throughput {label} shm"));
                let (_, s_bytes, _) = throughput(Transport::Shm, &big(size), size, count);
                progress.show(&format!("throughput {label} socket"));
                let (_, k_bytes, _) = throughput(Transport::Socket, &default, size, count);
                (
                    Repeated(vec![s_bytes / 1e9]),
                    Repeated(vec![k_bytes / 1e9]),
                    false,
                )
            }
        };
        let mut row = Row::higher(
            format!("one-way {label} bandwidth"),
            "GB/s",
            shm.median(),
            socket.median(),
        );
        if repeated {
            row = row.with_reps(&shm);
        }
        if size > 64 {
            row = row.with_floor(memcpy);
        }
        rows.push(row);
        bandwidth.shm.push((size as f64, shm.median()));
        bandwidth.socket.push((size as f64, socket.median()));
    }
    let allocations = core.allocations;

    // Messages larger than the region: the outgoing space grows (default
    // options: a 16 MiB region).
    for &size in large_sizes {
        let label = size_label(size);
        let trips = if size >= 1 << 30 { 3 } else { 5 };
        let count = ((4u64 << 30) / scale / size as u64).max(3);
        progress.show(&format!("large {label} shm"));
        let (mut s, s_bytes) = large(Transport::Shm, &Options::new(), size, trips, count);
        progress.show(&format!("large {label} socket"));
        let (mut k, k_bytes) = large(Transport::Socket, &default, size, trips, count);
        s.sort_unstable();
        k.sort_unstable();
        rows.push(Row::lower(
            format!("round trip {label} (grown), p50"),
            "ms",
            percentile(&s, 50.0) / 1000.0,
            percentile(&k, 50.0) / 1000.0,
        ));
        rows.push(Row::higher(
            format!("one-way {label} (grown) bandwidth"),
            "GB/s",
            s_bytes / 1e9,
            k_bytes / 1e9,
        ));
    }

    // Untrusted-peer mode: what copying each received message costs.
    let copying = |size: usize| big(size).copy_received(true);
    progress.show("copy mode: round trip 64 B shm");
    let mut c = round_trips(Transport::Shm, &copying(64), 64, rtt_warmup, rtt_count);
    c.sort_unstable();
    rows.push(Row::lower(
        "round trip 64 B copy mode, p50",
        "µs",
        percentile(&c, 50.0),
        socket[0],
    ));
    for size in [64 << 10, MIB] {
        let label = size_label(size);
        progress.show(&format!("copy mode: throughput {label} shm"));
        let count = ((2u64 << 30) / scale / size as u64).max(32);
        let (_, c_bytes, _) = throughput(Transport::Shm, &copying(size), size, count);
        let socket = bandwidth
            .socket
            .iter()
            .find(|p| p.0 == size as f64)
            .map_or(f64::NAN, |p| p.1);
        rows.push(
            Row::higher(
                format!("one-way {label} copy mode"),
                "GB/s",
                c_bytes / 1e9,
                socket,
            )
            .with_floor(memcpy),
        );
    }

    // A pool of workers served by one process waiting on all at once.
    for workers in [1usize, 2, 4, 8] {
        let per_worker = pool_requests / workers as u64;
        progress.show(&format!("worker pool x{workers} shm"));
        let s_rate = worker_pool(Transport::Shm, &default, workers, per_worker);
        progress.show(&format!("worker pool x{workers} socket"));
        let k_rate = worker_pool(Transport::Socket, &default, workers, per_worker);
        rows.push(Row::higher(
            format!("worker pool, {workers} workers"),
            "req/s",
            s_rate,
            k_rate,
        ));
    }

    // 4. A structured message: an order with 50 line items.
    progress.show("orders round trip shm");
    let (mut s, s_alloc) = order_round_trips(Transport::Shm, &default, rtt_warmup, rtt_count / 4);
    progress.show("orders round trip socket");
    let (mut k, k_alloc) =
        order_round_trips(Transport::Socket, &default, rtt_warmup, rtt_count / 4);
    s.sort_unstable();
    k.sort_unstable();
    rows.push(Row::lower(
        format!("order ({ITEMS} items) round trip, p50"),
        "µs",
        percentile(&s, 50.0),
        percentile(&k, 50.0),
    ));
    progress.show("orders one-way shm");
    let s_rate = order_throughput(Transport::Shm, &default, order_count);
    progress.show("orders one-way socket");
    let k_rate = order_throughput(Transport::Socket, &default, order_count);
    rows.push(Row::higher(
        format!("order ({ITEMS} items) one-way"),
        "msg/s",
        s_rate,
        k_rate,
    ));
    rows.push(Row::lower(
        "heap allocs / received 64 B msg",
        "allocs",
        allocations.0,
        allocations.1,
    ));
    rows.push(Row::lower(
        "heap allocs / order round trip",
        "allocs",
        s_alloc,
        k_alloc,
    ));
    rows.extend(tcp_rows(
        &default,
        rtt_count,
        rtt_warmup,
        small_count,
        scale,
        progress,
    ));
    rows.extend(rpc_rows(args, progress));
    Run {
        rows,
        latency,
        bandwidth,
        placements: core.placements,
        spin_p50: core.spin[0].clone(),
    }
}

/// Steps of [`tcp_rows`], for the progress line.
const TCP_STEPS: usize = 6;

/// The stream transport over TCP loopback (the "shm" column: this crate's
/// `Channel::from_tcp`) against plain `capnp::serialize` over the same
/// loopback with `TCP_NODELAY` (the "socket" column). The same workloads'
/// shared-memory figures are the rows above.
fn tcp_rows(
    options: &Options,
    rtt_count: u64,
    rtt_warmup: u64,
    small_count: u64,
    scale: u64,
    progress: &mut Progress,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut rtt = |t: Transport| {
        progress.show(&format!("round trip 64 B {}", t.name()));
        let mut s = round_trips(t, options, 64, rtt_warmup, rtt_count / 2);
        s.sort_unstable();
        [50.0, 99.0].map(|p| percentile(&s, p))
    };
    let ours = rtt(Transport::TcpStream);
    let plain = rtt(Transport::TcpPlain);
    for (i, p) in ["p50", "p99"].iter().enumerate() {
        rows.push(Row::lower(
            format!("TCP: round trip 64 B, {p}"),
            "µs",
            ours[i],
            plain[i],
        ));
    }
    for size in [64, 1 << 20] {
        let label = size_label(size);
        let count = if size <= 64 {
            small_count / 2
        } else {
            ((1u64 << 30) / scale / size as u64).max(32)
        };
        progress.show(&format!("throughput {label} tcp stream"));
        let (o_msgs, o_bytes, _) = throughput(Transport::TcpStream, options, size, count);
        progress.show(&format!("throughput {label} tcp plain"));
        let (p_msgs, p_bytes, _) = throughput(Transport::TcpPlain, options, size, count);
        rows.push(if size <= 64 {
            Row::higher(
                format!("TCP: one-way {label} messages"),
                "msg/s",
                o_msgs,
                p_msgs,
            )
        } else {
            Row::higher(
                format!("TCP: one-way {label} bandwidth"),
                "GB/s",
                o_bytes / 1e9,
                p_bytes / 1e9,
            )
        });
    }
    rows
}

/// Steps of [`rpc_rows`], for the progress line.
const RPC_STEPS: usize = 7;

/// Cap'n Proto RPC: capnp-shm-rpc's network against capnp-rpc's two-party
/// network over a Unix socket (the "socket" column), both under tokio.
fn rpc_rows(args: &Args, progress: &mut Progress) -> Vec<Row> {
    use rpc::Net;
    let scale = if args.quick { 20 } else { 1 };
    let calls = 40_000 / scale;
    let pipelined = 200_000 / scale;
    let big = 400 / scale;
    let mut rows = Vec::new();
    let mut trivial = |net: Net| {
        progress.show(&format!("RPC trivial calls {}", net.name()));
        let (mut t, allocs) = rpc::trivial_calls(net, calls / 10, calls);
        t.sort_unstable();
        ([50.0, 99.0].map(|p| percentile(&t, p)), allocs)
    };
    let (shm, shm_allocs) = trivial(Net::Shm);
    let (shm_tokio, _) = trivial(Net::ShmTokio);
    let (two, two_allocs) = trivial(Net::TwoParty);
    for (i, p) in ["p50", "p99"].iter().enumerate() {
        rows.push(Row::lower(
            format!("RPC trivial call, {p}"),
            "µs",
            shm[i],
            two[i],
        ));
    }
    rows.push(Row::lower(
        "RPC trivial call under tokio, p50",
        "µs",
        shm_tokio[0],
        two[0],
    ));
    let mut window = |net: Net| {
        progress.show(&format!("RPC pipelined calls {}", net.name()));
        rpc::pipelined_calls(net, 100, pipelined)
    };
    rows.push(Row::higher(
        "RPC pipelined calls (100 in flight)",
        "calls/s",
        window(Net::Shm),
        window(Net::TwoParty),
    ));
    let mut blob = |net: Net| {
        progress.show(&format!("RPC 1 MiB results {}", net.name()));
        let mut t = rpc::large_results(net, 1 << 20, big);
        t.sort_unstable();
        percentile(&t, 50.0)
    };
    rows.push(Row::lower(
        "RPC call with 1 MiB result, p50",
        "µs",
        blob(Net::Shm),
        blob(Net::TwoParty),
    ));
    rows.push(Row::lower(
        "RPC heap allocs / trivial call",
        "allocs",
        shm_allocs,
        two_allocs,
    ));
    rows
}

fn size_label(size: usize) -> String {
    if size >= 1 << 30 {
        format!("{} GiB", size >> 30)
    } else if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else if size >= 1 << 10 {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}
