//! The properties systemd-udevd's `usb_id` builtin gives a `usb_device`, which Qubes' udev
//! script publishes: a byte-for-byte replica of the C, on attribute values as sd-device
//! reads them (cut at the first NUL, trailing `\n`/`\r` removed: [`crate::sysfs::Sysfs::attr`]).
//!
//! Sources (systemd/systemd, read with the search tool):
//! - `src/udev/udev-builtin-usb_id.c` (5e58465): `builtin_usb_id` (the `usb_device` shortcut
//!   straight to `fallback:`, the `serial` check, the buffer sizes: `vendor_str_enc[256]`,
//!   `model_str_enc[256]`, `serial_str[UDEV_NAME_SIZE]`, `packed_if_str[UDEV_NAME_SIZE]`,
//!   `serial[256]`, `vendor_str[64]`, `model_str[64]`) and `dev_if_packed_info`.
//! - `src/shared/udev-util.c` (3d12eb5): `udev_replace_whitespace`, `udev_replace_chars`.
//! - `src/basic/device-nodes.c` (current, the `allow_listed_char_for_devnode` one):
//!   `encode_devnode_name`, `allow_listed_char_for_devnode`.
//! - `src/basic/utf8.c` (4c6d513): `utf8_encoded_valid_unichar`, `unichar_is_valid`,
//!   `utf8_encoded_expected_len`, `utf8_unichar_to_encoded_len`.
//! - `src/basic/string-util.h`: `WHITESPACE` is `" \t\n\r"`; `src/udev/udev-util.h`:
//!   `UDEV_NAME_SIZE` is 512.
//!
//! These functions have been stable since the `ID_USB_INTERFACES` and `ID_*_ENC` code was
//! written; the newest change (systemd 255's `ID_USB_*` copies) adds properties without
//! changing these.

/// `UDEV_NAME_SIZE`: the size of `serial_str` and `packed_if_str`.
pub const UDEV_NAME_SIZE: usize = 512;
/// The size of `vendor_str_enc` and `model_str_enc`.
pub const ENC_SIZE: usize = 256;
/// The size of `vendor_str` and `model_str`.
pub const STR_SIZE: usize = 64;
/// The size of `serial` (ID_SERIAL).
pub const ID_SERIAL_SIZE: usize = 256;
/// How much of `descriptors` one `read()` returns: udev reads once into 18 + 65535 bytes,
/// but kernfs serves a binary attribute at most a page per `read()` (4096 on x86-64, the
/// only architecture Qubes runs on).
pub const DESCRIPTORS_READ: usize = 4096;

/// `WHITESPACE` (what `strspn` skips at the start).
const WHITESPACE: &[u8] = b" \t\n\r";

/// glibc's `isspace` in the C locale udevd runs in.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The C string a value is: up to its first NUL.
fn c_str(s: &[u8]) -> &[u8] {
    s.iter().position(|&b| b == 0).map_or(s, |n| &s[..n])
}

/// ID_SERIAL_SHORT from the `serial` attribute (None: the property is not set). A serial
/// with any byte below 0x20, above 0x7f, or a `,` is ignored whole (the MSDN rule udev
/// cites); otherwise whitespace is squeezed into a `_`-joined string of at most 511 bytes,
/// and characters outside udev's allow list become `_`. An empty result sets nothing.
pub fn serial_short(serial: Option<&[u8]>) -> Option<Vec<u8>> {
    let serial = c_str(serial?);
    if serial.iter().any(|&b| !(0x20..=0x7f).contains(&b) || b == b',') {
        return None;
    }
    let mut out = replace_whitespace(serial, UDEV_NAME_SIZE - 1);
    replace_chars(&mut out);
    (!out.is_empty()).then_some(out)
}

/// ID_VENDOR_ENC from `manufacturer` (fallback `idVendor`), or ID_MODEL_ENC from `product`
/// (fallback `idProduct`). `Err` holds what udev wrote before its 256-byte buffer ran out:
/// systemd then leaves that buffer unterminated, so the real value is the prefix followed by
/// whatever was on udevd's stack, which nothing can reproduce.
pub fn enc(string: Option<&[u8]>, fallback: &[u8]) -> Result<Vec<u8>, Vec<u8>> {
    encode_devnode_name(c_str(string.unwrap_or(fallback)), ENC_SIZE)
}

/// ID_VENDOR or ID_MODEL: the string squeezed to at most 63 bytes, then allow-listed.
pub fn plain(string: Option<&[u8]>, fallback: &[u8]) -> Vec<u8> {
    let mut out = replace_whitespace(c_str(string.unwrap_or(fallback)), STR_SIZE - 1);
    replace_chars(&mut out);
    out
}

/// ID_SERIAL: `VENDOR_MODEL[_SERIAL]`, cut to 255 bytes as `strpcpyl` into `serial[256]`
/// cuts it (what R4.1/R4.2 publish after `VID:PID `).
pub fn id_serial(vendor: &[u8], model: &[u8], serial_short: Option<&[u8]>) -> Vec<u8> {
    let mut out = [vendor, b"_", model].concat();
    if let Some(serial) = serial_short {
        out.extend_from_slice(b"_");
        out.extend_from_slice(serial);
    }
    out.truncate(ID_SERIAL_SIZE - 1);
    out
}

/// `udev_replace_whitespace(str, to, len)`: leading `WHITESPACE` skipped, each run of
/// `isspace` characters inside becomes one `_`, trailing ones are dropped; at most `len`
/// bytes written, and only the first `len` bytes of `str` (leading whitespace included) read.
pub fn replace_whitespace(s: &[u8], len: usize) -> Vec<u8> {
    let s = c_str(s);
    let mut i = s.iter().take_while(|b| WHITESPACE.contains(b)).count();
    let mut to = Vec::with_capacity(len.min(s.len()));
    let mut is_space = false;
    while to.len() < len && i < len && i < s.len() {
        let c = s[i];
        i += 1;
        if c_isspace(c) {
            is_space = true;
            continue;
        }
        if is_space {
            if to.len() + 1 >= len {
                break;
            }
            to.push(b'_');
            is_space = false;
        }
        to.push(c);
    }
    to
}

/// `udev_replace_chars(str, NULL)`: allow-listed characters, `\x` pairs and valid multi-byte
/// UTF-8 sequences stay; every other byte becomes `_`.
pub fn replace_chars(s: &mut [u8]) {
    let mut i = 0;
    while i < s.len() && s[i] != 0 {
        if allow_listed(s[i]) {
            i += 1;
        } else if s[i] == b'\\' && s.get(i + 1) == Some(&b'x') {
            i += 2;
        } else if let Some(n) = utf8_valid_unichar(&s[i..]).filter(|&n| n > 1) {
            i += n;
        } else {
            s[i] = b'_';
            i += 1;
        }
    }
}

/// `encode_devnode_name(str, str_enc, len)`: valid multi-byte UTF-8 sequences and
/// allow-listed characters stay, `\` and everything else becomes `\xNN` (lowercase). `Err`
/// with the bytes written so far when `len` (which includes the terminating NUL) is too small.
pub fn encode_devnode_name(s: &[u8], len: usize) -> Result<Vec<u8>, Vec<u8>> {
    let s = c_str(s);
    let mut out = Vec::with_capacity(len.min(s.len() * 4));
    let mut i = 0;
    while i < s.len() {
        let seqlen = utf8_valid_unichar(&s[i..]).unwrap_or(0);
        if seqlen > 1 {
            if len - out.len() < seqlen {
                return Err(out);
            }
            out.extend_from_slice(&s[i..i + seqlen]);
            i += seqlen;
            continue;
        }
        if s[i] == b'\\' || !allow_listed(s[i]) {
            if len - out.len() < 4 {
                return Err(out);
            }
            out.extend_from_slice(format!("\\x{:02x}", s[i]).as_bytes());
        } else {
            if len - out.len() < 1 {
                return Err(out);
            }
            out.push(s[i]);
        }
        i += 1;
    }
    if len - out.len() < 1 { Err(out) } else { Ok(out) }
}

/// `allow_listed_char_for_devnode(c, NULL)`: ASCII letters, digits and `#+-.:=@_`.
fn allow_listed(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"#+-.:=@_".contains(&c)
}

/// `utf8_encoded_valid_unichar(str, SIZE_MAX)`: the length of the valid character at the
/// start of `s` (1 for ASCII), None if it is not one. The end of `s` reads as a NUL.
pub fn utf8_valid_unichar(s: &[u8]) -> Option<usize> {
    let first = *s.first()?;
    let len = match first {
        0x00..=0x7f => return Some(1),
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        0xf8..=0xfb => 5,
        0xfc..=0xfd => 6,
        _ => return None,
    };
    let bytes = s.get(..len)?;
    if bytes.iter().any(|&b| b & 0x80 != 0x80) || bytes[1..].iter().any(|&b| b & 0xc0 != 0x80) {
        return None;
    }
    let lead = u32::from(first) & (0x7f >> len);
    let unichar = bytes[1..].iter().fold(lead, |u, &b| (u << 6) | u32::from(b & 0x3f));
    let encoded_len = match unichar {
        0..0x80 => 1,
        0x80..0x800 => 2,
        0x800..0x10000 => 3,
        0x10000..0x200000 => 4,
        0x200000..0x4000000 => 5,
        _ => 6,
    };
    (encoded_len == len && unichar_is_valid(unichar)).then_some(len)
}

/// `unichar_is_valid`: below 0x110000, not a surrogate, not U+FDD0..U+FDEF, not U+xFFFE/xFFFF.
fn unichar_is_valid(ch: u32) -> bool {
    ch < 0x110000 && (ch & 0xffff_f800) != 0xd800 && !(0xfdd0..=0xfdef).contains(&ch) && (ch & 0xfffe) != 0xfffe
}

/// ID_USB_INTERFACES from one read of the `descriptors` attribute (None: not set).
///
/// `dev_if_packed_info`: under 18 bytes, nothing. Otherwise walk the descriptors while a
/// whole 9-byte interface descriptor starts strictly before the end (a last descriptor that
/// ends exactly at the end is not looked at) and fewer than 72 entries are collected; stop
/// at a `bLength` under 3; give up (keeping the entries so far, without the closing `:`) at
/// a `bLength` above `size - 9`. Each interface descriptor (type 4) adds `:ccsspp` unless
/// that string is already there; a closing `:` ends a non-empty list.
pub fn packed_interfaces(descriptors: &[u8]) -> Option<Vec<u8>> {
    const INTERFACE: usize = 9;
    let size = descriptors.len();
    if size < 18 {
        return None;
    }
    let mut out: Vec<u8> = Vec::new();
    let mut pos = 0;
    while pos + INTERFACE < size && out.len() + 7 < UDEV_NAME_SIZE - 2 {
        let d = &descriptors[pos..pos + INTERFACE];
        let b_length = usize::from(d[0]);
        if b_length < 3 {
            break;
        }
        if b_length > size - INTERFACE {
            return (!out.is_empty()).then_some(out);
        }
        pos += b_length;
        if d[1] != 0x04 {
            continue;
        }
        let entry = format!(":{:02x}{:02x}{:02x}", d[5], d[6], d[7]);
        if !out.windows(7).any(|w| w == entry.as_bytes()) {
            out.extend_from_slice(entry.as_bytes());
        }
    }
    if !out.is_empty() {
        out.push(b':');
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::usb_descriptors as descriptors;

    #[test]
    fn whitespace_is_squeezed_and_bounded() {
        let r = |s: &[u8], len| String::from_utf8(replace_whitespace(s, len)).unwrap();
        assert_eq!(r(b"  SanDisk   Cruzer Blade  ", 63), "SanDisk_Cruzer_Blade");
        assert_eq!(r(b"a\tb\x0bc\x0c d", 63), "a_b_c_d");
        // \v and \f are not in WHITESPACE, so they are not skipped at the start: they make a `_`.
        assert_eq!(r(b"\x0bab", 63), "_ab");
        assert_eq!(r(b"abcdef", 4), "abcd");
        assert_eq!(r(b"abc def", 4), "abc", "reading stops after `len` bytes");
        assert_eq!(r(b"ab cdef", 5), "ab_cd");
        assert_eq!(r(b"    abc", 4), "", "only the first `len` bytes are read, leading space included");
        assert_eq!(r(b"  abcdef", 4), "ab");
        assert_eq!(r(b"ab\0cd", 63), "ab");
        assert_eq!(r(b"", 63), "");
    }

    #[test]
    fn chars_outside_the_allow_list_become_underscores() {
        let r = |s: &[u8]| {
            let mut v = s.to_vec();
            replace_chars(&mut v);
            v
        };
        assert_eq!(r(b"A-b.c:d=e@f#g+h_i"), b"A-b.c:d=e@f#g+h_i");
        assert_eq!(r(b"a/b c,d$e"), b"a_b_c_d_e");
        assert_eq!(r(b"a\\x41\\b\\"), b"a\\x41_b_", "`\\x` stays, other backslashes go");
        assert_eq!(r("é€😀".as_bytes()), "é€😀".as_bytes(), "valid UTF-8 stays");
        assert_eq!(r(b"a\xffb\xc3(\xed\xa0\x80"), b"a_b_____", "invalid bytes, cut sequences and surrogates go");
        assert_eq!(r(b"\x7f"), b"_");
    }

    #[test]
    fn serial_short_follows_usb_id() {
        let s = |v: &[u8]| serial_short(Some(v));
        assert_eq!(s(b"4C530001230101115543").unwrap(), b"4C530001230101115543");
        assert_eq!(s(b"  AB CD  ").unwrap(), b"AB_CD");
        assert_eq!(s(b"A/B\\x41+:_~").unwrap(), b"A_B\\x41+:__");
        assert_eq!(s(b"A\x7f").unwrap(), b"A_", "0x7f passes the check, then is replaced");
        assert_eq!(s(b"12,34"), None, "a comma voids the serial");
        assert_eq!(s(b"12\t34"), None);
        assert_eq!(s(b"caf\xc3\xa9"), None);
        assert_eq!(s(b"   "), None, "nothing left");
        assert_eq!(s(b""), None);
        assert_eq!(serial_short(None), None);
        assert_eq!(s(&[b'7'; 600]).unwrap().len(), 511);
    }

    #[test]
    fn encoding_escapes_what_devnode_names_may_not_hold() {
        let e = |v: &[u8]| encode_devnode_name(v, ENC_SIZE);
        assert_eq!(e(b"SanDisk").unwrap(), b"SanDisk");
        assert_eq!(e(b"Cruzer Blade").unwrap(), b"Cruzer\\x20Blade");
        assert_eq!(e(b"a\\b/c\x7f\xff").unwrap(), b"a\\x5cb\\x2fc\\x7f\\xff");
        assert_eq!(e("Ünïcödé".as_bytes()).unwrap(), "Ünïcödé".as_bytes());
        assert_eq!(e(b"\xc0\x80").unwrap(), b"\\xc0\\x80", "overlong NUL");
        assert_eq!(e(b"\xef\xbf\xbe").unwrap(), b"\\xef\\xbf\\xbe", "U+FFFE");
        assert_eq!(e(b"\xf4\x90\x80\x80").unwrap(), b"\\xf4\\x90\\x80\\x80", "above U+10FFFF");
        assert_eq!(e(b"").unwrap(), b"");
    }

    #[test]
    fn encoding_overflow_is_reported_with_what_was_written() {
        // 63 escapes fill 252 bytes. A 64th still fits the check `len - j < 4` (its sprintf
        // puts the NUL one byte past the buffer), and then there is no room for the NUL.
        assert_eq!(encode_devnode_name(&[b' '; 63], ENC_SIZE).unwrap().len(), 252);
        assert_eq!(encode_devnode_name(&[b' '; 64], ENC_SIZE).unwrap_err().len(), 256);
        assert_eq!(encode_devnode_name(&[b' '; 65], ENC_SIZE).unwrap_err().len(), 256);
        let mut odd = vec![b'a'; 253];
        odd.push(b' ');
        assert_eq!(encode_devnode_name(&odd, ENC_SIZE).unwrap_err().len(), 253, "3 bytes left: no escape");
        assert_eq!(encode_devnode_name(&[b'a'; 255], ENC_SIZE).unwrap().len(), 255);
        assert_eq!(encode_devnode_name(&[b'a'; 256], ENC_SIZE).unwrap_err().len(), 256, "no room for the NUL");
        let mut near = vec![b'a'; 253];
        near.extend_from_slice("é".as_bytes());
        assert_eq!(encode_devnode_name(&near, ENC_SIZE).unwrap().len(), 255);
        near.insert(0, b'a');
        assert_eq!(encode_devnode_name(&near, ENC_SIZE).unwrap_err().len(), 256);
    }

    #[test]
    fn utf8_validation_matches_systemd() {
        assert_eq!(utf8_valid_unichar(b"a"), Some(1));
        assert_eq!(utf8_valid_unichar("é".as_bytes()), Some(2));
        assert_eq!(utf8_valid_unichar("€".as_bytes()), Some(3));
        assert_eq!(utf8_valid_unichar("😀".as_bytes()), Some(4));
        for bad in [
            &b"\x80"[..],
            b"\xc3",
            b"\xc3(",
            b"\xc1\xbf",
            b"\xed\xa0\x80",
            b"\xef\xb7\x90",
            b"\xf8\x88\x80\x80\x80",
            b"\xfe",
            b"",
        ] {
            assert_eq!(utf8_valid_unichar(bad), None, "{bad:?}");
        }
        assert_eq!(utf8_valid_unichar(b"\xef\xb7\xb0"), Some(3), "U+FDF0 is valid");
    }

    #[test]
    fn id_serial_is_cut_at_255() {
        assert_eq!(id_serial(b"SanDisk", b"Cruzer", Some(b"4C53")), b"SanDisk_Cruzer_4C53");
        assert_eq!(id_serial(b"V", b"M", None), b"V_M");
        assert_eq!(id_serial(&[b'v'; 63], &[b'm'; 63], Some(&[b's'; 511])).len(), 255);
        assert_eq!(plain(Some(b" QEMU  USB "), b"46f4"), b"QEMU_USB");
        assert_eq!(plain(None, b"46f4"), b"46f4");
        assert_eq!(plain(Some(&[b'x'; 100]), b"46f4").len(), 63);
    }

    #[test]
    fn interfaces_in_descriptor_order_without_repeats() {
        let p = |d: &[u8]| packed_interfaces(d).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(p(&descriptors(&[(8, 6, 0x50, 2)])).unwrap(), ":080650:");
        // A YubiKey: HID keyboard, HID, CCID; a repeated triple is listed once.
        assert_eq!(
            p(&descriptors(&[(3, 1, 1, 1), (3, 0, 0, 2), (0x0b, 0, 0, 3), (3, 1, 1, 1)])).unwrap(),
            ":030101:030000:0b0000:"
        );
        assert_eq!(p(&descriptors(&[])), None, "no interface: not set");
        assert_eq!(p(&descriptors(&[(8, 6, 0x50, 2)])[..17]), None, "short read");
    }

    #[test]
    fn interface_walk_bounds_are_udevs() {
        let p = |d: &[u8]| packed_interfaces(d).map(|v| String::from_utf8(v).unwrap());
        // An interface descriptor ending exactly at the end is not read.
        let last = descriptors(&[(8, 6, 0x50, 0)]);
        assert_eq!(p(&last), None);
        let mut padded = last.clone();
        padded.push(0);
        assert_eq!(p(&padded).unwrap(), ":080650:");
        // bLength under 3 stops the walk, keeping what was found.
        let mut stop = descriptors(&[(8, 6, 0x50, 2), (3, 1, 1, 1)]);
        stop[18 + 9 + 9 + 14] = 2;
        assert_eq!(p(&stop).unwrap(), ":080650:");
        // A bLength above size - 9 gives up: the entries so far, without the closing `:`.
        let mut corrupt = descriptors(&[(8, 6, 0x50, 2), (3, 1, 1, 1)]);
        let n = corrupt.len();
        corrupt[18 + 9 + 9 + 14] = (n - 8) as u8;
        assert_eq!(p(&corrupt).unwrap(), ":080650");
        // At most 72 entries (504 bytes) fit udev's 512-byte buffer.
        let many: Vec<_> = (0..100u8).map(|i| (0xff, i, 0, 0)).collect();
        let mut d = descriptors(&many);
        d.push(0);
        let got = p(&d).unwrap();
        assert_eq!(got.len(), 72 * 7 + 1);
        assert!(got.starts_with(":ff0000:ff0100:") && got.ends_with(":ff4700:"), "{got}");
    }
}
