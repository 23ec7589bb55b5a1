"""GRADE (update.loss=grade): the relaxed token, the KV-cached soft rollout with gradient, the aligned online KL and
the reward model's soft input — each against an independent computation (dense formulas, full recompute, finite
differences)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from probe_dist.model.policy import PolicyModel
from probe_dist.model.reward_model import RewardModel
from probe_dist.update.grade import GradeSpec, SoftRolloutRunner, row_keys
from probe_dist.update.loss import grade_loss_per_sequence
from probe_dist.update.relax import (
    counter_uniform,
    gumbel_softmax_dense,
    relaxed_token,
    soft_embedding,
    token_kl,
)
from tests.probe_harness import assert_same_sample_taylor, make_probe
from tests.tolerances import (
    MAX_STATISTICAL_CHECKS,
    SUITE_ALPHA,
    fp_bound,
    two_path_tol64,
    z_bonferroni,
)

V = 40


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ in float64."""
    return float((a.double() - b.double()).norm())


def tiny_policy(dtype=torch.float64, lora_b_std: float = 0.3, seed: int = 0):
    """A random 2-layer Qwen2 with LoRA on attention and MLP (B ≠ 0 unless lora_b_std = 0), eval mode."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = get_peft_model(Qwen2ForCausalLM(cfg).to(dtype),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                                      init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, lora_b_std) if lora_b_std else p.zero_()
    model.eval()
    return model


def runner_for(model, **spec):
    defaults = dict(steps=6, temperature=0.9, tau_g=0.7, top_k=0, straight_through=False, kl_coef=0.1)
    return SoftRolloutRunner(PolicyModel(model), model.disable_adapter, GradeSpec(**{**defaults, **spec}))


KEYS = row_keys(1234, "U", 3, range(3))
PROMPT = torch.tensor([1, 5, 7, 9])


# ------------------------------------------------------------------------------------------ relaxed token


def test_counter_noise_is_a_pure_function_of_key_step_and_token():
    ids = torch.arange(V).unsqueeze(0).expand(3, -1)
    u = counter_uniform(KEYS, 2, ids)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, counter_uniform(KEYS, 2, ids))                      # recomputation draws the same
    assert torch.equal(u[1:2, 7:20], counter_uniform(KEYS[1:2], 2, ids[1:2, 7:20]))  # any subset of rows/ids
    assert not torch.equal(u, counter_uniform(KEYS, 3, ids))                  # another step, other noise
    assert not torch.equal(u[0], u[1])                                        # another row, other noise
    # Uniform enough: mean, variance and the Kolmogorov–Smirnov distance of n = 200k draws, as one check.
    from scipy.stats import kstwo

    many = counter_uniform(torch.arange(200, dtype=torch.int64) * 7919, 0,
                           torch.arange(1000).unsqueeze(0).expand(200, -1)).flatten()
    n = many.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    x = many.sort().values
    ks = max(float((i / n - x).max()), float((x - (i - 1) / n).max()))
    # Under U(0, 1): SE of the mean √(1/12 / n) = 6.5e-4, of the variance √((1/80 − 1/144) / n) = 1.7e-4; the KS
    # distance's exact null law (scipy's kstwo). The three parts share one check's false-alarm share (α/60) three
    # ways, so each is held at α/180: z_bonferroni(180) = 4.54, KS ≤ kstwo.isf(α/180, n) = 5.7e-3.
    alpha = SUITE_ALPHA / (3 * MAX_STATISTICAL_CHECKS)
    z = z_bonferroni(3 * MAX_STATISTICAL_CHECKS)
    # tol: stat one check (3 parts at α/180 each): mean and variance within z SE, KS below its α/180 quantile
    assert (abs(float(many.mean()) - 0.5) <= z * math.sqrt(1 / 12 / n)
            and abs(float(many.var()) - 1 / 12) <= z * math.sqrt((1 / 80 - 1 / 144) / n)
            and ks <= kstwo.isf(alpha, n)), (float(many.mean()), float(many.var()), ks)


def test_top_k_equal_to_vocabulary_is_the_full_gumbel_softmax_bit_for_bit():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(3, V, dtype=dtype) * 3
        full = gumbel_softmax_dense(z, KEYS, 4, tau_g=0.5)
        for k in (0, V, V + 5):
            tok = relaxed_token(z, KEYS, 4, tau_g=0.5, top_k=k)
            assert torch.equal(tok.dense(V), full)
        # k < V: the relaxation over the k largest logits, under the same noise values as the full one.
        tok = relaxed_token(z, KEYS, 4, tau_g=0.5, top_k=7)
        top = torch.topk(z, 7, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(tok.ids, top)
        ref = torch.softmax((z.gather(1, top) + torch.log(-torch.log(counter_uniform(KEYS, 4, top))).neg().to(dtype))
                            / 0.5, dim=-1)
        torch.testing.assert_close(tok.weights, ref, rtol=0, atol=0)  # tol: exact the same noise, the same ops


def test_gumbel_max_limit_samples_the_policy():
    """As τ_g → 0 the relaxed token rounds to a Gumbel-max draw: its hard id follows softmax(z) (chi-square)."""
    z = torch.tensor([[1.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    keys = torch.arange(20000, dtype=torch.int64) * 104729 + 17
    tok = relaxed_token(z.expand(keys.numel(), -1), keys, 0, tau_g=1e-3, top_k=0)
    counts = torch.bincount(tok.hard, minlength=4).double()
    expected = torch.softmax(z[0], -1) * keys.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    from scipy.stats import chi2 as chi2_law

    # tol: stat Pearson's chi-square, 3 degrees of freedom (expected counts ≥ 640: the χ² law holds), below its
    # 1 − α/60 quantile (24.8): a false alarm with probability α/60 = 1.7e-5 when the draws follow softmax(z)
    assert chi2 <= chi2_law.ppf(1 - SUITE_ALPHA / MAX_STATISTICAL_CHECKS, df=3), chi2


def test_straight_through_is_one_hot_forward_and_soft_backward():
    torch.manual_seed(1)
    z = torch.randn(3, V, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, V, dtype=torch.float64)
    st = relaxed_token(z, KEYS, 1, tau_g=0.7, top_k=9, straight_through=True)
    soft = relaxed_token(z, KEYS, 1, tau_g=0.7, top_k=9)
    dense = st.dense(V)
    assert torch.equal(dense.argmax(-1), st.hard) and torch.equal(st.hard, soft.hard)
    # tol: fp y_hard + (y − sg(y)) in float64: two roundings of values ≤ 2, ≤ fp_bound(float64, 2, 2) = 1.8e-15
    assert torch.allclose(dense, torch.nn.functional.one_hot(st.hard, V).double(), rtol=0,
                          atol=fp_bound(torch.float64, 2, 2.0))
    (g_st,) = torch.autograd.grad((st.dense(V) * w).sum(), z)
    (g_soft,) = torch.autograd.grad((soft.dense(V) * w).sum(), z)
    assert torch.equal(g_st, g_soft)


@pytest.mark.parametrize("k", [5, V])
def test_sparse_and_dense_soft_embeddings_agree_with_their_gradients(k):
    torch.manual_seed(2)
    z = torch.randn(3, V, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(V, 16, dtype=torch.float64)
    out = {}
    for how in ("sparse", "dense"):
        tok = relaxed_token(z, KEYS, 0, tau_g=0.8, top_k=k)
        e = soft_embedding(tok, emb, how)
        assert e.shape == (3, 16)
        out[how] = (e, torch.autograd.grad((e * torch.arange(16.0, dtype=torch.float64)).sum(), z)[0])
    dense_y = relaxed_token(z, KEYS, 0, tau_g=0.8, top_k=k).dense(V)
    reference = dense_y @ emb  # yᵀE by the dense formula
    # tol: fp float64 sums over ≤ V = 40 tokens of y_v·E_v (y ≥ 0): ≤ fp_bound(float64, 40, Σ_v y_v|E_v|) each way
    tol_e = 2 * fp_bound(torch.float64, V, float((dense_y.detach() @ emb.abs()).max()))
    torch.testing.assert_close(out["sparse"][0], reference, rtol=0, atol=tol_e)
    torch.testing.assert_close(out["sparse"][0], out["dense"][0], rtol=0, atol=tol_e)
    # tol: fp the gradient Σ_v ∂y_v/∂z_j (E_v·c), |∂y_v/∂z_j| = y_v|δ_vj − y_j|/τ_g summing to ≤ 2/τ_g: terms of
    # E_v·c (16 products) and the softmax's V: ≤ fp_bound(float64, V + 16, 2/τ_g · max_v Σ|E_v||c|) each way
    c = torch.arange(16.0, dtype=torch.float64)
    tol_g = 2 * fp_bound(torch.float64, V + 16, 2 / 0.8 * float((emb.abs() @ c).max()))
    torch.testing.assert_close(out["sparse"][1], out["dense"][1], rtol=0, atol=tol_g)


def test_token_kl_is_the_dense_kl_and_zero_for_equal_logits():
    torch.manual_seed(3)
    a, b = torch.randn(4, V, dtype=torch.float64), torch.randn(4, V, dtype=torch.float64)
    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    # tol: fp two float64 evaluations of Σ_v p_v (log p_v − log q_v) over V = 40 terms: each ≤ fp_bound(float64,
    # V + 2, Σ_v p_v (|log p_v| + |log q_v|)) (the softmaxes' own sums and logs add two roundings per term)
    scale = (p * (p.log().abs() + q.log().abs())).sum(-1)
    tol = 2 * fp_bound(torch.float64, V + 2, float(scale.max()))
    torch.testing.assert_close(token_kl(a, b), (p * (p / q).log()).sum(-1), rtol=0, atol=tol)
    assert torch.equal(token_kl(a, a.clone()), torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ soft rollout


def _objective(run, w, **kw):
    roll = run.rollout(PROMPT, KEYS, **kw)
    value = sum((tok.dense(V) * w[t]).sum() for t, tok in enumerate(roll.tokens)) + roll.kl.sum()
    return value, roll


def _objective_and_grad(model, w, **spec_and_kw):
    """(value, rollout, flat gradient over the adapter) of `_objective` for `model` (its dtype)."""
    kw = {k: spec_and_kw.pop(k) for k in ("use_cache", "checkpoint_steps") if k in spec_and_kw}
    run = runner_for(model, **spec_and_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    value, roll = _objective(run, w, **kw)
    grads = torch.autograd.grad(value, params)
    return value.detach(), roll, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("k", [0, 7])
@pytest.mark.parametrize("straight_through", [False, True])
def test_kv_cached_rollout_gradient_equals_full_recompute(k, straight_through, float64_norms):
    """The cached, step-checkpointed rollout vs recomputing the whole prefix at every step (a float64 model,
    float64 throughout): the same hard tokens, values and gradients to float64 rounding; checkpointing recomputes
    bit for bit."""
    model = tiny_policy()
    model32 = copy.deepcopy(model).float()  # the float32 run: this computation's condition number
    w = torch.randn(6, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    spec = dict(top_k=k, straight_through=straight_through)
    results = {name: _objective_and_grad(model, w, **spec, **kw)
               for name, kw in (("cached", {}), ("no_checkpoint", {"checkpoint_steps": False}),
                                ("recompute", {"use_cache": False}))}
    value32, _, grad32 = _objective_and_grad(model32, w, **spec, use_cache=False)
    value, roll, grad = results["recompute"]
    # tol: bound precondition: B ~ N(0, 0.3) moves the policy off the reference, so the KL term is live: its sum
    # (≥ 1e-3) is ≥ 1e10 × its float64 rounding (~u₆₄·|KL| per step), the size a dead term would have
    assert float(results["cached"][1].kl.sum()) > 1e-3
    assert torch.equal(results["cached"][1].hard, roll.hard)  # tol: exact the same argmax ids
    assert torch.equal(results["cached"][2], results["no_checkpoint"][2])  # tol: exact checkpointing recomputes
    # tol: fp two float64 paths: two_path_tol64 from the float32 run's measured error (value and gradient)
    assert abs(float(results["cached"][0] - value)) <= two_path_tol64(abs(float(value32 - value)), abs(float(value)))
    tol = two_path_tol64(_dist(grad32, grad), float(grad.norm()))  # tol: fp (two_path_tol64)
    assert _dist(results["cached"][2], grad) <= tol, (_dist(results["cached"][2], grad), tol)


def test_rollout_gradient_matches_finite_differences(float64_norms):
    """A directional derivative of the rollout objective by central differences (noise is fixed per key)."""
    model = tiny_policy()
    model32 = copy.deepcopy(model).float()
    run = runner_for(model, top_k=0)
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.randn(run.spec.steps, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value, _ = _objective(run, w)
    grads = torch.autograd.grad(value, params)
    gen = torch.Generator().manual_seed(6)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    value32, _, grad32 = _objective_and_grad(model32, w, top_k=0)
    flat_direction = torch.cat([d.flatten() for d in direction])
    analytic32 = float((grad32.double() * flat_direction).sum())
    eps = 1e-4

    def at(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            out = float(_objective(run, w, use_cache=False)[0])
            for p, d in zip(params, direction):
                p.sub_(step * d)
        return out

    numeric = (at(eps) - at(-eps)) / (2 * eps)
    numeric2 = (at(2 * eps) - at(-2 * eps)) / (4 * eps)
    # tol: fp the objective's float64 error δf (two_path_tol64 from the float32 run's, one path: half of it) enters
    # the central difference as 2δf/(2ε); the truncation ε²f'''/6 is estimated from the step-2ε difference
    # (Richardson: FD(2ε) − FD(ε) = 3·ε²f'''/6), counted twice; the analytic derivative's own float64 error the same way
    rounding = two_path_tol64(abs(float(value32 - value)), abs(float(value))) / 2 / eps
    tol = 2 * rounding + 2 * abs(numeric2 - numeric) + two_path_tol64(abs(analytic32 - analytic), abs(analytic))
    assert abs(numeric - analytic) <= tol, (numeric, analytic, tol)
    # tol: bound precondition: the derivative is ≫ the tolerance, so a wrong gradient (a sign, a factor 2, a term
    # missing) fails
    assert abs(analytic) > 100 * tol, (analytic, tol)


def test_online_kl_is_aligned_dense_and_exactly_zero_at_the_reference(float64_norms):
    """Per-step KL from the rollout = KL of the two full [n, T, V] logit tensors of the same positions, computed
    from a dense recompute of policy and reference over the rollout's inputs; exactly 0 when B = 0 (policy = ref)."""
    model = tiny_policy()
    model32 = copy.deepcopy(model).float()
    run = runner_for(model, top_k=0)
    with torch.no_grad():
        roll = run.rollout(PROMPT, KEYS)
        kl32 = runner_for(model32, top_k=0).rollout(PROMPT, KEYS).kl
        causal = model.get_base_model()
        emb = causal.get_input_embeddings().weight
        inputs = torch.cat([emb[PROMPT].unsqueeze(0).expand(3, -1, -1)]
                           + [soft_embedding(t, emb).unsqueeze(1) for t in roll.tokens[:-1]], dim=1)
        z_pol = causal(inputs_embeds=inputs).logits / 0.9
        with model.disable_adapter():
            z_ref = causal(inputs_embeds=inputs).logits / 0.9
        p = PROMPT.numel()
        dense = torch.stack([token_kl(z_pol[:, p - 1 + t], z_ref[:, p - 1 + t]) for t in range(run.spec.steps)], 1)
        shifted = torch.stack([token_kl(z_pol[:, p - 1 + t], z_ref[:, p + t]) for t in range(run.spec.steps - 1)], 1)
    # tol: fp two float64 paths (the rollout's per-step KL vs a dense recompute): the logits' part by two_path_tol64
    # from the float32 rollout's measured error; token_kl itself runs in float64 even there (so err32 does not see
    # it): ≤ fp_bound(float64, V + 2, Σ_v p_v (|log p_v| + |log q_v|)) per evaluation, as in the token_kl test
    logp, logq = torch.log_softmax(z_pol.double(), -1), torch.log_softmax(z_ref.double(), -1)
    kl_scale = float((logp.exp() * (logp.abs() + logq.abs())).sum(-1).max())
    tol = (two_path_tol64(float((kl32 - roll.kl).abs().max()), float(roll.kl.abs().max()))
           + 2 * fp_bound(torch.float64, V + 2, kl_scale))
    torch.testing.assert_close(roll.kl, dense, rtol=0, atol=tol)  # tol: fp (above)
    # tol: bound precondition: the neighbouring position's KL is off by far more than the tolerance, so an
    # off-by-one position would be seen
    assert float((roll.kl[:, :-1] - shifted).abs().max()) > 100 * tol
    same = tiny_policy(lora_b_std=0.0)
    with torch.no_grad():
        zero = runner_for(same, top_k=5).rollout(PROMPT, KEYS)
    assert torch.equal(zero.kl, torch.zeros_like(zero.kl))


def test_rollout_rows_do_not_depend_on_their_neighbours(float64_norms):
    """A row's relaxed rollout is a function of its own key: the same alone or in a batch (chunking invariance)."""
    model = tiny_policy()
    run = runner_for(model, top_k=7)
    with torch.no_grad():
        together = run.rollout(PROMPT, KEYS)
        alone = run.rollout(PROMPT, KEYS[1:2])
        alone32 = runner_for(copy.deepcopy(model).float(), top_k=7).rollout(PROMPT, KEYS[1:2])
    assert torch.equal(alone.hard, together.hard[1:2])  # tol: exact the same ids (so the same top-k sets below)
    assert torch.equal(alone32.hard, alone.hard)  # tol: exact the float32 run picks them too: its error is comparable
    # tol: fp two float64 paths (batch of 3 vs 1): two_path_tol64 from the float32 run's measured error (weights ≤ 1)
    tol = two_path_tol64(float((alone32.tokens[-1].weights - alone.tokens[-1].weights).abs().max()), 1.0)
    torch.testing.assert_close(alone.tokens[-1].weights, together.tokens[-1].weights[1:2], rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------ reward model


def test_reward_model_reads_soft_tokens_like_hard_ones_and_differentiates(float64_norms):
    torch.manual_seed(7)
    cfg = Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1, pad_token_id=0)
    rm = RewardModel(Qwen2ForSequenceClassification(cfg).double().eval(), "sparse")
    rm32 = RewardModel(copy.deepcopy(rm.model).float(), "sparse")  # the float32 run: the condition number
    hard = torch.tensor([[3, 8, 2], [4, 4, 9]])
    # One-hot relaxed tokens give the reward of the hard sequence.
    from probe_dist.update.relax import SoftToken

    tokens = [SoftToken(torch.ones(2, 1, dtype=torch.float64), hard[:, t:t + 1], hard[:, t]) for t in range(3)]
    full = torch.cat([PROMPT.unsqueeze(0).expand(2, -1), hard], dim=1)
    with torch.no_grad():
        reward = rm.hard(full)
        # tol: fp two float64 paths (one-hot soft embeddings vs the lookup): two_path_tol64, float32 run's error
        tol = two_path_tol64(float((rm32.hard(full) - reward).abs().max()), float(reward.abs().max()))
        torch.testing.assert_close(rm(PROMPT, tokens), reward, rtol=0, atol=tol)
    # Its gradient through soft weights equals the dense formula's.
    z = torch.randn(2, V, dtype=torch.float64, requires_grad=True)
    grads = {}
    for how in ("sparse", "dense"):
        rm.embed = how
        soft = [relaxed_token(z, KEYS[:2], t, tau_g=0.5, top_k=6) for t in range(3)]
        grads[how] = torch.autograd.grad(rm(PROMPT, soft).sum(), z)[0]
    z32 = z.detach().float().requires_grad_(True)
    soft32 = [relaxed_token(z32, KEYS[:2], t, tau_g=0.5, top_k=6) for t in range(3)]
    grad32 = torch.autograd.grad(rm32(PROMPT, soft32).sum(), z32)[0]
    # tol: fp two float64 paths (sparse vs dense soft embedding): two_path_tol64 from the float32 run's error
    tol = two_path_tol64(float((grad32.double() - grads["sparse"]).abs().max()), float(grads["sparse"].abs().max()))
    torch.testing.assert_close(grads["sparse"], grads["dense"], rtol=0, atol=tol)
    # tol: bound precondition: a gradient ≫ its tolerance, so the comparison has teeth
    assert float(grads["sparse"].abs().max()) > 100 * tol


def test_grade_loss_is_mean_negative_reward_plus_beta_kl():
    r = torch.tensor([1.0, -2.0], dtype=torch.float64)
    kl = torch.tensor([[0.1, 0.2], [0.0, 0.3]], dtype=torch.float64)
    out = grade_loss_per_sequence(r, kl, kl_coef=0.5, num_rows=4)
    # tol: fp a few float64 operations (a sum of 2, a product, a difference, a division) on values ≤ 2.3 in some
    # order: ≤ fp_bound(float64, 4, 2.3) = 4e-15; a missing β, a wrong sign or a mean over the wrong count is ≥ 0.03
    tol = fp_bound(torch.float64, 4, 2.3)
    assert torch.allclose(out, torch.tensor([(-1.0 + 0.15) / 4, (2.0 + 0.15) / 4], dtype=torch.float64),
                          rtol=0, atol=tol)
    assert math.isclose(float(out.sum()), (-1.0 + 2.0 + 0.5 * 0.6) / 4, rel_tol=0, abs_tol=2 * tol)  # tol: fp


# ------------------------------------------------------------------------------------------ the probe, GRADE update

GRADE_SMALL = ["sampling.B_E=6", "sampling.G_E=4", "sampling.B_U=3", "sampling.G_U=3", "update.loss=grade",
               "update.kl_coef=0.05", "update.grade_tau=0.7", "update.grade_top_k=8"]


def _direct_grade_gradient(probe, rm=None) -> list[torch.Tensor]:
    """∇L_U of GRADE by a second path: the whole-prefix recompute rollout over every U prompt at once per group,
    the reward model called directly, one float64-accumulated backward per group (no cache, no checkpointing)."""
    from probe_dist.update.loss import grade_loss_per_sequence

    cfg, objective = probe.cfg, probe.grade
    run = SoftRolloutRunner(probe.runner.strategy.policy, probe.runner.reference, objective.spec)
    batch = probe.sample("U", cfg.sampling.B_U, cfg.sampling.G_U)
    params = [p for _, p in probe.trainable]
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for group in batch.real_groups:
        keys = row_keys(cfg.sampling.seed, "U", group.prompt_index, range(group.size))
        roll = run.rollout(group.prompt_ids, keys, use_cache=False)
        rm = rm or objective.reward_model
        reward = rm._reward(rm.soft_inputs(group.prompt_ids, roll.tokens))
        loss = grade_loss_per_sequence(reward, roll.kl, kl_coef=objective.spec.kl_coef,
                                       num_rows=cfg.sampling.B_U * cfg.sampling.G_U).sum()
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.double()
    return total


def _direct_grade_gradient_float32(probe, rm=None) -> list[torch.Tensor]:
    """`_direct_grade_gradient` with the policy and reward model cast to float32 (for the condition number; the
    probe is of no further use afterwards). U is prompts only under GRADE, so both see the same batch."""
    probe.model.float()
    rm = rm or probe.grade.reward_model
    (rm.model if rm.model is not None else rm.score).float()
    return _direct_grade_gradient(probe, rm)


@pytest.mark.parametrize("loss", ["grade", "grade_st"])
def test_probe_measures_a_grade_step(toy_checkpoint, loss, tmp_path, float64_norms):
    """The probe's GRADE gradient (cached, checkpointed, microbatched) = a direct recompute of ∇L_U; u is AdamW of
    it; η = 0 is exact, the training state is restored, U's rows carry the rounded ids and r_φ."""
    probe = make_probe(toy_checkpoint, [*GRADE_SMALL, f"update.loss={loss}", "memory.microbatch_grad=2",
                                        "estimators.etas=[0.0,1e-3]", "precision.dtype=float64"])
    result = probe.run()
    summary = result.summary()
    assert summary["status"] == "completed" and summary["restore/verified"] is True
    assert summary["sweep"][0]["delta_h_true"] == 0.0 and summary["sweep"][0]["delta_h1"] == 0.0
    assert summary["sweep"][1]["delta_h_true"] != 0.0
    direct = _direct_grade_gradient(probe)
    coef = result.update.clip_coef
    ours = torch.cat([g.flatten() for g in result.update.grad]) / coef
    theirs = torch.cat([g.flatten() for g in direct])
    assert math.isfinite(summary["update/grade_reward_mean"]) and summary["update/grade_kl_mean"] > 0
    rows = [g for g in result.batch_u.real_groups]
    assert all(g.responses.shape == (3, probe.cfg.sampling.max_new_tokens) for g in rows)
    assert all(bool(torch.isfinite(g.rewards).all()) for g in rows)
    assert summary["explain/sum_contrib_e"] is not None and "explain/sum_contrib_u" not in summary
    from probe_dist.report.html import write_report

    page = write_report(tmp_path, {**summary, "provenance/loss": loss,
                                   "provenance/loss_options": {"grade_tau": 0.7, "grade_top_k": 8, "kl_coef": 0.05},
                                   "provenance/reward_model": probe.load_info["provenance/reward_model"]}, [])
    text = page.read_text()
    assert "GRADE" in text and "reward_model" in text
    # Last (it casts the probe's models to float32): the direct path's float32 error, for the tolerance.
    theirs32 = torch.cat([g.flatten() for g in _direct_grade_gradient_float32(probe)])
    # tol: fp two float64 paths (cached, checkpointed, microbatched vs whole-prefix recompute): two_path_tol64
    # from the float32 run of the direct path; a missing KL term, reward term or a microbatch counted twice
    # moves the gradient by ≥ 1e-3 relative
    tol = two_path_tol64(_dist(theirs32, theirs), float(theirs.norm()))
    assert _dist(ours, theirs) <= tol, (_dist(ours, theirs), tol)


def test_grade_same_sample_limit_is_linear_in_eta(toy_checkpoint, float64_throughout):
    """ΔH_true(η)/η → δH₁/η for a GRADE update on the same samples, the error the second-order term ½η·Ĥ'' up to a
    remainder O(η²), in a Taylor regime built from the measured curvature (tests/probe_harness.py)."""
    assert_same_sample_taylor(toy_checkpoint, [*GRADE_SMALL, "precision.dtype=float64", "estimators.eta_train=false"])


def test_grade_refusals(toy_checkpoint, tmp_path):
    from probe_dist.config import ConfigError, load_config
    from probe_dist.model.reward_model import RewardModelError
    from probe_dist.resolve import check_grade

    def cfg(*extra):
        return load_config(None, [f"checkpoint.path={toy_checkpoint}", "update.loss=grade", *extra])

    assert check_grade(cfg(), 1, True) == toy_checkpoint / "reward_model"
    with pytest.raises(ConfigError, match="ddp"):
        check_grade(cfg("distributed.strategy=fsdp2"), 2, True)
    with pytest.raises(ConfigError, match="two_batch"):
        check_grade(cfg("estimators.mode=single_batch"), 1, True)
    with pytest.raises(ConfigError, match="grade_top_k=1"):
        check_grade(cfg("update.grade_top_k=1"), 1, True)
    with pytest.raises(RewardModelError, match="update.reward_model"):
        check_grade(load_config(None, [f"checkpoint.path={tmp_path}", "update.loss=grade"]), 1, True)
    with pytest.raises(RewardModelError, match="does not exist"):
        RewardModel.load(tmp_path / "missing", dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    with pytest.raises(RewardModelError, match="Qwen2ForCausalLM, not a"):
        RewardModel.load(toy_checkpoint / "base", dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    # Reward model folders that cannot be used: none there, pickled weights only, wrong vocabulary, two labels.
    with pytest.raises(RewardModelError, match="config.json"):
        RewardModel.load(tmp_path, dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1, num_labels=1, pad_token_id=0))
    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False) if _can_save_pickled() else pickled.mkdir()
    (pickled / "config.json").write_text(model.config.to_json_string())
    with pytest.raises(RewardModelError, match="safetensors"):
        RewardModel.load(pickled, dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(RewardModelError, match="vocabulary"):
        RewardModel.load(tmp_path / "ok", dtype=torch.float32, device=torch.device("cpu"), vocab_size=40)
    # A folder whose weights lack the score head (a causal LM's weights under a classifier's config): transformers
    # would start the head at random; the probe refuses it.
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    model.save_pretrained(headless)
    weights = load_file(str(headless / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, str(headless / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(RewardModelError, match=r"lack 1 of the parameters .*'score.weight'"):
        RewardModel.load(headless, dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    model.config.num_labels = 2
    model.save_pretrained(tmp_path / "two")
    with pytest.raises(RewardModelError, match="num_labels"):
        RewardModel.load(tmp_path / "two", dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)


def _can_save_pickled() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def test_toy_reward_model_prefers_correct_answers(toy_checkpoint):
    """The toy checkpoint's reward model scores a+b above a near miss a+b±d for most held-out (prompt, miss) pairs, through the
    soft-token path with one-hot tokens (what GRADE reads at τ_g → 0)."""
    import random

    from probe_dist.data.prompts import load_prompts
    from probe_dist.toy.reward import examples
    from probe_dist.toy.task import EOS_ID, encode_prompt, load_tokenizer
    from probe_dist.update.relax import SoftToken

    tok = load_tokenizer(toy_checkpoint / "tokenizer")
    rm = RewardModel.load(toy_checkpoint / "reward_model", dtype=torch.float32, device=torch.device("cpu"),
                          vocab_size=16)
    state = __import__("json").loads((toy_checkpoint / "trainer_state.json").read_text())
    seed = __import__("json").loads((toy_checkpoint / "training_args.json").read_text())["seed"]
    # Both checks below are deterministic for a given build (no sampling here): they are preconditions — the
    # verifier is real — whose thresholds are significance levels against a verifier that ignores the answer, at
    # the suite's per-check level α/60 (one-sided z = z_bonferroni(two_sided=False) = 4.15).
    z = z_bonferroni(two_sided=False)
    held_out = examples(tok, "test", random.Random(seed + 7))  # the set test_accuracy was measured on
    n = len(held_out)
    majority = max(p := sum(label for _, label in held_out) / n, 1 - p)
    # tol: bound precondition: the held-out accuracy beats always answering the majority label (≈ 0.55) by more
    # than z binomial SEs √(m(1 − m)/n) (n = 720: threshold ≈ 0.63)
    assert state["reward_model"]["test_accuracy"] > majority + z * math.sqrt(majority * (1 - majority) / n), (
        state["reward_model"]["test_accuracy"], majority)

    def score(prompt, value):
        ids = (tok(str(value), add_special_tokens=False)["input_ids"] + [EOS_ID, EOS_ID])[:3]
        tokens = [SoftToken(torch.ones(1, 1), torch.tensor([[i]]), torch.tensor([i])) for i in ids]
        with torch.no_grad():
            return float(rm(torch.tensor(prompt), tokens)[0])

    wins = total = 0
    null_var = 0.0  # Var(wins) for a verifier whose scores ignore the answer (exchangeable: P(win) = 1/2)
    for ex in load_prompts("toy", "test"):
        prompt, answer = encode_prompt(tok, ex["prompt"]), int(ex["answer"])
        right = score(prompt, answer)
        misses = [answer + d for d in range(-10, 11) if d != 0 and answer + d >= 0]
        wins += sum(right > score(prompt, m) for m in misses)
        total += len(misses)
        # the misses of one prompt share its `right` score: win indicators of variance 1/4, pairwise covariance
        # P(r > a, r > b) − 1/4 = 1/3 − 1/4 = 1/12
        null_var += len(misses) / 4 + len(misses) * (len(misses) - 1) / 12
    # tol: bound precondition: the win rate exceeds chance (1/2) by more than z SEs of the win rate under that
    # null, √(Var wins)/total ≈ 0.033 for 80 prompts × ≤ 20 misses (threshold ≈ 0.64). Misses by ±1..±10: the
    # realisations differ most at ±1 (0.56-0.58 on seeds 0-1) and agree further out (≥ 0.83 at ±5); over ±1..±10
    # they give 0.79-0.82, so the check's power does not hang on one realisation's near misses.
    assert wins / total > 0.5 + z * math.sqrt(null_var) / total, (wins / total, math.sqrt(null_var) / total)


def test_reward_model_on_the_frozen_base_is_shared_with_the_reference(float64_norms):
    """A reward model whose backbone is the base itself: `share_base` detects it and drops its backbone; the reward
    read off the reference's pass over the rollout equals the separate model's reward on the soft inputs, and so
    do the gradients. A backbone one weight away is not shared."""
    model = tiny_policy()
    causal = model.get_base_model()
    cfg = Qwen2Config(**{**causal.config.to_dict(), "num_labels": 1, "pad_token_id": 0})
    torch.manual_seed(8)
    seq = Qwen2ForSequenceClassification(cfg).double().eval()
    with model.disable_adapter():
        base_state = {k.replace(".base_layer", ""): v for k, v in causal.model.state_dict().items() if "lora_" not in k}
    seq.model.load_state_dict(base_state)
    separate = RewardModel(seq, "sparse")
    shared = RewardModel(seq, "sparse")
    model32 = copy.deepcopy(model).float()  # the float32 run of the separate path: the condition number
    separate32 = RewardModel(copy.deepcopy(seq).float(), "sparse")
    assert shared.share_base(causal, model.disable_adapter) and shared.backbone is None
    out = {}
    for name, rm, policy in (("separate", separate, model), ("shared", shared, model),
                             ("separate32", separate32, model32)):
        params = [p for p in policy.parameters() if p.requires_grad]
        run = SoftRolloutRunner(PolicyModel(policy), policy.disable_adapter,
                                GradeSpec(steps=5, temperature=0.9, tau_g=0.7, top_k=6, straight_through=False,
                                          kl_coef=0.0), reward_head=rm.score if rm.shared else None)
        roll = run.rollout(PROMPT, KEYS)
        reward = roll.reward if rm.shared else rm(PROMPT, roll.tokens)
        out[name] = (reward.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(reward.sum(), params)]))
    # tol: fp two float64 paths (the reward read off the reference's pass vs the separate model on the soft inputs):
    # two_path_tol64 from the float32 run's measured error, for the rewards and for the gradient's norm
    reward, grad = out["separate"]
    tol = two_path_tol64(float((out["separate32"][0] - reward).abs().max()), float(reward.abs().max()))
    torch.testing.assert_close(out["shared"][0], reward, rtol=0, atol=tol)
    tol = two_path_tol64(_dist(out["separate32"][1], grad), float(grad.norm()))  # tol: fp (two_path_tol64)
    assert _dist(out["shared"][1], grad) <= tol, (_dist(out["shared"][1], grad), tol)
    other = Qwen2ForSequenceClassification(cfg).double().eval()
    base_state["layers.1.mlp.up_proj.weight"] = base_state["layers.1.mlp.up_proj.weight"] + 1e-3
    other.model.load_state_dict(base_state)
    assert not RewardModel(other).share_base(causal, model.disable_adapter)


def test_probe_with_a_reward_model_on_the_frozen_base(toy_checkpoint, tmp_path, float64_norms):
    """A reward model = the toy base + a score head: the run shares the base (provenance says so) and its GRADE
    gradient equals the direct path with the reward model kept separate."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(toy_checkpoint / "base")
    cfg = Qwen2Config(**{**base.config.to_dict(), "tie_word_embeddings": False, "num_labels": 1})
    torch.manual_seed(9)
    seq = Qwen2ForSequenceClassification(cfg)
    seq.model.load_state_dict(base.model.state_dict())
    seq.save_pretrained(tmp_path / "rm")
    probe = make_probe(toy_checkpoint, [*GRADE_SMALL, f"update.reward_model={tmp_path / 'rm'}",
                                        "estimators.etas=[0.0,1e-3]", "precision.dtype=float64",
                                        "estimators.explain=false"])
    assert probe.load_info["provenance/reward_model"]["shared_base"] is True
    result = probe.run()
    assert result.summary()["restore/verified"] is True
    separate = RewardModel.load(tmp_path / "rm", dtype=torch.float64, device=torch.device("cpu"), vocab_size=16)
    direct = torch.cat([g.flatten() for g in _direct_grade_gradient(probe, separate)])
    ours = torch.cat([g.flatten() for g in result.update.grad]) / result.update.clip_coef
    separate32 = RewardModel.load(tmp_path / "rm", dtype=torch.float32, device=torch.device("cpu"), vocab_size=16)
    direct32 = torch.cat([g.flatten() for g in _direct_grade_gradient_float32(probe, separate32)])
    # tol: fp two float64 paths (the shared base's reward head vs the separate model): two_path_tol64 from the
    # float32 run of the direct path
    tol = two_path_tol64(_dist(direct32, direct), float(direct.norm()))
    assert _dist(ours, direct) <= tol, (_dist(ours, direct), tol)
