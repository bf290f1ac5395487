//! What the benchmarks share: the recorded USB stick, a realistic set of 100 rules, temporary
//! directories and a generator of large sysfs trees.
//!
//! Each bench is its own crate and uses only part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use autoattach::uevent::{MonitorText, Record};

/// The recorded USB stick: `sys/`, `dev/`, `events` (its plug and unplug), `rules`.
pub fn stick() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usb-stick")
}

/// The stick's events (plug, then unplug) as kernel datagrams, in order.
pub fn stick_datagrams() -> Vec<Vec<u8>> {
    let text = std::fs::read(stick().join("events")).expect("read the stick's events");
    MonitorText::new(&text)
        .filter_map(|r| match r.expect("the stick's events parse") {
            Record::Event(e, _) => Some(e.to_datagram()),
            Record::Directive(..) => None,
        })
        .collect()
}

/// The header (`ACTION@DEVPATH`) of a datagram, for labels.
pub fn header(datagram: &[u8]) -> String {
    let end = datagram.iter().position(|&b| b == 0).unwrap_or(datagram.len());
    String::from_utf8_lossy(&datagram[..end]).into_owned()
}

/// 100 rules of the kinds people write (bench/hundred.rules, shared with bench/kernel.sh): the
/// first 99 name other devices; the last one is the stick's, so a stick event is tried against
/// all 100 (the worst case for first-match-wins).
pub fn hundred_rules() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hundred.rules"))
        .expect("read bench/hundred.rules")
}

/// The 100 rules, parsed.
pub fn hundred_rule_set() -> autoattach::rules::RuleSet {
    let parsed = autoattach::rules::parse("hundred.rules", &hundred_rules());
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    assert_eq!(parsed.set.rules.len(), 100);
    parsed.set
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("autoattach-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a sysfs tree of `count` devices under `root` (`sys/...`), shaped like the kernel's:
/// per group of 5, one USB stick (usb_device, with its interface and SCSI chain, disk and
/// partition: 3 attachable devices), a USB keyboard (1), and a loop disk (1). Returns how many
/// attachable devices (those `Sysfs::scan` lists) it made.
pub fn write_tree(root: &Path, count: usize) -> usize {
    let sys = root.join("sys");
    let made = Maker { sys: &sys };
    made.dir("class/block");
    made.dir("bus/usb/devices");
    made.dir("bus/usb/drivers/usb");
    made.dir("bus/usb/drivers/usb-storage");
    made.dir("bus/usb/drivers/usbhid");
    made.dir("bus/scsi/drivers/sd");
    made.dir("bus/pci/drivers/xhci_hcd");
    let pci = "/devices/pci0000:00/0000:00:14.0";
    made.device(pci, "bus/pci", Some("bus/pci/drivers/xhci_hcd"), "DRIVER=xhci_hcd\nPCI_ID=8086:A36D\n", &[]);
    let mut attachable = 0;
    let mut n = 0;
    while attachable < count {
        // Bus numbers 1..=127 and ports 1..=99 keep names unique for tens of thousands.
        let (bus, port) = (1 + n / 99, 1 + n % 99);
        let hub = format!("{pci}/usb{bus}");
        if port == 1 {
            made.device(&hub, "bus/usb", Some("bus/usb/drivers/usb"), "DEVTYPE=usb_device\n", &[("idVendor", "1d6b")]);
        }
        let usb = format!("{hub}/{bus}-{port}");
        match n % 5 {
            0..=2 if attachable + 3 <= count => {
                made.stick(&usb, bus, port, n);
                attachable += 3;
            }
            3 => {
                made.usb_device(&usb, bus, port, n, "046d", "c31c", "usbhid");
                attachable += 1;
            }
            _ => {
                let name = format!("loop{n}");
                let disk = format!("/devices/virtual/block/{name}");
                let uevent = format!("MAJOR=7\nMINOR={n}\nDEVNAME={name}\nDEVTYPE=disk\nDISKSEQ={}\n", 1000 + n);
                made.device(&disk, "class/block", None, &uevent, &[("size", "2048")]);
                made.listed("class/block", &name, &disk);
                attachable += 1;
            }
        }
        n += 1;
    }
    attachable
}

/// The kernel's name for the `n`th SCSI disk: sda..sdz, sdaa.., so a partition (`sdab1`)
/// never collides with a disk.
fn sd_name(mut n: usize) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
        if n == 0 {
            break;
        }
        n -= 1;
    }
    letters.reverse();
    format!("sd{}", String::from_utf8(letters).unwrap())
}

struct Maker<'a> {
    sys: &'a Path,
}

impl Maker<'_> {
    fn dir(&self, rel: &str) {
        std::fs::create_dir_all(self.sys.join(rel)).unwrap();
    }

    /// A device directory with `uevent`, a relative `subsystem` link (and `driver`), and
    /// attributes.
    fn device(&self, devpath: &str, subsystem: &str, driver: Option<&str>, uevent: &str, attrs: &[(&str, &str)]) {
        let dir = self.sys.join(&devpath[1..]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("uevent"), uevent).unwrap();
        let up = "../".repeat(devpath.matches('/').count());
        std::os::unix::fs::symlink(format!("{up}{subsystem}"), dir.join("subsystem")).unwrap();
        if let Some(driver) = driver {
            std::os::unix::fs::symlink(format!("{up}{driver}"), dir.join("driver")).unwrap();
        }
        for (name, value) in attrs {
            std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
        }
    }

    /// A `class/block/NAME` or `bus/usb/devices/NAME` link to the device.
    fn listed(&self, list: &str, name: &str, devpath: &str) {
        let up = "../".repeat(list.matches('/').count() + 1);
        std::os::unix::fs::symlink(format!("{up}{}", &devpath[1..]), self.sys.join(list).join(name)).unwrap();
    }

    #[allow(clippy::too_many_arguments)]
    fn usb_device(
        &self,
        usb: &str,
        bus: usize,
        port: usize,
        n: usize,
        vendor: &str,
        product: &str,
        iface_driver: &str,
    ) {
        let uevent = format!(
            "MAJOR=189\nMINOR={n}\nDEVNAME=bus/usb/{bus:03}/{port:03}\nDEVTYPE=usb_device\nDRIVER=usb\n\
             PRODUCT={vendor}/{product}/100\nTYPE=0/0/0\nBUSNUM={bus:03}\nDEVNUM={port:03}\n"
        );
        // One stick in ten has the serial the last of the 100 rules wants (two sticks may share
        // a serial): coldplug matches those partitions and pays for what a match costs.
        let serial =
            if n % 10 == 0 && vendor == "0781" { "4C530001230101115543".to_owned() } else { format!("SERIAL{n:08}") };
        let attrs = [
            ("idVendor", vendor),
            ("idProduct", product),
            ("serial", serial.as_str()),
            ("manufacturer", "Bench Maker"),
            ("product", "Bench Device"),
            ("bDeviceClass", "00"),
        ];
        self.device(usb, "bus/usb", Some("bus/usb/drivers/usb"), &uevent, &attrs);
        let name = usb.rsplit('/').next().unwrap();
        self.listed("bus/usb/devices", name, usb);
        let iface = format!("{usb}/{name}:1.0");
        let class = if iface_driver == "usbhid" { "03" } else { "08" };
        self.device(
            &iface,
            "bus/usb",
            Some(&format!("bus/usb/drivers/{iface_driver}")),
            &format!("DEVTYPE=usb_interface\nDRIVER={iface_driver}\nPRODUCT={vendor}/{product}/100\n"),
            &[("bInterfaceClass", class), ("bInterfaceSubClass", "06"), ("bInterfaceProtocol", "50")],
        );
    }

    /// A USB stick: the USB device, its interface, SCSI host, target and LUN, disk, partition.
    fn stick(&self, usb: &str, bus: usize, port: usize, n: usize) {
        self.usb_device(usb, bus, port, n, "0781", "5581", "usb-storage");
        let name = usb.rsplit('/').next().unwrap();
        let host = format!("{usb}/{name}:1.0/host{n}");
        self.device(&host, "bus/scsi", None, "DEVTYPE=scsi_host\n", &[]);
        let target = format!("{host}/target{n}:0:0");
        self.device(&target, "bus/scsi", None, "DEVTYPE=scsi_target\n", &[]);
        let lun = format!("{target}/{n}:0:0:0");
        self.device(
            &lun,
            "bus/scsi",
            Some("bus/scsi/drivers/sd"),
            "DEVTYPE=scsi_device\nDRIVER=sd\n",
            &[("vendor", "SanDisk ")],
        );
        let disk_name = sd_name(n);
        let disk = format!("{lun}/block/{disk_name}");
        let seq = 1000 + n;
        let minor = (n * 16) % (1 << 20);
        let uevent = format!("MAJOR=8\nMINOR={minor}\nDEVNAME={disk_name}\nDEVTYPE=disk\nDISKSEQ={seq}\n");
        self.device(&disk, "class/block", None, &uevent, &[("size", "30031872"), ("removable", "1")]);
        self.listed("class/block", &disk_name, &disk);
        let part_name = format!("{disk_name}1");
        let part = format!("{disk}/{part_name}");
        let uevent =
            format!("MAJOR=8\nMINOR={}\nDEVNAME={part_name}\nDEVTYPE=partition\nDISKSEQ={seq}\nPARTN=1\n", minor + 1);
        self.device(&part, "class/block", None, &uevent, &[("size", "30029824"), ("partition", "1")]);
        self.listed("class/block", &part_name, &part);
    }
}
