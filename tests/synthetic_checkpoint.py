"""A small random-weight RL checkpoint in the probe's layout, built in about a second (no training).

    from tests.synthetic_checkpoint import build_synthetic_checkpoint
    ckpt = build_synthetic_checkpoint(tmp_path / "ckpt", hidden=128, layers=2, lora_r=4, max_new_tokens=8)

Layout (what `probe_dist.state.paths.resolve_paths` reads): base/ (Qwen2 built from config, random weights,
save_pretrained), adapter_config.json + adapter_model.safetensors (peft LoRA with Gaussian-initialised B, so the
adapter changes the policy), optimizer.pt (torch AdamW after `optimizer_steps` real steps on a dummy loss, saved
with probe_dist.state.optimizer.save_optimizer), tokenizer/ (the toy character tokenizer, extended with dummy tokens
when vocab_size > 16) and training_args.json {loss, temperature, max_new_tokens, grad_clip}.

Use it where the trained toy checkpoint is not needed (memory, plumbing, equality-of-paths tests): the toy
checkpoint is a trained model and takes much longer to build.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_model_config(vocab_size: int = 16, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                           heads: int = 4, kv_heads: int = 2):
    import transformers

    from probe_dist.toy.task import BOS_ID, EOS_ID, PAD_ID

    return transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, attention_dropout=0.0, tie_word_embeddings=True, use_cache=True, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32")


def synthetic_tokenizer(vocab_size: int = 16):
    """The toy character tokenizer; ids 16..vocab_size-1 become dummy tokens '<xN>' so every id decodes."""
    from probe_dist.toy.task import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer()
    if vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least the toy tokenizer's {VOCAB_SIZE}")
    if vocab_size > VOCAB_SIZE:
        tok.add_tokens([f"<x{i}>" for i in range(VOCAB_SIZE, vocab_size)])
    return tok


def build_synthetic_checkpoint(out_dir: str | Path, *, vocab_size: int = 16, hidden: int = 64,
                               intermediate: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                               lora_r: int = 4, lora_alpha: float | None = None,
                               lora_targets: tuple[str, ...] = ALL_PROJECTIONS, max_new_tokens: int = 8,
                               temperature: float = 1.0, loss: str = "grpo", grad_clip: float = 1.0,
                               optimizer_steps: int = 1, seed: int = 0) -> Path:
    """Write the checkpoint into out_dir (created) and return its path."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from probe_dist.state.model import trainable_parameters
    from probe_dist.state.optimizer import save_optimizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    base = transformers.Qwen2ForCausalLM(synthetic_model_config(vocab_size, hidden, intermediate, layers, heads,
                                                                kv_heads)).eval()
    base.save_pretrained(str(out / "base"))
    synthetic_tokenizer(vocab_size).save_pretrained(str(out / "tokenizer"))
    lora = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_r,
                      lora_dropout=0.0, target_modules=list(lora_targets), init_lora_weights="gaussian")
    model = get_peft_model(base, lora)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(optimizer_steps):  # real steps so exp_avg / exp_avg_sq / step are those of a trained adapter
        ids = torch.randint(3, vocab_size, (4, 12), generator=gen)
        logits = model(input_ids=ids).logits.float()
        dummy = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        dummy.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(str(out))
    save_optimizer(optimizer, trainable, out / "optimizer.pt")
    (out / "training_args.json").write_text(json.dumps({
        "loss": loss, "temperature": temperature, "max_new_tokens": max_new_tokens, "grad_clip": grad_clip,
        "lora": {"r": lora_r, "target_modules": list(lora_targets)}, "synthetic": True, "seed": seed}, indent=2))
    return out


def write_empty_answer_prompts(path: str | Path, num: int = 16) -> Path:
    """Toy-looking prompts whose answer is the empty string.

    A random-weight model gets reward 1 whenever its response is empty after decoding (EOS first, or only special
    tokens), which happens often enough that groups have mixed rewards, non-zero advantages and a non-zero
    update gradient — unlike the real toy answers, which a random model almost never produces.
    """
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a + 1}=", "answer": ""}) + "\n" for a in range(num)))
    return path
