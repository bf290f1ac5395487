//! Shell globs as udev matches them: glibc `fnmatch(pattern, value, 0)` on bytes.
//!
//! With flags 0, `*` also matches `/` and a leading `.`; `?` matches one byte; `[...]` is a
//! bracket expression (`!` or `^` negates, ranges, `[:class:]`, `[.x.]`, `[=x=]`, `]` first is
//! literal); `\` quotes the next byte; an unterminated `[` is a literal `[`; a trailing `\`
//! never matches; a malformed bracket (unknown class, multi-byte collating symbol, a member
//! that glibc's skip-after-match scanner rejects) fails at that position, as in glibc.
//! With FNM_CASEFOLD (udev's `i"..."` patterns) bytes are compared after ASCII `tolower`, as
//! glibc's FOLD does in the C locale: literals, `?`, escaped bytes, bracket members and range
//! ends; not `[=x=]`, `[:class:]` or a lone `[.x.]`, which glibc tests on the value's own byte.
//! The tests compare this against the C library's own fnmatch, with and without the flag.

/// True if `value` matches the glob `pattern` (`fnmatch(pattern, value, 0)`).
pub fn fnmatch(pattern: &[u8], value: &[u8]) -> bool {
    matches::<false>(pattern, value)
}

/// True if `value` matches `pattern` ignoring ASCII case (`fnmatch(.., FNM_CASEFOLD)`).
pub fn fnmatch_casefold(pattern: &[u8], value: &[u8]) -> bool {
    matches::<true>(pattern, value)
}

/// glibc's FOLD: tolower in the C locale, when folding.
#[inline(always)]
fn fold<const F: bool>(c: u8) -> u8 {
    if F { c.to_ascii_lowercase() } else { c }
}

fn matches<const F: bool>(pattern: &[u8], value: &[u8]) -> bool {
    let (mut p, mut v) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, value index it covers to).
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        if let Some(next) = step::<F>(pattern, p, value[v]) {
            p = next;
            v += 1;
            continue;
        }
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            star = Some((p, v));
            continue;
        }
        match star {
            Some((sp, sv)) => {
                // Let the last `*` swallow one more byte and try again.
                p = sp;
                v = sv + 1;
                star = Some((sp, sv + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// If the pattern element at `p` matches byte `c`, the index after that element.
fn step<const F: bool>(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'*' => None,
        b'?' => Some(p + 1),
        b'\\' => (pattern.get(p + 1).map(|&e| fold::<F>(e)) == Some(fold::<F>(c))).then_some(p + 2),
        b'[' => match bracket::<F>(pattern, p + 1, c) {
            Bracket::Match(next) => Some(next),
            Bracket::NoMatch => None,
            Bracket::Literal => (c == b'[').then_some(p + 1),
        },
        literal => (fold::<F>(literal) == fold::<F>(c)).then_some(p + 1),
    }
}

enum Bracket {
    /// The byte is in the set; the index after `]`.
    Match(usize),
    /// Not in the set, or a malformed expression glibc refuses at this position.
    NoMatch,
    /// Unterminated: glibc then reads the `[` as a literal.
    Literal,
}

/// The byte at `p`, or NUL past the end (the C string view glibc has).
fn at(pattern: &[u8], p: usize) -> u8 {
    pattern.get(p).copied().unwrap_or(0)
}

/// glibc's bracket expression in the C locale (posix/fnmatch_loop.c), from after its `[`.
/// Parsing stops at the first element that matches; the rest is then skipped by a stricter
/// scanner, as glibc does, so that both agree on which malformed patterns fail.
fn bracket<const F: bool>(pattern: &[u8], mut p: usize, c: u8) -> Bracket {
    let at = |i| at(pattern, i);
    // glibc folds the value's byte once (`fn`); classes and `[=x=]` test the byte itself.
    let (raw, c) = (c, fold::<F>(c));
    let negate = matches!(at(p), b'!' | b'^');
    if negate {
        p += 1;
    }
    let mut cc = at(p);
    p += 1;
    loop {
        let escaped = cc == b'\\';
        if escaped {
            if at(p) == 0 {
                return Bracket::NoMatch;
            }
            cc = fold::<F>(at(p));
            p += 1;
        } else if cc == 0 {
            return Bracket::Literal;
        } else if cc == b'[' {
            match class_or_equivalence(pattern, p, raw) {
                Named::Holds(next) => return skip_rest(pattern, next, negate),
                Named::Invalid => return Bracket::NoMatch,
                Named::Fails(next) => {
                    cc = at(next);
                    p = next + 1;
                    if cc == b']' {
                        break;
                    }
                    continue;
                }
                // Neither: the `[` is an ordinary member.
                Named::Neither => {}
            }
        }
        // One member, possibly the low end of a range.
        let Some(Member { lo, next, range, own_byte }) = member::<F>(pattern, p, cc, escaped) else {
            return Bracket::NoMatch;
        };
        if !range && lo == if own_byte { raw } else { c } {
            return skip_rest(pattern, next, negate);
        }
        cc = at(next);
        p = next + 1;
        if cc == b'-' && at(p) != b']' {
            let Some((hi, next)) = range_end::<F>(pattern, p) else {
                return Bracket::NoMatch;
            };
            if lo <= c && c <= hi {
                return skip_rest(pattern, next, negate);
            }
            cc = at(next);
            p = next + 1;
        }
        if cc == b']' {
            break;
        }
    }
    if negate { Bracket::Match(p) } else { Bracket::NoMatch }
}

/// What a `[:class:]` or `[=x=]` element says about a byte.
enum Named {
    /// The byte is in it; the index after the element.
    Holds(usize),
    /// It is not; the index after the element.
    Fails(usize),
    /// A well-formed class with an unknown name: glibc fails the match.
    Invalid,
    /// Not such an element: its `[` is an ordinary member.
    Neither,
}

/// The element whose `[` is just before `p`, if it is `[:class:]` or `[=x=]`, tested on the
/// value's own (unfolded) byte.
fn class_or_equivalence(pattern: &[u8], p: usize, raw: u8) -> Named {
    let at = |i| at(pattern, i);
    let test = |holds: bool, next: usize| if holds { Named::Holds(next) } else { Named::Fails(next) };
    match at(p) {
        b':' => match class_at(pattern, p) {
            ClassAt::Class(class, next) => test(class(raw), next),
            ClassAt::Invalid => Named::Invalid,
            ClassAt::NotAClass => Named::Neither,
        },
        b'=' if at(p + 1) != 0 && at(p + 2) == b'=' && at(p + 3) == b']' => test(raw == at(p + 1), p + 4),
        _ => Named::Neither,
    }
}

/// A member: its byte, the index after it, and whether a range follows it.
struct Member {
    lo: u8,
    next: usize,
    range: bool,
    /// Alone (not a range), it is compared with the value's own byte, unfolded: glibc's
    /// `*n == startp[1]` for `[.x.]`.
    own_byte: bool,
}

/// The member `cc` (read already, `p` after it): a byte, an escaped byte (`escaped`: folded
/// already) or `[.x.]`. None for a collating symbol glibc refuses.
fn member<const F: bool>(pattern: &[u8], p: usize, cc: u8, escaped: bool) -> Option<Member> {
    let at = |i| at(pattern, i);
    if !escaped && cc == b'[' && at(p) == b'.' {
        let (lo, next) = collating(pattern, p)?;
        return Some(Member { lo, next, range: at(next) == b'-' && at(next + 1) != 0, own_byte: true });
    }
    let lo = if escaped { cc } else { fold::<F>(cc) };
    let range = at(p) == b'-' && at(p + 1) != 0 && at(p + 1) != b']';
    Some(Member { lo, next: p, range, own_byte: false })
}

/// The high end of a range, from after its `-`: a byte, an escaped byte or `[.x.]`, and the
/// index after it. None where glibc fails (the pattern ends, a bad collating symbol).
fn range_end<const F: bool>(pattern: &[u8], p: usize) -> Option<(u8, usize)> {
    let at = |i| at(pattern, i);
    match at(p) {
        b'[' if at(p + 1) == b'.' => collating(pattern, p + 1),
        b'\\' => (at(p + 1) != 0).then(|| (fold::<F>(at(p + 1)), p + 2)),
        0 => None,
        hi => Some((fold::<F>(hi), p + 1)),
    }
}

enum ClassAt {
    Class(fn(u8) -> bool, usize),
    /// A well-formed `[:name:]` with an unknown name: glibc fails the match.
    Invalid,
    NotAClass,
}

/// The bytes glibc accepts in a class name: `a` to `y`. Its test is `c < 'a' || c >= 'z'`, so
/// `z` is excluded; no class name has one, and matching glibc exactly matters more.
#[allow(clippy::almost_complete_range)]
fn class_name_byte(c: u8) -> bool {
    (b'a'..b'z').contains(&c)
}

/// glibc's longest class name (CHAR_CLASS_MAX_LENGTH).
const CLASS_MAX: usize = 256;

/// Reads `[:name:]` whose `:` is at `p`; the index after `:]`.
fn class_at(pattern: &[u8], p: usize) -> ClassAt {
    let mut i = p;
    loop {
        if i - p == CLASS_MAX {
            return ClassAt::Invalid;
        }
        i += 1;
        let ch = at(pattern, i);
        if ch == b':' && at(pattern, i + 1) == b']' {
            return match class(&pattern[p + 1..i]) {
                Some(test) => ClassAt::Class(test, i + 2),
                None => ClassAt::Invalid,
            };
        }
        if !class_name_byte(ch) {
            return ClassAt::NotAClass;
        }
    }
}

/// Reads `[.x.]` whose `.` is at `p`: the symbol and the index after `.]`. In the C locale only
/// one-byte symbols exist; anything else (or no `.]`) makes glibc fail.
fn collating(pattern: &[u8], p: usize) -> Option<(u8, usize)> {
    let mut i = p;
    loop {
        i += 1;
        let ch = at(pattern, i);
        if ch == b'.' && at(pattern, i + 1) == b']' {
            return (i == p + 2).then(|| (pattern[p + 1], i + 2));
        }
        if ch == 0 {
            return None;
        }
    }
}

/// After a member matched: skip to the closing `]` the way glibc does.
fn skip_rest(pattern: &[u8], mut p: usize, negate: bool) -> Bracket {
    let at = |i| at(pattern, i);
    loop {
        let ch = at(p);
        p += 1;
        match ch {
            b']' => break,
            // glibc 2.36 reads an unterminated bracket as a literal `[` here too.
            0 => return Bracket::Literal,
            b'\\' => {
                if at(p) == 0 {
                    return Bracket::NoMatch;
                }
                p += 1;
            }
            b'[' if at(p) == b':' => {
                let start = p;
                let mut len = 0;
                loop {
                    p += 1;
                    len += 1;
                    if len == CLASS_MAX {
                        return Bracket::NoMatch;
                    }
                    if at(p) == b':' && at(p + 1) == b']' {
                        break;
                    }
                    if !class_name_byte(at(p)) {
                        p = start - 2;
                        break;
                    }
                }
                p += 2;
            }
            b'[' if at(p) == b'=' => {
                if at(p + 1) == 0 || at(p + 2) != b'=' || at(p + 3) != b']' {
                    return Bracket::NoMatch;
                }
                p += 4;
            }
            b'[' if at(p) == b'.' => loop {
                p += 1;
                if at(p) == 0 {
                    return Bracket::NoMatch;
                }
                if at(p) == b'.' && at(p + 1) == b']' {
                    p += 2;
                    break;
                }
            },
            _ => {}
        }
    }
    if negate { Bracket::NoMatch } else { Bracket::Match(p) }
}

/// The test for a `[:name:]` class.
fn class(name: &[u8]) -> Option<fn(u8) -> bool> {
    Some(match name {
        b"alnum" => |c| c.is_ascii_alphanumeric(),
        b"alpha" => |c| c.is_ascii_alphabetic(),
        b"blank" => |c| c == b' ' || c == b'\t',
        b"cntrl" => |c| c.is_ascii_control(),
        b"digit" => |c| c.is_ascii_digit(),
        b"graph" => |c| c.is_ascii_graphic(),
        b"lower" => |c| c.is_ascii_lowercase(),
        b"print" => |c| c.is_ascii_graphic() || c == b' ',
        b"punct" => |c| c.is_ascii_punctuation(),
        b"space" => |c| c.is_ascii_whitespace() || c == 0x0b,
        b"upper" => |c| c.is_ascii_uppercase(),
        b"xdigit" => |c| c.is_ascii_hexdigit(),
        _ => return None,
    })
}

/// True if `pattern` has glob characters (udev's string_is_glob): then it is matched with
/// [`fnmatch`], otherwise compared as a plain string.
pub fn is_glob(pattern: &[u8]) -> bool {
    pattern.iter().any(|c| matches!(c, b'*' | b'?' | b'['))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_env = "gnu")]
    fn libc_fnmatch(pattern: &[u8], value: &[u8]) -> bool {
        libc_fnmatch_flags(pattern, value, 0)
    }

    #[cfg(target_env = "gnu")]
    fn libc_fnmatch_flags(pattern: &[u8], value: &[u8], flags: i32) -> bool {
        use std::ffi::CString;
        let (p, v) = (CString::new(pattern).unwrap(), CString::new(value).unwrap());
        // SAFETY: both pointers are NUL-terminated strings that outlive the call.
        unsafe { nix::libc::fnmatch(p.as_ptr(), v.as_ptr(), flags) == 0 }
    }

    /// glibc's FNM_CASEFOLD (1 << 4), which the libc crate does not name.
    #[cfg(target_env = "gnu")]
    const FNM_CASEFOLD: i32 = 1 << 4;

    /// udev's `i"..."` cases (the issue's `KERNEL==i"SDA1"`, `ATTRS{vendor}==i"a?a"`) and the
    /// corners of folding, against the C library.
    #[test]
    fn casefold_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("SDA1", "sda1", true),
            ("a?a", "ATA", true),
            ("A?A", "ata", true),
            ("sd[A-Z]", "sdb", true),
            ("sd[a-z]", "SDB", true),
            ("[[:upper:]]", "a", false),
            ("[[:lower:]]", "A", false),
            ("[[.a.]-c]", "B", true),
            ("[[.A.]]", "A", true),
            ("[[.a.]]", "A", false),
            ("[=[[=[.A.]]", "A", true),
            ("[[=a=]]", "A", false),
            ("\\A", "a", true),
            ("*B", "aab", true),
            ("[!B]", "b", false),
        ];
        for &(p, v, want) in cases {
            assert_eq!(fnmatch_casefold(p.as_bytes(), v.as_bytes()), want, "{p:?} vs {v:?}");
            #[cfg(target_env = "gnu")]
            assert_eq!(libc_fnmatch_flags(p.as_bytes(), v.as_bytes(), FNM_CASEFOLD), want, "libc {p:?} vs {v:?}");
        }
    }

    #[test]
    fn udev_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("sd[a-z]", "sdb", true),
            ("sd[a-z]", "sdb1", false),
            ("sd*", "sdb1", true),
            ("*", "/devices/a/b", true),
            ("/devices/*/block/*", "/devices/pci/usb2/block/sdb", true),
            ("?*", "", false),
            ("?*", "x", true),
            ("[!0-9]*", "sda", true),
            ("[!0-9]*", "2-1", false),
            ("[^0-9]*", "2-1", false),
            ("[]]", "]", true),
            ("[a-]", "-", true),
            ("[[:digit:]]-[[:digit:]]*", "2-1.4", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("abc\\", "abc\\", false),
            ("[abc", "[abc", true),
            ("*.rules", ".rules", true),
            ("*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
            ("[/[.*]", "/", false),
            ("[[.a.]-c]", "b", true),
            ("[[=a=]b]", "a", true),
            ("[[=a]", "a", true),
            ("[[:foo:]]", "[[:foo:]]", false),
            ("*[a[=]", "a=", true),
            ("[a[=]", "a", false),
            ("[-0./[=]!", "/!", false),
            ("[a[:x]", ":", true),
            ("[b-a]", "b", false),
            ("[a-]]", "-]", true),
        ];
        for &(p, v, want) in cases {
            assert_eq!(fnmatch(p.as_bytes(), v.as_bytes()), want, "{p:?} vs {v:?}");
            // udev links against glibc: its fnmatch is the reference (musl's differs in corners).
            #[cfg(target_env = "gnu")]
            assert_eq!(libc_fnmatch(p.as_bytes(), v.as_bytes()), want, "libc {p:?} vs {v:?}");
        }
    }

    /// What random patterns are built from: every kind of glob element and the broken ones.
    #[cfg(target_env = "gnu")]
    const PIECES: &[&[u8]] = &[
        b"a",
        b"b",
        b"z",
        b"-",
        b"/",
        b".",
        b"[",
        b"]",
        b"!",
        b"^",
        b"*",
        b"?",
        b"\\",
        b":",
        b"=",
        b"0",
        b"[:alpha:]",
        b"[:digit:]",
        b"[:foo:]",
        b"[.a.]",
        b"[.ab.]",
        b"[=a=]",
        b"[!",
        b"[^",
        b"a-z",
        b"[:",
        b"[.",
        b"[=",
        b"A",
        b"B",
        b"Z",
        b"A-Z",
        b"[:upper:]",
        b"[:lower:]",
        b"[=A=]",
        b"[.A.]",
        b"\\A",
    ];

    /// Random patterns built from glob pieces, and values, compared with the C library (glibc's:
    /// udev's matching is glibc's fnmatch).
    #[test]
    #[cfg(target_env = "gnu")]
    fn agrees_with_libc() {
        let chars = b"ab-/.[]!^*?\\:=z0A BZ";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let rounds = std::env::var("FNMATCH_ROUNDS").map_or(200_000, |r| r.parse().unwrap());
        for _ in 0..rounds {
            let pattern: Vec<u8> = (0..next(6)).flat_map(|_| PIECES[next(PIECES.len())]).copied().collect();
            let value: Vec<u8> = (0..next(6)).map(|_| chars[next(chars.len())]).collect();
            assert_eq!(
                fnmatch(&pattern, &value),
                libc_fnmatch(&pattern, &value),
                "pattern {:?} value {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&value)
            );
            assert_eq!(
                fnmatch_casefold(&pattern, &value),
                libc_fnmatch_flags(&pattern, &value, FNM_CASEFOLD),
                "casefold: pattern {:?} value {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&value)
            );
        }
    }
}
