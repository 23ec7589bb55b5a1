"""report.html (rank 0 only): one static page that shows a run — its header numbers, ΔH_true against δH₁ (and
δH₁ + δH₂) over η, the importance-sampling diagnostics, the explanation's scalars, and the sequences and prompts
that moved entropy most (docs/method.md §5, §6, §10, §11).

The page is self-contained: figures are PNGs drawn with matplotlib (Agg) and embedded as base64 data URIs, the style
sheet is inline, and there is no script and no external reference, so it opens from a copied file or an e-mail.
Every piece of text — the decoded responses above all, which may hold markup — is escaped with html.escape.

It reads whatever the summary and the rows hold: an interrupted run's summary may lack any key, any number may be
None/NaN/±inf, and the rows may be empty or lack the explanation columns; a section without its inputs is replaced
by a one-line note. Sizes stay bounded for any number of rows: two 10-row tables, at most 50 prompts, two figures at
100 dpi.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Callable
from pathlib import Path

from probe_dist.report.figures import (
    as_float,
    diagnostics_figure,
    entropy_change_figure,
    finite,
    png,
    positive_sweep,
    pyplot,
)

log = logging.getLogger("probe_dist")

REPORT_NAME = "report.html"
TOP_SEQUENCES = 10    # rows in each "moved entropy most" table
MAX_PROMPTS = 50      # rows in the per-prompt table
TEXT_CHARS = 200      # response text shown per sequence

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
td.text { font-family: monospace; font-size: 0.85em; white-space: pre-wrap; word-break: break-all; max-width: 40em; }
p.note { color: #666; font-style: italic; }
ul.warnings li { color: #a40; }
img { max-width: 100%; }
"""


def write_report(out_dir: Path, summary: dict, rows: list[dict]) -> Path | None:
    """Write `out_dir`/report.html: one static page for the run from its summary.json dict and per-sequence rows.

    summary: the dict summary.json is written from (keys in docs/outputs.md; any may be missing, any number
    None/NaN/±inf). rows: the per-sequence records of report/build.py `sequence_rows` (E rows: S, h_rb, T in tokens,
    contrib_e = c_i in entropy units per unit η; U rows — and E rows in single-batch mode — contrib_u = d_j and
    cov_contrib, its share of Cui's Cov(log π, A)); empty for a run stopped before sampling.

    Returns the page's path, or None when it could not be written (an OSError, logged as a warning). Raises
    nothing: the page is written before summary.json (build_outputs), so a section that fails on unexpected input
    is replaced by a note and logged rather than losing the run's results.
    """
    summary = summary if isinstance(summary, dict) else {}
    rows = [r for r in rows or [] if isinstance(r, dict)]
    positive = positive_sweep(summary)
    plt = pyplot()
    parts = [
        _guarded("header", lambda: _header(summary)),
        "<h2>Entropy change vs η</h2>",
        _guarded("entropy figure", lambda: _entropy_figure(plt, positive, summary)),
        "<h2>Importance-sampling diagnostics vs η</h2>",
        _guarded("diagnostics figure", lambda: _figure(plt, diagnostics_figure(plt, positive))),
        "<h2>Explanation: curvature, decompositions, covariance proxy</h2>",
        _guarded("scalars table", lambda: _scalars_table(summary)),
        "<h2>Sequences that moved entropy most</h2>",
        _guarded("top sequences", lambda: _top_sequences(rows, grade=True)
                 if summary.get("provenance/loss") in ("grade", "grade_st") else _top_sequences(rows)),
        "<h2>Prompts of E</h2>",
        _guarded("per-prompt table", lambda: _prompt_table(rows)),
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>probe_dist report — {_e(summary.get('status', 'unknown'))}</title>\n<style>{_STYLE}</style>\n"
            "</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
    path = Path(out_dir) / REPORT_NAME
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        log.warning("report.html not written: %s", exc)
        return None
    return path


# --- helpers ------------------------------------------------------------------------------------------------------


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _guarded(name: str, make: Callable[[], str]) -> str:
    """The section's HTML, or a note when making it raised (logged with its traceback at debug level)."""
    try:
        return make()
    except Exception as exc:  # the report must never cost the run its summary.json
        log.warning("report.html: %s left out (%s: %s)", name, type(exc).__name__, exc)
        log.debug("report.html: %s failed", name, exc_info=True)
        return _note(f"{name} left out: {type(exc).__name__}: {exc}")


def _fmt(x, spec: str = ".4g") -> str:
    """A number formatted with `spec` ("nan"/"inf" for those), "n/a" for None or a non-number."""
    if isinstance(x, int | float) and not isinstance(x, bool):
        return format(float(x), spec)
    return "n/a"


def _pm(value, se, spec: str = ".4g") -> str:
    return f"{_fmt(value, spec)} ± {_fmt(se, '.2g')}"


def _listed(x) -> list:
    if isinstance(x, list | tuple):
        return list(x)
    return [] if x is None else [x]


def _table(table_id: str, header: list[str], body: list[list[tuple[str, str]]]) -> str:
    """A table whose cells are (css class, already-escaped HTML)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = ["".join(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>" for cls, cell in row)
             for row in body]
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>\n'
            + "\n".join(f"<tr>{line}</tr>" for line in lines) + "\n</tbody></table>")


def _num_cell(x, spec: str = ".4g") -> tuple[str, str]:
    return ("num", _e(_fmt(x, spec)))


def _int_cell(x) -> tuple[str, str]:
    """An index or count: integers as they are, anything else as _fmt shows it."""
    return ("num", _e(x if isinstance(x, int) and not isinstance(x, bool) else _fmt(x, "g")))


def _text_cell(row: dict, key: str = "text") -> tuple[str, str]:
    text = row.get(key)
    if not isinstance(text, str):
        return ("text", "")
    short = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
    return ("text", _e(short))


# --- sections -----------------------------------------------------------------------------------------------------


def _header(summary: dict) -> str:
    out = ["<h1>probe_dist report</h1>", "<ul>", f"<li>status: <b>{_e(summary.get('status', 'unknown'))}</b></li>"]
    kind = summary.get("se/kind")
    kind_text = {"population": "SE over prompt groups (population: what a new draw of prompts would give)",
                 "fixed_prompts": "SE conditional on E's prompts (fixed_prompts)"}.get(kind, "SE kind not recorded")
    if "entropy/base" in summary or "entropy/base_se" in summary:
        out.append(f"<li>entropy Ĥ(θ) = {_e(_pm(summary.get('entropy/base'), summary.get('entropy/base_se'), '.6g'))}"
                   f" entropy units; {_e(kind_text)}</li>")
    else:
        out.append("<li>entropy Ĥ(θ): not computed</li>")
    if "delta_h1/per_eta" in summary:
        out.append(f"<li>δH₁/η = {_e(_pm(summary.get('delta_h1/per_eta'), summary.get('delta_h1/per_eta_se'), '.6g'))}"
                   " entropy units per unit η</li>")
    else:
        out.append("<li>δH₁/η: not in the summary (written by completed runs only)</li>")
    groups = summary.get("se/num_groups")
    if groups is not None:
        rough = " (below 30 the SEs are rough)" if finite(groups) and groups < 30 else ""
        out.append(f"<li>prompt groups behind every SE: {_e(_fmt(groups, 'g'))}{_e(rough)}</li>")
    if "restore/verified" in summary:
        out.append(f"<li>restore verified on all ranks: {_e(summary['restore/verified'])}</li>")
    loss = summary.get("provenance/loss")
    if loss in ("grade", "grade_st"):
        options = summary.get("provenance/loss_options") if isinstance(summary.get("provenance/loss_options"), dict) \
            else {}
        rm = summary.get("provenance/reward_model") if isinstance(summary.get("provenance/reward_model"), dict) else {}
        out.append(f"<li>update: GRADE ({'straight-through' if loss == 'grade_st' else 'Gumbel-softmax'}) through "
                   f"relaxed rollouts of U, τ_g = {_e(_fmt(options.get('grade_tau'), 'g'))}, top-k = "
                   f"{_e(_fmt(options.get('grade_top_k'), 'g'))} (0: all), β = {_e(_fmt(options.get('kl_coef'), 'g'))}; "
                   f"mean r_φ = {_e(_fmt(summary.get('update/grade_reward_mean'), '.4g'))}, mean sequence KL = "
                   f"{_e(_fmt(summary.get('update/grade_kl_mean'), '.4g'))}; reward model <code>{_e(rm.get('path', ''))}"
                   f"</code>{' (shares the frozen base)' if rm.get('shared_base') else ''}</li>")
    elif loss is not None:
        out.append(f"<li>update: loss <code>{_e(loss)}</code></li>")
    for key, label in (("provenance/checkpoint", "checkpoint"), ("provenance/config_hash", "config hash")):
        if summary.get(key) is not None:
            out.append(f"<li>{label}: <code>{_e(summary[key])}</code></li>")
    out.append("</ul>")
    warnings = _listed(summary.get("warnings"))
    if warnings:
        out.append("<h2>Warnings</h2>")
        out.append('<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    if summary.get("explain/skipped") is not None:
        out.append(_note(f"explanation {summary['explain/skipped']}"))
    return "\n".join(out)


def _entropy_figure(plt, sweep: list[dict], summary: dict) -> str:
    return _figure(plt, entropy_change_figure(plt, sweep, summary))


def _figure(plt, fig) -> str:
    """An embedded PNG of `fig`, or a note when it is a reason (a str) instead of a figure."""
    return _note(fig) if isinstance(fig, str) else png(plt, fig)


# (key, label, SE key or None, unit)
_EXPLAIN_SCALARS = (
    ("curvature/d2H_deta2", "curvature d²Ĥ/dη²", "curvature/d2H_deta2_se", "entropy units per unit η²"),
    ("curvature/linear_regime_eta", "linear-regime η (|δH₂| = 10% of |δH₁|)", None, "lr units"),
    ("explain/delta_h1_base_per_eta", "δH₁/η base part ∇Ĥ·u_base (momentum and weight decay)", None,
     "entropy units per unit η"),
    ("explain/sum_contrib_u", "Σ_j d_j over U sequences", None, "entropy units per unit η"),
    ("explain/sum_contrib_e", "Σ_i c_i over E sequences", None, "entropy units per unit η"),
    ("explain/closure_e", "closure E: |Σc_i − δH₁/η| / |δH₁/η|", None, "relative"),
    ("explain/closure_u", "closure U: |base + Σd_j − δH₁/η| / |δH₁/η|", None, "relative"),
    ("cui/cov_logp_adv", "Cui Cov(log π, A) over U's tokens", "cui/cov_logp_adv_se", "nats × advantage units"),
    ("cui/cov_logp_pi_adv", "Cui Cov(log π, π·A) over U's tokens", "cui/cov_logp_pi_adv_se",
     "nats × advantage units"),
)


def _scalars_table(summary: dict) -> str:
    present = [item for item in _EXPLAIN_SCALARS if item[0] in summary]
    if not present:
        return _note("no explanation scalars in the summary (explanation skipped, or the run did not complete)")
    body = []
    for key, label, se_key, unit in present:
        value = _pm(summary.get(key), summary.get(se_key)) if se_key else _fmt(summary.get(key))
        body.append([("", _e(label)), ("num", _e(value)), ("", _e(unit)), ("", f"<code>{_e(key)}</code>")])
    out = [_table("scalars", ["quantity", "value", "unit", "summary key"], body)]
    if any(key.startswith("cui/") for key, *_ in present):
        out.append("<p>The Cui et al. covariances are logit-space proxies: they predict the sign and the "
                   "per-sequence pattern of the entropy change, to compare with δH₁'s, not its magnitude.</p>")
    return "\n".join(out)


def _top_sequences(rows: list[dict], grade: bool = False) -> str:
    if not rows:
        return _note("no per-sequence rows (the run stopped before sampling)")
    out = []
    e_rows = [r for r in rows if r.get("batch") == "E" and finite(r.get("contrib_e"))]
    e_rows.sort(key=lambda r: -abs(r["contrib_e"]))
    if e_rows:
        out.append(f"<p>E sequences by |c_i|, their contribution to δH₁/η (entropy units per unit η; Σ_i c_i = δH₁/η)"
                   f": top {min(TOP_SEQUENCES, len(e_rows))} of {len(e_rows)}.</p>")
        out.append(_table("top-e", ["prompt", "prompt text", "response", "reward", "advantage", "T", "c_i", "text"],
                          [[_int_cell(r.get("prompt_index")), _text_cell(r, "prompt"), _int_cell(r.get("response")),
                            _num_cell(r.get("reward")), _num_cell(r.get("advantage")), _int_cell(r.get("T")),
                            _num_cell(r["contrib_e"], ".6g"), _text_cell(r)] for r in e_rows[:TOP_SEQUENCES]]))
    else:
        out.append(_note("no E contributions c_i in the rows (explanation not run, or the run stopped before it finished)"))
    u_rows = [r for r in rows if finite(r.get("contrib_u"))]
    u_rows.sort(key=lambda r: -abs(r["contrib_u"]))
    if u_rows:
        out.append(f"<p>Update-batch sequences by |d_j|, their contribution to δH₁/η through the update vector, with "
                   f"their share of Cui's Cov(log π, A): top {min(TOP_SEQUENCES, len(u_rows))} of {len(u_rows)}.</p>")
        out.append(_table("top-u", ["batch", "prompt", "prompt text", "response", "reward", "advantage", "T", "d_j",
                                    "Cov(log π, A) share", "text"],
                          [[("", _e(r.get("batch", ""))), _int_cell(r.get("prompt_index")), _text_cell(r, "prompt"),
                            _int_cell(r.get("response")), _num_cell(r.get("reward")),
                            _num_cell(r.get("advantage")), _int_cell(r.get("T")), _num_cell(r["contrib_u"], ".6g"),
                            _num_cell(r.get("cov_contrib"), ".4g"), _text_cell(r)] for r in u_rows[:TOP_SEQUENCES]]))
    elif grade:
        out.append(_note("no update-batch contributions d_j: a GRADE update has no sampled U sequences to decompose "
                         "(its U rows hold the ids the relaxed tokens round to and r_φ)"))
    else:
        out.append(_note("no update-batch contributions d_j in the rows (explanation not run, or the run stopped before it finished)"))
    return "\n".join(out)


def _prompt_table(rows: list[dict]) -> str:
    groups: dict = {}
    for r in rows:
        if r.get("batch") == "E":
            groups.setdefault(r.get("prompt_index"), []).append(r)
    if not groups:
        return _note("no E rows" if rows else "no per-sequence rows (the run stopped before sampling)")
    stats = []
    for index, members in groups.items():
        rewards = [as_float(r.get("reward")) for r in members]
        h = [as_float(r.get("h_rb")) for r in members]
        t = [as_float(r.get("T")) for r in members]
        c = [as_float(r.get("contrib_e")) for r in members]
        finite_rewards = [x for x in rewards if math.isfinite(x)]
        total_t = sum(t)
        stats.append({"index": index, "n": len(members), "prompt": members[0],
                      "reward": sum(finite_rewards) / len(finite_rewards) if finite_rewards else math.nan,
                      "entropy": sum(h) / total_t if math.isfinite(total_t) and total_t > 0 else math.nan,
                      "contrib": sum(c)})   # NaN unless every member has a finite c_i
    explained = any(math.isfinite(s["contrib"]) for s in stats)
    if explained:  # largest |Σ c_i| first; prompts without one last
        stats.sort(key=lambda s: (not math.isfinite(s["contrib"]), -abs(s["contrib"]) if math.isfinite(s["contrib"])
                                  else 0.0, str(s["index"])))
    else:
        stats.sort(key=lambda s: (not finite(s["index"]), as_float(s["index"]) if finite(s["index"]) else 0.0,
                                  str(s["index"])))
    shown = stats[:MAX_PROMPTS]
    order = "largest |Σ c_i| first" if explained else "by prompt index (no c_i in the rows)"
    columns = ["prompt", "prompt text", "responses", "mean reward", "entropy Σh_rb/ΣT"] + (["Σ c_i"] if explained else [])
    out = [f"<p>E's prompt groups, {order}. Entropy is Σh_rb/ΣT (nats per token)"
           + ("; Σ c_i is the group's contribution to δH₁/η (entropy units per unit η)." if explained else ".")
           + "</p>",
           _table("prompts", columns,
                  [[_int_cell(s["index"]), _text_cell(s["prompt"], "prompt"), _int_cell(s["n"]),
                    _num_cell(s["reward"]), _num_cell(s["entropy"], ".5g")]
                   + ([_num_cell(s["contrib"], ".6g")] if explained else []) for s in shown])]
    if len(stats) > len(shown):
        out.append(_note(f"{len(stats) - len(shown)} of {len(stats)} prompts left out (smallest |Σ c_i|)"
                         if explained else f"{len(stats) - len(shown)} of {len(stats)} prompts left out"))
    return "\n".join(out)
