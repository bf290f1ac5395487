//! Detached children: `qrexec-client-vm dom0 SERVICE+ARG`, with no shell anywhere.
//!
//! A child is started with `posix_spawn` (glibc runs it as clone(CLONE_VM|CLONE_VFORK): no
//! copy of the agent's memory, and an exec failure comes back as an error here instead of a
//! child that exits 127). Everything is prepared before the call: argv and envp are built
//! from checked names, and the attributes ask for
//! - its own session (POSIX_SPAWN_SETSID): no controlling terminal, not in the agent's
//!   process group, so signals sent to the agent's group do not reach it;
//! - an empty signal mask and default dispositions for every signal (the agent blocks
//!   SIGCHLD/SIGHUP/SIGTERM/SIGINT for its signalfd, and Rust ignores SIGPIPE: neither may
//!   leak into the child). Only an ignored disposition survives exec (a handler is reset by
//!   the kernel), so the signals reset are the ones ignored when the spawner was made: one
//!   sigaction in the child for SIGPIPE, not sixty-four;
//! - stdin, stdout and stderr on /dev/null.
//!
//! No other fd is inherited: the agent opens everything with O_CLOEXEC, and
//! [`cloexec_inherited_fds`] marks whatever it inherited from its own parent at startup.
//!
//! The loop never waits for a child: [`Children::reap`] is called on SIGCHLD and collects
//! exited children with `waitpid(pid, WNOHANG)`, per pid (so children of probe threads, such
//! as qubesdb-read, are left to their own waiters). A child still running after a bound is
//! logged once and left alone: it is detached, and dom0 may be waiting for the user.

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags, posix_spawn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Starts detached children of one program.
#[derive(Debug)]
pub struct Spawner {
    program: CString,
    envp: Vec<CString>,
    /// The signals ignored in this process when the spawner was made.
    ignored: SigSet,
}

impl Spawner {
    /// A spawner for `program`; `envp` is the environment every child gets.
    pub fn new(program: &Path, envp: Vec<CString>) -> Spawner {
        Spawner {
            program: CString::new(program.as_os_str().as_bytes()).unwrap_or_default(),
            envp,
            ignored: ignored_signals(),
        }
    }

    /// The current environment, captured once so children get it without touching `environ`
    /// later.
    pub fn current_env() -> Vec<CString> {
        std::env::vars_os()
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect()
    }

    pub fn program(&self) -> &CStr {
        &self.program
    }

    /// Starts `program args...` detached. Returns when the child has exec'd (or failed to).
    pub fn spawn(&self, args: &[&CStr]) -> Result<Pid, Errno> {
        let mut argv: Vec<&CStr> = Vec::with_capacity(args.len() + 1);
        argv.push(&self.program);
        argv.extend_from_slice(args);

        let mut attr = PosixSpawnAttr::init()?;
        // SETSID has no nix constant: it is glibc's (2.26+) and musl's 0x80.
        let setsid = PosixSpawnFlags::from_bits_retain(nix::libc::POSIX_SPAWN_SETSID as _);
        attr.set_flags(PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF | setsid)?;
        attr.set_sigmask(&SigSet::empty())?;
        attr.set_sigdefault(&self.ignored)?;

        let mut actions = PosixSpawnFileActions::init()?;
        let null = c"/dev/null";
        actions.add_open(0, null, OFlag::O_RDONLY, Mode::empty())?;
        actions.add_open(1, null, OFlag::O_WRONLY, Mode::empty())?;
        actions.add_dup2(1, 2)?;

        posix_spawn(self.program.as_c_str(), &actions, &attr, &argv, &self.envp)
    }
}

/// The signals whose disposition is SIG_IGN in this process now. (glibc's posix_spawn leaves
/// its two internal signals, 32 and 33, ignored in every child whatever this set says, as for
/// Rust's `std::process::Command`; programs never use those two.)
fn ignored_signals() -> SigSet {
    let mut raw = std::mem::MaybeUninit::<nix::libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole sigset_t it is given.
    unsafe { nix::libc::sigemptyset(raw.as_mut_ptr()) };
    // SAFETY: `raw` was initialised by sigemptyset just above.
    let mut raw = unsafe { raw.assume_init() };
    for signo in 1..=nix::libc::SIGRTMAX() {
        let mut old = std::mem::MaybeUninit::<nix::libc::sigaction>::zeroed();
        // SAFETY: a null new action only reads the disposition into `old`, which is writable.
        let rc = unsafe { nix::libc::sigaction(signo, std::ptr::null(), old.as_mut_ptr()) };
        // SAFETY: sigaction filled `old` when it returned 0; it was zeroed before anyway.
        if rc == 0 && unsafe { old.assume_init() }.sa_sigaction == nix::libc::SIG_IGN {
            // SAFETY: `raw` is a valid sigset_t; a number sigaddset refuses is left out.
            unsafe { nix::libc::sigaddset(&mut raw, signo) };
        }
    }
    // SAFETY: `raw` is a valid, fully initialised sigset_t.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// Finds `name` in PATH (or takes it as is if it has a `/`). None if no executable file.
pub fn find_program(name: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata().is_ok_and(|m| m.is_file()) && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
    };
    if name.as_os_str().as_bytes().contains(&b'/') {
        return executable(name).then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| executable(p))
}

/// Marks every fd above 2 close-on-exec, so nothing the agent inherited reaches a child.
pub fn cloexec_inherited_fds() -> std::io::Result<()> {
    // SAFETY: close_range only changes flags of the calling process's fds; the arguments are
    // plain integers.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, 3u32, u32::MAX, nix::libc::CLOSE_RANGE_CLOEXEC) };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.11: walk /proc/self/fd.
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if fd > 2 {
            // SAFETY: F_SETFD on an fd number only sets a flag; a number that is no longer open
            // (the directory's own fd) just fails with EBADF.
            unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Drops every capability (effective, permitted, inheritable, ambient). The agent needs
/// CAP_NET_ADMIN only to size its receive buffer; after that nothing it does, and nothing its
/// children do, needs a capability, so none may leak into `qrexec-client-vm` or
/// `qubesdb-read`. (A root agent's children still get root's capabilities back at exec, as
/// any root process does; under the shipped unit the agent is not root.)
pub fn drop_capabilities() -> std::io::Result<()> {
    use nix::libc::{PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, SYS_capset, c_long, prctl, syscall};
    // SAFETY: prctl with these constant arguments only clears this process's ambient set.
    let rc =
        unsafe { prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL as c_long, 0 as c_long, 0 as c_long, 0 as c_long) };
    if rc != 0 && Errno::last() != Errno::EINVAL {
        return Err(std::io::Error::last_os_error());
    }
    /// `struct __user_cap_header_struct` with _LINUX_CAPABILITY_VERSION_3.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    /// `struct __user_cap_data_struct`: effective, permitted, inheritable.
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header { version: 0x2008_0522, pid: 0 };
    let data =
        [Data { effective: 0, permitted: 0, inheritable: 0 }, Data { effective: 0, permitted: 0, inheritable: 0 }];
    // SAFETY: `header` and the two-element `data` array are the layout capset(2) expects for
    // version 3; both live across the call and are only read by the kernel.
    let rc = unsafe { syscall(SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A child the agent started, with the caller's `tag` (what to report its exit to).
#[derive(Debug)]
pub struct Child<T> {
    pub pid: Pid,
    /// What it does, for logs (`custom.USBDeviceAttach+work+__+sdb1+__+0781+5581+4C53+u080650+1.0+1`).
    pub call: String,
    /// The device, for logs.
    pub device: String,
    pub started: u64,
    pub tag: T,
    overdue: bool,
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    /// What the exit status of `qrexec-client-vm dom0 custom.USBDeviceAttach+...` means
    /// (the one table is [`crate::exit::CALLS`]).
    pub fn meaning(self) -> &'static str {
        match self {
            Exit::Code(code) => crate::exit::call_meaning(code),
            Exit::Signal(_) => crate::exit::CALL_SIGNAL,
        }
    }
}

impl Exit {
    /// Whether an attach call that ended so may have attached the device: all but the exits
    /// that attached nothing for certain ([`crate::exit::call_attached_nothing`]: the dom0
    /// handler's refusals, qrexec's 126 and 127). qrexec's 125, a code of no one's, a
    /// signal, an exit that was lost (-1): the device may be attached.
    pub fn may_have_attached(self) -> bool {
        match self {
            Exit::Code(code) => !crate::exit::call_attached_nothing(code),
            Exit::Signal(_) => true,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}: {}", self.meaning()),
            Exit::Signal(s) => write!(f, "signal {s}: {}", self.meaning()),
        }
    }
}

/// Children in flight.
#[derive(Debug)]
pub struct Children<T> {
    list: Vec<Child<T>>,
}

impl<T> Default for Children<T> {
    fn default() -> Children<T> {
        Children { list: Vec::new() }
    }
}

impl<T> Children<T> {
    pub fn add(&mut self, pid: Pid, call: String, device: String, now: u64, tag: T) {
        self.list.push(Child { pid, call, device, started: now, tag, overdue: false });
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Collects every child that has exited, without blocking.
    pub fn reap(&mut self) -> Vec<(Child<T>, Exit)> {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            let exit = match waitpid(self.list[i].pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => Some(Exit::Code(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => Some(Exit::Signal(signal)),
                // Not ours any more (reaped elsewhere): forget it.
                Err(Errno::ECHILD) => Some(Exit::Code(-1)),
                _ => None,
            };
            match exit {
                Some(exit) => done.push((self.list.swap_remove(i), exit)),
                None => i += 1,
            }
        }
        done
    }

    /// Children that have now run longer than `bound` (each reported once).
    pub fn overdue(&mut self, now: u64, bound: Duration) -> Vec<&Child<T>> {
        let bound = bound.as_millis() as u64;
        self.list
            .iter_mut()
            .filter(|c| !c.overdue && now.saturating_sub(c.started) >= bound)
            .map(|c| {
                c.overdue = true;
                &*c
            })
            .collect()
    }

    /// When the next child becomes overdue.
    pub fn next_overdue(&self, bound: Duration) -> Option<u64> {
        self.list.iter().filter(|c| !c.overdue).map(|c| c.started + bound.as_millis() as u64).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_exit(children: &mut Children<()>) -> Exit {
        for _ in 0..500 {
            if let Some((_, exit)) = children.reap().pop() {
                return exit;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("child did not exit");
    }

    /// The child's argv, read once it sleeps. posix_spawn returns when the child releases our
    /// memory, a moment before the new image's cmdline is readable; and while `sleep` starts
    /// it opens locale files of its own, so its fds are looked at only once it is in
    /// clock_nanosleep or nanosleep.
    fn cmdline_once_asleep(proc: &Path) -> Vec<u8> {
        let mut cmdline = Vec::new();
        for _ in 0..1000 {
            cmdline = std::fs::read(proc.join("cmdline")).unwrap();
            if !cmdline.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..1000 {
            let syscall = std::fs::read_to_string(proc.join("syscall")).unwrap_or_default();
            if matches!(syscall.split_whitespace().next(), Some("230" | "35")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        cmdline
    }

    /// The open fds of a process, sorted.
    fn open_fds(proc: &Path) -> Vec<String> {
        let mut fds: Vec<String> = std::fs::read_dir(proc.join("fd"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        fds.sort();
        fds
    }

    /// The child runs in its own session with exactly our argv, fds 0-2 on /dev/null and
    /// nothing else, an empty signal mask and default dispositions. Observed from outside,
    /// through /proc, while it sleeps.
    #[test]
    fn children_are_detached_and_clean() {
        // An inherited fd without CLOEXEC must not reach the child once marked.
        let leak = nix::fcntl::open("/dev/null", OFlag::O_RDONLY, Mode::empty()).unwrap();
        cloexec_inherited_fds().unwrap();
        // Ignored here (as an agent started under nohup would have SIGHUP ignored), so the
        // spawner must reset it; SIGPIPE is ignored by Rust's runtime already.
        // SAFETY: setting SIGUSR2 to SIG_IGN installs no handler; nothing in the tests uses it.
        unsafe { nix::sys::signal::signal(Signal::SIGUSR2, nix::sys::signal::SigHandler::SigIgn) }.unwrap();
        let spawner = Spawner::new(Path::new("/bin/sleep"), Spawner::current_env());
        assert!(spawner.ignored.contains(Signal::SIGUSR2) && spawner.ignored.contains(Signal::SIGPIPE));
        let pid = spawner.spawn(&[c"5"]).unwrap();
        let proc = PathBuf::from(format!("/proc/{pid}"));
        assert_eq!(cmdline_once_asleep(&proc), b"/bin/sleep\x005\x00");
        let fds = open_fds(&proc);
        let what: Vec<String> =
            fds.iter().map(|fd| format!("{fd} -> {:?}", std::fs::read_link(proc.join("fd").join(fd)))).collect();
        assert_eq!(fds, ["0", "1", "2"], "{what:?}");
        for fd in 0..3 {
            assert_eq!(std::fs::read_link(proc.join(format!("fd/{fd}"))).unwrap(), Path::new("/dev/null"));
        }
        let status = std::fs::read_to_string(proc.join("status")).unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
        };
        assert_eq!(field("SigBlk:"), 0);
        // Nothing ignored but glibc's internal signals 32 and 33 (see ignored_signals); in
        // particular not SIGPIPE, which Rust ignores in the agent, nor SIGUSR2.
        assert_eq!(field("SigIgn:") & !(3 << 31), 0);
        let stat = std::fs::read_to_string(proc.join("stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        assert_eq!(fields[3], pid.to_string(), "session id is its own pid: {stat}");
        assert_eq!(fields[2], pid.to_string(), "process group is its own: {stat}");
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        let mut children = Children::default();
        children.add(pid, "call".into(), "sdb1".into(), 0, ());
        assert_eq!(wait_exit(&mut children), Exit::Signal(Signal::SIGKILL));
        drop(leak);
    }

    /// In a child process (so the test runner keeps its capabilities): after the drop, the
    /// status shows no capability in any set.
    #[test]
    fn capabilities_are_dropped() {
        // SAFETY: the child only calls drop_capabilities, reads a file and exits; the test
        // harness's other threads are not touched in the child before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // Allocation-free from here: other test threads may hold the allocator's lock.
                let mut status = [0u8; 8192];
                let mut len = 0;
                let dropped = drop_capabilities().is_ok();
                if let Ok(fd) = nix::fcntl::open(c"/proc/self/status", OFlag::O_RDONLY, Mode::empty()) {
                    while let Ok(n @ 1..) = nix::unistd::read(&fd, &mut status[len..]) {
                        len += n;
                    }
                }
                let clear = status[..len]
                    .split(|&b| b == b'\n')
                    .filter(|l| l.starts_with(b"Cap") && !l.starts_with(b"CapBnd"))
                    .all(|l| l.ends_with(b"0000000000000000"));
                let ok = dropped && len > 0 && clear;
                // SAFETY: _exit ends the forked child at once, without running the parent's
                // destructors or atexit handlers twice.
                unsafe { nix::libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
            }
        }
    }

    /// A removed device gets a Detach unless its Attach attached nothing for certain: the
    /// handler refused (64-74), or qrexec never ran the service (126 policy, 127 no such
    /// service). qrexec's 125 can come after dom0 attached it, and so can a code of no one's
    /// (a handler killed by SIGKILL: 137) or a signal; a Detach is harmless there.
    #[test]
    fn only_exits_that_attached_nothing_for_certain_skip_the_detach() {
        let attached_nothing: Vec<i32> = (-1..=255).filter(|&c| !Exit::Code(c).may_have_attached()).collect();
        let mut want: Vec<i32> = (64..=74).collect();
        want.extend([126, 127]);
        assert_eq!(attached_nothing, want);
        assert!(Exit::Code(125).may_have_attached());
        assert!(Exit::Code(0).may_have_attached());
        assert!(Exit::Signal(Signal::SIGKILL).may_have_attached());
    }

    #[test]
    fn exec_failure_is_an_error_not_a_child() {
        let spawner = Spawner::new(Path::new("/nonexistent/qrexec-client-vm"), Vec::new());
        assert_eq!(spawner.spawn(&[c"dom0"]).unwrap_err(), Errno::ENOENT);
    }

    #[test]
    fn exit_codes_are_explained_and_overdue_children_reported_once() {
        let spawner = Spawner::new(Path::new("/bin/sh"), Vec::new());
        let mut children = Children::default();
        let pid = spawner.spawn(&[c"-c", c"exit 126"]).unwrap();
        children.add(pid, "c".into(), "d".into(), 0, ());
        let exit = wait_exit(&mut children);
        assert_eq!(exit.to_string(), "exit 126: qrexec: refused by dom0's qrexec policy (QREXEC_EXIT_REQUEST_REFUSED)");
        // The identity codes of the dom0 handler: 73 attached nothing, so nothing is undone.
        assert!(Exit::Code(73).meaning().contains("identity mismatch") && !Exit::Code(73).may_have_attached());
        assert!(Exit::Code(74).meaning().contains("busy"));
        let pid = spawner.spawn(&[c"-c", c"sleep 0.5"]).unwrap();
        children.add(pid, "c".into(), "d".into(), 1000, ());
        assert_eq!(children.next_overdue(Duration::from_secs(1)), Some(2000));
        assert!(children.overdue(1500, Duration::from_secs(1)).is_empty());
        assert_eq!(children.overdue(2500, Duration::from_secs(1)).len(), 1);
        assert!(children.overdue(3500, Duration::from_secs(1)).is_empty());
        assert_eq!(wait_exit(&mut children), Exit::Code(0));
    }
}
