#!/usr/bin/env python3
"""Regenerate the PLINK 2 ``--hardy`` reference fixtures in ``tests/data/hwe/``.

Writes a VCF whose variants cover every genotype-count combination with N = 16, an all-missing
variant, hand-picked extremes and ~200 random variants with N = 500–3000, runs
``plink2 --hardy`` and ``plink2 --hardy midp`` on it, and stores:

- ``counts.tsv``        the inputs: ID, HOM_REF, HET, HOM_ALT, MISSING per variant (the VCF is
                        a deterministic function of this table, see :func:`write_vcf`);
- ``plink2.hardy``, ``plink2_midp.hardy``  PLINK's outputs, unmodified;
- ``provenance.json``   PLINK version, binary and command lines.

Usage: ``python scripts/make_hwe_fixtures.py [--out tests/data/hwe] [--plink2 PATH]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED = 20050501  # Wigginton et al. 2005
N_RANDOM = 200
REPO = Path(__file__).resolve().parents[1]


def plink2_binary() -> str | None:
    """Pin one PLINK 2 build: the AVX2 one when the CPU has AVX2, else ``plink2`` on PATH."""
    avx2 = Path("/usr/lib/plink2/plink2-avx2")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if avx2.exists() and " avx2" in flags:
        return str(avx2)
    return shutil.which("plink2")


def all_combos(n: int) -> list[tuple[int, int, int]]:
    """Every (hom_ref, het, hom_alt) with the given total."""
    return [(a, h, n - a - h) for a in range(n + 1) for h in range(n + 1 - a)]


def random_counts(rng: np.random.Generator, n_variants: int) -> list[tuple[int, int, int]]:
    """Realistic counts: HWE draws, inbreeding/excess-het deviations, rare alleles, extremes."""
    out = []
    for _ in range(n_variants):
        n = int(rng.integers(500, 3001))
        u = rng.random()
        p = rng.uniform(0.0005, 0.02) if u < 0.25 else rng.uniform(0.02, 0.5)
        v = rng.random()
        if v < 0.6:
            f = 0.0
        elif v < 0.85:
            f = rng.uniform(-0.1, 0.1)
        else:
            f = rng.uniform(-0.6, 0.9)
        q = 1 - p
        probs = np.array([q * q + f * p * q, 2 * p * q * (1 - f), p * p + f * p * q])
        probs = np.clip(probs, 0, None)
        probs /= probs.sum()
        a, h, b = (int(x) for x in rng.multinomial(n, probs))
        out.append((a, h, b))
    return out


def extreme_counts() -> list[tuple[int, int, int]]:
    """Corner cases: P = 0, P near the subnormal range, all-het, singletons, rounding ties."""
    ext = [
        (1500, 0, 1500),  # no hets at p = 0.5: P underflows to 0
        (0, 3000, 0),  # all het
        (2999, 1, 0), (2998, 0, 2), (2997, 2, 1), (1, 2998, 1),
        (3000, 0, 0), (0, 0, 3000),  # monomorphic
        (1000, 0, 2000), (10, 2980, 10),
    ]
    # hom_ref = hom_alt = x, N = 3000: P through the subnormal range down to 0, for a het
    # deficit (x ~ 1250) and a het excess (x ~ 250)
    ext += [(x, 3000 - 2 * x, x) for x in (1180, 1236, 1243, 1244, 1248, 1252, 1254, 1255,
                                           1300, 245, 246, 247, 250, 256, 257, 258, 280)]
    ext += [(x, 500 - 2 * x, x) for x in (150, 175, 200, 225)]
    # O(HET_A1) = het/3200 lands exactly on a 7th-digit 5: PLINK's half-to-even differs from
    # printf's %.6g here (e.g. 323/3200 prints 0.100938, printf gives 0.100937)
    ext += [((3200 - h) // 2, h, 3200 - h - (3200 - h) // 2)
            for h in (323, 329, 333, 337, 341, 345, 349, 395, 1185, 2395)]
    return ext


def write_vcf(path: Path, counts: list[tuple[int, int, int, int]]) -> None:
    """VCF with one biallelic chr1 SNP per (hom_ref, het, hom_alt, missing) row."""
    n_samples = sum(counts[0])
    if any(sum(c) != n_samples for c in counts):
        raise ValueError("every row must sum to the sample count")
    lines = [
        "##fileformat=VCFv4.2",
        "##contig=<ID=1,length=249250621>",
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT"]
                  + [f"S{i + 1}" for i in range(n_samples)]),
    ]
    for i, (a, h, b, m) in enumerate(counts):
        gts = ["0/0"] * a + ["0/1"] * h + ["1/1"] * b + ["./."] * m
        lines.append("\t".join(["1", str(1000 + 10 * i), f"v{i + 1}", "A", "C", ".", ".", ".",
                                "GT"] + gts))
    path.write_text("\n".join(lines) + "\n")


def run_hardy(plink2: str, workdir: Path, vcf_name: str, out_prefix: str, *, midp: bool
              ) -> list[str]:
    """Run ``plink2 --vcf <vcf> --hardy [midp]`` inside ``workdir``; returns the command."""
    cmd = [plink2, "--vcf", vcf_name, "--hardy"] + (["midp"] if midp else []) + [
        "--threads", "1", "--out", out_prefix]
    subprocess.run(cmd, check=True, cwd=workdir, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return cmd


def build_counts(seed: int = SEED, n_random: int = N_RANDOM) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return all_combos(16) + [(0, 0, 0)] + extreme_counts() + random_counts(rng, n_random)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "hwe")
    ap.add_argument("--plink2", default=None)
    args = ap.parse_args(argv)
    plink2 = args.plink2 or plink2_binary()
    if plink2 is None:
        print("plink2 not found", file=sys.stderr)
        return 1
    geno = build_counts()
    n_samples = max(sum(g) for g in geno)
    rows = [(a, h, b, n_samples - a - h - b) for a, h, b in geno]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_vcf(Path(tmp) / "hwe.vcf", rows)
        cmds = []
        for midp, prefix in ((False, "plink2"), (True, "plink2_midp")):
            cmds.append(run_hardy(plink2, Path(tmp), "hwe.vcf", prefix, midp=midp))
            shutil.copyfile(Path(tmp) / f"{prefix}.hardy", args.out / f"{prefix}.hardy")
    with open(args.out / "counts.tsv", "w") as fh:
        fh.write("ID\tHOM_REF\tHET\tHOM_ALT\tMISSING\n")
        for i, (a, h, b, m) in enumerate(rows):
            fh.write(f"v{i + 1}\t{a}\t{h}\t{b}\t{m}\n")
    version = subprocess.run([plink2, "--version"], capture_output=True, text=True).stdout.strip()
    prov = {
        "generator": "scripts/make_hwe_fixtures.py",
        "seed": SEED,
        "plink2": plink2,
        "plink2_version": version,
        "commands": [" ".join(cmd) for cmd in cmds],
        "n_variants": len(rows),
        "n_samples": n_samples,
    }
    (args.out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"wrote {len(rows)} variants to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
