"""Per-variant QC statistics from genotype counts (PLINK 2 ``--freq``, ``--missing``, ``--hardy``).

Every function takes ``counts``, shape (variants, 4): hom-REF, het, hom-ALT, missing, summed
over samples (so federated totals give the pooled answer exactly).
"""

from __future__ import annotations

import numpy as np

from fedgen.stats.hwe import hwe_exact_p, hwe_het_expected, hwe_het_observed


def _split(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = np.asarray(counts, dtype=np.int64)
    return c[:, 0], c[:, 1], c[:, 2], c[:, 3]


def variant_alt_freq(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ALT allele frequency and allele observation count (``.afreq`` ALT_FREQS, OBS_CT).

    Returns
    -------
    alt_freq : (V,) float64, NaN where no call is observed
    obs_ct : (V,) int64, 2 × non-missing samples
    """
    hom_ref, het, hom_alt, _ = _split(counts)
    obs = 2 * (hom_ref + het + hom_alt)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (het + 2 * hom_alt) / obs
    return f, obs


def variant_missing(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Missing call count, samples, missing rate (``.vmiss`` MISSING_CT, OBS_CT, F_MISS)."""
    hom_ref, het, hom_alt, miss = _split(counts)
    n = hom_ref + het + hom_alt + miss
    with np.errstate(invalid="ignore", divide="ignore"):
        return miss, n, miss / n


def variant_hardy(counts: np.ndarray, *, midp: bool = False) -> dict[str, np.ndarray]:
    """Hardy–Weinberg columns with A1 = REF (``.hardy``).

    Returns HOM_A1_CT, HET_A1_CT, TWO_AX_CT, O(HET_A1), E(HET_A1), P (Wigginton exact test).
    """
    hom_ref, het, hom_alt, _ = _split(counts)
    o = hwe_het_observed(het, hom_ref, hom_alt)
    e = hwe_het_expected(het, hom_ref, hom_alt)
    return {
        "HOM_A1_CT": hom_ref,
        "HET_A1_CT": het,
        "TWO_AX_CT": hom_alt,
        "O(HET_A1)": o,
        "E(HET_A1)": e,
        "P": hwe_exact_p(het, hom_ref, hom_alt, midp=midp),
    }


def qc_pass(
    counts: np.ndarray,
    *,
    maf: float | None = None,
    geno: float | None = None,
    hwe: float | None = None,
    hwe_p: np.ndarray | None = None,
    freq: np.ndarray | None = None,
    fmiss: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """PLINK's variant filters: ``--maf`` (MAF < maf fails), ``--geno`` (missing rate > geno
    fails), ``--hwe`` (exact-test P < hwe fails); ``freq``/``fmiss`` replace the ones the counts
    give (sex chromosomes). Returns one boolean "fails" array per active
    filter and ``pass``.
    """
    f = variant_alt_freq(counts)[0] if freq is None else freq  # given: chrX/chrY/MT counted by sex
    fmiss = variant_missing(counts)[2] if fmiss is None else fmiss
    out: dict[str, np.ndarray] = {}
    ok = np.ones(len(f), dtype=bool)
    if geno is not None:
        out["fail_geno"] = ~(np.nan_to_num(fmiss, nan=1.0) <= geno)
        ok &= ~out["fail_geno"]
    if maf is not None:
        m = np.minimum(f, 1 - f)
        out["fail_maf"] = ~(np.nan_to_num(m, nan=-1.0) >= maf)
        ok &= ~out["fail_maf"]
    if hwe is not None:
        p = hwe_p if hwe_p is not None else variant_hardy(counts)["P"]
        out["fail_hwe"] = ~(p >= hwe)
        ok &= ~out["fail_hwe"]
    out["pass"] = ok
    return out
