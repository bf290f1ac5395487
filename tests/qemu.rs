//! Real USB hotplug under qemu (issue 4): the agent inside a stock Debian 6.1 kernel.
//!
//! Why: every other test feeds the agent recorded trees or this machine's own kernel, which has
//! neither USB nor partition tables. Here a real kernel enumerates emulated USB sticks that QMP
//! plugs and unplugs, so the real event order, the real readiness races (partition scan, device
//! node, first read) and the real bus ids reach the real binary. A stand-in qrexec client
//! (`tests/support/standin-client.c`) records every call; each step asserts the exact calls.
//!
//! One qemu boot per host controller (xhci, then ehci), each running the same scenarios:
//! coldplug attach, a non-matching stick ignored, detach on unplug, `CYCLES` hotplug/unplug cycles
//! of a matching stick (attached once each time, readable at the call), a `usb_device` passthrough
//! rule called with the guest's bus id, and a clean exit on SIGTERM. The latency from the kernel's block `add`
//! uevent (`tests/support/uevent-stamp.c`) to the client's exec, both CLOCK_MONOTONIC in the
//! guest, and the wall times are printed (to stderr, uncaptured) for BENCHMARKS.md.
//!
//! `captures_under_qemu` (tests/qemu/capture.rs, ignored unless asked for) records the
//! `tests/fixtures/qemu-*` cases from a boot with Debian's udev in the guest.
//!
//! Run: `cargo test --test qemu -- --test-threads=1` (root, so `tests/qemu/setup.sh` can install
//! qemu and kmod and fetch a kernel; everything is cached under `target/qemu/`). When qemu, the
//! kernel or a static C compiler is missing, the test FAILS if `AUTOATTACH_FULL=1` (CI sets it)
//! and otherwise prints a loud SKIP line and passes. `AUTOATTACH_QEMU_KEEP=1` keeps the run
//! directory (console.log, agent.log, calls.log, uevents.log, initramfs) even on success; a
//! failed run always keeps it and names it in the panic message.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// What the guest runs

/// The rules under test. The sticks QEMU emulates are 46f4:0001 with the serial we give them.
const RULES: &str = include_str!("qemu/qemu.rules");

/// PID 1 of the guest; its header describes the console protocol `Vm::sh` speaks.
const INIT: &str = include_str!("qemu/init.sh");

/// Guest helpers for the host's commands (`/bin/aa`).
const HELPERS: &str = include_str!("qemu/aa.sh");

/// Modules to load, dependencies first; host controllers last, so sticks present at boot
/// enumerate with usb-storage and sd already there.
const MODULE_ROOTS: &[&str] = &["sd_mod", "usb_storage", "xhci_pci", "ehci_pci"];
/// insmod ignores `module.param=` on the kernel command line; the default 1 s delay_use only
/// slows every plug down.
const MODULE_ARGS: &[(&str, &str)] = &[("usb_storage", "delay_use=0")];

const CALLS: &str = "/harness/calls.log";
const UEVENTS: &str = "/tmp/uevents.log";
const AGENT_LOG: &str = "/tmp/agent.log";

/// Guest-side waits, in tenths of a second; host-side command timeouts exceed them.
const GUEST_WAIT_TENTHS: u32 = 300;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a step that must produce no call waits for a wrong one.
const SETTLE: &str = "1.5";
/// Hotplug/unplug cycles of the matching stick per boot.
const CYCLES: usize = 5;

/// Fixtures captured from the real kernel: `captures_under_qemu`.
#[path = "qemu/capture.rs"]
mod capture;

// ---------------------------------------------------------------------------------------------
// The tests

#[derive(Clone, Copy, Debug)]
struct Controller {
    name: &'static str,
    device: &'static str,
}

const XHCI: Controller = Controller { name: "xhci", device: "qemu-xhci" };
const EHCI: Controller = Controller { name: "ehci", device: "usb-ehci" };

#[test]
fn usb_hotplug_under_qemu_xhci() {
    scenarios(XHCI);
}

#[test]
fn usb_hotplug_under_qemu_ehci() {
    scenarios(EHCI);
}

/// One qemu at a time, even if someone forgets `--test-threads=1`: TCG is CPU-bound.
static ONE_QEMU: Mutex<()> = Mutex::new(());

fn scenarios(ctrl: Controller) {
    let _one = ONE_QEMU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let Some(tools) = tools() else { return };
    let run = RunDir::new(ctrl.name);
    let initramfs = build_initramfs(&run.path, &tools, &Guest::HOTPLUG);
    for (name, signature) in [("cold", 1), ("other", 2), ("match", 3), ("pass", 4)] {
        mbr_image(&run.path.join(format!("{name}.img")), signature);
    }
    let prepared = started.elapsed();

    let mut vm = Vm::boot(&tools, &initramfs, &run.path, &hotplug_devices(ctrl, &run.path));
    let booted = vm.started.elapsed();
    let mut steps = Steps::new(&mut vm, ctrl);
    steps.all();
    let samples = steps.latencies();
    vm.shutdown();
    let qemu_wall = vm.started.elapsed();

    report(ctrl, prepared, booted, qemu_wall, &samples);
    run.done();
}

// ---------------------------------------------------------------------------------------------
// The scenarios, in one boot

/// The scenarios of one boot, with the calls expected so far (without timestamps).
struct Steps<'a> {
    vm: &'a mut Vm,
    ctrl: Controller,
    expected: Vec<String>,
}

impl<'a> Steps<'a> {
    fn new(vm: &'a mut Vm, ctrl: Controller) -> Steps<'a> {
        Steps { vm, ctrl, expected: Vec::new() }
    }

    fn all(&mut self) {
        let cold = self.coldplug();
        let other = self.other_stick_ignored();
        self.unplug("cold", &cold, true);
        for cycle in 1..=CYCLES {
            let id = format!("match{cycle}");
            let part = self.plug_matching(&id);
            self.unplug(&id, &part, true);
        }
        self.passthrough();
        self.unplug("other", &other, false);
        self.stop_agent();
    }

    /// A stick present before the agent starts (on the qemu command line) is attached at coldplug.
    fn coldplug(&mut self) -> String {
        let part = self.vm.ok(&format!("aa wait-part MATCH1 {GUEST_WAIT_TENTHS}"));
        self.vm.ok(&format!("/harness/uevent-stamp {UEVENTS} &"));
        self.vm.ok(&format!("aa wait-grep {UEVENTS} listening {GUEST_WAIT_TENTHS}"));
        self.vm.ok(&format!(
            "AUTOATTACH_STANDIN_LOG={CALLS} /harness/autoattach run --rules /etc/autoattach/qemu.rules \
             --qrexec-client /harness/qrexec-client-vm --no-qubesdb -v >{AGENT_LOG} 2>&1 & \
             echo $! >/tmp/agent.pid"
        ));
        self.expect("coldplug of a matching stick", &[attach("work", &stick(&part, "MATCH1"))]);
        part
    }

    /// A stick with another serial enumerates fully (its partition appears) and is not called.
    fn other_stick_ignored(&mut self) -> String {
        self.vm.device_add("other", "OTHER1", self.ctrl);
        let part = self.vm.ok(&format!("aa wait-part OTHER1 {GUEST_WAIT_TENTHS}"));
        self.vm.ok(&format!("sleep {SETTLE}"));
        self.expect("a stick with another serial", &[]);
        part
    }

    /// Hotplug of a matching stick: one call for its partition, readable at that moment.
    fn plug_matching(&mut self, id: &str) -> String {
        let image = self.vm.dir.join("match.img");
        self.vm.drive_add(id, &image);
        self.vm.device_add(id, "MATCH1", self.ctrl);
        let part = self.vm.ok(&format!("aa wait-part MATCH1 {GUEST_WAIT_TENTHS}"));
        self.expect(&format!("hotplug of matching stick {id}"), &[attach("work", &stick(&part, "MATCH1"))]);
        part
    }

    /// Unplug: the guest removes the partition; one the agent attached is detached. The kernel
    /// deletes the node before it sends `remove`, so the client sees readable=no.
    fn unplug(&mut self, id: &str, part: &str, detach: bool) {
        self.vm.device_del(id);
        self.vm.ok(&format!("aa wait-gone /sys/class/block/{part} {GUEST_WAIT_TENTHS}"));
        let calls = if detach {
            vec![format!("dom0 custom.USBDeviceDetach+work+__+{} readable=no", stick(part, "MATCH1"))]
        } else {
            self.vm.ok(&format!("sleep {SETTLE}"));
            Vec::new()
        };
        self.expect(&format!("unplug of {id}"), &calls);
    }

    /// A `usb_device` rule: the call names the bus id the guest shows; its unplug calls nothing.
    fn passthrough(&mut self) {
        self.vm.device_add("pass", "PASS1", self.ctrl);
        self.vm.ok(&format!("aa wait-part PASS1 {GUEST_WAIT_TENTHS}"));
        let busid = self.vm.ok("aa usb-of PASS1");
        if busid.is_empty() || !busid.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.') {
            self.vm.fail(&format!("the guest shows no single bus id for PASS1: {busid:?}"));
        }
        self.expect(
            "passthrough of a usb_device",
            &[format!("dom0 custom.USBDeviceAttach+vault+__+{busid}+__+46f4+0001+PASS1+u080650 readable=n/a")],
        );
        self.vm.device_del("pass");
        self.vm.ok(&format!("aa wait-gone /sys/bus/usb/devices/{busid} {GUEST_WAIT_TENTHS}"));
        self.vm.ok(&format!("sleep {SETTLE}"));
        self.expect("unplug of a passed-through usb_device", &[]);
    }

    /// The agent is still running after all that, and SIGTERM ends it with status 0. (It is a
    /// job of the guest's PID 1 shell, so `wait` gives its status.)
    fn stop_agent(&mut self) {
        let (alive, _) = self.vm.sh("kill -0 \"$(cat /tmp/agent.pid)\"", COMMAND_TIMEOUT);
        if alive != 0 {
            self.vm.fail("the agent is no longer running at the end of the scenarios");
        }
        self.vm.ok("kill -TERM \"$(cat /tmp/agent.pid)\"");
        let (gone, _) = self.vm.sh("aa wait-exit \"$(cat /tmp/agent.pid)\" 100", COMMAND_TIMEOUT);
        if gone != 0 {
            self.vm.fail("the agent did not exit within 10 s of SIGTERM");
        }
        let (status, _) = self.vm.sh("wait \"$(cat /tmp/agent.pid)\"", COMMAND_TIMEOUT);
        if status != 0 {
            self.vm.fail(&format!("the agent exited with status {status} on SIGTERM"));
        }
        self.expect("stopping the agent", &[]);
    }

    /// Waits until the client was called for `new` too, then asserts that the whole log is
    /// exactly what was expected so far: no missing, extra, duplicate or reordered call.
    fn expect(&mut self, step: &str, new: &[String]) {
        self.expected.extend(new.iter().cloned());
        let wait = format!("aa wait-lines {CALLS} {} {GUEST_WAIT_TENTHS}", self.expected.len());
        let (status, _) = self.vm.sh(&wait, COMMAND_TIMEOUT);
        let seen = self.calls();
        if status != 0 || seen != self.expected {
            self.vm.fail(&format!(
                "{}: {step}: calls differ\nexpected:\n  {}\nseen:\n  {}",
                self.ctrl.name,
                self.expected.join("\n  "),
                seen.join("\n  ")
            ));
        }
    }

    /// The client's log, without the timestamps.
    fn calls(&mut self) -> Vec<String> {
        let log = self.vm.ok(&format!("cat {CALLS} 2>/dev/null || true"));
        log.lines().map(|line| line.split_once(' ').map_or(line, |(_, rest)| rest).to_owned()).collect()
    }

    /// For every hotplug call: from the kernel's `add` uevent of the device it names to the
    /// client's exec. Coldplug calls have no `add` in the stamp log and are left out.
    fn latencies(&mut self) -> Vec<Sample> {
        let calls = self.vm.ok(&format!("cat {CALLS}"));
        let uevents = self.vm.ok(&format!("cat {UEVENTS}"));
        let agent_log = self.vm.ok(&format!("cat {AGENT_LOG}"));
        for (name, text) in [("calls.log", &calls), ("uevents.log", &uevents), ("agent.log", &agent_log)] {
            fs::write(self.vm.dir.join(name), text).expect("write a log into the run directory");
        }
        latencies(&calls, &uevents)
    }
}

fn attach(qube: &str, dev: &str) -> String {
    format!("dom0 custom.USBDeviceAttach+{qube}+__+{dev} readable=yes")
}

/// A QEMU stick's partition in a call, `PART+__+IDENT`: its Qubes device id is the stick's
/// (46f4:0001, the serial we give it, one bulk-only mass-storage interface: u080650), the
/// interface 1.0, then the partition number (IDENTITY.md; `:` encoded as `+`).
fn stick(part: &str, serial: &str) -> String {
    let number = part.trim_start_matches(|c: char| !c.is_ascii_digit());
    format!("{part}+__+46f4+0001+{serial}+u080650+1.0+{number}")
}

#[derive(Debug)]
struct Sample {
    call: String,
    micros: u64,
}

/// Pairs each Attach call with the last kernel `add` of its device before the call.
fn latencies(calls: &str, uevents: &str) -> Vec<Sample> {
    let adds: Vec<(u64, &str)> = uevents
        .lines()
        .filter_map(|line| {
            let (ns, event) = line.split_once(' ')?;
            Some((ns.parse().ok()?, event.strip_prefix("add@")?))
        })
        .collect();
    let mut samples = Vec::new();
    for line in calls.lines() {
        let mut fields = line.split(' ');
        let (Some(ns), Some(_), Some(service)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (Ok(call_ns), Some(dev)) = (ns.parse::<u64>(), service.split("+__+").nth(1)) else {
            continue;
        };
        if !service.contains("USBDeviceAttach") {
            continue;
        }
        let suffix = format!("/{dev}");
        let add = adds.iter().rev().find(|(t, path)| *t <= call_ns && path.ends_with(&suffix));
        if let Some((add_ns, _)) = add {
            samples.push(Sample { call: service.to_owned(), micros: (call_ns - add_ns) / 1000 });
        }
    }
    samples
}

/// Printed to stderr directly: cargo's capture hides `eprintln!` of passing tests.
fn report(ctrl: Controller, prepared: Duration, booted: Duration, wall: Duration, samples: &[Sample]) {
    let mut text = format!(
        "\n== qemu USB hotplug ({}): prepare {:.1} s, boot to shell {:.1} s, qemu wall time {:.1} s ==\n",
        ctrl.name,
        prepared.as_secs_f64(),
        booted.as_secs_f64(),
        wall.as_secs_f64()
    );
    for sample in samples {
        text += &format!("   uevent add -> client exec {:>8.1} ms  {}\n", sample.micros as f64 / 1000.0, sample.call);
    }
    // Bus ids start with a digit, block names never do.
    let (usb, block): (Vec<&Sample>, Vec<&Sample>) = samples
        .iter()
        .partition(|s| s.call.split("+__+").nth(1).is_some_and(|d| d.starts_with(|c: char| c.is_ascii_digit())));
    for (what, group) in [("partition", block), ("usb_device", usb)] {
        let mut micros: Vec<u64> = group.iter().map(|s| s.micros).collect();
        micros.sort_unstable();
        if let (Some(min), Some(max)) = (micros.first(), micros.last()) {
            text += &format!(
                "   {} latency, {what} add -> exec, n={}: min {:.1} ms, median {:.1} ms, max {:.1} ms (guest CLOCK_MONOTONIC, TCG)\n",
                ctrl.name,
                micros.len(),
                *min as f64 / 1000.0,
                micros[micros.len() / 2] as f64 / 1000.0,
                *max as f64 / 1000.0
            );
        }
    }
    loud(&text);
}

fn loud(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Tools: tests/qemu/setup.sh, and the skip-or-fail policy

struct Tools {
    qemu: PathBuf,
    busybox: PathBuf,
    kernel: PathBuf,
    modules: PathBuf,
    /// Debian's udevadm, unpacked from the udev package (for the capture boot).
    udevadm: PathBuf,
    /// That udev package's version.
    udev_version: String,
    sfdisk: PathBuf,
}

/// Runs setup.sh and checks for a static C compiler. None means skip (and was said loudly);
/// with AUTOATTACH_FULL=1 anything missing is a failure instead.
fn tools() -> Option<Tools> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/setup.sh");
    let output = match Command::new("bash").arg(&script).stderr(Stdio::piped()).output() {
        Ok(output) => output,
        Err(e) => return missing(&format!("cannot run {}: {e}", script.display())),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return missing(&format!("{} failed ({}):\n{stderr}", script.display(), output.status));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let vars: HashMap<&str, &str> = stdout.lines().filter_map(|line| line.split_once('=')).collect();
    let var = |key: &str| vars.get(key).map(PathBuf::from);
    let (Some(qemu), Some(busybox), Some(kernel), Some(modules), Some(udevadm), Some(sfdisk)) =
        (var("QEMU"), var("BUSYBOX"), var("KERNEL"), var("MODULES"), var("UDEVADM"), var("SFDISK"))
    else {
        return missing(&format!("setup.sh printed no QEMU/BUSYBOX/KERNEL/MODULES/UDEVADM/SFDISK:\n{stdout}"));
    };
    let udev_version = vars.get("UDEV").copied().unwrap_or_default().to_owned();
    if let Err(e) = static_cc_works() {
        return missing(&e);
    }
    Some(Tools { qemu, busybox, kernel, modules, udevadm, udev_version, sfdisk })
}

fn missing(why: &str) -> Option<Tools> {
    if std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1") {
        panic!("qemu USB hotplug test cannot run and AUTOATTACH_FULL=1: {why}");
    }
    loud(&format!(
        "\n########## SKIP qemu USB hotplug test: {why}\n\
         ########## (set AUTOATTACH_FULL=1 to make this a failure)\n"
    ));
    None
}

fn static_cc_works() -> Result<(), String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-cc-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let source = dir.join("probe.c");
    fs::write(&source, "int main(void) { return 0; }\n").map_err(|e| format!("write probe.c: {e}"))?;
    let result = cc_static(&source, &dir.join("probe"));
    let _ = fs::remove_dir_all(&dir);
    result
}

fn cc_static(source: &Path, out: &Path) -> Result<(), String> {
    let output = Command::new("cc")
        .args(["-O2", "-static", "-o"])
        .arg(out)
        .arg(source)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cc -static {} failed (is libc6-dev installed?):\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// A directory under target/tmp for one boot; removed on success unless AUTOATTACH_QEMU_KEEP=1.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new(name: &str) -> RunDir {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qemu-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create the run directory under target/tmp");
        let text = path.to_string_lossy();
        // qemu's option syntax has no escape for these in file= and path=.
        assert!(!text.contains(',') && !text.contains(' '), "run directory {text} has a comma or space");
        RunDir { path }
    }

    fn done(self) {
        if std::env::var_os("AUTOATTACH_QEMU_KEEP").is_some_and(|v| v == "1") {
            loud(&format!("   kept {}\n", self.path.display()));
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// What a boot's initramfs holds beyond busybox, the agent and the harness programs.
struct Guest {
    /// Modules to load (with their dependencies, from modules.dep).
    modules: &'static [&'static str],
    /// Rules files: (name under /etc/autoattach/, text).
    rules: &'static [(&'static str, &'static str)],
    /// Debian's udev: udevadm (which is systemd-udevd too), the package's rules, helpers and
    /// udev.conf, and the shared libraries they need.
    udev: bool,
}

impl Guest {
    const HOTPLUG: Guest = Guest { modules: MODULE_ROOTS, rules: &[("qemu.rules", RULES)], udev: false };
}

fn build_initramfs(dir: &Path, tools: &Tools, guest: &Guest) -> PathBuf {
    let mut cpio = Cpio::default();
    cpio.chardev("dev/console", 0o600, 5, 1);
    for empty in ["proc", "sys", "tmp", "run", "harness", "etc/autoattach"] {
        cpio.dir(empty);
    }

    cpio.file("bin/busybox", 0o755, &read(&tools.busybox));
    let list = Command::new(&tools.busybox).arg("--list").output().expect("run busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // busybox lists itself: a link onto itself makes init fail with ELOOP.
        if applet != "busybox" && !applet.is_empty() && !applet.contains('/') {
            cpio.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/aa", 0o755, HELPERS.as_bytes());
    for (name, text) in guest.rules {
        cpio.file(&format!("etc/autoattach/{name}"), 0o644, text.as_bytes());
    }
    if guest.udev {
        add_udev(&mut cpio, &tools.udevadm);
    }

    let mut order = String::new();
    for module in module_order(&tools.modules, guest.modules) {
        let file = module.file_name().expect("module file name").to_string_lossy().into_owned();
        let args = MODULE_ARGS.iter().find(|(name, _)| normalize(&file) == *name).map_or("", |(_, a)| a);
        order += &format!("{file} {args}\n");
        cpio.file(&format!("modules/{file}"), 0o644, &read(&module));
    }
    cpio.file("modules/order", 0o644, order.as_bytes());

    let agent = Path::new(env!("CARGO_BIN_EXE_autoattach"));
    cpio.file("harness/autoattach", 0o755, &read(agent));
    for lib in shared_libraries(agent) {
        let at = lib.to_string_lossy().trim_start_matches('/').to_owned();
        cpio.file(&at, 0o755, &read(&lib));
    }
    let support = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    for (source, name) in [("standin-client.c", "qrexec-client-vm"), ("uevent-stamp.c", "uevent-stamp")] {
        let out = dir.join(name);
        if let Err(e) = cc_static(&support.join(source), &out) {
            panic!("{e}");
        }
        cpio.file(&format!("harness/{name}"), 0o755, &read(&out));
    }

    let path = dir.join("initramfs.cpio");
    fs::write(&path, cpio.finish()).expect("write the initramfs");
    path
}

/// Debian's udev package, as unpacked by setup.sh: udevadm as /usr/bin/udevadm and, linked to
/// it, /lib/systemd/systemd-udevd; lib/udev/ (rules.d and the helper programs; not hwdb.d, which
/// only `udevadm hwdb --update` would use) and etc/udev/udev.conf; the libraries they need.
fn add_udev(cpio: &mut Cpio, udevadm: &Path) {
    let root = udevadm
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("udev-")))
        .unwrap_or_else(|| panic!("{} is not inside setup.sh's udev-VERSION directory", udevadm.display()));
    let mut programs = vec![("usr/bin/udevadm".to_owned(), udevadm.to_owned())];
    cpio.symlink("lib/systemd/systemd-udevd", "/usr/bin/udevadm");
    cpio.file("etc/udev/udev.conf", 0o644, &read(&root.join("etc/udev/udev.conf")));
    let lib_udev = root.join("lib/udev");
    let mut entries: Vec<PathBuf> =
        fs::read_dir(&lib_udev).expect("list lib/udev").flatten().map(|e| e.path()).collect();
    entries.extend(fs::read_dir(lib_udev.join("rules.d")).expect("list lib/udev/rules.d").flatten().map(|e| e.path()));
    for path in entries.into_iter().filter(|p| p.is_file()) {
        let at = path.strip_prefix(root).expect("inside the package").to_string_lossy().into_owned();
        if at.ends_with(".rules") {
            cpio.file(&at, 0o644, &read(&path));
        } else {
            programs.push((at, path));
        }
    }
    for (at, program) in programs {
        cpio.file(&at, 0o755, &read(&program));
        for lib in shared_libraries(&program) {
            let at = lib.to_string_lossy().trim_start_matches('/').to_owned();
            cpio.file(&at, 0o755, &read(&lib));
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Module names treat `-` and `_` alike; file names drop `.ko`.
fn normalize(file: &str) -> String {
    file.split('.').next().unwrap_or(file).replace('-', "_")
}

/// The module files to insmod for `roots`, each after everything it depends on (modules.dep
/// lists every module's full dependency set; a depth-first walk orders them).
fn module_order(modules: &Path, roots: &[&str]) -> Vec<PathBuf> {
    let dep = fs::read_to_string(modules.join("modules.dep")).expect("read modules.dep");
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((module, needs)) = line.split_once(':') else { continue };
        let name = |path: &str| normalize(path.rsplit('/').next().unwrap_or(path));
        let needs = needs.split_whitespace().map(name).collect();
        deps.insert(name(module), (module.to_owned(), needs));
    }
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        let (path, needs) = deps.get(name).unwrap_or_else(|| panic!("module {name} is not in modules.dep"));
        for need in needs {
            visit(need, deps, seen, out);
        }
        out.push(path.clone());
    }
    let (mut seen, mut out) = (BTreeSet::new(), Vec::new());
    for root in roots {
        visit(root, &deps, &mut seen, &mut out);
    }
    for path in &out {
        assert!(path.ends_with(".ko"), "module {path} is compressed; the initramfs needs plain .ko files");
    }
    out.into_iter().map(|path| modules.join(path)).collect()
}

/// The shared libraries and the loader a dynamically linked program needs, as `ldd` resolves
/// them on this machine; they go into the initramfs at the same paths.
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(program).output().expect("run ldd");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// A `newc` cpio archive, the format the kernel unpacks as initramfs. Parents are created as
/// needed; everything belongs to root.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040755, 0, b"");
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        if !self.files.insert(path.to_owned()) {
            return; // the same library for two programs
        }
        self.parent(path);
        self.entry(path, 0o100000 | perm, 0, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entry(path, 0o120777, 0, target.as_bytes());
    }

    fn chardev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, 0o020000 | perm, (major << 8) | minor, b"");
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// `rdev` packs major << 8 | minor.
    fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, b"");
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// Disk images

/// An 8 MiB image with an MBR holding one Linux partition from sector 2048 to the end, so the
/// guest shows `sdX` and `sdX1`. `signature` tells the images apart in the guest's view.
fn mbr_image(path: &Path, signature: u32) {
    const SECTORS: u32 = 16384;
    const START: u32 = 2048;
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&signature.to_le_bytes());
    let entry = &mut mbr[446..462];
    entry[0] = 0x00; // not bootable
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: unused, LBA is what counts
    entry[4] = 0x83; // Linux
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&START.to_le_bytes());
    entry[12..16].copy_from_slice(&(SECTORS - START).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let mut file = fs::File::create(path).expect("create a disk image");
    file.write_all(&mbr).expect("write the MBR");
    file.set_len(u64::from(SECTORS) * 512).expect("size the disk image");
}

// ---------------------------------------------------------------------------------------------
// qemu: the process, its serial console and QMP. Dropping a Vm kills qemu.

struct Vm {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Console>,
    qmp: Qmp,
    dir: PathBuf,
    seq: u64,
    started: Instant,
}

#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
    grew: Condvar,
}

#[derive(Default)]
struct ConsoleState {
    bytes: Vec<u8>,
    closed: bool,
}

/// The hotplug boot's devices: one controller, the `cold` stick on it, and the backends of the
/// sticks plugged later.
fn hotplug_devices(ctrl: Controller, dir: &Path) -> Vec<String> {
    let image = |name: &str| dir.join(format!("{name}.img")).to_string_lossy().into_owned();
    [
        "-device".to_owned(),
        format!("{},id={}", ctrl.device, ctrl.name),
        "-drive".to_owned(),
        format!("if=none,id=cold,format=raw,file={}", image("cold")),
        "-device".to_owned(),
        format!("usb-storage,bus={}.0,drive=cold,id=cold,serial=MATCH1", ctrl.name),
        "-drive".to_owned(),
        format!("if=none,id=other,format=raw,file={}", image("other")),
        "-drive".to_owned(),
        format!("if=none,id=pass,format=raw,file={}", image("pass")),
    ]
    .into()
}

/// The machine every boot uses, before its devices.
fn qemu_base_args(tools: &Tools, initramfs: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1"]
        .into_iter()
        .chain(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .map(str::to_owned)
        .collect();
    args.extend(["-kernel".to_owned(), tools.kernel.to_string_lossy().into_owned()]);
    args.extend(["-initrd".to_owned(), initramfs.to_string_lossy().into_owned()]);
    args.extend(["-append".to_owned(), "console=ttyS0 quiet panic=-1".to_owned()]);
    args
}

impl Vm {
    /// Starts qemu with `devices` (-device/-drive arguments) and waits for the shell.
    fn boot(tools: &Tools, initramfs: &Path, dir: &Path, devices: &[String]) -> Vm {
        let socket = dir.join("qmp.sock");
        let mut command = Command::new(&tools.qemu);
        command
            .args(qemu_base_args(tools, initramfs))
            .args(devices)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(dir.join("qemu.stderr")).expect("create qemu.stderr"));
        let started = Instant::now();
        let mut child = command.spawn().unwrap_or_else(|e| panic!("start {}: {e}", tools.qemu.display()));
        let stdin = child.stdin.take().expect("qemu stdin");
        let stdout = child.stdout.take().expect("qemu stdout");
        let console = Arc::new(Console::default());
        let log = fs::File::create(dir.join("console.log")).expect("create console.log");
        spawn_console_reader(stdout, log, Arc::clone(&console));
        let qmp = match Qmp::connect(&socket, Instant::now() + Duration::from_secs(30)) {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                panic!("QMP: {e}\nqemu's stderr:\n{stderr}");
            }
        };
        let mut vm = Vm { child, stdin, console, qmp, dir: dir.to_owned(), seq: 0, started };
        if vm.wait_console(0, BOOT_TIMEOUT, |text| text.contains("__BOOTED__").then_some(())).is_none() {
            vm.fail("the guest did not boot to its shell");
        }
        vm
    }

    /// Runs a shell command in the guest: (exit status, output without the trailing newline).
    /// A timeout or a dead guest fails the test.
    fn sh(&mut self, command: &str, timeout: Duration) -> (i32, String) {
        match self.try_sh(command, timeout) {
            Ok(result) => result,
            Err(e) => self.fail(&e),
        }
    }

    /// Like `sh`, and a non-zero status fails the test too.
    fn ok(&mut self, command: &str) -> String {
        let (status, output) = self.sh(command, COMMAND_TIMEOUT);
        if status != 0 {
            self.fail(&format!("guest command failed with status {status}: {command}\n{output}"));
        }
        output
    }

    fn try_sh(&mut self, command: &str, timeout: Duration) -> Result<(i32, String), String> {
        assert!(!command.contains('\n'), "one line per command");
        self.seq += 1;
        let start = self.console.state.lock().unwrap().bytes.len();
        let marker = format!("__DONE_{}_", self.seq);
        self.stdin
            .write_all(format!("{} {command}\n", self.seq).as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("write to the guest console: {e}"))?;
        let found = self.wait_console(start, timeout, |text| {
            let at = text.find(&marker)?;
            let rest = &text[at + marker.len()..];
            let end = rest.find("__")?;
            let status = rest[..end].parse::<i32>().ok()?;
            Some((status, text[..at].replace('\r', "").trim_matches('\n').to_owned()))
        });
        found.ok_or_else(|| format!("no answer within {timeout:?} to guest command: {command}"))
    }

    /// Waits until `check` finds something in the console text after byte `start`.
    fn wait_console<T>(&self, start: usize, timeout: Duration, check: impl Fn(&str) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.console.state.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&state.bytes[start.min(state.bytes.len())..]);
            if let Some(found) = check(&text) {
                return Some(found);
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = self.console.grew.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    fn device_add(&mut self, id: &str, serial: &str, ctrl: Controller) {
        let args = format!(
            r#"{{"driver": "usb-storage", "bus": "{}.0", "drive": "{id}", "id": "{id}", "serial": "{serial}"}}"#,
            ctrl.name
        );
        if let Err(e) = self.qmp.execute("device_add", &args) {
            self.fail(&format!("device_add {id}: {e}"));
        }
    }

    /// Unplugs, and waits for qemu to drop the device and its drive (so the image can be opened
    /// again); the guest's side is waited for separately.
    fn device_del(&mut self, id: &str) {
        if let Err(e) = self.qmp.execute("device_del", &format!(r#"{{"id": "{id}"}}"#)) {
            self.fail(&format!("device_del {id}: {e}"));
        }
        let needle = format!("peripheral/{id}\"");
        if let Err(e) = self.qmp.wait_event("DEVICE_DELETED", &needle, COMMAND_TIMEOUT) {
            self.fail(&format!("device_del {id}: {e}"));
        }
    }

    /// A fresh backend for a re-plug: a `-drive if=none` backend dies with its device.
    fn drive_add(&mut self, id: &str, image: &Path) {
        let line = format!("drive_add 0 if=none,id={id},format=raw,file={}", image.display());
        let args = format!(r#"{{"command-line": "{}"}}"#, json_escape(&line));
        match self.qmp.execute("human-monitor-command", &args) {
            Ok(reply) if reply.contains("OK") => {}
            Ok(reply) => self.fail(&format!("{line}: {reply}")),
            Err(e) => self.fail(&format!("{line}: {e}")),
        }
    }

    /// Powers the guest off and waits for qemu to exit (killing it after 30 s).
    fn shutdown(&mut self) {
        let _ = self.stdin.write_all(format!("{} poweroff -f\n", self.seq + 1).as_bytes());
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails the test with what the guest can still tell: the console before this moment, the
    /// agent's log, the calls, the uevents and the kernel's log (tails in the message, whole
    /// files in the run directory). Dropping the Vm then kills qemu.
    fn fail(&mut self, what: &str) -> ! {
        let console = {
            let state = self.console.state.lock().unwrap();
            String::from_utf8_lossy(&state.bytes[state.bytes.len().saturating_sub(3000)..]).into_owned()
        };
        let mut report = format!("{what}\nrun directory: {}\n", self.dir.display());
        let logs = [
            ("agent.log", format!("cat {AGENT_LOG}"), 60),
            ("calls.log", format!("cat {CALLS}"), 40),
            ("uevents.log", format!("cat {UEVENTS}"), 40),
            ("dmesg.log", "dmesg".to_owned(), 40),
        ];
        for (name, command, tail) in logs {
            match self.try_sh(&format!("{command} 2>&1"), Duration::from_secs(10)) {
                Ok((_, output)) => {
                    let _ = fs::write(self.dir.join(name), &output);
                    let lines: Vec<&str> = output.lines().collect();
                    let last = &lines[lines.len().saturating_sub(tail)..];
                    report += &format!("--- {name} (last {tail} lines):\n{}\n", last.join("\n"));
                }
                Err(e) => {
                    report += &format!("--- {name}: {e}\n");
                    break;
                }
            }
        }
        report += &format!("--- console (last 3000 bytes before the failure):\n{console}\n");
        panic!("{report}");
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Copies qemu's stdout (the serial console) into the shared buffer and console.log, unbuffered.
fn spawn_console_reader(mut stdout: impl Read + Send + 'static, mut log: fs::File, console: Arc<Console>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let _ = log.write_all(&buf[..n]);
            console.state.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
            console.grew.notify_all();
        }
        console.state.lock().unwrap().closed = true;
        console.grew.notify_all();
    });
}

fn json_escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A QMP client: one JSON object per line each way; events seen while waiting for a reply are
/// kept for `wait_event`.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
    events: Vec<String>,
}

impl Qmp {
    fn connect(socket: &Path, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => return Err(format!("connect {}: {e}", socket.display())),
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        };
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut qmp = Qmp { stream, reader, partial: Vec::new(), events: Vec::new() };
        let greeting = qmp.line(deadline)?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", "{}")?;
        Ok(qmp)
    }

    /// Sends a command; Ok(the return line) or Err(the error line).
    fn execute(&mut self, command: &str, arguments: &str) -> Result<String, String> {
        let request = format!("{{\"execute\": \"{command}\", \"arguments\": {arguments}}}\n");
        self.stream.write_all(request.as_bytes()).map_err(|e| format!("QMP write: {e}"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let line = self.line(deadline)?;
            if line.contains("\"event\"") {
                self.events.push(line);
            } else if line.contains("\"return\"") {
                return Ok(line);
            } else if line.contains("\"error\"") {
                return Err(line);
            }
        }
    }

    fn wait_event(&mut self, event: &str, needle: &str, timeout: Duration) -> Result<(), String> {
        let name = format!("\"event\": \"{event}\"");
        let matches = |line: &str| line.contains(&name) && line.contains(needle);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.events.iter().position(|line| matches(line)) {
                self.events.remove(at);
                return Ok(());
            }
            let line = self.line(deadline).map_err(|e| format!("waiting for {event} {needle}: {e}"))?;
            self.events.push(line);
        }
    }

    /// The next line, keeping a partial line across read timeouts.
    fn line(&mut self, deadline: Instant) -> Result<String, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("QMP timed out".to_owned());
            }
            self.reader.get_ref().set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err("QMP closed".to_owned()),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = String::from_utf8_lossy(&self.partial).trim().to_owned();
                    self.partial.clear();
                    return Ok(line);
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(format!("QMP read: {e}")),
            }
        }
    }
}
