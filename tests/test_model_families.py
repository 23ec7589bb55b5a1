"""Real model families (tests/model_families.py): each loads through the probe's own loader, its teacher-forced
scorer is exactly the distribution the model defines (full forward) and the one the sampler draws from (cached
decoding), and a short probe run completes and restores the training state."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from probe_dist.data.prompts import prompt_token_ids
from probe_dist.rollout.batch import Group
from tests.model_families import (
    FAMILIES,
    MAX_NEW_TOKENS,
    build_family_checkpoint,
    build_family_model,
    write_family_prompts,
)
from tests.probe_harness import make_probe
from tests.test_chunked import lh_error_bound


def _scored_tolerance(probe, model64, mb, positions, tau: float) -> torch.Tensor:
    """Per scored token, a bound on |Δℓ|, |ΔH| between the probe's scorer (float32 logits from its own head pass, ℓ
    and H in float32) and a reference (float32 logits from another pass of the same model, ℓ and H in float64).

    The float32 logits' error is measured, not assumed: D = max |z₃₂ − z₆₄| over the scored positions against the
    same forward in float64 (eps₃₂ × this model's condition number on these inputs; row by row without the right
    padding, which eager float64 attention turns into NaN rows, and which a causal model does not see). Each float32
    pass is taken to be within D of the exact logits, and tests/test_chunked.lh_error_bound (4× safety) propagates
    that through ℓ and H — in float32 for the scorer, in float64 for the reference. A family feature left out (a
    soft cap, a window, a second EOS) moves ℓ and H by ≥ 1e-2 (test_family_feature_is_live).
    """
    p = mb.response_start
    z32, z64 = [], []
    with torch.no_grad():
        for row in range(mb.input_ids.shape[0]):
            n = int(mb.attention_mask[row].sum())
            assert bool(mb.attention_mask[row, :n].all()), "right padding only"
            kwargs = dict(input_ids=mb.input_ids[row:row + 1, :n], position_ids=positions[row:row + 1, :n])
            scored = mb.response_mask[row].nonzero(as_tuple=True)[0] + p - 1
            z32.append(probe.model(**kwargs).logits[0, scored].double() / tau)
            z64.append(model64(**kwargs).logits[0, scored].double() / tau)
    z32, z64 = torch.cat(z32), torch.cat(z64)
    assert bool(torch.isfinite(z64).all()), "the float64 reference must be finite"
    d = float((z32 - z64).abs().max())
    return lh_error_bound(z64, d, torch.float32) + lh_error_bound(z64, d, torch.float64)


def _ratio(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    """max |got − ref| / tol, NaN counted as infinitely far (max() would skip a NaN and pass)."""
    return float(((got.double() - ref).abs() / tol).nan_to_num(nan=float("inf")).max())


def _params():
    return [pytest.param(name, id=name) for name in FAMILIES]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """Family name → its checkpoint, built once per module, and the prompt file."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family_checkpoint(name, root / name)
        return built[name], write_family_prompts(root / "prompts.jsonl")

    return get


def _probe(ckpt, prompts, etas: str = "[0,1e-3]"):
    return make_probe(ckpt, [f"sampling.prompts={prompts}", "sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2",
                             "sampling.G_U=2", f"estimators.etas={etas}"])


def _scored_group(probe, name: str, prompt: str, seed: int) -> Group:
    """Fixed responses to `prompt`: full-length ones, ones that end in (each) EOS early, a one-token EOS answer."""
    spec = FAMILIES[name]
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([MAX_NEW_TOKENS, 3, 1, MAX_NEW_TOKENS - 1, 2])
    responses = torch.randint(3, spec.vocab_size, (len(lengths), MAX_NEW_TOKENS), generator=gen)
    pad = probe.tokenizer.pad_token_id
    eos_ids = spec.eos_ids
    for i, n in enumerate(lengths.tolist()):
        if n < MAX_NEW_TOKENS:
            responses[i, n - 1] = eos_ids[i % len(eos_ids)]
            responses[i, n:] = pad
    return Group(0, prompt_token_ids(probe.tokenizer, prompt), responses, lengths,
                 torch.zeros(len(lengths), dtype=torch.float64))


def _logp_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _groups(probe, name):
    return [_scored_group(probe, name, prompt, seed) for seed, prompt in enumerate(["12+13=", "7+8=", "19+0="])]


@pytest.mark.parametrize("name", _params())
def test_builds_and_loads(tmp_path, name):
    spec = FAMILIES[name]
    ckpt = build_family_checkpoint(name, tmp_path / "ckpt")
    assert {"base", "tokenizer", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
            "training_args.json"} <= {p.name for p in ckpt.iterdir()}
    args = json.loads((ckpt / "training_args.json").read_text())
    assert {k: args[k] for k in ("loss", "temperature", "max_new_tokens", "grad_clip")} == {
        "loss": "grpo", "temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "grad_clip": 1.0}
    gen_config = json.loads((ckpt / "base" / "generation_config.json").read_text())
    assert gen_config["eos_token_id"] == (list(spec.eos_ids) if spec.extra_eos else spec.eos_id)
    # Deterministic: a second build is bitwise the same checkpoint.
    again = build_family_checkpoint(name, tmp_path / "again")
    for rel in ("adapter_model.safetensors", "adapter_config.json", "base/model.safetensors", "tokenizer/tokenizer.json"):
        assert (ckpt / rel).read_bytes() == (again / rel).read_bytes(), rel

    probe = _probe(ckpt, write_family_prompts(tmp_path / "prompts.jsonl"))
    base = probe.model.get_base_model()
    assert type(base).__name__ == spec.model_class
    assert not base.training and all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    assert probe.load_info["provenance/trainable_params"] > 0
    coverage = probe.load_info["provenance/optimizer_coverage"]
    assert coverage["with_state"] == coverage["params"] == len(probe.trainable)
    assert coverage["numel"] == probe.load_info["provenance/trainable_params"]
    # LoRA sits on every one of the family's projections in every layer, and B ≠ 0 (the adapter is live).
    targets = sorted(n for n, _ in build_family_model(name).named_modules() if n.split(".")[-1] in spec.lora_targets)
    lora_a = sorted(n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in probe.trainable
                    if ".lora_A." in n)
    # tol: exact module names and a count: ≥ 2 layers × the family's targets (GPT-2: c_proj in attn and mlp)
    assert lora_a == targets and len(targets) >= 2 * len(spec.lora_targets)
    assert all(p.abs().sum() > 0 for n, p in probe.trainable if "lora_B" in n)
    for _, p in probe.trainable:
        state = probe.optimizer.state[p]
        assert float(state["step"]) == 2 and state["exp_avg"].abs().sum() > 0 and state["exp_avg_sq"].sum() > 0
    tok = probe.tokenizer
    assert tok.eos_token_id == spec.eos_id and tok.bos_token_id == spec.bos_id and len(tok) == spec.vocab_size
    assert tok.pad_token_id == (spec.pad_id if spec.pad_id is not None else spec.eos_id)  # loader's EOS fallback


@pytest.mark.parametrize("name", _params())
def test_scorer_matches_full_forward(family_dir, name):
    """ℓ and H from the probe's scorer = log_softmax(model(...).logits / τ) of the causal LM's own forward."""
    ckpt, prompts = family_dir(name)
    probe = _probe(ckpt, prompts)
    model64 = copy.deepcopy(probe.model).double()
    tau = probe.cfg.sampling.temperature
    worst = [0.0, 0.0]  # the largest error / tolerance ratio of ℓ and of H
    for group in _groups(probe, name):
        mb = group.layout(slice(0, group.size))
        p, w = mb.response_start, mb.response_mask.shape[1]
        positions = torch.arange(mb.input_ids.shape[1]).expand_as(mb.input_ids)  # the sampler's positions
        with torch.no_grad():
            logp, entropy = probe.runner.forward(mb, grad=False)
            logits = probe.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                 position_ids=positions).logits
        targets = mb.input_ids[:, p:p + w][mb.response_mask]
        ref_logp, ref_entropy = _logp_entropy(logits[:, p - 1:p - 1 + w][mb.response_mask], targets, tau)
        assert logp.shape == ref_logp.shape == (int(group.lengths.sum()),)
        tol = _scored_tolerance(probe, model64, mb, positions, tau)  # tol: fp (_scored_tolerance)
        worst[0] = max(worst[0], _ratio(logp, ref_logp, tol))
        worst[1] = max(worst[1], _ratio(entropy, ref_entropy, tol))
    assert worst[0] <= 1 and worst[1] <= 1, f"{name}: |Δℓ|, |ΔH| up to {worst[0]:.3g}, {worst[1]:.3g} × the bound"


@pytest.mark.parametrize("name", _params())
def test_scorer_matches_sampler_decode(family_dir, name):
    """ℓ and H from the scorer = those of the logits the sampler draws from (its cached, token-by-token decode)."""
    ckpt, prompts = family_dir(name)
    probe = _probe(ckpt, prompts)
    model64 = copy.deepcopy(probe.model).double()
    tau = probe.cfg.sampling.temperature
    decoder = probe.runner.decoder
    worst = [0.0, 0.0]  # the largest error / tolerance ratio of ℓ and of H
    for group in _groups(probe, name):
        mb = group.layout(slice(0, group.size))
        positions = torch.arange(mb.input_ids.shape[1]).expand_as(mb.input_ids)  # the sampler's positions
        tol = _scored_tolerance(probe, model64, mb, positions, tau)  # tol: fp (_scored_tolerance)
        with torch.no_grad():
            logp, entropy = probe.runner.forward(mb, grad=False)
        ref_logp, ref_entropy = [], []
        p = group.prompt_ids.shape[0]
        for row in range(group.size):  # as rollout.generate does it: prompt, then one token per step
            n = int(group.lengths[row])
            with torch.no_grad():
                step_logits, cache = decoder.decode(group.prompt_ids.unsqueeze(0),
                                                    position_ids=torch.arange(p).unsqueeze(0))
                for t in range(n):
                    token = group.responses[row, t:t + 1]
                    lp, h = _logp_entropy(step_logits, token, tau)
                    ref_logp.append(lp)
                    ref_entropy.append(h)
                    if t + 1 < n:
                        step_logits, cache = decoder.decode(token.unsqueeze(0), past_key_values=cache,
                                                            position_ids=torch.tensor([[p + t]]))
        ref_logp, ref_entropy = torch.cat(ref_logp), torch.cat(ref_entropy)
        worst[0] = max(worst[0], _ratio(logp, ref_logp, tol))
        worst[1] = max(worst[1], _ratio(entropy, ref_entropy, tol))
    assert worst[0] <= 1 and worst[1] <= 1, f"{name}: |Δℓ|, |ΔH| up to {worst[0]:.3g}, {worst[1]:.3g} × the bound"


@pytest.mark.parametrize("name", _params())
def test_probe_run_eta_zero_and_restore(family_dir, name):
    ckpt, prompts = family_dir(name)
    probe = _probe(ckpt, prompts)
    before = [p.detach().clone() for _, p in probe.trainable]
    result = probe.run()
    assert result.status == "completed" and result.restore_verified
    assert [pt.eta for pt in result.sweep] == [0.0, 1e-3]
    assert result.sweep[0].delta_h_true == 0.0
    assert all(torch.isfinite(torch.tensor([pt.delta_h_true, pt.delta_h1, pt.entropy_new])).all()
               for pt in result.sweep)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, probe.trainable))


@pytest.mark.parametrize("name", [n for n, spec in FAMILIES.items() if spec.extra_eos])
def test_sampler_stops_at_every_eos(family_dir, name):
    """A response ends at the first token that is any of generation_config's EOS ids, and is scored through it."""
    ckpt, prompts = family_dir(name)
    probe = _probe(ckpt, prompts)
    eos_ids = torch.tensor(FAMILIES[name].eos_ids)
    batch = probe.sample("E", 8, 32)
    seen_extra = 0
    for group in batch.groups:
        for row, n in zip(group.responses, group.lengths.tolist()):
            is_eos = torch.isin(row[:n], eos_ids)
            assert not is_eos[:-1].any(), f"response {row.tolist()} runs past an EOS (length {n})"
            assert n == MAX_NEW_TOKENS or is_eos[-1]
            seen_extra += int(torch.isin(row[:n], eos_ids[1:]).any())
    assert seen_extra > 0  # the second EOS was actually drawn, so the check above covered it


LIVE_FEATURES = [  # (family, config change that switches the feature off, first position it must change)
    ("mistral", {"sliding_window": 64}, 4),
    ("gemma2", {"sliding_window": 64}, 4),
    ("gemma3", {"sliding_window": 64}, 4),
    ("gemma2", {"attn_logit_softcapping": None}, 1),
    ("gemma2", {"final_logit_softcapping": None}, 0),
    ("gemma3", {"final_logit_softcapping": None}, 0),
]


@pytest.mark.parametrize(("name", "off", "first"), LIVE_FEATURES,
                         ids=[f"{n}-{next(iter(o))}" for n, o, _ in LIVE_FEATURES])
def test_family_feature_is_live(name, off, first):
    """Each family feature the matrix is there for changes the logits at our sequence lengths (≤ 12 tokens), so
    the equality tests above are not vacuous; raw logits exceed the soft-cap severalfold."""
    ids = torch.randint(3, FAMILIES[name].vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = build_family_model(name)(input_ids=ids).logits
        without = build_family_model(name, **off)(input_ids=ids).logits
    change = (on - without).abs().amax(dim=(0, 2))
    # tol: exact before `first` the two models run the same float ops on the same inputs (bit for bit)
    # tol: bound the feature moves the logits by > 1e-2 from `first` on: ≥ 1e3 × their float32 rounding (4u₃₂·|z|,
    # ≤ 1e-5 for |z| ≤ 30 after the cap, ≤ 5e-5 raw at |z| ≤ 220), and ≥ 100 × the tolerances of the scorer checks
    # above (_scored_tolerance, ~1e-5–1e-4 on these models), so those checks would see the feature missing
    assert (change[:first] == 0).all() and (change[first:] > 1e-2).all(), change.tolist()
    if "final_logit_softcapping" in off:
        # tol: bound precondition: raw logits beyond 3× the cap, so the cap is active (tanh(3) = 0.995 of it) and the
        # capped ones within it (|c·tanh(z/c)| ≤ c by construction)
        assert without.abs().max() > 3 * FAMILIES[name].softcap >= on.abs().max()


@pytest.mark.parametrize("name", [n for n, spec in FAMILIES.items() if spec.softcap])
def test_soft_capped_entropy_equals_an_independent_full_forward(family_dir, name):
    """entropy/base of a run equals Σ_i Σ_t H_{i,t} / Σ T_i computed from the model's own full forward (its
    soft-capped logits, log_softmax at τ in float64) on the same E samples, to 1e-6 relative."""
    ckpt, prompts = family_dir(name)
    probe = _probe(ckpt, prompts)
    model64 = copy.deepcopy(probe.model).double()
    result = probe.run()
    tau = probe.cfg.sampling.temperature
    total_h = total_t = total_tol = 0.0  # tol: fp summed from _scored_tolerance's per-token bounds below
    causal = probe.policy.lm
    with torch.no_grad():
        for group in result.batch_e.real_groups:
            mb = group.layout(slice(0, group.size))
            position_ids = (mb.attention_mask.cumsum(-1) - 1).clamp_min(0)
            logits = causal(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                            position_ids=position_ids).logits.double()
            start, width = mb.response_start, mb.response_mask.shape[1]
            logp = torch.log_softmax(logits[:, start - 1:start - 1 + width] / tau, dim=-1)
            h = -(logp.exp() * logp).sum(-1)
            total_h += float(h[mb.response_mask].sum())
            total_t += float(mb.response_mask.sum())
            total_tol += float(_scored_tolerance(probe, model64, mb, position_ids, tau).sum())
    # tol: fp Ĥ = Σ H / Σ T with T exact: its error is at most the mean of the per-token bounds of _scored_tolerance
    assert result.base.entropy == pytest.approx(total_h / total_t, rel=0, abs=total_tol / total_t)


def test_consistency_check_refuses_a_scorer_that_skips_the_soft_cap(family_dir, monkeypatch):
    """The start-up check guards the whole kind: with the scorer's logit post-processing switched off (as for an
    unknown custom head), the run is refused with the model class and the size of the disagreement."""
    from probe_dist.errors import CheckpointError
    from probe_dist.model import policy as policy_module
    from probe_dist.model.logits import LogitTransform

    ckpt, prompts = family_dir("gemma2")
    monkeypatch.setattr(policy_module, "logit_transform", lambda config: LogitTransform())
    probe = _probe(ckpt, prompts)
    before = [p.detach().clone() for _, p in probe.trainable]
    with pytest.raises(CheckpointError, match=r"Gemma2ForCausalLM.*|disagree by up to") as info:
        probe.run()
    assert "Gemma2ForCausalLM" in str(info.value) and "tolerance" in str(info.value)
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, probe.trainable))  # state restored
    # The loosest tolerance (bfloat16 forwards, or float32 under precision.matmul=medium) still refuses it.
    from probe_dist.scoring.consistency import sampler_scorer_tolerance

    gap = float(re.search(r"disagree by up to ([0-9.e+-]+)", str(info.value)).group(1))
    loosest = max(sampler_scorer_tolerance(torch.float32, m) for m in ("highest", "high", "medium"))
    assert loosest == sampler_scorer_tolerance(torch.bfloat16) and gap > loosest, (gap, loosest)  # tol: exact


def test_reduced_matmul_precision_loosens_the_start_up_check_to_its_format():
    """precision.matmul=high|medium rounds float32 matmul inputs to TF32/bf16x3 or bfloat16: the check accepts
    that format's rounding (the float16/bfloat16 bounds), never less than the dtype's own."""
    from probe_dist.scoring.consistency import TOLERANCE, sampler_scorer_tolerance

    for dtype in (torch.float32, torch.float64):
        assert sampler_scorer_tolerance(dtype) == TOLERANCE[dtype]  # tol: exact
        assert sampler_scorer_tolerance(dtype, "high") == TOLERANCE[torch.float16]  # tol: exact
        assert sampler_scorer_tolerance(dtype, "medium") == TOLERANCE[torch.bfloat16]  # tol: exact
    assert sampler_scorer_tolerance(torch.bfloat16, "highest") == TOLERANCE[torch.bfloat16]  # tol: exact
    with pytest.raises(KeyError):
        sampler_scorer_tolerance(torch.float32, "low")


def test_dynamic_ntk_rope_is_refused(tmp_path):
    """Dynamic-NTK RoPE rescales positions by the length seen so far, so cached decoding and a teacher-forced
    forward disagree: the start-up check refuses it rather than report η = 0 ≠ 0."""
    from probe_dist.errors import CheckpointError

    ckpt = build_family_checkpoint("llama", tmp_path / "llama_dynamic", rope_scaling={"rope_type": "dynamic",
                                                                                      "factor": 4.0},
                                   max_position_embeddings=8)
    prompts = write_family_prompts(tmp_path / "prompts.jsonl")
    probe = _probe(ckpt, prompts)
    with pytest.raises(CheckpointError, match="dynamic-NTK"):
        probe.run()
