//! Soak: millions of messages of random size and shape from a forked child
//! to its parent, every byte checked, while the parent holds some messages
//! for a while and releases them out of order. It fails (exit status 1) on
//! the first lost, duplicated, reordered or corrupted message, and on any
//! leak: descriptors or file mappings that do not stay flat, or resident
//! memory that keeps growing.
//!
//! ```text
//! cargo run --release --example soak -- --messages 5000000 [--seed N] [--max-held N]
//! ```
//!
//! What travels: message `seq` is a `data_list` whose item 0 is a header
//! (sequence number, payload length, checksum of the payload) and whose other
//! 1 to 16 items carry 0 to 256 KiB of payload in all, mostly small. The
//! payload bytes are a pseudo-random pattern derived from `(seed, seq, item)`,
//! so the parent can check each byte without a copy of what was sent, and the
//! shape (item count and lengths) is derived the same way, so a truncated or
//! padded item shows too. First segments of 64 words make large messages
//! span several segments.
//!
//! The parent keeps a random subset of the messages (at most `--max-held`,
//! default 8) for a random number of further messages, then releases them
//! in random order, checking each again first: the sender must not have
//! reused their words meanwhile. When nothing arrives for a while it
//! releases one early, so the sender, whose region must hold the held
//! messages plus the one it builds, never waits for good.
//!
//! The same engine runs, shorter, as `tests/soak.rs` under `cargo test`
//! (which includes this file as a module): the checks cannot drift apart.

#![allow(unsafe_code)] // fork(2), waitpid(2), kill(2) and _exit(2): the only unsafe here.

use std::time::{Duration, Instant};

use capnp_shm::{Channel, Options, Received, RecvError, RecvTimeoutError};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages to send.
    pub messages: u64,
    /// Seeds the payload patterns, the shapes and the parent's choices.
    pub seed: u64,
    /// The most messages the parent holds at once.
    pub max_held: usize,
    /// Outgoing region size of both ends.
    pub region_size: usize,
    /// The largest payload of one message, in bytes.
    pub max_payload: usize,
    /// First segment of each message, in words.
    pub first_segment_words: u32,
    /// Messages before the leak baselines are taken (descriptors, mappings,
    /// resident memory), so that warming up is not counted as a leak.
    pub warmup: u64,
    /// How much resident memory may grow after the warm-up, in bytes.
    pub rss_growth_limit: u64,
    /// Print a progress line this often; `None`: quiet.
    pub progress: Option<Duration>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            messages: 2_000_000,
            seed: 0x5eed,
            max_held: 8,
            region_size: 16 << 20,
            max_payload: 256 << 10,
            first_segment_words: 64,
            warmup: 20_000,
            rss_growth_limit: 64 << 20,
            progress: Some(Duration::from_secs(5)),
        }
    }
}

/// What a successful run saw (the parent's side).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Messages received and checked.
    pub messages: u64,
    /// Payload bytes checked (headers not counted).
    pub payload_bytes: u64,
    /// Bytes of all segments received.
    pub wire_bytes: u64,
    /// Messages of more than one segment.
    pub multi_segment: u64,
    /// The most segments in one message.
    pub max_segments: usize,
    /// Messages held for a while.
    pub held: u64,
    /// Held messages released while an older one was still held.
    pub out_of_order_releases: u64,
    /// The most messages held at once.
    pub held_peak: usize,
    /// Waits in which nothing arrived (each releases a held message early).
    pub starved: u64,
    /// Descriptors open in the parent: at the warm-up, and at the end.
    pub fds: (usize, usize),
    /// File mappings in the parent: at the warm-up, and at the end.
    pub maps: (usize, usize),
    /// The parent's resident memory in bytes: at the warm-up, at the end.
    pub rss: (u64, u64),
    /// From the start to the last message checked.
    pub elapsed: Duration,
}

/// Items in a message after the header, at most.
const MAX_ITEMS: usize = 16;

/// Bytes of the header item: sequence number, payload length, checksum.
const HEADER_BYTES: usize = 24;

/// How long the parent waits for a message before releasing a held one.
const STARVED_AFTER: Duration = Duration::from_millis(20);

/// Messages between two leak checks in the parent.
const CHECK_EVERY: u64 = 4096;

// ---- random numbers and patterns --------------------------------------------

/// splitmix64: a small PRNG, and a good mixer of seeds.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, `n > 0` (the modulo bias does not matter here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `0..n` as an index.
    fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// The byte pattern of one item: xorshift64 words, little-endian.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64, seq: u64, item: usize) -> Pattern {
        let mut mix = Rng::new(seed ^ seq.rotate_left(17) ^ (item as u64).rotate_left(47));
        Pattern(mix.next() | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Fills `out` with the pattern.
    fn fill(mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let n = tail.len();
        tail.copy_from_slice(&self.next().to_le_bytes()[..n]);
    }

    /// Compares `bytes` with the pattern; the offset of the first wrong byte.
    fn first_mismatch(mut self, bytes: &[u8]) -> Option<usize> {
        let mut chunks = bytes.chunks_exact(8);
        for (i, chunk) in (&mut chunks).enumerate() {
            let want = self.next().to_le_bytes();
            if chunk != want {
                let k = chunk.iter().zip(want).position(|(a, b)| *a != b);
                return Some(i * 8 + k.unwrap_or(0));
            }
        }
        let tail = chunks.remainder();
        let want = self.next().to_le_bytes();
        let k = tail.iter().zip(want).position(|(a, b)| *a != b)?;
        Some(bytes.len() - tail.len() + k)
    }
}

/// A checksum of the payload, item after item (FNV-1a over 8-byte words;
/// a short tail is zero-padded).
fn checksum(items: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for item in items {
        let mut chunks = item.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x0100_0000_01b3);
        }
        let tail = chunks.remainder();
        let mut word = [0; 8];
        word[..tail.len()].copy_from_slice(tail);
        h = (h ^ u64::from_le_bytes(word) ^ item.len() as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The item lengths of message `seq`: 1 to [`MAX_ITEMS`] items sharing a
/// payload of 0 to `max_payload` bytes, mostly small.
#[derive(Debug, Clone, Copy)]
struct Shape {
    items: usize,
    lens: [usize; MAX_ITEMS],
}

impl Shape {
    fn of(seed: u64, seq: u64, max_payload: usize) -> Shape {
        let mut rng = Rng::new(seed.rotate_left(29) ^ seq.wrapping_mul(0xd6e8_feb8_6659_fd93));
        let max = max_payload as u64;
        let total = match rng.below(100) {
            0..=54 => rng.below(257),
            55..=79 => 256 + rng.below(4096 - 256),
            80..=91 => 4096 + rng.below(32_768 - 4096),
            92..=97 => 32_768 + rng.below(131_072 - 32_768),
            _ => 131_072 + rng.below(max.saturating_sub(131_072) + 1),
        }
        .min(max);
        let items = 1 + rng.index(MAX_ITEMS);
        // Cut the payload at items - 1 random points.
        let mut cuts = [0u64; MAX_ITEMS + 1];
        for cut in cuts.iter_mut().take(items).skip(1) {
            *cut = rng.below(total + 1);
        }
        cuts[items] = total;
        cuts[..items].sort_unstable();
        let mut lens = [0; MAX_ITEMS];
        for (i, len) in lens.iter_mut().enumerate().take(items) {
            *len = usize::try_from(cuts[i + 1] - cuts[i]).unwrap_or(0);
        }
        Shape { items, lens }
    }

    fn lens(&self) -> &[usize] {
        &self.lens[..self.items]
    }

    fn total(&self) -> usize {
        self.lens().iter().sum()
    }
}

// ---- the sender (child) ----------------------------------------------------

/// Builds message `seq` in `channel`'s region; `scratch` holds the payload
/// while it is generated (capnp copies it into the item).
fn build<'c>(
    channel: &'c Channel,
    config: &Config,
    seq: u64,
    scratch: &mut Vec<u8>,
) -> capnp_shm::MessageBuilder<'c> {
    let shape = Shape::of(config.seed, seq, config.max_payload);
    scratch.clear();
    scratch.resize(shape.total(), 0);
    let mut parts: [&[u8]; MAX_ITEMS] = [&[]; MAX_ITEMS];
    let mut rest = &mut scratch[..];
    for (i, &len) in shape.lens().iter().enumerate() {
        let (part, tail) = rest.split_at_mut(len);
        Pattern::new(config.seed, seq, i).fill(part);
        parts[i] = part;
        rest = tail;
    }
    let parts = &parts[..shape.items];
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(&seq.to_le_bytes());
    header[8..16].copy_from_slice(&(shape.total() as u64).to_le_bytes());
    header[16..].copy_from_slice(&checksum(parts).to_le_bytes());

    let mut message = channel.message();
    let count = u32::try_from(shape.items + 1).unwrap_or(u32::MAX);
    let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(count);
    list.set(0, &header);
    for (i, part) in (1..).zip(parts) {
        list.set(i, part);
    }
    message
}

/// Descriptor, mapping and memory figures of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    fds: usize,
    maps: usize,
    rss: u64,
}

impl Usage {
    fn now() -> Usage {
        Usage {
            fds: fd_count(),
            maps: map_count(),
            rss: rss_bytes(),
        }
    }

    /// Descriptors and mappings back at `base`, memory grown by at most `limit`.
    fn check_against(&self, base: &Usage, limit: u64, who: &str) -> Result<(), String> {
        if self.fds != base.fds {
            return Err(format!(
                "{who}: {} descriptors open, {} after the warm-up",
                self.fds, base.fds
            ));
        }
        if self.maps != base.maps {
            return Err(format!(
                "{who}: {} file mappings, {} after the warm-up",
                self.maps, base.maps
            ));
        }
        let growth = self.rss.saturating_sub(base.rss);
        if growth > limit {
            return Err(format!(
                "{who}: resident memory grew by {} MiB since the warm-up (limit {} MiB)",
                growth >> 20,
                limit >> 20
            ));
        }
        Ok(())
    }
}

/// The child: sends every message, checks its own descriptors, mappings and
/// memory, and closes. Exit status 0, or 1 with the reason on stderr.
fn sender(channel: &Channel, config: &Config) -> i32 {
    let mut scratch = Vec::with_capacity(config.max_payload);
    let mut base = None;
    let mut checks = (0, 0);
    for seq in 0..config.messages {
        if let Err(e) = channel.send(build(channel, config, seq, &mut scratch)) {
            eprintln!("soak child: send of message {seq} failed: {e}");
            return 1;
        }
        if seq == config.warmup.min(config.messages - 1) {
            base = Some(Usage::now());
        }
        if let Some(base) = &base {
            if seq % CHECK_EVERY == 0 || seq + 1 == config.messages {
                let now = Usage::now();
                if let Err(e) = now.check_against(base, config.rss_growth_limit, "child") {
                    eprintln!("soak child: {e}");
                    return 1;
                }
                checks = (checks.0 + 1, now.rss);
            }
        }
    }
    if config.progress.is_some() {
        let base = base.unwrap_or_else(Usage::now);
        println!(
            "child: sent {} messages; {} segments spilled to the heap (region full); \
             {} leak checks passed; fds {}, file mappings {}, VmRSS {} -> {} MiB",
            config.messages,
            channel.spilled_segments(),
            checks.0,
            base.fds,
            base.maps,
            base.rss >> 20,
            checks.1 >> 20,
        );
    }
    0
}

// ---- the receiver (parent) -------------------------------------------------

/// A message the parent holds, and when it lets go.
struct Held<'c> {
    seq: u64,
    until: u64,
    message: Received<'c>,
}

/// Checks message `seq` byte for byte: header, shape, pattern, checksum.
/// Returns the payload length.
fn verify(message: &Received<'_>, config: &Config, seq: u64) -> Result<usize, String> {
    let list: capnp::data_list::Reader<'_> = message
        .get_root()
        .map_err(|e| format!("message {seq}: unreadable: {e}"))?;
    let header = list
        .get(0)
        .map_err(|e| format!("message {seq}: no header: {e}"))?;
    if header.len() != HEADER_BYTES {
        return Err(format!("message {seq}: header of {} bytes", header.len()));
    }
    let field = |i: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&header[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    let got = field(0);
    if got != seq {
        return Err(format!(
            "expected message {seq}, got {got}: lost, duplicated or reordered"
        ));
    }
    let shape = Shape::of(config.seed, seq, config.max_payload);
    if list.len() as usize != shape.items + 1 || field(1) != shape.total() as u64 {
        return Err(format!(
            "message {seq}: {} items and {} payload bytes, expected {} and {}",
            list.len() - 1,
            field(1),
            shape.items,
            shape.total()
        ));
    }
    let mut parts: [&[u8]; MAX_ITEMS] = [&[]; MAX_ITEMS];
    for (i, &len) in shape.lens().iter().enumerate() {
        let index = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let item = list
            .get(index)
            .map_err(|e| format!("message {seq} item {i}: {e}"))?;
        if item.len() != len {
            return Err(format!(
                "message {seq} item {i}: {} bytes, expected {len}",
                item.len()
            ));
        }
        if let Some(at) = Pattern::new(config.seed, seq, i).first_mismatch(item) {
            return Err(format!("message {seq} item {i}: byte {at} corrupted"));
        }
        parts[i] = item;
    }
    if checksum(&parts[..shape.items]) != field(2) {
        return Err(format!("message {seq}: checksum mismatch"));
    }
    Ok(shape.total())
}

/// Receives and checks every message; holds and releases at random.
fn receiver(channel: &Channel, config: &Config, started: Instant) -> Result<Summary, String> {
    let mut rng = Rng::new(config.seed ^ 0x0123_4567_89ab_cdef);
    let mut summary = Summary::default();
    let mut held: Vec<Held<'_>> = Vec::with_capacity(config.max_held);
    let mut base: Option<Usage> = None;
    let mut last_progress = Instant::now();

    // Releases held message `i`, after checking it is still intact.
    let release = |held: &mut Vec<Held<'_>>, i: usize, summary: &mut Summary| {
        let h = held.swap_remove(i);
        if held.iter().any(|other| other.seq < h.seq) {
            summary.out_of_order_releases += 1;
        }
        verify(&h.message, config, h.seq).map_err(|e| format!("while held: {e}"))?;
        Ok::<(), String>(())
    };

    for seq in 0..config.messages {
        let message = loop {
            match channel.recv_timeout(STARVED_AFTER) {
                Ok(m) => break m,
                Err(RecvTimeoutError::Timeout) => {
                    summary.starved += 1;
                    if !held.is_empty() {
                        let i = rng.index(held.len());
                        release(&mut held, i, &mut summary)?;
                    }
                }
                Err(e) => return Err(format!("recv of message {seq}: {e}")),
            }
        };
        summary.payload_bytes += verify(&message, config, seq)? as u64;
        let segments = message.segments().count();
        summary.wire_bytes += message.len_bytes() as u64;
        summary.multi_segment += u64::from(segments > 1);
        summary.max_segments = summary.max_segments.max(segments);
        summary.messages += 1;

        if held.len() < config.max_held && rng.chance(1, 4) {
            let until = seq + 1 + rng.below(256);
            held.push(Held {
                seq,
                until,
                message,
            });
            summary.held += 1;
            summary.held_peak = summary.held_peak.max(held.len());
        }
        // Those due, in random order.
        while let Some(i) = pick_due(&held, seq, &mut rng) {
            release(&mut held, i, &mut summary)?;
        }

        if seq == config.warmup.min(config.messages - 1) {
            base = Some(Usage::now());
        }
        let progress_due = config
            .progress
            .is_some_and(|every| last_progress.elapsed() >= every);
        if let Some(base) = &base {
            if seq % CHECK_EVERY == 0 || progress_due {
                Usage::now().check_against(base, config.rss_growth_limit, "parent")?;
            }
        }
        if progress_due {
            last_progress = Instant::now();
            progress(&summary, held.len(), started);
        }
    }
    // The rest, in random order.
    while !held.is_empty() {
        let i = rng.index(held.len());
        release(&mut held, i, &mut summary)?;
    }
    summary.elapsed = started.elapsed();
    // The child sent everything and closes: nothing more may come.
    match channel.recv() {
        Err(RecvError::Disconnected) => {}
        Ok(m) => {
            let list: capnp::data_list::Reader<'_> = m.get_root().map_err(|e| e.to_string())?;
            return Err(format!("a message after the last: {} items", list.len()));
        }
        Err(e) => return Err(format!("after the last message: {e}, not Disconnected")),
    }
    let end = Usage::now();
    let base = base.unwrap_or(end);
    end.check_against(&base, config.rss_growth_limit, "parent")?;
    summary.fds = (base.fds, end.fds);
    summary.maps = (base.maps, end.maps);
    summary.rss = (base.rss, end.rss);
    Ok(summary)
}

/// A random one of the held messages that are due, if any.
fn pick_due(held: &[Held<'_>], seq: u64, rng: &mut Rng) -> Option<usize> {
    let due = held.iter().filter(|h| h.until <= seq).count();
    if due == 0 {
        return None;
    }
    let k = rng.index(due);
    held.iter()
        .enumerate()
        .filter(|(_, h)| h.until <= seq)
        .nth(k)
        .map(|(i, _)| i)
}

fn progress(summary: &Summary, held: usize, started: Instant) {
    println!(
        "{:>7.1} s  {:>10} messages  {:>8.2} GB  held {held}  fds {}  file mappings {}  VmRSS {} MiB",
        started.elapsed().as_secs_f64(),
        summary.messages,
        summary.wire_bytes as f64 / 1e9,
        fd_count(),
        map_count(),
        rss_bytes() >> 20,
    );
}

// ---- processes -------------------------------------------------------------

/// Runs the soak: a channel pair, a forked child sending, this process
/// receiving. Checks that descriptors and mappings are back where they were
/// once the channel is gone, and that the child exited cleanly.
///
/// # Errors
///
/// The first failure, in words.
pub fn run(config: &Config) -> Result<Summary, String> {
    if config.messages == 0 {
        return Err("nothing to send".into());
    }
    let options = Options::new()
        .region_size(config.region_size)
        .first_segment_words(config.first_segment_words);
    // One channel first: state created lazily on first use is not a leak.
    drop(Channel::pair_with(&options).map_err(|e| e.to_string())?);
    let before = Usage::now();

    let started = Instant::now();
    let (parent_end, child_end) = Channel::pair_with(&options).map_err(|e| e.to_string())?;
    let (mut parent_end, mut child_end) = (Some(parent_end), Some(child_end));
    let child = fork(|| {
        drop(parent_end.take()); // the child uses only its own end
        let channel = child_end.take().expect("child end");
        sender(&channel, config)
    })?;
    drop(child_end.take());
    let channel = parent_end.take().expect("parent end");

    let result = receiver(&channel, config, started);
    drop(channel);
    if result.is_err() {
        child.kill(); // do not leave it blocked on a full channel
    }
    let status = child.wait();
    let summary = result?;
    if status != 0 {
        return Err(format!("the child exited with status {status}"));
    }
    let after = Usage::now();
    if after.fds != before.fds || after.maps != before.maps {
        return Err(format!(
            "after the channel: {} descriptors and {} file mappings, {} and {} before",
            after.fds, after.maps, before.fds, before.maps
        ));
    }
    if shm_map_count() != 0 {
        return Err("a region is still mapped after the channel dropped".into());
    }
    Ok(summary)
}

/// A forked child process.
#[derive(Debug)]
struct Child {
    pid: libc::pid_t,
}

/// Forks; the child runs `f` and exits with its return code (101 if it
/// panics), without running this process's destructors or exit handlers.
fn fork(f: impl FnOnce() -> i32) -> Result<Child, String> {
    // SAFETY: the child only runs `f` and then `_exit`s; `f` takes no lock
    // another thread could hold (glibc keeps malloc usable in the child).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child at once, without unwinding into the parent's
        // frames or running its exit handlers.
        unsafe { libc::_exit(code) };
    }
    Ok(Child { pid })
}

impl Child {
    fn kill(&self) {
        // SAFETY: signals our own child, not yet waited for (so its pid
        // cannot have been reused).
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// Waits for the child; its exit code, or 128 + the signal that ended it.
    fn wait(self) -> i32 {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return -1;
            }
        }
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }
    }
}

// ---- /proc -----------------------------------------------------------------

/// Open descriptors of this process.
fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// File-backed mappings of this process (memfds included). Anonymous ones
/// are left out: malloc grows and trims its arenas as it likes.
fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| {
        maps.lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(5)
                    .is_some_and(|p| p.starts_with('/'))
            })
            .count()
    })
}

/// Mappings of capnp-shm regions (memfds or `/dev/shm` files).
fn shm_map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| {
        maps.lines()
            .filter(|l| l.contains("memfd:capnp-shm") || l.contains("/dev/shm/capnp-shm"))
            .count()
    })
}

/// Resident memory of this process (`VmRSS`), in bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

// ---- the program -------------------------------------------------------------

fn parse_args() -> Result<Config, String> {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.replace('_', "").parse::<u64>().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--messages" => config.messages = value("--messages")?,
            "--seed" => config.seed = value("--seed")?,
            "--max-held" => {
                config.max_held =
                    usize::try_from(value("--max-held")?).map_err(|e| e.to_string())?;
            }
            "--help" | "-h" => {
                return Err(
                    "usage: soak [--messages N (2000000)] [--seed N] [--max-held N (8)]".into(),
                )
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    config.warmup = config.warmup.min(config.messages / 10);
    Ok(config)
}

fn main() {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    println!(
        "soak: {} messages, seed {}, at most {} held, {} MiB regions, payloads up to {} KiB",
        config.messages,
        config.seed,
        config.max_held,
        config.region_size >> 20,
        config.max_payload >> 10
    );
    match run(&config) {
        Ok(s) => {
            let secs = s.elapsed.as_secs_f64();
            println!(
                "soak OK: {} messages, {:.2} GB on the wire ({:.2} GB payload checked) in {:.1} s \
                 ({:.0} messages/s, {:.2} GB/s); {} multi-segment (up to {} segments); \
                 {} held (peak {}), {} released out of order, {} starved waits; \
                 fds {} -> {}, file mappings {} -> {}, VmRSS {} -> {} MiB",
                s.messages,
                s.wire_bytes as f64 / 1e9,
                s.payload_bytes as f64 / 1e9,
                secs,
                s.messages as f64 / secs,
                s.wire_bytes as f64 / 1e9 / secs,
                s.multi_segment,
                s.max_segments,
                s.held,
                s.held_peak,
                s.out_of_order_releases,
                s.starved,
                s.fds.0,
                s.fds.1,
                s.maps.0,
                s.maps.1,
                s.rss.0 >> 20,
                s.rss.1 >> 20,
            );
        }
        Err(e) => {
            eprintln!("soak FAILED: {e}");
            std::process::exit(1);
        }
    }
}
