"""Differentially private releases: noise added at the site, charged to its ledger, budget enforced."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import qc_plan, split_sites

from fedgen.errors import ConfigError, SiteError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.privacy.accounting import compose_epsilon, rho_for_epsilon
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.site import audit
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

GT = dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")


@pytest.fixture(scope="module")
def data():
    return make_synth(400, 300, seed=21, missing_rate=0.01)


@pytest.fixture()
def nodes(data, tmp_path):
    return split_sites(data, tmp_path / "sites", [0.55, 0.45], seed=2, conventions=[GT, dict(GT, chr_prefix=True)])


def _dp_plan(out: Path, sites: list[str], eps: float, **kw):
    plan = qc_plan(out, sites, analyses=["freq", "missing", "hardy", "assoc", "topk"], phenotypes=["BIN"], covariates=[],
                   qc={"maf": None, "geno": None, "hwe": None}, block_size=120, pca=None, pcs=0)
    plan["privacy"] = {"mode": "dp", "epsilon": eps, "delta": 1e-6, "topk": 5, "force": True, **kw}
    return plan


def test_dp_study_spends_exactly_its_budget_at_each_site(nodes, tmp_path):
    eps = 2.0
    manifest = run_plan(_dp_plan(tmp_path / "out", list(nodes), eps), InProcessTransport(nodes))
    out = tmp_path / "out"
    assert (out / "BIN.dp_topk.assoc").exists() and (out / "freq.afreq").exists()
    n_assoc = len((out / "BIN.assoc").read_text().splitlines()) - 1  # every QC-passing variant, noisy counts
    assert n_assoc == manifest["qc"]["pass"]
    rows = (out / "BIN.dp_topk.assoc").read_text().splitlines()
    assert rows[0].split() == ["CHR", "SNP", "BP", "A1", "F_A", "F_U", "A2", "CHISQ", "P", "OR", "SE", "L95", "U95"] and len(rows) == 6
    priv = manifest["privacy"]
    assert priv["mode"] == "dp" and priv["epsilon"] == eps
    assert math.isclose(priv["rho_total"], rho_for_epsilon(eps, 1e-6))
    kinds = [r["release"] for r in priv["releases"]]
    assert kinds[0] == "genotype counts" and any("selection" in k for k in kinds)
    # σ of the counts release follows its formula: √V / √(2ρ_counts)
    rel = priv["releases"][0]
    assert math.isclose(rel["sigma"], math.sqrt(rel["variants"]) / math.sqrt(2 * rel["rho"]))
    from fedgen.results import load_results

    res = load_results(out)
    spent = res.privacy_spent()
    assert set(spent["site"]) == set(nodes) and (spent["epsilon"] > 0).all()
    assert set(spent["analysis"]) == {"dp_genotype_counts", "dp_topk_select", "dp_assoc_counts"}
    assert "BIN.dp_topk" in res.assoc and len(res.assoc["BIN.dp_topk"]) == 5
    assert res.site_summary()["epsilon_spent"].tolist() == pytest.approx([eps, eps], rel=1e-6)
    for site, nc in nodes.items():
        s = manifest["sites"][site]
        assert s["epsilon_spent"] == pytest.approx(eps, rel=1e-6) and s["epsilon_spent"] <= eps + 1e-9
        led = Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=10, delta=1e-6)
        sp = led.spent()
        assert sp["epsilon"] == pytest.approx(eps, rel=1e-6) and sp["reserved"] == 0
        events = [json.loads(e["events"]) if isinstance(e["events"], str) else e["events"] for e in led.entries()]
        assert compose_epsilon([x for ev in events for x in ev], 1e-6) == pytest.approx(sp["epsilon"])
        from fedgen.site.audit_cli import summarise

        summary = summarise(audit.read(Path(nc["state_dir"])))["studies"][manifest["study_id"]]
        assert summary["epsilon"] == pytest.approx(eps, rel=1e-6)  # releases composed, as in the ledger
        sent = [e for e in audit.read(Path(nc["state_dir"])) if e["decision"] == "sent"]
        dp_sent = [e for e in sent if e["analysis"].startswith("dp_")]
        assert dp_sent and all(e["epsilon"] > 0 and e["events"] for e in dp_sent)
        assert {e["analysis"] for e in sent} <= {"site_info", "dp_genotype_counts", "dp_topk_select", "dp_assoc_counts"}


def test_noise_scale_matches_formula(nodes, tmp_path):
    """Noisy pooled counts minus exact counts: mean 0, variance = sites × σ² (many draws)."""
    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": 1e6})
    tr = InProcessTransport(nodes)
    n_var = 300
    idx = {s: {"idx": np.arange(n_var, dtype=np.int64), "flip": np.zeros(n_var, np.uint8)} for s in nodes}
    exact = tr.query(Request("genotype_counts", per_site_arrays=idx))
    sigma = 7.5
    noisy = tr.query(Request("dp_genotype_counts", params={"sigma": sigma}, per_site_arrays=idx))
    resid = np.concatenate([(noisy[s].arrays["counts"] - exact[s].arrays["counts"]).ravel() for s in nodes])
    assert resid.dtype == np.int64
    n = resid.size  # 2 sites x 300 variants x 4 cells = 2400 draws
    assert abs(resid.mean()) < 4 * sigma / math.sqrt(n)
    # variance within ±4 standard errors (var of sample variance ≈ 2σ⁴/n for a near-Gaussian)
    assert abs(resid.var() - sigma**2) < 4 * sigma**2 * math.sqrt(2 / n)
    for s in nodes:
        priv = noisy[s].meta["privacy"]
        (ev,) = priv["events"]
        assert ev["sigma"] == sigma and ev["l2"] == pytest.approx(math.sqrt(n_var))  # the SITE sets the sensitivity
        assert priv["epsilon"] == pytest.approx(compose_epsilon([ev], 1e-6))


def test_repeated_dp_query_is_refused_when_the_budget_runs_out(nodes, tmp_path):
    budget = 3.0
    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": budget, "delta": 1e-6})
    tr = InProcessTransport(nodes)
    idx = {s: {"idx": np.arange(50, dtype=np.int64)} for s in nodes}
    ok = 0
    with pytest.raises(SiteError, match=r"privacy budget exhausted: this release would bring the site's ε to [\d.]+ .* allows 3"):
        for i in range(100):  # a new study each time: the same request of the same study is replayed, uncharged
            tr.query(Request("dp_genotype_counts", params={"sigma": 20.0}, per_site_arrays=idx, study_id=f"curious{i}"))
            ok += 1
    assert 1 <= ok < 100
    for site, nc in nodes.items():
        state = Path(nc["state_dir"])
        led = Ledger(state / LEDGER_FILE, epsilon_budget=budget, delta=1e-6)
        sp = led.spent()
        assert sp["epsilon"] <= budget
        entries = list(audit.read(state))
        sent = [e for e in entries if e["analysis"] == "dp_genotype_counts" and e["decision"] == "sent"]
        refused = [e for e in entries if e["decision"] == "refused"]
        assert len(sent) == sp["releases"]
        if site == "site1":  # the in-process transport asks site1 first; it refuses, site2 is not asked again
            assert len(sent) == ok and refused and "privacy budget exhausted" in refused[-1]["reason"]
            assert refused[-1]["bytes"] == 0 and refused[-1]["epsilon"] == 0.0
    # the honest, exact study still works on the same sites afterwards
    run_plan(qc_plan(tmp_path / "qc", list(nodes)), InProcessTransport(nodes))
    assert (tmp_path / "qc" / "freq.afreq").exists()


def test_analyses_without_a_dp_version_refuse_to_run(tmp_path):
    from fedgen.study.plan import build_plan, compose_config

    base = ["sites=demo", "federation=inprocess", "privacy=dp", f"output_dir={tmp_path}/o"]
    with pytest.raises(ConfigError, match="analysis glm has no differentially private version"):
        build_plan(compose_config([*base, "study=gwas", "study.phenotypes=[T2D]"]))
    with pytest.raises(ConfigError, match="PCA has no differentially private version"):
        build_plan(compose_config([*base, "study=dp", "study.pcs=2"]))
    plan, _ = build_plan(compose_config([*base, "study=dp", "privacy.epsilon=0.5"]))
    assert plan["privacy"]["epsilon"] == 0.5 and plan["privacy"]["mode"] == "dp"
    with pytest.raises(ConfigError, match="privacy.epsilon must be > 0"):
        build_plan(compose_config([*base, "study=dp", "privacy.epsilon=0"]))


def test_dp_site_refuses_covariates_and_quantitative_traits(nodes):
    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": 100})
    tr = InProcessTransport(nodes)
    idx = {s: {"idx": np.arange(20, dtype=np.int64)} for s in nodes}
    with pytest.raises(SiteError, match="take no covariates"):
        tr.query(Request("dp_assoc_counts", params={"phenotype": "BIN", "kind": "binary", "covariates": ["age"], "sigma": 5.0},
                         per_site_arrays=idx))
    with pytest.raises(SiteError, match="need a binary phenotype"):
        tr.query(Request("dp_topk_select", params={"phenotype": "QT", "kind": "quantitative", "k": 3, "epsilon_per_pick": 1.0},
                         per_site_arrays=idx))
    # a refusal after reserving voids the reservation: nothing was released, nothing is charged
    path = Path(nodes["site1"]["state_dir"]) / LEDGER_FILE
    led = Ledger(path, epsilon_budget=100, delta=1e-6)
    assert led.spent()["epsilon"] == 0.0
    assert [e["status"] for e in led.entries()] == ["void", "void"]


@pytest.mark.parametrize("R,S", [(5, 7), (40, 13), (1000, 3000)])
def test_selection_score_bound_holds_for_every_add_remove_neighbour(R, S):
    """s = w·|A_case/2R − A_ctrl/2S| moves by at most 1/min(R, S) when one person (0-2 copies) joins or leaves,
    whatever the weight w in [0, 1]; the bound is attained (w = 1, two copies)."""
    from fedgen.analyses.dp import selection_scores, selection_sensitivity

    assert selection_sensitivity(R, S) == pytest.approx(1.0 / min(R, S))
    a = np.arange(0, 2 * R + 3)  # a neighbour may hold 2 more alleles than R people can
    c = np.arange(0, 2 * S + 3)
    A, C = np.meshgrid(a, c, indexing="ij")
    base = np.stack([A.ravel(), 0 * A.ravel(), C.ravel(), 0 * C.ravel()], axis=1)
    w = np.random.default_rng(R).uniform(0.0, 1.0, len(base))
    w[: len(w) // 2] = 1.0
    s0 = selection_scores(base, R, S, w)
    worst = 0.0
    for col in (0, 2):
        for d in (-2, -1, 1, 2):
            nb = base.copy()
            nb[:, col] += d
            ok = (nb[:, col] >= 0) & (nb[:, col] <= (2 * R + 2 if col == 0 else 2 * S + 2))
            worst = max(worst, float(np.max(np.abs(selection_scores(nb[ok], R, S, w[ok]) - s0[ok]))))
    assert worst <= selection_sensitivity(R, S) * (1 + 1e-12)
    assert worst >= (1 - 1e-12) * selection_sensitivity(R, S)  # attained: the bound is tight


def test_selection_weights_temper_common_variants_only():
    """w = 1 up to the weight frequency f₀ (and for monomorphic or unknown frequencies), then
    √(f₀(1 − f₀) / f(1 − f)): a common variant's weighted null spread equals that of a variant at f₀."""
    from fedgen.analyses.dp import SELECT_FREQ, selection_weights

    f = np.array([0.0, 0.01, 0.1, SELECT_FREQ, 0.4, 0.5, 0.9, 1.0, np.nan])
    w = selection_weights(f)
    assert np.all((w > 0) & (w <= 1))
    assert np.all(w[[0, 1, 2, 3, 6, 7, 8]] == 1.0)  # 0.9 is as rare as 0.1 (minor allele 0.1)
    for i in (4, 5):
        assert w[i] * math.sqrt(f[i] * (1 - f[i])) == pytest.approx(math.sqrt(SELECT_FREQ * (1 - SELECT_FREQ)))


def test_planner_refuses_a_useless_release_before_any_epsilon_and_force_is_recorded(tmp_path):
    """A top-k on ~200-person sites at ε = 2 cannot beat chance: the study refuses before any release
    (no ledger entry at any site), names the ε / site size that would do, and privacy.force runs it
    with the override in the manifest."""
    import sqlite3

    data = make_synth(n_samples=400, n_variants=300, seed=71)
    nodes = split_sites(data, tmp_path / "sites", [0.55, 0.45])
    for s, c in nodes.items():
        c["state_dir"] = str(tmp_path / "state" / s)
    plan = _dp_plan(tmp_path / "out", list(nodes), 2.0)
    plan["privacy"]["force"] = False
    with pytest.raises(ConfigError) as err:
        run_plan(plan, InProcessTransport(nodes))
    msg = str(err.value)
    assert "cannot beat knowing nothing" in msg and "DP top-k" in msg and "useful from ε ≈" in msg
    assert "no ε was spent" in msg
    for s in nodes:
        ledger = tmp_path / "state" / s / "ledger.sqlite"
        if ledger.exists():
            with sqlite3.connect(ledger) as conn:
                assert conn.execute("SELECT COUNT(*) FROM releases").fetchone()[0] == 0
    assert not (tmp_path / "out").exists()
    plan["privacy"]["force"] = True
    m = run_plan(plan, InProcessTransport(nodes))
    planned = m["privacy"]["planner"]
    assert planned["forced"] is True
    assert any("privacy.force=true" in n for n in m["notes"])
    top = next(r for r in planned["releases"] if r["release"].startswith("DP top-k"))
    assert top["useful"] is False and top["expected_causal_found"] < top["expected_causal_found_chance"] + 0.5


def test_dp_plan_command(capsys):
    from fedgen.cli import main

    rc = main(["dp", "plan", "--sites", "hk=1500:700,sz=2000:900,mo=800:400", "--variants", "30000", "--epsilon", "1"])
    out = capsys.readouterr().out
    assert rc == 3 and "NOT USEFUL" in out and "useful from ε ≈" in out
    rc = main(["dp", "plan", "--sites", "a=20000,b=20000,c=20000", "--variants", "30000", "--epsilon", "1", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and all(r["useful"] for r in plan["releases"])
    top = plan["releases"][1]
    assert top["expected_causal_found"] >= 0.8 * top["expected_causal_found_exact"]
    assert main(["dp", "plan", "--sites", "hk=abc", "--variants", "10"]) == 2


def test_select_k_picks_more_candidates_per_site_and_is_validated(tmp_path):
    """privacy.select_k: each site picks that many (at the matching ε₀ = √(8ρ/select_k)); the release is still top k."""
    data = make_synth(n_samples=400, n_variants=300, seed=72)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5])
    plan = _dp_plan(tmp_path / "out", list(nodes), 4.0, select_k=25)
    m = run_plan(plan, InProcessTransport(nodes))
    sel = next(r for r in m["privacy"]["releases"] if r["release"].endswith("top-k selection"))
    assert sel["k"] == 25
    assert sel["epsilon_per_pick"] == pytest.approx(math.sqrt(8 * sel["rho"] / 25))
    assert len((tmp_path / "out" / "BIN.dp_topk.assoc").read_text().strip().splitlines()) == 1 + 5
    from fedgen.study.dp import check_dp_plan

    with pytest.raises(ConfigError, match="select_k"):
        check_dp_plan({**plan, "privacy": {**plan["privacy"], "select_k": 3}})


def test_planner_predicts_recall_of_the_exact_top_k_from_the_same_draws():
    """expected_recall_of_exact: of the causal loci in each draw's exact top-k, the share in the same draw's DP
    top-k. It is chance-like where the DP top-k finds nothing and near 1 at biobank sizes; with exact_loci stated
    (linkage gave the exact top-k fewer loci than the independent-variant model), the count is exact_loci × recall."""
    from fedgen.privacy.planner import Effect, Settings, Site, plan_dp

    def top(sizes, eps, **eff):
        sites = [Site(f"s{i}", n, n // 2, n - n // 2) for i, n in enumerate(sizes)]
        eff = {"odds_ratio": 1.35, **eff}
        plan = plan_dp(sites, Settings(epsilon=eps, n_variants=10000), Effect(n_causal=5, maf=0.2, **eff), thresholds=False)
        return plan["releases"][1]

    small = top([300, 300], 1.0)
    assert small["expected_recall_of_exact"] <= 0.05 and small["expected_recall_chance"] == pytest.approx(10 / 10000)
    big = top([20000] * 3, 1.0)
    assert big["expected_recall_of_exact"] >= 0.9 and big["recall_draws"] >= 3
    assert big["exact_loci"] is None and math.isnan(big["expected_causal_found_of_exact"])
    # two strong loci and three weak ones; the user states that the exact top-k holds 2 loci: those are the
    # strongest of each draw, and the DP top-k finds them far more often than the model's exact top-k loci overall
    two_strong = {"odds_ratio": [1.25, 1.25, 1.1, 1.1, 1.1]}
    mid = top([5000] * 3, 3.0, exact_loci=2, **two_strong)
    every = top([5000] * 3, 3.0, **two_strong)
    assert mid["exact_loci"] == 2 and every["expected_causal_found_exact"] > 3
    assert 0.2 < every["expected_recall_of_exact"] < mid["expected_recall_of_exact"] - 0.15 < 0.9
    assert mid["expected_causal_found_of_exact"] == pytest.approx(2 * mid["expected_recall_of_exact"])
    assert mid["expected_causal_found"] == every["expected_causal_found"]  # the unconditional count is unchanged


def test_dp_plan_exact_loci_option_and_validation(capsys, tmp_path):
    from fedgen.cli import main
    from fedgen.study.dp import check_dp_plan

    rc = main(["dp", "plan", "--sites", "a=20000,b=20000,c=20000", "--variants", "10000", "--causal", "5",
               "--exact-loci", "4", "--epsilon", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "expected recall of the exact top-10's causal loci" in out
    assert "of the 4 causal loci stated to be in the exact top-10" in out
    assert main(["dp", "plan", "--sites", "a=2000", "--variants", "100", "--causal", "3", "--exact-loci", "4"]) == 2
    plan = _dp_plan(tmp_path / "out", ["a"], 1.0)
    with pytest.raises(ConfigError, match="exact_loci"):
        check_dp_plan({**plan, "privacy": {**plan["privacy"], "planner": {"exact_loci": -1}}})
    assert check_dp_plan({**plan, "privacy": {**plan["privacy"], "planner": {"exact_loci": 3}}})["planner"]["exact_loci"] == 3


def test_assoc_counts_noise_and_selection_scale_match_what_the_site_states(nodes):
    """dp_assoc_counts: two releases of the same counts (two studies) differ by the noise only, so their difference has
    variance 2σ² at the σ the site states (a 20 % larger or smaller σ is rejected). dp_topk_select: the site states the Gumbel
    scale 2Δ/ε₀ with Δ the allelic score bound at its published case/control counts (the scale itself is tested
    against the exponential mechanism in tests/test_privacy_mechanisms.py)."""
    from fedgen.analyses.dp import selection_sensitivity

    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": 1e6})
    tr = InProcessTransport(nodes)
    n_var, sigma = 300, 6.0
    idx = {s: {"idx": np.arange(n_var, dtype=np.int64), "flip": np.zeros(n_var, np.uint8)} for s in nodes}
    params = {"phenotype": "BIN", "kind": "binary", "covariates": [], "sigma": sigma}
    a, b = (tr.query(Request("dp_assoc_counts", params=params, per_site_arrays=idx, study_id=f"twice{i}")) for i in (1, 2))
    diff = np.concatenate([(a[s].arrays["counts"] - b[s].arrays["counts"]).ravel() for s in nodes]).astype(float)
    n = diff.size  # 2 sites × 300 variants × 4 cells
    assert n == 2400 and all(a[s].meta["sigma"] == sigma for s in nodes)
    tol = 4 * math.sqrt(2 / n)  # ±4 standard errors of a sample variance ratio
    assert abs(diff.mean()) < 4 * math.sqrt(2) * sigma / math.sqrt(n)
    assert abs(diff.var() / (2 * sigma**2) - 1) < tol
    # power: σ off by 20 % is rejected (at 10 % the margin was 2.5 standard errors and the test failed about 1 run in 100)
    assert abs(diff.var() / (2 * (1.2 * sigma) ** 2) - 1) > tol and abs(diff.var() / (2 * (sigma / 1.2) ** 2) - 1) > tol
    eps0 = 0.7
    sel = tr.query(Request("dp_topk_select", params={"phenotype": "BIN", "kind": "binary", "covariates": [], "k": 3,
                                                     "epsilon_per_pick": eps0}, per_site_arrays=idx, study_id="pick"))
    for s, rep in sel.items():
        m = rep.meta
        assert m["sensitivity"] == pytest.approx(selection_sensitivity(m["n_cases"], m["n_controls"]))
        assert m["gumbel_scale"] == pytest.approx(2 * m["sensitivity"] / eps0)
        assert len(set(rep.arrays["selected"].tolist())) == 3


def test_dp_study_trains_its_risk_model_on_its_own_dp_top_k(nodes, tmp_path):
    """privacy=dp with a model: the features are the DP top-k's variants (in released order), the
    card says so, and each site's ledger holds the study's ε plus DP-SGD's (no exact release)."""
    from fedgen.learn.score import load_model
    from fedgen.study.learn import model_settings
    from fedgen.study.plan import build_plan, compose_config

    eps, eps_model = 1.0, 1.0
    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": 10, "delta": 1e-6})
    plan = _dp_plan(tmp_path / "out", list(nodes), eps)
    plan["analyses"].append("model")
    plan["model"] = model_settings({"phenotype": "BIN", "variants": "top:3", "rounds": 2, "batch": 1024, "epsilon": eps_model,
                                    "holdout": 0.0, "clump_kb": 0})
    manifest = run_plan(plan, InProcessTransport(nodes))
    out = tmp_path / "out"
    top = [ln.split() for ln in (out / "BIN.dp_topk.assoc").read_text().splitlines()[1:]]
    model = load_model(out / "model")
    feats = [(str(v["chrom"]), int(v["pos"])) for v in model["variants"]]
    # the released top 3, in its order, standardised with freq.afreq's post-processed frequencies
    assert feats == [(r[0], int(r[2])) for r in top[:3]]
    afreq = {(r[0], int(r[1])): float(r[5]) for r in (ln.split("\t") for ln in (out / "freq.afreq").read_text().splitlines()[1:])}
    for v in model["variants"]:
        f = afreq[(str(v["chrom"]), int(v["pos"]))]
        assert v["freq"] == pytest.approx(min(f, 1 - f), rel=1e-5) and 0 < v["freq"] <= 0.5  # printed to 6 digits
    assert "differentially private top-k release" in (out / "model" / "card.md").read_text()
    assert "differentially private top-k" in manifest["model"]["features_chosen"]
    for s, nc in nodes.items():
        spent = Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=10, delta=1e-6).spent()["epsilon"]
        assert eps < spent <= eps + eps_model + 1e-6, (s, spent)
    # refused at planning: more model variants than the DP top-k releases, or a non-private update
    base = ["sites=demo", "federation=inprocess", "privacy=dp", "study=dp", f"output_dir={tmp_path}/o",
            "study.phenotypes=[T2D]", "study.analyses=[freq,topk,model]", "+study.model.phenotype=T2D"]
    with pytest.raises(ConfigError, match="privacy.topk=20"):
        build_plan(compose_config([*base, "+study.model.variants=top:20"]))
    with pytest.raises(ConfigError, match="non-private model update"):
        build_plan(compose_config([*base, "+study.model.dp=false"]))
