"""Every Flower internal that fedgen's site and aggregator controls rebind, checked at startup.

The site's trust boundary (only the installed fedgen's ClientApp runs next to the data, no
package is installed at run time, only fedgen's SuperExec is started) and the aggregator's admin
gate are built by replacing a few Flower internals. A Flower release that renames or removes one
of them must not silently leave a control out, so each process calls :func:`require` for its
role before it starts Flower, and every replacement goes through :func:`rebind`, which refuses an
attribute that does not exist. A missing hook stops the process (fail closed) with its name.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from fedgen.errors import FedgenError

#: role -> (module, attribute) pairs that role relies on
HOOKS: dict[str, tuple[tuple[str, str], ...]] = {
    "supernode": (
        ("flwr.supernode.cli", "flower_supernode"),
        ("flwr.supernode.start_client_internal", "subprocess"),  # → only fedgen's SuperExec is started
        ("flwr.supernode.start_client_internal", "time"),  # → adaptive polling
        ("flwr.supernode.start_client_internal", "_push_messages"),  # → a new backoff per reply wait
        ("flwr.supernode.start_client_internal", "_pull_and_store_message"),  # → wakes held task polls
        ("flwr.supernode.servicer.runtime.runtime_handlers", "acquire_task"),  # → held task polls
        ("flwr.cli.install", "typer"),  # → quieter FAB unpacking
        ("flwr.supercore.logger", "FLOWER_LOGGER"),
    ),
    "superexec": (
        ("flwr.supercore.superexec.run_superexec", "get_executor"),  # → every task runs fedgen's runner
        ("flwr.supercore.superexec.run_superexec", "time"),  # → adaptive task polling
        ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
        ("flwr.supercore.superexec.executor.types", "ExecutionSpec"),
        ("flwr.supercore.superexec.executor.types", "LaunchResult"),
        ("flwr.supercore.cli.flower_superexec", "flower_superexec"),
        ("flwr.supernode.runtime.run_clientapp", "pull_task_input"),  # the runner's own task loop
        ("flwr.supernode.runtime.run_clientapp", "push_message"),
        ("flwr.supernode.runtime.run_clientapp", "push_task_output"),
        ("flwr.supercore.heartbeat", "HeartbeatSender"),
        ("flwr.supercore.runtime", "RuntimeHttpClient"),
    ),
    "superlink": (
        ("flwr.superlink.cli.flower_superlink", "flower_superlink"),
        ("flwr.superlink.cli.flower_superlink", "_get_superexec_command"),
        ("flwr.superlink.cli.flower_superlink", "get_uvicorn_log_config"),
        ("flwr.superlink.main", "_get_middleware"),  # → the admin gate on the Control/Runtime APIs
    ),
    # optional (fedgen.federation.longpoll: without them the SuperLink answers short polls as Flower does)
    "longpoll": (
        ("flwr.superlink.servicer.fleet.fleet_handlers", "pull_messages"),
        ("flwr.superlink.servicer.fleet.fleet_handlers", "push_messages"),
        ("flwr.superlink.servicer.fleet.fleet_handlers", "push_object"),
        ("flwr.superlink.servicer.runtime.runtime_handlers", "pull_messages"),
        ("flwr.superlink.servicer.runtime.runtime_handlers", "push_messages"),
        ("flwr.superlink.servicer.runtime.runtime_handlers", "push_object"),
        ("flwr.superlink.servicer.runtime.runtime_handlers", "acquire_task"),
        ("flwr.superlink.servicer.control.control_handlers", "start_run"),
    ),
}


class FlowerIncompatible(FedgenError):
    """The installed flwr lacks a hook fedgen's controls rely on."""


def missing_hooks(role: str) -> list[str]:
    """The hooks of ``role`` that the installed flwr does not have, as ``module.attribute``."""
    out = []
    for module, attr in HOOKS[role]:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            out.append(f"{module}.{attr}")
            continue
        if not hasattr(mod, attr):
            out.append(f"{module}.{attr}")
    return out


def require(role: str) -> None:
    """Refuse to start (``FlowerIncompatible``) unless every hook of ``role`` exists."""
    gone = missing_hooks(role)
    if gone:
        import flwr

        raise FlowerIncompatible(
            f"the installed flwr {getattr(flwr, '__version__', '?')} lacks {', '.join(gone)}, which fedgen's {role} "
            "controls rely on; refusing to start (install the flwr version fedgen declares)"
        )


def rebind(module: Any, attr: str, value: Any) -> Any:
    """Replace ``module.attr`` (which must exist) with ``value``; returns the original."""
    if not hasattr(module, attr):
        raise FlowerIncompatible(f"flwr has no {getattr(module, '__name__', module)}.{attr} to rebind; refusing to start")
    real = getattr(module, attr)
    setattr(module, attr, value)
    return real


#: first retry and cap (seconds) when an object of a message is not there yet; see fast_object_pulls
PULL_BACKOFF_ENV = "FEDGEN_PULL_BACKOFF"
DEFAULT_PULL_BACKOFF = (0.005, 0.5)


def fast_object_pulls(initial: float | None = None, cap: float | None = None) -> tuple[float, float]:
    """Retry a message object that is not there yet after milliseconds, not Flower's 1 s.

    A message travels as objects (its records, 5 MB array chunks). A receiver (the ServerApp
    pulling replies, a SuperNode pulling requests, the site's ClientApp pulling from its
    SuperNode) often asks for an object the sender is still pushing; Flower then waits 1 s
    (doubling up to 10 s) before asking again, which costs every round about a second. This
    lowers the first wait to ``initial`` (default 5 ms, or ``$FEDGEN_PULL_BACKOFF`` as
    ``initial,cap``), still doubling up to ``cap`` (default 0.5 s), in every function of Flower's
    object-pull helpers that takes those parameters. Nothing else about the transfer changes.
    """
    import inspect

    env = os.environ.get(PULL_BACKOFF_ENV, "")
    if env and (initial is None or cap is None):
        try:
            a, b = (float(x) for x in env.split(","))
        except ValueError:
            raise FedgenError(f"{PULL_BACKOFF_ENV} must be 'initial,cap' in seconds, got {env!r}") from None
        initial = a if initial is None else initial
        cap = b if cap is None else cap
    initial = DEFAULT_PULL_BACKOFF[0] if initial is None else float(initial)
    cap = DEFAULT_PULL_BACKOFF[1] if cap is None else float(cap)
    try:
        iu = importlib.import_module("flwr.supercore.inflatable.inflatable_utils")
    except ImportError:
        raise FlowerIncompatible("flwr has no supercore.inflatable.inflatable_utils (object pulls); refusing to start") from None
    want = {"initial_backoff": initial, "backoff_cap": cap}
    patched = 0
    for fn in list(vars(iu).values()):
        if not inspect.isfunction(fn) or fn.__module__ != iu.__name__:
            continue
        params = list(inspect.signature(fn).parameters.values())
        if not any(p.name in want for p in params):
            continue
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if fn.__defaults__:
            names = [p.name for p in positional[len(positional) - len(fn.__defaults__):]]
            fn.__defaults__ = tuple(want.get(n, d) for n, d in zip(names, fn.__defaults__))
        if fn.__kwdefaults__:
            fn.__kwdefaults__ = {k: want.get(k, v) for k, v in fn.__kwdefaults__.items()}
        patched += 1
    if not patched:
        raise FlowerIncompatible("flwr's object-pull helpers take no initial_backoff/backoff_cap; refusing to start")
    return initial, cap
