"""Membership inference from exact per-site allele frequencies (Homer et al. 2008; Sankararaman et al. 2009).

What any exact QC release (``genotype_counts``) allows: with a reference panel of the same
population, the likelihood-ratio score Σ_j [x_j log(p̂_j / r_j) + (2 − x_j) log((1 − p̂_j)/(1 − r_j))]
of a person's genotypes x against the site's frequencies p̂ and the reference r separates the
site's members from non-members once the number of variants is large against the site's size.
fedgen's exact mode therefore does not hide cohort *membership*; a site for which membership is
itself sensitive answers only differentially private releases (a DP-only policy).

Run: ``python scripts/attack_af_membership.py [variants] [site size] [reference size]``.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> None:
    V, N, R = (int(x) for x in (sys.argv[1:4] if len(sys.argv) > 3 else (3135, 297, 1000)))
    rng = np.random.default_rng(2)
    p = rng.beta(1, 3, V).clip(0.02, 0.98)

    def people(n: int) -> np.ndarray:
        return (rng.random((V, n)) < p[:, None]).astype(float) + (rng.random((V, n)) < p[:, None])

    site, outsiders, ref = people(N), people(300), people(R)
    ps = (site.mean(1) / 2).clip(1e-3, 1 - 1e-3)
    pr = (ref.mean(1) / 2).clip(1 / (2 * R), 1 - 1 / (2 * R))
    w1, w0 = np.log(ps / pr), np.log((1 - ps) / (1 - pr))
    score = lambda X: (X * w1[:, None] + (2 - X) * w0[:, None]).sum(0)  # noqa: E731
    a, b = score(site[:, :300]), score(outsiders)
    print(f"variants {V}, site {N} people, reference panel {R}: membership AUC {(a[:, None] > b[None, :]).mean():.3f}")


if __name__ == "__main__":
    main()
