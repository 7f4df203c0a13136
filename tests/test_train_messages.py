"""Model updates travel as Flower ``train`` messages (``@app.train()``), through the site pipeline,
and are combined with ``flwr.serverapp.strategy.FedAvg``: wire layout, refusals, the FedAvg
result, and a risk-model study over the Flower transport (a fake Grid running fedgen's ClientApp)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CONVENTIONS, qc_plan, split_sites
from test_federation_flower import FakeGrid, _task_identity

from fedgen.errors import FedgenError, SiteError
from fedgen.federation.flower import FlowerTransport
from fedgen.federation.train import (
    WEIGHT_KEY,
    decode_train_reply,
    decode_train_request,
    encode_train_reply,
    encode_train_request,
    fedavg,
)
from fedgen.federation.transport import InProcessTransport, Reply, Request
from fedgen.learn import models
from fedgen.site import audit
from fedgen.testing import make_synth

warnings.filterwarnings("ignore", module="opacus")

__all__ = ["_task_identity"]  # the Message-building fixture, applied to every test here (autouse)

POLICY = {"min_count": 1, "extra_analyses": ["model_update"]}


@pytest.fixture(scope="module")
def data():
    d = make_synth(240, 60, seed=7, missing_rate=0.0, extremes=False)
    d.pheno["CC"] = np.nan_to_num(d.pheno["CC"], nan=1.0)  # no missing trait: equal-size sites train on 120 each
    return d


class RecordingGrid(FakeGrid):
    """The fake Grid, noting the type of every message it carries (and the replies' record names)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.types: list[str] = []
        self.reply_records: list[tuple[list[str], list[str]]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.types += [str(m.metadata.message_type) for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        for m in out:
            self.reply_records.append((list(m.content.array_records), list(m.content.metric_records)))
        return out


def _grid(nodes):
    return RecordingGrid({10 + k: nc for k, nc in enumerate(nodes.values())})


def _update(v, w0, *, analysis="model_update", train=None):
    params = {"phenotype": "CC", "kind": "binary", "covariates": [], "missing": "impute",
              "model": {"kind": "logistic", "hidden": 4}, "train": train or {"epochs": 1, "sample_rate": 1.0, "lr": 0.3}}
    return Request(analysis, params=params, arrays={"freq": np.full(v, 0.3), "weights": w0},
                   per_site_arrays={}, study_id="train-msg")


def test_train_wire_layout_round_trips_and_rejects_malformed():
    w = np.array([0.5, -1.0, 2.0])
    rd = encode_train_request("dp_model_update", {"a": 1}, {"weights": w, "idx": np.arange(3)}, study_id="s")
    assert list(rd.array_records) == ["arrays"] and list(rd.config_records) == ["config"]  # FedAvg's default keys
    analysis, params, arrays, sid = decode_train_request(rd)
    assert (analysis, params, sid) == ("dp_model_update", {"a": 1}, "s")
    np.testing.assert_array_equal(arrays["weights"], w)
    np.testing.assert_array_equal(arrays["idx"], np.arange(3))
    rep = encode_train_reply({"weights": w}, {"n": 7, "steps": 1})
    assert rep.metric_records["metrics"][WEIGHT_KEY] == 7
    arrays, meta, nbytes = decode_train_reply(rep)
    np.testing.assert_array_equal(arrays["weights"], w)
    assert meta["n"] == 7 and nbytes > w.nbytes
    from flwr.app import Array, ArrayRecord, RecordDict

    bad = RecordDict({"config": rd.config_records["config"],
                      "arrays": ArrayRecord({"weights": Array(w), "extra": Array(w)})})
    with pytest.raises(FedgenError, match="exactly one ArrayRecord"):
        decode_train_request(bad)
    with pytest.raises(FedgenError, match="ConfigRecord 'config'"):
        decode_train_request(RecordDict())
    rep.metric_records["metrics"][WEIGHT_KEY] = 70  # the weight FedAvg uses must be the reply's own n
    with pytest.raises(FedgenError, match="differs from the reply's n"):
        decode_train_reply(rep)


def test_fedavg_is_flowers_weighted_average():
    r = {"a": Reply("a", {"weights": np.array([1.0, 2.0])}, {"n": 1}),
         "b": Reply("b", {"weights": np.array([3.0, 4.0])}, {"n": 3})}
    np.testing.assert_allclose(fedavg(r, 1), [2.5, 3.5], rtol=0, atol=1e-15)
    with pytest.raises(FedgenError, match="no site has people"):
        fedavg({"a": Reply("a", {"weights": np.zeros(2)}, {"n": 0})}, 1)


def test_flower_path_sends_train_messages_and_fedavg_equals_the_central_average(data, tmp_path):
    """Two equal-size sites, DP off, one full-batch local epoch: the Flower path sends ``train``
    messages, each site's @app.train() answers through its pipeline (audited as a train message),
    and FedAvg of the replies equals the in-process path and the centrally computed step."""
    from fedgen.analyses.assoc import _design
    from fedgen.analyses.learn import features
    from fedgen.analyses.spec import AnalysisRequest
    from fedgen.cohort.cohort import load_cohort
    from fedgen.learn.train import TrainSettings, local_round

    nodes = split_sites(data, tmp_path / "s", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    v = 5
    w0 = models.initial_weights("logistic", v, seed=2)
    grid = _grid(nodes)
    t = FlowerTransport(grid, expected_sites=list(nodes), connect_timeout=2, timeout=60)
    grid.types.clear()
    grid.reply_records.clear()
    req = _update(v, w0)
    req.per_site_arrays = {s: {"idx": np.arange(v), "flip": np.zeros(v, np.uint8)} for s in nodes}
    reps = t.train(req)
    assert grid.types == ["train", "train"]
    assert grid.reply_records == [(["arrays"], ["metrics"])] * 2
    n = {s: r.meta["n"] for s, r in reps.items()}
    assert n == {"site1": 120, "site2": 120}
    flower = fedavg(reps, 1)
    # the in-process path answers the same through the same pipeline
    local = fedavg(InProcessTransport(nodes).train(req), 1)
    np.testing.assert_allclose(flower, local, rtol=0, atol=1e-15)
    Xs, ys = [], []
    for s, nc in nodes.items():
        cohort = load_cohort(nc)
        areq = AnalysisRequest("model_update", req.params, {**req.arrays_for(s)})
        y, _, keep = _design(cohort, req.params)
        Xs.append(features(cohort, areq, keep))
        ys.append(y[keep])
    central = local_round(np.vstack(Xs), np.concatenate(ys), w0, kind="logistic", hidden=4, binary=True,
                          settings=TrainSettings.parse(req.params["train"], dp=False))
    np.testing.assert_allclose(flower, central, rtol=1e-10, atol=1e-12)
    assert not np.allclose(flower, w0)
    for nc in nodes.values():  # each site audited the update it sent as a train message
        sent = [e for e in audit.read(Path(nc["state_dir"])) if e.get("analysis") == "model_update"]
        assert sent and all(e["message_type"] == "train" and e["decision"] == "sent" for e in sent)


def test_a_model_update_travels_only_as_a_train_message_and_a_train_message_only_carries_one(data, tmp_path):
    """No bypass either way: a model update sent as a query is refused, and so is any other
    analysis sent as a train message (it would otherwise skip the query path's expectations)."""
    nodes = split_sites(data, tmp_path / "s", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    v = 4
    grid = _grid(nodes)
    t = FlowerTransport(grid, expected_sites=list(nodes), connect_timeout=2, timeout=60)
    req = _update(v, np.zeros(v + 1))
    req.per_site_arrays = {s: {"idx": np.arange(v), "flip": np.zeros(v, np.uint8)} for s in nodes}
    with pytest.raises(SiteError, match="a model update travels as a 'train' message"):
        t.query(req)
    with pytest.raises(SiteError, match="a model update travels as a 'train' message"):
        t.query_many([req, Request("ping")])
    counts = Request("genotype_counts", arrays={"idx": np.arange(v), "flip": np.zeros(v, np.uint8),
                                                "weights": np.zeros(1)})
    with pytest.raises(SiteError, match="message type 'train' is not one this site answers for 'genotype_counts'"):
        t.train(counts)
    with pytest.raises(SiteError, match="message type 'train' is not one this site answers for 'genotype_counts'"):
        InProcessTransport(nodes).train(counts)
    for nc in nodes.values():
        ref = [e for e in audit.read(Path(nc["state_dir"])) if e["decision"] == "refused"]
        assert {e["message_type"] for e in ref} == {"query.fedgen", "train"} and all(e["bytes"] == 0 for e in ref)
        assert not [e for e in audit.read(Path(nc["state_dir"])) if e["decision"] == "sent"
                    and e.get("analysis") in ("model_update", "genotype_counts")]


def _study(out, *, dp=False):
    plan = qc_plan(out, ["site1", "site2"], analyses=["freq", "missing", "hardy", "assoc", "model"], phenotypes=["CC"],
                   covariates=[], qc={"maf": 0.05, "geno": None, "hwe": None}, pca=None, pcs=0, missing="impute")
    from fedgen.study.learn import model_settings

    plan["model"] = model_settings({"phenotype": "CC", "variants": "top:4", "rounds": 2 if not dp else 3, "dp": dp,
                                    "holdout": 0, "epsilon": 2.0,
                                    "batch": 1000})  # full batches: deterministic without DP, fast accounting with
    return plan


def test_risk_model_study_over_flower_trains_with_train_messages(data, tmp_path):
    """A whole risk-model study on the Flower transport: every model round is a train message and
    the model equals the in-process run's."""
    from fedgen.study.runner import run_plan

    nodes = split_sites(data, tmp_path / "s", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    grid = _grid(nodes)
    run_plan(_study(tmp_path / "flower"), FlowerTransport(grid, expected_sites=list(nodes), connect_timeout=2, timeout=60))
    assert grid.types.count("train") == 2 * 2  # 2 rounds × 2 sites; everything else is a query
    assert set(grid.types) == {"train", "query.fedgen"}
    flower = json.loads((tmp_path / "flower" / "model" / "model.json").read_text())
    inproc = split_sites(data, tmp_path / "i", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    run_plan(_study(tmp_path / "inproc"), InProcessTransport(inproc))
    local = json.loads((tmp_path / "inproc" / "model" / "model.json").read_text())
    np.testing.assert_allclose(flower["weights"], local["weights"], rtol=1e-12)
    assert flower["training"]["curve"][0]["bytes"]["site1"] > 8 * len(flower["weights"])


class Killed(BaseException):
    """The aggregator dies here."""


class KillAtTrain(InProcessTransport):
    def __init__(self, nodes, kill_at=None):
        super().__init__(nodes)
        self.kill_at, self.trains = kill_at, 0

    def train(self, request):
        self.trains += 1
        out = super().train(request)
        if self.trains == self.kill_at:
            raise Killed()  # after the sites answered (and charged) this round
        return out


def test_dp_training_killed_mid_way_resumes_from_the_journal_without_charging_twice(data, tmp_path):
    from fedgen.privacy.ledger import LEDGER_FILE, Ledger
    from fedgen.study.runner import run_plan

    def eps(nodes):
        return {s: Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=100, delta=1e-6).spent()["epsilon"]
                for s, nc in nodes.items()}

    ref_nodes = split_sites(data, tmp_path / "r", [0.5, 0.5], seed=3, policy={"min_count": 1}, conventions=CONVENTIONS[1:3])
    ref = KillAtTrain(ref_nodes)
    run_plan(_study(tmp_path / "ref", dp=True), ref)
    nodes = split_sites(data, tmp_path / "s", [0.5, 0.5], seed=3, policy={"min_count": 1}, conventions=CONVENTIONS[1:3])
    plan = _study(tmp_path / "out", dp=True)
    with pytest.raises(Killed):
        run_plan(dict(plan), KillAtTrain(nodes, kill_at=2))
    again = KillAtTrain(nodes)
    manifest = run_plan(dict(plan), again)
    assert again.trains == 2  # round 1 replayed from the journal; rounds 2 (never journaled) and 3 asked live
    assert manifest["resumed"]["rounds_replayed"] > 0
    a = json.loads((tmp_path / "ref" / "model" / "model.json").read_text())["training"]["site_epsilon_spent"]
    b = manifest["model"]["site_epsilon_spent"]
    # the killed round 2 was released, then asked again: the site replays its earlier release, uncharged
    assert b == pytest.approx(a, rel=1e-9) and eps(nodes) == pytest.approx(eps(ref_nodes), rel=1e-9)


@pytest.mark.slow
def test_risk_model_on_real_flower_nodes_trains_through_app_train(data, tmp_path):
    """A SuperLink and two SuperNodes on 127.0.0.1: the model rounds reach each site's
    @app.train() handler (audited as train messages) and the model equals the in-process run's."""
    from fedgen.federation.local import LocalFederation
    from fedgen.study.runner import run_plan

    nodes = split_sites(data, tmp_path / "s", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    with LocalFederation(nodes, workdir=tmp_path / "work") as fed:
        fed.run(_study(tmp_path / "flower"))
    for nc in nodes.values():
        sent = [e for e in audit.read(Path(nc["state_dir"])) if e.get("analysis") == "model_update"]
        assert len(sent) == 2 and all(e["message_type"] == "train" and e["decision"] == "sent" for e in sent)
    flower = json.loads((tmp_path / "flower" / "model" / "model.json").read_text())
    inproc = split_sites(data, tmp_path / "i", [0.5, 0.5], seed=3, policy=POLICY, conventions=CONVENTIONS[1:3])
    run_plan(_study(tmp_path / "inproc"), InProcessTransport(inproc))
    local = json.loads((tmp_path / "inproc" / "model" / "model.json").read_text())
    np.testing.assert_allclose(flower["weights"], local["weights"], rtol=1e-12)
