"""DP mechanisms: randomness, discrete Gaussian, Gumbel top-k, calibration, χ² sensitivity."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
from scipy import stats

from fedgen.privacy.mechanisms import (
    NoiseSource,
    allelic_chi2,
    allelic_chi2_sensitivity,
    analytic_gaussian_sigma,
    discrete_gaussian,
    discrete_gaussian_pmf,
    gumbel,
    gumbel_top_k,
    sigma_for_rho,
)

# ---------------------------------------------------------------------------------------------
# NoiseSource
# ---------------------------------------------------------------------------------------------


def test_unseeded_source_reads_os_urandom_and_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0, "bytes": 0}
    real = os.urandom

    def counting(n: int) -> bytes:
        calls["n"] += 1
        calls["bytes"] += n
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    src = NoiseSource()
    assert src.secure
    a = discrete_gaussian(10.0, 1000, src)
    b = discrete_gaussian(10.0, 1000, NoiseSource())
    assert calls["n"] > 0 and calls["bytes"] >= 8 * 1000
    assert not np.array_equal(a, b)
    n_before = calls["n"]
    u = src.uniform(10)
    assert calls["n"] == n_before + 1 and not np.array_equal(u, src.uniform(10))


def test_seeded_source_is_deterministic_and_does_not_touch_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(n: int) -> bytes:
        raise AssertionError("a seeded source must not read os.urandom")

    monkeypatch.setattr(os, "urandom", forbidden)
    a = discrete_gaussian(3.0, 500, NoiseSource(7))
    b = discrete_gaussian(3.0, 500, NoiseSource(7))
    c = discrete_gaussian(3.0, 500, NoiseSource(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not NoiseSource(7).secure


def test_uniform_has_53_bits_and_range() -> None:
    u = NoiseSource(1).uniform((1000, 3))
    assert u.shape == (1000, 3) and u.dtype == np.float64
    assert u.min() >= 0 and u.max() < 1
    assert np.all(u * 2.0**53 == np.floor(u * 2.0**53))
    # the low bits are used: some values are odd multiples of 2^-53
    assert np.any((u * 2.0**53) % 2 == 1)
    o = NoiseSource(1).uniform_open(10000)
    assert o.min() > 0 and o.max() < 1


@pytest.mark.parametrize("low,high", [(0, 3), (-5, 2), (0, 2**40 + 3), (-(2**63), 2**63)])
def test_integers_range_and_uniformity(low: int, high: int) -> None:
    src = NoiseSource(2)
    x = src.integers(low, high, (60000,))
    assert x.dtype == np.int64 and x.min() >= low and x.max() < high
    if high - low <= 16:
        counts = np.bincount(x - low, minlength=high - low)
        assert stats.chisquare(counts).pvalue > 1e-4
    else:  # the top and bottom halves of the range are equally likely
        mid = low + (high - low) // 2
        assert stats.binomtest(int((x < mid).sum()), x.size).pvalue > 1e-4


def test_integers_no_modulo_bias() -> None:
    # span 3·2^62: plain `word % span` would make the residues below 2^62 twice as likely
    span = 3 * 2**62
    x = NoiseSource(3).integers(-(2**63), -(2**63) + span, 60000)
    third = (x.astype(object) + 2**63) // 2**62
    counts = np.bincount(np.asarray(third, dtype=np.int64), minlength=3)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_integers_and_bits_validate() -> None:
    src = NoiseSource(0)
    with pytest.raises(ValueError):
        src.integers(3, 3, 2)
    with pytest.raises(ValueError):
        src.integers(0, 2**63 + 1, 2)
    b = src.bits(1000)
    assert set(np.unique(b)) == {0, 1} and abs(b.mean() - 0.5) < 0.07
    with pytest.raises(TypeError):
        NoiseSource(1.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Discrete Gaussian
# ---------------------------------------------------------------------------------------------


def _exact_support(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    half = int(math.ceil(40 * sigma)) + 40
    k = np.arange(-half, half + 1)
    return k, discrete_gaussian_pmf(k, sigma)


def _gof_pvalue(x: np.ndarray, sigma: float) -> float:
    """χ² goodness of fit of integer draws against N_Z(0, σ²), pooling cells with expectation < 5."""
    k, p = _exact_support(sigma)
    assert abs(p.sum() - 1) < 1e-12
    n = x.size
    assert x.min() >= k[0] and x.max() <= k[-1]
    counts = np.bincount(x - k[0], minlength=k.size).astype(float)
    expected = n * p
    big = expected >= 5
    lo, hi = np.flatnonzero(big)[[0, -1]]
    obs = [counts[:lo].sum(), *counts[lo : hi + 1], counts[hi + 1 :].sum()]
    exp = [expected[:lo].sum(), *expected[lo : hi + 1], expected[hi + 1 :].sum()]
    obs_a, exp_a = np.array(obs), np.array(exp)
    keep = exp_a > 0
    stat = float((((obs_a - exp_a) ** 2)[keep] / exp_a[keep]).sum())
    return float(stats.chi2.sf(stat, keep.sum() - 1))


@pytest.mark.parametrize("sigma,seed", [(0.5, 11), (3.0, 12), (25.3, 13)])
def test_discrete_gaussian_fits_exact_pmf(sigma: float, seed: int) -> None:
    n = 200_000
    x = discrete_gaussian(sigma, n, NoiseSource(seed))
    assert x.dtype == np.int64 and x.shape == (n,)
    assert _gof_pvalue(x, sigma) > 1e-4
    # variance against the exact variance (tolerance: 5 standard errors of the sample variance)
    k, p = _exact_support(sigma)
    var = float((k.astype(float) ** 2 * p).sum())
    m4 = float((k.astype(float) ** 4 * p).sum())
    assert var <= sigma**2 + 1e-12
    se = math.sqrt((m4 - var**2) / n)
    assert abs(x.var() - var) < 5 * se
    # symmetry: mean 0 and P[X>0] = P[X<0]
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    assert stats.binomtest(pos, pos + neg).pvalue > 1e-4


def test_goodness_of_fit_detects_a_wrong_sampler() -> None:
    """The χ² test above has power: 5% too wide, or the rounded continuous Gaussian at σ=0.5, fail."""
    x = discrete_gaussian(3.0 * 1.05, 200_000, NoiseSource(14))
    assert _gof_pvalue(x, 3.0) < 1e-6
    rounded = np.rint(np.random.default_rng(15).normal(0, 0.5, 200_000)).astype(np.int64)
    assert _gof_pvalue(rounded, 0.5) < 1e-6


def test_discrete_gaussian_large_sigma_fast_and_sd() -> None:
    t0 = time.perf_counter()
    x = discrete_gaussian(1500.0, 1_000_000, NoiseSource(21))
    assert time.perf_counter() - t0 < 5.0
    assert abs(x.std() / 1500.0 - 1) < 0.01
    t0 = time.perf_counter()
    y = discrete_gaussian(1500.0, 1_000_000, NoiseSource())  # the site's source (os.urandom)
    assert time.perf_counter() - t0 < 5.0
    assert abs(y.std() / 1500.0 - 1) < 0.01


def test_discrete_gaussian_shapes_and_validation() -> None:
    src = NoiseSource(5)
    assert discrete_gaussian(2.0, (3, 4), src).shape == (3, 4)
    assert discrete_gaussian(2.0, 0, src).shape == (0,)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            discrete_gaussian(bad, 10, src)


# ---------------------------------------------------------------------------------------------
# Gumbel and one-shot top-k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [0.7, 40.0])
def test_gumbel_ks(b: float) -> None:
    x = gumbel(b, 50_000, NoiseSource(31))
    assert stats.kstest(x, stats.gumbel_r(scale=b).cdf).pvalue > 1e-3
    # and the test has power: a 5% wrong scale is rejected
    assert stats.kstest(x, stats.gumbel_r(scale=1.05 * b).cdf).pvalue < 1e-6


@pytest.mark.parametrize("monotone", [False, True])
def test_gumbel_top_k_first_pick_is_exponential_mechanism(monotone: bool) -> None:
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.5])
    eps0, sens = 1.0, 1.0
    src = NoiseSource(41 + monotone)
    reps = 20_000
    first = np.array(
        [
            gumbel_top_k(scores, 1, epsilon_per_pick=eps0, sensitivity=sens, source=src, monotone=monotone)[0]
            for _ in range(reps)
        ]
    )
    denom = sens if monotone else 2 * sens
    w = np.exp(eps0 * scores / denom)
    p = w / w.sum()
    counts = np.bincount(first, minlength=scores.size)
    assert stats.chisquare(counts, reps * p).pvalue > 1e-4
    # power: the softmax of the other scale is rejected
    w_wrong = np.exp(eps0 * scores / (2 * denom if monotone else denom / 2))
    assert stats.chisquare(counts, reps * w_wrong / w_wrong.sum()).pvalue < 1e-6


def test_gumbel_top_k_second_pick_is_peeled_exponential_mechanism() -> None:
    scores = np.array([0.0, 2.0, 4.0, 5.0])
    src = NoiseSource(43)
    reps = 20_000
    picks = np.array([gumbel_top_k(scores, 2, epsilon_per_pick=1.0, sensitivity=1.0, source=src) for _ in range(reps)])
    w = np.exp(scores / 2)
    # P[second = j] = Σ_i P[first = i] · w_j / (W − w_i)
    p2 = np.array([sum(w[i] / w.sum() * w[j] / (w.sum() - w[i]) for i in range(4) if i != j) for j in range(4)])
    counts = np.bincount(picks[:, 1], minlength=4)
    assert stats.chisquare(counts, reps * p2).pvalue > 1e-4


def test_gumbel_top_k_distinct_order_nan_and_validation() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000) * 100
    scores[[3, 10]] = np.nan
    src = NoiseSource(51)
    idx = gumbel_top_k(scores, 25, epsilon_per_pick=1.0, sensitivity=0.01, source=src)
    assert idx.dtype == np.int64 and len(idx) == 25 and len(set(idx.tolist())) == 25
    # tiny noise: the true top 25, in order
    assert np.array_equal(idx, np.argsort(-np.nan_to_num(scores, nan=-np.inf))[:25])
    # NaN scores are never preferred, even against very low scores with large noise
    s = np.array([np.nan, -1e6, np.nan, -2e6])
    for _ in range(200):
        got = gumbel_top_k(s, 2, epsilon_per_pick=0.01, sensitivity=1.0, source=src)
        assert set(got.tolist()) == {1, 3}
    full = gumbel_top_k(s, 4, epsilon_per_pick=1.0, sensitivity=1.0, source=src)
    assert sorted(full.tolist()) == [0, 1, 2, 3] and set(full[:2].tolist()) == {1, 3}
    assert len(gumbel_top_k(s, 0, epsilon_per_pick=1.0, sensitivity=1.0, source=src)) == 0
    with pytest.raises(ValueError):
        gumbel_top_k(s, 5, epsilon_per_pick=1.0, sensitivity=1.0, source=src)
    with pytest.raises(ValueError):
        gumbel_top_k(np.array([1.0, np.inf]), 1, epsilon_per_pick=1.0, sensitivity=1.0, source=src)
    with pytest.raises(ValueError):
        gumbel_top_k(s, 1, epsilon_per_pick=0.0, sensitivity=1.0, source=src)
    with pytest.raises(ValueError):
        gumbel_top_k(s, 1, epsilon_per_pick=1.0, sensitivity=-1.0, source=src)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def test_analytic_gaussian_known_value_and_dp_accounting() -> None:
    import dp_accounting

    assert analytic_gaussian_sigma(1.0, 1e-6, 1.0) == pytest.approx(4.2247, abs=1e-4)
    assert analytic_gaussian_sigma(1.0, 1e-6, 7.0) == pytest.approx(7 * 4.224679, rel=1e-6)
    for eps, delta in [(0.1, 1e-5), (1.0, 1e-6), (3.0, 1e-9), (10.0, 1e-6), (0.5, 0.1)]:
        s = analytic_gaussian_sigma(eps, delta, 1.0)
        assert s == pytest.approx(dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-7)
        # conservative: at the returned σ the mechanism is (ε, δ)-DP
        assert dp_accounting.get_epsilon_gaussian(s, delta) <= eps * (1 + 1e-9)
    # tighter than the classic σ = Δ√(2 ln(1.25/δ))/ε
    assert analytic_gaussian_sigma(0.5, 1e-6, 1.0) < math.sqrt(2 * math.log(1.25 / 1e-6)) / 0.5
    for bad in [(0, 1e-6, 1), (1, 0, 1), (1, 1, 1), (1, 1e-6, 0)]:
        with pytest.raises(ValueError):
            analytic_gaussian_sigma(*bad)


def test_sigma_for_rho() -> None:
    assert sigma_for_rho(2.0, 0.5) == pytest.approx(2.0)
    l2, rho = 2 * math.sqrt(10), 0.0212
    s = sigma_for_rho(l2, rho)
    assert l2**2 / (2 * s**2) == pytest.approx(rho)
    with pytest.raises(ValueError):
        sigma_for_rho(1.0, 0.0)
    with pytest.raises(ValueError):
        sigma_for_rho(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Allelic χ² sensitivity (brute force over all data sets and add/remove neighbours)
# ---------------------------------------------------------------------------------------------


def _chi2_oe(a: np.ndarray, r: int, b: np.ndarray, s: int) -> np.ndarray:
    """Σ (O−E)²/E of the allele table [[a, 2r−a], [b, 2s−b]]; 0 when a margin is zero.

    Written independently of ``allelic_chi2`` (observed/expected form, not the closed form).
    """
    a, b = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float))
    obs = np.stack([a, 2 * r - a, b, 2 * s - b])
    rows = np.array([2 * r, 2 * r, 2 * s, 2 * s], float).reshape(4, *([1] * a.ndim))
    alt, ref = a + b, (2 * r - a) + (2 * s - b)
    cols = np.stack([alt, ref, alt, ref])
    n = 2.0 * (r + s)
    exp = rows * cols / n
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(exp > 0, (obs - exp) ** 2 / np.where(exp > 0, exp, 1), 0.0)
    degenerate = (alt == 0) | (ref == 0) | (r == 0) | (s == 0)
    return np.where(degenerate, 0.0, terms.sum(axis=0))


def _max_change(r: int, s: int) -> float:
    """Largest |χ²(D) − χ²(D')| over every data set D with r cases and s controls (genotypes 0/1/2)
    and every add/remove neighbour D'. (a, b) = alt-allele counts are sufficient: any a in
    0..2r is reachable, and an individual with genotype g can be removed iff a−g ∈ [0, 2(r−1)]."""
    a = np.arange(2 * r + 1)[:, None]
    b = np.arange(2 * s + 1)[None, :]
    c = _chi2_oe(a, r, b, s)
    worst = 0.0
    for g in (0, 1, 2):
        worst = max(worst, float(np.abs(c - _chi2_oe(a + g, r + 1, b, s)).max()))  # add a case
        worst = max(worst, float(np.abs(c - _chi2_oe(a, r, b + g, s + 1)).max()))  # add a control
        ok = (a - g >= 0) & (a - g <= 2 * (r - 1)) & (b >= 0)
        d = np.abs(c - _chi2_oe(np.clip(a - g, 0, None), r - 1, b, s))
        worst = max(worst, float(np.where(ok, d, 0).max()))  # remove a case with genotype g
        ok = (b - g >= 0) & (b - g <= 2 * (s - 1)) & (a >= 0)
        d = np.abs(c - _chi2_oe(a, r, np.clip(b - g, 0, None), s - 1))
        worst = max(worst, float(np.where(ok, d, 0).max()))  # remove a control
        # an added/removed individual with a missing call changes nothing
    return worst


def test_allelic_chi2_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        r, s = rng.integers(1, 50, size=2)
        a, b = rng.integers(0, 2 * r + 1), rng.integers(0, 2 * s + 1)
        table = np.array([[a, 2 * r - a], [b, 2 * s - b]])
        got = float(allelic_chi2(a, 2 * r, b, 2 * s))
        if (table.sum(axis=0) == 0).any():
            assert got == 0.0
        else:
            ref = stats.chi2_contingency(table, correction=False).statistic
            assert got == pytest.approx(ref, rel=1e-10, abs=1e-12)
            assert got == pytest.approx(float(_chi2_oe(np.array(a), r, np.array(b), s)), rel=1e-10, abs=1e-12)


def test_allelic_chi2_sensitivity_bounds_add_remove_by_brute_force() -> None:
    tight = 0.0
    for r in range(1, 13):
        for s in range(1, 13):
            bound = allelic_chi2_sensitivity(r, s)
            assert bound == allelic_chi2_sensitivity(s, r)
            worst = _max_change(r, s)
            assert worst <= bound * (1 + 1e-12), (r, s, worst, bound)
            tight = max(tight, worst / bound)
    # the bound is nearly attained (so a looser-looking check would not hide a wrong formula)
    assert tight > 0.9
    # one case: moving from no cases to one case with genotype 2 gives χ² = 2(S+1), the safe
    # formula at (1, S); the unmaximised formula is exactly attained there
    assert _max_change(1, 7) == pytest.approx(2 * 8)


def test_allelic_chi2_sensitivity_values() -> None:
    # the safe replace-one formula 2N²/(min·(max+1)), maximised over add/remove neighbours' margins
    f = lambda r, s: 2 * (r + s) ** 2 / (min(r, s) * (max(r, s) + 1))  # noqa: E731
    assert allelic_chi2_sensitivity(2000, 2000) == pytest.approx(max(f(2000, 2000), f(1999, 2000), f(2000, 2001)))
    assert allelic_chi2_sensitivity(2000, 2000) == pytest.approx(8.0, abs=0.01)
    assert allelic_chi2_sensitivity(1000, 3000) == pytest.approx(f(999, 3000))
    with pytest.raises(ValueError):
        allelic_chi2_sensitivity(0, 5)
    with pytest.raises(ValueError):
        allelic_chi2_sensitivity(5, -1)
