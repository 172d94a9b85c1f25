//! Spawned children: the parent hands one end to a `Command` with
//! [`Channel::for_command`], the child (this test binary, re-executed) finds
//! it with [`Channel::from_env`]. Also: the descriptor reaches that child and
//! no other, and `from_env` refuses what is not its own.
//!
//! The child side is the test `child_entry`, which does nothing unless
//! [`ROLE_VAR`] is set; the parent runs the binary again with
//! `--exact child_entry` and the role it wants. A failing child panics (exit
//! code 101) and the parent shows its output.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use capnp_shm::{Channel, NotInherited, Options, RecvError, SetupError, ENV_VAR};
use common::{build, check, Watchdog};

/// Selects what `child_entry` does in a re-executed test binary.
const ROLE_VAR: &str = "CAPNP_SHM_TEST_ROLE";
/// For the `plain` role: socket link targets (`socket:[inode]`, comma
/// separated) the child must not have open.
const FORBIDDEN_VAR: &str = "CAPNP_SHM_TEST_FORBIDDEN";
/// For the `refuse` role: the `NotInherited` reason (Debug form) `from_env` must give.
const EXPECT_VAR: &str = "CAPNP_SHM_TEST_EXPECT";
/// Added to a message number by the side that echoes it.
const ECHO: u64 = 1_000_000;

/// Set-up timeout for the parent: the child is a whole test binary starting
/// on a busy machine; only the watchdog bounds the test.
fn patient() -> Options {
    Options::new().setup_timeout(Duration::from_secs(60))
}

/// This test binary, to run as a child in `role`.
fn child_command(role: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("current_exe"));
    command
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Checks that a child run succeeded, showing its output if not. The run
/// must have run `child_entry` itself: a filter that matched nothing would
/// also exit with success.
fn expect_success(output: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(" 1 passed;"),
        "{what} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr),
    );
}

fn finish(child: std::process::Child, what: &str) -> Output {
    let output = child.wait_with_output().expect("wait for child");
    expect_success(&output, what);
    output
}

/// This process's open descriptors and what each refers to.
fn open_fds() -> Vec<(i32, String)> {
    // The numbers first, so the directory's own descriptor is closed before
    // the links are read.
    let numbers: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    numbers
        .into_iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

fn is_cloexec(fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .expect("flags line");
    flags & 0o2_000_000 != 0 // O_CLOEXEC
}

/// Why `from_env` found no channel, or a panic.
fn refusal(result: Result<Channel, SetupError>) -> NotInherited {
    match result {
        Err(SetupError::NotInherited(why)) => why,
        other => panic!("expected SetupError::NotInherited, got {other:?}"),
    }
}

// ---- the child side --------------------------------------------------------

/// The child side of every test here; a no-op in the parent's own run.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    match role.as_str() {
        "echo" => echo(),
        "plain" => plain(),
        "refuse" => {
            let expected = std::env::var(EXPECT_VAR).expect("expectation");
            let why = refusal(Channel::from_env());
            assert_eq!(format!("{why:?}"), expected);
        }
        "spawn-grandchild" => spawn_grandchild(),
        "grandchild" => grandchild(),
        "exit" => {}
        "linger" => {
            // Hold the inherited end without a word until the parent is done.
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        other => panic!("unknown role {other}"),
    }
}

/// Announces its pid, then echoes every message until the parent hangs up.
fn echo() {
    let channel = Channel::from_env().expect("from_env");
    channel
        .send(build(&channel, u64::from(std::process::id()), 1, 8))
        .unwrap();
    loop {
        let n = match channel.recv() {
            Ok(message) => check(&message),
            Err(RecvError::Disconnected) => return,
            Err(e) => panic!("echo child: {e:?}"),
        };
        channel.send(build(&channel, n + ECHO, 2, 64)).unwrap();
    }
}

/// A child spawned without `for_command`: holds none of the parent's channel
/// sockets, and `from_env` finds nothing.
fn plain() {
    let forbidden = std::env::var(FORBIDDEN_VAR).unwrap_or_default();
    let forbidden: Vec<&str> = forbidden.split(',').filter(|s| !s.is_empty()).collect();
    assert!(!forbidden.is_empty(), "nothing to look for");
    for (fd, target) in open_fds() {
        assert!(
            !forbidden.contains(&target.as_str()),
            "inherited the parent's channel socket {target} as fd {fd}"
        );
    }
    assert!(std::env::var_os(ENV_VAR).is_none());
    assert_eq!(refusal(Channel::from_env()), NotInherited::NotSet);
}

/// Spawns a grandchild *before* claiming its own end (so the descriptor is
/// still inheritable, and the grandchild really holds it along with the
/// variable), then sets up its own channel and reports what the grandchild
/// saw: message 1 if it held the descriptor and was refused.
fn spawn_grandchild() {
    let mut command = child_command("grandchild");
    command.env_remove(FORBIDDEN_VAR);
    let output = command.output().expect("spawn grandchild");
    expect_success(&output, "grandchild");
    let held = String::from_utf8_lossy(&output.stdout).contains("grandchild: fd open");
    let channel = Channel::from_env().expect("from_env in the real child");
    channel
        .send(build(&channel, u64::from(held), 1, 8))
        .unwrap();
    assert!(matches!(channel.recv(), Err(RecvError::Disconnected)));
}

/// Inherited the variable (naming our grandparent) and, here, the open
/// descriptor: must be refused as not meant for us, and leave it alone.
fn grandchild() {
    let value = std::env::var(ENV_VAR).expect("the variable is inherited");
    let fd: i32 = value
        .split_once(':')
        .and_then(|(fd, _)| fd.parse().ok())
        .expect("well formed");
    let open = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok();
    if open(fd) {
        println!("grandchild: fd open");
    }
    let before = open(fd);
    assert_eq!(refusal(Channel::from_env()), NotInherited::OtherParent);
    assert_eq!(open(fd), before, "the refusal touched the descriptor");
}

// ---- the parent side -------------------------------------------------------

#[test]
fn a_spawned_child_exchanges_messages_both_ways() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let mut command = child_command("echo");
    let pending = Channel::for_command(&mut command).unwrap();
    let child = command.spawn().expect("spawn");
    let channel = pending.connect_with(&patient()).expect("connect");

    // The channel leads to exactly that child.
    assert_eq!(check(&channel.recv().unwrap()), u64::from(child.id()));
    // One at a time...
    for n in 0..50 {
        channel.send(build(&channel, n, 3, 200)).unwrap();
        assert_eq!(check(&channel.recv().unwrap()), n + ECHO);
    }
    // ...and a burst with many in flight.
    for n in 100..300 {
        channel.send(build(&channel, n, 1, 500)).unwrap();
    }
    for n in 100..300 {
        assert_eq!(check(&channel.recv().unwrap()), n + ECHO);
    }
    drop(channel); // the child sees Disconnected and exits cleanly
    finish(child, "echo child");
}

#[test]
fn the_descriptor_reaches_that_child_and_no_other() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    assert!(
        std::env::var_os(ENV_VAR).is_none(),
        "{ENV_VAR} set around the tests"
    );
    let before = open_fds();
    let mut command = child_command("echo");
    let pending = Channel::for_command(&mut command).unwrap();
    let new: Vec<(i32, String)> = open_fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    // Both ends of the socket pair, close-on-exec here.
    assert_eq!(new.len(), 2, "{new:?}");
    for (fd, target) in &new {
        assert!(target.starts_with("socket:"), "fd {fd} is {target}");
        assert!(is_cloexec(*fd), "fd {fd} is not close-on-exec");
    }
    let forbidden = new
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let child = command.spawn().expect("spawn");

    // Spawned while both ends are open here (the child's end until
    // `connect`): a plain Command inherits neither.
    let mut plain = child_command("plain");
    plain.env(FORBIDDEN_VAR, &forbidden);
    finish(plain.spawn().expect("spawn plain"), "plain child (pending)");

    let channel = pending.connect_with(&patient()).expect("connect");
    assert_eq!(check(&channel.recv().unwrap()), u64::from(child.id()));

    // The child's end is closed here now; ours is the channel's socket.
    let ours = channel.as_fd().as_raw_fd();
    let still_open: Vec<(i32, String)> = open_fds()
        .into_iter()
        .filter(|(_, t)| new.iter().any(|(_, n)| n == t))
        .collect();
    assert_eq!(still_open.len(), 1, "{still_open:?}");
    assert_eq!(still_open[0].0, ours);
    assert!(is_cloexec(ours));

    let mut plain = child_command("plain");
    plain.env(FORBIDDEN_VAR, &forbidden);
    finish(
        plain.spawn().expect("spawn plain"),
        "plain child (connected)",
    );

    // The real child was unaffected by its siblings.
    for n in 0..10 {
        channel.send(build(&channel, n, 1, 64)).unwrap();
        assert_eq!(check(&channel.recv().unwrap()), n + ECHO);
    }
    drop(channel);
    finish(child, "echo child");
}

#[test]
fn from_env_without_the_variable_is_not_found() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(60));
    // Here, in a process nobody spawned for a channel...
    assert!(std::env::var_os(ENV_VAR).is_none());
    assert_eq!(refusal(Channel::from_env()), NotInherited::NotSet);
    // ...and in a spawned child with the variable removed.
    let mut command = child_command("refuse");
    command.env_remove(ENV_VAR).env(EXPECT_VAR, "NotSet");
    finish(command.spawn().unwrap(), "child without the variable");
}

#[test]
fn from_env_refuses_a_variable_it_cannot_use() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let us = std::process::id();
    let cases = [
        ("garbage".to_string(), "Malformed"),
        ("5".to_string(), "Malformed"),
        (format!("5:{}", us.wrapping_add(1)), "OtherParent"), // another "parent"
        (format!("0:{us}"), "NotOpen"),                       // a standard stream
        (format!("900:{us}"), "NotOpen"),                     // no such descriptor
    ];
    for (value, expected) in cases {
        let mut command = child_command("refuse");
        command.env(ENV_VAR, &value).env(EXPECT_VAR, expected);
        finish(
            command.spawn().unwrap(),
            &format!("child with {ENV_VAR}={value}"),
        );
    }
}

#[test]
fn a_grandchild_that_inherits_the_variable_is_refused() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));
    let mut command = child_command("spawn-grandchild");
    let pending = Channel::for_command(&mut command).unwrap();
    let child = command.spawn().expect("spawn");
    let channel = pending.connect_with(&patient()).expect("connect");
    // The grandchild held the descriptor and the variable, and was refused
    // (by the parent pid); the child then set up the channel itself.
    assert_eq!(
        check(&channel.recv().unwrap()),
        1,
        "grandchild did not hold the fd"
    );
    drop(channel);
    finish(child, "child that spawned a grandchild");
}

#[test]
fn a_child_that_never_answers_fails_the_set_up() {
    let _serial = common::serial();
    let _w = Watchdog::new(Duration::from_secs(120));

    // Exits without a word: the end of the connection ends the set-up,
    // however long the timeout.
    let mut command = child_command("exit");
    let pending = Channel::for_command(&mut command).unwrap();
    let child = command.spawn().unwrap();
    let options = Options::new().setup_timeout(Duration::from_secs(600));
    match pending.connect_with(&options) {
        Err(SetupError::Timeout { .. }) | Ok(_) => {
            panic!("set-up with an exited child did not fail")
        }
        Err(e) => assert!(matches!(e, SetupError::Disconnected), "{e:?}"),
    }
    finish(child, "exiting child");

    // Holds its end and stays silent: the timeout ends the set-up.
    let mut command = child_command("linger");
    command.stdin(Stdio::piped());
    let pending = Channel::for_command(&mut command).unwrap();
    let child = command.spawn().unwrap();
    let options = Options::new().setup_timeout(Duration::from_millis(300));
    assert!(matches!(
        pending.connect_with(&options),
        Err(SetupError::Timeout { .. })
    ));
    finish(child, "silent child"); // closing its stdin lets it exit
}

/// Spawning the same `Command` again after the pending end is gone hands
/// nothing on: the descriptor number it named may be something else now.
#[test]
#[allow(unsafe_code)] // fcntl(F_DUPFD_CLOEXEC) to take a number back
fn a_reused_command_hands_on_nothing_the_second_time() {
    let _w = Watchdog::new(Duration::from_secs(60));
    // Other tests of this binary open and close descriptors on other
    // threads, so the freed number is taken back deliberately (and the
    // whole step retried if another thread got there first).
    for _ in 0..20 {
        let mut cmd = Command::new("/bin/sh");
        let pending = Channel::for_command(&mut cmd).unwrap();
        let value = cmd
            .get_envs()
            .find(|(k, _)| *k == ENV_VAR)
            .and_then(|(_, v)| v)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let number: i32 = value.split(':').next().unwrap().parse().unwrap();
        drop(pending); // closes both ends here and disarms the command
        let devnull = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: duplicates our own open file onto the lowest free number
        // at or above `number`; the result is a new descriptor or -1.
        let dup = unsafe { libc::fcntl(devnull.as_raw_fd(), libc::F_DUPFD_CLOEXEC, number) };
        assert!(dup >= 0);
        // SAFETY: fcntl returned a new descriptor nobody else owns.
        let dup = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        if dup.as_raw_fd() != number {
            continue; // another thread took the number meanwhile
        }
        let script =
            format!("if [ -e /proc/self/fd/{number} ]; then echo inherited; else echo clean; fi");
        let out = cmd.args(["-c", &script]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "clean");
        return;
    }
    panic!("could not take the freed number back in 20 tries");
}
