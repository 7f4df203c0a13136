"""Differentially private site releases (``privacy=dp``). Noise is added HERE, at the site.

Neighbouring datasets differ by adding or removing one individual (all their variants); the
guarantee of each release holds for the site's own samples against the aggregator and every
other site. The site computes each release's sensitivity and privacy cost itself from the
request's size (never from numbers the aggregator sends), reserves the cost in its ledger
before computing (:mod:`fedgen.site.pipeline`), and draws noise from the operating system's
CSPRNG (:class:`fedgen.privacy.mechanisms.NoiseSource` without a seed).

Treated as public, as in Uhler, Slavković & Fienberg (2013): the site's variant list and its
numbers of samples, cases and controls (they are released exactly by ``site_info`` and
``dp_topk_select``). Everything computed from genotypes is protected.

Releases, for ``v`` requested variants:

``dp_genotype_counts``
    per variant (hom-REF, het, hom-ALT, missing) counts + discrete Gaussian N_Z(0, σ²). One
    person adds 1 to exactly one of the four cells of each variant: L2 sensitivity √v.
    Frequencies, missingness and HWE are post-processing. ρ = v / (2σ²).
``dp_assoc_counts``
    per variant (A1 in cases, A2 in cases, A1 in controls, A2 in controls) + N_Z(0, σ²). One
    person adds (g, 2−g) to one group's pair (or nothing if the call is missing), norm ≤ 2:
    L2 sensitivity 2√v. The allelic χ², OR and P are post-processing. ρ = 4v / (2σ²).
``dp_topk_select``
    the indices of k variants chosen by the one-shot Gumbel mechanism (Durfee & Rogers 2019),
    equivalent to k peeled exponential-mechanism picks of ε₀ each; each pick is ε₀²/8-zCDP
    (bounded range), so ρ = k ε₀² / 8. The score of a variant is the difference between cases
    and controls of a variance-stabilised allele frequency, s = |h(A_case / 2R) − h(A_ctrl / 2S)|,
    with R, S the site's (public) numbers of cases and controls, a missing call counted as no
    copy of A1, and h = arcsin √x continued linearly outside [c, 1 − c] (c = 0.05) so that it is
    L-Lipschitz with L = 1 / (2√(c(1 − c))). Adding or removing one individual moves one allele
    count by at most 2, so s moves by at most Δ = L / min(R, S), whatever the data. Relative to
    the spread of the score without association this is far smaller than the worst-case
    sensitivity of the allelic χ² (dominated by near-empty tables), which is what makes the
    selection useful at moderate ε. For MAF ≥ c the score is the arcsine test (null SD
    √(1/8R + 1/8S)), asymptotically equivalent to the allelic χ².
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from fedgen.analyses import register
from fedgen.analyses.assoc import _design, case_control_allele_counts
from fedgen.analyses.qc import VARIANT_INPUTS, genotype_class_counts
from fedgen.analyses.spec import AnalysisRequest, Spec, arr, meta_count
from fedgen.errors import FedgenError

MAX_TOPK = 1000


def _noise_source():
    """The site's noise source: the OS CSPRNG. (Tests may monkeypatch this to seed it.)"""
    from fedgen.privacy.mechanisms import NoiseSource

    return NoiseSource()


def _positive(params: Mapping[str, Any], key: str) -> float:
    try:
        x = float(params[key])
    except (KeyError, TypeError, ValueError):
        raise FedgenError(f"parameter {key!r} must be a positive number") from None
    if not (math.isfinite(x) and 0 < x <= 1e12):
        raise FedgenError(f"parameter {key!r} must be a positive number (at most 1e12), got {params.get(key)!r}")
    return x


def _sigma_of(req: AnalysisRequest) -> float:
    """The σ of the (single) Gaussian event the pipeline reserved for this request."""
    (event,) = [e for e in req.rules.events if e.get("type") == "gaussian"]
    return float(event["sigma"])


def _noisy(counts: np.ndarray, sigma: float) -> np.ndarray:
    from fedgen.privacy.mechanisms import discrete_gaussian

    return counts + discrete_gaussian(sigma, counts.shape, _noise_source())


# ----------------------------------------------------------------------------- genotype counts


def _genotype_counts_cost(params, dims, node_config) -> list[dict[str, Any]]:
    sigma = _positive(params, "sigma")
    return [{"type": "gaussian", "sigma": sigma, "l2": math.sqrt(max(dims.get("v", 0), 1)), "count": 1}]


@register(
    "dp_genotype_counts",
    Spec(
        params=frozenset({"sigma"}),
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8", "v", 4)},
        meta=frozenset({"n_samples", "sigma", "l2_sensitivity", "mechanism"}),
        contributors=meta_count("n_samples"),
        dp_cost=_genotype_counts_cost,
        doc="per variant (hom-REF, het, hom-ALT, missing) + discrete Gaussian noise; L2 sensitivity √v",
    ),
)
def dp_genotype_counts(cohort: Any, req: AnalysisRequest):
    counts = genotype_class_counts(cohort, req.arrays)
    sigma = _sigma_of(req)
    meta = {"n_samples": req.rules.public_count(cohort, "samples", cohort.n_samples), "sigma": sigma, "l2_sensitivity": math.sqrt(max(len(counts), 1)),
            "mechanism": "discrete Gaussian (Canonne, Kamath & Steinke 2020)"}
    return {"counts": _noisy(counts, sigma)}, meta


# ----------------------------------------------------------------------------- case/control counts


def _binary_design(cohort, req: AnalysisRequest):
    params = req.params
    if str(params.get("kind")) != "binary":
        raise FedgenError("differentially private association releases need a binary phenotype")
    if params.get("covariates") or params.get("site_columns") or params.get("pcs"):
        raise FedgenError("differentially private association releases take no covariates")
    y, _, keep = _design(cohort, {**params, "covariates": [], "site_columns": {}, "pcs": None}, req.rules)
    return y[keep] == 1, keep


def _public_case_counts(cohort, req: AnalysisRequest, case: np.ndarray) -> tuple[int, int]:
    """Cases and controls as they may leave the site (noised and cached under a DP-only policy)."""
    ph = str(req.params.get("phenotype"))
    return (req.rules.public_count(cohort, f"cases:{ph}", int(case.sum())),
            req.rules.public_count(cohort, f"controls:{ph}", int((~case).sum())))


def _assoc_cost(params, dims, node_config) -> list[dict[str, Any]]:
    sigma = _positive(params, "sigma")
    return [{"type": "gaussian", "sigma": sigma, "l2": 2.0 * math.sqrt(max(dims.get("v", 0), 1)), "count": 1}]


DP_ASSOC_PARAMS = frozenset({"phenotype", "kind", "covariates", "site_columns", "pcs"})


@register(
    "dp_assoc_counts",
    Spec(
        params=DP_ASSOC_PARAMS | {"sigma"},
        inputs=VARIANT_INPUTS,
        outputs={"counts": arr("i8", "v", 4)},
        meta=frozenset({"n_cases", "n_controls", "sigma", "l2_sensitivity", "mechanism"}),
        contributors=meta_count("n_cases", "n_controls"),
        dp_cost=_assoc_cost,
        doc="per variant A1/A2 allele counts in cases and controls + discrete Gaussian noise; L2 sensitivity 2√v",
    ),
)
def dp_assoc_counts(cohort: Any, req: AnalysisRequest):
    case, keep = _binary_design(cohort, req)
    counts = case_control_allele_counts(cohort, req.arrays, case, keep)
    sigma = _sigma_of(req)
    n_cases, n_controls = _public_case_counts(cohort, req, case)
    meta = {"n_cases": n_cases, "n_controls": n_controls, "sigma": sigma,
            "l2_sensitivity": 2.0 * math.sqrt(max(len(counts), 1)), "mechanism": "discrete Gaussian (Canonne, Kamath & Steinke 2020)"}
    return {"counts": _noisy(counts, sigma)}, meta


# ----------------------------------------------------------------------------- top-k selection


STABILISE_EDGE = 0.05
LIPSCHITZ = 1.0 / (2.0 * math.sqrt(STABILISE_EDGE * (1.0 - STABILISE_EDGE)))


def stabilised(x: np.ndarray) -> np.ndarray:
    """arcsin √x on [c, 1 − c], continued linearly (slope L) outside it; x clipped to [0, 1]."""
    c = STABILISE_EDGE
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    lo, hi = math.asin(math.sqrt(c)), math.asin(math.sqrt(1.0 - c))
    mid = np.arcsin(np.sqrt(np.clip(x, c, 1.0 - c)))
    return np.where(x < c, lo - LIPSCHITZ * (c - x), np.where(x > 1.0 - c, hi + LIPSCHITZ * (x - (1.0 - c)), mid))


def selection_scores(counts: np.ndarray, n_cases: int, n_controls: int) -> np.ndarray:
    """|h(A_case / 2R) − h(A_ctrl / 2S)| per row of (A1 case, ·, A1 control, ·) counts."""
    c = np.asarray(counts, dtype=np.float64)
    return np.abs(stabilised(c[:, 0] / (2.0 * n_cases)) - stabilised(c[:, 2] / (2.0 * n_controls)))


def selection_sensitivity(n_cases: int, n_controls: int) -> float:
    """Δ of :func:`selection_scores` under adding or removing one individual: L / min(R, S)."""
    return LIPSCHITZ / min(n_cases, n_controls)


def _topk_cost(params, dims, node_config) -> list[dict[str, Any]]:
    eps0 = _positive(params, "epsilon_per_pick")
    k = int(dims["k"])
    if not 1 <= k <= min(MAX_TOPK, max(dims.get("v", 0), 1)):
        raise FedgenError(f"k must be between 1 and the number of requested variants (at most {MAX_TOPK})")
    return [{"type": "zcdp", "rho": eps0 * eps0 / 8.0, "count": k}]


@register(
    "dp_topk_select",
    Spec(
        params=DP_ASSOC_PARAMS | {"k", "epsilon_per_pick"},
        inputs=VARIANT_INPUTS,
        outputs={"selected": arr("i8", "k")},
        param_dims=lambda params, nc: {"k": int(params["k"])},
        limits={"k": MAX_TOPK},
        meta=frozenset({"n_cases", "n_controls", "sensitivity", "gumbel_scale", "epsilon_per_pick", "mechanism"}),
        contributors=meta_count("n_cases", "n_controls"),
        dp_cost=_topk_cost,
        doc="k variant positions chosen by the one-shot Gumbel mechanism on the site's allelic χ²",
    ),
)
def dp_topk_select(cohort: Any, req: AnalysisRequest):
    from fedgen.privacy.mechanisms import gumbel_top_k

    params = req.params
    case, keep = _binary_design(cohort, req)
    if int(case.sum()) < 1 or int((~case).sum()) < 1:
        raise FedgenError("this site has no cases or no controls for the phenotype")
    # The score's denominators are the counts the site publishes (exact, or noised under a DP-only
    # policy): fixed numbers, so the bound L / min(R, S) holds whatever the data, and the Gumbel
    # scale in the reply reveals nothing beyond them.
    n_cases, n_controls = (max(1, x) for x in _public_case_counts(cohort, req, case))
    # A missing call counts as no copy of A1 (fixed denominators 2R, 2S): the bound holds per variant.
    counts = case_control_allele_counts(cohort, req.arrays, case, keep, missing_as_zero=True)
    scores = selection_scores(counts, n_cases, n_controls)
    k = int(params["k"])
    eps0 = _positive(params, "epsilon_per_pick")
    delta_s = selection_sensitivity(n_cases, n_controls)
    sel = gumbel_top_k(scores, k, epsilon_per_pick=eps0, sensitivity=delta_s, source=_noise_source())
    meta = {"n_cases": n_cases, "n_controls": n_controls, "sensitivity": float(delta_s),
            "gumbel_scale": 2.0 * delta_s / eps0, "epsilon_per_pick": eps0,
            "mechanism": "one-shot Gumbel top-k (Durfee & Rogers 2019) on a variance-stabilised allele-frequency difference"}
    return {"selected": np.asarray(sel, dtype=np.int64)}, meta
