"""The toy checkpoint's reward model: a Qwen2ForSequenceClassification started from the toy base that scores toy
responses, so GRADE (update.loss=grade) runs offline on the built-in checkpoint.

It reads [bos a + b =] followed by exactly MAX_ANSWER_TOKENS response tokens — the shape of a GRADE rollout on the
toy task, which never stops at EOS — and its score is the logit of "the text before the first EOS is a + b"
(trained with binary cross-entropy on train-split prompts). Training responses: the correct answer, near misses
(±1…±3), random numbers and characters, answers without EOS, and arbitrary tokens after the EOS, so the score
depends on what precedes the first EOS only.
"""

from __future__ import annotations

import random
import time

import torch
import transformers

from probe_dist.data.prompts import load_prompts
from probe_dist.toy.task import EOS_ID, MAX_ANSWER_TOKENS, VOCAB_SIZE, encode_prompt

STEPS = 2000
BATCH = 64
LR = 3e-4


def _response(tokenizer, text: str, *, eos: bool, rng: random.Random) -> list[int]:
    """The characters of `text`, then EOS (if `eos`), then arbitrary tokens up to MAX_ANSWER_TOKENS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_ANSWER_TOKENS]
    if eos and len(ids) < MAX_ANSWER_TOKENS:
        ids.append(EOS_ID)
    while len(ids) < MAX_ANSWER_TOKENS:
        ids.append(rng.randrange(VOCAB_SIZE))
    return ids


def examples(tokenizer, split: str, rng: random.Random) -> list[tuple[list[int], float]]:
    """(token ids, label) pairs: for each prompt of `split`, the correct answer four times and five others, each
    labelled by the exact-match rule on the text before the first EOS."""
    out = []
    for ex in load_prompts("toy", split):
        prompt, answer = encode_prompt(tokenizer, ex["prompt"]), int(ex["answer"])
        wrong = [answer + d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0]
        candidates = [(str(answer), True)] * 4 + [
            (str(answer), False), (str(rng.choice(wrong)), True), (str(rng.choice(wrong)), True),
            (str(rng.randrange(0, 100)), True),
            ("".join(rng.choice("0123456789+=") for _ in range(2)), rng.random() < 0.5)]
        for text, eos in candidates:
            response = _response(tokenizer, text, eos=eos, rng=rng)
            cut = response[:response.index(EOS_ID)] if EOS_ID in response else None
            label = float(cut is not None and tokenizer.decode(cut) == str(answer))
            out.append((prompt + response, label))
    return out


def _batches(data: list[tuple[list[int], float]], rng: random.Random):
    """Batches of one sequence length (the prompt lengths differ; the reward model never sees padding)."""
    by_len: dict[int, list] = {}
    for ids, label in data:
        by_len.setdefault(len(ids), []).append((ids, label))
    while True:
        length = rng.choice(sorted(by_len))
        rows = rng.sample(by_len[length], min(BATCH, len(by_len[length])))
        yield (torch.tensor([r[0] for r in rows], dtype=torch.long),
               torch.tensor([r[1] for r in rows], dtype=torch.float32))


def _scores(model, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    return model.score(hidden[:, -1]).squeeze(-1)


def accuracy(model, tokenizer, split: str, seed: int) -> float:
    """Fraction of `split`'s examples whose score has the label's sign (score > 0 ⇔ correct)."""
    data = examples(tokenizer, split, random.Random(seed + 7))
    hits = 0
    with torch.no_grad():
        for ids, label in data:
            hits += int((float(_scores(model, torch.tensor([ids]))[0]) > 0) == (label > 0.5))
    return hits / len(data)


def train_reward_model(tokenizer, seed: int, base) -> tuple[transformers.Qwen2ForSequenceClassification, dict]:
    """Train the toy reward model from the toy base's backbone (as reward models start from the SFT model) with a
    fresh linear score head; returns it (float32, eval mode) and its stats: train/test sign accuracy, the final
    loss, the steps and the wall time. Deterministic for a seed: its own RNGs (the global torch RNG is saved and
    restored), so the rest of the toy build is unchanged by it."""
    start = time.perf_counter()
    rng = random.Random(seed + 101)
    cpu_state = torch.get_rng_state()
    torch.manual_seed(seed + 101)
    try:
        config = transformers.Qwen2Config.from_dict({**base.config.to_dict(), "tie_word_embeddings": False,
                                                     "id2label": {0: "reward"}, "label2id": {"reward": 0}})
        model = transformers.Qwen2ForSequenceClassification(config)
        model.model.load_state_dict(base.model.state_dict())
        data = examples(tokenizer, "train", rng)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        model.train()
        batches = _batches(data, rng)
        loss = torch.zeros(())
        for _ in range(STEPS):
            ids, labels = next(batches)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(_scores(model, ids), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_rng_state(cpu_state)
    model.eval()
    stats = {"final_loss": float(loss.detach()), "train_accuracy": accuracy(model, tokenizer, "train", seed),
             "test_accuracy": accuracy(model, tokenizer, "test", seed), "steps": STEPS,
             "seconds": time.perf_counter() - start}
    return model, stats
