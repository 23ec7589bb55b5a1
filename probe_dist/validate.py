"""Checks of every input before the first model pass, with messages that name the file or tensor and the fix.

`probe_dist.main.build_probe` runs them cheapest first, so a typo costs seconds, not a model load:

1. the config (`probe_dist.config`) and the checkpoint's paths and JSON files (`model.load.resolve_paths`);
2. the training settings the run takes from training_args.json (`training_args`): typed and in range;
3. the prompt file (`data.prompts`): readable UTF-8 JSONL, non-empty, every line a {"prompt", "answer"} object;
   a note when a batch needs more prompts than the file holds (prompts then repeat);
4. the tokenizer (`model.load.load_tokenizer`): present and non-empty;
5. every prompt + max_new_tokens within the model's maximum positions (`check_prompts_fit`), and a warning
   (once) when prompt characters map to the tokenizer's unknown token;
6. weight files (`check_weight_files`): safetensors headers complete (truncation names the file), adapter
   tensors finite; the optimizer file (`model.load.read_optimizer_file`): loaded with weights_only=True (a
   pickle that would run code is refused), state finite and exp_avg_sq ≥ 0 (`check_optimizer_values`);
7. after loading: every model weight finite (`check_finite_parameters`).

Every refusal is a `UserInputError` (here: `CheckpointError` or `PromptError`): the CLI prints its one paragraph
and exits 2.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from probe_dist.data.prompts import PromptError
from probe_dist.model.load import CheckpointError

log = logging.getLogger("probe_dist")

LOSS_FAMILIES = ("grpo", "dr_grpo", "dapo")
# Files that carry a tokenizer's vocabulary (or, for tokenizer_config.json, name a vocabulary-free one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
_CHUNK = 1 << 24  # elements per isfinite() pass: bounds the temporary bool tensor on large weights


class TrainingArgsError(CheckpointError):
    """training_args.json records a setting the probe would use with a wrong type or out of range."""


class NonFiniteError(CheckpointError):
    """NaN/inf (or a negative second moment) in weights or optimizer state."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint file that would run code when loaded; refused, and never run."""


class PromptLengthError(PromptError):
    """A prompt (plus max_new_tokens) longer than the model's maximum positions."""


# ------------------------------------------------------------------------------------------------ JSON files


def read_json(path: Path, what: str, fix: str):
    """The parsed JSON of `path`; CheckpointError naming the file, the line and column, and `fix` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}). {fix}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CheckpointError(f"{what} {str(path)!r}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}). "
                              f"{fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno}. {fix}") from None


# ------------------------------------------------------------------------------------------------ training args


@dataclass(frozen=True)
class _Recorded:
    keys: tuple[str, ...]  # keys in training_args.json, first found wins
    setting: str  # the config key it fills
    need: str  # what is accepted, for the message


_RECORDED = {
    "temperature": _Recorded(("temperature",), "sampling.temperature", "a number > 0"),
    "max_new_tokens": _Recorded(("max_new_tokens",), "sampling.max_new_tokens", "an integer >= 1"),
    "loss": _Recorded(("loss",), "update.loss", f"one of {', '.join(LOSS_FAMILIES)}"),
    "grad_clip": _Recorded(("grad_clip", "max_grad_norm"), "update.grad_clip", "a number >= 0 (0 or null: no clipping)"),
}


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}.get(type(value))
    return f"{json.dumps(value)[:60]} ({kind or type(value).__name__})"


def training_args(recorded: dict, cfg, source: Path | None) -> dict:
    """The settings training_args.json records for the keys `cfg` leaves unset, typed and range-checked.

    Returns a copy of `recorded` whose used values are normalised (temperature a float, max_new_tokens an int,
    grad_clip a float or None). Keys the config sets explicitly are not checked: the explicit setting wins. Raises
    TrainingArgsError naming the file, the key, the value, what is accepted and the override that fixes it.
    """
    where = str(source) if source is not None else "training_args.json"
    out = dict(recorded)
    for name, spec in _RECORDED.items():
        section, key = spec.setting.split(".")
        if getattr(getattr(cfg, section), key) is not None:
            continue
        found = next((k for k in spec.keys if k in recorded and recorded[k] is not None), None)
        if found is None:
            continue
        value = recorded[found]
        ok = False
        if name == "temperature":
            ok = _is_number(value) and math.isfinite(value) and value > 0
            norm = float(value) if ok else None
        elif name == "max_new_tokens":
            ok = _is_number(value) and math.isfinite(value) and float(value).is_integer() and value >= 1
            norm = int(value) if ok else None
        elif name == "loss":
            ok = isinstance(value, str) and value in LOSS_FAMILIES
            norm = value
        else:  # grad_clip
            ok = _is_number(value) and math.isfinite(value) and value >= 0
            norm = float(value) if ok else None
        if not ok:
            raise TrainingArgsError(
                f"training settings file {where!r}: {found!r} is {_describe(value)}, but the probe needs {spec.need} "
                f"for {spec.setting}. Fix the value in the file, or set it explicitly, e.g. {spec.setting}=...")
        out[found] = norm
        if name == "grad_clip":
            out["grad_clip"] = norm
    return out


# ------------------------------------------------------------------------------------------------ prompts


def note_prompt_repeats(num_prompts: int, sampling, mode: str, source: str, is_main: bool = True) -> None:
    """Log a note (not an error) when a batch asks for more prompts than the source holds: prompts then repeat."""
    batches = [("E", "sampling.B_E", sampling.B_E)]
    if mode != "single_batch":
        batches.append(("U", "sampling.B_U", sampling.B_U))
    for name, key, size in batches:
        if size > num_prompts and is_main:
            log.warning("note: %s=%d is larger than the %d prompts in %s, so batch %s repeats prompts "
                        "(each about %.1f times, in reshuffled passes). Groups of the same prompt are not "
                        "independent draws of prompts; add prompts or lower %s if that matters.",
                        key, size, num_prompts, source, name, size / num_prompts, key)


def _prompt_lengths(tokenizer, texts: list[str]) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Each prompt's token count as `rollout.sample.prompt_token_ids` builds it (BOS in front when the tokenizer
    defines one, not doubled), and the character spans of its tokens that are the tokenizer's unknown token."""
    unk = tokenizer.unk_token_id
    offsets = unk is not None and getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    bos = tokenizer.bos_token_id
    lengths, unknown = [], []
    for k, ids in enumerate(enc["input_ids"]):
        lengths.append(len(ids) + (1 if bos is not None and (not ids or ids[0] != bos) else 0))
        if unk is None:
            unknown.append([])
        elif offsets:
            unknown.append([tuple(span) for t, span in zip(ids, enc["offset_mapping"][k]) if t == unk])
        else:
            unknown.append([(-1, -1)] * sum(1 for t in ids if t == unk))
    return lengths, unknown


def model_max_positions(base: Path) -> int | None:
    """The model's maximum positions from its config (max_position_embeddings or an alias), or None if it has none.

    Reads only config.json; raises CheckpointError naming the file when it is missing or cannot be read."""
    config_file = Path(base) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"the base model directory {str(base)!r} has no config.json. Point checkpoint.base (or "
                              "checkpoint.path with a base/ folder) at a Hugging Face model directory saved with "
                              "save_pretrained (config.json + *.safetensors).")
    read_json(config_file, "base model config", "Re-save the base model with save_pretrained.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the same problem for the user
        raise CheckpointError(f"base model config {str(config_file)!r} cannot be used: {type(exc).__name__}: "
                              f"{str(exc)[:300]}. Re-save the base model with save_pretrained, or check its "
                              "model_type against the installed transformers.") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value * rope_extension_factor(text)
    return None


def rope_extension_factor(config) -> int:
    """How far a RoPE scaling extends the context beyond max_position_embeddings (1 without one).

    Scaled RoPE (linear, dynamic NTK, YaRN, LongRoPE) is made to run past max_position_embeddings by its
    `factor`; whether the sampler and the scorer then agree is the start-up consistency check's question."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    return max(1, int(factor)) if isinstance(factor, int | float) and factor > 1 else 1


def check_prompts_fit(prompts: list[tuple[int, dict]], tokenizer, *, max_new_tokens: int, max_positions: int | None,
                      source: str, config_file: Path | None = None, is_main: bool = True) -> None:
    """Every prompt tokenizes to ≥ 1 token and fits, with max_new_tokens, in the model's max positions.

    prompts: (line, record) pairs from `data.prompts.load_prompts_with_lines`. Raises PromptLengthError naming the
    longest prompt (file and line) and the fix. Logs one warning with examples when prompt characters map to the
    tokenizer's unknown token (the model would see <unk> instead of them).
    """
    lengths, unknown = _prompt_lengths(tokenizer, [r["prompt"] for _, r in prompts])
    empty = [line for (line, _), n in zip(prompts, lengths) if n == 0]
    if empty:
        raise PromptLengthError(f"prompt file {source}, line {empty[0]}: the prompt tokenizes to no tokens "
                                f"({len(empty)} prompt(s) do). Give every prompt text the tokenizer can encode.")
    if max_positions is not None:
        budget = max_positions - max_new_tokens
        too_long = [k for k, n in enumerate(lengths) if n > budget]
        if too_long:
            k = max(too_long, key=lambda i: lengths[i])
            line, record = prompts[k]
            where = f" ({config_file})" if config_file is not None else ""
            raise PromptLengthError(
                f"prompt file {source}, line {line}: the longest prompt ({record['prompt'][:40]!r}...) is "
                f"{lengths[k]} tokens; with sampling.max_new_tokens={max_new_tokens} it needs {lengths[k] + max_new_tokens} "
                f"positions, more than the model's max_position_embeddings={max_positions}{where}. "
                f"{len(too_long)} of {len(prompts)} prompt(s) are longer than {budget} tokens: shorten or drop them, "
                "or lower sampling.max_new_tokens.")
    hits = [(line, record["prompt"], spans) for (line, record), spans in zip(prompts, unknown) if spans]
    if hits and is_main:
        count = sum(len(spans) for _, _, spans in hits)
        examples = []
        for line, text, spans in hits[:3]:
            chars = sorted({text[a:b] for a, b in spans if a >= 0})
            examples.append(f"line {line}: {', '.join(map(repr, chars[:5])) or '(characters unknown)'}")
        log.warning("%d prompt token(s) in %d of %d prompts of %s map to the tokenizer's unknown token %r, so the "
                    "model sees %r instead of those characters (e.g. %s). Check the prompts' language/encoding "
                    "against the tokenizer, or ignore this if it is intended.", count, len(hits), len(prompts),
                    source, tokenizer.unk_token, tokenizer.unk_token, "; ".join(examples))


# ------------------------------------------------------------------------------------------------ tensors


def _bad_count(t: torch.Tensor, *, nonnegative: bool = False) -> tuple[int, int]:
    """(# non-finite, # negative) entries of `t`, chunked over the flattened tensor."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0, (int((t < 0).sum()) if nonnegative and t.dtype != torch.bool else 0)
    flat = t.detach().reshape(-1)
    nonfinite = negative = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        nonfinite += int((~torch.isfinite(part)).sum())
        if nonnegative:
            negative += int((part < 0).sum())
    return nonfinite, negative


def _first(items: list[str], n: int = 3) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], *, where: str, fix: str) -> None:
    """NonFiniteError naming each tensor (first few) with NaN/inf entries."""
    bad = []
    for name, t in named:
        nonfinite, _ = _bad_count(t)
        if nonfinite:
            bad.append(f"{name} ({nonfinite} of {t.numel()} values NaN/inf)")
    if bad:
        raise NonFiniteError(f"non-finite values in {where}: {_first(bad)}. {fix}")


def check_finite_parameters(named: Iterable[tuple[str, torch.Tensor]], *, adapter: bool, source: Path) -> None:
    """After loading: the given parameters/buffers are finite; else NonFiniteError naming the tensors and `source`.

    adapter: whether these are the trainable (adapter) weights, or the base model's (for the message)."""
    if adapter:
        check_finite_tensors(named, where=f"the trainable (adapter) weights loaded from {str(source)!r}",
                             fix="The training run that saved them probably diverged: use an earlier checkpoint, or "
                                 "re-save the adapter from a healthy state.")
    else:
        check_finite_tensors(named, where=f"the base model weights loaded from {str(source)!r}",
                             fix="Re-download or re-save the base model.")


def safetensors_files(directory: Path, single: str, index: str) -> list[Path]:
    """The safetensors files a loader reads from `directory`: the shards of `index` if present, else `single`."""
    directory = Path(directory)
    index_file = directory / index
    if index_file.is_file():
        mapping = read_json(index_file, "safetensors index", "Re-save the model with save_pretrained.")
        weight_map = mapping.get("weight_map") if isinstance(mapping, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"safetensors index {str(index_file)!r} has no 'weight_map' object. Re-save the "
                                  "model with save_pretrained.")
        return [directory / f for f in sorted(set(map(str, weight_map.values())))]
    return [directory / single] if (directory / single).is_file() else []


def check_safetensors(path: Path, what: str) -> list[str]:
    """The tensor names of a safetensors file after checking its header covers the file exactly (a truncated or
    padded file fails here, named); CheckpointError otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist (it is listed by the index next to it). "
                              "Copy the missing shard, or re-save the model.")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike: an unreadable file
        raise CheckpointError(f"{what} {str(path)!r} is truncated or not a safetensors file ({exc}). Copy it again "
                              "completely (compare its size with the source), or re-save it with save_pretrained.") from None


BASE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def check_weight_files(base: Path, adapter: Path | None) -> None:
    """Before the model loads: the base's and the adapter's weight files exist, their safetensors files are complete,
    and the adapter's tensors are finite (a NaN adapter otherwise crashes in sampling)."""
    base = Path(base)
    if base.is_dir() and not any((base / f).is_file() for f in BASE_WEIGHT_FILES):
        raise CheckpointError(f"no model weights in the base model folder {str(base)!r}: expected "
                              f"{' or '.join(BASE_WEIGHT_FILES)}. Copy the weights saved with save_pretrained there.")
    for f in safetensors_files(base, "model.safetensors", "model.safetensors.index.json"):
        check_safetensors(f, "base model weight file")
    if adapter is None:
        return
    if not any((Path(adapter) / f).is_file() for f in ADAPTER_WEIGHT_FILES):
        raise CheckpointError(f"no adapter weights next to {str(Path(adapter) / 'adapter_config.json')!r}: expected "
                              f"{' or '.join(ADAPTER_WEIGHT_FILES)}. Copy the adapter saved with peft's save_pretrained "
                              "there.")
    f = Path(adapter) / "adapter_model.safetensors"
    if f.is_file():
        check_safetensors(f, "adapter weight file")
        from safetensors.torch import load_file

        check_finite_tensors(load_file(str(f)).items(), where=f"the adapter weight file {str(f)!r}",
                             fix="The training run that saved it probably diverged: use an earlier checkpoint, "
                                 "or re-save the adapter from a healthy state.")


def check_optimizer_values(entries: Iterable[tuple[str, dict]], groups: list[dict], path: Path) -> None:
    """AdamW state and hyperparameters the exact step can use: every state tensor finite, exp_avg_sq (and
    max_exp_avg_sq) ≥ 0, step finite and ≥ 0; lr, eps, weight_decay finite and ≥ 0, betas in [0, 1).

    entries: (parameter name, its state dict). Raises NonFiniteError / CheckpointError naming the file, the
    parameter and the state key."""
    problems = []
    for gi, g in enumerate(groups):
        for key in ("lr", "eps", "weight_decay"):
            v = g.get(key)
            v = float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
                problems.append(f"param group {gi}: {key}={v!r} (must be a finite number >= 0)")
        betas = g.get("betas")
        if betas is not None:
            try:
                b = [float(x) for x in betas]
                ok = len(b) == 2 and all(0.0 <= x < 1.0 for x in b)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                problems.append(f"param group {gi}: betas={betas!r} (must be two numbers in [0, 1))")
    if problems:
        raise CheckpointError(f"optimizer state {str(path)!r} has unusable AdamW hyperparameters: {_first(problems)}. "
                              "Re-save the optimizer from the training run.")
    for name, state in entries:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            if key not in state:
                continue
            v = state[key]
            if not isinstance(v, torch.Tensor):
                if key == "step" and _is_number(v):
                    v = torch.tensor(float(v))
                else:
                    raise CheckpointError(f"optimizer state {str(path)!r}: {name}: {key} is a {type(v).__name__}, "
                                          "not a tensor. Re-save the optimizer with opt.state_dict().")
            nonfinite, negative = _bad_count(v, nonnegative=key in ("exp_avg_sq", "max_exp_avg_sq", "step"))
            if nonfinite:
                problems.append(f"{name}: {key} has {nonfinite} of {v.numel()} values NaN/inf")
            if negative:
                what = "a negative step" if key == "step" else f"{negative} of {v.numel()} values < 0 (a second moment " \
                                                                 "is a running mean of squares: it cannot be negative)"
                problems.append(f"{name}: {key} has {what}")
    if problems:
        raise NonFiniteError(f"optimizer state {str(path)!r} holds values the AdamW step cannot use: {_first(problems)}. "
                             "Every update would be NaN. The training run probably diverged or the file was edited: "
                             "use the optimizer.pt of an earlier, healthy checkpoint.")


# ------------------------------------------------------------------------------------------------ pickles


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _is_weights_only_refusal(exc: BaseException) -> bool:
    import pickle

    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)


def is_unsafe_pickle_error(exc: BaseException) -> bool:
    """Whether `exc` is torch.load(weights_only=True) refusing a pickle that asks for a global (a function or class)
    outside the allow-list: code that would have run on a plain torch.load."""
    return _is_weights_only_refusal(exc) and "GLOBAL" in str(exc)


def load_error_text(exc: BaseException) -> str:
    """`type: message` of a loader's exception, for a CheckpointError; for a weights_only refusal, only torch's
    reason (not its advice to retry with weights_only=False)."""
    text = str(exc)
    if _is_weights_only_refusal(exc):
        reason = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        reason = reason.split("Check the documentation", 1)[0].strip() or "unsupported pickle content"
        return f"not a file of plain tensors and containers ({' '.join(reason.split())[:200]})"
    return f"{type(exc).__name__}: {' '.join(text.split())[:400].rstrip('.')}"


def unsafe_pickle_error(files: str, exc: BaseException) -> UnsafeCheckpointError:
    """The refusal of a pickle that would run code: names the file(s) and the global it asked for."""
    match = _GLOBAL.search(str(exc))
    wants = f" (it asks to import and call {match.group(1)})" if match else ""
    return UnsafeCheckpointError(
        f"refused to load {files}: it is a pickle that would run code when unpickled{wants}, not plain tensors and "
        "numbers. The probe loads checkpoint files with torch.load(weights_only=True) and never runs code from a "
        "checkpoint; nothing in the file was executed. If you trust the file, re-save its contents as plain tensors "
        "(safetensors for weights; torch.save of opt.state_dict() for the optimizer) in the training environment.")
