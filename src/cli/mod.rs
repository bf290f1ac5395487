//! The command line: parse ([`args`]), then run one command. Each command's code is a
//! module of its own: where rules come from and `check` (`sources`), `test` (`explain`),
//! `list` (`list`); `run`, `record` and `replay` are wiring, here.
//!
//! Every failure is an [`exit::Failure`]; [`main`] prints it and returns its code, which
//! `main.rs` hands back to the system.

pub mod args;
mod explain;
mod list;
mod sources;

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::engine::{self, Config};
use crate::exit::{self, Failure};
use crate::readiness::Publication;
use crate::runloop::{self, RuleLoader, RunOptions};
use crate::sysfs::Sysfs;

pub use args::{Command, Opts, Request};
pub use sources::QUBESDB_RULES;

/// Entry point: parses arguments, runs the command, turns failures into exit codes.
pub fn main() -> ExitCode {
    ExitCode::from(main_with(std::env::args_os().skip(1)))
}

/// [`main`] over given arguments: the exit code.
pub fn main_with(argv: impl IntoIterator<Item = OsString>) -> u8 {
    let request = args::parse(argv);
    let verbosity = match &request {
        Ok(Request::Run(o)) => o.verbosity,
        _ => 0,
    };
    crate::log::init(match verbosity {
        i8::MIN..=-1 => crate::log::Level::Warning,
        0 => crate::log::Level::Info,
        _ => crate::log::Level::Debug,
    });
    let result = request.and_then(|request| match request {
        Request::Help(text) => print(&text).map(|()| exit::SUCCESS),
        Request::Version => print(&format!("autoattach {}\n", env!("CARGO_PKG_VERSION"))).map(|()| exit::SUCCESS),
        Request::Run(opts) => dispatch(&opts),
    });
    match result {
        Ok(code) => code,
        Err(f) => {
            error!("{}", f.message);
            f.code
        }
    }
}

/// Writes to stdout; a closed pipe (`autoattach list | head`) is not an error worth a code.
fn print(text: &str) -> Result<(), Failure> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::fatal(format!("standard output: {e}"))),
        _ => Ok(()),
    }
}

fn dispatch(opts: &Opts) -> Result<u8, Failure> {
    match opts.command.unwrap_or(Command::Help) {
        Command::Run => run(opts),
        Command::Check => sources::check(opts),
        Command::Test => explain::test(opts, utf8_arg(&opts.args[0], "DEVICE")?),
        Command::List => list::list(opts),
        Command::Record => record(opts, utf8_arg(&opts.args[0], "DEVICE")?),
        Command::Replay => replay(opts),
        Command::Help => print(&args::help_text()).map(|()| exit::SUCCESS),
    }
}

/// A device name: sysfs names are ASCII, so one that is not UTF-8 cannot name a device.
fn utf8_arg<'a>(arg: &'a OsString, what: &str) -> Result<&'a str, Failure> {
    arg.to_str().ok_or_else(|| {
        let shown = crate::log::Escaped(arg.as_encoded_bytes());
        Failure::input(format!("{what} \"{shown}\": no device has such a name (not UTF-8)"))
    })
}

// ---------------------------------------------------------------------------------------------
// What the commands share

/// The qubesdb reader the options ask for (the probes'; rule loading makes its own).
fn qubesdb(opts: &Opts) -> Option<Publication> {
    qubesdb_with(opts.no_qubesdb, opts.qubesdb_read.as_deref(), opts.qubesdb_socket.as_deref())
}

/// How to reach qubesdb, if at all: `--no-qubesdb`: never; `--qubesdb-read PATH`: that
/// program; `--qubesdb-socket PATH`: the daemon there (logged, and None, if it does not
/// answer); by default this qube's qubesdb socket, else `qubesdb-read` if installed.
fn qubesdb_with(no_qubesdb: bool, reader: Option<&Path>, socket: Option<&Path>) -> Option<Publication> {
    match socket {
        Some(socket) if !no_qubesdb && reader.is_none() => Publication::at(socket).map_err(|e| error!("{e}")).ok(),
        _ => Publication::choose(no_qubesdb, reader),
    }
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

fn sysfs_root(opts: &Opts) -> PathBuf {
    opts.sysfs.clone().unwrap_or_else(|| "/sys".into())
}

/// The sysfs tree: the system's `/sys` missing is fatal (4); a `--sysfs DIR` that is not there
/// is input not found (5), like any fixture.
fn sysfs(opts: &Opts) -> Result<Sysfs, Failure> {
    let root = sysfs_root(opts);
    let code = if opts.sysfs.is_some() { exit::INPUT } else { exit::FATAL };
    Sysfs::new(&root).map_err(|e| Failure::new(code, format!("sysfs: {e}")))
}

fn client(opts: &Opts) -> PathBuf {
    opts.client.clone().unwrap_or_else(|| "qrexec-client-vm".into())
}

/// A present device's event with `action` (an `add` as coldplug builds it, with the action
/// replaced), from sysfs. Not found is exit code 5.
fn present_event(sysfs: &Sysfs, name: &str, action: &str) -> Result<(String, Vec<u8>), Failure> {
    let not_found = || {
        Failure::input(format!(
            "no device \"{}\" under {} (give a name like sdb1, a bus id like 2-1, or a sysfs path)",
            crate::log::Escaped(name.as_bytes()),
            sysfs.root().display()
        ))
    };
    let devpath = sysfs.resolve(name).ok_or_else(not_found)?;
    let add = engine::synthetic_add(sysfs, &devpath).ok_or_else(not_found)?;
    Ok((devpath, with_action(&add, action)))
}

/// `add`'s datagram with another action: the header and the ACTION variable.
fn with_action(add: &[u8], action: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(add.len() + 8);
    for (i, field) in add.split(|&b| b == 0).enumerate() {
        if i == 0 {
            out.extend_from_slice(action.as_bytes());
            out.extend_from_slice(field.strip_prefix(b"add").unwrap_or(field));
        } else if field == b"ACTION=add" {
            out.extend_from_slice(b"ACTION=");
            out.extend_from_slice(action.as_bytes());
        } else {
            out.extend_from_slice(field);
        }
        out.push(0);
    }
    out.pop();
    out
}

// ---------------------------------------------------------------------------------------------
// Commands that are wiring

/// After this long a call still running is logged (`--slow-call`).
pub const SLOW_CALL: Duration = Duration::from_secs(120);

/// `autoattach run`: everything the agent needs, then the loop. The one place that builds
/// [`RunOptions`].
fn run(opts: &Opts) -> Result<u8, Failure> {
    let sources = sources::Sources::of(opts);
    let db = qubesdb(opts);
    if db.is_none() && opts.qubesdb_socket.is_some() && !opts.no_qubesdb {
        let message = "--qubesdb-socket: no qubesdb there, and a device is never called unverified";
        return Err(Failure::new(exit::FATAL, message.to_owned()));
    }
    let watch = db.as_ref().filter(|db| db.watches()).map(|_| match &opts.qubesdb_socket {
        Some(socket) => runloop::Connect::at(socket.clone()),
        None => runloop::Connect::local(),
    });
    let options = RunOptions {
        sysfs: sysfs_root(opts),
        dev: opts.dev.clone().unwrap_or_else(|| "/dev".into()),
        load_rules: RuleLoader(Box::new(move || sources.load())),
        client: client(opts),
        qubesdb: db,
        dry_run: opts.dry_run,
        config: config(opts),
        rcvbuf: opts.rcvbuf.unwrap_or(crate::netlink::DEFAULT_RCVBUF),
        child_bound: opts.slow_call.unwrap_or(SLOW_CALL),
        workers: runloop::WORKERS,
        probe_deadline: runloop::PROBE_DEADLINE,
        watch,
    };
    runloop::run(options).map(|()| exit::SUCCESS)
}

fn record(opts: &Opts, name: &str) -> Result<u8, Failure> {
    let sysfs = sysfs(opts)?;
    let (devpath, _) = present_event(&sysfs, name, "add")?;
    let io_fail = |e: std::io::Error| Failure::input(format!("recording {devpath}: {e}"));
    // Nodes are looked at under --dev, or /dev for the system's own sysfs: the system's
    // /dev says nothing about a fixture tree's devices.
    let dev = opts.dev.clone().or_else(|| opts.sysfs.is_none().then(|| "/dev".into()));
    let dev = dev.as_deref();
    match &opts.output {
        Some(path) => {
            let fail = |e: std::io::Error| Failure::input(format!("{}: {e}", path.display()));
            let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(fail)?);
            crate::umockdev::record(&sysfs, &devpath, dev, &mut file).map_err(io_fail)?;
            file.flush().map_err(fail)?;
            info!("recorded {devpath} and its parents to {}", path.display());
        }
        None => crate::umockdev::record(&sysfs, &devpath, dev, &mut std::io::stdout().lock()).map_err(io_fail)?,
    }
    Ok(exit::SUCCESS)
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
        client: client(opts).display().to_string(),
        config: config(opts),
    };
    let calls = crate::replay::replay(&ropts, &|paths| sources::Sources::files(paths).load())
        .map_err(|e| Failure::new(e.exit_code(), e.to_string()))?;
    let mut text = String::new();
    for call in calls {
        text.push_str(&call);
        text.push('\n');
    }
    print(&text).map(|()| exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_action_replaces_the_header_and_the_variable() {
        let add = b"add@/devices/x\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=block";
        assert_eq!(
            with_action(add, "remove"),
            b"remove@/devices/x\0ACTION=remove\0DEVPATH=/devices/x\0SUBSYSTEM=block".to_vec()
        );
        assert_eq!(with_action(add, "add"), add.to_vec());
    }
}
