"""The built-in toy RL checkpoint: layout, a non-trivial policy, reproducibility for a seed, the build CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import probe_dist.toy.base
import probe_dist.toy.reward
from probe_dist.scoring.score import score_batch
from probe_dist.toy import checkpoint as toy
from tests.probe_harness import make_probe
from tests.tolerances import within_se

REPO = Path(__file__).resolve().parents[1]
TENSOR_FILES = ("base/model.safetensors", "adapter_model.safetensors")
TIMING_KEYS = ("build_seconds", "seconds")


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, keyed '<file>:<name>' (optimizer state keyed by parameter name)."""
    out = {}
    for rel in TENSOR_FILES:
        out.update({f"{rel}:{k}": v for k, v in load_file(str(ckpt / rel)).items()})
    blob = torch.load(str(ckpt / "optimizer.pt"), map_location="cpu", weights_only=False)
    ids = [i for g in blob["state_dict"]["param_groups"] for i in g["params"]]
    for pid, name in zip(ids, blob["param_names"]):
        for key, val in blob["state_dict"]["state"][pid].items():
            out[f"optimizer.pt:{name}:{key}"] = val
    return out


def optimizer_meta(ckpt: Path) -> dict:
    blob = torch.load(str(ckpt / "optimizer.pt"), map_location="cpu", weights_only=False)
    groups = [{k: v for k, v in g.items()} for g in blob["state_dict"]["param_groups"]]
    return {"class": blob["optimizer_class"], "names": blob["param_names"], "groups": groups}


def without_timings(obj):
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return obj


# ----------------------------------------------------------------------------------------------- layout


def test_directory_layout(toy_checkpoint):
    ckpt = toy_checkpoint
    assert (ckpt / toy.COMPLETE_MARKER).is_file()
    assert (ckpt / "base" / "config.json").is_file() and (ckpt / "base" / "model.safetensors").is_file()
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 8 and adapter_cfg["lora_dropout"] == 0.05
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)

    blob = torch.load(str(ckpt / "optimizer.pt"), map_location="cpu", weights_only=False)
    assert blob["optimizer_class"] == "AdamW"
    names = blob["param_names"]
    assert len(names) == len(set(names)) == len(adapter) == len(blob["state_dict"]["state"])
    # param_names are the live peft names of the adapter tensors (the saved file drops the adapter name).
    assert {n.replace(".default.", ".") for n in names} == set(adapter)
    for state in blob["state_dict"]["state"].values():
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(state) and float(state["step"]) == 4.0
        assert float(state["exp_avg_sq"].abs().sum()) > 0.0  # tol: exact some second moment is non-zero

    args = json.loads((ckpt / "training_args.json").read_text())
    for key in ("loss", "temperature", "max_new_tokens", "lr", "betas", "eps", "weight_decay", "grad_clip"):
        assert key in args, key
    assert args["loss"] == "grpo" and args["temperature"] > 0 and args["max_new_tokens"] >= 1
    (group,) = blob["state_dict"]["param_groups"]
    assert group["lr"] == args["lr"] and list(group["betas"]) == list(args["betas"])
    assert group["eps"] == args["eps"] and group["weight_decay"] == args["weight_decay"]

    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == args["grpo_steps"] == len(state["grpo_history"])
    assert state["format_version"] == toy.TOY_FORMAT_VERSION


# ----------------------------------------------------------------------------------------------- non-trivial policy


def test_policy_is_non_trivial(toy_checkpoint):
    """Sampled at the recorded temperature, the policy is partly right and still uncertain."""
    args = json.loads((toy_checkpoint / "training_args.json").read_text())
    probe = make_probe(toy_checkpoint, [])
    assert probe.cfg.sampling.temperature == args["temperature"]  # the probe samples at the recorded temperature
    recorded = json.loads((toy_checkpoint / "trainer_state.json").read_text())
    # tol: bound the build's own record (deterministic for a seed) meets the toy's spec: partly right, not collapsed
    # — accuracy in (0.1, 0.9) and ≥ 0.05 nats per token (seeds 0-4: accuracy 0.44-0.60, entropy 0.38-0.49)
    assert 0.1 < recorded["final_sampled_accuracy"] < 0.9 and recorded["final_token_entropy"] > 0.05, recorded
    batch = probe.sample("E", 25, 8)  # 200 samples; generation cost is per prompt group
    rewards = torch.cat([g.rewards for g in batch.real_groups])  # not the last block's zero-weight copies
    assert rewards.numel() == 200
    # The probe samples the recorded policy: its accuracy estimate agrees with the build's (200 independent
    # prompt-response draws from the same train split, at the same temperature). Both are estimates of one
    # population accuracy p: the build's SE √(p(1 − p)/200); the probe's, with 8 responses per prompt, from the
    # spread of its 25 group means (prompts are the unit).
    group_means = torch.stack([g.rewards.double().mean() for g in batch.real_groups])
    se_probe = float(group_means.std()) / math.sqrt(len(group_means))
    p = recorded["final_sampled_accuracy"]
    se_build = math.sqrt(p * (1 - p) / 200)
    # tol: stat the two estimates differ by ≤ z_bonferroni() SEs of their difference (independent samples)
    assert within_se(float(rewards.mean()), p, math.sqrt(se_probe ** 2 + se_build ** 2)), (
        float(rewards.mean()), p, se_probe, se_build)
    # Groups with mixed rewards exist, so GRPO advantages are non-zero.
    assert any(float(g.advantages.abs().sum()) > 0 for g in batch.real_groups)  # tol: exact some advantage ≠ 0
    scores = score_batch(probe.rt, probe.runner, batch)
    tokens = sum(int(s.T.sum()) for s in scores)
    token_entropy = sum(float(s.h_rb.sum()) for s in scores) / tokens
    assert token_entropy > 0, token_entropy  # tol: exact the sampled policy is not a point mass everywhere


# ----------------------------------------------------------------------------------------------- reproducibility


@pytest.fixture(scope="module")
def short_builds(tmp_path_factory):
    """Seed 0 built twice and seed 1 once, each with shortened base and reward-model schedules (20 steps each; the
    same code path as the full build — determinism and seed dependence are under test, not the schedule — where a
    full extra build costs minutes)."""
    root = tmp_path_factory.mktemp("short_builds")
    patch = pytest.MonkeyPatch()
    patch.setattr(probe_dist.toy.base, "train_base",
                  functools.partial(probe_dist.toy.base.train_base, steps=20, eval_samples=8))
    patch.setattr(probe_dist.toy.reward, "STEPS", 20)
    try:
        states = {name: toy.build(root / name, seed=seed) for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1))}
    finally:
        patch.undo()
    return root, states


@pytest.mark.slow
def test_same_seed_rebuilds_bitwise(short_builds):
    root, _ = short_builds
    first_dir, again = root / "s0", root / "s0_again"
    first, second = checkpoint_tensors(first_dir), checkpoint_tensors(again)
    assert set(first) == set(second)
    assert sum(k.startswith("optimizer.pt:") for k in first) == 3 * len(optimizer_meta(again)["names"])
    differing = [k for k in first if not bitwise_equal(first[k], second[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    reward_a = load_file(str(first_dir / "reward_model" / "model.safetensors"))
    reward_b = load_file(str(again / "reward_model" / "model.safetensors"))
    assert reward_a.keys() == reward_b.keys() and all(bitwise_equal(reward_a[k], reward_b[k]) for k in reward_a)
    assert optimizer_meta(first_dir) == optimizer_meta(again)
    for name in ("training_args.json", "adapter_config.json"):
        assert json.loads((first_dir / name).read_text()) == json.loads((again / name).read_text()), name
    assert without_timings(json.loads((first_dir / "trainer_state.json").read_text())) == \
        without_timings(json.loads((again / "trainer_state.json").read_text()))


@pytest.mark.slow
def test_different_seed_gives_different_tensors(short_builds):
    root, states = short_builds
    for name in ("s0", "s1"):
        # Precondition: some GRPO step had mixed rewards, so the AdamW moments are not all zero.
        assert any(h["grad_norm"] > 0 for h in states[name]["grpo_history"]), states[name]["grpo_history"]
    a, b = checkpoint_tensors(root / "s0"), checkpoint_tensors(root / "s1")
    assert set(a) == set(b)
    for rel in (*TENSOR_FILES, "optimizer.pt"):
        keys = [k for k in a if k.startswith(rel + ":") and not k.endswith(":step")]
        assert keys and all(not bitwise_equal(a[k], b[k]) for k in keys), f"{rel}: a tensor is seed-independent"
    assert json.loads((root / "s1" / "training_args.json").read_text())["seed"] == 1


# ----------------------------------------------------------------------------------------------- build CLI


def test_build_cli_refuses_non_empty_out(tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "probe_dist.toy", "build", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "not empty" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine\n"
