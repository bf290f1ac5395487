//! Fixtures captured from a real kernel (issue 11.2): one qemu boot plays each case's USB
//! topology over QMP while, inside the guest, Debian's udev runs as on a real system
//! (`systemd-udevd` with Debian's rules: it opens new and changed disks, which is what makes the
//! kernel rescan a new medium), `udevadm monitor --kernel --property` prints the kernel's uevents
//! (and `--udev`, `--kernel --udev` captures run beside it), `autoattach record` records every
//! device of the case, and the agent (`autoattach run`) makes its calls through the stand-in
//! client as it does in the hotplug test.
//!
//! - `AUTOATTACH_QEMU_RECORD=DIR`: each case is written to `DIR/qemu-NAME/` (`events`,
//!   `events-mixed`, `events-udev`, `device.umockdev`, `rules`, `expected`, `README.md`);
//!   `expected` is what the live agent called.
//!   Re-record the checked-in cases with
//!   `AUTOATTACH_QEMU_RECORD=tests/fixtures cargo test --test qemu captures -- --ignored --test-threads=1`.
//! - Otherwise (`cargo test --test qemu captures -- --ignored`) the same boot runs as a check: the live agent must make exactly the calls of the
//!   checked-in `tests/fixtures/qemu-NAME/expected`, and each capture must be a well-formed
//!   `udevadm monitor` capture of the case's devices (what CI replays is then known to be what
//!   this kernel does today).
//!
//! A case is one snapshot of the tree (taken when its devices have settled) plus the events that
//! led to it, so `autoattach replay` sees the tree the agent saw: media changes are therefore
//! cases of their own (`card-reader-empty`, then `card-reader-media` with the card in).

use super::*;

/// Where a recording run writes its case directories.
const RECORD_VAR: &str = "AUTOATTACH_QEMU_RECORD";

/// Modules the capture boot loads: storage, CD, HID and input, one xhci controller.
const CAPTURE_MODULES: &[&str] = &["sd_mod", "sr_mod", "usb_storage", "usbhid", "hid_generic", "evdev", "xhci_pci"];

/// How often the block layer polls removable media in the guest. udev's 60-block.rules sets
/// 2000 ms on real systems; nothing does here, and the default 0 means "never" (no
/// DISK_MEDIA_CHANGE uevents at all). 500 ms only makes the boot shorter.
const POLL_MSECS: u32 = 500;

const CAP: &str = "/tmp/cap";

/// The captures of each case, all running at once: (file, `udevadm monitor` flags besides
/// `--property`, the header line that says it listens).
const MONITORS: [(&str, &str, &str); 3] = [
    ("events", "--kernel", "KERNEL - "),
    ("events-mixed", "--kernel --udev", "UDEV - "),
    ("events-udev", "--udev", "UDEV - "),
];

// The rules of each case. Keys that look at a parent all match the same parent, as udev
// requires (ATTRS{serial} is the USB device's; the LUN is told by DEVPATH).
const RULES_PARTITIONS: &str = "\
# Every partition of the stick with serial PARTS1 goes to `work`.
SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"46f4\", ATTRS{idProduct}==\"0001\", ATTRS{serial}==\"PARTS1\", ATTACH=\"work\"
";
const RULES_READER: &str = "\
# The card reader READER1 is attached as a whole disk, once it holds a card.
SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTR{removable}==\"1\", ATTRS{serial}==\"READER1\", ATTACH=\"media\"
";
const RULES_CD: &str = "\
# The CD drive CDROM1 goes to `media`, once it holds a disc.
SUBSYSTEM==\"block\", KERNEL==\"sr[0-9]*\", ATTRS{serial}==\"CDROM1\", ATTACH=\"media\"
";
const RULES_HUB: &str = "\
# The stick HUBSTICK1 is passed through whole (behind a hub: its bus id has a dot).
SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\", ATTRS{serial}==\"HUBSTICK1\", ATTACH=\"vault\"
";
const RULES_TWINS: &str = "\
# Two sticks with the same vendor and product: only TWIN2's partition goes to `work`.
SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"46f4\", ATTRS{idProduct}==\"0001\", ATTRS{serial}==\"TWIN2\", ATTACH=\"work\"
";
const RULES_LUNS: &str = "\
# Only the partitions of LUN 1 of the two-LUN device MULTI1 go to `work`.
SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", DEVPATH==\"*:0:0:1/block/*\", ATTRS{serial}==\"MULTI1\", ATTACH=\"work\"
";

/// What the live agent loads: every case's rules, one file each.
const CAPTURE_RULES: &[(&str, &str)] = &[
    ("captures/partitions.rules", RULES_PARTITIONS),
    ("captures/reader.rules", RULES_READER),
    ("captures/cd.rules", RULES_CD),
    ("captures/hub.rules", RULES_HUB),
    ("captures/luns.rules", RULES_LUNS),
    ("captures/twins.rules", RULES_TWINS),
];

#[test]
#[ignore = "boots qemu to record or check the qemu-* fixtures: see tests/qemu/README.md"]
fn captures_under_qemu() {
    let _one = ONE_QEMU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let record_to = std::env::var_os(RECORD_VAR).filter(|v| !v.is_empty()).map(PathBuf::from);
    let Some(tools) = tools() else { return };
    let run = RunDir::new("capture");
    make_images(&tools, &run.path);
    let guest = Guest { modules: CAPTURE_MODULES, rules: CAPTURE_RULES, udev: true };
    let initramfs = build_initramfs(&run.path, &tools, &guest);
    let devices = ["-device".to_owned(), "qemu-xhci,id=xhci".to_owned()];
    let mut vm = Vm::boot(&tools, &initramfs, &run.path, &devices);
    let booted = vm.started.elapsed();
    let origin = Origin::new(&tools, &mut vm, &initramfs, &devices);

    let mut cap = Capture::new(&mut vm);
    cap.start_agent();
    cap.stick_with_partitions();
    cap.card_reader();
    cap.cd_drive();
    cap.stick_behind_hub();
    cap.multi_lun();
    cap.two_sticks();
    cap.keyboard();
    cap.agent_still_running();
    let cases = std::mem::take(&mut cap.cases);
    let agent_log = vm.ok(&format!("cat {AGENT_LOG}"));
    let _ = fs::write(run.path.join("agent.log"), agent_log);
    vm.shutdown();
    let wall = vm.started.elapsed();

    for case in &cases {
        check_capture(case);
    }
    match &record_to {
        Some(dir) => {
            for case in &cases {
                write_case(dir, case, &origin);
            }
            loud(&format!("   recorded {} case(s) into {}\n", cases.len(), dir.display()));
        }
        None => compare_with_fixtures(&cases),
    }
    loud(&format!(
        "\n== qemu captures: {} case(s), boot to shell {:.1} s, qemu wall time {:.1} s ==\n",
        cases.len(),
        booted.as_secs_f64(),
        wall.as_secs_f64()
    ));
    run.done();
}

// ---------------------------------------------------------------------------------------------
// The cases

/// One captured case.
struct Case {
    name: &'static str,
    about: &'static str,
    rules: String,
    /// `udevadm monitor --kernel --property`'s output, byte for byte.
    events: Vec<u8>,
    /// `udevadm monitor --kernel --udev --property`'s, run at the same time.
    mixed: Vec<u8>,
    /// `udevadm monitor --udev --property`'s, run at the same time.
    udev: Vec<u8>,
    /// `autoattach record` of each device of the case, parents recorded once.
    recording: String,
    /// The stand-in client's lines for the calls made during the case.
    calls: Vec<String>,
    /// The case's steps: QMP commands and guest commands, as run.
    steps: Vec<String>,
    /// The USB device (or hub) whose tree was recorded.
    busid: String,
}

struct Capture<'a> {
    vm: &'a mut Vm,
    cases: Vec<Case>,
    /// The case being captured: (name, calls in the log when it began, steps so far).
    open: Option<(&'static str, usize, Vec<String>)>,
}

impl<'a> Capture<'a> {
    fn new(vm: &'a mut Vm) -> Capture<'a> {
        Capture { vm, cases: Vec::new(), open: None }
    }

    /// udevd, as on a real system, then the agent with every case's rules, as the hotplug test
    /// runs it.
    fn start_agent(&mut self) {
        self.vm.ok(&format!("mkdir -p {CAP} && echo {POLL_MSECS} >/sys/module/block/parameters/events_dfl_poll_msecs"));
        self.vm.ok("/lib/systemd/systemd-udevd --daemon >/tmp/udevd.log 2>&1");
        self.vm.ok(&format!("aa wait-path /run/udev/control {GUEST_WAIT_TENTHS}"));
        self.vm.ok(&format!(
            "AUTOATTACH_STANDIN_LOG={CALLS} /harness/autoattach run --rules /etc/autoattach/captures \
             --qrexec-client /harness/qrexec-client-vm --no-qubesdb -v >{AGENT_LOG} 2>&1 & \
             echo $! >/tmp/agent.pid"
        ));
        self.vm.ok(&format!("aa wait-grep {AGENT_LOG} coldplug: {GUEST_WAIT_TENTHS}"));
    }

    fn stick_with_partitions(&mut self) {
        self.begin("stick-partitions");
        self.drive("parts", Some("parts.img"), "");
        self.qmp(
            "device_add",
            r#"{"driver": "usb-storage", "bus": "xhci.0", "drive": "parts", "id": "parts", "serial": "PARTS1"}"#,
        );
        self.guest(&format!("aa wait-blocks PARTS1 5 {GUEST_WAIT_TENTHS}"));
        let busid = self.busid("PARTS1");
        self.unplug("parts", &busid);
        self.end(
            RULES_PARTITIONS,
            &busid,
            "a stick (usb-storage) with an MBR: two primary partitions and an extended one holding a logical one",
        );
    }

    /// A reader (usb-bot + removable scsi-hd) plugged empty, then a card put in.
    fn card_reader(&mut self) {
        self.begin("card-reader-empty");
        self.drive("card", None, "");
        self.qmp("device_add", r#"{"driver": "usb-bot", "bus": "xhci.0", "id": "reader", "serial": "READER1"}"#);
        self.qmp("device_add", r#"{"driver": "scsi-hd", "bus": "reader.0", "lun": 0, "drive": "card", "removable": true, "id": "reader-lun"}"#);
        self.qmp("qom-set", r#"{"path": "/machine/peripheral/reader", "property": "attached", "value": true}"#);
        self.guest(&format!("aa wait-blocks READER1 1 {GUEST_WAIT_TENTHS}"));
        let busid = self.busid("READER1");
        self.settle();
        self.end(RULES_READER, &busid, "a card reader (usb-bot with a removable scsi-hd LUN) plugged without a card");

        self.begin("card-reader-media");
        let card = self.image_path("card.img");
        self.qmp(
            "blockdev-change-medium",
            &format!(r#"{{"id": "reader-lun", "filename": "{}", "format": "raw"}}"#, json_escape(&card)),
        );
        self.media_change("card-reader-media");
        self.guest(&format!("aa wait-blocks READER1 2 {GUEST_WAIT_TENTHS}"));
        self.unplug("reader", &busid);
        self.end(
            RULES_READER,
            &busid,
            "the card reader of card-reader-empty: a card with one partition goes in, then the reader is unplugged",
        );
    }

    /// A CD drive (usb-bot + scsi-cd) plugged empty, then a disc put in.
    fn cd_drive(&mut self) {
        self.begin("cd-empty");
        self.drive("disc", None, ",media=cdrom");
        self.qmp("device_add", r#"{"driver": "usb-bot", "bus": "xhci.0", "id": "cd", "serial": "CDROM1"}"#);
        self.qmp("device_add", r#"{"driver": "scsi-cd", "bus": "cd.0", "lun": 0, "drive": "disc", "id": "cd-lun"}"#);
        self.qmp("qom-set", r#"{"path": "/machine/peripheral/cd", "property": "attached", "value": true}"#);
        self.guest(&format!("aa wait-blocks CDROM1 1 {GUEST_WAIT_TENTHS}"));
        let busid = self.busid("CDROM1");
        self.settle();
        self.end(RULES_CD, &busid, "a CD drive (usb-bot with a scsi-cd LUN) plugged without a disc");

        self.begin("cd-disc");
        let disc = self.image_path("disc.iso");
        self.qmp(
            "blockdev-change-medium",
            &format!(r#"{{"id": "cd-lun", "filename": "{}", "format": "raw"}}"#, json_escape(&disc)),
        );
        self.media_change("cd-disc");
        self.settle();
        self.unplug("cd", &busid);
        self.end(RULES_CD, &busid, "the CD drive of cd-empty: a disc goes in, then the drive is unplugged");
    }

    fn stick_behind_hub(&mut self) {
        self.begin("stick-hub");
        self.qmp("device_add", r#"{"driver": "usb-hub", "bus": "xhci.0", "port": "1", "id": "hub", "serial": "HUB1"}"#);
        self.guest(&format!("aa wait-usb HUB1 {GUEST_WAIT_TENTHS}"));
        self.drive("hubstick", Some("hubstick.img"), "");
        self.qmp("device_add", r#"{"driver": "usb-storage", "bus": "xhci.0", "port": "1.1", "drive": "hubstick", "id": "hubstick", "serial": "HUBSTICK1"}"#);
        self.guest(&format!("aa wait-blocks HUBSTICK1 2 {GUEST_WAIT_TENTHS}"));
        let hub = self.busid("HUB1");
        let stick = self.busid("HUBSTICK1");
        self.settle();
        self.snapshot(&hub);
        self.unplug_only("hubstick", &stick);
        self.unplug_only("hub", &hub);
        self.end_recorded(
            RULES_HUB,
            &hub,
            "a stick (usb-storage) on port 1 of a hub (usb-hub) on the controller's port 1",
        );
    }

    fn multi_lun(&mut self) {
        self.begin("multi-lun");
        self.drive("lun0", Some("lun0.img"), "");
        self.drive("lun1", Some("lun1.img"), "");
        self.qmp("device_add", r#"{"driver": "usb-bot", "bus": "xhci.0", "id": "luns", "serial": "MULTI1"}"#);
        self.qmp("device_add", r#"{"driver": "scsi-hd", "bus": "luns.0", "lun": 0, "drive": "lun0", "id": "luns-0"}"#);
        self.qmp("device_add", r#"{"driver": "scsi-hd", "bus": "luns.0", "lun": 1, "drive": "lun1", "id": "luns-1"}"#);
        self.qmp("qom-set", r#"{"path": "/machine/peripheral/luns", "property": "attached", "value": true}"#);
        self.guest(&format!("aa wait-blocks MULTI1 4 {GUEST_WAIT_TENTHS}"));
        let busid = self.busid("MULTI1");
        self.unplug("luns", &busid);
        self.end(RULES_LUNS, &busid, "one USB device (usb-bot) with two LUNs (scsi-hd), one partition each");
    }

    /// Two sticks that differ only in their serial, plugged one after the other.
    fn two_sticks(&mut self) {
        self.begin("two-sticks");
        self.drive("twin1", Some("twin1.img"), "");
        self.drive("twin2", Some("twin2.img"), "");
        self.qmp(
            "device_add",
            r#"{"driver": "usb-storage", "bus": "xhci.0", "drive": "twin1", "id": "twin1", "serial": "TWIN1"}"#,
        );
        self.guest(&format!("aa wait-blocks TWIN1 2 {GUEST_WAIT_TENTHS}"));
        self.qmp(
            "device_add",
            r#"{"driver": "usb-storage", "bus": "xhci.0", "drive": "twin2", "id": "twin2", "serial": "TWIN2"}"#,
        );
        self.guest(&format!("aa wait-blocks TWIN2 2 {GUEST_WAIT_TENTHS}"));
        let one = self.busid("TWIN1");
        let two = self.busid("TWIN2");
        self.settle();
        self.snapshot(&format!("{one} {two}"));
        self.unplug_only("twin1", &one);
        self.unplug_only("twin2", &two);
        self.end_recorded(
            RULES_TWINS,
            &two,
            "two sticks (usb-storage) with the same vendor and product, told apart by serial only",
        );
    }

    /// A keyboard matches none of the other cases' rules.
    fn keyboard(&mut self) {
        self.begin("keyboard");
        self.qmp("device_add", r#"{"driver": "usb-kbd", "bus": "xhci.0", "id": "kbd", "serial": "KBD1"}"#);
        self.guest(&format!("aa wait-usb KBD1 {GUEST_WAIT_TENTHS}"));
        let busid = self.busid("KBD1");
        self.guest(&format!("aa wait-input {busid} {GUEST_WAIT_TENTHS}"));
        self.unplug("kbd", &busid);
        let all: String = CAPTURE_RULES.iter().map(|(_, text)| *text).collect::<Vec<_>>().join("");
        self.end(&all, &busid, "a keyboard (usb-kbd), against every other case's rules");
    }

    /// The agent is alive after all cases (a crash would otherwise only show as missing calls).
    fn agent_still_running(&mut self) {
        let (alive, _) = self.vm.sh("kill -0 \"$(cat /tmp/agent.pid)\"", COMMAND_TIMEOUT);
        if alive != 0 {
            self.vm.fail("the agent is no longer running after the captures");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Steps

    /// Starts `udevadm monitor` for a case and waits until it listens.
    fn begin(&mut self, name: &'static str) {
        assert!(self.open.is_none(), "case {name} begins inside another");
        let before = self.call_lines().len();
        for (file, flags, last) in MONITORS {
            self.vm.ok(&format!(
                "/usr/bin/udevadm monitor {flags} --property >{CAP}/{name}.{file} 2>{CAP}/{name}.err & \
                 echo $! >>{CAP}/monitor.pids"
            ));
            self.vm.ok(&format!("aa wait-grep {CAP}/{name}.{file} '{last}' {GUEST_WAIT_TENTHS}"));
        }
        self.open = Some((name, before, Vec::new()));
    }

    fn step(&mut self, text: String) {
        self.open.as_mut().expect("a step outside a case").2.push(text);
    }

    fn qmp(&mut self, command: &str, arguments: &str) -> String {
        let shown = arguments.replace(&self.vm.dir.to_string_lossy().into_owned(), "RUN");
        self.step(format!(r#"QMP {{"execute": "{command}", "arguments": {shown}}}"#));
        match self.vm.qmp.execute(command, arguments) {
            Ok(reply) => reply,
            Err(e) => self.vm.fail(&format!("{command} {arguments}: {e}")),
        }
    }

    /// A `-drive if=none` backend (deleted with its device), empty when `image` is None.
    fn drive(&mut self, id: &str, image: Option<&str>, options: &str) {
        let file = image.map(|i| format!(",format=raw,file={}", self.image_path(i))).unwrap_or_default();
        let line = format!("drive_add 0 if=none,id={id}{file}{options}");
        let args = format!(r#"{{"command-line": "{}"}}"#, json_escape(&line));
        let reply = self.qmp("human-monitor-command", &args);
        if !reply.contains("OK") {
            self.vm.fail(&format!("{line}: {reply}"));
        }
    }

    fn image_path(&self, name: &str) -> String {
        self.vm.dir.join(name).to_string_lossy().into_owned()
    }

    /// A guest command that is part of the case (listed in its README.md).
    fn guest(&mut self, command: &str) -> String {
        self.step(format!("guest: {command}"));
        self.vm.ok(command)
    }

    fn busid(&mut self, serial: &str) -> String {
        let busid = self.vm.ok(&format!("aa usb-of {serial}"));
        if busid.is_empty() || !busid.bytes().all(|b| b.is_ascii_digit() || b == b'-' || b == b'.') {
            self.vm.fail(&format!("the guest shows no single bus id for {serial}: {busid:?}"));
        }
        busid
    }

    fn settle(&mut self) {
        self.guest(&format!("sleep {SETTLE}; /usr/bin/udevadm settle --timeout=30"));
    }

    /// Waits for the kernel to report a media change (the block layer's poll). udevd's blkid
    /// then opens the disk, which makes the kernel revalidate its size and scan partitions.
    fn media_change(&mut self, case: &str) {
        self.guest(&format!("aa wait-grep {CAP}/{case}.events DISK_MEDIA_CHANGE=1 {GUEST_WAIT_TENTHS}"));
    }

    /// Records every device of the tree under `busid`, and its parents.
    fn snapshot(&mut self, busid: &str) {
        let name = self.open.as_ref().expect("snapshot outside a case").0;
        self.guest(&format!("aa record-tree {CAP}/{name}.umockdev {busid}"));
    }

    /// Settles, records the case's devices, unplugs them and waits until the guest let go.
    fn unplug(&mut self, id: &str, busid: &str) {
        self.settle();
        self.snapshot(busid);
        self.unplug_only(id, busid);
    }

    fn unplug_only(&mut self, id: &str, busid: &str) {
        self.step(format!(r#"QMP {{"execute": "device_del", "arguments": {{"id": "{id}"}}}}"#));
        self.vm.device_del(id);
        self.guest(&format!("aa wait-gone /sys/bus/usb/devices/{busid} {GUEST_WAIT_TENTHS}"));
    }

    /// Ends a case that was not recorded yet: records it now.
    fn end(&mut self, rules: &str, busid: &str, about: &'static str) {
        let recorded = self.open.as_ref().is_some_and(|(_, _, steps)| steps.iter().any(|s| s.contains("record-tree")));
        if !recorded {
            self.snapshot(busid);
        }
        self.end_recorded(rules, busid, about);
    }

    /// Stops the monitor and collects the case.
    fn end_recorded(&mut self, rules: &str, busid: &str, about: &'static str) {
        self.settle();
        let (name, before, steps) = self.open.take().expect("end outside a case");
        self.vm.ok(&format!(
            "for p in $(cat {CAP}/monitor.pids); do kill -INT $p && wait $p; done; rm {CAP}/monitor.pids"
        ));
        let err = self.vm.ok(&format!("cat {CAP}/{name}.err"));
        if !err.is_empty() {
            self.vm.fail(&format!("{name}: udevadm monitor wrote to stderr:\n{err}"));
        }
        let events = self.fetch(&format!("{CAP}/{name}.events"));
        let mixed = self.fetch(&format!("{CAP}/{name}.events-mixed"));
        let udev = self.fetch(&format!("{CAP}/{name}.events-udev"));
        let recording = dedup_recording(&String::from_utf8_lossy(&self.fetch(&format!("{CAP}/{name}.umockdev"))));
        let calls = self.call_lines().split_off(before);
        self.cases.push(Case {
            name,
            about,
            rules: rules.to_owned(),
            events,
            mixed,
            udev,
            recording,
            calls,
            steps,
            busid: busid.to_owned(),
        });
    }

    /// A guest file, byte for byte (base64 over the console, which would turn \n into \r\n).
    fn fetch(&mut self, path: &str) -> Vec<u8> {
        let text = self.vm.ok(&format!("base64 {path}"));
        match base64_decode(&text) {
            Some(bytes) => bytes,
            None => self.vm.fail(&format!("{path}: the guest's base64 does not decode")),
        }
    }

    fn call_lines(&mut self) -> Vec<String> {
        let log = self.vm.ok(&format!("cat {CALLS} 2>/dev/null || true"));
        log.lines().map(str::to_owned).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// What a capture must look like, and what the checked-in fixtures must say

/// A capture is udevadm's: its header, then only `KERNEL[...]` blocks with properties; the case's
/// USB device appears in it; the recording holds that device with its `descriptors`.
fn check_capture(case: &Case) {
    let text = String::from_utf8_lossy(&case.events);
    let name = case.name;
    assert!(
        text.starts_with("monitor will print the received events for:\nKERNEL - the kernel uevent\n\n"),
        "{name}: the capture does not start with udevadm's header:\n{text}"
    );
    let blocks: Vec<&str> = text.split("\n\n").skip(1).filter(|b| !b.trim().is_empty()).collect();
    assert!(!blocks.is_empty(), "{name}: the capture holds no event");
    for block in &blocks {
        assert!(block.starts_with("KERNEL["), "{name}: not a kernel event block:\n{block}");
        assert!(block.contains("\nACTION=") && block.contains("\nSEQNUM="), "{name}: no properties:\n{block}");
    }
    for (file, bytes) in [("events-mixed", &case.mixed), ("events-udev", &case.udev)] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            text.starts_with("monitor will print the received events for:\n") && text.contains("\nUDEV  ["),
            "{name}: {file} is not a udevadm capture with udev events:\n{text}"
        );
    }
    let usb = format!("/{} (usb)", case.busid);
    assert!(text.contains(&usb), "{name}: no event for the USB device {}", case.busid);
    let device = case
        .recording
        .split("\n\n")
        .find(|b| b.lines().next().is_some_and(|p| p.ends_with(&format!("/{}", case.busid))))
        .unwrap_or_else(|| panic!("{name}: the recording lacks the USB device {}", case.busid));
    for attr in ["H: descriptors=", "A: idVendor=", "A: idProduct=", "A: serial="] {
        assert!(device.contains(attr), "{name}: the recording of {} has no {attr}", case.busid);
    }
}

/// The stand-in client's line as replay prints the call; Attach calls on block devices must
/// have found the device readable.
fn expected_line(case: &str, call: &str) -> String {
    let (service, readable) = call.rsplit_once(" readable=").unwrap_or((call, "n/a"));
    let is_block = service.split("+__+").nth(1).is_some_and(|dev| !dev.starts_with(|c: char| c.is_ascii_digit()));
    if service.contains("USBDeviceAttach") && is_block {
        assert_eq!(readable, "yes", "{case}: the device was not readable at the call: {call}");
    }
    format!("qrexec-client-vm {service}")
}

/// The calls in the order replay makes them: the agent probes devices in parallel, so two
/// devices' calls may finish in either order, while replay makes each at the uevent that
/// caused it. A call's cause is taken to be the first uevent of its device (devpath ending in
/// `/DEV`; `remove` for a Detach, any other action for an Attach) after the cause of that
/// device's previous call. (Timestamps cannot tell: the agent may call before udevadm, which
/// reads the same uevent, gets to print it.)
fn expected_text(case: &Case) -> String {
    let events = monitor_events(&String::from_utf8_lossy(&case.events));
    let mut last: HashMap<String, usize> = HashMap::new();
    let mut calls: Vec<(usize, String)> = case
        .calls
        .iter()
        .map(|line| {
            let call = line.split_once(' ').map_or(line.as_str(), |(_, call)| call);
            let dev = call.split("+__+").nth(1).unwrap_or_default().split(' ').next().unwrap_or_default();
            let detach = call.contains("USBDeviceDetach");
            let suffix = format!("/{dev}");
            let from = last.get(dev).map_or(0, |at| at + 1);
            let cause = events
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, (action, devpath))| devpath.ends_with(&suffix) && (action == "remove") == detach)
                .map_or(usize::MAX, |(at, _)| at);
            if cause != usize::MAX {
                last.insert(dev.to_owned(), cause);
            }
            (cause, expected_line(case.name, call))
        })
        .collect();
    calls.sort_by_key(|(cause, _)| *cause);
    calls.into_iter().map(|(_, line)| line + "\n").collect()
}

/// (action, devpath) of each `KERNEL[SEC.USEC] ACTION DEVPATH (SUBSYSTEM)` line.
fn monitor_events(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((_, rest)) = line.strip_prefix("KERNEL[").and_then(|rest| rest.split_once(']')) else { continue };
        let mut words = rest.split_whitespace();
        if let (Some(action), Some(devpath)) = (words.next(), words.next()) {
            out.push((action.to_owned(), devpath.to_owned()));
        }
    }
    out
}

/// Without AUTOATTACH_QEMU_RECORD: the live calls are the checked-in ones, block devices told
/// by where they sit rather than by the name the kernel gave them (the two LUNs of one device
/// are named in the order their probes finish).
fn compare_with_fixtures(cases: &[Case]) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut differ = String::new();
    for case in cases {
        let dir = fixtures.join(format!("qemu-{}", case.name));
        let path = dir.join("expected");
        let read = |file: &str| {
            fs::read_to_string(dir.join(file)).unwrap_or_else(|e| {
                panic!("{}/{file}: {e} (record the cases: see tests/qemu/README.md)", dir.display())
            })
        };
        let checked_in = by_place(&read("expected"), &read("device.umockdev"));
        let live = by_place(&expected_text(case), &case.recording);
        if live != checked_in {
            differ += &format!("{}:\n  checked in:\n{checked_in}  live:\n{live}", path.display());
        }
    }
    assert!(differ.is_empty(), "the live agent's calls differ from the checked-in fixtures:\n{differ}");
}

/// The calls with each block device's name replaced by its place: its parent's devpath and its
/// partition number (`.../0:0:0:1/block#1` for sdb1 on LUN 1), from the recording.
fn by_place(calls: &str, recording: &str) -> String {
    let devpaths: Vec<&str> = recording.lines().filter_map(|l| l.strip_prefix("P: ")).collect();
    let mut out = String::new();
    for call in calls.lines() {
        let dev = call.split("+__+").nth(1).unwrap_or_default();
        let dev = dev.split(['+', ' ']).next().unwrap_or_default();
        let suffix = format!("/{dev}");
        let place = devpaths.iter().find(|p| p.ends_with(&suffix)).and_then(|p| {
            let (parent, _) = p.split_once("/block/")?;
            let part = dev.trim_start_matches(|c: char| !c.is_ascii_digit());
            Some(format!("{parent}/block#{part}"))
        });
        out += &match place {
            Some(place) => call.replacen(&format!("+__+{dev}"), &format!("+__+{place}"), 1),
            None => call.to_owned(),
        };
        out.push('\n');
    }
    out
}

#[test]
fn block_devices_are_compared_by_place() {
    let recording = "P: /devices/u/0:0:0:1/block/sdb/sdb1\n\nP: /devices/u/0:0:0:0/block/sda\n\nP: /devices/u/2-1\n";
    assert_eq!(
        by_place("q dom0 custom.USBDeviceAttach+w+__+sdb1\nq dom0 custom.USBDeviceAttach+w+__+2-1\n", recording),
        "q dom0 custom.USBDeviceAttach+w+__+/devices/u/0:0:0:1/block#1\nq dom0 custom.USBDeviceAttach+w+__+2-1\n"
    );
    let swapped = "P: /devices/u/0:0:0:1/block/sda/sda1\n";
    assert_eq!(
        by_place("q dom0 custom.USBDeviceAttach+w+__+sda1\n", swapped),
        by_place("q dom0 custom.USBDeviceAttach+w+__+sdb1\n", recording)
    );
}

// ---------------------------------------------------------------------------------------------
// Writing a case directory

/// Where the captures come from, for each case's README.md.
struct Origin {
    date: String,
    qemu: String,
    kernel: String,
    udev: String,
    command: String,
}

impl Origin {
    fn new(tools: &Tools, vm: &mut Vm, initramfs: &Path, devices: &[String]) -> Origin {
        let run = |program: &Path, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        let package = |name: &str| run(Path::new("dpkg-query"), &["-W", "-f", "${Version}", name]);
        let kernel_package = tools
            .kernel
            .ancestors()
            .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("kernel-").map(str::to_owned))
            .next()
            .unwrap_or_default();
        let dir = vm.dir.to_string_lossy().into_owned();
        let mut args = qemu_base_args(tools, initramfs);
        args.extend(devices.iter().cloned());
        args.extend(["-qmp".to_owned(), "unix:RUN/qmp.sock,server=on,wait=off".to_owned()]);
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                let a = a.replace(&tools.kernel.to_string_lossy().into_owned(), "vmlinuz").replace(&dir, "RUN");
                if a.contains(' ') { format!("'{a}'") } else { a }
            })
            .collect();
        Origin {
            date: run(Path::new("date"), &["-u", "+%Y-%m-%d"]),
            qemu: format!(
                "{} (Debian package qemu-system-x86 {})",
                run(&tools.qemu, &["--version"]),
                package("qemu-system-x86")
            ),
            kernel: format!(
                "Debian package linux-image-{kernel_package}; in the guest: {}",
                vm.ok("cat /proc/version")
            ),
            udev: format!(
                "Debian package udev {} (unpacked, not installed); `udevadm --version` in the guest: {}",
                tools.udev_version,
                vm.ok("/usr/bin/udevadm --version")
            ),
            command: format!("qemu-system-x86_64 {}", shown.join(" ")),
        }
    }
}

fn write_case(dir: &Path, case: &Case, origin: &Origin) {
    let at = dir.join(format!("qemu-{}", case.name));
    fs::create_dir_all(&at).unwrap_or_else(|e| panic!("create {}: {e}", at.display()));
    let write = |name: &str, bytes: &[u8]| {
        fs::write(at.join(name), bytes).unwrap_or_else(|e| panic!("write {}/{name}: {e}", at.display()));
    };
    write("events", &case.events);
    write("events-mixed", &case.mixed);
    write("events-udev", &case.udev);
    write("device.umockdev", case.recording.as_bytes());
    write("rules", case.rules.as_bytes());
    write("expected", expected_text(case).as_bytes());
    write("README.md", source_text(case, origin).as_bytes());
}

fn source_text(case: &Case, origin: &Origin) -> String {
    let steps: String = case.steps.iter().enumerate().map(|(i, s)| format!("{}. `{s}`\n", i + 1)).collect();
    format!(
        "# qemu-{name}: {about}\n\
         \n\
         Captured from a real kernel under qemu by `captures_under_qemu` (tests/qemu/capture.rs) on\n\
         {date}. Nothing here was edited by hand. Re-record every qemu-* case with\n\
         \n\
         \x20   AUTOATTACH_QEMU_RECORD=tests/fixtures cargo test --test qemu captures -- --ignored --test-threads=1\n\
         \n\
         - kernel: {kernel}\n\
         - qemu: {qemu}\n\
         - udev: {udev}\n\
         \n\
         The qemu command line (`RUN` is the run directory; the initramfs holds busybox, the agent,\n\
         the stand-in qrexec client, Debian's udev package and the modules {modules} with what\n\
         modules.dep says they need):\n\
         \n\
         \x20   {command}\n\
         \n\
         In the guest, before the first case: `events_dfl_poll_msecs` = {poll} (what udev's 60-block.rules\n\
         sets, 2000 there, when the block module loads; it is built in here), `systemd-udevd --daemon`\n\
         with Debian's rules, and the agent:\n\
         `autoattach run --rules DIR --qrexec-client STAND-IN --no-qubesdb -v`, every qemu case's rules in DIR.\n\
         \n\
         - `events`: `udevadm monitor --kernel --property`, started before step 1 and stopped after the\n\
         \x20 last step, byte for byte as it printed it;\n\
         - `events-mixed`: `udevadm monitor --kernel --udev --property`, at the same time;\n\
         - `events-udev`: `udevadm monitor --udev --property`, at the same time;\n\
         - `device.umockdev`: `autoattach record` of each device under the USB device(s) named at\n\
         \x20 the `aa record-tree` step (each directory with a `uevent` file and a subsystem), and\n\
         \x20 of their parents, each device once;\n\
         - `rules`: this case's rules;\n\
         - `expected`: the calls the live agent made during these steps, as replay prints them (in\n\
         \x20 the order of the uevents that caused them; live, parallel probes may finish in another).\n\
         \n\
         Steps (QMP commands to qemu; guest commands; `aa` is tests/qemu/aa.sh):\n\
         \n\
         {steps}",
        name = case.name,
        about = case.about,
        date = origin.date,
        kernel = origin.kernel,
        qemu = origin.qemu,
        udev = origin.udev,
        modules = CAPTURE_MODULES.join(", "),
        command = origin.command,
        poll = POLL_MSECS,
    )
}

/// Concatenated `autoattach record` outputs, each device block kept once (the first time).
fn dedup_recording(text: &str) -> String {
    let mut seen = BTreeSet::new();
    let mut out = String::new();
    for block in text.split("\n\n") {
        let block = block.trim_matches('\n');
        let Some(first) = block.lines().next() else { continue };
        if first.starts_with("P: ") && seen.insert(first.to_owned()) {
            out += block;
            out += "\n\n";
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Images

/// The disk images the cases plug: partition tables written by sfdisk, as a user would.
fn make_images(tools: &Tools, dir: &Path) {
    let parts = "label: dos\nlabel-id: 0x50415254\nsize=4MiB, type=c\nsize=4MiB, type=83\ntype=5\nsize=2MiB, type=83\n";
    let one = |id: u32| format!("label: dos\nlabel-id: {id:#010x}\ntype=c\n");
    let images = [
        ("parts.img", 16u64, parts.to_owned()),
        ("card.img", 8, one(0x43415244)),
        ("hubstick.img", 8, one(0x48554253)),
        ("lun0.img", 8, one(0x4c554e30)),
        ("lun1.img", 8, one(0x4c554e31)),
        ("twin1.img", 8, one(0x5457494e)),
        ("twin2.img", 8, one(0x5457494e)),
    ];
    for (name, mib, script) in images {
        let path = dir.join(name);
        let file = fs::File::create(&path).expect("create a disk image");
        file.set_len(mib << 20).expect("size a disk image");
        drop(file);
        sfdisk(tools, &path, &script);
    }
    // A data CD without a file system: the drive only needs a medium of 2048-byte sectors.
    let disc = fs::File::create(dir.join("disc.iso")).expect("create the disc image");
    disc.set_len(4 << 20).expect("size the disc image");
}

fn sfdisk(tools: &Tools, image: &Path, script: &str) {
    let mut child = Command::new(&tools.sfdisk)
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", tools.sfdisk.display()));
    child.stdin.take().expect("sfdisk stdin").write_all(script.as_bytes()).expect("write the sfdisk script");
    let out = child.wait_with_output().expect("wait for sfdisk");
    assert!(
        out.status.success(),
        "sfdisk {}: {}\n{}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RFC 4648 base64, ignoring line breaks (busybox base64 wraps at 76).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if clean.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for chunk in clean.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = n << 6 | u32::from(value(c)?);
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

#[test]
fn base64_decodes_what_busybox_writes() {
    assert_eq!(base64_decode("aGVsbG8K").unwrap(), b"hello\n");
    assert_eq!(base64_decode("aGk=\n").unwrap(), b"hi");
    assert_eq!(base64_decode("YQ==").unwrap(), b"a");
    assert_eq!(base64_decode("AAEC/f7/").unwrap(), [0, 1, 2, 0xfd, 0xfe, 0xff]);
    assert!(base64_decode("YQ=").is_none());
    assert!(base64_decode("Y!==").is_none());
}

#[test]
fn calls_are_put_in_the_order_of_their_uevents() {
    let events = "monitor will print the received events for:\nKERNEL - the kernel uevent\n\n\
        KERNEL[1.000001] add      /devices/x/sda/sda1 (block)\nACTION=add\n\n\
        KERNEL[1.000002] add      /devices/x/sda/sda2 (block)\nACTION=add\n\n\
        KERNEL[2.5] remove   /devices/x/sda/sda2 (block)\nACTION=remove\n\n\
        KERNEL[2.6] remove   /devices/x/sda/sda1 (block)\nACTION=remove\n\n";
    let case = Case {
        name: "t",
        about: "",
        rules: String::new(),
        events: events.as_bytes().to_vec(),
        mixed: Vec::new(),
        udev: Vec::new(),
        recording: String::new(),
        calls: [
            "1500000000 dom0 custom.USBDeviceAttach+w+__+sda2 readable=yes",
            "1600000000 dom0 custom.USBDeviceAttach+w+__+sda1 readable=yes",
            "2700000000 dom0 custom.USBDeviceDetach+w+__+sda1 readable=no",
            "2800000000 dom0 custom.USBDeviceDetach+w+__+sda2 readable=no",
        ]
        .map(str::to_owned)
        .into(),
        steps: Vec::new(),
        busid: String::new(),
    };
    assert_eq!(
        expected_text(&case),
        "qrexec-client-vm dom0 custom.USBDeviceAttach+w+__+sda1\n\
         qrexec-client-vm dom0 custom.USBDeviceAttach+w+__+sda2\n\
         qrexec-client-vm dom0 custom.USBDeviceDetach+w+__+sda2\n\
         qrexec-client-vm dom0 custom.USBDeviceDetach+w+__+sda1\n"
    );
}

#[test]
fn a_recording_keeps_each_device_once() {
    let text =
        "P: /devices/a/b\nA: x=1\n\nP: /devices/a\nA: y=2\n\nP: /devices/a/c\nA: z=3\n\nP: /devices/a\nA: y=2\n\n";
    assert_eq!(
        dedup_recording(text),
        "P: /devices/a/b\nA: x=1\n\nP: /devices/a\nA: y=2\n\nP: /devices/a/c\nA: z=3\n\n"
    );
}
