"""Tiny random-weight checkpoints of real causal-LM families, in the probe's layout (offline, ~1 s each).

    from tests.model_families import FAMILIES, build_family_checkpoint, write_family_prompts
    ckpt = build_family_checkpoint("gemma2", tmp_path / "ckpt")
    prompts = write_family_prompts(tmp_path / "prompts.jsonl")

Each family is built from its transformers config class (nothing is downloaded) at toy size — vocab 32-64,
hidden 32-64, 2 layers, 4 heads (2 KV heads where the family has GQA), max positions 64 — in float32 with random
weights (initializer_range 0.1, so next-token distributions are not all near-uniform), then gets a peft LoRA
adapter on that family's own projection modules (Gaussian-initialised B, so the adapter changes the policy) and
two real AdamW steps. The family-specific features the probe must get right are
switched on at a size where they are live at our sequence lengths (a prompt of 4-6 tokens plus up to 6 response
tokens):

    mistral   sliding_window=4: attention is banded after the 4th position.
    gemma2    final_logit_softcapping=30 (the family default) and attn_logit_softcapping=1 (the default 50 never
              binds here: raw attention scores stay below ~1.3; Gemma-2 loads with eager attention, which applies
              it), sliding_window=4 on its alternating local layers, and the tied embedding scaled ×60 so that raw logits reach far beyond
              the cap (|z| up to ~220): uncapped, nearly every next-token distribution is a point mass (H ≈ 0);
              the sampler's logits 30·tanh(z/30) give a mean token entropy of ~1.2 nats.
    gemma3    text-only Gemma3ForCausalLM (Gemma3TextConfig): final_logit_softcapping=30 with the same scaled
              embedding, a sliding (window 4) and a full layer. attn_logit_softcapping=50 is set too, but
              transformers 5.24's Gemma3Attention never passes it to the attention function (it loads with SDPA
              and the config value is unused), so only the final-logit cap is live.
    qwen3     generation_config.eos_token_id = [<eos>, <im_end>] (two EOS ids, as Qwen chat models ship): the
              sampler must stop at either.
    gpt2      the GPT-2 conventions: Conv1D projections (c_attn/c_proj/c_fc), learned absolute positions,
              BOS = EOS (one <|endoftext|> id) and no pad token (the probe's tokenizer loader falls back to EOS).
    phi3      fused qkv_proj / gate_up_proj projections.
    olmo2     q/k norms over the whole projection, post-norm blocks.

Layout written (what `probe_dist.state.paths.resolve_paths` reads):
    base/                      save_pretrained of the base model, with generation_config.json
    tokenizer/                 the toy character tokenizer (tests/synthetic_checkpoint.py's approach), its vocab
                               padded with dummy tokens '<xN>' up to the model's vocab, specials matching the config
    adapter_config.json        peft LoRA (target_modules sorted, so builds are bitwise)
    adapter_model.safetensors
    optimizer.pt               torch AdamW after 2 real steps, saved with probe_dist.state.optimizer.save_optimizer
    training_args.json         {"loss": "grpo", "temperature": 1.0, "max_new_tokens": 6, "grad_clip": 1.0, ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_NEW_TOKENS = 6
TRAINING_ARGS = {"loss": "grpo", "temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "grad_clip": 1.0}

# Token ids shared with the toy tokenizer (probe_dist.toy.task): 0 <pad>, 1 <eos>, 2 <bos>, 3..12 digits,
# 13 '+', 14 '=', 15 <unk>; ids 16.. are dummy tokens '<x16>', '<x17>', ...
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOY_TOKENS = 16
INIT_RANGE = 0.1  # 5x the usual 0.02: peaked next-token distributions (mean entropy ~2-3 nats, not ~log V)
QWEN3_IM_END = 47  # the second EOS of the Qwen3 family (its '<|im_end|>')


@dataclass(frozen=True)
class FamilySpec:
    """One model family at toy size."""

    config_class: str                        # transformers config class name
    model_class: str                         # transformers causal-LM class name (what AutoModelForCausalLM loads)
    config: dict                             # config kwargs (sizes, special ids, family features)
    lora_targets: tuple[str, ...]            # the family's projection module names
    bos_id: int | None = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int | None = PAD_ID
    extra_eos: tuple[int, ...] = ()          # further EOS ids of generation_config.eos_token_id
    embedding_scale: float = 1.0             # multiplies the (tied) embedding init, to push raw logits up
    softcap: float | None = None             # final_logit_softcapping, when the family applies one
    notes: str = ""
    tokens: dict = field(default_factory=dict)  # extra special-token names by id (e.g. a second EOS)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a response: the tokenizer's EOS first, then generation_config's others."""
        return (self.eos_id, *self.extra_eos)


def _llama_sizes(vocab: int, hidden: int = 32, intermediate: int = 64) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
                initializer_range=INIT_RANGE)



FAMILIES: dict[str, FamilySpec] = {
    "qwen2": FamilySpec("Qwen2Config", "Qwen2ForCausalLM", {**_llama_sizes(48), "tie_word_embeddings": True},
                        LLAMA_LIKE),
    "qwen3": FamilySpec("Qwen3Config", "Qwen3ForCausalLM", {**_llama_sizes(48), "head_dim": 8,
                                                            "tie_word_embeddings": True},
                        LLAMA_LIKE, extra_eos=(QWEN3_IM_END,), tokens={QWEN3_IM_END: "<|im_end|>"},
                        notes="generation_config.eos_token_id is a list of two ids"),
    "llama": FamilySpec("LlamaConfig", "LlamaForCausalLM", _llama_sizes(40, hidden=48, intermediate=96), LLAMA_LIKE),
    "mistral": FamilySpec("MistralConfig", "MistralForCausalLM", {**_llama_sizes(48), "sliding_window": 4},
                          LLAMA_LIKE, notes="sliding_window=4"),
    "gemma2": FamilySpec("Gemma2Config", "Gemma2ForCausalLM",
                         {**_llama_sizes(48), "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
                          "final_logit_softcapping": 30.0, "attn_logit_softcapping": 1.0,
                          "tie_word_embeddings": True},
                         LLAMA_LIKE, embedding_scale=60.0, softcap=30.0, notes="final-logit + attention soft-capping"),
    "gemma3": FamilySpec("Gemma3TextConfig", "Gemma3ForCausalLM",
                         {**_llama_sizes(48), "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4,
                          "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 30.0,
                          "attn_logit_softcapping": 50.0, "tie_word_embeddings": True},
                         LLAMA_LIKE, embedding_scale=60.0, softcap=30.0,
                         notes="final-logit soft-capping (attention softcap unused by transformers' Gemma-3)"),
    "phi3": FamilySpec("Phi3Config", "Phi3ForCausalLM",
                       {**_llama_sizes(32), "original_max_position_embeddings": 64, "resid_pdrop": 0.0,
                        "embd_pdrop": 0.0},
                       ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), notes="fused projections"),
    "gpt2": FamilySpec("GPT2Config", "GPT2LMHeadModel",
                       dict(vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_RANGE,
                            bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=None, tie_word_embeddings=True),
                       ("c_attn", "c_proj", "c_fc"), bos_id=EOS_ID, pad_id=None,
                       notes="Conv1D projections, BOS = EOS, no pad token"),
    "olmo2": FamilySpec("Olmo2Config", "Olmo2ForCausalLM", _llama_sizes(56, hidden=64, intermediate=96), LLAMA_LIKE),
}


def family_config(name: str, **overrides):
    """The family's transformers config; `overrides` replace spec kwargs (e.g. sliding_window=None)."""
    import transformers

    spec = FAMILIES[name]
    return getattr(transformers, spec.config_class)(**{**spec.config, **overrides}, dtype="float32")


def family_tokenizer(name: str):
    """The toy character tokenizer over the family's whole vocab, with the family's special tokens.

    Ids 0..15 are the toy task's (probe_dist.toy.task.VOCAB); 16..V-1 are '<xN>' (or a named special token
    from the spec, e.g. Qwen3's '<|im_end|>'), so every id decodes. BOS/EOS/PAD follow the spec: GPT-2 has
    BOS = EOS = '<eos>' and no pad token.
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from probe_dist.toy.task import UNK_TOKEN, VOCAB

    spec = FAMILIES[name]
    vocab = dict(VOCAB)
    assert len(vocab) == TOY_TOKENS and spec.vocab_size >= TOY_TOKENS
    for i in range(TOY_TOKENS, spec.vocab_size):
        vocab[spec.tokens.get(i, f"<x{i}>")] = i
    token_of = {i: t for t, i in vocab.items()}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    specials = {"eos_token": token_of[spec.eos_id], "unk_token": UNK_TOKEN}
    if spec.bos_id is not None:
        specials["bos_token"] = token_of[spec.bos_id]
    if spec.pad_id is not None:
        specials["pad_token"] = token_of[spec.pad_id]
    extra = [token_of[i] for i in sorted(spec.tokens)]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, padding_side="left", model_max_length=64,
                                               extra_special_tokens=extra, **specials)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (spec.bos_id, spec.eos_id, spec.pad_id)
    return tok


def build_family_model(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's base causal LM with seeded random weights (float32, eval mode) and its generation_config.

    `overrides` change config kwargs without changing the weights drawn (the same seed gives the same weights as
    long as no parameter shape changes): e.g. sliding_window=None to see what the window does."""
    import transformers

    spec = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(family_config(name, **overrides)).float().eval()
    if spec.embedding_scale != 1.0:
        with torch.no_grad():  # tied: scales both the input embedding and the head, so raw logits exceed the cap
            model.get_input_embeddings().weight.mul_(spec.embedding_scale)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = spec.bos_id, spec.pad_id
    gen.eos_token_id = list(spec.eos_ids) if spec.extra_eos else spec.eos_id
    return model


def build_family_checkpoint(name: str, out_dir: str | Path, *, seed: int = 0, lora_r: int = 4,
                            optimizer_steps: int = 2, **config_overrides) -> Path:
    """Write family `name`'s checkpoint into out_dir (created) and return its path. Deterministic in `seed`.
    `config_overrides` change the model config (e.g. rope_scaling) as in build_family_model."""
    from peft import LoraConfig, get_peft_model

    from probe_dist.state.model import trainable_parameters
    from probe_dist.state.optimizer import save_optimizer

    spec = FAMILIES[name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = build_family_model(name, seed=seed, **config_overrides)
    base.save_pretrained(str(out / "base"))
    family_tokenizer(name).save_pretrained(str(out / "tokenizer"))
    torch.manual_seed(seed + 1)
    lora = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                      target_modules=list(spec.lora_targets), init_lora_weights="gaussian")
    model = get_peft_model(base, lora)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 2)
    vocab = spec.vocab_size
    for _ in range(optimizer_steps):  # real steps: exp_avg / exp_avg_sq / step as after training
        ids = torch.randint(3, vocab, (4, 10), generator=gen)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # set order depends on hash seed
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    save_optimizer(optimizer, trainable, out / "optimizer.pt")
    (out / "training_args.json").write_text(json.dumps({
        **TRAINING_ARGS, "family": name, "seed": seed,
        "lora": {"r": lora_r, "target_modules": sorted(spec.lora_targets)}}, indent=2))
    return out


def write_family_prompts(path: str | Path, num: int = 8, *, empty_answers: bool = True) -> Path:
    """`num` toy prompts "a+b=" (characters every family tokenizer knows) as JSONL.

    With empty_answers (default) the answer is "": a random model is rewarded when its first token is EOS, which is
    the only outcome it produces often enough for mixed rewards (see tests/synthetic_checkpoint.py); otherwise the
    answer is str(a + b).
    """
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a + 1}=", "answer": "" if empty_answers else str(2 * a + 1)})
                            + "\n" for a in range(num)))
    return path
