"""Multi-rank behaviour with real torchrun processes (gloo on CPU): world-size invariance for DDP and FSDP2,
sharding, per-rank restore, failure behaviour, and other launchers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from probe_dist.report.publish import live_log
from probe_dist.runtime.sharding import max_groups_per_rank, shard_groups

REPO = Path(__file__).resolve().parents[1]
B_E, B_U = 7, 5  # 7 does not divide by 2, 3 or 4; 5 neither
CONFIG = ["--config", str(REPO / "configs/toy_cpu.yaml"), f"sampling.B_E={B_E}", f"sampling.B_U={B_U}",
          "sampling.G_E=4", "sampling.G_U=4", "estimators.etas=[0.0,1e-3,1e-2]", "device=cpu"]
COMPARED = ("delta_h_true", "delta_h_true_se", "delta_h1", "delta_h1_se", "ess", "ess_frac", "khat", "kl")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def torchrun(n: int, out: Path, ckpt: Path, *extra: str, timeout: float = 600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "probe_dist.main", *CONFIG, f"checkpoint.path={ckpt}", f"output.dir={out}", *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# tol: fp world sizes (and DDP vs FSDP2) run the same float32/float64 ops per group (layouts are fixed by the blocks);
# only the order of gloo's float64 all-reduces over ≤ 4 ranks changes: ≤ 3·u₆₄ of Σ|x| per sum, times the
# cancellation of what is built from the sums (ΔH_true at η = 1e-3 against Ĥ: ≲ 1e4) ≲ 1e-11 relative; 1e-9 leaves
# 100× and fails any real difference (another sample, a group lost or counted twice: ≥ 1e-3). abs 1e-15: exact zeros.
def assert_same_numbers(a: dict, b: dict, rtol: float = 1e-9) -> None:
    def close(x, y):
        if x is None or y is None:  # NaN is written as null
            return x is None and y is None
        return math.isclose(x, y, rel_tol=rtol, abs_tol=1e-15)  # tol: fp (above)

    for key in ("entropy/base", "entropy/base_se", "entropy/base_naive", "delta_h1/per_eta", "delta_h1/per_eta_se"):
        assert close(a[key], b[key]), (key, a[key], b[key])
    assert len(a["sweep"]) == len(b["sweep"])
    for sa, sb in zip(a["sweep"], b["sweep"]):
        assert sa["eta"] == sb["eta"]
        for key in COMPARED:
            assert close(sa[key], sb[key]), (sa["eta"], key, sa[key], sb[key])


def test_sharding_covers_every_group_once():
    for num in (1, 5, 7, 64):
        for world in (1, 2, 3, 4, 8):
            shards = [shard_groups(num, world, r) for r in range(world)]
            flat = [g for s in shards for g in s]
            assert sorted(flat) == list(range(num))  # union is the batch, each group exactly once
            assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
            assert max(len(s) for s in shards) == max_groups_per_rank(num, world)


@pytest.fixture(scope="module")
def reference(toy_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ws1")
    res = torchrun(1, out, toy_checkpoint)
    assert res.returncode == 0, res.stderr[-3000:]
    return summary(out), out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_world_size_invariance(toy_checkpoint, reference, tmp_path, strategy):
    ref, ref_dir = reference
    ref_rows = (ref_dir / "sequences.jsonl").read_text()
    for n in (2, 3, 4):
        out = tmp_path / f"{strategy}{n}"
        res = torchrun(n, out, toy_checkpoint, f"distributed.strategy={strategy}")
        assert res.returncode == 0, res.stderr[-3000:]
        s = summary(out)
        assert s["provenance/world_size"] == n and s["provenance/strategy"] == strategy
        assert_same_numbers(ref, s)
        assert s["restore/verified"] is True and s["restore/verified_ranks"] == [True] * n
        # The gathered per-sequence table: every prompt group of E and U exactly once, same samples as ws=1.
        rows = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
        for batch, num in (("E", B_E), ("U", B_U)):
            keys = [(r["prompt_index"], r["response"]) for r in rows if r["batch"] == batch]
            assert sorted(keys) == [(p, i) for p in range(num) for i in range(4)]
        ref_tokens = [json.loads(line)["token_ids"] for line in ref_rows.splitlines()]
        assert [r["token_ids"] for r in rows] == ref_tokens


@pytest.mark.slow
def test_explanation_under_fsdp2_equals_ddp(toy_checkpoint, tmp_path):
    """The explanation (per-sequence decompositions, curvature, Cui's covariance) runs under FSDP2 and gives DDP's
    numbers at the same world size (2 ranks, uneven shards): the summary's keys and every sequence's
    contributions."""
    runs = {}
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        res = torchrun(2, out, toy_checkpoint, f"distributed.strategy={strategy}", "estimators.explain=true")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[strategy] = (summary(out), [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()])
    (ddp, ddp_rows), (fsdp, fsdp_rows) = runs["ddp"], runs["fsdp2"]
    assert "explain/skipped" not in fsdp and fsdp["provenance/strategy"] == "fsdp2"
    keys = [k for k in ddp if k.startswith(("explain/", "curvature/", "cui/")) and isinstance(ddp[k], float)]
    assert len(keys) >= 10, keys
    assert_same_numbers({**ddp, **{k: ddp[k] for k in keys}}, fsdp)
    for key in keys:
        assert math.isclose(ddp[key], fsdp[key], rel_tol=1e-9, abs_tol=1e-15), (key, ddp[key], fsdp[key])  # tol: fp assert_same_numbers' model
    assert len(ddp_rows) == len(fsdp_rows) == 4 * (B_E + B_U)
    for a, b in zip(ddp_rows, fsdp_rows):
        assert a["token_ids"] == b["token_ids"]
        for col in ("contrib_e", "contrib_u", "cov_contrib"):
            if col in a:
                assert math.isclose(a[col], b[col], rel_tol=1e-9, abs_tol=1e-15), (col, a[col], b[col])  # tol: fp as above


@pytest.mark.slow
def test_failing_rank_ends_every_rank(toy_checkpoint, tmp_path):
    start = time.monotonic()
    res = torchrun(3, tmp_path / "fail", toy_checkpoint, "distributed.strategy=ddp", "distributed.timeout_s=60",
                   "debug.fault=1:update_gradient", timeout=180)
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert "rank 1 failed: RuntimeError: injected fault" in res.stderr
    assert elapsed < 60 + 30 + 30  # timeout + 30 s, plus start-up on a loaded 2-core machine
    assert not (tmp_path / "fail" / "summary.json").exists()  # nothing half-written


@pytest.mark.slow
def test_killed_rank_ends_every_rank(toy_checkpoint, tmp_path):
    """SIGKILL one worker mid-run (no Python cleanup at all): the job still ends, non-zero, in bounded time."""
    out = tmp_path / "kill"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "probe_dist.main", *CONFIG, f"checkpoint.path={toy_checkpoint}", f"output.dir={out}",
           "distributed.strategy=ddp", "distributed.timeout_s=60", "estimators.etas=[0.0,1e-4,1e-3,1e-2,0.02,0.05]"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline and victim is None:
        time.sleep(0.5)
        ps = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "probe_dist.main"], capture_output=True, text=True)
        pids = [int(p) for p in ps.stdout.split()]
        if len(pids) >= 2 and live_log(out) is not None:
            victim = pids[-1]
    assert victim is not None, "workers did not start"
    time.sleep(3)
    start = time.monotonic()
    os.kill(victim, 9)
    try:
        _, stderr = proc.communicate(timeout=60 + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end within the collective timeout + 30 s after a rank was killed")
    assert proc.returncode != 0
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_accelerate_launch_matches_torchrun(toy_checkpoint, reference, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    out = tmp_path / "acc"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "probe_dist.main", *CONFIG,
           f"checkpoint.path={toy_checkpoint}", f"output.dir={out}", "distributed.strategy=ddp"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = summary(out)
    assert s["provenance/world_size"] == 2  # `--cpu` would silently run one process (measured)
    assert_same_numbers(reference[0], s)


@pytest.mark.slow
def test_grade_world_size_invariance(toy_checkpoint, tmp_path):
    """A GRADE update (relaxed rollouts of U, reward model, β·KL) gives the same numbers at W = 1 and W = 2 and 3
    (DDP), U's rounded ids and rewards included, and every rank restores."""
    grade = ["update.loss=grade", "update.kl_coef=0.05", "update.grade_top_k=8", "memory.microbatch_grad=3"]
    outs = {}
    for n in (1, 2, 3):
        out = tmp_path / f"grade{n}"
        res = torchrun(n, out, toy_checkpoint, *grade, *(["distributed.strategy=ddp"] if n > 1 else []))
        assert res.returncode == 0, res.stderr[-3000:]
        outs[n] = summary(out), [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
        assert outs[n][0]["restore/verified_ranks"] == [True] * n
    ref, ref_rows = outs[1]
    assert ref["provenance/loss"] == "grade" and ref["update/grade_kl_mean"] > 0
    for n in (2, 3):
        s, rows = outs[n]
        assert_same_numbers(ref, s)
        assert s["update/grad_norm"] == ref["update/grad_norm"]  # the float64-summed gradient, bit for bit
        assert [(r["batch"], r["prompt_index"], r["token_ids"], r["reward"]) for r in rows] == \
            [(r["batch"], r["prompt_index"], r["token_ids"], r["reward"]) for r in ref_rows]
    u_rows = [r for r in ref_rows if r["batch"] == "U"]
    assert len(u_rows) == B_U * 4 and all(len(r["token_ids"]) == ref["provenance/max_new_tokens"] for r in u_rows)
