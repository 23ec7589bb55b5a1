#!/usr/bin/env bash
# CPU run: N gloo ranks on this machine, the CPU threads split between them.
#
#   launch/cpu.sh [N] [--config FILE] [key=value ...]
#
# N defaults to 2. Config: --config, else $PROBE_CONFIG, else configs/toy_cpu.yaml. Adds the override
# device=cpu (torch.distributed on gloo) before yours. OMP_NUM_THREADS = max(1, CPUs / N) unless set.
# Interpreter: $PYTHON (default: the repository's .venv/bin/python when it exists, else python3).
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

PYTHON=${PYTHON:-$(default_python)}

nranks=2
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    nranks=$1
    shift
fi
if (( nranks < 1 )); then
    echo "error: the number of ranks must be at least 1" >&2
    exit 2
fi

parse_launch_args configs/toy_cpu.yaml "$@"

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( $(cpu_count) / nranks ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export CUDA_VISIBLE_DEVICES=""

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nranks" \
    -m probe_dist.main --config "$CONFIG" device=cpu "${OVERRIDES[@]}"
