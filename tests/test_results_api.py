"""Results API and the analyst notebook, executed on a freshly computed results folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import qc_plan, run_notebook, split_sites
from fedgen.federation.transport import InProcessTransport
from fedgen.results import load_results
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_gwas_results.ipynb"


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("res")
    data = make_synth(n_samples=200, n_variants=150, seed=8)
    nodes = split_sites(data, tmp / "sites", [0.5, 0.5])
    run_plan(qc_plan(tmp / "out", list(nodes)), InProcessTransport(nodes))
    return tmp / "out"


def test_load_results(results_dir):
    res = load_results(results_dir)
    assert len(res.freq) == 150
    assert list(res.freq.columns[:5]) == ["CHROM", "POS", "ID", "REF", "ALT"]
    assert res.freq["CHROM"].iloc[0] == "1"  # contig names stay strings
    summary = res.site_summary()
    assert summary["samples"].sum() == 200
    assert any(p.name == "hwe_qq.png" for p in res.plots)


def test_load_results_refuses_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_results(tmp_path)


def test_notebook_executes(results_dir, tmp_path):
    text = run_notebook("01_gwas_results", tmp_path, RESULTS=str(results_dir))
    assert "200 samples at 2 sites" in text
