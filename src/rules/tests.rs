//! The parser and the matcher against udev's own expectations (systemd's test/test-udev.py,
//! src/udev/test-udev-rules.c, test/units/TEST-17-UDEV.verify.sh), ported as our own code.

use super::*;
use crate::sysfs::Sysfs;
use crate::testing::{STICK_DISK, STICK_PART, Tree, datagram};
use crate::uevent::Uevent;
use std::time::Duration;

fn errors(text: &str) -> Vec<String> {
    parse("rules", text).errors.iter().map(ToString::to_string).collect()
}

#[test]
fn every_mistake_is_reported_with_its_place() {
    let text = concat!(
        "# a comment\n",
        "KERNEL=\"sdb\", ATTACH=\"work\"\n",
        "ATRS{serial}==\"x\", ATTACH=\"work\"\n",
        "SUBSYSTEM==\"block\", RUN+=\"/bin/sh -c x\", ATTACH=\"work\"\n",
        "SUBSYSTEM==\"block\", ATTACH=\"my work\"\n",
        "SUBSYSTEM==\"block\", \\\n",
        "  ATTRS{serial}==\"unterminated\n",
        "SUBSYSTEM==\"block\"\n",
        "ATTACH==\"work\"\n",
        "attrs{serial}==\"x\", ATTACH=\"dom0\"\n",
        "ATTR{../../x}==\"1\", ATTACH=\"work\"\n",
        "SUBSYSTEM==\"block\", ATTACH=\"a\", ATTACH=\"b\"\n",
        "SUBSYSTEM==\"block\" ATTACH=\"ok\"\n",
    );
    let got = errors(text);
    let want = [
        "rules:2:7: KERNEL can only be matched with == or !=, not = (hint: to match, write KERNEL==\"sdb\")",
        "rules:3:1: unknown key ATRS (hint: did you mean ATTRS?)",
        "rules:4:21: udev key RUN is not supported (hint: autoattach runs nothing; its only action is ATTACH=\"qube\")",
        "rules:5:28: ATTACH=\"my work\": ' ' is not allowed (qrexec would rewrite it to '_') (hint: qube names are 1-31 of [A-Za-z0-9_.-], starting with a letter)",
        "rules:7:18: value has no closing quote",
        "rules:8:1: rule has no action (hint: end it with ATTACH=\"qube\")",
        "rules:9:7: ATTACH takes =, not == (hint: ATTACH is an action: write ATTACH=\"work\")",
        "rules:10:1: unknown key attrs (hint: keys are upper case: ATTRS)",
        "rules:10:28: ATTACH=\"dom0\": dom0 is never a target",
        "rules:11:1: ATTR{../../x}: must be a relative path without '.' or '..'",
        "rules:12:33: second ATTACH (the first is at 12:21) (hint: a rule attaches to one qube)",
    ];
    assert_eq!(got, want);
    let parsed = parse("rules", text);
    assert_eq!(parsed.set.rules.len(), 1, "only the last line is a valid rule");
    assert_eq!(parsed.set.rules[0].line, 13);
}

#[test]
fn attribute_assignment_is_refused_with_a_hint() {
    let got = errors("ATTRS{serial}=\"ABC\", ATTACH=\"work\"\n");
    assert_eq!(
        got,
        [
            "rules:1:14: ATTRS can only be matched with == or !=, not = (hint: ATTRS{serial}=\"...\" would set a value in udev; autoattach only matches: write ATTRS{serial}==\"ABC\")"
        ]
    );
}

#[test]
fn a_directory_contributes_its_rules_files_only() {
    let dir = crate::testing::TempDir::new("rulesdir");
    std::fs::write(dir.path().join("20-b.rules"), "SUBSYSTEM==\"block\", ATTRS{serial}==\"2\", ATTACH=\"b\"\n")
        .unwrap();
    std::fs::write(dir.path().join("10-a.rules"), "SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=\"a\"\n")
        .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not rules").unwrap();
    std::fs::create_dir(dir.path().join("old.rules")).unwrap();
    std::fs::write(
        dir.path().join("old.rules/x.rules"),
        "SUBSYSTEM==\"block\", ATTRS{serial}==\"9\", ATTACH=\"old\"\n",
    )
    .unwrap();
    let mut parsed = Parsed::default();
    parsed.add_path(dir.path(), true);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let order: Vec<&str> = parsed.set.rules.iter().map(|r| &*r.attach).collect();
    assert_eq!(order, ["a", "b"]);
    std::os::unix::fs::symlink("/nonexistent", dir.path().join("30-c.rules")).unwrap();
    let mut parsed = Parsed::default();
    parsed.add_path(dir.path(), true);
    assert_eq!(parsed.errors.len(), 1, "a dangling link is an error: {:?}", parsed.errors);
}

#[test]
fn options_parse() {
    let p = parse(
        "r",
        "SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=\"w\", TIMEOUT=\"90s\", DEBOUNCE=\"2s\", RATELIMIT=\"3/1m\"\n",
    );
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    let r = &p.set.rules[0];
    assert_eq!(r.timeout, Some(Duration::from_secs(90)));
    assert_eq!(r.debounce, Some(Duration::from_secs(2)));
    assert_eq!(r.rate_limit, Some((3, Duration::from_secs(60))));
    assert_eq!(errors("SUBSYSTEM==\"block\", ATTACH=\"w\", TIMEOUT=\"soon\"\n").len(), 1);
    assert_eq!(errors("SUBSYSTEM==\"block\", ATTACH=\"w\", RATELIMIT=\"0/1m\"\n").len(), 1);
}

#[test]
fn lint_warns_about_risky_rules() {
    let warnings =
        |text: &str| -> Vec<String> { parse("r", text).warnings.iter().map(|w| w.message.clone()).collect() };
    let both = warnings("SUBSYSTEM==\"block\", KERNEL==\"sd*\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n");
    assert_eq!(
        both,
        [
            "this rule can match both a disk and its partitions: the disk would be attached and then its partitions, or the other way round"
        ]
    );
    assert!(warnings("SUBSYSTEM==\"block\", KERNEL==\"sd[a-z]\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n").is_empty());
    assert!(
        warnings("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n").is_empty()
    );
    assert_eq!(
        warnings("SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTACH=\"w\"\n"),
        ["this rule matches any device of its kind, not one device"]
    );
    assert_eq!(
        warnings("SUBSYSTEM==\"net\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n"),
        ["this rule can never attach anything"]
    );
    assert_eq!(
        warnings("SUBSYSTEM==\"usb\", ENV{DEVTYPE}==\"usb_interface\", ATTRS{serial}==\"1\", ATTACH=\"w\"\n"),
        ["this rule can never attach anything"]
    );
}

/// Matches `rule_text` against an event on the stick tree.
fn matches(tree: &Tree, rule_text: &str, datagram: &[u8]) -> bool {
    let parsed = parse("r", &format!("{rule_text}, ATTACH=\"work\"\n"));
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let sysfs = Sysfs::new(tree.root()).unwrap();
    let event = Uevent::parse(datagram).unwrap();
    Matcher::new(&parsed.set).first_match(&sysfs, &parsed.set, &event).is_some()
}

fn disk_add() -> Vec<u8> {
    datagram("add", STICK_DISK, "block", &["MAJOR=8", "MINOR=16", "DEVNAME=sdb", "DEVTYPE=disk"])
}

#[test]
fn udev_matching_semantics() {
    let t = Tree::stick(b"ABC123");
    let disk = disk_add();
    let part = datagram("add", STICK_PART, "block", &["DEVNAME=sdb1", "DEVTYPE=partition"]);
    let cases: &[(&str, &[u8], bool)] = &[
        ("SUBSYSTEM==\"block\"", &disk, true),
        ("SUBSYSTEM!=\"block\"", &disk, false),
        ("KERNEL==\"sd[a-z]\"", &disk, true),
        ("KERNEL==\"sd[a-z]\"", &part, false),
        ("KERNEL==\"sd*\"", &part, true),
        ("KERNEL==\"sda|sdb\"", &disk, true),
        ("KERNEL==\"sda|sdc\"", &disk, false),
        ("KERNEL!=\"sda|sdc\"", &disk, true),
        ("DEVPATH==\"*/usb2/2-1/*\"", &disk, true),
        ("ACTION==\"add\"", &disk, true),
        ("ACTION==\"remove\"", &disk, false),
        ("ENV{DEVTYPE}==\"disk\"", &disk, true),
        ("ENV{NOPE}==\"\"", &disk, true),
        ("ENV{NOPE}!=\"x\"", &disk, true),
        ("ENV{NOPE}==\"?*\"", &disk, false),
        ("ENV{DEVTYPE}==\"?*\"", &disk, true),
        ("ENV{NOPE}==\"|x\"", &disk, true),
        ("ATTR{size}==\"2048\"", &disk, true),
        ("ATTR{size}==\"2*\"", &disk, true),
        ("ATTR{nope}!=\"x\"", &disk, false),
        ("ATTR{nope}==\"\"", &disk, false),
        ("ATTRS{idVendor}==\"46f4\"", &disk, true),
        ("ATTRS{idVendor}==\"46f4\"", &part, true),
        ("ATTRS{serial}==\"ABC123\"", &part, true),
        ("ATTRS{serial}==\"ABC12\"", &part, false),
        ("ATTRS{vendor}==\"QEMU\"", &disk, true),
        ("ATTRS{vendor}==\"QEMU \"", &disk, false),
        ("ATTRS{vendor}==\"QEMU    \"", &disk, true),
        ("ATTRS{model}==\"QEMU HARDDISK\"", &disk, true),
        ("KERNELS==\"2-1\"", &disk, true),
        ("KERNELS==\"sdb\"", &disk, true),
        ("SUBSYSTEMS==\"usb\"", &disk, true),
        ("SUBSYSTEMS==\"pci\"", &disk, true),
        ("DRIVERS==\"usb-storage\"", &disk, true),
        ("DRIVERS==\"sd\"", &disk, true),
        ("DRIVERS==\"nvme\"", &disk, false),
        ("DRIVER==\"sd\"", &disk, false),
        // All parent keys on ONE device: the idVendor is on 2-1, the model on 6:0:0:0.
        ("ATTRS{idVendor}==\"46f4\", ATTRS{model}==\"QEMU HARDDISK\"", &disk, false),
        ("ATTRS{idVendor}==\"46f4\", ATTRS{serial}==\"ABC123\"", &disk, true),
        ("KERNELS==\"2-1\", ATTRS{serial}==\"ABC123\"", &disk, true),
        ("KERNELS==\"2-1:1.0\", ATTRS{serial}==\"ABC123\"", &disk, false),
        ("SUBSYSTEMS==\"scsi\", DRIVERS==\"sd\", ATTRS{vendor}==\"QEMU\"", &disk, true),
        ("SUBSYSTEMS==\"usb\", ATTRS{vendor}==\"QEMU\"", &disk, false),
        // != on a parent key holds on the first device where every parent key holds.
        ("ATTRS{serial}!=\"ABC123\", KERNELS==\"usb2\"", &disk, true),
        ("SUBSYSTEMS==\"subsystem\"", &disk, false),
    ];
    for (rule, event, want) in cases {
        assert_eq!(matches(&t, rule, event), *want, "{rule}");
    }
}

#[test]
fn first_match_wins_and_attributes_are_read_once() {
    let t = Tree::stick(b"ABC123");
    let mut text = String::new();
    for i in 0..50 {
        text.push_str(&format!(
            "SUBSYSTEM==\"block\", ATTRS{{idVendor}}==\"46f4\", ATTRS{{serial}}==\"S{i}\", ATTACH=\"q{i}\"\n"
        ));
    }
    text.push_str("SUBSYSTEM==\"block\", ATTRS{idVendor}==\"46f4\", ATTRS{serial}==\"ABC123\", ATTACH=\"mine\"\n");
    text.push_str("SUBSYSTEM==\"block\", ATTRS{serial}==\"ABC123\", ATTACH=\"later\"\n");
    let parsed = parse("r", &text);
    let sysfs = Sysfs::new(t.root()).unwrap();
    let disk = disk_add();
    let event = Uevent::parse(&disk).unwrap();
    let mut m = Matcher::new(&parsed.set);
    let i = m.first_match(&sysfs, &parsed.set, &event).unwrap();
    assert_eq!(&*parsed.set.rules[i].attach, "mine");
    // idVendor and serial on each of the 9 levels walked, read once however many rules ask.
    let reads = sysfs.reads();
    assert!(reads <= 2 * 9, "{reads} reads");
    m.first_match(&sysfs, &parsed.set, &event).unwrap();
    assert_eq!(sysfs.reads(), 2 * reads, "a new event reads again");
}

/// systemd's src/udev/test-udev-rules.c (test_udev_rule_parse_value): each input, the value
/// udev reads from it, its case-insensitivity, or a refusal.
#[test]
fn values_read_as_udev_rule_parse_value_reads_them() {
    let ok: &[(&str, &[u8], bool)] = &[
        ("\"valid operand\"", b"valid operand", false),
        ("\"va'l\\'id\\\"op\\\"erand\"", b"va'l\\'id\"op\"erand", false),
        ("\"\\\\a\\b\\x\\y\"", b"\\\\a\\b\\x\\y", false),
        ("e\"\"", b"", false),
        ("e\"1234\"", b"1234", false),
        ("e\"\\\"\"", b"\"", false),
        ("e\"\\\\\"", b"\\", false),
        ("e\"\\\\\\\"\"", b"\\\"", false),
        ("e\"\\\\\\\\\"", b"\\\\", false),
        ("e\"operand with newline\\n\"", b"operand with newline\n", false),
        ("e\"single\\rcharacter\\t\\aescape\\bsequence\"", b"single\rcharacter\t\x07escape\x08sequence", false),
        (
            "e\"s\\u1d1c\\u1d04\\u029c \\u1d1c\\u0274\\u026a\\u1d04\\u1d0f\\u1d05\\u1d07 \\U0001d568\\U0001d560\\U0001d568\"",
            "s\u{1d1c}\u{1d04}\u{29c} \u{1d1c}\u{274}\u{26a}\u{1d04}\u{1d0f}\u{1d05}\u{1d07} \u{1d568}\u{1d560}\u{1d568}".as_bytes(),
            false,
        ),
        ("i\"ABCD1234\"", b"ABCD1234", true),
        ("e\"ABCD1234\"", b"ABCD1234", false),
        ("ei\"\\\\ABCD1234\"", b"\\ABCD1234", true),
        ("ie\"\\\\ABCD1234\"", b"\\ABCD1234", true),
        // Ours: \x and octal escapes are single raw bytes; \s is a space.
        ("e\"\\x41\\101\\s\\xff\"", b"AA \xff", false),
    ];
    for &(input, want, fold) in ok {
        let (value, casefold, end) = parser::value_for_test(input).unwrap_or_else(|| panic!("{input} refused"));
        assert_eq!((&value[..], casefold, end), (want, fold, input.len()), "{input}");
    }
    let refused = [
        "no quotes",
        "e\"\\",
        "e\"\\\"",
        "e\"\\\\\\\"",
        "e\"reject\\invalid escape sequence",
        "e\"reject\\invalid escape sequence\"",
        "i",
        "ee\"\"",
        "iei\"\"",
        "a\"\"",
        "e\"\\x00\"",
        "e\"\\000\"",
        "e\"\\u0000\"",
        "e\"\\U0000d800\"",
        "e\"\\400\"",
    ];
    for input in refused {
        assert!(parser::value_for_test(input).is_none(), "{input} accepted");
    }
}

/// Continuations and comments as udev_rules_parse_file joins them, with test-udev.py's cases
/// ("backslashed multi lines", "stupid backslashed multi lines", "continuations",
/// "continuations with empty line", "continuations with space only line") and
/// TEST-17-UDEV.verify.sh's errors.
#[test]
fn lines_are_joined_as_udev_joins_them() {
    let joined = |text: &str| parser::joined_for_test(text);
    let ok = |text: &str| {
        let (lines, errors) = joined(text);
        assert!(errors.is_empty(), "{text:?}: {errors:?}");
        lines.into_iter().map(|(t, _)| t).collect::<Vec<_>>()
    };
    assert_eq!(ok("KERNEL==\"ttyACM0\", \\\nSYMLINK+=\"modem\"\n\n"), ["KERNEL==\"ttyACM0\", SYMLINK+=\"modem\""]);
    // "\" alone, then an empty line: joined to nothing, skipped (autoattach said "rule has no
    // action" before); a comment line ending in "\" continues nothing.
    let stupid = "\n#\n\\\n\n\\\n\n#\\\n\nKERNEL==\"ttyACM0\", \\\n        SYMLINK+=\"modem\"\n\n";
    assert_eq!(ok(stupid), ["KERNEL==\"ttyACM0\", SYMLINK+=\"modem\""]);
    let comments = "KERNEL==\"sda\",\\\n# comment in continuation\nTAG+=\"hoge1\",\\\n  # space before comment\nTAG+=\"hoge2\",\\\n# spaces before and after token are dropped\n  TAG+=\"hoge3\",   \\\n\\\n \\\nTAG+=\"hoge4\"\n";
    assert_eq!(ok(comments), ["KERNEL==\"sda\",TAG+=\"hoge1\",TAG+=\"hoge2\",TAG+=\"hoge3\",   TAG+=\"hoge4\""]);
    let empty_ends = "KERNEL==\"sda\", TAG+=\"foo\" \\\n\nKERNEL==\"sdb\", TAG+=\"hoge\"\nKERNEL==\"sda\", TAG+=\"aaa\" \\\nKERNEL==\"sdb\", TAG+=\"bbb\"\n";
    assert_eq!(
        ok(empty_ends),
        [
            "KERNEL==\"sda\", TAG+=\"foo\" ",
            "KERNEL==\"sdb\", TAG+=\"hoge\"",
            "KERNEL==\"sda\", TAG+=\"aaa\" KERNEL==\"sdb\", TAG+=\"bbb\""
        ]
    );
    assert_eq!(
        ok("KERNEL==\"sda\", TAG+=\"foo\" \\\n   \t\nKERNEL==\"sdb\"\n"),
        ["KERNEL==\"sda\", TAG+=\"foo\" ", "KERNEL==\"sdb\""]
    );
    // Lines end at \r\n, \r and NUL too (systemd's read_line); a doubled "\" at the end is
    // taken off twice, the second time once the next (empty) line is joined.
    assert_eq!(ok("A==\"1\"\r\nB==\"2\"\rC==\"3\"\0D==\"4\""), ["A==\"1\"", "B==\"2\"", "C==\"3\"", "D==\"4\""]);
    assert_eq!(ok("A==\"1\" \\\\\n\nB==\"2\"\n"), ["A==\"1\" B==\"2\""]);
    // The rule starts on its first line.
    assert_eq!(joined("\n\n  A==\"1\", \\\nB==\"2\"\n").0, [("A==\"1\", B==\"2\"".to_owned(), 3)]);
    let (lines, errors) = joined("A==\"1\" \\\n");
    assert!(lines.is_empty());
    assert_eq!(errors, ["the file ends in a line continuation ('\\'): udev ignores that line"]);
    let long = format!("{}\n", " ".repeat(LINE - 1));
    assert_eq!(joined(&long).1, Vec::<String>::new());
    let (lines, errors) = joined(&format!("A==\"1\"\n{}\n", " ".repeat(LINE)));
    assert!(lines.is_empty() && errors.len() == 1, "{errors:?}");
    let joined_long = format!("A==\"{}\" \\\nB==\"{}\"\nC==\"1\"\n", "x".repeat(8200), "y".repeat(8200));
    let (lines, errors) = joined(&joined_long);
    assert_eq!(lines, [("C==\"1\"".to_owned(), 3)]);
    assert_eq!(errors.len(), 1, "{errors:?}");
}

const LINE: usize = parser::LINE_SIZE;

/// A whole file with the quirks loads the rules udev would load.
#[test]
fn quirky_files_load_like_udev() {
    let text = "\\\n\n# a comment \\\nSUBSYSTEM==\"block\", \\\n# inside\n  ATTRS{serial}==\"1\", ATTACH=\"work\"\n";
    let parsed = parse("r", text);
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.set.rules.len(), 1);
    assert_eq!(parsed.set.rules[0].line, 4);
}

/// A device tree with a `!` name, a whitespace attribute and long values, on the stick.
fn quirks_tree() -> Tree {
    let t = Tree::stick(b"ABC123");
    let scsi = "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0";
    let dir = t.root().join(&scsi[1..]);
    std::fs::write(dir.join("whitespace_test"), "WHITE  SPACE   \n").unwrap();
    std::fs::write(dir.join("test_empty_file"), "").unwrap();
    std::fs::write(dir.join("long"), format!("{}   \n", "x".repeat(600))).unwrap();
    t.device(
        "/devices/virtual/block/fake!blockdev0",
        "block",
        "MAJOR=7\nMINOR=9\nDEVNAME=fake/blockdev0\nDEVTYPE=disk\n",
        None,
        &[],
    );
    t
}

fn fake_add() -> Vec<u8> {
    datagram(
        "add",
        "/devices/virtual/block/fake!blockdev0",
        "block",
        &["MAJOR=7", "MINOR=9", "DEVNAME=fake/blockdev0", "DEVTYPE=disk"],
    )
}

/// udev's values and matching: `!` as `/` (test-udev.py "name test with ! in the name"),
/// DEVNAME under /dev, i"..." and e"...", whitespace (test-udev.py "ignore ATTRS attribute
/// whitespace", "do not ignore ATTRS attribute whitespace", "ATTR (empty file)", "ATTR
/// (non-existent file)", "test multi matches").
#[test]
fn udev_quirks_match_as_in_udev() {
    let t = quirks_tree();
    let disk = disk_add();
    let fake = fake_add();
    let cases: &[(&str, &[u8], bool)] = &[
        ("SUBSYSTEM==\"block\", KERNEL==\"fake/blockdev0\"", &fake, true),
        ("KERNEL==\"fake!blockdev0\"", &fake, false),
        ("KERNELS==\"fake/blockdev0\"", &fake, true),
        ("KERNEL==\"fake/*\"", &fake, true),
        ("DEVPATH==\"*/fake!blockdev0\"", &fake, true),
        ("ENV{DEVNAME}==\"/dev/sdb\"", &disk, true),
        ("ENV{DEVNAME}==\"sdb\"", &disk, false),
        ("ENV{DEVNAME}==\"/dev/fake/blockdev0\"", &fake, true),
        ("KERNEL==i\"SDB\"", &disk, true),
        ("KERNEL==\"SDB\"", &disk, false),
        ("KERNEL==i\"SD[A-C]\"", &disk, true),
        ("SUBSYSTEMS==i\"SCSI\", ATTRS{vendor}==i\"q?mu\"", &disk, true),
        ("ATTRS{vendor}==i\"qemu\"", &disk, true),
        ("ATTRS{vendor}==\"qemu\"", &disk, false),
        ("SUBSYSTEM==i\"BLOCK\"", &disk, true),
        ("SUBSYSTEM!=i\"BLOCK\"", &disk, false),
        ("ATTRS{serial}==e\"ABC\\x31\\0623\"", &disk, true),
        ("ATTRS{serial}==ie\"abc\\x31\\0623\"", &disk, true),
        ("ATTRS{whitespace_test}==\"WHITE  SPACE\"", &disk, true),
        ("ATTRS{whitespace_test}==\"WHITE  SPACE \"", &disk, false),
        ("ATTRS{whitespace_test}==\"WHITE  SPACE   \"", &disk, true),
        // The first alternative decides whether the value is trimmed.
        ("ATTRS{whitespace_test}==\"WHITE  SPACE|x \"", &disk, true),
        ("ATTRS{whitespace_test}==\"x |WHITE  SPACE\"", &disk, false),
        ("ATTRS{whitespace_test}==\"|WHITE  SPACE\"", &disk, true),
        // A trimmed value is cut to 511 bytes first (UDEV_NAME_SIZE).
        ("ATTRS{long}==\"xxx*\"", &disk, true),
        ("ATTRS{long}==\"*xxx\"", &disk, true),
        ("ATTRS{long}==\"?*\"", &disk, true),
        ("KERNEL==\"sdb\", ATTR{test_empty_file}==\"?*\"", &disk, false),
        ("SUBSYSTEMS==\"scsi\", ATTRS{test_empty_file}==\"\"", &disk, true),
        ("SUBSYSTEMS==\"scsi\", ATTRS{test_empty_file}!=\"?*\"", &disk, true),
        ("ATTR{nofile}==\"\"", &disk, false),
        ("ATTR{nofile}!=\"?*\"", &disk, false),
        ("KERNEL==\"dontknow*|*nothing\"", &disk, false),
        ("KERNEL==\"dontknow*|sd?|nothing*\"", &disk, true),
        ("KERNEL==\"dontknow|sdb|nothing\"", &disk, true),
        ("ENV{NOPE}==\"foo||bar\"", &disk, true),
        ("ENV{NOPE}==\"foo|\"", &disk, true),
        ("ENV{NOPE}==\"aaa|bbb\"", &disk, false),
        // "subsystem"/"bus"/"class" are special for SUBSYSTEM only.
        ("SUBSYSTEMS==\"subsystem\"", &disk, false),
    ];
    for (rule, event, want) in cases {
        assert_eq!(matches(&t, rule, event), *want, "{rule}");
    }
    let long = std::fs::read(t.root().join(&STICK_DISK[1..]).join("../../long")).unwrap();
    assert_eq!(long.len(), 604);
    // 511 x's survive the cut: a pattern of 512 can never match, one of 511 does.
    let pattern = |n: usize| format!("ATTRS{{long}}==\"{}\"", "x".repeat(n));
    assert!(matches(&t, &pattern(511), &disk));
    assert!(!matches(&t, &pattern(512), &disk));
    assert!(matches(&t, &format!("ATTRS{{long}}==\"{}   \"", "x".repeat(600)), &disk), "not trimmed, not cut");
}

/// The i prefix only with == and != (udev: "Invalid prefix 'i' ..."); a missing comma is a
/// warning, not an error (TEST-17-UDEV.verify.sh: "style: a comma between tokens is expected").
#[test]
fn prefixes_and_commas_are_checked_as_udev_checks_them() {
    assert_eq!(
        errors("SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=i\"work\"\n"),
        ["rules:1:48: the i\"...\" prefix is for == and != only, not ATTACH= (hint: udev refuses it too)"]
    );
    for text in [
        "SUBSYSTEM==\"block\" ATTRS{serial}==\"1\", ATTACH=\"w\"\n",
        "SUBSYSTEM==\"block\"ATTRS{serial}==\"1\", ATTACH=\"w\"\n",
    ] {
        let parsed = parse("r", text);
        assert!(parsed.errors.is_empty(), "{text}: {:?}", parsed.errors);
        assert_eq!(parsed.set.rules.len(), 1);
        let warnings: Vec<String> = parsed.warnings.iter().map(ToString::to_string).collect();
        let col = text.find("ATTRS").unwrap() + 1;
        assert!(warnings[0].starts_with(&format!("r:1:{col}: a comma between keys is expected")), "{warnings:?}");
    }
    let commas = parse("r", "SUBSYSTEM==\"block\",ATTRS{serial}==\"1\" , ATTACH=\"w\"\n").warnings;
    assert!(!commas.iter().any(|w| w.message.contains("comma")), "{commas:?}");
    assert_eq!(errors("SUBSYSTEM==\"block\", ATTRS{serial}==e\"\\q\", ATTACH=\"w\"\n").len(), 1);
    let parsed = parse("r", "SUBSYSTEM==\"block\", ATTRS{serial}==e\"\\xff\", ATTACH=\"w\"\n");
    assert!(parsed.errors.is_empty(), "a value may be any bytes: {:?}", parsed.errors);
    let shown = parsed.set.rules[0].parent_tests[0].to_string();
    assert_eq!(shown, "ATTRS{serial}==\"\\xff\"");
}

/// `check`'s never-attaching forms, each with its hint.
#[test]
fn lint_flags_rules_that_can_never_attach() {
    let warnings = |text: &str| -> Vec<String> {
        let parsed = parse("r", &format!("{text}, ATTACH=\"w\"\n"));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        parsed.warnings.iter().map(ToString::to_string).collect()
    };
    let base = "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"partition\", ATTRS{serial}==\"1\"";
    let one = |extra: &str| {
        let got = warnings(&format!("{base}, {extra}"));
        assert_eq!(got.len(), 1, "{extra}: {got:?}");
        got.into_iter().next().unwrap()
    };
    let w = one("ENV{ID_SERIAL_SHORT}==\"4C53\"");
    assert!(w.contains("ENV{ID_SERIAL_SHORT}==\"4C53\": ID_SERIAL_SHORT is set by udev, never in a kernel uevent, so this test never holds: the rule can never attach"), "{w}");
    assert!(w.contains("(hint: match ATTRS{serial} instead"), "{w}");
    assert!(one("ENV{ID_VENDOR}!=\"x\"").contains("so this test always holds"));
    assert!(one("ENV{ID_MODEL_ID}==\"5581\"").contains("match ATTRS{idProduct} instead"));
    assert!(one("ENV{DEVLINKS}==\"*by-id*\"").contains("never holds"));
    let w = one("ACTION==\"remove\"");
    assert!(w.contains("devices are attached on add, change and bind events only"), "{w}");
    assert!(warnings(&format!("{base}, ACTION==\"add|remove\"")).is_empty());
    assert!(warnings(&format!("{base}, ACTION==\"bind\"")).is_empty());
    let w = one("ATTRS{idvendor}==\"0781\"");
    assert!(w.contains("sysfs names are case-sensitive") && w.contains("(hint: write ATTRS{idVendor})"), "{w}");
    assert!(one("ATTR{SIZE}==\"0\"").contains("write ATTR{size}"));
    let w = one("ENV{DEVNAME}==\"sdb1\"");
    assert!(w.contains("udev's DEVNAME is a path (/dev/sdb1)"), "{w}");
    assert!(warnings(&format!("{base}, ENV{{DEVNAME}}==\"/dev/sdb1\"")).is_empty());
    assert!(one("ENV{MY-KEY}==\"1\"").contains("never in a kernel uevent"));
}

/// Where rules were looked for, for `check` to say.
#[test]
fn sources_say_where_rules_were_looked_for() {
    let dir = crate::testing::TempDir::new("sources");
    std::fs::write(dir.path().join("a.rules"), "SUBSYSTEM==\"block\", ATTRS{serial}==\"1\", ATTACH=\"a\"\n").unwrap();
    let mut parsed = Parsed::default();
    parsed.add_path(dir.path(), false);
    parsed.add_path(&dir.path().join("nope"), false);
    parsed.add("qubesdb:/vm-config/autoattach-rules", "");
    let shown = |s: &Source| (s.origin.rsplit('/').next().unwrap().to_owned(), s.found);
    let got: Vec<_> = parsed.sources.iter().map(shown).collect();
    let dir_name = dir.path().file_name().unwrap().to_str().unwrap().to_owned();
    assert_eq!(
        got,
        [
            (dir_name, Found::Directory(1)),
            ("a.rules".into(), Found::Rules(1)),
            ("nope".into(), Found::Missing),
            ("autoattach-rules".into(), Found::Rules(0)),
        ]
    );
}

/// As root: a rules file the service's user cannot read is found, one it can is not; not as
/// root: the check says it cannot run.
#[test]
fn unreadable_by_the_service_user_is_found() {
    let dir = crate::testing::TempDir::new("unreadable");
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(dir.path()).unwrap().permissions(), 0o755);
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (open, closed) = (dir.path().join("10-open.rules"), dir.path().join("20-closed.rules"));
    std::fs::write(&open, "").unwrap();
    std::fs::write(&closed, "").unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    if !nix::unistd::geteuid().is_root() {
        assert!(matches!(unreadable_by(&[dir.path().to_owned()], "nobody"), Err(AccessCheckError::NotRoot)));
        assert!(std::env::var_os("AUTOATTACH_FULL").is_none(), "AUTOATTACH_FULL=1 runs this as root");
        return;
    }
    let found = unreadable_by(&[dir.path().to_owned()], "nobody").unwrap();
    let names: Vec<String> = found.iter().map(|w| w.origin.rsplit('/').next().unwrap().to_owned()).collect();
    assert_eq!(names, ["20-closed.rules"], "{found:?}");
    assert!(found[0].message.contains("the service's user \"nobody\" cannot read this"), "{found:?}");
    assert!(matches!(unreadable_by(&[open], "no-such-user-here"), Err(AccessCheckError::NoUser(_))));
    // The calling thread kept its own identity.
    assert!(nix::unistd::geteuid().is_root() && std::fs::read(&closed).is_ok());
}
