//! What the real-kernel test files share: whether they can run, work directories, the C
//! stand-ins, a running agent, loop devices made through /dev/loop-control and their backing file.
#![allow(dead_code)] // each test file uses its own part

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn full() -> bool {
    std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1")
}

/// True if a real-kernel test can run; panics under AUTOATTACH_FULL=1 if it cannot.
pub fn can_run(what: &str) -> bool {
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("needs root")
    } else if !Path::new("/dev/loop-control").exists() {
        Some("needs /dev/loop-control")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if full() => panic!("{what}: {p} (AUTOATTACH_FULL=1: this test must run)"),
        Some(p) => {
            eprintln!("SKIP {what}: {p}");
            false
        }
    }
}

pub fn tempdir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("autoattach-{}-{tag}-{}", env!("CARGO_CRATE_NAME"), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles a C helper from tests/support into `dir`.
pub fn compile(source: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support").join(source);
    let status = Command::new("cc").args(["-O2", "-o"]).arg(&out).arg(&src).status().expect("run cc");
    assert!(status.success(), "cc {source}");
    out
}

/// A running `autoattach run`, killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    /// Starts `autoattach run ARGS` with logs in `dir/TAG.stdout` and `dir/TAG.stderr`, and
    /// waits until coldplug is done.
    pub fn start(dir: &Path, tag: &str, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let (stdout, stderr) = (dir.join(format!("{tag}.stdout")), dir.join(format!("{tag}.stderr")));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_autoattach"));
        cmd.env_remove("JOURNAL_STREAM");
        cmd.arg("run").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start autoattach");
        let agent = Agent { child: Some(child), stdout, stderr };
        agent.wait_for(|a| a.stderr().contains("coldplug:"), "startup");
        agent
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// Waits (at most 30 s) until `done` holds; fails if the agent exits meanwhile.
    pub fn wait_for(&self, done: impl Fn(&Agent) -> bool, what: &str) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).unwrap();
    }

    /// SIGTERM, and the exit status (within 5 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                panic!("the agent did not exit within 5 s of SIGTERM\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `limit` for the agent to exit; its status, or None if it is still there.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The states (`R`, `S`, `D`, `Z`, ...) of the agent's threads, from /proc.
    pub fn thread_states(&self) -> Vec<char> {
        let tasks = format!("/proc/{}/task", self.pid());
        let Ok(dir) = std::fs::read_dir(tasks) else { return Vec::new() };
        dir.flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .filter_map(|stat| stat.rsplit(')').next().and_then(|rest| rest.trim_start().chars().next()))
            .collect()
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

    /// The device's part of a call, `loopN+__+IDENT`: a loop device has no USB parent, so its
    /// Qubes id is `:` and its number (`:200`), encoded `+200`.
    pub fn arg(&self) -> String {
        format!("{}+__++{}", self.name(), self.index)
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

/// True if a FUSE file system can be mounted here (as root, with /dev/fuse); panics under
/// AUTOATTACH_FULL=1 if not.
pub fn fuse_usable(what: &str) -> bool {
    if !Path::new("/dev/fuse").exists()
        || !std::fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("\tfuse\n")
    {
        let _ = Command::new("modprobe").arg("fuse").status();
    }
    let ok = Path::new("/dev/fuse").exists()
        && std::fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("\tfuse\n");
    assert!(ok || !full(), "{what}: needs FUSE (/dev/fuse and the fuse file system) (AUTOATTACH_FULL=1)");
    if !ok {
        eprintln!("SKIP {what}: needs FUSE");
    }
    ok
}

/// A loop device whose reads never return: its backing file is served by
/// tests/support/fuse-stall.c, which holds every read. Dropping it kills the server (the
/// held reads then fail), unmounts it and removes the loop device.
pub struct StalledDisk {
    server: Option<Child>,
    mount: PathBuf,
    pub dev: Loop,
}

impl StalledDisk {
    /// Mounts a stalled file system under `dir/stall-TAG`, and a loop device (index from
    /// `base`) on its 1 MiB file.
    pub fn new(dir: &Path, server: &Path, tag: &str, base: u32) -> StalledDisk {
        let mount = dir.join(format!("stall-{tag}"));
        std::fs::create_dir_all(&mount).unwrap();
        let mut child = Command::new(server)
            .arg(&mount)
            .arg((1u32 << 20).to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fuse-stall");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready, "ready\n", "fuse-stall did not start");
        let disk = StalledDisk { server: Some(child), mount, dev: Loop::create(base) };
        disk.dev.attach(&disk.mount.join("disk"));
        disk
    }

    /// Lets every held read fail (the server is killed, which aborts the connection).
    pub fn release(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for StalledDisk {
    fn drop(&mut self) {
        self.release();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// The stand-in qubesdb daemon (tests/support/qubesdb-standin.c, the real daemon's protocol)
/// serving `DIR/qubesdb.sock`, killed on drop.
pub struct QubesDb {
    child: Child,
    bin: PathBuf,
    pub socket: PathBuf,
}

impl QubesDb {
    /// Compiles and starts the daemon in `dir` with its SPEC arguments (`KEY=VALUE`, ...).
    pub fn start(dir: &Path, specs: &[&str]) -> QubesDb {
        let bin = compile("qubesdb-standin.c", dir, "qubesdb-standin");
        let socket = dir.join("qubesdb.sock");
        let mut child = Command::new(&bin)
            .arg("daemon")
            .arg(&socket)
            .args(specs)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the stand-in qubesdb daemon");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready, "ready\n", "the stand-in qubesdb daemon did not start");
        QubesDb { child, bin, socket }
    }

    /// Writes `key` as another client does (Qubes' `qubesdb-write`): its watches fire.
    pub fn write(&self, key: &str, value: &str) {
        let status = Command::new(&self.bin).arg("write").arg(&self.socket).args([key, value]).status().unwrap();
        assert!(status.success(), "qubesdb write {key}");
    }

    /// What Qubes' `udev-block-add-change` publishes for a loop device, in its order: `desc`
    /// (the backing file), `size`, `mode`, then `parent` (R4.3 only: empty, a loop device has
    /// none), then the trigger key `/qubes-block-devices` its watchers wait for. With
    /// `pause`, the parent and trigger come that long after the rest (a script descheduled in
    /// the middle of its writes).
    pub fn publish_loop(&self, dev: &Loop, file: &Path, r43: bool, pause: Duration) {
        let dir = format!("/qubes-block-devices/{}", dev.name());
        self.write(&format!("{dir}/desc"), file.to_str().unwrap());
        self.write(&format!("{dir}/size"), &(1u32 << 20).to_string());
        self.write(&format!("{dir}/mode"), "w");
        std::thread::sleep(pause);
        if r43 {
            self.write(&format!("{dir}/parent"), "");
        }
        self.write("/qubes-block-devices", "");
    }
}

impl Drop for QubesDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
