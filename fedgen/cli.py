"""The ``fedgen`` command: simulate cohorts, run studies."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedgen.errors import FedgenError

log = logging.getLogger("fedgen")


def setup_logging(level: str = "INFO") -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    # logs go to stderr: stdout carries command output (e.g. `fedgen ledger --json`)
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    for noisy in ("flwr", "grpc", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parse_sites(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise FedgenError(f"--sites: expected NAME=N[,NAME=N...], got {text!r}")
        out[name.strip()] = int(n)
    return out


#: top-level modules of the `study` extra (aggregator/analyst side), absent on a site-node install
_STUDY_MODULES = frozenset({"hydra", "omegaconf", "yaml", "msprime", "tskit", "matplotlib", "plotly", "pandas", "sklearn"})


def _need_study_extra(exc: ImportError, command: str) -> FedgenError:
    """The error for a study-side command run on a site-node install; re-raises any other ImportError."""
    missing = (exc.name or "").partition(".")[0]
    if missing not in _STUDY_MODULES:
        raise exc
    return FedgenError(f"fedgen {command} needs the study extra (module {missing!r} is not installed): "
                       "pip install 'fedgen[study]'")


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        from fedgen.simulate import simulate_cohorts
    except ImportError as exc:
        raise _need_study_extra(exc, "simulate") from None

    sites = _parse_sites(args.sites)
    summary = simulate_cohorts(Path(args.out), sites=sites, n_variants=args.variants, seed=args.seed,
                               rare_fraction=args.rare_fraction, n_chrx=args.chrx)
    log.info("simulated cohorts written to %s: %s", Path(args.out).resolve(), summary)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        import hydra  # noqa: F401  (the study extra: fedgen run is a Hydra app)

        from fedgen.study.hydra_app import run_hydra
    except ImportError as exc:
        raise _need_study_extra(exc, "run") from None
    return run_hydra(list(args.overrides))


def _version_text() -> str:
    import importlib.metadata as md

    import fedgen

    try:
        flwr = md.version("flwr")
    except md.PackageNotFoundError:  # pragma: no cover
        flwr = "not installed"
    return f"fedgen {fedgen.__version__} (flwr {flwr}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedgen", description="Federated genomic analysis across sites (PLINK-compatible).")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--version", action="version", version=_version_text())
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate Hong Kong/Shenzhen-like cohorts (VCF + samples table per site)")
    s.add_argument("--out", required=True, help="output folder; one subfolder per site")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--sites", default="hk=2000,sz=2000", help="NAME=N,... (default hk=2000,sz=2000)")
    s.add_argument("--variants", type=int, default=30000, help="variants with MAF >= 1%% (default 30000)")
    s.add_argument("--rare-fraction", type=float, default=0.05,
                   help="rarer variants (MAF < 1%%) added, as a fraction of --variants (default 0.05)")
    s.add_argument("--chrx", type=int, default=0, metavar="N",
                   help="also N chrX variants with MAF >= 1%% (women diploid, men haploid; default 0)")
    s.set_defaults(func=cmd_simulate)
    r = sub.add_parser("run", add_help=False,
                       help="run a study (a Hydra app): fedgen run [--help] [--cfg job] [-m] [OVERRIDES]")
    r.add_argument("overrides", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    from fedgen.site.audit_cli import add_command as add_audit

    add_audit(sub)
    from fedgen.learn.score import add_command as add_score

    add_score(sub)
    from fedgen.privacy.cli import add_command as add_ledger

    add_ledger(sub)
    from fedgen.privacy.plan_cli import add_command as add_dp

    add_dp(sub)
    from fedgen.results.cli import add_command as add_plot

    add_plot(sub)
    try:  # site-node and aggregator commands (fedgen node ..., fedgen aggregator ...)
        from fedgen.node.cli import add_commands
    except ImportError:
        pass
    else:
        add_commands(sub)
    return p


def _split_run(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``fedgen [GLOBAL OPTIONS] run ARGS``: everything after ``run`` goes to Hydra untouched
    (argparse would take ``--help``, ``--cfg`` and ``-m`` for its own)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    if i < len(argv) and argv[i] == "run":
        return argv[: i + 1], argv[i + 1 :]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, hydra_args = _split_run(argv)
    args = build_parser().parse_args(argv)
    if hydra_args is not None:
        args.overrides = hydra_args
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except FedgenError as exc:
        print(f"fedgen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
