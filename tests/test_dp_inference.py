"""DP association p-values include the noise: calibrated under the null, not noise read as hits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import qc_plan, split_sites

from fedgen.federation.transport import InProcessTransport
from fedgen.privacy.accounting import rho_for_epsilon
from fedgen.privacy.mechanisms import NoiseSource, discrete_gaussian, sigma_for_rho
from fedgen.results.plots import lambda_gc
from fedgen.stats import assoc as A
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth


def _null_counts(rng, V, sites):
    f = rng.uniform(0.01, 0.5, V)
    out = np.zeros((V, 4))
    for R, S in sites:
        a = rng.binomial(2 * R, f)
        c = rng.binomial(2 * S, f)
        out += np.stack([a, 2 * R - a, c, 2 * S - c], axis=1)
    return out


@pytest.mark.parametrize("epsilon", [1.0, 50.0])
def test_noise_aware_allelic_test_is_calibrated_on_null_counts(epsilon):
    rng = np.random.default_rng(7)
    V, sites = 10_000, [(600, 900), (800, 700), (400, 500)]
    sigma = sigma_for_rho(2 * math.sqrt(V), 0.5 * rho_for_epsilon(epsilon, 1e-6))
    exact = _null_counts(rng, V, sites)
    noise = sum(discrete_gaussian(sigma, (V, 4), NoiseSource(seed=s)) for s in range(len(sites)))
    noisy = exact + noise
    r = A.noisy_allelic_assoc(*noisy.T, noise_var=len(sites) * sigma**2, case_alleles=2 * sum(s[0] for s in sites),
                              control_alleles=2 * sum(s[1] for s in sites))
    p = r["p"][np.isfinite(r["p"])]
    assert len(p) == V
    assert 0.9 <= lambda_gc(p) <= 1.1
    assert p.min() > 1e-6
    if epsilon == 1.0:  # the same counts tested as if exact: noise read as genome-wide hits
        naive = A.allelic_assoc(*np.clip(noisy, 0, None).astype(np.int64).T)["p"]
        assert np.nanmin(naive) < 1e-6 and lambda_gc(naive) > 2


def test_noise_aware_test_keeps_power_where_the_noise_is_small():
    rng = np.random.default_rng(3)
    V = 2000
    f = np.full(V, 0.3)
    R = S = 5000
    a = rng.binomial(2 * R, f + 0.05)  # a real effect at every variant
    c = rng.binomial(2 * S, f)
    counts = np.stack([a, 2 * R - a, c, 2 * S - c], axis=1).astype(float)
    r = A.noisy_allelic_assoc(*counts.T, noise_var=4.0, case_alleles=2 * R, control_alleles=2 * S)
    exact = A.allelic_assoc(*counts.astype(np.int64).T)
    np.testing.assert_allclose(r["chisq"], exact["chisq"], rtol=0.02)  # σ = 2: nearly the exact test


def test_dp_study_assoc_is_calibrated_end_to_end(tmp_path, monkeypatch):
    import fedgen.analyses.dp as dpmod

    import itertools

    seeds = itertools.count(5)  # fixed seeds, a different one per draw (sites' noise is independent)
    monkeypatch.setattr(dpmod, "_noise_source", lambda: NoiseSource(seed=next(seeds)))
    data = make_synth(600, 1500, seed=12, missing_rate=0.01, extremes=False)  # BIN is unrelated to genotypes
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5], seed=1, policy=None)
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc"], phenotypes=["BIN"],
                   covariates=[], qc={"maf": 0.01, "geno": None, "hwe": None}, pca=None, pcs=0)
    plan["privacy"] = {"mode": "dp", "epsilon": 1.0, "delta": 1e-6, "force": True}
    run_plan(plan, InProcessTransport(nodes))
    rows = [ln.split() for ln in (tmp_path / "out" / "BIN.assoc").read_text().splitlines()[1:]]
    p = np.array([float(r[8]) for r in rows if r[8] != "NA"])
    assert len(p) > 1000
    assert p.min() > 1e-5 and 0.8 <= lambda_gc(p) <= 1.2


@pytest.mark.parametrize("sigma", [0.0, 30.0])
def test_noisy_or_interval_covers_the_true_odds_ratio(sigma):
    """SE of ln OR = √Σ (n + σ²)/n² (sampling plus the known noise): the 95 % interval covers the true
    OR about 95 % of the time, with and without noise (fixed seed)."""
    rng = np.random.default_rng(3)
    V, R, S = 20000, 1500, 3000
    f_u = rng.uniform(0.1, 0.5, V)
    true_or = np.exp(rng.normal(0.0, 0.3, V))
    f_a = f_u * true_or / (1 - f_u + f_u * true_or)
    a, c = rng.binomial(2 * R, f_a), rng.binomial(2 * S, f_u)
    counts = np.stack([a, 2 * R - a, c, 2 * S - c], axis=1).astype(float)
    noisy = counts + rng.normal(0.0, sigma, counts.shape) if sigma else counts
    r = A.noisy_allelic_assoc(*noisy.T, noise_var=sigma**2, case_alleles=2 * R, control_alleles=2 * S)
    ok = np.isfinite(r["l95"])
    assert ok.mean() > 0.99
    cover = ((r["l95"] <= true_or) & (true_or <= r["u95"]))[ok].mean()
    assert 0.935 <= cover <= 0.965, cover
    if sigma:  # ignoring the noise would cover far less often
        naive = np.sqrt((1 / noisy).sum(axis=1))
        lo, hi = np.exp(np.log(r["or_"]) - 1.96 * naive), np.exp(np.log(r["or_"]) + 1.96 * naive)
        assert ((lo <= true_or) & (true_or <= hi))[ok].mean() < cover - 0.05
