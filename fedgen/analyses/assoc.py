"""Site-side partials for association testing: sums over the site's samples, per variant.

* ``covar_moments``: Σx, Σx², n of numeric covariates (for pooled standardisation);
* ``assoc_counts``: A1/A2 allele counts in cases and controls (allelic chi-square);
* ``glm_linear``: XᵀX, Xᵀy, yᵀy, n per variant (linear regression sufficient statistics);
* ``glm_logistic``: Hessian, gradient, n and log-likelihood at the aggregator's β per variant;
* ``glm_firth``: information, log-likelihood, score and the third moments Firth's correction needs.

The design (phenotype, covariates) is rebuilt from the request parameters each time; samples
with a missing phenotype or covariate are left out. A missing call is, by default
(``missing: "impute"``), imputed with the site's own mean A1 dosage of that variant, so every
row of a phenotype rests on one sample set; ``missing: "drop"`` leaves the sample out of that
variant's sums as PLINK 2 does, and only sites whose policy sets
``allow_per_variant_sample_sets`` answer it. No array has a samples axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedgen.analyses import register
from fedgen.analyses.spec import AnalysisRequest, Rules, Spec, arr, cell_rule, meta_count
from fedgen.analyses.qc import VARIANT_INPUTS, _block_args, dosage_step, genotype_step
from fedgen.analyses.rowcache import row_cache
from fedgen.analyses.threads import blas_single_threaded, chunk_slices, site_pool
from fedgen.cohort.cohort import Cohort
from fedgen.cohort.phenotypes import _numeric, build_design
from fedgen.errors import FedgenError
from fedgen.stats import glm


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x):
        raise ValueError(f"{what} must be a finite number")
    return float(x)


def design_predictors(params: Mapping[str, Any], site: str) -> int:
    """Validate the design parameters (types and sizes only) and return the model's predictors.

    p = 2 (intercept, genotype) + one per numeric covariate + levels − 1 per categorical one
    + this site's site-indicator values + PCs. Raises ValueError (a refusal) on malformed input.
    """
    if not isinstance(params.get("phenotype"), str) or not params["phenotype"]:
        raise ValueError("'phenotype' must be a column name")
    if params.get("kind") not in ("binary", "quantitative"):
        raise ValueError("'kind' must be 'binary' or 'quantitative'")
    covs = params.get("covariates") or []
    if not isinstance(covs, list):
        raise ValueError("'covariates' must be a list")
    if any(ch in params["phenotype"] for ch in "=:"):
        raise ValueError("column names may not contain '=' or ':'")
    p = 2
    for cv in covs:
        if not isinstance(cv, Mapping) or not isinstance(cv.get("name"), str):
            raise ValueError("each covariate must be a mapping with a 'name'")
        if any(ch in cv["name"] for ch in "=:"):
            raise ValueError("column names may not contain '=' or ':'")
        if cv.get("kind") == "categorical":
            levels = cv.get("levels")
            if not isinstance(levels, list) or not levels or not all(isinstance(v, str) for v in levels):
                raise ValueError(f"covariate {cv['name']!r}: 'levels' must be a non-empty list of names")
            if len(levels) > MAX_LEVELS:
                raise ValueError(f"covariate {cv['name']!r}: at most {MAX_LEVELS} levels")
            p += len(levels) - 1
        elif cv.get("kind") == "numeric":
            _finite(cv.get("mean", 0.0), f"covariate {cv['name']!r}: 'mean'")
            sd = _finite(cv.get("sd", 1.0), f"covariate {cv['name']!r}: 'sd'")
            if sd <= 0:
                raise ValueError(f"covariate {cv['name']!r}: 'sd' must be positive")
            p += 1
        else:
            raise ValueError(f"covariate {cv['name']!r}: 'kind' must be 'numeric' or 'categorical'")
    sc = params.get("site_columns") or {}
    if not isinstance(sc, Mapping):
        raise ValueError("'site_columns' must map site names to lists of numbers")
    mine = sc.get(site) or []
    if not isinstance(mine, list) or len(mine) > 64:
        raise ValueError("'site_columns' of a site must be a list of at most 64 numbers")
    for x in mine:
        _finite(x, "'site_columns' values")
    p += len(mine)
    pcs = params.get("pcs")
    if pcs:
        if not isinstance(pcs, Mapping) or not isinstance(pcs.get("study_id"), str):
            raise ValueError("'pcs' must be a mapping with 'study_id', 'n', 'mean', 'sd'")
        n = pcs.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
            raise ValueError("'pcs.n' must be a whole number in [1, 64]")
        for key in ("mean", "sd"):
            v = pcs.get(key)
            if not isinstance(v, list) or len(v) != n:
                raise ValueError(f"'pcs.{key}' must list {n} numbers")
            for x in v:
                _finite(x, f"'pcs.{key}'")
        if any(float(x) <= 0 for x in pcs["sd"]):
            raise ValueError("'pcs.sd' must be positive")
        p += n
    sm = params.get("sex_model")
    if sm not in SEX_MODELS:
        raise ValueError("'sex_model' must be one of X, X_nosex, Y, MT (or absent)")
    p += sm == "X"  # chrX: sex joins the covariates
    if p > MAX_PREDICTORS:
        raise ValueError(f"the model would have {p} predictors (at most {MAX_PREDICTORS})")
    if params.get("missing", "impute") not in MISSING_MODES:
        raise ValueError("'missing' must be 'impute' or 'drop'")
    if not isinstance(params.get("dosage", False), bool):
        raise ValueError("'dosage' must be true or false")
    req = params.get("require") or []
    if not isinstance(req, list) or len(req) > 256 or not all(isinstance(c, str) and c for c in req):
        raise ValueError("'require' must be a list of at most 256 column names")
    return p


MISSING_MODES = ("impute", "drop")

#: ``sex_model`` of a design (PLINK 2's default ``--xchr-model 2``): ``X`` keeps samples of known sex,
#: codes male calls 0/2 as stored and adds a female indicator column; ``X_nosex`` (the study already
#: has sex as a covariate; PLINK's ``--glm no-x-sex``) codes calls the same way without the extra
#: column; ``Y`` keeps males and codes calls haploid (0/1); ``MT`` codes everyone's calls haploid.
SEX_MODELS = (None, "X", "X_nosex", "Y", "MT")


def _sex_design(cohort: Any, params: Mapping[str, Any], C: np.ndarray, keep: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The design's rows and columns for the contig class of ``params['sex_model']``."""
    from fedgen.cohort.sex import FEMALE, MALE, UNKNOWN, cohort_sex

    sm = params.get("sex_model")
    if sm is None:
        return C, keep
    sex = cohort_sex(cohort)
    if sm == "X":
        keep = keep & (sex != UNKNOWN)
        C = np.hstack([C, (sex == FEMALE).astype(np.float64)[:, None]])
    elif sm == "Y":
        keep = keep & (sex == MALE)
    return C, keep


def check_sex_model_variants(cohort: Any, req: AnalysisRequest) -> None:
    """Every requested variant lies on the contig class the request's ``sex_model`` is for
    (chrX/chrY/MT variants only with their model, other variants only without one)."""
    from fedgen.cohort.sex import contig_class

    idx = np.asarray(req.arrays.get("idx", []), dtype=np.int64)
    if not len(idx) or idx.min() < 0 or idx.max() >= len(cohort.chrom):
        return  # the variant checks report it
    sm = req.params.get("sex_model")
    want = "A" if sm is None else sm.split("_")[0]
    classes = {contig_class(c) for c in np.unique(cohort.chrom[idx]).tolist()}
    if classes != {want}:
        raise FedgenError(f"{req.analysis}: the request's sex_model ({sm or 'none'}) does not match the contigs of "
                          "the variants it names")


def missing_mode(req: AnalysisRequest) -> str:
    """The request's handling of missing calls (see the module docstring)."""
    return str(req.params.get("missing", "impute"))


def check_missing_mode(cohort: Any, req: AnalysisRequest) -> None:
    """``missing: drop`` (per-variant sample sets) only where the site's policy allows it.

    Route closed: a per-variant sample set that varies with missing calls turns V rows into V
    equations in the samples' phenotypes and covariates (a tracker).
    """
    if missing_mode(req) == "drop" and not req.rules.allow_per_variant_sample_sets:
        raise FedgenError(
            f"{req.analysis}: missing: drop gives every variant its own sample set, which this site's policy does "
            "not allow (allow_per_variant_sample_sets); run the study with study.glm.missing: impute"
        )


#: how far the study's standardisation of a numeric covariate may be from the site's own
STANDARDISATION_FACTOR = 20.0


def check_design(cohort: Any, req: AnalysisRequest) -> None:
    """Design requests: the missing-call mode the policy allows, and plausible standardisations.

    A numeric covariate is standardised with the study's pooled mean and SD. Both must be
    plausible given the site's own values (SD within a factor of 20 of the site's, mean within
    20 SDs): an aggregator-chosen SD of 1e-3 would blow one covariate up until a β singles out
    the people at one value of it.
    """
    check_missing_mode(cohort, req)
    if req.params.get("dosage") is True:
        cohort.require_dosages()
    for cv in req.params.get("covariates") or []:
        if not isinstance(cv, Mapping) or cv.get("kind") != "numeric":
            continue
        x = _site_numeric(cohort, str(cv["name"]))
        if x is None:
            continue  # the design builder reports it
        x = x[~np.isnan(x)]
        if len(x) < 2:
            continue
        m, s = float(x.mean()), float(x.std(ddof=1))
        mean, sd = float(cv.get("mean", 0.0)), float(cv.get("sd", 1.0))
        f = STANDARDISATION_FACTOR
        scale = max(s, sd)
        if s > 0 and not (s / f <= sd <= s * f and abs(mean - m) <= f * scale):
            raise FedgenError(
                f"{req.analysis}: covariate {cv['name']!r}: the study's standardisation is not plausible for this "
                "site's values"
            )


def _glm_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    p = design_predictors(params, str(node_config.get("site", "")))
    return {"p": p, "t": p * (p + 1) // 2, "t3": p * (p + 1) * (p + 2) // 6}


#: most predictors a Firth round may have: its third moments are p(p+1)(p+2)/6 numbers per variant
#: (11,480 at 40), and the site's work for them grows with p³·N (red team 4: 126 predictors, made of
#: one covariate repeated, took 5.8 GB at 1,000 samples and would exhaust a node at about 5,000)
MAX_FIRTH_PREDICTORS = 40


def _firth_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    dims = _glm_dims(params, node_config)
    if dims["p"] > MAX_FIRTH_PREDICTORS:
        raise ValueError(f"a Firth round may have at most {MAX_FIRTH_PREDICTORS} predictors (this design has "
                         f"{dims['p']})")
    return dims


def _covar_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    return {"c": design_predictors(params, str(node_config.get("site", ""))) - 2}


def _check_indicator_cells(params: Mapping[str, Any], C: np.ndarray, keep: np.ndarray, min_count: int) -> None:
    """Each categorical level must hold at least min_count of the samples used, and so must its complement."""
    col = 0
    n = int(keep.sum())
    for cv in params.get("covariates") or []:
        if cv.get("kind") != "categorical":
            col += 1
            continue
        k = max(0, len(cv["levels"]) - 1)
        counts = np.nansum(C[keep, col : col + k], axis=0) if k else np.zeros(0)
        base = n - float(counts.sum())
        cells = [*counts.tolist(), base]
        if any(0 < c < min_count or 0 < n - c < min_count for c in cells):
            raise FedgenError(
                f"covariate {cv['name']!r}: a category would hold fewer than the site's min_count "
                "of the samples analysed (or all but fewer than that); merge or recode its categories"
            )
        col += k


def _design(cohort: Cohort, params: Mapping[str, Any], rules: Rules | None = None, *,
            noised_release: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phenotype, covariates and the samples used (phenotype and every covariate present).

    ``noised_release``: the caller's release is differentially private for any data (the DP
    count and selection releases, DP-SGD updates and DP evaluations). At a DP-only site the
    rare-value and indicator-cell rules are then skipped: they decide on EXACT counts, so
    answering at min_count cases and refusing at min_count − 1 would tell whether one case is in
    the data at ε = ∞ (red team 3); the release's noise covers any phenotype or covariate.
    """
    try:
        design_predictors(params, cohort.site)
    except ValueError as exc:
        raise FedgenError(f"bad design parameters: {exc}") from None
    phenotype = str(params["phenotype"])
    kind = str(params["kind"])
    if rules is not None:
        rules.check_columns([phenotype, *(cv["name"] for cv in params.get("covariates") or []), *(params.get("require") or [])])
    if rules is not None:
        _check_site_levels(cohort, params, rules.min_count)
    site_cols = (params.get("site_columns") or {}).get(cohort.site, [])
    y, C, keep = _parsed_design(cohort, phenotype, kind, list(params.get("covariates") or []), site_cols,
                                [str(n) for n in params.get("require") or []])
    spec = params.get("pcs")
    if spec:  # this site's own PC scores from the study's federated PCA (they never left it)
        from fedgen.cohort.pcs import load_site_pcs

        X = load_site_pcs(cohort, str(spec["study_id"]), int(spec["n"]), state_dir=rules.state_dir if rules else None)
        C = np.hstack([C, (X - np.asarray(spec["mean"], dtype=float)) / np.asarray(spec["sd"], dtype=float)])
    C, keep = _sex_design(cohort, params, C, keep)
    if rules is not None and params.get("sex_model") == "X":
        # the female column sums genotypes over the women: both sexes must clear min_count
        n_f = int(C[keep, -1].sum())
        if 0 < n_f < rules.min_count or 0 < int(keep.sum()) - n_f < rules.min_count:
            raise FedgenError("chrX regression: fewer than the site's min_count women or men among the samples used; "
                              "sex as a covariate would single them out")
    if rules is not None and not (noised_release and rules.dp_only):
        _check_indicator_cells(params, C, keep, rules.min_count)
        _check_rare_values(params, y, C, keep, rules.min_count)
    return y, C, keep


#: parsed designs kept per cohort object (the site worker answers many requests with the same design)
_DESIGN_CACHE_SIZE = 8


def _parsed_design(cohort: Cohort, phenotype: str, kind: str, covariates: list[Any], site_cols: Any,
                   require: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`build_design` plus the ``require`` mask, parsed from the samples table once per
    design and cohort (the cohort object is rebuilt when its files change); copies out."""
    import json

    key = json.dumps([phenotype, kind, covariates, site_cols, require], sort_keys=True, default=str)
    cache = cohort.__dict__.setdefault("_design_cache", {})
    hit = cache.get(key)
    if hit is None:
        y, C, keep = build_design(
            cohort.table.columns,
            cohort.table_rows,
            phenotype=phenotype,
            kind=kind,
            covariates=covariates,
            site_columns=site_cols,
            where=cohort.table.path.name,
        )
        for name in require:  # the study's common sample set: every listed column present
            from fedgen.cohort.phenotypes import _is_missing

            col = cohort.table.require(name)
            keep &= np.array([not _is_missing(col[i]) for i in cohort.table_rows.tolist()], dtype=bool)
        while len(cache) >= _DESIGN_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        hit = cache[key] = (y, C, keep)
    y, C, keep = hit
    return y.copy(), C.copy(), keep.copy()


def _check_rare_values(params: Mapping[str, Any], y: np.ndarray, C: np.ndarray, keep: np.ndarray, min_count: int) -> None:
    """No phenotype or numeric covariate may single out 1..min_count-1 of the samples used, by a
    rare value or by values that dominate the rest (:func:`_dominated`).

    A column equal to its most common value for all but a few people (a 0/1 flag set for one
    person, whatever ``kind`` it is declared as) makes Σ g·x that person's genotypes; a column
    with few distinct values must hold each of them for 0 or at least min_count people. (Route:
    a rare indicator column as phenotype or covariate.)
    """
    n = int(keep.sum())
    cols = [(str(params.get("phenotype")), y[keep])]
    j = 0
    for cv in params.get("covariates") or []:
        if cv.get("kind") == "categorical":
            j += max(0, len(cv["levels"]) - 1)
            continue
        cols.append((str(cv["name"]), C[keep, j]))
        j += 1
    for name, x in cols:
        if n == 0:
            return
        values, counts = np.unique(x, return_counts=True)
        others = n - int(counts.max())
        small_value = len(values) <= MAX_LEVELS and bool(np.any(counts < min_count))
        if 0 < others < min_count or small_value:
            raise FedgenError(f"column {name!r}: some of its values are held by fewer than the site's min_count of the "
                              "samples used; they would single those people out")
        if _dominated(x, min_count):
            raise FedgenError(f"column {name!r}: a few of the samples used hold values so far from the rest that sums "
                              "weighted by the column would single them out; clean or cap its outliers")


def _dominated(x: np.ndarray, min_count: int) -> bool:
    """True when the column's deviations from its median have an effective size
    (Σ|d|)² / Σd² of fewer than ``min_count`` people.

    Route closed: one value far from all the others (an age typed as 1e6) makes Σg·x that
    person's genotype times it, plus less than half a unit (red-team: every genotype of the
    outlier from one regression). A 0/1 flag held by k people has effective size k, so this is
    the rare-flag rule above for columns whose values are all distinct."""
    d = np.asarray(x, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return False
    d = np.abs(d - np.median(d))
    s1, s2 = float(d.sum()), float((d * d).sum())
    return s2 > 0 and s1 * s1 < (int(min_count) - 1e-9) * s2


def _site_column_memo(cohort: Any) -> dict:
    """Per-cohort memo of parsed samples-table columns (the table is fixed for a cohort's lifetime:
    a changed file is a new cohort). Requests re-read the same columns round after round; parsing
    them per request looped over the samples in Python."""
    memo = getattr(cohort, "_column_memo", None)
    if memo is None:
        memo = cohort._column_memo = {}
    return memo


def _site_numeric(cohort: Any, name: str) -> np.ndarray | None:
    """Column ``name`` of the analysed samples as float (NaN missing), or None if not numeric; read-only."""
    memo = _site_column_memo(cohort)
    key = ("numeric", name)
    if key not in memo:
        col = cohort.table.require(name)
        x = _numeric([col[i] for i in cohort.table_rows.tolist()])
        if x is not None:
            x.setflags(write=False)
        memo[key] = x
    return memo[key]


def _site_level_counts(cohort: Any, name: str) -> dict[str, int]:
    """How many analysed samples hold each non-missing value of column ``name``."""
    from fedgen.cohort.phenotypes import _is_missing

    memo = _site_column_memo(cohort)
    key = ("levels", name)
    if key not in memo:
        col = cohort.table.require(name)
        counts: dict[str, int] = {}
        for i in cohort.table_rows.tolist():
            v = col[i]
            if not _is_missing(v):
                counts[v] = counts.get(v, 0) + 1
        memo[key] = counts
    return dict(memo[key])


def _check_site_levels(cohort: Cohort, params: Mapping[str, Any], min_count: int) -> None:
    """A column used as a categorical covariate must have no value held by 1..min_count-1 people here.

    Checked before the study's level list is compared with the site's, so a refusal says nothing
    the site's published levels (site_info) do not: otherwise "levels unknown to the study" is an
    oracle for whether anyone has a given value (route: level-list probing).
    """
    for cv in params.get("covariates") or []:
        if cv.get("kind") != "categorical":
            continue
        if any(c < min_count for c in _site_level_counts(cohort, str(cv["name"])).values()):
            raise FedgenError(f"covariate {cv['name']!r}: a category would hold fewer than the site's min_count of the "
                              "samples (merge or recode its categories)")


def design_attributes(cohort: Cohort, req: AnalysisRequest) -> list[tuple[str, np.ndarray]]:
    """Values a design's rows sum with genotypes, with the samples where they are non-zero.

    Supports come from the raw values, whatever ``kind`` says (a 0/1 column summed as a
    quantitative phenotype is a sum over its 1s, exactly as its cases are for a binary trait; a
    standardised covariate's raw sums follow from it and Σg): the phenotype, each numeric
    covariate, each indicator of a categorical level, and stored PCs.
    """
    params = req.params
    y, C, keep = _design(cohort, params, req.rules)
    n = cohort.n_samples
    def with_complement(name: str, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """A 0/1 column is a sum over its 1s and, through the set's total, over its 0s."""
        seen = x[~np.isnan(x)]
        out = [(name, np.nan_to_num(x) != 0)]
        if len(seen) and np.all((seen == 0) | (seen == 1)):
            out.append((f"{name}~0", x == 0))
        return out

    attrs = with_complement(f"y:{params['phenotype']}", np.asarray(y, dtype=float))
    col = 0
    for cv in params.get("covariates") or []:
        if cv.get("kind") == "categorical":
            ind = C[:, col : col + max(0, len(cv["levels"]) - 1)]
            base = np.all(np.nan_to_num(ind, nan=1.0) == 0, axis=1)  # members of the first level
            attrs.append((f"x:{cv['name']}={cv['levels'][0]}", base))
            for j, lev in enumerate(cv["levels"][1:]):
                attrs.append((f"x:{cv['name']}={lev}", np.nan_to_num(C[:, col + j]) != 0))
            col += max(0, len(cv["levels"]) - 1)
        else:
            raw = _site_numeric(cohort, str(cv["name"]))
            attrs += [(f"x:{cv['name']}", np.ones(n, bool))] if raw is None else with_complement(f"x:{cv['name']}", raw)
            col += 1
    attrs.append(("g", np.ones(n, bool)))  # Σg over the set itself (every design releases it)
    pcs = params.get("pcs")
    if pcs:
        attrs += [(f"pc:{pcs['study_id']}:{k}", np.ones(n, bool)) for k in range(int(pcs["n"]))]
    if params.get("sex_model") == "X":  # the female indicator column, summed with genotypes
        attrs += with_complement("x:sex", C[:, -1])
    return attrs


def design_sample_set(cohort: Cohort, req: AnalysisRequest) -> list[np.ndarray]:
    """The sample set a design-based aggregate rests on (for the site's sample-set register)."""
    return [_design(cohort, req.params, req.rules)[2]]


DESIGN_PARAMS = frozenset({"phenotype", "kind", "covariates", "site_columns", "pcs", "missing", "require", "sex_model",
                           "dosage"})
MAX_PREDICTORS = 128
MAX_LEVELS = 50


@register(
    "covar_moments",
    Spec(
        params=frozenset({"names"}),
        outputs={"moments": arr("f8", "c", 3)},
        param_dims=lambda params, nc: {"c": len(list(params.get("names") or []))},
        limits={"c": 4096},
        meta=frozenset({"n_min"}),
        contributors=meta_count("n_min"),
        sample_sets=lambda cohort, req: [~np.isnan(x) for x in _covariate_values(cohort, req)],
        families=("x",),
        doc="per numeric covariate: sum, sum of squares, count",
    ),
)
def covar_moments(cohort: Any, req: AnalysisRequest):
    """Per numeric covariate: sum, sum of squares and count over samples where it is present."""
    values = _covariate_values(cohort, req)
    out = np.zeros((len(values), 3))
    names = req.params.get("names") or []
    for j, x in enumerate(values):
        x = x[~np.isnan(x)]
        if _dominated(x, req.rules.min_count):  # √Σx² would be the outlier's value, nearly
            raise FedgenError(f"covar_moments: column {names[j]!r}: a few samples hold values so far from the rest "
                              "that its sums would single them out; clean or cap its outliers")
        out[j] = (x.sum(), (x * x).sum(), len(x))
    present = out[:, 2][out[:, 2] > 0]  # a covariate absent at this site reveals nothing
    return {"moments": out}, {"n_min": int(present.min()) if len(present) else cohort.n_samples}


def _covariate_values(cohort: Any, req: AnalysisRequest) -> list[np.ndarray]:
    names = req.params.get("names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) and not any(ch in n for ch in "=:") for n in names):
        raise FedgenError("covar_moments: 'names' must be a list of column names (without '=' or ':')")
    req.rules.check_columns(names)
    out = []
    for name in names:
        x = _site_numeric(cohort, name)
        if x is None:
            raise FedgenError(f"{cohort.table.path}: covariate {name!r} is not numeric at this site")
        out.append(x)
    return out


def _genotypes(cohort: Cohort, arrays: Mapping[str, np.ndarray], keep: np.ndarray, *, impute: bool,
               structures: tuple = (), source: str = "gt"):
    """Per sub-block: (offset, A1 dosages of the kept samples, imputation values or None, cells, atom cells).

    ``cells`` (rows, 2): carriers of A1 (dosage > 0) and carriers of A2 (dosage < 2) among the
    kept samples with a call. ``atom cells``: per cell structure of the request's rules, (rows,
    atoms, 2) the same counts per atom over all the site's samples.
    The imputation value of a variant is the mean A1 dosage of all the site's analysed samples
    with a call, rounded to a whole genotype (0 when none): a fixed function of the site's data,
    the same for every request and never a request parameter (an aggregator-chosen or set-dependent
    value would let requests difference out the imputed people). The cells count the imputed people
    with their imputed genotype.

    ``source``: ``"gt"`` the hard calls; ``"hard"`` the hard calls PLINK 2 derives from the
    site's imputed dosages; ``"dosage"`` the imputed dosages themselves (float, NaN = missing; the
    imputation value is their mean rounded to a whole genotype, and the cells count each person
    at their dosage rounded to the nearest whole genotype).
    """
    idx, flip = _block_args(cohort, arrays)
    if np.asarray(keep).dtype != bool:
        raise TypeError("keep must be a boolean mask over the site's analysed samples")
    onehots = []
    for labels, M in structures:
        oh = np.zeros((len(labels), M.shape[1]), dtype=np.float32)
        inside = labels >= 0
        oh[np.flatnonzero(inside), labels[inside]] = 1.0
        onehots.append(oh)
    offsets = np.cumsum([0] + [oh.shape[1] for oh in onehots])
    all_onehots = np.hstack(onehots) if onehots else None
    step = genotype_step(cohort.n_samples) if source == "gt" else dosage_step(cohort.n_samples)  # 8-byte dosage work arrays: fewer at once
    hard_calls = cohort.block if source == "gt" else cohort.dosage_hardcalls
    # what these steps derive from a row does not depend on β: IRLS rounds read it from the memo
    memo = row_cache(cohort).context(source, impute, keep, structures)
    for s in range(0, len(idx), step):
        if memo is not None:
            hit = memo.get(idx[s : s + step], flip[s : s + step])
            if hit is not None:
                g_out, fill, cells, both = hit
                if g_out is None:  # the rows' work is memoised but not their genotypes: re-read them
                    g_out = hard_calls(idx[s : s + step], flip[s : s + step]).compress(keep, axis=1)
                yield s, g_out, fill, cells, ([] if both is None else
                                              [both[:, o0:o1] for o0, o1 in zip(offsets[:-1], offsets[1:])])
                continue
        real = None
        both = None
        if source in ("gt", "hard"):
            full = hard_calls(idx[s : s + step], flip[s : s + step])
        else:
            from fedgen.cohort.dosage import to_float, to_hardcalls

            u = cohort._dosage_rows(idx[s : s + step])
            real = to_float(u, flip[s : s + step])
            full = to_hardcalls(u, flip[s : s + step], threshold=0.5)  # nearest whole genotype
        g = full.compress(keep, axis=1)  # C order (full[:, keep] is column-major: the kernels ran 1.5x slower)
        fill = None
        gc, fc = g, full
        if real is not None and impute:
            n_called = (~np.isnan(real)).sum(1)
            fill = np.rint(np.where(n_called > 0, np.nansum(real, axis=1) / np.maximum(n_called, 1), 0.0))
            gc = np.where(g >= 0, g, fill[:, None].astype(g.dtype))
            fc = np.where(full >= 0, full, fill[:, None].astype(full.dtype))
        elif impute:  # over all the site's analysed samples: the same for every request (red-team round 5)
            called = full >= 0
            n_called = called.sum(1)
            tot = np.where(called, full, 0).sum(1, dtype=np.int64)
            fill = np.rint(np.where(n_called > 0, tot / np.maximum(n_called, 1), 0.0))
            # a missing call takes the best-guess genotype (the site's mean dosage rounded): a whole
            # genotype, the same in every set, so the people imputed add whole genotypes like everyone
            # else and are counted in the cells as such (a fractional fill adds fill × their values
            # outside every cell, and integer arithmetic pulls those apart; a fill that depends on the
            # request's set lets differencing across sets keep only the imputed people)
            gc = np.where(g >= 0, g, fill[:, None].astype(g.dtype))
            fc = np.where(full >= 0, full, fill[:, None].astype(full.dtype))
        if real is None:  # whole genotypes: one count per value gives every cell (and the row's mode)
            n_val = np.stack([np.count_nonzero(gc == k, axis=1) for k in (0, 1, 2)], axis=1)
            carriers = n_val[:, 1] + n_val[:, 2]
            other = n_val[:, 0] + n_val[:, 1]
        else:
            carriers = np.count_nonzero(gc > 0, axis=1)
            other = np.count_nonzero((gc >= 0) & (gc < 2), axis=1)
        if real is not None:
            # a dosage that rounds away (0.3 → 0, 1.7 → 2) still enters the dosage-weighted sums: a
            # side with no rounded carriers but someone's non-zero dosage of that allele counts as one
            # carrier, a small cell (red-team: a lone 0.3 made an "empty" cell, and Σg·y/Σg was y)
            rk = real.compress(keep, axis=1)
            carriers = np.where((carriers == 0) & np.any(rk > 0, axis=1), 1, carriers)
            other = np.where((other == 0) & np.any(rk < 2, axis=1), 1, other)
        # people whose value differs from the row's most common one: Σ(g − c)·y is known for any c
        # (Σy is), so everyone het but one hom-ALT, or one dosage of 1.3 among people imputed at 1,
        # is that one person's y (red-team: both recovered with every carrier cell large)
        if real is None:
            odd = n_val.sum(1) - n_val.max(1)
        else:
            rk = real.compress(keep, axis=1)
            vals_k = rk if fill is None else np.where(np.isnan(rk), fill[:, None], rk)
            odd = np.maximum((~np.isnan(vals_k)).sum(1) - _mode(vals_k)[1], 0)
        atoms = []
        if onehots:  # every structure's atoms in one product (0/1 float32 sums are exact below 2^24)
            a1 = (fc > 0).astype(np.float32) @ all_onehots
            a2 = ((fc >= 0) & (fc < 2)).astype(np.float32) @ all_onehots
            if real is not None:  # the same per atom
                s1 = ((real > 0) & (fc == 0)).astype(np.float32) @ all_onehots
                s2 = ((real < 2) & (fc == 2)).astype(np.float32) @ all_onehots
                a1 = np.where((a1 == 0) & (s1 > 0), np.float32(1), a1)
                a2 = np.where((a2 == 0) & (s2 > 0), np.float32(1), a2)
            if real is None:  # the same per atom, against the most common value of all the site's samples
                vals_f = fc
                c_row = _whole_mode(fc)[0]
                a3 = ((fc >= 0) & (fc != c_row[:, None])).astype(np.float32) @ all_onehots
            else:
                vals_f = real if fill is None else np.where(np.isnan(real), fill[:, None], real)
                c_row = _mode(vals_f)[0]
                a3 = (~np.isnan(vals_f) & (vals_f != c_row[:, None])).astype(np.float32) @ all_onehots
            both = np.rint(np.stack([a1, a2, a3], axis=2)).astype(np.int64)
            atoms = [both[:, o0:o1] for o0, o1 in zip(offsets[:-1], offsets[1:])]
        g_out = g if real is None else real.compress(keep, axis=1)
        cells = np.stack([carriers, other, odd], axis=1)
        if memo is not None:
            memo.put(idx[s : s + step], flip[s : s + step], g_out, fill, cells, both)
        yield s, g_out, fill, cells, atoms


def _whole_mode(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of whole genotypes (-1 = absent): the most common of 0, 1, 2 and how many hold it."""
    n = np.stack([np.count_nonzero(g == k, axis=1) for k in (0, 1, 2)], axis=1)
    return n.argmax(axis=1).astype(g.dtype), n.max(axis=1)


def _mode(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of real values (NaN = absent): the most common value and how many hold it."""
    rows, n = v.shape
    if n == 0:
        return np.zeros(rows), np.zeros(rows, dtype=np.int64)
    srt = np.sort(v, axis=1)  # NaN last
    new = np.ones(srt.shape, dtype=bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    pos = np.arange(n)
    run = pos - np.maximum.accumulate(np.where(new, pos, 0), axis=1) + 1
    run[np.isnan(srt)] = 0
    best = run.argmax(axis=1)
    r = np.arange(rows)
    return srt[r, best], run[r, best]


ROW_OUTPUTS = {"withheld": arr("u1", "v", optional=True)}


@register(
    "assoc_counts",
    Spec(
        params=DESIGN_PARAMS,
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8|f8", "v", 4), **ROW_OUTPUTS},
        meta=frozenset({"n_cases", "n_controls", "suppressed"}),
        contributors=meta_count("n_cases", "n_controls"),
        suppress=cell_rule(),
        sample_sets=lambda cohort, req: design_sample_set(cohort, _no_covariates(req)),
        attributes=lambda cohort, req: design_attributes(cohort, _no_covariates(req)),
        families=("g", "x", "gx"),
        validate=check_design,
        doc="per variant: A1 and A2 allele counts in cases and in controls",
    ),
)
def assoc_counts(cohort: Any, req: AnalysisRequest):
    """(V, 4): A1 alleles in cases, A2 in cases, A1 in controls, A2 in controls (dosage = A1).

    With ``missing: impute`` a missing call adds its imputed dosage (counts are then float).
    """
    req = _no_covariates(req)
    check_sex_model_variants(cohort, req)
    y, _, keep = _design(cohort, req.params, req.rules)
    case = y[keep] == 1
    idx = np.asarray(req.arrays.get("idx", []))
    impute = missing_mode(req) == "impute"
    out = np.zeros((len(idx), 4), dtype=np.float64 if impute else np.int64)
    cells = np.zeros((len(idx), 3), dtype=np.int64)  # carriers of A1, of A2, people unlike the row's most common genotype
    atom_cells = [np.zeros((len(idx), M.shape[1], 3), dtype=np.int64) for _, M in req.rules.cell_structures]
    source = "hard" if req.params.get("dosage") is True else "gt"  # the allelic test counts hard calls
    for s, g, fill, c, atoms in _genotypes(cohort, req.arrays, keep, impute=impute, structures=req.rules.cell_structures,
                                           source=source):
        cells[s : s + len(g)] = c
        for k, a in enumerate(atoms):
            atom_cells[k][s : s + len(g)] = a
        out[s : s + len(g)] = _allele_counts(g, case, fill)
    extra = {f"_atom_cells{k}": a for k, a in enumerate(atom_cells)}
    return {"counts": out, "_cells": cells, **extra}, {"n_cases": int(case.sum()), "n_controls": int((~case).sum())}


def _no_covariates(req: AnalysisRequest) -> AnalysisRequest:
    from dataclasses import replace

    return replace(req, params={**req.params, "covariates": [], "site_columns": {}, "pcs": None})


def _allele_counts(g: np.ndarray, case: np.ndarray, fill: np.ndarray | None, *, missing_as_zero: bool = False) -> np.ndarray:
    if fill is not None:
        d = np.where(g >= 0, g, fill[:, None])
        a, c = d[:, case].sum(1), d[:, ~case].sum(1)
        return np.stack([a, 2.0 * case.sum() - a, c, 2.0 * (~case).sum() - c], axis=1)
    ok = np.ones(g.shape, bool) if missing_as_zero else g >= 0
    gc = np.where(g >= 0, g, 0).astype(np.int64)
    a = gc[:, case].sum(1)
    b = 2 * ok[:, case].sum(1) - a
    c = gc[:, ~case].sum(1)
    d = 2 * ok[:, ~case].sum(1) - c
    return np.stack([a, b, c, d], axis=1)


def case_control_allele_counts(
    cohort: Cohort, arrays: Mapping[str, np.ndarray], case: np.ndarray, keep: np.ndarray, *, missing_as_zero: bool = False
) -> np.ndarray:
    """(V, 4) int64: A1 and A2 alleles in cases, then in controls (dosage = A1).

    ``case`` flags the samples in ``keep``. A missing call adds nothing, or with
    ``missing_as_zero`` two A2 alleles (every sample then adds exactly two alleles per variant).
    """
    idx = np.asarray(arrays.get("idx", []))
    out = np.zeros((len(idx), 4), dtype=np.int64)
    for s, g, _, _, _ in _genotypes(cohort, arrays, keep, impute=False):
        out[s : s + len(g)] = _allele_counts(g, case, None, missing_as_zero=missing_as_zero)
    return out


IRLS_OPT_IN = ("sums at aggregator-chosen coefficients are weighted moments of the site's data: many smooth weightings "
               "reconstruct people with a unique covariate value exactly (docs/THREAT_MODEL.md)")

GLM_SPEC = dict(
    params=DESIGN_PARAMS,
    param_dims=None,
    meta=frozenset({"n", "suppressed"}),
    contributors=meta_count("n"),
    sample_sets=design_sample_set,
    attributes=design_attributes,
    families=("g", "x", "gx"),
    validate=check_design,
)


def _glm_parts(cohort: Any, req: AnalysisRequest, fn, *per_row: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run a site GLM kernel over the request's variants in sub-blocks and stack the parts."""
    check_sex_model_variants(cohort, req)
    y, C, keep = _design(cohort, req.params, req.rules)
    impute = missing_mode(req) == "impute"
    haploid = req.params.get("sex_model") in ("Y", "MT")
    rows = {k: _per_row(req.arrays, k) for k in per_row}
    parts, cells = [], []
    atom_cells: list[list[np.ndarray]] = [[] for _ in req.rules.cell_structures]
    source = "dosage" if req.params.get("dosage") is True else "gt"
    design = glm.SiteDesign(y[keep], C[keep])  # checked once; its products are shared by every block
    y_k, C_k = design.y, design.C
    pool = site_pool(cohort)
    with blas_single_threaded(pool is not None):
        for s, g, fill, c, atoms in _genotypes(cohort, req.arrays, keep, impute=impute,
                                               structures=req.rules.cell_structures, source=source):
            if haploid:  # chrY/MT calls are one allele: PLINK 2 codes them 0/1 (a het call 0.5)
                g = np.where(g >= 0, 0.5 * g, -1.0)
                fill = None if fill is None else 0.5 * fill
            extra = [None if rows[k] is None else rows[k][s : s + len(g)] for k in per_row]
            if pool is None:
                parts.append(fn(g, y_k, C_k, *extra, fill=fill, design=design))
            else:  # the site's cores share the block: numpy and BLAS release the GIL
                chunks = chunk_slices(len(g), glm.block_rows(len(y_k)))
                parts.extend(pool.map(lambda sl: fn(g[sl], y_k, C_k, *[None if e is None else e[sl] for e in extra],
                                                    fill=None if fill is None else fill[sl], design=design), chunks))
            cells.append(c)
            for k, a in enumerate(atoms):
                atom_cells[k].append(a)
    out = _stack(parts)
    if cells:
        out["_cells"] = np.concatenate(cells)
        for k, a in enumerate(atom_cells):
            out[f"_atom_cells{k}"] = np.concatenate(a)
    return out, {"n": int(keep.sum())}


@register(
    "glm_linear",
    Spec(
        **{**GLM_SPEC, "param_dims": _glm_dims},
        inputs=VARIANT_INPUTS,
        outputs={"XtX_triu": arr("f8", "v", "t"), "Xty": arr("f8", "v", "p"), "yty": arr("f8", "v"), "n": arr("i8", "v"), **ROW_OUTPUTS},
        suppress=cell_rule(),
        doc="per variant: XᵀX (upper triangle), Xᵀy, yᵀy, n of the linear model",
    ),
)
def glm_linear(cohort: Any, req: AnalysisRequest):
    return _glm_parts(cohort, req, glm.site_linear_suffstats)


@register(
    "glm_logistic",
    Spec(
        **{**GLM_SPEC, "param_dims": _glm_dims},
        inputs={**VARIANT_INPUTS, "beta": arr("*", "v", "p")},
        outputs={"H_triu": arr("f8", "v", "t"), "grad": arr("f8", "v", "p"), "n": arr("i8", "v"), "loglik": arr("f8", "v", optional=True),
                 **ROW_OUTPUTS},
        suppress=cell_rule(kish=True),
        opt_in_reason=IRLS_OPT_IN,
        doc="per variant at the aggregator's β: Hessian (upper triangle), gradient, n",
    ),
)
def glm_logistic(cohort: Any, req: AnalysisRequest):
    _beta(req.arrays)

    def kernel(g, y, C, beta, *, fill, design):
        return glm.site_logistic_partials(g, y, C, beta, with_loglik=False, fill=fill, design=design)

    return _glm_parts(cohort, req, kernel, "beta")


@register(
    "glm_firth",
    Spec(
        **{**GLM_SPEC, "param_dims": _firth_dims},
        inputs={**VARIANT_INPUTS, "beta": arr("*", "v", "p")},
        outputs={"I_triu": arr("f8", "v", "t"), "loglik": arr("f8", "v"), "n": arr("i8", "v"), "U": arr("f8", "v", "p"),
                 "T": arr("f8", "v", "t3"), **ROW_OUTPUTS},
        suppress=cell_rule(kish=True),
        opt_in_reason=IRLS_OPT_IN,
        doc="per variant at the aggregator's β: Fisher information (upper triangle), log-likelihood, n, score "
            "and the third moments Σ v(½−p)x_a x_b x_c of Firth's correction",
    ),
)
def glm_firth(cohort: Any, req: AnalysisRequest):
    _beta(req.arrays)
    return _glm_parts(cohort, req, glm.site_firth_partials, "beta")


def _per_row(arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray | None:
    if key not in arrays:
        return None
    a = np.asarray(arrays[key], dtype=np.float64)
    if not np.all(np.isfinite(a) | np.isnan(a)):
        raise FedgenError(f"{key!r} has infinite values")
    return a


def _beta(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if "beta" not in arrays:
        raise FedgenError("request has no coefficient array 'beta'")
    beta = np.asarray(arrays["beta"], dtype=np.float64)
    if beta.ndim != 2 or beta.shape[0] != len(np.asarray(arrays.get("idx", []))):
        raise FedgenError("'beta' must have one row per requested variant")
    return beta


SYMMETRIC = ("XtX", "H", "I")


def pack_symmetric(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Send only the upper triangle of per-variant symmetric matrices (``<name>_triu``)."""
    out = dict(arrays)
    for k in SYMMETRIC:
        if k in out and out[k].ndim == 3:
            iu = np.triu_indices(out[k].shape[1])
            out[f"{k}_triu"] = np.ascontiguousarray(out.pop(k)[:, iu[0], iu[1]])
    return out


def unpack_symmetric(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_symmetric` (at the aggregator, after summing over sites)."""
    out = dict(arrays)
    for k in SYMMETRIC:
        t = out.pop(f"{k}_triu", None)
        if t is None:
            continue
        m = t.shape[1]
        p = int((np.sqrt(8 * m + 1) - 1) / 2)
        iu = np.triu_indices(p)
        full = np.empty((t.shape[0], p, p))
        full[:, iu[0], iu[1]] = t
        full[:, iu[1], iu[0]] = t
        out[k] = full
    return out


def _stack(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    out = pack_symmetric({k: np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in parts[0]})
    if "neff" in out:  # stays at the site: the pipeline's effective-size rule uses it (keys with "_" never leave)
        out["_neff"] = out.pop("neff")
    return out


@register(
    "covar_ranges",
    Spec(
        params=DESIGN_PARAMS,
        outputs={k: arr("f8", "c") for k in ("case_min", "case_max", "ctrl_min", "ctrl_max")},
        param_dims=_covar_dims,
        meta=frozenset({"n_cases", "n_controls"}),
        contributors=meta_count("n_cases", "n_controls"),
        sample_level=True,
        sample_sets=design_sample_set,
        families=("x",),
        doc="per covariate: min and max among cases and among controls (single samples' values)",
    ),
)
def covar_ranges(cohort: Any, req: AnalysisRequest):
    """Per design covariate: min/max among this site's cases and among its controls.

    Used only for PLINK's covariate-separation rule (binary traits). The extremes are single
    samples' (standardised) values; under a privacy policy this request is refused.
    """
    y, C, keep = _design(cohort, req.params, req.rules)
    case = y[keep] > 0.5
    return glm.site_covar_ranges(y[keep], C[keep]), {"n_cases": int(case.sum()), "n_controls": int((~case).sum())}
