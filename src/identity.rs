//! Device identity: what binds the device a rule matched to the device dom0 attaches.
//!
//! The identity is Qubes' own device id (R4.3's `device_id`), computed exactly as qubesd
//! computes it from the records sys-usb publishes in qubesdb (contract: the project's
//! IDENTITY.md). A USB device's id is `VENDOR:PRODUCT:SERIAL:INTERFACES`
//! (`0781:5581:4C530001230101115543:u080650`); a block device's is its parent's id, `:`, and
//! the USB interface number or its own partition number (`...:u080650:1.0:1` for `sdb1` of
//! a stick, `:0` for `loop0`). dom0 attaches with `SRC:PORT:ID`, so qubesd itself refuses a
//! different device at that port.
//!
//! Three parts, read top to bottom:
//! 1. [`Records`]: the qubesdb records of a device and its parents, and [`device_id`], qubesd's
//!    algorithm over them (ported in `qubesd.rs`, odd corners included).
//! 2. [`from_sysfs`]: the records Qubes' R4.3 udev scripts would publish for a device,
//!    simulated from sysfs through a byte-for-byte replica of systemd's `usb_id` builtin
//!    (`udev.rs`). Used where there is no qubesdb (replay, `list`, `test`, `--no-qubesdb`)
//!    and as the expectation the published records are checked against.
//! 3. [`check`]: the published records against the simulated ones. R4.3 records must give the
//!    same id; R4.1/R4.2 records (no device ids there) give the desc form, after the checks
//!    their `desc` allows.
//!
//! The simulation assumes Qubes publishes the device's USB parent: it does not apply the
//! exclusions of `99-qubes-usb.rules` and `udev-usb-add-change` (hubs, `ID_VENDOR` "QEMU",
//! devices behind `vhci_hcd`, `QUBES_EXPORT_USB_DEVICE=0`). For a block device behind such a
//! USB device, qubesd's id starts with `0000:0000::?******`, so in Qubes mode the check does
//! not pass (a [`Verdict::Mismatch`] that names the unpublished parent) and nothing is
//! attached. It does not simulate the block `desc` either (udev's `ID_MODEL` and blkid's
//! `ID_FS_LABEL` through iconv): no id depends on it.

mod qubesd;
mod udev;

use std::fmt;

use crate::log::Escaped;
use crate::names::{Ident, IdentError};
use crate::sysfs::{MAX_ATTR, Sysfs};

pub use qubesd::{MAX_DEPTH, UNKNOWN_ID, device_id, partition_number};

/// Where a device is published: a USB device by bus id (`2-1.4`), a block device by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    Usb(String),
    Block(String),
}

impl Port {
    /// The qubesdb directory of the device's record: `/qubes-usb-devices/2-1_4/` (qubesdb
    /// keys hold no `.`, so Qubes writes `_`), `/qubes-block-devices/sdb1/`.
    pub fn qubesdb_dir(&self) -> String {
        match self {
            Port::Usb(busid) => format!("/qubes-usb-devices/{}/", qubesdb_ident(busid)),
            Port::Block(name) => format!("/qubes-block-devices/{name}/"),
        }
    }
}

/// The key Qubes' udev scripts write last when they publish (or withdraw) a device of this
/// kind, "meant to trigger watches": `/qubes-usb-devices` or `/qubes-block-devices`, written
/// empty after the record's keys, by every release's `udev-usb-add-change` and
/// `udev-block-add-change` (qubes-linux-utils). A check that runs after it sees a whole
/// record, never one whose `desc` is written and whose `interfaces` or `parent` is not yet.
pub const USB_TRIGGER: &str = "/qubes-usb-devices";
pub const BLOCK_TRIGGER: &str = "/qubes-block-devices";

/// The keys of a record (its directory) that identities depend on, `desc` first: the scripts
/// write it first, so without it nothing of the record is published yet.
pub fn record_keys(dir: &str) -> [&'static str; 2] {
    if dir.starts_with("/qubes-usb-devices/") { ["desc", "interfaces"] } else { ["desc", "parent"] }
}

/// A bus id as a qubesdb key component: `.` replaced by `_`.
pub fn qubesdb_ident(busid: &str) -> String {
    busid.replace('.', "_")
}

/// The keys of `/qubes-usb-devices/IDENT/` that identities depend on. None: key absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsbRecord {
    /// R4.3: `VID:PID VENDOR_ENC MODEL_ENC SERIAL_SHORT`; R4.1/R4.2: `VID:PID ID_SERIAL`.
    pub desc: Option<Vec<u8>>,
    /// R4.3 only (`:080650:`, possibly empty).
    pub interfaces: Option<Vec<u8>>,
}

/// The keys of `/qubes-block-devices/NAME/` that identities depend on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRecord {
    /// `MODEL (LABEL)`, a loop device's backing file, or a device-mapper name.
    pub desc: Option<Vec<u8>>,
    /// R4.3 only: `2-1.4:1.0` (USB interface), `sdb` (the disk of a partition), or empty.
    pub parent: Option<Vec<u8>>,
}

/// Which release's scripts wrote a record (R4.3 added the `interfaces` and `parent` keys,
/// qubes-linux-utils 3ad3bb2, and with them device ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// R4.3 and later: qubesd computes a device id.
    R43,
    /// R4.1, R4.2: only `desc` identifies the device.
    R41,
}

impl UsbRecord {
    pub fn format(&self) -> Format {
        if self.interfaces.is_some() { Format::R43 } else { Format::R41 }
    }
}

impl BlockRecord {
    pub fn format(&self) -> Format {
        if self.parent.is_some() { Format::R43 } else { Format::R41 }
    }
}

/// The records of a device and its parents, as qubesd would find them. A record that is
/// absent is not published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    usb: Vec<(String, UsbRecord)>,
    block: Vec<(String, BlockRecord)>,
}

impl Records {
    /// Adds (or replaces) the record of the USB device `busid` (`2-1.4` and `2-1_4` are the
    /// same record, as in qubesdb).
    pub fn insert_usb(&mut self, busid: &str, record: UsbRecord) {
        let key = qubesdb_ident(busid);
        self.usb.retain(|(k, _)| *k != key);
        self.usb.push((key, record));
    }

    pub fn insert_block(&mut self, name: &str, record: BlockRecord) {
        self.block.retain(|(k, _)| k != name);
        self.block.push((name.to_owned(), record));
    }

    pub fn usb(&self, busid: &str) -> Option<&UsbRecord> {
        let key = qubesdb_ident(busid);
        self.usb.iter().find(|(k, _)| *k == key).map(|(_, r)| r)
    }

    pub fn block(&self, name: &str) -> Option<&BlockRecord> {
        self.block.iter().find(|(k, _)| k == name).map(|(_, r)| r)
    }
}

/// Why qubesd would have no id for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    /// The device's own record is absent.
    NotPublished,
    /// An `interfaces` entry that is not hex digits: `DeviceInterface` raises `ProtocolError`.
    Interface(Vec<u8>),
    /// More than [`MAX_DEPTH`] parents, or a cycle (qubesd recurses until it fails).
    TooDeep,
    /// An R4.1/R4.2 record whose `desc` is empty: nothing identifies the device.
    EmptyDesc,
    /// The published id differs from the one sysfs gives, and sysfs cannot say what udev
    /// published: a manufacturer or product string overflowed `usb_id`'s 256-byte encoding
    /// buffer, after which systemd's output is undefined (an unterminated value, a stray NUL
    /// written past the buffer into the next property).
    UdevUndefined(String),
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::NotPublished => f.write_str("the device is not published in qubesdb"),
            IdError::Interface(e) => {
                write!(f, "interface entry \"{}\" is not hex digits: qubesd would fail on it", Escaped(e))
            }
            IdError::TooDeep => write!(f, "more than {MAX_DEPTH} parent records, or a loop of them"),
            IdError::EmptyDesc => f.write_str("the published desc is empty"),
            IdError::UdevUndefined(published) => write!(
                f,
                "published id \"{}\" cannot be checked: this device's manufacturer or product string overflows \
                 udev's usb_id buffer, whose output is then undefined",
                Escaped(published.as_bytes())
            ),
        }
    }
}

impl std::error::Error for IdError {}

/// What a call carries to name the device (IDENTITY.md §2): Qubes' device id, or, where
/// Qubes has no device ids (R4.1, R4.2), the published `desc` of the device's own record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A device id: printable ASCII (qubesd's sanitizing guarantees it).
    Id(String),
    /// The `desc` bytes, as published.
    Desc(Vec<u8>),
}

impl Identity {
    /// The identity as the call's last field; refused (never cut) when it does not fit.
    pub fn ident(&self) -> Result<Ident, IdentError> {
        match self {
            Identity::Id(id) => Ident::id(id),
            Identity::Desc(desc) => Ident::desc(desc),
        }
    }
}

impl fmt::Display for Identity {
    /// `id "0781:5581:4C53:u080650:1"` or `desc "0781:5581 SanDisk_Cruzer_4C53"`, escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Id(id) => write!(f, "id \"{}\"", Escaped(id.as_bytes())),
            Identity::Desc(desc) => write!(f, "desc \"{}\"", Escaped(desc)),
        }
    }
}

/// A device for people (logs, `list`, `test`): what [`Sysfs::identity`] shows (name,
/// vendor:product, strings and serial, escaped), then the identity a call carries when
/// there is no qubesdb to check against:
/// `sdb1 46f4:0001 "QEMU" "QEMU USB HARDDRIVE" serial "ABC" id "46f4:0001:ABC:u080650:1.0:1"`.
#[derive(Clone, Debug)]
pub struct Described {
    pub device: crate::sysfs::Identity,
    pub identity: Result<Identity, String>,
}

/// Reads what [`Described`] shows (allocates; for matched devices and commands).
pub fn describe(sysfs: &Sysfs, devpath: &str) -> Described {
    let identity = match from_sysfs(sysfs, devpath) {
        Ok(simulated) => simulated.identity().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    Described { device: sysfs.identity(devpath), identity }
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Ok(identity) => write!(f, "{} {identity}", self.device),
            Err(e) => write!(f, "{} (no identity: {e})", self.device),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The records Qubes' scripts would publish, from sysfs
// ---------------------------------------------------------------------------------------

/// The properties udev's `usb_id` gives a `usb_device` that Qubes' scripts publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsbProps {
    /// The device's bus id (`2-1.4`).
    pub busid: String,
    /// ID_VENDOR_ID, ID_MODEL_ID: the `idVendor` and `idProduct` attributes.
    pub vendor_id: Vec<u8>,
    pub model_id: Vec<u8>,
    /// ID_VENDOR_ENC, ID_MODEL_ENC. `Err` when udev's 256-byte buffer overflowed: udev's
    /// value is then this prefix followed by stray stack bytes, which no one can predict.
    pub vendor_enc: Result<Vec<u8>, Vec<u8>>,
    pub model_enc: Result<Vec<u8>, Vec<u8>>,
    /// ID_SERIAL_SHORT, when set.
    pub serial_short: Option<Vec<u8>>,
    /// ID_SERIAL (R4.1/R4.2 publish it).
    pub serial: Vec<u8>,
    /// ID_USB_INTERFACES, when set.
    pub interfaces: Option<Vec<u8>>,
}

impl UsbProps {
    /// Reads what `usb_id` reads: `idVendor`, `idProduct` (without them it sets nothing),
    /// `manufacturer`, `product`, `serial`, and one `read()` of `descriptors`.
    pub fn read(sysfs: &Sysfs, devpath: &str) -> UsbProps {
        let mut buf = [0u8; MAX_ATTR];
        let mut attr = |name: &str| sysfs.attr(devpath, name, &mut buf).ok().map(<[u8]>::to_vec);
        let busid = crate::uevent::kernel_name(devpath).to_owned();
        let (Some(vendor_id), Some(model_id)) = (attr("idVendor"), attr("idProduct")) else {
            // usb_id returns before it sets any property.
            let none = Vec::new;
            return UsbProps {
                busid,
                vendor_id: none(),
                model_id: none(),
                vendor_enc: Ok(none()),
                model_enc: Ok(none()),
                serial_short: None,
                serial: none(),
                interfaces: None,
            };
        };
        let (manufacturer, product, serial) = (attr("manufacturer"), attr("product"), attr("serial"));
        let serial_short = udev::serial_short(serial.as_deref());
        let vendor = udev::plain(manufacturer.as_deref(), &vendor_id);
        let model = udev::plain(product.as_deref(), &model_id);
        let interfaces = usb_interfaces(sysfs, devpath);
        UsbProps {
            vendor_enc: udev::enc(manufacturer.as_deref(), &vendor_id),
            model_enc: udev::enc(product.as_deref(), &model_id),
            serial: udev::id_serial(&vendor, &model, serial_short.as_deref()),
            busid,
            vendor_id,
            model_id,
            serial_short,
            interfaces,
        }
    }

    /// The record R4.3's `udev-usb-add-change` writes: `desc` is
    /// `"${ID_VENDOR_ID}:${ID_MODEL_ID} ${ID_VENDOR_ENC} ${ID_MODEL_ENC} ${ID_SERIAL_SHORT}"`
    /// (unset properties expand to nothing), `interfaces` is `"$ID_USB_INTERFACES"`.
    pub fn record(&self) -> UsbRecord {
        let enc = |e: &Result<Vec<u8>, Vec<u8>>| match e {
            Ok(v) | Err(v) => v.clone(),
        };
        let desc = [
            &self.vendor_id[..],
            b":",
            &self.model_id,
            b" ",
            &enc(&self.vendor_enc),
            b" ",
            &enc(&self.model_enc),
            b" ",
            self.serial_short.as_deref().unwrap_or_default(),
        ]
        .concat();
        UsbRecord { desc: Some(desc), interfaces: Some(self.interfaces.clone().unwrap_or_default()) }
    }

    /// False when udev's output for the device is undefined (an encoding overflowed its
    /// buffer): the record is then only the likeliest one.
    pub fn exact(&self) -> bool {
        self.vendor_enc.is_ok() && self.model_enc.is_ok()
    }

    /// R4.1/R4.2's `desc`: `"${ID_VENDOR_ID}:${ID_MODEL_ID} ${ID_SERIAL}"`.
    pub fn legacy_desc(&self) -> Vec<u8> {
        [&self.vendor_id[..], b":", &self.model_id, b" ", &self.serial].concat()
    }
}

/// udev's ID_USB_INTERFACES for the `usb_device` at `devpath` (None: not set), from one
/// `read()` of its `descriptors`, as `usb_id` reads it.
pub fn usb_interfaces(sysfs: &Sysfs, devpath: &str) -> Option<Vec<u8>> {
    let mut descriptors = [0u8; udev::DESCRIPTORS_READ];
    let n = sysfs.read_once(devpath, "descriptors", &mut descriptors).ok()?;
    udev::packed_interfaces(&descriptors[..n])
}

/// The records Qubes would publish for one device (and its parents), simulated from sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Simulated {
    pub port: Port,
    pub records: Records,
    /// The device's own udev properties, when it is a USB device.
    pub usb: Option<UsbProps>,
    /// False when udev's output for a USB device in the chain is undefined (see
    /// [`UsbProps::exact`]): the records are then the likeliest ones, not certain.
    pub exact: bool,
}

impl Simulated {
    /// The device id qubesd would compute from these records.
    pub fn device_id(&self) -> Result<String, IdError> {
        device_id(&self.records, &self.port)
    }

    /// The trigger keys to watch while this device's records are awaited: its own kind's,
    /// and for a block device on a USB device also the USB one (the parent's record is
    /// published by its own script, normally first).
    pub fn triggers(&self) -> &'static [&'static str] {
        match (&self.port, self.records.usb.is_empty()) {
            (Port::Usb(_), _) => &[USB_TRIGGER],
            (Port::Block(_), true) => &[BLOCK_TRIGGER],
            (Port::Block(_), false) => &[BLOCK_TRIGGER, USB_TRIGGER],
        }
    }

    /// The identity a call carries where there is no qubesdb to check against (when not
    /// [`exact`](Simulated::exact), the likeliest one: dom0's check refuses it if udev
    /// published otherwise).
    pub fn identity(&self) -> Result<Identity, IdError> {
        self.device_id().map(Identity::Id)
    }
}

/// Why sysfs gives no records for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimError {
    /// The device (or a parent it needs) is gone: its `uevent` file cannot be read.
    Gone(String),
    /// Neither a block device nor a `usb_device`: Qubes publishes no record for it.
    NotAttachable(String),
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Gone(dp) => write!(f, "{dp}: the device is gone"),
            SimError::NotAttachable(dp) => write!(f, "{dp}: neither a block device nor a USB device"),
        }
    }
}

impl std::error::Error for SimError {}

/// The records Qubes' R4.3 udev scripts would publish for the device at `devpath` (a block
/// device or a `usb_device`) and the parents its id depends on.
pub fn from_sysfs(sysfs: &Sysfs, devpath: &str) -> Result<Simulated, SimError> {
    let uevent = sysfs.uevent_file(devpath).map_err(|_| SimError::Gone(devpath.to_owned()))?;
    let mut buf = [0u8; MAX_ATTR];
    match sysfs.link(devpath, "subsystem", &mut buf) {
        Some(b"block") => {
            let mut records = Records::default();
            let mut exact = true;
            let name = simulate_block(sysfs, devpath, &uevent, &mut records, &mut exact, 0)?;
            Ok(Simulated { port: Port::Block(name), records, usb: None, exact })
        }
        Some(b"usb") if prop(&uevent, "DEVTYPE") == Some(b"usb_device") => {
            let props = UsbProps::read(sysfs, devpath);
            let mut records = Records::default();
            records.insert_usb(&props.busid, props.record());
            Ok(Simulated { port: Port::Usb(props.busid.clone()), records, exact: props.exact(), usb: Some(props) })
        }
        _ => Err(SimError::NotAttachable(devpath.to_owned())),
    }
}

/// `udev-block-add-change`: records the block device under `${DEVNAME#/dev/}` with its
/// `parent`, then (recursively) the disk of a partition, or the USB device of the interface
/// the disk hangs from. Returns the name.
fn simulate_block(
    sysfs: &Sysfs,
    devpath: &str,
    uevent: &[u8],
    records: &mut Records,
    exact: &mut bool,
    depth: usize,
) -> Result<String, SimError> {
    let name = prop(uevent, "DEVNAME")
        .map_or_else(|| crate::uevent::kernel_name(devpath).to_owned(), |n| String::from_utf8_lossy(n).into_owned());
    let partition = sysfs.exists(devpath, "partition");
    let parent = script_parent(devpath, partition);
    if partition {
        let disk = dirname(devpath);
        let disk_uevent = sysfs.uevent_file(disk).map_err(|_| SimError::Gone(disk.to_owned()))?;
        if depth < MAX_DEPTH {
            simulate_block(sysfs, disk, &disk_uevent, records, exact, depth + 1)?;
        }
    } else if let Some((ident, _)) = parent.split_once(':') {
        if let Some(usb) = usb_parent(sysfs, devpath, ident) {
            let props = UsbProps::read(sysfs, usb);
            *exact &= props.exact();
            records.insert_usb(ident, props.record());
        }
    }
    records.insert_block(&name, BlockRecord { desc: None, parent: Some(parent.into_bytes()) });
    Ok(name)
}

/// The script's `parent`: the disk's name for a partition (`basename "$(dirname
/// "$DEVPATH")"`), else, when the devpath holds `/host`, the name of the directory above the
/// first `/host` (a USB interface such as `2-1.4:1.0`, or `ata1`), else empty.
fn script_parent(devpath: &str, partition: bool) -> String {
    let named = if partition {
        dirname(devpath)
    } else if let Some(at) = devpath.find("/host") {
        &devpath[..at]
    } else {
        return String::new();
    };
    crate::uevent::kernel_name(named).to_owned()
}

/// The `usb_device` named `ident` that holds the interface a disk at `devpath` hangs from.
fn usb_parent<'d>(sysfs: &Sysfs, devpath: &'d str, ident: &str) -> Option<&'d str> {
    let interface = &devpath[..devpath.find("/host")?];
    let usb = dirname(interface);
    let mut buf = [0u8; MAX_ATTR];
    let is_usb_device = sysfs.link(usb, "subsystem", &mut buf) == Some(b"usb") && sysfs.exists(usb, "idVendor");
    (crate::uevent::kernel_name(usb) == ident && is_usb_device).then_some(usb)
}

fn dirname(devpath: &str) -> &str {
    devpath.rfind('/').map_or("", |i| &devpath[..i])
}

/// A `KEY=value` line of a `uevent` file.
fn prop<'u>(uevent: &'u [u8], key: &str) -> Option<&'u [u8]> {
    uevent.split(|&b| b == b'\n').find_map(|l| l.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
}

// ---------------------------------------------------------------------------------------
// The published records, checked against the simulated ones
// ---------------------------------------------------------------------------------------

/// Reading qubesdb: what the agent's client offers (`src/qubesdb.rs`), or a stand-in.
pub trait QubesDbRead {
    type Error;
    /// The value of `key`, None if it does not exist.
    fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, Self::Error>;
    /// Every key under `prefix` (full paths) with its value.
    fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Self::Error>;
}

/// What the published records say about the device the rule matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send this identity: the id the R4.3 records give equals the one sysfs gives, or the
    /// R4.1/R4.2 `desc` passed the checks there are.
    Send(Identity),
    /// No record for the device yet: wait for its publication.
    Unpublished,
    /// The records describe another device (a stale record, a swap, an unpublished USB
    /// parent): keep waiting for this device's; at the timeout, log both.
    Mismatch { expected: String, published: String },
    /// Published, but no identity can be had from the records.
    Unverifiable(IdError),
}

/// Reads the published records of the device at `expected.port` and checks them against
/// the records sysfs gives (IDENTITY.md §1, "With qubesdb").
pub fn check<Q: QubesDbRead>(db: &mut Q, expected: &Simulated) -> Result<Verdict, Q::Error> {
    let published = read_published(db, &expected.port)?;
    Ok(verify(&published, expected))
}

/// The records published for `port` and for the parents qubesd would look up (at most
/// [`MAX_DEPTH`] of them), each read with one multiread of its directory.
pub fn read_published<Q: QubesDbRead>(db: &mut Q, port: &Port) -> Result<Records, Q::Error> {
    let mut records = Records::default();
    let mut name = match port {
        Port::Usb(busid) => {
            if let Some(record) = read_usb(db, busid)? {
                records.insert_usb(busid, record);
            }
            return Ok(records);
        }
        Port::Block(name) => name.clone(),
    };
    for _ in 0..=MAX_DEPTH {
        let Some(record) = read_block(db, &name)? else { break };
        let parent = qubesd::parent_of(&record);
        records.insert_block(&name, record);
        match parent {
            Some((ident, Some(_))) => {
                if let Some(usb) = read_usb(db, &ident)? {
                    records.insert_usb(&ident, usb);
                }
                break;
            }
            Some((ident, None)) if records.block(&ident).is_none() => name = ident,
            _ => break,
        }
    }
    Ok(records)
}

fn read_usb<Q: QubesDbRead>(db: &mut Q, busid: &str) -> Result<Option<UsbRecord>, Q::Error> {
    let keys = read_dir(db, &Port::Usb(busid.to_owned()))?;
    Ok(keys.map(|keys| UsbRecord { desc: value(&keys, "desc"), interfaces: value(&keys, "interfaces") }))
}

fn read_block<Q: QubesDbRead>(db: &mut Q, name: &str) -> Result<Option<BlockRecord>, Q::Error> {
    let keys = read_dir(db, &Port::Block(name.to_owned()))?;
    Ok(keys.map(|keys| BlockRecord { desc: value(&keys, "desc"), parent: value(&keys, "parent") }))
}

/// The keys of a record directory, relative to it; None when there are none (not published)
/// or when its path is one qubesdb refuses (`verify_path` in qubes-core-qubesdb
/// `daemon/db-cmds.c`), since nothing can be published there.
fn read_dir<Q: QubesDbRead>(db: &mut Q, port: &Port) -> Result<Option<Keys>, Q::Error> {
    let dir = port.qubesdb_dir();
    let valid = |c: u8| c.is_ascii_alphanumeric() || b"-_/.:@".contains(&c);
    if dir.len() >= 64 || !dir.bytes().all(valid) {
        return Ok(None);
    }
    let keys: Keys = db
        .multiread(&dir)?
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(dir.as_str())?.to_owned(), v)))
        .collect();
    Ok((!keys.is_empty()).then_some(keys))
}

/// Keys of a record directory (relative) with their values.
type Keys = Vec<(String, Vec<u8>)>;

fn value(keys: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    keys.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// The pure half of [`check`]: `published` (read from qubesdb) against `expected`.
pub fn verify(published: &Records, expected: &Simulated) -> Verdict {
    let format = match &expected.port {
        Port::Usb(busid) => published.usb(busid).map(UsbRecord::format),
        Port::Block(name) => published.block(name).map(BlockRecord::format),
    };
    match format {
        None => Verdict::Unpublished,
        Some(Format::R43) => verify_id(published, expected),
        Some(Format::R41) => verify_desc(published, expected),
    }
}

fn verify_id(published: &Records, expected: &Simulated) -> Verdict {
    let (have, want) = match (device_id(published, &expected.port), expected.device_id()) {
        (Ok(have), Ok(want)) => (have, want),
        (Err(e), _) | (_, Err(e)) => return Verdict::Unverifiable(e),
    };
    if have == want {
        return Verdict::Send(Identity::Id(have));
    }
    if !expected.exact {
        return Verdict::Unverifiable(IdError::UdevUndefined(have));
    }
    let mut shown = format!("id \"{}\"", Escaped(have.as_bytes()));
    for (ident, _) in expected.records.usb.iter().filter(|(ident, _)| published.usb(ident).is_none()) {
        shown.push_str(&format!(
            " (qubesdb has no /qubes-usb-devices/{ident}/: not yet, or Qubes' udev rules exclude it)"
        ));
    }
    Verdict::Mismatch { expected: format!("id \"{}\"", Escaped(want.as_bytes())), published: shown }
}

/// R4.1/R4.2: the published `desc` is the identity. A USB device's must start with
/// `VID:PID ` and, when it has a serial, end with `_` and ID_SERIAL_SHORT; a block device's
/// (model and filesystem label) cannot be checked against sysfs.
fn verify_desc(published: &Records, expected: &Simulated) -> Verdict {
    let desc = match &expected.port {
        Port::Usb(busid) => published.usb(busid).and_then(|r| r.desc.as_deref()),
        Port::Block(name) => published.block(name).and_then(|r| r.desc.as_deref()),
    };
    let Some(desc) = desc else { return Verdict::Unpublished };
    if desc.is_empty() {
        return Verdict::Unverifiable(IdError::EmptyDesc);
    }
    if let Some(usb) = &expected.usb {
        let prefix = [&usb.vendor_id[..], b":", &usb.model_id, b" "].concat();
        let suffix = usb.serial_short.as_ref().map(|s| [&b"_"[..], s].concat()).unwrap_or_default();
        if !desc.starts_with(&prefix) || !desc.ends_with(&suffix) {
            return Verdict::Mismatch {
                expected: format!("desc \"{}...{}\"", Escaped(&prefix), Escaped(&suffix)),
                published: format!("desc \"{}\"", Escaped(desc)),
            };
        }
    }
    Verdict::Send(Identity::Desc(desc.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{ATTACH_SERVICE, Call, Kind};
    use crate::testing::{STICK_DISK, STICK_PART, STICK_USB, Tree, usb_descriptors};
    use std::collections::BTreeMap;

    const ROOT_HUB: &str = "/devices/pci0000:00/0000:00:14.0/usb2";

    fn id(tree: &Tree, devpath: &str) -> String {
        from_sysfs(&Sysfs::new(tree.root()).unwrap(), devpath).unwrap().device_id().unwrap()
    }

    fn call(tree: &Tree, devpath: &str, dev: &str) -> String {
        let ident = Ident::id(&id(tree, devpath)).unwrap();
        Call::new(ATTACH_SERVICE, "backup", Kind::Block, dev, ident).unwrap().service_arg()
    }

    /// A USB device `busid` under `parent`, with a mass-storage interface and a disk `disk`
    /// (and its partition `disk`1) on SCSI host `host`.
    fn usb_disk(t: &Tree, parent: &str, busid: &str, attrs: &[(&str, &[u8])], host: u8, disk: &str) {
        let usb = format!("{parent}/{busid}");
        let mut all: Vec<(&str, &[u8])> = vec![("idVendor", b"0781\n"), ("idProduct", b"5581\n")];
        all.extend_from_slice(attrs);
        t.device(&usb, "usb", "DEVTYPE=usb_device\nDRIVER=usb\nTYPE=0/0/0\n", Some("usb"), &all);
        let interface = format!("{usb}/{busid}:1.0");
        t.device(&interface, "usb", "DEVTYPE=usb_interface\nINTERFACE=8/6/80\n", Some("usb-storage"), &[]);
        let scsi = format!("{interface}/host{host}/target{host}:0:0/{host}:0:0:0");
        t.device(&format!("{interface}/host{host}"), "scsi", "DEVTYPE=scsi_host\n", None, &[]);
        t.device(&format!("{interface}/host{host}/target{host}:0:0"), "scsi", "DEVTYPE=scsi_target\n", None, &[]);
        t.device(&scsi, "scsi", "DEVTYPE=scsi_device\n", Some("sd"), &[]);
        t.device(&format!("{scsi}/block/{disk}"), "block", &format!("DEVNAME={disk}\nDEVTYPE=disk\n"), None, &[]);
        t.device(
            &format!("{scsi}/block/{disk}/{disk}1"),
            "block",
            &format!("DEVNAME={disk}1\nDEVTYPE=partition\nPARTN=1\n"),
            None,
            &[("partition", b"1\n")],
        );
    }

    #[test]
    fn a_stick_its_disk_and_its_partition() {
        let t = Tree::stick(b"4C530001230101115543");
        let sysfs = Sysfs::new(t.root()).unwrap();
        let part = from_sysfs(&sysfs, STICK_PART).unwrap();
        assert_eq!(part.port, Port::Block("sdb1".into()));
        assert_eq!(part.records.block("sdb1").unwrap().parent.as_deref(), Some(&b"sdb"[..]));
        assert_eq!(part.records.block("sdb").unwrap().parent.as_deref(), Some(&b"2-1:1.0"[..]));
        let usb = part.records.usb("2-1").unwrap();
        assert_eq!(usb.desc.as_deref(), Some(&b"46f4:0001 QEMU QEMU\\x20USB\\x20HARDDRIVE 4C530001230101115543"[..]));
        assert_eq!(usb.interfaces.as_deref(), Some(&b":080650:"[..]));
        assert_eq!(part.device_id().unwrap(), "46f4:0001:4C530001230101115543:u080650:1.0:1");
        assert_eq!(id(&t, STICK_DISK), "46f4:0001:4C530001230101115543:u080650:1.0");
        let device = from_sysfs(&sysfs, STICK_USB).unwrap();
        assert_eq!(device.port, Port::Usb("2-1".into()));
        assert_eq!(device.device_id().unwrap(), "46f4:0001:4C530001230101115543:u080650");
        let props = device.usb.unwrap();
        assert_eq!(props.serial, b"QEMU_QEMU_USB_HARDDRIVE_4C530001230101115543");
        assert_eq!(props.legacy_desc(), b"46f4:0001 QEMU_QEMU_USB_HARDDRIVE_4C530001230101115543");
        assert_eq!(sysfs.usb_interfaces(STICK_USB), ":080650:");
    }

    /// qubes-app-linux-usb-proxy `qubesusbproxy/tests.py`: the gadget made by
    /// `GADGET_PREPARE` (idVendor/idProduct 0x1234, serial 0123456789, one mass-storage
    /// function) is listed as `BACKEND:PORT:1234:1234:0123456789:u080650`.
    #[test]
    fn qubes_usb_proxy_gadget() {
        let t = Tree::stick(b"0123456789");
        let usb = t.root().join(&STICK_USB[1..]);
        std::fs::write(usb.join("idVendor"), "1234\n").unwrap();
        std::fs::write(usb.join("idProduct"), "1234\n").unwrap();
        std::fs::write(usb.join("manufacturer"), "Qubes\n").unwrap();
        std::fs::write(usb.join("product"), "Test device\n").unwrap();
        assert_eq!(id(&t, STICK_USB), "1234:1234:0123456789:u080650");
    }

    #[test]
    fn two_sticks_that_differ_only_in_serial() {
        let (a, b) = (Tree::stick(b"4C530001230101115543"), Tree::stick(b"4C530001230101115544"));
        assert_ne!(id(&a, STICK_PART), id(&b, STICK_PART));
        assert_ne!(call(&a, STICK_PART, "sdb1"), call(&b, STICK_PART, "sdb1"));
        assert_eq!(
            call(&a, STICK_PART, "sdb1"),
            "custom.USBDeviceAttach+backup+__+sdb1+__+46f4+0001+4C530001230101115543+u080650+1.0+1"
        );
    }

    /// Without a serial the id has an empty serial field: `VID:PID::INTERFACES...`, the same
    /// every time and for every stick of that model (IDENTITY.md §2). A serial udev ignores
    /// (a `,`, a byte outside 0x20-0x7f) or that is only spaces counts as none.
    #[test]
    fn a_stick_without_serial() {
        let t = Tree::stick(b"x");
        std::fs::remove_file(t.root().join(&STICK_USB[1..]).join("serial")).unwrap();
        let want = "46f4:0001::u080650:1.0:1";
        assert_eq!(id(&t, STICK_PART), want);
        assert_eq!(id(&t, STICK_PART), want, "stable");
        assert_eq!(call(&t, STICK_PART, "sdb1"), "custom.USBDeviceAttach+backup+__+sdb1+__+46f4+0001++u080650+1.0+1");
        for ignored in [&b"12,34"[..], b"caf\xc3\xa9", b"   ", b"a\tb"] {
            assert_eq!(id(&Tree::stick(ignored), STICK_PART), want, "{ignored:?}");
        }
        // Nor does a missing `descriptors`: Qubes then has no interfaces either.
        std::fs::remove_file(t.root().join(&STICK_USB[1..]).join("descriptors")).unwrap();
        assert_eq!(id(&t, STICK_PART), "46f4:0001::?******:1.0:1");
    }

    #[test]
    fn hostile_serials_never_break_the_call() {
        for (serial, in_id) in [
            (&b"A B  C"[..], "A_B_C"),
            (b"a:b", "a:b"),
            (b"a+b_c", "a+b_c"),
            (b"$(reboot)/`x`;|&\"'", "__reboot___x______"),
            (b"\\x41BC", "ABC"),
            (b"\\x3a\\x20\\x2b", ": +"),
            (b"\\xff\\xZZ\\x4", "__"),
            (b"\x7f", "_"),
        ] {
            let t = Tree::stick(serial);
            let id = id(&t, STICK_PART);
            assert_eq!(id, format!("46f4:0001:{in_id}:u080650:1.0:1"), "{serial:?}");
            let arg = call(&t, STICK_PART, "sdb1");
            let ident = arg.splitn(3, "+__+").nth(2).unwrap();
            assert!(ident.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)), "{arg}");
            assert_eq!(Ident::parse(ident).unwrap().decode(), crate::names::Decoded::Id(id), "{arg}");
        }
        // Qubes' own sanitizing makes `\x41BC` and `ABC` the same id: a limit of the id, not of
        // its encoding.
        assert_eq!(id(&Tree::stick(b"\\x41BC"), STICK_PART), id(&Tree::stick(b"ABC"), STICK_PART));
        // udev keeps 511 bytes of a serial, which still fits; the kernel never serves more
        // than 126 characters.
        let long = id(&Tree::stick(&[b'7'; 600]), STICK_PART);
        assert_eq!(long.len(), "46f4:0001::u080650:1.0:1".len() + 511);
        assert!(Ident::id(&long).is_ok());
        let escaped = Tree::stick(&[b'_'; 600]);
        assert_eq!(Ident::id(&id(&escaped, STICK_PART)).unwrap().as_str().len(), 10 + 511 * 3 + 14);
        // With udev's 72 interfaces as well, it no longer fits: refused, not cut.
        let many: Vec<_> = (0..80).map(|i| (0xff, i, 0, 1)).collect();
        std::fs::write(escaped.root().join(&STICK_USB[1..]).join("descriptors"), usb_descriptors(&many)).unwrap();
        let id = id(&escaped, STICK_PART);
        assert_eq!(id.len(), 10 + 511 + 1 + 72 * 7 + 6);
        assert_eq!(Ident::id(&id), Err(crate::names::IdentError::TooLong { len: 10 + 511 * 3 + 1 + 72 * 7 + 6 }));
    }

    #[test]
    fn a_disk_on_a_hub() {
        let t = Tree::stick(b"x");
        let hub = format!("{ROOT_HUB}/2-2");
        t.device(
            &hub,
            "usb",
            "DEVTYPE=usb_device\nTYPE=9/0/1\n",
            Some("usb"),
            &[
                ("idVendor", b"05e3\n"),
                ("idProduct", b"0610\n"),
                ("bDeviceClass", b"09\n"),
                ("descriptors", &usb_descriptors(&[(9, 0, 1, 1)])),
            ],
        );
        let descriptors = usb_descriptors(&[(8, 6, 0x50, 2)]);
        usb_disk(&t, &hub, "2-2.4", &[("serial", b"AA01\n"), ("descriptors", &descriptors)], 7, "sdc");
        let disk = format!("{hub}/2-2.4/2-2.4:1.0/host7/target7:0:0/7:0:0:0/block/sdc");
        let sysfs = Sysfs::new(t.root()).unwrap();
        let sim = from_sysfs(&sysfs, &format!("{disk}/sdc1")).unwrap();
        assert_eq!(sim.records.block("sdc").unwrap().parent.as_deref(), Some(&b"2-2.4:1.0"[..]));
        assert_eq!(sim.device_id().unwrap(), "0781:5581:AA01:u080650:1.0:1");
        assert!(sim.records.usb("2-2_4").is_some(), "published as 2-2_4");
        assert_eq!(Port::Usb("2-2.4".into()).qubesdb_dir(), "/qubes-usb-devices/2-2_4/");
        assert_eq!(id(&t, &format!("{hub}/2-2.4")), "0781:5581:AA01:u080650");
        assert_eq!(id(&t, &hub), "05e3:0610::u090001");
    }

    #[test]
    fn loop_zram_and_names_without_a_number() {
        let t = Tree::new();
        for name in ["loop0", "loop200", "zram0", "vdisk"] {
            t.device(
                &format!("/devices/virtual/block/{name}"),
                "block",
                &format!("DEVNAME={name}\nDEVTYPE=disk\n"),
                None,
                &[],
            );
        }
        assert_eq!(id(&t, "/devices/virtual/block/loop0"), ":0");
        assert_eq!(id(&t, "/devices/virtual/block/loop200"), ":200");
        assert_eq!(id(&t, "/devices/virtual/block/zram0"), ":0");
        assert_eq!(id(&t, "/devices/virtual/block/vdisk"), ":None");
        let sysfs = Sysfs::new(t.root()).unwrap();
        let sim = from_sysfs(&sysfs, "/devices/virtual/block/loop0").unwrap();
        assert_eq!(sim.records.block("loop0").unwrap().parent.as_deref(), Some(&b""[..]), "R4.3 writes it empty");
        assert_eq!(Ident::id(":0").unwrap().as_str(), "+0");
    }

    #[test]
    fn a_sata_disk_has_an_unpublished_parent() {
        let t = Tree::new();
        let disk = "/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda";
        t.device(disk, "block", "DEVNAME=sda\nDEVTYPE=disk\n", None, &[]);
        t.device(&format!("{disk}/sda2"), "block", "DEVNAME=sda2\nDEVTYPE=partition\n", None, &[("partition", b"2\n")]);
        assert_eq!(id(&t, disk), "0000:0000::?******:None");
        assert_eq!(id(&t, &format!("{disk}/sda2")), "0000:0000::?******:None:2");
    }

    #[test]
    fn strings_udev_cannot_encode_whole() {
        let t = Tree::stick(b"S1");
        let usb = t.root().join(&STICK_USB[1..]);
        std::fs::write(usb.join("product"), format!("{}\n", " x".repeat(70))).unwrap();
        std::fs::remove_file(usb.join("manufacturer")).unwrap();
        let sim = from_sysfs(&Sysfs::new(t.root()).unwrap(), STICK_USB).unwrap();
        let props = sim.usb.as_ref().unwrap();
        assert_eq!(props.vendor_enc, Ok(b"46f4".to_vec()), "no manufacturer: idVendor");
        assert_eq!(props.model_enc.as_ref().unwrap_err().len(), 255);
        assert!(!props.exact() && !sim.exact);
        assert_eq!(sim.device_id().unwrap(), "46f4:0001:S1:u080650", "the likeliest id");
        // What udev published is undefined: systemd 252 as Debian builds it writes its stray
        // NUL over ID_USB_INTERFACES. A published id that differs cannot be checked.
        let mut db = Db::default();
        db.set_usb("2-1", &UsbRecord { desc: Some(b"46f4:0001 46f4 x S1".to_vec()), interfaces: Some(Vec::new()) });
        assert_eq!(
            check(&mut db, &sim),
            Ok(Verdict::Unverifiable(IdError::UdevUndefined("46f4:0001:S1:?******".into())))
        );
        db.publish(&sim);
        assert_eq!(check(&mut db, &sim), Ok(Verdict::Send(Identity::Id("46f4:0001:S1:u080650".into()))));
    }

    #[test]
    fn only_block_and_usb_devices_have_records() {
        let t = Tree::stick(b"S1");
        let sysfs = Sysfs::new(t.root()).unwrap();
        let interface = format!("{STICK_USB}/2-1:1.0");
        assert_eq!(from_sysfs(&sysfs, &interface), Err(SimError::NotAttachable(interface.clone())));
        assert_eq!(from_sysfs(&sysfs, "/devices/gone"), Err(SimError::Gone("/devices/gone".into())));
        // No idVendor: usb_id sets nothing, and the script writes `:   `.
        std::fs::remove_file(t.root().join(&STICK_USB[1..]).join("idVendor")).unwrap();
        let sim = from_sysfs(&sysfs, STICK_USB).unwrap();
        assert_eq!(sim.records.usb("2-1").unwrap().desc.as_deref(), Some(&b":   "[..]));
        assert_eq!(sim.device_id().unwrap(), ":::?******");
    }

    #[test]
    fn people_see_the_identity() {
        let t = Tree::stick(b"AB\"C");
        let sysfs = Sysfs::new(t.root()).unwrap();
        assert_eq!(
            describe(&sysfs, STICK_PART).to_string(),
            "sdb1 46f4:0001 \"QEMU\" \"QEMU USB HARDDRIVE\" serial \"AB\\\"C\" id \"46f4:0001:AB_C:u080650:1.0:1\""
        );
        let interface = format!("{STICK_USB}/2-1:1.0");
        assert!(
            describe(&sysfs, &interface).to_string().ends_with(
                "(no identity: {interface}: neither a block device nor a USB device)"
                    .replace("{interface}", &interface)
                    .as_str()
            )
        );
        assert_eq!(Identity::Desc(b"46f4:0001 Q\xff".to_vec()).to_string(), "desc \"46f4:0001 Q\\xff\"");
    }

    /// qubesdb as a map; `fail` makes every read fail.
    #[derive(Default)]
    struct Db {
        keys: BTreeMap<String, Vec<u8>>,
        fail: bool,
    }

    impl Db {
        fn publish(&mut self, sim: &Simulated) {
            for (ident, r) in &sim.records.usb {
                self.set_usb(ident, r);
            }
            for (name, r) in &sim.records.block {
                let dir = format!("/qubes-block-devices/{name}/");
                self.keys.insert(format!("{dir}desc"), r.desc.clone().unwrap_or(b"QEMU_HARDDISK ()".to_vec()));
                self.keys.insert(format!("{dir}size"), b"1048576".to_vec());
                if let Some(p) = &r.parent {
                    self.keys.insert(format!("{dir}parent"), p.clone());
                }
            }
        }

        fn set_usb(&mut self, ident: &str, r: &UsbRecord) {
            let dir = format!("/qubes-usb-devices/{ident}/");
            self.keys.insert(format!("{dir}usb-ver"), b"2".to_vec());
            for (k, v) in [("desc", &r.desc), ("interfaces", &r.interfaces)] {
                if let Some(v) = v {
                    self.keys.insert(format!("{dir}{k}"), v.clone());
                }
            }
        }
    }

    impl QubesDbRead for Db {
        type Error = String;
        fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
            if self.fail { Err("qubesdb is gone".into()) } else { Ok(self.keys.get(key).cloned()) }
        }
        fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
            if self.fail {
                return Err("qubesdb is gone".into());
            }
            Ok(self
                .keys
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    fn simulated(serial: &[u8], devpath: &str) -> Simulated {
        from_sysfs(&Sysfs::new(Tree::stick(serial).root()).unwrap(), devpath).unwrap()
    }

    #[test]
    fn r43_records_must_give_the_same_id() {
        let mine = simulated(b"4C53", STICK_PART);
        let mut db = Db::default();
        assert_eq!(check(&mut db, &mine), Ok(Verdict::Unpublished));
        db.publish(&mine);
        let want = Identity::Id("46f4:0001:4C53:u080650:1.0:1".into());
        assert_eq!(check(&mut db, &mine), Ok(Verdict::Send(want)));
        // Another stick at the same name and port (a swap, or a stale record).
        let mut db = Db::default();
        db.publish(&simulated(b"EVIL", STICK_PART));
        assert_eq!(
            check(&mut db, &mine),
            Ok(Verdict::Mismatch {
                expected: "id \"46f4:0001:4C53:u080650:1.0:1\"".into(),
                published: "id \"46f4:0001:EVIL:u080650:1.0:1\"".into(),
            })
        );
        // The same device, but its USB parent not (yet) published.
        let mut db = Db::default();
        db.publish(&mine);
        db.keys.retain(|k, _| !k.starts_with("/qubes-usb-devices/"));
        let Ok(Verdict::Mismatch { published, .. }) = check(&mut db, &mine) else { panic!() };
        assert_eq!(
            published,
            "id \"0000:0000::?******:1.0:1\" (qubesdb has no /qubes-usb-devices/2-1/: not yet, or Qubes' udev rules exclude it)"
        );
        // The USB device itself.
        let usb = simulated(b"4C53", STICK_USB);
        let mut db = Db::default();
        db.publish(&usb);
        assert_eq!(check(&mut db, &usb), Ok(Verdict::Send(Identity::Id("46f4:0001:4C53:u080650".into()))));
        assert_eq!(check(&mut Db { fail: true, ..Db::default() }, &usb), Err("qubesdb is gone".into()));
    }

    #[test]
    fn r43_records_qubesd_cannot_read() {
        let usb = simulated(b"4C53", STICK_USB);
        let mut db = Db::default();
        db.set_usb(
            "2-1",
            &UsbRecord { desc: Some(b"46f4:0001 Q M 4C53".to_vec()), interfaces: Some(b":08065x:".to_vec()) },
        );
        assert_eq!(check(&mut db, &usb), Ok(Verdict::Unverifiable(IdError::Interface(b"08065x".to_vec()))));
        // A loop of parents.
        let part = simulated(b"4C53", STICK_PART);
        let mut db = Db::default();
        db.keys.insert("/qubes-block-devices/sdb1/parent".into(), b"sdb".to_vec());
        db.keys.insert("/qubes-block-devices/sdb/parent".into(), b"sdb1".to_vec());
        assert_eq!(check(&mut db, &part), Ok(Verdict::Unverifiable(IdError::TooDeep)));
        // A parent name qubesdb cannot hold is not published.
        db.keys.insert("/qubes-block-devices/sdb1/parent".into(), b"s$b".to_vec());
        let Ok(Verdict::Mismatch { published, .. }) = check(&mut db, &part) else { panic!() };
        assert_eq!(
            published,
            "id \"0000:0000::?******:1\" (qubesdb has no /qubes-usb-devices/2-1/: not yet, or Qubes' udev rules exclude it)"
        );
    }

    #[test]
    fn published_records_follow_qubesdb_path_rules() {
        let long = "a".repeat(32);
        let mut db = Db::default();
        db.keys.insert(format!("/qubes-block-devices/{long}/parent"), b"".to_vec());
        db.keys.insert(format!("/qubes-block-devices/{long}/desc"), b"x".to_vec());
        let records = read_published(&mut db, &Port::Block(long.clone())).unwrap();
        assert_eq!(device_id(&records, &Port::Block(long)).unwrap(), ":None", "a 32-byte name fits qubesdb");
        // A parent named with bytes, or at a length, qubesdb refuses is not published there.
        let mut db = Db::default();
        db.keys.insert("/qubes-block-devices/sdb1/parent".into(), b"sd b".to_vec());
        db.keys.insert("/qubes-block-devices/sd_b/parent".into(), b"".to_vec());
        let records = read_published(&mut db, &Port::Block("sdb1".into())).unwrap();
        assert!(records.block("sd_b").is_some(), "sanitized to sd_b, which qubesdb can hold");
        db.keys.insert("/qubes-block-devices/sdb1/parent".into(), "s".repeat(50).into_bytes());
        db.keys.insert(format!("/qubes-block-devices/{}/parent", "s".repeat(50)), b"".to_vec());
        let records = read_published(&mut db, &Port::Block("sdb1".into())).unwrap();
        assert_eq!(device_id(&records, &Port::Block("sdb1".into())).unwrap(), "0000:0000::?******:1");
    }

    #[test]
    fn r42_records_give_the_desc_form() {
        let usb = simulated(b"4C53", STICK_USB);
        let mut db = Db::default();
        let desc = usb.usb.as_ref().unwrap().legacy_desc();
        db.set_usb("2-1", &UsbRecord { desc: Some(desc.clone()), interfaces: None });
        assert_eq!(check(&mut db, &usb), Ok(Verdict::Send(Identity::Desc(desc.clone()))));
        assert_eq!(
            Identity::Desc(desc).ident().unwrap().as_str(),
            "desc+46f4+0001_20QEMU_5fQEMU_5fUSB_5fHARDDRIVE_5f4C53"
        );
        for wrong in [&b"46f4:0001 QEMU_QEMU_USB_HARDDRIVE_4C54"[..], b"46f4:0002 QEMU_QEMU_USB_HARDDRIVE_4C53"] {
            db.set_usb("2-1", &UsbRecord { desc: Some(wrong.to_vec()), interfaces: None });
            assert_eq!(
                check(&mut db, &usb),
                Ok(Verdict::Mismatch {
                    expected: "desc \"46f4:0001 ..._4C53\"".into(),
                    published: format!("desc \"{}\"", Escaped(wrong)),
                })
            );
        }
        db.set_usb("2-1", &UsbRecord { desc: Some(Vec::new()), interfaces: None });
        assert_eq!(check(&mut db, &usb), Ok(Verdict::Unverifiable(IdError::EmptyDesc)));
        db.keys.remove("/qubes-usb-devices/2-1/desc");
        assert_eq!(check(&mut db, &usb), Ok(Verdict::Unpublished), "mid-write: wait for desc");
        // A block device on R4.2: only model and label are published; nothing to check them against.
        let part = simulated(b"4C53", STICK_PART);
        let mut db = Db::default();
        db.keys.insert("/qubes-block-devices/sdb1/desc".into(), b"QEMU_HARDDISK (BACKUP)".to_vec());
        assert_eq!(check(&mut db, &part), Ok(Verdict::Send(Identity::Desc(b"QEMU_HARDDISK (BACKUP)".to_vec()))));
    }

    /// umockdev-record writes `descriptors` as a binary attribute (`H: descriptors=HEX`, hex
    /// in capitals); a recording replayed into a tree gives the id the real device had, and
    /// `autoattach record` writes the attribute back the same way.
    #[test]
    fn a_umockdev_recording_carries_descriptors() {
        let hex: String = usb_descriptors(&[(3, 1, 1, 1), (3, 0, 0, 2), (0x0b, 0, 0, 3)])
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let key = "/devices/pci0000:00/0000:00:14.0/usb1/1-4";
        let text = format!(
            "P: {key}\nN: bus/usb/001/005\nE: DEVTYPE=usb_device\nE: DRIVER=usb\nE: SUBSYSTEM=usb\n\
             A: idProduct=0407\\n\nA: idVendor=1050\\n\nA: manufacturer=Yubico\\n\n\
             A: product=YubiKey OTP+FIDO+CCID\\n\nH: descriptors={hex}\n\n\
             P: /devices/pci0000:00/0000:00:14.0/usb1\nE: DEVTYPE=usb_device\nE: SUBSYSTEM=usb\n\
             A: idVendor=1d6b\\n\n\n\
             P: /devices/pci0000:00/0000:00:14.0\nE: SUBSYSTEM=pci\n"
        );
        let devices = crate::umockdev::parse(&text).unwrap();
        let dir = crate::testing::TempDir::new("identity-umockdev");
        crate::umockdev::write_tree(&devices, dir.path()).unwrap();
        let sysfs = Sysfs::new(dir.path().join("sys")).unwrap();
        let sim = from_sysfs(&sysfs, key).unwrap();
        assert_eq!(sim.device_id().unwrap(), "1050:0407::u030101u030000u0b0000");
        assert_eq!(
            sim.records.usb("1-4").unwrap().desc.as_deref(),
            Some(&b"1050:0407 Yubico YubiKey\\x20OTP+FIDO+CCID "[..]),
            "no serial: the last field is empty"
        );
        let mut recorded = Vec::new();
        crate::umockdev::record(&sysfs, key, None, &mut recorded).unwrap();
        assert!(String::from_utf8(recorded).unwrap().contains(&format!("\nH: descriptors={hex}\n")));
    }

    #[test]
    fn the_usb_stick_fixture() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usb-stick/sys");
        let sysfs = Sysfs::new(root).unwrap();
        let disk = "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host0/target0:0:0/0:0:0:0/block/sda";
        let sim = from_sysfs(&sysfs, &format!("{disk}/sda1")).unwrap();
        assert_eq!(sim.device_id().unwrap(), "0781:5581:4C530001230101115543:u080650:1.0:1");
        assert_eq!(
            sim.records.usb("1-2").unwrap().desc.as_deref(),
            Some(&b"0781:5581 \\x20USB \\x20SanDisk\\x203.2Gen1 4C530001230101115543"[..])
        );
    }
}
