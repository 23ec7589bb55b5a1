"""The probe of a real training step, in two halves around the trainer's own `optimizer.step()` (docs/method.md §12).

    prediction = predict_step(probe, grad, eta)   # at θ_t: sample E, Ĥ(θ_t), u from the real gradient, δH₁ = η∇Ĥ·u
    ... the trainer steps ...
    numbers = measure_step(probe, prediction)     # at θ_{t+1}: ΔH_true on the same E by SNIS; Δθ against ηu

The probe's own `run()` builds its update from a batch U it samples; here the update is the trainer's: `grad` is
the accumulated, clipped gradient in `.grad` when the trainer is about to step, and u is the AdamW step the
state built from the trainer's optimizer gives for it (`state.TrainingState.from_objects`: the state before the
step, the bias correction at the next step count, each group's lr ratio). Neither half changes the training
state: parameters, gradients, RNG states and train/eval flags are snapshotted and restored (verified by hash), and
δH₁ is taken by forward mode only (no backward pass, so nothing reaches `.grad` or a DDP reducer).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from probe_dist import phases
from probe_dist.measurement.sweep import snis_point, sweep_point
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.probe import Probe
from probe_dist.results import BaseEntropy, DeltaH1, SequenceScores
from probe_dist.rollout.batch import RolloutBatch
from probe_dist.runtime.snapshot import restore_snapshot, take_snapshot
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.update.step import update_parts


@dataclass
class StepPrediction:
    """What `predict_step` leaves for `measure_step`: E, its scores at θ_t, Ĥ(θ_t), δH₁ and the predicted step."""

    eta: float                          # the first param group's lr of this step (u is per unit of it)
    batch_e: RolloutBatch
    scores_e: list[SequenceScores]
    base: BaseEntropy
    delta_h1: DeltaH1
    u: list[torch.Tensor]               # float64 CPU, param-shaped, optimizer order
    theta: list[torch.Tensor]           # θ_t, CPU copies in the parameters' dtype
    sampler_scorer_gap: float | None
    seconds: float


def predict_step(probe: Probe, grad: list[torch.Tensor], eta: float, *, check_sampler: bool = False) -> StepPrediction:
    """The first half, before `optimizer.step()`: E sampled at θ_t with the probe's seeded sampler, Ĥ(θ_t), the
    AdamW update u of the real gradient `grad` (param-shaped tensors in the probe's optimizer order, any dtype),
    and δH₁ = η·∇Ĥ·u by forward mode. eta: the first param group's lr for this step.

    With check_sampler, the start-up check that the scorer reproduces the sampler runs too (the first probed
    step). Raises ForwardModeUnavailable when the model has no forward-mode rules (there is no reverse-mode
    fallback here: a backward pass would reach the trainer's gradients), RuntimeError when the training state
    did not restore bit for bit."""
    start = time.perf_counter()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    snapshot = take_snapshot(probe.model, probe.trainable, None)  # params, .grad, RNG states, train/eval flags
    probe.model.eval()
    try:
        with probe.clock.phase(phases.SAMPLE):
            batch_e = probe.sample("E", cfg.sampling.B_E, cfg.sampling.G_E)
            gap = probe.check_sampler_scorer(batch_e) if check_sampler else None
        with probe.clock.phase(phases.SCORE_BASE):
            scores_e = score_batch(rt, runner, batch_e)
            base = base_entropy(rt, batch_e, scores_e, payload=cfg.estimators.payload,
                                normalize=cfg.estimators.normalize)
        parts = update_parts(probe.optimizer, probe.trainable, [g.detach().to("cpu", torch.float64) for g in grad])
        u = [part.u for part in parts]
        with probe.clock.phase(phases.DELTA_H1):
            delta_h1 = predict_delta_h1(rt, runner, batch_e, scores_e, base=base, u=u, est=cfg.estimators,
                                        reverse_fallback=False)
    finally:
        verified = restore_snapshot(snapshot, probe.model, probe.trainable, None)
    if not all(rt.all_gather_objects(verified)):
        raise RuntimeError("the online probe changed the training state before the step (restore hash mismatch)")
    return StepPrediction(eta=eta, batch_e=batch_e, scores_e=scores_e, base=base, delta_h1=delta_h1, u=u,
                          theta=[p.detach().to("cpu", copy=True) for p in snapshot.params], sampler_scorer_gap=gap,
                          seconds=time.perf_counter() - start)


def measure_step(probe: Probe, prediction: StepPrediction) -> dict:
    """The second half, after `optimizer.step()`: ΔH_true = Ĥ(θ_{t+1}) − Ĥ(θ_t) on the same E samples by SNIS
    (ESS, k̂, SEs), and how far the trainer's real step θ_{t+1} − θ_t is from the predicted η·u.

    Returns the `entropy_probe/` numbers (docs/outputs.md): delta_h1, delta_h_true and their SEs, ratio
    (ΔH_true/δH₁), entropy, ess_frac, khat, kl, update_match (‖Δθ − ηu‖/‖ηu‖) with update_match_rounding (what the
    parameters' own dtype rounding allows of it), seconds (the slowest rank's, both halves); the same numbers on
    every rank. Raises RuntimeError when the state did not restore."""
    start = time.perf_counter()
    cfg, rt, runner, p = probe.cfg, probe.rt, probe.runner, prediction
    snapshot = take_snapshot(probe.model, probe.trainable, None)
    probe.model.eval()
    try:
        with probe.clock.phase(phases.SWEEP):
            scores_new = score_batch(rt, runner, p.batch_e)
            fields, _ = snis_point(rt, p.batch_e, p.scores_e, scores_new, base=p.base, est=cfg.estimators)
        point = sweep_point(p.eta, fields, p.delta_h1, se_kind=cfg.estimators.se)
    finally:
        verified = restore_snapshot(snapshot, probe.model, probe.trainable, None)
    if not all(rt.all_gather_objects(verified)):
        raise RuntimeError("the online probe changed the training state after the step (restore hash mismatch)")
    moved = [t1.double() - t0.double() for t1, t0 in zip(snapshot.params, p.theta)]
    predicted = [p.eta * u for u in p.u]
    diff = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(moved, predicted)))
    size = math.sqrt(sum(float(b.pow(2).sum()) for b in predicted))
    # θ_{t+1} is stored in the parameters' dtype: each coordinate rounded at |θ| + |Δθ| (half an ulp)
    ulp = sum(float(((t0.double().abs() + b.abs()) * torch.finfo(t0.dtype).eps / 2).pow(2).sum())
              for t0, b in zip(p.theta, predicted))
    ratio = point.delta_h_true / point.delta_h1 if point.delta_h1 != 0 else math.nan
    khat = float(rt.broadcast_object(point.khat))  # fitted on rank 0's gathered weights: every rank logs it
    seconds = float(rt.max_f64(torch.tensor([p.seconds + time.perf_counter() - start]))[0])  # the slowest rank's
    return {"entropy": p.base.entropy, "delta_h1": point.delta_h1, "delta_h1_se": point.delta_h1_se,
            "delta_h_true": point.delta_h_true, "delta_h_true_se": point.delta_h_true_se, "ratio": ratio,
            "eta": p.eta, "ess_frac": point.ess_frac, "khat": khat, "kl": point.kl,
            # a predicted step of exactly 0 (a zero gradient, no weight decay) matches only a real step of 0
            "update_match": diff / size if size > 0 else (0.0 if diff == 0 else math.inf),
            "update_match_rounding": math.sqrt(ulp) / size if size > 0 else 0.0, "seconds": seconds}
