//! The shell completions in completions/ offer, for each command, exactly the options the
//! program takes (`cli::args::OPTIONS`), the commands, and device names from sysfs. Each
//! shell runs its own file: bash through `complete -p` and a COMP_WORDS call, fish through
//! `complete -C`, zsh with its completion builtins stubbed to print what they are given.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use autoattach::cli::args::{COMMANDS, Command as Cmd, OPTIONS};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn completions(name: &str) -> PathBuf {
    root().join("completions").join(name)
}

/// True if `shell` is installed; under AUTOATTACH_FULL=1 it must be.
fn have(shell: &str) -> bool {
    let found = Command::new("sh").args(["-c", &format!("command -v {shell}")]).output().unwrap().status.success();
    let full = std::env::var_os("AUTOATTACH_FULL").is_some_and(|v| v == "1");
    assert!(found || !full, "{shell} is not installed (AUTOATTACH_FULL=1: this test must run)");
    if !found {
        eprintln!("SKIP {shell} completion: {shell} is not installed");
    }
    found
}

fn shell(program: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(program).args(args).arg(script).output().unwrap();
    assert!(out.status.success(), "{program}: {}\n{script}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The options of `command` as a shell shows them: `--long` and `-s`.
fn options_of(command: Cmd) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for o in OPTIONS.iter().filter(|o| o.commands.contains(&command)) {
        set.insert(format!("--{}", o.long));
        if let Some(s) = o.short {
            set.insert(format!("-{s}"));
        }
    }
    set
}

fn offered(text: &str) -> BTreeSet<String> {
    text.split_whitespace().filter(|w| w.starts_with('-')).map(str::to_owned).collect()
}

fn fixture_sys() -> PathBuf {
    root().join("tests/fixtures/usb-stick/sys")
}

/// bash: `complete -F _autoattach autoattach`, and _autoattach called as readline would.
fn bash_complete(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        "[ -r /usr/share/bash-completion/bash_completion ] && . /usr/share/bash-completion/bash_completion\n\
         . '{file}'\n\
         complete -p autoattach\n\
         COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}\n\
         _autoattach autoattach \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file = completions("autoattach.bash").display(),
        words = quoted.join(" "),
        cword = words.len() - 1,
    );
    let out = shell("bash", &["-c"], &script);
    let (registered, rest) = out.split_once('\n').unwrap();
    assert_eq!(registered, "complete -F _autoattach autoattach");
    rest.to_owned()
}

#[test]
fn bash_offers_each_commands_options_commands_and_devices() {
    if !have("bash") {
        return;
    }
    for c in COMMANDS.iter().filter(|c| c.command != Cmd::Help) {
        let got = offered(&bash_complete(&["autoattach", c.name, "-"]));
        assert_eq!(got, options_of(c.command), "bash: autoattach {} -<TAB>", c.name);
    }
    let names: BTreeSet<String> = bash_complete(&["autoattach", ""]).lines().map(str::to_owned).collect();
    let want: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
    assert_eq!(names, want);
    let sys = fixture_sys();
    let devices = bash_complete(&["autoattach", "test", "--sysfs", sys.to_str().unwrap(), ""]);
    let devices: BTreeSet<&str> = devices.lines().collect();
    assert_eq!(devices, BTreeSet::from(["1-2", "sda", "sda1", "usb1"]), "block names and bus ids, no interfaces");
    assert_eq!(bash_complete(&["autoattach", "test", "--action", "r"]), "remove\n");
}

#[test]
fn fish_offers_each_commands_options_commands_and_devices() {
    if !have("fish") {
        return;
    }
    let file = completions("autoattach.fish");
    let complete = |line: &str| {
        shell("fish", &["-c"], &format!("source '{}'; complete -C'{line}'", file.display()))
            .lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
            .collect::<BTreeSet<String>>()
    };
    for c in COMMANDS.iter().filter(|c| c.command != Cmd::Help) {
        let mut got = complete(&format!("autoattach {} --", c.name));
        got.extend(complete(&format!("autoattach {} -", c.name)).into_iter().filter(|o| o.len() == 2));
        assert_eq!(got, options_of(c.command), "fish: autoattach {} -<TAB>", c.name);
    }
    let want: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
    assert_eq!(complete("autoattach "), want);
    assert_eq!(complete("autoattach test --action "), BTreeSet::from(["add", "change", "remove"].map(String::from)));
    let devices = complete("autoattach record ");
    assert!(!devices.is_empty() && devices.iter().all(|d| !d.contains(':')), "{devices:?}");
}

/// zsh: `_arguments` and `_describe` replaced by functions that print their arguments, so
/// the specs the file gives for each command can be read back.
#[test]
fn zsh_offers_each_commands_options() {
    if !have("zsh") {
        return;
    }
    let file = completions("_autoattach");
    shell("zsh", &["-n"], file.to_str().unwrap());
    for c in COMMANDS.iter().filter(|c| c.command != Cmd::Help) {
        let script = format!(
            "_arguments() {{ [[ $1 == -s ]] && shift; print -rl -- \"$@\" }}\n\
             _describe() {{ :; }}\n\
             words=(autoattach {} ''); CURRENT=3\n\
             . '{}'",
            c.name,
            file.display()
        );
        let specs = shell("zsh", &["-fc"], &script);
        let got: BTreeSet<String> = specs
            .lines()
            .filter_map(|spec| {
                // `(-v --verbose)-v[...]`, `--rules=[...]:...`, `-o+[...]`, `1:device:...`
                let spec = match spec.strip_prefix('(') {
                    Some(rest) => rest.split_once(')')?.1,
                    None => spec,
                };
                let name = spec.split(['[', '=', '+', ':']).next()?;
                name.starts_with('-').then(|| name.to_owned())
            })
            .collect();
        assert_eq!(got, options_of(c.command), "zsh: autoattach {} -<TAB>", c.name);
    }
}
