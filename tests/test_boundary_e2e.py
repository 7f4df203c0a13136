"""The code boundary at a site, end to end on loopback (real Flower processes, 127.0.0.1 only).

A run whose FAB carries its own ClientApp (``evil/client.py``), or a shadow copy of
``fedgen/federation/client_app.py``, that would send the site's raw genotype matrix back is
submitted to a running deployment. No site executes it (its code writes a marker file at
import and in its handler: the file never appears), every site refuses the run before opening
its data and logs the refusal with the FAB hash, and the aggregator receives only those
refusals. With the FAB's hash in the sites' policies the run is accepted, and the sites still
answer it with their installed fedgen ClientApp only. The approved study then runs as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_federation_flower import _pid_alive, _processes_with_flwr_home_under
from test_node_e2e import _free_port, _ok, _run, _wait

REPO = Path(__file__).resolve().parent.parent
MAKE_CERTS = REPO / "nodes" / "make-certs.sh"
FEDGEN = [sys.executable, "-m", "fedgen.cli"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks need Linux /proc"),
]


# ---------------------------------------------------------------- the malicious study app

_MARK = '''\
import json as _json, os as _os, sys as _sys
def _mark(what):
    with open({marker!r}, "a") as _fh:
        _fh.write(_json.dumps({{"what": what, "pid": _os.getpid(), "argv": _sys.argv,
                                "flwr_home": _os.environ.get("FLWR_HOME")}}) + "\\n")
'''

EVIL_CLIENT = '''\
{mark}
_mark("imported " + __name__)

import gzip

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _genotypes(vcf):
    rows = []
    with gzip.open(vcf, "rt") as fh:
        for line in fh:
            if not line.startswith("#"):
                gts = [f.split(":")[0].replace("|", "/").split("/") for f in line.rstrip("\\n").split("\\t")[9:]]
                rows.append([sum(int(a) for a in g if a.isdigit()) for g in gts])
    return np.asarray(rows, dtype=np.int8)


def _leak(msg, context):
    _mark("handler " + msg.metadata.message_type)
    g = _genotypes(str(context.node_config["vcf"]))
    meta = ConfigRecord({{"protocol": 1, "meta": _json.dumps({{"site": str(context.node_config.get("site"))}})}})
    return Message(RecordDict({{"fedgen": meta, "arrays": ArrayRecord({{"genotypes": Array(g)}})}}), reply_to=msg)


@app.query("fedgen")
def fedgen_query(msg, context):
    return _leak(msg, context)


@app.query("evil")
def evil_query(msg, context):
    return _leak(msg, context)


@app.train()
def train(msg, context):
    return _leak(msg, context)
'''

EVIL_SERVER = '''\
"""Sends each node a fedgen query and a foreign one; records every reply it gets."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def packed_names(blob):
    """Names of the arrays in fedgen's packed-array bytes (written out: fedgen is not installed here)."""
    if not blob:
        return []
    n = int.from_bytes(blob[4:8], "little")
    return [h["name"] for h in json.loads(blob[8:8 + n].decode())]


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["record"]))
    want = int(context.run_config["sites"])
    deadline = time.monotonic() + 30
    nodes = []
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= want:
            break
        time.sleep(0.2)
    msgs = []
    for n in nodes:
        ping = {"protocol": 2, "analysis": "ping", "params": "{}", "study_id": "", "arrays": b""}
        msgs.append(Message(RecordDict({"fedgen": ConfigRecord(ping)}), n, "query.fedgen"))
        msgs.append(Message(RecordDict({"ask": ConfigRecord({"give": "genotypes"})}), n, "query.evil"))
    replies = list(grid.send_and_receive(msgs, timeout=40))
    record = []
    for r in replies:
        item = {"node": r.metadata.src_node_id, "type": r.metadata.message_type, "error": None, "arrays": {}, "configs": {}}
        if r.has_error():
            item["error"] = r.error.reason
        else:
            item["arrays"] = {k: {n: list(a.shape) for n, a in rec.items()} for k, rec in r.content.array_records.items()}
            item["configs"] = {k: {n: str(v) for n, v in rec.items() if n != "arrays"} for k, rec in r.content.config_records.items()}
            cfg = r.content.config_records.get("fedgen")
            if cfg is not None and "arrays" in cfg:
                try:
                    item["arrays"]["fedgen"] = {n: "packed" for n in packed_names(bytes(cfg["arrays"]))}
                except Exception as exc:  # a reply that is not fedgen's wire format
                    item["arrays"]["fedgen"] = {"undecodable": str(exc)}
        record.append(item)
    out.write_text(json.dumps({"nodes": nodes, "sent": len(msgs), "replies": record}, indent=1))
'''


def _pyproject(name: str, clientapp: str, serverapp: str = "evil.server:app") -> str:
    return textwrap.dedent(
        f"""\
        [project]
        name = "{name}"
        version = "1.0.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "mallory"

        [tool.flwr.app.components]
        serverapp = "{serverapp}"
        clientapp = "{clientapp}"

        [tool.flwr.app.config]
        record = ""
        sites = 0

        [tool.fedgen]
        version = "{__import__('fedgen').__version__}"
        """
    )


def write_evil_apps(root: Path, marker: Path) -> dict[str, Path]:
    """Two malicious study apps: their own ClientApp module, and a shadow of fedgen's."""
    mark = _MARK.format(marker=str(marker))
    client = EVIL_CLIENT.format(mark=mark)
    apps = {
        # clientapp = a module inside the FAB
        "direct": {"evil/__init__.py": "", "evil/server.py": EVIL_SERVER, "evil/client.py": client},
        # clientapp = fedgen's own name, with a copy of that module inside the FAB (first on
        # sys.path under Flower's loader, it would shadow the installed fedgen)
        "shadow": {
            "evil/__init__.py": "",
            "evil/server.py": EVIL_SERVER,
            "fedgen/__init__.py": "",
            "fedgen/federation/__init__.py": "",
            "fedgen/federation/client_app.py": client,
        },
    }
    refs = {"direct": "evil.client:app", "shadow": "fedgen.federation.client_app:app"}
    out = {}
    for kind, files in apps.items():
        d = root / f"evil-{kind}"
        for rel, text in {**files, "pyproject.toml": _pyproject(f"evil-{kind}", refs[kind])}.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        out[kind] = d
    return out


def fab_hash(app: Path) -> str:
    from fedgen.federation.fab_gate import build_fab

    return hashlib.sha256(build_fab(app)).hexdigest()


def submit(app: Path, *, connection: str, flwr_home: Path, record: Path, sites: int, cwd: Path) -> dict:
    """`flwr run APP` (the FAB built by Flower's CLI, as any submitter would); the ServerApp's record."""
    import tomli_w

    from fedgen.federation.local import flower_cmd, flower_env

    cfg = cwd / f"run-config-{record.stem}.toml"
    cfg.write_text(tomli_w.dumps({"record": str(record), "sites": sites}))
    res = subprocess.run(
        [flower_cmd("flwr"), "run", str(app), connection, "--run-config", str(cfg), "--stream"],
        env=flower_env(flwr_home), cwd=cwd, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert record.exists(), f"the ServerApp wrote no record:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(record.read_text())


def assert_nothing_left_the_sites(rec: dict, digest: str, n_sites: int) -> None:
    """Every reply is a refusal naming the run, the FAB hash; no arrays, no site data."""
    assert rec["sent"] == 2 * n_sites and len(rec["replies"]) == 2 * n_sites, rec
    for r in rec["replies"]:
        assert not any(r["arrays"].values()), r  # no array record with any array in it
        text = r["error"] if r["error"] is not None else json.loads(r["configs"]["fedgen"]["meta"])["error"]
        assert re.search(rf"refused run \d+: FAB sha256 {digest} is not accepted by the site's policy", text), r
        assert "not a fedgen study manifest" in text, r


def refusals(state_dir: Path) -> list[dict]:
    from fedgen.site import audit

    assert audit.verify(state_dir) == []
    return [e for e in audit.read(state_dir) if e.get("step") == "fab-check" and e.get("decision") == "refused"]


def set_accepted_hashes(policy: Path, hashes: list[str]) -> None:
    text = policy.read_text()
    line = "accepted_fab_hashes = [" + ", ".join(f'"{h}"' for h in hashes) + "]"
    text, n = re.subn(r"(?m)^accepted_fab_hashes\s*=.*$", line, text)
    policy.write_text(text if n else text + "\n" + line + "\n")


def assert_evil_fab_is_live(app: Path, tmp: Path) -> None:
    """Control: under Flower's own ClientApp loader this FAB's code does run (writes the marker)."""
    marker_text = _MARK.split("open(")[0]  # sanity: the app carries the marker code
    assert marker_text and "_mark(" in (app / "evil" / "client.py").read_text()
    home = tmp / "control-flwr-home"
    code = textwrap.dedent(
        f"""
        import hashlib, sys
        from pathlib import Path
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from fedgen.federation.fab_gate import build_fab
        fab = build_fab(Path({str(app)!r}))
        install_from_fab(fab, skip_prompt=True)
        get_load_client_app_fn("", None, True)("mallory/evil-direct", "1.0.0", hashlib.sha256(fab).hexdigest())
        """
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------- helpers for fedgen commands


def _assert_stopped(root: Path, pids: list[int]) -> None:
    deadline = time.monotonic() + 5
    left: list = []
    while time.monotonic() < deadline:
        left = _processes_with_flwr_home_under(root) + [(p, "") for p in pids if _pid_alive(p)]
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"processes left running: {left}")


# ---------------------------------------------------------------- through `fedgen node start`


def test_sites_never_run_fab_code_deployment(tmp_path):
    """Aggregator and two hospital nodes started with the fedgen commands (TLS, node auth)."""
    from fedgen.federation.local import ProcessSet, write_connection
    from fedgen.study.launch import run_study

    t0 = time.monotonic()
    w = tmp_path
    logs = w / "logs"
    logs.mkdir()
    marker = w / "EVIL-CODE-RAN"
    evil = write_evil_apps(w / "apps", marker)
    hashes = {k: fab_hash(d) for k, d in evil.items()}
    procs = ProcessSet()
    started: list[int] = []
    idents: set = set()

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "ab") as fh:
            p = procs.spawn(name, argv, env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}, cwd=w, stdout=fh)
        started.append(p.pid)
        return p

    try:
        # -- data, PKI, aggregator, two sites (as in the runbook)
        sim = subprocess.Popen([*FEDGEN, "simulate", "--out", "data", "--sites", "hk=120,sz=90", "--variants", "600"],
                               cwd=w, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        _ok(_run(["bash", str(MAKE_CERTS), "ca", "--dir", "pki"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "server", "--dir", "pki", "--host", "127.0.0.1"], w))
        port = _free_port()
        address = f"127.0.0.1:{port}"
        agg_cfg = w / "agg" / "aggregator.toml"
        _ok(_run([*FEDGEN, "aggregator", "init", "--state-dir", "agg", "--ca-cert", "pki/ca.pem", "--cert", "pki/server.pem",
                  "--key", "pki/server.key", "--host", "127.0.0.1", "--port", str(port)], w))  # fmt: skip
        agg = spawn("aggregator", [*FEDGEN, "aggregator", "start", "--config", str(agg_cfg)])
        assert sim.wait(timeout=120) == 0
        sites = ("hk", "sz")
        inits = {
            s: subprocess.Popen(
                [*FEDGEN, "node", "init", "--site", s, "--vcf", f"data/{s}/genotypes.vcf.gz", "--samples",
                 f"data/{s}/samples.tsv", "--state-dir", f"nodes/{s}", "--aggregator", address, "--ca-cert", "pki/ca.pem",
                 "--runtime-port", str(_free_port()), "--poll-interval", "0.1"],
                cwd=w, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            for s in sites
        }
        for p in inits.values():
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out

        def health() -> bool:
            ctx = ssl.create_default_context(cafile=str(w / "pki" / "ca.pem"))
            try:
                with urllib.request.urlopen(f"https://{address}/health", timeout=2, context=ctx) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(lambda: agg.poll() is not None or health(), 40, "the aggregator")
        assert agg.poll() is None, (logs / "aggregator.log").read_text()[-3000:]
        for s in sites:
            _ok(_run([*FEDGEN, "aggregator", "register", "--config", str(agg_cfg), s, f"nodes/{s}/keys/node.key.pub"], w))
        nodes = {s: spawn(f"node-{s}", [*FEDGEN, "node", "start", "--config", f"nodes/{s}/node.toml"]) for s in sites}
        for s in sites:
            _wait(lambda s=s: "SuperNode ID:" in (logs / f"node-{s}.log").read_text(), 60, f"node {s} to connect")
            text = (logs / f"node-{s}.log").read_text()
            assert re.search(r"runs only its installed fedgen \S+ ClientApp .*accepted FAB hashes: none", text), text
        cli_home = w / "mallory"
        write_connection(cli_home, "agg", address=address, insecure=False, root_certificates=str(w / "pki" / "ca.pem"))
        t_setup = time.monotonic() - t0

        # -- 1. the malicious FABs: refused at every site, before any data, and logged
        for kind, app in evil.items():
            rec = submit(app, connection="agg", flwr_home=cli_home, record=w / f"refused-{kind}.json", sites=2, cwd=w)
            assert_nothing_left_the_sites(rec, hashes[kind], n_sites=2)
        assert not marker.exists(), marker.read_text()
        for s in sites:
            entries = refusals(w / "nodes" / s)
            for kind in evil:
                mine = [e for e in entries if e["fab_hash"] == hashes[kind]]
                assert {e["message_type"] for e in mine} == {"query.fedgen", "query.evil"}, entries
                assert all(e["site"] == s and e["bytes"] == 0 and e["arrays"] == [] for e in mine)
                assert all(hashes[kind] in e["reason"] and "not accepted" in e["reason"] for e in mine)
                assert all(e["fab_id"] == f"mallory/evil-{kind}" for e in mine)
            assert not (w / "nodes" / s / "cache").exists()  # no site data was opened (no genotype cache built)
        t_refused = time.monotonic() - t0

        # -- 2. hospitals list those hashes: the runs are accepted, and still only fedgen's ClientApp answers
        for s in sites:
            set_accepted_hashes(w / "nodes" / s / "policy.toml", list(hashes.values()))
        for kind, app in evil.items():
            rec = submit(app, connection="agg", flwr_home=cli_home, record=w / f"accepted-{kind}.json", sites=2, cwd=w)
            by_type: dict[str, list[dict]] = {}
            for r in rec["replies"]:
                by_type.setdefault(r["type"], []).append(r)
                assert "genotypes" not in json.dumps(r["arrays"]), r
            pings = [json.loads(r["configs"]["fedgen"]["meta"]) for r in by_type["query.fedgen"]]
            assert sorted(p["site"] for p in pings) == ["hk", "sz"] and all("error" not in p for p in pings), pings
            for r in by_type["query.evil"]:  # a foreign message type: refused by fedgen's ClientApp
                text = r["error"] or json.loads(r["configs"]["fedgen"]["meta"]).get("error", "")
                assert "query.evil" in text, r
        assert not marker.exists(), marker.read_text()
        for s in sites:
            assert len(refusals(w / "nodes" / s)) == 4  # nothing refused at the FAB check this time
            assert not list((w / "nodes" / s / "flwr").glob("**/evil*")), "a FAB was unpacked at the site"
        t_accepted = time.monotonic() - t0

        # -- 3. the approved study runs normally; results equal an in-process run
        cfg = w / "cfg" / "sites"
        cfg.mkdir(parents=True)
        (cfg / "study.yaml").write_text("hk: null\nsz: null\n")
        (cfg / "local.yaml").write_text(yaml.safe_dump({s: {"vcf": f"data/{s}/genotypes.vcf.gz",
                                                            "samples": f"data/{s}/samples.tsv"} for s in sites}))  # fmt: skip
        manifest = run_study(
            ["federation=remote", f"federation.control_address={address}", f"federation.root_certificates={w / 'pki' / 'ca.pem'}",
             "sites=study", f"hydra.searchpath=[file://{w / 'cfg'}]", "study=qc", "output_dir=results/qc",
             "federation.run_timeout=120"],
            base_dir=w,
        )  # fmt: skip
        assert manifest["federation"] == "remote" and set(manifest["sites"]) == set(sites)
        run_study(["federation=inprocess", "sites=local", f"hydra.searchpath=[file://{w / 'cfg'}]", "study=qc",
                   "output_dir=results/qc-inprocess"], base_dir=w)  # fmt: skip
        for name in ("freq.afreq", "missing.vmiss", "hardy.hardy"):
            assert (w / "results" / "qc" / name).read_text() == (w / "results" / "qc-inprocess" / name).read_text(), name
        assert not marker.exists()
        for s in sites:
            assert not list((w / "nodes" / s / "flwr").glob("**/pyproject.toml")), "a FAB was unpacked at the site"
            log_text = (logs / f"node-{s}.log").read_text()
            assert "Successfully installed" not in log_text
            assert re.search(r"refused run \d+: FAB sha256 [0-9a-f]{64} is not accepted", log_text)
        assert agg.poll() is None and all(n.poll() is None for n in nodes.values())
        idents |= procs.all_idents()
        t_study = time.monotonic() - t0
    finally:
        procs.stop()
    _assert_stopped(tmp_path, started + [i[0] for i in idents])

    # -- control: the same code is live under Flower's own loader (so "no marker" above means something)
    control_marker = w / "control" / "MARKER"
    control = write_evil_apps(w / "control", control_marker)
    assert_evil_fab_is_live(control["direct"], w / "control")
    assert control_marker.exists() and "imported evil.client" in control_marker.read_text()
    print(f"timings: setup {t_setup:.1f} s, refused {t_refused:.1f} s, accepted {t_accepted:.1f} s, study {t_study:.1f} s")
    assert time.monotonic() - t0 < 150


# ---------------------------------------------------------------- the local federation (make demo, tests)


def test_local_federation_refuses_unlisted_fab_and_runs_a_listed_one(tmp_path, monkeypatch):
    """LocalFederation nodes (one task per fresh process here: FEDGEN_SITE_WORKER=0) check the
    study FAB against each site's policy file: refused while neither its fedgen version nor its
    hash is accepted (and logged), accepted once its hash is listed."""
    from fedgen.errors import FedgenError
    from fedgen.federation.fab_gate import study_fab
    from fedgen.federation.local import LocalFederation

    monkeypatch.setenv("FEDGEN_SITE_WORKER", "0")
    t0 = time.monotonic()
    _, digest = study_fab()  # what LocalFederation.run submits (deterministic build)
    ncs = {}
    for s in ("hk", "sz"):
        state = tmp_path / s
        state.mkdir()
        (state / "policy.toml").write_text('accepted_fedgen_versions = []\naccepted_fab_hashes = []\n')
        ncs[s] = {"state_dir": str(state), "policy": str(state / "policy.toml")}
    plan = {"task": "ping", "sites": ["hk", "sz"], "timeout": 20}
    workdir = tmp_path / "work"
    pids: list[int] = []
    with LocalFederation(ncs, workdir=workdir) as fed:
        pids = fed.pids()
        with pytest.raises(FedgenError) as ei:
            fed.run({**plan, "output_dir": str(tmp_path / "refused"), "connect_timeout": 4})
        msg = str(ei.value)
        assert re.search(rf"refused run \d+: FAB sha256 {digest} is not accepted by the site's policy", msg), msg
        assert "accepted fedgen versions: none; accepted FAB hashes: none" in msg
        for s in ("hk", "sz"):
            entries = refusals(tmp_path / s)
            assert entries and all(e["fab_hash"] == digest and e["fab_id"] == "fedgen/fedgen-study" for e in entries)
            set_accepted_hashes(tmp_path / s / "policy.toml", [digest])
        fed.run({**plan, "output_dir": str(tmp_path / "accepted"), "connect_timeout": 20})
        started = [i[0] for i in fed.procs.all_idents()]
    manifest = json.loads((tmp_path / "accepted" / "manifest.json").read_text())
    assert set(manifest["sites"]) == {"hk", "sz"}
    _assert_stopped(workdir, pids + started)
    assert time.monotonic() - t0 < 60
