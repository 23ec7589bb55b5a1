"""The toy task, its tokenizer, prompt sources, rewards and the supervised toy base model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_dist.data.prompts import load_prompts, select_prompts
from probe_dist.data.rewards import decode_response, exact_match, get_reward_fn
from probe_dist.toy import task as toy_task
from probe_dist.toy.task import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    build_tokenizer,
    encode_answer,
    encode_prompt,
    load_tokenizer,
    model_config,
    split_examples,
    write_split_files,
)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- tokenizer


def test_vocab_and_special_ids():
    tok = build_tokenizer()
    assert len(tok) <= 32
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID) == (0, 1, 2)
    assert tok.padding_side == "left"
    assert encode_prompt(tok, "12+7=") == [BOS_ID] + [toy_task.VOCAB[c] for c in "12+7="]
    assert encode_answer(tok, "19") == [toy_task.VOCAB["1"], toy_task.VOCAB["9"], EOS_ID]
    assert (
        tok.decode(encode_prompt(tok, "12+7=") + encode_answer(tok, "19"), skip_special_tokens=True)
        == "12+7=19"
    )


def test_tokenizer_round_trip_next_to_qwen2_config(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    model_config(len(tok)).save_pretrained(tmp_path)  # the situation where AutoTokenizer goes wrong
    reloaded = load_tokenizer(tmp_path)
    texts = [ex["prompt"] + ex["answer"] for ex in split_examples()["train"][:50]]
    for text in texts:
        assert encode_prompt(reloaded, text) == encode_prompt(tok, text)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert reloaded.padding_side == "left"
    batch = reloaded(["1+2=", "12+17="], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [PAD_ID, PAD_ID]


def test_model_config_is_tiny():
    import transformers

    model = transformers.Qwen2ForCausalLM(model_config(toy_task.VOCAB_SIZE))
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    assert model.config.eos_token_id == EOS_ID and model.config.pad_token_id == PAD_ID


# ------------------------------------------------------------------------------------------- splits


def test_packaged_split_files_match_generator(tmp_path):
    written = write_split_files(tmp_path)
    for split in ("train", "test"):
        packaged = toy_task.split_file(split).read_text(encoding="utf-8")
        assert written[split].read_text(encoding="utf-8") == packaged, (
            f"toy_{split}.jsonl is stale: run `python -c 'from probe_dist.toy.task import "
            "write_split_files; write_split_files()'`"
        )


def test_splits_disjoint_and_complete():
    train, test = load_prompts("toy", "train"), load_prompts("toy", "test")
    assert (len(train), len(test)) == (320, 80)
    train_set, test_set = {p["prompt"] for p in train}, {p["prompt"] for p in test}
    assert not train_set & test_set
    assert train_set | test_set == {f"{a}+{b}=" for a in range(20) for b in range(20)}
    for p in train + test:
        a, b = p["prompt"][:-1].split("+")
        assert p["answer"] == str(int(a) + int(b))


# ------------------------------------------------------------------------------------------ prompts


def test_load_prompts_from_file_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"prompt": "q", "answer": 3, "id": 7}\n')
    assert load_prompts(str(good), "train") == [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "q", "answer": "3", "id": 7},
    ]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(str(tmp_path / "missing.jsonl"), "train")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_prompts(str(bad_json), "train")
    no_answer = tmp_path / "noanswer.jsonl"
    no_answer.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"noanswer\.jsonl, line 1: missing key\(s\) answer"):
        load_prompts(str(no_answer), "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_prompts("toy", "validation")


def test_select_prompts_deterministic_without_duplicates():
    prompts = load_prompts("toy", "train")
    first = select_prompts(prompts, 64, seed=3, batch_name="E")
    assert first == select_prompts(prompts, 64, seed=3, batch_name="E")
    assert len(first) == 64 and len({i for i, _ in first}) == 64
    assert all(prompts[i] is p for i, p in first)
    assert [i for i, _ in first] != [i for i, _ in select_prompts(prompts, 64, 3, "U")]
    assert [i for i, _ in first] != [i for i, _ in select_prompts(prompts, 64, 4, "E")]
    everything = select_prompts(prompts, len(prompts), 0, "E")
    assert sorted(i for i, _ in everything) == list(range(len(prompts)))
    # more than available: whole reshuffled passes, each prompt 2 or 3 times
    small = prompts[:5]
    counts = torch.bincount(torch.tensor([i for i, _ in select_prompts(small, 12, 0, "U")]), minlength=5)
    assert counts.tolist() and counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 12


def test_select_prompts_stable_across_processes():
    """No dependence on PYTHONHASHSEED or process state."""
    code = (
        "import json; from probe_dist.data.prompts import load_prompts, select_prompts; "
        "print(json.dumps([i for i, _ in select_prompts(load_prompts('toy', 'train'), 10, 5, 'E')]))"
    )
    outs = set()
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        outs.add(result.stdout.strip())
    expected = [i for i, _ in select_prompts(load_prompts("toy", "train"), 10, 5, "E")]
    assert outs == {json.dumps(expected)}


# ------------------------------------------------------------------------------------------ rewards


def test_exact_match_reward():
    reward = get_reward_fn("exact_match")
    assert reward is exact_match
    assert reward("19", "19") == 1.0
    assert reward(" 19\n", "19") == 1.0
    assert reward("19", " 19 ") == 1.0
    assert reward("190", "19") == 0.0
    assert reward("", "19") == 0.0
    assert reward("1 9", "19") == 0.0


def test_decode_response_cuts_at_eos():
    tok = build_tokenizer()
    ids = encode_answer(tok, "19") + encode_answer(tok, "7")  # "1" "9" <eos> "7" <eos>
    assert decode_response(tok, ids) == "19"
    assert decode_response(tok, torch.tensor(ids[:2])) == "19"  # no EOS: everything
    assert decode_response(tok, [EOS_ID]) == ""


def test_unknown_and_optional_rewards():
    with pytest.raises(ValueError, match="exact_match"):
        get_reward_fn("nope")
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install math-verify"):
            get_reward_fn("math_verify")
    else:
        reward = get_reward_fn("math_verify")
        assert reward("19", "19") == 1.0
        assert reward("20", "19") == 0.0


# --------------------------------------------------------------------------------------- base model


def test_train_base_is_deterministic():
    from probe_dist.toy.base import train_base

    threads = torch.get_num_threads()
    model_a, _, stats_a = train_base(0, steps=15, eval_samples=20, num_threads=1)
    model_b, _, stats_b = train_base(0, steps=15, eval_samples=20, num_threads=1)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    for key in ("final_loss", "train_loss", "train_sampled_accuracy", "token_entropy"):
        assert stats_a[key] == stats_b[key], key
    model_c, _, _ = train_base(1, steps=15, eval_samples=20, num_threads=1)
    assert not torch.equal(model_c.state_dict()["lm_head.weight"], state_a["lm_head.weight"])
    assert torch.get_num_threads() == threads  # restored


def test_train_base_default_gives_useful_accuracy():
    from probe_dist.toy.base import sample_accuracy, train_base

    # the default recipe; one thread only because two threads on a loaded 2-core CI box are ~20x slower
    # (the weights are bitwise the same either way for this model)
    model, tokenizer, stats = train_base(0, num_threads=1)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    # tol: bound the toy base's spec — partly right, not collapsed: sampled accuracy in (0.15, 0.95), ≥ 0.05 nats
    # per token. Not a tolerance: the recipe is deterministic (test above), and its realisations over seeds 0-4
    # (the spread another CPU's training rounding could reach) lie in 0.46-0.69 and 0.38-0.48, each ≥ 0.3 and ≥ 7×
    # inside its limit — while a broken recipe (no learning: accuracy ≈ 0; a collapsed policy: H ≈ 0) falls outside
    assert 0.15 < stats["train_sampled_accuracy"] < 0.95, stats
    assert stats["token_entropy"] > 0.05, stats  # tol: bound (above: the spec's entropy floor)
    prompts = load_prompts("toy", "train")
    again = sample_accuracy(model, tokenizer, prompts, temperature=1.0, max_new_tokens=3, seed=0, n=200)
    assert again == stats["train_sampled_accuracy"]
    # near-greedy sampling is better than temperature 1 — the model has learned something real
    cold = sample_accuracy(model, tokenizer, prompts, temperature=0.1, max_new_tokens=3, seed=0, n=200)
    assert cold > stats["train_sampled_accuracy"]
