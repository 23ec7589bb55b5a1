"""The probe's decoding paths use no deprecated transformers cache API.

transformers 5.24 (the pinned version) decorates every built-in model's forward with
`@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")` — a FutureWarning on each call, and the keyword
goes away in 5.40 — and keeps `ModelOutput.past_key_values` only as an alias of `.cache` that logs through
`transformers.utils.generic.logger.warning_once` (a log line, not a Python warning). Every path below runs under a
guard that turns both into errors:

- the sampler (`rollout.generate.sample_rows` through `PolicyModel.decode`),
- the start-up consistency check (`scoring.consistency.decode_logps`),
- GRADE's relaxed rollout (`update.grade.SoftRolloutRunner`: the decoder with inputs_embeds and an explicit
  DynamicCache), forward and backward (the checkpointed steps rerun the decoder in backward),

for each of the nine families of tests/model_families.py (tiny random models built from their configs, with a
LoRA adapter as the probe loads them). `test_guard_catches_the_deprecated_forms` asserts that the guard is live:
with the pinned transformers the old keyword and the old attribute raise under it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import pytest
import torch

from tests.model_families import FAMILIES, MAX_NEW_TOKENS, build_family_model

PROMPT = torch.tensor([2, 5, 13, 7, 14])  # "<bos>2+4=" in the toy tokenizer's ids (every family's vocab has them)
OLD_NAMES = r"past_key_values|cache_params"


class _RaisingLogger:
    """Stands in for `transformers.utils.generic.logger`: its `warning_once` (what the deprecated output
    attributes call) becomes a FutureWarning, so the guard's error filter raises it; the rest is the real logger."""

    def __init__(self, real):
        self._real = real

    def warning_once(self, msg, *args, **kwargs):
        warnings.warn(str(msg), FutureWarning, stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def no_deprecated_cache_api(monkeypatch):
    """Every FutureWarning, every DeprecationWarning raised from transformers or naming the old cache keywords, and
    the deprecated `ModelOutput.past_key_values` / `.cache_params` attribute reads become errors inside the block."""
    import transformers.utils.generic as generic

    monkeypatch.setattr(generic, "logger", _RaisingLogger(generic.logger))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        # deprecate_kwarg warns with stacklevel=2, so the warning is attributed to the caller's module (torch's
        # Module.__call__, our code): match on the message as well as on transformers' own modules
        warnings.filterwarnings("error", category=DeprecationWarning, module=r"transformers(\.|$)")
        warnings.filterwarnings("error", message=rf".*\b({OLD_NAMES})\b", category=DeprecationWarning)
        yield
    monkeypatch.undo()


def _lora_family_model(name: str) -> torch.nn.Module:
    """The family's tiny base model (float32, eval) with a Gaussian-initialised LoRA adapter on its projections."""
    from peft import LoraConfig, get_peft_model

    spec = FAMILIES[name]
    model = get_peft_model(build_family_model(name), LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(spec.lora_targets),
        init_lora_weights="gaussian"))
    return model.eval()


def test_guard_catches_the_deprecated_forms(monkeypatch):
    """Precondition of the tests below: at the pinned transformers, `past_key_values=` on a model's forward and
    reading `out.past_key_values` both raise under the guard (so the guard would catch the pre-5.40 calls), while
    `cache=` / `out.cache` run clean. When transformers removes the old names this check fails loudly and is to be
    retired with them."""
    model = build_family_model("qwen2")
    ids = PROMPT.unsqueeze(0)
    with no_deprecated_cache_api(monkeypatch):
        with pytest.raises(FutureWarning, match=re.escape("`past_key_values` is deprecated")):
            model(input_ids=ids, past_key_values=None, use_cache=True)
        out = model(input_ids=ids, cache=None, use_cache=True)
        assert out.cache is not None
        with pytest.raises(FutureWarning, match=re.escape("`past_key_values`/`cache_params` are deprecated")):
            _ = out.past_key_values
        with pytest.raises(FutureWarning, match=re.escape("`past_key_values` is deprecated")):
            model.get_decoder()(input_ids=ids, past_key_values=None, use_cache=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampler_and_consistency_decode_use_cache_keyword(name, monkeypatch):
    """sample_rows (two prompts of different lengths: left padding) and decode_logps run clean under the guard, and
    the cache really is the one passed as `cache=` (a dropped keyword would start a fresh cache each call): after
    the prompt and t more decode calls it holds every position fed."""
    from probe_dist.model.policy import PolicyModel
    from probe_dist.model.runner import PolicyRunner
    from probe_dist.rollout.batch import Group
    from probe_dist.rollout.generate import response_seed, sample_rows
    from probe_dist.scoring.consistency import decode_logps

    spec = FAMILIES[name]
    model = _lora_family_model(name)
    policy = PolicyModel(model)
    prompts = [PROMPT, PROMPT[1:]]
    keys = torch.tensor([response_seed(0, "E", j, 0) for j in range(2)], dtype=torch.int64)
    pad = spec.pad_id if spec.pad_id is not None else spec.eos_id
    seen: list[tuple[int, int]] = []  # (positions fed so far, the returned cache's length) per decode call
    fed = [0]

    def recording_decode(input_ids, past_key_values=None, position_ids=None, attention_mask=None):
        logits, cache = PolicyModel.decode(policy, input_ids, past_key_values, position_ids, attention_mask)
        fed[0] = (0 if past_key_values is None else fed[0]) + input_ids.shape[1]
        seen.append((fed[0], int(cache.get_seq_length())))
        return logits, cache

    monkeypatch.setattr(policy, "decode", recording_decode)
    with no_deprecated_cache_api(monkeypatch):
        responses, lengths = sample_rows(policy, prompts, [0, 1], keys, max_new_tokens=MAX_NEW_TOKENS,
                                         temperature=1.0, eos_ids=spec.eos_ids, pad_id=pad,
                                         device=torch.device("cpu"), lockstep=True)
        assert len(seen) == MAX_NEW_TOKENS  # tol: exact lockstep runs every step
        assert all(cached == total for total, cached in seen), seen  # tol: exact the cache holds every position

        runner = PolicyRunner.single_process(model, temperature=1.0, rows=2)
        group = Group(prompt_index=0, prompt_ids=PROMPT, responses=responses[:1].repeat(2, 1),
                      lengths=lengths[:1].repeat(2), rewards=torch.zeros(2, dtype=torch.float64))
        seen.clear()
        runner.strategy = dataclasses.replace(runner.strategy, policy=policy, root=policy, decoder=policy)
        decoded, scored = decode_logps(runner, group, rows=2, steps=MAX_NEW_TOKENS, pad_id=pad)
    assert seen and all(cached == total for total, cached in seen), seen  # tol: exact as above
    assert decoded.shape == scored.shape and decoded.numel() == 2 * int(lengths[0])  # tol: exact counts
    assert bool(torch.isfinite(decoded).all())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grade_rollout_uses_cache_keyword(name, monkeypatch):
    """GRADE's cached relaxed rollout (policy and reference, so the KL is tracked) and its backward through the
    checkpointed steps run clean under the guard; the adapter gets a gradient (the rollout ran end to end)."""
    from probe_dist.model.policy import PolicyModel
    from probe_dist.update.grade import GradeSpec, SoftRolloutRunner, row_keys

    model = _lora_family_model(name)
    spec = GradeSpec(steps=MAX_NEW_TOKENS, temperature=1.0, tau_g=0.7, top_k=0, straight_through=False, kl_coef=0.1)
    run = SoftRolloutRunner(PolicyModel(model), model.disable_adapter, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    with no_deprecated_cache_api(monkeypatch):
        roll = run.rollout(PROMPT, row_keys(0, "U", 0, range(2)))
        value = sum(tok.dense(FAMILIES[name].vocab_size)[:, -1].sum() for tok in roll.tokens) + roll.kl.sum()
        grads = torch.autograd.grad(value, params, allow_unused=True)
    assert roll.hard.shape == (2, MAX_NEW_TOKENS)  # tol: exact
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)  # tol: exact a gradient reached the adapter
