#!/bin/bash
# salt/test.sh: render the autoattach Salt formula offline and compare with what each case
# expects. Nothing is applied: `salt-call --local state.show_top / state.show_sls` only
# compiles the top files and states (Jinja, then YAML) with a case's pillar and grains, in a
# scratch root; no state function runs, no file outside the scratch directory is written.
#
# Salt comes from PyPI (SALT_VERSION, in a venv under target/salt-venv, made once).
# The scratch roots reproduce dom0's layout after `qubesctl top.enable autoattach` and
# `qubesctl top.enable autoattach pillar=true`: the formula's .top files act as the top files
# of the `user` environment (/srv/user_salt, /srv/user_pillar), and the nodegroups are
# Qubes' own (qubes-mgmt-salt etc/salt/minion.d/f_defaults.conf: dom0 and vm).
#
# Each case is salt/tests/NAME.yaml:
#   id      the minion id (dom0, or a template's name)
#   grains  grains of that minion (os_family, osrelease)
#   sls     the state to render (autoattach.dom0 or autoattach.template)
#   top     the states the top file must give this minion (empty: none)
#   pillar  the text of the pillar autoattach/init.sls; absent: the shipped example
#   error   a text the render must fail with; absent: the render must equal NAME.json
#           (the states, without Salt's __sls__/__env__ bookkeeping)
# UPDATE=1 rewrites NAME.json from the render (review the diff before committing).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
SALT_VERSION=${SALT_VERSION:-3007.16}
venv=target/salt-venv
pass=0 fail=0
ok() { echo "ok   - $1"; pass=$((pass + 1)); }
bad() {
    echo "FAIL - $1"
    if [ -n "${2-}" ]; then printf '%s\n' "$2" | sed 's/^/       /' | head -n 40; fi
    fail=$((fail + 1))
}

if ! "$venv/bin/salt-call" --version 2>/dev/null | grep -q "^salt-call $SALT_VERSION "; then
    echo "#    installing salt $SALT_VERSION from PyPI into $venv"
    rm -rf "$venv"
    mkdir -p target # a fresh tree has none yet: the log below goes there
    # Debian's python3 (not a pyenv one): python3-venv is part of test.sh's packages.
    if ! { /usr/bin/python3 -m venv "$venv" && "$venv/bin/pip" install -q "salt==$SALT_VERSION"; } >"$venv.log" 2>&1; then
        bad "install salt $SALT_VERSION from PyPI" "$(tail -n 20 "$venv.log")"
        echo "$pass passed, $fail failed"
        exit 1
    fi
fi
salt_call=$venv/bin/salt-call

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

py=$venv/bin/python # Salt's own python, with PyYAML

# field CASE KEY: a field of a case file (a list one item a line; nothing when absent).
field() {
    "$py" - "$1" "$2" <<'PY'
import sys, yaml
value = yaml.safe_load(open(sys.argv[1])).get(sys.argv[2])
if isinstance(value, list):
    print("\n".join(value))
elif isinstance(value, dict):
    print(yaml.safe_dump(value, default_flow_style=False), end="")
elif value is not None:
    print(value, end="" if str(value).endswith("\n") else "\n")
PY
}

# render CASE: prints the case's top ("TOP ...") and its state render as JSON, or the error.
render() {
    local case=$1 root
    root=$scratch/$(basename "$case" .yaml)
    mkdir -p "$root/user_salt" "$root/user_pillar/autoattach" "$root/base" "$root/conf" "$root/var"
    cp -r salt/autoattach "$root/user_salt/"
    cp salt/autoattach.top "$root/user_salt/top.sls"
    cp salt/pillar/autoattach.top "$root/user_pillar/top.sls"
    field "$case" pillar >"$root/user_pillar/autoattach/init.sls"
    [ -s "$root/user_pillar/autoattach/init.sls" ] ||
        cp salt/pillar/autoattach/init.sls "$root/user_pillar/autoattach/init.sls"
    {
        echo "root_dir: $root/var"
        echo "file_client: local"
        echo "top_file_merging_strategy: merge"
        echo "default_top: base"
        echo "env_order: []"
        echo "file_roots: {base: [$root/base], user: [$root/user_salt]}"
        echo "pillar_roots: {base: [$root/base], user: [$root/user_pillar]}"
        echo "nodegroups: {dom0: dom0, vm: '* and not dom0'}"
        echo "log_level: quiet"
        echo "grains:"
        field "$case" grains | sed 's/^/  /'
    } >"$root/conf/minion"
    local id
    id=$(field "$case" id)
    "$salt_call" --local --config-dir "$root/conf" --id "$id" --out=json --retcode-passthrough \
        state.show_top >"$root/top.json" 2>"$root/top.err" || { cat "$root/top.err"; return 1; }
    "$salt_call" --local --config-dir "$root/conf" --id "$id" --out=json --retcode-passthrough \
        state.show_sls "$(field "$case" sls)" saltenv=user pillarenv=user >"$root/sls.json" 2>"$root/sls.err"
    local rc=$?
    python3 - "$root/top.json" "$root/sls.json" "$rc" <<'PY'
import json, sys
top = json.load(open(sys.argv[1]))["local"]
print("TOP " + " ".join(s for env in sorted(top) for s in top[env]))
try:
    states = json.load(open(sys.argv[2]))["local"]
except ValueError:
    states = None
if sys.argv[3] != "0" or not isinstance(states, dict):
    text = "\n".join(states) if isinstance(states, list) else str(states)
    lines = [l for l in text.splitlines() if "autoattach pillar:" in l] or text.splitlines()[:1]
    print("ERROR " + (lines[0] if lines else "(no message)"))
    sys.exit(0)
for state in states.values():
    state.pop("__sls__", None)
    state.pop("__env__", None)
print(json.dumps(states, indent=2, sort_keys=True))
PY
}

for case in salt/tests/*.yaml; do
    name=$(basename "$case" .yaml)
    expected=${case%.yaml}.json
    out=$(render "$case") || { bad "$name: salt-call ran" "$out"; continue; }
    id=$(field "$case" id)
    top=$(sed -n 's/^TOP //p' <<<"$out" | tr ' ' '\n' | sed '/^$/d')
    want_top=$(field "$case" top)
    if [ "$top" = "$want_top" ]; then ok "$name: the top gives $id [${want_top//$'\n'/ }]"
    else bad "$name: the top gives $id [${want_top//$'\n'/ }]" "got: [${top//$'\n'/ }]"; fi
    body=$(sed '/^TOP /d' <<<"$out")
    want=$(field "$case" error)
    if [ -n "$want" ]; then
        if grep -q '^ERROR ' <<<"$body" && grep -qF -- "$want" <<<"$body"; then ok "$name: render fails: $want"
        else bad "$name: render fails: $want" "$body"; fi
    elif grep -q '^ERROR ' <<<"$body"; then
        bad "$name: renders" "$body"
    elif [ "${UPDATE:-}" = 1 ]; then
        printf '%s\n' "$body" >"$expected"
        ok "$name: $expected updated"
    elif diff_out=$(diff -u "$expected" - <<<"$body"); then
        ok "$name: renders $(field "$case" sls) as $name.json"
    else
        bad "$name: renders $(field "$case" sls) as $name.json" "$diff_out"
    fi
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
