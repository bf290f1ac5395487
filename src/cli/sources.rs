//! Where rules come from, and `autoattach check`.
//!
//! The rules are the paths given (`--rules`, and `check`'s FILE|DIR arguments), each of which
//! must exist; or else the default places, each of which may be missing: the directory
//! `/etc/autoattach/rules.d` (the template's), `/rw/config/autoattach` (this qube's), then
//! qubesdb `/vm-config/autoattach-rules` (set from dom0). A directory contributes its
//! `*.rules` files in name order. Loading records what it found at each place, so that
//! `check` can say where it looked.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{Opts, print};
use crate::exit::{self, Failure};
use crate::readiness::Publication;
use crate::rules::{Found, Parsed, RuleError, Source};

/// The qubesdb key a disposable sys-usb's rules come from (`qvm-features sys-usb
/// vm-config.autoattach-rules '...'` in dom0).
pub const QUBESDB_RULES: &str = "/vm-config/autoattach-rules";
/// The default rule directories, in the order they are read.
pub const DEFAULT_RULE_DIRS: [&str; 2] = ["/etc/autoattach/rules.d", "/rw/config/autoattach"];

/// Where to read rules.
#[derive(Debug)]
pub struct Sources {
    paths: Vec<PathBuf>,
    /// The paths were named by the user: each must exist; qubesdb is not read.
    required: bool,
    /// `--no-qubesdb` and `--qubesdb-read PATH`: qubesdb is chosen at each load (a reload
    /// gets a fresh reader), as the agent's probes choose theirs.
    no_qubesdb: bool,
    reader: Option<PathBuf>,
    socket: Option<PathBuf>,
}

impl Sources {
    /// The sources the command line names (`--rules`, and `check`'s arguments), else the
    /// default places and, unless told otherwise, qubesdb.
    pub fn of(opts: &Opts) -> Sources {
        let mut paths = opts.rules.clone();
        if opts.command == Some(super::Command::Check) {
            paths.extend(opts.args.iter().map(PathBuf::from));
        }
        if !paths.is_empty() {
            return Sources::files(&paths);
        }
        Sources {
            paths: DEFAULT_RULE_DIRS.iter().map(PathBuf::from).collect(),
            required: false,
            no_qubesdb: opts.no_qubesdb,
            reader: opts.qubesdb_read.clone(),
            socket: opts.qubesdb_socket.clone(),
        }
    }

    /// Exactly these paths, each of which must exist.
    pub fn files(paths: &[PathBuf]) -> Sources {
        Sources { paths: paths.to_vec(), required: true, no_qubesdb: true, reader: None, socket: None }
    }

    /// Reads every source; `parsed.sources` says what each place held.
    pub fn load(&self) -> Parsed {
        let mut parsed = Parsed::default();
        for path in &self.paths {
            parsed.add_path(path, self.required);
        }
        if self.required || self.no_qubesdb {
            return parsed;
        }
        match &self.socket {
            // Named on the command line: a daemon that does not answer there cannot be asked.
            Some(socket) if self.reader.is_none() => match Publication::at(socket) {
                Ok(db) => read_qubesdb(&mut parsed, &db),
                Err(why) => unreachable(&mut parsed, &why),
            },
            _ => {
                if let Some(db) = Publication::choose(false, self.reader.as_deref()) {
                    read_qubesdb(&mut parsed, &db);
                }
            }
        }
        parsed
    }

    /// Why qubesdb was not read, for `check`; None when it was (or should not be).
    fn qubesdb_not_read(&self, parsed: &Parsed) -> Option<&'static str> {
        let read = parsed.sources.iter().any(|s| s.origin.starts_with("qubesdb:"));
        match (self.required || read, self.no_qubesdb) {
            (true, _) => None,
            (false, true) => Some("not read (--no-qubesdb)"),
            (false, false) => Some("not read (no qubesdb here: not a Qubes qube?)"),
        }
    }
}

/// qubesdb's rules: their own source, or `Missing` when the key is not set. A value that is
/// not UTF-8 is an error in the rules (exit 3: waiting does not mend it); a daemon that cannot
/// be asked (not answering, the connection dropped, an answer that is not qubesdb's) leaves
/// the rules incomplete ([`Parsed::unreachable`]: exit 4, which systemd restarts).
fn read_qubesdb(parsed: &mut Parsed, db: &Publication) {
    let origin = format!("qubesdb:{QUBESDB_RULES}");
    match db.read(QUBESDB_RULES) {
        Ok(None) => parsed.sources.push(Source { origin, found: Found::Missing }),
        Ok(Some(text)) => match String::from_utf8(text) {
            Ok(text) => parsed.add(&origin, &text),
            Err(_) => {
                let hint = "set it again from dom0 as UTF-8 text: qvm-features QUBE vm-config.autoattach-rules '...'";
                let (message, hint) = ("not UTF-8".into(), Some(hint.into()));
                parsed.errors.push(RuleError { origin: origin.as_str().into(), line: 0, col: 0, message, hint });
                parsed.sources.push(Source { origin, found: Found::Unreadable });
            }
        },
        Err(why) => unreachable(parsed, &why),
    }
}

/// qubesdb could not be asked for its rules.
fn unreachable(parsed: &mut Parsed, why: &crate::qubesdb::QdbError) {
    let hint = "is qubes-db running? `systemctl status qubes-db`; `autoattach check` asks again; \
                --no-qubesdb does without the rules dom0 sets";
    parsed.unreachable(&format!("qubesdb:{QUBESDB_RULES}"), format!("cannot read: {why}"), hint);
}

// ---------------------------------------------------------------------------------------------
// check

/// `autoattach check [FILE|DIR]...`: where it looked, every error, every warning, a summary.
pub fn check(opts: &Opts) -> Result<u8, Failure> {
    let sources = Sources::of(opts);
    let mut parsed = sources.load();
    let access = service_user_can_read(&sources.paths);
    parsed.warnings.extend(access);
    let mut out = String::from("rules looked for in:\n");
    let mut dir: Option<&str> = None;
    for source in &parsed.sources {
        let inside = dir.is_some_and(|d| source.origin.strip_prefix(d).is_some_and(|r| r.starts_with('/')));
        if !inside {
            dir = matches!(source.found, Found::Directory(_)).then_some(source.origin.as_str());
        }
        let errors = parsed.errors.iter().filter(|e| *e.origin == *source.origin && e.line > 0).count();
        let indent = if inside { "    " } else { "  " };
        let _ = writeln!(out, "{indent}{}: {}", source.origin, describe(&source.found, errors));
    }
    if let Some(why) = sources.qubesdb_not_read(&parsed) {
        let _ = writeln!(out, "  qubesdb:{QUBESDB_RULES}: {why}");
    }
    for e in parsed.errors.iter().chain(&parsed.unreachable) {
        let _ = writeln!(out, "{e}");
    }
    for w in &parsed.warnings {
        let place = if w.line == 0 { w.origin.to_string() } else { format!("{}:{}:{}", w.origin, w.line, w.col) };
        let hint = w.hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default();
        let _ = writeln!(out, "{place}: warning: {}{hint}", w.message);
    }
    if parsed.set.rules.is_empty() && parsed.errors.is_empty() {
        out.push_str("no rules found: the agent would attach nothing\n");
    }
    let _ = write!(
        out,
        "{} rule(s) loaded, {} error(s), {} warning(s)",
        parsed.set.rules.len(),
        parsed.errors.len(),
        parsed.warnings.len()
    );
    if !parsed.unreachable.is_empty() {
        let _ = write!(out, "; {} source(s) could not be asked, so the rules are incomplete", parsed.unreachable.len());
    }
    out.push('\n');
    print(&out)?;
    Ok(match (parsed.errors.is_empty(), parsed.unreachable.is_empty()) {
        (false, _) => exit::RULES,
        (true, false) => exit::FATAL,
        (true, true) => exit::SUCCESS,
    })
}

fn describe(found: &Found, errors: usize) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    match found {
        Found::Missing => "not present".into(),
        Found::Rules(rules) if errors == 0 => plural(*rules, "rule"),
        Found::Rules(rules) => format!("{}, {}", plural(*rules, "rule"), plural(errors, "error")),
        Found::Directory(0) => "directory, no *.rules files".into(),
        Found::Directory(files) => format!("directory, {}", plural(*files, "*.rules file")),
        Found::Unreadable => "cannot be read (see below)".into(),
        Found::Unreachable => "cannot be asked now (see below)".into(),
    }
}

/// The user the packaged service runs as (packaging/autoattach.sysusers).
const SERVICE_USER: &str = "autoattach";

/// As root, a warning for each rules file or directory the service's user cannot read (the
/// agent would then stop with exit code 3). Not root, or no such user here: nothing to say
/// beyond a debug line.
fn service_user_can_read(paths: &[PathBuf]) -> Vec<crate::rules::RuleError> {
    match crate::rules::unreadable_by(paths, SERVICE_USER) {
        Ok(warnings) => warnings,
        Err(why) => {
            debug!("not checked whether user {SERVICE_USER} can read the rules: {why}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("autoattach-sources-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_named_path_must_exist_a_default_one_need_not() {
        let dir = tempdir("missing");
        let gone = dir.join("gone.rules");
        let parsed = Sources::files(std::slice::from_ref(&gone)).load();
        assert_eq!(parsed.sources[0].found, Found::Unreadable);
        assert_eq!(parsed.errors.len(), 1);
        let sources = Sources { paths: vec![gone], required: false, no_qubesdb: true, reader: None, socket: None };
        let parsed = sources.load();
        assert_eq!((parsed.sources[0].found, parsed.errors.len()), (Found::Missing, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
