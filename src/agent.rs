//! The agent: coldplug, events, readiness, one call per appearance, limits, reload, resync.
//!
//! [`Engine`] is the decision logic with time as an input: events and probe verdicts go in,
//! [`Effect`]s (probe this, call that) come out. `run` drives it from the kernel socket with
//! threads that take turns leading the loop and running probes (see `Shared`), in real time;
//! `replay` drives the same engine from a fixture
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
use crate::spawn::Children;
use crate::sysfs::Sysfs;
use crate::uevent::{Action, Uevent};
use nix::errno::Errno;
use nix::unistd::Pid;

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
    /// Check readiness, then report with [`Engine::on_verdict`]. With a `call`, a ready device
    /// is called at once, by whoever probed it (the engine has already counted the call), and
    /// the report says whether the call was made.
    Probe { epoch: u64, target: Target, call: Option<Call> },
    /// Make this call.
    Call { call: Call, device: String },
}

/// Where the engine's effects go: a `Vec` in tests and replay; in `run`, a dispatcher that
/// queues a probe for the leading thread to run the moment the engine asks for it, before
/// the engine goes on (to describe the device for the log, say).
pub trait Sink {
    fn effect(&mut self, effect: Effect);
}

impl Sink for Vec<Effect> {
    fn effect(&mut self, effect: Effect) {
        self.push(effect);
    }
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
    /// The rate-limit slot counted for the call an in-flight probe may make (its time).
    reserved: Option<u64>,
    state: State,
}

impl Entry {
    /// The device's identity for logs, or its name until [`Engine::describe`] read it.
    fn who(&self) -> &str {
        if self.identity.is_empty() { &self.target.dev } else { &self.identity }
    }
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
    /// Devices matched but not yet described in the log (see [`Engine::describe`]).
    undescribed: Vec<Box<str>>,
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
            undescribed: Vec::new(),
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

    /// How a tracked device is named in logs.
    pub fn identity(&self, devpath: &str) -> Option<&str> {
        self.devices.get(devpath).map(Entry::who)
    }

    /// Handles one event. Allocates nothing for an event that matches no rule.
    pub fn on_event(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut impl Sink) {
        match event.action {
            Action::Remove => {
                if let Some(entry) = self.devices.remove(event.devpath) {
                    match entry.state {
                        State::Done { .. } => info!("{}: removed", entry.who()),
                        _ => info!("{}: removed before it was attached", entry.who()),
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
    fn detach(&self, entry: Entry, out: &mut impl Sink) {
        if !(matches!(entry.state, State::Done { called: true })
            && entry.target.kind == Kind::Block
            && self.config.detach)
        {
            return;
        }
        info!("{}: detaching it from {}", entry.who(), entry.qube);
        if let Ok(call) = Call::bare(DETACH_SERVICE, &entry.qube, Kind::Block, &entry.target.dev) {
            out.effect(Effect::Call { call, device: entry.who().to_owned() });
        }
    }

    fn appear(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut impl Sink) {
        if let Some(entry) = self.devices.get_mut(event.devpath) {
            let generation = generation(event);
            let replaced =
                event.action == Action::Add && generation.is_some() && generation != entry.generation.as_deref();
            if !replaced {
                return Self::update(entry, &mut self.calls, event, now, out);
            }
            info!("{}: replaced by a new device at the same place (its removal was missed)", entry.who());
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
        let refused = Call::bare(ATTACH_SERVICE, &rule.attach, kind, dev).err();
        let state = match refused {
            None => State::Waiting {
                deadline: now + timeout,
                next: now,
                backoff: FIRST_BACKOFF,
                probing: true,
                again: false,
            },
            Some(_) => State::Done { called: false },
        };
        let (location, attach) = (rule.location(), rule.attach.clone());
        let entry = self.devices.entry(event.devpath.into()).or_insert(Entry {
            epoch: self.epochs,
            target,
            qube: attach,
            rule: location,
            identity: String::new(),
            generation: generation(event).map(Into::into),
            appeared: now,
            timeout,
            debounce: rule.debounce.unwrap_or(self.config.debounce).as_millis() as u64,
            rate: rule.rate_limit.or(self.config.rate_limit),
            reserved: None,
            state,
        });
        // The probe now; reading the device's identity for the log can wait (the run loop
        // runs the probe before it describes the device, see `describe`).
        match refused {
            None => {
                let call = Self::precall(entry, &mut self.calls, now);
                out.effect(Effect::Probe { epoch: entry.epoch, target: entry.target.clone(), call });
                self.undescribed.push(event.devpath.into());
            }
            Some(e) => {
                entry.identity = sysfs.identity(event.devpath).to_string();
                info!("{}: matches {} (ATTACH=\"{}\")", entry.identity, entry.rule, entry.qube);
                error!("{}: not attached: {e}", entry.identity);
            }
        }
    }

    /// True if some matched device is waiting for [`Engine::describe`].
    pub fn undescribed(&self) -> bool {
        !self.undescribed.is_empty()
    }

    /// Reads the identity of devices matched since the last call and logs their match. The
    /// run loop calls it once the probes are on their way; replay right after each event.
    pub fn describe(&mut self, sysfs: &Sysfs) {
        for devpath in self.undescribed.drain(..) {
            if let Some(entry) = self.devices.get_mut(&devpath).filter(|e| e.identity.is_empty()) {
                entry.identity = sysfs.identity(&devpath).to_string();
                info!("{}: matches {} (ATTACH=\"{}\")", entry.identity, entry.rule, entry.qube);
            }
        }
    }

    /// The call a probe may make at once if the device is ready. None while a debounce holds
    /// the device back or its rule's rate limit has no room (the verdict then comes back to
    /// [`Engine::on_verdict`], which decides); otherwise the call is counted now, and the count
    /// given back if the device turns out not to be ready.
    fn precall(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>, now: u64) -> Option<Call> {
        if entry.debounce > 0 && now < entry.appeared + entry.debounce {
            return None;
        }
        if let Some((count, window)) = entry.rate {
            if !calls.contains_key(&entry.rule) {
                calls.insert(entry.rule.clone(), RateWindow::default());
            }
            let rate = calls.get_mut(&entry.rule)?;
            rate.window = window.as_millis() as u64;
            Self::expire(&entry.rule, rate, now);
            if rate.times.len() >= count as usize {
                return None;
            }
            rate.times.push_back(now);
            entry.reserved = Some(now);
        }
        Call::bare(ATTACH_SERVICE, &entry.qube, entry.target.kind, &entry.target.dev).ok()
    }

    /// Gives back the rate-limit slot counted for a probe whose device was not ready.
    fn release(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>) {
        let Some(at) = entry.reserved.take() else { return };
        if let Some(rate) = calls.get_mut(&entry.rule) {
            if let Some(i) = rate.times.iter().rposition(|&t| t == at) {
                rate.times.remove(i);
            }
        }
    }

    /// A later event for a tracked device: it may now be ready (media, driver bound).
    fn update(
        entry: &mut Entry,
        calls: &mut BTreeMap<String, RateWindow>,
        event: &Uevent<'_>,
        now: u64,
        out: &mut impl Sink,
    ) {
        if event.action == Action::Bind {
            entry.target.bound = true;
        }
        match &mut entry.state {
            State::Waiting { probing: true, again, .. } => *again = true,
            State::Waiting { next, .. } => *next = now,
            State::NoMedia | State::GaveUp => {
                if event.media_change() {
                    info!("{}: media changed", entry.who());
                }
                entry.state = State::Waiting {
                    deadline: now + entry.timeout,
                    next: now,
                    backoff: FIRST_BACKOFF,
                    probing: true,
                    again: false,
                };
                let call = Self::precall(entry, calls, now);
                out.effect(Effect::Probe { epoch: entry.epoch, target: entry.target.clone(), call });
            }
            State::Settling { .. } | State::Done { .. } => {}
        }
    }

    /// A probe's answer. `made` says, for a probe that carried a call and found the device
    /// ready, whether that call was made (`Some(false)`: it could not be started); None
    /// otherwise.
    pub fn on_verdict(
        &mut self,
        epoch: u64,
        devpath: &str,
        verdict: Verdict,
        made: Option<bool>,
        now: u64,
        out: &mut impl Sink,
    ) {
        let Some(entry) = self.devices.get_mut(devpath).filter(|e| e.epoch == epoch) else {
            return;
        };
        if !matches!(entry.state, State::Waiting { .. }) {
            return;
        }
        if let Some(called) = made {
            // The prober made the call the engine counted: it stays counted.
            entry.reserved = None;
            entry.state = State::Done { called };
            return;
        }
        Self::release(entry, &mut self.calls);
        let State::Waiting { deadline, next, backoff, probing, again } = &mut entry.state else {
            return;
        };
        *probing = false;
        match verdict {
            Verdict::Ready if entry.debounce > 0 && now < entry.appeared + entry.debounce => {
                let at = entry.appeared + entry.debounce;
                info!("{}: ready; debounce: calling in {} ms if it stays", entry.who(), at - now);
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
                    entry.who(),
                    entry.timeout
                );
                entry.state = State::GaveUp;
            }
            Verdict::Wait(why) => {
                let wait = *backoff;
                *next = now + wait;
                *backoff = (wait * 2).min(MAX_BACKOFF);
                debug!("{}: {why}; trying again in {wait} ms", entry.who());
            }
            Verdict::NoMedia(why) => {
                info!("{}: {why}; waiting for media", entry.who());
                entry.state = State::NoMedia;
            }
            Verdict::Gone => {
                debug!("{}: gone before it was ready", entry.who());
                self.devices.remove(devpath);
            }
        }
    }

    /// Makes the call for a ready device, if its rule's rate limit allows.
    fn call(&mut self, devpath: &str, now: u64, out: &mut impl Sink) {
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
                        entry.who(),
                        entry.rule,
                        window.as_secs()
                    );
                } else {
                    debug!("{}: not attached: rate limit of rule {}", entry.who(), entry.rule);
                }
                rate.dropped += 1;
                return;
            }
            rate.times.push_back(now);
        }
        match Call::bare(ATTACH_SERVICE, &entry.qube, entry.target.kind, &entry.target.dev) {
            Ok(call) => {
                entry.state = State::Done { called: true };
                out.effect(Effect::Call { call, device: entry.who().to_owned() });
            }
            Err(e) => error!("{}: not attached: {e}", entry.who()),
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
    pub fn on_tick(&mut self, now: u64, out: &mut impl Sink) {
        for (rule, rate) in &mut self.calls {
            Self::expire(rule, rate, now);
        }
        let mut settled = Vec::new();
        for (devpath, entry) in &mut self.devices {
            match &mut entry.state {
                State::Waiting { next, probing: probing @ false, .. } if *next <= now => {
                    *probing = true;
                    let call = Self::precall(entry, &mut self.calls, now);
                    out.effect(Effect::Probe { epoch: entry.epoch, target: entry.target.clone(), call });
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
    pub fn resync(&mut self, sysfs: &Sysfs, now: u64, out: &mut impl Sink) -> usize {
        let present = sysfs.scan();
        let vanished: Vec<Box<str>> =
            self.devices.keys().filter(|k| present.binary_search_by(|p| p.as_str().cmp(k)).is_err()).cloned().collect();
        for devpath in vanished {
            if let Some(entry) = self.devices.remove(&devpath) {
                warning!("{}: vanished while events were lost; forgotten", entry.who());
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
    /// Threads taking turns at the loop and at probes (at least 2: one leads while one probes).
    pub threads: usize,
}

/// Reads the rules from wherever they come from (called at start and on SIGHUP).
pub struct RuleLoader(pub Box<dyn Fn() -> Parsed + Send + Sync>);

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

/// A probe to run, and the call to make if the device is ready.
struct Job {
    epoch: u64,
    target: Target,
    call: Option<Call>,
}

/// A probe's result, reported back to whoever leads the loop.
struct Outcome {
    epoch: u64,
    devpath: String,
    verdict: Verdict,
    /// The call the probe made on finding the device ready, and how starting it went.
    made: Option<(Call, Result<Option<Pid>, Errno>)>,
}

/// Makes calls: starts the client detached, or in dry-run prints the command it would run.
/// Used by whichever thread makes a call (posix_spawn is safe from any thread).
struct Caller {
    spawner: crate::spawn::Spawner,
    /// The client as the user named it, for dry-run output.
    name: PathBuf,
    dry_run: bool,
    /// When the last child was started (`Instant` of the run's start plus this many ms).
    last_start: std::sync::atomic::AtomicU64,
    start: Instant,
}

impl Caller {
    /// `Ok(Some(pid))` started; `Ok(None)` printed (dry run); `Err` could not be started.
    fn call(&self, call: &Call) -> Result<Option<Pid>, Errno> {
        if self.dry_run {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{} dom0 {}", self.name.display(), call.service_arg());
            let _ = out.flush();
            return Ok(None);
        }
        let arg = std::ffi::CString::new(call.service_arg()).unwrap_or_default();
        let pid = self.spawner.spawn(&[c"dom0", &arg])?;
        let now = self.start.elapsed().as_millis() as u64;
        self.last_start.store(now, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(pid))
    }

    /// True for [`SETTLE_MS`] after a child was started: work that can wait (describing
    /// devices for the log) waits, and leaves the CPU to the child's exec.
    fn settling(&self, now: u64) -> Option<u64> {
        let last = self.last_start.load(std::sync::atomic::Ordering::Relaxed);
        (last > 0 && last + SETTLE_MS > now).then_some(last + SETTLE_MS)
    }

    /// Logs how a call went, and tracks a started child.
    fn report(
        &self,
        call: &Call,
        device: String,
        result: Result<Option<Pid>, Errno>,
        children: &mut Children,
        now: u64,
    ) {
        match result {
            Ok(Some(pid)) => {
                info!("{device}: calling {call} (pid {pid})");
                children.add(pid, call.service_arg(), device, now);
            }
            Ok(None) => info!("{device}: would call {call} (dry run)"),
            Err(e) => error!("{device}: cannot run {}: {}", self.spawner.program().to_string_lossy(), e.desc()),
        }
    }
}

/// The leader's [`Sink`]: a probe is queued for the next thread free to run it; a call is
/// made at once.
struct Dispatch<'d> {
    pending: &'d mut VecDeque<Job>,
    caller: &'d Caller,
    children: &'d mut Children,
    now: u64,
}

impl Sink for Dispatch<'_> {
    fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::Probe { epoch, target, call } => self.pending.push_back(Job { epoch, target, call }),
            Effect::Call { call, device } => {
                let result = self.caller.call(&call);
                self.caller.report(&call, device, result, self.children, self.now);
            }
        }
    }
}

/// What only the thread leading the loop touches.
struct LoopState {
    engine: Engine,
    children: Children,
    refused: RefusalLog,
    pending: VecDeque<Job>,
    outcomes: mpsc::Receiver<Outcome>,
    buf: Vec<u8>,
    /// Something that allocates (a match, a probe, a call, a reload, a resync) happened since
    /// free memory was last given back to the kernel.
    trim_due: bool,
}

/// The loop, shared by threads that take turns leading it (leader/follower). The leader polls
/// and decides; when it has a probe to run and another thread is idle, it arms the take-over
/// timer, lets go of the loop and runs the probe itself, then makes the call if the device is
/// ready. The probe and the call thus run on the thread that received the event, and no other
/// thread is woken: if they are done within [`TAKEOVER`], the thread simply leads again. If
/// they take longer (a slow medium, qubesdb-read), the timer wakes an idle thread, which takes
/// the loop over; later events wait in the socket's buffer meanwhile, never longer than that.
/// A probe is never run while no other thread could take over, so a slow device never stops
/// the loop.
struct Shared {
    state: Mutex<LoopState>,
    /// Threads waiting to take over.
    idle: std::sync::atomic::AtomicUsize,
    /// Threads taking turns, the leader included.
    threads: usize,
    /// Fires when a probe has kept the loop unattended for [`TAKEOVER`]; idle threads wait on
    /// it.
    takeover: nix::sys::timerfd::TimerFd,
    /// How many times the timer was armed: who armed it last disarms it, no one else. Held
    /// while setting the timer.
    armed: Mutex<u64>,
    socket: UeventSocket,
    sigfd: nix::sys::signalfd::SignalFd,
    /// Written by a thread that finished a probe, to wake the leader.
    wake: OwnedFd,
    wake_tx: OwnedFd,
    outcomes: Mutex<mpsc::Sender<Outcome>>,
    sysfs: Arc<Sysfs>,
    prober: Prober,
    caller: Caller,
    opts: RunOptions,
    start: Instant,
}

/// How long after starting a child the loop leaves work that can wait (see `Caller::settling`).
const SETTLE_MS: u64 = 5;

/// How long a probe may keep the loop unattended before an idle thread takes it over.
const TAKEOVER: Duration = Duration::from_millis(1);

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// One thread's life: lead the loop until there is a probe to run and another thread that
    /// could take over; run it; report; lead again, or wait to take over.
    fn take_turns(&self) -> ! {
        use std::sync::TryLockError;
        use std::sync::atomic::Ordering::SeqCst;
        let mut outcome = None;
        loop {
            if let Some(outcome) = outcome.take() {
                // For whoever leads now, perhaps this thread: the wake makes its poll return.
                if let Ok(tx) = self.outcomes.lock() {
                    let _ = tx.send(outcome);
                }
                let _ = nix::unistd::write(self.wake_tx.as_fd(), b"!");
            }
            let mut state = match self.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(state)) => state.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    // Count ourselves idle, then wake the leader: it may be waiting for a thread
                    // that could take over, with a probe queued.
                    self.idle.fetch_add(1, SeqCst);
                    let _ = nix::unistd::write(self.wake_tx.as_fd(), b"!");
                    self.wait_takeover();
                    self.idle.fetch_sub(1, SeqCst);
                    continue;
                }
            };
            let job = loop {
                if self.idle.load(SeqCst) > 0 {
                    if let Some(job) = state.pending.pop_front() {
                        break job;
                    }
                }
                self.turn(&mut state);
            };
            let armed = self.arm_takeover(Some(TAKEOVER), 0);
            drop(state);
            outcome = Some(self.run(job));
            self.arm_takeover(None, armed);
        }
    }

    /// Arms the take-over timer (`after` Some; returns the arming's number), or disarms it if
    /// the last arming was number `mine` (`after` None).
    fn arm_takeover(&self, after: Option<Duration>, mine: u64) -> u64 {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        let mut armed = self.armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = match after {
            Some(after) => {
                *armed += 1;
                self.takeover.set(Expiration::OneShot(TimeSpec::from_duration(after)), TimerSetTimeFlags::empty())
            }
            None if *armed == mine => self.takeover.unset(),
            None => Ok(()),
        };
        if let Err(e) = result {
            // Without the timer an idle thread would wait for the probe to end: still correct,
            // only slower to read events meanwhile.
            warning!("take-over timer: {}", e.desc());
        }
        *armed
    }

    /// Waits until the take-over timer fires (a probe has kept the loop unattended too long).
    fn wait_takeover(&self) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let fd = self.takeover.as_fd();
        loop {
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::NONE).is_ok() {
                let mut ticks = [0u8; 8];
                // Another idle thread may have read it first, or the prober disarmed it.
                if nix::unistd::read(fd, &mut ticks).is_ok() {
                    return;
                }
            }
        }
    }

    /// Runs a probe, and the call it carries if the device is ready.
    fn run(&self, Job { epoch, target, call }: Job) -> Outcome {
        let verdict = self.prober.check(&target);
        let made = match call {
            Some(call) if verdict == Verdict::Ready => {
                let result = self.caller.call(&call);
                Some((call, result))
            }
            _ => None,
        };
        Outcome { epoch, devpath: target.devpath, verdict, made }
    }

    /// One iteration of the loop: wait for something to do (socket, signals, finished probes,
    /// timers) and do it.
    fn turn(&self, st: &mut LoopState) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::signal::Signal;
        let LoopState { engine, children, refused, pending, outcomes, buf, trim_due } = st;
        // Devices matched since the last turn are described (identity read from sysfs, for the
        // log) once no probe is running and no child has just been started: on a small machine
        // that work would otherwise compete with the probe and with the child's exec.
        let settling = self.caller.settling(self.now()).filter(|_| engine.undescribed());
        if settling.is_none() && self.idle.load(std::sync::atomic::Ordering::SeqCst) + 1 >= self.threads {
            engine.describe(&self.sysfs);
        }
        let child_bound = self.opts.child_bound;
        let wake = [engine.next_wake(), children.next_overdue(child_bound), refused.next_report(), settling]
            .into_iter()
            .flatten()
            .min();
        // Queued probes wait for a thread to come back: outcomes wake us for that.
        let timeout = match wake {
            Some(at) => {
                PollTimeout::try_from(at.saturating_sub(self.now()).min(60_000) as i32).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        if wake.is_none() && pending.is_empty() && std::mem::take(trim_due) {
            // Going idle with nothing scheduled: what startup, a match or a reload freed goes
            // back to the kernel, so an idle agent keeps only what it uses.
            release_free_memory();
        }
        let mut fds = [
            PollFd::new(self.socket.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                error!("poll: {}", e.desc());
                std::process::exit(i32::from(EXIT_STARTUP));
            }
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (sock_ready, sig_ready, wake_ready) = (ready(&fds[0]), ready(&fds[1]), ready(&fds[2]));
        macro_rules! sink {
            () => {
                &mut Dispatch {
                    pending: &mut *pending,
                    caller: &self.caller,
                    children: &mut *children,
                    now: self.now(),
                }
            };
        }

        if sock_ready {
            // A bounded batch, so signals and results are never starved by a storm.
            for _ in 0..256 {
                match self.socket.recv(buf) {
                    Ok(Received::Kernel(datagram)) => match Uevent::parse(datagram) {
                        Ok(event) => {
                            debug!("uevent {} {} ({})", event.action, event.devpath, event.subsystem);
                            engine.on_event(&self.sysfs, &event, self.now(), sink!());
                            *trim_due |= !pending.is_empty();
                            // A probe to run and a thread that could take over: run it now, the
                            // rest of this turn (more events, the log) comes after.
                            if !pending.is_empty() && self.idle.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                                return;
                            }
                        }
                        Err(e) => warning!("dropped a malformed uevent: {e}"),
                    },
                    Ok(Received::Refused(sender)) => refused.note(sender, self.now()),
                    Ok(Received::Truncated(len)) => {
                        warning!("dropped a uevent of {len} bytes: larger than the {} byte buffer", buf.len())
                    }
                    Ok(Received::Overflow) => {
                        *trim_due = true;
                        warning!("the receive buffer overflowed and events were lost: rescanning sysfs");
                        engine.resync(&self.sysfs, self.now(), sink!());
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
            while matches!(nix::unistd::read(&self.wake, &mut drain), Ok(n) if n > 0) {}
        }
        // A child registered now may already have exited, its SIGCHLD read by an earlier turn
        // (the prober spawns it before its outcome arrives here): reap after registering too.
        let mut registered = false;
        while let Ok(outcome) = outcomes.try_recv() {
            *trim_due = true;
            let made = outcome.made.map(|(call, result)| {
                let started = result.is_ok();
                registered |= started;
                let device = engine.identity(&outcome.devpath).unwrap_or(&outcome.devpath).to_owned();
                self.caller.report(&call, device, result, children, self.now());
                started
            });
            engine.on_verdict(outcome.epoch, &outcome.devpath, outcome.verdict, made, self.now(), sink!());
        }
        if sig_ready {
            *trim_due = true;
            while let Ok(Some(info)) = self.sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGHUP) => reload(engine, &self.opts),
                    Ok(Signal::SIGTERM | Signal::SIGINT) => {
                        // Calls in flight are detached; a probe in flight is abandoned.
                        info!("exiting; {} call(s) still running are left alone", children.len());
                        std::process::exit(0);
                    }
                    _ => {}
                }
            }
        }
        if sig_ready || registered {
            for (child, exit) in children.reap() {
                let line = format!("{}: {} {exit}", child.device, child.call);
                match exit {
                    crate::spawn::Exit::Code(0) => info!("{line}"),
                    _ => warning!("{line}"),
                }
            }
        }
        let t = self.now();
        for child in children.overdue(t, child_bound) {
            info!("{}: {} still running after {:?} (detached; left alone)", child.device, child.call, child_bound);
        }
        refused.report(t);
        engine.on_tick(t, sink!());
    }
}

/// Runs the agent until SIGTERM or SIGINT (then the process exits 0), or returns why it could
/// not start.
pub fn run(opts: RunOptions) -> Result<(), Fatal> {
    one_malloc_arena();
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};

    let start = Instant::now();

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
    if let Err(e) = crate::spawn::drop_capabilities() {
        warning!("cannot drop capabilities after opening the socket: {e}");
    }
    let sysfs = Arc::new(Sysfs::new(&opts.sysfs).map_err(|e| fatal(EXIT_STARTUP)(format!("sysfs: {e}")))?);

    let parsed = (opts.load_rules.0)();
    if !report_rules(&parsed) {
        return Err(fatal(EXIT_RULES)(format!("{} error(s) in the rules; nothing started", parsed.errors.len())));
    }
    // Only the rules are kept: this function never returns, so what else it holds would
    // stay allocated for the agent's life.
    let rules = {
        let parsed = parsed;
        parsed.set
    };
    if rules.is_empty() {
        warning!("no rules: nothing will be attached (see `autoattach check`)");
    } else {
        info!("loaded {} rule(s)", rules.rules.len());
    }

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
    let caller = Caller {
        spawner,
        name: opts.client.clone(),
        dry_run: opts.dry_run,
        last_start: std::sync::atomic::AtomicU64::new(0),
        start,
    };
    let prober = Prober {
        sysfs: sysfs.clone(),
        dev: opts.dev.clone(),
        nodes: crate::readiness::Nodes::Real,
        qubesdb: opts.qubesdb.clone(),
    };
    let (wake, wake_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| fatal(EXIT_STARTUP)(format!("pipe: {}", e.desc())))?;
    let (outcome_tx, outcome_rx) = mpsc::channel();
    let mut state = LoopState {
        engine: Engine::new(rules, opts.config.clone()),
        children: Children::default(),
        refused: RefusalLog::default(),
        pending: VecDeque::new(),
        outcomes: outcome_rx,
        // The kernel's uevents are at most 2 KiB of variables plus the header line; a larger
        // datagram is reported (MSG_TRUNC), not half-read.
        buf: vec![0u8; 8 * 1024],
        trim_due: true,
    };
    let now = start.elapsed().as_millis() as u64;
    let LoopState { engine, pending, children, .. } = &mut state;
    let present = engine.resync(&sysfs, now, &mut Dispatch { pending, caller: &caller, children, now });
    engine.describe(&sysfs);
    info!("coldplug: {present} device(s) present, {} matched", state.engine.tracked());

    let threads = opts.threads.max(2);
    let timer = nix::sys::timerfd::TimerFd::new(
        nix::sys::timerfd::ClockId::CLOCK_MONOTONIC,
        nix::sys::timerfd::TimerFlags::TFD_CLOEXEC | nix::sys::timerfd::TimerFlags::TFD_NONBLOCK,
    )
    .map_err(|e| fatal(EXIT_STARTUP)(format!("timerfd: {}", e.desc())))?;
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        idle: std::sync::atomic::AtomicUsize::new(0),
        threads,
        takeover: timer,
        armed: Mutex::new(0),
        socket,
        sigfd,
        wake,
        wake_tx,
        outcomes: Mutex::new(outcome_tx),
        sysfs,
        prober,
        caller,
        opts,
        start,
    });
    for n in 1..threads {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("autoattach-{n}"))
            .stack_size(256 * 1024)
            .spawn(move || shared.take_turns())
            .map_err(|e| fatal(EXIT_STARTUP)(format!("cannot start threads: {e}")))?;
    }
    shared.take_turns()
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

/// Gives free heap pages back to the kernel (glibc keeps freed memory mapped and dirty).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes malloc's own locks; it is safe to call from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
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
        e.on_verdict(epoch, STICK_DISK, Verdict::NoMedia("size is 0".into()), None, 0, &mut out);
        assert!(out.is_empty(), "no media: no call and no timer");
        assert_eq!(e.next_wake(), None);
        e.resync(&sysfs, 100, &mut out);
        assert_eq!(probes(&out), ["sdb"], "probed again after the resync");
        let Some(Effect::Probe { epoch, .. }) = out.pop() else { panic!() };
        e.on_verdict(epoch, STICK_DISK, Verdict::Ready, None, 100, &mut out);
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
        e.on_verdict(epoch, STICK_PART, Verdict::Ready, None, 0, &mut out);
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
            e.on_verdict(epoch, STICK_PART, Verdict::Ready, None, at, out);
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

    /// A probe carries its call when nothing holds the device back, and the rate limit counts
    /// it then; a device found not ready gives the slot back; a full window sends no call with
    /// the probe, and the verdict decides (and says why).
    #[test]
    fn probes_carry_their_call_when_the_engine_allows_it() {
        let tree = Tree::stick(b"S1");
        let sysfs = Sysfs::new(tree.root()).unwrap();
        let mut e = engine(
            "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", RATELIMIT=\"1/1m\"\n",
        );
        let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
        let remove = datagram("remove", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
        let mut out = Vec::new();
        e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 0, &mut out);
        let Some(Effect::Probe { epoch, call: Some(call), .. }) = out.pop() else { panic!("{out:?}") };
        assert_eq!(call.service_arg(), "custom.USBDeviceAttach+w+__+sdb1");
        // Not ready yet: the slot is given back, and the retry carries the call again.
        e.on_verdict(epoch, STICK_PART, Verdict::Wait("no node".into()), None, 0, &mut out);
        e.on_tick(100, &mut out);
        let Some(Effect::Probe { epoch, call: Some(_), .. }) = out.pop() else { panic!("{out:?}") };
        // The prober made the call: done, and nothing more to do.
        e.on_verdict(epoch, STICK_PART, Verdict::Ready, Some(true), 100, &mut out);
        assert!(out.is_empty());
        e.on_event(&sysfs, &Uevent::parse(&remove).unwrap(), 200, &mut out);
        assert_eq!(calls(&out), ["custom.USBDeviceDetach+w+__+sdb1"], "it was attached: detach");
        out.clear();
        // Back within the minute: the window is full, so the probe carries no call.
        e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 300, &mut out);
        let Some(Effect::Probe { epoch, call: None, .. }) = out.pop() else { panic!("{out:?}") };
        e.on_verdict(epoch, STICK_PART, Verdict::Ready, None, 300, &mut out);
        assert!(out.is_empty(), "held back by the rate limit: {out:?}");
    }
}
