"""Prompt sources and the seeded prompt sampler.

``load_prompts(source, split)``: ``"toy"`` is the packaged toy task; anything else is a JSONL file
with one ``{"prompt": str, "answer": str}`` object per line (extra keys are kept).

``select_prompts(prompts, num, seed, batch_name)``: which prompts go into batch E or U. The random
stream is seeded from ``(seed, zlib.crc32(batch_name))`` — never Python's salted ``hash()`` — and the
shuffle is written out on top of ``random.Random.random()``, whose sequence Python guarantees to keep
across versions, so every rank, process and interpreter picks the same prompts.
"""

from __future__ import annotations

import json
import random
import zlib
from importlib import resources
from pathlib import Path

from probe_dist.data.toy_task import SPLITS

REQUIRED_KEYS = ("prompt", "answer")


def load_prompts(source: str, split: str = "train") -> list[dict]:
    """Load prompts as a list of dicts with at least ``"prompt"`` and ``"answer"`` (both str).

    ``source="toy"`` reads the packaged ``toy_<split>.jsonl`` (split ``"train"`` or ``"test"``); any
    other source is a path to a JSONL file and ``split`` is ignored.
    """
    if source == "toy":
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of the toy task; choose one of {', '.join(SPLITS)}")
        resource = resources.files("probe_dist.data").joinpath(f"toy_{split}.jsonl")
        return _parse_jsonl(
            resource.read_text(encoding="utf-8"), f"<package probe_dist.data>/toy_{split}.jsonl"
        )

    path = Path(source).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"prompt file {str(path)!r} {problem}. sampling.prompts must be 'toy' (the built-in task) or the "
            'path of a JSONL file with one {"prompt": ..., "answer": ...} object per line.'
        )
    return _parse_jsonl(path.read_text(encoding="utf-8"), str(path))


def _parse_jsonl(text: str, name: str) -> list[dict]:
    prompts = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{name}, line {line_number}: not valid JSON ({err.msg}): {line[:80]!r}"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{name}, line {line_number}: expected a JSON object with keys {REQUIRED_KEYS}, "
                f"got {type(record).__name__}"
            )
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ValueError(
                f"{name}, line {line_number}: missing key(s) {', '.join(missing)}; every line needs "
                f"{' and '.join(REQUIRED_KEYS)} (found keys: {', '.join(map(str, record)) or 'none'})"
            )
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise ValueError(f"{name}, line {line_number}: 'prompt' must be a non-empty string")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise ValueError(
                f"{name}, line {line_number}: 'answer' must be a string (or a number), got {type(answer).__name__}"
            )
        prompts.append({**record, "answer": str(answer)})
    if not prompts:
        raise ValueError(f"{name} contains no prompts")
    return prompts


def _stream_seed(seed: int, batch_name: str) -> int:
    return (int(seed) << 32) | zlib.crc32(batch_name.encode("utf-8"))


def _shuffled(n: int, rng: random.Random) -> list[int]:
    """Fisher–Yates on ``rng.random()`` (stable across Python versions, unlike ``rng.shuffle``)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        order[i], order[j] = order[j], order[i]
    return order


def select_prompts(prompts: list[dict], num: int, seed: int, batch_name: str) -> list[tuple[int, dict]]:
    """``num`` seeded ``(global_prompt_index, prompt)`` pairs for the batch called ``batch_name``.

    Without replacement while ``num <= len(prompts)``; beyond that, whole reshuffled passes over the
    prompts are concatenated (each prompt appears ⌊num/len⌋ or ⌈num/len⌉ times). Different
    ``batch_name``s (e.g. "E" and "U") give independent draws.
    """
    if num < 0:
        raise ValueError(f"select_prompts: num must be >= 0, got {num}")
    if num and not prompts:
        raise ValueError("select_prompts: the prompt list is empty")
    rng = random.Random(_stream_seed(seed, batch_name))
    indices: list[int] = []
    while len(indices) < num:
        indices.extend(_shuffled(len(prompts), rng)[: num - len(indices)])
    return [(i, prompts[i]) for i in indices]
