"""Multi-allelic records are split as ``bcftools norm -m-any`` does: a federated study of sites
holding multi-allelic VCF/BCF/pgen records equals ``bcftools norm -m-any`` + PLINK 2 on the pooled
data, and split records line up across sites that hold only some of the ALT alleles."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PLINK_EXACT_POLICY, qc_plan
from fedgen.cohort.cohort import load_cohort
from fedgen.federation.transport import InProcessTransport
from fedgen.study.runner import run_plan
from test_gwas import compare_logistic
from test_qc_exact import assert_same_table

HAVE_TOOLS = shutil.which("bcftools") is not None and shutil.which("plink2") is not None
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="bcftools and plink2 are needed for the reference")
NO_QC = {"maf": None, "geno": None, "hwe": None}
HEADER = ("##fileformat=VCFv4.2\n" + "".join(f"##contig=<ID={c},length={250_000_000 - int(c)}>\n" for c in ("1", "2"))
          + '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
          + '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Read depth">\n')
BASES = ["C", "G", "T", "CA", "GT", "TTA", "CAG", "GA", "TC", "AAC", "GGT", "CT"]


def _calls(rng: np.random.Generator, k: int, n: int, kind: str) -> list[str]:
    """n genotype strings of a record with k ALT alleles: diploid (unphased, phased or mixed) with
    missing and half-missing calls, plus a few haploid calls."""
    p = rng.dirichlet(np.ones(k + 1) * 0.7)
    a = rng.choice(k + 1, size=(n, 2), p=p).astype(object)
    u = rng.random((n, 2))
    a[u < 0.04] = "."  # half-missing calls (both missing now and then)
    sep = {"unphased": np.full(n, "/"), "phased": np.full(n, "|")}.get(kind, rng.choice(["/", "|"], n))
    out = [f"{x}{s}{y}" for (x, y), s in zip(a.tolist(), sep.tolist())]
    hap = rng.random(n) < 0.02
    return [str(rng.integers(0, k + 1)) if h else c for c, h in zip(out, hap.tolist())]


def pooled_records(n: int, seed: int) -> list[list[str]]:
    """VCF data lines (without sample columns split yet): biallelic and 2-, 3- and 11-ALT records,
    unphased, phased and mixed; some with GT:DP calls of varying width (the numpy split path); the
    11-ALT record's two-digit allele indices take the per-record general path. (Not GT second in
    FORMAT: PLINK 2 reads no calls there, fedgen does.)"""
    rng = np.random.default_rng(seed)
    rows = []
    pos = {"1": 1000, "2": 5000}
    for i in range(60):
        c = "1" if i < 35 else "2"
        pos[c] += int(rng.integers(10, 500))
        k = [1, 1, 2, 2, 3][i % 5] if i != 17 else 11
        ref = rng.choice(["A", "AT"])
        alts = [b for b in BASES if b != ref][:12]
        alts = list(rng.permutation(alts)[:k])
        kind = ["unphased", "phased", "mixed"][i % 3]
        calls = _calls(rng, k, n, kind)
        fmt = "GT"
        if i % 7 == 3:  # calls of varying width
            fmt = "GT:DP"
            calls = [f"{g}:{rng.integers(1, 40)}" for g in calls]
        rid = f"rs{100 + i}" if i % 4 else "."
        rows.append([c, str(pos[c]), rid, ref, ",".join(alts), ".", "PASS", ".", fmt, *calls])
    return rows


def write_vcf_cols(rows: list[list[str]], samples: list[str], cols: np.ndarray, path: Path) -> None:
    lines = ["\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                        *[samples[j] for j in cols]])]
    lines += ["\t".join(r[:9] + [r[9 + j] for j in cols]) for r in rows]
    path.write_text(HEADER + "\n".join(lines) + "\n")


def _pheno(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    cc = (rng.random(n) < 0.45).astype(float)
    cc[rng.random(n) < 0.03] = np.nan
    return {"CC": cc, "age": np.round(rng.uniform(20, 80, n), 1), "sex": rng.integers(1, 3, n).astype(float)}


def _fmt(v: float, plus: int = 0) -> str:
    return "NA" if np.isnan(v) else str(int(v) + plus)


def make_sites(tmp: Path, rows, samples, pheno, fractions, fmt: str, seed: int = 0) -> dict[str, dict[str, str]]:
    """Sites holding a random split of the pooled samples, each in format ``fmt`` (vcf, bcf, vcf.gz or pgen)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(samples))
    cuts = np.cumsum(np.round(np.asarray(fractions) / sum(fractions) * len(samples)).astype(int))[:-1]
    nodes = {}
    for k, cols in enumerate(np.split(perm, cuts)):
        site = f"site{k + 1}"
        d = tmp / site
        d.mkdir(parents=True, exist_ok=True)
        cols = np.sort(cols)
        plain = d / "genotypes.vcf"
        write_vcf_cols(rows, samples, cols, plain)
        f = fmt[k % len(fmt)] if isinstance(fmt, list) else fmt
        nc = {"site": site, "samples": str(d / "samples.tsv"), "state_dir": str(d / "state"),
              "policy": json.dumps(PLINK_EXACT_POLICY)}
        if f == "vcf":
            nc["vcf"] = str(plain)
        elif f in ("bcf", "vcf.gz"):
            out = d / f"genotypes.{f}"
            subprocess.run(["bcftools", "view", "-O", "b" if f == "bcf" else "z", "-o", str(out), str(plain)], check=True)
            nc["vcf"] = str(out)
        elif f == "pgen":
            subprocess.run(["plink2", "--vcf", str(plain), "--vcf-half-call", "missing", "--make-pgen",
                            "--out", str(d / "set")], check=True, capture_output=True)
            nc["pgen"] = str(d / "set")
        (d / "samples.tsv").write_text("IID\tCC\tage\tsex\n" + "".join(
            f"{samples[j]}\t{_fmt(pheno['CC'][j])}\t{pheno['age'][j]}\t{int(pheno['sex'][j])}\n" for j in cols))
        nodes[site] = nc
    return nodes


def reference(tmp: Path, rows, samples, pheno, flags: list[str]) -> None:
    """``bcftools norm -m-any`` on the pooled VCF, then PLINK 2 with ``flags``."""
    write_vcf_cols(rows, samples, np.arange(len(samples)), tmp / "pooled.vcf")
    subprocess.run(["bcftools", "norm", "-m-any", "-o", str(tmp / "norm.vcf"), str(tmp / "pooled.vcf")],
                   check=True, capture_output=True)
    (tmp / "p.pheno").write_text("#IID\tCC\n" + "".join(
        f"{s}\t{_fmt(pheno['CC'][j], 1)}\n" for j, s in enumerate(samples)))
    (tmp / "p.covar").write_text("#IID\tage\tsex\n" + "".join(
        f"{s}\t{pheno['age'][j]}\t{int(pheno['sex'][j])}\n" for j, s in enumerate(samples)))
    subprocess.run(["plink2", "--vcf", "norm.vcf", "--vcf-half-call", "missing", *flags, "--out", "ref"],
                   cwd=tmp, check=True, capture_output=True)


N = 180
SAMPLES = [f"P{i:04d}" for i in range(N)]


@needs_tools
@pytest.mark.plink
@pytest.mark.parametrize("fmt", ["vcf", "bcf", "vcf.gz", "pgen", ["bcf", "vcf", "pgen"]])
def test_split_qc_equals_bcftools_norm_and_plink2(tmp_path, fmt):
    rows = pooled_records(N, seed=3)
    pheno = _pheno(N, 3)
    reference(tmp_path, rows, SAMPLES, pheno,
              ["--freq", "cols=+pos", "--missing", "variant-only", "vcols=+pos", "--hardy", "cols=+pos"])
    nodes = make_sites(tmp_path / "sites", rows, SAMPLES, pheno, [0.5, 0.3, 0.2], fmt)
    m = run_plan(qc_plan(tmp_path / "out", list(nodes), qc=NO_QC), InProcessTransport(nodes))
    for ext, name in (("afreq", "freq.afreq"), ("vmiss", "missing.vmiss"), ("hardy", "hardy.hardy")):
        assert_same_table(tmp_path / "out" / name, tmp_path / f"ref.{ext}")
    n_multi = sum("," in r[4] for r in rows)
    n_split = sum(r[4].count(",") + 1 for r in rows if "," in r[4])
    for s in nodes:
        assert m["sites"][s]["multiallelic_split"] == n_multi
        assert m["sites"][s]["split_variants"] == n_split
    assert m["variants"]["study"] == sum(r[4].count(",") + 1 for r in rows)


@needs_tools
@pytest.mark.plink
def test_split_glm_equals_bcftools_norm_and_plink2(tmp_path):
    n = 400
    samples = [f"P{i:04d}" for i in range(n)]
    rows = pooled_records(n, seed=8)
    pheno = _pheno(n, 8)
    reference(tmp_path, rows, samples, pheno,
              ["--pheno", "p.pheno", "--covar", "p.covar", "--covar-variance-standardize", "--glm", "hide-covar"])
    nodes = make_sites(tmp_path / "sites", rows, samples, pheno, [0.6, 0.4], ["vcf.gz", "bcf"], seed=1)
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "glm"], phenotypes=["CC"],
                   covariates=["age", "sex"], qc=NO_QC)
    run_plan(plan, InProcessTransport(nodes))
    compare_logistic(tmp_path / "out" / "CC.glm.logistic.hybrid", tmp_path / "ref.CC.glm.logistic.hybrid")


def test_split_records_line_up_across_sites(tmp_path):
    """Site 1 holds A>C,G at a position where site 2 holds only A>C (and site 2 holds T>G,A where
    site 1 holds T>A): the shared split variants are analysed, the rest are not shared."""
    h = HEADER + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t{}\n"
    s1 = ["a1", "a2", "a3", "a4"]
    s2 = ["b1", "b2", "b3"]
    (tmp_path / "s1.vcf").write_text(h.format("\t".join(s1))
                                     + "1\t100\trs1\tA\tC,G\t.\t.\t.\tGT\t0/1\t1/2\t2/2\t./1\n"
                                     + "1\t200\t.\tT\tA\t.\t.\t.\tGT\t0/1\t1|1\t0/0\t0/0\n"
                                     + "1\t300\trs3\tG\tC\t.\t.\t.\tGT\t0/1\t0/0\t0/0\t1/1\n")
    (tmp_path / "s2.vcf").write_text(h.format("\t".join(s2))
                                     + "1\t100\trs1\tA\tC\t.\t.\t.\tGT\t1/1\t0/1\t0/0\n"
                                     + "1\t200\trs2\tT\tG,A\t.\t.\t.\tGT\t2|1\t1/1\t0/2\n"
                                     + "1\t300\trs3\tG\tC\t.\t.\t.\tGT\t0/0\t0/1\t./.\n")
    nodes = {}
    for site, ids in (("s1", s1), ("s2", s2)):
        (tmp_path / f"{site}.tsv").write_text("IID\n" + "".join(f"{i}\n" for i in ids))
        nodes[site] = {"site": site, "vcf": str(tmp_path / f"{site}.vcf"), "samples": str(tmp_path / f"{site}.tsv"),
                       "state_dir": str(tmp_path / f"state-{site}"), "policy": json.dumps(PLINK_EXACT_POLICY)}
    c1 = load_cohort(nodes["s1"])
    assert c1.alt.tolist() == ["C", "G", "A", "C"] and c1.ids.tolist() == ["rs1", "rs1", ".", "rs3"]
    np.testing.assert_array_equal(np.asarray(c1.dosage[:2]), [[1, 1, 0, -1], [0, 1, 2, -1]])
    m = run_plan(qc_plan(tmp_path / "out", ["s1", "s2"], qc=NO_QC), InProcessTransport(nodes))
    rows = [line.split("\t") for line in (tmp_path / "out" / "freq.afreq").read_text().splitlines()]
    assert rows[0] == ["#CHROM", "POS", "ID", "REF", "ALT", "ALT_FREQS", "OBS_CT"]
    got = {(r[1], r[3], r[4]): (r[2], r[5], r[6]) for r in rows[1:]}
    # 1:100 A>C: site 1 calls 0/1 1/2 2/2 ./1 -> 1, 1, 0, missing; site 2 1/1 0/1 0/0 -> 2, 1, 0: 5 of 12
    # 1:200 T>A: site 1 0/1 1|1 0/0 0/0 -> 3; site 2 (ALT 2 of G,A) 2|1 1/1 0/2 -> 1, 0, 1: 5 of 14
    assert got == {("100", "A", "C"): ("rs1", "0.416667", "12"), ("200", "T", "A"): ("rs2", "0.357143", "14"),
                   ("300", "G", "C"): ("rs3", "0.333333", "12")}  # 3 of 8 and 1 of 4
    assert m["sites"]["s1"]["multiallelic_split"] == 1 and m["sites"]["s1"]["split_variants"] == 2
    assert m["sites"]["s2"]["multiallelic_split"] == 1 and m["sites"]["s2"]["split_variants"] == 2
    assert m["variants"]["study"] == 3
    assert m["sites"]["s1"]["harmonisation"]["not_shared"] == 1  # 1:100 A>G
    assert m["sites"]["s2"]["harmonisation"]["not_shared"] == 1  # 1:200 T>G
