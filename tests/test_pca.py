"""Federated PCA: naive definitions, pooled PLINK 2 ``--pca`` / ``--indep-pairwise``, 2 and 3 sites.

Reference fixtures (``tests/data/pca``) come from ``scripts/make_pca_fixtures.py``: structured
genotypes (five populations on a tree) and PLINK 2.00a3.5's ``.eigenval``/``.eigenvec``
(``--maf 0.05 --pca approx 10``, exact ``--pca 10`` on the set without missing calls) and
``.prune.in``. The live tests draw fresh data and run plink2 when it is installed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, needs_plink2, split_sites
from fedgen.analyses import execute
from fedgen.cohort.cohort import load_cohort
from fedgen.cohort.pcs import (
    check_study_id,
    cohort_state_dir,
    format_eigenvec,
    load_site_pcs,
    read_eigenvec,
    site_state_dir,
)
from fedgen.errors import ConfigError, FedgenError, InputError, SiteError
from fedgen.federation.transport import InProcessTransport, Reply
from fedgen.stats import pca as P
from fedgen.study.align import Alignment
from fedgen.study.pca import pca_settings, resolve_build, run_pca, select_pca_variants, site_hist_bins
from fedgen.study.runner import StudyContext, blockwise_sum, describe_sites
from fedgen.testing import run_plink2, write_pooled_vcf

PCA_DATA = DATA / "pca"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_pca_fixtures.py"
TOP = 4


@functools.lru_cache(maxsize=None)
def fixture_script():  # noqa: ANN201 - a module object
    """``scripts/make_pca_fixtures.py`` imported as a module (it builds the data sets)."""
    spec = importlib.util.spec_from_file_location("make_pca_fixtures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_pca_fixtures"] = mod
    spec.loader.exec_module(mod)
    return mod


def allow_histograms(nodes) -> None:
    """Site policies that opt in to the per-site PC histograms (off by default: sample-level)."""
    from fedgen.node.policy import known_analyses

    for nc in nodes.values():
        pol = nc.get("policy")
        pol = json.loads(pol) if isinstance(pol, str) else dict(pol or {})
        pol.setdefault("allowed_analyses", sorted(known_analyses()))
        nc["policy"] = json.dumps(pol)


def site_freq(nodes, idx) -> np.ndarray:
    """Pooled ALT frequency of site variants ``idx`` (same order at every site in these fixtures)."""
    alt = obs = 0
    for nc in nodes.values():
        g = load_cohort(nc).block(np.asarray(idx))
        alt = alt + np.where(g >= 0, g, 0).sum(1)
        obs = obs + 2 * (g >= 0).sum(1)
    return alt / obs


def federated_pca(nodes, out: Path, pca: dict, *, study_id: str = "study1", block_size: int = 65536, **plan):
    """Describe sites, count genotypes, run the PCA (QC filters off: PLINK ran --maf only)."""
    allow_histograms(nodes)
    plan = {"missing": "drop", **plan}
    ctx = StudyContext({"study_id": study_id, "pca": pca, "block_size": block_size, "output_dir": str(out), **plan},
                       InProcessTransport(nodes))
    info, aln = describe_sites(ctx)
    counts = blockwise_sum(ctx, "genotype_counts", aln, key="counts")
    summary = run_pca(ctx, aln, counts, np.ones(len(aln), dtype=bool), out, info=info)
    return summary, ctx


def site_scores(nodes, study_id: str) -> dict[str, tuple[list[str], np.ndarray]]:
    out = {}
    for site, nc in nodes.items():
        iids, sc, _ = read_eigenvec(site_state_dir(nc) / "pca" / f"{study_id}.eigenvec")
        out[site] = (iids, sc)
    return out


def assert_matches_plink(summary, nodes, ref: Path, *, study_id: str = "study1", eig_tol: float = 0.01, min_r: float = 0.99):
    """Top-4 eigenvalues within ``eig_tol`` (relative); every site's scores |r| ≥ ``min_r``."""
    ev_ref = np.loadtxt(Path(f"{ref}.eigenval"))
    ev = np.asarray(summary["eigenvalues"])
    rel = np.abs(ev[:TOP] / ev_ref[:TOP] - 1)
    assert rel.max() < eig_tol, f"eigenvalues {ev[:TOP]} vs PLINK {ev_ref[:TOP]}"
    iids, ref_sc, _ = read_eigenvec(Path(f"{ref}.eigenvec"))
    where = {s: i for i, s in enumerate(iids)}
    seen = 0
    for site, (s_iids, sc) in site_scores(nodes, study_id).items():
        rows = [where[x] for x in s_iids]
        seen += len(rows)
        r = [abs(np.corrcoef(sc[:, j], ref_sc[rows, j])[0, 1]) for j in range(TOP)]
        assert min(r) >= min_r, f"{site}: |r| = {np.round(r, 4)}"
    assert seen == len(iids)  # every PLINK sample is scored at exactly one site
    return rel


# ------------------------------------------------------------------------------ pure maths


def naive_standardised(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    z = np.zeros(g.shape)
    for v in range(g.shape[0]):
        var = 2 * p[v] * (1 - p[v])
        for j in range(g.shape[1]):
            if g[v, j] >= 0 and var > 2.0**-44:
                z[v, j] = (g[v, j] - 2 * p[v]) / np.sqrt(var)
    return z


def random_dosage(rng, v: int, n: int, missing: float = 0.05) -> np.ndarray:
    p = rng.uniform(0.05, 0.95, v)
    g = rng.binomial(2, p[:, None], size=(v, n)).astype(np.int8)
    g[rng.random(g.shape) < missing] = -1
    return g


def test_standardisation_matches_definition():
    rng = np.random.default_rng(1)
    g = random_dosage(rng, 30, 40)
    p = rng.uniform(0, 1, 30)
    p[:3] = [0.0, 1.0, 1e-15]  # zero rows (still counted in M by PLINK)
    two_p, inv = P.variant_standardisation(p)
    z = P.standardised_dosage(g, two_p, inv)
    np.testing.assert_allclose(z, naive_standardised(g, p), rtol=1e-12, atol=1e-12)
    assert not z[:3].any()


def test_site_partials_sum_to_pooled_product():
    """Σ over any split of the samples of Z_s(Z_sᵀQ) is Z(ZᵀQ); the streamed two-pass form agrees."""
    rng = np.random.default_rng(2)
    g = random_dosage(rng, 1300, 90)
    ok = g >= 0
    p = np.where(ok, g, 0).sum(1) / (2 * ok.sum(1))
    two_p, inv = P.variant_standardisation(p)
    Q = rng.standard_normal((1300, 7))
    z = naive_standardised(g, p)
    pooled = z @ (z.T @ Q)
    parts = np.split(rng.permutation(90), [17, 60])
    fed = sum(P.site_gram_product(g[:, c], two_p, inv, Q) for c in parts)
    np.testing.assert_allclose(fed, pooled, rtol=1e-10, atol=1e-9)
    H = P.site_sample_projection(g, two_p, inv, Q)
    np.testing.assert_allclose(P.site_variant_products(g, two_p, inv, H), pooled, rtol=1e-10, atol=1e-9)


def structured_z(seed: int, n: int = 150, m: int = 500) -> np.ndarray:
    data, _ = fixture_script().make_structured(n, m, seed=seed, missing_rate=0.01)
    g = data.dosage
    ok = g >= 0
    p = np.where(ok, g, 0).sum(1) / (2 * ok.sum(1))
    return naive_standardised(g, p)


def run_krylov(z: np.ndarray, k: int, **kw) -> P.BlockKrylovPCA:
    drv = P.BlockKrylovPCA(z.shape[0], k, **kw)
    while not drv.done:
        drv.update(z @ (z.T @ drv.basis))
    return drv


@pytest.mark.parametrize("k", [1, 4, 10])
def test_block_krylov_equals_dense_eigendecomposition(k):
    z = structured_z(3)
    M = z.shape[0]
    w, V = np.linalg.eigh(z.T @ z / M)
    w, V = w[::-1], V[:, ::-1]
    drv = run_krylov(z, k, seed=7)
    assert drv.converged
    np.testing.assert_allclose(P.plink_eigenvalues(drv.eigenvalues, M), w[:k], rtol=1e-7)
    U = drv.loadings
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-10)
    scores = z.T @ U / np.sqrt(drv.eigenvalues)
    np.testing.assert_allclose(np.linalg.norm(scores, axis=0), 1.0, rtol=1e-8)
    for j in range(min(k, 4)):  # the structured PCs; bulk PCs have near-equal eigenvalues
        assert abs(scores[:, j] @ V[:, j]) > 1 - 1e-8
    assert np.all(U[np.argmax(np.abs(U), axis=0), np.arange(k)] > 0)  # sign convention


def test_block_krylov_is_reproducible_and_exhausts_small_problems():
    z = structured_z(4, n=60, m=40)  # M < block * rounds: the Krylov space fills up
    a, b = run_krylov(z, 5, seed=11), run_krylov(z, 5, seed=11)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(a.loadings, b.loadings)
    w = np.linalg.eigvalsh(z @ z.T)[::-1]
    np.testing.assert_allclose(a.eigenvalues, w[:5], rtol=1e-9)
    assert a.converged and a.rounds <= 4  # 40 variants, blocks of 10


def test_block_krylov_rejects_bad_products():
    drv = P.BlockKrylovPCA(50, 3, seed=1)
    with pytest.raises(ValueError, match="shape"):
        drv.update(np.zeros((50, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        drv.update(np.full(drv.basis.shape, np.nan))


def naive_pair_sums(g: np.ndarray, i: int, j: int) -> list[int]:
    both = (g[i] >= 0) & (g[j] >= 0)
    x, y = g[i][both].astype(int), g[j][both].astype(int)
    return [int(both.sum()), x.sum(), (x * x).sum(), y.sum(), (y * y).sum(), (x * y).sum()]


def test_ld_pair_sums_match_definition_and_add_over_sites():
    rng = np.random.default_rng(5)
    g = random_dosage(rng, 37, 50, missing=0.1)
    window = 6
    s = P.site_ld_pair_sums(g, 30, window, tile=8)
    for i in range(30):
        for d in range(1, window):
            expect = naive_pair_sums(g, i, i + d) if i + d < 37 else [0] * 6
            assert s[i, d - 1].tolist() == expect, (i, d)
    parts = np.split(np.arange(50), [20])
    fed = sum(P.site_ld_pair_sums(g[:, c], 30, window) for c in parts)
    np.testing.assert_array_equal(fed, s)


def test_ld_prune_hand_example():
    """Three copies of one variant and an independent one: keep the copy with the highest MAF."""
    g = np.array([[0, 1, 2, 1, 0, 1], [0, 1, 2, 1, 0, 1], [0, 1, 2, 1, 0, 1], [1, 1, 0, 2, 0, 1]], dtype=np.int8)
    sums = P.site_ld_pair_sums(g, 4, 4)
    ex = P.ld_pair_r2_exceeds(sums, 0.5)
    assert ex[0].tolist() == [True, True, False] and ex[1, 0]
    major = np.array([0.6, 0.55, 0.7, 0.6])  # variant 1 has the highest MAF
    keep = P.ld_prune_pairwise(ex, ["1"] * 4, major, window=4, step=1)
    assert keep.tolist() == [False, True, False, True]
    keep = P.ld_prune_pairwise(ex, ["1", "1", "2", "2"], major, window=4, step=1)
    assert keep.tolist() == [False, True, True, True]  # pairs across contigs are never compared


def test_suppress_small_cells():
    c, hidden = P.suppress_small_cells(np.array([[0, 1, 4], [5, 9, 2]]), 5)
    assert c.tolist() == [[0, 0, 0], [5, 9, 0]] and hidden == 7


def test_genome_build_and_long_range_regions():
    assert P.detect_genome_build({"1": 249250621, "2": None}) == "GRCh37"
    assert P.detect_genome_build({"1": 248956422}) == "GRCh38"
    assert P.detect_genome_build({"1": 7380770}) is None
    assert P.detect_genome_build({"1": 249250621, "2": 242193529}) is None  # mixed: unknown
    hit = P.in_regions(["6", "6", "6", "1"], [25392020, 25392021, 33392022, 50_000_000], P.LONG_RANGE_LD["GRCh37"])
    assert hit.tolist() == [False, True, True, True]
    info = {s: Reply(s, {}, {"contigs": {"1": 249250621}}) for s in ("a", "b")}
    assert resolve_build("auto", True, info)[0] == "GRCh37"
    assert resolve_build("auto", False, info)[0] is None
    assert resolve_build("GRCh38", True, None)[0] == "GRCh38"
    info["b"] = Reply("b", {}, {"contigs": {"1": 248956422}})
    assert resolve_build("auto", True, info)[0] is None


def test_select_pca_variants_filters():
    aln = Alignment(
        chrom=np.array(["6", "6", "1", "1"]), pos=np.array([30_000_000, 40_000_000, 100, 200]),
        ids=np.array(["a", "b", "c", "d"]), ref=np.array(["A"] * 4), alt=np.array(["C"] * 4), idx={}, flip={},
    )
    counts = np.array([[50, 40, 10, 0], [50, 40, 10, 0], [99, 1, 0, 0], [30, 50, 20, 0]])
    qc = np.array([True, True, True, False])
    rows, info = select_pca_variants(aln, counts, qc, maf=0.05, build="GRCh37")
    assert rows.tolist() == [1] and info["long_range_ld_excluded"] == 1 and info["passing_maf"] == 2
    rows, _ = select_pca_variants(aln, counts, qc, maf=None, build=None)
    assert rows.tolist() == [0, 1, 2]


def test_pca_settings_validation():
    cfg = pca_settings(None)
    assert cfg["k"] == 10 and cfg["maf"] == 0.05 and cfg["ld_prune"] is None
    assert pca_settings({"ld_prune": True})["ld_prune"] == {"window": 50, "step": 5, "r2": 0.2}
    for bad, msg in [({"k": 0}, "study.pca.k"), ({"maf": 0.7}, "maf"), ({"ld_prune": {"window": 1}}, "ld_prune"),
                     ({"ld_prune": {"win": 5}}, "unknown"), ({"kk": 1}, "unknown"), ({"build": "hg19"}, "build"),
                     ({"min_cell": 2}, "min_cell")]:
        with pytest.raises(ConfigError, match=msg):
            pca_settings(bad)
    with pytest.raises(ConfigError, match="study.pcs"):
        pca_settings({"k": 4}, pcs=5)
    assert pca_settings({"k": 4}, pcs=4)["k"] == 4


def test_eigenvec_format_round_trip(tmp_path):
    text = format_eigenvec(["a", "b"], np.array([[0.1234567, -2.5e-05], [1e-7, 3.0]]))
    assert text.splitlines() == ["#IID\tPC1\tPC2", "a\t0.123457\t-2.5e-05", "b\t1e-07\t3"]
    (tmp_path / "x.eigenvec").write_text(text)
    iids, sc, names = read_eigenvec(tmp_path / "x.eigenvec")
    assert iids == ["a", "b"] and names == ["PC1", "PC2"] and sc[1, 1] == 3.0
    (tmp_path / "y.eigenvec").write_text("#FID\tIID\tPC1\nf\ta\t0.5\n")
    assert read_eigenvec(tmp_path / "y.eigenvec")[0] == ["a"]
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(FedgenError):
            check_study_id(bad)


# ------------------------------------------------------------------------------ federated vs PLINK


@functools.lru_cache(maxsize=None)
def fixture_data(name: str):
    return fixture_script().data_from_npz(PCA_DATA / f"{name}.npz")


@pytest.mark.parametrize(
    "name,ref,fractions",
    [
        ("small", "small.exact", [0.7, 0.3]),
        ("small", "small.approx", [0.4, 0.35, 0.25]),
        ("medium", "medium.approx", [0.6, 0.4]),
        ("medium", "medium.approx", [0.5, 0.3, 0.2]),
    ],
)
def test_federated_pca_equals_committed_plink(tmp_path, name, ref, fractions):
    nodes = split_sites(fixture_data(name), tmp_path / "sites", fractions, seed=len(fractions))
    summary, _ = federated_pca(nodes, tmp_path / "out", {"k": 10, "maf": 0.05})
    rel = assert_matches_plink(summary, nodes, PCA_DATA / ref)
    assert rel.max() < 1e-4  # PLINK prints 6 digits; both solve the same eigenproblem
    assert summary["converged"] and summary["variants_used"] == int((fixture_maf(name) >= 0.05).sum())
    lines = (tmp_path / "out" / "pca.eigenval").read_text().splitlines()
    assert len(lines) == 10 and lines[0] == (PCA_DATA / f"{ref}.eigenval").read_text().splitlines()[0]


def test_blocked_and_single_request_protocols_agree(tmp_path):
    """Variants in one request per iteration, or in blocks accumulated at the sites: same PCA."""
    nodes = split_sites(fixture_data("medium"), tmp_path / "sites", [0.5, 0.3, 0.2], seed=3)
    one, _ = federated_pca(nodes, tmp_path / "one", {"k": 6}, study_id="one", block_size=65536)
    many, _ = federated_pca(nodes, tmp_path / "many", {"k": 6}, study_id="many", block_size=200)
    assert one["rounds"]["svd"] * 2 * 6 == many["rounds"]["svd"] and many["rounds"]["scores"] == 6  # 1154 variants
    np.testing.assert_allclose(one["eigenvalues"], many["eigenvalues"], rtol=1e-10)
    for (i1, s1), (i2, s2) in zip(site_scores(nodes, "one").values(), site_scores(nodes, "many").values()):
        assert i1 == i2
        np.testing.assert_allclose(s1, s2, atol=2e-6)  # 6 printed digits
    for nc in nodes.values():  # work files are cleaned up
        assert not list((Path(nc["state_dir"]) / "pca" / ".work").glob("*.npz"))
    json.dumps(many)  # the summary goes into manifest.json


class WireTransport(InProcessTransport):
    """In-process sites, but every request and reply goes through Flower's wire encoding."""

    def query(self, request):
        from fedgen.federation.flower import decode_reply, decode_request, encode_reply, encode_request

        replies = {}
        for site, cfg in self._configs.items():
            analysis, params, arrays = decode_request(encode_request(request.analysis, request.params, request.arrays_for(site)))
            out, meta = execute(cfg, analysis, params, arrays, context={"study_id": request.study_id})
            arrays_back, meta_back, nbytes = decode_reply(encode_reply(out, meta))
            replies[site] = Reply(site=site, arrays=arrays_back, meta=meta_back, nbytes=nbytes)
        return replies


def test_pca_messages_survive_flower_wire_format(tmp_path):
    nodes = split_sites(fixture_data("ld"), tmp_path / "sites", [0.5, 0.5], seed=2)
    plan = {"study_id": "wire", "block_size": 400, "output_dir": str(tmp_path / "out"), "missing": "drop",
            "pca": {"k": 4, "ld_prune": {"window": 30, "step": 5, "r2": 0.3}}}
    ctx = StudyContext(plan, WireTransport(nodes))
    info, aln = describe_sites(ctx)
    counts = blockwise_sum(ctx, "genotype_counts", aln, key="counts")
    wire = run_pca(ctx, aln, counts, np.ones(len(aln), dtype=bool), tmp_path / "out", info=info)
    plan2 = {**plan, "study_id": "direct", "output_dir": str(tmp_path / "out2")}
    direct, _ = federated_pca(nodes, tmp_path / "out2", plan2["pca"], study_id="direct", block_size=400)
    assert wire["eigenvalues"] == direct["eigenvalues"] and wire["variants_used"] == direct["variants_used"]
    assert wire["variant_blocks"] > 1 and wire["bytes_sent_by_site"]["site1"] > 0


def test_blocked_protocol_rejects_out_of_order_blocks(tmp_path):
    nodes = split_sites(fixture_data("small"), tmp_path / "sites", [0.6, 0.4], seed=1)
    nc = next(iter(nodes.values()))
    arr = {"idx": np.arange(5), "flip": np.zeros(5, np.uint8), "freq": site_freq(nodes, np.arange(5)), "basis": np.ones((5, 2))}
    common = {"study_id": "x", "round": 0, "n_blocks": 3, "phase": "project"}
    with pytest.raises(FedgenError, match="without the blocks before it"):
        execute(nc, "pca_product", {**common, "block": 1}, arr)
    execute(nc, "pca_product", {**common, "block": 0}, arr)
    with pytest.raises(FedgenError, match="out of order"):
        execute(nc, "pca_product", {**common, "block": 2}, arr)
    with pytest.raises(FedgenError, match="incomplete"):
        execute(nc, "pca_product", {**common, "phase": "product", "block": 0}, arr)


def fixture_maf(name: str) -> np.ndarray:
    g = fixture_data(name).dosage
    ok = g >= 0
    p = np.where(ok, g, 0).sum(1) / (2 * ok.sum(1))
    return np.minimum(p, 1 - p)


@pytest.mark.parametrize("fractions", [[0.5, 0.5], [0.2, 0.5, 0.3]])
def test_federated_ld_prune_equals_plink_indep_pairwise(tmp_path, fractions):
    nodes = split_sites(fixture_data("ld"), tmp_path / "sites", fractions, seed=5)
    pca = {"k": 10, "maf": 0.05, "ld_prune": {"window": 50, "step": 5, "r2": 0.2}}
    summary, _ = federated_pca(nodes, tmp_path / "out", pca, block_size=300)  # LD blocks of 251 + look-ahead
    rows = [line.split("\t") for line in (tmp_path / "out" / "pca.variants.tsv").read_text().splitlines()[1:]]
    ours = {f"{r[0]}:{r[1]}" for r in rows}
    theirs = set((PCA_DATA / "ld.prune.in").read_text().split())
    assert ours == theirs
    # one request per contig segment of at most 300 - 49 first variants (sites answer one contig per request)
    chrom = [line.split("\t")[0] for line in (tmp_path / "out" / "pca.variants.tsv").read_text().splitlines()[1:]]
    assert summary["selection"]["ld_pruned_kept"] == len(theirs)
    assert summary["rounds"]["ld_prune"] >= len(set(chrom))
    assert_matches_plink(summary, nodes, PCA_DATA / "ld.approx")


def test_scores_stay_at_sites_and_replies_have_no_samples_axis(tmp_path):
    nodes = split_sites(fixture_data("medium"), tmp_path / "sites", [0.55, 0.45], seed=9)
    out = tmp_path / "out"
    summary, ctx = federated_pca(nodes, out, {"k": 6, "maf": 0.05, "local_plot": True}, study_id="abc")
    # the aggregator's folder holds no sample ID and no per-sample table
    iids = set(fixture_data("medium").samples)
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".png":
            text = f.read_text()
            assert not any(s in text for s in iids), f"{f} mentions a sample"
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["pca.eigenval", "pca.variants.tsv", "pca_sites.png"]
    # each site stored its own samples' scores, and a local plot
    for site, nc in nodes.items():
        cohort = load_cohort(nc)
        assert cohort_state_dir(cohort) == Path(nc["state_dir"])
        pcs = load_site_pcs(cohort, "abc", 4)
        iids_s, sc, _ = read_eigenvec(Path(nc["state_dir"]) / "pca" / "abc.eigenvec")
        assert pcs.shape == (cohort.n_samples, 4)
        order = {s: i for i, s in enumerate(iids_s)}
        rows = [order[cohort.vcf_samples[j]] for j in cohort.sample_cols.tolist()]
        np.testing.assert_array_equal(pcs, sc[rows, :4])
        meta = json.loads((Path(nc["state_dir"]) / "pca" / "abc.json").read_text())
        assert meta["study_id"] == "abc" and len(meta["eigenvalues"]) == 6
        assert (Path(nc["state_dir"]) / "pca" / "abc.png").exists()
        with pytest.raises(InputError, match="asks for 7 PCs"):
            load_site_pcs(cohort, "abc", 7)
        with pytest.raises(InputError, match="not found"):
            load_site_pcs(cohort, "other", 2)
    # pooled score moments: unit-norm eigenvectors with mean ~0 (reported for covariate scaling)
    n = summary["samples"]
    np.testing.assert_allclose(np.asarray(summary["pc_moments"]["sd"]) ** 2 * (n - 1), 1.0, atol=1e-3)
    # reply shapes depend on variants and bins only, never on a site's sample count
    sizes = {s: load_cohort(nc).n_samples for s, nc in nodes.items()}
    assert len(set(sizes.values())) == 2
    allow_histograms(nodes)
    tr = InProcessTransport(nodes)
    from fedgen.federation.transport import Request

    idx = {s: {"idx": np.arange(40), "flip": np.zeros(40, np.uint8)} for s in nodes}
    common = {"freq": site_freq(nodes, np.arange(40)), "basis": np.ones((40, 3))}
    for name, params, arrays in [
        ("pca_product", {}, common),
        ("ld_pair_sums", {"n_first": 30, "window": 5}, {}),
        ("pca_scores", {"study_id": "t2", "theta": [1.0, 2.0, 3.0]}, {"freq": common["freq"], "loadings": common["basis"]}),
        ("pca_histograms", {"study_id": "t2", "pairs": [[0, 1]], "ranges": [[[-1, 1], [-1, 1]]], "bins": 12}, {}),
    ]:
        reps = tr.query(Request(name, params=params, arrays=arrays, per_site_arrays=idx if name != "pca_histograms" else {},
                                study_id="t2"))
        shapes = {s: {k: a.shape for k, a in r.arrays.items()} for s, r in reps.items()}
        assert len({json.dumps(v, sort_keys=True) for v in shapes.values()}) == 1, (name, shapes)
        for s, r in reps.items():
            for a in r.arrays.values():
                assert sizes[s] not in a.shape, (name, s, a.shape)


def test_histograms_are_suppressed_at_sites(tmp_path):
    nodes = split_sites(fixture_data("small"), tmp_path / "sites", [0.75, 0.25], seed=2)
    summary, _ = federated_pca(nodes, tmp_path / "out", {"k": 4, "maf": 0.05, "hist_bins": 30}, study_id="h1")
    from fedgen.federation.transport import Request

    allow_histograms(nodes)
    tr = InProcessTransport(nodes)
    for bins in (12, 30):
        reps = tr.query(Request("pca_histograms", params={"study_id": "h1", "pairs": [[0, 1], [2, 3]], "bins": bins,
                                                          "ranges": [[[-0.3, 0.3], [-0.3, 0.3]]] * 2, "min_count": 1}))
        for r in reps.values():
            h = r.arrays["hist2d"]
            assert not np.any((h > 0) & (h < 5))  # the site's minimum applies whatever is asked
    assert set(summary["histograms"]["bins"]) == set(nodes)
    assert summary["histograms"]["bins"] == {s: site_hist_bins(n, 30) for s, n in summary["samples_per_site"].items()}
    assert (tmp_path / "out" / "plots" / "pca_sites.png").stat().st_size > 10_000


def test_site_refuses_bad_requests(tmp_path):
    nodes = split_sites(fixture_data("small"), tmp_path / "sites", [0.8, 0.2], seed=1)
    nc = next(iter(nodes.values()))
    idx = {"idx": np.arange(5), "flip": np.zeros(5, np.uint8)}
    f = site_freq(nodes, np.arange(5))
    with pytest.raises(FedgenError, match="freq"):
        execute(nc, "pca_product", {}, {**idx, "basis": np.ones((5, 2))}, context={"study_id": "ok"})
    with pytest.raises(FedgenError, match="basis"):
        execute(nc, "pca_product", {}, {**idx, "freq": f, "basis": np.ones((4, 2))}, context={"study_id": "ok"})
    with pytest.raises(FedgenError, match="safe file name"):
        execute(nc, "pca_scores", {"study_id": "../../x", "theta": [1.0]}, {**idx, "freq": f, "loadings": np.ones((5, 1))})
    with pytest.raises(FedgenError, match="answered no PCA for this study"):
        execute(nc, "pca_scores", {"study_id": "ok", "theta": [1.0]}, {**idx, "freq": f, "loadings": np.ones((5, 1))})
    execute(nc, "pca_product", {}, {**idx, "freq": f, "basis": np.ones((5, 1))}, context={"study_id": "ok"})
    with pytest.raises(FedgenError, match="theta"):
        execute(nc, "pca_scores", {"study_id": "ok", "theta": [0.0]}, {**idx, "freq": f, "loadings": np.ones((5, 1))})
    with pytest.raises(FedgenError, match="not consistent with this site's data"):  # crafted frequencies
        execute(nc, "pca_product", {}, {**idx, "freq": np.clip(1 - f, 0.001, 0.999), "basis": np.ones((5, 1))},
                context={"study_id": "ok2"})


def test_too_few_variants_is_a_clear_error(tmp_path):
    nodes = split_sites(fixture_data("small"), tmp_path / "sites", [0.5, 0.5], seed=1)
    with pytest.raises(FedgenError, match=r"only \d+ variants left after selection; need at least k = 4"):
        federated_pca(nodes, tmp_path / "out", {"k": 4, "maf": 0.4999})


def test_site_with_too_few_samples_refuses(tmp_path):
    data = fixture_data("small")
    nodes = split_sites(data, tmp_path / "sites", [0.97, 0.03], seed=1)  # 6 samples at site2
    with pytest.raises(SiteError, match="site2: this site has too few analysed samples for PCA"):
        federated_pca(nodes, tmp_path / "out", {"k": 4})


# ------------------------------------------------------------------------------ live PLINK


@needs_plink2
@pytest.mark.plink
@pytest.mark.parametrize("fractions", [[0.65, 0.35], [0.2, 0.45, 0.35]])
@pytest.mark.parametrize("missing,modes", [(0.0, ("exact", "approx")), (0.015, ("approx",))])
def test_federated_pca_equals_live_plink(tmp_path, fractions, missing, modes):
    data, _ = fixture_script().make_structured(320, 900, seed=77 + len(fractions), missing_rate=missing)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    for mode in modes:
        extra = ["approx", "10", "--seed", "3"] if mode == "approx" else ["10"]
        run_plink2(["--vcf", "pooled.vcf", "--maf", "0.05", "--pca", *extra, "--out", mode], tmp_path)
    nodes = split_sites(data, tmp_path / "sites", fractions, seed=11)
    summary, _ = federated_pca(nodes, tmp_path / "out", {"k": 10, "maf": 0.05})
    for mode in modes:
        assert_matches_plink(summary, nodes, tmp_path / mode)


@needs_plink2
@pytest.mark.plink
def test_federated_ld_prune_equals_live_plink(tmp_path):
    data, _ = fixture_script().make_structured(260, 1500, seed=91, missing_rate=0.02, ld_copy=0.6)
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    run_plink2(["--vcf", "pooled.vcf", "--set-all-var-ids", "@:#", "--maf", "0.02", "--indep-pairwise", "20", "3", "0.3",
                "--out", "p"], tmp_path)
    nodes = split_sites(data, tmp_path / "sites", [0.3, 0.3, 0.4], seed=4)
    federated_pca(nodes, tmp_path / "out", {"k": 4, "maf": 0.02, "ld_prune": {"window": 20, "step": 3, "r2": 0.3}})
    rows = [line.split("\t") for line in (tmp_path / "out" / "pca.variants.tsv").read_text().splitlines()[1:]]
    assert {f"{r[0]}:{r[1]}" for r in rows} == set((tmp_path / "p.prune.in").read_text().split())
