#!/usr/bin/env python
"""Regenerate PLINK reference outputs for the exactness tests (tests/data/qc/).

The synthetic pooled data are drawn deterministically by ``fedgen.testing.make_synth`` from the
seeds below, so only PLINK's outputs are committed; tests rebuild the genotypes, split them
across sites and compare federated results with these files. Needs plink2 on PATH.

    python scripts/make_reference_fixtures.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import subprocess

from fedgen.testing import make_synth, run_plink2, write_pooled_pheno, write_pooled_vcf

HERE = Path(__file__).resolve().parent.parent / "tests" / "data" / "qc"
CASES = {"small": dict(n_samples=257, n_variants=300, seed=11), "medium": dict(n_samples=811, n_variants=700, seed=12)}
GWAS = dict(n_samples=700, n_variants=300, seed=21)
GWAS_DIR = HERE.parent / "gwas"


def run_gwas_references(data, t: Path, out: Path) -> None:
    """plink2 --glm (CC logistic/Firth, QT2 linear) and plink1.9 --assoc (CC) on the pooled data."""
    write_pooled_vcf(data, t / "pooled.vcf")
    write_pooled_pheno(data, t / "pooled.pheno", t / "pooled.covar")
    run_plink2(
        ["--vcf", "pooled.vcf", "--pheno", "pooled.pheno", "--pheno-name", "CC", "QT2", "--covar", "pooled.covar",
         "--covar-variance-standardize", "--glm", "hide-covar", "--out", "ref"],
        t,
    )
    lines = (t / "pooled.pheno").read_text().splitlines()[1:]
    (t / "cc.fam.pheno").write_text("".join(f"{f[0]} {f[0]} {f[3] if f[3] != 'NA' else -9}\n" for f in (x.split("\t") for x in lines)))
    subprocess.run(["plink1.9", "--vcf", "pooled.vcf", "--pheno", "cc.fam.pheno", "--assoc", "--allow-no-sex", "--out", "ref19"],
                   cwd=t, check=True, capture_output=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(t / "ref.CC.glm.logistic.hybrid", out / "CC.glm.logistic.hybrid")
    shutil.copy(t / "ref.QT2.glm.linear", out / "QT2.glm.linear")
    shutil.copy(t / "ref19.assoc", out / "CC.assoc")


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, kw in CASES.items():
        data = make_synth(**kw)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            write_pooled_vcf(data, t / "pooled.vcf")
            run_plink2(["--vcf", "pooled.vcf", "--freq", "cols=+pos", "--missing", "variant-only", "vcols=+pos", "--hardy", "cols=+pos", "--out", "ref"], t)
            for ext in ("afreq", "vmiss", "hardy"):
                shutil.copy(t / f"ref.{ext}", HERE / f"{name}.{ext}")
        print(f"wrote {name}: {kw}")
    with tempfile.TemporaryDirectory() as tmp:
        run_gwas_references(make_synth(**GWAS), Path(tmp), GWAS_DIR)
    print(f"wrote gwas: {GWAS}")


if __name__ == "__main__":
    main()
