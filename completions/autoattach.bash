# bash completion for autoattach(8): commands, each command's options, devices from sysfs.
# Installed as /usr/share/bash-completion/completions/autoattach.
# The option lists are src/cli/args.rs's OPTIONS, per command (tests/completions.rs checks).

_autoattach_devices()
{
    # Block device names and USB bus ids (not interfaces, which hold a ':'), from sysfs.
    local sysfs=${1:-/sys} d names=()
    for d in "$sysfs"/class/block/* "$sysfs"/bus/usb/devices/*; do
        [[ -e $d ]] || continue
        d=${d##*/}
        [[ $d == *:* ]] || names+=("$d")
    done
    printf '%s\n' "${names[@]}"
}

_autoattach()
{
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion -n = || return
    else
        cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}") cword=$COMP_CWORD
    fi

    local commands="run check test list record replay help"
    local every="-v --verbose -q --quiet -h --help --version"
    local command="" sysfs=/sys i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --sysfs) sysfs=${words[i+1]} ;;
            --sysfs=*) sysfs=${words[i]#--sysfs=} ;;
            --rules | --dev | --qrexec-client | --qubesdb-read | --qubesdb-socket | --action | --timeout | --debounce | \
                --rate-limit | --slow-call | --rcvbuf | -o | --output) ((i++)) ;;
            -*) ;;
            *) [[ -z $command ]] && command=${words[i]} ;;
        esac
    done

    case $prev in
        --rules) _autoattach_files_or_dirs; return ;;
        --sysfs | --dev) COMPREPLY=($(compgen -d -- "$cur")); return ;;
        --qrexec-client | --qubesdb-read) COMPREPLY=($(compgen -c -- "$cur")); return ;;
        --qubesdb-socket) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        -o | --output) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --action) COMPREPLY=($(compgen -W "add change remove" -- "$cur")); return ;;
        --timeout | --debounce | --slow-call | --rate-limit | --rcvbuf) return ;;
    esac

    local options
    case $command in
        run) options="--rules --sysfs --dev --qrexec-client --qubesdb-read --qubesdb-socket --no-qubesdb --dry-run --timeout
                      --debounce --rate-limit --no-detach --slow-call --rcvbuf" ;;
        check) options="--rules --qubesdb-read --no-qubesdb" ;;
        test) options="--rules --sysfs --dev --qrexec-client --qubesdb-read --no-qubesdb --action" ;;
        list) options="--rules --sysfs --qubesdb-read --no-qubesdb" ;;
        record) options="--sysfs --dev -o --output" ;;
        replay) options="--rules --dev --qrexec-client --qubesdb-read --timeout --debounce --rate-limit
                         --no-detach" ;;
        help | "") options="" ;;
    esac

    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options $every" -- "$cur"))
        return
    fi
    case $command in
        "") COMPREPLY=($(compgen -W "$commands" -- "$cur")) ;;
        help) COMPREPLY=($(compgen -W "$commands" -- "$cur")) ;;
        test | record) COMPREPLY=($(compgen -W "$(_autoattach_devices "$sysfs")" -- "$cur")) ;;
        check | replay) _autoattach_files_or_dirs ;;
    esac
}

_autoattach_files_or_dirs()
{
    local IFS=$'\n'
    COMPREPLY=($(compgen -f -- "$cur"))
    compopt -o filenames 2>/dev/null
}

complete -F _autoattach autoattach
