"""``fedgen plot ...``: plots from a results folder (``fedgen plot region RESULTS CHR:POS``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plot", help="plots from a results folder (fedgen plot region RESULTS CHR:POS)")
    sub = p.add_subparsers(dest="plot_command", required=True)
    r = sub.add_parser("region", help="regional plot of -log10 P around a variant: a PNG and an interactive HTML")
    r.add_argument("results", help="results folder of a study with association results")
    r.add_argument("locus", metavar="CHR:POS", help="position of the lead variant, e.g. 1:12345 or chr1:12,345")
    r.add_argument("--phenotype", default=None,
                   help="phenotype to plot (default: the one with the smallest P at CHR:POS)")
    r.add_argument("--window", type=int, default=500_000, help="bp either side of CHR:POS (default 500000)")
    r.add_argument("--out", default=None,
                   help="output path without suffix (FILE.png and FILE.html are written; "
                        "default RESULTS/plots/region_<phenotype>_<chr>_<pos>)")
    r.set_defaults(func=cmd_region)
    return p


def cmd_region(args: argparse.Namespace) -> int:
    try:
        from fedgen.results.report import p_text, plot_region
    except ImportError as exc:
        from fedgen.cli import _need_study_extra

        raise _need_study_extra(exc, "plot") from None

    r = plot_region(args.results, args.locus, phenotype=args.phenotype, window=args.window, out=args.out)
    print(f"{r['phenotype']}: lead {r['id']} at {r['chrom']}:{r['pos']} (P = {p_text(r['mlog10p'])}), "
          f"{r['variants']} variants within {args.window} bp -> {r['png']}, {r['html']}")
    return 0
