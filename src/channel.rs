//! The public owner type: one end of a connection.
//!
//! # Waiting, and why no wake is lost
//!
//! A receiver with nothing to read spins (an adaptive budget of at most
//! `Options::spin`, see `spin.rs`), then sleeps in `FUTEX_WAIT` on the peer's
//! `published` word. A sender with no room spins,
//! then sleeps on the peer's `released` word. Each sleeper announces itself
//! with a flag in its own region, and each waker checks that flag:
//!
//! ```text
//! receiver (sleeper)                     sender (waker)
//! S1 store rx_sleeping = 1   (SeqCst)    W1 store published = n  (SeqCst)
//! S2 load  published         (SeqCst)    W2 load  rx_sleeping    (SeqCst)
//! S3 if unchanged: FUTEX_WAIT(published, old)
//!                                        W3 if flag set: FUTEX_WAKE(published)
//! ```
//!
//! All four accesses are `SeqCst`, so they fall in one total order (also
//! across processes: it is the same hardware coherence on the same physical
//! memory). If S2 comes before W1 in that order then S1 comes before W2, so
//! the sender sees the flag and wakes. Otherwise S2 sees `n` and the receiver
//! does not sleep. A wake that lands between S2 and S3 is not lost either:
//! `FUTEX_WAIT` compares the word with `old` inside the kernel and returns
//! at once when it changed. The same argument, with `tx_sleeping` and
//! `released`, covers a sender waiting for space.
//!
//! A futex cannot see a dead process, so every sleep is at most
//! `Options::wait_slice`. After a slice that brought nothing, the waiter polls
//! the socket: a peer that died (even by `SIGKILL`) has had its end of the
//! socket closed by the kernel, which shows as hang-up. A peer that closes
//! cleanly sets `closed` (after its last publish) and wakes every word at
//! once. Waiters sleep on their counter *and* on the peer's `closed` word
//! (`futex_waitv`, Linux 5.16), so a close that lands between a waiter's
//! check and its sleep changes a word it sleeps on and cannot be slept
//! through. (Without `futex_waitv` the waiter sleeps on the counter alone,
//! and such a close is seen when the slice ends.)
//!
//! The receiver spins on the next descriptor's tag rather than on
//! `published` (one cache miss less per message); the tag is stored before
//! `published`, so the sleep path's check of `published` never misses a
//! message the spin saw, and `published` may trail by the one message whose
//! tag was seen first.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capnp::message::Builder;

use crate::alloc::RegionAllocator;
use crate::error::{Error, ProtocolError, SendError};
use crate::handshake::{self, Hello};
use crate::layout::{
    Geometry, AWAKE, DATA_ALIGN, DOORBELL, MAX_REGION, MAX_RING, SLEEPING_ON_FUTEX,
    SLEEPING_ON_SOCKET,
};
use crate::message::{Received, Segments};
use crate::options::Options;
use crate::receiver::RxBook;
use crate::region::{InRegion, OutRegion};
use crate::sender::TxBook;
use crate::spin::SpinBudget;
use crate::sys::{self, futex, socket};

/// A message being built in a channel's outgoing region; see [`Channel::message`].
pub type MessageBuilder<'c> = Builder<RegionAllocator<'c>>;

/// How often (in sends) a sender that never waits checks the socket for
/// hang-up, subject to at most one check per wait slice.
const SENDS_PER_LIVENESS_CHECK: u32 = 64;

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
/// A `Channel` is [`Send`] but not [`Sync`]: one thread owns each end at a
/// time. Builders and received messages borrow it. Dropping it tells the peer,
/// which still receives every message sent before, then
/// [`Error::Disconnected`].
///
/// # Fork
///
/// Make a [`pair`](Channel::pair), `fork`, and let each process drop the end
/// it does not use. An end belongs to the first process that uses it (builds,
/// sends or receives); only that process announces the close when dropping
/// it, so dropping an inherited, unused copy leaves the channel alone.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::Channel;
///
/// let (left, right) = Channel::pair()?;
/// let mut message = left.message();
/// message.set_root(capnp::text::Reader::from("hello"))?;
/// left.send(message)?;
///
/// let received = right.recv()?;
/// assert_eq!(received.get_root::<capnp::text::Reader<'_>>()?.to_str()?, "hello");
/// # Ok(()) }
/// ```
pub struct Channel {
    socket: OwnedFd,
    out: OutRegion,
    incoming: InRegion,
    tx: RefCell<TxBook>,
    rx: RxBook,
    /// The fatal error that ended the channel, returned again by every call.
    failed: RefCell<Option<Error>>,
    /// Whether `failed` is set: the hot paths test this plain flag.
    broken: Cell<bool>,
    /// The socket showed hang-up: the peer's process is gone.
    peer_gone: Cell<bool>,
    /// Segments the allocator had to take from the heap (region full).
    spilled: Cell<u64>,
    /// When a non-blocking call last polled the socket for hang-up.
    last_liveness_check: Cell<Option<Instant>>,
    /// Sends since the counter wrapped (see `SENDS_PER_LIVENESS_CHECK`).
    sends_since_liveness: Cell<u32>,
    /// How long a receive spins before it sleeps (adaptive).
    rx_spin: SpinBudget,
    /// How long a blocked send spins before it sleeps (adaptive).
    tx_spin: SpinBudget,
    options: Options,
    /// The process that first used this end (0: not used yet). Only it
    /// announces the close; see `Drop`.
    owner_pid: Cell<u32>,
}

/// A channel end that has sent its hello and waits for the peer's.
struct HalfOpen {
    socket: OwnedFd,
    out: OutRegion,
    options: Options,
    deadline: Instant,
}

impl HalfOpen {
    fn start(stream: UnixStream, options: &Options) -> Result<HalfOpen, Error> {
        // A timeout too large for the clock means no deadline to speak of.
        let deadline = Instant::now()
            .checked_add(options.setup_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let geometry = geometry_for(options)?;
        let socket = OwnedFd::from(stream);
        let (out, peer_fd) = OutRegion::create(geometry, options.backing)?;
        let hello = Hello {
            geometry,
            sealed: out.is_sealed(),
        };
        handshake::send_hello(socket.as_fd(), &hello, peer_fd.as_fd(), deadline)?;
        Ok(HalfOpen {
            socket,
            out,
            options: options.clone(),
            deadline,
        })
    }

    fn finish(self) -> Result<Channel, Error> {
        let (hello, fd) = handshake::recv_hello(self.socket.as_fd(), self.deadline)?;
        let accept_unsealed = self.options.allow_unsealed_peer || !self.out.is_sealed();
        let incoming = handshake::map_peer_region(&hello, &fd, accept_unsealed)?;
        // `fd` closes here; the mapping keeps the peer's file alive.
        let geometry = self.out.region().geometry();
        Ok(Channel {
            socket: self.socket,
            tx: RefCell::new(TxBook::new(geometry, hello.geometry.ring_capacity)),
            out: self.out,
            incoming,
            rx: RxBook::default(),
            failed: RefCell::new(None),
            broken: Cell::new(false),
            peer_gone: Cell::new(false),
            spilled: Cell::new(0),
            last_liveness_check: Cell::new(None),
            sends_since_liveness: Cell::new(0),
            rx_spin: SpinBudget::new(self.options.spin),
            tx_spin: SpinBudget::new(self.options.spin),
            options: self.options,
            owner_pid: Cell::new(0),
        })
    }
}

/// The outgoing geometry the options ask for, rounded to what the format allows.
fn geometry_for(options: &Options) -> Result<Geometry, Error> {
    let ring_capacity = options.ring_capacity.clamp(1, MAX_RING).next_power_of_two();
    let region_size = u64::try_from(options.region_size)
        .ok()
        .and_then(|r| r.checked_next_multiple_of(DATA_ALIGN))
        .unwrap_or(u64::MAX);
    let geometry = Geometry {
        region_size,
        ring_capacity,
    };
    geometry.validate().map_err(|_| {
        let min = Geometry::region_for(ring_capacity, DATA_ALIGN);
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("region size {region_size} is outside {min}..={MAX_REGION} bytes"),
        ))
    })
}

/// When a waiting call gives up.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// Do not wait at all.
    Now,
    /// Wait until this instant.
    At(Instant),
    /// Wait as long as it takes.
    Never,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Instant::now()
            .checked_add(timeout)
            .map_or(Deadline::Never, Deadline::At)
    }

    /// The next sleep: one slice, or what remains until the deadline. `None`
    /// when the deadline has passed.
    fn slice(self, slice: Duration) -> Option<Duration> {
        match self {
            Deadline::Now => None,
            Deadline::Never => Some(slice),
            Deadline::At(at) => {
                let left = at.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| left.min(slice))
            }
        }
    }
}

impl Channel {
    /// Creates a connected pair of channel ends in this process, over a
    /// `socketpair`. Typical use: make a pair, `fork`, and let each process
    /// drop the end it does not use.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the socket, memfd or mapping cannot be created.
    pub fn pair() -> Result<(Channel, Channel), Error> {
        Channel::pair_with(&Options::default())
    }

    /// [`pair`](Channel::pair) with options (both ends use the same).
    ///
    /// # Errors
    ///
    /// As [`pair`](Channel::pair); [`Error::Io`] with `InvalidInput` for a
    /// region size the format does not allow.
    pub fn pair_with(options: &Options) -> Result<(Channel, Channel), Error> {
        let (a, b) = UnixStream::pair()?;
        let a = HalfOpen::start(a, options)?;
        let b = HalfOpen::start(b, options)?;
        Ok((a.finish()?, b.finish()?))
    }

    /// Sets up a channel over an already connected Unix stream socket (from a
    /// listener, `connect`, or an inherited descriptor). The peer must do the
    /// same on its end. Blocks until the peer's hello arrives, at most
    /// `Options::setup_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when the peer stays silent, [`Error::Protocol`] when
    /// its hello or region is unacceptable, [`Error::Io`] when the OS refuses.
    pub fn from_stream(stream: UnixStream) -> Result<Channel, Error> {
        Channel::from_stream_with(stream, &Options::default())
    }

    /// [`from_stream`](Channel::from_stream) with options.
    ///
    /// # Errors
    ///
    /// As [`from_stream`](Channel::from_stream).
    pub fn from_stream_with(stream: UnixStream, options: &Options) -> Result<Channel, Error> {
        HalfOpen::start(stream, options)?.finish()
    }

    /// Starts a message, built directly in the outgoing region. Fill it with
    /// capnp's builder API and pass it to [`send`](Channel::send); dropping
    /// it unsent gives its space back.
    pub fn message(&self) -> MessageBuilder<'_> {
        self.mark_used();
        Builder::new(RegionAllocator::new(self, self.options.first_segment_words))
    }

    /// Sends a message, waiting while the peer holds too many earlier ones.
    ///
    /// A builder from [`message`](Channel::message) is published in place;
    /// segments that could not be placed in the region while building (and
    /// builders of another channel) are copied in.
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] when the peer has closed or died;
    /// [`Error::TooLarge`] when the message can never fit (the channel stays
    /// usable); [`Error::Protocol`] or [`Error::Io`] when the channel broke.
    pub fn send(&self, message: MessageBuilder<'_>) -> Result<(), Error> {
        self.send_until(message, Deadline::Never)
            .map_err(SendError::into_error)
    }

    /// Sends a message if there is room now.
    ///
    /// # Errors
    ///
    /// [`Error::Full`] when the peer holds too many messages, and the errors
    /// of [`send`](Channel::send); the message comes back in the error.
    pub fn try_send<'a>(
        &self,
        message: MessageBuilder<'a>,
    ) -> Result<(), SendError<MessageBuilder<'a>>> {
        self.send_until(message, Deadline::Now)
    }

    /// Sends a message, waiting at most `timeout` for room.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no room came in time, and the errors of
    /// [`send`](Channel::send); the message comes back in the error.
    pub fn send_timeout<'a>(
        &self,
        message: MessageBuilder<'a>,
        timeout: Duration,
    ) -> Result<(), SendError<MessageBuilder<'a>>> {
        self.send_until(message, Deadline::after(timeout))
    }

    /// Receives the next message, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::Disconnected`] once the peer has closed or died and every
    /// message it sent has been received; [`Error::Protocol`] when the peer
    /// published something invalid.
    pub fn recv(&self) -> Result<Received<'_>, Error> {
        self.recv_until(Deadline::Never)
    }

    /// Receives a message if one is waiting.
    ///
    /// # Errors
    ///
    /// [`Error::Empty`] when none is, and the errors of [`recv`](Channel::recv).
    pub fn try_recv(&self) -> Result<Received<'_>, Error> {
        self.recv_until(Deadline::Now)
    }

    /// Receives a message, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when none came in time, and the errors of
    /// [`recv`](Channel::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Received<'_>, Error> {
        self.recv_until(Deadline::after(timeout))
    }

    /// Sends `request` and waits for the peer's next message: the "ask, then
    /// wait for the answer" step of a request/response loop. Meant for a
    /// strict one-to-one exchange; with several requests in flight, pair
    /// answers with requests yourself (say, by an id in the message).
    ///
    /// # Errors
    ///
    /// The errors of [`send`](Channel::send), then of [`recv`](Channel::recv).
    pub fn request(&self, request: MessageBuilder<'_>) -> Result<Received<'_>, Error> {
        self.send(request)?;
        self.recv()
    }

    /// Whether this end's outgoing region is a sealed memfd (rather than an
    /// unsealed `/dev/shm` file).
    pub fn is_sealed(&self) -> bool {
        self.out.is_sealed()
    }

    /// Bytes available for message data in the outgoing region.
    pub fn capacity_bytes(&self) -> usize {
        self.out.region().geometry().data_words() as usize * 8
    }

    /// How many segments were built on the heap because the region was full
    /// at the time, and copied in at send. Zero in a well-sized channel.
    pub fn spilled_segments(&self) -> u64 {
        self.spilled.get()
    }

    /// The address range of the peer's region as mapped here. Received
    /// segments read in place lie inside it.
    pub fn incoming_range(&self) -> std::ops::Range<usize> {
        let base = self.incoming.region().control() as *const _ as usize;
        let len = usize::try_from(self.incoming.region().geometry().region_size).unwrap_or(0);
        base..base + len
    }

    pub(crate) fn incoming(&self) -> &InRegion {
        &self.incoming
    }

    // ---- sending -------------------------------------------------------

    fn send_until<'a>(
        &self,
        message: MessageBuilder<'a>,
        deadline: Deadline,
    ) -> Result<(), SendError<MessageBuilder<'a>>> {
        let result = {
            let output = message.get_segments_for_output();
            let empty: [&[u8]; 1] = [&EMPTY_SEGMENT];
            let segments: &[&[u8]] = if output.is_empty() { &empty } else { &output };
            self.publish(segments, deadline)
        };
        match result {
            // Dropping the builder now finds its region segments sent (no
            // longer open) and frees only heap segments. No allocation may
            // happen between the publish and this drop.
            Ok(()) => {
                drop(message);
                Ok(())
            }
            Err(e) => Err(SendError::new(e, message)),
        }
    }

    fn publish(&self, segments: &[&[u8]], deadline: Deadline) -> Result<(), Error> {
        self.mark_used();
        self.check_open()?;
        if self.peer_closed() {
            return Err(Error::Disconnected);
        }
        // A sender that never has to wait would not notice a killed peer
        // until the ring filled: every so many sends, look for hang-up (at
        // most once per wait slice, so a stream pays nothing measurable).
        let sends = self.sends_since_liveness.get().wrapping_add(1);
        self.sends_since_liveness.set(sends);
        if sends % SENDS_PER_LIVENESS_CHECK == 0 && self.liveness_due() && !self.peer_alive()? {
            return Err(Error::Disconnected);
        }
        self.tx.borrow().check_fits(segments)?;
        loop {
            {
                let mut book = self.tx.borrow_mut();
                if book.try_publish(&self.out, segments) {
                    break;
                }
                let reclaimed = book
                    .reclaim(&self.out, self.incoming.region())
                    .map_err(|p| self.fail(p.into()))?;
                if reclaimed > 0 {
                    continue;
                }
                if book.in_flight() == 0 {
                    // Nothing will ever be released: no wait can help.
                    return Err(book.cannot_place(&self.out, segments));
                }
            }
            self.wait_for_release(deadline)?;
        }
        // SeqCst: the load half of the Dekker pair (module notes).
        let sleeping = self
            .incoming
            .region()
            .control()
            .rx_sleeping
            .0
            .load(Ordering::SeqCst);
        if sleeping != AWAKE {
            futex::futex_wake(&self.out.region().control().published.0);
            if sleeping == SLEEPING_ON_SOCKET {
                self.ring_doorbell();
            }
        }
        Ok(())
    }

    /// Writes one doorbell byte to the socket, for a peer that waits in
    /// `poll` (see [`wait_any`](crate::wait_any)). A full socket buffer
    /// already holds plenty of doorbells, so that is not an error; nor is a
    /// peer gone (its death shows elsewhere).
    fn ring_doorbell(&self) {
        let _ = socket::send(self.socket.as_fd(), &[DOORBELL]);
    }

    /// Waits until the peer releases something (or the deadline passes, or
    /// the peer goes away).
    fn wait_for_release(&self, deadline: Deadline) -> Result<(), Error> {
        let peer = self.incoming.region().control();
        let seen = self.tx.borrow().reclaimed();
        let released = || peer.released.0.load(Ordering::Relaxed) != seen;
        if let Deadline::Now = deadline {
            if self.liveness_due() && !self.peer_alive()? {
                return Err(Error::Disconnected);
            }
            return Err(Error::Full);
        }
        // Checked before spinning too, so a peer that keeps changing the
        // counter cannot stretch a timeout.
        let Some(slice) = deadline.slice(self.options.wait_slice) else {
            return Err(Error::Timeout);
        };
        if self.tx_spin.spin(released) {
            return Ok(());
        }
        let flag = &self.out.region().control().tx_sleeping.0;
        // SeqCst store then SeqCst load: the sleeper's half of the Dekker pair.
        flag.store(1, Ordering::SeqCst);
        if peer.released.0.load(Ordering::SeqCst) == seen
            && peer.closed.0.load(Ordering::SeqCst) == 0
        {
            // On `closed` too: a close that lands between the check above
            // and the sleep changes that word, so it cannot be slept through.
            futex::futex_wait_either((&peer.released.0, seen), (&peer.closed.0, 0), slice);
        }
        // Relaxed: a stale `1` seen by the peer costs one spurious wake.
        flag.store(0, Ordering::Relaxed);
        if released() {
            return Ok(());
        }
        if self.peer_closed() || !self.peer_alive()? {
            return Err(Error::Disconnected);
        }
        Ok(())
    }

    // ---- receiving -----------------------------------------------------

    fn recv_until(&self, deadline: Deadline) -> Result<Received<'_>, Error> {
        self.mark_used();
        loop {
            if let Some(received) = self.take()? {
                return Ok(received);
            }
            if self.peer_closed() {
                // Everything published before `closed` is visible now.
                return self.take()?.ok_or(Error::Disconnected);
            }
            if let Deadline::Now = deadline {
                if self.liveness_due() && !self.peer_alive()? {
                    continue; // gone: drain what it sent, then Disconnected
                }
                return Err(Error::Empty);
            }
            self.wait_for_message(deadline)?;
        }
    }

    fn take(&self) -> Result<Option<Received<'_>>, Error> {
        self.check_open()?;
        let taken = self
            .rx
            .take(&self.incoming, self.out.region())
            .map_err(|p| self.fail(p.into()))?;
        Ok(taken.map(|t| {
            let segments = if self.options.copy_received {
                Segments::copied(self, &t.table, t.slot, t.seq)
            } else {
                Segments::in_place(self, &t.table, t.slot, t.seq)
            };
            Received::new(segments, self.options.reader_options)
        }))
    }

    /// Waits until the peer publishes (or closes, or the deadline passes).
    fn wait_for_message(&self, deadline: Deadline) -> Result<(), Error> {
        let peer = self.incoming.region().control();
        // Spin on the next descriptor's tag: it is written before `published`
        // and sits on the line the receiver reads next anyway.
        let ready = || self.rx.next_ready(self.incoming.region());
        // Checked before spinning too, so a peer that keeps changing the
        // counter cannot stretch a timeout.
        let Some(slice) = deadline.slice(self.options.wait_slice) else {
            return Err(Error::Timeout);
        };
        if self.rx_spin.spin(ready) {
            return Ok(());
        }
        // Announce the sleep and re-check (the sleeper's half of the Dekker
        // pair); `None` when something turned up meanwhile.
        if let Some((word, seen)) = self.prepare_sleep(SLEEPING_ON_FUTEX) {
            // Sleeps only while the counter still holds `seen` and the peer
            // has not closed (a close between the check and the sleep
            // changes `closed`, so it cannot be slept through).
            futex::futex_wait_either((word, seen), (&peer.closed.0, 0), slice);
            self.finish_sleep();
            if !ready() && word.load(Ordering::Relaxed) == seen {
                // Nothing new: make sure the peer still exists. Its death
                // shows as hang-up; the caller then drains and reports
                // Disconnected.
                self.peer_alive()?;
            }
        }
        Ok(())
    }

    // ---- sleeping (shared with `wait_any`) ------------------------------

    /// Whether `try_recv` would return something other than `Empty` now: a
    /// message, or the end of the channel.
    pub(crate) fn recv_ready(&self) -> bool {
        let region = self.incoming.region();
        let published = region.control().published.0.load(Ordering::Acquire);
        self.rx.next_ready(region)
            || !self.rx.nothing_published(published)
            || self.peer_closed()
            || self.broken.get()
    }

    /// Announces that this end goes to sleep in `mode` (a `rx_sleeping`
    /// value) and re-checks: the sleeper's half of the Dekker pair, for
    /// `wait_for_message` and `wait_any`. Returns the futex word and the value to sleep on,
    /// or `None` (flag already cleared) when something is ready after all.
    pub(crate) fn prepare_sleep(&self, mode: u32) -> Option<(&AtomicU32, u32)> {
        let flag = &self.out.region().control().rx_sleeping.0;
        // SeqCst store then SeqCst load: see the module notes.
        flag.store(mode, Ordering::SeqCst);
        let word = &self.incoming.region().control().published.0;
        let seen = word.load(Ordering::SeqCst);
        if self.rx.nothing_published(seen) && !self.recv_ready() {
            Some((word, seen))
        } else {
            flag.store(AWAKE, Ordering::Relaxed);
            None
        }
    }

    /// Clears the flag `prepare_sleep` set.
    pub(crate) fn finish_sleep(&self) {
        // Relaxed: a stale flag seen by the peer costs one spurious wake.
        self.out
            .region()
            .control()
            .rx_sleeping
            .0
            .store(AWAKE, Ordering::Relaxed);
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// The peer's `closed` word, for `wait_any` to sleep on as well.
    pub(crate) fn peer_closed_word(&self) -> &AtomicU32 {
        &self.incoming.region().control().closed.0
    }

    /// The receive side's adaptive spin budget (shared with `wait_any`).
    pub(crate) fn rx_spin(&self) -> &SpinBudget {
        &self.rx_spin
    }

    /// Releases peer message `(slot, seq)`; called when its reader drops.
    pub(crate) fn release(&self, slot: u32, seq: u32) {
        self.rx
            .release(self.out.region(), self.incoming.region(), slot, seq);
    }

    // ---- allocation (called by RegionAllocator) ------------------------

    /// A zeroed extent of at least `min` words for a builder, reclaiming
    /// released messages if the free list is short. `None`: use the heap.
    pub(crate) fn allocate_segment(&self, min: u32, want: u32) -> Option<(NonNull<u8>, u32)> {
        let extent = {
            let mut book = self.tx.try_borrow_mut().ok()?;
            match book.allocate(&self.out, self.incoming.region(), min, want) {
                Ok(e) => e,
                Err(p) => {
                    drop(book);
                    self.fail(p.into());
                    None
                }
            }
        };
        match extent {
            Some(e) => Some((self.out.extent_ptr(e), e.len)),
            None => {
                self.spilled.set(self.spilled.get() + 1);
                None
            }
        }
    }

    /// Takes back a builder's segment. Returns `false` when `ptr` is not in
    /// our region (a heap segment, for the caller to free).
    pub(crate) fn deallocate_segment(
        &self,
        ptr: NonNull<u8>,
        _word_size: u32,
        words_used: u32,
    ) -> bool {
        let Some(start) = self.out.offset_of(ptr.as_ptr()) else {
            return false;
        };
        // A segment that was sent is no longer open; `deallocate` leaves it.
        if let Ok(mut book) = self.tx.try_borrow_mut() {
            book.deallocate(&self.out, start, words_used);
        }
        true
    }

    // ---- state ---------------------------------------------------------

    /// Records the calling process as this end's user, the first time.
    fn mark_used(&self) {
        if self.owner_pid.get() == 0 {
            self.owner_pid.set(sys::getpid());
        }
    }

    /// Whether the peer has closed its end or its process is gone.
    fn peer_closed(&self) -> bool {
        // Acquire: pairs with the peer's SeqCst store of `closed` after its
        // last publish, so a later load of `published` sees that publish.
        self.peer_gone.get()
            || self
                .incoming
                .region()
                .control()
                .closed
                .0
                .load(Ordering::Acquire)
                != 0
    }

    /// Whether a non-blocking call should poll the socket now: at most once
    /// per wait slice, so `try_recv` in a loop notices a killed peer as fast
    /// as `recv` does, without a system call each time.
    pub(crate) fn liveness_due(&self) -> bool {
        let now = Instant::now();
        match self.last_liveness_check.get() {
            Some(t) if now.duration_since(t) < self.options.wait_slice => false,
            _ => {
                self.last_liveness_check.set(Some(now));
                true
            }
        }
    }

    /// Polls the socket without waiting. `Ok(false)` (and `peer_gone` set)
    /// when the peer hung up.
    pub(crate) fn peer_alive(&self) -> Result<bool, Error> {
        let ready = socket::poll(self.socket.as_fd(), false, Duration::ZERO)?;
        if ready.hung_up {
            self.peer_gone.set(true);
            return Ok(false);
        }
        if ready.readable {
            return self.drain_doorbells();
        }
        Ok(true)
    }

    /// Reads the doorbell bytes waiting on the socket. Any other byte is a
    /// protocol error; end of stream means the peer is gone (`Ok(false)`).
    pub(crate) fn drain_doorbells(&self) -> Result<bool, Error> {
        let mut buf = [0u8; 512];
        // Bounded: a peer that keeps ringing cannot keep us here. What is
        // left is read at the next check.
        for _ in 0..16 {
            match socket::recv_nowait(self.socket.as_fd(), &mut buf) {
                Ok(0) => {
                    self.peer_gone.set(true);
                    return Ok(false);
                }
                Ok(n) if buf[..n].iter().all(|&b| b == DOORBELL) => continue,
                Ok(_) => return Err(self.fail(ProtocolError::UnexpectedSocketData.into())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(_) => {
                    // A broken connection: the peer is gone.
                    self.peer_gone.set(true);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn check_open(&self) -> Result<(), Error> {
        if !self.broken.get() {
            return Ok(());
        }
        match &*self.failed.borrow() {
            Some(e) => Err(e.replay()),
            None => Ok(()),
        }
    }

    /// Ends the channel with `error`: later calls return it again, and the
    /// peer is told we closed.
    fn fail(&self, error: Error) -> Error {
        if let Ok(mut failed) = self.failed.try_borrow_mut() {
            if failed.is_none() {
                *failed = Some(error.replay());
                self.broken.set(true);
            }
        }
        self.close_shared();
        error
    }

    /// Sets `closed` in our region and wakes the peer wherever it sleeps.
    fn close_shared(&self) {
        let control = self.out.region().control();
        // SeqCst: after every publish (program order), so a peer that sees
        // `closed` also sees them.
        control.closed.0.store(1, Ordering::SeqCst);
        futex::futex_wake(&control.closed.0);
        // A peer waiting in `wait_any`'s poll hears it at once.
        let peer_sleep = self
            .incoming
            .region()
            .control()
            .rx_sleeping
            .0
            .load(Ordering::SeqCst);
        if peer_sleep == SLEEPING_ON_SOCKET {
            self.ring_doorbell();
        }
        futex::futex_wake(&control.published.0);
        futex::futex_wake(&control.released.0);
    }
}

impl AsFd for Channel {
    /// The channel's socket (for `poll`ing it for hang-up; do not read or write it).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tx = self.tx.try_borrow();
        f.debug_struct("Channel")
            .field("socket", &self.socket)
            .field("sealed", &self.out.is_sealed())
            .field("geometry", &self.out.region().geometry())
            .field("peer_geometry", &self.incoming.region().geometry())
            .field("published", &tx.as_ref().map(|t| t.published()).ok())
            .field("in_flight", &tx.as_ref().map(|t| t.in_flight()).ok())
            .field("received", &self.rx.consumed())
            .field(
                "failed",
                &self.failed.try_borrow().ok().map(|f| f.is_some()),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // After fork() two processes hold copies of this end, sharing one
        // region. Only the process that used it announces the close, so that
        // the copy a process drops unused (the usual "each side drops the end
        // it does not use") does not close the channel under the other. An
        // end dropped unused is still seen by the peer, as socket hang-up,
        // within one wait slice.
        let owner = self.owner_pid.get();
        if owner != 0 && owner == sys::getpid() {
            self.close_shared();
        }
        // Then the fields drop: both mappings unmapped, the socket closed.
    }
}

// A Channel may move to another thread (it owns everything it uses); it is
// not Sync (its books are plain cells): one thread uses an end at a time.
const _: () = {
    fn assert_send<T: Send>() {}
    fn check() {
        assert_send::<Channel>();
    }
    let _ = check;
};
