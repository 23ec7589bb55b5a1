"""Load, validate and dump the probe configuration (the schema lives in `probe_dist.config_schema`).

A config is built in three layers: schema defaults, then an optional YAML file (a mapping of sections, each
a mapping of keys), then dotted command-line overrides `section.key=value` (or `device=cpu` for top-level
keys). Every value is checked against the dataclass annotation and the field metadata (ge/gt/le/choices),
then cross-field rules are applied. Any problem raises `ConfigError`, whose message is meant for the person
running the probe: it names the key, what is wrong, and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from probe_dist.config_schema import ProbeConfig
from probe_dist.errors import UserInputError

OVERRIDE_FORM = "expected the form section.key=value, e.g. sampling.B_E=16, estimators.etas=[0,1e-5] or device=cpu"


class ConfigError(UserInputError, ValueError):
    """A configuration problem, worded for people: the key, the problem, and the fix."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
    key: str  # dotted name, e.g. "sampling.B_E"
    field: dataclasses.Field
    hint: Any  # resolved annotation, e.g. int, float | None, list[float]


@functools.cache
def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(ProbeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ProbeConfig) if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def _leaves() -> dict[str, _Leaf]:
    """Every settable key in schema order: section keys first, then top-level keys."""
    leaves = {}
    for name, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            leaves[f"{name}.{f.name}"] = _Leaf(f"{name}.{f.name}", f, hints[f.name])
    top_hints = typing.get_type_hints(ProbeConfig)
    for f in dataclasses.fields(ProbeConfig):
        if f.name not in _sections():
            leaves[f.name] = _Leaf(f.name, f, top_hints[f.name])
    return leaves


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """`float | None` -> (float, True); `int` -> (int, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _type_name(hint: Any) -> str:
    base, optional = _split_optional(hint)
    names = {bool: "boolean (true/false)", int: "integer", float: "number", str: "string"}
    name = names.get(base, "list of numbers")
    return f"{name} or null" if optional else name


def _unknown_key(key: str, where: str, is_section: bool = False) -> ConfigError:
    head = key.split(".", 1)[0]
    if is_section or ("." in key and head not in _sections()):  # wrong section name: suggest a section
        what, pool, key = "section", list(_sections()), head
    else:
        what, pool = "key", list(_leaves()) + list(_sections())
    same_name = [k for k in _leaves() if what == "key" and k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    # Case-insensitive first (sampling.B_e → sampling.B_E), then by similarity.
    same_case = [k for k in pool if k.lower() == key.lower()]
    by_lower = {k.lower(): k for k in pool}
    close = [by_lower[m] for m in difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)]
    match = same_name or same_case or close
    hint = f"did you mean '{match[0]}'?" if match else "run with --help-config to list the valid keys"
    return ConfigError(f"unknown config {what} '{key}'{where}; {hint}")


def _leaf(key: str, where: str) -> _Leaf:
    if key in _sections():
        example = next(k for k in _leaves() if k.startswith(key + "."))
        raise ConfigError(f"'{key}' is a config section, not a value{where}; set its keys, e.g. {example}=...")
    if key not in _leaves():
        raise _unknown_key(key, where)
    return _leaves()[key]


def _as_float(value: Any) -> float | None:
    """A number (or a numeric string such as '1e-5', which YAML 1.1 leaves as a string) as float; else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value.strip()) if isinstance(value, str) else None
    except ValueError:
        return None


def _check_value(leaf: _Leaf, value: Any) -> Any:
    """Type-check and convert one value, then apply the field's range and choices."""
    base, optional = _split_optional(leaf.hint)
    meta = leaf.field.metadata
    name = f"config key '{leaf.key}' ({meta.get('help', 'no description')})"

    def bad(expected: str, note: str = "") -> ConfigError:
        return ConfigError(f"{name} expects {expected}, got {value!r} ({type(value).__name__}){note}")

    if value is None:
        if optional:
            return None
        raise bad(_type_name(leaf.hint), "; this key has no null value")
    if base is bool:
        if not isinstance(value, bool):
            raise bad("a boolean" + (" or null" if optional else ""),
                      "; write true or false" + (" (or null)" if optional else ""))
    elif base is int:
        if isinstance(value, float) and value.is_integer():
            raise bad("an integer", f"; write {int(value)} without a decimal point")
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif base is float:
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        value = number
    elif base is str:
        if not isinstance(value, str):
            raise bad("a string", "; quote it in YAML if needed")
    else:  # list[float]: the learning-rate sweep
        if not isinstance(value, list):
            raise bad("a list of numbers", f", e.g. {leaf.key}=[0,1e-5,1e-4]")
        numbers = [_as_float(v) for v in value]
        for original, number in zip(value, numbers):
            if number is None or not math.isfinite(number) or number < 0:
                raise ConfigError(f"{name} must be a list of finite numbers >= 0, e.g. {leaf.key}=[0,1e-5,1e-4]; "
                                  f"element {original!r} of {value!r} is not")
        value = numbers

    ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        allowed = " and ".join(f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None)
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices) + (" or null" if optional else "")
        raise ConfigError(f"{name} must be one of {allowed}; got {value!r}")
    return value


def _flatten_yaml(data: Any, path: str) -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: raw value}, refusing unknown sections and keys."""
    where = f" in {path}"
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (e.g. 'sampling:' with keys below it), "
                          f"got a {type(data).__name__}")
    flat: dict[str, Any] = {}
    for name, value in data.items():
        name = str(name)
        if name not in _sections():
            if isinstance(value, dict) and name not in _leaves():
                raise _unknown_key(name, where, is_section=True)
            _leaf(name, where)  # raises for unknown keys
            flat[name] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                flat[_leaf(f"{name}.{key}", where).key] = item
        elif value is not None:  # an empty section is fine
            raise ConfigError(f"'{name}'{where} is a section and needs a mapping of keys below it, got {value!r}")
    return flat


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"bad override {text!r}: {OVERRIDE_FORM}")
    leaf = _leaf(key, f" (override {text!r})")
    base, optional = _split_optional(leaf.hint)
    choices = leaf.field.metadata.get("choices", ())
    if optional and raw.strip().lower() in ("", "null", "none", "~") and raw.strip() not in choices:
        return key, None  # "none" is a value, not null, where it is one of the choices (update.scale_rewards)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if base is str:  # paths and names are taken verbatim
            return key, raw
        raise ConfigError(f"cannot parse the value of override {text!r} ({exc}); {OVERRIDE_FORM}") from None
    return key, raw if base is str and not isinstance(value, str) else value


def _check_consistency(cfg: ProbeConfig) -> None:
    s, e = cfg.sampling, cfg.estimators
    why = ("truncated sampling support makes the importance weights π_θ'/π_θ (and the entropy of the "
           "sampling distribution) wrong, so the probe requires sampling.top_p=1.0 and sampling.top_k=0 "
           "(docs/method.md §1)")
    if s.top_p != 1.0:
        raise ConfigError(f"sampling.top_p={s.top_p} is not supported: {why}. Set sampling.top_p=1.0 or remove it.")
    if s.top_k != 0:
        raise ConfigError(f"sampling.top_k={s.top_k} is not supported: {why}. Set sampling.top_k=0 or remove it.")
    if e.mode == "single_batch" and (s.B_E != s.B_U or s.G_E != s.G_U):
        raise ConfigError(
            f"estimators.mode=single_batch uses one batch as both E and U, so it requires sampling.B_E == "
            f"sampling.B_U and sampling.G_E == sampling.G_U; got B_E={s.B_E}, B_U={s.B_U}, G_E={s.G_E}, "
            f"G_U={s.G_U}. Make them equal, or use estimators.mode=two_batch.")
    if not e.etas:
        raise ConfigError("estimators.etas is empty; give at least one learning rate, e.g. estimators.etas=[0,1e-5,1e-4]")
    if e.se == "fixed_prompts":
        if not e.explain:
            raise ConfigError("estimators.se=fixed_prompts needs each E sequence's contribution to δH₁, which the "
                              "explanation pass computes; set estimators.explain=true or use estimators.se=population.")
        if s.G_E < 2:
            raise ConfigError(f"estimators.se=fixed_prompts estimates the variance between the responses of each "
                              f"prompt, so it needs sampling.G_E >= 2; got G_E={s.G_E}. Raise sampling.G_E or use "
                              "estimators.se=population.")
        if cfg.distributed.strategy == "fsdp2":
            raise ConfigError("estimators.se=fixed_prompts needs the explanation pass, which does not run under "
                              "distributed.strategy=fsdp2 (forward-mode AD over a sharded model); use "
                              "distributed.strategy=ddp or estimators.se=population.")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ProbeConfig:
    """Defaults <- YAML file at `path` (if any) <- `section.key=value` overrides; validated. Raises ConfigError."""
    flat: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path} (check the path, or omit it to use the defaults)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        flat.update(_flatten_yaml(data, str(path)))
    for text in overrides or ():
        key, value = _parse_override(text)
        flat[key] = value

    section_kwargs: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    top_kwargs: dict[str, Any] = {}
    for key, value in flat.items():
        checked = _check_value(_leaves()[key], value)
        section, _, name = key.rpartition(".")
        (section_kwargs[section] if section else top_kwargs)[name] = checked
    cfg = ProbeConfig(**{n: cls(**section_kwargs[n]) for n, cls in _sections().items()}, **top_kwargs)
    _check_consistency(cfg)
    # The keys the user gave, for the recipe's precedence (config > checkpoint > default; `probe_dist.resolve`). Not a
    # field: it is neither hashed nor dumped, and `dataclasses.replace` drops it (read it first).
    object.__setattr__(cfg, "_explicit", frozenset(flat))
    return cfg


def config_to_dict(cfg: ProbeConfig) -> dict[str, Any]:
    """The fully resolved config as a nested plain dict (sections in schema order)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: ProbeConfig) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of the resolved config."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def dump_config(cfg: ProbeConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
    path.write_text(f"# probe_dist resolved config (hash {config_hash(cfg)})\n{body}", encoding="utf-8")


def format_config_help() -> str:
    """Every dotted key with its type, default, allowed values and help text (for `--help-config`)."""
    lines = ["Configuration keys (set in YAML under the section, or on the command line as section.key=value):"]
    defaults = config_to_dict(ProbeConfig())
    section = None
    for key, leaf in _leaves().items():
        head, _, name = key.rpartition(".")
        if head != section:
            section = head
            lines.append(f"\n[{head or 'top level'}]")
        default = defaults[head][name] if head else defaults[name]
        meta = leaf.field.metadata
        allowed = [f"{op} {meta[k]}" for op, k in ((">=", "ge"), (">", "gt"), ("<=", "le")) if k in meta]
        if "choices" in meta:
            allowed.append("one of " + ", ".join(meta["choices"]))
        extra = f"; {', '.join(allowed)}" if allowed else ""
        lines.append(f"  {key:<34} {_type_name(leaf.hint)}, default {json.dumps(default)}{extra}")
        lines.append(f"  {'':<34} {meta.get('help', '')}")
    return "\n".join(lines)


def explicit_keys(cfg) -> frozenset[str]:
    """The config keys the user gave (`probe_dist.config.load_config` records them); for a config built in code,
    the keys whose value differs from the schema default."""
    given = getattr(cfg, "_explicit", None)
    if given is not None:
        return given
    from probe_dist.config_schema import ProbeConfig

    default, out = ProbeConfig(), set()
    for section in dataclasses.fields(ProbeConfig):
        ours, theirs = getattr(cfg, section.name), getattr(default, section.name)
        if dataclasses.is_dataclass(ours):
            out |= {f"{section.name}.{f.name}" for f in dataclasses.fields(ours)
                    if getattr(ours, f.name) != getattr(theirs, f.name)}
    return frozenset(out)
