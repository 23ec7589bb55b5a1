"""Cost of the online probe (probe_dist.callback) against the training it probes, measured in one process.

    python bench/online.py [--out bench/results/online_cpu.json] [--steps 20] [--every 10] [--threads 1]

Trains the toy checkpoint's base with TRL's GRPOTrainer (LoRA on every linear layer, CPU, TRL's defaults
otherwise: 16 prompts × 8 completions per step, 3 new tokens) twice in this process, without and with
`EntropyProbeCallback(every_n_steps=--every)` at its default sizes (E: 16 prompts × 4 responses), and writes the
seconds per training step of both runs, the callback's seconds per probed step and per phase (what dominates),
and the overhead: (probed run's time − plain run's time) / plain run's time. The goal stated for the callback is
≤ 15 % at every_n_steps = 10.

--smoke (CI: seconds, so the bench cannot rot): a tiny random Qwen2 from config with the toy tokenizer, 4 steps of
8 completions, probe every 2, E 2 × 2, one thread; the same JSON schema; --out defaults to a temporary file and may not point
into bench/results/; exits 1 when a number is not finite or the callback logged nothing.
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


def length_reward(completions, **kwargs):
    """A reward with variance within a group (TRL's convention): the completion's length."""
    return [float(len(c)) for c in completions]


def train(base: Path, tokenizer: Path, out: Path, *, steps: int, batch: int, generations: int, new_tokens: int,
          every: int, sizes: tuple[int, int]) -> dict:
    """One GRPOTrainer run; with every > 0 the online probe is attached. Returns its timings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from probe_dist.callback import EntropyProbeCallback

    torch.manual_seed(0)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, report_to="none", per_device_train_batch_size=batch,
                      num_generations=generations, max_completion_length=new_tokens, max_steps=steps,
                      save_strategy="no", logging_steps=1, learning_rate=1e-3, beta=0.0, dataloader_num_workers=0,
                      seed=0, disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": f"{x}+{y}="} for x in range(20) for y in range(20)])
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                          reward_funcs=length_reward, args=args, train_dataset=dataset,
                          processing_class=PreTrainedTokenizerFast.from_pretrained(str(tokenizer)),
                          peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    callback = None
    if every:
        callback = EntropyProbeCallback(every_n_steps=every, eval_prompts="toy", B_E=sizes[0], G_E=sizes[1],
                                        trainer=trainer)
        trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    probed = [e for e in trainer.state.log_history if "entropy_probe/seconds" in e]
    out_dict = {"seconds": seconds, "seconds_per_step": seconds / steps, "probed_steps": len(probed)}
    if callback is not None:
        total = sum(e["entropy_probe/seconds"] for e in probed)
        out_dict.update({"callback_seconds": total, "callback_seconds_per_probed_step": total / max(len(probed), 1),
                         "callback_phase_seconds": dict(callback.phase_seconds),
                         "delta_h1": [e["entropy_probe/delta_h1"] for e in probed],
                         "delta_h_true": [e["entropy_probe/delta_h_true"] for e in probed],
                         "update_match": [e["entropy_probe/update_match"] for e in probed]})
    return out_dict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON output path (default: none; with --smoke a temporary file)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="CI: the same bench on a tiny model in seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-online-"))
    if args.smoke:
        import transformers

        from probe_dist.toy.task import build_tokenizer

        args.out = bench_memory.smoke_out_path(args.out, "online")
        base, tokenizer = work / "base", work / "tokenizer"
        cfg = bench_memory.smoke_model_config()
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(base))
        build_tokenizer().save_pretrained(str(tokenizer))
        shape = dict(steps=4, batch=8, generations=4, new_tokens=3, every=2, sizes=(2, 2))
    else:
        from probe_dist.toy.checkpoint import ensure_toy_checkpoint
        from probe_dist.toy.task import MAX_ANSWER_TOKENS

        toy = ensure_toy_checkpoint(0)
        base, tokenizer = toy / "base", toy / "tokenizer"
        shape = dict(steps=args.steps, batch=16, generations=8, new_tokens=MAX_ANSWER_TOKENS, every=args.every,
                     sizes=(16, 4))
    plain = train(base, tokenizer, work / "plain", **{**shape, "every": 0})
    probed = train(base, tokenizer, work / "probed", **shape)
    result = {"benchmark": "online", "versions": bench_memory.versions(), "shape": {**shape, "sizes": list(shape["sizes"])},
              "plain": plain, "probed": probed,
              "overhead": probed["seconds"] / plain["seconds"] - 1.0,
              "callback_share_of_probed_run": probed["callback_seconds"] / probed["seconds"],
              "callback_per_probed_step_over_train_step": probed["callback_seconds_per_probed_step"]
              / plain["seconds_per_step"]}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: result[k] for k in ("overhead", "callback_share_of_probed_run",
                                             "callback_per_probed_step_over_train_step")}))
    shutil.rmtree(work, ignore_errors=True)
    if not args.smoke:
        return 0
    if probed["probed_steps"] == 0:
        print("[bench/online] smoke failure: the callback logged nothing", file=sys.stderr)
        return 1
    return bench_memory.check_smoke(result, Path(args.out), "bench/online")


if __name__ == "__main__":
    raise SystemExit(main())
