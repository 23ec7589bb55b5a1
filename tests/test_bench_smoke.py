"""Every bench/ script's `--smoke` run: the real benchmark code path on a tiny model, in seconds, offline.

Each script runs as a subprocess (`--smoke --out <tmp>/x.json`, HF_HUB_OFFLINE=1) and must exit 0 and write JSON
with the schema of that script's committed CPU results (bench/results/<script>_*cpu.json: every key there, at every
depth, with a value of the same kind) and only finite numbers. A new bench script is picked up by the glob; a smoke
run takes 5-15 s on 2 cores, so these are in the fast tier.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))
# Subtrees whose keys are another library's (a transformers config's to_dict): only their type is compared.
OPAQUE = {"model"}
# A hang guard for one subprocess, not a measurement: each smoke run takes seconds (the module docstring).
HANG_GUARD_S = 600


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], capture_output=True, text=True,
                          env=_env(), cwd=str(REPO), timeout=HANG_GUARD_S)


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def schema_mismatches(reference, value, where: str = "") -> list[str]:
    """Where `value` lacks the schema of `reference` (a committed result): a missing key, a value of another kind
    (number/bool/str/dict/list), an empty list where the reference has elements (each element is compared with the
    reference's first). A None in the reference accepts anything (e.g. closures of a run without the explanation)."""
    if reference is None:
        return []
    if _kind(reference) != _kind(value):
        return [f"{where}: {_kind(value)} where the committed result has {_kind(reference)}"]
    if isinstance(reference, dict):
        bad = []
        for key, ref in reference.items():
            if key not in value:
                bad.append(f"{where}.{key}: missing")
            elif key not in OPAQUE:
                bad.extend(schema_mismatches(ref, value[key], f"{where}.{key}"))
        return bad
    if isinstance(reference, list) and reference:
        if not value:
            return [f"{where}: empty list where the committed result has {len(reference)} elements"]
        return [line for i, v in enumerate(value) for line in schema_mismatches(reference[0], v, f"{where}[{i}]")]
    return []


def non_finite(value, where: str = "") -> list[str]:
    """JSON paths of the numbers in `value` (nested dicts/lists) that are NaN or ±inf."""
    if isinstance(value, dict):
        return [line for k, v in value.items() for line in non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [line for i, v in enumerate(value) for line in non_finite(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where} = {value}"]
    return []


def test_schema_check_sees_a_missing_key_a_wrong_kind_and_a_nan():
    ref = {"a": 1.5, "b": {"c": "x", "d": None}, "runs": [{"s": 2}], "model": {"k": 1}}
    assert schema_mismatches(ref, {"a": 3, "b": {"c": "y", "d": 4}, "runs": [{"s": 1.0}, {"s": 7}], "model": {},
                                   "extra": True}) == []
    assert schema_mismatches(ref, {"a": True, "b": {}, "runs": [], "model": {}}) == [
        ".a: bool where the committed result has number", ".b.c: missing", ".b.d: missing",
        ".runs: empty list where the committed result has 1 elements"]
    assert non_finite({"x": [1.0, float("nan")], "y": {"z": float("inf")}, "s": "nan"}) == [".x[1] = nan",
                                                                                            ".y.z = inf"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script, tmp_path):
    out = tmp_path / "x.json"
    res = _run(script, "--smoke", "--out", str(out))
    assert res.returncode == 0, f"bench/{script}.py --smoke exited {res.returncode}:\n{res.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert isinstance(result, dict) and result, "empty result"
    assert non_finite(result) == []
    committed = sorted(RESULTS.glob(f"{script}_*cpu.json"))
    for path in committed:
        reference = json.loads(path.read_text())
        if reference.get("settings", {}).get("backend", "hf") != "hf":  # --backend vllm adds its keys; the smoke
            continue                                                    # runs without vLLM
        assert schema_mismatches(reference, result) == [], f"schema of {path.name}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke_refuses_to_write_into_results(script):
    target = RESULTS / f"{script}_smoke_refused.json"
    assert not target.exists()
    res = _run(script, "--smoke", "--out", str(target))
    assert res.returncode == 2, res.stderr[-4000:]  # tol: exact the refusal's exit status
    assert not target.exists()
