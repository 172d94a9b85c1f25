//! Errors that explain: what timed out and after how long, which address a
//! connect tried, a live server told from a stale file, sizes in bytes, a
//! peer that went away told from one that broke the protocol, and which
//! limit a large message ran into.
mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnp_shm::{Channel, Listener, ListenerOptions, Options, SendError, SetupError, TooLargeKind};
use common::{fork, Watchdog};

#[test]
fn a_set_up_timeout_says_how_long_it_waited() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (ours, _silent) = UnixStream::pair().unwrap();
    let options = Options::new().setup_timeout(Duration::from_millis(100));
    match Channel::from_stream_with(ours, &options) {
        Err(e @ SetupError::Timeout { after }) => {
            assert_eq!(after, Duration::from_millis(100));
            let text = e.to_string();
            assert!(
                text.contains("100ms") && text.contains("setup_timeout"),
                "{text}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_peer_that_goes_away_before_its_hello_is_a_disconnect() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (ours, theirs) = UnixStream::pair().unwrap();
    drop(theirs);
    assert!(matches!(
        Channel::from_stream(ours),
        Err(SetupError::Disconnected)
    ));
}

#[test]
fn a_failed_connect_names_the_path() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let path = std::env::temp_dir().join(format!("capnp-shm-nobody-{}.sock", std::process::id()));
    match Channel::connect(&path) {
        Err(e @ SetupError::Connect { .. }) => {
            let SetupError::Connect { to, error } = &e else {
                unreachable!()
            };
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
            assert_eq!(to, &path.display().to_string());
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn bind_tells_a_live_server_from_a_stale_file() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(30));
    let dir = std::env::temp_dir().join(format!("capnp-shm-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("live.sock");
    let _ = std::fs::remove_file(&path);
    let live = Listener::bind(&path).unwrap();
    let e = Listener::bind(&path).unwrap_err();
    assert!(e.to_string().contains("another server is listening"), "{e}");
    // A stale file: a listener whose process is gone leaves it.
    let stale = dir.join("stale.sock");
    let _ = std::fs::remove_file(&stale);
    let child = fork(|| {
        let l = Listener::bind(&stale).unwrap();
        std::mem::forget(l); // exit without removing the file
        0
    });
    assert_eq!(child.wait(), 0);
    let e = Listener::bind(&stale).unwrap_err();
    assert!(e.to_string().contains("stale socket file"), "{e}");
    assert!(e.to_string().contains("replace_stale"), "{e}");
    drop(
        ListenerOptions::new()
            .replace_stale(true)
            .bind(&stale)
            .unwrap(),
    );
    drop(live);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn too_large_speaks_in_bytes() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let options = Options::new()
        .region_size(256 << 10)
        .max_outgoing(256 << 10);
    let (a, _b) = Channel::pair_with(&options).unwrap();
    let mut m = a.message();
    m.set_root::<capnp::data::Owned>(&vec![1u8; 512 << 10][..])
        .unwrap();
    match a.send(m) {
        Err(SendError::TooLarge(_, t)) => {
            assert_eq!(t.kind, TooLargeKind::Words);
            let text = t.to_string();
            assert!(text.contains(&format!("{} bytes", t.needed * 8)), "{text}");
            assert!(text.contains("max_outgoing"), "{text}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    };
}

/// An 80 MiB message: with the default options its reader may read it all;
/// with capnp's limits set explicitly, the error says which limit it hit
/// and where to raise it.
#[test]
fn a_large_message_is_readable_by_default_and_explained_when_limited() {
    let _w = Watchdog::new(Duration::from_secs(60));
    let big = Options::new().region_size(96 << 20);
    let payload = vec![7u8; 80 << 20];
    for limited in [false, true] {
        let receiver = if limited {
            big.clone()
                .reader_options(capnp::message::ReaderOptions::new())
        } else {
            big.clone()
        };
        let (a, b) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn({
            let big = big.clone();
            move || Channel::from_stream_with(a, &big).unwrap()
        });
        let rx = Channel::from_stream_with(b, &receiver).unwrap();
        let tx = sender.join().unwrap();
        let mut m = tx.message();
        m.set_root::<capnp::data::Owned>(&payload[..]).unwrap();
        tx.send(m).unwrap();
        let got = rx.recv().unwrap();
        match got.get_root::<capnp::data::Reader<'_>>() {
            Ok(data) => {
                assert!(!limited, "read past an explicit 64 MiB limit");
                assert_eq!(data.len(), payload.len());
                assert!(data.iter().all(|&b| b == 7));
            }
            Err(e) => {
                assert!(limited, "the default limit refused the message: {e}");
                assert_eq!(e.kind, capnp::ErrorKind::ReadLimitExceeded);
                assert!(e.to_string().contains("reader_options"), "{e}");
            }
        }
    }
}
