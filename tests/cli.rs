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

/// Every case directory with an `expected` file replays to exactly those calls, twice in a
/// row (stable across runs).
#[test]
fn every_fixture_replays_to_its_expected_calls() {
    let mut cases = 0;
    let mut entries: Vec<_> = std::fs::read_dir(fixtures()).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for case in entries.into_iter().filter(|p| p.join("expected").is_file()) {
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
        "/usr/bin/qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1\n\
         /usr/bin/qrexec-client-vm dom0 custom.USBDeviceDetach+backup+__+sda1\n"
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
    assert_eq!(stdout(&out), "qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1\n", "{}", stderr(&out));
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
    assert_eq!(stdout(&out), "1 rule(s) loaded, 0 error(s), 0 warning(s)\n");
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
    assert!(text.contains("\nwould call: qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1\n"), "{text}");
    // A device that is not there.
    let out = run(&["test", "sdz9", "--sysfs", case.join("sys").to_str().unwrap(), "--rules", rules.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("no device \"sdz9\""), "{}", stderr(&out));
}

#[test]
fn list_shows_identity_and_rule() {
    let case = fixtures().join("usb-stick");
    let out =
        run(&["list", "--sysfs", case.join("sys").to_str().unwrap(), "--rules", case.join("rules").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains(
            "sda1 0781:5581 \" USB\" \" SanDisk 3.2Gen1\" serial \"4C530001230101115543\" interfaces :080650:\n"
        ),
        "{text}"
    );
    assert!(text.contains("rules:2 -> ATTACH=\"backup\""), "{text}");
    assert!(
        text.contains(
            "usb 1-2 0781:5581 \" USB\" \" SanDisk 3.2Gen1\" serial \"4C530001230101115543\" interfaces :080650:\n"
        ),
        "{text}"
    );
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
    assert_eq!(stdout(&out), "qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1\n", "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2_and_say_what_to_do() {
    for (args, want) in [
        (&["frobnicate"][..], "unknown command \"frobnicate\""),
        (&["run", "--bogus"][..], "unknown option --bogus"),
        (&["run", "--timeout", "soon"][..], "--timeout \"soon\": not a duration"),
        (&["test"][..], "test takes one DEVICE"),
        (&[][..], "no command given"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("see `autoattach --help`"));
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
    std::fs::write(dir.join("events"), "KERNEL[1.0] add /devices/../x (block)\n").unwrap();
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

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autoattach-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in `qubesdb-read`: answers `key` only from its `after`-th read on (each read is
/// logged as `KEY hit|miss`), and `/vm-config/autoattach-rules` with `rules` if given.
fn qubesdb_standin(dir: &Path, key: &str, after: u32, rules: Option<&str>) -> PathBuf {
    let script = dir.join("qubesdb-read");
    let rules_file = dir.join("vm-config-rules");
    if let Some(r) = rules {
        std::fs::write(&rules_file, r).unwrap();
    }
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             [ \"$1\" = -r ] && shift\n\
             if [ \"$1\" = /vm-config/autoattach-rules ]; then [ -f {rules} ] && exec cat {rules}; exit 1; fi\n\
             n=$(cat {dir}/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {dir}/count\n\
             if [ \"$1\" = {key} ] && [ $n -ge {after} ]; then echo \"$1 hit\" >> {dir}/reads; echo 'SanDisk 3.2Gen1'; exit 0; fi\n\
             echo \"$1 miss\" >> {dir}/reads; exit 1\n",
            rules = rules_file.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

/// Uevents run ahead of Qubes publishing the device to dom0: the agent polls qubesdb and calls
/// only once the device is published; if it never is, it gives up and calls nothing.
#[test]
fn calls_wait_for_qubesdb_publication() {
    let case = fixtures().join("usb-stick");
    let dir = tempdir("qubesdb-late");
    let reader = qubesdb_standin(&dir, "/qubes-block-devices/sda1/desc", 4, None);
    // The stick as present at start (coldplug), so it stays while the agent waits.
    let (sys, dev, rules) = (case.join("sys"), case.join("dev"), case.join("rules"));
    let args = ["replay", sys.to_str().unwrap(), "--dev", dev.to_str().unwrap(), "--rules", rules.to_str().unwrap()];
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "qrexec-client-vm dom0 custom.USBDeviceAttach+backup+__+sda1\n", "{}", stderr(&out));
    let reads = std::fs::read_to_string(dir.join("reads")).unwrap();
    assert_eq!(
        reads,
        "/qubes-block-devices/sda1/desc miss\n".repeat(3) + "/qubes-block-devices/sda1/desc hit\n",
        "three polls before publication, the call after the fourth"
    );
    // Never published: no call at all, and a warning that says why.
    let dir = tempdir("qubesdb-never");
    let reader = qubesdb_standin(&dir, "/qubes-block-devices/sda1/desc", u32::MAX, None);
    let out = bin().args(args).args(["--qubesdb-read", reader.to_str().unwrap(), "--timeout", "5s"]).output().unwrap();
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    assert!(stderr(&out).contains("gave up after 5000 ms: not yet published to dom0 in qubesdb"), "{}", stderr(&out));
}

/// Rules set from dom0 (`qvm-features sys-usb vm-config.autoattach-rules ...`) arrive through
/// qubesdb; their errors name that origin.
#[test]
fn rules_from_qubesdb_vm_config() {
    let dir = tempdir("qubesdb-rules");
    let reader = qubesdb_standin(
        &dir,
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
