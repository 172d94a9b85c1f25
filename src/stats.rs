//! Counters of what an end has done and what it holds: plain numbers the
//! sides keep as they go, cheap enough to keep on always.

/// The sending half's counters; see [`Sender::stats`](crate::Sender::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendStats {
    /// Messages sent.
    pub messages: u64,
    /// Bytes of those messages (their segments, as capnp wrote them).
    pub bytes: u64,
    /// Segments built on the heap because the region was full at the time,
    /// and copied in at send.
    pub spilled_segments: u64,
    /// Sends that had to sleep in the kernel, waiting for the peer to
    /// release something.
    pub sleeps: u64,
    /// Wake-ups sent to a peer that slept waiting for a message.
    pub wakes: u64,
    /// Messages the peer holds: sent and not yet released (read as of the
    /// last send or allocation).
    pub held_by_peer: u32,
    /// Bytes of the region those messages occupy.
    pub held_by_peer_bytes: u64,
    /// The most messages the peer may hold before a send waits: the peer's
    /// [`Options::max_held`](crate::Options::max_held).
    pub held_limit: u32,
    /// Free bytes in the outgoing space (the region's data area and the
    /// areas added to it).
    pub free_bytes: u64,
    /// Areas added to the outgoing space and not yet given back.
    pub areas: u32,
    /// Bytes of those areas.
    pub area_bytes: u64,
    /// Areas added so far, and given back so far.
    pub areas_added: u64,
    /// See [`areas_added`](Self::areas_added).
    pub areas_retired: u64,
}

/// The receiving half's counters; see
/// [`Receiver::stats`](crate::Receiver::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecvStats {
    /// Messages received.
    pub messages: u64,
    /// Bytes of those messages.
    pub bytes: u64,
    /// Receives that had to sleep in the kernel, waiting for a message.
    pub sleeps: u64,
    /// Wake-ups sent to a peer that slept waiting for room.
    pub wakes: u64,
    /// Received messages not yet dropped (each pins its space in the peer's
    /// outgoing space: beyond `held_limit`, its sends wait).
    pub held: u32,
    /// The most of the peer's messages this end may hold:
    /// [`Options::max_held`](crate::Options::max_held) as rounded (0 on a
    /// stream channel, which has no such limit).
    pub held_limit: u32,
}

/// Both halves' counters; see [`Channel::stats`](crate::Channel::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// What this end sent.
    pub send: SendStats,
    /// What this end received.
    pub recv: RecvStats,
}
