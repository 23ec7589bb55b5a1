"""Reward functions: ``get_reward_fn(name)(response_text, answer) -> float``.

A reward function sees the response *text* — the generated tokens up to (not including) the first
EOS, decoded with other special tokens kept and surrounding whitespace stripped; ``decode_response``
produces exactly that from token ids, so every caller scores the same string.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence

from probe_dist.errors import MissingDependencyError, RewardError

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to the registry under ``name``."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward function {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def reward_names() -> list[str]:
    """The names of the registered built-in reward functions, sorted."""
    return sorted(_REGISTRY)


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name``; `RewardError` (a ValueError) listing the registered names
    otherwise.

    ``"math_verify"`` needs the optional ``math-verify`` package and fails here, before any sampling, with
    `MissingDependencyError` (an ImportError) if it is missing.
    """
    if name not in _REGISTRY:
        raise RewardError(
            f"unknown reward function {name!r}; registered reward functions: {', '.join(reward_names())}"
        )
    if name == "math_verify":
        _import_math_verify()
    return _REGISTRY[name]


def decode_response(tokenizer, token_ids: Sequence[int], eos_ids: Sequence[int] | None = None) -> str:
    """Response text as reward functions see it: ids up to the first EOS (any of `eos_ids`, default the
    tokenizer's), stripped. Other special tokens stay in (a <pad> inside an answer must not decode to a
    correct-looking "19")."""
    ids = [int(t) for t in token_ids]
    stops = set(eos_ids) if eos_ids is not None else {tokenizer.eos_token_id} - {None}
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    if cut is not None:
        ids = ids[:cut]
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


@register_reward("exact_match")
def exact_match(response_text: str, answer: str) -> float:
    """1.0 if the stripped response equals the stripped answer, else 0.0."""
    return 1.0 if response_text.strip() == str(answer).strip() else 0.0


def _import_math_verify():
    try:
        import math_verify  # noqa: PLC0415
    except ImportError as err:
        raise MissingDependencyError(
            "reward 'math_verify' needs the optional package math-verify, which is not installed. "
            "Install it with `pip install math-verify` (or choose sampling.reward=exact_match)."
        ) from err
    return math_verify


@register_reward("math_verify")
def math_verify_reward(response_text: str, answer: str) -> float:
    """1.0 if math-verify judges the response mathematically equal to the answer, else 0.0."""
    math_verify = _import_math_verify()
    gold = math_verify.parse(str(answer))
    predicted = math_verify.parse(response_text)
    try:
        return 1.0 if math_verify.verify(gold, predicted) else 0.0
    except Exception:  # math-verify raises on unparsable input; an unparsable response is simply wrong
        return 0.0


def is_plugin_spec(spec: str) -> bool:
    """A reward given as package.module:function (one or several, comma-separated), not a built-in name."""
    return ":" in spec


class RewardSet:
    """Reward functions named `package.module:function`, each optionally `*weight`, comma-separated — TRL's
    calling convention and weighting (GRPOConfig.reward_weights, multi_objective_aggregation="sum_then_normalize").

    Each function is called once per prompt group as TRL calls it per batch:
        fn(prompts=[...], completions=[...], completion_ids=[...], trainer_state=None, log_extra=..., log_metric=...,
           **{column: [value per completion] for every other column of the prompt's record})
    with completions decoded as TRL does (the response through its EOS, special tokens skipped; for a
    conversational prompt, [{"role": "assistant", "content": text}]), and returns a list of floats (None: not
    scored). The reward is Σ_k w_k r_k over the functions that scored (NaN when none did: excluded from the
    group baseline, advantage 0, as TRL). Importing the module runs the user's own code, as a training script
    does; it is named in the config, never taken from a checkpoint.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.functions: list[tuple[str, Callable, float]] = []
        for part in (p.strip() for p in spec.split(",")):
            target, _, weight_text = part.partition("*")
            module_name, _, attr = target.strip().partition(":")
            try:
                weight = float(weight_text) if weight_text else 1.0
            except ValueError:
                raise RewardError(f"sampling.reward: weight {weight_text!r} of {target!r} is not a number; write "
                                  "package.module:function*0.5") from None
            if not module_name or not attr:
                raise RewardError(f"sampling.reward: {part!r} is not package.module:function[*weight]; e.g. "
                                  "sampling.reward=my_rewards:format_reward,my_rewards:accuracy*2")
            self.functions.append((target.strip(), _import_function(module_name, attr), weight))

    @property
    def names(self) -> list[str]:
        """The functions' targets (`package.module:function`, weights stripped), in the order of the spec."""
        return [name for name, _, _ in self.functions]

    def score(self, tokenizer, record: dict, response_ids: Sequence[Sequence[int]]):
        """(rewards [G] float64, {function name: [G] float64 with NaN for None}) of one group's responses."""
        import math

        import torch

        texts = tokenizer.batch_decode([list(map(int, ids)) for ids in response_ids], skip_special_tokens=True)
        conversational = isinstance(record.get("prompt"), list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        g = len(texts)
        columns = {k: [v] * g for k, v in record.items() if k not in ("prompt", "completion", "completion_ids")}
        parts = {}
        for name, fn, _ in self.functions:
            try:
                values = fn(prompts=[record["prompt"]] * g, completions=completions,
                            completion_ids=[list(map(int, ids)) for ids in response_ids], trainer_state=None,
                            log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)
            except Exception as err:
                raise RewardError(f"reward function {name} raised {type(err).__name__}: {str(err)[:200]} (called "
                                  f"with prompts, completions, completion_ids and the columns "
                                  f"{', '.join(columns) or 'none'}, as TRL calls it; accept **kwargs)") from err
            if inspect.iscoroutine(values):  # TRL accepts async reward functions
                values = asyncio.run(values)
            if hasattr(values, "tolist"):  # numpy arrays, tensors
                values = values.tolist()
            if not isinstance(values, list | tuple) or len(values) != g:
                raise RewardError(f"reward function {name} returned {type(values).__name__} of length "
                                  f"{len(values) if hasattr(values, '__len__') else '?'}; it must return a list "
                                  f"of {g} floats (one per completion), None for one it cannot score")
            parts[name] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
        stacked = torch.stack([parts[name] * weight for name, _, weight in self.functions])
        total = torch.nansum(stacked, dim=0)
        total[torch.isnan(stacked).all(dim=0)] = math.nan
        return total, parts


def _import_function(module_name: str, attr: str) -> Callable:
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"sampling.reward: cannot import module {module_name!r} ({err}); put it on PYTHONPATH "
                          "(or in the directory you run from) or install its package") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"sampling.reward: module {module_name!r} has no function {attr!r}")
    return fn


def get_rewards(spec: str):
    """The reward of sampling.reward: a built-in function (text, answer) → float by name, or a `RewardSet`."""
    return RewardSet(spec) if is_plugin_spec(spec) else get_reward_fn(spec)
