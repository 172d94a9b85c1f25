//! The handshake on a Unix socket: the hello each end sends once, the
//! checks on the peer's hello and descriptor, and the verdicts that choose
//! the transport.
//!
//! ```text
//! offset  size  field
//! 0       8     magic          "CAPNPSHM"
//! 8       4     version        layout::VERSION
//! 12      4     flags          bit 0: the region is a sealed memfd
//!                              bit 1: no region; use the stream transport
//! 16      8     region_size    bytes, multiple of 4096 (0 with bit 1)
//! 24      4     ring_capacity  power of two (0 with bit 1)
//! 28      4     held_capacity  power of two (0 with bit 1)
//! 32      8     accept_bytes   the most bytes of the peer's outgoing space
//!                              (region and areas) this end maps; the peer
//!                              grows its space no further (0 with bit 1)
//! 40      24    reserved       zero
//! ```
//!
//! All integers little-endian. A hello that offers a region carries exactly
//! one descriptor, read-only (`SCM_RIGHTS`); a stream hello carries none.
//! Then:
//!
//! - if either hello is a stream hello, both ends use the stream transport
//!   on the socket from the next byte on (capnp's standard framing);
//! - otherwise each end maps the peer's region and sends an 8-byte verdict,
//!   `"CSHM-MAP"` (mapped) or `"CSHM-NOM"` (this end cannot or may not map
//!   it: `mmap` refused, or an unsealed region this end does not accept);
//!   two `"CSHM-MAP"`s mean shared memory, anything else the stream.
//!
//! A region that is wrong rather than unmappable (a wrong size or seals, a
//! control block that disagrees, our own region) is a protocol error, not a
//! reason to fall back. Both ends send first and then receive, so the
//! exchange cannot deadlock; each waits at most until the set-up deadline.
//! A listener waits for the client's first 8 bytes before it sends
//! anything: a client that starts with anything but the magic speaks plain
//! capnp framing (a segment count below 512 cannot read as `"CAPN"`), and
//! gets a stream channel with no hello at all.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::{ProtocolError, SetupError};
use crate::layout::{Geometry, FLAG_SEALED, FLAG_STREAM, MAGIC, VERSION};
use crate::region::PeerRegion;
use crate::sys::{file, socket};

/// Bytes in a hello.
pub(crate) const HELLO_LEN: usize = 64;

/// What one end announces about its outgoing region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) geometry: Geometry,
    pub(crate) sealed: bool,
    /// No region: the end asks for the stream transport.
    pub(crate) stream: bool,
    /// The most bytes of our outgoing space the end that sent this maps.
    pub(crate) accept_bytes: u64,
}

/// Bytes in a verdict.
pub(crate) const VERDICT_LEN: usize = 8;
const MAPPED: [u8; VERDICT_LEN] = *b"CSHM-MAP";
const REFUSED: [u8; VERDICT_LEN] = *b"CSHM-NOM";

impl Hello {
    /// The hello of an end that offers no region.
    pub(crate) fn stream() -> Hello {
        Hello {
            geometry: Geometry {
                region_size: 0,
                ring_capacity: 0,
                held_capacity: 0,
            },
            sealed: false,
            stream: true,
            accept_bytes: 0,
        }
    }

    /// The hello's bytes.
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = match (self.stream, self.sealed) {
            (true, _) => FLAG_STREAM,
            (false, true) => FLAG_SEALED,
            (false, false) => 0,
        };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.geometry.region_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.geometry.ring_capacity.to_le_bytes());
        b[28..32].copy_from_slice(&self.geometry.held_capacity.to_le_bytes());
        b[32..40].copy_from_slice(&self.accept_bytes.to_le_bytes());
        b
    }

    /// Parses and checks a hello: magic, version, flags, reserved bytes,
    /// geometry, in that order.
    pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, ProtocolError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | (u64::from(u32_at(i + 4)) << 32);
        if u64_at(0) != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(ProtocolError::BadVersion { found: version });
        }
        let flags = u32_at(12);
        let known = if flags & FLAG_STREAM != 0 {
            FLAG_STREAM
        } else {
            FLAG_SEALED
        };
        if flags & !known != 0 || b[40..].iter().any(|&x| x != 0) {
            return Err(ProtocolError::BadHelloFlags);
        }
        let (region_size, ring_capacity) = (u64_at(16), u32_at(24));
        let (held_capacity, accept_bytes) = (u32_at(28), u64_at(32));
        if flags & FLAG_STREAM != 0 {
            if region_size != 0 || ring_capacity != 0 || held_capacity != 0 || accept_bytes != 0 {
                return Err(ProtocolError::BadGeometry {
                    region_size,
                    ring_capacity,
                });
            }
            return Ok(Hello::stream());
        }
        let geometry = Geometry {
            region_size,
            ring_capacity,
            held_capacity,
        }
        .validate()?;
        Ok(Hello {
            geometry,
            sealed: flags & FLAG_SEALED != 0,
            stream: false,
            accept_bytes,
        })
    }
}

/// The deadline of a set-up, and the timeout it came from (for the error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SetupDeadline {
    at: Deadline,
    timeout: Duration,
}

impl SetupDeadline {
    /// `timeout` from now.
    pub(crate) fn after(timeout: Duration) -> SetupDeadline {
        SetupDeadline {
            at: Deadline::after(timeout),
            timeout,
        }
    }

    /// What is left, or the timeout error once nothing is.
    pub(crate) fn remaining(self) -> Result<Duration, SetupError> {
        self.at.remaining().ok_or(self.expired())
    }

    /// The timeout error.
    pub(crate) fn expired(self) -> SetupError {
        SetupError::Timeout {
            after: self.timeout,
        }
    }
}

/// Sends our hello with `region_fd` attached (none for a stream hello),
/// waiting for buffer space at most until `deadline`.
pub(crate) fn send_hello(
    sock: BorrowedFd<'_>,
    hello: &Hello,
    region_fd: Option<BorrowedFd<'_>>,
    deadline: SetupDeadline,
) -> Result<(), SetupError> {
    send_all(sock, &hello.encode(), region_fd, deadline)
}

/// Sends our verdict on the peer's region: mapped, or refused.
pub(crate) fn send_verdict(
    sock: BorrowedFd<'_>,
    mapped: bool,
    deadline: SetupDeadline,
) -> Result<(), SetupError> {
    send_all(
        sock,
        if mapped { &MAPPED } else { &REFUSED },
        None,
        deadline,
    )
}

fn send_all(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    deadline: SetupDeadline,
) -> Result<(), SetupError> {
    let mut sent = 0;
    while sent < bytes.len() {
        let r = match fd {
            Some(fd) if sent == 0 => socket::send_with_fd(sock, bytes, fd),
            _ => socket::send(sock, &bytes[sent..]),
        };
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(sock, true, deadline)?,
            Err(e) if is_disconnect(&e) => return Err(SetupError::Disconnected),
            Err(e) => return Err(SetupError::Io(e)),
        }
    }
    Ok(())
}

/// What the peer opened with.
#[derive(Debug)]
pub(crate) enum Greeted {
    /// A hello, checked, with its descriptor (none for a stream hello).
    Hello(Hello, Option<OwnedFd>),
    /// Not a hello: plain capnp framing (only when the reader sniffs), and
    /// the bytes read so far, which begin the first frame.
    Plain(Vec<u8>),
}

/// The peer's hello as it arrives, read without blocking, a piece at a
/// time (a listener serves many half-open connections at once). Every
/// descriptor that arrives is owned at once, so a rejected one closes.
#[derive(Debug)]
pub(crate) struct HelloReader {
    buf: [u8; HELLO_LEN],
    filled: usize,
    fds: Vec<OwnedFd>,
    truncated: bool,
    /// Whether a peer that does not start with the magic speaks plain
    /// framing (a listener) rather than a broken hello.
    sniff: bool,
}

impl HelloReader {
    /// A reader for a peer that must say hello (`sniff: false`), or may
    /// speak plain capnp framing instead (`sniff: true`).
    pub(crate) fn new(sniff: bool) -> HelloReader {
        HelloReader {
            buf: [0; HELLO_LEN],
            filled: 0,
            fds: Vec::new(),
            truncated: false,
            sniff,
        }
    }

    /// Reads what has arrived: `Ok(Some(..))` once the hello is complete
    /// and checked (or, sniffing, once 8 bytes show plain framing),
    /// `Ok(None)` while more is to come.
    ///
    /// # Errors
    ///
    /// A bad hello or descriptor, a peer that went away, a broken socket.
    pub(crate) fn read(&mut self, sock: BorrowedFd<'_>) -> Result<Option<Greeted>, SetupError> {
        while self.filled < HELLO_LEN {
            if self.sniff && self.filled >= 8 && self.buf[..8] != MAGIC.to_le_bytes() {
                // A segment count capnp accepts (the raw count is one less):
                // plain framing. Anything else is neither.
                let raw = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                if raw as usize >= crate::framing::MAX_SEGMENTS {
                    return Err(ProtocolError::BadMagic.into());
                }
                // Descriptors a plain peer sent close here.
                self.fds.clear();
                return Ok(Some(Greeted::Plain(self.buf[..self.filled].to_vec())));
            }
            // Sniffing, the first read stops at 8 bytes: a plain peer's
            // frame is not consumed past what tells it apart.
            let end = if self.sniff && self.filled < 8 {
                8
            } else {
                HELLO_LEN
            };
            match socket::recv_with_fds(sock, &mut self.buf[self.filled..end]) {
                Ok(r) if r.len == 0 => return Err(went_away(self.filled)),
                Ok(r) => {
                    self.filled += r.len;
                    self.fds.extend(r.fds);
                    self.truncated |= r.control_truncated;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if is_disconnect(&e) => return Err(went_away(self.filled)),
                Err(e) => return Err(SetupError::Io(e)),
            }
        }
        if self.truncated {
            return Err(ProtocolError::ControlTruncated.into());
        }
        let hello = Hello::decode(&self.buf)?;
        let mut fds = std::mem::take(&mut self.fds).into_iter();
        match (fds.next(), fds.len(), hello.stream) {
            (None, _, true) => Ok(Some(Greeted::Hello(hello, None))),
            (Some(_), extra, true) => {
                Err(ProtocolError::ExtraDescriptors { count: extra + 1 }.into())
            }
            (None, _, false) => Err(ProtocolError::MissingDescriptor.into()),
            (Some(fd), 0, false) => Ok(Some(Greeted::Hello(hello, Some(fd)))),
            (Some(_), extra, false) => {
                Err(ProtocolError::ExtraDescriptors { count: extra + 1 }.into())
            }
        }
    }
}

/// The peer's verdict on our region as it arrives, without blocking.
#[derive(Debug, Default)]
pub(crate) struct VerdictReader {
    buf: [u8; VERDICT_LEN],
    filled: usize,
}

impl VerdictReader {
    /// `Ok(Some(mapped))` once the verdict is in, `Ok(None)` before.
    ///
    /// # Errors
    ///
    /// A garbled verdict, a descriptor with it, a peer gone, a broken
    /// socket.
    pub(crate) fn read(&mut self, sock: BorrowedFd<'_>) -> Result<Option<bool>, SetupError> {
        while self.filled < VERDICT_LEN {
            match socket::recv_with_fds(sock, &mut self.buf[self.filled..]) {
                Ok(r) if r.len == 0 => return Err(ProtocolError::HandshakeTruncated.into()),
                Ok(r) if !r.fds.is_empty() => {
                    return Err(ProtocolError::ExtraDescriptors { count: r.fds.len() }.into())
                }
                Ok(r) => self.filled += r.len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if is_disconnect(&e) => return Err(ProtocolError::HandshakeTruncated.into()),
                Err(e) => return Err(SetupError::Io(e)),
            }
        }
        match self.buf {
            MAPPED => Ok(Some(true)),
            REFUSED => Ok(Some(false)),
            _ => Err(ProtocolError::BadVerdict.into()),
        }
    }

    /// Waits for the verdict, at most until `deadline`.
    pub(crate) fn wait(
        &mut self,
        sock: BorrowedFd<'_>,
        deadline: SetupDeadline,
    ) -> Result<bool, SetupError> {
        loop {
            if let Some(mapped) = self.read(sock)? {
                return Ok(mapped);
            }
            wait(sock, false, deadline)?;
        }
    }
}

/// Receives (the rest of) the peer's hello and its descriptor through
/// `reader`, waiting at most until `deadline`.
pub(crate) fn recv_hello_with(
    sock: BorrowedFd<'_>,
    reader: &mut HelloReader,
    deadline: SetupDeadline,
) -> Result<Greeted, SetupError> {
    loop {
        if let Some(done) = reader.read(sock)? {
            return Ok(done);
        }
        wait(sock, false, deadline)?;
    }
}

/// Checks a file the peer handed over (its region, or one of its areas): a
/// regular file of exactly `size` bytes, not one of our own (`own`, given
/// the file's (device, inode), says which error if it is), sealed exactly
/// as a region must be when `sealed` (the peer's hello said so), or
/// unsealed and accepted.
pub(crate) fn check_peer_file(
    fd: &OwnedFd,
    size: u64,
    sealed: bool,
    accept_unsealed: bool,
    own: impl FnOnce((u64, u64)) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    // fstat first, for the most specific error. (On a regular file of a
    // FUSE mount that the peer serves, fstat could block past the set-up
    // deadline: a known limit, listed in the README.)
    let kind = file::fstat(fd.as_fd()).map_err(|e| ProtocolError::UnmappableRegion {
        os_error: e.raw_os_error().unwrap_or(0),
    })?;
    if !kind.regular {
        return Err(ProtocolError::NotARegularFile);
    }
    if kind.size != size {
        return Err(ProtocolError::WrongFileSize {
            announced: size,
            actual: kind.size,
        });
    }
    own(kind.id)?;
    if sealed {
        let found = file::get_seals(fd.as_fd()).unwrap_or(0);
        // The exec seal may come on top: it does not affect reads or writes.
        if found & !file::EXEC_SEAL != file::REGION_SEALS {
            return Err(ProtocolError::WrongSeals { found });
        }
    } else if !accept_unsealed {
        return Err(ProtocolError::UnsealedRegion);
    }
    Ok(())
}

/// Checks the peer's descriptor against its hello and maps it read-only:
/// a regular file of exactly the announced size, not our own region
/// (`own_file`), sealed as announced (or unsealed and accepted), mappable,
/// whose control block repeats the hello.
pub(crate) fn map_peer_region(
    hello: &Hello,
    fd: &OwnedFd,
    accept_unsealed: bool,
    own_file: (u64, u64),
) -> Result<PeerRegion, SetupError> {
    check_peer_file(
        fd,
        hello.geometry.region_size,
        hello.sealed,
        accept_unsealed,
        |id| {
            if id == own_file {
                Err(ProtocolError::OwnRegion)
            } else {
                Ok(())
            }
        },
    )?;
    let region = PeerRegion::map(fd, hello.geometry).map_err(|e| match e.raw_os_error() {
        // The peer chose the file: one we cannot map is its mistake.
        Some(os_error) => SetupError::Protocol(ProtocolError::UnmappableRegion { os_error }),
        None => SetupError::Io(e),
    })?;
    let header = region.header();
    let flags = if hello.sealed { FLAG_SEALED } else { 0 };
    if header.magic.load(Ordering::Relaxed) != MAGIC
        || header.version.load(Ordering::Relaxed) != VERSION
        || header.flags.load(Ordering::Relaxed) != flags
        || header.region_size.load(Ordering::Relaxed) != hello.geometry.region_size
        || header.ring_capacity.load(Ordering::Relaxed) != hello.geometry.ring_capacity
        || header.held_capacity.load(Ordering::Relaxed) != hello.geometry.held_capacity
    {
        return Err(ProtocolError::ControlBlockMismatch.into());
    }
    Ok(region)
}

/// The error for a connection that ended after `received` bytes of the
/// peer's hello: none, the peer went away; some, it broke off its hello.
fn went_away(received: usize) -> SetupError {
    if received == 0 {
        SetupError::Disconnected
    } else {
        ProtocolError::HandshakeTruncated.into()
    }
}

/// Waits for the socket to become readable (or writable), at most until
/// `deadline`.
fn wait(sock: BorrowedFd<'_>, for_write: bool, deadline: SetupDeadline) -> Result<(), SetupError> {
    let left = deadline.remaining()?;
    let ready = socket::poll_one(sock, for_write, left)?;
    if !ready.readable && !ready.writable && !ready.hung_up && deadline.at.has_passed() {
        return Err(deadline.expired());
    }
    Ok(())
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            geometry: Geometry {
                region_size: 1 << 20,
                ring_capacity: 64,
                held_capacity: 1024,
            },
            sealed: true,
            stream: false,
            accept_bytes: 1 << 32,
        }
    }

    #[test]
    fn round_trips() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let unsealed = Hello { sealed: false, ..h };
        assert_eq!(Hello::decode(&unsealed.encode()), Ok(unsealed));
        let stream = Hello::stream();
        assert_eq!(Hello::decode(&stream.encode()), Ok(stream));
    }

    #[test]
    fn a_stream_hello_announces_no_region_and_nothing_else() {
        let good = Hello::stream().encode();
        let mut b = good;
        b[12] |= 1; // sealed as well
        assert_eq!(Hello::decode(&b), Err(ProtocolError::BadHelloFlags));
        let mut b = good;
        b[16] = 1; // a region size
        assert!(matches!(
            Hello::decode(&b),
            Err(ProtocolError::BadGeometry { .. })
        ));
        // The magic read as a segment count is far beyond capnp's 512: a
        // hello can never be mistaken for a frame.
        assert!(u32::from_le_bytes(*b"CAPN") > 512);
    }

    #[test]
    fn each_field_is_checked() {
        let good = hello().encode();
        let mut b = good;
        b[0] ^= 1;
        assert_eq!(Hello::decode(&b), Err(ProtocolError::BadMagic));
        let mut b = good;
        b[8] = 9;
        assert_eq!(
            Hello::decode(&b),
            Err(ProtocolError::BadVersion { found: 9 })
        );
        let mut b = good;
        b[12] |= 4;
        assert_eq!(Hello::decode(&b), Err(ProtocolError::BadHelloFlags));
        let mut b = good;
        b[63] = 1;
        assert_eq!(Hello::decode(&b), Err(ProtocolError::BadHelloFlags));
        let mut b = good;
        b[28] = 3; // held capacity not a power of two
        assert!(matches!(
            Hello::decode(&b),
            Err(ProtocolError::BadGeometry { .. })
        ));
        let mut b = good;
        b[24] = 3;
        assert!(matches!(
            Hello::decode(&b),
            Err(ProtocolError::BadGeometry { .. })
        ));
        let mut b = good;
        b[16] = 1;
        assert!(matches!(
            Hello::decode(&b),
            Err(ProtocolError::BadGeometry { .. })
        ));
    }

    /// A deterministic sweep: no byte pattern panics the decoder, and what it
    /// accepts always has a valid geometry.
    #[test]
    fn random_hellos_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let good = hello().encode();
        for i in 0..100_000 {
            let mut b = good;
            for _ in 0..(i % 6) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = usize::try_from(seed % 64).unwrap();
                b[at] = seed.to_le_bytes()[1];
            }
            if let Ok(h) = Hello::decode(&b) {
                assert_eq!(h.geometry.validate(), Ok(h.geometry));
            }
        }
    }
}
