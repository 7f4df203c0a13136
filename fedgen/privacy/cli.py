"""``fedgen ledger --state-dir DIR [--json]``: a site's privacy spending, for its compliance officer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedgen.errors import FedgenError
from fedgen.privacy.ledger import LEDGER_FILE, Ledger

POLICY_FILE = "policy.toml"


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``ledger`` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "ledger",
        help="show a site's privacy budget and spending (from <state-dir>/ledger.sqlite)",
        description=(
            "Show a site's differential-privacy budget, the ε spent so far (committed releases and "
            "reservations not yet confirmed, which count as spent), what remains, and a per-study table."
        ),
    )
    p.add_argument("--state-dir", required=True, help="the site node's state folder (holds policy.toml and ledger.sqlite)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_ledger)
    return p


def ledger_report(state_dir: str | Path) -> dict[str, Any]:
    """The report ``fedgen ledger`` prints, as a dict. Creates no files.

    Raises
    ------
    FedgenError
        The state folder is missing, its policy is invalid, or its ledger is not a fedgen ledger.
    """
    from fedgen.node.policy import load_policy

    state = Path(state_dir)
    if not state.is_dir():
        raise FedgenError(f"state dir {state} does not exist or is not a folder")
    policy_path = state / POLICY_FILE
    effective = state / "policy.effective.json"  # what the site last answered under (written by its pipeline)
    source = None
    try:
        if policy_path.is_file():
            policy = load_policy(policy_path)
            source = str(policy_path.resolve())
        elif effective.is_file():
            rec = json.loads(effective.read_text())
            policy = load_policy(rec["policy"])
            source = f"{rec.get('source', 'inline policy')} as last used ({effective})"
        else:
            policy = load_policy(None)
    except (ValueError, KeyError, OSError) as exc:
        raise FedgenError(f"policy: {exc}") from None
    budget = float(policy["epsilon_budget"])
    delta = float(policy["delta"])
    ledger_path = state / LEDGER_FILE
    report: dict[str, Any] = {
        "state_dir": str(state.resolve()),
        "ledger": str(ledger_path.resolve()),
        "policy": source,
    }
    if not ledger_path.exists():
        summary = {
            "epsilon": 0.0,
            "delta": delta,
            "epsilon_budget": budget,
            "remaining": budget,
            "rho": 0.0,
            "releases": 0,
            "reserved": 0,
        }
        studies: list[dict[str, Any]] = []
        pending: list[dict[str, Any]] = []
        report["ledger_exists"] = False
    else:
        try:
            ledger = Ledger(ledger_path, epsilon_budget=budget, delta=delta, readonly=True)
            summary = ledger.spent()
            studies = ledger.by_study()
            pending = [
                {k: e[k] for k in ("id", "created", "study_id", "run_id", "analysis", "step", "epsilon_after")}
                for e in ledger.entries()
                if e["status"] == "reserved"
            ]
        except ValueError as exc:
            raise FedgenError(str(exc)) from None
        report["ledger_exists"] = True
    report.update(summary)
    report["studies"] = studies
    report["pending"] = pending
    return report


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def format_report(r: dict[str, Any]) -> str:
    """The report as text for people."""
    lines = [
        f"Privacy ledger of {r['state_dir']}",
        f"  policy:      {r['policy'] or 'none (default policy)'}",
        f"  ledger:      {r['ledger']}" + ("" if r["ledger_exists"] else " (not created yet: nothing spent)"),
        f"  budget:      ε = {_fmt(r['epsilon_budget'])} at δ = {r['delta']:g}",
        f"  spent:       ε = {_fmt(r['epsilon'])}  (ρ = {_fmt(r['rho'])} zCDP)",
        f"  remaining:   ε = {_fmt(r['remaining'])}",
        f"  releases:    {r['releases']} committed, {r['reserved']} pending reservation"
        + ("s" if r["reserved"] != 1 else ""),
    ]
    if r["reserved"]:
        lines.append("               (pending reservations count as spent: their release may have left the site)")
    lines.append("  accounting:  RDP (dp_accounting), add/remove-one individual; studies compose into the site total")
    if r["studies"]:
        rows = [("study", "releases", "pending", "ε (study alone)", "analyses")]
        for s in r["studies"]:
            rows.append(
                (s["study_id"] or "(none)", str(s["releases"]), str(s["reserved"]), _fmt(s["epsilon"]), ", ".join(s["analyses"]))
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.append("")
        for k, row in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
            if k == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
    if r["pending"]:
        lines.append("")
        lines.append("  pending reservations:")
        for p in r["pending"]:
            lines.append(
                f"    #{p['id']} {p['created']} study {p['study_id'] or '(none)'} run {p['run_id'] or '-'} "
                f"{p['analysis'] or '-'}/{p['step'] or '-'}"
            )
    return "\n".join(lines)


def cmd_ledger(args: argparse.Namespace) -> int:
    """Print the ledger report; 0 on success, 2 (one-line error on stderr) on a bad state dir."""
    try:
        report = ledger_report(args.state_dir)
    except FedgenError as exc:
        print(f"fedgen ledger: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0
