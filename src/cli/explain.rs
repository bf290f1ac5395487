//! `autoattach test DEVICE [--action add|change|remove]`: why a present device matches or not,
//! rule by rule and key by key, and what the agent would do.

use std::fmt::Write as _;
use std::path::Path;

use super::{Opts, client, config, present_event, print, qubesdb, sources::Sources, sysfs};
use crate::engine::{self, Effect, Engine};
use crate::exit::{self, Failure};
use crate::readiness::{Nodes, Prober, Publication};
use crate::rules::{self, Rule, Test, Trace};
use crate::runloop;
use crate::sysfs::Sysfs;
use crate::uevent::{Action, Uevent};

pub fn test(opts: &Opts, name: &str) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let rules = runloop::usable_rules(Sources::of(opts).load())?;
    let action = opts.action.unwrap_or(Action::Add);
    let (devpath, datagram) = present_event(&sysfs, name, action.as_str())?;
    let event = Uevent::parse(&datagram).map_err(|e| Failure::input(format!("{devpath}: {e}")))?;
    let mut report = String::new();
    let db = qubesdb(opts);
    let device = crate::identity::describe(&sysfs, &devpath).device;
    let identity = super::list::identity(&sysfs, &devpath, db.as_ref());
    let _ = writeln!(report, "device {devpath}\n  {device}\n  identity: {identity}");
    let devtype = event.devtype().unwrap_or("-");
    let _ = writeln!(report, "  event: {} {} {devtype} (from sysfs)", event.action, event.subsystem);
    if engine::attachable(&event).is_none() {
        report.push_str(
            "  this device cannot be attached: only block devices and USB devices (DEVTYPE usb_device) \
             can; rules are not tried\n",
        );
        print(&report)?;
        return Ok(exit::NO_MATCH);
    }
    let mut matcher = rules::Matcher::new(&rules);
    let mut explain = Explain { out: report, parents_started: false };
    let first = matcher.explain(&sysfs, &rules, &event, &mut explain);
    let mut report = explain.out;
    let Some(index) = first else {
        report.push_str("\nno rule matches: nothing would be called\n");
        print(&report)?;
        return Ok(exit::NO_MATCH);
    };
    let rule = &rules.rules[index];
    let _ = writeln!(report, "\nfirst match: {} -> ATTACH=\"{}\"", rule.location(), rule.attach);
    if action == Action::Remove {
        let dev = crate::log::Escaped(event.get("DEVNAME").unwrap_or_else(|| event.kernel()).as_bytes()).to_string();
        let then = match event.subsystem {
            "block" => format!(
                "had it attached {dev} to {}, it would call custom.USBDeviceDetach (unless --no-detach)",
                rule.attach
            ),
            _ => "Qubes detaches a removed USB device by itself".into(),
        };
        let _ = writeln!(report, "on remove the agent attaches nothing: {then}");
        print(&report)?;
        return Ok(exit::NO_MATCH);
    }
    would_call(opts, sysfs, db, rules, &event, &mut report);
    print(&report)?;
    Ok(exit::SUCCESS)
}

/// The engine on this one event, a readiness probe now, and the call it would make: the
/// same probe-then-call step ([`engine::Job::run`]) as `run` and `replay`.
fn would_call(
    opts: &Opts,
    sysfs: Sysfs,
    qubesdb: Option<Publication>,
    rules: rules::RuleSet,
    event: &Uevent<'_>,
    report: &mut String,
) {
    let mut engine = Engine::new(rules, config(opts));
    let mut effects = Vec::new();
    engine.on_event(&sysfs, event, 0, &mut effects);
    engine.describe(&sysfs);
    // Under the real /dev a node must be a block device; a fixture's nodes are files.
    let dev = opts.dev.clone().unwrap_or_else(|| "/dev".into());
    let nodes = if dev == Path::new("/dev") { Nodes::Real } else { Nodes::Fixture };
    let prober = Prober { sysfs: std::sync::Arc::new(sysfs), dev, nodes, qubesdb };
    let client = client(opts);
    for effect in effects {
        let Effect::Probe(mut job) = effect else { continue };
        // A device tested is one present for a while: a desc-only record (R4.1/R4.2) is whole.
        job.target.desc_settled = true;
        let outcome = job.run(&prober, |call| call.clone());
        let _ = writeln!(report, "readiness now: {}", outcome.verdict);
        let mut calls = Vec::new();
        if let Some(Ok((call, _))) = &outcome.made {
            calls.push(call.clone());
        }
        let mut later = Vec::new();
        let carried = outcome.carried(|_| true);
        engine.on_verdict(outcome.epoch, &outcome.devpath, outcome.verdict, carried, 0, &mut later);
        calls.extend(later.into_iter().filter_map(|e| match e {
            Effect::Call { call, .. } => Some(call),
            _ => None,
        }));
        for call in calls {
            let _ = writeln!(report, "would call: {} dom0 {}", client.display(), call.service_arg());
        }
    }
}

/// Writes the key-by-key explanation of `autoattach test`.
struct Explain {
    out: String,
    parents_started: bool,
}

impl Trace for Explain {
    fn rule(&mut self, _index: usize, rule: &Rule) {
        let _ = writeln!(self.out, "\nrule {} (ATTACH=\"{}\")", rule.location(), rule.attach);
        self.parents_started = false;
    }

    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool) {
        let mut seen = String::new();
        rules::show_value(&mut seen, value);
        let mark = if pass { "pass" } else { "FAIL" };
        let test = test.to_string();
        match level {
            None => {
                let _ = writeln!(self.out, "  {mark}  {test:<40} value {seen}");
            }
            Some((depth, devpath)) => {
                if !self.parents_started {
                    let _ = writeln!(self.out, "  parent keys, all on one device, walking up from the device:");
                    self.parents_started = true;
                }
                let name = crate::uevent::kernel_name(devpath);
                let _ = writeln!(self.out, "    [{depth}] {name:<14} {mark}  {test:<36} value {seen}");
            }
        }
    }

    fn parents(&mut self, found: Option<(usize, &str)>) {
        let _ = match found {
            Some((depth, devpath)) => {
                writeln!(self.out, "  every parent key holds on [{depth}] {devpath}")
            }
            None => writeln!(
                self.out,
                "  no device passed all parent keys (udev: \"no parent device passed parent conditions\")"
            ),
        };
        self.parents_started = false;
    }

    fn verdict(&mut self, matched: bool) {
        let _ = writeln!(self.out, "  => {}", if matched { "MATCH" } else { "no match" });
    }
}
