"""Snapshot / restore of the training state (docs/method.md §7: moments cloned, snapshot on CPU) and eval-mode probe passes (LoRA dropout off).

Everything runs on the real toy checkpoint: a peft LoRA model (with lora_dropout 0.05) and its saved AdamW state.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from probe_dist.config import load_config
from probe_dist.runtime.snapshot import restore_snapshot, state_hash, take_snapshot
from probe_dist.scoring.score import score_batch
from probe_dist.state.model import load_model, trainable_parameters
from probe_dist.state.optimizer import load_optimizer
from probe_dist.state.paths import resolve_paths
from tests.probe_harness import make_probe

SMALL = ["sampling.B_E=2", "sampling.G_E=4", "sampling.B_U=2", "sampling.G_U=4", "estimators.etas=[0,1e-3]"]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture
def state(toy_checkpoint):
    """A freshly loaded (model, trainable, optimizer) of the toy checkpoint: each test may mutate it freely."""
    cfg = load_config(None, [f"checkpoint.path={toy_checkpoint}", "device=cpu"])
    model = load_model(resolve_paths(cfg.checkpoint), torch.float32, torch.device("cpu"))
    trainable = trainable_parameters(model)
    optimizer, _ = load_optimizer(toy_checkpoint / "optimizer.pt", trainable)
    return model, trainable, optimizer


def give_some_grads(trainable) -> None:
    """Grads on even-indexed parameters, None on the others (both cases must survive restore)."""
    gen = torch.Generator().manual_seed(1)
    for i, (_, p) in enumerate(trainable):
        p.grad = torch.randn(p.shape, generator=gen) if i % 2 == 0 else None


def record(model, trainable, optimizer) -> dict:
    """Deep, independent copies of everything a restore must bring back."""
    return {
        "params": [p.detach().clone() for _, p in trainable],
        "grads": [None if p.grad is None else p.grad.clone() for _, p in trainable],
        "opt": [{k: v.clone() for k, v in optimizer.state[p].items()} for _, p in trainable],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
        "flags": {n: m.training for n, m in model.named_modules()},
    }


def mutate_everything(model, trainable, optimizer) -> None:
    with torch.no_grad():
        for i, (_, p) in enumerate(trainable):
            p.add_(0.125)
            if p.grad is None:
                p.grad = torch.full_like(p, 3.0)  # a grad where there was none
            elif i % 4 == 0:
                p.grad = None                     # no grad where there was one
            else:
                p.grad.mul_(-2.0)
            st = optimizer.state[p]
            st["exp_avg"].add_(1.0)
            st["exp_avg_sq"].mul_(3.0)
            st["step"].add_(1.0)
    for g in optimizer.param_groups:
        g["lr"] = 0.5
        g["betas"] = (0.5, 0.5)
        g["weight_decay"] = 0.25
    torch.rand(7)
    np.random.rand(7)
    random.random()
    model.train()


def assert_equal_to(rec: dict, model, trainable, optimizer) -> None:
    for (name, p), saved, saved_grad, saved_opt in zip(trainable, rec["params"], rec["grads"], rec["opt"]):
        assert bitwise_equal(p, saved), f"param {name}"
        if saved_grad is None:
            assert p.grad is None, f"grad of {name} should be None"
        else:
            assert p.grad is not None and bitwise_equal(p.grad, saved_grad), f"grad {name}"
        live = optimizer.state[p]
        assert set(live) == set(saved_opt), name
        for key, val in saved_opt.items():
            assert bitwise_equal(live[key], val), f"{name}: optimizer {key}"
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == rec["groups"]
    torch_rng, np_rng, py_rng = rec["rng"]
    assert torch.equal(torch.get_rng_state(), torch_rng)
    now = np.random.get_state()
    assert now[0] == np_rng[0] and np.array_equal(now[1], np_rng[1]) and now[2:] == np_rng[2:]
    assert random.getstate() == py_rng
    assert {n: m.training for n, m in model.named_modules()} == rec["flags"]


# ----------------------------------------------------------------------------------------------- snapshot / restore


def test_restore_brings_everything_back_bitwise(state):
    model, trainable, optimizer = state
    give_some_grads(trainable)
    model.eval()
    before = record(model, trainable, optimizer)
    digest_before = state_hash(trainable, optimizer)
    live_objects = [(p, optimizer.state[p]["exp_avg"], optimizer.state[p]["step"]) for _, p in trainable]

    snap = take_snapshot(model, trainable, optimizer)
    assert snap.digest == digest_before
    assert all(t.device.type == "cpu" for t in snap.params)  # snapshots live on CPU
    mutate_everything(model, trainable, optimizer)
    assert state_hash(trainable, optimizer) != snap.digest
    assert any(m.training for m in model.modules())

    assert restore_snapshot(snap, model, trainable, optimizer) is True
    assert_equal_to(before, model, trainable, optimizer)
    assert state_hash(trainable, optimizer) == digest_before
    # Restored in place: tensors held elsewhere (optimizer state, FSDP shards) are still the same objects.
    for (_, p), (p0, exp_avg0, step0) in zip(trainable, live_objects):
        assert p is p0 and optimizer.state[p]["exp_avg"] is exp_avg0 and optimizer.state[p]["step"] is step0


def test_restore_survives_a_real_optimizer_step(state):
    """A real AdamW step (the real_step route) overwrites state in place; restore must undo it."""
    model, trainable, optimizer = state
    before = record(model, trainable, optimizer)
    snap = take_snapshot(model, trainable, optimizer)
    gen = torch.Generator().manual_seed(2)
    for _, p in trainable:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.param_groups[0]["lr"] = 1e-2
    optimizer.step()
    assert float(optimizer.state[trainable[0][1]]["step"]) == 5.0
    # The snapshot is not aliased to the live state: the step did not leak into it.
    assert float(snap.opt_state[0]["step"]) == 4.0
    assert restore_snapshot(snap, model, trainable, optimizer) is True
    assert_equal_to(before, model, trainable, optimizer)


def test_restore_twice_from_one_snapshot(state):
    """The probe restores after every η of the sweep from the same snapshot."""
    model, trainable, optimizer = state
    before = record(model, trainable, optimizer)
    snap = take_snapshot(model, trainable, optimizer)
    for _ in range(2):
        mutate_everything(model, trainable, optimizer)
        assert restore_snapshot(snap, model, trainable, optimizer) is True
        assert_equal_to(before, model, trainable, optimizer)


@pytest.mark.parametrize("what", ["param", "exp_avg", "exp_avg_sq", "step", "lr", "eps"])
def test_hash_sees_every_tracked_component(state, what):
    _, trainable, optimizer = state
    digest = state_hash(trainable, optimizer)
    p = trainable[-1][1]
    with torch.no_grad():
        if what == "param":
            p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))  # one ulp
        elif what in ("exp_avg", "exp_avg_sq", "step"):
            t = optimizer.state[p][what]
            t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf")))
        else:
            optimizer.param_groups[0][what] *= 1.5
    assert state_hash(trainable, optimizer) != digest


def test_mutation_after_restore_is_detected(state):
    model, trainable, optimizer = state
    snap = take_snapshot(model, trainable, optimizer)
    assert restore_snapshot(snap, model, trainable, optimizer) is True
    with torch.no_grad():
        trainable[0][1].view(-1)[0] += 1e-3
    assert state_hash(trainable, optimizer) != snap.digest


def test_restore_reports_state_it_could_not_bring_back(state):
    """Mutations restore does not undo (a state tensor replaced by another dtype; a new param-group key) make
    restore_snapshot return False instead of silently claiming success."""
    model, trainable, optimizer = state
    snap = take_snapshot(model, trainable, optimizer)
    p = trainable[0][1]
    optimizer.state[p]["exp_avg"] = optimizer.state[p]["exp_avg"].double()
    assert restore_snapshot(snap, model, trainable, optimizer) is False
    optimizer.state[p]["exp_avg"] = optimizer.state[p]["exp_avg"].float()
    assert restore_snapshot(snap, model, trainable, optimizer) is True
    optimizer.param_groups[0]["initial_lr"] = 0.1  # e.g. what an LR scheduler adds
    assert restore_snapshot(snap, model, trainable, optimizer) is False


# ----------------------------------------------------------------------------------------------- eval mode (LoRA dropout off)


def lora_dropouts(model) -> list[torch.nn.Dropout]:
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]


@pytest.fixture
def probe(toy_checkpoint):
    return make_probe(toy_checkpoint, SMALL)


def test_scoring_is_deterministic_in_eval_mode(probe):
    drops = lora_dropouts(probe.model)
    # tol: exact the adapter config's lora_dropout 0.05 is read back as the same float64 (JSON round trip)
    assert drops and all(d.p == 0.05 for d in drops)
    batch = probe.sample("E", 2, 4)
    # Control: in train mode LoRA dropout is live and two scoring passes differ, so the check below has teeth.
    probe.model.train()
    a, b = score_batch(probe.rt, probe.runner, batch), score_batch(probe.rt, probe.runner, batch)
    assert any(not torch.equal(x.S, y.S) for x, y in zip(a, b))
    # probe.run() puts the model in eval mode for every pass: the same S(θ) twice, bitwise.
    first = probe.run().summary()
    second = probe.run().summary()
    for key in ("entropy/base", "entropy/base_se", "entropy/base_naive", "delta_h1/per_eta"):
        assert first[key] == second[key], key
    for s1, s2 in zip(first["sweep"], second["sweep"]):
        assert s1["delta_h_true"] == s2["delta_h_true"] and s1["kl"] == s2["kl"]
    assert first["sweep"][0]["delta_h_true"] == 0.0
    probe.model.eval()
    c, d = score_batch(probe.rt, probe.runner, batch), score_batch(probe.rt, probe.runner, batch)
    assert all(torch.equal(x.S, y.S) and torch.equal(x.h_rb, y.h_rb) for x, y in zip(c, d))


def test_run_leaves_eval_flags_unchanged(probe):
    flags = {n: m.training for n, m in probe.model.named_modules()}
    assert not any(flags.values())  # load_model returns the model in eval mode
    summary = probe.run().summary()
    assert summary["restore/verified"] is True
    assert {n: m.training for n, m in probe.model.named_modules()} == flags


def test_run_restores_train_flags_of_a_model_in_train_mode(probe):
    probe.model.train()
    flags = {n: m.training for n, m in probe.model.named_modules()}
    assert all(flags.values())
    probe.run()
    assert {n: m.training for n, m in probe.model.named_modules()} == flags
