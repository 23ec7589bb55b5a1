"""CLI: config + overrides → runtime → checkpoint → probe → report.

    python -m probe_dist.main --config configs/toy_cpu.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m probe_dist.main --config configs/a100_40gb_8gpu.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from probe_dist import __version__
from probe_dist.config import ConfigError, config_hash, format_config_help, load_config
from probe_dist.config_schema import ProbeConfig
from probe_dist.errors import UserInputError

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


def setup_logging(rank: int, level: str, log_dir: Path | None = None) -> None:
    """Log to stderr and, with `log_dir`, to a fresh file there (`probe.log`, or `probe.rankN.log` for rank N > 0)."""
    from probe_dist.report.publish import log_name

    fmt = logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger("probe_dist")
    close_log_files()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if log_dir is not None:
        fh = logging.FileHandler(log_dir / log_name(rank), mode="w", encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel({"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}[level])
    root.propagate = False


def close_log_files() -> None:
    """Flush and close the log files (before the staging directory is published or pruned); stderr stays."""
    root = logging.getLogger("probe_dist")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()


def _log_to_files(level: int, msg: str) -> None:
    """A record for the log files only (the console gets its own, differently ordered, message)."""
    root = logging.getLogger("probe_dist")
    record = root.makeRecord(root.name, level, __file__, 0, msg, None, None)
    for h in root.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def build_probe(cfg: ProbeConfig, rt):
    """Config → loaded checkpoint → the whole config resolved once → wrapped policy → a ready Probe.

    Resolution (the toy checkpoint's path, checkpoint-recorded defaults, the memory plan's microbatch sizes)
    happens here and only here; the Probe and its steps get the final, frozen config.
    """
    from probe_dist import validate
    from probe_dist.data.prompts import load_prompts_with_lines, prompt_source_name
    from probe_dist.data.rewards import get_rewards, is_plugin_spec
    from probe_dist.model.load import (
        CheckpointError,
        check_trainable_count,
        load_model,
        load_optimizer,
        load_tokenizer,
        name_optimizer_blob,
        set_lr_ratios,
        trainable_parameters,
    )
    from probe_dist.model.policy import unwrap_causal_lm
    from probe_dist.model.runner import PolicyRunner
    from probe_dist.model.sources import open_checkpoint
    from probe_dist.probe import Probe
    from probe_dist.recipe import explicit_keys, format_settings, recipe_notes, resolve_recipe
    from probe_dist.rollout.sample import response_eos_ids
    from probe_dist.runtime.oom import MicrobatchSizes
    from probe_dist.runtime.strategy import build_strategy

    explicit = explicit_keys(cfg)  # before any `replace`, which drops the record
    # Every input is checked before the first model pass, cheapest first (probe_dist/validate.py): prompt file and
    # reward, checkpoint paths and JSON files, training settings, tokenizer, prompt lengths, optimizer file, weights.
    prompts = load_prompts_with_lines(cfg.sampling.prompts, cfg.sampling.split,
                                      require_answer=not is_plugin_spec(cfg.sampling.reward))
    prompt_source = prompt_source_name(cfg.sampling.prompts, cfg.sampling.split)
    get_rewards(cfg.sampling.reward)
    if not (cfg.checkpoint.path or cfg.checkpoint.base):
        from probe_dist.toy import ensure_toy_checkpoint

        toy = ensure_toy_checkpoint(cfg.checkpoint.toy_seed, cfg.checkpoint.toy_cache, rt)
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, path=str(toy)))
    source = open_checkpoint(cfg.checkpoint)
    paths = source.paths
    cfg, settings, overrides, unsupported = resolve_recipe(cfg, paths.training_args, explicit=explicit,
                                                           kind=source.recipe_kind, source=paths.training_args_path,
                                                           ref_adapter=source.ref_adapter,
                                                           has_adapter=paths.adapter is not None)
    eta_train = _eta_train(source, cfg)
    if eta_train is not None and eta_train > 0 and cfg.estimators.eta_train and eta_train not in cfg.estimators.etas:
        cfg = replace(cfg, estimators=replace(cfg.estimators, etas=sorted([*cfg.estimators.etas, eta_train])))
    if rt.is_main:
        log.info("training recipe (config > checkpoint %s > default):\n%s", paths.training_args_path or "(none)",
                 format_settings(settings))
        for note in recipe_notes(paths.training_args, cfg):
            log.warning("%s", note)
        if overrides:
            log.warning("settings given in the config differ from the checkpoint's recorded training: %s. The probe "
                        "measures the configured update, not the trained one.", "; ".join(overrides))
        if eta_train is not None:
            log.info("eta_train = %g: the lr the saved scheduler gives the next training step (%s)%s", eta_train,
                     source.scheduler.path, "" if eta_train > 0 else "; the schedule has ended (lr 0), so it adds "
                     "no sweep point")
    reward_folder = validate.check_grade(cfg, rt.world_size, rt.is_main, explicit)  # GRADE: refusals, reward model
    if reward_folder is not None:
        cfg = replace(cfg, update=replace(cfg.update, reward_model=str(reward_folder)))  # recorded as used
    validate.note_prompt_repeats(len(prompts), cfg.sampling, cfg.estimators.mode, prompt_source, rt.is_main)
    validate.note_fixed_prompt_coverage(len(prompts), cfg.sampling, cfg.estimators.se, prompt_source, rt.is_main)
    torch.set_float32_matmul_precision(cfg.precision.matmul)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[cfg.precision.dtype]
    if dtype == torch.bfloat16:
        log.warning("precision.dtype=bfloat16: θ + ηu is rounded to bf16 (8 bits of mantissa), so ΔH_true at small η "
                    "is quantised and can disagree with δH₁; use float32 for numbers you will report.")
    if cfg.debug.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    tokenizer = load_tokenizer(paths.tokenizer, paths.tokenizer_source)
    validate.check_prompts_fit(prompts, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens,
                               max_positions=validate.model_max_positions(paths.base), source=prompt_source,
                               config_file=paths.base / "config.json", is_main=rt.is_main, bos=cfg.sampling.bos)
    if reward_folder is not None and (reward_folder / "config.json").is_file():  # GRADE's reward model reads P + T
        validate.check_prompts_fit(prompts, tokenizer, max_new_tokens=cfg.sampling.max_new_tokens,
                                   max_positions=validate.model_max_positions(reward_folder), source=prompt_source,
                                   config_file=reward_folder / "config.json", is_main=False, bos=cfg.sampling.bos)
    optimizer_blob = source.read_optimizer()  # weights_only; finite state, before the model loads
    model = load_model(paths, dtype, rt.device)  # complete weight files, finite weights
    source.load_weights(model)  # trainable weights a format keeps outside the model folders (fp32 masters)
    trainable = trainable_parameters(model)
    n_trainable = check_trainable_count(trainable, cfg.memory.max_trainable_params, cfg.memory.allow_full_finetune)
    optimizer_blob = name_optimizer_blob(optimizer_blob, model, paths.optimizer)
    optimizer, coverage = load_optimizer(paths.optimizer, trainable, blob=optimizer_blob)
    lr_ratios = set_lr_ratios(optimizer, source.scheduler.base_lrs if source.scheduler else None)
    inconsistent = source.consistency_warnings(optimizer, coverage["naming"])
    if inconsistent and rt.is_main:
        log.warning("the checkpoint's pieces may come from different saves: %s. Check that optimizer, scheduler and "
                    "trainer state are from the same checkpoint.", "; ".join(inconsistent))
    if cfg.update.route == "real_step":
        _check_real_step_dtypes(optimizer, trainable)
    by_id = {id(p): (n, p) for n, p in trainable}
    ordered = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]
    log.info("loaded %s: %d trainable tensors (%s parameters), optimizer state coverage %d/%d, lr ratios %s",
             paths.base, len(ordered), f"{n_trainable:,}", coverage["with_state"], coverage["params"],
             [round(r, 6) for r in lr_ratios])
    memory_plan = None
    if cfg.memory.auto_microbatch:
        from probe_dist.plan import auto_microbatch_plan, proposed_sizes

        memory_plan = auto_microbatch_plan(cfg, model, rt.world_size, rt.device, tokenizer=tokenizer)
        # Every rank uses rank 0's sizes (same passes, same collectives).
        sizes = rt.broadcast_object(proposed_sizes(memory_plan))
        if sizes:
            cfg = replace(cfg, memory=replace(cfg.memory, **sizes))
    reward_model = None
    if reward_folder is not None:
        from probe_dist.model.reward_model import RewardModel

        causal = unwrap_causal_lm(model)
        reward_model = RewardModel.load(reward_folder, dtype=dtype, device=rt.device,
                                        vocab_size=causal.get_output_embeddings().weight.shape[0],
                                        embed=cfg.update.grade_embed)
        shared = hasattr(model, "disable_adapter") and reward_model.share_base(causal, model.disable_adapter)
        if rt.is_main:
            up = cfg.update
            log.info("GRADE (%s): reward model %s%s; τ_g=%g, top-k=%s, soft embeddings %s, β=%g, T=%d relaxed tokens",
                     up.loss, reward_folder, " (its backbone is the frozen base: rewards read off the reference's "
                     "pass)" if shared else "", up.grade_tau, up.grade_top_k or "all", up.grade_embed, up.kl_coef,
                     cfg.sampling.max_new_tokens)
    strategy = build_strategy(cfg, rt, model)
    runner = PolicyRunner(model=model, strategy=strategy, trainable=ordered, device=rt.device,
                          temperature=cfg.sampling.temperature,
                          sizes=MicrobatchSizes(score=cfg.memory.microbatch_score, grad=cfg.memory.microbatch_grad),
                          accumulator_device=cfg.memory.accumulator_device, auto_microbatch=cfg.memory.auto_microbatch,
                          reward_model=reward_model)
    try:
        eos_ids = response_eos_ids(tokenizer, getattr(unwrap_causal_lm(model), "generation_config", None))
    except ValueError as exc:
        raise CheckpointError(f"{exc}: responses could never end. Set eos_token in the tokenizer "
                              f"({str(paths.tokenizer)!r}) or eos_token_id in the base's generation_config.json.") from None
    probe = Probe(cfg, rt, runner, tokenizer=tokenizer, optimizer=optimizer, eos_ids=eos_ids)
    probe.load_info = {"sampling/eos_ids": eos_ids, "provenance/optimizer_coverage": coverage,
                       "provenance/trainable_params": n_trainable,
                       "provenance/recipe_ignored": unsupported,
                       "provenance/settings": settings, "provenance/recipe_overrides": overrides,
                       "provenance/recipe_notes": recipe_notes(paths.training_args, cfg),
                       "provenance/checkpoint_source": source.provenance(), "provenance/lr_ratios": lr_ratios,
                       "provenance/checkpoint_inconsistencies": inconsistent,
                       "eta_train": eta_train,
                       "provenance/reward_model": ({"path": str(reward_folder), "shared_base": reward_model.shared}
                                                   if reward_model is not None else None),
                       "provenance/memory_plan": {k: memory_plan[k] for k in ("peak_bytes", "peak_phase", "fits",
                                                                              "proposal")} if memory_plan else None}
    if rt.is_main:
        log.info("resolved config hash %s (summary.json provenance/config_hash, config.yaml)", config_hash(probe.cfg))
    return probe


def _eta_train(source, cfg) -> float | None:
    """The first param group's lr for the next training step, from the saved scheduler (None: no scheduler)."""
    lrs = source.scheduler.next_lrs if source.scheduler else None
    return float(lrs[0]) if lrs else None


def _check_real_step_dtypes(optimizer, trainable) -> None:
    """update.route=real_step steps torch's AdamW, which needs the moments in the parameter's dtype."""
    from probe_dist.model.load import CheckpointError

    for name, p in trainable:
        moments = [v for k, v in optimizer.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
        if any(m.dtype != p.dtype for m in moments):
            raise CheckpointError(
                f"update.route=real_step cannot step {name}: its saved AdamW moments are {moments[0].dtype} and the "
                f"parameter {p.dtype}, and torch's AdamW needs one dtype (casting the moments would change u). Use "
                "update.route=update_vector (the default), which forms θ + ηu in float64 from the saved moments.")


def run(cfg, rt, out_dir: Path) -> dict:
    """Build and run the probe; write every output file into `out_dir` (the staging directory) on rank 0."""
    from probe_dist.probe import send_test_signal
    from probe_dist.report.build import build_outputs

    send_test_signal(cfg.debug.signal, rt.rank, "load")
    probe = build_probe(cfg, rt)
    result = probe.run()
    summary = result.summary()
    summary.update(probe.load_info)
    return build_outputs(probe.cfg, rt, result, summary, out_dir=out_dir,
                         param_names=[n for n, _ in probe.trainable], tokenizer=probe.tokenizer)


def main(argv=None) -> int:
    """The CLI. Exit 0: published, status completed or interrupted; 2: a user-input error (one paragraph on stderr,
    no traceback, nothing left behind); 1: an internal error (traceback; only the logs kept, in the staging
    directory), or a published run whose status says its numbers failed a check (failed_check).

    Every file of the run goes to a staging directory next to output.dir (`report/publish.py`); rank 0 publishes
    it as a whole on success, so output.dir always holds exactly one finished run, and a failed run leaves it
    byte-identical to before.
    """
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

    def level(configured: str) -> str:
        return "warning" if args.quiet else "debug" if args.verbose else configured

    setup_logging(rank, level("info"))
    try:
        cfg = load_config(args.config, args.overrides)
    except UserInputError as exc:
        return _user_error(exc)
    setup_logging(rank, level(cfg.log_level))
    from probe_dist.report.publish import PublishError, discard, publish
    from probe_dist.runtime.dist import init_runtime

    rt = staging = None
    try:
        rt = init_runtime(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        staging = _stage(cfg, rt)
        setup_logging(rt.rank, level(cfg.log_level), staging.path)
        rt.barrier()  # every rank's log exists before any rank can fail (and rank 0 remove the staging directory)
        log.info("probe_dist %s: world size %d, device %s, config hash %s (as given; resolved: see below)",
                 __version__, rt.world_size, rt.device,
                 config_hash(cfg))
        log.info("staging this run in %s; it replaces output.dir %s when it finishes", staging.path, staging.out_dir)
        summary = run(cfg, rt, staging.path)
        status = summary.get("status")
        if not rt.is_main:
            close_log_files()
        rt.barrier()  # every rank has finished writing into the staging directory
        if rt.is_main:
            kept = status == "interrupted" and _holds_completed_run(staging.out_dir)
            if not kept:  # a finished run is published whatever its status; failed_check still exits 1
                publish(staging)
            close_log_files()
            from probe_dist.report.write import console_table

            print(console_table(summary), flush=True)
            if kept:  # an interrupted rerun never replaces a completed run
                print(f"the interrupted run was not published: output.dir {str(staging.out_dir)!r} holds a completed "
                      f"run, which is kept; this run's partial results are in {staging.path}.", file=sys.stderr,
                      flush=True)
            else:
                log.info("results in %s (status: %s)", cfg.output.dir, status)
            if status not in ("completed", "interrupted"):
                print(f"error: the run ended with status {status!r}: its results are in output.dir "
                      f"{str(staging.out_dir)!r} but not to be trusted; see \"warnings\" in its summary.json.",
                      file=sys.stderr, flush=True)
        rt.shutdown()
        code = 0 if status in ("completed", "interrupted") else EXIT_FAILURE
        if rt.world_size > 1:
            _exit_now(code)
        return code
    except UserInputError as exc:
        log.debug("%s", traceback.format_exc())
        close_log_files()
        code = _user_error(exc)
        if staging is not None and rt.is_main:
            discard(staging, keep_logs=False)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - report which rank failed and why, then end
        r = rt.rank if rt else rank
        text = f"rank {r} failed: {type(exc).__name__}: {exc}"
        _log_to_files(logging.ERROR, f"{text}\n{traceback.format_exc()}")
        close_log_files()
        traceback.print_exc(file=sys.stderr)
        if staging is not None and rt.is_main and not isinstance(exc, PublishError):
            discard(staging, keep_logs=True)  # a failed publish keeps the staged results: they are complete
        print(f"error: {text}" + _where_logs_are(staging, results=isinstance(exc, PublishError)), file=sys.stderr)
        code = EXIT_FAILURE
    # Failure path: no barrier (peers may be stuck elsewhere); torchrun tears down the other ranks, and a bare
    # launch ends them at the collective timeout.
    if rt is not None:
        rt.abandon()
    return code


def _holds_completed_run(out_dir: Path) -> bool:
    try:
        return json.loads((Path(out_dir) / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _exit_now(code: int) -> None:
    """End a finished multi-rank worker without the interpreter's teardown.

    After barrier + destroy_process_group every rank is done, yet gloo's background threads occasionally abort the
    process in C++ static destructors at interpreter exit ("terminate called without an active exception"; about 1
    in 25 torchrun launches here), which turns a published, correct run into a failed torchrun job. Everything is
    flushed and closed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stage(cfg: ProbeConfig, rt):
    """Rank 0 checks output.dir and creates the staging directory; every rank gets it (or rank 0's error)."""
    from probe_dist.errors import OutputDirError
    from probe_dist.report.publish import prepare

    outcome, error = None, None
    if rt.is_main:
        try:
            if not cfg.output.overwrite and (Path(cfg.output.dir) / "summary.json").exists():
                raise ConfigError(f"output.dir {cfg.output.dir!r} already holds a summary.json and "
                                  "output.overwrite=false; choose a new output.dir or set output.overwrite=true.")
            outcome = ("ok", prepare(cfg.output.dir))
        except UserInputError as exc:
            outcome, error = ("user", str(exc)), exc
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, not wait at the broadcast
            outcome, error = ("internal", f"{type(exc).__name__}: {exc}"), exc
    kind, value = rt.broadcast_object(outcome)
    if error is not None:
        raise error
    if kind == "user":
        raise OutputDirError(value)
    if kind == "internal":
        raise RuntimeError(f"rank 0 could not create the staging directory: {value}")
    return value


def _user_error(exc: BaseException) -> int:
    """One paragraph on stderr, no traceback."""
    text = re.sub(r"\n\s*\n", "\n", str(exc).strip())
    print(f"error: {text}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _where_logs_are(staging, *, results: bool) -> str:
    if staging is None or not staging.path.is_dir():
        return ""
    kept = "the complete results and logs of this run are" if results else "the logs of this run are"
    state = "is unchanged" if os.path.lexists(staging.out_dir) else "was not created"
    return f"\n{kept} in {staging.path}; output.dir {staging.out_dir} {state}."


if __name__ == "__main__":
    sys.exit(main())
