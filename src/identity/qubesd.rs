//! qubesd's device id, ported line by line from the Python that computes it in dom0.
//!
//! Sources (read at these commits):
//! - qubes-core-admin `qubes/ext/block.py` (aad4bb6): `BlockDevice.device_id`,
//!   `parent_device`, `_get_possible_partition_number`, `_sanitize`; `device_get` (a block
//!   record exists when any key lies under `/qubes-block-devices/NAME/`).
//! - qubes-core-admin `qubes/device_protocol.py` (aad4bb6): `DeviceInfo.device_id` (the
//!   default `0000:0000::?******`, which `UnknownDevice` returns for a parent that is not
//!   published), `DeviceInterface.__init__` (`ljust(6, "*")`, the hex check that raises
//!   `ProtocolError`), `DeviceInterface.unknown` (`?******`).
//! - qubes-app-linux-usb-proxy `qubesusbproxy/core3ext.py` (fe01df6): `USBDevice.device_id`,
//!   `_load_desc_from_qubesdb`, `_load_interfaces_from_qubesdb`, `_sanitize` (with its `\xNN`
//!   decoding).
//!
//! Everything here is pure: it reads a [`Records`] snapshot, never qubesdb itself.

use super::{BlockRecord, IdError, Port, Records, UsbRecord};

/// `DeviceInfo.device_id` of a device qubesd knows nothing about (an `UnknownDevice`, such as
/// a parent USB device that sys-usb does not publish), and of a USB record without `desc`
/// and `interfaces`.
pub const UNKNOWN_ID: &str = "0000:0000::?******";

/// The longest chain of parents followed. Real chains are partition → disk → USB device
/// (two links); qubesd itself recurses until Python's recursion limit and then fails.
pub const MAX_DEPTH: usize = 8;

/// qubesd's `device_id` for the device at `port`, from `records`.
pub fn device_id(records: &Records, port: &Port) -> Result<String, IdError> {
    match port {
        Port::Usb(busid) => usb_id(records.usb(busid).ok_or(IdError::NotPublished)?),
        Port::Block(name) => block_id(records, name, 0),
    }
}

/// `USBDevice.device_id`: `VENDOR:PRODUCT:SERIAL:INTERFACES`.
pub fn usb_id(record: &UsbRecord) -> Result<String, IdError> {
    let (vendor, product, serial) = usb_desc(record.desc.as_deref());
    let interfaces = usb_interfaces(record.interfaces.as_deref())?;
    // `serial = self.serial if self.serial != "unknown" else ""`
    let serial = if serial == "unknown" { "" } else { &serial };
    Ok(format!("{vendor}:{product}:{serial}:{interfaces}"))
}

/// `_load_desc_from_qubesdb`: vendor id, product id and serial, sanitized. A desc that is
/// absent or empty, or that does not split into exactly four fields on single spaces with a
/// first field of exactly two `:`-separated parts, gives `0000`, `0000`, `unknown`.
fn usb_desc(desc: Option<&[u8]>) -> (String, String, String) {
    let fallback = || (usb_sanitize(b"0000", printable), usb_sanitize(b"0000", printable), "unknown".to_owned());
    let Some(desc) = desc.filter(|d| !d.is_empty()) else {
        return fallback();
    };
    let fields: Vec<&[u8]> = desc.split(|&b| b == b' ').collect();
    let [vend_prod, _manufacturer, _name, serial] = fields[..] else {
        return fallback();
    };
    let ids: Vec<&[u8]> = vend_prod.split(|&b| b == b':').collect();
    let [vendor, product] = ids[..] else {
        return fallback();
    };
    (usb_sanitize(vendor, printable), usb_sanitize(product, printable), usb_sanitize(serial, printable))
}

/// `_load_interfaces_from_qubesdb` joined as `device_id` joins them: `?******` for an absent
/// or empty value; otherwise `u` + the sanitized entry padded with `*` to 6, for each
/// non-empty `:`-separated entry (so `:` alone gives an empty string). An entry that is not
/// hex digits after sanitizing makes `DeviceInterface` raise, and qubesd has no id.
fn usb_interfaces(interfaces: Option<&[u8]>) -> Result<String, IdError> {
    let Some(interfaces) = interfaces.filter(|i| !i.is_empty()) else {
        return Ok("?******".to_owned());
    };
    let mut out = String::new();
    for entry in interfaces.split(|&b| b == b':').filter(|e| !e.is_empty()) {
        let mut code = usb_sanitize(entry, |b| b.is_ascii_hexdigit());
        while code.len() < 6 {
            code.push('*');
        }
        if !code.bytes().all(|b| b.is_ascii_hexdigit() || b == b'*') {
            return Err(IdError::Interface(entry.to_vec()));
        }
        out.push('u');
        out.push_str(&code);
    }
    Ok(out)
}

/// `BlockDevice.device_id`: the parent's id, `:`, then the USB interface number (`1.0`) the
/// `parent` record names, or else the trailing number of the name (`None` if it has none).
fn block_id(records: &Records, name: &str, depth: usize) -> Result<String, IdError> {
    if depth > MAX_DEPTH {
        return Err(IdError::TooDeep);
    }
    let record = records.block(name).ok_or(IdError::NotPublished)?;
    let (parent, interface) = match parent_of(record) {
        None => (String::new(), None),
        Some((ident, Some(interface))) => {
            (usb_id(records.usb(&ident).unwrap_or(&UsbRecord::default()))?, Some(interface))
        }
        Some((ident, None)) => match records.block(&ident) {
            Some(_) => (block_id(records, &ident, depth + 1)?, None),
            None => (UNKNOWN_ID.to_owned(), None),
        },
    };
    match interface.filter(|i| !i.is_empty()) {
        Some(interface) => Ok(format!("{parent}:{interface}")),
        None => Ok(format!("{parent}:{}", partition_number(name))),
    }
}

/// `BlockDevice.parent_device` without the lookup: the sanitized `parent` split at its first
/// `:` into the parent's port id and, for a USB parent (a `:` was there), the interface
/// number. None when there is no parent key or the port id is empty.
pub(super) fn parent_of(record: &BlockRecord) -> Option<(String, Option<String>)> {
    let parent = block_sanitize(record.parent.as_deref()?);
    match parent.split_once(':') {
        Some(("", _)) => None,
        Some((ident, interface)) => Some((ident.to_owned(), Some(interface.to_owned()))),
        None if parent.is_empty() => None,
        None => Some((parent, None)),
    }
}

/// `str(_get_possible_partition_number())`: the trailing digits of the port id as Python's
/// `int` prints them (leading zeros dropped), or `None` when it ends in no digit.
pub fn partition_number(name: &str) -> String {
    let digits = &name[name.trim_end_matches(|c: char| c.is_ascii_digit()).len()..];
    match digits.trim_start_matches('0') {
        "" if digits.is_empty() => "None".to_owned(),
        "" => "0".to_owned(),
        number => number.to_owned(),
    }
}

/// `string.ascii_letters + string.digits + string.punctuation + " "`: printable ASCII.
fn printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// `USBDevice._sanitize`: `\xNN` decodes to that byte (`\x` with a bad hex pair gives `_`;
/// a `\` or `\xN` cut short at the end ends the string; `\` before anything else drops the
/// `\`), then a byte outside `safe` becomes `_`. Bytes above 0x7f are never safe (Python's
/// `chr` of them is not ASCII).
fn usb_sanitize(untrusted: &[u8], safe: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(untrusted.len());
    let mut i = 0;
    while i < untrusted.len() {
        let mut c = untrusted[i];
        if c == b'\\' {
            i += 1;
            let Some(&next) = untrusted.get(i) else { break };
            c = next;
            if c == b'x' {
                i += 2;
                if i >= untrusted.len() {
                    break;
                }
                c = match (hex(untrusted[i - 1]), hex(untrusted[i])) {
                    (Some(hi), Some(lo)) => hi << 4 | lo,
                    _ => b'_',
                };
            }
        }
        out.push(if c < 0x80 && safe(c) { c as char } else { '_' });
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `BlockDevice._sanitize`: bytes above 0x7f dropped (`decode("ascii", errors="ignore")`),
/// then anything but letters, digits and punctuation (space included) becomes `_`.
fn block_sanitize(untrusted: &[u8]) -> String {
    untrusted.iter().filter(|b| b.is_ascii()).map(|&b| if b.is_ascii_graphic() { b as char } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usb(desc: &[u8], interfaces: Option<&[u8]>) -> UsbRecord {
        UsbRecord { desc: Some(desc.to_vec()), interfaces: interfaces.map(<[u8]>::to_vec) }
    }

    fn block(parent: Option<&[u8]>) -> BlockRecord {
        BlockRecord { desc: Some(b"Model ()".to_vec()), parent: parent.map(<[u8]>::to_vec) }
    }

    /// qubes-app-linux-usb-proxy `qubesusbproxy/tests.py`, `get_qdb()`: device 1-1 with
    /// desc `b"1a0a:badd USB-IF Test\x20Device"` (in a Python bytes literal `\x20` is a
    /// space, so four fields) and interfaces `:ffff00:020600:0a0000:`; device 1-2, whose
    /// desc has five fields.
    #[test]
    fn qubes_usb_proxy_test_records() {
        let one = usb(b"1a0a:badd USB-IF Test Device", Some(b":ffff00:020600:0a0000:"));
        assert_eq!(usb_id(&one).unwrap(), "1a0a:badd:Device:uffff00u020600u0a0000");
        let two = usb(b"1a0a:badd USB-IF Test Device 2", Some(b":0acafe:"));
        assert_eq!(usb_id(&two).unwrap(), "0000:0000::u0acafe");
    }

    /// qubes-core-admin `qubes/tests/devices_block.py`, `test_000_device_get`: sda with
    /// parent `1-1.1:1.0` whose USB device has the default id gives `0000:0000::?******:1.0`.
    #[test]
    fn qubes_core_admin_block_test() {
        let mut records = Records::default();
        records.insert_block(
            "sda",
            BlockRecord { desc: Some(b"Test_ (device)".to_vec()), parent: Some(b"1-1.1:1.0".to_vec()) },
        );
        assert_eq!(device_id(&records, &Port::Block("sda".into())).unwrap(), "0000:0000::?******:1.0");
        // The same when the USB device is published without desc and interfaces.
        records.insert_usb("1-1.1", UsbRecord::default());
        assert_eq!(device_id(&records, &Port::Block("sda".into())).unwrap(), "0000:0000::?******:1.0");
    }

    #[test]
    fn desc_that_does_not_split_in_four() {
        for desc in [&b""[..], b"0781:5581", b"0781:5581 a b", b"0781:5581 a b c d", b"0781 a b c", b"0:7:8 a b c"] {
            assert_eq!(usb_id(&usb(desc, None)).unwrap(), UNKNOWN_ID, "{desc:?}");
        }
        // Empty fields still count: three single spaces make four fields.
        assert_eq!(usb_id(&usb(b"0781:5581   ", Some(b""))).unwrap(), "0781:5581::?******");
        assert_eq!(usb_id(&usb(b":   ", None)).unwrap(), ":::?******");
        assert_eq!(usb_id(&UsbRecord::default()).unwrap(), UNKNOWN_ID);
    }

    #[test]
    fn serial_unknown_is_no_serial() {
        assert_eq!(usb_id(&usb(b"0781:5581 V M unknown", Some(b":080650:"))).unwrap(), "0781:5581::u080650");
        assert_eq!(usb_id(&usb(b"0781:5581 V M Unknown", Some(b":080650:"))).unwrap(), "0781:5581:Unknown:u080650");
        // `unknown` spelled with an escape is still `unknown` once decoded.
        assert_eq!(usb_id(&usb(b"0781:5581 V M \\x75nknown", None)).unwrap(), "0781:5581::?******");
    }

    #[test]
    fn usb_sanitize_decodes_and_replaces() {
        let s = |b: &[u8]| usb_sanitize(b, printable);
        assert_eq!(s(b"USB\\x202.0\\x20Camera"), "USB 2.0 Camera");
        assert_eq!(s(b"A\\x41\\x3a"), "AA:");
        assert_eq!(s(b"a\\xZZb"), "a_b", "a bad pair is one `_` and both digits are gone");
        assert_eq!(s(b"a\\xc3\\xa9b"), "a__b", "decoded bytes above 0x7f are not safe");
        assert_eq!(s(b"ab\\x4"), "ab", "cut short: the rest is dropped");
        assert_eq!(s(b"ab\\x"), "ab");
        assert_eq!(s(b"ab\\"), "ab");
        assert_eq!(s(b"a\\\\b\\nc"), "a\\bnc", "`\\` before anything else keeps only that thing");
        assert_eq!(s(b"tab\there\x7f\xff"), "tab_here__");
        assert_eq!(usb_sanitize(b"08\\x36x50", |b| b.is_ascii_hexdigit()), "086_50");
    }

    #[test]
    fn interfaces_as_qubesd_builds_them() {
        let i = |v: &[u8]| usb_interfaces(Some(v));
        assert_eq!(i(b":080650:").unwrap(), "u080650");
        assert_eq!(i(b":").unwrap(), "", "present but without entries: no interface at all");
        assert_eq!(i(b"::080650::030101").unwrap(), "u080650u030101");
        assert_eq!(i(b":08:").unwrap(), "u08****");
        assert_eq!(i(b":0806501:").unwrap(), "u0806501", "too long: qubesd only warns");
        assert_eq!(i(b":ABCDEF:").unwrap(), "uABCDEF");
        assert_eq!(i(b":\\x30806\\x35\\x30:").unwrap(), "u080650", "escapes are decoded");
        assert_eq!(i(b":\\:").unwrap(), "u******", "sanitized to nothing, then padded");
        assert_eq!(usb_interfaces(None).unwrap(), "?******");
        assert_eq!(usb_interfaces(Some(b"")).unwrap(), "?******");
        for bad in [&b":08065g:"[..], b":08*650:", b": 80650:", b":08\xff650:"] {
            assert_eq!(i(bad), Err(IdError::Interface(bad[1..bad.len() - 1].to_vec())), "{bad:?}");
        }
    }

    #[test]
    fn block_ids_follow_the_parent_chain() {
        let mut r = Records::default();
        r.insert_usb("2-1.4", usb(b"0781:5581 SanDisk Cruzer 4C53", Some(b":080650:")));
        r.insert_block("sdb", block(Some(b"2-1.4:1.0")));
        r.insert_block("sdb1", block(Some(b"sdb")));
        r.insert_block("loop0", block(Some(b"")));
        r.insert_block("dm-0", block(None));
        r.insert_block("sdc", block(Some(b"ata1")));
        r.insert_block("sdd", block(Some(b"2-9:1.0")));
        r.insert_block("nvme0n1p12", block(Some(b"nvme0n1")));
        let id = |n: &str| device_id(&r, &Port::Block(n.into()));
        assert_eq!(id("sdb").unwrap(), "0781:5581:4C53:u080650:1.0");
        assert_eq!(id("sdb1").unwrap(), "0781:5581:4C53:u080650:1.0:1");
        assert_eq!(id("loop0").unwrap(), ":0");
        assert_eq!(id("dm-0").unwrap(), ":0");
        assert_eq!(id("sdc").unwrap(), "0000:0000::?******:None", "a parent that is not published");
        assert_eq!(id("sdd").unwrap(), "0000:0000::?******:1.0", "a USB parent that is not published");
        assert_eq!(id("nvme0n1p12").unwrap(), "0000:0000::?******:12");
        assert_eq!(id("sde"), Err(IdError::NotPublished));
        assert_eq!(device_id(&r, &Port::Usb("2-1.4".into())).unwrap(), "0781:5581:4C53:u080650");
        assert_eq!(device_id(&r, &Port::Usb("2-1".into())), Err(IdError::NotPublished));
    }

    #[test]
    fn parent_records_are_sanitized_and_split_once() {
        let mut r = Records::default();
        r.insert_usb("2-1", usb(b"0781:5581 a b S", Some(b":080650:")));
        for (parent, want) in [
            (&b"2-1:1.0"[..], "0781:5581:S:u080650:1.0"),
            (b"2-1:", "0781:5581:S:u080650:7"),
            (b"2-1:1.0:x", "0781:5581:S:u080650:1.0:x"),
            (b"2-1:1 0", "0781:5581:S:u080650:1_0"),
            (b"2-1:1\xff.0", "0781:5581:S:u080650:1.0"),
            (b":1.0", ":7"),
            (b"\xff", ":7"),
            (b" ", "0000:0000::?******:7"),
        ] {
            r.insert_block("sdz7", block(Some(parent)));
            assert_eq!(device_id(&r, &Port::Block("sdz7".into())).unwrap(), want, "{parent:?}");
        }
    }

    #[test]
    fn cycles_and_long_chains_have_no_id() {
        let mut r = Records::default();
        r.insert_block("sda", block(Some(b"sdb")));
        r.insert_block("sdb", block(Some(b"sda")));
        assert_eq!(device_id(&r, &Port::Block("sda".into())), Err(IdError::TooDeep));
        let mut r = Records::default();
        for i in 0..=MAX_DEPTH + 1 {
            r.insert_block(&format!("d{i}"), block(Some(format!("d{}", i + 1).as_bytes())));
        }
        assert_eq!(device_id(&r, &Port::Block("d0".into())), Err(IdError::TooDeep));
        assert!(device_id(&r, &Port::Block("d2".into())).is_ok());
    }

    #[test]
    fn partition_numbers_as_python_prints_them() {
        for (name, want) in [
            ("sdb1", "1"),
            ("sdb", "None"),
            ("loop200", "200"),
            ("loop007", "7"),
            ("zram0", "0"),
            ("x00", "0"),
            ("mmcblk0p12", "12"),
            ("", "None"),
        ] {
            assert_eq!(partition_number(name), want, "{name}");
        }
    }
}
