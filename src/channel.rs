//! The public types: [`Channel`], one end of a connection, and its two
//! halves, [`Sender`] and [`Receiver`]. Thin facades over the sending side
//! (`send.rs`), the receiving side (`recv.rs`) and what they share
//! (`link.rs`).

use std::fmt;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::message::{Allocator, Builder, HeapAllocator};

use crate::alloc::RegionAllocator;
use crate::deadline::Deadline;
use crate::error::ProtocolError;
use crate::error::{
    Error, Halt, InvalidOptions, RecvError, RecvTimeoutError, SendError, SendHalt,
    SendTimeoutError, SetupError, TryRecvError, TrySendError,
};
use crate::handshake::{self, Greeted, Hello, HelloReader, SetupDeadline, VerdictReader};
use crate::layout::{Geometry, DATA_ALIGN, MAX_REGION, MAX_RING};
use crate::link::Link;
use crate::message::{OwnedReceived, Received};
use crate::options::{Options, Wire};
use crate::recv::RecvSide;
use crate::region::{OwnRegion, PeerRegion};
use crate::send::SendSide;
use crate::stats::{RecvStats, SendStats, Stats};
use crate::stream::{Socket, StreamLink, StreamRecv, StreamSend};
use crate::sys::process;
use crate::wait::Readiness;

/// A message being built in a channel's outgoing region; see
/// [`Sender::message`].
pub type MessageBuilder<'s> = Builder<RegionAllocator<'s>>;

/// One word of zeros: the single segment sent for a builder that was never
/// given a root (a message whose root is null).
static EMPTY_SEGMENT: [u8; 8] = [0; 8];

/// One end of a zero-copy Cap'n Proto channel between two processes.
///
/// Each end owns an outgoing region (a sealed memfd it maps read-write) and
/// maps the peer's region read-only. [`message`](Channel::message) builds a
/// message directly in the outgoing region, [`send`](Channel::send) publishes
/// it, and [`recv`](Channel::recv) on the other end reads it where it lies.
///
/// A `Channel` is [`Send`] but not [`Sync`]: one thread uses an end at a
/// time. To send from one thread and receive on another,
/// [`split`](Channel::split) it. Builders and received messages borrow it.
/// Dropping it tells the peer, which still receives every message sent
/// before, then `Disconnected`.
///
/// # Fork
///
/// Make a [`pair`](Channel::pair), `fork`, and let each process drop the end
/// it does not use. An end belongs to the first process that uses it
/// (builds, sends or receives). In any other process every operation fails
/// with [`Failure::NotOwner`](crate::Failure::NotOwner), and dropping the
/// end, or a message or builder of it, touches nothing shared: the owner
/// goes on undisturbed.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::Channel;
///
/// let (left, right) = Channel::pair()?;
/// let mut message = left.message();
/// message.set_root(capnp::text::Reader::from("hello"))?;
/// left.send(message).map_err(|e| e.into_error())?;
///
/// let received = right.recv()?;
/// assert_eq!(received.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "hello");
/// # Ok(()) }
/// ```
///
/// A `Channel` cannot be shared between threads; split it instead:
///
/// ```compile_fail
/// let (a, _b) = capnp_shm::Channel::pair().unwrap();
/// std::thread::scope(|s| {
///     s.spawn(|| a.try_recv().ok());
///     let _ = a.message();
/// });
/// ```
pub struct Channel {
    tx: Sender,
    rx: Receiver,
}

/// The sending half of a [`Channel`], from [`Channel::split`]: [`Send`], so
/// it can move to another thread than its [`Receiver`].
pub struct Sender {
    tx: Tx,
}

/// The receiving half of a [`Channel`], from [`Channel::split`]: [`Send`],
/// so it can move to another thread than its [`Sender`].
pub struct Receiver {
    rx: Rx,
}

/// How a channel end carries messages; see [`Channel::transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory: messages are built in this end's region and read in
    /// place by the peer, with no copy.
    SharedMemory,
    /// A byte stream (TCP, or a Unix socket without shared memory) carrying
    /// Cap'n Proto's standard stream framing: a message is built on the
    /// heap, written to the socket at `send`, and read by the peer into a
    /// reused receive buffer, where it is read in place.
    Stream,
}

/// The sending side a [`Sender`] drives. (Not boxed: the shared-memory
/// side is the hot path, and one `Sender` is one allocation either way.)
#[allow(clippy::large_enum_variant)]
enum Tx {
    Shm(SendSide),
    Stream(StreamSend),
}

/// The receiving side a [`Receiver`] drives.
pub(crate) enum Rx {
    Shm(RecvSide),
    Stream(StreamRecv),
}

/// A channel end that has sent its hello and waits for the peer's: set-up
/// in steps, so that a listener can keep many at once (see `handshake.rs`
/// for the exchange).
#[derive(Debug)]
pub(crate) struct HalfOpen {
    socket: OwnedFd,
    /// `None`: this end offered no region (a stream hello).
    own: Option<OwnRegion>,
    options: Options,
    deadline: SetupDeadline,
    hello: HelloReader,
}

/// Where a set-up stands once the peer's hello is in.
// Made once per connection and moved twice: the size of its larger
// variant costs nothing a box would save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Negotiated {
    /// The transport is chosen: a stream hello on either side.
    Done(Channel),
    /// Both offered shared memory: the peer's verdict on our region decides.
    Verdict(AwaitingVerdict),
}

/// Both ends offered a region and this one has sent its verdict on the
/// peer's; the peer's verdict on ours is due.
#[derive(Debug)]
pub(crate) struct AwaitingVerdict {
    socket: OwnedFd,
    own: OwnRegion,
    /// The peer's region, mapped; `None` when this end refused it.
    peer: Option<PeerRegion>,
    /// The most bytes of our outgoing space the peer maps (its hello).
    peer_accepts: u64,
    /// Whether the peer's hello said its region is sealed.
    peer_sealed: bool,
    options: Options,
    deadline: SetupDeadline,
    verdict: VerdictReader,
}

impl HalfOpen {
    /// Creates this end's region and sends the hello (a fresh socket has
    /// room for it; otherwise this waits, within the set-up deadline). With
    /// [`Wire::Stream`], or when no region can be created here
    /// ([`Backing::Auto`](crate::Backing::Auto): neither a memfd nor a
    /// `/dev/shm` file), the hello asks for the stream transport instead.
    pub(crate) fn start(stream: UnixStream, options: &Options) -> Result<HalfOpen, SetupError> {
        let deadline = SetupDeadline::after(options.setup_timeout);
        let geometry = geometry_for(options)?;
        process::watch_forks()?;
        let socket = OwnedFd::from(stream);
        let made = match options.wire {
            Wire::Stream => None,
            _ => match OwnRegion::create(geometry, options.backing) {
                Ok(made) => Some(made),
                Err(_) if options.backing == crate::Backing::Auto => None,
                Err(e) => return Err(e.into()),
            },
        };
        let own = match made {
            Some((own, peer_fd)) => {
                let hello = Hello {
                    geometry,
                    sealed: own.is_sealed(),
                    stream: false,
                    accept_bytes: options.limits().incoming,
                };
                handshake::send_hello(socket.as_fd(), &hello, Some(peer_fd.as_fd()), deadline)?;
                Some(own)
            }
            None => {
                handshake::send_hello(socket.as_fd(), &Hello::stream(), None, deadline)?;
                None
            }
        };
        Ok(HalfOpen {
            socket,
            own,
            options: options.clone(),
            deadline,
            hello: HelloReader::new(false),
        })
    }

    /// The next step, from the peer's complete hello (and descriptor): a
    /// stream channel if either end asked for one; otherwise this end's
    /// verdict on the peer's region, sent, and the peer's to wait for.
    pub(crate) fn complete(
        self,
        hello: Hello,
        fd: Option<OwnedFd>,
    ) -> Result<Negotiated, SetupError> {
        let (own, fd) = match (self.own, fd) {
            (Some(own), Some(fd)) if !hello.stream => (own, fd),
            _ => {
                let stream = UnixStream::from(self.socket);
                return Ok(Negotiated::Done(Channel::over_stream(
                    Socket::Unix(stream),
                    &self.options,
                )?));
            }
        };
        let accept_unsealed = self.options.allow_unsealed_peer || !own.is_sealed();
        let peer = match handshake::map_peer_region(&hello, &fd, accept_unsealed, own.file_id()) {
            Ok(peer) => Some(peer),
            // A region this end cannot or may not map: both fall back to
            // the stream. (A wrong region is an error, not a fallback.)
            Err(SetupError::Protocol(
                ProtocolError::UnmappableRegion { .. } | ProtocolError::UnsealedRegion,
            )) => None,
            Err(e) => return Err(e),
        };
        // `fd` closes here; the mapping keeps the peer's file alive.
        drop(fd);
        handshake::send_verdict(self.socket.as_fd(), peer.is_some(), self.deadline)?;
        Ok(Negotiated::Verdict(AwaitingVerdict {
            socket: self.socket,
            own,
            peer,
            peer_accepts: hello.accept_bytes,
            peer_sealed: hello.sealed,
            options: self.options,
            deadline: self.deadline,
            verdict: VerdictReader::default(),
        }))
    }

    /// Waits for the peer's hello, at most until the set-up deadline, and
    /// answers it.
    fn hear(mut self) -> Result<Negotiated, SetupError> {
        match handshake::recv_hello_with(self.socket.as_fd(), &mut self.hello, self.deadline)? {
            Greeted::Hello(hello, fd) => self.complete(hello, fd),
            // Not sniffing: a peer that does not say hello fails it.
            Greeted::Plain(_) => Err(ProtocolError::BadMagic.into()),
        }
    }

    /// The whole set-up, waiting at most until the set-up deadline.
    fn finish(self) -> Result<Channel, SetupError> {
        self.hear()?.finish()
    }
}

impl Negotiated {
    /// The channel, waiting for the peer's verdict if it is due.
    pub(crate) fn finish(self) -> Result<Channel, SetupError> {
        match self {
            Negotiated::Done(channel) => Ok(channel),
            Negotiated::Verdict(mut v) => {
                let mapped = v.verdict.wait(v.socket.as_fd(), v.deadline)?;
                v.conclude(mapped)
            }
        }
    }
}

impl AwaitingVerdict {
    /// One look for the peer's verdict, without waiting: the channel once
    /// it is in.
    pub(crate) fn poll(&mut self) -> Result<Option<bool>, SetupError> {
        self.verdict.read(self.socket.as_fd())
    }

    /// The socket, for a listener's poll set.
    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// The channel, given the peer's verdict on our region: shared memory
    /// if both ends mapped the other's, the stream otherwise.
    pub(crate) fn conclude(self, mapped: bool) -> Result<Channel, SetupError> {
        match (self.peer, mapped) {
            (Some(peer), true) => {
                let link = Arc::new(Link::new(
                    self.socket,
                    self.own,
                    peer,
                    self.options,
                    self.peer_accepts,
                    self.peer_sealed,
                ));
                Ok(Channel {
                    tx: Sender {
                        tx: Tx::Shm(SendSide::new(Arc::clone(&link), 0)),
                    },
                    rx: Receiver {
                        rx: Rx::Shm(RecvSide::new(link, 0)),
                    },
                })
            }
            _ => Channel::over_stream(Socket::Unix(UnixStream::from(self.socket)), &self.options),
        }
    }
}

/// The outgoing geometry the options ask for, rounded to what the format allows.
fn geometry_for(options: &Options) -> Result<Geometry, SetupError> {
    let ring_capacity = options.ring_capacity.clamp(1, MAX_RING).next_power_of_two();
    let region_size = u64::try_from(options.region_size)
        .ok()
        .and_then(|r| r.checked_next_multiple_of(DATA_ALIGN))
        .unwrap_or(u64::MAX);
    let held_capacity = match options.max_held {
        Some(n) => n.clamp(1, MAX_RING).next_power_of_two(),
        // The release ring takes at most 1/16 of the region: 65 536
        // entries (512 KiB) from a 8 MiB region on.
        None => {
            let fits = (region_size / 128).clamp(1, u64::from(MAX_RING));
            // A power of two at most 2^16: fits.
            #[allow(clippy::cast_possible_truncation)]
            let fits = 1u32 << (63 - fits.leading_zeros());
            fits.max(ring_capacity)
        }
    };
    let geometry = Geometry {
        region_size,
        ring_capacity,
        held_capacity,
    };
    geometry.validate().map_err(|_| {
        SetupError::InvalidOptions(InvalidOptions::RegionSize {
            requested: options.region_size,
            min: Geometry::region_for(ring_capacity, held_capacity, DATA_ALIGN),
            max: MAX_REGION,
        })
    })
}

impl Channel {
    /// Creates a connected pair of channel ends in this process, over a
    /// `socketpair`. Typical use: make a pair, `fork`, and let each process
    /// drop the end it does not use.
    ///
    /// # Errors
    ///
    /// [`SetupError::Io`] when the socket, memfd or mapping cannot be created.
    pub fn pair() -> Result<(Channel, Channel), SetupError> {
        Channel::pair_with(&Options::default())
    }

    /// [`pair`](Channel::pair) with options (both ends use the same).
    ///
    /// # Errors
    ///
    /// As [`pair`](Channel::pair); [`SetupError::InvalidOptions`] for a
    /// region size the format does not allow.
    pub fn pair_with(options: &Options) -> Result<(Channel, Channel), SetupError> {
        let (a, b) = UnixStream::pair()?;
        if options.wire == Wire::Plain {
            let a = Channel::over_stream(Socket::Unix(a), options)?;
            return Ok((a, Channel::over_stream(Socket::Unix(b), options)?));
        }
        let a = HalfOpen::start(a, options)?;
        let b = HalfOpen::start(b, options)?;
        // Both hellos first, then both verdicts: one thread plays both ends.
        let (a, b) = (a.hear()?, b.hear()?);
        Ok((a.finish()?, b.finish()?))
    }

    /// Sets up a channel over an already connected Unix stream socket (from a
    /// listener, `connect`, or an inherited descriptor). The peer must do the
    /// same on its end. Blocks until the peer's hello arrives, at most
    /// `Options::setup_timeout`.
    ///
    /// # Errors
    ///
    /// [`SetupError::Timeout`] when the peer stays silent,
    /// [`SetupError::Disconnected`] when it goes away first,
    /// [`SetupError::Protocol`] when its hello or region is unacceptable,
    /// [`SetupError::Io`] when the OS refuses.
    pub fn from_stream(stream: UnixStream) -> Result<Channel, SetupError> {
        Channel::from_stream_with(stream, &Options::default())
    }

    /// [`from_stream`](Channel::from_stream) with options.
    ///
    /// # Errors
    ///
    /// As [`from_stream`](Channel::from_stream).
    pub fn from_stream_with(stream: UnixStream, options: &Options) -> Result<Channel, SetupError> {
        if options.wire == Wire::Plain {
            return Channel::over_stream(Socket::Unix(stream), options);
        }
        HalfOpen::start(stream, options)?.finish()
    }

    /// A [stream channel](Transport::Stream) over a connected TCP socket:
    /// capnp's standard framing from the first byte, so the peer may be
    /// this crate or anything that speaks Cap'n Proto's stream format
    /// (`capnp::serialize::read_message` and `write_message`). The socket
    /// is made non-blocking and gets `TCP_NODELAY`; nothing is exchanged
    /// before the first message.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use capnp_shm::{Channel, Transport};
    /// let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let client = Channel::from_tcp(std::net::TcpStream::connect(listener.local_addr()?)?)?;
    /// let server = Channel::from_tcp(listener.accept()?.0)?;
    /// assert_eq!(server.transport(), Transport::Stream);
    /// let mut m = client.message();
    /// m.set_root(capnp::text::Reader::from("over tcp"))?;
    /// client.send(m).map_err(|e| e.into_error())?;
    /// assert_eq!(server.recv()?.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "over tcp");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SetupError::Io`] when the socket cannot be configured.
    pub fn from_tcp(stream: TcpStream) -> Result<Channel, SetupError> {
        Channel::from_tcp_with(stream, &Options::default())
    }

    /// [`from_tcp`](Channel::from_tcp) with options (those of the stream
    /// transport apply: the reader limits, the first segment size, the
    /// set-up timeout that bounds a drop's last flush).
    ///
    /// # Errors
    ///
    /// As [`from_tcp`](Channel::from_tcp).
    pub fn from_tcp_with(stream: TcpStream, options: &Options) -> Result<Channel, SetupError> {
        Channel::over_stream(Socket::Tcp(stream), options)
    }

    /// A stream channel end over `socket`, with no hello.
    pub(crate) fn over_stream(socket: Socket, options: &Options) -> Result<Channel, SetupError> {
        Channel::over_stream_with(socket, options, &[])
    }

    /// A stream channel end over `socket`, whose incoming stream begins
    /// with `read` (bytes a listener read to tell plain framing from a
    /// hello).
    pub(crate) fn over_stream_with(
        socket: Socket,
        options: &Options,
        read: &[u8],
    ) -> Result<Channel, SetupError> {
        let link = StreamLink::new(socket, options)?;
        Ok(Channel {
            tx: Sender {
                tx: Tx::Stream(StreamSend::new(Arc::clone(&link))),
            },
            rx: Receiver {
                rx: Rx::Stream(StreamRecv::new(link, read)),
            },
        })
    }

    /// Which transport this end uses: shared memory, or the stream
    /// (TCP, [`Wire::Plain`], or a negotiation that fell back).
    pub fn transport(&self) -> Transport {
        self.tx.transport()
    }

    /// Splits the end into its sending and receiving halves, to use from
    /// two threads. The end closes when both halves (and everything they
    /// lent out) have dropped.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = capnp_shm::Channel::pair()?;
    /// let (tx, rx) = a.split();
    /// let sender = std::thread::spawn(move || -> Result<(), capnp_shm::Error> {
    ///     let mut m = tx.message();
    ///     m.set_root(capnp::text::Reader::from("from a thread"))
    ///         .expect("a text root");
    ///     Ok(tx.send(m)?)
    /// });
    /// let got = b.recv()?;
    /// assert_eq!(got.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "from a thread");
    /// sender.join().unwrap()?;
    /// # drop(rx); Ok(()) }
    /// ```
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }

    /// The sending half, borrowed.
    pub fn sender(&self) -> &Sender {
        &self.tx
    }

    /// The receiving half, borrowed.
    pub fn receiver(&self) -> &Receiver {
        &self.rx
    }

    /// See [`Sender::message`].
    pub fn message(&self) -> MessageBuilder<'_> {
        self.tx.message()
    }

    /// See [`Sender::send`].
    ///
    /// # Errors
    ///
    /// As [`Sender::send`].
    pub fn send<A: Allocator>(&self, message: Builder<A>) -> Result<(), SendError<Builder<A>>> {
        self.tx.send(message)
    }

    /// See [`Sender::try_send`].
    ///
    /// # Errors
    ///
    /// As [`Sender::try_send`].
    pub fn try_send<A: Allocator>(
        &self,
        message: Builder<A>,
    ) -> Result<(), TrySendError<Builder<A>>> {
        self.tx.try_send(message)
    }

    /// See [`Sender::send_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Sender::send_timeout`].
    pub fn send_timeout<A: Allocator>(
        &self,
        message: Builder<A>,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<Builder<A>>> {
        self.tx.send_timeout(message, timeout)
    }

    /// See [`Receiver::recv`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::recv`].
    pub fn recv(&self) -> Result<Received<'_>, RecvError> {
        self.rx.recv()
    }

    /// See [`Receiver::try_recv`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::try_recv`].
    pub fn try_recv(&self) -> Result<Received<'_>, TryRecvError> {
        self.rx.try_recv()
    }

    /// See [`Receiver::recv_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::recv_timeout`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Received<'_>, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// See [`Receiver::iter`].
    pub fn iter(&self) -> Iter<'_> {
        self.rx.iter()
    }

    /// See [`Receiver::try_iter`].
    pub fn try_iter(&self) -> TryIter<'_> {
        self.rx.try_iter()
    }

    /// Sends `request` and waits for the peer's next message: the "ask, then
    /// wait for the answer" step of a request/response loop. Meant for a
    /// strict one-to-one exchange; with several requests in flight, pair
    /// answers with requests yourself (say, by an id in the message).
    ///
    /// # Errors
    ///
    /// The errors of [`send`](Channel::send) (without the message), then of
    /// [`recv`](Channel::recv).
    pub fn request<A: Allocator>(&self, request: Builder<A>) -> Result<Received<'_>, Error> {
        self.send(request)?;
        Ok(self.recv()?)
    }

    /// See [`Sender::is_sealed`].
    pub fn is_sealed(&self) -> bool {
        self.tx.is_sealed()
    }

    /// See [`Sender::capacity_bytes`].
    pub fn capacity_bytes(&self) -> usize {
        self.tx.capacity_bytes()
    }

    /// See [`Sender::spilled_segments`].
    pub fn spilled_segments(&self) -> u64 {
        self.tx.spilled_segments()
    }

    /// What this end has sent and received, and what each side holds: the
    /// counters of [`Sender::stats`] and [`Receiver::stats`]. A send that
    /// waits, or times out, while `send.held_by_peer` is at
    /// `send.held_limit` is waiting for the peer to drop messages.
    pub fn stats(&self) -> Stats {
        Stats {
            send: self.tx.stats(),
            recv: self.rx.stats(),
        }
    }

    /// See [`Receiver::incoming_range`].
    pub fn incoming_range(&self) -> std::ops::Range<usize> {
        self.rx.incoming_range()
    }
}

impl Sender {
    /// Starts a message, built directly in the outgoing region. Fill it with
    /// capnp's builder API and pass it to [`send`](Sender::send); dropping
    /// it unsent gives its space back.
    pub fn message(&self) -> MessageBuilder<'_> {
        match &self.tx {
            // The first segment claims the end for this process (or, in a
            // process that does not own it, comes from the heap; `send`
            // fails).
            Tx::Shm(side) => {
                let words = side.link().options().first_segment_words;
                Builder::new(RegionAllocator::new(side, words))
            }
            Tx::Stream(side) => {
                let words = side.link().options().first_segment_words;
                Builder::new(RegionAllocator::heap(words))
            }
        }
    }

    /// Which transport this half uses; see [`Channel::transport`].
    pub fn transport(&self) -> Transport {
        match self.tx {
            Tx::Shm(_) => Transport::SharedMemory,
            Tx::Stream(_) => Transport::Stream,
        }
    }

    /// Sends a message, waiting while the peer holds too many earlier ones.
    ///
    /// A builder from [`message`](Sender::message) is published in place;
    /// segments that could not be placed in the region while building (and
    /// builders of another allocator) are copied in.
    ///
    /// # Errors
    ///
    /// [`SendError::Disconnected`] when the peer has closed or died;
    /// [`SendError::TooLarge`] when the message can never fit (the channel
    /// stays usable); [`SendError::Failed`] when this end failed or is not
    /// this process's. The message comes back in every case.
    pub fn send<A: Allocator>(&self, message: Builder<A>) -> Result<(), SendError<Builder<A>>> {
        let mut message = message;
        loop {
            // Without a deadline a send never expires; an expiry waits again.
            message = match self.send_until(message, Deadline::Never) {
                Ok(()) => return Ok(()),
                Err((halt, m)) => halt.into_send_error(m)?,
            };
        }
    }

    /// Sends a message if there is room now.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] when the peer holds too many messages, and
    /// the errors of [`send`](Sender::send); the message comes back.
    pub fn try_send<A: Allocator>(
        &self,
        message: Builder<A>,
    ) -> Result<(), TrySendError<Builder<A>>> {
        self.send_until(message, Deadline::Now)
            .map_err(|(halt, m)| halt.into_try_send_error(m))
    }

    /// Sends a message, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// [`SendTimeoutError::Timeout`] when no room came in time, and the
    /// errors of [`send`](Sender::send); the message comes back.
    pub fn send_timeout<A: Allocator>(
        &self,
        message: Builder<A>,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<Builder<A>>> {
        self.send_until(message, Deadline::after(timeout))
            .map_err(|(halt, m)| halt.into_send_timeout_error(m))
    }

    /// Sends a copy of a heap-built message the caller keeps, waiting while
    /// the peer holds too many earlier ones: one copy of each segment into
    /// the region, no traversal. For owners that must keep the builder after
    /// sending, such as Cap'n Proto RPC, which rereads its outgoing Returns.
    /// (A message built with [`message`](Sender::message) is sent in place by
    /// [`send`](Sender::send) instead, with no copy.)
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = capnp_shm::Channel::pair()?;
    /// let mut kept = capnp::message::Builder::new_default();
    /// kept.set_root(capnp::text::Reader::from("kept"))?;
    /// a.sender().send_copy(&kept).map_err(|e| e.into_error())?;
    /// assert_eq!(b.recv()?.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "kept");
    /// assert_eq!(kept.get_root_as_reader::<capnp::text::Reader<'_>>()?.to_str()?, "kept");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`send`](Sender::send), with `()` in place of the message.
    pub fn send_copy(&self, message: &Builder<HeapAllocator>) -> Result<(), SendError<()>> {
        // Without a deadline a send never expires; an expiry waits again.
        while let Err(halt) = self.publish(message, Deadline::Never) {
            halt.into_send_error(())?;
        }
        Ok(())
    }

    /// As [`send_copy`](Sender::send_copy), if there is room now: the
    /// non-blocking send of an event loop (see [`arm`](Sender::arm)).
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] when the peer holds too many messages, and
    /// the errors of [`send`](Sender::send), with `()` for the message.
    pub fn try_send_copy(&self, message: &Builder<HeapAllocator>) -> Result<(), TrySendError<()>> {
        self.publish(message, Deadline::Now)
            .map_err(|halt| halt.into_try_send_error(()))
    }

    fn send_until<A: Allocator>(
        &self,
        message: Builder<A>,
        deadline: Deadline,
    ) -> Result<(), (SendHalt, Builder<A>)> {
        match self.publish(&message, deadline) {
            // Dropping the builder now finds its region segments sent (no
            // longer open) and frees only heap segments. No allocation may
            // happen between the publish and this drop.
            Ok(()) => {
                drop(message);
                Ok(())
            }
            Err(halt) => Err((halt, message)),
        }
    }

    /// Publishes `message`'s segments: in place where they lie in this
    /// end's region as open extents, copied in otherwise (always, for a
    /// heap builder, which never holds region words: the caller keeps it).
    fn publish<A: Allocator>(
        &self,
        message: &Builder<A>,
        deadline: Deadline,
    ) -> Result<(), SendHalt> {
        let output = message.get_segments_for_output();
        let empty: [&[u8]; 1] = [&EMPTY_SEGMENT];
        let segments: &[&[u8]] = if output.is_empty() { &empty } else { &output };
        match &self.tx {
            Tx::Shm(side) => side.send(segments, deadline),
            Tx::Stream(side) => side.send(segments, deadline),
        }
    }

    /// Whether this end's outgoing region is a sealed memfd (rather than an
    /// unsealed `/dev/shm` file). `false` on a stream channel, which has no
    /// region.
    pub fn is_sealed(&self) -> bool {
        match &self.tx {
            Tx::Shm(side) => side.link().own().is_sealed(),
            Tx::Stream(_) => false,
        }
    }

    /// Bytes available for message data in the outgoing region, the part of
    /// the outgoing space that is always mapped (areas added on demand come
    /// on top, up to [`Options::max_outgoing`]); 0 on a stream channel,
    /// which has no region (its messages are bounded by the receiver's
    /// reader limits only).
    pub fn capacity_bytes(&self) -> usize {
        match &self.tx {
            Tx::Shm(side) => usize::try_from(side.link().own().data_bytes()).unwrap_or(usize::MAX),
            Tx::Stream(_) => 0,
        }
    }

    /// How many segments were built on the heap because the region was full
    /// at the time, and copied in at send. Zero in a well-sized channel
    /// (and on a stream channel, whose segments are all on the heap).
    pub fn spilled_segments(&self) -> u64 {
        self.stats().spilled_segments
    }

    /// Readiness for an event loop, after a `try_send` found no room
    /// ([`TrySendError::Full`]): asks the peer to ring this channel's
    /// descriptor when it releases a message (or closes, or dies), then
    /// checks once more that no release came meanwhile. On
    /// [`Readiness::Armed`], wait for the descriptor ([`AsFd`]) to become
    /// readable, then `disarm()` and `try_send` again; on
    /// [`Readiness::Ready`], try again at once. The same loop as
    /// [`Receiver::arm`], whose descriptor this shares. On a stream channel
    /// it says [`Readiness::Writable`] instead of `Armed`: wait for the
    /// descriptor to become writable.
    ///
    /// # Errors
    ///
    /// When the end has failed, or belongs to another process.
    pub fn arm(&self) -> Result<Readiness, crate::Failure> {
        match &self.tx {
            Tx::Shm(side) => side.arm(),
            Tx::Stream(side) => side.arm(),
        }
    }

    /// Ends the stream now, while the halves (or messages received from
    /// the peer) live on: the peer receives everything sent before, then
    /// `Disconnected`; sends here and there fail with `Disconnected` from
    /// now on. Messages either side holds stay readable. Dropping the whole
    /// end does the same; this is for owners that outlive their stream,
    /// such as an RPC connection after `shutdown`. In a process that does
    /// not own the end (a copy inherited across `fork` by the other side),
    /// it does nothing.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = capnp_shm::Channel::pair()?;
    /// let (tx, _rx) = a.split();
    /// let mut m = tx.message();
    /// m.set_root(capnp::text::Reader::from("last"))?;
    /// tx.send(m).map_err(|e| e.into_error())?;
    /// tx.close();
    /// assert!(b.recv().is_ok());
    /// assert!(matches!(b.recv(), Err(capnp_shm::RecvError::Disconnected)));
    /// assert!(matches!(tx.try_send(tx.message()), Err(capnp_shm::TrySendError::Disconnected(_))));
    /// # Ok(()) }
    /// ```
    ///
    /// On a stream channel, what the socket has not taken yet is written
    /// first (waiting at most `Options::setup_timeout`), then the socket's
    /// sending side is shut down.
    pub fn close(&self) {
        match &self.tx {
            Tx::Shm(side) => side.link().close_asked(),
            Tx::Stream(side) => {
                let _ = side.flush(Deadline::after(side.link().options().setup_timeout));
                side.link().close_asked();
            }
        }
    }

    /// Writes what a [`try_send`](Sender::try_send) on a stream channel
    /// left unsent (the socket took only part of the message), as far as
    /// the socket takes it now. A stream sender that sent with `try_send`
    /// and then waits for its peer's answer must flush first: until then
    /// [`is_ready`](Sender::is_ready) is `false` and [`arm`](Sender::arm)
    /// says [`Readiness::Writable`]. Blocking sends (`send`,
    /// `send_timeout`) write whole messages and leave nothing. On a
    /// shared-memory channel there is never anything to flush.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] while part remains; `Disconnected` and
    /// `Failed` as for [`try_send`](Sender::try_send).
    pub fn try_flush(&self) -> Result<(), TrySendError<()>> {
        match &self.tx {
            Tx::Shm(_) => Ok(()),
            Tx::Stream(side) => side.flush(Deadline::Now).map_err(|halt| match halt {
                Halt::Expired => TrySendError::Full(()),
                Halt::Disconnected => TrySendError::Disconnected(()),
                Halt::Failed(f) => TrySendError::Failed((), f),
            }),
        }
    }

    /// Withdraws [`arm`](Sender::arm): the peer stops ringing.
    pub fn disarm(&self) {
        match &self.tx {
            Tx::Shm(side) => side.disarm(),
            Tx::Stream(_) => {}
        }
    }

    /// Whether a send that found no room ([`TrySendError::Full`]) could find
    /// some now: the peer has released a message since, or the channel
    /// ended. A few loads of shared memory, no system call, nothing armed:
    /// the sending counterpart of [`Receiver::is_ready`].
    pub fn is_ready(&self) -> bool {
        match &self.tx {
            Tx::Shm(side) => side.ready(),
            Tx::Stream(side) => side.ready(),
        }
    }

    /// What this half has sent, and what the peer holds of it: a send that
    /// waits while `held_by_peer` is at `held_limit` waits for the peer to
    /// drop messages; one that waits with room left in the ring waits for
    /// region space (`free_bytes`).
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = capnp_shm::Channel::pair()?;
    /// let mut m = a.message();
    /// m.set_root::<capnp::data::Owned>(&[7u8; 200][..])?;
    /// a.send(m).map_err(|e| e.into_error())?;
    /// let held = b.recv()?; // read in place: held until dropped
    /// let mut m = a.message();
    /// m.set_root(capnp::text::Reader::from("small"))?;
    /// a.send(m).map_err(|e| e.into_error())?;
    /// let carried = b.recv()?; // carried in its descriptor: holds nothing
    /// assert!(carried.is_copied());
    /// let stats = a.sender().stats();
    /// assert_eq!((stats.messages, stats.held_by_peer), (2, 1));
    /// drop(held);
    /// # Ok(()) }
    /// ```
    ///
    /// On a stream channel only `messages`, `bytes` and `sleeps` count: the
    /// peer's holdings are its own.
    pub fn stats(&self) -> SendStats {
        match &self.tx {
            Tx::Shm(side) => side.stats(),
            Tx::Stream(side) => side.stats(),
        }
    }
}

impl Receiver {
    /// Receives the next message, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`RecvError::Disconnected`] once the peer has closed or died and
    /// every message it sent has been received; [`RecvError::Failed`] when
    /// the peer published something invalid, the OS refused, or this end is
    /// not this process's.
    pub fn recv(&self) -> Result<Received<'_>, RecvError> {
        match &self.rx {
            Rx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return Received::one(side, one, RecvError::Failed);
                }
                let taken = take_blocking(|d| side.recv(d))?;
                Received::new(side, taken).map_err(RecvError::Failed)
            }
            Rx::Stream(side) => Ok(Received::framed(side, take_blocking(|d| side.recv(d))?)),
        }
    }

    /// Receives a message if one is waiting.
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`] when none is, and the errors of
    /// [`recv`](Receiver::recv).
    pub fn try_recv(&self) -> Result<Received<'_>, TryRecvError> {
        match &self.rx {
            Rx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return Received::one(side, one, TryRecvError::Failed);
                }
                let taken = take_now(side.recv(Deadline::Now))?;
                Received::new(side, taken).map_err(TryRecvError::Failed)
            }
            Rx::Stream(side) => Ok(Received::framed(side, take_now(side.recv(Deadline::Now))?)),
        }
    }

    /// Receives a message, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`RecvTimeoutError::Timeout`] when none came in time, and the errors
    /// of [`recv`](Receiver::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Received<'_>, RecvTimeoutError> {
        match &self.rx {
            Rx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return Received::one(side, one, RecvTimeoutError::Failed);
                }
                let taken = take_within(side.recv(Deadline::after(timeout)))?;
                Received::new(side, taken).map_err(RecvTimeoutError::Failed)
            }
            Rx::Stream(side) => Ok(Received::framed(
                side,
                take_within(side.recv(Deadline::after(timeout)))?,
            )),
        }
    }

    /// Which transport this half uses; see [`Channel::transport`].
    pub fn transport(&self) -> Transport {
        match self.rx {
            Rx::Shm(_) => Transport::SharedMemory,
            Rx::Stream(_) => Transport::Stream,
        }
    }

    /// This receiver, shared by reference counting within one thread, so
    /// that what it receives can own a handle to it:
    /// [`SharedReceiver::recv`] returns `'static` [`OwnedReceived`]
    /// messages, for queues, boxes and async runtimes (the RPC crate keeps
    /// incoming messages that way). Clones share the receiver.
    pub fn into_shared(self) -> SharedReceiver {
        SharedReceiver {
            rx: match self.rx {
                Rx::Shm(side) => SharedRx::Shm(Rc::new(side)),
                Rx::Stream(side) => SharedRx::Stream(Rc::new(side)),
            },
        }
    }

    /// An iterator that receives messages, waiting for each, until the
    /// peer has closed (or died) and every message it sent has come:
    /// `for m in receiver.iter() { let m = m?; ... }`. A failure is the
    /// last item.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (a, b) = capnp_shm::Channel::pair()?;
    /// for n in 0..3u64 {
    ///     let mut m = a.message();
    ///     m.set_root::<capnp::primitive_list::Owned<u64>>(&[n][..])?;
    ///     a.send(m).map_err(|e| e.into_error())?;
    /// }
    /// drop(a);
    /// let mut sum = 0;
    /// for m in b.receiver().iter() {
    ///     sum += m?.get_root::<capnp::primitive_list::Reader<'_, u64>>()?.get(0);
    /// }
    /// assert_eq!(sum, 3);
    /// # Ok(()) }
    /// ```
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            receiver: Some(self),
        }
    }

    /// An iterator over the messages waiting now: it ends when none is
    /// (or the peer is gone); a failure is the last item.
    pub fn try_iter(&self) -> TryIter<'_> {
        TryIter {
            receiver: Some(self),
        }
    }

    /// Readiness for an event loop of your own (`poll`, `epoll`, mio,
    /// tokio's `AsyncFd`): asks the peer to ring this channel's descriptor
    /// when it publishes, closes or dies, then checks once more that
    /// nothing is there (the same announce-then-recheck handshake as a
    /// blocking `recv`, so no wake-up is lost). The loop:
    ///
    /// 1. `try_recv` until `Empty`;
    /// 2. `arm()`: on [`Readiness::Ready`] go back to 1; on
    ///    [`Readiness::Armed`] wait for the descriptor ([`AsFd`]) to become
    ///    readable, along with whatever else the loop waits for;
    /// 3. `disarm()`, and go back to 1.
    ///
    /// Arming polls the socket once (which reads away old doorbell bytes
    /// and notices a dead peer). The descriptor is shared with the
    /// [`Sender`]'s readiness: after a wake, check both. On a stream
    /// channel the same loop works: `Armed` means the socket has no whole
    /// message yet, and it becomes readable when more bytes come.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use capnp_shm::{Channel, Readiness, TryRecvError};
    /// use std::os::fd::{AsFd, AsRawFd};
    ///
    /// let (a, b) = Channel::pair()?;
    /// let rx = b.receiver();
    /// assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
    /// assert_eq!(rx.arm()?, Readiness::Armed);
    /// let mut m = a.message();
    /// m.set_root(capnp::text::Reader::from("ring"))?;
    /// a.send(m).map_err(|e| e.into_error())?; // the peer sees us armed and rings
    /// let mut fd = libc::pollfd { fd: b.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    /// // SAFETY: one valid pollfd for the call.
    /// assert_eq!(unsafe { libc::poll(&mut fd, 1, 5_000) }, 1);
    /// rx.disarm();
    /// assert_eq!(rx.try_recv()?.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "ring");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// When the end has failed, or belongs to another process.
    pub fn arm(&self) -> Result<Readiness, crate::Failure> {
        match &self.rx {
            Rx::Shm(side) => side.arm(),
            Rx::Stream(side) => side.arm(),
        }
    }

    /// Withdraws [`arm`](Receiver::arm): the peer stops ringing.
    pub fn disarm(&self) {
        match &self.rx {
            Rx::Shm(side) => side.disarm(),
            Rx::Stream(_) => {}
        }
    }

    /// Whether [`try_recv`](Receiver::try_recv) would now return something
    /// other than `Empty` (a message, the end of the channel, a failure):
    /// a few loads of shared memory, no system call, nothing armed. For
    /// event loops that look for work for a while before they
    /// [`arm`](Receiver::arm) and sleep. On a stream channel it sees only
    /// what has been read from the socket already (a whole message in the
    /// receive buffer); `arm` and the descriptor see the rest.
    pub fn is_ready(&self) -> bool {
        match &self.rx {
            Rx::Shm(side) => side.ready(),
            Rx::Stream(side) => side.ready(),
        }
    }

    /// The address range of the peer's region as mapped here. Received
    /// segments read in place lie inside it. (It is followed by 1 MiB of
    /// read-only zero pages; see the README's trust model.) Empty on a
    /// stream channel.
    pub fn incoming_range(&self) -> std::ops::Range<usize> {
        match &self.rx {
            Rx::Shm(side) => side.link().peer().address_range(),
            Rx::Stream(_) => 0..0,
        }
    }

    /// What this half has received, and how many received messages it
    /// still holds.
    pub fn stats(&self) -> RecvStats {
        match &self.rx {
            Rx::Shm(side) => side.stats(),
            Rx::Stream(side) => side.stats(),
        }
    }

    pub(crate) fn rx(&self) -> &Rx {
        &self.rx
    }
}

/// The next message, waiting as long as it takes.
fn take_blocking<T>(recv: impl Fn(Deadline) -> Result<T, Halt>) -> Result<T, RecvError> {
    loop {
        return match recv(Deadline::Never) {
            Ok(taken) => Ok(taken),
            // Without a deadline a receive never expires; wait again.
            Err(Halt::Expired) => continue,
            Err(Halt::Failed(f)) => Err(RecvError::Failed(f)),
            Err(Halt::Disconnected) => Err(RecvError::Disconnected),
        };
    }
}

/// What a receive that does not wait found.
fn take_now<T>(got: Result<T, Halt>) -> Result<T, TryRecvError> {
    got.map_err(|halt| match halt {
        Halt::Expired => TryRecvError::Empty,
        Halt::Failed(f) => TryRecvError::Failed(f),
        Halt::Disconnected => TryRecvError::Disconnected,
    })
}

/// What a receive with a deadline found.
fn take_within<T>(got: Result<T, Halt>) -> Result<T, RecvTimeoutError> {
    got.map_err(|halt| match halt {
        Halt::Expired => RecvTimeoutError::Timeout,
        Halt::Failed(f) => RecvTimeoutError::Failed(f),
        Halt::Disconnected => RecvTimeoutError::Disconnected,
    })
}

/// A [`Receiver`] shared by reference counting in one thread, whose
/// messages own a handle to it; from [`Receiver::into_shared`]. Not
/// `Send`. Clones share the receiver (and its position in the stream).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::{Channel, OwnedReceived};
///
/// let (a, b) = Channel::pair()?;
/// let (_tx, rx) = b.split();
/// let rx = rx.into_shared();
/// let mut queue: Vec<OwnedReceived> = Vec::new(); // no borrow of `rx`
/// for n in 0..3u64 {
///     let mut m = a.message();
///     m.set_root::<capnp::primitive_list::Owned<u64>>(&[n][..])?;
///     a.send(m).map_err(|e| e.into_error())?;
///     queue.push(rx.recv()?);
/// }
/// let sum: u64 = queue
///     .iter()
///     .map(|m| m.get_root::<capnp::primitive_list::Reader<'_, u64>>().map(|l| l.get(0)))
///     .sum::<capnp::Result<u64>>()?;
/// assert_eq!(sum, 3);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SharedReceiver {
    rx: SharedRx,
}

#[derive(Clone)]
enum SharedRx {
    Shm(Rc<RecvSide>),
    Stream(Rc<StreamRecv>),
}

impl SharedReceiver {
    /// As [`Receiver::recv`], for a message that owns a handle to this
    /// receiver.
    ///
    /// # Errors
    ///
    /// As [`Receiver::recv`].
    pub fn recv(&self) -> Result<OwnedReceived, RecvError> {
        match &self.rx {
            SharedRx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return OwnedReceived::new(Rc::clone(side), one.into_taken())
                        .map_err(RecvError::Failed);
                }
                let taken = take_blocking(|d| side.recv(d))?;
                OwnedReceived::new(Rc::clone(side), taken).map_err(RecvError::Failed)
            }
            SharedRx::Stream(side) => {
                let frame = take_blocking(|d| side.recv(d))?;
                Ok(OwnedReceived::framed(Rc::clone(side), frame))
            }
        }
    }

    /// As [`Receiver::try_recv`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::try_recv`].
    pub fn try_recv(&self) -> Result<OwnedReceived, TryRecvError> {
        match &self.rx {
            SharedRx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return OwnedReceived::new(Rc::clone(side), one.into_taken())
                        .map_err(TryRecvError::Failed);
                }
                let taken = take_now(side.recv(Deadline::Now))?;
                OwnedReceived::new(Rc::clone(side), taken).map_err(TryRecvError::Failed)
            }
            SharedRx::Stream(side) => {
                let frame = take_now(side.recv(Deadline::Now))?;
                Ok(OwnedReceived::framed(Rc::clone(side), frame))
            }
        }
    }

    /// As [`Receiver::recv_timeout`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::recv_timeout`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<OwnedReceived, RecvTimeoutError> {
        match &self.rx {
            SharedRx::Shm(side) => {
                if let Some(one) = side.take_one() {
                    return OwnedReceived::new(Rc::clone(side), one.into_taken())
                        .map_err(RecvTimeoutError::Failed);
                }
                let taken = take_within(side.recv(Deadline::after(timeout)))?;
                OwnedReceived::new(Rc::clone(side), taken).map_err(RecvTimeoutError::Failed)
            }
            SharedRx::Stream(side) => {
                let frame = take_within(side.recv(Deadline::after(timeout)))?;
                Ok(OwnedReceived::framed(Rc::clone(side), frame))
            }
        }
    }

    /// As [`Receiver::arm`].
    ///
    /// # Errors
    ///
    /// As [`Receiver::arm`].
    pub fn arm(&self) -> Result<Readiness, crate::Failure> {
        match &self.rx {
            SharedRx::Shm(side) => side.arm(),
            SharedRx::Stream(side) => side.arm(),
        }
    }

    /// As [`Receiver::disarm`].
    pub fn disarm(&self) {
        match &self.rx {
            SharedRx::Shm(side) => side.disarm(),
            SharedRx::Stream(_) => {}
        }
    }

    /// As [`Receiver::is_ready`].
    pub fn is_ready(&self) -> bool {
        match &self.rx {
            SharedRx::Shm(side) => side.ready(),
            SharedRx::Stream(side) => side.ready(),
        }
    }

    /// As [`Receiver::stats`].
    pub fn stats(&self) -> RecvStats {
        match &self.rx {
            SharedRx::Shm(side) => side.stats(),
            SharedRx::Stream(side) => side.stats(),
        }
    }

    /// As [`Receiver::incoming_range`].
    pub fn incoming_range(&self) -> std::ops::Range<usize> {
        match &self.rx {
            SharedRx::Shm(side) => side.link().peer().address_range(),
            SharedRx::Stream(_) => 0..0,
        }
    }

    /// As [`Receiver::transport`].
    pub fn transport(&self) -> Transport {
        match self.rx {
            SharedRx::Shm(_) => Transport::SharedMemory,
            SharedRx::Stream(_) => Transport::Stream,
        }
    }
}

impl AsFd for SharedReceiver {
    /// As for [`Receiver`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.rx {
            SharedRx::Shm(side) => side.link().socket(),
            SharedRx::Stream(side) => side.link().socket(),
        }
    }
}

impl fmt::Debug for SharedReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SharedReceiver");
        match &self.rx {
            SharedRx::Shm(side) => d.field("link", side.link()),
            SharedRx::Stream(side) => d.field("link", side.link()),
        };
        d.field("stats", &self.stats()).finish()
    }
}

/// Receives messages until the peer is gone; see [`Receiver::iter`].
#[derive(Debug)]
pub struct Iter<'r> {
    receiver: Option<&'r Receiver>,
}

impl<'r> Iterator for Iter<'r> {
    type Item = Result<Received<'r>, crate::Failure>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver?.recv() {
            Ok(m) => Some(Ok(m)),
            Err(RecvError::Disconnected) => {
                self.receiver = None;
                None
            }
            Err(RecvError::Failed(f)) => {
                self.receiver = None;
                Some(Err(f))
            }
        }
    }
}

/// The messages waiting now; see [`Receiver::try_iter`].
#[derive(Debug)]
pub struct TryIter<'r> {
    receiver: Option<&'r Receiver>,
}

impl<'r> Iterator for TryIter<'r> {
    type Item = Result<Received<'r>, crate::Failure>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver?.try_recv() {
            Ok(m) => Some(Ok(m)),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                self.receiver = None;
                None
            }
            Err(TryRecvError::Failed(f)) => {
                self.receiver = None;
                Some(Err(f))
            }
        }
    }
}

impl<'r> IntoIterator for &'r Receiver {
    type Item = Result<Received<'r>, crate::Failure>;
    type IntoIter = Iter<'r>;

    fn into_iter(self) -> Iter<'r> {
        self.iter()
    }
}

impl AsRef<Sender> for Channel {
    fn as_ref(&self) -> &Sender {
        &self.tx
    }
}

impl AsRef<Sender> for Sender {
    fn as_ref(&self) -> &Sender {
        self
    }
}

impl AsRef<Receiver> for Channel {
    fn as_ref(&self) -> &Receiver {
        &self.rx
    }
}

impl AsRef<Receiver> for Receiver {
    fn as_ref(&self) -> &Receiver {
        self
    }
}

impl AsFd for Channel {
    /// The channel's socket (for `poll`ing it for hang-up; do not read or
    /// write it).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

impl AsFd for Sender {
    /// The channel's socket, shared with the [`Receiver`] (do not read or
    /// write it).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.tx {
            Tx::Shm(side) => side.link().socket(),
            Tx::Stream(side) => side.link().socket(),
        }
    }
}

impl AsFd for Receiver {
    /// The channel's socket, shared with the [`Sender`] (do not read or
    /// write it).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.rx {
            Rx::Shm(side) => side.link().socket(),
            Rx::Stream(side) => side.link().socket(),
        }
    }
}

impl Sender {
    /// What this end is over, for `Debug`.
    fn link(&self) -> &dyn fmt::Debug {
        match &self.tx {
            Tx::Shm(side) => side.link(),
            Tx::Stream(side) => side.link(),
        }
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("link", self.tx.link())
            .field("stats", &self.stats())
            .finish()
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("link", self.link())
            .field("stats", &self.stats())
            .finish()
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Receiver");
        match &self.rx {
            Rx::Shm(side) => d.field("link", side.link()),
            Rx::Stream(side) => d.field("link", side.link()),
        };
        d.field("stats", &self.stats()).finish()
    }
}

// The halves and the whole may move to another thread (each owns what it
// uses); none is Sync: one thread uses each at a time.
const _: () = {
    fn assert_send<T: Send>() {}
    fn check() {
        assert_send::<Channel>();
        assert_send::<Sender>();
        assert_send::<Receiver>();
    }
    let _ = check;
};
