//! The command line: commands, their options, and the help text, from one table each.
//!
//! [`COMMANDS`] and [`OPTIONS`] are the only description of the command line: `--help`, the
//! per-command help, the checks that an option applies to the command given, and the tests
//! that the man page and the shell completions agree with it all read them. Arguments are
//! parsed with `lexopt` (`-vv`, `-ofile`, `--opt=value`, `--`), and paths stay `OsString`
//! from argv to the system call.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::exit::{self, Failure};
use crate::rules;
use crate::uevent::Action;

/// A subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Check,
    Test,
    List,
    Record,
    Replay,
    Help,
}

use Command::*;

/// Every command but `help`, which takes no options of its own.
const ALL: &[Command] = &[Run, Check, Test, List, Record, Replay, Help];

/// One command: its name, arguments, help and exit codes.
#[derive(Debug)]
pub struct CommandSpec {
    pub command: Command,
    pub name: &'static str,
    /// The positional arguments as the synopsis shows them.
    pub args: &'static str,
    /// How many positional arguments it takes (min, max; `usize::MAX`: any number).
    pub count: (usize, usize),
    /// One line, for the command list.
    pub summary: &'static str,
    /// What `autoattach COMMAND --help` says before the options.
    pub about: &'static str,
    /// The exit codes it can end with.
    pub exits: &'static [u8],
}

/// The commands, in the order `--help` lists them.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        command: Run,
        name: "run",
        args: "",
        count: (0, 0),
        summary: "the agent: kernel uevents in, qrexec calls out (--dry-run prints them)",
        about: "\
Runs the agent: reads kernel uevents, matches devices against the rules, waits until a
matched device is ready (node, media, driver, published in qubesdb) and calls
qrexec-client-vm dom0 custom.USBDeviceAttach+QUBE+__+DEV+__+IDENT, where IDENT names the
device matched; when an attached block device is removed, or its media removed,
custom.USBDeviceDetach with the same argument. Devices present at start are matched too.
SIGHUP rereads the rules (a broken set, or qubesdb not answering, keeps the old one);
SIGTERM and SIGINT stop it, leaving calls in flight alone.",
        exits: &[0, 2, 3, 4],
    },
    CommandSpec {
        command: Check,
        name: "check",
        args: "[FILE|DIR]...",
        count: (0, usize::MAX),
        summary: "validate rules: every error, and rules that are risky or can never attach",
        about: "\
Reads the rules (the FILEs and DIRs given, with --rules too, or else the default places and
qubesdb), says where it looked and what it found there, and prints every error as
file:line:col: message, then warnings for rules that are risky or can never attach. A DIR
contributes its *.rules files in name order. With no rules anywhere it says so. Exits 3
if there is an error, else 4 if qubesdb could not be asked (the rules are incomplete).",
        exits: &[0, 2, 3, 4],
    },
    CommandSpec {
        command: Test,
        name: "test",
        args: "DEVICE",
        count: (1, 1),
        summary: "why DEVICE matches or not, rule by rule and key by key",
        about: "\
Explains, rule by rule and key by key (parent keys device by device), why a present DEVICE
matches or not, with the values seen; for the first rule that matches, probes readiness
now and prints the call the agent would make. DEVICE is a name (sdb1, /dev/sdb1), a USB
bus id (2-1.4) or a sysfs path. The event is built from sysfs, with --action's action.
On remove the agent never attaches: the rules are still explained, and the exit status
is 1.",
        exits: &[0, 1, 2, 3, 4, 5],
    },
    CommandSpec {
        command: List,
        name: "list",
        args: "",
        count: (0, 0),
        summary: "present devices: their identity, labelled, the rule that matches, a rule line",
        about: "\
Lists every present block device and USB device that could be attached: its identity
(vendor:product, strings, serial, interfaces, size), labelled, the rule that matches it,
and a rule line for it, ready to paste into a rules file (set ATTACH to your qube). The
output is itself a valid rules file: the descriptions are comments. A line is printed only
if it parses and matches its device; the lines that would also match another present
device say so.",
        exits: &[0, 2, 3, 4],
    },
    CommandSpec {
        command: Record,
        name: "record",
        args: "DEVICE",
        count: (1, 1),
        summary: "write a umockdev recording of DEVICE and its parents (-o FILE)",
        about: "\
Writes a umockdev recording of DEVICE and its parents (umockdev-record's format), for bug
reports and test fixtures. `autoattach replay` reads it back.",
        exits: &[0, 2, 4, 5],
    },
    CommandSpec {
        command: Replay,
        name: "replay",
        args: "FIXTURE [EVENTS]",
        count: (1, 2),
        summary: "the pipeline over a fixture; prints the calls it would make",
        about: "\
Runs the agent's pipeline over FIXTURE (a sysfs tree, a case directory or a umockdev
recording) and EVENTS (a `udevadm monitor --kernel --property` capture; without it, the
devices of FIXTURE as coldplug), in virtual time, and prints the calls it would make, one
a line. A case directory holds sys/ or device.umockdev, and events, rules, dev/.",
        exits: &[0, 2, 3, 5],
    },
    CommandSpec {
        command: Help,
        name: "help",
        args: "[COMMAND]",
        count: (0, 1),
        summary: "this text, or a command's (same as COMMAND --help)",
        about: "Prints the help of COMMAND, or the list of commands.",
        exits: &[0, 2],
    },
];

/// One option.
#[derive(Debug)]
pub struct OptSpec {
    pub long: &'static str,
    pub short: Option<char>,
    /// The value's name in help (`PATH`); None for a flag.
    pub value: Option<&'static str>,
    pub help: &'static str,
    pub commands: &'static [Command],
}

const RULES_USERS: &[Command] = &[Run, Check, Test, List, Replay];

/// The options, in the order help lists them.
pub const OPTIONS: &[OptSpec] = &[
    OptSpec {
        long: "rules",
        short: None,
        value: Some("PATH"),
        help: "a rules file or a directory of *.rules (repeatable); default: /etc/autoattach/rules.d, \
               /rw/config/autoattach, then qubesdb /vm-config/autoattach-rules",
        commands: RULES_USERS,
    },
    OptSpec {
        long: "sysfs",
        short: None,
        value: Some("DIR"),
        help: "the sysfs root (default /sys)",
        commands: &[Run, Test, List, Record],
    },
    OptSpec {
        long: "dev",
        short: None,
        value: Some("DIR"),
        help: "the device node directory (default /dev); another DIR may hold regular files \
               standing in for nodes (fixtures); record notes which block nodes are unreadable",
        commands: &[Run, Test, Replay, Record],
    },
    OptSpec {
        long: "qrexec-client",
        short: None,
        value: Some("PATH"),
        help: "the client that makes calls (default qrexec-client-vm)",
        commands: &[Run, Test, Replay],
    },
    OptSpec {
        long: "qubesdb-read",
        short: None,
        value: Some("PATH"),
        help: "wait for qubesdb to publish devices, and read rules from it, with this reader \
               (default: qubesdb-read, if installed)",
        commands: &[Run, Check, Test, List, Replay],
    },
    OptSpec {
        long: "qubesdb-socket",
        short: None,
        value: Some("PATH"),
        help: "the qubesdb daemon's socket, read and watched for publication (default: this qube's)",
        commands: &[Run],
    },
    OptSpec {
        long: "no-qubesdb",
        short: None,
        value: None,
        help: "neither wait for qubesdb nor read rules from it",
        commands: &[Run, Check, Test, List],
    },
    OptSpec {
        long: "action",
        short: None,
        value: Some("ACTION"),
        help: "the event to test: add (default), change or remove",
        commands: &[Test],
    },
    OptSpec {
        long: "dry-run",
        short: None,
        value: None,
        help: "print each call instead of making it",
        commands: &[Run],
    },
    OptSpec {
        long: "timeout",
        short: None,
        value: Some("DURATION"),
        help: "how long to wait for readiness, for rules without TIMEOUT (default 30s)",
        commands: &[Run, Replay],
    },
    OptSpec {
        long: "debounce",
        short: None,
        value: Some("DURATION"),
        help: "how long a device must stay before it is called (default 0)",
        commands: &[Run, Replay],
    },
    OptSpec {
        long: "rate-limit",
        short: None,
        value: Some("N/DURATION"),
        help: "at most N calls per rule per window (default 10/1m; 0 turns it off)",
        commands: &[Run, Replay],
    },
    OptSpec {
        long: "no-detach",
        short: None,
        value: None,
        help: "do not call custom.USBDeviceDetach when an attached block device goes",
        commands: &[Run, Replay],
    },
    OptSpec {
        long: "slow-call",
        short: None,
        value: Some("DURATION"),
        help: "log a call still running after this long (default 2m); calls are never killed",
        commands: &[Run],
    },
    OptSpec {
        long: "rcvbuf",
        short: None,
        value: Some("BYTES"),
        help: "the uevent socket's receive buffer to ask for (default 8 MiB)",
        commands: &[Run],
    },
    OptSpec {
        long: "output",
        short: Some('o'),
        value: Some("FILE"),
        help: "where to write the recording (default: standard output)",
        commands: &[Record],
    },
    OptSpec {
        long: "verbose",
        short: Some('v'),
        value: None,
        help: "more detail (debug lines); -vv is the same",
        commands: ALL,
    },
    OptSpec { long: "quiet", short: Some('q'), value: None, help: "warnings and errors only", commands: ALL },
    OptSpec { long: "help", short: Some('h'), value: None, help: "this text", commands: ALL },
    OptSpec { long: "version", short: None, value: None, help: "the version", commands: ALL },
];

/// The command line, parsed.
#[derive(Debug, Default)]
pub struct Opts {
    pub command: Option<Command>,
    /// Positional arguments after the command, as given.
    pub args: Vec<OsString>,
    pub rules: Vec<PathBuf>,
    pub sysfs: Option<PathBuf>,
    pub dev: Option<PathBuf>,
    pub client: Option<PathBuf>,
    pub qubesdb_read: Option<PathBuf>,
    pub qubesdb_socket: Option<PathBuf>,
    pub no_qubesdb: bool,
    pub action: Option<Action>,
    pub dry_run: bool,
    pub timeout: Option<Duration>,
    pub debounce: Option<Duration>,
    /// `Some(None)`: the rate limit turned off.
    pub rate_limit: Option<Option<(u32, Duration)>>,
    pub no_detach: bool,
    pub slow_call: Option<Duration>,
    pub rcvbuf: Option<usize>,
    pub output: Option<PathBuf>,
    pub verbosity: i8,
    pub help: bool,
    pub version: bool,
    /// The options given, by long name, to check that they apply to the command.
    seen: Vec<&'static str>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Request {
    /// Print this help text and exit 0.
    Help(String),
    Version,
    Run(Box<Opts>),
}

pub fn spec(command: Command) -> &'static CommandSpec {
    COMMANDS.iter().find(|c| c.command == command).unwrap_or(&COMMANDS[0])
}

fn option(long: &str) -> Option<&'static OptSpec> {
    OPTIONS.iter().find(|o| o.long == long)
}

/// Parses the arguments after the program name. `-h`/`--help` anywhere before `--` wins over
/// any other error, as in most tools: the help of the command, if one was named.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Request, Failure> {
    let mut opts = Opts::default();
    let mut first_error = None;
    let mut parser = lexopt::Parser::from_args(args);
    // lexopt clears its state after an error, so parsing can go on to find -h; the bound is
    // a guard against a parser that would not.
    for _ in 0..100_000 {
        match next(&mut parser, &mut opts) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if opts.help {
        return Ok(Request::Help(match opts.command {
            Some(Help) | None => help_text(),
            Some(c) => command_help(c),
        }));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if opts.version {
        return Ok(Request::Version);
    }
    let Some(command) = opts.command else {
        return Err(Failure::usage("no command given"));
    };
    validate(&opts, command)?;
    if command == Help {
        return help_command(&opts.args);
    }
    Ok(Request::Run(Box::new(opts)))
}

/// Reads one argument; false at the end.
fn next(parser: &mut lexopt::Parser, opts: &mut Opts) -> Result<bool, Failure> {
    use lexopt::Arg;
    let hint = |opts: &Opts| {
        opts.command.map_or("autoattach --help".to_owned(), |c| format!("autoattach {} --help", spec(c).name))
    };
    let arg = match parser.next() {
        Ok(Some(arg)) => arg,
        Ok(None) => return Ok(false),
        Err(e) => return Err(lexopt_error(e, &hint(opts))),
    };
    let spec = match arg {
        Arg::Short(c) => OPTIONS
            .iter()
            .find(|o| o.short == Some(c))
            .ok_or_else(|| usage_in(format!("unknown option -{}", c.escape_default()), &hint(opts)))?,
        Arg::Long(name) => {
            let text = format!("unknown option --{}", crate::log::Escaped(name.as_bytes()));
            option(name).ok_or_else(|| usage_in(text, &hint(opts)))?
        }
        Arg::Value(value) => {
            positional(opts, value)?;
            return Ok(true);
        }
    };
    opts.seen.push(spec.long);
    match spec.value {
        None => flag(opts, spec.long),
        Some(what) => {
            let value = parser
                .value()
                .map_err(|_| usage_in(format!("--{} needs a value: --{} {what}", spec.long, spec.long), &hint(opts)))?;
            valued(opts, spec.long, value).map_err(|e| usage_in(e, &hint(opts)))?;
        }
    }
    Ok(true)
}

fn positional(opts: &mut Opts, value: OsString) -> Result<(), Failure> {
    if opts.command.is_some() {
        opts.args.push(value);
        return Ok(());
    }
    let name = value.to_string_lossy();
    let command = COMMANDS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Failure::usage(format!("unknown command \"{}\"", crate::log::Escaped(name.as_bytes()))))?;
    opts.command = Some(command.command);
    Ok(())
}

fn flag(opts: &mut Opts, long: &str) {
    match long {
        "verbose" => opts.verbosity = opts.verbosity.saturating_add(1),
        "quiet" => opts.verbosity = opts.verbosity.saturating_sub(1),
        "help" => opts.help = true,
        "version" => opts.version = true,
        "dry-run" => opts.dry_run = true,
        "no-qubesdb" => opts.no_qubesdb = true,
        "no-detach" => opts.no_detach = true,
        _ => {}
    }
}

/// Stores an option's value; the error is the message of a usage error.
fn valued(opts: &mut Opts, long: &str, value: OsString) -> Result<(), String> {
    match long {
        "rules" => opts.rules.push(value.into()),
        "sysfs" => opts.sysfs = Some(value.into()),
        "dev" => opts.dev = Some(value.into()),
        "qrexec-client" => opts.client = Some(value.into()),
        "qubesdb-read" => opts.qubesdb_read = Some(value.into()),
        "qubesdb-socket" => opts.qubesdb_socket = Some(value.into()),
        "output" => opts.output = Some(value.into()),
        _ => {
            let text = value.to_string_lossy();
            let shown = crate::log::Escaped(text.as_bytes());
            match long {
                "timeout" => opts.timeout = Some(duration(long, &text)?),
                "debounce" => opts.debounce = Some(duration(long, &text)?),
                "slow-call" => opts.slow_call = Some(duration(long, &text)?),
                "rate-limit" => opts.rate_limit = Some(rate(&text)?),
                "rcvbuf" => {
                    let n = text.parse().ok().filter(|&n| n >= 4096);
                    opts.rcvbuf = Some(n.ok_or(format!("--rcvbuf \"{shown}\": expected bytes, at least 4096"))?);
                }
                "action" => {
                    let action = Action::parse(text.as_bytes())
                        .filter(|a| matches!(a, Action::Add | Action::Change | Action::Remove));
                    opts.action = Some(action.ok_or(format!("--action \"{shown}\": expected add, change or remove"))?);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn duration(long: &str, text: &str) -> Result<Duration, String> {
    rules::parse_duration(text).ok_or_else(|| {
        format!("--{long} \"{}\": not a duration (e.g. 30s, 500ms, 2m)", crate::log::Escaped(text.as_bytes()))
    })
}

fn rate(text: &str) -> Result<Option<(u32, Duration)>, String> {
    let shown = crate::log::Escaped(text.as_bytes());
    if matches!(text, "0" | "off") {
        return Ok(None);
    }
    let (n, d) = text.split_once('/').ok_or(format!("--rate-limit \"{shown}\": expected N/DURATION, e.g. 10/1m"))?;
    let n = n.parse().ok().filter(|&n| n > 0).ok_or(format!("--rate-limit \"{shown}\": bad count"))?;
    Ok(Some((n, duration("rate-limit", d)?)))
}

fn usage_in(message: impl std::fmt::Display, hint: &str) -> Failure {
    Failure::new(exit::USAGE, format!("{message}; see `{hint}`"))
}

fn lexopt_error(e: lexopt::Error, hint: &str) -> Failure {
    use lexopt::Error as E;
    let message = match e {
        E::UnexpectedValue { option, .. } => format!("{option} takes no value"),
        E::MissingValue { option: Some(option) } => format!("{option} needs a value"),
        E::UnexpectedArgument(arg) => {
            format!("unexpected argument \"{}\"", crate::log::Escaped(arg.to_string_lossy().as_bytes()))
        }
        other => other.to_string(),
    };
    usage_in(message, hint)
}

/// Every option given applies to the command, and the positional arguments fit.
fn validate(opts: &Opts, command: Command) -> Result<(), Failure> {
    let spec = spec(command);
    let hint = format!("autoattach {} --help", spec.name);
    for long in &opts.seen {
        let Some(o) = option(long) else { continue };
        if !o.commands.contains(&command) {
            let users: Vec<&str> = o.commands.iter().map(|c| self::spec(*c).name).collect();
            let message = format!("{} does not take --{long} (an option of {})", spec.name, users.join(", "));
            return Err(usage_in(message, &hint));
        }
    }
    let n = opts.args.len();
    if n < spec.count.0 || n > spec.count.1 {
        let message = match (spec.count, n) {
            ((0, 0), _) => format!(
                "{} takes no arguments (\"{}\" given)",
                spec.name,
                crate::log::Escaped(opts.args[0].to_string_lossy().as_bytes())
            ),
            _ => format!("{} takes {}", spec.name, spec.args),
        };
        return Err(usage_in(message, &hint));
    }
    Ok(())
}

fn help_command(args: &[OsString]) -> Result<Request, Failure> {
    let Some(name) = args.first() else {
        return Ok(Request::Help(help_text()));
    };
    let name = name.to_string_lossy();
    match COMMANDS.iter().find(|c| c.name == name) {
        Some(c) if c.command != Help => Ok(Request::Help(command_help(c.command))),
        Some(_) => Ok(Request::Help(help_text())),
        None => Err(Failure::usage(format!("unknown command \"{}\"", crate::log::Escaped(name.as_bytes())))),
    }
}

// ---------------------------------------------------------------------------------------------
// Help

/// `autoattach --help`.
pub fn help_text() -> String {
    let mut out = String::from(
        "usage: autoattach COMMAND [OPTIONS] [ARGUMENTS]\n\n\
         Attach trusted USB devices from the Qubes OS USB qube to the qube you chose.\n\ncommands:\n",
    );
    for c in COMMANDS {
        let head = format!("{} {}", c.name, c.args);
        let head = head.trim_end();
        if head.len() >= 22 {
            let _ = writeln!(out, "  {head}\n  {:<22}{}", "", c.summary);
        } else {
            let _ = writeln!(out, "  {head:<22}{}", c.summary);
        }
    }
    out.push_str(
        "\n`autoattach COMMAND --help` lists the options of COMMAND; an option a command does not\n\
         take is a usage error. DEVICE is a name (sdb1, /dev/sdb1), a USB bus id (2-1.4) or a\n\
         sysfs path. DURATION is 500ms, 30s, 2m, 1h.\n\noptions of every command:\n",
    );
    for o in OPTIONS.iter().filter(|o| o.commands == ALL) {
        option_line(&mut out, o);
    }
    exit_codes(&mut out, &CODES_ALL);
    out.push_str("\nSee autoattach(8) and autoattach.rules(5).\n");
    out
}

const CODES_ALL: [u8; 6] = [0, 1, 2, 3, 4, 5];

/// `autoattach COMMAND --help`.
pub fn command_help(command: Command) -> String {
    let c = spec(command);
    let usage = format!("usage: autoattach {} [OPTIONS] {}", c.name, c.args);
    let mut out = format!("{}\n\n{}\n\noptions:\n", usage.trim_end(), c.about);
    for o in OPTIONS.iter().filter(|o| o.commands.contains(&command)) {
        option_line(&mut out, o);
    }
    exit_codes(&mut out, c.exits);
    out
}

fn option_line(out: &mut String, o: &OptSpec) {
    let mut head = match o.short {
        Some(s) => format!("-{s}, --{}", o.long),
        None => format!("--{}", o.long),
    };
    if let Some(v) = o.value {
        head.push(' ');
        head.push_str(v);
    }
    let help = o.help.split_whitespace().collect::<Vec<_>>();
    let mut lines = vec![String::new()];
    for word in help {
        let line = lines.last_mut().unwrap_or_else(|| unreachable!());
        if !line.is_empty() && line.len() + 1 + word.len() > 62 {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    if head.len() > 24 {
        let _ = writeln!(out, "  {head}");
        head.clear();
    }
    for (i, line) in lines.iter().enumerate() {
        let _ = writeln!(out, "  {:<24}{line}", if i == 0 { head.as_str() } else { "" });
    }
}

fn exit_codes(out: &mut String, codes: &[u8]) {
    out.push_str("\nexit codes:\n");
    for code in codes {
        let _ = writeln!(out, "  {code}  {}", exit::meaning(*code).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Request, Failure> {
        parse(args.iter().map(OsString::from))
    }

    fn opts(args: &[&str]) -> Opts {
        match parse_args(args) {
            Ok(Request::Run(o)) => *o,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn usage(args: &[&str]) -> String {
        match parse_args(args) {
            Err(f) if f.code == exit::USAGE => f.message,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn short_clusters_attached_values_equals_and_double_dash() {
        let o = opts(&["-vv", "run", "-q", "--rules=/a", "--rules", "/b"]);
        assert_eq!((o.command, o.verbosity), (Some(Run), 1));
        assert_eq!(o.rules, [PathBuf::from("/a"), PathBuf::from("/b")]);
        let o = opts(&["record", "-o/tmp/x", "sda"]);
        assert_eq!(o.output, Some(PathBuf::from("/tmp/x")));
        let o = opts(&["record", "sda", "--output=-v"]);
        assert_eq!(o.output, Some(PathBuf::from("-v")));
        let o = opts(&["check", "--", "-weird.rules", "--rules"]);
        assert_eq!(o.args, [OsString::from("-weird.rules"), OsString::from("--rules")]);
    }

    #[test]
    fn paths_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(b"/tmp/\xff.rules".to_vec());
        let args = [OsString::from("check"), bad.clone(), OsString::from("--rules"), bad.clone()];
        let Ok(Request::Run(o)) = parse(args) else { panic!() };
        assert_eq!(o.args, std::slice::from_ref(&bad));
        assert_eq!(o.rules, [PathBuf::from(bad)]);
    }

    #[test]
    fn options_that_do_not_apply_are_usage_errors_naming_the_command() {
        let m = usage(&["list", "-o", "x"]);
        assert!(m.starts_with("list does not take --output (an option of record)"), "{m}");
        assert!(m.ends_with("see `autoattach list --help`"), "{m}");
        let m = usage(&["check", "--dry-run"]);
        assert!(m.starts_with("check does not take --dry-run (an option of run)"), "{m}");
        // Given before the command, too.
        assert!(usage(&["--action", "add", "run"]).starts_with("run does not take --action"));
        assert!(usage(&["list", "extra"]).starts_with("list takes no arguments (\"extra\" given)"));
        assert!(usage(&["test"]).starts_with("test takes DEVICE"));
        assert!(usage(&["test", "--action", "bind", "sda"]).starts_with("--action \"bind\": expected add"));
        assert!(usage(&["run", "--dry-run=yes"]).starts_with("--dry-run takes no value"));
        assert!(usage(&["run", "--timeout"]).starts_with("--timeout needs a value: --timeout DURATION"));
        assert!(usage(&["run", "-x"]).starts_with("unknown option -x"));
        assert!(usage(&[]).starts_with("no command given"));
    }

    #[test]
    fn help_anywhere_describes_the_command() {
        let help = |args: &[&str]| match parse_args(args) {
            Ok(Request::Help(text)) => text,
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(help(&["test", "-h"]), command_help(Test));
        assert_eq!(help(&["-h", "list", "-o", "x", "--bogus"]), command_help(List));
        assert_eq!(help(&["help", "list"]), command_help(List));
        assert_eq!(help(&["--help"]), help_text());
        assert_ne!(command_help(Test), command_help(List));
        assert!(command_help(Test).contains("--action ACTION"));
        assert!(!command_help(List).contains("--action"));
    }

    /// The defaults help states are the program's own (a change to one shows here).
    #[test]
    fn stated_defaults_are_the_programs() {
        let help = |long: &str| OPTIONS.iter().find(|o| o.long == long).map(|o| o.help).unwrap_or_default();
        let config = crate::engine::Config::default();
        let mib = crate::netlink::DEFAULT_RCVBUF >> 20;
        assert!(help("rcvbuf").contains(&format!("(default {mib} MiB)")), "{}", help("rcvbuf"));
        let secs = config.timeout.as_secs();
        assert!(help("timeout").contains(&format!("(default {secs}s)")), "{}", help("timeout"));
        let (n, window) = config.rate_limit.unwrap_or_default();
        let rate = format!("(default {n}/{}m;", window.as_secs() / 60);
        assert!(help("rate-limit").contains(&rate), "{}", help("rate-limit"));
        assert_eq!(config.debounce, Duration::ZERO);
        assert!(help("debounce").contains("(default 0)"));
        let slow = format!("(default {}m)", super::super::SLOW_CALL.as_secs() / 60);
        assert!(help("slow-call").contains(&slow), "{}", help("slow-call"));
    }

    #[test]
    fn every_option_is_handled() {
        for o in OPTIONS {
            let mut opts = Opts::default();
            let before = format!("{opts:?}");
            match o.value {
                None => flag(&mut opts, o.long),
                Some(_) => {
                    let value = match o.long {
                        "rate-limit" => "3/1m",
                        "timeout" | "debounce" | "slow-call" => "1s",
                        "rcvbuf" => "65536",
                        "action" => "change",
                        _ => "/x",
                    };
                    valued(&mut opts, o.long, value.into()).unwrap();
                }
            }
            assert_ne!(format!("{opts:?}"), before, "--{} changes nothing", o.long);
        }
    }
}
