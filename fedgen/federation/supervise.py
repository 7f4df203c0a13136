"""Supervision of the processes fedgen starts (SuperLink, SuperNodes, `flwr run`), with psutil.

:class:`ProcessSet` starts each process in its own session and, on :meth:`ProcessSet.stop`,
signals only what it started: their process groups, and by PID every descendant found under
them (``flower-superexec``, ``flwr-serverapp``, the site worker…, which may start their own
sessions). Terminate, wait, then kill. A process is identified by (PID, creation time), so a
reused PID is never signalled; nothing is ever looked up by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import psutil

log = logging.getLogger("fedgen.federation")

Ident = tuple[int, float]  # (pid, create_time): survives PID reuse


def ident_of(pid: int) -> Ident | None:
    """(pid, creation time) of a live, non-zombie process, else None."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return pid, p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def alive(ident: Ident) -> bool:
    now = ident_of(ident[0])
    return now is not None and now[1] == ident[1]


def descendants(roots: Iterable[int]) -> set[Ident]:
    """Every live descendant of ``roots`` (children, grandchildren, …)."""
    out: set[Ident] = set()
    for pid in roots:
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for k in kids:
            i = ident_of(k.pid)
            if i is not None:
                out.add(i)
    return out


def signal_ident(ident: Ident, sig: int) -> None:
    if alive(ident):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(ident[0], sig)


def parent_death_signal() -> Callable[[], None] | None:
    """preexec_fn making a child receive SIGTERM if its parent dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def _set() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return _set


class ProcessSet:
    """Processes started by fedgen, each in its own session (process group); see the module doc."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self._seen: set[Ident] = set()  # every process seen at or below ours
        self._lock = threading.Lock()
        self._pdeath = parent_death_signal()

    def spawn(self, name: str, argv: list[str], *, env: Mapping[str, str], cwd: Path, stdout: Any,
              text: bool = False) -> subprocess.Popen[Any]:
        kwargs: dict[str, Any] = {}
        if self._pdeath is not None and threading.current_thread() is threading.main_thread():
            # The death signal is tied to the spawning thread; only use it from the main thread.
            kwargs["preexec_fn"] = self._pdeath
        proc = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=text,
            encoding="utf-8" if text else None,
            errors="replace" if text else None,
            **kwargs,
        )
        with self._lock:
            self._procs.append((name, proc))
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def pids(self) -> list[int]:
        """PIDs of the processes started directly (not their descendants)."""
        return [p.pid for _, p in self._procs]

    def all_idents(self) -> set[Ident]:
        """(pid, creation time) of every live process started here or below (snapshot)."""
        self._remember()
        return {i for i in self._seen if alive(i)}

    def _remember(self, roots: Iterable[int] | None = None) -> set[Ident]:
        """Record and return the live descendants of ``roots`` (default: all started processes)."""
        roots = list([p.pid for _, p in self._procs] if roots is None else roots)
        found = descendants(roots)
        for pid in roots:
            i = ident_of(pid)
            if i is not None:
                found.add(i)
        self._seen |= found
        return found

    def stop_one(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        """Stop one started process, its group and its descendants."""
        self._stop([proc], grace)

    def stop(self, grace: float = 5.0) -> None:
        """Stop everything, most recently started first (SuperNodes before the SuperLink)."""
        self._stop([p for _, p in reversed(self._procs)], grace)

    def _stop(self, procs: list[subprocess.Popen[Any]], grace: float) -> None:
        if not procs:
            return
        with signals_deferred():
            self._stop_now(procs, grace)

    def _stop_now(self, procs: list[subprocess.Popen[Any]], grace: float) -> None:
        own_groups = [p.pid for p in procs]  # start_new_session=True: pgid == pid
        # Snapshot the whole tree while the parents still live (orphans lose their parent link).
        targets: set[Ident] = set()
        for pid in own_groups:
            targets |= self._remember([pid])
        targets -= {i for pid in own_groups if (i := ident_of(pid)) is not None}

        def signal_all(sig: int) -> None:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, sig)
            for ident in targets:
                signal_ident(ident, sig)

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            # Catch processes spawned during shutdown by parents that are still running.
            targets |= descendants([p.pid for p in procs if p.poll() is None] + [i[0] for i in targets if alive(i)])
            if all(p.poll() is not None for p in procs) and not any(alive(i) for i in targets):
                break
            time.sleep(0.05)
        else:
            signal_all(signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5.0)
        for ident in targets:
            signal_ident(ident, signal.SIGKILL)
        with self._lock:
            self._procs = [(n, q) for n, q in self._procs if q not in procs]


@contextlib.contextmanager
def signals_deferred() -> Any:
    """Hold SIGINT/SIGTERM until the block ends, so a second Ctrl+C cannot abort a teardown."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def sigterm_raises() -> Any:
    """Within the block, SIGTERM raises SystemExit (so cleanup runs). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
