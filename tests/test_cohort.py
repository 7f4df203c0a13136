"""Site cohort layer: VCF/BCF parsing paths, harmonisation cases, and bad input messages."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pysam
import pytest

from conftest import qc_plan, split_sites
from fedgen.cohort.cohort import load_cohort
from fedgen.cohort.contigs import harmonise_contig
from fedgen.cohort.vcf import read_vcf
from fedgen.errors import FedgenError, InputError
from fedgen.federation.transport import InProcessTransport
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth, write_samples, write_vcf


def naive_dosage(path: Path) -> np.ndarray:
    """Definition: per call via pysam objects (slow, independent of the fast path)."""
    rows = []
    if path.suffix == ".gz" and pysam.tabix_index is not None:
        raw = gzip.decompress(path.read_bytes())
        path = path.with_name(path.name + ".plain.vcf")
        path.write_bytes(raw)
    with pysam.VariantFile(str(path)) as vf:
        for rec in vf:
            if len(rec.alts or ()) != 1:
                continue
            row = []
            for s in rec.samples.values():
                gt = s.get("GT")
                if gt is None or any(a is None for a in gt):
                    row.append(-1)
                elif len(gt) == 1:
                    row.append(2 * gt[0])
                else:
                    row.append(gt[0] + gt[1])
            rows.append(row)
    return np.asarray(rows, dtype=np.int8)


def parse_all(path: Path) -> np.ndarray:
    header, blocks, stats = read_vcf(path)
    return np.concatenate([b.dosage for b in blocks])


@pytest.mark.parametrize(
    "fmt,compress,phased",
    [("GT", "bgzip", 0.0), ("GT", "none", 1.0), ("GT:AD:DP:GQ:PL", "gzip", 0.5), ("GT:AD:DP:GQ:PL", "bcf", 0.3)],
)
def test_fast_path_equals_definition(tmp_path, fmt, compress, phased):
    data = make_synth(n_samples=60, n_variants=80, seed=2, missing_rate=0.1)
    ext = {"bgzip": "vcf.gz", "gzip": "vcf.gz", "none": "vcf", "bcf": "bcf"}[compress]
    p = tmp_path / f"x.{ext}"
    write_vcf(data, p, fmt=fmt, compress=compress, phased=phased)
    np.testing.assert_array_equal(parse_all(p), naive_dosage(p))
    # and the truth the file was written from: half calls missing, haploid calls homozygous
    np.testing.assert_array_equal(parse_all(p), data.dosage)


def test_general_path_for_odd_records(tmp_path):
    text = (
        "##fileformat=VCFv4.2\n"
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tA\tB\tC\n"
        "1\t10\ta\tA\tG\t.\t.\t.\tDP:GT\t3:0/1\t4:1|1\t2:.\n"  # GT not first
        "1\t20\tb\tA\tG\t.\t.\t.\tGT:DP\t00/1:3\t1:4\t./.:2\n"  # zero-padded allele -> general path
        "1\t30\tc\tA\tG\t.\t.\t.\tDP\t3\t4\t5\n"  # no GT at all: missing
        "1\t40\td\tA\tG,T\t.\t.\t.\tGT\t0/2\t1/1\t0/0\n"  # multi-allelic: split into A>G and A>T
        "1\t50\te\tA\tG\t.\t.\t.\tGT\t1\t0/.\t.\n"  # haploid, half call, haploid missing
    )
    p = tmp_path / "odd.vcf"
    p.write_text(text)
    header, blocks, stats = read_vcf(p)
    d = np.concatenate([b.dosage for b in blocks])
    np.testing.assert_array_equal(d, [[1, 2, -1], [1, 2, -1], [-1, -1, -1], [0, 2, 0], [1, 0, 0], [2, -1, -1]])
    assert stats.multiallelic == 1 and stats.split_variants == 2
    assert stats.general_path >= 2


def test_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "crlf.vcf"
    p.write_bytes(
        b"##fileformat=VCFv4.2\r\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tA\tB\r\n"
        b"1\t10\ta\tA\tG\t.\t.\t.\tGT\t0/1\t1/1\r\n\n1\t20\tb\tC\tT\t.\t.\t.\tGT\t0/0\t./1\r\n"
    )
    np.testing.assert_array_equal(parse_all(p), [[1, 2], [0, -1]])


def test_allele_index_beyond_alt_is_an_error(tmp_path):
    p = tmp_path / "bad.vcf"
    p.write_text(
        "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tA\n1\t10\ta\tA\tG\t.\t.\t.\tGT\t0/2\n"
    )
    with pytest.raises(InputError, match="line 3.*allele 2"):
        parse_all(p)


def test_contig_names_harmonised():
    assert harmonise_contig("chr1") == harmonise_contig("1") == "1"
    assert harmonise_contig("chrX") == harmonise_contig("X") == "X"
    assert harmonise_contig("chrM") == harmonise_contig("MT") == "MT"


def _two_sites(tmp_path, **kw):
    data = make_synth(n_samples=150, n_variants=120, seed=9)
    return data, split_sites(data, tmp_path / "sites", [0.6, 0.4], **kw)


def _run(nodes, out):
    return run_plan(qc_plan(out, list(nodes)), InProcessTransport(nodes))


def test_chr_prefix_swap_and_sample_order_harmonised(tmp_path):
    data = make_synth(n_samples=150, n_variants=120, seed=9)
    convs = [dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip"),
             dict(chr_prefix=True, fmt="GT", phased=0.0, compress="bgzip", swap=True)]
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], conventions=convs)
    m = _run(nodes, tmp_path / "out")
    h = m["sites"]["site2"]["harmonisation"]
    assert h["shared"] == 120 and h["ref_alt_swapped"] == len(range(0, 120, 7))
    # one-site run on the pooled data gives the same frequencies
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    write_vcf(data, pooled / "g.vcf.gz")
    write_samples(data, pooled / "s.tsv", np.arange(len(data.samples)))
    _run({"all": {"site": "all", "vcf": str(pooled / "g.vcf.gz"), "samples": str(pooled / "s.tsv")}}, tmp_path / "p")
    assert (tmp_path / "out" / "freq.afreq").read_text() == (tmp_path / "p" / "freq.afreq").read_text()


def test_sample_mismatch_counts_reported(tmp_path):
    data = make_synth(n_samples=50, n_variants=30, seed=1)
    d = tmp_path / "s"
    d.mkdir()
    write_vcf(data, d / "g.vcf.gz", cols=np.arange(50))
    write_samples(data, d / "s.tsv", np.arange(5, 50), extra_ids=3)  # 5 VCF-only, 3 table-only
    c = load_cohort({"site": "x", "vcf": str(d / "g.vcf.gz"), "samples": str(d / "s.tsv")})
    assert c.counts["samples"] == 45
    assert c.counts["vcf_only_samples"] == 5
    assert c.counts["table_only_samples"] == 3
    assert [c.vcf_samples[j] for j in c.sample_cols] == data.samples[5:]


def test_genotype_cache_reused_and_invalidated(tmp_path):
    data = make_synth(n_samples=40, n_variants=30, seed=1)
    d = tmp_path / "s"
    d.mkdir()
    write_vcf(data, d / "g.vcf.gz")
    write_samples(data, d / "s.tsv", np.arange(40))
    cfg = {"site": "x", "vcf": str(d / "g.vcf.gz"), "samples": str(d / "s.tsv"), "state_dir": str(d / "st")}
    load_cohort(cfg)
    caches = list((d / "st" / "cache").iterdir())
    assert len(caches) == 1
    stamp = (caches[0] / "meta.json").stat().st_mtime_ns
    from fedgen.cohort import cohort as mod

    mod._COHORTS.clear()
    load_cohort(cfg)
    assert (caches[0] / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    data2 = make_synth(n_samples=40, n_variants=31, seed=2)
    write_vcf(data2, d / "g.vcf.gz")  # changed file -> new cache, old one removed
    c = load_cohort(cfg)
    assert c.dosage.shape[0] == 31
    assert len(list((d / "st" / "cache").iterdir())) == 1


def _sites_with_contig_lengths(data, tmp_path: Path, tag: str, lengths_per_site) -> dict[str, dict[str, str]]:
    nodes = {}
    for k, lengths in enumerate(lengths_per_site):
        d = tmp_path / f"{tag}{k}"
        d.mkdir()
        cols = np.arange(k * 30, (k + 1) * 30)
        write_vcf(data, d / "g.vcf.gz", cols=cols, contig_lengths=lengths)
        write_samples(data, d / "s.tsv", cols)
        nodes[f"b{k}"] = {"site": f"b{k}", "vcf": str(d / "g.vcf.gz"), "samples": str(d / "s.tsv")}
    return nodes


def test_genome_build_mismatch_stops(tmp_path):
    data = make_synth(n_samples=60, n_variants=40, seed=4)
    nodes = _sites_with_contig_lengths(data, tmp_path, "b", ({"1": 248956422, "2": 242193529, "22": 50818468},
                                                             {"1": 249250621, "2": 243199373, "22": 51304566}))
    with pytest.raises(FedgenError, match=r"sites are on different genome builds: b0 GRCh38, b1 GRCh37"):
        _run(nodes, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # lengths of no known build still have to agree contig by contig
    nodes = _sites_with_contig_lengths(data, tmp_path, "u", ({"1": 1000001, "2": 900000, "22": 500000},
                                                             {"1": 1000002, "2": 900000, "22": 500000}))
    with pytest.raises(FedgenError, match=r"different genome builds: contig 1 has length 1,000,001 at b0 but 1,000,002 at b1"):
        _run(nodes, tmp_path / "out2")


# ------------------------------------------------------------------ bad input: one clear message each


@pytest.fixture
def site(tmp_path):
    data = make_synth(n_samples=40, n_variants=30, seed=1)
    d = tmp_path / "site"
    d.mkdir()
    write_vcf(data, d / "g.vcf.gz")
    write_samples(data, d / "s.tsv", np.arange(40))
    return d


def _bad(nodes_mut, tmp_path, match, *, phenotypes=()):
    nodes = {"hk": {"site": "hk", **nodes_mut}}
    plan = qc_plan(tmp_path / "out", ["hk"], phenotypes=list(phenotypes))
    with pytest.raises(FedgenError, match=match) as ei:
        run_plan(plan, InProcessTransport(nodes))
    assert str(ei.value).startswith("site hk: ")
    assert not (tmp_path / "out").exists()
    return str(ei.value)


def test_missing_vcf(site, tmp_path):
    _bad({"vcf": str(site / "nope.vcf.gz"), "samples": str(site / "s.tsv")}, tmp_path, r"nope\.vcf\.gz: VCF/BCF file not found")


def test_unreadable_vcf(site, tmp_path):
    p = site / "locked.vcf"
    p.write_text("##fileformat=VCFv4.2\n")
    p.chmod(0)
    import os

    if os.access(p, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions are not enforced")
    _bad({"vcf": str(p), "samples": str(site / "s.tsv")}, tmp_path, "cannot read")


def test_not_a_vcf(site, tmp_path):
    p = site / "notes.txt"
    p.write_text("hello\tworld\n")
    _bad({"vcf": str(p), "samples": str(site / "s.tsv")}, tmp_path, r"notes\.txt: not a VCF or BCF file")


def test_gzip_not_vcf(site, tmp_path):
    p = site / "x.vcf.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("sample\tvalue\n")
    _bad({"vcf": str(p), "samples": str(site / "s.tsv")}, tmp_path, "compressed file is not a VCF or BCF")


def test_truncated_bgzip(site, tmp_path):
    raw = (site / "g.vcf.gz").read_bytes()
    p = site / "trunc.vcf.gz"
    p.write_bytes(raw[: len(raw) * 2 // 3])
    _bad({"vcf": str(p), "samples": str(site / "s.tsv")}, tmp_path, r"trunc\.vcf\.gz: .*truncated")


def test_truncated_at_block_boundary(site, tmp_path):
    raw = (site / "g.vcf.gz").read_bytes()
    p = site / "noeof.vcf.gz"
    p.write_bytes(raw[:-28])  # drop only the BGZF EOF marker
    _bad({"vcf": str(p), "samples": str(site / "s.tsv")}, tmp_path, "end-of-file marker is missing")


def test_no_iid_column(site, tmp_path):
    p = site / "noiid.tsv"
    p.write_text("ID\tBIN\nS00001\t1\n")
    _bad({"vcf": str(site / "g.vcf.gz"), "samples": str(p)}, tmp_path, r"noiid\.tsv: samples table has no IID column")


def test_no_sample_overlap(site, tmp_path):
    p = site / "other.tsv"
    p.write_text("IID\tBIN\nX1\t1\nX2\t0\n")
    _bad({"vcf": str(site / "g.vcf.gz"), "samples": str(p)}, tmp_path, r"other\.tsv: no sample overlap")


def test_missing_phenotype_column(site, tmp_path):
    _bad({"vcf": str(site / "g.vcf.gz"), "samples": str(site / "s.tsv")}, tmp_path, r"s\.tsv: no column 'HEIGHT'", phenotypes=["HEIGHT"])


def test_existing_results_survive_a_failed_run(site, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    plan = qc_plan(out, ["hk"])
    with pytest.raises(FedgenError):
        run_plan(plan, InProcessTransport({"hk": {"site": "hk", "vcf": str(site / "missing.vcf"), "samples": str(site / "s.tsv")}}))
    assert (out / "manifest.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_vcf_path_is_a_directory(site, tmp_path):
    _bad({"vcf": str(site), "samples": str(site / "s.tsv")}, tmp_path, r"is a directory, expected a VCF/BCF file")


def test_samples_table_is_not_tab_separated(site, tmp_path):
    p = site / "comma.csv"
    p.write_text("IID,BIN\nS00001,1\n")
    _bad({"vcf": str(site / "g.vcf.gz"), "samples": str(p)}, tmp_path, r"comma\.csv: samples table has no IID column \(is it tab-separated\?\)")


def test_polyploid_calls_are_missing_and_counted_not_fatal(tmp_path):
    """A call fedgen cannot use (GT 1/1/1) is a missing call, counted in the site's counts; the
    record and every other call in it are kept (one such record used to stop the whole study)."""
    from fedgen.cohort.cohort import load_cohort

    vcf = tmp_path / "poly.vcf"
    vcf.write_text(
        "##fileformat=VCFv4.2\n##contig=<ID=1,length=1000>\n"
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tA\tB\tC\n"
        "1\t10\trs1\tA\tG\t.\t.\t.\tGT\t0/1\t1/1/1\t0/0\n"
        "1\t20\trs2\tA\tG\t.\t.\t.\tGT:DP\t0/1/.:3\t1|1:4\t0/0:5\n"
        "1\t30\trs3\tA\tC\t.\t.\t.\tGT\t0/1\t./.\t1\n"
    )
    (tmp_path / "s.tsv").write_text("IID\tY\nA\t1\nB\t0\nC\t1\n")
    c = load_cohort({"site": "s", "vcf": str(vcf), "samples": str(tmp_path / "s.tsv"), "state_dir": str(tmp_path / "st")})
    assert np.asarray(c.dosage).tolist() == [[1, -1, 0], [-1, 2, 0], [1, -1, 2]]
    assert c.counts["unusable_calls"] == 1 and c.counts["variants"] == 3


def test_read_rows_from_the_cache_file_equal_indexing_the_mapping(tmp_path):
    """Blocks are read with preadv (bounded resident memory); any index order gives the rows
    that indexing the memory map gives, and an index past the end is an error."""
    from fedgen.cohort.cohort import read_rows

    rng = np.random.default_rng(0)
    a = rng.integers(-1, 3, size=(500, 37)).astype(np.int8)
    (tmp_path / "d.i8").write_bytes(b"\0" * 11 + a.tobytes())
    mm = np.memmap(tmp_path / "d.i8", dtype=np.int8, mode="r", offset=11, shape=a.shape)
    for idx in (np.arange(10, 400), np.array([5, 3, 4, 499, 498, 0]), np.array([], np.int64),
                rng.choice(500, 300), np.arange(500)[::-1]):
        got = read_rows(mm, np.asarray(idx, np.int64))
        assert got.dtype == np.int8 and np.array_equal(got, a[idx])
    assert np.array_equal(read_rows(a, np.array([2, 1])), a[[2, 1]])  # in-memory matrices too
    with pytest.raises(IndexError):
        read_rows(mm, np.array([500]))
