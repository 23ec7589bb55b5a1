"""The probe, top to bottom: sample → score → update → predict (δH₁) → measure (ΔH_true) → restore → report.

Every forward runs on rows of one prompt group (layout fixed by the group alone) and every global quantity is a
float64 sum all-reduced by the runtime, so results do not depend on the world size or the partition.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from probe_dist.data.prompts import load_prompts, select_prompts
from probe_dist.data.rewards import decode_response, get_reward_fn
from probe_dist.estimators.delta_h1 import delta_h1_influence, surrogate_coefficients
from probe_dist.estimators.entropy import normaliser_lengths, ratio_influence, se_from_influence
from probe_dist.estimators.psis import khat_threshold, pareto_khat
from probe_dist.estimators.snis import (
    SNIS_SUM_FIELDS,
    log_weights,
    snis_delta_influence,
    snis_finalize,
    snis_local_sums,
)
from probe_dist.estimators.ustat import block_assignments, u_statistic_dot
from probe_dist.model.policy import PolicyModel
from probe_dist.rollout.batch import Group, RolloutBatch, group_advantages
from probe_dist.rollout.generate import sample_responses
from probe_dist.runtime import signals
from probe_dist.runtime.memory import PhaseMemoryRecorder, merge_phase_records
from probe_dist.runtime.sharding import max_groups_per_rank, shard_groups
from probe_dist.runtime.snapshot import restore_snapshot, take_snapshot
from probe_dist.update.adamw import AdamWHyper, adamw_update_vector
from probe_dist.update.loss import LossNormalisers, sequence_normalisers, update_loss

log = logging.getLogger("probe_dist")


class StopRequested(Exception):
    """SIGTERM/SIGUSR1 reached this job (pre-emption or time limit)."""


@dataclass
class GroupScores:
    """Per-sequence scores of one group at one θ (float64, CPU)."""

    logp: torch.Tensor      # S_i
    rb: torch.Tensor        # Σ_t H_{i,t}
    lengths: torch.Tensor   # T_i

    def payload(self, kind: str) -> torch.Tensor:
        return self.rb if kind == "rb" else -self.logp


@dataclass
class PhaseClock:
    seconds: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    profile: bool = False
    device: torch.device = torch.device("cpu")

    @contextmanager
    def phase(self, name: str):
        inject_fault(name)
        recorder = PhaseMemoryRecorder(self.device) if self.profile else nullcontext()
        start = time.perf_counter()
        with recorder:  # resets the CUDA peaks and peak RSS, meters bytes saved for backward
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.profile:
            self.memory[name] = merge_phase_records(self.memory.get(name), recorder.result)


def inject_fault(phase: str) -> None:
    """Fault injection for failure-behaviour tests: PROBE_FAULT="<rank>:<phase>" raises there, on that rank."""
    spec = os.environ.get("PROBE_FAULT")
    if spec:
        rank, _, where = spec.partition(":")
        if where == phase and os.environ.get("RANK", "0") == rank:
            raise RuntimeError(f"injected fault (PROBE_FAULT={spec})")


class Probe:
    def __init__(self, cfg, runtime, model, tokenizer, optimizer, trainable, policy=None, strategy=None):
        self.cfg = cfg
        self.rt = runtime
        self.model = model            # PeftModel (or plain LM)
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.trainable = trainable    # [(name, param)] in optimizer order
        self.policy = policy or PolicyModel(model, cfg.memory.logits_chunk)
        self.strategy = strategy      # runtime.strategy.Strategy or None (world size 1, no wrapper)
        self.clock = PhaseClock(profile=cfg.memory.profile, device=runtime.device)
        # Live microbatch sizes: auto_microbatch halves them on OOM (all ranks together).
        self.rows_score = cfg.memory.microbatch_score
        self.rows_grad = cfg.memory.microbatch_grad
        # Results a run leaves behind for the report (and for tests).
        self.update_vector = self.update_grad = self.grad_entropy = self.base = None
        self.log_weights_by_eta: dict[float, list[torch.Tensor]] = {}
        self.batches: dict = {"E": None, "U": None}
        self.scores_e = None
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ plumbing
    def _forward(self, layout: dict, grad: bool):
        """Scoring forward through the (possibly DDP/FSDP-wrapped) policy root."""
        dev = self.rt.device
        args = dict(input_ids=layout["input_ids"].to(dev, non_blocking=True),
                    attention_mask=layout["attention_mask"].to(dev, non_blocking=True),
                    response_start=layout["response_start"],
                    response_mask=layout["response_mask"].to(dev, non_blocking=True),
                    temperature=self.cfg.sampling.temperature)
        root = self.strategy.root if self.strategy is not None else self.policy
        with torch.set_grad_enabled(grad):
            return root(**args)

    def _no_sync(self):
        return self.strategy.no_sync() if self.strategy is not None else nullcontext()

    def with_oom_retry(self, kind: str, local_fn):
        """Run a collective-free local loop; if any rank ran out of memory, all ranks halve `kind` and rerun.

        kind is "score" or "grad". Sums are float64 and each microbatch is group-local, so a rerun with a
        smaller size gives exactly what a run with that size from the start gives.
        """
        while True:
            failed, result = False, None
            try:
                result = local_fn()
            except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
                if not _is_oom(exc):
                    raise
                failed = True
                self._zero_grads()
                if self.rt.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory with microbatch_%s=%d", kind,
                            self.rows_score if kind == "score" else self.rows_grad)
            if not self.rt.any_flag(failed):
                return result
            current = self.rows_score if kind == "score" else self.rows_grad
            if not self.cfg.memory.auto_microbatch or current <= 1:
                raise MemoryError(f"out of memory at memory.microbatch_{kind}={current} on some rank; lower "
                                  "memory.microbatch_* / memory.logits_chunk, or set memory.auto_microbatch=true.")
            if kind == "score":
                self.rows_score = max(1, current // 2)
            else:
                self.rows_grad = max(1, current // 2)
            log.warning("auto_microbatch: retrying with memory.microbatch_%s=%d", kind, max(1, current // 2))

    def check_stop(self) -> None:
        if self.rt.any_flag(signals.requested()):
            raise StopRequested()

    # ------------------------------------------------------------------ sampling
    def sample(self, name: str, num_prompts: int, group_size: int) -> RolloutBatch:
        s = self.cfg.sampling
        prompts = load_prompts(s.prompts, s.split)
        chosen = select_prompts(prompts, num_prompts, s.seed, name)
        reward_fn = get_reward_fn(s.reward)
        mine = shard_groups(num_prompts, self.rt.world_size, self.rt.rank)
        # Pad so every rank generates and scores the same number of groups (zero-weight copies).
        padded = mine + [mine[-1] if mine else 0] * (max_groups_per_rank(num_prompts, self.rt.world_size) - len(mine))
        groups = []
        lockstep = self.strategy is not None and self.strategy.name == "fsdp2"
        family = self.cfg.update.loss
        for slot, batch_pos in enumerate(padded):
            _, prompt = chosen[batch_pos]
            prompt_ids = torch.tensor(self.tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"],
                                      dtype=torch.long)
            if self.tokenizer.bos_token_id is not None and (prompt_ids.numel() == 0
                                                            or prompt_ids[0] != self.tokenizer.bos_token_id):
                prompt_ids = torch.cat([torch.tensor([self.tokenizer.bos_token_id]), prompt_ids])
            responses, lengths = sample_responses(
                self.decoder_policy(), prompt_ids, group_size, s.max_new_tokens, s.temperature, self.eos_id,
                self.pad_id, (s.seed, name, batch_pos), self.rt.device,
                rows_per_chunk=self.cfg.memory.microbatch_generate, lockstep=lockstep)
            texts = [decode_response(self.tokenizer, r[: int(n)]) for r, n in zip(responses, lengths)]
            rewards = torch.tensor([reward_fn(t, prompt["answer"]) for t in texts], dtype=torch.float64)
            g = Group(prompt_index=batch_pos, prompt_ids=prompt_ids, responses=responses, lengths=lengths,
                      rewards=rewards, advantages=group_advantages(rewards, family, self.cfg.update.adv_eps),
                      answer=prompt["answer"], weight=1.0 if slot < len(mine) else 0.0)
            groups.append(g)
        return RolloutBatch(name=name, groups=groups)

    def decoder_policy(self):
        return self.strategy.decoder if self.strategy is not None else self.policy

    # ------------------------------------------------------------------ scoring
    def score_group(self, group: Group) -> GroupScores:
        """S_i, Σ_t H_{i,t} per sequence (no grad), float64 sums of float32 per-token values."""
        rows = self.rows_score
        logp_parts, rb_parts = [], []
        for sl, layout in group.microbatches(rows):
            token_logp, token_h = self._forward(layout, grad=False)
            row = _token_rows(layout["response_mask"]).to(token_logp.device)
            n = sl.stop - sl.start
            logp_parts.append(_row_sums(token_logp, row, n))
            rb_parts.append(_row_sums(token_h, row, n))
        return GroupScores(logp=torch.cat(logp_parts), rb=torch.cat(rb_parts), lengths=group.lengths.clone())

    def score_batch(self, batch: RolloutBatch) -> list[GroupScores]:
        return self.with_oom_retry("score", lambda: [self.score_group(g) for g in batch.groups])

    # ------------------------------------------------------------------ global entropy at θ
    def entropy_at_theta(self, batch: RolloutBatch, scores: list[GroupScores]) -> dict:
        est = self.cfg.estimators
        real = [sc for g, sc in zip(batch.groups, scores) if g.weight > 0]
        h_groups = torch.tensor([float(sc.payload(est.payload).sum()) for sc in real], dtype=torch.float64)
        lam_groups = torch.tensor([float(normaliser_lengths(sc.lengths, est.normalize).sum()) for sc in real],
                                  dtype=torch.float64)
        naive = sum(float((-sc.logp).sum()) for sc in real)
        sum_h, sum_lam, sum_naive, n_groups = self.rt.sum_scalars(float(h_groups.sum()), float(lam_groups.sum()),
                                                                  naive, float(len(real)))
        entropy = sum_h / sum_lam
        (c2,) = self.rt.sum_scalars(float(ratio_influence(h_groups, lam_groups, entropy, sum_lam).pow(2).sum()))
        return {"entropy": entropy, "entropy_se": se_from_influence(c2, int(n_groups)),
                "entropy_naive": sum_naive / sum_lam, "sum_lam": sum_lam, "sum_h": sum_h,
                "num_groups": int(n_groups)}

    # ------------------------------------------------------------------ the update gradient
    def _zero_grads(self):
        for _, p in self.trainable:
            p.grad = None

    def _take_grads(self) -> list[torch.Tensor]:
        """This microbatch's gradient as float64 CPU tensors; .grad is cleared for the next one."""
        out = [torch.zeros(p.shape, dtype=torch.float64) if p.grad is None
               else p.grad.detach().to("cpu", torch.float64) for _, p in self.trainable]
        self._zero_grads()
        return out

    def loss_normalisers(self, batch: RolloutBatch) -> LossNormalisers:
        real = [g for g in batch.groups if g.weight > 0]
        num_prompts, total_tokens = self.rt.sum_scalars(float(len(real)), float(sum(int(g.lengths.sum()) for g in real)))
        return LossNormalisers(num_prompts=int(num_prompts), group_size=batch.groups[0].size,
                               total_tokens=total_tokens,
                               max_len=self.cfg.update.max_len or self.cfg.sampling.max_new_tokens)

    def reference_logps(self, batch: RolloutBatch) -> dict:
        """Per-token log-probs of the reference (adapter disabled) for the KL term, no grad."""
        refs = {}
        if not self.cfg.update.kl_coef:
            return refs
        ctx = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        with ctx:
            for gi, g in enumerate(batch.groups):
                for sl, layout in g.microbatches(self.rows_grad):
                    refs[(gi, sl.start)] = self._forward(layout, grad=False)[0].detach()
        return refs

    def group_loss_backward(self, gi: int, group: Group, norm: LossNormalisers, refs: dict,
                            accumulator: list[torch.Tensor]) -> None:
        """Forward + backward of the training loss per microbatch of one group, each microbatch's gradient
        added to the float64 CPU accumulator at once.

        Summing in .grad would round in float32 in an order that depends on how many groups a rank holds; float64
        sums of float32 terms are (practically) exact, so the update vector is the same bits for any world size.
        """
        normalisers = sequence_normalisers(self.cfg.update.loss, group.lengths, norm)
        for sl, layout in group.microbatches(self.rows_grad):
            token_logp, _ = self._forward(layout, grad=True)
            row = _token_rows(layout["response_mask"]).to(token_logp.device)
            loss = update_loss(token_logp, row, group.advantages[sl], normalisers[sl], self.cfg.update.kl_coef,
                               refs.get((gi, sl.start)))
            # Zero-weight padding still joins the graph so every rank runs the same backward passes.
            (loss * group.weight).backward()
            self._drain_grads_into(accumulator)

    def _drain_grads_into(self, accumulator: list[torch.Tensor]) -> None:
        for acc, (_, p) in zip(accumulator, self.trainable):
            if p.grad is not None:
                acc += p.grad.detach().to(acc.device, torch.float64)
                p.grad = None

    def _new_accumulator(self) -> list[torch.Tensor]:
        dev = "cpu" if self.cfg.memory.accumulator_device == "cpu" else self.rt.device
        return [torch.zeros(p.shape, dtype=torch.float64, device=dev) for _, p in self.trainable]

    def update_gradient(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], dict]:
        """g = ∇L_U (float64, CPU, all-reduced, clipped as in training) by per-microbatch backward."""
        norm = self.loss_normalisers(batch)
        refs = self.reference_logps(batch)
        def local_gradient():
            self._zero_grads()
            accumulator = self._new_accumulator()
            with self._no_sync():
                for gi, g in enumerate(batch.groups):
                    self.group_loss_backward(gi, g, norm, refs, accumulator)
            return [a.cpu() for a in accumulator]

        grad = self._reduce_vectors(self.with_oom_retry("grad", local_gradient))
        total_norm = math.sqrt(sum(float((x * x).sum()) for x in grad))
        clip = self.cfg.update.grad_clip
        coef = 1.0
        if clip and clip > 0:
            coef = min(1.0, clip / (total_norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            grad = [x * coef for x in grad]
        return grad, {"grad_norm": total_norm, "clip_coef": coef, "normalisers": norm}

    def _reduce_vectors(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.rt.world_size == 1:
            return vectors
        flat = self.rt.sum_f64(torch.cat([v.reshape(-1) for v in vectors]))
        out, start = [], 0
        for v in vectors:
            out.append(flat[start:start + v.numel()].view_as(v))
            start += v.numel()
        return out

    def update_parts(self, grad: list[torch.Tensor]):
        parts = []
        for (_, p), g in zip(self.trainable, grad):
            group = next(gr for gr in self.optimizer.param_groups if any(q is p for q in gr["params"]))
            st = self.optimizer.state[p]
            hp = AdamWHyper(betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"],
                            amsgrad=bool(group.get("amsgrad", False)))
            parts.append(adamw_update_vector(p, g, st["exp_avg"], st["exp_avg_sq"], float(st["step"]), hp,
                                             st.get("max_exp_avg_sq")))
        return parts

    # ------------------------------------------------------------------ δH₁
    def delta_h1(self, batch_e: RolloutBatch, scores_e: list[GroupScores], base: dict, u: list[torch.Tensor],
                 single_batch_ctx: dict | None = None) -> dict:
        """Per-group ∇surrogate·u by per-microbatch backward; value, SE and ∇Ĥ (float64, CPU)."""
        est = self.cfg.estimators
        sum_lam, h_bar = base["sum_lam"], base["entropy"]
        def local_pass():
            grad_entropy = [torch.zeros_like(x) for x in u]
            q_groups, b_groups, lam_groups, h_groups = [], [], [], []
            ustat = _UStatState(single_batch_ctx["batch_u"], est, self, single_batch_ctx) if single_batch_ctx else None
            self._zero_grads()
            with self._no_sync():
                for gi, group in enumerate(batch_e.groups):
                    q_p = b_p = 0.0
                    x_p = None
                    for _sl, layout in group.microbatches(self.rows_grad):
                        token_logp, token_h = self._forward(layout, grad=True)
                        row = _token_rows(layout["response_mask"]).to(token_logp.device)
                        n_rows = int(layout["response_mask"].shape[0])
                        phi = token_h if est.payload == "rb" else -token_logp
                        a, b = surrogate_coefficients(est.delta_h1, est.normalize, phi, token_h, row, n_rows, h_bar)
                        surrogate1 = (phi.double().sum() + (a * token_logp.double()).sum()) / sum_lam
                        surrogate2 = (b * token_logp.double()).sum()
                        (surrogate1 * group.weight).backward(retain_graph=True)
                        g1 = self._take_grads()
                        (surrogate2 * group.weight).backward()
                        g2 = self._take_grads()
                        q_p += _dot(g1, u)
                        b_p += _dot(g2, u)
                        for acc, x in zip(grad_entropy, g1):
                            acc += x
                        if ustat is not None:
                            x_p = g1 if x_p is None else [a + b for a, b in zip(x_p, g1)]
                    if ustat is not None:
                        ustat.add_group(gi, x_p)
                    if group.weight > 0:
                        sc = scores_e[gi]
                        q_groups.append(q_p)
                        b_groups.append(b_p)
                        lam_groups.append(float(normaliser_lengths(sc.lengths, est.normalize).sum()))
                        h_groups.append(float(sc.payload(est.payload).sum()))
            return grad_entropy, q_groups, b_groups, lam_groups, h_groups, ustat

        grad_entropy, q_groups, b_groups, lam_groups, h_groups, ustat = self.with_oom_retry("grad", local_pass)
        value_per_eta, sum_b = self.rt.sum_scalars(sum(q_groups), sum(b_groups))
        c = delta_h1_influence(torch.tensor(q_groups, dtype=torch.float64), torch.tensor(lam_groups, dtype=torch.float64),
                               torch.tensor(h_groups, dtype=torch.float64), value_per_eta, sum_lam, h_bar, sum_b)
        (c2,) = self.rt.sum_scalars(float((c * c).sum()))
        out = {"per_eta": value_per_eta, "se_per_eta": se_from_influence(c2, base["num_groups"]),
               "grad_entropy": self._reduce_vectors(grad_entropy)}
        if ustat is not None:
            out.update(ustat.finish(out["grad_entropy"]))
        return out

    # ------------------------------------------------------------------ θ' and ΔH_true
    def set_theta(self, theta0: list[torch.Tensor], u: list[torch.Tensor], eta: float) -> None:
        """θ ← θ0 + ηu formed in float64, then cast to the parameter dtype (never a tiny step added in bf16)."""
        with torch.no_grad():
            for (_, p), t0, ui in zip(self.trainable, theta0, u):
                p.copy_((t0.to(torch.float64) + eta * ui).to(p.dtype))

    def real_step(self, grad: list[torch.Tensor], eta: float) -> None:
        with torch.no_grad():
            for (_, p), g in zip(self.trainable, grad):
                p.grad = g.to(device=p.device, dtype=p.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = eta
        self.optimizer.step()
        self._zero_grads()

    def snis(self, batch: RolloutBatch, scores0: list[GroupScores], scores1: list[GroupScores], base: dict) -> dict:
        est = self.cfg.estimators
        real = [(g, s0, s1) for g, s0, s1 in zip(batch.groups, scores0, scores1) if g.weight > 0]
        lw_local = [log_weights(s1.logp, s0.logp, est.log_weight_clip) for _, s0, s1 in real]
        lw_cat = torch.cat(lw_local) if lw_local else torch.zeros(0, dtype=torch.float64)
        local_max = float(lw_cat.max()) if lw_cat.numel() else -math.inf
        gmax = float(self.rt.max_f64(torch.tensor([local_max]))[0])
        sums = torch.zeros(8, dtype=torch.float64)
        for (_g, s0, s1), lw in zip(real, lw_local):
            lam = normaliser_lengths(s1.lengths, est.normalize)
            clipped = (s1.logp - s0.logp) > est.log_weight_clip if est.log_weight_clip is not None else None
            sums += snis_local_sums(lw, gmax, s1.payload(est.payload), lam, clipped)
        global_sums = self.rt.sum_f64(sums)
        res = snis_finalize(global_sums, base["entropy"])
        sum_w_lam = float(global_sums[SNIS_SUM_FIELDS.index("sum_w_lam")])
        c2 = 0.0
        for (_g, s0, s1), lw in zip(real, lw_local):
            lam = normaliser_lengths(s1.lengths, est.normalize)
            c = snis_delta_influence(torch.exp(lw - gmax), s1.payload(est.payload), s0.payload(est.payload), lam,
                                     torch.zeros(lw.numel(), dtype=torch.long), 1, res.entropy_new,
                                     base["entropy"], sum_w_lam, base["sum_lam"])
            c2 += float((c * c).sum())
        (c2,) = self.rt.sum_scalars(c2)
        gathered = self.rt.gather_objects(lw_cat)
        khat = float("nan")
        if gathered is not None:
            all_lw = torch.cat(gathered)
            khat = pareto_khat(all_lw) if all_lw.numel() else float("nan")
        return {"delta_h_true": res.delta, "delta_h_true_se": se_from_influence(c2, base["num_groups"]),
                "entropy_new": res.entropy_new, "ess": res.ess, "ess_frac": res.ess_frac, "khat": khat,
                "khat_threshold": khat_threshold(round(res.ess / res.ess_frac)) if res.ess_frac > 0 else float("nan"),
                "kl": res.kl_k3, "kl_k1": res.kl_k1, "max_weight": res.max_weight, "clip_frac": res.clip_frac,
                "log_weights": lw_local}

    # ------------------------------------------------------------------ the whole run
    def run(self) -> dict:
        cfg, est = self.cfg, self.cfg.estimators
        out: dict = {"status": "running", "sweep": []}
        # Snapshot first: it records the caller's train/eval flags, which restore puts back.
        snapshot = take_snapshot(self.model, self.trainable, self.optimizer)
        self.model.eval()  # every probe pass in eval mode (LoRA dropout off)
        verified = []
        batch_e = batch_u = scores_e = None  # what exists so far, also for an interrupted run's table
        try:
            with self.clock.phase("sample"):
                batch_e = self.sample("E", cfg.sampling.B_E, cfg.sampling.G_E)
                batch_u = batch_e if est.mode == "single_batch" else self.sample("U", cfg.sampling.B_U, cfg.sampling.G_U)
            self.check_stop()
            with self.clock.phase("score_base"):
                scores_e = self.score_batch(batch_e)
                base = self.entropy_at_theta(batch_e, scores_e)
                self.base = base
            out.update({"entropy/base": base["entropy"], "entropy/base_se": base["entropy_se"],
                        "entropy/base_naive": base["entropy_naive"]})
            self.check_stop()
            with self.clock.phase("update_gradient"):
                grad, grad_info = self.update_gradient(batch_u)
                parts = self.update_parts(grad)
                u = [pt.u for pt in parts]
            out.update({"update/grad_norm": grad_info["grad_norm"], "update/clip_coef": grad_info["clip_coef"],
                        "update/u_norm": math.sqrt(sum(float((x * x).sum()) for x in u))})
            self.check_stop()
            with self.clock.phase("delta_h1"):
                sb = {"parts": parts, "grad": grad, "batch_u": batch_u, "norm": grad_info["normalisers"],
                      "clip_coef": grad_info["clip_coef"]} if est.mode == "single_batch" else None
                d1 = self.delta_h1(batch_e, scores_e, base, u, sb)
            self.update_vector = u
            self.update_grad = grad
            self.grad_entropy = d1["grad_entropy"]
            theta0 = [t.clone() for t in snapshot.params]
            for eta in est.etas:
                self.check_stop()
                with self.clock.phase("sweep"):
                    while True:
                        rows_before = self.rows_score
                        if cfg.update.route == "real_step":
                            self.real_step(grad, eta)
                        else:
                            self.set_theta(theta0, u, eta)
                        scores_new = self.score_batch(batch_e)
                        verified.append(restore_snapshot(snapshot, self.model, self.trainable, self.optimizer))
                        if self.rows_score == rows_before:
                            break
                        # An OOM retry changed the scoring layout: S(θ) must come from the same layout as S(θ').
                        scores_e = self.score_batch(batch_e)
                    res = self.snis(batch_e, scores_e, scores_new, base)
                per_eta = d1.get("ustat_per_eta", d1["per_eta"])
                self.log_weights_by_eta[eta] = res.pop("log_weights")
                out["sweep"].append({"eta": eta, **res, "delta_h1": eta * per_eta + 0.0,  # + 0.0: no −0.0 at η = 0
                                     "delta_h1_se": abs(eta) * d1["se_per_eta"]})
                if self.rt.is_main:
                    log.info("eta=%g  dH_true=%+.6g ± %.2g  dH1=%+.6g  ESS/N=%.3f", eta, res["delta_h_true"],
                             res["delta_h_true_se"], eta * per_eta, res["ess_frac"])
            out["delta_h1/per_eta"] = d1["per_eta"]
            out["delta_h1/per_eta_se"] = d1["se_per_eta"]
            if "ustat_per_eta" in d1:
                out["delta_h1/ustat_per_eta"] = d1["ustat_per_eta"]
            out["status"] = "completed"
        except StopRequested:
            out["status"] = "interrupted"
            log.warning("stop requested: restoring the training state and writing a partial summary")
        finally:
            verified.append(restore_snapshot(snapshot, self.model, self.trainable, self.optimizer))
        all_verified = self.rt.all_gather_objects(all(verified))
        out["restore/verified"] = bool(all(all_verified))
        out["restore/verified_ranks"] = all_verified
        self.batches = {"E": batch_e, "U": batch_u}
        self.scores_e = scores_e
        out["provenance/phase_seconds"] = dict(self.clock.seconds)
        if self.cfg.memory.profile:
            out["memory/phases"] = self.rt.gather_objects(dict(self.clock.memory))
        if not out["restore/verified"]:
            raise RuntimeError("restore verification failed on at least one rank: the training state after the "
                               f"probe differs from the snapshot (per-rank: {all_verified}).")
        return out


class _UStatState:
    """Single-batch δH₁ (E = U) by the U-statistic of SPEC §5.3 in dot-product form.

    X_p = ∇ of unit p's entropy surrogate, Y_p = coef ⊙ (clip · ∇ unit p's loss) — u's gradient part, linearised
    through the fixed AdamW denom. Units are prompt groups (exact) or contiguous blocks of this rank's groups;
    only the current unit's two param-sized sums are held, so memory does not grow with B.
    """

    def __init__(self, batch_u: RolloutBatch, est, probe: Probe, ctx: dict):
        self.probe, self.batch_u, self.ctx = probe, batch_u, ctx
        self.coef = [pt.grad_coef for pt in ctx["parts"]]
        self.unit_of = {gi: k for k, gis in enumerate(_ustat_units(batch_u, est)) for gi in gis}
        self.last_of_unit = {gis[-1] for gis in _ustat_units(batch_u, est)}
        self.x_unit = self.y_unit = None
        self.diag = 0.0

    def add_group(self, gi: int, x_p: list[torch.Tensor]) -> None:
        if gi not in self.unit_of:  # zero-weight padding
            return
        probe = self.probe
        group = self.batch_u.groups[gi]
        probe._zero_grads()
        g_p = probe._new_accumulator()
        with probe._no_sync():
            # Reference log-probs per group again: the microbatch layout may have changed since (OOM retry).
            refs = probe.reference_logps(RolloutBatch("U", [group]))
            probe.group_loss_backward(0, group, self.ctx["norm"], refs, g_p)
        g_p = [g.cpu() for g in g_p]
        if self.x_unit is None:
            self.x_unit, self.y_unit = [x.clone() for x in x_p], g_p
        else:
            self.x_unit = [a + b for a, b in zip(self.x_unit, x_p)]
            self.y_unit = [a + b for a, b in zip(self.y_unit, g_p)]
        if gi in self.last_of_unit:
            clip = self.ctx["clip_coef"]
            self.diag += clip * _dot(self.x_unit, [c * y for c, y in zip(self.coef, self.y_unit)])
            self.x_unit = self.y_unit = None

    def finish(self, grad_entropy: list[torch.Tensor]) -> dict:
        probe = self.probe
        diag, n_units = probe.rt.sum_scalars(self.diag, float(len(self.last_of_unit)))
        bars_dot = _dot(grad_entropy, [c * g for c, g in zip(self.coef, self.ctx["grad"])])  # grad already clipped
        base_term = _dot(grad_entropy, [pt.u_base for pt in self.ctx["parts"]])
        b = int(n_units)
        # X·u_grad = Σ_{p,q} X_p·Y_q; the U-statistic drops the same-unit (diagonal) terms: B²·mean over p≠q.
        return {"ustat_per_eta": base_term + b * b * u_statistic_dot(bars_dot, diag, b), "ustat_units": b}


def _ustat_units(batch_u: RolloutBatch, est) -> list[list[int]]:
    real = [i for i, g in enumerate(batch_u.groups) if g.weight > 0]
    if est.ustat == "exact":
        return [[i] for i in real]
    return [[real[j] for j in block] for block in block_assignments(len(real), min(est.ustat_blocks, len(real)))]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def _token_rows(response_mask: torch.Tensor) -> torch.Tensor:
    """Row index of each True entry of response_mask in row-major order (the flat layout scoring returns)."""
    return response_mask.nonzero(as_tuple=True)[0]


def _row_sums(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=torch.float64, device=values.device).index_add_(
        0, rows, values.detach().double()).cpu()


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(float((x.reshape(-1).double() * y.reshape(-1).double()).sum()) for x, y in zip(a, b)))
