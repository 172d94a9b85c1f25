//! Small messages travel in their descriptors: a message of one segment of
//! at most 112 bytes is copied into its descriptor entry at send and out of
//! it as it is taken. It holds nothing of the sender's space and needs no
//! release; anything larger is read in place and held until dropped.
#![allow(unsafe_code)] // a seccomp filter (prctl(2)) and futex_waitv(2) in a forked child
mod common;

use std::thread;
use std::time::Duration;

use capnp_shm::{Channel, Options};
use common::{build, check, fork, Watchdog, IN_PLACE};

/// A data blob of `len` bytes, each its own.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + len).to_le_bytes()[0]).collect()
}

#[test]
fn a_message_of_up_to_112_bytes_is_carried_and_a_larger_one_read_in_place() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    // A blob as the root: one word of root pointer, then the bytes in whole
    // words. 104 bytes make 14 words (112 bytes), the most an entry holds.
    for (len, carried) in [
        (0, true),
        (8, true),
        (104, true),
        (105, false),
        (4096, false),
    ] {
        let mut m = a.message();
        m.set_root::<capnp::data::Owned>(&payload(len)[..]).unwrap();
        a.send(m).unwrap();
        let got = b.recv().unwrap();
        assert_eq!(got.is_copied(), carried, "{len} bytes");
        assert_eq!(got.len_bytes(), 8 + len.next_multiple_of(8), "{len} bytes");
        let data: capnp::data::Reader<'_> = got.get_root().unwrap();
        assert_eq!(data, &payload(len)[..]);
        let held = a.sender().stats().held_by_peer;
        assert_eq!(held, u32::from(!carried), "{len} bytes");
    }
}

#[test]
fn every_length_an_entry_carries_arrives_word_for_word() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    // Each length from 1 to 14 words is its own run of stores at send, and
    // the take copies all 14 of the entry's words: longest first, so that
    // every shorter message lands on words a longer one left, and then
    // shortest first.
    let lens: Vec<usize> = (0..=104).rev().chain(0..=104).collect();
    for len in lens {
        let mut m = a.message();
        m.set_root::<capnp::data::Owned>(&payload(len)[..]).unwrap();
        let sent = m.get_segments_for_output()[0].to_vec();
        a.send(m).unwrap();
        let got = b.recv().unwrap();
        assert!(got.is_copied(), "{len} bytes");
        let segments: Vec<&[u8]> = got.segments().collect();
        assert_eq!(segments, [&sent[..]], "{len} bytes");
        let data: capnp::data::Reader<'_> = got.get_root().unwrap();
        assert_eq!(data, &payload(len)[..]);
    }
}

#[test]
fn carried_messages_held_by_the_receiver_hold_nothing_of_the_sender() {
    let _w = Watchdog::new(Duration::from_secs(30));
    // The receiver may hold two messages read in place; it holds 50 carried
    // ones, and the sender never waits for a release.
    let options = Options::new().max_held(2).ring_capacity(4);
    let (a, b) = Channel::pair_with(&options).unwrap();
    let held: Vec<_> = (0..50)
        .map(|n| {
            a.try_send(build(&a, n, 1, 8))
                .expect("room: nothing is held");
            b.try_recv().unwrap()
        })
        .collect();
    for (n, m) in (0..).zip(&held) {
        assert!(m.is_copied());
        assert_eq!(check(m), n);
    }
    assert_eq!(a.sender().stats().held_by_peer, 0);
    assert_eq!(b.stats().recv.held, 0);
    // A message read in place still counts against the limit.
    a.try_send(build(&a, 50, 1, IN_PLACE)).unwrap();
    a.try_send(build(&a, 51, 1, IN_PLACE)).unwrap();
    let in_place: Vec<_> = (0..2).map(|_| b.try_recv().unwrap()).collect();
    assert!(in_place.iter().all(|m| !m.is_copied()));
    assert_eq!(b.stats().recv.held, 2);
    assert!(a.try_send(build(&a, 52, 1, IN_PLACE)).is_err(), "full");
    // ... while a carried one still goes through.
    a.try_send(build(&a, 53, 1, 8)).unwrap();
    assert_eq!(check(&b.try_recv().unwrap()), 53);
    drop(held);
}

#[test]
fn a_sender_asleep_on_a_full_ring_of_carried_messages_is_woken_by_the_take() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // A ring of one, and no spin: the sender sleeps for every message after
    // the first. No release follows a carried message, so only the
    // receiver's take can wake it (else it waits out its slice).
    const N: u64 = 20;
    let options = Options::new().ring_capacity(1).spin(Duration::ZERO);
    let (a, b) = Channel::pair_with(&options).unwrap();
    let (tx, _a_rx) = a.split();
    let (_b_tx, rx) = b.split();
    let receiver = thread::spawn(move || {
        for n in 0..N {
            // Let the sender find the ring full and fall asleep.
            thread::sleep(Duration::from_millis(2));
            let m = rx.recv().unwrap();
            assert!(m.is_copied());
            assert_eq!(check(&m), n);
        }
        rx.stats().wakes
    });
    for n in 0..N {
        tx.send(build(&tx, n, 1, 8)).unwrap();
    }
    let wakes = receiver.join().unwrap();
    assert!(tx.stats().sleeps > 0, "the sender slept");
    assert!(wakes > 0, "the takes woke the sleeping sender");
}

#[test]
fn a_copy_from_a_heap_builder_is_carried_too() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let mut kept = capnp::message::Builder::new_default();
    kept.set_root(capnp::text::Reader::from("kept")).unwrap();
    for _ in 0..3 {
        a.sender().send_copy(&kept).unwrap();
        let got = b.recv().unwrap();
        assert!(got.is_copied());
        let text: capnp::text::Reader<'_> = got.get_root().unwrap();
        assert_eq!(text.to_str().unwrap(), "kept");
    }
    assert_eq!(a.sender().stats().held_by_peer, 0);
}

#[test]
fn a_carried_message_outlives_its_receiver_as_an_owned_message() {
    let _w = Watchdog::new(Duration::from_secs(30));
    let (a, b) = Channel::pair().unwrap();
    let (_b_tx, rx) = b.split();
    let shared = rx.into_shared();
    a.send(build(&a, 7, 1, 8)).unwrap();
    let owned = shared.recv().unwrap();
    drop(shared);
    drop(a);
    assert!(owned.is_copied());
    let list: capnp::data_list::Reader<'_> = owned.get_root().unwrap();
    assert_eq!(list.get(0).unwrap(), &7u64.to_le_bytes()[..]);
}

/// The number of `futex_waitv(2)` on x86_64 and aarch64.
const SYS_FUTEX_WAITV: u32 = 449;

/// Makes `futex_waitv` fail with `ENOSYS` in this thread and the threads it
/// starts, as on Linux before 5.16 or under a seccomp profile that lacks it.
fn deny_futex_waitv() {
    let filter = [
        // Load the system call number.
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        },
        // futex_waitv: ENOSYS; anything else: allow.
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: SYS_FUTEX_WAITV,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x0005_0000 | libc::ENOSYS.unsigned_abs(),
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        },
    ];
    let program = libc::sock_fprog {
        len: u16::try_from(filter.len()).unwrap(),
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    let no_new_privs = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(no_new_privs, 0);
    // SAFETY: `program` points to `filter`, both alive for the call, which
    // copies them.
    let set = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) };
    assert_eq!(set, 0, "seccomp: {}", std::io::Error::last_os_error());
    // SAFETY: futex_waitv with no words and no timeout; the filter refuses it
    // before the kernel reads anything.
    let r = unsafe {
        libc::syscall(
            libc::c_long::from(SYS_FUTEX_WAITV),
            0usize,
            0u32,
            0u32,
            0usize,
            0u32,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOSYS)
    );
}

#[test]
fn without_futex_waitv_a_take_still_wakes_a_sender_on_a_full_ring() {
    // Where the kernel cannot sleep on several words, a sender that found
    // the ring full sleeps on the one word a take moves. Asleep on
    // `released` instead, it would wait out its whole slice (here a minute:
    // the watchdog ends the test first) for every full ring, as no release
    // follows a carried message. Messages read in place too.
    let _w = Watchdog::new(Duration::from_secs(30));
    let child = fork(|| {
        deny_futex_waitv();
        const N: u64 = 40;
        let options = Options::new()
            .ring_capacity(2)
            .spin(Duration::ZERO)
            .wait_slice(Duration::from_secs(60));
        for len in [8, IN_PLACE] {
            let (a, b) = Channel::pair_with(&options).unwrap();
            let (tx, _a_rx) = a.split();
            let (_b_tx, rx) = b.split();
            let receiver = thread::spawn(move || {
                for n in 0..N {
                    // Let the sender find the ring full and fall asleep.
                    thread::sleep(Duration::from_millis(1));
                    assert_eq!(check(&rx.recv().unwrap()), n);
                }
            });
            for n in 0..N {
                tx.send(build(&tx, n, 1, len)).unwrap();
            }
            receiver.join().unwrap();
            assert!(tx.stats().sleeps > 0, "the sender slept ({len} bytes)");
        }
        0
    });
    assert_eq!(child.wait(), 0);
}
