//! The only strings that reach dom0: qube names, device names and device identities, and the
//! call built from them.
//!
//! qrexec rewrites any byte outside `[A-Za-z0-9_.+-]` in a service argument to `_`, and the
//! argument `QUBE+__+DEV+__+IDENT` is split on `+__+`; so every name is checked here, against
//! rules that are stricter than qrexec's, before a call is built, and an identity is encoded
//! into qrexec's charset in a way that can never contain `__`. A name that fails is refused,
//! never rewritten: a device cannot choose what dom0 reads.
//!
//! The encoding (IDENTITY.md §2): `[A-Za-z0-9.-]` as is, `:` as `+`, any other byte as `_`
//! and two lowercase hex digits. A device id is sent as `ENC(ID)`, a published desc (Qubes
//! R4.1/R4.2) as `desc+ENC(DESC)`; an id never encodes to something starting with `desc+`.

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

/// The longest identity sent, encoded: a longer one is refused, never cut. Real ids are far
/// shorter (a USB serial has at most 126 characters); the whole service and argument stays
/// far inside qrexec's 65000 bytes (`MAX_SERVICE_NAME_LEN`, R4.1 and later).
pub const MAX_IDENT: usize = 2048;
/// What starts an identity in the desc form.
pub const DESC_PREFIX: &str = "desc+";

/// A device identity as the call's last field, `ENC(ID)` or `desc+ENC(DESC)`: only built by
/// encoding, or by [`Ident::parse`] of a valid encoding, so it is always in qrexec's charset,
/// never holds `__`, and fits [`MAX_IDENT`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ident(String);

/// What an identity says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A Qubes device id (printable ASCII).
    Id(String),
    /// A published desc.
    Desc(Vec<u8>),
}

/// Why an identity cannot be sent (or read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentError {
    Empty,
    /// Longer than [`MAX_IDENT`] once encoded.
    TooLong {
        len: usize,
    },
    /// A device id holds only printable ASCII; this byte is not.
    NotPrintable(u8),
    /// A device id starting with `desc:` would read as the desc form.
    LooksLikeDesc,
    /// Not the encoding, at this byte offset: a byte outside `[A-Za-z0-9.+_-]`, a `_` not
    /// followed by two lowercase hex digits, or an escape of a byte that is sent as itself.
    Malformed {
        at: usize,
    },
}

impl fmt::Display for IdentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentError::Empty => f.write_str("empty identity"),
            IdentError::TooLong { len } => write!(f, "identity of {len} bytes encoded, longer than {MAX_IDENT}"),
            IdentError::NotPrintable(b) => write!(f, "device id holds byte \\x{b:02x}, not printable ASCII"),
            IdentError::LooksLikeDesc => f.write_str("device id starts with \"desc:\" and would read as a desc"),
            IdentError::Malformed { at } => write!(f, "not an encoded identity (at byte {at})"),
        }
    }
}

impl std::error::Error for IdentError {}

/// True for bytes the encoding sends as themselves.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'-'
}

/// ENC: `[A-Za-z0-9.-]` as is, `:` as `+`, every other byte as `_` and two lowercase hex
/// digits. The result is in qrexec's charset and never holds `__`.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b':' => out.push('+'),
            _ if plain(b) => out.push(b as char),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push('_');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
    }
    out
}

/// DEC, accepting only what [`encode`] produces (one encoding per byte string): `+` is `:`,
/// `_XX` (lowercase hex) is that byte if the encoding escapes it.
pub fn decode(text: &str) -> Result<Vec<u8>, IdentError> {
    let t = text.as_bytes();
    let mut out = Vec::with_capacity(t.len());
    let mut i = 0;
    while i < t.len() {
        let byte = match t[i] {
            b'+' => b':',
            b if plain(b) => b,
            b'_' => {
                let digit =
                    |j: usize| t.get(j).and_then(|&d| (d as char).to_digit(16).filter(|_| !d.is_ascii_uppercase()));
                let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) else {
                    return Err(IdentError::Malformed { at: i });
                };
                let b = (hi << 4 | lo) as u8;
                if plain(b) || b == b':' {
                    return Err(IdentError::Malformed { at: i });
                }
                i += 2;
                b
            }
            _ => return Err(IdentError::Malformed { at: i }),
        };
        out.push(byte);
        i += 1;
    }
    Ok(out)
}

impl Ident {
    /// The id form: `id` must be non-empty printable ASCII, and not start with `desc:`.
    pub fn id(id: &str) -> Result<Ident, IdentError> {
        if id.is_empty() {
            return Err(IdentError::Empty);
        }
        if let Some(&b) = id.as_bytes().iter().find(|&&b| !(0x20..=0x7e).contains(&b)) {
            return Err(IdentError::NotPrintable(b));
        }
        if id.starts_with("desc:") {
            return Err(IdentError::LooksLikeDesc);
        }
        Ident::bounded(encode(id.as_bytes()))
    }

    /// The desc form: `desc+` and the encoded, non-empty, desc.
    pub fn desc(desc: &[u8]) -> Result<Ident, IdentError> {
        if desc.is_empty() {
            return Err(IdentError::Empty);
        }
        Ident::bounded(format!("{DESC_PREFIX}{}", encode(desc)))
    }

    fn bounded(text: String) -> Result<Ident, IdentError> {
        if text.len() > MAX_IDENT { Err(IdentError::TooLong { len: text.len() }) } else { Ok(Ident(text)) }
    }

    /// Checks an encoded identity (as dom0 receives it): the rules [`Ident::id`] and
    /// [`Ident::desc`] follow, on the decoded bytes.
    pub fn parse(text: &str) -> Result<Ident, IdentError> {
        if text.len() > MAX_IDENT {
            return Err(IdentError::TooLong { len: text.len() });
        }
        match text.strip_prefix(DESC_PREFIX) {
            Some(rest) if decode(rest)?.is_empty() => Err(IdentError::Empty),
            Some(_) => Ok(Ident(text.to_owned())),
            None => {
                let id = String::from_utf8(decode(text)?)
                    .map_err(|e| IdentError::NotPrintable(e.as_bytes()[e.utf8_error().valid_up_to()]))?;
                Ident::id(&id)
            }
        }
    }

    /// The encoded identity, as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the identity says.
    pub fn decode(&self) -> Decoded {
        match self.0.strip_prefix(DESC_PREFIX) {
            Some(rest) => Decoded::Desc(decode(rest).unwrap_or_default()),
            None => Decoded::Id(String::from_utf8(decode(&self.0).unwrap_or_default()).unwrap_or_default()),
        }
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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

/// A validated request for dom0: attach device `dev` of `kind`, identified by `ident`, to
/// `qube` (or detach it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub service: &'static str,
    pub qube: String,
    pub dev: String,
    pub kind: Kind,
    /// The device's identity; None only for [`Call::bare`].
    pub ident: Option<Ident>,
}

impl Call {
    /// Checks both names and builds the call carrying `ident`; an unsafe name is refused,
    /// never rewritten.
    pub fn new(service: &'static str, qube: &str, kind: Kind, dev: &str, ident: Ident) -> Result<Call, CallError> {
        let mut call = Call::bare(service, qube, kind, dev)?;
        call.ident = Some(ident);
        Ok(call)
    }

    /// The old form without identity, `QUBE+__+DEV`, which dom0 refuses unless its allowlist
    /// entry allows it (`bare`): for dom0 handlers older than the identity, and for callers
    /// not yet passing one.
    pub fn bare(service: &'static str, qube: &str, kind: Kind, dev: &str) -> Result<Call, CallError> {
        check_qube(qube).map_err(|e| CallError::Qube(qube.to_owned(), e))?;
        let dev_check = match kind {
            Kind::Block => check_block(dev),
            Kind::Usb => check_busid(dev),
        };
        dev_check.map_err(|e| CallError::Device(dev.as_bytes().to_vec(), e))?;
        Ok(Call { service, qube: qube.to_owned(), dev: dev.to_owned(), kind, ident: None })
    }

    /// The qrexec service with its argument:
    /// `custom.USBDeviceAttach+QUBE+__+DEV+__+IDENT` (`+QUBE+__+DEV` for a bare call).
    pub fn service_arg(&self) -> String {
        match &self.ident {
            Some(ident) => format!("{}+{}+__+{}+__+{}", self.service, self.qube, self.dev, ident.as_str()),
            None => format!("{}+{}+__+{}", self.service, self.qube, self.dev),
        }
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
    /// The device's identity cannot be sent (longer than [`MAX_IDENT`] once encoded, or a
    /// device id that is not printable ASCII).
    Identity(IdentError),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use crate::log::Escaped;
        match self {
            CallError::Qube(q, e) => {
                write!(f, "qube name \"{}\" refused: {e}", Escaped(q.as_bytes()))
            }
            CallError::Device(d, e) => write!(f, "device name \"{}\" refused: {e}", Escaped(d)),
            CallError::Identity(e) => write!(f, "device identity refused: {e}"),
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

    fn ident(id: &str) -> Ident {
        Ident::id(id).unwrap()
    }

    #[test]
    fn calls_are_built_only_from_checked_names() {
        let id = ident("0781:5581:4C530001230101115543:u080650:1.0:1");
        let call = Call::new(ATTACH_SERVICE, "backup", Kind::Block, "sdb1", id.clone()).unwrap();
        assert_eq!(
            call.service_arg(),
            "custom.USBDeviceAttach+backup+__+sdb1+__+0781+5581+4C530001230101115543+u080650+1.0+1"
        );
        let call =
            Call::new(DETACH_SERVICE, "vault", Kind::Usb, "2-1.4", ident("1050:0407::u030101u030000u0b0000")).unwrap();
        assert_eq!(call.service_arg(), "custom.USBDeviceDetach+vault+__+2-1.4+__+1050+0407++u030101u030000u0b0000");
        assert_eq!(call.to_string(), call.service_arg());
        let bare = Call::bare(ATTACH_SERVICE, "work", Kind::Block, "sdb1").unwrap();
        assert_eq!(bare.service_arg(), "custom.USBDeviceAttach+work+__+sdb1");
        assert!(Call::new(ATTACH_SERVICE, "work", Kind::Usb, "sdb", id.clone()).is_err());
        assert!(Call::new(ATTACH_SERVICE, "work", Kind::Block, "2-1", id.clone()).is_err());
        assert!(Call::new(ATTACH_SERVICE, "dom0", Kind::Block, "sdb", id.clone()).is_err());
        let err = Call::new(ATTACH_SERVICE, "work", Kind::Block, "sd$(x)", id).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device name \"sd$(x)\" refused: '$' is not allowed (qrexec would rewrite it to '_')"
        );
    }

    #[test]
    fn identities_encode_as_the_contract_says() {
        // IDENTITY.md §2's examples: a stick with a serial, one without.
        assert_eq!(ident("46f4:0001::u080650:1.0:1").as_str(), "46f4+0001++u080650+1.0+1");
        assert_eq!(ident("0000:0000::?******:1.0").as_str(), "0000+0000++_3f_2a_2a_2a_2a_2a_2a+1.0");
        assert_eq!(ident(":0").as_str(), "+0");
        assert_eq!(ident(":None").as_str(), "+None");
        // Hostile serials: every byte that is not plain is escaped, `_` included.
        assert_eq!(ident("0781:5581:a b+c_d\\x41~:u080650").as_str(), "0781+5581+a_20b_2bc_5fd_5cx41_7e+u080650");
        assert_eq!(Ident::desc(b"0781:5581 San Disk\xff").unwrap().as_str(), "desc+0781+5581_20San_20Disk_ff");
        assert_eq!(Ident::desc(b"\x00\x7f\x80").unwrap().as_str(), "desc+_00_7f_80");
    }

    #[test]
    fn identities_are_refused_never_rewritten() {
        assert_eq!(Ident::id(""), Err(IdentError::Empty));
        assert_eq!(Ident::desc(b""), Err(IdentError::Empty));
        assert_eq!(Ident::id("0781:5581:caf\u{e9}:"), Err(IdentError::NotPrintable(0xc3)));
        assert_eq!(Ident::id("0781:5581:a\tb:"), Err(IdentError::NotPrintable(b'\t')));
        assert_eq!(Ident::id("desc:x:y:z"), Err(IdentError::LooksLikeDesc));
        assert!(Ident::id("desc+x:y:z").is_ok(), "`+` encodes as `_2b`, so this cannot read as a desc");
        assert_eq!(Ident::id(&"A".repeat(MAX_IDENT)).unwrap().as_str().len(), MAX_IDENT);
        assert_eq!(Ident::id(&"A".repeat(MAX_IDENT + 1)), Err(IdentError::TooLong { len: MAX_IDENT + 1 }));
        // 683 escaped bytes are 2049 encoded bytes: refused on the encoded length.
        assert_eq!(Ident::id(&"_".repeat(683)), Err(IdentError::TooLong { len: 2049 }));
        assert_eq!(Ident::desc(&[0xff; 681]).unwrap().as_str().len(), MAX_IDENT);
        assert_eq!(Ident::desc(&[0xff; 682]), Err(IdentError::TooLong { len: 5 + 3 * 682 }));
        assert_eq!(
            Ident::id("desc:").unwrap_err().to_string(),
            "device id starts with \"desc:\" and would read as a desc"
        );
    }

    #[test]
    fn decoding_accepts_only_the_encoding() {
        assert_eq!(decode("0781+5581_20x").unwrap(), b"0781:5581 x");
        for (bad, at) in [
            ("_4", 0),
            ("_4g", 0),
            ("a_41", 1),
            ("_3A", 0),
            ("_3a", 0),
            ("a b", 1),
            ("__", 0),
            ("x_", 1),
            ("_2B", 0),
            ("\u{e9}", 0),
        ] {
            assert_eq!(decode(bad), Err(IdentError::Malformed { at }), "{bad:?}");
        }
        assert_eq!(
            Ident::parse("0781+5581++u080650+1.0+1").unwrap().decode(),
            Decoded::Id("0781:5581::u080650:1.0:1".into())
        );
        assert_eq!(Ident::parse("desc+0781+5581_20x").unwrap().decode(), Decoded::Desc(b"0781:5581 x".to_vec()));
        assert_eq!(Ident::parse("desc+"), Err(IdentError::Empty));
        assert_eq!(Ident::parse(""), Err(IdentError::Empty));
        assert_eq!(Ident::parse("ab_ff"), Err(IdentError::NotPrintable(0xff)));
        assert_eq!(Ident::parse("ab_09"), Err(IdentError::NotPrintable(b'\t')));
        assert_eq!(Ident::parse(&"a".repeat(MAX_IDENT + 1)), Err(IdentError::TooLong { len: MAX_IDENT + 1 }));
    }

    /// A small deterministic generator (xorshift64*), so the property test needs no crate and
    /// fails the same way every time.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self, max: usize, alphabet: &[u8]) -> Vec<u8> {
            let len = self.next() as usize % (max + 1);
            (0..len).map(|_| alphabet[self.next() as usize % alphabet.len()]).collect()
        }
    }

    /// dom0's split (IDENTITY.md §2): the target before the first `+__+`, DEV up to the
    /// second, IDENT the rest.
    fn split(arg: &str) -> Option<(&str, &str, &str)> {
        let (qube, rest) = arg.split_once("+__+")?;
        let (dev, ident) = rest.split_once("+__+")?;
        Some((qube, dev, ident))
    }

    #[test]
    fn encoding_round_trips_and_splits_unambiguously() {
        let all: Vec<u8> = (0..=255).collect();
        let tricky = b"_+:.-aZ09 \\x41";
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let qube_chars = b"abcXYZ019_.-";
        let dev_chars = b"sdab019_-";
        for round in 0..20_000 {
            let alphabet: &[u8] = if round % 2 == 0 { &all } else { tricky };
            let bytes = rng.bytes(40, alphabet);
            let enc = encode(&bytes);
            assert_eq!(decode(&enc).unwrap(), bytes, "{bytes:?}");
            assert!(enc.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)), "{enc}");
            assert!(!enc.contains("__"), "{enc}");
            assert_eq!(encode(&decode(&enc).unwrap()), enc);
            let Ok(ident) = Ident::desc(&bytes) else {
                assert!(bytes.is_empty());
                continue;
            };
            assert_eq!(Ident::parse(ident.as_str()).as_ref(), Ok(&ident));
            assert_eq!(ident.decode(), Decoded::Desc(bytes.clone()));
            let qube = format!("q{}", String::from_utf8(rng.bytes(10, qube_chars)).unwrap());
            let dev = format!("s{}", String::from_utf8(rng.bytes(10, dev_chars)).unwrap());
            let Ok(call) = Call::new(ATTACH_SERVICE, &qube, Kind::Block, &dev, ident.clone()) else {
                continue;
            };
            let arg = call.service_arg();
            let arg = arg.strip_prefix("custom.USBDeviceAttach+").unwrap();
            assert_eq!(split(arg), Some((qube.as_str(), dev.as_str(), ident.as_str())), "{arg}");
            let printable: Vec<u8> = bytes.iter().map(|&b| 0x20 + b % 95).collect();
            let id = String::from_utf8(printable).unwrap();
            if let Ok(ident) = Ident::id(&id) {
                assert_eq!(ident.decode(), Decoded::Id(id.clone()));
                assert!(!ident.as_str().starts_with(DESC_PREFIX), "{id:?}");
                assert_eq!(Ident::parse(ident.as_str()), Ok(ident));
            }
        }
    }
}
