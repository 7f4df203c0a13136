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

from fedgen.testing import make_synth, run_plink2, write_pooled_vcf

HERE = Path(__file__).resolve().parent.parent / "tests" / "data" / "qc"
CASES = {"small": dict(n_samples=257, n_variants=300, seed=11), "medium": dict(n_samples=811, n_variants=700, seed=12)}


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    for name, kw in CASES.items():
        data = make_synth(**kw)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            write_pooled_vcf(data, t / "pooled.vcf")
            run_plink2(["--vcf", "pooled.vcf", "--freq", "--missing", "variant-only", "--hardy", "--out", "ref"], t)
            for ext in ("afreq", "vmiss", "hardy"):
                shutil.copy(t / f"ref.{ext}", HERE / f"{name}.{ext}")
        print(f"wrote {name}: {kw}")


if __name__ == "__main__":
    main()
