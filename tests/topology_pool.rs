//! A pool: one parent serves many forked workers, each over its own
//! [`Channel::pair`] made before its `fork`, sleeping in [`wait_any_with`]
//! until any of them asks. Every request is answered exactly once, the
//! answers are right, and a worker killed mid-run is reported by `wait_any`
//! as ready, then by `try_recv` as [`Error::Disconnected`], and dropped from
//! the set while the others finish.
//!
//! Each test runs once with each [`WaitMethod`] forced: the futex path
//! (`futex_waitv`) and the doorbell path (`poll` on the sockets) that older
//! kernels fall back to.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use capnp_shm::{wait_any_with, Channel, SendError, TryRecvError, WaitMethod};
use common::{build, check, fork, Child, Watchdog};

/// Workers in the pool.
const WORKERS: u64 = 8;
/// Requests each worker makes (at least, in [`Run::UntilVictimDropped`]).
const REQUESTS: u64 = 400;
/// The worker killed mid-run, and after how many of its answers.
const VICTIM: u64 = 3;
const KILL_AFTER: u64 = REQUESTS / 4;

/// How long the surviving workers go on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Run {
    /// Each asks [`REQUESTS`] times, then hangs up.
    Fixed,
    /// Each goes on asking until the parent answers "stop", which it does
    /// only once the victim has been dropped: the victim's death must be
    /// noticed while every other worker keeps the parent busy.
    UntilVictimDropped,
}

/// Request `i` of worker `w`: a unique id.
fn request_id(worker: u64, i: u64) -> u64 {
    (worker << 32) | i
}

fn worker_of(id: u64) -> u64 {
    id >> 32
}

/// The answer to request `id`: the worker checks it came from its request.
fn answer_to(id: u64) -> u64 {
    id.wrapping_mul(3).wrapping_add(1)
}

/// The answer to request `id` that also tells the worker to stop.
fn stop_answer_to(id: u64) -> u64 {
    !answer_to(id)
}

/// A worker: asks one request at a time and checks each answer; stops after
/// [`REQUESTS`] or when told to.
fn worker(channel: &Channel, w: u64, run: Run) -> i32 {
    for i in 0.. {
        if run == Run::Fixed && i == REQUESTS {
            break;
        }
        let id = request_id(w, i);
        let reply = channel.request(build(channel, id, 1, 48)).expect("request");
        match check(&reply) {
            n if n == answer_to(id) => {}
            n if n == stop_answer_to(id) && run == Run::UntilVictimDropped => break,
            n => panic!("worker {w}: wrong answer {n:#x} to {id:#x}"),
        }
    }
    0 // the channel drops in the caller: the parent sees Disconnected
}

/// A worker's number and process.
type Worker = (u64, Child);

/// Forks the workers, each with its own pair made just before its fork. A
/// worker drops every parent end it inherited (its own and the other
/// workers'): unused copies, so dropping them closes nothing.
fn fork_workers(run: Run) -> (Vec<(u64, Channel)>, Vec<Worker>) {
    let mut parent_ends: Vec<(u64, Channel)> = Vec::new();
    let mut children: Vec<Worker> = Vec::new();
    for w in 0..WORKERS {
        let (parent_end, worker_end) = Channel::pair().unwrap();
        let (mut parent_end, mut worker_end) = (Some(parent_end), Some(worker_end));
        let child = fork(|| {
            drop(std::mem::take(&mut parent_ends));
            drop(parent_end.take());
            let channel = worker_end.take().unwrap();
            worker(&channel, w, run)
        });
        drop(worker_end);
        parent_ends.push((w, parent_end.unwrap()));
        children.push((w, child));
    }
    (parent_ends, children)
}

fn pool(method: WaitMethod, run: Run) {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let (mut active, mut children) = fork_workers(run);
    let victim_at = children.iter().position(|(w, _)| *w == VICTIM).unwrap();
    let mut victim = Some(children.remove(victim_at).1);

    // Serve until every worker has gone. Counted here: each request id
    // received, each answered (sent successfully), answers per worker.
    let mut received: HashMap<u64, u32> = HashMap::new();
    let mut answered: HashMap<u64, u32> = HashMap::new();
    let mut answers_per_worker: HashMap<u64, u64> = HashMap::new();
    let mut told_to_stop: Vec<u64> = Vec::new();
    let mut gone: Vec<u64> = Vec::new();
    let mut others_active_when_victim_dropped = None;
    let mut start = 0usize;
    while !active.is_empty() {
        // Rotate the order so that no worker can starve the ones after it.
        start = (start + 1) % active.len();
        let ready = {
            let order: Vec<usize> = (0..active.len())
                .map(|k| (start + k) % active.len())
                .collect();
            let channels: Vec<&Channel> = order.iter().map(|&i| &active[i].1).collect();
            match wait_any_with(&channels, Some(Duration::from_secs(60)), method) {
                Ok(k) => order[k],
                Err(e) => panic!(
                    "wait_any: {e:?} with {} workers left, {} answers given",
                    active.len(),
                    answered.len()
                ),
            }
        };
        let w = active[ready].0;
        let answers = answers_per_worker.get(&w).copied().unwrap_or(0);
        // The request is read and released before anything else happens.
        let request = active[ready].1.try_recv().map(|request| check(&request));
        let id = match request {
            Ok(id) => id,
            Err(TryRecvError::Disconnected) => {
                if w == VICTIM {
                    assert!(victim.is_none(), "the victim left before the kill");
                    others_active_when_victim_dropped =
                        Some(u64::try_from(active.len()).unwrap() - 1);
                } else if run == Run::Fixed {
                    assert_eq!(answers, REQUESTS, "worker {w} left early");
                } else {
                    assert!(told_to_stop.contains(&w), "worker {w} left early");
                }
                gone.push(w);
                active.remove(ready);
                continue;
            }
            Err(e) => panic!("worker {w}: ready, yet try_recv gave {e:?}"),
        };
        assert_eq!(worker_of(id), w, "a request on the wrong channel");
        *received.entry(id).or_default() += 1;
        let stop = run == Run::UntilVictimDropped
            && others_active_when_victim_dropped.is_some()
            && answers >= REQUESTS;
        let answer = if stop {
            stop_answer_to(id)
        } else {
            answer_to(id)
        };
        let channel = &active[ready].1;
        match channel.send(build(channel, answer, 1, 48)) {
            Ok(()) => {
                *answered.entry(id).or_default() += 1;
                answers_per_worker.insert(w, answers + 1);
                if stop {
                    told_to_stop.push(w);
                }
            }
            // Only the victim may vanish between its request and our answer.
            Err(SendError::Disconnected(_)) if w == VICTIM && victim.is_none() => {}
            Err(e) => panic!("answering worker {w}: {e:?}"),
        }
        if w == VICTIM && answers + 1 == KILL_AFTER && victim.is_some() {
            // Mid-run: it is about to ask again, and the others are busy.
            let killed = victim.take().unwrap();
            killed.kill();
            children.push((VICTIM, killed));
        }
    }

    // No request came twice, none was answered twice; every survivor got
    // all of its answers; the victim got its answers before the kill (and
    // perhaps asked, and was answered, once more).
    for (id, count) in &received {
        assert_eq!(*count, 1, "request {id:#x} received {count} times");
    }
    for (id, count) in &answered {
        assert_eq!(*count, 1, "request {id:#x} answered {count} times");
    }
    for w in 0..WORKERS {
        let of_w = |map: &HashMap<u64, u32>| {
            u64::try_from(map.keys().filter(|&&id| worker_of(id) == w).count()).unwrap()
        };
        let (asked, got) = (of_w(&received), of_w(&answered));
        match (w == VICTIM, run) {
            (true, _) => {
                assert!(
                    (KILL_AFTER..=KILL_AFTER + 1).contains(&asked),
                    "victim asked {asked}"
                );
                assert!((KILL_AFTER..=asked).contains(&got), "victim answered {got}");
            }
            (false, Run::Fixed) => {
                assert_eq!((asked, got), (REQUESTS, REQUESTS), "worker {w}");
            }
            (false, Run::UntilVictimDropped) => {
                assert_eq!(asked, got, "worker {w}");
                assert!(asked > REQUESTS, "worker {w} asked {asked}");
            }
        }
    }
    gone.sort_unstable();
    assert_eq!(gone, (0..WORKERS).collect::<Vec<_>>(), "every worker left");
    if run == Run::UntilVictimDropped {
        assert_eq!(others_active_when_victim_dropped, Some(WORKERS - 1));
    }
    for (w, child) in children {
        let code = child.wait();
        if w == VICTIM {
            assert_eq!(code, 128 + libc::SIGKILL, "the victim was not killed");
        } else {
            assert_eq!(
                code, 0,
                "worker {w} failed (its panic shows with --nocapture)"
            );
        }
    }
}

#[test]
fn a_pool_served_with_futex_waitv() {
    pool(WaitMethod::Futex, Run::Fixed);
}

#[test]
fn a_pool_served_with_doorbells() {
    pool(WaitMethod::Doorbell, Run::Fixed);
}

/// `wait_any` promises a killed peer is noticed within one wait slice. In
/// the futex path it polls for hang-up only after a whole slice in which no
/// channel was ready, so while the other workers keep the parent busy the
/// dead one is never reported: this test then spins until the watchdog.
#[test]
fn a_dead_worker_is_noticed_under_load_with_futex_waitv() {
    pool(WaitMethod::Futex, Run::UntilVictimDropped);
}

/// The same with the doorbell path, whose `poll` reports hang-up whenever
/// the parent sleeps at all.
#[test]
fn a_dead_worker_is_noticed_under_load_with_doorbells() {
    pool(WaitMethod::Doorbell, Run::UntilVictimDropped);
}

/// One channel's failure is not the wait's: `wait_any` reports that
/// channel ready, and its `try_recv` returns the failure.
#[test]
fn a_failing_channel_is_reported_ready_not_as_an_error() {
    use std::io::Write;
    use std::os::fd::AsFd;
    let _w = common::Watchdog::new(std::time::Duration::from_secs(30));
    for method in [
        capnp_shm::WaitMethod::Futex,
        capnp_shm::WaitMethod::Doorbell,
    ] {
        let (a, _a_peer) = capnp_shm::Channel::pair().unwrap();
        let (b, b_peer) = capnp_shm::Channel::pair().unwrap();
        // The peer writes a byte that is not a doorbell.
        let mut raw =
            std::os::unix::net::UnixStream::from(b_peer.as_fd().try_clone_to_owned().unwrap());
        raw.write_all(b"?").unwrap();
        let opts = Some(std::time::Duration::from_secs(5));
        // The junk is seen when the socket is next polled: at the latest
        // after one wait slice.
        let i = capnp_shm::wait_any_with(&[&a, &b], opts, method).unwrap();
        assert_eq!(i, 1, "{method:?}");
        assert!(
            matches!(
                b.try_recv(),
                Err(capnp_shm::TryRecvError::Failed(
                    capnp_shm::Failure::Protocol(capnp_shm::ProtocolError::UnexpectedSocketData)
                ))
            ),
            "{method:?}"
        );
    }
}
