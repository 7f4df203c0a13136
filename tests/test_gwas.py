"""Federated association equals pooled PLINK: plink2 --glm (linear, logistic + Firth) and
plink1.9 --assoc, for 2 and 3 uneven sites with different conventions and phenotype codings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, HAVE_PLINK19, needs_plink2, qc_plan, split_sites
from fedgen.errors import FedgenError
from fedgen.errors import ConfigError
from fedgen.federation.transport import InProcessTransport
from fedgen.study.glmcols import parse_cols
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth, run_plink2, write_pooled_pheno, write_pooled_vcf

GWAS = dict(n_samples=700, n_variants=300, seed=21)
NO_QC = {"maf": None, "geno": None, "hwe": None}


def gwas_plan(out: Path, sites: list[str], **kw):
    return qc_plan(
        out, sites, analyses=["freq", "missing", "hardy", "assoc", "glm"], phenotypes=["CC", "QT2"],
        covariates=["age", "sex", "smoking"], qc=NO_QC, **kw,
    )


def _rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def _a1_tie_ok(x: list[str], y: list[str]) -> bool:
    """Known deviation: on an exact 50/50 allele-frequency tie in an all-het (constant) column,
    PLINK 2's choice of A1 is not reproducible from counts; nothing numeric is reported there."""
    return x[-1] == y[-1] == "CONST_OMITTED_ALLELE" and x[:5] == y[:5] and x[6:] == y[6:]


def compare_linear(ours: Path, ref: Path) -> None:
    a, b = _rows(ours), _rows(ref)
    assert a[0] == b[0]
    assert len(a) == len(b)
    diff = [(x, y) for x, y in zip(a, b) if x != y and not _a1_tie_ok(x, y)]
    assert not diff, f"{len(diff)} rows differ from plink2, e.g. {diff[:2]}"


def compare_logistic(ours: Path, ref: Path, *, rtol: float = 2e-3, firth_rtol: float = 1e-2) -> dict[str, float]:
    """A1, FIRTH?, OBS_CT, ERRCODE and NA pattern identical; OR/SE/Z/P within PLINK's float32 noise."""
    a, b = _rows(ours), _rows(ref)
    assert a[0] == b[0]
    assert len(a) == len(b)
    h = a[0]
    worst: dict[str, float] = {}
    for x, y in zip(a[1:], b[1:]):
        rx, ry = dict(zip(h, x)), dict(zip(h, y))
        for k in ("#CHROM", "POS", "ID", "REF", "ALT", "A1", "FIRTH?", "TEST", "OBS_CT", "ERRCODE"):
            if k == "A1" and rx["ERRCODE"] == ry["ERRCODE"] == "CONST_OMITTED_ALLELE":
                continue  # see _a1_tie_ok
            assert rx[k] == ry[k], f"{k} differs at {rx['ID']} {rx['POS']}: {rx[k]} vs {ry[k]}"
        tol = firth_rtol if rx["FIRTH?"] == "Y" else rtol
        for k in ("OR", "LOG(OR)_SE", "Z_STAT", "P"):
            assert (rx[k] == "NA") == (ry[k] == "NA"), f"{k} NA pattern differs at {rx['POS']}"
            if rx[k] == "NA":
                continue
            u, v = float(rx[k]), float(ry[k])
            err = abs(u - v) / max(abs(v), 1e-3 if k == "Z_STAT" else 1e-300)
            worst[k] = max(worst.get(k, 0.0), err)
            assert err <= tol, f"{k} at {rx['POS']}: {u} vs PLINK {v}"
    return worst


@pytest.mark.parametrize("fractions", [[0.65, 0.35], [0.5, 0.3, 0.2]])
def test_federated_gwas_equals_committed_plink(tmp_path, fractions):
    data = make_synth(**GWAS)
    nodes = split_sites(data, tmp_path / "sites", fractions, seed=len(fractions))
    m = run_plan(gwas_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    ref = DATA / "gwas"
    compare_linear(tmp_path / "out" / "QT2.glm.linear", ref / "QT2.glm.linear")
    compare_logistic(tmp_path / "out" / "CC.glm.logistic.hybrid", ref / "CC.glm.logistic.hybrid")
    assert (tmp_path / "out" / "CC.assoc").read_text() == (ref / "CC.assoc").read_text()
    assert m["association"]["CC"]["kind"] == "binary"
    assert m["association"]["QT2"]["kind"] == "quantitative"
    assert 0.5 < m["association"]["QT2"]["lambda_gc"] < 2
    assert (tmp_path / "out" / "plots" / "CC_manhattan.png").exists()
    assert (tmp_path / "out" / "QT2_qq.png").exists() is False and (tmp_path / "out" / "plots" / "QT2_qq.png").exists()


@needs_plink2
@pytest.mark.plink
@pytest.mark.skipif(not HAVE_PLINK19, reason="plink1.9 not installed")
def test_federated_gwas_equals_live_plink(tmp_path):
    data = make_synth(n_samples=900, n_variants=250, seed=33, missing_rate=0.04)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    write_pooled_pheno(data, tmp_path / "p.pheno", tmp_path / "p.covar")
    run_plink2(["--vcf", "pooled.vcf", "--pheno", "p.pheno", "--pheno-name", "CC", "QT2", "--covar", "p.covar",
                "--covar-variance-standardize", "--glm", "hide-covar", "--out", "ref"], tmp_path)
    lines = (tmp_path / "p.pheno").read_text().splitlines()[1:]
    (tmp_path / "cc.txt").write_text("".join(f"{f[0]} {f[0]} {f[3] if f[3] != 'NA' else -9}\n" for f in (x.split("\t") for x in lines)))
    plink19 = shutil.which("plink1.9") or "plink"
    subprocess.run([plink19, "--vcf", "pooled.vcf", "--pheno", "cc.txt", "--assoc", "--allow-no-sex", "--out", "r19"],
                   cwd=tmp_path, check=True, capture_output=True)
    nodes = split_sites(data, tmp_path / "sites", [0.2, 0.45, 0.35], seed=9)
    run_plan(gwas_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    compare_linear(tmp_path / "out" / "QT2.glm.linear", tmp_path / "ref.QT2.glm.linear")
    compare_logistic(tmp_path / "out" / "CC.glm.logistic.hybrid", tmp_path / "ref.CC.glm.logistic.hybrid")
    assert (tmp_path / "out" / "CC.assoc").read_text() == (tmp_path / "r19.assoc").read_text()


def test_association_uses_variants_passing_qc(tmp_path):
    data = make_synth(**GWAS)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    plan = gwas_plan(tmp_path / "out", list(nodes))
    plan["qc"] = {"maf": 0.05, "geno": 0.1, "hwe": None}
    m = run_plan(plan, InProcessTransport(nodes))
    n_glm = len(_rows(tmp_path / "out" / "QT2.glm.linear")) - 1
    assert n_glm == m["qc"]["pass"] < m["variants"]["study"]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(covariates=["age", "nope"]), "no column 'nope'"),
        (dict(covariates=["age", "const"]), "covariate 'const' is constant"),
        (dict(covariates=["age", "empty"]), "covariate 'empty' is missing for every sample"),
        (dict(phenotypes=["MIXED"]), "looks binary at some sites and quantitative at others"),
    ],
)
def test_bad_covariates_and_phenotypes_name_the_column(tmp_path, change, message):
    data = make_synth(n_samples=200, n_variants=60, seed=2)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    for k, (site, cfg) in enumerate(nodes.items()):
        p = Path(cfg["samples"])
        lines = p.read_text().splitlines()
        rng = np.random.default_rng(k)
        mixed = (lambda: str(rng.integers(0, 2))) if k == 0 else (lambda: f"{rng.normal():.3f}")
        lines = [lines[0] + "\tconst\tempty\tMIXED"] + [ln + f"\t7\tNA\t{mixed()}" for ln in lines[1:]]
        p.write_text("\n".join(lines) + "\n")
    plan = gwas_plan(tmp_path / "out", list(nodes))
    plan.update(change)
    with pytest.raises(FedgenError, match=message):
        run_plan(plan, InProcessTransport(nodes))
    assert not (tmp_path / "out").exists()


def test_site_covariate_adds_indicators(tmp_path):
    data = make_synth(**GWAS)
    nodes = split_sites(data, tmp_path / "sites", [0.4, 0.35, 0.25])
    plan = gwas_plan(tmp_path / "out", list(nodes), site_covariate=True)
    m = run_plan(plan, InProcessTransport(nodes))
    assert m["association"]["QT2"]["covariates"][-2:] == ["site=site2", "site=site3"]
    # the indicators change the fit (sites differ in nothing here, so only slightly)
    assert (tmp_path / "out" / "QT2.glm.linear").read_text() != (DATA / "gwas" / "QT2.glm.linear").read_text()


def test_pcs_as_covariates_equal_pooled_ols_on_site_scores(tmp_path):
    """study.pcs: each site adds its own stored PC scores; the fit equals pooled OLS with them."""
    import statsmodels.api as sm

    from fedgen.cohort.pcs import pcs_path, read_eigenvec
    from fedgen.study.pca import pca_settings

    data = make_synth(n_samples=500, n_variants=200, seed=44)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4])
    plan = gwas_plan(tmp_path / "out", list(nodes), study_id="pcstest")
    plan.update(pcs=2, pca=pca_settings({"k": 3, "maf": 0.05, "ld_prune": None, "build": None}, pcs=2))
    plan["analyses"] = ["freq", "missing", "hardy", "pca", "glm"]
    m = run_plan(plan, InProcessTransport(nodes))
    entry = m["association"]["QT2"]
    assert entry["covariates"][-2:] == ["PC1", "PC2"]
    assert "lambda_gc_without_pcs" in entry
    # pooled reference: the scores the sites wrote, matched to samples by IID
    scores = {}
    for cfg in nodes.values():
        iids, sc, _ = read_eigenvec(pcs_path(Path(cfg["state_dir"]), m["pca"]["study_id"]))
        scores.update(dict(zip(iids, sc[:, :2])))
    ph = data.pheno
    idx = {s: i for i, s in enumerate(data.samples)}
    rows = _rows(tmp_path / "out" / "QT2.glm.linear")[1:]
    checked = 0
    for r in rows[40:60]:
        if r[-1] != ".":
            continue
        v = next(i for i, (c, p) in enumerate(zip(data.chrom, data.pos.tolist())) if c == r[0] and str(p) == r[1])
        g = data.dosage[v].astype(float)
        if r[5] == data.ref[v]:
            g = np.where(g < 0, g, 2 - g)
        smoke = ph["smoking"]
        X = np.column_stack([g, ph["age"], ph["sex"], smoke == 1, smoke == 2,
                             [scores.get(s, [np.nan, np.nan])[0] for s in data.samples],
                             [scores.get(s, [np.nan, np.nan])[1] for s in data.samples]]).astype(float)
        X[np.isnan(smoke), 3:5] = np.nan
        ok = (g >= 0) & ~np.isnan(ph["QT2"]) & ~np.isnan(X).any(axis=1)
        fit = sm.OLS(ph["QT2"][ok], sm.add_constant(X[ok])).fit()
        assert int(r[7]) == ok.sum()
        # scores are stored with PLINK's 6 significant digits: agree to a tiny fraction of the SE
        assert abs(float(r[8]) - fit.params[1]) <= 1e-3 * fit.bse[1]
        assert float(r[9]) == pytest.approx(fit.bse[1], rel=1e-4)
        checked += 1
    assert checked >= 10
    assert idx  # samples indexable


def test_gwas_ssf_sumstats_match_the_glm_tables(tmp_path):
    """Every regression table is also written as GWAS-SSF: bgzipped, tabix-indexed, sorted, one row
    per variant with a statistic, values equal to the glm table's, A1 frequency from the pooled counts."""
    import gzip

    import pysam
    import yaml

    data = make_synth(**GWAS)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], seed=5)
    out = tmp_path / "out"
    m = run_plan(gwas_plan(out, list(nodes)), InProcessTransport(nodes))
    for pheno, table, eff in (("QT2", "QT2.glm.linear", "BETA"), ("CC", "CC.glm.logistic.hybrid", "OR")):
        gz = out / "sumstats" / f"{pheno}.tsv.gz"
        assert m["association"][pheno]["sumstats"] == f"sumstats/{gz.name}"
        assert gz.read_bytes()[:4] == b"\x1f\x8b\x08\x04"  # BGZF, not plain gzip
        with gzip.open(gz, "rt") as fh:
            head = fh.readline().rstrip("\n").split("\t")
            body = [dict(zip(head, line.rstrip("\n").split("\t"))) for line in fh]
        assert head[:8] == ["chromosome", "base_pair_location", "effect_allele", "other_allele",
                            "beta" if eff == "BETA" else "odds_ratio", "standard_error", "effect_allele_frequency", "p_value"]
        keys = [(int(r["chromosome"]), int(r["base_pair_location"])) for r in body]
        assert keys == sorted(keys)
        glm = {}
        with open(out / table) as fh:
            h = fh.readline().rstrip("\n").split("\t")
            for line in fh:
                row = dict(zip(h, line.rstrip("\n").split("\t")))
                glm[(int(row["#CHROM"]), row["POS"], row["REF"], row["ALT"])] = row
        ok = [r for r in glm.values() if r["ERRCODE"] in (".", "UNFINISHED") and r["P"] != "NA"]
        assert len(body) == len(ok) > 0
        for r in body:
            ea, oa = r["effect_allele"], r["other_allele"]
            key = (int(r["chromosome"]), r["base_pair_location"])
            g = glm.get((*key, oa, ea)) or glm[(*key, ea, oa)]
            assert (r["effect_allele"], r["p_value"], r["n"]) == (g["A1"], g["P"], g["OBS_CT"])
            assert r["beta" if eff == "BETA" else "odds_ratio"] == g[eff]
            assert {r["effect_allele"], r["other_allele"]} == {g["REF"], g["ALT"]}
            assert abs(float(r["neg_log_10_p_value"]) + np.log10(float(g["P"]))) < 1e-4
            assert 0.0 <= float(r["effect_allele_frequency"]) <= 1.0
        # the index answers region queries
        first = body[0]
        with pysam.TabixFile(str(gz)) as tbx:
            hits = list(tbx.fetch(first["chromosome"], int(first["base_pair_location"]) - 1, int(first["base_pair_location"])))
        assert hits and hits[0].split("\t")[9] == first["variant_id"]
        meta = yaml.safe_load((out / "sumstats" / f"{gz.name}-meta.yaml").read_text())
        assert meta["file_type"] == "GWAS-SSF v1.0" and meta["data_file_name"] == gz.name and meta["is_sorted"] is True
        import hashlib

        assert meta["data_file_md5sum"] == hashlib.md5(gz.read_bytes()).hexdigest()
    # A1 frequency equals the pooled frequency of A1 (PLINK's afreq ALT_FREQS, oriented to A1)
    afreq = {}
    with open(out / "freq.afreq") as fh:
        h = fh.readline().rstrip("\n").split("\t")
        for line in fh:
            row = dict(zip(h, line.rstrip("\n").split("\t")))
            if row["ID"] != ".":
                afreq[row["ID"]] = row
    with gzip.open(out / "sumstats" / "QT2.tsv.gz", "rt") as fh:
        head = fh.readline().rstrip("\n").split("\t")
        checked = 0
        for line in fh:
            r = dict(zip(head, line.rstrip("\n").split("\t")))
            f = afreq.get(r["variant_id"])
            if f is None:
                continue
            checked += 1
            alt = float(f["ALT_FREQS"])
            want = alt if r["effect_allele"] == f["ALT"] else 1 - alt
            assert abs(float(r["effect_allele_frequency"]) - want) < 1e-5
    assert checked > 100


@pytest.mark.slow
def test_sumstats_pass_the_gwas_catalog_validator(tmp_path):
    """gwas-ssf's own Validator (gwas-sumstats-tools 1.0.25, in its own venv: it needs numpy < 2)
    accepts both files; only the all-autosomes and 100,000-row rules are relaxed (simulated data)."""
    import os
    import sys

    venv = Path(os.environ.get("FEDGEN_SSF_VENV", Path.home() / ".cache" / "fedgen" / "ssf-venv"))
    py = venv / "bin" / "python"
    if not py.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
        pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "gwas-sumstats-tools==1.0.25", "numpy<2", "six",
                              "click<8.2"], capture_output=True, text=True) if made.returncode == 0 else None
        if pip is None or pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"could not install gwas-sumstats-tools from the package index: {(pip.stderr if pip else '')[-300:]}")
    data = make_synth(**GWAS)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], seed=5)
    out = tmp_path / "out"
    run_plan(gwas_plan(out, list(nodes)), InProcessTransport(nodes))
    files = [str(out / "sumstats" / f"{p}.tsv.gz") for p in ("QT2", "CC")]
    script = Path(__file__).resolve().parents[1] / "scripts" / "validate_sumstats.py"
    res = subprocess.run([str(py), str(script), *files, "--relax-simulated"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.count("VALID Data table is valid") == 2
    # the same validator does fail a broken file (a test that cannot fail is no test)
    import gzip

    with gzip.open(files[0], "rt") as fh:
        lines = fh.read().splitlines()
    bad = out / "sumstats" / "BAD.tsv.gz"
    import pysam

    plain = out / "sumstats" / "BAD.tsv"
    rows = [line.split("\t") for line in lines[1:]]
    rows[3][5] = "not_a_number"  # standard_error
    plain.write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")
    pysam.tabix_compress(str(plain), str(bad), force=True)
    res = subprocess.run([str(py), str(script), str(bad), "--relax-simulated"], capture_output=True, text=True)
    assert res.returncode == 1 and "INVALID" in res.stdout


COLS = "+ax,+a1count,+totallele,+a1countcc,+totallelecc,+a1freq,+a1freqcc"


def _compare_numeric_table(ours: Path, ref: Path, *, rtol: float, firth_rtol: float = 1e-2) -> None:
    a, b = _rows(ours), _rows(ref)
    assert a[0] == b[0], f"header {a[0]} vs PLINK {b[0]}"
    assert len(a) == len(b)
    firth = a[0].index("FIRTH?") if "FIRTH?" in a[0] else None
    for x, y in zip(a[1:], b[1:]):
        if x[-1] == y[-1] == "CONST_OMITTED_ALLELE":
            continue  # see _a1_tie_ok
        tol = firth_rtol if firth is not None and x[firth] == "Y" else rtol
        for k, u, v in zip(a[0], x, y):
            if u == v:
                continue
            assert u != "NA" and v != "NA", f"{k} at {x[1]}: {u} vs PLINK {v}"
            assert abs(float(u) - float(v)) <= tol * max(abs(float(v)), 1e-3), f"{k} at {x[1]}: {u} vs PLINK {v}"


@needs_plink2
@pytest.mark.plink
@pytest.mark.parametrize("extra", [COLS, "+log10p"])
def test_glm_cols_equal_live_plink(tmp_path, extra):
    """study.glm.cols (PLINK 2's cols=) and study.glm.ci (--ci) print what PLINK 2 prints: the count and
    frequency columns over the regression's own samples (missing calls and phenotypes present)."""
    data = make_synth(n_samples=700, n_variants=150, seed=44, missing_rate=0.05)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    write_pooled_pheno(data, tmp_path / "p.pheno", tmp_path / "p.covar")
    cols = extra.replace("+log10p", "")
    glm_args = ["--glm", "hide-covar", *([f"cols={cols}"] if cols else []), *(["log10"] if "log10p" in extra else [])]
    run_plink2(["--vcf", "pooled.vcf", "--pheno", "p.pheno", "--pheno-name", "CC", "QT2", "--covar", "p.covar",
                "--covar-variance-standardize", *glm_args, "--ci", "0.95", "--out", "ref"], tmp_path)
    nodes = split_sites(data, tmp_path / "sites", [0.4, 0.6], seed=4)
    plan = gwas_plan(tmp_path / "out", list(nodes), glm_cols=list(parse_cols(extra)), glm_ci=0.95)
    run_plan(plan, InProcessTransport(nodes))
    _compare_numeric_table(tmp_path / "out" / "QT2.glm.linear", tmp_path / "ref.QT2.glm.linear", rtol=1e-5)
    _compare_numeric_table(tmp_path / "out" / "CC.glm.logistic.hybrid", tmp_path / "ref.CC.glm.logistic.hybrid", rtol=2e-3)


def test_glm_cols_parse_like_plink():
    assert parse_cols(None) == ("chrom", "pos", "ref", "alt", "firth", "test", "nobs", "orbeta", "se", "ci", "tz", "p", "err")
    assert parse_cols("+a1freq,-firth")[:6] == ("chrom", "pos", "ref", "alt", "a1freq", "test")
    assert parse_cols("chrom,pos,p") == ("chrom", "pos", "p")
    for bad, message in (("+gcountcc", "not released"), ("+a1freq,p", "not both"), ("+nope", "unknown column set")):
        with pytest.raises(ConfigError, match=message):
            parse_cols(bad)
