"""The built-in toy task: verifiable two-number addition with a character-level tokenizer.

Prompts are ``"a+b="`` with ``a, b`` in ``0..19``; the answer is ``str(a + b)`` and a correct
response is the answer followed by EOS. All 400 pairs are split 80/20 into train/test by a fixed,
version-independent permutation (ordering by CRC32 of the prompt), and the two splits ship inside
the package as ``toy_train.jsonl`` / ``toy_test.jsonl`` (regenerate them with ``write_split_files()``).

The tokenizer has one token per character plus four special tokens:

    id  0 <pad>   1 <eos>   2 <bos>   3..12 digits "0".."9"   13 "+"   14 "="   15 <unk>

Prompts are encoded as ``[<bos>] + characters`` by ``encode_prompt``; the tokenizer itself adds no
special tokens (no post-processor), so ``tokenizer(text)`` gives just the characters.

The model is a tiny ``Qwen2ForCausalLM`` (``model_config``) built from config — nothing is downloaded.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

MAX_OPERAND = 19
"""Operands are integers in 0..MAX_OPERAND, so answers lie in 0..2*MAX_OPERAND."""
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0
"""Salt of the train/test permutation; changing it changes the shipped files."""

PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<bos>", "<unk>"
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
CHARACTERS = "0123456789+="
VOCAB: dict[str, int] = {
    PAD_TOKEN: PAD_ID,
    EOS_TOKEN: EOS_ID,
    BOS_TOKEN: BOS_ID,
    **{ch: 3 + i for i, ch in enumerate(CHARACTERS)},
}
UNK_ID = len(VOCAB)
VOCAB[UNK_TOKEN] = UNK_ID
VOCAB_SIZE = len(VOCAB)  # 16

MAX_PROMPT_TOKENS = 1 + len(f"{MAX_OPERAND}+{MAX_OPERAND}=")  # bos + "19+19=" = 7
MAX_ANSWER_TOKENS = len(str(2 * MAX_OPERAND)) + 1  # "38" + eos = 3

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "test")


# --------------------------------------------------------------------------------------------- data


def make_example(a: int, b: int) -> dict[str, str]:
    """The record of a + b: {"prompt": "a+b=", "answer": str(a + b)}."""
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def split_examples() -> dict[str, list[dict[str, str]]]:
    """All (a, b) pairs split into {"train": [...], "test": [...]}, each sorted by (a, b).

    The permutation orders pairs by CRC32 of ``"<SPLIT_SEED>:<prompt>"``, which — unlike
    ``random.shuffle`` or ``hash()`` — is identical on every Python/torch version and process.
    """
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    shuffled = sorted(pairs, key=lambda p: (zlib.crc32(f"{SPLIT_SEED}:{p[0]}+{p[1]}=".encode()), p))
    num_train = int(round(TRAIN_FRACTION * len(pairs)))
    return {
        "train": [make_example(a, b) for a, b in sorted(shuffled[:num_train])],
        "test": [make_example(a, b) for a, b in sorted(shuffled[num_train:])],
    }


def split_file(split: str, directory: str | Path | None = None) -> Path:
    """The JSONL file of toy split `split` (train or test) in `directory` (default: the package's data/).
    Raises ValueError for another split."""
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; choose one of {SPLITS}")
    return Path(directory if directory is not None else DATA_DIR) / f"toy_{split}.jsonl"


def render_jsonl(examples: list[dict[str, str]]) -> str:
    """`examples` as JSONL text: one json.dumps line per example, each ending in a newline."""
    return "".join(json.dumps(ex) + "\n" for ex in examples)


def write_split_files(directory: str | Path | None = None) -> dict[str, Path]:
    """(Re)write toy_train.jsonl and toy_test.jsonl (default: next to this module, i.e. in the package)."""
    written = {}
    for split, examples in split_examples().items():
        path = split_file(split, directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_jsonl(examples), encoding="utf-8")
        written[split] = path
    return written


# ---------------------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer: WordLevel over single characters, left padding, no post-processor."""
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK_TOKEN))
    # Regex "." isolates every character (whitespace included, which then maps to <unk>).
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # WordLevel's default decoding joins tokens with spaces; Fuse concatenates them back into the text.
    core.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        model_max_length=64,
    )
    return tokenizer


def load_tokenizer(directory: str | Path) -> transformers.PreTrainedTokenizerFast:
    """Reload a tokenizer saved with ``save_pretrained``.

    Deliberately not ``AutoTokenizer``: saved next to a Qwen2 config, AutoTokenizer reloads it as a
    Qwen2Tokenizer with different ids (transformers 5 picks the tokenizer class from the model config).
    """
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))


def encode_prompt(tokenizer, text: str) -> list[int]:
    """``[bos] + character ids`` of ``text`` (the tokenizer itself adds no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Character ids of the answer followed by EOS: the target a correct response reproduces."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


# -------------------------------------------------------------------------------------------- model


def model_config(vocab_size: int = VOCAB_SIZE) -> transformers.Qwen2Config:
    """A tiny Qwen2 (~0.3 M parameters): 2 layers, hidden 128, 4 heads / 2 KV heads, float32."""
    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
