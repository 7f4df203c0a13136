"""The aggregator's SuperLink: ``flower-superlink`` behind fedgen's admin gate, with plain logs.

In flwr 1.41 one HTTPS port serves the Fleet API (site nodes), the Control API (submit runs,
register and list SuperNodes) and the Runtime API (the ServerApp). Without an account plugin
the Control API authenticates nobody, so anyone who could reach the port could register a
key of their own (defeating node authentication) or submit a run whose ServerApp executes on
the aggregator. :class:`AdminGate` keeps the Fleet API (``/v1/fleet/``) and ``/health`` open
to every client, and answers 403 to everything else unless the client address is in
``FEDGEN_ADMIN_HOSTS`` (comma-separated; default ``127.0.0.1,::1``).

Run as ``python -m fedgen.node.superlink [flower-superlink arguments]``; ``fedgen aggregator
start`` builds those arguments from the aggregator config.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys

from fedgen.federation import flwr_compat
from typing import Any, Awaitable, Callable, Iterable

log = logging.getLogger("fedgen.aggregator")

OPEN_PREFIXES = ("/v1/fleet/",)
OPEN_PATHS = ("/health",)
DEFAULT_ADMIN_HOSTS = ("127.0.0.1", "::1")
_SUPEREXEC_FLAG = "--fedgen-superexec"

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _normalise(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class AdminGate:
    """ASGI middleware: only ``allow`` client addresses may use non-Fleet routes."""

    def __init__(self, app: ASGIApp, allow: Iterable[str] = DEFAULT_ADMIN_HOSTS) -> None:
        self.app = app
        self.allow = frozenset(_normalise(h) for h in allow)

    def permitted(self, path: str, client_host: str | None) -> bool:
        if path in OPEN_PATHS or any(path.startswith(p) for p in OPEN_PREFIXES):
            return True
        return client_host is not None and _normalise(client_host) in self.allow

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            client = scope.get("client")
            host = client[0] if client else None
            path = str(scope.get("path", ""))
            if not self.permitted(path, host):
                log.warning(
                    "refused %s %s from %s: only the Fleet API is open to other hosts (admin_hosts: %s)",
                    scope.get("method", "?"), path, host or "unknown client", ", ".join(sorted(self.allow)),
                )  # fmt: skip
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps({"detail": "forbidden: this API is open to the aggregator's admin hosts only"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def admin_hosts_from_env() -> list[str]:
    raw = os.environ.get("FEDGEN_ADMIN_HOSTS", "")
    hosts = [h.strip() for h in raw.split(",") if h.strip()]
    return hosts or list(DEFAULT_ADMIN_HOSTS)


_PEM_KEY_RE = re.compile(r"b'(-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----)(?:\\n)?'", re.S)


class _KeyFingerprints(logging.Filter):
    """Show SuperNode public keys in SuperLink errors as fingerprints, not multi-line PEM."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("flwr") or "BEGIN PUBLIC KEY" not in str(record.msg) + str(record.args):
            return True
        text = record.getMessage()

        def repl(m: re.Match[str]) -> str:
            pem = m.group(1).replace("\\n", "\n")
            try:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                from fedgen.node.pki import fingerprint

                return fingerprint(load_pem_public_key(pem.encode()))
            except Exception:  # noqa: BLE001 - keep the original text if it does not parse
                return m.group(0)

        record.msg = _PEM_KEY_RE.sub(repl, text)
        record.args = ()
        return True


class _AccessFilter(logging.Filter):
    """Access log: Control API calls (who submitted or registered what) and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) < 5:
            return True
        path = str(args[2]).partition("?")[0]
        try:
            status = int(args[4])
        except (TypeError, ValueError):
            return True
        return status >= 400 or path.startswith("/v1/control/")


def _install(admin_hosts: list[str]) -> None:
    import importlib

    from starlette.middleware import Middleware

    # (flwr.superlink.cli re-exports the function under the module's name, so import by path)
    fsl = importlib.import_module("flwr.superlink.cli.flower_superlink")
    slmain = importlib.import_module("flwr.superlink.main")

    from fedgen.federation.supernode import LOG_DATEFMT, LOG_FORMAT, setup_plain_logging

    setup_plain_logging(extra_filters=[_KeyFingerprints()])

    real_middleware = slmain._get_middleware

    def middleware() -> list[Any]:
        return [Middleware(AdminGate, allow=admin_hosts), *real_middleware()]

    flwr_compat.rebind(slmain, "_get_middleware", middleware)

    real_log_config = fsl.get_uvicorn_log_config

    def log_config(level: int) -> dict[str, Any]:
        cfg = real_log_config(level)
        # Flower's access filter already drops routine Fleet polling; keep its format plain.
        cfg["formatters"] = {"http": {"format": LOG_FORMAT, "datefmt": LOG_DATEFMT}}
        cfg.setdefault("filters", {})["fedgen_access"] = {"()": _AccessFilter}
        cfg["handlers"]["access"].setdefault("filters", []).append("fedgen_access")
        return cfg

    flwr_compat.rebind(fsl, "get_uvicorn_log_config", log_config)

    real_superexec = fsl._get_superexec_command

    def superexec_command(*args: Any, **kwargs: Any) -> list[str]:
        cmd = list(real_superexec(*args, **kwargs))
        if cmd and cmd[0] == "flower-superexec":  # same SuperExec, with this process's plain logging
            cmd = [sys.executable, "-m", "fedgen.node.superlink", _SUPEREXEC_FLAG, *cmd[1:]]
        return cmd

    flwr_compat.rebind(fsl, "_get_superexec_command", superexec_command)


def _run_superexec() -> None:
    from fedgen.federation.supernode import setup_plain_logging

    setup_plain_logging()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv = ["flower-superexec", *sys.argv[2:]]
    flower_superexec()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _SUPEREXEC_FLAG:
        _run_superexec()
        return
    if "--insecure" in sys.argv[1:]:
        sys.exit("the fedgen aggregator always uses TLS; remove --insecure")
    from fedgen.federation.longpoll import hold_seconds

    try:
        hold_seconds()  # a bad FEDGEN_LONG_POLL: one line, before anything of Flower is patched
        flwr_compat.require("superlink")
    except flwr_compat.FedgenError as exc:
        sys.exit(f"fedgen aggregator: {exc}")
    if "--allow-runtime-dependency-installation" in sys.argv[1:]:
        sys.exit("the fedgen aggregator never installs packages at run time")
    if "--disable-runtime-dependency-installation" not in sys.argv[1:]:
        sys.argv.append("--disable-runtime-dependency-installation")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    hosts = admin_hosts_from_env()
    _install(hosts)
    log.info("admin gate: Control and Runtime APIs open to %s only; Fleet API open to sites", ", ".join(hosts))
    from fedgen.federation.longpoll import install as long_polls

    held = long_polls()  # FEDGEN_LONG_POLL was checked above
    if held > 0:
        log.info("long polls: an empty pull waits up to %g s for a message (FEDGEN_LONG_POLL)", held)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
