"""Launchers: a real Flower federation on loopback, and study submission with `flwr run`.

:class:`LocalFederation` starts one ``flower-superlink`` and one
``flower-supernode`` per site on 127.0.0.1 (free ports, ``--insecure``, no
runtime dependency installation, private ``FLWR_HOME`` directories under
``workdir``) and stops every process it started, by PID, when it exits.

Each site's node config is written to ``workdir/nodes/<site>.toml`` and passed
as ``flower-supernode --node-config <that file>`` (Flower reads a single
``.toml`` path as the node config), so values with spaces or quotes need no
shell quoting; the ClientApp receives them as ``context.node_config``.

The study plan travels as the run config key ``plan`` (its JSON text), written
to a TOML file passed as ``flwr run --run-config <file>``. The ServerApp
reports the outcome in ``plan["status_file"]`` and in a ``FEDGEN-STATUS`` log
line (used when the status file is on another machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import IO, Any, Mapping

from fedgen.analyses.threads import available_cores
from fedgen.errors import ConfigError, FedgenError

log = logging.getLogger("fedgen.federation")
flower_log = logging.getLogger("fedgen.flower")

#: The Flower App template (pyproject.toml only); ``flwr run`` submits a copy carrying the
#: installed fedgen version (:func:`fedgen.federation.fab_gate.write_study_app`).
APP_DIR = Path(__file__).resolve().parent / "app"
LOCAL_CONNECTION = "fedgen-local"
REMOTE_CONNECTION = "fedgen-remote"
HOST = "127.0.0.1"
DEFAULT_RUN_TIMEOUT = 6 * 3600.0

_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_FEDGEN_LINE_RE = re.compile(r"^fedgen (DEBUG|INFO|WARNING|ERROR|CRITICAL) (fedgen[\w.]*): (.*)$")
_BIND_ERRORS = ("address already in use", "errno 98", "errno 48", "failed to start")


def _status_marker() -> str:
    from fedgen.federation.server_app import STATUS_MARKER

    return STATUS_MARKER


# ------------------------------------------------------------------ helpers


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, no telemetry/update check/installs."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            "PYTHONIOENCODING": "utf-8",
            # SuperExecs poll for new tasks adaptively (fedgen.federation.polling): from 2 ms after a
            # task, backing off to this cap (Flower's default is a fixed 1 s).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",
            "FEDGEN_SUPEREXEC_POLL": "0.002",
        }
    )
    # Make sure Flower's entry points from *this* environment are found first.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if extra:
        env.update(extra)
    return env


LOCAL_SUPERNODE_POLL = 0.005  # seconds; see fedgen.federation.supernode


def _site_blas_threads(n_sites: int) -> dict[str, str]:
    """BLAS threads per local site: the sites share this machine's cores.

    OpenBLAS threads spin while waiting; several sites each starting one per core
    oversubscribe the machine and slow every site several-fold.
    """
    per_site = max(1, (os.cpu_count() or 1) // max(1, n_sites))
    env = {k: str(per_site) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {k: v for k, v in env.items() if k not in os.environ}


def flower_cmd(name: str) -> str:
    """Absolute path of a Flower console script next to this interpreter (else from PATH)."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FedgenError(f"Flower command {name!r} not found; is flwr installed in this environment?")
    return found


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64_000))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(_ANSI_RE.sub("", text).splitlines()[-lines:])


def _write_toml(path: Path, data: Mapping[str, Any]) -> None:
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(tomli_w.dumps(dict(data)).encode("utf-8"))
    os.replace(tmp, path)


def write_connection(flwr_home: Path, name: str, *, address: str, insecure: bool, root_certificates: str | None = None) -> Path:
    """Add/replace SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (flwr 1.41 format)."""
    import tomllib

    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FedgenError(f"cannot read Flower config {path}: {exc}") from None
    superlink = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    superlink[name] = entry
    superlink.setdefault("default", name)
    _write_toml(path, data)
    return path


def _reserve_port(taken: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise FedgenError("could not find a free TCP port on 127.0.0.1")


def _http_ok(port: int, path: str = "/health", timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# Process supervision lives in fedgen.federation.supervise (psutil); re-exported here.
from fedgen.federation.supervise import ProcessSet  # noqa: E402
from fedgen.federation.supervise import sigterm_raises as _sigterm_raises  # noqa: E402


# ------------------------------------------------------------------ local federation


class LocalFederation:
    """A SuperLink plus one SuperNode per site on 127.0.0.1, as a context manager.

    ``node_configs`` maps site name → node config (string values; ``site`` is
    set to the site name when absent). Logs: ``workdir/logs/superlink.log``
    (also holds the ServerApp's output), ``workdir/logs/supernode-<site>.log``
    (also the ClientApps'), ``workdir/runs/flwr-run-*.log`` (``flwr run --stream``).
    Each process gets its own ``FLWR_HOME`` under ``workdir/flwr/`` (the
    ``flwr`` CLI uses ``workdir/flwr/cli``, whose ``config.toml`` holds the
    ``fedgen-local`` connection).
    """

    def __init__(
        self,
        node_configs: Mapping[str, Mapping[str, Any]],
        *,
        workdir: Path,
        startup_timeout: float = 60.0,
        port_attempts: int = 5,
    ) -> None:
        if not node_configs:
            raise ConfigError("a local federation needs at least one site")
        self.node_configs: dict[str, dict[str, str]] = {}
        for site, cfg in node_configs.items():
            site = str(site)
            if not _SITE_RE.match(site):
                raise ConfigError(f"site name {site!r}: use letters, digits, '-' or '_'")
            nc = {str(k): str(v) for k, v in dict(cfg).items()}
            if nc.setdefault("site", site) != site:
                raise ConfigError(f"site {site}: node config says site={nc['site']!r}")
            self.node_configs[site] = nc
        # every site runs on this machine: each gets its share of the cores for block work
        share = str(max(1, available_cores() // len(self.node_configs)))
        for nc in self.node_configs.values():
            if not nc.get("threads"):
                nc["threads"] = share
        self.workdir = Path(workdir).expanduser().resolve()
        self.startup_timeout = float(startup_timeout)
        self.port_attempts = int(port_attempts)
        self.logdir = self.workdir / "logs"
        self.flwr_root = self.workdir / "flwr"
        self.cli_home = self.flwr_root / "cli"
        self.superlink_port: int | None = None
        self.supernode_ports: dict[str, int] = {}
        self.logs: dict[str, Path] = {}
        self.procs = ProcessSet()
        self._ports: set[int] = set()
        self._stack: contextlib.ExitStack | None = None
        self._pending: dict[str, subprocess.Popen[Any]] = {}  # SuperNodes not yet answering their health check

    @property
    def control_address(self) -> str:
        if self.superlink_port is None:
            raise FedgenError("the local federation is not running")
        return f"{HOST}:{self.superlink_port}"

    def pids(self) -> list[int]:
        """PIDs of the processes this federation started directly."""
        return self.procs.pids()

    # -- lifecycle

    def __enter__(self) -> "LocalFederation":
        stack = contextlib.ExitStack()
        stack.enter_context(_sigterm_raises())
        stack.callback(self.stop)
        self._stack = stack
        try:
            self._start()
        except BaseException:
            stack.close()
            self._stack = None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def stop(self) -> None:
        """Stop every process started by this federation (safe to call twice)."""
        self.procs.stop()

    def _start(self) -> None:
        self._t0 = time.monotonic()
        for d in (self.logdir, self.flwr_root, self.workdir / "nodes"):
            d.mkdir(parents=True, exist_ok=True)
        self._start_superlink()
        # SuperNodes start in parallel; each is retried on its own if its port clashes.
        self._pending = {site: self._spawn_supernode(site) for site in self.node_configs}
        write_connection(self.cli_home, LOCAL_CONNECTION, address=self.control_address, insecure=True)
        self.wait_nodes()

    def wait_nodes(self) -> None:
        """Wait until every SuperNode answers its health check (restarting one whose port clashed)."""
        pending = self._pending
        attempts = dict.fromkeys(self.node_configs, 1)
        healthy: set[str] = set()  # answered /health once; done when it answers again while alive
        deadline = time.monotonic() + self.startup_timeout
        while pending:
            for site, proc in list(pending.items()):
                port = self.supernode_ports[site]
                if proc.poll() is not None:
                    healthy.discard(site)
                    text = _tail(self.logs[f"supernode-{site}"]).lower()
                    if attempts[site] < self.port_attempts and any(e in text for e in _BIND_ERRORS):
                        attempts[site] += 1
                        self.procs.stop_one(proc, grace=1.0)
                        pending[site] = self._spawn_supernode(site)
                        continue
                    raise FedgenError(
                        f"site {site}: flower-supernode exited with code {proc.returncode} during startup; "
                        f"log {self.logs[f'supernode-{site}']}:\n{_tail(self.logs[f'supernode-{site}'])}"
                    )
                if _http_ok(port):
                    if site in healthy:  # twice, 0.1 s apart: not a foreign server on a clashing port
                        del pending[site]
                    healthy.add(site)
            if pending and time.monotonic() > deadline:
                site = next(iter(pending))
                raise FedgenError(
                    f"site {site}: flower-supernode did not start within {self.startup_timeout:g} s; "
                    f"log {self.logs[f'supernode-{site}']}:\n{_tail(self.logs[f'supernode-{site}'])}"
                )
            if pending:
                time.sleep(0.1)
        log.info(
            "local federation up in %.1f s: SuperLink %s, SuperNodes %s",
            time.monotonic() - getattr(self, "_t0", time.monotonic()),
            self.control_address,
            ", ".join(f"{s}:{p}" for s, p in self.supernode_ports.items()),
        )

    def _start_superlink(self) -> None:
        logfile = self.logdir / "superlink.log"
        self.logs["superlink"] = logfile
        home = self.flwr_root / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, self.port_attempts + 1):
            port = _reserve_port(self._ports)
            argv = [
                sys.executable, "-P", "-m", "fedgen.federation.longpoll",  # flower-superlink with long polls
                "--insecure",
                "--host", HOST,
                "--port", str(port),
                "--disable-runtime-dependency-installation",
            ]  # fmt: skip
            with open(logfile, "ab") as fh:
                fh.write(f"\n=== fedgen: starting {' '.join(argv)}\n".encode())
                fh.flush()
                proc = self.procs.spawn("superlink", argv, env=flower_env(home), cwd=self.workdir, stdout=fh)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if _http_ok(port):
                    time.sleep(0.2)  # a port clash makes uvicorn exit right after binding fails
                    if proc.poll() is None:
                        self.superlink_port = port
                        return
                    break
                time.sleep(0.05)
            else:
                raise FedgenError(
                    f"flower-superlink did not become ready within {self.startup_timeout:g} s; "
                    f"log {logfile}:\n{_tail(logfile)}"
                )
            text = _tail(logfile).lower()
            self.procs.stop_one(proc, grace=1.0)
            if attempt < self.port_attempts and any(e in text for e in _BIND_ERRORS):
                log.debug("superlink port %d clashed; retrying", port)
                continue
            raise FedgenError(f"flower-superlink exited during startup; log {logfile}:\n{_tail(logfile)}")

    def _spawn_supernode(self, site: str) -> subprocess.Popen[Any]:
        cfg_file = self.workdir / "nodes" / f"{site}.toml"
        _write_toml(cfg_file, self.node_configs[site])
        logfile = self.logdir / f"supernode-{site}.log"
        self.logs[f"supernode-{site}"] = logfile
        home = self.flwr_root / f"supernode-{site}"
        home.mkdir(parents=True, exist_ok=True)
        port = _reserve_port(self._ports)
        self.supernode_ports[site] = port
        argv = [
            sys.executable, "-m", "fedgen.federation.supernode",
            "--insecure",
            "--superlink", self.control_address,
            "--host", HOST,
            "--port", str(port),
            "--node-config", str(cfg_file),
        ]  # fmt: skip
        with open(logfile, "ab") as fh:
            fh.write(f"\n=== fedgen: starting {' '.join(argv)}\n".encode())
            fh.flush()
            env = {
                **flower_env(home),
                "FEDGEN_SUPERNODE_POLL": str(LOCAL_SUPERNODE_POLL),
                "PYTHONSAFEPATH": "1",  # as deployed nodes: no current folder on sys.path
                **_site_blas_threads(len(self.node_configs)),
            }
            return self.procs.spawn(f"supernode-{site}", argv, env=env, cwd=self.workdir, stdout=fh)

    # -- running a study

    def run(self, plan: Mapping[str, Any], *, timeout: float = DEFAULT_RUN_TIMEOUT) -> None:
        """Submit ``plan`` to this federation with ``flwr run`` and wait for the outcome."""
        if self.superlink_port is None:
            raise FedgenError("the local federation is not running (use it as a context manager)")
        plan = dict(plan)
        plan.setdefault("sites", list(self.node_configs))
        rundir = self.workdir / "runs"
        rundir.mkdir(parents=True, exist_ok=True)
        if not plan.get("status_file"):
            plan["status_file"] = str(rundir / f"status-{uuid.uuid4().hex[:12]}.json")
        _submit_and_wait(
            plan,
            connection=LOCAL_CONNECTION,
            env=flower_env(self.cli_home),
            workdir=rundir,
            procs=self.procs,
            timeout=timeout,
            extra_logs=[self.logs["superlink"]],
        )


def run_study_local(
    plan: Mapping[str, Any],
    node_configs: Mapping[str, Mapping[str, Any]],
    *,
    workdir: Path,
    timeout: float | None = None,
) -> None:
    """Start a local federation for ``node_configs``, run ``plan`` on it, tear it down.

    ``timeout`` bounds the whole run (default: ``plan["run_timeout"]``, else 6 h).
    Raises :class:`FedgenError` with the ServerApp's message if the study failed.
    """
    timeout = float(timeout or plan.get("run_timeout") or DEFAULT_RUN_TIMEOUT)
    sites = list(plan.get("sites") or node_configs)
    missing = [s for s in sites if s not in node_configs]
    if missing:
        raise ConfigError(f"no node config for site(s) {', '.join(missing)} in a local run")
    plan = dict(plan)
    plan["sites"] = sites
    with LocalFederation({s: node_configs[s] for s in sites}, workdir=workdir) as fed:
        fed.run(plan, timeout=timeout)


def submit_remote(
    plan: Mapping[str, Any],
    *,
    control_address: str | None = None,
    flwr_home: Path | None = None,
    workdir: Path | None = None,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    connection: str = REMOTE_CONNECTION,
    timeout: float = DEFAULT_RUN_TIMEOUT,
    fed: Mapping[str, Any] | None = None,
) -> None:
    """Submit ``plan`` to an existing SuperLink (its Control API at ``control_address``).

    The connection is written to ``$FLWR_HOME/config.toml`` (``flwr_home``
    defaults to a private folder under ``workdir``; pass your own to reuse a
    ``flwr login``). Use ``root_certificates`` (CA PEM) for TLS, or
    ``insecure=True`` for plaintext. The outcome comes from the ServerApp's
    status line in the streamed log (and from ``plan["status_file"]`` if it is
    readable from here).

    ``fed`` (the ``federation`` config group: ``control_address``,
    ``root_certificates``, ``insecure``, ``run_timeout``, optional ``flwr_home``
    and ``workdir``) fills in whichever of those arguments were not given.
    """
    if fed:
        control_address = control_address or fed.get("control_address")
        root_certificates = root_certificates or fed.get("root_certificates") or None
        insecure = insecure or bool(fed.get("insecure"))
        flwr_home = flwr_home or fed.get("flwr_home") or None
        workdir = workdir or fed.get("workdir") or None
        if fed.get("run_timeout"):
            timeout = float(fed["run_timeout"])
    if not control_address:
        raise ConfigError("federation.control_address (host:port of the SuperLink's Control API) is not set")
    if not insecure and root_certificates is None:
        log.info("no root certificates given; the system CA bundle verifies %s", control_address)
    # Flower CLI home and run logs: by default beside the results, never in the current folder
    default_workdir = Path(str(plan.get("output_dir") or tempfile.gettempdir())).resolve().parent / ".fedgen-submit"
    workdir = Path(workdir or default_workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = Path(flwr_home).expanduser().resolve() if flwr_home else workdir / "flwr-home"
    write_connection(
        home,
        connection,
        address=control_address,
        insecure=insecure,
        root_certificates=str(root_certificates) if root_certificates else None,
    )
    procs = ProcessSet()
    try:
        with _sigterm_raises():
            _submit_and_wait(
                dict(plan),
                connection=connection,
                env=flower_env(home),
                workdir=workdir,
                procs=procs,
                timeout=timeout,
                extra_logs=[],
            )
    except FedgenError as exc:
        # `flwr run` reports every TLS problem as "connection unavailable"; say which it is.
        hint = _diagnose_connection(control_address, root_certificates, insecure) if "could not start" in str(exc) else None
        if hint:
            raise FedgenError(f"{hint}\n{exc}") from None
        raise
    finally:
        procs.stop()


def _diagnose_connection(address: str, root_certificates: str | Path | None, insecure: bool, timeout: float = 5.0) -> str | None:
    """Why a SuperLink's Control API at ``address`` cannot be used over TLS (None if it can)."""
    import ssl

    host, _, port_text = str(address).rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return f"federation.control_address {address!r} is not HOST:PORT"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return f"nothing listens on {address} (is the aggregator running?)"
    except OSError as exc:
        return f"cannot reach {address} ({exc.strerror or exc})"
    with sock:
        if insecure:
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(root_certificates) if root_certificates else None)
        except (OSError, ssl.SSLError) as exc:
            return f"cannot read federation.root_certificates {root_certificates} ({exc})"
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            which = f"the CA in {root_certificates}" if root_certificates else "the system CA bundle"
            return (
                f"the TLS certificate of {address} is not trusted by {which} ({exc.verify_message}); "
                "set federation.root_certificates to the study CA certificate (ca.pem)"
            )
        except (ssl.SSLError, OSError) as exc:
            return f"TLS handshake with {address} failed ({getattr(exc, 'reason', None) or exc}); does it serve TLS?"


# ------------------------------------------------------------------ flwr run


class _RunFollower:
    """Reads `flwr run --stream` output: run id, status line, log forwarding, tail."""

    def __init__(self, stream: IO[str], logfile: Path) -> None:
        self.run_id: str | None = None
        self.status: dict[str, Any] | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self._stream = stream
        self._logfile = logfile
        self._marker = _status_marker()
        self.thread = threading.Thread(target=self._read, name="fedgen-flwr-run", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with open(self._logfile, "a", encoding="utf-8") as out:
            for raw in self._stream:
                line = _ANSI_RE.sub("", raw.rstrip("\n"))
                out.write(line + "\n")
                out.flush()
                if not line.strip():
                    continue
                self.tail.append(line)
                if self.run_id is None and (m := _RUN_ID_RE.search(line)):
                    self.run_id = m.group(1)
                idx = line.find(self._marker)
                if idx >= 0:
                    with contextlib.suppress(ValueError):
                        status = json.loads(line[idx + len(self._marker) :])
                        if isinstance(status, dict):
                            self.status = status
                    continue
                if m := _FEDGEN_LINE_RE.match(line):
                    level, name, text = m.groups()
                    # The failure itself comes back as the FedgenError; don't log it twice.
                    lvl = logging.DEBUG if text.startswith("study failed") else getattr(logging, level, logging.INFO)
                    logging.getLogger(name).log(lvl, "%s", text)
                else:
                    flower_log.debug("%s", line)


def _read_status(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _flwr(argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 30.0) -> str:
    try:
        res = subprocess.run(
            [flower_cmd("flwr"), *argv],
            env=dict(env),
            cwd=str(cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except (subprocess.TimeoutExpired, OSError) as exc:
        return f"(flwr {' '.join(argv)} failed: {exc})"
    return _ANSI_RE.sub("", res.stdout + res.stderr)


def _flower_run_status(run_id: str, connection: str, env: Mapping[str, str], cwd: Path) -> str:
    out = _flwr(["ls", connection, "--run-id", run_id, "--format", "json"], env, cwd)
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        data = json.loads(out[out.index("{") :])
        run = data["runs"][0]
        details = run.get("status-details") or ""
        return f"{run['status']}" + (f" ({details})" if details else "")
    return "unknown"


def _submit_and_wait(
    plan: dict[str, Any],
    *,
    connection: str,
    env: Mapping[str, str],
    workdir: Path,
    procs: ProcessSet,
    timeout: float,
    extra_logs: list[Path],
) -> None:
    try:
        plan_json = json.dumps(plan, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the study plan is not JSON-serialisable: {exc}") from None
    tag = uuid.uuid4().hex[:12]
    run_config = workdir / f"run-config-{tag}.toml"
    _write_toml(run_config, {"plan": plan_json})
    logfile = workdir / f"flwr-run-{tag}.log"
    status_file = plan.get("status_file") or None
    if status_file:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_file)

    from fedgen.federation.fab_gate import build_fab, fab_sha256, installed_version, write_study_app

    # The FAB: the study app template with this fedgen's version (Flower builds it deterministically).
    app_dir = write_study_app(workdir / f"study-app-{tag}" / "fedgen-study")
    argv = [flower_cmd("flwr"), "run", str(app_dir), connection, "--run-config", str(run_config), "--stream"]
    with contextlib.suppress(Exception):  # diagnostics only: the hash sites check and log
        log.info("study app: fedgen %s, FAB sha256 %s", installed_version(), fab_sha256(build_fab(app_dir)))
    log.info("submitting study: %s", " ".join(argv))
    proc = procs.spawn("flwr-run", argv, env=env, cwd=workdir, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    follower = _RunFollower(proc.stdout, logfile)

    deadline = time.monotonic() + float(timeout)
    status: dict[str, Any] | None = None
    try:
        while True:
            status = follower.status or _read_status(status_file)
            if status is not None or proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                if follower.run_id:
                    _flwr(["stop", follower.run_id, connection], env, workdir)
                raise FedgenError(
                    f"the study did not finish within {timeout:g} s (Flower run {follower.run_id or '?'}); "
                    f"last log lines:\n" + "\n".join(follower.tail)
                )
            time.sleep(0.1)
        if status is not None and proc.poll() is None:
            # Let the log stream drain (it ends when the run finishes), briefly: the status is in.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.3)
        else:
            follower.thread.join(timeout=5.0)
            status = follower.status or _read_status(status_file)
    finally:
        procs.stop_one(proc, grace=2.0)
        follower.thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            run_config.unlink()
        shutil.rmtree(app_dir.parent, ignore_errors=True)

    if status is None:
        if follower.run_id is None:
            raise FedgenError(
                f"`flwr run` could not start the study (exit code {proc.returncode}):\n" + "\n".join(follower.tail)
            )
        flower_status = _flower_run_status(follower.run_id, connection, env, workdir)
        tails = "\n".join(follower.tail)
        for extra in extra_logs:
            t = _tail(extra, 15)
            if t:
                tails += f"\n--- {extra}:\n{t}"
        raise FedgenError(
            f"the Flower run {follower.run_id} ended without a fedgen status "
            f"(Flower status: {flower_status}); last log lines:\n{tails}"
        )
    if status.get("status") != "ok":
        message = str(status.get("message") or "the study failed (no message)")
        if message.startswith("internal error"):
            message += f" (traceback in the ServerApp log: {logfile})"
        raise FedgenError(message)
    log.info("study finished (Flower run %s)", follower.run_id)
