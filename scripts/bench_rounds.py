#!/usr/bin/env python
"""Round latency of a local federation: what one message round costs, and where it goes.

Starts a real SuperLink and SuperNodes (default 2 sites) on loopback and runs the ``rounds``
task: ``--n`` ping rounds, then ``--n`` rounds that each carry ``--mb`` MB to every site (the
``ping`` analysis accepts and ignores a ``pad`` array). No genotype data is touched. For each
kind it prints the median and 90th percentile of

* ``wall``: the round as the aggregator sees it (request out → every reply decoded);
* ``encode``: building the messages at the aggregator;
* ``queue``: from the push to the moment a site's ClientApp starts on it (SuperLink hop,
  SuperNode poll, task hand-over to the site worker, pulling the inputs);
* ``compute``: the site's pipeline (validate → rules → analysis → egress → audit);
* ``return``: the reply's way back (SuperNode → SuperLink → aggregator poll);
* ``decode``: decoding the replies at the aggregator;

and checks them against the targets (ping ≤ 50 ms, 10 MB ≤ 300 ms per round). Timing only;
nothing here is a test. Run: ``python scripts/bench_rounds.py [--n 30] [--mb 10] [--sites 2]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fedgen.federation.local import LocalFederation

TARGETS = {"ping": 0.050, "payload": 0.300}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="rounds of each kind (after one warm-up round)")
    ap.add_argument("--mb", type=float, default=10.0, help="MB carried to each site by a payload round")
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--keep", help="keep the federation's folder (logs) here")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-rounds-"))
    sites = {f"site{k + 1}": {} for k in range(args.sites)}
    t0 = time.perf_counter()
    with LocalFederation(sites, workdir=work) as fed:
        t_up = time.perf_counter() - t0
        fed.run({"task": "rounds", "n": args.n, "payload_mb": args.mb, "output_dir": str(work / "out"),
                 "poll": 0.005, "max_poll": 0.5})
    r = json.loads((work / "out" / "rounds.json").read_text())
    print(f"local federation: {args.sites} sites on loopback, up in {t_up:.1f} s; {args.n} rounds of each kind")
    cols = ["wall", "encode", "queue", "compute", "return", "decode"]
    print(f"{'round':18}" + "".join(f"{c:>16}" for c in cols))
    ok = True
    for kind, label in (("ping", "ping"), ("payload", f"{args.mb:g} MB per site")):
        rows = r[kind]
        for row in rows:
            row["return"] = max(row["wall"] - row["encode"] - row["queue"] - row["compute"] - row["decode"], 0.0)
        cells = []
        for c in cols:
            x = np.array([row[c] for row in rows]) * 1000
            cells.append(f"{np.median(x):7.1f}/{np.percentile(x, 90):6.1f} ms")
        print(f"{label:18}" + "".join(f"{c:>16}" for c in cells))
        med = float(np.median([row["wall"] for row in rows]))
        met = med <= TARGETS[kind]
        ok &= met
        print(f"{'':18}median wall {med * 1000:.1f} ms, target <= {TARGETS[kind] * 1000:.0f} ms: {'met' if met else 'NOT met'}")
    print("(cells: median/90th percentile)")
    print("all round-latency targets met" if ok else "some round-latency targets not met")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
