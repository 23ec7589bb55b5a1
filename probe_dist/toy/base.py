"""Supervised pre-training of the toy base model (the "SFT" stage before RL).

``train_base(seed)`` builds the character tokenizer and a tiny Qwen2 from config and trains it with
next-token cross-entropy on the answer tokens (+ EOS) of the toy train split, for a fixed step
budget chosen so that the model is *partly* right: sampled accuracy at temperature 1 lands in the
middle of [0, 1]. That is what the RL probe needs — groups of responses to one prompt whose rewards
differ, so that GRPO advantages are non-zero, and a policy whose entropy can still move.

Everything is deterministic for a seed: the initial weights (``torch.manual_seed``), the
minibatch order (a private ``torch.Generator``) and the evaluation samples. Global thread settings
are left alone; two runs in the same environment give bitwise-identical weights.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
import transformers

from probe_dist.data.prompts import load_prompts
from probe_dist.data.rewards import exact_match
from probe_dist.toy.task import MAX_ANSWER_TOKENS, build_tokenizer, encode_answer, encode_prompt, model_config

DEFAULT_STEPS = 200  # seeds 0-7: sampled train accuracy 0.535-0.625, token entropy 0.36-0.47 nats
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 3e-3
WARMUP_STEPS = 10
EVAL_SAMPLES = 200


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists → (input_ids, attention_mask, position_ids), all ``[N, L]`` int64.

    position ids count real tokens only (``cumsum(mask) - 1``, clamped at 0 on the padding), so a
    padded row sees the same positions as the unpadded sequence.
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, length - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _supervised_batch(tokenizer, examples: list[dict]) -> tuple[torch.Tensor, ...]:
    """Tokenise prompt+answer+EOS; labels are -100 on padding and prompt tokens (loss on the answer only)."""
    sequences, prompt_lengths = [], []
    for ex in examples:
        prompt_ids = encode_prompt(tokenizer, ex["prompt"])
        sequences.append(prompt_ids + encode_answer(tokenizer, ex["answer"]))
        prompt_lengths.append(len(prompt_ids))
    input_ids, attention_mask, position_ids = left_pad(sequences, tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    length = input_ids.shape[1]
    for row, (seq, n_prompt) in enumerate(zip(sequences, prompt_lengths)):
        start = length - len(seq) + n_prompt
        labels[row, start:] = input_ids[row, start:]
    return input_ids, attention_mask, position_ids, labels


def _answer_loss(model, input_ids, attention_mask, position_ids, labels) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    # token t is predicted from position t-1
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def _eval_prompts(prompts: list[dict], n: int, generator: torch.Generator) -> list[dict]:
    """n prompts: a random subset without replacement while possible, then whole reshuffled cycles."""
    picked: list[dict] = []
    while len(picked) < n:
        order = torch.randperm(len(prompts), generator=generator).tolist()
        picked.extend(prompts[i] for i in order[: n - len(picked)])
    return picked


@torch.no_grad()
def sample_stats(
    model, tokenizer, prompts: list[dict], *, temperature: float, max_new_tokens: int, seed: int, n: int
) -> dict[str, float]:
    """Accuracy (exact match) and mean per-token RB entropy of ``n`` sampled responses.

    Uses the probe's own sampler, reward text and scoring, so the numbers mean what the probe's do.
    Returns floats: accuracy in [0, 1], token_entropy in nats per token, mean_response_tokens.
    Raises ValueError if ``prompts`` is empty and ZeroDivisionError if ``n`` is 0.
    """
    from probe_dist.model.runner import PolicyRunner
    from probe_dist.rollout.sample import sample_group

    if not prompts:
        raise ValueError("sample_stats needs at least one prompt")
    was_training = model.training
    model.eval()
    runner = PolicyRunner.single_process(model, temperature=temperature, rows=1)
    chosen = _eval_prompts(prompts, n, torch.Generator().manual_seed(seed))
    correct, tokens, entropy_sum = 0.0, 0, 0.0
    for i, prompt in enumerate(chosen):
        group = sample_group(runner.decoder, tokenizer, prompt, prompt_index=i, seed_key=(seed, "stats", i),
                             group_size=1, temperature=temperature, max_new_tokens=max_new_tokens,
                             reward_fn=exact_match, loss_family="dr_grpo", adv_eps=1e-6, device=torch.device("cpu"))
        correct += float(group.rewards[0])
        _, token_entropy = runner.forward(group.layout(slice(0, 1)), grad=False)
        tokens += int(group.lengths[0])
        entropy_sum += float(token_entropy.double().sum())
    model.train(was_training)
    return {"accuracy": correct / n, "token_entropy": entropy_sum / max(tokens, 1), "mean_response_tokens": tokens / n}


def sample_accuracy(
    model, tokenizer, prompts: list[dict], *, temperature: float, max_new_tokens: int, seed: int, n: int
) -> float:
    """Fraction of ``n`` sampled responses (seeded, temperature ``temperature``) that are exactly right.

    Returns a float in [0, 1]. Raises as ``sample_stats`` (ValueError for no prompts, ZeroDivisionError for n = 0).
    """
    return sample_stats(model, tokenizer, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=seed, n=n)["accuracy"]


def train_base(
    seed: int,
    *,
    device: str | torch.device = "cpu",
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    eval_samples: int = EVAL_SAMPLES,
    num_threads: int | None = None,
) -> tuple[transformers.Qwen2ForCausalLM, transformers.PreTrainedTokenizerFast, dict]:
    """Build and supervised-train the toy base model; returns ``(model, tokenizer, stats)``.

    The model is float32, in eval mode, on ``device``. ``stats`` holds the final training loss, the
    sampled train accuracy at temperature 1 (``eval_samples`` seeded samples), the mean per-token
    entropy of those samples (nats), the step budget and the wall time. ``steps`` exists so that tests
    can run a shortened schedule; the default is tuned so accuracy is a useful middle fraction.

    ``num_threads``: if given, torch's intra-op thread count for the duration of the call (restored
    afterwards). On an oversubscribed CPU, 1 thread is several times faster for this tiny model.
    ``lr`` is the peak AdamW learning rate (linear warm-up, cosine decay to 10 %). Raises ZeroDivisionError (from
    ``sample_stats``) if ``eval_samples`` is 0; torch errors (e.g. an unavailable ``device``) propagate.
    """
    if num_threads is None:
        return _train_base(seed, device=device, steps=steps, batch_size=batch_size, lr=lr, eval_samples=eval_samples)
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train_base(seed, device=device, steps=steps, batch_size=batch_size, lr=lr,
                           eval_samples=eval_samples)
    finally:
        torch.set_num_threads(previous)


def _train_base(seed, *, device, steps, batch_size, lr, eval_samples):
    """``train_base`` without the thread setting: same arguments, same ``(model, tokenizer, stats)``, same raises."""
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    train = load_prompts("toy", "train")

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(model_config(len(tokenizer))).to(device=device, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    # tokenised once; every minibatch is a row subset (left padding to the split's longest sequence)
    train_tensors = [t.to(device) for t in _supervised_batch(tokenizer, train)]
    batch_generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    loss_value = float("nan")
    for step in range(steps):
        if len(order) < batch_size:  # epochs of reshuffled train prompts
            order.extend(torch.randperm(len(train), generator=batch_generator).tolist())
        indices, order = torch.tensor(order[:batch_size]), order[batch_size:]
        batch = [t[indices] for t in train_tensors]
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step)
        loss = _answer_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())

    model.eval()
    with torch.no_grad():
        full_loss = float(_answer_loss(model, *train_tensors))
    sampled = sample_stats(
        model,
        tokenizer,
        train,
        temperature=1.0,
        max_new_tokens=MAX_ANSWER_TOKENS,
        seed=seed,
        n=eval_samples,
    )
    stats = {
        "final_loss": loss_value,
        "train_loss": full_loss,
        "train_sampled_accuracy": sampled["accuracy"],
        "token_entropy": sampled["token_entropy"],
        "mean_response_tokens": sampled["mean_response_tokens"],
        "steps": steps,
        "seed": seed,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
    }
    return model, tokenizer, stats
