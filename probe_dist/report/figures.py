"""The report's figures (matplotlib, Agg): ΔH_true, δH₁ and δH₁ + δH₂ against η with SE bands (report.html and
delta_h.png), and the importance-sampling diagnostics ESS/N and PSIS k̂ against η (report.html).

Each figure function takes pyplot (or None) and the positive-η sweep and returns a Figure, or a one-line reason
when there is nothing to draw; the caller embeds or saves it. Any number may be None/NaN/±inf (an interrupted run).
"""

from __future__ import annotations

import base64
import io
import math

DPI = 100
KHAT_BAD = 0.7        # PSIS: k̂ above this, do not trust the η (measurement/sweep.py KHAT_UNRELIABLE)


def finite(x) -> bool:
    """Whether x is a finite number (bools excluded)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def as_float(x) -> float:
    """x as a float when it is a finite number (bools excluded), else NaN."""
    return float(x) if finite(x) else math.nan


def positive_sweep(summary: dict) -> list[dict]:
    """The sweep rows with a finite η > 0, in increasing η (what the figures plot on a log axis)."""
    sweep = [s for s in summary.get("sweep") or [] if isinstance(s, dict)]
    return sorted((s for s in sweep if finite(s.get("eta")) and s["eta"] > 0), key=lambda s: s["eta"])


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def png(plt, fig) -> str:
    """The figure as an <img> with a base64 PNG data URI; closes the figure."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def series(sweep: list[dict], key: str) -> list[float]:
    """The values of `key` in the sweep rows, as floats (NaN where missing or not a finite number)."""
    return [as_float(s.get(key)) for s in sweep]


def entropy_change_figure(plt, sweep: list[dict], summary: dict):
    """ΔH_true, δH₁ and δH₁ + δH₂ against η (log axis) with ±1 SE bands and the resolved linear-regime η: the
    figure of report.html and of delta_h.png. sweep: `positive_sweep(summary)`. Returns a matplotlib Figure, or a
    string saying why there is none."""
    if plt is None:
        return "figure left out: matplotlib is not installed"
    if not sweep:
        return "figure left out: no η > 0 in the sweep"
    etas = [s["eta"] for s in sweep]
    true, true_se = series(sweep, "delta_h_true"), series(sweep, "delta_h_true_se")
    d1, d1_se = series(sweep, "delta_h1"), series(sweep, "delta_h1_se")
    d2, d2_se = series(sweep, "delta_h2"), series(sweep, "delta_h2_se")
    second = [a + b for a, b in zip(d1, d2)]   # NaN wherever δH₂ (or δH₁) is not finite
    second_se = [math.sqrt(a * a + b * b) for a, b in zip(d1_se, d2_se)]
    if not any(math.isfinite(v) for v in true + d1):
        return "figure left out: no finite ΔH_true or δH₁ at η > 0"
    fig, ax = plt.subplots(figsize=(6.5, 4))

    def draw(values, ses, label, color, **style):
        lo = [v - s for v, s in zip(values, ses)]
        hi = [v + s for v, s in zip(values, ses)]
        ax.fill_between(etas, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(etas, values, color=color, label=label, **style)

    draw(true, true_se, "ΔH_true (SNIS) ± 1 SE", "C0", marker="o")
    draw(d1, d1_se, "δH₁ (first order) ± 1 SE", "C1", linestyle="--")
    if any(math.isfinite(v) for v in second):
        draw(second, second_se, "δH₁ + δH₂ (second order) ± 1 SE", "C2", linestyle=":")
    linear = summary.get("curvature/linear_regime_eta")
    if finite(linear) and etas[0] <= linear <= etas[-1] and summary.get("curvature/resolved") is True:
        ax.axvline(linear, color="grey", linestyle="--", linewidth=1, label="first order within 10%")
    eta_train = summary.get("eta_train")
    if finite(eta_train) and eta_train > 0:
        ax.axvline(eta_train, color="C3", linestyle="-.", linewidth=1, label="eta_train (next training step's lr)")
    ax.set_xscale("log")
    ax.set_xlabel("η (learning rate)")
    ax.set_ylabel("entropy change (entropy units)")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def diagnostics_figure(plt, sweep: list[dict]):
    """ESS/N and the PSIS k̂ (reliable and unreliable marked, with the thresholds) against η: the second figure of
    report.html. sweep: `positive_sweep(summary)`. Returns a matplotlib Figure, or a one-line reason (a str) when
    there is nothing to draw or no matplotlib."""
    if plt is None:
        return "figure left out: matplotlib is not installed"
    if not sweep:
        return "figure left out: no η > 0 in the sweep"
    etas = [s["eta"] for s in sweep]
    ess, khat = series(sweep, "ess_frac"), series(sweep, "khat")
    if not any(math.isfinite(v) for v in ess + khat):
        return "figure left out: no finite ESS/N or k̂ at η > 0"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(etas, ess, color="C0", marker="o", label="ESS/N")
    ax.set_xscale("log")
    ax.set_xlabel("η (learning rate)")
    ax.set_ylabel("ESS/N")
    ak = ax.twinx()
    reliable = [s.get("khat_reliable") is True for s in sweep]
    good = [(x, k) for x, k, ok in zip(etas, khat, reliable) if ok and math.isfinite(k)]
    noisy = [(x, k) for x, k, ok in zip(etas, khat, reliable) if not ok and math.isfinite(k)]
    if good:
        ak.plot(*zip(*good), color="C3", marker="s", linestyle="none", label=r"$\hat{k}$ (PSIS)")
    if noisy:
        ak.plot(*zip(*noisy), marker="s", linestyle="none", markerfacecolor="none", markeredgecolor="grey",
                label=r"$\hat{k}$ unreliable (N < 100 or ESS/N ≥ 0.99)")
    ak.axhline(KHAT_BAD, color="C3", linestyle="--", linewidth=1,
               label=r"$\hat{k}$ = 0.7: above it, ΔH_true is not to be trusted")
    thresholds = sorted({round(t, 3) for t in series(sweep, "khat_threshold") if math.isfinite(t)})
    if len(thresholds) > 3:
        thresholds = thresholds[:1]   # one line per N; more than a few distinct N: show the strictest
    for t in thresholds:
        if t != KHAT_BAD:
            ak.axhline(t, color="C3", linestyle=":", linewidth=1,
                       label=rf"$\hat{{k}}$ threshold min(1 − 1/log₁₀N, 0.7) = {t:.3g}")
    ak.set_ylabel(r"Pareto $\hat{k}$")
    finite_k = [k for k in khat if math.isfinite(k)] + thresholds + [KHAT_BAD]
    limits = (min(-0.05, min(finite_k) - 0.05), max(1.05, max(finite_k) + 0.05))   # k̂ may be negative or > 1
    ax.set_ylim(*limits)   # one scale for both axes, so each line reads the same against either
    ak.set_ylim(*limits)
    handles, labels = ax.get_legend_handles_labels()
    more_h, more_l = ak.get_legend_handles_labels()
    # Below the axes: inside, "best" would only avoid ESS/N (the left axis' artists), not the k̂ points.
    ax.legend(handles + more_h, labels + more_l, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15),
              ncol=2)
    return fig
