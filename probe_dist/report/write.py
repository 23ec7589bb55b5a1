"""Results on disk (rank 0 only): summary.json, the per-sequence table, plots, and the console table.

Files are written to a temporary name and renamed, so a failed run never leaves a half-written summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(out_dir: Path, summary: dict) -> Path:
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n")
    return path


def write_table(out_dir: Path, rows: list[dict], fmt: str = "jsonl") -> Path:
    if fmt == "parquet":
        try:
            import pandas as pd

            path = out_dir / "sequences.parquet"
            pd.DataFrame(rows).to_parquet(path)
            return path
        except ImportError:
            log.warning("parquet needs pandas + pyarrow; writing JSONL instead")
    path = out_dir / "sequences.jsonl"
    atomic_write_text(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))
    return path


def write_plot(out_dir: Path, summary: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no plot: matplotlib is not installed (pip install -e '.[plots]')")
        return None
    sweep = [s for s in summary.get("sweep", []) if s["eta"] > 0]
    if not sweep:
        return None
    etas = [s["eta"] for s in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(etas, [s["delta_h_true"] for s in sweep], yerr=[s["delta_h_true_se"] or 0 for s in sweep],
                marker="o", label="ΔH_true (SNIS)")
    ax.errorbar(etas, [s["delta_h1"] for s in sweep], yerr=[s["delta_h1_se"] or 0 for s in sweep],
                marker="s", linestyle="--", label="δH₁ (first order)")
    ax.set_xscale("log")
    ax.set_xlabel("η (learning rate)")
    ax.set_ylabel("entropy change (nats)")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "delta_h.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def console_table(summary: dict) -> str:
    lines = [f"entropy H(θ) = {summary['entropy/base']:.6g} ± {summary['entropy/base_se']:.2g}"
             f"   (naive {summary['entropy/base_naive']:.6g})   status: {summary['status']}",
             f"{'eta':>10} {'dH_true':>13} {'±se':>9} {'dH1':>13} {'±se':>9} {'ESS/N':>7} {'khat':>6} {'KL':>9}"]
    for s in summary["sweep"]:
        def f(x, spec):
            if isinstance(x, float) and math.isfinite(x):
                return format(x, spec)
            return format("nan", ">" + "".join(ch for ch in spec if ch.isdigit() or ch == ".").split(".")[0])
        lines.append(f"{s['eta']:>10.3g} {f(s['delta_h_true'], '+13.5e')} {f(s['delta_h_true_se'], '9.2e')} "
                     f"{f(s['delta_h1'], '+13.5e')} {f(s['delta_h1_se'], '9.2e')} {f(s['ess_frac'], '7.3f')} "
                     f"{f(s['khat'], '6.2f')} {f(s['kl'], '9.2e')}")
    lines.append(f"restore verified on all ranks: {summary['restore/verified']}")
    return "\n".join(lines)
