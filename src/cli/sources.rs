//! Where rules come from, and `autoattach check`.
//!
//! The rules are the paths given (`--rules`, and `check`'s FILE|DIR arguments), each of which
//! must exist; or else the default places, each of which may be missing: the directory
//! `/etc/autoattach/rules.d` (the template's), `/rw/config/autoattach` (this qube's), then
//! qubesdb `/vm-config/autoattach-rules` (set from dom0). A directory contributes its
//! `*.rules` files in name order. Loading records what it found at each place, so that
//! `check` can say where it looked.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{Opts, print, qubesdb};
use crate::exit::{self, Failure};
use crate::readiness::Qubesdb;
use crate::rules::Parsed;

/// The qubesdb key a disposable sys-usb's rules come from (`qvm-features sys-usb
/// vm-config.autoattach-rules '...'` in dom0).
pub const QUBESDB_RULES: &str = "/vm-config/autoattach-rules";
/// The default rule directories, in the order they are read.
pub const DEFAULT_RULE_DIRS: [&str; 2] = ["/etc/autoattach/rules.d", "/rw/config/autoattach"];

/// Where to read rules.
#[derive(Debug)]
pub struct Sources {
    paths: Vec<PathBuf>,
    /// The paths were named by the user: each must exist.
    required: bool,
    /// Read qubesdb too (default places only); None if there is no qubesdb here.
    qubesdb: Option<Qubesdb>,
    /// Why qubesdb is not read, when it is not, for `check`.
    no_qubesdb: Option<&'static str>,
}

/// What one place held.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A default place that does not exist.
    Missing,
    /// A file read: its rules and errors.
    File { rules: usize, errors: usize },
    /// A directory: its `*.rules` files, each as a `File` (or an error) of its own.
    Dir { files: usize },
    /// The place could not be read (the error is among the rules' errors).
    Unreadable,
    /// qubesdb has no such key.
    Unset,
    /// qubesdb is not read, and why.
    NotRead(&'static str),
}

/// One place looked at, and what it held.
#[derive(Debug)]
pub struct Looked {
    pub place: String,
    /// Nesting: 1 for a file of a directory.
    pub depth: usize,
    pub found: Found,
}

impl Sources {
    /// The sources the command line names (`--rules`, and `check`'s arguments), else the
    /// default places and, unless told otherwise, qubesdb.
    pub fn of(opts: &Opts, qubesdb: Option<Qubesdb>) -> Sources {
        let mut paths = opts.rules.clone();
        if opts.command == Some(super::Command::Check) {
            paths.extend(opts.args.iter().map(PathBuf::from));
        }
        if !paths.is_empty() {
            return Sources::files(&paths);
        }
        let no_qubesdb = match (&qubesdb, opts.no_qubesdb) {
            (Some(_), _) => None,
            (None, true) => Some("not read (--no-qubesdb)"),
            (None, false) => Some("not read (no qubesdb-read here: not a Qubes qube?)"),
        };
        Sources { paths: DEFAULT_RULE_DIRS.iter().map(PathBuf::from).collect(), required: false, qubesdb, no_qubesdb }
    }

    /// Exactly these paths, each of which must exist.
    pub fn files(paths: &[PathBuf]) -> Sources {
        Sources { paths: paths.to_vec(), required: true, qubesdb: None, no_qubesdb: None }
    }

    /// Reads every source: the rules, and what each place held.
    pub fn load(&self) -> (Parsed, Vec<Looked>) {
        let mut parsed = Parsed::default();
        let mut looked = Vec::new();
        for path in &self.paths {
            add_path(&mut parsed, &mut looked, path, self.required);
        }
        if !self.required {
            let place = format!("qubesdb:{QUBESDB_RULES}");
            let found = match (&self.qubesdb, self.no_qubesdb) {
                (Some(db), _) => read_qubesdb(&mut parsed, db, &place),
                (None, why) => Found::NotRead(why.unwrap_or("not read")),
            };
            looked.push(Looked { place, depth: 0, found });
        }
        (parsed, looked)
    }

    /// The files that were read, for checks on the files themselves.
    pub fn files_read(looked: &[Looked]) -> impl Iterator<Item = &Path> {
        looked.iter().filter(|l| matches!(l.found, Found::File { .. })).map(|l| Path::new(&l.place))
    }
}

/// One file or directory: a directory contributes its `*.rules` files (not subdirectories,
/// even named `*.rules`) in name order.
fn add_path(parsed: &mut Parsed, looked: &mut Vec<Looked>, path: &Path, required: bool) {
    let place = path.display().to_string();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return looked.push(Looked { place, depth: 0, found: Found::Missing });
        }
        Ok(meta) if meta.is_dir() => {}
        _ => return looked.push(Looked { place, depth: 0, found: read_file(parsed, path) }),
    }
    let files = match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "rules") && !p.is_dir())
                .collect();
            files.sort();
            files
        }
        Err(e) => {
            parsed.file_error(&place, format!("cannot list: {}", io_reason(&e)));
            return looked.push(Looked { place, depth: 0, found: Found::Unreadable });
        }
    };
    looked.push(Looked { place, depth: 0, found: Found::Dir { files: files.len() } });
    for file in files {
        let found = read_file(parsed, &file);
        looked.push(Looked { place: file.display().to_string(), depth: 1, found });
    }
}

/// Parses one file (through the parser's own reader), counting what it added.
fn read_file(parsed: &mut Parsed, path: &Path) -> Found {
    let (rules, errors) = (parsed.set.rules.len(), parsed.errors.len());
    parsed.add_path(path, true);
    let (rules, errors) = (parsed.set.rules.len() - rules, parsed.errors.len() - errors);
    if rules == 0 && parsed.errors.last().is_some_and(|e| e.line == 0 && errors > 0) {
        Found::Unreadable
    } else {
        Found::File { rules, errors }
    }
}

fn read_qubesdb(parsed: &mut Parsed, db: &Qubesdb, place: &str) -> Found {
    let (rules, errors) = (parsed.set.rules.len(), parsed.errors.len());
    match db.read(QUBESDB_RULES) {
        Ok(None) => return Found::Unset,
        Ok(Some(text)) => match String::from_utf8(text) {
            Ok(text) => parsed.add(place, &text),
            Err(_) => parsed.file_error(place, "not UTF-8".into()),
        },
        Err(why) => {
            parsed.file_error(place, format!("cannot read: {why}"));
            return Found::Unreadable;
        }
    }
    Found::File { rules: parsed.set.rules.len() - rules, errors: parsed.errors.len() - errors }
}

fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

// ---------------------------------------------------------------------------------------------
// check

/// `autoattach check [FILE|DIR]...`: where it looked, every error, every warning, a summary.
pub fn check(opts: &Opts) -> Result<u8, Failure> {
    let sources = Sources::of(opts, qubesdb(opts));
    let (mut parsed, looked) = sources.load();
    lint_files(&mut parsed, Sources::files_read(&looked));
    let mut out = String::from("rules looked for in:\n");
    for l in &looked {
        let _ = writeln!(out, "  {}{}: {}", "  ".repeat(l.depth), l.place, describe(&l.found));
    }
    for e in &parsed.errors {
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
    let _ = writeln!(
        out,
        "{} rule(s) loaded, {} error(s), {} warning(s)",
        parsed.set.rules.len(),
        parsed.errors.len(),
        parsed.warnings.len()
    );
    print(&out)?;
    Ok(if parsed.errors.is_empty() { exit::SUCCESS } else { exit::RULES })
}

fn describe(found: &Found) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    match found {
        Found::Missing => "not present".into(),
        Found::File { rules, errors: 0 } => plural(*rules, "rule"),
        Found::File { rules, errors } => format!("{}, {}", plural(*rules, "rule"), plural(*errors, "error")),
        Found::Dir { files: 0 } => "directory, no *.rules files".into(),
        Found::Dir { files } => format!("directory, {}", plural(*files, "*.rules file")),
        Found::Unreadable => "cannot be read (see below)".into(),
        Found::Unset => "not set".into(),
        Found::NotRead(why) => (*why).into(),
    }
}

/// Checks on the rule files themselves, beyond their text: the parser's lints run as it
/// parses (their warnings are in `parsed.warnings`).
///
/// HOOK for the udev branch (issue 11.4): the warning that a file is unreadable by the
/// service's user (`autoattach`) when `check` runs as root. Expected:
/// `crate::rules::lint_files(parsed: &mut Parsed, files: impl Iterator<Item = &Path>)`,
/// pushing one warning per file the user `autoattach` cannot read, with a hint (`chmod
/// 0644 FILE`). Until it lands this does nothing.
fn lint_files<'a>(parsed: &mut Parsed, files: impl Iterator<Item = &'a Path>) {
    let _ = (parsed, files.count());
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
    fn a_directory_lists_its_rules_files_in_order() {
        let dir = tempdir("dir");
        std::fs::write(dir.join("20-b.rules"), "KERNEL==\"x\", ATTACH=\"b\"\nKERNEL==\"y\", ATTACH=\"b\"\n").unwrap();
        std::fs::write(dir.join("10-a.rules"), "KERNEL=\"x\", ATTACH=\"a\"\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not rules").unwrap();
        std::fs::create_dir(dir.join("sub.rules")).unwrap();
        let (parsed, looked) = Sources::files(std::slice::from_ref(&dir)).load();
        let shown: Vec<(usize, &str, &Found)> =
            looked.iter().map(|l| (l.depth, l.place.rsplit('/').next().unwrap(), &l.found)).collect();
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            shown,
            [
                (0, name, &Found::Dir { files: 2 }),
                (1, "10-a.rules", &Found::File { rules: 0, errors: 1 }),
                (1, "20-b.rules", &Found::File { rules: 2, errors: 0 }),
            ]
        );
        assert_eq!((parsed.set.rules.len(), parsed.errors.len()), (2, 1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_named_path_must_exist_a_default_one_need_not() {
        let dir = tempdir("missing");
        let gone = dir.join("gone.rules");
        let (parsed, looked) = Sources::files(std::slice::from_ref(&gone)).load();
        assert_eq!(looked[0].found, Found::Unreadable);
        assert_eq!(parsed.errors.len(), 1);
        let sources = Sources { paths: vec![gone], required: false, qubesdb: None, no_qubesdb: Some("x") };
        let (parsed, looked) = sources.load();
        assert_eq!((looked[0].found == Found::Missing, parsed.errors.len()), (true, 0));
        assert_eq!(looked[1].found, Found::NotRead("x"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
