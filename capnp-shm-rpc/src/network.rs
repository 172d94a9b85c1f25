//! The `VatNetwork` over one `capnp-shm` channel.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp::capability::Promise;
use capnp::message::{Builder, HeapAllocator, Reader};
use capnp::{any_pointer, Error};
use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::channel::oneshot;
use futures::FutureExt;

use capnp_shm::{
    Channel, Detached, Failure, OwnedReceived, Readiness, Sender, SharedReceiver, TryRecvError,
    TrySendError,
};

use crate::io::{Io, Watched};

/// How a [`ShmNetwork`] treats the messages the application holds.
///
/// Every message received is read in place in the peer's region, and its
/// space there stays taken while the RPC system or the application keeps
/// it: a Call's parameters until the method drops them, a Return until the
/// caller drops the response. Two vats that each hold the other's messages
/// while waiting for room to send could stall each other. So once this end
/// holds `held_messages` messages or `held_bytes` bytes of the peer's
/// region, further messages are copied out to the heap and released at
/// once: the peer always keeps room to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetworkOptions {
    held_messages: Option<u32>,
    held_bytes: Option<u64>,
}

impl NetworkOptions {
    /// Half the messages this end may hold (its channel's
    /// `Options::max_held`), and half the peer's region (found from the
    /// channel when the network is made); no budget on a
    /// stream channel, whose held messages are in our own receive buffer.
    pub fn new() -> NetworkOptions {
        NetworkOptions::default()
    }

    /// The most messages held in place before copying out; 0 copies every
    /// message out (the two-party network's behaviour, one copy more).
    #[must_use]
    pub fn held_messages(mut self, messages: u32) -> NetworkOptions {
        self.held_messages = Some(messages);
        self
    }

    /// The most bytes of the peer's region held in place before copying out.
    #[must_use]
    pub fn held_bytes(mut self, bytes: u64) -> NetworkOptions {
        self.held_bytes = Some(bytes);
        self
    }

    /// No budget: every message is held in place for as long as it is
    /// kept. Only for tests of what the budget prevents.
    #[must_use]
    pub fn unlimited(self) -> NetworkOptions {
        self.held_messages(u32::MAX).held_bytes(u64::MAX)
    }
}

/// What a [`ShmNetwork`] has done, from [`ShmNetwork::counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NetworkStats {
    /// Messages received and read in place.
    pub received_in_place: u64,
    /// Messages received and copied out, because the budget was spent.
    pub copied_out: u64,
    /// Messages received in private memory already: small ones, carried
    /// in their descriptor and copied out as they were taken (see
    /// `capnp_shm::Received::is_copied`), or any, when the channel is in
    /// copy mode. Kept as they are, outside the budget: they hold nothing
    /// of the peer's.
    pub received_private: u64,
    /// Messages sent.
    pub sent: u64,
    /// Sends that found the peer's ring or region full and were queued.
    pub queued: u64,
    /// Messages held in place now.
    pub held: u32,
    /// Bytes of the peer's region held in place now.
    pub held_bytes: u64,
    /// The budget: messages.
    pub held_messages_limit: u32,
    /// The budget: bytes.
    pub held_bytes_limit: u64,
}

/// A live view of a network's [`NetworkStats`], usable after the network
/// has been given to an `RpcSystem`. It keeps nothing of the channel alive.
#[derive(Clone, Debug)]
pub struct Counters(Rc<Cell<NetworkStats>>);

impl Counters {
    /// The figures now.
    pub fn get(&self) -> NetworkStats {
        self.0.get()
    }

    fn update(&self, f: impl FnOnce(&mut NetworkStats)) {
        let mut s = self.0.get();
        f(&mut s);
        self.0.set(s);
    }
}

/// A [`capnp_rpc::VatNetwork`] over a `capnp-shm` [`Channel`]: the vat on
/// each end of the channel, like capnp-rpc's two-party network (same
/// `VatId`, [`Side`]), with messages received in place in shared memory.
///
/// - Receiving is zero-copy: the RPC system reads each message in the
///   peer's region and releases it when it drops it (within the budget of
///   [`NetworkOptions`]; beyond it, messages are copied out).
/// - Sending costs one copy: capnp-rpc builds every outgoing message on the
///   heap (`OutgoingMessage::send` hands back an
///   `Rc<Builder<HeapAllocator>>` that it keeps), so each is copied into
///   the region at send, segment by segment, without traversal.
/// - A send that finds no room is queued and written, in order, when the
///   peer releases; the receive loop never waits for a send.
/// - A peer that closes or dies ends the connection with a
///   `Disconnected` error on every pending call; a peer that breaks the
///   protocol, with a `Failed` one.
///
/// Run it under the built-in [`Runner`](crate::Runner) or (feature
/// `tokio`) in a tokio `LocalSet`; see the crate docs for an example. As
/// with the two-party network, the sides are labels: make one end
/// `Side::Server` and the other `Side::Client`, and bootstrap the *other*
/// side (`system.bootstrap(Side::Server)` on the client). Naming your own
/// side returns your own bootstrap capability, or capnp-rpc's "no
/// bootstrap capability" error when you gave none.
pub struct ShmNetwork {
    inner: Rc<Inner>,
    connection: Option<Connection>,
    side: Side,
}

impl fmt::Debug for ShmNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmNetwork")
            .field("side", &side_name(self.side))
            .field("stats", &self.inner.counters.get())
            .finish_non_exhaustive()
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "server",
    }
}

impl ShmNetwork {
    /// A network over `channel`, this end being `side` (the other end is
    /// the other side), with the default [`NetworkOptions`].
    pub fn new(channel: Channel, side: Side) -> ShmNetwork {
        ShmNetwork::with_options(channel, side, NetworkOptions::new())
    }

    /// As [`new`](ShmNetwork::new), with `options`.
    pub fn with_options(channel: Channel, side: Side, options: NetworkOptions) -> ShmNetwork {
        let (tx, rx) = channel.split();
        let rx = rx.into_shared();
        // On a stream channel a held message is in our own receive buffer
        // and holds nothing of the peer's: no budget is needed by default.
        let stream = rx.transport() == capnp_shm::Transport::Stream;
        let held_messages = options.held_messages.unwrap_or_else(|| {
            if stream {
                u32::MAX
            } else {
                (rx.stats().held_limit / 2).max(1)
            }
        });
        let held_bytes = options.held_bytes.unwrap_or_else(|| {
            if stream {
                u64::MAX
            } else {
                (rx.incoming_range().len() / 2) as u64
            }
        });
        let counters = Counters(Rc::new(Cell::new(NetworkStats {
            held_messages_limit: held_messages,
            held_bytes_limit: held_bytes,
            ..NetworkStats::default()
        })));
        let inner = Rc::new(Inner {
            io: Io::new(),
            stream,
            tx,
            rx,
            queue: RefCell::new(VecDeque::new()),
            writer: RefCell::new(None),
            failure: RefCell::new(None),
            shutdown: Cell::new(false),
            rx_wait: Wait::default(),
            tx_wait: Wait::default(),
            handles: Cell::new(0),
            counters,
        });
        let connection = Connection::new(Rc::clone(&inner), side);
        ShmNetwork {
            inner,
            connection: Some(connection),
            side,
        }
    }

    /// A live view of this network's counters.
    pub fn counters(&self) -> Counters {
        self.inner.counters.clone()
    }
}

impl capnp_rpc::VatNetwork<Side> for ShmNetwork {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn capnp_rpc::Connection<Side>>> {
        if host_id == self.side {
            return None;
        }
        let other = match self.side {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        };
        Some(Box::new(Connection::new(Rc::clone(&self.inner), other)))
    }

    fn accept(&mut self) -> Promise<Box<dyn capnp_rpc::Connection<Side>>, Error> {
        match self.connection.take() {
            Some(c) => Promise::ok(Box::new(c)),
            None => Promise::from_future(futures::future::pending()),
        }
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), Error> {
        Promise::from_future(Drive {
            inner: Rc::clone(&self.inner),
        })
    }
}

/// The largest first segment an outgoing message gets: 1 KiB.
const FIRST_SEGMENT_WORDS_MAX: u32 = 128;

/// A message waiting for room in the peer's ring or region.
struct Queued {
    message: Rc<Builder<HeapAllocator>>,
    sent: Option<oneshot::Sender<Result<(), Error>>>,
}

/// What the connection handles, the writer and the receive loop share.
struct Inner {
    /// First, so that a tokio registration goes before the socket could.
    io: Io,
    /// The channel is a stream channel (its messages are in our memory).
    stream: bool,
    tx: Sender,
    rx: SharedReceiver,
    /// Sends that found no room, oldest first.
    queue: RefCell<VecDeque<Queued>>,
    /// The writer, waiting for something to queue (or for the end).
    writer: RefCell<Option<Waker>>,
    /// The error that ended the connection, once there is one.
    failure: RefCell<Option<Error>>,
    /// `shutdown` was called: flush, then close the stream.
    shutdown: Cell<bool>,
    /// Each direction's wait: the receive loop's for messages, the
    /// writer's for room.
    rx_wait: Wait,
    tx_wait: Wait,
    /// Live [`Connection`] handles; the writer ends when none is left.
    handles: Cell<usize>,
    counters: Counters,
}

impl Watched for Inner {
    fn fd(&self) -> BorrowedFd<'_> {
        self.tx.as_fd()
    }

    fn io(&self) -> &Io {
        &self.io
    }

    fn wants_write(&self) -> bool {
        self.tx_wait.writable.get()
    }

    fn ready_hint(&self) -> bool {
        self.has_work()
    }

    fn arm_for_sleep(&self) -> bool {
        // Arm (or re-arm) every direction that waits: arming also reads
        // away doorbell bytes, so the socket is quiet unless rung anew.
        let mut ready = false;
        for dir in [Dir::Rx, Dir::Tx] {
            let wait = self.wait_of(dir);
            if wait.waiting.get() {
                match self.arm(dir) {
                    Ok(Readiness::Armed) => wait.armed.set(true),
                    // A stream channel's full socket: the runner waits for
                    // it to become writable.
                    Ok(Readiness::Writable) => wait.writable.set(true),
                    // Something came, or a failure the task should see.
                    Ok(Readiness::Ready) | Err(_) => ready = true,
                }
            }
        }
        // One direction's arm may have read away the other's doorbell:
        // check both again, without reading the socket.
        ready || self.has_work()
    }
}

/// A direction of the connection that a task may wait in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// The receive loop, for a message.
    Rx,
    /// The writer, for room.
    Tx,
}

/// The state of one direction's wait.
#[derive(Debug, Default)]
struct Wait {
    /// A task waits here (the runner looks for its work, and arms it
    /// before it sleeps).
    waiting: Cell<bool>,
    /// The peer has been asked to ring.
    armed: Cell<bool>,
    /// A stream channel's socket is full: the runner waits for it to take
    /// bytes (`Readiness::Writable`).
    writable: Cell<bool>,
}

impl Inner {
    /// Records the error that ends the connection (the first wins) and
    /// wakes every task, so each sees it.
    fn fail(&self, error: Error) -> Error {
        let error = self.failure.borrow_mut().get_or_insert(error).clone();
        self.io.fanout().fire();
        self.wake_writer();
        error
    }

    fn failed(&self) -> Option<Error> {
        self.failure.borrow().clone()
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    /// Sends `message` now if there is room and nothing is queued before
    /// it; queues it otherwise.
    fn send(&self, message: Rc<Builder<HeapAllocator>>) -> Promise<(), Error> {
        if let Some(e) = self.failed() {
            return Promise::err(e);
        }
        if self.shutdown.get() {
            return Promise::err(Error::failed(
                "capnp-shm-rpc: a message was sent after the connection's shutdown".into(),
            ));
        }
        let mut queue = self.queue.borrow_mut();
        if queue.is_empty() {
            match self.try_send(&message) {
                Ok(true) => {
                    // A stream channel's socket may have taken only part
                    // of it: the writer sends the rest.
                    if self.stream && !self.tx.is_ready() {
                        drop(queue);
                        self.wake_writer();
                    }
                    return Promise::ok(());
                }
                Ok(false) => {}
                Err(e) => return Promise::err(e),
            }
        }
        let (sent, done) = oneshot::channel();
        queue.push_back(Queued {
            message,
            sent: Some(sent),
        });
        drop(queue);
        self.counters.update(|s| s.queued += 1);
        self.wake_writer();
        Promise::from_future(done.map(|r| {
            r.unwrap_or_else(|_| Err(Error::disconnected("capnp-shm-rpc: connection gone".into())))
        }))
    }

    /// One non-blocking send: `Ok(false)` when there is no room now.
    fn try_send(&self, message: &Builder<HeapAllocator>) -> Result<bool, Error> {
        match self.tx.try_send_copy(message) {
            Ok(()) => {
                self.counters.update(|s| s.sent += 1);
                Ok(true)
            }
            Err(TrySendError::Full(())) => Ok(false),
            Err(TrySendError::Disconnected(())) => Err(self.fail(peer_gone())),
            Err(TrySendError::TooLarge((), t)) => Err(self.fail(Error::failed(format!(
                "capnp-shm-rpc: an RPC message can never fit the channel: {t}"
            )))),
            Err(TrySendError::Failed((), f)) => Err(self.fail(failure_error(&f))),
            Err(e) => Err(self.fail(Error::failed(format!("capnp-shm-rpc: {e}")))),
        }
    }

    /// Writes queued messages while there is room: `Ready(Ok)` when the
    /// queue is empty, `Pending` while waiting for the peer to release.
    fn poll_flush(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let flushed = self.flush_queue(cx);
        if flushed.is_ready() {
            self.done_waiting(Dir::Tx);
        }
        flushed
    }

    /// The loop of [`poll_flush`](Self::poll_flush).
    fn flush_queue(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            if let Some(e) = self.failed() {
                return Poll::Ready(Err(e));
            }
            let Some(front) = self.queue.borrow().front().map(|q| Rc::clone(&q.message)) else {
                // Nothing queued; on a stream channel, the tail of the last
                // message may still be waiting for the socket.
                match self.tx.try_flush() {
                    Ok(()) => return Poll::Ready(Ok(())),
                    Err(TrySendError::Full(())) => match self.wait_for(Dir::Tx, cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(TrySendError::Disconnected(())) => {
                        return Poll::Ready(Err(self.fail(peer_gone())))
                    }
                    Err(TrySendError::Failed((), f)) => {
                        return Poll::Ready(Err(self.fail(failure_error(&f))))
                    }
                    Err(e) => {
                        return Poll::Ready(Err(
                            self.fail(Error::failed(format!("capnp-shm-rpc: {e}")))
                        ))
                    }
                }
            };
            match self.try_send(&front) {
                Ok(true) => {
                    self.done_waiting(Dir::Tx);
                    let done = self.queue.borrow_mut().pop_front();
                    if let Some(sent) = done.and_then(|mut q| q.sent.take()) {
                        let _ = sent.send(Ok(()));
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            match self.wait_for(Dir::Tx, cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Waits in `dir` after its task found nothing to do: arms it (under
    /// the runner, leaves that to the runner's last step before it sleeps)
    /// and waits for the descriptor. `Ready(Ok)`: look again.
    fn wait_for(self: &Rc<Self>, dir: Dir, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let wait = self.wait_of(dir);
        wait.waiting.set(true);
        let arms_late = match self.io.arms_late(self) {
            Ok(late) => late,
            Err(e) => return Poll::Ready(Err(self.fail(io_error(&e)))),
        };
        if !arms_late && !wait.armed.get() {
            match self.arm(dir) {
                // A stream channel's full socket: under tokio (which waits
                // for readability only here) the writer tries again.
                Ok(Readiness::Ready | Readiness::Writable) => return Poll::Ready(Ok(())),
                Ok(Readiness::Armed) => wait.armed.set(true),
                Err(f) => return Poll::Ready(Err(self.fail(failure_error(&f)))),
            }
        }
        match self.io.poll_ready(self, cx) {
            Poll::Ready(Ok(())) => {
                self.disarm(dir);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.fail(io_error(&e)))),
            // Stays armed: the peer rings when it publishes or releases.
            // Arming and the core's liveness polls read doorbell bytes
            // away whichever direction they were rung for, so look again
            // at both, without reading the socket, and wake every task if
            // either has something; a ring after this stays in the socket.
            Poll::Pending => {
                if self.has_work() {
                    self.io.fanout().fire();
                }
                Poll::Pending
            }
        }
    }

    /// Whether a waiting direction has something: loads only.
    fn has_work(&self) -> bool {
        [Dir::Rx, Dir::Tx].into_iter().any(|dir| {
            self.wait_of(dir).waiting.get()
                && match dir {
                    Dir::Rx => self.rx.is_ready(),
                    Dir::Tx => self.tx.is_ready(),
                }
        })
    }

    fn wait_of(&self, dir: Dir) -> &Wait {
        match dir {
            Dir::Rx => &self.rx_wait,
            Dir::Tx => &self.tx_wait,
        }
    }

    fn arm(&self, dir: Dir) -> Result<Readiness, Failure> {
        match dir {
            Dir::Rx => self.rx.arm(),
            Dir::Tx => self.tx.arm(),
        }
    }

    /// Withdraws the ask to ring, if made.
    fn disarm(&self, dir: Dir) {
        self.wait_of(dir).writable.set(false);
        if self.wait_of(dir).armed.replace(false) {
            match dir {
                Dir::Rx => self.rx.disarm(),
                Dir::Tx => self.tx.disarm(),
            }
        }
    }

    /// The task of `dir` found what it waited for, or stopped waiting.
    fn done_waiting(&self, dir: Dir) {
        self.wait_of(dir).waiting.set(false);
        self.disarm(dir);
    }

    /// The writer: flushes whatever is queued; after `shutdown` (or when
    /// every connection handle is gone), closes the stream and ends.
    fn poll_drive(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        match self.poll_flush(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => {
                self.tx.close();
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Ok(())) => {}
        }
        if self.shutdown.get() || self.handles.get() == 0 {
            self.tx.close();
            if self.handles.get() == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        *self.writer.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next message, read in place or copied out (by the budget).
    fn poll_recv(
        self: &Rc<Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Box<dyn capnp_rpc::IncomingMessage>>, Error>> {
        // Once capnp-rpc has shut the connection down (or dropped it), it
        // has stopped listening but may still poll the receive it asked for
        // from a task that outlives the connection's state; capnp-rpc 0.27
        // panics on an end of stream reported then ("message loop outlived
        // connection state?"). Nothing more is reported: the task is
        // dropped with the RpcSystem, which ends as the writer does.
        if self.shutdown.get() || self.handles.get() == 0 {
            return Poll::Pending;
        }
        loop {
            if let Some(e) = self.failed() {
                return Poll::Ready(Err(e));
            }
            match self.try_recv() {
                Ok(Some(m)) => return Poll::Ready(Ok(Some(m))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(e),
            }
            match self.wait_for(Dir::Rx, cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// One non-blocking receive. `Err` holds what the receive loop returns:
    /// `Ok(None)` once the peer has closed (or died) and everything it sent
    /// has come.
    #[allow(clippy::type_complexity)]
    fn try_recv(
        &self,
    ) -> Result<
        Option<Box<dyn capnp_rpc::IncomingMessage>>,
        Result<Option<Box<dyn capnp_rpc::IncomingMessage>>, Error>,
    > {
        // A wake may come while armed; a receive that finds something
        // disarms (the peer need not ring for every message while we run).
        match self.rx.try_recv() {
            Ok(m) => {
                self.done_waiting(Dir::Rx);
                Ok(Some(self.incoming(m)))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Ok(None)),
            Err(TryRecvError::Failed(f)) => Err(Err(self.fail(failure_error(&f)))),
            Err(e) => Err(Err(self.fail(Error::failed(format!("capnp-shm-rpc: {e}"))))),
        }
    }

    /// Boxes a received message: one in private memory as it is, any other
    /// held in place within the budget and copied out beyond.
    fn incoming(&self, message: OwnedReceived) -> Box<dyn capnp_rpc::IncomingMessage> {
        // In private memory already (carried, or copy mode): kept as it
        // is. A stream channel's messages are in our own receive buffer
        // (private, so `is_copied`), read in place there: held as they are.
        if message.is_copied() && !self.stream {
            self.counters.update(|s| s.received_private += 1);
            return Box::new(InPlace {
                message,
                _ticket: None,
            });
        }
        let bytes = message.len_bytes() as u64;
        let s = self.counters.get();
        if s.held >= s.held_messages_limit || s.held_bytes + bytes > s.held_bytes_limit {
            let copy = message.detach();
            drop(message);
            self.counters.update(|s| s.copied_out += 1);
            return Box::new(Copied(copy));
        }
        self.counters.update(|s| {
            s.received_in_place += 1;
            s.held += 1;
            s.held_bytes += bytes;
        });
        Box::new(InPlace {
            message,
            _ticket: Some(Ticket {
                counters: self.counters.clone(),
                bytes,
            }),
        })
    }
}

/// A received message kept as it is: read in place (its space goes back
/// to the peer on drop), or already in private memory (see
/// [`NetworkStats::received_private`]).
struct InPlace {
    message: OwnedReceived,
    /// After `message`: counts it as held until it is released; `None` for
    /// a message that holds nothing of the peer's.
    _ticket: Option<Ticket>,
}

impl capnp_rpc::IncomingMessage for InPlace {
    fn get_body(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.message.get_root()
    }
}

/// A message copied out of the peer's region.
struct Copied(Reader<Detached>);

impl capnp_rpc::IncomingMessage for Copied {
    fn get_body(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.0.get_root()
    }
}

/// One held message's share of the budget.
struct Ticket {
    counters: Counters,
    bytes: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.counters.update(|s| {
            s.held -= 1;
            s.held_bytes -= bytes;
        });
    }
}

/// The receive loop's wait for the next message. While it lives the
/// connection counts as waiting for one; when it completes or is dropped
/// (the RPC system stopped receiving), no longer.
struct Receive {
    inner: Rc<Inner>,
}

impl std::future::Future for Receive {
    type Output = Result<Option<Box<dyn capnp_rpc::IncomingMessage>>, Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = self.inner.poll_recv(cx);
        if polled.is_ready() {
            self.inner.done_waiting(Dir::Rx);
        }
        polled
    }
}

impl Drop for Receive {
    fn drop(&mut self) {
        self.inner.done_waiting(Dir::Rx);
    }
}

/// The writer, as `drive_until_shutdown` hands it to the `RpcSystem`.
struct Drive {
    inner: Rc<Inner>,
}

impl std::future::Future for Drive {
    type Output = Result<(), Error>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.poll_drive(cx)
    }
}

impl Drop for Drive {
    /// The `RpcSystem` is gone (dropped mid-flight, or finished): end the
    /// stream now. A `Response` or `Params` the application still holds
    /// keeps the connection's state (and the channel's mapping) alive, but
    /// the peer must not wait for it.
    fn drop(&mut self) {
        self.inner.tx.close();
    }
}

/// One side's handle on the connection, as the RPC system holds it.
struct Connection {
    inner: Rc<Inner>,
    peer: Side,
}

impl Connection {
    fn new(inner: Rc<Inner>, peer: Side) -> Connection {
        inner.handles.set(inner.handles.get() + 1);
        Connection { inner, peer }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.inner.handles.set(self.inner.handles.get() - 1);
        self.inner.wake_writer();
    }
}

impl capnp_rpc::Connection<Side> for Connection {
    fn get_peer_vat_id(&self) -> Side {
        self.peer
    }

    fn new_outgoing_message(
        &mut self,
        first_segment_word_size: u32,
    ) -> Box<dyn capnp_rpc::OutgoingMessage> {
        // capnp-rpc asks 1024 words (8 KiB, zeroed by the allocator) for
        // every call; most need a few dozen. A smaller first segment saves
        // the zeroing, and a larger message just gets a second segment
        // (copied into the region like the first).
        let words = first_segment_word_size.clamp(16, FIRST_SEGMENT_WORDS_MAX);
        let allocator = HeapAllocator::new().first_segment_words(words);
        Box::new(Outgoing {
            message: Builder::new(allocator),
            inner: Rc::clone(&self.inner),
        })
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn capnp_rpc::IncomingMessage>>, Error> {
        // The common case, a message already there, without a future.
        match self.inner.try_recv() {
            Ok(Some(m)) => return Promise::ok(Some(m)),
            Ok(None) => {}
            Err(Ok(None)) => return Promise::ok(None),
            Err(result) => return Promise::from_future(futures::future::ready(result)),
        }
        Promise::from_future(Receive {
            inner: Rc::clone(&self.inner),
        })
    }

    fn shutdown(&mut self, _result: capnp::Result<()>) -> Promise<(), Error> {
        self.inner.shutdown.set(true);
        self.inner.wake_writer();
        let inner = Rc::clone(&self.inner);
        Promise::from_future(futures::future::poll_fn(move |cx| {
            inner.poll_flush(cx).map(|r| {
                inner.tx.close();
                r
            })
        }))
    }
}

/// A message being built for sending.
struct Outgoing {
    message: Builder<HeapAllocator>,
    inner: Rc<Inner>,
}

impl capnp_rpc::OutgoingMessage for Outgoing {
    fn get_body(&mut self) -> capnp::Result<any_pointer::Builder<'_>> {
        self.message.get_root()
    }

    fn get_body_as_reader(&self) -> capnp::Result<any_pointer::Reader<'_>> {
        self.message.get_root_as_reader()
    }

    fn send(self: Box<Self>) -> (Promise<(), Error>, Rc<Builder<HeapAllocator>>) {
        let Outgoing { message, inner } = *self;
        let message = Rc::new(message);
        (inner.send(Rc::clone(&message)), message)
    }

    fn take(self: Box<Self>) -> Builder<HeapAllocator> {
        self.message
    }

    fn size_in_words(&self) -> usize {
        self.message.size_in_words()
    }
}

/// The error for a peer that closed or died.
fn peer_gone() -> Error {
    Error::disconnected("capnp-shm-rpc: the peer closed the channel or died".into())
}

/// A channel failure as a capnp error: `Disconnected` for a connection
/// the OS reports broken, `Failed` otherwise.
fn failure_error(failure: &Failure) -> Error {
    match failure {
        Failure::Io(e) => io_error(e),
        other => Error::failed(format!("capnp-shm-rpc: {other}")),
    }
}

fn io_error(e: &io::Error) -> Error {
    use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => {
            Error::disconnected(format!("capnp-shm-rpc: {e}"))
        }
        _ => Error::failed(format!("capnp-shm-rpc: {e}")),
    }
}
