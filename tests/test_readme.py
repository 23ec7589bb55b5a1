"""The README opens with the two commands, and CI runs exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"^    (python3 -m venv .+)$", (REPO / "README.md").read_text(), flags=re.M)[:2]


def test_readme_opens_with_two_commands():
    demo, tests = _readme_commands()
    assert "probe_dist.main" in demo and "-c constraints-cpu.txt" in demo
    assert "pytest" in tests and "[dev]" in tests
    head = (REPO / "README.md").read_text().split("## ")[0]
    assert demo in head and tests in head  # before any section


def test_ci_runs_the_readme_test_command_offline():
    ci = (REPO / ".ci/run").read_text()
    assert "HF_HUB_OFFLINE=1" in ci
    _, tests = _readme_commands()
    assert tests in ci.splitlines()


def test_constraints_pin_cpu_torch():
    assert "torch==2.13.0" in (REPO / "constraints-cpu.txt").read_text().split()
