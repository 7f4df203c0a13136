"""Site-side training rounds of a federated risk model: the model update is the egress.

``dp_model_update``: from the aggregator's current weights, train the model on this site's
people for one round with DP-SGD (Opacus: Poisson sampling, per-sample clipping, Gaussian
noise) and reply with the new weights. Its privacy cost (sampling rate, noise multiplier,
steps) is declared and charged to the site's ledger before training, like any DP release.

``model_update``: the same without DP. A non-private update can reveal the people it was
computed on (gradient inversion, membership inference), so it is not in the default policy; a
site opts in with ``extra_analyses = ["model_update"]``.

Features: the requested variants' dosages of the scored allele, standardised with the study's
allele frequencies, (g − 2f)/√(2f(1 − f)); a missing call is 0 (the mean) on that scale; then the
design's covariates (standardised with the study's pooled mean and SD, indicators for levels).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from fedgen.analyses import register
from fedgen.analyses.assoc import DESIGN_PARAMS, _design, check_design, design_sample_set
from fedgen.analyses.qc import SUB_BLOCK, VARIANT_INPUTS, _block_args
from fedgen.analyses.spec import AnalysisRequest, Spec, arr, meta_count
from fedgen.errors import FedgenError
from fedgen.learn import models
from fedgen.learn.train import TrainSettings, dpsgd_event, local_round

MAX_FEATURES = 20_000
MAX_ROUNDS = 1000


def _model(params: Mapping[str, Any]) -> tuple[str, int]:
    m = params.get("model")
    if not isinstance(m, Mapping) or m.get("kind") not in models.KINDS:
        raise ValueError(f"'model' must be a mapping with kind in {', '.join(models.KINDS)}")
    hidden = m.get("hidden", 16)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= models.MAX_HIDDEN:
        raise ValueError(f"model.hidden must be a whole number in 1..{models.MAX_HIDDEN}")
    return str(m["kind"]), int(hidden)


def _site_train(params: Mapping[str, Any], site: str) -> dict[str, Any]:
    """The ``train`` settings for this site: per-site values are given as {site: value} maps."""
    t = params.get("train")
    if not isinstance(t, Mapping):
        raise ValueError("'train' must be a mapping")
    out = {}
    for k, v in t.items():
        out[k] = v.get(site) if isinstance(v, Mapping) else v
        if out[k] is None:
            raise ValueError(f"train.{k} has no value for this site")
    return out


def settings_of(params: Mapping[str, Any], site: str, *, dp: bool) -> TrainSettings:
    return TrainSettings.parse({k: v for k, v in _site_train(params, site).items() if k != "remaining_rounds"}, dp=dp)


def _dp_cost(params, dims, node_config) -> list[dict[str, Any]]:
    s = settings_of(params, str(node_config.get("site", "")), dp=True)
    return [dpsgd_event(s)]


def _dp_plan(params, dims, node_config) -> list[dict[str, Any]]:
    """The privacy events of the rounds still to come (this one included): checked before training."""
    site = str(node_config.get("site", ""))
    rounds = _site_train(params, site).get("remaining_rounds", 1)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"train.remaining_rounds must be a whole number in 1..{MAX_ROUNDS}")
    e = dpsgd_event(settings_of(params, site, dp=True))
    return [{**e, "count": e["count"] * rounds}]


def _validate(dp: bool):
    def check(cohort: Any, req: AnalysisRequest) -> None:
        check_design(cohort, req)
        try:
            _model(req.params)
            settings = settings_of(req.params, req.rules.site, dp=dp)
        except ValueError as exc:
            raise FedgenError(f"{req.analysis}: {exc}") from None
        _, _, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules)
        if int(keep.sum()) * settings.sample_rate < 1:  # Opacus' expected batch would be empty
            raise FedgenError(f"{req.analysis}: train.sample_rate is too small for this site (expected batch below one person)")

    return check


def features(cohort: Any, req: AnalysisRequest, keep: np.ndarray) -> np.ndarray:
    """(samples kept, variants) standardised dosages of the scored allele; missing calls at 0."""
    idx, flip = _block_args(cohort, req.arrays)
    f = np.asarray(req.arrays.get("freq"), dtype=np.float64)
    if f.shape != idx.shape or not np.all((f > 0) & (f < 1)):
        raise FedgenError("'freq' must give each feature variant's scored-allele frequency in (0, 1)")
    out = np.empty((int(keep.sum()), len(idx)))
    for s in range(0, len(idx), SUB_BLOCK):
        g = cohort.block(idx[s : s + SUB_BLOCK], flip[s : s + SUB_BLOCK])[:, keep].astype(np.float64)
        ff = f[s : s + SUB_BLOCK, None]
        z = (g - 2 * ff) / np.sqrt(2 * ff * (1 - ff))
        z[g < 0] = 0.0
        out[:, s : s + len(g)] = z.T
    return out


def _update(cohort: Any, req: AnalysisRequest, *, dp: bool):
    kind, hidden = _model(req.params)
    y, C, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules)
    X = np.hstack([features(cohort, req, keep), C[keep]])
    w = np.asarray(req.arrays.get("weights"), dtype=np.float64)
    if w.shape != (models.n_parameters(kind, X.shape[1], hidden=hidden),):
        raise FedgenError("'weights' do not match the model's size for these features and covariates")
    settings = settings_of(req.params, req.rules.site, dp=dp)
    binary = str(req.params.get("kind")) == "binary"
    new = local_round(X, y[keep], w, kind=kind, hidden=hidden, binary=binary, settings=settings)
    n = req.rules.public_count(cohort, f"train:{req.params.get('phenotype')}", int(keep.sum()))
    meta = {"n": n, "steps": settings.steps, "sample_rate": settings.sample_rate, "kind": kind,
            "noise_multiplier": settings.noise_multiplier, "clip": None if not dp else settings.clip,
            "mechanism": "Opacus DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)" if dp else "SGD (no DP)"}
    return {"weights": new}, meta


LEARN_SPEC: dict[str, Any] = dict(
    params=DESIGN_PARAMS | {"model", "train"},
    inputs={**VARIANT_INPUTS, "freq": arr("*", "v"), "weights": arr("*", "w")},
    outputs={"weights": arr("f8", "w")},
    limits={"v": MAX_FEATURES, "w": 10_000_000},
    meta=frozenset({"n", "steps", "sample_rate", "kind", "noise_multiplier", "clip", "mechanism"}),
    contributors=meta_count("n"),
)


@register(
    "dp_model_update",
    Spec(
        **LEARN_SPEC,
        dp_cost=_dp_cost,
        dp_plan=_dp_plan,
        validate=_validate(True),
        doc="one round of DP-SGD (Opacus) from the aggregator's weights; replies the new weights",
    ),
)
def dp_model_update(cohort: Any, req: AnalysisRequest):
    return _update(cohort, req, dp=True)


@register(
    "model_update",
    Spec(
        **LEARN_SPEC,
        sample_sets=design_sample_set,
        families=("g", "x", "gx"),
        validate=_validate(False),
        opt_in_reason="a non-private model update can reveal the people it was computed on (gradient inversion, "
        "membership inference)",
        doc="one round of plain SGD from the aggregator's weights (no DP; opt-in)",
    ),
)
def model_update(cohort: Any, req: AnalysisRequest):
    return _update(cohort, req, dp=False)


def noise_multiplier_for(epsilon: float, delta: float, *, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier z whose ``steps`` DP-SGD steps at ``sample_rate`` cost at most ε (bisection)."""
    from fedgen.privacy.accounting import compose_epsilon

    def eps(z: float) -> float:
        return compose_epsilon([{"type": "dpsgd", "sample_rate": sample_rate, "noise_multiplier": z, "count": steps}], delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise FedgenError(f"no noise multiplier reaches ε = {epsilon:g} with {steps} steps at sampling rate {sample_rate:g}")
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        if eps(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi
