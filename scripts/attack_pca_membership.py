"""Membership inference from an honest federated PCA transcript, against the rank it reveals.

The aggregator sees each site's exact product ``Y_s = Z_s Z_sᵀ Q`` every round. For a person
whose genotypes it holds (a known patient, a relative, a public genome), it projects their
standardised genotype vector ``z`` onto the span of the site's products: members lie in the span
of the site's own samples, non-members only share its population structure. The score is
``‖P z‖² / ‖z‖²``; the AUC separates members of site 1 from people of the same populations who
are in no site.

Run: ``python scripts/attack_pca_membership.py [--variants 3000] [--samples 250]``. It runs the
real site code (fedgen's registered ``pca_product``) through the in-process transport with the
honest block Krylov driver, and prints the AUC after each round with the rank revealed so far.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fedgen.federation.transport import InProcessTransport, Request
from fedgen.stats import pca as pcastats
from fedgen.testing import make_synth, write_samples, write_vcf


def auc(members: np.ndarray, others: np.ndarray) -> float:
    return float((members[:, None] > others[None, :]).mean() + 0.5 * (members[:, None] == others[None, :]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=250, help="samples per site (two sites, plus as many non-members)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    n = args.samples
    data = make_synth(3 * n, args.variants, seed=5, missing_rate=0.0, extremes=False)
    tmp = Path(tempfile.mkdtemp(prefix="fedgen-pca-attack-"))
    nodes = {}
    open_policy = json.dumps({"extra_analyses": ["pca_product"], "pca_rank_per_study": 100.0, "pca_rank_lifetime": 1e6})
    for s, cols in (("site1", np.arange(n)), ("site2", np.arange(n, 2 * n))):
        (tmp / s).mkdir()
        write_vcf(data, tmp / s / "g.vcf.gz", cols=cols, with_multiallelic=False)
        write_samples(data, tmp / s / "samples.tsv", cols)
        nodes[s] = {"site": s, "vcf": str(tmp / s / "g.vcf.gz"), "samples": str(tmp / s / "samples.tsv"),
                    "state_dir": str(tmp / s / "state"), "policy": open_policy}
    g = data.dosage[:, : 2 * n].astype(float)
    f = g.mean(1) / 2
    use = (f > 0.05) & (f < 0.95)
    V = int(use.sum())
    sd = np.sqrt(2 * f[use] * (1 - f[use]))
    Z = lambda cols: (data.dosage[use][:, cols] - 2 * f[use][:, None]) / sd[:, None]  # noqa: E731
    z_members, z_out = Z(np.arange(n)), Z(np.arange(2 * n, 3 * n))
    tr = InProcessTransport(nodes)
    drv = pcastats.BlockKrylovPCA(V, args.k, seed=1, max_rounds=args.rounds)
    idx = {s: {"idx": np.flatnonzero(use).astype(np.int64), "flip": np.zeros(V, np.uint8)} for s in nodes}
    seen = []
    print(f"{V} variants, {n} samples per site, k = {args.k}, {drv.block} basis columns per round")
    print("round  rank revealed  membership AUC (site 1 members vs non-members)")
    while not drv.done:
        reps = tr.query(Request("pca_product", arrays={"freq": f[use], "basis": drv.basis}, per_site_arrays=idx,
                                study_id="honest"))
        seen.append(reps["site1"].arrays["product"])
        U = np.linalg.svd(np.hstack(seen), full_matrices=False)[0]
        score = lambda z: ((U.T @ z) ** 2).sum(0) / (z**2).sum(0)  # noqa: E731
        print(f"{drv.rounds + 1:5d}  {sum(y.shape[1] for y in seen):13d}  {auc(score(z_members), score(z_out)):.3f}")
        drv.update(sum(r.arrays["product"] for r in reps.values()))


if __name__ == "__main__":
    main()
