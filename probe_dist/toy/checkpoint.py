"""The toy checkpoint's last stage and its cache: LoRA + real GRPO steps on the pre-trained base (`toy.base`),
the reward model for GRADE (`toy.reward`), the files in the probe's layout, and the cached build per seed.

The GRPO steps use the probe's own sampler, layout and training loss (one update-loss function for every path),
so the saved AdamW state is exactly what the probe will reproduce.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from probe_dist.data.prompts import load_prompts, select_prompts
from probe_dist.data.rewards import get_reward_fn
from probe_dist.model.runner import PolicyRunner
from probe_dist.rollout.sample import sample_group
from probe_dist.state.model import trainable_parameters
from probe_dist.state.optimizer import save_optimizer
from probe_dist.toy.task import MAX_ANSWER_TOKENS
from probe_dist.update.loss import LossNormalisers, LossSpec, row_coefficients, update_loss

log = logging.getLogger("probe_dist")

TOY_FORMAT_VERSION = 2  # 2: reward_model/ (GRADE's r_φ)
COMPLETE_MARKER = "BUILD_COMPLETE"

# The training recipe recorded in training_args.json; the probe's defaults come from here.
TRAINING_ARGS = {
    "loss": "grpo", "temperature": 1.0, "max_new_tokens": MAX_ANSWER_TOKENS, "lr": 1e-3,
    "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01, "grad_clip": 1.0, "kl_coef": 0.0,
    "prompts_per_step": 8, "group_size": 8, "grpo_steps": 4,
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]},
}


def grpo_steps(model, tokenizer, optimizer, trainable, *, seed: int, args: dict) -> list[dict]:
    """A few real GRPO steps: sample G responses per prompt (eval mode) with the probe's own `sample_group`, then
    the probe's training loss (`update_loss`) in train mode, fp32 .grad accumulation, clipping and AdamW.

    trainable: (name, parameter) pairs the optimizer steps; args: the TRAINING_ARGS recipe. Returns one dict per
    step (step, mean_reward, grad_norm as floats). Raises KeyError for a missing recipe key, ValueError for an
    unknown loss family."""
    runner = PolicyRunner.single_process(model, temperature=args["temperature"], rows=args["group_size"])
    prompts = load_prompts("toy", "train")
    reward_fn = get_reward_fn("exact_match")
    history = []
    for step in range(args["grpo_steps"]):
        model.eval()
        chosen = select_prompts(prompts, args["prompts_per_step"], seed + step, "train")
        groups = [sample_group(runner.decoder, tokenizer, prompt, prompt_index=pos, seed_key=(seed + step, "train", pos),
                               group_size=args["group_size"], temperature=args["temperature"],
                               max_new_tokens=args["max_new_tokens"], reward_fn=reward_fn, loss_family=args["loss"],
                               adv_eps=1e-6, device=torch.device("cpu"))
                  for pos, (_, prompt) in enumerate(chosen)]
        norm = LossNormalisers(num_prompts=len(groups), group_size=args["group_size"],
                               total_tokens=float(sum(int(g.lengths.sum()) for g in groups)),
                               max_len=args["max_new_tokens"])
        model.train()  # as in training: LoRA dropout active for the loss pass
        optimizer.zero_grad(set_to_none=True)
        spec = LossSpec(family=args["loss"])
        for g in groups:
            mb = g.layout(slice(0, g.size))
            token_logp, token_h = runner.forward(mb, grad=True)
            update_loss(token_logp, token_h, mb.token_rows, g.advantages, row_coefficients(spec, g, norm),
                        spec).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], args["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_reward = float(torch.cat([g.rewards for g in groups]).mean())
        history.append({"step": step, "mean_reward": mean_reward, "grad_norm": float(grad_norm)})
        log.info("toy GRPO step %d: mean reward %.3f, grad norm %.3g", step, mean_reward, float(grad_norm))
    model.eval()
    return history


def _sort_target_modules(path: Path) -> None:
    """peft writes target_modules in set order, which depends on PYTHONHASHSEED; sort it so builds are bitwise."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(out_dir: str | Path, seed: int = 0) -> dict:
    """Build the whole checkpoint into out_dir (created; must not exist or be empty)."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # One thread: identical bits to two, and far faster for a tiny model on a shared 2-core machine.
    torch.set_num_threads(1)
    try:
        return _build(out, seed, start)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, seed: int, start: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from probe_dist.toy.base import sample_stats, train_base
    from probe_dist.toy.reward import train_reward_model

    base, tokenizer, base_stats = train_base(seed)
    base.save_pretrained(str(out / "base"))
    reward_model, reward_stats = train_reward_model(tokenizer, seed, base)  # own RNGs: the rest is unchanged
    reward_model.save_pretrained(str(out / "reward_model"))
    tokenizer.save_pretrained(str(out / "reward_model"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    args = dict(TRAINING_ARGS)
    torch.manual_seed(seed + 1)
    lora = LoraConfig(task_type="CAUSAL_LM", r=args["lora"]["r"], lora_alpha=args["lora"]["lora_alpha"],
                      lora_dropout=args["lora"]["lora_dropout"], target_modules=args["lora"]["target_modules"],
                      init_lora_weights="gaussian")  # B ≠ 0 so the adapter already changes the policy
    model = get_peft_model(base, lora)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=args["lr"], betas=tuple(args["betas"]),
                                  eps=args["eps"], weight_decay=args["weight_decay"])
    history = grpo_steps(model, tokenizer, optimizer, trainable, seed=seed, args=args)
    model.save_pretrained(str(out))
    _sort_target_modules(out / "adapter_config.json")
    save_optimizer(optimizer, trainable, out / "optimizer.pt")
    prompts = load_prompts("toy", "train")
    final = sample_stats(model, tokenizer, prompts, temperature=args["temperature"],
                         max_new_tokens=args["max_new_tokens"], seed=seed, n=200)
    (out / "training_args.json").write_text(json.dumps({**args, "seed": seed, "task": "toy_addition",
                                                        "optimizer": "torch.optim.AdamW"}, indent=2))
    state = {"global_step": args["grpo_steps"], "grpo_history": history, "base_stats": base_stats,
             "final_sampled_accuracy": final["accuracy"], "reward_model": reward_stats, "final_token_entropy": final["token_entropy"],
             "format_version": TOY_FORMAT_VERSION, "build_seconds": time.perf_counter() - start}
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (out / COMPLETE_MARKER).write_text("ok\n")
    return state


def default_cache_dir() -> Path:
    """Where toy checkpoints are cached: $PROBE_DIST_CACHE, else ~/.cache/probe_dist."""
    return Path(os.environ.get("PROBE_DIST_CACHE", Path.home() / ".cache" / "probe_dist"))


def ensure_toy_checkpoint(seed: int = 0, cache_dir: str | None = None, rt=None) -> Path:
    """The cached toy checkpoint for `seed`, built once (by rank 0, into a temp dir renamed into place)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"toy-v{TOY_FORMAT_VERSION}-seed{seed}"
    if rt is None or rt.is_main:
        if not (path / COMPLETE_MARKER).exists():
            root.mkdir(parents=True, exist_ok=True)
            log.info("building the toy checkpoint (seed %d) into %s", seed, path)
            tmp = Path(tempfile.mkdtemp(prefix=".toy-build-", dir=root))
            try:
                build(tmp, seed)
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    if rt is not None:
        rt.barrier()
    return path
