"""A curious aggregator replays every known route against a site at the default policy.

Each test *tries to reconstruct* individual data from what the site's real ClientApp sends back
(genotypes, phenotypes, membership) and asserts that it fails: the site refused, or what came
back does not determine anyone's values. Routes and the rules that close them are listed in
``docs/THREAT_MODEL.md``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hostile import HostileAggregator, Refusal, Site, glm_params, idx, triu_col

from fedgen.site.pipeline import dp_only

PCA_OPT_IN = {"extra_analyses": ["pca_product", "pca_scores"]}


@pytest.fixture()
def site(tmp_path):
    return Site(tmp_path / "hk")


def _sum_g(rep) -> np.ndarray:
    arrays, _ = rep
    p = arrays["Xty"].shape[1]
    return arrays["XtX_triu"][:, triu_col(p, 0, 1)]


# ----------------------------------------------------------------------------- differencing


def test_differencing_two_sample_sets_recovers_no_one(site):
    """Y and Y_ONE differ by one person: Σg and Σy over the two sets would give their genotypes and Y."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    full = agg.ask("glm_linear", glm_params("Y"), idx(V))
    one = agg.try_ask("glm_linear", glm_params("Y_ONE"), idx(V))
    truth_g = np.where(site.genotype(site.one) >= 0, site.genotype(site.one), 0)
    if one is not None:
        g_hat = _sum_g(full) - _sum_g(one)
        y_hat = full[0]["Xty"][:, 0] - one[0]["Xty"][:, 0]
        assert not np.allclose(g_hat, truth_g, atol=0.5), "genotypes of the missing person recovered"
        assert not np.any(np.isclose(y_hat, site.y[site.one], atol=1e-6)), "phenotype of the missing person recovered"
    else:
        assert "differencing" in agg.refusals[-1] or "min_count" in agg.refusals[-1]


def test_differencing_inside_one_batch_message_recovers_no_one(site):
    """The same differencing attack, both requests in ONE batch message: each request still takes
    its own pass through the site pipeline, so the second sees the first in the register."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    full, one = agg.ask_batch([("glm_linear", glm_params("Y"), idx(V)), ("glm_linear", glm_params("Y_ONE"), idx(V))])
    assert full is not None  # the honest request is answered
    truth_g = np.where(site.genotype(site.one) >= 0, site.genotype(site.one), 0)
    if one is not None:  # were it answered, the difference would be that person: it must not be
        g_hat = _sum_g(full) - _sum_g(one)
        assert not np.allclose(g_hat, truth_g, atol=0.5), "genotypes of the missing person recovered"
    assert one is None and "differencing" in agg.refusals[-1]
    # and a batch cannot be used to pass more than the wire allows
    from fedgen.errors import FedgenError
    from fedgen.federation.flower import MAX_BATCH, encode_batch

    with pytest.raises(FedgenError, match="a batch carries"):
        encode_batch([("ping", {}, {})] * (MAX_BATCH + 1))


def test_inclusion_exclusion_over_three_sets_recovers_no_one(site):
    """Sets U−A, U−B, U−(A∪B) with |A|=|B|=20 and A∩B={x}: every pairwise difference is large,
    but Σ(U−A∪B) − Σ(U−A) − Σ(U−B) + Σ(U) is person x alone."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    reps = [agg.try_ask("glm_linear", glm_params("Y", covariates=c), idx(V)) for c in ([], ["A_M"], ["B_M"], ["A_M", "B_M"])]
    x = 1
    if all(r is not None for r in reps):
        u, a, b, ab = (_sum_g(r) for r in reps)
        g_hat = ab - a - b + u
        truth = np.where(site.genotype(x) >= 0, site.genotype(x), 0)
        assert not np.allclose(g_hat, truth, atol=0.5), "person x's genotypes recovered by inclusion-exclusion"
    else:
        assert reps[0] is not None  # the honest study over everyone is answered
        assert any("differencing" in r for r in agg.refusals)


def test_per_variant_missing_calls_are_no_tracker(site):
    """PLINK's per-variant drop: rows whose n is one short give that person's Y (tracker)."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    with pytest.raises(Refusal, match="allow_per_variant_sample_sets"):
        agg.ask("glm_linear", glm_params("Y", missing="drop"), idx(V))
    arrays, _ = agg.ask("glm_linear", glm_params("Y"), idx(V))  # default: imputed, one sample set
    g = site.data.dosage[:, site.members]
    one_missing = np.flatnonzero((g < 0).sum(1) == 1)
    assert len(one_missing) >= 1
    complete = np.flatnonzero((g < 0).sum(1) == 0)
    ok = arrays["n"] > 0
    assert len(set(arrays["n"][ok].tolist())) == 1  # every answered row rests on the same people
    full_sum = arrays["Xty"][complete[ok[complete]][0], 0]
    for j in one_missing:
        if not ok[j]:
            continue
        k = int(np.flatnonzero(g[j] < 0)[0])
        y_hat = full_sum - arrays["Xty"][j, 0]
        assert not np.isclose(y_hat, site.y[k], atol=1e-6)
    with pytest.raises(Refusal, match="allow_per_variant_sample_sets"):
        agg.ask("assoc_counts", glm_params("D", "binary", missing="drop"), idx(V))


# ----------------------------------------------------------------------------- small cells


def test_small_carrier_cells_give_no_carrier_phenotypes(site):
    """A variant carried by one person: Σg·y / Σg is their Y; case A1 counts are their D."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    carriers, non = site.carriers(), site.other_carriers()
    rare = np.flatnonzero(((carriers > 0) & (carriers < 5)) | ((non > 0) & (non < 5)))
    assert len(rare) >= 5
    arrays, meta = agg.ask("glm_linear", glm_params("Y"), idx(V))
    sg = _sum_g((arrays, meta))
    g = site.data.dosage[:, site.members]
    recovered = 0
    for j in rare:
        assert arrays["withheld"][j] == 1
        who = np.flatnonzero(g[j] > 0) if carriers[j] < 5 else np.flatnonzero((g[j] >= 0) & (g[j] < 2))
        if sg[j] != 0:
            y_hat = arrays["Xty"][j, 1] / sg[j]
            recovered += int(any(np.isclose(y_hat, site.y[k], atol=1e-6) for k in who))
    assert recovered == 0
    assert not np.any(arrays["XtX_triu"][rare]) and not np.any(arrays["Xty"][rare])
    counts, _ = agg.ask("assoc_counts", glm_params("D", "binary"), idx(V))
    assert np.all(counts["withheld"][rare] == 1) and not np.any(counts["counts"][rare])
    # the common variants stay exact: a row with ≥ min_cell carriers of each allele (the imputed
    # people counted with their best-guess genotype) is answered
    called = np.where(g >= 0, g, 0)
    fill = np.rint(called.sum(1) / np.maximum((g >= 0).sum(1), 1))  # over the site: everyone has Y here
    gi = np.where(g >= 0, g, fill[:, None])
    common = np.flatnonzero(((gi > 0).sum(1) >= 5) & ((gi < 2).sum(1) >= 5))
    assert np.all(arrays["withheld"][common] == 0) and np.all(arrays["n"][common] == len(site.members))


IRLS_OPT_IN = {"extra_analyses": ["glm_logistic", "glm_firth"]}


def test_irls_kernel_moments_are_not_answered_by_default(site, tmp_path):
    """Logistic rounds at many smooth β (η = (age − t)/s) give Σ w(age) · (1, g, Y, D) for any kernel
    w; with enough (t, s) a least-squares deconvolution gives every person with a unique age: their
    age, Y, D and genotypes (a red-team run recovered 187 of 320 people exactly). Default policy:
    no logistic or Firth round is answered at all; an opted-in site still refuses a variant named
    twice in one request (one variant, many β)."""
    agg = HostileAggregator(site.node_config)
    P = {"phenotype": "D", "kind": "binary",
         "covariates": [{"name": c, "kind": "numeric", "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
                        for c, v in (("age", site.age), ("Y", site.y))]}
    sd = float(np.std(site.age, ddof=1))
    T = np.arange(20.0, 80.0, 0.5)
    beta = np.zeros((len(T), 4))
    beta[:, 0] = -(T - np.mean(site.age)) / 0.6  # kernel of width 0.6 years around t, on the standardised age
    beta[:, 2] = sd / 0.6
    with pytest.raises(Refusal, match="'glm_logistic' is not allowed by the site's policy .*opt-in"):
        agg.ask("glm_logistic", P, {**idx(np.arange(len(T))), "beta": beta}, study_id="kernel")
    with pytest.raises(Refusal, match="'glm_firth' is not allowed"):
        agg.ask("glm_firth", P, {**idx(np.arange(len(T))), "beta": beta}, study_id="kernel")
    opted = Site(tmp_path / "opted", policy=IRLS_OPT_IN)
    agg = HostileAggregator(opted.node_config)
    with pytest.raises(Refusal, match="names a variant more than once"):
        agg.ask("glm_logistic", P, {**idx(np.zeros(len(T), np.int64)), "beta": beta}, study_id="kernel")


def test_level_lists_are_no_oracle_for_values(site):
    """'covariate has N levels unknown to the study' answered "does anyone here have age = x?"."""
    agg = HostileAggregator(site.node_config)
    reasons = set()
    for levels in (["zz"], [f"{a:.1f}" for a in site.age[:50]], [f"{a:.1f}" for a in site.age[50:100]], [f"{a:.1f}" for a in range(50)]):
        with pytest.raises(Refusal):
            agg.ask("glm_linear", {"phenotype": "Y", "kind": "quantitative",
                                   "covariates": [{"name": "age", "kind": "categorical", "levels": levels}]}, idx(2))
        reasons.add(agg.refusals[-1])
    assert len(reasons) == 1, reasons  # the same answer whatever the levels: nothing to learn
    assert not re.search(r"\d", next(iter(reasons)).replace("min_count", "")), reasons
    assert str(site.samples.parent) not in next(iter(reasons))


def test_a_beta_that_isolates_one_person_is_withheld(tmp_path):
    site = Site(tmp_path / "hk", policy=IRLS_OPT_IN)
    agg = HostileAggregator(site.node_config)
    target = float(site.age[3])
    beta = np.zeros((8, 3))
    beta[:, 2] = 1.0  # η = (age − target) / 0.001: only person 3 sits at η ≈ 0
    age = lambda sd: {"phenotype": "D", "kind": "binary", "covariates": [{"name": "age", "kind": "numeric", "mean": target, "sd": sd}]}  # noqa: E731
    with pytest.raises(Refusal, match="standardisation is not plausible"):
        agg.ask("glm_logistic", age(1e-3), {**idx(np.arange(20, 28)), "beta": beta})
    sd = float(np.std(site.age, ddof=1))
    beta[:, 2] = sd / 1e-3  # the same η with a plausible standardisation and a huge β
    arrays, meta = agg.ask("glm_logistic", age(sd), {**idx(np.arange(20, 28)), "beta": beta})
    assert np.all(arrays["withheld"] == 1) and not np.any(arrays["H_triu"]) and not np.any(arrays["grad"])


def test_firth_third_moments_at_an_isolating_beta_recover_no_one(tmp_path):
    """Firth rounds now release T_abc = Σ v(½ − p) x_a x_b x_c beside I and U. With η steep around
    one person's age, v(½ − p) is that person's alone, so T_g11 / T_111 would be their genotype and
    U their phenotype residual. The Kish rule on the IRLS weights must withhold the whole row."""
    site = Site(tmp_path / "hk", policy=IRLS_OPT_IN)
    agg = HostileAggregator(site.node_config)
    who = 3
    sd = float(np.std(site.age, ddof=1))
    target = float(site.age[who])
    P = {"phenotype": "D", "kind": "binary", "covariates": [{"name": "age", "kind": "numeric", "mean": target, "sd": sd}]}
    V = 12
    beta = np.zeros((V, 3))
    beta[:, 0] = 0.3  # p ≈ 0.57 at the target: v(½ − p) ≠ 0 there, ≈ 0 for everyone else
    beta[:, 2] = sd / 1e-3
    arrays, _ = agg.ask("glm_firth", P, {**idx(np.arange(V)), "beta": beta})
    from fedgen.stats.glm import firth_triples

    tri = {tuple(t): k for k, t in enumerate(firth_triples(3).tolist())}
    with np.errstate(invalid="ignore", divide="ignore"):
        g_hat = arrays["T"][:, tri[(0, 0, 1)]] / arrays["T"][:, tri[(0, 0, 0)]]
    truth = np.array([site.genotype(who)[v] for v in range(V)], dtype=float)
    called = truth >= 0
    assert not np.allclose(np.nan_to_num(g_hat[called], nan=-9), truth[called], atol=0.01), "genotypes recovered from T"
    assert np.all(arrays["withheld"] == 1) and not np.any(arrays["T"]) and not np.any(arrays["U"])


# ----------------------------------------------------------------------------- LD


def test_ld_requests_take_only_site_ordered_windows(site):
    agg = HostileAggregator(site.node_config)
    chrom = np.asarray(site.data.chrom)
    first = np.flatnonzero(chrom == chrom[0])
    other = np.flatnonzero(chrom != chrom[0])
    for bad in (first[::-1][:10], np.r_[first[:5], first[:5]], np.r_[first[-3:], other[:3]]):
        with pytest.raises(Refusal, match="ld_pair_sums|names a variant more than once"):
            agg.ask("ld_pair_sums", {"n_first": 1, "window": len(bad)}, idx(bad))


def test_ld_window_at_a_rare_variant_spells_out_no_genotypes(site):
    """Σ g_i g_j over a window starting at a singleton variant i is the carrier's genotype at j."""
    agg = HostileAggregator(site.node_config)
    g = site.data.dosage[:, site.members]
    chrom = np.asarray(site.data.chrom)
    singles = [j for j in np.flatnonzero((g > 0).sum(1) == 1) if j + 20 < len(chrom) and chrom[j + 20] == chrom[j]]
    assert singles
    for i in singles[:5]:
        win = np.arange(i, i + 21)
        arrays, _ = agg.ask("ld_pair_sums", {"n_first": 1, "window": 21}, idx(win))
        pairs = arrays["pairs"][0]
        k = int(np.flatnonzero(g[i] > 0)[0])
        truth = np.where(g[win[1:], k] >= 0, g[win[1:], k], 0) * g[i, k]
        assert not np.any(pairs), "pairs of a rare variant left the site"
        assert not (np.any(truth) and np.array_equal(pairs[:, 5], truth))


def test_ld_pairs_further_apart_than_the_cap_are_withheld(tmp_path):
    site = Site(tmp_path / "hk", policy={"ld_max_window_bp": 1})
    agg = HostileAggregator(site.node_config)
    chrom = np.asarray(site.data.chrom)
    win = np.flatnonzero(chrom == chrom[0])[:30]
    arrays, _ = agg.ask("ld_pair_sums", {"n_first": 10, "window": 20}, idx(win))
    assert not np.any(arrays["pairs"])


# ----------------------------------------------------------------------------- PCA


def test_pca_products_are_opt_in_and_bounded(tmp_path):
    """Exact PCA products reveal membership (measured AUC ≈ 1 on an honest transcript, see
    scripts/attack_pca_membership.py): off in the default policy; where a site opts in,
    crafted frequencies are refused and the total rank revealed is capped."""
    site = Site(tmp_path / "hk")
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    g = site.data.dosage[:, site.members]
    ok = g >= 0
    f = np.where(ok, g, 0).sum(1) / (2 * np.maximum(ok.sum(1), 1))
    rng = np.random.default_rng(0)
    with pytest.raises(Refusal, match="not allowed by the site's policy .*opt-in"):
        agg.ask("pca_product", {}, {**idx(V), "freq": f, "basis": rng.normal(size=(V, 8))})

    opted = Site(tmp_path / "sz", policy=PCA_OPT_IN)
    agg = HostileAggregator(opted.node_config)
    crafted = np.where(f < 0.5, 0.001, 0.999)
    with pytest.raises(Refusal, match="not consistent with this site's data"):
        agg.ask("pca_product", {}, {**idx(V), "freq": crafted, "basis": rng.normal(size=(V, 8))}, study_id="s0")
    got, n = [], len(opted.members)
    for k in range(100):  # wide random bases under ever new study ids
        rep = agg.try_ask("pca_product", {}, {**idx(V), "freq": f, "basis": rng.normal(size=(V, 16))}, study_id=f"s{k}")
        if rep is None:
            break
        got.append(rep[0]["product"])
    assert got and "PCA rank" in agg.refusals[-1]
    revealed = np.linalg.matrix_rank(np.hstack(got))
    assert revealed <= 0.5 * n < min(V, n)  # never the full Z Zᵀ

    # an honest PCA repeated on the same data reveals nothing new: it is never refused for rank
    again = Site(tmp_path / "gz", policy=PCA_OPT_IN)
    agg = HostileAggregator(again.node_config)
    Q = np.linalg.qr(rng.normal(size=(V, 20)))[0]
    for k in range(3 * n // 20):
        agg.ask("pca_product", {}, {**idx(V), "freq": f, "basis": Q}, study_id=f"rerun{k}")


def test_planted_pc_covariates_are_refused(tmp_path):
    site = Site(tmp_path / "hk", policy=PCA_OPT_IN)
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    g = site.data.dosage[:, site.members]
    ok = g >= 0
    f = np.where(ok, g, 0).sum(1) / (2 * np.maximum(ok.sum(1), 1))
    # loadings on the variants only person 5 carries: a "PC" that is person 5's indicator
    own = (g[:, 5] > 0) & ((g > 0).sum(1) == 1)
    U = np.zeros((V, 1))
    U[own | (np.arange(V) == 0), 0] = 1.0
    params = {"study_id": "fake", "theta": [1.0]}
    with pytest.raises(Refusal, match="answered no PCA for this study"):
        agg.ask("pca_scores", params, {**idx(V), "freq": f, "loadings": U}, study_id="fake")
    agg.ask("pca_product", {}, {**idx(V), "freq": f, "basis": np.ones((V, 1))}, study_id="fake")
    with pytest.raises(Refusal, match="rest on a few people"):
        agg.ask("pca_scores", params, {**idx(V), "freq": f, "loadings": U}, study_id="fake")
    with pytest.raises(Refusal):
        agg.ask("glm_linear", {**glm_params("Y"), "pcs": {"study_id": "fake", "n": 1, "mean": [0.0], "sd": [1.0]}}, idx(V))


# ----------------------------------------------------------------------------- DP-only sites


DP_ONLY = {"allowed_analyses": ["ping", "site_info", "dp_genotype_counts", "dp_assoc_counts", "dp_topk_select"],
           "epsilon_budget": 50.0}


def test_dp_only_site_publishes_no_exact_count(tmp_path, monkeypatch):
    """Counts before and after one person joins would give that person's D at ε = 0."""
    import fedgen.analyses.dp as dpmod
    from fedgen.privacy.mechanisms import NoiseSource

    monkeypatch.setattr(dpmod, "_noise_source", lambda: NoiseSource(seed=3))
    assert dp_only(DP_ONLY)
    site = Site(tmp_path / "hk", policy=DP_ONLY)
    agg = HostileAggregator(site.node_config)
    joiner = 7
    site.write_samples(drop=joiner)
    before = agg.ask("site_info", {"phenotypes": ["D"]})[1]
    cases_before = agg.ask("dp_assoc_counts", {"phenotype": "D", "kind": "binary", "sigma": 50.0}, idx(10))[1]["n_cases"]
    site.write_samples()
    after = agg.ask("site_info", {"phenotypes": ["D"]})[1]
    again = agg.ask("site_info", {"phenotypes": ["D"]})[1]
    cases_after = agg.ask("dp_assoc_counts", {"phenotype": "D", "kind": "binary", "sigma": 50.0}, idx(10))[1]["n_cases"]
    assert after["counts"] == again["counts"]  # asking again reveals nothing new
    n = len(site.members)
    assert after["counts"]["noisy"] == 1 and (before["counts"]["samples"], after["counts"]["samples"]) != (n - 1, n)
    assert cases_after - cases_before != site.d[joiner] or abs(cases_after - int(site.d.sum())) > 0
    ledger = json.loads((tmp_path / "hk" / "state" / "noisy_counts.json").read_text())
    assert ledger["sigma"] > 0 and ledger["counts"]


def test_refusals_quote_no_counts(site):
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    agg.ask("glm_linear", glm_params("Y"), idx(V))
    agg.ask("glm_linear", glm_params("Y", covariates=["A_M"]), idx(V))  # 20 people fewer: an honest set
    agg.ask("glm_linear", glm_params("Y", covariates=["B_M"]), idx(V))  # A ∩ B = one person, not isolable yet
    for attempt in (lambda: agg.ask("glm_linear", glm_params("Y_ONE"), idx(V)),
                    lambda: agg.ask("glm_linear", glm_params("Y", covariates=["A_M", "B_M"]), idx(V)),  # now it would be
                    lambda: agg.ask("glm_linear", glm_params("Y", missing="drop"), idx(V)),
                    lambda: agg.ask("glm_linear", glm_params("Y"), idx(V + 5))):
        with pytest.raises(Refusal):
            attempt()
    n = len(site.members)
    for reason in agg.refusals:
        numbers = {int(x) for x in re.findall(r"\d+", reason)}
        assert not numbers & {n, n - 1, n - 20, 20, 1, 19}, reason


def test_a_site_of_cases_only_still_contributes(tmp_path):
    site = Site(tmp_path / "hk")
    site.d[:] = 1
    site.write_samples()
    agg = HostileAggregator(site.node_config)
    counts, meta = agg.ask("assoc_counts", glm_params("D", "binary"), idx(site.n_variants))
    assert meta["n_controls"] == 0 and counts["counts"][:, 0].sum() > 0


def test_register_refuses_exactly_the_combinations_that_isolate_people():
    """Two phenotypes whose missing groups share one person: no sum over U, S1, S2 isolates that
    person (an honest study goes on); adding S1 ∩ S2 would, and is refused."""
    from fedgen.site.register import atoms_ok

    people = set(range(500))
    as_set = lambda s: np.array(sorted(s), dtype=np.uint64)  # noqa: E731
    U = as_set(people)
    s1, s2 = as_set(people - set(range(0, 30))), as_set(people - set(range(29, 60)))
    assert atoms_ok([U, s1], s2, 10)
    assert not atoms_ok([U, s1, s2], as_set(people - set(range(0, 60))), 10)
    # brute force over every combination with coefficients in {-1, 0, 1}: the rule agrees
    import itertools

    sets = [U, s1, s2, as_set(people - set(range(0, 60)))]
    ind = np.array([[1.0 if p in set(s.tolist()) else 0.0 for p in range(500)] for s in sets])
    smallest = min(int(np.count_nonzero(np.abs(np.array(c) @ ind) > 1e-9))
                   for c in itertools.product((-1, 0, 1), repeat=4) if any(c) and np.any(np.array(c) @ ind))
    assert smallest == 1  # the fourth set isolates person 29
    smallest3 = min(int(np.count_nonzero(np.abs(np.array(c) @ ind[:3]) > 1e-9))
                    for c in itertools.product((-1, 0, 1), repeat=3) if any(c) and np.any(np.array(c) @ ind[:3]))
    assert smallest3 >= 10


def test_a_carrier_alone_in_the_difference_of_two_released_sets_is_not_revealed(site):
    """U and U−A (|A| = 20) both pass the cell rule at a variant with one carrier inside A:
    subtracting the rows gives that carrier's Y, age and D (a red-team run recovered 14 people)."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    P = lambda covs: glm_params("Y", covariates=covs)  # noqa: E731
    full, _ = agg.ask("glm_linear", P(["age", "D"]), idx(V))
    part, _ = agg.ask("glm_linear", P(["A_M", "D"]), idx(V))
    g = site.data.dosage[:, site.members]
    in_a = np.zeros(len(site.members), bool)
    in_a[site.a_set] = True
    lone = np.flatnonzero(((g[:, in_a] > 0).sum(1) == 1) & ((g[:, ~in_a] > 0).sum(1) >= 5))
    assert len(lone) >= 3
    p = full["Xty"].shape[1]
    recovered = 0
    for j in lone:
        sg = full["XtX_triu"][j, triu_col(p, 0, 1)] - part["XtX_triu"][j, triu_col(p, 0, 1)]
        if part["withheld"][j] or full["withheld"][j] or sg == 0:
            continue
        y_hat = (full["Xty"][j, 1] - part["Xty"][j, 1]) / sg
        k = int(np.flatnonzero(in_a & (g[j] > 0))[0])
        recovered += int(np.isclose(y_hat, site.y[k], atol=1e-6))
    assert recovered == 0
    assert np.all(part["withheld"][lone] == 1)  # the second release withholds exactly these rows


def test_a_rare_flag_column_is_no_phenotype_or_covariate(site):
    """RARE is 1 for one person: as a phenotype Σg·y, as a covariate Σg·c, is their genotype."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    for params in (glm_params("RARE", "binary"), glm_params("RARE"), glm_params("Y", covariates=["RARE"])):
        params = {**params, "covariates": [{**c, "mean": 0.0, "sd": 0.06} for c in params["covariates"]]}
        with pytest.raises(Refusal, match="fewer than the site's min_count"):
            agg.ask("glm_linear", params, idx(V))


@pytest.mark.parametrize("first", [{"phenotype": "age"}, {"phenotype": "D", "covariates": ["Y"]}])
def test_the_cell_rule_holds_whatever_the_name_or_role_of_the_values(site, first):
    """The same values summed as a phenotype in one set and as a covariate (or an alias column,
    A_M = age where present) in another: the carrier check spans every set released with
    genotype-weighted values, not only those with the same attribute name (red-team round 3)."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    agg.ask("glm_linear", glm_params(first["phenotype"], covariates=first.get("covariates", [])), idx(V))
    part, _ = agg.ask("glm_linear", glm_params("Y", covariates=["A_M", "D"]), idx(V))
    g = site.data.dosage[:, site.members]
    in_a = np.zeros(len(site.members), bool)
    in_a[site.a_set] = True
    lone = np.flatnonzero(((g[:, in_a] > 0).sum(1) == 1) & ((g[:, ~in_a] > 0).sum(1) >= 5))
    assert len(lone) >= 3 and np.all(part["withheld"][lone] == 1)


def test_imputed_calls_add_whole_genotypes_and_column_names_cannot_alias_kinds(site):
    """A fractional imputation value T/C made Σ over cases of the dosage = T_cases + (T/C)·m_cases,
    which whole-number arithmetic splits into the number of cases among the people missing the
    call (one person's D where one call is missing; red-team round 4). Imputed genotypes are now
    whole, so every released count is an integer sum over genotypes like any other. And a column
    named "bmi=kg" was recorded as "bmi" by one analysis and "bmi=kg" by another."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    counts, _ = agg.ask("assoc_counts", glm_params("D", "binary"), idx(V))
    c = counts["counts"]
    assert np.array_equal(c, np.rint(c))
    for bad in ({"phenotype": "Y=1", "kind": "quantitative", "covariates": []},
                {**glm_params("Y"), "covariates": [{"name": "age:x", "kind": "numeric", "mean": 50.0, "sd": 17.0}]}):
        with pytest.raises(Refusal, match="may not contain"):
            agg.ask("glm_linear", bad, idx(V))
    with pytest.raises(Refusal, match="without '=' or ':'"):
        agg.ask("covar_moments", {"names": ["bmi=kg"]})


def test_imputed_people_cancel_like_everyone_else_across_sets(site):
    """U − (U−E) − (U−F) + (U−E−F) cancels everyone whose contribution is the same in every set.
    A fill rounded per request set made an imputed person's genotype differ between sets, so the
    combination kept exactly them: Y, age and D of one person (red-team round 5). With one fill per
    site the combination is zero at every variant."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    reps = [agg.ask("glm_linear", {**glm_params("Y", covariates=["age"]), "require": req}, idx(V))[0]
            for req in ([], ["E_M"], ["F_M"], ["E_M", "F_M"])]
    p = reps[0]["Xty"].shape[1]
    ok = ~np.any([r["withheld"].astype(bool) for r in reps], axis=0)
    assert ok.sum() > V // 2
    sign = (1, -1, -1, 1)
    sg = sum(s * r["XtX_triu"][:, triu_col(p, 0, 1)] for s, r in zip(sign, reps))
    sgy = sum(s * r["Xty"][:, 1] for s, r in zip(sign, reps))
    np.testing.assert_allclose(sg[ok], 0.0, atol=1e-9)
    np.testing.assert_allclose(sgy[ok], 0.0, atol=1e-6)


@pytest.mark.parametrize("order", [("binary", "quantitative"), ("quantitative", "binary")])
def test_a_binary_column_summed_under_either_kind_is_checked_on_its_ones(site, order):
    """D as a binary trait over everyone (sums over its cases), then D as a quantitative trait over
    U−F (sums over the cases in U−F): their difference is a sum over the 4 cases among F's 20
    people (red-team round 6). The supports come from the values, whatever the kind."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    first = agg.ask("glm_linear", glm_params("D", order[0], covariates=["age"]), idx(V))[0]
    second = agg.ask("glm_linear", {**glm_params("D", order[1], covariates=["age"]), "require": ["F_M"]}, idx(V))[0]
    g = site.data.dosage[:, site.members]
    in_f = np.zeros(len(site.members), bool)
    in_f[60:80] = True
    cases_f = in_f & (site.d == 1)
    assert 1 <= cases_f.sum() < 5
    p = first["Xty"].shape[1]
    # Xty[1] is Σ g·D: a sum over the cases. Where both releases answered, their difference is the
    # sum over the cases in F; a row with 1..4 carriers among those cases must not leave both.
    both = ~(first["withheld"].astype(bool) | second["withheld"].astype(bool))
    carried = (g[:, cases_f] > 0).sum(1)
    assert p >= 3 and not np.any(both & (carried > 0) & (carried < 5)), "a row over the few cases in F left both releases"


def test_site_info_case_counts_name_no_rare_flag_carrier(tmp_path):
    """site_info reports the cases of a binary column (the DP planner uses them). For RARE, carried by
    one person, that count would say so, and asked before and after that person joins (under any
    study id) it would give their flag. The attack: count, let the person join, count again, difference."""
    site = Site(tmp_path / "hk")
    agg = HostileAggregator(site.node_config)
    site.write_samples(drop=site.rare)
    seen = []
    for study in ("s1", "s2", "s3"):
        got = agg.try_ask("site_info", {"phenotypes": ["RARE", "D"]}, study_id=study)
        seen.append(None if got is None else got[1]["columns"])
        site.write_samples()  # the carrier joins after the first count
    rare_counts = [c["RARE"].get("cases") for c in seen if c is not None]
    assert seen[0] is not None and all(n is None for n in rare_counts), rare_counts
    # a common binary column's case count is released (what any GWAS publishes), exactly
    assert seen[0]["D"]["cases"] == int(site.d.sum()) - site.d[site.rare]
