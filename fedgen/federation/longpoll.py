"""Long polls at the SuperLink: a pull with nothing to return waits for a push instead of returning empty.

Flower 1.42 moves every message by polling: each SuperNode asks the SuperLink for requests
(Fleet API ``PullMessages``) and the ServerApp asks it for replies (Runtime API
``PullMessages``), and an empty answer makes the caller sleep and ask again. A short poll
interval keeps rounds fast but every empty answer costs the SuperLink a request: with 2 sites
and the ServerApp polling every few ms, the SuperLink used 240 ms of CPU per round, on a
2-core machine whose rounds took 450 ms.

:func:`install` (in the SuperLink process) makes both pulls *hold* an empty answer for up to
``FEDGEN_LONG_POLL`` seconds (default 2): the handler waits on a condition that every push of
a message or object signals, and answers as soon as the pull has a message whose objects have
all arrived (a sender pushes a message before its objects; answering earlier makes the
receiver ask for objects still on their way). It checks again at least every 0.25 s, so replies
that Flower makes up itself, e.g. for an expired message, are seen too. A Runtime pull is held
only when it names the replies it waits for. Each caller (a node; the ServerApp) has at most
one pull held at a time: further concurrent pulls are answered at once, so a node cannot tie up
the SuperLink's threads; and at most :data:`MAX_HELD` pulls are held at once in the process
(the SuperLink answers all its APIs from Starlette's pool of 40 worker threads: with more nodes
than that, held pulls would take every thread and the pushes that answer them would queue
until a hold ran out).

The callers need no change: Flower's clients wait up to 30 s for an answer, and fedgen's
adaptive sleeps (:mod:`fedgen.federation.polling`) count a held poll as time already waited,
so a caller polls again at once after an empty held answer. Against a SuperLink without long
polls they poll as before. ``FEDGEN_LONG_POLL=0`` turns holding off; a value that is not a
number of seconds stops the process at start with a one-line error.

Used by the aggregator's SuperLink (:mod:`fedgen.node.superlink`) and the local federation's
(``python -m fedgen.federation.longpoll [flower-superlink arguments]``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger("fedgen.aggregator")

#: longest time (s) a pull with nothing to return is held when FEDGEN_LONG_POLL is not set
DEFAULT_HOLD = 2.0
#: a held pull checks for new messages at least this often (s)
RECHECK = 0.25

#: most pulls held at once in one process (below the 40 worker threads of the SuperLink's
#: HTTP server, so that pushes, object transfers and the Control API always find a thread)
MAX_HELD = 24

#: Flower's SuperExec sleeps this long (s) between task polls (default 1 s)
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"

_cond = threading.Condition()
_generation = 0
_held_lock = threading.Lock()
_held_now = 0


def hold_seconds() -> float:
    """``FEDGEN_LONG_POLL`` in seconds (default 2), at most 20 (Flower's clients give up after 30 s)."""
    from fedgen.errors import ConfigError

    text = os.environ.get("FEDGEN_LONG_POLL")
    try:
        value = float(text) if text not in (None, "") else DEFAULT_HOLD
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise ConfigError(f"FEDGEN_LONG_POLL must be a number of seconds (0 = no long polls), got {text!r}")
    return min(max(value, 0.0), 20.0)


def notify() -> None:
    """Wake every held pull (something was pushed)."""
    global _generation
    with _cond:
        _generation += 1
        _cond.notify_all()


def _pushing(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            notify()

    wrapper._fedgen_longpoll = True  # type: ignore[attr-defined]
    return wrapper


def _tree_ids(tree: Any) -> Any:
    yield tree.object_id
    for child in tree.children:
        yield from _tree_ids(child)


def _complete(response: Any, store: Any) -> bool:
    """Every object of every message in ``response`` is in the store (not just announced)."""
    if store is None:
        return True
    for tree in response.message_object_trees:
        for oid in _tree_ids(tree):
            if not store.get(oid):
                return False
    return True


def _held(fn: Callable[..., Any], hold: float, should_hold: Callable[[Any], bool],
          store_of: Callable[[tuple[Any, ...], dict[str, Any]], Any],
          has_result: Callable[[Any], bool] = lambda r: bool(len(r.messages_list))) -> Callable[..., Any]:
    """``fn`` (a pull handler) held while it has nothing (``has_result``) and ``should_hold(request)``,
    and, for message pulls, until the objects of what it returns are in ``store_of(args, kwargs)``."""

    hold = float(hold)
    if not math.isfinite(hold):
        raise ValueError(f"long-poll hold must be a finite number of seconds, got {hold!r}")
    holding: dict[Any, int] = {}
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _held_now
        request = kwargs.get("request", args[0] if args else None)
        # one held pull per caller (node) at a time, and at most MAX_HELD in the process: callers
        # cannot tie up the server's threads (each further pull is answered at once, as without
        # long polls)
        who = getattr(getattr(request, "node", None), "node_id", None)
        with lock, _held_lock:
            mine = holding.get(who, 0) == 0 and _held_now < MAX_HELD
            if mine:
                holding[who] = 1
                _held_now += 1
        try:
            if not mine:
                return fn(*args, **kwargs)
            return _wait(request, args, kwargs)
        finally:
            if mine:
                with lock, _held_lock:
                    holding.pop(who, None)
                    _held_now -= 1

    def _wait(request: Any, wargs: tuple[Any, ...], wkwargs: dict[str, Any]) -> Any:
        deadline = time.monotonic() + hold
        response = None
        while True:
            with _cond:
                seen = _generation
            if response is None:
                response = fn(*wargs, **wkwargs)
                if not has_result(response):
                    if not should_hold(request):
                        return response
                    response = None
            # a message is pushed before its objects: answer once they are all there, so the
            # caller does not ask for objects that are still on their way
            if response is not None and _complete(response, store_of(wargs, wkwargs)):
                return response
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return response if response is not None else fn(*wargs, **wkwargs)
            with _cond:
                if _generation == seen:
                    _cond.wait(min(remaining, RECHECK))

    wrapper._fedgen_longpoll = True  # type: ignore[attr-defined]
    return wrapper


def install(hold: float | None = None) -> float:
    """Patch this process's SuperLink handlers (idempotent); returns the hold in seconds (0 = off).

    Long polls save time, they guard nothing: a Flower without these handlers gets a warning and
    the usual short polls."""
    from fedgen.federation import flwr_compat

    hold = hold_seconds() if hold is None else float(hold)
    gone = flwr_compat.missing_hooks("longpoll")
    if gone:
        log.warning("long polls off: the installed flwr lacks %s", ", ".join(gone))
        return 0.0
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    if hold <= 0 or getattr(fleet_handlers.pull_messages, "_fedgen_longpoll", False):
        return hold
    for module in (fleet_handlers, runtime_handlers):
        for name in ("push_messages", "push_object"):
            flwr_compat.rebind(module, name, _pushing(getattr(module, name)))
    # a SuperNode's pull: hold until a request for it arrives
    flwr_compat.rebind(fleet_handlers, "pull_messages", _held(
        fleet_handlers.pull_messages, hold, lambda req: True, lambda a, k: k.get("store", a[2] if len(a) > 2 else None)))
    # the ServerApp's pull: hold only when it names the replies it waits for
    flwr_compat.rebind(runtime_handlers, "pull_messages", _held(
        runtime_handlers.pull_messages, hold, lambda req: bool(getattr(req, "message_ids", None)),
        lambda a, k: getattr(k.get("state", a[1] if len(a) > 1 else None), "object_store", None)))
    # the SuperLink's SuperExec (it starts a ServerApp per run): its task poll waits for a new
    # run, which the Control API's StartRun announces; between polls it sleeps 50 ms instead of
    # Flower's 1 s, which delayed the start of every study by half a second on average
    from flwr.superlink.servicer.control import control_handlers

    flwr_compat.rebind(control_handlers, "start_run", _pushing(control_handlers.start_run))
    hold_task_polls(runtime_handlers, hold)
    os.environ.setdefault(TASK_POLL_ENV, "0.05")
    return hold


def hold_task_polls(runtime_handlers: Any, hold: float | None = None) -> float:
    """In a SuperNode: its SuperExec's task poll (``AcquireTask``) waits up to the hold for a task;
    the SuperNode calls :func:`notify` when it has stored a request (a new task)."""
    from fedgen.federation import flwr_compat

    hold = hold_seconds() if hold is None else float(hold)
    if hold <= 0 or getattr(runtime_handlers.acquire_task, "_fedgen_longpoll", False):
        return hold
    flwr_compat.rebind(runtime_handlers, "acquire_task", _held(
        runtime_handlers.acquire_task, hold, lambda req: True, lambda a, k: None,
        has_result=lambda r: r.HasField("task")))
    return hold


def main() -> None:
    """``flower-superlink`` with long polls (the local federation's SuperLink)."""
    from fedgen.errors import FedgenError
    from fedgen.federation import flwr_compat

    try:
        flwr_compat.require("superlink")
        install()
    except FedgenError as exc:
        sys.exit(f"fedgen superlink: {exc}")
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
