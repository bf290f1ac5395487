//! The `autoattach` binary over fixtures: replay, check, test, list, record, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autoattach"));
    c.env_remove("JOURNAL_STREAM");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run autoattach")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The usb-stick fixture's partition sda1 (SanDisk 0781:5581, serial 4C530001230101115543,
/// one mass-storage interface, on interface 1.0 of USB device 1-2): its Qubes device id,
/// encoded as the call carries it.
const STICK_IDENT: &str = "0781+5581+4C530001230101115543+u080650+1.0+1";

/// Every case directory with an `expected` file replays to exactly those calls, twice in a
/// row (stable across runs). The qemu-* captures are tests/captures.rs's (all three captures of
/// each, and the cases replay cannot yet reproduce).
#[test]
fn every_fixture_replays_to_its_expected_calls() {
    let mut cases = 0;
    let mut entries: Vec<_> = std::fs::read_dir(fixtures()).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    let qemu = |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("qemu-"));
    for case in entries.into_iter().filter(|p| p.join("expected").is_file() && !qemu(p)) {
        let expected = std::fs::read_to_string(case.join("expected")).unwrap();
        for _ in 0..2 {
            let out = run(&["replay", case.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(0), "{}: {}", case.display(), stderr(&out));
            assert_eq!(stdout(&out), expected, "{}\n{}", case.display(), stderr(&out));
        }
        cases += 1;
    }
    assert!(cases >= 7, "only {cases} fixture cases found");
}

/// The fixtures are not modified by replay's directives (they work on a copy).
#[test]
fn replay_leaves_fixtures_untouched() {
    let size = fixtures().join("card-reader/device.umockdev");
    let before = std::fs::read(&size).unwrap();
    let out = run(&["replay", fixtures().join("card-reader").to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&size).unwrap(), before);
}

/// A bare tree plus an event stream and rules given on the command line.
#[test]
fn replay_takes_tree_events_and_rules_separately() {
    let case = fixtures().join("usb-stick");
    let out = run(&[
        "replay",
        case.join("sys").to_str().unwrap(),
        case.join("events").to_str().unwrap(),
        "--rules",
        case.join("rules").to_str().unwrap(),
        "--dev",
        case.join("dev").to_str().unwrap(),
        "--qrexec-client",
        "/usr/bin/qrexec-client-vm",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "/usr/bin/qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1+__+{STICK_IDENT}\n\
             /usr/bin/qrexec-client-vm dom0 custom.USBDeviceDetach+backup+__+sda1+__+{STICK_IDENT}\n"
        )
    );
    // Without an event stream the tree replays as coldplug: the present partition is attached.
    let out = run(&[
        "replay",
        case.join("sys").to_str().unwrap(),
        "--rules",
        case.join("rules").to_str().unwrap(),
        "--dev",
        case.join("dev").to_str().unwrap(),
    ]);
    assert_eq!(stdout(&out), attach_stick(), "{}", stderr(&out));
}

#[test]
fn check_reports_every_error_with_its_place() {
    let dir = tempdir("check");
    let rules = dir.join("broken.rules");
    std::fs::write(
        &rules,
        "SUBSYSTEM==\"block\", ATTRS{serial}==\"ok\", ATTACH=\"work\"\n\
         KERNEL=\"sdb\", ATTACH=\"work\"\n\
         SUBSYSTEM==\"block\", ATTRS{serial}==\"x\", ATTACH=\"my work\"\n\
         SUBSYSTEM==\"block\", RUN+=\"/bin/touch /tmp/x\"\n\
         SUBSYSTEM==\"net\", ATTRS{serial}==\"x\", ATTACH=\"vault\"\n",
    )
    .unwrap();
    let more = dir.join("more.rules");
    std::fs::write(&more, "ATRS{serial}==\"1\", ATTACH=\"work\"\n").unwrap();
    let out = run(&["check", "--rules", rules.to_str().unwrap(), "--rules", more.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let text = stdout(&out);
    let r = rules.display();
    let m = more.display();
    let want = [
        format!("{r}:2:7: KERNEL can only be matched with == or !=, not = (hint: to match, write KERNEL==\"sdb\")"),
        format!(
            "{r}:3:48: ATTACH=\"my work\": ' ' is not allowed (qrexec would rewrite it to '_') (hint: qube names are 1-31 of [A-Za-z0-9_.-], starting with a letter)"
        ),
        format!(
            "{r}:4:21: udev key RUN is not supported (hint: autoattach runs nothing; its only action is ATTACH=\"qube\")"
        ),
        format!("{m}:1:1: unknown key ATRS (hint: did you mean ATTRS?)"),
        format!(
            "{r}:5:1: warning: this rule can never attach anything (hint: only block devices (SUBSYSTEM==\"block\") and whole USB devices (SUBSYSTEM==\"usb\", ENV{{DEVTYPE}}==\"usb_device\") can be attached)"
        ),
        "2 rule(s) loaded, 4 error(s), 2 warning(s)".to_owned(),
    ];
    for line in &want {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    // A clean file passes.
    let good = dir.join("good.rules");
    std::fs::write(
        &good,
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"ok\", ATTACH=\"work\"\n",
    )
    .unwrap();
    let out = run(&["check", "--rules", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let g = good.display();
    assert_eq!(
        stdout(&out),
        format!("rules looked for in:\n  {g}: 1 rule\n1 rule(s) loaded, 0 error(s), 0 warning(s)\n")
    );
    // A missing file named on the command line is an error too.
    let out = run(&["check", "--rules", dir.join("nope.rules").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("nope.rules: cannot read: No such file or directory"), "{}", stdout(&out));
}

/// `test` names the failing key, its pattern and the value found on each parent.
#[test]
fn test_explains_a_non_match_key_by_key() {
    let case = fixtures().join("usb-stick");
    let dir = tempdir("explain");
    let rules = dir.join("r.rules");
    std::fs::write(
        &rules,
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"0781\", ATTRS{serial}==\"WRONG\", ATTACH=\"backup\"\n\
         SUBSYSTEM==\"block\", ATTRS{idVendor}==\"0781\", ATTRS{model}==\"*SanDisk*\", ATTACH=\"split\"\n",
    )
    .unwrap();
    let (sys, dev) = (case.join("sys"), case.join("dev"));
    let args = [
        "test",
        "sda1",
        "--sysfs",
        sys.to_str().unwrap(),
        "--dev",
        dev.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
    ];
    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", stderr(&out));
    let want = [
        "  pass  SUBSYSTEM==\"block\"                       value \"block\"",
        "    [0] sda1           FAIL  ATTRS{idVendor}==\"0781\"             value (missing)",
        "    [6] 1-2            pass  ATTRS{idVendor}==\"0781\"             value \"0781\"",
        "    [6] 1-2            FAIL  ATTRS{serial}==\"WRONG\"              value \"4C530001230101115543\"",
        "  no device passed all parent keys (udev: \"no parent device passed parent conditions\")",
        // The classic udev mistake: idVendor lives on the USB device, model on the SCSI device.
        "    [2] 0:0:0:0        FAIL  ATTRS{idVendor}==\"0781\"             value (missing)",
        "    [6] 1-2            FAIL  ATTRS{model}==\"*SanDisk*\"           value (missing)",
        "no rule matches: nothing would be called",
    ];
    // Columns are for people; compare words.
    let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    for line in want {
        assert!(text.lines().any(|l| words(l) == words(line)), "missing {line:?} in:\n{text}");
    }
    // With the right serial it matches, is ready, and says what it would call.
    std::fs::write(&rules, "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"4C530001230101115543\", ATTACH=\"backup\"\n").unwrap();
    let out = run(&args);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("  every parent key holds on [6] /devices/pci0000:00/0000:00:14.0/usb1/1-2\n"), "{text}");
    assert!(text.contains(&format!("\nwould call: {}", attach_stick())), "{text}");
    // A device that is not there.
    let out = run(&["test", "sdz9", "--sysfs", case.join("sys").to_str().unwrap(), "--rules", rules.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("no device \"sdz9\""), "{}", stderr(&out));
}

#[test]
fn list_shows_identity_and_rule() {
    let case = fixtures().join("usb-stick");
    let sys = case.join("sys");
    let out = run(&[
        "list",
        "--no-qubesdb",
        "--sysfs",
        sys.to_str().unwrap(),
        "--rules",
        case.join("rules").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let rules = case.join("rules");
    let want = format!(
        "# sda1\n\
         #   devpath        /devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1\n\
         #   kind           block partition 1, 60061696 sectors (28.6 GiB)\n\
         #   usb device     1-2 0781:5581, manufacturer \" USB\", product \" SanDisk 3.2Gen1\"\n\
         #   serial         \"4C530001230101115543\"\n\
         #   interfaces     :080650:\n\
         #   identity       id \"0781:5581:4C530001230101115543:u080650:1.0:1\" (R4.3 device id, from sysfs: no \
         qubesdb here to check against)\n\
         #   rule           {}:2 -> ATTACH=\"backup\"\n\
         SUBSYSTEM==\"block\", ENV{{DEVTYPE}}==\"partition\", ENV{{PARTN}}==\"1\", ATTRS{{idVendor}}==\"0781\", \
         ATTRS{{idProduct}}==\"5581\", ATTRS{{serial}}==\"4C530001230101115543\", ATTACH=\"QUBE\"\n",
        rules.display()
    );
    assert!(text.contains(&want), "{text}");
    assert!(text.contains("# 1-2\n"), "{text}");
}

/// record then replay: a recording of a fixture device replays like the tree itself.
#[test]
fn record_writes_a_replayable_recording() {
    let case = fixtures().join("usb-stick");
    let dir = tempdir("record");
    let file = dir.join("stick.umockdev");
    let out = run(&["record", "sda1", "--sysfs", case.join("sys").to_str().unwrap(), "-o", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with(
            "P: /devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1\nN: sda1\n"
        ),
        "{text}"
    );
    let out = run(&["replay", file.to_str().unwrap(), "--rules", case.join("rules").to_str().unwrap()]);
    assert_eq!(stdout(&out), attach_stick(), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2_and_say_what_to_do() {
    for (args, want) in [
        (&["frobnicate"][..], "unknown command \"frobnicate\""),
        (&["run", "--bogus"][..], "unknown option --bogus"),
        (&["run", "--timeout", "soon"][..], "--timeout \"soon\": not a duration"),
        (&["test"][..], "test takes DEVICE"),
        (&[][..], "no command given"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("see `autoattach ") && stderr(&out).contains("--help`"), "{}", stderr(&out));
    }
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("exit codes:"));
}

#[test]
fn replay_input_errors_exit_5() {
    let out = run(&["replay", "/nonexistent/fixture"]);
    assert_eq!(out.status.code(), Some(5));
    let dir = tempdir("bad-events");
    std::fs::write(
        dir.join("events"),
        "KERNEL[1.0] add /devices/../x (block)\nACTION=add\nDEVPATH=/devices/../x\nSUBSYSTEM=block\n",
    )
    .unwrap();
    let case = fixtures().join("usb-stick");
    let out = run(&[
        "replay",
        case.join("sys").to_str().unwrap(),
        dir.join("events").to_str().unwrap(),
        "--rules",
        case.join("rules").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("events: line 1: devpath is not a plain absolute path"), "{}", stderr(&out));
    std::fs::write(dir.join("rec.umockdev"), "P: /devices/x\nL: x=/etc/passwd\n").unwrap();
    let out =
        run(&["replay", dir.join("rec.umockdev").to_str().unwrap(), "--rules", case.join("rules").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("leaves the tree"), "{}", stderr(&out));
}

fn attach_stick() -> String {
    format!("qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1+__+{STICK_IDENT}\n")
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autoattach-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in `qubesdb-read` over `records` (key, value): it answers them only from the
/// `after`-th read of `key` on (every read is logged as `KEY hit|miss`), as qubesdb-cmd
/// answers (the value and a newline, or exit 2), and `/vm-config/autoattach-rules` with
/// `rules` if given.
fn qubesdb_standin(dir: &Path, records: &[(&str, &str)], key: &str, after: u32, rules: Option<&str>) -> PathBuf {
    let script = dir.join("qubesdb-read");
    let (db, rules_file) = (dir.join("db"), dir.join("vm-config-rules"));
    std::fs::create_dir_all(&db).unwrap();
    for (k, v) in records {
        std::fs::write(db.join(k.replace('/', "%")), v).unwrap();
    }
    if let Some(r) = rules {
        std::fs::write(&rules_file, r).unwrap();
    }
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = -r ] && shift\n\
             if [ \"$1\" = /vm-config/autoattach-rules ]; then [ -f {rules} ] && exec cat {rules}; exit 2; fi\n\
             n=$(cat {dir}/count 2>/dev/null || echo 0)\n\
             if [ \"$1\" = {key} ]; then n=$((n + 1)); echo $n > {dir}/count; fi\n\
             f={db}/$(printf %s \"$1\" | tr / %)\n\
             if [ $n -ge {after} ] && [ -e \"$f\" ]; then echo \"$1 hit\" >> {dir}/reads; cat \"$f\"; echo; exit 0; fi\n\
             echo \"$1 miss\" >> {dir}/reads; exit 2\n",
            rules = rules_file.display(),
            dir = dir.display(),
            db = db.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// What Qubes R4.3's udev scripts publish for the usb-stick fixture's sda1, its disk and its
/// USB device (udev-block-add-change, udev-usb-add-change; desc with udev's \xNN escapes).
const STICK_RECORDS: [(&str, &str); 6] = [
    ("/qubes-block-devices/sda1/desc", "SanDisk_3.2Gen1 ()"),
    ("/qubes-block-devices/sda1/parent", "sda"),
    ("/qubes-block-devices/sda/desc", "SanDisk_3.2Gen1 ()"),
    ("/qubes-block-devices/sda/parent", "1-2:1.0"),
    ("/qubes-usb-devices/1-2/desc", "0781:5581 \\x20USB \\x20SanDisk\\x203.2Gen1 4C530001230101115543"),
    ("/qubes-usb-devices/1-2/interfaces", ":080650:"),
];

/// Uevents run ahead of Qubes publishing the device to dom0: the agent asks qubesdb again
/// (the fallback reader polls) and calls only once the device is published, with the id the
/// published records give (they agree with sysfs); if it never is, it gives up and calls
/// nothing.
#[test]
fn calls_wait_for_qubesdb_publication() {
    let case = fixtures().join("usb-stick");
    let dir = tempdir("qubesdb-late");
    let reader = qubesdb_standin(&dir, &STICK_RECORDS, "/qubes-block-devices/sda1/desc", 4, None);
    // The stick as present at start (coldplug), so it stays while the agent waits.
    let (sys, dev, rules) = (case.join("sys"), case.join("dev"), case.join("rules"));
    let args = ["replay", sys.to_str().unwrap(), "--dev", dev.to_str().unwrap(), "--rules", rules.to_str().unwrap()];
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), attach_stick(), "{}", stderr(&out));
    let reads = std::fs::read_to_string(dir.join("reads")).unwrap();
    let records: String = STICK_RECORDS.iter().map(|(k, _)| format!("{k} hit\n")).collect();
    assert_eq!(
        reads,
        "/qubes-block-devices/sda1/desc miss\n".repeat(3) + &records,
        "three polls before publication; then the record and its parents', key by key, and the call"
    );
    // Never published: no call at all, and a warning that says why.
    let dir = tempdir("qubesdb-never");
    let reader = qubesdb_standin(&dir, &STICK_RECORDS, "/qubes-block-devices/sda1/desc", u32::MAX, None);
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap(), "--timeout", "5s"]).output().unwrap();
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    assert!(stderr(&out).contains("gave up after 5000 ms: not yet published to dom0 in qubesdb"), "{}", stderr(&out));
}

/// Qubes R4.1/R4.2 publish only `desc` (no device ids there): the call carries the desc form,
/// taken once the record is known whole; a record of another stick at the same place is
/// never called, and the log names both.
#[test]
fn r42_records_give_the_desc_form_and_another_device_is_never_called() {
    let case = fixtures().join("usb-stick");
    let (sys, dev, rules) = (case.join("sys"), case.join("dev"), case.join("rules"));
    let args = ["replay", sys.to_str().unwrap(), "--dev", dev.to_str().unwrap(), "--rules", rules.to_str().unwrap()];
    let dir = tempdir("qubesdb-r42");
    let r42 = [("/qubes-block-devices/sda1/desc", "SanDisk_3.2Gen1 (BACKUP)")];
    let reader = qubesdb_standin(&dir, &r42, "/qubes-block-devices/sda1/desc", 1, None);
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap()]).output().unwrap();
    assert_eq!(
        stdout(&out),
        "qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1+__+desc+SanDisk_5f3.2Gen1_20_28BACKUP_29\n",
        "{}",
        stderr(&out)
    );
    let dir = tempdir("qubesdb-stale");
    let mut stale = STICK_RECORDS;
    stale[4].1 = "0781:5581 \\x20USB \\x20SanDisk\\x203.2Gen1 EVIL0000000000000000";
    let reader = qubesdb_standin(&dir, &stale, "/qubes-block-devices/sda1/desc", 1, None);
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap(), "--timeout", "3s"]).output().unwrap();
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    let log = stderr(&out);
    assert!(
        log.contains(
            "error: sda1 0781:5581 \" USB\" \" SanDisk 3.2Gen1\" serial \"4C530001230101115543\": not \
             attached after 3000 ms: qubesdb's record \
             /qubes-block-devices/sda1/ describes another device: published id \
             \"0781:5581:EVIL0000000000000000:u080650:1.0:1\", this device is id \
             \"0781:5581:4C530001230101115543:u080650:1.0:1\""
        ),
        "{log}"
    );
}

/// Rules set from dom0 (`qvm-features sys-usb vm-config.autoattach-rules ...`) arrive through
/// qubesdb; their errors name that origin.
#[test]
fn rules_from_qubesdb_vm_config() {
    let dir = tempdir("qubesdb-rules");
    let reader = qubesdb_standin(
        &dir,
        &[],
        "-",
        1,
        Some(
            "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{serial}==\"1\", ATTACH=\"work\"\nKERNEL=\"x\", ATTACH=\"work\"\n",
        ),
    );
    let out = run(&["check", "--qubesdb-read", reader.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains("qubesdb:/vm-config/autoattach-rules:2:7: KERNEL can only be matched with == or !="),
        "{text}"
    );
    assert!(text.contains("1 rule(s) loaded, 1 error(s)"), "{text}");
}

/// Real captures from this machine's kernel (tests/fixtures/capture-real.sh): the kernel's
/// blocks, a mixed `--kernel --udev` capture and a `--udev` one replay to the same calls, and
/// the output says what it read past.
#[test]
fn real_captures_replay_alike() {
    for case in ["loop-real", "zram-real"] {
        let dir = fixtures().join(case);
        let expected = std::fs::read_to_string(dir.join("expected")).unwrap();
        assert_eq!(expected.lines().count(), 2, "{case}: an attach and a detach");
        for (events, note) in [
            ("events", None),
            ("events-mixed", Some("udev block(s) skipped")),
            ("events-udev", Some("left out udev's properties")),
        ] {
            let out = run(&["replay", dir.to_str().unwrap(), dir.join(events).to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(0), "{case}/{events}: {}", stderr(&out));
            assert_eq!(stdout(&out), expected, "{case}/{events}: {}", stderr(&out));
            if let Some(note) = note {
                assert!(stderr(&out).contains(note), "{case}/{events}: {}", stderr(&out));
            }
        }
    }
}

/// A capture made without `--property` is refused with how to capture it.
#[test]
fn replay_refuses_a_capture_without_properties() {
    let dir = tempdir("no-property");
    std::fs::write(
        dir.join("mon.txt"),
        "monitor will print the received events for:\nKERNEL - the kernel uevent\n\n\
         KERNEL[1502.956205] add      /devices/virtual/block/loop870 (block)\n\
         KERNEL[1506.444282] remove   /devices/virtual/block/loop870 (block)\n",
    )
    .unwrap();
    let case = fixtures().join("loop-real");
    let out = run(&["replay", case.to_str().unwrap(), dir.join("mon.txt").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "mon.txt: line 4: the event has no properties: capture with `udevadm monitor --kernel --property`"
        ),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Containment (issue 11.6): replay, test, list and record never leave their fixture.

/// A copy of the usb-stick case to tamper with, and a victim directory outside it.
fn tampered_case(tag: &str) -> (PathBuf, PathBuf) {
    let dir = tempdir(tag);
    let case = dir.join("case");
    let status = Command::new("cp").arg("-a").arg(fixtures().join("usb-stick")).arg(&case).status().unwrap();
    assert!(status.success());
    let victim = dir.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("important"), "keep me").unwrap();
    (case, victim)
}

fn replay_case(case: &Path) -> Output {
    run(&["replay", case.to_str().unwrap()])
}

/// `#! set` through a link that leaves the case: refused, nothing written outside.
#[test]
fn replay_never_writes_outside_the_fixture() {
    let (case, victim) = tampered_case("contain-write");
    std::os::unix::fs::symlink(&victim, case.join("sys/devices/evil")).unwrap();
    std::fs::write(case.join("events"), "#! set sys/devices/evil/written 1\n").unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("leads outside the fixture"), "{}", stderr(&out));
    assert!(!victim.join("written").exists());
    // The same directive on a link inside the copy is refused too (no link on a directive's path).
    std::fs::remove_file(case.join("sys/devices/evil")).unwrap();
    std::os::unix::fs::symlink("pci0000:00", case.join("sys/devices/alias")).unwrap();
    std::fs::write(case.join("events"), "#! set sys/devices/alias/written 1\n").unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("events:1: sys/devices/alias/written: leads outside the fixture"),
        "{}",
        stderr(&out)
    );
    assert!(!case.join("sys/devices/pci0000:00/written").exists(), "the fixture itself is never written");
}

/// `#! rm` through an escaping relative link: refused, nothing deleted.
#[test]
fn replay_never_deletes_outside_the_fixture() {
    let (case, victim) = tampered_case("contain-delete");
    std::os::unix::fs::symlink("../../victim", case.join("sys/devices/evil")).unwrap();
    std::fs::write(case.join("events"), "#! rm sys/devices/evil/important\n").unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("sys/devices/evil -> ../../victim: leads outside the fixture"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(victim.join("important")).unwrap(), "keep me");
}

/// Attributes linked to files outside the tree are not read: `list` and `test` print nothing of
/// them, and `record` records no such link.
#[test]
fn tools_never_read_outside_the_fixture() {
    let (case, victim) = tampered_case("contain-read");
    std::fs::write(victim.join("secret"), "s3cr3t-d1scl0sed").unwrap();
    let usb = case.join("sys/devices/pci0000:00/0000:00:14.0/usb1/1-2");
    std::fs::remove_file(usb.join("product")).unwrap();
    std::os::unix::fs::symlink(victim.join("secret"), usb.join("product")).unwrap();
    std::os::unix::fs::symlink("../../../../../../victim/secret", usb.join("manufacturer.lnk")).unwrap();
    let sys = case.join("sys");
    let rules = case.join("rules");
    for args in [
        vec!["list", "--sysfs", sys.to_str().unwrap(), "--rules", rules.to_str().unwrap()],
        vec!["test", "sda1", "--sysfs", sys.to_str().unwrap(), "--rules", rules.to_str().unwrap()],
        vec!["record", "sda1", "--sysfs", sys.to_str().unwrap()],
    ] {
        let out = run(&args);
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains("s3cr3t"), "{args:?} disclosed the secret:\n{all}");
    }
}

/// A `uevent` linked to /dev/zero, a FIFO, a device node: refused at once, never read.
#[test]
fn replay_refuses_endless_and_special_files() {
    let (case, _) = tampered_case("contain-special");
    let disk = case.join("sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda");
    std::fs::remove_file(disk.join("uevent")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", disk.join("uevent")).unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("uevent -> /dev/zero: leads outside the fixture"), "{}", stderr(&out));
    std::fs::remove_file(disk.join("uevent")).unwrap();
    nix::unistd::mkfifo(&disk.join("uevent"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let started = std::time::Instant::now();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("uevent: is a FIFO, not a regular file: refused"), "{}", stderr(&out));
    // `list` on the tree itself does not hang on the FIFO either.
    let out =
        run(&["list", "--sysfs", case.join("sys").to_str().unwrap(), "--rules", case.join("rules").to_str().unwrap()]);
    assert!(out.status.code().is_some());
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    std::fs::remove_file(disk.join("uevent")).unwrap();
    if nix::unistd::geteuid().is_root() {
        let dev = nix::sys::stat::makedev(1, 5);
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o644);
        nix::sys::stat::mknod(&disk.join("uevent"), nix::sys::stat::SFlag::S_IFCHR, mode, dev).unwrap();
        let out = replay_case(&case);
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("uevent: is a character device, not a regular file: refused"),
            "{}",
            stderr(&out)
        );
    } else {
        assert!(std::env::var_os("AUTOATTACH_FULL").is_none(), "AUTOATTACH_FULL=1 needs root for the device node case");
    }
}

/// `#! fill` is bounded.
#[test]
fn replay_refuses_a_huge_fill() {
    let (case, _) = tampered_case("contain-fill");
    std::fs::write(case.join("events"), "#! fill dev/sdc 2000000000\n").unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("events:1: fill of 2000000000 bytes refused: at most 1048576"), "{}", stderr(&out));
}

/// `#! hex` writes bytes given as hex digits, and refuses anything else.
#[test]
fn replay_hex_writes_bytes_and_refuses_bad_digits() {
    let (case, _) = tampered_case("hex");
    std::fs::write(case.join("events"), "#! hex dev/sdc 12zz\n").unwrap();
    let out = replay_case(&case);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("events:1: hex needs the bytes as pairs of hex digits"), "{}", stderr(&out));
    std::fs::write(case.join("events"), "#! hex sys/x 1\n").unwrap();
    assert!(stderr(&replay_case(&case)).contains("events:1: hex needs the bytes"));
}

// ---------------------------------------------------------------------------------------------
// Identity (issue 9)

/// The fields of a call's identity (IDENTITY.md §2: after the second `+__+`, `:` sent as `+`).
fn ident_fields(call: &str) -> Vec<String> {
    call.splitn(3, "+__+").nth(2).unwrap().split('+').map(str::to_owned).collect()
}

/// Issue 9's swap, replayed with virtual time (tests/fixtures/swap): two sticks of one model
/// in the same port under the same name differ only in serial, and so do their calls; the
/// Detach that follows the first Attach carries the first stick's identity. When dom0 answers
/// the first Attach with 73 (it found another device there and attached nothing), no Detach
/// follows at all; when qrexec answers 125 (it failed, maybe after dom0 attached A), it does.
#[test]
fn a_swap_while_dom0_asks_names_each_stick() {
    let case = fixtures().join("swap");
    let out = run(&["replay", case.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let calls: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    let [a, b, detach] = &calls[..] else { panic!("{calls:?}") };
    assert!(a.contains("USBDeviceAttach+backup+__+sda1+__+") && b.contains("USBDeviceAttach+backup+__+sda1+__+"));
    let (fa, fb) = (ident_fields(a), ident_fields(b));
    let differ: Vec<usize> = (0..fa.len().max(fb.len())).filter(|&i| fa.get(i) != fb.get(i)).collect();
    assert_eq!(differ, [2], "only the serial field differs: {fa:?} {fb:?}");
    assert_eq!((fa[2].as_str(), fb[2].as_str()), ("4C530001230101115543", "4C530001260712117561"));
    assert_eq!(*detach, a.replace("USBDeviceAttach", "USBDeviceDetach"), "the Detach names stick A");
    assert!(stderr(&out).contains("removed while its attach call was in flight"), "{}", stderr(&out));

    let dir = tempdir("swap-73");
    let events = std::fs::read_to_string(case.join("events")).unwrap().replace("#! dom0 10s\n", "#! dom0 10s 73\n");
    std::fs::write(dir.join("events"), events).unwrap();
    let out = run(&["replay", case.to_str().unwrap(), dir.join("events").to_str().unwrap()]);
    assert_eq!(stdout(&out), format!("{a}\n{b}\n"), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("exit 73: dom0 handler: identity mismatch"), "{log}");
    assert!(log.contains("its attach call did not attach it: nothing to detach"), "{log}");

    // qrexec's 125 may come after dom0 attached stick A: the Detach follows all the same.
    let events = std::fs::read_to_string(case.join("events")).unwrap().replace("#! dom0 10s\n", "#! dom0 10s 125\n");
    std::fs::write(dir.join("events"), events).unwrap();
    let out = run(&["replay", case.to_str().unwrap(), dir.join("events").to_str().unwrap()]);
    assert_eq!(stdout(&out), format!("{a}\n{b}\n{detach}\n"), "{}", stderr(&out));
    assert!(stderr(&out).contains("exit 125: qrexec: qrexec failure"), "{}", stderr(&out));

    // The same answer given at once reads the same way (it once read as "attached nothing").
    let events = std::fs::read_to_string(case.join("events")).unwrap().replace("#! dom0 10s\n", "#! dom0 0s 125\n");
    std::fs::write(dir.join("events"), events).unwrap();
    let out = run(&["replay", case.to_str().unwrap(), dir.join("events").to_str().unwrap()]);
    assert!(stdout(&out).contains(detach.as_str()), "{}\n{}", stdout(&out), stderr(&out));
}

/// Issue 9's swap at a USB port (tests/fixtures/port-swap): the security key's usb_device
/// rule matches, its Attach waits on dom0, the key is pulled and a keyboard appears at the same
/// port 1-4. The keyboard does not match the key's rule: one call, the key's, and no Detach
/// (Qubes detaches a removed USB device itself). With a rule that matches the port, both are
/// called, each with its own identity (vendor, product and interfaces differ), and neither is
/// detached.
#[test]
fn a_usb_port_swap_while_dom0_asks_names_each_device() {
    let case = fixtures().join("port-swap");
    let key = "custom.USBDeviceAttach+vault+__+1-4+__+1050+0407++u030101u030000u0b0000";
    let out = run(&["replay", case.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("qrexec-client-vm dom0 {key}\n"), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("removed while its attach call was in flight: not detached: Qubes detaches"), "{log}");

    let dir = tempdir("port-swap");
    let port = dir.join("port.rules");
    std::fs::write(&port, "SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_device\", KERNEL==\"1-4\", ATTACH=\"vault\"\n")
        .unwrap();
    let out = run(&["replay", case.to_str().unwrap(), "--rules", port.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let calls: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    let [a, b] = &calls[..] else { panic!("{calls:?}\n{}", stderr(&out)) };
    assert_eq!(*a, format!("qrexec-client-vm dom0 {key}"));
    assert!(b.contains("USBDeviceAttach+vault+__+1-4+__+"), "{b}");
    let (fa, fb) = (ident_fields(a), ident_fields(b));
    assert_eq!((fa.len(), fb.len()), (4, 4), "{fa:?} {fb:?}");
    let differ: Vec<usize> = (0..4).filter(|&i| fa[i] != fb[i]).collect();
    assert_eq!(differ, [0, 1, 3], "vendor, product and interfaces differ; neither has a serial: {fa:?} {fb:?}");
    assert_eq!(fb, ["046d", "c31c", "", "u030101"]);
}

/// A stick without a serial has a stable, documented identity: an empty serial field
/// (README, "Device identity"), the same on every replay and for every stick of its model.
#[test]
fn a_device_without_a_serial_has_an_empty_serial_field() {
    let (case, _) = tampered_case("no-serial");
    std::fs::remove_file(case.join("sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/serial")).unwrap();
    std::fs::write(
        case.join("rules"),
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{idVendor}==\"0781\", ATTACH=\"backup\"\n",
    )
    .unwrap();
    let want = "custom.USBDeviceAttach+backup+__+sda1+__+0781+5581++u080650+1.0+1\n";
    for _ in 0..2 {
        let out = replay_case(&case);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stdout(&out).starts_with(&format!("qrexec-client-vm dom0 {want}")), "{}", stdout(&out));
    }
}
