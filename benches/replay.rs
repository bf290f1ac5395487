//! Replay throughput: events per second through the whole pipeline, as `autoattach replay`
//! runs it (`autoattach::replay::replay`: the fixture tree copied to a work directory,
//! `udevadm monitor` text parsed, the engine with 100 rules, readiness probes inline on the
//! tree, calls collected), over a generated stream: the recorded USB stick plugged and
//! unplugged 1,000 times (20,000 events; per cycle one partition matches rule #100, is probed,
//! attached, and detached on removal).
//!
//! Logging is at warning level (`-q`) and the rate limit off (`--rate-limit 0`): the stream
//! attaches the same stick 1,000 times in no virtual time, which the default limit would
//! refuse (and log) after ten.
//!
//! `cargo bench --bench replay`

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use autoattach::engine::Config;
use autoattach::replay::{ReplayOptions, replay};
use autoattach::rules::Parsed;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CYCLES: usize = 1_000;

/// The stick's events repeated `cycles` times, with increasing SEQNUM and a new DISKSEQ and
/// USB DEVNUM per plug, as a real stick plugged again would have.
fn stream(cycles: usize) -> (String, usize) {
    let one = std::fs::read_to_string(common::stick().join("events")).unwrap();
    let mut out = String::with_capacity(one.len() * cycles);
    let (mut seqnum, mut events) = (5000, 0);
    for cycle in 0..cycles {
        for line in one.lines() {
            if line.starts_with("SEQNUM=") {
                seqnum += 1;
                events += 1;
                writeln!(out, "SEQNUM={seqnum}").unwrap();
            } else if line.starts_with("DISKSEQ=") {
                writeln!(out, "DISKSEQ={}", 3 + cycle).unwrap();
            } else if line.starts_with("DEVNUM=") {
                writeln!(out, "DEVNUM={:03}", 3 + cycle % 125).unwrap();
            } else {
                writeln!(out, "{line}").unwrap();
            }
        }
        out.push('\n');
    }
    (out, events)
}

fn bench(c: &mut Criterion) {
    autoattach::log::init(autoattach::log::Level::Warning);
    let work = common::TempDir::new("replay");
    let rules = work.path().join("bench.rules");
    std::fs::write(&rules, common::hundred_rules()).unwrap();
    let (text, events) = stream(CYCLES);
    let events_file = work.path().join("events");
    std::fs::write(&events_file, text).unwrap();
    let short = work.path().join("events-one");
    std::fs::write(&short, stream(1).0).unwrap();

    let opts = |events: PathBuf| ReplayOptions {
        fixture: common::stick(),
        events: Some(events),
        rules: Some(vec![rules.clone()]),
        dev: None,
        qubesdb: None,
        client: "qrexec-client-vm".into(),
        config: Config { rate_limit: None, ..Config::default() },
    };
    let load = |paths: &[PathBuf]| {
        let mut parsed = Parsed::default();
        for p in paths {
            parsed.add_path(p, true);
        }
        parsed
    };
    let calls = replay(&opts(events_file.clone()), &load).expect("the replay runs");
    assert_eq!(calls.len(), 2 * CYCLES, "one attach and one detach per plug");
    println!("replay: {events} events, {} calls", calls.len());

    let mut group = c.benchmark_group("replay");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(events as u64));
    group.bench_function(format!("{CYCLES} stick plugs ({events} events), 100 rules"), |b| {
        b.iter(|| replay(&opts(events_file.clone()), &load).unwrap().len())
    });
    group.finish();

    // The fixed cost in the figure above: copying the tree and loading the rules, with one cycle.
    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements((events / CYCLES) as u64));
    group
        .bench_function("1 stick plug (setup cost)", |b| b.iter(|| replay(&opts(short.clone()), &load).unwrap().len()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
