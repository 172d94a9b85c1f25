//! A pool of forked workers serving requests, with one parent waiting on
//! all of them at once with [`wait_any`].
//!
//! ```text
//! cargo run --release --example worker_pool
//! ```
//!
//! For N = 1, 2, 4 and 8 workers: the parent forks N workers, each with its
//! own channel pair made before its fork, keeps one request in flight per
//! worker for about 1.5 seconds, and prints the throughput in requests per
//! second. A request asks for a few thousand rounds of a hash function
//! (some microseconds of work) over a seed; the parent checks a sample of
//! the answers by computing them itself. With more workers than cores the
//! throughput stops growing: the machine has only so many.
//!
//! The one-worker figure depends on where the scheduler puts the two
//! processes: on separate cores each side's short spin catches the other's
//! message, but on one core (or on a virtual machine slow to wake an idle
//! CPU) every request costs a sleep and a wake-up. With more workers the
//! parent always has someone to serve and rarely sleeps.

#![allow(unsafe_code)] // fork(2), waitpid(2) and _exit(2): the example's only unsafe.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use capnp::primitive_list;
use capnp_shm::{wait_any, Channel, Error, RecvError};

/// How long each pool size is measured.
const MEASURE: Duration = Duration::from_millis(1500);
/// Hash rounds per request: the work a worker does for each.
const ROUNDS: u64 = 4_000;
/// The parent checks one answer in this many.
const CHECK_EVERY: u64 = 64;

/// The work: `rounds` rounds of splitmix64 from `seed`.
fn work(seed: u64, rounds: u64) -> u64 {
    let mut x = seed;
    for _ in 0..rounds {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x = z ^ (z >> 31);
    }
    x
}

/// Forks; the child runs `body` and exits with its status (101 if it
/// panics) without ever returning here.
fn fork_worker(body: impl FnOnce() -> i32) -> std::io::Result<libc::pid_t> {
    // SAFETY: the program is single-threaded, so the child may run any Rust
    // code (allocation included); it leaves through _exit below.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let code = std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or(101);
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

/// A worker: answers `[seed, rounds]` with `work(seed, rounds)` until the
/// parent hangs up.
fn serve(channel: &Channel) -> Result<(), Error> {
    loop {
        let (seed, rounds) = match channel.recv() {
            Ok(request) => {
                let list: primitive_list::Reader<'_, u64> =
                    request.get_root().map_err(|_| Error::Disconnected)?;
                (list.get(0), list.get(1))
            }
            Err(RecvError::Disconnected) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut reply = channel.message();
        reply
            .initn_root::<primitive_list::Builder<'_, u64>>(2)
            .set(0, work(seed, rounds));
        channel.send(reply)?;
    }
}

fn ask(channel: &Channel, seed: u64) -> Result<(), Error> {
    let mut request = channel.message();
    let mut list = request.initn_root::<primitive_list::Builder<'_, u64>>(2);
    list.set(0, seed);
    list.set(1, ROUNDS);
    Ok(channel.send(request)?)
}

/// Runs a pool of `n` workers for [`MEASURE`]; returns the requests
/// answered and the time it took.
fn measure(n: usize) -> Result<(u64, Duration), Box<dyn std::error::Error>> {
    let mut channels: Vec<Channel> = Vec::with_capacity(n);
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        let (ours, theirs) = Channel::pair()?;
        let (mut ours, mut theirs) = (Some(ours), Some(theirs));
        let pid = fork_worker(|| {
            // Unused copies here: the parent ends of the earlier workers and
            // of this one. Dropping them closes nothing.
            drop(std::mem::take(&mut channels));
            drop(ours.take());
            match serve(&theirs.take().expect("worker end")) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("worker: {e}");
                    1
                }
            }
        })?;
        drop(theirs.take());
        channels.push(ours.take().expect("parent end"));
        pids.push(pid);
    }

    // One request in flight per worker; each seed says which request it is.
    let mut next_seed = 0u64;
    let mut expected: Vec<u64> = Vec::with_capacity(n);
    for channel in &channels {
        ask(channel, next_seed)?;
        expected.push(next_seed);
        next_seed += 1;
    }
    let started = Instant::now();
    let (mut answered, mut in_flight, mut rotate) = (0u64, n, 0usize);
    while in_flight > 0 {
        // Rotate the slice so the first workers do not get all the service.
        rotate = (rotate + 1) % n;
        let order: Vec<&Channel> = channels[rotate..]
            .iter()
            .chain(&channels[..rotate])
            .collect();
        let i = (wait_any(&order, Some(Duration::from_secs(10)))? + rotate) % n;
        let value = {
            let reply = channels[i].try_recv()?;
            let list: primitive_list::Reader<'_, u64> = reply.get_root()?;
            list.get(0)
        };
        let seed = expected[i];
        if seed % CHECK_EVERY == 0 && value != work(seed, ROUNDS) {
            return Err(format!("wrong answer for seed {seed}").into());
        }
        answered += 1;
        if started.elapsed() < MEASURE {
            ask(&channels[i], next_seed)?;
            expected[i] = next_seed;
            next_seed += 1;
        } else {
            in_flight -= 1;
        }
    }
    let elapsed = started.elapsed();

    drop(channels); // every worker sees Disconnected and exits
    for pid in pids {
        let status = wait_for(pid)?;
        if status != 0 {
            return Err(format!("worker {pid} exited with {status}").into());
        }
    }
    Ok((answered, elapsed))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "{cores} cores; each request is {ROUNDS} hash rounds (about {:.1?} here)",
        {
            let t = Instant::now();
            std::hint::black_box(work(std::hint::black_box(1), ROUNDS));
            t.elapsed()
        }
    );
    let mut single = None;
    for n in [1, 2, 4, 8] {
        let (answered, elapsed) = measure(n)?;
        let rate = answered as f64 / elapsed.as_secs_f64();
        let base = *single.get_or_insert(rate);
        println!(
            "{n} worker{}: {answered:>8} requests in {elapsed:.2?}: {rate:>9.0} requests/s ({:.2}x one worker)",
            if n == 1 { " " } else { "s" },
            rate / base
        );
    }
    Ok(())
}
