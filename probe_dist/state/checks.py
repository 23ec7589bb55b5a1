"""Checks of checkpoint files and tensors: weight files complete, every weight and optimizer tensor finite
(exp_avg_sq ≥ 0), AdamW hyperparameters usable, and pickles that would run code refused (docs: README,
"Pointing it at a real checkpoint"), and the JSON reader every checkpoint file goes through.

Every refusal is a `CheckpointError` (a `UserInputError`): the CLI prints its one paragraph and exits 2.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError

log = logging.getLogger("probe_dist")

# Files that carry a tokenizer's vocabulary (or, for tokenizer_config.json, name a vocabulary-free one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def is_number(value) -> bool:
    """Whether `value` is an int or a float (bools excluded; NaN and ±inf included)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_json(path: Path, what: str, fix: str, *, limit: str = "json_mib", finite: bool = False):
    """The parsed JSON of `path`, within the reading bounds (`state.bounds`: limits().<limit> MiB, a regular file,
    the count of objects and arrays before parsing, then depth and leaves); with `finite`, NaN and Infinity are
    refused too (model configs; a trainer_state.json may log a NaN loss). Raises CheckpointError naming the file
    (the line and column of a syntax error) and `fix`; ReadLimitError (a CheckpointError) when a bound is hit."""
    from probe_dist.state.bounds import check_json_containers, check_structure, read_bytes

    try:
        data = read_bytes(Path(path), what, limit)
    except OSError as exc:
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}). {fix}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CheckpointError(f"{what} {str(path)!r}, line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}). "
                              f"{fix}") from None
    check_json_containers(data, path, what)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                              f"{exc.colno}. {fix}") from None
    except RecursionError:  # json's C scanner stops at the interpreter's recursion limit
        from probe_dist.state.bounds import limits

        raise CheckpointError(f"{what} {str(path)!r} nests deeper than {limits().depth} levels (deeper than Python's "
                              f"parser goes). Real files nest a few levels: copy it again from the training run. "
                              f"{fix}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits (Python's int-parsing limit)
        raise CheckpointError(f"{what} {str(path)!r} holds a value Python cannot read ({exc}). {fix}") from None
    check_structure(parsed, path, what, finite=finite)
    return parsed


_CHUNK = 1 << 24  # elements per isfinite() pass: bounds the temporary bool tensor on large weights


class NonFiniteError(CheckpointError):
    """NaN/inf (or a negative second moment) in weights or optimizer state."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint file that would run code when loaded; refused, and never run."""


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
    padded file fails here, named) and is within the reading bounds (`state.bounds`); CheckpointError otherwise."""
    from safetensors import safe_open

    try:
        present = path.is_file()
    except OSError as exc:  # e.g. a name too long for the filesystem, from an index file
        raise CheckpointError(f"{what} {str(path)[:300]!r} cannot be looked up ({exc.strerror}). Re-save the model "
                              "with save_pretrained.") from None
    if not present:
        raise CheckpointError(f"{what} {str(path)!r} does not exist (it is listed by the index next to it). "
                              "Copy the missing shard, or re-save the model.")
    from probe_dist.state.bounds import check_safetensors_header

    check_safetensors_header(path, what)
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
    the adapter's tensors are finite (a NaN adapter otherwise crashes in sampling), and what the loaders will read
    is within the reading bounds (`state.bounds`: safetensors headers, the pickle record of *.bin weight files,
    generation_config.json and index files)."""
    from probe_dist.state.bounds import check_pickle_record

    base = Path(base)
    for folder in (base, Path(adapter) if adapter is not None else None):  # what from_pretrained will read
        if folder is None or not folder.is_dir():
            continue
        for name in ("generation_config.json", "pytorch_model.bin.index.json"):
            if (folder / name).exists():
                read_json(folder / name, "model file", "Re-save the model with save_pretrained.", finite=True)
        for f in sorted(folder.glob("*.bin")):  # torch.load(weights_only=True) by transformers / peft
            if f.name != "training_args.bin":
                check_pickle_record(f, "model weight file")
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
            if v is not None and not (is_number(v) and math.isfinite(v) and v >= 0):
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
                if key == "step" and is_number(v):
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


def bounded_torch_load(path: Path, what: str, unreadable):
    """torch.load(path, weights_only=True, map_location="cpu") within the reading bounds (`state.bounds`: the pickle
    record's size before, the structure's depth, object count and expanded size after). `what` names the file in
    messages ("the optimizer state"); `unreadable(exc)` builds the CheckpointError for a file torch cannot read.
    Raises UnsafeCheckpointError for a pickle that would run code (nothing runs), ReadLimitError for a bound."""
    from probe_dist.state.bounds import check_pickle_record, check_structure

    check_pickle_record(path, what)
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(f"{what} {str(path)!r}", exc) from None
        raise unreadable(exc) from None
    check_structure(loaded, path, what)
    return loaded


def is_unsafe_pickle_error(exc: BaseException) -> bool:
    """Whether `exc` is torch.load(weights_only=True) refusing a pickle that asks for a global (a function or class)
    outside the allow-list: code that would have run on a plain torch.load."""
    return _is_weights_only_refusal(exc) and "GLOBAL" in str(exc)


def check_loading_info(info: dict, what: str, error: type[Exception] = CheckpointError) -> None:
    """Refuse a model whose weight files lack parameters its config.json describes, or hold them in other shapes.

    info: the `output_loading_info` of transformers' `from_pretrained` (tied weights are not listed as missing).
    transformers only prints a load report for `missing_keys` and initialises those parameters at random, so a
    truncated shard set, a weight file of another model or a causal LM loaded as a reward model (its `score` head
    missing) would otherwise give the numbers of another model without an error. what: names the model and its
    folder in the message. Raises `error` (CheckpointError) naming up to three of the parameters."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get("mismatched_keys") or ()))
    if not missing and not mismatched:
        return
    names = missing or mismatched
    lack = (f"lack {len(missing)} of the parameters its config.json describes" if missing
            else f"hold {len(mismatched)} parameters in shapes its config.json does not describe")
    raise error(
        f"the weight files of {what} {lack} (e.g. {', '.join(repr(n) for n in names[:3])}): transformers would "
        "initialise them at random and the probe would measure another model. Copy the complete weights (every "
        "shard listed in model.safetensors.index.json) saved with save_pretrained, or the config.json that belongs "
        "to them.")


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
