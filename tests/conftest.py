"""Shared fixtures: one toy checkpoint per test session (built by the package itself, offline)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread per process is faster and immune to oversubscription on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """The real toy RL checkpoint (seed 0), built once per session into a fresh directory."""
    from probe_dist.toy import ensure_toy_checkpoint

    cache = os.environ.get("PROBE_TEST_TOY_CACHE")  # set to reuse a build across local test runs
    root = Path(cache) if cache else tmp_path_factory.mktemp("toy")
    return ensure_toy_checkpoint(0, str(root))
