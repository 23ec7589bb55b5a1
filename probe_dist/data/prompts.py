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

from probe_dist.config import ConfigError
from probe_dist.data.toy_task import SPLITS

REQUIRED_KEYS = ("prompt", "answer")
LINE_FORM = 'one JSON object per line, e.g. {"prompt": "2+2=", "answer": "4"}'


class PromptError(ConfigError):
    """A prompt source the probe cannot use (sampling.prompts): names the file and line, and the fix.

    A ConfigError, so also a ValueError (and a UserInputError: the CLI exits 2)."""


class PromptFileNotFoundError(PromptError, FileNotFoundError):
    """sampling.prompts names a file that does not exist (or is a directory)."""


def load_prompts(source: str, split: str = "train") -> list[dict]:
    """Load prompts as a list of dicts with at least ``"prompt"`` and ``"answer"`` (both str).

    ``source="toy"`` reads the packaged ``toy_<split>.jsonl`` (split ``"train"`` or ``"test"``); any
    other source is a path to a JSONL file and ``split`` is ignored. Raises `PromptError` (a ValueError;
    `PromptFileNotFoundError`, also a FileNotFoundError, for a missing file) naming the file and line.
    """
    return [record for _, record in load_prompts_with_lines(source, split)]


def prompt_source_name(source: str, split: str = "train") -> str:
    """How messages name a prompt source: the file path, or the packaged toy split."""
    return f"<package probe_dist.data>/toy_{split}.jsonl" if source == "toy" else str(Path(source).expanduser())


def load_prompts_with_lines(source: str, split: str = "train") -> list[tuple[int, dict]]:
    """`load_prompts`, each record paired with its 1-based line number in the file (for messages)."""
    if source == "toy":
        if split not in SPLITS:
            raise PromptError(f"unknown split {split!r} of the toy task; choose one of {', '.join(SPLITS)}")
        resource = resources.files("probe_dist.data").joinpath(f"toy_{split}.jsonl")
        return _parse_jsonl(resource.read_bytes(), prompt_source_name(source, split))

    path = Path(source).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise PromptFileNotFoundError(
            f"prompt file {str(path)!r} {problem}. sampling.prompts must be 'toy' (the built-in task) or the "
            'path of a JSONL file with one {"prompt": ..., "answer": ...} object per line.'
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PromptError(f"prompt file {str(path)!r} cannot be read ({err.strerror or err}); check its "
                          "permissions, or point sampling.prompts at a readable JSONL file.") from None
    return _parse_jsonl(data, str(path))


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text (a leading BOM is dropped); PromptError naming the line and column of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = data[err.start:err.end].hex(" ")
        raise PromptError(
            f"prompt file {name}, line {line}, column {column}: not valid UTF-8 (byte(s) 0x{bad}). Prompt files "
            f"must be UTF-8 encoded: re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {name} > fixed.jsonl` "
            "if it is Latin-1."
        ) from None


def _parse_jsonl(data: bytes, name: str) -> list[tuple[int, dict]]:
    text = _decode(data, name)
    prompts = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"prompt file {name}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(
                f"{where}: not valid JSON ({err.msg}, column {err.colno}): {line[:80]!r}. "
                f"The file must hold {LINE_FORM}."
            ) from None
        if not isinstance(record, dict):
            raise PromptError(
                f"{where}: expected a JSON object with keys {REQUIRED_KEYS}, got {type(record).__name__}; "
                f"the file must hold {LINE_FORM}."
            )
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise PromptError(
                f"{where}: missing key(s) {', '.join(missing)}; every line needs "
                f"{' and '.join(REQUIRED_KEYS)} (found keys: {', '.join(map(str, record)) or 'none'}), "
                f"e.g. {{\"prompt\": \"2+2=\", \"answer\": \"4\"}}."
            )
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise PromptError(f"{where}: 'prompt' must be a non-empty string, got {record['prompt']!r}; "
                              "give every line a prompt text.")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise PromptError(
                f"{where}: 'answer' must be a string (or a number), got {type(answer).__name__}; "
                "write the reference answer as a string."
            )
        prompts.append((line_number, {**record, "answer": str(answer)}))
    if not prompts:
        raise PromptError(f"prompt file {name} contains no prompts; add {LINE_FORM}.")
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
