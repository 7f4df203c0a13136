#!/usr/bin/env python
"""GWAS speed: fedgen on local Flower nodes vs pooled ``plink2 --vcf … --glm`` on the same data.

Two modes, both timed in the same run against PLINK 2 on the merged VCF (same QC filters,
same samples, same covariates, ``--threads`` = this machine's cores):

* ``--mode demo``: 2 sites × 2,000 samples, 30,000 variants of MAF ≥ 1 %, T2D (30 % cases,
  logistic; no row needs Firth) and LDL (linear) with age, sex, smoking (2 indicators), cov1, cov2.
* ``--mode firth`` (default): data shaped like hospital case-control cohorts, built to
  exercise the slow paths: 3 sites of unequal size (1,400 / 2,000 / 830), 20,000 common and
  7,000 rare variants tested down to MAF 0.2 %, missing calls, an imbalanced binary trait
  ``CASE`` (≈ 4 % cases, drawn from T2D) so that ≥ 1,000 rows need Firth, plus LDL (linear).

fedgen runs twice: end to end (``fedgen run``: SuperLink + SuperNodes on loopback, cold
genotype caches: sites parse their VCFs; start-up and teardown included), and on a federation
that is already running (as hospitals deploy their nodes; submission to results, caches still
cold). Both run in the PLINK-exact mode
(sites opt in to logistic/Firth rounds and per-variant sample sets; ``study.glm.missing=drop``),
so the bench also checks that its P values equal PLINK's. It prints wall times, the ratio,
rounds per phase, bytes per site and the phase timings from the manifest.

* ``--mode pca``: the ``firth`` mode's data, federated PCA (k = 10 from QC-passing variants
  with MAF ≥ 5 %, LD-pruned 50/5/0.2, as ``study.pca``'s defaults) against
  ``plink2 --vcf … --indep-pairwise 50 5 0.2`` then ``--extract … --pca approx 10``.

Run: ``python scripts/bench_gwas.py [--mode firth|demo|pca] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = {
    "demo": {"sites": {"hk": 2000, "sz": 2000}, "variants": 30000, "rare": 0.05, "maf": 0.01, "binary": "T2D",
             "case_rate": None},
    "firth": {"sites": {"hk": 1400, "sz": 2000, "mo": 830}, "variants": 20000, "rare": 0.35, "maf": 0.002,
              "binary": "CASE", "case_rate": 0.065},
    "pca": {"sites": {"hk": 1400, "sz": 2000, "mo": 830}, "variants": 20000, "rare": 0.35, "maf": 0.002,
            "binary": "CASE", "case_rate": 0.065, "pca": True},
}
COVARS = ["age", "sex", "smoking", "cov1", "cov2"]


def add_columns(samples: Path, seed: int, case_rate: float | None) -> None:
    """cov1, cov2 (numeric) and, with ``case_rate``, CASE = T2D cases kept with that probability."""
    lines = samples.read_text().splitlines()
    rng = np.random.default_rng(seed)
    head = lines[0].split("\t")
    t2d = head.index("T2D")
    extra = "\tcov1\tcov2" + ("\tCASE" if case_rate is not None else "")
    out = [lines[0] + extra]
    for line in lines[1:]:
        f = line.split("\t")
        row = line + f"\t{rng.normal():.4f}\t{rng.normal(50, 10):.2f}"
        if case_rate is not None:
            row += "\tNA" if f[t2d] == "NA" else f"\t{int(f[t2d] == '1' and rng.random() < case_rate)}"
        out.append(row)
    samples.write_text("\n".join(out) + "\n")


def pooled_inputs(data: Path, sites: list[str], tmp: Path, binary: str) -> None:
    vcfs = [str(data / s / "genotypes.vcf.gz") for s in sites]
    # pooled data as fedgen reads it: multi-allelic records split like `bcftools norm -m-any`
    merged = tmp / "merged.vcf.gz"
    subprocess.run(["bcftools", "merge", "-Oz", "-o", str(merged), *vcfs], check=True, capture_output=True)
    subprocess.run(["bcftools", "norm", "-m-any", "-Oz", "-o", str(tmp / "pooled.vcf.gz"), str(merged)],
                   check=True, capture_output=True)
    rows = []
    for s in sites:
        lines = (data / s / "samples.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        rows += [dict(zip(header, line.split("\t"))) for line in lines[1:]]
    with open(tmp / "pheno.tsv", "w") as f:
        f.write(f"#IID\t{binary}\tLDL\n")
        for r in rows:
            b = "NA" if r[binary] == "NA" else str(int(r[binary]) + 1)
            f.write(f"{r['IID']}\t{b}\t{r['LDL']}\n")
    with open(tmp / "covar.tsv", "w") as f:
        f.write("#IID\t" + "\t".join(COVARS) + "\n")
        for r in rows:
            f.write(r["IID"] + "\t" + "\t".join(r[c] for c in COVARS) + "\n")
    (tmp / "keep.txt").write_text("\n".join(r["IID"] for r in rows) + "\n")


def read_table(path: Path) -> dict[str, list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        head = f.readline().rstrip("\n").split("\t")
        cols = list(zip(*(line.rstrip("\n").split("\t") for line in f)))
    return {h: list(c) for h, c in zip(head, cols)}


def compare(fed: Path, plink: Path) -> tuple[int, float]:
    """Rows compared and the largest |log10 P| difference between two glm tables, matched by
    CHROM:POS:REF:ALT (split multi-allelic records share their ID)."""
    a, b = read_table(fed), read_table(plink)

    def keys(t):
        return list(zip(t["#CHROM"], t["POS"], t["REF"], t["ALT"]))

    pb = dict(zip(keys(b), b["P"]))
    worst, n = 0.0, 0
    for key, p in zip(keys(a), a["P"]):
        q = pb.get(key)
        if q is None or p == "NA" or q == "NA":
            continue
        n += 1
        worst = max(worst, abs(np.log10(float(p)) - np.log10(float(q))))
    return n, worst


def wait_until_idle(quiet: float = 0.10, settle: float = 1.0, limit: float = 90.0) -> float:
    """Wait until this process's children (the local federation) use under ``quiet`` of a core for
    ``settle`` seconds in a row: a site worker imports its analyses for several seconds after it
    starts, and a study submitted meanwhile would be timed with those imports. Returns the wait."""
    import psutil

    me = psutil.Process()
    t0 = time.perf_counter()
    calm = 0.0

    def cpu() -> float:
        total = 0.0
        for p in me.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    last = cpu()
    while time.perf_counter() - t0 < limit:
        time.sleep(0.25)
        now = cpu()
        calm = calm + 0.25 if now - last < quiet * 0.25 else 0.0
        last = now
        if calm >= settle:
            break
    return time.perf_counter() - t0


def time_on_running_federation(overrides: list[str], out: Path, data: Path, sites: list[str]) -> float:
    """Wall time of the study on a federation that is already up (SuperLink and SuperNodes
    running, as hospitals deploy them): from submission to the results folder. The sites'
    genotype caches are cold (they parse their VCFs), as in the end-to-end run."""
    import tempfile as _tf

    from fedgen.federation.local import LocalFederation
    from fedgen.study.plan import build_plan, compose_config

    for s in sites:
        shutil.rmtree(data / s / "fedgen-state", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose_config([*overrides, f"output_dir={out}"])
    plan, node_configs = build_plan(cfg)
    with _tf.TemporaryDirectory(prefix="bench-fed-") as work, LocalFederation(node_configs, workdir=Path(work)) as fed:
        wait_until_idle()  # the site workers have finished starting, as on nodes that have been up for a while
        t0 = time.perf_counter()
        fed.run(plan, timeout=3600)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="firth")
    ap.add_argument("--keep", help="keep the working folder here (data is reused when present)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="plink2 --threads")
    args = ap.parse_args()
    mode = MODES[args.mode]
    tmp = Path(args.keep or tempfile.mkdtemp(prefix=f"bench-gwas-{args.mode}-"))
    tmp.mkdir(parents=True, exist_ok=True)
    fedgen = [sys.executable, "-m", "fedgen.cli"]
    sites = list(mode["sites"])
    binary = mode["binary"]
    data = tmp / "data"
    if not (data / sites[-1] / "samples.tsv").exists():
        spec = ",".join(f"{s}={n}" for s, n in mode["sites"].items())
        subprocess.run([*fedgen, "simulate", "--out", str(data), "--sites", spec, "--variants", str(mode["variants"]),
                        "--rare-fraction", str(mode["rare"]), "--seed", "7"], check=True, capture_output=True)
        for k, s in enumerate(sites):
            add_columns(data / s / "samples.tsv", k, mode["case_rate"])
    for s in sites:
        shutil.rmtree(data / s / "fedgen-state", ignore_errors=True)  # cold caches
    cfg = tmp / "cfg" / "sites"
    cfg.mkdir(parents=True, exist_ok=True)
    policy = ("  policy:\n    min_count: 1\n    min_cell: 1\n    allow_per_variant_sample_sets: true\n"
              "    pca_rank_per_study: 1000\n    pca_rank_lifetime: 1000000\n"
              "    extra_analyses: [glm_logistic, glm_firth, pca_product, pca_scores]\n")
    (cfg / "bench.yaml").write_text("".join(
        f"{s}:\n  vcf: {data / s / 'genotypes.vcf.gz'}\n  samples: {data / s / 'samples.tsv'}\n{policy}" for s in sites))
    out = tmp / "results"
    shutil.rmtree(out, ignore_errors=True)
    if mode.get("pca"):
        return bench_pca(args, mode, tmp, data, sites, fedgen, out)
    overrides = ["sites=bench", f"hydra.searchpath=[file://{tmp / 'cfg'}]", "study=gwas",
                 f"study.phenotypes=[{binary},LDL]", f"study.covariates=[{','.join(COVARS)}]",
                 f"study.qc.maf={mode['maf']}", "study.glm.missing=drop"]
    t0 = time.perf_counter()
    run = subprocess.run([*fedgen, "run", *overrides, f"output_dir={out}"], capture_output=True, text=True)
    t_fed = time.perf_counter() - t0
    if run.returncode:
        sys.exit(f"fedgen run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    pooled_inputs(data, sites, tmp, binary)
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    t0 = time.perf_counter()
    subprocess.run([exe, "--vcf", str(tmp / "pooled.vcf.gz"), "--keep", str(tmp / "keep.txt"),
                    "--maf", str(mode["maf"]), "--geno", "0.1", "--hwe", "1e-6", "--pheno", str(tmp / "pheno.tsv"),
                    "--covar", str(tmp / "covar.tsv"), "--covar-variance-standardize", "--glm", "hide-covar",
                    "--threads", str(args.threads), "--out", str(tmp / "plink")], check=True, capture_output=True)
    t_plink = time.perf_counter() - t0
    t_warm = time_on_running_federation(overrides, tmp / "results-running", data, sites)
    hybrid = read_table(tmp / f"plink.{binary}.glm.logistic.hybrid")
    n_firth = sum(f == "Y" for f in hybrid["FIRTH?"])
    n_var = manifest["variants"]["study"]
    n_samples = sum(mode["sites"].values())
    print(f"mode {args.mode}: {len(sites)} sites, {n_samples} samples, {n_var} shared variants, "
          f"{manifest['qc']['pass']} tested (MAF >= {mode['maf']}); {binary}: {n_firth} rows need Firth (PLINK 2)")
    print(f"{'':44}{'wall s':>8}{'/ plink2':>10}")
    print(f"{'fedgen run, end to end (starts the federation)':44}{t_fed:8.1f}{t_fed / t_plink:10.2f}")
    print(f"{'fedgen on a running federation (as deployed)':44}{t_warm:8.1f}{t_warm / t_plink:10.2f}")
    print(f"{'plink2 --vcf pooled':44}{t_plink:8.1f}")
    for name in (f"{binary}.glm.logistic.hybrid", "LDL.glm.linear"):
        n, worst = compare(out / name, tmp / f"plink.{name}")
        print(f"exactness {name}: {n} rows, max |Δlog10 P| vs plink2 = {worst:.2e}")
    print(f"message rounds: {manifest['rounds']}")
    for s, info in manifest["sites"].items():
        print(f"site {s}: {info['bytes_sent'] / 1e6:.1f} MB sent, {info['messages']} messages")
    print("timings (s):", {k: v for k, v in manifest["timings"].items()})
    print(f"working folder: {tmp}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_pca(args, mode, tmp: Path, data: Path, sites: list[str], fedgen: list[str], out: Path) -> None:
    t0 = time.perf_counter()
    run = subprocess.run([*fedgen, "run", "sites=bench", f"hydra.searchpath=[file://{tmp / 'cfg'}]", "study=qc",
                          "study.analyses=[freq,missing,hardy,pca]", "+study.pca={ld_prune:{window:50,step:5,r2:0.2}}",
         "+study.glm={missing:drop}",
                          f"output_dir={out}"], capture_output=True, text=True)
    t_fed = time.perf_counter() - t0
    if run.returncode:
        sys.exit(f"fedgen run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    t_warm = time_on_running_federation(
        ["sites=bench", f"hydra.searchpath=[file://{tmp / 'cfg'}]", "study=qc", "study.analyses=[freq,missing,hardy,pca]",
         "+study.pca={ld_prune:{window:50,step:5,r2:0.2}}",
         "+study.glm={missing:drop}"], tmp / "results-running", data, sites)
    pooled_inputs(data, sites, tmp, mode["binary"])
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    common = [exe, "--vcf", str(tmp / "pooled.vcf.gz"), "--keep", str(tmp / "keep.txt"),
              "--geno", "0.1", "--hwe", "1e-6", "--maf", "0.05", "--threads", str(args.threads),
              # split multi-allelic records share their ID; --indep-pairwise needs unique ones
              "--set-all-var-ids", "@:#:$r:$a", "--new-id-max-allele-len", "1000", "truncate"]
    t0 = time.perf_counter()
    subprocess.run([*common, "--indep-pairwise", "50", "5", "0.2", "--out", str(tmp / "prune")], check=True, capture_output=True)
    subprocess.run([*common, "--extract", str(tmp / "prune.prune.in"), "--pca", "approx", "10", "--seed", "1",
                    "--out", str(tmp / "plinkpca")], check=True, capture_output=True)
    t_plink = time.perf_counter() - t0
    pca = manifest.get("pca") or {}
    print(f"mode pca: {len(sites)} sites, {sum(mode['sites'].values())} samples, {manifest['variants']['study']} shared "
          f"variants; {pca.get('variants_used', '?')} used for k = {pca.get('k', '?')} PCs (plink2: "
          f"{sum(1 for _ in open(tmp / 'prune.prune.in'))} after pruning)")
    ours = {"{}:{}:{}:{}".format(*ln.split("\t")[:2], *ln.split("\t")[3:5])
            for ln in (out / "pca.variants.tsv").read_text().splitlines()[1:]}
    theirs = set((tmp / "prune.prune.in").read_text().split())
    print(f"LD-pruned variants: fedgen {len(ours)}, plink2 {len(theirs)}, in one but not the other {len(ours ^ theirs)} "
          "(PLINK-exact site mode: missing calls dropped pairwise, as plink2 does)")
    print(f"{'':44}{'wall s':>8}{'/ plink2':>10}")
    print(f"{'fedgen run QC + PCA, end to end':44}{t_fed:8.1f}{t_fed / t_plink:10.2f}")
    print(f"{'fedgen on a running federation (as deployed)':44}{t_warm:8.1f}{t_warm / t_plink:10.2f}")
    print(f"{'plink2 --vcf prune, then --pca approx 10':44}{t_plink:8.1f}")
    print(f"message rounds: {manifest['rounds']}; per phase: {manifest.get('rounds_per_phase', {})}")
    print("timings (s):", {k: v for k, v in manifest["timings"].items()})
    print(f"working folder: {tmp}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
