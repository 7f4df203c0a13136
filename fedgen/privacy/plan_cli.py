"""``fedgen dp plan``: what a DP study's releases will be worth, before any ε is spent.

    fedgen dp plan --sites hk=1500:700,sz=2000:950 --variants 30000 --epsilon 1

Sites are ``NAME=SAMPLES[:CASES]`` (cases default to half): counts coarse enough to be public,
or given by the operator. The settings mirror ``privacy=dp`` (``--epsilon``, ``--delta``,
``--topk``, ``--split``) and ``study.dp.panel`` (``--variants`` is the number of variants
released, a panel's size with a panel). The top-k prediction assumes ``--causal`` loci at
``--maf`` with per-allele odds ratio ``--odds-ratio``; ``--exact-loci`` says how many of them the
exact top-k holds, when known (linkage lets proxies of strong loci take exact top-k slots, which the
planner's independent-variant model does not see). Exit status 3 when some release is
predicted to be no better than knowing nothing (the study would refuse it by default).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedgen.errors import FedgenError


def _sites(text: str) -> dict[str, tuple[int, int, int]]:
    out: dict[str, tuple[int, int, int]] = {}
    for part in str(text).split(","):
        name, _, rest = part.strip().partition("=")
        n_text, _, c_text = rest.partition(":")
        if not name or not n_text.isdigit() or int(n_text) < 2 or (c_text and not c_text.isdigit()):
            raise FedgenError(f"--sites: expected NAME=SAMPLES[:CASES],..., got {part!r}")
        n = int(n_text)
        cases = int(c_text) if c_text else n // 2
        if not 0 < cases < n:
            raise FedgenError(f"--sites: {name}: cases must be between 1 and SAMPLES-1, got {cases}")
        out[name] = (n, cases, n - cases)
    return out


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dp", help="differential-privacy tools (fedgen dp plan)")
    sub = p.add_subparsers(dest="dp_command", required=True)
    q = sub.add_parser("plan", help="predict the error and top-k recall of a DP study's releases before any ε is spent",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--sites", required=True, help="NAME=SAMPLES[:CASES],... (public sizes per site)")
    q.add_argument("--variants", type=int, required=True, help="variants released (the panel's size with a panel)")
    q.add_argument("--candidates", type=int, default=None, help="variants the top-k ranks (default --variants)")
    q.add_argument("--epsilon", type=float, default=1.0, help="ε per site for the whole study (default 1)")
    q.add_argument("--delta", type=float, default=1e-6)
    q.add_argument("--topk", type=int, default=10)
    q.add_argument("--select-k", type=int, default=None, help="candidates each site picks (privacy.select_k; default --topk)")
    q.add_argument("--no-topk", action="store_true", help="no top-k release (frequencies only)")
    q.add_argument("--assoc", action="store_true", help="also the allelic test of every variant (study analyses: assoc)")
    q.add_argument("--split", default=None, help="counts=0.2,assoc=0.2,select=0.5,topk=0.1 (privacy.split)")
    q.add_argument("--phenotypes", type=int, default=1)
    q.add_argument("--causal", type=int, default=10, help="causal loci assumed for the top-k prediction (default 10)")
    q.add_argument("--maf", type=float, default=0.2, help="their allele frequency (default 0.2)")
    q.add_argument("--odds-ratio", type=float, default=1.3, help="their per-allele odds ratio (default 1.3)")
    q.add_argument("--exact-loci", type=int, default=None,
                   help="how many of the causal loci the exact top-k holds, if known (e.g. from an exact study of "
                        "similar size): the recall and count are then predicted for those loci")
    q.add_argument("--af-spectrum", choices=("neutral", "uniform"), default="neutral")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    q.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from fedgen.privacy.planner import describe, plan_dp
    from fedgen.study.dp import DEFAULT_SPLIT, planner_inputs

    split = dict(DEFAULT_SPLIT)
    if args.split:
        for part in args.split.split(","):
            k, _, v = part.partition("=")
            if k.strip() not in split:
                raise FedgenError(f"--split: unknown share {k!r} (known: {', '.join(split)})")
            try:
                split[k.strip()] = float(v)
            except ValueError:
                raise FedgenError(f"--split: {part!r} is not NAME=NUMBER") from None
    if not (args.epsilon > 0 and 0 < args.delta < 1 and args.variants >= 1 and args.topk >= 1):
        raise FedgenError("--epsilon must be > 0, --delta in (0, 1), --variants and --topk at least 1")
    if args.exact_loci is not None and not 0 <= args.exact_loci <= args.causal:
        raise FedgenError(f"--exact-loci must be between 0 and --causal ({args.causal}), got {args.exact_loci}")
    priv = {"epsilon": args.epsilon, "delta": args.delta, "split": split, "topk": args.topk, "select_k": args.select_k,
            "planner": {"n_causal": args.causal, "maf": args.maf, "odds_ratio": args.odds_ratio, "af_spectrum": args.af_spectrum,
                        **({"exact_loci": args.exact_loci} if args.exact_loci is not None else {})}}
    sites, settings, eff = planner_inputs(priv, _sites(args.sites), n_variants=args.variants, phenotypes=args.phenotypes,
                                          assoc=args.assoc, topk=not args.no_topk)
    if args.candidates:
        settings.n_candidates = args.candidates
    plan = plan_dp(sites, settings, eff)
    print(json.dumps(plan, indent=1) if args.json else describe(plan))
    return 0 if all(r["useful"] for r in plan["releases"]) else 3
