//! The fallback region: an unlinked /dev/shm file instead of a memfd.
mod common;

use std::time::Duration;

use capnp_shm::{Backing, Channel, Options, ProtocolError, RecvError, SetupError};
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
fn a_sealed_end_refuses_an_unsealed_peer_unless_it_opts_in() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let unsealed = std::thread::spawn(move || {
        Channel::from_stream_with(a, &Options::new().backing(Backing::ShmFile))
    });
    let err = Channel::from_stream_with(b, &Options::new().backing(Backing::Memfd)).unwrap_err();
    assert!(
        matches!(err, SetupError::Protocol(ProtocolError::UnsealedRegion)),
        "{err:?}"
    );
    // The unsealed end accepted our sealed region, then sees us gone.
    let other = unsealed.join().unwrap().unwrap();
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
