"""The site pipeline against a curious aggregator (in process; Flower runs in test_guard_e2e).

Each probe must be refused with its reason, logged in the site's audit log, and release
nothing; an honest study still works afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import qc_plan, split_sites

from fedgen.analyses import REGISTRY, SPECS
from fedgen.errors import SiteError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.site import audit
from fedgen.site.audit_cli import cmd_audit
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    data = make_synth(160, 120, seed=5)
    nodes = split_sites(data, tmp / "sites", [0.6, 0.4], seed=3, conventions=[dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")],
                        policy=None)
    # a phenotype present for only 6 samples at site1: any aggregate over it rests on 6 people
    p = Path(nodes["site1"]["samples"])
    lines = p.read_text().splitlines()
    out = [lines[0] + "\tRARE"] + [ln + ("\t" + str(i % 2) if i < 6 else "\tNA") for i, ln in enumerate(lines[1:])]
    p.write_text("\n".join(out) + "\n")
    p2 = Path(nodes["site2"]["samples"])
    lines = p2.read_text().splitlines()
    p2.write_text("\n".join([lines[0] + "\tRARE"] + [ln + "\t" + str(i % 2) for i, ln in enumerate(lines[1:])]) + "\n")
    return nodes


def _audit(node: dict) -> list[dict]:
    return list(audit.read(Path(node["state_dir"])))


def _idx(n: int = 10) -> dict[str, np.ndarray]:
    return {"idx": np.arange(n, dtype=np.int64), "flip": np.zeros(n, np.uint8)}


def _refused(tr, request, match: str) -> None:
    with pytest.raises(SiteError, match=match):
        tr.query(request)


def test_curious_requests_are_refused_logged_and_release_nothing(sites, tmp_path, monkeypatch):
    nodes = {s: dict(nc) for s, nc in sites.items()}
    policy = {"allowed_analyses": ["site_info", "genotype_counts", "assoc_counts", "glm_linear", "ping"], "min_count": 10,
              "max_variants_per_request": 50}
    for nc in nodes.values():
        nc["policy"] = json.dumps(policy)
    before = {s: len(_audit(nc)) for s, nc in nodes.items()}
    tr = InProcessTransport(nodes)

    # 1. an analysis the policy forbids (PCA products would otherwise be fine)
    _refused(tr, Request("pca_product", arrays={**_idx(), "freq": np.full(10, 0.3), "basis": np.ones((10, 2))}),
             "analysis 'pca_product' is not allowed by the site's policy")
    # 2. an analysis that does not exist in the site's fedgen
    _refused(tr, Request("dump_genotypes", arrays=_idx()), "unknown analysis 'dump_genotypes'")
    # 3. an undeclared parameter asking for per-sample output
    _refused(tr, Request("genotype_counts", params={"per_sample": True}, arrays=_idx()), "parameter.*'per_sample'.*not declared")
    # 4. an undeclared input array
    _refused(tr, Request("genotype_counts", arrays={**_idx(), "sample_mask": np.ones(5, np.uint8)}), "'sample_mask' are not declared")
    # 5. more variants than the policy allows in one request
    _refused(tr, Request("genotype_counts", arrays=_idx(60)), "covers more variants than the site's policy allows")
    # 6. an aggregate over fewer than min_count samples (RARE is known for 6 samples at site1)
    _refused(tr, Request("glm_linear", params={"phenotype": "RARE", "kind": "quantitative", "covariates": []}, arrays=_idx()),
             r"site site1: (glm_linear: the aggregate would rest on fewer samples|column 'RARE': some of its values are held by fewer) than the site's min_count")
    # 7. a foreign message type (what Flower's dispatch would carry for e.g. "train")
    from fedgen.site.pipeline import Refused
    from fedgen.site.pipeline import handle as answer

    with pytest.raises(Refused, match="message type 'train' is not one this site answers"):
        answer(nodes["site1"], "genotype_counts", {}, _idx(), context={"message_type": "train", "run_id": "77"})

    # 8. a site analysis that (through a bug or a hostile plug-in) returns sample-shaped data
    n1 = None
    real = REGISTRY["genotype_counts"]

    def leaky(cohort, req):
        g = cohort.block(np.asarray(req.arrays["idx"]), np.zeros(len(req.arrays["idx"]), bool))
        return {"counts": g.T.astype(np.int64)}, {"n_samples": cohort.n_samples}

    monkeypatch.setitem(REGISTRY, "genotype_counts", leaky)
    _refused(tr, Request("genotype_counts", arrays=_idx(4)), r"reply array 'counts' has shape \(\d+, 4\), declared i8\[v, 4\]")

    def leaky_free(cohort, req):
        out, meta = REGISTRY_REAL_LINEAR(cohort, req)
        out["Xty"] = np.zeros((len(req.arrays["idx"]), cohort.n_samples))  # an axis as long as the sample count
        return out, meta

    REGISTRY_REAL_LINEAR = REGISTRY["glm_linear"]
    monkeypatch.setitem(REGISTRY, "glm_linear", leaky_free)
    _refused(tr, Request("glm_linear", params={"phenotype": "QT", "kind": "quantitative", "covariates": []}, arrays=_idx(4)),
             "reply array|sample-shaped")
    monkeypatch.setitem(REGISTRY, "genotype_counts", real)
    monkeypatch.setitem(REGISTRY, "glm_linear", REGISTRY_REAL_LINEAR)

    # every probe is in the asked site's audit log as refused, with its reason, and nothing left any site
    # (the in-process transport stops at the first refusal, so site2 was not asked)
    for s, nc in nodes.items():
        new = _audit(nc)[before[s]:]
        assert new or s == "site2", s
        assert all(e["decision"] == "refused" for e in new), [(e["analysis"], e["decision"]) for e in new]
        assert all(e["bytes"] == 0 and e["sha256"] is None and e["arrays"] == [] for e in new)
        assert all(e["reason"] for e in new)
    reasons = " | ".join(e["reason"] for e in _audit(nodes["site1"])[before["site1"]:])
    for needle in ("not allowed by the site's policy", "unknown analysis", "per_sample", "sample_mask", "more variants than",
                   "than the site's min_count", "message type 'train'", "declared i8[v, 4]"):
        assert needle in reasons, needle
    assert audit.verify(Path(nodes["site1"]["state_dir"])) == []

    # the honest study still works on the same nodes and policy afterwards
    plan = qc_plan(tmp_path / "out", list(nodes), block_size=50)
    manifest = run_plan(plan, InProcessTransport(nodes))
    assert (tmp_path / "out" / "freq.afreq").exists() and manifest["sites"]
    sent = [e for e in _audit(nodes["site2"]) if e["decision"] == "sent" and e["study_id"] == manifest["study_id"]]
    assert {e["analysis"] for e in sent} == {"site_info", "genotype_counts"}
    for e in sent:  # what left: per-variant / per-site aggregates only
        for a in e["arrays"]:
            assert a["name"] in ("variants", "counts")
            if a["name"] == "counts":
                assert a["shape"][1] == 4 and a["shape"][0] <= 50


def test_policy_without_sample_level_analyses_by_default(sites):
    from fedgen.node.policy import default_policy

    assert SPECS["covar_ranges"].sample_level
    assert "covar_ranges" not in default_policy()["allowed_analyses"]
    nodes = {s: dict(nc) for s, nc in sites.items()}
    tr = InProcessTransport(nodes)
    _refused(tr, Request("covar_ranges", params={"phenotype": "BIN", "kind": "binary", "covariates": ["age"]}),
             r"'covar_ranges' is not allowed by the site's policy \(it releases individual samples' values\)")


def test_every_registered_analysis_declares_its_outputs():
    from fedgen.analyses import _load_builtin

    _load_builtin()
    for name in REGISTRY:
        spec = SPECS[name]
        assert spec.doc, name
        for decl in spec.outputs.values():
            assert all(sym not in ("n", "n_samples", "samples") for sym in decl.shape), name


def test_audit_log_records_what_left_and_verifies(sites, tmp_path, capsys):
    nodes = {s: dict(nc) for s, nc in sites.items()}
    for nc in nodes.values():
        nc["state_dir"] = str(tmp_path / nc["site"])
    tr = InProcessTransport(nodes)
    req = Request("genotype_counts", arrays=_idx(7), study_id="study-A")
    replies = tr.query(req)
    state = Path(nodes["site1"]["state_dir"])
    (e,) = [x for x in audit.read(state)]
    assert e["decision"] == "sent" and e["study_id"] == "study-A" and e["analysis"] == "genotype_counts"
    assert e["arrays"] == [{"name": "counts", "dtype": "<i8", "shape": [7, 4], "bytes": 224}]
    assert e["bytes"] == 224 and e["epsilon"] == 0.0
    digest, _ = audit.payload_digest(replies["site1"].arrays, {k: v for k, v in replies["site1"].meta.items()})
    assert digest == e["sha256"]
    assert audit.verify(state) == []

    args = type("A", (), {"state_dir": str(state), "study": None, "verify": True, "json": False})()
    assert cmd_audit(args) == 0
    text = capsys.readouterr().out
    assert "study-A" in text and "genotype_counts×1" in text and "hash chain intact" in text

    # tampering: edit a byte count in the log, then corrupt a kept payload
    path = state / audit.AUDIT_LOG
    tr.query(Request("genotype_counts", arrays=_idx(3), study_id="study-B"))
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"bytes":224', '"bytes":22')
    path.write_text("\n".join(lines) + "\n")
    problems = audit.verify(state)
    assert any("line 2: hash chain broken" in p for p in problems)
    args.json = True
    assert cmd_audit(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is False and out["total"]["sent"] == 2


def test_local_run_takes_inline_site_policy_from_the_sites_file(sites, tmp_path, capsys):
    """``sites.<name>.policy`` in a sites file is the site's policy in local runs."""
    from fedgen.cli import main

    conf = tmp_path / "conf" / "sites"
    conf.mkdir(parents=True)
    lines = []
    for s, nc in sites.items():
        lines += [f"{s}:", f"  vcf: {nc['vcf']}", f"  samples: {nc['samples']}", f"  state_dir: {tmp_path / s}"]
        if s == "site2":
            lines += ["  policy:", "    allowed_analyses: [ping, site_info]", "    min_count: 20"]
    (conf / "mine.yaml").write_text("\n".join(lines) + "\n")
    args = ["run", "sites=mine", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "study=qc", "federation=inprocess",
            f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "site site2: failed during" in err and "analysis 'genotype_counts' is not allowed by the site's policy" in err
    assert "federation.min_sites=2" in err  # the default: every site is needed
    assert not (tmp_path / "out").exists()
    (e,) = [x for x in audit.read(tmp_path / "site2") if x["decision"] == "refused"]
    assert e["analysis"] == "genotype_counts" and e["site"] == "site2"
    # a bad inline policy is a configuration error before anything runs
    (conf / "mine.yaml").write_text((conf / "mine.yaml").read_text().replace("min_count: 20", "min_count: -3"))
    assert main(args) == 2
    assert "sites.site2.policy: inline policy: min_count must be a whole number >= 1, got -3" in capsys.readouterr().err


def test_variant_rows_resting_on_fewer_than_min_count_samples_are_withheld(sites, tmp_path):
    nodes = {s: dict(nc) for s, nc in sites.items()}
    exact = InProcessTransport(nodes).query(Request("genotype_counts", per_site_arrays={s: _idx(120) for s in nodes}))
    n1 = int(exact["site1"].arrays["counts"][0].sum())
    called = exact["site1"].arrays["counts"][:, :3].sum(1)
    m = n1 - 1  # rows with two or more missing calls rest on fewer than m samples
    small = (called > 0) & (called < m)
    assert 0 < small.sum() < len(called)
    nodes["site1"]["policy"] = json.dumps({"min_count": m})
    tr = InProcessTransport(nodes)
    got = tr.query(Request("genotype_counts", per_site_arrays={s: _idx(120) for s in nodes}))
    c = got["site1"].arrays["counts"]
    assert got["site1"].meta["suppressed"] == int(small.sum())
    np.testing.assert_array_equal(c[small], np.tile([0, 0, 0, n1], (int(small.sum()), 1)))
    np.testing.assert_array_equal(c[~small], exact["site1"].arrays["counts"][~small])
    (e,) = [x for x in audit.read(Path(nodes["site1"]["state_dir"])) if x["decision"] == "sent"][-1:]
    assert e["sha256"] == audit.payload_digest(got["site1"].arrays, got["site1"].meta)[0]  # what left = what is logged
    manifest = run_plan(qc_plan(tmp_path / "out", list(nodes), block_size=60), tr)
    assert manifest["suppressed_by_sites"]["genotype_counts@site1"] == int(small.sum())
    assert any("site1:" in n and "withheld" in n for n in manifest["notes"])


def test_oversized_reply_is_refused_before_computation(sites):
    tr = InProcessTransport(sites)
    _refused(tr, Request("ld_pair_sums", params={"n_first": 60000, "window": 99999}, arrays=_idx(100)),
             "exceeds this analysis' limit")
    wide = [{"name": "smoking", "kind": "categorical", "levels": [str(i) for i in range(40)]}] * 3  # 119 predictors
    _refused(tr, Request("glm_linear", params={"phenotype": "QT", "kind": "quantitative", "covariates": wide}, arrays=_idx(60000)),
             "the reply this request asks for would be larger than the site's limit")


def _add_column(path: Path, name: str, values: list[str]) -> None:
    lines = Path(path).read_text().splitlines()
    Path(path).write_text("\n".join([lines[0] + f"\t{name}"] + [ln + f"\t{v}" for ln, v in zip(lines[1:], values)]) + "\n")


def test_categories_that_single_people_out_are_refused_and_no_values_are_echoed(sites, tmp_path):
    import shutil

    nodes = {}
    for s, nc in sites.items():
        d = tmp_path / s
        d.mkdir()
        shutil.copy(nc["samples"], d / "samples.tsv")
        nodes[s] = {**nc, "samples": str(d / "samples.tsv"), "state_dir": str(d / "state")}
    n1 = len(Path(nodes["site1"]["samples"]).read_text().splitlines()) - 1
    dob = [f"19{40 + i % 50}-0{1 + i % 9}-1{i % 10}" for i in range(n1)]  # an identifier-like column
    _add_column(Path(nodes["site1"]["samples"]), "DOB", dob)
    _add_column(Path(nodes["site1"]["samples"]), "GRP", ["a" if i < 3 else "b" for i in range(n1)])
    tr = InProcessTransport({"site1": nodes["site1"]})
    # its level names would identify people: refused, and the message carries no value
    with pytest.raises(SiteError, match=r"column 'DOB' has more than 50 categories") as ei:
        tr.query(Request("site_info", params={"covariates": ["DOB"]}))
    assert "19" not in str(ei.value)
    with pytest.raises(SiteError, match=r"column 'GRP': some of its categories hold fewer than the site's min_count"):
        tr.query(Request("site_info", params={"covariates": ["GRP"]}))
    with pytest.raises(SiteError, match="non-numeric values") as ei:
        tr.query(Request("site_info", params={"phenotypes": ["DOB"]}))
    assert "-0" not in str(ei.value)
    with pytest.raises(SiteError, match="distinct values other than 0/1/2") as ei:
        tr.query(Request("glm_linear", params={"phenotype": "age", "kind": "binary", "covariates": []}, arrays=_idx()))
    assert "." not in str(ei.value).split("other than")[0].split("has")[-1]
    # an indicator for a level held by 3 people (or a numeric column split into one level per value)
    req = {"phenotype": "QT", "kind": "quantitative",
           "covariates": [{"name": "GRP", "kind": "categorical", "levels": ["b", "a"]}]}
    _refused(tr, Request("glm_linear", params=req, arrays=_idx()), "covariate 'GRP': a category would hold fewer than")
    req["covariates"] = [{"name": "age", "kind": "categorical", "levels": ["x"]}]
    _refused(tr, Request("glm_linear", params=req, arrays=_idx()), "a category would hold fewer than")
    # a design wider than any real model is refused before any data is read
    req["covariates"] = [{"name": "smoking", "kind": "categorical", "levels": [str(i) for i in range(40)]}] * 4
    _refused(tr, Request("glm_linear", params=req, arrays=_idx()), "predictors \\(at most 128\\)")
    # malformed parameters are refused, not crashed on
    for bad in ({"covariates": ["age"]}, {"site_columns": ["x"]}, {"pcs": "x"}, {"covariates": [{"name": "age"}]}):
        _refused(tr, Request("glm_linear", params={"phenotype": "QT", "kind": "quantitative", **bad}, arrays=_idx()),
                 "does not match the analysis' declaration: bad parameters")


def test_a_beta_that_weights_the_fit_onto_one_person_is_withheld(sites):
    nodes = {"site1": {**sites["site1"], "policy": json.dumps({"extra_analyses": ["glm_logistic", "glm_firth"]})}}
    tr = InProcessTransport(nodes)
    from fedgen.cohort.cohort import load_cohort

    c = load_cohort(nodes["site1"])
    ages = [c.table.require("age")[i] for i in c.table_rows.tolist()]
    target = float(next(a for a in ages if a not in ("NA", "")))
    v = 8
    sd = float(np.nanstd(c.sample_values("age"), ddof=1))
    beta = np.zeros((v, 3))
    beta[:, 2] = sd / 1e-3  # η = (age − target) / 0.001
    req = Request("glm_logistic", params={"phenotype": "BIN", "kind": "binary",
                                          "covariates": [{"name": "age", "kind": "numeric", "mean": target, "sd": sd}]},
                  arrays={**_idx(v), "beta": beta})
    rep = tr.query(req)["site1"]
    assert rep.meta["suppressed"] == v  # every row rests on about one person's weight: nothing of them leaves
    assert not np.any(rep.arrays["H_triu"]) and not np.any(rep.arrays["grad"]) and not np.any(rep.arrays["n"])
    # the honest β = 0 is answered in full
    rep = tr.query(Request("glm_logistic", params={**req.params, "covariates": [{"name": "age", "kind": "numeric", "mean": 40.0, "sd": 10.0}]},
                           arrays={**_idx(v), "beta": np.zeros((v, 3))}))["site1"]
    # only the rows the data make small (an allele carried by 1..4 people) are withheld, whatever β
    g = c.block(np.arange(v))
    small = (((g > 0).sum(1) > 0) & ((g > 0).sum(1) < 5)) | ((((g >= 0) & (g < 2)).sum(1) > 0) & (((g >= 0) & (g < 2)).sum(1) < 5))
    np.testing.assert_array_equal(rep.arrays["withheld"].astype(bool), small)
    assert np.all(rep.arrays["n"][~small] > 0)


def test_pca_histograms_are_opt_in(sites, tmp_path):
    from fedgen.node.policy import default_policy

    assert "pca_histograms" not in default_policy()["allowed_analyses"]
    nodes = {s: dict(nc) for s, nc in sites.items()}
    _refused(InProcessTransport(nodes), Request("pca_histograms", params={"study_id": "x", "pairs": [[0, 1]], "ranges": [[[-1, 1], [-1, 1]]]}),
             "'pca_histograms' is not allowed by the site's policy")


def test_policy_allowed_columns_keeps_other_columns_out_of_every_aggregate(sites, tmp_path):
    nodes = {s: {**nc, "state_dir": str(tmp_path / s), "policy": json.dumps({"allowed_columns": ["BIN", "QT", "age", "sex"]})}
             for s, nc in sites.items()}
    tr = InProcessTransport(nodes)
    _refused(tr, Request("site_info", params={"phenotypes": ["QT"], "covariates": ["smoking"]}),
             "column\\(s\\) 'smoking' are not in the site policy's allowed_columns")
    _refused(tr, Request("covar_moments", params={"names": ["age", "QT2"]}), "'QT2' are not in")
    _refused(tr, Request("glm_linear", params={"phenotype": "RARE", "kind": "quantitative", "covariates": []}, arrays=_idx()),
             "'RARE' are not in")
    tr.query(Request("glm_linear", params={"phenotype": "QT", "kind": "quantitative",
                                           "covariates": [{"name": "age", "kind": "numeric", "mean": 40.0, "sd": 10.0}]}, arrays=_idx()))
