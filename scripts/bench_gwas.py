#!/usr/bin/env python
"""GWAS speed: fedgen on local Flower nodes vs pooled ``plink2 --glm`` on the same data.

Simulates two sites (default 2 × 2,000 samples, 30,000 common variants), adds two numeric
covariates so the model has age, sex and 4 further covariates (smoking = 2 indicators, cov1,
cov2), then times

* ``fedgen run`` end to end on a real SuperLink + 2 SuperNodes on loopback (cold genotype
  caches: sites parse their VCFs; federation start-up and teardown included), and
* ``plink2 --vcf pooled.vcf.gz --glm`` (logistic with Firth fallback + linear) on the merged
  VCF, same QC filters, same samples,

and prints the wall time of each, their ratio, message rounds and bytes each site sent per
variant. Run: ``python scripts/bench_gwas.py [--samples 2000] [--variants 30000]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def add_covariates(samples: Path, seed: int) -> None:
    lines = samples.read_text().splitlines()
    rng = np.random.default_rng(seed)
    out = [lines[0] + "\tcov1\tcov2"]
    for line in lines[1:]:
        out.append(line + f"\t{rng.normal():.4f}\t{rng.normal(50, 10):.2f}")
    samples.write_text("\n".join(out) + "\n")


def pooled_inputs(data: Path, sites: list[str], tmp: Path) -> None:
    vcfs = [str(data / s / "genotypes.vcf.gz") for s in sites]
    subprocess.run(["bcftools", "merge", "-Oz", "-o", str(tmp / "pooled.vcf.gz"), *vcfs], check=True, capture_output=True)
    rows, header = [], None
    for s in sites:
        lines = (data / s / "samples.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        rows += [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    with open(tmp / "pheno.tsv", "w") as f:
        f.write("#IID\tT2D\tLDL\n")
        for r in rows:
            t2d = "NA" if r["T2D"] == "NA" else str(int(r["T2D"]) + 1)
            f.write(f"{r['IID']}\t{t2d}\t{r['LDL']}\n")
    with open(tmp / "covar.tsv", "w") as f:
        f.write("#IID\tage\tsex\tsmoking\tcov1\tcov2\n")
        for r in rows:
            f.write(f"{r['IID']}\t{r['age']}\t{r['sex']}\t{r['smoking']}\t{r['cov1']}\t{r['cov2']}\n")
    (tmp / "keep.txt").write_text("\n".join(r["IID"] for r in rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="samples per site")
    ap.add_argument("--variants", type=int, default=30000)
    ap.add_argument("--keep", help="keep the working folder here")
    args = ap.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench-gwas-"))
    tmp.mkdir(parents=True, exist_ok=True)
    fedgen = [sys.executable, "-m", "fedgen.cli"]
    sites = ["hk", "sz"]
    data = tmp / "data"
    if not (data / "sz" / "samples.tsv").exists():
        subprocess.run([*fedgen, "simulate", "--out", str(data), "--sites", f"hk={args.samples},sz={args.samples}",
                        "--variants", str(args.variants), "--seed", "7"], check=True, capture_output=True)
        for k, s in enumerate(sites):
            add_covariates(data / s / "samples.tsv", k)
    for s in sites:
        shutil.rmtree(data / s / "fedgen-state", ignore_errors=True)  # cold caches
    cfg = tmp / "cfg" / "sites"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "bench.yaml").write_text("".join(f"{s}:\n  vcf: {data / s / 'genotypes.vcf.gz'}\n  samples: {data / s / 'samples.tsv'}\n" for s in sites))
    out = tmp / "results"
    t0 = time.perf_counter()
    subprocess.run([*fedgen, "run", "sites=bench", f"hydra.searchpath=[file://{tmp / 'cfg'}]", "study=gwas",
                    "study.phenotypes=[T2D,LDL]", "study.covariates=[age,sex,smoking,cov1,cov2]",
                    f"output_dir={out}"], check=True, capture_output=True)
    t_fed = time.perf_counter() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    pooled_inputs(data, sites, tmp)
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    t0 = time.perf_counter()
    subprocess.run([exe, "--vcf", str(tmp / "pooled.vcf.gz"), "--keep", str(tmp / "keep.txt"), "--max-alleles", "2",
                    "--maf", "0.01", "--geno", "0.1", "--hwe", "1e-6", "--pheno", str(tmp / "pheno.tsv"),
                    "--covar", str(tmp / "covar.tsv"), "--covar-variance-standardize", "--glm", "hide-covar",
                    "--threads", "2", "--out", str(tmp / "plink")], check=True, capture_output=True)
    t_plink = time.perf_counter() - t0
    n_var = manifest["variants"]["study"]
    print(f"data: 2 sites x {args.samples} samples, {n_var} shared variants, "
          f"{manifest['qc']['pass']} tested; covariates age, sex, smoking (2 indicators), cov1, cov2")
    print(f"{'':24}{'wall s':>10}")
    print(f"{'fedgen (local Flower)':24}{t_fed:10.1f}")
    print(f"{'plink2 pooled':24}{t_plink:10.1f}")
    print(f"ratio fedgen / plink2: {t_fed / t_plink:.2f}")
    print(f"message rounds: {manifest['rounds']}")
    for s, info in manifest["sites"].items():
        print(f"site {s}: {info['bytes_sent'] / 1e6:.1f} MB sent, {info['bytes_sent'] / n_var:.0f} bytes per variant, {info['messages']} messages")
    print("timings (s):", {k: v for k, v in manifest["timings"].items()})
    print(f"working folder: {tmp}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
