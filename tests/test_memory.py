"""Memory is bounded by the microbatch, not the batch (one microbatch's graph at a time; logits only for response positions, chunked), measured on CPU.

- SavedTensorsMeter counts exactly what autograd keeps for backward and gives it back after backward.
- The update and δH₁ passes: bytes saved for backward and process RSS stay flat as the batch grows 8 → 64
  prompts at a fixed microbatch size, and grow with the microbatch size.
- The chunked ℓ/H head equals a full-logits reference (values and gradients) and saves far fewer bytes.
- auto_microbatch: a simulated out-of-memory error halves the microbatch and the run's numbers equal those of a
  run with the small microbatch from the start.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import math
import sys

import pytest
import torch

from probe_dist.model.policy import PolicyModel
from probe_dist.prediction.delta_h1 import predict_delta_h1
from probe_dist.rollout.batch import Group, RolloutBatch, group_advantages
from probe_dist.runtime.meter import (
    PhaseMemoryRecorder,
    SavedTensorsMeter,
    merge_phase_records,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from probe_dist.scoring.score import base_entropy, score_batch
from probe_dist.update.gradient import update_gradient
from probe_dist.update.step import update_parts
from tests.probe_harness import make_probe
from tests.synthetic_checkpoint import build_synthetic_checkpoint, write_empty_answer_prompts
from tests.tolerances import fp_bound, relative_error, two_path_tol64

PROMPT_TOKENS, WIDTH = 8, 40
# tol: bound the RSS checks' allowance for allocator state, not for the code under test: the run-to-run spread of a
# phase's RSS growth seen here is up to ~2 MiB before the per-group safe points, up to 5 MiB in either direction
# since (small batch 21.4 vs large 16.5 MiB in one run, 19.0 vs 23.1 in another: noise, not growth with B).
# Retained graphs are caught exactly by the saved-bytes check; the RSS checks assert their own teeth (a defect ≫ it).
RSS_NOISE = 6 << 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: one intra-op thread is several times faster than two fighting over them.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _glibc():
    """glibc handle with large allocations pinned to mmap (freed memory leaves RSS at once), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # M_MMAP_THRESHOLD: a fixed, low threshold (no dynamic growth) puts every tensor but the smallest in its
        # own mapping, returned to the OS on free — RSS then tracks live tensors instead of heap fragmentation.
        libc.mallopt(-3, 16 * 1024)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return libc
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------------------------------ the meter
def test_meter_counts_graph_and_releases_it():
    x = torch.randn(256, 256, requires_grad=True)
    w = torch.randn(256, 256)
    with SavedTensorsMeter() as meter:
        y = (x @ w).tanh()  # mm saves w (x needs grad); tanh saves its 256 KiB output
        assert meter.current_bytes == 2 * 256 * 256 * 4
        z = y * y  # saves y twice: one storage, counted once
        assert meter.current_bytes == 2 * 256 * 256 * 4
        z.sum().backward()
        assert meter.current_bytes == 0
        assert meter.peak_bytes == 2 * 256 * 256 * 4
        y2 = (x @ w).tanh()
        del y2  # a graph dropped without backward is released too (no reference cycle through the hooks)
        assert meter.current_bytes == 0


def test_meter_skips_parameters_and_nests():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedTensorsMeter() as outer:
        with SavedTensorsMeter() as inner:
            lin(x).sum().backward()
        assert inner.peak_bytes == outer.peak_bytes == 8 * 64 * 4  # x only; the weight is a parameter
    with SavedTensorsMeter(include_parameters=True) as with_params:
        lin(x).sum().backward()
    assert with_params.peak_bytes == 8 * 64 * 4 + 64 * 64 * 4


def test_rss_helpers_and_merge():
    assert rss_bytes() > 0 and peak_rss_bytes() >= rss_bytes() * 0.5
    if reset_peak_rss():
        assert peak_rss_bytes() <= rss_bytes() + (8 << 20)
    merged = merge_phase_records({"rss_peak_bytes": 5, "saved_peak_bytes": 9, "rss_start_bytes": 1},
                                 {"rss_peak_bytes": 7, "saved_peak_bytes": 3, "rss_bytes": 2, "rss_start_bytes": 4})
    assert merged == {"rss_peak_bytes": 7, "saved_peak_bytes": 9, "rss_bytes": 2, "rss_start_bytes": 1}


# ------------------------------------------------------------- update and δH₁ passes: flat in B, grow in micro
def _batch(num_prompts: int, group_size: int, seed: int) -> RolloutBatch:
    """Random groups with the same shape and the same response lengths (one full-width response, the others drawn
    once per group size, not per batch) and mixed rewards: a microbatch of a given size then has the same shapes
    and token counts in any batch, so its graph has the same bytes; the tokens are random per seed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(WIDTH // 2, WIDTH + 1, (group_size,), generator=torch.Generator().manual_seed(group_size))
    lengths[0] = WIDTH
    groups = []
    for i in range(num_prompts):
        responses = torch.randint(3, 15, (group_size, WIDTH), generator=g)
        responses[torch.arange(WIDTH).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
        rewards = torch.tensor([float(j % 2) for j in range(group_size)], dtype=torch.float64)
        groups.append(Group(i, torch.randint(3, 15, (PROMPT_TOKENS,), generator=g), responses, lengths.clone(), rewards,
                            group_advantages(rewards, "group", 1e-6)))
    return RolloutBatch("U", groups)


@pytest.fixture(scope="module")
def memory_probe(tmp_path_factory):
    # Narrow and MLP-heavy: activations are large for the compute (saved bytes ∝ tokens·(h, I), flops ∝ h·I).
    ckpt = build_synthetic_checkpoint(tmp_path_factory.mktemp("mem") / "ckpt", hidden=64, intermediate=2048,
                                      layers=2, lora_r=8, max_new_tokens=WIDTH)
    probe = make_probe(ckpt, ["memory.microbatch_score=8"])
    libc = _glibc()
    _measure(probe, _batch(2, 2, 99), libc)  # warm-up: first-touch code pages and allocator state
    return probe, libc


def _measure(probe, batch: RolloutBatch, libc) -> dict:
    """Saved-bytes peak and RSS growth (peak − start) of the update pass and of the δH₁ pass on `batch`."""
    def clean():
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)

    clean()
    cfg, rt, runner = probe.cfg, probe.rt, probe.runner
    with PhaseMemoryRecorder("cpu") as update:
        grad, *_ = update_gradient(rt, runner, batch, cfg.update)
        u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
    scores = score_batch(rt, runner, batch)
    base = base_entropy(rt, batch, scores, payload=cfg.estimators.payload, normalize=cfg.estimators.normalize)
    clean()
    with PhaseMemoryRecorder("cpu") as d1:
        predict_delta_h1(rt, runner, batch, scores, base=base, u=u, est=cfg.estimators)
    out = {}
    for name, rec in (("update", update.result), ("delta_h1", d1.result)):
        out[name] = {"saved": rec["saved_peak_bytes"], "rss_growth": rec["rss_growth_bytes"],
                     "rss_peak": rec["rss_peak_bytes"], "rss_scope": rec["rss_peak_scope"]}
    return out


def test_update_and_delta_h1_memory_flat_in_batch_size(memory_probe):
    probe, libc = memory_probe
    probe.runner.sizes.grad = probe.runner.sizes.jvp = 2
    small = _measure(probe, _batch(8, 2, seed=1), libc)
    large = _measure(probe, _batch(64, 2, seed=2), libc)
    graph = small["update"]["saved"]  # one microbatch's graph (bytes)
    assert graph > 1 << 20
    # tol: bound teeth: keeping every microbatch's graph adds (64 − 8)/2 graphs at the large batch; the RSS
    # allowances below (≤ 2·RSS_NOISE) are a small part of it
    defect = (64 - 8) // 2 * graph
    assert defect > 8 * (2 * RSS_NOISE), (defect, graph)
    for phase in ("update", "delta_h1"):
        s, big = small[phase], large[phase]
        # tol: exact the same microbatch shapes and token counts (_batch): the same graph, byte for byte; δH₁ runs
        # in forward mode and saves none at all (checked below)
        assert big["saved"] == s["saved"], (phase, s, big)
        # tol: bound the peak is the phase's start plus its growth: allocator noise in each (RSS_NOISE), nothing
        # that grows with B (teeth above)
        assert abs(big["rss_peak"] - s["rss_peak"]) <= 2 * RSS_NOISE, (phase, s, big)
        if libc is not None and s["rss_scope"] == "phase":
            # The phase's own RSS growth (its peak above its start) is what the batch could inflate: one more
            # microbatch graph kept alive would add `saved` (~7 MiB), keeping them all ~28× that.
            # tol: bound allocator noise only (RSS_NOISE: small-object state, glibc heap, 1 MiB pymalloc arenas)
            assert abs(big["rss_growth"] - s["rss_growth"]) <= RSS_NOISE, (phase, s, big)


def test_update_and_delta_h1_memory_grows_with_microbatch(memory_probe):
    probe, libc = memory_probe
    batch = _batch(4, 8, seed=3)
    probe.runner.sizes.grad = probe.runner.sizes.jvp = 2  # the update's microbatch, and δH₁'s forward-mode one
    rows2 = _measure(probe, batch, libc)
    probe.runner.sizes.grad = probe.runner.sizes.jvp = 8
    rows8 = _measure(probe, batch, libc)
    probe.runner.sizes.grad, probe.runner.sizes.jvp = probe.cfg.memory.microbatch_grad, probe.cfg.memory.microbatch_jvp
    assert rows2["delta_h1"]["saved"] == rows8["delta_h1"]["saved"] == 0  # forward mode keeps no graph
    extra_graph = rows8["update"]["saved"] - rows2["update"]["saved"]
    # tol: bound a graph is its rows' activations plus a few row-independent tensors (rotary tables: ~1 % of a
    # 2-row graph here), so 4× the rows give ≥ 3× the bytes by construction (3.99× measured); a pass that kept
    # one row's (or one group's) graph whatever the microbatch gives 1×
    assert rows8["update"]["saved"] > 3.0 * rows2["update"]["saved"], (rows2, rows8)
    for phase in ("update", "delta_h1"):
        assert rows8[phase]["rss_peak"] > rows2[phase]["rss_peak"], (phase, rows2, rows8)
        if libc is not None and rows2[phase]["rss_scope"] == "phase":
            growth = rows8[phase]["rss_growth"] - rows2[phase]["rss_growth"]
            # tol: bound the larger microbatch's RSS grows by more than allocator noise; the update phase's by at
            # least its larger graph, which is resident at the peak (up to that noise)
            assert growth > RSS_NOISE, (phase, rows2, rows8)
            if phase == "update":
                assert growth >= extra_graph - RSS_NOISE, (rows2, rows8)


# ----------------------------------------------------------------------------- chunked head vs full logits
def test_chunked_scoring_equals_full_logits_and_saves_less():
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    vocab, n, prompt, width, tau = 4096, 4, 6, 40, 0.7
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    lm = get_peft_model(transformers.Qwen2ForCausalLM(cfg).eval(),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                   init_lora_weights=False)).eval()
    policy = PolicyModel(lm, logits_chunk=32)
    ids = torch.randint(3, vocab, (n, prompt + width))
    lengths = torch.tensor([40, 33, 17, 40])
    response_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    attention_mask = torch.cat([torch.ones(n, prompt, dtype=torch.long), response_mask.long()], dim=1)

    def full_logits(model=lm):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # [n, L, V], the model's dtype
        log_probs = torch.log_softmax(logits[:, prompt - 1:prompt - 1 + width] / tau, dim=-1)
        token_logp = log_probs.gather(-1, ids[:, prompt:].unsqueeze(-1)).squeeze(-1)[response_mask]
        token_h = -(log_probs.exp() * log_probs).sum(-1)[response_mask]
        return token_logp, token_h

    def run(fn, model=lm):
        model.zero_grad(set_to_none=True)
        with SavedTensorsMeter() as meter:
            token_logp, token_h = fn()
            (token_logp.sum() + 0.5 * token_h.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return token_logp.detach(), token_h.detach(), grads, meter.peak_bytes

    chunked = run(lambda: policy(ids, attention_mask, prompt, response_mask, tau))
    reference = run(full_logits)
    # The same two paths on a float64 copy: the reference values, and the float32 paths' error measured.
    lm64 = copy.deepcopy(lm).double()
    policy64 = PolicyModel(lm64, logits_chunk=32)
    chunked64 = run(lambda: policy64(ids, attention_mask, prompt, response_mask, tau), lm64)
    reference64 = run(lambda: full_logits(lm64), lm64)
    assert chunked[0].shape == (int(lengths.sum()),)
    for k in (0, 1):  # ℓ, H per token
        err32 = float((reference[k].double() - reference64[k]).abs().max())
        scale = float(reference64[k].abs().max())
        # tol: fp two float32 paths (chunked head vs full logits) of one model, each within ≈ err32 =
        # max_t |x₃₂ − x₆₄| of the full path (measured): 4× safety each, plus one float32 rounding of |x| (4u₃₂|x|)
        tol = 2 * (4 * err32 + fp_bound(torch.float32, 1, scale))
        assert float((chunked[k] - reference[k]).abs().max()) <= tol, (k, tol)
        # tol: fp the same two paths in float64: two_path_tol64 (float32 error rescaled to float64); a wrong
        # temperature, target shift or entropy formula is O(1) here
        assert float((chunked64[k] - reference64[k]).abs().max()) <= two_path_tol64(err32, scale), k
        assert tol < 1e-3 * scale, (k, tol, scale)  # tol: bound teeth (above)
    # tol: fp gradients likewise, relative to each tensor's float64 norm: err32 = the full path's largest relative
    # error over the tensors, measured; two float32 paths, 4× safety each, plus one float32 rounding
    err32 = max(relative_error(a, b) for a, b in zip(reference[2], reference64[2]))
    tol = 2 * (4 * err32 + fp_bound(torch.float32, 1, 1.0))
    for a, b, a64, b64 in zip(chunked[2], reference[2], chunked64[2], reference64[2]):
        assert relative_error(a, b) <= tol, (relative_error(a, b), tol)
        assert relative_error(a64, b64) <= two_path_tol64(err32, 1.0)  # tol: fp float64 paths (above)
    assert tol < 1e-3, tol  # tol: bound teeth: a missing chain-rule term through the head is O(1) relative
    # tol: bound the full path keeps its [n, width, V] float32 log-probs for backward (log_softmax saves its output),
    # besides what both paths keep (the decoder's activations); the chunked head keeps no [·, V] tensor at all
    assert reference[3] - chunked[3] >= n * width * vocab * 4, (chunked[3], reference[3])


# ------------------------------------------------------------------------------------- auto_microbatch
_NUMBERS = ("entropy/base", "entropy/base_se", "entropy/base_naive", "update/grad_norm", "update/clip_coef",
            "update/u_norm", "delta_h1/per_eta", "delta_h1/per_eta_se")


@pytest.fixture(scope="module")
def oom_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    ckpt = build_synthetic_checkpoint(root / "ckpt", hidden=64, layers=2, lora_r=4, max_new_tokens=6)
    prompts = write_empty_answer_prompts(root / "prompts.jsonl", 16)
    common = [f"sampling.prompts={prompts}", "sampling.B_E=4", "sampling.G_E=4", "sampling.B_U=4",
              "sampling.G_U=4", "estimators.etas=[0,1e-4,1e-3]",
              "sampling.seed=2"]  # a seed whose U groups have mixed rewards (an empty answer is rare: ~1/V)
    return ckpt, common


def _simulated_oom(monkeypatch, max_rows: int) -> list:
    """PolicyModel.forward raises an out-of-memory error for microbatches of more than max_rows sequences."""
    raised = []
    real_forward = PolicyModel.forward

    def forward(self, input_ids, *args, **kwargs):
        if input_ids.shape[0] > max_rows:
            raised.append(int(input_ids.shape[0]))
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {input_ids.shape[0]} rows)")
        return real_forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(PolicyModel, "forward", forward)
    return raised


def test_auto_microbatch_retry_equals_small_microbatch_run(oom_setup, monkeypatch):
    ckpt, common = oom_setup
    reference_probe = make_probe(ckpt, [*common, "memory.microbatch_score=2", "memory.microbatch_grad=2"])
    reference = reference_probe.run().summary()

    raised = _simulated_oom(monkeypatch, max_rows=2)
    probe = make_probe(ckpt, [*common, "memory.auto_microbatch=true", "memory.microbatch_score=4",
                              "memory.microbatch_grad=4"])
    result = probe.run()
    retried = result.summary()
    assert raised, "the simulated out-of-memory error never fired"
    assert (probe.runner.sizes.score, probe.runner.sizes.grad) == (2, 2)
    assert result.microbatch_used["score"] == result.microbatch_used["grad"] == 2  # reported as used
    assert retried["status"] == reference["status"] == "completed"
    assert reference["update/grad_norm"] > 0  # mixed rewards: the gradient path is really exercised
    # tol: exact a pass that runs out of memory is rerun from its start at half the size, which then stays halved
    # (runner.run_groups): every pass's arithmetic is the reference run's, microbatches of 2, bit for bit
    for key in _NUMBERS:
        assert retried[key] == reference[key], key
    assert len(retried["sweep"]) == len(reference["sweep"]) == 3
    for got, want in zip(retried["sweep"], reference["sweep"]):
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key]), key
            else:  # tol: exact (above)
                assert got[key] == value, (want["eta"], key)


def test_out_of_memory_without_auto_microbatch_says_what_to_do(oom_setup, monkeypatch):
    ckpt, common = oom_setup
    _simulated_oom(monkeypatch, max_rows=2)
    probe = make_probe(ckpt, [*common, "memory.microbatch_score=4", "memory.microbatch_grad=4"])
    with pytest.raises(MemoryError, match="auto_microbatch=true"):
        probe.run()
