"""PLINK 1.9 ``--assoc`` from allele counts: hand-computed cases, a naive reference, PLINK fixtures."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedgen.stats.assoc import a1_is_ref, allelic_assoc, allelic_counts, format_assoc_columns

DATA = Path(__file__).parent / "data" / "glm"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_glm_fixtures.py"
SETS = ("main", "edge", "sep")


def read_assoc(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines()
    hdr = lines[0].split()
    rows = [line.split() for line in lines[1:]]
    return {h: np.array([r[i] for r in rows]) for i, h in enumerate(hdr)}


@functools.lru_cache(maxsize=None)
def ours(name: str) -> tuple[dict, dict, np.ndarray]:
    z = np.load(DATA / f"{name}.npz")
    g = z["dosage"]
    alt = np.where(g >= 0, g, 0).sum(1)
    ref = 2 * (g >= 0).sum(1) - alt
    a1r = a1_is_ref(alt, ref)  # over all loaded samples, phenotype-missing ones included
    counts = allelic_counts(g, z["bin"], a1_ref=a1r)
    return counts, allelic_assoc(**counts), a1r


# ------------------------------------------------------------------------------ by hand
def test_hand_computed_table() -> None:
    # cases: 30 A1 / 70 A2; controls: 10 A1 / 90 A2
    r = allelic_assoc([30], [70], [10], [90])
    n, a, b, c, d = 200, 30, 70, 10, 90
    chisq = n * (a * d - b * c) ** 2 / ((a + b) * (c + d) * (a + c) * (b + d))
    assert r["chisq"][0] == pytest.approx(chisq, rel=1e-15)
    assert r["f_a"][0] == 0.3 and r["f_u"][0] == 0.1
    assert r["or_"][0] == pytest.approx(30 * 90 / (10 * 70))
    assert r["p"][0] == pytest.approx(stats.chi2.sf(chisq, 1), rel=1e-13)
    assert format_assoc_columns(r)["CHISQ"] == ["        12.5"]


def test_na_rules() -> None:
    #            no A1 at all | no case alleles | b*c == 0 | a*d == 0
    r = allelic_assoc([0, 0, 5, 0], [10, 0, 5, 5], [0, 4, 0, 3], [10, 6, 5, 5])
    f = {k: [s.strip() for s in v] for k, v in format_assoc_columns(r).items()}
    assert f["CHISQ"][0] == "NA" and f["P"][0] == "NA" and f["OR"][0] == "NA"
    # only the case total is 0: PLINK 1.9 prints F_A NA but CHISQ 0, P 1 (not NA)
    assert f["F_A"][1] == "NA" and f["CHISQ"][1] == "0" and f["P"][1] == "1"
    assert f["OR"][2] == "NA" and f["CHISQ"][2] != "NA"
    assert f["OR"][3] == "0"


def test_matches_scipy_contingency_naive() -> None:
    rng = np.random.default_rng(5)
    a, b, c, d = rng.integers(1, 400, (4, 300))
    r = allelic_assoc(a, b, c, d)
    for i in range(0, 300, 17):
        chi, p, _, _ = stats.chi2_contingency([[a[i], b[i]], [c[i], d[i]]], correction=False)
        assert r["chisq"][i] == pytest.approx(chi, rel=1e-12)
        assert r["p"][i] == pytest.approx(p, rel=1e-10)


def test_a1_choice() -> None:
    # minor allele; a tie keeps A1 = ALT; no observations keep ALT
    assert a1_is_ref([10, 50, 51, 0], [90, 50, 49, 0]).tolist() == [False, False, True, False]


def test_counts_sum_over_sites() -> None:
    z = np.load(DATA / "edge.npz")
    g, y = z["dosage"], z["bin"]
    a1r = ours("edge")[2]
    pooled = allelic_counts(g, y, a1_ref=a1r)
    parts = np.array_split(np.random.default_rng(0).permutation(g.shape[1]), 3)
    summed = [allelic_counts(g[:, p], y[p], a1_ref=a1r) for p in parts]
    for k in "abcd":
        np.testing.assert_array_equal(sum(s[k] for s in summed), pooled[k])


# ------------------------------------------------------------------------------ PLINK 1.9
@pytest.mark.parametrize("name", SETS)
def test_assoc_columns_identical_to_plink19(name: str) -> None:
    P = read_assoc(DATA / f"{name}.assoc")
    z = np.load(DATA / f"{name}.npz")
    counts, res, a1r = ours(name)
    assert (np.where(a1r, z["ref"], z["alt"]) == P["A1"]).all()
    assert (np.where(a1r, z["alt"], z["ref"]) == P["A2"]).all()
    text = format_assoc_columns(res)
    for col in ("F_A", "F_U", "CHISQ", "P", "OR"):
        mine = np.array([s.strip() for s in text[col]])
        bad = np.flatnonzero(mine != P[col])
        assert not bad.size, (col, [(i, mine[i], P[col][i]) for i in bad[:5]])


def test_assoc_fields_are_fixed_width_like_plink() -> None:
    line = (DATA / "main.assoc").read_text().splitlines()[1]
    _, res, _ = ours("main")
    text = format_assoc_columns(res)
    tail = f" {text['CHISQ'][0]} {text['P'][0]} {text['OR'][0]} "
    assert line.endswith(tail)
    assert f" {text['F_A'][0]} {text['F_U'][0]} " in line


@pytest.mark.plink
@pytest.mark.skipif(shutil.which("plink1.9") is None, reason="plink1.9 not installed")
def test_live_plink19_assoc(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_glm_fixtures_assoc", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_glm_fixtures_assoc"] = mod
    spec.loader.exec_module(mod)
    data = mod.build("sep")
    mod.write_inputs(data, tmp_path)
    subprocess.run(mod.plink19_assoc_cmd(mod.plink19_binary(), "sep", "live"), cwd=tmp_path,
                   check=True, capture_output=True)
    assert (tmp_path / "live.assoc").read_text() == (DATA / "sep.assoc").read_text()
