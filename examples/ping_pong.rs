//! A parent and a forked child exchanging Cap'n Proto messages over a
//! capnp-shm channel: the first thing to run.
//!
//! ```text
//! cargo run --release --example ping_pong
//! ```
//!
//! The parent makes a channel pair, forks, and keeps one end; the child keeps
//! the other and answers every request with the sum of the numbers in it. The
//! parent checks each answer and prints how long a round trip takes.

#![allow(unsafe_code)] // fork(2) and waitpid(2): the example's only unsafe.

use std::time::{Duration, Instant};

use capnp_shm::{Channel, Error, RecvError};

const ROUND_TRIPS: u32 = 100_000;

/// The child: receive a list of numbers, answer with their sum, until the
/// parent hangs up.
fn serve(channel: &Channel) -> Result<(), Error> {
    loop {
        let sum = match channel.recv() {
            Ok(request) => {
                let numbers: capnp::primitive_list::Reader<'_, u64> =
                    request.get_root().map_err(|_| Error::Disconnected)?;
                numbers.iter().sum::<u64>()
            }
            Err(RecvError::Disconnected) => return Ok(()),
            Err(e) => return Err(e.into()),
        }; // the request is dropped here: the parent may reuse its space
        let mut reply = channel.message();
        reply
            .initn_root::<capnp::primitive_list::Builder<'_, u64>>(1)
            .set(0, sum);
        channel.send(reply)?;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (parent_end, child_end) = Channel::pair()?;
    let (mut parent_end, mut child_end) = (Some(parent_end), Some(child_end));

    // SAFETY: the child runs only `serve` and then _exit; it touches no lock
    // another thread could hold (this program has no other threads).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        drop(parent_end.take()); // the child uses only its own end
        let code = match serve(&child_end.take().expect("child end")) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("child: {e}");
                1
            }
        };
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(child_end.take());
    let channel = parent_end.take().expect("parent end");

    let mut worst = Duration::ZERO;
    let started = Instant::now();
    for i in 0..ROUND_TRIPS {
        let t = Instant::now();
        let mut request = channel.message();
        let mut numbers = request.initn_root::<capnp::primitive_list::Builder<'_, u64>>(8);
        for k in 0..8 {
            numbers.set(k, u64::from(i) + u64::from(k));
        }
        // A send error holds the unsent builder, which borrows the
        // channel; `into_error` drops it, for `?` into a Box<dyn Error>.
        channel.send(request).map_err(|e| e.into_error())?;
        let reply = channel.recv()?;
        let sum = reply
            .get_root::<capnp::primitive_list::Reader<'_, u64>>()?
            .get(0);
        assert_eq!(sum, 8 * u64::from(i) + 28, "wrong answer");
        worst = worst.max(t.elapsed());
    }
    let elapsed = started.elapsed();
    drop(channel); // the child sees Disconnected and exits

    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    println!(
        "{ROUND_TRIPS} round trips between two processes in {elapsed:.2?}: \
         {:.2} µs each on average, worst {worst:.2?}; child exited with status {}",
        elapsed.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS),
        libc::WEXITSTATUS(status),
    );
    Ok(())
}
