"""Federated QC statistics equal PLINK 2 on the pooled data (2 and 3 uneven sites)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, needs_plink2, qc_plan, split_sites
from fedgen.federation.transport import InProcessTransport
from fedgen.stats import qc as qcstats
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth, run_plink2, write_pooled_vcf

CASES = {"small": dict(n_samples=257, n_variants=300, seed=11), "medium": dict(n_samples=811, n_variants=700, seed=12)}


def _read(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]


def assert_same_table(ours: Path, ref: Path) -> None:
    a, b = _read(ours), _read(ref)
    assert a[0] == b[0], f"header differs: {a[0]} vs {b[0]}"
    assert len(a) == len(b), f"{ours.name}: {len(a) - 1} rows, PLINK has {len(b) - 1}"
    bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]
    # every field must print identically; if not, show the first few rows that differ
    assert not bad, f"{ours.name}: {len(bad)} rows differ from PLINK, e.g. {bad[:3]}"


def run_federated(node_configs, out: Path, **kw):
    return run_plan(qc_plan(out, list(node_configs), **kw), InProcessTransport(node_configs))


@pytest.mark.parametrize("case,fractions", [("small", [0.7, 0.3]), ("medium", [0.5, 0.3, 0.2]), ("medium", [0.1, 0.6, 0.25, 0.05])])
def test_federated_qc_equals_committed_plink(tmp_path, case, fractions):
    data = make_synth(**CASES[case])
    nodes = split_sites(data, tmp_path / "sites", fractions, seed=len(fractions))
    manifest = run_federated(nodes, tmp_path / "out")
    for ext, name in (("afreq", "freq.afreq"), ("vmiss", "missing.vmiss"), ("hardy", "hardy.hardy")):
        assert_same_table(tmp_path / "out" / name, DATA / "qc" / f"{case}.{ext}")
    assert manifest["samples_total"] == len(data.samples)
    assert sum(s["samples"] for s in manifest["sites"].values()) == len(data.samples)


@needs_plink2
@pytest.mark.plink
@pytest.mark.parametrize("fractions", [[0.8, 0.2], [0.2, 0.35, 0.45]])
def test_federated_qc_equals_live_plink(tmp_path, fractions):
    data = make_synth(n_samples=433, n_variants=500, seed=101 + len(fractions), missing_rate=0.05)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    run_plink2(["--vcf", "pooled.vcf", "--freq", "cols=+pos", "--missing", "variant-only", "vcols=+pos", "--hardy", "cols=+pos", "--out", "ref"], tmp_path)
    nodes = split_sites(data, tmp_path / "sites", fractions, seed=7)
    run_federated(nodes, tmp_path / "out")
    for ext, name in (("afreq", "freq.afreq"), ("vmiss", "missing.vmiss"), ("hardy", "hardy.hardy")):
        assert_same_table(tmp_path / "out" / name, tmp_path / f"ref.{ext}")


@needs_plink2
@pytest.mark.plink
@pytest.mark.parametrize("qc", [{"maf": 0.05, "geno": 0.1, "hwe": 1e-4}, {"maf": 0.2, "geno": None, "hwe": None}, {"maf": None, "geno": 0.05, "hwe": 1e-2}])
def test_qc_filters_match_plink(tmp_path, qc):
    data = make_synth(n_samples=300, n_variants=400, seed=5, missing_rate=0.06)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    flags = []
    for k, v in qc.items():
        if v is not None:
            flags += [f"--{k}", str(v)]
    run_plink2(["--vcf", "pooled.vcf", "--set-all-var-ids", "@:#", *flags, "--write-snplist", "--out", "f"], tmp_path)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    run_federated(nodes, tmp_path / "out", qc=qc)
    rows = _read(tmp_path / "out" / "variants.tsv")[1:]
    ours = {f"{r[0]}:{r[1]}" for r in rows if r[5] == "1"}
    theirs = set((tmp_path / "f.snplist").read_text().split())
    assert ours == theirs
    assert 0 < len(theirs) < len(rows)


def test_counts_sum_over_sites_is_pooled_counts():
    rng = np.random.default_rng(3)
    g = rng.integers(-1, 3, size=(50, 90)).astype(np.int8)

    def counts(x):
        return np.stack([(x == k).sum(1) for k in (0, 1, 2, -1)], axis=1)

    parts = np.split(np.arange(90), [13, 60])
    fed = sum(counts(g[:, p]) for p in parts)
    np.testing.assert_array_equal(fed, counts(g))
    f, obs = qcstats.variant_alt_freq(fed)
    naive = [np.mean(row[row >= 0]) / 2 for row in g]
    np.testing.assert_allclose(f, naive)
    np.testing.assert_array_equal(obs, 2 * (g >= 0).sum(1))


def test_manifest_records_sites_and_bytes(tmp_path):
    data = make_synth(n_samples=120, n_variants=150, seed=3)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4])
    run_federated(nodes, tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for s in nodes:
        assert m["sites"][s]["bytes_sent"] > 0
        assert m["sites"][s]["samples"] > 0
        assert m["sites"][s]["multiallelic_split"] == 0 and m["sites"][s]["split_variants"] == 0
    assert m["variants"]["study"] == 150
    assert m["versions"]["fedgen"]


def test_small_sub_blocks_give_the_same_tables(tmp_path, monkeypatch):
    """Sites read hard calls in sub-blocks sized by their sample count (genotype_step); reading
    a few variants at a time gives the same QC tables (and GLM rows) as one block."""
    import fedgen.analyses.qc as qc

    data = make_synth(**CASES["medium"])
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.3, 0.2], seed=3)
    kw = dict(analyses=["freq", "missing", "hardy", "glm"], phenotypes=["QT"], covariates=[])
    run_federated(nodes, tmp_path / "big", **kw)
    monkeypatch.setattr(qc, "GENOTYPE_ELEMS", 7 * max(len(data.samples), 1))
    assert qc.genotype_step(len(data.samples)) < 10
    run_federated(nodes, tmp_path / "small", **kw)
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "QT.glm.linear"):
        assert (tmp_path / "small" / name).read_text() == (tmp_path / "big" / name).read_text(), name
    assert_same_table(tmp_path / "small" / "freq.afreq", DATA / "qc" / "medium.afreq")
