"""Derived tolerances for the suite: floating-point error models and statistical bounds with a stated false-alarm rate.

Every numeric bound in a test is one of two kinds, and says which in a `# tol:` comment beside it (the suite's
hygiene test, tests/test_tolerances_derived.py, fails on a bound without one):

* **Floating point** (`# tol: fp ...`): a deterministic computation compared with a reference (the same
  computation in float64, a brute-force formula, a second code path). The bound is an error model — a unit
  roundoff times the number of terms summed or a condition number, *measured on the inputs at hand* — never a
  number that happened to separate pass from fail on one machine. `fp_bound` gives the standard one.
* **Statistical** (`# tol: stat ...`): a Monte-Carlo estimate compared with its expectation. The bound is
  `z_bonferroni()` standard errors: the suite's total false-alarm probability for one run is at most
  `SUITE_ALPHA`, split evenly (Bonferroni) over at most `MAX_STATISTICAL_CHECKS` statistical assertions. The
  hygiene test counts the `# tol: stat` annotations and fails when there are more than that, so adding a
  statistical check without growing the budget is impossible.

Other annotations: `# tol: exact ...` (bitwise or integer equality, no tolerance at all) and `# tol: bound ...`
(a property that holds by construction, e.g. a probability in [0, 1], a size limit of the product).
"""

from __future__ import annotations

import math

import torch

#: The probability that one full run of the suite fails a statistical check although the code is right.
SUITE_ALPHA = 1e-3
#: How many statistical assertions the suite may hold (the hygiene test checks the count of `# tol: stat`).
MAX_STATISTICAL_CHECKS = 60


def z_bonferroni(n_checks: int = MAX_STATISTICAL_CHECKS, alpha: float = SUITE_ALPHA, two_sided: bool = True) -> float:
    """The normal quantile z with P(|Z| > z) = alpha / n_checks (two-sided; one-sided with two_sided=False).

    With the defaults (alpha 1e-3 over 60 checks) z = 4.31 two-sided: a right estimator is further than z SE
    from its expectation in one check with probability 1.7e-5, in any check of a run with probability ≤ 1e-3.
    The normal approximation is the one the probe's own SEs rest on (a mean over prompt groups).
    """
    from statistics import NormalDist

    per_check = alpha / n_checks
    return NormalDist().inv_cdf(1.0 - (per_check / 2.0 if two_sided else per_check))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of a floating dtype (float32: 5.96e-8, float64: 1.11e-16, bfloat16: 3.9e-3)."""
    return torch.finfo(dtype).eps / 2.0


def fp_bound(dtype: torch.dtype, n_terms: int, scale: float, safety: float = 4.0) -> float:
    """An absolute error bound for a sum of `n_terms` rounded terms whose absolute values add up to `scale`.

    Higham's bound for recursive summation, |ŝ − s| ≤ γ_n Σ|x_i| with γ_n = n·u / (1 − n·u), is the worst
    case; `safety` (default 4) covers the few roundings around each term (a product, an exp) that the bound does
    not count. Pass `scale` measured on the inputs of the test (e.g. the float64 reference's Σ|x_i|).
    """
    u = unit_roundoff(dtype)
    nu = n_terms * u
    if nu >= 0.5:
        raise ValueError(f"n·u = {nu} too large for a first-order bound")
    return safety * nu / (1.0 - nu) * scale


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """‖actual − reference‖₂ / ‖reference‖₂ in float64 (0 when both are 0)."""
    a = actual.detach().double().flatten()
    r = reference.detach().double().flatten()
    den = r.norm().item()
    num = (a - r).norm().item()
    return num / den if den > 0 else num


def within_se(estimate: float, expectation: float, se: float, n_checks: int = MAX_STATISTICAL_CHECKS) -> bool:
    """|estimate − expectation| ≤ z_bonferroni · se, with se > 0 asserted (a zero SE would make the check vacuous)."""
    assert se > 0 and math.isfinite(se), f"the SE must be positive and finite, got {se}"
    return abs(estimate - expectation) <= z_bonferroni(n_checks) * se


def two_path_tol64(err32: float, scale: float) -> float:
    """A bound on |a − b| (or ‖a − b‖) for two float64 code paths a, b computing one quantity of size `scale`.

    err32 = |x₃₂ − x₆₄|: the error of the same computation run in float32 (weights/inputs rounded to float32 too)
    against float64, i.e. u₃₂ times the computation's condition number κ on these inputs, measured. In float64 the
    same κ gives err32·u₆₄/u₃₂ for each path: 4× safety each (fp_bound's), plus one float64 rounding of the value
    (4u₆₄|x|) as a floor in case err32 is small by cancellation. Both paths must be float64 throughout (the
    `float64_norms` / `float64_throughout` fixtures for Qwen2 models)."""
    rescale = unit_roundoff(torch.float64) / unit_roundoff(torch.float32)
    return 2 * (4 * err32 * rescale + fp_bound(torch.float64, 1, scale))
