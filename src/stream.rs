//! The stream transport's engine (issue 11, step 2): one end of a connected
//! socket (TCP or Unix) carrying capnp's standard stream framing, with every
//! wait bounded by the caller's deadline. The channel API is put on it next;
//! until then it is used by its tests only.
//!
//! - A send encodes the message into a reused buffer and writes what the
//!   socket takes now. What it does not take stays buffered, one message at
//!   most. The next send first waits (within its deadline) for that to
//!   drain, so backpressure comes from the socket. `Expired` means the new
//!   message was not taken, and the caller may try again.
//! - A receive reads into the [`FrameReader`]'s buffer until a whole frame
//!   is there, waiting in `poll(2)` for at most what is left of its
//!   deadline. A peer that sends one byte a second therefore holds a caller
//!   no longer than it asked.
#![cfg_attr(not(test), allow(dead_code))] // the channel API uses it next

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::deadline::Deadline;
use crate::framing::{self, Filled, FrameError, FrameReader};
use crate::sys::socket;

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).read(buf),
            Socket::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => (&*s).write(buf),
            Socket::Tcp(s) => (&*s).write(buf),
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

/// Reads from a [`Socket`] for the [`FrameReader`].
struct Source<'s>(&'s Socket);

impl Read for Source<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// Why a stream operation stopped.
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

/// One end of a framed stream: a sending half and a receiving half over
/// one socket, usable from two threads once [split](StreamEnd::split).
#[derive(Debug)]
pub(crate) struct StreamEnd {
    tx: StreamTx,
    rx: StreamRx,
}

/// The sending half of a [`StreamEnd`].
#[derive(Debug)]
pub(crate) struct StreamTx {
    socket: Arc<Socket>,
    /// Encoded bytes of the last message, `written` of them sent.
    out: Vec<u8>,
    written: usize,
}

/// The receiving half of a [`StreamEnd`].
#[derive(Debug)]
pub(crate) struct StreamRx {
    socket: Arc<Socket>,
    reader: FrameReader,
}

impl StreamEnd {
    /// An end over a connected `socket`: made non-blocking (TCP also gets
    /// `TCP_NODELAY`: a message is written when it is sent). Frames over
    /// `limit_words` are refused.
    pub(crate) fn new(socket: Socket, limit_words: Option<usize>) -> io::Result<StreamEnd> {
        match &socket {
            Socket::Unix(s) => s.set_nonblocking(true)?,
            Socket::Tcp(s) => {
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
            }
        }
        let socket = Arc::new(socket);
        Ok(StreamEnd {
            tx: StreamTx {
                socket: Arc::clone(&socket),
                out: Vec::new(),
                written: 0,
            },
            rx: StreamRx {
                socket,
                reader: FrameReader::new(limit_words),
            },
        })
    }

    /// The two halves, for two threads (the socket closes when both go).
    pub(crate) fn split(self) -> (StreamTx, StreamRx) {
        (self.tx, self.rx)
    }

    /// As [`StreamTx::send`].
    pub(crate) fn send(
        &mut self,
        segments: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), StreamHalt> {
        self.tx.send(segments, deadline)
    }

    /// As [`StreamTx::flush`].
    pub(crate) fn flush(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        self.tx.flush(deadline)
    }

    /// As [`StreamRx::recv`].
    pub(crate) fn recv(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        self.rx.recv(deadline)
    }

    /// As [`StreamRx::reader`].
    pub(crate) fn reader(&mut self) -> &mut FrameReader {
        self.rx.reader()
    }
}

impl StreamTx {
    /// Sends one message (capnp's segments, whole words each, 1 to 511 of
    /// them): first the rest of the previous one, waiting for the socket
    /// until `deadline`, then this one, as far as the socket takes it now.
    ///
    /// # Errors
    ///
    /// `Expired` when the previous message had not drained in time (this
    /// one was not taken); `Io` when the socket failed (`BrokenPipe` and
    /// `ConnectionReset` for a peer gone).
    pub(crate) fn send(
        &mut self,
        segments: &[&[u8]],
        deadline: Deadline,
    ) -> Result<(), StreamHalt> {
        self.flush(deadline)?;
        self.out.clear();
        self.written = 0;
        framing::write_frame(&mut self.out, segments);
        match self.write_some() {
            Ok(()) | Err(StreamHalt::Expired) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes what is buffered, waiting for the socket until `deadline`.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub(crate) fn flush(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        loop {
            match self.write_some() {
                Err(StreamHalt::Expired) => {}
                other => return other,
            }
            let wait = deadline.remaining().ok_or(StreamHalt::Expired)?;
            socket::poll_one(self.socket.as_fd(), true, wait).map_err(StreamHalt::Io)?;
        }
    }

    /// Writes until the buffer is empty (`Ok`) or the socket is full
    /// (`Expired`, to be waited for).
    fn write_some(&mut self) -> Result<(), StreamHalt> {
        while self.written < self.out.len() {
            match self.socket.write(&self.out[self.written..]) {
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

impl StreamRx {
    /// Waits until a whole frame is in the reader, at most until
    /// `deadline`; then read it through [`reader`](Self::reader)
    /// (`segments` or `hold`, then `consume`).
    ///
    /// # Errors
    ///
    /// `Expired`; `Closed` at a clean end; `Frame` for a bad header or an
    /// end inside a frame; `Io`.
    pub(crate) fn recv(&mut self, deadline: Deadline) -> Result<(), StreamHalt> {
        loop {
            if self.reader.next_frame().map_err(StreamHalt::Frame)? {
                return Ok(());
            }
            match self.reader.fill(&mut Source(&self.socket)) {
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
            socket::poll_one(self.socket.as_fd(), false, wait).map_err(StreamHalt::Io)?;
        }
    }

    /// The frame decoder, for the frame [`recv`](Self::recv) found.
    pub(crate) fn reader(&mut self) -> &mut FrameReader {
        &mut self.reader
    }
}

impl AsFd for StreamEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.rx.socket.as_fd()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test counts
mod tests {
    use super::*;
    use capnp::message::{Builder, HeapAllocator, Reader, ReaderOptions};
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

    #[test]
    fn the_halves_work_from_two_threads() {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        // The peer echoes every frame back with plain capnp::serialize.
        let echo = std::thread::spawn(move || {
            let mut theirs = theirs;
            while let Ok(m) = capnp::serialize::read_message(&mut theirs, ReaderOptions::new()) {
                let segments = m.into_segments();
                let words: Vec<&[u8]> = (0..)
                    .map_while(|i| capnp::message::ReaderSegments::get_segment(&segments, i))
                    .collect();
                capnp::serialize::write_message_segments(&mut theirs, &words).expect("echo");
            }
        });
        let (mut tx, mut rx) = StreamEnd::new(Socket::Unix(ours), None)
            .expect("end")
            .split();
        let deadline = || Deadline::after(Duration::from_secs(30));
        let sender = std::thread::spawn(move || {
            for i in 0..N {
                let m = message(i, size(i));
                tx.send(&m.get_segments_for_output(), deadline())
                    .expect("send");
            }
            tx.flush(deadline()).expect("flush");
            tx
        });
        for i in 0..N {
            rx.recv(deadline()).expect("recv");
            let reader = rx.reader();
            check(
                &Reader::new(reader.segments(), ReaderOptions::new()),
                i,
                size(i),
            );
            reader.consume();
        }
        drop(sender.join().expect("sender"));
        drop(rx);
        echo.join().expect("echo");
    }
}
