//! The rules parser: any text parses without panic, and every error and warning points at a
//! line and column that exist in the text (users jump there from `autoattach check`).
#![no_main]

use autoattach::rules::{RuleError, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // systemd's read_line, which the parser follows: a line ends at "\n", "\r\n", "\r" or NUL
    // (written here apart from the parser's own splitter, so that one is checked too).
    let mut lines: Vec<&str> = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(['\n', '\r', '\0']).unwrap_or(rest.len());
        lines.push(&rest[..end]);
        let brk = if rest[end..].starts_with("\r\n") { 2 } else { usize::from(end < rest.len()) };
        rest = &rest[end + brk..];
    }
    let parsed = parse("fuzz.rules", text);
    let within = |e: &RuleError| {
        assert!((1..=lines.len()).contains(&e.line), "{e}: line {} of {}", e.line, lines.len());
        let width = lines[e.line - 1].chars().count();
        assert!((1..=width + 1).contains(&e.col), "{e}: column {} of a {width}-character line", e.col);
        assert!(e.to_string().starts_with(&format!("fuzz.rules:{}:{}: ", e.line, e.col)));
    };
    parsed.errors.iter().for_each(within);
    parsed.warnings.iter().for_each(within);
    for rule in &parsed.set.rules {
        assert!((1..=lines.len()).contains(&rule.line));
        assert!(autoattach::names::check_qube(&rule.attach).is_ok(), "rule loaded with ATTACH={:?}", rule.attach);
        for t in rule.tests.iter().chain(&rule.parent_tests) {
            let _ = t.to_string();
        }
    }
});
