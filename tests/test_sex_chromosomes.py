"""chrX / chrY / MT counted by the samples' sex exactly as pooled PLINK 2 (2 sites, males and
females at both, male het calls, samples of unknown sex): --freq, --missing, --hardy (.hardy.x),
--glm linear and logistic; the sex-split counts' disclosure rules (differencing)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PLINK_EXACT_POLICY, qc_plan
from fedgen.federation.transport import InProcessTransport
from fedgen.study.runner import run_plan

HAVE_PLINK2 = shutil.which("plink2") is not None
needs_plink2 = pytest.mark.skipif(not HAVE_PLINK2, reason="plink2 is the reference")
NO_QC = {"maf": None, "geno": None, "hwe": None}
CONTIGS = ("1", "X", "Y", "MT")


def make_data(n: int = 200, seed: int = 3, n_unknown: int = 8):
    """Samples with sex (1/2, some unknown), a QT and a binary trait, age, and calls on 1, X, Y, MT:
    males haploid on X/Y (a few diploid het calls), females diploid on X (and stray calls on Y),
    everyone haploid on MT (a few hets), missing calls everywhere."""
    r = np.random.default_rng(seed)
    sex = r.choice([1, 2], n)
    sex[r.choice(n, n_unknown, replace=False)] = 0
    age = np.round(r.normal(50, 10, n), 1)
    rows = []  # (chrom, pos, calls)
    dos = {}
    for chrom, k in (("1", 4), ("X", 16), ("Y", 4), ("MT", 4)):
        for v in range(k):
            p = r.uniform(0.05, 0.6)
            a = (r.random((n, 2)) < p).astype(int)
            hap = np.isin(sex, [1]) if chrom in ("X", "Y") else np.ones(n, bool) if chrom == "MT" else np.zeros(n, bool)
            calls = np.where(hap, np.where(a[:, 0] == 1, "1", "0"),
                             np.array(["0/0", "0/1", "1/1"])[a.sum(1)]).astype(object)
            het = hap & (r.random(n) < 0.04)  # a diploid het call where the sample is haploid
            calls[het] = "0/1"
            if chrom == "X":  # a few females with a haploid call: PLINK counts them as homozygous
                calls[(sex == 2) & (r.random(n) < 0.02)] = "1"
            miss = r.random(n) < 0.05
            calls[miss & hap] = "."
            calls[miss & ~hap] = "./."
            g = np.where(np.isin(calls, [".", "./."]), -1, np.where(hap & ~het, 2 * a[:, 0], 0))
            rows.append((chrom, (3_000_000 if chrom == "X" else 1000) + 17 * v, calls))
            if chrom == "X" and v == 0:
                dos["x0"] = g
    ymale = np.nan_to_num(np.where(sex == 1, 0.4, 0.0)) + 0.03 * (age - 50)
    qt = np.round(ymale + r.normal(0, 1, n), 4)
    bin_ = (r.random(n) < 1 / (1 + np.exp(-(qt - qt.mean())))).astype(int)
    ids = [f"S{i:04d}" for i in range(n)]
    return ids, sex, age, qt, bin_, rows


HEADER = ("##fileformat=VCFv4.2\n##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n"
          + "".join(f"##contig=<ID={c}>\n" for c in CONTIGS))


def write_vcf(path: Path, ids, rows, cols) -> None:
    lines = [HEADER + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(ids[i] for i in cols)]
    for chrom, pos, calls in rows:
        lines.append(f"{chrom}\t{pos}\t{chrom}_{pos}\tA\tG\t.\t.\t.\tGT\t" + "\t".join(calls[cols].tolist()))
    path.write_text("\n".join(lines) + "\n")


SEX_TEXT = {0: ["NA", "0", "", "-9"], 1: ["1", "M", "male"], 2: ["2", "F", "female"]}


def write_samples(path: Path, ids, sex, age, qt, bin_, cols, *, spellings: bool = True) -> None:
    out = ["IID\tsex\tage\tQT\tBIN"]
    for k, i in enumerate(cols):
        texts = SEX_TEXT[int(sex[i])] if spellings else ["NA", "1", "2"][int(sex[i]):][:1]
        s = texts[k % len(texts)]  # every PLINK spelling of a sex code
        out.append(f"{ids[i]}\t{s}\t{age[i]}\t{qt[i]}\t{bin_[i] + 1}")
    path.write_text("\n".join(out) + "\n")


def make_sites(tmp: Path, data, fractions=(0.6, 0.4), policy=PLINK_EXACT_POLICY, seed=1, spellings=True):
    ids, sex, age, qt, bin_, rows = data
    n = len(ids)
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.split(perm, np.cumsum(np.round(np.asarray(fractions)[:-1] * n).astype(int)))
    nodes = {}
    for k, cols in enumerate(parts):
        d = tmp / f"site{k + 1}"
        d.mkdir(parents=True)
        write_vcf(d / "g.vcf", ids, rows, np.sort(cols))
        write_samples(d / "samples.tsv", ids, sex, age, qt, bin_, cols, spellings=spellings)
        nodes[f"site{k + 1}"] = {"site": f"site{k + 1}", "vcf": str(d / "g.vcf"), "samples": str(d / "samples.tsv"),
                                 "state_dir": str(d / "state"), "policy": json.dumps(policy)}
    return nodes


def pooled_reference(tmp: Path, data, args: list[str], *, sex_covariate: bool = False) -> None:
    ids, sex, age, qt, bin_, rows = data
    write_vcf(tmp / "pooled.vcf", ids, rows, np.arange(len(ids)))
    (tmp / "sex.txt").write_text("#IID\tSEX\n" + "".join(f"{i}\t{s}\n" for i, s in zip(ids, sex)))
    (tmp / "p.pheno").write_text("#IID\tQT\tBIN\n" + "".join(f"{i}\t{q}\t{b + 1}\n" for i, q, b in zip(ids, qt, bin_)))
    if sex_covariate:  # the samples table's sex column as a covariate: unknown sex is a missing covariate
        (tmp / "p.covar").write_text("#IID\tage\tsex\n" + "".join(
            f"{i}\t{a}\t{s if s else 'NA'}\n" for i, a, s in zip(ids, age, sex)))
    else:
        (tmp / "p.covar").write_text("#IID\tage\n" + "".join(f"{i}\t{a}\n" for i, a in zip(ids, age)))
    subprocess.run(["plink2", "--vcf", "pooled.vcf", "--update-sex", "sex.txt", *args, "--out", "ref"], cwd=tmp,
                   check=True, capture_output=True)


def _read(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def assert_same(ours: Path, ref: Path) -> None:
    a, b = _read(ours), _read(ref)
    assert a[0] == b[0], f"header differs: {a[0]} vs {b[0]}"
    assert len(a) == len(b), f"{ours.name}: {len(a) - 1} rows, PLINK has {len(b) - 1}"
    bad = [(x, y) for x, y in zip(a, b) if x != y]
    assert not bad, f"{ours.name}: {len(bad)} rows differ from PLINK, e.g. {bad[:3]}"


@needs_plink2
def test_sex_chromosome_qc_equals_pooled_plink2(tmp_path):
    data = make_data()
    pooled_reference(tmp_path, data, ["--freq", "cols=+pos", "--missing", "variant-only", "vcols=+pos",
                                      "--hardy", "cols=+pos"])
    qc = {"maf": 0.15, "geno": 0.05, "hwe": 0.2}
    subprocess.run(["plink2", "--vcf", "pooled.vcf", "--update-sex", "sex.txt", "--maf", "0.15", "--geno", "0.05",
                    "--hwe", "0.2", "--write-snplist", "--out", "filt"], cwd=tmp_path, check=True, capture_output=True)
    nodes = make_sites(tmp_path / "sites", data)
    run_plan(qc_plan(tmp_path / "out", list(nodes), qc=qc), InProcessTransport(nodes))
    for ours, ref in (("freq.afreq", "ref.afreq"), ("missing.vmiss", "ref.vmiss"), ("hardy.hardy", "ref.hardy"),
                      ("hardy.x", "ref.hardy.x")):
        assert_same(tmp_path / "out" / ours, tmp_path / ref)
    from fedgen.results import load_results

    hx = load_results(tmp_path / "out").hardy_x  # the analyst's API reads .hardy.x too
    assert hx is not None and len(hx) == len(_read(tmp_path / "ref.hardy.x")) - 1
    # --maf/--geno/--hwe: chrX/chrY/MT filtered on the sex-aware statistics (chrY/MT: no HWE filter)
    rows = _read(tmp_path / "out" / "variants.tsv")[1:]
    kept = set((tmp_path / "filt.snplist").read_text().split())
    assert {r[2] for r in rows if r[5] == "1"} == kept
    assert 0 < len(kept) < len(rows) and any(k.startswith("X_") for k in kept) and any(k.startswith(("Y_", "MT_")) for k in kept)


def glm_plan(out: Path, sites, covariates=("age",)):
    return qc_plan(out, list(sites), analyses=["freq", "glm"], phenotypes=["QT", "BIN"], covariates=list(covariates),
                   qc=NO_QC)


@needs_plink2
@pytest.mark.parametrize("with_sex_covariate", [False, True])
def test_sex_chromosome_glm_equals_pooled_plink2(tmp_path, with_sex_covariate):
    """chrX: PLINK 2's default model (males 0/2, unknown sex left out, sex added as a covariate);
    with sex already a covariate PLINK stops (VIF), fedgen adds nothing, as ``--glm no-x-sex``.
    chrY: males only, haploid 0/1; MT: everyone haploid."""
    from test_gwas import compare_linear, compare_logistic

    data = make_data()
    covs = ["age", "sex"] if with_sex_covariate else ["age"]
    glm = ["--glm", "hide-covar", *(["no-x-sex"] if with_sex_covariate else [])]
    pooled_reference(tmp_path, data, ["--pheno", "p.pheno", "--covar", "p.covar", "--covar-variance-standardize", *glm],
                     sex_covariate=with_sex_covariate)
    # as a covariate the column must be numeric (M/F text would make it a categorical covariate)
    nodes = make_sites(tmp_path / "sites", data, spellings=not with_sex_covariate)
    run_plan({**glm_plan(tmp_path / "out", nodes, covs), "missing": "drop"}, InProcessTransport(nodes))
    compare_linear(tmp_path / "out" / "QT.glm.linear", tmp_path / "ref.QT.glm.linear")
    compare_logistic(tmp_path / "out" / "BIN.glm.logistic.hybrid", tmp_path / "ref.BIN.glm.logistic.hybrid")
    chroms = {r.split("\t")[0] for r in (tmp_path / "out" / "QT.glm.linear").read_text().splitlines()[1:]}
    assert chroms == set(CONTIGS)
    # GWAS-SSF: the effect allele frequency of chrX/chrY/MT rows is the sex-aware one of freq.afreq
    import gzip

    from fedgen.results.sumstats import CHROM_CODE

    afreq = {(CHROM_CODE[r[0].upper()], int(r[1]), r[3], r[4]): float(r[5])
             for r in _read(tmp_path / "out" / "freq.afreq")[1:] if r[5] != "NA"}
    with gzip.open(tmp_path / "out" / "sumstats" / "QT.tsv.gz", "rt") as fh:
        ss = [line.rstrip("\n").split("\t") for line in fh]
    col = {c: i for i, c in enumerate(ss[0])}
    checked = 0
    for r in ss[1:]:
        key = int(r[col["chromosome"]]), int(r[col["base_pair_location"]])
        ea, oa = r[col["effect_allele"]], r[col["other_allele"]]
        alt = afreq.get((*key, oa, ea)) or afreq.get((*key, ea, oa))
        if alt is None or key[0] < 23:
            continue
        expect = alt if (*key, oa, ea) in afreq else 1.0 - alt
        assert float(r[col["effect_allele_frequency"]]) == pytest.approx(expect, abs=1e-5), r
        checked += 1
    assert checked > 0


def test_allelic_test_only_study_with_sex_chromosome_rows(tmp_path):
    """A study whose only association test is the allelic one (autosomes only) still plots and
    ranks its rows when chrX/chrY/MT variants are among them."""
    data = make_data()
    nodes = make_sites(tmp_path / "sites", data)
    manifest = run_plan(qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "assoc"], phenotypes=["BIN"],
                                covariates=[], qc=NO_QC), InProcessTransport(nodes))
    rows = _read(tmp_path / "out" / "BIN.assoc")[1:]
    assert rows and all(r[0].strip() not in ("X", "Y", "MT", "23", "24", "26") for r in rows)
    hits = manifest["association"]["BIN"]["top_hits"]
    assert hits and all(h["chrom"] not in ("X", "Y", "MT") for h in hits)
    assert (tmp_path / "out" / "plots" / "BIN_manhattan.png").exists()
