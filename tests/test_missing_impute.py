"""The default ``study.glm.missing: impute`` equals a pooled regression with the same imputation.

Each site imputes a missing call with its best-guess genotype: the mean dosage of that variant over
all its analysed samples with a call, rounded to 0, 1 or 2. Every row of a phenotype then rests
on one sample set. The reference here
is computed independently from the simulated truth: the pooled dosage matrix with each site's
missing calls filled that way, then ordinary least squares per variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import qc_plan, split_sites

from fedgen.cohort.cohort import load_cohort
from fedgen.federation.transport import InProcessTransport
from fedgen.stats import glm
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

OPEN = {"min_count": 1, "min_cell": 1}  # no row withheld: the comparison covers every row


def _table(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [ln.split("\t") for ln in lines[1:]]


def test_imputed_linear_regression_equals_pooled_reference(tmp_path):
    data = make_synth(360, 160, seed=14, missing_rate=0.05, extremes=False)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.3, 0.2], seed=2, policy=OPEN)
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "glm"], phenotypes=["QT2"],
                   covariates=["age"], qc={"maf": 0.01, "geno": None, "hwe": None}, missing="impute")
    manifest = run_plan(plan, InProcessTransport(nodes))
    assert manifest["study_id"]

    col = {s: i for i, s in enumerate(data.samples)}
    parts = []  # per site: its regression samples' imputed dosages and their table values (as written)
    for nc in nodes.values():
        cohort = load_cohort(nc)
        cols = np.asarray([col[cohort.vcf_samples[j]] for j in cohort.sample_cols.tolist()])
        y_s, age_s = cohort.sample_values("QT2"), cohort.sample_values("age")
        used = ~np.isnan(y_s) & ~np.isnan(age_s)
        g_all = data.dosage[:, cols].astype(float)
        ok = g_all >= 0
        mean = np.rint(np.where(ok, g_all, 0).sum(1) / np.maximum(ok.sum(1), 1))  # the site's best-guess genotype
        g = g_all[:, used]
        parts.append((np.where(g >= 0, g, mean[:, None]), y_s[used], age_s[used]))
    G = np.hstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    age = np.concatenate([p[2] for p in parts])
    keep = np.ones(len(y), bool)

    header, rows = _table(tmp_path / "out" / "QT2.glm.linear")
    h = {k: i for i, k in enumerate(header)}
    pos_index = {(c, int(p)): j for j, (c, p) in enumerate(zip(data.chrom, data.pos.tolist()))}
    checked = 0
    for r in rows:
        j = pos_index[(r[h["#CHROM"]], int(r[h["POS"]]))]
        sign = 1.0 if r[h["A1"]] == data.alt[j] else -1.0
        x = G[j, keep] if sign > 0 else 2.0 - G[j, keep]
        X = np.column_stack([np.ones(keep.sum()), x, age[keep]])
        sums = glm.site_linear_suffstats(np.asarray([x]), y[keep], age[keep][:, None])
        ref = glm.linear_from_suffstats(sums["XtX"], sums["Xty"], sums["yty"], sums["n"])
        beta, *_ = np.linalg.lstsq(X, y[keep], rcond=None)  # the plain definition, too
        np.testing.assert_allclose(ref["beta"][0], beta[1], rtol=1e-8)
        assert int(r[h["OBS_CT"]]) == int(keep.sum())  # one sample set for every row
        assert r[h["ERRCODE"]] == "."
        np.testing.assert_allclose(float(r[h["BETA"]]), beta[1], rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(float(r[h["SE"]]), ref["se"][0], rtol=2e-5)
        checked += 1
    assert checked > 100


def test_phenotypes_of_a_study_share_one_sample_set_and_keep_their_rows(tmp_path):
    """Two traits with different missingness: in impute mode both use the people with every
    phenotype and covariate present, so no pair of released sets differs by a few dozen people
    (which would make the sites withhold every row with a carrier among them)."""
    data = make_synth(700, 150, seed=21, missing_rate=0.01, extremes=False)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5], seed=2, policy=None)  # the default policy
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "glm"], phenotypes=["QT", "QT2"],
                   covariates=["sex", "age"], qc={"maf": 0.05, "geno": None, "hwe": None}, missing="impute")
    run_plan(plan, InProcessTransport(nodes))
    tables = {p: _table(tmp_path / "out" / f"{p}.glm.linear") for p in ("QT", "QT2")}
    obs = {p: {r[h.index("OBS_CT")] for r in rows} for p, (h, rows) in tables.items()}
    assert obs["QT"] == obs["QT2"] and len(obs["QT"]) == 1
    for p, (h, rows) in tables.items():
        held = sum(r[h.index("ERRCODE")] == "SMALL_CELL" for r in rows)
        assert held <= 0.02 * len(rows), (p, held, len(rows))
