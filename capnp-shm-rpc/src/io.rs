//! How a connection waits for its channel's descriptor.
//!
//! The receive loop and the writer of one connection both wait on the same
//! descriptor (the channel's socket, which the peer rings when this end is
//! [armed](capnp_shm::Receiver::arm)). A driver keeps one waker per
//! descriptor, so a connection registers one [`FanOut`] waker with it and
//! keeps the wakers of its own tasks there; when the descriptor fires, all
//! of them run and each re-checks its own condition.
//!
//! The driver is chosen at the first wait, from the thread the connection
//! runs on (and again when the connection moves): the built-in
//! [`Runner`](crate::Runner) when one is running, otherwise (feature
//! `tokio`) tokio's reactor, through a `tokio::net::UnixStream` on a
//! duplicate of the socket, under a runtime.
//!
//! One socket carries both directions' doorbells, and arming either
//! direction reads all of them away; so whoever arms re-checks both armed
//! directions with loads only before anything sleeps (`Watched::
//! arm_for_sleep` for the runner, `Inner::wait_for` in the network for tokio).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::BorrowedFd;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use crate::runner::{self, Reactor};

/// The wakers of the tasks waiting on one connection's descriptor.
#[derive(Debug, Default)]
pub(crate) struct FanOut {
    wakers: Mutex<Vec<Waker>>,
}

impl FanOut {
    /// Adds a task's waker (once).
    fn add(&self, waker: &Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Wakes every waiting task.
    pub(crate) fn fire(&self) {
        // Woken under the lock, which keeps the vector's allocation for the
        // next wait; no waker calls back into `add` (only task polls do).
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        for w in wakers.drain(..) {
            w.wake();
        }
    }
}

impl Wake for FanOut {
    fn wake(self: Arc<Self>) {
        self.fire();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fire();
    }
}

/// Something a driver watches: a descriptor and the wakers behind it.
pub(crate) trait Watched {
    fn fd(&self) -> BorrowedFd<'_>;
    fn io(&self) -> &Io;
    /// Whether a waiting task would find work now: loads only, no system
    /// call (the runner looks while it spins).
    fn ready_hint(&self) -> bool;
    /// Arms what waits unarmed (the runner's last step before it sleeps);
    /// `true` when that found work after all.
    fn arm_for_sleep(&self) -> bool;
    /// Whether the runner's sleep should also end when the descriptor
    /// takes bytes (a stream channel's full socket).
    fn wants_write(&self) -> bool {
        false
    }
}

#[derive(Debug)]
enum Driver {
    /// No wait yet.
    Unchosen,
    /// The built-in runner of this thread.
    Runner(Rc<Reactor>),
    /// tokio, with a duplicate of the socket registered in its reactor
    /// (closed with the connection).
    #[cfg(feature = "tokio")]
    Tokio(tokio::net::UnixStream),
}

/// One connection's way of waiting for its descriptor.
#[derive(Debug)]
pub(crate) struct Io {
    fanout: Arc<FanOut>,
    driver: RefCell<Driver>,
    /// Registered with the runner's reactor, not yet fired.
    registered: Cell<bool>,
}

impl Io {
    pub(crate) fn new() -> Io {
        Io {
            fanout: Arc::new(FanOut::default()),
            driver: RefCell::new(Driver::Unchosen),
            registered: Cell::new(false),
        }
    }

    pub(crate) fn fanout(&self) -> &FanOut {
        &self.fanout
    }

    /// The runner fired this registration.
    pub(crate) fn fired(&self) {
        self.registered.set(false);
        self.fanout.fire();
    }

    /// Whether the driver of this thread looks for work before it sleeps
    /// (the built-in runner): then a waiting task need not arm its channel
    /// itself; the runner arms it through [`Watched::arm_for_sleep`] when
    /// it is about to sleep.
    pub(crate) fn arms_late<T: Watched + 'static>(&self, owner: &Rc<T>) -> io::Result<bool> {
        self.choose_now(owner)?;
        Ok(matches!(*self.driver.borrow(), Driver::Runner(_)))
    }

    /// Chooses the driver at the first wait, and again when the connection
    /// has moved: to another runner, or between a runner and tokio.
    fn choose_now<T: Watched + 'static>(&self, owner: &Rc<T>) -> io::Result<()> {
        let mut driver = self.driver.borrow_mut();
        let current = runner::current();
        let stale = match &*driver {
            Driver::Unchosen => true,
            Driver::Runner(r) => !current.as_ref().is_some_and(|c| Rc::ptr_eq(c, r)),
            #[cfg(feature = "tokio")]
            Driver::Tokio(_) => current.is_some(),
        };
        if stale {
            *driver = choose(owner.fd())?;
            self.registered.set(false);
        }
        Ok(())
    }

    /// Waits for the descriptor of `owner` (whose `io()` this is) after the
    /// caller armed the channel (or left that to the runner; see
    /// [`arms_late`](Self::arms_late)): `Ready` when it may have fired
    /// already (check again), `Pending` with `cx` registered otherwise.
    pub(crate) fn poll_ready<T: Watched + 'static>(
        &self,
        owner: &Rc<T>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        self.fanout.add(cx.waker());
        self.choose_now(owner)?;
        let driver = self.driver.borrow();
        match &*driver {
            Driver::Unchosen => unreachable!("chosen above"),
            Driver::Runner(reactor) => {
                if !self.registered.replace(true) {
                    let watched: Rc<dyn Watched> = owner.clone();
                    reactor.register(Rc::downgrade(&watched));
                }
                Poll::Pending
            }
            #[cfg(feature = "tokio")]
            Driver::Tokio(socket) => {
                let waker = Waker::from(Arc::clone(&self.fanout));
                let mut tokio_cx = Context::from_waker(&waker);
                match socket.poll_read_ready(&mut tokio_cx) {
                    Poll::Ready(Ok(())) => {
                        // Cleared before the caller re-checks (arming reads
                        // the doorbell bytes away), so a ring after this is
                        // a new edge, not lost.
                        let _ = socket.try_io(tokio::io::Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// The driver for a connection first waiting on this thread.
fn choose(fd: BorrowedFd<'_>) -> io::Result<Driver> {
    if let Some(reactor) = runner::current() {
        return Ok(Driver::Runner(reactor));
    }
    #[cfg(feature = "tokio")]
    if tokio::runtime::Handle::try_current().is_ok() {
        // The core crate uses its socket only with `poll` and
        // MSG_DONTWAIT, so the shared O_NONBLOCK changes nothing for it.
        let socket = std::os::unix::net::UnixStream::from(fd.try_clone_to_owned()?);
        socket.set_nonblocking(true)?;
        return Ok(Driver::Tokio(tokio::net::UnixStream::from_std(socket)?));
    }
    let _ = fd;
    Err(io::Error::other(if cfg!(feature = "tokio") {
        "a connection waited outside any driver: run it under \
         capnp_shm_rpc::Runner or inside a tokio runtime"
    } else {
        "a connection waited outside any driver: run it under \
         capnp_shm_rpc::Runner (or enable the `tokio` feature)"
    }))
}

/// A registration whose connection may be gone.
pub(crate) type Registration = Weak<dyn Watched>;
