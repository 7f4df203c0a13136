"""PLINK number printing: hand cases from the notes, printf away from ties, and PLINK's own text."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fedgen.stats.hwe import hwe_het_observed
from fedgen.stats.plinkfmt import (
    _fma,
    dtoa_g,
    dtoa_g4,
    format_g4,
    format_g6,
    format_g6_from_ln,
    lntoa_g,
)

DATA = Path(__file__).parent / "data" / "hwe"


def near_tie(x: float, sig: int, tol: str = "1e-6") -> bool:
    """True if x's exact decimal value is within `tol` of a rounding tie at `sig` digits."""
    if not math.isfinite(x) or x == 0:
        return False
    d = abs(Decimal(x))
    scaled = d.scaleb(sig - 1 - d.adjusted())
    frac = scaled - int(scaled)
    return abs(frac - Decimal("0.5")) < Decimal(tol)


def log_uniform(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    x = 10.0 ** rng.uniform(lo, hi, n)
    return np.where(rng.random(n) < 0.2, -x, x)


# ------------------------------------------------------------------------------ dtoa_g
@pytest.mark.parametrize("x, text", [
    (0.1234575, "0.123458"),  # half-to-even with PLINK's window; printf gives 0.123457
    (0.0001234565, "0.000123456"),
    (2.5e-05, "2.5e-05"),
    (1234567.0, "1.23457e+06"),
    (999999.4, "999999"),
    (999999.5, "1e+06"),
    (123456.5, "123456"),
    (9.9999951, "10"),
    (0.5, "0.5"),
    (1.0, "1"),
    (100.0, "100"),
    (0.0625, "0.0625"),
    (0.0, "0"),
    (-0.0, "0"),
    (-3.25e-07, "-3.25e-07"),
    (1e-100, "1e-100"),
    (1.7976931348623157e308, "1.79769e+308"),
    (5e-324, "4.94066e-324"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
    (float("-inf"), "-inf"),
])
def test_dtoa_g_hand_cases(x, text):
    assert dtoa_g(x) == text


def test_format_g6_equals_printf_away_from_ties():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        log_uniform(rng, 20000, -307, 308),
        log_uniform(rng, 20000, -6, 7),
        np.array([round(v, k) for v, k in zip(rng.uniform(0, 1, 5000).tolist(),
                                               rng.integers(1, 9, 5000).tolist())]),
        rng.integers(-10**7, 10**7, 2000).astype(float),
    ])
    ours = format_g6(x)
    checked = 0
    for v, s in zip(x.tolist(), ours):
        if near_tie(v, 6):
            continue
        assert s == "%.6g" % v, v
        checked += 1
    assert checked > 40000


def test_format_g6_options_and_shapes():
    x = np.array([[1.5, np.nan], [2.0, 3e-9]])
    assert format_g6(x, nan="NA") == ["1.5", "NA", "2", "3e-09"]
    assert format_g6([]) == []


# ----------------------------------------------------------------------------- lntoa_g
def plink_zp_ln(z: float) -> float:
    """ln of the two-sided normal P as PLINK 2 computes it for large |z| (notes §3)."""
    s = abs(z) / math.sqrt(2)
    t = 1 / (1 + s / 2)
    poly = 0.0
    for c in (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
              0.09678418, 0.37409196, 1.00002368, -1.26551223):
        poly = poly * t + c
    return math.log(t) - s * s + poly


def test_lntoa_g_below_double_range():
    assert lntoa_g(plink_zp_ln(40.0)) == "7.31179e-350"
    assert lntoa_g(-1e4) == "1.13548e-4343"
    assert lntoa_g(-math.inf) == "0"
    assert lntoa_g(-1e300) == "0"
    assert lntoa_g(math.inf) == "inf"
    assert lntoa_g(0.0) == "1"
    assert lntoa_g(4e-6) == "1"
    assert lntoa_g(math.log(2.5e-5)) == "2.5e-05"
    assert lntoa_g(math.log(1234567.0)) == "1.23457e+06"
    assert format_g6_from_ln([math.nan], nan="NA") == ["NA"]


def test_format_g6_from_ln_equals_printf_away_from_ties():
    rng = np.random.default_rng(1)
    ln = np.concatenate([rng.uniform(-700, 700, 20000), rng.uniform(-12, 15, 20000)])
    x = np.exp(ln)
    for fma in (True, False):
        ours = format_g6_from_ln(ln, fma=fma)
        for v, s in zip(x.tolist(), ours):
            if v == 0 or math.isinf(v) or near_tie(v, 6, "1e-4"):
                continue  # exp() itself is only accurate to ~1e-13 for |ln| ~ 700
            assert s == "%.6g" % v, v


def test_fma_emulation_is_exact():
    rng = np.random.default_rng(2)
    a = np.trunc(rng.uniform(-400, 400, 20000))
    b = np.full(a.shape, -2.3025850929940457)
    c = -a * 2.3025850929940457 + rng.normal(0, 3, a.shape) * 10.0 ** rng.integers(-16, 1, a.shape)
    got = _fma(a, b, c)
    for ai, bi, ci, g in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist()):
        exact = Fraction(ai) * Fraction(bi) + Fraction(ci)
        assert g == float(exact)  # float(Fraction) rounds to nearest even


# --------------------------------------------------------------------------- PLINK 1.9
@pytest.mark.parametrize("x, text", [
    (0.12345, "0.1234"),  # printf %.4g gives 0.1235
    (1.234e-05, "1.234e-05"),
    (0.00012345, "0.0001234"),
    (12345.0, "1.234e+04"),
    (9999.4, "9999"),
    (9999.5, "1e+04"),
    (0.0, "0"),
    (1.0, "1"),
    (0.5, "0.5"),
    (-2.5, "-2.5"),
    (1e-300, "1e-300"),
    (float("nan"), "nan"),
    (float("inf"), "inf"),
])
def test_dtoa_g4_hand_cases(x, text):
    assert dtoa_g4(x) == text


def test_format_g4_width_and_na():
    assert format_g4([0.1234, np.nan, 0.0, 2.5e-5], width=12, nan="NA") == [
        "      0.1234", "          NA", "           0", "     2.5e-05"]
    assert dtoa_g4(float("-inf"), width=12) == "        -inf"


def test_format_g4_equals_printf_away_from_ties():
    rng = np.random.default_rng(3)
    x = np.concatenate([log_uniform(rng, 20000, -307, 308), log_uniform(rng, 20000, -6, 6),
                        rng.integers(0, 4000, 4000) / 4000])
    for v, s in zip(x.tolist(), format_g4(x)):
        if not near_tie(v, 4):
            assert s == "%.4g" % v, v


# ------------------------------------------------------------------------------ speed
@pytest.mark.parametrize("fn", [format_g6, format_g6_from_ln, format_g4])
def test_speed_100k(fn):
    rng = np.random.default_rng(4)
    x = rng.uniform(-50, 15, 100_000)
    if fn is not format_g6_from_ln:
        x = np.exp(x)
    fn(x[:10])
    t0 = time.perf_counter()
    out = fn(x)
    assert time.perf_counter() - t0 < 1.0
    assert len(out) == x.size


# ------------------------------------------------------------------------- PLINK text
def test_matches_plink2_text_on_rounding_ties():
    """O(HET_A1) = het/3200 hits exact 7th-digit ties; PLINK 2 rounds them half-to-even."""
    c = np.loadtxt(DATA / "counts.tsv", skiprows=1, usecols=(1, 2, 3), dtype=np.int64)
    lines = (DATA / "plink2.hardy").read_text().splitlines()
    header = lines[0].split("\t")
    plink_o = [ln.split("\t")[header.index("O(HET_A1)")] for ln in lines[1:]]
    o = hwe_het_observed(c[:, 1], c[:, 0], c[:, 2])
    assert format_g6(o) == plink_o
    printf_differs = [i for i, v in enumerate(o.tolist()) if "%.6g" % v != plink_o[i]]
    assert len(printf_differs) >= 5


def chi22_eval(m11: int, row1: int, col1: int, total: int) -> float:
    """PLINK 1.9 plink_stats.c chi22_eval, same double operations."""
    expm11 = float(row1 * col1)
    denom = expm11 * float((total - row1) * (total - col1))
    if denom == 0:
        return 0.0
    dxx = float(total)
    dyy = m11 * dxx - expm11
    return (dyy * dyy * dxx) / denom


def assoc_suffix(a: int, b: int, c: int, d: int, a2: str) -> str:
    """Expected text of one --assoc line from F_A on; a/b case A1/A2, c/d control A1/A2."""
    from scipy.special import chdtrc

    fa = format_g4([a / (a + b)], width=8)[0] if a + b else "NA".rjust(8)
    fu = format_g4([c / (c + d)], width=8)[0] if c + d else "NA".rjust(8)
    if (a + c) and (b + d):
        chisq = chi22_eval(b, a + b, b + d, a + b + c + d)
        stat = " ".join(format_g4([chisq, chdtrc(1, chisq)], width=12))
    else:
        stat = "NA".rjust(12) + " " + "NA".rjust(12)
    odds = format_g4([(float(a) * d) / (float(c) * b)], width=12)[0] if c * b else "NA".rjust(12)
    return f"{fa} {fu} {a2:>4} {stat} {odds} "


def write_cc_vcf(path: Path, pheno: Path, geno: np.ndarray, case: np.ndarray) -> None:
    """geno: (variants, samples) ALT dosage, -1 = missing."""
    gt = np.array(["./.", "0/0", "0/1", "1/1"])[geno + 1]
    n = geno.shape[1]
    head = ["##fileformat=VCFv4.2", "##contig=<ID=1,length=1000000>",
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
            "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT"]
                      + [f"S{i}" for i in range(n)])]
    body = ["\t".join(["1", str(100 + v), f"v{v}", "A", "G", ".", ".", ".", "GT", *gt[v]])
            for v in range(geno.shape[0])]
    path.write_text("\n".join(head + body) + "\n")
    pheno.write_text("".join(f"S{i} S{i} {2 if k else 1}\n" for i, k in enumerate(case)))


@pytest.mark.plink
@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 not on PATH")
def test_matches_live_plink19_assoc(tmp_path):
    rng = np.random.default_rng(19)
    n_case, n_ctrl = 2000, 3300  # > 5000 alleles per side: CHISQ reaches exponent form
    case = np.r_[np.ones(n_case, bool), np.zeros(n_ctrl, bool)]
    rows = []
    for v in range(40):
        p = rng.uniform(0.005, 0.5)
        pc = min(0.99, p * (rng.uniform(0.3, 3) if v % 2 else 1))
        g = np.where(case, rng.binomial(2, pc, case.size), rng.binomial(2, p, case.size))
        g[rng.random(case.size) < 0.03] = -1
        rows.append(g)
    # F_A = k/4000 with a 5th-digit tie (PLINK rounds half-to-even, printf does not)
    for k in (401, 405, 407, 411, 441, 1003):
        g = np.where(case, 0, rng.binomial(2, 0.2, case.size))
        g[:k] = 1
        rows.append(g)
    sep = np.where(case, 2, 0)  # perfect separation: CHISQ = 10600, P = 0, OR NA
    mono = np.zeros(case.size, int)  # monomorphic: CHISQ/P NA
    no_case = np.where(case, -1, rng.binomial(2, 0.3, case.size))  # F_A NA, CHISQ 0, P 1
    one_case = np.where(case, 0, rng.binomial(2, 0.3, case.size))
    one_case[0] = 1  # OR = 0-ish extreme
    rows += [sep, mono, no_case, one_case]
    geno = np.array(rows)
    write_cc_vcf(tmp_path / "cc.vcf", tmp_path / "pheno.txt", geno, case)
    subprocess.run(["plink1.9", "--vcf", "cc.vcf", "--double-id", "--pheno", "pheno.txt",
                    "--assoc", "--allow-no-sex", "--out", "cc"], cwd=tmp_path, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = (tmp_path / "cc.assoc").read_text().splitlines()[1:]
    assert len(lines) == geno.shape[0]
    mismatches = []
    for g, line in zip(geno, lines):
        a1 = line.split()[3]
        alt_case = int(g[case & (g >= 0)].sum())
        ref_case = int(2 * (case & (g >= 0)).sum()) - alt_case
        alt_ctrl = int(g[~case & (g >= 0)].sum())
        ref_ctrl = int(2 * (~case & (g >= 0)).sum()) - alt_ctrl
        if a1 == "G":
            exp = assoc_suffix(alt_case, ref_case, alt_ctrl, ref_ctrl, "A")
        else:
            exp = assoc_suffix(ref_case, alt_case, ref_ctrl, alt_ctrl, "G")
        if not line.endswith(exp):
            mismatches.append((line, exp))
    assert not mismatches, mismatches[:3]
