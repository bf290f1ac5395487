//! Coldplug: `Engine::resync` (what the agent does at start, and after the receive buffer
//! overflowed) over a generated sysfs tree of 1,000 attachable devices, with 100 rules: list
//! `class/block` and `bus/usb/devices`, build each device's `add` from its `uevent` file,
//! match it, and ask for probes for the matches.
//!
//! The tree (in a temporary directory, on the filesystem /tmp is on) is shaped like the
//! kernel's: per group of five, one USB stick (USB device, interface, SCSI host, target, LUN,
//! disk, partition: 3 attachable devices), a USB keyboard, a loop disk. One stick in ten has
//! the serial rule #100 wants, so coldplug also pays for what a match costs.
//!
//! `cargo bench --bench coldplug`

mod common;

use std::time::Duration;

use autoattach::engine::{Config, Effect, Engine};
use autoattach::sysfs::Sysfs;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const DEVICES: usize = 1_000;

fn bench(c: &mut Criterion) {
    autoattach::log::init(autoattach::log::Level::Warning);
    let work = common::TempDir::new("coldplug");
    let made = common::write_tree(work.path(), DEVICES);
    let sysfs = Sysfs::new(work.path().join("sys")).unwrap();
    assert_eq!(sysfs.scan().len(), made, "the scan finds every generated device");

    let mut effects = Vec::new();
    let mut engine = Engine::new(common::hundred_rule_set(), Config::default());
    let before = sysfs.reads();
    let present = engine.resync(&sysfs, 0, &mut effects);
    let probes = effects.iter().filter(|e| matches!(e, Effect::Probe(_))).count();
    println!(
        "coldplug: {present} devices present, {} matched, {probes} probes asked, {} sysfs reads ({:.1} per device)",
        engine.tracked(),
        sysfs.reads() - before,
        (sysfs.reads() - before) as f64 / present as f64
    );
    assert_eq!(present, made);

    let mut group = c.benchmark_group("coldplug");
    group.sample_size(20).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(present as u64));
    group.bench_function(format!("resync, {present} devices, 100 rules"), |b| {
        b.iter(|| {
            // A fresh engine each time: every device is new, as at startup.
            let mut engine = Engine::new(common::hundred_rule_set(), Config::default());
            effects.clear();
            engine.resync(&sysfs, 0, &mut effects)
        })
    });
    group.bench_function(format!("scan only, {present} devices"), |b| b.iter(|| sysfs.scan().len()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
