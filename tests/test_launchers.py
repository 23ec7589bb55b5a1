"""The launchers: the debug launcher (world size 1) and the CPU launcher (world size 2) give identical numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import assert_same_numbers

REPO = Path(__file__).resolve().parents[1]
COMMON = ["sampling.B_E=5", "sampling.B_U=3", "sampling.G_E=4", "sampling.G_U=4", "estimators.etas=[0.0,1e-3]"]


def _launch(script: str, args: list[str], out: Path, ckpt: Path) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--config", str(REPO / "configs/toy_cpu.yaml"),
                          f"checkpoint.path={ckpt}", f"output.dir={out}", *COMMON],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_debug_launcher_and_cpu_launcher_agree(toy_checkpoint, tmp_path):
    debug = _launch("debug_single_gpu.sh", [], tmp_path / "debug", toy_checkpoint)
    cpu2 = _launch("cpu.sh", ["2"], tmp_path / "cpu2", toy_checkpoint)
    assert debug["provenance/world_size"] == 1 and cpu2["provenance/world_size"] == 2
    assert_same_numbers(debug, cpu2)
    assert debug["restore/verified"] and cpu2["restore/verified"]


def test_launchers_reject_bad_rank_count(tmp_path):
    res = subprocess.run(["bash", str(REPO / "launch/cpu.sh"), "0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "at least 1" in res.stderr
