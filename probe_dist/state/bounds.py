"""Bounds on every checkpoint file the probe reads: a small hostile file must not take a node's memory, recurse
into a traceback, or keep the run from stopping.

Three kinds of bound (docs: README, "Pointing it at a real checkpoint" → "Reading limits"):

- **Bytes per file type** (checked before a file is parsed; a file is read in chunks, so /dev/zero or a FIFO that
  never ends is stopped at the limit too): JSON settings files, trainer_state.json, training_args.bin, the pickle
  record of a torch.save file (`data.pkl`: the unpickler builds at most one object per opcode byte, so this bounds
  what unpickling can allocate), a safetensors header, a tokenizer file.
- **Structure** of what was parsed or unpickled (`check_structure`): nesting depth, the number of distinct
  containers, and the size the structure would have if its shared references were expanded into a tree — computed
  over the reference graph without expanding it, so `x = [x, x]` forty times (2^40 leaves) is refused after 40
  steps; a structure that contains itself (a cycle) is refused as such.
- **Interruption**: reading happens inside `runtime.signals.interruptible()` (see `assemble.build_probe`), so a
  stop signal ends a read that blocks or a parse that runs long within seconds.

The defaults and what they were set from (measured on the files real trainers write; see `DEFAULTS`) leave at
least an order of magnitude of headroom for real checkpoints. `checkpoint.read_limits="name=value,..."` overrides
any of them for a run (`set_limits`); a refusal names the file, the bound, and that key.

Every refusal is a `ReadLimitError` (a CheckpointError: exit 2, one paragraph).
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError

MiB = 1 << 20


class ReadLimitError(CheckpointError):
    """A checkpoint file exceeds a reading bound (size, depth, object count, expanded size) or contains itself."""


@dataclass(frozen=True)
class ReadLimits:
    """The reading bounds (sizes in MiB). Field names are the keys of `checkpoint.read_limits`."""

    # config.json, adapter_config.json, generation_config.json, tokenizer_config.json, training_args.json,
    # *.index.json, DeepSpeed's `latest`: real ones are 1-100 KB (a 1,000-shard index ~150 KB). json.loads needs
    # ~20x the text in the worst case (`[[],[],...]`): ~300 MB at 16 MiB.
    json_mib: float = 16.0
    # trainer_state.json grows with log_history: ~1.3 KB per logged GRPO step (TRL logs ~25 keys), so 64 MiB holds a
    # ~50,000-step run logged at every step (the toy's is 3 KB); JSON files are also refused past `objects`
    # containers before parsing, which bounds the parser's memory (~1 GB at 64 MiB).
    trainer_state_mib: float = 64.0
    # training_args.bin (a pickled TrainingArguments / GRPOConfig): 7.6 KB for TRL 0.2x's GRPOConfig (data.pkl 6.4 KB).
    training_args_mib: float = 1.0
    # The pickle record (data.pkl) of a torch.save file (optimizer.pt, scheduler.pt, accelerate's *.bin, DeepSpeed's
    # *_states.pt, pytorch_model.bin): 6 KB for a LoRA optimizer.pt, 16 KB for a DeepSpeed model-states file of
    # the toy, ~100 bytes per parameter tensor (30 KB for a 7B model's 291 tensors; a 40,000-tensor MoE's full
    # fine-tune needs pickle_mib raised). torch's weights_only unpickler allocates up to ~250 bytes per opcode byte
    # (16 MiB of EMPTY_SET: 4 GB, 38 s), so 4 MiB keeps the worst case near 1 GB / 10 s.
    pickle_mib: float = 4.0
    # A safetensors header (JSON, before the tensor bytes): ~150 bytes per tensor; 100 KB for 700 tensors.
    safetensors_header_mib: float = 16.0
    # tokenizer.json / tokenizer.model / vocab files: 2-35 MB for current models (Gemma 3's tokenizer.json 33 MB).
    tokenizer_mib: float = 128.0
    # Nesting depth of a parsed / unpickled structure: real files nest 2-5 deep (GRPOConfig 5, optimizer.pt 4,
    # trainer_state.json 4).
    depth: int = 64
    # Distinct containers (dicts, lists, tuples, sets, recorded objects) in one file: the toy's are 4-45; a full
    # fine-tune's optimizer state has ~4 per parameter tensor, ~400,000 for a 100,000-tensor MoE model.
    objects: int = 4_000_000
    # The size of a structure with shared references expanded into a tree (nodes): equal to the node count for the
    # files trainers write (GRPOConfig 438 nodes, optimizer.pt 315); the same bound as `objects`.
    expanded: int = 4_000_000


DEFAULTS = ReadLimits()
_active = {"limits": DEFAULTS}
_MAX_DEPTH = 500  # an override above this would exceed Python's recursion limit while walking the structure


def parse_limits(text: str | None) -> ReadLimits:
    """`checkpoint.read_limits` ("json_mib=32,depth=128"; empty or None: the defaults) as ReadLimits.

    Raises CheckpointError naming the key and the accepted names when a pair is malformed, unknown or not > 0."""
    limits = DEFAULTS
    names = {f.name: f.type for f in fields(ReadLimits)}
    for pair in (p.strip() for p in (text or "").split(",")):
        if not pair:
            continue
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or key not in names:
            raise CheckpointError(f"checkpoint.read_limits: {pair!r} is not name=value with a name among "
                                  f"{', '.join(names)}. Example: checkpoint.read_limits=\"trainer_state_mib=256\".")
        try:
            number = float(value)
        except ValueError:
            raise CheckpointError(f"checkpoint.read_limits: {key}={value!r} is not a number.") from None
        if not math.isfinite(number):
            raise CheckpointError(f"checkpoint.read_limits: {key}={value} must be a finite number.")
        if names[key] == "int":
            if not number.is_integer():
                raise CheckpointError(f"checkpoint.read_limits: {key}={value} must be a whole number.")
            number = int(number)
        if not number > 0 or (key == "depth" and number > _MAX_DEPTH):
            raise CheckpointError(f"checkpoint.read_limits: {key}={value} must be > 0"
                                  + (f" and at most {_MAX_DEPTH}" if key == "depth" else "") + ".")
        limits = replace(limits, **{key: number})
    return limits


def set_limits(limits: ReadLimits) -> None:
    """Make `limits` the bounds of every reader in this process (the CLI sets them from checkpoint.read_limits)."""
    _active["limits"] = limits


def limits() -> ReadLimits:
    """The bounds in force (`set_limits`; the defaults until then)."""
    return _active["limits"]


@contextmanager
def using(text: str | None) -> Iterator[ReadLimits]:
    """`checkpoint.read_limits` in force within the block; the previous bounds after it."""
    before = limits()
    set_limits(parse_limits(text))
    try:
        yield limits()
    finally:
        set_limits(before)


def _refuse(path: Path | str, what: str, problem: str, key: str | None) -> ReadLimitError:
    """The one-paragraph refusal: the file, what is wrong, and what to do — with `key` (a bound a genuine file could
    exceed) the override that raises it; without (a value or file type no trainer writes) only the fix."""
    if key:
        advice = (" Real checkpoints stay far below this bound, so the file is probably damaged or not what its name "
                  "says: copy it again from the training run. If the file is genuine, raise the bound: "
                  f"checkpoint.read_limits=\"{key}=<larger>\".")
    else:
        advice = " No trainer writes such a file: copy it again from the training run."
    return ReadLimitError(f"{what} {str(path)!r} {problem}.{advice}")


def _mib(n: float) -> str:
    return f"{n / MiB:.3g} MiB" if n >= MiB / 10 else f"{n:.0f} bytes"


# ------------------------------------------------------------------------------------------------ bytes


def read_bytes(path: Path, what: str, key: str) -> bytes:
    """The bytes of the regular file `path`, read in 1 MiB chunks and refused past limits().<key> (MiB) (a file that
    grows while read stops there too). A device, FIFO or socket is refused before it is opened (a FIFO would block
    forever, /dev/zero never end). Raises ReadLimitError; OSError (missing file, ...) passes to the caller."""
    bound = int(getattr(limits(), key) * MiB)
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block forever, a device never end
        raise _refuse(path, what, "is not a regular file (a device, FIFO or socket)", None)
    parts, total = [], 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(min(MiB, bound + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > bound:
                raise _refuse(path, what, f"is larger than {_mib(bound)} (the bound for this kind of file)", key)
    return b"".join(parts)


def check_json_containers(data: bytes, path: Path | str, what: str) -> None:
    """Before parsing JSON text: at most limits().objects '{' and '[' bytes (an upper bound on its containers, as
    brackets inside strings are counted too). The parser's memory is then bounded (`{},` repeated costs ~60
    bytes per input byte otherwise). Raises ReadLimitError."""
    count = data.count(b"{") + data.count(b"[")
    if count > limits().objects:
        raise _refuse(path, what, f"holds more than {limits().objects:,} objects and arrays ({count:,} brackets)",
                      "objects")


def check_size(path: Path, what: str, key: str) -> None:
    """Refuse `path` (ReadLimitError) when it is not a regular file or is larger than limits().<key> MiB: for
    files a library reads itself (tokenizers)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise _refuse(path, what, "is not a regular file (a device, FIFO or socket)", None)
    bound = getattr(limits(), key) * MiB
    if path.is_file() and path.stat().st_size > bound:
        raise _refuse(path, what, f"is {_mib(path.stat().st_size)}, larger than {_mib(bound)} (the bound for this "
                                  "kind of file)", key)


def check_pickle_record(path: Path, what: str) -> None:
    """Before torch.load(weights_only=True) of `path`: a regular file whose pickle record (data.pkl of a torch.save
    zip archive; the whole file for the legacy pre-1.6 format) is within limits().pickle_mib, every record stored
    uncompressed (as torch.save writes them: a deflated record could inflate to gigabytes), and a zip directory of
    at most limits().objects entries. Raises ReadLimitError."""
    path = Path(path)
    if not path.is_file():
        raise _refuse(path, what, "is not a regular file (a device, FIFO or socket)", None)
    bound = limits().pickle_mib * MiB
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        if size > bound:
            raise _refuse(path, what, f"is a {_mib(size)} pickle in the legacy (pre-zip) format, larger than "
                                      f"{_mib(bound)}: re-save it with torch >= 1.6", "pickle_mib")
        return
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > limits().objects:
            raise _refuse(path, what, f"is an archive of {len(infos)} records, more than {limits().objects}",
                          "objects")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:  # torch.save stores every record raw
                raise _refuse(path, what, f"holds a compressed record ({info.filename}, {_mib(info.file_size)} "
                                          "inflated), which torch.save never writes", None)
            if info.filename.endswith("data.pkl") and info.file_size > bound:
                raise _refuse(path, what, f"has a {_mib(info.file_size)} pickle record ({info.filename}), larger "
                                          f"than {_mib(bound)}", "pickle_mib")


def check_safetensors_header(path: Path, what: str) -> None:
    """A safetensors file's header length (its first 8 bytes, little-endian) within limits().safetensors_header_mib
    and within the file. Raises ReadLimitError; a file shorter than 8 bytes is left to the library's error."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise _refuse(path, what, "is not a regular file (a device, FIFO or socket)", None)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        return
    (length,) = struct.unpack("<Q", head)
    bound = limits().safetensors_header_mib * MiB
    if length > bound:
        raise _refuse(path, what, f"declares a {_mib(length)} header, larger than {_mib(bound)}",
                      "safetensors_header_mib")
    if length > path.stat().st_size - 8:
        raise _refuse(path, what, f"declares a {_mib(length)} header in a {_mib(path.stat().st_size)} file "
                                  "(truncated or not a safetensors file)", None)


# ------------------------------------------------------------------------------------------------ structure


def _check_leaf(value, path, what: str, finite: bool) -> None:
    """An int beyond 2**1024 (no float holds it: every later check would raise OverflowError), a tensor whose shape
    covers more elements than its storage holds (a stride-0 view: checking 2**40 elements of a 1,000-element
    storage takes hours), and with `finite` a NaN or infinite float."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 1024:
            raise _refuse(path, what, f"holds an integer of {value.bit_length()} bits, beyond any float (a trainer "
                                      "writes none)", None)
    elif isinstance(value, float):
        if finite and not math.isfinite(value):
            raise _refuse(path, what, f"holds the value {value} (NaN or infinite), which no model setting can be",
                          None)
    elif isinstance(value, torch.Tensor) and value.layout == torch.strided and value.numel() > 0:
        capacity = value.untyped_storage().nbytes() // max(value.element_size(), 1) - value.storage_offset()
        if value.numel() > capacity:
            raise _refuse(path, what, f"holds a tensor of shape {tuple(value.shape)} over a storage of {capacity:,} "
                                      "elements (a view that repeats its storage; a trainer saves dense tensors)",
                          None)


def containers(value) -> tuple | None:
    """The references a container holds (None for a leaf: numbers, strings, bytes, tensors, anything else)."""
    if isinstance(value, dict):
        return (*value.keys(), *value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(value)
    return None


def check_structure(value, path: Path | str, what: str, children=containers, *, finite: bool = False) -> None:
    """Refuse (ReadLimitError naming `what` and `path`) a parsed or unpickled structure that is nested deeper than
    limits().depth, holds more than limits().objects distinct containers, would exceed limits().expanded nodes with
    its shared references expanded, or contains itself.

    Walks the reference graph once: each distinct container is visited once and its expanded size memoised by id,
    so the cost is the number of distinct containers (bounded), never the expanded size. `children(node)` gives a
    container's references or None for a leaf (`containers`: dicts, lists, tuples, sets; the restricted unpickler
    adds its recorded objects)."""
    bound = limits()
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node, depth: int) -> int:
        refs = children(node)
        if refs is None:
            _check_leaf(node, path, what, finite)
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise _refuse(path, what, "contains itself (a structure that refers back to an enclosing one, so it "
                                      "has no end)", None)
        if depth > bound.depth:
            raise _refuse(path, what, f"nests deeper than {bound.depth} levels", "depth")
        on_path.add(key)
        total = 1
        for child in refs:
            total += visit(child, depth + 1)
            if total > bound.expanded:
                raise _refuse(path, what, f"holds a structure of more than {bound.expanded:,} elements once its "
                                          "shared references are expanded", "expanded")
        on_path.discard(key)
        sizes[key] = total
        if len(sizes) > bound.objects:
            raise _refuse(path, what, f"holds more than {bound.objects:,} containers", "objects")
        return total

    visit(value, 0)


__all__ = ["DEFAULTS", "ReadLimitError", "ReadLimits", "check_pickle_record", "check_safetensors_header",
           "check_json_containers", "check_size", "check_structure", "containers", "limits", "parse_limits", "read_bytes", "set_limits", "using"]
