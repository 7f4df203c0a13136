"""privacy=dp Hardy-Weinberg P values include the noise: calibrated (or conservative) on null cohorts."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from fedgen.privacy.accounting import rho_for_epsilon
from fedgen.privacy.mechanisms import NoiseSource, discrete_gaussian, sigma_for_rho
from fedgen.results.plots import lambda_gc
from fedgen.stats.qc import variant_hardy
from fedgen.study.dpfreq import dp_hardy


def _null_release(seed: int, sites: list[int], V: int, epsilon: float, f: np.ndarray | None = None):
    """Pooled exact and noisy genotype counts (V, 4) of null sites (HWE holds, 1/x frequency spectrum), each site's
    counts noised as the DP study does at ``epsilon`` per site with the whole budget on the counts (V variants)."""
    rng = np.random.default_rng(seed)
    if f is None:
        f = 0.01 * 99.0 ** rng.uniform(0, 1, V)  # density ∝ 1/x on [0.01, 0.99]
    sigma = sigma_for_rho(math.sqrt(V), rho_for_epsilon(epsilon, 1e-6))
    geno = np.stack([(1 - f) ** 2, 2 * f * (1 - f), f**2], axis=1)
    exact = np.zeros((V, 4), dtype=np.int64)
    noisy = np.zeros((V, 4), dtype=np.int64)
    for i, n in enumerate(sites):
        c = np.zeros((V, 4), dtype=np.int64)
        c[:, :3] = rng.multinomial(n, geno)
        exact += c
        noisy += c + discrete_gaussian(sigma, (V, 4), NoiseSource(seed=100 * seed + i))
    return exact, noisy, sigma


@pytest.mark.parametrize("sites,V", [([20000, 20000, 20000], 1000),  # biobank sites, a 1,000-variant panel
                                     ([1500, 2000, 800], 4000)])      # hospital sites, noise swamps the counts
def test_dp_hwe_p_values_are_calibrated_on_a_null_cohort_at_epsilon_1(sites, V):
    exact, noisy, sigma = _null_release(3, sites, V, 1.0)
    h = dp_hardy(noisy, sum(sites), len(sites) * sigma**2)
    p = h["P"]
    assert p.shape == (V,) and np.all((p > 0) & (p <= 1))
    assert p.min() > 1e-6
    lam = lambda_gc(p)
    if sites[0] == 20000:  # noise small against the counts: close to uniform
        assert 0.9 <= lam <= 1.1
        assert 0.03 <= np.mean(p < 0.05) <= 0.07
    else:  # noise swamps the counts: conservative (no power), never noise read as deviation
        assert lam <= 1.1 and np.mean(p < 0.05) <= 0.06
    # the same noisy counts tested as if exact (PLINK's exact test on the clipped cells): noise read as HWE failure
    naive = variant_hardy(np.clip(noisy, 0, None).astype(np.int64))["P"]
    assert np.nanmin(naive) < 1e-6


def test_dp_hwe_test_has_power_where_the_noise_allows_it():
    """A real heterozygote deficit (F = 0.05, e.g. a genotyping artefact) at biobank size is found; at zero noise
    the test is the 1-df HWE chi-square."""
    rng = np.random.default_rng(5)
    V, n, F = 300, 60000, 0.05
    f = rng.uniform(0.2, 0.5, V)
    geno = np.stack([(1 - f) ** 2 + F * f * (1 - f), 2 * f * (1 - f) * (1 - F), f**2 + F * f * (1 - f)], axis=1)
    counts = np.zeros((V, 4))
    counts[:, :3] = rng.multinomial(n, geno)
    sigma = sigma_for_rho(math.sqrt(V), rho_for_epsilon(1.0, 1e-6))
    noisy = counts + discrete_gaussian(sigma, (V, 4), NoiseSource(seed=9)) * 1.0
    p = dp_hardy(noisy, n, sigma**2)["P"]
    assert np.median(p) < 1e-6
    # no noise: z² is the HWE chi-square n·F̂²
    h = dp_hardy(counts, n, 0.0)
    o, e = counts[:, 1] / n, h["E(HET_A1)"]
    np.testing.assert_allclose(h["Z"] ** 2, n * (1 - o / e) ** 2, rtol=1e-9)


def test_dp_hardy_is_post_processing_of_the_release():
    """Inputs: the noisy counts, the public sample total and the noise variance, nothing else; the count columns are the
    projected cells rounded and clamped at 0, stated, not silently wrong."""
    assert list(inspect.signature(dp_hardy).parameters) == ["noisy_counts", "n_samples", "noise_var"]
    exact, noisy, sigma = _null_release(4, [300, 300], 200, 1.0)
    h = dp_hardy(noisy, 600, 2 * sigma**2)
    for col in ("HOM_A1_CT", "HET_A1_CT", "TWO_AX_CT"):
        assert h[col].dtype == np.int64 and h[col].min() >= 0
    x = noisy - (noisy.sum(axis=1, keepdims=True) - 600) / 4.0
    np.testing.assert_array_equal(h["HET_A1_CT"], np.clip(np.rint(x[:, 1]), 0, None))
    with pytest.raises(ValueError):
        dp_hardy(noisy[:, :3], 600, 1.0)
    with pytest.raises(ValueError):
        dp_hardy(noisy, 600, -1.0)
