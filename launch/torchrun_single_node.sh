#!/usr/bin/env bash
# Single-node multi-GPU run: torchrun --standalone, one rank per visible GPU.
#
#   launch/torchrun_single_node.sh [NPROC] [--config FILE] [key=value ...]
#
# NPROC defaults to the number of visible GPUs (CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`).
# The config defaults to $PROBE_CONFIG, else configs/debug_1gpu.yaml. Everything else is passed through
# to probe_dist.main as overrides, e.g.  launch/torchrun_single_node.sh 8 --config configs/X.yaml sampling.B_E=64
# Interpreter: $PYTHON (default: the repository's .venv/bin/python when it exists, else python3).
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

PYTHON=${PYTHON:-$(default_python)}

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    nproc_per_node=$1
    shift
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    nproc_per_node=${#visible[@]}
elif command -v nvidia-smi >/dev/null 2>&1; then
    nproc_per_node=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
    nproc_per_node=0
fi
if (( nproc_per_node < 1 )); then
    echo "error: no GPUs visible; pass the number of ranks as the first argument, or use launch/cpu.sh" >&2
    exit 2
fi

parse_launch_args configs/debug_1gpu.yaml "$@"

# GPU ranks need few CPU threads each; an explicit OMP_NUM_THREADS wins.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    OMP_NUM_THREADS=$(( $(cpu_count) / nproc_per_node ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc_per_node" \
    -m probe_dist.main --config "$CONFIG" "${OVERRIDES[@]}"
