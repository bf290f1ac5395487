#!/bin/sh
# sysusers-pre.sh FILE...: the %pre scriptlet lines that create the users of sysusers.d FILEs,
# for %sysusers_create_compat where Fedora's macros are not installed (macros.systemd-compat).
#
# It writes, for an entry `u NAME - "GECOS" HOME SHELL` (automatic uid, user and group of the
# same name), the lines Fedora's sysusers.generate-pre.sh (systemd package, functions group()
# and user()) writes for it: the group first, then the user, each only if missing, each
# failure ignored (`|| :`), home `-` as `/`, shell `-` as /usr/sbin/nologin. Any other kind
# of entry (a fixed uid, `g`, `m`, `u!`) is refused rather than half-translated: extend this
# script, or build on Fedora, if the package ever needs one.
set -eu

fail() { echo "sysusers-pre.sh: $*" >&2; exit 1; }

for file in "$@"; do
    [ -r "$file" ] || fail "$file: cannot read"
    echo "# generated from $(basename "$file")"
    n=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        case $line in '' | '#'* | ';'*) continue ;; esac
        # u NAME - "GECOS" HOME SHELL, the GECOS in double quotes, no quote inside.
        rest=${line#u }
        [ "$rest" != "$line" ] || fail "$file:$n: only 'u NAME - \"GECOS\" HOME SHELL' entries are supported"
        name=${rest%% *}
        rest=${rest#"$name" }
        [ "${rest%% *}" = - ] || fail "$file:$n: only an automatic uid (-) is supported"
        rest=${rest#- }
        case $rest in \"*\"*) ;; *) fail "$file:$n: the GECOS must be in double quotes" ;; esac
        rest=${rest#\"}
        gecos=${rest%%\"*}
        rest=${rest#*\" }
        home=${rest%% *}
        shell=${rest#"$home"}
        shell=${shell# }
        case $name$gecos$home$shell in *"'"* | *\\*) fail "$file:$n: quotes and backslashes are not supported" ;; esac
        [ "$home" != - ] && [ -n "$home" ] || home=/
        [ "$shell" != - ] && [ -n "$shell" ] || shell=/usr/sbin/nologin
        [ "$gecos" != - ] || gecos=
        echo "getent group '$name' >/dev/null || groupadd -r '$name' || :"
        echo "getent passwd '$name' >/dev/null || \\"
        echo "    useradd -r -g '$name' -d '$home' -s '$shell' -c '$gecos' '$name' || :"
    done <"$file"
done
