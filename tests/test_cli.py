"""The real command line: `python -m probe_dist.main` end to end, its outputs, config errors, the console script,
and the default toy checkpoint from PROBE_DIST_CACHE.

One end-to-end run (module fixture) feeds several tests; its update vector is checked against an independent
rebuild of θ + ηu with plain transformers/peft.
"""

from __future__ import annotations

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

from probe_dist.config import ConfigError, config_hash, load_config
from probe_dist.data.prompts import load_prompts, select_prompts
from probe_dist.toy.checkpoint import TOY_FORMAT_VERSION
from tests.tolerances import fp_bound

REPO = Path(__file__).resolve().parents[1]
TOY_CPU = REPO / "configs" / "toy_cpu.yaml"
TOY_CPU_ETAS = [0.0, 1e-4, 1e-3, 1e-2]
B_E = B_U = 4
G_E = G_U = 4  # toy_cpu.yaml
SWEEP_KEYS = ("eta", "delta_h_true", "delta_h_true_se", "delta_h1", "delta_h1_se", "ess", "ess_frac", "khat", "kl")
PROVENANCE_KEYS = ("config_hash", "seed", "world_size", "versions", "dtype", "microbatch", "phase_seconds")


def run_cli(args: list[str], extra_env: dict | None = None, module: str = "probe_dist.main",
            timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "MPLBACKEND": "Agg",
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def e2e(toy_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = run_cli(["--config", str(TOY_CPU), f"checkpoint.path={toy_checkpoint}", f"output.dir={out}",
                    f"sampling.B_E={B_E}", f"sampling.B_U={B_U}", "output.save_update_vector=true"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    return {"proc": proc, "out": out, "summary": summary, "rows": rows}


# ----------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_console_table(e2e):
    stdout = e2e["proc"].stdout
    assert "entropy H(θ)" in stdout
    lines = stdout.splitlines()
    for eta in TOY_CPU_ETAS:
        assert any(line.startswith(f"{eta:>10.3g} ") for line in lines), f"no table row for eta={eta}\n{stdout}"
    assert "restore verified on all ranks: True" in stdout


@pytest.mark.slow
def test_written_config_reloads_to_the_same_hash(e2e, toy_checkpoint):
    cfg = load_config(e2e["out"] / "config.yaml")
    assert config_hash(cfg) == e2e["summary"]["provenance/config_hash"]
    assert f"hash {config_hash(cfg)}" in (e2e["out"] / "config.yaml").read_text().splitlines()[0]
    # The written config is the resolved one: overrides and values filled from the checkpoint are in it.
    assert cfg.checkpoint.path == str(toy_checkpoint) and cfg.sampling.B_E == B_E
    assert cfg.sampling.temperature is not None and cfg.update.loss == "grpo"


@pytest.mark.slow
def test_summary_contents(e2e):
    s = e2e["summary"]
    for key in ("entropy/base", "entropy/base_se", "entropy/base_naive"):
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert s["entropy/base"] > 0 and s["entropy/base_se"] > 0
    assert s["status"] == "completed" and s["restore/verified"] is True
    assert [e["eta"] for e in s["sweep"]] == TOY_CPU_ETAS
    for entry in s["sweep"]:
        assert set(SWEEP_KEYS) <= set(entry), set(SWEEP_KEYS) - set(entry)
    zero = s["sweep"][0]
    assert zero["delta_h_true"] == 0.0 and zero["delta_h1"] == 0.0 and zero["kl"] == 0.0  # η = 0 is exactly 0
    assert zero["ess_frac"] == 1.0 and zero["ess"] == B_E * G_E
    for key in PROVENANCE_KEYS:
        assert f"provenance/{key}" in s, key
    assert s["provenance/seed"] == 1234 and s["provenance/world_size"] == 1 and s["provenance/dtype"] == "float32"
    assert {"probe_dist", "torch", "transformers", "peft"} <= set(s["provenance/versions"])
    assert {"generate", "score", "grad", "logits_chunk"} <= set(s["provenance/microbatch"])
    assert {"sample", "score_base", "update_gradient", "delta_h1", "sweep"} <= set(s["provenance/phase_seconds"])


@pytest.mark.slow
def test_sequence_table(e2e):
    rows = e2e["rows"]
    e_rows = [r for r in rows if r["batch"] == "E"]
    u_rows = [r for r in rows if r["batch"] == "U"]
    assert len(rows) == B_E * G_E + B_U * G_U and len(e_rows) == B_E * G_E and len(u_rows) == B_U * G_U
    assert sorted({r["prompt_index"] for r in e_rows}) == list(range(B_E))
    for r in rows:
        assert len(r["token_ids"]) == r["T"] >= 1
    for r in e_rows:
        assert set(r["log_w"]) == {str(eta) for eta in TOY_CPU_ETAS}
        assert r["log_w"]["0.0"] == 0.0  # exactly: S(θ) is reused, never recomputed
    assert all("log_w" not in r for r in u_rows)


def score_sequences(model, prompt_ids_of, rows, temperature: float) -> list[float]:
    """S(y) = Σ_t log softmax(z_t/τ)[y_t] by a plain forward over [prompt | response], one row at a time, in the
    model's dtype."""
    out = []
    for r in rows:
        prompt = prompt_ids_of[r["prompt_index"]]
        ids = torch.tensor(prompt + r["token_ids"], dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits / temperature, dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + r["T"])
        out.append(float(logp[positions, torch.tensor(r["token_ids"])].double().sum()))
    return out


@pytest.mark.slow
def test_update_vector_reproduces_log_weights(e2e, toy_checkpoint):
    """Rebuild θ + ηu from update_vector.safetensors with plain peft/transformers and re-score the E sequences."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    summary, rows = e2e["summary"], [r for r in e2e["rows"] if r["batch"] == "E"]
    update = load_file(str(e2e["out"] / "update_vector.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(str(toy_checkpoint / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(toy_checkpoint)).eval()
    params = dict(model.named_parameters())
    adapter_names = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    assert set(update) == adapter_names  # keyed by the adapter parameter names
    saved_adapter = load_file(str(toy_checkpoint / "adapter_model.safetensors"))
    assert {n.replace(".default.", ".") for n in update} == set(saved_adapter)
    for name, u in update.items():
        assert u.dtype == torch.float64 and u.shape == params[name].shape, name
    # tol: fp two float64 sums of the n squares (any order): all terms ≥ 0, so each is within γ_n relative
    n = sum(u.numel() for u in update.values())
    assert math.sqrt(sum(float((u * u).sum()) for u in update.values())) == pytest.approx(
        summary["update/u_norm"], rel=fp_bound(torch.float64, n, 1.0))

    tok = PreTrainedTokenizerFast.from_pretrained(str(toy_checkpoint / "tokenizer"))
    chosen = select_prompts(load_prompts("toy", "train"), B_E, summary["provenance/seed"], "E")
    prompt_ids_of = {k: [tok.bos_token_id] + tok(p["prompt"], add_special_tokens=False)["input_ids"]
                     for k, (_, p) in enumerate(chosen)}
    temperature = summary["provenance/temperature"]

    # The same scoring in float64 (Qwen2's RMSNorm still computes in float32 inside), at θ + ηu unrounded: the
    # float32 scoring's error, eps₃₂ × this model's condition number on these sequences, measured.
    model64 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(toy_checkpoint / "base"),
                                                                            dtype=torch.float64),
                                        str(toy_checkpoint)).eval().double()
    params64 = dict(model64.named_parameters())

    def two_path_tol(err32: float, scale: float) -> float:
        # tol: fp two float32 paths (the probe's batched, chunked scorer vs this plain per-row forward), each within
        # ≈ err32 = max_i |S₃₂ − S₆₄| of the exact value: 4× safety each, plus one float32 rounding of |S| (4u₃₂|S|)
        return 2 * (4 * err32 + fp_bound(torch.float32, 1, scale))

    s0 = score_sequences(model, prompt_ids_of, rows, temperature)
    s0_64 = score_sequences(model64, prompt_ids_of, rows, temperature)
    tol = two_path_tol(max(abs(a - b) for a, b in zip(s0, s0_64)), max(abs(b) for b in s0_64))
    assert max(abs(a - r["S"]) for a, r in zip(s0, rows)) <= tol, tol  # same prompts, same S(θ) as the probe
    theta0 = {n: params[n].detach().clone() for n in update}
    for eta in TOY_CPU_ETAS[1:]:
        with torch.no_grad():
            for n, u in update.items():
                params[n].copy_((theta0[n].double() + eta * u).to(torch.float32))
                params64[n].copy_(theta0[n].double() + eta * u)
        s1 = score_sequences(model, prompt_ids_of, rows, temperature)
        s1_64 = score_sequences(model64, prompt_ids_of, rows, temperature)
        log_w = [b - a for a, b in zip(s0, s1)]
        table = [r["log_w"][str(eta)] for r in rows]
        # log w = S(θ + ηu) − S(θ): the errors of both scorings add
        err32 = max(abs((b - a) - (d - c)) for a, b, c, d in zip(s0, s1, s0_64, s1_64))
        tol = two_path_tol(err32, max(abs(b) for b in s0_64 + s1_64))  # tol: fp (two_path_tol)
        assert max(abs(a - b) for a, b in zip(log_w, table)) <= tol, (eta, log_w, table, tol)
    # tol: bound precondition: at the largest η the weights are far from 1 — a log w reported as 0, halved or with
    # the wrong sign would be off by more than the tolerance: the check has teeth
    assert max(abs(x) for x in table) > 2 * tol, (table, tol)


# ----------------------------------------------------------------------------------------------- config errors


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("sampling.temprature=0.7", "unknown config key 'sampling.temprature' (override 'sampling.temprature=0.7'); "
                                "did you mean 'sampling.temperature'?"),
    ("sampling.B_E=four", "config key 'sampling.B_E' (prompts in the evaluation batch E) expects an integer, "
                          "got 'four'"),
    ("sampling.B_E=0", "config key 'sampling.B_E' (prompts in the evaluation batch E) must be >= 1, got 0"),
    ("sampling.B_E", "bad override 'sampling.B_E': expected the form section.key=value"),
], ids=["unknown_key", "wrong_type", "out_of_range", "bad_syntax"])
def test_config_errors_exit_2(tmp_path, override, expected):
    out = tmp_path / "out"
    proc = run_cli(["--config", str(TOY_CPU), f"output.dir={out}", override])
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()  # nothing written for a config error


def test_case_typo_suggests_the_right_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["sampling.B_e=4"])
    assert "did you mean 'sampling.B_E'?" in str(info.value)


def test_help_config_console_script():
    script = Path(sys.executable).with_name("probe-dist")
    assert script.exists(), "the probe-dist console script is not installed in this environment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([str(script), "--help-config"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for key in ("checkpoint.path", "sampling.B_E", "estimators.etas", "memory.allow_full_finetune"):
        assert key in proc.stdout, key


# ----------------------------------------------------------------------------------------------- default checkpoint


@pytest.mark.slow
def test_default_checkpoint_is_the_cached_toy(tmp_path, toy_checkpoint):
    """No checkpoint given → the toy checkpoint in $PROBE_DIST_CACHE (pre-seeded here, so nothing is rebuilt)."""
    cache = tmp_path / "cache"
    cached = cache / f"toy-v{TOY_FORMAT_VERSION}-seed0"
    shutil.copytree(toy_checkpoint, cached)
    before = {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*")}
    out = tmp_path / "out"
    proc = run_cli(["--config", str(TOY_CPU), f"output.dir={out}", "sampling.B_E=2", "sampling.G_E=2",
                    "sampling.B_U=2", "sampling.G_U=2", "estimators.etas=[0,1e-3]"],
                   extra_env={"PROBE_DIST_CACHE": str(cache), "HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance/checkpoint"] == str(cached)
    assert load_config(out / "config.yaml").checkpoint.path == str(cached)
    assert "building the toy checkpoint" not in proc.stderr
    # Nothing rebuilt or added: the cache holds exactly the pre-seeded files, untouched.
    assert {p.relative_to(cache): p.stat().st_mtime_ns for p in cache.rglob("*")} == before
    assert not (tmp_path / "home" / ".cache" / "probe_dist").exists()
