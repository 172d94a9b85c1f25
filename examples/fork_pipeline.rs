//! A three-stage pipeline in three processes over two channels:
//! producer → transformer → consumer.
//!
//! ```text
//! cargo run --release --example fork_pipeline
//! ```
//!
//! The parent makes both channel pairs, forks the transformer and the
//! consumer, and produces. Each process drops every end it does not use.
//! The producer sends batches of numbers; the transformer maps each number
//! and forwards the batch; the consumer folds everything into a checksum.
//! The producer's last message carries the checksum it expects (computed
//! with the same map), which the transformer forwards untouched and the
//! consumer compares. Each stage hangs up when done, which the next one sees
//! as `Disconnected`.

#![allow(unsafe_code)] // fork(2), waitpid(2) and _exit(2): the example's only unsafe.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use capnp::primitive_list;
use capnp_shm::{Channel, Error, RecvError};

/// Batches the producer sends.
const BATCHES: u64 = 100_000;
/// Numbers in a batch.
const BATCH_LEN: u32 = 64;
/// The first element of every message: what follows.
const KIND_DATA: u64 = 0;
const KIND_TRAILER: u64 = 1;

/// The transformer's map.
fn transform(x: u64) -> u64 {
    x.wrapping_mul(x).wrapping_add(0x9e37_79b9_7f4a_7c15)
}

/// The consumer's fold: order-sensitive, so a reordered or lost batch shows.
fn fold(checksum: u64, x: u64) -> u64 {
    (checksum ^ x)
        .rotate_left(7)
        .wrapping_mul(0x0000_0100_0000_01b3)
}

/// Forks; the child runs `stage` and exits with its status (101 if it
/// panics) without ever returning here.
fn fork_stage(stage: impl FnOnce() -> i32) -> std::io::Result<libc::pid_t> {
    // SAFETY: the program is single-threaded, so the child may run any Rust
    // code (allocation included); it leaves through _exit below.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let code = std::panic::catch_unwind(AssertUnwindSafe(stage)).unwrap_or(101);
            // SAFETY: ends the child at once, without running the exit
            // handlers or flushing buffers it inherited from the parent.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid),
    }
}

/// Waits for child `pid`; its exit code, or 128 + the signal that ended it.
fn wait_for(pid: libc::pid_t) -> std::io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child and `status` a valid place to write.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

fn producer(output: &Channel) -> Result<(), Error> {
    let mut expected = 0u64;
    for batch in 0..BATCHES {
        let mut message = output.message();
        let mut list = message.initn_root::<primitive_list::Builder<'_, u64>>(BATCH_LEN + 2);
        list.set(0, KIND_DATA);
        list.set(1, batch);
        for i in 0..BATCH_LEN {
            let x = batch * u64::from(BATCH_LEN) + u64::from(i);
            list.set(i + 2, x);
            expected = fold(expected, transform(x));
        }
        output.send(message)?;
    }
    let mut trailer = output.message();
    let mut list = trailer.initn_root::<primitive_list::Builder<'_, u64>>(3);
    list.set(0, KIND_TRAILER);
    list.set(1, BATCHES);
    list.set(2, expected);
    output.send(trailer)?;
    println!("producer:    sent {BATCHES} batches of {BATCH_LEN} numbers and a trailer");
    Ok(())
}

fn transformer(input: &Channel, output: &Channel) -> Result<(), Error> {
    let mut forwarded = 0u64;
    loop {
        let message = match input.recv() {
            Ok(m) => m,
            Err(RecvError::Disconnected) => break,
            Err(e) => return Err(e.into()),
        };
        let list: primitive_list::Reader<'_, u64> =
            message.get_root().map_err(|_| Error::Disconnected)?;
        let mut out = output.message();
        let mut forward = out.initn_root::<primitive_list::Builder<'_, u64>>(list.len());
        let is_data = list.get(0) == KIND_DATA;
        for i in 0..list.len() {
            let x = list.get(i);
            // Data numbers are mapped; the header and the trailer are not.
            forward.set(i, if is_data && i >= 2 { transform(x) } else { x });
        }
        drop(message); // the producer may reuse the space
        output.send(out)?;
        forwarded += 1;
    }
    println!("transformer: forwarded {forwarded} messages, then saw the producer hang up");
    Ok(())
}

/// Returns whether the checksum matched the producer's.
fn consumer(input: &Channel) -> Result<bool, Error> {
    let started = Instant::now();
    let (mut batches, mut numbers, mut checksum) = (0u64, 0u64, 0u64);
    let mut trailer = None;
    loop {
        let message = match input.recv() {
            Ok(m) => m,
            Err(RecvError::Disconnected) => break,
            Err(e) => return Err(e.into()),
        };
        let list: primitive_list::Reader<'_, u64> =
            message.get_root().map_err(|_| Error::Disconnected)?;
        match list.get(0) {
            KIND_DATA => {
                assert_eq!(list.get(1), batches, "a batch out of order");
                for i in 2..list.len() {
                    checksum = fold(checksum, list.get(i));
                    numbers += 1;
                }
                batches += 1;
            }
            KIND_TRAILER => trailer = Some((list.get(1), list.get(2))),
            other => panic!("unknown message kind {other}"),
        }
    }
    let elapsed = started.elapsed();
    let Some((sent, expected)) = trailer else {
        println!("consumer:    the trailer never came");
        return Ok(false);
    };
    let ok = sent == batches && expected == checksum;
    println!(
        "consumer:    received {batches} batches ({numbers} numbers) in {elapsed:.2?} \
         ({:.0} batches/s); checksum {checksum:#018x} {}",
        batches as f64 / elapsed.as_secs_f64(),
        if ok {
            "verified against the producer's"
        } else {
            "DOES NOT MATCH the producer's"
        }
    );
    Ok(ok)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (to_transformer, transformer_in) = Channel::pair()?;
    let (transformer_out, consumer_in) = Channel::pair()?;
    // Each process (the forked stages inside their closures) takes the ends
    // it uses out of this array and drops the rest at once.
    let mut ends = [
        Some(to_transformer),
        Some(transformer_in),
        Some(transformer_out),
        Some(consumer_in),
    ];

    let transformer_pid = fork_stage(|| {
        let [_, input, output, _] = std::mem::take(&mut ends);
        match transformer(&input.expect("input"), &output.expect("output")) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("transformer: {e}");
                1
            }
        }
    })?;
    let consumer_pid = fork_stage(|| {
        let [_, _, _, input] = std::mem::take(&mut ends);
        match consumer(&input.expect("input")) {
            Ok(true) => 0,
            Ok(false) => 2,
            Err(e) => {
                eprintln!("consumer: {e}");
                1
            }
        }
    })?;
    let [output, ..] = std::mem::take(&mut ends);
    let output = output.expect("output");

    let started = Instant::now();
    producer(&output)?;
    drop(output); // the transformer sees Disconnected once it has everything

    let transformer_status = wait_for(transformer_pid)?;
    let consumer_status = wait_for(consumer_pid)?;
    println!(
        "pipeline:    done in {:.2?}; transformer exited {transformer_status}, consumer exited {consumer_status}",
        started.elapsed()
    );
    if transformer_status != 0 || consumer_status != 0 {
        return Err("a stage failed".into());
    }
    Ok(())
}
