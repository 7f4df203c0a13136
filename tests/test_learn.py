"""Federated risk models: DP-SGD rounds through the site pipeline, FedAvg, export and scoring."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CONVENTIONS, qc_plan, run_notebook, split_sites

from fedgen.analyses import execute
from fedgen.cohort.cohort import load_cohort
from fedgen.errors import FedgenError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.learn import models
from fedgen.learn.score import load_model, score_cohort
from fedgen.learn.train import TrainSettings, local_round
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.study.learn import model_settings
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

warnings.filterwarnings("ignore", module="opacus")


@pytest.fixture(scope="module")
def data():
    return make_synth(600, 120, seed=4, missing_rate=0.01, extremes=False)


def _nodes(data, tmp, policy):
    return split_sites(data, tmp, [0.5, 0.5], seed=3, policy=policy, conventions=CONVENTIONS[1:3])


def _request(kind, n_var, weights, train, *, analysis="dp_model_update"):
    params = {"phenotype": "CC", "kind": "binary", "covariates": [], "missing": "impute", "model": {"kind": kind, "hidden": 4},
              "train": train}
    return Request(analysis, params=params,
                   arrays={"freq": np.full(n_var, 0.3), "weights": weights},
                   per_site_arrays={}, study_id="learn")


def test_ledger_charges_what_opacus_accounts(data, tmp_path):
    from opacus.accountants import RDPAccountant

    nodes = _nodes(data, tmp_path / "s", {"min_count": 1})
    nc = nodes["site1"]
    idx = {"idx": np.arange(5), "flip": np.zeros(5, np.uint8)}
    train = {"epochs": 2, "sample_rate": 0.1, "lr": 0.1, "clip": 1.0, "noise_multiplier": 1.3, "remaining_rounds": 1}
    params = {"phenotype": "CC", "kind": "binary", "covariates": [], "model": {"kind": "logistic", "hidden": 4}, "train": train}
    w0 = models.initial_weights("logistic", 5)
    out, meta = execute(nc, "dp_model_update", params, {**idx, "freq": np.full(5, 0.3), "weights": w0},
                        context={"study_id": "acc", "message_type": "train"})
    assert out["weights"].shape == w0.shape and not np.allclose(out["weights"], w0)
    assert meta["steps"] == 20 and meta["privacy"]["events"][0]["type"] == "dpsgd"
    acc = RDPAccountant()
    acc.history = [(1.3, 0.1, 20)]
    ledger = Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=10, delta=1e-6)
    np.testing.assert_allclose(ledger.spent()["epsilon"], acc.get_epsilon(1e-6), rtol=1e-3)


def test_training_refuses_a_budget_too_small_for_the_planned_rounds(data, tmp_path):
    nodes = _nodes(data, tmp_path / "s", {"min_count": 1, "epsilon_budget": 1.0})
    nc = nodes["site1"]
    train = {"epochs": 1, "sample_rate": 0.2, "lr": 0.1, "clip": 1.0, "noise_multiplier": 1.0, "remaining_rounds": 50}
    params = {"phenotype": "CC", "kind": "binary", "covariates": [], "model": {"kind": "logistic", "hidden": 4}, "train": train}
    arrays = {"idx": np.arange(3), "flip": np.zeros(3, np.uint8), "freq": np.full(3, 0.3), "weights": np.zeros(4)}
    with pytest.raises(FedgenError, match="remaining privacy budget is too small for the planned rounds"):
        execute(nc, "dp_model_update", params, arrays, context={"study_id": "tight", "message_type": "train"})
    assert Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=1.0, delta=1e-6).spent()["releases"] == 0
    # and a non-private update is not in the default policy
    nodes = _nodes(data, tmp_path / "d", None)
    with pytest.raises(FedgenError, match="'model_update' is not allowed by the site's policy .*opt-in"):
        execute(nodes["site1"], "model_update", {**params, "train": {"epochs": 1, "sample_rate": 1.0, "lr": 0.1}}, arrays,
                context={"message_type": "train"})


def test_fedavg_of_one_full_batch_epoch_equals_the_central_update(data, tmp_path):
    """With DP off, flwr's FedAvg (aggregate_train, by num-examples) of one full-batch local epoch
    per site equals one step on the pooled people (unequal sizes here; equal-size sites over the
    Flower path: tests/test_train_messages.py)."""
    from fedgen.analyses.assoc import _design
    from fedgen.analyses.learn import features
    from fedgen.analyses.spec import AnalysisRequest
    from fedgen.federation.train import fedavg as flower_fedavg

    nodes = _nodes(data, tmp_path / "s", {"min_count": 1, "extra_analyses": ["model_update"]})
    v = 6
    idx = {s: {"idx": np.arange(v), "flip": np.zeros(v, np.uint8)} for s in nodes}
    w0 = models.initial_weights("mlp", v, hidden=4, seed=2)
    train = {"epochs": 1, "sample_rate": 1.0, "lr": 0.3}
    params = {"phenotype": "CC", "kind": "binary", "covariates": [], "missing": "impute",
              "model": {"kind": "mlp", "hidden": 4}, "train": train}
    reps = InProcessTransport(nodes).train(Request("model_update", params=params, arrays={"freq": np.full(v, 0.3), "weights": w0},
                                                   per_site_arrays=idx, study_id="fedavg"))
    fedavg = flower_fedavg(reps, 1)
    Xs, ys = [], []
    for s, nc in nodes.items():
        cohort = load_cohort(nc)
        req = AnalysisRequest("model_update", params, {**idx[s], "freq": np.full(v, 0.3)})
        y, _, keep = _design(cohort, params)
        Xs.append(features(cohort, req, keep))
        ys.append(y[keep])
    central = local_round(np.vstack(Xs), np.concatenate(ys), w0, kind="mlp", hidden=4, binary=True,
                          settings=TrainSettings.parse(train, dp=False))
    np.testing.assert_allclose(fedavg, central, rtol=1e-10, atol=1e-12)


def test_risk_model_study_exports_a_model_that_fedgen_score_reproduces(data, tmp_path, monkeypatch):
    import fedgen.analyses.learn as site_learn

    # record each site's training design (its people and the features it trained on) as it trains
    trained: dict[str, dict] = {}
    last: dict[str, object] = {}
    features, train_round = site_learn.features, site_learn.local_round

    def recording_features(cohort, req, keep):  # also called by the evaluation: kept only if training follows
        last.update(site=cohort.site, ids=[cohort.vcf_samples[j] for j in cohort.sample_cols[keep].tolist()])
        return features(cohort, req, keep)

    def recording_round(X, *args, **kw):
        trained[last["site"]] = {"ids": last["ids"], "X": np.array(X)}
        return train_round(X, *args, **kw)

    monkeypatch.setattr(site_learn, "features", recording_features)
    monkeypatch.setattr(site_learn, "local_round", recording_round)
    nodes = _nodes(data, tmp_path / "s", {"min_count": 1})
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "model"], phenotypes=["CC"],
                   covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0, missing="impute")
    plan["model"] = model_settings({"phenotype": "CC", "variants": "top:8", "rounds": 2, "covariates": ["age"], "epsilon": 2.0,
                                    "holdout": 0.0})
    manifest = run_plan(plan, InProcessTransport(nodes))
    m = manifest["model"]
    assert m["features"] <= 8 and m["dp"] and all(abs(e - 2.0) < 1e-6 for e in m["site_epsilon_spent"].values())
    model = load_model(tmp_path / "out" / "model")
    card = (tmp_path / "out" / "model" / "card.md").read_text()
    assert "DP-SGD" in card and "clipping norm 1.0" in card
    assert model["covariate_columns"] == ["age"] and len(model["weights"]) == len(model["variants"]) + 2
    # scoring a site's own data (a chr-prefixed BCF; a gzip VCF with swapped REF/ALT rows) equals the
    # model applied to features built here from the simulated truth
    where = {(c, int(p)): j for j, (c, p) in enumerate(zip(data.chrom, data.pos.tolist()))}
    col = {s: i for i, s in enumerate(data.samples)}
    for s, nc in nodes.items():
        cohort = load_cohort(nc)
        iids, scores, missing = score_cohort(model, cohort)
        assert not missing
        cols = np.asarray([col[i] for i in iids])
        Z = []
        for v in model["variants"]:
            j = where[(v["chrom"], v["pos"])]
            g = data.dosage[j, cols].astype(float)
            g = np.where(g < 0, g, g if v["scored_allele"] == data.alt[j] else 2 - g)
            z = (g - 2 * v["freq"]) / np.sqrt(2 * v["freq"] * (1 - v["freq"]))
            Z.append(np.where(g < 0, 0.0, z))
        age = cohort.sample_values("age")
        cv = model["covariates"][0]
        X = np.column_stack([*Z, (age - cv["mean"]) / cv["sd"]])
        want = models.predict("logistic", np.asarray(model["weights"]), np.nan_to_num(X), binary=True)
        ok = np.isfinite(age)
        np.testing.assert_allclose(scores[ok], want[ok], rtol=1e-12)
        assert np.all(np.isnan(scores[~ok]))
    # fedgen score on a site's own data reproduces the scores of the final model on the very
    # design matrix the site trained on (same people, same standardised features and covariates)
    for s, nc in nodes.items():
        rec = trained[s]
        assert "X" in rec and rec["X"].shape == (len(rec["ids"]), len(model["variants"]) + 1)
        at_training = models.predict("logistic", np.asarray(model["weights"]), rec["X"], binary=True)
        iids, scores, _ = score_cohort(model, load_cohort(nc))
        by_id = dict(zip(iids, scores.tolist()))
        np.testing.assert_allclose([by_id[i] for i in rec["ids"]], at_training, rtol=1e-12)
    # the score CLI writes IID, SCORE and reports the AUC against the phenotype
    from fedgen.cli import main

    nc = nodes["site2"]
    out = tmp_path / "scores.tsv"
    assert main(["score", "--model", str(tmp_path / "out" / "model"), "--vcf", nc["vcf"], "--samples", nc["samples"],
                 "--out", str(out), "--phenotype", "CC"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "IID\tSCORE" and len(rows) == load_cohort(nc).n_samples + 1


def test_risk_model_notebook_executes(data, tmp_path):
    nodes = _nodes(data, tmp_path / "s", {"min_count": 1})
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "model"], phenotypes=["CC"],
                   covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0, missing="impute")
    plan["model"] = model_settings({"phenotype": "CC", "variants": "top:5", "rounds": 2, "epsilon": 2.0})
    run_plan(plan, InProcessTransport(nodes))
    from fedgen.results import load_results

    res = load_results(tmp_path / "out")
    assert len(res.model_curve()) == 2 and len(res.model_weights()) == len(res.model["variants"]) + 1
    text = run_notebook("02_risk_model", tmp_path, RESULTS=str(tmp_path / "out"), VCF=nodes["site1"]["vcf"],
                        SAMPLES=nodes["site1"]["samples"])
    assert "2 rounds over 2 sites, DP-SGD: True" in text and "scored " in text
