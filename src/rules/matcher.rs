//! Evaluating rules against an event: udev's rule matching (udev_rules_apply_to_event), with
//! each sysfs value read lazily and at most once per event into buffers allocated when the
//! rules load, so that matching allocates nothing.
//!
//! Values are what udev's rules see (sd-device): KERNEL and KERNELS are the sysfs name with
//! `!` turned into `/` (device_set_sysname_and_sysnum), `ENV{DEVNAME}` is the node path under
//! `/dev/` (device_set_devname), an attribute value loses its trailing newlines and stops at a
//! NUL (sd_device_get_sysattr_value), `driver` and `subsystem` read as their link's name.

use std::fmt::Write as _;
use std::sync::Arc;

use super::{Key, Rule, RuleSet, Test};
use crate::sysfs::{MAX_ATTR, Sysfs};
use crate::uevent::Uevent;

/// The deepest parent walk: sysfs USB storage paths are about 12 levels deep.
pub const MAX_DEPTH: usize = 32;

/// Per-event cache slot: `UNREAD` until read, then the value's place in the arena or `MISSING`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    stamp: u32,
    start: u32,
    len: u32,
}

const MISSING: u32 = u32::MAX;
/// Pseudo attribute ids after the interned names: the `subsystem` and `driver` links.
const SUBSYSTEM_LINK: usize = 0;
const DRIVER_LINK: usize = 1;

/// Evaluates rules against events; holds per-event caches allocated once per rule set.
#[derive(Debug)]
pub struct Matcher {
    /// The attribute names of the rule set this matcher was built for.
    attrs: Vec<Arc<str>>,
    names: usize,
    slots: Vec<Slot>,
    arena: Vec<u8>,
    stamp: u32,
    /// Devpath prefix lengths of the event device (level 0) and the ancestors found so far.
    chain: heapless::Vec<u16, MAX_DEPTH>,
    chain_complete: bool,
    buf: Box<[u8; MAX_ATTR]>,
    /// Per memoised test: the stamp of the event it was evaluated for, and its result.
    memo: Vec<(u32, bool)>,
    /// A value made for one test (a sysname with `!` as `/`, `/dev/` + DEVNAME).
    scratch: Vec<u8>,
}

/// Receives every test evaluated, for `autoattach test`.
pub trait Trace {
    fn rule(&mut self, index: usize, rule: &Rule);
    /// A test on the event device (`level` None) or on a device of the parent walk.
    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool);
    fn parents(&mut self, found: Option<(usize, &str)>);
    fn verdict(&mut self, matched: bool);
}

/// No tracing: the hot path.
struct Silent;

impl Trace for Silent {
    fn rule(&mut self, _: usize, _: &Rule) {}
    fn test(&mut self, _: Option<(usize, &str)>, _: &Test, _: Option<&[u8]>, _: bool) {}
    fn parents(&mut self, _: Option<(usize, &str)>) {}
    fn verdict(&mut self, _: bool) {}
}

impl Matcher {
    /// A matcher for `set` (build a new one when the rules change).
    pub fn new(set: &RuleSet) -> Matcher {
        let names = set.attrs.len() + 2;
        Matcher {
            attrs: set.attrs.clone(),
            names,
            slots: vec![Slot { stamp: 0, start: 0, len: 0 }; names * MAX_DEPTH],
            arena: Vec::with_capacity(4 * 1024),
            stamp: 0,
            chain: heapless::Vec::new(),
            chain_complete: false,
            buf: Box::new([0; MAX_ATTR]),
            memo: vec![(0, false); set.memos],
            scratch: Vec::with_capacity(MAX_ATTR),
        }
    }

    /// The index of the first rule of `set` that matches `event`, reading `sysfs`.
    pub fn first_match(&mut self, sysfs: &Sysfs, set: &RuleSet, event: &Uevent<'_>) -> Option<usize> {
        debug_assert_eq!(self.attrs, set.attrs, "matcher built for another rule set");
        self.begin(event);
        let mut cx = Cx { m: self, sysfs, event, memoise: true };
        set.rules.iter().position(|rule| cx.rule_matches(rule, &mut Silent, false))
    }

    /// Like [`Matcher::first_match`], but evaluates every key of every rule and reports them.
    pub fn explain(
        &mut self,
        sysfs: &Sysfs,
        set: &RuleSet,
        event: &Uevent<'_>,
        trace: &mut dyn Trace,
    ) -> Option<usize> {
        self.begin(event);
        // Every test evaluated and reported with its value: nothing taken from the memo.
        let mut cx = Cx { m: self, sysfs, event, memoise: false };
        let mut first = None;
        for (i, rule) in set.rules.iter().enumerate() {
            trace.rule(i, rule);
            let matched = cx.rule_matches(rule, &mut Tracer(trace), true);
            trace.verdict(matched);
            if matched && first.is_none() {
                first = Some(i);
            }
        }
        first
    }

    fn begin(&mut self, event: &Uevent<'_>) {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Stamps wrapped: forget every slot so none looks current.
            self.slots.iter_mut().for_each(|s| s.stamp = 0);
            self.memo.iter_mut().for_each(|m| m.0 = 0);
            self.stamp = 1;
        }
        self.arena.clear();
        self.chain.clear();
        let _ = self.chain.push(event.devpath.len() as u16);
        self.chain_complete = false;
    }
}

/// One evaluation: the matcher's caches, the tree and the event.
struct Cx<'m, 'e> {
    m: &'m mut Matcher,
    sysfs: &'m Sysfs,
    event: &'m Uevent<'e>,
    /// Take event-device tests already evaluated for this event from the memo.
    memoise: bool,
}

impl Cx<'_, '_> {
    fn rule_matches(&mut self, rule: &Rule, trace: &mut impl Trace, all: bool) -> bool {
        let mut ok = true;
        for test in &rule.tests {
            ok &= self.event_test(test, trace);
            if !ok && !all {
                return false;
            }
        }
        if rule.parent_tests.is_empty() {
            return ok;
        }
        let mut found = None;
        let mut level = 0;
        while let Some(len) = self.level(level) {
            let mut here = true;
            for test in &rule.parent_tests {
                here &= self.parent_test(test, level, trace);
                if !here && !all {
                    break;
                }
            }
            if here {
                found = Some((level, len));
                break;
            }
            level += 1;
        }
        trace.parents(found.map(|(l, len)| (l, &self.event.devpath[..len])));
        ok && found.is_some()
    }

    /// The devpath length of the device `level` steps up the parent walk.
    fn level(&mut self, level: usize) -> Option<usize> {
        let m = &mut *self.m;
        while m.chain.len() <= level && !m.chain_complete {
            let last = *m.chain.last()? as usize;
            match self.sysfs.parent(&self.event.devpath[..last]) {
                Some(parent) if m.chain.push(parent.len() as u16).is_ok() => {}
                _ => m.chain_complete = true,
            }
        }
        m.chain.get(level).map(|&l| l as usize)
    }

    fn event_test(&mut self, test: &Test, trace: &mut impl Trace) -> bool {
        let memo = usize::from(test.memo);
        let stamp = self.m.stamp;
        if self.memoise {
            if let Some(&(_, pass)) = self.m.memo.get(memo).filter(|m| m.0 == stamp) {
                return pass;
            }
        }
        let pass = self.evaluate(test, trace);
        if let Some(slot) = self.m.memo.get_mut(memo) {
            *slot = (stamp, pass);
        }
        pass
    }

    fn evaluate(&mut self, test: &Test, trace: &mut impl Trace) -> bool {
        let event = self.event;
        let (value, attr) = match &test.key {
            Key::Action => (Some(event.action.as_str().as_bytes()), false),
            Key::Devpath => (Some(event.devpath.as_bytes()), false),
            Key::Kernel => (Some(sysname(&mut self.m.scratch, event.kernel())), false),
            Key::Subsystem => (Some(event.subsystem.as_bytes()), false),
            Key::Env(k) if &**k == "DEVNAME" => (event.get(k).map(|d| devname(&mut self.m.scratch, d)), false),
            Key::Env(k) => (event.get(k).map(str::as_bytes), false),
            Key::Driver => match event.get("DRIVER") {
                Some(d) => (Some(d.as_bytes()), false),
                None => (self.cached(0, DRIVER_LINK), false),
            },
            Key::Attr(_, id) => (self.cached(0, *id as usize + 2), true),
            _ => unreachable!("parent keys are evaluated on the parent walk"),
        };
        let pass = if attr { test.on_attr(value) } else { test.on_string(value) };
        trace.test(None, test, value, pass);
        pass
    }

    fn parent_test(&mut self, test: &Test, level: usize, trace: &mut impl Trace) -> bool {
        let event = self.event;
        let len = self.m.chain[level] as usize;
        let (value, attr) = match &test.key {
            Key::Kernels => {
                (Some(sysname(&mut self.m.scratch, crate::uevent::kernel_name(&event.devpath[..len]))), false)
            }
            Key::Subsystems if level == 0 => (Some(event.subsystem.as_bytes()), false),
            Key::Subsystems => (self.cached(level, SUBSYSTEM_LINK), false),
            Key::Drivers => match event.get("DRIVER").filter(|_| level == 0) {
                Some(d) => (Some(d.as_bytes()), false),
                None => (self.cached(level, DRIVER_LINK), false),
            },
            Key::Attrs(_, id) => (self.cached(level, *id as usize + 2), true),
            _ => unreachable!("event keys are evaluated on the event device"),
        };
        let pass = if attr { test.on_attr(value) } else { test.on_string(value) };
        trace.test(Some((level, &event.devpath[..len])), test, value, pass);
        pass
    }

    /// Attribute `id` (or a link) of the device at `level`, read at most once per event.
    fn cached(&mut self, level: usize, id: usize) -> Option<&[u8]> {
        let m = &mut *self.m;
        let index = level * m.names + id;
        if m.slots[index].stamp != m.stamp {
            let devpath = &self.event.devpath[..m.chain[level] as usize];
            let value = match id {
                SUBSYSTEM_LINK => self.sysfs.link(devpath, "subsystem", &mut m.buf),
                DRIVER_LINK => self.sysfs.link(devpath, "driver", &mut m.buf),
                _ => self.sysfs.attr(devpath, &m.attrs[id - 2], &mut m.buf).ok(),
            };
            let start = m.arena.len() as u32;
            let len = match value {
                Some(v) => {
                    m.arena.extend_from_slice(v);
                    v.len() as u32
                }
                None => MISSING,
            };
            m.slots[index] = Slot { stamp: m.stamp, start, len };
        }
        let slot = m.slots[index];
        (slot.len != MISSING).then(|| &m.arena[slot.start as usize..(slot.start + slot.len) as usize])
    }
}

/// sd-device's sysname (device_set_sysname_and_sysnum): the kernel name with each `!` made a
/// `/` (`cciss!c0d0` is `cciss/c0d0`).
fn sysname<'s>(scratch: &'s mut Vec<u8>, name: &'s str) -> &'s [u8] {
    if !name.contains('!') {
        return name.as_bytes();
    }
    scratch.clear();
    scratch.extend(name.bytes().map(|b| if b == b'!' { b'/' } else { b }));
    scratch
}

/// sd-device's DEVNAME property (device_set_devname): the kernel's node name as a path under
/// `/dev/` (`sdb1` is `/dev/sdb1`).
fn devname<'s>(scratch: &'s mut Vec<u8>, name: &'s str) -> &'s [u8] {
    if name.starts_with('/') {
        return name.as_bytes();
    }
    scratch.clear();
    scratch.extend_from_slice(b"/dev/");
    scratch.extend_from_slice(name.as_bytes());
    scratch
}

/// Adapts a `&mut dyn Trace` to the generic evaluation.
struct Tracer<'t>(&'t mut dyn Trace);

impl Trace for Tracer<'_> {
    fn rule(&mut self, i: usize, r: &Rule) {
        self.0.rule(i, r)
    }
    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool) {
        self.0.test(level, test, value, pass)
    }
    fn parents(&mut self, found: Option<(usize, &str)>) {
        self.0.parents(found)
    }
    fn verdict(&mut self, matched: bool) {
        self.0.verdict(matched)
    }
}

/// Writes a value for people: escaped, or `(missing)`.
pub fn show_value(out: &mut String, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            let _ = write!(out, "\"{}\"", crate::log::Escaped(v));
        }
        None => out.push_str("(missing)"),
    }
}
