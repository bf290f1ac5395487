//! What the real-kernel test files share: loop devices made through /dev/loop-control, and
//! the backing file they are given.
#![allow(dead_code)] // each test file uses its own part

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const LOOP_CTL_ADD: u64 = 0x4C80;
pub const LOOP_CTL_REMOVE: u64 = 0x4C81;

/// A loop device made through /dev/loop-control, removed on drop.
pub struct Loop {
    pub index: u32,
}

impl Loop {
    /// The first free index from `base` (each test has its own ten).
    pub fn create(base: u32) -> Loop {
        let control = std::fs::File::open("/dev/loop-control").unwrap();
        for index in base..base + 10 {
            // SAFETY: LOOP_CTL_ADD takes the index as an integer argument; the fd is open.
            let rc = unsafe { nix::libc::ioctl(control.as_raw_fd(), LOOP_CTL_ADD as _, index as nix::libc::c_ulong) };
            if rc >= 0 {
                return Loop { index };
            }
        }
        panic!("no free loop index in {base}..{}", base + 10);
    }

    pub fn name(&self) -> String {
        format!("loop{}", self.index)
    }

    pub fn node(&self) -> String {
        format!("/dev/loop{}", self.index)
    }

    pub fn attach(&self, file: &Path) {
        let status = Command::new("losetup").arg(self.node()).arg(file).status().unwrap();
        assert!(status.success(), "losetup {}", self.node());
    }

    pub fn detach(&self) {
        let _ = Command::new("losetup").arg("-d").arg(self.node()).stderr(Stdio::null()).status();
    }

    /// Writes `action` to the device's sysfs `uevent` file: a synthetic event.
    pub fn synthetic(&self, action: &str) {
        std::fs::write(format!("/sys/class/block/{}/uevent", self.name()), action).unwrap();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.detach();
        let control = std::fs::File::open("/dev/loop-control").unwrap();
        // The kernel refuses to remove a loop device that is still busy for a moment.
        for _ in 0..50 {
            // SAFETY: LOOP_CTL_REMOVE takes the index as an integer argument; the fd is open.
            let rc = unsafe {
                nix::libc::ioctl(control.as_raw_fd(), LOOP_CTL_REMOVE as _, self.index as nix::libc::c_ulong)
            };
            if rc >= 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn backing_file(dir: &Path) -> PathBuf {
    let file = dir.join("disk.img");
    std::fs::write(&file, vec![0x5a; 1 << 20]).unwrap();
    file
}
