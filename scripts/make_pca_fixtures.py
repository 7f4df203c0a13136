#!/usr/bin/env python3
"""Regenerate the PLINK 2 ``--pca`` / ``--indep-pairwise`` reference fixtures in ``tests/data/pca/``.

Genotypes with population structure (:func:`make_structured`): five populations on a tree
(Balding–Nichols drift on each branch: root → X, Y (F=0.03); X → X1, X2 (0.05); Y → Y1, Y2
(0.025); Y2 → Y2a, Y2b (0.03); shares 30/20/20/15/15 %), so PC1–PC4 have distinct eigenvalues
well above the noise bulk. Optional short-range LD: each haplotype copies the previous
variant's allele with probability ``ld_copy`` (else draws from its population frequency).

Sets (pooled; the tests split them across 2 and 3 sites):

- ``small``  200 samples x 600 variants, no missing calls: ``--maf 0.05 --pca 10`` (exact)
  and ``--maf 0.05 --pca approx 10 --seed 1``;
- ``medium`` 450 samples x 1200 variants, 1 % missing: ``--maf 0.05 --pca approx 10 --seed 1``
  (approx mean-imputes, like fedgen; exact mode would rescale by pairwise non-missing counts);
- ``ld``     300 samples x 1200 variants with LD, 1 % missing: ``--maf 0.05 --indep-pairwise
  50 5 0.2`` (IDs set to CHROM:POS) and, on the pruned set, ``--pca approx 10 --seed 1``.

Stored: ``<set>.npz`` (dosage (V, N) int8 with -1 missing, variant table, sample IDs),
PLINK's ``.eigenval``/``.eigenvec`` (and ``ld.prune.in``), ``provenance.json``. The AVX2
build is pinned (``fedgen.testing.run_plink2``).

Usage: ``python scripts/make_pca_fixtures.py [--out tests/data/pca]``
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedgen.testing import SynthData, make_synth, run_plink2, write_pooled_vcf  # noqa: E402

SETS: dict[str, dict] = {
    "small": dict(n_samples=200, n_variants=600, seed=2024, missing_rate=0.0),
    "medium": dict(n_samples=450, n_variants=1200, seed=2025, missing_rate=0.01),
    "ld": dict(n_samples=300, n_variants=1200, seed=2026, missing_rate=0.01, ld_copy=0.55),
}
TREE_F = (0.03, 0.05, 0.025, 0.03)
SHARES = (0.30, 0.20, 0.20, 0.15, 0.15)


def _drift(rng: np.random.Generator, p: np.ndarray, F: float) -> np.ndarray:
    a = p * (1 - F) / F
    b = (1 - p) * (1 - F) / F
    return rng.beta(a, b).clip(1e-4, 1 - 1e-4)


def make_structured(
    n_samples: int,
    n_variants: int,
    *,
    seed: int,
    missing_rate: float = 0.0,
    ld_copy: float = 0.0,
    contigs: tuple[str, ...] = ("1", "2", "3"),
) -> tuple[SynthData, np.ndarray]:
    """Structured pooled genotypes as :class:`fedgen.testing.SynthData`, plus population labels."""
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(0.05, 0.95, n_variants)
    X, Y = _drift(rng, p0, TREE_F[0]), _drift(rng, p0, TREE_F[0])
    X1, X2 = _drift(rng, X, TREE_F[1]), _drift(rng, X, TREE_F[1])
    Y1, Y2 = _drift(rng, Y, TREE_F[2]), _drift(rng, Y, TREE_F[2])
    Y2a, Y2b = _drift(rng, Y2, TREE_F[3]), _drift(rng, Y2, TREE_F[3])
    pops = np.stack([X1, X2, Y1, Y2a, Y2b])
    label = rng.choice(len(SHARES), n_samples, p=SHARES)
    P = pops[label].T  # (V, N)
    haps = []
    for _ in range(2):
        h = rng.random((n_variants, n_samples)) < P
        if ld_copy > 0:
            copy = rng.random((n_variants, n_samples)) < ld_copy
            for i in range(1, n_variants):
                h[i] = np.where(copy[i], h[i - 1], h[i])
        haps.append(h.astype(np.int8))
    g = haps[0] + haps[1]
    if missing_rate:
        g[rng.random(g.shape) < missing_rate] = -1
    per = -(-n_variants // len(contigs))
    chrom = [contigs[min(i // per, len(contigs) - 1)] for i in range(n_variants)]
    pos = np.zeros(n_variants, dtype=np.int64)
    for c in contigs:
        m = np.array([x == c for x in chrom])
        pos[m] = np.sort(rng.choice(np.arange(10_000, 50_000_000), m.sum(), replace=False))
    bases = np.array(list("ACGT"))
    ref_i = rng.integers(0, 4, n_variants)
    alt_i = (ref_i + rng.integers(1, 4, n_variants)) % 4
    ids = [f"rs{5000 + i}" if i % 13 else "." for i in range(n_variants)]
    samples = [f"P{i:04d}" for i in range(n_samples)]
    none = np.zeros(g.shape, dtype=bool)
    data = SynthData(chrom, pos, ids, bases[ref_i].tolist(), bases[alt_i].tolist(), g, samples, none, none, [],
                     _phenotypes(n_samples, seed))
    return data, label


def data_from_npz(path: Path) -> SynthData:
    """Rebuild the pooled data of a stored set."""
    z = np.load(path)
    g = z["dosage"]
    none = np.zeros(g.shape, dtype=bool)
    n = g.shape[1]
    return SynthData(
        z["chrom"].tolist(), z["pos"], z["ids"].tolist(), z["ref"].tolist(), z["alt"].tolist(), g,
        z["samples"].tolist(), none, none, [], _phenotypes(n, 0),
    )


def _phenotypes(n_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Samples-table columns as :func:`fedgen.testing.write_samples` expects them (not used by PCA)."""
    return make_synth(n_samples=n_samples, n_variants=12, seed=seed).pheno


def plink_version() -> str:
    exe = "/usr/lib/plink2/plink2-avx2" if Path("/usr/lib/plink2/plink2-avx2").exists() else "plink2"
    return subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "pca")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    commands: dict[str, list[list[str]]] = {}
    for name, kw in SETS.items():
        data, _ = make_structured(**kw)
        np.savez_compressed(
            out / f"{name}.npz", dosage=data.dosage, chrom=np.asarray(data.chrom), pos=data.pos,
            ids=np.asarray(data.ids), ref=np.asarray(data.ref), alt=np.asarray(data.alt),
            samples=np.asarray(data.samples),
        )
        runs: list[list[str]] = []
        if name == "small":
            runs.append(["--vcf", "pooled.vcf", "--maf", "0.05", "--pca", "10", "--out", f"{name}.exact"])
        if name == "ld":
            runs.append(["--vcf", "pooled.vcf", "--set-all-var-ids", "@:#", "--maf", "0.05",
                         "--indep-pairwise", "50", "5", "0.2", "--out", name])
            runs.append(["--vcf", "pooled.vcf", "--set-all-var-ids", "@:#", "--maf", "0.05", "--extract",
                         f"{name}.prune.in", "--pca", "approx", "10", "--seed", "1", "--out", f"{name}.approx"])
        else:
            runs.append(["--vcf", "pooled.vcf", "--maf", "0.05", "--pca", "approx", "10", "--seed", "1",
                         "--out", f"{name}.approx"])
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            write_pooled_vcf(data, t / "pooled.vcf")
            for args_ in runs:
                if "--extract" in args_:
                    shutil.copy(out / f"{name}.prune.in", t / f"{name}.prune.in")
                run_plink2(args_, t)
                prefix = args_[args_.index("--out") + 1]
                for ext in ("eigenval", "eigenvec", "prune.in"):
                    if (t / f"{prefix}.{ext}").exists():
                        shutil.copy(t / f"{prefix}.{ext}", out / f"{prefix}.{ext}")
        commands[name] = [["plink2", *a] for a in runs]
        print(f"wrote {name}: {kw}")
    prov = {
        "script": "scripts/make_pca_fixtures.py",
        "plink2": plink_version(),
        "sets": SETS,
        "tree_F": TREE_F,
        "shares": SHARES,
        "commands": commands,
        "numpy": np.__version__,
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


if __name__ == "__main__":
    main()
