"""memory.profile=true on every update path and estimator: the run completes, every phase it timed has a memory
record, and the meter changes no number of the run.

Why a test per path: the profile wraps each phase in saved-tensor hooks (plan.meter.SavedTensorsMeter), and some
autograd APIs refuse to run under them (torch.func.{grad, vjp, jacrev, hessian}: the influence function of the
curvature's SE once called torch.func.grad and every profiled run died with a traceback). Each update path and
estimator reaches different autograd code, so each runs here once with the profile on and once with it off.
"""

from __future__ import annotations

import math

import pytest

from tests.probe_harness import make_probe

SMALL = ["sampling.B_E=4", "sampling.G_E=2", "sampling.B_U=2", "sampling.G_U=2", "estimators.etas=[0,1e-3]"]
GRADE = ["update.loss=grade", "update.kl_coef=0.05", "update.grade_tau=0.7", "update.grade_top_k=8"]

# (name, overrides): every update route and loss family, every δH₁ estimator and batch mode, explain on and off.
PATHS = {
    "default": [],  # update_vector route, grpo, snis_derivative, two batches, explain on
    "causal_rb": ["estimators.delta_h1=causal_rb"],
    "real_step": ["update.route=real_step"],
    "single_batch": ["estimators.mode=single_batch", "sampling.B_U=4"],
    "no_explain": ["estimators.explain=false"],
    "bf16_autocast": ["update.autocast=bfloat16"],
    "grade": GRADE,
    "grade_st": [*GRADE, "update.loss=grade_st"],
}

# Keys that legitimately differ between the two runs: wall times, the profile itself, and warnings that quote them.
_NOT_NUMBERS = {"provenance/phase_seconds", "memory/phases", "warnings"}


def _run(toy_checkpoint, overrides: list[str], profile: bool) -> tuple[dict, list]:
    probe = make_probe(toy_checkpoint, [*SMALL, *overrides, f"memory.profile={str(profile).lower()}"])
    res = probe.run()
    return res.summary(), res.memory_phases


def _same(a, b) -> bool:
    """Bitwise equality of two summaries' values (NaN equals NaN: both runs report the same undefined figure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("path", list(PATHS))  # ~1 s each: all in the fast tier
def test_profile_runs_and_changes_no_number(toy_checkpoint, path):
    plain, none = _run(toy_checkpoint, PATHS[path], profile=False)
    profiled, phases = _run(toy_checkpoint, PATHS[path], profile=True)
    assert none is None  # tol: exact no profile unless asked
    # the meter observes: every number of the run is bitwise the one without it
    differing = [k for k in plain if k not in _NOT_NUMBERS and not _same(plain[k], profiled.get(k))]
    assert not differing, {k: (plain[k], profiled.get(k)) for k in differing}
    assert profiled["status"] == "completed" and profiled["restore/verified"] is True

    # one record per rank (world size 1), one per phase the clock timed, with the documented keys
    assert isinstance(phases, list) and len(phases) == 1  # tol: exact one rank
    record = phases[0]
    assert set(record) == set(profiled["provenance/phase_seconds"]), (set(record), profiled["provenance/phase_seconds"])
    for name, mem in record.items():
        assert mem["rss_peak_bytes"] > 0 and mem["rss_bytes"] > 0, (name, mem)  # tol: exact a live process has RSS
        assert mem["rss_peak_bytes"] >= mem["rss_start_bytes"] or mem["rss_peak_scope"] == "process", (name, mem)
        assert mem["saved_peak_bytes"] >= mem["saved_current_bytes"] >= 0, (name, mem)  # tol: exact counters
        assert mem["saved_current_bytes"] == 0, (name, mem)  # tol: exact every graph is freed by the phase's end
    # The update's gradient is a reverse-mode backward (GRADE's through the relaxed rollout): its graph is metered.
    # The smallest graph it can build holds at least one float32 activation row of the toy's hidden size.
    assert record["update_gradient"]["saved_peak_bytes"] > 0, record["update_gradient"]  # tol: exact non-empty graph
