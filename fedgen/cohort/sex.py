"""Sample sex from the samples table, and how PLINK 2 counts each contig by sex.

The samples table's ``sex`` column (``SEX`` too) is read with PLINK's conventions: ``1``/``M``/
``male`` is male, ``2``/``F``/``female`` is female; ``0``, ``-9``, ``NA``, empty (and a table
without the column) is unknown. Any other value is an input error. Sex never leaves the site: it
only decides how each sample's calls are counted on chrX, chrY and MT.

Contig classes (harmonised names, see :mod:`fedgen.cohort.contigs`): ``X`` (haploid males),
``Y`` (males only, haploid), ``MT`` (everyone haploid); everything else, including the
pseudo-autosomal ``XY``, is diploid like an autosome.
"""

from __future__ import annotations

import numpy as np

from fedgen.cohort.samples import MISSING_TOKENS
from fedgen.errors import InputError

MALE, FEMALE, UNKNOWN = 1, 2, 0
_CODES = {"1": MALE, "m": MALE, "male": MALE, "2": FEMALE, "f": FEMALE, "female": FEMALE, "0": UNKNOWN, "-9": UNKNOWN}
SEX_CHROMS = ("X", "Y", "MT")


def sex_column_name(columns) -> str | None:
    """The samples table's sex column: ``sex`` or ``SEX`` (or another capitalisation), else None."""
    hits = [c for c in columns if c.lower() == "sex"]
    return hits[0] if hits else None


def parse_sex(values) -> np.ndarray:
    """Sex codes (int8: 1 male, 2 female, 0 unknown) of samples-table values; ValueError on others."""
    out = np.zeros(len(values), dtype=np.int8)
    for i, v in enumerate(values):
        v = v.strip()
        if v in MISSING_TOKENS:
            continue
        code = _CODES.get(v.lower())
        if code is None:
            try:
                code = _CODES.get(str(int(float(v))))
            except ValueError:
                code = None
        if code is None:
            raise ValueError(f"{v!r}")
        out[i] = code
    return out


def cohort_sex(cohort) -> np.ndarray:
    """Sex of the cohort's analysed samples (aligned with ``sample_cols``), cached on the cohort."""
    hit = cohort.__dict__.get("_sex")
    if hit is not None:
        return hit
    name = sex_column_name(cohort.table.columns)
    if name is None:
        sex = np.zeros(cohort.n_samples, dtype=np.int8)
    else:
        col = cohort.table.columns[name]
        try:
            sex = parse_sex([col[i] for i in cohort.table_rows.tolist()])
        except ValueError:
            raise InputError(f"{cohort.table.path}: column {name!r} has a value that is not a sex code "
                             "(use 1/M/male, 2/F/female, 0/NA for unknown)") from None
    cohort.__dict__["_sex"] = sex
    return sex


def contig_class(canonical: str) -> str:
    """``X``, ``Y``, ``MT`` or ``A`` (diploid: autosomes, XY and any other contig)."""
    return canonical if canonical in SEX_CHROMS else "A"
