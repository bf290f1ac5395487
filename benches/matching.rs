//! Match: 100 rules against each event of a USB stick's plug and unplug, over the recorded
//! sysfs tree (tests/fixtures/usb-stick/sys), with the sysfs reads counted.
//!
//! What it shows (printed before the timings, one line per event): attributes are read lazily
//! (an event no rule can apply to reads nothing), at most once per device of the parent walk
//! per event whatever the number of rules testing them, and only the attributes some rule
//! names. The "naive" column is how many reads the same evaluation would make without the
//! per-event cache: one per attribute test evaluated.
//!
//! A fixture tree is read the careful way (every path resolved by `openat2` with
//! `RESOLVE_BENEATH`, its type checked on an `O_PATH` fd before it is opened); the agent reads the
//! kernel's own sysfs with one `openat2` per attribute. So, as root, the 100 rules are also
//! matched on this machine's real `/sys`, against a loop disk the bench makes (`losetup`, 2 MiB,
//! detached at the end): its `add` (rule #100 replaced by one that names the disk by three of its
//! attributes), and one attribute read in each mode, which compares the read paths themselves.
//! Without root that part says so and is skipped.
//!
//! `cargo bench --bench matching`

mod common;

use std::hint::black_box;

use autoattach::engine::attachable;
use autoattach::rules::{Matcher, Rule, RuleSet, Test, Trace};
use autoattach::sysfs::Sysfs;
use autoattach::uevent::{Action, Uevent};
use criterion::{Criterion, criterion_group, criterion_main};

/// Counts the reads a matcher without the per-event cache would make: one per sysfs-backed
/// test that `first_match` evaluates. `Matcher::explain` reports every test of every rule, so
/// this replays `first_match`'s short-circuits: a rule stops at its first failing event test
/// (before any parent walk), a device of the walk at its first failing parent test, and the
/// whole evaluation at the first matching rule.
#[derive(Default)]
struct NaiveReads {
    reads: u64,
    event_has_driver: bool,
    /// An event test of this rule failed: nothing after it runs.
    rule_failed: bool,
    /// The walk level whose parent tests are being evaluated, and whether one failed there.
    level: Option<usize>,
    level_failed: bool,
    matched: bool,
}

impl Trace for NaiveReads {
    fn rule(&mut self, _: usize, _: &Rule) {
        (self.rule_failed, self.level, self.level_failed) = (false, None, false);
    }
    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, _: Option<&[u8]>, pass: bool) {
        use autoattach::rules::Key;
        if self.matched || self.rule_failed {
            return;
        }
        let level = level.map(|(l, _)| l);
        if level.is_some() && level != self.level {
            (self.level, self.level_failed) = (level, false);
        }
        if self.level_failed {
            return;
        }
        let read = match (&test.key, level) {
            (Key::Attr(..) | Key::Attrs(..), _) => true,
            (Key::Driver, _) | (Key::Drivers, Some(0)) => !self.event_has_driver,
            (Key::Subsystems | Key::Drivers, Some(l)) => l > 0,
            _ => false,
        };
        self.reads += u64::from(read);
        match level {
            None => self.rule_failed |= !pass,
            Some(_) => self.level_failed |= !pass,
        }
    }
    fn parents(&mut self, _: Option<(usize, &str)>) {}
    fn verdict(&mut self, matched: bool) {
        self.matched |= matched;
    }
}

/// What `Engine::on_event` does before any rule runs: only an appearance (`add`, `change`,
/// `bind`, `online`) of a block device or `usb_device` is matched (only those can be
/// attached; a `remove` looks up what is tracked).
fn first_match(matcher: &mut Matcher, sysfs: &Sysfs, set: &RuleSet, event: &Uevent<'_>) -> Option<usize> {
    if !matches!(event.action, Action::Add | Action::Change | Action::Bind | Action::Online) {
        return None;
    }
    attachable(event)?;
    matcher.first_match(sysfs, set, event)
}

fn bench(c: &mut Criterion) {
    let sysfs = Sysfs::new(common::stick().join("sys")).expect("the stick's tree");
    let set = common::hundred_rule_set();
    let mut matcher = Matcher::new(&set);
    let datagrams = common::stick_datagrams();

    println!("100 rules naming {} distinct attributes: {:?}", set.attr_names().len(), set.attr_names());
    println!("{:>5} {:>6} {:>22}  event", "reads", "naive", "first match");
    let mut total = (0, 0);
    for d in &datagrams {
        let event = Uevent::parse(d).unwrap();
        let before = sysfs.reads();
        let found = first_match(&mut matcher, &sysfs, &set, &event);
        let reads = sysfs.reads() - before;
        let mut naive = NaiveReads { event_has_driver: event.get("DRIVER").is_some(), ..NaiveReads::default() };
        if reads > 0 {
            Matcher::new(&set).explain(&sysfs, &set, &event, &mut naive);
        }
        let label = found.map_or("-".to_owned(), |i| format!("#{} ({})", i + 1, set.rules[i].location()));
        println!("{reads:>5} {:>6} {label:>22}  {}", naive.reads, common::header(d));
        total = (total.0 + reads, total.1 + naive.reads);
    }
    println!(
        "stick plug+unplug: {} events, {} sysfs reads ({:.2} per event), naive {}",
        datagrams.len(),
        total.0,
        total.0 as f64 / datagrams.len() as f64,
        total.1
    );

    let partition = datagrams
        .iter()
        .find(|d| common::header(d).starts_with("add@") && common::header(d).ends_with("/sda1"))
        .unwrap();
    let mut group = c.benchmark_group("match/100-rules");
    group.bench_function("stick-partition-add (matches rule #100)", |b| {
        b.iter(|| {
            let event = Uevent::parse(black_box(partition)).unwrap();
            first_match(&mut matcher, &sysfs, &set, &event)
        })
    });
    group.bench_function(format!("whole plug+unplug ({} events)", datagrams.len()), |b| {
        b.iter(|| {
            let mut n = 0;
            for d in &datagrams {
                let event = Uevent::parse(black_box(d)).unwrap();
                n += usize::from(first_match(&mut matcher, &sysfs, &set, &event).is_some());
            }
            n
        })
    });
    group.finish();
}

/// A loop disk over a 2 MiB file, detached on drop.
struct LoopDisk {
    _dir: common::TempDir,
    dev: String,
    /// Its devpath, e.g. `/devices/virtual/block/loop8`.
    devpath: String,
}

impl LoopDisk {
    fn new() -> Result<LoopDisk, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("not root".into());
        }
        let dir = common::TempDir::new("matching-loop");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 2 << 20]).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let devpath = format!("/devices/virtual/block/{}", dev.trim_start_matches("/dev/"));
        Ok(LoopDisk { _dir: dir, dev, devpath })
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// The same 100 rules on the kernel's own sysfs (the agent's read path), and one attribute read
/// in each mode.
fn real_sysfs(c: &mut Criterion) {
    let made = match LoopDisk::new() {
        Ok(made) => made,
        Err(why) => return println!("real /sys: skipped ({why}): run as root to measure the agent's own read path"),
    };
    let sysfs = Sysfs::new("/sys").expect("/sys");
    // Rule #100 names the disk by three of its attributes (the stick's names its USB device by
    // three); rules #1-#99 end at their SUBSYSTEM, KERNEL or DEVTYPE test for a loop disk.
    let mut rules: Vec<String> = common::hundred_rules().lines().map(str::to_owned).collect();
    let last = rules.iter().rposition(|l| l.contains("ATTACH=")).unwrap();
    let kernel = made.devpath.rsplit('/').next().unwrap();
    rules[last] = format!(
        "SUBSYSTEM==\"block\", KERNEL==\"{kernel}\", ATTR{{size}}==\"4096\", ATTR{{ro}}==\"0\", \
         ATTR{{removable}}==\"0\", ATTACH=\"q99\""
    );
    let parsed = autoattach::rules::parse("hundred.rules", &rules.join("\n"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let set = parsed.set;
    let mut matcher = Matcher::new(&set);
    let datagram = autoattach::engine::synthetic_add(&sysfs, &made.devpath).expect("the loop disk's uevent");
    let event = Uevent::parse(&datagram).unwrap();
    let before = sysfs.reads();
    let found = first_match(&mut matcher, &sysfs, &set, &event);
    assert_eq!(found, Some(set.rules.len() - 1), "rule #100 matches {}", made.devpath);
    println!(
        "real /sys: add@{} against 100 rules: {} sysfs reads, first match #{}",
        made.devpath,
        sysfs.reads() - before,
        set.rules.len()
    );
    let mut group = c.benchmark_group("match/100-rules");
    group.bench_function("real /sys: loop disk add (matches rule #100)", |b| {
        b.iter(|| {
            let event = Uevent::parse(black_box(&datagram)).unwrap();
            first_match(&mut matcher, &sysfs, &set, &event)
        })
    });
    // The storm's event (bench/kernel.sh): a `change` of a loop disk that no rule names; every
    // rule is tried and fails on its SUBSYSTEM, KERNEL or DEVTYPE test, with no sysfs read.
    let storm = String::from_utf8(datagram.clone())
        .unwrap()
        .replacen("add@", "change@", 1)
        .replace("ACTION=add", "ACTION=change");
    let storm = storm
        .replace(&format!("DEVNAME={kernel}"), "DEVNAME=loop999")
        .replace(&made.devpath, "/devices/virtual/block/loop999");
    let storm = storm.into_bytes();
    let event = Uevent::parse(&storm).unwrap();
    let before = sysfs.reads();
    assert_eq!(first_match(&mut matcher, &sysfs, &set, &event), None);
    assert_eq!(sysfs.reads(), before, "the storm's event reads nothing");
    group.bench_function("real /sys: storm change of a loop disk no rule names (all 100 fail)", |b| {
        b.iter(|| {
            let event = Uevent::parse(black_box(&storm)).unwrap();
            first_match(&mut matcher, &sysfs, &set, &event)
        })
    });
    group.finish();

    let fixture = Sysfs::new(common::stick().join("sys")).expect("the stick's tree");
    let stick_partition = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1";
    let mut buf = [0u8; autoattach::sysfs::MAX_ATTR];
    assert!(fixture.attr(stick_partition, "size", &mut buf).is_ok(), "the stick's sda1 has a size");
    let mut group = c.benchmark_group("sysfs/one attribute read");
    group.bench_function("fixture tree (openat2 beneath, O_PATH type check)", |b| {
        b.iter(|| fixture.attr(black_box(stick_partition), "size", &mut buf).map(|v| v.len()))
    });
    group.bench_function("real /sys (the agent's path)", |b| {
        b.iter(|| sysfs.attr(black_box(&made.devpath), "size", &mut buf).map(|v| v.len()))
    });
    group.finish();
}

criterion_group!(benches, bench, real_sysfs);
criterion_main!(benches);
