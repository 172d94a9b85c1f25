//! Helpers shared by the integration tests: forked children, a watchdog,
//! descriptor and mapping counts, and test messages with checksums.
#![allow(dead_code, unsafe_code)]

use std::sync::mpsc;
use std::time::Duration;

use capnp_shm::{MessageBuilder, Sender};

/// Aborts the whole test process if it is still alive after `limit`, so a
/// hang becomes a failure instead of a stuck CI run. Disarmed on drop.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn new(limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("watchdog: test still running after {limit:?}; aborting");
                std::process::abort();
            }
        });
        Watchdog { disarm: Some(tx) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// A forked child process.
pub struct Child {
    pub pid: libc::pid_t,
}

/// Forks; the child runs `f` and exits with its return code (101 if it
/// panics) without running the parent's destructors or test harness.
pub fn fork(f: impl FnOnce() -> i32) -> Child {
    // SAFETY: the child only runs `f`, then _exit; glibc keeps malloc usable after fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit ends the process without unwinding.
        unsafe { libc::_exit(code) };
    }
    Child { pid }
}

impl Child {
    /// Waits for the child; returns its exit code, or 128 + signal.
    pub fn wait(self) -> i32 {
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            assert_eq!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::Interrupted
            );
        }
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        }
    }

    pub fn kill(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Mappings of files in this process (memfds included). Anonymous mappings
/// are left out: malloc grows and trims its arenas as it likes.
pub fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|p| p.starts_with('/'))
        })
        .count()
}

/// Mappings of this process that are memfds or /dev/shm files.
pub fn shm_map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd:capnp-shm") || l.contains("/dev/shm/capnp-shm"))
        .count()
}

/// Files this crate left in /dev/shm.
pub fn shm_files() -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("capnp-shm-"))
                .collect()
        })
        .unwrap_or_default()
}

/// A deterministic byte pattern for message `n`, item `i`.
pub fn pattern(n: u64, i: u32, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(i).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// An item length that makes a [`build`] message of one item too large to
/// be carried in its descriptor (over 112 bytes): read in place, and held
/// by its receiver until dropped.
pub const IN_PLACE: usize = 128;

/// Builds message `n`: a list of `items` data blobs of `len` bytes each,
/// the first 8 bytes of item 0 holding `n`.
pub fn build<S: AsRef<Sender> + ?Sized>(
    sender: &S,
    n: u64,
    items: u32,
    len: usize,
) -> MessageBuilder<'_> {
    let mut message = sender.as_ref().message();
    fill(&mut message, n, items, len);
    message
}

pub fn fill<A: capnp::message::Allocator>(
    message: &mut capnp::message::Builder<A>,
    n: u64,
    items: u32,
    len: usize,
) {
    let mut list = message.initn_root::<capnp::data_list::Builder<'_>>(items + 1);
    list.set(0, &n.to_le_bytes());
    for i in 0..items {
        list.set(i + 1, &pattern(n, i, len));
    }
}

/// Reads a message built by [`build`], checks every byte, returns `n`.
pub fn check(received: &capnp_shm::Received<'_>) -> u64 {
    let list: capnp::data_list::Reader<'_> = received.get_root().expect("root");
    let n = u64::from_le_bytes(list.get(0).expect("n").try_into().expect("8 bytes"));
    for i in 1..list.len() {
        let item = list.get(i).expect("item");
        assert_eq!(
            item,
            &pattern(n, i - 1, item.len())[..],
            "message {n} item {i} corrupted"
        );
    }
    n
}

/// Serialises the tests of one binary that fork or count process-wide
/// resources: a child forked by one test would otherwise inherit another
/// test's sockets and hide that test's hang-up.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// In a forked child: have the kernel kill this process when its parent
/// dies, so a child that loops until killed never outlives a test that
/// crashed. `prctl(2)`, `PR_SET_PDEATHSIG`
pub fn die_with_parent() {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// Limits this process's address space. `setrlimit(2)`, `RLIMIT_AS`
pub fn set_address_space_limit(limit: &libc::rlimit) {
    // SAFETY: `limit` is a valid rlimit for the call.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_AS, limit) };
    assert_eq!(r, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// In a forked child: no file may grow past 0 bytes (`RLIMIT_FSIZE`), and
/// trying fails with `EFBIG` instead of raising `SIGXFSZ`. Every region
/// (memfd or `/dev/shm` file) then fails to be sized: a policy that
/// refuses shared memory. `setrlimit(2)`
pub fn refuse_file_growth() {
    // SAFETY: ignoring SIGXFSZ installs no handler; the over-limit
    // ftruncate then fails with EFBIG instead of killing the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `limit` is a valid rlimit for the call.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) };
    assert_eq!(r, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Items and item length for message `n`: from one small item to many
/// kilobytes, so that messages span one to several segments.
pub fn shape(n: u64) -> (u32, usize) {
    let items = 1 + (n % 7) as u32;
    let len = match n % 10 {
        0..=5 => (n % 64) as usize,
        6..=8 => 200 + (n % 1000) as usize,
        _ => 4000 + (n % 9000) as usize,
    };
    (items, len)
}

/// A socket path of one test's own (under the temporary directory, named
/// by the process and `tag`), removed when dropped.
pub struct SocketPath(pub std::path::PathBuf);

impl SocketPath {
    pub fn new(tag: &str) -> SocketPath {
        let p =
            std::env::temp_dir().join(format!("capnp-shm-test-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        SocketPath(p)
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
