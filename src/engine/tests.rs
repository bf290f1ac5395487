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
        .filter_map(|e| if let Effect::Probe(job) = e { Some(job.target.dev.as_str()) } else { None })
        .collect()
}

fn calls(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Call { call, .. } = e { Some(call.service_arg()) } else { None })
        .collect()
}

const READY: Verdict = Verdict::Ready(Facts {});

/// The last effect, a probe: its epoch, and whether it carries a call.
fn last_probe(out: &mut Vec<Effect>) -> (u64, bool) {
    match out.pop() {
        Some(Effect::Probe(job)) => (job.epoch, job.plan.is_some()),
        other => panic!("expected a probe, got {other:?} (before: {out:?})"),
    }
}

struct Stick {
    _tree: Tree,
    sysfs: Sysfs,
    add: Vec<u8>,
    remove: Vec<u8>,
}

fn stick_partition() -> Stick {
    let tree = Tree::stick(b"S1");
    let sysfs = Sysfs::new(tree.root()).unwrap();
    let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    let remove = datagram("remove", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    Stick { _tree: tree, sysfs, add, remove }
}

impl Stick {
    fn add(&self, e: &mut Engine, now: u64, out: &mut Vec<Effect>) {
        e.on_event(&self.sysfs, &Uevent::parse(&self.add).unwrap(), now, out);
    }
    fn remove(&self, e: &mut Engine, now: u64, out: &mut Vec<Effect>) {
        e.on_event(&self.sysfs, &Uevent::parse(&self.remove).unwrap(), now, out);
    }
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
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_DISK, Verdict::NoMedia(Why::SizeZero), Carried::No, 0, &mut out);
    assert!(out.is_empty(), "no media: no call and no timer");
    assert_eq!(e.next_wake(), None);
    e.resync(&sysfs, 100, &mut out);
    assert_eq!(probes(&out), ["sdb"], "probed again after the resync");
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_DISK, READY, Carried::No, 100, &mut out);
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
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"work\"\n");
    let mut out = Vec::new();
    let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition", "DISKSEQ=1"]);
    e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, READY, Carried::No, 0, &mut out);
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
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", DEBOUNCE=\"2s\", RATELIMIT=\"2/1m\"\n",
    );
    let mut out = Vec::new();
    let appear = |e: &mut Engine, at: u64, out: &mut Vec<Effect>| {
        s.add(e, at, out);
        let (epoch, _) = last_probe(out);
        e.on_verdict(epoch, STICK_PART, READY, Carried::No, at, out);
    };
    appear(&mut e, 0, &mut out);
    assert!(out.is_empty(), "held back by the debounce");
    assert_eq!(e.next_wake(), Some(2000));
    s.remove(&mut e, 1000, &mut out);
    e.on_tick(2000, &mut out);
    assert!(out.is_empty(), "removed before it settled: no call");
    for t in [10_000, 20_000, 30_000] {
        appear(&mut e, t, &mut out);
        e.on_tick(t + 2000, &mut out);
        let tickets: Vec<Ticket> = out
            .iter()
            .filter_map(|e| if let Effect::Call { ticket, .. } = e { ticket.clone() } else { None })
            .collect();
        for ticket in tickets {
            e.on_call_exit(&ticket, true, &mut out);
        }
        s.remove(&mut e, t + 5000, &mut out);
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
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", RATELIMIT=\"1/1m\"\n",
    );
    let mut out = Vec::new();
    s.add(&mut e, 0, &mut out);
    let Some(Effect::Probe(Job { epoch, plan: Some(plan), .. })) = out.pop() else { panic!("{out:?}") };
    assert_eq!(plan.call(&Facts::default()).unwrap().service_arg(), "custom.USBDeviceAttach+w+__+sdb1");
    // Not ready yet: the slot is given back, and the retry carries the call again.
    e.on_verdict(epoch, STICK_PART, Verdict::Wait(Why::SizeUnreadable), Carried::No, 0, &mut out);
    e.on_tick(100, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries);
    // The prober made the call: done, and nothing more to do.
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 100, &mut out);
    assert!(out.is_empty());
    e.on_call_exit(&Ticket { epoch, devpath: STICK_PART.into() }, true, &mut out);
    s.remove(&mut e, 200, &mut out);
    assert_eq!(calls(&out), ["custom.USBDeviceDetach+w+__+sdb1"], "it was attached: detach");
    out.clear();
    // Back within the minute: the window is full, so the probe carries no call.
    s.add(&mut e, 300, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(!carries);
    e.on_verdict(epoch, STICK_PART, READY, Carried::No, 300, &mut out);
    assert!(out.is_empty(), "held back by the rate limit: {out:?}");
}

/// Issue 9.3: a `remove` while the probe carries the call, and the probe then finds the
/// device gone, gives the rate-limit slot back. Two such flaps under RATELIMIT="2/1m" leave
/// the real device its call.
#[test]
fn a_rate_limit_slot_comes_back_when_the_device_is_removed_during_its_probe() {
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", RATELIMIT=\"2/1m\"\n",
    );
    let mut out = Vec::new();
    for t in [0, 1000] {
        s.add(&mut e, t, &mut out);
        let (epoch, carries) = last_probe(&mut out);
        assert!(carries, "flap at {t}: the window has room, so the probe carries the call");
        s.remove(&mut e, t + 10, &mut out);
        e.on_verdict(epoch, STICK_PART, Verdict::Gone, Carried::No, t + 20, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
    s.add(&mut e, 2000, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries, "both slots came back: the real device's probe carries its call");
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 2000, &mut out);
    // And a removal with no probe in flight, from waiting, gives nothing back twice.
    s.remove(&mut e, 2100, &mut out);
    s.add(&mut e, 2200, &mut out);
    let (_, carries) = last_probe(&mut out);
    assert!(carries, "one slot of two used");
}

/// Issue 9.5: removed while the probe carries the call and the probe makes it, or while
/// the attach call runs: exactly one Detach, after the Attach has returned. An attach that
/// dom0 refused (non-zero exit) is not undone.
#[test]
fn a_device_removed_while_its_attach_call_is_in_flight_is_detached_after_it() {
    let s = stick_partition();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    let detach = "custom.USBDeviceDetach+w+__+sdb1";
    let ticket = |epoch| Ticket { epoch, devpath: STICK_PART.into() };
    // During the probe, which then makes the call.
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    s.remove(&mut e, 5, &mut out);
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 10, &mut out);
    assert!(out.is_empty(), "no detach before the attach returned: {out:?}");
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach]);
    out.clear();
    // During the call.
    s.add(&mut e, 100, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 110, &mut out);
    s.remove(&mut e, 120, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach]);
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach], "exactly one");
    out.clear();
    // During a call that dom0 refused.
    s.add(&mut e, 200, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 210, &mut out);
    s.remove(&mut e, 220, &mut out);
    e.on_call_exit(&ticket(epoch), false, &mut out);
    assert!(out.is_empty(), "refused: nothing to undo: {out:?}");
    // Returned before the removal, refused: no detach either.
    s.add(&mut e, 300, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 310, &mut out);
    e.on_call_exit(&ticket(epoch), false, &mut out);
    s.remove(&mut e, 320, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// A ready device not yet published, with a watching prober: the key is watched and the
/// device probed once more (a publication between the first read and the watch is not
/// lost); then nothing until the watch reports the key, which probes it (with its call).
/// One that is never published gives up at its timeout and drops the watch.
#[test]
fn unpublished_devices_wait_for_the_watch_not_a_timer() {
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", TIMEOUT=\"10s\"\n",
    );
    let mut out = Vec::new();
    let key = "/qubes-block-devices/sdb1/".to_owned();
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, Verdict::Unpublished(key.clone()), Carried::No, 5, &mut out);
    assert_eq!(out.first(), Some(&Effect::Watch(key.clone())));
    assert_eq!(probes(&out), ["sdb1"], "probed again once the watch is in place");
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries);
    out.clear();
    e.on_verdict(epoch, STICK_PART, Verdict::Unpublished(key.clone()), Carried::No, 6, &mut out);
    assert!(out.is_empty(), "parked: {out:?}");
    assert_eq!(e.next_wake(), Some(10_000), "only the timeout is timed");
    e.on_tick(5000, &mut out);
    assert!(out.is_empty(), "no polling: {out:?}");
    e.on_published("/qubes-block-devices/sdb2/desc", 6000, &mut out);
    assert!(out.is_empty(), "another device's key");
    e.on_published("/qubes-block-devices/sdb1/desc", 6000, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries, "the probe after the watch carries the call");
    e.on_published("/qubes-block-devices/sdb1/size", 6001, &mut out);
    assert!(out.is_empty(), "one probe at a time");
    e.on_verdict(epoch, STICK_PART, READY, Carried::Made(true), 6002, &mut out);
    assert_eq!(out, [Effect::Unwatch(key.clone())]);
    out.clear();
    // Never published.
    s.remove(&mut e, 7000, &mut out);
    s.add(&mut e, 8000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, Verdict::Unpublished(key.clone()), Carried::No, 8000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, Verdict::Unpublished(key.clone()), Carried::No, 8001, &mut out);
    out.clear();
    e.on_tick(18_000, &mut out);
    assert_eq!(out, [Effect::Unwatch(key)], "gave up at the timeout");
}

/// A probe stuck in the kernel is set aside: no second probe of the device while it hangs,
/// even on a change event; when it returns, its verdict stands, and the event seen
/// meanwhile makes a not-ready device probed again at once.
#[test]
fn a_set_aside_probe_is_waited_for_and_its_verdict_taken() {
    let s = stick_partition();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_set_aside(epoch, STICK_PART, Duration::from_secs(5));
    let change = datagram("change", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    e.on_event(&s.sysfs, &Uevent::parse(&change).unwrap(), 6000, &mut out);
    e.on_tick(7000, &mut out);
    assert!(out.is_empty(), "no second probe while the first hangs: {out:?}");
    assert_eq!(e.next_wake(), None);
    let node = std::path::PathBuf::from("/dev/sdb1");
    let why = Why::Unreadable { node, error: crate::readiness::ReadError::Io(nix::errno::Errno::EIO) };
    e.on_verdict(epoch, STICK_PART, Verdict::Wait(why), Carried::No, 60_000, &mut out);
    assert_eq!(probes(&out), ["sdb1"], "the change seen meanwhile: probed again at once");
}
