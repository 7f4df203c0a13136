"""Adaptive polling: wait in proportion to how long one has been waiting.

Flower 1.42 moves messages by polling over HTTP: the aggregator polls the SuperLink for
replies, each SuperNode polls the SuperLink for requests and its own store for the ClientApp's
reply, each SuperExec polls its SuperNode for tasks. Fixed intervals force a bad choice: short
ones keep every round fast but burn a core in idle HTTP requests (on a 2-core machine running
three sites, the polling alone slowed every request), long ones add their length to every
round.

:class:`Backoff` waits ``fraction`` × (time waited so far), clamped to [``floor``, ``cap``]:
the first checks after an event come within milliseconds (a round that takes 40 ms is seen
within a few ms), a reply that takes 10 s is checked about once a second (at most 10 % late),
and an idle node settles at ``cap``. :func:`adaptive_sleep` wraps a module's ``time.sleep``
so that Flower's fixed sleeps follow the same rule.
"""

from __future__ import annotations

import time
import types
from typing import Any, Callable

#: default fraction of the time waited so far that the next wait lasts
FRACTION = 0.1
#: a check between two sleeps that took at least this long (s) was a long poll (the server held
#: it until it had something or its hold ran out, :mod:`fedgen.federation.longpoll`): check again at once
LONG_POLL_SECONDS = 0.5


def wait_after(wait: float, took: float) -> float:
    """The sleep before the next check when the backoff asks for ``wait`` and the check just made
    took ``took`` s: the backoff is a period between checks, and a check of
    :data:`LONG_POLL_SECONDS` or more (a poll the server held) is followed by the next at once."""
    return 0.0 if took >= LONG_POLL_SECONDS else wait - took


class Backoff:
    """Waits of ``fraction`` × elapsed, clamped to [floor, cap]; :meth:`reset` starts a new wait."""

    def __init__(self, floor: float, cap: float, fraction: float = FRACTION) -> None:
        if not (0 < floor <= cap):
            raise ValueError(f"need 0 < floor <= cap, got floor={floor}, cap={cap}")
        self.floor, self.cap, self.fraction = float(floor), float(cap), float(fraction)
        self._start: float | None = None

    def reset(self) -> None:
        self._start = None

    def next(self) -> float:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        return min(self.cap, max(self.floor, self.fraction * (now - self._start)))


def adaptive_sleep(is_idle: Callable[[float], bool], *, idle_floor: float, busy_floor: float,
                   cap: float | None = None, fraction: float = FRACTION) -> types.ModuleType:
    """A stand-in for the ``time`` module whose ``sleep(s)`` follows :class:`Backoff`.

    ``is_idle(s)`` tells an idle wait (nothing to do: the next check is a network poll, floor
    ``idle_floor``) from a wait for work in progress (floor ``busy_floor``); consecutive calls
    of one kind continue one backoff, a change of kind (or ``shim.reset_backoff()``, for an
    event the sleeps cannot see) starts a new one. A sleep never exceeds what the caller asked
    for, nor ``cap`` when given. Within one wait the backoff is the period between checks: the time
    the caller spent between two sleeps is taken off the next, and after a check of
    :data:`LONG_POLL_SECONDS` or more (a poll the server held) there is no sleep at all.
    """
    state: dict[str, Any] = {"kind": None, "backoff": None, "woke": None}
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        idle = bool(is_idle(seconds))
        top = seconds if cap is None else min(seconds, cap)
        floor = min(idle_floor if idle else busy_floor, top)
        if floor <= 0:
            real_sleep(max(top, 0.0))
            state["woke"] = time.monotonic()
            return
        b = state["backoff"]
        since = None
        if state["kind"] is not idle or b is None or b.cap != top:
            state["kind"] = idle
            b = state["backoff"] = Backoff(floor, top, fraction)
        elif state["woke"] is not None:
            since = time.monotonic() - state["woke"]  # the check between two sleeps of one wait
        wait = b.next() if since is None else wait_after(b.next(), since)
        if wait > 0:
            real_sleep(wait)
        state["woke"] = time.monotonic()

    def reset_backoff() -> None:
        state["backoff"] = None

    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    shim.reset_backoff = reset_backoff  # type: ignore[attr-defined]
    return shim
