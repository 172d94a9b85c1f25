//! A short soak: thousands of messages of random size (0 to 256 KiB) and
//! segment count from a forked child, every byte checked, the parent holding
//! a random few for a while and releasing them in random order; then no
//! descriptor, file mapping or resident memory may have leaked.
//!
//! The engine is `examples/soak.rs`, included here as a module, so this test
//! and the long run (`cargo run --release --example soak`) make the same
//! checks; see that file for what travels and how it is checked.
mod common;

#[allow(dead_code)] // the example's `main` and argument parsing
#[path = "../examples/soak.rs"]
mod soak;

use std::time::Duration;

use common::Watchdog;

/// Enough messages for every size class and hold pattern to come up many
/// times, few enough for a debug build in seconds.
const MESSAGES: u64 = 25_000;

#[test]
fn nothing_is_lost_duplicated_reordered_corrupted_or_leaked() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(180));
    let config = soak::Config {
        messages: MESSAGES,
        warmup: MESSAGES / 10,
        progress: None,
        ..soak::Config::default()
    };
    assert_eq!(config.max_held, 8);
    assert_eq!(config.region_size, 16 << 20);
    assert_eq!(config.max_payload, 256 << 10);

    let summary = soak::run(&config).unwrap_or_else(|e| panic!("soak failed: {e}"));

    assert_eq!(summary.messages, MESSAGES);
    // The run covered what it is meant to: multi-segment messages, messages
    // held and released out of order, up to the bound.
    assert!(
        summary.multi_segment > MESSAGES / 10,
        "only {} multi-segment messages",
        summary.multi_segment
    );
    assert!(
        summary.max_segments >= 4,
        "at most {} segments",
        summary.max_segments
    );
    assert!(summary.held > MESSAGES / 20, "only {} held", summary.held);
    assert!(
        summary.out_of_order_releases > 0,
        "never released out of order"
    );
    assert_eq!(summary.held_peak, config.max_held);
    // `run` already failed on any change; the figures say so once more.
    assert_eq!(summary.fds.0, summary.fds.1, "descriptors leaked");
    assert_eq!(summary.maps.0, summary.maps.1, "file mappings leaked");
    assert!(
        summary.rss.1.saturating_sub(summary.rss.0) < config.rss_growth_limit,
        "resident memory grew from {} to {} bytes",
        summary.rss.0,
        summary.rss.1
    );
}
