"""The fast tier (`pytest -m "not slow"`) covers every test module, so a quick run still touches every part.

A module may be slow-only when all its tests need what the fast tier cannot afford; each such module is listed
here with the reason and the fast test that covers the same code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SLOW_ONLY = {
    # two torchrun ranks signalled mid-sweep; the same stop path runs in the fast tier in test_stops.py
    "test_preemption.py": "multi-rank signal delivery (test_stops.py's fast case covers the stop path)",
    # a SLURM controller in the test (scripts/install_slurm.sh); the sbatch scripts' probe runs as in test_cli.py
    "test_slurm.py": "needs a running SLURM cluster",
    # 40 seeds against exact enumeration; the same estimators run in test_exact_enumeration.py's fast cases
    "test_explain_exact.py": "a 40-seed calibration study (test_explain.py and test_exact_enumeration.py are fast)",
}


def _collected(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", *args, str(TESTS)], capture_output=True, text=True, timeout=600,
                          cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {Path(line.split("::", 1)[0]).name for line in proc.stdout.splitlines() if "::" in line}


def test_every_test_module_has_a_fast_case():
    every = _collected()
    fast = _collected("-m", "not slow")
    assert set(SLOW_ONLY) <= every, f"SLOW_ONLY names modules that do not exist: {set(SLOW_ONLY) - every}"
    missing = every - fast - set(SLOW_ONLY)
    assert not missing, (f"test modules without a fast case: {sorted(missing)} — give each a cheap case (or list "
                         "it in SLOW_ONLY with the reason and the fast test that covers its code)")
    stale = set(SLOW_ONLY) & fast
    assert not stale, f"SLOW_ONLY modules that now have fast cases (drop them from the list): {sorted(stale)}"
