"""The accuracy figures README.md and docs/ quote, measured on the reader's machine and printed with their keys.

    python bench/accuracy.py [--out bench/results/accuracy_cpu.json] [--toy-seed 0]

Runs the probe on the built-in toy checkpoint (built once and cached like the README's first command) in this
process, one thread unless --threads says otherwise, and prints one line per figure: its key, the value and what
it is. The JSON records the machine (`versions`: CPU model, torch's ATen ISA, cores, versions, date), so a quoted
figure names where it was last measured. Figures:

* demo/*: the README's first command (configs/toy_cpu.yaml) — Ĥ, δH₁, δH₁ + δH₂ and ΔH_true at η = 1e-3 with
  SEs, Ĥ'' and its SE, and both explanation closures (float32 rounding of the exact identities).
* layout/*: the same run with one row per microbatch (memory.microbatch_score=1 memory.microbatch_grad=1): the
  relative change of Ĥ and δH₁/η, and of the small differences (ΔH_true at 1e-4, Ĥ'', the explanation sums).
  Samples are identical (asserted), so what moves is the float32 rounding of other GEMM shapes.
* threads/*: the demo at G_E = 2 with 2 intra-op threads against 1: the relative change of Ĥ.
* route/*: update.route=real_step (a real optimizer.step, fp32 θ') against update_vector (θ + ηu in float64,
  then cast) at η = 1e-5: relative difference of ΔH_true, float32 and float64 forwards.

--smoke (CI: seconds): the same four comparisons on bench/memory.py's tiny random model with tiny batches; exits 1
when a figure is not finite or a run did not complete. --out defaults to a temporary file and may not point into
bench/results/ with --smoke.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import memory as bench_memory  # noqa: E402  (bench/memory.py: the smoke helpers, the model builders, versions)
import torch  # noqa: E402


def run(ckpt: Path | None, overrides: list[str], config: str | None = None) -> tuple[dict, list[dict]]:
    """One probe run in this process: (summary, per-sequence rows as written to sequences.jsonl)."""
    from probe_dist.assemble import build_probe
    from probe_dist.config import load_config
    from probe_dist.runtime.dist import Runtime

    out = Path(tempfile.mkdtemp(prefix="bench-accuracy-")) / "out"
    path = [f"checkpoint.path={ckpt}"] if ckpt is not None else []
    cfg = load_config(config, [*path, "device=cpu", "log_level=warning", f"output.dir={out}",
                               "output.plots=false", *overrides])
    result = build_probe(cfg, Runtime()).run()
    summary = result.summary()
    assert summary["status"] == "completed", summary.get("warnings")
    return summary, result


def _rel(a: float, b: float) -> float:
    """|a − b| / |b| (|a − b| when b = 0)."""
    return abs(a - b) / abs(b) if b else abs(a - b)


def _eta_row(summary: dict, eta: float) -> dict:
    return next(s for s in summary["sweep"] if s["eta"] == eta)


def _same_samples(a, b) -> bool:
    return all([g.responses.tolist() for g in x.groups] == [g.responses.tolist() for g in y.groups]
               for x, y in ((a.batch_e, b.batch_e), (a.batch_u, b.batch_u)))


def figures(ckpt: Path | None, config: str | None, sizes: list[str], threads: int) -> dict:
    """Every figure of the module docstring, keyed as printed."""
    torch.set_num_threads(threads)
    demo_eta, small_eta, step_eta = 1e-3, 1e-4, 1e-5
    etas = f"estimators.etas=[0,{small_eta!r},{demo_eta!r}]"
    demo, demo_res = run(ckpt, [*sizes, etas], config)
    row = _eta_row(demo, demo_eta)
    fig = {"demo/entropy": demo["entropy/base"], "demo/entropy_se": demo["entropy/base_se"],
           "demo/delta_h1_per_eta": demo["delta_h1/per_eta"], "demo/delta_h1_per_eta_se": demo["delta_h1/per_eta_se"],
           "demo/delta_h_true_1e-3": row["delta_h_true"], "demo/delta_h_true_se_1e-3": row["delta_h_true_se"],
           "demo/delta_h1_1e-3": row["delta_h1"], "demo/delta_h1_plus_h2_1e-3": row["delta_h1"] + row["delta_h2"],
           "demo/d2H_deta2": demo["curvature/d2H_deta2"], "demo/d2H_deta2_se": demo["curvature/d2H_deta2_se"],
           "demo/num_groups": demo["se/num_groups"],
           "demo/closure_e": demo["explain/closure_e"], "demo/closure_u": demo["explain/closure_u"]}

    fine, fine_res = run(ckpt, [*sizes, etas, "memory.microbatch_score=1", "memory.microbatch_grad=1"], config)
    assert _same_samples(demo_res, fine_res), "the microbatch layout changed the samples"
    fig["layout/entropy_rel"] = _rel(fine["entropy/base"], demo["entropy/base"])
    fig["layout/delta_h1_per_eta_rel"] = _rel(fine["delta_h1/per_eta"], demo["delta_h1/per_eta"])
    fig["layout/small_differences_rel_max"] = max(
        _rel(_eta_row(fine, small_eta)["delta_h_true"], _eta_row(demo, small_eta)["delta_h_true"]),
        _rel(fine["curvature/d2H_deta2"], demo["curvature/d2H_deta2"]),
        _rel(fine["explain/sum_contrib_e"], demo["explain/sum_contrib_e"]),
        _rel(fine["explain/sum_contrib_u"], demo["explain/sum_contrib_u"]))
    fig["layout/small_differences_abs_max"] = max(
        abs(_eta_row(fine, small_eta)["delta_h_true"] - _eta_row(demo, small_eta)["delta_h_true"]),
        abs(fine["explain/sum_contrib_e"] - demo["explain/sum_contrib_e"]) * small_eta,
        abs(fine["explain/sum_contrib_u"] - demo["explain/sum_contrib_u"]) * small_eta)

    narrow = [*sizes, "sampling.G_E=2", "estimators.etas=[0]", "estimators.explain=false"]
    one, _ = run(ckpt, narrow, config)
    torch.set_num_threads(2)
    two, _ = run(ckpt, narrow, config)
    torch.set_num_threads(threads)
    fig["threads/entropy_rel_2_vs_1"] = _rel(two["entropy/base"], one["entropy/base"])

    for dtype in ("float32", "float64"):
        common = [*sizes, f"estimators.etas=[0,{step_eta!r}]", "estimators.explain=false", f"precision.dtype={dtype}"]
        vector, _ = run(ckpt, [*common, "update.route=update_vector"], config)
        step, _ = run(ckpt, [*common, "update.route=real_step"], config)
        fig[f"route/delta_h_true_rel_1e-5_{dtype}"] = _rel(_eta_row(step, step_eta)["delta_h_true"],
                                                         _eta_row(vector, step_eta)["delta_h_true"])
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output path (default: none; with --smoke a temporary file)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--toy-seed", type=int, default=0, help="the toy checkpoint's seed (default 0, the demo's)")
    parser.add_argument("--smoke", action="store_true", help="CI: the same comparisons on a tiny model in seconds")
    args = parser.parse_args(argv)
    work = None
    if args.smoke:
        args.out = bench_memory.smoke_out_path(args.out, "accuracy")
        work = Path(tempfile.mkdtemp(prefix="bench-accuracy-ckpt-"))
        ckpt = bench_memory.build_random_checkpoint(work / "ckpt", bench_memory.smoke_model_config(),
                                                    torch.device("cpu"), lora_r=2, max_new_tokens=4)
        config, sizes = None, ["sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2",
                               "sampling.max_new_tokens=4"]
    else:
        from probe_dist.toy.checkpoint import ensure_toy_checkpoint

        ckpt = ensure_toy_checkpoint(args.toy_seed)
        config, sizes = str(REPO / "configs" / "toy_cpu.yaml"), []
    fig = figures(ckpt, config, sizes, args.threads)
    result = {"versions": bench_memory.versions(), "threads": args.threads,
              "checkpoint": "smoke model" if args.smoke else f"toy seed {args.toy_seed}",
              "smoke": args.smoke, "figures": fig}
    for key, value in fig.items():
        print(f"{key:40s} {value:.4g}")
    print(f"measured on: {result['versions']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return bench_memory.check_smoke(result, Path(args.out), "bench/accuracy") if args.smoke else 0


if __name__ == "__main__":
    raise SystemExit(main())
