"""Memory planner: each phase's peak per GPU from the model config alone, and microbatch sizes that fit.

    python -m probe_dist.plan --config configs/a100_40gb_8gpu.yaml --gpu-mem 40GiB [key=value ...]
        [--model-config qwen2.5-1.5b|toy|PATH] [--lora-r 64] [--lora-alpha 128] [--lora-targets q_proj,...]
        [--world-size 8] [--prompt-tokens N] [--margin 0.10] [--reserve 1GiB] [--json]

The model is instantiated on the meta device (no weights, no download) and the LoRA adapter is attached with
peft on the meta model, so parameter counts are exact. Peaks are what the CUDA caching allocator reports as
*allocated* (torch.cuda.max_memory_allocated); the CUDA context and allocator slack are covered by `--reserve`
and `--margin`, which are taken off the GPU memory before anything is compared with it. Exit status: 0 when some
microbatch sizes fit (the configured ones, or the proposal printed), 1 when nothing fits, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from probe_dist.plan import bytes as byte_model
from probe_dist.plan.planner import DEFAULT_MARGIN, format_plan, parse_bytes, plan_memory
from probe_dist.plan.shape import PlanError


def _description() -> str:
    """This module's docstring followed by the byte model's memory model (the --help text)."""
    return __doc__ + "\n" + byte_model.__doc__.split("\n\n", 1)[1]


def main(argv=None) -> int:
    """The command line; returns the exit status (0: some sizes fit, 1: nothing fits, 2: bad input)."""
    import warnings

    from probe_dist.config import ConfigError, load_config
    from probe_dist.errors import UserInputError
    from probe_dist.state import bounds

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    p = argparse.ArgumentParser(prog="python -m probe_dist.plan", description=_description(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (as for probe_dist.main)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. memory.microbatch_grad=4")
    p.add_argument("--gpu-mem", help="memory per GPU, e.g. 40GiB or 80GB (default: memory.gpu_mem_gib)")
    p.add_argument("--model-config", help="qwen2.5-1.5b, toy, a model directory or a config.json "
                                          "(default: the checkpoint's base, else the toy model)")
    p.add_argument("--lora-r", type=int, help="LoRA rank when there is no adapter_config.json (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (does not change memory)")
    p.add_argument("--lora-targets", help="comma-separated LoRA target modules (default: all projections)")
    p.add_argument("--world-size", type=int, help="GPUs in the job (default: $WORLD_SIZE, else 8 for ddp/fsdp2)")
    p.add_argument("--prompt-tokens", type=int, help="longest prompt in tokens (default: measured, or 512)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="safety margin (fraction of GPU memory)")
    p.add_argument("--reserve", default="1GiB", help="CUDA context / workspace reserve outside the allocator")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        with bounds.using(cfg.checkpoint.read_limits):  # the checkpoint files it reads, as the probe reads them
            plan = plan_memory(cfg, parse_bytes(a.gpu_mem) if a.gpu_mem else None, a.model_config,
                               lora_r=a.lora_r, lora_alpha=a.lora_alpha,
                               lora_targets=[t for t in a.lora_targets.split(",") if t] if a.lora_targets else None,
                               world_size=a.world_size, prompt_tokens=a.prompt_tokens, margin=a.margin,
                               reserve_bytes=parse_bytes(a.reserve))
    except (ConfigError, PlanError, UserInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if a.json else format_plan(plan))
    return 0 if plan["proposal"]["fits"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
