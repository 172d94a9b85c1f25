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
/// Messages a receiver holds (has not dropped yet) occupy the *sender's*
/// region and ring: the sender waits once the receiver holds as many as the
/// smaller of the two [`ring_capacity`](Options::ring_capacity)s, or once
/// they fill its [`region_size`](Options::region_size).
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
        }
    }
}

impl Options {
    /// The defaults: a 16 MiB region, 256 messages in flight, 8 KiB first
    /// segments, 50 µs of spinning before sleeping, 100 ms wait slices, 5 s
    /// set-up timeout, capnp's default reader limits, zero-copy receive,
    /// [`Backing::Auto`], unsealed peer regions refused.
    pub fn new() -> Options {
        Options::default()
    }

    /// Size in bytes of the outgoing region (control block, rings and data
    /// area), rounded up to 4 KiB. A message larger than the data area
    /// cannot be sent. Memory is touched only as messages use it.
    pub fn region_size(mut self, bytes: usize) -> Options {
        self.region_size = bytes;
        self
    }

    /// How many messages may be in flight (sent and not yet released by the
    /// peer), rounded up to a power of two, at most 65 536.
    ///
    /// The limit in force is the *smaller* of the two ends' capacities: a
    /// receiver that keeps more received messages than that (not dropped)
    /// makes the sender wait, until it drops one. To hold many messages,
    /// raise this on **both** ends. [`SendStats::held_by_peer`] and
    /// [`SendStats::held_limit`](crate::SendStats::held_limit) show it
    /// (`Sender::stats`).
    ///
    /// [`SendStats::held_by_peer`]: crate::SendStats::held_by_peer
    pub fn ring_capacity(mut self, messages: u32) -> Options {
        self.ring_capacity = messages;
        self
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
