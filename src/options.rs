//! Channel settings.

use std::time::Duration;

/// Where this end's outgoing region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backing {
    /// A sealed memfd; a `/dev/shm` file when `memfd_create` is unavailable
    /// (old kernel, seccomp). The default.
    #[default]
    Auto,
    /// A sealed memfd or nothing: set-up fails if `memfd_create` or sealing fails.
    Memfd,
    /// Always an unlinked `/dev/shm` file (unsealed). For systems without memfd,
    /// and to test that path.
    ShmFile,
}

/// What an end says first on a Unix socket, and so which transport it
/// ends up on; see [`Options::wire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Wire {
    /// Send a hello and use shared memory if the peer can too; otherwise
    /// (its hello asks for the stream, or it cannot map our region) both
    /// ends use the stream transport on the same socket. The default.
    #[default]
    Negotiate,
    /// Send a hello that asks for the stream transport: both ends use it,
    /// whatever the peer could do.
    Stream,
    /// No hello: capnp's standard stream framing from the first byte, for a
    /// peer that speaks nothing else (`capnp::serialize` on a plain socket,
    /// another language's Cap'n Proto, a server older than this crate).
    Plain,
}

/// Settings for one end of a channel. Each end chooses its own: the region
/// size and ring capacity describe the region this end *sends* through.
///
/// Nothing needs sizing. An end's outgoing space starts as its region and
/// grows by further shared-memory *areas* when a message does not fit (up
/// to [`max_outgoing`](Options::max_outgoing), and to what the peer
/// accepts, its [`max_incoming`](Options::max_incoming)); an area empty for
/// [`area_idle`](Options::area_idle) is given back. A sender waits only
/// while the peer has [`ring_capacity`](Options::ring_capacity) messages it
/// has not taken yet (backpressure), or holds as many as the peer's
/// [`max_held`](Options::max_held), or when the limits leave no room.
///
/// ```
/// use std::time::Duration;
/// let options = capnp_shm::Options::new()
///     .region_size(64 << 20)
///     .ring_capacity(1024)
///     .spin(Duration::ZERO);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) region_size: usize,
    pub(crate) ring_capacity: u32,
    pub(crate) first_segment_words: u32,
    pub(crate) spin: Duration,
    pub(crate) wait_slice: Duration,
    pub(crate) setup_timeout: Duration,
    /// The reader limits asked for; `None`: capnp's defaults, with the
    /// traversal limit raised to each message's own size (see
    /// [`reader_options_for`](Options::reader_options_for)).
    pub(crate) reader_options: Option<capnp::message::ReaderOptions>,
    pub(crate) copy_received: bool,
    pub(crate) backing: Backing,
    pub(crate) allow_unsealed_peer: bool,
    pub(crate) wire: Wire,
    /// `None`: from the region size (see `max_held`).
    pub(crate) max_held: Option<u32>,
    /// `None`: a quarter of physical memory (see [`Limits`]).
    pub(crate) max_outgoing: Option<u64>,
    pub(crate) max_incoming: Option<u64>,
    pub(crate) area_idle: Duration,
}

/// The memory limits in force for one end, defaults resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The most bytes of outgoing space (region and areas) this end creates.
    pub(crate) outgoing: u64,
    /// The most bytes of the peer's outgoing space this end maps.
    pub(crate) incoming: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            region_size: 16 << 20,
            ring_capacity: 256,
            first_segment_words: 1024,
            spin: Duration::from_micros(50),
            wait_slice: Duration::from_millis(100),
            setup_timeout: Duration::from_secs(5),
            reader_options: None,
            copy_received: false,
            backing: Backing::Auto,
            allow_unsealed_peer: false,
            wire: Wire::Negotiate,
            max_held: None,
            max_outgoing: None,
            max_incoming: None,
            area_idle: Duration::from_secs(1),
        }
    }
}

impl Options {
    /// The defaults: a 16 MiB region, 256 messages queued, up to 65 536
    /// held, outgoing and incoming space each up to a quarter of physical
    /// memory, areas given back after 1 s empty, 8 KiB first segments, 50 µs
    /// of spinning before sleeping, 100 ms wait slices, 5 s set-up timeout,
    /// capnp's default reader limits, zero-copy receive, [`Backing::Auto`],
    /// unsealed peer regions refused.
    pub fn new() -> Options {
        Options::default()
    }

    /// Size in bytes of the outgoing region (control block, rings and data
    /// area), rounded up to 4 KiB: the memory that is always mapped. What
    /// does not fit goes to areas added on demand (see
    /// [`max_outgoing`](Options::max_outgoing)). Memory is touched only as
    /// messages use it.
    pub fn region_size(mut self, bytes: usize) -> Options {
        self.region_size = bytes;
        self
    }

    /// How many messages this end may have sent that the peer has not taken
    /// yet (its queue), rounded up to a power of two, at most 65 536. A
    /// sender that gets this far ahead waits: that is the backpressure.
    /// Messages the peer has taken and still holds do not count here (see
    /// [`max_held`](Options::max_held)). Each entry of the ring takes 128
    /// bytes of the region (default 256 entries: 32 KiB); a message of one
    /// segment of up to 112 bytes travels in its entry, so a receiver that
    /// holds such messages holds nothing of the region.
    pub fn ring_capacity(mut self, messages: u32) -> Options {
        self.ring_capacity = messages;
        self
    }

    /// How many of the *peer's* messages this end may hold at once (sent to
    /// it and not yet dropped, taken or not), rounded up to a power of two,
    /// at most 65 536; the peer's sender waits beyond it.
    /// [`SendStats::held_by_peer`] and
    /// [`SendStats::held_limit`](crate::SendStats::held_limit) show it on
    /// the sending side (`Sender::stats`). Default: 65 536, or less for a
    /// region under 8 MiB (the release ring, 8 bytes per message, takes at
    /// most 1/16 of the region).
    ///
    /// [`SendStats::held_by_peer`]: crate::SendStats::held_by_peer
    pub fn max_held(mut self, messages: u32) -> Options {
        self.max_held = Some(messages);
        self
    }

    /// The most memory, in bytes, this end's outgoing space may take: its
    /// region plus the areas it adds when a message does not fit. Growth
    /// also stops at what the peer accepts (its
    /// [`max_incoming`](Options::max_incoming)). A message that cannot fit
    /// within the limit is [`TooLarge`](crate::TooLarge). Default: a quarter
    /// of physical memory.
    pub fn max_outgoing(mut self, bytes: u64) -> Options {
        self.max_outgoing = Some(bytes);
        self
    }

    /// The most memory, in bytes, of the peer's outgoing space this end
    /// maps: its region plus its areas. The peer is told, and grows no
    /// further; a peer that offers more is a protocol error. Default: a
    /// quarter of physical memory.
    pub fn max_incoming(mut self, bytes: u64) -> Options {
        self.max_incoming = Some(bytes);
        self
    }

    /// How long an added area must stay empty before the sender gives it
    /// back (unmapped on both ends). Checked as messages are sent. Default
    /// 1 s; zero gives areas back as soon as they are empty.
    pub fn area_idle(mut self, idle: Duration) -> Options {
        self.area_idle = idle;
        self
    }

    /// The limits in force, defaults resolved.
    pub(crate) fn limits(&self) -> Limits {
        let default = || crate::sys::physical_memory() / 4;
        Limits {
            outgoing: self.max_outgoing.unwrap_or_else(default),
            incoming: self.max_incoming.unwrap_or_else(default),
        }
    }

    /// Size of the first segment of each message, in 8-byte words. Unused
    /// words are given back at send, so this costs nothing for small messages;
    /// a message larger than it grows into further segments.
    pub fn first_segment_words(mut self, words: u32) -> Options {
        self.first_segment_words = words.max(1);
        self
    }

    /// How long a waiting call spins before it sleeps in the kernel. Spinning
    /// answers in well under a microsecond but occupies a core; zero sleeps
    /// at once (lowest CPU use, a futex wake per message). At most 100 ms.
    /// The budget adapts below this maximum (see the README).
    ///
    /// A stream whose messages come further apart than the budget (large
    /// ones: 1 MiB messages came every 116-129 µs on the development
    /// machine) has its receiver sleep for every message, and its sender
    /// pay a wake for each.
    /// A budget longer than that gap removes both: on the development
    /// machine, one-way 1 MiB went from 8.1-9.0 GB/s with the default to
    /// 9.5-9.8 GB/s with 5 ms, at the price of a receiver that spins
    /// whenever it waits.
    pub fn spin(mut self, budget: Duration) -> Options {
        // Capped, so a spin cannot outlast the checks for a dead peer.
        self.spin = budget.min(Duration::from_millis(100));
        self
    }

    /// The longest single sleep of a waiting call. Between slices it polls
    /// the socket for hang-up, so a peer killed without closing is noticed
    /// within one slice, provided no other process still holds the peer's
    /// end of the socket (drop unused ends after `fork`). At least 1 ms.
    pub fn wait_slice(mut self, slice: Duration) -> Options {
        self.wait_slice = slice.max(Duration::from_millis(1));
        self
    }

    /// How long the set-up waits for the peer's hello before failing with
    /// [`SetupError::Timeout`](crate::SetupError::Timeout).
    pub fn setup_timeout(mut self, timeout: Duration) -> Options {
        self.setup_timeout = timeout;
        self
    }

    /// Limits applied when reading received messages (traversal and
    /// nesting), exactly as given.
    ///
    /// Without this call, each message gets capnp's defaults (nesting 64,
    /// traversal 8 Mi words = 64 MiB), and in zero-copy mode the traversal
    /// limit is raised to the message's own size: any message can be read
    /// through once, whatever its size, and none can make its reader visit
    /// more than the larger of the two (capnp's amplification defence). In
    /// [copy mode](Options::copy_received), for untrusted peers, the
    /// default stays 64 MiB: it also bounds what one message may cost to
    /// copy.
    pub fn reader_options(mut self, options: capnp::message::ReaderOptions) -> Options {
        self.reader_options = Some(options);
        self
    }

    /// The reader limits for a message of `words` words.
    pub(crate) fn reader_options_for(&self, words: u64) -> capnp::message::ReaderOptions {
        match self.reader_options {
            Some(asked) => asked,
            None if self.copy_received => capnp::message::ReaderOptions::new(),
            None => {
                let mut limits = capnp::message::ReaderOptions::new();
                let words = usize::try_from(words).unwrap_or(usize::MAX);
                limits.traversal_limit_in_words = limits
                    .traversal_limit_in_words
                    .map(|default| default.max(words));
                limits
            }
        }
    }

    /// Copy each received message into private memory before reading it, and
    /// release its shared space at once. Use this when the peer is not
    /// trusted to leave a message alone after sending it; it costs one copy.
    pub fn copy_received(mut self, copy: bool) -> Options {
        self.copy_received = copy;
        self
    }

    /// Where the outgoing region lives; see [`Backing`].
    pub fn backing(mut self, backing: Backing) -> Options {
        self.backing = backing;
        self
    }

    /// Accept a peer whose region is an unsealed file. Such a peer could
    /// shrink its file under our mapping (a `SIGBUS` here). Without this,
    /// unsealed peers are accepted only when this end is unsealed too.
    pub fn allow_unsealed_peer(mut self, allow: bool) -> Options {
        self.allow_unsealed_peer = allow;
        self
    }

    /// What this end says first on a Unix socket; see [`Wire`]. (On TCP
    /// both ends always speak capnp's standard framing from the first
    /// byte: there is nothing to negotiate.)
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use capnp_shm::{Channel, Options, Transport, Wire};
    /// let (a, b) = std::os::unix::net::UnixStream::pair()?;
    /// // A peer that speaks plain capnp framing and nothing else.
    /// let plain = std::thread::spawn(move || -> capnp::Result<String> {
    ///     let mut b = b;
    ///     let m = capnp::serialize::read_message(&mut b, Default::default())?;
    ///     Ok(m.get_root::<capnp::text::Reader<'_>>()?.to_string()?)
    /// });
    /// let a = Channel::from_stream_with(a, &Options::new().wire(Wire::Plain))?;
    /// assert_eq!(a.transport(), Transport::Stream);
    /// let mut m = a.message();
    /// m.set_root(capnp::text::Reader::from("plain"))?;
    /// a.send(m).map_err(|e| e.into_error())?;
    /// assert_eq!(plain.join().unwrap()?, "plain");
    /// # Ok(()) }
    /// ```
    pub fn wire(mut self, wire: Wire) -> Options {
        self.wire = wire;
        self
    }
}
