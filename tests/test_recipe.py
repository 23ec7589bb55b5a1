"""Training-recipe parity beyond the loss (docs/method.md §2, §4): prompts as TRL builds them (chat templates, BOS
rules), datasets prompt sources, reward functions given by name with TRL's calling convention, bf16 autocast of the
gradient pass against TRL's bf16 gradient, and refusal of recorded training the probe cannot reproduce."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch

from probe_dist.data.prompts import PromptError, load_prompts, prompt_token_ids
from probe_dist.data.rewards import decode_response
from probe_dist.update.gradient import update_gradient
from tests.probe_harness import make_probe, write_prompts
from tests.test_cli import run_cli
from tests.tolerances import fp_bound, unit_roundoff

pytest.importorskip("trl")
from tests.trl_reference import trl_gradient, trl_trainer  # noqa: E402

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CONVERSATIONS = [[{"role": "user", "content": "3+4="}],
                 [{"role": "system", "content": "add"}, {"role": "user", "content": "12+9="}]]


@pytest.fixture(scope="module")
def trainer(toy_checkpoint):
    return trl_trainer(toy_checkpoint, loss_type="dapo", block_rows=8, num_blocks=1)


def test_conversational_prompt_file_tokenizes_as_trl(trainer, tmp_path):
    """A JSONL file of conversations → the same prompt ids as GRPOTrainer._tokenize_prompts, with one BOS although
    the template starts with one."""
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": c, "answer": "7"}) + "\n" for c in CONVERSATIONS))
    records = load_prompts(str(path))
    tokenizer = trainer.processing_class
    tokenizer.chat_template = CHAT_TEMPLATE
    theirs, _, _ = trainer._tokenize_prompts([r["prompt"] for r in records])
    for record, expected in zip(records, theirs):
        ours = prompt_token_ids(tokenizer, record["prompt"], "auto").tolist()
        assert ours == list(expected)
        assert ours[0] == tokenizer.bos_token_id and ours[1] != tokenizer.bos_token_id


def test_text_prompts_follow_the_tokenizer_bos_rule_as_trl(trainer):
    """bos=auto is the tokenizer's own rule, as TRL's processing_class(text=...): none for the toy tokenizer, one
    for a tokenizer whose post-processor adds BOS (Llama style); always/never force it."""
    from tokenizers import processors

    tokenizer = trainer.processing_class
    texts = ["3+4=", "12+9="]
    theirs, _, _ = trainer._tokenize_prompts(texts)
    assert [prompt_token_ids(tokenizer, t, "auto").tolist() for t in texts] == [list(x) for x in theirs]
    assert all(x[0] != tokenizer.bos_token_id for x in theirs)  # this tokenizer adds no BOS
    bos = tokenizer.bos_token_id
    assert prompt_token_ids(tokenizer, texts[0], "always").tolist() == [bos, *theirs[0]]
    assert prompt_token_ids(tokenizer, texts[0], "never").tolist() == list(theirs[0])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    theirs, _, _ = trainer._tokenize_prompts(texts)
    assert [prompt_token_ids(tokenizer, t, "auto").tolist() for t in texts] == [list(x) for x in theirs]
    assert all(x[0] == bos and x[1] != bos for x in theirs)
    assert prompt_token_ids(tokenizer, texts[0], "always").tolist() == list(theirs[0])  # not doubled


def test_conversations_need_a_chat_template(toy_checkpoint, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": CONVERSATIONS[0], "answer": "7"}) + "\n")
    proc = run_cli(["checkpoint.path=" + str(toy_checkpoint), "device=cpu", f"sampling.prompts={path}",
                    f"output.dir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and "no chat template" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "7"}) + "\n")
    with pytest.raises(PromptError, match="must be a conversation"):
        load_prompts(str(bad))


def test_datasets_sources_give_the_same_prompts(tmp_path):
    """A save_to_disk directory (Dataset and DatasetDict split) and a parquet file read through `datasets` give
    the records of the equivalent JSONL file."""
    import datasets

    rows = [{"prompt": f"{k}+1=", "answer": str(k + 1), "level": k % 3} for k in range(5)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = load_prompts(str(jsonl))
    data = datasets.Dataset.from_list(rows)
    data.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dd"))
    data.to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(str(tmp_path / "ds")) == expected
    assert load_prompts(str(tmp_path / "dd"), "train") == expected
    assert load_prompts(str(tmp_path / "dd"), "test") == expected[:1]
    assert load_prompts(str(tmp_path / "p.parquet")) == expected
    with pytest.raises(PromptError, match="splits train, test"):
        load_prompts(str(tmp_path / "dd"), "validation")


REWARD_MODULE = '''
import json, os

def accuracy(prompts, completions, completion_ids, answer, level, **kwargs):
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"fn": "accuracy", "keys": sorted(kwargs) + ["answer", "completion_ids", "completions",
                            "level", "prompts"], "prompts": prompts, "completions": completions,
                            "completion_ids": completion_ids, "answer": answer, "level": level}) + "\\n")
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def brevity(completions, completion_ids, **kwargs):
    return [None if len(ids) == 2 else -0.1 * len(ids) for ids in completion_ids]
'''


def test_reward_functions_by_name_get_trl_arguments_and_reach_the_table(toy_checkpoint, tmp_path, monkeypatch):
    """sampling.reward=module:function,...*weight: each function is called per group with prompts, completions (TRL's
    decode), completion_ids and every other column as lists; the weighted sum is the reward (None values skipped),
    and each function's values appear in sequences.jsonl."""
    (tmp_path / "plug_rewards.py").write_text(REWARD_MODULE)
    log = tmp_path / "calls.jsonl"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b), "level": a % 2}) + "\n"
                               for a, b in [(1, 2), (5, 8), (3, 4), (9, 4)]))
    env = {"PYTHONPATH": str(tmp_path), "REWARD_LOG": str(log)}
    out = tmp_path / "out"
    proc = run_cli([f"checkpoint.path={toy_checkpoint}", "device=cpu", f"sampling.prompts={prompts}",
                    "sampling.reward=plug_rewards:accuracy,plug_rewards:brevity*0.5", "sampling.B_E=4",
                    "sampling.B_U=4", "estimators.etas=[0,1e-4]", f"output.dir={out}"], extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    records = {r["prompt"]: r for r in load_prompts(str(prompts))}
    assert calls and all(set(c["keys"]) >= {"prompts", "completions", "completion_ids", "answer", "level",
                                           "trainer_state", "log_extra", "log_metric"} for c in calls)
    for c in calls:
        record = records[c["prompts"][0]]
        assert c["answer"] == [record["answer"]] * len(c["completions"]) and c["level"] == [record["level"]] * 4
    rows = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    seen = 0
    for row in rows:
        parts = row["rewards"]
        assert set(parts) == {"plug_rewards:accuracy", "plug_rewards:brevity"}
        brevity = parts["plug_rewards:brevity"]
        expected = parts["plug_rewards:accuracy"] + (0.0 if brevity is None else 0.5 * brevity)
        # tol: fp a weighted sum of two float64 terms (the probe's summation order may differ from this one)
        scale = abs(parts["plug_rewards:accuracy"]) + (0.0 if brevity is None else 0.5 * abs(brevity))
        assert row["reward"] == pytest.approx(expected, abs=fp_bound(torch.float64, 2, scale))
        seen += brevity is None
    assert 0 < seen < len(rows)  # two-token responses were left unscored by brevity
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(toy_checkpoint / "tokenizer"))
    call = calls[0]
    assert call["completions"] == tok.batch_decode(call["completion_ids"], skip_special_tokens=True)


def test_bf16_autocast_gradient_is_closer_to_trl_bf16(toy_checkpoint, tmp_path):
    """update.autocast=bfloat16 reproduces TRL's bf16=True gradient computation (autocast of the forward, the loss
    in float32), not merely some bf16 computation of the same loss.

    Error model: a bf16 gradient g_bf = g + e, e the bf16 rounding of this computation on these inputs, of relative
    size ε = ‖g_bf − g‖/‖g‖ (measured: the probe's fp32 gradient against TRL's bf16 one; the two fp32 gradients agree
    to float32 rounding, tests/test_trl_parity.py). Two bf16 computations that round *independently* (another
    autocast scheme, bf16 weights, the loss in bf16) have nearly orthogonal errors in this many dimensions, so
    their distance is ≈ √(ε₁² + ε₂²) ≥ ε. The same bf16 ops on the same operands round identically, except where a
    different micro-batch shape changes the float32 accumulation order and a result crosses a bf16 boundary, so
    the probe's bf16 gradient is strictly closer to TRL's than ε. TRL against itself with 4-row instead of 32-row
    micro-steps shows that shape effect (asserted below ε too: the precondition that makes the check discriminate)."""
    pairs = [(3, 4), (5, 8), (9, 9), (2, 7), (6, 6), (1, 8), (4, 9), (7, 5)]
    path = write_prompts(tmp_path / "p.jsonl", pairs)
    probe = make_probe(toy_checkpoint, [f"sampling.prompts={path}", "sampling.max_new_tokens=2", "update.loss=dapo",
                                        "update.grad_clip=0", "update.adv_eps=1e-4", "sampling.B_U=8",
                                        "sampling.G_U=4"])
    batch = probe.sample("U", 8, 4)
    groups = sorted(batch.groups, key=lambda g: g.prompt_index)
    texts = [decode_response(probe.tokenizer, g.responses[i, :int(g.lengths[i])], probe.eos_ids)
             for g in groups for i in range(g.size)]

    def rel(ours, theirs):
        num = sum(float((ours[n] - theirs[n]).pow(2).sum()) for n in theirs)
        return (num / sum(float(theirs[n].pow(2).sum()) for n in theirs)) ** 0.5

    trl32, _ = trl_gradient(trl_trainer(toy_checkpoint, loss_type="dapo", block_rows=32, bf16=True), batch.groups,
                            block_rows=32, texts=texts)
    trl4, _ = trl_gradient(trl_trainer(toy_checkpoint, loss_type="dapo", block_rows=4, num_blocks=8, bf16=True),
                           batch.groups, block_rows=4, texts=texts)
    names = [n for n, _ in probe.trainable]
    ours = {}
    for autocast in ("none", "bfloat16"):
        g, *_ = update_gradient(probe.rt, probe.runner, batch, dataclasses.replace(probe.cfg.update,
                                                                                     autocast=autocast))
        ours[autocast] = dict(zip(names, g))
    shape_effect = rel(trl4, trl32)
    bf16, eps = rel(ours["bfloat16"], trl32), rel(ours["none"], trl32)
    print(f"bf16 autocast vs TRL bf16: {bf16:.3g}; fp32 vs TRL bf16 (ε): {eps:.3g}; TRL 4- vs 32-row: {shape_effect:.3g}")
    # tol: bound precondition: the bf16 rounding is resolved (ε far above float32's 1e-7 level) and TRL's own
    # shape effect stays below ε (identical bf16 ops round identically on most elements)
    assert eps > 1e3 * unit_roundoff(torch.float32) and shape_effect < eps, (eps, shape_effect)
    # tol: bound the error model above: independent bf16 rounding would put the distance at ≥ ε (orthogonal errors)
    assert bf16 < eps, (bf16, eps, shape_effect)
    # tol: bound the option is live: bf16 autocast moves the gradient by the bf16 rounding, three orders above
    # float32's (a no-op autocast leaves it equal to the fp32 gradient)
    assert rel(ours["bfloat16"], ours["none"]) > 1e3 * unit_roundoff(torch.float32)


def test_unsupported_recorded_training_is_refused(toy_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    args = json.loads((ckpt / "training_args.json").read_text())
    (ckpt / "training_args.json").write_text(json.dumps({**args, "num_iterations": 2}))
    common = [f"checkpoint.path={ckpt}", "device=cpu", "sampling.B_E=2", "sampling.B_U=2", "estimators.etas=[0]"]
    proc = run_cli([*common, f"output.dir={tmp_path / 'a'}"])
    assert proc.returncode == 2 and "num_iterations=2" in proc.stderr and "ignore_unsupported_recipe" in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = run_cli([*common, "update.ignore_unsupported_recipe=true", f"output.dir={tmp_path / 'b'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["provenance/recipe_ignored"] and "num_iterations=2" in summary["provenance/recipe_ignored"][0]


def test_sys_path_is_untouched():  # the reward plugin test runs in a subprocess
    assert not any("plug_rewards" in p for p in sys.path)


def test_none_is_a_value_where_it_is_a_choice():
    """update.scale_rewards=none on the command line is the choice "none", not null (which would fall back to the
    loss family's default); where "none" is not a choice it still means null."""
    from probe_dist.config import load_config

    assert load_config(None, ["update.scale_rewards=none"]).update.scale_rewards == "none"
    assert load_config(None, ["update.grad_clip=none"]).update.grad_clip is None


def test_recipe_precedence_config_then_checkpoint_then_default():
    """Each setting: the config's value if given, else the recorded one (TRL's key names included), else the
    default — with its origin; config values that differ from the recorded ones are listed."""
    from probe_dist.config import explicit_keys, load_config
    from probe_dist.resolve import resolve_recipe
    from probe_dist.state.recipe import RecipeError

    recorded = {"temperature": 0.7, "max_completion_length": 64, "loss_type": "bnpo", "beta": 0.04,
                "scale_rewards": False, "max_grad_norm": 0.5, "num_generations": 6, "bf16": True,
                "per_device_train_batch_size": 12, "epsilon_high": None, "epsilon": 0.28,
                "use_bias_correction_kl": True, "mask_truncated_completions": True}
    cfg = load_config(None, ["update.kl_coef=0.0", "sampling.temperature=0.7"])
    resolved, settings, overrides, unsupported = resolve_recipe(cfg, recorded, explicit=explicit_keys(cfg),
                                                                kind="trl", source=None)
    u, s = resolved.update, resolved.sampling
    assert (s.temperature, s.max_new_tokens, u.loss, u.grad_clip, u.kl_coef) == (0.7, 64, "bnpo", 0.5, 0.0)
    assert (u.scale_rewards, s.G_U, u.autocast, u.loss_block_rows, u.epsilon_high) == ("none", 6, "bfloat16", 12, 0.28)
    assert (u.kl_bias_correction, u.mask_truncated, u.adv_eps, u.max_len) == (True, True, 1e-4, 64)
    assert settings["update.kl_coef"] == {"value": 0.0, "origin": "config"}
    assert settings["sampling.temperature"]["origin"] == "config"  # given, equal to the recorded value
    assert settings["update.loss"]["origin"] == "checkpoint (loss_type)"
    assert settings["update.entropy_coef"]["origin"] == "default"
    assert overrides == ["update.kl_coef=0.0 (checkpoint: beta=0.04)"] and unsupported == []
    with pytest.raises(RecipeError, match=r"'max_grad_norm' is \"x\" \(a string\).*update.grad_clip="):
        resolve_recipe(cfg, {**recorded, "max_grad_norm": "x"}, explicit=explicit_keys(cfg), kind="trl", source=None)
    with pytest.raises(RecipeError, match="update.loss is not set"):
        resolve_recipe(cfg, {"temperature": 1.0, "max_completion_length": 8}, explicit=frozenset(), kind="trl",
                       source=None)
    with pytest.raises(RecipeError, match="top_p=0.9.*ignore_unsupported_recipe"):
        resolve_recipe(cfg, {**recorded, "top_p": 0.9}, explicit=explicit_keys(cfg), kind="trl", source=None)


def test_recipe_refusals_name_the_setting(tmp_path):
    """Recorded training the probe cannot reproduce is refused naming the setting (TRL's generation_kwargs, a moving
    or absent KL reference, reward aggregation, fp16); required settings are asked for all at once; a training
    output folder points at its checkpoints."""
    from probe_dist.config import explicit_keys, load_config
    from probe_dist.errors import CheckpointError
    from probe_dist.resolve import resolve_recipe
    from probe_dist.state.files import open_checkpoint
    from probe_dist.state.recipe import RecipeError

    cfg = load_config(None, [])
    base = {"temperature": 1.0, "max_completion_length": 8, "loss_type": "grpo", "beta": 0.0}

    def refusal(recorded, **kw):
        with pytest.raises(RecipeError) as info:
            resolve_recipe(cfg, recorded, explicit=explicit_keys(cfg), kind="trl", source=None, **kw)
        return str(info.value)

    assert "generation_kwargs={'top_k': 3}" in refusal({**base, "generation_kwargs": {"top_k": 3}})
    assert "'temperature': 0.7" in refusal({**base, "generation_kwargs": '{"temperature": 0.7, "top_p": 1.0}'})
    resolve_recipe(cfg, {**base, "generation_kwargs": {"top_p": 1.0, "temperature": 1.0, "max_time": 5}},
                   explicit=frozenset(), kind="trl", source=None)  # no reshaping: accepted
    assert "sync_ref_model" in refusal({**base, "beta": 0.04, "sync_ref_model": True})
    assert "normalize_then_sum" in refusal({**base, "multi_objective_aggregation": "normalize_then_sum"})
    assert "fp16" in refusal({**base, "fp16": True})
    message = refusal({**base, "beta": 0.04}, has_adapter=False)
    assert "full fine-tune" in message and "update.kl_coef=0" in message
    with pytest.raises(RecipeError, match="precision.dtype=float64 with update.autocast=bfloat16.*autocast=none"):
        resolve_recipe(load_config(None, ["precision.dtype=float64"]), {**base, "bf16": True}, explicit=frozenset(),
                       kind="trl", source=None)
    message = refusal({"loss_type": "grpo"})
    assert "sampling.temperature, sampling.max_new_tokens are not set" in message
    _, _, overrides, _ = resolve_recipe(load_config(None, ["update.adv_eps=1e-6"]), base,
                                        explicit=frozenset({"update.adv_eps"}), kind="trl", source=None)
    assert overrides == ["update.adv_eps=1e-06 (checkpoint: TRL's constant 0.0001)"]

    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    with pytest.raises(CheckpointError, match=r"training output folder holding 2 checkpoints.*checkpoint-10"):
        open_checkpoint(load_config(None, [f"checkpoint.path={tmp_path}"]).checkpoint)
