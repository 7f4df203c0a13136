"""Site-side training rounds of a federated risk model: the model update is the egress.

``dp_model_update``: from the aggregator's current weights, train the model on this site's
people for one round with DP-SGD (Opacus: Poisson sampling, per-sample clipping, Gaussian
noise) and reply with the new weights. Its privacy cost (sampling rate, noise multiplier,
steps) is declared and charged to the site's ledger before training, like any DP release.

``model_update``: the same without DP. A non-private update can reveal the people it was
computed on (gradient inversion, membership inference), so it is not in the default policy; a
site opts in with ``extra_analyses = ["model_update"]``.

``dp_model_eval`` / ``model_eval_exact``: the model at the aggregator's weights on this site's
held-out people (the study's split, :func:`holdout`): per-class histograms of the logit (binary)
or Σ(y − ŷ)², Σ(y − c), Σ(y − c)², n (quantitative), with discrete Gaussian noise of L2
sensitivity 1 (charged like any DP release), or exact with small cells merged (opt-in: at chosen
weights exact scores single people out; see ``tests/adversarial/test_model_eval_attack.py``).
Training uses only the people outside the split.

Features: the requested variants' dosages of the scored allele, standardised with the study's
allele frequencies, (g − 2f)/√(2f(1 − f)); a missing call is 0 (the mean) on that scale; then the
design's covariates (standardised with the study's pooled mean and SD, indicators for levels).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from fedgen.analyses import register
from fedgen.analyses.assoc import DESIGN_PARAMS, _design, check_design
from fedgen.analyses.qc import SUB_BLOCK, VARIANT_INPUTS, _block_args
from fedgen.analyses.spec import AnalysisRequest, Spec, arr, meta_count
from fedgen.errors import FedgenError
from fedgen.learn import evaluate, models
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


PLAN_KEYS = ("remaining_rounds", "eval_sigma")


def settings_of(params: Mapping[str, Any], site: str, *, dp: bool) -> TrainSettings:
    return TrainSettings.parse({k: v for k, v in _site_train(params, site).items() if k not in PLAN_KEYS}, dp=dp)


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
    plan = [{**e, "count": e["count"] * rounds}]
    sigma = _site_train(params, site).get("eval_sigma")
    if sigma is not None:  # the evaluation releases the study plans after each of these rounds
        plan.append(eval_event(_sigma(sigma, "train.eval_sigma"), rounds))
    return plan


def _sigma(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not 0.01 <= float(v) <= 1e9:
        raise ValueError(f"{what} must be a number in [0.01, 1e9]")
    return float(v)


def eval_event(sigma: float, count: int = 1) -> dict[str, Any]:
    """One evaluation release: (discrete) Gaussian noise σ on a query of L2 sensitivity 1 (see dp_model_eval)."""
    return {"type": "gaussian", "sigma": float(sigma), "l2": 1.0, "count": int(count)}


def _validate(dp: bool):
    def check(cohort: Any, req: AnalysisRequest) -> None:
        check_design(cohort, req)
        try:
            _model(req.params)
            settings = settings_of(req.params, req.rules.site, dp=dp)
        except ValueError as exc:
            raise FedgenError(f"{req.analysis}: {exc}") from None
        _, _, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules, noised_release=dp)
        keep = training_mask(cohort, req, keep)
        # at a DP-only site on the published (noisy) count: the aggregator picks sample_rate, and a
        # refusal on the exact count would tell N from N - 1 (the count is the one the reply publishes)
        n = (req.rules.public_count(cohort, f"train:{req.params.get('phenotype')}", int(keep.sum()))
             if dp and req.rules.dp_only else int(keep.sum()))
        if n * settings.sample_rate < 1:  # Opacus' expected batch would be empty
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
        g = cohort.block(idx[s : s + SUB_BLOCK], flip[s : s + SUB_BLOCK]).compress(keep, axis=1).astype(np.float64)
        ff = f[s : s + SUB_BLOCK, None]
        z = (g - 2 * ff) / np.sqrt(2 * ff * (1 - ff))
        z[g < 0] = 0.0
        out[:, s : s + len(g)] = z.T
    return out


def _update(cohort: Any, req: AnalysisRequest, *, dp: bool):
    kind, hidden = _model(req.params)
    y, C, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules, noised_release=dp)
    keep = training_mask(cohort, req, keep)
    X = np.hstack([features(cohort, req, keep), C[keep]])
    w = _weights(req, kind, hidden, X.shape[1])
    settings = settings_of(req.params, req.rules.site, dp=dp)
    binary = str(req.params.get("kind")) == "binary"
    new = local_round(X, y[keep], w, kind=kind, hidden=hidden, binary=binary, settings=settings)
    n = req.rules.public_count(cohort, f"train:{req.params.get('phenotype')}", int(keep.sum()))
    meta = {"n": n, "steps": settings.steps, "sample_rate": settings.sample_rate, "kind": kind,
            "noise_multiplier": settings.noise_multiplier, "clip": None if not dp else settings.clip,
            "mechanism": "Opacus DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise)" if dp else "SGD (no DP)"}
    return {"weights": new}, meta


def _weights(req: AnalysisRequest, kind: str, hidden: int, n_features: int) -> np.ndarray:
    w = np.asarray(req.arrays.get("weights"), dtype=np.float64)
    if w.shape != (models.n_parameters(kind, n_features, hidden=hidden),):
        raise FedgenError("'weights' do not match the model's size for these features and covariates")
    return w


# ----------------------------------------------------------------------------- held-out split

HOLDOUT_FILE = "holdout.json"


def _fraction(params: Mapping[str, Any]) -> float:
    f = params.get("holdout", 0)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(float(f)):
        raise FedgenError("'holdout' must be a number")
    f = float(f)
    if f != 0 and not evaluate.MIN_HOLDOUT <= f <= evaluate.MAX_HOLDOUT:
        raise FedgenError(f"'holdout' must be 0 or in [{evaluate.MIN_HOLDOUT}, {evaluate.MAX_HOLDOUT}]")
    return f


def holdout(cohort: Any, req: AnalysisRequest) -> np.ndarray:
    """This site's held-out people for the request's study (mask over the cohort's samples).

    The site computes the split itself (keyed hash of sample ID and study id, fraction from the
    request) and binds the fraction to the study in ``<state_dir>/holdout.json`` the first time
    it trains or evaluates for it: a later request of the same study with another fraction is
    refused, so the evaluated people are never ones the study trained on.
    """
    f = _fraction(req.params)
    study = str(req.study_id or "")
    state = req.rules.state_dir
    if study and state is not None:
        import json
        from pathlib import Path

        from fedgen.fileio import atomic_write_text

        path = Path(state) / HOLDOUT_FILE
        try:
            book = json.loads(path.read_text())
        except (OSError, ValueError):
            book = {}
        if study in book and float(book[study]) != f:
            raise FedgenError(f"{req.analysis}: this study was answered with another held-out fraction; the split is "
                              "fixed for a study (training and evaluation must agree)")
        if study not in book:
            book[study] = f
            Path(state).mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(book))
    elif f > 0:
        raise FedgenError(f"{req.analysis}: a held-out split needs a study id and the site's state folder")
    if f == 0:
        return np.zeros(cohort.n_samples, dtype=bool)
    ids = [cohort.vcf_samples[j] for j in cohort.sample_cols.tolist()]
    return evaluate.holdout_mask(ids, study, f)


def training_mask(cohort: Any, req: AnalysisRequest, keep: np.ndarray) -> np.ndarray:
    """The people a training round uses: the design's people minus the study's held-out ones."""
    return keep & ~holdout(cohort, req)


LEARN_SPEC: dict[str, Any] = dict(
    params=DESIGN_PARAMS | {"model", "train", "holdout"},
    inputs={**VARIANT_INPUTS, "freq": arr("*", "v"), "weights": arr("*", "w")},
    outputs={"weights": arr("f8", "w")},
    limits={"v": MAX_FEATURES, "w": 10_000_000},
    meta=frozenset({"n", "steps", "sample_rate", "kind", "noise_multiplier", "clip", "mechanism"}),
    contributors=meta_count("n"),
    train_message=True,  # model updates travel as Flower train messages (client_app's @app.train())
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


def _training_sample_set(cohort: Any, req: AnalysisRequest) -> list[np.ndarray]:
    _, _, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules)
    return [training_mask(cohort, req, keep)]


@register(
    "model_update",
    Spec(
        **LEARN_SPEC,
        sample_sets=_training_sample_set,
        families=("g", "x", "gx"),
        validate=_validate(False),
        opt_in_reason="a non-private model update can reveal the people it was computed on (gradient inversion, "
        "membership inference)",
        doc="one round of plain SGD from the aggregator's weights (no DP; opt-in)",
    ),
)
def model_update(cohort: Any, req: AnalysisRequest):
    return _update(cohort, req, dp=False)


# ----------------------------------------------------------------------------- evaluation


def _noise_source():
    """The site's noise source: the OS CSPRNG. (Tests may monkeypatch this to seed it.)"""
    from fedgen.privacy.mechanisms import NoiseSource

    return NoiseSource()


def _bins(params: Mapping[str, Any]) -> tuple[float, float, int]:
    b = params.get("bins")
    if not isinstance(b, Mapping):
        raise ValueError("'bins' must be a mapping {lo, hi, n} (the logit window and number of bins)")
    lo, hi, n = b.get("lo"), b.get("hi"), b.get("n")
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or abs(float(v)) > 1e6:
            raise ValueError("bins.lo and bins.hi must be finite numbers")
    if not float(lo) < float(hi):
        raise ValueError("bins.lo must be below bins.hi")
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= evaluate.MAX_BINS:
        raise ValueError(f"bins.n must be a whole number in 2..{evaluate.MAX_BINS}")
    return float(lo), float(hi), int(n)


def _range(params: Mapping[str, Any], *, required: bool) -> tuple[float, float] | None:
    r = params.get("range")
    if r is None and not required:
        return None
    if not isinstance(r, (list, tuple)) or len(r) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) for v in r):
        raise ValueError("'range' must be [lo, hi], the range y and its prediction are clipped to")
    lo, hi = float(r[0]), float(r[1])
    if not lo < hi or max(abs(lo), abs(hi)) > 1e9:
        raise ValueError("'range' must be [lo, hi] with lo < hi")
    return lo, hi


def _eval_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    return {"b": _bins(params)[2] if str(params.get("kind")) == "binary" else 0}


def _eval_validate(dp: bool):
    def check(cohort: Any, req: AnalysisRequest) -> None:
        check_design(cohort, req)
        try:
            _model(req.params)
            if str(req.params.get("kind")) == "binary":
                _bins(req.params)
            else:
                _range(req.params, required=dp)
            if dp:
                _sigma(req.params.get("sigma"), "sigma")
        except ValueError as exc:
            raise FedgenError(f"{req.analysis}: {exc}") from None
        if _fraction(req.params) <= 0:
            raise FedgenError(f"{req.analysis}: evaluation needs the study's held-out split ('holdout' > 0)")

    return check


def _eval_cost(params, dims, node_config) -> list[dict[str, Any]]:
    return [eval_event(_sigma(params.get("sigma"), "sigma"))]


def _eval(cohort: Any, req: AnalysisRequest, *, dp: bool):
    """Score the held-out people with the aggregator's weights; histograms (binary) or R² sums."""
    from fedgen.privacy.mechanisms import discrete_gaussian

    kind, hidden = _model(req.params)
    y, C, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules, noised_release=dp)
    held = keep & holdout(cohort, req)
    n_held = int(held.sum())
    # a DP evaluation at a DP-only site is not refused on the exact held-out count (that would tell
    # N from N - 1): its noise covers any number of people, none included
    if n_held < int(req.rules.min_count) and not (dp and req.rules.dp_only):
        raise FedgenError(f"{req.analysis}: the held-out people at this site are fewer than the site's min_count")
    X = np.hstack([features(cohort, req, held), C[held]])
    w = _weights(req, kind, hidden, X.shape[1])
    out = models.predict(kind, w, X, hidden=hidden, binary=False)  # the linear predictor / logit, or ŷ
    yh = y[held]
    binary = str(req.params.get("kind")) == "binary"
    sigma = float(req.params["sigma"]) if dp else None
    meta: dict[str, Any] = {"kind": kind}
    if binary:
        lo, hi, nb = _bins(req.params)
        b = evaluate.bin_index(out, lo, hi, nb)
        hist = np.zeros((2, nb), dtype=np.int64)
        np.add.at(hist, ((yh == 1).astype(np.int64), b), 1)
        if dp:
            hist = hist + discrete_gaussian(sigma, hist.shape, _noise_source())
            meta.update(sigma=sigma, sensitivity=1.0,
                        mechanism="discrete Gaussian on every cell of the per-class histograms (one person: one cell ±1)")
        else:
            hist, merged = coarsen(hist, int(req.rules.min_cell))
            meta.update(merged_bins=merged, mechanism="exact histograms; bins merged until no cell holds 1..min_cell-1 people")
        arrays = {"hist": hist}
    else:
        rng = _range(req.params, required=dp)
        yy, pp = yh, out
        centre = 0.0
        if rng is not None:
            yy, pp = np.clip(yh, *rng), np.clip(out, *rng)
            centre = 0.5 * (rng[0] + rng[1])
        sums = np.array([((yy - pp) ** 2).sum(), (yy - centre).sum(), ((yy - centre) ** 2).sum(), float(len(yy))])
        if dp:
            # each component k: a person moves it by at most Δ_k (clipped y, ŷ); quantised in units of
            # Δ_k / Q (a neighbour moves the integer by at most Q + 1) and noised with a discrete
            # Gaussian of σ_k = 2σ(Q + 1): Σ_k ((Q + 1)/σ_k)² = 1/σ², the zCDP of one unit-sensitivity
            # release with σ (the event charged).
            delta = np.asarray(evaluate.r2_sensitivities(*rng))
            q = evaluate.R2_QUANTA
            res = delta / q
            noisy = np.round(sums / res).astype(np.int64) + discrete_gaussian(2 * sigma * (q + 1), (4,), _noise_source())
            sums = noisy.astype(np.float64) * res
            meta.update(sigma=sigma, sensitivity=delta.tolist(), noise_sd=(2 * sigma * (q + 1) * res).tolist(),
                        mechanism="discrete Gaussian on the quantised sums (y and prediction clipped to the range)")
        else:
            meta["mechanism"] = "exact sums"
        meta["centre"] = centre
        arrays = {"sums": sums.astype(np.float64)}
    if dp:
        # the aggregate rests on the held-out people; their exact number does not leave the site
        meta["n"] = req.rules.public_count(cohort, f"train:{req.params.get('phenotype')}", int(keep.sum()))
    else:
        meta["n"] = n_held
    return arrays, meta


def coarsen(hist: np.ndarray, min_cell: int) -> tuple[np.ndarray, int]:
    """Merge adjacent bins (left to right) until every bin's per-class cells are 0 or >= min_cell.

    A merged group's counts go to its first non-empty bin (the others hold 0), so the AUC computed from
    the result treats the group as one bin (its pairs count one half: the tie bound grows).
    Returns the histogram and the number of bins merged away.
    """
    h = np.asarray(hist, dtype=np.int64)
    out = np.zeros_like(h)
    ok = lambda c: bool(np.all((c == 0) | (c >= min_cell)))  # noqa: E731
    start, acc, groups = None, np.zeros(h.shape[0], dtype=np.int64), []
    for b in range(h.shape[1]):
        if h[:, b].any() and start is None:
            start = b  # a group's counts go to its first non-empty bin
        acc = acc + h[:, b]
        if acc.any() and ok(acc):
            groups.append((start, acc))
            start, acc = None, np.zeros_like(acc)
    if acc.any():  # a tail that fails the rule joins the last group
        if not groups:
            raise FedgenError("the held-out histograms would rest on a class cell of fewer than min_cell people")
        s0, a0 = groups.pop()
        groups.append((s0, a0 + acc))
    for s0, a0 in groups:
        out[:, s0] = a0
    nonempty = int((h.sum(0) > 0).sum())
    return out, max(0, nonempty - len(groups))


EVAL_SPEC: dict[str, Any] = dict(
    params=DESIGN_PARAMS | {"model", "holdout", "bins", "range"},
    inputs={**VARIANT_INPUTS, "freq": arr("*", "v"), "weights": arr("*", "w")},
    outputs={"hist": arr("i8", 2, "b", optional=True), "sums": arr("f8", 4, optional=True)},
    param_dims=_eval_dims,
    limits={"v": MAX_FEATURES, "w": 10_000_000, "b": evaluate.MAX_BINS},
    contributors=meta_count("n"),
)


@register(
    "dp_model_eval",
    Spec(
        **{**EVAL_SPEC, "params": EVAL_SPEC["params"] | {"sigma"}},
        meta=frozenset({"n", "kind", "sigma", "sensitivity", "noise_sd", "mechanism", "centre"}),
        dp_cost=_eval_cost,
        validate=_eval_validate(True),
        doc="the model at the aggregator's weights on this site's held-out people: per-class histograms of the logit "
        "(binary) or R² sums (quantitative) + discrete Gaussian noise; L2 sensitivity 1",
    ),
)
def dp_model_eval(cohort: Any, req: AnalysisRequest):
    return _eval(cohort, req, dp=True)


def _eval_sample_set(cohort: Any, req: AnalysisRequest) -> list[np.ndarray]:
    _, _, keep = _design(cohort, {**req.params, "missing": "impute"}, req.rules)
    return [keep & holdout(cohort, req)]


@register(
    "model_eval_exact",
    Spec(
        **EVAL_SPEC,
        meta=frozenset({"n", "kind", "merged_bins", "mechanism", "centre"}),
        sample_sets=_eval_sample_set,
        families=("g", "x", "gx"),
        validate=_eval_validate(False),
        opt_in_reason="exact scores at aggregator-chosen weights can isolate one held-out person in a bin or a sum "
        "(their phenotype by differencing across rounds)",
        doc="the model at the aggregator's weights on this site's held-out people, exact: histograms with small cells "
        "merged (binary) or R² sums (quantitative); opt-in",
    ),
)
def model_eval_exact(cohort: Any, req: AnalysisRequest):
    return _eval(cohort, req, dp=False)


def noise_multiplier_for(epsilon: float, delta: float, *, sample_rate: float, steps: int,
                         extra: list[dict[str, Any]] | None = None) -> float:
    """Smallest noise multiplier z whose ``steps`` DP-SGD steps at ``sample_rate`` cost at most ε (bisection),
    composed with the ``extra`` events (e.g. the evaluation releases) when given.

    The search runs on dp_accounting's default RDP orders (a subset of the ledger's, so a z that
    meets ε there meets it on the ledger's full grid too), then refines on the full grid: the
    sampled Gaussian's many fractional orders take seconds each at large sampling rates."""
    from fedgen.privacy.accounting import COARSE_RDP_ORDERS, RDP_ORDERS, compose_epsilon

    def eps(z: float, orders: tuple[float, ...]) -> float:
        return compose_epsilon([{"type": "dpsgd", "sample_rate": sample_rate, "noise_multiplier": z, "count": steps},
                                *(extra or [])], delta, orders=orders)

    def search(lo: float, hi: float, orders: tuple[float, ...], iters: int) -> float:
        for _ in range(iters):
            mid = math.sqrt(lo * hi)
            if eps(mid, orders) > epsilon:
                lo = mid
            else:
                hi = mid
        return hi

    lo, hi = 0.05, 1.0
    while eps(hi, COARSE_RDP_ORDERS) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise FedgenError(f"no noise multiplier reaches ε = {epsilon:g} with {steps} steps at sampling rate {sample_rate:g}"
                              + (" beside the evaluation releases" if extra else ""))
    hi = search(lo, hi, COARSE_RDP_ORDERS, 24)  # meets ε on the full grid too (fewer orders: a looser bound)
    # the full grid's bound is tighter, usually by well under 5 %: find its z on [hi / 1.05, hi]
    # (or below, in the rare case it allows that much less noise) by the Illinois variant of
    # regula falsi in log z, which keeps a bracket and converges in a few evaluations
    lo = hi / 1.05
    f_lo = eps(lo, RDP_ORDERS) - epsilon
    if f_lo <= 0:
        return search(0.05, lo, RDP_ORDERS, 40)
    f_hi = eps(hi, RDP_ORDERS) - epsilon
    side = 0
    for _ in range(40):
        if -f_hi <= 1e-9 * epsilon or hi / lo - 1.0 < 1e-12:
            break
        z = math.exp((math.log(lo) * f_hi - math.log(hi) * f_lo) / (f_hi - f_lo))
        if not lo < z < hi:
            z = math.sqrt(lo * hi)
        f_z = eps(z, RDP_ORDERS) - epsilon
        if f_z > 0:
            lo, f_lo = z, f_z
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            hi, f_hi = z, f_z
            if side == 1:
                f_lo /= 2
            side = 1
    return hi
