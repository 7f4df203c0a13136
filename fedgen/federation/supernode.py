"""Flower's SuperNode with a configurable idle poll interval and fedgen's SuperExec.

flwr 1.41's SuperNode sleeps a hard-coded 3 s whenever it finds no message, and 0.5 s while
waiting for a reply; a study of many short rounds then spends most of its time asleep. This
entry point runs the same ``flower-supernode`` with those sleeps capped at
``FEDGEN_SUPERNODE_POLL`` seconds (default: Flower's own behaviour). Local loopback
federations use 0.05 s; deployed nodes keep a gentler interval towards a remote SuperLink.
ClientApp tasks are launched by :mod:`fedgen.federation.superexec` (a pre-warmed fork server)
unless ``FEDGEN_FORK_CLIENTAPP=0``.
"""

from __future__ import annotations

import os
import sys
import time as _time
import types


def _use_fedgen_superexec() -> None:
    """Start :mod:`fedgen.federation.superexec` where Flower would start ``flower-superexec``."""
    import subprocess

    import flwr.supernode.start_client_internal as sci

    real_popen = subprocess.Popen

    def popen(cmd, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(cmd, list) and cmd and cmd[0] == "flower-superexec":
            cmd = [sys.executable, "-m", "fedgen.federation.superexec", *cmd[1:]]
        return real_popen(cmd, *args, **kwargs)

    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = popen  # type: ignore[attr-defined]
    sci.subprocess = shim  # type: ignore[attr-defined]


def main() -> None:
    poll = os.environ.get("FEDGEN_SUPERNODE_POLL")
    if poll:
        import flwr.supernode.start_client_internal as sci

        cap = max(0.01, float(poll))
        real_sleep = _time.sleep
        shim = types.ModuleType("time")
        shim.__dict__.update({k: v for k, v in vars(_time).items() if not k.startswith("__")})
        shim.sleep = lambda s: real_sleep(min(float(s), cap))  # type: ignore[attr-defined]
        sci.time = shim  # type: ignore[attr-defined]
    if os.environ.get("FEDGEN_FORK_CLIENTAPP", "1") != "0":
        _use_fedgen_superexec()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
