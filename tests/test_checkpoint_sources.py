"""Real checkpoints in: TRL / HF Trainer checkpoint-N and accelerate save_state folders, written by the real
trainers in a subprocess (tests/helpers/train_trl.py, train_accelerate.py), probed from their paths.

Independent references: TRL's own GRPOConfig (training_args.bin unpickled here, in the test, where the file is ours)
for the recipe; HF Trainer's own resume path (create_optimizer_and_scheduler + _load_optimizer_and_scheduler) and
peft's create_loraplus_optimizer for the AdamW that one real step is taken with; torch's scheduler state for eta_train.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cli
from tests.tolerances import unit_roundoff

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "helpers"
REWARD = "sampling.reward=tests.helpers.rewards:reward_length"  # every group's rewards differ: a nonzero gradient
SMALL = ["device=cpu", "sampling.B_E=4", "sampling.G_E=2", "sampling.B_U=4", "estimators.etas=[0,1e-5]",
         "estimators.explain=false", "output.plots=false", REWARD]

# The TRL, accelerate and DeepSpeed fixtures train real checkpoints (a minute each): those tests are slow; the
# checks of the reader's pieces on hand-built optimizers are the fast tier's.


def _train(script: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(HELPERS / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module", params=["default", "loraplus", "full"])
def trl_checkpoint(request, toy_checkpoint, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"trl-{request.param}")
    flags = {"loraplus": ["--loraplus"], "full": ["--full"]}.get(request.param, [])
    _train("train_trl.py", str(toy_checkpoint / "base"), str(toy_checkpoint / "tokenizer"), str(out), *flags)
    return request.param, out / "checkpoint-2"


def trl_args(ckpt: Path):
    """TRL's own GRPOConfig, unpickled normally (this test wrote the file: it is trusted here, not in the probe)."""
    return torch.load(str(ckpt / "training_args.bin"), weights_only=False)


@pytest.mark.slow
def test_trl_checkpoint_probed_from_its_path_alone(trl_checkpoint, tmp_path):
    variant, ckpt = trl_checkpoint
    out = tmp_path / "out"
    proc = run_cli([f"checkpoint.path={ckpt}", f"output.dir={out}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restore/verified"] is True
    assert summary["provenance/checkpoint_source"]["format"] == "hf_trainer"
    args = trl_args(ckpt)
    settings = {k: v["value"] for k, v in summary["provenance/settings"].items()}
    origins = {k: v["origin"] for k, v in summary["provenance/settings"].items()}
    expected = {"sampling.temperature": args.temperature, "sampling.max_new_tokens": args.max_completion_length,
                "update.loss": args.loss_type, "update.grad_clip": args.max_grad_norm, "update.kl_coef": args.beta,
                "update.scale_rewards": args.scale_rewards, "update.mask_truncated": args.mask_truncated_completions,
                "update.top_entropy_quantile": args.top_entropy_quantile, "update.entropy_coef": args.entropy_coef,
                "update.kl_bias_correction": args.use_bias_correction_kl,
                "update.autocast": "bfloat16" if args.bf16 else "none",
                "update.loss_block_rows": args.per_device_train_batch_size, "sampling.G_U": args.num_generations,
                "update.epsilon_high": args.epsilon_high if args.epsilon_high is not None else args.epsilon,
                "update.adv_eps": 1e-4}
    assert {k: settings[k] for k in expected} == expected
    assert all(origins[k].startswith("checkpoint") for k in expected), origins
    assert settings["update.kl_coef"] == (0.02 if variant == "default" else 0.0)
    assert (summary["provenance/checkpoint_source"]["adapter"] is None) == (variant == "full")
    # The lr of the next training step (the scheduler's), marked and measured.
    scheduler = torch.load(str(ckpt / "scheduler.pt"), weights_only=True)
    assert summary["eta_train"] == scheduler["_last_lr"][0] > 0
    assert summary["eta_train"] in [p["eta"] for p in summary["sweep"]]
    ratios = [lr / scheduler["_last_lr"][0] for lr in scheduler["_last_lr"]]
    # tol: fp one float64 division of the same saved lrs on each side: ≤ 2 u₆₄ apart; 16 = LoRA+'s ratio to 1e-6
    assert summary["provenance/lr_ratios"] == pytest.approx(ratios, rel=1e-12)
    if variant == "loraplus":
        assert summary["provenance/lr_ratios"][2] == pytest.approx(16.0)
        assert summary["provenance/optimizer_coverage"]["naming"] == "peft LoRA+"
    else:
        assert summary["provenance/optimizer_coverage"]["naming"].startswith("HF Trainer")
    if variant == "full":  # both of HF Trainer's groups are in use: matrices decay, norms and biases do not
        groups = torch.load(str(ckpt / "optimizer.pt"), weights_only=True)["param_groups"]
        assert all(g["params"] for g in groups) and [g["weight_decay"] for g in groups] == [0.01, 0.0]


def _rebuilt_trainer_optimizer(variant: str, ckpt: Path, toy: Path, tmp_path: Path):
    """The optimizer HF Trainer would resume from `ckpt`: its own create_optimizer_and_scheduler (or LoRA+'s
    optimizer handed to it, as in training) then _load_optimizer_and_scheduler(ckpt)."""
    from datasets import Dataset
    from peft import PeftModel
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOTrainer

    args = trl_args(ckpt)
    args.output_dir, args.beta = str(tmp_path / "resume"), 0.0  # β only adds a reference model; not the optimizer
    if variant == "full":
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(toy / "base"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
    optimizers = (None, None)
    if variant == "loraplus":
        optimizers = (create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                                weight_decay=0.01), None)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
                          processing_class=PreTrainedTokenizerFast.from_pretrained(str(ckpt)),
                          optimizers=optimizers)
    trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    trainer._load_optimizer_and_scheduler(str(ckpt))
    return trainer.model, trainer.optimizer


def _assert_step_is_u(trainable: dict, before: dict, u: dict) -> None:
    """θ' − θ of the real fp32 step equals the probe's u (float64) up to the step's own rounding."""
    names = list(u)
    num = sum(float(((trainable[n].detach().double() - before[n]) - u[n]).pow(2).sum()) for n in names)
    den = sum(float(u[n].pow(2).sum()) for n in names)
    theta = sum(float(before[n].pow(2).sum()) for n in names) ** 0.5
    assert den > 0, "u = 0 would not test the step"
    rel = (num / den) ** 0.5
    # tol: fp the fp32 step θ' = θ − lr·(m̂/(√v̂+ε) + wd·θ) rounds each coordinate at |θ| + |Δθ| in ~16 fp32
    # operations, and θ' − θ is read back in fp32: relative error ≤ 16·u₃₂·(1 + ‖θ‖/‖u‖). A missing bias
    # correction, a wrong lr ratio or a stale moment is off by ≥ 1e-2.
    bound = 16 * unit_roundoff(torch.float32) * (1 + theta / den ** 0.5)
    print(f"relative L2 |u - reference| / |u| = {rel:.3g} (bound {bound:.3g})")
    assert rel <= bound, (rel, bound)


@pytest.mark.slow
def test_u_is_one_real_step_of_the_rebuilt_adamw(trl_checkpoint, toy_checkpoint, tmp_path):
    """u from checkpoint-N = (θ after one real step of the AdamW HF Trainer resumes from it, on the probe's
    gradient, first group's lr 1 and the other groups at their saved ratios) − θ; ≤ 1e-6 relative, fp32."""
    from tests.probe_harness import make_probe

    variant, ckpt = trl_checkpoint
    # Precondition, built: a non-zero gradient. The length reward differs within a group only when its responses
    # do; a sharp toy (or the full fine-tune's) can give every U group identical responses for one run seed, so
    # search the run seed (each run < 1 s) for one whose gradient is non-zero, and assert it was found.
    for seed in range(1234, 1234 + 16):
        probe = make_probe(ckpt, ["sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=4", "estimators.etas=[0]",
                                  "estimators.explain=false", REWARD, f"sampling.seed={seed}"])
        res = probe.run()
        names = [n for n, _ in probe.trainable]
        u = dict(zip(names, res.update.u))
        grad = dict(zip(names, res.update.grad))
        if any(bool((g != 0).any()) for g in grad.values()):
            break
    else:
        pytest.fail("16 run seeds gave an exactly zero gradient: the step cannot be tested on this checkpoint")
    model, optimizer = _rebuilt_trainer_optimizer(variant, ckpt, toy_checkpoint, tmp_path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(names)
    first = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] / first  # η = 1 for the first group, the saved ratios for the others
    before = {n: p.detach().double().clone() for n, p in trainable.items()}
    for n, p in trainable.items():
        p.grad = grad[n].to(p.dtype)
    optimizer.step()
    _assert_step_is_u(trainable, before, u)
    if variant == "loraplus":  # the ratio is really applied: B moves at 16× the first group's lr
        # tol: fp 16·lr/lr in float64: exact to a few u₆₄, far inside approx's 1e-6
        assert optimizer.param_groups[2]["lr"] == pytest.approx(16.0)


@pytest.mark.slow
def test_base_named_by_hub_id_needs_checkpoint_base(trl_checkpoint, toy_checkpoint, tmp_path):
    variant, ckpt = trl_checkpoint
    if variant != "default":
        pytest.skip("one variant suffices")
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "probe-dist-tests/no-such-model"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    proc = run_cli([f"checkpoint.path={copy}", f"output.dir={tmp_path / 'a'}", *SMALL])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "probe-dist-tests/no-such-model" in proc.stderr and "checkpoint.base=" in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = run_cli([f"checkpoint.path={copy}", f"checkpoint.base={toy_checkpoint / 'base'}",
                    f"output.dir={tmp_path / 'b'}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_trl_ref_adapter_with_kl_is_refused(trl_checkpoint, tmp_path):
    """TRL 1.16 handed a peft model with β > 0 keeps its starting adapter as the KL reference and saves it as ref/
    (adapter_config.json + weights) in every checkpoint-N; the probe's reference (the adapter disabled) would differ,
    so it refuses unless the KL term is off or the user says so. (The LoRA+ fixture trains with β = 0, so ref/ is
    written here as TRL writes it: a copy of the adapter folder.)"""
    variant, ckpt = trl_checkpoint
    if variant != "loraplus":
        pytest.skip("one variant suffices")
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, copy)
    (copy / "ref").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(copy / name, copy / "ref" / name)
    proc = run_cli([f"checkpoint.path={copy}", "update.kl_coef=0.04", f"output.dir={tmp_path / 'a'}", *SMALL])
    assert proc.returncode == 2 and "KL reference adapter" in proc.stderr and "update.kl_coef=0" in proc.stderr
    proc = run_cli([f"checkpoint.path={copy}", f"output.dir={tmp_path / 'b'}", *SMALL])  # β = 0 recorded: fine
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_crafted_training_args_bin_never_runs(trl_checkpoint, tmp_path):
    """training_args.bin is read by a recording unpickler: a payload that would run code on torch.load does not."""
    from tests.test_pickle_safety import TouchViaExec, TouchViaSystem

    variant, ckpt = trl_checkpoint
    if variant != "default":
        pytest.skip("one variant suffices")
    for payload in (TouchViaSystem, TouchViaExec):
        copy = tmp_path / payload.__name__
        shutil.copytree(ckpt, copy)
        marker = tmp_path / f"{payload.__name__}.ran"
        args = trl_args(ckpt)
        args.temperature = payload(marker)  # a field whose value would run code when unpickled normally
        torch.save(args, str(copy / "training_args.bin"))
        top = copy / "top"
        shutil.copytree(ckpt, top, dirs_exist_ok=True)
        torch.save(payload(marker), str(top / "training_args.bin"))  # the whole file is the payload
        for where in (copy, top):
            proc = run_cli([f"checkpoint.path={where}", f"output.dir={tmp_path / 'out'}", *SMALL])
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert not marker.exists(), "the payload ran"
            if where == top:
                assert "would call" in proc.stderr and "nothing was run" in proc.stderr
        shutil.rmtree(top)


@pytest.mark.slow
def test_accelerate_state_probed_and_u_is_one_real_step(toy_checkpoint, tmp_path):
    """An accelerate save_state folder (LoRA, peft's LoRA+ AdamW at lr ratio 4): probed with checkpoint.base and
    checkpoint.adapter; u equals one real step of the AdamW rebuilt as the script built it and loaded from
    optimizer.bin, on the probe's gradient; a wrong base is refused, and so is a hand-made grouping no rule
    reproduces."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers.train_accelerate import loraplus
    from tests.probe_harness import make_probe

    _train("train_accelerate.py", str(toy_checkpoint / "base"), str(tmp_path))
    state, adapter = tmp_path / "state", tmp_path / "adapter"
    recipe = ["sampling.temperature=1.0", "sampling.max_new_tokens=3", "update.loss=grpo", "update.grad_clip=1.0"]
    common = [f"checkpoint.path={state}", f"checkpoint.adapter={adapter}",
              f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}", *recipe]
    proc = run_cli([*common, f"output.dir={tmp_path / 'out'}", *SMALL])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["provenance/checkpoint_source"]["format"] == "accelerate" and summary["restore/verified"] is True
    # tol: fp lr ratios are float64 divisions of the saved lrs (a few u₆₄); the schedule's 1 − 2/10 likewise
    assert summary["provenance/lr_ratios"] == pytest.approx([1.0, 1e-6 / 1e-3, 4.0, 4.0])
    assert summary["eta_train"] == pytest.approx(1e-3 * (1 - 2 / 10)) and summary["eta_train"] in [
        p["eta"] for p in summary["sweep"]]

    probe = make_probe(state, [f"checkpoint.adapter={adapter}", f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}",
                               *recipe, "sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=4", "estimators.etas=[0]",
                               "estimators.explain=false", REWARD])
    res = probe.run()
    names = [n for n, _ in probe.trainable]
    u, grad = dict(zip(names, res.update.u)), dict(zip(names, res.update.grad))
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(str(toy_checkpoint / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    model.load_state_dict(load_file(str(state / "model.safetensors")), strict=False)
    optimizer = loraplus(model)
    optimizer.load_state_dict(torch.load(str(state / "optimizer.bin"), weights_only=True))
    first = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] /= first
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().double().clone() for n, p in trainable.items()}
    for n, p in trainable.items():
        assert torch.equal(p.detach().double(), probe.runner.trainable[names.index(n)][1].detach().double()), n
        p.grad = grad[n].float()
    optimizer.step()
    _assert_step_is_u(trainable, before, u)

    wrong = tmp_path / "wrong_base"
    shutil.copytree(toy_checkpoint / "base", wrong)
    from safetensors.torch import load_file as load
    from safetensors.torch import save_file

    weights = load(str(wrong / "model.safetensors"))
    key = next(k for k in weights if "layers.0.mlp.down_proj" in k)
    weights[key] = weights[key] + 0.01
    save_file(weights, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    proc = run_cli([*common, f"checkpoint.base={wrong}", f"output.dir={tmp_path / 'bad'}", *SMALL])
    assert proc.returncode == 2 and "is not the model this accelerate state was trained from" in proc.stderr

    custom = tmp_path / "custom"
    _train("train_accelerate.py", str(toy_checkpoint / "base"), str(custom), "--custom-groups")
    proc = run_cli([f"checkpoint.path={custom / 'state'}", f"checkpoint.adapter={custom / 'adapter'}",
                    f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}", *recipe, f"output.dir={tmp_path / 'c'}",
                    *SMALL])
    assert proc.returncode == 2 and "no known way of building the optimizer fits it" in proc.stderr
    assert "param_names" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_checkpoint(request, toy_checkpoint, tmp_path_factory) -> tuple[int, Path]:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HELPERS / "train_deepspeed.py"), str(toy_checkpoint), str(request.param), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, out


@pytest.mark.slow
def test_zero_checkpoint_gives_the_u_of_the_same_state_in_probe_layout(zero_checkpoint, toy_checkpoint, tmp_path):
    """A ZeRO-2/3 checkpoint of a 2-rank gloo DeepSpeed run (read through DeepSpeed's ds_to_universal) and the same
    trained state written in probe_dist's layout from DeepSpeed's safe_get_full_* API give the same u (≤ 1e-6), the
    same lr ratios, and θ from the fp32 master weights."""
    from safetensors.torch import load_file

    stage, out = zero_checkpoint
    common = [*SMALL, "output.save_update_vector=true"]
    zero = run_cli([f"checkpoint.path={out / 'ds'}", f"checkpoint.base={toy_checkpoint / 'base'}",
                    f"checkpoint.adapter={out / 'ds' / 'adapter'}", f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}",
                    f"output.dir={tmp_path / 'zero'}", *common])
    assert zero.returncode == 0, zero.stderr[-4000:]
    layout = run_cli([f"checkpoint.path={out / 'probe'}", f"output.dir={tmp_path / 'layout'}", *common])
    assert layout.returncode == 0, layout.stderr[-4000:]
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in ("zero", "layout")}
    assert summaries["zero"]["provenance/checkpoint_source"]["format"] == "deepspeed"
    assert summaries["zero"]["restore/verified"] is True
    # tol: fp float64 divisions of the saved lrs (a few u₆₄)
    assert summaries["zero"]["provenance/lr_ratios"] == pytest.approx([1.0, 4.0])
    assert summaries["zero"]["provenance/lr_ratios"] == summaries["layout"]["provenance/lr_ratios"]
    assert summaries["zero"]["entropy/base"] == summaries["layout"]["entropy/base"]  # same θ: the same samples and scores
    u_zero, u_layout = (load_file(str(tmp_path / k / "update_vector.safetensors")) for k in ("zero", "layout"))
    assert set(u_zero) == set(u_layout) and len(u_zero) == 8
    num = sum(float((u_zero[k].double() - u_layout[k].double()).pow(2).sum()) for k in u_zero)
    den = sum(float(u_layout[k].double().pow(2).sum()) for k in u_layout)
    print(f"ZeRO-{stage}: relative L2 |u_zero - u_layout| / |u_layout| = {(num / den) ** 0.5:.3g}")
    # tol: fp both runs start from the same θ (entropy/base equal above) and the same fp32 moments, read through
    # two code paths; u is computed in float64 from them, so the paths may differ only by the fp32 rounding of a
    # moment re-assembled from shards (≤ u₃₂ = 6e-8 relative): 1e-6 catches a missing shard or wrong lr (≥ 1e-2)
    assert den > 0 and (num / den) ** 0.5 <= 1e-6, (num / den) ** 0.5

    # As HF Trainer + DeepSpeed lays out checkpoint-N: the adapter and tokenizer files next to global_stepN/;
    # then the path alone suffices (the base from adapter_config.json).
    trainer_like = tmp_path / "checkpoint-2"
    shutil.copytree(out / "ds", trainer_like)
    for f in (out / "ds" / "adapter").iterdir():
        shutil.copy(f, trainer_like / f.name)
    for f in (toy_checkpoint / "tokenizer").iterdir():
        shutil.copy(f, trainer_like / f.name)
    proc = run_cli([f"checkpoint.path={trainer_like}", f"output.dir={tmp_path / 'trainer'}", *common])
    assert proc.returncode == 0, proc.stderr[-4000:]
    u_trainer = load_file(str(tmp_path / "trainer" / "update_vector.safetensors"))
    assert all(torch.equal(u_trainer[k], u_zero[k]) for k in u_zero)


@pytest.mark.slow
def test_zero_checkpoint_that_would_run_code_is_refused(zero_checkpoint, toy_checkpoint, tmp_path):
    """DeepSpeed's own loaders use torch.load(weights_only=False); through the probe every one is weights_only with
    a three-class allow-list, so a shard carrying a payload is refused and the payload never runs."""
    from tests.test_pickle_safety import TouchViaSystem

    stage, out = zero_checkpoint
    if stage != 2:
        pytest.skip("one stage suffices")
    copy = tmp_path / "ds"
    shutil.copytree(out / "ds", copy)
    marker = tmp_path / "ran"
    shard = next((copy / "global_step2").glob("zero_pp_rank_0_*optim_states.pt"))
    blob = torch.load(str(shard), weights_only=False)  # our own file, written by the fixture
    blob["payload"] = TouchViaSystem(marker)
    torch.save(blob, str(shard))
    proc = run_cli([f"checkpoint.path={copy}", f"checkpoint.base={toy_checkpoint / 'base'}",
                    f"checkpoint.adapter={copy / 'adapter'}", f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}",
                    f"output.dir={tmp_path / 'out'}", *SMALL])
    assert proc.returncode == 2 and "would run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["model_states", "optim_states"])
def test_zero_checkpoint_files_are_read_within_bounds(zero_checkpoint, toy_checkpoint, tmp_path, where):
    """The reading bounds (state.bounds) hold inside DeepSpeed's own loaders too: a shared-reference bomb in the
    model states (read by the probe) or in a ZeRO shard (read by ds_to_universal) is refused with exit 2, within
    the bounds of tests/test_bounded_readers.py, the checkpoint untouched."""
    from tests.test_bounded_readers import assert_refused, shared_reference_bomb

    stage, out = zero_checkpoint
    if stage != 2:
        pytest.skip("one stage suffices")
    copy = tmp_path / "ds"
    shutil.copytree(out / "ds", copy)
    pattern = "mp_rank_00_model_states.pt" if where == "model_states" else "zero_pp_rank_0_*optim_states.pt"
    shard = next((copy / "global_step2").glob(pattern))
    blob = torch.load(str(shard), weights_only=False)  # our own file, written by the fixture
    blob["hostile"] = shared_reference_bomb(40)
    torch.save(blob, str(shard))
    assert_refused(copy, tmp_path, shard.name, "shared references are expanded",
                   extra=(f"checkpoint.base={toy_checkpoint / 'base'}", f"checkpoint.adapter={copy / 'adapter'}",
                          f"checkpoint.tokenizer={toy_checkpoint / 'tokenizer'}"))


# ----------------------------------------------------------------------------------------------- unit checks


def _two_group_optimizer(dtype=torch.float32, state_dtype=None):
    """A tiny model (two linear layers) and an AdamW with one real step taken, groups at lr 1e-3 and 16e-3."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if n.startswith("0.")], "lr": 1e-3},
                                   {"params": [p for n, p in named if n.startswith("1.")], "lr": 16e-3}],
                                  weight_decay=0.01)
    model(torch.randn(5, 4, dtype=dtype)).square().sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    if state_dtype is not None:
        for st in state["state"].values():
            st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].to(state_dtype), st["exp_avg_sq"].to(state_dtype)
            if state_dtype == torch.float32 and dtype != torch.float32:  # fp32 bits a bf16 copy cannot hold
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"] * (1 + 2 ** -12), st["exp_avg_sq"] * (1 + 2 ** -12)
    return model, named, state


def test_moments_keep_their_saved_dtype_and_groups_their_lr_ratio(tmp_path, caplog):
    """A bf16 model with fp32 moments (a bf16 full fine-tune): the moments stay fp32, bit for bit; u per group is the
    float64 AdamW formula on them, scaled by the group's lr ratio; real_step moves each group by its ratio too."""
    from probe_dist.state.optimizer import load_optimizer, set_lr_ratios
    from probe_dist.update.step import real_step, update_parts

    model, named, state = _two_group_optimizer(torch.bfloat16, state_dtype=torch.float32)
    path = tmp_path / "optimizer.pt"
    names = [n for n, _ in named]
    torch.save({"optimizer_class": "AdamW", "param_names": names, "state_dict": state}, str(path))
    optimizer, coverage = load_optimizer(path, named)
    assert coverage["state_dtypes"] == ["float32"]
    for pid, (_, p) in enumerate(named):
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], state["state"][pid]["exp_avg_sq"])
    assert set_lr_ratios(optimizer) == [1.0, 16.0]
    grad = [torch.randn(p.shape, dtype=torch.float64) for _, p in named]
    parts = update_parts(optimizer, named, grad)
    for pid, ((_, p), g, part) in enumerate(zip(named, grad, parts)):
        st, ratio = state["state"][pid], (1.0 if pid < 2 else 16.0)
        t, (b1, b2) = float(st["step"]) + 1, (0.9, 0.999)
        m = b1 * st["exp_avg"].double() + (1 - b1) * g
        v = b2 * st["exp_avg_sq"].double() + (1 - b2) * g * g
        u = -0.01 * p.detach().double() - (m / (1 - b1 ** t)) / (v.sqrt() / (1 - b2 ** t) ** 0.5 + 1e-8)
        # tol: fp the same float64 formula on the same fp32 moments, evaluated in another order: ~10 u₆₄ relative
        torch.testing.assert_close(part.u, ratio * u, rtol=1e-12, atol=0)

    # real_step: fp32 model and moments (torch's AdamW needs one dtype), lr 1 for the first group.
    model, named, state = _two_group_optimizer()
    torch.save({"optimizer_class": "AdamW", "param_names": names, "state_dict": state}, str(path))
    optimizer, _ = load_optimizer(path, named)
    set_lr_ratios(optimizer)
    parts = update_parts(optimizer, named, grad)
    before = [p.detach().double().clone() for _, p in named]
    real_step(optimizer, named, grad, 1.0)
    for (_, p), b, part in zip(named, before, parts):
        # tol: fp an fp32 step of size |u| ≈ 1 at lr 1 on |θ| ≲ 3: θ' − θ rounds at ~16·u₃₂·(|θ| + |u|) ≈ 4e-6 abs;
        # rtol 1e-5 + atol 1e-6 covers it, while the group's ratio (16×) or a missing bias correction is O(1)
        torch.testing.assert_close(p.detach().double() - b, part.u, rtol=1e-5, atol=1e-6)

    low = tmp_path / "low.pt"
    _, _, state = _two_group_optimizer(state_dtype=torch.bfloat16)
    torch.save({"optimizer_class": "AdamW", "param_names": names, "state_dict": state}, str(low))
    with caplog.at_level("WARNING", logger="probe_dist"):
        load_optimizer(low, _two_group_optimizer()[1])
    assert "stored in bfloat16" in caplog.text


def test_lr_ratios_from_the_schedule_when_the_saved_lr_is_zero():
    from probe_dist.state.optimizer import set_lr_ratios

    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [p], "lr": 0.0}, {"params": [q], "lr": 0.0}])
    # tol: fp float64 divisions of the lrs (a few u₆₄)
    assert set_lr_ratios(optimizer, base_lrs=[1e-3, 4e-3]) == pytest.approx([1.0, 4.0])
    for g, lr in zip(optimizer.param_groups, (2e-4, 2e-3)):
        g["initial_lr"] = lr  # what torch schedulers record
    assert set_lr_ratios(optimizer) == pytest.approx([1.0, 10.0])
    for g in optimizer.param_groups:
        del g["initial_lr"]
    assert set_lr_ratios(optimizer) == [1.0, 1.0]  # nothing recorded: same η (and a warning)


def test_names_rebuilt_only_when_a_rule_fits(tmp_path):
    """A bare state dict: names by the grouping rule whose group sizes and shapes match; none fits: refused."""
    from probe_dist.errors import CheckpointError
    from probe_dist.state.optimizer import name_optimizer_blob
    from probe_dist.state.param_names import rebuild_names

    model, named, state = _two_group_optimizer()
    for p in model[1].parameters():
        p.requires_grad_(False)  # only the first layer trains
    model.zero_grad(set_to_none=True)
    one = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 4)).sum().backward()
    one.step()
    restricted, names, rule = rebuild_names(one.state_dict(), model)
    assert names == ["0.weight", "0.bias"] and rule in ("HF Trainer (decay, no-decay)",
                                                         "one group of trainable parameters")
    every = torch.optim.AdamW(model.parameters())  # frozen parameters in the group, without state
    model.zero_grad(set_to_none=True)
    model(torch.randn(3, 4)).sum().backward()
    every.step()
    restricted, names, rule = rebuild_names(every.state_dict(), model)
    assert names == ["0.weight", "0.bias"] and rule == "one group of all parameters"
    assert [len(g["params"]) for g in restricted["param_groups"]] == [2]
    three = {"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}, {"params": []}]}
    with pytest.raises(CheckpointError, match="cannot be rebuilt from the model.*no known way"):
        name_optimizer_blob({"optimizer_class": None, "param_names": None, "state_dict": three}, model,
                            tmp_path / "optimizer.pt")


def test_scheduler_values_are_checked(tmp_path, caplog):
    """A scheduler lr that is not a finite number >= 0 is refused (it would enter the sweep as eta_train or flip a
    group's update); a file without scheduler keys is ignored with a warning."""
    from probe_dist.errors import CheckpointError
    from probe_dist.state.source import read_scheduler

    path = tmp_path / "scheduler.pt"
    for bad in ([-1.0, 1e-3], [float("nan"), 1e-3]):
        torch.save({"base_lrs": [1e-3, 1e-3], "_last_lr": bad}, str(path))
        with pytest.raises(CheckpointError, match="_last_lr=.*not a list of finite learning rates >= 0"):
            read_scheduler(path)
    torch.save({"base_lrs": [1e-3, -16e-3], "_last_lr": [0.0, 0.0]}, str(path))
    with pytest.raises(CheckpointError, match="base_lrs"):
        read_scheduler(path)
    torch.save({"foo": 1}, str(path))
    with caplog.at_level("WARNING", logger="probe_dist"):
        assert read_scheduler(path) is None
    assert "not a torch lr scheduler" in caplog.text
    torch.save({"base_lrs": [1e-3, 4e-3], "_last_lr": [5e-4, 2e-3]}, str(path))
    state = read_scheduler(path)
    assert (state.base_lrs, state.next_lrs) == ([1e-3, 4e-3], [5e-4, 2e-3])


def test_pieces_from_different_saves_are_warned_about(tmp_path):
    """AdamW's step vs trainer_state's global step, group lrs vs the scheduler's, the decay group's weight decay vs
    the recipe: each mismatch is named; a consistent checkpoint gives none."""
    from probe_dist.state.optimizer import load_optimizer
    from probe_dist.state.paths import CheckpointPaths
    from probe_dist.state.source import CheckpointSource, SchedulerState

    model, named, state = _two_group_optimizer()
    path = tmp_path / "optimizer.pt"
    torch.save({"optimizer_class": "AdamW", "param_names": [n for n, _ in named], "state_dict": state}, str(path))
    optimizer, _ = load_optimizer(path, named)

    def source(global_step, next_lrs, decay):
        paths = CheckpointPaths(base=tmp_path, adapter=None, optimizer=path, tokenizer=tmp_path,
                                training_args={"weight_decay": decay})
        return CheckpointSource("hf_trainer", paths, scheduler=SchedulerState(path, next_lrs=next_lrs),
                                trainer_state={"global_step": global_step})

    assert source(1, [1e-3, 16e-3], 0.01).consistency_warnings(optimizer, "HF Trainer (decay, no-decay)") == []
    found = source(3, [5e-4, 16e-3], 0.1).consistency_warnings(optimizer, "HF Trainer (decay, no-decay)")
    assert len(found) == 3 and "global step 3" in found[0] and "scheduler" in found[1] and "0.1" in found[2]


@pytest.mark.slow
def test_planner_reads_the_checkpoint_shape_and_recipe(trl_checkpoint):
    """The planner plans a checkpoint without an adapter as a full fine-tune, and U's group size from the recipe."""
    from probe_dist.config import load_config
    from probe_dist.plan import plan_memory

    variant, ckpt = trl_checkpoint
    if variant == "loraplus":
        pytest.skip("two variants suffice")
    plan = plan_memory(load_config(None, [f"checkpoint.path={ckpt}"]), 2 * 2 ** 30)
    assert plan["inputs"]["G_U"] == trl_args(ckpt).num_generations
    assert (plan["lora"]["r"] == 0) == (variant == "full")


def test_an_adapter_that_names_no_base_is_refused_not_read_from_the_working_directory(tmp_path, monkeypatch):
    """An empty base_model_name_or_path (an accelerate or TRL adapter saved without it) is refused with the fix;
    Path("") is the working directory, which must never be taken for the base model."""
    from probe_dist.errors import CheckpointError
    from probe_dist.state.source import local_base

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a working directory that would pass for a model folder
    with pytest.raises(CheckpointError, match="does not name its base model.*checkpoint.base"):
        local_base("", "adapter config in 'ckpt'")
