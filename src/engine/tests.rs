use super::*;
use crate::identity::{BLOCK_TRIGGER, IdError, USB_TRIGGER};
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

/// The identity of the stick's partition (serial S1), as sysfs gives it.
const PART_ID: &str = "46f4:0001:S1:u080650:1.0:1";
/// ... and encoded in a call.
const PART_IDENT: &str = "46f4+0001+S1+u080650+1.0+1";

fn ready_as(id: &str) -> Verdict {
    Verdict::Ready(Facts { identity: Identity::Id(id.into()) })
}

fn ready() -> Verdict {
    ready_as(PART_ID)
}

fn awaited(pending: Pending) -> Verdict {
    let how = How::Watch(&[BLOCK_TRIGGER, USB_TRIGGER]);
    Verdict::Unpublished(Awaited { record: "/qubes-block-devices/sdb1/".into(), pending, how })
}

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
    e.on_verdict(epoch, STICK_DISK, ready_as("46f4:0001:S1:u080650:1.0"), Carried::No, 100, &mut out);
    assert_eq!(calls(&out), ["custom.USBDeviceAttach+media+__+sdb+__+46f4+0001+S1+u080650+1.0"]);
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
    e.on_verdict(epoch, STICK_PART, ready(), Carried::No, 0, &mut out);
    assert_eq!(calls(&out), [format!("custom.USBDeviceAttach+work+__+sdb1+__+{PART_IDENT}")]);
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
        e.on_verdict(epoch, STICK_PART, ready(), Carried::No, at, out);
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
    assert_eq!(calls(&out), [format!("custom.USBDeviceAttach+w+__+sdb1+__+{PART_IDENT}")], "the window has moved on");
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
    let facts = Facts { identity: Identity::Id(PART_ID.into()) };
    assert_eq!(plan.call(&facts).unwrap().service_arg(), format!("custom.USBDeviceAttach+w+__+sdb1+__+{PART_IDENT}"));
    // Not ready yet: the slot is given back, and the retry carries the call again.
    e.on_verdict(epoch, STICK_PART, Verdict::Wait(Why::SizeUnreadable), Carried::No, 0, &mut out);
    e.on_tick(100, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries);
    // The prober made the call: done, and nothing more to do.
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 100, &mut out);
    assert!(out.is_empty());
    e.on_call_exit(&Ticket { epoch, devpath: STICK_PART.into() }, true, &mut out);
    s.remove(&mut e, 200, &mut out);
    assert_eq!(calls(&out), [format!("custom.USBDeviceDetach+w+__+sdb1+__+{PART_IDENT}")], "it was attached: detach");
    out.clear();
    // Back within the minute: the window is full, so the probe carries no call.
    s.add(&mut e, 300, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(!carries);
    e.on_verdict(epoch, STICK_PART, ready(), Carried::No, 300, &mut out);
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
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 2000, &mut out);
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
    let detach = format!("custom.USBDeviceDetach+w+__+sdb1+__+{PART_IDENT}");
    let ticket = |epoch| Ticket { epoch, devpath: STICK_PART.into() };
    // During the probe, which then makes the call.
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    s.remove(&mut e, 5, &mut out);
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 10, &mut out);
    assert!(out.is_empty(), "no detach before the attach returned: {out:?}");
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach.as_str()]);
    out.clear();
    // During the call.
    s.add(&mut e, 100, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 110, &mut out);
    s.remove(&mut e, 120, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach.as_str()]);
    e.on_call_exit(&ticket(epoch), true, &mut out);
    assert_eq!(calls(&out), [detach.as_str()], "exactly one");
    out.clear();
    // During a call that dom0 refused.
    s.add(&mut e, 200, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 210, &mut out);
    s.remove(&mut e, 220, &mut out);
    e.on_call_exit(&ticket(epoch), false, &mut out);
    assert!(out.is_empty(), "refused: nothing to undo: {out:?}");
    // Returned before the removal, refused: no detach either.
    s.add(&mut e, 300, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 310, &mut out);
    e.on_call_exit(&ticket(epoch), false, &mut out);
    s.remove(&mut e, 320, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// A ready device not yet published, with a watching prober: the trigger keys Qubes'
/// scripts write last are watched and the device probed once more (a publication between
/// the first read and the watch is not lost); then nothing until a trigger is reported,
/// which probes it (with its call). One that is never published gives up at its timeout and
/// drops the watches.
#[test]
fn unpublished_devices_wait_for_the_watch_not_a_timer() {
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", TIMEOUT=\"10s\"\n",
    );
    let mut out = Vec::new();
    let watches = [Effect::Watch(BLOCK_TRIGGER.into()), Effect::Watch(USB_TRIGGER.into())];
    let unwatches = [Effect::Unwatch(BLOCK_TRIGGER.into()), Effect::Unwatch(USB_TRIGGER.into())];
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::Absent), Carried::No, 5, &mut out);
    assert_eq!(out[..2], watches, "a block device on a USB device: both triggers");
    assert_eq!(probes(&out), ["sdb1"], "probed again once the watch is in place");
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries);
    out.clear();
    e.on_verdict(epoch, STICK_PART, awaited(Pending::Absent), Carried::No, 6, &mut out);
    assert!(out.is_empty(), "parked: {out:?}");
    assert_eq!(e.next_wake(), Some(10_000), "only the timeout is timed");
    e.on_tick(5000, &mut out);
    assert!(out.is_empty(), "no polling: {out:?}");
    e.on_published("/qubes-block-devices/sdb1/desc", 6000, &mut out);
    assert!(out.is_empty(), "a record's own key is not what is waited for: {out:?}");
    e.on_published(BLOCK_TRIGGER, 6000, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries, "the probe after the trigger carries the call");
    e.on_published(USB_TRIGGER, 6001, &mut out);
    assert!(out.is_empty(), "one probe at a time");
    e.on_verdict(epoch, STICK_PART, ready(), Carried::Made(true), 6002, &mut out);
    assert_eq!(out, unwatches);
    out.clear();
    // Never published.
    s.remove(&mut e, 7000, &mut out);
    s.add(&mut e, 8000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::Absent), Carried::No, 8000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::Absent), Carried::No, 8001, &mut out);
    out.clear();
    e.on_tick(18_000, &mut out);
    assert_eq!(out, unwatches, "gave up at the timeout");
}

/// A desc-only record (R4.1/R4.2, or an R4.3 record whose `parent` is not written yet) is
/// taken only once known whole: after a trigger, or the grace without one. The probe says
/// so to the prober ([`Target::desc_settled`]).
#[test]
fn a_desc_form_is_taken_after_the_trigger_or_the_grace() {
    let s = stick_partition();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    let settled = |out: &mut Vec<Effect>| match out.pop() {
        Some(Effect::Probe(job)) => (job.epoch, job.target.desc_settled),
        other => panic!("expected a probe, got {other:?}"),
    };
    // No trigger comes (the record was whole before the watch): taken after the grace.
    s.add(&mut e, 0, &mut out);
    let (epoch, desc_ok) = settled(&mut out);
    assert!(!desc_ok);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::DescUnsettled), Carried::No, 10, &mut out);
    let (epoch, desc_ok) = settled(&mut out);
    assert!(!desc_ok, "the probe once the watch is placed");
    e.on_verdict(epoch, STICK_PART, awaited(Pending::DescUnsettled), Carried::No, 11, &mut out);
    assert_eq!(e.next_wake(), Some(10 + DESC_GRACE));
    out.clear();
    e.on_tick(10 + DESC_GRACE, &mut out);
    let (epoch, desc_ok) = settled(&mut out);
    assert!(desc_ok, "after the grace the desc form is taken");
    let desc = Verdict::Ready(Facts { identity: Identity::Desc(b"QEMU_HARDDISK (BACKUP)".to_vec()) });
    e.on_verdict(epoch, STICK_PART, desc, Carried::No, 220, &mut out);
    assert_eq!(calls(&out), ["custom.USBDeviceAttach+w+__+sdb1+__+desc+QEMU_5fHARDDISK_20_28BACKUP_29"]);
    // The trigger comes: the next probe may take it (and sees the whole R4.3 record).
    s.remove(&mut e, 300, &mut out);
    out.clear();
    s.add(&mut e, 400, &mut out);
    let (epoch, _) = settled(&mut out);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::DescUnsettled), Carried::No, 401, &mut out);
    let (epoch, _) = settled(&mut out);
    e.on_verdict(epoch, STICK_PART, awaited(Pending::DescUnsettled), Carried::No, 402, &mut out);
    out.clear();
    e.on_published(BLOCK_TRIGGER, 450, &mut out);
    let (_, desc_ok) = settled(&mut out);
    assert!(desc_ok, "after a trigger, at once");
}

/// Records of another device at its place (a stale record, a swap) are waited past; at the
/// timeout the device is given up (the log names both identities) and nothing is called.
/// Records no identity can be had from are refused at once.
#[test]
fn a_mismatch_is_waited_past_and_an_unverifiable_record_refused() {
    let s = stick_partition();
    let mut e = engine(
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\", TIMEOUT=\"5s\"\n",
    );
    let mut out = Vec::new();
    let stale = || {
        awaited(Pending::Mismatch {
            expected: format!("id \"{PART_ID}\""),
            published: "id \"46f4:0001:EVIL:u080650:1.0:1\"".into(),
        })
    };
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, stale(), Carried::No, 1, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, stale(), Carried::No, 2, &mut out);
    out.clear();
    e.on_published(BLOCK_TRIGGER, 1000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, stale(), Carried::No, 1001, &mut out);
    assert!(calls(&out).is_empty());
    e.on_tick(5000, &mut out);
    assert!(calls(&out).is_empty(), "never called: {out:?}");
    assert!(out.contains(&Effect::Unwatch(BLOCK_TRIGGER.into())), "{out:?}");
    assert_eq!(e.next_wake(), None, "given up");
    // An unverifiable record: no call, no wait.
    s.remove(&mut e, 6000, &mut out);
    out.clear();
    s.add(&mut e, 7000, &mut out);
    let (epoch, _) = last_probe(&mut out);
    let error = IdError::Interface(b"08065x".to_vec());
    let why = Verdict::Unverifiable(Unverifiable::Published { record: "/qubes-usb-devices/2-1/".into(), error });
    e.on_verdict(epoch, STICK_PART, why, Carried::No, 7001, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(e.next_wake(), None);
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

/// The identity is read right after the match and the device's generation confirmed: an
/// event whose devpath already holds a newer device (its `remove` missed or still queued:
/// another DISKSEQ in sysfs) is not tracked; the newer device's own event is.
#[test]
fn a_match_whose_device_was_replaced_is_dropped() {
    let tree = Tree::stick(b"S1");
    let sysfs = Sysfs::new(tree.root()).unwrap();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{idVendor}==\"46f4\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    // The tree's sdb is DISKSEQ 9; an add for DISKSEQ 8 is the device before it.
    let old =
        datagram("add", STICK_DISK, "block", &["DEVNAME=sdb", "DEVTYPE=disk", "DISKSEQ=8", "MAJOR=8", "MINOR=16"]);
    e.on_event(&sysfs, &Uevent::parse(&old).unwrap(), 0, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(e.tracked(), 0);
    let new =
        datagram("add", STICK_DISK, "block", &["DEVNAME=sdb", "DEVTYPE=disk", "DISKSEQ=9", "MAJOR=8", "MINOR=16"]);
    e.on_event(&sysfs, &Uevent::parse(&new).unwrap(), 1, &mut out);
    assert_eq!(probes(&out), ["sdb"]);
    let Some(Effect::Probe(job)) = out.pop() else { panic!() };
    assert_eq!(job.target.expected.identity().unwrap(), Identity::Id("46f4:0001:S1:u080650:1.0".into()));
    // A device gone before its identity could be read is not tracked either.
    std::fs::remove_dir_all(tree.root().join(&STICK_PART[1..])).unwrap();
    let part = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    let mut e = engine("SUBSYSTEM==\"block\", KERNEL==\"sdb1\", ATTACH=\"w\"\n");
    e.on_event(&sysfs, &Uevent::parse(&part).unwrap(), 2, &mut out);
    assert!(out.is_empty() && e.tracked() == 0, "{out:?}");
}

/// The swap at the engine: stick A's call is in flight (dom0 asks the user), A is pulled and
/// stick B (another serial) appears at the same devpath and name. B's probe expects B's
/// identity; A's Detach, once A's Attach returns, carries A's identity (what A's Attach
/// carried), whatever is at the name now.
#[test]
fn a_detach_carries_what_its_attach_carried() {
    let s = stick_partition();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"46f4\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    s.add(&mut e, 0, &mut out);
    let (epoch_a, _) = last_probe(&mut out);
    e.on_verdict(epoch_a, STICK_PART, ready(), Carried::Made(true), 1, &mut out);
    s.remove(&mut e, 2000, &mut out);
    let serial = s._tree.root().join("devices/pci0000:00/0000:00:14.0/usb2/2-1/serial");
    std::fs::write(serial, "S2\n").unwrap();
    s.add(&mut e, 2500, &mut out);
    let Some(Effect::Probe(job)) = out.pop() else { panic!("{out:?}") };
    assert_eq!(job.target.expected.identity().unwrap(), Identity::Id("46f4:0001:S2:u080650:1.0:1".into()));
    e.on_verdict(job.epoch, STICK_PART, ready_as("46f4:0001:S2:u080650:1.0:1"), Carried::Made(true), 2501, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.on_call_exit(&Ticket { epoch: epoch_a, devpath: STICK_PART.into() }, true, &mut out);
    assert_eq!(calls(&out), [format!("custom.USBDeviceDetach+w+__+sdb1+__+{PART_IDENT}")]);
}

/// Media removal (a `change` with DISK_MEDIA_CHANGE=1 and size 0) from an attached disk:
/// detached at once and waiting for media again; during its attach call, detached once the
/// call returns; new media is attached again.
#[test]
fn media_removal_detaches_an_attached_disk() {
    let tree = Tree::stick(b"S1");
    let sysfs = Sysfs::new(tree.root()).unwrap();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{serial}==\"S1\", ATTACH=\"m\"\n");
    let mut out = Vec::new();
    let disk_id = "46f4:0001:S1:u080650:1.0";
    let detach = "custom.USBDeviceDetach+m+__+sdb+__+46f4+0001+S1+u080650+1.0";
    let event = |action, media: bool| {
        let mut vars = vec!["DEVNAME=sdb", "DEVTYPE=disk", "DISKSEQ=9"];
        if media {
            vars.push("DISK_MEDIA_CHANGE=1");
        }
        datagram(action, STICK_DISK, "block", &vars)
    };
    let size = tree.root().join(&STICK_DISK[1..]).join("size");
    e.on_event(&sysfs, &Uevent::parse(&event("add", false)).unwrap(), 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_DISK, ready_as(disk_id), Carried::Made(true), 1, &mut out);
    e.on_call_exit(&Ticket { epoch, devpath: STICK_DISK.into() }, true, &mut out);
    // A change that is not a media change, and a media change with media: nothing.
    e.on_event(&sysfs, &Uevent::parse(&event("change", false)).unwrap(), 10, &mut out);
    e.on_event(&sysfs, &Uevent::parse(&event("change", true)).unwrap(), 11, &mut out);
    assert!(out.is_empty(), "{out:?}");
    std::fs::write(&size, "0\n").unwrap();
    e.on_event(&sysfs, &Uevent::parse(&event("change", true)).unwrap(), 20, &mut out);
    assert_eq!(calls(&out), [detach]);
    out.clear();
    // New media: probed and attached again (the probe carries the call).
    std::fs::write(&size, "2048\n").unwrap();
    e.on_event(&sysfs, &Uevent::parse(&event("change", true)).unwrap(), 30, &mut out);
    let (epoch, carries) = last_probe(&mut out);
    assert!(carries);
    e.on_verdict(epoch, STICK_DISK, ready_as(disk_id), Carried::Made(true), 31, &mut out);
    // Pulled while that call is in flight: the Detach waits for it.
    std::fs::write(&size, "0\n").unwrap();
    e.on_event(&sysfs, &Uevent::parse(&event("change", true)).unwrap(), 40, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.on_call_exit(&Ticket { epoch, devpath: STICK_DISK.into() }, true, &mut out);
    assert_eq!(calls(&out), [detach]);
    out.clear();
    // The removal then calls nothing: nothing is attached.
    e.on_event(&sysfs, &Uevent::parse(&event("remove", false)).unwrap(), 50, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// An identity that cannot be sent (over 2048 bytes encoded: a hostile stick's 511-byte serial
/// of `_`, each sent as `_5f`, and the 72 interfaces udev lists at most) is refused when the device matches: no
/// probe, no call, ever, for that appearance.
#[test]
fn an_identity_too_long_to_send_is_refused_at_the_match() {
    let serial = vec![b'_'; 511];
    let tree = Tree::stick(&serial);
    let usb = tree.root().join(&crate::testing::STICK_USB[1..]);
    let many: Vec<(u8, u8, u8, u8)> = (0..80).map(|i| (3, 0, i, 1)).collect();
    std::fs::write(usb.join("descriptors"), crate::testing::usb_descriptors(&many)).unwrap();
    let sysfs = Sysfs::new(tree.root()).unwrap();
    let expected = identity::from_sysfs(&sysfs, STICK_PART).unwrap().identity().unwrap();
    assert!(expected.ident().is_err(), "the test needs an identity over the bound");
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"46f4\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    let add = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    e.on_event(&sysfs, &Uevent::parse(&add).unwrap(), 0, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(e.tracked(), 1, "tracked, so that later events do not refuse it again");
    let change = datagram("change", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    e.on_event(&sysfs, &Uevent::parse(&change).unwrap(), 10, &mut out);
    e.on_tick(100_000, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// Media that arrives while the probe of the `add` runs (a zram disk sized and announced at
/// once, a card inserted as the reader appears): the probe says "no media", but the `change`
/// seen meanwhile makes the device probed again at once, not left waiting for an event that
/// already came (found by hand: `hot_add`, `disksize` and `echo change` back to back).
#[test]
fn media_announced_during_the_probe_is_looked_at_again() {
    let s = stick_partition();
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    let change = datagram("change", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    e.on_event(&s.sysfs, &Uevent::parse(&change).unwrap(), 1, &mut out);
    assert!(out.is_empty(), "one probe at a time: {out:?}");
    e.on_verdict(epoch, STICK_PART, Verdict::NoMedia(Why::SizeZero), Carried::No, 2, &mut out);
    let (again, carries) = last_probe(&mut out);
    assert!(carries, "the second probe carries the call");
    e.on_verdict(again, STICK_PART, ready(), Carried::No, 3, &mut out);
    assert_eq!(calls(&out), [format!("custom.USBDeviceAttach+w+__+sdb1+__+{PART_IDENT}")]);
    // Without an event meanwhile, "no media" waits for the kernel's change event.
    let mut e = engine("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"S1\", ATTACH=\"w\"\n");
    let mut out = Vec::new();
    s.add(&mut e, 0, &mut out);
    let (epoch, _) = last_probe(&mut out);
    e.on_verdict(epoch, STICK_PART, Verdict::NoMedia(Why::SizeZero), Carried::No, 2, &mut out);
    e.on_tick(60_000, &mut out);
    assert!(out.is_empty(), "waits for media: {out:?}");
}
