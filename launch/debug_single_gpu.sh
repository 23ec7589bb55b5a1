#!/usr/bin/env bash
# Debug run: world size 1 under torchrun (the same code path as a real run), small config, every check on.
#
#   launch/debug_single_gpu.sh [--config FILE] [key=value ...]
#
# Config: --config, else $PROBE_CONFIG, else configs/debug_1gpu.yaml (device auto: the GPU when there is one).
# Turns on TORCH_DISTRIBUTED_DEBUG=DETAIL (collective shape/order checks), C++ stack traces, the Python
# fault handler, and the config override debug.detect_anomaly=true (torch.autograd.set_detect_anomaly).
# Uses the first GPU unless CUDA_VISIBLE_DEVICES is set. Set CUDA_LAUNCH_BLOCKING=1 yourself for exact
# CUDA error locations (slow). Interpreter: $PYTHON (default: the repository's .venv/bin/python when it exists, else python3).
set -euo pipefail
# shellcheck source=launch/_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

PYTHON=${PYTHON:-$(default_python)}
parse_launch_args configs/debug_1gpu.yaml "$@"

export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export TORCH_DISTRIBUTED_DEBUG=DETAIL
export TORCH_SHOW_CPP_STACKTRACES=1
export PYTHONFAULTHANDLER=1

set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m probe_dist.main --config "$CONFIG" debug.detect_anomaly=true "${OVERRIDES[@]}"
