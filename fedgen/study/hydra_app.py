"""``fedgen run``: a real Hydra application.

``fedgen run [OVERRIDES]`` is a ``@hydra.main`` app over ``fedgen/conf``: ``--help`` lists the
config groups, ``--cfg job`` prints the composed config without running anything, and ``-m``
(multirun) sweeps, e.g. ``fedgen run -m privacy=dp privacy.epsilon=1,4``.

A single run publishes to ``output_dir``. A sweep publishes each job to its own folder under
``output_dir`` (``<job number>-<overrides>``) and keeps ``sweep_summary.tsv`` there: one row per
job with its overrides, results folder, status and headline figures. A job that fails is
recorded as failed and the sweep goes on; the command then exits non-zero.

Hydra writes nothing of its own into results: no ``.hydra`` folder and no log file (the
manifest records the composed config); a sweep keeps Hydra's ``multirun.yaml`` in its folder.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import sys
from pathlib import Path
from typing import Any

from fedgen.errors import FedgenError

log = logging.getLogger("fedgen.study")

_state: dict[str, Any] = {"failed": 0}


def _safe_name(text: str) -> str:
    """A folder name from a job's overrides (``privacy.epsilon=1,study=qc`` → same, minus '/')."""
    text = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(text)).strip("._")
    return text[:120] or "job"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("fedgen_safe"):
        OmegaConf.register_new_resolver("fedgen_safe", _safe_name)


def _warn_dropped(manifest: dict[str, Any]) -> None:
    """Say on stderr which sites dropped out (federation.min_sites) and whom the results are over."""
    for d in manifest.get("dropped") or []:
        print(f"fedgen: warning: site {d['site']} dropped out during {d['phase']} ({d['reason']}); every result is "
              f"over {', '.join(manifest.get('sites') or [])} only (federation.min_sites={manifest.get('min_sites')})",
              file=sys.stderr)


def _headline(manifest: dict[str, Any]) -> dict[str, Any]:
    """The figures a sweep summary shows per job (those the study that ran has)."""
    variants = manifest.get("variants") or {}
    out: dict[str, Any] = {"samples": manifest.get("samples_total", ""), "variants_pass": variants.get("qc_pass", "")}
    for pheno, summary in (manifest.get("association") or {}).items():
        if isinstance(summary, dict) and summary.get("lambda_gc") is not None:
            out[f"lambda_gc_{pheno}"] = summary["lambda_gc"]
    for site, info in (manifest.get("sites") or {}).items():
        if isinstance(info, dict) and info.get("epsilon_spent") is not None:
            out[f"epsilon_spent_{site}"] = round(float(info["epsilon_spent"]), 6)
    for d in manifest.get("dropped") or []:
        out[f"epsilon_spent_{d['site']}"] = round(float(d.get("epsilon_spent") or 0.0), 6)
    out["rounds"] = manifest.get("rounds", "")
    out["wall_seconds"] = manifest.get("wall_seconds", "")
    return out


def _append_summary(sweep_dir: Path, row: dict[str, Any]) -> None:
    from fedgen.fileio import atomic_write_text

    path = sweep_dir / "sweep_summary.tsv"
    rows: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    rows = [r for r in rows if r.get("job") != str(row["job"])] + [row]
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter="\t", lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _task(cfg: Any) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from fedgen.study.launch import run_plan_on
    from fedgen.study.plan import build_plan

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        try:
            plan, node_configs = build_plan(cfg)
            manifest = run_plan_on(plan, node_configs, cfg.federation)
        except FedgenError as exc:  # our message, exit 2 (Hydra would print its own and exit 1)
            print(f"fedgen: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        _warn_dropped(manifest)
        print(f"Results: {manifest['output_dir']}")
        return
    job_dir = Path(hc.runtime.output_dir)
    with open_dict(cfg):
        cfg.output_dir = str(job_dir)
    overrides = ",".join(hc.overrides.task)
    row: dict[str, Any] = {"job": hc.job.num, "overrides": overrides, "output_dir": str(job_dir)}
    try:
        plan, node_configs = build_plan(cfg)
        manifest = run_plan_on(plan, node_configs, cfg.federation)
    except FedgenError as exc:
        _state["failed"] += 1
        row["status"] = f"failed: {exc}"
        print(f"fedgen: job {hc.job.num} ({overrides}) failed: {exc}", file=sys.stderr)
    else:
        row["status"] = "ok" + "".join(f" (dropped: {d['site']})" for d in manifest.get("dropped") or [])
        row.update(_headline(manifest))
        _warn_dropped(manifest)
        print(f"Results: {manifest['output_dir']}")
    _append_summary(job_dir.parent, row)


def run_hydra(args: list[str]) -> int:
    """Run ``fedgen run ARGS`` as a Hydra application; returns the exit code."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    from fedgen.study.plan import CONF_DIR

    _register_resolvers()
    _state["failed"] = 0
    app = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    saved = sys.argv
    sys.argv = ["fedgen run", *args]
    GlobalHydra.instance().clear()
    try:
        app()
    except SystemExit as exc:  # Hydra reports config errors itself (no traceback) and exits 1
        code = exc.code if isinstance(exc.code, int) else 1
        return 2 if code == 1 else code
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return 1 if _state["failed"] else 0
