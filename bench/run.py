"""Where a whole probe run spends its time: seconds per phase of `python -m probe_dist.main`, against another
revision of the code on the same machine, and as the batches grow.

    python bench/run.py [--out bench/results/run_cpu.json] [--baseline REF] [--repeats 2] [--threads 1]
    python bench/run.py --scale [--out bench/results/run_scale_cpu.json]      # + a log-log plot next to the JSON
    python bench/run.py --model qwen2-cpu [--baseline REF] [--scale]          # a random Qwen2 with a real-sized head
    python bench/run.py --gpu [--scale]                                        # one CUDA device, the RLP workload

Every run is `python -m probe_dist.main` in a subprocess, as a user runs it, and its seconds come from the run's own
summary.json (`provenance/phase_seconds`: sample, score_base, update_gradient, delta_h1, explain, sweep) plus the
process's wall time (imports, loading and writing included).

- default: the README demo (configs/toy_cpu.yaml: the toy checkpoint, E 16 × 4, U 8 × 4, 4 η). With
  `--baseline REF` (a git revision, e.g. a commit before a speed change) the same config also runs with REF's
  code (`git archive` into a temporary folder, put first on PYTHONPATH), alternating new and old `--repeats` times
  on this machine, back to back; the JSON holds both, best of the repeats per phase, and new / old per phase.
- `--scale`: B_E ∈ {16, 64, 256} at B_U = 8, and B_U ∈ {8, 32} at B_E = 16 (G 4 for both, η ∈ {0, 1e-4}); per phase, the
  slope of log(seconds) on log(sequences the phase processes) by least squares (1 = linear in its batch; below 1,
  fixed costs still weigh), and a PNG plot of seconds against sequences per phase next to the JSON.
- `--model qwen2-cpu`: the same comparison (or --scale) with the default estimators (the explanation on) at
  E 16 × 4, U 8 × 4, 32 new tokens, η ∈ {0, 1e-4}, on bench/throughput.py's random Qwen2 (V 32768, hidden 256,
  4 layers, LoRA r 8; built here): a model whose output head is about two thirds of each token's multiply-adds
  (heavier than on real small models; the toy's costs are fixed per pass).
- `--gpu`: device=cuda on bench/throughput.py's GPU model (a random-weight Qwen2.5-1.5B-shaped checkpoint, LoRA r 64
  on every projection; built here, nothing downloaded) at the RLP workload: E 2048 × 1, U 64 × 8, η ∈ {0, 1e-5},
  200 new tokens, memory.auto_microbatch, the explanation on (the default run). The goal stated for it is the whole
  run in ≤ 10 min on one H100; with --scale, B_E ∈ {256, 1024, 2048} and B_U ∈ {16, 64}.

--smoke (CI: seconds, so the bench cannot rot): a tiny random Qwen2 from config, E/U of 2-4 prompts × 2, the scale
fit over three points and, inside a git checkout, `--baseline HEAD`; the same JSON schema; exits 1 when a number is
not finite or a run did not complete. --out defaults to a temporary file and may not point into bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import memory as bench_memory  # noqa: E402  (bench/memory.py: the smoke helpers, the model builders, versions)
import torch  # noqa: E402

PHASES = ("sample", "score_base", "update_gradient", "delta_h1", "explain", "sweep")
DEMO = ["--config", str(REPO / "configs" / "toy_cpu.yaml")]
SCALE_E, SCALE_U, SCALE_G = (16, 64, 256), (8, 32), (4, 4)


def probe_run(code: Path, work: Path, overrides: list[str], *, threads: int) -> dict:
    """One `python -m probe_dist.main` with the package at `code` (a checkout's root) first on PYTHONPATH; its
    phase seconds, wall seconds and status. Raises RuntimeError with the run's stderr tail when it fails."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work)) / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "probe_dist.main", *overrides, f"output.dir={out}", "output.plots=false",
                           "--quiet"], cwd=str(work), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"probe run failed (exit {proc.returncode}, code at {code}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    seconds = summary.get("provenance/phase_seconds") or {}
    return {"status": summary["status"], "wall_seconds": wall,
            "phase_seconds": {p: float(seconds[p]) for p in PHASES if p in seconds},
            "delta_h1_per_eta": summary.get("delta_h1/per_eta")}


def best(runs: list[dict]) -> dict:
    """Per phase (and wall time) the smallest of the repeats: the least-disturbed measurement of each."""
    phases = {p: min(r["phase_seconds"][p] for r in runs) for p in runs[0]["phase_seconds"]}
    return {"status": runs[0]["status"], "wall_seconds": min(r["wall_seconds"] for r in runs), "phase_seconds": phases,
            "delta_h1_per_eta": runs[0]["delta_h1_per_eta"], "repeats": len(runs)}


def export_revision(ref: str, work: Path) -> Path:
    """`git archive REF` of this repository unpacked under `work` (its probe_dist/ importable from there)."""
    dest = work / f"rev-{ref.replace('/', '_')}"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def compare(overrides: list[str], work: Path, *, baseline: str | None, repeats: int, threads: int) -> dict:
    """The config with this checkout's code (and REF's, alternating), best of `repeats` each."""
    old_code = export_revision(baseline, work) if baseline else None
    new_runs, old_runs = [], []
    for _ in range(repeats):
        new_runs.append(probe_run(REPO, work, overrides, threads=threads))
        if old_code is not None:
            old_runs.append(probe_run(old_code, work, overrides, threads=threads))
    out = {"overrides": overrides, "new": best(new_runs)}
    if old_code is not None:
        new, old = out["new"], best(old_runs)
        out.update({"baseline": baseline, "old": old,
                    "new_over_old": {p: new["phase_seconds"][p] / old["phase_seconds"][p]
                                     for p in new["phase_seconds"] if old["phase_seconds"].get(p)},
                    "wall_new_over_old": new["wall_seconds"] / old["wall_seconds"]})
    return out


def phase_rows(phase: str, e_rows: int, u_rows: int) -> int:
    """Sequences a phase processes: E's for scoring, δH₁ and each sweep point, U's for the gradient, both for
    sampling and the explanation (which decomposes over E and U)."""
    return {"sample": e_rows + u_rows, "score_base": e_rows, "update_gradient": u_rows, "delta_h1": e_rows,
            "explain": e_rows + u_rows, "sweep": e_rows}[phase]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(y) on log(x) over points with distinct x (NaN with fewer than two)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return float("nan")
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def scale(base: list[str], work: Path, *, e_sizes, u_sizes, groups: tuple[int, int], threads: int) -> dict:
    """B_E over e_sizes at B_U = u_sizes[0], and B_U over u_sizes at B_E = e_sizes[0]; per phase the log-log slope
    against the sequences it processes."""
    cells = sorted({(b_e, u_sizes[0]) for b_e in e_sizes} | {(e_sizes[0], b_u) for b_u in u_sizes})
    g_e, g_u = groups
    runs = []
    for b_e, b_u in cells:
        r = probe_run(REPO, work, [*base, f"sampling.B_E={b_e}", f"sampling.G_E={g_e}", f"sampling.B_U={b_u}",
                                   f"sampling.G_U={g_u}", "estimators.etas=[0,1e-4]"], threads=threads)
        runs.append({"B_E": b_e, "G_E": g_e, "B_U": b_u, "G_U": g_u, **r})
    slopes = {p: slope([(phase_rows(p, r["B_E"] * g_e, r["B_U"] * g_u), r["phase_seconds"][p]) for r in runs
                        if p in r["phase_seconds"]]) for p in PHASES}
    return {"runs": runs, "slopes": slopes,
            "note": "slope of log(seconds) on log(sequences the phase processes); 1 is linear in its batch"}


def plot_scale(result: dict, path: Path) -> None:
    """seconds against sequences per phase, log-log, with each phase's fitted slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = result["runs"]
    for p in PHASES:
        pts = sorted((phase_rows(p, r["B_E"] * r["G_E"], r["B_U"] * r["G_U"]), r["phase_seconds"][p]) for r in runs
                     if p in r["phase_seconds"])
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{p} (slope {result['slopes'][p]:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequences the phase processes")
    ax.set_ylabel("seconds")
    ax.set_title("probe phases as the batches grow")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gpu_checkpoint(work: Path) -> Path:
    """bench/throughput.py's GPU model: a random-weight Qwen2.5-1.5B-shaped checkpoint (LoRA r 64 on every
    projection, AdamW state) built on CUDA, and its prompt file (400 toy-character prompts)."""
    from throughput import write_prompt_file

    from probe_dist.plan import builtin_model_config

    ckpt = bench_memory.build_random_checkpoint(work / "ckpt", builtin_model_config("qwen2.5-1.5b"),
                                                torch.device("cuda"), lora_r=64, max_new_tokens=200)
    write_prompt_file(ckpt / "prompts.jsonl", 400)
    return ckpt


def cpu_checkpoint(work: Path) -> Path:
    """bench/throughput.py's CPU model (a random-weight Qwen2: V 32768, hidden 256, 4 layers, LoRA r 8; the head is
    about two thirds of each token's multiply-adds) and its prompt file (400 toy-character prompts)."""
    from throughput import write_prompt_file
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    ckpt = bench_memory.build_random_checkpoint(work / "ckpt", config, torch.device("cpu"), lora_r=8, max_new_tokens=32)
    write_prompt_file(ckpt / "prompts.jsonl", 400)
    return ckpt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", default=None, help="JSON output path (default: none; with --smoke a temporary file)")
    parser.add_argument("--baseline", default=None, help="a git revision to compare with, run back to back")
    parser.add_argument("--repeats", type=int, default=2, help="runs per code version (best of, per phase)")
    parser.add_argument("--scale", action="store_true", help="the batch sizes' sweep and its log-log slopes")
    parser.add_argument("--gpu", action="store_true", help="device=cuda, the RLP workload on a 1.5B-shaped model")
    parser.add_argument("--model", choices=("toy", "qwen2-cpu"), default="toy",
                        help="CPU runs: the README demo on the toy checkpoint (default), or the default estimators "
                             "at E 16 × 4, U 8 × 4, 32 new tokens, 2 η on bench/throughput.py's random Qwen2")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process and OMP_NUM_THREADS of each probe run")
    parser.add_argument("--smoke", action="store_true", help="CI: the same bench on a tiny model in seconds")
    args = parser.parse_args(argv)
    if args.gpu and args.smoke:
        parser.error("--smoke is the CPU check of this script; --gpu runs the full GPU workload: choose one")
    if args.model != "toy" and (args.gpu or args.smoke):
        parser.error("--model picks the CPU run's model; --gpu and --smoke bring their own")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a visible CUDA device", file=sys.stderr)
        return 2
    if args.baseline is not None:
        check = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            print(f"error: --baseline {args.baseline!r} is not a commit of the repository at {REPO} (git rev-parse "
                  f"found none{': ' + check.stderr.strip() if check.stderr.strip() else ''}); give a commit hash, "
                  "tag or branch that `git log` shows.", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    e_sizes, u_sizes, groups = SCALE_E, SCALE_U, SCALE_G
    if args.smoke:
        args.out = bench_memory.smoke_out_path(args.out, "run")
        ckpt = bench_memory.build_random_checkpoint(work / "tiny", bench_memory.smoke_model_config(),
                                                    torch.device("cpu"), lora_r=4, max_new_tokens=3)
        base = [f"checkpoint.path={ckpt}", "device=cpu", "sampling.prompts=toy"]
        config = [*base, "sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2",
                  "estimators.etas=[0,1e-4]"]
        args.scale, args.repeats, e_sizes, u_sizes, groups = True, 1, (2, 4), (2, 4), (2, 2)
        if args.baseline is None and (REPO / ".git").exists():
            args.baseline = "HEAD"  # exercises the revision export
    elif args.gpu:
        ckpt = gpu_checkpoint(work)
        base = [f"checkpoint.path={ckpt}", "device=cuda", f"sampling.prompts={ckpt / 'prompts.jsonl'}",
                "sampling.max_new_tokens=200", "memory.auto_microbatch=true",
                "memory.max_trainable_params=80000000"]  # LoRA r = 64 on every projection: 73.9M
        config = [*base, "sampling.B_E=2048", "sampling.G_E=1", "sampling.B_U=64", "sampling.G_U=8",
                  "estimators.etas=[0,1e-5]"]
        e_sizes, u_sizes, groups = (256, 1024, 2048), (16, 64), (1, 8)
    elif args.model == "qwen2-cpu":
        ckpt = cpu_checkpoint(work)
        base = [f"checkpoint.path={ckpt}", "device=cpu", f"sampling.prompts={ckpt / 'prompts.jsonl'}",
                "sampling.max_new_tokens=32"]
        config = [*base, "sampling.B_E=16", "sampling.G_E=4", "sampling.B_U=8", "sampling.G_U=4",
                  "estimators.etas=[0,1e-4]"]
    else:
        base = ["device=cpu"]
        config = DEMO
    result = {"benchmark": "run", "versions": bench_memory.versions(), "smoke": args.smoke, "gpu": args.gpu}
    try:
        if not args.scale or args.smoke or args.baseline:
            result["compare"] = compare(config, work, baseline=args.baseline, repeats=args.repeats,
                                        threads=args.threads)
        if args.scale:
            result["scale"] = scale(base, work, e_sizes=e_sizes, u_sizes=u_sizes, groups=groups, threads=args.threads)
    except RuntimeError as exc:
        print(f"[bench/run] {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        if "scale" in result:
            plot_scale(result["scale"], out.with_suffix(".png"))
    shown = {k: v for k, v in (result.get("compare") or {}).items() if k in ("new_over_old", "wall_new_over_old")}
    if "compare" in result:
        shown["phase_seconds"] = result["compare"]["new"]["phase_seconds"]
    if "scale" in result:
        shown["slopes"] = result["scale"]["slopes"]
    print(json.dumps(shown))
    if not args.smoke:
        return 0
    return bench_memory.check_smoke(result, Path(args.out), "bench/run")


if __name__ == "__main__":
    raise SystemExit(main())
