//! A listener serves every client at once: a silent or slow client stalls
//! nobody, a failed client is counted and never an error of the listener,
//! `accept_timeout` bounds the wait, and `try_accept` serves a poll loop.
#![allow(unsafe_code)] // poll(2) in the event-loop test
mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp_shm::{AcceptError, Channel, Listener, Options, ProtocolError, SetupError};
use common::{build, check, fork, SocketPath, Watchdog};

/// A client that connects and says nothing holds up nobody: with set-up
/// timeouts far beyond the watchdog, only a listener that serves clients
/// at once lets the second client through in time.
#[test]
fn a_silent_client_does_not_stall_the_next() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let path = SocketPath::new("silent");
    let patient = Options::new().setup_timeout(Duration::from_secs(600));
    let listener = Listener::bind(&path.0).unwrap();
    // First in the queue, and silent.
    let silent = UnixStream::connect(&path.0).unwrap();
    let client = fork(|| {
        let channel = Channel::connect_with(&path.0, &patient).expect("connect");
        channel.send(build(&channel, 7, 1, 8)).unwrap();
        0
    });
    let channel = listener.accept_with(&patient).unwrap();
    assert_eq!(check(&channel.recv().unwrap()), 7);
    assert_eq!(client.wait(), 0);
    assert!(
        format!("{listener:?}").contains("greeting: 1"),
        "{listener:?}"
    );
    drop(silent);
}

/// Clients that fail their set-up (one that hangs up, one that sends a
/// bad hello) are dropped and counted; the listener goes on serving.
#[test]
fn failed_clients_are_counted_not_fatal() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let path = SocketPath::new("failures");
    let listener = Listener::bind(&path.0).unwrap();
    drop(UnixStream::connect(&path.0).unwrap()); // hangs up at once
    let mut garbage = UnixStream::connect(&path.0).unwrap();
    garbage.write_all(&[0x55; 64]).unwrap();
    let client = fork(|| {
        let channel = Channel::connect(&path.0).expect("connect");
        channel.send(build(&channel, 3, 1, 8)).unwrap();
        0
    });
    let channel = listener.accept().unwrap();
    assert_eq!(check(&channel.recv().unwrap()), 3);
    assert_eq!(client.wait(), 0);
    // The good client may have been served before the others were looked
    // at: keep the listener serving until both failures are in.
    let mut failures = Vec::new();
    let mut failed = 0;
    while failed < 2 {
        assert!(matches!(
            listener.accept_timeout(Duration::from_millis(10)),
            Err(AcceptError::Timeout)
        ));
        let (more, total) = listener.client_failures();
        failures.extend(more);
        failed = total;
    }
    assert_eq!(failed, 2, "{failures:?}");
    assert!(failures
        .iter()
        .any(|e| matches!(e, SetupError::Disconnected)));
    assert!(failures
        .iter()
        .any(|e| matches!(e, SetupError::Protocol(ProtocolError::BadMagic))));
    assert!(listener.client_failures().0.is_empty(), "taken out");
}

#[test]
fn accept_timeout_and_try_accept_without_clients() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let path = SocketPath::new("nobody");
    let listener = Listener::bind(&path.0).unwrap();
    assert!(matches!(
        listener.accept_timeout(Duration::from_millis(20)),
        Err(AcceptError::Timeout)
    ));
    assert!(matches!(
        listener.try_accept(),
        Err(AcceptError::WouldBlock)
    ));
}

/// An event loop polls the listener's descriptor together with another
/// (here a pipe that never becomes readable), and calls `try_accept` when
/// it is readable: the client's channel arrives that way.
#[test]
fn a_poll_loop_serves_clients_through_try_accept() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let path = SocketPath::new("poll");
    let listener = Listener::bind(&path.0).unwrap();
    let (quiet, _keep) = UnixStream::pair().unwrap();
    let client = fork(|| {
        let channel = Channel::connect(&path.0).expect("connect");
        channel.send(build(&channel, 11, 1, 8)).unwrap();
        // Wait until the server has read it: the server closes its end.
        let _ = channel.recv();
        0
    });
    let channel = loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: quiet.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 10_000) };
        assert!(n > 0, "the listener's descriptor never became readable");
        assert_eq!(fds[1].revents, 0);
        match listener.try_accept() {
            Ok(channel) => break channel,
            Err(AcceptError::WouldBlock) => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(check(&channel.recv().unwrap()), 11);
    drop(channel);
    assert_eq!(client.wait(), 0);
}
