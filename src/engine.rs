//! The engine: what to do about each device, decided with time as an input.
//!
//! [`Engine`] is a deterministic state machine. Events, probe outcomes, call exits, qubesdb
//! watch events and clock ticks go in; [`Effect`]s come out: probe this device, make that
//! call, watch that qubesdb key. It never blocks, reads no clock and starts nothing itself.
//! `autoattach run` drives it from the kernel socket in real time ([`crate::runloop`]);
//! `replay` and `test` drive it inline with virtual time, so the tests exercise the pipeline
//! the agent runs.
//!
//! A device is tracked from the event that first matches a rule until its `remove`:
//! - it is probed until ready (retries with backoff, bounded by the rule's timeout); with no
//!   media, until the kernel announces media with a `change`; when Qubes has not published it
//!   yet and qubesdb can be watched, until the watch reports the trigger key Qubes' scripts
//!   write after a record (no polling);
//! - when ready it is called once; later `add`/`change` events for it do nothing, unless an
//!   `add` shows a new generation (DISKSEQ, USB DEVNUM): then its `remove` was lost and this
//!   is a new device;
//! - `remove` forgets it (and cancels a wait); a device that comes back is called again. A
//!   device removed while its attach call is in flight (carried by its probe, or running) is
//!   remembered until the call returns, then detached (see [`Engine::on_call_exit`]).
//!
//! **The probe carries its call.** When nothing holds a device back (debounce, rate limit),
//! the probe is sent with a [`CallPlan`] and the rule's rate-limit slot is reserved: a probe
//! worker that finds the device ready completes the plan with what it learnt ([`Facts`]) and
//! makes the call at once, without a round trip through the loop ([`Job::run`] is that step,
//! the one place it is written). The reservation is given back if the device turns out not
//! ready, or is dropped before its call.
//!
//! Flapping devices are held back by a per-device debounce (a device must stay present that
//! long before it is called) and a per-rule rate limit (at most N calls per window).
//!
//! **Identity.** Every call carries the identity of the device the rule matched
//! ([`crate::identity`], IDENTITY.md). It is read from sysfs on this thread right after the
//! match (a few dozen µs, only for matching events), and the device's generation (DISKSEQ,
//! the USB DEVNUM, MAJOR:MINOR) is then read again: if it changed, the devpath already holds
//! another device (its own event follows) and this match is dropped, so a missed `remove`
//! cannot lend one device's identity to another. The probe carries it ([`Target::expected`]),
//! checks it against what Qubes published where there is qubesdb, and the call carries what
//! the probe established ([`Facts`]). A Detach carries the identity its Attach carried.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use std::sync::Arc;

use crate::identity::{self, Identity, Records, SimError, Simulated};
use crate::log::Escaped;
use crate::names::{ATTACH_SERVICE, Call, CallError, DETACH_SERVICE, Kind};
use crate::readiness::{Awaited, Facts, How, Pending, Prober, Target, Unverifiable, Verdict, Why};
use crate::rules::{Matcher, Rule, RuleSet};
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
    /// Call custom.USBDeviceDetach when an attached device is removed (see
    /// [`Engine::detaches`] for which kinds).
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

/// The attach call a probe carries, to be completed with what the probe learns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallPlan {
    pub qube: Box<str>,
    pub kind: Kind,
    pub dev: Box<str>,
}

impl CallPlan {
    /// The call for a device the probe found ready, carrying the identity the probe
    /// established (on the probe worker, right before the call is made).
    pub fn call(&self, facts: &Facts) -> Result<Call, CallError> {
        let ident = facts.identity.ident().map_err(CallError::Identity)?;
        Call::new(ATTACH_SERVICE, &self.qube, self.kind, &self.dev, ident)
    }
}

/// A probe to run, and the attach call to make at once if the device is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub epoch: u64,
    pub target: Target,
    pub plan: Option<CallPlan>,
}

/// A finished probe: its verdict, and the call it made (with `make`'s result), if it carried
/// one and the device was ready.
#[derive(Debug)]
pub struct Outcome<R> {
    pub epoch: u64,
    pub devpath: String,
    pub verdict: Verdict,
    pub made: Option<Result<(Call, R), CallError>>,
}

impl Job {
    /// The probe-then-call step, the same for `run` (on a probe worker), `replay` and `test`:
    /// checks readiness, and if the device is ready and the job carries a call, completes the
    /// call from the verdict's facts and hands it to `make` (which starts or records it).
    pub fn run<R>(self, prober: &Prober, make: impl FnOnce(&Call) -> R) -> Outcome<R> {
        let verdict = prober.check(&self.target);
        let made = match (&verdict, &self.plan) {
            (Verdict::Ready(facts), Some(plan)) => Some(plan.call(facts).map(|call| {
                let result = make(&call);
                (call, result)
            })),
            _ => None,
        };
        Outcome { epoch: self.epoch, devpath: self.target.devpath, verdict, made }
    }
}

impl<R> Outcome<R> {
    /// What became of the carried call, for [`Engine::on_verdict`]; `started` says whether
    /// `make`'s result means the call went out.
    pub fn carried(&self, started: impl FnOnce(&R) -> bool) -> Carried {
        match &self.made {
            None => Carried::No,
            Some(Ok((_, result))) => Carried::Made(started(result)),
            Some(Err(e)) => Carried::Refused(e.clone()),
        }
    }
}

/// What became of the call a probe carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Carried {
    /// None was carried, or the device was not ready.
    No,
    /// It was made: started (true), or it could not be started (false: the client missing).
    Made(bool),
    /// The plan could not be completed into a call (a name or identity refused).
    Refused(CallError),
}

/// Names an attach call, so that its exit can be reported back ([`Engine::on_call_exit`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub epoch: u64,
    pub devpath: Box<str>,
}

/// What the engine asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Run the probe (and the call it carries); report with [`Engine::on_verdict`].
    Probe(Job),
    /// Make this call. An attach has a ticket: report its exit with [`Engine::on_call_exit`].
    Call { call: Call, device: String, ticket: Option<Ticket> },
    /// Watch this qubesdb key (a trigger key: `/qubes-block-devices`, `/qubes-usb-devices`);
    /// report its changes with [`Engine::on_published`].
    Watch(String),
    /// The watch is no longer needed.
    Unwatch(String),
}

/// Where the engine's effects go: a `Vec` in the loop, tests and replay.
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
    /// Probed, or waiting for its next probe (at `next`), or for a qubesdb watch.
    Waiting {
        deadline: u64,
        next: u64,
        backoff: u64,
        probe: Probe,
        /// The qubesdb trigger keys watched for its publication, once a probe found it not
        /// published as itself (empty: none).
        watched: &'static [&'static str],
        /// The last answer that it is not published as itself, for the log at the timeout.
        awaited: Option<Awaited>,
        /// From when a desc-form record may be taken (see [`Target::desc_settled`]).
        desc_from: Option<u64>,
    },
    NoMedia,
    GaveUp,
    /// Ready; held back by the debounce until `at`.
    Settling {
        at: u64,
        facts: Facts,
    },
    /// Handled: what became of its attach call.
    Done(Attach),
}

/// A waiting device's probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Idle,
    /// In flight; `again`: something happened since it started (an event, a watch), so probe
    /// again at once if it says "not yet".
    Running {
        again: bool,
    },
    /// In flight past the run loop's probe deadline, stuck in the kernel: its worker was set
    /// aside. No other probe of the device runs until it returns; its verdict is taken then.
    SetAside {
        again: bool,
    },
}

/// What became of a handled device's attach call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    /// Not made: refused, rate-limited, or the client could not be started.
    NotMade,
    /// Made, still running.
    Running,
    /// Returned: `attached` unless dom0 said it did not attach (a non-zero exit).
    Returned { attached: bool },
}

#[derive(Debug)]
struct Entry {
    /// Distinguishes this appearance from an earlier one at the same devpath (unique).
    epoch: u64,
    target: Target,
    qube: Box<str>,
    rule: String,
    /// How the device is named in logs: its name (escaped) until [`Engine::describe`] has
    /// read what it is.
    who: String,
    described: bool,
    generation: Option<Box<str>>,
    appeared: u64,
    timeout: u64,
    debounce: u64,
    rate: Option<(u32, Duration)>,
    /// The rate-limit slot counted for the call an in-flight probe may make (its time).
    reserved: Option<u64>,
    /// The identity its attach call carried: its Detach carries the same.
    sent: Option<Identity>,
    /// Its media was removed while its attach call was in flight: detach it once it returns.
    media_gone: bool,
    state: State,
}

impl Entry {
    /// A device that matched `rule` just now: waiting, to be probed.
    fn new(epoch: u64, rule: &Rule, config: &Config, target: Target, generation: Option<&str>, now: u64) -> Entry {
        let timeout = rule.timeout.unwrap_or(config.timeout).as_millis() as u64;
        Entry {
            epoch,
            qube: rule.attach.clone(),
            rule: rule.location(),
            who: Escaped::str(&target.dev).to_string(),
            described: false,
            generation: generation.map(Into::into),
            appeared: now,
            timeout,
            debounce: rule.debounce.unwrap_or(config.debounce).as_millis() as u64,
            rate: rule.rate_limit.or(config.rate_limit),
            reserved: None,
            sent: None,
            media_gone: false,
            state: waiting(now, now + timeout),
            target,
        }
    }

    /// The device for logs: what [`Engine::describe`] read, or its escaped name until then.
    fn who(&self) -> &str {
        &self.who
    }

    fn plan(&self) -> CallPlan {
        CallPlan { qube: self.qube.clone(), kind: self.target.kind, dev: self.target.dev.as_str().into() }
    }

    fn ticket(&self) -> Ticket {
        Ticket { epoch: self.epoch, devpath: self.target.devpath.as_str().into() }
    }

    /// Its attach call may be in flight: carried by a running probe, or started and running.
    fn call_in_flight(&self) -> bool {
        match self.state {
            State::Waiting { probe: Probe::Running { .. } | Probe::SetAside { .. }, .. } => self.reserved.is_some(),
            State::Done(Attach::Running) => true,
            _ => false,
        }
    }
}

/// A rule's recent calls, and the calls its rate limit dropped since it last said so.
#[derive(Debug, Default)]
struct RateWindow {
    times: VecDeque<u64>,
    window: u64,
    dropped: u32,
    /// The last device held back (as logs name it).
    last: String,
}

impl RateWindow {
    /// When the oldest call leaves the window (a call is allowed again), if calls were dropped.
    fn frees_at(&self) -> Option<u64> {
        (self.dropped > 0).then(|| self.times.front().map_or(0, |t| t + self.window))
    }

    /// Forgets calls that left the window; says how many were dropped once a call is allowed
    /// again.
    fn expire(&mut self, rule: &str, now: u64) {
        if self.frees_at().is_some_and(|at| at <= now) {
            if self.dropped > 1 {
                warning!(
                    "rule {rule}: {} more call(s) were held back by its rate limit, the last for {}",
                    self.dropped - 1,
                    self.last
                );
            }
            self.dropped = 0;
            self.last = String::new();
        }
        while self.times.front().is_some_and(|&t| t + self.window <= now) {
            self.times.pop_front();
        }
    }
}

/// Why a tracked device is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forget {
    Removed,
    /// Gone while events were lost (found by a resync).
    Vanished,
}

/// The decision logic.
#[derive(Debug)]
pub struct Engine {
    rules: RuleSet,
    matcher: Matcher,
    config: Config,
    /// Tracked devices by devpath (ordered, so replay is deterministic).
    devices: BTreeMap<Box<str>, Entry>,
    /// Devices removed while their attach call was in flight: kept until it returns.
    leaving: Vec<Entry>,
    /// Call times and held-back calls per rule, for the rate limit.
    calls: BTreeMap<String, RateWindow>,
    /// Devices matched but not yet described in the log (see [`Engine::describe`]).
    undescribed: Vec<Box<str>>,
    epochs: u64,
}

const FIRST_BACKOFF: u64 = 20;
const MAX_BACKOFF: u64 = 1000;
/// How long after a desc-only record was first seen it is taken as whole without a trigger
/// (Qubes' script writes a record's keys within milliseconds of each other).
pub const DESC_GRACE: u64 = 200;

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
            leaving: Vec::new(),
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

    /// How a tracked (or leaving) device is named in logs.
    pub fn identity(&self, epoch: u64, devpath: &str) -> Option<&str> {
        let tracked = self.devices.get(devpath).filter(|e| e.epoch == epoch);
        tracked.or_else(|| self.leaving.iter().find(|e| e.epoch == epoch)).map(Entry::who)
    }

    /// The single decision point for which removed devices get a Detach call: block devices,
    /// because Qubes R4.1 and R4.2 leave a removed block device attached to the target (a dead
    /// disk; dom0/README.md). A USB device passed through with qvm-usb is not detached: its
    /// removal ends the USB proxy's connection and Qubes detaches it itself.
    pub fn detaches(&self, kind: Kind) -> bool {
        self.config.detach && kind == Kind::Block
    }

    /// Handles one event. Allocates nothing for an event that matches no rule.
    pub fn on_event(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut impl Sink) {
        match event.action {
            Action::Remove => {
                if let Some(entry) = self.devices.remove(event.devpath) {
                    self.forget(entry, Forget::Removed, out);
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

    /// A tracked device is gone: its watch is dropped, its reservation given back, and if it
    /// was attached it is detached: now, or once its attach call in flight has returned.
    fn forget(&mut self, mut entry: Entry, why: Forget, out: &mut impl Sink) {
        stop_watching(&mut entry, out);
        let who = entry.who().to_owned();
        match (why, entry.call_in_flight()) {
            (_, true) if matches!(entry.state, State::Done(_)) => {
                let then = match self.detaches(entry.target.kind) {
                    true => "detaching it once the call returns",
                    false => "not detached: Qubes detaches a removed USB device itself",
                };
                info!("{who}: removed while its attach call was in flight: {then}");
                return self.leaving.push(entry);
            }
            (_, true) => {
                info!("{who}: removed while its probe, which carries its attach call, was in flight");
                return self.leaving.push(entry);
            }
            (Forget::Vanished, false) => warning!("{who}: vanished while events were lost; forgotten"),
            (Forget::Removed, false) if matches!(entry.state, State::Done(_)) || entry.sent.is_some() => {
                info!("{who}: removed")
            }
            (Forget::Removed, false) => info!("{who}: removed before it was attached"),
        }
        release(&mut entry, &mut self.calls);
        if matches!(entry.state, State::Done(Attach::Returned { attached: true })) {
            self.detach(&entry, out);
        }
    }

    /// The Detach call for a device this agent attached, if its kind gets one: it carries the
    /// identity its Attach carried.
    fn detach(&self, entry: &Entry, out: &mut impl Sink) {
        if !self.detaches(entry.target.kind) {
            return;
        }
        let who = entry.who();
        let Some(identity) = &entry.sent else {
            // Not reached: an attach call that was made recorded what it carried.
            return error!("{who}: not detached from {}: the identity its attach call carried is unknown", entry.qube);
        };
        let detach = identity
            .ident()
            .map_err(CallError::Identity)
            .and_then(|ident| Call::new(DETACH_SERVICE, &entry.qube, entry.target.kind, &entry.target.dev, ident));
        match detach {
            Ok(call) => {
                info!("{who}: detaching it from {}", entry.qube);
                out.effect(Effect::Call { call, device: who.to_owned(), ticket: None });
            }
            Err(e) => error!("{who}: not detached from {}: {e}", entry.qube),
        }
    }

    fn appear(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, now: u64, out: &mut impl Sink) {
        if let Some(entry) = self.devices.get_mut(event.devpath) {
            let generation = generation(event);
            let replaced =
                event.action == Action::Add && generation.is_some() && generation != entry.generation.as_deref();
            if !replaced {
                if let Some(new) = generation.filter(|g| Some(*g) != entry.generation.as_deref()) {
                    // New media in the same disk (a loop device given a file): the same device.
                    entry.generation = Some(new.into());
                }
                if event.media_change() && media_gone(sysfs, event.devpath) {
                    return self.media_removed(event, now, out);
                }
                return update(entry, &mut self.calls, event, now, out);
            }
            info!("{}: replaced by a new device at the same place (its removal was missed)", entry.who());
            // Not detached: the new device may have its name, and a Detach would take it.
            if let Some(mut old) = self.devices.remove(event.devpath) {
                stop_watching(&mut old, out);
                release(&mut old, &mut self.calls);
            }
        }
        let Some(kind) = attachable(event) else {
            return;
        };
        let Some(index) = self.matcher.first_match(sysfs, &self.rules, event) else {
            return;
        };
        self.track(sysfs, event, kind, index, now, out);
    }

    /// The media of a tracked disk is gone (a `change` with DISK_MEDIA_CHANGE=1 and size 0: a
    /// card pulled, `losetup -d`): an attached disk is detached, now or once its attach call
    /// in flight has returned, and waits for media again (new media is attached again).
    fn media_removed(&mut self, event: &Uevent<'_>, now: u64, out: &mut impl Sink) {
        let Some(entry) = self.devices.get_mut(event.devpath) else { return };
        if matches!(entry.state, State::Done(Attach::Returned { attached: true })) {
            info!("{}: media removed; waiting for media again", entry.who());
            entry.state = State::NoMedia;
            return self.detach(&self.devices[event.devpath], out);
        }
        if entry.call_in_flight() {
            info!(
                "{}: media removed while its attach call was in flight: detaching it once the call returns",
                entry.who()
            );
            entry.media_gone = true;
        }
        update(entry, &mut self.calls, event, now, out);
    }

    /// Starts tracking a device that matched rule `index`: reads what it is (its identity)
    /// and probes it, unless its name or identity could never be sent (refused now, once, not
    /// after waiting for it).
    fn track(&mut self, sysfs: &Sysfs, event: &Uevent<'_>, kind: Kind, index: usize, now: u64, out: &mut impl Sink) {
        let rule = &self.rules.rules[index];
        let dev = match kind {
            Kind::Block => event.get("DEVNAME").unwrap_or_else(|| event.kernel()),
            Kind::Usb => event.kernel(),
        };
        // The names are checked now (the call itself is built once the probe knows the identity).
        let (expected, refused) = match Call::bare(ATTACH_SERVICE, &rule.attach, kind, dev) {
            Err(e) => (None, Some(e.to_string())),
            Ok(_) => match expect(sysfs, event) {
                Ok(expected) => (Some(expected), None),
                Err(NoIdentity::Refused(why)) => (
                    None,
                    Some(format!(
                        "no identity can be sent for it: {why} (autoattach cannot attach it; attach it by hand with \
                         qvm-block or qvm-usb in dom0 if you trust it)"
                    )),
                ),
                Err(gone) => return debug!("{}: {gone}", Escaped::str(event.devpath)),
            },
        };
        self.epochs += 1;
        let target = target(event, kind, dev, expected);
        let mut entry = Entry::new(self.epochs, rule, &self.config, target, generation(event), now);
        if refused.is_some() {
            entry.state = State::Done(Attach::NotMade);
        }
        let entry = self.devices.entry(event.devpath.into()).or_insert(entry);
        // The probe now; describing the device in the log can wait (the run loop describes
        // devices while no probe runs, see `describe`).
        match refused {
            None => {
                send_probe(entry, &mut self.calls, now, out);
                self.undescribed.push(event.devpath.into());
            }
            Some(e) => {
                let described = identity::describe(sysfs, event.devpath);
                entry.who = described.device.to_string();
                entry.described = true;
                info!("{described}: matches {} (ATTACH=\"{}\")", entry.rule, entry.qube);
                error!("{}: not attached: {e}", entry.who);
            }
        }
    }

    /// True if some matched device is waiting for [`Engine::describe`].
    pub fn undescribed(&self) -> bool {
        !self.undescribed.is_empty()
    }

    /// Describes devices matched since the last call and logs their match with the identity
    /// read when they matched; later lines name them by what sysfs says they are (name,
    /// vendor:product, strings, serial). The run loop calls it while no probe is in flight;
    /// replay right after each event.
    pub fn describe(&mut self, sysfs: &Sysfs) {
        for devpath in self.undescribed.drain(..) {
            if let Some(entry) = self.devices.get_mut(&devpath).filter(|e| !e.described) {
                let identity = entry.target.expected.identity().map_err(|e| e.to_string());
                let described = identity::Described { device: sysfs.identity(&devpath), identity };
                entry.who = described.device.to_string();
                entry.described = true;
                info!("{described}: matches {} (ATTACH=\"{}\")", entry.rule, entry.qube);
            }
        }
    }

    /// A probe's answer, and what became of the call it carried.
    pub fn on_verdict(
        &mut self,
        epoch: u64,
        devpath: &str,
        verdict: Verdict,
        carried: Carried,
        now: u64,
        out: &mut impl Sink,
    ) {
        if let Some(i) = self.leaving.iter().position(|e| e.epoch == epoch) {
            return self.left_with_a_probe(i, &verdict, carried);
        }
        let Some(entry) = self.devices.get_mut(devpath).filter(|e| e.epoch == epoch) else {
            return;
        };
        let State::Waiting { probe: running @ (Probe::Running { .. } | Probe::SetAside { .. }), .. } = &mut entry.state
        else {
            return;
        };
        let again = matches!(*running, Probe::Running { again: true } | Probe::SetAside { again: true });
        *running = Probe::Idle;
        if carried != Carried::No {
            stop_watching(entry, out);
        }
        match carried {
            Carried::Made(true) => {
                // The prober made the call the engine counted: it stays counted.
                entry.reserved = None;
                entry.sent = ready_identity(&verdict);
                entry.state = State::Done(Attach::Running);
                return;
            }
            Carried::Made(false) => {
                // The client could not be started (logged by the run loop): nothing was sent.
                release(entry, &mut self.calls);
                entry.media_gone = false;
                entry.state = State::Done(Attach::NotMade);
                return;
            }
            Carried::Refused(e) => {
                error!("{}: not attached: {e}", entry.who());
                release(entry, &mut self.calls);
                entry.media_gone = false;
                entry.state = State::Done(Attach::NotMade);
                return;
            }
            Carried::No => {
                release(entry, &mut self.calls);
                entry.media_gone = false;
            }
        }
        self.judge(devpath, verdict, again, now, out);
    }

    /// The outcome of a probe whose device was removed while it ran (entry `i` of `leaving`).
    fn left_with_a_probe(&mut self, i: usize, verdict: &Verdict, carried: Carried) {
        let entry = &mut self.leaving[i];
        if !matches!(entry.state, State::Waiting { .. }) {
            return;
        }
        if carried == Carried::Made(true) {
            entry.reserved = None;
            entry.sent = ready_identity(verdict);
            entry.state = State::Done(Attach::Running);
            info!(
                "{}: removed while its attach call was in flight: detaching it from {} once the call returns",
                entry.who(),
                entry.qube
            );
            return;
        }
        let mut entry = self.leaving.swap_remove(i);
        release(&mut entry, &mut self.calls);
        debug!("{}: removed; its probe made no call", entry.who());
    }

    /// Acts on a verdict for a waiting device whose probe has returned.
    fn judge(&mut self, devpath: &str, verdict: Verdict, again: bool, now: u64, out: &mut impl Sink) {
        let Some(entry) = self.devices.get_mut(devpath) else {
            return;
        };
        let who = entry.who().to_owned();
        match verdict {
            Verdict::Ready(facts) if entry.debounce > 0 && now < entry.appeared + entry.debounce => {
                let at = entry.appeared + entry.debounce;
                info!("{who}: ready; debounce: calling in {} ms if it stays", at - now);
                stop_watching(entry, out);
                entry.state = State::Settling { at, facts };
            }
            Verdict::Ready(facts) => {
                stop_watching(entry, out);
                self.call(devpath, &facts, now, out);
            }
            Verdict::Unpublished(awaited) => park(entry, &mut self.calls, awaited, again, now, out),
            Verdict::Wait(_) if again => send_probe(entry, &mut self.calls, now, out),
            Verdict::Wait(why) => retry(entry, why, now, out),
            // An event seen while the probe ran (the size a zram disk was just given, a card
            // just inserted) may be the media: look again now, not at the next event.
            Verdict::NoMedia(_) if again => send_probe(entry, &mut self.calls, now, out),
            Verdict::NoMedia(why) => {
                info!("{who}: {why}; waiting for media");
                stop_watching(entry, out);
                entry.state = State::NoMedia;
            }
            Verdict::Gone => {
                debug!("{who}: gone before it was ready");
                if let Some(mut entry) = self.devices.remove(devpath) {
                    stop_watching(&mut entry, out);
                }
            }
            Verdict::Unverifiable(why) => {
                let shows = match &why {
                    Unverifiable::Published { record, .. } => format!("`qubesdb-multiread {record}` shows the record"),
                    Unverifiable::Simulated(_) => "`autoattach test` shows the device".to_owned(),
                };
                error!(
                    "{who}: not attached: no identity can be had {why} ({shows}; it is tried again on its next change event)"
                );
                stop_watching(entry, out);
                entry.state = State::GaveUp;
            }
        }
    }

    /// Makes the call for a ready device, if its rule's rate limit allows.
    fn call(&mut self, devpath: &str, facts: &Facts, now: u64, out: &mut impl Sink) {
        let Some(entry) = self.devices.get_mut(devpath) else {
            return;
        };
        entry.state = State::Done(Attach::NotMade);
        if let Some((count, window)) = entry.rate {
            let rate = self.calls.entry(entry.rule.clone()).or_default();
            rate.window = window.as_millis() as u64;
            rate.expire(&entry.rule, now);
            if rate.times.len() >= count as usize {
                held_back(entry, rate, count, window);
                return;
            }
            rate.times.push_back(now);
        }
        match entry.plan().call(facts) {
            Ok(call) => {
                entry.state = State::Done(Attach::Running);
                entry.sent = Some(facts.identity.clone());
                out.effect(Effect::Call { call, device: entry.who().to_owned(), ticket: Some(entry.ticket()) });
            }
            Err(e) => error!("{}: not attached: {e}", entry.who()),
        }
    }

    /// An attach call has returned: `attached` unless dom0 said it attached nothing
    /// ([`crate::exit::call_attached_nothing`]; an exit that cannot be known counts as
    /// attached). A device removed
    /// while the call was in flight, or whose media was, is detached now.
    pub fn on_call_exit(&mut self, ticket: &Ticket, attached: bool, out: &mut impl Sink) {
        let tracked = self.devices.get_mut(&*ticket.devpath).filter(|e| e.epoch == ticket.epoch);
        if let Some(entry) = tracked {
            if !matches!(entry.state, State::Done(Attach::Running)) {
                return;
            }
            entry.state = State::Done(Attach::Returned { attached });
            if !std::mem::take(&mut entry.media_gone) {
                return;
            }
            entry.state = State::NoMedia;
            if !attached {
                return info!("{}: its attach call did not attach it: nothing to detach", entry.who());
            }
            return self.detach(&self.devices[&*ticket.devpath], out);
        }
        let Some(i) = self.leaving.iter().position(|e| e.epoch == ticket.epoch) else {
            return;
        };
        let entry = self.leaving.swap_remove(i);
        if attached {
            self.detach(&entry, out);
        } else {
            info!("{}: its attach call did not attach it: nothing to detach", entry.who());
        }
    }

    /// The run loop gave up waiting for this device's probe (stuck in the kernel) and set
    /// its worker aside. The device keeps waiting for that probe.
    pub fn on_set_aside(&mut self, epoch: u64, devpath: &str, after: Duration) {
        let Some(entry) = self.devices.get_mut(devpath).filter(|e| e.epoch == epoch) else {
            return;
        };
        if let State::Waiting { probe: probe @ Probe::Running { .. }, .. } = &mut entry.state {
            let again = *probe == Probe::Running { again: true };
            *probe = Probe::SetAside { again };
            warning!(
                "{}: its probe has been stuck in the kernel for {} s (a read that does not return: a failing \
                 device?); set aside: no other probe of it runs until that read returns, and its verdict is taken then",
                entry.who(),
                after.as_secs()
            );
        }
    }

    /// qubesdb reported a change at `path`, one of the trigger keys Qubes' scripts write after
    /// a record's keys: devices waiting on it are probed again, and a desc-form record they
    /// see now is whole.
    pub fn on_published(&mut self, path: &str, now: u64, out: &mut impl Sink) {
        for entry in self.devices.values_mut() {
            let State::Waiting { probe, watched, desc_from, .. } = &mut entry.state else {
                continue;
            };
            if !watched.contains(&path) {
                continue;
            }
            *desc_from = Some(now);
            match probe {
                Probe::Idle => send_probe(entry, &mut self.calls, now, out),
                Probe::Running { again } | Probe::SetAside { again } => *again = true,
            }
        }
    }

    /// Timers: probes due again, publication waits over, debounces over, rate-limit summaries.
    pub fn on_tick(&mut self, now: u64, out: &mut impl Sink) {
        for (rule, rate) in &mut self.calls {
            rate.expire(rule, now);
        }
        let mut settled = Vec::new();
        for (devpath, entry) in &mut self.devices {
            match &entry.state {
                State::Waiting { next, probe: Probe::Idle, .. } if *next <= now => {
                    due(entry, &mut self.calls, now, out)
                }
                State::Settling { at, .. } if *at <= now => settled.push(devpath.clone()),
                _ => {}
            }
        }
        for devpath in settled {
            let Some(entry) = self.devices.get_mut(&devpath) else { continue };
            if let State::Settling { facts, .. } = std::mem::replace(&mut entry.state, State::Done(Attach::NotMade)) {
                self.call(&devpath, &facts, now, out);
            }
        }
    }

    /// When [`Engine::on_tick`] next has something to do.
    pub fn next_wake(&self) -> Option<u64> {
        let devices = self.devices.values().filter_map(|e| match e.state {
            State::Waiting { next, probe: Probe::Idle, .. } => Some(next),
            State::Settling { at, .. } => Some(at),
            _ => None,
        });
        devices.chain(self.calls.values().filter_map(RateWindow::frees_at)).min()
    }

    /// Rescans sysfs after events were lost (and at startup): devices that vanished are
    /// forgotten (and detached, if they were attached); every present one is handled as an
    /// `add`, so unknown and replaced devices are matched and devices still waiting for media
    /// are probed again.
    pub fn resync(&mut self, sysfs: &Sysfs, now: u64, out: &mut impl Sink) -> usize {
        let present = sysfs.scan();
        let vanished: Vec<Box<str>> =
            self.devices.keys().filter(|k| present.binary_search_by(|p| p.as_str().cmp(k)).is_err()).cloned().collect();
        for devpath in vanished {
            if let Some(entry) = self.devices.remove(&devpath) {
                self.forget(entry, Forget::Vanished, out);
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

fn waiting(now: u64, deadline: u64) -> State {
    State::Waiting {
        deadline,
        next: now,
        backoff: FIRST_BACKOFF,
        probe: Probe::Idle,
        watched: &[],
        awaited: None,
        desc_from: None,
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
        State::Waiting { probe: Probe::Running { again } | Probe::SetAside { again }, .. } => *again = true,
        State::Waiting { next, .. } => *next = now,
        State::NoMedia | State::GaveUp => {
            if event.media_change() {
                info!("{}: media changed", entry.who());
            }
            entry.state = waiting(now, now + entry.timeout);
            send_probe(entry, calls, now, out);
        }
        State::Settling { .. } | State::Done(_) => {}
    }
}

/// Sends a waiting device's probe, carrying its call when nothing holds the device back.
fn send_probe(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>, now: u64, out: &mut impl Sink) {
    let State::Waiting { probe, desc_from, .. } = &mut entry.state else {
        return;
    };
    *probe = Probe::Running { again: false };
    let desc_settled = desc_from.is_some_and(|at| at <= now);
    let plan = precall(entry, calls, now);
    let target = Target { desc_settled, ..entry.target.clone() };
    out.effect(Effect::Probe(Job { epoch: entry.epoch, target, plan }));
}

/// The call a probe may make at once if the device is ready. None while a debounce holds the
/// device back or its rule's rate limit has no room (the verdict then comes back to
/// [`Engine::on_verdict`], which decides); otherwise the call is counted now, and the count
/// given back if the device turns out not to be ready or is dropped before its call.
fn precall(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>, now: u64) -> Option<CallPlan> {
    if entry.debounce > 0 && now < entry.appeared + entry.debounce {
        return None;
    }
    if let Some((count, window)) = entry.rate {
        if !calls.contains_key(&entry.rule) {
            calls.insert(entry.rule.clone(), RateWindow::default());
        }
        let rate = calls.get_mut(&entry.rule)?;
        rate.window = window.as_millis() as u64;
        rate.expire(&entry.rule, now);
        if rate.times.len() >= count as usize {
            return None;
        }
        rate.times.push_back(now);
        entry.reserved = Some(now);
    }
    Some(entry.plan())
}

/// Gives back the rate-limit slot counted for a probe whose call was not made.
fn release(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>) {
    let Some(at) = entry.reserved.take() else { return };
    if let Some(rate) = calls.get_mut(&entry.rule) {
        if let Some(i) = rate.times.iter().rposition(|&t| t == at) {
            rate.times.remove(i);
        }
    }
}

/// Says once per run of held-back calls that the rate limit holds this one back (the summary
/// when the window frees names the last one).
fn held_back(entry: &Entry, rate: &mut RateWindow, count: u32, window: Duration) {
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
    rate.last.clone_from(&entry.who);
}

/// A device ready here but not yet published as itself. With a watch (the native client),
/// the trigger keys are watched and the device probed once more right after the watch is in
/// place (a publication between the probe's read and the watch would be missed otherwise);
/// then it waits for the watch until the deadline, polled by nothing. With the program, it
/// is asked again after the backoff. A desc-form record not known to be whole is taken after
/// the grace, or at the next trigger.
fn park(
    entry: &mut Entry,
    calls: &mut BTreeMap<String, RateWindow>,
    awaited: Awaited,
    again: bool,
    now: u64,
    out: &mut impl Sink,
) {
    let who = entry.who().to_owned();
    let State::Waiting { deadline, next, backoff, watched, awaited: last, desc_from, .. } = &mut entry.state else {
        return;
    };
    if awaited.pending == Pending::DescUnsettled && desc_from.is_none() {
        *desc_from = Some(now + DESC_GRACE);
    }
    let grace = desc_from.filter(|&at| at > now);
    let news =
        last.as_ref().is_none_or(|l| std::mem::discriminant(&l.pending) != std::mem::discriminant(&awaited.pending));
    let first_watch = watched.is_empty();
    match awaited.how {
        How::Watch(keys) => {
            *next = grace.map_or(*deadline, |at| at.min(*deadline));
            if first_watch {
                for key in keys {
                    out.effect(Effect::Watch((*key).to_owned()));
                }
                *watched = keys;
            }
        }
        How::Ask(_) => {
            let wait = *backoff;
            *next = grace.unwrap_or(now + wait);
            *backoff = (wait * 2).min(MAX_BACKOFF);
        }
    }
    if news && awaited.pending != Pending::DescUnsettled {
        info!("{who}: waiting: {awaited}");
    } else {
        debug!("{who}: {awaited}");
    }
    *last = Some(awaited);
    if now >= *deadline {
        return give_up(entry, out);
    }
    if first_watch && !watched.is_empty() || again {
        send_probe(entry, calls, now, out);
    }
}

/// A waiting device's timer is due: probe it again (its backoff, or the grace of a desc-form
/// record, is over), unless it waits for a watch and its deadline has come: then give up. (A
/// device probed on a timer gives up when a probe after its deadline says "not yet".)
fn due(entry: &mut Entry, calls: &mut BTreeMap<String, RateWindow>, now: u64, out: &mut impl Sink) {
    let State::Waiting { deadline, watched, .. } = &entry.state else { return };
    if !watched.is_empty() && now >= *deadline {
        return give_up(entry, out);
    }
    send_probe(entry, calls, now, out);
}

/// A device not ready yet: probe again after the backoff, or give up at the deadline.
fn retry(entry: &mut Entry, why: Why, now: u64, out: &mut impl Sink) {
    let who = entry.who().to_owned();
    let State::Waiting { deadline, next, backoff, awaited, .. } = &mut entry.state else {
        return;
    };
    if now >= *deadline {
        *awaited = None;
        return give_up_because(entry, &why.to_string(), out);
    }
    let wait = *backoff;
    *next = now + wait;
    *backoff = (wait * 2).min(MAX_BACKOFF);
    debug!("{who}: {why}; trying again in {wait} ms");
}

/// The rule's timeout is over while it waited for its publication.
fn give_up(entry: &mut Entry, out: &mut impl Sink) {
    let State::Waiting { awaited, .. } = &mut entry.state else { return };
    match awaited.take() {
        Some(a @ Awaited { pending: Pending::Mismatch { .. }, .. }) => {
            error!(
                "{}: not attached after {} ms: {a}: a stale record, another device at its place, or a USB parent \
                 Qubes does not publish (hubs, QEMU devices, QUBES_EXPORT_USB_DEVICE=0); it will be tried again on \
                 its next change event",
                entry.who(),
                entry.timeout
            );
            stop_watching(entry, out);
            entry.state = State::GaveUp;
        }
        Some(a) => give_up_because(entry, &a.to_string(), out),
        None => give_up_because(entry, "not yet published to dom0 in qubesdb", out),
    }
}

/// The rule's timeout is over: the device waits for its next change event.
fn give_up_because(entry: &mut Entry, why: &str, out: &mut impl Sink) {
    warning!(
        "{}: gave up after {} ms: {why} (it will be tried again on its next change event)",
        entry.who(),
        entry.timeout
    );
    stop_watching(entry, out);
    entry.state = State::GaveUp;
}

/// Drops the qubesdb watches of a device that no longer waits for its publication.
fn stop_watching(entry: &mut Entry, out: &mut impl Sink) {
    if let State::Waiting { watched, .. } = &mut entry.state {
        for key in std::mem::take(watched) {
            out.effect(Effect::Unwatch((*key).to_owned()));
        }
    }
}

/// The identity a ready verdict established (what the call it made carried).
fn ready_identity(verdict: &Verdict) -> Option<Identity> {
    match verdict {
        Verdict::Ready(facts) => Some(facts.identity.clone()),
        _ => None,
    }
}

/// What tells two devices at the same devpath apart: the disk sequence number of a block
/// device, the USB device number.
fn generation<'a>(event: &Uevent<'a>) -> Option<&'a str> {
    event.get("DISKSEQ").or_else(|| event.get("DEVNUM"))
}

/// Why a matched device is not tracked, or tracked without a call.
#[derive(Debug)]
enum NoIdentity {
    /// Gone before its identity could be read.
    Gone,
    /// Its devpath holds another device already (a new generation): that one's own event
    /// follows.
    Replaced,
    /// Its identity cannot be computed or sent.
    Refused(String),
}

impl std::fmt::Display for NoIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoIdentity::Gone => f.write_str("matched, but gone before its identity could be read"),
            NoIdentity::Replaced => {
                f.write_str("matched, but another device is already there (its own event follows): not this one's")
            }
            NoIdentity::Refused(why) => f.write_str(why),
        }
    }
}

/// What a probe of the device of `event` checks, with what its identity must be (`expected`;
/// None for a device that is never probed: it has nothing to be checked against).
fn target(event: &Uevent<'_>, kind: Kind, dev: &str, expected: Option<Simulated>) -> Target {
    let none = || {
        let port = match kind {
            Kind::Block => identity::Port::Block(dev.to_owned()),
            Kind::Usb => identity::Port::Usb(dev.to_owned()),
        };
        Simulated { port, records: Records::default(), usb: None, exact: false }
    };
    Target {
        kind,
        devpath: event.devpath.to_owned(),
        dev: dev.to_owned(),
        devnum: event.devnum(),
        bound: event.action == Action::Bind,
        expected: Arc::new(expected.unwrap_or_else(none)),
        desc_settled: false,
    }
}

/// What Qubes would publish for the device of `event`, read from sysfs right after the rule
/// matched it, and confirmed to be that event's device (see [`same_generation`]); its id must
/// be one a call can carry.
fn expect(sysfs: &Sysfs, event: &Uevent<'_>) -> Result<Simulated, NoIdentity> {
    let expected = identity::from_sysfs(sysfs, event.devpath).map_err(|e| match e {
        SimError::Gone(_) => NoIdentity::Gone,
        e @ SimError::NotAttachable(_) => NoIdentity::Refused(e.to_string()),
    })?;
    if !same_generation(sysfs, event) {
        return Err(NoIdentity::Replaced);
    }
    let identity = expected.identity().map_err(|e| NoIdentity::Refused(e.to_string()))?;
    identity.ident().map_err(|e| NoIdentity::Refused(e.to_string()))?;
    Ok(expected)
}

/// True if the device at the event's devpath is still the event's: each generation key the
/// event carries (DISKSEQ, DEVNUM, MAJOR, MINOR) has the same value in the device's `uevent`
/// file, read after its identity. A device replaced at the same devpath (its `remove`
/// missed, or still queued) has new ones. A key the file lacks (a fixture's) proves nothing.
fn same_generation(sysfs: &Sysfs, event: &Uevent<'_>) -> bool {
    let Ok(file) = sysfs.uevent_file(event.devpath) else { return false };
    ["DISKSEQ", "DEVNUM", "MAJOR", "MINOR"].iter().all(|key| {
        let now = file.split(|&b| b == b'\n').find_map(|l| l.strip_prefix(key.as_bytes())?.strip_prefix(b"="));
        match (event.get(key), now) {
            (Some(then), Some(now)) => then.as_bytes() == now,
            _ => true,
        }
    })
}

/// True if a block device's media is gone: its `size` reads 0.
fn media_gone(sysfs: &Sysfs, devpath: &str) -> bool {
    let mut buf = [0u8; crate::sysfs::MAX_ATTR];
    sysfs.attr(devpath, "size", &mut buf).is_ok_and(|size| size.trim_ascii() == b"0")
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

/// What [`perform_inline`] does with a call (a device's description, and the ticket of an
/// attach): `Some(attached)` if it returned at once, `None` if its exit is reported later.
pub type Record<'a> = dyn FnMut(&Call, &str, Option<Ticket>) -> Option<bool> + 'a;

/// Carries out effects inline until none are left, for `replay` and `test`: probes run here
/// with [`Job::run`], calls are handed to `record` with the ticket of an attach, which says
/// whether the call returned at once (`Some(attached)`) or will be reported later with
/// [`Engine::on_call_exit`] (`None`: dom0 takes its time). Watches are ignored (the inline
/// prober asks qubesdb with the fallback program, which never parks a device on a watch).
pub fn perform_inline(engine: &mut Engine, prober: &Prober, effects: Vec<Effect>, now: u64, record: &mut Record<'_>) {
    let mut effects = effects;
    while !effects.is_empty() {
        let mut next = Vec::new();
        for effect in effects {
            match effect {
                Effect::Probe(job) => {
                    let outcome = job.run(prober, |call| call.clone());
                    let ticket = Ticket { epoch: outcome.epoch, devpath: outcome.devpath.as_str().into() };
                    let returned = match &outcome.made {
                        Some(Ok((call, _))) => {
                            let device =
                                engine.identity(outcome.epoch, &outcome.devpath).unwrap_or_default().to_owned();
                            record(call, &device, Some(ticket.clone()))
                        }
                        _ => None,
                    };
                    let carried = outcome.carried(|_| true);
                    let verdict = outcome.verdict;
                    engine.on_verdict(outcome.epoch, &outcome.devpath, verdict, carried, now, &mut next);
                    if let Some(attached) = returned {
                        engine.on_call_exit(&ticket, attached, &mut next);
                    }
                }
                Effect::Call { call, device, ticket } => {
                    let returned = record(&call, &device, ticket.clone());
                    if let (Some(ticket), Some(attached)) = (ticket, returned) {
                        engine.on_call_exit(&ticket, attached, &mut next);
                    }
                }
                Effect::Watch(_) | Effect::Unwatch(_) => {}
            }
        }
        effects = next;
    }
}

#[cfg(test)]
mod tests;
