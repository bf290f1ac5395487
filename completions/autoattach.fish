# fish completion for autoattach(8): commands, each command's options, devices from sysfs.
# Installed as /usr/share/fish/vendor_completions.d/autoattach.fish.
# The option lists are src/cli/args.rs's OPTIONS, per command (tests/completions.rs checks).

function __autoattach_devices
    for d in /sys/class/block/* /sys/bus/usb/devices/*
        set -l name (basename $d)
        string match -q '*:*' -- $name; or echo $name
    end
end

set -l commands run check test list record replay help
complete -c autoattach -f
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a run -d 'the agent: kernel uevents in, qrexec calls out'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a check -d 'validate rules'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a test -d 'why DEVICE matches or not'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a list -d 'present devices and a rule line'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a record -d 'a umockdev recording of DEVICE'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a replay -d 'the pipeline over a fixture'
complete -c autoattach -n "not __fish_seen_subcommand_from $commands" -a help -d 'the help of a command'

# Options of every command.
complete -c autoattach -s v -l verbose -d 'more detail (debug lines)'
complete -c autoattach -s q -l quiet -d 'warnings and errors only'
complete -c autoattach -s h -l help -d 'help of the command'
complete -c autoattach -l version -d 'the version'

# Options of some commands.
complete -c autoattach -n '__fish_seen_subcommand_from run check test list replay' -l rules -r -F -d 'rules file or directory'
complete -c autoattach -n '__fish_seen_subcommand_from run test list record' -l sysfs -r -a '(__fish_complete_directories)' -d 'sysfs root'
complete -c autoattach -n '__fish_seen_subcommand_from run test replay record' -l dev -r -a '(__fish_complete_directories)' -d 'device node directory'
complete -c autoattach -n '__fish_seen_subcommand_from run test replay' -l qrexec-client -r -F -d 'client that makes calls'
complete -c autoattach -n '__fish_seen_subcommand_from run check test list replay' -l qubesdb-read -r -F -d 'qubesdb reader'
complete -c autoattach -n '__fish_seen_subcommand_from run' -l qubesdb-socket -r -F -d 'the qubesdb daemon socket'
complete -c autoattach -n '__fish_seen_subcommand_from run check test list' -l no-qubesdb -d 'neither wait for qubesdb nor read rules from it'
complete -c autoattach -n '__fish_seen_subcommand_from test' -l action -x -a 'add change remove' -d 'the event to test'
complete -c autoattach -n '__fish_seen_subcommand_from run' -l dry-run -d 'print each call instead of making it'
complete -c autoattach -n '__fish_seen_subcommand_from run replay' -l timeout -x -d 'readiness timeout'
complete -c autoattach -n '__fish_seen_subcommand_from run replay' -l debounce -x -d 'how long a device must stay'
complete -c autoattach -n '__fish_seen_subcommand_from run replay' -l rate-limit -x -d 'at most N calls per window'
complete -c autoattach -n '__fish_seen_subcommand_from run replay' -l no-detach -d 'no Detach call on removal'
complete -c autoattach -n '__fish_seen_subcommand_from run' -l slow-call -x -d 'log a call still running after this long'
complete -c autoattach -n '__fish_seen_subcommand_from run' -l rcvbuf -x -d 'receive buffer to ask for'
complete -c autoattach -n '__fish_seen_subcommand_from record' -s o -l output -r -F -d 'where to write'

# Arguments.
complete -c autoattach -n '__fish_seen_subcommand_from test record' -a '(__autoattach_devices)' -d device
complete -c autoattach -n '__fish_seen_subcommand_from check replay' -F
complete -c autoattach -n '__fish_seen_subcommand_from help' -a "$commands"
