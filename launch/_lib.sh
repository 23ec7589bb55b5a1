# Shared helpers for the launchers in this folder (sourced, not executed).
# shellcheck shell=bash

# parse_launch_args DEFAULT_CONFIG ARGS...
#   Splits the launcher's arguments into CONFIG (from `--config FILE`, `--config=FILE`, a bare *.yaml/*.yml
#   argument, $PROBE_CONFIG, or DEFAULT_CONFIG, in that order) and OVERRIDES (everything else, passed
#   through unchanged to probe_dist.main as key=value overrides or flags such as --quiet).
parse_launch_args() {
    local default_config=$1
    shift
    CONFIG=${PROBE_CONFIG:-$default_config}
    OVERRIDES=()
    while (( $# > 0 )); do
        case "$1" in
            --config)
                [[ $# -ge 2 ]] || { echo "error: --config needs a file" >&2; exit 2; }
                CONFIG=$2
                shift 2
                ;;
            --config=*)
                CONFIG=${1#--config=}
                shift
                ;;
            *.yaml | *.yml)
                if [[ "$1" == *=* ]]; then OVERRIDES+=("$1"); else CONFIG=$1; fi
                shift
                ;;
            *)
                OVERRIDES+=("$1")
                shift
                ;;
        esac
    done
    if [[ ! -f "$CONFIG" ]]; then
        echo "error: config file '$CONFIG' not found (run from the repository root, or pass --config FILE;" \
             "presets: $(printf '%s ' configs/*.yaml))" >&2
        exit 2
    fi
}

# cpu_count: CPUs this process may use (affinity-aware).
cpu_count() {
    nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1
}

# The interpreter: the repository's own venv (what the README's commands create) when there is one, else python3.
default_python() {
    local venv
    venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
    if [[ -x "$venv" ]]; then echo "$venv"; else echo python3; fi
}
