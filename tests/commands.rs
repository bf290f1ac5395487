//! The command line as a user meets it: `list`'s rule lines fed back to `test`, `test
//! --action`, `check FILE|DIR`, argument conventions. One test needs root and a loop device
//! (made through /dev/loop-control, removed after).

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_autoattach"));
    c.env_remove("JOURNAL_STREAM");
    c
}

fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    bin().args(args).output().expect("run autoattach")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A device of `list`'s output: its name (the `# NAME` line) and its rule line.
fn listed(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("# ").filter(|n| !n.starts_with(' ')) {
            name = Some(n.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            found.push((name.take().expect("a rule line after its device"), line.to_owned()));
        }
    }
    found
}

/// Each rule line `list` prints, alone in a rules file, is reported by `test` as matching
/// the device it was printed for; the whole output is itself a valid rules file.
/// Only the devices `only` accepts are tested: on a real machine other devices come and go.
fn check_round_trip(
    sys: &Path,
    dev: &Path,
    work: &Path,
    extra: &[&str],
    only: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let empty = work.join("none.rules");
    std::fs::write(&empty, "").unwrap();
    let out = bin().arg("list").arg("--sysfs").arg(sys).arg("--rules").arg(&empty).args(extra).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let all = work.join("all.rules");
    std::fs::write(&all, &text).unwrap();
    let check = run(&[OsStr::new("check"), all.as_os_str()]);
    assert_eq!(check.status.code(), Some(0), "list's output is not a valid rules file:\n{}", stdout(&check));
    let devices = listed(&text);
    for (name, line) in devices.iter().filter(|(n, _)| only(n)) {
        let rules = work.join("one.rules");
        std::fs::write(&rules, format!("{line}\n")).unwrap();
        let out = bin()
            .args(["test", name, "--no-qubesdb", "--sysfs"])
            .arg(sys)
            .arg("--dev")
            .arg(dev)
            .arg("--rules")
            .arg(&rules)
            .output()
            .unwrap();
        let report = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{name}: {line}\n{report}{}", stderr(&out));
        assert!(report.contains(&format!("first match: {}:1 -> ATTACH=\"QUBE\"", rules.display())), "{report}");
    }
    devices
}

#[test]
fn list_rule_lines_match_their_devices() {
    let case = fixture("usb-stick");
    let work = common::tempdir("list-fixture");
    let devices = check_round_trip(&case.join("sys"), &case.join("dev"), &work, &[], |_| true);
    let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["usb1", "1-2", "sda", "sda1"]);
    let _ = std::fs::remove_dir_all(&work);
}

/// Serials that need escaping: quotes, backslashes, glob characters, `|`, control and
/// non-UTF-8 bytes. Each printed line parses and matches its device; only a `|` makes it
/// inexact (a `?` in its place), and the line says so.
#[test]
fn list_escapes_hostile_serials() {
    let work = common::tempdir("list-hostile");
    let tree = work.join("case");
    let status = Command::new("cp").arg("-a").arg(fixture("usb-stick")).arg(&tree).status().unwrap();
    assert!(status.success());
    let serial = tree.join("sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/serial");
    for value in [
        &b"say \"hi\"\\n"[..],
        b"glob*?[x]",
        b"a|b",
        b"ends with \\",
        b"tab\there",
        b"\xff\xfe\x01bin",
        b"\\\"",
        b"  leading and trailing  ",
    ] {
        let mut content = value.to_vec();
        content.push(b'\n');
        std::fs::write(&serial, &content).unwrap();
        let devices = check_round_trip(&tree.join("sys"), &tree.join("dev"), &work, &[], |_| true);
        assert_eq!(devices.len(), 4, "{:?}", String::from_utf8_lossy(value));
        let inexact = value.contains(&b'|');
        let out = run(&[OsStr::new("list"), OsStr::new("--sysfs"), tree.join("sys").as_os_str()]);
        let says = stdout(&out)
            .contains("#   note           ATTRS{serial} holds a | (which a rule always reads as alternatives)");
        assert_eq!(says, inexact, "{:?}\n{}", String::from_utf8_lossy(value), stdout(&out));
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// `list` on this machine: a loop device made for the test is listed with a line that
/// `test` reports as matching it (and only it: its backing file is the test's own).
#[test]
fn list_rule_line_matches_a_real_loop_device() {
    if !common::can_run("list on a real loop device") {
        return;
    }
    let work = common::tempdir("list-loop");
    let file = common::backing_file(&work);
    let dev = common::Loop::create(760);
    dev.attach(&file);
    let devices = check_round_trip(Path::new("/sys"), Path::new("/dev"), &work, &["--no-qubesdb"], |n| n == dev.name());
    let (_, line) = devices.iter().find(|(n, _)| *n == dev.name()).expect("the loop device is listed");
    assert_eq!(
        *line,
        format!(
            "SUBSYSTEM==\"block\", ENV{{DEVTYPE}}==\"disk\", KERNEL==\"{}\", ATTR{{loop/backing_file}}==\"{}\", ATTACH=\"QUBE\"",
            dev.name(),
            file.display()
        )
    );
    drop(dev);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn test_action_remove_never_attaches_and_change_is_like_add() {
    let case = fixture("usb-stick");
    let (sys, dev, rules) = (case.join("sys"), case.join("dev"), case.join("rules"));
    let args = |action: &str| -> Vec<PathBuf> {
        ["test", "sda1", "--action", action, "--sysfs"]
            .iter()
            .map(PathBuf::from)
            .chain([sys.clone(), "--dev".into(), dev.clone(), "--rules".into(), rules.clone()])
            .collect()
    };
    let out = run(&args("remove"));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("  event: remove block partition (from sysfs)\n"), "{text}");
    assert!(text.contains("on remove the agent attaches nothing"), "{text}");
    assert!(!text.contains("would call:"), "{text}");
    for action in ["change", "add"] {
        let out = run(&args(action));
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{action}: {text}");
        assert!(text.contains(&format!("  event: {action} block partition (from sysfs)\n")), "{text}");
        // The usb-stick's sda1 and its Qubes device id (IDENTITY.md; `:` sent as `+`).
        let call = "custom.USBDeviceAttach+backup+__+sda1+__+0781+5581+4C530001230101115543+u080650+1.0+1";
        assert!(text.contains(&format!("would call: qrexec-client-vm dom0 {call}\n")), "{text}");
    }
}

#[test]
fn check_takes_files_and_directories_and_says_where_it_looked() {
    let work = common::tempdir("check-args");
    let dir = work.join("rules.d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("a.rules"),
        "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n",
    )
    .unwrap();
    // A name that is not UTF-8 is a name like any other.
    let odd = work.join(OsStr::from_bytes(b"odd-\xff.rules"));
    std::fs::write(&odd, "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTRS{serial}==\"2\", ATTACH=\"w\"\n").unwrap();
    let out = run(&[OsStr::new("-vv"), OsStr::new("check"), dir.as_os_str(), odd.as_os_str()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let want = format!(
        "rules looked for in:\n  {d}: directory, 1 *.rules file\n    {d}/a.rules: 1 rule\n  {o}: 1 rule\n\
         2 rule(s) loaded, 0 error(s), 0 warning(s)\n",
        d = dir.display(),
        o = odd.display()
    );
    assert_eq!(text, want);
    // --rules and arguments add up; a missing one is an error of the rules (3).
    let gone = work.join("gone.rules");
    let out = run(&[OsStr::new("check"), dir.as_os_str(), OsStr::new("--rules"), gone.as_os_str()]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("  {}: cannot be read (see below)\n", gone.display())), "{}", stdout(&out));
    // Nothing anywhere: it says so.
    let empty = work.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(&[OsStr::new("check"), empty.as_os_str()]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out),
        format!(
            "rules looked for in:\n  {}: directory, no *.rules files\nno rules found: the agent would attach nothing\n\
             0 rule(s) loaded, 0 error(s), 0 warning(s)\n",
            empty.display()
        )
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// Without paths, `check` names every default place, qubesdb included, whatever it found.
#[test]
fn check_names_the_default_places() {
    let out = run(&["check", "--no-qubesdb"]);
    let text = stdout(&out);
    for place in ["\n  /etc/autoattach/rules.d: ", "\n  /rw/config/autoattach: "] {
        assert!(text.contains(place), "{place:?} missing:\n{text}");
    }
    assert!(text.contains("\n  qubesdb:/vm-config/autoattach-rules: not read (--no-qubesdb)\n"), "{text}");
}

#[test]
fn help_is_per_command_and_options_are_checked_per_command() {
    let test = run(&["test", "--help"]);
    let list = run(&["list", "-h"]);
    assert_eq!((test.status.code(), list.status.code()), (Some(0), Some(0)));
    assert_ne!(stdout(&test), stdout(&list));
    assert!(stdout(&test).starts_with("usage: autoattach test [OPTIONS] DEVICE\n"), "{}", stdout(&test));
    assert!(stdout(&list).starts_with("usage: autoattach list [OPTIONS]\n"), "{}", stdout(&list));
    let out = run(&["list", "-o", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("list does not take --output (an option of record)"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}
