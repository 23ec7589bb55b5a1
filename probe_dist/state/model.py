"""The model and tokenizer of a checkpoint: base + adapter (trainable) loaded without running code, every weight
finite, the tokenizer present and non-empty, and the model's maximum positions (for the prompt-length check).

Pickle weight files (*.bin) are read with torch.load(weights_only=True), and one that would need arbitrary code is
refused (`state.checks.UnsafeCheckpointError`); remote code (config auto_map) is never trusted. Every refusal is a
`CheckpointError` (a `UserInputError`: exit 2) naming the folder and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from probe_dist.errors import CheckpointError
from probe_dist.state.checks import TOKENIZER_FILES, read_json
from probe_dist.state.paths import CheckpointPaths

log = logging.getLogger("probe_dist")


def load_tokenizer(path: Path, source: str = ""):
    """The tokenizer in `path`; CheckpointError when there is none, it cannot be loaded, or it is empty.

    source: how `path` was chosen (`CheckpointPaths.tokenizer_source`), for the message."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast


    path = Path(path)
    chosen = f" (chosen as {source})" if source else ""
    fix = ("Copy the tokenizer saved with the model (tokenizer.save_pretrained) into the checkpoint's tokenizer/ "
           "folder, or set checkpoint.tokenizer=DIR.")
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {str(path)!r}{chosen} does not exist. {fix}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer in {str(path)!r}{chosen}: none of {', '.join(TOKENIZER_FILES)} is there. "
                              f"{fix}")
    _check_tokenizer_files(path)
    try:
        # A fast tokenizer saved next to a Qwen2 config reloads through AutoTokenizer with other ids: load it directly.
        if (path / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the same problem whatever the parser says
        raise CheckpointError(f"the tokenizer in {str(path)!r}{chosen} cannot be loaded: {type(exc).__name__}: "
                              f"{str(exc)[:300]}. {fix}") from None
    if len(tok) == 0:
        raise CheckpointError(f"the tokenizer in {str(path)!r}{chosen} is empty (vocabulary size 0). {fix}")
    if tok.pad_token_id is None:
        log.info("tokenizer has no pad token: using EOS %r as pad (pad is never scored)", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def _check_tokenizer_files(path: Path) -> None:
    """The reading bounds (`state.bounds`) on what the tokenizer loader will read from `path`: its JSON files parsed
    within depth and size, the vocabulary files within tokenizer_mib. Raises ReadLimitError."""
    from probe_dist.state.bounds import check_json_containers, check_size, read_bytes

    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.json"):
        if (path / name).exists():
            read_json(path / name, "tokenizer file", "Re-save the tokenizer with save_pretrained.")
    templates = [path / "chat_template.jinja", *sorted(path.glob("additional_chat_templates/*"))]
    for f in templates:  # read by the tokenizer loader as text: real templates are a few KB
        check_size(f, "chat template", "json_mib")
    for name in TOKENIZER_FILES + ("merges.txt",):
        if name != "tokenizer_config.json":
            check_size(path / name, "tokenizer file", "tokenizer_mib")
    for name in ("tokenizer.json", "vocab.json", "tekken.json"):  # parsed as JSON by the loaders
        if (path / name).is_file():
            check_json_containers(read_bytes(path / name, "tokenizer file", "tokenizer_mib"), path / name,
                                  "tokenizer file")


def _weight_pickles(directory: Path, names: tuple[str, ...]) -> str:
    found = [str(directory / n) for n in names if (directory / n).is_file()]
    found += [str(f) for f in sorted(Path(directory).glob("pytorch_model-*.bin"))]
    return ", ".join(repr(f) for f in found) or f"a pickle weight file in {str(directory)!r}"


def load_model(paths: CheckpointPaths, dtype: torch.dtype, device: torch.device, notes: list[str] | None = None):
    """Base + adapter (trainable), in eval mode on `device`.

    Before loading: the safetensors files are complete and the adapter's tensors finite (`state.checks.
    check_weight_files`); pickle weight files (*.bin) are read with weights_only=True, and one that would run code
    is refused (UnsafeCheckpointError). After loading: every weight finite, no parameter missing from the files, a
    finite forward. Any load failure is a CheckpointError naming the folder. `notes`, when given, gets what loaded
    but looks edited (`load_notes`: tensors the config does not use, an unusual LoRA scaling) for the summary's
    warnings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from probe_dist.state.checks import (
        check_finite_parameters,
        check_loading_info,
        check_weight_files,
        is_unsafe_pickle_error,
        load_error_text,
        unsafe_pickle_error,
    )

    hf_logging.disable_progress_bar()  # rank-prefixed logs instead of one progress bar per rank
    check_weight_files(paths.base, paths.adapter)
    try:
        base, info = AutoModelForCausalLM.from_pretrained(str(paths.base), dtype=dtype, weights_only=True,
                                                          output_loading_info=True)
    except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - an unloadable base is the user's to fix, whatever the loader raised
        if is_unsafe_pickle_error(exc):
            raise unsafe_pickle_error(_weight_pickles(paths.base, ("pytorch_model.bin",)), exc) from None
        raise CheckpointError(f"could not load the base model from {str(paths.base)!r}: {load_error_text(exc)}. "
                              "Check that it is a complete Hugging Face model folder "
                              "(config.json + *.safetensors, as written by save_pretrained).") from None
    check_loading_info(info, f"the base model {str(paths.base)!r}")
    base.to(device)  # the finiteness pass below runs on the device (fast on a GPU), with the base file's names
    check_finite_parameters([*base.named_parameters(), *base.named_buffers()], adapter=False, source=paths.base)
    if paths.adapter is not None:
        try:
            model = PeftModel.from_pretrained(base, str(paths.adapter), is_trainable=True)
        except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            if is_unsafe_pickle_error(exc):
                raise unsafe_pickle_error(_weight_pickles(paths.adapter, ("adapter_model.bin",)), exc) from None
            raise CheckpointError(
                f"could not load the adapter from {str(paths.adapter)!r} onto the base {str(paths.base)!r}: "
                f"{load_error_text(exc)}. Check that adapter_config.json and adapter_model.safetensors "
                "are complete and were trained on this base model.") from None
        check_finite_parameters(trainable_parameters(model), adapter=True, source=paths.adapter)
    else:
        model = base
    model.to(device)
    model.eval()  # dropout (LoRA dropout included) off for every probe pass
    check_finite_forward(model, paths)
    if notes is not None:
        notes.extend(load_notes(model, info, paths))
    return model


# lora_alpha / r (rsLoRA: / √r) as trainers set it: 0.5-4 typically, 16 rarely; alpha 1 at r 256 is 0.004
LORA_SCALING_USUAL = (1e-3, 100.0)


def lora_scalings(model) -> list[float]:
    """The distinct LoRA scalings lora_alpha / r (rsLoRA: / √r) of a peft model's LoRA layers (each layer's
    `scaling` dict, per adapter name), sorted; [] for a model without LoRA layers."""
    tables = [m.scaling for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    return sorted({float(v) for table in tables for v in table.values()})


def load_notes(model, info: dict, paths: CheckpointPaths) -> list[str]:
    """What loaded but looks like an edited or mismatched file, one sentence each (the run goes on; the summary's
    warnings carry them): tensors in the base's weight files that its config.json does not use (transformers
    ignores them), an output head loaded untied although config.json asks for tied embeddings (transformers 5 keeps
    a differing `lm_head.weight` from the files and warns), and a LoRA scaling lora_alpha / r
    outside [0.001, 100] — 0 (or nearly) switches the adapter off, a negative or huge one is rarely trained
    with."""
    out = []
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        named = ", ".join(repr(n) for n in unexpected[:3])
        out.append(f"the base model's weight files {str(paths.base)!r} hold {len(unexpected)} "
                   f"tensor{'s' if len(unexpected) > 1 else ''} its config.json does not use (e.g. {named}); they "
                   "were ignored. If config.json was edited (tie_word_embeddings, layer counts), the numbers describe "
                   "another model.")
    config = getattr(model, "config", None)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if (getattr(config, "tie_word_embeddings", False) and head is not None and embed is not None
            and head.weight.data_ptr() != embed.weight.data_ptr()):
        out.append(f"the base model's config.json in {str(paths.base)!r} ties the output head to the input "
                   "embeddings (tie_word_embeddings: true) but its weight files hold an lm_head.weight that differs "
                   "from them, so transformers loaded the two untied (as a trainer loading these files would). If "
                   "config.json or the weight files were edited, the numbers describe another model.")
    odd = [v for v in lora_scalings(model) if not LORA_SCALING_USUAL[0] <= v <= LORA_SCALING_USUAL[1]]
    if odd:
        out.append(f"the adapter {str(paths.adapter)!r} scales its LoRA products by lora_alpha / r = "
                   f"{', '.join(f'{v:.3g}' for v in odd)} (adapter_config.json; trainers set 0.5 to 4, rarely more "
                   "than 16, and 0 switches the adapter off): if adapter_config.json was edited, the numbers "
                   "describe another model.")
    return out


def check_finite_forward(model, paths: CheckpointPaths) -> None:
    """One forward of two tokens (ids 0 and 1) must give finite logits: finite weights can still overflow, most
    often through an adapter's scaling lora_alpha / r (peft multiplies every LoRA product by it), which would
    otherwise surface as an invalid sampling distribution deep in the run. Raises NonFiniteError (exit 2) naming
    the adapter's scaling where there is one. Costs one forward of length 2. A scaling that overflows only on
    longer inputs is caught while sampling (`overflow_error`)."""
    with torch.no_grad():
        ids = torch.tensor([[0, 1]], device=next(model.parameters()).device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if bool(torch.isfinite(logits).all()):
        return
    where = f"the model loaded from {str(paths.base)!r}{' with its adapter' if paths.adapter else ''}"
    raise overflow_error(model, f"{where} gives NaN/inf logits on a two-token input")


def overflow_error(model, what: str):
    """The NonFiniteError (exit 2) for a model whose finite weights give NaN/inf logits: `what` says where (e.g.
    "the policy's logits became NaN/inf at sampling step 3"); the message names the adapter's LoRA scaling
    lora_alpha / r when the model has one, the usual cause, and the fixes."""
    from probe_dist.state.checks import NonFiniteError

    scalings = lora_scalings(model)
    adapter = (" The adapter scales every LoRA product by lora_alpha / r = "
               f"{', '.join(f'{v:.3g}' for v in scalings)} (adapter_config.json; common settings give 0.5 to 4): a "
               "scaling that overflows is an edited or corrupted lora_alpha or r." if scalings else "")
    return NonFiniteError(
        f"{what} although its weights are finite: the forward pass overflows.{adapter} Fix the checkpoint's config "
        "(or use precision.dtype=float32 if a low-precision dtype overflows).")


def check_adapter_complete(model, adapter: Path) -> None:
    """Every tensor the loaded adapter holds (peft's `get_peft_model_state_dict`: what save_pretrained writes) is in
    the adapter's weight file. peft only warns about missing keys and keeps the fresh initialisation (lora_B = 0):
    the probe would measure an untrained adapter against the checkpoint's AdamW state. Raises CheckpointError."""
    from peft.utils import get_peft_model_state_dict

    from probe_dist.state.checks import bounded_torch_load

    adapter = Path(adapter)
    f = adapter / "adapter_model.safetensors"
    if f.is_file():
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            saved = set(handle.keys())
    else:
        f = adapter / "adapter_model.bin"
        blob = bounded_torch_load(f, "the adapter weight file", lambda exc: CheckpointError(
            f"could not read the adapter weight file {str(f)!r}: {exc}"))
        saved = set(blob) if isinstance(blob, dict) else set()
    missing = sorted(set(get_peft_model_state_dict(model)) - saved)
    if missing:
        raise CheckpointError(f"the adapter weight file {str(f)!r} lacks {len(missing)} of the adapter's tensors (e.g. "
                              f"{missing[:2]}): peft would start them fresh and the probe would measure another "
                              "model than the one trained. Copy the adapter again (adapter_model.safetensors as "
                              "peft's save_pretrained wrote it).")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in named_parameters() order: θ."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_trainable_count(trainable, max_params: int, allow_full: bool) -> int:
    """The number of trainable elements in `trainable` ((name, parameter) pairs). Raises CheckpointError
    when it is 0, or above `max_params` (memory.max_trainable_params) unless `allow_full`
    (memory.allow_full_finetune)."""
    count = sum(p.numel() for _, p in trainable)
    if count == 0:
        raise CheckpointError("the model has no trainable parameters: was the adapter loaded with is_trainable=True?")
    if count > max_params and not allow_full:
        raise CheckpointError(
            f"{count:,} trainable parameters exceed memory.max_trainable_params={max_params:,}. This usually means "
            "full-model gradients by accident (adapter missing or base not frozen). Load a LoRA adapter, or set "
            "memory.allow_full_finetune=true (and raise memory.max_trainable_params) if you really fine-tune fully.")
    return count


def model_max_positions(base: Path) -> int | None:
    """The model's maximum positions from its config (max_position_embeddings or an alias), or None if it has none.

    Reads only config.json; raises CheckpointError naming the file when it is missing or cannot be read."""
    config_file = Path(base) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"the base model directory {str(base)!r} has no config.json. Point checkpoint.base (or "
                              "checkpoint.path with a base/ folder) at a Hugging Face model directory saved with "
                              "save_pretrained (config.json + *.safetensors).")
    read_json(config_file, "base model config", "Re-save the base model with save_pretrained.", finite=True)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # noqa: BLE001 - any unreadable config is the same problem for the user
        raise CheckpointError(f"base model config {str(config_file)!r} cannot be used: {type(exc).__name__}: "
                              f"{str(exc)[:300]}. Re-save the base model with save_pretrained, or check its "
                              "model_type against the installed transformers.") from None
    return config_max_positions(config)


def config_max_positions(config) -> int | None:
    """The maximum positions a transformers config allows (max_position_embeddings or an alias, times a RoPE
    scaling's extension), or None if it names none. config: a `PretrainedConfig` (a composite one's text config)."""
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
