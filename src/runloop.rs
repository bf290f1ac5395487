//! The run loop of `autoattach run`: one loop thread, a small fixed pool of probe workers.
//!
//! The loop thread owns everything that decides: the [`Engine`], the children, the queue of
//! probes. It waits in one `poll` on the uevent socket, a signalfd (SIGHUP, SIGTERM, SIGINT,
//! SIGCHLD), a pipe the workers write to when a probe is done, and, with the native qubesdb
//! client, the qubesdb watch connection. Nothing it touches is shared: no locks around its
//! state, no atomics.
//!
//! Probes block (a first-sector read, a qubesdb read), so they run on probe workers: each has
//! its own channel, and the loop hands a job to an idle one and notes which worker runs which
//! device since when. A worker runs the probe-then-call step ([`Job::run`]): when the device
//! is ready and the job carries its call, the worker starts `qrexec-client-vm` at once, then
//! sends the outcome back and writes the wake pipe. The loop reaps the child, reports its exit
//! to the engine, and logs.
//!
//! **A probe stuck in the kernel.** A dying stick can hold a first-sector read for minutes
//! (the SCSI layer retries), in uninterruptible sleep: nothing can cancel it. A probe running
//! past [`PROBE_DEADLINE`] is *set aside*: the loop forgets its worker (dropping the worker's
//! channel, so the thread ends once the read returns), starts a fresh worker in its place, and
//! tells the engine, which logs it and runs no other probe of that device until the read
//! returns; then its verdict is taken like any other. At most [`MAX_SET_ASIDE`] stuck threads
//! are replaced; beyond that the pool shrinks instead of growing, and probes queue until a read
//! returns (the agent never grows without bound; the log says so once).
//!
//! **Stopping.** SIGTERM or SIGINT: `run` returns `Ok(())`; calls in flight are left running
//! (they are detached). A thread stuck in a read cannot be killed, not even by SIGKILL: the
//! process ends only when that read returns (see README, "Stopping the unit").
//!
//! The identity a call carries is read by the engine right after the match, on this thread
//! (10-45 µs, once per matching event: see [`crate::engine`]). Describing a device for the log
//! (vendor and product strings, a dozen sysfs reads) waits until no probe is in flight and a
//! few milliseconds after a call started, so it never competes with a probe or with the
//! client's `exec` on a two-core sys-usb.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

use crate::engine::{Config, Effect, Engine, Job, Outcome, Ticket};
use crate::exit::Failure;
use crate::log::{Escaped, RateLimited};
use crate::names::Call;
use crate::netlink::{Received, UeventSocket};
use crate::readiness::{Nodes, Prober, Publication};
use crate::rules::Parsed;
use crate::spawn::{Children, Exit, Spawner};
use crate::sysfs::Sysfs;
use crate::uevent::Uevent;

/// Everything `autoattach run` needs.
#[derive(Debug)]
pub struct RunOptions {
    pub sysfs: PathBuf,
    pub dev: PathBuf,
    pub load_rules: RuleLoader,
    pub client: PathBuf,
    /// Where probes ask whether Qubes has published a device, if anywhere.
    pub qubesdb: Option<Publication>,
    pub dry_run: bool,
    pub config: Config,
    pub rcvbuf: usize,
    /// After this long a child is logged as still running (and left alone).
    pub child_bound: Duration,
    /// Probe workers (at least 1).
    pub workers: usize,
    /// How long a probe may run before its worker is set aside and replaced.
    pub probe_deadline: Duration,
    /// Connects to qubesdb for watches (the native client). None: no watch; a device not yet
    /// published is asked about again on a timer, through the fallback reader.
    pub watch: Option<Connect>,
}

/// Probe workers by default: one for a slow device, one for the rest.
pub const WORKERS: usize = 2;
/// A probe running this long is set aside. A healthy probe takes milliseconds; a disk that
/// spins up, a few seconds; the fallback qubesdb read is bounded at 2 s.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);
/// At most this many stuck workers are replaced.
pub const MAX_SET_ASIDE: usize = 4;

/// Reads the rules from wherever they come from (called at start and on SIGHUP).
pub struct RuleLoader(pub Box<dyn Fn() -> Parsed + Send + Sync>);

impl std::fmt::Debug for RuleLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleLoader")
    }
}

/// A qubesdb connection that reports changes under watched keys (qubesdb's own watches:
/// a key ending in `/` watches the whole directory).
pub trait Watcher {
    /// Readable when watch events are pending.
    fn fd(&self) -> BorrowedFd<'_>;
    fn watch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError>;
    fn unwatch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError>;
    /// Appends the paths changed since the last call, without blocking. An error means the
    /// connection is lost.
    fn changed(&mut self, paths: &mut Vec<String>) -> Result<(), crate::qubesdb::QdbError>;
}

/// Makes a [`Watcher`] (at start, and again after the connection is lost).
pub struct Connect(pub Box<dyn Fn() -> Result<Box<dyn Watcher>, crate::qubesdb::QdbError>>);

impl Connect {
    /// The loop's own connection to this qube's qubesdb daemon.
    pub fn local() -> Connect {
        Connect(Box::new(|| {
            let client = crate::qubesdb::Client::connect_local(crate::readiness::QUBESDB_TIMEOUT)?;
            Ok(Box::new(client) as Box<dyn Watcher>)
        }))
    }
}

impl Connect {
    /// The loop's own connection to the qubesdb daemon at `socket` (`--qubesdb-socket`).
    pub fn at(socket: PathBuf) -> Connect {
        Connect(Box::new(move || {
            let client = crate::qubesdb::Client::connect(&socket, crate::readiness::QUBESDB_TIMEOUT)?;
            Ok(Box::new(client) as Box<dyn Watcher>)
        }))
    }
}

impl Watcher for crate::qubesdb::Client {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn watch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError> {
        crate::qubesdb::Client::watch(self, key)
    }
    fn unwatch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError> {
        crate::qubesdb::Client::unwatch(self, key).map(|_| ())
    }
    fn changed(&mut self, paths: &mut Vec<String>) -> Result<(), crate::qubesdb::QdbError> {
        paths.extend(self.take_watch_events()?);
        Ok(())
    }
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connect")
    }
}

/// Prints every rules error and warning; true if there was no error.
pub fn report_rules(parsed: &Parsed) -> bool {
    for e in &parsed.errors {
        error!("{e}");
    }
    for w in &parsed.warnings {
        warning!("{w}");
    }
    parsed.errors.is_empty()
}

/// The rules a command can act on, every error and warning printed: rules with errors are
/// [`Failure::rules`] (3); rules a source could not be asked for (qubesdb not answering) are
/// incomplete, [`Failure::fatal`] (4).
pub fn usable_rules(parsed: Parsed) -> Result<crate::rules::RuleSet, Failure> {
    if !report_rules(&parsed) {
        return Err(Failure::rules(format!("{} error(s) in the rules", parsed.errors.len())));
    }
    match parsed.unreachable.first() {
        Some(why) => Err(Failure::fatal(why.to_string())),
        None => Ok(parsed.set),
    }
}

/// Runs the agent until SIGTERM or SIGINT (`Ok`), or returns why it could not start or go on
/// ([`crate::exit::RULES`] for rules with errors, else [`crate::exit::FATAL`], which systemd restarts).
pub fn run(opts: RunOptions) -> Result<(), Failure> {
    one_malloc_arena();
    let mut agent = Loop::start(opts)?;
    loop {
        if let Flow::Stop = agent.turn()? {
            return Ok(());
        }
    }
}

enum Flow {
    Go,
    Stop,
}

/// What a worker's started call returns: `Ok(Some(pid))` started, `Ok(None)` printed (dry
/// run), `Err` could not be started.
type Started = Result<Option<Pid>, Errno>;

/// Makes calls: starts the client detached, or in dry-run prints the command it would run.
/// Used by the workers and the loop (posix_spawn is safe from any thread).
#[derive(Debug)]
struct Caller {
    spawner: Spawner,
    /// The client as the user named it, for dry-run output.
    name: PathBuf,
    dry_run: bool,
}

impl Caller {
    fn call(&self, call: &Call) -> Started {
        if self.dry_run {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{} dom0 {}", self.name.display(), call.service_arg());
            let _ = out.flush();
            return Ok(None);
        }
        let arg = std::ffi::CString::new(call.service_arg()).unwrap_or_default();
        self.spawner.spawn(&[c"dom0", &arg]).map(Some)
    }
}

/// What the workers share (read-only).
#[derive(Debug)]
struct Shared {
    prober: Prober,
    caller: Caller,
    /// Written by a worker when a probe is done, to wake the loop.
    wake: OwnedFd,
}

/// A finished probe, from worker `worker`.
struct Finished {
    worker: usize,
    outcome: Outcome<Started>,
}

/// A worker as the loop sees it.
struct Worker {
    id: usize,
    jobs: mpsc::Sender<Job>,
    busy: Option<Busy>,
}

/// The probe a worker runs.
struct Busy {
    epoch: u64,
    devpath: String,
    since: u64,
}

/// The probe workers, and the probes waiting for one.
struct Pool {
    size: usize,
    live: Vec<Worker>,
    pending: VecDeque<Job>,
    /// Workers set aside (stuck in a probe) that have not come back.
    set_aside: usize,
    next_id: usize,
    deadline: Duration,
    shared: Arc<Shared>,
    results: mpsc::Sender<Finished>,
    said_full: bool,
}

impl Pool {
    fn new(size: usize, deadline: Duration, shared: Arc<Shared>, results: mpsc::Sender<Finished>) -> Pool {
        Pool {
            size: size.max(1),
            live: Vec::new(),
            pending: VecDeque::new(),
            set_aside: 0,
            next_id: 0,
            deadline,
            shared,
            results,
            said_full: false,
        }
    }

    /// Starts a worker thread. It runs jobs until the loop drops its channel (when it is set
    /// aside), then ends.
    fn spawn_worker(&mut self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (id, shared, results) = (self.next_id, self.shared.clone(), self.results.clone());
        std::thread::Builder::new().name(format!("probe-{id}")).stack_size(256 * 1024).spawn(move || {
            // After a probe, the stack pages it touched are given back once the worker has
            // had nothing to do for TRIM_AFTER_IDLE: not at once, or every probe of a burst
            // would fault them in again (~4 µs each here) on the way to its call.
            let mut trimmed = true;
            loop {
                let job = if trimmed {
                    rx.recv().ok()
                } else {
                    match rx.recv_timeout(TRIM_AFTER_IDLE) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            release_unused_stack();
                            trimmed = true;
                            continue;
                        }
                        r => r.ok(),
                    }
                };
                let Some(job) = job else { return };
                trimmed = false;
                let outcome = job.run(&shared.prober, |call| shared.caller.call(call));
                if results.send(Finished { worker: id, outcome }).is_err() {
                    return;
                }
                let _ = nix::unistd::write(&shared.wake, b"!");
            }
        })?;
        self.next_id += 1;
        self.live.push(Worker { id, jobs: tx, busy: None });
        Ok(())
    }

    /// Hands queued probes to idle workers.
    fn dispatch(&mut self, now: u64) {
        for worker in self.live.iter_mut().filter(|w| w.busy.is_none()) {
            let Some(job) = self.pending.pop_front() else {
                return;
            };
            worker.busy = Some(Busy { epoch: job.epoch, devpath: job.target.devpath.clone(), since: now });
            if let Err(mpsc::SendError(job)) = worker.jobs.send(job) {
                // The thread is gone (it cannot be, short of a panic): keep the job.
                worker.busy = None;
                self.pending.push_front(job);
                return;
            }
        }
    }

    /// A worker is done with its probe; a set-aside one ends, and is replaced if the pool is
    /// short of one.
    fn finished(&mut self, worker: usize) {
        if let Some(w) = self.live.iter_mut().find(|w| w.id == worker) {
            w.busy = None;
            return;
        }
        self.set_aside = self.set_aside.saturating_sub(1);
        if self.live.len() < self.size {
            if let Err(e) = self.spawn_worker() {
                warning!("cannot start a probe worker: {e}");
            }
        }
    }

    /// Sets aside every worker whose probe is past the deadline; returns their probes.
    fn stuck(&mut self, now: u64) -> Vec<Busy> {
        let deadline = self.deadline.as_millis() as u64;
        let mut stuck = Vec::new();
        while let Some(i) = self.live.iter().position(|w| w.busy.as_ref().is_some_and(|b| b.since + deadline <= now)) {
            let worker = self.live.swap_remove(i);
            stuck.extend(worker.busy);
            self.set_aside += 1;
            if self.set_aside <= MAX_SET_ASIDE {
                if let Err(e) = self.spawn_worker() {
                    warning!("cannot start a probe worker in place of a stuck one: {e}");
                }
            } else if !std::mem::replace(&mut self.said_full, true) {
                warning!(
                    "{} probes are stuck in the kernel: no more workers are started in their place; \
                     probes wait until a stuck read returns",
                    self.set_aside
                );
            }
        }
        stuck
    }

    /// Probes running on live workers (set-aside ones not counted).
    fn in_flight(&self) -> usize {
        self.live.iter().filter(|w| w.busy.is_some()).count()
    }

    /// When the next running probe reaches its deadline.
    fn next_deadline(&self) -> Option<u64> {
        let deadline = self.deadline.as_millis() as u64;
        self.live.iter().filter_map(|w| w.busy.as_ref()).map(|b| b.since + deadline).min()
    }
}

/// The qubesdb watches the engine asked for, on the loop's own connection.
struct Watches {
    connect: Connect,
    conn: Option<Box<dyn Watcher>>,
    /// Watched keys, with how many devices wait for each.
    keys: BTreeMap<String, usize>,
    /// When to try to connect again.
    retry_at: Option<u64>,
}

/// How long to wait before connecting to qubesdb again.
const RECONNECT_MS: u64 = 1000;

impl Watches {
    fn add(&mut self, key: String, now: u64) {
        let count = self.keys.entry(key.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            if let Some(Err(e)) = self.conn.as_mut().map(|c| c.watch(&key)) {
                self.lost(&e, now);
            }
        }
    }

    fn remove(&mut self, key: &str, now: u64) {
        let Some(count) = self.keys.get_mut(key) else { return };
        *count -= 1;
        if *count == 0 {
            self.keys.remove(key);
            if let Some(Err(e)) = self.conn.as_mut().map(|c| c.unwatch(key)) {
                self.lost(&e, now);
            }
        }
    }

    fn lost(&mut self, e: &crate::qubesdb::QdbError, now: u64) {
        warning!("qubesdb watch connection lost: {e}; connecting again in {RECONNECT_MS} ms");
        self.conn = None;
        self.retry_at = Some(now + RECONNECT_MS);
    }

    /// Connects, watches every key again, and returns them: each may have been published
    /// while there was no connection.
    fn reconnect(&mut self, now: u64) -> Vec<String> {
        self.retry_at = None;
        let mut conn = match (self.connect.0)() {
            Ok(conn) => conn,
            Err(e) => {
                warning!("cannot connect to qubesdb for watches: {e}; trying again in {RECONNECT_MS} ms");
                self.retry_at = Some(now + RECONNECT_MS);
                return Vec::new();
            }
        };
        for key in self.keys.keys() {
            if let Err(e) = conn.watch(key) {
                self.lost(&e, now);
                return Vec::new();
            }
        }
        self.conn = Some(conn);
        self.keys.keys().cloned().collect()
    }
}

/// The loop thread's state.
struct Loop {
    engine: Engine,
    children: Children<Option<Ticket>>,
    refused: RefusalLog,
    /// Malformed or oversized datagrams from the kernel's group: logged once, then counted.
    malformed: RateLimited,
    pool: Pool,
    finished: mpsc::Receiver<Finished>,
    watches: Option<Watches>,
    socket: UeventSocket,
    sigfd: SignalFd,
    wake: OwnedFd,
    sysfs: Arc<Sysfs>,
    shared: Arc<Shared>,
    load_rules: RuleLoader,
    child_bound: Duration,
    start: Instant,
    buf: Vec<u8>,
    /// Effects of the engine not yet carried out (kept to reuse its allocation).
    fx: Vec<Effect>,
    /// Something that allocates (a match, a probe, a call, a reload, a resync) happened since
    /// free memory was last given back to the kernel.
    trim_due: bool,
    /// When to give memory back, if the agent stays idle until then.
    trim_at: Option<u64>,
    /// Describing devices for the log waits until then (a call was just started).
    settle_until: u64,
}

/// How long after starting a child the loop leaves work that can wait (describing devices).
const SETTLE_MS: u64 = 5;

impl Loop {
    /// Everything up to coldplug: signals, socket, rules, workers; then the coldplug itself.
    fn start(opts: RunOptions) -> Result<Loop, Failure> {
        let start = Instant::now();
        let sigfd = block_signals()?;
        if let Err(e) = crate::spawn::cloexec_inherited_fds() {
            warning!("cannot mark inherited fds close-on-exec: {e}");
        }
        // The socket first, so nothing that happens during coldplug is missed.
        let socket = open_socket(opts.rcvbuf)?;
        let sysfs = Arc::new(Sysfs::new(&opts.sysfs).map_err(|e| Failure::fatal(format!("sysfs: {e}")))?);
        let rules = initial_rules(&opts.load_rules)?;
        match &opts.qubesdb {
            Some(db) => info!("a ready device is called once Qubes publishes it in qubesdb, awaited with {db}"),
            None => info!("qubesdb publication is not awaited (--no-qubesdb, or no qubesdb here)"),
        }
        let (wake, wake_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| Failure::fatal(format!("pipe: {}", e.desc())))?;
        let shared = Arc::new(Shared {
            prober: Prober { sysfs: sysfs.clone(), dev: opts.dev.clone(), nodes: Nodes::Real, qubesdb: opts.qubesdb },
            caller: caller(&opts.client, opts.dry_run),
            wake: wake_tx,
        });
        let (results, finished) = mpsc::channel();
        let mut pool = Pool::new(opts.workers, opts.probe_deadline, shared.clone(), results);
        for _ in 0..pool.size {
            pool.spawn_worker().map_err(|e| Failure::fatal(format!("cannot start probe workers: {e}")))?;
        }
        let mut agent = Loop {
            engine: Engine::new(rules, opts.config),
            children: Children::default(),
            refused: RefusalLog::default(),
            malformed: RateLimited::default(),
            pool,
            finished,
            watches: opts.watch.map(|connect| Watches { connect, conn: None, keys: BTreeMap::new(), retry_at: None }),
            socket,
            sigfd,
            wake,
            sysfs,
            shared,
            load_rules: opts.load_rules,
            child_bound: opts.child_bound,
            start,
            // The kernel's uevents are at most 2 KiB of variables plus the header line; a
            // larger datagram is reported (MSG_TRUNC), not half-read.
            buf: vec![0u8; 8 * 1024],
            fx: Vec::new(),
            trim_due: true,
            trim_at: None,
            settle_until: 0,
        };
        agent.coldplug();
        Ok(agent)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn coldplug(&mut self) {
        let now = self.now();
        if let Some(watches) = &mut self.watches {
            watches.reconnect(now);
        }
        let mut fx = std::mem::take(&mut self.fx);
        let present = self.engine.resync(&self.sysfs, now, &mut fx);
        self.apply(&mut fx);
        self.engine.describe(&self.sysfs);
        info!("coldplug: {present} device(s) present, {} matched", self.engine.tracked());
        if present == 0 {
            // Every qube has a disk: an empty listing means sysfs could not be read (not
            // mounted, or reads refused by a sandbox), which would otherwise look like quiet.
            warning!(
                "{} lists no block or USB device at all: is sysfs mounted there, and readable by this user \
                 (a unit's seccomp or mount settings)? No device will be matched until it is",
                crate::log::Escaped(self.sysfs.root().as_os_str().as_encoded_bytes())
            );
        }
    }

    /// Carries out the engine's effects (and those they lead to) until none are left.
    fn apply(&mut self, fx: &mut Vec<Effect>) {
        self.trim_due |= !fx.is_empty();
        while !fx.is_empty() {
            let now = self.now();
            for effect in std::mem::take(fx) {
                match effect {
                    Effect::Probe(job) => self.pool.pending.push_back(job),
                    Effect::Call { call, device, ticket } => {
                        let result = self.shared.caller.call(&call);
                        self.started(call, device, result, ticket, fx);
                    }
                    Effect::Watch(key) => {
                        if let Some(w) = &mut self.watches {
                            w.add(key, now);
                        }
                    }
                    Effect::Unwatch(key) => {
                        if let Some(w) = &mut self.watches {
                            w.remove(&key, now);
                        }
                    }
                }
            }
            self.pool.dispatch(now);
        }
    }

    /// Logs how starting a call went, and tracks the child; a printed call (dry run) has
    /// returned at once.
    fn started(&mut self, call: Call, device: String, result: Started, ticket: Option<Ticket>, fx: &mut Vec<Effect>) {
        let now = self.now();
        match result {
            Ok(Some(pid)) => {
                info!("{device}: calling {call} (pid {pid})");
                self.children.add(pid, call.service_arg(), device, now, ticket);
                self.settle_until = now + SETTLE_MS;
            }
            Ok(None) => {
                info!("{device}: would call {call} (dry run)");
                if let Some(ticket) = ticket {
                    self.engine.on_call_exit(&ticket, true, fx);
                }
            }
            Err(e) => {
                let program = self.shared.caller.spawner.program().to_string_lossy();
                error!("{device}: cannot run {program}: {}", e.desc());
            }
        }
    }

    /// One iteration: wait for something to do (socket, signals, finished probes, qubesdb
    /// watches, timers) and do it.
    fn turn(&mut self) -> Result<Flow, Failure> {
        self.set_aside_stuck_probes();
        let now = self.now();
        let settling = self.settle_until > now && self.engine.undescribed();
        if self.pool.in_flight() == 0 && !settling {
            self.engine.describe(&self.sysfs);
        }
        let mut timeout = self.poll_timeout(now, settling);
        if timeout == PollTimeout::NONE && self.pool.pending.is_empty() {
            // Idle with nothing scheduled: what startup, a match or a reload freed goes back to
            // the kernel once the agent has stayed idle TRIM_AFTER_IDLE, so an idle agent keeps
            // only what it uses and a burst of events never waits on pages given back between
            // two of its events. Activity since the last trim restarts the wait.
            if std::mem::take(&mut self.trim_due) {
                self.trim_at = Some(now + TRIM_AFTER_IDLE.as_millis() as u64);
            }
            match self.trim_at {
                Some(at) if at <= now => {
                    self.trim_at = None;
                    release_free_memory();
                }
                Some(at) => timeout = PollTimeout::try_from((at - now) as i32).unwrap_or(PollTimeout::MAX),
                None => {}
            }
        }
        let [sock, sig, wake, watch] = self.wait(timeout)?;
        if sock {
            self.receive();
        }
        if wake {
            self.collect();
        }
        if watch {
            self.watch_events();
        }
        if sig && self.signals() {
            let stuck = self.pool.in_flight() + self.pool.set_aside;
            info!("exiting; {} call(s) still running are left alone", self.children.len());
            if stuck > 0 {
                warning!(
                    "{stuck} probe(s) still running: a read stuck in the kernel keeps the process from ending \
                     until it returns"
                );
            }
            return Ok(Flow::Stop);
        }
        if sig {
            self.reap();
        }
        self.timers();
        Ok(Flow::Go)
    }

    /// The poll timeout: the earliest of the engine's timers, overdue children, the refusal
    /// summary, the settle pause, probe deadlines and a qubesdb reconnect.
    fn poll_timeout(&self, now: u64, settling: bool) -> PollTimeout {
        let wake = [
            self.engine.next_wake(),
            self.children.next_overdue(self.child_bound),
            self.refused.next_report(),
            self.malformed.next_report(),
            settling.then_some(self.settle_until),
            self.pool.next_deadline(),
            self.watches.as_ref().and_then(|w| w.retry_at),
        ]
        .into_iter()
        .flatten()
        .min();
        match wake {
            Some(at) => PollTimeout::try_from(at.saturating_sub(now).min(60_000) as i32).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        }
    }

    /// Waits in poll; returns which of socket, signals, wake pipe, qubesdb watch are ready.
    fn wait(&self, timeout: PollTimeout) -> Result<[bool; 4], Failure> {
        let watch = self.watches.as_ref().and_then(|w| w.conn.as_ref()).map(|c| c.fd());
        let mut fds = [
            PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(watch.unwrap_or(self.wake.as_fd()), PollFlags::POLLIN),
        ];
        let n = if watch.is_some() { 4 } else { 3 };
        match poll(&mut fds[..n], timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(Failure::fatal(format!("poll: {}", e.desc()))),
        }
        let ready = |i: usize| i < n && fds[i].revents().is_some_and(|r| !r.is_empty());
        Ok([ready(0), ready(1), ready(2), ready(3)])
    }

    /// Reads a bounded batch of datagrams, so signals and results are never starved by a
    /// storm; each matching event's probe is handed to a worker before the next is read.
    fn receive(&mut self) {
        let mut fx = std::mem::take(&mut self.fx);
        for _ in 0..256 {
            let now = self.now();
            match self.socket.recv(&mut self.buf) {
                Ok(Received::Kernel(datagram)) => match Uevent::parse(datagram) {
                    Ok(event) => {
                        let (devpath, subsystem) = (Escaped::str(event.devpath), Escaped::str(event.subsystem));
                        debug!("uevent {} {devpath} ({subsystem})", event.action);
                        self.engine.on_event(&self.sysfs, &event, now, &mut fx);
                    }
                    Err(e) if self.malformed.note(now) => warning!("dropped a malformed uevent: {e}"),
                    Err(e) => debug!("dropped a malformed uevent: {e}"),
                },
                Ok(Received::Refused(sender)) => self.refused.note(sender, now),
                Ok(Received::Truncated(len)) if self.malformed.note(now) => {
                    warning!("dropped a uevent of {len} bytes: larger than the {} byte buffer", self.buf.len())
                }
                Ok(Received::Truncated(len)) => debug!("dropped a uevent of {len} bytes"),
                Ok(Received::Overflow) => {
                    warning!("the receive buffer overflowed and events were lost: rescanning sysfs");
                    self.engine.resync(&self.sysfs, now, &mut fx);
                }
                Ok(Received::Empty) => break,
                Err(e) => {
                    warning!("receiving uevents: {e}");
                    break;
                }
            }
            if !fx.is_empty() {
                self.apply(&mut fx);
            }
        }
        self.fx = fx;
    }

    /// Takes the outcomes of finished probes: logs and tracks the calls the workers made,
    /// and tells the engine.
    fn collect(&mut self) {
        let mut drain = [0u8; 256];
        while matches!(nix::unistd::read(&self.wake, &mut drain), Ok(n) if n > 0) {}
        let mut fx = std::mem::take(&mut self.fx);
        let mut registered = false;
        while let Ok(Finished { worker, outcome }) = self.finished.try_recv() {
            self.trim_due = true;
            self.pool.finished(worker);
            let carried = outcome.carried(Result::is_ok);
            let Outcome { epoch, devpath, verdict, made } = outcome;
            let device = match self.engine.identity(epoch, &devpath) {
                Some(who) => who.to_owned(),
                None => Escaped::str(&devpath).to_string(),
            };
            self.engine.on_verdict(epoch, &devpath, verdict, carried, self.now(), &mut fx);
            if let Some(Ok((call, result))) = made {
                registered |= matches!(result, Ok(Some(_)));
                let ticket = Ticket { epoch, devpath: devpath.into() };
                self.started(call, device, result, Some(ticket), &mut fx);
            }
        }
        // A child registered now may already have exited, its SIGCHLD read by an earlier turn
        // (the worker spawns it before its outcome arrives here): reap after registering too.
        if registered {
            self.reap_into(&mut fx);
        }
        self.apply(&mut fx);
        self.fx = fx;
        // Workers came back: queued probes go to them now.
        let now = self.now();
        self.pool.dispatch(now);
    }

    /// Paths qubesdb reported changed: devices waiting for them are probed again.
    fn watch_events(&mut self) {
        let now = self.now();
        let Some(watches) = &mut self.watches else { return };
        let mut paths = Vec::new();
        let result = watches.conn.as_mut().map(|c| c.changed(&mut paths));
        if let Some(Err(e)) = result {
            watches.lost(&e, now);
        }
        let mut fx = std::mem::take(&mut self.fx);
        for path in &paths {
            self.engine.on_published(path, now, &mut fx);
        }
        self.apply(&mut fx);
        self.fx = fx;
    }

    /// Reads pending signals: SIGHUP reloads, SIGCHLD is left to `reap`. True on SIGTERM or
    /// SIGINT.
    fn signals(&mut self) -> bool {
        let mut stop = false;
        while let Ok(Some(info)) = self.sigfd.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGHUP) => reload(&mut self.engine, &self.load_rules),
                Ok(Signal::SIGTERM | Signal::SIGINT) => stop = true,
                _ => {}
            }
        }
        self.trim_due = true;
        stop
    }

    fn reap(&mut self) {
        let mut fx = std::mem::take(&mut self.fx);
        self.reap_into(&mut fx);
        self.apply(&mut fx);
        self.fx = fx;
    }

    /// Collects exited children, logs their exit with its meaning, and reports attach calls
    /// to the engine (a device removed meanwhile is detached then).
    fn reap_into(&mut self, fx: &mut Vec<Effect>) {
        for (child, exit) in self.children.reap() {
            let line = format!("{}: {} {exit}", child.device, child.call);
            match exit {
                Exit::Code(0) => info!("{line}"),
                _ => warning!("{line}"),
            }
            if let Some(ticket) = child.tag {
                self.engine.on_call_exit(&ticket, exit.may_have_attached(), fx);
            }
        }
    }

    /// Timers: overdue children, the refusal and malformed-event summaries, a qubesdb
    /// reconnect, the engine's own.
    fn timers(&mut self) {
        let now = self.now();
        for child in self.children.overdue(now, self.child_bound) {
            info!("{}: {} still running after {:?} (detached; left alone)", child.device, child.call, self.child_bound);
        }
        self.refused.report(now);
        if let Some(n) = self.malformed.summary(now) {
            warning!("dropped {n} more malformed or oversized uevent(s)");
        }
        let mut fx = std::mem::take(&mut self.fx);
        if let Some(w) = self.watches.as_mut().filter(|w| w.retry_at.is_some_and(|at| at <= now)) {
            for key in w.reconnect(now) {
                self.engine.on_published(&key, now, &mut fx);
            }
        }
        self.engine.on_tick(now, &mut fx);
        self.apply(&mut fx);
        self.fx = fx;
    }

    /// Sets aside the workers whose probe is past its deadline, and tells the engine.
    fn set_aside_stuck_probes(&mut self) {
        for busy in self.pool.stuck(self.now()) {
            self.engine.on_set_aside(busy.epoch, &busy.devpath, self.pool.deadline);
        }
        let now = self.now();
        self.pool.dispatch(now);
    }
}

/// Blocks the signals the loop reads from a signalfd, before any thread exists, so that all
/// threads inherit the mask and the signals reach only the signalfd.
fn block_signals() -> Result<SignalFd, Failure> {
    use nix::sys::signal::SigSet;
    use nix::sys::signalfd::SfdFlags;
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| Failure::fatal(format!("blocking signals: {}", e.desc())))?;
    SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| Failure::fatal(format!("signalfd: {}", e.desc())))
}

/// Opens the uevent socket, says what receive buffer it got, and drops every capability.
fn open_socket(rcvbuf: usize) -> Result<UeventSocket, Failure> {
    let socket = UeventSocket::open(rcvbuf).map_err(|e| Failure::fatal(e.to_string()))?;
    let (granted, forced) = socket.rcvbuf();
    info!(
        "listening for kernel uevents (receive buffer {} KiB{})",
        granted / 1024,
        if forced { "" } else { ", capped by net.core.rmem_max: run with CAP_NET_ADMIN for a larger one" }
    );
    if let Err(e) = crate::spawn::drop_capabilities() {
        warning!("cannot drop capabilities after opening the socket: {e}");
    }
    Ok(socket)
}

/// The rules at start: any error stops the agent (exit 3, not restarted), and so does a
/// source that could not be asked (exit 4: systemd starts it again), since a rule set without
/// the rules dom0 sets could attach where they would not.
fn initial_rules(load: &RuleLoader) -> Result<crate::rules::RuleSet, Failure> {
    let rules = usable_rules((load.0)()).map_err(|f| {
        let then = if f.code == crate::exit::RULES { "" } else { " (exit 4: systemd starts the agent again)" };
        Failure::new(f.code, format!("{}; nothing started{then}", f.message))
    })?;
    if rules.is_empty() {
        warning!("no rules: nothing will be attached (see `autoattach check`)");
    } else {
        info!("loaded {} rule(s)", rules.rules.len());
    }
    Ok(rules)
}

fn caller(client: &std::path::Path, dry_run: bool) -> Caller {
    let program = match crate::spawn::find_program(client) {
        Some(path) => path,
        None if dry_run => client.to_owned(),
        None => {
            warning!(
                "qrexec client {} not found or not executable: calls will fail until it is installed",
                client.display()
            );
            client.to_owned()
        }
    };
    Caller { spawner: Spawner::new(&program, Spawner::current_env()), name: client.to_owned(), dry_run }
}

/// One malloc arena for every thread (glibc gives each new thread its own, each with its own
/// dirty pages): the agent allocates little, and only off the hot path, so they would not
/// contend. Call before any thread starts.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; no other thread exists yet.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

/// How long the loop, or a worker, stays idle before it gives memory back.
const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Gives free heap pages back to the kernel (glibc keeps freed memory mapped and dirty), and
/// the loop thread's stack pages below the frame in use.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes malloc's own locks; it is safe to call from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
    release_unused_stack();
}

/// Gives back to the kernel the pages of the calling thread's stack below the frames in use.
/// A stack page, once touched, stays private dirty for the life of the thread: coldplug and a
/// probe go deep (sysfs paths and attributes in 4 KiB buffers), an idle loop or worker does
/// not, and each such page counted against the 256 kB idle budget (one device attached: the
/// loop's stack 36 kB dirty, a worker's 28 kB). The released pages read back as zeroes when
/// the thread next goes that deep, each at the cost of a page fault: hence only after
/// TRIM_AFTER_IDLE of idleness, never between the events of a burst. Nothing lives below the stack pointer here (signals
/// arrive through a signalfd, so no handler frame either); one page below this frame is
/// kept for the call itself, and the guard area is left alone. Failure costs only memory.
fn release_unused_stack() {
    thread_local! {
        /// This thread's stack as [lowest usable address, top): asked once, since glibc
        /// answers for the main thread by reading /proc/self/maps.
        static BOUNDS: Option<(usize, usize)> = stack_bounds();
    }
    let Some((start, top)) = BOUNDS.with(|b| *b) else { return };
    let page = 4096usize;
    let marker = 0u8;
    let here = std::hint::black_box(&raw const marker) as usize;
    let end = (here & !(page - 1)).saturating_sub(page);
    if end <= start || here >= top {
        return;
    }
    // SAFETY: [start, end) lies inside this thread's stack, above its guard and at least one
    // page below the current frame: no live data is there. MADV_DONTNEED on private anonymous
    // memory only drops pages; a later touch maps zeroed ones. For the main thread glibc
    // reports the stack as its rlimit-sized reservation: madvise skips the unmapped part
    // (and says ENOMEM, ignored).
    unsafe {
        nix::libc::madvise(start as *mut nix::libc::c_void, end - start, nix::libc::MADV_DONTNEED);
    }
}

/// The calling thread's stack as [lowest address above the guard, top), page-aligned.
fn stack_bounds() -> Option<(usize, usize)> {
    use nix::libc;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let (mut low, mut size, mut guard) = (std::ptr::null_mut::<libc::c_void>(), 0usize, 0usize);
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    // SAFETY: `me` is this running thread; pthread_getattr_np initialises `attr`.
    if unsafe { libc::pthread_getattr_np(me, attr.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: `attr` was initialised above; the getter writes only to the locals passed.
    let ok = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut low, &mut size) } == 0;
    // SAFETY: as above.
    let ok = ok && unsafe { libc::pthread_attr_getguardsize(attr.as_ptr(), &mut guard) } == 0;
    // SAFETY: `attr` was initialised above and is destroyed once, not used after.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    let low = low as usize;
    (ok && size > 0).then(|| ((low.saturating_add(guard)).next_multiple_of(4096), low.saturating_add(size)))
}

fn reload(engine: &mut Engine, load: &RuleLoader) {
    let parsed = (load.0)();
    let kept = engine.rules().rules.len();
    match usable_rules(parsed) {
        Ok(rules) => {
            info!("reloaded {} rule(s)", rules.rules.len());
            engine.reload(rules);
        }
        Err(f) => error!("reload refused: {}; keeping the {kept} rule(s) in use", f.message),
    }
}

/// Refused datagrams are logged once, then summarised at most every 10 s, so a local flood
/// cannot flood the journal.
#[derive(Debug, Default)]
struct RefusalLog {
    pending: u64,
    last: Option<crate::netlink::Sender>,
    next: Option<u64>,
}

impl RefusalLog {
    fn note(&mut self, sender: crate::netlink::Sender, now: u64) {
        debug!("refused a uevent from {sender}");
        if self.next.is_none() {
            warning!("refused a uevent from {sender}: only the kernel (portid 0, pid 0, uid 0) may send them");
            self.next = Some(now + 10_000);
        } else {
            self.pending += 1;
            self.last = Some(sender);
        }
    }

    fn next_report(&self) -> Option<u64> {
        self.next.filter(|_| self.pending > 0)
    }

    fn report(&mut self, now: u64) {
        match self.next {
            Some(at) if at <= now && self.pending > 0 => {
                let mut line = format!("refused {} more uevent(s) not sent by the kernel", self.pending);
                if let Some(s) = self.last {
                    let _ = write!(line, ", the last from {s}");
                }
                warning!("{line}");
                self.pending = 0;
                self.next = Some(now + 10_000);
            }
            Some(at) if at <= now => self.next = None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident kB of the mapping of this process that holds `addr` (/proc/self/smaps).
    fn resident_kb_of_mapping(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-') && !r.contains(':')) {
                let (a, b) = range.split_once('-').unwrap();
                let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
                inside = (a..b).contains(&addr);
            } else if inside && line.starts_with("Rss:") {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// Touches `depth` KiB of stack below the caller and returns a sum over it, so that the
    /// frames cannot be optimised away.
    #[inline(never)]
    fn go_deep(depth: usize) -> u64 {
        let mut block = [0u8; 1024];
        std::hint::black_box(&mut block)[0] = depth as u8;
        let below = if depth > 1 { go_deep(depth - 1) } else { 0 };
        below + u64::from(std::hint::black_box(&block)[0])
    }

    /// A thread that once went 192 KiB deep keeps those pages until it releases them; after
    /// release_unused_stack they are gone, and going deep again still works (zeroed pages).
    #[test]
    fn unused_stack_pages_are_given_back_and_the_stack_still_works() {
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                let marker = 0u8;
                let here = std::hint::black_box(&raw const marker) as usize;
                let expected: u64 = (1..=192u64).map(|d| d % 256).sum();
                assert_eq!(go_deep(192), expected);
                let deep = resident_kb_of_mapping(here);
                release_unused_stack();
                let released = resident_kb_of_mapping(here);
                assert!(deep >= 192 && released + 160 <= deep, "resident {deep} kB when deep, {released} kB after");
                assert_eq!(go_deep(192), expected);
                assert!(resident_kb_of_mapping(here) >= 192, "going deep again maps the pages again");
            })
            .unwrap()
            .join()
            .unwrap();
    }
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A watcher that records what it is asked, and fails when told to.
    struct Fake {
        log: Rc<RefCell<Vec<String>>>,
        fd: OwnedFd,
        fail: bool,
    }

    impl Watcher for Fake {
        fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
        fn watch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError> {
            self.log.borrow_mut().push(format!("watch {key}"));
            if self.fail {
                let socket = PathBuf::from("fake");
                return Err(crate::qubesdb::QdbError::Closed { socket, key: key.into() });
            }
            Ok(())
        }
        fn unwatch(&mut self, key: &str) -> Result<(), crate::qubesdb::QdbError> {
            self.log.borrow_mut().push(format!("unwatch {key}"));
            Ok(())
        }
        fn changed(&mut self, _: &mut Vec<String>) -> Result<(), crate::qubesdb::QdbError> {
            Ok(())
        }
    }

    /// Keys are watched once however many devices wait for them, unwatched with the last;
    /// a lost connection is made again later, every key watched again and reported as
    /// changed (a publication may have happened meanwhile).
    #[test]
    fn watches_are_counted_and_restored_after_a_lost_connection() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let fail = Rc::new(RefCell::new(false));
        let (l, f) = (log.clone(), fail.clone());
        let connect = Connect(Box::new(move || {
            let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
            Ok(Box::new(Fake { log: l.clone(), fd, fail: *f.borrow() }) as Box<dyn Watcher>)
        }));
        let mut w = Watches { connect, conn: None, keys: BTreeMap::new(), retry_at: None };
        assert!(w.reconnect(0).is_empty());
        w.add("/qubes-block-devices/sdb/".into(), 0);
        w.add("/qubes-block-devices/sdb/".into(), 0);
        w.add("/qubes-usb-devices/2-1/".into(), 0);
        w.remove("/qubes-block-devices/sdb/", 0);
        assert_eq!(*log.borrow(), ["watch /qubes-block-devices/sdb/", "watch /qubes-usb-devices/2-1/"]);
        *fail.borrow_mut() = true;
        w.conn = None;
        assert!(w.reconnect(100).is_empty(), "the watch failed: nothing to report yet");
        assert_eq!(w.retry_at, Some(100 + RECONNECT_MS));
        *fail.borrow_mut() = false;
        log.borrow_mut().clear();
        let again = w.reconnect(1100);
        assert_eq!(again, ["/qubes-block-devices/sdb/", "/qubes-usb-devices/2-1/"]);
        assert_eq!(*log.borrow(), ["watch /qubes-block-devices/sdb/", "watch /qubes-usb-devices/2-1/"]);
        w.remove("/qubes-block-devices/sdb/", 1200);
        assert_eq!(log.borrow().last().unwrap(), "unwatch /qubes-block-devices/sdb/");
        assert_eq!(w.retry_at, None);
    }
}
