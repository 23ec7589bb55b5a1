"""Results on disk (rank 0 only): summary.json, the per-sequence table, plots, and the console table.

The writers write into the run's staging directory, which main() publishes as a whole (`report/publish.py`): a
file is never written into output.dir itself, so no writer needs temporary names of its own.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from probe_dist.report.figures import finite

log = logging.getLogger("probe_dist")


def _clean(obj):
    """JSON-safe: NaN/inf become None (strict JSON), tensors become lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_summary(out_dir: Path, summary: dict) -> Path:
    """Write `summary` to out_dir/summary.json (strict JSON, indent 2: NaN/±inf become null, tensors lists);
    returns the path."""
    path = out_dir / "summary.json"
    path.write_text(json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_table(out_dir: Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    """Write the per-sequence rows to out_dir/sequences.jsonl (NaN/±inf → null), or to sequences.parquet with
    fmt="parquet" — JSONL, with a warning, when pandas or pyarrow is missing. Returns the path written."""
    if fmt == "parquet":
        try:
            import pandas as pd

            path = out_dir / "sequences.parquet"
            pd.DataFrame(rows).to_parquet(path)
            return path
        except ImportError:
            log.warning("parquet needs pandas + pyarrow; writing JSONL instead")
    path = out_dir / "sequences.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(_clean(r)) + "\n")
    return path


def write_plot(out_dir: Path, summary: dict) -> Path | None:
    """delta_h.png: report.html's entropy-change figure (ΔH_true, δH₁, δH₁ + δH₂ against η) as a file; None when
    the sweep has no η > 0."""
    from probe_dist.report.figures import entropy_change_figure, positive_sweep, pyplot

    plt = pyplot()
    fig = entropy_change_figure(plt, positive_sweep(summary), summary)
    if isinstance(fig, str):
        log.info("no delta_h.png: %s", fig)
        return None
    path = out_dir / "delta_h.png"
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _num(x, spec: str) -> str:
    """`x` formatted with `spec`, or "nan" (NaN, ±inf, None, missing) right-aligned to the spec's width."""
    if finite(x):
        return format(float(x), spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return format("nan", ">" + width)


# Scalars shown under the entropy line when present, in this order: (key, label, SE key or None, format).
_SCALARS = (
    ("update/grad_norm", "update: |grad L|", None, ".4g"),
    ("update/grade_reward_mean", "update: GRADE mean reward r_phi", None, ".4g"),
    ("update/grade_kl_mean", "update: GRADE mean sequence KL", None, ".4g"),
    ("update/u_norm", "update: |u|", None, ".4g"),
    ("delta_h1/per_eta", "dH1/eta", "delta_h1/per_eta_se", ".6g"),
    ("delta_h1/ustat_per_eta", "dH1/eta (U-statistic)", None, ".6g"),
    ("explain/delta_h1_base_per_eta", "dH1/eta from momentum+decay (rest: sum over U sequences)", None, ".6g"),
    ("curvature/d2H_deta2", "d2H/deta2", "curvature/d2H_deta2_se", ".6g"),
    ("curvature/linear_regime_eta", "first order within 10% up to eta (if curvature/resolved)", None, ".3g"),
    ("cui/cov_logp_adv", "Cui proxy Cov(log pi, A) on U", "cui/cov_logp_adv_se", ".4g"),
)
_SWEEP_COLUMNS = (("delta_h_true", "+13.5e"), ("delta_h_true_se", "9.2e"), ("delta_h1", "+13.5e"),
                  ("delta_h1_se", "9.2e"), ("ess_frac", "7.3f"), ("khat", "6.2f"), ("kl", "9.2e"))


def console_table(summary: dict) -> str:
    """The console summary: Ĥ ± SE, status, the update and prediction scalars, one line per η, the restore check,
    and the summary's warnings (flagged η rows included).

    Prints whatever the summary holds: an interrupted run may lack any key (Ĥ before base scoring, u before the
    gradient, δH₁ unless completed), and any number may be None/NaN; missing values show as "nan" or are left out.
    """
    status = summary.get("status", "unknown")
    if "entropy/base" in summary or "entropy/base_se" in summary:
        head = f"entropy H(θ) = {_num(summary.get('entropy/base'), '.6g')} ± {_num(summary.get('entropy/base_se'), '.2g')}"
        if "entropy/base_naive" in summary:
            head += f"   (naive {_num(summary.get('entropy/base_naive'), '.6g')})"
        if summary.get("se/kind") == "fixed_prompts":
            head += "   [SEs conditional on E's prompts]"
    else:
        head = "entropy H(θ): not computed"
    lines = [f"{head}   status: {status}"]
    for key, label, se_key, spec in _SCALARS:
        if key in summary:
            se = f" ± {_num(summary.get(se_key), '.2g')}" if se_key and se_key in summary else ""
            lines.append(f"{label} = {_num(summary[key], spec)}{se}")
    sweep = [s for s in summary.get("sweep") or [] if isinstance(s, dict)]
    if sweep:
        lines.append(f"{'eta':>10} {'dH_true':>13} {'±se':>9} {'dH1':>13} {'±se':>9} {'ESS/N':>7} {'khat':>6} "
                     f"{'KL':>9}")
        eta_train = summary.get("eta_train")
        for s in sweep:
            mark = "  <- eta_train (the next training step's lr)" if eta_train and s.get("eta") == eta_train else ""
            lines.append(" ".join([_num(s.get("eta"), "10.3g")] + [_num(s.get(k), spec) for k, spec in _SWEEP_COLUMNS])
                         + mark)
    else:
        lines.append("sweep: no η completed")
    if summary.get("explain/skipped"):
        lines.append(f"explanation: {summary['explain/skipped']}")
    if "restore/verified" in summary:
        lines.append(f"restore verified on all ranks: {summary['restore/verified']}")
    def listed(x) -> list:
        return list(x) if isinstance(x, list | tuple) else []

    if "warnings" in summary:  # they include the flagged η rows
        warnings = listed(summary["warnings"])
    else:
        warnings = [f"η = {s.get('eta')}: {flag}" for s in sweep for flag in listed(s.get("flags"))]
    lines.extend(f"warning: {w}" for w in warnings)
    return "\n".join(lines)
