//! Parse: a typical USB `add` datagram and a large one (64 variables), autoattach's
//! `Uevent::parse` against the `kobject-uevent` crate, in one criterion group per datagram so
//! both run in the same conditions.
//!
//! Targets (issue 5): at most 150 ns for the typical event; at least 8x faster than
//! kobject-uevent in the same run.
//!
//! `cargo bench --bench parse` (the ratio: kobject-uevent's time over autoattach's, same group).

mod common;

use std::hint::black_box;

use autoattach::uevent::Uevent;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The stick's partition `add` as the kernel sends it (with SEQNUM), ~250 bytes.
fn typical() -> Vec<u8> {
    let d = common::stick_datagrams()
        .into_iter()
        .find(|d| common::header(d).starts_with("add@") && common::header(d).ends_with("/sda1"))
        .expect("the stick's sda1 add");
    assert!((200..=400).contains(&d.len()), "{} bytes", d.len());
    d
}

/// 64 variables (the kernel's UEVENT_NUM_ENVP), under its 2048-byte budget: a USB interface
/// event with a long modalias and many driver-specific variables.
fn large() -> Vec<u8> {
    let devpath = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0";
    let mut d = format!("add@{devpath}\0ACTION=add\0DEVPATH={devpath}\0SUBSYSTEM=usb\0").into_bytes();
    d.extend_from_slice(b"MODALIAS=usb:v0781p5581d0100dc00dsc00dp00ic08isc06ip50in00\0");
    for i in 0..59 {
        d.extend_from_slice(format!("VAR_{i:02}=value-{i:04}-xxxx\0").as_bytes());
    }
    d.extend_from_slice(b"SEQNUM=5002\0");
    assert_eq!(Uevent::parse(&d).expect("the large event parses").vars().len(), 64);
    d
}

fn bench(c: &mut Criterion) {
    for (name, datagram) in [("typical", typical()), ("large-64-vars", large())] {
        // Both parsers must accept the datagram, or the comparison means nothing.
        let ours = Uevent::parse(&datagram).expect("autoattach parses it");
        let theirs = kobject_uevent::UEvent::from_netlink_packet(&datagram).expect("kobject-uevent parses it");
        assert_eq!(ours.vars().len(), theirs.env.len());
        println!("parse/{name}: {} bytes, {} variables", datagram.len(), ours.vars().len());

        let mut group = c.benchmark_group(format!("parse/{name}"));
        group.throughput(Throughput::Bytes(datagram.len() as u64));
        group.bench_function("autoattach", |b| b.iter(|| Uevent::parse(black_box(&datagram)).map(|e| e.seqnum)));
        group.bench_function("kobject-uevent", |b| {
            b.iter(|| kobject_uevent::UEvent::from_netlink_packet(black_box(&datagram)).map(|e| e.seq))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
