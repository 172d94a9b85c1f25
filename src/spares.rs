//! Buffers a receiving side keeps from the messages that dropped, for the
//! next ones, so that a steady stream of messages allocates nothing: the
//! copies of carried messages (`ring.rs`), and the vectors of tables and
//! places of messages of several segments (`recv.rs`).

use std::cell::{Cell, RefCell};
use std::fmt;

/// Up to `KEEP` kept buffers of type `B`. The last one kept has a place of
/// its own: a receiver that drops each message before the next, the common
/// case, pays a look and a store for it, where the vector of the others
/// costs a borrow and a bounds check. A receiver that holds more than
/// `KEEP` messages at once frees the rest as they drop, rather than keep
/// its peak for as long as it lives.
pub(crate) struct Spares<B, const KEEP: usize> {
    last: Cell<Option<B>>,
    more: RefCell<Vec<B>>,
}

impl<B, const KEEP: usize> Default for Spares<B, KEEP> {
    fn default() -> Self {
        Spares {
            last: Cell::new(None),
            more: RefCell::new(Vec::new()),
        }
    }
}

impl<B, const KEEP: usize> Spares<B, KEEP> {
    /// A kept buffer, the last kept first; `None` when none is.
    #[inline(always)]
    pub(crate) fn take(&self) -> Option<B> {
        match self.last.take() {
            Some(buf) => Some(buf),
            None => self.take_more(),
        }
    }

    #[inline(never)]
    fn take_more(&self) -> Option<B> {
        self.more.try_borrow_mut().ok()?.pop()
    }

    /// Keeps `buf` for the next message, if fewer than `KEEP` are kept.
    #[inline(always)]
    pub(crate) fn keep(&self, buf: B) {
        if let Some(other) = self.last.replace(Some(buf)) {
            self.keep_more(other);
        }
    }

    #[inline(never)]
    fn keep_more(&self, buf: B) {
        if let Ok(mut kept) = self.more.try_borrow_mut() {
            if kept.len() + 1 < KEEP {
                kept.push(buf);
            }
        }
    }

    /// How many are kept.
    pub(crate) fn kept(&self) -> usize {
        let last = self.last.take();
        let n = usize::from(last.is_some());
        self.last.set(last);
        n + self.more.try_borrow().map_or(0, |more| more.len())
    }
}

impl<T, const KEEP: usize> Spares<Vec<T>, KEEP> {
    /// An empty vector: a kept one, or a new one (no allocation yet).
    pub(crate) fn take_vec(&self) -> Vec<T> {
        self.take().unwrap_or_default()
    }

    /// Takes `buffer` to keep, emptied, if it holds memory (leaving an
    /// empty vector). The check is inline: a buffer that holds nothing (the
    /// empty poll, the owned or copied message of one segment) pays only
    /// for it.
    #[inline]
    pub(crate) fn keep_vec(&self, buffer: &mut Vec<T>) {
        if buffer.capacity() > 0 {
            self.store_vec(std::mem::take(buffer));
        }
    }

    #[inline(never)]
    fn store_vec(&self, mut buffer: Vec<T>) {
        buffer.clear();
        self.keep(buffer);
    }
}

impl<B, const KEEP: usize> fmt::Debug for Spares<B, KEEP> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Spares({} of {KEEP} kept)", self.kept())
    }
}
