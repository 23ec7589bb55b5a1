"""Loading base + adapter + AdamW state: round trips by parameter name, and every refusal (by name, hyperparameters from the saved groups, state cloned).

The valid checkpoint is the real toy checkpoint (session fixture); broken ones are copies of its optimizer.pt
re-saved with one thing changed, so each test isolates exactly one problem.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_dist.config import ConfigError, load_config
from probe_dist.errors import CheckpointError
from probe_dist.state.model import check_trainable_count, load_model, trainable_parameters
from probe_dist.state.optimizer import load_optimizer, optimizer_param_names, save_optimizer
from probe_dist.state.paths import resolve_paths
from tests.probe_harness import make_probe

REPO = Path(__file__).resolve().parents[1]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")


# ----------------------------------------------------------------------------------------------- helpers


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, -0.0 ≠ +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def loaded(toy_checkpoint):
    """(trainable [(name, param)], saved optimizer blob) of the toy checkpoint, loaded once for this module."""
    cfg = load_config(None, [f"checkpoint.path={toy_checkpoint}", "device=cpu"])
    paths = resolve_paths(cfg.checkpoint)
    model = load_model(paths, torch.float32, torch.device("cpu"))
    trainable = trainable_parameters(model)
    blob = torch.load(str(toy_checkpoint / "optimizer.pt"), map_location="cpu", weights_only=False)
    return trainable, blob


def fresh_blob(blob: dict) -> dict:
    """A deep copy of the saved optimizer file contents, safe to edit."""
    return copy.deepcopy(blob)


def saved_state_by_name(blob: dict) -> dict[str, dict]:
    ids = [i for g in blob["state_dict"]["param_groups"] for i in g["params"]]
    return {name: blob["state_dict"]["state"][pid] for pid, name in zip(ids, blob["param_names"])}


def refusal(tmp_path: Path, blob, trainable) -> str:
    path = tmp_path / "optimizer.pt"
    torch.save(blob, str(path))
    with pytest.raises(CheckpointError) as info:
        load_optimizer(path, trainable)
    return str(info.value)


def copy_checkpoint(toy: Path, dest: Path) -> Path:
    shutil.copytree(toy, dest)
    return dest


def fake_step(optimizer: torch.optim.Optimizer, params) -> None:
    """One step with fixed pseudo-gradients so every state buffer exists; parameters are restored after."""
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    optimizer.step()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None


# ----------------------------------------------------------------------------------------------- round trips


def test_optimizer_state_round_trips_bitwise(toy_checkpoint, loaded):
    trainable, blob = loaded
    optimizer, coverage = load_optimizer(toy_checkpoint / "optimizer.pt", trainable)
    by_name = dict(trainable)
    saved = saved_state_by_name(blob)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert set(saved) == set(by_name), "optimizer.pt covers exactly the trainable parameters"
    assert coverage == {"params": len(trainable), "with_state": len(trainable),
                        "numel": sum(p.numel() for _, p in trainable), "state_dtypes": ["float32"],
                        "naming": "saved names"}
    # The new optimizer holds exactly the trainable parameters, in the saved order.
    assert optimizer_param_names(optimizer, trainable) == blob["param_names"]
    for name, state in saved.items():
        live = optimizer.state[by_name[name]]
        assert set(live) == set(STATE_KEYS), name
        for key in STATE_KEYS:
            assert bitwise_equal(live[key], state[key]), f"{name}: {key} differs after load"
    assert float(next(iter(saved.values()))["step"]) == 4.0  # the toy took 4 real GRPO steps
    # Hyperparameters come from the saved param_groups, not defaults.
    (saved_group,) = blob["state_dict"]["param_groups"]
    (group,) = optimizer.param_groups
    for key in HYPER_KEYS:
        assert group[key] == saved_group[key], key
    assert tuple(group["betas"]) == (0.9, 0.99) and group["eps"] == 1e-8 and group["weight_decay"] == 0.01


def permuted_blob(blob: dict, seed: int, prefix: str = "") -> tuple[dict, dict[str, float]]:
    """Re-save the optimizer with a shuffled parameter order, arbitrary ids and two param groups.

    Returns the new blob and each parameter's expected weight decay (the second group gets its own value).
    """
    names = list(blob["param_names"])
    state = saved_state_by_name(blob)
    (group,) = blob["state_dict"]["param_groups"]
    hyper = {k: v for k, v in group.items() if k != "params"}
    order = list(range(len(names)))
    random.Random(seed).shuffle(order)
    assert order != sorted(order)
    shuffled = [names[k] for k in order]
    half = len(shuffled) // 2
    ids = random.Random(seed + 1).sample(range(100, 1000), len(shuffled))  # ids need not be 0..n-1
    groups = [{**hyper, "params": ids[:half]}, {**hyper, "weight_decay": 0.5, "params": ids[half:]}]
    new_state = {pid: copy.deepcopy(state[name]) for pid, name in zip(ids, shuffled)}
    decay = {name: (hyper["weight_decay"] if k < half else 0.5) for k, name in enumerate(shuffled)}
    new_blob = {"optimizer_class": "AdamW", "param_names": [prefix + n for n in shuffled],
                "state_dict": {"state": new_state, "param_groups": groups}}
    return new_blob, decay


@pytest.mark.parametrize("prefix", ["", "module._orig_mod."], ids=["plain", "ddp_compile_prefix"])
def test_shuffled_saved_order_maps_by_name(tmp_path, loaded, prefix):
    trainable, blob = loaded
    new_blob, decay = permuted_blob(blob, seed=7, prefix=prefix)
    path = tmp_path / "optimizer.pt"
    torch.save(new_blob, str(path))
    optimizer, coverage = load_optimizer(path, trainable)
    assert coverage["with_state"] == len(trainable)
    by_name = dict(trainable)
    original = saved_state_by_name(blob)
    # The optimizer follows the saved (shuffled) order, and each state sits on the parameter of its name.
    assert optimizer_param_names(optimizer, trainable) == [n[len(prefix):] for n in new_blob["param_names"]]
    for name, param in by_name.items():
        live = optimizer.state[param]
        for key in STATE_KEYS:
            assert bitwise_equal(live[key], original[name][key]), f"{name}: {key} mapped to the wrong parameter"
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        assert group["weight_decay"] == decay[name], f"{name} landed in the wrong param group"
    # Sanity: the states really are distinguishable, so a positional remap would have failed above.
    first, second = (original[n]["exp_avg_sq"] for n in list(original)[:2])
    assert first.shape != second.shape or not torch.equal(first, second)


# ----------------------------------------------------------------------------------------------- refusals


def test_missing_optimizer_file_refused(tmp_path, toy_checkpoint):
    ckpt = copy_checkpoint(toy_checkpoint, tmp_path / "ckpt")
    (ckpt / "optimizer.pt").unlink()
    cfg = load_config(None, [f"checkpoint.path={ckpt}", "device=cpu"])
    with pytest.raises(CheckpointError, match=r"optimizer .*optimizer\.pt.* does not exist"):
        resolve_paths(cfg.checkpoint)


def test_missing_state_of_one_parameter_refused(tmp_path, loaded):
    trainable, blob = loaded
    bad = fresh_blob(blob)
    victim_id = bad["state_dict"]["param_groups"][0]["params"][3]
    victim = bad["param_names"][3]
    del bad["state_dict"]["state"][victim_id]
    msg = refusal(tmp_path, bad, trainable)
    assert victim in msg and "missing" in msg and "exp_avg_sq" in msg


def test_missing_second_moment_refused(tmp_path, loaded):
    trainable, blob = loaded
    bad = fresh_blob(blob)
    victim_id = bad["state_dict"]["param_groups"][0]["params"][0]
    del bad["state_dict"]["state"][victim_id]["exp_avg_sq"]
    msg = refusal(tmp_path, bad, trainable)
    assert bad["param_names"][0] in msg and "missing ['exp_avg_sq']" in msg


def test_wrong_state_shape_refused(tmp_path, loaded):
    trainable, blob = loaded
    bad = fresh_blob(blob)
    victim_id = bad["state_dict"]["param_groups"][0]["params"][1]  # a lora_B: [out, r], not square
    state = bad["state_dict"]["state"][victim_id]
    assert state["exp_avg"].shape[0] != state["exp_avg"].shape[1]
    state["exp_avg"] = state["exp_avg"].t().contiguous()
    msg = refusal(tmp_path, bad, trainable)
    assert bad["param_names"][1] in msg and "exp_avg shape" in msg


def test_unknown_parameter_name_refused(tmp_path, loaded):
    trainable, blob = loaded
    bad = fresh_blob(blob)
    renamed = bad["param_names"][2]
    bad["param_names"][2] = "base_model.model.model.layers.0.self_attn.bogus_proj.lora_A.default.weight"
    msg = refusal(tmp_path, bad, trainable)
    assert "bogus_proj" in msg and "unknown" in msg
    assert renamed in msg and "1 trainable without state" in msg


def test_trainable_parameter_without_state_refused(tmp_path, loaded):
    trainable, blob = loaded
    bad = fresh_blob(blob)
    dropped = bad["param_names"].pop()
    dropped_id = bad["state_dict"]["param_groups"][0]["params"].pop()
    del bad["state_dict"]["state"][dropped_id]
    msg = refusal(tmp_path, bad, trainable)
    assert dropped in msg and "1 trainable without state" in msg and "0 saved for unknown" in msg


def test_sgd_state_refused(tmp_path, loaded):
    trainable, _ = loaded
    params = [p for _, p in trainable]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    fake_step(sgd, params)
    path = tmp_path / "optimizer.pt"
    save_optimizer(sgd, trainable, path)
    with pytest.raises(CheckpointError, match=r"'SGD', not torch AdamW"):
        load_optimizer(path, trainable)
    # The same state mislabelled as AdamW is still refused (no betas/eps in its param groups).
    blob = torch.load(str(path), weights_only=False)
    blob["optimizer_class"] = "AdamW"
    assert "not torch AdamW" in refusal(tmp_path, blob, trainable)


@pytest.mark.parametrize("label", ["Adam", "AdamW"], ids=["saved_as_adam", "mislabelled_adamw"])
def test_adam_with_l2_refused(tmp_path, loaded, label):
    trainable, _ = loaded
    params = [p for _, p in trainable]
    adam = torch.optim.Adam(params, lr=1e-3, weight_decay=0.01)  # L2 weight decay: not AdamW's decoupled decay
    fake_step(adam, params)
    blob = {"optimizer_class": label, "param_names": [n for n, _ in trainable], "state_dict": adam.state_dict()}
    msg = refusal(tmp_path, blob, trainable)
    assert ("'Adam', not torch AdamW" in msg) if label == "Adam" else ("L2 weight decay" in msg)


def test_plain_state_dict_and_garbage_refused(tmp_path, loaded):
    trainable, blob = loaded
    # A bare optimizer.state_dict() has no names: they are rebuilt from the model (build_probe), not guessed here.
    msg = refusal(tmp_path, blob["state_dict"], trainable)
    assert "no parameter names" in msg and "state.optimizer.name_optimizer_blob" in msg
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not read optimizer state"):
        load_optimizer(path, trainable)


def test_trainable_parameter_budget(loaded):
    trainable, _ = loaded
    count = sum(p.numel() for _, p in trainable)
    assert check_trainable_count(trainable, count, False) == count
    with pytest.raises(CheckpointError, match=r"memory\.max_trainable_params.*memory\.allow_full_finetune=true"):
        check_trainable_count(trainable, count - 1, False)
    assert check_trainable_count(trainable, count - 1, True) == count
    with pytest.raises(CheckpointError, match="no trainable parameters"):
        check_trainable_count([], 10, True)


def test_trainable_budget_enforced_by_build_probe(toy_checkpoint):
    with pytest.raises(CheckpointError, match=r"exceed memory\.max_trainable_params=1,000"):
        make_probe(toy_checkpoint, ["memory.max_trainable_params=1000"])
    probe = make_probe(toy_checkpoint, ["memory.max_trainable_params=1000", "memory.allow_full_finetune=true"])
    assert probe.load_info["provenance/trainable_params"] > 1000


@pytest.mark.parametrize("override, key", [("sampling.top_p=0.9", "top_p"), ("sampling.top_k=50", "top_k")])
def test_truncated_sampling_refused(override, key):
    with pytest.raises(ConfigError, match=rf"sampling\.{key}=.* is not supported: truncated sampling support"):
        load_config(None, [override])


# ----------------------------------------------------------------------------------------------- through the CLI


def break_checkpoint(ckpt: Path, how: str, trainable) -> str:
    """Damage a copied checkpoint; returns a fragment the error message must contain."""
    if how == "no_optimizer":
        (ckpt / "optimizer.pt").unlink()
        return "does not exist"
    params = [p for _, p in trainable]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    fake_step(sgd, params)
    save_optimizer(sgd, trainable, ckpt / "optimizer.pt")
    return "not torch AdamW"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["no_optimizer", "sgd_optimizer"])
def test_cli_refuses_bad_checkpoint_without_summary(tmp_path, toy_checkpoint, loaded, how):
    trainable, _ = loaded
    ckpt = copy_checkpoint(toy_checkpoint, tmp_path / "ckpt")
    fragment = break_checkpoint(ckpt, how, trainable)
    out_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "probe_dist.main", "--config", str(REPO / "configs" / "toy_cpu.yaml"),
         f"checkpoint.path={ckpt}", f"output.dir={out_dir}", "sampling.B_E=2", "sampling.B_U=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and fragment in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out_dir / "summary.json").exists()
    assert not list(out_dir.glob("sequences.*")) and not (out_dir / "config.yaml").exists()


# ----------------------------------------------------------------------------------------------- loaded, but looks edited


def _notes(ckpt: Path) -> list[str]:
    notes: list[str] = []
    load_model(resolve_paths(load_config(None, [f"checkpoint.path={ckpt}"]).checkpoint), torch.float32,
               torch.device("cpu"), notes)
    return notes


@pytest.mark.parametrize("alpha,scaling", [(0, "0"), (1e-30, "1.25e-31"), (-16, "-2"), (1e4, "1.25e+03")])
def test_unusual_lora_scaling_is_a_warning(toy_checkpoint, tmp_path, alpha, scaling):
    """lora_alpha / r outside [0.001, 100] loads (an adapter could have been trained so) but is named: the toy's own
    scaling (16 / 8 = 2) is not."""
    import json

    assert _notes(toy_checkpoint) == []
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["lora_alpha"] / config["r"] == 2
    (ckpt / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": alpha}))
    notes = _notes(ckpt)
    assert len(notes) == 1 and f"lora_alpha / r = {scaling} " in notes[0], notes


def test_a_head_the_config_ties_but_the_files_untie_is_a_warning(toy_checkpoint, tmp_path):
    """An lm_head.weight that differs from the embeddings next to tie_word_embeddings: true: transformers 5 loads
    the two untied (and only logs it); the summary must say the files and config.json disagree."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    weights = load_file(str(ckpt / "base" / "model.safetensors"))
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
    save_file(weights, str(ckpt / "base" / "model.safetensors"), metadata={"format": "pt"})
    notes = _notes(ckpt)
    assert len(notes) == 1 and "lm_head.weight" in notes[0] and "tie_word_embeddings" in notes[0], notes


def test_tensors_the_config_does_not_use_are_a_warning(toy_checkpoint, tmp_path):
    """A tensor for a layer the config does not describe (a config.json edited to fewer layers, or files from a
    deeper model): transformers ignores it and reports it as unexpected; the summary must name it."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    weights = load_file(str(ckpt / "base" / "model.safetensors"))
    stray = "model.layers.99.mlp.down_proj.weight"
    assert stray not in weights
    weights[stray] = torch.zeros(2, 2)
    save_file(weights, str(ckpt / "base" / "model.safetensors"), metadata={"format": "pt"})
    notes = _notes(ckpt)
    assert len(notes) == 1 and repr(stray) in notes[0] and "does not use" in notes[0], notes


def test_an_overflow_only_longer_inputs_reach_is_refused_while_sampling(toy_checkpoint, tmp_path, capsys,
                                                                        monkeypatch):
    """A scaling that overflows on the prompts but not on check_finite_forward's two tokens (lora_alpha 1e20 did so
    on one toy): sampling meets NaN/inf logits and the CLI exits 2 naming the scaling, not 1 with a traceback. The
    two-token check is switched off to build that case on any toy (1e308 overflows everywhere)."""
    import json

    import probe_dist.state.model as model_module
    from tests.test_bad_inputs import run_in_process

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    adapter_config = ckpt / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "lora_alpha": 1e308}))
    monkeypatch.setattr(model_module, "check_finite_forward", lambda model, paths: None)
    out = tmp_path / "out"
    code, stderr = run_in_process([f"checkpoint.path={ckpt}", f"output.dir={out}", "device=cpu", "sampling.B_E=2",
                                   "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2"], capsys)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and not out.exists()
    for part in ("became NaN/inf at step 0 of sampling batch E", "weights are finite", "lora_alpha / r = 1.25e+307"):
        assert part in stderr, (part, stderr[-2000:])
