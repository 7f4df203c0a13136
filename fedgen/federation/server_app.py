"""Aggregator side of fedgen on Flower: run a study plan over the Grid.

``context.run_config["plan"]`` is the JSON text of the study plan (set by the
launcher with ``flwr run --run-config``). The outcome is written to
``plan["status_file"]`` (``{"status": "ok"}`` or ``{"status": "error",
"message": ...}``) and also printed as one ``STATUS_MARKER`` line, which reaches
the submitter through Flower's log stream when the status file is not on the
submitter's machine (remote SuperLink).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgen.errors import ConfigError, FedgenError

log = logging.getLogger("fedgen.server")

#: Prefix of the status line in the ServerApp log (followed by the status JSON).
STATUS_MARKER = "FEDGEN-STATUS "

DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 60.0

app = ServerApp()


def atomic_write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        from fedgen.fileio import public_mode

        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _setup_logging() -> None:
    """Send fedgen's INFO logs to stderr, which Flower streams to `flwr run --stream`."""
    root = logging.getLogger("fedgen")
    if not any(getattr(h, "_fedgen_serverapp", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fedgen %(levelname)s %(name)s: %(message)s"))
        handler._fedgen_serverapp = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def parse_plan(run_config: Any) -> dict[str, Any]:
    raw = run_config.get("plan", "") if run_config is not None else ""
    if not raw:
        raise ConfigError("the run has no study plan (run config 'plan' is empty)")
    try:
        plan = json.loads(str(raw))
    except ValueError as exc:
        raise ConfigError(f"the study plan is not valid JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise ConfigError("the study plan must be a JSON object")
    return plan


def ping_study(plan: dict[str, Any], transport: Any) -> dict[str, Any]:
    """Connectivity check (``plan["task"] == "ping"``): every site answers ``ping``.

    Writes ``output_dir/manifest.json`` with each site's answer (name, fedgen
    version) and reply size; touches no genotype data.
    """
    from fedgen.federation.transport import Request

    t0 = time.perf_counter()
    replies = transport.query(Request("ping"))
    manifest = {
        "task": "ping",
        "sites": {s: r.meta for s, r in replies.items()},
        "bytes_received": {s: r.nbytes for s, r in replies.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = Path(plan["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def rounds_study(plan: dict[str, Any], transport: Any) -> dict[str, Any]:
    """Round-latency benchmark (``plan["task"] == "rounds"``): ``n`` ping rounds, then ``n``
    rounds that carry ``payload_mb`` MB to each site (the ``ping`` analysis accepts and ignores
    a ``pad`` array). Per round: wall time, encode time, the slowest site's compute time and
    the time from push to the site starting its work (queue). Touches no genotype data.
    """
    from fedgen.federation.transport import Request

    n = int(plan.get("n", 20))
    mb = float(plan.get("payload_mb", 10.0))
    out: dict[str, Any] = {"task": "rounds", "n": n, "payload_mb": mb}
    pad = np.zeros(int(mb * 1e6), dtype=np.uint8)
    for label, arrays in (("ping", {}), ("payload", {"pad": pad})):
        rows = []
        for _ in range(n + 1):  # the first round warms up; not counted
            t0 = time.time()
            replies = transport.query(Request("ping", arrays=arrays))
            t1 = time.time()
            stats = getattr(transport, "last_round", {}) or {}
            site_start = [float(r.meta.get("site_t0", t0)) for r in replies.values()]
            site_cpu = [float(r.meta.get("site_seconds", 0.0)) for r in replies.values()]
            rows.append({
                "wall": t1 - t0,
                "encode": float(stats.get("encode", 0.0)),
                "queue": max(site_start) - t0 - float(stats.get("encode", 0.0)),
                "compute": max(site_cpu),
                "decode": float(stats.get("decode", 0.0)),
            })
        out[label] = rows[1:]
    o = Path(plan["output_dir"])
    o.mkdir(parents=True, exist_ok=True)
    atomic_write_json(o / "rounds.json", out)
    return out


def run_study(grid: Grid, plan: dict[str, Any]) -> dict[str, Any]:
    """Build the Flower transport for ``plan`` and run it; returns the manifest."""
    from fedgen.federation.flower import FlowerTransport

    sites = plan.get("sites")
    if sites is not None and (not isinstance(sites, list) or not all(isinstance(s, str) for s in sites)):
        raise ConfigError("plan 'sites' must be a list of site names")
    transport = FlowerTransport(
        grid,
        expected_sites=sites,
        connect_timeout=float(plan.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
        timeout=float(plan.get("timeout", DEFAULT_TIMEOUT)),
        poll_interval=float(plan.get("poll", 0.05)),
        max_poll_interval=float(plan.get("max_poll", 0.5)),
    )
    if plan.get("task") == "ping":
        return ping_study(plan, transport)
    if plan.get("task") == "rounds":
        return rounds_study(plan, transport)
    from fedgen.study.runner import run_plan

    _prewarm_imports()
    return run_plan(plan, transport)


# third-party packages a study imports only once its first results are in (P values, plots, the
# report): imported in the background while the sites open their genotypes, not between two
# rounds. Only packages that never import fedgen, and after fedgen's study modules are in, so
# that the two threads cannot wait on each other's half-imported modules
_LATE_IMPORTS = ("scipy.stats", "matplotlib", "matplotlib.pyplot", "pandas", "plotly.graph_objects")


def _prewarm_imports() -> None:
    import importlib
    import threading

    def run() -> None:
        for name in _LATE_IMPORTS:
            try:
                if name == "matplotlib.pyplot":
                    import matplotlib

                    matplotlib.use("Agg")  # as fedgen.results.plots chooses it
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - only a head start: the study imports what it needs itself
                log.debug("background import of %s failed", name, exc_info=True)

    threading.Thread(target=run, name="fedgen-prewarm", daemon=True).start()


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    from fedgen.federation.flwr_compat import fast_object_pulls

    fast_object_pulls()
    status_file: str | None = None
    try:
        plan = parse_plan(context.run_config)
        status_file = plan.get("status_file") or None
        log.info("study started (sites: %s)", ", ".join(map(str, plan.get("sites") or [])) or "any")
        run_study(grid, plan)
        status: dict[str, Any] = {"status": "ok"}
        log.info("study finished; results in %s", plan.get("output_dir"))
    except FedgenError as exc:
        status = {"status": "error", "message": str(exc)}
        log.error("study failed: %s", exc)
    except Exception as exc:  # noqa: BLE001 - report, don't crash without a status
        status = {"status": "error", "message": f"internal error: {type(exc).__name__}: {exc}"}
        log.error("study failed with an internal error:\n%s", traceback.format_exc())
    if status_file:
        try:
            atomic_write_json(status_file, status)
        except OSError as exc:
            log.error("could not write the status file %s: %s", status_file, exc)
    print(STATUS_MARKER + json.dumps(status), file=sys.stderr, flush=True)
