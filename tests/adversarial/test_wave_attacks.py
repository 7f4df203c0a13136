"""A curious aggregator plays today's new egress against one site at the default policy: the
sex-split genotype counts and the GLM's ``sex_model``, imputed dosages (``dosage_sums`` and GLM on
real-valued dosages), and replayed DP releases. Each attack tries to reconstruct one person's
genotype, dosage or phenotype from well-formed requests; each has a control showing the same
attack succeeds where the protecting rule is relaxed (so the test can fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hostile import HostileAggregator, Site, idx

from fedgen.cohort.dosage import UNIT, quantise
from fedgen.testing import make_synth, synth_dosages, write_dosage_vcf, write_vcf

OPEN = {"min_count": 1, "min_cell": 1}


# ------------------------------------------------------------------------------------------ dosages
class SubHalfDosageSite:
    """Imputed dosages where one person (TARGET) alone has a non-zero dosage below one half at
    variant 0 (everyone else exactly 0), and alone a dosage above 1.5 but below 2 at variant 1
    (everyone else exactly 2): rounded to whole genotypes, nobody carries the rare allele."""

    N, V, TARGET = 120, 12, 17

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
        self.units = quantise(ds).astype(np.int64)
        self.vcf = root / "g.vcf"
        write_dosage_vcf(self.data, ds, self.vcf)
        rng = np.random.default_rng(9)
        self.y = np.round(rng.normal(5.0, 1.0, self.N), 3)
        self.samples = root / "samples.tsv"
        self.samples.write_text("IID\tY\n" + "".join(f"{s}\t{v}\n" for s, v in zip(self.data.samples, self.y)))
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
