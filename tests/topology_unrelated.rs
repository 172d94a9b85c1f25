//! Unrelated processes: a server with a [`Listener`] on a socket file or an
//! abstract name, and a client in a separately forked process that only
//! knows the address. Covers the socket file's life (mode, removal on drop,
//! stale and foreign files) and the peer credentials a server can act on.
//!
//! Readiness between processes goes over a plain socket pair (one byte
//! "ready"), never a sleep: each step waits for the one before it.
#![allow(unsafe_code)] // umask(2) in a forked child, the only unsafe here.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use capnp_shm::{Channel, Listener, ListenerOptions, Options, RecvError, SetupError};
use common::{build, check, fork, Child, Watchdog};

/// Added to a message number by the side that echoes it.
const ECHO: u64 = 1_000_000;

/// A fresh directory under the temporary directory, removed with its
/// contents on drop (in the process that made it: forked children leave
/// with `_exit` and drop nothing they inherited).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "capnp-shm-topo-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Our effective uid, as the owner of a directory we just made.
    fn our_uid(&self) -> u32 {
        std::fs::metadata(&self.0).expect("temp dir").uid()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An abstract socket name no other test (or test run) uses.
fn unique_name(tag: &str) -> Vec<u8> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "capnp-shm-topo-{}-{tag}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// A one-way "ready" signal between two processes.
fn signal(stream: &mut UnixStream) {
    stream.write_all(b"r").expect("signal");
}

fn wait_signal(stream: &mut UnixStream) {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).expect("wait for signal");
}

fn is_addr_in_use(result: std::io::Result<Listener>) -> bool {
    match result {
        Err(e) => e.kind() == std::io::ErrorKind::AddrInUse,
        Ok(l) => panic!("expected AddrInUse, got a listener {l:?}"),
    }
}

/// The (device, inode) of whatever is at `path`.
fn file_id(path: &Path) -> (u64, u64) {
    let meta = std::fs::symlink_metadata(path).expect("file exists");
    (meta.dev(), meta.ino())
}

/// Waits for a forked child and checks it exited with 0.
fn expect_success(child: Child, what: &str) {
    assert_eq!(
        child.wait(),
        0,
        "{what} failed (its panic shows with --nocapture)"
    );
}

/// The client half of a conversation: announces its pid, sends `count`
/// messages and checks each echo, then receives the server's own messages
/// until the server's pid announcement (which comes last), and hangs up.
/// Returns the server pid announced over the channel.
fn client_conversation(channel: &Channel, count: u64) -> u64 {
    channel
        .send(build(channel, u64::from(std::process::id()), 1, 8))
        .expect("send pid");
    for n in 1..=count {
        channel.send(build(channel, n, 2, 100)).expect("send");
        let echo = channel.recv().expect("echo");
        assert_eq!(check(&echo), n + ECHO, "wrong echo");
    }
    for k in 0..5 {
        let own = channel.recv().expect("server's own message");
        assert_eq!(check(&own), 2 * ECHO + k);
    }
    check(&channel.recv().expect("server pid"))
}

/// The server half: takes the client's pid, echoes `count` messages, sends
/// five of its own and its pid, then waits for the client to hang up.
/// Returns the pid the client announced.
fn server_conversation(channel: &Channel, count: u64) -> u64 {
    let client_pid = check(&channel.recv().expect("client pid"));
    for n in 1..=count {
        let got = check(&channel.recv().expect("request"));
        assert_eq!(got, n);
        channel
            .send(build(channel, got + ECHO, 2, 100))
            .expect("echo");
    }
    for k in 0..5 {
        channel
            .send(build(channel, 2 * ECHO + k, 1, 64))
            .expect("own");
    }
    channel
        .send(build(channel, u64::from(std::process::id()), 1, 8))
        .expect("send pid");
    match channel.recv() {
        Err(RecvError::Disconnected) => {}
        other => panic!("expected the client to hang up, got {other:?}"),
    }
    client_pid
}

#[test]
fn a_forked_client_connects_to_a_server_by_path() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let dir = TempDir::new("path");
    let path = dir.join("server.sock");
    let our_uid = dir.our_uid();

    // The server is a forked process of its own; the client, forked from
    // the test after it, knows nothing of it but the path.
    let (mut ready_rx, mut ready_tx) = UnixStream::pair().unwrap();
    let server = fork(|| {
        let listener = Listener::bind(&path).expect("bind");
        assert_eq!(listener.path(), Some(path.as_path()));
        signal(&mut ready_tx);
        let (stream, credentials) = listener.accept_stream().expect("accept");
        let channel = Channel::from_stream(stream).expect("set-up");
        let client_pid = server_conversation(&channel, 20);
        // What the kernel recorded at connect is the client's process.
        assert_eq!(
            i64::from(credentials.pid),
            i64::try_from(client_pid).unwrap()
        );
        assert_eq!(credentials.uid, our_uid);
        assert_eq!(channel.peer_credentials().unwrap(), credentials);
        0 // the listener drops here and removes the socket file
    });
    wait_signal(&mut ready_rx);

    // The file is a socket only this user may connect to.
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let client = fork(|| {
        let channel = Channel::connect(&path).expect("connect");
        let server_pid = client_conversation(&channel, 20);
        let credentials = channel.peer_credentials().unwrap();
        assert_eq!(
            i64::from(credentials.pid),
            i64::try_from(server_pid).unwrap()
        );
        0
    });
    expect_success(client, "client");
    expect_success(server, "server");
    assert!(
        !path.exists(),
        "the socket file outlived the listener that made it"
    );
}

#[test]
fn the_socket_file_mode_is_0600_unless_widened_and_goes_with_the_listener() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("mode");
    // In a child: the umask is process-wide, and this test sets it.
    let child = fork(|| {
        let mode_of = |l: &Listener| {
            std::fs::metadata(l.path().unwrap())
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        // SAFETY: umask(2) only sets this (single-threaded) child's mask.
        unsafe { libc::umask(0o002) };
        let default = Listener::bind(dir.join("default.sock")).unwrap();
        assert_eq!(mode_of(&default), 0o600);
        let group = ListenerOptions::new()
            .mode(0o660)
            .bind(dir.join("group.sock"))
            .unwrap();
        assert_eq!(mode_of(&group), 0o660);
        // The umask still limits the mode asked for.
        // SAFETY: as above.
        unsafe { libc::umask(0o027) };
        let limited = ListenerOptions::new()
            .mode(0o666)
            .bind(dir.join("limited.sock"))
            .unwrap();
        assert_eq!(mode_of(&limited), 0o640);
        for listener in [default, group, limited] {
            let path = listener.path().unwrap().to_path_buf();
            assert!(path.exists());
            drop(listener);
            assert!(!path.exists(), "{} left behind", path.display());
        }
        0
    });
    expect_success(child, "mode checks");
}

/// Checks that `listener` works: a forked client connects and the two
/// exchange one message each way.
fn serves_a_client(listener: &Listener) {
    let path = listener.path().unwrap().to_path_buf();
    let client = fork(|| {
        let channel = Channel::connect(&path).expect("connect");
        channel.send(build(&channel, 7, 1, 32)).unwrap();
        assert_eq!(check(&channel.recv().unwrap()), 7 + ECHO);
        0
    });
    let channel = listener.accept().expect("accept");
    assert_eq!(check(&channel.recv().unwrap()), 7);
    channel.send(build(&channel, 7 + ECHO, 1, 32)).unwrap();
    expect_success(client, "client");
    assert!(matches!(channel.recv(), Err(RecvError::Disconnected)));
}

#[test]
fn a_stale_socket_file_is_refused_by_default_and_replaced_on_request() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("stale");
    let path = dir.join("stale.sock");
    // A listener that went away without removing its file.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    let stale = file_id(&path);

    assert!(is_addr_in_use(Listener::bind(&path)));
    assert_eq!(file_id(&path), stale, "refused, yet the file was touched");

    let listener = ListenerOptions::new()
        .replace_stale(true)
        .bind(&path)
        .expect("replace the stale file");
    // (The new file may reuse the old inode number: the proof that it was
    // replaced is a client reaching this listener.)
    serves_a_client(&listener);
    drop(listener);
    assert!(!path.exists());
}

#[test]
fn the_file_of_a_killed_server_is_stale_and_replaceable() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("killed");
    let path = dir.join("killed.sock");
    let (mut ready_rx, mut ready_tx) = UnixStream::pair().unwrap();
    let server = fork(|| {
        let _listener = Listener::bind(&path).expect("bind");
        signal(&mut ready_tx);
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    wait_signal(&mut ready_rx);
    server.kill();
    assert_eq!(server.wait(), 128 + libc::SIGKILL);
    // SIGKILL ran no destructor: the file stays, with nobody behind it.
    assert!(path.exists());

    assert!(is_addr_in_use(Listener::bind(&path)));
    let listener = ListenerOptions::new()
        .replace_stale(true)
        .bind(&path)
        .expect("replace the killed server's file");
    serves_a_client(&listener);
}

#[test]
fn a_live_servers_file_is_never_replaced() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("live");
    let path = dir.join("live.sock");
    let (mut ready_rx, mut ready_tx) = UnixStream::pair().unwrap();
    let server = fork(|| {
        let listener = Listener::bind(&path).expect("bind");
        signal(&mut ready_tx);
        // `bind` probes with a connection of its own that never says hello:
        // the listener drops it, counts it, and goes on.
        let channel = listener.accept().expect("the listener goes on");
        let (failures, failed_setups) = listener.client_failures();
        assert!(
            failures
                .iter()
                .all(|e| matches!(e, SetupError::Disconnected)),
            "{failures:?}"
        );
        channel
            .send(build(&channel, u64::from(std::process::id()), 1, 8))
            .unwrap();
        channel.send(build(&channel, failed_setups, 1, 8)).unwrap();
        assert!(matches!(channel.recv(), Err(RecvError::Disconnected)));
        0
    });
    wait_signal(&mut ready_rx);
    let live = file_id(&path);

    assert!(is_addr_in_use(Listener::bind(&path)));
    assert!(is_addr_in_use(
        ListenerOptions::new().replace_stale(true).bind(&path)
    ));
    assert_eq!(file_id(&path), live, "a live server's file was replaced");

    // And the server behind it is still the one we reach.
    let channel = Channel::connect(&path).expect("connect to the live server");
    let server_pid = check(&channel.recv().unwrap());
    assert_eq!(server_pid, u64::try_from(server.pid).unwrap());
    let failed_setups = check(&channel.recv().unwrap());
    // Each of the two binds above probes the file once.
    assert!(failed_setups <= 2, "{failed_setups} probe connections");
    drop(channel);
    expect_success(server, "server");
}

#[test]
fn a_file_that_is_not_a_socket_is_never_removed() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("regular");
    let file = dir.join("data.sock");
    std::fs::write(&file, b"precious").unwrap();
    let subdir = dir.join("dir.sock");
    std::fs::create_dir(&subdir).unwrap();

    for path in [&file, &subdir] {
        let id = file_id(path);
        assert!(is_addr_in_use(Listener::bind(path)));
        assert!(is_addr_in_use(
            ListenerOptions::new().replace_stale(true).bind(path)
        ));
        assert_eq!(file_id(path), id, "{} was replaced", path.display());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert!(subdir.is_dir());
}

#[test]
fn abstract_names_connect_unrelated_processes_and_are_freed_on_drop() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let name = unique_name("abstract");
    let listener = Listener::bind_abstract(&name).expect("bind abstract");
    assert_eq!(listener.path(), None);
    // One name, one listener.
    match Listener::bind_abstract(&name) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse),
        other => panic!("a second listener on the same name: {other:?}"),
    }

    let parent_pid = u64::from(std::process::id());
    let client = fork(|| {
        let channel = Channel::connect_abstract(&name).expect("connect");
        assert_eq!(client_conversation(&channel, 20), parent_pid);
        0
    });
    let (stream, credentials) = listener.accept_stream().expect("accept");
    assert_eq!(credentials.pid, client.pid);
    let channel = Channel::from_stream(stream).expect("set-up");
    let client_pid = server_conversation(&channel, 20);
    assert_eq!(client_pid, u64::try_from(client.pid).unwrap());
    expect_success(client, "client");

    // The name is free again once the listener is gone.
    drop(listener);
    match Channel::connect_abstract(&name) {
        Err(SetupError::Connect { to, error }) => {
            assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
            assert!(to.contains("abstract name"), "{to}");
        }
        other => panic!("connected to a dropped listener: {other:?}"),
    }
    drop(Listener::bind_abstract(&name).expect("the name is free again"));
}

#[test]
fn a_server_sees_who_connects_and_can_refuse_a_stranger() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    let dir = TempDir::new("creds");
    let path = dir.join("guarded.sock");
    let our_uid = dir.our_uid();
    let listener = Listener::bind(&path).unwrap();
    // The client's set-up may wait far longer than the watchdog: only the
    // server's refusal can end it in time.
    let patient = Options::new().setup_timeout(Duration::from_secs(600));

    // The stranger: the server drops its connection unanswered.
    let stranger = fork(|| match Channel::connect_with(&path, &patient) {
        Ok(_) => {
            eprintln!("stranger: set up a channel with a server that refused it");
            1
        }
        Err(SetupError::Timeout { .. }) => 2,
        Err(e) => {
            // Dropped before our hello: the server went away, for us.
            assert!(matches!(e, SetupError::Disconnected), "{e:?}");
            0
        }
    });
    let (stream, credentials) = listener.accept_stream().unwrap();
    assert_eq!(credentials.pid, stranger.pid);
    assert_eq!(credentials.uid, our_uid);
    drop(stream); // refused
    expect_success(stranger, "the refused client");

    // A welcome client, on the same listener.
    let friend = fork(|| {
        let channel = Channel::connect_with(&path, &patient).expect("connect");
        let server_pid = client_conversation(&channel, 3);
        assert_eq!(
            i64::from(channel.peer_credentials().unwrap().pid),
            i64::try_from(server_pid).unwrap()
        );
        0
    });
    let (stream, credentials) = listener.accept_stream().unwrap();
    assert_eq!(credentials.pid, friend.pid, "an unexpected client");
    assert_eq!(credentials.uid, our_uid);
    let channel = Channel::from_stream(stream).expect("set-up");
    let client_pid = server_conversation(&channel, 3);
    assert_eq!(client_pid, u64::try_from(friend.pid).unwrap());
    expect_success(friend, "the welcome client");
}

/// A fork-per-connection server: a child that drops its inherited copy of
/// the listener must not remove the socket file the parent still serves.
#[test]
fn a_forked_copy_of_the_listener_leaves_the_file_alone() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = TempDir::new("fork-copy");
    let path = dir.join("s.sock");
    let listener = Listener::bind(&path).unwrap();
    let mut listener = Some(listener);
    let child = fork(|| {
        drop(listener.take()); // the child's copy
        0
    });
    assert_eq!(child.wait(), 0);
    assert!(
        path.exists(),
        "the child's drop removed the parent's socket file"
    );
    drop(listener.take());
    assert!(!path.exists(), "the parent's drop removes it");
}
