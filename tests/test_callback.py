"""The online probe (probe_dist.callback.EntropyProbeCallback) inside a real TRL GRPOTrainer on CPU.

Two 6-step LoRA trainings of the toy base, one plain and one probed every 2 steps (tests/helpers/
train_trl_online.py, each a subprocess as a user would run it): training is bitwise the same, the numbers reach
`log_history` and tensorboard, the real step matches the rebuilt AdamW step to the parameters' rounding, and δH₁
equals the offline probe's on the step's saved state. The refusals run on real TrainingArguments and optimizers.
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "helpers" / "train_trl_online.py"
STEPS, EVERY, SAVED = 6, 2, 4
# Wall-clock fields of TRL's and HF Trainer's logs: measurements of the run, not of training.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _train(toy: Path, out: Path, *flags: str, launcher: tuple[str, ...] = ()) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    cmd = [*launcher, str(HELPER)] if launcher else [sys.executable, str(HELPER)]
    proc = subprocess.run([*cmd, str(toy / "base"), str(toy / "tokenizer"), str(out), "--steps", str(STEPS), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(toy_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    _train(toy_checkpoint, root / "plain")
    _train(toy_checkpoint, root / "probed", "--probe-every", str(EVERY), "--tensorboard", "--save-step", str(SAVED))
    return root


def _log(run: Path) -> list[dict]:
    return json.loads((run / "log_history.json").read_text())


def _probe_entries(run: Path) -> dict[int, dict]:
    return {e["step"]: e for e in _log(run) if "entropy_probe/delta_h1" in e}


@pytest.mark.slow
def test_training_with_the_probe_is_bitwise_the_training_without(runs):
    plain, probed = runs / "plain", runs / "probed"
    a, b = load_file(str(plain / "final_adapter.safetensors")), load_file(str(probed / "final_adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tol: exact
    oa, ob = (torch.load(str(r / "final_optimizer.pt"), weights_only=True) for r in (plain, probed))
    assert oa["param_groups"] == ob["param_groups"]
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])
    # The trainer's own log entries (losses, rewards, lr, grad norm) are the same entries at the same steps.
    ours = [{k: v for k, v in e.items() if k not in TIMING} for e in _log(plain)]
    theirs = [{k: v for k, v in e.items() if k not in TIMING} for e in _log(probed)
              if not any(k.startswith("entropy_probe/") for k in e)]
    assert ours == theirs and sum("loss" in e for e in ours) == STEPS


@pytest.mark.slow
def test_numbers_reach_log_history_and_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    entries = _probe_entries(runs / "probed")
    assert sorted(entries) == list(range(EVERY, STEPS + 1, EVERY))
    for step, e in entries.items():
        for key in ("delta_h1", "delta_h_true", "delta_h1_se", "delta_h_true_se", "ratio", "ess_frac", "eta",
                    "update_match", "seconds", "entropy"):
            assert math.isfinite(e[f"entropy_probe/{key}"]), (step, key, e)
        assert e["entropy_probe/delta_h1"] != 0.0 and e["entropy_probe/eta"] > 0  # tol: exact a real step
    events = sorted((runs / "probed" / "trainer").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    for key in ("entropy_probe/delta_h1", "entropy_probe/delta_h_true", "entropy_probe/update_match"):
        scalars = {s.step: s.value for s in acc.Scalars(f"train/{key}")}  # HF's TensorBoardCallback prefixes train/
        assert sorted(scalars) == sorted(entries)
        for step, value in scalars.items():
            logged = entries[step][key]
            # tol: fp tensorboard stores float32: one rounding of the float64 value, ≤ u₃₂·|x|
            assert abs(value - logged) <= torch.finfo(torch.float32).eps / 2 * abs(logged), (key, step, value, logged)


@pytest.mark.slow
def test_the_real_step_is_the_rebuilt_adamw_step(runs):
    """θ_{t+1} − θ_t of TRL's optimizer (torch AdamW, fused by TRL's default) = η·u of the probe's AdamW rebuild."""
    for step, e in _probe_entries(runs / "probed").items():
        # tol: fp update_match_rounding is the float32 storage rounding of θ_{t+1} (½ ulp of |θ| + |Δθ| per
        # coordinate, relative to ‖ηu‖); the fused kernel's own arithmetic adds a few ulps: 10× covers it, while a
        # missing bias correction, lr ratio or weight decay is ≥ 1e-2 off
        assert e["entropy_probe/update_match"] <= 10 * e["entropy_probe/update_match_rounding"], (step, e)
        assert 10 * e["entropy_probe/update_match_rounding"] < 1e-2, e  # tol: bound teeth (above)


@pytest.mark.slow
def test_online_delta_h1_equals_the_offline_probe_on_the_saved_state(runs, toy_checkpoint, tmp_path):
    """The state of step 4 saved from inside the run (adapter, AdamW state, the clipped gradient it stepped on)
    and probed offline from files: the same E samples (same θ, seed, sizes) and the same u give the callback's δH₁."""
    from probe_dist.assemble import build_probe
    from probe_dist.config import load_config
    from probe_dist.prediction.delta_h1 import predict_delta_h1
    from probe_dist.runtime.dist import Runtime
    from probe_dist.scoring.score import base_entropy, score_batch
    from probe_dist.update.step import update_parts

    saved = runs / "probed" / f"step{SAVED}"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt)
    (ckpt / "base").symlink_to(toy_checkpoint / "base")
    (ckpt / "tokenizer").symlink_to(toy_checkpoint / "tokenizer")
    (ckpt / "training_args.json").write_text(json.dumps({"temperature": 1.0, "max_new_tokens": 4, "loss": "dapo"}))
    eta = json.loads((saved / "lr.json").read_text())[0]
    cfg = load_config(None, [f"checkpoint.path={ckpt}", "device=cpu", "sampling.prompts=toy", "sampling.B_E=6",
                             "sampling.G_E=4", "sampling.B_U=2", f"sampling.seed={SAVED}", f"estimators.etas=[{eta!r}]",
                             "sampling.reward=probe_dist.callback:no_reward", "estimators.explain=false",
                             # the callback's passes: all of E's 6 × 4 rows at once (the same GEMM shapes)
                             "memory.microbatch_score=24", "memory.microbatch_grad=24",
                             "memory.microbatch_jvp=24"])
    probe = build_probe(cfg, Runtime())
    grad_by_name = load_file(str(saved / "grad.safetensors"))
    grad = [grad_by_name[name].double() for name, _ in probe.trainable]
    batch = probe.sample("E", 6, 4)
    scores = score_batch(probe.rt, probe.runner, batch)
    base = base_entropy(probe.rt, batch, scores, payload="rb", normalize="per_token")
    u = [part.u for part in update_parts(probe.optimizer, probe.trainable, grad)]
    offline = eta * predict_delta_h1(probe.rt, probe.runner, batch, scores, base=base, u=u,
                                     est=probe.cfg.estimators).per_eta
    online = _probe_entries(runs / "probed")[SAVED]
    assert online["entropy_probe/eta"] == eta
    assert online["entropy_probe/entropy"] == base.entropy  # tol: exact the same samples and weights, same passes
    assert online["entropy_probe/delta_h1"] == offline, (online["entropy_probe/delta_h1"], offline)  # tol: exact


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## During training"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


@pytest.mark.slow
def test_the_readme_training_example_runs_as_printed(toy_checkpoint, tmp_path):
    code = _readme_example()
    assert len(code.strip().splitlines()) <= 22  # tol: exact the README's "20-line" example (imports included)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PROBE_DIST_CACHE": str(toy_checkpoint.parent)}  # the suite's toy build, when it is seed 0
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = ast.literal_eval(proc.stdout.strip().splitlines()[-1])  # [(step, δH₁, ΔH_true), ...]
    assert [step for step, *_ in logged] == [5, 10]
    assert all(math.isfinite(d1) and math.isfinite(dt) for _, d1, dt in logged)
    assert list((tmp_path / "runs" / "trl_online").rglob("events.out.tfevents.*"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_under_accelerate_train_as_without_the_probe(toy_checkpoint, tmp_path):
    """accelerate launch, 2 CPU processes (DDP over gloo): E is sharded over the ranks, every rank logs the same
    numbers, and training is bitwise the training without the callback."""
    launcher = (str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                str(_free_port()))
    _train(toy_checkpoint, tmp_path / "plain", launcher=launcher)
    _train(toy_checkpoint, tmp_path / "probed", "--probe-every", str(EVERY), launcher=launcher)
    a, b = (load_file(str(tmp_path / r / "final_adapter.safetensors")) for r in ("plain", "probed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tol: exact
    ranks = [json.loads((tmp_path / "probed" / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == STEPS // EVERY, ranks
    ours = [{k: v for k, v in e.items() if k not in TIMING} for e in _log(tmp_path / "plain")]
    theirs = [{k: v for k, v in e.items() if k not in TIMING} for e in _log(tmp_path / "probed")
              if not any(k.startswith("entropy_probe/") for k in e)]
    assert ours == theirs


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def test_setups_it_cannot_probe_are_refused_at_train_begin(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM, TrainerControl, TrainerState

    from probe_dist.callback import EntropyProbeCallback, OnlineProbeError
    from probe_dist.toy.task import build_tokenizer, model_config

    model = get_peft_model(Qwen2ForCausalLM(model_config()), LoraConfig(r=2, target_modules=["q_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(trainable, lr=1e-3)
    state, control = TrainerState(), TrainerControl()

    def begin(callback, args=None, **kw):
        callback.on_train_begin(args or _args(tmp_path), state, control, **{"model": model, "optimizer": adamw, **kw})

    with pytest.raises(OnlineProbeError, match="every_n_steps=0"):
        begin(EntropyProbeCallback(every_n_steps=0))
    with pytest.raises(OnlineProbeError, match="every_n_steps=True"):
        begin(EntropyProbeCallback(every_n_steps=True))  # a bool is not a step count
    with pytest.raises(OnlineProbeError, match="torch.optim.AdamW.*SGD"):
        begin(EntropyProbeCallback(), optimizer=torch.optim.SGD(trainable, lr=0.1))
    with pytest.raises(OnlineProbeError, match="not with DeepSpeed or FSDP"):
        begin(EntropyProbeCallback(), args=_args(tmp_path, fsdp="full_shard"))
    with pytest.raises(OnlineProbeError, match="rollout.backend=vllm is for the offline probe"):
        begin(EntropyProbeCallback(overrides=["rollout.backend=vllm"]))
    frozen = Qwen2ForCausalLM(model_config()).requires_grad_(False)
    with pytest.raises(OnlineProbeError, match="no trainable parameters"):
        begin(EntropyProbeCallback(), model=frozen)
    from probe_dist.data.prompts import PromptError

    with pytest.raises(PromptError, match="does not exist"):
        begin(EntropyProbeCallback(eval_prompts=str(tmp_path / "missing.jsonl")))
    with pytest.raises(OnlineProbeError, match="item 1 is '3\\+4=', not a dict"):
        begin(EntropyProbeCallback(eval_prompts=[{"prompt": "1+2="}, "3+4="]))
    with pytest.raises(OnlineProbeError, match="got dict"):
        begin(EntropyProbeCallback(eval_prompts={"prompt": "1+2="}))
    # Everything the first probed step would refuse is refused at train begin, before any training step.
    from probe_dist.state.recipe import RecipeError

    tok = build_tokenizer()
    known = ["sampling.temperature=1.0", "sampling.max_new_tokens=3"]
    with pytest.raises(RecipeError, match="sampling.temperature, sampling.max_new_tokens are not set"):
        begin(EntropyProbeCallback(), processing_class=tok)  # plain TrainingArguments record no sampling settings
    with pytest.raises(PromptError, match="conversations"):  # the toy tokenizer has no chat template
        begin(EntropyProbeCallback(eval_prompts=[{"prompt": [{"role": "user", "content": "1+2="}]}], overrides=known),
              processing_class=tok)
    with pytest.raises(PromptError, match="leaves no room for a prompt"):
        begin(EntropyProbeCallback(overrides=["sampling.temperature=1.0", "sampling.max_new_tokens=100000"]),
              processing_class=tok)
    weird = tmp_path / "eval #1.jsonl"  # a '#' in a path is no YAML comment here
    weird.write_text('{"prompt": "1+2="}\n{"prompt": "3+4="}\n')
    for prompts in ([{"prompt": "1+2="}, {"prompt": "3+4="}], str(weird), Dataset.from_list([{"prompt": "5+6="}])):
        callback = EntropyProbeCallback(eval_prompts=prompts, overrides=known)
        begin(callback, processing_class=tok)  # accepted; a list is written to a temporary file, removed at the end
        callback.on_train_end(_args(tmp_path), state, control)


def test_the_probe_leaves_training_matmul_precision_as_it_was():
    """The probe's passes run at `highest` (no TF32 / bf16 matmuls); a trainer that set `high` keeps it."""
    from probe_dist.callback import training_precision

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with training_precision("highest"):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        with training_precision():  # the probe's assembly sets it inside
            torch.set_float32_matmul_precision("highest")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
