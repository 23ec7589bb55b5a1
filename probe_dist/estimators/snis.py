"""ΔH_true(η) by self-normalised importance sampling on the E samples (docs/method.md §6). Pure float64 functions.

Two-phase so the runtime can all-reduce between them: local sums → (global sums) → finalize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def log_weights(logp_new: torch.Tensor, logp_old: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """log w_i = S_i(θ') − S_i(θ) (float64), optionally clipped from above."""
    lw = logp_new.to(torch.float64) - logp_old.to(torch.float64)
    return lw.clamp(max=clip) if clip is not None else lw


# Layout of the local SNIS sums vector that is all-reduced (SUM) across ranks.
SNIS_SUM_FIELDS = ("sum_w", "sum_w2", "sum_w_h", "sum_w_lam", "sum_neg_logw", "sum_k3", "count", "clipped",
                   "sum_h_old", "sum_lam_old", "sum_v")


def snis_local_sums(log_w: torch.Tensor, global_max: float, h_new: torch.Tensor, lam: torch.Tensor, *,
                    clipped: torch.Tensor | None = None, h_old: torch.Tensor | None = None,
                    v: torch.Tensor | None = None) -> torch.Tensor:
    """[Σw, Σw², Σw·h', Σw·λ, Σ(−log w), Σ(w̃ − 1 − log w̃), N, #clipped, Σ1·h, Σ1·λ], w = exp(log w − global max).

    The last two are Ĥ(θ)'s sums formed by exactly the operations that form Σw·h' and Σw·λ (h_old: the payload at
    θ; default h_new), so at η = 0 — w ≡ 1 and h' = h bit for bit — Ĥ(θ') − Ĥ(θ) is exactly 0 whatever the
    summation order elsewhere (measured: Ĥ(θ) summed group by group was 1 ulp off at τ = 0.05).

    log_w, h_new, lam: [N] float64 per sequence (log w in nats, h' the payload total, λ = T_i or 1); global_max: the
    all-reduced max of log w; clipped: optional [N] bool mask of clipped weights. Returns [10] float64 laid out
    as SNIS_SUM_FIELDS. Raises nothing itself (torch raises on shape mismatch). v: the sampler weights of an
    external sampler (docs/method.md §13; h_new, lam, h_old already carry them): the KL means are v-weighted,
    Σv(−log w)/Σv, so they estimate KL under π_θ, not under the sampler; default 1 (Σv = N).

    The KL(θ‖θ') estimates use the unstabilised weights w̃ = e^{log w} on samples from θ: k1 = mean(−log w),
    k3 = mean(w̃ − 1 − log w̃) (non-negative, lower variance).
    """
    w = torch.exp(log_w - global_max)
    k3 = torch.expm1(log_w) - log_w
    n_clip = float(clipped.sum()) if clipped is not None else 0.0
    one = torch.ones_like(w)
    h_old = h_new if h_old is None else h_old
    v = one if v is None else v.to(torch.float64)
    return torch.stack([w.sum(), (w * w).sum(), (w * h_new).sum(), (w * lam).sum(), (v * -log_w).sum(),
                        (v * k3).sum(), torch.tensor(float(log_w.numel()), dtype=torch.float64),
                        torch.tensor(n_clip, dtype=torch.float64), (one * h_old).sum(),
                        (one * lam).sum(), v.sum()]).to(torch.float64)


@dataclass
class SnisResult:
    """What `snis_finalize` returns for one η (plain floats, global over ranks): Ĥ(θ') (entropy_new, nats per
    token or per sequence as Ĥ), ΔH_true = Ĥ(θ') − Ĥ(θ) (delta), the Kish ESS and ESS/N, the largest
    self-normalised weight, the KL(θ‖θ') estimates k1 and k3 (nats), and the share of clipped log-weights."""

    entropy_new: float
    delta: float
    ess: float
    ess_frac: float
    max_weight: float
    kl_k1: float
    kl_k3: float
    clip_frac: float


def snis_finalize(sums: torch.Tensor, entropy: float) -> SnisResult:
    """Ĥ(θ') = Σw h'/Σw λ, ΔH_true = Ĥ(θ') − Ĥ(θ) (Ĥ(θ) from the sums formed like Ĥ(θ')'s; `entropy`, the
    reported Ĥ(θ), only when they are absent), Kish ESS, max normalised weight, KL estimates."""
    s = dict(zip(SNIS_SUM_FIELDS, sums.tolist()))
    h_new = s["sum_w_h"] / s["sum_w_lam"]
    h_old = s["sum_h_old"] / s["sum_lam_old"] if s["sum_lam_old"] > 0 else entropy  # Ĥ(θ) in the same order
    ess = s["sum_w"] ** 2 / s["sum_w2"]
    n = s["count"]
    return SnisResult(entropy_new=h_new, delta=h_new - h_old, ess=ess, ess_frac=ess / n,
                      # the largest stabilised weight is exactly 1 (global max subtracted)
                      max_weight=1.0 / s["sum_w"], kl_k1=s["sum_neg_logw"] / s["sum_v"],
                      kl_k3=s["sum_k3"] / s["sum_v"],
                      clip_frac=s["clipped"] / n)


def snis_delta_influence(w: torch.Tensor, h_new: torch.Tensor, h_old: torch.Tensor, lam: torch.Tensor, *,
                         group_ids: torch.Tensor, num_groups: int, entropy_new: float, entropy: float,
                         sum_w_lam: float, sum_lam: float) -> torch.Tensor:
    """Per-group c_p = Σ_{i∈p} [ w_i (h'_i − Ĥ(θ') λ_i)/Σwλ − (h_i − Ĥ(θ) λ_i)/Σλ ] (docs/method.md §6), local groups.

    w, h_new, h_old, lam: [N] float64 per sequence (w the stabilised weights, h in nats); group_ids: [N] long in
    [0, num_groups); entropy_new, entropy: Ĥ(θ'), Ĥ(θ) in nats; sum_w_lam, sum_lam: the global Σwλ, Σλ.
    Returns [num_groups] float64 on the CPU. Raises nothing itself (torch raises on shape/device mismatch)."""
    per_seq = snis_sequence_influence(w, h_new, h_old, lam, entropy_new=entropy_new, entropy=entropy,
                                      sum_w_lam=sum_w_lam, sum_lam=sum_lam)
    return torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_ids, per_seq)


def snis_sequence_influence(w: torch.Tensor, h_new: torch.Tensor, h_old: torch.Tensor, lam: torch.Tensor, *,
                            entropy_new: float, entropy: float, sum_w_lam: float, sum_lam: float) -> torch.Tensor:
    """Per-sequence w_i (h'_i − Ĥ(θ') λ_i)/Σwλ − (h_i − Ĥ(θ) λ_i)/Σλ: [N] float64 (inputs as snis_delta_influence);
    group sums are the c_p of §6, within-prompt deviations give the fixed-prompt SE (§9)."""
    return w * (h_new - entropy_new * lam) / sum_w_lam - (h_old - entropy * lam) / sum_lam
