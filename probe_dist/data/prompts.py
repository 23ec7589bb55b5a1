"""Prompt sources and the seeded prompt sampler.

``load_prompts(source, split)``: ``"toy"`` is the packaged toy task; a directory saved with
``datasets.Dataset.save_to_disk`` (or a DatasetDict: ``split`` picks the split) or a ``.parquet`` / ``.csv`` /
``.arrow`` data file, read with the ``datasets`` package; anything else is a JSONL file with one
``{"prompt": str, "answer": str}`` object per line (extra keys are kept and passed to reward functions). A prompt
may also be a conversation, ``[{"role": ..., "content": ...}, ...]`` (TRL's conversational format): it is rendered
with the tokenizer's chat template and the generation prompt.

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

import torch

from probe_dist.config import ConfigError
from probe_dist.toy.task import SPLITS

REQUIRED_KEYS = ("prompt", "answer")
LINE_FORM = 'one JSON object per line, e.g. {"prompt": "2+2=", "answer": "4"}'


class PromptError(ConfigError):
    """A prompt source the probe cannot use (sampling.prompts): names the file and line, and the fix.

    A ConfigError, so also a ValueError (and a UserInputError: the CLI exits 2)."""


class PromptFileNotFoundError(PromptError, FileNotFoundError):
    """sampling.prompts names a file that does not exist (or is a directory)."""


def load_prompts(source: str, split: str = "train", *, require_answer: bool = True) -> list[dict]:
    """Load prompts as a list of dicts with at least ``"prompt"`` and ``"answer"`` (both str).

    ``source="toy"`` reads the packaged ``toy_<split>.jsonl`` (split ``"train"`` or ``"test"``); any
    other source is a path to a JSONL file and ``split`` is ignored. Raises `PromptError` (a ValueError;
    `PromptFileNotFoundError`, also a FileNotFoundError, for a missing file) naming the file and line.
    """
    return [record for _, record in load_prompts_with_lines(source, split, require_answer=require_answer)]


def prompt_source_name(source: str, split: str = "train") -> str:
    """How messages name a prompt source: the file path, or the packaged toy split."""
    return f"<package probe_dist.toy>/data/toy_{split}.jsonl" if source == "toy" else str(Path(source).expanduser())


DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_prompts_with_lines(source: str, split: str = "train", *,
                            require_answer: bool = True) -> list[tuple[int, dict]]:
    """`load_prompts`, each record paired with its 1-based line (or row) number in the source (for messages).

    require_answer: every record needs an "answer" (the built-in rewards use it); reward functions given by name
    read whichever columns they need, so then only "prompt" is required.
    """
    if source == "toy":
        if split not in SPLITS:
            raise PromptError(f"unknown split {split!r} of the toy task; choose one of {', '.join(SPLITS)}")
        resource = resources.files("probe_dist.toy").joinpath(f"data/toy_{split}.jsonl")
        return _parse_jsonl(resource.read_bytes(), prompt_source_name(source, split))

    path = Path(source).expanduser()
    if path.is_dir() or path.suffix in DATASET_SUFFIXES:
        if path.exists():
            return _validated(_dataset_rows(path, split), str(path), require_answer, unit="row")
    if not path.is_file():
        problem = "does not exist"
        raise PromptFileNotFoundError(
            f"prompt file {str(path)!r} {problem}. sampling.prompts must be 'toy' (the built-in task), the "
            'path of a JSONL file with one {"prompt": ..., "answer": ...} object per line, a directory saved with '
            "datasets' save_to_disk, or a .parquet/.csv/.arrow data file."
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PromptError(f"prompt file {str(path)!r} cannot be read ({err.strerror or err}); check its "
                          "permissions, or point sampling.prompts at a readable JSONL file.") from None
    return _validated(_jsonl_rows(data, str(path)), str(path), require_answer)


def _dataset_rows(path: Path, split: str) -> list[tuple[int, object]]:
    """(row number, record) of a `datasets` source: a save_to_disk directory (a DatasetDict: its `split`) or a data
    file read with datasets' own loader for its format. Offline: nothing is downloaded."""
    try:
        import datasets
    except ImportError:
        raise PromptError(f"sampling.prompts={str(path)!r} is a datasets source, which needs the `datasets` package: "
                          "pip install datasets (or convert the prompts to JSONL).") from None
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise PromptError(f"dataset {str(path)!r} has splits {', '.join(data)}, not {split!r}; set "
                                      "sampling.split to one of them.")
                data = data[split]
        else:
            data = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
    except PromptError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable dataset is the same problem for the user
        what = "is a directory, but not one written by datasets' save_to_disk" if path.is_dir() else \
            "cannot be read by datasets"
        raise PromptError(f"prompt file {str(path)!r} {what} ({type(err).__name__}: {str(err)[:160]}). "
                          "sampling.prompts must be 'toy', a JSONL file with one {\"prompt\": ..., \"answer\": ...} "
                          "object per line, a save_to_disk directory, or a .parquet/.csv/.arrow file.") from None
    return [(k + 1, row) for k, row in enumerate(data)]


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


def is_conversational(record: dict) -> bool:
    """A row whose prompt is a list of chat messages (TRL's conversational format), not a text."""
    return isinstance(record.get("prompt"), list)


def conversation_problem(messages) -> str | None:
    """What is wrong with a conversational prompt, or None: a non-empty list of {"role": str, "content": str}."""
    if not messages:
        return "the list is empty"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {k} is {str(m)[:60]!r}"
    return None


def prompt_text(record: dict) -> str:
    """A prompt as one line of text for messages: the text itself, or the conversation's last message."""
    prompt = record["prompt"]
    return prompt if isinstance(prompt, str) else f"[{prompt[-1]['role']}] {prompt[-1]['content']}"


def _parse_jsonl(data: bytes, name: str) -> list[tuple[int, dict]]:
    return _validated(_jsonl_rows(data, name), name, True)


def _jsonl_rows(data: bytes, name: str) -> list[tuple[int, object]]:
    text = _decode(data, name)
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise PromptError(
                f"prompt file {name}, line {line_number}: not valid JSON ({err.msg}, column {err.colno}): "
                f"{line[:80]!r}. The file must hold {LINE_FORM}."
            ) from None
    return rows


def _validated(rows: list[tuple[int, object]], name: str, require_answer: bool,
               unit: str = "line") -> list[tuple[int, dict]]:
    required = REQUIRED_KEYS if require_answer else ("prompt",)
    prompts = []
    for line_number, record in rows:
        where = f"prompt file {name}, {unit} {line_number}"
        if not isinstance(record, dict):
            raise PromptError(
                f"{where}: expected a JSON object with keys {REQUIRED_KEYS}, got {type(record).__name__}; "
                f"the file must hold {LINE_FORM}."
            )
        missing = [key for key in required if key not in record]
        if missing:
            raise PromptError(
                f"{where}: missing key(s) {', '.join(missing)}; every {unit} needs "
                f"{' and '.join(required)} (found keys: {', '.join(map(str, record)) or 'none'}), "
                f"e.g. {{\"prompt\": \"2+2=\", \"answer\": \"4\"}}."
            )
        prompt = record["prompt"]
        if isinstance(prompt, list):
            problem = conversation_problem(prompt)
            if problem:
                raise PromptError(f"{where}: 'prompt' is a list, so it must be a conversation — a non-empty list of "
                                  f'{{"role": ..., "content": ...}} messages with string content ({problem}); '
                                  'e.g. {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}.')
        elif not isinstance(prompt, str) or not prompt:
            raise PromptError(f"{where}: 'prompt' must be a non-empty string or a list of chat messages, got "
                              f"{prompt!r}; give every {unit} a prompt text.")
        if "answer" in record and require_answer:  # reward functions given by name get the column as it is
            answer = record["answer"]
            if isinstance(answer, bool) or not isinstance(answer, str | int | float):
                raise PromptError(
                    f"{where}: 'answer' must be a string (or a number), got {type(answer).__name__}; "
                    "write the reference answer as a string."
                )
            record = {**record, "answer": str(answer)}
        prompts.append((line_number, record))
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


def prompt_token_ids(tokenizer, prompt, bos: str = "always") -> torch.Tensor:
    """[P] long: the prompt's token ids as training built them.

    prompt: a text, or a conversation (a list of {"role", "content"} messages) rendered by the tokenizer's chat
    template with the generation prompt, as TRL does (apply_chat_template(add_generation_prompt=True)); the template
    alone decides special tokens, so a template that starts with BOS is not given a second one. For a text, `bos`:
    "auto" — the tokenizer's own rule (tokenizer(text), as TRL: Llama-style tokenizers add BOS, Qwen's none),
    "always" — BOS in front whenever the tokenizer defines one, not doubled (the toy task's training), "never" — no
    special tokens. Raises PromptError when a conversation meets a tokenizer without a chat template.
    """
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("the prompts are conversations (lists of chat messages), but the tokenizer has no chat "
                              "template to render them; use a tokenizer with one (the training tokenizer), or "
                              "write the prompts as plain text.")
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return torch.tensor(list(out["input_ids"]), dtype=torch.long)
    if bos == "auto":
        return torch.tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if bos == "never":
        return ids
    bos_id = tokenizer.bos_token_id
    if bos_id is not None and (ids.numel() == 0 or ids[0] != bos_id):
        ids = torch.cat([torch.tensor([bos_id]), ids])
    return ids
