//! The free words of a data area: pure bookkeeping, no memory access.

use crate::region::Extent;

/// The free words of a data area, as extents sorted by start, never empty,
/// never overlapping and never touching (neighbours are merged on free).
///
/// Allocation is first fit from the lowest address. In a steady stream the
/// same low, cache-warm words are reused message after message; a message the
/// peer holds for an hour is just an extent the search steps over, so it never
/// blocks the rest of the area (no head-of-line blocking).
///
/// Invariant: every word in a free extent is zero. Callers zero what they
/// free (`OwnRegion::zero`) unless it was never written; the allocator
/// hands capnp only zeroed words on the strength of it.
#[derive(Debug)]
pub(crate) struct FreeList {
    extents: Vec<Extent>,
    free_words: u64,
}

impl FreeList {
    /// A free list over a data area of `words` words, all free.
    pub(crate) fn new(words: u32) -> FreeList {
        let mut extents = Vec::with_capacity(64);
        if words > 0 {
            extents.push(Extent {
                start: 0,
                len: words,
            });
        }
        FreeList {
            extents,
            free_words: u64::from(words),
        }
    }

    /// Total free words.
    pub(crate) fn free_words(&self) -> u64 {
        self.free_words
    }

    /// The longest free extent's length.
    pub(crate) fn largest(&self) -> u32 {
        self.extents.iter().map(|e| e.len).max().unwrap_or(0)
    }

    /// Takes `want` words from the lowest extent that has them; failing that,
    /// as much as the largest extent has, if that is at least `min`. Returns
    /// `None` when no extent has `min` words. `min` must be at least 1.
    pub(crate) fn allocate(&mut self, min: u32, want: u32) -> Option<Extent> {
        debug_assert!(min >= 1 && min <= want.max(min));
        let want = want.max(min);
        let index = match self.extents.iter().position(|e| e.len >= want) {
            Some(i) => i,
            None => {
                let (i, e) = self.extents.iter().enumerate().max_by_key(|(_, e)| e.len)?;
                if e.len < min {
                    return None;
                }
                i
            }
        };
        let e = &mut self.extents[index];
        let len = e.len.min(want);
        let taken = Extent {
            start: e.start,
            len,
        };
        e.start += len;
        e.len -= len;
        if e.len == 0 {
            self.extents.remove(index);
        }
        self.free_words -= u64::from(len);
        Some(taken)
    }

    /// As [`allocate`](Self::allocate), but the extent taken starts at a
    /// word `phase` past a multiple of `period`: from the lowest extent
    /// with room for `want` words from such a start, failing that for `min`
    /// (taking up to `want`). The words skipped before the start stay free.
    /// `None` (nothing changed) when no extent has room for `min`.
    /// `phase < period` and `min >= 1`.
    pub(crate) fn allocate_at_phase(
        &mut self,
        min: u32,
        want: u32,
        phase: u32,
        period: u32,
    ) -> Option<Extent> {
        debug_assert!(phase < period && min >= 1);
        let want = want.max(min);
        // Words from the start of `e` to the first word at the phase, and
        // how many of `e`'s words lie from there on.
        let room = |e: &Extent| {
            let skip = (phase + period - e.start % period) % period;
            e.len.checked_sub(skip).map(|left| (e.start + skip, left))
        };
        let fits = |need: u32| {
            self.extents
                .iter()
                .filter_map(room)
                .find(|&(_, left)| left >= need)
        };
        let (start, left) = fits(want).or_else(|| fits(min))?;
        let taken = Extent {
            start,
            len: left.min(want),
        };
        let took = self.take(taken);
        debug_assert!(took, "a free extent's words are free");
        took.then_some(taken)
    }

    /// Takes `words` words from the lowest free extent, if it has more than
    /// that (it is never emptied here) and starts at or below
    /// `start_limit`; `None` (nothing changed) otherwise. The common case of
    /// [`allocate`](Self::allocate), which picks the same words when it
    /// succeeds. `words` must be at least 1.
    #[inline(always)]
    pub(crate) fn allocate_first(&mut self, words: u32, start_limit: u32) -> Option<Extent> {
        debug_assert!(words >= 1);
        let first = self.extents.first_mut()?;
        if first.len <= words || first.start > start_limit {
            return None;
        }
        let taken = Extent {
            start: first.start,
            len: words,
        };
        first.start += words;
        first.len -= words;
        self.free_words -= u64::from(words);
        Some(taken)
    }

    /// Takes exactly `extent` out of the free list. Returns `false` (and
    /// changes nothing) unless every word of it is free.
    pub(crate) fn take(&mut self, extent: Extent) -> bool {
        if extent.len == 0 {
            return true;
        }
        // The last free extent starting at or before `extent`.
        let i = self.extents.partition_point(|e| e.start <= extent.start);
        let Some(i) = i.checked_sub(1) else {
            return false;
        };
        let e = self.extents[i];
        if e.end() < extent.end() {
            return false;
        }
        let before = Extent {
            start: e.start,
            len: extent.start - e.start,
        };
        let after = Extent {
            start: extent.end(),
            len: e.end() - extent.end(),
        };
        match (before.len > 0, after.len > 0) {
            (true, true) => {
                self.extents[i] = before;
                self.extents.insert(i + 1, after);
            }
            (true, false) => self.extents[i] = before,
            (false, true) => self.extents[i] = after,
            (false, false) => {
                self.extents.remove(i);
            }
        }
        self.free_words -= u64::from(extent.len);
        true
    }

    /// Returns `extent` to the free list, merging it with its neighbours.
    /// The extent must not overlap a free one (checked in debug builds).
    #[inline]
    pub(crate) fn free(&mut self, extent: Extent) {
        if extent.len == 0 {
            return;
        }
        self.free_words += u64::from(extent.len);
        // A stream frees next to the lowest free extent: the tail of the
        // message just sent, or the oldest message, released first.
        if let Some(first) = self.extents.first_mut() {
            if extent.end() == first.start {
                first.start = extent.start;
                first.len += extent.len;
                return;
            }
            if first.end() == extent.start {
                first.len += extent.len;
                let end = first.end();
                if self.extents.get(1).is_some_and(|next| next.start == end) {
                    let next = self.extents.remove(1);
                    self.extents[0].len += next.len;
                }
                debug_assert!(!self.extents.get(1).is_some_and(|n| n.start <= end));
                return;
            }
        }
        self.insert(extent);
    }

    /// [`free`](Self::free) of an extent that touches no end of the lowest
    /// free extent: found by binary search, merged with what it touches.
    #[inline(never)]
    fn insert(&mut self, extent: Extent) {
        // First free extent that starts after `extent`.
        let i = self.extents.partition_point(|e| e.start < extent.start);
        debug_assert!(i == self.extents.len() || extent.end() <= self.extents[i].start);
        debug_assert!(i == 0 || self.extents[i - 1].end() <= extent.start);
        let merges_prev = i > 0 && self.extents[i - 1].end() == extent.start;
        let merges_next = i < self.extents.len() && extent.end() == self.extents[i].start;
        match (merges_prev, merges_next) {
            (true, true) => {
                let next = self.extents.remove(i);
                self.extents[i - 1].len += extent.len + next.len;
            }
            (true, false) => self.extents[i - 1].len += extent.len,
            (false, true) => {
                self.extents[i].start = extent.start;
                self.extents[i].len += extent.len;
            }
            (false, false) => self.extents.insert(i, extent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u32, len: u32) -> Extent {
        Extent { start, len }
    }

    #[test]
    fn allocation_at_a_phase_skips_to_it_and_leaves_the_words_before_free() {
        let mut f = FreeList::new(1000);
        // Phase 3 of 64: from word 3.
        assert_eq!(f.allocate_at_phase(10, 20, 3, 64), Some(ext(3, 20)));
        assert_eq!(f.extents, vec![ext(0, 3), ext(23, 977)]);
        // Next: word 67 (the extent at 0 is too short; 23 is past phase).
        assert_eq!(f.allocate_at_phase(10, 20, 3, 64), Some(ext(67, 20)));
        assert_eq!(f.free_words(), 960);
        // Room for `min` only: takes what there is from the phase.
        let mut g = FreeList::new(100);
        assert_eq!(g.allocate_at_phase(10, 500, 40, 64), Some(ext(40, 60)));
        assert_eq!(g.extents, vec![ext(0, 40)]);
        // No room for `min` from any phase word: nothing changes.
        assert_eq!(g.allocate_at_phase(10, 20, 35, 64), None);
        assert_eq!(g.extents, vec![ext(0, 40)]);
        assert_eq!(g.allocate_at_phase(5, 5, 35, 64), Some(ext(35, 5)));
        assert_eq!(g.extents, vec![ext(0, 35)]);
        // Room for `want` anywhere beats room for only `min` lower down.
        let mut h = FreeList::new(1000);
        assert_eq!(h.allocate(100, 100), Some(ext(0, 100)));
        assert_eq!(h.allocate(50, 50), Some(ext(100, 50)));
        h.free(ext(0, 100)); // [0,100) [150,1000)
        assert_eq!(h.allocate_at_phase(20, 120, 3, 64), Some(ext(195, 120)));
        // Room for `want` nowhere: the lowest with room for `min`.
        assert_eq!(h.allocate_at_phase(20, 900, 3, 64), Some(ext(3, 97)));
    }

    #[test]
    fn first_fit_from_the_bottom() {
        let mut f = FreeList::new(100);
        assert_eq!(f.allocate(1, 10), Some(ext(0, 10)));
        assert_eq!(f.allocate(1, 10), Some(ext(10, 10)));
        f.free(ext(0, 10));
        assert_eq!(f.allocate(1, 5), Some(ext(0, 5)), "reuses the lowest words");
        assert_eq!(f.free_words(), 85);
    }

    #[test]
    fn frees_next_to_the_lowest_extent_merge() {
        let mut f = FreeList::new(100);
        let a = f.allocate(1, 10).unwrap();
        let b = f.allocate(1, 10).unwrap();
        let c = f.allocate(1, 10).unwrap();
        f.free(a); // [0,10) [30,100)
        f.free(b); // after the lowest: [0,20) [30,100)
        assert_eq!(f.extents, vec![ext(0, 20), ext(30, 70)]);
        f.free(c); // after the lowest, touching the next: one extent
        assert_eq!(f.extents, vec![ext(0, 100)]);
        let d = f.allocate(1, 40).unwrap();
        let tail = Extent { start: 10, len: 30 };
        assert_eq!(d, ext(0, 40));
        f.free(tail); // before the lowest: [10,100)
        assert_eq!(f.extents, vec![ext(10, 90)]);
        assert_eq!(f.free_words(), 90);
    }

    #[test]
    fn falls_back_to_the_largest_extent_above_min() {
        let mut f = FreeList::new(100);
        let a = f.allocate(1, 30).unwrap();
        let _b = f.allocate(1, 10).unwrap();
        f.free(a); // free: [0,30) and [40,100)
        assert_eq!(f.allocate(1, 80), Some(ext(40, 60)));
        assert_eq!(f.allocate(31, 40), None);
        assert_eq!(f.allocate(20, 40), Some(ext(0, 30)));
        assert_eq!(f.free_words(), 0);
        assert_eq!(f.allocate(1, 1), None);
    }

    #[test]
    fn free_merges_both_neighbours() {
        let mut f = FreeList::new(30);
        let a = f.allocate(10, 10).unwrap();
        let b = f.allocate(10, 10).unwrap();
        let c = f.allocate(10, 10).unwrap();
        f.free(a);
        f.free(c);
        assert_eq!(f.extents.len(), 2);
        f.free(b);
        assert_eq!(f.extents, vec![ext(0, 30)]);
        assert_eq!(f.largest(), 30);
    }

    #[test]
    fn take_removes_exactly_the_range() {
        let mut f = FreeList::new(100);
        assert!(f.take(ext(10, 20)));
        assert_eq!(f.extents, vec![ext(0, 10), ext(30, 70)]);
        assert!(!f.take(ext(25, 10)), "partly taken already");
        assert!(!f.take(ext(95, 10)), "past the end");
        assert!(f.take(ext(0, 10)));
        assert!(f.take(ext(90, 10)));
        assert_eq!(f.extents, vec![ext(30, 60)]);
        assert_eq!(f.free_words(), 60);
        f.free(ext(10, 20));
        f.free(ext(0, 10));
        f.free(ext(90, 10));
        assert_eq!(f.extents, vec![ext(0, 100)]);
    }

    #[test]
    fn held_extent_does_not_block_the_rest() {
        // One extent held forever; everything else cycles through the area.
        let mut f = FreeList::new(64);
        let held = f.allocate(4, 4).unwrap();
        for _ in 0..1000 {
            let a = f.allocate(8, 8).unwrap();
            let b = f.allocate(8, 8).unwrap();
            assert!(a.start >= held.end() && b.start >= held.end());
            f.free(b);
            f.free(a);
        }
        assert_eq!(f.free_words(), 60);
        assert_eq!(f.extents, vec![ext(4, 60)]);
    }

    #[test]
    fn allocate_first_takes_what_first_fit_would_or_nothing() {
        let mut f = FreeList::new(100);
        let a = f.allocate(10, 10).unwrap();
        let _b = f.allocate(10, 10).unwrap();
        f.free(a); // free: [0,10) [20,100)
        assert_eq!(f.allocate_first(10, 50), None, "leaves no extent empty");
        assert_eq!(f.allocate_first(12, 50), None, "only the lowest extent");
        assert_eq!(f.allocate_first(4, 0), Some(ext(0, 4)));
        assert_eq!(f.allocate_first(4, 3), None, "starts past the limit");
        assert_eq!(f.allocate_first(4, 4), Some(ext(4, 4)));
        assert_eq!(f.extents, vec![ext(8, 2), ext(20, 80)]);
        assert_eq!(f.free_words(), 82);
    }

    /// Random allocate/free against a word-by-word model.
    #[test]
    fn matches_a_bitmap_model() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            u32::try_from(seed % u64::from(n)).unwrap()
        };
        let words = 512;
        let mut f = FreeList::new(words);
        let mut used = vec![false; words as usize];
        let mut live: Vec<Extent> = Vec::new();
        for _ in 0..20_000 {
            if live.is_empty() || rand(3) > 0 {
                let min = 1 + rand(16);
                let want = min + rand(32);
                // Half the time the common case first: when it takes
                // something, it is what first fit takes.
                let first = if rand(2) == 0 {
                    let limit = rand(words);
                    let before = f.extents.clone();
                    let got = f.allocate_first(want, limit);
                    if got.is_none() {
                        assert_eq!(f.extents, before, "a refusal changes nothing");
                    }
                    got.inspect(|e| {
                        f.free(*e);
                        assert_eq!(f.allocate(min, want), Some(*e), "not first fit");
                        assert!(e.start <= limit && e.len == want);
                    })
                } else {
                    None
                };
                if let Some(e) = first.or_else(|| f.allocate(min, want)) {
                    assert!(e.len >= min && e.len <= want);
                    for w in e.start..e.end() {
                        assert!(!used[w as usize], "allocated a used word");
                        used[w as usize] = true;
                    }
                    live.push(e);
                } else {
                    assert!(f.largest() < min);
                }
            } else {
                let e = live.swap_remove(rand(u32::try_from(live.len()).unwrap()) as usize);
                for w in e.start..e.end() {
                    used[w as usize] = false;
                }
                f.free(e);
            }
            let free = used.iter().filter(|u| !**u).count() as u64;
            assert_eq!(f.free_words(), free);
            assert!(f.extents.windows(2).all(|p| p[0].end() < p[1].start));
        }
    }
}
