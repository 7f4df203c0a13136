"""Start a study from Hydra overrides on the configured federation (local, remote, in-process)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from fedgen.errors import FedgenError
from fedgen.study.plan import build_plan, compose_config

log = logging.getLogger("fedgen.study")


def run_study(overrides: list[str], *, base_dir: Path | None = None) -> dict[str, Any]:
    """Compose the config, run the study, and return its manifest (with ``output_dir``)."""
    cfg = compose_config(overrides)
    plan, node_configs = build_plan(cfg, base_dir=base_dir)
    return run_plan_on(plan, node_configs, cfg.federation)


def run_plan_on(plan: dict[str, Any], node_configs: dict[str, dict[str, str]], fed: Any) -> dict[str, Any]:
    mode = plan["federation"]
    log.info("study %s on %d sites (%s federation): %s", plan["name"], len(node_configs), mode, ", ".join(node_configs))
    if mode == "inprocess":
        from fedgen.federation.transport import InProcessTransport
        from fedgen.study.runner import run_plan

        run_plan(plan, InProcessTransport(node_configs))
    elif mode == "local":
        from fedgen.federation.local import run_study_local

        workdir = fed.get("workdir")
        if workdir:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            run_study_local(plan, node_configs, workdir=Path(workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="fedgen-flower-") as tmp:
                run_study_local(plan, node_configs, workdir=Path(tmp))
    elif mode == "remote":
        from fedgen.federation.local import submit_remote

        submit_remote(plan, fed=dict(fed))
    else:
        raise FedgenError(f"federation.mode {mode!r} is not one of local, remote, inprocess")
    manifest_path = Path(plan["output_dir"]) / "manifest.json"
    if not manifest_path.exists():
        raise FedgenError(f"the run finished but {manifest_path} was not written")
    manifest = json.loads(manifest_path.read_text())
    manifest["output_dir"] = plan["output_dir"]
    return manifest
