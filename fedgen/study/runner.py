"""Runs a study plan over a transport: QC, then the analyses the plan lists. (stub)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgen.federation.transport import Request, Transport


def run_plan(plan: dict[str, Any], transport: Transport) -> dict[str, Any]:
    """Run ``plan`` and write results to ``plan["output_dir"]``; returns the manifest."""
    replies = transport.query(Request("ping"))
    out = Path(plan["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"sites": {s: r.meta for s, r in replies.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
