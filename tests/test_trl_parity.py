"""The probe's training loss against TRL's own (trl 1.16 GRPOTrainer) on identical sequences (docs/method.md §4).

TRL is the real client here: tests/trl_reference.py runs GRPOTrainer._generate_and_score_completions on the probe's
sampled U batch (only the generation replaced by the probe's samples), so TRL itself computes the advantages
(scale_rewards, its ε = 1e-4), the truncation mask and the token counts, then calls trainer.compute_loss on each
micro-step block in train mode and backpropagates. The probe computes g = ∇L_U with update_gradient on the same
batch and options. Acceptance: relative L2 difference of the LoRA gradients ≤ 1e-6 in fp32, for every combination
of loss aggregation × scale_rewards × β (0, with and without the bias correction) × mask_truncated ×
top_entropy_quantile × entropy coefficient, over two micro-step blocks (gradient accumulation 2, where bnpo's
per-block token mean and the per-block entropy quantile differ from a single batch).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from probe_dist.data.rewards import decode_response
from probe_dist.rollout.sample import sample_batch
from probe_dist.update.gradient import update_gradient
from tests.probe_harness import make_probe, write_prompts
from tests.tolerances import fp_bound, two_path_tol64

pytest.importorskip("trl")
from tests.trl_reference import trl_gradient, trl_trainer  # noqa: E402

# Single-digit operands: every prompt has one token length (TRL would left-pad otherwise). Sums ≥ 10 need 3 tokens
# with EOS, so at max_new_tokens = 2 those responses are truncated — mask_truncated has work to do.
PAIRS = [(3, 4), (5, 8), (9, 9), (2, 7), (6, 6), (1, 8), (4, 9), (7, 5)]
B_U, G_U, BLOCKS = 8, 4, 2
ROWS = B_U * G_U // BLOCKS
LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
SCALES = ("group", "batch", "none")
KL = ((0.0, False), (0.04, False), (0.04, True))


def _advantage_tol(rewards: torch.Tensor, scale: str) -> float:
    """A bound on |A_TRL − A_probe|: TRL computes A = (r − mean)/(std + ε) in float32 from float32 rewards, the
    probe in float64. Over n = G (per group) or B·G (batch std) rewards: the mean and the sum of squares are sums
    of n terms, then a subtraction, a square root, an addition and a division: fp_bound(float32, 2n + 4, S) with
    S = max|A| + max(|r| + |mean|)/(std + ε) (the terms' size relative to the divisor). An ε of 1e-6 instead of
    TRL's 1e-4 (or a std with the other Bessel correction) moves A by ≥ 1e-4 relative, ≥ 10× this."""
    r = rewards.double()
    n = r.numel() if scale == "batch" else G_U
    groups = r.view(-1, G_U)
    spread = (groups.abs() + groups.mean(-1, keepdim=True).abs()).max()
    std = groups.std(-1) if scale != "batch" else r.std().expand(groups.shape[0])
    divisor = (std + 1e-4).min() if scale != "none" else torch.tensor(1.0, dtype=torch.float64)
    big = float(spread / divisor)
    return fp_bound(torch.float32, 2 * n + 4, 2 * big)


def _with_advantages(groups, advantages: torch.Tensor):
    """Set the groups' advantages (sorted by prompt index) from one flat tensor; returns the previous ones."""
    before = [g.advantages for g in groups]
    for g, a in zip(groups, advantages.double().split([g.size for g in groups])):
        g.advantages = a.clone()
    return before


@pytest.fixture(scope="module")
def setup(toy_checkpoint, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("trl") / "prompts.jsonl", PAIRS)
    overrides = [f"sampling.prompts={prompts}", "sampling.max_new_tokens=2", "update.loss=dapo",
                 "update.grad_clip=0", "update.adv_eps=1e-4", f"sampling.B_U={B_U}", f"sampling.G_U={G_U}"]
    probe = make_probe(toy_checkpoint, overrides)
    probe64 = make_probe(toy_checkpoint, [*overrides, "precision.dtype=float64"])  # the float32 error's reference
    cfg = probe.cfg
    batches = {scale: sample_batch(probe.rt, probe.runner.decoder, probe.tokenizer, "U", sampling=cfg.sampling,
                                   num_prompts=B_U, group_size=G_U, loss_family="dapo", adv_eps=1e-4,
                                   rows_per_chunk=8, lockstep=False, eos_ids=probe.eos_ids, scale_rewards=scale)
               for scale in SCALES}
    groups = sorted(batches["group"].groups, key=lambda g: g.prompt_index)
    texts = [decode_response(probe.tokenizer, g.responses[i, :int(g.lengths[i])], probe.eos_ids)
             for g in groups for i in range(g.size)]
    ended = torch.cat([g.ended for g in groups])
    assert 0 < int(ended.sum()) < ended.numel(), "the batch must mix finished and truncated responses"
    rewards = torch.cat([g.rewards for g in groups])
    assert 0 < float(rewards.sum()) < rewards.numel(), "the batch must mix rewards"
    return probe, probe64, batches, texts


def _relative(probe, ours: list[torch.Tensor], theirs: dict[str, torch.Tensor] | list[torch.Tensor]) -> float:
    """‖ours − theirs‖ / ‖theirs‖ over the adapter (theirs by parameter name, or in `ours`' order)."""
    if not isinstance(theirs, dict):
        theirs = {name: t for (name, _), t in zip(probe.trainable, theirs)}
    num = den = 0.0
    for (name, _), g in zip(probe.trainable, ours):
        num += float((g.double() - theirs[name].double()).pow(2).sum())
        den += float(theirs[name].double().pow(2).sum())
    return (num / den) ** 0.5


def _combinations():
    return list(itertools.product(SCALES, KL, (False, True), (1.0, 0.2), (0.0, 0.01)))


def _loss_cases(fast: str | None):
    """LOSSES as parameters, all slow but `fast` (the fast tier checks one loss against TRL, the full suite all;
    None: all slow — the full-model gradient comparison takes ~90 s per loss on 2 cores)."""
    return [pytest.param(loss, marks=() if loss == fast else (pytest.mark.slow,)) for loss in LOSSES]


@pytest.mark.parametrize("loss", _loss_cases(None))
def test_gradient_equals_trl_compute_loss(setup, toy_checkpoint, loss, float64_norms):
    probe, probe64, batches, texts = setup
    worst = []
    for scale, (beta, bias_correction), mask_truncated, quantile, entropy_coef in _combinations():
        trainer = trl_trainer(toy_checkpoint, loss_type=loss, scale_rewards=scale, beta=beta,
                              use_bias_correction_kl=bias_correction, mask_truncated_completions=mask_truncated,
                              top_entropy_quantile=quantile, entropy_coef=entropy_coef, block_rows=ROWS,
                              num_blocks=BLOCKS, group_size=G_U, max_completion_length=2)
        theirs, prepared = trl_gradient(trainer, batches[scale].groups, block_rows=ROWS, texts=texts)
        groups = sorted(batches[scale].groups, key=lambda g: g.prompt_index)
        # TRL's advantages (float32) are the probe's, and so is its truncation mask.
        ours_adv = torch.cat([g.advantages for g in groups])
        tol_adv = _advantage_tol(torch.cat([g.rewards for g in groups]), scale)  # tol: fp (_advantage_tol)
        assert torch.allclose(prepared["advantages"].double(), ours_adv, rtol=0, atol=tol_adv), scale
        kept = torch.cat([g.kept(mask_truncated) for g in groups])
        assert torch.equal(prepared["completion_mask"].sum(1) > 0, kept)
        update = dataclasses.replace(probe.cfg.update, loss=loss, scale_rewards=scale, kl_coef=beta,
                                     kl_bias_correction=bias_correction, mask_truncated=mask_truncated,
                                     top_entropy_quantile=quantile, entropy_coef=entropy_coef,
                                     loss_block_rows=ROWS, max_len=2)
        # The gradients on TRL's own (float32-rounded) advantages, so that what is compared is the forward and the
        # loss (the advantages are checked above); and the same in float64: the probe's float32 error.
        before = _with_advantages(groups, prepared["advantages"])
        ours, *_ = update_gradient(probe.rt, probe.runner, batches[scale], update)
        ours64, *_ = update_gradient(probe64.rt, probe64.runner, batches[scale], update)
        _with_advantages(groups, torch.cat(before))
        err32 = _relative(probe, ours, ours64)
        # tol: fp two float32 paths (TRL's fused head over whole sequences + its loss vs the probe's chunked scorer
        # + its loss): each within ≈ err32 (relative) of the exact gradient — u₃₂ × this batch's condition number,
        # measured against float64, the KL term's amplification 1/|ref − ℓ| of ℓ's rounding included — 4× each,
        # plus 4u₃₂ (one rounding) as a floor. A missing term (KL, its bias correction, the entropy bonus: ≥ 1e-4
        # relative on the toy), a wrong normaliser or mask (≥ 1e-2) is far outside.
        tol = 2 * (4 * err32 + fp_bound(torch.float32, 1, 1.0))  # tol: fp (above)
        worst.append((_relative(probe, ours, theirs) / tol, _relative(probe, ours, theirs), tol, scale, beta,
                      bias_correction, mask_truncated, quantile, entropy_coef))
    worst.sort(reverse=True)
    print(f"{loss}: worst relative gradient difference {worst[0][1]:.2e} = {worst[0][0]:.2f} of its bound {worst[0][2]:.2e}")
    assert worst[0][0] <= 1, f"{loss}: largest relative gradient difference / tolerance {worst[0]}"


@pytest.fixture(scope="module")
def gpt2_float64(tmp_path_factory):
    """A GPT-2-family model (float64 throughout) with random rewards on its U batch: TRL computes its advantages
    from them, the probe its own."""
    from probe_dist.rollout.batch import group_advantages
    from tests.model_families import build_family_checkpoint, write_family_prompts

    root = tmp_path_factory.mktemp("gpt2trl")
    ckpt = build_family_checkpoint("gpt2", root / "ckpt")
    prompts = write_family_prompts(root / "prompts.jsonl")
    overrides = [f"sampling.prompts={prompts}", "update.loss=dapo", "update.grad_clip=0", "update.adv_eps=1e-4",
                 f"sampling.B_U={B_U}", f"sampling.G_U={G_U}"]
    probe = make_probe(ckpt, [*overrides, "precision.dtype=float64"])
    probe32 = make_probe(ckpt, overrides)  # the same in float32: the condition number of the gradient
    batch = probe.sample("U", B_U, G_U)
    gen = torch.Generator().manual_seed(3)
    for g in batch.groups:
        g.rewards = torch.randint(0, 3, (g.size,), generator=gen).double()
    texts = [decode_response(probe.tokenizer, g.responses[i, :int(g.lengths[i])], probe.eos_ids)
             for g in sorted(batch.groups, key=lambda g: g.prompt_index) for i in range(g.size)]
    return probe, probe32, ckpt, batch, texts, group_advantages


@pytest.mark.parametrize("loss", _loss_cases("grpo"))
def test_loss_formula_equals_trl_on_identical_log_probs(gpt2_float64, loss):
    """TRL's loss code fed the probe's own float64 per-token log-probs and entropies (tests/trl_reference.py
    use_probe_forward), and TRL's own advantages, gives the probe's gradient to float64 rounding for every
    combination (two_path_tol64 from the float32 run; measured ≤ 0.1 of that bound, ~5e-16 relative): the formula
    is the same, and what remains in the fp32 comparison above is forward rounding."""
    from tests.trl_reference import use_probe_forward

    probe, probe32, ckpt, batch, texts, group_advantages = gpt2_float64
    worst = []
    for scale, (beta, bias_correction), mask_truncated, quantile, entropy_coef in _combinations():
        for g in batch.groups:
            g.advantages = group_advantages(g.rewards, "group" if scale == "batch" else scale, 1e-4)
        if scale == "batch":
            from probe_dist.rollout.batch import batch_reward_std

            std = batch_reward_std([g.rewards for g in sorted(batch.groups, key=lambda g: g.prompt_index)])
            for g in batch.groups:
                g.advantages = group_advantages(g.rewards, "batch", 1e-4, batch_std=std)
        trainer = trl_trainer(ckpt, loss_type=loss, scale_rewards=scale, beta=beta,
                              use_bias_correction_kl=bias_correction, mask_truncated_completions=mask_truncated,
                              top_entropy_quantile=quantile, entropy_coef=entropy_coef, block_rows=ROWS,
                              num_blocks=BLOCKS, group_size=G_U, max_completion_length=probe.cfg.sampling.max_new_tokens)
        trainer.model.double()
        use_probe_forward(trainer)
        theirs, prepared = trl_gradient(trainer, batch.groups, block_rows=ROWS, texts=texts)
        groups = sorted(batch.groups, key=lambda g: g.prompt_index)
        tol_adv = _advantage_tol(torch.cat([g.rewards for g in groups]), scale)  # tol: fp (_advantage_tol)
        assert torch.allclose(prepared["advantages"].double(), torch.cat([g.advantages for g in groups]), rtol=0,
                              atol=tol_adv), scale
        update = dataclasses.replace(probe.cfg.update, loss=loss, scale_rewards=scale, kl_coef=beta,
                                     kl_bias_correction=bias_correction, mask_truncated=mask_truncated,
                                     top_entropy_quantile=quantile, entropy_coef=entropy_coef,
                                     loss_block_rows=ROWS, max_len=probe.cfg.sampling.max_new_tokens)
        # On TRL's own float32 advantages (checked above), the two loss codes see identical inputs: what remains
        # is float64 rounding. Its size: the same gradient in float32 (the GPT-2 model rounded too), rescaled.
        _with_advantages(groups, prepared["advantages"])
        ours, *_ = update_gradient(probe.rt, probe.runner, batch, update)
        ours32, *_ = update_gradient(probe32.rt, probe32.runner, batch, update)
        norm = sum(float(g.double().pow(2).sum()) for g in ours) ** 0.5
        err32 = _relative(probe, ours32, ours) * norm
        # tol: fp two float64 paths (TRL's loss code vs the probe's on the same log-probs, entropies and advantages):
        # two_path_tol64 from the float32 run's measured error; a formula difference (a normaliser, a mask, the KL's
        # bias correction) is ≥ 1e-4 relative
        tol = two_path_tol64(err32, norm) / norm
        worst.append((_relative(probe, ours, theirs) / tol, _relative(probe, ours, theirs), tol, scale, beta,
                      bias_correction, mask_truncated, quantile, entropy_coef))
    worst.sort(reverse=True)
    print(f"{loss}: worst relative gradient difference {worst[0][1]:.2e} = {worst[0][0]:.2f} of its bound {worst[0][2]:.2e}")
    assert worst[0][0] <= 1, f"{loss}: largest relative gradient difference / tolerance {worst[0]}"
