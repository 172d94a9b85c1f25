//! The fallback region: an unlinked /dev/shm file instead of a memfd.
mod common;

use std::time::Duration;

use capnp_shm::{Backing, Channel, Options, RecvError, Transport};
use common::{build, check, fork, shm_files, Watchdog};

#[test]
fn round_trip_across_fork_over_dev_shm_files() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let options = Options::new().backing(Backing::ShmFile);
    let (parent, child_end) = Channel::pair_with(&options).unwrap();
    assert!(!parent.is_sealed() && !child_end.is_sealed());
    assert!(shm_files().is_empty(), "names must be unlinked at once");
    let (mut parent, mut child_end) = (Some(parent), Some(child_end));
    let child = fork(|| {
        drop(parent.take());
        let c = child_end.take().unwrap();
        loop {
            let n = match c.recv() {
                Ok(m) => check(&m),
                Err(RecvError::Disconnected) => return 0,
                Err(_) => return 1,
            };
            if c.send(build(&c, n + 1, 2, 100)).is_err() {
                return 2;
            }
        }
    });
    drop(child_end);
    let parent = parent.unwrap();
    for n in 0..2000u64 {
        parent.send(build(&parent, n * 2, 2, 50)).unwrap();
        assert_eq!(check(&parent.recv().unwrap()), n * 2 + 1);
    }
    drop(parent);
    assert_eq!(child.wait(), 0);
    assert!(
        shm_files().is_empty(),
        "left files in /dev/shm: {:?}",
        shm_files()
    );
}

#[test]
fn a_sealed_end_maps_an_unsealed_peer_only_if_it_opts_in_and_streams_otherwise() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let unsealed = std::thread::spawn(move || {
        Channel::from_stream_with(a, &Options::new().backing(Backing::ShmFile))
    });
    // Refused: no shared memory between them, but a working channel on the
    // stream transport (the sealed end said "cannot map").
    let sealed = Channel::from_stream_with(b, &Options::new().backing(Backing::Memfd)).unwrap();
    let other = unsealed.join().unwrap().unwrap();
    assert_eq!(sealed.transport(), Transport::Stream);
    assert_eq!(other.transport(), Transport::Stream);
    other.send(build(&other, 7, 1, 10)).unwrap();
    assert_eq!(check(&sealed.recv().unwrap()), 7);
    drop(sealed);
    assert!(matches!(other.recv(), Err(RecvError::Disconnected)));

    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let unsealed = std::thread::spawn(move || {
        Channel::from_stream_with(a, &Options::new().backing(Backing::ShmFile))
    });
    let sealed = Channel::from_stream_with(b, &Options::new().allow_unsealed_peer(true)).unwrap();
    let unsealed = unsealed.join().unwrap().unwrap();
    unsealed.send(build(&unsealed, 5, 1, 10)).unwrap();
    assert_eq!(check(&sealed.recv().unwrap()), 5);
    assert!(shm_files().is_empty());
}
