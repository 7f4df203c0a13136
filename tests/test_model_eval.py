"""Federated evaluation of risk models on each site's held-out people (issue 15 §3)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CONVENTIONS, qc_plan, split_sites

from fedgen.analyses import execute
from fedgen.analyses.spec import AnalysisRequest, Rules
from fedgen.cohort.cohort import load_cohort
from fedgen.errors import FedgenError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.learn import evaluate, models
from fedgen.learn.score import roc_auc
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.study.learn import _evaluate, model_settings
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

warnings.filterwarnings("ignore", module="opacus")

V = 6
EXACT_POLICY = {"min_count": 1, "extra_analyses": ["model_update", "model_eval_exact"]}


@pytest.fixture(scope="module")
def data():
    return make_synth(600, 120, seed=4, missing_rate=0.01, extremes=False)


def _nodes(data, tmp, policy):
    return split_sites(data, tmp, [0.5, 0.5], seed=3, policy=policy, conventions=CONVENTIONS[1:3])


def _params(phenotype="CC", kind="binary", **kw):
    return {"phenotype": phenotype, "kind": kind, "covariates": [], "missing": "impute",
            "model": {"kind": "logistic", "hidden": 4}, "holdout": 0.3, **kw}


def _arrays(w):
    return {"freq": np.full(V, 0.3), "weights": w}


def _per_site(nodes):
    return {s: {"idx": np.arange(V), "flip": np.zeros(V, np.uint8)} for s in nodes}


def _held_out_truth(nodes, params, w, study):
    """What the held-out people's scores and phenotypes are, computed here from each site's files."""
    from fedgen.analyses.assoc import _design
    from fedgen.analyses.learn import features

    ys, outs, holds = [], [], {}
    for s, nc in nodes.items():
        cohort = load_cohort(nc)
        req = AnalysisRequest("x", params, {"idx": np.arange(V), "flip": np.zeros(V, np.uint8), "freq": np.full(V, 0.3)},
                              rules=Rules(), study_id=study)
        y, _, keep = _design(cohort, params)
        ids = [cohort.vcf_samples[j] for j in cohort.sample_cols.tolist()]
        held = keep & evaluate.holdout_mask(ids, study, params["holdout"])
        holds[s] = held
        outs.append(models.predict("logistic", w, features(cohort, req, held), binary=False))
        ys.append(y[held])
    return np.concatenate(ys), np.concatenate(outs), holds


def test_histogram_auc_equals_the_pooled_auc_within_the_tie_bound(data, tmp_path):
    w = np.random.default_rng(1).normal(0, 0.6, V + 1)
    lo, hi = evaluate.window(w, "logistic", V)
    bounds = {}
    for min_cell in (1, 5):
        nodes = _nodes(data, tmp_path / f"s{min_cell}", {**EXACT_POLICY, "min_cell": min_cell})
        truth_y, truth_out, _ = _held_out_truth(nodes, _params(), w, "ev")
        exact = roc_auc(truth_y, truth_out)
        for n_bins in (200, 20):
            params = _params(bins={"lo": lo, "hi": hi, "n": n_bins})
            reps = InProcessTransport(nodes).query(Request("model_eval_exact", params=params, arrays=_arrays(w),
                                                           per_site_arrays=_per_site(nodes), study_id="ev"))
            got = _evaluate("binary", reps, {})
            assert got["n_eval"] == len(truth_y) == sum(r.meta["n"] for r in reps.values())
            assert got["auc_se"] == 0.0
            assert abs(got["auc"] - exact) <= got["auc_tie_bound"] + 1e-12, (min_cell, n_bins, got, exact)
            bounds[min_cell, n_bins] = (got["auc_tie_bound"], abs(got["auc"] - exact))
    print("tie bound, |AUC_hist - AUC_exact| by (min_cell, bins):", bounds)
    # fine bins without merging: a small bound; merging small cells (min_cell 5) widens it
    assert bounds[1, 200][0] < 0.01 and bounds[5, 200][0] >= bounds[1, 200][0]
    # the tie bound is attained by nothing worse: a single bin makes the AUC 1/2 and the bound 1/2
    h = np.array([[3, 0], [0, 2]])
    assert evaluate.histogram_auc(h[0], h[1]) == (1.0, 0.0)
    assert evaluate.histogram_auc(np.array([5]), np.array([2])) == (0.5, 0.5)


def test_exact_histograms_merge_small_cells(data, tmp_path):
    from fedgen.analyses.learn import coarsen

    h = np.array([[0, 3, 4, 0, 9, 1], [1, 0, 6, 0, 0, 7]])
    out, merged = coarsen(h, 5)
    assert out.sum(1).tolist() == h.sum(1).tolist()
    assert np.all((out == 0) | (out >= 5)) and merged > 0
    nodes = _nodes(data, tmp_path / "s", {**EXACT_POLICY, "min_cell": 5})
    w = np.random.default_rng(2).normal(0, 1.0, V + 1)
    reps = InProcessTransport(nodes).query(Request("model_eval_exact", params=_params(bins={"lo": -4, "hi": 4, "n": 200}),
                                                   arrays=_arrays(w), per_site_arrays=_per_site(nodes), study_id="mc"))
    for r in reps.values():
        hist = r.arrays["hist"]
        assert np.all((hist == 0) | (hist >= 5)) and r.meta["merged_bins"] > 0


def test_pooled_r2_from_summed_residual_statistics(data, tmp_path):
    nodes = _nodes(data, tmp_path / "s", EXACT_POLICY)
    w = np.random.default_rng(3).normal(0, 0.3, V + 1)
    params = _params("QT", "quantitative")
    y, yhat, _ = _held_out_truth(nodes, params, w, "r2")
    exact = 1 - ((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    reps = InProcessTransport(nodes).query(Request("model_eval_exact", params=params, arrays=_arrays(w),
                                                   per_site_arrays=_per_site(nodes), study_id="r2"))
    got = _evaluate("quantitative", reps, {})
    assert got["n_eval"] == len(y) and got["r2_se"] == 0.0
    np.testing.assert_allclose(got["r2"], exact, rtol=1e-10)


def test_held_out_people_are_never_trained_on(data, tmp_path, monkeypatch):
    import fedgen.analyses.learn as L

    nodes = _nodes(data, tmp_path / "s", EXACT_POLICY)
    seen: list[np.ndarray] = []
    real = L.local_round

    def spy(X, y, weights, **kw):
        seen.append(np.asarray(X).copy())
        return real(X, y, weights, **kw)

    monkeypatch.setattr(L, "local_round", spy)
    w0 = models.initial_weights("logistic", V)
    train = {"epochs": 1, "sample_rate": 1.0, "lr": 0.1}
    params = _params(train=train)
    _, _, holds = _held_out_truth(nodes, params, w0, "split")
    for s, nc in nodes.items():
        from fedgen.analyses.assoc import _design
        from fedgen.analyses.learn import features

        for _ in range(2):  # the same split in every round
            out, meta = execute(nc, "model_update", params, {"idx": np.arange(V), "flip": np.zeros(V, np.uint8), **_arrays(w0)},
                                context={"study_id": "split", "message_type": "train"})
        cohort = load_cohort(nc)
        y, _, keep = _design(cohort, params)
        held = holds[s]
        assert held.sum() > 0.2 * keep.sum() and meta["n"] == int((keep & ~held).sum())
        req = AnalysisRequest("x", params, {"idx": np.arange(V), "flip": np.zeros(V, np.uint8), "freq": np.full(V, 0.3)})
        X_all = features(cohort, req, np.ones(cohort.n_samples, bool))
        train_rows = {r.tobytes() for r in seen[-1]}
        held_rows = {r.tobytes() for r in X_all[held & keep]}
        unique_held = held_rows - {r.tobytes() for r in X_all[keep & ~held]}  # rows no trained person shares
        assert len(seen[-1]) == int((keep & ~held).sum()) and unique_held and not (unique_held & train_rows)
        assert seen[-1].shape == seen[-2].shape and np.array_equal(seen[-1], seen[-2])
        # the split is bound to the study at the site: evaluation with another fraction is refused
        with pytest.raises(FedgenError, match="another held-out fraction"):
            execute(nc, "model_eval_exact", _params(holdout=0.5, bins={"lo": -2, "hi": 2, "n": 10}),
                    {"idx": np.arange(V), "flip": np.zeros(V, np.uint8), **_arrays(w0)}, context={"study_id": "split"})
    # and the split is the keyed hash of sample ID and study id, whatever the file order
    ids = [f"P{i}" for i in range(2000)]
    m = evaluate.holdout_mask(ids, "study-a", 0.2)
    assert abs(m.mean() - 0.2) < 0.03 and np.array_equal(m[::-1], evaluate.holdout_mask(ids[::-1], "study-a", 0.2))
    assert not np.array_equal(m, evaluate.holdout_mask(ids, "study-b", 0.2))


def test_dp_evaluation_noise_has_its_stated_sigma(data, tmp_path, monkeypatch):
    import fedgen.analyses.learn as L
    from fedgen.privacy.mechanisms import NoiseSource, discrete_gaussian

    policy = {"min_count": 1, "min_cell": 1, "epsilon_budget": 1e6, "extra_analyses": ["model_eval_exact"]}
    nodes = _nodes(data, tmp_path / "s", policy)
    nc = nodes["site1"]
    w = np.random.default_rng(5).normal(0, 0.5, V + 1)
    sigma = 7.5
    bins = {"lo": -3.0, "hi": 3.0, "n": 1000}
    arrays = {"idx": np.arange(V), "flip": np.zeros(V, np.uint8), **_arrays(w)}
    exact, _ = execute(nc, "model_eval_exact", _params(bins=bins), arrays, context={"study_id": "noise"})
    monkeypatch.setattr(L, "_noise_source", lambda: NoiseSource(42))
    noisy, meta = execute(nc, "dp_model_eval", _params(bins=bins, sigma=sigma), arrays, context={"study_id": "noise"})
    noise = noisy["hist"] - exact["hist"]
    np.testing.assert_array_equal(noise, discrete_gaussian(sigma, (2, 1000), NoiseSource(42)))
    assert abs(noise.std() / sigma - 1) < 0.05 and abs(noise.mean()) < 4 * sigma / math.sqrt(2000)
    assert meta["sigma"] == sigma and meta["privacy"]["events"] == [{"type": "gaussian", "sigma": sigma, "l2": 1.0, "count": 1}]
    # R² sums: the noise SD stated per sum is the one drawn
    rng = [-3.0, 3.0]
    ex, _ = execute(nc, "model_eval_exact", _params("QT", "quantitative", range=rng), arrays, context={"study_id": "noise"})
    draws = []
    for k in range(300):
        monkeypatch.setattr(L, "_noise_source", lambda k=k: NoiseSource(1000 + k))
        out, m = execute(nc, "dp_model_eval", _params("QT", "quantitative", range=rng, sigma=sigma), arrays,
                         context={"study_id": f"noise{k}"})  # one study each: a repeat within one is replayed
        draws.append(out["sums"] - ex["sums"])
    sd = np.asarray(m["noise_sd"])
    q = evaluate.R2_QUANTA
    np.testing.assert_allclose(sd, 2 * sigma * (q + 1) * np.asarray(evaluate.r2_sensitivities(*rng)) / q)
    np.testing.assert_allclose(np.std(draws, axis=0) / sd, 1, atol=0.15)


def test_dp_ledger_is_opacus_training_plus_evaluation_within_the_study_epsilon(data, tmp_path):
    from opacus.accountants import RDPAccountant

    nodes = _nodes(data, tmp_path / "s", {"min_count": 1})
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "model"], phenotypes=["CC"],
                   covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0, missing="impute")
    eps = 2.0
    plan["model"] = model_settings({"phenotype": "CC", "variants": "top:6", "rounds": 3, "epsilon": eps, "batch": 64})
    manifest = run_plan(plan, InProcessTransport(nodes))
    m = manifest["model"]
    ev = m["evaluation"]
    assert ev["analysis"] == "dp_model_eval" and abs(ev["epsilon"] - 0.1 * eps) < 1e-12
    assert [r["round"] for r in m["evaluation_per_round"]] == [1, 2, 3]
    assert all(0 <= r["auc"] <= 1 and r["auc_se"] > 0 for r in m["evaluation_per_round"])
    for s, nc in nodes.items():
        led = Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=10, delta=1e-6)
        acc = RDPAccountant()
        acc.history = [(m["noise_multiplier"][s], m["sample_rate"][s], m["steps_per_round"][s] * 3),
                       (ev["sigma"], 1.0, 3)]  # 3 evaluation releases: Gaussian, no subsampling, sensitivity 1
        spent = led.spent()["epsilon"]
        np.testing.assert_allclose(spent, acc.get_epsilon(1e-6), rtol=2e-3)
        assert spent <= eps + 1e-9 and spent > 0.99 * eps and abs(m["site_epsilon_spent"][s] - spent) < 1e-9
        releases = [r for r in manifest["sites"][s]["privacy_releases"] if r["analysis"] == "dp_model_eval"]
        assert len(releases) == 3
    # each round's evaluation is a query round of its own after its training round
    curve = [c for c in __import__("json").loads((tmp_path / "out" / "model" / "model.json").read_text())["training"]["curve"]]
    assert all("auc" in c and "auc_tie_bound" in c for c in curve)
    card = (tmp_path / "out" / "model" / "card.md").read_text()
    assert "| round | AUC | noise SE | tie bound | people |" in card and f"σ = {ev['sigma']:.4g}" in card
    from fedgen.results import load_results

    df = load_results(tmp_path / "out").model_curve()
    assert {"auc", "auc_se", "auc_tie_bound", "n_eval"} <= set(df.columns) and len(df) == 3


def test_exact_evaluation_of_a_non_private_model_needs_the_opt_in(data, tmp_path):
    for policy, want in (({"min_count": 1, "extra_analyses": ["model_update"]}, None),
                         (EXACT_POLICY, "model_eval_exact")):
        nodes = _nodes(data, tmp_path / str(bool(want)), policy)
        plan = qc_plan(tmp_path / f"out{bool(want)}", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "model"],
                       phenotypes=["CC"], covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0,
                       missing="impute")
        plan["model"] = model_settings({"phenotype": "CC", "variants": "top:5", "rounds": 2, "dp": False})
        m = run_plan(plan, InProcessTransport(nodes))["model"]
        assert m["evaluation"]["analysis"] == want
        if want:
            assert len(m["evaluation_per_round"]) == 2 and all(r["auc_se"] == 0 for r in m["evaluation_per_round"])
        else:
            assert "model_eval_exact" in m["evaluation"]["note"] and not m["evaluation_per_round"]
