"""Flower's SuperNode with a configurable idle poll interval.

flwr 1.41's SuperNode sleeps a hard-coded 3 s whenever it finds no message, and 0.5 s while
waiting for a reply; a study of many short rounds then spends most of its time asleep. This
entry point runs the same ``flower-supernode`` with those sleeps capped at
``FEDGEN_SUPERNODE_POLL`` seconds (default: Flower's own behaviour). Local loopback
federations use 0.05 s; deployed nodes keep a gentler interval towards a remote SuperLink.
"""

from __future__ import annotations

import os
import sys
import time as _time
import types


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
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
