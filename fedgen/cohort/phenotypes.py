"""Phenotypes and covariates at a site: coding, missingness, and the regression design.

Coding follows PLINK's defaults so that every site may keep its own convention:

* a phenotype whose observed values are all 0/1 is binary (0 = control, 1 = case); one whose
  values include 2 and are within {0, 1, 2} is PLINK 1/2-coded (1 = control, 2 = case,
  0 = missing); anything else numeric is quantitative;
* ``NA``, empty, ``.`` and PLINK's ``-9`` are missing, in phenotypes and covariates;
* a covariate column with any non-numeric value is categorical (one indicator per level but
  the first, levels agreed across sites by the aggregator).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fedgen.cohort.samples import MISSING_TOKENS
from fedgen.errors import InputError

PLINK_MISSING = {"-9", "-9.0"}


def _is_missing(v: str) -> bool:
    return v in MISSING_TOKENS or v in PLINK_MISSING


def _numeric(values: Sequence[str]) -> np.ndarray | None:
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if _is_missing(v):
            continue
        try:
            out[i] = float(v)
        except ValueError:
            return None
    return out


def describe_column(values: Sequence[str], *, role: str) -> dict[str, Any]:
    """Kind of a column as this site sees it: binary / quantitative / categorical (+ levels)."""
    num = _numeric(values)
    if num is None:
        if role == "phenotype":
            raise ValueError("phenotype values must be numeric (some samples have non-numeric values)")
        levels = sorted({v for v in values if not _is_missing(v)})
        return {"kind": "categorical", "levels": levels, "n": int(sum(not _is_missing(v) for v in values))}
    obs = num[~np.isnan(num)]
    uniq = set(np.unique(obs).tolist())
    kind = "quantitative"
    if role == "phenotype" and uniq and (uniq <= {0.0, 1.0} or (2.0 in uniq and uniq <= {0.0, 1.0, 2.0})):
        kind = "binary"
    return {"kind": kind, "n": int(len(obs))}


def _isfloat(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def phenotype_values(values: Sequence[str], *, kind: str, name: str, where: str) -> np.ndarray:
    """Phenotype as float64 (binary → 0/1), NaN = missing."""
    num = _numeric(values)
    if num is None:
        raise InputError(f"{where}: phenotype {name!r} has non-numeric values")
    if kind != "binary":
        return num
    obs = num[~np.isnan(num)]
    uniq = set(np.unique(obs).tolist())
    if uniq <= {0.0, 1.0}:
        return num
    if uniq <= {0.0, 1.0, 2.0}:  # PLINK 1/2 coding, 0 = missing
        out = num - 1.0
        out[num == 0] = np.nan
        return out
    raise InputError(
        f"{where}: phenotype {name!r} is analysed as binary but has distinct values other than 0/1/2"
    )


def build_design(
    table_cols: dict[str, list[str]],
    rows: np.ndarray,
    *,
    phenotype: str,
    kind: str,
    covariates: list[dict[str, Any]],
    site_columns: Sequence[float] = (),
    where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phenotype vector, covariate matrix and the mask of samples used (all non-missing).

    ``covariates`` is the aggregator's agreed list: ``{"name", "kind": "numeric", "mean", "sd"}``
    (standardised as ``--covar-variance-standardize`` with the pooled mean and SD) or
    ``{"name", "kind": "categorical", "levels": [...]}`` (indicators for levels[1:]).
    ``site_columns`` are this site's values of the site indicator covariates.
    """
    def col(name: str) -> list[str]:
        if name not in table_cols:
            raise InputError(f"{where}: no column {name!r} in samples table")
        vals = table_cols[name]
        return [vals[i] for i in rows.tolist()]

    y = phenotype_values(col(phenotype), kind=kind, name=phenotype, where=where)
    keep = ~np.isnan(y)
    blocks: list[np.ndarray] = []
    for cv in covariates:
        vals = col(cv["name"])
        if cv["kind"] == "categorical":
            levels = cv["levels"]
            miss = np.array([_is_missing(v) for v in vals])
            unknown = {v for v in vals if not _is_missing(v)} - set(levels)
            if unknown:
                raise InputError(f"{where}: covariate {cv['name']!r} has levels unknown to the study")
            ind = np.zeros((len(vals), max(0, len(levels) - 1)))
            for j, lev in enumerate(levels[1:]):
                ind[:, j] = [v == lev for v in vals]
            ind[miss] = np.nan
            blocks.append(ind)
        else:
            num = _numeric(vals)
            if num is None:
                raise InputError(f"{where}: covariate {cv['name']!r} is numeric at other sites but not here")
            sd = float(cv.get("sd") or 1.0)
            blocks.append(((num - float(cv.get("mean") or 0.0)) / sd)[:, None])
    if site_columns:
        blocks.append(np.tile(np.asarray(site_columns, dtype=float), (len(y), 1)))
    C = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(y), 0))
    keep &= ~np.isnan(C).any(axis=1)
    return y, C, keep
