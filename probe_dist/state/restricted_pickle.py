"""Read a pickled training-arguments object (HF Trainer / TRL `training_args.bin`) as plain data, running no code.

`torch.save(TrainingArguments)` pickles the dataclass by reference to its class (trl.trainer.grpo_config.GRPOConfig,
transformers' enums, accelerate's state, torch.device). A normal unpickler imports those modules and calls them;
`read_training_args_bin` never imports or calls anything: every global the pickle names becomes an inert
`PickledObject` that only records the global's dotted name, the arguments it would have been called with and the
state it would have been given. Field values are then read from those records. Python's `pickle.Unpickler` routes
every global lookup (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) through `find_class`, which is overridden here, and
persistent ids (tensors in a torch zip file) are refused.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from probe_dist.state.bounds import MiB, check_structure, containers, limits, read_bytes


class UnreadableTrainingArgs(ValueError):
    """The file is not a pickled training-arguments object this reader understands (the message says why)."""


class PickledObject:
    """What a pickle asked for: the global's dotted name, the call's arguments and the state set on it. Inert."""

    __slots__ = ("global_name", "args", "state")

    def __init__(self, global_name: str, args: tuple = (), state: Any = None):
        self.global_name, self.args, self.state = global_name, args, state

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.global_name}>"


def _stand_in(global_name: str) -> type:
    """A class standing in for `global_name`: calling it (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ) records the
    arguments; nothing of the named module is imported."""

    def new(cls, *args, **kwargs):
        obj = PickledObject.__new__(cls)
        PickledObject.__init__(obj, global_name, args, kwargs or None)
        return obj

    return type("StandIn", (PickledObject,), {"__slots__": (), "__new__": new, "__init__": lambda self, *a, **k: None})


class _RecordingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _stand_in(f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnreadableTrainingArgs("it holds tensor data (a persistent id), which a training-arguments file never "
                                     "does")


def _references(value) -> tuple | None:
    """What a recorded object or a container refers to (`bounds.check_structure`'s children)."""
    if isinstance(value, PickledObject):
        return (*value.args, value.state)
    return containers(value)


def plain(value: Any) -> Any:
    """A recorded object as plain Python data: a stand-in with a state dict → that dict (values made plain); one
    called with a single argument (an enum member, torch.device('cpu')) → that argument; else its dotted name.
    Expands shared references into a tree: call it on a structure `bounds.check_structure` accepted (bounded
    depth and expanded size, no cycle), as `read_training_args_bin` does."""
    if isinstance(value, PickledObject):
        if isinstance(value.state, dict):
            return {str(k): plain(v) for k, v in value.state.items()}
        if len(value.args) == 1:
            return plain(value.args[0])
        return value.global_name
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value)
    if isinstance(value, set | frozenset):
        return sorted((plain(v) for v in value), key=repr)
    return value


def _check_memo_indices(data: bytes) -> None:
    """Refuse a pickle that stores into a memo slot beyond its own length. Python's C unpickler grows its memo
    array to twice the largest index it is given (and zero-fills it): a 10-byte pickle naming slot 10^8 takes 1.5
    GB, slot 2^31 tens of GB. A pickler numbers its memo slots 0, 1, 2, ..., so no real file names a slot past the
    number of its opcodes. The opcodes are scanned by pickletools (no object is built; the record is at most
    training_args_mib)."""
    import pickletools

    count = 0
    try:
        for opcode, arg, _ in pickletools.genops(data):
            count += 1
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > len(data):
                raise UnreadableTrainingArgs(f"its pickle stores into memo slot {int(arg)}, beyond anything a "
                                             f"pickle of {len(data)} bytes can number")
    except UnreadableTrainingArgs:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed opcode stream, whatever pickletools says
        raise UnreadableTrainingArgs(f"its pickle cannot be read ({type(exc).__name__}: {exc})") from None


def read_training_args_bin(path: str | Path) -> tuple[str, dict]:
    """(the class's dotted name, its fields as plain data) of a `torch.save`d TrainingArguments (or subclass, e.g.
    TRL's GRPOConfig). Nothing from the file is imported or run.

    Read within the reading bounds (`state.bounds`: the file's and the pickle record's size, then the recorded
    structure's depth, container count and expanded size, and no cycle) before anything is expanded.
    Raises UnreadableTrainingArgs when the file is not a torch zip archive holding one pickled object with a field
    dict (a legacy or corrupted file, or something else); ReadLimitError when a bound is hit."""
    path = Path(path)
    what = "the training settings"
    blob = read_bytes(path, what, "training_args_mib")  # whole file; data.pkl's inflated size is bounded below
    bound = int(limits().training_args_mib * MiB)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise UnreadableTrainingArgs("it is a zip archive without exactly one data.pkl (not torch.save's "
                                             "format)")
            with archive.open(names[0]) as record:  # a compressed record could inflate far past the file's size
                data = record.read(bound + 1)
            if len(data) > bound:
                raise UnreadableTrainingArgs(f"its pickle record inflates past {bound} bytes (a compressed record; "
                                             "torch.save stores it uncompressed)")
    except zipfile.BadZipFile:
        raise UnreadableTrainingArgs("it is not a torch.save zip archive (torch ≥ 1.6 writes one)") from None
    _check_memo_indices(data)
    try:
        obj = _RecordingUnpickler(io.BytesIO(data)).load()
    except UnreadableTrainingArgs:
        raise
    except RecursionError:
        raise UnreadableTrainingArgs("its pickle nests deeper than Python's unpickler goes") from None
    except Exception as exc:  # noqa: BLE001 - a corrupted pickle, whatever the opcode error
        raise UnreadableTrainingArgs(f"its pickle cannot be read ({type(exc).__name__}: {exc})") from None
    check_structure(obj, path, what, _references)  # depth, size, and no cycle before `plain` expands it
    if isinstance(obj, PickledObject) and obj.state is None and obj.args:
        raise UnreadableTrainingArgs(f"it is a pickle that would call {obj.global_name} when loaded normally — "
                                     "code, not a TrainingArguments (nothing was run)")
    if not isinstance(obj, PickledObject) or not isinstance(obj.state, dict):
        raise UnreadableTrainingArgs("it does not hold one object with fields (a TrainingArguments)")
    return obj.global_name, plain(obj.state)
