//! The matcher against a slow reference of udev's semantics (`autoattach_fuzz::reference`):
//! random rules, written as rule text and parsed by the real parser, and a small random sysfs
//! tree on disk with an event for its deepest device. Both must pick the same first rule.
//!
//! Names, values and patterns are drawn from small sets of pieces chosen to collide: glob
//! characters, `|`, trailing whitespace of every kind, NUL and newline inside attribute files,
//! and words that appear both in the tree and in the patterns.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use autoattach::rules::{Matcher, parse};
use autoattach::sysfs::Sysfs;
use autoattach::uevent::Uevent;
use autoattach_fuzz::reference::{self, Key, Test};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const KERNELS: &[&str] = &["pci0", "usb1", "2-1", "2-1:1.0", "sda", "sda1", "a*b", "x y", "sd[a]"];
const SUBSYSTEMS: &[&str] = &["block", "usb", "scsi", "pci", "a b", "bus"];
const DRIVERS: &[&str] = &["usb", "usb-storage", "sd", "x*"];
const ATTRS: &[&str] = &["serial", "size", "vendor", "sub/x", "idVendor"];
const ACTIONS: &[&str] = &["add", "remove", "change", "bind"];
const ENV_KEYS: &[&str] = &["DEVTYPE", "DRIVER", "ID_X", "A"];
/// Pieces of values: sysfs attribute contents and event variables.
const VALUE: &[&str] =
    &["a", "b", "sda", "2-1", "usb", "block", " ", "\t", "\n", "\x0b", "\x0c", "\r", "*", "[", "\\", "\0", "é", "|"];
/// Pieces of patterns.
const PATTERN: &[&str] = &[
    "a",
    "b",
    "sda",
    "2-1",
    "usb",
    "block",
    "bus",
    "*",
    "?",
    "[a-c]",
    "[!a]",
    "[",
    "]",
    "|",
    "\\",
    "\\*",
    " ",
    "\t",
    "\x0b",
    "\x0c",
    "[[:digit:]]",
    "sd[a-z]",
    "?*",
    "1",
    "-",
];
const KEYS: &[&str] =
    &["ACTION", "DEVPATH", "KERNEL", "SUBSYSTEM", "DRIVER", "ENV", "ATTR", "KERNELS", "SUBSYSTEMS", "DRIVERS", "ATTRS"];

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

fn pick<'a>(u: &mut Unstructured<'_>, from: &[&'a str]) -> Result<&'a str> {
    u.choose(from).copied()
}

fn pieces(u: &mut Unstructured<'_>, from: &[&str], max: usize) -> Result<String> {
    let n = u.int_in_range(0..=max)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push_str(pick(u, from)?);
    }
    Ok(s)
}

/// Writes a tree of up to four nested devices under `root`; returns the deepest devpath.
fn tree(u: &mut Unstructured<'_>, root: &Path) -> Result<String> {
    let depth = u.int_in_range(1..=4)?;
    let mut devpath = String::from("/devices");
    for _ in 0..depth {
        devpath.push('/');
        devpath.push_str(pick(u, KERNELS)?);
        let dir = root.join(&devpath[1..]);
        std::fs::create_dir_all(&dir).unwrap();
        if u.arbitrary()? {
            std::fs::write(dir.join("uevent"), "").unwrap();
        }
        if u.arbitrary()? {
            let _ = std::os::unix::fs::symlink(format!("../../bus/{}", pick(u, SUBSYSTEMS)?), dir.join("subsystem"));
        }
        if u.arbitrary()? {
            let _ = std::os::unix::fs::symlink(format!("../../drivers/{}", pick(u, DRIVERS)?), dir.join("driver"));
        }
        for _ in 0..u.int_in_range(0..=3)? {
            let path = dir.join(pick(u, ATTRS)?);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            // `sub/x` beside a file named `sub` cannot exist: skip it.
            let _ = std::fs::write(path, pieces(u, VALUE, 4)?);
        }
    }
    Ok(devpath)
}

fn datagram(u: &mut Unstructured<'_>, devpath: &str) -> Result<Vec<u8>> {
    let action = pick(u, ACTIONS)?;
    let subsystem = pick(u, SUBSYSTEMS)?;
    let mut d = format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0");
    for _ in 0..u.int_in_range(0..=3)? {
        d.push_str(&format!("{}={}\0", pick(u, ENV_KEYS)?, pieces(u, VALUE, 3)?));
    }
    Ok(d.into_bytes())
}

/// A rule as text for the real parser, and as tests for the reference.
fn rule(u: &mut Unstructured<'_>) -> Result<(String, Vec<Test>)> {
    let mut text = String::new();
    let mut tests = Vec::new();
    for _ in 0..u.int_in_range(0..=4)? {
        let name = pick(u, KEYS)?;
        let (written, key) = match name {
            "ENV" => {
                let k = pick(u, ENV_KEYS)?;
                (format!("ENV{{{k}}}"), Key::Env(k.into()))
            }
            "ATTR" | "ATTRS" => {
                let a = *u.choose(&[ATTRS, &["driver", "subsystem", "nope"]].concat())?;
                let key = if name == "ATTR" { Key::Attr(a.into()) } else { Key::Attrs(a.into()) };
                (format!("{name}{{{a}}}"), key)
            }
            "ACTION" => (name.into(), Key::Action),
            "DEVPATH" => (name.into(), Key::Devpath),
            "KERNEL" => (name.into(), Key::Kernel),
            "SUBSYSTEM" => (name.into(), Key::Subsystem),
            "DRIVER" => (name.into(), Key::Driver),
            "KERNELS" => (name.into(), Key::Kernels),
            "SUBSYSTEMS" => (name.into(), Key::Subsystems),
            _ => (name.into(), Key::Drivers),
        };
        let negate: bool = u.arbitrary()?;
        let pattern = pieces(u, PATTERN, 4)?;
        text.push_str(&format!("{written}{}\"{pattern}\", ", if negate { "!=" } else { "==" }));
        tests.push(Test { key, negate, pattern: pattern.into_bytes() });
    }
    text.push_str("ATTACH=\"work\"\n");
    Ok((text, tests))
}

fn case(u: &mut Unstructured<'_>, root: &Path) -> Result<()> {
    let devpath = tree(u, root)?;
    let datagram = datagram(u, &devpath)?;
    let Ok(event) = Uevent::parse(&datagram) else { return Ok(()) };
    let mut text = String::new();
    let mut rules = Vec::new();
    for _ in 0..u.int_in_range(1..=4)? {
        let (t, tests) = rule(u)?;
        text.push_str(&t);
        rules.push(tests);
    }
    let parsed = parse("fuzz.rules", &text);
    if !parsed.errors.is_empty() {
        // A pattern the parser refuses (a trailing `\` escaping the quote): not this target's concern.
        return Ok(());
    }
    assert_eq!(parsed.set.rules.len(), rules.len());
    let sysfs = Sysfs::new(root).unwrap();
    let got = Matcher::new(&parsed.set).first_match(&sysfs, &parsed.set, &event);
    let want = reference::first_match(root, &event, &rules);
    if got != want {
        let mut tree = String::new();
        describe(root, root, &mut tree);
        panic!(
            "matcher says {got:?}, reference says {want:?}\nrules:\n{text}event: {:?}\ntree:\n{tree}",
            String::from_utf8_lossy(&datagram)
        );
    }
    Ok(())
}

/// Lists the tree for a failure message: each file with its bytes, each link with its target.
fn describe(root: &Path, dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        match (std::fs::read_link(&path), std::fs::symlink_metadata(&path)) {
            (Ok(target), _) => out.push_str(&format!("  {shown} -> {}\n", target.display())),
            (_, Ok(m)) if m.is_dir() => describe(root, &path, out),
            _ => out.push_str(&format!(
                "  {shown} = {:?}\n",
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default())
            )),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let scratch = SCRATCH
        .get_or_init(|| autoattach_fuzz::scratch_dir().join(format!("autoattach-fuzz-match-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).unwrap();
    let _ = case(&mut Unstructured::new(data), scratch);
    let _ = std::fs::remove_dir_all(scratch);
});
