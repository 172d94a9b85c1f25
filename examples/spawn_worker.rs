//! A parent that starts a worker *program* (not a `fork`): the worker is this
//! same executable, run again with `--worker`, and receives its end of the
//! channel across `exec`.
//!
//! ```text
//! cargo run --release --example spawn_worker
//! ```
//!
//! The parent prepares the command with [`Channel::for_command`], spawns it
//! and connects with [`PendingChild::connect`](capnp_shm::PendingChild::connect);
//! the worker finds its end with [`Channel::from_env`]. Each request is a
//! range of numbers; the worker counts the primes in it and answers with the
//! count and the largest one. The parent prints the results (checking the
//! well-known ones), hangs up, and waits for the worker to exit.

use std::process::Command;
use std::time::Instant;

use capnp_shm::{Channel, Error, RecvError};

/// The ranges asked for, with the number of primes in each where it is
/// well known (π(10ⁿ)).
const RANGES: [(u64, u64, Option<u64>); 9] = [
    (0, 10, Some(4)),
    (0, 100, Some(25)),
    (0, 1_000, Some(168)),
    (0, 10_000, Some(1_229)),
    (0, 100_000, Some(9_592)),
    (0, 1_000_000, Some(78_498)),
    (1_000_000, 1_001_000, None),
    (1_000_000_000, 1_000_001_000, None),
    (1_000_000_000_000, 1_000_000_001_000, None),
];

fn is_prime(n: u64) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    // 6k ± 1 up to √n; `d <= n / d` avoids overflowing d * d near u64::MAX.
    let mut d = 5u64;
    while d <= n / d {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// The worker: answers `[lo, hi)` with `[count, largest]` (largest 0 when
/// there is none) until the parent hangs up.
fn worker() -> Result<(), Error> {
    let channel = Channel::from_env()?;
    eprintln!("worker {}: connected", std::process::id());
    let mut served = 0u64;
    loop {
        let (lo, hi) = match channel.recv() {
            Ok(request) => {
                let range: capnp::primitive_list::Reader<'_, u64> =
                    request.get_root().map_err(|_| Error::Disconnected)?;
                if range.len() != 2 {
                    eprintln!("worker: malformed request");
                    return Err(Error::Disconnected);
                }
                (range.get(0), range.get(1))
            }
            Err(RecvError::Disconnected) => break,
            Err(e) => return Err(e.into()),
        }; // the request is released here
        let (count, largest) = (lo..hi)
            .filter(|&n| is_prime(n))
            .fold((0u64, 0u64), |(c, _), p| (c + 1, p));
        let mut reply = channel.message();
        let mut answer = reply.initn_root::<capnp::primitive_list::Builder<'_, u64>>(2);
        answer.set(0, count);
        answer.set(1, largest);
        channel.send(reply)?;
        served += 1;
    }
    eprintln!(
        "worker {}: parent hung up after {served} requests",
        std::process::id()
    );
    Ok(())
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("--worker");
    let pending = Channel::for_command(&mut command)?;
    let mut child = command.spawn()?;
    let channel = pending.connect()?;
    println!(
        "parent {}: worker {} spawned and connected",
        std::process::id(),
        child.id()
    );

    for (lo, hi, known) in RANGES {
        let started = Instant::now();
        let mut request = channel.message();
        let mut range = request.initn_root::<capnp::primitive_list::Builder<'_, u64>>(2);
        range.set(0, lo);
        range.set(1, hi);
        let reply = channel.request(request)?;
        let answer: capnp::primitive_list::Reader<'_, u64> = reply.get_root()?;
        let (count, largest) = (answer.get(0), answer.get(1));
        if let Some(expected) = known {
            assert_eq!(count, expected, "wrong count for [{lo}, {hi})");
        }
        println!(
            "primes in [{lo}, {hi}): {count:>6}, largest {largest} ({:.2?}){}",
            started.elapsed(),
            if known.is_some() { ", as expected" } else { "" }
        );
    }

    drop(channel); // the worker sees Disconnected and exits
    let status = child.wait()?;
    println!("worker exited: {status}");
    if !status.success() {
        return Err("the worker failed".into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("--worker") {
        worker()?;
        return Ok(());
    }
    parent()
}
