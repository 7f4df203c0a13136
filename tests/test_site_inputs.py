"""Site inputs: PLINK 2 (.pgen/.pvar/.psam) and PLINK 1 (.bed/.bim/.fam) filesets and per-chromosome VCFs give
the same results as the site's single VCF; declared genome builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import qc_plan, split_sites
from fedgen.cohort.cohort import load_cohort
from fedgen.errors import InputError
from fedgen.federation.transport import InProcessTransport
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

pgenlib = pytest.importorskip("pgenlib")


def write_pgen(cohort, prefix: Path, *, extra_multiallelic: bool = False) -> None:
    g = np.asarray(cohort.dosage, dtype=np.int8)
    rows = list(zip(cohort.chrom.tolist(), cohort.pos.tolist(), cohort.ids.tolist(), cohort.ref.tolist(), cohort.alt.tolist()))
    n_var = len(rows) + (1 if extra_multiallelic else 0)
    w = pgenlib.PgenWriter(str(prefix.with_suffix(".pgen")).encode(), len(cohort.vcf_samples), n_var, False,
                           allele_ct_limit=3 if extra_multiallelic else 2)
    lines = [f"##contig=<ID={c},length={n}>" for c, n in cohort.contigs.items() if n] + ["#CHROM\tPOS\tID\tREF\tALT"]
    for k, (c, p, i, r, a) in enumerate(rows):
        w.append_biallelic(np.where(g[k] < 0, -9, g[k]).astype(np.int8))
        lines.append(f"{c}\t{p}\t{i}\t{r}\t{a}")
        if extra_multiallelic and k == 3:  # a multi-allelic record in the middle: split (at this site only)
            codes = np.tile(np.array([0, 1, 1, 2, 2, 2, 0, 0], dtype=np.int32), -(-2 * g.shape[1] // 8))[: 2 * g.shape[1]]
            w.append_alleles(np.ascontiguousarray(codes), allele_ct=3)
            lines.append(f"{c}\t{p + 1}\tmulti\tA\tC,G")
    w.close()
    prefix.with_suffix(".pvar").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".psam").write_text("#IID\tSEX\n" + "".join(f"{s}\tNA\n" for s in cohort.vcf_samples))


def write_bed(cohort, prefix: Path) -> None:
    """PLINK 1 .bed by hand: SNP-major, 2 bits per call (00 hom A1 = ALT, 10 het, 11 hom A2 = REF, 01 missing)."""
    g = np.asarray(cohort.dosage, dtype=np.int8)
    n = g.shape[1]
    code = np.select([g == 2, g == 1, g == 0], [0b00, 0b10, 0b11], 0b01).astype(np.uint8)
    pad = (-n) % 4
    code = np.hstack([code, np.zeros((g.shape[0], pad), np.uint8)]).reshape(g.shape[0], -1, 4)
    packed = code[:, :, 0] | (code[:, :, 1] << 2) | (code[:, :, 2] << 4) | (code[:, :, 3] << 6)
    prefix.with_suffix(".bed").write_bytes(bytes([0x6C, 0x1B, 0x01]) + packed.astype(np.uint8).tobytes())
    prefix.with_suffix(".bim").write_text("".join(
        f"{c}\t{i}\t0\t{p}\t{a}\t{r}\n" for c, p, i, r, a in
        zip(cohort.chrom.tolist(), cohort.pos.tolist(), cohort.ids.tolist(), cohort.ref.tolist(), cohort.alt.tolist())))
    prefix.with_suffix(".fam").write_text("".join(f"F{k}\t{s}\t0\t0\t0\t-9\n" for k, s in enumerate(cohort.vcf_samples)))


def test_pgen_and_bed_sites_give_the_vcf_results(tmp_path):
    data = make_synth(n_samples=240, n_variants=300, seed=4)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.3, 0.2], seed=2)
    run_plan(qc_plan(tmp_path / "vcf", list(nodes)), InProcessTransport(nodes))
    mixed = {}
    for k, (site, nc) in enumerate(nodes.items()):
        cohort = load_cohort(nc)
        nc2 = {key: v for key, v in nc.items() if key != "vcf"}
        nc2["state_dir"] = str(tmp_path / f"state-{site}")
        if k == 0:
            write_pgen(cohort, tmp_path / f"{site}_set", extra_multiallelic=True)
            nc2["pgen"] = str(tmp_path / f"{site}_set")
        elif k == 1:
            write_bed(cohort, tmp_path / f"{site}_set")
            nc2["bed"] = str(tmp_path / f"{site}_set.bed")  # a file of the set works as well as the prefix
        else:
            nc2["vcf"] = nc["vcf"]
        mixed[site] = nc2
        if k < 2:
            c2 = load_cohort(nc2)
            rest = np.flatnonzero(c2.ids != "multi")  # the pgen's extra (split) record aside
            np.testing.assert_array_equal(np.asarray(c2.dosage)[rest], np.asarray(cohort.dosage))
            assert c2.vcf_samples == cohort.vcf_samples and c2.ids[rest].tolist() == cohort.ids.tolist()
    c0 = load_cohort(mixed[list(mixed)[0]])
    assert c0.counts["multiallelic_split"] == 1 and c0.counts["split_variants"] == 2
    j = c0.ids.tolist().index("multi")
    assert c0.alt[j : j + 2].tolist() == ["C", "G"] and c0.ids[j + 1] == "multi"
    # calls 0/1, 1/2, 2/2, 0/0 repeating: copies of C, then of G
    np.testing.assert_array_equal(np.asarray(c0.dosage[j : j + 2, :4]), [[1, 1, 0, 0], [0, 1, 2, 0]])
    run_plan(qc_plan(tmp_path / "mixed", list(mixed)), InProcessTransport(mixed))
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "variants.tsv"):
        assert (tmp_path / "mixed" / name).read_text() == (tmp_path / "vcf" / name).read_text(), name


def test_bad_filesets_get_clear_errors(tmp_path):
    data = make_synth(n_samples=40, n_variants=30, seed=1)
    nodes = split_sites(data, tmp_path / "sites", [1.0], seed=1)
    nc = next(iter(nodes.values()))
    cohort = load_cohort(nc)
    prefix = tmp_path / "set"
    write_bed(cohort, prefix)
    base = {"site": "s", "samples": nc["samples"], "state_dir": str(tmp_path / "st")}
    with pytest.raises(InputError, match="several genotype inputs"):
        load_cohort({**base, "bed": str(prefix), "vcf": nc["vcf"]})
    with pytest.raises(InputError, match="missing .*set.fam"):
        prefix.with_suffix(".fam").rename(tmp_path / "x.fam")
        load_cohort({**base, "bed": str(prefix)})
    (tmp_path / "x.fam").rename(prefix.with_suffix(".fam"))
    lines = prefix.with_suffix(".bim").read_text().splitlines()
    prefix.with_suffix(".bim").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(InputError, match="variants, but set.bim lists"):
        load_cohort({**base, "bed": str(prefix)})


def _split_by_chrom(vcf: Path, out: Path) -> list[Path]:
    """Per-chromosome plain VCFs (the header repeated), named chr<N>.vcf."""
    import pysam

    with pysam.BGZFile(str(vcf), "rb") if str(vcf).endswith(".gz") else open(vcf, "rb") as fh:
        lines = fh.read().decode().splitlines()
    header = [ln for ln in lines if ln.startswith("#")]
    by: dict[str, list[str]] = {}
    for ln in lines:
        if ln and not ln.startswith("#"):
            by.setdefault(ln.split("\t", 1)[0], []).append(ln)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for c, rows in by.items():
        p = out / f"chr{c.removeprefix('chr')}.vcf"
        p.write_text("\n".join(header + rows) + "\n")
        files.append(p)
    return files


def test_per_chromosome_vcfs_give_the_single_file_results(tmp_path):
    data = make_synth(n_samples=200, n_variants=300, seed=6)
    conv = [dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip"),
            dict(chr_prefix=True, fmt="GT:AD:DP:GQ:PL", phased=0.5, compress="none")]
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], seed=3, conventions=conv)
    run_plan(qc_plan(tmp_path / "one", list(nodes)), InProcessTransport(nodes))
    split = {}
    for k, (site, nc) in enumerate(nodes.items()):
        files = _split_by_chrom(Path(nc["vcf"]), tmp_path / f"split-{site}")
        assert len(files) >= 2
        spec = str(tmp_path / f"split-{site}" / "chr*.vcf") if k == 0 else "\n".join(str(f) for f in reversed(files))
        split[site] = {**nc, "vcf": spec, "state_dir": str(tmp_path / f"st-{site}")}
    run_plan(qc_plan(tmp_path / "split", list(split)), InProcessTransport(split))
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy"):
        a = sorted((tmp_path / "split" / name).read_text().splitlines())
        b = sorted((tmp_path / "one" / name).read_text().splitlines())
        assert a == b, name
    # files of one site must hold the same samples
    site = list(split)[1]
    files = split[site]["vcf"].splitlines()
    text = Path(files[0]).read_text().replace("\t" + load_cohort(nodes[site]).vcf_samples[0] + "\t", "\tSOMEONE_ELSE\t", 1)
    Path(files[0]).write_text(text)
    with pytest.raises(InputError, match="samples differ"):
        load_cohort({**split[site], "state_dir": str(tmp_path / "st-new")})
    with pytest.raises(InputError, match="no VCF/BCF file matches"):
        load_cohort({**split[site], "vcf": str(tmp_path / "nothing" / "chr*.vcf")})


def test_declared_genome_builds_are_recorded_and_must_agree(tmp_path):
    data = make_synth(n_samples=120, n_variants=80, seed=8)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5], seed=1)
    a, b = list(nodes)
    same = {a: {**nodes[a], "build": "GRCh38"}, b: {**nodes[b], "build": "GRCh38"}}
    m = run_plan(qc_plan(tmp_path / "same", [a, b]), InProcessTransport(same))
    assert m["genome_build"] == "GRCh38" and {s["genome_build"] for s in m["sites"].values()} == {"GRCh38"}
    mixed = {a: {**nodes[a], "build": "GRCh37"}, b: {**nodes[b], "build": "GRCh38"}}
    with pytest.raises(Exception, match=f"different genome builds: {a} GRCh37, {b} GRCh38"):
        run_plan(qc_plan(tmp_path / "mixed", [a, b]), InProcessTransport(mixed))
    assert not (tmp_path / "mixed" / "freq.afreq").exists()
    bad = {a: {**nodes[a], "build": "hg19"}, b: nodes[b]}
    with pytest.raises(Exception, match="build must be one of GRCh37, GRCh38"):
        run_plan(qc_plan(tmp_path / "bad", [a, b]), InProcessTransport(bad))
