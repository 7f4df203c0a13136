"""Flower layer: wire format, FlowerTransport (fake Grid), and end-to-end runs on real Flower.

The ``slow`` tests start a real ``flower-superlink`` and ``flower-supernode``s on
127.0.0.1 and submit with ``flwr run``; each checks that no process it started
(or any of their children) is left running.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedgen.errors import FedgenError, SiteError
from fedgen.federation.flower import (
    FlowerTransport,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    error_reply,
)
from fedgen.federation.transport import Request

# ---------------------------------------------------------------- wire format


def test_request_roundtrip_keeps_arrays_and_params():
    arrays = {
        "idx": np.arange(5, dtype=np.int64),
        "flip": np.array([True, False]),
        "x": np.linspace(0, 1, 6).reshape(2, 3).astype(np.float32),
        "empty": np.zeros((0, 4)),
        "scalar": np.array(7, dtype=np.uint16),
    }
    params = {"block": 3, "name": 'a "quoted" päram', "nested": {"k": [1, 2.5, None]}}
    analysis, p, a = decode_request(encode_request("genotype_counts", params, arrays))
    assert analysis == "genotype_counts" and p == params
    assert list(a) == list(arrays)
    for k, v in arrays.items():
        assert a[k].dtype == v.dtype and a[k].shape == v.shape
        np.testing.assert_array_equal(a[k], v)


def test_array_pack_refuses_what_is_not_plain_numbers():
    import struct

    from fedgen.errors import FedgenError
    from fedgen.federation.flower import pack_arrays, unpack_arrays

    for bad in (np.array(["rs1"]), np.array([object()]), np.zeros(2, dtype=[("a", "i4")]), np.array([1j])):
        with pytest.raises(FedgenError, match="cannot be sent"):
            pack_arrays({"x": bad})
    good = pack_arrays({"a": np.arange(4, dtype=np.int64)})
    n = struct.unpack("<I", good[4:8])[0]

    def with_header(header: list) -> bytes:
        h = json.dumps(header).encode()
        return good[:4] + struct.pack("<I", len(h)) + h + good[8 + n:]

    cases = {
        "not a fedgen array pack": b"NOPE" + good[4:],
        "runs past the end": good[:4] + struct.pack("<I", 10**6) + good[8:],
        "does not fit": with_header([{"name": "a", "dtype": "<i8", "shape": [5], "offset": 0, "nbytes": 40}]),
        "not accepted": with_header([{"name": "a", "dtype": "|O", "shape": [4], "offset": 0, "nbytes": 32}]),
        "repeated": with_header([{"name": "a", "dtype": "<i8", "shape": [1], "offset": 0, "nbytes": 8}] * 2),
        "bad shape": with_header([{"name": "a", "dtype": "<i8", "shape": [-1], "offset": 0, "nbytes": 8}]),
    }
    for why, blob in cases.items():
        with pytest.raises(FedgenError, match=why):
            unpack_arrays(blob)
    out = unpack_arrays(good)["a"]
    out[0] = 9  # decoded arrays are writable copies
    np.testing.assert_array_equal(unpack_arrays(good)["a"], np.arange(4))


def test_reply_roundtrip_and_nbytes():
    arrays = {"counts": np.ones((3, 4), dtype=np.int64)}
    meta = {"site": "hk", "n": 12}
    a, m, nbytes = decode_reply(encode_reply(arrays, meta))
    assert m == meta
    np.testing.assert_array_equal(a["counts"], arrays["counts"])
    # .npy payload (96 data bytes + header) + meta JSON
    assert nbytes >= 96 + len(json.dumps(meta))
    _, m, _ = decode_reply(error_reply("no consent"))
    assert m == {"error": "no consent"}


def test_object_arrays_are_refused():
    with pytest.raises(FedgenError, match="dtype object"):
        encode_request("x", {}, {"bad": np.array([{"a": 1}], dtype=object)})


def test_fab_carries_no_code():
    """The FAB `flwr run` ships holds only pyproject.toml: sites import their installed fedgen."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from fedgen.federation.local import APP_DIR

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(APP_DIR)))
    assert sorted(fab.namelist()) == [".info/CONTENT", "pyproject.toml"]
    text = fab.read("pyproject.toml").decode()
    assert 'clientapp = "fedgen.federation.client_app:app"' in text
    assert 'serverapp = "fedgen.federation.server_app:app"' in text


# ---------------------------------------------------------------- transport on a fake Grid


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Creating a flwr Message outside a Flower process needs a task identity (flwr 1.41)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Grid stand-in that runs fedgen's ClientApp in-process for each node."""

    def __init__(self, node_configs: dict[int, dict[str, str]], *, silent: set[int] = frozenset()):
        from fedgen.federation.client_app import app

        self.app = app
        self.node_configs = node_configs
        self.silent = set(silent)
        self.replies: dict[str, object] = {}
        self.sent = 0

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages):
        from flwr.app import Context, RecordDict

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            ids.append(msg.metadata.message_id)
            self.sent += 1
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            ctx = Context(run_id=1, node_id=node, node_config=self.node_configs[node], state=RecordDict(), run_config={})
            reply = self.app(msg, ctx)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def test_transport_maps_sites_and_queries():
    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}})
    t = FlowerTransport(grid, expected_sites=["sz", "hk"], connect_timeout=2, timeout=2)
    assert t.sites() == ["sz", "hk"]
    assert t.node_ids() == {"sz": 22, "hk": 11}
    replies = t.query(Request("ping"))
    assert {s: r.meta["site"] for s, r in replies.items()} == {"sz": "sz", "hk": "hk"}
    assert all(r.nbytes > 0 for r in replies.values())


def test_transport_site_refusal_names_site():
    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}})
    t = FlowerTransport(grid, expected_sites=["hk", "sz"], connect_timeout=2, timeout=2)
    with pytest.raises(SiteError, match=r"^site hk: unknown analysis 'nope'") as ei:
        t.query(Request("nope"))
    assert ei.value.site == "hk" and "also failed: site sz" in str(ei.value)


def test_transport_missing_site():
    grid = FakeGrid({11: {"site": "hk"}})
    t0 = time.monotonic()
    with pytest.raises(SiteError, match=r"site sz: did not connect within 0.5 s \(connected: hk"):
        FlowerTransport(grid, expected_sites=["hk", "sz"], connect_timeout=0.5, timeout=1)
    assert time.monotonic() - t0 < 5


def test_transport_duplicate_and_unknown_sites():
    with pytest.raises(SiteError, match="site hk: 2 SuperNodes claim this site name"):
        FlowerTransport(FakeGrid({1: {"site": "hk"}, 2: {"site": "hk"}}), expected_sites=["hk"], connect_timeout=1, timeout=1)
    with pytest.raises(FedgenError, match="unknown site.*xx"):
        FlowerTransport(FakeGrid({1: {"site": "hk"}, 2: {"site": "xx"}}), expected_sites=["hk"], connect_timeout=1, timeout=1)


def test_transport_silent_site_times_out():
    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}})
    t = FlowerTransport(grid, expected_sites=["hk", "sz"], connect_timeout=2, timeout=0.3)
    grid.silent.add(22)
    with pytest.raises(SiteError, match=r"^site sz: did not answer within 0.3 s$"):
        t.query(Request("ping"))


def test_transport_without_expected_sites_takes_all_connected():
    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}})
    t = FlowerTransport(grid, expected_sites=None, connect_timeout=0.3, timeout=1)
    assert t.sites() == ["hk", "sz"]


def test_flower_error_reply_becomes_site_error():
    from flwr.app import Error, Message

    class ErrGrid(FakeGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            if messages and messages[0].metadata.group_id.endswith("-boom"):
                for msg, mid in zip(messages, ids):
                    err = Message(Error(code=3, reason="ClientApp crashed"), reply_to=msg)
                    self.replies[mid] = err
            return ids

    t = FlowerTransport(ErrGrid({5: {"site": "hk"}}), expected_sites=["hk"], connect_timeout=1, timeout=1)
    with pytest.raises(SiteError, match="site hk: Flower error 3: ClientApp crashed"):
        t.query(Request("boom"))


def _run_server_main(grid, plan, capsys):
    from flwr.app import Context, RecordDict

    from fedgen.federation.server_app import STATUS_MARKER, main

    capsys.readouterr()
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"plan": json.dumps(plan)})
    main(grid, ctx)
    err = capsys.readouterr().err
    marker = [line for line in err.splitlines() if line.startswith(STATUS_MARKER)]
    assert len(marker) == 1
    status = json.loads(Path(plan["status_file"]).read_text())
    assert json.loads(marker[0][len(STATUS_MARKER) :]) == status
    return status, err


def test_server_app_ok_error_and_internal_error(tmp_path, capsys, caplog, monkeypatch):
    import fedgen.federation.server_app as server_app

    monkeypatch.setattr(server_app, "_setup_logging", lambda: None)  # keep this process's logging as is
    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}})
    plan = {"task": "ping", "output_dir": str(tmp_path / "out"), "sites": ["hk", "sz"], "timeout": 2,
            "connect_timeout": 1, "status_file": str(tmp_path / "st" / "status.json")}  # fmt: skip
    status, _ = _run_server_main(grid, plan, capsys)
    assert status == {"status": "ok"}
    assert set(json.loads((tmp_path / "out" / "manifest.json").read_text())["sites"]) == {"hk", "sz"}

    caplog.clear()
    status, _ = _run_server_main(grid, {**plan, "sites": ["hk", "sz", "mo"]}, capsys)
    assert status["status"] == "error" and status["message"].startswith("site mo: did not connect within 1 s")
    assert "Traceback" not in caplog.text

    (tmp_path / "file").write_text("")
    status, _ = _run_server_main(grid, {**plan, "output_dir": str(tmp_path / "file" / "out")}, capsys)
    assert status["status"] == "error" and status["message"].startswith("internal error: NotADirectoryError")
    assert "Traceback" in caplog.text and "Traceback" not in status["message"]  # logged, not reported


# ---------------------------------------------------------------- end to end on real Flower


def _processes_with_flwr_home_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose FLWR_HOME lies under ``root`` (every Flower process we start has one)."""
    root_s = str(root)
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            if stat[stat.rfind(")") + 2 :].split()[0] == "Z":
                continue
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"FLWR_HOME=") and item[len(b"FLWR_HOME=") :].decode(errors="replace").startswith(root_s):
                found.append((int(name), cmd))
    return found


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def _assert_all_stopped(workdir: Path, pids: list[int]) -> None:
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        left = _processes_with_flwr_home_under(workdir)
        alive = [p for p in pids if _pid_alive(p)]
        if not left and not alive:
            return
        time.sleep(0.1)
    pytest.fail(f"processes left running: started pids {alive}; with our FLWR_HOME: {left}")


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks need Linux /proc")


@pytest.mark.slow
@needs_proc
def test_local_ping_study_two_sites(tmp_path):
    from fedgen.federation.local import LocalFederation

    workdir = tmp_path / "work dir"  # a space on purpose
    odd = str(tmp_path / "data dir" / "it's a \"vcf\".vcf.gz")
    out = tmp_path / "out"
    t0 = time.monotonic()
    pids: list[int] = []
    with LocalFederation({"hk": {"vcf": odd}, "sz": {}}, workdir=workdir) as fed:
        pids = fed.pids()
        assert len(pids) == 3
        fed.run({"task": "ping", "output_dir": str(out), "sites": ["hk", "sz"], "timeout": 20, "connect_timeout": 20})
        started = fed.procs.all_idents()
    _assert_all_stopped(workdir, pids + [p for p, _ in started])
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["sites"]) == {"hk", "sz"}
    assert manifest["sites"]["hk"]["site"] == "hk"
    assert (workdir / "nodes" / "hk.toml").read_text().count("data dir") == 1
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
@needs_proc
def test_local_missing_site_fails_clearly(tmp_path):
    from fedgen.federation.local import LocalFederation

    workdir = tmp_path / "work"
    pids: list[int] = []
    with LocalFederation({"hk": {}}, workdir=workdir) as fed:
        pids = fed.pids()
        with pytest.raises(FedgenError, match=r"site sz: did not connect within 3 s \(connected: hk"):
            fed.run(
                {"task": "ping", "output_dir": str(tmp_path / "out"), "sites": ["hk", "sz"], "timeout": 10, "connect_timeout": 3}
            )
    _assert_all_stopped(workdir, pids)


@pytest.mark.slow
@needs_proc
def test_run_study_local_site_error_names_site(tmp_path):
    """A site that refuses (its VCF does not exist) fails the study with its name; nothing is left running."""
    from fedgen.federation.local import run_study_local

    workdir = tmp_path / "work"
    ncs = {
        "hk": {"vcf": str(tmp_path / "missing-hk.vcf.gz"), "samples": str(tmp_path / "hk.tsv")},
        "sz": {"vcf": str(tmp_path / "missing-sz.vcf.gz"), "samples": str(tmp_path / "sz.tsv")},
    }
    plan = {"output_dir": str(tmp_path / "out"), "sites": ["hk", "sz"], "timeout": 20, "connect_timeout": 20}
    with pytest.raises(FedgenError, match=r"site (hk|sz): .*missing-(hk|sz)\.vcf\.gz") as ei:
        run_study_local(plan, ncs, workdir=workdir)
    assert "Traceback" not in str(ei.value)
    _assert_all_stopped(workdir, [])
