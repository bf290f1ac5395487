//! Proof, with a counting allocator, that the receive-parse-filter path allocates nothing for
//! an event that matches no rule, and only a small fixed amount for one that matches.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use autoattach::engine::{Config, Effect, Engine};
use autoattach::rules;
use autoattach::sysfs::Sysfs;
use autoattach::uevent::Uevent;

/// Counts allocations made by the current thread (so the test harness's own threads do not
/// disturb the count).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every method forwards to System with the same arguments; counting touches only a
// const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; the caller upholds GlobalAlloc::alloc's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from System.alloc via this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded unchanged; the caller upholds GlobalAlloc::realloc's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATIONS.with(Cell::get);
    let r = f();
    (r, ALLOCATIONS.with(Cell::get) - before)
}

/// Allocations a matching event may make (the fixture tree is read beneath its root).
const BOUND: usize = 400;

const DISK: &str = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda";

fn datagram(action: &str, devpath: &str, subsystem: &str, vars: &[&str]) -> Vec<u8> {
    let mut d = format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0").into_bytes();
    for v in vars.iter().chain(&["SEQNUM=77"]) {
        d.extend_from_slice(v.as_bytes());
        d.push(0);
    }
    d
}

/// 100 rules, each reading sysfs attributes of the event device's parents (a partition's,
/// or, with `devtype` "disk", a disk's), none matching; then, with `matching`, one that
/// matches the usb-stick fixture.
fn hundred_rules(devtype: &str, matching: bool) -> Engine {
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&format!(
            "SUBSYSTEM==\"block\", ENV{{DEVTYPE}}==\"{devtype}\", ATTRS{{idVendor}}==\"0781\", ATTRS{{serial}}==\"SERIAL{i:04}\", ATTACH=\"q{i}\"\n"
        ));
    }
    if matching {
        text.push_str("SUBSYSTEM==\"block\", ATTRS{serial}==\"4C530001230101115543\", ATTACH=\"backup\"\n");
    }
    let parsed = rules::parse("bench.rules", &text);
    assert!(parsed.errors.is_empty());
    Engine::new(parsed.set, Config::default())
}

/// The agent's own path: the kernel's sysfs (`/sys`, read with one openat2 per attribute),
/// and this machine's block devices. (Fixture trees, which replay, `test` and `list` read,
/// are read beneath their root with checks that allocate: not the agent's path.)
#[test]
fn non_matching_events_allocate_nothing() {
    let sysfs = Sysfs::new("/sys").unwrap();
    assert!(sysfs.is_kernel());
    let mut blocks: Vec<_> = std::fs::read_dir("/sys/class/block").unwrap().flatten().map(|e| e.path()).collect();
    blocks.sort();
    let Some(block) = blocks.first() else {
        assert!(std::env::var_os("AUTOATTACH_FULL").is_none(), "no block device in /sys/class/block");
        return eprintln!("SKIP non_matching_events_allocate_nothing: no block device");
    };
    let target = std::fs::canonicalize(block).unwrap();
    let devpath = target.to_str().unwrap().strip_prefix("/sys").unwrap().to_owned();
    let name = block.file_name().unwrap().to_str().unwrap().to_owned();
    let mut engine = hundred_rules("disk", false);
    let mut effects: Vec<Effect> = Vec::with_capacity(16);
    let devname = format!("DEVNAME={name}");
    let events = [
        // Not attachable at all: filtered before any rule runs.
        datagram("add", "/devices/virtual/net/lo", "net", &["INTERFACE=lo", "IFINDEX=1"]),
        datagram("bind", "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0", "usb", &["DEVTYPE=usb_interface"]),
        // Attachable, 100 rules tried, every ATTRS read from /sys: no rule matches.
        datagram("add", &devpath, "block", &[&devname, "DEVTYPE=disk", "DISKSEQ=3"]),
        datagram("change", &devpath, "block", &[&devname, "DEVTYPE=disk", "DISK_MEDIA_CHANGE=1"]),
        datagram("remove", &devpath, "block", &[&devname, "DEVTYPE=disk"]),
    ];
    // Warm up once (lazy statics of the standard library, if any).
    for d in &events {
        engine.on_event(&sysfs, &Uevent::parse(d).unwrap(), 0, &mut effects);
    }
    let reads = sysfs.reads();
    for d in &events {
        let ((), n) = allocations(|| {
            let event = Uevent::parse(d).unwrap();
            engine.on_event(&sysfs, &event, 1, &mut effects);
        });
        assert_eq!(
            n,
            0,
            "allocated {n} time(s) for {}",
            String::from_utf8_lossy(&d[..d.iter().position(|&b| b == 0).unwrap()])
        );
        assert!(effects.is_empty());
    }
    assert!(sysfs.reads() > reads, "the rules really read sysfs");
}

/// A matching event allocates a bounded, small amount: the tracked entry, the identity read
/// from sysfs (the records Qubes would publish: strings, a few vectors) and its log text.
#[test]
fn matching_events_allocate_a_little() {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usb-stick/sys");
    let sysfs = Sysfs::new(&tree).unwrap();
    let mut engine = hundred_rules("partition", true);
    let mut effects: Vec<Effect> = Vec::with_capacity(16);
    let part = datagram(
        "add",
        &format!("{DISK}/sda1"),
        "block",
        &["MAJOR=8", "MINOR=1", "DEVNAME=sda1", "DEVTYPE=partition", "PARTN=1"],
    );
    let ((), n) = allocations(|| engine.on_event(&sysfs, &Uevent::parse(&part).unwrap(), 0, &mut effects));
    assert_eq!(effects.len(), 1, "a probe is requested");
    println!("allocations for a matching event: {n}");
    assert!(n > 0 && n <= BOUND, "{n} allocations for a matching event");
}

/// The receive itself (a real socket, a real synthetic event) allocates nothing either.
#[test]
fn receiving_allocates_nothing() {
    use autoattach::netlink::{Received, UeventSocket};
    let root = nix::unistd::geteuid().is_root();
    let full = std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1");
    if !root {
        assert!(!full, "receiving_allocates_nothing needs root to make a synthetic event (AUTOATTACH_FULL=1)");
        eprintln!("SKIP receiving_allocates_nothing: needs root");
        return;
    }
    let socket = UeventSocket::open(1 << 20).unwrap();
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = false;
    std::fs::write("/sys/class/block/loop0/uevent", "change").unwrap();
    for _ in 0..2000 {
        let (event, n) = allocations(|| match socket.recv(&mut buf).unwrap() {
            Received::Kernel(d) => Uevent::parse(d).map(|e| e.devpath.ends_with("/loop0")).unwrap_or(false),
            _ => false,
        });
        assert_eq!(n, 0, "recv + parse allocated");
        if event {
            got = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(got, "the synthetic change for loop0 never arrived");
}
