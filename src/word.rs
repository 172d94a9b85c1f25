//! The memory the protocol runs on: 32-bit words shared between two
//! processes (and pairs of them, for a carried message's bytes), fences,
//! and the futex.
//!
//! The rings (`ring.rs`) and the waiter (`wait.rs`) are written against the
//! [`Word`] trait rather than `AtomicU32` directly, so that the model
//! checker (`model.rs`, a test) runs them unchanged over loom's atomics and
//! a modelled futex. In the crate `Word` is `AtomicU32` in a shared mapping
//! with `futex(2)`: every method inlines to the atomic or the system call.
//!
//! Who may write a word is part of its type: [`Mine`] is a word of this
//! end's own region (loads and stores), [`Theirs`] a word of the peer's
//! region, which this process maps read-only and may only load, `Relaxed`.
//! (Rust allows atomic accesses to read-only memory only as `Relaxed`
//! loads; where an ordering is needed, a fence stands next to the load.)

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::sys::futex;

/// A 32-bit word of shared memory, as the protocol uses it.
pub(crate) trait Word: Send + Sync + 'static {
    /// Two words loaded and stored as one: a carried message's bytes.
    type Pair: Pair;
    /// An atomic load.
    fn load(&self, order: Ordering) -> u32;
    /// An atomic store.
    fn store(&self, value: u32, order: Ordering);
    /// Compare-and-swap (`AcqRel` on success, `Acquire` on failure): the
    /// value found, `Ok` when it was `current` and is now `new`.
    fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32>;
    /// A memory fence.
    fn fence(order: Ordering);
    /// Sleeps while `*self == expected`, for at most `timeout`, or until
    /// woken. Returns also on a signal or spuriously: the caller re-checks.
    /// The word may lie in a read-only mapping.
    ///
    /// # Errors
    ///
    /// When the kernel refuses to sleep (a seccomp filter, say).
    fn wait(&self, expected: u32, timeout: Duration) -> io::Result<()>;
    /// Sleeps while every word holds its expected value, for at most
    /// `timeout`, or until any is woken (`futex_waitv`). At most
    /// [`WAIT_MANY_MAX`] words.
    ///
    /// # Errors
    ///
    /// `Unsupported` when the kernel cannot wait on several words (the
    /// caller then waits on one); anything else when it refuses to sleep.
    fn wait_many(words: &[(&Self, u32)], timeout: Duration) -> io::Result<()>;
    /// Wakes every process sleeping on the word.
    fn wake(&self);
}

/// The most words one [`Word::wait_many`] takes.
pub(crate) const WAIT_MANY_MAX: usize = futex::FUTEX_WAITV_MAX;

impl Word for AtomicU32 {
    type Pair = AtomicU64;

    #[inline]
    fn load(&self, order: Ordering) -> u32 {
        AtomicU32::load(self, order)
    }

    #[inline]
    fn store(&self, value: u32, order: Ordering) {
        AtomicU32::store(self, value, order);
    }

    #[inline]
    fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32> {
        AtomicU32::compare_exchange(self, current, new, Ordering::AcqRel, Ordering::Acquire)
    }

    #[inline]
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order);
    }

    fn wait(&self, expected: u32, timeout: Duration) -> io::Result<()> {
        futex::futex_wait(self, expected, timeout)
    }

    fn wait_many(words: &[(&Self, u32)], timeout: Duration) -> io::Result<()> {
        futex::futex_waitv(words, timeout)
    }

    fn wake(&self) {
        futex::futex_wake(self);
    }
}

/// Two 32-bit words of shared memory, 8-byte aligned, loaded and stored as
/// one 64-bit word, `Relaxed` only: the bytes of a carried message
/// (`ring.rs`), copied eight at a time. Their order is published by the
/// fences and the tag around them, as for the other words of an entry.
pub(crate) trait Pair: Send + Sync + 'static {
    /// A `Relaxed` load.
    fn load(&self) -> u64;
    /// A `Relaxed` store.
    fn store(&self, value: u64);
    /// A load whose value is thrown away, for its cache line only: issued
    /// beside another load, it brings the line over from the core that
    /// wrote it at the same time (see `ring.rs`, `next_ready`). It means
    /// nothing to the protocol, so the model checker's pairs skip it.
    fn touch(&self);
}

impl Pair for AtomicU64 {
    #[inline]
    fn load(&self) -> u64 {
        AtomicU64::load(self, Ordering::Relaxed)
    }

    #[inline]
    fn store(&self, value: u64) {
        AtomicU64::store(self, value, Ordering::Relaxed);
    }

    #[inline]
    fn touch(&self) {
        std::hint::black_box(Pair::load(self));
    }
}

/// Pairs of words of this end's own region, stored as a whole.
pub(crate) struct MinePairs<'a, P, const N: usize>(&'a [P; N]);

/// Pairs of words of the peer's region, mapped read-only here: loaded as
/// a whole, `Relaxed`.
pub(crate) struct TheirPairs<'a, P, const N: usize>(&'a [P; N]);

impl<'a, P: Pair, const N: usize> MinePairs<'a, P, N> {
    /// The caller names these pairs as its own region's.
    pub(crate) fn new(pairs: &'a [P; N]) -> MinePairs<'a, P, N> {
        MinePairs(pairs)
    }

    /// Stores `bytes`, little-endian word by word, in the first pairs,
    /// `Relaxed`: a trailing part word is dropped, and words past `N` too.
    /// The other pairs keep what they held: a store takes the line it
    /// lands on from the peer, so a message on the first line leaves the
    /// second with the peer (see `DescriptorEntry::carried`). Read
    /// straight from `bytes`: gathered into a buffer first, the words
    /// would be copied by `memcpy`, whose wide, overlapping stores the
    /// word loads after it waited on (a store-forwarding stall, seen with
    /// perf). Each length a carried message can have is its own unrolled
    /// run of stores, reached by one jump on the length: a loop over the
    /// words and its remainder cost 24 more instructions for a message of
    /// 11 words.
    #[inline(always)]
    pub(crate) fn store_words(&self, bytes: &[u8]) {
        macro_rules! fixed {
            ($($k:literal)*) => {
                match bytes.len() / 8 {
                    $($k => {
                        if let Some(b) = bytes.first_chunk::<{ $k * 8 }>() {
                            self.store_fixed(b);
                        }
                    })*
                    _ => self.store_fixed(bytes),
                }
            };
        }
        fixed!(1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    }

    /// Stores the whole words of `bytes` in the first pairs, as many as
    /// there are of both.
    #[inline(always)]
    fn store_fixed(&self, bytes: &[u8]) {
        for (pair, chunk) in self.0.iter().zip(bytes.chunks_exact(8)) {
            let mut le = [0; 8];
            le.copy_from_slice(chunk);
            pair.store(u64::from_le_bytes(le));
        }
    }
}

impl<'a, P: Pair, const N: usize> TheirPairs<'a, P, N> {
    /// The caller names these pairs as the peer's region's.
    pub(crate) fn new(pairs: &'a [P; N]) -> TheirPairs<'a, P, N> {
        TheirPairs(pairs)
    }

    /// Touches pair `i` ([`Pair::touch`]), if there is one.
    #[inline(always)]
    pub(crate) fn touch(&self, i: usize) {
        if let Some(pair) = self.0.get(i) {
            pair.touch();
        }
    }

    /// Loads the first pairs, `Relaxed`, into `bytes`, little-endian word
    /// by word, as many as `bytes` has room for whole. Each word is stored
    /// as it is loaded, so that nothing copies them again (see
    /// [`MinePairs::store_words`]).
    #[inline(always)]
    pub(crate) fn load_into(&self, bytes: &mut [u8]) {
        for (chunk, pair) in bytes.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&pair.load().to_le_bytes());
        }
    }
}

impl<P, const N: usize> Clone for MinePairs<'_, P, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P, const N: usize> Copy for MinePairs<'_, P, N> {}
impl<P, const N: usize> Clone for TheirPairs<'_, P, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P, const N: usize> Copy for TheirPairs<'_, P, N> {}

impl<P, const N: usize> fmt::Debug for MinePairs<'_, P, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MinePairs({N})")
    }
}

impl<P, const N: usize> fmt::Debug for TheirPairs<'_, P, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TheirPairs({N})")
    }
}

/// A word of this end's own region: this process stores it, the peer
/// loads it.
pub(crate) struct Mine<'a, W>(&'a W);

/// A word of the peer's region, mapped read-only here: loads only, and
/// only `Relaxed` ones.
pub(crate) struct Theirs<'a, W>(&'a W);

impl<'a, W: Word> Mine<'a, W> {
    /// The view of a word of our own region.
    pub(crate) fn new(word: &'a W) -> Mine<'a, W> {
        Mine(word)
    }

    #[inline]
    pub(crate) fn load(&self, order: Ordering) -> u32 {
        self.0.load(order)
    }

    #[inline]
    pub(crate) fn store(&self, value: u32, order: Ordering) {
        self.0.store(value, order);
    }

    pub(crate) fn compare_exchange(&self, current: u32, new: u32) -> Result<u32, u32> {
        self.0.compare_exchange(current, new)
    }

    /// Wakes whoever sleeps on the word (the peer, through its mapping).
    pub(crate) fn wake(&self) {
        self.0.wake();
    }
}

impl<'a, W: Word> Theirs<'a, W> {
    /// The view of a word of the peer's region.
    pub(crate) fn new(word: &'a W) -> Theirs<'a, W> {
        Theirs(word)
    }

    /// A `Relaxed` load: what the peer wrote, to validate before use.
    #[inline]
    pub(crate) fn load(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// The word itself, to sleep on (the futex only reads it).
    pub(crate) fn futex(&self) -> &'a W {
        self.0
    }
}

impl<W> Clone for Mine<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Mine<'_, W> {}
impl<W> Clone for Theirs<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Theirs<'_, W> {}

impl<W: Word> fmt::Debug for Mine<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mine({})", self.0.load(Ordering::Relaxed))
    }
}

impl<W: Word> fmt::Debug for Theirs<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Theirs({})", self.load())
    }
}
