//! What the two sides of one end share: the socket, both regions, who owns
//! the end, and whether it still works.
//!
//! A [`Link`] lives behind an `Arc` held by the sending side and the
//! receiving side (which may be on two threads after `split`); when both
//! are gone, its `Drop` tells the peer the end is closed.
//!
//! # Ownership across `fork`
//!
//! After `fork` two processes hold copies of an end that share one region.
//! Only one may use it: the first process that does claims it by a
//! compare-and-swap of its pid into the region's `owner` word (0 until
//! then). Every operation checks the claim; a process that does not hold it
//! gets [`Failure::NotOwner`], and its drops (of the channel, of received
//! messages, of builders) touch nothing shared. The check is one load and
//! compare: [`Owner`] remembers the fork count at which this process last
//! verified its claim, and a `fork` changes the count in the child.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::error::{Failure, NotOwner, ProtocolError};
use crate::layout::{DOORBELL, SLEEPING_ON_SOCKET};
use crate::options::Options;
use crate::region::{OwnRegion, PeerRegion};
use crate::sys::{self, process, socket};
use crate::wake;
use crate::word::{Mine, Word};

/// The state both sides of one end share.
pub(crate) struct Link<W: Word = AtomicU32> {
    socket: OwnedFd,
    own: OwnRegion<W>,
    peer: PeerRegion<W>,
    owner: Owner,
    /// The failure that ended this end, once there is one (the first wins).
    failure: OnceLock<Failure>,
    /// The peer has closed its end or its process is gone (sticky: what the
    /// peer writes afterwards changes nothing).
    peer_closed: AtomicBool,
    /// The peer's `published` counter as first seen after its close: the
    /// messages delivered after the close end there, whatever it publishes
    /// later. [`UNKNOWN`] before a close, and after a hang-up without one.
    closed_at: AtomicU64,
    /// This end has announced its close ([`close_now`](Self::close_now) or
    /// the drop): once only.
    closed_here: AtomicBool,
    options: Options,
}

/// Whether this process owns an end; see the module notes. The stream
/// transport uses it too, over a word in process memory.
#[derive(Debug)]
pub(crate) struct Owner {
    /// The fork count ([`process::forks`]) at which this process last
    /// verified that it owns the end, or [`NEVER`].
    verified_at: AtomicU64,
}

const NEVER: u64 = u64::MAX;

/// `closed_at` holds no count.
const UNKNOWN: u64 = u64::MAX;

impl Owner {
    /// No claim verified yet.
    pub(crate) fn new() -> Owner {
        Owner {
            verified_at: AtomicU64::new(NEVER),
        }
    }

    /// Claims the end for this process, or checks the claim: `Ok` when it
    /// is ours (now or already).
    pub(crate) fn claim<W: Word>(&self, word: Mine<'_, W>) -> Result<(), NotOwner> {
        let forks = process::forks();
        if self.verified_at.load(Ordering::Relaxed) == forks {
            return Ok(());
        }
        let me = sys::getpid();
        match word.compare_exchange(0, me) {
            Ok(_) => {}
            Err(owner) if owner == me => {}
            Err(owner) => return Err(NotOwner { owner, caller: me }),
        }
        self.verified_at.store(forks, Ordering::Relaxed);
        Ok(())
    }

    /// Whether this process has claimed the end (without claiming it).
    pub(crate) fn holds<W: Word>(&self, word: Mine<'_, W>) -> bool {
        self.verified_at.load(Ordering::Relaxed) == process::forks()
            || word.load(Ordering::Relaxed) == sys::getpid()
    }
}

impl<W: Word> Link<W> {
    pub(crate) fn new(
        socket: OwnedFd,
        own: OwnRegion<W>,
        peer: PeerRegion<W>,
        options: Options,
    ) -> Link<W> {
        Link {
            socket,
            own,
            peer,
            owner: Owner::new(),
            failure: OnceLock::new(),
            peer_closed: AtomicBool::new(false),
            closed_at: AtomicU64::new(UNKNOWN),
            closed_here: AtomicBool::new(false),
            options,
        }
    }

    pub(crate) fn own(&self) -> &OwnRegion<W> {
        &self.own
    }

    pub(crate) fn peer(&self) -> &PeerRegion<W> {
        &self.peer
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// The check at the start of every operation: this process owns the end
    /// (claiming it on first use), and the end has not failed.
    ///
    /// # Errors
    ///
    /// [`Failure::NotOwner`] in a process that does not own the end; the
    /// failure that ended it, again, if one did.
    #[inline]
    pub(crate) fn enter(&self) -> Result<(), Failure> {
        self.owner
            .claim(self.own.owner())
            .map_err(Failure::NotOwner)?;
        match self.failure.get() {
            Some(f) => Err(f.replay()),
            None => Ok(()),
        }
    }

    /// Whether this process owns the end: only then may a drop write shared
    /// memory (a release, zeroed words, the close).
    pub(crate) fn owned_here(&self) -> bool {
        self.owner.holds(self.own.owner())
    }

    /// Ends the channel with `failure`: later calls return it again, and
    /// the peer is told we closed. Returns `failure` for the caller to pass
    /// on. A failure to own the end is the caller's alone: it is not
    /// recorded and changes nothing shared.
    pub(crate) fn fail(&self, failure: Failure) -> Failure {
        if let Failure::NotOwner(_) = failure {
            return failure;
        }
        let _ = self.failure.set(failure.replay());
        if self.owned_here() {
            self.close();
        }
        failure
    }

    /// Whether the peer has closed its end or its process is gone. Sticky:
    /// once seen, it stays so, whatever the peer writes afterwards.
    pub(crate) fn peer_closed(&self) -> bool {
        if self.has_seen_close() {
            return true;
        }
        if self.peer.closed().load() == 0 {
            return false;
        }
        // Acquire: pairs with the peer's Release store of `closed` after its
        // last publish, so that publish and its counter are visible now.
        W::fence(Ordering::Acquire);
        let published = self.peer.published().load();
        // Only the first observer records the count (both sides may look).
        let _ = self.closed_at.compare_exchange(
            UNKNOWN,
            u64::from(published),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.peer_closed.store(true, Ordering::Relaxed);
        true
    }

    /// Whether this end has already seen the peer closed or gone (no load
    /// of the peer's region).
    #[inline]
    pub(crate) fn has_seen_close(&self) -> bool {
        self.peer_closed.load(Ordering::Relaxed)
    }

    /// The peer's message count at its close, when it closed (rather than
    /// died): messages after it are not delivered.
    pub(crate) fn closed_at(&self) -> Option<u32> {
        u32::try_from(self.closed_at.load(Ordering::Relaxed)).ok()
    }

    /// The peer's `closed` word, for sleepers to wait on as well.
    pub(crate) fn peer_closed_word(&self) -> &W {
        self.peer.closed().futex()
    }

    /// Polls the socket without waiting: records a hang-up (the peer's
    /// process is gone; [`peer_closed`](Self::peer_closed) then says so) and
    /// drains doorbell bytes.
    ///
    /// # Errors
    ///
    /// [`Failure::Protocol`] for bytes other than doorbells, and the poll's
    /// own failure; both end the channel.
    pub(crate) fn poll_peer(&self) -> Result<(), Failure> {
        let ready = socket::poll_one(self.socket.as_fd(), false, Duration::ZERO)
            .map_err(|e| self.fail(Failure::Io(e)))?;
        if ready.hung_up {
            self.note_peer_gone();
        } else if ready.readable {
            self.drain_doorbells()?;
        }
        Ok(())
    }

    /// Records that the peer's process is gone.
    pub(crate) fn note_peer_gone(&self) {
        self.peer_closed.store(true, Ordering::Relaxed);
    }

    /// Reads the doorbell bytes waiting on the socket. End of stream or a
    /// broken connection means the peer is gone (recorded).
    ///
    /// # Errors
    ///
    /// [`Failure::Protocol`] for any byte that is not a doorbell.
    pub(crate) fn drain_doorbells(&self) -> Result<(), Failure> {
        let mut buf = [0u8; 512];
        // Bounded: a peer that keeps ringing cannot keep us here. What is
        // left is read at the next check.
        for _ in 0..16 {
            match socket::recv_nowait(self.socket.as_fd(), &mut buf) {
                Ok(0) => {
                    self.note_peer_gone();
                    return Ok(());
                }
                Ok(n) if buf[..n].iter().all(|&b| b == DOORBELL) => continue,
                Ok(_) => {
                    let bad = Failure::Protocol(ProtocolError::UnexpectedSocketData);
                    return Err(self.fail(bad));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => {
                    // A broken connection: the peer is gone.
                    self.note_peer_gone();
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Writes one doorbell byte, for a peer that waits in `poll` (see
    /// `wait_any`). A full socket buffer already holds plenty of doorbells,
    /// so that is not an error; nor is a peer gone (its death shows
    /// elsewhere).
    pub(crate) fn ring_doorbell(&self) {
        let _ = socket::send(self.socket.as_fd(), &[DOORBELL]);
    }

    /// Announces the close now, before the end is dropped (once; only in
    /// the process that owns the end): the peer receives what was sent,
    /// then `Disconnected`; this end sends no more.
    pub(crate) fn close_now(&self) {
        if self.owned_here() && !self.closed_here.swap(true, Ordering::Relaxed) {
            self.close();
        }
    }

    /// [`close_now`](Self::close_now), asked for by the application: claims
    /// the end first if no call has yet (an end claimed by another process
    /// stays untouched).
    pub(crate) fn close_asked(&self) {
        if self.owner.claim(self.own.owner()).is_ok() {
            self.close_now();
        }
    }

    /// Whether this end has announced its close.
    pub(crate) fn closed_here(&self) -> bool {
        self.closed_here.load(Ordering::Relaxed)
    }

    /// Sets `closed` in our region and wakes the peer wherever it sleeps.
    /// Only in the process that owns the end.
    fn close(&self) {
        let closed = self.own.closed();
        // Release: after every publish (program order), so a peer that
        // sees `closed` also sees them.
        let how = wake::wake_peer(
            || closed.store(1, Ordering::Release),
            closed,
            self.peer.rx_sleeping(),
        );
        // After wake_peer's fence, as its load of `rx_sleeping`: a sender
        // armed for space hears the close too.
        let tx_how = self.peer.tx_sleeping().load();
        // A peer waiting in a poll (`wait_any`, an armed end) hears it at once.
        if how == SLEEPING_ON_SOCKET || tx_how == SLEEPING_ON_SOCKET {
            self.ring_doorbell();
        }
        // Sleepers on one word only (no futex_waitv) sleep on these.
        self.own.published().wake();
        self.own.released().wake();
    }
}

impl<W: Word> Drop for Link<W> {
    fn drop(&mut self) {
        // Only the process that owns the end announces the close, so that a
        // copy dropped unused after `fork` (the usual "each side drops the
        // end it does not use") leaves the channel alone. An end dropped
        // unused is still seen by the peer, as socket hang-up, within one
        // wait slice. Then the fields drop: both mappings unmapped, the
        // socket closed.
        self.close_now();
    }
}

impl<W: Word> fmt::Debug for Link<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("socket", &self.socket)
            .field("sealed", &self.own.is_sealed())
            .field("geometry", &self.own.geometry())
            .field("peer_geometry", &self.peer.geometry())
            .field("failed", &self.failure.get().is_some())
            .field("peer_closed", &self.peer_closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
