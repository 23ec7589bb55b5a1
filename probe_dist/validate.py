"""Checks of every input before the first model pass, with messages that name the file or tensor and the fix.

`probe_dist.main.build_probe` runs them cheapest first, so a typo costs seconds, not a model load:

1. the config (`probe_dist.config`) and the checkpoint's paths and JSON files (`model.load.resolve_paths`);
2. the training settings the run takes from the checkpoint (`probe_dist.recipe`): typed and in range;
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
from pathlib import Path

from probe_dist.data.prompts import PromptError, prompt_text
from probe_dist.model.load import CheckpointError
from probe_dist.recipe import RecipeError

log = logging.getLogger("probe_dist")

# Files that carry a tokenizer's vocabulary (or, for tokenizer_config.json, name a vocabulary-free one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


TrainingArgsError = RecipeError  # the recorded training settings: probe_dist/recipe.py


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


def check_grade(cfg, world_size: int, is_main: bool, explicit: frozenset[str] = frozenset()) -> Path | None:
    """GRADE (update.loss grade / grade_st): refuse what it cannot run with, name settings that do not apply, and
    return the reward model's folder (None for the other loss families).

    Raises ConfigError for distributed.strategy=fsdp2 with more than one rank (the relaxed rollout calls the
    decoder step by step outside the sharded root) and for estimators.mode=single_batch (U holds no sampled
    sequences to reuse as E); RewardModelError when no reward model folder is given or found."""
    from probe_dist.config import ConfigError
    from probe_dist.model.reward_model import RewardModelError
    from probe_dist.update.grade import GRADE_FAMILIES

    up = cfg.update
    if up.loss not in GRADE_FAMILIES:
        return None
    if cfg.distributed.strategy == "fsdp2" and world_size > 1:
        raise ConfigError(f"update.loss={up.loss} runs with distributed.strategy=ddp or none, not fsdp2: the relaxed "
                          "rollout steps the decoder with its own KV cache outside FSDP2's sharded root. Use "
                          "distributed.strategy=ddp (the adapter's gradients are reduced the same way).")
    if up.grade_top_k == 1:
        raise ConfigError(f"update.loss={up.loss} with update.grade_top_k=1: a relaxation over one token is a constant "
                          "one-hot, so no gradient flows through the rollout. Use update.grade_top_k ≥ 2, or 0 for "
                          "the whole vocabulary.")
    if cfg.estimators.mode == "single_batch":
        raise ConfigError(f"update.loss={up.loss} cannot use estimators.mode=single_batch: a GRADE update reads "
                          "relaxed rollouts of U's prompts, not sampled sequences that E could reuse. Use "
                          "estimators.mode=two_batch.")
    folder = Path(up.reward_model) if up.reward_model else Path(cfg.checkpoint.path or "") / "reward_model"
    if not up.reward_model and not (folder / "config.json").is_file():
        raise RewardModelError(f"update.loss={up.loss} needs a reward model that reads soft tokens: set "
                               "update.reward_model=<folder of a one-label *ForSequenceClassification model over the "
                               f"policy's vocabulary> (none given, and {str(folder)!r} does not exist).")
    defaults = (("top_entropy_quantile", 1.0), ("entropy_coef", 0.0), ("mask_truncated", False),
                ("epsilon_high", 0.2), ("kl_bias_correction", False), ("loss_block_rows", None))
    token_level = ("scale_rewards", "adv_eps", "max_len")  # resolved from defaults/recipe: named only if given
    ignored = [f"{k}={getattr(up, k)}" for k, default in defaults if getattr(up, k) != default]
    ignored += [f"{k}={getattr(up, k)}" for k in token_level if f"update.{k}" in explicit]
    if ignored and is_main:
        log.warning("update.loss=%s: %s do not apply to GRADE's objective (−r_φ + β·KL over relaxed rollouts) and "
                    "are ignored", up.loss, ", ".join(ignored))
    return folder
