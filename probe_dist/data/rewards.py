"""Reward functions: ``get_reward_fn(name)(response_text, answer) -> float``.

A reward function sees the response *text* — the generated tokens up to (not including) the first
EOS, decoded with other special tokens kept and surrounding whitespace stripped; ``decode_response``
produces exactly that from token ids, so every caller scores the same string.
"""

from __future__ import annotations

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
