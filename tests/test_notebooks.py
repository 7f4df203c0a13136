"""Notebooks 03 (QC and PCA) and 04 (privacy against utility), executed with papermill on freshly
computed results; 01 and 02 run in test_results_api.py and test_learn.py."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import qc_plan, run_notebook, split_sites
from fedgen.cli import main
from fedgen.federation.transport import InProcessTransport
from fedgen.study.pca import pca_settings
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth


def test_qc_and_pca_notebook(tmp_path):
    data = make_synth(n_samples=400, n_variants=200, seed=61, missing_rate=0.02)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4])
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "pca"],
                   pca=pca_settings({"k": 3, "maf": 0.05, "ld_prune": None, "build": None}, pcs=0))
    m = run_plan(plan, InProcessTransport(nodes))
    text = run_notebook("03_qc_and_pca", tmp_path, RESULTS=str(tmp_path / "out"))
    assert f"400 samples at 2 sites, {m['variants']['study']} shared variants, {m['variants']['qc_pass']} pass QC" in text
    assert "eigenvalue" in text and "PC3" in text
    assert "LD-pruned variants" in text


def test_privacy_utility_notebook_from_a_multirun_sweep(tmp_path, capsys):
    """04 reads a `fedgen run -m privacy.epsilon=...` sweep and an exact run of the same data, and
    tabulates the frequency error per ε against the know-nothing guess."""
    data = make_synth(n_samples=600, n_variants=120, seed=62)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    for c in nodes.values():
        if isinstance(c.get("policy"), str):
            c["policy"] = json.loads(c["policy"])
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "mine.yaml").write_text(yaml.safe_dump(nodes))
    base = ["sites=mine", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "federation=inprocess", "study=dp",
            "study.phenotypes=[CC]"]
    assert main(["run", *base, "study.analyses=[freq,missing,hardy,assoc]", f"output_dir={tmp_path / 'exact'}"]) == 0
    for s in nodes:  # a fresh ledger per sweep job would hide nothing: each job is charged at its site
        nodes[s]["state_dir"] = str(tmp_path / "state" / s)
    (cfg / "mine.yaml").write_text(yaml.safe_dump(nodes))
    assert main(["run", "-m", *base, "privacy=dp", "privacy.force=true", "privacy.epsilon=0.5,8", f"output_dir={tmp_path / 'sweep'}"]) == 0
    capsys.readouterr()
    text = run_notebook("04_privacy_utility", tmp_path, SWEEP=str(tmp_path / "sweep"), EXACT=str(tmp_path / "exact"))
    assert "2 jobs, 2 finished" in text
    assert "af_mae" in text and "know_nothing_mae" in text and "recall_of_exact_topk" in text


def test_every_notebook_has_a_test():
    from conftest import NOTEBOOKS

    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_gwas_results", "02_risk_model", "03_qc_and_pca", "04_privacy_utility"], names
    pytest.importorskip("papermill")
