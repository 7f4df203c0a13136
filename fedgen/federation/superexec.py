"""SuperExec for fedgen site nodes: ClientApp tasks start from a pre-warmed fork server.

Flower's SuperExec starts a fresh ``flwr-clientapp`` interpreter for every message, which
spends ~1.5 s importing flwr, numpy and fedgen before it computes anything; a federated fit of
many short rounds is dominated by that. This entry point runs Flower's own SuperExec loop
unchanged except for how a ClientApp task is launched: a fork server, started before the
SuperExec creates any thread or connection, has those modules imported once and forks a child
per task that runs ``flwr-clientapp``'s main with the task's token. Other task types keep
Flower's subprocess launcher.

:mod:`fedgen.federation.supernode` makes the SuperNode start this instead of
``flower-superexec``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def _prewarm() -> None:
    import numpy  # noqa: F401

    import fedgen.analyses
    import fedgen.federation.client_app  # noqa: F401
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401

    fedgen.analyses._load_builtin()


def _serve(rfd: int) -> None:
    """Fork server loop: one JSON argv per line; fork a child that runs flwr-clientapp."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with os.fdopen(rfd, "rb") as requests:
        for line in requests:
            argv = json.loads(line)
            if os.fork() == 0:
                code = 0
                try:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    sys.argv = ["flwr-clientapp", *argv]
                    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

                    flwr_clientapp()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - a child must never return into the loop
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
    os._exit(0)  # the SuperExec closed the pipe: it has exited


def main() -> None:
    _prewarm()
    rfd, wfd = os.pipe()
    if os.fork() == 0:
        os.close(wfd)
        _serve(rfd)
    os.close(rfd)

    import flwr.supercore.superexec.run_superexec as rs
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    pipe = os.fdopen(wfd, "wb", buffering=0)

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            args = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                args.append("--insecure")
            elif spec.root_certificates_path is not None:
                args += ["--root-certificates", spec.root_certificates_path]
            if spec.parent_pid is not None:
                args += ["--parent-pid", str(spec.parent_pid)]
            try:
                pipe.write((json.dumps(args) + "\n").encode())
            except OSError as exc:
                return LaunchResult(status=rs.LaunchResultStatus.FAILED, message=f"fork server gone: {exc}")
            return LaunchResult.accepted()

    rs.get_executor = lambda *a, **k: ForkExecutor()  # type: ignore[assignment]
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
