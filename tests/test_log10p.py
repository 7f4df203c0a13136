"""P values below 1e-308 (issue: exp(ln P) underflowed to 0 and the strongest hit vanished)."""

from __future__ import annotations

import json

import numpy as np

from fedgen.results import load_results
from fedgen.results.plots import lambda_gc, manhattan_qq, mlog10p_from_text
from fedgen.stats.plinkfmt import format_g6_from_ln
from fedgen.study.gwas import mlog10p_from_ln
from fedgen.stats.pvalues import p_text


def _p_text(log10p: float) -> str:  # the top-hits text, from log10 P
    return p_text(-log10p)


def test_printed_p_below_double_range_keeps_its_size():
    ln_p = np.array([-1000.0, -700.0, np.log(0.5), np.nan])
    text = format_g6_from_ln(ln_p)
    m = mlog10p_from_text(list(text) + ["NA", "0"])
    np.testing.assert_allclose(m[:3], -ln_p[:3] / np.log(10), rtol=1e-5)
    assert np.isnan(m[3]) and np.isnan(m[4]) and np.isinf(m[5])
    assert float(text[0]) == 0.0  # what float() made of it: the old plots dropped the row
    np.testing.assert_allclose(mlog10p_from_ln(ln_p[:3]), -ln_p[:3] / np.log(10))
    assert _p_text(-434.2945) == "5.08e-435" and _p_text(-1.0) == "1.00e-01"


def test_lambda_from_log10p_equals_lambda_from_p():
    rng = np.random.default_rng(1)
    p = rng.random(5000) ** 1.3
    assert abs(lambda_gc(p) - lambda_gc(mlog10p=-np.log10(p))) < 1e-9
    m = -np.log10(p)
    m[0] = 434.0  # a hit far below 1e-308 counts like any other very small P (here 1e-300)
    q = p.copy()
    q[0] = 1e-300
    assert abs(lambda_gc(mlog10p=m) - lambda_gc(q)) < 1e-9


def test_plots_and_top_hits_keep_the_strongest_hit(tmp_path):
    chrom = np.array(["1"] * 50 + ["2"] * 50)
    pos = np.tile(np.arange(1, 51) * 1000, 2)
    m = np.linspace(0.01, 3, 100)
    m[37] = 434.29
    files = manhattan_qq(chrom, pos, mlog10p=m, title="X", out_prefix=tmp_path / "plots" / "X")
    assert [f.name for f in files] == ["X_manhattan.png", "X_qq.png"]
    # a results folder whose glm table prints that P: the Results API ranks it first
    res = tmp_path / "res"
    res.mkdir()
    (res / "manifest.json").write_text(json.dumps({"sites": {}}))
    rows = ["#CHROM\tPOS\tID\tREF\tALT\tA1\tTEST\tOBS_CT\tBETA\tSE\tT_STAT\tP\tERRCODE"]
    for i in range(5):
        p = "5.07596e-435" if i == 3 else f"0.{i + 1}"
        rows.append(f"1\t{i + 1}\trs{i}\tA\tG\tG\tADD\t100\t0.1\t0.01\t5\t{p}\t.")
    (res / "Q.glm.linear").write_text("\n".join(rows) + "\n")
    top = load_results(res).top_hits("Q", 2)
    assert top["ID"].tolist()[0] == "rs3"
    assert abs(top["MLOG10P"].tolist()[0] - 434.2945) < 1e-3
