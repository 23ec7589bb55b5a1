"""The byte model: each phase's peak bytes per GPU from a ModelShape and the run's Settings.

Memory model (b = bytes of precision.dtype; n rows × L = prompt + max_new_tokens tokens per microbatch;
M = n × max_new_tokens scored positions; h hidden, I intermediate, H heads, d head dim, V vocabulary, ℓ layers;
a gradient microbatch's rows belong to one prompt group, so n ≤ G; a scoring microbatch's to one block of groups):

  static      weights (b each; FSDP2 shards the frozen base: ÷ world size, plus two unsharded decoder layers),
              adapter (b) and AdamW exp_avg/exp_avg_sq on the device in the parameter dtype (replicated),
              DDP gradient buckets (adapter × b), param-sized accumulators only if memory.accumulator_device=model
              (snapshots, the update vector and gradient accumulators are float64 on CPU by default);
              adapter gradients (adapter × b) in the passes with grad.
  saved for backward, per layer and token (Qwen2/Llama-style decoder, SDPA, frozen base, LoRA on projections):
              both RMSNorm inputs in float32 (8h) and their rsqrt; SDPA's q, k, v (k/v repeated to H heads when a
              padding mask is passed — the default assumption, an upper bound) and output, which is also o_proj's
              input (4·b·h), its log-sum-exp (4·H) and the additive mask (b·L); MLP gate, SiLU(gate), up (3·b·I);
              LoRA: each lora_A's input (shared when adapter and model dtype agree: b·h for q/k/v, b·h for gate/up,
              b·I for down; a float32 copy per projection for a bf16 model) and rank-r output (4·r);
              plus, once: the final norm input (4h), RoPE cos/sin (2·b·d), the response hidden states and targets
              (M·(b·h + 8)), minus layer 0's norm input (the embedding output needs no grad).
              tests/test_plan.py checks this against SavedTensorsMeter on real forwards (equal to ~0.1%).
  transient   grad passes: the larger of the checkpointed head chunk's backward (5 float32 [chunk, V] buffers,
              measured) and one layer's backward workspace (b·(1.5·I + h) per token); no-grad passes: the residual
              stream plus one layer's temporaries (b·(2h + max(4I + 2h, 8h)) per token, and the mask), or at the
              head the last hidden states + response hidden states + 4 float32 [chunk, V] buffers.
  GRADE       (update.loss grade/grade_st) the update pass is `grade_pass`: its kept KV cache, relaxed tokens and
              reward input, plus the largest recomputation in backward.
  generation  KV cache 2·ℓ·kv·d·g·L·b for the g ≤ memory.microbatch_generate rows of a block of whole groups
              decoded together (left-padded to the longest prompt), plus one layer's cache copy, and the larger of
              the prefill temporaries and the per-step float32 logits/probabilities (3·g·V·4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from probe_dist.phases import DELTA_H1, EXPLAIN, SAMPLE, SCORE_BASE, SWEEP, UPDATE_GRADIENT
from probe_dist.plan.shape import ModelShape

GiB = 1 << 30
GRAD_LOGITS_FACTOR = 5   # float32 [chunk, V] buffers alive in a checkpointed head chunk's backward (measured: 4.95)
NOGRAD_LOGITS_FACTOR = 4  # ... in a no-grad chunk (logits, shifted z, exp(z) at once; one more as a margin)
MIN_LOGITS_CHUNK = 64
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
STATIC_COMPONENTS = ("weights", "adapter", "optimizer_state", "ddp_buckets", "accumulators", "reward_model")


@dataclass(kw_only=True)
class Settings:
    """The run's sizes that the byte model needs (bytes per element, token counts, group sizes, switches)."""

    dtype_bytes: int
    world_size: int
    strategy: str
    prompt_tokens: int
    max_new_tokens: int
    group_e: int
    group_u: int
    single_batch: bool
    kl: bool
    real_step: bool
    amsgrad: bool
    accumulators_on_device: bool
    rows_generate: int = 8  # memory.microbatch_generate: rows of a block of whole groups decoded together
    explain: bool = False   # estimators.explain (and not fsdp2): the forward-mode explanation pass runs
    nested_delta_h1: bool = False  # δH₁ is read off the explanation's nested pass (explain on, not bfloat16,
    #                                two-batch mode): the δH₁ phase holds that pass, the explain phase no longer does
    grade_top_k: int | None = None  # GRADE (update.loss grade/grade_st): relaxation support k (0: V); None: not GRADE
    reward_model_params: int = 0    # GRADE: the reward model's parameters (its weights stay on the device)

    @property
    def seq_len(self) -> int:
        """L = prompt_tokens + max_new_tokens: tokens per row of a microbatch."""
        return self.prompt_tokens + self.max_new_tokens


def saved_activation_bytes(shape: ModelShape, n: int, seq_len: int, scored: int, *, dtype_bytes: int,
                           padded: bool = True) -> int:
    """Bytes autograd saves for backward in one forward of n rows × seq_len tokens (`scored` positions per row).

    dtype_bytes: bytes per element of the model's dtype. padded=True (the default, an upper bound): rows of
    different lengths make transformers pass an attention mask, and SDPA then runs on k/v repeated to all heads
    and saves the additive mask; without padding k/v stay at the KV heads and there is no mask.
    """
    b, h, t = dtype_bytes, shape.hidden, n * seq_len
    # peft keeps adapters in float32 (float64 models: float64); full fine-tuning has no separate adapter dtype
    lb = b if shape.full_finetune else (8 if b == 8 else 4)
    mods = shape.lora_modules
    attn_lora = bool(set(mods) & {"q_proj", "k_proj", "v_proj", "o_proj"})
    if lb == b:  # LoRA A saves its input; q/k/v share the normalised input, gate/up theirs, o_proj's is SDPA's
        lora_inputs = b * (h * bool(set(mods) & {"q_proj", "k_proj", "v_proj"})
                           + h * bool(set(mods) & {"gate_proj", "up_proj"}) + shape.intermediate * ("down_proj" in mods))
    else:  # each LoRA A casts its input to float32: one copy per projection
        lora_inputs = lb * sum(in_f for in_f, _ in mods.values())
    lora_outputs = lb * sum(r for _, r in mods.values())
    kv = h if padded else shape.kv_heads * shape.head_dim
    sdpa = b * (2 * h + 2 * kv) + 4 * shape.heads + (b * seq_len if padded else 0)
    norms = 2 * 4 * h + 8  # both RMSNorm inputs in float32, and their rsqrt
    mlp = 3 * b * shape.intermediate  # gate, SiLU(gate), up
    per_layer = norms + sdpa + mlp + lora_inputs + lora_outputs
    # Layer 0's input (the embedding output) needs no grad: its first norm input is not saved, nor — without LoRA
    # in its attention — its attention or second norm input. The final norm input and RoPE cos/sin are saved once.
    layer0 = 4 * h + (0 if attn_lora else sdpa + 4 * h)
    model_level = 4 * h + 2 * b * shape.head_dim - layer0
    m = n * scored
    response = m * (b * h + 8) + n * scored  # hidden states at scored positions, targets, response mask
    return int(t * (shape.num_layers * per_layer + model_level) + response)


def logits_chunk_bytes(shape: ModelShape, chunk: int, grad: bool) -> int:
    """Bytes of the float32 [chunk, vocab] buffers alive at once in one logits chunk (with or without grad)."""
    return (GRAD_LOGITS_FACTOR if grad else NOGRAD_LOGITS_FACTOR) * chunk * shape.vocab * 4


def _static(shape: ModelShape, s: Settings) -> dict[str, int]:
    b, ws = s.dtype_bytes, s.world_size
    shard = ws if s.strategy == "fsdp2" and ws > 1 else 1
    # FSDP2 shards the frozen base only: the adapter, its optimizer state and gradients stay replicated
    # (probe_dist.runtime.strategy), so their gradients are reduced by the probe in float64.
    out = {
        "weights": math.ceil(shape.base_params * b / shard),
        "adapter": 0 if shape.full_finetune else shape.adapter_params * b,
        "optimizer_state": (3 if s.amsgrad else 2) * shape.adapter_params * b,
    }
    if s.strategy == "ddp" and ws > 1:
        out["ddp_buckets"] = shape.adapter_params * b
    if shard > 1:
        out["fsdp_unsharded_layers"] = 2 * shape.layer_params * b
    if s.accumulators_on_device:
        out["accumulators"] = 4 * shape.adapter_params * 8
    if s.reward_model_params:
        out["reward_model"] = s.reward_model_params * b
    return out


def _nograd_forward(shape: ModelShape, s: Settings, n: int, chunk: int) -> dict[str, int]:
    """Peak of one no-grad scoring forward: inside the widest layer, or at the chunked head."""
    b, h, L = s.dtype_bytes, shape.hidden, s.seq_len
    t = n * L
    inside = t * b * (2 * h + max(4 * shape.intermediate + 2 * h, 8 * h)) + n * L * L * (b + 1)
    m = n * s.max_new_tokens
    at_head_hidden = t * b * h + m * b * h
    at_head = at_head_hidden + logits_chunk_bytes(shape, min(chunk, m), grad=False)
    if inside >= at_head:
        return {"forward_transient": inside, "response_hidden": 0, "logits_chunk": 0}
    return {"forward_transient": 0, "response_hidden": at_head_hidden,
            "logits_chunk": logits_chunk_bytes(shape, min(chunk, m), grad=False)}


def _grad_pass(shape: ModelShape, s: Settings, n: int, chunk: int) -> dict[str, int]:
    """Peak of one forward+backward: all saved activations + the larger of head backward and a layer's."""
    b, h, L = s.dtype_bytes, shape.hidden, s.seq_len
    m = n * s.max_new_tokens
    saved = saved_activation_bytes(shape, n, L, s.max_new_tokens, dtype_bytes=b)
    head = logits_chunk_bytes(shape, min(chunk, m), grad=True) + m * 4 * h
    layer = n * L * b * (3 * shape.intermediate // 2 + h)
    return {"activations_saved": saved, "logits_chunk": head if head >= layer else 0,
            "layer_workspace": layer if layer > head else 0}


def block_rows(rows_generate: int, group: int) -> int:
    """Rows of one decode call: whole groups up to memory.microbatch_generate rows (at most that many), or a chunk
    of one larger group (runtime.sharding.groups_per_block with the batch size unknown: an upper bound)."""
    return min(rows_generate, group) if group >= rows_generate else (rows_generate // group) * group


def _sample(shape: ModelShape, s: Settings) -> dict[str, int]:
    b = s.dtype_bytes
    g = max(block_rows(s.rows_generate, s.group_e), block_rows(s.rows_generate, s.group_u))  # rows decoded together
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * b
    kv = shape.num_layers * per_token_layer * g * s.seq_len
    prefill = g * s.prompt_tokens * b * (2 * shape.hidden + max(4 * shape.intermediate + 2 * shape.hidden,
                                                                8 * shape.hidden))
    step = 3 * g * shape.vocab * 4 + g * shape.vocab * b
    return {"kv_cache": kv, "generation_transient": per_token_layer * g * s.seq_len + max(prefill, step)}


def sample_peak(shape: ModelShape, s: Settings) -> int:
    """Predicted peak bytes per GPU of the sample phase (static part + KV cache + decode transients)."""
    return int(sum(_static(shape, s).values()) + sum(_sample(shape, s).values()))


def grade_pass(shape: ModelShape, s: Settings, n: int) -> dict[str, int]:
    """Peak of one GRADE microbatch (update/grade.py) of n rows, T = max_new_tokens relaxed tokens, L = P + T.

    Kept until backward: each step's new k/v per layer with gradient, for the policy and (β > 0 or a shared reward
    head: assumed) the reference, 2·ℓ·kv·d·b per token and model; the k relaxed weights (float32) and ids (int64),
    the hard id, the next input embedding (b·h) and the KL (float64) per step; the reward model's input [n, L, h]
    (its hidden size taken as the policy's). Transient, one at a time in backward: the prompt's recomputed forward
    (both models), or a step's recomputation — the concatenated past of both models, one token's activations and
    the [n, V] logits, softmax and float64 KL buffers (≈ 5 float32 + 4 float64 per entry) — or the reward
    model's recomputed forward (taken as the policy's shape without LoRA), whichever is largest.
    """
    b, h, v = s.dtype_bytes, shape.hidden, shape.vocab
    big_t, length = s.max_new_tokens, s.seq_len
    k = min(s.grade_top_k or v, v)
    models = 2
    kv_token = 2 * shape.num_layers * shape.kv_heads * shape.head_dim * b
    kept = models * kv_token * n * length
    ids = 8 * k * (n if k < v else 1)  # with k = V the ids are one arange viewed per row
    tokens = big_t * (n * (4 * k + 8 + b * h + 8) + ids)
    reward_input = n * length * b * h
    prefill = models * saved_activation_bytes(shape, n, s.prompt_tokens, 0, dtype_bytes=b, padded=False)
    step = (models * kv_token * n * length + models * saved_activation_bytes(shape, n, 1, 0, dtype_bytes=b,
                                                                           padded=False)
            + n * v * (5 * 4 + 4 * 8))
    bare = ModelShape(**{**shape.__dict__, "lora_modules": {}, "notes": []})
    reward = saved_activation_bytes(bare, n, length, 0, dtype_bytes=b, padded=False)
    return {"grade_kv_cache": kept, "grade_soft_tokens": tokens, "grade_reward_input": reward_input,
            "grade_recompute": max(prefill, step, reward)}


def phase_peaks(shape: ModelShape, s: Settings, *, rows_score: int, rows_grad: int, chunk: int,
                rows_jvp: int | None = None) -> dict[str, dict]:
    """Predicted peak bytes per GPU of every phase, for these microbatch sizes and logits chunk.

    rows_score / rows_grad / rows_jvp: rows per no-grad / grad / forward-mode pass (capped at the group sizes;
    rows_jvp defaults to rows_score); chunk: logits positions.
    Returns {phase: {"peak_bytes": int, "components": {name: bytes}}} in probe_dist.phases.PHASES order; the
    components add up to the peak.
    """
    static = _static(shape, s)
    grads = {"adapter_grads": shape.adapter_params * s.dtype_bytes}
    # Scoring forwards, the teacher-forced loss's gradient passes, forward-mode δH₁, ∇Ĥ and the explanation's passes
    # span the groups of a block; GRADE and the reverse-mode δH₁ (single_batch) stay in one group.
    rs_e = min(rows_score, block_rows(s.rows_generate, s.group_e))
    rg_e, rg_u = min(rows_grad, s.group_e), min(rows_grad, s.group_u)
    rb_e, rb_u = (min(rows_grad, block_rows(s.rows_generate, g)) for g in (s.group_e, s.group_u))
    rows_jvp = rows_score if rows_jvp is None else rows_jvp
    rj_e, rj_u = (min(rows_jvp, block_rows(s.rows_generate, g)) for g in (s.group_e, s.group_u))

    def total(parts: dict) -> dict:
        return {"peak_bytes": int(sum(parts.values())), "components": {k: int(v) for k, v in parts.items()}}

    def best(*alternatives: dict) -> dict:
        return max(alternatives, key=lambda d: sum(d.values()))

    out = {SAMPLE: total({**static, **_sample(shape, s)}),
           SCORE_BASE: total({**static, **_nograd_forward(shape, s, rs_e, chunk)})}
    update = {**static, **grads, **_grad_pass(shape, s, rb_u, chunk)}
    if s.grade_top_k is not None:  # GRADE: relaxed rollouts instead of a teacher-forced loss pass
        update = {**static, **grads, **grade_pass(shape, s, rg_u)}
    elif s.kl:  # reference log-probs: a no-grad forward with microbatch_grad rows and the adapter disabled
        update = best(update, {**static, **grads, **_nograd_forward(shape, s, rb_u, chunk)})
    out[UPDATE_GRADIENT] = total(update)
    if s.single_batch:  # reverse mode: one forward and two backward passes per group microbatch
        d1 = best({**static, **grads, **_grad_pass(shape, s, rg_e, chunk)},
                  {**static, **grads, **_grad_pass(shape, s, rg_u, chunk)})
    else:  # forward mode: a no-grad forward with tangents (one copy; three for the nested pass), rows_jvp rows
        copies = 4 if s.nested_delta_h1 else 2  # across a block's groups
        d1 = {**static, **{f"forward_mode_{k}": copies * v
                           for k, v in _nograd_forward(shape, s, rj_e, chunk).items()}}
    out[DELTA_H1] = total(d1)
    explain = dict(static)
    if s.explain:
        # Forward mode keeps no graph: a no-grad forward whose every tensor comes with tangents — three more copies
        # for E's nested (second-order) pass (unless δH₁ ran it), one for U's first-order pass
        # (explain/directional.py); and, after a forward-mode δH₁, ∇Ĥ by one forward + backward per E block microbatch.
        e_side = {f"forward_mode_{k}": 4 * v for k, v in _nograd_forward(shape, s, rj_e, chunk).items()}
        u_side = {f"forward_mode_{k}": 2 * v for k, v in _nograd_forward(shape, s, rj_u, chunk).items()}
        sides = ([] if s.nested_delta_h1 else [e_side]) + [u_side]
        sides += [] if s.single_batch else [{**grads, **_grad_pass(shape, s, rb_e, chunk)}]
        explain.update(best(*sides))
    out[EXPLAIN] = total(explain)
    sweep = {**static, **_nograd_forward(shape, s, rs_e, chunk)}
    if s.real_step:
        sweep["real_step_transient"] = 3 * shape.adapter_params * s.dtype_bytes
    out[SWEEP] = total(sweep)
    return out
