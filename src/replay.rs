//! Replay: the agent's pipeline over a recorded tree and event stream, deterministically.
//!
//! Input is a sysfs tree (a directory), a case directory (`sys/`, optional `dev/`, `events`,
//! `rules`), or a umockdev recording; plus an optional event stream in the text format of
//! `udevadm monitor --kernel --property`. Without a stream the tree's devices are replayed as
//! coldplug `add`s. The output is one line per call the agent would make, in order.
//!
//! The [`Engine`] is the one `autoattach run` uses; probes run inline on the fixture
//! ([`Nodes::Fixture`]: a regular file stands in for a device node) and time is virtual: it
//! stands still while events are read, moves on `#! wait DURATION`, and at the end runs until
//! every pending wait is over. So retries, timeouts, debounce and rate limits replay exactly.
//!
//! Event streams may change the tree between events with directives (lines starting `#!`,
//! which udevadm never prints), applied to a private copy of the fixture:
//! - `#! wait 5s`: let virtual time pass;
//! - `#! set sys/devices/.../size 31116288`: write a file (the value plus a newline);
//! - `#! fill dev/sdc 512`: make a node file of that many readable bytes (0: no media);
//! - `#! rm sys/devices/...`: remove a file or directory.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::engine::{Config, Effect, Engine};
use crate::qubesdb::Program;
use crate::readiness::{Nodes, Prober, Publication};
use crate::rules::Parsed;
use crate::sysfs::Sysfs;
use crate::uevent::{MonitorText, Record};

/// What to replay.
#[derive(Debug, Default)]
pub struct ReplayOptions {
    pub fixture: PathBuf,
    pub events: Option<PathBuf>,
    /// Rules; None means the case directory's `rules` (file or directory).
    pub rules: Option<Vec<PathBuf>>,
    pub dev: Option<PathBuf>,
    pub qubesdb: Option<Program>,
    /// How the client is named in the output (`qrexec-client-vm`).
    pub client: String,
    pub config: Config,
}

/// Why a replay could not run, with its exit code.
#[derive(Debug)]
pub struct ReplayError {
    pub code: u8,
    pub message: String,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub const EXIT_INPUT: u8 = 5;

fn input_error(message: String) -> ReplayError {
    ReplayError { code: EXIT_INPUT, message }
}

/// The longest a replay lets virtual time run after the last event.
const DRAIN_LIMIT: u64 = 24 * 3600 * 1000;

/// Where the pieces of a fixture are.
struct Layout {
    sys: PathBuf,
    dev: Option<PathBuf>,
    events: Option<PathBuf>,
    rules: Vec<PathBuf>,
    /// A temporary copy to work in (removed on drop).
    _work: Option<Work>,
}

struct Work(PathBuf);

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn work_dir() -> Result<Work, ReplayError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "autoattach-replay-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| input_error(format!("{}: {e}", dir.display())))?;
    Ok(Work(dir))
}

/// Finds the tree, nodes, events and rules of `opts.fixture`, copying them to a private work
/// directory (directives change the copy, never the fixture).
fn layout(opts: &ReplayOptions) -> Result<Layout, ReplayError> {
    let fixture = &opts.fixture;
    let meta = std::fs::metadata(fixture).map_err(|e| input_error(format!("{}: {e}", fixture.display())))?;
    let work = work_dir()?;
    let mut rules = Vec::new();
    let mut events = opts.events.clone();
    let recording = if meta.is_file() {
        Some(fixture.clone())
    } else {
        let found = std::fs::read_dir(fixture)
            .map_err(|e| input_error(format!("{}: {e}", fixture.display())))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "umockdev"));
        found.filter(|_| !fixture.join("sys").is_dir())
    };
    let case = if meta.is_dir() { Some(fixture.as_path()) } else { None };
    if let Some(case) = case {
        if events.is_none() && case.join("events").is_file() {
            events = Some(case.join("events"));
        }
        if case.join("rules").exists() {
            rules.push(case.join("rules"));
        }
    }
    let (sys, dev) = if let Some(recording) = recording {
        let text =
            std::fs::read_to_string(&recording).map_err(|e| input_error(format!("{}: {e}", recording.display())))?;
        let devices =
            crate::umockdev::parse(&text).map_err(|e| input_error(format!("{}: {e}", recording.display())))?;
        crate::umockdev::write_tree(&devices, &work.0)
            .map_err(|e| input_error(format!("{}: {e}", recording.display())))?;
        (work.0.join("sys"), work.0.join("dev"))
    } else {
        let (tree, nodes) = if fixture.join("sys").is_dir() {
            (fixture.join("sys"), Some(fixture.join("dev")))
        } else {
            (fixture.clone(), None)
        };
        copy_tree(&tree, &work.0.join("sys")).map_err(|e| input_error(format!("copying {}: {e}", tree.display())))?;
        let dev = work.0.join("dev");
        std::fs::create_dir_all(&dev).map_err(|e| input_error(e.to_string()))?;
        if let Some(nodes) = nodes.filter(|n| n.is_dir()) {
            copy_tree(&nodes, &dev).map_err(|e| input_error(format!("copying {}: {e}", nodes.display())))?;
        }
        (work.0.join("sys"), dev)
    };
    let dev = match &opts.dev {
        Some(d) => Some(d.clone()),
        None => Some(dev),
    };
    if let Some(r) = &opts.rules {
        rules = r.clone();
    }
    Ok(Layout { sys, dev, events, rules, _work: Some(work) })
}

/// Copies a directory, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Runs the replay and returns the calls, one line each.
pub fn replay(opts: &ReplayOptions, load_rules: &dyn Fn(&[PathBuf]) -> Parsed) -> Result<Vec<String>, ReplayError> {
    let layout = layout(opts)?;
    let parsed = load_rules(&layout.rules);
    if !crate::runloop::report_rules(&parsed) {
        return Err(ReplayError {
            code: crate::runloop::EXIT_RULES,
            message: format!("{} error(s) in the rules", parsed.errors.len()),
        });
    }
    let sysfs = Arc::new(Sysfs::new(&layout.sys).map_err(|e| input_error(e.to_string()))?);
    let root = layout.sys.parent().unwrap_or(&layout.sys).to_owned();
    let prober = Prober {
        sysfs: sysfs.clone(),
        dev: layout.dev.clone().unwrap_or_else(|| root.join("dev")),
        nodes: Nodes::Fixture,
        qubesdb: opts.qubesdb.clone().map(Publication::Program),
    };
    let mut run = Run {
        engine: Engine::new(parsed.set, opts.config.clone()),
        prober,
        sysfs,
        now: 0,
        calls: Vec::new(),
        client: opts.client.clone(),
    };
    match &layout.events {
        None => {
            let mut effects = Vec::new();
            run.engine.resync(&run.sysfs, 0, &mut effects);
            run.engine.describe(&run.sysfs);
            run.perform(effects);
        }
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| input_error(format!("{}: {e}", path.display())))?;
            for record in MonitorText::new(&text) {
                match record.map_err(|e| input_error(format!("{}: {e}", path.display())))? {
                    Record::Event(event, _) => {
                        let mut effects = Vec::new();
                        run.engine.on_event(&run.sysfs, &event, run.now, &mut effects);
                        run.engine.describe(&run.sysfs);
                        run.perform(effects);
                    }
                    Record::Directive(directive, line) => run
                        .directive(directive, &root)
                        .map_err(|e| input_error(format!("{}:{line}: {e}", path.display())))?,
                }
            }
        }
    }
    run.advance(run.now + DRAIN_LIMIT, true);
    Ok(run.calls)
}

struct Run {
    engine: Engine,
    prober: Prober,
    sysfs: Arc<Sysfs>,
    now: u64,
    calls: Vec<String>,
    client: String,
}

impl Run {
    /// Carries out effects until none are left: probes inline, calls recorded.
    fn perform(&mut self, effects: Vec<Effect>) {
        let (calls, client) = (&mut self.calls, &self.client);
        crate::engine::perform_inline(&mut self.engine, &self.prober, effects, self.now, &mut |call, device| {
            info!("{device}: would call {call}");
            calls.push(format!("{client} dom0 {}", call.service_arg()));
        });
    }

    /// Lets virtual time run to `until` (or, when draining, until nothing is pending).
    fn advance(&mut self, until: u64, drain: bool) {
        while let Some(at) = self.engine.next_wake().filter(|&at| at <= until) {
            self.now = self.now.max(at);
            let mut effects = Vec::new();
            self.engine.on_tick(self.now, &mut effects);
            self.perform(effects);
        }
        if !drain {
            self.now = until;
        }
    }

    fn directive(&mut self, directive: &str, root: &Path) -> Result<(), String> {
        let mut words = directive.split_whitespace();
        let verb = words.next().unwrap_or_default();
        match verb {
            "wait" => {
                let d = words.next().and_then(crate::rules::parse_duration).ok_or("wait needs a duration, e.g. 5s")?;
                self.advance(self.now + d.as_millis() as u64, false);
                Ok(())
            }
            "set" | "fill" | "rm" => {
                let rel = words.next().ok_or_else(|| format!("{verb} needs a path"))?;
                let path = fixture_path(root, rel)?;
                let rest: Vec<&str> = words.collect();
                let done = match verb {
                    "set" => std::fs::write(&path, format!("{}\n", rest.join(" "))),
                    "fill" => {
                        let n: usize = rest.first().and_then(|n| n.parse().ok()).ok_or("fill needs a byte count")?;
                        std::fs::write(&path, vec![0u8; n])
                    }
                    _ if path.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                done.map_err(|e| format!("{verb} {rel}: {e}"))
            }
            _ => Err(format!("unknown directive '{verb}' (wait, set, fill, rm)")),
        }
    }
}

/// A directive's path: under `sys/` or `dev/` of the working copy, nothing else.
fn fixture_path(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = Path::new(rel);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || !(rel.starts_with("sys/") || rel.starts_with("dev/")) {
        return Err(format!("{rel}: directive paths are relative, under sys/ or dev/"));
    }
    Ok(root.join(path))
}
