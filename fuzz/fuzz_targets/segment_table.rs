//! A hostile descriptor: segment count, inline `(offset, len)`, data-area size
//! and the data area's words (for an out-of-line table) all come from the
//! input. Whatever `SegmentTable::read_into` accepts must lie inside the
//! data area, and it must accept exactly the tables the format allows.
//!
//! The format (from `src/layout.rs`, version 5 on): 1..=512 segments; one
//! segment is the inline `(offset, len)`; more are an out-of-line table at
//! word `offset` of `len == 2 * count` words, two per segment: `start | len
//! << 32`, then its area id. Here only area 0 (the data area) exists, so any
//! other id is refused. Every segment, and the table, lies inside the data
//! area, and the lengths sum to at most the area.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const MAX_SEGMENTS: u32 = 512;

#[derive(Debug)]
struct Input {
    count: u32,
    offset: u32,
    len: u32,
    data_words: u32,
    area: Vec<u64>,
}

impl Input {
    /// Derives an input, biased towards the edges: counts around 1 and 512,
    /// tables whose length matches the count, areas whose words mostly name
    /// valid segments (so the sum check is reached), and areas of any size up
    /// to `u32::MAX` words (so `start + len` overflow in `u32` is tried).
    fn derive(u: &mut Unstructured<'_>) -> Result<Input> {
        let count = match u.int_in_range(0u8..=3)? {
            0 => u.int_in_range(0..=3)?,
            1 => u.int_in_range(MAX_SEGMENTS - 3..=MAX_SEGMENTS + 3)?,
            2 => u.int_in_range(0..=MAX_SEGMENTS + 16)?,
            _ => u.arbitrary()?,
        };
        let data_words = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0..=1024)?,
            1 => u.int_in_range(u32::MAX - 1024..=u32::MAX)?,
            _ => u.arbitrary()?,
        };
        let offset = match u.int_in_range(0u8..=2)? {
            0 => u.int_in_range(0..=64)?,
            1 => data_words.saturating_sub(u.int_in_range(0..=1024)?),
            _ => u.arbitrary()?,
        };
        let len = match u.int_in_range(0u8..=2)? {
            0 => count.saturating_mul(2),
            1 => data_words
                .saturating_sub(offset)
                .saturating_sub(u.int_in_range(0..=16)?),
            _ => u.arbitrary()?,
        };
        // The area's words, from the rest of the input.
        let word_mode = u.int_in_range(0u8..=2)?;
        let mut area = Vec::new();
        while u.len() >= 8 {
            let (a, b): (u32, u32) = (u.arbitrary()?, u.arbitrary()?);
            let (start, seg_len) = match word_mode {
                // Any bit pattern.
                0 => (a, b),
                // Small segments.
                1 => (a & 0xffff, b & 0xffff),
                // A segment inside the area, of any length that fits.
                _ => {
                    let start = a % data_words.saturating_add(1).max(1);
                    let room = data_words - start.min(data_words);
                    (start, b % room.saturating_add(1).max(1))
                }
            };
            area.push(u64::from(start) | u64::from(seg_len) << 32);
            // The entry's area id: mostly 0, the only area there is.
            let id = match u.int_in_range(0u8..=7) {
                Ok(7) => u.arbitrary().unwrap_or(1),
                _ => 0,
            };
            area.push(id);
        }
        Ok(Input {
            count,
            offset,
            len,
            data_words,
            area,
        })
    }

    /// Word `w` of the data area as `read_segment_table` sees it.
    fn word(&self, w: u64) -> Option<u64> {
        (w < u64::from(self.data_words)).then(|| {
            usize::try_from(w)
                .ok()
                .and_then(|w| self.area.get(w).copied())
                .unwrap_or(0)
        })
    }

    /// The segments the format allows for this descriptor, or `None`.
    fn model(&self) -> Option<Vec<(u32, u32)>> {
        let dw = u64::from(self.data_words);
        let inside = |start: u32, len: u32| u64::from(start) + u64::from(len) <= dw;
        if !(1..=MAX_SEGMENTS).contains(&self.count) || !inside(self.offset, self.len) {
            return None;
        }
        let segs: Vec<(u32, u32)> = if self.count == 1 {
            vec![(self.offset, self.len)]
        } else {
            if self.len != self.count * 2 {
                return None;
            }
            (0..u64::from(self.count))
                .map(|i| {
                    let at = u64::from(self.offset) + 2 * i;
                    let (w, id) = (self.word(at)?, self.word(at + 1)?);
                    let (start, len) = ((w & 0xffff_ffff) as u32, (w >> 32) as u32);
                    (id == 0 && inside(start, len)).then_some((start, len))
                })
                .collect::<Option<_>>()?
        };
        let total: u64 = segs.iter().map(|&(_, len)| u64::from(len)).sum();
        (total <= dw).then_some(segs)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::derive(&mut Unstructured::new(data)) else {
        return;
    };
    let got = capnp_shm::fuzzing::read_segment_table(
        input.count,
        input.offset,
        input.len,
        input.data_words,
        &input.area,
    );

    if let Ok(segs) = &got {
        let dw = u64::from(input.data_words);
        assert!(
            (1..=MAX_SEGMENTS).contains(&input.count),
            "accepted count {}",
            input.count
        );
        assert_eq!(segs.len(), input.count as usize, "segments returned");
        for &(start, len) in segs {
            assert!(
                u64::from(start) + u64::from(len) <= dw,
                "accepted segment ({start}, {len}) outside {dw} words"
            );
        }
        let total: u64 = segs.iter().map(|&(_, len)| u64::from(len)).sum();
        assert!(
            total <= dw,
            "accepted {total} words of segments in {dw} words"
        );
    }

    // Exactly the tables the format allows, with the segments it names.
    assert_eq!(
        got.ok(),
        input.model(),
        "validator and model disagree on {input:?}"
    );
});
