"""Throughput benchmark: the probe's phases against no-overhead references, in one process.

    python bench/throughput.py [--out bench/results/throughput_cpu.json] [--groups 1,8] [--gpu] [--backend vllm]

CPU part (always): a random-weight Qwen2-shaped checkpoint (vocabulary --vocab, hidden --hidden, --layers
layers, LoRA r=8 on every projection, a synthetic AdamW state) is built in a temporary directory. For each group
size G in --groups, E holds --rows-e rows (--rows-e / G prompts), and in this one process, interleaved:

  sampling      the probe's sampler on E (`rollout.sample.sample_batch`) vs HF `generate` (do_sample, top_k=0,
                top_p=1) over the same prompts and rows, all of E's rows in one call (--hf-rows-generate), left-padded,
                same max tokens;
  base scoring  `scoring.score.score_batch` on E vs a plain batched no-grad forward (`model(...).logits`) over the
                same rows and layout (`rollout.batch.block_microbatches`, microbatch_score rows);

The probe runs at the config's default memory sizes (memory.microbatch_generate/score/grad, as a user's run
without memory overrides) unless --rows-generate / --rows-score / --rows-grad set them; the sizes used are in
each case's "microbatch".
  δH₁           `prediction.delta_h1.predict_delta_h1` on E vs the same plain forward;
  update        `update.gradient.update_gradient` on U (G_U = 8) vs a plain forward + backward of Σ log-probs over
                the same block microbatches.

--backend vllm (in the venv of scripts/install_vllm_cpu.sh, or beside a GPU vLLM) adds `sample_vllm`: a vLLM engine
on θ (base folder + the adapter, rollout.backend=vllm) sampling the same E rows, the engine started once outside
the timing (`vllm_engine_start_s`); its ratios are per generated token, since the engines draw different responses
(default output bench/results/throughput_vllm_cpu.json).

Each timing is the best of --repeats. Also per phase: tokens/s and model passes per token (decoder forward calls ×
their tokens, counted by a hook, over the batch's scored tokens; backward passes counted on a LoRA weight), next to
the minimum (every real prompt and response token through the model once — padding is the difference; for the
update, one backward per --rows-grad rows). Ratios are what the acceptance reads (machines are noisy: compare
ratios measured in one process).

GPU part (--gpu, only where CUDA is present): the predecessor's workload on a Qwen2.5-1.5B-shaped random-weight
model — B_E = 2048 prompts × G_E = 1, B_U = 64 × 8, 200 new tokens, two η, one GPU, memory.auto_microbatch —
as one whole probe run with memory.profile: wall time and peak CUDA memory per phase.

--smoke (CI: seconds, so the bench cannot rot): the same CPU part on tiny shapes — vocabulary 256, hidden 32,
2 layers, 8 new tokens, E = 4 rows for G ∈ {1, 2}, U = 2 × 8, 4 rows per decode call, 2 per scoring forward, 4 per
gradient microbatch, one repeat (explicit flags still win); the same JSON schema; --out defaults to a temporary
file and may not point into bench/results/; exits 1 when a number in the result is not finite. GPU: --smoke shrinks
the CPU part only; --smoke --gpu is refused (exit 2) and the --gpu workload is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from memory import build_random_checkpoint, check_smoke, smoke_out_path, versions  # noqa: E402

# --smoke: tiny shapes for every size knob of the CPU part (explicit flags still win).
SMOKE_DEFAULTS = {"groups": "1,2", "vocab": 256, "hidden": 32, "layers": 2, "new_tokens": 8, "rows_e": 4,
                  "prompts_u": 2, "rows_generate": 4, "rows_score": 2, "rows_grad": 4, "repeats": 1}


class PassCounter:
    """Tokens through the decoder's forward (calls × rows × positions) and backward passes (a LoRA weight's hook)."""

    def __init__(self, model):
        from probe_dist.model.policy import unwrap_causal_lm

        decoder = unwrap_causal_lm(model).get_decoder()
        self.forward_tokens = 0
        self.backward_passes = 0

        def on_forward(_module, args, kwargs):
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None and args:
                x = args[0]
            if x is not None:
                self.forward_tokens += int(x.shape[0] * x.shape[1])

        decoder.register_forward_pre_hook(on_forward, with_kwargs=True)
        lora = next(p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)
        lora.register_hook(lambda g: self._backward(g))

    def _backward(self, grad):
        self.backward_passes += 1
        return grad

    def reset(self):
        self.forward_tokens = self.backward_passes = 0


def best_of(repeats: int, fn):
    """(best wall seconds, last result) over `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def left_padded(groups, pad_id: int):
    """All rows of `groups` (each prompt repeated G times), left-padded: (input_ids, attention_mask)."""
    prompts = [g.prompt_ids for g in groups for _ in range(g.size)]
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    return ids, mask


def cpu_case(args, ckpt: Path, group: int) -> dict:
    from transformers import GenerationConfig

    from probe_dist.assemble import build_probe
    from probe_dist.config import load_config
    from probe_dist.prediction.delta_h1 import predict_delta_h1
    from probe_dist.rollout.batch import block_microbatches
    from probe_dist.runtime.dist import Runtime
    from probe_dist.scoring.score import base_entropy, score_batch
    from probe_dist.update.gradient import update_gradient
    from probe_dist.update.step import update_parts

    prompts_e = max(1, args.rows_e // group)
    cfg = load_config(None, [f"checkpoint.path={ckpt}", "device=cpu", f"sampling.B_E={prompts_e}",
                             f"sampling.G_E={group}", f"sampling.B_U={args.prompts_u}", "sampling.G_U=8",
                             f"sampling.max_new_tokens={args.new_tokens}", "sampling.prompts=" + str(args.prompt_file),
                             *[f"memory.{key}={value}" for key, value in (
                                 ("microbatch_generate", args.rows_generate), ("microbatch_score", args.rows_score),
                                 ("microbatch_grad", args.rows_grad)) if value is not None],
                             "estimators.explain=false", "log_level=warning",
                             *(["rollout.backend=vllm", f"rollout.vllm_gpu_memory_utilization={args.vllm_memory}"]
                               if args.backend == "vllm" else [])])
    probe = build_probe(cfg, Runtime())
    probe.model.eval()
    cfg, rt, runner, tok = probe.cfg, probe.rt, probe.runner, probe.tokenizer  # the resolved config
    counter = PassCounter(probe.model)
    out: dict = {"G": group, "prompts_e": prompts_e, "rows_e": prompts_e * group}

    def phase(name, fn, tokens, minimum=None):
        counter.reset()
        seconds, result = best_of(args.repeats, fn)
        per_run = args.repeats
        out[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None,
                     "forward_passes_per_token": counter.forward_tokens / per_run / max(tokens, 1),
                     "backward_passes": counter.backward_passes / per_run}
        if minimum is not None:  # every real token through the model once; the fewest backward passes
            out[name]["minimum_forward_passes_per_token"] = minimum[0]
            out[name]["minimum_backward_passes"] = minimum[1]
        return result

    def minimum_passes(batch, rows_per_backward=None):
        real = sum(int(g.prompt_ids.numel() + g.lengths[i]) for g in batch.real_groups for i in range(g.size))
        scored = sum(int(g.lengths.sum()) for g in batch.real_groups)
        rows = sum(g.size for g in batch.real_groups)
        return real / max(scored, 1), (-(-rows // rows_per_backward) if rows_per_backward else 0)

    batch_e = probe.sample("E", prompts_e, group)
    generated = sum(int(g.lengths.sum()) for g in batch_e.real_groups)
    phase("sample", lambda: probe.sample("E", prompts_e, group), generated, minimum_passes(batch_e))
    if args.backend == "vllm":  # the same rows through a vLLM engine on θ (started once, outside the timing)
        start = time.perf_counter()
        probe.sampler = probe.open_sampler()
        out["vllm_engine_start_s"] = time.perf_counter() - start
        try:
            vllm_batch = phase("sample_vllm", lambda: probe.sample("E", prompts_e, group), generated)
        finally:
            probe.sampler.close()
            probe.sampler = None
        out["vllm_generated_tokens"] = sum(int(g.lengths.sum()) for g in vllm_batch.real_groups)
    # HF generate over the same rows, all in one call unless --hf-rows-generate
    model = probe.model
    ids, mask = left_padded(batch_e.real_groups, tok.pad_token_id)
    gen = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=cfg.sampling.temperature,
                           max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=probe.eos_ids)

    hf_rows = args.hf_rows_generate or ids.shape[0]

    def hf_generate():
        with torch.no_grad():
            for start in range(0, ids.shape[0], hf_rows):
                model.generate(input_ids=ids[start:start + hf_rows],
                               attention_mask=mask[start:start + hf_rows], generation_config=gen)

    phase("hf_generate", hf_generate, generated)
    scored = sum(int(g.lengths.sum()) for g in batch_e.real_groups)
    scores = phase("score_base", lambda: score_batch(rt, runner, batch_e), scored, minimum_passes(batch_e))
    out["microbatch"] = {"generate": cfg.memory.microbatch_generate, "score": cfg.memory.microbatch_score,
                         "grad": cfg.memory.microbatch_grad, "hf_generate": hf_rows}
    layouts = [mb for block in batch_e.blocks() for mb in block_microbatches(block, cfg.memory.microbatch_score)]

    def plain_forward():
        with torch.no_grad():
            for mb in layouts:
                model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.sum()

    phase("plain_forward", plain_forward, scored)
    base = base_entropy(rt, batch_e, scores, payload="rb", normalize="per_token")
    batch_u = probe.sample("U", args.prompts_u, 8)
    grad, *_ = update_gradient(rt, runner, batch_u, cfg.update)
    u = [p.u for p in update_parts(probe.optimizer, probe.trainable, grad)]
    phase("delta_h1", lambda: predict_delta_h1(rt, runner, batch_e, scores, base=base, u=u, est=cfg.estimators),
          scored, minimum_passes(batch_e))
    u_tokens = sum(int(g.lengths.sum()) for g in batch_u.real_groups)
    phase("update_gradient", lambda: update_gradient(rt, runner, batch_u, cfg.update), u_tokens,
          minimum_passes(batch_u, cfg.memory.microbatch_grad))
    u_layouts = [mb for block in batch_u.blocks() for mb in block_microbatches(block, cfg.memory.microbatch_grad)]

    def plain_forward_backward():
        for mb in u_layouts:
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
            torch.log_softmax(logits.float(), -1).amax(-1).sum().backward()
        runner.zero_grads()

    phase("plain_forward_backward", plain_forward_backward, u_tokens)
    out["ratios"] = {
        "sample_vs_hf_generate": out["sample"]["seconds"] / out["hf_generate"]["seconds"],
        "score_base_vs_plain_forward": out["score_base"]["seconds"] / out["plain_forward"]["seconds"],
        "delta_h1_vs_plain_forward": out["delta_h1"]["seconds"] / out["plain_forward"]["seconds"],
        "update_vs_plain_forward_backward": out["update_gradient"]["seconds"] / out["plain_forward_backward"]["seconds"],
    }
    if "sample_vllm" in out:  # per generated token: the engines draw different responses (lengths differ)
        per_token = {k: out[k]["seconds"] / max(t, 1) for k, t in (("sample", generated), ("hf_generate", generated),
                                                                     ("sample_vllm", out["vllm_generated_tokens"]))}
        out["ratios"]["vllm_vs_probe_sampler_per_token"] = per_token["sample_vllm"] / per_token["sample"]
        out["ratios"]["vllm_vs_hf_generate_per_token"] = per_token["sample_vllm"] / per_token["hf_generate"]
    return out


def write_prompt_file(path: Path, count: int) -> Path:
    """Prompts of different lengths over the toy characters (the wide tokenizer keeps them as single tokens)."""
    rows = [{"prompt": f"{a}+{b}=" * (1 + (a + b) % 3), "answer": str(a + b)}
            for a in range(20) for b in range(20)][:count]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gpu_part(args) -> dict:
    """The predecessor's workload as one probe run on one GPU: wall time and peak memory per phase."""
    from probe_dist.assemble import build_probe
    from probe_dist.config import load_config
    from probe_dist.plan import builtin_model_config
    from probe_dist.runtime.dist import Runtime

    device = torch.device("cuda", 0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-tp-gpu-"))
    t0 = time.perf_counter()
    ckpt = build_random_checkpoint(workdir / "ckpt", builtin_model_config("qwen2.5-1.5b"), device, lora_r=64,
                                   max_new_tokens=200)
    build_seconds = time.perf_counter() - t0
    prompts = write_prompt_file(workdir / "prompts.jsonl", 400)
    cfg = load_config(None, [f"checkpoint.path={ckpt}", "device=cuda", "sampling.B_E=2048", "sampling.G_E=1",
                             "sampling.B_U=64", "sampling.G_U=8", "sampling.max_new_tokens=200",
                             f"sampling.prompts={prompts}", "estimators.etas=[0.0,1e-5]", "estimators.explain=false",
                             f"memory.microbatch_generate={args.gpu_rows_generate}", "memory.auto_microbatch=true",
                             "memory.max_trainable_params=80000000",  # LoRA r = 64 on every projection: 73.9M
                             "memory.profile=true", f"output.dir={workdir / 'run'}", "log_level=warning"])
    probe = build_probe(cfg, Runtime())
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = probe.run()
    wall = time.perf_counter() - t0
    phases = {name: {"seconds": probe.clock.seconds.get(name),
                     "peak_allocated_bytes": probe.clock.memory.get(name, {}).get("cuda_peak_allocated_bytes")}
              for name in probe.clock.seconds}
    return {"device": torch.cuda.get_device_name(device), "status": result.status, "build_seconds": build_seconds,
            "wall_seconds": wall, "goal_seconds": 600, "phases": phases,
            "microbatch": dict(result.microbatch_used), "peak_allocated_bytes": torch.cuda.max_memory_allocated(device)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/throughput_cpu.json; "
                                               "with --smoke a temporary file)")
    p.add_argument("--smoke", action="store_true", help="CI: the same CPU bench on tiny shapes in seconds")
    p.add_argument("--groups", default="1,8", help="G_E values")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows-e", type=int, default=64, help="rows of E (prompts × G)")
    p.add_argument("--prompts-u", type=int, default=4, help="prompts of U (G_U = 8)")
    p.add_argument("--rows-generate", type=int, default=None,
                   help="memory.microbatch_generate (default: the config's default, as users run it)")
    p.add_argument("--rows-score", type=int, default=None, help="memory.microbatch_score (default: the config's)")
    p.add_argument("--rows-grad", type=int, default=None, help="memory.microbatch_grad (default: the config's)")
    p.add_argument("--hf-rows-generate", type=int, default=None,
                   help="rows per HF generate call of the reference (default: all of E's rows in one call)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="vllm: also time a vLLM engine sampling the same rows (needs vLLM: scripts/install_vllm_cpu.sh)")
    p.add_argument("--vllm-memory", type=float, default=0.1, help="rollout.vllm_gpu_memory_utilization for --backend vllm")
    p.add_argument("--gpu", action="store_true", help="also the GPU workload (needs CUDA)")
    p.add_argument("--gpu-rows-generate", type=int, default=128)
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args(argv)
    if args.smoke:
        if args.gpu:
            p.exit(2, "error: --smoke shrinks the CPU part only; run --gpu without --smoke\n")
        args.out = smoke_out_path(args.out, "throughput")
    elif args.out is None:
        name = "throughput_vllm_cpu.json" if args.backend == "vllm" else "throughput_cpu.json"
        args.out = str(REPO / "bench" / "results" / name)
    return args


def main(argv=None) -> int:
    from transformers import Qwen2Config

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "throughput", "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, tie_word_embeddings=True)
        ckpt = build_random_checkpoint(Path(tmp) / "ckpt", config, torch.device("cpu"), lora_r=8,
                                       max_new_tokens=args.new_tokens)
        args.prompt_file = write_prompt_file(Path(tmp) / "prompts.jsonl", 400)
        result["cpu"] = [cpu_case(args, ckpt, int(g)) for g in str(args.groups).split(",") if g]
    if args.gpu:
        result["gpu"] = gpu_part(args) if torch.cuda.is_available() else {"skipped": "no CUDA device"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for case in result["cpu"]:
        print(f"G={case['G']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in case["ratios"].items()), file=sys.stderr)
    print(f"[bench/throughput] wrote {out}", file=sys.stderr)
    return check_smoke(result, out, "bench/throughput") if args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
