"""privacy=dp panels and allele frequencies: noise as stated, post-processing only, beats guessing."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import qc_plan, split_sites
from scipy import stats

from fedgen.errors import ConfigError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.privacy.accounting import rho_for_epsilon
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.privacy.mechanisms import NoiseSource, discrete_gaussian, discrete_gaussian_pmf
from fedgen.study.dpfreq import dp_alt_freq, panel_rows, read_panel
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

GT = dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")
N_PER_SITE, N_VARIANTS, PANEL = 1500, 6000, 1000


class Recording(InProcessTransport):
    """The in-process transport, keeping every site's reply to ``dp_genotype_counts`` (what was released)."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.released: list[dict] = []

    def query(self, request: Request):
        replies = super().query(request)
        if request.analysis == "dp_genotype_counts":
            self.released.append({"request": request, "replies": replies})
        return replies


def _read_table(path: Path) -> dict[str, list[str]]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    cols = list(zip(*(ln.split("\t") for ln in lines[1:])))
    return {h: list(c) for h, c in zip(head, cols)}


def _afreq(path: Path) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    t = _read_table(path)
    keys = list(zip(t["#CHROM"], t["POS"]))
    return keys, {k: np.array([float(x) for x in v]) for k, v in t.items()
                  if k in ("ALT_FREQS", "ALT_FREQS_RAW", "ALT_FREQS_SE", "L95", "U95", "OBS_CT")}


def _dp_plan(out: Path, sites: list[str], *, panel: Path | None, eps: float = 1.0):
    plan = qc_plan(out, sites, analyses=["freq", "missing", "hardy", "topk"], phenotypes=["CC"], covariates=[],
                   qc={"maf": None, "geno": None, "hwe": None}, pca=None, pcs=0, block_size=65536)
    plan["privacy"] = {"mode": "dp", "epsilon": eps, "delta": 1e-6, "topk": 10, "force": True}
    plan["dp"] = {"panel": None if panel is None else str(panel)}
    return plan


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 case-control sites of 1,500 people, 6,000 variants; exact pooled frequencies; a 1,000-variant panel."""
    tmp = tmp_path_factory.mktemp("dpfreq")
    data = make_synth(3 * N_PER_SITE, N_VARIANTS, seed=31, missing_rate=0.01)
    nodes = split_sites(data, tmp / "sites", [1, 1, 1], seed=4, conventions=[GT, dict(GT, chr_prefix=True)], policy=None)
    run_plan(qc_plan(tmp / "exact", list(nodes), analyses=["freq"], qc={"maf": None, "geno": None, "hwe": None},
                     pca=None, pcs=0, block_size=65536), InProcessTransport(nodes))
    keys, exact = _afreq(tmp / "exact" / "freq.afreq")
    table = _read_table(tmp / "exact" / "freq.afreq")
    rng = np.random.default_rng(8)
    pick = np.sort(rng.choice(len(keys), PANEL, replace=False))
    lines = ["# a 1,000-variant panel: IDs where the study has one, else chrN:POS:ALT:REF (swapped, chr-prefixed)"]
    for i in pick.tolist():
        vid = table["ID"][i]
        lines.append(vid if vid != "." else f"chr{table['#CHROM'][i]}:{table['POS'][i]}:{table['ALT'][i]}:{table['REF'][i]}")
    panel = tmp / "panel.txt"
    panel.write_text("\n".join(lines) + "\n")
    return {"tmp": tmp, "nodes": nodes, "keys": keys, "exact": exact["ALT_FREQS"], "panel": panel,
            "panel_keys": {keys[i] for i in pick.tolist()}}


@pytest.fixture(scope="module")
def dp_runs(cohort):
    """The DP study at ε = 1 per site with the panel and without it (seeded site noise)."""
    import fedgen.analyses.dp as dpmod

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        seeds = itertools.count(1000)  # a fixed, different seed for every draw
        mp.setattr(dpmod, "_noise_source", lambda: NoiseSource(seed=next(seeds)))
        for name, panel in (("panel", cohort["panel"]), ("genome", None)):
            tr = Recording(cohort["nodes"])
            res = cohort["tmp"] / f"dp_{name}"
            manifest = run_plan(_dp_plan(res, list(cohort["nodes"]), panel=panel), tr)
            keys, est = _afreq(res / "freq.afreq")
            pos = {k: i for i, k in enumerate(cohort["keys"])}
            truth = cohort["exact"][[pos[k] for k in keys]]
            out[name] = {"manifest": manifest, "keys": keys, "est": est, "truth": truth, "released": tr.released, "res": res}
    return out


def _hwe_counts(rng, f, n):
    """(V, 4) genotype class counts of n people per variant in Hardy-Weinberg proportions, none missing."""
    g = rng.binomial(1, f[:, None], (len(f), n)) + rng.binomial(1, f[:, None], (len(f), n))
    return np.stack([(g == 0).sum(1), (g == 1).sum(1), (g == 2).sum(1), np.zeros(len(f), np.int64)], axis=1)


def _mae(x, y):
    return float(np.mean(np.abs(np.asarray(x) - np.asarray(y))))


# ----------------------------------------------------------------------------- the noise as stated


def _chi2_pvalue(resid: np.ndarray, sigma: float, bins: int = 20) -> float:
    """χ² goodness of fit of integer residuals against N_Z(0, σ²), in ``bins`` near-equiprobable bins."""
    half = int(math.ceil(12 * sigma)) + 10
    k = np.arange(-half, half + 1)
    cdf = np.cumsum(discrete_gaussian_pmf(k, sigma))
    edges = np.searchsorted(cdf, np.linspace(0, 1, bins + 1)[1:-1])  # bin j: k <= k[edges[j]]
    cuts = k[edges]
    idx = np.searchsorted(cuts, resid, side="left")
    obs = np.bincount(idx, minlength=bins).astype(float)
    p_cut = np.concatenate([[0.0], cdf[edges], [1.0]])
    exp = resid.size * np.diff(p_cut)
    return float(stats.chi2.sf(((obs - exp) ** 2 / exp).sum(), bins - 1))


def test_released_counts_noise_matches_stated_sigma(cohort, dp_runs):
    """Released − exact genotype counts at every site fit N_Z(0, σ²) with σ = √(panel size)/√(2ρ_counts)."""
    run = dp_runs["panel"]
    rel = run["manifest"]["privacy"]["releases"][0]
    assert rel["release"] == "genotype counts" and rel["variants"] == PANEL
    rho_counts = rho_for_epsilon(1.0, 1e-6) * 0.2 / 0.8  # counts' share of the split (no assoc: 0.2 of 0.8)
    assert rel["rho"] == pytest.approx(rho_counts)
    sigma = rel["sigma"]
    assert sigma == pytest.approx(math.sqrt(PANEL) / math.sqrt(2 * rho_counts))
    tr = InProcessTransport(cohort["nodes"])
    resid = []
    for item in run["released"]:
        req = item["request"]
        exact = tr.query(Request("genotype_counts", per_site_arrays=req.per_site_arrays))
        for site, rep in item["replies"].items():
            assert rep.meta["sigma"] == sigma  # each site states the σ it used
            resid.append((rep.arrays["counts"] - exact[site].arrays["counts"]).ravel())
    resid = np.concatenate(resid)
    assert resid.size == 3 * PANEL * 4
    assert _chi2_pvalue(resid, sigma) > 1e-3
    assert abs(resid.std() / sigma - 1) < 0.05
    # the test has power: the same residuals are rejected as noise of a σ 10 % off
    assert _chi2_pvalue(resid, 1.1 * sigma) < 1e-3 and _chi2_pvalue(resid, sigma / 1.1) < 1e-3


# ----------------------------------------------------------------------------- post-processing only


def test_estimator_takes_only_the_release():
    """The estimator's inputs are the noisy counts, a public sample count and the noise variance: no cohort."""
    assert list(inspect.signature(dp_alt_freq).parameters) == ["noisy_counts", "n_samples", "noise_var"]
    rng = np.random.default_rng(1)
    V, N, sigma = 500, 3000, 40.0
    g = _hwe_counts(rng, rng.uniform(0, 1, V), N)
    noise = discrete_gaussian(sigma, (V, 4), NoiseSource(3))
    noisy = g + noise
    a = dp_alt_freq(noisy, N, sigma**2)
    # another cohort whose release happened to be the same numbers: the same answer, whatever its genotypes
    other = g[::-1].copy()
    b = dp_alt_freq(other + (noisy - other), N, sigma**2)
    for key in ("alt_freq", "alt_freq_raw", "se", "l95", "u95"):
        np.testing.assert_array_equal(a[key], b[key])
    assert np.all((a["alt_freq"] >= 0) & (a["alt_freq"] <= 1))


def test_freq_file_is_a_function_of_the_released_counts(cohort, dp_runs):
    """freq.afreq equals the estimator applied to what the sites released (+ public sample counts)."""
    run = dp_runs["panel"]
    (item,) = run["released"]  # one block: the panel's 1,000 variants
    noisy = sum(rep.arrays["counts"] for rep in item["replies"].values())
    n = sum(int(s["samples"]) for s in run["manifest"]["sites"].values())
    sigma = run["manifest"]["privacy"]["releases"][0]["sigma"]
    est = dp_alt_freq(noisy, n, 3 * sigma**2)
    for col, key in (("ALT_FREQS", "alt_freq"), ("ALT_FREQS_RAW", "alt_freq_raw"), ("ALT_FREQS_SE", "se"),
                     ("L95", "l95"), ("U95", "u95")):
        np.testing.assert_allclose(run["est"][col], est[key], rtol=1e-5, atol=1e-6)
    head = (run["res"] / "freq.afreq").read_text().splitlines()[0].split("\t")
    assert head == ["#CHROM", "POS", "ID", "REF", "ALT", "ALT_FREQS", "OBS_CT", "ALT_FREQS_RAW", "ALT_FREQS_SE",
                    "L95", "U95"]


# ----------------------------------------------------------------------------- utility


def test_panel_frequencies_beat_guessing_and_the_genome_wide_release(cohort, dp_runs):
    p, g = dp_runs["panel"], dp_runs["genome"]
    assert set(p["keys"]) == cohort["panel_keys"] and len(p["keys"]) == PANEL
    assert len(g["keys"]) == len(cohort["keys"]) > 5 * PANEL
    truth = p["truth"]
    guess = _mae(truth, truth.mean())  # the know-nothing guess: every variant at the mean frequency
    shrunk = _mae(p["est"]["ALT_FREQS"], truth)
    raw = _mae(p["est"]["ALT_FREQS_RAW"], truth)
    assert shrunk <= 0.5 * guess, (shrunk, raw, guess)
    # genome-wide (6x the variants, so √6 x the noise), scored on the same panel variants: worse
    in_panel = np.array([k in cohort["panel_keys"] for k in g["keys"]])
    g_shrunk = _mae(g["est"]["ALT_FREQS"][in_panel], g["truth"][in_panel])
    assert g_shrunk > 1.5 * shrunk, (g_shrunk, shrunk)
    g_truth = g["truth"]
    assert _mae(g["est"]["ALT_FREQS"], g_truth) > _mae(p["est"]["ALT_FREQS"], truth)
    # the planner's prediction, made before any release, is within 20 % of what was measured
    for run, truth_, est in ((p, truth, p["est"]), (g, g["truth"], g["est"])):
        planned = next(r for r in run["manifest"]["privacy"]["planner"]["releases"] if r["release"].startswith("genotype"))
        measured = _mae(est["ALT_FREQS"], truth_)
        assert planned["af_mae_shrunk"] == pytest.approx(measured, rel=0.2), (planned, measured)
    # manifest: the panel, its size and the intersection
    rec = p["manifest"]["privacy"]["panel"]
    assert rec["file"] == str(cohort["panel"]) and rec["entries"] == PANEL and rec["in_study"] == PANEL
    assert rec["unknown"] == 0 and g["manifest"]["privacy"]["panel"] is None
    sel = [r for r in p["manifest"]["privacy"]["releases"] if "selection" in r["release"]]
    top = [r for r in p["manifest"]["privacy"]["releases"] if "selected variants" in r["release"]]
    assert sel and top and top[0]["variants"] <= 3 * 10
    hits = {(h["chrom"], str(h["pos"])) for h in p["manifest"]["association"]["CC"]["top_hits"]}
    assert hits <= cohort["panel_keys"]  # top-k candidates come from the panel only
    # the sites' accounting does not change with the panel: each spent exactly ε = 1 per study
    for s in cohort["nodes"]:
        assert p["manifest"]["sites"][s]["epsilon_spent"] == pytest.approx(1.0, rel=1e-6)
        assert g["manifest"]["sites"][s]["epsilon_spent"] == pytest.approx(1.0, rel=1e-6)


def test_intervals_cover_the_truth_about_95_percent(dp_runs):
    for name in ("panel", "genome"):
        run = dp_runs[name]
        t, est = run["truth"], run["est"]
        cover = float(np.mean((est["L95"] <= t + 1e-6) & (t - 1e-6 <= est["U95"])))
        assert 0.9 <= cover <= 0.99, (name, cover)
        # the raw estimate's error over its SE is close to standard normal
        z = (np.clip(est["ALT_FREQS_RAW"], 0, 1) - t) / est["ALT_FREQS_SE"]
        inner = (t > 0.2) & (t < 0.8)  # away from the clamp at 0 and 1
        assert 0.85 <= np.std(z[inner]) <= 1.15, (name, np.std(z[inner]))


def test_shrinkage_falls_back_to_the_mean_when_noise_swamps_the_data():
    rng = np.random.default_rng(2)
    V, N = 2000, 500
    exact = _hwe_counts(rng, rng.beta(0.6, 1.2, V), N)
    truth = (exact[:, 1] + 2 * exact[:, 2]) / (2 * N)
    for sigma in (5.0, 500.0):  # σ = N: the noise of one variant swamps it, the pooled mean is still known
        est = dp_alt_freq(exact + discrete_gaussian(sigma, (V, 4), NoiseSource(4)), N, sigma**2)
        guess = _mae(truth, truth.mean())
        if sigma == 5.0:
            assert _mae(est["alt_freq"], truth) < 0.1 * guess
        else:  # nothing to learn: the estimate is (close to) the pooled mean, not worse than the guess
            assert _mae(est["alt_freq"], truth) <= 1.1 * guess
            assert np.ptp(est["alt_freq"]) < 0.05


# ----------------------------------------------------------------------------- panels


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("panel")
    data = make_synth(300, 200, seed=5, missing_rate=0.01)
    nodes = split_sites(data, tmp / "sites", [0.5, 0.5], seed=1, conventions=[GT, dict(GT, chr_prefix=True)], policy=None)
    return data, nodes


def test_panel_entries_forms_and_unknown_entries_are_noted(small, tmp_path):
    data, nodes = small
    i_id = next(i for i in range(10, 200) if data.ids[i] != ".")
    i_noid = next(i for i in range(10, 200) if data.ids[i] == ".")
    panel = tmp_path / "panel.txt"
    panel.write_text(
        "# replication panel\n\n"
        f"{data.ids[i_id]}   some annotation\n"
        f"{data.ids[i_id]}\n"  # listed twice: counted once
        f"chr{data.chrom[i_noid]}:{data.pos[i_noid]}:{data.alt[i_noid]}:{data.ref[i_noid]}  # chr-prefixed, swapped\n"
        f"{data.chrom[i_id + 1]}:{data.pos[i_id + 1]}:{data.ref[i_id + 1].lower()}:{data.alt[i_id + 1].lower()}\n"
        "rs999999999\n22:1:A:C\nnot-a-variant\n"
    )
    assert read_panel(panel)[0] == data.ids[i_id] and len(read_panel(panel)) == 6
    plan = _dp_plan(tmp_path / "out", list(nodes), panel=panel, eps=1.0)
    plan["analyses"], plan["phenotypes"] = ["freq", "missing", "hardy"], []
    manifest = run_plan(plan, InProcessTransport(nodes))
    rec = manifest["privacy"]["panel"]
    assert rec["entries"] == 6 and rec["in_study"] == 3 and rec["unknown"] == 3
    assert rec["unknown_examples"] == ["rs999999999", "22:1:A:C", "not-a-variant"]
    note = next(n for n in manifest["notes"] if n.startswith("study.dp.panel"))
    assert "3 of 6 panel entries are not study variants" in note and "rs999999999" in note
    assert manifest["privacy"]["releases"][0]["variants"] == 3
    assert manifest["privacy"]["releases"][0]["sigma"] == pytest.approx(
        math.sqrt(3) / math.sqrt(2 * rho_for_epsilon(1.0, 1e-6)))
    got = {(c, int(p)) for c, p in zip(*[_read_table(tmp_path / "out" / "freq.afreq")[k] for k in ("#CHROM", "POS")])}
    want = {(str(data.chrom[i]), int(data.pos[i])) for i in (i_id, i_noid, i_id + 1)}
    assert got == want
    for name in ("missing.vmiss", "hardy.hardy", "variants.tsv"):
        assert len((tmp_path / "out" / name).read_text().splitlines()) == 1 + 3


def test_panel_with_no_study_variant_is_a_clear_error_and_releases_nothing(small, tmp_path):
    _, nodes = small
    for nc in nodes.values():
        nc["state_dir"] = str(tmp_path / "state" / nc["site"])
    panel = tmp_path / "panel.txt"
    panel.write_text("rs999999999\n22:1:A:C\n")
    with pytest.raises(ConfigError, match=r"study.dp.panel: none of the 2 variants of .*panel.txt is a study variant"):
        run_plan(_dp_plan(tmp_path / "out", list(nodes), panel=panel), InProcessTransport(nodes))
    assert not (tmp_path / "out").exists()
    for nc in nodes.values():
        ledger = Path(nc["state_dir"]) / LEDGER_FILE
        assert not ledger.exists() or Ledger(ledger, epsilon_budget=10, delta=1e-6).spent()["epsilon"] == 0.0


def test_panel_config_is_validated(tmp_path, monkeypatch):
    from fedgen.study.plan import build_plan, compose_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("# nothing but a comment\n")
    (tmp_path / "ok.txt").write_text("rs1\n")
    base = ["sites=demo", "federation=inprocess", "study=dp", f"output_dir={tmp_path}/o"]
    plan, _ = build_plan(compose_config([*base, "privacy=dp"]))
    assert plan["dp"] == {"panel": None} and plan["privacy"]["panel"] is None
    plan, _ = build_plan(compose_config([*base, "privacy=dp", "study.dp.panel=ok.txt"]))
    assert plan["privacy"]["panel"] == str(tmp_path / "ok.txt")  # relative to where fedgen runs
    json.dumps(plan["privacy"])
    with pytest.raises(ConfigError, match="study.dp.panel: cannot read"):
        build_plan(compose_config([*base, "privacy=dp", "study.dp.panel=missing.txt"]))
    with pytest.raises(ConfigError, match="lists no variant"):
        build_plan(compose_config([*base, "privacy=dp", "study.dp.panel=p.txt"]))
    with pytest.raises(ConfigError, match="use it with privacy=dp"):
        build_plan(compose_config([*base, "privacy=none", "study.dp.panel=ok.txt"]))


def test_panel_rows_match_ids_and_coordinates():
    from fedgen.study.align import Alignment

    aln = Alignment(chrom=np.array(["1", "1", "22"]), pos=np.array([10, 20, 30]), ids=np.array(["rs1", ".", "rs3"]),
                    ref=np.array(["A", "G", "T"]), alt=np.array(["C", "T", "TA"]), idx={}, flip={})
    rows, unknown = panel_rows(aln, ["rs3", "chr1:20:T:G", "1:10:a:c", "1:10:A:G", "rs2", "chr22:30:TA:T"])
    assert rows.tolist() == [0, 1, 2] and unknown == ["1:10:A:G", "rs2"]


def test_hardy_file_is_the_noise_aware_test_of_the_released_counts(dp_runs):
    """hardy.hardy under privacy=dp: P from fedgen.study.dpfreq.dp_hardy of what the sites released (+ public sample
    counts), never the exact test of noisy counts; on this cohort (genotypes in HWE) no variant looks like a failure."""
    from fedgen.stats.qc import variant_hardy
    from fedgen.study.dpfreq import dp_hardy

    for name in ("panel", "genome"):
        run = dp_runs[name]
        noisy = np.concatenate([sum(rep.arrays["counts"] for rep in item["replies"].values()) for item in run["released"]])
        n = sum(int(s["samples"]) for s in run["manifest"]["sites"].values())
        sigma = run["manifest"]["privacy"]["releases"][0]["sigma"]
        want = dp_hardy(noisy, n, 3 * sigma**2)
        t = _read_table(run["res"] / "hardy.hardy")
        p = np.array([float(x) for x in t["P"]])
        np.testing.assert_allclose(p, want["P"], rtol=1e-5, atol=1e-300)
        assert [int(x) for x in t["HET_A1_CT"]] == want["HET_A1_CT"].tolist()
        assert p.min() > 1e-6
        if name == "genome":  # 6,000 variants at ε = 1: the exact test of the same noisy counts calls noise a failure
            assert np.nanmin(variant_hardy(np.clip(noisy, 0, None).astype(np.int64))["P"]) < 1e-6
    assert any("hardy.hardy P values (and the HWE filter) come from a noise-aware test" in x
               for x in dp_runs["genome"]["manifest"]["notes"])
