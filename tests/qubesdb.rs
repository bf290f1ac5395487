//! The qubesdb client and the `qubesdb-read` fallback against the stand-in daemon
//! (tests/support/qubesdb-standin.c: the real daemon's framing, from qubes-core-qubesdb's
//! sources, in C so that the header layout is the C compiler's, not ours).

mod common;

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use autoattach::qubesdb::{Client, Garbage, Program, ProgramError, QdbError};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The stand-in, compiled once for this test binary.
fn standin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Built under a name of its own, then renamed into place: test binaries running at the
        // same time never see a half-written file, and nothing is left in /tmp.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let fresh = common::compile("qubesdb-standin.c", dir, &format!("qubesdb-standin.{}", std::process::id()));
        let bin = dir.join("qubesdb-standin");
        std::fs::rename(fresh, &bin).unwrap();
        bin
    })
}

/// A running stand-in daemon serving `qubesdb.sock` and `qubesdb.ro.sock` in its own
/// directory, killed on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start<S: AsRef<OsStr>>(tag: &str, specs: &[S]) -> Daemon {
        Daemon::spawn(common::tempdir(tag), specs)
    }

    fn spawn<S: AsRef<OsStr>>(dir: PathBuf, specs: &[S]) -> Daemon {
        let mut child = Command::new(standin())
            .args(["daemon", "-l"])
            .arg(dir.join("log"))
            .arg("-r")
            .arg(dir.join("qubesdb.ro.sock"))
            .arg(dir.join("qubesdb.sock"))
            .args(specs)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the stand-in daemon");
        let mut ready = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut ready).unwrap();
        assert_eq!(ready, "ready\n", "the stand-in daemon did not start");
        Daemon { child, dir }
    }

    /// Another daemon in this one's place, on the same sockets (qubes-db restarted).
    fn restart(mut self, specs: &[&str]) -> Daemon {
        let dir = std::mem::take(&mut self.dir);
        drop(self); // kills it; its directory, now empty, is kept
        Daemon::spawn(dir, specs)
    }

    fn rw(&self) -> PathBuf {
        self.dir.join("qubesdb.sock")
    }

    fn ro(&self) -> PathBuf {
        self.dir.join("qubesdb.ro.sock")
    }

    fn client(&self) -> Client {
        Client::connect(&self.ro(), TIMEOUT).unwrap()
    }

    /// What the daemon logged, without the times: "accept ro", "read /a", "publish /k"...
    fn log(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        text.lines().map(|l| l.split_once(' ').unwrap().1.to_string()).collect()
    }

    /// Another client's WRITE or RM, through the stand-in's client mode.
    fn client_command(&self, args: &[&str]) {
        let status = Command::new(standin()).arg(args[0]).arg(self.rw()).args(&args[1..]).status().unwrap();
        assert!(status.success(), "qubesdb-standin {args:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A work directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        Dir(common::tempdir(tag))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn readable(client: &Client, ms: u16) -> bool {
    let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
}

fn garbage(result: Result<Option<Vec<u8>>, QdbError>) -> Garbage {
    match result {
        Err(QdbError::Garbage { what, .. }) => what,
        other => panic!("want garbage, got {other:?}"),
    }
}

#[test]
fn reads_multireads_and_watches_round_trip() {
    let d = Daemon::start(
        "qdb-round",
        &["/qubes-usb-devices/2-1/desc=0781:5581 SanDisk", "/qubes-usb-devices/2-1/interfaces=", "/vm-config/x=1"],
    );
    let mut c = d.client();
    assert_eq!(c.read("/qubes-usb-devices/2-1/desc").unwrap().as_deref(), Some(&b"0781:5581 SanDisk"[..]));
    assert_eq!(c.read("/qubes-usb-devices/2-1/interfaces").unwrap(), Some(vec![]), "present and empty");
    assert_eq!(c.read("/qubes-usb-devices/2-1/parent").unwrap(), None, "absent");
    let all = c.multiread("/qubes-usb-devices/2-1/").unwrap();
    assert_eq!(
        all,
        [
            ("/qubes-usb-devices/2-1/desc".to_string(), b"0781:5581 SanDisk".to_vec()),
            ("/qubes-usb-devices/2-1/interfaces".to_string(), vec![]),
        ]
    );
    assert_eq!(c.multiread("/qubes-block-devices/").unwrap(), []);
    c.watch("/qubes-usb-devices/").unwrap();
    assert!(c.unwatch("/qubes-usb-devices/").unwrap());
    assert!(!c.unwatch("/qubes-usb-devices/").unwrap(), "the daemon had no such watch left");
    assert!(c.take_watch_events().unwrap().is_empty());
    assert_eq!(
        d.log(),
        [
            "accept ro",
            "read /qubes-usb-devices/2-1/desc",
            "read /qubes-usb-devices/2-1/interfaces",
            "read /qubes-usb-devices/2-1/parent",
            "multiread /qubes-usb-devices/2-1/",
            "multiread /qubes-block-devices/",
            "watch /qubes-usb-devices/",
            "unwatch /qubes-usb-devices/",
            "unwatch /qubes-usb-devices/",
        ]
    );
}

/// The agent's way: watch, read (absent), wait on the fd, take the event, read again.
#[test]
fn a_watch_fires_when_the_key_is_published() {
    let key = "/qubes-block-devices/loop7/desc";
    let d = Daemon::start("qdb-publish", &[&format!("publish:300:{key}=loop7 ()")]);
    let mut c = d.client();
    c.watch("/qubes-block-devices/loop7/").unwrap();
    assert_eq!(c.read(key).unwrap(), None);
    assert!(!readable(&c, 0), "nothing is pending before the publication");
    assert!(readable(&c, 10_000), "the publication must make the fd readable");
    assert_eq!(c.take_watch_events().unwrap(), [key]);
    assert!(!readable(&c, 0), "taking the events empties the fd");
    assert_eq!(c.read(key).unwrap().as_deref(), Some(&b"loop7 ()"[..]));
    assert_eq!(d.log().iter().filter(|l| l.starts_with("publish")).count(), 1);
    // Removal fires too (Qubes' udev scripts remove the record when the device goes).
    d.client_command(&["rm", "/qubes-block-devices/loop7/"]);
    assert!(readable(&c, 10_000));
    assert_eq!(c.take_watch_events().unwrap(), ["/qubes-block-devices/loop7/"]);
    assert_eq!(c.read(key).unwrap(), None);
}

/// A watch event the daemon sends before the answer to a read (another client's write was
/// handled first) is kept, and the fd says so although the socket is empty.
#[test]
fn watch_events_interleaved_with_answers_are_kept() {
    let d = Daemon::start("qdb-interleave", &["/a/1=one", "/a/2=two", "touchmid:/w/x=1"]);
    let mut c = d.client();
    c.watch("/w/").unwrap();
    assert_eq!(c.read("/a/1").unwrap().as_deref(), Some(&b"one"[..]));
    assert!(readable(&c, 0), "the event that preceded the answer is pending");
    assert_eq!(c.take_watch_events().unwrap(), ["/w/x"]);
    assert!(!readable(&c, 0));
    // Before the multiread's answers and between its entries: entries intact, events kept.
    let entries = c.multiread("/a/").unwrap();
    assert_eq!(entries, [("/a/1".to_string(), b"one".to_vec()), ("/a/2".to_string(), b"two".to_vec())]);
    assert!(readable(&c, 0));
    assert_eq!(c.take_watch_events().unwrap(), ["/w/x"], "one path, reported once");
}

#[test]
fn a_connection_cut_mid_answer_is_an_error_then_reopened_with_its_watches() {
    let d = Daemon::start("qdb-cut", &["/b=bee", "cut:/a", "drop:/dropped"]);
    let mut c = d.client();
    c.watch("/w/").unwrap();
    assert!(matches!(c.read("/a"), Err(QdbError::Closed { key, .. }) if key == "/a"));
    // The next request reconnects, watches again, and reports the watch (it may have fired
    // while no connection was there to carry it).
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
    assert!(readable(&c, 0));
    assert_eq!(c.take_watch_events().unwrap(), ["/w/"]);
    // The watch works on the new connection.
    d.client_command(&["write", "/w/x", "1"]);
    assert!(readable(&c, 10_000));
    assert_eq!(c.take_watch_events().unwrap(), ["/w/x"]);
    // Dropped without any answer: the same.
    assert!(matches!(c.read("/dropped"), Err(QdbError::Closed { .. })));
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
    assert_eq!(d.log().iter().filter(|l| *l == "watch /w/").count(), 3, "{:?}", d.log());
}

#[test]
fn garbage_and_oversized_answers_are_errors() {
    let d = Daemon::start("qdb-garbage", &["/b=bee", "garbage:/a", "oversize:/big"]);
    let mut c = d.client();
    assert_eq!(garbage(c.read("/a")), Garbage::Type(0xee));
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]), "a fresh connection after garbage");
    // 1 MiB announced: refused at the header, not waited for (that would be a Timeout).
    assert_eq!(garbage(c.read("/big")), Garbage::Length(1 << 20));
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
}

#[test]
fn a_daemon_that_never_answers_costs_the_deadline() {
    let d = Daemon::start("qdb-silent", &["/b=bee", "silent:/a"]);
    let mut c = Client::connect(&d.ro(), Duration::from_millis(300)).unwrap();
    match c.read("/a") {
        Err(QdbError::Timeout { key, after, .. }) => {
            assert_eq!((key.as_str(), after), ("/a", Duration::from_millis(300)))
        }
        other => panic!("want a timeout, got {other:?}"),
    }
    // The late answer (if any) belongs to a closed connection; the next read is in step.
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
    assert_eq!(d.log().iter().filter(|l| l.starts_with("accept")).count(), 2);
}

#[test]
fn bad_keys_are_refused_before_anything_is_sent() {
    let d = Daemon::start("qdb-keys", &[] as &[&str]);
    let mut c = d.client();
    for key in ["relative", "/ends/with/", "/a b", "/a\\b", &format!("/{}", "x".repeat(63))] {
        assert!(matches!(c.read(key), Err(QdbError::BadKey { .. })), "{key}");
    }
    assert!(matches!(c.multiread("no-slash"), Err(QdbError::BadKey { .. })));
    assert!(matches!(c.watch("/w w"), Err(QdbError::BadKey { .. })));
    assert_eq!(c.read("/none").unwrap(), None, "the connection is still in step");
    assert_eq!(d.log(), ["accept ro", "read /none"]);
}

/// The read-only socket first (4.3.3+), the read-write one where it does not exist.
#[test]
fn the_read_only_socket_is_preferred() {
    let d = Daemon::start("qdb-sockets", &["/b=bee"]);
    let (ro, rw) = (d.ro(), d.rw());
    let mut c = Client::connect_first(&[&ro, &rw], TIMEOUT).unwrap();
    assert_eq!(c.socket(), ro);
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
    let missing = d.dir.join("missing.ro.sock");
    let mut c = Client::connect_first(&[&missing, &rw], TIMEOUT).unwrap();
    assert_eq!(c.socket(), rw);
    assert_eq!(c.read("/b").unwrap().as_deref(), Some(&b"bee"[..]));
    assert_eq!(d.log(), ["accept ro", "read /b", "accept rw", "read /b"]);
    let err = Client::connect_first(&[&missing, &d.dir.join("missing.sock")], TIMEOUT).unwrap_err();
    assert!(err.absent(), "{err}");
    assert!(err.to_string().contains("missing.ro.sock"), "{err}");
}

// --- the qubesdb-read fallback ----------------------------------------------------------------

/// The stand-in as `qubesdb-read` in `dir`, speaking to the daemon through `qubesdb.sock`
/// beside it. `dir` has a `-` in it, as temporary directories here do.
fn reader_in(dir: &Path, d: &Daemon) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let reader = dir.join("qubesdb-read");
    std::fs::copy(standin(), &reader).unwrap();
    std::os::unix::fs::symlink(d.rw(), dir.join("qubesdb.sock")).unwrap();
    reader
}

#[test]
fn the_fallback_runs_qubesdb_read_under_its_own_name() {
    let d = Daemon::start("qdb-program", &["/qubes-block-devices/sda/desc=SanDisk (\\x20)"]);
    let dir = d.dir.join("opt/qubes-tools");
    let reader = reader_in(&dir, &d);
    // Run by its path, qubesdb-cmd before 4.3.3 takes "tools/qubesdb-read" for the command
    // (after the first '-') and prints its usage, exit 0: the bug the fallback must not have.
    let direct = Command::new(&reader).arg("/qubes-block-devices/sda/desc").output().unwrap();
    assert_eq!((direct.status.code(), direct.stdout.is_empty()), (Some(0), true));
    assert!(String::from_utf8_lossy(&direct.stderr).starts_with("Usage: "));
    let program = Program { path: reader, timeout: TIMEOUT };
    assert_eq!(program.read("/qubes-block-devices/sda/desc").unwrap().as_deref(), Some(&b"SanDisk (\\x20)"[..]));
    assert_eq!(program.read("/qubes-block-devices/sdb/desc").unwrap(), None);
    assert!(matches!(program.read("/a b"), Err(QdbError::BadKey { .. })));
    assert_eq!(d.log()[1..], ["read /qubes-block-devices/sda/desc", "accept rw", "read /qubes-block-devices/sdb/desc"]);
}

fn script(dir: &Path, name: &str, body: &str) -> Program {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Program { path, timeout: Duration::from_secs(5) }
}

fn program_error(result: Result<Option<Vec<u8>>, QdbError>) -> ProgramError {
    match result {
        Err(QdbError::Program { what, .. }) => what,
        other => panic!("want a program error, got {other:?}"),
    }
}

#[test]
fn usage_text_is_never_a_value() {
    let dir = Dir::new("qdb-usage");
    let dir = &dir.0;
    // A reader that prints its usage on stderr and exits 0 (qubesdb-cmd.c:364-366) answers
    // nothing, whatever stdout holds.
    let usage = script(dir, "usage", "echo 'Usage: qubesdb-read [-frq] [-c <command>]' >&2; exit 0");
    match program_error(usage.read("/qubes-block-devices/sda/desc")) {
        ProgramError::Usage(text) => assert_eq!(text, b"Usage: qubesdb-read [-frq] [-c <command>]\n"),
        other => panic!("{other:?}"),
    }
    let both = script(dir, "both", "echo value; echo 'Usage: qubesdb-read' >&2");
    assert!(matches!(program_error(both.read("/k")), ProgramError::Usage(_)));
    // It is given -r and the key (argv[0], which a script cannot see, is checked by
    // the_fallback_runs_qubesdb_read_under_its_own_name).
    let argv = script(dir, "argv", "printf '%s|' \"$@\"");
    assert_eq!(argv.read("/k").unwrap().as_deref(), Some(&b"-r|/k|"[..]));
}

#[test]
fn the_fallback_is_bounded_in_time_and_output() {
    let dir = Dir::new("qdb-bounds");
    let dir = &dir.0;
    let mut slow = script(dir, "slow", "exec sleep 30");
    slow.timeout = Duration::from_millis(200);
    assert!(matches!(program_error(slow.read("/k")), ProgramError::Timeout(t) if t == Duration::from_millis(200)));
    let chatty = script(dir, "chatty", "exec yes value");
    assert!(matches!(program_error(chatty.read("/k")), ProgramError::Output(_)));
    let missing = Program { path: dir.join("absent"), timeout: Duration::from_secs(1) };
    assert!(matches!(program_error(missing.read("/k")), ProgramError::Spawn(_)));
    // A failure says what the program said.
    let broken = script(dir, "broken", "echo 'Failed connect to local daemon' >&2; exit 1");
    let err = broken.read("/k").unwrap_err().to_string();
    assert!(err.ends_with("broken /k: failed (exit 1): \"Failed connect to local daemon\""), "{err}");
}

// --- the rules dom0 sets, /vm-config/autoattach-rules -----------------------------------------

const RULES_KEY: &str = "/vm-config/autoattach-rules";

/// `autoattach ARGS --qubesdb-socket` the daemon's read-only socket, no `--rules`: the default
/// places (absent here, or the host's own) and qubesdb.
fn autoattach(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_autoattach"))
        .args(args)
        .arg("--qubesdb-socket")
        .arg(d.ro())
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// qubesdb that cannot be asked for the rules (the connection dropped, no answer in time,
/// an answer that is not qubesdb's) is exit 4, which the unit restarts: never 3, which it
/// does not, so one failure at boot does not leave the agent down for good. The log names
/// qubesdb, the key and what to do. `check` says the same, and so do `list` and `test`.
#[test]
fn qubesdb_not_answering_for_the_rules_is_a_restartable_failure() {
    let cases = [
        ("qdb-rules-drop", "drop:", "closed the connection while answering /vm-config/autoattach-rules"),
        ("qdb-rules-garbage", "garbage:", "answered /vm-config/autoattach-rules with a message of type 238"),
        ("qdb-rules-silent", "silent:", "did not answer for /vm-config/autoattach-rules within 2000 ms"),
    ];
    for (tag, spec, why) in cases {
        let d = Daemon::start(tag, &[format!("{spec}{RULES_KEY}")]);
        let out = autoattach(&d, &["run", "--dry-run"]);
        let log = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{spec} {log}");
        let socket = d.ro().display().to_string();
        let want = format!("error: qubesdb:{RULES_KEY}: cannot read: qubesdb at {socket} {why}");
        assert!(log.contains(&want), "{spec}: want {want:?} in\n{log}");
        assert!(log.contains("systemctl status qubes-db"), "{log}");
        assert!(log.contains("nothing started (exit 4: systemd starts the agent again)"), "{log}");
        assert!(!log.contains("error(s) in the rules"), "{log}");
    }
}

/// The same through the `qubesdb-read` fallback (which `check`, `list` and `test` use where
/// there is no socket): a reader that fails is exit 4 for every command that loads rules, and
/// `check` says where it could not look.
#[test]
fn a_failing_qubesdb_read_for_the_rules_is_exit_4_everywhere() {
    let dir = Dir::new("qdb-rules-program");
    let broken = script(&dir.0, "qubesdb-read", "echo 'Failed connect to local daemon' >&2; exit 1");
    let reader = broken.path.to_str().unwrap();
    let want = format!(
        "qubesdb:{RULES_KEY}: cannot read: {reader} {RULES_KEY}: failed (exit 1): \"Failed connect to local daemon\""
    );
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_autoattach"))
            .args(args)
            .args(["--qubesdb-read", reader])
            .env_remove("JOURNAL_STREAM")
            .output()
            .unwrap()
    };
    let out = run(&["check"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{report}");
    assert!(report.contains(&format!("  qubesdb:{RULES_KEY}: cannot be asked now (see below)\n")), "{report}");
    assert!(report.contains(&want), "want {want:?} in\n{report}");
    assert!(report.contains("0 error(s), 0 warning(s); 1 source(s) could not be asked"), "{report}");
    for command in [&["run", "--dry-run"][..], &["list"], &["test", "lo"]] {
        let out = run(command);
        let log = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{command:?}: {log}");
        assert!(log.contains(&want), "{command:?}: want {want:?} in\n{log}");
    }
}

/// The key absent: no rules from there, and the agent starts. A value with errors, or one
/// that is not UTF-8, is an error in the rules: exit 3 (waiting does not mend it).
#[test]
fn rules_absent_from_qubesdb_start_and_wrong_rules_there_are_exit_3() {
    let d = Daemon::start("qdb-rules-absent", &["/vm-config/other=1"]);
    let dir = Dir::new("qdb-rules-absent-agent");
    let socket = d.ro();
    let args = ["--dry-run", "--qubesdb-socket", socket.to_str().unwrap()];
    let mut agent = common::Agent::start(&dir.0, "agent", &args, &[]);
    assert!(agent.stop().success(), "{}", agent.stderr());
    assert!(d.log().contains(&format!("read {RULES_KEY}")), "{:?}", d.log());

    let d = Daemon::start("qdb-rules-wrong", &[format!("{RULES_KEY}=KERNEL=\"sdb\", ATTACH=\"work\"")]);
    let out = autoattach(&d, &["run", "--dry-run"]);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains(&format!("qubesdb:{RULES_KEY}:1:7: KERNEL can only be matched with == or !=")), "{log}");

    let mut bad = std::ffi::OsString::from(format!("{RULES_KEY}=ATTRS{{serial}}==\""));
    bad.push(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\", ATTACH=\"work\""));
    let d = Daemon::start("qdb-rules-binary", &[bad]);
    let out = autoattach(&d, &["run", "--dry-run"]);
    let log = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{log}");
    assert!(log.contains(&format!("qubesdb:{RULES_KEY}: not UTF-8 (hint: set it again from dom0")), "{log}");
}

/// SIGHUP while qubesdb cannot be asked keeps the rules in use (a reload would otherwise drop
/// the rules dom0 set), says why, and the agent goes on; once qubesdb answers, a SIGHUP takes
/// the rules again.
#[test]
fn a_reload_while_qubesdb_does_not_answer_keeps_the_rules() {
    let rule = "SUBSYSTEM==\"block\", KERNEL==\"autoattach-none\", ATTACH=\"work\"";
    let d = Daemon::start("qdb-rules-reload", &[format!("{RULES_KEY}={rule}")]);
    let dir = Dir::new("qdb-rules-reload-agent");
    let socket = d.ro();
    let args = ["--dry-run", "--qubesdb-socket", socket.to_str().unwrap()];
    let mut agent = common::Agent::start(&dir.0, "agent", &args, &[]);
    assert!(agent.stderr().contains("loaded 1 rule(s)"), "{}", agent.stderr());
    let d = d.restart(&[&format!("drop:{RULES_KEY}")]);
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let want = format!(
        "error: reload refused: qubesdb:{RULES_KEY}: cannot read: qubesdb at {} closed the connection",
        socket.display()
    );
    agent.wait_for(|a| a.stderr().contains(&want), "the refused reload");
    assert!(agent.stderr().contains("; keeping the 1 rule(s) in use\n"), "{}", agent.stderr());
    assert!(agent.alive(), "{}", agent.stderr());
    let _d = d.restart(&[&format!("{RULES_KEY}={rule}\n{rule}")]);
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    agent.wait_for(|a| a.stderr().contains("reloaded 2 rule(s)"), "the reload once qubesdb answers");
    assert!(agent.stop().success(), "{}", agent.stderr());
}

// --- `list` and `test`: the identity a call would carry -----------------------------------------

/// What Qubes R4.3's udev scripts publish for the usb-stick fixture's sda1, its disk and its
/// USB device 1-2 (udev-block-add-change, udev-usb-add-change; desc with udev's \xNN escapes).
const STICK_R43: [&str; 6] = [
    "/qubes-block-devices/sda1/desc=SanDisk_3.2Gen1 ()",
    "/qubes-block-devices/sda1/parent=sda",
    "/qubes-block-devices/sda/desc=SanDisk_3.2Gen1 ()",
    "/qubes-block-devices/sda/parent=1-2:1.0",
    "/qubes-usb-devices/1-2/desc=0781:5581 \\x20USB \\x20SanDisk\\x203.2Gen1 4C530001230101115543",
    "/qubes-usb-devices/1-2/interfaces=:080650:",
];

/// R4.1/R4.2 publish `desc` only: a block device's model and label, a USB device's
/// `VID:PID ID_SERIAL` (udev-usb-add-change at v4.2).
const STICK_R42: [&str; 2] = [
    "/qubes-block-devices/sda1/desc=SanDisk_3.2Gen1 (BACKUP)",
    "/qubes-usb-devices/1-2/desc=0781:5581 _USB_SanDisk_3.2Gen1_4C530001230101115543",
];

/// `autoattach ARGS` over the usb-stick fixture, asking the daemon `d` through the stand-in
/// as `qubesdb-read` (the fallback `list` and `test` use where there is no socket).
fn over_stick(d: &Daemon, args: &[&str]) -> (Option<i32>, String) {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usb-stick");
    let tools = d.dir.join("opt-tools");
    let reader = if tools.exists() { tools.join("qubesdb-read") } else { reader_in(&tools, d) };
    let out = Command::new(env!("CARGO_BIN_EXE_autoattach"))
        .args(args)
        .arg("--sysfs")
        .arg(case.join("sys"))
        .arg("--rules")
        .arg(case.join("rules"))
        .arg("--qubesdb-read")
        .arg(reader)
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    (out.status.code(), text(&out.stdout) + &text(&out.stderr))
}

/// The `#   identity` line of device `name` in `list`'s output.
fn listed_identity(d: &Daemon, name: &str) -> String {
    let (code, text) = over_stick(d, &["list"]);
    assert_eq!(code, Some(0), "{text}");
    let block = text.split(&format!("# {name}\n")).nth(1).unwrap_or_else(|| panic!("{name} not listed:\n{text}"));
    let line = block.lines().find(|l| l.starts_with("#   identity ")).unwrap();
    line["#   identity ".len()..].trim_start().to_owned()
}

/// In a Qubes qube, `list` and `test` show the identity the call would carry, as the agent
/// checks it against what Qubes published: on R4.1/R4.2 the published desc (not the R4.3 id
/// sysfs gives, which that call would not carry), on R4.3 the device id; a device not yet
/// published, or published as another one, has none yet, and the line says why.
#[test]
fn list_and_test_show_the_identity_the_call_would_carry() {
    let id = "id \"0781:5581:4C530001230101115543:u080650:1.0:1\"";
    let d = Daemon::start("qdb-list-r42", &STICK_R42);
    let form = "(R4.1/R4.2 form: the published desc; this qube publishes no device ids)";
    assert_eq!(listed_identity(&d, "sda1"), format!("desc \"SanDisk_3.2Gen1 (BACKUP)\" {form}"));
    let usb = listed_identity(&d, "1-2");
    assert_eq!(usb, format!("desc \"0781:5581 _USB_SanDisk_3.2Gen1_4C530001230101115543\" {form}"));
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/usb-stick");
    let (code, text) = over_stick(&d, &["test", "sda1", "--dev", case.join("dev").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("\n  identity: desc \"SanDisk_3.2Gen1 (BACKUP)\" {form}\n")), "{text}");
    let call = "custom.USBDeviceAttach+backup+__+sda1+__+desc+SanDisk_5f3.2Gen1_20_28BACKUP_29";
    assert!(text.contains(&format!("would call: qrexec-client-vm dom0 {call}\n")), "{text}");

    let d = Daemon::start("qdb-list-r43", &STICK_R43);
    assert_eq!(listed_identity(&d, "sda1"), format!("{id} (R4.3 device id, as qubesdb publishes it)"));

    let d = Daemon::start("qdb-list-none", &[] as &[&str]);
    assert_eq!(listed_identity(&d, "sda1"), format!("none yet: not published in qubesdb (sysfs gives {id})"));

    let evil = STICK_R43.map(|r| r.replace("4C530001230101115543", "EVIL0000000000000000"));
    let d = Daemon::start("qdb-list-evil", &evil);
    assert_eq!(
        listed_identity(&d, "sda1"),
        format!(
            "none: qubesdb publishes id \"0781:5581:EVIL0000000000000000:u080650:1.0:1\" here, this device is {id} \
             (no call until they agree)"
        )
    );
}
