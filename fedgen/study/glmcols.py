"""PLINK 2's ``--glm cols=`` column sets for fedgen's regression tables.

``study.glm.cols`` takes PLINK 2's syntax: a comma-separated list of column sets, or changes to
the default prefixed with ``+``/``-`` (``+a1freq,+nobs``). The default is PLINK 2's,
``chrom,pos,ref,alt,firth,test,nobs,orbeta,se,ci,tz,p,err`` (``ci`` prints only with
``study.glm.ci``, like ``--ci``). ID and A1 are always present, in PLINK's places.

Column sets: chrom, pos, ref, alt1, alt, ax, a1count, totallele, a1countcc, totallelecc,
a1freq, a1freqcc, firth, test, nobs, beta, orbeta, se, ci, tz, p, err, and ``log10p``:
PLINK 2's ``log10`` modifier (the P column becomes ``LOG10_P`` = −log10 P, printed from log
space so it never underflows). ``gcountcc`` and ``machr2`` are refused with the reason.

Counts and frequencies are over the samples in the regression, as PLINK 2 reports them: for
a linear model they come from the regression's own sums (X'X); for a logistic model from one
extra request of A1/A2 counts in cases and controls over the same sample set (samples with
the phenotype and every covariate), made only when a count column is asked for. Under
``missing: impute`` an imputed call adds its imputed dosage to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedgen.errors import ConfigError
from fedgen.stats.plinkfmt import format_g6, format_g6_from_ln

DEFAULT = ("chrom", "pos", "ref", "alt", "firth", "test", "nobs", "orbeta", "se", "ci", "tz", "p", "err")
ORDER = ("chrom", "pos", "ref", "alt1", "alt", "ax", "a1count", "totallele", "a1countcc", "totallelecc",
         "a1freq", "a1freqcc", "firth", "test", "nobs", "beta", "orbeta", "se", "ci", "tz", "p", "log10p", "err")
REFUSED = {
    "gcountcc": "genotype counts by case status per variant are not released by sites (small cells)",
    "machr2": "MaCH R² needs dosages (hard calls only)",
}
COUNT_SETS = frozenset({"a1count", "totallele", "a1countcc", "totallelecc", "a1freq", "a1freqcc"})


def parse_cols(spec: Any) -> tuple[str, ...]:
    """``study.glm.cols`` → the column sets, in PLINK's order."""
    if spec is None or spec == "":
        return DEFAULT
    items = [s.strip() for s in (spec if isinstance(spec, (list, tuple)) else str(spec).split(",")) if str(s).strip()]
    if not items:
        return DEFAULT
    signed = [s[0] in "+-" for s in items]
    if any(signed) and not all(signed):
        raise ConfigError(f"study.glm.cols: either list column sets or change the default with +/-, not both: {spec!r}")
    chosen = set(DEFAULT) if all(signed) else set()
    for s in items:
        name = s[1:] if s[0] in "+-" else s
        if name in REFUSED:
            raise ConfigError(f"study.glm.cols: {name} is not available: {REFUSED[name]}")
        if name not in ORDER:
            raise ConfigError(f"study.glm.cols: unknown column set {name!r} (known: {', '.join(ORDER)})")
        (chosen.discard if s[0] == "-" else chosen.add)(name)
    return tuple(c for c in ORDER if c in chosen)


def needs_counts(cols: tuple[str, ...]) -> bool:
    return bool(COUNT_SETS & set(cols))


def _g6(values: Any, bad: np.ndarray) -> list[str]:
    return ["NA" if b else s for s, b in zip(format_g6(values), bad.tolist())]


def _counts_text(values: np.ndarray) -> list[Any]:
    v = np.asarray(values, dtype=np.float64)
    if np.all(np.isfinite(v) & (v == np.rint(v))):
        return v.astype(np.int64).tolist()
    return format_g6(v)


def table(
    cols: tuple[str, ...],
    *,
    variant: list[list[Any]],
    logistic: bool,
    firth: np.ndarray | None,
    obs_ct: np.ndarray,
    beta: np.ndarray,
    beta_ln: bool,
    se: np.ndarray,
    tz: np.ndarray,
    p_ln: np.ndarray,
    errcode: list[str],
    show: np.ndarray,
    counts: dict[str, np.ndarray] | None,
    ci: float | None,
) -> tuple[list[str], list[list[Any]]]:
    """Header and columns of a ``.glm.linear`` / ``.glm.logistic.hybrid`` table.

    ``variant`` = [CHROM, POS, ID, REF, ALT, A1]; ``beta`` is β (or, with ``beta_ln``, already
    ln OR = β); ``counts`` holds ``a1``, ``obs`` and, for case/control, ``a1_case``,
    ``obs_case``, ``a1_ctrl``, ``obs_ctrl`` (allele counts over the regression's samples).
    """
    chrom, pos, ids, ref, alt, a1 = variant
    hide = ~show
    head: list[str] = []
    body: list[list[Any]] = []

    def add(name: str, values: Any) -> None:
        head.append(name)
        body.append(list(values))

    c = set(cols)
    # the variant columns in PLINK's order; ID and A1 are always present (key None)
    for key, name, values in (("chrom", "CHROM", chrom), ("pos", "POS", pos), (None, "ID", ids), ("ref", "REF", ref),
                              ("alt1", "ALT1", alt), ("alt", "ALT", alt), (None, "A1", a1)):
        if key is None or key in c:
            add(name, values)
    if "ax" in c:
        add("AX", [r if x == a else a for r, a, x in zip(ref, alt, a1)])
    if c & COUNT_SETS:
        if counts is None:  # pragma: no cover - the caller asks for counts whenever a count set is chosen
            raise ConfigError("glm count columns need the regression's allele counts")
        a1c, obs = np.asarray(counts["a1"], float), np.asarray(counts["obs"], float)
        if "a1count" in c:
            add("A1_CT", _counts_text(a1c))
        if "totallele" in c:
            add("ALLELE_CT", _counts_text(obs))
        cc = logistic and "a1_case" in counts
        if "a1countcc" in c and cc:
            add("A1_CASE_CT", _counts_text(counts["a1_case"]))
            add("A1_CTRL_CT", _counts_text(counts["a1_ctrl"]))
        if "totallelecc" in c and cc:
            add("CASE_ALLELE_CT", _counts_text(counts["obs_case"]))
            add("CTRL_ALLELE_CT", _counts_text(counts["obs_ctrl"]))
        with np.errstate(invalid="ignore", divide="ignore"):
            if "a1freq" in c:
                add("A1_FREQ", _g6(a1c / obs, obs == 0))
            if "a1freqcc" in c and cc:
                oc, ot = np.asarray(counts["obs_case"], float), np.asarray(counts["obs_ctrl"], float)
                add("A1_CASE_FREQ", _g6(np.asarray(counts["a1_case"], float) / oc, oc == 0))
                add("A1_CTRL_FREQ", _g6(np.asarray(counts["a1_ctrl"], float) / ot, ot == 0))
    if "firth" in c and logistic and firth is not None:
        add("FIRTH?", ["Y" if f else "N" for f in np.asarray(firth).tolist()])
    if "test" in c:
        add("TEST", ["ADD"] * len(ids))
    if "nobs" in c:
        add("OBS_CT", np.asarray(obs_ct, dtype=np.int64).tolist())
    b = np.asarray(beta, dtype=np.float64)
    as_or = logistic and "orbeta" in c and "beta" not in c
    if "beta" in c or "orbeta" in c:
        if as_or:  # OR = exp(β), printed from log space like PLINK
            add("OR", ["NA" if h else s for s, h in zip(format_g6_from_ln(b), hide.tolist())])
        else:
            add("BETA", _g6(b, hide))
    if "se" in c:
        add("LOG(OR)_SE" if as_or else "SE", _g6(se, hide))
    if "ci" in c and ci is not None:
        from scipy import stats

        z = float(stats.norm.ppf(0.5 + ci / 2))
        lo, hi = b - z * np.asarray(se, float), b + z * np.asarray(se, float)
        pct = f"{ci * 100:g}"
        if as_or:
            add(f"L{pct}", ["NA" if h else s for s, h in zip(format_g6_from_ln(lo), hide.tolist())])
            add(f"U{pct}", ["NA" if h else s for s, h in zip(format_g6_from_ln(hi), hide.tolist())])
        else:
            add(f"L{pct}", _g6(lo, hide))
            add(f"U{pct}", _g6(hi, hide))
    if "tz" in c:
        add("Z_STAT" if logistic else "T_STAT", _g6(tz, hide))
    if "p" in c:
        if "log10p" in c:
            add("LOG10_P", _g6(-np.asarray(p_ln, float) / np.log(10.0), hide))
        else:
            add("P", ["NA" if h else s for s, h in zip(format_g6_from_ln(p_ln), hide.tolist())])
    if "err" in c:
        add("ERRCODE", errcode)
    head[0] = "#" + head[0]
    return head, body
