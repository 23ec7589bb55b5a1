"""Typed results of each step of a probe run, and the one `ProbeResult` the report consumes.

Symbols follow docs/method.md: Ĥ (entropy), λ (normaliser), u (update vector), η (step size), w (importance
weights). Every float is a float64 global value (all-reduced over ranks) unless a field says otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch

from probe_dist.rollout.batch import RolloutBatch
from probe_dist.update.adamw import UpdateParts
from probe_dist.update.loss import LossNormalisers

log = logging.getLogger("probe_dist")


@dataclass(frozen=True)
class SequenceScores:
    """Per-sequence scores of one prompt group at one θ: [G] float64 CPU tensors.

    S = Σ_t ℓ_{i,t} (log-prob at τ), h_rb = Σ_t H_{i,t} (Rao–Blackwellised entropy), T = scored tokens (EOS included).
    """

    S: torch.Tensor
    h_rb: torch.Tensor
    T: torch.Tensor

    def h(self, payload: str) -> torch.Tensor:
        """The entropy payload h_i: Σ_t H_{i,t} ("rb") or −S_i ("naive")."""
        return self.h_rb if payload == "rb" else -self.S


@dataclass(frozen=True)
class BaseEntropy:
    """Ĥ(θ) = Σh/Σλ on E with its delta-method SE over prompt groups (docs/method.md §3, §9)."""

    entropy: float          # Ĥ, nats per token (per_token) or per sequence (per_sequence)
    entropy_se: float
    entropy_naive: float    # Σ(−S)/Σλ, the naive payload's estimate on the same samples
    sum_h: float            # Σ_i h_i over E
    sum_lam: float          # Σ_i λ_i over E
    num_groups: int         # prompt groups in E (the SE's units)
    entropy_se_fixed: float = float("nan")  # SE conditional on E's prompts (within-prompt variance only, §9)


@dataclass(frozen=True)
class UpdateGradient:
    """g = ∇L_U (clipped as in training) and the AdamW update vector u = u_base + coef ⊙ g (docs/method.md §4).

    Tensors are float64 on CPU in the optimizer's parameter order, identical on every rank.
    """

    grad: list[torch.Tensor]
    grad_norm: float        # ‖g‖ before clipping
    clip_coef: float        # min(1, max_norm/(‖g‖ + 1e-6)), 1.0 without clipping
    normalisers: LossNormalisers  # or, for GRADE, update.grade.GradeStats
    parts: list[UpdateParts]

    @property
    def u(self) -> list[torch.Tensor]:
        """u per tensor: param-shaped float64 CPU tensors in the optimizer's parameter order."""
        return [pt.u for pt in self.parts]

    @property
    def u_norm(self) -> float:
        """‖u‖₂ over all tensors (float64)."""
        return math.sqrt(sum(float((x * x).sum()) for x in self.u))


@dataclass(frozen=True)
class DeltaH1:
    """δH₁/η = ∇Ĥ·u with its SE (docs/method.md §5); δH₁(η) = η × these."""

    per_eta: float
    per_eta_se: float                     # delta-method SE over E's groups, conditional on u
    grad_entropy: list[torch.Tensor] | None  # ∇Ĥ (float64, CPU, all-reduced); None until needed (forward mode)
    ustat_per_eta: float | None = None    # single_batch mode: the U-statistic (§5.3) that the sweep reports
    ustat_units: int | None = None
    # Per sequence of this rank's E groups, the second-order pass's path derivatives (prediction.delta_h1.path_rows,
    # order 2) when δH₁ came from that pass: what explain_e sums, so it need not run the pass again.
    e_rows: list[dict[str, torch.Tensor]] | None = None
    # Why the nested pass could not serve (δH₁ then came from a first-order pass): explain_e does not retry it.
    nested_failure: str | None = None

    @property
    def reported_per_eta(self) -> float:
        """What the sweep reports: the U-statistic in single_batch mode, ∇Ĥ·u otherwise."""
        return self.ustat_per_eta if self.ustat_per_eta is not None else self.per_eta


@dataclass(frozen=True)
class SweepPoint:
    """ΔH_true(η) by SNIS on the E samples and δH₁(η), for one η (docs/method.md §6)."""

    eta: float
    delta_h_true: float
    delta_h_true_se: float
    entropy_new: float      # Ĥ(θ + ηu)
    ess: float              # Kish effective sample size of w
    ess_frac: float         # ESS / N
    khat: float             # PSIS Pareto k̂ of log w (NaN when undefined)
    khat_threshold: float
    kl: float               # KL(θ‖θ') by k3
    kl_k1: float
    max_weight: float       # largest self-normalised weight
    clip_frac: float        # share of log-weights clipped (estimators.log_weight_clip)
    delta_h1: float
    delta_h1_se: float
    flags: tuple[str, ...] = ()  # why a number of this row is not finite (empty when all are)
    delta_h_true_se_population: float = float("nan")     # both SE kinds (§9); the *_se above follow estimators.se
    delta_h_true_se_fixed_prompts: float = float("nan")
    delta_h1_se_population: float = float("nan")
    delta_h1_se_fixed_prompts: float = float("nan")
    delta_h2: float = float("nan")        # ½η²·Ĥ'' (§10): δH₁ + δH₂ is the second-order prediction
    delta_h2_se: float = float("nan")
    khat_reliable: bool = False           # k̂ means something: N ≥ 100 and ESS/N < 0.99 (else it is noise)

    def to_dict(self) -> dict:
        """The point as plain data (dataclasses.asdict, flags as a list): one summary.json "sweep" entry."""
        out = asdict(self)
        out["flags"] = list(self.flags)
        return out


@dataclass(frozen=True)
class SamplerCorrection:
    """E drawn by an external sampler q: the diagnostics of its weights v_i ∝ min(π_θ(y_i)/q(y_i), cap)
    (docs/method.md §13). Plain floats, global over ranks."""

    cap: float | None        # rollout.is_cap: ratios above it were truncated (None: untruncated)
    ess: float               # Kish ESS of v
    ess_frac: float          # ESS / N
    max_weight: float        # largest self-normalised weight
    trunc_frac: float        # share of ratios above the cap
    kl: float                # KL(q‖π_θ) per sequence, mean(−log ρ) on q's samples (nats)
    log_ratio_per_token: float  # Σ|log ρ_i| / ΣT_i: the sampler's log-probs against the scorer's, nats per token
    mean_ratio: float        # (1/N) Σ ρ_i: ≈ 1 when q covers π_θ
    khat: float              # PSIS Pareto k̂ of the untruncated log ρ (NaN when undefined)
    khat_threshold: float
    khat_reliable: bool = False  # k̂ means something: N ≥ 100 and ESS/N < 0.99 (as the sweep's)

    def warnings(self) -> list[str]:
        """What a reader must know about the sampler's weights: a heavy tail (k̂ ≥ 0.7) or few effective samples."""
        out = []
        if self.khat_reliable and self.khat >= 0.7:  # measurement.sweep.KHAT_UNRELIABLE (PSIS's bound)
            out.append(f"the sampler weights π_θ(y)/q(y) have a heavy tail (k̂ = {self.khat:.2f} ≥ 0.7): the "
                       "estimates on E are not to be trusted; the engine's distribution is too far from the policy's "
                       "(check its dtype and kernels), or set rollout.is_cap to truncate the ratios")
        elif self.ess_frac < 0.1:
            out.append(f"the sampler weights leave ESS/N = {self.ess_frac:.3f}: the estimates on E rest on few of "
                       "its responses; the engine's distribution is far from the policy's")
        return out

    def summary(self) -> dict:
        """The `sampler/*` keys of summary.json (docs/outputs.md)."""
        return {f"sampler/{k}": v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class EExplanation:
    """E side of the explanation (docs/method.md §10): δH₁/η = Σ_i c_i over E sequences, and the curvature."""

    contrib: dict[int, torch.Tensor]   # this rank's E prompt index → [G] c_i (nats per unit η)
    sum_contrib: float                 # Σ_i c_i over all ranks
    closure: float                     # |Σ c_i − δH₁/η| / |δH₁/η| (rounding of the model's arithmetic only)
    delta_h1_se_fixed: float           # δH₁/η's SE conditional on E's prompts
    first_derivative: float            # Ĥ'(0) of the same-sample estimator from the same pass (nats per unit η)
    second_derivative: float           # Ĥ''(0) (nats per unit η²)
    second_derivative_se: float        # over prompt groups (population)
    second_derivative_se_fixed: float  # conditional on E's prompts
    linear_regime_eta: float           # η where |δH₂| = 10 % of |δH₁|: 0.2·|Ĥ'|/|Ĥ''|


@dataclass(frozen=True)
class UExplanation:
    """U side (docs/method.md §10, §11): δH₁/η = ∇Ĥ·u_base + Σ_j d_j over U sequences, and the Cui proxy on U."""

    contrib: dict[int, torch.Tensor]   # this rank's U prompt index → [G] d_j (nats per unit η)
    base_per_eta: float                # ∇Ĥ·u_base: momentum and weight decay (no U dependence)
    sum_contrib: float                 # Σ_j d_j over all ranks
    closure: float                     # |∇Ĥ·u_base + Σ d_j − δH₁/η| / |δH₁/η|
    cov_logp_adv: float                # Cov(ℓ, A) over U's tokens (natural-gradient form)
    cov_logp_adv_se: float
    cov_logp_pi_adv: float             # Cov(ℓ, π·A) (vanilla softmax policy-gradient form)
    cov_logp_pi_adv_se: float
    cov_contrib: dict[int, torch.Tensor]  # U prompt index → [G] each sequence's share of Cov(ℓ, A)


@dataclass
class ProbeResult:
    """Everything a run leaves for the report. Fields are None for steps an interrupted run did not reach."""

    status: str = "running"                          # completed | interrupted
    base: BaseEntropy | None = None
    update: UpdateGradient | None = None
    delta_h1: DeltaH1 | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    log_weights: dict[float, list[torch.Tensor]] = field(default_factory=dict)  # η → per real E group [G]
    batch_e: RolloutBatch | None = None
    batch_u: RolloutBatch | None = None
    scores_e: list[SequenceScores] | None = None     # S(θ) of this rank's E groups (padding included)
    restore_verified_ranks: list[bool] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    memory_phases: list[dict] | None = None          # per rank, with memory.profile
    microbatch_used: dict[str, int] = field(default_factory=dict)
    sampler_scorer_gap: float | None = None          # max |ℓ_decode − ℓ_score| of the start-up check (nats)
    explain_e: EExplanation | None = None
    explain_u: UExplanation | None = None
    explain_skipped: str | None = None               # why the explanation was not computed
    se_kind: str = "population"                      # estimators.se: which SE the *_se keys report
    sampler: SamplerCorrection | None = None         # E drawn by an external sampler: its weights' diagnostics

    @property
    def restore_verified(self) -> bool:
        """Whether every rank restored the training state bit for bit (state hash equal to the snapshot's,
        docs/method.md §7); False before any rank reported."""
        return bool(self.restore_verified_ranks) and all(self.restore_verified_ranks)

    def warnings(self) -> list[str]:
        """What a reader must know before using the numbers: flagged sweep rows, the η = 0 check, few groups."""
        out = [f"η = {p.eta:g}: {flag}" for p in self.sweep for flag in p.flags]
        if self.sampler is not None:
            out += self.sampler.warnings()
        zero = [p for p in self.sweep if p.eta == 0.0]
        if zero and zero[0].delta_h_true != 0.0:
            out.append(f"η = 0 gave ΔH_true = {zero[0].delta_h_true!r}, not exactly 0: S(θ) was not reproduced "
                       "bit for bit at θ' = θ, so small ΔH_true values cannot be trusted on this setup")
        if self.update is not None and self.update.grad_norm == 0.0 and hasattr(self.update.normalisers,
                                                                                 "reward_mean"):
            out.append("the GRADE gradient is exactly 0: neither r_φ nor the KL term moves with θ on these relaxed "
                       "rollouts (check update.reward_model and update.kl_coef): u is momentum and weight decay only")
        elif self.update is not None and self.update.grad_norm == 0.0:
            out.append("the update gradient is exactly 0: either no U response has both a nonzero advantage and a "
                       "token the loss keeps (every group's rewards are equal, or update.mask_truncated dropped every "
                       "response without an EOS), or the trainable parameters do not act on the logits (e.g. an "
                       "adapter whose lora_alpha / r is 0). u is momentum and weight decay only; sample more or "
                       "larger U groups (or longer responses) to measure a learning step")
        if self.explain_e is not None and not self.curvature_resolved():
            out.append(f"the curvature d²Ĥ/dη² = {self.explain_e.second_derivative:.3g} is within 2 SE of 0 at this batch "
                       "size, so δH₂ and curvature/linear_regime_eta (where first order is 10 % off) are not resolved; "
                       "compare ΔH_true with δH₁ directly, or raise sampling.B_E / sampling.G_E")
        if self.status == "completed" and self.sweep and not zero:
            out.append("η = 0 is not in estimators.etas, so the exactness check ΔH_true(0) = 0 did not run")
        return out

    def final_status(self) -> str:
        """completed only when the η = 0 check (if run) gave exactly 0 and restore verified; else failed_check."""
        if self.status != "completed":
            return self.status
        zero_ok = all(p.delta_h_true == 0.0 for p in self.sweep if p.eta == 0.0)
        return "completed" if zero_ok and self.restore_verified else "failed_check"

    def delta_h1_per_eta_se(self) -> float:
        """δH₁/η's SE of the kind estimators.se names (NaN for fixed_prompts without the explanation)."""
        if self.se_kind == "fixed_prompts":
            return self.explain_e.delta_h1_se_fixed if self.explain_e is not None else float("nan")
        return self.delta_h1.per_eta_se

    def curvature_resolved(self) -> bool:
        """Ĥ'' is at least 2 of its SEs (of the kind estimators.se names) from 0; False without the explanation."""
        e = self.explain_e
        if e is None:
            return False
        se = e.second_derivative_se_fixed if self.se_kind == "fixed_prompts" else e.second_derivative_se
        return math.isfinite(se) and abs(e.second_derivative) >= 2.0 * se

    def explain_summary(self) -> dict:
        """The explanation's scalars (docs/outputs.md): curvature, the decompositions' closure, the Cui proxy."""
        if self.explain_skipped is not None:
            return {"explain/skipped": self.explain_skipped}
        out: dict = {}
        if self.explain_e is not None:
            e = self.explain_e
            fixed = self.se_kind == "fixed_prompts"
            out.update({"explain/sum_contrib_e": e.sum_contrib, "explain/closure_e": e.closure,
                        "curvature/d2H_deta2": e.second_derivative,
                        "curvature/d2H_deta2_se": e.second_derivative_se_fixed if fixed else e.second_derivative_se,
                        "curvature/d2H_deta2_se_population": e.second_derivative_se,
                        "curvature/d2H_deta2_se_fixed_prompts": e.second_derivative_se_fixed,
                        "curvature/dH_deta": e.first_derivative, "curvature/linear_regime_eta": e.linear_regime_eta,
                        "curvature/resolved": self.curvature_resolved()})
        if self.explain_u is not None:
            x = self.explain_u
            out.update({"explain/delta_h1_base_per_eta": x.base_per_eta, "explain/sum_contrib_u": x.sum_contrib,
                        "explain/closure_u": x.closure, "cui/cov_logp_adv": x.cov_logp_adv,
                        "cui/cov_logp_adv_se": x.cov_logp_adv_se, "cui/cov_logp_pi_adv": x.cov_logp_pi_adv,
                        "cui/cov_logp_pi_adv_se": x.cov_logp_pi_adv_se})
        return out

    def summary(self) -> dict:
        """The run's part of summary.json (keys in docs/outputs.md)."""
        out: dict = {"status": self.final_status(), "sweep": [p.to_dict() for p in self.sweep],
                     "warnings": self.warnings()}
        out["se/kind"] = self.se_kind
        if self.base is not None:
            fixed = self.se_kind == "fixed_prompts"
            out.update({"entropy/base": self.base.entropy,
                        "entropy/base_se": self.base.entropy_se_fixed if fixed else self.base.entropy_se,
                        "entropy/base_se_population": self.base.entropy_se,
                        "entropy/base_se_fixed_prompts": self.base.entropy_se_fixed,
                        "entropy/base_naive": self.base.entropy_naive, "se/num_groups": self.base.num_groups})
        if self.update is not None:
            out.update({"update/grad_norm": self.update.grad_norm, "update/clip_coef": self.update.clip_coef,
                        "update/u_norm": self.update.u_norm})
            stats = self.update.normalisers
            if hasattr(stats, "reward_mean"):  # GRADE: its relaxed rollouts of U (update.grade.GradeStats)
                out.update({"update/grade_reward_mean": stats.reward_mean, "update/grade_kl_mean": stats.kl_mean})
        if self.delta_h1 is not None:  # set once the δH₁ phase finished, so an interrupted run keeps it
            out["delta_h1/per_eta"] = self.delta_h1.per_eta
            out["delta_h1/per_eta_se"] = self.delta_h1_per_eta_se()
            out["delta_h1/per_eta_se_population"] = self.delta_h1.per_eta_se
            out["delta_h1/per_eta_se_fixed_prompts"] = (self.explain_e.delta_h1_se_fixed if self.explain_e
                                                        else float("nan"))
            if self.delta_h1.ustat_per_eta is not None:
                out["delta_h1/ustat_per_eta"] = self.delta_h1.ustat_per_eta
            out.update(self.explain_summary())
        if self.sampler_scorer_gap is not None:
            out["check/sampler_scorer_gap"] = self.sampler_scorer_gap
        if self.sampler is not None:
            out.update(self.sampler.summary())
        out["restore/verified"] = self.restore_verified
        out["restore/verified_ranks"] = list(self.restore_verified_ranks)
        out["provenance/phase_seconds"] = dict(self.phase_seconds)
        if self.memory_phases is not None:
            out["memory/phases"] = self.memory_phases
        return out


MIN_GROUPS_FOR_SE = 30


def warn_if_few_groups(num_groups: int) -> None:
    """Standard errors rest on E's prompt groups; with few of them the SE itself is a noisy estimate."""
    if num_groups < MIN_GROUPS_FOR_SE:
        log.warning("standard errors rest on %d prompt groups (sampling.B_E): below ~%d the SE itself is noisy "
                    "(per-group contributions are heavy-tailed; in the probe's exact-enumeration check at 20 groups "
                    "the SE of δH₁ varied 25-fold between seeds), so read ±SE as rough and use t-quantiles with "
                    "%d degrees of freedom, or raise sampling.B_E.", num_groups, MIN_GROUPS_FOR_SE,
                    max(num_groups - 1, 1))
