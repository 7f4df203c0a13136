"""chrX / chrY / MT QC statistics from sex-split genotype counts, as PLINK 2 counts them.

``sc`` has shape (variants, 3, 4): sex groups (male, female, unknown sex) × (hom-REF, het,
hom-ALT, missing), summed over sites. PLINK 2 (v2.00a3.5) counts:

* chrX: females and samples of unknown sex are diploid; a male call is one allele (a male het
  call is half an ALT allele); every sample counts in ``--missing``; ``--hardy`` writes
  ``.hardy.x`` from the females' genotypes and the males' haploid calls (male het calls and
  unknown sex left out) with the Graffelman–Weir exact test;
* chrY: males only, haploid (females and unknown sex are not counted, not even as missing);
  no HWE test;
* MT: everyone haploid; no HWE test.
"""

from __future__ import annotations

import numpy as np

from fedgen.stats.hwe import hwe_het_expected, hwe_het_observed
from fedgen.stats.hwex import hwe_xchr_p

M, F, U = 0, 1, 2


def _weights(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per variant and group: alleles per call (2 diploid, 1 haploid, 0 not counted) and whether
    the group counts at all."""
    cls = np.asarray(cls)
    ploidy = np.full((len(cls), 3), 2.0)
    ploidy[cls == "X", M] = 1
    ploidy[cls == "Y"] = (1, 0, 0)
    ploidy[cls == "MT"] = 1
    return ploidy, ploidy > 0


def sex_alt_freq(cls: np.ndarray, sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ALT_FREQS and OBS_CT (allele observations) of ``.afreq``."""
    c = np.asarray(sc, dtype=np.float64)
    ploidy, _ = _weights(cls)
    called = c[:, :, :3].sum(axis=2)
    alt_dip = c[:, :, 1] + 2 * c[:, :, 2]  # ALT alleles as diploid dosage: a haploid call counts half of it
    alt = (alt_dip * ploidy / 2).sum(axis=1)
    obs = (called * ploidy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return alt / obs, obs.astype(np.int64)


def sex_missing(cls: np.ndarray, sc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MISSING_CT, OBS_CT (samples) and F_MISS of ``.vmiss``."""
    c = np.asarray(sc, dtype=np.int64)
    _, counted = _weights(cls)
    miss = (c[:, :, 3] * counted).sum(axis=1)
    n = (c.sum(axis=2) * counted).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return miss, n, miss / n


def hardy_x(sc: np.ndarray, *, midp: bool = False) -> dict[str, np.ndarray]:
    """``.hardy.x`` columns with A1 = REF."""
    c = np.asarray(sc, dtype=np.int64)
    f_hom1, f_het, f_hom2 = c[:, F, 0], c[:, F, 1], c[:, F, 2]
    m1, m2 = c[:, M, 0], c[:, M, 2]
    nf = 2 * (f_hom1 + f_het + f_hom2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_freq = (2 * f_hom1 + f_het) / nf
        m_freq = m1 / (m1 + m2)
    return {
        "FEMALE_HOM_A1_CT": f_hom1,
        "FEMALE_HET_A1_CT": f_het,
        "FEMALE_TWO_AX_CT": f_hom2,
        "MALE_A1_CT": m1,
        "MALE_AX_CT": m2,
        "O(FEMALE_HET_A1)": hwe_het_observed(f_het, f_hom1, f_hom2),
        "E(FEMALE_HET_A1)": hwe_het_expected(f_het, f_hom1, f_hom2),
        "FEMALE_A1_FREQ": f_freq,
        "MALE_A1_FREQ": m_freq,
        "P": hwe_xchr_p(f_het, f_hom1, f_hom2, m1, m2, midp=midp),
    }


HARDY_X_COLS = ("FEMALE_HOM_A1_CT", "FEMALE_HET_A1_CT", "FEMALE_TWO_AX_CT", "MALE_A1_CT", "MALE_AX_CT",
                "O(FEMALE_HET_A1)", "E(FEMALE_HET_A1)", "FEMALE_A1_FREQ", "MALE_A1_FREQ", "P")
