//! Forked processes, both ways of setting up: a [`Channel::pair`] made
//! before `fork` (each process drops the end it does not use), and a plain
//! `UnixStream::pair` made before `fork` with [`Channel::from_stream`] after
//! it, in each process. Each way: messages both ways, then a clean close
//! from either side, which the other sees as [`Error::Disconnected`] after
//! every message sent before it.
//!
//! A `Disconnected` could also come from the hang-up poll that catches dead
//! peers. To show the close is announced (through shared memory), the
//! `*_announced_not_inferred` tests keep a copy of the closer's socket open
//! in the other process, so that no hang-up ever shows.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp_shm::{Channel, RecvError, SendError};
use common::{build, check, fork, Watchdog};

/// Added to a message number by the side that echoes it.
const ECHO: u64 = 1_000_000;
/// Messages each way in the exchange.
const MESSAGES: u64 = 100;
/// Messages the closing side sends just before it closes.
const LAST_WORDS: u64 = 5;

/// Which side closes first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Closer {
    Parent,
    Child,
}

/// The conversation, the same in both processes except for who starts: the
/// parent sends and checks echoes, then the child does. Then `closer` sends
/// its last words and drops its end; the other receives them, then
/// `Disconnected`, and a send fails with `Disconnected` too.
fn converse(channel: Channel, is_parent: bool, closer: Closer) {
    let echo_one = |channel: &Channel| {
        let n = check(&channel.recv().expect("recv"));
        channel
            .send(build(channel, n + ECHO, 2, 128))
            .expect("echo");
    };
    let ask_one = |channel: &Channel, n: u64| {
        channel.send(build(channel, n, 1, 300)).expect("send");
        assert_eq!(check(&channel.recv().expect("echo")), n + ECHO);
    };
    for n in 0..MESSAGES {
        if is_parent {
            ask_one(&channel, n);
        } else {
            echo_one(&channel);
        }
    }
    for n in 0..MESSAGES {
        if is_parent {
            echo_one(&channel);
        } else {
            ask_one(&channel, n);
        }
    }
    let closes = (closer == Closer::Parent) == is_parent;
    if closes {
        for n in 0..LAST_WORDS {
            channel
                .send(build(&channel, 5000 + n, 1, 16))
                .expect("last words");
        }
        drop(channel);
    } else {
        for n in 0..LAST_WORDS {
            assert_eq!(check(&channel.recv().expect("last words")), 5000 + n);
        }
        match channel.recv() {
            Err(RecvError::Disconnected) => {}
            other => panic!("expected Disconnected after the last words, got {other:?}"),
        }
        match channel.send(build(&channel, 0, 1, 8)) {
            Err(SendError::Disconnected(_)) => {}
            other => panic!("sent to a closed peer: {other:?}"),
        }
    }
}

/// What the process that does not close does with its inherited copy of
/// the closer's end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Leftover {
    /// Drops it at once, as recommended.
    Drop,
    /// Keeps it open until the end: the closer's socket then never hangs
    /// up, so `Disconnected` can only come from the close announcement.
    Hold,
}

/// Way (a): `Channel::pair` before `fork`.
fn pair_before_fork(closer: Closer, leftover: Leftover) {
    let (parent_end, child_end) = Channel::pair().unwrap();
    let (mut parent_end, mut child_end) = (Some(parent_end), Some(child_end));
    let child = fork(|| {
        // Unused here: dropping it closes nothing.
        let held = parent_end
            .take()
            .filter(|_| leftover == Leftover::Hold && closer == Closer::Parent);
        converse(child_end.take().unwrap(), false, closer);
        drop(held);
        0
    });
    let held = child_end
        .take()
        .filter(|_| leftover == Leftover::Hold && closer == Closer::Child);
    converse(parent_end.take().unwrap(), true, closer);
    drop(held);
    assert_eq!(
        child.wait(),
        0,
        "child failed (its panic shows with --nocapture)"
    );
}

/// Way (b): a plain socket pair before `fork`, the channel set up after it.
fn stream_before_fork(closer: Closer, leftover: Leftover) {
    let (parent_stream, child_stream) = UnixStream::pair().unwrap();
    let (mut parent_stream, mut child_stream) = (Some(parent_stream), Some(child_stream));
    let child = fork(|| {
        let held = parent_stream
            .take()
            .filter(|_| leftover == Leftover::Hold && closer == Closer::Parent);
        let channel =
            Channel::from_stream(child_stream.take().unwrap()).expect("set-up in the child");
        converse(channel, false, closer);
        drop(held);
        0
    });
    let held = child_stream
        .take()
        .filter(|_| leftover == Leftover::Hold && closer == Closer::Child);
    let channel =
        Channel::from_stream(parent_stream.take().unwrap()).expect("set-up in the parent");
    converse(channel, true, closer);
    drop(held);
    assert_eq!(
        child.wait(),
        0,
        "child failed (its panic shows with --nocapture)"
    );
}

#[test]
fn pair_before_fork_parent_closes() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    pair_before_fork(Closer::Parent, Leftover::Drop);
}

#[test]
fn pair_before_fork_child_closes() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    pair_before_fork(Closer::Child, Leftover::Drop);
}

#[test]
fn stream_before_fork_parent_closes() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    stream_before_fork(Closer::Parent, Leftover::Drop);
}

#[test]
fn stream_before_fork_child_closes() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    stream_before_fork(Closer::Child, Leftover::Drop);
}

#[test]
fn pair_before_fork_close_is_announced_not_inferred() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    pair_before_fork(Closer::Parent, Leftover::Hold);
    pair_before_fork(Closer::Child, Leftover::Hold);
}

#[test]
fn stream_before_fork_close_is_announced_not_inferred() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    stream_before_fork(Closer::Parent, Leftover::Hold);
    stream_before_fork(Closer::Child, Leftover::Hold);
}
