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
from typing import Any

from fedgen.errors import FedgenError

#: role -> (module, attribute) pairs that role relies on
HOOKS: dict[str, tuple[tuple[str, str], ...]] = {
    "supernode": (
        ("flwr.supernode.cli", "flower_supernode"),
        ("flwr.supernode.start_client_internal", "subprocess"),  # → only fedgen's SuperExec is started
        ("flwr.supernode.start_client_internal", "time"),  # → local runs: a shorter poll
        ("flwr.cli.install", "typer"),  # → quieter FAB unpacking
        ("flwr.supercore.logger", "FLOWER_LOGGER"),
    ),
    "superexec": (
        ("flwr.supercore.superexec.run_superexec", "get_executor"),  # → every task runs fedgen's runner
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
