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

use std::cell::OnceCell;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use crate::error::{Failure, Halt, NotOwner, ProtocolError};
use crate::fault::{self, Fault};
use crate::handshake;
use crate::layout::{
    AREA_RECORD, AREA_RECORD_LEN, AWAKE, DATA_ALIGN, DOORBELL, MAX_AREA, MAX_REGION,
    SLEEPING_ON_SOCKET,
};
use crate::options::Options;
use crate::region::{OwnRegion, PeerArea, PeerRegion};
use crate::ring::Areas;
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
    /// The peer's `rx_sleeping` and `tx_sleeping` values last woken by our
    /// sender and our receiver (see [`Wakes`]).
    woke_receiver: AtomicU32,
    woke_sender: AtomicU32,
    /// The peer's `tx_sleeping` and `published` values when our receiver's
    /// take last woke its sender (see [`wake_sender_after_take`]).
    ///
    /// [`wake_sender_after_take`]: Self::wake_sender_after_take
    woke_sender_on_take: AtomicU64,
    options: Options,
    /// The most bytes our outgoing space may take: our limit, and what the
    /// peer accepts.
    outgoing_limit: u64,
    /// Whether the peer's region is sealed, as its hello said (and the
    /// handshake checked); its areas must be too. Kept here, not read from
    /// the peer's header, which the peer can rewrite.
    peer_sealed: bool,
    /// Whether this end accepts unsealed files from the peer (as for the
    /// region at the handshake).
    accept_unsealed: bool,
    /// The areas the peer handed over, and the socket bytes read so far.
    incoming: Mutex<Incoming>,
    /// Words of the peer's region's data area and of its areas together
    /// (those a descriptor may name: retired ones not).
    incoming_words: AtomicU64,
    /// The files (device, inode) of the areas our sending side has added
    /// and not given back, by id - 1: the peer may not hand one back as
    /// its own.
    own_areas: Mutex<Vec<Option<(u64, u64)>>>,
}

/// What the socket brought besides doorbells: the peer's areas.
#[derive(Debug)]
struct Incoming {
    /// By id - 1; `None`: not handed over, or retired.
    areas: Vec<Option<Arc<PeerArea>>>,
    /// Bytes of the peer's region and areas mapped here, the retired ones
    /// still mapped included.
    bytes: u64,
    /// Areas the peer retired while received messages kept them mapped,
    /// with their bytes: counted in `bytes` until the last such message
    /// drops, and the mapping with it (see `count_unmapped`).
    retired: Vec<(Weak<PeerArea>, u64)>,
    /// An area record read in part, and the descriptor that came with it.
    record: [u8; AREA_RECORD_LEN],
    have: usize,
    fd: Option<OwnedFd>,
}

impl Incoming {
    /// Stops counting the retired areas that no message keeps mapped any
    /// more.
    fn count_unmapped(&mut self) {
        let bytes = &mut self.bytes;
        self.retired.retain(|(area, area_bytes)| {
            let mapped = area.strong_count() > 0;
            if !mapped {
                *bytes -= area_bytes;
            }
            mapped
        });
    }
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
    /// The link of an end whose peer accepts `peer_accepts` bytes of our
    /// outgoing space (its hello).
    pub(crate) fn new(
        socket: OwnedFd,
        own: OwnRegion<W>,
        peer: PeerRegion<W>,
        options: Options,
        peer_accepts: u64,
        peer_sealed: bool,
    ) -> Link<W> {
        let peer_bytes = peer.geometry().region_size;
        let peer_words = u64::from(peer.geometry().data_words());
        let accept_unsealed = options.allow_unsealed_peer || !own.is_sealed();
        Link {
            peer_sealed,
            accept_unsealed,
            outgoing_limit: options.limits().outgoing.min(peer_accepts),
            incoming: Mutex::new(Incoming {
                areas: Vec::new(),
                bytes: peer_bytes,
                retired: Vec::new(),
                record: [0; AREA_RECORD_LEN],
                have: 0,
                fd: None,
            }),
            incoming_words: AtomicU64::new(peer_words),
            own_areas: Mutex::new(Vec::new()),
            socket,
            own,
            peer,
            owner: Owner::new(),
            failure: OnceLock::new(),
            peer_closed: AtomicBool::new(false),
            closed_at: AtomicU64::new(UNKNOWN),
            closed_here: AtomicBool::new(false),
            woke_receiver: AtomicU32::new(0),
            woke_sender: AtomicU32::new(0),
            woke_sender_on_take: AtomicU64::new(0),
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

    /// Reads what waits on the socket: doorbell bytes, and the records of
    /// areas the peer hands over (each mapped at once). End of stream or a
    /// broken connection means the peer is gone (recorded).
    ///
    /// # Errors
    ///
    /// [`Failure::Protocol`] for a byte that is neither, and for an area
    /// record or area that fails its checks.
    pub(crate) fn drain_doorbells(&self) -> Result<(), Failure> {
        let mut buf = [0u8; 512];
        let mut incoming = self.incoming();
        // Bounded: a peer that keeps ringing cannot keep us here. What is
        // left is read at the next check. Each read stops after a record
        // (the kernel ends a read at a descriptor), so there is room for one
        // record of every area id besides.
        for _ in 0..16 + MAX_AREA {
            match socket::recv_with_fds(self.socket.as_fd(), &mut buf) {
                Ok(got) if got.len == 0 && got.fds.is_empty() => {
                    self.note_peer_gone();
                    return Ok(());
                }
                Ok(got) => {
                    self.take_socket_bytes(
                        &mut incoming,
                        &buf[..got.len],
                        got.fds,
                        got.control_truncated,
                    )
                    .map_err(|p| self.fail(Failure::Protocol(p)))?;
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

    fn incoming(&self) -> MutexGuard<'_, Incoming> {
        // Nothing panics while holding it; a poisoned lock's data is whole.
        self.incoming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Parses bytes read from the socket (and the descriptors that came
    /// with them): doorbells, and area records, each of which must bring
    /// exactly one descriptor with its first byte.
    fn take_socket_bytes(
        &self,
        incoming: &mut Incoming,
        mut bytes: &[u8],
        mut fds: Vec<OwnedFd>,
        truncated: bool,
    ) -> Result<(), ProtocolError> {
        if truncated {
            return Err(ProtocolError::ControlTruncated);
        }
        while let Some((&first, rest)) = bytes.split_first() {
            if incoming.have == 0 {
                if first == DOORBELL {
                    bytes = rest;
                    continue;
                }
                if first != AREA_RECORD {
                    return Err(ProtocolError::UnexpectedSocketData);
                }
                // The descriptor comes with the record's first byte. (The
                // last record's was taken when it completed.)
                debug_assert!(incoming.fd.is_none(), "a descriptor left from a record");
                if fds.len() != 1 {
                    return Err(ProtocolError::AreaRecordDescriptors { count: fds.len() });
                }
                incoming.fd = fds.pop();
            }
            let n = (AREA_RECORD_LEN - incoming.have).min(bytes.len());
            let have = incoming.have;
            incoming.record[have..have + n].copy_from_slice(&bytes[..n]);
            incoming.have += n;
            bytes = &bytes[n..];
            if incoming.have == AREA_RECORD_LEN {
                incoming.have = 0;
                let fd = incoming.fd.take();
                self.accept_area(incoming, fd)?;
            }
        }
        if !fds.is_empty() {
            // Descriptors with doorbells, or with the rest of a record.
            return Err(ProtocolError::StrayDescriptors { count: fds.len() });
        }
        Ok(())
    }

    /// Checks and maps the area a complete record in `incoming` announces:
    /// an id not in use, a size the format allows and the limit leaves room
    /// for, and the same file checks as the region's.
    fn accept_area(
        &self,
        incoming: &mut Incoming,
        fd: Option<OwnedFd>,
    ) -> Result<(), ProtocolError> {
        let r = incoming.record;
        let area = u32::from(r[1]);
        let bytes = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
        let bad = ProtocolError::BadAreaRecord { area, bytes };
        let index = (area as usize).wrapping_sub(1);
        let in_use = incoming.areas.get(index).is_some_and(Option::is_some);
        if area == 0
            || area > MAX_AREA
            || in_use
            || r[2..8].iter().any(|&b| b != 0)
            || bytes == 0
            || bytes % DATA_ALIGN != 0
            || bytes > MAX_REGION
        {
            return Err(bad);
        }
        // Never missing: a record starts only with its descriptor.
        debug_assert!(fd.is_some(), "a complete record without its descriptor");
        let Some(fd) = fd else {
            return Err(ProtocolError::AreaRecordDescriptors { count: 0 });
        };
        let limit = self.options.limits().incoming;
        incoming.count_unmapped();
        let total = incoming.bytes.saturating_add(bytes);
        if total > limit {
            return Err(ProtocolError::AreaLimit {
                bytes: total,
                limit,
            });
        }
        handshake::check_peer_file(&fd, bytes, self.peer_sealed, self.accept_unsealed, |id| {
            if id == self.own.file_id() {
                return Err(ProtocolError::OwnRegion);
            }
            match self.own_area_of(id) {
                Some(ours) => Err(ProtocolError::OwnArea {
                    announced: area,
                    ours,
                }),
                None => Ok(()),
            }
        })?;
        let mapped = PeerArea::map(&fd, bytes).map_err(|e| ProtocolError::UnmappableRegion {
            os_error: e.raw_os_error().unwrap_or(0),
        })?;
        if incoming.areas.len() <= index {
            incoming.areas.resize_with(index + 1, || None);
        }
        self.incoming_words
            .fetch_add(u64::from(mapped.words()), Ordering::Relaxed);
        incoming.bytes = total;
        incoming.areas[index] = Some(Arc::new(mapped));
        Ok(())
    }

    /// The peer's areas, locked, for looking up those of one message.
    pub(crate) fn peer_area_table(&self) -> PeerAreaTable<'_> {
        PeerAreaTable {
            incoming: self.incoming(),
        }
    }

    /// Forgets the peer's area `area`, which it retired: no descriptor may
    /// name it any more, and it is unmapped once the last message that
    /// lies in it is dropped (until then its bytes count against our
    /// `max_incoming`).
    ///
    /// # Errors
    ///
    /// `UnknownArea` when the peer has no such area.
    pub(crate) fn retire_peer_area(&self, area: u32) -> Result<(), ProtocolError> {
        let mut incoming = self.incoming();
        let gone = (area as usize)
            .checked_sub(1)
            .and_then(|i| incoming.areas.get_mut(i))
            .and_then(Option::take)
            .ok_or(ProtocolError::UnknownArea { area })?;
        self.incoming_words
            .fetch_sub(u64::from(gone.words()), Ordering::Relaxed);
        incoming.retired.push((Arc::downgrade(&gone), gone.bytes()));
        drop(gone);
        incoming.count_unmapped();
        Ok(())
    }

    fn own_areas(&self) -> MutexGuard<'_, Vec<Option<(u64, u64)>>> {
        // Nothing panics while holding it; a poisoned lock's data is whole.
        self.own_areas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that our area `id` (1 and up) is the file `file` (device,
    /// inode), from before it is handed over until it is given back.
    pub(crate) fn note_own_area(&self, id: u32, file: (u64, u64)) {
        let index = id as usize - 1;
        let mut own = self.own_areas();
        if own.len() <= index {
            own.resize(index + 1, None);
        }
        own[index] = Some(file);
    }

    /// Forgets our area `id`: not handed over after all, or given back
    /// (unmapped here: no longer our memory).
    pub(crate) fn forget_own_area(&self, id: u32) {
        if let Some(file) = self.own_areas().get_mut(id as usize - 1) {
            *file = None;
        }
    }

    /// The id of our area that is the file `file`, if one is.
    fn own_area_of(&self, file: (u64, u64)) -> Option<u32> {
        (1u32..)
            .zip(self.own_areas().iter())
            .find_map(|(id, f)| (*f == Some(file)).then_some(id))
    }

    /// The peer's data areas, for validating one descriptor.
    pub(crate) fn peer_areas(&self) -> PeerAreas<'_, W> {
        PeerAreas {
            link: self,
            table: OnceCell::new(),
        }
    }

    /// The most bytes our outgoing space may take.
    pub(crate) fn outgoing_limit(&self) -> u64 {
        self.outgoing_limit
    }

    /// Whether this end may add areas at all.
    pub(crate) fn can_grow(&self) -> bool {
        self.outgoing_limit > self.own.geometry().region_size
    }

    /// Sends the record of our area `area` of `bytes` bytes with its
    /// read-only descriptor `fd`, calling `wait(started)` while the socket
    /// is full (`started`: part of the record is on the socket already).
    ///
    /// # Errors
    ///
    /// What `wait` returns while nothing of the record has gone out: the
    /// stream is as it was. Once part of it has, a halt of `wait` leaves
    /// the peer half a record that cannot be taken back: `Disconnected`
    /// stays, anything else is a [`Failure`] of the channel (the caller
    /// records it). `Disconnected` for a socket the peer has closed; the
    /// socket's other failures.
    pub(crate) fn send_area_record(
        &self,
        area: u32,
        bytes: u64,
        fd: &OwnedFd,
        mut wait: impl FnMut(bool) -> Result<(), Halt>,
    ) -> Result<(), Halt> {
        let mut record = [0u8; AREA_RECORD_LEN];
        record[0] = AREA_RECORD;
        record[1] = u8::try_from(area).unwrap_or(0);
        record[8..].copy_from_slice(&bytes.to_le_bytes());
        let mut sent = 0;
        while sent < AREA_RECORD_LEN {
            let result = if sent == 0 {
                socket::send_with_fd(self.socket.as_fd(), &record, fd.as_fd())
            } else {
                socket::send(self.socket.as_fd(), &record[sent..])
            };
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Err(halt) = wait(sent > 0) {
                        let half_sent = || {
                            Failure::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the peer does not read its socket: an area record was left half sent",
                            ))
                        };
                        return Err(match halt {
                            Halt::Expired if sent > 0 => Halt::Failed(half_sent()),
                            halt => halt,
                        });
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    // The peer's end of the socket is closed: it is gone.
                    self.note_peer_gone();
                    return Err(Halt::Disconnected);
                }
                Err(e) => return Err(Halt::Failed(Failure::Io(e))),
            }
        }
        Ok(())
    }

    /// Waits at most `slice` for room on the socket, then looks for a peer
    /// that is gone.
    ///
    /// # Errors
    ///
    /// `Disconnected` for a peer that is gone; the poll's failure.
    pub(crate) fn wait_writable(&self, slice: Duration) -> Result<(), Halt> {
        let ready = socket::poll_writable(self.socket.as_fd(), slice)
            .map_err(|e| Halt::Failed(Failure::Io(e)))?;
        if ready.hung_up {
            self.note_peer_gone();
            return Err(Halt::Disconnected);
        }
        Ok(())
    }

    /// The waker's half of `wake.rs` on one of our counters: `store`, then
    /// wake the peer if `peer_flag` says it sleeps (once per sleep: see
    /// [`Wakes`]), with a doorbell too if it sleeps on the socket. Returns
    /// how it slept (`AWAKE` when no wake was needed).
    #[inline]
    pub(crate) fn wake_peer(
        &self,
        store: impl FnOnce(),
        counter: Mine<'_, W>,
        peer_flag: crate::word::Theirs<'_, W>,
        wakes: Wakes,
    ) -> u32 {
        let woken = match wakes {
            Wakes::Receiver => Some(&self.woke_receiver),
            Wakes::Sender => Some(&self.woke_sender),
        };
        let how = wake::wake_peer(store, counter, peer_flag, woken);
        if how == SLEEPING_ON_SOCKET {
            self.ring_doorbell();
        }
        if how != AWAKE && wakes == Wakes::Sender {
            // A sender that found our descriptor ring full, on a kernel
            // that sleeps on one word only, sleeps on `consumed`
            // (`wait::sleep`): the take before this release stored it and,
            // holding nothing else, woke no one.
            self.own.consumed().wake();
        }
        how
    }

    /// After our receiver took a message (its `consumed` stored): wakes
    /// the peer's sender if it sleeps, once per sleep. Returns how it
    /// sleeps ([`AWAKE`] when no wake was needed).
    ///
    /// A take stores no value the sender's flag names (a full-ring sleep
    /// announces the `released` value it saw), so the flag alone cannot
    /// tell one sleep from the next: a ring kept full by small messages,
    /// which are never released, sleeps on the same flag value again and
    /// again. The peer's `published` can: a sender asleep publishes
    /// nothing, and one that finds the ring full again after a take has
    /// published since. So a sleep is the pair (flag, published), and the
    /// pair last woken is not woken again: its sleeper is awake, or its
    /// `FUTEX_WAIT` finds `consumed` moved and returns.
    ///
    /// Why the pair read here is that of the sleep now announced: after
    /// our take and the `SeqCst` fence (F2 in `wake.rs`), the flag load
    /// sees the sleeper's announcement or a later store, or the sleeper's
    /// re-check sees our take and it does not sleep. The sleeper fences
    /// `Release` before it announces (`wake::announce`) and we fence
    /// `Acquire` after reading its flag, so its publishes before the
    /// announcement are visible to the load of `published` below.
    #[inline]
    pub(crate) fn wake_sender_after_take(&self) -> u32 {
        // SeqCst: F2 (the take's store of `consumed` came before).
        W::fence(Ordering::SeqCst);
        let flag = self.peer.tx_sleeping().load();
        if wake::sleep_mode(flag) == AWAKE {
            return AWAKE;
        }
        self.wake_sleeping_sender(flag)
    }

    /// The rest of [`wake_sender_after_take`](Self::wake_sender_after_take),
    /// for a sender whose flag says it sleeps: out of line, as it is rare.
    #[inline(never)]
    fn wake_sleeping_sender(&self, flag: u32) -> u32 {
        let mode = wake::sleep_mode(flag);
        // Acquire: pairs with the sleeper's Release fence before its
        // announcement (above).
        W::fence(Ordering::Acquire);
        let published = if fault::active(Fault::TakeWakeKnowsFlagOnly) {
            0
        } else {
            self.peer.published().load()
        };
        let sleep = u64::from(flag) << 32 | u64::from(published);
        // Relaxed: only our receiving thread wakes on takes.
        if self.woke_sender_on_take.swap(sleep, Ordering::Relaxed) == sleep {
            return AWAKE; // woken already
        }
        self.own.consumed().wake();
        if mode == SLEEPING_ON_SOCKET {
            self.ring_doorbell();
        }
        mode
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
            None,
        );
        // After wake_peer's fence, as its load of `rx_sleeping`: a sender
        // armed for space hears the close too.
        let tx_how = wake::sleep_mode(self.peer.tx_sleeping().load());
        // A peer waiting in a poll (`wait_any`, an armed end) hears it at once.
        if how == SLEEPING_ON_SOCKET || tx_how == SLEEPING_ON_SOCKET {
            self.ring_doorbell();
        }
        // Sleepers on one word only (no futex_waitv) sleep on these
        // (`consumed`: a sender that found our descriptor ring full).
        self.own.published().wake();
        self.own.released().wake();
        self.own.consumed().wake();
    }
}

/// Whose sleep a [`Link::wake_peer`] ends, for waking each sleep once
/// (`wake.rs`): the peer's receiver (our sender published) or the peer's
/// sender (our receiver released). A take wakes through
/// [`Link::wake_sender_after_take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wakes {
    Receiver,
    Sender,
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

/// The peer's areas that came from the socket, locked (see
/// [`Link::peer_area_table`]).
pub(crate) struct PeerAreaTable<'a> {
    incoming: MutexGuard<'a, Incoming>,
}

impl PeerAreaTable<'_> {
    /// The peer's area `area` (1 and up), if it has handed it over and not
    /// retired it.
    pub(crate) fn get(&self, area: u32) -> Option<&Arc<PeerArea>> {
        let index = (area as usize).checked_sub(1)?;
        self.incoming.areas.get(index)?.as_ref()
    }
}

/// The peer's data areas as [`Areas`], for validating one descriptor: area
/// 0 is its region's, read without a lock; the others come from the socket
/// (a lock, taken at the first look at one of them and held until this
/// drops, so once per message that lies in them).
pub(crate) struct PeerAreas<'a, W: Word> {
    link: &'a Link<W>,
    table: OnceCell<PeerAreaTable<'a>>,
}

impl<W: Word> PeerAreas<'_, W> {
    /// Area `id` (1 and up), if handed over and not retired.
    fn area(&self, id: u32) -> Option<&PeerArea> {
        let table = self.table.get_or_init(|| self.link.peer_area_table());
        table.get(id).map(|a| &**a)
    }
}

impl<W: Word> Areas for PeerAreas<'_, W> {
    fn words(&self, area: u32) -> Option<u32> {
        match area {
            0 => Some(self.link.peer.data_words()),
            id => Some(self.area(id)?.words()),
        }
    }

    fn read_word(&self, area: u32, offset: u32) -> Option<u64> {
        match area {
            0 => self.link.peer.read_word(offset),
            id => self.area(id)?.read_word(offset),
        }
    }

    fn total_words(&self) -> u64 {
        self.link.incoming_words.load(Ordering::Relaxed)
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
