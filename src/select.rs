//! Waiting on many channels at once: `wait_any`.
//!
//! A parent serving N workers needs to block until any of its channels has
//! a message (or ends), without spinning on each. Each channel's receiver
//! side announces its sleep (`rx_sleeping`) and re-checks, exactly as a
//! single `recv` does (see the Dekker notes in `channel.rs`); then:
//!
//! - [`WaitMethod::Futex`]: one `futex_waitv` (Linux 5.16) sleeps on every
//!   peer's `published` word at once;
//! - [`WaitMethod::Doorbell`]: the flag says "sleeping on the socket", so a
//!   peer that publishes also writes one doorbell byte, and one `poll` sleeps
//!   on every socket at once (any kernel; also sees hang-up directly).
//!
//! [`WaitMethod::Auto`] takes the futex when the kernel has `futex_waitv`
//! (checked once per process) and at most 64 channels are given.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::error::Error;
use crate::layout::{SLEEPING_ON_FUTEX, SLEEPING_ON_SOCKET};
use crate::sys::{futex, socket};

/// How [`wait_any_with`] sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitMethod {
    /// `Futex` where the kernel has `futex_waitv` and there are at most 64
    /// channels; `Doorbell` otherwise.
    #[default]
    Auto,
    /// One `futex_waitv` on every peer's counter (Linux 5.16+).
    Futex,
    /// One `poll` on every socket; peers write a doorbell byte to wake us.
    Doorbell,
}

/// The most channels one `futex_waitv` covers (two words each).
const MAX_FUTEX_CHANNELS: usize = futex::FUTEX_WAITV_MAX / 2;

/// Blocks until one of `channels` is ready to receive, and returns its
/// index: its `try_recv` will then return a message or the error that ended
/// it (such as [`Error::Disconnected`]), not [`Error::Empty`]. With several
/// ready, the first in the slice wins; rotate the slice for fairness.
///
/// `timeout: None` waits as long as it takes. A killed peer is noticed
/// within one wait slice, like `recv` (its channel becomes ready).
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
/// b_peer.send(m)?;
/// assert_eq!(wait_any(&[&a, &b], Some(Duration::from_secs(5)))?, 1);
/// let got = b.try_recv()?;
/// # drop((got, a_peer)); Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Timeout`] when nothing became ready in time; [`Error::Io`]
/// (`InvalidInput`) for an empty slice, or when the chosen method is not
/// available. A failure of one channel (a protocol error, a broken socket)
/// is not an error of the wait: that channel is reported ready, and its
/// `try_recv` returns the failure.
pub fn wait_any(channels: &[&Channel], timeout: Option<Duration>) -> Result<usize, Error> {
    wait_any_with(channels, timeout, WaitMethod::Auto)
}

/// [`wait_any`] with a chosen [`WaitMethod`] (to force the doorbell path,
/// for example, which older kernels use).
///
/// # Errors
///
/// As [`wait_any`].
pub fn wait_any_with(
    channels: &[&Channel],
    timeout: Option<Duration>,
    method: WaitMethod,
) -> Result<usize, Error> {
    if channels.is_empty() {
        return Err(invalid("wait_any needs at least one channel"));
    }
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let slice = channels
        .iter()
        .map(|c| c.options().wait_slice)
        .min()
        .unwrap_or(Duration::from_millis(100));
    let auto = method == WaitMethod::Auto;
    let mut method = resolve(method, channels.len())?;
    loop {
        // Once per wait slice per channel, even while other channels keep us
        // too busy to sleep out a slice: a peer killed meanwhile shows as
        // hang-up, and its channel is ready (its recv reports Disconnected).
        for (i, c) in channels.iter().enumerate() {
            if c.liveness_due() && !alive(c) {
                return Ok(i);
            }
        }
        if let Some(i) = first_ready(channels) {
            return Ok(i);
        }
        // The deadline before spinning, as a single recv does.
        let this_slice = match deadline {
            None => slice,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Timeout);
                }
                left.min(slice)
            }
        };
        // Spin, like a single recv, checking every channel; the first
        // channel's adaptive budget stands for the set.
        let mut found = None;
        channels[0].rx_spin().spin(|| {
            found = first_ready(channels);
            found.is_some()
        });
        if let Some(i) = found {
            return Ok(i);
        }
        let woke = match method {
            WaitMethod::Doorbell => sleep_on_sockets(channels, this_slice)?,
            _ => match sleep_on_futexes(channels, this_slice) {
                Err(Error::Io(_)) if auto && !futex::waitv_available() => {
                    // No futex_waitv here (an old kernel, or filtered by
                    // seccomp): the doorbell from now on.
                    method = WaitMethod::Doorbell;
                    None
                }
                other => other?,
            },
        };
        if let Some(i) = woke {
            return Ok(i);
        }
    }
}

/// Whether a channel's peer is still there. A channel whose socket check
/// fails has ended (the failure is recorded on it, and its `try_recv`
/// returns it), so that counts as gone too: the caller reports it ready
/// rather than failing the whole wait for one channel's sake.
fn alive(channel: &Channel) -> bool {
    channel.peer_alive().unwrap_or(false)
}

/// The index of the first channel ready to receive.
fn first_ready(channels: &[&Channel]) -> Option<usize> {
    channels.iter().position(|c| c.recv_ready())
}

fn resolve(method: WaitMethod, count: usize) -> Result<WaitMethod, Error> {
    // Two words per channel: its counter and its peer's `closed`.
    let futex_ok = count <= MAX_FUTEX_CHANNELS && futex::waitv_available();
    match method {
        WaitMethod::Auto if futex_ok => Ok(WaitMethod::Futex),
        WaitMethod::Auto | WaitMethod::Doorbell => Ok(WaitMethod::Doorbell),
        WaitMethod::Futex if count <= MAX_FUTEX_CHANNELS => Ok(WaitMethod::Futex),
        WaitMethod::Futex => Err(invalid("WaitMethod::Futex takes at most 64 channels")),
    }
}

/// Announces the sleep on every channel; `Err(i)` if channel `i` turned out
/// ready (all flags are then cleared). Returns the futex words and values.
fn prepare<'c>(
    channels: &[&'c Channel],
    mode: u32,
) -> Result<Vec<(&'c std::sync::atomic::AtomicU32, u32)>, usize> {
    let mut words = Vec::with_capacity(channels.len());
    for (i, c) in channels.iter().enumerate() {
        match c.prepare_sleep(mode) {
            Some(w) => words.push(w),
            None => {
                channels[..i].iter().for_each(|c| c.finish_sleep());
                return Err(i);
            }
        }
    }
    Ok(words)
}

fn sleep_on_futexes(channels: &[&Channel], slice: Duration) -> Result<Option<usize>, Error> {
    let mut words = match prepare(channels, SLEEPING_ON_FUTEX) {
        Ok(w) => w,
        Err(i) => return Ok(Some(i)),
    };
    // Each peer's `closed` word too, so a close cannot be slept through
    // (`prepare` checked every channel was still open).
    words.extend(channels.iter().map(|c| (c.peer_closed_word(), 0)));
    let slept = futex::futex_waitv(&words, slice);
    channels.iter().for_each(|c| c.finish_sleep());
    futex::note_waitv(&slept);
    slept?;
    if let Some(i) = first_ready(channels) {
        return Ok(Some(i));
    }
    // A slice with nothing: check for dead peers (a hang-up makes a channel
    // ready: its recv drains and reports Disconnected).
    Ok(channels.iter().position(|c| !alive(c)))
}

fn sleep_on_sockets(channels: &[&Channel], slice: Duration) -> Result<Option<usize>, Error> {
    if let Err(i) = prepare(channels, SLEEPING_ON_SOCKET) {
        return Ok(Some(i));
    }
    let fds: Vec<_> = channels.iter().map(|c| c.as_fd()).collect();
    let polled = socket::poll_many(&fds, slice);
    channels.iter().for_each(|c| c.finish_sleep());
    let ready = polled?;
    for (i, (c, r)) in channels.iter().zip(&ready).enumerate() {
        if r.hung_up || (r.readable && !c.drain_doorbells().unwrap_or(false)) {
            alive(c); // records the hang-up (or the failure) on the channel
            return Ok(Some(i));
        }
    }
    Ok(first_ready(channels))
}

fn invalid(what: &str) -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        what.to_string(),
    ))
}
