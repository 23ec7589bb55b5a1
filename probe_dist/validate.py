"""Checks of every input before the first model pass, with messages that name the file or tensor and the fix.

`probe_dist.main.build_probe` runs them cheapest first, so a typo costs seconds, not a model load:

1. the config (`probe_dist.config`) and the checkpoint's paths and JSON files (`model.load.resolve_paths`);
2. the training settings the run takes from training_args.json (`training_args`): typed and in range;
3. the prompt file (`data.prompts`): readable UTF-8 JSONL, non-empty, every line a {"prompt", "answer"} object;
   a note when a batch needs more prompts than the file holds (prompts then repeat);
4. the tokenizer (`model.load.load_tokenizer`): present and non-empty;
5. every prompt + max_new_tokens within the model's maximum positions (`check_prompts_fit`), and a warning
   (once) when prompt characters map to the tokenizer's unknown token;
6. weight files (`model.checks.check_weight_files`): safetensors headers complete (truncation names the file), adapter
   tensors finite; the optimizer file (`model.load.read_optimizer_file`): loaded with weights_only=True (a
   pickle that would run code is refused), state finite and exp_avg_sq ≥ 0 (`model.checks.check_optimizer_values`);
7. after loading: every model weight finite (`model.checks.check_finite_parameters`).

Every refusal is a `UserInputError` (here: `CheckpointError` or `PromptError`): the CLI prints its one paragraph
and exits 2.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from probe_dist.data.prompts import PromptError, prompt_text
from probe_dist.model.load import CheckpointError
from probe_dist.update.loss import LOSS_FAMILIES

log = logging.getLogger("probe_dist")

# Files that carry a tokenizer's vocabulary (or, for tokenizer_config.json, name a vocabulary-free one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


class TrainingArgsError(CheckpointError):
    """training_args.json records a setting the probe would use with a wrong type or out of range."""


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
    "max_new_tokens": _Recorded(("max_new_tokens", "max_completion_length"), "sampling.max_new_tokens",
                                "an integer >= 1"),
    "loss": _Recorded(("loss", "loss_type"), "update.loss", f"one of {', '.join(LOSS_FAMILIES)} (TRL's sapo "
                      "trains as grpo and vespo as dapo on-policy: set update.loss so)"),
    "grad_clip": _Recorded(("grad_clip", "max_grad_norm"), "update.grad_clip", "a number >= 0 (0 or null: no clipping)"),
}


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value) -> str:
    kind = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}.get(type(value))
    return f"{json.dumps(value)[:60]} ({kind or type(value).__name__})"


def _unsupported_recipe(recorded: dict) -> list[str]:
    """Recorded training settings whose step the probe cannot reproduce (it measures one on-policy step)."""
    out = []
    iterations = recorded.get("num_iterations")
    if is_number(iterations) and iterations > 1:
        out.append(f"num_iterations={iterations} (each batch is reused for several optimizer steps, with clipped "
                   "importance ratios to a stale policy; the probe measures the first, on-policy step)")
    steps, accumulation = recorded.get("steps_per_generation"), recorded.get("gradient_accumulation_steps")
    if is_number(steps) and is_number(accumulation) and steps > accumulation:
        out.append(f"steps_per_generation={steps} > gradient_accumulation_steps={accumulation} (later optimizer "
                   "steps train on samples from an older policy)")
    if recorded.get("use_vllm") and recorded.get("vllm_importance_sampling_correction"):
        out.append("vllm_importance_sampling_correction (the loss is reweighted by the sampler/trainer probability "
                   "ratio of vLLM; the probe samples from the trainer's own policy)")
    loss = recorded.get("loss_type")
    if isinstance(loss, str) and loss not in LOSS_FAMILIES and loss not in ("sapo", "vespo", "luspo"):
        out.append(f"loss_type={loss!r}")
    return out


# TRL GRPOConfig keys the probe does not read from a checkpoint (reading TRL's recipe is the checkpoints issue's
# work): (key, config setting, the probe's value for the recorded one or None to compare as is).
_TRL_UNREAD = (("beta", "update.kl_coef"), ("scale_rewards", "update.scale_rewards"),
               ("epsilon_high", "update.epsilon_high"), ("mask_truncated_completions", "update.mask_truncated"),
               ("top_entropy_quantile", "update.top_entropy_quantile"), ("entropy_coef", "update.entropy_coef"),
               ("use_bias_correction_kl", "update.kl_bias_correction"), ("bf16", "update.autocast"))


def recipe_differences(recorded: dict, cfg) -> list[str]:
    """TRL settings recorded in training_args.json that differ from what the probe will use (it does not read
    them): each as "key=recorded (probe: setting=value)"."""
    out = []
    for key, setting in _TRL_UNREAD:
        if key not in recorded or recorded[key] is None:
            continue
        section, name = setting.split(".")
        ours = getattr(getattr(cfg, section), name)
        theirs = recorded[key]
        if key == "bf16":
            theirs = "bfloat16" if theirs else "none"
        if key == "use_bias_correction_kl" and not recorded.get("beta"):
            continue  # no KL term: the correction does nothing
        if ours != theirs and not (ours is None and key == "scale_rewards"):
            out.append(f"{key}={recorded[key]!r} (probe: {setting}={ours!r})")
    return out


def training_args(recorded: dict, cfg, source: Path | None) -> dict:
    """The settings training_args.json records for the keys `cfg` leaves unset, typed and range-checked.

    Returns a copy of `recorded` whose used values are normalised (temperature a float, max_new_tokens an int,
    grad_clip a float or None). Keys the config sets explicitly are not checked: the explicit setting wins. Raises
    TrainingArgsError naming the file, the key, the value, what is accepted and the override that fixes it.
    """
    where = str(source) if source is not None else "training_args.json"
    unsupported = _unsupported_recipe(recorded)
    if unsupported and not cfg.update.ignore_unsupported_recipe:
        raise TrainingArgsError(
            f"training settings file {where!r} records training the probe cannot reproduce: "
            f"{'; '.join(unsupported)}. The probe's δH₁ and ΔH_true would describe another update than training "
            "took. Probe a checkpoint trained on-policy, or set update.ignore_unsupported_recipe=true to measure the "
            "on-policy step anyway (the summary then says which settings were ignored).")
    if unsupported:
        log.warning("ignoring training settings the probe cannot reproduce (update.ignore_unsupported_recipe): %s",
                    "; ".join(unsupported))
    out = dict(recorded)
    out["_unsupported_ignored"] = unsupported
    bos = recorded.get("prompt_bos")
    if bos is not None and bos not in ("auto", "always", "never"):
        raise TrainingArgsError(f"training settings file {where!r}: 'prompt_bos' is {_describe(bos)}, but the probe "
                                "needs auto, always or never for sampling.bos. Fix the value in the file, or set it "
                                "explicitly, e.g. sampling.bos=auto")
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
            ok = is_number(value) and math.isfinite(value) and value > 0
            norm = float(value) if ok else None
        elif name == "max_new_tokens":
            ok = is_number(value) and math.isfinite(value) and float(value).is_integer() and value >= 1
            norm = int(value) if ok else None
        elif name == "loss":
            ok = isinstance(value, str) and value in LOSS_FAMILIES
            norm = value
        else:  # grad_clip
            ok = is_number(value) and math.isfinite(value) and value >= 0
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


def note_fixed_prompt_coverage(num_prompts: int, sampling, se: str, source: str, is_main: bool = True) -> None:
    """estimators.se=fixed_prompts speaks for the prompts in E: say so when E is not the whole prompt set."""
    if se == "fixed_prompts" and sampling.B_E != num_prompts and is_main:
        log.warning("note: estimators.se=fixed_prompts gives SEs conditional on E's prompts, and E holds "
                    "sampling.B_E=%d draws from the %d prompts in %s (another seed draws others), so the SEs speak "
                    "for those prompts only, not for the prompt set. Set sampling.B_E=%d to evaluate the whole set, "
                    "or use estimators.se=population.", sampling.B_E, num_prompts, source, num_prompts)


def _prompt_lengths(tokenizer, prompts: list, bos: str = "always") -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Each prompt's token count as `rollout.sample.prompt_token_ids` builds it (a conversation through the chat
    template; a text by the `bos` rule), and the character spans of a text's tokens that are the tokenizer's unknown
    token (none reported for conversations)."""
    from probe_dist.rollout.sample import prompt_token_ids

    texts = [p if isinstance(p, str) else "" for p in prompts]
    unk = tokenizer.unk_token_id
    offsets = unk is not None and getattr(tokenizer, "is_fast", False)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    lengths, unknown = [], []
    for k, ids in enumerate(enc["input_ids"]):
        lengths.append(int(prompt_token_ids(tokenizer, prompts[k], bos).numel()))
        if unk is None or not isinstance(prompts[k], str):
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
                      source: str, config_file: Path | None = None, is_main: bool = True,
                      bos: str = "always") -> None:
    """Every prompt tokenizes to ≥ 1 token and fits, with max_new_tokens, in the model's max positions.

    prompts: (line, record) pairs from `data.prompts.load_prompts_with_lines`. Raises PromptLengthError naming the
    longest prompt (file and line) and the fix. Logs one warning with examples when prompt characters map to the
    tokenizer's unknown token (the model would see <unk> instead of them).
    """
    lengths, unknown = _prompt_lengths(tokenizer, [r["prompt"] for _, r in prompts], bos)
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
                f"prompt file {source}, line {line}: the longest prompt ({prompt_text(record)[:40]!r}...) is "
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
