//! A channel split into its sending and receiving halves, each on its own
//! thread, while the other end echoes on a third.
mod common;

use std::time::Duration;

use capnp_shm::{Channel, Options, RecvError, Sender};
use common::{build, check, Watchdog};

const MESSAGES: u64 = 100_000;
/// Added to a message number by the echoing end.
const ECHO: u64 = 1 << 40;

#[test]
fn split_halves_work_from_two_threads() {
    let _w = Watchdog::new(Duration::from_secs(240));
    // A small ring, so both halves keep meeting backpressure and sleeping.
    let options = Options::new().ring_capacity(16).region_size(1 << 20);
    let (a, b) = Channel::pair_with(&options).unwrap();
    let (tx, rx) = a.split();

    let echo = std::thread::spawn(move || {
        let mut echoed = 0u64;
        loop {
            let n = match b.recv() {
                Ok(m) => check(&m),
                Err(RecvError::Disconnected) => return echoed,
                Err(e) => panic!("echo: {e}"),
            };
            b.send(build(&b, n + ECHO, 1, (n % 200) as usize)).unwrap();
            echoed += 1;
        }
    });
    let sender = std::thread::spawn(move || {
        for n in 0..MESSAGES {
            tx.send(build(&tx, n, 1 + (n % 3) as u32, (n % 300) as usize))
                .unwrap();
        }
        tx
    });
    let receiver = std::thread::spawn(move || {
        for n in 0..MESSAGES {
            let m = rx.recv().unwrap();
            assert_eq!(check(&m), n + ECHO, "lost, duplicated or reordered");
        }
        rx
    });
    let rx = receiver.join().unwrap();
    let tx: Sender = sender.join().unwrap();
    // The end closes when both halves are gone: the echo sees it.
    drop(tx);
    drop(rx);
    assert_eq!(echo.join().unwrap(), MESSAGES);
}
