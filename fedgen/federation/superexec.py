"""SuperExec for fedgen site nodes: every task runs the site's installed fedgen, never a FAB.

Flower's SuperExec starts ``flwr-clientapp`` for each message, which unpacks the run's FAB and
imports the ClientApp named in it, with the FAB's folder first on ``sys.path``: whoever
submits a run chooses the code that runs next to the site's genotypes. This SuperExec keeps
Flower's SuperExec loop (task acquisition from the SuperNode's Runtime API) and replaces what
a task runs with :func:`run_task`, fedgen's ClientApp runner:

1. pull the task's inputs (message, context, run, FAB bytes) from the SuperNode;
2. check the FAB against the site's policy (:func:`fedgen.federation.fab_gate.check_run`)
   before anything else: no site data is opened, no ClientApp is called;
3. refused: append a ``fab-check`` entry to the site's audit log and reply with an error
   naming the site, the run, the FAB hash and the policy's accepted lists (a fedgen
   ``{"error": ...}`` reply to fedgen requests, a Flower ``Error`` to anything else);
4. accepted: call ``fedgen.federation.client_app.app`` imported from the installed fedgen
   (``context.node_config["fab_hash"]`` carries the verified hash for its audit entries).

The FAB is never unpacked, installed or put on ``sys.path``; its ``components`` are ignored.
Tasks other than ClientApp tasks (e.g. a run submitted as an agent app) are refused the same
way. Runtime dependency installation is never done.

Launching: a persistent **site worker** (``python -P -m fedgen.federation.superexec
--fedgen-worker``, started with the SuperExec and restarted if it dies) has flwr, numpy and
fedgen imported once and runs the tasks one after another in one process, keeping the opened
cohort and its caches between requests (a fresh interpreter would spend ~1.5 s importing, and
every request would reopen the cohort). Running one request at a time also means the site's
disclosure registers and ε ledger see requests strictly in order. With
``FEDGEN_SITE_WORKER=0`` each task runs in a new ``python -P -m fedgen.federation.superexec
--fedgen-task ...`` process instead: the same runner, never Flower's ``flwr-clientapp``.

:mod:`fedgen.federation.supernode` makes the SuperNode start this instead of
``flower-superexec``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import traceback

from fedgen.federation import flwr_compat
from pathlib import Path
from typing import Any

log = logging.getLogger("fedgen.site")

TASK_FLAG = "--fedgen-task"
WORKER_FLAG = "--fedgen-worker"
CLIENTAPP_MODULE = "fedgen.federation.client_app"


# ---------------------------------------------------------------- the ClientApp runner


def _sanitise_sys_path() -> None:
    """No current-directory entries on sys.path: modules come from the installed packages only."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


def installed_client_app() -> Any:
    """``fedgen.federation.client_app.app`` from the installed fedgen, checked to be that one."""
    import importlib

    import fedgen

    module = importlib.import_module(CLIENTAPP_MODULE)
    pkg_dir = Path(fedgen.__file__).resolve().parent
    mod_file = Path(str(getattr(module, "__file__", ""))).resolve()
    if pkg_dir not in mod_file.parents:
        raise RuntimeError(f"{CLIENTAPP_MODULE} was loaded from {mod_file}, not from the installed fedgen ({pkg_dir})")
    flwr_home = os.environ.get("FLWR_HOME")
    if flwr_home and Path(flwr_home).resolve() in pkg_dir.parents:
        raise RuntimeError(f"fedgen was loaded from {pkg_dir}, inside FLWR_HOME (a FAB?)")
    return module.app


def _refusal_reply(message: Any, text: str, site: str) -> Any:
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    from fedgen.federation.flower import MESSAGE_TYPE, encode_reply

    if message.metadata.message_type == MESSAGE_TYPE:
        # FlowerTransport reports it as "site <site>: refused run ...".
        return Message(encode_reply({}, {"error": text, "site": site, "refused": "fab-check"}), reply_to=message)
    return Message(Error(code=ErrorCode.INVALID_FAB, reason=f"site {site} {text}"), reply_to=message)


def _audit_refusal(node_config: dict[str, Any], entry: dict[str, Any]) -> None:
    try:
        from fedgen.site import audit, state_dir_for

        audit.append(state_dir_for(node_config), entry)
    except Exception:  # noqa: BLE001 - the refusal stands even if the log cannot be written
        log.exception("could not write the refusal to the audit log")


def run_task(
    *,
    runtime_api_address: str,
    token: str,
    insecure: bool,
    certificates: bytes | None,
    parent_pid: int | None,
    task_type: str,
    persistent: bool = False,
) -> None:
    """Run one task for the SuperNode at ``runtime_api_address`` (see the module doc).

    Exits the process at the end, unless ``persistent`` (the site worker, which runs task
    after task in one process): then it returns, and installs no per-task signal handlers.
    """
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.telemetry import EventType

    # Flower's own Runtime API plumbing (pull inputs, push the reply and the task status);
    # nothing from this module loads or installs an app.
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedgen.federation.fab_gate import check_run

    _sanitise_sys_path()
    if parent_pid is not None and not persistent:
        start_parent_process_monitor(parent_pid)

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )

    heartbeat_sender = None
    message = None
    reply = None
    context = None
    sub_status = SubStatus.FAILED
    details = "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat_sender is not None and heartbeat_sender.is_running:
            heartbeat_sender.stop()
        client.close()

    if not persistent:
        register_signal_handlers(
            event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE, exit_message="Task stopped.", exit_handlers=[on_exit]
        )

    try:
        heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat_sender.start()

        # The aggregator's request and the run's FAB (bytes only; never unpacked).
        message, context, run, fab = pull_task_input(client)
        node_config = dict(context.node_config)
        site = str(node_config.get("site", "?"))

        # The gate: before any site data is opened and before any ClientApp code is called.
        decision = check_run(fab.content, node_config)
        refusal = None if decision.accepted else decision.reason
        if refusal is None and task_type != TaskType.CLIENT_APP:
            refusal = f"this site runs only ClientApp tasks with fedgen's ClientApp; the run asks for a {task_type} task"
        if refusal is not None:
            text = f"refused run {run.run_id}: {refusal}"
            log.warning("site %s %s", site, text)
            _audit_refusal(
                node_config,
                {
                    "site": site,
                    "run_id": str(run.run_id),
                    "message_type": message.metadata.message_type,
                    "analysis": None,
                    "step": "fab-check",
                    "decision": "refused",
                    "reason": refusal,
                    "fab_hash": decision.fab_hash,
                    "fab_id": decision.fab_id or run.fab_id or None,
                    "fab_version": run.fab_version or None,
                    "declared_fedgen_version": decision.declared_version,
                    "arrays": [],
                    "bytes": 0,
                    "sha256": None,
                    "epsilon": 0.0,
                    "delta": 0.0,
                },
            )
            reply = _refusal_reply(message, text, site)
            details = f"site {site} {text}"
        else:
            app = installed_client_app()
            context.node_config["fab_hash"] = decision.fab_hash
            try:
                reply = app(message=message, context=context)
            finally:
                context.node_config.pop("fab_hash", None)
            sub_status = SubStatus.COMPLETED
            details = ""
    except Exception as ex:  # noqa: BLE001 - any failure must reach the aggregator as an error reply
        from flwr.app import Message
        from flwr.app.error import Error

        reason = f"{type(ex).__name__}: {ex}"
        log.error("fedgen ClientApp task failed: %s", reason, exc_info=ex)
        sub_status = SubStatus.FAILED
        details = reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log.error("failed to push the reply: %s", ex, exc_info=ex)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR

    if persistent:
        on_exit()
        return
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def _task_parser() -> Any:
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    parser = _parse_args_run_flwr_clientapp()
    parser.prog = "fedgen-clientapp"
    parser.add_argument("--fedgen-task-type", default="flwr-clientapp")
    return parser


def task_main(argv: list[str], *, persistent: bool = False) -> None:
    """Entry point of one task: ``flwr-clientapp``'s arguments (+ ``--fedgen-task-type``)."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    args = _task_parser().parse_args(argv)
    run_task(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        task_type=args.fedgen_task_type,
        persistent=persistent,
    )


# ---------------------------------------------------------------- launching tasks


def _prewarm() -> None:
    import numpy  # noqa: F401

    import fedgen.analyses
    import fedgen.federation.fab_gate  # noqa: F401
    import fedgen.privacy.accounting  # noqa: F401 - dp_accounting takes ~0.5 s to import
    from flwr.supernode.runtime import run_clientapp  # noqa: F401

    from fedgen.node.policy import known_analyses

    installed_client_app()
    fedgen.analyses._load_builtin()
    known_analyses()  # the policy check imports every analysis module: once, here
    from fedgen.stats import kernel

    if kernel.name() != "compiled":
        log.warning("site kernel: numpy (the compiled logistic kernel was not built with this install: "
                    "regression rounds run several times slower; reinstall fedgen where a C compiler is available)")


def _worker_main() -> None:
    """The site worker: one task (a JSON argv per line on stdin) after another, in this process.

    The worker keeps what a request opens (the cohort, its genotype cache, the samples table)
    for the next one, and it runs one request at a time, so the site's disclosure registers
    and ledger see requests strictly in order. Every request still goes through the same
    task runner (FAB check, then the site pipeline). A task that fails is answered with an
    error and the worker takes the next one.
    """
    from fedgen.federation.supernode import setup_plain_logging

    _sanitise_sys_path()
    setup_plain_logging()
    flwr_compat.fast_object_pulls()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the SuperExec handles Ctrl-C; the worker ends when stdin closes
    _prewarm()
    for line in sys.stdin.buffer:
        try:
            argv = json.loads(line)
            task_main([str(a) for a in argv], persistent=True)
        except SystemExit as exc:  # argparse, or a Flower helper that exits
            log.error("site worker: task ended with exit code %s", exc.code)
        except BaseException:  # noqa: BLE001 - one task's failure must not end the worker
            log.error("site worker: task failed:\n%s", traceback.format_exc())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


class _Worker:
    """The SuperExec's handle on the site worker (``--fedgen-worker``); restarted if it died."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        cmd = [sys.executable, "-P", "-m", "fedgen.federation.superexec", WORKER_FLAG]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)  # noqa: S603 - our own module

    def submit(self, args: list[str]) -> None:
        line = (json.dumps(args) + "\n").encode()
        for attempt in range(2):
            proc = self._proc
            if proc is None or proc.poll() is not None:
                log.warning("site worker exited (code %s); starting a new one", None if proc is None else proc.returncode)
                self._start()
                proc = self._proc
            try:
                assert proc is not None and proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
                return
            except OSError:
                if attempt:
                    raise
                self._proc = None

    def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _task_args(spec: Any) -> list[str]:
    args = ["--runtime-api-address", spec.runtime_api_address, "--token", spec.token]
    if spec.insecure:
        args.append("--insecure")
    elif spec.root_certificates_path is not None:
        args += ["--root-certificates", spec.root_certificates_path]
    if spec.parent_pid is not None:
        args += ["--parent-pid", str(spec.parent_pid)]
    args += ["--fedgen-task-type", str(spec.task_type)]
    return args  # never --allow-runtime-dependency-installation


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:  # the persistent site worker
        _worker_main()
        return
    if len(sys.argv) > 1 and sys.argv[1] == TASK_FLAG:  # one task in a fresh process
        from fedgen.federation.supernode import setup_plain_logging

        _sanitise_sys_path()
        setup_plain_logging()
        flwr_compat.fast_object_pulls()
        task_main(sys.argv[2:])
        return

    _sanitise_sys_path()
    try:
        flwr_compat.require("superexec")
    except flwr_compat.FlowerIncompatible as exc:
        sys.exit(f"fedgen site node: {exc}")
    worker = _Worker() if os.environ.get("FEDGEN_SITE_WORKER", "1") != "0" else None
    if worker is not None:
        import atexit

        atexit.register(worker.close)

    import flwr.supercore.superexec.run_superexec as rs
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult

    class FedgenExecutor(SubprocessExecutor):
        """Every task, whatever its type, runs :func:`run_task` (forked, or a fresh process)."""

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            poll_shim.reset_backoff()  # the next task is likely soon: poll fast again
            args = _task_args(spec)
            if worker is not None:
                try:
                    worker.submit(args)
                except OSError as exc:
                    return LaunchResult.failed(f"site worker unavailable: {exc}")
                return LaunchResult.accepted()
            cmd = [sys.executable, "-P", "-m", "fedgen.federation.superexec", TASK_FLAG, *args]
            subprocess.Popen(cmd)  # noqa: S603 - reaped by Flower's SuperExec like its own launches
            return LaunchResult.accepted()

    from fedgen.federation.polling import adaptive_sleep

    # The task loop polls the SuperNode every FLWR_SUPEREXEC_TASK_POLL_INTERVAL s; adaptive
    # instead: within FEDGEN_SUPEREXEC_POLL s (default 0.01) of the last task, backing off to it.
    poll_shim = adaptive_sleep(lambda s: True, idle_floor=float(os.environ.get("FEDGEN_SUPEREXEC_POLL") or 0.01),
                               busy_floor=0.001)
    flwr_compat.rebind(rs, "time", poll_shim)
    flwr_compat.rebind(rs, "get_executor", lambda *a, **k: FedgenExecutor())
    from flwr.supercore.cli.flower_superexec import flower_superexec

    sys.argv[0] = "flower-superexec"
    flower_superexec()


if __name__ == "__main__":
    main()
