"""The memory planner (python -m probe_dist.plan): exact counts, a byte model that matches what autograd saves,
monotone predictions, proposals that fit, and a clear refusal when nothing fits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe_dist.config import load_config
from probe_dist.plan import (
    ALL_PROJECTIONS,
    GiB,
    LoraSpec,
    model_shape,
    parse_bytes,
    phase_peaks,
    plan_memory,
    saved_activation_bytes,
)
from probe_dist.plan.__main__ import main

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"a100_40gb_8gpu.yaml": "40GiB", "h100_80gb_8gpu.yaml": "80GiB"}


def _cfg(*overrides):
    return load_config(None, ["sampling.max_new_tokens=128", "sampling.G_E=8", "sampling.G_U=8",
                              "distributed.strategy=ddp", *overrides])


def _tiny_config(**kw):
    import transformers

    args = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    args.update(kw)
    return transformers.Qwen2Config(**args)


@pytest.mark.parametrize("model", ["toy", "qwen2.5-1.5b"])
def test_components_add_up(model):
    plan = plan_memory(_cfg(), 40 * GiB, model, world_size=8)
    assert set(plan["phases"]) == {"sample", "score_base", "update_gradient", "delta_h1", "explain", "sweep"}
    for name, phase in plan["phases"].items():
        assert phase["peak_bytes"] == sum(phase["components"].values()), name
        assert all(v >= 0 for v in phase["components"].values())
    assert plan["peak_bytes"] == max(p["peak_bytes"] for p in plan["phases"].values())
    json.dumps(plan)  # serialisable as it is


def test_qwen_shape_and_counts():
    plan = plan_memory(_cfg(), 40 * GiB, "qwen2.5-1.5b", lora_r=64, world_size=8)
    m = plan["model"]
    assert (m["num_layers"], m["hidden"], m["heads"], m["kv_heads"], m["vocab"]) == (28, 1536, 12, 2, 151936)
    assert m["base_params"] == 1_543_714_304  # Qwen2.5-1.5B, tied embeddings counted once
    # r · Σ(in + out) over the 7 projections of 28 layers
    per_layer = sum(i + o for i, o in [(1536, 1536), (1536, 256), (1536, 256), (1536, 1536),
                                       (1536, 8960), (1536, 8960), (8960, 1536)])
    assert m["adapter_params"] == 64 * per_layer * 28 == 73_859_072
    comps = plan["phases"]["update_gradient"]["components"]
    assert comps["weights"] == 1_543_714_304 * 4
    assert comps["optimizer_state"] == 2 * 73_859_072 * 4
    assert comps["ddp_buckets"] == comps["adapter_grads"] == 73_859_072 * 4
    assert "accumulators" not in comps  # float64 accumulators live on CPU by default
    # the default trainable-count guard (50M) would refuse this adapter: the plan says so and how to fix it
    assert any("memory.max_trainable_params" in n for n in plan["notes"])


@pytest.mark.parametrize("targets", [ALL_PROJECTIONS, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")])
def test_adapter_count_matches_peft_on_a_real_model(targets):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    config = _tiny_config()
    real = get_peft_model(Qwen2ForCausalLM(config), LoraConfig(r=6, lora_alpha=12, target_modules=list(targets)))
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    base = sum(p.numel() for n, p in real.named_parameters() if "lora_" not in n)
    shape = model_shape(config, LoraSpec(r=6, targets=tuple(targets)))
    assert shape.adapter_params == trainable
    assert shape.base_params == base
    assert shape.targets_found == sorted(targets)


@pytest.mark.parametrize("targets,padded,dtype", [
    (ALL_PROJECTIONS, True, torch.float32), (ALL_PROJECTIONS, False, torch.float32),
    (("q_proj", "v_proj"), True, torch.float32), (("gate_proj", "up_proj"), True, torch.float32),
    (ALL_PROJECTIONS, True, torch.bfloat16)])
def test_activation_model_matches_saved_tensors(targets, padded, dtype):
    """The planner's bytes-saved-for-backward equal what SavedTensorsMeter measures on a real forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from probe_dist.model.policy import PolicyModel
    from probe_dist.runtime.meter import SavedTensorsMeter

    torch.manual_seed(0)
    config = _tiny_config(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6)
    lm = get_peft_model(Qwen2ForCausalLM(config).to(dtype).eval(),
                        LoraConfig(r=8, lora_alpha=16, target_modules=list(targets))).eval()
    policy = PolicyModel(lm, logits_chunk=64)
    n, prompt, width = 3, 9, 40
    ids = torch.randint(3, 512, (n, prompt + width))
    lengths = torch.tensor([width, width - 5 if padded else width, width])
    response_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    attention_mask = torch.cat([torch.ones(n, prompt, dtype=torch.long), response_mask.long()], dim=1)
    with SavedTensorsMeter() as meter:
        token_logp, token_h = policy(ids, attention_mask, prompt, response_mask, 1.0)
        (token_logp.sum() + token_h.sum()).backward()
    shape = model_shape(config, LoraSpec(r=8, targets=tuple(targets)))
    b = 2 if dtype == torch.bfloat16 else 4
    predicted = saved_activation_bytes(shape, n, prompt + width, width, dtype_bytes=b, padded=padded)
    # The model counts every row as scored over the full width (an upper bound): the hidden state (b·hidden bytes)
    # and the int64 target of each position past a row's end are counted though never saved.
    overcount = int(n * width - lengths.sum()) * (b * config.hidden_size + 8)
    # tol: bound the byte model is a count, not an estimate; what it may miss are per-token
    # scalars (a norm's rsqrt, a mask or index entry) — ≤ 2 four-byte values per token and layer, 0.1 % here —
    # while a missing tensor of the model (a norm input: 4·hidden per token and layer, ≥ 10 %; SDPA's q/k/v; the
    # LoRA inputs; a wrong dtype width) is ≥ 100 × larger
    slack = 2 * 4 * n * (prompt + width) * config.num_hidden_layers
    assert abs(predicted - overcount - meter.peak_bytes) <= slack, (predicted, overcount, meter.peak_bytes, slack)


def test_bigger_microbatch_predicts_more():
    cfg = _cfg()
    plan = plan_memory(cfg, 40 * GiB, "qwen2.5-1.5b", world_size=8)
    shape = model_shape(plan_model_config(), LoraSpec(r=64))
    s = _settings(prompt_tokens=7)
    previous = None
    for rows in (1, 2, 4, 8):
        peaks = phase_peaks(shape, s, rows_score=rows, rows_grad=rows, chunk=1024)
        if previous is not None:
            for name in ("score_base", "update_gradient", "delta_h1", "sweep"):
                assert peaks[name]["peak_bytes"] > previous[name]["peak_bytes"], (name, rows)
        previous = peaks
    assert plan["phases"]["update_gradient"]["peak_bytes"] == phase_peaks(
        shape, s, rows_score=8, rows_grad=4, chunk=1024)["update_gradient"]["peak_bytes"]  # default microbatch_grad=4
    # a longer logits chunk costs more too
    assert (phase_peaks(shape, s, rows_score=8, rows_grad=8, chunk=2048)["update_gradient"]["peak_bytes"]
            > phase_peaks(shape, s, rows_score=8, rows_grad=8, chunk=512)["update_gradient"]["peak_bytes"])


def plan_model_config():
    from probe_dist.plan import builtin_model_config

    return builtin_model_config("qwen2.5-1.5b")


def _settings(prompt_tokens: int):
    """_cfg()'s sizes in float32 on 8 GPUs with DDP: G_E = G_U = 8, 128 new tokens, no KL / real step."""
    from probe_dist.plan import Settings

    return Settings(dtype_bytes=4, world_size=8, strategy="ddp", prompt_tokens=prompt_tokens, max_new_tokens=128,
                    group_e=8, group_u=8, single_batch=False, kl=False, real_step=False, amsgrad=False,
                    accumulators_on_device=False)


def test_proposal_is_the_largest_that_fits():
    cfg = _cfg("memory.microbatch_grad=8", "memory.microbatch_score=8")
    plan = plan_memory(cfg, 24 * GiB, "qwen2.5-1.5b", world_size=8, prompt_tokens=256)
    prop, available = plan["proposal"], plan["inputs"]["available_bytes"]
    assert not plan["fits"] and prop["fits"]
    assert prop["peak_bytes"] <= available
    again = plan_memory(load_config(None, ["sampling.max_new_tokens=128", "sampling.G_E=8", "sampling.G_U=8",
                                           "distributed.strategy=ddp",
                                           f"memory.microbatch_grad={prop['microbatch_grad']}",
                                           f"memory.microbatch_score={prop['microbatch_score']}",
                                           f"memory.microbatch_jvp={prop['microbatch_jvp']}",
                                           f"memory.microbatch_generate={prop['microbatch_generate']}",
                                           f"memory.logits_chunk={prop['logits_chunk']}"]),
                        24 * GiB, "qwen2.5-1.5b", world_size=8, prompt_tokens=256)
    assert again["fits"] and again["peak_bytes"] == prop["peak_bytes"]
    # one more pass-saving step (fewer passes per group of 8) would not fit
    bigger = {1: 2, 2: 4, 4: 8}.get(prop["microbatch_grad"])
    if bigger:
        shape = model_shape(plan_model_config(), LoraSpec(r=64))
        s = _settings(prompt_tokens=256)
        too_big = phase_peaks(shape, s, rows_score=prop["microbatch_score"], rows_grad=bigger,
                              rows_jvp=prop["microbatch_jvp"], chunk=prop["logits_chunk"])
        assert too_big["update_gradient"]["peak_bytes"] > available
    # the forward-mode passes keep no graph: their microbatch is planned on its own, at least the gradient one's
    assert prop["microbatch_jvp"] >= prop["microbatch_grad"]
    bigger = {1: 2, 2: 4, 4: 8}.get(prop["microbatch_jvp"])
    if bigger:
        shape = model_shape(plan_model_config(), LoraSpec(r=64))
        too_big = phase_peaks(shape, _settings(prompt_tokens=256), rows_score=prop["microbatch_score"],
                              rows_grad=prop["microbatch_grad"], rows_jvp=bigger, chunk=prop["logits_chunk"])
        assert max(too_big[k]["peak_bytes"] for k in ("delta_h1", "explain")) > available
    assert "Largest sizes that fit" in plan["message"]


def test_too_small_a_budget_does_not_fit_and_says_why():
    plan = plan_memory(_cfg(), 8 * GiB, "qwen2.5-1.5b", world_size=8)
    assert not plan["fits"] and not plan["proposal"]["fits"]
    msg = plan["message"]
    assert "does not fit" in msg and "fsdp2" in msg and "bfloat16" in msg and "weights" in msg
    # FSDP2 over 8 GPUs shards the weights: the same budget then fits
    sharded = plan_memory(_cfg("distributed.strategy=fsdp2"), 8 * GiB, "qwen2.5-1.5b", world_size=8)
    assert sharded["proposal"]["fits"]
    # tol: exact a shard is ⌈bytes/8⌉: 8 shards hold the whole weights plus < 8 bytes of rounding up
    excess = sharded["phases"]["sample"]["components"]["weights"] * 8 - plan["phases"]["sample"]["components"]["weights"]
    assert 0 <= excess < 8, excess
    # already sharded and still too big: fsdp2 is not offered again
    tiny = plan_memory(_cfg("distributed.strategy=fsdp2"), 2 * GiB, "qwen2.5-1.5b", world_size=8)
    assert not tiny["proposal"]["fits"] and "bfloat16" in tiny["message"]
    assert "distributed.strategy=fsdp2" not in tiny["message"]


def test_plan_reads_a_checkpoint(tmp_path):
    from tests.synthetic_checkpoint import build_synthetic_checkpoint

    ckpt = build_synthetic_checkpoint(tmp_path / "ckpt", hidden=32, intermediate=64, layers=1, lora_r=3,
                                      lora_targets=("q_proj", "v_proj"), max_new_tokens=5)
    cfg = load_config(None, [f"checkpoint.path={ckpt}"])
    plan = plan_memory(cfg, 1 * GiB, world_size=1, reserve_bytes=0)
    assert plan["lora"]["r"] == 3 and plan["lora"]["source"].endswith("adapter_config.json")
    assert plan["model"]["hidden"] == 32 and plan["model"]["targets_found"] == ["q_proj", "v_proj"]
    assert plan["inputs"]["max_new_tokens"] == 5  # from training_args.json
    assert plan["inputs"]["prompt_tokens"] == 7   # the toy prompts: bos + "19+19="
    assert plan["fits"]


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 * GiB == parse_bytes("40G") == parse_bytes("40 gib")
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes(1234) == 1234 == parse_bytes("1234")
    with pytest.raises(ValueError, match="40GiB"):
        parse_bytes("forty")


def test_cli_json(capsys):
    code = main(["--gpu-mem", "40GiB", "--model-config", "qwen2.5-1.5b", "--json", "sampling.max_new_tokens=128",
                 "distributed.strategy=ddp", "--world-size", "8"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["inputs"]["world_size"] == 8


def test_cli_refuses_bad_input(capsys):
    assert main(["--model-config", "no-such-model", "--gpu-mem", "40GiB"]) == 2
    assert "unknown model config" in capsys.readouterr().err
    assert main(["--model-config", "toy"]) == 2  # no budget given
    assert "--gpu-mem" in capsys.readouterr().err
    assert main(["--model-config", "qwen2.5-1.5b", "--gpu-mem", "4GiB", "sampling.max_new_tokens=128"]) == 1
    assert "does not fit" in capsys.readouterr().out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_fit_their_gpu(preset):
    # The shape the preset's microbatches were planned for (a checkpoint's recipe gives G_U and max_new_tokens).
    cfg = load_config(REPO / "configs" / preset, ["sampling.G_U=8", "sampling.max_new_tokens=128"])
    plan = plan_memory(cfg, None, "qwen2.5-1.5b", world_size=8)  # memory.gpu_mem_gib from the preset
    assert plan["inputs"]["gpu_mem_bytes"] == int(parse_bytes(PRESETS[preset]))
    assert plan["fits"], plan["message"]
    assert not any("max_trainable_params" in n for n in plan["notes"])
    # the preset's microbatches are the planner's own proposal for 512-token prompts
    long_prompts = plan_memory(cfg, None, "qwen2.5-1.5b", world_size=8, prompt_tokens=512)
    assert long_prompts["fits"], long_prompts["message"]


def test_module_entry_point():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "probe_dist.plan", "--config", str(REPO / "configs" /
                                                                                 "a100_40gb_8gpu.yaml"),
                          "--gpu-mem", "40GiB", "--model-config", "qwen2.5-1.5b"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "update_gradient" in res.stdout and "fits" in res.stdout


def test_auto_microbatch_plan_proposes_the_sizes_and_leaves_the_config_alone():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    from probe_dist.plan import auto_microbatch_plan, proposed_sizes
    from probe_dist.toy.task import build_tokenizer

    model = get_peft_model(Qwen2ForCausalLM(_tiny_config(vocab_size=4096)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    common = ["sampling.max_new_tokens=64", "sampling.G_E=8", "sampling.G_U=8", "memory.microbatch_generate=8",
              "memory.microbatch_score=1", "memory.microbatch_grad=1", "memory.logits_chunk=4096"]
    cfg = load_config(None, common)
    assert auto_microbatch_plan(cfg, model, 1, torch.device("cpu")) is None  # CPU without a budget: OOM retry only
    assert proposed_sizes(None) is None
    # 2 GiB − 10% − 1 GiB CUDA reserve: 0.8 GiB usable
    cfg = load_config(None, [*common, "memory.gpu_mem_gib=2.0"])
    before = copy.deepcopy(cfg)
    plan = auto_microbatch_plan(cfg, model, 1, torch.device("cpu"), tokenizer=build_tokenizer())
    prop = plan["proposal"]
    assert prop["fits"] and plan["inputs"]["prompt_tokens"] == 7
    assert plan["model"]["adapter_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (prop["microbatch_score"], prop["microbatch_grad"], prop["logits_chunk"]) == (8, 8, 4096)
    assert proposed_sizes(plan) == {"microbatch_generate": 8, "microbatch_score": 8, "microbatch_grad": 8,
                                    "microbatch_jvp": 8, "logits_chunk": 4096}
    assert cfg == before  # the caller applies the sizes (main.py, with dataclasses.replace)


def test_proposal_halves_the_decode_block_until_generation_fits():
    """The decode block (memory.microbatch_generate) is halved until the sample phase's predicted peak fits, and the
    other sizes are planned within the blocks it makes; a block that fits is kept."""
    from probe_dist.plan.planner import DEFAULT_MARGIN, DEFAULT_RESERVE

    cfg = load_config(None, ["sampling.max_new_tokens=256", "sampling.G_E=1", "sampling.G_U=2",
                             "memory.microbatch_generate=1024"])
    plan = plan_memory(cfg, 80 * GiB, "qwen2.5-1.5b", world_size=1, prompt_tokens=256)
    wide = plan["phases"]["sample"]["peak_bytes"]
    # a budget the 1024-row block exceeds but a smaller one fits (the KV cache is linear in the rows)
    budget = int((wide * 0.6 + DEFAULT_RESERVE) / (1 - DEFAULT_MARGIN))
    tight = plan_memory(cfg, budget, "qwen2.5-1.5b", world_size=1, prompt_tokens=256)["proposal"]
    assert tight["fits"] and tight["microbatch_generate"] < 1024
    g = tight["microbatch_generate"]
    assert 1024 % g == 0 and g * 2 <= 1024  # halvings of the configured block
    assert tight["phases"]["sample"] <= budget * (1 - DEFAULT_MARGIN) - DEFAULT_RESERVE
    assert max(tight["microbatch_score"], tight["microbatch_grad"]) <= g  # passes stay within a block
    roomy = plan_memory(cfg, 4 * wide, "qwen2.5-1.5b", world_size=1, prompt_tokens=256)["proposal"]
    assert roomy["microbatch_generate"] == 1024  # the configured block fits: kept


@pytest.mark.parametrize("top_k,steps,rows", [(16, 12, 3), (64, 24, 2)])
def test_grade_kept_bytes_match_saved_tensors(top_k, steps, rows):
    """GRADE's update pass: the planner's kept bytes (per-step KV with gradient for policy and reference, relaxed
    tokens, the reward model's input) equal what SavedTensorsMeter holds across a real rollout + reward + backward;
    the recomputation transients come on top (not visible to the meter: checkpointing saves them by itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from probe_dist.model.policy import PolicyModel
    from probe_dist.model.reward_model import RewardModel
    from probe_dist.plan.bytes import Settings, grade_pass
    from probe_dist.runtime.meter import SavedTensorsMeter
    from probe_dist.update.grade import GradeSpec, SoftRolloutRunner, row_keys

    torch.manual_seed(0)
    config = _tiny_config(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=6)
    lm = get_peft_model(Qwen2ForCausalLM(config).eval(),
                        LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL_PROJECTIONS))).eval()
    rm_config = type(config)(**{**config.to_dict(), "num_labels": 1, "pad_token_id": 0, "tie_word_embeddings": False})
    rm = RewardModel(Qwen2ForSequenceClassification(rm_config).eval().requires_grad_(False))
    spec = GradeSpec(steps=steps, temperature=1.0, tau_g=1.0, top_k=top_k, straight_through=False, kl_coef=0.1)
    prompt = torch.arange(3, 12)
    with SavedTensorsMeter() as meter:
        roll = SoftRolloutRunner(PolicyModel(lm), lm.disable_adapter, spec).rollout(prompt, row_keys(0, "U", 0,
                                                                                                  range(rows)))
        (rm(prompt, roll.tokens).sum() + roll.kl.sum()).backward()
    shape = model_shape(config, LoraSpec(r=8, targets=tuple(ALL_PROJECTIONS)))
    s = Settings(dtype_bytes=4, world_size=1, strategy="none", prompt_tokens=prompt.numel(), max_new_tokens=steps,
                 group_e=4, group_u=rows, single_batch=False, kl=True, real_step=False, amsgrad=False,
                 accumulators_on_device=False, grade_top_k=top_k)
    parts = grade_pass(shape, s, rows)
    kept = parts["grade_kv_cache"] + parts["grade_soft_tokens"] + parts["grade_reward_input"]
    # tol: bound a count; the planner leaves out the rollout's integer bookkeeping — int64 ids
    # (and as many indices) over [rows, prompt + steps + 1], 16 bytes per entry (~0.7 % here) — while one missing
    # step of KV, the reference's cache or the soft tokens is ≥ 1/steps ≥ 4 % of the total
    slack = 16 * rows * (prompt.numel() + steps + 1)
    assert abs(kept - meter.peak_bytes) <= slack, (parts, meter.peak_bytes, slack)
    assert parts["grade_recompute"] > 0


def test_nested_delta_h1_moves_the_nested_pass_from_explain_to_delta_h1():
    """With the explanation on (float32, two-batch mode) δH₁ runs the explanation's nested pass: the δH₁ phase is
    planned at four copies of a no-grad forward's tensors (primal and three tangents) instead of two, and the
    explain phase no longer holds E's nested pass (only ∇Ĥ's gradient pass and U's first-order one)."""
    import dataclasses

    from probe_dist.plan.bytes import _nograd_forward

    shape = model_shape(plan_model_config(), LoraSpec(r=64))
    s = dataclasses.replace(_settings(prompt_tokens=7), explain=True)
    nested = dataclasses.replace(s, nested_delta_h1=True)
    kw = dict(rows_score=8, rows_grad=4, rows_jvp=4, chunk=1024)
    sep, shared = phase_peaks(shape, s, **kw), phase_peaks(shape, nested, **kw)
    forward = sum(_nograd_forward(shape, s, 4, 1024).values())
    # tol: exact the byte model is a count: two more tangent copies of the same forward's tensors
    assert shared["delta_h1"]["peak_bytes"] - sep["delta_h1"]["peak_bytes"] == 2 * forward
    assert shared["explain"]["peak_bytes"] <= sep["explain"]["peak_bytes"]
    assert sep["explain"]["peak_bytes"] >= shared["delta_h1"]["peak_bytes"]  # the nested pass was explain's
    cfg = _cfg()
    plan_on = plan_memory(cfg, 40 * GiB, "qwen2.5-1.5b", world_size=8)
    assert plan_on["phases"]["delta_h1"]["peak_bytes"] > plan_memory(
        _cfg("estimators.explain=false"), 40 * GiB, "qwen2.5-1.5b", world_size=8)["phases"]["delta_h1"]["peak_bytes"]
