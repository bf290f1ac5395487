//! The real `autoattach run` against this machine's kernel: real uevents from loop devices,
//! zram and synthetic `uevent` writes, real device nodes, a real socket, forged events.
//!
//! Needs root. Without root the tests print SKIP and pass, unless AUTOATTACH_FULL=1 (CI sets
//! it): then a missing privilege or tool is a failure, never a silent skip.
//!
//! Each test makes its own devices (loop devices at indexes no other test uses, its own zram
//! disk) and rules that match only those, so the tests run in parallel with each other and
//! with whatever else the machine is doing.

mod common;
use common::{Agent, Loop, backing_file, can_run, compile, tempdir};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn rules(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("test.rules");
    std::fs::write(&path, text).unwrap();
    path
}

/// The acceptance test of the agent issue: a loop device created with LOOP_CTL_ADD has size 0
/// (its `add` is not ready): no call. Attaching a file sends `change` with a size: exactly one
/// call. Nothing for other devices.
#[test]
fn dry_run_calls_a_loop_device_once_it_has_a_backing_file() {
    if !can_run("dry_run_calls_a_loop_device_once_it_has_a_backing_file") {
        return;
    }
    let dir = tempdir("dryrun");
    let file = backing_file(&dir);
    let other = Loop::create(240);
    other.attach(&file);
    let mut agent = Agent::start(
        &dir,
        "agent",
        &[
            "--no-qubesdb",
            "--dry-run",
            "--rules",
            rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop20[0-9]\", ATTACH=\"work\"\n").to_str().unwrap(),
        ],
        &[],
    );
    let dev = Loop::create(200);
    let name = dev.name();
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: size is 0; waiting for media")), "the add (size 0)");
    assert_eq!(agent.stdout(), "", "no call before the device has media");
    dev.attach(&file);
    let want = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{name}\n");
    agent.wait_for(|a| a.stdout() == want, "one call after losetup");
    // Events for other devices, and more events for this one, call nothing more.
    other.synthetic("change");
    dev.synthetic("change");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.stdout(), want);
    assert!(agent.stop().success());
    assert!(!agent.stderr().contains(&other.name()), "{}", agent.stderr());
}

/// The real run (not dry-run) execs the client with exactly the agreed argv, detached, when the
/// node is readable; the removal of the attached device calls Detach.
#[test]
fn run_execs_the_client_once_the_node_is_readable_and_detaches_on_removal() {
    if !can_run("run_execs_the_client_once_the_node_is_readable_and_detaches_on_removal") {
        return;
    }
    let dir = tempdir("run");
    let client = compile("standin-client.c", &dir, "qrexec-client-vm");
    let log = dir.join("calls.log");
    let file = backing_file(&dir);
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop21[0-9]\", ATTACH=\"work\"\n");
    let mut agent = Agent::start(
        &dir,
        "agent",
        &["--no-qubesdb", "--rules", r.to_str().unwrap(), "--qrexec-client", client.to_str().unwrap()],
        &[("AUTOATTACH_STANDIN_LOG", log.to_str().unwrap())],
    );
    let calls = || std::fs::read_to_string(&log).unwrap_or_default();
    let dev = Loop::create(210);
    let name = dev.name();
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: size is 0; waiting for media")), "the add");
    assert_eq!(calls(), "");
    dev.attach(&file);
    agent.wait_for(|_| calls().lines().count() == 1, "the attach call");
    let line = calls();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1..], ["dom0", &format!("custom.USBDeviceAttach+work+__+{name}"), "readable=yes"], "{line}");
    agent.wait_for(
        |a| a.stderr().contains(&format!("custom.USBDeviceAttach+work+__+{name} exit 0: done")),
        "the child's exit logged",
    );
    dev.detach();
    drop(dev);
    agent.wait_for(|_| calls().lines().count() == 2, "the detach call");
    let last = calls().lines().nth(1).unwrap().to_owned();
    assert!(last.ends_with(&format!(" dom0 custom.USBDeviceDetach+work+__+{name} readable=no")), "{last}");
    assert!(agent.stop().success());
}

/// A call that takes long (dom0 waiting for the user's answer) is logged once after the bound
/// and left alone; its exit is logged when it comes. SIGTERM leaves a call in flight running.
#[test]
fn slow_calls_are_logged_and_left_alone() {
    if !can_run("slow_calls_are_logged_and_left_alone") {
        return;
    }
    let dir = tempdir("slow");
    let client = compile("standin-client.c", &dir, "qrexec-client-vm");
    let log = dir.join("calls.log");
    let file = backing_file(&dir);
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop23[0-9]\", ATTACH=\"work\"\n");
    let args = [
        "--no-qubesdb",
        "--rules",
        r.to_str().unwrap(),
        "--qrexec-client",
        client.to_str().unwrap(),
        "--slow-call",
        "500ms",
    ];
    let mut agent = Agent::start(
        &dir,
        "agent",
        &args,
        &[("AUTOATTACH_STANDIN_LOG", log.to_str().unwrap()), ("AUTOATTACH_STANDIN_SLEEP", "2")],
    );
    let dev = Loop::create(230);
    let name = dev.name();
    dev.attach(&file);
    let call = format!("custom.USBDeviceAttach+work+__+{name}");
    agent.wait_for(
        |a| a.stderr().contains(&format!("{call} still running after 500ms (detached; left alone)")),
        "the slow-call line",
    );
    agent.wait_for(|a| a.stderr().contains(&format!("{call} exit 0: done")), "the exit, later");
    assert_eq!(agent.stderr().matches("still running").count(), 1, "logged once");
    // Another call in flight when the agent is stopped: the call outlives the agent.
    dev.synthetic("remove");
    agent.wait_for(
        |_| std::fs::read_to_string(&log).unwrap_or_default().contains("USBDeviceDetach"),
        "the detach call started",
    );
    assert!(agent.stop().success());
    let argv = format!("{}\0dom0\0custom.USBDeviceDetach+work+__+{name}\0", client.display());
    let alive = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == argv.as_bytes()));
    assert!(alive, "the call in flight survived the agent's exit");
}

/// zram: `hot_add` makes a disk of size 0 (no call); sizing it announces nothing, so a
/// synthetic `change` written to its uevent file makes the agent look again (one call);
/// `hot_remove` removes it (detach).
#[test]
fn zram_hot_add_synthetic_change_and_hot_remove() {
    if !can_run("zram_hot_add_synthetic_change_and_hot_remove") {
        return;
    }
    let control = Path::new("/sys/class/zram-control");
    if !control.exists() {
        let full = std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1");
        let _ = Command::new("modprobe").arg("zram").status();
        if !control.exists() {
            assert!(!full, "zram is not available (modprobe zram failed)");
            eprintln!("SKIP zram: no /sys/class/zram-control");
            return;
        }
    }
    let dir = tempdir("zram");
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"zram[1-9]*\", ATTACH=\"scratch\"\n");
    let mut agent = Agent::start(&dir, "agent", &["--no-qubesdb", "--dry-run", "--rules", r.to_str().unwrap()], &[]);
    let index: u32 = std::fs::read_to_string(control.join("hot_add")).unwrap().trim().parse().unwrap();
    let name = format!("zram{index}");
    struct Remove(u32);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::write("/sys/class/zram-control/hot_remove", self.0.to_string());
        }
    }
    let guard = Remove(index);
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: size is 0; waiting for media")), "the zram add");
    std::fs::write(format!("/sys/block/{name}/disksize"), "1M").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(agent.stdout(), "", "sizing sends no event: nothing happens yet");
    std::fs::write(format!("/sys/block/{name}/uevent"), "change").unwrap();
    let attach = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+scratch+__+{name}\n");
    agent.wait_for(|a| a.stdout() == attach, "the call after the synthetic change");
    drop(guard);
    let both = format!("{attach}qrexec-client-vm dom0 custom.USBDeviceDetach+scratch+__+{name}\n");
    agent.wait_for(|a| a.stdout() == both, "the detach after hot_remove");
    assert!(agent.stop().success());
}

/// A device attached before the agent starts is called at coldplug; synthetic `change` and
/// `add` of the same disk (same DISKSEQ) call nothing more; a synthetic `remove` detaches and
/// the next `add` attaches again (a device that reconnects).
#[test]
fn coldplug_then_synthetic_events() {
    if !can_run("coldplug_then_synthetic_events") {
        return;
    }
    let dir = tempdir("coldplug");
    let file = backing_file(&dir);
    let dev = Loop::create(220);
    dev.attach(&file);
    let name = dev.name();
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop22[0-9]\", ATTACH=\"work\"\n");
    let mut agent = Agent::start(&dir, "agent", &["--no-qubesdb", "--dry-run", "--rules", r.to_str().unwrap()], &[]);
    let attach = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{name}\n");
    let detach = format!("qrexec-client-vm dom0 custom.USBDeviceDetach+work+__+{name}\n");
    agent.wait_for(|a| a.stdout() == attach, "the coldplug call");
    dev.synthetic("change");
    dev.synthetic("add");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.stdout(), attach, "same disk, same DISKSEQ: no second call");
    dev.synthetic("remove");
    agent.wait_for(|a| a.stdout() == format!("{attach}{detach}"), "the detach");
    dev.synthetic("add");
    agent.wait_for(|a| a.stdout() == format!("{attach}{detach}{attach}"), "the call after it came back");
    assert!(agent.stop().success());
}

/// Inside a fresh user and network namespace a process can forge uevents two ways (multicast
/// to group 1; ask the kernel to broadcast one). The agent, running in that namespace, refuses
/// both and says why, and still accepts a real kernel event (a veth network interface made in the namespace).
#[test]
fn forged_uevents_are_refused_and_real_ones_accepted() {
    if !can_run("forged_uevents_are_refused_and_real_ones_accepted") {
        return;
    }
    let dir = tempdir("forge");
    let forge = compile("forge-uevent.c", &dir, "forge-uevent");
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"forged*\", ATTACH=\"work\"\n");
    let bin = env!("CARGO_BIN_EXE_autoattach");
    let script = format!(
        "set -e\n\
         {bin} run -v --dry-run --no-qubesdb --rules {r} > {out} 2> {err} &\n\
         agent=$!\n\
         trap 'kill $agent 2>/dev/null || true' EXIT\n\
         for i in $(seq 100); do grep -q coldplug: {err} && break; sleep 0.05; done\n\
         {forge} multicast /devices/virtual/block/forged1\n\
         {forge} kernel /devices/virtual/block/forged2\n\
         ip link add autoattach0 type veth peer name autoattach1\n\
         for i in $(seq 100); do grep -q autoattach0 {err} && break; sleep 0.05; done\n\
         sleep 0.2\n\
         kill -TERM $agent; wait $agent\n",
        r = r.display(),
        out = dir.join("stdout").display(),
        err = dir.join("stderr").display(),
        forge = forge.display(),
    );
    let status = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c", &script])
        .status()
        .expect("unshare");
    let mut err = String::new();
    std::fs::File::open(dir.join("stderr")).unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "namespace script failed:\n{err}");
    let refusals: Vec<&str> = err.lines().filter(|l| l.contains("refused a uevent from")).collect();
    // The multicast comes from the forger's own port; the injection has portid 0 and group 1,
    // but the forger's pid.
    assert!(refusals.iter().any(|l| !l.contains("portid 0 ") && l.contains("groups 0x1")), "{err}");
    assert!(refusals.iter().any(|l| l.contains("portid 0 groups 0x1 pid ") && !l.contains(" pid 0 ")), "{err}");
    assert!(err.contains("uevent add /devices/virtual/net/autoattach0 (net)"), "the real event was accepted:\n{err}");
    assert!(!err.contains("forged1") && !err.contains("forged2"), "a forged device reached the engine:\n{err}");
    assert_eq!(std::fs::read_to_string(dir.join("stdout")).unwrap(), "");
}
