"""Imputed dosages (``study.dosage``): federated --freq and --glm equal pooled ``plink2 --vcf
FILE dosage=DS`` (or ``dosage=GP``) at print precision; a .pgen with dosages gives the same; an
input without dosages is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import needs_plink2, qc_plan
from fedgen.cohort.dosage import MISSING, quantise, to_hardcalls
from fedgen.errors import FedgenError
from fedgen.federation.transport import InProcessTransport
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth, run_plink2, synth_dosages, write_dosage_vcf, write_pooled_pheno, write_samples
from fedgen.testing import write_vcf

NO_QC = {"maf": None, "geno": None, "hwe": None}
POLICY = '{"min_count": 1, "min_cell": 1, "allow_per_variant_sample_sets": true, "extra_analyses": ["glm_logistic", "glm_firth"]}'


def _sites(tmp: Path, field: str = "DS", *, seed: int = 4, bcf: bool = False) -> tuple[dict[str, dict[str, str]], object, np.ndarray]:
    """Two sites (a plain VCF, and a bgzipped VCF or a BCF) split from one pooled dosage data set,
    and the pooled VCF. (PLINK reads a BCF's float32 values, which can differ from the decimal text
    by a 1/16384 unit: a BCF site is compared with PLINK reading that BCF.)"""
    import pysam

    data = make_synth(n_samples=260, n_variants=45, seed=seed, missing_rate=0.04)
    ds = synth_dosages(data, seed=seed)
    rng = np.random.default_rng(seed)
    cases = np.flatnonzero(data.pheno["CC"] == 1)
    for v in (2, 3):  # dosages only in a few cases: separation, so logistic regression falls back to Firth
        ds[v] = 0.0
        ds[v, rng.choice(cases, 6, replace=False)] = np.round(rng.uniform(0.6, 1.4, 6), 3)
    with_gt = rng.random(len(data.pos)) < 0.5
    write_dosage_vcf(data, ds, tmp / "pooled.vcf", field=field, with_gt=with_gt)
    write_pooled_pheno(data, tmp / "p.pheno", tmp / "p.covar")
    perm = rng.permutation(len(data.samples))
    nodes = {}
    for k, cols in enumerate(np.split(perm, [110])):
        d = tmp / f"site{k + 1}"
        d.mkdir()
        vcf = d / "g.vcf"
        write_dosage_vcf(data, ds, vcf, cols=np.sort(cols), field=field, with_gt=with_gt)
        if k == 1 and not bcf:
            pysam.tabix_compress(str(vcf), str(d / "g.vcf.gz"))
            vcf = d / "g.vcf.gz"
        elif k == 1:  # the second site holds a BCF
            with pysam.VariantFile(str(vcf)) as src, pysam.VariantFile(str(d / "g.bcf"), "wb", header=src.header) as dst:
                for rec in src:
                    dst.write(rec)
            vcf = d / "g.bcf"
        write_samples(data, d / "samples.tsv", cols)
        nodes[f"site{k + 1}"] = {"site": f"site{k + 1}", "vcf": str(vcf), "samples": str(d / "samples.tsv"),
                                 "state_dir": str(d / "state"), "policy": POLICY}
    return nodes, data, ds


def _plan(out: Path, sites: list[str], **kw):
    args = dict(analyses=["freq", "missing", "hardy", "glm"], phenotypes=["CC", "QT2"], covariates=["age", "sex", "smoking"],
                qc=NO_QC, dosage=True)
    return qc_plan(out, sites, **{**args, **kw})


def _plink(tmp: Path, field: str) -> None:
    run_plink2(["--vcf", "pooled.vcf", f"dosage={field}", "--freq", "cols=+pos", "--missing", "variant-only", "vcols=+pos",
                "--hardy", "cols=+pos", "--pheno", "p.pheno", "--pheno-name", "CC", "QT2", "--covar", "p.covar",
                "--covar-variance-standardize", "--glm", "hide-covar", "--out", "ref"], tmp)


def test_quantisation_and_hard_calls_follow_plink():
    # values checked against plink2 --vcf dosage=DS (read back from its .pgen with pgenlib)
    u = quantise(np.array([0.1, 0.9, 1.9, 0.10001, 1.8999, 0.00003051, 0.00009155, 0.00009156, 0.123456789, 1.99997, np.nan]))
    assert u.tolist() == [1638, 14746, 31130, 1639, 31128, 0, 1, 2, 2023, 32768, MISSING]
    assert to_hardcalls(u).tolist() == [0, 1, 2, -1, -1, 0, 0, 0, -1, 2, -1]


@needs_plink2
@pytest.mark.plink
def test_dosage_freq_and_glm_equal_plink2_dosage_ds(tmp_path, monkeypatch):
    from test_gwas import compare_linear, compare_logistic

    monkeypatch.setattr("fedgen.analyses.qc.DOSAGE_ELEMS", 2000)  # sites decode dosages in several sub-blocks
    nodes, _, _ = _sites(tmp_path)
    _plink(tmp_path, "DS")
    run_plan(_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    out = tmp_path / "out"
    for ours, ref in (("freq.afreq", "ref.afreq"), ("missing.vmiss", "ref.vmiss"), ("hardy.hardy", "ref.hardy")):
        assert (out / ours).read_text() == (tmp_path / ref).read_text(), ours
    compare_linear(out / "QT2.glm.linear", tmp_path / "ref.QT2.glm.linear")
    compare_logistic(out / "CC.glm.logistic.hybrid", tmp_path / "ref.CC.glm.logistic.hybrid")
    firth = [r.split("\t")[6] for r in (out / "CC.glm.logistic.hybrid").read_text().splitlines()[1:]]
    assert firth.count("Y") >= 2  # the Firth fallback is exercised
    # the dosages matter: PLINK's hard-call (GT) frequencies differ
    run_plink2(["--vcf", "pooled.vcf", "--freq", "cols=+pos", "--out", "gt"], tmp_path)
    assert (tmp_path / "gt.afreq").read_text() != (out / "freq.afreq").read_text()


@needs_plink2
@pytest.mark.plink
def test_gp_dosages_equal_plink2_dosage_gp(tmp_path):
    from test_gwas import compare_linear

    nodes, _, _ = _sites(tmp_path, "GP", seed=6)
    _plink(tmp_path, "GP")
    run_plan(_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    assert (tmp_path / "out" / "freq.afreq").read_text() == (tmp_path / "ref.afreq").read_text()
    compare_linear(tmp_path / "out" / "QT2.glm.linear", tmp_path / "ref.QT2.glm.linear")


@needs_plink2
@pytest.mark.plink
def test_pgen_with_dosages_equals_vcf_ds(tmp_path):
    nodes, _, _ = _sites(tmp_path, seed=8, bcf=True)
    pgen_nodes = {}
    for site, cfg in nodes.items():
        d = Path(cfg["samples"]).parent
        flag = "--bcf" if cfg["vcf"].endswith(".bcf") else "--vcf"
        run_plink2([flag, cfg["vcf"], "dosage=DS", "--make-pgen", "--out", str(d / "p")], d)
        pgen_nodes[site] = {**{k: v for k, v in cfg.items() if k != "vcf"}, "pgen": str(d / "p"),
                            "state_dir": str(d / "state_pgen")}
    plan = _plan(tmp_path / "vcf", list(nodes), phenotypes=["QT2"])
    run_plan(plan, InProcessTransport(nodes))
    run_plan({**plan, "output_dir": str(tmp_path / "pgen")}, InProcessTransport(pgen_nodes))
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "QT2.glm.linear"):
        assert (tmp_path / "pgen" / name).read_text() == (tmp_path / "vcf" / name).read_text(), name


def test_dosage_study_on_hard_calls_is_a_clear_error(tmp_path):
    data = make_synth(n_samples=60, n_variants=20, seed=3)
    nodes = {}
    for k, cols in enumerate(np.split(np.arange(60), [30])):
        d = tmp_path / f"s{k}"
        d.mkdir()
        write_vcf(data, d / "g.vcf", cols=cols, compress="none", with_multiallelic=False)
        write_samples(data, d / "samples.tsv", cols)
        nodes[f"s{k}"] = {"site": f"s{k}", "vcf": str(d / "g.vcf"), "samples": str(d / "samples.tsv"),
                          "state_dir": str(d / "state"), "policy": POLICY}
    with pytest.raises(FedgenError, match=r"study.dosage: site\(s\) s0, s1 hold no imputed dosages"):
        run_plan(qc_plan(tmp_path / "out", list(nodes), qc=NO_QC, dosage=True), InProcessTransport(nodes))
    from fedgen.analyses import execute  # a site asked directly refuses with the reason

    with pytest.raises(FedgenError, match=r"study.dosage: this site's genotypes \(g.vcf\) carry no imputed dosages"):
        execute(nodes["s0"], "genotype_counts", {"dosage": True}, {"idx": np.arange(3), "flip": np.zeros(3, np.uint8)})


def test_plan_refuses_dosage_where_it_is_not_built(tmp_path):
    from fedgen.errors import ConfigError
    from fedgen.study.plan import build_plan, compose_config

    base = ["study=qc", f"output_dir={tmp_path / 'o'}", "study.dosage=true"]  # the demo's sites (not opened here)
    assert build_plan(compose_config(base))[0]["dosage"] is True
    with pytest.raises(ConfigError, match="study.dosage: the federated PCA"):
        build_plan(compose_config([*base[1:], "study=gwas", "study.phenotypes=[T]", "study.pcs=2"]))
    with pytest.raises(ConfigError, match="study.dosage must be true or false"):
        build_plan(compose_config([*base[:-1], "study.dosage=maybe"]))


HAND_MADE = """##fileformat=VCFv4.2
##contig=<ID=1,length=1000000>
##FORMAT=<ID=GT,Number=1,Type=String,Description="GT">
##FORMAT=<ID={f},Number={num},Type=Float,Description="dosage">
#CHROM	POS	ID	REF	ALT	QUAL	FILTER	INFO	FORMAT	s1	s2	s3	s4	s5	s6
"""
DS_ROWS = [
    "1	100	v1	A	G	.	.	.	GT:DS	0/0:0.05	0/1:0.95	1/1:1.5	0/1:1.05	0/0:0.2	0/0:.",
    "1	200	v2	C	T	.	.	.	GT:DS	0/1:0.123456	1/1:1.91	0/0:0.0001	./.:.	0/0:0.09	0/1:1",
    "1	300	v3	C	T	.	.	.	DS	0.3	1.7	0.00003	.	0.9	1.1",
    "1	400	v4	G	A	.	.	.	DS:GT	0.1	0.9:0/1	1.9	0.10001:./.	1.8999	0.00009156:1/1",
]
GP_ROWS = [
    "1	100	v1	A	G	.	.	.	GP	0.9,0.1,0	0.1,0.9,0	0,0.1,0.9	0.9,0.09,0.01	0.1,0.1,0.8	0.2,0.2,0.2",
    "1	200	v2	C	T	.	.	.	GT:GP	0/1:0.5,0.5,0	1/1:.	0/0:0.98,0.02,0	0/0:0.33,0.33,0.34	1/1:0,0,1	0/1:0.25,0.5,0.25",
]


@needs_plink2
@pytest.mark.plink
@pytest.mark.parametrize("field", ["DS", "GP"])
def test_hand_made_calls_store_what_plink_stores(tmp_path, field):
    """DS with and without GT, '.' with and without GT, values at rounding and hard-call edges, GP
    normalisation: the site's store and derived hard calls equal PLINK's own .pgen, read back."""
    import pgenlib

    from fedgen.cohort.cohort import load_cohort
    from fedgen.cohort.dosage import UNIT

    rows = DS_ROWS if field == "DS" else GP_ROWS
    (tmp_path / "h.vcf").write_text(HAND_MADE.format(f=field, num="A" if field == "DS" else "G") + "\n".join(rows) + "\n")
    (tmp_path / "s.tsv").write_text("IID\tY\n" + "".join(f"s{i}\t{i}\n" for i in range(1, 7)))
    run_plink2(["--vcf", "h.vcf", f"dosage={field}", "--make-pgen", "--out", "h"], tmp_path)
    r = pgenlib.PgenReader(str(tmp_path / "h.pgen").encode())
    d = np.empty((len(rows), 6))
    h = np.empty((len(rows), 6), dtype=np.int8)
    r.read_dosages_range(0, len(rows), d)
    r.read_range(0, len(rows), h)
    want = np.where(d < 0, MISSING, np.rint(d * UNIT)).astype(np.int64)
    c = load_cohort({"site": "h", "vcf": str(tmp_path / "h.vcf"), "samples": str(tmp_path / "s.tsv"),
                     "state_dir": str(tmp_path / "st")})
    assert np.asarray(c.dosage16).tolist() == want.tolist()
    assert c.dosage_hardcalls(np.arange(len(rows))).tolist() == np.where(h < 0, -1, h).tolist()


@pytest.mark.parametrize("value,message", [("abc", "line 7: malformed DS value"), ("2.5", r"line 7: a DS value is outside \[0, 2\]")])
def test_a_bad_dosage_names_its_line(tmp_path, value, message):
    from fedgen.cohort.cohort import load_cohort
    from fedgen.errors import InputError

    rows = [DS_ROWS[0], DS_ROWS[1].replace("0/0:0.09", f"0/0:{value}")]
    (tmp_path / "h.vcf").write_text(HAND_MADE.format(f="DS", num="A") + "\n".join(rows) + "\n")
    (tmp_path / "s.tsv").write_text("IID\tY\n" + "".join(f"s{i}\t{i}\n" for i in range(1, 7)))
    with pytest.raises(InputError, match=message):
        load_cohort({"site": "h", "vcf": str(tmp_path / "h.vcf"), "samples": str(tmp_path / "s.tsv"),
                     "state_dir": str(tmp_path / "st")})
