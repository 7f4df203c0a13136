"""Hardy–Weinberg exact test: naive definitions, a line-by-line PLINK port, and PLINK 2 itself."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fedgen.stats.hwe import hwe_exact_p, hwe_het_expected, hwe_het_observed
from fedgen.stats.plinkfmt import format_g6

DATA = Path(__file__).parent / "data" / "hwe"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_hwe_fixtures.py"
TIE_TOL = 2.0**-44


# ----------------------------------------------------------------------------- references
def naive_exact(het: int, hom1: int, hom2: int, midp: bool = False) -> Fraction:
    """Wigginton et al. (2005) by definition, in exact rational arithmetic.

    P(het = k | n_A, N) = N! / (n_AA! k! n_BB!) · 2^k · n_A! n_B! / (2N)!; the P value sums
    every k with P(k) ≤ P(observed) (PLINK's relative 2^-44 tie tolerance); mid-p removes half
    the mass of the ties (observed included).
    """
    n = het + hom1 + hom2
    if n == 0:
        return Fraction(1, 2) if midp else Fraction(1)
    n_a = 2 * hom1 + het
    n_b = 2 * n - n_a
    denom = math.comb(2 * n, n_a)

    def prob(k: int) -> Fraction:
        aa, bb = (n_a - k) // 2, (n_b - k) // 2
        return Fraction(math.factorial(n) * 2**k,
                        math.factorial(aa) * math.factorial(k) * math.factorial(bb) * denom)

    support = [k for k in range(n_a % 2, min(n_a, n_b) + 1, 2)]
    probs = {k: prob(k) for k in support}
    assert sum(probs.values()) == 1
    p_obs = probs[het]
    tail = sum(p for p in probs.values() if p <= p_obs * (1 + Fraction(TIE_TOL)))
    if not midp:
        return tail
    ties = sum(p for p in probs.values() if abs(p / p_obs - 1) < TIE_TOL)
    return tail - ties / 2


def naive_log(het: int, hom1: int, hom2: int) -> float:
    """The same definition in log space (lgamma), for large N."""
    n = het + hom1 + hom2
    n_a = 2 * hom1 + het
    n_b = 2 * n - n_a
    k = np.arange(n_a % 2, min(n_a, n_b) + 1, 2, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    lp = k * math.log(2) - lg((n_a - k) / 2 + 1) - lg(k + 1) - lg((n_b - k) / 2 + 1)
    lp_obs = lp[int((het - n_a % 2) // 2)]
    m = lp.max()
    total = np.exp(lp - m).sum()
    return float(np.exp(lp[lp <= lp_obs + 1e-9] - m).sum() / total)


def plink_hwep(obs_hets: int, obs_hom1: int, obs_hom2: int, midp: bool) -> float:
    """Line-by-line Python transcription of PLINK 2.00a3.5 ``HweP`` (plink2_stats.cc).

    A readable scalar definition of the fast path: the vectorised code must agree bit for bit.
    """
    eps, bias, dbl_max = 2.0**-44, 2.0**-83, sys.float_info.max
    homc, homr = (obs_hom2, obs_hom1) if obs_hom1 < obs_hom2 else (obs_hom1, obs_hom2)
    rare = 2 * homr + obs_hets
    g2 = (obs_hets + homc + homr) * 2
    if not g2:
        return 0.5 if midp else 1.0
    tie = 1
    h2, r2, c2 = float(obs_hets), float(homr), float(homc)
    tailp = (1 - eps) * bias
    centerp = 0.0
    lastp2 = lastp1 = tailp
    if obs_hets * g2 > rare * (g2 - rare):
        while h2 > 1.5:
            r2 += 1
            c2 += 1
            lastp2 *= (h2 * (h2 - 1)) / (4 * r2 * c2)
            h2 -= 2
            if lastp2 < bias:
                tie += lastp2 > (1 - 2 * eps) * bias
                tailp += lastp2
                break
            centerp += lastp2
            if centerp > dbl_max:
                return 0.0
        if centerp == 0 and not midp:
            return 1.0
        while h2 > 1.5:
            r2 += 1
            c2 += 1
            lastp2 *= (h2 * (h2 - 1)) / (4 * r2 * c2)
            h2 -= 2
            pre, tailp = tailp, tailp + lastp2
            if tailp <= pre:
                break
        h1, r1, c1 = obs_hets + 2.0, float(homr), float(homc)
        while r1 > 0.5:
            lastp1 *= (4 * r1 * c1) / (h1 * (h1 - 1))
            pre, tailp = tailp, tailp + lastp1
            if tailp <= pre:
                break
            h1 += 2
            r1 -= 1
            c1 -= 1
    else:
        while r2 > 0.5:
            h2 += 2
            lastp2 *= (4 * r2 * c2) / (h2 * (h2 - 1))
            r2 -= 1
            c2 -= 1
            if lastp2 < bias:
                tie += lastp2 > (1 - 2 * eps) * bias
                tailp += lastp2
                break
            centerp += lastp2
            if centerp > dbl_max:
                return 0.0
        if centerp == 0 and not midp:
            return 1.0
        while r2 > 0.5:
            h2 += 2
            lastp2 *= (4 * r2 * c2) / (h2 * (h2 - 1))
            r2 -= 1
            c2 -= 1
            pre, tailp = tailp, tailp + lastp2
            if tailp <= pre:
                break
        h1, r1, c1 = float(obs_hets), float(homr), float(homc)
        while h1 > 1.5:
            r1 += 1
            c1 += 1
            lastp1 *= (h1 * (h1 - 1)) / (4 * r1 * c1)
            pre, tailp = tailp, tailp + lastp1
            if tailp <= pre:
                break
            h1 -= 2
    if not midp:
        p = tailp / (tailp + centerp)
    else:
        p = (tailp - ((1 - eps) * bias * 0.5) * tie) / (tailp + centerp)
    return 0.0 if p < sys.float_info.min else p  # PLINK runs with flush-to-zero


def small_combos(max_n: int) -> np.ndarray:
    return np.array([(h, a, n - h - a) for n in range(max_n + 1) for h in range(n + 1)
                     for a in range(n + 1 - h)], dtype=np.int64)


def random_counts(rng: np.random.Generator, v: int, n_lo: int, n_hi: int) -> np.ndarray:
    """(het, hom1, hom2) rows: HWE draws mixed with strong excess/deficit of hets."""
    n = rng.integers(n_lo, n_hi + 1, v)
    p = np.where(rng.random(v) < 0.3, rng.uniform(0.0005, 0.02, v), rng.uniform(0.02, 0.5, v))
    f = np.where(rng.random(v) < 0.3, rng.uniform(-0.6, 0.9, v), 0.0)
    q = 1 - p
    probs = np.stack([q * q + f * p * q, 2 * p * q * (1 - f), p * p + f * p * q], 1)
    probs = np.clip(probs, 0, None)
    probs /= probs.sum(1, keepdims=True)
    g = np.array([rng.multinomial(ni, pi) for ni, pi in zip(n, probs)])
    return np.column_stack([g[:, 1], g[:, 0], g[:, 2]])


def load_script():
    spec = importlib.util.spec_from_file_location("make_hwe_fixtures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def read_hardy(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].lstrip("#").split("\t"), [ln.split("\t") for ln in lines[1:]]


def our_hardy_rows(hom_ref: np.ndarray, het: np.ndarray, hom_alt: np.ndarray, midp: bool
                   ) -> list[list[str]]:
    """Counts + O(HET_A1), E(HET_A1), P columns as PLINK prints them (A1 = REF)."""
    o = format_g6(hwe_het_observed(het, hom_ref, hom_alt))
    e = format_g6(hwe_het_expected(het, hom_ref, hom_alt))
    p = format_g6(hwe_exact_p(het, hom_ref, hom_alt, midp=midp))
    return [[str(a), str(h), str(b), oo, ee, pp]
            for a, h, b, oo, ee, pp in zip(hom_ref.tolist(), het.tolist(), hom_alt.tolist(),
                                           o, e, p)]


def compare_with_plink(hardy: Path, hom_ref, het, hom_alt, midp: bool) -> int:
    header, rows = read_hardy(hardy)
    assert header[-1] == ("MIDP" if midp else "P")
    cols = [header.index(c) for c in
            ("HOM_A1_CT", "HET_A1_CT", "TWO_AX_CT", "O(HET_A1)", "E(HET_A1)", header[-1])]
    theirs = [[r[i] for i in cols] for r in rows]
    ours = our_hardy_rows(hom_ref, het, hom_alt, midp)
    assert len(theirs) == len(ours)
    bad = [(i, t, o) for i, (t, o) in enumerate(zip(theirs, ours)) if t != o]
    assert not bad, f"{len(bad)} rows differ from PLINK, first: {bad[:3]}"
    return len(rows)


# -------------------------------------------------------------------------- definition
@pytest.mark.parametrize("midp", [False, True])
def test_matches_exact_definition_all_small_counts(midp):
    g = small_combos(16)
    ours = hwe_exact_p(g[:, 0], g[:, 1], g[:, 2], midp=midp)
    for (h, a, b), p in zip(g.tolist(), ours.tolist()):
        ref = float(naive_exact(h, a, b, midp))
        assert p == pytest.approx(ref, rel=1e-12, abs=1e-300), (h, a, b)


def test_matches_log_space_definition_large_n():
    rng = np.random.default_rng(7)
    g = random_counts(rng, 150, 200, 5000)
    ours = hwe_exact_p(g[:, 0], g[:, 1], g[:, 2])
    for (h, a, b), p in zip(g.tolist(), ours.tolist()):
        ref = naive_log(h, a, b)
        if ref < 1e-300:
            assert p < 1e-290
        else:
            assert p == pytest.approx(ref, rel=1e-9), (h, a, b)


@pytest.mark.parametrize("midp", [False, True])
def test_bitwise_equal_to_plink_transcription(midp):
    rng = np.random.default_rng(11)
    g = np.concatenate([
        small_combos(12),
        random_counts(rng, 400, 1, 6000),
        np.array([[0, 1500, 1500], [3000, 0, 0], [0, 3000, 0], [1, 2999, 0], [2, 2998, 0],
                  [3000 - 2 * 1243, 1243, 1243], [3000 - 2 * 257, 257, 257], [0, 1, 1],
                  [1, 0, 1], [2, 0, 0]]),
    ])
    ours = hwe_exact_p(g[:, 0], g[:, 1], g[:, 2], midp=midp)
    ref = np.array([plink_hwep(h, a, b, midp) for h, a, b in g.tolist()])
    assert np.array_equal(ours.view(np.int64), ref.view(np.int64))


def test_edge_cases():
    assert hwe_exact_p([0], [0], [0]).tolist() == [1.0]
    assert hwe_exact_p([0], [0], [0], midp=True).tolist() == [0.5]
    assert hwe_exact_p([0, 0], [25, 0], [0, 25]).tolist() == [1.0, 1.0]
    assert hwe_exact_p([0], [25], [0], midp=True).tolist() == [0.5]
    # symmetric in the homozygote classes
    rng = np.random.default_rng(3)
    g = random_counts(rng, 50, 10, 500)
    assert np.array_equal(hwe_exact_p(g[:, 0], g[:, 1], g[:, 2]),
                          hwe_exact_p(g[:, 0], g[:, 2], g[:, 1]))
    # no hets at p = 0.5 with N = 3000: PLINK's running sum overflows, P = 0
    assert hwe_exact_p(0, 1500, 1500) == 0.0
    # shape is kept
    ones = np.ones((2, 3), dtype=int)
    assert hwe_exact_p(ones, ones, ones).shape == (2, 3)
    with pytest.raises(ValueError):
        hwe_exact_p([1, 2], [1], [1])
    with pytest.raises(ValueError):
        hwe_exact_p([-1], [1], [1])


def test_het_columns():
    het = np.array([0, 3, 5, 0, 0])
    hom1 = np.array([0, 4, 0, 7, 0])
    hom2 = np.array([0, 1, 5, 0, 9])
    o = hwe_het_observed(het, hom1, hom2)
    e = hwe_het_expected(het, hom1, hom2)
    assert np.isnan(o[0]) and e[0] == 0.0  # N = 0: PLINK prints nan and 0
    assert o[1] == 3 * (1 / 8) and e[1] == pytest.approx(2 * (11 / 16) * (5 / 16), rel=1e-15)
    assert e[3] == 0.0 and e[4] == 0.0  # monomorphic
    assert format_g6(o) == ["nan", "0.375", "0.5", "0", "0"]


def test_speed_30k_variants():
    rng = np.random.default_rng(5)
    g = random_counts(rng, 30_000, 3500, 4500)
    hwe_exact_p(g[:100, 0], g[:100, 1], g[:100, 2])
    t0 = time.perf_counter()
    hwe_exact_p(g[:, 0], g[:, 1], g[:, 2])
    hwe_exact_p(g[:, 0], g[:, 1], g[:, 2], midp=True)
    elapsed = (time.perf_counter() - t0) / 2
    assert elapsed < 1.0, f"{elapsed:.2f} s for 30,000 variants"


# ---------------------------------------------------------------------------- PLINK 2
def _fixture_counts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = np.loadtxt(DATA / "counts.tsv", skiprows=1, usecols=(1, 2, 3), dtype=np.int64)
    return c[:, 0], c[:, 1], c[:, 2]


@pytest.mark.parametrize("midp", [False, True])
def test_matches_committed_plink2_hardy(midp):
    hom_ref, het, hom_alt = _fixture_counts()
    name = "plink2_midp.hardy" if midp else "plink2.hardy"
    n = compare_with_plink(DATA / name, hom_ref, het, hom_alt, midp)
    assert n == len(het) >= 350


@pytest.mark.plink
@pytest.mark.skipif(shutil.which("plink2") is None, reason="plink2 not on PATH")
@pytest.mark.parametrize("midp", [False, True])
def test_matches_live_plink2(tmp_path, midp):
    mod = load_script()
    plink2 = mod.plink2_binary()
    rng = np.random.default_rng(2024)
    geno = mod.all_combos(9) + mod.random_counts(rng, 60) + [(0, 0, 0), (40, 0, 40), (0, 80, 0)]
    n_samples = max(sum(g) for g in geno)
    rows = [(a, h, b, n_samples - a - h - b) for a, h, b in geno]
    mod.write_vcf(tmp_path / "live.vcf", rows)
    mod.run_hardy(plink2, tmp_path, "live.vcf", "live", midp=midp)
    hom_ref, het, hom_alt = (np.array(x, dtype=np.int64) for x in zip(*geno))
    assert compare_with_plink(tmp_path / "live.hardy", hom_ref, het, hom_alt, midp) == len(geno)


def test_fixture_generator_is_deterministic():
    mod = load_script()
    geno = mod.build_counts()
    hom_ref, het, hom_alt = _fixture_counts()
    assert [tuple(g) for g in geno] == list(zip(hom_ref.tolist(), het.tolist(), hom_alt.tolist()))
