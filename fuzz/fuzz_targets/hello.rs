//! Arbitrary bytes as the peer's hello. Whatever `Hello::decode` accepts must
//! describe a region we can map and lay out, and must be what the bytes say.
//!
//! The layout numbers are written out here on purpose (from `src/layout.rs`),
//! so that a change to the validator that breaks the layout is caught rather
//! than followed.

#![no_main]

use libfuzzer_sys::fuzz_target;

const HELLO_LEN: usize = 64;
const CONTROL_BYTES: u64 = 1024;
const DESCRIPTOR_BYTES: u64 = 16;
const RELEASE_BYTES: u64 = 8;
const PAGE: u64 = 4096;
const MIN_DATA: u64 = 4096;
const MAX_RING: u32 = 1 << 16;
const MAX_REGION: u64 = 1 << 34;

fuzz_target!(|data: &[u8]| {
    let Ok((region_size, ring_capacity, sealed)) = capnp_shm::fuzzing::decode_hello(data) else {
        return;
    };

    // The ring.
    assert!(
        ring_capacity.is_power_of_two() && (1..=MAX_RING).contains(&ring_capacity),
        "accepted ring capacity {ring_capacity}"
    );

    // The region.
    assert!(
        region_size % PAGE == 0 && region_size <= MAX_REGION,
        "accepted region size {region_size}"
    );
    let cap = u64::from(ring_capacity);
    let data_offset =
        (CONTROL_BYTES + cap * DESCRIPTOR_BYTES + cap * RELEASE_BYTES).next_multiple_of(PAGE);
    assert!(
        data_offset + MIN_DATA <= region_size,
        "accepted region size {region_size} with ring capacity {ring_capacity}: \
         data area would start at {data_offset}"
    );
    // Word offsets and lengths in the data area are u32.
    assert!((region_size - data_offset) / 8 <= u64::from(u32::MAX));

    // What was accepted is what the bytes say (shorter input reads as zeros).
    let mut b = [0u8; HELLO_LEN];
    let n = data.len().min(HELLO_LEN);
    b[..n].copy_from_slice(&data[..n]);
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    assert_eq!(&b[0..8], b"CAPNPSHM");
    assert!(u32_at(12) <= 1, "accepted flags {:#x}", u32_at(12));
    assert_eq!(sealed, u32_at(12) == 1);
    assert_eq!(region_size, u64_at(16));
    assert_eq!(ring_capacity, u32_at(24));
    assert!(
        b[28..].iter().all(|&x| x == 0),
        "accepted non-zero reserved bytes"
    );
});
