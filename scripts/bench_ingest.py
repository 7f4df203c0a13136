#!/usr/bin/env python
"""Genotype ingest speed: fedgen's VCF parser vs ``plink2 --make-pgen`` on the same files.

Writes two bgzipped VCFs of the same genotypes (GT-only and GT:AD:DP:GQ:PL), then prints
calls parsed per second for fedgen (decompression + parsing, the whole file) and the wall time
of ``plink2 --vcf F --make-pgen`` (2 threads). Run: ``python scripts/bench_ingest.py
[--samples 4000 --variants 30000]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pysam

from fedgen.cohort.vcf import read_vcf


def make_vcf(path: Path, n_samples: int, n_variants: int, rich: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    p = rng.beta(0.5, 1.5, n_variants)[:, None]
    g = (rng.random((n_variants, n_samples)) < p).astype(np.int8) + (rng.random((n_variants, n_samples)) < p)
    g[rng.random(g.shape) < 0.005] = 3
    if rich:
        toks = [b"0/0:18,0:18:54:0,54,540", b"0/1:9,11:20:99:240,0,210", b"1/1:0,21:21:63:600,63,0", b"./.:0,0:0:.:.,.,."]
    else:
        toks = [b"0/0", b"0/1", b"1/1", b"./."]
    w = max(len(t) for t in toks)
    table = np.zeros((4, w + 1), dtype=np.uint8)
    lens = []
    for i, t in enumerate(toks):
        table[i, : len(t)] = np.frombuffer(t, np.uint8)
        lens.append(len(t))
    fmt = b"GT:AD:DP:GQ:PL" if rich else b"GT"
    with open(path.with_suffix(""), "wb") as fh:
        fh.write(b"##fileformat=VCFv4.2\n##contig=<ID=1,length=248956422>\n")
        fh.write(b'##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n')
        if rich:
            for k, n, t in (("AD", "R", "Integer"), ("DP", "1", "Integer"), ("GQ", "1", "Integer"), ("PL", "G", "Integer")):
                fh.write(f'##FORMAT=<ID={k},Number={n},Type={t},Description="{k}">\n'.encode())
        fh.write(b"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(f"S{i}" for i in range(n_samples)).encode() + b"\n")
        for start in range(0, n_variants, 2000):
            blk = g[start : start + 2000]
            for j, row in enumerate(blk):
                toks_row = table[row]  # (N, w+1)
                lens_row = np.asarray(lens)[row]
                mask = np.arange(w + 1)[None, :] < lens_row[:, None]
                mask[np.arange(len(row)), lens_row] = True  # keep one separator byte
                toks_row[np.arange(len(row)), lens_row] = 9
                body = toks_row[mask].tobytes()[:-1]
                v = start + j
                fh.write(f"1\t{1000 + 10 * v}\trs{v}\tA\tG\t.\tPASS\t.\t".encode() + fmt + b"\t" + body + b"\n")
    pysam.tabix_compress(str(path.with_suffix("")), str(path), force=True)
    os.unlink(path.with_suffix(""))


def bench_fedgen(path: Path, repeats: int = 2) -> tuple[float, int]:
    best = float("inf")
    calls = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        header, blocks, _ = read_vcf(path, threads=2)
        calls = sum(b.dosage.size for b in blocks)
        best = min(best, time.perf_counter() - t0)
    return best, calls


def bench_plink(path: Path, tmp: Path) -> float | None:
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else shutil.which("plink2")
    if not exe:
        return None
    t0 = time.perf_counter()
    subprocess.run([exe, "--vcf", str(path), "--make-pgen", "--threads", "2", "--out", str(tmp / "pg")], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--variants", type=int, default=30000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"{args.variants} variants x {args.samples} samples = {args.variants * args.samples / 1e6:.0f} M calls per file")
        print(f"{'file':<18}{'size MB':>9}{'fedgen s':>10}{'M calls/s':>11}{'plink2 s':>10}{'plink2/fedgen':>15}")
        for rich in (False, True):
            name = "GT:AD:DP:GQ:PL" if rich else "GT only"
            vcf = tmp / ("rich.vcf.gz" if rich else "gt.vcf.gz")
            make_vcf(vcf, args.samples, args.variants, rich)
            secs, calls = bench_fedgen(vcf)
            pl = bench_plink(vcf, tmp)
            ratio = f"{pl / secs:15.2f}" if pl else f"{'n/a':>15}"
            pls = f"{pl:10.2f}" if pl else f"{'n/a':>10}"
            print(f"{name:<18}{vcf.stat().st_size / 1e6:9.1f}{secs:10.2f}{calls / secs / 1e6:11.1f}{pls}{ratio}")


if __name__ == "__main__":
    main()
