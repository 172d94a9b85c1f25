//! Spawned children: hand one end of a channel to a `Command`, find it in
//! the child with `Channel::from_env`.
//!
//! The convention: the child's end of a socket pair keeps its descriptor
//! number across `exec`, and [`ENV_VAR`] names it, with the parent's pid:
//! `CAPNP_SHM_FD=<fd>:<parent pid>`. The descriptor is close-on-exec in the
//! parent (no other child inherits it); only this command's child clears the
//! flag, between `fork` and `exec`. The child checks that its parent is the
//! one named (so a grandchild that inherited the variable does not take some
//! unrelated descriptor for its channel) and that the descriptor is a Unix
//! stream socket, takes ownership of it and sets close-on-exec again. The
//! memfds and the handshake come after the `exec`, in each process.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Command;

use crate::channel::Channel;
use crate::error::{NotInherited, SetupError};
use crate::options::Options;
use crate::sys::{self, file, process};

/// The environment variable through which a spawned child finds its end.
pub const ENV_VAR: &str = "CAPNP_SHM_FD";

/// The parent's half of a channel to a child not yet spawned; from
/// [`Channel::for_command`].
pub struct PendingChild {
    ours: UnixStream,
    /// The child's end, kept open here until the child has it.
    theirs: OwnedFd,
    /// Disarmed (dropped) once the child has its end, or with this value.
    inheritance: process::Inheritance,
}

impl fmt::Debug for PendingChild {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingChild")
            .field("ours", &self.ours)
            .field("theirs", &self.theirs)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Prepares `command` to receive the other end of a new channel: call
    /// this, then `command.spawn()`, then [`PendingChild::connect`]. The
    /// child calls [`Channel::from_env`]. One call per spawn: the command's
    /// next child gets the end, and no later one does (the variable stays
    /// set on the `Command`, but names nothing a later child can claim).
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::process::Command;
    /// use capnp_shm::Channel;
    ///
    /// let mut command = Command::new("/usr/bin/my-worker");
    /// let pending = Channel::for_command(&mut command)?;
    /// let mut child = command.spawn()?;
    /// let channel = pending.connect()?; // the worker runs Channel::from_env()
    /// # drop(channel); child.wait()?; Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// When the socket pair cannot be made.
    pub fn for_command(command: &mut Command) -> std::io::Result<PendingChild> {
        let (ours, theirs) = UnixStream::pair()?;
        // Above 0-2, so the child's standard streams never land on it.
        let theirs = process::dup_above_stdio(OwnedFd::from(theirs).as_fd())?;
        let inheritance = process::inherit_in(command, theirs.as_fd());
        command.env(ENV_VAR, format!("{}:{}", theirs.as_raw_fd(), sys::getpid()));
        Ok(PendingChild {
            ours,
            theirs,
            inheritance,
        })
    }

    /// In a child spawned with [`Channel::for_command`]: takes the inherited
    /// end and sets the channel up (default options).
    ///
    /// # Errors
    ///
    /// [`SetupError::NotInherited`] when the variable is missing, malformed
    /// or names another parent, or the descriptor is not open, not a Unix
    /// stream socket, not a socket our parent made (its peer per
    /// `SO_PEERCRED`), or was claimed already (a refused descriptor is left
    /// open and untouched); then the set-up errors of
    /// [`Channel::from_stream`].
    pub fn from_env() -> Result<Channel, SetupError> {
        Channel::from_env_with(&Options::default())
    }

    /// [`from_env`](Channel::from_env) with options.
    ///
    /// # Errors
    ///
    /// As [`from_env`](Channel::from_env).
    pub fn from_env_with(options: &Options) -> Result<Channel, SetupError> {
        let refuse = |why| SetupError::NotInherited(why);
        let value = std::env::var(ENV_VAR).map_err(|_| refuse(NotInherited::NotSet))?;
        let (fd, parent) = value
            .split_once(':')
            .and_then(|(fd, pid)| Some((fd.parse::<i32>().ok()?, pid.parse::<u32>().ok()?)))
            .ok_or(refuse(NotInherited::Malformed))?;
        if parent != sys::parent_pid() {
            return Err(refuse(NotInherited::OtherParent));
        }
        let fd = process::claim_inherited(fd).map_err(|r| {
            refuse(match r {
                process::Refusal::NotOpen => NotInherited::NotOpen,
                process::Refusal::NotUnixStream => NotInherited::NotAUnixStream,
                process::Refusal::NotFromParent => NotInherited::NotFromParent,
                process::Refusal::ClaimedAlready => NotInherited::ClaimedAlready,
            })
        })?;
        file::set_cloexec(fd.as_fd(), true)?;
        Channel::from_stream_with(UnixStream::from(fd), options)
    }
}

impl PendingChild {
    /// After `command.spawn()`: closes the child's end in this process and
    /// sets the channel up with the child (default options).
    ///
    /// # Errors
    ///
    /// As [`Channel::from_stream`]: a child that never calls `from_env`
    /// makes this fail with [`SetupError::Timeout`]; one that exits, with
    /// [`SetupError::Protocol`] (handshake truncated).
    pub fn connect(self) -> Result<Channel, SetupError> {
        self.connect_with(&Options::default())
    }

    /// [`connect`](PendingChild::connect) with options.
    ///
    /// # Errors
    ///
    /// As [`connect`](PendingChild::connect).
    pub fn connect_with(self, options: &Options) -> Result<Channel, SetupError> {
        let PendingChild {
            ours,
            theirs,
            inheritance,
        } = self;
        drop(inheritance);
        drop(theirs);
        Channel::from_stream_with(ours, options)
    }
}
