"""TRL's own GRPO loss on the probe's sequences: the reference the probe's training loss is checked against.

    trainer = trl_trainer(checkpoint, loss_type="dapo", beta=0.04, ...)   # a real trl.GRPOTrainer
    grads, prepared = trl_gradient(trainer, groups, block_rows=16, texts=decoded_responses)

The trainer wraps its own copy of the checkpoint's model (base + LoRA, dropout set to 0 so train mode is
deterministic, as the probe's eval mode). `trl_gradient` runs TRL's own GRPOTrainer._generate_and_score_completions
on the probe's sequences — only the generation is replaced by them, and the trainer's reward function returns the
probe's rewards — so TRL computes the advantages, the truncation mask, num_items_in_batch and the reference
log-probs itself; then it calls `trainer.compute_loss` in train mode on each micro-step block of `block_rows`
consecutive sequences (TRL shuffles rows between micro-steps; here they are contiguous, as the probe's blocks) and
returns the summed .grad per trainable parameter name (float64) — what one optimizer step of TRL would use.

Prompts must have one token length (TRL would left-pad otherwise, and Qwen2 positions then shift).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def trl_trainer(ckpt: Path, *, loss_type: str, scale_rewards: str = "group", beta: float = 0.0,
                use_bias_correction_kl: bool = False, mask_truncated_completions: bool = False,
                epsilon_high: float | None = None,
                top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0, block_rows: int = 8,
                num_blocks: int = 1, group_size: int = 4, max_completion_length: int = 2, temperature: float = 1.0,
                bf16: bool = False):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(ckpt / "tokenizer"))
    base = AutoModelForCausalLM.from_pretrained(str(ckpt / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    kwargs = {"epsilon_high": epsilon_high} if epsilon_high is not None else {}
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-ref-"), use_cpu=True, report_to="none", bf16=bf16,
                      per_device_train_batch_size=block_rows, gradient_accumulation_steps=num_blocks,
                      num_generations=group_size, max_completion_length=max_completion_length, loss_type=loss_type,
                      scale_rewards=scale_rewards, beta=beta, use_bias_correction_kl=use_bias_correction_kl,
                      mask_truncated_completions=mask_truncated_completions,
                      top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef, temperature=temperature,
                      dataloader_num_workers=0, logging_steps=1, **kwargs)
    dataset = Dataset.from_list([{"prompt": "1+2="}] * (block_rows * num_blocks))
    holder = {}

    def probe_rewards(completions, **kwargs):  # the probe's rewards, in the row order trl_prepared_inputs gives
        return list(holder["trainer"]._probe_rewards)

    trainer = GRPOTrainer(model=model, reward_funcs=probe_rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    holder["trainer"] = trainer
    # TRL keeps a copy of an adapter it was given as the KL reference ("ref"); the probe's reference is the base
    # with the adapter disabled — what TRL uses for an adapter it creates. Drop the copy to compare like with like.
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    trainer.current_gradient_accumulation_steps = num_blocks
    return trainer


def trl_prepared_inputs(trainer, groups, *, texts: list[str]) -> dict:
    """TRL's own on-policy inputs for the probe's sequences: GRPOTrainer._generate_and_score_completions with only
    the generation replaced by the probe's samples (prompt ids, completion ids — TRL cuts each at its first EOS —
    and their decoded texts). TRL itself scores the rewards (the trainer's reward function returns the probe's
    rewards in row order), computes the advantages (scale_rewards, its ε), the truncation mask, num_items_in_batch
    and the reference log-probs."""
    rows = [(g, i) for g in sorted(groups, key=lambda g: g.prompt_index) for i in range(g.size)]
    prompt_ids = [g.prompt_ids.tolist() for g, _ in rows]
    completion_ids = [g.responses[i, :int(g.lengths[i])].tolist() for g, i in rows]
    rewards = [float(g.rewards[i]) for g, i in rows]

    def generate(prompts):
        return prompt_ids, completion_ids, None, texts, None, {}, None, None

    trainer._generate = generate
    trainer._probe_rewards = rewards
    trainer.model.train()
    inputs = [{"prompt": f"prompt {g.prompt_index}"} for g, _ in rows]
    return trainer._generate_and_score_completions(inputs)


def trl_gradient(trainer, groups, *, block_rows: int, texts: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Σ over micro-step blocks (consecutive rows) of ∇ trainer.compute_loss on TRL's own prepared inputs, per
    trainable parameter name (float64 CPU), and the prepared inputs."""
    model = trainer.model
    prepared = trl_prepared_inputs(trainer, groups, texts=texts)
    num_rows = prepared["completion_ids"].shape[0]
    for p in model.parameters():
        p.grad = None
    model.train()
    for start in range(0, num_rows, block_rows):
        block = {k: (v[start:start + block_rows] if isinstance(v, torch.Tensor) and v.dim() > 0
                     and v.shape[0] == num_rows else v) for k, v in prepared.items()}
        trainer.compute_loss(model, block).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, prepared


def use_probe_forward(trainer) -> None:
    """Make TRL's loss read the probe's per-token log-probs and entropies (probe_dist.model.policy.PolicyModel over
    TRL's own model, in the model's dtype) instead of its fused fp32 head, so that what is compared is TRL's loss
    code — aggregation, masks, KL, normalisers, entropy mask and bonus — on identical inputs. TRL's head always
    computes log-softmax in float32, which limits a float64 comparison to ~1e-7 in ℓ, and the KL gradient
    (1 − e^{ref−ℓ})∇ℓ turns that into ~1e-7/|ref − ℓ| relative. Entropies are handed over with float32 values (TRL's
    entropy mask casts them to float32 for its quantile, as the probe does, so both masks are the same tokens) and
    a float64 gradient (straight through the rounding), so TRL's entropy bonus differentiates in the model's dtype
    as the probe's does, instead of rounding its gradient to float32 through a cast."""
    from probe_dist.model.policy import PolicyModel

    policy = PolicyModel(trainer.model)

    def per_token(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_kwargs):
        # Every completion position is scored (connected to the graph even when TRL masks them all, as its own
        # head does); positions TRL masks are zeroed, so its masked sums see exactly the probe's values.
        keep = attention_mask[:, -logits_to_keep:]
        start = input_ids.shape[1] - logits_to_keep
        logp, ent = policy(input_ids, attention_mask, start, torch.ones_like(keep, dtype=torch.bool),
                           trainer.temperature)
        logp, ent = logp.view(keep.shape) * keep, ent.view(keep.shape) * keep
        # Float32 values for TRL's float32 entropy quantile, the model dtype's gradient for its entropy bonus.
        ent = ent + (ent.float().to(ent.dtype) - ent).detach()
        return logp, (ent if compute_entropy else None), None

    trainer._get_per_token_logps_and_entropies = per_token
