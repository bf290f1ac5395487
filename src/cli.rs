//! The command line: options, subcommands, exit codes.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::engine::{self, Config, Engine};
use crate::readiness::{Nodes, Prober, Publication};
use crate::rules::{self, Parsed, Rule, Test, Trace};
use crate::runloop::{self, RuleLoader, RunOptions};
use crate::sysfs::Sysfs;
use crate::uevent::Uevent;

pub const USAGE: &str = "\
usage: autoattach COMMAND [OPTIONS]

Attach trusted USB devices from the Qubes OS USB qube to the qube you chose.

commands:
  run                 the agent: kernel uevents in, qrexec calls out (--dry-run prints them)
  check               validate the rules; report every error and risky rule
  test DEVICE         explain, rule by rule and key by key, why DEVICE matches or not
  list                present USB and block devices, their identity and matching rule
  record DEVICE       write a umockdev recording of DEVICE and its parents (-o FILE)
  replay FIXTURE [EVENTS]
                      run the pipeline over a tree, case directory or umockdev recording,
                      and an optional `udevadm monitor --kernel --property` capture;
                      print the calls it would make, one per line

DEVICE is a name (sdb1, /dev/sdb1), a USB bus id (2-1.4) or a sysfs path.

options:
  --rules PATH        rules file or directory of *.rules (repeatable). Default: the
                      directory /etc/autoattach/rules.d, then /rw/config/autoattach, then
                      qubesdb /vm-config/autoattach-rules
  --sysfs DIR         sysfs root (default /sys)
  --dev DIR           device node directory (default /dev); for `test`, a DIR other than
                      /dev may hold regular files standing in for nodes (fixture trees)
  --qrexec-client PATH  the client to run (default qrexec-client-vm)
  --qubesdb-read PATH wait for qubesdb to publish devices, with this reader
                      (default: qubesdb-read if installed)
  --no-qubesdb        do not wait for qubesdb publication
  --dry-run           print calls instead of making them
  --timeout DURATION  readiness timeout for rules without TIMEOUT (default 30s)
  --debounce DURATION how long a device must stay before it is called (default 0)
  --rate-limit N/DURATION
                      at most N calls per rule per window (default 10/1m; 0 disables)
  --no-detach         do not call custom.USBDeviceDetach when an attached block device goes
  --slow-call DURATION  log a call still running after this long (default 2m); calls are
                      detached and never killed (dom0 may be waiting for the user)
  --rcvbuf BYTES      receive buffer to ask for (default 8 MiB)
  -o, --output FILE   where `record` writes (default stdout)
  -v, --verbose       debug logging;  -q, --quiet: warnings and errors only
  -h, --help          this text;      --version

exit codes:
  0  success (test: a rule matches)
  1  test: no rule matches the device
  2  usage error
  3  the rules have errors
  4  could not start (uevent socket, signals, sysfs)
  5  input not found or unreadable (device, fixture, events)
";

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

const EXIT_NO_MATCH: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn usage(message: String) -> Failure {
    Failure { code: EXIT_USAGE, message: format!("{message}; see `autoattach --help`") }
}

#[derive(Debug, Default)]
struct Opts {
    command: String,
    args: Vec<String>,
    rules: Vec<PathBuf>,
    sysfs: Option<PathBuf>,
    dev: Option<PathBuf>,
    client: Option<PathBuf>,
    qubesdb_read: Option<PathBuf>,
    no_qubesdb: bool,
    dry_run: bool,
    timeout: Option<Duration>,
    debounce: Option<Duration>,
    rate_limit: Option<Option<(u32, Duration)>>,
    no_detach: bool,
    rcvbuf: Option<usize>,
    slow_call: Option<Duration>,
    output: Option<PathBuf>,
    verbosity: i8,
}

fn parse_args(args: Vec<OsString>) -> Result<Opts, Failure> {
    let mut opts = Opts::default();
    let mut args = args.into_iter().map(|a| a.into_string().map_err(|a| usage(format!("argument {a:?} is not UTF-8"))));
    while let Some(arg) = args.next() {
        let arg = arg?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, Failure> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args.next().transpose()?.ok_or_else(|| usage(format!("{name} needs {what}"))),
            }
        };
        let duration = |text: String, name: &str| {
            rules::parse_duration(&text)
                .ok_or_else(|| usage(format!("{name} {text:?}: not a duration (e.g. 30s, 500ms, 2m)")))
        };
        match name.as_str() {
            "-h" | "--help" => opts.command = "help".into(),
            "--version" => opts.command = "version".into(),
            "-v" | "--verbose" => opts.verbosity += 1,
            "-q" | "--quiet" => opts.verbosity -= 1,
            "--dry-run" => opts.dry_run = true,
            "--no-qubesdb" => opts.no_qubesdb = true,
            "--no-detach" => opts.no_detach = true,
            "--rules" => opts.rules.push(value("a path")?.into()),
            "--sysfs" => opts.sysfs = Some(value("a directory")?.into()),
            "--dev" => opts.dev = Some(value("a directory")?.into()),
            "--qrexec-client" => opts.client = Some(value("a program")?.into()),
            "--qubesdb-read" => opts.qubesdb_read = Some(value("a program")?.into()),
            "-o" | "--output" => opts.output = Some(value("a file")?.into()),
            "--timeout" => opts.timeout = Some(duration(value("a duration")?, &name)?),
            "--debounce" => opts.debounce = Some(duration(value("a duration")?, &name)?),
            "--slow-call" => opts.slow_call = Some(duration(value("a duration")?, &name)?),
            "--rate-limit" => {
                let text = value("N/DURATION")?;
                opts.rate_limit = Some(match text.as_str() {
                    "0" | "off" => None,
                    _ => {
                        let (n, d) = text
                            .split_once('/')
                            .ok_or_else(|| usage(format!("--rate-limit {text:?}: expected N/DURATION")))?;
                        let n = n
                            .parse()
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| usage(format!("--rate-limit {text:?}: bad count")))?;
                        Some((n, duration(d.to_owned(), &name)?))
                    }
                });
            }
            "--rcvbuf" => {
                let text = value("a size in bytes")?;
                opts.rcvbuf = Some(
                    text.parse()
                        .ok()
                        .filter(|&n| n >= 4096)
                        .ok_or_else(|| usage(format!("--rcvbuf {text:?}: expected bytes, at least 4096")))?,
                );
            }
            flag if flag.starts_with('-') && flag.len() > 1 => {
                return Err(usage(format!("unknown option {flag}")));
            }
            _ if opts.command.is_empty() => opts.command = arg,
            _ => opts.args.push(arg),
        }
    }
    Ok(opts)
}

/// Entry point: parses arguments, runs the command, turns failures into exit codes.
pub fn main() -> ExitCode {
    let opts = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(o) => o,
        Err(f) => {
            crate::log::init(crate::log::Level::Info);
            error!("{}", f.message);
            return ExitCode::from(f.code);
        }
    };
    let level = match opts.verbosity {
        i8::MIN..=-1 => crate::log::Level::Warning,
        0 => crate::log::Level::Info,
        _ => crate::log::Level::Debug,
    };
    crate::log::init(level);
    match dispatch(&opts) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            error!("{}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(opts: &Opts) -> Result<u8, Failure> {
    let want_args = |n: std::ops::RangeInclusive<usize>, what: &str| {
        if n.contains(&opts.args.len()) { Ok(()) } else { Err(usage(format!("{} takes {what}", opts.command))) }
    };
    match opts.command.as_str() {
        "" => Err(usage("no command given".into())),
        "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        "version" => {
            println!("autoattach {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        "run" => want_args(0..=0, "no arguments").and_then(|()| run(opts)),
        "check" => want_args(0..=0, "no arguments").and_then(|()| check(opts)),
        "test" => want_args(1..=1, "one DEVICE").and_then(|()| test(opts, &opts.args[0])),
        "list" => want_args(0..=0, "no arguments").and_then(|()| list(opts)),
        "record" => want_args(1..=1, "one DEVICE").and_then(|()| record(opts, &opts.args[0])),
        "replay" => want_args(1..=2, "FIXTURE [EVENTS]").and_then(|()| replay(opts)),
        other => Err(usage(format!("unknown command {other:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Rule sources

/// The qubesdb key a disposable sys-usb's rules come from (`qvm-features sys-usb
/// vm-config.autoattach-rules '...'` in dom0).
pub const QUBESDB_RULES: &str = "/vm-config/autoattach-rules";
const DEFAULT_RULE_DIRS: [&str; 2] = ["/etc/autoattach/rules.d", "/rw/config/autoattach"];

/// The qubesdb reader to use, if any.
fn qubesdb(opts: &Opts) -> Option<Publication> {
    Publication::choose(opts.no_qubesdb, opts.qubesdb_read.as_deref())
}

/// Loads rules: the `--rules` paths (each must exist), or the default places (each may be
/// missing) and qubesdb.
fn load_rules(paths: &[PathBuf], qubesdb: Option<&Publication>) -> Parsed {
    let mut parsed = Parsed::default();
    if !paths.is_empty() {
        for p in paths {
            parsed.add_path(p, true);
        }
        return parsed;
    }
    for dir in DEFAULT_RULE_DIRS {
        parsed.add_path(Path::new(dir), false);
    }
    if let Some(db) = qubesdb {
        let origin = format!("qubesdb:{QUBESDB_RULES}");
        match db.read(QUBESDB_RULES) {
            Ok(Some(text)) => match String::from_utf8(text) {
                Ok(text) => parsed.add(&origin, &text),
                Err(_) => parsed.file_error(&origin, "not UTF-8".into()),
            },
            Ok(None) => {}
            Err(why) => parsed.file_error(&origin, format!("cannot read: {why}")),
        }
    }
    parsed
}

fn config(opts: &Opts) -> Config {
    let d = Config::default();
    Config {
        timeout: opts.timeout.unwrap_or(d.timeout),
        debounce: opts.debounce.unwrap_or(d.debounce),
        rate_limit: opts.rate_limit.unwrap_or(d.rate_limit),
        detach: !opts.no_detach,
    }
}

fn sysfs(opts: &Opts) -> Result<Sysfs, Failure> {
    let root = opts.sysfs.clone().unwrap_or_else(|| "/sys".into());
    Sysfs::new(root).map_err(|e| Failure { code: runloop::EXIT_STARTUP, message: format!("sysfs: {e}") })
}

fn rules_or_fail(parsed: &Parsed) -> Result<(), Failure> {
    if runloop::report_rules(parsed) {
        Ok(())
    } else {
        Err(Failure { code: runloop::EXIT_RULES, message: format!("{} error(s) in the rules", parsed.errors.len()) })
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

fn run(opts: &Opts) -> Result<u8, Failure> {
    let db = qubesdb(opts);
    let watch = db.as_ref().filter(|db| db.watches()).map(|_| runloop::Connect::local());
    let (paths, none, reader) = (opts.rules.clone(), opts.no_qubesdb, opts.qubesdb_read.clone());
    let rules = move || load_rules(&paths, Publication::choose(none, reader.as_deref()).as_ref());
    let options = RunOptions {
        sysfs: opts.sysfs.clone().unwrap_or_else(|| "/sys".into()),
        dev: opts.dev.clone().unwrap_or_else(|| "/dev".into()),
        load_rules: RuleLoader(Box::new(rules)),
        client: opts.client.clone().unwrap_or_else(|| "qrexec-client-vm".into()),
        qubesdb: db,
        dry_run: opts.dry_run,
        config: config(opts),
        rcvbuf: opts.rcvbuf.unwrap_or(crate::netlink::DEFAULT_RCVBUF),
        child_bound: opts.slow_call.unwrap_or(Duration::from_secs(120)),
        workers: runloop::WORKERS,
        probe_deadline: runloop::PROBE_DEADLINE,
        watch,
    };
    runloop::run(options).map(|()| 0).map_err(|f| Failure { code: f.code, message: f.message })
}

fn check(opts: &Opts) -> Result<u8, Failure> {
    let parsed = load_rules(&opts.rules, qubesdb(opts).as_ref());
    let mut out = std::io::stdout().lock();
    for e in &parsed.errors {
        let _ = writeln!(out, "{e}");
    }
    for w in &parsed.warnings {
        let place = if w.line == 0 { w.origin.to_string() } else { format!("{}:{}:{}", w.origin, w.line, w.col) };
        let hint = w.hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default();
        let _ = writeln!(out, "{place}: warning: {}{hint}", w.message);
    }
    let _ = writeln!(
        out,
        "{} rule(s) loaded, {} error(s), {} warning(s)",
        parsed.set.rules.len(),
        parsed.errors.len(),
        parsed.warnings.len()
    );
    Ok(if parsed.errors.is_empty() { 0 } else { runloop::EXIT_RULES })
}

/// A present device's `add` event, built from sysfs.
fn present_event(sysfs: &Sysfs, name: &str) -> Result<(String, Vec<u8>), Failure> {
    let not_found = || Failure {
        code: crate::replay::EXIT_INPUT,
        message: format!(
            "no device {name:?} under {} (give a name like sdb1, a bus id like 2-1, or a sysfs path)",
            sysfs.root().display()
        ),
    };
    let devpath = sysfs.resolve(name).ok_or_else(not_found)?;
    let datagram = engine::synthetic_add(sysfs, &devpath).ok_or_else(not_found)?;
    Ok((devpath, datagram))
}

fn test(opts: &Opts, name: &str) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let db = qubesdb(opts);
    let parsed = load_rules(&opts.rules, db.as_ref());
    rules_or_fail(&parsed)?;
    let (devpath, datagram) = present_event(&sysfs, name)?;
    let event = Uevent::parse(&datagram)
        .map_err(|e| Failure { code: crate::replay::EXIT_INPUT, message: format!("{devpath}: {e}") })?;
    let mut report = String::new();
    let _ = writeln!(report, "device {devpath}\n  {}", sysfs.identity(&devpath));
    let _ = writeln!(
        report,
        "  event: {} {} {} (from sysfs)",
        event.action,
        event.subsystem,
        event.devtype().unwrap_or("-")
    );
    let kind = engine::attachable(&event);
    if kind.is_none() {
        let _ = writeln!(
            report,
            "  this device cannot be attached: only block devices and USB devices (DEVTYPE usb_device) can; rules are not tried"
        );
        print!("{report}");
        return Ok(EXIT_NO_MATCH);
    }
    let mut matcher = rules::Matcher::new(&parsed.set);
    let mut explain = Explain { out: report, parents_started: false };
    let first = matcher.explain(&sysfs, &parsed.set, &event, &mut explain);
    let mut report = explain.out;
    match first {
        None => {
            let _ = writeln!(report, "\nno rule matches: nothing would be called");
            print!("{report}");
            Ok(EXIT_NO_MATCH)
        }
        Some(i) => {
            let rule = &parsed.set.rules[i];
            let _ = writeln!(report, "\nfirst match: {} -> ATTACH=\"{}\"", rule.location(), rule.attach);
            let mut engine = Engine::new(parsed.set, config(opts));
            let mut effects = Vec::new();
            engine.on_event(&sysfs, &event, 0, &mut effects);
            engine.describe(&sysfs);
            // Under the real /dev a node must be a block device; a fixture's nodes are files.
            let dev = opts.dev.clone().unwrap_or_else(|| "/dev".into());
            let nodes = if dev == Path::new("/dev") { Nodes::Real } else { Nodes::Fixture };
            let prober = Prober { sysfs: std::sync::Arc::new(sysfs), dev, nodes, qubesdb: db };
            let client = opts.client.clone().unwrap_or_else(|| "qrexec-client-vm".into());
            for effect in effects {
                let engine::Effect::Probe(job) = effect else { continue };
                let outcome = job.run(&prober, |call| call.clone());
                let _ = writeln!(report, "readiness now: {}", outcome.verdict);
                let mut calls = Vec::new();
                if let Some(Ok((call, _))) = &outcome.made {
                    calls.push(call.clone());
                }
                let mut later = Vec::new();
                let carried = outcome.carried(|_| true);
                engine.on_verdict(outcome.epoch, &outcome.devpath, outcome.verdict, carried, 0, &mut later);
                calls.extend(later.into_iter().filter_map(|e| match e {
                    engine::Effect::Call { call, .. } => Some(call),
                    _ => None,
                }));
                for call in calls {
                    let _ = writeln!(report, "would call: {} dom0 {}", client.display(), call.service_arg());
                }
            }
            print!("{report}");
            Ok(0)
        }
    }
}

/// Writes the key-by-key explanation of `autoattach test`.
struct Explain {
    out: String,
    parents_started: bool,
}

impl Trace for Explain {
    fn rule(&mut self, _index: usize, rule: &Rule) {
        let _ = writeln!(self.out, "\nrule {} (ATTACH=\"{}\")", rule.location(), rule.attach);
        self.parents_started = false;
    }

    fn test(&mut self, level: Option<(usize, &str)>, test: &Test, value: Option<&[u8]>, pass: bool) {
        let mut seen = String::new();
        rules::show_value(&mut seen, value);
        let mark = if pass { "pass" } else { "FAIL" };
        let test = test.to_string();
        match level {
            None => {
                let _ = writeln!(self.out, "  {mark}  {test:<40} value {seen}");
            }
            Some((depth, devpath)) => {
                if !self.parents_started {
                    let _ = writeln!(self.out, "  parent keys, all on one device, walking up from the device:");
                    self.parents_started = true;
                }
                let name = crate::uevent::kernel_name(devpath);
                let _ = writeln!(self.out, "    [{depth}] {name:<14} {mark}  {test:<36} value {seen}");
            }
        }
    }

    fn parents(&mut self, found: Option<(usize, &str)>) {
        let _ = match found {
            Some((depth, devpath)) => {
                writeln!(self.out, "  every parent key holds on [{depth}] {devpath}")
            }
            None => writeln!(
                self.out,
                "  no device passed all parent keys (udev: \"no parent device passed parent conditions\")"
            ),
        };
        self.parents_started = false;
    }

    fn verdict(&mut self, matched: bool) {
        let _ = writeln!(self.out, "  => {}", if matched { "MATCH" } else { "no match" });
    }
}

fn list(opts: &Opts) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let parsed = load_rules(&opts.rules, qubesdb(opts).as_ref());
    rules_or_fail(&parsed)?;
    let mut matcher = rules::Matcher::new(&parsed.set);
    let mut out = std::io::stdout().lock();
    for devpath in sysfs.scan() {
        let Some(datagram) = engine::synthetic_add(&sysfs, &devpath) else {
            continue;
        };
        let Ok(event) = Uevent::parse(&datagram) else {
            continue;
        };
        if engine::attachable(&event).is_none() {
            continue;
        }
        let rule = match matcher.first_match(&sysfs, &parsed.set, &event) {
            Some(i) => format!("{} -> ATTACH=\"{}\"", parsed.set.rules[i].location(), parsed.set.rules[i].attach),
            None => "no rule".into(),
        };
        let identity = sysfs.identity(&devpath);
        let interfaces = identity.usb.as_ref().map(|u| sysfs.usb_interfaces(&u.devpath)).unwrap_or_default();
        let _ = writeln!(
            out,
            "{identity}{}{interfaces}\n    {devpath}\n    {rule}",
            if interfaces.is_empty() { "" } else { " interfaces " }
        );
    }
    Ok(0)
}

fn record(opts: &Opts, name: &str) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let (devpath, _) = present_event(&sysfs, name)?;
    let io_fail =
        |e: std::io::Error| Failure { code: crate::replay::EXIT_INPUT, message: format!("recording {devpath}: {e}") };
    match &opts.output {
        Some(path) => {
            let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io_fail)?);
            crate::umockdev::record(&sysfs, &devpath, &mut file).map_err(io_fail)?;
            file.flush().map_err(io_fail)?;
            info!("recorded {devpath} and its parents to {}", path.display());
        }
        None => crate::umockdev::record(&sysfs, &devpath, &mut std::io::stdout().lock()).map_err(io_fail)?,
    }
    Ok(0)
}

fn replay(opts: &Opts) -> Result<u8, Failure> {
    let ropts = crate::replay::ReplayOptions {
        fixture: opts.args[0].clone().into(),
        events: opts.args.get(1).map(PathBuf::from),
        rules: (!opts.rules.is_empty()).then(|| opts.rules.clone()),
        dev: opts.dev.clone(),
        qubesdb: opts
            .qubesdb_read
            .clone()
            .map(|path| crate::qubesdb::Program { path, timeout: crate::readiness::QUBESDB_TIMEOUT }),
        client: opts.client.as_ref().map_or_else(|| "qrexec-client-vm".into(), |c| c.display().to_string()),
        config: config(opts),
    };
    let calls = crate::replay::replay(&ropts, &|paths| {
        let mut parsed = Parsed::default();
        for p in paths {
            parsed.add_path(p, true);
        }
        parsed
    })
    .map_err(|e| Failure { code: e.code, message: e.message })?;
    let mut out = std::io::stdout().lock();
    for call in calls {
        let _ = writeln!(out, "{call}");
    }
    Ok(0)
}
