"""A curious aggregator tries to learn one person's genotypes or sex from the sex-split genotype
counts (``sex_genotype_counts``, new for chrX/chrY/MT) at the default policy: by differencing them
with the all-sample counts, and across a change of one person's recorded sex."""

from __future__ import annotations

import numpy as np
import pytest
from hostile import HostileAggregator, Site, idx


def _write_sex(site: Site, sex: np.ndarray) -> None:
    """Add a ``sex`` column (1, 2, NA) to the site's samples table."""
    lines = site.samples.read_text().splitlines()
    out = [lines[0] + "\tsex"] + [f"{line}\t{'NA' if s == 0 else s}" for line, s in zip(lines[1:], sex.tolist())]
    site.samples.write_text("\n".join(out) + "\n")


@pytest.fixture()
def site(tmp_path):
    return Site(tmp_path / "hk")


def _sexes(n: int) -> np.ndarray:
    return np.where(np.arange(n) % 2 == 0, 1, 2)


def test_one_person_of_unknown_sex_is_not_differenced_out(site):
    """All-sample counts minus male and female counts would be the one unknown-sex person's genotypes."""
    sex = _sexes(len(site.members))
    sex[0] = 0
    _write_sex(site, sex)
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    total = agg.ask("genotype_counts", {}, idx(V))[0]["counts"]
    split = agg.try_ask("sex_genotype_counts", {}, idx(V))
    truth = site.genotype(0)
    if split is not None:
        c = split[0]["counts"]
        rest = total - c[:, 0] - c[:, 1]  # the unknown-sex group: person 0 alone
        g_hat = np.where(rest[:, 3] > 0, -1, rest[:, 1] + 2 * rest[:, 2])
        assert not np.array_equal(g_hat, truth), "the unknown-sex person's genotypes were recovered"
    assert split is None and ("min_count" in agg.refusals[-1] or "differencing" in agg.refusals[-1])


def test_recoding_one_persons_sex_between_requests_is_refused(site):
    """Male counts before and after one person is recoded female→male differ by that person's genotypes
    (and reveal that they were recoded)."""
    n = len(site.members)
    sex = _sexes(n)
    _write_sex(site, sex)
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    before = agg.ask("sex_genotype_counts", {}, idx(V))[0]["counts"]
    k = 1  # a woman in the table
    assert sex[k] == 2
    sex[k] = 1
    site.write_samples()
    _write_sex(site, sex)
    after = agg.try_ask("sex_genotype_counts", {}, idx(V))
    truth = site.genotype(k)
    if after is not None:
        d = after[0]["counts"][:, 0] - before[:, 0]
        g_hat = np.where(d[:, 3] > 0, -1, d[:, 1] + 2 * d[:, 2])
        assert not np.array_equal(g_hat, truth), "the recoded person's genotypes were recovered"
    assert after is None and "differencing" in agg.refusals[-1]


def test_sex_split_counts_answer_when_every_group_is_large(site):
    """The honest request: males, females and a large unknown-sex group are answered (the attack
    tests above would pass vacuously if the site refused everything)."""
    sex = _sexes(len(site.members))
    sex[:40] = 0
    _write_sex(site, sex)
    agg = HostileAggregator(site.node_config)
    c = agg.ask("sex_genotype_counts", {}, idx(site.n_variants))[0]["counts"]
    assert c.shape == (site.n_variants, 3, 4)
    np.testing.assert_array_equal(c.sum(axis=(1, 2)), len(site.members))
    assert c[:, 2].sum(axis=1).min() == 40


def test_the_attack_works_where_no_rule_stops_it(tmp_path):
    """Control: with min_count 1 (no disclosure rule) the same differencing recovers the person, so
    the tests above would notice a site that answered."""
    site = Site(tmp_path / "open", policy={"min_count": 1, "min_cell": 1})
    sex = _sexes(len(site.members))
    sex[0] = 0
    _write_sex(site, sex)
    agg = HostileAggregator(site.node_config)
    V = site.n_variants
    total = agg.ask("genotype_counts", {}, idx(V))[0]["counts"]
    c = agg.ask("sex_genotype_counts", {}, idx(V))[0]["counts"]
    rest = total - c[:, 0] - c[:, 1]
    g_hat = np.where(rest[:, 3] > 0, -1, rest[:, 1] + 2 * rest[:, 2])
    np.testing.assert_array_equal(g_hat, site.genotype(0))


def test_chrx_sex_covariate_does_not_single_out_one_woman(tmp_path):
    """On chrX the site adds a female column: with one woman, Σ g·female would be her genotypes."""
    from test_sex_chromosomes import make_data, make_sites

    ids, sex, age, qt, bin_, rows = make_data(n=120, n_unknown=0)
    sex = np.ones_like(sex)
    sex[5] = 2
    nodes = make_sites(tmp_path, (ids, sex, age, qt, bin_, rows), fractions=(1.0,), policy={"min_count": 10, "min_cell": 1,
                                                                                             "allow_per_variant_sample_sets": True})
    cfg = nodes["site1"]
    agg = HostileAggregator(cfg)
    from fedgen.cohort.cohort import load_cohort

    cohort = load_cohort(cfg)
    x = np.flatnonzero(cohort.chrom == "X")
    params = {"phenotype": "QT", "kind": "quantitative", "covariates": [], "sex_model": "X", "missing": "drop"}
    rep = agg.try_ask("glm_linear", params, idx(x))
    assert rep is None and "min_count women or men" in agg.refusals[-1]
    # control: where min_count is 1 the same request is answered (so the refusal above is this rule's)
    open_nodes = make_sites(tmp_path / "open", (ids, sex, age, qt, bin_, rows), fractions=(1.0,),
                            policy={"min_count": 1, "min_cell": 1, "allow_per_variant_sample_sets": True})
    assert HostileAggregator(open_nodes["site1"]).try_ask("glm_linear", params, idx(x)) is not None
    # and the sex model cannot be pointed at autosomal variants (nor chrX variants asked without it)
    auto = np.flatnonzero(cohort.chrom == "1")
    assert agg.try_ask("glm_linear", {**params, "sex_model": "Y"}, idx(auto)) is None
    assert "does not match the contigs" in agg.refusals[-1]
    assert agg.try_ask("glm_linear", {**params, "sex_model": None}, idx(x)) is None
    assert "does not match the contigs" in agg.refusals[-1]
