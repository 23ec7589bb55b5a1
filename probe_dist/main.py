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
from pathlib import Path

from probe_dist import __version__
from probe_dist.config import ConfigError, config_hash, format_config_help, load_config
from probe_dist.config_schema import ProbeConfig
from probe_dist.errors import UserInputError

log = logging.getLogger("probe_dist")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def parse_args(argv):
    """The command line `argv` (without the program name) as an argparse.Namespace: config, overrides (a list
    of `section.key=value`), quiet, verbose, help_config. argparse prints usage and raises SystemExit(2)
    on unknown options, and SystemExit(0) after --help. Options may stand before, between or after overrides."""
    p = argparse.ArgumentParser(prog="probe-dist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (default: built-in defaults, toy checkpoint)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.B_E=32 estimators.etas=[0,1e-5]")
    p.add_argument("--quiet", action="store_true",
                   help="warnings only, and no progress bars unless output.progress=true asks for them")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    return p.parse_intermixed_args(argv)  # options anywhere among the overrides (a=b --quiet c=d)


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


def run(cfg, rt, out_dir: Path, quiet: bool = False) -> dict:
    """Build and run the probe; write every output file into `out_dir` (the staging directory) on rank 0. Rank 0
    shows a progress bar per phase when output.progress asks for one (runtime/progress.py); `quiet` (--quiet)
    turns off the bars output.progress=null would show on a terminal."""
    from probe_dist.runtime import progress

    setting = False if quiet and cfg.output.progress is None else cfg.output.progress
    progress.configure(progress.wanted(setting, rt.rank))
    try:
        return _run(cfg, rt, out_dir)
    finally:
        progress.configure(False)  # a later probe in this process (the online probe, tests) shows none


def _run(cfg, rt, out_dir: Path) -> dict:
    from probe_dist.assemble import build_probe
    from probe_dist.report.build import build_outputs
    from probe_dist.results import ProbeResult
    from probe_dist.runtime.clock import send_test_signal
    from probe_dist.runtime.signals import StopRequested

    send_test_signal(cfg.debug.signal, rt.rank, "load")
    try:
        probe = build_probe(cfg, rt)
    except StopRequested:  # a stop signal while the checkpoint was read: nothing computed, nothing to restore
        log.warning("stop requested while loading the checkpoint: nothing was computed and no training state was "
                    "changed; writing an interrupted summary")
        result = ProbeResult(status="interrupted", restore_verified_ranks=[True] * rt.world_size)
        return build_outputs(cfg, rt, result, {**result.summary(), "interrupted_while": "loading"}, out_dir=out_dir,
                             param_names=[])
    result = probe.run()
    summary = result.summary()
    summary.update(probe.load_info)
    summary["warnings"] = [*probe.load_info.get("provenance/load_warnings", []), *summary.get("warnings", [])]
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
        from probe_dist.report.trackers import check_available

        check_available(cfg.output.report_to)  # before anything loads
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
        summary = run(cfg, rt, staging.path, quiet=args.quiet)
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
    if len(text) > 4000:  # a value from a damaged file can be megabytes: keep the start (what) and the end (fix)
        text = f"{text[:2000]} [... {len(text) - 3000} characters left out ...] {text[-1000:]}"
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
