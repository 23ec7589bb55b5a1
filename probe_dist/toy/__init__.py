"""The built-in toy RL task and checkpoint, in one package.

A tiny Qwen2 that learned short additions (`base`: the task's tokenizer and pre-training), then LoRA and a few real
GRPO steps with the probe's own sampler and loss, and a reward model for GRADE (`reward`); `checkpoint` writes it
in the probe's layout and caches one build per seed (`ensure_toy_checkpoint`). `task` holds the task itself
(vocabulary, prompts, the answer rule); `data/` its train and test prompts.

    python -m probe_dist.toy build --out DIR [--seed N]

Import from the modules (`probe_dist.toy.checkpoint.ensure_toy_checkpoint`, `probe_dist.toy.task`): this file
imports nothing, so the low-level `task` module loads without the builder's dependencies.
"""
