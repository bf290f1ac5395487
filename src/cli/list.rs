//! `autoattach list`: every present device that could be attached, its identity labelled,
//! the rule that matches it, and a rule line for it, in the way of `usbguard
//! generate-policy` and `udevadm info -a`:
//!
//! ```text
//! # sdb1
//! #   devpath        /devices/pci0000:00/.../block/sdb/sdb1
//! #   kind           block partition 1, 30031872 sectors (14.3 GiB)
//! #   usb device     2-1 0781:5581, manufacturer "SanDisk", product "Cruzer Blade"
//! #   serial         "4C530001230101115543"
//! #   interfaces     :080650:
//! #   identity       id "0781:5581:4C530001230101115543:u080650:1.0:1" (R4.3 device id, ...)
//! #   rule           /etc/autoattach/rules.d/backup.rules:3 -> ATTACH="backup"
//! SUBSYSTEM=="block", ENV{DEVTYPE}=="partition", ENV{PARTN}=="1", ATTRS{idVendor}=="0781", ...
//! ```
//!
//! The output is a valid rules file (the descriptions are comments). A rule line is printed
//! only if it parses and matches the device it was made for: each is checked here, through
//! the same parser and matcher as the agent's. Values are spelt as the rule language reads
//! them: a plain `"..."` where that can hold the value, else `e"..."` with C escapes (and a
//! glob's `\` before `*`, `?`, `[`); a `|` always separates alternatives, so it becomes
//! `?`, and the line says so.

use std::fmt::Write as _;

use super::{Opts, print, qubesdb, sources::Sources, sysfs};
use crate::exit::{self, Failure};
use crate::identity::{Identity, Verdict};
use crate::log::Escaped;
use crate::readiness::Publication;
use crate::rules::{self, Matcher, RuleSet};
use crate::sysfs::{MAX_ATTR, Sysfs};
use crate::uevent::Uevent;
use crate::{engine, runloop};

/// The qube name rule lines carry: replace it with yours.
pub const PLACEHOLDER: &str = "QUBE";

pub fn list(opts: &Opts) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let rules = runloop::usable_rules(Sources::of(opts).load())?;
    let db = qubesdb(opts);
    let devices = present(&sysfs);
    let mut matcher = Matcher::new(&rules);
    let mut out = String::new();
    for (devpath, datagram) in &devices {
        let Ok(event) = Uevent::parse(datagram) else { continue };
        let rule = match matcher.first_match(&sysfs, &rules, &event) {
            Some(i) => format!("{} -> ATTACH=\"{}\"", rules.rules[i].location(), rules.rules[i].attach),
            None => "no rule matches".into(),
        };
        describe(&mut out, &sysfs, devpath, &event);
        label(&mut out, "identity", &identity(&sysfs, devpath, db.as_ref()));
        label(&mut out, "rule", &rule);
        match rule_line(&sysfs, &event) {
            Ok(line) => {
                let others = also_matches(&sysfs, &line.text, devpath, &devices);
                if let Some(note) = &line.note {
                    let _ = writeln!(out, "#   note           {note}");
                }
                if !others.is_empty() {
                    let _ = writeln!(out, "#   note           this line also matches {}", others.join(", "));
                }
                let _ = writeln!(out, "{}", line.text);
            }
            Err(why) => {
                let _ = writeln!(out, "#   no rule line: {why}");
            }
        }
        out.push('\n');
    }
    if devices.is_empty() {
        let _ = writeln!(out, "# no block or USB device under {}", sysfs.root().display());
    }
    print(&out)?;
    Ok(exit::SUCCESS)
}

/// Every present device that could be attached, with its coldplug `add` datagram.
fn present(sysfs: &Sysfs) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    for devpath in sysfs.scan() {
        let Some(datagram) = engine::synthetic_add(sysfs, &devpath) else { continue };
        if Uevent::parse(&datagram).ok().and_then(|e| engine::attachable(&e)).is_some() {
            found.push((devpath, datagram));
        }
    }
    found
}

/// How a device is named to dom0: a block device by its node name (`sdb1`), a USB device by
/// its bus id (`2-1.4`).
fn shown_name<'a>(event: &Uevent<'a>) -> &'a str {
    match event.subsystem {
        "block" => event.get("DEVNAME").unwrap_or_else(|| event.kernel()),
        _ => event.kernel(),
    }
}

fn label(out: &mut String, name: &str, value: &str) {
    let _ = writeln!(out, "#   {name:<14} {value}");
}

/// An attribute as the matcher sees it (trailing newlines removed), if readable.
fn attr(sysfs: &Sysfs, devpath: &str, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; MAX_ATTR];
    sysfs.attr(devpath, name, &mut buf).ok().map(<[u8]>::to_vec)
}

/// The comment lines: the device's identity, labelled, every device string escaped.
fn describe(out: &mut String, sysfs: &Sysfs, devpath: &str, event: &Uevent<'_>) {
    let _ = writeln!(out, "# {}", Escaped(shown_name(event).as_bytes()));
    label(out, "devpath", &Escaped(devpath.as_bytes()).to_string());
    let mut kind = format!("{} {}", event.subsystem, event.devtype().unwrap_or("-"));
    if let Some(n) = event.get("PARTN") {
        let _ = write!(kind, " {}", Escaped(n.as_bytes()));
    }
    if event.subsystem == "block" {
        let sectors: u64 =
            attr(sysfs, devpath, "size").and_then(|s| String::from_utf8(s).ok()?.trim().parse().ok()).unwrap_or(0);
        let _ = write!(kind, ", {}", size(sectors));
        if let Some(file) = attr(sysfs, devpath, "loop/backing_file") {
            let _ = write!(kind, ", backing file \"{}\"", Escaped(&file));
        }
    }
    if event.subsystem == "usb" && attr(sysfs, devpath, "bDeviceClass").as_deref() == Some(b"09") {
        kind.push_str(", a hub (Qubes does not offer hubs for attaching)");
    }
    label(out, "kind", &kind);
    let Some(usb) = sysfs.usb_device_of(devpath) else { return };
    let text = |name: &str| attr(sysfs, &usb, name);
    let mut line = format!(
        "{} {}:{}",
        Escaped(crate::uevent::kernel_name(&usb).as_bytes()),
        Escaped(&text("idVendor").unwrap_or_default()),
        Escaped(&text("idProduct").unwrap_or_default())
    );
    for name in ["manufacturer", "product"] {
        if let Some(v) = text(name) {
            let _ = write!(line, ", {name} \"{}\"", Escaped(&v));
        }
    }
    label(out, "usb device", &line);
    let serial = text("serial").map_or_else(|| "none".into(), |s| format!("\"{}\"", Escaped(&s)));
    label(out, "serial", &serial);
    let interfaces = sysfs.usb_interfaces(&usb);
    if !interfaces.is_empty() {
        label(out, "interfaces", &interfaces);
    }
}

/// The identity a call for the device would carry, labelled with its form. In a Qubes qube
/// (`db`), what the published records give, checked against sysfs as the agent checks them:
/// R4.3's device id, or on R4.1/R4.2 the published `desc`; or why there is none now. Without
/// qubesdb, the R4.3 id that qubesd would compute from the records sysfs simulates.
pub(super) fn identity(sysfs: &Sysfs, devpath: &str, db: Option<&Publication>) -> String {
    let simulated = match crate::identity::from_sysfs(sysfs, devpath) {
        Ok(simulated) => simulated,
        Err(why) => return format!("none ({why})"),
    };
    let from_sysfs = match simulated.device_id() {
        Ok(id) => format!("id \"{}\"", Escaped(id.as_bytes())),
        Err(why) => return format!("none ({why})"),
    };
    let Some(db) = db else {
        return format!("{from_sysfs} (R4.3 device id, from sysfs: no qubesdb here to check against)");
    };
    match db.check(&simulated) {
        Ok(Verdict::Send(id @ Identity::Id(_))) => format!("{id} (R4.3 device id, as qubesdb publishes it)"),
        Ok(Verdict::Send(desc @ Identity::Desc(_))) => {
            format!("{desc} (R4.1/R4.2 form: the published desc; this qube publishes no device ids)")
        }
        Ok(Verdict::Unpublished) => format!("none yet: not published in qubesdb (sysfs gives {from_sysfs})"),
        Ok(Verdict::Mismatch { expected, published }) => {
            format!("none: qubesdb publishes {published} here, this device is {expected} (no call until they agree)")
        }
        Ok(Verdict::Unverifiable(why)) => format!("none: {why}"),
        Err(why) => format!("{from_sysfs} from sysfs (R4.3 form); qubesdb could not be asked: {why}"),
    }
}

/// A block device's size for people: `60061696 sectors (28.6 GiB)`, or `no media`. Integer
/// arithmetic: float formatting would add about 25 KiB to the binary.
fn size(sectors: u64) -> String {
    let (unit, shift) = if sectors >= 1 << 21 { ("GiB", 21) } else { ("MiB", 11) };
    // Tenths of the unit, rounded.
    let tenths = (u128::from(sectors) * 10 + (1 << (shift - 1))) >> shift;
    match sectors {
        0 => "no media (size 0)".into(),
        _ => format!("{sectors} sectors ({}.{} {unit})", tenths / 10, tenths % 10),
    }
}

/// A rule line for a device, and what a reader should know about it.
#[derive(Debug)]
struct RuleLine {
    text: String,
    note: Option<String>,
}

/// The tests that pick out the device of `event`, as `KEY=="value"` pairs before quoting.
fn keys(sysfs: &Sysfs, event: &Uevent<'_>) -> Vec<(String, Vec<u8>)> {
    let mut keys: Vec<(String, Vec<u8>)> = vec![("SUBSYSTEM".into(), event.subsystem.as_bytes().to_vec())];
    if let Some(devtype) = event.devtype() {
        keys.push(("ENV{DEVTYPE}".into(), devtype.as_bytes().to_vec()));
    }
    if let Some(n) = event.get("PARTN") {
        keys.push(("ENV{PARTN}".into(), n.as_bytes().to_vec()));
    }
    let own = event.subsystem == "usb";
    // On the device itself (ATTR, KERNEL) for a USB device; on its USB parent (ATTRS,
    // KERNELS, all on that one device) for a block device.
    let (attr_key, kernel_key) = if own { ("ATTR", "KERNEL") } else { ("ATTRS", "KERNELS") };
    match sysfs.usb_device_of(event.devpath) {
        Some(usb) => {
            for name in ["idVendor", "idProduct"] {
                keys.push((format!("{attr_key}{{{name}}}"), attr(sysfs, &usb, name).unwrap_or_default()));
            }
            match attr(sysfs, &usb, "serial").map(trimmed).filter(|s| !s.is_empty()) {
                Some(serial) => keys.push((format!("{attr_key}{{serial}}"), serial)),
                // No serial: the port is all that tells two such devices apart.
                None => keys.push((kernel_key.into(), crate::uevent::kernel_name(&usb).as_bytes().to_vec())),
            }
        }
        None => {
            // As udev's rules see a kernel name: `!` is `/` (sd-device's sysname).
            keys.push(("KERNEL".into(), event.kernel().replace('!', "/").into_bytes()));
            if let Some(file) = attr(sysfs, event.devpath, "loop/backing_file").map(trimmed) {
                keys.push(("ATTR{loop/backing_file}".into(), file));
            }
        }
    }
    keys
}

/// What the matcher compares an attribute pattern with: trailing whitespace removed.
fn trimmed(mut value: Vec<u8>) -> Vec<u8> {
    while value.last().is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        value.pop();
    }
    value
}

/// The rule line for the device of `event`, checked: it parses, and matches the device.
fn rule_line(sysfs: &Sysfs, event: &Uevent<'_>) -> Result<RuleLine, String> {
    let mut text = String::new();
    let mut inexact = Vec::new();
    for (key, value) in keys(sysfs, event) {
        let (quoted, exact) = quote(&value);
        if !exact {
            inexact.push(key.clone());
        }
        let _ = write!(text, "{key}=={quoted}, ");
    }
    let _ = write!(text, "ATTACH=\"{PLACEHOLDER}\"");
    let parsed = rules::parse("list", &text);
    if let Some(e) = parsed.errors.first() {
        return Err(format!("the line would not parse ({e})"));
    }
    let mut matcher = Matcher::new(&parsed.set);
    if matcher.first_match(sysfs, &parsed.set, event) != Some(0) {
        return Err("no line that matches this device can be written".into());
    }
    let note = (!inexact.is_empty()).then(|| {
        format!("{} holds a | (which a rule always reads as alternatives): each is ? here", inexact.join(", "))
    });
    Ok(RuleLine { text, note })
}

/// `value` quoted as the rule parser reads it, and whether the pattern matches exactly
/// `value` (true) or also values that differ where a `?` stands for a `|` (false).
///
/// A plain `"..."` string needs only `\"` for a quote: the parser keeps every other
/// backslash. Anything else is written `e"..."` (C escapes, as udev's cunescape reads them):
/// `\\`, `\"`, `\xNN` for control and non-UTF-8 bytes. A value with `*`, `?`, `[` is a glob
/// to the matcher, so those (and `\`) get a glob `\` first; `|` always separates
/// alternatives, even escaped, so it becomes `?`.
fn quote(value: &[u8]) -> (String, bool) {
    let text = std::str::from_utf8(value).ok();
    let plain =
        text.filter(|t| !t.ends_with('\\') && !t.chars().any(|c| c.is_control() || matches!(c, '|' | '*' | '?' | '[')));
    if let Some(t) = plain {
        return (format!("\"{}\"", t.replace('"', "\\\"")), true);
    }
    let glob = value.iter().any(|b| b"|*?[".contains(b));
    let mut pattern = Vec::with_capacity(value.len() + 8);
    for &b in value {
        match b {
            b'|' => pattern.push(b'?'),
            b'*' | b'?' | b'[' | b'\\' if glob => pattern.extend([b'\\', b]),
            b => pattern.push(b),
        }
    }
    (format!("e\"{}\"", c_escape(&pattern)), !value.contains(&b'|'))
}

/// `bytes` in C escapes: printable ASCII and UTF-8 text as they are (but `\` and `"`),
/// everything else `\xNN`.
fn c_escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                c if c.is_control() => {
                    let mut buf = [0; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The other present devices that `line` also matches.
fn also_matches(sysfs: &Sysfs, line: &str, own: &str, devices: &[(String, Vec<u8>)]) -> Vec<String> {
    let parsed = rules::parse("list", line);
    let set: &RuleSet = &parsed.set;
    let mut matcher = Matcher::new(set);
    let mut others = Vec::new();
    for (_, datagram) in devices.iter().filter(|(d, _)| d != own) {
        let Ok(event) = Uevent::parse(datagram) else { continue };
        if matcher.first_match(sysfs, set, &event).is_some() {
            others.push(Escaped(shown_name(&event).as_bytes()).to_string());
        }
    }
    others
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the parser and matcher make of a quoted value: it must match `value`.
    fn round_trip(value: &[u8]) -> (String, bool) {
        let (quoted, exact) = quote(value);
        let line = format!("ATTRS{{serial}}=={quoted}, ATTACH=\"q\"");
        let parsed = rules::parse("t", &line);
        assert!(parsed.errors.is_empty(), "{line}: {:?}", parsed.errors);
        let test = &parsed.set.rules[0].parent_tests[0];
        assert!(test.pattern.matches(value), "{line} does not match {:?}", Escaped(value).to_string());
        (quoted, exact)
    }

    #[test]
    fn sizes_read_like_dfs() {
        assert_eq!(size(60061696), "60061696 sectors (28.6 GiB)");
        assert_eq!(size(2048), "2048 sectors (1.0 MiB)");
        assert_eq!(size(1 << 21), "2097152 sectors (1.0 GiB)");
        assert_eq!(size(1), "1 sectors (0.0 MiB)");
        assert_eq!(size(0), "no media (size 0)");
    }

    #[test]
    fn plain_values_stay_plain_and_quotes_are_escaped() {
        assert_eq!(round_trip(b"4C530001230101115543"), (r#""4C530001230101115543""#.into(), true));
        assert_eq!(round_trip(br#"a "b" c"#), (r#""a \"b\" c""#.into(), true));
        assert_eq!(round_trip(br"a\b"), (r#""a\b""#.into(), true));
        assert_eq!(round_trip(br#"a\"b"#), (r#""a\\"b""#.into(), true));
        assert_eq!(round_trip("Ünïcode".as_bytes()), ("\"Ünïcode\"".into(), true));
        assert_eq!(round_trip(b""), (r#""""#.into(), true));
    }

    #[test]
    fn other_values_are_c_escaped_and_globs_escaped_for_the_matcher() {
        assert_eq!(round_trip(b"a*b?c[d"), (r#"e"a\\*b\\?c\\[d""#.into(), true));
        assert_eq!(round_trip(br"x*\y"), (r#"e"x\\*\\\\y""#.into(), true));
        assert_eq!(round_trip(br"ends\"), (r#"e"ends\\""#.into(), true));
        assert_eq!(round_trip(b"tab\there"), (r#"e"tab\x09here""#.into(), true));
        assert_eq!(round_trip(b"\xff\xfe\"ok"), (r#"e"\xff\xfe\"ok""#.into(), true));
        // `|` separates alternatives even in e"...": it becomes `?`, and the line says so.
        assert_eq!(round_trip(b"a|b"), (r#"e"a?b""#.into(), false));
        assert_eq!(round_trip(br"*|\"), (r#"e"\\*?\\\\""#.into(), false));
        // An exact glob matches nothing else.
        let (q, _) = quote(b"a*b");
        let parsed = rules::parse("t", &format!("ATTRS{{serial}}=={q}, ATTACH=\"q\""));
        assert!(!parsed.set.rules[0].parent_tests[0].pattern.matches(b"aXb"));
    }
}
