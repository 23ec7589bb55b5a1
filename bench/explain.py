"""Cost of the explanation pass (estimators.explain) against the δH₁ pass, measured in one process.

    python bench/explain.py [--out bench/results/explain_cpu.json] [--threads 2] [--device cpu|cuda]

Builds a random-weight Qwen2-shaped checkpoint (bench/memory.py's builder: LoRA on every projection, a synthetic
AdamW state) and runs the probe twice on it in this process — estimators.explain on and off, same seed — and
writes each phase's wall time, the ratio explain/δH₁ and the model passes they stand for. CPU (default): vocabulary
4096, hidden 256, 4 layers, B_E = B_U = 8 × 4, 32 new tokens. With --device cuda (a GPU machine): the Qwen2.5-1.5B
shape, LoRA r = 64, B_E = 64 × 8, B_U = 16 × 8, 200 new tokens, memory.profile on (peak bytes per phase).

What to expect: without the explanation the δH₁ phase is one first-order forward-mode pass over E; with it, δH₁
is read off the explanation's nested pass over E (so the δH₁ phase holds the second order too), and the explain
phase is ∇Ĥ's forward and backward over E plus a first-order pass over U. `explain_over_delta_h1` compares the two
phases of the run with the explanation; `explain_added_over_delta_h1` is what the explanation adds to the
prediction's seconds, (δH₁ + explain with it − δH₁ without) / δH₁ without. On small models the per-operation
overhead of torch.func dominates and the ratios are larger.

--smoke (CI: seconds, so the bench cannot rot): the same two probe runs on bench/memory.py's smoke model
(vocabulary 256, hidden 32, 2 layers, LoRA r = 2), B_E = B_U = 2 × 2, 8 new tokens, one thread; the same JSON
schema; --out defaults to a temporary file and may not point into bench/results/; exits 1 when a number in the
result is not finite, a run's status is not "completed" or the explanation phase did not run. GPU: --smoke is the
CPU configuration only; --smoke --device cuda is refused (exit 2) and the cuda configuration is unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def run(ckpt: Path, device: str, overrides: list[str]) -> dict:
    from probe_dist.assemble import build_probe
    from probe_dist.config import load_config
    from probe_dist.runtime.dist import Runtime

    cfg = load_config(None, [f"checkpoint.path={ckpt}", f"device={device}", "log_level=warning",
                             f"output.dir={tempfile.mkdtemp(prefix='bench-explain-')}", *overrides])
    probe = build_probe(cfg, Runtime())
    start = time.perf_counter()
    summary = probe.run().summary()
    out = {"seconds": time.perf_counter() - start, "phase_seconds": dict(probe.clock.seconds),
           "status": summary["status"], "closure_e": summary.get("explain/closure_e"),
           "closure_u": summary.get("explain/closure_u")}
    if "memory/phases" in summary:
        out["memory"] = summary["memory/phases"][0]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output path (default: none; with --smoke a temporary file)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; with --smoke 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="CI: the same bench on a tiny model in seconds")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.smoke else 2
    torch.set_num_threads(args.threads)
    import transformers

    if args.smoke:
        if args.device == "cuda":
            print("error: --smoke is the CPU configuration; run --device cuda without --smoke", file=sys.stderr)
            return 2
        args.out = bench_memory.smoke_out_path(args.out, "explain")
    work = Path(tempfile.mkdtemp(prefix="bench-explain-ckpt-"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda needs CUDA", file=sys.stderr)
            return 2
        from probe_dist.plan import builtin_model_config

        config, lora_r, new_tokens = builtin_model_config("qwen2.5-1.5b"), 64, 200
        sizes = ["sampling.B_E=64", "sampling.G_E=8", "sampling.B_U=16", "sampling.G_U=8", "memory.profile=true",
                 "memory.microbatch_score=8", "memory.microbatch_grad=8"]
    elif args.smoke:
        config, lora_r, new_tokens = bench_memory.smoke_model_config(), 2, 8
        sizes = ["sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2",
                 "memory.microbatch_score=2", "memory.microbatch_grad=2"]
    else:
        config = transformers.Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, tie_word_embeddings=True)
        lora_r, new_tokens = 8, 32
        sizes = ["sampling.B_E=8", "sampling.G_E=4", "sampling.B_U=8", "sampling.G_U=4",
                 "memory.microbatch_score=4", "memory.microbatch_grad=4"]
    ckpt = bench_memory.build_random_checkpoint(work / "ckpt", config, torch.device(args.device), lora_r=lora_r,
                                                max_new_tokens=new_tokens)
    common = [*sizes, f"sampling.max_new_tokens={new_tokens}", "estimators.etas=[0,1e-5]"]
    with_explain = run(ckpt, args.device, [*common, "estimators.explain=true"])
    without = run(ckpt, args.device, [*common, "estimators.explain=false"])
    d1, ex = with_explain["phase_seconds"]["delta_h1"], with_explain["phase_seconds"].get("explain")
    result = {"device": args.device, "threads": args.threads, "model": config.to_dict(), "lora_r": lora_r,
              "overrides": common, "with_explain": with_explain, "without_explain": without,
              "explain_over_delta_h1": ex / d1 if ex and d1 else None,
              # what the explanation adds to the prediction, against δH₁ alone (the run without it): with it on, the
              # δH₁ phase is the explanation's nested pass (first and second order at once)
              "explain_added_over_delta_h1": ((d1 + ex - without["phase_seconds"]["delta_h1"])
                                              / without["phase_seconds"]["delta_h1"] if ex and d1 else None),
              "run_seconds_ratio": with_explain["seconds"] / without["seconds"],
              "passes_per_microbatch": {
                  "delta_h1 (explain off)": "first-order jvp over E",
                  "delta_h1 (explain on)": "nested jvp over E (the body twice; head and softmax in closed form)",
                  "explain": "forward + backward over E (∇Ĥ), first-order jvp over U"},
              "versions": bench_memory.versions()}
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("explain_over_delta_h1", "explain_added_over_delta_h1",
                                             "run_seconds_ratio")}))
    if not args.smoke:
        return 0
    shutil.rmtree(work, ignore_errors=True)
    if result["explain_over_delta_h1"] is None:
        print("[bench/explain] smoke failure: no explain or delta_h1 phase time", file=sys.stderr)
        return 1
    return bench_memory.check_smoke(result, Path(args.out), "bench/explain")


if __name__ == "__main__":
    raise SystemExit(main())
