"""Start-up check that the scorer scores the sampler's distribution (docs/method.md §1).

Sampling calls the model's own forward one token at a time with a KV cache; scoring runs a teacher-forced
forward and computes the head chunk by chunk. They must give the same next-token log-probs at every scored
position, or ℓ, H and the importance weights describe another distribution than the samples. Known ways they
part: logit post-processing the scorer does not apply (soft-capping, scaling in custom heads), position encodings
whose values depend on the sequence length seen so far (dynamic-NTK RoPE), remote code.
"""

from __future__ import annotations

import torch

from probe_dist.errors import CheckpointError
from probe_dist.model.runner import PolicyRunner
from probe_dist.rollout.batch import Group

# Largest |ℓ_decode − ℓ_score| accepted, by the dtype of the probe's forwards: rounding differences between a
# cached one-token forward and a full teacher-forced forward (fp32: ~1e-6 measured on default RoPE; float64
# models keep fp32 layers such as Qwen2's RMSNorm, so the same bound). A skipped soft-cap is off by ~1 nat.
TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 5e-2}
# torch.set_float32_matmul_precision lets float32 matmuls round their inputs: "high" to TF32 (GPU) or bf16x3,
# "medium" to bfloat16 (GPU, and CPUs with AVX512-BF16/AMX through oneDNN). Their gap is that of the reduced
# format's forwards: 1e-3 measured for "medium" on an AMX CPU (toy, float32), ~1000x the exact-float32 one.
MATMUL_TOLERANCE = {"highest": 0.0, "high": TOLERANCE[torch.float16], "medium": TOLERANCE[torch.bfloat16]}


def sampler_scorer_tolerance(dtype: torch.dtype, matmul_precision: str = "highest") -> float:
    """The largest accepted |ℓ_decode − ℓ_score| (nats) for forwards in `dtype` under the float32 matmul
    precision `matmul_precision` ("highest" | "high" | "medium", as torch.set_float32_matmul_precision).

    The looser of the dtype's bound and, for float32/float64 models, the reduced matmul format's. Raises KeyError
    for a dtype or precision not listed."""
    tolerance = TOLERANCE[dtype]
    if dtype in (torch.float32, torch.float64):
        tolerance = max(tolerance, MATMUL_TOLERANCE[matmul_precision])
    return tolerance


@torch.no_grad()
def decode_logps(runner: PolicyRunner, group: Group, rows: int, steps: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Teacher-forced log-probs of the first `rows` responses of `group`, through the sampler's decoding path.

    As `rollout.generate.sample_rows` decodes a block: the prompts are left-padded with two pad tokens (masked
    out; positions count real tokens), one `decode` call for the prompts, then one per response token with the
    KV cache; `steps` (≥ the group's width) decode calls in all, so FSDP2 ranks stay in lockstep. So a model that
    mishandles left padding or position ids fails the check too. Returns (decode log-probs [M], scorer log-probs
    [M]) over the scored positions, float64 CPU.
    """
    mb = group.layout(slice(0, min(rows, group.size)))
    scored, _ = runner.forward(mb, grad=False)
    device, n, start = runner.device, mb.num_rows, mb.response_start
    width = mb.response_mask.shape[1]
    responses = mb.input_ids[:, start:].to(device)
    pads = 2  # left padding in front of every row, as a block with a longer prompt has
    step_input = torch.cat([torch.full((n, pads), pad_id, dtype=torch.long), mb.input_ids[:, :start]], 1).to(device)
    mask = torch.cat([torch.zeros(n, pads, dtype=torch.long), torch.ones(n, start, dtype=torch.long)], 1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, columns = None, []
    for t in range(max(steps, width)):
        logits, cache = runner.decoder.decode(step_input, past_key_values=cache, position_ids=positions,
                                              attention_mask=mask)
        if t < width:
            logp = torch.log_softmax(logits.float() / runner.temperature, dim=-1)
            columns.append(logp.gather(-1, responses[:, t:t + 1]).squeeze(-1))
            step_input = responses[:, t:t + 1]
        else:
            step_input = torch.full((n, 1), pad_id, dtype=torch.long, device=device)
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long, device=device)], dim=1)
    decoded = torch.stack(columns, dim=1)[mb.response_mask.to(device)]
    return decoded.double().cpu(), scored.double().cpu()


def sampler_scorer_gap(runner: PolicyRunner, group: Group, *, steps: int, pad_id: int, rows: int = 2) -> float:
    """max |ℓ_decode − ℓ_score| (nats) over the scored tokens of the first `rows` responses of `group`."""
    decoded, scored = decode_logps(runner, group, rows, steps, pad_id)
    if decoded.numel() == 0:
        return 0.0
    return float((decoded - scored).abs().max())


def check_sampler_scorer(rt, runner: PolicyRunner, group: Group, *, pad_id: int, lockstep_steps: int,
                         dtype_name: str, matmul_precision: str) -> float:
    """The largest |ℓ_decode − ℓ_score| over every rank's first group (nats), or CheckpointError when it exceeds
    `sampler_scorer_tolerance` (or is NaN): the model is then not supported as it is.

    lockstep_steps: decode calls every rank makes under FSDP2 (sampling.max_new_tokens; ignored otherwise);
    dtype_name, matmul_precision: precision.dtype and precision.matmul, for the tolerance and the message."""
    steps = lockstep_steps if runner.strategy.name == "fsdp2" else 0
    local = sampler_scorer_gap(runner, group, steps=steps, pad_id=pad_id)
    gap = float(rt.max_f64(torch.tensor([local]))[0])
    policy = runner.strategy.policy
    tolerance = sampler_scorer_tolerance(policy.head.weight.dtype, matmul_precision)
    if not gap <= tolerance:  # also NaN
        lm = type(policy.lm.get_base_model() if hasattr(policy.lm, "get_base_model") else policy.lm)
        raise CheckpointError(
            f"the model's own decoding step and the probe's teacher-forced scorer disagree by up to {gap:.3g} "
            f"nats in log-prob on the same tokens (tolerance {tolerance:g} for {dtype_name}, matmul "
            f"precision {matmul_precision}), "
            f"model class {lm.__name__}. The probe's importance weights and entropies would describe another "
            "distribution than the samples. Known causes: logit post-processing the probe does not know "
            "(a custom head or remote code), or position encodings that depend on the length seen so far "
            "(e.g. dynamic-NTK RoPE scaling: use a fixed rope_scaling in the model config). This model is not "
            "supported as it is.")
    return gap
