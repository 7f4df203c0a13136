"""Tests of the cohort simulator (small sizes; the whole module runs in seconds)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pysam
import pytest

from fedgen.errors import ConfigError
from fedgen.simulate import simulate_cohorts

SITES = {"hk": 300, "sz": 300}
N_VARIANTS = 2000
SEED = 7


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sim") / "cohort"
    summary = simulate_cohorts(out, sites=SITES, n_variants=N_VARIANTS, seed=SEED, progress=False)
    return out, summary


def _read_vcf(path: Path) -> tuple[list[str], pd.DataFrame, np.ndarray]:
    """Samples, fixed columns and a (variants x samples) ALT-dosage matrix of biallelic
    sites (-1 = missing)."""
    rows, dos = [], []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.startswith("##"):
                continue
            if line.startswith("#"):
                samples = line.rstrip("\n").split("\t")[9:]
                continue
            f = line.rstrip("\n").split("\t")
            rows.append(f[:5])
            if "," in f[4]:
                dos.append(None)
                continue
            gt = np.array([g.replace(".", "9").split("|") for g in f[9:]], dtype=int)
            d = gt.sum(axis=1)
            dos.append(np.where(d >= 9, -1, d))
    fixed = pd.DataFrame(rows, columns=["CHROM", "POS", "ID", "REF", "ALT"])
    fixed["POS"] = fixed["POS"].astype(int)
    keep = [i for i, d in enumerate(dos) if d is not None]
    return samples, fixed.iloc[keep].reset_index(drop=True), np.array([dos[i] for i in keep])


@pytest.fixture(scope="module")
def genotypes(cohort):
    out, _ = cohort
    return {s: _read_vcf(out / s / "genotypes.vcf.gz") for s in SITES}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_summary_and_layout(cohort):
    out, summary = cohort
    assert summary["sites"] == SITES
    assert summary["n_common"] == N_VARIANTS
    assert N_VARIANTS < summary["n_variants"] <= 1.06 * N_VARIANTS
    assert summary["seconds"] > 0
    for s in SITES:
        for name in ("genotypes.vcf.gz", "genotypes.vcf.gz.tbi", "samples.tsv"):
            assert (out / s / name).is_file()
    for name in ("causal.tsv", "ancestry.tsv"):
        assert (out / "truth" / name).is_file()


def test_deterministic_byte_identical(cohort, tmp_path):
    out, _ = cohort
    again = simulate_cohorts(tmp_path / "again", sites=SITES, n_variants=N_VARIANTS, seed=SEED,
                             progress=False)
    assert again["n_variants"] == cohort[1]["n_variants"]
    first, second = _all_files(out), _all_files(tmp_path / "again")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_other_seed_and_site_names(tmp_path):
    sites = {"hk": 40, "sz": 40, "gz": 30}
    a = simulate_cohorts(tmp_path / "a", sites=sites, n_variants=300, seed=1, progress=True)
    b = simulate_cohorts(tmp_path / "b", sites=sites, n_variants=300, seed=2, progress=False)
    assert a["sites"] == b["sites"] == sites
    va = (tmp_path / "a" / "gz" / "genotypes.vcf.gz").read_bytes()
    assert va != (tmp_path / "b" / "gz" / "genotypes.vcf.gz").read_bytes()
    with pysam.VariantFile(str(tmp_path / "a" / "gz" / "genotypes.vcf.gz")) as vf:
        assert list(vf.header.samples)[:2] == ["GZ00001", "GZ00002"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        simulate_cohorts(tmp_path, sites={"../x": 100}, n_variants=100, progress=False)
    with pytest.raises(ConfigError):
        simulate_cohorts(tmp_path, sites={"truth": 100}, n_variants=100, progress=False)
    with pytest.raises(ConfigError):
        simulate_cohorts(tmp_path, sites={"hk": 5}, n_variants=100, progress=False)


def test_vcf_valid_and_indexed(cohort):
    out, summary = cohort
    path = out / "hk" / "genotypes.vcf.gz"
    with pysam.VariantFile(str(path)) as vf:
        hdr = str(vf.header)
        assert hdr.startswith("##fileformat=VCFv4.2")
        assert "##source=fedgen-simulate" in hdr
        assert list(vf.header.contigs) == ["chr1", "chr2", "chr3", "chr4"]
        assert all(vf.header.contigs[c].length > 0 for c in vf.header.contigs)
        assert "GT" in vf.header.formats
        assert list(vf.header.samples)[:3] == ["HK00001", "HK00002", "HK00003"]
        recs = list(vf.fetch("chr2"))  # needs the tabix index
        assert recs and all(r.chrom == "chr2" for r in recs)
        n = 0
        last: dict[str, int] = {}
        ids = set()
        n_multi = 0
        for rec in vf.fetch():
            n += 1
            assert rec.pos > last.get(rec.chrom, 0)  # sorted, no duplicate positions
            last[rec.chrom] = rec.pos
            assert rec.id.startswith("rs") and rec.id not in ids
            ids.add(rec.id)
            assert rec.ref in "ACGT" and all(a in "ACGT" for a in rec.alts)
            n_multi += len(rec.alts) > 1
        assert n == summary["n_variants"]
        assert n_multi == summary["n_multiallelic"]
        assert rec.samples[0].phased
    raw = gzip.open(path, "rt").read()
    assert "0|1\t" in raw and "1|0\t" in raw and ".|." in raw
    if shutil.which("bcftools"):
        res = subprocess.run(["bcftools", "view", "-h", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "#CHROM\tPOS" in res.stdout


def test_missingness(genotypes):
    for site, (samples, _, dos) in genotypes.items():
        per_sample = (dos < 0).mean(axis=0)
        poor = per_sample > 0.05
        assert 3 <= poor.sum() <= 5, site
        assert np.all((per_sample[poor] > 0.07) & (per_sample[poor] < 0.25))
        assert 0.001 < np.median(per_sample) < 0.01


def test_samples_table_contract(cohort):
    out, _ = cohort
    for site in SITES:
        tab = pd.read_csv(out / site / "samples.tsv", sep="\t", dtype={"IID": str})
        assert list(tab.columns)[0] == "IID"
        assert {"sex", "age", "smoking", "T2D", "LDL"} <= set(tab.columns)
        assert "ancestry" not in " ".join(tab.columns).lower()
        assert tab["IID"].is_unique
        assert set(tab["sex"]) == {1, 2}
        assert set(tab["smoking"]) == {"never", "former", "current"}
        assert tab["age"].between(18, 95).all()
        assert set(tab["T2D"].dropna()) == {0, 1}
        assert tab["T2D"].isna().any() and tab["LDL"].isna().any()
        assert tab["T2D"].isna().mean() < 0.06 and tab["LDL"].isna().mean() < 0.06
        text = (out / site / "samples.tsv").read_text()
        assert "\tNA\t" in text or "\tNA\n" in text
        with pysam.VariantFile(str(out / site / "genotypes.vcf.gz")) as vf:
            vcf_ids = list(vf.header.samples)
        only_table = set(tab["IID"]) - set(vcf_ids)
        only_vcf = set(vcf_ids) - set(tab["IID"])
        assert 2 <= len(only_table) <= 3 and 2 <= len(only_vcf) <= 3
        shared_table_order = [i for i in tab["IID"] if i in set(vcf_ids)]
        shared_vcf_order = [i for i in vcf_ids if i in set(tab["IID"])]
        assert shared_table_order != shared_vcf_order  # shuffled
        assert sorted(shared_table_order) == sorted(shared_vcf_order)


def test_truth_files(cohort):
    out, _ = cohort
    causal = pd.read_csv(out / "truth" / "causal.tsv", sep="\t")
    assert list(causal.columns) == ["trait", "CHROM", "POS", "ID", "REF", "ALT", "effect"]
    assert set(causal["trait"]) == {"T2D", "LDL"}
    assert causal.groupby("trait").size().between(3, 5).all()
    assert causal["ID"].is_unique
    for site in SITES:
        with pysam.VariantFile(str(out / site / "genotypes.vcf.gz")) as vf:
            for row in causal.itertuples():
                recs = [r for r in vf.fetch(row.CHROM, row.POS - 1, row.POS) if r.pos == row.POS]
                assert len(recs) == 1, row
                assert (recs[0].id, recs[0].ref, recs[0].alts) == (row.ID, row.REF, (row.ALT,))
    anc = pd.read_csv(out / "truth" / "ancestry.tsv", sep="\t")
    assert list(anc.columns) == ["IID", "site", "north_fraction"]
    assert anc["north_fraction"].between(0, 1).all()
    means = anc.groupby("site")["north_fraction"].mean()
    assert means["hk"] < 0.35 < 0.4 < means["sz"]
    # admixed people have intermediate ancestry
    assert ((anc["north_fraction"] > 0.02) & (anc["north_fraction"] < 0.98)).mean() > 0.15


def test_plink2_reads_vcf(cohort, tmp_path):
    plink2 = shutil.which("plink2")
    if plink2 is None:
        pytest.skip("plink2 not installed")
    out, summary = cohort
    res = subprocess.run([plink2, "--vcf", str(out / "sz" / "genotypes.vcf.gz"), "--freq",
                          "--out", str(tmp_path / "sz")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    freq = pd.read_csv(tmp_path / "sz.afreq", sep="\t")
    assert len(freq) == summary["n_variants"]


def test_site_frequencies_follow_ancestry(cohort, genotypes):
    """sz (55 % north) minus hk (20 % north) allele frequencies must line up with the
    north-minus-south difference, estimated on *other* people (independent halves);
    without any ancestry effect the two differences would be uncorrelated."""
    out, _ = cohort
    anc = pd.read_csv(out / "truth" / "ancestry.tsv", sep="\t").set_index("IID")["north_fraction"]
    rng = np.random.default_rng(0)
    fixed = genotypes["hk"][1]
    assert fixed["ID"].equals(genotypes["sz"][1]["ID"])  # same variants at every site

    def freq(dos):
        d = np.where(dos < 0, np.nan, dos)
        return np.nanmean(d, axis=1) / 2

    site_half, pop_half = {}, []
    for site, (samples, _, dos) in genotypes.items():
        half = rng.permutation(len(samples)) < len(samples) // 2
        site_half[site] = freq(dos[:, half])
        pop_half.append((dos[:, ~half], anc.loc[np.asarray(samples)[~half]].to_numpy()))
    dos_b = np.concatenate([d for d, _ in pop_half], axis=1)
    nf_b = np.concatenate([a for _, a in pop_half])
    d_pop = freq(dos_b[:, nf_b > 0.99]) - freq(dos_b[:, nf_b < 0.01])
    d_site = site_half["sz"] - site_half["hk"]
    ok = ~np.isnan(d_pop) & ~np.isnan(d_site)
    r = np.corrcoef(d_pop[ok], d_site[ok])[0, 1]
    assert r > 0.1, r
    slope = np.polyfit(d_pop[ok], d_site[ok], 1)[0]
    assert slope > 0.05, slope


def test_phenotypes_confounded_by_ancestry(cohort):
    out, _ = cohort
    anc = pd.read_csv(out / "truth" / "ancestry.tsv", sep="\t").set_index("IID")
    tab = pd.concat([pd.read_csv(out / s / "samples.tsv", sep="\t") for s in SITES])
    tab = tab.join(anc, on="IID")
    assert 0.2 < tab["T2D"].mean() < 0.4
    south, north = tab[tab.north_fraction < 0.01], tab[tab.north_fraction > 0.99]
    assert south["T2D"].mean() > north["T2D"].mean() + 0.03
    assert north["LDL"].mean() > south["LDL"].mean() + 0.05


def test_chrx_men_haploid_and_qc_equals_pooled_plink2(tmp_path):
    """``--chrx``: men's chrX calls are haploid (by the samples table's sex), the autosomes are
    those of the same run without chrX, and federated chrX QC equals pooled PLINK 2 with the sexes set."""
    plink2 = shutil.which("plink2")
    out = tmp_path / "x"
    summary = simulate_cohorts(out, sites={"a": 140, "b": 110}, n_variants=400, seed=5, progress=False, n_chrx=80)
    assert summary["n_chrx"] >= 80 and "chrX" in summary["chromosomes"]
    simulate_cohorts(tmp_path / "plain", sites={"a": 140, "b": 110}, n_variants=400, seed=5, progress=False)
    assert (out / "a" / "samples.tsv").read_bytes() == (tmp_path / "plain" / "a" / "samples.tsv").read_bytes()
    for site in ("a", "b"):
        sex = pd.read_csv(out / site / "samples.tsv", sep="\t").set_index("IID")["sex"]
        with pysam.VariantFile(str(out / site / "genotypes.vcf.gz")) as vf:
            recs = list(vf)
        auto = [(r.chrom, r.pos, r.alleles) for r in recs if r.chrom != "chrX"]
        with pysam.VariantFile(str(tmp_path / "plain" / site / "genotypes.vcf.gz")) as vf:
            assert auto == [(r.chrom, r.pos, r.alleles) for r in vf]
        x = [r for r in recs if r.chrom == "chrX"]
        assert len(x) == summary["n_chrx"] and min(r.pos for r in x) > 2_781_479  # past PAR1
        for name, call in x[0].samples.items():
            if name in sex.index:
                assert (len(call["GT"]) == 1) == (sex[name] == 1), name
    if plink2 is None:
        pytest.skip("plink2 not installed")
    from conftest import qc_plan

    from fedgen.federation.transport import InProcessTransport
    from fedgen.study.runner import run_plan

    nodes = {s: {"site": s, "vcf": str(out / s / "genotypes.vcf.gz"), "samples": str(out / s / "samples.tsv"),
                 "state_dir": str(tmp_path / f"state-{s}")} for s in ("a", "b")}
    run_plan(qc_plan(tmp_path / "res", ["a", "b"], qc={}), InProcessTransport(nodes))
    subprocess.run(["bcftools", "merge", "-Oz", "-o", str(tmp_path / "pooled.vcf.gz"),
                    *(str(out / s / "genotypes.vcf.gz") for s in ("a", "b"))], check=True)
    tables = pd.concat([pd.read_csv(out / s / "samples.tsv", sep="\t") for s in ("a", "b")])
    tables[["IID", "sex"]].rename(columns={"IID": "#IID", "sex": "SEX"}).to_csv(tmp_path / "sex.txt", sep="\t", index=False)
    (tmp_path / "keep.txt").write_text("\n".join(tables["IID"]) + "\n")  # fedgen analyses the table's people
    subprocess.run([plink2, "--vcf", str(tmp_path / "pooled.vcf.gz"), "--update-sex", str(tmp_path / "sex.txt"),
                    "--keep", str(tmp_path / "keep.txt"), "--freq", "cols=+pos", "--out", str(tmp_path / "ref")],
                   check=True, capture_output=True)
    ours = pd.read_csv(tmp_path / "res" / "freq.afreq", sep="\t", dtype=str)
    ref = pd.read_csv(tmp_path / "ref.afreq", sep="\t", dtype=str)
    ours_x = ours[ours["#CHROM"].isin(["X", "chrX"])].reset_index(drop=True)
    ref_x = ref[ref["#CHROM"].isin(["X", "chrX"])].reset_index(drop=True)
    assert len(ours_x) == summary["n_chrx"]
    assert ours_x[["POS", "ALT_FREQS", "OBS_CT"]].equals(ref_x[["POS", "ALT_FREQS", "OBS_CT"]])
