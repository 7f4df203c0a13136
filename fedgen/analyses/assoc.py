"""Site-side partials for association testing: sums over the site's samples, per variant.

* ``covar_moments``: Σx, Σx², n of numeric covariates (for pooled standardisation);
* ``assoc_counts``: A1/A2 allele counts in cases and controls (allelic chi-square);
* ``glm_linear``: XᵀX, Xᵀy, yᵀy, n per variant (linear regression sufficient statistics);
* ``glm_logistic``: Hessian, gradient, n and log-likelihood at the aggregator's β per variant;
* ``glm_firth``: information, log-likelihood and (given the pooled I⁻¹) Firth's modified score.

The design (phenotype, covariates) is rebuilt from the request parameters each time; samples
with a missing phenotype or covariate are left out, and per variant those with a missing call.
No array has a samples axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedgen.analyses import register
from fedgen.analyses.spec import Spec, arr, meta_count, suppress_small_variant_rows
from fedgen.analyses.qc import SUB_BLOCK, VARIANT_INPUTS, _block_args
from fedgen.cohort.cohort import Cohort, load_cohort
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
    p = 2
    for cv in covs:
        if not isinstance(cv, Mapping) or not isinstance(cv.get("name"), str):
            raise ValueError("each covariate must be a mapping with a 'name'")
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
    if p > MAX_PREDICTORS:
        raise ValueError(f"the model would have {p} predictors (at most {MAX_PREDICTORS})")
    return p


def _glm_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    p = design_predictors(params, str(node_config.get("site", "")))
    return {"p": p, "t": p * (p + 1) // 2}


def _covar_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    return {"c": design_predictors(params, str(node_config.get("site", ""))) - 2}


def _check_indicator_cells(params: dict[str, Any], C: np.ndarray, keep: np.ndarray, min_count: int) -> None:
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
                f"covariate {cv['name']!r}: a category would hold fewer than the site's min_count of {min_count} "
                "of the samples analysed (or all but fewer than that); merge or recode its categories"
            )
        col += k


def _design(cohort: Cohort, params: dict[str, Any], node_config: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        design_predictors(params, cohort.site)
    except ValueError as exc:
        raise FedgenError(f"bad design parameters: {exc}") from None
    phenotype = str(params["phenotype"])
    kind = str(params["kind"])
    if node_config is not None:
        from fedgen.site.guard import check_columns

        check_columns(node_config, [phenotype, *(cv["name"] for cv in params.get("covariates") or [])])
    site_cols = (params.get("site_columns") or {}).get(cohort.site, [])
    y, C, keep = build_design(
        cohort.table.columns,
        cohort.table_rows,
        phenotype=phenotype,
        kind=kind,
        covariates=list(params.get("covariates") or []),
        site_columns=site_cols,
        where=str(cohort.table.path),
    )
    spec = params.get("pcs")
    if spec:  # this site's own PC scores from the study's federated PCA (they never left it)
        from fedgen.cohort.pcs import load_site_pcs

        X = load_site_pcs(cohort, str(spec["study_id"]), int(spec["n"]))
        C = np.hstack([C, (X - np.asarray(spec["mean"], dtype=float)) / np.asarray(spec["sd"], dtype=float)])
    if node_config is not None:
        from fedgen.site.guard import site_min_count

        _check_indicator_cells(params, C, keep, site_min_count(node_config))
    return y, C, keep


DESIGN_PARAMS = frozenset({"phenotype", "kind", "covariates", "site_columns", "pcs"})
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
        doc="per numeric covariate: sum, sum of squares, count",
    ),
)
def covar_moments(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """Per numeric covariate: sum, sum of squares and count over samples where it is present."""
    cohort = load_cohort(node_config)
    names = list(params.get("names") or [])
    from fedgen.site.guard import check_columns

    check_columns(node_config, names)
    out = np.zeros((len(names), 3))
    for j, name in enumerate(names):
        vals = [cohort.table.require(name)[i] for i in cohort.table_rows.tolist()]
        x = _numeric(vals)
        if x is None:
            raise FedgenError(f"{cohort.table.path}: covariate {name!r} is not numeric at this site")
        x = x[~np.isnan(x)]
        out[j] = (x.sum(), (x * x).sum(), len(x))
    present = out[:, 2][out[:, 2] > 0]  # a covariate absent at this site reveals nothing
    return {"moments": out}, {"n_min": int(present.min()) if len(present) else cohort.n_samples}


def _genotypes(cohort: Cohort, arrays: dict[str, np.ndarray], keep: np.ndarray):
    idx, flip = _block_args(cohort, arrays)
    for s in range(0, len(idx), SUB_BLOCK):
        g = cohort.block(idx[s : s + SUB_BLOCK], flip[s : s + SUB_BLOCK])
        yield s, g[:, keep]


@register(
    "assoc_counts",
    Spec(
        params=DESIGN_PARAMS,
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8", "v", 4)},
        meta=frozenset({"n_cases", "n_controls", "suppressed"}),
        contributors=meta_count("n_cases", "n_controls"),
        suppress=suppress_small_variant_rows(
            lambda out: np.minimum(out["counts"][:, 0] + out["counts"][:, 1], out["counts"][:, 2] + out["counts"][:, 3]) // 2
        ),
        doc="per variant: A1 and A2 allele counts in cases and in controls",
    ),
)
def assoc_counts(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """(V, 4): A1 alleles in cases, A2 in cases, A1 in controls, A2 in controls (dosage = A1)."""
    cohort = load_cohort(node_config)
    y, _, keep = _design(cohort, {**params, "covariates": []}, node_config)
    case = y[keep] == 1
    out = case_control_allele_counts(cohort, arrays, case, keep)
    return {"counts": out}, {"n_cases": int(case.sum()), "n_controls": int((~case).sum())}


def case_control_allele_counts(
    cohort: Cohort, arrays: dict[str, np.ndarray], case: np.ndarray, keep: np.ndarray, *, missing_as_zero: bool = False
) -> np.ndarray:
    """(V, 4) int64: A1 and A2 alleles in cases, then in controls (dosage = A1).

    ``case`` flags the samples in ``keep``. A missing call adds nothing, or with
    ``missing_as_zero`` two A2 alleles (every sample then adds exactly two alleles per variant).
    """
    idx = np.asarray(arrays.get("idx", []))
    out = np.zeros((len(idx), 4), dtype=np.int64)
    for s, g in _genotypes(cohort, arrays, keep):
        ok = np.ones(g.shape, bool) if missing_as_zero else g >= 0
        gc = np.where(g >= 0, g, 0).astype(np.int64)
        a = gc[:, case].sum(1)
        b = 2 * ok[:, case].sum(1) - a
        c = gc[:, ~case].sum(1)
        d = 2 * ok[:, ~case].sum(1) - c
        out[s : s + len(g)] = np.stack([a, b, c, d], axis=1)
    return out


@register(
    "glm_linear",
    Spec(
        params=DESIGN_PARAMS,
        inputs=VARIANT_INPUTS,
        outputs={"XtX_triu": arr("f8", "v", "t"), "Xty": arr("f8", "v", "p"), "yty": arr("f8", "v"), "n": arr("i8", "v")},
        param_dims=_glm_dims,
        meta=frozenset({"n", "suppressed"}),
        contributors=meta_count("n"),
        suppress=suppress_small_variant_rows(lambda out: _rows_rest_on(out)),
        doc="per variant: XᵀX (upper triangle), Xᵀy, yᵀy, n of the linear model",
    ),
)
def glm_linear(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    cohort = load_cohort(node_config)
    y, C, keep = _design(cohort, params, node_config)
    parts = []
    for _, g in _genotypes(cohort, arrays, keep):
        parts.append(glm.site_linear_suffstats(g, y[keep], C[keep]))
    return _stack(parts), {"n": int(keep.sum())}


@register(
    "glm_logistic",
    Spec(
        params=DESIGN_PARAMS,
        inputs={**VARIANT_INPUTS, "beta": arr("*", "v", "p")},
        outputs={"H_triu": arr("f8", "v", "t"), "grad": arr("f8", "v", "p"), "n": arr("i8", "v"), "loglik": arr("f8", "v", optional=True)},
        param_dims=_glm_dims,
        meta=frozenset({"n", "suppressed"}),
        contributors=meta_count("n"),
        suppress=suppress_small_variant_rows(lambda out: _rows_rest_on(out)),
        doc="per variant at the aggregator's β: Hessian (upper triangle), gradient, n",
    ),
)
def glm_logistic(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    cohort = load_cohort(node_config)
    y, C, keep = _design(cohort, params, node_config)
    beta = _beta(arrays)
    parts = []
    for s, g in _genotypes(cohort, arrays, keep):
        parts.append(glm.site_logistic_partials(g, y[keep], C[keep], beta[s : s + len(g)], with_loglik=False))
    return _stack(parts), {"n": int(keep.sum())}


@register(
    "glm_firth",
    Spec(
        params=DESIGN_PARAMS,
        inputs={**VARIANT_INPUTS, "beta": arr("*", "v", "p"), "Iinv": arr("*", "v", "p", "p", optional=True)},
        outputs={"I_triu": arr("f8", "v", "t"), "loglik": arr("f8", "v"), "n": arr("i8", "v"), "ustar": arr("f8", "v", "p", optional=True)},
        param_dims=_glm_dims,
        meta=frozenset({"n", "suppressed"}),
        contributors=meta_count("n"),
        suppress=suppress_small_variant_rows(lambda out: _rows_rest_on(out)),
        doc="per variant: Fisher information (upper triangle), log-likelihood, n, Firth's score",
    ),
)
def glm_firth(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    cohort = load_cohort(node_config)
    y, C, keep = _design(cohort, params, node_config)
    beta = _beta(arrays)
    iinv = arrays.get("Iinv")
    parts = []
    for s, g in _genotypes(cohort, arrays, keep):
        sub = None if iinv is None else np.asarray(iinv, dtype=np.float64)[s : s + len(g)]
        parts.append(glm.site_firth_partials(g, y[keep], C[keep], beta[s : s + len(g)], sub))
    return _stack(parts), {"n": int(keep.sum())}


def _rows_rest_on(out: Mapping[str, np.ndarray]) -> np.ndarray:
    """Samples each variant's sums rest on: n, or the IRLS weights' effective size when smaller."""
    n = np.asarray(out["n"], dtype=np.float64)
    if "_neff" in out:
        neff = np.floor(np.asarray(out["_neff"], dtype=np.float64) + 1e-9)
        n = np.where(n > 0, np.maximum(np.minimum(n, neff), 0.5), 0.0)  # 0.5: a positive n never reads as "no data"
    return n


def _beta(arrays: dict[str, np.ndarray]) -> np.ndarray:
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
    if "neff" in out:  # stays at the site: the guard's small-cell rule uses it (keys with "_" never leave)
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
        doc="per covariate: min and max among cases and among controls (single samples' values)",
    ),
)
def covar_ranges(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """Per design covariate: min/max among this site's cases and among its controls.

    Used only for PLINK's covariate-separation rule (binary traits). The extremes are single
    samples' (standardised) values; under a privacy policy this request is refused.
    """
    cohort = load_cohort(node_config)
    y, C, keep = _design(cohort, params, node_config)
    case = y[keep] > 0.5
    return glm.site_covar_ranges(y[keep], C[keep]), {"n_cases": int(case.sum()), "n_controls": int((~case).sum())}
