"""Checks of the prompts against the run before the first model pass: every prompt tokenizes and fits the model's
positions with max_new_tokens, a note when a batch repeats prompts or a fixed-prompt SE covers part of the set,
and a warning when prompt characters map to the tokenizer's unknown token.

Every refusal is a `PromptError` (a `UserInputError`): the CLI prints its one paragraph and exits 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from probe_dist.data.prompts import PromptError, prompt_text, prompt_token_ids

log = logging.getLogger("probe_dist")


class PromptLengthError(PromptError):
    """A prompt (plus max_new_tokens) longer than the model's maximum positions."""


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
        if budget < 1:
            where = f" ({config_file})" if config_file is not None else ""
            raise PromptLengthError(
                f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt: the model's "
                f"max_position_embeddings is {max_positions}{where}. Set sampling.max_new_tokens below "
                f"{max_positions} minus the longest prompt's tokens ({max(lengths)}).")
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
