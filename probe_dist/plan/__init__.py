"""Memory planner: each phase's peak per GPU from the model config alone, and microbatch sizes that fit.

    python -m probe_dist.plan --help

Modules: `shape` (the model's dimensions and exact parameter counts, on the meta device), `bytes` (the byte
model: each phase's peak from the shape and the run's sizes), `planner` (inputs, plan_memory, the proposal,
messages, auto_microbatch_plan) and `__main__` (the command line). What a run measures (bytes saved for
backward, RSS, CUDA peaks per phase) is `runtime.meter`.
"""

from probe_dist.phases import PHASES
from probe_dist.plan.bytes import (
    DTYPE_BYTES,
    GRAD_LOGITS_FACTOR,
    MIN_LOGITS_CHUNK,
    NOGRAD_LOGITS_FACTOR,
    GiB,
    Settings,
    logits_chunk_bytes,
    phase_peaks,
    saved_activation_bytes,
)
from probe_dist.plan.planner import (
    DEFAULT_MARGIN,
    DEFAULT_RESERVE,
    SIZE_KEYS,
    auto_microbatch_plan,
    format_plan,
    parse_bytes,
    plan_memory,
    proposed_sizes,
)
from probe_dist.plan.shape import (
    ALL_PROJECTIONS,
    LoraSpec,
    ModelShape,
    PlanError,
    builtin_model_config,
    load_model_config,
    model_shape,
    resolve_lora,
)

__all__ = [
    "ALL_PROJECTIONS", "DEFAULT_MARGIN", "DEFAULT_RESERVE", "DTYPE_BYTES", "GRAD_LOGITS_FACTOR", "MIN_LOGITS_CHUNK",
    "NOGRAD_LOGITS_FACTOR", "PHASES", "SIZE_KEYS", "GiB", "LoraSpec", "ModelShape", "PlanError", "Settings",
    "auto_microbatch_plan", "builtin_model_config", "format_plan", "load_model_config", "logits_chunk_bytes",
    "model_shape", "parse_bytes", "phase_peaks", "plan_memory", "proposed_sizes", "resolve_lora",
    "saved_activation_bytes",
]

