//! The agent: coldplug, events, readiness, one call per appearance, limits, reload, resync.
//!
//! [`Engine`] is the decision logic with time as an input: events and probe verdicts go in,
//! [`Effect`]s (probe this, call that) come out. `run` drives it from the kernel socket with
//! worker threads for probes and real time; `replay` drives the same engine from a fixture
//! with inline probes and virtual time, so the tests exercise the real pipeline.
//!
//! A device is tracked from the event that first matches a rule until its `remove`:
//! - it is probed until ready (retries with backoff, bounded by the rule's timeout), or, with
//!   no media, until the kernel announces media with a `change`;
//! - when ready it is called once; later `add`/`change` events for it do nothing, unless an
//!   `add` shows a new generation (DISKSEQ, USB DEVNUM): then its `remove` was lost and this
//!   is a new device;
//! - `remove` forgets it (and cancels a wait); a device that comes back is called again.
//!
//! Flapping devices are held back by a per-device debounce (a device must stay present that
//! long before it is called) and a per-rule rate limit (at most N calls per window).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::names::{ATTACH_SERVICE, Call, DETACH_SERVICE, Kind};
use crate::netlink::{Received, UeventSocket};
use crate::readiness::{Prober, Target, Verdict};
use crate::rules::{Matcher, Parsed, RuleSet};
use crate::sysfs::Sysfs;
use crate::uevent::{Action, Uevent};

/// Defaults for rules that do not set their own.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long to wait for readiness.
    pub timeout: Duration,
    /// How long a device must stay before it is called (0: at once).
    pub debounce: Duration,
    /// At most this many calls per window, per rule.
    pub rate_limit: Option<(u32, Duration)>,
    /// Call custom.USBDeviceDetach when an attached block device is removed. Qubes R4.1 and
    /// R4.2 leave the dead disk attached to the target otherwise (see dom0/README.md); USB
    /// devices are detached by Qubes itself and never get this call.
    pub detach: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            timeout: Duration::from_secs(30),
            debounce: Duration::ZERO,
            rate_limit: Some((10, Duration::from_secs(60))),
            detach: true,
        }
    }
}

/// What the engine asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Check readiness, then report with [`Engine::on_verdict`].
    Probe { epoch: u64, target: Target },
    /// Make this call.
    Call { call: Call, device: String },
}

#[derive(Debug)]
enum State {
    Waiting {
        deadline: u64,
        next: u64,
        backoff: u64,
        probing: bool,
        again: bool,
    },
    NoMedia,
    GaveUp,
    /// Ready; held back by the debounce until `at`.
    Settling {
        at: u64,
    },
    /// Handled: `called` if the attach call was made (not refused or rate-limited).
    Done {
        called: bool,
    },
}

#[derive(Debug)]
struct Entry {
    /// Distinguishes this appearance from an earlier one at the same devpath.
    epoch: u64,
    target: Target,
    qube: Box<str>,
    rule: String,
    identity: String,
    generation: Option<Box<str>>,
    appeared: u64,
    timeout: u64,
    debounce: u64,
    rate: Option<(u32, Duration)>,
    state: State,
}

/// A rule's recent calls, and the calls its rate limit dropped since it last said so.
#[derive(Debug, Default)]
struct RateWindow {
    times: VecDeque<u64>,
    window: u64,
    dropped: u32,
}

impl RateWindow {
    /// When the oldest call leaves the window (a call is allowed again), if calls were dropped.
    fn frees_at(&self) -> Option<u64> {
        (self.dropped > 0).then(|| self.times.front().map_or(0, |t| t + self.window))
    }
}

/// The decision logic.
#[derive(Debug)]
pub struct Engine {
    rules: RuleSet,
    matcher: Matcher,
    config: Config,
    /// Tracked devices by devpath (ordered, so replay is deterministic).
    devices: BTreeMap<Box<str>, Entry>,
    /// Call times and held-back calls per rule, for the rate limit.
    calls: BTreeMap<String, RateWindow>,
    epochs: u64,
}

const FIRST_BACKOFF: u64 = 20;
const MAX_BACKOFF: u64 = 1000;

/// The kind of attachment an event's device gets, if it can be attached at all.
pub fn attachable(event: &Uevent<'_>) -> Option<Kind> {
    match (event.subsystem, event.devtype()) {
        ("block", Some("disk" | "partition")) => Some(Kind::Block),
        ("usb", Some("usb_device")) => Some(Kind::Usb),
        _ => None,
    }
}

impl Engine {
    pub fn new(rules: RuleSet, config: Config) -> Engine {
        Engine {
            matcher: Matcher::new(&rules),
            rules,
            config,
            devices: BTreeMap::new(),
            calls: BTreeMap::new(),
            epochs: 0,
        }
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Replaces the rules; tracked devices keep what their rule said when they matched.
    pub fn reload(&mut self, rules: RuleSet) {
        self.matcher = Matcher::new(&rules);
        self.rules = rules;
    }

    /// How many devices are tracked.
    pub fn tracked(&self) -> usize {
        self.devices.len()
    }

    /// Handles one event. Allocates nothing for an event that matches no rule.
    pub fn on_event(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut Vec<Effect>) {
        match event.action {
            Action::Remove => {
                if let Some(entry) = self.devices.remove(event.devpath) {
                    match entry.state {
                        State::Done { .. } => info!("{}: removed", entry.identity),
                        _ => info!("{}: removed before it was attached", entry.identity),
                    }
                    self.detach(entry, out);
                }
            }
            Action::Move => {
                let old = event.get("DEVPATH_OLD").and_then(|old| self.devices.remove(old));
                if let Some(mut entry) = old {
                    entry.target.devpath = event.devpath.to_owned();
                    self.devices.insert(event.devpath.into(), entry);
                }
            }
            Action::Add | Action::Change | Action::Bind | Action::Online => self.appear(sysfs, event, now, out),
            Action::Offline | Action::Unbind => {}
        }
    }

    /// The Detach call for a removed device, if it is a block device this agent attached.
    fn detach(&self, entry: Entry, out: &mut Vec<Effect>) {
        if !(matches!(entry.state, State::Done { called: true })
            && entry.target.kind == Kind::Block
            && self.config.detach)
        {
            return;
        }
        info!("{}: detaching it from {}", entry.identity, entry.qube);
        if let Ok(call) = Call::new(DETACH_SERVICE, &entry.qube, Kind::Block, &entry.target.dev) {
            out.push(Effect::Call { call, device: entry.identity });
        }
    }

    fn appear(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut Vec<Effect>) {
        if let Some(entry) = self.devices.get_mut(event.devpath) {
            let generation = generation(event);
            let replaced =
                event.action == Action::Add && generation.is_some() && generation != entry.generation.as_deref();
            if !replaced {
                return Self::update(entry, event, now, out);
            }
            info!("{}: replaced by a new device at the same place (its removal was missed)", entry.identity);
            self.devices.remove(event.devpath);
        }
        let Some(kind) = attachable(event) else {
            return;
        };
        let Some(index) = self.matcher.first_match(sysfs, &self.rules, event) else {
            return;
        };
        let rule = &self.rules.rules[index];
        let dev = match kind {
            Kind::Block => event.get("DEVNAME").unwrap_or_else(|| event.kernel()),
            Kind::Usb => event.kernel(),
        };
        let identity = sysfs.identity(event.devpath).to_string();
        info!("{identity}: matches {} (ATTACH=\"{}\")", rule.location(), rule.attach);
        self.epochs += 1;
        let target = Target {
            kind,
            devpath: event.devpath.to_owned(),
            dev: dev.to_owned(),
            devnum: event.devnum(),
            bound: event.action == Action::Bind,
        };
        let timeout = rule.timeout.unwrap_or(self.config.timeout).as_millis() as u64;
        // A name that could never be sent is refused now, once, not after waiting for it.
        let state = match Call::new(ATTACH_SERVICE, &rule.attach, kind, dev) {
            Ok(_) => {
                out.push(Effect::Probe { epoch: self.epochs, target: target.clone() });
                State::Waiting {
                    deadline: now + timeout,
                    next: now,
                    backoff: FIRST_BACKOFF,
                    probing: true,
                    again: false,
                }
            }
            Err(e) => {
                error!("{identity}: not attached: {e}");
                State::Done { called: false }
            }
        };
        self.devices.insert(
            event.devpath.into(),
            Entry {
                epoch: self.epochs,
                target,
                qube: rule.attach.clone(),
                rule: rule.location(),
                identity,
                generation: generation(event).map(Into::into),
                appeared: now,
                timeout,
                debounce: rule.debounce.unwrap_or(self.config.debounce).as_millis() as u64,
                rate: rule.rate_limit.or(self.config.rate_limit),
                state,
            },
        );
    }

    /// A later event for a tracked device: it may now be ready (media, driver bound).
    fn update(entry: &mut Entry, event: &Uevent<'_>, now: u64, out: &mut Vec<Effect>) {
        if event.action == Action::Bind {
            entry.target.bound = true;
        }
        match &mut entry.state {
            State::Waiting { probing: true, again, .. } => *again = true,
            State::Waiting { next, .. } => *next = now,
            State::NoMedia | State::GaveUp => {
                if event.media_change() {
                    info!("{}: media changed", entry.identity);
                }
                entry.state = State::Waiting {
                    deadline: now + entry.timeout,
                    next: now,
                    backoff: FIRST_BACKOFF,
                    probing: true,
                    again: false,
                };
                out.push(Effect::Probe { epoch: entry.epoch, target: entry.target.clone() });
            }
            State::Settling { .. } | State::Done { .. } => {}
        }
    }

    /// A probe's answer.
    pub fn on_verdict(&mut self, epoch: u64, devpath: &str, verdict: Verdict, now: u64, out: &mut Vec<Effect>) {
        let Some(entry) = self.devices.get_mut(devpath).filter(|e| e.epoch == epoch) else {
            return;
        };
        let State::Waiting { deadline, next, backoff, probing, again } = &mut entry.state else {
            return;
        };
        *probing = false;
        match verdict {
            Verdict::Ready if entry.debounce > 0 && now < entry.appeared + entry.debounce => {
                let at = entry.appeared + entry.debounce;
                info!("{}: ready; debounce: calling in {} ms if it stays", entry.identity, at - now);
                entry.state = State::Settling { at };
            }
            Verdict::Ready => self.call(devpath, now, out),
            Verdict::Wait(_) if *again => {
                *again = false;
                *next = now;
            }
            Verdict::Wait(why) if now >= *deadline => {
                warning!(
                    "{}: gave up after {} ms: {why} (it will be tried again on its next change event)",
                    entry.identity,
                    entry.timeout
                );
                entry.state = State::GaveUp;
            }
            Verdict::Wait(why) => {
                debug!("{}: {why}; trying again in {} ms", entry.identity, *backoff);
                *next = now + *backoff;
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            }
            Verdict::NoMedia(why) => {
                info!("{}: {why}; waiting for media", entry.identity);
                entry.state = State::NoMedia;
            }
            Verdict::Gone => {
                debug!("{}: gone before it was ready", entry.identity);
                self.devices.remove(devpath);
            }
        }
    }

    /// Makes the call for a ready device, if its rule's rate limit allows.
    fn call(&mut self, devpath: &str, now: u64, out: &mut Vec<Effect>) {
        let Some(entry) = self.devices.get_mut(devpath) else {
            return;
        };
        entry.state = State::Done { called: false };
        if let Some((count, window)) = entry.rate {
            let rate = self.calls.entry(entry.rule.clone()).or_default();
            rate.window = window.as_millis() as u64;
            Self::expire(&entry.rule, rate, now);
            if rate.times.len() >= count as usize {
                if rate.dropped == 0 {
                    warning!(
                        "{}: not attached: rule {} reached its rate limit of {count} calls per {}s (plug it again later; \
                         further calls held back now are counted)",
                        entry.identity,
                        entry.rule,
                        window.as_secs()
                    );
                } else {
                    debug!("{}: not attached: rate limit of rule {}", entry.identity, entry.rule);
                }
                rate.dropped += 1;
                return;
            }
            rate.times.push_back(now);
        }
        match Call::new(ATTACH_SERVICE, &entry.qube, entry.target.kind, &entry.target.dev) {
            Ok(call) => {
                entry.state = State::Done { called: true };
                out.push(Effect::Call { call, device: entry.identity.clone() });
            }
            Err(e) => error!("{}: not attached: {e}", entry.identity),
        }
    }

    /// Forgets calls that left the window; says how many were dropped once a call is allowed
    /// again.
    fn expire(rule: &str, rate: &mut RateWindow, now: u64) {
        if rate.frees_at().is_some_and(|at| at <= now) {
            if rate.dropped > 1 {
                warning!("rule {rule}: {} more call(s) were held back by its rate limit", rate.dropped - 1);
            }
            rate.dropped = 0;
        }
        while rate.times.front().is_some_and(|&t| t + rate.window <= now) {
            rate.times.pop_front();
        }
    }

    /// Timers: probes due again, debounces over, rate-limit summaries.
    pub fn on_tick(&mut self, now: u64, out: &mut Vec<Effect>) {
        for (rule, rate) in &mut self.calls {
            Self::expire(rule, rate, now);
        }
        let mut settled = Vec::new();
        for (devpath, entry) in &mut self.devices {
            match &mut entry.state {
                State::Waiting { next, probing: probing @ false, .. } if *next <= now => {
                    *probing = true;
                    out.push(Effect::Probe { epoch: entry.epoch, target: entry.target.clone() });
                }
                State::Settling { at } if *at <= now => settled.push(devpath.clone()),
                _ => {}
            }
        }
        for devpath in settled {
            self.call(&devpath, now, out);
        }
    }

    /// When [`Engine::on_tick`] next has something to do.
    pub fn next_wake(&self) -> Option<u64> {
        let devices = self.devices.values().filter_map(|e| match e.state {
            State::Waiting { next, probing: false, .. } => Some(next),
            State::Settling { at } => Some(at),
            _ => None,
        });
        devices.chain(self.calls.values().filter_map(RateWindow::frees_at)).min()
    }

    /// Rescans sysfs after events were lost (and at startup): devices that vanished are
    /// forgotten; every present one is handled as an `add`, so unknown and replaced devices
    /// are matched and devices still waiting for media are probed again.
    pub fn resync(&mut self, sysfs: &Sysfs, now: u64, out: &mut Vec<Effect>) -> usize {
        let present = sysfs.scan();
        let vanished: Vec<Box<str>> =
            self.devices.keys().filter(|k| present.binary_search_by(|p| p.as_str().cmp(k)).is_err()).cloned().collect();
        for devpath in vanished {
            if let Some(entry) = self.devices.remove(&devpath) {
                warning!("{}: vanished while events were lost; forgotten", entry.identity);
                self.detach(entry, out);
            }
        }
        for devpath in &present {
            let Some(datagram) = synthetic_add(sysfs, devpath) else {
                continue;
            };
            let Ok(event) = Uevent::parse(&datagram) else {
                continue;
            };
            // As an `add`: a device handled stays handled, one of a new generation is new, and
            // one waiting for media is probed again (its media `change` may be what was lost).
            self.on_event(sysfs, &event, now, out);
        }
        present.len()
    }
}

/// What tells two devices at the same devpath apart: the disk sequence number of a block
/// device, the USB device number.
fn generation<'a>(event: &Uevent<'a>) -> Option<&'a str> {
    event.get("DISKSEQ").or_else(|| event.get("DEVNUM"))
}

/// An `add` datagram for a present device, built from its `uevent` file (as coldplug does).
pub fn synthetic_add(sysfs: &Sysfs, devpath: &str) -> Option<Vec<u8>> {
    let uevent = sysfs.uevent_file(devpath).ok()?;
    let mut buf = [0u8; crate::sysfs::MAX_ATTR];
    let subsystem = sysfs.link(devpath, "subsystem", &mut buf)?.to_vec();
    let mut datagram = format!("add@{devpath}\0ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=").into_bytes();
    datagram.extend_from_slice(&subsystem);
    datagram.push(0);
    for line in uevent.split(|&b| b == b'\n').filter(|l| l.contains(&b'=')) {
        let key = &line[..line.iter().position(|&b| b == b'=').unwrap_or(0)];
        if matches!(key, b"ACTION" | b"DEVPATH" | b"SUBSYSTEM") {
            continue;
        }
        datagram.extend_from_slice(line);
        datagram.push(0);
    }
    datagram.extend_from_slice(b"SYNTH_UUID=0\0");
    Some(datagram)
}

// ---------------------------------------------------------------------------------------------
// The run loop

/// Everything `autoattach run` needs.
#[derive(Debug)]
pub struct RunOptions {
    pub sysfs: PathBuf,
    pub dev: PathBuf,
    pub load_rules: RuleLoader,
    pub client: PathBuf,
    pub qubesdb: Option<crate::readiness::Qubesdb>,
    pub dry_run: bool,
    pub config: Config,
    pub rcvbuf: usize,
    /// After this long a child is logged as still running (and left alone).
    pub child_bound: Duration,
    pub workers: usize,
}

/// Reads the rules from wherever they come from (called at start and on SIGHUP).
pub struct RuleLoader(pub Box<dyn Fn() -> Parsed + Send>);

impl std::fmt::Debug for RuleLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleLoader")
    }
}

/// A failure to start, with the exit code that tells systemd why.
#[derive(Debug)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

pub const EXIT_RULES: u8 = 3;
pub const EXIT_STARTUP: u8 = 4;

fn fatal(code: u8) -> impl Fn(String) -> Fatal {
    move |message| Fatal { code, message }
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

struct Job {
    epoch: u64,
    target: Target,
}

struct Outcome {
    epoch: u64,
    devpath: String,
    verdict: Verdict,
}

/// Probe workers: blocking checks off the loop, results back through a channel and a pipe
/// that wakes `poll`.
struct Workers {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Outcome>,
    wake: OwnedFd,
}

impl Workers {
    fn start(prober: Arc<Prober>, count: usize) -> Result<Workers, Fatal> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (result_tx, results) = mpsc::channel();
        let (wake, wake_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| fatal(EXIT_STARTUP)(format!("pipe: {}", e.desc())))?;
        let job_rx = Arc::new(Mutex::new(job_rx));
        let wake_tx = Arc::new(wake_tx);
        for n in 0..count.max(1) {
            let (job_rx, result_tx, wake_tx, prober) =
                (job_rx.clone(), result_tx.clone(), wake_tx.clone(), prober.clone());
            std::thread::Builder::new()
                .name(format!("probe-{n}"))
                .spawn(move || {
                    loop {
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(Job { epoch, target }) = job else {
                            return;
                        };
                        let verdict = prober.check(&target);
                        if result_tx.send(Outcome { epoch, devpath: target.devpath, verdict }).is_err() {
                            return;
                        }
                        let _ = nix::unistd::write(wake_tx.as_fd(), b"!");
                    }
                })
                .map_err(|e| fatal(EXIT_STARTUP)(format!("cannot start probe threads: {e}")))?;
        }
        Ok(Workers { jobs, results, wake })
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: RunOptions) -> Result<(), Fatal> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    let start = Instant::now();
    let now = || start.elapsed().as_millis() as u64;

    // Signals arrive on a signalfd; block them before any thread exists so all inherit that.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| fatal(EXIT_STARTUP)(format!("blocking signals: {}", e.desc())))?;
    let sigfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| fatal(EXIT_STARTUP)(format!("signalfd: {}", e.desc())))?;
    if let Err(e) = crate::spawn::cloexec_inherited_fds() {
        warning!("cannot mark inherited fds close-on-exec: {e}");
    }

    // The socket first, so nothing that happens during coldplug is missed.
    let socket = UeventSocket::open(opts.rcvbuf).map_err(|e| fatal(EXIT_STARTUP)(e.to_string()))?;
    let (granted, forced) = socket.rcvbuf();
    info!(
        "listening for kernel uevents (receive buffer {} KiB{})",
        granted / 1024,
        if forced { "" } else { ", capped by net.core.rmem_max: run with CAP_NET_ADMIN for a larger one" }
    );
    let sysfs = Arc::new(Sysfs::new(&opts.sysfs).map_err(|e| fatal(EXIT_STARTUP)(format!("sysfs: {e}")))?);

    let parsed = (opts.load_rules.0)();
    if !report_rules(&parsed) {
        return Err(fatal(EXIT_RULES)(format!("{} error(s) in the rules; nothing started", parsed.errors.len())));
    }
    if parsed.set.is_empty() {
        warning!("no rules: nothing will be attached (see `autoattach check`)");
    } else {
        info!("loaded {} rule(s)", parsed.set.rules.len());
    }

    let client_name = opts.client.clone();
    let client = match crate::spawn::find_program(&opts.client) {
        Some(path) => path,
        None if opts.dry_run => opts.client.clone(),
        None => {
            warning!(
                "qrexec client {} not found or not executable: calls will fail until it is installed",
                opts.client.display()
            );
            opts.client.clone()
        }
    };
    let spawner = crate::spawn::Spawner::new(&client, crate::spawn::Spawner::current_env());
    let prober = Arc::new(Prober {
        sysfs: sysfs.clone(),
        dev: opts.dev.clone(),
        nodes: crate::readiness::Nodes::Real,
        qubesdb: opts.qubesdb.clone(),
    });
    let workers = Workers::start(prober, opts.workers)?;
    let mut engine = Engine::new(parsed.set, opts.config.clone());
    let mut children = crate::spawn::Children::default();
    let mut effects: Vec<Effect> = Vec::with_capacity(64);
    let mut buf = vec![0u8; 16 * 1024];
    let mut refused = RefusalLog::default();

    let present = engine.resync(&sysfs, now(), &mut effects);
    info!("coldplug: {present} device(s) present, {} matched", engine.tracked());

    loop {
        perform(&mut effects, &workers, &spawner, &client_name, opts.dry_run, &mut children, now());
        let wake = [engine.next_wake(), children.next_overdue(opts.child_bound), refused.next_report()]
            .into_iter()
            .flatten()
            .min();
        let timeout = match wake {
            Some(at) => PollTimeout::try_from(at.saturating_sub(now()).min(60_000) as i32).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(workers.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(fatal(EXIT_STARTUP)(format!("poll: {}", e.desc()))),
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (sock_ready, sig_ready, wake_ready) = (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]));

        if sock_ready {
            // A bounded batch, so signals and results are never starved by a storm.
            for _ in 0..256 {
                match socket.recv(&mut buf) {
                    Ok(Received::Kernel(datagram)) => match Uevent::parse(datagram) {
                        Ok(event) => {
                            debug!("uevent {} {} ({})", event.action, event.devpath, event.subsystem);
                            engine.on_event(&sysfs, &event, now(), &mut effects)
                        }
                        Err(e) => warning!("dropped a malformed uevent: {e}"),
                    },
                    Ok(Received::Refused(sender)) => refused.note(sender, now()),
                    Ok(Received::Truncated(len)) => {
                        warning!("dropped a uevent of {len} bytes: larger than the {} byte buffer", buf.len())
                    }
                    Ok(Received::Overflow) => {
                        warning!("the receive buffer overflowed and events were lost: rescanning sysfs");
                        engine.resync(&sysfs, now(), &mut effects);
                    }
                    Ok(Received::Empty) => break,
                    Err(e) => {
                        warning!("receiving uevents: {e}");
                        break;
                    }
                }
            }
        }
        if wake_ready {
            let mut drain = [0u8; 256];
            while matches!(nix::unistd::read(&workers.wake, &mut drain), Ok(n) if n > 0) {}
        }
        while let Ok(outcome) = workers.results.try_recv() {
            engine.on_verdict(outcome.epoch, &outcome.devpath, outcome.verdict, now(), &mut effects);
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => reload(&mut engine, &opts),
                    Ok(Signal::SIGTERM | Signal::SIGINT) => {
                        info!("exiting; {} call(s) still running are left alone", children.len());
                        return Ok(());
                    }
                    _ => {}
                }
            }
            for (child, exit) in children.reap() {
                let line = format!("{}: {} {exit}", child.device, child.call);
                match exit {
                    crate::spawn::Exit::Code(0) => info!("{line}"),
                    _ => warning!("{line}"),
                }
            }
        }
        let t = now();
        for child in children.overdue(t, opts.child_bound) {
            info!("{}: {} still running after {:?} (detached; left alone)", child.device, child.call, opts.child_bound);
        }
        refused.report(t);
        engine.on_tick(t, &mut effects);
    }
}

fn reload(engine: &mut Engine, opts: &RunOptions) {
    let parsed = (opts.load_rules.0)();
    if report_rules(&parsed) {
        info!("reloaded {} rule(s)", parsed.set.rules.len());
        engine.reload(parsed.set);
    } else {
        error!(
            "reload refused: {} error(s) in the rules; keeping the {} rule(s) in use",
            parsed.errors.len(),
            engine.rules().rules.len()
        );
    }
}

/// Hands probes to the workers and makes calls (or prints them, in dry-run).
fn perform(
    effects: &mut Vec<Effect>,
    workers: &Workers,
    spawner: &crate::spawn::Spawner,
    client_name: &std::path::Path,
    dry_run: bool,
    children: &mut crate::spawn::Children,
    now: u64,
) {
    for effect in effects.drain(..) {
        match effect {
            Effect::Probe { epoch, target } => {
                let _ = workers.jobs.send(Job { epoch, target });
            }
            Effect::Call { call, device } if dry_run => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{} dom0 {}", client_name.display(), call.service_arg());
                let _ = out.flush();
                info!("{device}: would call {call} (dry run)");
            }
            Effect::Call { call, device } => {
                let arg = std::ffi::CString::new(call.service_arg()).unwrap_or_default();
                match spawner.spawn(&[c"dom0", &arg]) {
                    Ok(pid) => {
                        info!("{device}: calling {call} (pid {pid})");
                        children.add(pid, call.service_arg(), device, now);
                    }
                    Err(e) => error!("{device}: cannot run {}: {}", spawner.program().to_string_lossy(), e.desc()),
                }
            }
        }
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
    use crate::rules::parse;
    use crate::testing::{STICK_DISK, STICK_PART, Tree, datagram};

    fn engine(rules: &str) -> Engine {
        let parsed = parse("r", rules);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        Engine::new(parsed.set, Config::default())
    }

    fn probes(effects: &[Effect]) -> Vec<&str> {
        effects
            .iter()
            .filter_map(|e| if let Effect::Probe { target, .. } = e { Some(target.dev.as_str()) } else { None })
            .collect()
    }

    fn calls(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| if let Effect::Call { call, .. } = e { Some(call.service_arg()) } else { None })
            .collect()
    }

    /// A card reader waits for media; its media `change` is lost in an overflow; the resync
    /// probes it again. A handled device is not called again by a resync.
    #[test]
    fn resync_reprobes_devices_waiting_for_media_and_calls_nothing_twice() {
        let tree = Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{serial}==\"S1\", ATTACH=\"media\"\n");
        let mut out = Vec::new();
        let add = datagram("add", STICK_DISK, "block", &["DEVNAME=sdb", "DEVTYPE=disk", "DISKSEQ=9"]);
        e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 0, &mut out);
        let Some(Effect::Probe { epoch, .. }) = out.pop() else { panic!("{out:?}") };
        e.on_verdict(epoch, STICK_DISK, Verdict::NoMedia("size is 0".into()), 0, &mut out);
        assert!(out.is_empty(), "no media: no call and no timer");
        assert_eq!(e.next_wake(), None);
        e.resync(&sysfs, 100, &mut out);
        assert_eq!(probes(&out), ["sdb"], "probed again after the resync");
        let Some(Effect::Probe { epoch, .. }) = out.pop() else { panic!() };
        e.on_verdict(epoch, STICK_DISK, Verdict::Ready, 100, &mut out);
        assert_eq!(calls(&out), ["custom.USBDeviceAttach+media+__+sdb"]);
        out.clear();
        e.resync(&sysfs, 200, &mut out);
        assert!(out.is_empty(), "handled: a resync calls nothing again: {out:?}");
    }

    /// A device that vanished during an overflow is forgotten (and detached, if it was
    /// attached: tested in tests/reliability.rs); one of a new generation at the same place is
    /// a new device.
    #[test]
    fn resync_forgets_vanished_devices_and_sees_replaced_ones() {
        let tree = Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let mut e =
            engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"work\"\n");
        let mut out = Vec::new();
        let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition", "DISKSEQ=1"]);
        e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 0, &mut out);
        let Some(Effect::Probe { epoch, .. }) = out.pop() else { panic!() };
        e.on_verdict(epoch, STICK_PART, Verdict::Ready, 0, &mut out);
        assert_eq!(calls(&out), ["custom.USBDeviceAttach+work+__+sdb1"]);
        out.clear();
        // The tree's sdb1 has no DISKSEQ in its uevent file: the same device, nothing happens.
        e.resync(&sysfs, 10, &mut out);
        assert!(out.is_empty(), "{out:?}");
        // Replaced by a new disk (a new DISKSEQ) while events were lost.
        let uevent = tree.root().join(&STICK_PART[1..]).join("uevent");
        std::fs::write(&uevent, "MAJOR=8\nMINOR=17\nDEVNAME=sdb1\nDEVTYPE=partition\nDISKSEQ=2\n").unwrap();
        e.resync(&sysfs, 20, &mut out);
        assert_eq!(probes(&out), ["sdb1"], "a new generation is a new device");
        out.clear();
        // Gone while events were lost.
        std::fs::remove_dir_all(tree.root().join(&STICK_PART[1..])).unwrap();
        std::fs::remove_file(tree.root().join("class/block/sdb1")).unwrap();
        e.resync(&sysfs, 30, &mut out);
        assert_eq!(e.tracked(), 0);
        assert!(out.is_empty());
    }

    /// Debounce holds a ready device back until it has stayed; a removal before that cancels.
    /// The rate limit drops calls beyond its count in its window, and frees up after it.
    #[test]
    fn debounce_and_rate_limit() {
        let tree = Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let mut e = engine(
            "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", DEBOUNCE=\"2s\", RATELIMIT=\"2/1m\"\n",
        );
        let mut out = Vec::new();
        let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
        let remove = datagram("remove", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
        let appear = |e: &mut Engine, at: u64, out: &mut Vec<Effect>| {
            e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), at, out);
            let Some(Effect::Probe { epoch, .. }) = out.pop() else { panic!() };
            e.on_verdict(epoch, STICK_PART, Verdict::Ready, at, out);
        };
        appear(&mut e, 0, &mut out);
        assert!(out.is_empty(), "held back by the debounce");
        assert_eq!(e.next_wake(), Some(2000));
        e.on_event(&sysfs, &Uevent::parse(&remove).unwrap(), 1000, &mut out);
        e.on_tick(2000, &mut out);
        assert!(out.is_empty(), "removed before it settled: no call");
        for t in [10_000, 20_000, 30_000] {
            appear(&mut e, t, &mut out);
            e.on_tick(t + 2000, &mut out);
            e.on_event(&sysfs, &Uevent::parse(&remove).unwrap(), t + 5000, &mut out);
        }
        let attaches = calls(&out).iter().filter(|c| c.contains("Attach")).count();
        assert_eq!(attaches, 2, "the third is beyond 2 per minute: {out:?}");
        out.clear();
        appear(&mut e, 80_000, &mut out);
        e.on_tick(82_000, &mut out);
        assert_eq!(calls(&out), ["custom.USBDeviceAttach+w+__+sdb1"], "the window has moved on");
    }
}
