//! The stream transport: a channel end over a connected socket (TCP, or a
//! Unix socket without shared memory) carrying capnp's standard stream
//! framing, with every wait bounded by the caller's deadline.
//!
//! Two layers:
//!
//! - The engine, [`StreamTx`] and [`StreamRx`]. A send writes the frame
//!   header and the message's segments with one `writev`, straight from the
//!   builder. What the socket does not take now is copied aside, one
//!   message at most, and the next send first waits (within its deadline)
//!   for it to drain: backpressure comes from the socket, and `Expired`
//!   means the new message was not taken. A receive reads into the
//!   [`FrameReader`]'s reused buffer until a whole frame is there, waiting
//!   in `poll(2)` for at most what is left of its deadline, so a peer that
//!   sends one byte a second holds a caller no longer than it asked.
//! - The channel's sides, [`StreamSend`] and [`StreamRecv`], which the
//!   public `Sender` and `Receiver` hold for a stream channel, over one
//!   [`StreamLink`]: the socket, who owns the end, and the failure that
//!   ended it. They map the engine's outcomes to the channel's errors: a
//!   clean end of stream, a reset or a broken pipe is `Disconnected`; a bad
//!   frame is a [`ProtocolError`]; either closes the end for good.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use crate::deadline::Deadline;
use crate::error::{Failure, Halt, NotOwner, ProtocolError, SendHalt, TooLarge, TooLargeKind};
use crate::framing::{self, Filled, FrameError, FrameReader, HeldFrame, MAX_SEGMENTS};
use crate::link::Owner;
use crate::options::Options;
use crate::segment_ref::SegmentRef;
use crate::spares::Spares;
use crate::stats::{RecvStats, SendStats};
use crate::sys::{process, socket};
use crate::wait::Readiness;
use crate::word::Mine;

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    /// Writes from `bufs`: what the socket takes now, or (`wait`) all of it,
    /// waiting in the kernel.
    fn write_vectored(&self, bufs: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        socket::send_vectored(self.as_fd(), bufs, wait)
    }

    fn shutdown(&self, how: Shutdown) {
        // A socket already shut down or reset has nothing more to say.
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }

    /// Blocking (each call says whether it waits: `MSG_DONTWAIT`), and for
    /// TCP `TCP_NODELAY`: a message is written when it is sent.
    fn prepare(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_nonblocking(false),
            Socket::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)
            }
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }
}

/// Reads from a [`Socket`] for the [`FrameReader`]: waiting for bytes, or
/// not at all.
struct Source<'s> {
    socket: &'s Socket,
    wait: bool,
}

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        socket::recv_into(self.socket.as_fd(), buf, self.wait)
    }
}

/// Why an engine operation stopped.
#[derive(Debug)]
pub(crate) enum StreamHalt {
    /// The deadline passed first.
    Expired,
    /// The peer closed its end, at a frame boundary.
    Closed,
    /// The peer sent something that is not a frame, or ended inside one.
    Frame(FrameError),
    /// The OS refused (a reset connection, among others).
    Io(io::Error),
}

/// Segments up to which a send's `writev` list lives on the stack.
const INLINE_SLICES: usize = 8;

/// The sending engine: the unsent rest of the last message.
#[derive(Debug, Default)]
pub(crate) struct StreamTx {
    /// The header being sent (reused).
    header: Vec<u8>,
    /// The bytes of the last message the socket has not taken yet,
    /// `written` of them sent since.
    out: Vec<u8>,
    written: usize,
}

impl StreamTx {
    /// Sends one message (capnp's segments, whole words each, 1 to 511 of
    /// them): first the rest of the previous one, waiting for the socket
    /// until `deadline`, then this one, as far as the socket takes it now
    /// (the rest is copied aside, to go first next time).
    ///
    /// # Errors
    ///
    /// `Expired` when the previous message had not drained in time (this
    /// one was not taken); `Io` when the socket failed (`BrokenPipe` and
    /// `ConnectionReset` for a peer gone).
    pub(crate) fn send(
        &mut self,
        socket: &Socket,
        segments: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), StreamHalt> {
        self.flush(socket, deadline)?;
        self.header.clear();
        framing::write_header(&mut self.header, segments);
        let mut inline = [IoSlice::new(&[]); INLINE_SLICES + 1];
        let mut spilled = Vec::new();
        let slices: &mut [IoSlice<'_>] = if segments.len() <= INLINE_SLICES {
            &mut inline[..=segments.len()]
        } else {
            spilled.resize(segments.len() + 1, IoSlice::new(&[]));
            &mut spilled
        };
        slices[0] = IoSlice::new(&self.header);
        for (slice, segment) in slices[1..].iter_mut().zip(segments) {
            *slice = IoSlice::new(segment);
        }
        let mut left: usize = slices.iter().map(|s| s.len()).sum();
        let mut slices = slices;
        // Without a deadline, the kernel waits until it has taken all of
        // it, with no copy of ours (as a blocking `write_message` does).
        let wait = deadline == Deadline::Never;
        while left > 0 {
            match socket.write_vectored(slices, wait) {
                Ok(0) => return Err(StreamHalt::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    left -= n;
                    IoSlice::advance_slices(&mut slices, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamHalt::Io(e)),
            }
        }
        if left > 0 {
            // The socket is full: keep the rest for the next send or flush.
            self.out.clear();
            self.written = 0;
            for slice in slices.iter() {
                self.out.extend_from_slice(slice);
            }
        }
        Ok(())
    }

    /// Writes what is buffered, waiting for the socket until `deadline`.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub(crate) fn flush(&mut self, socket: &Socket, deadline: Deadline) -> Result<(), StreamHalt> {
        let wait = deadline == Deadline::Never;
        loop {
            match self.write_some(socket, wait) {
                Err(StreamHalt::Expired) => {}
                other => return other,
            }
            let wait = deadline.remaining().ok_or(StreamHalt::Expired)?;
            socket::poll_writable(socket.as_fd(), wait).map_err(StreamHalt::Io)?;
        }
    }

    /// Whether everything sent has gone to the socket.
    pub(crate) fn is_drained(&self) -> bool {
        self.written == self.out.len()
    }

    /// Writes until the buffer is empty (`Ok`) or the socket is full
    /// (`Expired`, to be waited for).
    fn write_some(&mut self, socket: &Socket, wait: bool) -> Result<(), StreamHalt> {
        while self.written < self.out.len() {
            let rest = [IoSlice::new(&self.out[self.written..])];
            match socket.write_vectored(&rest, wait) {
                Ok(0) => return Err(StreamHalt::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(StreamHalt::Expired),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamHalt::Io(e)),
            }
        }
        Ok(())
    }
}

/// The receiving engine: a frame decoder over the socket.
#[derive(Debug)]
pub(crate) struct StreamRx {
    reader: FrameReader,
}

impl StreamRx {
    /// A receiver that refuses frames over `limit_words`.
    pub(crate) fn new(limit_words: Option<usize>) -> StreamRx {
        StreamRx {
            reader: FrameReader::new(limit_words),
        }
    }

    /// Waits until a whole frame is in the reader, at most until
    /// `deadline`; then read it through [`reader`](Self::reader)
    /// (`segments` or `hold`, then `consume`).
    ///
    /// # Errors
    ///
    /// `Expired`; `Closed` at a clean end; `Frame` for a bad header or an
    /// end inside a frame; `Io`.
    pub(crate) fn recv(&mut self, socket: &Socket, deadline: Deadline) -> Result<(), StreamHalt> {
        // Without a deadline, a read that waits in the kernel: one system
        // call per read, as a blocking `read_message` makes. With one, a
        // read that does not wait, then `poll` for what is left of it.
        let mut source = Source {
            socket,
            wait: deadline == Deadline::Never,
        };
        loop {
            if self.reader.next_frame().map_err(StreamHalt::Frame)? {
                return Ok(());
            }
            match self.reader.fill(&mut source) {
                Ok(Filled::Bytes(_)) => continue,
                Ok(Filled::End) => {
                    self.reader.check_end().map_err(StreamHalt::Frame)?;
                    return Err(StreamHalt::Closed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StreamHalt::Io(e)),
            }
            let wait = deadline.remaining().ok_or(StreamHalt::Expired)?;
            socket::poll_one(socket.as_fd(), false, wait).map_err(StreamHalt::Io)?;
        }
    }

    /// The frame decoder, for the frame [`recv`](Self::recv) found.
    pub(crate) fn reader(&mut self) -> &mut FrameReader {
        &mut self.reader
    }
}

// ---- the channel's sides ------------------------------------------------------

/// What both sides of a stream channel end share.
#[derive(Debug)]
pub(crate) struct StreamLink {
    socket: Socket,
    /// The process that claimed the end (0: none yet), as the owner word
    /// of a region is (see `link.rs`), but in this process's own memory: an
    /// end unused before a `fork` can be claimed on both sides of it (a
    /// shared-memory end cannot).
    owner_word: AtomicU32,
    owner: Owner,
    /// The failure that ended this end (the first wins).
    failure: OnceLock<Failure>,
    /// The peer has closed, reset, or gone away (sticky).
    peer_gone: AtomicBool,
    /// This end has shut down its writing side (once only).
    closed_here: AtomicBool,
    options: Options,
}

/// Sends between two looks at the clock by a sender that never waits; it
/// looks for the peer's close once a wait slice has passed since the last.
const CLOSE_CHECK_EVERY: u64 = 64;

impl StreamLink {
    /// A link over a connected `socket`, made non-blocking.
    pub(crate) fn new(socket: Socket, options: &Options) -> io::Result<Arc<StreamLink>> {
        socket.prepare()?;
        process::watch_forks()?;
        Ok(Arc::new(StreamLink {
            socket,
            owner_word: AtomicU32::new(0),
            owner: Owner::new(),
            failure: OnceLock::new(),
            peer_gone: AtomicBool::new(false),
            closed_here: AtomicBool::new(false),
            options: options.clone(),
        }))
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Claims the end for this process, or checks the claim.
    fn claim(&self) -> Result<(), NotOwner> {
        self.owner.claim(Mine::new(&self.owner_word))
    }

    fn owned_here(&self) -> bool {
        self.owner.holds(Mine::new(&self.owner_word))
    }

    /// The check at the start of every operation, as `Link::enter`.
    fn enter(&self) -> Result<(), Failure> {
        self.claim().map_err(Failure::NotOwner)?;
        match self.failure.get() {
            Some(f) => Err(f.replay()),
            None => Ok(()),
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.failure.get().is_some()
    }

    /// Ends the channel with `failure` (sticky) and shuts the socket down
    /// both ways, so the peer hears of it.
    fn fail(&self, failure: Failure) -> Failure {
        if let Failure::NotOwner(_) = failure {
            return failure;
        }
        let _ = self.failure.set(failure.replay());
        if self.owned_here() {
            self.closed_here.store(true, Ordering::Relaxed);
            self.socket.shutdown(Shutdown::Both);
        }
        failure
    }

    /// What a socket error means: the peer gone, or this end failed.
    fn io_halt(&self, e: io::Error) -> Halt {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => {
                self.peer_gone.store(true, Ordering::Relaxed);
                Halt::Disconnected
            }
            _ => Halt::Failed(self.fail(Failure::Io(e))),
        }
    }

    fn peer_gone(&self) -> bool {
        self.peer_gone.load(Ordering::Relaxed)
    }

    /// Whether the peer has shut down its side: a zero-timeout `poll`.
    fn poll_peer(&self) -> bool {
        match socket::poll_one(self.socket.as_fd(), false, std::time::Duration::ZERO) {
            Ok(ready) if ready.hung_up => {
                self.peer_gone.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Shuts down this end's writing side now (the peer reads what was
    /// sent, then the end of the stream), in the process that owns the end.
    pub(crate) fn close_now(&self) {
        if self.owned_here() && !self.closed_here.swap(true, Ordering::Relaxed) {
            self.socket.shutdown(Shutdown::Write);
        }
    }

    /// [`close_now`](Self::close_now), claiming the end first if no call
    /// has yet.
    pub(crate) fn close_asked(&self) {
        if self.claim().is_ok() {
            self.close_now();
        }
    }
}

impl Drop for StreamLink {
    fn drop(&mut self) {
        // A copy of the socket inherited by another process must not keep
        // the stream open: the owner says it is over. (Other processes'
        // drops close their descriptor only.)
        self.close_now();
    }
}

/// The sending side of a stream channel end.
#[derive(Debug)]
pub(crate) struct StreamSend {
    link: Arc<StreamLink>,
    tx: RefCell<StreamTx>,
    messages: Cell<u64>,
    bytes: Cell<u64>,
    sleeps: Cell<u64>,
    /// When this side last looked for the peer's close.
    looked: Cell<std::time::Instant>,
}

impl StreamSend {
    pub(crate) fn new(link: Arc<StreamLink>) -> StreamSend {
        StreamSend {
            link,
            tx: RefCell::new(StreamTx::default()),
            messages: Cell::new(0),
            bytes: Cell::new(0),
            sleeps: Cell::new(0),
            looked: Cell::new(std::time::Instant::now()),
        }
    }

    pub(crate) fn link(&self) -> &Arc<StreamLink> {
        &self.link
    }

    /// Whether the peer has shut down, looked for (with a system call) at
    /// most once a wait slice, on every 64th send.
    fn peer_closed_lately(&self, messages: u64) -> bool {
        if messages % CLOSE_CHECK_EVERY != CLOSE_CHECK_EVERY - 1 {
            return false;
        }
        let now = std::time::Instant::now();
        if now.duration_since(self.looked.get()) < self.link.options.wait_slice {
            return false;
        }
        self.looked.set(now);
        self.link.poll_peer()
    }

    /// Sends one message's segments, waiting for the socket until
    /// `deadline` if the previous message has not drained.
    pub(crate) fn send(&self, segments: &[&[u8]], deadline: Deadline) -> Result<(), SendHalt> {
        let link = &*self.link;
        link.enter().map_err(|f| SendHalt::Halt(Halt::Failed(f)))?;
        if link.closed_here.load(Ordering::Relaxed) || link.peer_gone() {
            return Err(SendHalt::Halt(Halt::Disconnected));
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(SendHalt::TooLarge(TooLarge {
                needed: segments.len() as u64,
                limit: MAX_SEGMENTS as u64,
                kind: TooLargeKind::Segments,
            }));
        }
        let messages = self.messages.get();
        // A sender that never waits would not hear a peer that shut down
        // without reading: look now and then.
        if self.peer_closed_lately(messages) {
            return Err(SendHalt::Halt(Halt::Disconnected));
        }
        let mut tx = self.tx.borrow_mut();
        if !tx.is_drained() && deadline != Deadline::Now {
            self.sleeps.set(self.sleeps.get() + 1);
        }
        // A send that may wait writes the whole message (a peer waiting
        // for it must not wait on us); one that may not leaves the rest for
        // the next send or `try_flush`.
        let sent = tx
            .send(&link.socket, segments, deadline)
            .and_then(|()| match deadline {
                Deadline::Now => Ok(()),
                // Past the deadline with part of it out, the message is still
                // taken: the rest goes first next time.
                _ => match tx.flush(&link.socket, deadline) {
                    Err(StreamHalt::Expired) => Ok(()),
                    other => other,
                },
            });
        match sent {
            Ok(()) => {
                self.messages.set(messages + 1);
                let bytes: usize = segments.iter().map(|s| s.len()).sum();
                self.bytes.set(self.bytes.get() + bytes as u64);
                Ok(())
            }
            Err(StreamHalt::Expired) => Err(SendHalt::Halt(Halt::Expired)),
            Err(StreamHalt::Io(e)) => Err(SendHalt::Halt(link.io_halt(e))),
            // Sending neither reads nor decodes.
            Err(StreamHalt::Closed | StreamHalt::Frame(_)) => {
                Err(SendHalt::Halt(Halt::Disconnected))
            }
        }
    }

    /// Writes what the socket has not taken yet, waiting until `deadline`.
    pub(crate) fn flush(&self, deadline: Deadline) -> Result<(), Halt> {
        let link = &*self.link;
        link.enter()?;
        match self.tx.borrow_mut().flush(&link.socket, deadline) {
            Ok(()) => Ok(()),
            Err(StreamHalt::Expired) => Err(Halt::Expired),
            Err(StreamHalt::Io(e)) => Err(link.io_halt(e)),
            Err(StreamHalt::Closed | StreamHalt::Frame(_)) => Err(Halt::Disconnected),
        }
    }

    /// Whether a send would not wait: everything sent has gone to the
    /// socket, or the end is over. Loads only.
    pub(crate) fn ready(&self) -> bool {
        let link = &self.link;
        link.failed()
            || link.peer_gone()
            || link.closed_here.load(Ordering::Relaxed)
            || self.tx.try_borrow().map_or(true, |tx| tx.is_drained())
    }

    /// Readiness for an event loop: `Ready` when a send would go ahead
    /// now (after trying to drain what is buffered), `Writable` otherwise.
    pub(crate) fn arm(&self) -> Result<Readiness, Failure> {
        match self.flush(Deadline::Now) {
            Err(Halt::Expired) => Ok(Readiness::Writable),
            Err(Halt::Failed(f)) => Err(f),
            Ok(()) | Err(Halt::Disconnected) => Ok(Readiness::Ready),
        }
    }

    pub(crate) fn stats(&self) -> SendStats {
        SendStats {
            messages: self.messages.get(),
            bytes: self.bytes.get(),
            sleeps: self.sleeps.get(),
            ..SendStats::default()
        }
    }
}

impl Drop for StreamSend {
    fn drop(&mut self) {
        // A message `send` accepted is delivered: what the socket had not
        // taken yet goes now, within the set-up timeout (a peer that reads
        // nothing for that long loses it).
        if self.link.owned_here() && !self.tx.get_mut().is_drained() {
            let deadline = Deadline::after(self.link.options.setup_timeout);
            let _ = self.flush(deadline);
        }
    }
}

/// The receiving side of a stream channel end.
#[derive(Debug)]
pub(crate) struct StreamRecv {
    link: Arc<StreamLink>,
    rx: RefCell<StreamRx>,
    messages: Cell<u64>,
    bytes: Cell<u64>,
    sleeps: Cell<u64>,
    /// Received messages not dropped yet.
    held: Cell<u32>,
    /// The lists of segments past the first of dropped messages.
    spare_segment_refs: Spares<Vec<SegmentRef>, 8>,
}

impl StreamRecv {
    /// The receiving side over `link`, whose stream begins with `read`
    /// (bytes already taken from the socket).
    pub(crate) fn new(link: Arc<StreamLink>, read: &[u8]) -> StreamRecv {
        let limit = link.options.reader_options_for(0).traversal_limit_in_words;
        let mut rx = StreamRx::new(limit);
        rx.reader.preload(read);
        StreamRecv {
            link,
            rx: RefCell::new(rx),
            messages: Cell::new(0),
            bytes: Cell::new(0),
            sleeps: Cell::new(0),
            held: Cell::new(0),
            spare_segment_refs: Spares::default(),
        }
    }

    pub(crate) fn link(&self) -> &Arc<StreamLink> {
        &self.link
    }

    /// The next frame, waiting for it until `deadline`; held (counted in
    /// `held` until [`dropped`](Self::dropped)).
    pub(crate) fn recv(&self, deadline: Deadline) -> Result<HeldFrame, Halt> {
        let link = &*self.link;
        link.enter()?;
        let mut rx = self.rx.borrow_mut();
        let got = if link.peer_gone() {
            // After a reset the socket says no more; frames read before it
            // are still delivered.
            match rx.reader().next_frame() {
                Ok(true) => Ok(()),
                Ok(false) => Err(StreamHalt::Closed),
                Err(e) => Err(StreamHalt::Frame(e)),
            }
        } else {
            if deadline != Deadline::Now {
                self.sleeps.set(self.sleeps.get() + 1);
            }
            rx.recv(&link.socket, deadline)
        };
        match got {
            Ok(()) => {
                let reader = rx.reader();
                let frame = reader.hold();
                reader.consume();
                self.messages.set(self.messages.get() + 1);
                self.bytes.set(self.bytes.get() + frame.words() * 8);
                self.held.set(self.held.get() + 1);
                Ok(frame)
            }
            Err(StreamHalt::Expired) => Err(Halt::Expired),
            Err(StreamHalt::Closed) => {
                link.peer_gone.store(true, Ordering::Relaxed);
                Err(Halt::Disconnected)
            }
            Err(StreamHalt::Frame(e)) => {
                Err(Halt::Failed(link.fail(Failure::Protocol(frame_error(&e)))))
            }
            Err(StreamHalt::Io(e)) => Err(link.io_halt(e)),
        }
    }

    /// An empty list for the segments past the first of a message of
    /// several: a dropped message's, or a new one.
    pub(crate) fn segment_refs(&self) -> Vec<SegmentRef> {
        self.spare_segment_refs.take_vec()
    }

    /// Takes back the list of a dropped message, if it has one.
    pub(crate) fn recycle_segment_refs(&self, refs: &mut Vec<SegmentRef>) {
        self.spare_segment_refs.keep_vec(refs);
    }

    /// A received message was dropped.
    pub(crate) fn dropped(&self) {
        self.held.set(self.held.get().saturating_sub(1));
    }

    /// Whether a receive would not wait for the socket: a whole frame is
    /// buffered, or the end is over. No system call.
    pub(crate) fn ready(&self) -> bool {
        let link = &self.link;
        link.failed()
            || link.peer_gone()
            || self.rx.try_borrow_mut().map_or(true, |mut rx| {
                !matches!(rx.reader().next_frame(), Ok(false))
            })
    }

    /// Reads what the socket has now, without waiting (for `wait_any`
    /// after the socket polled readable): then [`ready`](Self::ready) says
    /// whether a receive would find something.
    pub(crate) fn read_now(&self) {
        if self.ready() || self.link.enter().is_err() {
            return;
        }
        let mut rx = self.rx.borrow_mut();
        match rx.recv(&self.link.socket, Deadline::Now) {
            Ok(()) | Err(StreamHalt::Expired) => {}
            Err(StreamHalt::Closed) => self.link.peer_gone.store(true, Ordering::Relaxed),
            Err(StreamHalt::Frame(e)) => {
                self.link.fail(Failure::Protocol(frame_error(&e)));
            }
            Err(StreamHalt::Io(e)) => {
                self.link.io_halt(e);
            }
        }
    }

    /// Readiness for an event loop: `Ready` when a receive would not wait,
    /// `Armed` otherwise (the socket becomes readable when more comes).
    pub(crate) fn arm(&self) -> Result<Readiness, Failure> {
        self.link.enter()?;
        Ok(if self.ready() {
            Readiness::Ready
        } else {
            Readiness::Armed
        })
    }

    pub(crate) fn stats(&self) -> RecvStats {
        RecvStats {
            messages: self.messages.get(),
            bytes: self.bytes.get(),
            sleeps: self.sleeps.get(),
            held: self.held.get(),
            ..RecvStats::default()
        }
    }
}

/// The protocol error of a bad frame.
fn frame_error(e: &FrameError) -> ProtocolError {
    match *e {
        FrameError::SegmentCount { count } => ProtocolError::FrameSegmentCount { count },
        FrameError::TooLarge { words, limit } => ProtocolError::FrameTooLarge { words, limit },
        FrameError::Truncated { have, need } => ProtocolError::FrameTruncated {
            have: have as u64,
            need: need as u64,
        },
    }
}

/// A bare engine over one socket, for the engine's own tests.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct StreamEnd {
    socket: Socket,
    tx: StreamTx,
    rx: StreamRx,
}

#[cfg(test)]
impl StreamEnd {
    pub(crate) fn new(socket: Socket, limit_words: Option<usize>) -> io::Result<StreamEnd> {
        socket.prepare()?;
        Ok(StreamEnd {
            socket,
            tx: StreamTx::default(),
            rx: StreamRx::new(limit_words),
        })
    }

    pub(crate) fn send(
        &mut self,
        segments: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), StreamHalt> {
        self.tx.send(&self.socket, segments, deadline)
    }

    pub(crate) fn flush(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        self.tx.flush(&self.socket, deadline)
    }

    pub(crate) fn recv(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        self.rx.recv(&self.socket, deadline)
    }

    pub(crate) fn reader(&mut self) -> &mut FrameReader {
        self.rx.reader()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test counts
mod tests {
    use super::*;
    use capnp::message::{Builder, HeapAllocator, Reader, ReaderOptions};
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    fn message(seed: u64, n: u32) -> Builder<HeapAllocator> {
        let mut m = Builder::new(HeapAllocator::new().first_segment_words(16));
        let mut list = m
            .get_root::<capnp::any_pointer::Builder<'_>>()
            .expect("root")
            .initn_as::<capnp::primitive_list::Builder<'_, u64>>(n);
        for i in 0..n {
            list.set(i, seed ^ u64::from(i));
        }
        m
    }

    fn check<S: capnp::message::ReaderSegments>(r: &Reader<S>, seed: u64, n: u32) {
        let list: capnp::primitive_list::Reader<'_, u64> = r.get_root().expect("root");
        assert_eq!(list.len(), n);
        assert!((0..n).all(|i| list.get(i) == seed ^ u64::from(i)));
    }

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        // The plain peer writes a frame in several writes: without this,
        // Nagle holds each one back for the delayed ACK (40 ms).
        server.set_nodelay(true).expect("nodelay");
        (client, server)
    }

    const N: u64 = 3000;
    fn size(i: u64) -> u32 {
        ((i * 7919) % 5000) as u32
    }

    /// Our end sends N varied messages and receives N back from a peer
    /// that uses nothing but `capnp::serialize` (in another thread, with
    /// blocking I/O): both directions of the standard framing.
    fn interop(ours: Socket, theirs: impl Read + Write + Send + 'static) {
        let peer = std::thread::spawn(move || {
            let mut theirs = theirs;
            for i in 0..N {
                let r = capnp::serialize::read_message(&mut theirs, ReaderOptions::new())
                    .expect("peer reads");
                check(&r, i, size(i));
                capnp::serialize::write_message(&mut theirs, &message(i + 1, size(i)))
                    .expect("peer writes");
            }
        });
        let mut end = StreamEnd::new(ours, None).expect("end");
        let deadline = || Deadline::after(Duration::from_secs(30));
        for i in 0..N {
            let m = message(i, size(i));
            end.send(&m.get_segments_for_output(), deadline())
                .expect("send");
            end.flush(deadline()).expect("flush");
            end.recv(deadline()).expect("recv");
            let reader = end.reader();
            check(
                &Reader::new(reader.segments(), ReaderOptions::new()),
                i + 1,
                size(i),
            );
            reader.consume();
        }
        peer.join().expect("peer");
        assert!(matches!(end.recv(deadline()), Err(StreamHalt::Closed)));
    }

    #[test]
    fn talks_to_a_plain_capnp_serialize_peer_over_tcp() {
        let (ours, theirs) = tcp_pair();
        interop(Socket::Tcp(ours), theirs);
    }

    #[test]
    fn talks_to_a_plain_capnp_serialize_peer_over_a_unix_socket() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        interop(Socket::Unix(ours), theirs);
    }

    #[test]
    fn a_peer_that_dribbles_holds_a_receive_no_longer_than_its_deadline() {
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let mut frame = Vec::new();
        capnp::serialize::write_message(&mut frame, &message(3, 10)).expect("write");
        let len = frame.len();
        let peer = std::thread::spawn(move || {
            for b in frame {
                theirs.write_all(&[b]).expect("dribble");
                std::thread::sleep(Duration::from_millis(2));
            }
            theirs
        });
        let mut end = StreamEnd::new(Socket::Unix(ours), None).expect("end");
        // Each short receive gives up; the frame comes whole in the end.
        let mut expired = 0;
        let started = Instant::now();
        loop {
            match end.recv(Deadline::after(Duration::from_millis(10))) {
                Ok(()) => break,
                Err(StreamHalt::Expired) => expired += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no progress");
        }
        assert!(
            expired > 0,
            "a {len}-byte frame at a byte per 2 ms outlasts 10 ms"
        );
        check(
            &Reader::new(end.reader().segments(), ReaderOptions::new()),
            3,
            10,
        );
        drop(peer.join().expect("peer"));
    }

    #[test]
    fn bad_frames_and_a_cut_stream_are_frame_errors() {
        // Lengths over the limit: refused from the header alone.
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let mut end = StreamEnd::new(Socket::Unix(ours), Some(1 << 20)).expect("end");
        let header: Vec<u8> = [0u32, u32::MAX]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        theirs.write_all(&header).expect("write");
        let deadline = Deadline::after(Duration::from_secs(10));
        assert!(matches!(
            end.recv(deadline),
            Err(StreamHalt::Frame(FrameError::TooLarge { .. }))
        ));
        // A frame cut short by the peer's close.
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        let mut end = StreamEnd::new(Socket::Unix(ours), None).expect("end");
        let mut frame = Vec::new();
        capnp::serialize::write_message(&mut frame, &message(1, 100)).expect("write");
        theirs.write_all(&frame[..frame.len() - 9]).expect("write");
        drop(theirs);
        assert!(matches!(
            end.recv(deadline),
            Err(StreamHalt::Frame(FrameError::Truncated { .. }))
        ));
    }

    #[test]
    fn backpressure_comes_from_the_socket() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let mut end = StreamEnd::new(Socket::Unix(ours), None).expect("end");
        let m = message(0, 8000); // 64 KiB a message
        let segments = m.get_segments_for_output();
        // Nobody reads: the socket buffer fills, and a send with no time to
        // wait says so without taking the message.
        let mut taken = 0;
        loop {
            match end.send(&segments, Deadline::Now) {
                Ok(()) => taken += 1,
                Err(StreamHalt::Expired) => break,
                Err(e) => panic!("unexpected {e:?}"),
            }
            assert!(taken < 10_000, "the socket never filled");
        }
        // A reader draining the other end lets the sends go on.
        let drained = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = 0;
            while capnp::serialize::read_message(&mut theirs, ReaderOptions::new()).is_ok() {
                got += 1;
            }
            got
        });
        for _ in 0..100 {
            end.send(&segments, Deadline::after(Duration::from_secs(30)))
                .expect("send once drained");
        }
        end.flush(Deadline::after(Duration::from_secs(30)))
            .expect("flush");
        drop(end);
        assert_eq!(drained.join().expect("reader"), taken + 100);
    }

    #[test]
    fn sending_to_a_closed_peer_is_a_broken_pipe() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let mut end = StreamEnd::new(Socket::Unix(ours), None).expect("end");
        drop(theirs);
        let m = message(0, 10);
        let deadline = Deadline::after(Duration::from_secs(10));
        match end.send(&m.get_segments_for_output(), deadline) {
            Err(StreamHalt::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(end.recv(deadline), Err(StreamHalt::Closed)));
    }
}
