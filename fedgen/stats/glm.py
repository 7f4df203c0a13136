"""PLINK 2 ``--glm`` (linear, logistic, Firth) from federated sufficient statistics.

Samples live at several sites.  Every statistic here is a function of **sums over samples**:
each site computes partial sums for a block of variants, the aggregator adds them and either
finishes the computation (linear regression) or runs one step of an iterative fit and asks for
the next round of sums (logistic IRLS, Firth).  The aggregator-side *drivers* are state
machines that consume summed partials and expose the parameters to evaluate next, so the
same code runs pooled (one site, :func:`glm_pooled`) or federated (:func:`glm_fit` with any
number of sites); with float64 sums the two agree to rounding (~1e-15 relative).

Design matrix of variant v: ``X = [1, g, c_1..c_k]`` (intercept, A1 dosage 0/1/2, covariates),
``p = 2 + k`` columns.  A sample enters variant v's regression when its phenotype, every
covariate and its genotype at v are present (callers drop NaN phenotype/covariate rows;
genotype ``-1`` is handled here).  Only the genotype (ADD) coefficient is reported.

Numerics follow plink-ng v2.00a3.5 (``2.0/plink2_glm_linear.cc``, ``plink2_glm_logistic.cc``,
``plink2_glm_shared.cc``):

* linear: double precision, ERRCODEs in PLINK's order, ``df = OBS_CT - p``, P from
  :func:`fedgen.stats.pvalues.t_ln_p` — printed BETA/SE/T_STAT/P equal PLINK's;
* logistic IRLS and Firth: PLINK runs these in float32 (SIMD sums, approximate ``exp``); we
  mirror every decision rule (start values, pre-checks, step rules, convergence and failure
  tests, iteration limits, SE from the Hessian at the start of the last IRLS step, float32
  storage of beta and SE) in float64.

Residual differences from PLINK (measured on the fixtures of ``tests/test_glm.py``):

* IRLS rows: |ΔZ|/|Z| ≤ 6e-5 (median 1e-6; ~75% of Z print identically);
* Firth rows: |ΔZ|/max(1, |Z|) ≤ 3e-4 on ordinary data (|Δβ| ≤ 8e-4: PLINK stops within
  1e-4-type tolerances of the optimum, as do we, at slightly different points), ≤ 1e-3 when
  a covariate separates the trait — there convergence is so slow that PLINK's float32
  log-likelihood noise decides *when* it stops, and even whether it reports UNFINISHED
  (PLINK's own SSE2 and AVX2 builds disagree on ~8% of such rows).  :class:`FirthDriver` models that noise with a small
  comparison tolerance (``noise_floor``), which brings the UNFINISHED flags within PLINK's
  build-to-build spread;
* the logistic corr/VIF pre-check sees the genotype cross-products rounded to float32, as
  PLINK's float code does (an exactly collinear genotype is VIF_TOO_HIGH there, not
  VIF_INFINITE as in the double-precision linear path);
* PLINK 2 defect (2.00a3.5, code unchanged in later plink-ng), not reproduced: phantom
  intercept-only observations in the logistic Hessian.  ``GlmLogisticThread`` refills the
  intercept column of its float buffer only when the previous variant of its thread chunk
  had missing calls.  After a variant without missing calls (all N regression samples), a
  variant with nm < N calls keeps intercept = 1 in its SIMD padding lanes, k = min(⌈nm/4⌉·4,
  N) − nm of them (0–3; float vectors are 4 wide in the x86-64 builds, AVX2 included),
  while its genotype and covariate padding is 0.  Those lanes enter XᵀVX with weight p*(1 − p*) ≈ 0.2247
  (p* ≈ 0.659 = sigmoid(p*), what PLINK's vectorised sigmoid leaves in the padding) but not
  the gradient: β is right, SE too small.  PLINK's SE there equals ours with k·p*(1 − p*)
  added to (XᵀVX)₀₀.  On 2 × 400 simulated people (777 with T2D and covariates, 5,988
  variants, nearly all with a few missing calls) 105 rows had k > 0; 80 of them differ by
  more than 1e-4 in SE (up to 4.3e-3 relative, same OR), every one reproduced by the k-lane
  model to ≤ 1.3e-5; the other rows agree to ≤ 8.6e-6.  PLINK's value is not a function of
  the variant's data (it depends on the variant before it and on PLINK's thread chunks), so
  we keep the correct SE.  ``tests/test_glm.py::test_live_plink2_phantom_lanes_rule`` pins
  the rule against live plink2.  Cohorts where every variant misses some calls, or none
  does, are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedgen.stats import kernel as _kernel
from fedgen.stats.pvalues import t_ln_p, z_ln_p

__all__ = [
    "SiteDesign",
    "site_linear_suffstats",
    "linear_from_suffstats",
    "site_logistic_partials",
    "site_firth_partials",
    "firth_score",
    "site_covar_ranges",
    "covariates_separated",
    "covar_variance_standardize",
    "LogisticDriver",
    "FirthDriver",
    "glm_fit",
    "glm_pooled",
]

_ERR_DTYPE = "<U23"
_SINGULAR_RCOND = 1e-14  # kMatrixSingularRcond
_BLOCK_ELEMS = 1 << 18  # genotype entries per site block (2 MB float64 work arrays: cache friendly)

ERR_SAMPLE_CT = "SAMPLE_CT<=PREDICTOR_CT"
ERR_CONST_OMITTED = "CONST_OMITTED_ALLELE"
ERR_CORR = "CORR_TOO_HIGH"
ERR_VIF_INF = "VIF_INFINITE"
ERR_VIF = "VIF_TOO_HIGH"
ERR_RANK = "RANK_DEFICIENT"
ERR_LOGISTIC_FAIL = "LOGISTIC_CONVERGE_FAIL"
ERR_FIRTH_FAIL = "FIRTH_CONVERGE_FAIL"
ERR_INVALID = "INVALID_RESULT"
ERR_UNFINISHED = "UNFINISHED"


# =============================================================================== helpers
def _as_inputs(g: Any, y: Any, C: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.asarray(g)
    if g.ndim != 2:
        raise ValueError("g must be (variants, samples)")
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != g.shape[1]:
        raise ValueError("y and g disagree on the number of samples")
    return (g, *_as_design(y, C))


def _as_design(y: Any, C: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n = y.shape[0]
    C = np.zeros((n, 0)) if C is None else np.asarray(C, dtype=np.float64).reshape(n, -1)
    if np.isnan(y).any() or np.isnan(C).any():
        raise ValueError("drop samples with a missing phenotype or covariate before calling")
    return y, C


class SiteDesign:
    """One request's design at a site: the checked phenotype ``y`` and covariates ``C``, and the
    sample-level products the kernels multiply by, each built on first use. A site builds one per
    request and passes it to every block's kernel call (``design=``), so those products are made
    once per request, not once per block; a kernel called without one builds its own."""

    def __init__(self, y: Any, C: Any) -> None:
        self.y, self.C = _as_design(y, C)
        self._terms: _SiteTerms | None = None
        self._triples: _TripleTerms | None = None
        self._kernel_terms: Any = None

    def check(self, g: Any) -> np.ndarray:
        g = np.asarray(g)
        if g.ndim != 2:
            raise ValueError("g must be (variants, samples)")
        if g.shape[1] != self.y.shape[0]:
            raise ValueError("y and g disagree on the number of samples")
        return g

    @property
    def terms(self) -> _SiteTerms:
        if self._terms is None:
            self._terms = _SiteTerms(self.y, self.C)
        return self._terms

    @property
    def triples(self) -> _TripleTerms:
        if self._triples is None:
            self._triples = _TripleTerms(self.C)
        return self._triples

    @property
    def kernel_terms(self) -> Any:
        if self._kernel_terms is None:
            self._kernel_terms = _kernel.CovariateTerms(self.y, self.C)
        return self._kernel_terms


def block_rows(n_samples: int) -> int:
    """Variants per kernel block: a site that splits its work (``threads``) splits it on these
    boundaries, so every variant's sums come from the same arithmetic whatever the thread count."""
    return max(1, _BLOCK_ELEMS // max(1, n_samples))


def _blocks(n_variants: int, n_samples: int) -> list[slice]:
    step = block_rows(n_samples)
    return [slice(s, min(s + step, n_variants)) for s in range(0, n_variants, step)]


def _geno_block(gb: np.ndarray, fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """0/1 non-missing mask and genotype with missing set to 0, both float64.

    With ``fill`` (one value per variant), a missing call is imputed with its variant's value
    and every sample counts as present (one sample set for every variant).
    A float block holds real-valued (imputed) dosages with NaN for missing: :func:`_dosage_block`.
    """
    if gb.dtype.kind == "f":
        return _dosage_block(gb, fill)
    if fill is not None:
        G = gb.astype(np.float64)
        miss = gb < 0
        if miss.any():
            G[miss] = np.broadcast_to(np.asarray(fill, dtype=np.float64)[:, None], G.shape)[miss]
        return np.ones(G.shape), G
    M = (gb >= 0).astype(np.float64)
    G = gb.astype(np.float64)
    G *= M  # -1 -> -0.0
    return M, G


def _dosage_block(gb: np.ndarray, fill: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_geno_block` for real-valued dosages (NaN or a negative value = missing, e.g. the
    haploid 0/0.5/1 coding of chrY/MT calls with -1 for missing): the same mask and values."""
    miss = np.isnan(gb) | (gb < 0)
    G = np.where(miss, 0.0, gb).astype(np.float64, copy=False)
    if fill is not None:
        if miss.any():
            G[miss] = np.broadcast_to(np.asarray(fill, dtype=np.float64)[:, None], G.shape)[miss]
        return np.ones(G.shape), G
    return (~miss).astype(np.float64), G


def _fill_of(fill: Any, sl: slice) -> np.ndarray | None:
    return None if fill is None else np.asarray(fill, dtype=np.float64)[sl]


def _cov_products(C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle index pairs (i <= j) of the covariates and the (N, K2) products."""
    iu, ju = np.triu_indices(C.shape[1])
    return iu, ju, C[:, iu] * C[:, ju]


def _fill_xtx(out: np.ndarray, rows: slice, s_m: np.ndarray, s_g: np.ndarray, s_gg: np.ndarray,
              s_mc: np.ndarray, s_gc: np.ndarray, s_cc: np.ndarray, iu: np.ndarray,
              ju: np.ndarray) -> None:
    """X'WX from weighted sums: Σw, Σwg, Σwg², Σwc, Σwgc, Σw c_i c_j."""
    o = out[rows]
    o[:, 0, 0] = s_m
    o[:, 0, 1] = o[:, 1, 0] = s_g
    o[:, 1, 1] = s_gg
    o[:, 0, 2:] = s_mc
    o[:, 2:, 0] = s_mc
    o[:, 1, 2:] = s_gc
    o[:, 2:, 1] = s_gc
    o[:, 2 + iu, 2 + ju] = s_cc
    o[:, 2 + ju, 2 + iu] = s_cc


def _sum_parts(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.array(v, copy=True) for k, v in parts[0].items()}
    for part in parts[1:]:
        for k, v in part.items():
            out[k] = out[k] + v
    return out


# ----------------------------------------------------------------- batched linear algebra
def _cholesky(A: np.ndarray, *, plink_float_rule: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lower Cholesky factors of a stack (V, p, p).

    ``plink_float_rule``: PLINK's own logistic Cholesky (``CholeskyDecompositionF``): a
    negative pivot becomes 1e-6 and never fails.  Otherwise LAPACK ``dpotrf`` semantics:
    ``ok`` is False where a pivot is not positive (those factors are garbage).
    """
    V, p, _ = A.shape
    L = np.zeros_like(A)
    ok = np.ones(V, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(p):
            piv = A[:, j, j] - np.einsum("vk,vk->v", L[:, j, :j], L[:, j, :j])
            if plink_float_rule:
                d = np.where(piv >= 0.0, np.sqrt(np.where(piv >= 0.0, piv, 0.0)), 1e-6)
            else:
                good = piv > 0.0
                ok &= good
                d = np.sqrt(np.where(good, piv, 1.0))
            L[:, j, j] = d
            if j + 1 < p:
                L[:, j + 1:, j] = (A[:, j + 1:, j]
                                   - np.einsum("vik,vk->vi", L[:, j + 1:, :j], L[:, j, :j])) / d[:, None]
    return L, ok


def _chol_solve(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve L Lᵀ x = b for stacks L (V, p, p), b (V, p)."""
    p = L.shape[1]
    z = np.zeros_like(b)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(p):
            z[:, i] = (b[:, i] - np.einsum("vk,vk->v", L[:, i, :i], z[:, :i])) / L[:, i, i]
        x = np.zeros_like(b)
        for i in range(p - 1, -1, -1):
            x[:, i] = (z[:, i] - np.einsum("vk,vk->v", L[:, i + 1:, i], x[:, i + 1:])) / L[:, i, i]
    return x


def _chol_inverse(L: np.ndarray) -> np.ndarray:
    """(L Lᵀ)⁻¹ for a stack of lower Cholesky factors."""
    V, p, _ = L.shape
    Li = np.zeros_like(L)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(p):
            Li[:, i, i] = 1.0 / L[:, i, i]
            if i:
                Li[:, i, :i] = -np.einsum("vk,vkj->vj", L[:, i, :i], Li[:, :i, :i]) / L[:, i, i][:, None]
        return np.matmul(Li.transpose(0, 2, 1), Li)


def _spd_inverse(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse, log-determinant and ``ok`` of symmetric positive definite stacks.

    ``ok`` mirrors PLINK's ``InvertSymmdefMatrixChecked``: ``dpotrf`` must succeed and the
    reciprocal 1-norm condition number must be at least 1e-14 (computed exactly here; LAPACK
    ``dpocon`` estimates it).
    """
    V, p, _ = A.shape
    L, ok = _cholesky(A)
    safe = np.where(ok[:, None, None], L, np.eye(p)[None])
    inv = _chol_inverse(safe)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logdet = 2.0 * np.log(np.diagonal(safe, axis1=1, axis2=2)).sum(1)
        rcond = 1.0 / (np.abs(A).sum(1).max(1) * np.abs(inv).sum(1).max(1))
    ok &= rcond >= _SINGULAR_RCOND
    return inv, logdet, ok


# ------------------------------------------------------------------------- shared checks
def _precheck_errors(XtX: np.ndarray, *, max_corr: float, vif_thresh: float) -> np.ndarray:
    """ERRCODE checks 1, 2 and 4 from X'X (plink-ng ``plink2_glm_shared.cc``: ``CheckMaxCorrAndVif``)."""
    V, p, _ = XtX.shape
    err = np.full(V, ".", dtype=_ERR_DTYPE)
    n = XtX[:, 0, 0]
    sg, sgg = XtX[:, 0, 1], XtX[:, 1, 1]
    small = n <= p
    err[small] = ERR_SAMPLE_CT
    const = ~small & (n * sgg == sg * sg)
    err[const] = ERR_CONST_OMITTED
    todo = np.flatnonzero(err == ".")
    q = p - 1
    if q < 2 or not todo.size:
        return err
    X = XtX[todo]
    nn = n[todo]
    s = X[:, 0, 1:]
    S = X[:, 1:, 1:]
    recip_n = 1.0 / nn
    recip_m1 = 1.0 / (nn - 1.0)
    # (dotprod_ij - (sum_i / n) sum_j) / (n - 1), row index i >= column index j
    cov = (S - (s * recip_n[:, None])[:, :, None] * s[:, None, :]) * recip_m1[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        isd = 1.0 / np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        r = cov * isd[:, :, None] * isd[:, None, :]
    lower = np.tril(np.ones((q, q), dtype=bool), -1)
    corr_bad = (np.abs(r) > max_corr)[:, lower].any(1)
    r_low = np.where(lower[None], r, 0.0)  # PLINK fills the lower triangle only
    R = r_low + r_low.transpose(0, 2, 1) + np.eye(q)[None]
    Rinv, _, ok = _spd_inverse(np.where(np.isfinite(R), R, 0.0))
    ok &= np.isfinite(R).all((1, 2))
    vif_bad = ok & (np.diagonal(Rinv, axis1=1, axis2=2) > vif_thresh).any(1)
    sub = np.full(todo.size, ".", dtype=_ERR_DTYPE)
    sub[vif_bad] = ERR_VIF
    sub[~ok] = ERR_VIF_INF
    sub[corr_bad] = ERR_CORR
    err[todo] = sub
    return err


def _invalid_cov(cov: np.ndarray) -> np.ndarray:
    """PLINK's validParameters(): tiny/non-finite variance or near-±1 positive covariance."""
    p = cov.shape[1]
    diag = np.diagonal(cov, axis1=1, axis2=2)
    bad = ((diag[:, 1:] < 1e-20) | ~np.isfinite(diag[:, 1:])).any(1)
    with np.errstate(invalid="ignore"):
        sq = np.sqrt(diag)
        lim = (0.99999 * sq)[:, :, None] * sq[:, None, :]
        over = cov > lim
    lower = np.tril(np.ones((p, p), dtype=bool), -1)
    lower[0, :] = False
    return bad | over[:, lower].any(1)


# =============================================================================== linear
def site_linear_suffstats(g: Any, y: Any, C: Any, *, fill: Any = None, design: SiteDesign | None = None
                          ) -> dict[str, np.ndarray]:
    """One site's partial sums for linear regression of ``y`` on ``[1, g, C]``.

    Parameters
    ----------
    g : (V, N) int array
        A1 dosages 0/1/2, ``-1`` for a missing call (that sample is left out of that
        variant's sums); or a float array of imputed A1 dosages, NaN for missing.
    y : (N,) float
        Phenotype; samples with a missing phenotype must already be removed.
    C : (N, k) float or None
        Covariates (no NaN).
    fill : (V,) float or None
        Imputation value per variant: a missing call takes it instead of dropping the sample.
    design : SiteDesign, optional
        The request's checked ``y``/``C`` (and products), shared by its blocks; ``y`` and ``C``
        are then not checked again.

    Returns
    -------
    dict
        ``XtX`` (V, p, p), ``Xty`` (V, p), ``yty`` (V,), ``n`` (V,) int64 — sums over this
        site's samples; add them across sites.
    """
    if design is not None:
        g, y, C = design.check(g), design.y, design.C
    else:
        g, y, C = _as_inputs(g, y, C)
    V, N = g.shape
    k = C.shape[1]
    p = 2 + k
    iu, ju, CC = _cov_products(C)
    ones = np.ones((N, 1))
    q_m = np.hstack([ones, y[:, None], (y * y)[:, None], C, C * y[:, None], CC])
    q_g = np.hstack([ones, y[:, None], C])
    XtX = np.zeros((V, p, p))
    Xty = np.zeros((V, p))
    yty = np.zeros(V)
    for sl in _blocks(V, N):
        M, G = _geno_block(g[sl], _fill_of(fill, sl))
        sm = M @ q_m
        sg = G @ q_g
        sgg = np.einsum("ij,ij->i", G, G)
        _fill_xtx(XtX, sl, sm[:, 0], sg[:, 0], sgg, sm[:, 3:3 + k], sg[:, 2:], sm[:, 3 + 2 * k:], iu, ju)
        Xty[sl, 0] = sm[:, 1]
        Xty[sl, 1] = sg[:, 1]
        Xty[sl, 2:] = sm[:, 3 + k:3 + 2 * k]
        yty[sl] = sm[:, 2]
    return {"XtX": XtX, "Xty": Xty, "yty": yty, "n": np.rint(XtX[:, 0, 0]).astype(np.int64)}


def linear_from_suffstats(XtX: Any, Xty: Any, yty: Any, n: Any, *, max_corr: float = 0.999,
                          vif_thresh: float = 50.0) -> dict[str, np.ndarray]:
    """PLINK 2 linear regression of the genotype (ADD) coefficient from summed statistics.

    Parameters
    ----------
    XtX : (V, p, p), Xty : (V, p), yty : (V,), n : (V,)
        Sums over all sites (:func:`site_linear_suffstats`).
    max_corr, vif_thresh : float
        ``--max-corr`` and ``--vif``.

    Returns
    -------
    dict
        ``beta``, ``se``, ``t``, ``p_ln`` (ln P), ``obs_ct`` (int), ``errcode`` (str, ``"."``
        when OK) — each of length V; failed rows hold NaN.

    Notes
    -----
    ERRCODEs in PLINK's order: SAMPLE_CT<=PREDICTOR_CT (n <= p), CONST_OMITTED_ALLELE,
    CORR_TOO_HIGH / VIF_INFINITE / VIF_TOO_HIGH on the predictor correlation matrix (n - 1
    denominator), RANK_DEFICIENT (Cholesky of X'X fails), INVALID_RESULT.  β = (X'X)⁻¹X'y,
    σ² = (y'y - β'X'y) / (n - p), SE = sqrt(σ² [(X'X)⁻¹]₁₁), df = n - p.
    """
    XtX = np.asarray(XtX, dtype=np.float64)
    Xty = np.asarray(Xty, dtype=np.float64)
    yty = np.asarray(yty, dtype=np.float64)
    nn = np.asarray(n, dtype=np.float64)
    V, p, _ = XtX.shape
    err = _precheck_errors(XtX, max_corr=max_corr, vif_thresh=vif_thresh)
    beta = np.full(V, np.nan)
    se = np.full(V, np.nan)
    todo = np.flatnonzero(err == ".")
    if todo.size:
        A = XtX[todo]
        L, ok = _cholesky(A)
        safe = np.where(ok[:, None, None], L, np.eye(p)[None])
        coef = _chol_solve(safe, Xty[todo])
        inv = _chol_inverse(safe)
        sigma = (yty[todo] - np.einsum("vj,vj->v", Xty[todo], coef)) / (nn[todo] - p)
        cov = inv * sigma[:, None, None]
        invalid = ok & _invalid_cov(cov)
        sub = np.full(todo.size, ".", dtype=_ERR_DTYPE)
        sub[invalid] = ERR_INVALID
        sub[~ok] = ERR_RANK
        err[todo] = sub
        good = sub == "."
        beta[todo[good]] = coef[good, 1]
        se[todo[good]] = np.sqrt(cov[good, 1, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        t = beta / se
    p_ln = np.full(V, np.nan)
    ok_rows = err == "."
    if ok_rows.any():
        p_ln[ok_rows] = t_ln_p(t[ok_rows], (nn[ok_rows] - p).astype(np.int64))
    return {"beta": beta, "se": se, "t": t, "p_ln": p_ln, "obs_ct": np.rint(nn).astype(np.int64),
            "errcode": err}


# =============================================================================== logistic
def _fitted_block(beta: np.ndarray, G: np.ndarray, C: np.ndarray, *, y: np.ndarray | None = None,
                  M: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """p = 1/(1 + e^-η), η = β0 + β1 g + C β_c, for one block (in place).

    With ``y`` and ``M`` also returns Σ M [y ln p + (1-y) ln(1-p)], computed from η without
    cancellation (``-log(1 + e^∓η)``), so that it stays finite where p rounds to 0 or 1.
    """
    # -η in one product: [-β0, -βc] against [1, C] (no separate intercept and negation passes)
    nb = np.concatenate([beta[:, 0:1], beta[:, 2:]], axis=1)
    np.negative(nb, out=nb)  # contiguous: numpy 2.4.6's negative is wrong on strided in/out views
    neta = nb @ _with_ones(C).T
    tmp = np.multiply(G, beta[:, 1:2])
    neta -= tmp
    loglik = None
    if y is not None and M is not None:  # Σ M ln p(y) = -Σ M log(1 + e^(∓η))
        np.multiply(neta, np.where(y > 0.5, 1.0, -1.0)[None, :], out=tmp)
        np.logaddexp(0.0, tmp, out=tmp)
        tmp *= M
        loglik = -tmp.sum(1)
    # 1 / (1 + exp(-η)) in place; numpy's SIMD exp is ~6x faster than scipy's expit
    with np.errstate(over="ignore"):
        np.exp(neta, out=neta)
    neta += 1.0
    return np.divide(1.0, neta, out=neta), loglik


def _with_ones(C: np.ndarray) -> np.ndarray:
    """[1, C] (N, 1 + k)."""
    out = np.empty((C.shape[0], 1 + C.shape[1]))
    out[:, 0] = 1.0
    out[:, 1:] = C
    return out


class _SiteTerms:
    """Sample-level columns a site multiplies its weighted residuals/weights by."""

    def __init__(self, y: np.ndarray, C: np.ndarray) -> None:
        N, k = C.shape
        self.k = k
        self.y = y
        self.C = C
        self.iu, self.ju, self.CC = _cov_products(C)
        ones = np.ones((N, 1))
        self.q_h = np.hstack([ones, C, self.CC])  # for X'WX: 1, c, c_i c_j
        self.q_1c = np.hstack([ones, C])  # for X'r and the g-row of X'WX

    def hessian(self, out: np.ndarray, sl: slice, w: np.ndarray, G: np.ndarray) -> None:
        """out[sl] = X'diag(w)X (w already zero where the genotype is missing)."""
        k = self.k
        sw = w @ self.q_h
        wg = np.multiply(w, G)
        swg = wg @ self.q_1c
        swgg = np.einsum("ij,ij->i", wg, G)
        _fill_xtx(out, sl, sw[:, 0], swg[:, 0], swgg, sw[:, 1:1 + k], swg[:, 1:], sw[:, 1 + k:],
                  self.iu, self.ju)

    def xt(self, r: np.ndarray, G: np.ndarray) -> np.ndarray:
        """X'r per variant (r already zero where the genotype is missing)."""
        sr = r @ self.q_1c
        out = np.empty((r.shape[0], 2 + self.k))
        out[:, 0] = sr[:, 0]
        out[:, 1] = np.einsum("ij,ij->i", r, G)
        out[:, 2:] = sr[:, 1:]
        return out


def site_logistic_partials(g: Any, y: Any, C: Any, beta: Any, *, with_loglik: bool = True, fill: Any = None,
                           design: SiteDesign | None = None) -> dict[str, np.ndarray]:
    """One site's IRLS sums at ``beta``: Hessian, gradient, sample count, log-likelihood.

    Parameters
    ----------
    g : (V, N) int array
        A1 dosages, ``-1`` missing.
    y : (N,) 0/1 float
        Case status (1 = case); missing phenotypes already removed.
    C : (N, k) float or None
        Covariates.
    beta : (V, p) float
        Coefficients to evaluate, ``[intercept, genotype, covariates...]``.
    with_loglik : bool, default True
        Also return the log-likelihood (the IRLS driver does not need it).
    design : SiteDesign, optional
        As :func:`site_linear_suffstats`.

    Returns
    -------
    dict
        ``H`` (V, p, p) = XᵀVX with V = diag(p(1-p)); ``grad`` (V, p) = Xᵀ(p - y) (PLINK's
        sign: the step is β ← β - H⁻¹ grad); ``n`` (V,) samples used; ``loglik`` (V,).
    """
    d = design if design is not None else SiteDesign(y, C)
    g, y, C = d.check(g), d.y, d.C
    beta = np.asarray(beta, dtype=np.float64)
    fast = _kernel.logistic_sums(g, d.kernel_terms, beta, fill=fill, with_loglik=with_loglik) if g.dtype == np.int8 else None
    if fast is not None:
        return fast
    V, N = g.shape
    p = 2 + C.shape[1]
    terms = d.terms
    H = np.zeros((V, p, p))
    grad = np.zeros((V, p))
    loglik = np.zeros(V)
    n = np.zeros(V, dtype=np.int64)
    neff = np.zeros(V)
    for sl in _blocks(V, N):
        M, G = _geno_block(g[sl], _fill_of(fill, sl))
        n[sl] = np.rint(M.sum(1)).astype(np.int64)
        pr, ll = _fitted_block(beta[sl], G, C, y=y if with_loglik else None, M=M)
        if ll is not None:
            loglik[sl] = ll
        w = np.subtract(1.0, pr)
        w *= pr
        w *= M
        neff[sl] = _effective_n(w)
        terms.hessian(H, sl, w, G)
        pr -= y[None, :]
        pr *= M
        grad[sl] = terms.xt(pr, G)
    out = {"H": H, "grad": grad, "n": n, "neff": neff}
    if with_loglik:
        out["loglik"] = loglik
    return out


def _effective_n(w: np.ndarray) -> np.ndarray:
    """Kish's effective sample size (Σw)² / Σw² of IRLS weights, per variant (rows of ``w``).

    A site uses it to refuse a β that weights the fit onto a few samples (e.g. one sample at
    η = 0 and every other at |η| ≫ 1), which would make its sums almost one person's values.
    """
    s1 = w.sum(1)
    s2 = np.einsum("ij,ij->i", w, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s2 > 0, s1 * s1 / s2, 0.0)


class LogisticDriver:
    """PLINK 2's logistic IRLS (``LogisticRegressionF``) for a block of variants, federated.

    Protocol: while ``not driver.done``, every site evaluates
    ``site_logistic_partials(g[driver.active], y, C, driver.beta[driver.active])``; the
    aggregator sums ``H`` and ``grad`` over sites and calls ``driver.step(H, grad)`` (rows in
    the order of ``np.flatnonzero(driver.active)``).  ``results()`` then gives the fitted
    values, ERRCODEs and the variants that must be refitted with :class:`FirthDriver`.

    The first round is at β = 0, where p = 1/2 and V = 1/4 exactly, so ``4 H`` is X'X and
    ``grad`` gives the case counts exactly; the pre-checks run on those: SAMPLE_CT,
    CONST_OMITTED_ALLELE, CORR/VIF, then (firth-fallback) an allele whose case dosage is 0 or
    its total sends the variant to Firth without IRLS, as does covariate separation
    (``covar_separated=True``: every variant).

    Step k (0-based): d = H⁻¹ grad with PLINK's Cholesky (negative pivot → 1e-6), β ← β - d,
    δ = Σ|d|.  Failure: δ NaN; k > 3 and ((δ > 20 and δ > 2 min δ) or (k > 6 and
    |1 - δ| < 1e-3)); at k = 14 any |β| > 8000; on convergence (δ < 1e-4, tested after the
    k = 14 check) any |β| > 6e4.  k = 14 without failure stops with UNFINISHED.  SE comes
    from H⁻¹ at the start of the final step.  Failure → Firth (``firth_fallback``) or
    LOGISTIC_CONVERGE_FAIL.

    Parameters
    ----------
    n_variants, n_params : int
        V and p (= 2 + number of covariates).
    firth_fallback : bool, default True
        PLINK's default ``firth-fallback`` mode; False is ``no-firth``.
    covar_separated : bool, default False
        Some covariate separates cases from controls (:func:`covariates_separated`).
    a1_is_ref : (V,) bool, optional
        Only names the allele in ``SEPARATION,REF``/``SEPARATION,ALT1`` under ``no-firth``.
    max_corr, vif_thresh : float
        ``--max-corr`` / ``--vif``.
    """

    def __init__(self, n_variants: int, n_params: int, *, firth_fallback: bool = True,
                 covar_separated: bool = False, a1_is_ref: Any = None, max_corr: float = 0.999,
                 vif_thresh: float = 50.0) -> None:
        V, p = int(n_variants), int(n_params)
        if covar_separated and not firth_fallback:
            raise ValueError("a covariate separates the trait: PLINK's no-firth mode drops the "
                             "covariate or skips the phenotype, which is not supported here")
        self.n_params = p
        self.firth_fallback = firth_fallback
        self.covar_separated = covar_separated
        self.max_corr = max_corr
        self.vif_thresh = vif_thresh
        self.a1_is_ref = np.zeros(V, bool) if a1_is_ref is None else np.asarray(a1_is_ref, bool)
        self.beta = np.zeros((V, p))
        self.active = np.ones(V, dtype=bool)
        self.iteration = 0
        self.errcode = np.full(V, ".", dtype=_ERR_DTYPE)
        self.needs_firth = np.zeros(V, dtype=bool)
        self.unfinished = np.zeros(V, dtype=bool)
        self.fitted = np.zeros(V, dtype=bool)
        self.obs_ct = np.zeros(V, dtype=np.int64)
        self._min_delta = np.full(V, 1e9)
        self._cov = np.full((V, p, p), np.nan)

    @property
    def done(self) -> bool:
        return not self.active.any()

    def _prechecks(self, idx: np.ndarray, H: np.ndarray, grad: np.ndarray) -> np.ndarray:
        XtX = 4.0 * H
        n = XtX[:, 0, 0]
        self.obs_ct[idx] = np.rint(n).astype(np.int64)
        # PLINK's CheckMaxCorrAndVif(F|Nm) sees the genotype cross products as float32 sums:
        # an exactly collinear genotype gives VIF_TOO_HIGH there, VIF_INFINITE in double.
        xf = XtX.copy()
        xf[:, 1, 2:] = xf[:, 1, 2:].astype(np.float32)
        xf[:, 2:, 1] = xf[:, 1, 2:]
        err = _precheck_errors(xf, max_corr=self.max_corr, vif_thresh=self.vif_thresh)
        self.errcode[idx] = err
        ok = err == "."
        if self.covar_separated:
            to_firth = ok.copy()
        else:
            g_tot = XtX[:, 0, 1]
            g_case = 0.5 * g_tot - grad[:, 1]
            n_case = 0.5 * n - grad[:, 0]
            o_tot = 2.0 * n - g_tot
            o_case = 2.0 * n_case - g_case
            g_sep = (g_case == 0.0) | (g_case == g_tot)
            o_sep = (o_case == 0.0) | (o_case == o_tot)
            to_firth = ok & (g_sep | o_sep)
            if not self.firth_fallback:
                a1_ref = self.a1_is_ref[idx]
                ref_sep = np.where(a1_ref, g_sep, o_sep)
                alt_sep = np.where(a1_ref, o_sep, g_sep)
                sep_err = np.where(ref_sep, "SEPARATION,REF", np.where(alt_sep, "SEPARATION,ALT1", "."))
                self.errcode[idx[to_firth]] = sep_err[to_firth]
        if self.firth_fallback:
            self.needs_firth[idx[to_firth]] = True
        keep = ok & ~to_firth
        self.active[idx[~keep]] = False
        return keep

    def step(self, H: Any, grad: Any, **_: Any) -> None:
        """Consume summed ``H`` (n_active, p, p) and ``grad`` (n_active, p) at ``beta[active]``."""
        idx = np.flatnonzero(self.active)
        H = np.asarray(H, dtype=np.float64)
        grad = np.asarray(grad, dtype=np.float64)
        if self.iteration == 0:
            keep = self._prechecks(idx, H, grad)
            idx, H, grad = idx[keep], H[keep], grad[keep]
        if idx.size:
            self._newton(idx, H, grad)
        self.iteration += 1

    def _newton(self, idx: np.ndarray, H: np.ndarray, grad: np.ndarray) -> None:
        L, _ = _cholesky(H, plink_float_rule=True)
        d = _chol_solve(L, grad)
        beta = self.beta[idx] - d
        self.beta[idx] = beta
        delta = np.abs(d).sum(1)
        min_delta = np.fmin(self._min_delta[idx], delta)
        self._min_delta[idx] = min_delta
        it = self.iteration
        absmax = np.abs(beta).max(1)
        with np.errstate(invalid="ignore"):
            fail = np.isnan(delta)
            if it > 3:
                fail |= ((delta > 20.0) & (delta > 2 * min_delta)) | ((it > 6) & (np.abs(1.0 - delta) < 1e-3))
            unfinished = np.zeros(idx.size, dtype=bool)
            if it > 13:
                fail |= absmax > 8e3
                unfinished = ~fail
            converged = ~fail & ~unfinished & (delta < 1e-4)
            blown = converged & (absmax > 6e4)
        fail |= blown
        converged &= ~blown
        stop = fail | unfinished | converged
        self.active[idx[stop]] = False
        if fail.any():
            if self.firth_fallback:
                self.needs_firth[idx[fail]] = True
            else:
                self.errcode[idx[fail]] = ERR_LOGISTIC_FAIL
        fin = unfinished | converged
        if fin.any():
            rows = idx[fin]
            # SE from H⁻¹ at the start of the final step: inverted only for the rows that stop here
            self._cov[rows] = _chol_inverse(L[fin])
            cov32 = self._cov[rows].astype(np.float32).astype(np.float64)
            invalid = _invalid_cov(cov32)
            self.errcode[rows[invalid]] = ERR_INVALID
            self.fitted[rows[~invalid]] = True
            self.unfinished[rows[~invalid & unfinished[fin]]] = True

    def results(self) -> dict[str, np.ndarray]:
        """Fitted genotype coefficient per variant.

        Returns
        -------
        dict
            ``beta``, ``se`` (float32 values widened, as PLINK stores them), ``z`` = β/SE,
            ``p_ln``, ``errcode`` (``"."``, ``"UNFINISHED"`` — values still reported — or an
            error with NaN values), ``needs_firth`` (bool: refit with Firth; values NaN),
            ``obs_ct``.
        """
        return _wald_results(self.beta[:, 1], self._cov[:, 1, 1], self.fitted, self.unfinished,
                             self.errcode, self.obs_ct, needs_firth=self.needs_firth)


def _wald_results(beta1: np.ndarray, var1: np.ndarray, fitted: np.ndarray, unfinished: np.ndarray,
                  errcode: np.ndarray, obs_ct: np.ndarray, **extra: np.ndarray
                  ) -> dict[str, np.ndarray]:
    V = beta1.shape[0]
    beta = np.full(V, np.nan)
    se = np.full(V, np.nan)
    b32 = beta1[fitted].astype(np.float32)
    s32 = np.sqrt(var1[fitted].astype(np.float32))
    beta[fitted] = b32.astype(np.float64)
    se[fitted] = s32.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = beta / se
    p_ln = np.full(V, np.nan)
    if fitted.any():
        p_ln[fitted] = z_ln_p(z[fitted])
    err = errcode.copy()
    err[fitted & unfinished] = ERR_UNFINISHED
    out = {"beta": beta, "se": se, "z": z, "p_ln": p_ln, "errcode": err, "obs_ct": obs_ct.copy()}
    out.update({k: v.copy() for k, v in extra.items()})
    return out


# =============================================================================== Firth
def firth_triples(p: int) -> np.ndarray:
    """The (T, 3) index triples a ≤ b ≤ c of a symmetric p×p×p tensor, in packing order."""
    return np.array([(a, b, c) for a in range(p) for b in range(a, p) for c in range(b, p)], dtype=np.int64).reshape(-1, 3)


class _TripleTerms:
    """Sample-level products for the third moments Σᵢ wᵢ x_ia x_ib x_ic, grouped by how many of
    a, b, c are the genotype (index 1): the rest are the fixed columns 1, c₁..c_k."""

    def __init__(self, C: np.ndarray) -> None:
        N, k = C.shape
        p = 2 + k
        F = np.hstack([np.ones((N, 1)), C])  # fixed columns, x indices 0, 2, 3, ...
        fx = np.array([0] + list(range(2, p)))
        pos = {tuple(t): i for i, t in enumerate(firth_triples(p).tolist())}
        q = F.shape[1]
        groups: list[tuple[np.ndarray, np.ndarray]] = []  # (N, m) products, their packed positions
        for n_g in range(4):
            cols, where = [], []
            if n_g == 3:
                cols.append(np.ones(N))
                where.append(pos[(1, 1, 1)])
            else:
                r = 3 - n_g
                for combo in _combos(q, r):
                    cols.append(np.prod(F[:, list(combo)], axis=1) if combo else np.ones(N))
                    where.append(pos[tuple(sorted([1] * n_g + [int(fx[c]) for c in combo]))])
            groups.append((np.column_stack(cols), np.asarray(where, dtype=np.int64)))
        self.groups = groups
        self.n_triples = len(pos)

    def moments(self, w: np.ndarray, G: np.ndarray) -> np.ndarray:
        """(V, T) packed Σᵢ wᵢ x_ia x_ib x_ic for one block (w zero where a call is missing)."""
        out = np.empty((w.shape[0], self.n_triples))
        wg = w
        for n_g, (prod, where) in enumerate(self.groups):
            if n_g:
                wg = wg * G
            out[:, where] = wg @ prod
        return out


def _combos(q: int, r: int) -> list[tuple[int, ...]]:
    from itertools import combinations_with_replacement

    return list(combinations_with_replacement(range(q), r))


def unpack_triples(T: np.ndarray, p: int) -> np.ndarray:
    """(V, T) packed third moments → (V, p, p, p) symmetric tensors."""
    from itertools import permutations

    T = np.asarray(T, dtype=np.float64)
    full = np.empty((T.shape[0], p, p, p))
    for i, (a, b, c) in enumerate(firth_triples(p).tolist()):
        for j, k, l in set(permutations((a, b, c))):
            full[:, j, k, l] = T[:, i]
    return full


def firth_score(U: Any, T: Any, Iinv: Any) -> np.ndarray:
    """Firth's modified score U* = Xᵀ[(y − p) + h(½ − p)] from site sums at one β.

    With hᵢ = vᵢ xᵢᵀ I⁻¹ xᵢ, Σᵢ hᵢ(½ − pᵢ) x_ij = Σ_kl (I⁻¹)_kl T_jkl, where
    T_jkl = Σᵢ vᵢ(½ − pᵢ) x_ij x_ik x_il: the hat values need the *pooled* I⁻¹, so the sites send
    T beside I and U and the aggregator forms U* in the same round.
    """
    U = np.asarray(U, dtype=np.float64)
    Iinv = np.asarray(Iinv, dtype=np.float64)
    p = U.shape[1]
    return U + np.einsum("vjkl,vkl->vj", unpack_triples(T, p), Iinv)


def site_firth_partials(g: Any, y: Any, C: Any, beta: Any, *, fill: Any = None,
                        design: SiteDesign | None = None) -> dict[str, np.ndarray]:
    """One site's Firth sums at ``beta``: everything one Firth evaluation needs, in one round.

    Parameters
    ----------
    g, y, C
        As :func:`site_logistic_partials`.
    beta : (V, p) float
        Coefficients to evaluate.
    design : SiteDesign, optional
        As :func:`site_linear_suffstats`.

    Returns
    -------
    dict
        ``I`` (V, p, p) = XᵀVX, ``loglik`` (V,), ``n`` (V,), ``U`` (V, p) = Xᵀ(y − p) and
        ``T`` (V, p(p+1)(p+2)/6) = Σᵢ vᵢ(½ − pᵢ) x_ia x_ib x_ic packed as :func:`firth_triples`
        (v = p(1 − p); missing calls excluded). :func:`firth_score` turns the pooled sums into
        Firth's modified score.
    """
    d = design if design is not None else SiteDesign(y, C)
    g, y, C = d.check(g), d.y, d.C
    beta = np.asarray(beta, dtype=np.float64)
    V, N = g.shape
    k = C.shape[1]
    p = 2 + k
    terms, triples = d.terms, d.triples
    info = np.zeros((V, p, p))
    loglik = np.zeros(V)
    n = np.zeros(V, dtype=np.int64)
    neff = np.zeros(V)
    U = np.zeros((V, p))
    T = np.zeros((V, triples.n_triples))
    for sl in _blocks(V, N):
        M, G = _geno_block(g[sl], _fill_of(fill, sl))
        n[sl] = np.rint(M.sum(1)).astype(np.int64)
        pr, loglik[sl] = _fitted_block(beta[sl], G, C, y=y, M=M)
        v = np.subtract(1.0, pr)
        v *= pr
        w = v * M
        neff[sl] = _effective_n(w)
        terms.hessian(info, sl, w, G)
        w *= 0.5 - pr
        T[sl] = triples.moments(w, G)
        r = np.subtract(y[None, :], pr)
        r *= M
        U[sl] = terms.xt(r, G)
    return {"I": info, "loglik": loglik, "n": n, "neff": neff, "U": U, "T": T}


_F_INIT, _F_SCORE, _F_HALVING, _F_DONE = range(4)  # _F_SCORE: transient within a step


class FirthDriver:
    """PLINK 2's Firth-penalised logistic regression (``FirthRegression``, a logistf port).

    Protocol (aggregator side)::

        drv = FirthDriver(V, p)
        while not drv.done:
            rows = np.flatnonzero(drv.active)
            parts = sum over sites of site_firth_partials(g[rows], y, C, drv.beta[rows])
            drv.step(parts["I"], parts["loglik"], parts["U"], parts["T"])

    One round per evaluation of β. A site returns, at the β it is given, the information I,
    the log-likelihood, the score U = Xᵀ(y − p) and the third moments T that Firth's hat-value
    correction needs (:func:`firth_score`); the driver inverts the pooled I, forms
    ℓ* = ℓ + ½ ln det I, decides (start, accept or halve) and, where the fit takes a Newton
    step, forms U* = U + T·I⁻¹ at that same β and steps at once. No request carries a matrix
    chosen by the aggregator, and a Firth iteration costs one round (plus one per halving)
    instead of two.

    Per variant (PLINK's rules): the step d = I⁻¹U* is scaled so max|d| <= 5; β += d; up to 5
    halvings β -= d 2^-h while ℓ* < ℓ*_old (threshold lowered by 0.999999e-4 once
    max|d| <= 1e-4 and max|U*| < 1e-4); if the 5th halving still fails with max|d| < 1e-3,
    max|U*| < 0.05 and ℓ* >= ℓ*_old - 1e-4, the halvings are undone and the fit "bails".
    Converged when |Δℓ*| <= 1e-4 and (the d/U* test or bail); 25 steps → UNFINISHED.
    SE = sqrt(diag I⁻¹) at the final β.  I singular (Cholesky fails or rcond < 1e-14) →
    FIRTH_CONVERGE_FAIL.

    Parameters
    ----------
    n_variants, n_params : int
    obs_ct : (V,) int, optional
        Reported as ``obs_ct`` by :meth:`results`.
    noise_floor : float, default 1e-7
        ℓ* comparisons ("ℓ* >= threshold") count as true only when ℓ* exceeds the
        threshold by at least this much.  PLINK evaluates ℓ* from float32 fitted values, so
        it cannot resolve smaller gains; treating them as failures makes the halving/"bail"
        exits happen where PLINK's do (0 gives the exact float64 algorithm, which on very
        slowly converging fits runs to UNFINISHED more often than PLINK).
    ladder : bool, default True
        :meth:`evaluations` adds the remaining halvings of a row's step-halving ladder to
        the round (same results, fewer rounds); False evaluates one β per row and round.
    """

    def __init__(self, n_variants: int, n_params: int, *, obs_ct: Any = None,
                 noise_floor: float = 1e-7, ladder: bool = True) -> None:
        V, p = int(n_variants), int(n_params)
        self.n_params = p
        self.noise_floor = noise_floor
        self.beta = np.zeros((V, p))
        self.active = np.ones(V, dtype=bool)
        self.obs_ct = np.zeros(V, np.int64) if obs_ct is None else np.asarray(obs_ct, np.int64)
        self.errcode = np.full(V, ".", dtype=_ERR_DTYPE)
        self.unfinished = np.zeros(V, dtype=bool)
        self.fitted = np.zeros(V, dtype=bool)
        self.rounds = 0
        self._state = np.full(V, _F_INIT, dtype=np.int8)
        self._Iinv = np.full((V, p, p), np.nan)
        self._pll = np.full(V, np.nan)  # penalised log-likelihood at beta
        self._pll_old = np.full(V, np.nan)
        self._thresh = np.full(V, np.nan)
        self._d = np.zeros((V, p))
        self._dmax = np.zeros(V)
        self._gmax = np.zeros(V)
        self._dgc = np.zeros(V, dtype=bool)
        self._bail = np.zeros(V, dtype=bool)
        self._h = np.zeros(V, dtype=np.int64)
        self._maxhs = np.zeros(V, dtype=np.int64)
        self._iter = np.zeros(V, dtype=np.int64)
        self.ladder = ladder
        self._levels: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None = None

    @property
    def done(self) -> bool:
        return not self.active.any()

    def evaluations(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """What to evaluate this round: ``[(rows, beta), ...]``, one entry per level.

        Level 0 is every active row at its β (the protocol above). A row already halving its
        step (a failed ℓ* check, h ≥ 2) is also evaluated, in levels 1, 2, ..., at the β its
        remaining halvings would try, computed exactly as :meth:`step` would compute them. A
        fit near its optimum usually walks the whole ladder (ℓ* gains below the noise floor),
        so its halvings cost one round instead of one each; the path and results are the
        same as one evaluation per round. :meth:`step_levels` takes the sums in this order.
        """
        idx = np.flatnonzero(self.active)
        out = [(idx, self.beta[idx].copy())]
        lad = idx[(self._state[idx] == _F_HALVING) & (self._h[idx] >= 2)]
        if self.ladder and lad.size:
            b = self.beta[lad].copy()
            h = self._h[lad].copy()
            maxhs = self._maxhs[lad]
            d = self._d[lad]
            live = np.ones(lad.size, bool)
            while True:
                live &= h <= maxhs  # at h > maxhs the ladder ends with this evaluation
                if not live.any():
                    break
                b = b - d * np.exp2(-h.astype(np.float64))[:, None]
                h = h + 1
                out.append((lad[live], b[live].copy()))
        self._levels = [(rows, beta, None if k == 0 else self._h[rows] + k) for k, (rows, beta) in enumerate(out)]
        return out

    def step(self, I: Any, loglik: Any, U: Any, T: Any) -> None:
        """Consume the summed sums for the active rows (order of ``np.flatnonzero(active)``)."""
        self._levels = None
        self._consume(np.flatnonzero(self.active), I, loglik, U, T)
        self.rounds += 1

    def step_levels(self, sums: Sequence[tuple[Any, Any, Any, Any]], usable: Sequence[np.ndarray] | None = None) -> None:
        """Consume ``(I, loglik, U, T)`` per level of :meth:`evaluations`. ``usable`` (one mask per
        level) drops speculative rows a site withheld: they are evaluated again next round."""
        levels = self._levels
        if levels is None or len(sums) != len(levels):
            raise ValueError("step_levels needs the sums of every level of evaluations(), in order")
        self._levels = None
        rows0 = levels[0][0]
        self._consume(rows0, *sums[0])
        for k in range(1, len(levels)):
            rows, beta, h = levels[k]
            I, loglik, U, T = (np.asarray(a, dtype=np.float64) for a in sums[k])
            # the rows whose halvings reached exactly this candidate (a row that left the ladder
            # at an earlier level, or whose β differs by a bit, is evaluated next round instead)
            ok = (self.active[rows] & (self._state[rows] == _F_HALVING) & (self._h[rows] == h)
                  & np.all(self.beta[rows] == beta, axis=1))
            if usable is not None:
                ok &= np.asarray(usable[k], bool)
            if ok.any():
                self._consume(rows[ok], I[ok], loglik[ok], U[ok], T[ok])
        self.rounds += 1

    def _consume(self, idx: np.ndarray, I: Any, loglik: Any, U: Any, T: Any) -> None:
        I = np.asarray(I, dtype=np.float64)
        loglik = np.asarray(loglik, dtype=np.float64)
        self._info(idx, I, loglik)
        sc = self._state[idx] == _F_SCORE
        if sc.any():
            rows = idx[sc]
            ustar = firth_score(np.asarray(U, dtype=np.float64)[sc], np.asarray(T, dtype=np.float64)[sc], self._Iinv[rows])
            self._score(rows, ustar)

    def _score(self, rows: np.ndarray, u: np.ndarray) -> None:
        gmax = np.abs(u).max(1)
        d = np.einsum("vij,vj->vi", self._Iinv[rows], u)
        dmax = np.abs(d).max(1)
        big = dmax > 5.0
        if big.any():
            d[big] *= (5.0 / dmax[big])[:, None]
            dmax[big] = 5.0
        self.beta[rows] += d
        dgc = (dmax <= 1e-4) & (gmax < 1e-4)
        self._d[rows] = d
        self._dmax[rows] = dmax
        self._gmax[rows] = gmax
        self._dgc[rows] = dgc
        self._pll_old[rows] = self._pll[rows]
        self._thresh[rows] = np.where(dgc, self._pll[rows] - 0.999999 * 1e-4, self._pll[rows])
        self._h[rows] = 1
        self._maxhs[rows] = 5
        self._state[rows] = _F_HALVING

    def _info(self, rows: np.ndarray, I: np.ndarray, loglik: np.ndarray) -> None:
        inv, logdet, ok = _spd_inverse(I)
        fail = ~ok
        if fail.any():
            self.errcode[rows[fail]] = ERR_FIRTH_FAIL
            self._state[rows[fail]] = _F_DONE
            self.active[rows[fail]] = False
        rows, inv, pll = rows[ok], inv[ok], (loglik + 0.5 * logdet)[ok]
        if not rows.size:
            return
        self._Iinv[rows] = inv
        st = self._state[rows]
        init = st == _F_INIT
        self._pll[rows[init]] = pll[init]
        self._state[rows[init]] = _F_SCORE
        hv = ~init
        if not hv.any():
            return
        r = rows[hv]
        pll = pll[hv]
        self._pll[r] = pll
        h = self._h[r].copy()
        maxhs = self._maxhs[r].copy()
        old = self._pll_old[r]
        thresh = self._thresh[r]
        brk = h > maxhs
        eps = self.noise_floor
        ge = ~brk & (pll - thresh >= eps)
        brk |= ge & (pll - old >= eps)
        maxhs = np.where(ge & ~brk, h, maxhs)
        at_max = ~brk & ~ge & (h == maxhs)
        bail = at_max & (self._dmax[r] < 0.001) & (self._gmax[r] < 0.05) & (pll >= old - 1e-4)
        h = np.where(bail, h - 1, h)
        maxhs = np.where(bail, maxhs - 1, maxhs)
        self._bail[r[bail]] = True
        cont = ~brk
        if cont.any():
            rc = r[cont]
            self.beta[rc] -= self._d[rc] * np.exp2(-h[cont].astype(np.float64))[:, None]
            self._h[rc] = h[cont] + 1
            self._maxhs[rc] = maxhs[cont]
        if brk.any():
            rb = r[brk]
            change = pll[brk] - old[brk]
            conv = (np.abs(change) <= 1e-4) & (self._dgc[rb] | self._bail[rb])
            last = ~conv & (self._iter[rb] == 24)
            fin = conv | last
            self._iter[rb[~fin]] += 1
            self._state[rb[~fin]] = _F_SCORE
            if fin.any():
                rf = rb[fin]
                self._state[rf] = _F_DONE
                self.active[rf] = False
                self.unfinished[rb[last]] = True
                cov32 = self._Iinv[rf].astype(np.float32).astype(np.float64)
                invalid = _invalid_cov(cov32)
                self.errcode[rf[invalid]] = ERR_INVALID
                self.fitted[rf[~invalid]] = True

    def results(self) -> dict[str, np.ndarray]:
        """``beta``, ``se``, ``z``, ``p_ln``, ``errcode``, ``obs_ct`` as :meth:`LogisticDriver.results`."""
        return _wald_results(self.beta[:, 1], self._Iinv[:, 1, 1], self.fitted, self.unfinished,
                             self.errcode, self.obs_ct)


# ======================================================================= covariate checks
def site_covar_ranges(y: Any, C: Any) -> dict[str, np.ndarray]:
    """Per-covariate min/max among this site's cases and controls (combine with min/max).

    Returns
    -------
    dict of (k,) arrays: ``case_min``, ``case_max``, ``ctrl_min``, ``ctrl_max`` (±inf if the
    site has no case or no control).
    """
    y = np.asarray(y, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64).reshape(y.shape[0], -1)
    out = {}
    for name, m in (("case", y > 0.5), ("ctrl", ~(y > 0.5))):
        if m.any():
            out[f"{name}_min"] = C[m].min(0)
            out[f"{name}_max"] = C[m].max(0)
        else:
            out[f"{name}_min"] = np.full(C.shape[1], np.inf)
            out[f"{name}_max"] = np.full(C.shape[1], -np.inf)
    return out


def _combine_ranges(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: (np.min if k.endswith("min") else np.max)(np.stack([p[k] for p in parts]), axis=0)
            for k in parts[0]}


def covariates_separated(ranges: dict[str, np.ndarray]) -> bool:
    """PLINK's ``CheckForSeparatedQtCovar``: some covariate's case and control ranges do not
    overlap or only touch (every variant then goes straight to Firth under firth-fallback)."""
    sep = (ranges["case_min"] >= ranges["ctrl_max"]) | (ranges["ctrl_min"] >= ranges["case_max"])
    return bool(np.any(sep))


def covar_variance_standardize(C: Any) -> np.ndarray:
    """``--covar-variance-standardize`` exactly as PLINK 2 (``PhenoVarianceStandardize``).

    Each column becomes (x - mean) / sd over the samples where it is present (pass **all
    loaded samples**, phenotype-missing ones included, in PLINK's sample order), n - 1
    denominator, with PLINK's shifted sequential sums so values match to the last bit.
    NaN stays NaN.
    """
    C = np.array(C, dtype=np.float64, copy=True)
    if C.ndim == 1:
        C = C[:, None]
    for j in range(C.shape[1]):
        col = C[:, j]
        present = np.flatnonzero(~np.isnan(col))
        if present.size < 2:
            col[present] = np.nan
            continue
        shifted = col[present] - col[present[0]]
        shifted[0] = 0.0
        s = np.cumsum(shifted[1:])[-1]
        ssq = np.cumsum(shifted[1:] * shifted[1:])[-1]
        mean = s / float(present.size)
        numer = ssq - s * mean
        if not numer > 0.0:
            col[present] = np.nan
            continue
        recip = np.sqrt(float(present.size - 1) / numer)
        col[present] = (shifted - mean) * recip
    return C


# =============================================================================== engines
Site = tuple[Any, Any, Any]


def glm_fit(sites: Sequence[Site], *, family: str = "linear", firth_fallback: bool = True,
            a1_is_ref: Any = None, max_corr: float = 0.999, vif_thresh: float = 50.0,
            on_round: Callable[[str, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run the federated protocol in-process: every round, each site computes its partial sums
    and the aggregator adds them (this is exactly what a federation transports).

    Parameters
    ----------
    sites : sequence of (g, y, C)
        Each site's A1 dosages (V, N_s) for the *same* V variants, phenotype (N_s,) and
        covariates (N_s, k), with phenotype/covariate-missing samples removed.
    family : {"linear", "logistic"}
    firth_fallback : bool, default True
        Logistic only: PLINK's default hybrid mode; False = ``no-firth``.
    a1_is_ref, max_corr, vif_thresh
        As :class:`LogisticDriver` / :func:`linear_from_suffstats`.
    on_round : callable, optional
        Called as ``on_round(kind, n_active)`` before each round (for logging/counting).

    Returns
    -------
    dict of (V,) arrays
        ``beta``, ``se``, ``stat`` (T or Z), ``p_ln``, ``errcode``, ``obs_ct`` and, for
        logistic, ``firth`` (the variant was fitted by Firth; PLINK's ``FIRTH?`` = Y).
    """
    if not sites:
        raise ValueError("no sites")
    V = np.asarray(sites[0][0]).shape[0]
    if family == "linear":
        if on_round:
            on_round("linear", V)
        s = _sum_parts([site_linear_suffstats(*site) for site in sites])
        r = linear_from_suffstats(s["XtX"], s["Xty"], s["yty"], s["n"], max_corr=max_corr,
                                  vif_thresh=vif_thresh)
        return {"beta": r["beta"], "se": r["se"], "stat": r["t"], "p_ln": r["p_ln"],
                "errcode": r["errcode"], "obs_ct": r["obs_ct"]}
    if family != "logistic":
        raise ValueError(f"unknown family {family!r}")
    k = _as_inputs(*sites[0])[2].shape[1]
    p = 2 + k
    separated = False
    if k:
        separated = covariates_separated(_combine_ranges([site_covar_ranges(s[1], s[2]) for s in sites]))
    drv = LogisticDriver(V, p, firth_fallback=firth_fallback, covar_separated=separated,
                         a1_is_ref=a1_is_ref, max_corr=max_corr, vif_thresh=vif_thresh)
    while not drv.done:
        rows = np.flatnonzero(drv.active)
        if on_round:
            on_round("logistic", rows.size)
        parts = [site_logistic_partials(np.asarray(g)[rows], y, C, drv.beta[rows], with_loglik=False)
                 for g, y, C in sites]
        s = _sum_parts(parts)
        drv.step(s["H"], s["grad"])
    res = drv.results()
    firth = res["needs_firth"].copy()
    fidx = np.flatnonzero(firth)
    if fidx.size:
        fd = FirthDriver(fidx.size, p, obs_ct=res["obs_ct"][fidx])
        while not fd.done:
            rows = np.flatnonzero(fd.active)
            if on_round:
                on_round("firth", rows.size)
            parts = [site_firth_partials(np.asarray(g)[fidx[rows]], y, C, fd.beta[rows]) for g, y, C in sites]
            s = _sum_parts(parts)
            fd.step(s["I"], s["loglik"], s["U"], s["T"])
        fr = fd.results()
        for key in ("beta", "se", "z", "p_ln", "errcode"):
            res[key][fidx] = fr[key]
    return {"beta": res["beta"], "se": res["se"], "stat": res["z"], "p_ln": res["p_ln"],
            "errcode": res["errcode"], "obs_ct": res["obs_ct"],
            "firth": firth if firth_fallback else np.zeros(V, dtype=bool)}


def glm_pooled(g: Any, y: Any, C: Any, *, family: str = "linear", firth_fallback: bool = True,
               **kw: Any) -> dict[str, np.ndarray]:
    """:func:`glm_fit` on one pooled data set (one "site"); see there for the outputs."""
    return glm_fit([(g, y, C)], family=family, firth_fallback=firth_fallback, **kw)
