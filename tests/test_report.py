"""RESULTS/report.html (fedgen.results.report) and ``fedgen plot region``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import PLINK_EXACT_POLICY, qc_plan, split_sites
from fedgen.cli import main
from fedgen.federation.transport import InProcessTransport
from fedgen.results.report import (
    MAX_BULK_POINTS,
    manhattan_figure,
    p_text,
    parse_locus,
    plot_region,
    read_association,
    thin_indices,
    write_report,
    write_study_report,
)
from fedgen.study.pca import pca_settings
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

NO_QC = {"maf": None, "geno": None, "hwe": None}
POLICY = {**PLINK_EXACT_POLICY, "extra_analyses": [*PLINK_EXACT_POLICY["extra_analyses"], "pca_histograms"]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small GWAS with PCA (2 PCs as covariates): QT2 linear, CC logistic + allelic test."""
    tmp = tmp_path_factory.mktemp("report")
    data = make_synth(n_samples=240, n_variants=150, seed=44)
    nodes = split_sites(data, tmp / "sites", [0.6, 0.4], policy=POLICY)
    plan = qc_plan(tmp / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "pca", "glm"],
                   phenotypes=["CC", "QT2"], covariates=["age", "sex"], qc=NO_QC, study_id="reporttest")
    plan.update(pcs=2, pca=pca_settings({"k": 3, "maf": 0.05, "ld_prune": None, "build": None}, pcs=2))
    manifest = run_plan(plan, InProcessTransport(nodes))
    return tmp / "out", manifest


def _figure(text: str, div_id: str) -> tuple[list[dict], dict]:
    """The data and layout of the plotly figure in ``<div id=div_id>`` of a report."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', text)
    dec = json.JSONDecoder()
    data, end = dec.raw_decode(text, m.end())
    rest = text[end:]
    layout, _ = dec.raw_decode(rest.lstrip(", \n"))
    return data, layout


def _lead(path: Path) -> tuple[str, int]:
    df = read_association(path)
    i = int(np.nanargmax(df["MLOG10P"].to_numpy()))
    return str(df["CHROM"].iloc[i]), int(df["POS"].iloc[i])


def _patched_copy(src: Path, dst: Path, table: str, row: int, p: str) -> tuple[str, int, str]:
    """Copy a results folder, set the P of data row ``row`` of ``table`` to ``p``; returns its CHROM, POS, ID."""
    shutil.copytree(src, dst)
    lines = (dst / table).read_text().splitlines()
    header = lines[0].split("\t")
    fields = lines[row + 1].split("\t")
    fields[header.index("P")] = p
    fields[header.index("ERRCODE")] = "."
    lines[row + 1] = "\t".join(fields)
    (dst / table).write_text("\n".join(lines) + "\n")
    return fields[0], int(fields[1]), fields[2]


def test_report_written_at_the_end_of_a_study(study):
    out, manifest = study
    report = out / "report.html"
    assert report.exists()
    assert "report.html" in manifest["files"]
    assert "report.html" in json.loads((out / "manifest.json").read_text())["files"]
    text = report.read_text()
    # offline: plotly.js inlined exactly once, no external scripts
    assert text.count("* plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", text)
    # a Manhattan and a QQ figure per phenotype
    for pheno in ("CC", "QT2"):
        assert f'id="manhattan-{pheno}"' in text and f'id="qq-{pheno}"' in text
        lam = manifest["association"][pheno]["lambda_gc"]
        assert f"<b>λGC = {lam:.4f}</b>" in text
        assert f"without PCs {manifest['association'][pheno]['lambda_gc_without_pcs']:.3f}" in text
    assert "CC.glm.logistic.hybrid" in text  # the regression, not the allelic test, for CC
    # the site table: one row per site with its samples
    table = re.search(r'<table class="sites">(.*?)</table>', text, re.S).group(1)
    for site, s in manifest["sites"].items():
        assert re.search(rf"<td>{site}</td><td>{s['samples']:,}</td><td>{s['variants']:,}</td>", table)
    # PCA: eigenvalues and the per-site histograms embedded as an image
    assert 'id="pca-eigenvalues"' in text and "data:image/png;base64," in text
    # the manifest, collapsed
    assert "<details><summary>manifest.json</summary>" in text and "reporttest" in text
    assert 'id="epsilon"' not in text  # not a DP study


def test_p_below_1e308_in_report_and_region(study, tmp_path, capsys):
    out, _ = study
    res = tmp_path / "res"
    chrom, pos, vid = _patched_copy(out, res, "QT2.glm.linear", 60, "1e-400")
    df = read_association(res / "QT2.glm.linear")
    assert df.loc[df["POS"] == pos, "MLOG10P"].max() == pytest.approx(400.0)
    text = write_report(res).read_text()
    assert "P = 1.00e-400" in text  # hover text of the Manhattan point
    top = re.search(r'<h3 id="pheno-QT2">.*?<table class="tophits">(.*?)</table>', text, re.S).group(1)
    first = re.search(r"<tbody><tr>(.*?)</tr>", top).group(1)
    assert f"<td>{pos:,}</td><td>1.00e-400</td><td>400</td>" in first
    # the Manhattan trace carries the point at y = 400, with its P in the hover text
    data, _ = _figure(text, "manhattan-QT2")
    hit = [(y, t) for tr in data for y, t in zip(tr["y"], tr.get("text", [])) if f":{pos}<br>" in t]
    assert hit == [(pytest.approx(400.0), f"{vid if vid != '.' else ''} {chrom}:{pos}<br>P = 1.00e-400")]

    rc = main(["plot", "region", str(res), f"{chrom}:{pos}", "--phenotype", "QT2", "--window", "2000000",
               "--out", str(tmp_path / "reg.png")])
    assert rc == 0
    said = capsys.readouterr().out
    assert f"lead {vid} at {chrom}:{pos} (P = 1.00e-400)" in said
    png, html = tmp_path / "reg.png", tmp_path / "reg.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h = html.read_text()
    assert "1.00e-400" in h and not re.search(r"<script[^>]+src=", h)
    r = plot_region(res, f"chr{chrom}:{pos:,}", window=0, out=tmp_path / "one")
    assert r["phenotype"] == "QT2" and r["mlog10p"] == pytest.approx(400.0) and r["variants"] >= 1


def test_region_default_phenotype_and_output(study, capsys):
    out, _ = study
    chrom, pos = _lead(out / "QT2.glm.linear")
    assert main(["plot", "region", str(out), f"{chrom}:{pos}"]) == 0
    said = capsys.readouterr().out
    ph = said.split(":")[0]
    assert ph in ("CC", "QT2")
    assert (out / "plots" / f"region_{ph}_{chrom}_{pos}.png").exists()
    assert (out / "plots" / f"region_{ph}_{chrom}_{pos}.html").exists()


@pytest.mark.parametrize("args, message", [
    (["1-12345"], "expected a position as CHR:POS"),
    (["1:12x"], "expected a position as CHR:POS"),
    (["1:1", "--phenotype", "NOPE"], "phenotype 'NOPE' has no association results"),
    (["1:1"], "no association result at 1:1 for any phenotype"),
    (["99:1000"], "contig 99 has no tested variants"),
])
def test_region_bad_input_is_a_clear_error(study, capsys, args, message):
    out, _ = study
    assert main(["plot", "region", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_region_without_association_results(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["plot", "region", str(tmp_path), "1:100"]) == 2
    assert "no association results" in capsys.readouterr().err
    assert main(["plot", "region", str(tmp_path / "missing"), "1:100"]) == 2
    assert "no such results folder" in capsys.readouterr().err


def test_parse_locus():
    assert parse_locus("chr1:12,345") == ("1", 12345)
    assert parse_locus(" X:5 ") == ("X", 5)
    assert p_text(400.0) == "1.00e-400" and p_text(np.inf) == "0"


def _synthetic_results(path: Path, n: int, *, seed: int = 0) -> pd.DataFrame:
    """A results folder with one linear table of ``n`` null variants (uniform P) and a manifest."""
    rng = np.random.default_rng(seed)
    chrom = np.repeat(["1", "2", "10"], -(-n // 3))[:n]
    pos = np.concatenate([np.sort(rng.choice(10**8, int((chrom == c).sum()), replace=False)) for c in ("1", "2", "10")])
    p = rng.uniform(size=n)
    path.mkdir(parents=True, exist_ok=True)
    lines = ["#CHROM\tPOS\tID\tREF\tALT\tA1\tTEST\tOBS_CT\tBETA\tSE\tT_STAT\tP\tERRCODE"]
    lines += [f"{c}\t{q}\trs{i}\tA\tG\tG\tADD\t100\t0.1\t0.1\t1\t{x:.6g}\t." for i, (c, q, x) in enumerate(zip(chrom, pos, p))]
    (path / "T.glm.linear").write_text("\n".join(lines) + "\n")
    return pd.DataFrame({"CHROM": chrom, "POS": pos, "P": p})


def test_manhattan_thins_only_the_bulk(tmp_path):
    n = MAX_BULK_POINTS + 15_000
    truth = _synthetic_results(tmp_path, n)
    df = read_association(tmp_path / "T.glm.linear")
    fig = manhattan_figure(df, "T")
    ys = np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data])
    strong = int((truth["P"] < 0.01).sum())
    assert strong > 100
    assert len(ys) == strong + MAX_BULK_POINTS
    assert int((ys > 2).sum()) == strong  # every P < 0.01 kept
    assert "not drawn" in fig.layout.title.text
    # a table written with PLINK's log10 modifier (LOG10_P = −log10 P) reads the same
    t = pd.read_csv(tmp_path / "T.glm.linear", sep="\t", dtype=str)
    t["LOG10_P"] = df["MLOG10P"].map(lambda v: f"{v:.6g}")
    t.drop(columns="P").to_csv(tmp_path / "L.glm.linear", sep="\t", index=False)
    np.testing.assert_allclose(read_association(tmp_path / "L.glm.linear")["MLOG10P"], df["MLOG10P"], rtol=1e-5)
    # more strong rows than max_strong: the strongest are kept, the others join the bulk
    m = df["MLOG10P"].to_numpy()
    strong_rows, bulk_rows = thin_indices(m, max_strong=50, max_bulk=10)
    assert len(strong_rows) == 50 and m[strong_rows].min() >= np.sort(m)[-50]
    assert len(bulk_rows) == 10 and not set(strong_rows) & set(bulk_rows)


def test_dp_report_shows_epsilon_per_site(tmp_path):
    _synthetic_results(tmp_path, 300)
    releases = [{"analysis": "dp_genotype_counts", "epsilon": 0.8, "site_epsilon_spent_after": 0.8,
                 "events": [{"type": "gaussian", "sigma": 3.5, "l2": 1.0}]}]
    manifest = {
        "study": "dp", "study_id": "x", "privacy": {"mode": "dp", "epsilon": 2.0, "delta": 1e-6},
        "sites": {"hk": {"samples": 100, "variants": 300, "epsilon_spent": 1.25, "privacy_releases": releases},
                  "sz": {"samples": 80, "variants": 300, "epsilon_spent": 1.5, "privacy_releases": releases}},
        "association": {"T": {"kind": "quantitative"}}, "files": ["T.glm.linear"],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = write_report(tmp_path).read_text()
    data, layout = _figure(text, "epsilon")
    assert data[0]["x"] == ["hk", "sz"] and data[0]["y"] == [1.25, 1.5]
    assert layout["annotations"][0]["text"] == "study ε = 2.0"
    rel = re.search(r'<table class="releases">(.*?)</table>', text, re.S).group(1)
    assert rel.count("dp_genotype_counts") == 2 and "3.5" in rel
    assert 'id="manhattan-T"' in text and 'id="pca' not in text


def test_study_report_failure_costs_only_the_report(tmp_path, monkeypatch):
    import fedgen.results.report as rep

    def boom(*a, **k):
        raise ValueError("no good")

    monkeypatch.setattr(rep, "render_report", boom)
    manifest = {"files": ["a.tsv"], "notes": []}
    write_study_report(tmp_path, manifest)
    assert manifest["files"] == ["a.tsv"] and not (tmp_path / "report.html").exists()
    assert "report.html not written: ValueError: no good" in manifest["notes"][0]


def test_lambda_gc_from_the_middle_order_statistics_equals_the_median_chi2():
    from scipy import stats

    from fedgen.results.plots import lambda_gc

    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 6, 999, 1000):
        p = rng.uniform(size=n) ** 2
        direct = float(np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1))
        assert lambda_gc(p) == pytest.approx(direct, rel=1e-14)
        assert lambda_gc(mlog10p=-np.log10(p)) == pytest.approx(direct, rel=1e-12)
    assert lambda_gc(mlog10p=np.array([400.0, 500.0, 1.0])) == np.inf  # P below 1e-308: χ² infinite


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no headless Chromium here (Debian package chromium)")
def test_report_renders_offline_in_headless_chromium(study, tmp_path):
    """The report opens with no network: every figure is drawn (plotly's SVG) by the inlined script."""
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    report = study[0] / "report.html"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
                          "--proxy-server=127.0.0.1:9", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    n_divs = len(re.findall(r'class="[^"]*plotly-graph-div', dom))
    n_drawn = dom.count('class="main-svg"')
    assert n_divs >= 3 and n_drawn >= n_divs, (n_divs, n_drawn)
