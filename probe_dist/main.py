"""CLI: config + overrides → runtime → checkpoint → probe → report.

    python -m probe_dist.main --config configs/toy_cpu.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m probe_dist.main --config configs/a100_40gb_8gpu.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from probe_dist import __version__
from probe_dist.config import ConfigError, config_hash, format_config_help, load_config
from probe_dist.config_schema import ProbeConfig
from probe_dist.model.load import CheckpointError

log = logging.getLogger("probe_dist")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def parse_args(argv):
    p = argparse.ArgumentParser(prog="probe-dist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (default: built-in defaults, toy checkpoint)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.B_E=32 estimators.etas=[0,1e-5]")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    return p.parse_args(argv)


def setup_logging(rank: int, level: str, out_dir: Path | None = None) -> None:
    fmt = logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("probe_dist")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if out_dir is not None:
        fh = logging.FileHandler(out_dir / ("probe.log" if rank == 0 else f"probe.rank{rank}.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel({"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[level])
    root.propagate = False


def resolve_from_checkpoint(cfg: ProbeConfig, training_args: dict) -> ProbeConfig:
    """The config with settings left unset (None) filled from the checkpoint's recorded training settings.

    Raises ConfigError when a setting is neither configured nor recorded, or the recorded loss is unsupported.
    """
    recorded = {
        ("sampling", "temperature"): training_args.get("temperature"),
        ("sampling", "max_new_tokens"): training_args.get("max_new_tokens"),
        ("update", "loss"): training_args.get("loss"),
        ("update", "grad_clip"): training_args.get("grad_clip", training_args.get("max_grad_norm")),
    }
    filled: dict[str, dict] = {"sampling": {}, "update": {}}
    for (section, key), value in recorded.items():
        if getattr(getattr(cfg, section), key) is None:
            if value is None and key != "grad_clip":
                raise ConfigError(f"{section}.{key} is not set and the checkpoint records no training value for it; "
                                  f"set it explicitly, e.g. {section}.{key}=...")
            filled[section][key] = value
    cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values) for section, values in filled.items()})
    if cfg.update.max_len is None:  # dr_grpo's L_max defaults to the response cap
        cfg = replace(cfg, update=replace(cfg.update, max_len=cfg.sampling.max_new_tokens))
    if cfg.update.loss not in ("grpo", "dr_grpo", "dapo"):
        raise ConfigError(f"checkpoint records loss {cfg.update.loss!r}; set update.loss to grpo, dr_grpo or dapo.")
    return cfg


def build_probe(cfg: ProbeConfig, rt):
    """Config → loaded checkpoint → the whole config resolved once → wrapped policy → a ready Probe.

    Resolution (the toy checkpoint's path, checkpoint-recorded defaults, the memory plan's microbatch sizes)
    happens here and only here; the Probe and its steps get the final, frozen config.
    """
    from probe_dist.model.load import (
        check_trainable_count,
        load_model,
        load_optimizer,
        load_tokenizer,
        resolve_paths,
        trainable_parameters,
    )
    from probe_dist.model.policy import unwrap_causal_lm
    from probe_dist.model.runner import PolicyRunner
    from probe_dist.probe import Probe
    from probe_dist.rollout.sample import response_eos_ids
    from probe_dist.runtime.oom import MicrobatchSizes
    from probe_dist.runtime.strategy import build_strategy

    if not (cfg.checkpoint.path or cfg.checkpoint.base):
        from probe_dist.toy import ensure_toy_checkpoint

        toy = ensure_toy_checkpoint(cfg.checkpoint.toy_seed, cfg.checkpoint.toy_cache, rt)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, path=str(toy)))
    paths = resolve_paths(cfg.checkpoint)
    cfg = resolve_from_checkpoint(cfg, paths.training_args)
    torch.set_float32_matmul_precision(cfg.precision.matmul)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[cfg.precision.dtype]
    if dtype == torch.bfloat16:
        log.warning("precision.dtype=bfloat16: θ + ηu is rounded to bf16 (8 bits of mantissa), so ΔH_true at small η "
                    "is quantised and can disagree with δH₁; use float32 for numbers you will report.")
    if cfg.debug.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    tokenizer = load_tokenizer(paths.tokenizer)
    model = load_model(paths, dtype, rt.device)
    trainable = trainable_parameters(model)
    n_trainable = check_trainable_count(trainable, cfg.memory.max_trainable_params, cfg.memory.allow_full_finetune)
    optimizer, coverage = load_optimizer(paths.optimizer, trainable)
    by_id = {id(p): (n, p) for n, p in trainable}
    ordered = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    log.info("loaded %s: %d trainable tensors (%s parameters), optimizer state coverage %d/%d",
             paths.base, len(ordered), f"{n_trainable:,}", coverage["with_state"], coverage["params"])
    memory_plan = None
    if cfg.memory.auto_microbatch:
        from probe_dist.plan import auto_microbatch_plan, proposed_sizes

        memory_plan = auto_microbatch_plan(cfg, model, rt.world_size, rt.device, tokenizer=tokenizer)
        # Every rank uses rank 0's sizes (same passes, same collectives).
        sizes = rt.broadcast_object(proposed_sizes(memory_plan))
        if sizes:
            cfg = replace(cfg, memory=replace(cfg.memory, **sizes))
    strategy = build_strategy(cfg, rt, model)
    runner = PolicyRunner(model=model, strategy=strategy, trainable=ordered, device=rt.device,
                          temperature=cfg.sampling.temperature,
                          sizes=MicrobatchSizes(score=cfg.memory.microbatch_score, grad=cfg.memory.microbatch_grad),
                          accumulator_device=cfg.memory.accumulator_device, auto_microbatch=cfg.memory.auto_microbatch)
    eos_ids = response_eos_ids(tokenizer, getattr(unwrap_causal_lm(model), "generation_config", None))
    probe = Probe(cfg, rt, runner, tokenizer=tokenizer, optimizer=optimizer, eos_ids=eos_ids)
    probe.load_info = {"sampling/eos_ids": eos_ids,"provenance/optimizer_coverage": coverage, "provenance/trainable_params": n_trainable,
                       "provenance/memory_plan": {k: memory_plan[k] for k in ("peak_bytes", "peak_phase", "fits",
                                                                              "proposal")} if memory_plan else None}
    return probe


def run(cfg, rt) -> dict:
    from probe_dist.report.build import build_outputs

    probe = build_probe(cfg, rt)
    result = probe.run()
    summary = result.summary()
    summary.update(probe.load_info)
    return build_outputs(probe.cfg, rt, result, summary, param_names=[n for n, _ in probe.trainable])


def main(argv=None) -> int:
    import warnings

    from probe_dist.runtime import signals

    # peft calls a transformers name deprecated in v5; not actionable for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    signals.install()  # first thing: a pre-emption signal during loading must not kill a rank silently
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.help_config:
        print(format_config_help())
        return 0
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    setup_logging(rank, "warning" if args.quiet else "debug" if args.verbose else "info")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet and not args.verbose:
        setup_logging(rank, cfg.log_level)
    from probe_dist.runtime.dist import init_runtime

    rt = None
    try:
        rt = init_runtime(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        out_dir = Path(cfg.output.dir)
        if not cfg.output.overwrite and (out_dir / "summary.json").exists():
            raise ConfigError(f"output.dir {str(out_dir)!r} already holds a summary.json and output.overwrite=false; "
                              "choose a new output.dir or set output.overwrite=true.")
        if rt.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        rt.barrier()
        setup_logging(rt.rank, "warning" if args.quiet else "debug" if args.verbose else cfg.log_level, out_dir)
        log.info("probe_dist %s: world size %d, device %s, config hash %s", __version__, rt.world_size, rt.device,
                 config_hash(cfg))
        summary = run(cfg, rt)
        if rt.is_main:
            from probe_dist.report.write import console_table

            print(console_table(summary), flush=True)
        rt.shutdown()
        return 0 if summary.get("status") in ("completed", "interrupted") else EXIT_FAILURE
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - report which rank failed and why, then end this rank
        r = rt.rank if rt else rank
        print(f"error: rank {r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        log.debug("%s", traceback.format_exc())
        traceback.print_exc(file=sys.stderr)
        code = EXIT_FAILURE
    # Failure path: no barrier (peers may be stuck elsewhere); torchrun tears down the other ranks, and a bare
    # launch ends them at the collective timeout.
    if rt is not None:
        rt.abandon()
    return code


if __name__ == "__main__":
    sys.exit(main())
