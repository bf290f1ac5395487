#!/usr/bin/env python3
"""Structural check of qrexec policy files, for tests/dom0/run.sh.

No real qrexec parser can run here without installing Qubes, so this re-states, line
by line, the rules of the R4.1 parser in QubesOS/qubes-core-qrexec,
qrexec/policy/parser.py: Rule.from_line (5+ whitespace-separated fields),
validate_service_and_argument (service and argument charset, `+` prefix, `*` pairing),
the VMToken classes (which @tokens may stand as source, target or redirect; `dom0` is an
alias of @adminvm), Action (allow, deny, ask and the parameters each accepts, given at
most once) and the `@default` + allow rule. It is stricter than qrexec in two ways: directives (`!include` ...) are refused, and a
literal qube name must be a valid qube name.

Usage: policy_check.py FILE | --self-test
"""
import re
import string
import sys

RPCNAME_CHARSET = set(string.ascii_letters + string.digits + "+-._")
QUBE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}\Z")
SOURCE_EXACT = {"@anyvm"}
TARGET_EXACT = {"@adminvm", "@anyvm", "@default", "@dispvm"}
REDIRECT_EXACT = {"@adminvm", "@dispvm"}
SOURCE_PREFIX = ("@type:", "@tag:", "@dispvm:", "@dispvm:@tag:")
TARGET_PREFIX = SOURCE_PREFIX
REDIRECT_PREFIX = ("@dispvm:",)
PARAMS = {"allow": {"target", "user"}, "ask": {"target", "default_target", "user"}, "deny": set()}


def token(tok, exact, prefixes):
    """A VMToken allowed in one column, or an error message."""
    if tok == "dom0":
        tok = "@adminvm"
    if not tok.startswith("@"):
        return None if QUBE.match(tok) else "invalid qube name {!r}".format(tok)
    if tok in exact:
        return None
    for prefix in sorted(prefixes, key=len, reverse=True):
        rest = tok[len(prefix):]
        if tok.startswith(prefix) and rest and not rest.startswith("@"):
            return None
    return "token {!r} not allowed here".format(tok)


def rule(service, argument, source, target, action, params):
    """The first error of one rule, or None."""
    if service != "*" and (not service or set(service) - (RPCNAME_CHARSET - {"+"})):
        return "invalid service {!r}".format(service)
    if argument != "*":
        if not argument.startswith("+") or set(argument) - RPCNAME_CHARSET:
            return "invalid argument {!r}".format(argument)
        if service == "*":
            return "only * argument allowed for * service"
    err = token(source, SOURCE_EXACT, SOURCE_PREFIX)
    if err or source in ("dom0", "@adminvm"):
        return "source: " + (err or "@adminvm cannot be a source")
    err = token(target, TARGET_EXACT, TARGET_PREFIX)
    if err:
        return "target: " + err
    if action not in PARAMS:
        return "invalid action {!r}".format(action)
    seen = {}
    for param in params:
        key, eq, value = param.partition("=")
        if not eq:
            return "invalid action parameter syntax {!r}".format(param)
        if key in seen:
            return "parameter given twice {!r}".format(key)
        if key not in PARAMS[action]:
            return "invalid parameter {!r} for {}".format(key, action)
        if key in ("target", "default_target"):
            err = token(value, REDIRECT_EXACT, REDIRECT_PREFIX)
            if err:
                return key + ": " + err
        seen[key] = value
    if target == "@default" and action == "allow" and "target" not in seen:
        return "allow action for @default rule must specify target="
    return None


def check(lines):
    """Every error as 'LINENO: message'; a file with no rule is an error too."""
    errors, rules = [], 0
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("!"):
            errors.append("{}: directives are not used here".format(lineno))
            continue
        fields = line.split()
        if len(fields) < 5:
            errors.append("{}: wrong number of fields".format(lineno))
            continue
        err = rule(*fields[:5], fields[5:])
        if err:
            errors.append("{}: {}".format(lineno, err))
        rules += 1
    if not rules:
        errors.append("0: no rule at all")
    return errors


BAD_NEW = [
    "custom.X * sys-usb @adminvm",
    "custom.X work sys-usb @adminvm ask",
    "custom.X +a/b sys-usb @adminvm ask",
    "custom+X * sys-usb @adminvm ask",
    "* +arg sys-usb @adminvm deny",
    "custom.X * @adminvm @adminvm deny",
    "custom.X * dom0 @adminvm deny",
    "custom.X * @dispvm @adminvm deny",
    "custom.X * sys-usb @bogus deny",
    "custom.X * sys-usb @tag: deny",
    "custom.X * sys-usb @adminvm maybe",
    "custom.X * sys-usb @adminvm deny user=root",
    "custom.X * sys-usb @adminvm ask foo",
    "custom.X * sys-usb @adminvm ask default_target=@anyvm",
    "custom.X * sys-usb @adminvm ask target=work target=work",
    "custom.X * sys-usb @adminvm ask colour=red",
    "custom.X * sys-usb @default allow",
    "custom.X * sys;usb @adminvm deny",
    "!include-dir /etc/qubes/policy.d/include",
]
GOOD_NEW = [
    "custom.X * sys-usb @adminvm ask default_target=@adminvm",
    "custom.X +work+__+sda sys-usb dom0 allow",
    "custom.X +vault+__+sdb1+__+0781+5581+4C53000123+u080650+1.0+1 sys-usb @adminvm allow",
    "custom.X * @anyvm @anyvm deny",
    "custom.X * @tag:usb @dispvm:default-dvm allow target=@dispvm:default-dvm user=root",
    "* * @type:AppVM @default allow target=work",
]


def self_test():
    """The checker must reject each known-bad line and accept each known-good one."""
    problems = []
    for line in BAD_NEW:
        if not check([line]):
            problems.append("accepted bad line: " + line)
    for line in GOOD_NEW:
        errs = check([line])
        if errs:
            problems.append("rejected good line: {} ({})".format(line, errs))
    return problems


def main(argv):
    if argv == ["--self-test"]:
        problems = self_test()
    elif len(argv) == 1 and not argv[0].startswith("-"):
        with open(argv[0], encoding="ascii") as f:
            problems = ["{}:{}".format(argv[0], e) for e in check(f)]
    else:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
