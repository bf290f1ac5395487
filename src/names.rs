//! The only strings that reach dom0: qube names and device names, and the call built from them.
//!
//! qrexec rewrites any byte outside `[A-Za-z0-9_.+-]` in a service argument to `_`, and the
//! argument `QUBE+__+DEV` is split on `+`; so every name is checked here, against rules that
//! are stricter than qrexec's, before a call is built. A name that fails is refused, never
//! rewritten: a device cannot choose what dom0 reads.

use std::fmt;

/// The qrexec service the agent calls (the seed recipe's name, so its dom0 side keeps working).
pub const ATTACH_SERVICE: &str = "custom.USBDeviceAttach";
/// The service for the opposite direction.
pub const DETACH_SERVICE: &str = "custom.USBDeviceDetach";

/// Why a name is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong {
        max: usize,
    },
    BadFirst,
    /// A byte qrexec would rewrite (outside `[A-Za-z0-9_.+-]`), or `+`, which splits the
    /// argument.
    BadByte(u8),
    /// Bytes qrexec would pass, in a shape this kind of name never has.
    Shape(&'static str),
    Reserved(&'static str),
}

/// True for bytes qrexec passes unchanged in a service argument.
fn qrexec_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_.+-".contains(&b)
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("empty"),
            NameError::TooLong { max } => write!(f, "longer than {max} bytes"),
            NameError::BadFirst => f.write_str("must start with a letter"),
            NameError::BadByte(b'+') => f.write_str("'+' is not allowed (it separates the qrexec argument's fields)"),
            NameError::BadByte(b) if b.is_ascii_graphic() || *b == b' ' => {
                write!(f, "'{}' is not allowed (qrexec would rewrite it to '_')", *b as char)
            }
            NameError::BadByte(b) => write!(f, "byte \\x{b:02x} is not allowed (qrexec would rewrite it to '_')"),
            NameError::Shape(what) | NameError::Reserved(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for NameError {}

/// A qube name as Qubes accepts it (qubes_pure_is_valid_qube_name): 1-31 bytes of
/// `[A-Za-z0-9_.-]` starting with a letter, not `none`/`default`/`Domain-0`, not ending in
/// `-dm`; and not `dom0`, which is never a target.
pub fn check_qube(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let first = *b.first().ok_or(NameError::Empty)?;
    if b.len() > 31 {
        return Err(NameError::TooLong { max: 31 });
    }
    if !first.is_ascii_alphabetic() {
        return Err(NameError::BadFirst);
    }
    if let Some(&bad) = b.iter().find(|&&c| !(c.is_ascii_alphanumeric() || b"_.-".contains(&c))) {
        return Err(NameError::BadByte(bad));
    }
    match name {
        "none" | "default" | "Domain-0" => Err(NameError::Reserved("reserved by Qubes")),
        "dom0" => Err(NameError::Reserved("dom0 is never a target")),
        _ if name.ends_with("-dm") => Err(NameError::Reserved("names ending in -dm are reserved by Qubes")),
        _ => Ok(()),
    }
}

/// A block device name as dom0 will accept it: `[A-Za-z][A-Za-z0-9_-]{0,31}` (`sda`, `sdb1`,
/// `mmcblk0p1`, `loop200`). It never starts with a digit, which is how dom0 tells it from a
/// USB bus id.
pub fn check_block(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let first = *b.first().ok_or(NameError::Empty)?;
    if b.len() > 32 {
        return Err(NameError::TooLong { max: 32 });
    }
    if let Some(&bad) = b.iter().find(|&&c| !qrexec_safe(c) || c == b'+') {
        return Err(NameError::BadByte(bad));
    }
    if !first.is_ascii_alphabetic() {
        return Err(NameError::BadFirst);
    }
    if b.iter().any(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'-')) {
        return Err(NameError::Shape("block device names are letters, digits, '_' and '-'"));
    }
    Ok(())
}

/// A USB bus id: `BUS-PORT(.PORT)*` with 1-3 digit numbers and at most 7 ports (`2-1`,
/// `2-1.4`), the kernel's naming for a usb_device.
pub fn check_busid(id: &str) -> Result<(), NameError> {
    const SHAPE: NameError = NameError::Shape("not a USB bus id (BUS-PORT[.PORT...], like 2-1 or 2-1.4)");
    if id.is_empty() {
        return Err(NameError::Empty);
    }
    if id.len() > 31 {
        return Err(NameError::TooLong { max: 31 });
    }
    if let Some(&bad) = id.as_bytes().iter().find(|&&c| !qrexec_safe(c) || c == b'+') {
        return Err(NameError::BadByte(bad));
    }
    let number = |s: &str| (1..=3).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit());
    let (bus, ports) = id.split_once('-').ok_or(SHAPE)?;
    let ports: Vec<&str> = ports.split('.').collect();
    if number(bus) && ports.len() <= 7 && ports.iter().all(|p| number(p)) { Ok(()) } else { Err(SHAPE) }
}

/// How a device is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A block device, with qvm-block.
    Block,
    /// A whole USB device, with qvm-usb.
    Usb,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Usb => "usb",
        }
    }
}

/// A validated request for dom0: attach device `dev` of `kind` to `qube`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub service: &'static str,
    pub qube: String,
    pub dev: String,
    pub kind: Kind,
}

impl Call {
    /// Checks both names and builds the call; an unsafe name is refused, never rewritten.
    pub fn new(service: &'static str, qube: &str, kind: Kind, dev: &str) -> Result<Call, CallError> {
        check_qube(qube).map_err(|e| CallError::Qube(qube.to_owned(), e))?;
        let dev_check = match kind {
            Kind::Block => check_block(dev),
            Kind::Usb => check_busid(dev),
        };
        dev_check.map_err(|e| CallError::Device(dev.as_bytes().to_vec(), e))?;
        Ok(Call { service, qube: qube.to_owned(), dev: dev.to_owned(), kind })
    }

    /// The qrexec service with its argument: `custom.USBDeviceAttach+QUBE+__+DEV`.
    pub fn service_arg(&self) -> String {
        format!("{}+{}+__+{}", self.service, self.qube, self.dev)
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service_arg())
    }
}

/// A call that cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    Qube(String, NameError),
    Device(Vec<u8>, NameError),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::log::Escaped;
        match self {
            CallError::Qube(q, e) => {
                write!(f, "qube name \"{}\" refused: {e}", Escaped(q.as_bytes()))
            }
            CallError::Device(d, e) => write!(f, "device name \"{}\" refused: {e}", Escaped(d)),
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qube_names_follow_qubes_rules() {
        for ok in ["work", "a", "Vault-2", "sys.usb_x", "a234567890123456789012345678901"] {
            assert_eq!(check_qube(ok), Ok(()), "{ok}");
        }
        let bad = [
            ("", NameError::Empty),
            ("a2345678901234567890123456789012", NameError::TooLong { max: 31 }),
            ("1work", NameError::BadFirst),
            ("-work", NameError::BadFirst),
            ("my work", NameError::BadByte(b' ')),
            ("work+x", NameError::BadByte(b'+')),
            ("wörk", NameError::BadByte(0xc3)),
            ("work;rm", NameError::BadByte(b';')),
        ];
        for (name, want) in bad {
            assert_eq!(check_qube(name), Err(want), "{name:?}");
        }
        for reserved in ["none", "default", "Domain-0", "dom0", "work-dm"] {
            assert!(matches!(check_qube(reserved), Err(NameError::Reserved(_))), "{reserved}");
        }
    }

    #[test]
    fn device_names_cannot_be_confused() {
        for ok in ["sda", "sdb1", "mmcblk0p1", "nvme0n1p2", "loop200", "dm-0", "sr0"] {
            assert_eq!(check_block(ok), Ok(()), "{ok}");
        }
        for bad in ["", "0sda", "sd a", "sda+x", "../sda", "sda\n", "cciss!c0d0", "a.b"] {
            assert!(check_block(bad).is_err(), "{bad:?}");
        }
        for ok in ["1-1", "2-1.4", "10-1.2.3.4.5.6.7", "255-999"] {
            assert_eq!(check_busid(ok), Ok(()), "{ok}");
        }
        for bad in ["", "2", "2-", "-1", "2-1.", "2-1..4", "2-1:1.0", "usb2", "1234-1", "1-1.2.3.4.5.6.7.8", "2-1+x"] {
            assert!(check_busid(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            check_busid("usb1").unwrap_err().to_string(),
            "not a USB bus id (BUS-PORT[.PORT...], like 2-1 or 2-1.4)"
        );
        assert_eq!(
            check_block("sdb+x").unwrap_err().to_string(),
            "'+' is not allowed (it separates the qrexec argument's fields)"
        );
    }

    #[test]
    fn calls_are_built_only_from_checked_names() {
        let call = Call::new(ATTACH_SERVICE, "work", Kind::Block, "sdb1").unwrap();
        assert_eq!(call.service_arg(), "custom.USBDeviceAttach+work+__+sdb1");
        let call = Call::new(ATTACH_SERVICE, "vault", Kind::Usb, "2-1.4").unwrap();
        assert_eq!(call.service_arg(), "custom.USBDeviceAttach+vault+__+2-1.4");
        assert!(Call::new(ATTACH_SERVICE, "work", Kind::Usb, "sdb").is_err());
        assert!(Call::new(ATTACH_SERVICE, "work", Kind::Block, "2-1").is_err());
        assert!(Call::new(ATTACH_SERVICE, "dom0", Kind::Block, "sdb").is_err());
        let err = Call::new(ATTACH_SERVICE, "work", Kind::Block, "sd$(x)").unwrap_err();
        assert_eq!(
            err.to_string(),
            "device name \"sd$(x)\" refused: '$' is not allowed (qrexec would rewrite it to '_')"
        );
    }
}
