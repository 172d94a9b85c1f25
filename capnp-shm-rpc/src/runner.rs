//! The built-in single-threaded runner: a small local executor that sleeps
//! in one `poll(2)` on the descriptors of the connections waiting in it,
//! plus a wake-up socket for wakers called from other threads.

use std::cell::{RefCell, RefMut};
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixDatagram;
use std::pin::pin;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::future::LocalFutureObj;
use futures::task::{LocalSpawn, SpawnError};

use crate::io::Registration;

thread_local! {
    /// The reactor of the runner running on this thread, if any.
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// The reactor of the runner running on this thread.
pub(crate) fn current() -> Option<Rc<Reactor>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The connections waiting for their descriptors.
#[derive(Default)]
pub(crate) struct Reactor {
    watched: RefCell<Vec<Registration>>,
    /// Reused between waits (a wait is on the path of every message that
    /// finds its receiver waiting, so it allocates nothing).
    ready: RefCell<Vec<bool>>,
    writes: RefCell<Vec<bool>>,
    live: RefCell<Vec<Rc<dyn crate::io::Watched>>>,
    fired: RefCell<Vec<Rc<dyn crate::io::Watched>>>,
}

impl fmt::Debug for Reactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reactor")
            .field("watched", &self.watched.borrow().len())
            .finish()
    }
}

impl Reactor {
    pub(crate) fn register(&self, registration: Registration) {
        self.watched.borrow_mut().push(registration);
    }

    /// Waits until a watched connection has work (and wakes its tasks) or
    /// `woken` says a waker ran: first by looking, for up to `spin`, then
    /// by arming every connection and sleeping in `poll(2)` on their
    /// descriptors and `wakeup` (which a waker on another thread rings).
    ///
    /// `woken` is asked during the spin; `going_to_sleep` once after it: it
    /// announces the sleep to wakers on other threads and says whether one
    /// has run meanwhile.
    fn wait(
        &self,
        wakeup: BorrowedFd<'_>,
        spin: Duration,
        woken: &dyn Fn() -> bool,
        going_to_sleep: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        // Drop the registrations of connections that are gone.
        let mut live = Scratch(self.live.borrow_mut());
        {
            let mut watched = self.watched.borrow_mut();
            watched.retain(|w| w.strong_count() > 0);
            live.extend(watched.iter().filter_map(|w| w.upgrade()));
        }
        let mut fired = Scratch(self.fired.borrow_mut());
        let start = Instant::now();
        loop {
            fired.extend(live.iter().filter(|w| w.ready_hint()).cloned());
            if !fired.is_empty() {
                self.fire(&fired);
                return Ok(());
            }
            if woken() || start.elapsed() >= spin {
                break;
            }
            std::hint::spin_loop();
        }
        if going_to_sleep() {
            return Ok(());
        }
        fired.extend(live.iter().filter(|w| w.arm_for_sleep()).cloned());
        if !fired.is_empty() {
            self.fire(&fired);
            return Ok(());
        }
        // `wakeup`, then each connection's descriptor: on the stack for a
        // few connections (`wakeup` fills the array), so that a sleep
        // allocates nothing; on the heap beyond.
        let n = 1 + live.len();
        let mut on_stack = [wakeup; FDS_ON_STACK];
        let mut on_heap = Vec::new();
        let fds: &mut [BorrowedFd<'_>] = match on_stack.get_mut(..n) {
            Some(fds) => fds,
            None => {
                on_heap.resize(n, wakeup);
                &mut on_heap
            }
        };
        for (fd, w) in fds[1..].iter_mut().zip(live.iter()) {
            *fd = w.fd();
        }
        let mut writes = self.writes.borrow_mut();
        writes.clear();
        writes.push(false);
        writes.extend(live.iter().map(|w| w.wants_write()));
        let mut ready = self.ready.borrow_mut();
        ready.clear();
        ready.resize(n, false);
        capnp_shm::poll_ready(fds, &writes, &mut ready, None)?;
        fired.extend(
            live.iter()
                .zip(ready.iter().skip(1))
                .filter(|(_, &r)| r)
                .map(|(w, _)| Rc::clone(w)),
        );
        drop(ready);
        self.fire(&fired);
        Ok(())
    }

    /// Wakes the tasks of `fired`, which stop being watched.
    fn fire(&self, fired: &[Rc<dyn crate::io::Watched>]) {
        if fired.is_empty() {
            return;
        }
        self.watched.borrow_mut().retain(|w| {
            w.upgrade()
                .is_some_and(|w| !fired.iter().any(|f| Rc::ptr_eq(f, &w)))
        });
        for w in fired {
            w.io().fired();
        }
    }
}

/// Descriptors a sleep polls from an array on the stack (the wake-up
/// socket and up to 15 connections); more take a vector per sleep.
const FDS_ON_STACK: usize = 16;

/// How long a [`Runner`] looks for work before it sleeps, unless
/// [`Runner::with_spin`] says otherwise: the core crate's default spin.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// The ready queue, shared with wakers (which may run on any thread).
struct Shared {
    /// Tasks woken since the runner last looked; [`MAIN`] for the future
    /// given to `run_until`.
    ready: Mutex<Vec<usize>>,
    /// The runner is (about to be) asleep in `poll`: a waker must ring.
    sleeping: AtomicBool,
    /// Written by a waker to end the runner's sleep.
    ring: UnixDatagram,
}

/// The task id of the future given to `run_until`.
const MAIN: usize = usize::MAX;

impl Shared {
    fn wake(&self, task: usize) {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
        // SeqCst, against the runner's store of `sleeping` and its check
        // of the queue: either it sees the task or this sees it sleeping.
        if self.sleeping.load(Ordering::SeqCst) {
            // Full (a ring is pending already), or the runner is gone (a
            // datagram socket then refuses, without SIGPIPE): nothing to add.
            let _ = self.ring.send(&[1]);
        }
    }
}

/// Wakes one task of a runner.
struct TaskWaker {
    task: usize,
    shared: Arc<Shared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.shared.wake(self.task);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.wake(self.task);
    }
}

/// One spawned task.
struct Task {
    future: LocalFutureObj<'static, ()>,
    waker: Waker,
}

/// Tasks spawned and not yet taken into the runner's table.
#[derive(Default)]
struct Spawned(RefCell<Vec<LocalFutureObj<'static, ()>>>);

/// A reused list of connections, emptied when the wait that filled it
/// ends: the runner holds no connection between waits (a dropped one must
/// close now).
struct Scratch<'r>(RefMut<'r, Vec<Rc<dyn crate::io::Watched>>>);

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        self.0.clear();
    }
}

impl std::ops::Deref for Scratch<'_> {
    type Target = Vec<Rc<dyn crate::io::Watched>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A single-threaded executor for RPC systems over shared memory, without
/// tokio. It sleeps in one `poll(2)` on the descriptors of every
/// connection that waits (and on a wake-up socket, for wakers called from
/// other threads), so an idle connection uses no CPU. Spawn the
/// `RpcSystem` and other `!Send` tasks with [`spawner`](Runner::spawner)
/// (`futures::task::LocalSpawnExt`), then drive a future with
/// [`run_until`](Runner::run_until).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use futures::task::LocalSpawnExt;
///
/// let mut runner = capnp_shm_rpc::Runner::new();
/// let handle = runner.spawner().spawn_local_with_handle(async { 6 * 7 })?;
/// assert_eq!(runner.run_until(handle), 42);
/// # Ok(()) }
/// ```
pub struct Runner {
    reactor: Rc<Reactor>,
    /// How long to look for work before sleeping.
    spin: Duration,
    shared: Arc<Shared>,
    /// Read end of `shared.ring`.
    wakeup: UnixDatagram,
    spawned: Rc<Spawned>,
    tasks: Vec<Option<Task>>,
    /// Free slots of `tasks`.
    free: Vec<usize>,
    /// Reused: the ready tasks of one round.
    round: Vec<usize>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("reactor", &self.reactor)
            .field("tasks", &(self.tasks.len() - self.free.len()))
            .finish_non_exhaustive()
    }
}

impl Default for Runner {
    fn default() -> Runner {
        Runner::new()
    }
}

/// Spawns tasks onto a [`Runner`]; from [`Runner::spawner`]. Implements
/// `futures::task::LocalSpawn`, so `LocalSpawnExt::spawn_local` works.
#[derive(Clone)]
pub struct Spawner(Rc<Spawned>);

impl fmt::Debug for Spawner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawner").finish_non_exhaustive()
    }
}

impl LocalSpawn for Spawner {
    fn spawn_local_obj(&self, future: LocalFutureObj<'static, ()>) -> Result<(), SpawnError> {
        self.0 .0.borrow_mut().push(future);
        Ok(())
    }
}

impl Runner {
    /// A runner with no tasks.
    ///
    /// # Panics
    ///
    /// When the wake-up socket pair cannot be made (out of descriptors).
    pub fn new() -> Runner {
        let (ring, wakeup) = UnixDatagram::pair().expect("capnp-shm-rpc runner: socketpair");
        ring.set_nonblocking(true).expect("nonblocking");
        wakeup.set_nonblocking(true).expect("nonblocking");
        Runner {
            reactor: Rc::new(Reactor::default()),
            spin: DEFAULT_SPIN,
            shared: Arc::new(Shared {
                ready: Mutex::new(Vec::new()),
                sleeping: AtomicBool::new(false),
                ring,
            }),
            wakeup,
            spawned: Rc::new(Spawned::default()),
            tasks: Vec::new(),
            free: Vec::new(),
            round: Vec::new(),
        }
    }

    /// How long the runner, out of tasks to run, keeps looking at its
    /// connections for a message before it arms them and sleeps: a reply
    /// that comes meanwhile costs no system call on either side (the peer
    /// need not ring) and no wake-up; the difference, per call, between a
    /// few microseconds and the machine's wake-up latency. An idle runner
    /// spins this long once, then sleeps without CPU. Default
    /// [`DEFAULT_SPIN`]; zero sleeps at once.
    #[must_use]
    pub fn with_spin(mut self, spin: Duration) -> Runner {
        self.spin = spin;
        self
    }

    /// Spawns tasks onto this runner.
    pub fn spawner(&self) -> Spawner {
        Spawner(Rc::clone(&self.spawned))
    }

    /// Runs the spawned tasks and `future` until `future` completes, and
    /// returns its output; sleeps in `poll(2)` whenever nothing can run.
    /// Tasks left unfinished stay for the next call.
    ///
    /// An RPC call only makes progress while its `RpcSystem` runs: spawn
    /// the system first (or join it with `future`). A call on a system that
    /// nobody drives waits forever; the runner cannot tell that from a
    /// future waiting for another thread.
    ///
    /// # Panics
    ///
    /// When `poll(2)` fails (it does not for valid descriptors), or when
    /// called from inside a task of a runner.
    pub fn run_until<F: Future>(&mut self, future: F) -> F::Output {
        let _current = Current::enter(&self.reactor);
        let waker = Waker::from(Arc::new(TaskWaker {
            task: MAIN,
            shared: Arc::clone(&self.shared),
        }));
        let mut future = pin!(future);
        let mut main_ready = true;
        loop {
            if main_ready {
                main_ready = false;
                if let Poll::Ready(output) = future.as_mut().poll(&mut Context::from_waker(&waker))
                {
                    return output;
                }
            }
            self.adopt_spawned();
            let mut round = std::mem::take(&mut self.round);
            round.clear();
            round.append(
                &mut self
                    .shared
                    .ready
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            if round.is_empty() && self.spawned.0.borrow().is_empty() {
                self.sleep();
            }
            for &task in &round {
                if task == MAIN {
                    main_ready = true;
                } else {
                    self.poll_task(task);
                }
            }
            self.round = round;
        }
    }

    /// Takes newly spawned tasks into the table, each ready to run.
    fn adopt_spawned(&mut self) {
        if self.spawned.0.borrow().is_empty() {
            return;
        }
        let spawned = std::mem::take(&mut *self.spawned.0.borrow_mut());
        for future in spawned {
            let task = self.free.pop().unwrap_or_else(|| {
                self.tasks.push(None);
                self.tasks.len() - 1
            });
            let waker = Waker::from(Arc::new(TaskWaker {
                task,
                shared: Arc::clone(&self.shared),
            }));
            self.tasks[task] = Some(Task { future, waker });
            self.shared.wake(task);
        }
    }

    fn poll_task(&mut self, task: usize) {
        // A wake may name a task that finished since.
        let Some(Some(t)) = self.tasks.get_mut(task) else {
            return;
        };
        let waker = t.waker.clone();
        if Pin::new(&mut t.future)
            .poll(&mut Context::from_waker(&waker))
            .is_ready()
        {
            self.tasks[task] = None;
            self.free.push(task);
        }
    }

    /// Sleeps until a connection's descriptor fires or a waker rings.
    fn sleep(&self) {
        let queued = || {
            !self
                .shared
                .ready
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        };
        // SeqCst, against a waker's push and its load of `sleeping`: either
        // the queue check below sees its task or the waker sees `sleeping`
        // and rings the wake socket, which `poll` watches.
        let going_to_sleep = || {
            self.shared.sleeping.store(true, Ordering::SeqCst);
            queued()
        };
        let waited = self
            .reactor
            .wait(self.wakeup.as_fd(), self.spin, &queued, &going_to_sleep);
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = waited {
            panic!("capnp-shm-rpc runner: poll(2) failed: {e}");
        }
        // Read away the rings (nonblocking: stops at WouldBlock).
        let mut buf = [0u8; 16];
        while matches!(self.wakeup.recv(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Makes a reactor this thread's current one for a scope.
struct Current;

impl Current {
    fn enter(reactor: &Rc<Reactor>) -> Current {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            assert!(
                c.is_none(),
                "capnp_shm_rpc::Runner::run_until called inside a runner"
            );
            *c = Some(Rc::clone(reactor));
        });
        Current
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}
