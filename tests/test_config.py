"""Config loading: defaults, YAML + overrides, every class of error, dump/reload, hashing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from probe_dist.config import (
    ConfigError,
    config_hash,
    config_to_dict,
    dump_config,
    format_config_help,
    load_config,
)
from probe_dist.config_schema import ProbeConfig

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_without_file():
    cfg = load_config(None, [])
    assert cfg == ProbeConfig()
    assert cfg.sampling.top_p == 1.0 and cfg.sampling.top_k == 0
    assert cfg.estimators.etas == [0.0, 1e-6, 1e-5, 1e-4]


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path, """
sampling:
  B_E: 16
  temperature: 0.7
estimators:
  etas: [0, 1e-5]      # YAML 1.1 reads 1e-5 as a string; the loader makes it a float
output:
  dir: runs/x
device: cpu
""")
    cfg = load_config(path, ["sampling.B_E=32", "update.kl_coef=1", "checkpoint.path=null", "log_level=debug"])
    assert cfg.sampling.B_E == 32 and cfg.sampling.G_E == 4
    assert cfg.sampling.temperature == 0.7
    assert cfg.estimators.etas == [0.0, 1e-5] and all(type(e) is float for e in cfg.estimators.etas)
    assert cfg.update.kl_coef == 1.0 and type(cfg.update.kl_coef) is float
    assert cfg.output.dir == "runs/x" and cfg.device == "cpu" and cfg.log_level == "debug"
    assert cfg.checkpoint.path is None


def test_override_values_parse():
    cfg = load_config(None, ["estimators.etas=[0,1e-5,1e-4]", "sampling.temperature=1e-5", "update.loss=none",
                             "output.dir=123", "output.plots=false"])
    assert cfg.estimators.etas == [0.0, 1e-5, 1e-4] and all(type(e) is float for e in cfg.estimators.etas)
    assert cfg.sampling.temperature == 1e-5
    assert cfg.update.loss is None
    assert cfg.output.dir == "123"
    assert cfg.output.plots is False


@pytest.mark.parametrize("name", ["toy_cpu.yaml", "debug_1gpu.yaml"])
def test_shipped_presets_load(name):
    cfg = load_config(REPO / "configs" / name, [])
    assert (cfg.sampling.B_E, cfg.sampling.G_E, cfg.sampling.B_U, cfg.sampling.G_U) == (16, 4, 8, 4)
    assert cfg.estimators.etas == [0.0, 1e-4, 1e-3, 1e-2]
    assert cfg.checkpoint.path is None


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(missing, [])


def test_unknown_key_in_yaml_suggests(tmp_path):
    path = write_yaml(tmp_path, "sampling:\n  temprature: 1.0\n")
    msg = error_of(path, [])
    assert "unknown config key 'sampling.temprature'" in msg
    assert "did you mean 'sampling.temperature'?" in msg


def test_unknown_key_in_override_suggests():
    msg = error_of(None, ["sampling.temprature=1"])
    assert "did you mean 'sampling.temperature'?" in msg
    assert "did you mean 'sampling.B_E'?" in error_of(None, ["B_E=3"])  # right key, missing section


def test_unknown_section(tmp_path):
    msg = error_of(write_yaml(tmp_path, "samplng:\n  B_E: 3\n"), [])
    assert "unknown config section 'samplng'" in msg and "did you mean 'sampling'?" in msg
    assert "did you mean 'sampling'?" in error_of(None, ["samplng.B_E=3"])


@pytest.mark.parametrize("override, expected", [
    ("sampling.B_E=abc", "expects an integer, got 'abc'"),
    ("sampling.B_E=2.5", "expects an integer, got 2.5"),
    ("sampling.B_E=3.0", "without a decimal point"),
    ("sampling.B_E=true", "expects an integer, got True"),
    ("output.save_update_vector=maybe", "expects a boolean, got 'maybe'"),
    ("output.save_update_vector=1", "write true or false"),
    ("sampling.temperature=hot", "expects a finite number"),
    ("estimators.etas=1e-5", "expects a list of numbers"),
    ("estimators.etas=[0,-1e-5]", "finite numbers >= 0"),
    ("sampling.seed=null", "has no null value"),
])
def test_wrong_type(override, expected):
    msg = error_of(None, [override])
    assert override.split("=")[0] in msg and expected in msg


@pytest.mark.parametrize("override, expected", [
    ("sampling.B_E=0", ">= 1, got 0"),
    ("sampling.temperature=-1", "> 0.0, got -1.0"),
    ("sampling.top_p=1.5", "<= 1.0"),
    ("update.route=sgd", "one of 'update_vector', 'real_step'; got 'sgd'"),
])
def test_out_of_range_or_bad_choice(override, expected):
    msg = error_of(None, [override])
    assert override.split("=")[0] in msg and expected in msg


@pytest.mark.parametrize("override", ["sampling.B_E", "=3", "sampling..B_E=3", "sampling.B_E =3", "sampling.=3"])
def test_bad_override_syntax(override):
    msg = error_of(None, [override])
    assert "section.key=value" in msg and "sampling.B_E=16" in msg


def test_section_is_not_a_value(tmp_path):
    assert "is a config section" in error_of(None, ["sampling=3"])
    assert "needs a mapping" in error_of(write_yaml(tmp_path, "sampling: 3\n"), [])


@pytest.mark.parametrize("override, key", [("sampling.top_p=0.9", "sampling.top_p"),
                                           ("sampling.top_k=50", "sampling.top_k")])
def test_truncated_sampling_refused(override, key):
    msg = error_of(None, [override])
    assert key in msg and "importance weights" in msg and "docs/method.md §1" in msg


def test_single_batch_requires_equal_batches():
    msg = error_of(None, ["estimators.mode=single_batch", "sampling.B_U=4"])
    assert "single_batch" in msg and "sampling.B_E == sampling.B_U" in msg
    cfg = load_config(None, ["estimators.mode=single_batch", "sampling.B_E=6", "sampling.B_U=6"])
    assert cfg.estimators.mode == "single_batch"


def test_empty_etas_refused():
    assert "estimators.etas is empty" in error_of(None, ["estimators.etas=[]"])


def test_dump_reload_round_trip(tmp_path):
    cfg = load_config(None, ["estimators.etas=[0,1e-5,3e-4]", "sampling.temperature=0.6", "update.loss=dapo",
                             "checkpoint.path=/data/ckpt", "memory.profile=true"])
    out = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out, [])
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)


def test_hash_stable_and_sensitive():
    base = config_hash(load_config(None, []))
    assert len(base) == 16 and int(base, 16) >= 0
    assert config_hash(load_config(None, [])) == base
    assert config_hash(load_config(None, ["sampling.seed=1235"])) != base
    assert config_hash(load_config(None, ["estimators.etas=[0,1e-6,1e-5,2e-4]"])) != base


def test_help_lists_every_key():
    text = format_config_help()
    for key in ("sampling.B_E", "estimators.etas", "update.route", "device", "output.save_update_vector"):
        assert key in text
    assert "update_vector, real_step" in text


def test_subprocess_error_exit_code():
    code = ("from probe_dist.config import load_config, ConfigError; import sys\n"
            "try: load_config(None, sys.argv[1:])\n"
            "except ConfigError as e: print('error:', e, file=sys.stderr); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code, "sampling.temprature=1"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "error: unknown config key 'sampling.temprature'" in proc.stderr
    assert "did you mean 'sampling.temperature'?" in proc.stderr
