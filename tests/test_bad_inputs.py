"""Every bad input gets one clear message and exit 2, before the first model pass, and changes nothing on disk.

A matrix of broken inputs — config, checkpoint paths, training_args.json, prompt files, tokenizer, base and adapter
weights, adapter_config.json, optimizer state — each run through the CLI entry point on a copy of the toy
checkpoint. Each case asserts: exit code 2; stderr's `error:` paragraph names the problem (file / tensor / key) and
the fix; no traceback; output.dir (holding an earlier run's files) byte-identical and nothing left next to it; the checkpoint
files byte-identical to before the run.

Most cases call `probe_dist.main.main(argv)` in-process (the same code path as the command line, without paying for
a fresh interpreter each time); the cases marked `cli=True` are real `python -m probe_dist.main` subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
TOY_CPU = REPO / "configs" / "toy_cpu.yaml"
SMALL = ["sampling.B_E=2", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2", "estimators.etas=[0,1e-4]",
         "device=cpu"]


# ----------------------------------------------------------------------------------------------- corruptions


@dataclass
class Run:
    """What one case runs: the config file and the overrides its setup adds."""

    config: Path = TOY_CPU
    overrides: list[str] = field(default_factory=list)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


_DROP = object()


def training_args(**changes) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        edit_json(ckpt / "training_args.json", **changes)
    return setup


def training_args_text(text: str | bytes) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / "training_args.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def prompts_file(content: str | bytes | None, name: str = "prompts.jsonl") -> Callable:
    """A prompt file with `content` (None: the path does not exist; "<dir>": a directory)."""
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = tmp / name
        if content == "<dir>":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        run.overrides.append(f"sampling.prompts={path}")
    return setup


def good_lines(n: int = 3) -> str:
    return "".join(json.dumps({"prompt": f"{k}+1=", "answer": str(k + 1)}) + "\n" for k in range(n))


def edit_optimizer(fn: Callable[[dict], None]) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / "optimizer.pt"
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        fn(blob)
        torch.save(blob, str(path))
    return setup


def first_state(blob: dict, k: int = 0) -> dict:
    pid = blob["state_dict"]["param_groups"][0]["params"][k]
    return blob["state_dict"]["state"][pid]


def set_state(key: str, value: float, k: int = 0) -> Callable:
    def fn(blob):
        t = first_state(blob, k)[key]
        t.view(-1)[1] = value
    return edit_optimizer(fn)


def edit_safetensors(rel: str, pick: str, value: float) -> Callable:
    """Set one entry of the first tensor whose name contains `pick` to `value` (metadata kept)."""
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / rel
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        name = next(n for n in tensors if pick in n)
        tensors[name].view(-1)[0] = value
        save_file(tensors, str(path), metadata=metadata)
    return setup


def drop_tensor(rel: str, pick: str) -> Callable:
    """Remove the first tensor whose name contains `pick` from a safetensors file (metadata kept)."""
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / rel
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        del tensors[next(n for n in tensors if pick in n)]
        save_file(tensors, str(path), metadata=metadata)
    return setup


def truncate(rel: str, keep: float = 0.5) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / rel
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return setup


def write(rel: str, content: str | bytes) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        (ckpt / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def remove(rel: str) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        path = ckpt / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def overrides(*items: str) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        run.overrides.extend(item.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp)) for item in items)
    return setup


def config_file(text: str) -> Callable:
    def setup(ckpt: Path, tmp: Path, run: Run) -> None:
        run.config = tmp / "bad.yaml"
        run.config.write_text(text)
    return setup


def sgd_optimizer(ckpt: Path, tmp: Path, run: Run) -> None:
    path = ckpt / "optimizer.pt"
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    blob["optimizer_class"] = "SGD"
    for g in blob["state_dict"]["param_groups"]:
        g.pop("betas"), g.pop("eps")
    torch.save(blob, str(path))


def transpose_exp_avg(blob: dict) -> None:
    for k in range(len(blob["param_names"])):
        state = first_state(blob, k)
        if state["exp_avg"].dim() == 2 and state["exp_avg"].shape[0] != state["exp_avg"].shape[1]:
            state["exp_avg"] = state["exp_avg"].t().contiguous()
            return
    raise AssertionError("no non-square state")


def rename_param(blob: dict) -> None:
    blob["param_names"][0] = blob["param_names"][0].replace("q_proj", "bogus_proj")


def group(key: str, value) -> Callable:
    def fn(blob):
        blob["state_dict"]["param_groups"][0][key] = value
    return edit_optimizer(fn)


# ----------------------------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, Path, Run], None]
    expect: tuple[str, ...]  # fragments of the error paragraph: the problem, where (file/tensor/key), the fix
    cli: bool = False  # a real subprocess (else main(argv) in-process)


OPT = "base_model.model.model.layers.0"  # every optimizer/adapter tensor name of the toy starts like this
TOO_LONG = "1" * 70 + "="  # 72 tokens with BOS: more than 64 positions (toy) - 3 new tokens

CASES = [
    # --- config
    Case("config_unknown_key", overrides("sampling.B_EE=2"), ("sampling.B_EE", "did you mean 'sampling.B_E'")),
    Case("config_wrong_type", overrides("sampling.B_E=two"), ("sampling.B_E", "expects an integer", "'two'"),
         cli=True),
    Case("config_out_of_range", overrides("sampling.max_new_tokens=0"), ("sampling.max_new_tokens", "must be >= 1")),
    Case("config_top_p", overrides("sampling.top_p=0.9"), ("sampling.top_p=0.9", "Set sampling.top_p=1.0")),
    Case("config_file_bad_yaml", config_file("sampling: [\n"), ("bad.yaml", "not valid YAML", "line 2")),
    # --- checkpoint paths
    Case("checkpoint_path_missing", overrides("checkpoint.path={tmp}/nowhere"),
         ("nowhere", "is not a directory", "Point it at a checkpoint directory")),
    Case("optimizer_missing", remove("optimizer.pt"), ("optimizer.pt", "does not exist", "checkpoint.optimizer=PATH")),
    Case("base_missing", remove("base"), ("base", "does not exist", "checkpoint.base=PATH")),
    Case("adapter_dir_without_config", overrides("checkpoint.adapter={tmp}"),
         ("has no adapter_config.json", "Point it at the folder")),
    # --- training_args.json
    Case("training_args_bad_json", training_args_text('{\n  "loss": "grpo",\n  "temperature": 1.0,,\n}'),
         ("training_args.json", "not valid JSON", "line 3", "Fix the file")),
    Case("training_args_not_utf8", training_args_text(b'{"loss": "grpo", "note": "\xff"}'),
         ("training_args.json", "not valid UTF-8", "line 1", "Fix the file")),
    Case("training_args_list", training_args_text("[1, 2, 3]"), ("training_args.json", "holds a list", "Fix the file")),
    Case("temperature_string", training_args(temperature="hot"),
         ("training_args.json", "'temperature'", '"hot" (a string)', "a number > 0", "sampling.temperature="),
         cli=True),
    Case("temperature_zero", training_args(temperature=0), ("'temperature'", "a number > 0", "sampling.temperature=")),
    Case("temperature_nan", training_args_text('{"loss": "grpo", "temperature": NaN, "max_new_tokens": 3}'),
         ("'temperature'", "NaN", "sampling.temperature=")),
    Case("temperature_missing", training_args(temperature=_DROP),
         ("sampling.temperature is not set", "sampling.temperature=")),
    Case("max_new_tokens_negative", training_args(max_new_tokens=-5),
         ("'max_new_tokens'", "-5", "an integer >= 1", "sampling.max_new_tokens=")),
    Case("max_new_tokens_fraction", training_args(max_new_tokens=2.5),
         ("'max_new_tokens'", "2.5", "an integer >= 1", "sampling.max_new_tokens=")),
    Case("max_new_tokens_list", training_args(max_new_tokens=[3]),
         ("'max_new_tokens'", "(a list)", "sampling.max_new_tokens=")),
    Case("loss_unknown", training_args(loss="ppo"), ("'loss'", '"ppo"', "grpo, bnpo, dr_grpo, dapo, cispo",
                                                     "update.loss=")),
    Case("loss_list", training_args(loss=["grpo"]), ("'loss'", "(a list)", "update.loss=")),
    Case("grad_clip_negative", training_args(grad_clip=-1.0), ("'grad_clip'", "-1.0", ">= 0", "update.grad_clip=")),
    Case("grad_clip_string", training_args(grad_clip="big"), ("'grad_clip'", '"big"', "update.grad_clip=")),
    # --- prompt files
    Case("prompts_missing", prompts_file(None), ("prompts.jsonl", "does not exist", "sampling.prompts must be")),
    Case("prompts_directory", prompts_file("<dir>"), ("prompts.jsonl", "is a directory", "sampling.prompts must be")),
    Case("prompts_empty", prompts_file(""), ("prompts.jsonl", "contains no prompts", "one JSON object per line")),
    Case("prompts_malformed_json", prompts_file(good_lines(1) + '{"prompt": "1+1=", "answer": \n'),
         ("prompts.jsonl, line 2", "not valid JSON", "one JSON object per line")),
    Case("prompts_not_utf8", prompts_file(good_lines(2).encode() + b'{"prompt": "caf\xe9", "answer": "1"}\n'),
         ("prompts.jsonl, line 3", "not valid UTF-8", "0xe9", "re-save it as UTF-8"), cli=True),
    Case("prompts_missing_prompt_key", prompts_file(good_lines(1) + '{"question": "1+1=", "answer": "2"}\n'),
         ("prompts.jsonl, line 2", "missing key(s) prompt", "every line needs prompt and answer")),
    Case("prompts_not_an_object", prompts_file('["1+1=", "2"]\n'),
         ("prompts.jsonl, line 1", "expected a JSON object", "one JSON object per line")),
    Case("prompts_empty_prompt", prompts_file('{"prompt": "", "answer": "0"}\n'),
         ("prompts.jsonl, line 1", "'prompt' must be a non-empty string", "give every line a prompt text")),
    Case("prompts_answer_list", prompts_file('{"prompt": "1+1=", "answer": [2]}\n'),
         ("prompts.jsonl, line 1", "'answer' must be a string", "write the reference answer as a string")),
    Case("prompt_too_long", prompts_file(good_lines(1) + json.dumps({"prompt": TOO_LONG, "answer": "1"}) + "\n"),
         ("prompts.jsonl, line 2", "is 72 tokens", "max_position_embeddings=64", "config.json",
          "shorten or drop them", "lower sampling.max_new_tokens")),
    Case("max_new_tokens_beyond_positions", overrides("sampling.max_new_tokens=62"),
         ("toy_train.jsonl", "max_position_embeddings=64", "lower sampling.max_new_tokens")),
    # --- tokenizer
    Case("tokenizer_missing", remove("tokenizer"),
         ("no tokenizer in", "base", "tokenizer' does not exist", "checkpoint.tokenizer=DIR"), cli=True),
    Case("tokenizer_explicit_missing", overrides("checkpoint.tokenizer={tmp}/tok"),
         ("tok", "does not exist", "checkpoint.tokenizer=DIR")),
    Case("tokenizer_truncated", truncate("tokenizer/tokenizer.json"),
         ("tokenizer", "cannot be loaded", "checkpoint.tokenizer=DIR")),
    # --- base model
    Case("base_config_missing", remove("base/config.json"), ("has no config.json", "save_pretrained")),
    Case("base_config_bad_json", write("base/config.json", '{"model_type": "qwen2",\n "hidden_size": }'),
         ("config.json", "not valid JSON", "line 2", "Re-save the base model")),
    Case("base_safetensors_truncated", truncate("base/model.safetensors"),
         ("base model weight file", "model.safetensors", "truncated", "Copy it again"), cli=True),
    Case("base_weight_nan", edit_safetensors("base/model.safetensors", "layers.0.mlp.up_proj", math.nan),
         ("non-finite", "base model weights", "layers.0.mlp.up_proj.weight", "Re-download or re-save")),
    # --- adapter
    Case("adapter_safetensors_truncated", truncate("adapter_model.safetensors", 0.9),
         ("adapter weight file", "adapter_model.safetensors", "truncated", "Copy it again")),
    Case("adapter_weight_nan", edit_safetensors("adapter_model.safetensors", "lora_A", math.nan),
         ("non-finite", "adapter_model.safetensors", "lora_A.weight", "1 of", "earlier checkpoint"), cli=True),
    Case("adapter_weight_inf", edit_safetensors("adapter_model.safetensors", "lora_B", math.inf),
         ("non-finite", "adapter_model.safetensors", "lora_B.weight", "earlier checkpoint")),
    Case("adapter_config_broken_json", write("adapter_config.json", '{"peft_type": "LORA",\n "r": 8\n'),
         ("adapter_config.json", "not valid JSON", "line", "Re-save the adapter"), cli=True),
    Case("adapter_config_not_peft", write("adapter_config.json", "{}"),
         ("adapter_config.json", "'peft_type'", "Re-save the adapter")),
    Case("adapter_weights_missing", remove("adapter_model.safetensors"),
         ("no adapter weights next to", "adapter_config.json", "adapter_model.safetensors or adapter_model.bin",
          "Copy the adapter")),
    Case("base_weights_missing", remove("base/model.safetensors"),
         ("no model weights in the base model folder", "model.safetensors", "Copy the weights")),
    # transformers initialises a parameter missing from the files at random and only prints a load report
    Case("base_weight_tensor_missing", drop_tensor("base/model.safetensors", "layers.0.mlp.down_proj"),
         ("base model", "lack 1 of the parameters", "'model.layers.0.mlp.down_proj.weight'", "at random",
          "Copy the complete weights")),
    # finite weights, yet the forward overflows: peft multiplies every LoRA product by lora_alpha / r
    Case("adapter_scaling_overflows", lambda ckpt, tmp, run: edit_json(ckpt / "adapter_config.json", lora_alpha=1e308),
         ("gives NaN/inf logits", "weights are finite", "lora_alpha / r = 1.25e+307", "adapter_config.json")),
    Case("adapter_rank_mismatch", lambda ckpt, tmp, run: edit_json(ckpt / "adapter_config.json", r=4),
         ("could not load the adapter", "adapter_config.json", "trained on this base model")),
    # --- optimizer state
    Case("exp_avg_sq_negative", set_state("exp_avg_sq", -1.0),
         ("optimizer.pt", OPT, "exp_avg_sq", "< 0", "earlier, healthy checkpoint"), cli=True),
    Case("exp_avg_sq_nan", set_state("exp_avg_sq", math.nan),
         ("optimizer.pt", OPT, "exp_avg_sq has 1 of", "NaN/inf", "earlier, healthy checkpoint")),
    Case("exp_avg_inf", set_state("exp_avg", math.inf, k=3), ("optimizer.pt", OPT, "exp_avg has 1 of", "NaN/inf")),
    Case("step_nan", edit_optimizer(lambda b: first_state(b)["step"].fill_(math.nan)),
         ("optimizer.pt", OPT, "step has 1 of 1 values NaN/inf", "earlier, healthy checkpoint")),
    Case("state_wrong_shape", edit_optimizer(transpose_exp_avg),
         ("optimizer.pt", "exp_avg shape", "same checkpoint")),
    Case("state_unknown_parameter", edit_optimizer(rename_param),
         ("optimizer.pt", "bogus_proj", "same checkpoint")),
    Case("optimizer_sgd", sgd_optimizer, ("optimizer.pt", "'SGD', not torch AdamW", "refuses other optimizers")),
    Case("optimizer_lr_negative", group("lr", -1e-3), ("optimizer.pt", "lr=-0.001", "Re-save the optimizer")),
    Case("optimizer_betas_bad", group("betas", (0.9, 1.5)), ("optimizer.pt", "betas=", "two numbers in [0, 1)")),
    Case("optimizer_garbage", write("optimizer.pt", b"not a torch file at all"),
         ("could not read optimizer state", "optimizer.pt", "copy it again")),
    Case("optimizer_truncated", truncate("optimizer.pt"), ("could not read optimizer state", "optimizer.pt")),
    Case("optimizer_not_a_dict", edit_optimizer(lambda b: b.pop("param_names")),
         ("optimizer.pt", "is not an optimizer state", "Re-save it with torch.save(")),
]


# ----------------------------------------------------------------------------------------------- running


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under root (directories as entries too)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def reset_probe_logging() -> None:
    root = logging.getLogger("probe_dist")
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    root.propagate = True


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in this process, leaving signal handlers and logging as they were."""
    from probe_dist.main import main

    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in signals}
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        reset_probe_logging()
    return code, capsys.readouterr().err


def error_paragraph(stderr: str) -> str:
    match = re.search(r"^error: ", stderr, flags=re.MULTILINE)
    assert match, f"no 'error:' line on stderr:\n{stderr[-3000:]}"
    return stderr[match.start():]


def run_case(case: Case, toy_checkpoint: Path, tmp_path: Path, capsys) -> str:
    """Copy the toy checkpoint, break it, run, and check everything but the message; returns the error paragraph."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    out = tmp_path / "out"
    out.mkdir()  # an earlier run's results (a failed run must leave them byte-identical, even with overwrite=true)
    (out / "summary.json").write_text('{"status": "completed", "note": "an earlier run: must survive unchanged"}\n')
    (out / "probe.log").write_text("the earlier run's log\n")
    run = Run()
    case.setup(ckpt, tmp_path, run)
    argv = ["--config", str(run.config), f"checkpoint.path={ckpt}", f"output.dir={out}", "output.overwrite=true", *SMALL,
            *run.overrides]
    ckpt_before, out_before = tree_hashes(ckpt), tree_hashes(out)
    beside_before = sorted(p.name for p in tmp_path.iterdir())
    if case.cli:
        proc = run_cli(argv, timeout=180)
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = run_in_process(argv, capsys)
    assert code == 2, f"exit code {code}, expected 2 (user input)\n{stderr[-4000:]}"
    assert "Traceback" not in stderr, stderr[-4000:]
    assert tree_hashes(ckpt) == ckpt_before, "the run changed the checkpoint files"
    assert tree_hashes(out) == out_before, f"output.dir changed: {sorted(tree_hashes(out))}"
    assert sorted(p.name for p in tmp_path.iterdir()) == beside_before, "the run left files next to output.dir"
    return error_paragraph(stderr)


def test_matrix_is_large_and_names_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.cli for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_refused_clearly(case, toy_checkpoint, tmp_path, capsys):
    message = run_case(case, toy_checkpoint, tmp_path, capsys)
    missing = [fragment for fragment in case.expect if fragment not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


# ----------------------------------------------------------------------------------------------- order, notes


def test_prompt_errors_come_before_the_model_loads(toy_checkpoint, tmp_path, monkeypatch):
    """Cheap checks first: a bad prompt file (and a bad training setting) is reported without loading any model."""
    from probe_dist import assemble
    from probe_dist.data.prompts import PromptError
    from probe_dist.state import files
    from probe_dist.state.recipe import RecipeError as TrainingArgsError
    from tests.probe_harness import make_probe

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(files, "load_model", no_model)  # where the pipeline calls them
    monkeypatch.setattr(assemble, "load_tokenizer", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(PromptError, match="line 1, column 13: not valid UTF-8"):
        make_probe(toy_checkpoint, [f"sampling.prompts={bad}"])
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    edit_json(ckpt / "training_args.json", max_new_tokens=-5)
    with pytest.raises(TrainingArgsError, match="max_new_tokens"):
        make_probe(ckpt, [])


def test_explicit_setting_overrides_a_bad_recorded_one(toy_checkpoint, tmp_path):
    """The message's fix works: setting the value explicitly skips the broken recorded one."""
    from tests.probe_harness import make_probe

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_checkpoint, ckpt)
    edit_json(ckpt / "training_args.json", temperature="hot", max_new_tokens=-5)
    probe = make_probe(ckpt, ["sampling.temperature=1.0", "sampling.max_new_tokens=3"])
    assert probe.cfg.sampling.temperature == 1.0 and probe.cfg.sampling.max_new_tokens == 3


@pytest.fixture
def probe_log():
    """Records of the probe_dist logger (which does not propagate once the CLI set it up)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("probe_dist")
    handler, level = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_unknown_characters_warned_once_with_examples(toy_checkpoint, tmp_path, probe_log):
    from tests.probe_harness import make_probe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "1 + 2=", "answer": "3"},  # the toy tokenizer has no space: two <unk>
        {"prompt": "2+2=", "answer": "4"},
        {"prompt": "3+é=", "answer": "3"},  # one <unk>
    )), encoding="utf-8")
    make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.B_E=2", "sampling.B_U=2"])
    warned = [r.getMessage() for r in probe_log if "unknown token" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "3 prompt token(s) in 2 of 3 prompts" in warned[0] and str(prompts) in warned[0]
    assert "line 1: ' '" in warned[0] and "line 3: 'é'" in warned[0]


def test_batches_larger_than_the_prompt_file_are_noted(toy_checkpoint, tmp_path, probe_log):
    from tests.probe_harness import make_probe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(good_lines(3))
    make_probe(toy_checkpoint, [f"sampling.prompts={prompts}", "sampling.B_E=7", "sampling.B_U=2"])
    notes = [r.getMessage() for r in probe_log if "repeats prompts" in r.getMessage()]
    assert len(notes) == 1 and "sampling.B_E=7 is larger than the 3 prompts" in notes[0], notes
    assert not any(r.levelno >= logging.ERROR for r in probe_log)


def test_length_check_counts_tokens_as_the_sampler_does(toy_checkpoint):
    """validate's batched count (BOS added when missing) equals len(prompt_token_ids) of the sampler."""
    from probe_dist.data.checks import _prompt_lengths
    from probe_dist.data.prompts import load_prompts, prompt_token_ids
    from probe_dist.state.model import load_tokenizer

    tokenizer = load_tokenizer(toy_checkpoint / "tokenizer")
    texts = [p["prompt"] for p in load_prompts("toy", "test")] + [TOO_LONG, "<bos>1+1=", "1 + é"]
    lengths, unknown = _prompt_lengths(tokenizer, texts)
    assert lengths == [len(prompt_token_ids(tokenizer, t)) for t in texts]
    assert unknown[-1] == [(1, 2), (3, 4), (4, 5)] and not any(unknown[:-1])
