"""Long polls at the SuperLink (fedgen.federation.longpoll) and the callers' adaptive sleeps (fedgen.federation.polling).

No timing is measured here: a held pull is checked to answer because of a push (the hold is far
longer than the test may take), and the sleeps run on a fake clock.
"""

from __future__ import annotations

import os

import threading
import types
from dataclasses import dataclass, field

import pytest

from fedgen.errors import ConfigError
from fedgen.federation import longpoll, polling

HOLD = 60.0  # a pull answered by its hold running out would stall the test for a minute


@dataclass
class Tree:
    object_id: str
    children: list["Tree"] = field(default_factory=list)


@dataclass
class Response:
    messages_list: list[str]
    message_object_trees: list[Tree]


class Link:
    """A SuperLink's state: messages by node, objects that arrive after their message."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Tree]] = []
        self.objects: dict[str, bytes] = {}
        self.pulls = 0

    def get(self, oid: str) -> bytes | None:
        return self.objects.get(oid)

    def pull(self, request: object, state: object, store: object) -> Response:
        self.pulls += 1
        msgs, self.messages = self.messages, []
        return Response([m for m, _ in msgs], [t for _, t in msgs])


def _held(link: Link, should_hold=lambda req: True, hold: float = HOLD):
    return longpoll._held(link.pull, hold, should_hold, lambda a, k: k.get("store"))


def _in_thread(fn):
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def test_a_held_pull_answers_when_the_message_and_all_its_objects_have_arrived():
    link = Link()
    pull = _held(link)
    t, out = _in_thread(lambda: pull(request=object(), state=None, store=link))
    tree = Tree("m", [Tree("a"), Tree("b", [Tree("c")])])
    push_message = longpoll._pushing(lambda: link.messages.append(("msg", tree)))
    push_object = longpoll._pushing(lambda oid: link.objects.__setitem__(oid, b"x"))
    push_message()
    for oid in ("m", "a", "b"):
        push_object(oid)
        t.join(0.3)
        assert t.is_alive(), f"answered before object c arrived (after {oid})"
    push_object("c")
    t.join(20)
    assert not t.is_alive() and out["r"].messages_list == ["msg"]


def test_a_pull_that_must_not_be_held_answers_at_once_and_an_empty_hold_answers_empty():
    link = Link()
    # the ServerApp's pull names no reply: not held (the thread would otherwise wait a minute)
    t, out = _in_thread(lambda: _held(link, should_hold=lambda req: False)(request=object(), state=None, store=link))
    t.join(20)
    assert not t.is_alive() and out["r"].messages_list == [] and link.pulls == 1
    # with a short hold and nothing pushed, the answer is empty, after a few re-checks
    r = _held(link, hold=0.6)(request=object(), state=None, store=link)
    assert r.messages_list == [] and link.pulls >= 3


def test_install_patches_flowers_handlers_once(monkeypatch):
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    from flwr.superlink.servicer.control import control_handlers

    names = ("pull_messages", "push_messages", "push_object")
    hooks = [(m, n) for m in (fleet_handlers, runtime_handlers) for n in names]
    hooks += [(runtime_handlers, "acquire_task"), (control_handlers, "start_run")]
    for mod, n in hooks:
        monkeypatch.setattr(mod, n, getattr(mod, n))  # restored after the test
    monkeypatch.setenv(longpoll.TASK_POLL_ENV, "1")  # so that the test's value is undone afterwards
    monkeypatch.delenv(longpoll.TASK_POLL_ENV)
    assert longpoll.install(hold=0) == 0 and not hasattr(fleet_handlers.pull_messages, "_fedgen_longpoll")
    assert longpoll.TASK_POLL_ENV not in os.environ
    assert longpoll.install(hold=1.5) == 1.5
    first = {(m.__name__, n): getattr(m, n) for m, n in hooks}
    # every pull waits (including the SuperExec's poll for a new run), every push and StartRun wakes them
    assert all(getattr(f, "_fedgen_longpoll", False) for f in first.values())
    assert os.environ[longpoll.TASK_POLL_ENV] == "0.05"
    longpoll.install(hold=1.5)  # idempotent: no wrapper around a wrapper
    assert first == {(m.__name__, n): getattr(m, n) for m, n in hooks}


def test_hold_from_the_environment(monkeypatch):
    monkeypatch.setenv("FEDGEN_LONG_POLL", "0")
    assert longpoll.hold_seconds() == 0.0
    monkeypatch.setenv("FEDGEN_LONG_POLL", "1000")
    assert longpoll.hold_seconds() == 20.0  # below Flower's 30 s client timeout
    for bad in ("soon", "nan"):
        monkeypatch.setenv("FEDGEN_LONG_POLL", bad)
        with pytest.raises(ConfigError, match="FEDGEN_LONG_POLL must be a number of seconds"):
            longpoll.hold_seconds()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(round(s, 6))
        self.now += s


@pytest.fixture()
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(polling, "time", types.SimpleNamespace(monotonic=c.monotonic, sleep=c.sleep))
    return c


def test_the_backoff_is_a_period_between_checks(clock):
    shim = polling.adaptive_sleep(lambda s: s >= 1.0, idle_floor=0.01, busy_floor=0.001)
    shim.sleep(3.0)  # first idle wait: the floor
    assert clock.slept == [0.01]
    clock.now += 0.004  # a quick check (4 ms) is taken off the next wait
    shim.sleep(3.0)
    assert clock.slept[-1] == pytest.approx(0.01 - 0.004)
    for _ in range(200):  # waiting longer: the wait grows towards a tenth of the time waited, up to the cap
        clock.now += 0.004
        shim.sleep(3.0)
    assert 0.1 < clock.slept[-1] < 3.0
    clock.now += 2.0  # a check the server held (a long poll): the next one follows at once
    n = len(clock.slept)
    shim.sleep(3.0)
    assert len(clock.slept) == n  # no sleep at all
    shim.sleep(0.5)  # another kind (a busy wait) starts its own backoff at its floor
    assert clock.slept[-1] == 0.001
    shim.reset_backoff()
    shim.sleep(0.5)
    assert clock.slept[-1] == 0.001


def test_a_site_workers_task_poll_waits_in_the_supernode_until_a_request_is_stored():
    class Resp:
        def __init__(self, task=None):
            self.task = task

        def HasField(self, name):  # noqa: N802 - protobuf's name
            return self.task is not None

    pending: list[str] = []
    handlers = types.SimpleNamespace(acquire_task=lambda request, state: Resp(pending.pop() if pending else None))
    assert longpoll.hold_task_polls(handlers, hold=HOLD) == HOLD
    held = handlers.acquire_task
    assert getattr(held, "_fedgen_longpoll", False)
    longpoll.hold_task_polls(handlers, hold=HOLD)
    assert handlers.acquire_task is held  # idempotent
    t, out = _in_thread(lambda: handlers.acquire_task(object(), None))
    t.join(0.3)
    assert t.is_alive()  # no task yet: the poll waits
    pending.append("task-1")
    longpoll.notify()  # what the SuperNode does once it has stored a request
    t.join(20)
    assert not t.is_alive() and out["r"].task == "task-1"


def test_a_node_gets_one_held_pull_at_a_time():
    """A second concurrent pull of the same node is answered at once (a node cannot tie up the
    server's threads with held pulls); another node's pull is held as usual."""
    link = Link()
    pull = _held(link)
    node = lambda n: types.SimpleNamespace(node=types.SimpleNamespace(node_id=n))  # noqa: E731
    first, _ = _in_thread(lambda: pull(request=node(1), state=None, store=link))
    first.join(0.3)
    assert first.is_alive()
    second, out = _in_thread(lambda: pull(request=node(1), state=None, store=link))
    second.join(20)
    assert not second.is_alive() and out["r"].messages_list == []
    other, _ = _in_thread(lambda: pull(request=node(2), state=None, store=link))
    other.join(0.3)
    assert other.is_alive()
    link.objects["m"] = b"x"
    longpoll._pushing(lambda: link.messages.append(("msg", Tree("m"))))()
    first.join(0.5)
    other.join(0.5)
    longpoll._pushing(lambda: link.messages.append(("msg", Tree("m"))))()  # one for each waiting node
    first.join(20)
    other.join(20)
    assert not first.is_alive() and not other.is_alive()


# ----------------------------------------------------------------------------- red team 3


def test_a_hold_that_is_not_a_finite_number_is_refused(monkeypatch):
    """FEDGEN_LONG_POLL=nan passed the clamp as NaN: the deadline never came and cond.wait(NaN)
    returns at once, so a held pull re-ran Flower's pull handler in a tight loop until a message
    came (one core per waiting node), then handed it to a caller that had long given up."""
    for text in ("nan", "NaN", "-nan"):
        monkeypatch.setenv("FEDGEN_LONG_POLL", text)
        with pytest.raises(ConfigError, match="FEDGEN_LONG_POLL"):
            longpoll.hold_seconds()
    monkeypatch.setenv("FEDGEN_LONG_POLL", "inf")
    assert longpoll.hold_seconds() == 20.0
    monkeypatch.setenv("FEDGEN_LONG_POLL", "-inf")
    assert longpoll.hold_seconds() == 0.0
    link = Link()
    with pytest.raises(ValueError, match="hold"):
        _held(link, hold=float("nan"))


def test_bad_long_poll_setting_stops_the_superlink_and_supernode_with_one_line(monkeypatch):
    """A garbage FEDGEN_LONG_POLL is a configuration error: the process stops with one line
    naming the variable, not with a traceback half-way through patching Flower."""
    from fedgen.federation import flwr_compat, supernode
    from fedgen.node import superlink

    monkeypatch.setenv("FEDGEN_LONG_POLL", "soon")
    monkeypatch.setattr(flwr_compat, "require", lambda *a, **k: None)
    monkeypatch.setattr(flwr_compat, "fast_object_pulls", lambda *a, **k: None, raising=False)
    installed = []
    monkeypatch.setattr(superlink, "_install", lambda hosts: installed.append(hosts))
    monkeypatch.setattr(supernode, "_adaptive_polls", lambda: installed.append("polls"))
    monkeypatch.setattr(supernode, "setup_plain_logging", lambda: None)
    monkeypatch.setattr(supernode, "_use_fedgen_superexec", lambda: installed.append("superexec"))
    for mod in (superlink, supernode):
        monkeypatch.setattr("sys.argv", ["prog"])
        with pytest.raises(SystemExit) as exc:
            mod.main()
        assert "FEDGEN_LONG_POLL" in str(exc.value.code) and "\n" not in str(exc.value.code)
    assert installed == []  # nothing patched before the refusal


def test_held_pulls_leave_the_servers_worker_threads_free():
    """Every node may hold one pull; the SuperLink answers its Fleet, Runtime and Control APIs
    from one pool of worker threads (Starlette's default: 40). With more nodes (or sites) than
    that, held pulls took every thread, the pushes that would answer them queued behind them, and
    each step of a round waited for a hold to run out. At most MAX_HELD pulls are held at once
    in a process; a further one is answered at once, as without long polls."""
    link = Link()
    pull = _held(link)
    node = lambda n: types.SimpleNamespace(node=types.SimpleNamespace(node_id=n))  # noqa: E731
    n = longpoll.MAX_HELD + 10
    threads = [_in_thread(lambda i=i: pull(request=node(i), state=None, store=link)) for i in range(n)]
    import time as _t

    for _ in range(400):  # settle (no duration asserted): the pulls over the cap come back empty at once
        if sum(t.is_alive() for t, _ in threads) <= longpoll.MAX_HELD:
            break
        _t.sleep(0.05)
    alive = sum(t.is_alive() for t, _ in threads)
    assert alive == longpoll.MAX_HELD and longpoll.MAX_HELD < 40
    link.objects["m"] = b"x"
    for _ in range(alive):  # release the held ones: one message each
        longpoll._pushing(lambda: link.messages.append(("msg", Tree("m"))))()
        for _ in range(100):
            if sum(t.is_alive() for t, _ in threads) < alive:
                break
            _t.sleep(0.05)
        alive = sum(t.is_alive() for t, _ in threads)
    assert alive == 0
