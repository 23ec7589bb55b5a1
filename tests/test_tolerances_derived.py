"""Suite hygiene: every numeric bound in a test says where it comes from (tests/tolerances.py explains the kinds).

A line of test code that compares with a floating-point literal, or passes atol/rtol/abs/rel, must carry a
`# tol: <kind> <derivation>` comment on the same line or in the comment block right above it (up to four lines,
so one derivation can cover the few assertions that follow it). The kinds: fp, stat, exact, bound; a
statistical line checked once per parametrization says how many times: `# tol: stat ×4 ...`.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.tolerances import MAX_STATISTICAL_CHECKS

TESTS = Path(__file__).resolve().parent
KINDS = ("fp", "stat", "exact", "bound")
# atol=1e-6, rel=0.1, abs=..., tol=... ; comparisons with a float literal: < 0.5, <= 1e-7, > 2.5e3 ; pytest.approx(
BOUND = re.compile(
    r"\b\w*(atol|rtol|abs|rel|tol|tolerance)\s*=\s*[\d.]"  # also rel_tol=, abs_tol= (math.isclose)
    r"|\b\w*(atol|rtol|tol|tolerance)\w*\s*:\s*\w+\s*=\s*[\d.]"  # a typed default: rtol: float = 1e-9
    r"|[<>]=?\s*-?\d*\.\d+"
    r"|[<>]=?\s*-?\d+(\.\d+)?e[-+]?\d+"
    r"|approx\("
    r"|[<>]=?\s*-?\d+(\.\d+)?\s*\*"  # a multiple of something: < 4 * se, > 3 * cap
)
# A module constant that holds a margin: BAND = 1.5, KHAT_TOL = 1e-12, LIMIT_S = 30.0
NAMED_BOUND = re.compile(r"^[A-Z0-9_]*(TOL|BAND|LIMIT|SLACK|MARGIN|ALPHA|THRESH|FLOOR|BOUND)[A-Z0-9_]*\s*=\s*[-\d.(]")
ANNOTATION = re.compile(r"#\s*tol:\s*(\w+)(?:\s*×\s*(\d+))?")  # "stat ×4": one line, four parametrized checks
CONTEXT_LINES = 4


def _code(line: str) -> str:
    """The line without its comment and without string literals (a message may quote numbers)."""
    line = re.sub(r"(f?)(\"[^\"]*\"|'[^']*')", '""', line)
    return line.split("#", 1)[0]


def _scan():
    missing, stat_lines, bad_kind = [], [], []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("tolerances.py", Path(__file__).name):
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = ANNOTATION.search(line)
            if m:
                if m.group(1) not in KINDS:
                    bad_kind.append(f"{path.name}:{i + 1}: {line.strip()}")
                if m.group(1) == "stat":
                    stat_lines.extend([f"{path.name}:{i + 1}"] * int(m.group(2) or 1))
            if not (BOUND.search(_code(line)) or NAMED_BOUND.search(_code(line))):
                continue
            window = lines[max(0, i - CONTEXT_LINES):i + 1]
            if not any(ANNOTATION.search(w) for w in window):
                missing.append(f"{path.relative_to(TESTS)}:{i + 1}: {line.strip()}")
    return missing, stat_lines, bad_kind


def test_every_bound_carries_its_derivation():
    missing, _, bad_kind = _scan()
    assert not bad_kind, "unknown `# tol:` kinds (use fp, stat, exact, bound):\n" + "\n".join(bad_kind)
    assert not missing, (f"{len(missing)} bounds without a `# tol:` derivation (see tests/tolerances.py):\n"
                         + "\n".join(missing))


def test_statistical_checks_fit_the_suite_false_alarm_budget():
    """z_bonferroni() splits SUITE_ALPHA over MAX_STATISTICAL_CHECKS: more `# tol: stat` lines would overspend it."""
    _, stat_lines, _ = _scan()
    assert stat_lines, "the suite has statistical checks; the scan found none (the annotation format changed?)"
    assert len(stat_lines) <= MAX_STATISTICAL_CHECKS, (
        f"{len(stat_lines)} statistical checks > MAX_STATISTICAL_CHECKS = {MAX_STATISTICAL_CHECKS}: raise it in "
        "tests/tolerances.py (z grows with it) or merge checks")


def test_the_scan_sees_an_unannotated_bound(tmp_path):
    """The scanner itself can fail: a bare bound is found, an annotated one is not."""
    assert BOUND.search(_code("    assert err < 1e-6"))
    assert BOUND.search(_code("    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)"))
    assert BOUND.search(_code("    assert x == pytest.approx(y)"))
    assert BOUND.search(_code("    return math.isclose(x, y, rel_tol=rtol, abs_tol=1e-15)"))
    assert BOUND.search(_code("def close(a, b, rtol: float = 1e-9):"))
    assert not BOUND.search(_code('    assert n > 0, "less than 0.5"'))
    assert not BOUND.search(_code("    assert len(rows) >= 2"))
    assert BOUND.search(_code("    assert abs(err) < 4 * se_mean"))
    assert NAMED_BOUND.search(_code("BAND = 1.5")) and NAMED_BOUND.search(_code("KHAT_TOL = 1e-12"))
    assert not NAMED_BOUND.search(_code("ETA = 1e-3"))
