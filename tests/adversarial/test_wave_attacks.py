"""A curious aggregator plays today's new egress against one site at the default policy: the
sex-split genotype counts and the GLM's ``sex_model``, imputed dosages (``dosage_sums`` and GLM on
real-valued dosages), and replayed DP releases; and two routes found on the way that hold for
hard calls too (a column dominated by one person's value; a row where everyone is alike but one
person). Each attack tries to reconstruct one person's genotype, dosage or phenotype from
well-formed requests; each has a control showing the same attack succeeds where the protecting
rule is relaxed (so the test can fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hostile import HostileAggregator, Site, idx

from fedgen.cohort.dosage import UNIT, quantise
from fedgen.testing import make_synth, synth_dosages, write_dosage_vcf, write_vcf

OPEN = {"min_count": 1, "min_cell": 1}


# ------------------------------------------------------------------------------------------ dosages
class SubHalfDosageSite:
    """Imputed dosages where one person (TARGET) alone has a non-zero dosage below one half at
    variant 0 (everyone else exactly 0), and alone a dosage above 1.5 but below 2 at variant 1
    (everyone else exactly 2): rounded to whole genotypes, nobody carries the rare allele. The
    phenotype Y_ONE is Y with one person's value (ONE) missing."""

    N, V, TARGET = 120, 12, 17
    ONE = 5  # Y_ONE is missing for this person only
    A = np.arange(60, 80)  # Y_A is missing for these 20 people
    TARGET_A = 65

    def __init__(self, root: Path, policy: dict | None = None) -> None:
        import json

        root.mkdir(parents=True, exist_ok=True)
        self.data = make_synth(self.N, self.V, seed=9, missing_rate=0.0)
        ds = synth_dosages(self.data, seed=9, missing=0.0)
        ds[0] = 0.0
        ds[0, self.TARGET] = 0.3
        ds[1] = 2.0
        ds[1, self.TARGET] = 1.7
        ds[2] = np.round(np.random.default_rng(1).uniform(0.0, 2.0, self.N), 3)  # an ordinary variant
        ds[3] = 0.0  # ten carriers outside A, and in A only TARGET_A's sub-half dosage
        ds[3, 40:50] = 1.0
        ds[3, self.TARGET_A] = 0.3
        self.units = quantise(ds).astype(np.int64)
        self.vcf = root / "g.vcf"
        write_dosage_vcf(self.data, ds, self.vcf)
        rng = np.random.default_rng(9)
        self.y = np.round(rng.normal(5.0, 1.0, self.N), 3)
        self.samples = root / "samples.tsv"
        self.samples.write_text("IID\tY\tY_ONE\tY_A\n" + "".join(
            f"{s}\t{v}\t{'NA' if k == self.ONE else v}\t{'NA' if k in self.A else v}\n"
            for k, (s, v) in enumerate(zip(self.data.samples, self.y))))
        self.node_config = {"site": "hk", "vcf": str(self.vcf), "samples": str(self.samples), "state_dir": str(root / "state")}
        if policy is not None:
            self.node_config["policy"] = json.dumps(policy)


def _sub_half_attack(site: SubHalfDosageSite) -> tuple[list[float], list[float], np.ndarray] | None:
    """GLM on the dosages of variants 0 and 1: Σg·y / Σg is the one non-zero person's phenotype,
    Σg² / Σg their dosage (variant 1 with the alleles flipped: 2 − dosage). Variant 2 is an
    ordinary one (it must be answered)."""
    agg = HostileAggregator(site.node_config)
    rep = agg.try_ask("glm_linear", {"phenotype": "Y", "kind": "quantitative", "covariates": [], "dosage": True},
                      {"idx": np.array([0, 1, 2]), "flip": np.array([0, 1, 0], np.uint8)})
    if rep is None:
        return None
    a = rep[0]
    withheld = a.get("withheld", np.zeros(3, np.uint8))
    ys, ds = [], []
    for r in range(2):
        s_g, s_gg, s_gy = a["XtX_triu"][r, 1], a["XtX_triu"][r, 2], a["Xty"][r, 1]
        ys.append(s_gy / s_g if s_g else float("nan"))
        ds.append(s_gg / s_g if s_g else float("nan"))
    return ys, ds, withheld


def test_a_lone_sub_half_dosage_does_not_give_away_its_phenotype(tmp_path):
    """Rounded to whole genotypes the row has no carriers (an empty cell, "not small"), yet its
    dosage-weighted sums rest on one person: Σg·y / Σg = y of that person."""
    site = SubHalfDosageSite(tmp_path / "hk")
    got = _sub_half_attack(site)
    truth = site.y[site.TARGET]
    assert got is not None  # the request itself is honest-looking and answered
    ys, _, withheld = got
    assert not any(abs(v - truth) < 1e-6 for v in ys), "the lone dosage carrier's phenotype was recovered"
    assert withheld.tolist() == [1, 1, 0]  # the two rows are withheld as small cells, the ordinary one is not


def test_the_sub_half_dosage_attack_works_without_the_cell_rule(tmp_path):
    """Control: with min_cell 1 the same request gives the person's phenotype and dosage exactly."""
    site = SubHalfDosageSite(tmp_path / "open", policy=OPEN)
    ys, ds, withheld = _sub_half_attack(site)
    truth = site.y[site.TARGET]
    assert abs(ys[0] - truth) < 1e-6 and abs(ys[1] - truth) < 1e-6
    assert abs(ds[0] - 0.3) < 1e-3 and abs(ds[1] - 0.3) < 1e-3
    assert not withheld.any()


def _sub_half_difference_attack(site: SubHalfDosageSite) -> float | None:
    """Dosage GLMs of Y (everyone) and Y_A (everyone but A, 20 people) at variant 3: each row has
    ten carriers; their difference rests on A, where only TARGET_A has a (sub-half) dosage."""
    agg = HostileAggregator(site.node_config)
    P = {"kind": "quantitative", "covariates": [], "dosage": True}
    full = agg.ask("glm_linear", {**P, "phenotype": "Y"}, idx(np.array([3])))[0]
    part = agg.try_ask("glm_linear", {**P, "phenotype": "Y_A"}, idx(np.array([3])))
    if part is None:
        return None
    part = part[0]
    sg = full["XtX_triu"][0, 1] - part["XtX_triu"][0, 1]
    return float((full["Xty"][0, 1] - part["Xty"][0, 1]) / sg) if sg else None


def test_a_sub_half_dosage_alone_in_the_difference_of_two_sets_is_not_revealed(tmp_path):
    site = SubHalfDosageSite(tmp_path / "hk")
    got = _sub_half_difference_attack(site)
    assert got is None or abs(got - site.y[site.TARGET_A]) > 1e-6, "the sub-half carrier's phenotype was recovered"


def test_the_sub_half_difference_attack_works_without_the_cell_rule(tmp_path):
    site = SubHalfDosageSite(tmp_path / "open", policy=OPEN)
    assert abs(_sub_half_difference_attack(site) - site.y[site.TARGET_A]) < 1e-6


def _missing_phenotype_attack(site: SubHalfDosageSite) -> tuple[np.ndarray, np.ndarray] | None:
    """dosage_sums rest on everyone; a dosage GLM of Y_ONE rests on everyone but ONE: Σ dosage
    (dosage_sums) minus Σg (the GLM's XᵀX entry) is ONE's dosage at every variant."""
    agg = HostileAggregator(site.node_config)
    rows = np.arange(2, site.V)
    sums = agg.ask("genotype_counts", {"dosage": True}, idx(rows))[0]["dosage_sums"]
    rep = agg.try_ask("glm_linear", {"phenotype": "Y_ONE", "kind": "quantitative", "covariates": [], "dosage": True},
                      idx(rows))
    if rep is None:
        assert "differenc" in agg.refusals[-1], agg.refusals  # the released-sample-set register's refusal
        return None
    a = rep[0]
    ok = (a.get("withheld", np.zeros(len(rows))) == 0) & (sums[:, 1] > 0)
    return sums[ok, 0] / UNIT - a["XtX_triu"][ok, 1], site.units[rows[ok], site.ONE] / UNIT


def test_a_missing_phenotype_does_not_difference_a_dosage_out_of_the_dosage_sums(tmp_path):
    site = SubHalfDosageSite(tmp_path / "hk")
    agg_refused = _missing_phenotype_attack(site)
    assert agg_refused is None, "a dosage GLM over everyone but one person was answered beside the dosage sums"


def test_the_missing_phenotype_dosage_attack_works_without_the_register(tmp_path):
    """Control: with min_count 1 the difference is the person's dosage at every answered variant."""
    site = SubHalfDosageSite(tmp_path / "open", policy=OPEN)
    got, truth = _missing_phenotype_attack(site)
    assert len(truth) >= 5
    np.testing.assert_allclose(got, truth, atol=1e-9)


# -------------------------------------------------------------------------------- sex-split counts
def _write_sex(site: Site, sex: np.ndarray) -> None:
    lines = site.samples.read_text().splitlines()
    out = [lines[0] + "\tsex"] + [f"{line}\t{'NA' if s == 0 else s}" for line, s in zip(lines[1:], sex.tolist())]
    site.samples.write_text("\n".join(out) + "\n")


LONE_ROWS = np.arange(3, 13)  # variants where one man alone has a call among the men


def _lone_male_site(root: Path, policy: dict | None = None) -> tuple[Site, int]:
    """Men and women alternate; at LONE_ROWS every man's call is missing except man 0's, while every
    woman is called: the men's group is called in one sample there."""
    site = Site(root, n=120, v=40, policy=policy)
    n = len(site.members)
    sex = np.where(np.arange(n) % 2 == 0, 1, 2)
    target = 0
    cols = site.members
    for j in LONE_ROWS:
        g = site.data.dosage[j]
        men = cols[sex == 1]
        g[men] = -1
        g[cols[target]] = 1 + (j % 2)  # het or hom-ALT
        g[cols[sex == 2]] = np.where(g[cols[sex == 2]] < 0, 0, g[cols[sex == 2]])
        site.data.half_call[j] = False
        site.data.haploid[j] = False
    write_vcf(site.data, site.vcf, cols=site.members, with_multiallelic=False)
    _write_sex(site, sex)
    return site, target


def _lone_male_attack(site: Site) -> np.ndarray | None:
    """All-sample counts minus the women's and the unknown-sex counts: the men's counts, which the
    site withheld (called in one man) — that man's genotype."""
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    total = agg.ask("genotype_counts", {}, idx(V))[0]["counts"]
    split = agg.try_ask("sex_genotype_counts", {}, idx(V))
    if split is None:
        return None
    c = split[0]["counts"]
    men = total - c[:, 1] - c[:, 2]
    called = men[LONE_ROWS, :3]
    return np.where(called.sum(1) == 1, called.argmax(1), -1)


def test_a_withheld_sex_group_is_not_recovered_from_the_all_sample_counts(tmp_path):
    """The men's group is reported all-missing where one man is called; the all-sample counts are
    not (the women make them large): subtracting the women's counts would give that man's calls."""
    site, target = _lone_male_site(tmp_path / "hk")
    g_hat = _lone_male_attack(site)
    truth = site.genotype(target)[LONE_ROWS]
    assert g_hat is not None  # answered: the groups are large
    assert not np.array_equal(g_hat, truth), "the lone called man's genotypes were recovered"
    assert (g_hat == -1).all()  # every group is withheld at those variants


def test_the_lone_male_attack_works_without_the_called_count_rule(tmp_path):
    """Control: with min_count 1 the same subtraction gives the man's genotypes."""
    site, target = _lone_male_site(tmp_path / "open", policy=OPEN)
    np.testing.assert_array_equal(_lone_male_attack(site), site.genotype(target)[LONE_ROWS])


# --------------------------------------------------------------------- chrX vs autosome GLM sets
def _unknown_sex_attack(tmp: Path, policy: dict) -> tuple[float | None, float]:
    """A chrX regression (sex_model X) drops the people of unknown sex; an autosomal one keeps them.
    With one unknown-sex person, Σy (the intercept entry of Xᵀy) of the two differs by their phenotype."""
    from test_sex_chromosomes import make_data, make_sites

    from fedgen.cohort.cohort import load_cohort

    data = make_data(n=120, n_unknown=1)
    _, sex, _, qt, _, _ = data
    cfg = make_sites(tmp, data, fractions=(1.0,), policy=policy)["site1"]
    cohort = load_cohort(cfg)
    agg = HostileAggregator(cfg)
    params = {"phenotype": "QT", "kind": "quantitative", "covariates": []}
    auto = agg.ask("glm_linear", params, idx(np.flatnonzero(cohort.chrom == "1")))[0]
    x = agg.try_ask("glm_linear", {**params, "sex_model": "X"}, idx(np.flatnonzero(cohort.chrom == "X")))
    truth = float(qt[np.flatnonzero(sex == 0)[0]])
    if x is None:
        assert "differenc" in agg.refusals[-1], agg.refusals
        return None, truth
    return float(auto["Xty"][0, 0] - x[0]["Xty"][0, 0]), truth


def test_the_unknown_sex_person_is_not_differenced_out_of_chrx_and_autosome_regressions(tmp_path):
    got, truth = _unknown_sex_attack(tmp_path / "hk", {})
    assert got is None or abs(got - truth) > 1e-6, "the unknown-sex person's phenotype was recovered"
    assert got is None  # refused by the released-sample-set register


def test_the_unknown_sex_attack_works_where_no_rule_stops_it(tmp_path):
    """Control: with min_count 1 the chrX request is answered and the difference is the phenotype."""
    got, truth = _unknown_sex_attack(tmp_path / "open", OPEN)
    assert got is not None and abs(got - truth) < 1e-6


# ------------------------------------------------------------------------- replayed DP releases
def _dp_averaging_attack(node_config: dict, k: int = 4) -> tuple[list[np.ndarray], list[dict]]:
    """A "restarted" study (drop-out, federation.min_sites) sends the same DP request again and again,
    hoping for fresh noise to average away. Returns the replies and the site's audit entries."""
    from fedgen.site import audit

    agg = HostileAggregator(node_config)
    replies = [agg.ask("dp_genotype_counts", {"sigma": 5.0}, idx(8), study_id="s-restarted")[0]["counts"] for _ in range(k)]
    entries = [e for e in audit.read(Path(node_config["state_dir"])) if e.get("analysis") == "dp_genotype_counts"]
    return replies, entries


def test_a_restarted_study_gets_the_same_dp_noise_again(tmp_path):
    """The same DP request of the same study is answered with the payload already released: the
    mean of the replies is the first reply (nothing averages out), and nothing more is charged."""
    site = Site(tmp_path / "hk", n=60, v=8)
    replies, entries = _dp_averaging_attack(site.node_config)
    for r in replies[1:]:
        np.testing.assert_array_equal(r, replies[0])
    assert [bool(e.get("replay_of")) for e in entries] == [False, True, True, True]
    assert [e["epsilon"] > 0 for e in entries] == [True, False, False, False]


def test_without_kept_payloads_each_repeat_is_fresh_noise_and_charged(tmp_path):
    """Control: where the site keeps no payload (audit_payloads = false) the replay cannot be served,
    so each repeat is new noise (which averaging would shrink) — and is charged as a new release."""
    site = Site(tmp_path / "open", n=60, v=8)
    replies, entries = _dp_averaging_attack({**site.node_config, "audit_payloads": "false"})
    assert any(not np.array_equal(r, replies[0]) for r in replies[1:])
    assert all(e["epsilon"] > 0 and not e.get("replay_of") for e in entries)


# ------------------------------------------------------------------- a covariate that one person dominates
OUTLIER = 9  # this person's OUT value is a data-entry error: their age typed as 1e6


def _outlier_site(root: Path, policy: dict | None = None) -> Site:
    site = Site(root, n=160, v=60, policy=policy)
    lines = site.samples.read_text().splitlines()
    out = [lines[0] + "\tOUT"] + [f"{line}\t{1e6 if k == OUTLIER else site.age[k]}" for k, line in enumerate(lines[1:])]
    site.samples.write_text("\n".join(out) + "\n")
    return site


def _outlier_attack(site: Site) -> tuple[np.ndarray, np.ndarray] | None:
    """covar_moments gives OUT's exact mean and SD (a plausible standardisation); a GLM with OUT as
    a covariate gives Σg·OUT per variant, which the one huge value dominates: Σg·OUT / max(OUT) is
    the outlier's genotype (the others add less than half a unit)."""
    agg = HostileAggregator(site.node_config)
    site.refusals = agg.refusals
    mom = agg.try_ask("covar_moments", {"names": ["OUT"]})
    # the moments give OUT's exact mean and SD; where they are refused, the aggregator (who may
    # know them from elsewhere) sends the true ones: the regression must stand on its own rule
    x = np.array([float(line.split("\t")[-1]) for line in site.samples.read_text().splitlines()[1:]])
    s1, s2, n = mom[0]["moments"][0] if mom is not None else (x.sum(), (x * x).sum(), len(x))
    mean, sd = s1 / n, float(np.sqrt((s2 - s1 * s1 / n) / (n - 1)))
    params = {"phenotype": "Y", "kind": "quantitative", "covariates": [{"name": "OUT", "kind": "numeric", "mean": mean, "sd": sd}]}
    rep = agg.try_ask("glm_linear", params, idx(site.n_variants))
    if rep is None:
        return None
    a = rep[0]
    s_g, s_gc = a["XtX_triu"][:, 1], a["XtX_triu"][:, 4]
    big = float(np.sqrt(s2))  # the outlier's value, nearly
    g_hat = np.rint((sd * s_gc + mean * s_g) / big)
    truth = site.genotype(OUTLIER).astype(float)
    ok = (a.get("withheld", np.zeros(len(s_g))) == 0) & (truth >= 0)
    return g_hat[ok], truth[ok]


def test_a_covariate_dominated_by_one_person_does_not_spell_out_their_genotypes(tmp_path):
    """Every value of OUT is distinct (no rare value, no rare flag), yet one of them is so large that
    Σg·OUT is that person's genotype times it."""
    site = _outlier_site(tmp_path / "hk")
    got = _outlier_attack(site)
    if got is not None:
        g_hat, truth = got
        assert len(truth) < 10 or np.mean(g_hat == truth) < 0.9, "the outlier's genotypes were recovered"
    assert got is None and "single them out" in site.refusals[-1], site.refusals
    assert len(site.refusals) == 2 and "covar_moments" in site.refusals[0]  # √Σx² would be the outlier's value
    # the same column without its outlier is an ordinary covariate and is answered
    site.samples.write_text(site.samples.read_text().replace("\t1000000.0\n", f"\t{site.age[OUTLIER]}\n"))
    assert _outlier_attack(site) is not None


def test_the_outlier_attack_works_without_the_rule(tmp_path):
    """Control: with min_count 1 the same requests give the outlier's genotypes at every answered variant."""
    g_hat, truth = _outlier_attack(_outlier_site(tmp_path / "open", policy=OPEN))
    assert len(truth) >= 10
    np.testing.assert_array_equal(g_hat, truth)


def _outlier_phenotype_attack(site: Site) -> tuple[np.ndarray, np.ndarray] | None:
    """The same column as the phenotype: Σg·y (Xᵀy) / max(y) is the outlier's genotype."""
    agg = HostileAggregator(site.node_config)
    site.refusals = agg.refusals
    rep = agg.try_ask("glm_linear", {"phenotype": "OUT", "kind": "quantitative", "covariates": []}, idx(site.n_variants))
    if rep is None:
        return None
    a = rep[0]
    g_hat = np.rint(a["Xty"][:, 1] / 1e6)
    truth = site.genotype(OUTLIER).astype(float)
    ok = (a.get("withheld", np.zeros(len(g_hat))) == 0) & (truth >= 0)
    return g_hat[ok], truth[ok]


def test_a_phenotype_dominated_by_one_person_is_refused_too(tmp_path):
    site = _outlier_site(tmp_path / "hk")
    assert _outlier_phenotype_attack(site) is None and "single them out" in site.refusals[-1]
    control = _outlier_phenotype_attack(_outlier_site(tmp_path / "open", policy=OPEN))
    assert control is not None and len(control[1]) >= 10
    np.testing.assert_array_equal(*control)


# ------------------------------------------------------- everyone alike but one: Σ(g − c)·y for the common c
ALIKE = 11  # the one person who differs


def _alike_site(root: Path, policy: dict | None = None) -> Site:
    """Variants 0..7: everyone het except ALIKE, who is hom-ALT (an artefact row: a duplicated
    region). Each allele has 120 carriers, so the carrier cells are large."""
    site = Site(root, n=120, v=40, policy=policy)
    for j in range(8):
        site.data.dosage[j, site.members] = 1
        site.data.dosage[j, site.members[ALIKE]] = 2
        site.data.half_call[j] = False
        site.data.haploid[j] = False
    write_vcf(site.data, site.vcf, cols=site.members, with_multiallelic=False)
    return site


def _alike_attack(site: Site) -> list[float] | None:
    """Σg·y − Σy = Σ(g − 1)·y = y of the one person who is not het (and Σg − n = 1 says so)."""
    agg = HostileAggregator(site.node_config)
    site.refusals = agg.refusals
    rep = agg.try_ask("glm_linear", {"phenotype": "Y", "kind": "quantitative", "covariates": []}, idx(np.arange(8)))
    if rep is None:
        return None
    a = rep[0]
    w = a.get("withheld", np.zeros(8))
    return [float(a["Xty"][r, 1] - a["Xty"][r, 0]) for r in range(8) if not w[r] and a["XtX_triu"][r, 1] - a["n"][r] == 1]


def test_one_person_unlike_everyone_else_is_not_revealed(tmp_path):
    site = _alike_site(tmp_path / "hk")
    got = _alike_attack(site)
    assert got is not None and not any(abs(v - site.y[ALIKE]) < 1e-6 for v in got), "the odd one out's phenotype was recovered"


def test_the_odd_one_out_attack_works_without_the_cell_rule(tmp_path):
    site = _alike_site(tmp_path / "open", policy=OPEN)
    got = _alike_attack(site)
    assert len(got) == 8 and all(abs(v - site.y[ALIKE]) < 1e-6 for v in got)


def _lone_dosage_site(root: Path, policy: dict | None = None) -> SubHalfDosageSite:
    site = SubHalfDosageSite(root, policy=policy)
    ds = np.full((site.V, site.N), np.nan)
    ds[:] = site.units / UNIT
    ds[4] = np.nan
    ds[4, site.TARGET] = 1.3  # the only dosage at variant 4: every other sample is imputed with rint(1.3) = 1
    site.units = quantise(ds).astype(np.int64)
    write_dosage_vcf(site.data, ds, site.vcf)
    return site


def _lone_dosage_attack(site: SubHalfDosageSite) -> float | None:
    """Σg·y − 1·Σy = (1.3 − 1)·y and Σg − n = 0.3: the one person with a dosage."""
    agg = HostileAggregator(site.node_config)
    rep = agg.try_ask("glm_linear", {"phenotype": "Y", "kind": "quantitative", "covariates": [], "dosage": True},
                      idx(np.array([4])))
    assert rep is not None
    a = rep[0]
    d = a["XtX_triu"][0, 1] - a["n"][0]
    return float((a["Xty"][0, 1] - a["Xty"][0, 0]) / d) if d else None


def test_the_one_dosage_among_imputed_ones_is_not_revealed(tmp_path):
    site = _lone_dosage_site(tmp_path / "hk")
    got = _lone_dosage_attack(site)
    assert got is None or abs(got - site.y[site.TARGET]) > 1e-6, "the one person with a dosage was revealed"


def test_the_lone_dosage_attack_works_without_the_cell_rule(tmp_path):
    site = _lone_dosage_site(tmp_path / "open", policy=OPEN)
    assert abs(_lone_dosage_attack(site) - site.y[site.TARGET]) < 1e-6


def _alike_ld_attack(site: Site) -> tuple[np.ndarray, np.ndarray]:
    """LD sums over a window starting at an everyone-het-but-one variant: Σg_i·g_j − Σg_j =
    (g_i − 1)·g_j summed, nonzero only for the odd one out: their genotype at every j."""
    agg = HostileAggregator(site.node_config)
    chrom = np.asarray(site.data.chrom)
    win = np.flatnonzero(chrom == chrom[0])[:16]
    pairs = agg.ask("ld_pair_sums", {"n_first": 1, "window": len(win)}, idx(win))[0]["pairs"][0].astype(np.int64)
    truth = site.genotype(ALIKE)[win[1:]].astype(np.int64)
    ok = truth >= 0
    return (pairs[:, 5] - pairs[:, 3])[ok], truth[ok]  # Σg_i g_j − Σg_j


FAR = {"ld_max_window_bp": 10**9}  # the synthetic variants lie megabases apart: the cell rule is under test here


def test_ld_at_an_everyone_alike_variant_spells_out_no_genotypes(tmp_path):
    got, truth = _alike_ld_attack(_alike_site(tmp_path / "hk", policy=FAR))
    assert not np.array_equal(got, truth), "the odd one out's genotypes were recovered from LD sums"


def test_the_alike_ld_attack_works_without_the_cell_rule(tmp_path):
    got, truth = _alike_ld_attack(_alike_site(tmp_path / "open", policy={**OPEN, **FAR}))
    assert len(truth) >= 8
    np.testing.assert_array_equal(got, truth)
