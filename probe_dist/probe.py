"""The probe, top to bottom: sample → score → update → predict (δH₁) → measure (ΔH_true) → restore → report.

Each step lives in the module its folder names and receives only the config section it needs; this file keeps
the order, the phase clock, the stop points and the snapshot. Every forward runs on rows of one block of prompt
groups, or of one group in the gradient passes (layout fixed by the block or group alone), and every global
quantity is a float64 sum all-reduced by the runtime, so results do not depend on the world size or the partition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from probe_dist import phases
from probe_dist.config_schema import ProbeConfig
from probe_dist.explain.decompose import explain_e, explain_u
from probe_dist.explain.directional import ForwardModeUnavailable
from probe_dist.measurement.sweep import scores_at_eta, snis_point, sweep_point
from probe_dist.model.runner import PolicyRunner
from probe_dist.prediction.delta_h1 import entropy_gradient, predict_delta_h1
from probe_dist.prediction.ustat import SingleBatchUStatistic
from probe_dist.results import ProbeResult, UpdateGradient, warn_if_few_groups
from probe_dist.rollout.generate import InvalidDistributionError
from probe_dist.rollout.sample import prompt_batch, sample_batch
from probe_dist.rollout.vllm_engine import VLLMError
from probe_dist.runtime import signals
from probe_dist.runtime.clock import PhaseClock
from probe_dist.runtime.signals import StopRequested
from probe_dist.runtime.snapshot import restore_snapshot, take_snapshot
from probe_dist.scoring.behaviour import apply_sampler_weights
from probe_dist.scoring.consistency import check_sampler_scorer
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.state.model import overflow_error
from probe_dist.update.grade import GRADE_FAMILIES, GradeObjective, GradeSpec
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import real_step, set_theta, update_parts

log = logging.getLogger("probe_dist")


class Probe:
    """One probe of one optimizer step, on a resolved config and a runner (`assemble.build_probe` /
    `assemble.probe_from_state` make it). `run()` samples E and U, scores, computes the update, predicts δH₁,
    explains it, measures ΔH_true over the sweep and restores the training state; `load_info` holds the summary
    keys of where the state came from."""

    def __init__(self, cfg: ProbeConfig, rt, runner: PolicyRunner, *, tokenizer,
                 optimizer: torch.optim.Optimizer, eos_ids: list[int], open_sampler=None):
        self.cfg, self.rt, self.runner = cfg, rt, runner
        # An external rollout engine (rollout.backend=vllm): `open_sampler()` opens one for the sample phase (closed
        # after it, freeing its memory); `sampler` is the open one (None: the policy's own decoder)
        self.sampler, self.open_sampler = None, open_sampler
        self.model, self.trainable, self.policy = runner.model, runner.trainable, runner.strategy.policy
        self.tokenizer, self.optimizer, self.eos_ids = tokenizer, optimizer, eos_ids
        self.clock = PhaseClock(rank=rt.rank, fault=cfg.debug.fault, signal=cfg.debug.signal,
                                profile=cfg.memory.profile, device=rt.device)
        self.grade = None  # GRADE's objective (update.loss grade/grade_st): U is prompts, the rollouts relaxed
        if cfg.update.loss in GRADE_FAMILIES:
            self.grade = GradeObjective(spec=GradeSpec.from_config(cfg.update, temperature=cfg.sampling.temperature,
                                                                   max_new_tokens=cfg.sampling.max_new_tokens),
                                        reward_model=runner.reward_model, seed=cfg.sampling.seed)

    def check_stop(self) -> None:
        """A safe point: raises StopRequested on every rank when any rank has received a stop signal."""
        if self.rt.any_flag(signals.requested()):
            raise StopRequested()

    def sample(self, name: str, num_prompts: int, group_size: int):
        """Batch `name` ("E" or "U"): num_prompts groups of group_size responses sampled at θ (GRADE's U: the
        prompts only, its rollouts are relaxed in the gradient pass). Returns a `rollout.batch.RolloutBatch`."""
        if name == "U" and self.grade is not None:  # GRADE generates U's relaxed rollouts in the gradient pass
            return prompt_batch(self.rt, self.tokenizer, name, sampling=self.cfg.sampling, num_prompts=num_prompts,
                                group_size=group_size)
        try:
            return sample_batch(self.rt, self.runner.decoder, self.tokenizer, name, sampling=self.cfg.sampling,
                                num_prompts=num_prompts, group_size=group_size, loss_family=self.cfg.update.loss,
                                adv_eps=self.cfg.update.adv_eps, scale_rewards=self.cfg.update.scale_rewards,
                                rows_per_chunk=self.cfg.memory.microbatch_generate,
                                lockstep=self.runner.strategy.name == "fsdp2", eos_ids=self.eos_ids,
                                after_group=self.check_stop, sampler=self.sampler)
        except InvalidDistributionError as exc:  # temperature > 0 is validated: NaN/inf logits of finite weights
            raise overflow_error(self.model, f"the policy's logits became NaN/inf at step {exc.step} of sampling "
                                 f"batch {name}") from exc

    @contextlib.contextmanager
    def rollout_engine(self):
        """The external engine, opened for the sample phase and closed after it when `open_sampler` is set. Every
        rank opens its own; when one fails to, every rank raises (the failing one its own error), none hangs."""
        if self.open_sampler is None or self.sampler is not None:
            yield
            return
        error = None
        try:
            self.sampler = self.open_sampler()
        except Exception as exc:  # raised below, after every rank knows
            error = exc
        if self.rt.any_flag(error is not None):
            if self.sampler is not None:
                self.sampler.close()
                self.sampler = None
            if error is not None:
                raise error
            raise VLLMError("the rollout engine failed to start on another rank (its log says why)")
        try:
            yield
        finally:
            self.sampler.close()
            self.sampler = None

    def check_sampler_scorer(self, batch) -> float:
        """Refuse the run unless the scorer reproduces the sampler's log-probs (scoring/consistency.py)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        return check_sampler_scorer(self.rt, self.runner, batch.groups[0], pad_id=pad,
                                    lockstep_steps=self.cfg.sampling.max_new_tokens, dtype_name=self.cfg.precision.dtype,
                                    matmul_precision=self.cfg.precision.matmul)

    def explain(self, res: ProbeResult) -> None:
        """Why entropy moves: per-sequence decompositions of δH₁ on E and U, the curvature δH₂, the Cui proxy."""
        try:
            # Published together once both sides are done: a stop inside the phase leaves no half explanation
            # (explain_e can finish at once, from δH₁'s nested pass, before the passes that can be interrupted).
            e_side = explain_e(self.rt, self.runner, res.batch_e, res.scores_e, base=res.base,
                               u=res.update.u, delta_h1=res.delta_h1, est=self.cfg.estimators)
            u_side = None
            if self.grade is None:  # U's per-sequence decomposition needs sampled sequences and their ℓ
                if res.delta_h1.grad_entropy is None:  # δH₁ ran in forward mode: ∇Ĥ by one backward pass
                    res.delta_h1 = dataclasses.replace(res.delta_h1, grad_entropy=entropy_gradient(
                        self.rt, self.runner, res.batch_e, base=res.base, est=self.cfg.estimators))
                u_side = explain_u(self.rt, self.runner, res.batch_u, update=res.update,
                                   grad_entropy=res.delta_h1.grad_entropy, per_eta=res.delta_h1.per_eta,
                                   update_cfg=self.cfg.update)
            res.explain_e, res.explain_u = e_side, u_side
        except ForwardModeUnavailable as err:
            res.explain_e = res.explain_u = None
            res.explain_skipped = (f"skipped: the explanation's forward-mode pass cannot run on this model ({err}); "
                                   "set estimators.explain=false to skip this pass")
        if res.explain_skipped and self.rt.is_main:
            log.warning("explanation %s", res.explain_skipped)

    def run(self) -> ProbeResult:
        """sample → score → update → predict → explain → measure → restore; the training state is restored (and
        verified by hash) on every rank whatever happens. A stop signal ends the run at the next safe point with
        status "interrupted". Raises RuntimeError when a restore does not verify; user-input errors propagate."""
        cfg, est, rt, runner = self.cfg, self.cfg.estimators, self.rt, self.runner
        res = ProbeResult(se_kind=est.se)
        # Snapshot first: it records the caller's train/eval flags, which restore puts back.
        snapshot = take_snapshot(self.model, self.trainable, self.optimizer)
        self.model.eval()  # every probe pass in eval mode (LoRA dropout off)
        verified = []
        try:
            self.check_stop()  # a signal during loading
            with self.clock.phase(phases.SAMPLE):
                with self.rollout_engine():
                    res.batch_e = self.sample("E", cfg.sampling.B_E, cfg.sampling.G_E)
                    res.batch_u = (res.batch_e if est.mode == "single_batch"
                                   else self.sample("U", cfg.sampling.B_U, cfg.sampling.G_U))
                res.sampler_scorer_gap = self.check_sampler_scorer(res.batch_e)
            self.check_stop()
            with self.clock.phase(phases.SCORE_BASE):
                res.scores_e = score_batch(rt, runner, res.batch_e)
                # E drawn by an external sampler q: every estimate on E is weighted by π_θ(y)/q(y) (§13)
                res.sampler = apply_sampler_weights(rt, res.batch_e, res.scores_e, cap=cfg.rollout.is_cap)
                res.base = base_entropy(rt, res.batch_e, res.scores_e, payload=est.payload, normalize=est.normalize)
            if est.se == "population":  # the fixed-prompt SE rests on the responses within each prompt
                warn_if_few_groups(res.base.num_groups)
            self.check_stop()
            with self.clock.phase(phases.UPDATE_GRADIENT):
                grad, grad_norm, clip_coef, norm = update_gradient(rt, runner, res.batch_u, cfg.update, grade=self.grade)
                res.update = UpdateGradient(grad=grad, grad_norm=grad_norm, clip_coef=clip_coef, normalisers=norm,
                                            parts=update_parts(self.optimizer, self.trainable, grad))
            self.check_stop()
            with self.clock.phase(phases.DELTA_H1):
                ustat = (SingleBatchUStatistic(runner, res.batch_u, res.update, est=est, update=cfg.update)
                         if est.mode == "single_batch" else None)
                # With the explanation on, δH₁ comes from its nested pass (first and second order in one go) where
                # that pass's kernels agree with the first-order one's to float32 rounding; in bfloat16 their gap is
                # of bfloat16's size, so the passes stay separate and explain/closure_e keeps reporting it
                res.delta_h1 = predict_delta_h1(rt, runner, res.batch_e, res.scores_e, base=res.base, u=res.update.u,
                                                est=est, ustat=ustat,
                                                second_order=est.explain and cfg.precision.dtype != "bfloat16")
            if est.explain:
                self.check_stop()
                with self.clock.phase(phases.EXPLAIN):
                    self.explain(res)
            theta0 = [t.clone() for t in snapshot.params]
            for eta in est.etas:
                self.check_stop()
                with self.clock.phase(phases.SWEEP, f"{phases.SWEEP} η={eta:g}"):
                    if cfg.update.route == "real_step":
                        def move(eta=eta):
                            real_step(self.optimizer, self.trainable, res.update.grad, eta)
                    else:
                        def move(eta=eta):
                            set_theta(self.trainable, theta0, res.update.u, eta)
                    res.scores_e, scores_new, ok = scores_at_eta(
                        rt, runner, res.batch_e, res.scores_e, move_to_eta=move,
                        restore=lambda: restore_snapshot(snapshot, self.model, self.trainable, self.optimizer))
                    verified += ok
                    fields, res.log_weights[eta] = snis_point(rt, res.batch_e, res.scores_e, scores_new,
                                                                base=res.base, est=est)
                e = res.explain_e
                point = sweep_point(eta, fields, res.delta_h1, se_kind=est.se,
                                    delta_h1_se_fixed=e.delta_h1_se_fixed if e else float("nan"),
                                    curvature=(e.second_derivative, e.second_derivative_se,
                                               e.second_derivative_se_fixed) if e else None)
                res.sweep.append(point)
                if rt.is_main:
                    log.info("eta=%g  dH_true=%+.6g ± %.2g  dH1=%+.6g  ESS/N=%.3f", eta, point.delta_h_true,
                             point.delta_h_true_se, point.delta_h1, point.ess_frac)
            res.status = "completed"
        except StopRequested:
            res.status = "interrupted"
            log.warning("stop requested: restoring the training state and writing a partial summary")
        finally:
            verified.append(restore_snapshot(snapshot, self.model, self.trainable, self.optimizer))
        res.restore_verified_ranks = rt.all_gather_objects(all(verified))
        res.phase_seconds = dict(self.clock.seconds)
        res.microbatch_used = {"generate": cfg.memory.microbatch_generate, **runner.sizes.as_dict(),
                               "logits_chunk": cfg.memory.logits_chunk}
        if rt.is_main:
            for warning in res.warnings():
                log.warning("%s", warning)
        if cfg.memory.profile:
            res.memory_phases = rt.gather_objects(dict(self.clock.memory))
        if not res.restore_verified:
            raise RuntimeError("restore verification failed on at least one rank: the training state after the "
                               f"probe differs from the snapshot (per-rank: {res.restore_verified_ranks}).")
        return res
