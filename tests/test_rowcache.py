"""The site's memo of per-row work (fedgen.analyses.rowcache) never changes a reply.

An aggregator controls the sample set (phenotype, covariates, sex model), the imputation mode, the
allele flips, the variant order and the cell structures of its requests. If the memo served a row
computed under one of these for a request under another, the reply (and the small-cell rules,
which read the memoised cells) would rest on the wrong people: a request for everyone but one
person could be answered with everyone's sums, and differencing the two would isolate that person.
These tests replay such sequences and compare every value a site derives with a fresh computation.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import split_sites

from fedgen.analyses import assoc
from fedgen.analyses.rowcache import RowCache
from fedgen.cohort.cohort import load_cohort
from fedgen.testing import make_synth


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    data = make_synth(240, 120, seed=5, missing_rate=0.04, extremes=False)
    nodes = split_sites(data, tmp_path_factory.mktemp("rowcache"), [1.0], seed=3)
    return load_cohort(next(iter(nodes.values())))


def _fresh(cohort, *args, **kw):
    memo, mb = getattr(cohort, "_row_cache", None), cohort.row_cache_mb
    cohort.row_cache_mb = 0  # memo off
    try:
        return list(assoc._genotypes(cohort, *args, **kw))
    finally:
        cohort._row_cache, cohort.row_cache_mb = memo, mb


def _same(a, b) -> None:
    assert len(a) == len(b)
    for (s1, g1, f1, c1, at1), (s2, g2, f2, c2, at2) in zip(a, b):
        assert s1 == s2
        assert g1.dtype == g2.dtype and np.array_equal(g1, g2, equal_nan=True)
        assert (f1 is None) == (f2 is None) and (f1 is None or np.array_equal(f1, f2))
        assert np.array_equal(c1, c2)
        assert len(at1) == len(at2) and all(np.array_equal(x, y) for x, y in zip(at1, at2))


def _structure(n: int, n_atoms: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, n_atoms, n)
    return labels, np.eye(n_atoms)


@pytest.mark.parametrize("budget", ["all", "tight", "tiny"])  # everything held / contexts compete / a few rows
def test_a_hostile_sequence_gets_the_replies_a_fresh_site_computes(cohort, budget):
    n, V = cohort.n_samples, cohort.dosage.shape[0]
    budget_mb = {"all": 256.0, "tight": (2 * V * n + 100 * V) / (1 << 20), "tiny": 0.004}[budget]
    rng = np.random.default_rng(0)
    everyone = np.ones(n, bool)
    but_one = everyone.copy()
    but_one[7] = False  # the request a differencing attack pairs with `everyone`
    half = rng.random(n) < 0.5
    idx = np.arange(V)
    flips = np.zeros(V, np.uint8)
    some_flipped = (rng.random(V) < 0.3).astype(np.uint8)
    s1, s1_more_atoms = _structure(n, 3, 1), (_structure(n, 3, 1)[0], np.eye(4)[:, :4])
    s2 = _structure(n, 3, 2)  # same shape, other labels
    seq = [
        (everyone, False, (), idx, flips),
        (but_one, False, (), idx, flips),                 # one person fewer: not everyone's rows
        (everyone, False, (), idx[::-1].copy(), flips),   # order reversed
        (everyone, False, (), idx, some_flipped),         # alleles swapped for some rows
        (everyone, False, (), idx[5:40], flips[5:40]),     # a subset after the flips
        (everyone, True, (), idx, flips),                 # imputation on
        (half, True, (), idx, flips),
        (everyone, False, (s1,), idx, flips),             # with a cell structure
        (everyone, False, (s2,), idx, flips),             # its labels changed
        (everyone, False, (s1_more_atoms,), idx, flips),  # more atoms
        (everyone, False, (s1, s2), idx[::3].copy(), flips[::3]),
        (but_one, False, (), idx[10:], flips[10:]),
        (everyone, False, (), idx, flips),                # back to the first
    ]
    cohort.row_cache_mb = budget_mb
    cohort._row_cache = RowCache(V, int(budget_mb * (1 << 20)))
    hits = 0
    for keep, impute, structures, ix, fl in seq:
        arrays = {"idx": ix, "flip": fl}
        before = cohort._row_cache.nbytes
        got = list(assoc._genotypes(cohort, arrays, keep, impute=impute, structures=structures))
        hits += cohort._row_cache.nbytes == before
        _same(got, _fresh(cohort, arrays, keep, impute=impute, structures=structures))
    assert cohort._row_cache.nbytes <= budget_mb * (1 << 20)
    if budget_mb > 1:
        assert hits >= 3  # the memo was used, not bypassed


def test_dosage_rows_and_mismatched_masks(cohort):
    """Boolean masks only (an index array would select other people), and every source is its own context."""
    V = cohort.dosage.shape[0]
    arrays = {"idx": np.arange(V), "flip": np.zeros(V, np.uint8)}
    with pytest.raises(TypeError):
        list(assoc._genotypes(cohort, arrays, np.arange(cohort.n_samples), impute=False))
    cache = RowCache(V, 1 << 26)
    keep = np.ones(cohort.n_samples, bool)
    a = cache.context("gt", False, keep, ())
    b = cache.context("hard", False, keep, ())
    c = cache.context("gt", True, keep, ())
    assert a is not b and a is not c and cache.context("gt", False, keep.copy(), ()) is a


def test_replies_do_not_depend_on_threads_or_the_memo(tmp_path):
    """The same logistic/Firth/linear requests answered with 1 thread and no memo, and with 2
    threads and the memo, give byte-identical replies (the threads split work on the kernels' own
    block boundaries)."""
    import json

    from conftest import PLINK_EXACT_POLICY

    from fedgen.federation.transport import InProcessTransport, Request

    data = make_synth(300, 400, seed=9, missing_rate=0.03, extremes=False)
    # the same files twice (two cohorts, so that each keeps its own setting)
    nc1 = next(iter(split_sites(data, tmp_path / "s1", [1.0], seed=1, policy=PLINK_EXACT_POLICY).values()))
    nc = next(iter(split_sites(data, tmp_path / "s2", [1.0], seed=1, policy=PLINK_EXACT_POLICY).values()))
    one = InProcessTransport({"a": {**nc1, "threads": "1", "row_cache_mb": "0"}})
    two = InProcessTransport({"a": {**nc, "threads": "2", "row_cache_mb": "64"}})
    V = load_cohort(nc).dosage.shape[0]
    rng = np.random.default_rng(4)
    base = {"covariates": [{"name": "age", "kind": "numeric", "mean": 45.0, "sd": 12.0}], "missing": "drop"}
    idx = {"idx": np.arange(V, dtype=np.int64), "flip": np.zeros(V, np.uint8)}
    reqs = [Request("glm_linear", params={"phenotype": "QT", "kind": "quantitative", **base}, arrays=idx)]
    for _ in range(3):  # rounds of IRLS at new β: the memo serves the later ones
        beta = rng.normal(scale=0.2, size=(V, 3))
        reqs.append(Request("glm_logistic", params={"phenotype": "BIN", "kind": "binary", **base},
                            arrays={**idx, "beta": beta}))
    reqs.append(Request("glm_firth", params={"phenotype": "BIN", "kind": "binary", **base},
                        arrays={**idx, "beta": rng.normal(scale=0.2, size=(V, 3))}))
    for req in reqs:
        a = one.query(req)["a"]
        b = two.query(req)["a"]
        assert load_cohort({**nc, "row_cache_mb": "64"})._row_cache.nbytes > 0  # this reply went through the memo
        assert set(a.arrays) == set(b.arrays) and json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)
        for k in a.arrays:
            assert a.arrays[k].tobytes() == b.arrays[k].tobytes(), (req.analysis, k)
    assert load_cohort({**nc1, "row_cache_mb": "0"})._row_cache.nbytes == 0


def test_a_site_too_big_for_its_memo_keeps_the_counts_and_re_reads_the_rows(cohort):
    """Room for every row's cells but not for the study's genotypes (a biobank site): the memo
    keeps the counts only, later rounds skip the counting, re-read the genotypes, and give exactly
    what a fresh site gives."""
    n, V = cohort.n_samples, cohort.dosage.shape[0]
    keep = np.ones(n, bool)
    keep[::5] = False
    n_keep = int(keep.sum())
    arrays = {"idx": np.arange(V), "flip": (np.arange(V) % 3 == 0).astype(np.uint8)}
    cohort.row_cache_mb = (V * 32 + 20 * n_keep) / (1 << 20)  # every row's cells and fill, ~20 rows' genotypes
    cohort._row_cache = None
    first = list(assoc._genotypes(cohort, arrays, keep, impute=True))
    ctx = cohort._row_cache.context("gt", True, keep, ())
    assert ctx.n == V and ctx.n_g == 0
    assert ctx.get(arrays["idx"], arrays["flip"].astype(bool))[0] is None  # genotypes to re-read
    again = list(assoc._genotypes(cohort, arrays, keep, impute=True))
    _same(first, again)
    _same(again, _fresh(cohort, arrays, keep, impute=True))



def test_hostile_aggregator_cannot_borrow_large_cells_for_a_small_set(tmp_path):
    """The attack the memo could open: ask for a rare variant's sums over everyone (its carrier cell
    is large, the row is released and memoised), then over a set that leaves only a few carriers (a
    site column missing for the others). If the memo served the first set's cells, the small-cell
    rule would pass the second reply and Σg·y over two carriers would leave the site. The site must
    withhold that row, and the attacker's difference of the two replies must give nothing.
    (Here the changed design also changes the rules' cell structures, a second part of the memo's
    key; with neither in the key the memo serves rows of the wrong width and the site fails closed.)"""
    from fedgen.federation.transport import InProcessTransport, Request

    data = make_synth(300, 200, seed=12, missing_rate=0.0, extremes=False)
    policy = {"min_count": 5, "min_cell": 5, "allow_per_variant_sample_sets": True}
    nc = next(iter(split_sites(data, tmp_path / "s", [1.0], seed=2, policy=policy).values()))
    c = load_cohort(nc)
    g = c.block(np.arange(c.dosage.shape[0]))
    carriers = (g > 0).sum(1)
    v = int(np.flatnonzero((carriers >= 6) & (carriers <= 9) & ((g < 2).sum(1) >= 5))[0])
    keep_two = np.flatnonzero(g[v] > 0)[:2]  # the two carriers the attacker wants to isolate
    # the other carriers, and enough non-carriers that the two sets differ by min_count or more
    # (a smaller difference is refused outright by the site's set register)
    drop = set(np.flatnonzero(g[v] > 0)[2:].tolist()) | set(np.flatnonzero(g[v] == 0)[:6].tolist())
    # a site column that is missing for every other carrier (the "planted covariate")
    lines = open(nc["samples"]).read().splitlines()
    row_of = {int(r): j for j, r in enumerate(c.table_rows.tolist())}
    out = [lines[0] + "\tx"]
    for t, line in enumerate(lines[1:]):
        j = row_of.get(t)
        out.append(line + ("\tNA" if j is not None and j in drop else f"\t{t % 7}"))
    open(nc["samples"], "w").write("\n".join(out) + "\n")
    tr = InProcessTransport({"a": nc})
    arrays = {"idx": np.array([v], dtype=np.int64), "flip": np.zeros(1, np.uint8)}
    base = {"phenotype": "QT", "kind": "quantitative", "missing": "drop"}
    everyone = tr.query(Request("glm_linear", params={**base, "covariates": []}, arrays=arrays))["a"]
    assert not everyone.arrays["withheld"].any()  # released, and memoised
    few = tr.query(Request("glm_linear", params={**base, "covariates": [{"name": "x", "kind": "numeric", "mean": 3.0, "sd": 2.0}]},
                           arrays=arrays))["a"]
    assert few.arrays["withheld"].all()  # two carriers left: withheld, not answered with the memoised cells
    assert not np.any(few.arrays["Xty"]) and not np.any(few.arrays["XtX_triu"])
    # the attacker's reconstruction: over the small set Σ g·y is the two carriers' phenotypes
    y = load_cohort(nc).sample_values("QT")
    truth = float((g[v, keep_two] * y[keep_two]).sum())
    assert abs(truth) > 1e-6 and not np.isclose(few.arrays["Xty"][0, 1], truth)
