//! Creating and dropping channels leaves no descriptor, mapping or file
//! behind, and every descriptor the crate holds is close-on-exec.
mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use capnp_shm::Channel;
use common::{build, check, fd_count, map_count, shm_map_count, Watchdog};

fn is_cloexec(fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
        .unwrap();
    flags & 0o2000000 != 0 // O_CLOEXEC
}

fn open_fds() -> Vec<i32> {
    let dir = std::fs::read_dir("/proc/self/fd").unwrap();
    let fds: Vec<i32> = dir
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    // Drop the descriptor read_dir itself had open.
    fds.into_iter()
        .filter(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok())
        .collect()
}

#[test]
fn a_thousand_channels_leave_nothing_behind() {
    let _w = Watchdog::new(Duration::from_secs(120));
    // One channel first, so lazily created process state (thread-locals,
    // stdio buffers) is not counted as a leak.
    drop(Channel::pair().unwrap());
    let fds = fd_count();
    let maps = map_count();
    let maps_before = std::fs::read_to_string("/proc/self/maps").unwrap();
    let before = open_fds();
    for n in 0..1000u64 {
        let (a, b) = Channel::pair().unwrap();
        a.send(build(&a, n, 1, 100)).unwrap();
        let m = b.recv().unwrap();
        assert_eq!(check(&m), n);
        if n == 0 {
            // Two sockets and two region mappings (ours and the peer's) per
            // end; nothing else stays open.
            assert_eq!(fd_count(), fds + 2);
            assert_eq!(shm_map_count(), 4);
            // Every descriptor the crate holds (the new ones) is close-on-exec.
            let new: Vec<i32> = open_fds()
                .into_iter()
                .filter(|fd| !before.contains(fd))
                .collect();
            assert_eq!(new.len(), 2);
            assert!(new.contains(&a.as_fd_raw()) && new.contains(&b.as_fd_raw()));
            for fd in new {
                assert!(is_cloexec(fd), "fd {fd} is not close-on-exec");
            }
        }
    }
    assert_eq!(fd_count(), fds, "descriptors leaked");
    assert_eq!(
        map_count(),
        maps,
        "mappings leaked:\nbefore:\n{maps_before}\nafter:\n{}",
        std::fs::read_to_string("/proc/self/maps").unwrap()
    );
    assert_eq!(shm_map_count(), 0);
}

trait RawFdOf {
    fn as_fd_raw(&self) -> i32;
}

impl RawFdOf for Channel {
    fn as_fd_raw(&self) -> i32 {
        std::os::fd::AsFd::as_fd(self).as_raw_fd()
    }
}
