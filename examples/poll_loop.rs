//! One `poll(2)` loop that waits on a channel, stdin and a timer at once:
//! the readiness protocol (`arm`, poll the channel's descriptor, `disarm`,
//! drain) for event loops of your own.
//!
//! ```text
//! cargo run --example poll_loop            # type lines on stdin meanwhile
//! ```
//!
//! A forked child sends a message every 100 ms for a second and then hangs
//! up; a timerfd ticks every 250 ms; lines typed on stdin are echoed. The
//! loop never spins: when nothing is there it sleeps in `poll`.

#![allow(unsafe_code)] // fork(2), poll(2), timerfd(2), read(2): the example's own system calls.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use capnp_shm::{Channel, Readiness, TryRecvError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (parent_end, child_end) = Channel::pair()?;
    let (mut parent_end, mut child_end) = (Some(parent_end), Some(child_end));
    // SAFETY: the child only sends on its end and exits; no other threads.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        drop(parent_end.take());
        let ch = child_end.take().expect("child end");
        for n in 0..10u64 {
            std::thread::sleep(Duration::from_millis(100));
            let mut m = ch.message();
            m.set_root::<capnp::primitive_list::Owned<u64>>(&[n][..])
                .expect("a root");
            if ch.send(m).is_err() {
                break;
            }
        }
        drop(ch); // the parent sees the close
                  // SAFETY: ends the child without the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    drop(child_end.take());
    let ch = parent_end.take().expect("parent end");

    let timer = timerfd(Duration::from_millis(250))?;
    let started = Instant::now();
    let mut stdin_open = true;
    let mut received = 0;
    let (mut ticks, mut wakes) = (0, 0);
    'serve: loop {
        // 1. Take everything that is there.
        loop {
            match ch.try_recv() {
                Ok(m) => {
                    let n = m
                        .get_root::<capnp::primitive_list::Reader<'_, u64>>()?
                        .get(0);
                    println!("{:>6.3}s  message {n}", started.elapsed().as_secs_f64());
                    received += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break 'serve,
                Err(e) => return Err(e.into()),
            }
        }
        // 2. Arm; if something came meanwhile, go round again.
        if ch.receiver().arm()? == Readiness::Ready {
            continue;
        }
        // 3. Wait for the channel, the timer and stdin together.
        let mut fds = vec![pollfd(ch.as_fd().as_raw_fd()), pollfd(timer.as_raw_fd())];
        if stdin_open {
            fds.push(pollfd(0));
        }
        // SAFETY: `fds` holds valid pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        ch.receiver().disarm();
        if n < 0 {
            continue; // a signal: go round
        }
        wakes += 1;
        if fds[1].revents & libc::POLLIN != 0 {
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into `expirations`.
            unsafe { libc::read(timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            ticks += 1;
            println!("{:>6.3}s  tick", started.elapsed().as_secs_f64());
        }
        if stdin_open && fds[2].revents != 0 {
            let mut line = [0u8; 256];
            // SAFETY: reads at most 256 bytes into `line`.
            let got = unsafe { libc::read(0, line.as_mut_ptr().cast(), line.len()) };
            if got <= 0 {
                stdin_open = false; // end of input (or /dev/null): stop watching it
            } else {
                let text = String::from_utf8_lossy(&line[..got.unsigned_abs()]);
                println!(
                    "{:>6.3}s  stdin: {}",
                    started.elapsed().as_secs_f64(),
                    text.trim_end()
                );
            }
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    println!(
        "{received} messages, {ticks} ticks, {wakes} wake-ups from poll in {:.2?}; the peer hung up",
        started.elapsed()
    );
    Ok(())
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// A timerfd that expires every `period`.
fn timerfd(period: Duration) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain flags; the result is a new descriptor or -1.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: i64::from(period.subsec_nanos()),
    };
    let spec = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `spec` is valid; no old value wanted.
    if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}
