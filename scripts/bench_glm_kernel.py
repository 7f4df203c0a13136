#!/usr/bin/env python
"""Site GLM kernels alone: linear and logistic (+ Firth fallback) sums and driver for one site.

30,000 variants × 4,000 samples × 8 predictors (intercept, genotype, 6 covariates), MAF drawn
from Beta(0.5, 2) clipped to [0.002, 0.5] (many rare variants, so some rows need Firth), 1 %
missing calls, through ``fedgen.stats.glm.glm_pooled`` (the same site kernels and aggregator
driver as a federated study, without the transport). Prints wall and CPU seconds, rounds,
variant-evaluations and Firth rows; with ``--plink`` also times ``plink2 --glm`` on the same
matrix written as a .bed fileset (``--threads`` = this machine's cores).

Run: ``python scripts/bench_glm_kernel.py [--variants V] [--samples N] [--plink]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from fedgen.stats.glm import glm_pooled


def write_bed(prefix: Path, g: np.ndarray, yq: np.ndarray, yb: np.ndarray, C: np.ndarray) -> None:
    """PLINK 1 .bed/.bim/.fam (A1 = ALT dosage g, -1 missing) and phenotype/covariate files."""
    V, N = g.shape
    code = np.select([g == 0, g == 1, g == 2], [3, 2, 0], 1).astype(np.uint8)  # bed: 00 hom A1, 01 missing, 10 het, 11 hom A2
    pad = (-N) % 4
    code = np.pad(code, ((0, 0), (0, pad)), constant_values=1).reshape(V, -1, 4)
    packed = (code[:, :, 0] | code[:, :, 1] << 2 | code[:, :, 2] << 4 | code[:, :, 3] << 6).astype(np.uint8)
    with open(f"{prefix}.bed", "wb") as fh:
        fh.write(bytes([0x6C, 0x1B, 0x01]))
        fh.write(packed.tobytes())
    Path(f"{prefix}.bim").write_text("".join(f"1\tv{i}\t0\t{i + 1}\tA\tG\n" for i in range(V)))
    Path(f"{prefix}.fam").write_text("".join(f"s{j}\ts{j}\t0\t0\t0\t-9\n" for j in range(N)))
    Path(f"{prefix}.pheno").write_text("#FID\tIID\tQT\tBIN\n" + "".join(
        f"s{j}\ts{j}\t{yq[j]:.6f}\t{int(yb[j]) + 1}\n" for j in range(N)))
    Path(f"{prefix}.covar").write_text("#FID\tIID\t" + "\t".join(f"c{i}" for i in range(C.shape[1])) + "\n" + "".join(
        f"s{j}\ts{j}\t" + "\t".join(f"{x:.6f}" for x in C[j]) + "\n" for j in range(N)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=30_000)
    ap.add_argument("--samples", type=int, default=4_000)
    ap.add_argument("--covariates", type=int, default=6)
    ap.add_argument("--plink", action="store_true", help="also time plink2 --glm on the same data")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    V, N, k = args.variants, args.samples, args.covariates
    maf = rng.beta(0.5, 2, V).clip(0.002, 0.5)[:, None]
    g = ((rng.random((V, N)) < maf).astype(np.int8) + (rng.random((V, N)) < maf)).astype(np.int8)
    g[rng.random((V, N)) < 0.01] = -1
    C = rng.normal(size=(N, k))
    yq = C @ rng.normal(size=k) * 0.3 + rng.normal(size=N)
    yb = (rng.random(N) < 1 / (1 + np.exp(-(C @ rng.normal(size=k) * 0.3 - 0.4)))).astype(float)
    t0, c0 = time.perf_counter(), time.process_time()
    lin = glm_pooled(g, yq, C, family="linear")
    t1, c1 = time.perf_counter(), time.process_time()
    rounds: list[tuple[str, int]] = []
    log = glm_pooled(g, yb, C, family="logistic", on_round=lambda kind, n: rounds.append((kind, n)))
    t2, c2 = time.perf_counter(), time.process_time()
    ok_lin, ok_log = (lin["errcode"] == ".").mean(), (log["errcode"] == ".").mean()
    print(f"{V:,} variants x {N:,} samples x {k + 2} predictors")
    print(f"linear:   {t1 - t0:6.2f} s wall, {c1 - c0:6.2f} s CPU ({ok_lin:.1%} rows without ERRCODE)")
    print(f"logistic: {t2 - t1:6.2f} s wall, {c2 - c1:6.2f} s CPU in {len(rounds)} rounds "
          f"({sum(n for _, n in rounds):,} variant-evaluations, {int(log['firth'].sum()):,} Firth rows, "
          f"{ok_log:.1%} rows without ERRCODE)")
    if args.plink:
        exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
        with tempfile.TemporaryDirectory(prefix="bench-glm-") as tmp:
            prefix = Path(tmp) / "d"
            write_bed(prefix, g, yq, yb, C)
            for pheno, t_fed in (("QT", t1 - t0), ("BIN", t2 - t1)):
                t = time.perf_counter()
                subprocess.run([exe, "--bfile", str(prefix), "--pheno", f"{prefix}.pheno", "--pheno-name", pheno,
                                "--covar", f"{prefix}.covar", "--covar-variance-standardize", "--glm", "hide-covar",
                                "--threads", str(os.cpu_count() or 1), "--out", str(prefix)],
                               check=True, capture_output=True)
                t_pl = time.perf_counter() - t
                print(f"plink2 --bfile --glm {pheno}: {t_pl:.2f} s wall; fedgen kernels / plink2 = {t_fed / t_pl:.2f}")


if __name__ == "__main__":
    main()
