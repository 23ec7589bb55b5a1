"""A sweep row (probe_dist/measurement/sweep.py `sweep_point`) says when its numbers are not to be trusted."""

from __future__ import annotations

import math

from probe_dist.measurement.sweep import sweep_point
from probe_dist.results import DeltaH1

GOOD = {"delta_h_true": -1e-3, "delta_h_true_se_population": 5e-4, "delta_h_true_se_fixed_prompts": 1e-4,
        "entropy_new": 0.35, "ess": 60.0, "ess_frac": 0.95,
        "khat": 0.2, "khat_threshold": 0.45, "kl": 1e-4, "kl_k1": 1e-4, "max_weight": 0.03, "clip_frac": 0.0}
D1 = DeltaH1(per_eta=-13.5, per_eta_se=6.2, grad_entropy=[])


def test_a_trustworthy_row_has_no_flags():
    point = sweep_point(1e-4, GOOD, D1)
    assert point.flags == () and point.delta_h1 == 1e-4 * -13.5 and point.delta_h1_se == 1e-4 * 6.2


def test_se_kind_selects_which_se_is_reported_and_keeps_both():
    pop = sweep_point(1e-4, GOOD, D1)
    fixed = sweep_point(1e-4, GOOD, D1, se_kind="fixed_prompts", delta_h1_se_fixed=2.0)
    assert pop.delta_h_true_se == 5e-4 and fixed.delta_h_true_se == 1e-4
    assert pop.delta_h1_se == 1e-4 * 6.2 and fixed.delta_h1_se == 1e-4 * 2.0
    for p in (pop, fixed):
        assert (p.delta_h_true_se_population, p.delta_h_true_se_fixed_prompts) == (5e-4, 1e-4)
        assert p.delta_h1_se_population == 1e-4 * 6.2
    assert fixed.delta_h1_se_fixed_prompts == 1e-4 * 2.0 and math.isnan(pop.delta_h1_se_fixed_prompts)


def test_second_order_term_is_half_eta_squared_times_curvature():
    point = sweep_point(1e-3, GOOD, D1, curvature=(4000.0, 1000.0, 300.0))
    assert point.delta_h2 == 0.5 * 1e-6 * 4000.0 and point.delta_h2_se == 0.5 * 1e-6 * 1000.0
    fixed = sweep_point(1e-3, GOOD, D1, se_kind="fixed_prompts", curvature=(4000.0, 1000.0, 300.0))
    assert fixed.delta_h2_se == 0.5 * 1e-6 * 300.0
    assert math.isnan(sweep_point(1e-3, GOOD, D1).delta_h2)  # no explanation: no curvature


def test_khat_is_reliable_only_with_enough_weights_and_a_tail():
    assert not sweep_point(1e-4, GOOD, D1).khat_reliable              # N = ESS/(ESS/N) = 63 < 100
    many = {**GOOD, "ess": 190.0, "ess_frac": 0.95}                     # N = 200
    assert sweep_point(1e-4, many, D1).khat_reliable
    assert not sweep_point(1e-4, {**many, "ess": 199.0, "ess_frac": 0.995}, D1).khat_reliable  # no tail
    # Near-uniform weights: a large k̂ is noise, not a reason to distrust the row (the demo's 0.67 at ESS/N 0.9995).
    assert sweep_point(1e-4, {**GOOD, "khat": 0.9, "ess_frac": 0.9995, "ess": 63.97}, D1).flags == ()
    noisy = sweep_point(1e-4, {**GOOD, "khat": 0.9}, D1).flags
    assert len(noisy) == 1 and "N = 63 < 100" in noisy[0]


def test_heavy_tailed_weights_and_low_ess_are_flagged():
    point = sweep_point(1e-2, {**GOOD, "khat": 1.26, "ess_frac": 0.02, "ess": 1.3}, D1)
    assert any("k̂ = 1.26 ≥ 0.7" in f for f in point.flags)
    assert any("ESS/N = 0.020" in f for f in point.flags)
    assert sweep_point(1e-2, {**GOOD, "khat": 0.69}, D1).flags == ()  # just below the PSIS limit
    assert sweep_point(1e-2, {**GOOD, "khat": math.nan}, D1).flags == ()  # k̂ undefined (too few weights)


def test_non_finite_numbers_are_flagged_with_the_reason():
    point = sweep_point(1e30, {**GOOD, "delta_h_true": math.nan, "entropy_new": math.nan, "kl": math.inf}, D1)
    [flag] = [f for f in point.flags if f.startswith("not finite")]
    assert "delta_h_true" in flag and "entropy_new" in flag and "kl" in flag and "overflow" in flag


def test_eta_zero_is_exactly_zero_at_low_temperature(toy_checkpoint):
    """At τ = 0.05 the entropies are tiny and Ĥ(θ) summed group by group differed from Ĥ(θ') at η = 0 by one ulp
    (ΔH_true(0) = −1.1e-19, status failed_check); ΔH_true now compares sums formed by the same operations."""
    from tests.probe_harness import make_probe

    probe = make_probe(toy_checkpoint, ["sampling.temperature=0.05", "estimators.etas=[0.0,1e-4]",
                                        "estimators.explain=false"])
    result = probe.run()
    assert result.sweep[0].delta_h_true == 0.0 and result.final_status() == "completed"
