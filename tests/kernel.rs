//! The real `autoattach run` against this machine's kernel: real uevents from loop devices,
//! zram and synthetic `uevent` writes, real device nodes, a real socket, forged events.
//!
//! Needs root. Without root the tests print SKIP and pass, unless AUTOATTACH_FULL=1 (CI sets
//! it): then a missing privilege or tool is a failure, never a silent skip.
//!
//! Each test makes its own devices (loop devices at indexes no other test uses: 200-249 and
//! 760-789 here, its own zram disk) and rules that match only those, so the tests run in
//! parallel with each other and with whatever else the machine is doing.
//!
//! The Qubes-mode tests run the agent against the project's stand-in qubesdb daemon
//! (tests/support/qubesdb-standin.c, `--qubesdb-socket`), which the tests write records to
//! in the order Qubes' udev scripts do.

mod common;
use common::{Agent, Loop, QubesDb, backing_file, can_run, compile, tempdir};

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
    let (name, arg) = (dev.name(), dev.arg());
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: size is 0; waiting for media")), "the add (size 0)");
    assert_eq!(agent.stdout(), "", "no call before the device has media");
    dev.attach(&file);
    let want = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{arg}\n");
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
    let (name, arg) = (dev.name(), dev.arg());
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: size is 0; waiting for media")), "the add");
    assert_eq!(calls(), "");
    dev.attach(&file);
    agent.wait_for(|_| calls().lines().count() == 1, "the attach call");
    let line = calls();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1..], ["dom0", &format!("custom.USBDeviceAttach+work+__+{arg}"), "readable=yes"], "{line}");
    agent.wait_for(
        |a| a.stderr().contains(&format!("custom.USBDeviceAttach+work+__+{arg} exit 0: done")),
        "the child's exit logged",
    );
    dev.detach();
    drop(dev);
    agent.wait_for(|_| calls().lines().count() == 2, "the detach call");
    let last = calls().lines().nth(1).unwrap().to_owned();
    assert!(last.ends_with(&format!(" dom0 custom.USBDeviceDetach+work+__+{arg} readable=no")), "{last}");
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
    let arg = dev.arg();
    dev.attach(&file);
    let call = format!("custom.USBDeviceAttach+work+__+{arg}");
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
    let argv = format!("{}\0dom0\0custom.USBDeviceDetach+work+__+{arg}\0", client.display());
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
    // No USB parent: the id is ':' and the number.
    let arg = format!("{name}+__++{index}");
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
    let attach = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+scratch+__+{arg}\n");
    agent.wait_for(|a| a.stdout() == attach, "the call after the synthetic change");
    drop(guard);
    let both = format!("{attach}qrexec-client-vm dom0 custom.USBDeviceDetach+scratch+__+{arg}\n");
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
    let arg = dev.arg();
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop22[0-9]\", ATTACH=\"work\"\n");
    let mut agent = Agent::start(&dir, "agent", &["--no-qubesdb", "--dry-run", "--rules", r.to_str().unwrap()], &[]);
    let attach = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{arg}\n");
    let detach = format!("qrexec-client-vm dom0 custom.USBDeviceDetach+work+__+{arg}\n");
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

/// Issue 11 (the udev list, 5): media removed from an attached disk (`losetup -d`: a `change`,
/// then a `change` with DISK_MEDIA_CHANGE=1 and size 0) detaches it at once, and it waits for
/// media again: a new file is attached again. Removing the device then calls nothing more
/// (nothing is attached).
#[test]
fn media_removal_detaches_and_new_media_attaches_again() {
    if !can_run("media_removal_detaches_and_new_media_attaches_again") {
        return;
    }
    let dir = tempdir("media");
    let file = backing_file(&dir);
    let r = rules(&dir, "SUBSYSTEM==\"block\", KERNEL==\"loop76[0-9]\", ATTACH=\"work\"\n");
    let mut agent = Agent::start(&dir, "agent", &["--no-qubesdb", "--dry-run", "--rules", r.to_str().unwrap()], &[]);
    let dev = Loop::create(760);
    let (name, arg) = (dev.name(), dev.arg());
    let attach = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{arg}\n");
    let detach = format!("qrexec-client-vm dom0 custom.USBDeviceDetach+work+__+{arg}\n");
    dev.attach(&file);
    agent.wait_for(|a| a.stdout() == attach, "the attach");
    dev.detach();
    agent.wait_for(|a| a.stdout() == format!("{attach}{detach}"), "the detach when the media went");
    assert!(agent.stderr().contains(&format!("{name}: media removed; waiting for media again")), "{}", agent.stderr());
    dev.attach(&file);
    let twice = format!("{attach}{detach}{attach}");
    agent.wait_for(|a| a.stdout() == twice, "the attach of the new media");
    dev.detach();
    drop(dev);
    let all = format!("{twice}{detach}");
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: removed\n")), "the removal");
    assert_eq!(agent.stdout(), all, "one detach per attach, none at the removal");
    assert!(agent.stop().success());
}

/// `qubesdb-standin` as the agent's qubesdb, a loop device matched by `KERNEL=="loopN"` in
/// `dir`; the agent prints its calls (dry run).
fn qubes_agent(dir: &Path, db: &QubesDb, dev: &Loop, extra: &[&str]) -> Agent {
    let r = rules(dir, &format!("SUBSYSTEM==\"block\", KERNEL==\"{}\", ATTACH=\"work\"\n", dev.name()));
    let mut args = vec!["-v", "--dry-run", "--qubesdb-socket", db.socket.to_str().unwrap(), "--rules"];
    args.push(r.to_str().unwrap());
    args.extend_from_slice(extra);
    Agent::start(dir, "agent", &args, &[])
}

/// ENC of IDENTITY.md §2, written out here so the test does not check the agent's encoder
/// against itself: `[A-Za-z0-9.-]` as is, `:` as `+`, any other byte `_` and two hex digits.
fn enc(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => (b as char).to_string(),
            b':' => "+".into(),
            _ => format!("_{b:02x}"),
        })
        .collect()
}

/// Qubes mode, R4.3 records: the device is ready before Qubes publishes it; the agent waits
/// on the trigger key, not the record, so the half-published record (desc, size and mode
/// written, `parent` 600 ms later: longer than the desc form's grace) is never checked; the
/// call carries the id the whole record gives (`:N` for a loop device), equal to sysfs'.
#[test]
fn qubes_mode_r43_records_published_late_give_the_id() {
    if !can_run("qubes_mode_r43_records_published_late_give_the_id") {
        return;
    }
    let dir = tempdir("qdb-r43");
    let file = backing_file(&dir);
    let db = QubesDb::start(&dir, &[]);
    let dev = Loop::create(770);
    let mut agent = qubes_agent(&dir, &db, &dev, &[]);
    dev.attach(&file);
    let name = dev.name();
    agent.wait_for(
        |a| a.stderr().contains(&format!("{name}: waiting: not yet published to dom0 in qubesdb")),
        "the wait for publication",
    );
    assert!(agent.stderr().contains("watching /qubes-block-devices"), "{}", agent.stderr());
    db.publish_loop(&dev, &file, true, Duration::from_millis(600));
    let want = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{}\n", dev.arg());
    agent.wait_for(|a| a.stdout() == want, "the call with the id");
    assert!(!agent.stderr().contains("desc form"), "the half-written record was checked:\n{}", agent.stderr());
    assert!(agent.stop().success());
}

/// Qubes mode, R4.1/R4.2 records (no `parent`): the call carries the desc form, the published
/// desc (a loop device's backing file) encoded.
#[test]
fn qubes_mode_r42_records_give_the_desc_form() {
    if !can_run("qubes_mode_r42_records_give_the_desc_form") {
        return;
    }
    let dir = tempdir("qdb-r42");
    let file = backing_file(&dir);
    let db = QubesDb::start(&dir, &[]);
    let dev = Loop::create(775);
    let mut agent = qubes_agent(&dir, &db, &dev, &[]);
    dev.attach(&file);
    let name = dev.name();
    agent.wait_for(|a| a.stderr().contains(&format!("{name}: waiting: not yet published")), "the wait");
    db.publish_loop(&dev, &file, false, Duration::ZERO);
    let desc = enc(file.to_str().unwrap().as_bytes());
    let want = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{name}+__+desc+{desc}\n");
    agent.wait_for(|a| a.stdout() == want, "the call with the desc form");
    assert!(agent.stop().success());
}

/// Qubes mode, a stale record at the device's name that describes another device (a USB
/// disk's, as a stale `sdb` record would be; another loop device's record at the same name
/// would carry the same id `:N`, Qubes telling them apart no better): no call while it
/// stands, the call once the right record is published. Never corrected: at the timeout an
/// error names both identities, and nothing is called.
#[test]
fn qubes_mode_a_stale_record_of_another_device_is_never_called() {
    if !can_run("qubes_mode_a_stale_record_of_another_device_is_never_called") {
        return;
    }
    for (case, corrected) in [("fixed", true), ("never", false)] {
        let dir = tempdir(&format!("qdb-stale-{case}"));
        let file = backing_file(&dir);
        let dev = Loop::create(if corrected { 780 } else { 785 });
        let name = dev.name();
        let stale = [
            format!("/qubes-block-devices/{name}/desc=SanDisk_3.2Gen1 ()"),
            format!("/qubes-block-devices/{name}/parent=1-1:1.0"),
            "/qubes-usb-devices/1-1/desc=0781:5581 SanDisk Ultra 4C530001230101115543".to_owned(),
            "/qubes-usb-devices/1-1/interfaces=:080650:".to_owned(),
        ];
        let db = QubesDb::start(&dir, &stale.iter().map(String::as_str).collect::<Vec<_>>());
        let mut agent = qubes_agent(&dir, &db, &dev, &["--timeout", "3s"]);
        dev.attach(&file);
        agent.wait_for(|a| a.stderr().contains("describes another device"), "the mismatch");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(agent.stdout(), "", "called while the record names another device");
        if corrected {
            db.publish_loop(&dev, &file, true, Duration::ZERO);
            let want = format!("qrexec-client-vm dom0 custom.USBDeviceAttach+work+__+{}\n", dev.arg());
            agent.wait_for(|a| a.stdout() == want, "the call once the right record is there");
        } else {
            let error = format!(
                "error: {name}: not attached after 3000 ms: qubesdb's record /qubes-block-devices/{name}/ describes \
                 another device: published id \"0781:5581:4C530001230101115543:u080650:1.0\", this device is id \
                 \":{}\"",
                dev.index
            );
            agent.wait_for(|a| a.stderr().contains(&error), "the error naming both");
            assert_eq!(agent.stdout(), "");
        }
        assert!(agent.stop().success());
    }
}
