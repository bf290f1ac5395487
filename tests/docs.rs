//! The docs say what the program does: `--help`, the man pages, README.md and the dom0
//! handler's header agree with the command and option tables (`cli::args`) and the exit-code
//! tables (`exit`), and the man pages render without a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use autoattach::cli::args::{COMMANDS, Command as Cmd, OPTIONS};
use autoattach::exit::{By, CALLS, CODES};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// scdoc markup removed: `*bold*`, `_underline_`, `\` escapes.
fn plain(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '*' | '_' => {}
            c => out.push(c),
        }
    }
    words(&out)
}

/// The lines of section `# NAME` of an scdoc page.
fn section<'a>(page: &'a str, name: &str) -> Vec<&'a str> {
    let heading = format!("# {name}");
    let lines: Vec<&str> = page.lines().collect();
    let start = lines.iter().position(|l| *l == heading).unwrap_or_else(|| panic!("no section {heading:?}"));
    lines[start + 1..].iter().take_while(|l| !l.starts_with("# ")).copied().collect()
}

/// scdoc definition entries: a line starting with `*` (the term) followed by indented lines
/// (its text), as (term, text) with markup removed.
fn entries(lines: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with('*') {
            out.push((plain(line), String::new()));
        } else if let (Some(body), Some(last)) = (line.strip_prefix('\t'), out.last_mut()) {
            last.1.push(' ');
            last.1.push_str(body);
        } else if !line.is_empty() {
            // Prose between entries ends the last one.
            out.push((String::new(), String::new()));
        }
    }
    out.into_iter().filter(|(t, _)| !t.is_empty()).map(|(t, b)| (t, words(&b))).collect()
}

/// `(code, meaning)` pairs of an EXIT STATUS-like section: terms that are numbers.
fn codes(lines: &[&str]) -> Vec<(i32, String)> {
    entries(lines).into_iter().filter_map(|(t, b)| Some((t.parse().ok()?, b))).collect()
}

fn option_term(o: &autoattach::cli::args::OptSpec) -> String {
    let mut term = match o.short {
        Some(s) => format!("-{s}, --{}", o.long),
        None => format!("--{}", o.long),
    };
    if let Some(v) = o.value {
        term = format!("{term} {v}");
    }
    term
}

fn users(commands: &[Cmd]) -> String {
    if commands.len() == COMMANDS.len() {
        return "every command".into();
    }
    let names: Vec<&str> =
        commands.iter().map(|c| COMMANDS.iter().find(|s| s.command == *c).map_or("?", |s| s.name)).collect();
    names.join(", ")
}

#[test]
fn man_page_lists_the_commands_options_and_exit_codes_of_the_program() {
    let page = read("man/autoattach.8.scd");
    let commands: Vec<String> = entries(&section(&page, "COMMANDS")).into_iter().map(|(t, _)| t).collect();
    let want: Vec<String> = COMMANDS.iter().map(|c| words(&format!("{} {}", c.name, c.args))).collect();
    assert_eq!(commands, want, "man/autoattach.8.scd COMMANDS");

    let options = entries(&section(&page, "OPTIONS"));
    let terms: Vec<&str> = options.iter().map(|(t, _)| t.as_str()).collect();
    let want: Vec<String> = OPTIONS.iter().map(option_term).collect();
    assert_eq!(terms, want, "man/autoattach.8.scd OPTIONS, in the order of --help");
    for (o, (term, text)) in OPTIONS.iter().zip(&options) {
        let used = format!("Used by: {}.", users(o.commands));
        assert!(text.ends_with(&used), "{term}: the man page says {text:?}, the program: {used:?}");
        // The default --help states, the man page states too.
        if let Some((_, rest)) = o.help.split_once("default") {
            let value = rest.trim_start_matches([':', ' ']).split([')', ';', ',']).next().unwrap().trim();
            assert!(
                plain(text).contains(value),
                "{term}: --help says the default is {value:?}; the man page: {text:?}"
            );
        }
    }

    let exits = codes(&section(&page, "EXIT STATUS"));
    let want: Vec<(i32, String)> = CODES.iter().map(|(c, m)| (i32::from(*c), m.to_string())).collect();
    assert_eq!(exits, want, "man/autoattach.8.scd EXIT STATUS");

    let calls = codes(&section(&page, "CALLS AND WHAT DOM0 ANSWERS"));
    let want: Vec<(i32, String)> = CALLS.iter().map(|c| (c.code, c.logged.to_owned())).collect();
    assert_eq!(calls, want, "man/autoattach.8.scd CALLS AND WHAT DOM0 ANSWERS");
}

/// What `autoattach [COMMAND] --help` prints, as the binary prints it.
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_autoattach")).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The `exit codes:` lines of a help text.
fn help_codes(text: &str) -> Vec<(i32, String)> {
    let tail = text.split("\nexit codes:\n").nth(1).expect("an exit codes section");
    tail.lines()
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let (code, meaning) = l.trim().split_once("  ").unwrap();
            (code.parse().unwrap(), meaning.to_owned())
        })
        .collect()
}

#[test]
fn help_shows_each_command_with_its_options_and_exit_codes() {
    let all = help(&["--help"]);
    let want: Vec<(i32, String)> = CODES.iter().map(|(c, m)| (i32::from(*c), m.to_string())).collect();
    assert_eq!(help_codes(&all), want);
    for c in COMMANDS.iter().filter(|c| c.command != Cmd::Help) {
        assert!(all.contains(&format!("\n  {}", words(&format!("{} {}", c.name, c.args)))), "{} missing", c.name);
        let text = help(&[c.name, "--help"]);
        assert!(text.starts_with(&words(&format!("usage: autoattach {} [OPTIONS] {}", c.name, c.args))));
        for o in OPTIONS {
            let shown = text.lines().any(|l| l.trim_start().starts_with(&option_term(o)));
            assert_eq!(shown, o.commands.contains(&c.command), "{} --help and --{}", c.name, o.long);
        }
        let codes: Vec<i32> = help_codes(&text).into_iter().map(|(c, _)| c).collect();
        assert_eq!(codes, c.exits.iter().map(|&c| i32::from(c)).collect::<Vec<_>>(), "{}", c.name);
        // The man page names the same exit codes for the command.
        let page = read("man/autoattach.8.scd");
        let commands = entries(&section(&page, "COMMANDS"));
        let (_, about) = commands.iter().find(|(t, _)| t.starts_with(c.name)).unwrap();
        if c.exits.contains(&1) {
            assert!(about.contains("1 if"), "{}: the man page does not say when it exits 1", c.name);
        }
    }
}

/// README.md's tables: `| code | meaning |` rows under the two exit-status headings.
fn readme_rows(readme: &str, heading: &str) -> Vec<(i32, String)> {
    let start = readme.find(heading).unwrap_or_else(|| panic!("README.md has no {heading:?}"));
    readme[start + heading.len()..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            Some((cells.first()?.parse().ok()?, cells.get(1)?.to_string()))
        })
        .collect()
}

#[test]
fn readme_states_the_same_exit_codes() {
    let readme = read("README.md");
    let want: Vec<(i32, String)> = CODES.iter().map(|(c, m)| (i32::from(*c), m.to_string())).collect();
    assert_eq!(readme_rows(&readme, "Exit codes of `autoattach`:"), want, "README.md");
    let want: Vec<(i32, String)> = CALLS.iter().map(|c| (c.code, c.logged.to_owned())).collect();
    assert_eq!(readme_rows(&readme, "Exit status of a call, as the log shows it:"), want, "README.md");
}

/// The dom0 handler's header: `#   NN  meaning` lines (a meaning may go on over lines that
/// start with `#` and more blanks), and the dom0 man page, say what exit::CALLS says.
#[test]
fn dom0_handler_header_and_man_page_state_the_same_codes() {
    let script = read("dom0/custom.USBDeviceAttach");
    let mut header: BTreeMap<i32, String> = BTreeMap::new();
    let mut last = None;
    for line in script.lines().take_while(|l| l.starts_with('#')) {
        let body = line.trim_start_matches('#');
        let rest = body.strip_prefix("   ");
        match rest.map(|r| r.split_once("  ")) {
            Some(Some((code, meaning))) if code.trim().parse::<i32>().is_ok() && !code.starts_with(' ') => {
                let code = code.trim().parse().unwrap();
                header.insert(code, meaning.trim().to_owned());
                last = Some(code);
            }
            _ if body.starts_with("      ") && last.is_some() => {
                let entry = header.get_mut(&last.unwrap()).unwrap();
                entry.push(' ');
                entry.push_str(body.trim());
            }
            _ => last = None,
        }
    }
    let handler: BTreeMap<i32, String> =
        CALLS.iter().filter(|c| c.by == By::Handler).map(|c| (c.code, c.text.to_owned())).collect();
    let header: BTreeMap<i32, String> = header.into_iter().map(|(c, m)| (c, words(&m))).collect();
    assert_eq!(header, handler, "dom0/custom.USBDeviceAttach's header and src/exit.rs");
    let page = read("man/autoattach-dom0.8.scd");
    let page: BTreeMap<i32, String> = codes(&section(&page, "EXIT STATUS")).into_iter().collect();
    assert_eq!(page, handler, "man/autoattach-dom0.8.scd and src/exit.rs");
}

/// Each page renders with scdoc, and `man --warnings` prints nothing about it.
#[test]
fn man_pages_render_without_warnings() {
    let full = std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1");
    for tool in ["scdoc", "man"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
        if !found {
            assert!(!full, "{tool} is not installed (AUTOATTACH_FULL=1: this test must run; apt install scdoc man-db)");
            eprintln!("SKIP man pages: {tool} is not installed");
            return;
        }
    }
    let dir = std::env::temp_dir().join(format!("autoattach-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut pages = 0;
    for entry in std::fs::read_dir(root().join("man")).unwrap().flatten() {
        let source = entry.path();
        if source.extension().is_none_or(|e| e != "scd") {
            continue;
        }
        let page: PathBuf = dir.join(source.file_stem().unwrap());
        let out = Command::new("scdoc").stdin(std::fs::File::open(&source).unwrap()).output().unwrap();
        assert!(out.status.success(), "scdoc {}: {}", source.display(), String::from_utf8_lossy(&out.stderr));
        std::fs::write(&page, &out.stdout).unwrap();
        for width in ["80", "120"] {
            let out = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&page)
                .env("MANWIDTH", width)
                .env("LC_ALL", "C.UTF-8")
                .output()
                .unwrap();
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && warnings.is_empty(), "{} at {width}: {warnings}", page.display());
            assert!(out.stdout.len() > 1000, "{} renders to almost nothing", page.display());
        }
        pages += 1;
    }
    assert_eq!(pages, 3, "autoattach.8, autoattach.rules.5, autoattach-dom0.8");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The variables the dom0 handler reads from dom0's environment (its header's block of
/// `#   AUTOATTACH_NAME  what (default X)` lines) are the man page's, with the same defaults.
#[test]
fn dom0_man_page_lists_the_handlers_variables() {
    let script = read("dom0/custom.USBDeviceAttach");
    let mut header = BTreeMap::new();
    for line in script.lines().take_while(|l| l.starts_with('#')) {
        let body = line.trim_start_matches('#').trim();
        let Some(name) = body.split_whitespace().next().filter(|n| n.starts_with("AUTOATTACH_")) else { continue };
        let default = body.split_once("(default ").map(|(_, d)| d.split(')').next().unwrap().to_owned());
        header.insert(name.to_owned(), default);
    }
    let page = read("man/autoattach-dom0.8.scd");
    let man: BTreeMap<String, Option<String>> = entries(&section(&page, "ENVIRONMENT"))
        .into_iter()
        .filter(|(term, _)| term.starts_with("AUTOATTACH_"))
        .map(|(term, text)| {
            let text = plain(&text);
            let default = text.split_once("(default ").map(|(_, d)| d.split(')').next().unwrap().to_owned());
            (term, default)
        })
        .collect();
    assert!(!header.is_empty(), "no AUTOATTACH_ variables in the handler's header");
    assert_eq!(man, header, "man/autoattach-dom0.8.scd ENVIRONMENT and dom0/custom.USBDeviceAttach's header");
}

/// `run --help` names the call as the agent makes it, with the identity (IDENTITY.md §2), as
/// autoattach(8) does, and says a Detach follows media removal too, not only removal.
#[test]
fn run_help_names_the_call_with_its_identity() {
    let call = "custom.USBDeviceAttach+QUBE+__+DEV+__+IDENT";
    let text = words(&help(&["run", "--help"]));
    assert!(text.contains(&format!("{call}, where IDENT names the device matched")), "{text}");
    assert!(text.contains("when an attached block device is removed, or its media removed"), "{text}");
    assert!(plain(&read("man/autoattach.8.scd")).contains(call), "man/autoattach.8.scd");
}
