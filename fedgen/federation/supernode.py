"""Flower's SuperNode that runs only the site's installed fedgen, with plain logs and short polls.

Code boundary: the SuperNode always starts :mod:`fedgen.federation.superexec` where Flower
would start ``flower-superexec``, so every task runs fedgen's ClientApp runner: the run's FAB
is checked against the site's policy and never imported (there is no switch to turn this
off). ``--isolation process`` (an external SuperExec of the operator's choice) is refused, as
is ``--allow-runtime-dependency-installation``. The SuperNode and its children run with
``PYTHONSAFEPATH=1`` (no current folder on ``sys.path``).

flwr's SuperNode sleeps a hard-coded 3 s whenever it finds no message, and 0.5 s while
waiting for a reply; a study of many short rounds then spends most of its time asleep. This
entry point runs the same ``flower-supernode`` with those sleeps made adaptive
(:mod:`fedgen.federation.polling`): right after a reply the SuperNode polls again within
``FEDGEN_SUPERNODE_POLL`` seconds (default 0.05; local loopback federations 0.005), and the
interval grows with the time it has been idle, back to Flower's 3 s.
Tasks are run by :mod:`fedgen.federation.superexec` (a persistent site worker that keeps the
opened cohort between requests, or a fresh process per task with ``FEDGEN_SITE_WORKER=0``).

Logs (:func:`setup_plain_logging`): one handler for the whole process tree (SuperNode,
SuperExec, ClientApps), plain ``time level logger: message`` lines without colour codes,
Flower's blank separator lines and per-message chatter folded into one line per request and
one per reply, uvicorn's startup and access lines dropped (its warnings and errors kept).
``FEDGEN_NODE_LOG_LEVEL`` sets the level (default INFO). Runtime package installation stays
off.
"""

from __future__ import annotations

import logging
import os
import sys

import types

from fedgen.federation import flwr_compat
from typing import Any

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
_SUPEREXEC_FLAG = "--fedgen-superexec"


# ---------------------------------------------------------------- logging


class _FlowerChatter(logging.Filter):
    """Folds Flower's per-message log lines into one line per request/reply; drops blank lines."""

    _DROP = frozenset(
        {
            "Received successfully",
            "Sent successfully",
            "Start `flwr-clientapp` process",
            "FastAPI lifespan: startup",
            "FastAPI lifespan: shutdown",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self._round: tuple[Any, ...] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("flwr"):
            return True
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        if not msg.strip():
            return False
        if record.levelno > logging.INFO:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if msg in ("[RUN %s, ROUND %s]", "[RUN %s]"):
            self._round = args
            return False
        if msg in self._DROP:
            return record.levelno < logging.INFO or logging.getLogger().level <= logging.DEBUG
        if msg in ("Receiving: %s message (ID: %s)", "Sending: %s message (ID: %s)") and len(args) == 2:
            run = self._round[0] if self._round else "?"
            group = self._round[1] if self._round and len(self._round) > 1 else None
            what = "request" if msg.startswith("Receiving") else "reply"
            verb = "received" if what == "request" else "sent"
            label = f" {group}" if group else ""
            record.msg = f"run %s: {what}{label} {verb} (%s, message %.12s)"
            record.args = (run, args[0], str(args[1]))
            self._round = None
        return True


def _quiet_uvicorn() -> None:
    """uvicorn's default logging config: warnings and errors only, through the root handler."""
    try:
        import uvicorn.config
    except ImportError:  # pragma: no cover - uvicorn comes with flwr
        return
    cfg = uvicorn.config.LOGGING_CONFIG  # the default argument object of uvicorn.Config
    cfg["loggers"] = {
        "uvicorn": {"handlers": [], "level": "WARNING", "propagate": True},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    }


def _quiet_fab_install() -> None:
    """Flower prints "Successfully installed <app>" when it unpacks a FAB; say what it is."""
    try:
        import flwr.cli.install as install
    except ImportError:  # pragma: no cover
        return
    real = install.typer
    if getattr(real, "_fedgen_shim", False):
        return
    shim = types.ModuleType("typer")
    shim.__dict__.update(vars(real))
    log = logging.getLogger("fedgen.node")

    def secho(message: Any = "", *args: Any, **kwargs: Any) -> None:
        text = str(message)
        if text.startswith("Successfully installed "):
            log.debug("study app unpacked (configuration only; no packages are installed): %s", text[22:].rstrip("."))
            return
        real.secho(message, *args, **kwargs)

    shim.secho = secho  # type: ignore[attr-defined]
    shim._fedgen_shim = True  # type: ignore[attr-defined]
    flwr_compat.rebind(install, "typer", shim)


def setup_plain_logging(level: str | int | None = None, *, extra_filters: list[logging.Filter] | None = None) -> None:
    """One plain log handler (stderr) for this process and its children; safe to call twice."""
    from flwr.supercore import logger as flwr_logger

    if level is None:
        level = os.environ.get("FEDGEN_NODE_LOG_LEVEL", "INFO")
    lvl = logging.getLevelName(str(level).upper()) if isinstance(level, str) else int(level)
    if not isinstance(lvl, int):
        lvl = logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    handler.addFilter(_FlowerChatter())
    for f in extra_filters or []:
        handler.addFilter(f)
    handler.setLevel(lvl)
    handler._fedgen_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    flwr = logging.getLogger(flwr_logger.LOGGER_NAME)
    for h in list(flwr.handlers):
        if isinstance(h, flwr_logger.ConsoleHandler):
            flwr.removeHandler(h)
    flwr.propagate = True
    flwr.setLevel(logging.DEBUG)  # Flower's own default; the handler's level decides
    flwr_logger.console_handler.setLevel(lvl)  # Flower reads its level (e.g. uvicorn access_log)
    for noisy in ("httpx", "httpcore", "grpc", "urllib3", "asyncio", "multipart", "alembic", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    _quiet_uvicorn()
    _quiet_fab_install()


# ---------------------------------------------------------------- SuperNode


def _use_fedgen_superexec() -> None:
    """Start :mod:`fedgen.federation.superexec` where Flower would start ``flower-superexec``.

    Fail-closed: the SuperNode module may start nothing else (a future Flower that launches
    its SuperExec another way stops here instead of running Flower's FAB loader).
    """
    import subprocess

    import flwr.supernode.start_client_internal as sci

    real_popen = subprocess.Popen

    def popen(cmd, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not (isinstance(cmd, list) and cmd and cmd[0] == "flower-superexec"):
            raise RuntimeError(f"fedgen site node: refusing to start {cmd!r} (only fedgen's SuperExec runs here)")
        if "--allow-runtime-dependency-installation" in cmd:
            raise RuntimeError("fedgen site node: runtime dependency installation is never allowed")
        cmd = [sys.executable, "-P", "-m", "fedgen.federation.supernode", _SUPEREXEC_FLAG, *cmd[1:]]
        return real_popen(cmd, *args, **kwargs)

    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = popen  # type: ignore[attr-defined]
    flwr_compat.rebind(sci, "subprocess", shim)


#: idle-poll floor (s) towards the SuperLink when FEDGEN_SUPERNODE_POLL is not set
DEFAULT_SUPERNODE_POLL = 0.05


def _adaptive_polls() -> None:
    """Flower's SuperNode loop sleeps 3 s after every empty poll of the SuperLink and 0.5 s per
    check for the ClientApp's reply; both become :mod:`fedgen.federation.polling` backoffs:
    the first polls after a reply come ``FEDGEN_SUPERNODE_POLL`` s apart (default 0.05 s; local
    loopback federations 0.005 s), growing with the idle time back to Flower's 3 s, and the
    in-memory reply checks start at 1 ms."""
    import flwr.supernode.start_client_internal as sci

    from fedgen.federation.polling import adaptive_sleep

    floor = float(os.environ.get("FEDGEN_SUPERNODE_POLL") or DEFAULT_SUPERNODE_POLL)
    shim = adaptive_sleep(lambda s: s >= 1.0, idle_floor=max(0.001, floor), busy_floor=0.001)
    flwr_compat.rebind(sci, "time", shim)
    # every wait for a reply starts its own backoff: against a SuperLink with long polls no idle
    # sleep comes between two requests to reset it, and the reply checks of later rounds would
    # otherwise continue the first round's backoff up to Flower's 0.5 s
    real_push = sci._push_messages

    def push_messages(*args: Any, **kwargs: Any) -> Any:
        shim.reset_backoff()
        return real_push(*args, **kwargs)

    flwr_compat.rebind(sci, "_push_messages", push_messages)
    # the SuperExec's task polls wait in this process for the next request (long polls,
    # fedgen.federation.longpoll): the SuperNode wakes them when it has stored one
    import flwr.supernode.servicer.runtime.runtime_handlers as rh

    from fedgen.federation import longpoll

    if longpoll.hold_task_polls(rh) > 0:
        real_pull = sci._pull_and_store_message

        def pull_and_store(*args: Any, **kwargs: Any) -> Any:
            run_id = real_pull(*args, **kwargs)
            if run_id is not None:
                longpoll.notify()
            return run_id

        flwr_compat.rebind(sci, "_pull_and_store_message", pull_and_store)


def _run_superexec() -> None:
    """The SuperExec (and its site worker) with the node's logging, inherited by every ClientApp."""
    setup_plain_logging()
    from fedgen.federation.superexec import main as superexec_main

    sys.argv = ["flower-superexec", *sys.argv[2:]]
    superexec_main()


def _refuse(argv: list[str]) -> str | None:
    """Why these flower-supernode arguments cannot run a fedgen site node (None if they can)."""
    if "--allow-runtime-dependency-installation" in argv:
        return "fedgen site nodes never install packages at run time; remove --allow-runtime-dependency-installation"
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--isolation=") else argv[i + 1] if arg == "--isolation" and i + 1 < len(argv) else None
        if value is not None and value != "subprocess":
            return (
                f"fedgen site nodes run their own SuperExec (fedgen's ClientApp runner); --isolation {value} "
                "would let another process run tasks: remove it"
            )
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == _SUPEREXEC_FLAG:
        _run_superexec()
        return
    problem = _refuse(sys.argv[1:])
    if problem:
        sys.exit(problem)
    from fedgen.federation.longpoll import hold_seconds

    try:
        hold_seconds()  # a bad FEDGEN_LONG_POLL: one line, before anything of Flower is patched
        flwr_compat.require("supernode")
        flwr_compat.require("superexec")
        flwr_compat.fast_object_pulls()
    except flwr_compat.FedgenError as exc:
        sys.exit(f"fedgen site node: {exc}")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ["PYTHONSAFEPATH"] = "1"  # inherited by the SuperExec and every task
    setup_plain_logging()
    _adaptive_polls()
    _use_fedgen_superexec()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
