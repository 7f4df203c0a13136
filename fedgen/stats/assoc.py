"""PLINK 1.9 ``--assoc`` allelic case/control test from allele counts, and the A1 allele choice.

Everything is a function of per-variant allele counts, which sites can sum: ``a``/``b`` = A1/A2
alleles in cases, ``c``/``d`` = A1/A2 alleles in controls (samples with a missing genotype or
phenotype contribute nothing).  The arithmetic repeats PLINK 1.9's double operations
(``chi22_eval``, the OR expression), so the 4-significant-digit columns print identically
(plink-ng 1.9 ``plink_assoc.c: model_assoc``, ``plink_stats.c``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedgen.stats.plinkfmt import format_g4
from fedgen.stats.pvalues import chisq1_p

__all__ = ["a1_is_ref", "allelic_counts", "allelic_assoc", "format_assoc_columns"]


def a1_is_ref(alt_ct: Any, ref_ct: Any) -> np.ndarray:
    """Whether A1 (the tested allele) is REF, by allele counts over **all loaded** samples.

    PLINK 1.9 makes A1 the minor allele (reversing the VCF's A1=ALT only when the REF
    frequency is below 0.5; no observations count as 0.5); PLINK 2 ``--glm`` omits the major
    allele with ties going to REF.  Both reduce to: A1 = REF iff ALT count > REF count.
    Phenotype-missing samples count (they are loaded), unlike in the test itself.

    Parameters
    ----------
    alt_ct, ref_ct : array_like of int
        ALT and REF allele counts per variant (founders; missing calls excluded).

    Returns
    -------
    ndarray of bool
    """
    return np.asarray(alt_ct) > np.asarray(ref_ct)


def allelic_counts(g: Any, case: Any, *, a1_ref: Any = None) -> dict[str, np.ndarray]:
    """One site's allele counts ``a, b, c, d`` (add them across sites).

    Parameters
    ----------
    g : (V, N) int
        ALT dosages 0/1/2, ``-1`` missing.
    case : (N,) float
        1 case, 0 control, NaN missing (those samples are skipped).
    a1_ref : (V,) bool, optional
        A1 = REF for these variants (:func:`a1_is_ref` on pooled counts); default A1 = ALT.

    Returns
    -------
    dict of (V,) int64: ``a`` (A1 in cases), ``b`` (A2 in cases), ``c``, ``d`` (controls).
    """
    g = np.asarray(g)
    case = np.asarray(case, dtype=np.float64)
    out = {}
    for name, m in (("case", case == 1), ("ctrl", case == 0)):
        gm = g[:, m]
        present = gm >= 0
        alt = np.where(present, gm, 0).sum(1).astype(np.int64)
        tot = 2 * present.sum(1).astype(np.int64)
        out[name] = (alt, tot - alt)
    a, b = out["case"]
    c, d = out["ctrl"]
    if a1_ref is not None:
        r = np.asarray(a1_ref, dtype=bool)
        a, b = np.where(r, b, a), np.where(r, a, b)
        c, d = np.where(r, d, c), np.where(r, c, d)
    return {"a": a, "b": b, "c": c, "d": d}


def allelic_assoc(a: Any, b: Any, c: Any, d: Any) -> dict[str, np.ndarray]:
    """Allelic chi-square test (no continuity correction) with PLINK 1.9's NA rules.

    Parameters
    ----------
    a, b, c, d : array_like of int
        A1/A2 allele counts in cases (a, b) and controls (c, d).

    Returns
    -------
    dict of (V,) float (NaN = PLINK's ``NA``)
        ``f_a`` = a/(a+b) (NA without case alleles), ``f_u`` = c/(c+d) (NA without control
        alleles), ``chisq`` = N(ad - bc)²/((a+b)(c+d)(a+c)(b+d)) and ``p`` (χ²₁ upper tail,
        full double precision) — NA when either allele is absent (a+c = 0 or b+d = 0); when
        only a case or control total is 0 PLINK reports CHISQ 0, P 1 — and ``or_`` = ad/(bc),
        NA when bc = 0.
    """
    arrs = [np.asarray(x) for x in (a, b, c, d)]
    # integer counts stay exact in int64; imputed (fractional) counts are float64
    kind = np.int64 if all(x.dtype.kind in "iub" for x in arrs) else np.float64
    a, b, c, d = (x.astype(kind) for x in arrs)
    fa, fb, fc, fd = (x.astype(np.float64) for x in (a, b, c, d))
    with np.errstate(divide="ignore", invalid="ignore"):
        f_a = np.where(a + b > 0, fa / (fa + fb), np.nan)
        f_u = np.where(c + d > 0, fc / (fc + fd), np.nan)
        # chi22_eval(m11 = b, row1 = a + b, col1 = b + d, total), in PLINK's operation order
        row1 = a + b
        col1 = b + d
        total = row1 + c + d
        expm11_numer = (row1 * col1).astype(np.float64)
        denom = expm11_numer * ((total - row1) * (total - col1)).astype(np.float64)
        tot_d = total.astype(np.float64)
        dyy = fb * tot_d - expm11_numer
        chisq = np.where(denom != 0, (dyy * dyy * tot_d) / np.where(denom != 0, denom, 1.0), 0.0)
        valid = ((a + c) > 0) & ((b + d) > 0)
        chisq = np.where(valid, chisq, np.nan)
        p = np.where(valid, chisq1_p(np.where(valid, chisq, 0.0)), np.nan)
        or_ = np.where(fc * fb == 0.0, np.nan, (fa * fd) / (fc * fb))
    return {"f_a": f_a, "f_u": f_u, "chisq": chisq, "p": p, "or_": or_}


#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


def noisy_allelic_assoc(a: Any, b: Any, c: Any, d: Any, *, noise_var: float, case_alleles: float,
                        control_alleles: float) -> dict[str, np.ndarray]:
    """Allelic association test on differentially private counts, with the noise in its variance.

    Parameters
    ----------
    a, b, c, d : array_like
        Noisy A1/A2 allele counts in cases (a, b) and controls (c, d), summed over sites.
    noise_var : float
        Variance of the noise in each count (the sum over sites of each site's σ²; a discrete
        Gaussian's variance is at most σ², so this is conservative).
    case_alleles, control_alleles : float
        2 × the (published) numbers of cases and of controls: fixed denominators.

    Returns
    -------
    dict of (V,) float, NaN = ``NA``
        ``f_a`` = a/n_A and ``f_u`` = c/n_U (clipped to [0, 1]), ``chisq`` = z², ``p`` (χ²₁ upper
        tail), ``or_`` (NA with a non-positive cell) and, as PLINK 1.9's ``--ci 0.95`` prints them,
        ``se`` (of ln OR: √Σ (n + σ²)/n² over the four cells, sampling plus noise) with the 95 %
        interval ``l95``, ``u95`` of the OR, where
        z = (a/n_A − c/n_U) / √(f̄(1 − f̄)(1/n_A + 1/n_U) + σ²(1/n_A² + 1/n_U²)),
        f̄ = (a + c)/(n_A + n_U): the binomial variance under no association plus the noise's.

    Notes
    -----
    The denominators are fixed numbers, so the noise enters linearly and z is normal under no
    association whatever its size (a ratio such as a/(a + b) of two noisy counts is not, and is
    undefined once the noise exceeds the counts). A missing call counts as no copy of A1 in both
    groups, which leaves the null intact when calls are missing at random. Testing noisy counts
    as if they were exact turns noise into significance; this test is calibrated.
    """
    a, b, c, d = (np.asarray(x, dtype=np.float64) for x in (a, b, c, d))
    n_a, n_u, s2 = float(case_alleles), float(control_alleles), float(noise_var)
    if n_a <= 0 or n_u <= 0:
        nan = np.full(a.shape, np.nan)
        return {"f_a": nan, "f_u": nan, "chisq": nan, "p": nan, "or_": nan}
    fa, fu = a / n_a, c / n_u
    fbar = np.clip((a + c) / (n_a + n_u), 0.0, 1.0)
    var = fbar * (1 - fbar) * (1 / n_a + 1 / n_u) + s2 * (1 / n_a**2 + 1 / n_u**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (fa - fu) / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)
        chisq = z * z
        p = np.where(np.isfinite(chisq), chisq1_p(np.where(np.isfinite(chisq), chisq, 0.0)), np.nan)
        pos = (a > 0) & (b > 0) & (c > 0) & (d > 0)
        or_ = np.where(pos, (a * d) / (b * c), np.nan)
        # SE of ln OR by the delta method, each cell's variance its count plus the noise's
        se = np.where(pos, np.sqrt(sum((x + s2) / np.where(x > 0, x, 1.0) ** 2 for x in (a, b, c, d))), np.nan)
        lo, hi = np.exp(np.log(or_) - Z95 * se), np.exp(np.log(or_) + Z95 * se)
    return {"f_a": np.clip(fa, 0, 1), "f_u": np.clip(fu, 0, 1), "chisq": chisq, "p": p, "or_": or_,
            "se": se, "l95": lo, "u95": hi}


def format_assoc_columns(res: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """PLINK 1.9's fixed-width text of F_A, F_U (width 8) and CHISQ, P, OR (width 12); with
    ``se`` in ``res`` also SE, L95, U95 (width 12), the columns ``--ci 0.95`` adds."""
    out = {
        "F_A": format_g4(res["f_a"], width=8, nan="NA"),
        "F_U": format_g4(res["f_u"], width=8, nan="NA"),
        "CHISQ": format_g4(res["chisq"], width=12, nan="NA"),
        "P": format_g4(res["p"], width=12, nan="NA"),
        "OR": format_g4(res["or_"], width=12, nan="NA"),
    }
    if "se" in res:
        out.update({k.upper(): format_g4(res[k], width=12, nan="NA") for k in ("se", "l95", "u95")})
    return out
