"""report.html (probe_dist/report/html.py): one static page with embedded PNG figures and escaped text, written
from synthetic summaries and rows (no model): the figures decode as PNGs, the tables rank and sum what they say,
model text cannot inject markup, nothing external is referenced, and partial or non-finite input writes a page
without raising.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
import re
from collections import defaultdict
from html.parser import HTMLParser

import matplotlib.image
import pytest
import torch

from probe_dist.report import html as report_html
from probe_dist.report.html import write_report
from tests.tolerances import fp_bound

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def shown(digits: int) -> float:
    """The relative error of a number the page prints with `digits` significant digits (format spec .Ng): rounding
    to N digits moves x by at most half a unit of its N-th digit, ≤ ½·10^(1−N)·|x|; the factor 1 + 1e-9 covers reading
    the decimal back into a float64 (≤ u₆₄ = 1.1e-16 relative). A wrong number, row or column differs far more."""
    return 0.5 * 10.0 ** (1 - digits) * (1 + 1e-9)
SCRIPT = "<script>alert(1)</script>"


def synthetic_summary() -> dict:
    """A completed two-batch run's summary: δH₁/η = −0.8, Ĥ'' = 2000 per unit η², eight η values of which the
    smallest give k̂ from near-uniform weights (unreliable) and the largest heavy tails."""
    d, curv = -0.8, 2000.0
    sweep = []
    for eta in (0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3):
        d1, d2 = eta * d, 0.5 * eta * eta * curv
        ess_frac = math.exp(-2000.0 * eta)
        khat = 0.1 + 0.9 * (1.0 - ess_frac) if eta > 0 else None
        # tol: bound synthetic input, not a check: the probe's k̂ ≥ 0.7 flag rule, applied to made-up k̂
        flags = ["k̂ ≥ 0.7: heavy-tailed " + SCRIPT] if khat is not None and khat >= 0.7 else []
        sweep.append({"eta": eta, "delta_h_true": d1 + 0.7 * d2, "delta_h_true_se": 2e-5 + 0.02 * eta,
                      "delta_h1": d1, "delta_h1_se": abs(eta) * 0.05, "delta_h2": d2, "delta_h2_se": 0.5 * eta * eta * 300,
                      # tol: bound synthetic input, not a check: k̂ is called unreliable for near-uniform weights
                      "ess_frac": ess_frac, "ess": 512 * ess_frac, "khat": khat, "khat_threshold": 0.63,
                      "khat_reliable": khat is not None and ess_frac < 0.99, "kl": eta * 10, "flags": flags})
    return {"status": "completed", "entropy/base": 0.734, "entropy/base_se": 0.012, "se/kind": "population",
            "se/num_groups": 64, "delta_h1/per_eta": d, "delta_h1/per_eta_se": 0.05,
            "curvature/d2H_deta2": curv, "curvature/d2H_deta2_se": 300.0,
            "curvature/linear_regime_eta": 0.2 * abs(d) / curv, "explain/closure_e": 3e-9, "explain/closure_u": 2e-8,
            "explain/delta_h1_base_per_eta": -0.01, "explain/sum_contrib_u": -0.79, "explain/sum_contrib_e": -0.8,
            "cui/cov_logp_adv": 0.021, "cui/cov_logp_adv_se": 0.004, "cui/cov_logp_pi_adv": 0.003,
            "cui/cov_logp_pi_adv_se": 0.001, "restore/verified": True, "sweep": sweep,
            "warnings": [f"η = {s['eta']:g}: {f}" for s in sweep for f in s["flags"]]}


def synthetic_rows(n_prompts: int = 60, g: int = 4, seed: int = 0, *, single_batch: bool = False) -> list[dict]:
    """E rows (c_i, h_rb, T) and — unless single_batch, where E rows carry d_j themselves — U rows (d_j, Cov share),
    every text holding markup."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for i in range(g):
            t = rng.randint(5, 400)
            # tol: bound synthetic input, not a check: a reward of 1 with probability 0.4
            row = {"batch": "E", "prompt_index": p, "response": i, "token_ids": list(range(t)), "T": t,
                   "S": -rng.uniform(10, 200), "h_rb": t * rng.uniform(0.2, 1.2), "h_naive": rng.uniform(10, 200),
                   "reward": float(rng.random() < 0.4), "advantage": rng.gauss(0, 1), "log_w": {"0.0001": 0.0},
                   "contrib_e": rng.gauss(0, 0.01) * (1 + 5 * (p % 7 == 0)),
                   "text": f"answer {p}/{i} {SCRIPT} " + "x" * rng.randint(0, 600), "prompt": f"{p}+1="}
            if single_batch:
                row["contrib_u"], row["cov_contrib"] = rng.gauss(0, 0.02), rng.gauss(0, 0.001)
            rows.append(row)
    if not single_batch:
        for p in range(n_prompts // 2):
            for i in range(g):
                rows.append({"batch": "U", "prompt_index": p, "response": i, "token_ids": [1, 2], "T": 2,
                             "reward": 1.0, "advantage": rng.gauss(0, 1), "contrib_u": rng.gauss(0, 0.02),
                             "cov_contrib": rng.gauss(0, 0.001), "text": f"u {p}/{i} {SCRIPT}"})
    return rows


class _Page(HTMLParser):
    """Tables by id (rows of cell text, entities decoded), every tag with its attributes, and text notes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict]] = []
        self.notes: list[str] = []
        self._table = None
        self._cell = None
        self._in_note = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._table is not None:
            self._cell = []
        elif tag == "p" and a.get("class") == "note":
            self._in_note = True
            self.notes.append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "p":
            self._in_note = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_note:
            self.notes[-1] += data


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def body_rows(page: _Page, table_id: str) -> list[list[str]]:
    return [r for r in page.tables[table_id] if r]   # the header row has <th> cells only


@pytest.fixture
def report_warnings(caplog):
    """Warnings the report logged: a section that raised and was replaced by a note logs one."""
    caplog.set_level(logging.WARNING, logger="probe_dist")
    return lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("report.html")]


def test_images_are_embedded_pngs_that_decode(tmp_path, report_warnings):
    path = write_report(tmp_path, synthetic_summary(), synthetic_rows())
    assert path == tmp_path / "report.html"
    page = parse(path.read_text(encoding="utf-8"))
    srcs = [a.get("src", "") for tag, a in page.tags if tag == "img"]
    assert len(srcs) == 2, "both figures must be drawn for a complete summary"
    for src in srcs:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(io.BytesIO(data))
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0, "a blank image"
    assert report_warnings() == []


def test_top_tables_rank_by_absolute_contribution(tmp_path, report_warnings):
    rows = synthetic_rows()
    page = parse(write_report(tmp_path, synthetic_summary(), rows).read_text(encoding="utf-8"))
    best_e = max((r for r in rows if r["batch"] == "E"), key=lambda r: abs(r["contrib_e"]))
    top_e = body_rows(page, "top-e")
    assert len(top_e) == 10
    prompt, prompt_text, response, _reward, _adv, t, c, text = top_e[0]
    assert prompt_text == best_e["prompt"]
    assert (int(prompt), int(response), int(t)) == (best_e["prompt_index"], best_e["response"], best_e["T"])
    assert float(c) == pytest.approx(best_e["contrib_e"], rel=shown(6))  # tol: bound c_i printed .6g
    assert len(text) <= 201 and best_e["text"].startswith(text.rstrip("…"))
    expected = sorted((r for r in rows if r["batch"] == "E"), key=lambda r: -abs(r["contrib_e"]))[:10]
    assert [(int(r[0]), int(r[2])) for r in top_e] == [(r["prompt_index"], r["response"]) for r in expected]
    assert any(r["contrib_e"] < 0 for r in expected) and any(r["contrib_e"] > 0 for r in expected), "both signs"

    best_u = max((r for r in rows if "contrib_u" in r), key=lambda r: abs(r["contrib_u"]))
    top_u = body_rows(page, "top-u")
    first_u = top_u[0]
    assert (first_u[0], int(first_u[1]), int(first_u[3])) == ("U", best_u["prompt_index"], best_u["response"])
    expected = sorted((r for r in rows if "contrib_u" in r), key=lambda r: -abs(r["contrib_u"]))[:10]
    assert [(int(r[1]), int(r[3])) for r in top_u] == [(r["prompt_index"], r["response"]) for r in expected]
    assert float(first_u[7]) == pytest.approx(best_u["contrib_u"], rel=shown(6))  # tol: bound d_j printed .6g
    assert float(first_u[8]) == pytest.approx(best_u["cov_contrib"], rel=shown(4))  # tol: bound Cov share printed .4g
    assert report_warnings() == []


def test_single_batch_e_rows_rank_on_the_update_side(tmp_path):
    rows = synthetic_rows(n_prompts=5, single_batch=True)
    page = parse(write_report(tmp_path, synthetic_summary(), rows).read_text(encoding="utf-8"))
    best_u = max(rows, key=lambda r: abs(r["contrib_u"]))
    first_u = body_rows(page, "top-u")[0]
    assert (first_u[0], int(first_u[1]), int(first_u[3])) == ("E", best_u["prompt_index"], best_u["response"])


def test_per_prompt_table_sums_and_truncates(tmp_path, report_warnings):
    rows = synthetic_rows(n_prompts=60)
    text = write_report(tmp_path, synthetic_summary(), rows).read_text(encoding="utf-8")
    page = parse(text)
    sums, abs_sums, counts, h, t, rewards = (defaultdict(float), defaultdict(float), defaultdict(int),
                                             defaultdict(float), defaultdict(float), defaultdict(list))
    for r in rows:
        if r["batch"] == "E":
            p = r["prompt_index"]
            sums[p] += r["contrib_e"]
            abs_sums[p] += abs(r["contrib_e"])
            counts[p] += 1
            h[p] += r["h_rb"]
            t[p] += r["T"]
            rewards[p].append(r["reward"])
    table = body_rows(page, "prompts")
    assert len(table) == 50
    expected_shown = sorted(sums, key=lambda p: -abs(sums[p]))[:50]
    assert [int(r[0]) for r in table] == expected_shown
    for prompt, _text, n, reward, entropy, total in table:
        p = int(prompt)
        assert int(n) == counts[p]
        # tol: bound Σ c_i printed .6g; abs: the page may add the group's c_i in another order, ≤ fp_bound(float64,
        # n, Σ|c_i|) apart (cancellation makes a small sum's relative error large: this part is absolute)
        assert float(total) == pytest.approx(sums[p], rel=shown(6), abs=fp_bound(torch.float64, n_terms=int(n),
                                                                                  scale=abs_sums[p]))
        # tol: bound h/T printed .5g, the mean reward .4g; sums of positive terms: ≤ γ_n relative in float64
        assert float(entropy) == pytest.approx(h[p] / t[p], rel=shown(5) + fp_bound(torch.float64, 2 * int(n), 1.0))
        assert float(reward) == pytest.approx(sum(rewards[p]) / len(rewards[p]),
                                              rel=shown(4) + fp_bound(torch.float64, int(n), 1.0))
    assert any("10 of 60 prompts left out" in note for note in page.notes)
    assert report_warnings() == []


def test_model_text_is_escaped(tmp_path):
    summary = synthetic_summary()
    summary["explain/skipped"] = f"forward mode unavailable {SCRIPT}"
    summary["status"] = f"completed{SCRIPT}"
    text = write_report(tmp_path, summary, synthetic_rows(n_prompts=3)).read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = parse(text)
    assert not [tag for tag, _ in page.tags if tag == "script"]
    assert any(SCRIPT in cell for row in body_rows(page, "top-e") for cell in row), "the text column is shown"


def test_no_external_references(tmp_path):
    text = write_report(tmp_path, synthetic_summary(), synthetic_rows()).read_text(encoding="utf-8")
    page = parse(text)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base")
        for name in ("src", "href", "action", "data", "poster", "srcset"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith("data:image/png;base64,"), (tag, name, value[:60])
    assert not re.search(r"https?://|url\(|@import", text)


def test_interrupted_summary_without_rows(tmp_path, report_warnings):
    path = write_report(tmp_path, {"status": "interrupted", "sweep": []}, [])
    text = path.read_text(encoding="utf-8")
    page = parse(text)
    assert "interrupted" in text
    assert "<img" not in text
    assert len(page.notes) == 5   # both figures, the scalars, the top tables, the prompts: a one-line note each
    assert "Ĥ(θ): not computed" in text
    assert report_warnings() == [], "partial input must be handled, not caught by the section guard"


def test_empty_summary_and_rows(tmp_path, report_warnings):
    assert write_report(tmp_path, {}, []).exists()
    assert report_warnings() == []


def test_non_finite_numbers_do_not_crash(tmp_path, report_warnings):
    nan, inf = math.nan, math.inf
    summary = {"status": "interrupted", "entropy/base": nan, "entropy/base_se": None, "se/kind": "fixed_prompts",
               "se/num_groups": None, "delta_h1/per_eta": inf, "delta_h1/per_eta_se": nan,
               "curvature/d2H_deta2": None, "curvature/d2H_deta2_se": inf, "curvature/linear_regime_eta": inf,
               "cui/cov_logp_adv": nan, "warnings": "a single warning, not a list", "restore/verified": True,
               "sweep": [
                   {"eta": None, "delta_h_true": 1.0},
                   {"eta": 0.0, "delta_h_true": 0.0, "khat": None},
                   {"eta": -1e-4, "delta_h_true": 1.0},
                   {"eta": 1e-5, "delta_h_true": nan, "delta_h_true_se": inf, "delta_h1": -1e-5, "delta_h1_se": None,
                    "delta_h2": nan, "ess_frac": 1.0, "khat": nan, "khat_threshold": None, "khat_reliable": None},
                   {"eta": 1e-4, "delta_h_true": -inf, "delta_h1": -1e-4, "delta_h1_se": 1e-6, "delta_h2": 1e-6,
                    "delta_h2_se": nan, "ess_frac": inf, "khat": 2.5, "khat_threshold": 0.63, "khat_reliable": False},
                   {"eta": 1e-3, "delta_h_true": 1e300, "delta_h1": -1e-3, "ess_frac": 1e-9, "khat": -inf,
                    "khat_reliable": True, "flags": None},
                   "not a dict",
               ]}
    rows = [{"batch": "E", "prompt_index": 0, "response": 0, "T": 0, "h_rb": nan, "reward": None,
             "contrib_e": nan, "text": None},
            {"batch": "E", "prompt_index": 0, "response": 1, "T": 3, "h_rb": 1.0, "reward": 1.0, "contrib_e": inf},
            {"batch": "E", "prompt_index": None, "response": None, "T": None, "contrib_e": 1e-3},
            {"batch": "U", "prompt_index": 1, "response": 0, "contrib_u": None, "cov_contrib": nan},
            {"batch": "U", "prompt_index": 2, "response": 0, "contrib_u": -0.5, "cov_contrib": None},
            {"no": "batch"}, "not a dict"]
    path = write_report(tmp_path, summary, rows)
    text = path.read_text(encoding="utf-8")
    assert text.count("<img") == 2, "the finite points at η > 0 are still drawn"
    page = parse(text)
    assert [r[6] for r in body_rows(page, "top-e")] == ["0.001"], "only the finite c_i is ranked"
    assert body_rows(page, "top-u")[0][7] == "-0.5"
    assert "a single warning, not a list" in text
    assert report_warnings() == []


def test_a_failing_section_becomes_a_note(tmp_path, monkeypatch, report_warnings):
    def broken(_rows):
        raise RuntimeError("boom")

    monkeypatch.setattr(report_html, "_top_sequences", broken)
    text = write_report(tmp_path, synthetic_summary(), synthetic_rows(n_prompts=3)).read_text(encoding="utf-8")
    assert "top sequences left out: RuntimeError: boom" in text
    assert 'id="prompts"' in text, "the sections after it are still written"
    assert report_warnings() == ["report.html: top sequences left out (RuntimeError: boom)"]


def test_unwritable_directory_returns_none(tmp_path):
    assert write_report(tmp_path / "missing", synthetic_summary(), []) is None


def test_page_stays_small_for_thousands_of_rows(tmp_path):
    path = write_report(tmp_path, synthetic_summary(), synthetic_rows(n_prompts=1000, g=8))
    assert path.stat().st_size < 1_000_000
