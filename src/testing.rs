//! Test-only: builds small sysfs trees in a temporary directory, shaped like the kernel's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("autoattach-{tag}-{}-{n}", std::process::id()));
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

/// A sysfs tree under construction.
#[derive(Debug)]
pub struct Tree {
    pub dir: TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        Tree { dir: TempDir::new("sysfs") }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A device: directory, `uevent` file, `subsystem` link, optional `driver` link, attributes.
    pub fn device(
        &self,
        devpath: &str,
        subsystem: &str,
        uevent: &str,
        driver: Option<&str>,
        attrs: &[(&str, &[u8])],
    ) -> &Tree {
        let dir = self.root().join(&devpath[1..]);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("uevent"), uevent).unwrap();
        let class = if subsystem == "block" { format!("class/{subsystem}") } else { format!("bus/{subsystem}") };
        std::fs::create_dir_all(self.root().join(&class)).unwrap();
        // Relative links inside the tree, as the kernel makes them.
        let up = "../".repeat(devpath.matches('/').count());
        std::os::unix::fs::symlink(format!("{up}{class}"), dir.join("subsystem")).unwrap();
        if let Some(driver) = driver {
            let target = format!("bus/{subsystem}/drivers/{driver}");
            std::fs::create_dir_all(self.root().join(&target)).unwrap();
            std::os::unix::fs::symlink(format!("{up}{target}"), dir.join("driver")).unwrap();
        }
        for (name, value) in attrs {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, value).unwrap();
        }
        if subsystem == "block" || (subsystem == "usb" && uevent.contains("DEVTYPE=usb_device")) {
            let list = if subsystem == "block" { "class/block" } else { "bus/usb/devices" };
            let link = self.root().join(list).join(crate::uevent::kernel_name(devpath));
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let back = "../".repeat(list.matches('/').count() + 1);
            let _ = std::os::unix::fs::symlink(format!("{back}{}", &devpath[1..]), link);
        }
        self
    }

    /// The usual USB stick: xhci root hub, device 2-1 (46f4:0001, serial given), its
    /// mass-storage interface, SCSI host/target/device, disk sdb and partition sdb1.
    pub fn stick(serial: &[u8]) -> Tree {
        let t = Tree::new();
        let pci = "/devices/pci0000:00/0000:00:14.0";
        let usb = format!("{pci}/usb2/2-1");
        t.device("/devices/pci0000:00", "pci_bus", "", None, &[]);
        t.device(pci, "pci", "DRIVER=xhci_hcd\nPCI_CLASS=C0330\n", Some("xhci_hcd"), &[("vendor", b"0x1b36\n")]);
        t.device(
            &format!("{pci}/usb2"),
            "usb",
            "DEVTYPE=usb_device\nDRIVER=usb\nBUSNUM=002\nDEVNUM=001\n",
            Some("usb"),
            &[("idVendor", b"1d6b\n"), ("idProduct", b"0003\n"), ("serial", b"0000:00:14.0\n")],
        );
        t.device(
            &usb,
            "usb",
            "MAJOR=189\nMINOR=129\nDEVNAME=bus/usb/002/002\nDEVTYPE=usb_device\nDRIVER=usb\nPRODUCT=46f4/1/0\nBUSNUM=002\nDEVNUM=002\n",
            Some("usb"),
            &[
                ("idVendor", b"46f4\n"),
                ("idProduct", b"0001\n"),
                ("serial", &[serial, b"\n"].concat()),
                ("manufacturer", b"QEMU\n"),
                ("product", b"QEMU USB HARDDRIVE\n"),
                ("devnum", b"2\n"),
                ("descriptors", &usb_descriptors(&[(8, 6, 0x50, 2)])),
            ],
        );
        t.device(
            &format!("{usb}/2-1:1.0"),
            "usb",
            "DEVTYPE=usb_interface\nDRIVER=usb-storage\nINTERFACE=8/6/80\n",
            Some("usb-storage"),
            &[("bInterfaceClass", b"08\n"), ("bInterfaceSubClass", b"06\n"), ("bInterfaceProtocol", b"50\n")],
        );
        t.scsi_disk(&format!("{usb}/2-1:1.0"));
        t
    }

    /// SCSI host 6, its target and device under `interface`, disk sdb and partition sdb1.
    fn scsi_disk(&self, interface: &str) {
        let scsi = format!("{interface}/host6/target6:0:0/6:0:0:0");
        self.device(&format!("{interface}/host6"), "scsi", "DEVTYPE=scsi_host\n", None, &[]);
        self.device(&format!("{interface}/host6/target6:0:0"), "scsi", "DEVTYPE=scsi_target\n", None, &[]);
        self.device(
            &scsi,
            "scsi",
            "DEVTYPE=scsi_device\nDRIVER=sd\n",
            Some("sd"),
            &[("vendor", b"QEMU    \n"), ("model", b"QEMU HARDDISK   \n"), ("type", b"0\n")],
        );
        self.device(
            &format!("{scsi}/block/sdb"),
            "block",
            "MAJOR=8\nMINOR=16\nDEVNAME=sdb\nDEVTYPE=disk\nDISKSEQ=9\n",
            None,
            &[("size", b"2048\n"), ("removable", b"1\n")],
        );
        self.device(
            &format!("{scsi}/block/sdb/sdb1"),
            "block",
            "MAJOR=8\nMINOR=17\nDEVNAME=sdb1\nDEVTYPE=partition\nPARTN=1\n",
            None,
            &[("size", b"2000\n"), ("partition", b"1\n")],
        );
    }
}

/// A `descriptors` attribute as the kernel serves it: the 18-byte device descriptor, then
/// one configuration: its 9-byte header and, per interface `(class, subclass, protocol,
/// endpoints)`, a 9-byte interface descriptor followed by 7-byte endpoint descriptors.
pub fn usb_descriptors(interfaces: &[(u8, u8, u8, u8)]) -> Vec<u8> {
    let mut config = Vec::new();
    for (n, &(class, sub, proto, endpoints)) in interfaces.iter().enumerate() {
        config.extend_from_slice(&[9, 4, n as u8, 0, endpoints, class, sub, proto, 0]);
        for e in 0..endpoints {
            config.extend_from_slice(&[7, 5, 0x81 + e, 2, 0, 2, 0]);
        }
    }
    let total = (9 + config.len()) as u16;
    let mut out = vec![18, 1, 0, 2, 0, 0, 0, 64, 0xf4, 0x46, 0x01, 0x00, 0, 1, 1, 2, 3, 1];
    out.extend_from_slice(&[9, 2, total as u8, (total >> 8) as u8, interfaces.len() as u8, 1, 0, 0x80, 50]);
    out.extend_from_slice(&config);
    out
}

/// The devpaths of [`Tree::stick`].
pub const STICK_USB: &str = "/devices/pci0000:00/0000:00:14.0/usb2/2-1";
pub const STICK_DISK: &str = "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb";
pub const STICK_PART: &str =
    "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdb/sdb1";

/// A kernel datagram for `action` on `devpath` with the given extra variables.
pub fn datagram(action: &str, devpath: &str, subsystem: &str, vars: &[&str]) -> Vec<u8> {
    let mut out =
        format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0").into_bytes();
    for v in vars {
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.extend_from_slice(b"SEQNUM=1\0");
    out
}
