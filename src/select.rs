//! Waiting on many channels at once: `wait_any`.
//!
//! A parent serving N workers needs to block until any of its channels has
//! a message (or ends), without spinning on each. Each receiver announces
//! its sleep and re-checks exactly as a single `recv` does (the same
//! [`Waiter::prepare`](crate::wait::Waiter::prepare)); then:
//!
//! - [`WaitMethod::Futex`]: one `futex_waitv` (Linux 5.16) sleeps on every
//!   peer's `published` word and every peer's `closed` word at once;
//! - [`WaitMethod::Doorbell`]: the flag says "sleeping on the socket", so a
//!   peer that publishes also writes one doorbell byte, and one `poll` sleeps
//!   on every socket at once (any kernel; also sees hang-up directly).
//!
//! [`WaitMethod::Auto`] takes the futex when the kernel has `futex_waitv`
//! and at most 64 receivers are given.

use std::fmt;
use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use crate::channel::{Receiver, Rx};
use crate::deadline::Deadline;
use crate::layout::{SLEEPING_ON_FUTEX, SLEEPING_ON_SOCKET};
use crate::recv::RecvSide;
use crate::sys::{futex, socket};
use crate::wake::withdraw;
use crate::word::{Word, WAIT_MANY_MAX};

/// How [`wait_any_with`] sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitMethod {
    /// `Futex` where the kernel has `futex_waitv` and there are at most 64
    /// receivers; `Doorbell` otherwise.
    #[default]
    Auto,
    /// One `futex_waitv` on every peer's counter (Linux 5.16+).
    Futex,
    /// One `poll` on every socket; peers write a doorbell byte to wake us.
    Doorbell,
}

/// The most receivers one `futex_waitv` covers (two words each).
const MAX_FUTEX_RECEIVERS: usize = WAIT_MANY_MAX / 2;

/// Descriptors a wait polls from an array on the stack (more take a vector
/// per sleep): `wait_any`'s receivers, `poll_ready`'s descriptors.
const POLL_ON_STACK: usize = 16;

/// Why [`wait_any`] returned no index.
#[derive(Debug)]
#[non_exhaustive]
pub enum WaitAnyError {
    /// Nothing became ready in time.
    Timeout,
    /// The slice of receivers was empty.
    NoReceivers,
    /// [`WaitMethod::Futex`] with more receivers than one `futex_waitv`
    /// covers.
    TooManyForFutex {
        /// How many were given.
        given: usize,
        /// The most the futex method takes.
        max: usize,
    },
    /// [`WaitMethod::Futex`] where this kernel cannot use `futex_waitv`, or
    /// `poll` failed.
    Io(io::Error),
}

impl fmt::Display for WaitAnyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitAnyError::Timeout => f.write_str("timed out waiting for any channel"),
            WaitAnyError::NoReceivers => f.write_str("wait_any needs at least one receiver"),
            WaitAnyError::TooManyForFutex { given, max } => write!(
                f,
                "WaitMethod::Futex takes at most {max} receivers, {given} given"
            ),
            WaitAnyError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for WaitAnyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WaitAnyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<WaitAnyError> for crate::Error {
    fn from(e: WaitAnyError) -> crate::Error {
        match e {
            WaitAnyError::Timeout => crate::Error::Timeout,
            WaitAnyError::Io(e) => crate::Error::Io(e),
            other => crate::Error::Io(io::Error::new(io::ErrorKind::InvalidInput, other)),
        }
    }
}

/// Blocks until one of `receivers` is ready to receive, and returns its
/// index: its `try_recv` will then return a message or the error that ended
/// it (such as `Disconnected`), not `Empty`. With several ready, the first
/// in the slice wins; rotate the slice for fairness. Takes [`Channel`]s and
/// [`Receiver`]s alike.
///
/// `timeout: None` waits as long as it takes. A killed peer is noticed
/// within one wait slice, like `recv` (its receiver becomes ready).
///
/// [`Channel`]: crate::Channel
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use capnp_shm::{wait_any, Channel};
/// use std::time::Duration;
///
/// let (a, a_peer) = Channel::pair()?;
/// let (b, b_peer) = Channel::pair()?;
/// let mut m = b_peer.message();
/// m.set_root(capnp::text::Reader::from("from b"))?;
/// b_peer.send(m).map_err(|e| e.into_error())?;
/// assert_eq!(wait_any(&[&a, &b], Some(Duration::from_secs(5)))?, 1);
/// let got = b.try_recv()?;
/// # drop((got, a_peer)); Ok(()) }
/// ```
///
/// # Errors
///
/// [`WaitAnyError::Timeout`] when nothing became ready in time;
/// [`WaitAnyError::NoReceivers`] for an empty slice. A failure of one
/// receiver (a protocol error, a broken socket) is not an error of the
/// wait: that receiver is reported ready, and its `try_recv` returns it.
pub fn wait_any<R: AsRef<Receiver>>(
    receivers: &[R],
    timeout: Option<Duration>,
) -> Result<usize, WaitAnyError> {
    wait_any_with(receivers, timeout, WaitMethod::Auto)
}

/// [`wait_any`] with a chosen [`WaitMethod`] (to force the doorbell path,
/// for example, which older kernels use).
///
/// # Errors
///
/// As [`wait_any`]; [`WaitAnyError::TooManyForFutex`] and
/// [`WaitAnyError::Io`] when the chosen method is not available.
pub fn wait_any_with<R: AsRef<Receiver>>(
    receivers: &[R],
    timeout: Option<Duration>,
    method: WaitMethod,
) -> Result<usize, WaitAnyError> {
    let sides = Sides(receivers);
    if receivers.is_empty() {
        return Err(WaitAnyError::NoReceivers);
    }
    let deadline = Deadline::within(timeout);
    let slice = sides
        .shm()
        .map(|(_, s)| s.with_waiter(|w, _| w.slice()))
        .min()
        .unwrap_or(Duration::from_millis(100));
    let auto = method == WaitMethod::Auto;
    let mut method = resolve(method, receivers.len())?;
    if sides.has_streams() {
        // A stream's socket is its only readiness: every receiver is
        // waited for in one poll of the sockets.
        method = WaitMethod::Doorbell;
    }
    loop {
        // Once per wait slice per receiver, even while others keep us too
        // busy to sleep out a slice: a peer killed meanwhile shows as
        // hang-up, and its receiver is ready (its recv reports it).
        for (i, s) in sides.shm() {
            let link = s.link();
            if s.with_waiter(|w, _| w.poll_peer_if_due(link)).is_err() || link.peer_closed() {
                return Ok(i);
            }
        }
        if let Some(i) = sides.first_ready() {
            return Ok(i);
        }
        // The deadline before spinning, as a single recv does.
        let this_slice = deadline.slice(slice).ok_or(WaitAnyError::Timeout)?;
        // Spin, like a single recv, checking every receiver; the first
        // shared-memory receiver's adaptive budget stands for the set.
        let mut found = None;
        if let Some((_, first)) = sides.shm().next() {
            first.with_waiter(|w, _| {
                w.spin(|| {
                    found = sides.first_ready();
                    found.is_some()
                })
            });
        }
        if let Some(i) = found {
            return Ok(i);
        }
        let woke = match method {
            WaitMethod::Doorbell => sides.sleep_on_sockets(this_slice)?,
            _ => match sides.sleep_on_futexes(this_slice) {
                Err(e) if auto && e.kind() == io::ErrorKind::Unsupported => {
                    // No futex_waitv here (an old kernel, or filtered by
                    // seccomp): the doorbell from now on.
                    method = WaitMethod::Doorbell;
                    None
                }
                other => other.map_err(WaitAnyError::Io)?,
            },
        };
        if let Some(i) = woke {
            return Ok(i);
        }
    }
}

fn resolve(method: WaitMethod, count: usize) -> Result<WaitMethod, WaitAnyError> {
    let fits = count <= MAX_FUTEX_RECEIVERS;
    match method {
        WaitMethod::Auto if fits && futex::waitv_available() => Ok(WaitMethod::Futex),
        WaitMethod::Auto | WaitMethod::Doorbell => Ok(WaitMethod::Doorbell),
        WaitMethod::Futex if fits => Ok(WaitMethod::Futex),
        WaitMethod::Futex => Err(WaitAnyError::TooManyForFutex {
            given: count,
            max: MAX_FUTEX_RECEIVERS,
        }),
    }
}

/// The receiving sides of the receivers given.
struct Sides<'a, R>(&'a [R]);

/// A word that stands for "no word" in the unused tail of a futex array.
static UNUSED: AtomicU32 = AtomicU32::new(0);

impl<'a, R: AsRef<Receiver>> Sides<'a, R> {
    fn all(&self) -> impl Iterator<Item = &'a Rx> + 'a {
        self.0.iter().map(|r| r.as_ref().rx())
    }

    /// The shared-memory sides, with their indices.
    fn shm(&self) -> impl Iterator<Item = (usize, &'a RecvSide)> + 'a {
        self.all().enumerate().filter_map(|(i, rx)| match rx {
            Rx::Shm(side) => Some((i, side)),
            Rx::Stream(_) => None,
        })
    }

    fn has_streams(&self) -> bool {
        self.all().any(|rx| matches!(rx, Rx::Stream(_)))
    }

    /// The index of the first receiver ready to receive.
    fn first_ready(&self) -> Option<usize> {
        self.all().position(|rx| match rx {
            Rx::Shm(side) => side.ready(),
            Rx::Stream(side) => side.ready(),
        })
    }

    /// Announces the sleep on every shared-memory receiver; `Err(i)` if
    /// receiver `i` turned out ready (every announcement is then
    /// withdrawn). Calls `seen(i, value)` for each announced receiver.
    fn prepare(&self, mode: u32, mut seen: impl FnMut(usize, u32)) -> Result<(), usize> {
        for (i, s) in self.shm() {
            match s.with_waiter(|w, c| w.prepare(s.link(), c, mode)) {
                Some(value) => seen(i, value),
                None => {
                    self.shm()
                        .take_while(|&(j, _)| j < i)
                        .for_each(|(_, s)| withdraw(s.link().own().rx_sleeping()));
                    return Err(i);
                }
            }
        }
        Ok(())
    }

    fn finish(&self) {
        self.shm()
            .for_each(|(_, s)| withdraw(s.link().own().rx_sleeping()));
    }

    /// After a slice with nothing: the first receiver whose peer is gone
    /// or whose socket check failed (its recv then reports it).
    fn first_gone(&self) -> Option<usize> {
        self.shm()
            .find(|(_, s)| {
                let link = s.link();
                link.poll_peer().is_err() || link.peer_closed()
            })
            .map(|(i, _)| i)
    }

    /// Only when every receiver is a shared-memory one.
    fn sleep_on_futexes(&self, slice: Duration) -> io::Result<Option<usize>> {
        let count = self.0.len();
        debug_assert!(count <= MAX_FUTEX_RECEIVERS);
        // Each receiver's counter, then each peer's `closed` (so a close
        // cannot be slept through): no allocation.
        let mut words: [(&AtomicU32, u32); WAIT_MANY_MAX] = [(&UNUSED, 0); WAIT_MANY_MAX];
        let prepared = self.prepare(SLEEPING_ON_FUTEX, |i, value| {
            if let Rx::Shm(s) = self.0[i].as_ref().rx() {
                words[i] = (s.link().peer().published().futex(), value);
                words[count + i] = (s.link().peer_closed_word(), 0);
            }
        });
        if let Err(i) = prepared {
            return Ok(Some(i));
        }
        let slept = AtomicU32::wait_many(&words[..2 * count], slice);
        self.finish();
        slept?;
        Ok(self.first_ready().or_else(|| self.first_gone()))
    }

    fn sleep_on_sockets(&self, slice: Duration) -> Result<Option<usize>, WaitAnyError> {
        if let Err(i) = self.prepare(SLEEPING_ON_SOCKET, |_, _| {}) {
            return Ok(Some(i));
        }
        let n = self.all().count();
        with_poll_fds(n, |fds| {
            for (fd, rx) in fds.iter_mut().zip(self.all()) {
                let socket = match rx {
                    Rx::Shm(side) => side.link().socket(),
                    Rx::Stream(side) => side.link().socket(),
                };
                *fd = socket::PollFd::new(socket, false);
            }
            let polled = socket::poll(fds, slice);
            self.finish();
            polled.map_err(WaitAnyError::Io)?;
            for (i, (rx, fd)) in self.all().zip(fds.iter()).enumerate() {
                let ready = fd.ready();
                match rx {
                    Rx::Shm(s) => {
                        let link = s.link();
                        if ready.hung_up {
                            link.note_peer_gone();
                            return Ok(Some(i));
                        }
                        if ready.readable && (link.drain_doorbells().is_err() || link.peer_closed())
                        {
                            return Ok(Some(i));
                        }
                    }
                    Rx::Stream(s) => {
                        // Bytes (or the end): ready once a whole message is in.
                        if ready.readable || ready.hung_up {
                            s.read_now();
                            if s.ready() {
                                return Ok(Some(i));
                            }
                        }
                    }
                }
            }
            Ok(self.first_ready())
        })
    }
}

/// Runs `f` on `n` poll entries, each `ignored` to start with: an array on
/// the stack for up to [`POLL_ON_STACK`] of them, so that a sleep on a few
/// descriptors allocates nothing; a vector beyond.
fn with_poll_fds<'fd, R>(n: usize, f: impl FnOnce(&mut [socket::PollFd<'fd>]) -> R) -> R {
    let mut on_stack: [socket::PollFd<'fd>; POLL_ON_STACK] =
        [socket::PollFd::ignored(); POLL_ON_STACK];
    match on_stack.get_mut(..n) {
        Some(fds) => f(fds),
        None => f(&mut vec![socket::PollFd::ignored(); n]),
    }
}

/// Waits until at least one of `fds` is readable or hung up, or `timeout`
/// passes (`None`: no limit); sets `ready[i]` for each that is and returns
/// how many (0 after a timeout). `poll(2)`, for event loops that have no
/// reactor of their own: the RPC crate's runner sleeps here on the
/// [`arm`](crate::Receiver::arm)ed descriptors of all its connections.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::os::fd::AsFd;
/// use std::time::Duration;
///
/// let (a, b) = capnp_shm::Channel::pair()?;
/// assert_eq!(b.receiver().arm()?, capnp_shm::Readiness::Armed);
/// let mut ready = [false];
/// let quiet = capnp_shm::poll_readable(&[b.as_fd()], &mut ready, Some(Duration::ZERO))?;
/// assert_eq!((quiet, ready), (0, [false]));
/// drop(a); // a hang-up counts as ready
/// assert_eq!(capnp_shm::poll_readable(&[b.as_fd()], &mut ready, None)?, 1);
/// assert!(ready[0]);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// The error `poll(2)` gave, or `InvalidInput` when `ready` is shorter than
/// `fds`.
pub fn poll_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    ready: &mut [bool],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    poll_ready(fds, &[], ready, timeout)
}

/// [`poll_readable`], where `writable[i]` also waits for descriptor `i` to
/// take bytes: a [stream channel](crate::Transport::Stream)'s sender whose
/// [`arm`](crate::Sender::arm) said [`Writable`](crate::Readiness::Writable).
/// A descriptor beyond `writable`'s length waits for reading only. Up to
/// 16 descriptors, a call allocates nothing (an event loop sleeps here for
/// every message that finds it idle).
///
/// # Errors
///
/// As [`poll_readable`].
pub fn poll_ready(
    fds: &[std::os::fd::BorrowedFd<'_>],
    writable: &[bool],
    ready: &mut [bool],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    if ready.len() < fds.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let wants_write = |i: usize| writable.get(i).copied().unwrap_or(false);
    with_poll_fds(fds.len(), |polled| {
        for (i, (entry, &fd)) in polled.iter_mut().zip(fds).enumerate() {
            *entry = socket::PollFd::new(fd, wants_write(i));
        }
        // About 24 days, `poll`'s longest: callers loop on their own deadline.
        let n = socket::poll(polled, timeout.unwrap_or(Duration::MAX))?;
        for (i, (flag, fd)) in ready.iter_mut().zip(&*polled).enumerate() {
            let seen = fd.ready();
            *flag = seen.readable || seen.hung_up || (wants_write(i) && seen.writable);
        }
        Ok(n)
    })
}
