#!/usr/bin/env python
"""Scaling curve: a federated GWAS on 2 simulated sites at growing sizes, against pooled PLINK 2.

For each size ``N x V`` (people per site × variants) it:

1. simulates 2 sites with ``fedgen simulate`` (timed; reused when the folder exists);
2. runs ``fedgen run`` in the PLINK-exact site mode (as ``bench_gwas``: the sites opt in to
   logistic/Firth rounds and per-variant sample sets) on a local federation: SuperLink + 2 SuperNodes on loopback, cold genotype
   caches) for a GWAS of T2D (logistic) and LDL (linear) with age and sex, while a sampler
   (psutil, every 0.2 s) records the peak RSS of every process of the federation: each site's
   worker (the process that holds the cohort and does the site's work), each site's whole
   process tree (SuperNode + SuperExec + worker) and the aggregator (ServerApp);
3. times ``plink2 --vcf pooled.vcf.gz --glm`` on the same samples, covariates and QC
   (``bcftools merge`` + ``norm -m-any`` build the pooled file; not timed) and checks that the
   P values agree;
4. prints wall times, the ratio to PLINK 2, peak RSS, the genotype cache on disk, rounds and
   bytes, then fits ``log(y) = a + b log(N) + c log(V)`` over the grid for wall time and peak
   RSS (the growth exponents).

Run: ``python scripts/bench_scale.py [--sizes 5000x50000,5000x200000,20000x50000,20000x200000]
[--work DIR] [--threads N]``. Data stay in ``--work`` (default ``./bench-scale``) and are reused.
Timing depends on the machine; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gwas import compare  # noqa: E402  (same folder)

SITES = ("a", "b")
COVARS = ("age", "sex")
PHENOS = ("T2D", "LDL")


class RssSampler:
    """Peak RSS of every process under ``root`` (sampled every ``period`` s), classified by role."""

    def __init__(self, root: int, period: float = 0.2) -> None:
        self.root = psutil.Process(root)
        self.period = period
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _role(self, proc: psutil.Process, cache: dict[int, str]) -> str | None:
        """``site:<name>:worker``, ``site:<name>:other``, ``aggregator`` or None."""
        if proc.pid in cache:
            return cache[proc.pid]
        try:
            cmd = " ".join(proc.cmdline())
            chain = [proc, *proc.parents()]
            chain_cmds = [" ".join(p.cmdline()) for p in chain]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        role = None
        for c in chain_cmds:
            if "fedgen.federation.supernode" in c and "--node-config" in c:
                site = Path(c.split("--node-config", 1)[1].split()[0]).stem
                role = f"site:{site}:" + ("worker" if "--fedgen-worker" in cmd else "other")
                break
        if role is None and ("serverapp" in cmd.lower() or "server_app" in cmd):
            role = "aggregator"
        cache[proc.pid] = role
        return role

    def _run(self) -> None:
        cache: dict[int, str | None] = {}
        while not self._stop.is_set():
            totals: dict[str, float] = {}
            try:
                procs = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for p in procs:
                role = self._role(p, cache)
                if role is None:
                    continue
                try:
                    rss = p.memory_info().rss / 2**30
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                key = role if role == "aggregator" else role.rsplit(":", 1)[0]  # site tree
                totals[key] = totals.get(key, 0.0) + rss
                if role.endswith(":worker"):
                    self.peak[role] = max(self.peak.get(role, 0.0), rss)
            for k, v in totals.items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            self._stop.wait(self.period)


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30 if path.exists() else 0.0


def simulate(data: Path, n: int, v: int) -> float | None:
    """Simulate 2 sites of ``n`` people and ``v`` variants into ``data``; seconds, or None if reused."""
    if (data / SITES[-1] / "samples.tsv").exists():
        return None
    t0 = time.perf_counter()
    spec = ",".join(f"{s}={n}" for s in SITES)
    subprocess.run([sys.executable, "-m", "fedgen.cli", "simulate", "--out", str(data), "--sites", spec,
                    "--variants", str(v), "--seed", "11"], check=True)
    return time.perf_counter() - t0


def pooled(data: Path, work: Path) -> None:
    """Pooled VCF (split like fedgen reads it), phenotypes, covariates and keep list for PLINK 2."""
    if not (work / "pooled.vcf.gz").exists():
        vcfs = [str(data / s / "genotypes.vcf.gz") for s in SITES]
        subprocess.run(["bcftools", "merge", "--threads", "2", "-Oz", "-o", str(work / "merged.vcf.gz"), *vcfs],
                       check=True, capture_output=True)
        subprocess.run(["bcftools", "norm", "--threads", "2", "-m-any", "-Oz", "-o", str(work / "pooled.vcf.gz"),
                        str(work / "merged.vcf.gz")], check=True, capture_output=True)
        (work / "merged.vcf.gz").unlink()
    rows = []
    for s in SITES:
        lines = (data / s / "samples.tsv").read_text().splitlines()
        head = lines[0].split("\t")
        rows += [dict(zip(head, line.split("\t"))) for line in lines[1:]]
    with open(work / "pheno.tsv", "w") as f:
        f.write("#IID\tT2D\tLDL\n")
        for r in rows:
            t2d = "NA" if r["T2D"] == "NA" else str(int(r["T2D"]) + 1)
            f.write(f"{r['IID']}\t{t2d}\t{r['LDL']}\n")
    with open(work / "covar.tsv", "w") as f:
        f.write("#IID\t" + "\t".join(COVARS) + "\n")
        for r in rows:
            f.write(r["IID"] + "\t" + "\t".join(r[c] for c in COVARS) + "\n")
    (work / "keep.txt").write_text("\n".join(r["IID"] for r in rows) + "\n")


def run_plink(work: Path, threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of pooled ``plink2 --vcf … --glm``."""
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    argv = [exe, "--vcf", str(work / "pooled.vcf.gz"), "--keep", str(work / "keep.txt"),
            "--maf", "0.01", "--geno", "0.1", "--hwe", "1e-6", "--pheno", str(work / "pheno.tsv"),
            "--covar", str(work / "covar.tsv"), "--covar-variance-standardize", "--glm", "hide-covar",
            "--threads", str(threads), "--out", str(work / "plink")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss / 2**30)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"plink2 failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak


def run_fedgen(data: Path, work: Path) -> tuple[float, dict[str, float], dict]:
    for s in SITES:
        shutil.rmtree(data / s / "fedgen-state", ignore_errors=True)  # cold caches
    cfg = work / "cfg" / "sites"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "scale.yaml").write_text("".join(
        f"{s}:\n  vcf: {data / s / 'genotypes.vcf.gz'}\n  samples: {data / s / 'samples.tsv'}\n"
        "  policy:\n    min_count: 1\n    min_cell: 1\n    allow_per_variant_sample_sets: true\n"
        "    extra_analyses: [glm_logistic, glm_firth]\n"
        for s in SITES))
    out = work / "results"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "fedgen.cli", "run", "sites=scale", f"hydra.searchpath=[file://{work / 'cfg'}]",
            "study=gwas", f"study.phenotypes=[{','.join(PHENOS)}]", f"study.covariates=[{','.join(COVARS)}]",
            "study.qc.maf=0.01", "study.glm.missing=drop", f"output_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RssSampler(proc.pid) as sampler:
        log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"fedgen run failed:\n{log[-4000:]}")
    return wall, dict(sampler.peak), json.loads((out / "manifest.json").read_text())


def fit(rows: list[dict], key: str) -> str:
    """Growth exponents of ``key`` in N and V by least squares on logs (needs >= 3 sizes)."""
    pts = [(r["n"], r["v"], r[key]) for r in rows if r.get(key)]
    if len(pts) < 3 or len({p[0] for p in pts}) < 2 or len({p[1] for p in pts}) < 2:
        return "(needs sizes that vary both N and V)"
    a = np.array([[1.0, np.log(n), np.log(v)] for n, v, _ in pts])
    y = np.log([p[2] for p in pts])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return f"∝ N^{coef[1]:.2f} · V^{coef[2]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000x50000,5000x200000,20000x50000,20000x200000",
                    help="people per site x variants, comma-separated")
    ap.add_argument("--work", default="bench-scale", help="working folder (data reused when present)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="plink2 --threads")
    args = ap.parse_args()
    rows = []
    for size in args.sizes.split(","):
        n, v = (int(x) for x in size.lower().split("x"))
        work = Path(args.work) / f"{n}x{v}"
        data = work / "data"
        work.mkdir(parents=True, exist_ok=True)
        t_sim = simulate(data, n, v)
        wall, peak, manifest = run_fedgen(data, work)
        pooled(data, work)
        t_plink, rss_plink = run_plink(work, args.threads)
        worst = max(compare(work / "results" / f"{p}.glm.{kind}", work / f"plink.{p}.glm.{kind}")[1]
                    for p, kind in (("T2D", "logistic.hybrid"), ("LDL", "linear")))
        site_worker = max(vv for k, vv in peak.items() if k.endswith(":worker")) if peak else float("nan")
        site_tree = max(vv for k, vv in peak.items() if k.startswith("site:") and k.count(":") == 1) \
            if peak else float("nan")
        row = {"n": n, "v": v, "sim_s": t_sim, "fedgen_s": wall, "plink_s": t_plink, "ratio": wall / t_plink,
               "rss_worker": site_worker, "rss_site": site_tree, "rss_agg": peak.get("aggregator", float("nan")),
               "rss_plink": rss_plink, "cache_gb": max(du(data / s / "fedgen-state" / "cache") for s in SITES),
               "rounds": manifest.get("rounds"), "tested": manifest.get("qc", {}).get("pass"),
               "mb_site": max(i["bytes_sent"] for i in manifest["sites"].values()) / 1e6, "dlog10p": worst}
        rows.append(row)
        sim = "reused" if t_sim is None else f"{t_sim:.0f} s"
        print(f"{n} x {v}: simulate {sim}; fedgen {wall:.1f} s, plink2 {t_plink:.1f} s ({row['ratio']:.2f}x); "
              f"peak RSS site worker {site_worker:.2f} GiB, site tree {site_tree:.2f} GiB, aggregator "
              f"{row['rss_agg']:.2f} GiB, plink2 {rss_plink:.2f} GiB; cache {row['cache_gb']:.2f} GiB; "
              f"{row['rounds']} rounds, {row['mb_site']:.0f} MB per site; max |Δlog10 P| {worst:.1e}", flush=True)
    print()
    print("| people per site | variants | tested | fedgen s | plink2 s | ratio | site worker GiB | site tree GiB "
          "| aggregator GiB | plink2 GiB | cache GiB | rounds | MB per site |")
    print("|" + " --- |" * 13)
    for r in rows:
        print(f"| {r['n']:,} | {r['v']:,} | {r['tested']:,} | {r['fedgen_s']:.1f} | {r['plink_s']:.1f} | "
              f"{r['ratio']:.2f} | {r['rss_worker']:.2f} | {r['rss_site']:.2f} | {r['rss_agg']:.2f} | "
              f"{r['rss_plink']:.2f} | {r['cache_gb']:.2f} | {r['rounds']} | {r['mb_site']:.0f} |")
    print()
    for key, name in (("fedgen_s", "fedgen wall time"), ("plink_s", "plink2 wall time"),
                      ("rss_worker", "site worker peak RSS"), ("rss_agg", "aggregator peak RSS"),
                      ("cache_gb", "cache on disk")):
        print(f"growth of {name}: {fit(rows, key)}")


if __name__ == "__main__":
    main()
