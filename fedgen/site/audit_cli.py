"""``fedgen audit --state-dir DIR``: what left a site, per study, for a compliance officer."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from fedgen.site import audit


def summarise(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Totals overall and per study: messages sent / refused / failed, bytes, ε, analyses."""
    studies: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"sent": 0, "refused": 0, "error": 0, "bytes": 0, "epsilon": 0.0, "analyses": defaultdict(int),
                 "runs": set(), "first": None, "last": None, "events": [], "delta": 0.0}
    )
    refusals: list[dict[str, Any]] = []
    total = {"entries": 0, "sent": 0, "refused": 0, "error": 0, "bytes": 0}
    for e in entries:
        total["entries"] += 1
        d = str(e.get("decision"))
        sid = str(e.get("study_id") or "(no study id)")
        s = studies[sid]
        if d in ("sent", "refused", "error"):
            s[d] += 1
            total[d] += 1
        if d == "sent":
            s["bytes"] += int(e.get("bytes") or 0)
            total["bytes"] += int(e.get("bytes") or 0)
            s["events"] += list(e.get("events") or [])
            s["delta"] = max(s["delta"], float(e.get("delta") or 0.0))
            s["analyses"][str(e.get("analysis"))] += 1
        if d in ("refused", "error"):
            refusals.append({k: e.get(k) for k in ("time", "site", "run_id", "study_id", "message_type", "analysis", "decision", "reason")})
        if e.get("run_id"):
            s["runs"].add(str(e["run_id"]))
        t = e.get("time")
        s["first"] = s["first"] or t
        s["last"] = t or s["last"]
    from fedgen.privacy.accounting import compose_epsilon

    for s in studies.values():  # the study's releases composed (RDP), as the site's ledger does
        s["epsilon"] = compose_epsilon(s["events"], s["delta"]) if s["events"] else 0.0
    out_studies = {
        sid: {**{k: v for k, v in s.items() if k not in ("analyses", "runs", "events")}, "analyses": dict(s["analyses"]),
              "runs": sorted(s["runs"])}
        for sid, s in studies.items()
    }
    return {"total": total, "studies": out_studies, "refusals": refusals}


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_audit(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).expanduser()
    if not state.is_dir():
        print(f"fedgen: error: {state}: no such state folder", file=sys.stderr)
        return 2
    if not (state / audit.AUDIT_LOG).exists():
        print(f"fedgen: error: {state / audit.AUDIT_LOG}: no audit log (this site has sent nothing yet)", file=sys.stderr)
        return 2
    try:
        entries = list(audit.read(state))
    except ValueError as exc:
        print(f"fedgen: error: {exc}", file=sys.stderr)
        return 2
    if args.study:
        entries = [e for e in entries if str(e.get("study_id")) == args.study]
    summary = summarise(entries)
    problems = audit.verify(state) if args.verify else None
    if args.json:
        print(json.dumps({**summary, "verified": None if problems is None else not problems, "problems": problems}, indent=2))
    else:
        t = summary["total"]
        print(f"Audit log {state / audit.AUDIT_LOG}: {t['entries']} entries")
        print(f"  sent {t['sent']} replies ({_human(t['bytes'])}), refused {t['refused']}, failed {t['error']}")
        print()
        print(f"  {'study':34} {'sent':>6} {'refused':>8} {'failed':>7} {'bytes':>10} {'epsilon':>8}  analyses")
        for sid, s in summary["studies"].items():
            an = ", ".join(f"{a}×{n}" for a, n in sorted(s["analyses"].items()))
            print(f"  {sid[:34]:34} {s['sent']:>6} {s['refused']:>8} {s['error']:>7} {_human(s['bytes']):>10} {s['epsilon']:>8.3g}  {an}")
        if summary["refusals"]:
            print()
            print("  Refused or failed:")
            for r in summary["refusals"]:
                what = r.get("analysis") or r.get("message_type")
                print(f"    {r['time']}  run {r.get('run_id') or '-'}  {what}: {r.get('reason')}")
        if problems is not None:
            print()
            if problems:
                print("  VERIFY FAILED:")
                for p in problems:
                    print(f"    {p}")
            else:
                kept = len(list((state / audit.PAYLOAD_DIR).glob("*.npz"))) if (state / audit.PAYLOAD_DIR).is_dir() else 0
                print(f"  Verified: hash chain intact; {kept} kept payloads match their SHA-256")
        print(f"  Chain head: {audit.head(state)}  (write it down outside the site to anchor the log)")
    return 1 if problems else 0


def add_command(sub: Any) -> None:
    a = sub.add_parser("audit", help="summarise (and verify) a site's egress audit log")
    a.add_argument("--state-dir", required=True, help="the site's state folder (holds audit.jsonl)")
    a.add_argument("--study", help="only this study id")
    a.add_argument("--verify", action="store_true", help="check the hash chain and the kept payloads")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_audit)
