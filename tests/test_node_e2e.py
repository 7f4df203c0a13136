"""Deployment end to end on loopback: PKI script, aggregator and site nodes with TLS and node
authentication started through ``fedgen`` commands, a QC study through ``federation=remote``,
an unregistered node and a node with the wrong CA turned away, every process stopped."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_federation_flower import _pid_alive, _processes_with_flwr_home_under

REPO = Path(__file__).resolve().parent.parent
MAKE_CERTS = REPO / "nodes" / "make-certs.sh"
FEDGEN = [sys.executable, "-m", "fedgen.cli"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks need Linux /proc"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    return res.stdout


def _wait(cond, timeout: float, what: str, interval: float = 0.3):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def _assert_plain_log(text: str, name: str, *, unique: bool) -> None:
    assert "\x1b[" not in text, f"{name}: colour codes in log"
    assert "Successfully installed" not in text, f"{name}: misleading install message"
    if unique:  # a site node logs each event once (requests and replies carry message ids)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        dups = sorted({ln for ln in lines if lines.count(ln) > 1})
        assert not dups, f"{name}: duplicated lines: {dups[:3]}"


def test_deployment_tls_node_auth_remote_study(tmp_path):
    from fedgen.federation.local import ProcessSet
    from fedgen.study.launch import run_study

    t0 = time.monotonic()
    w = tmp_path
    logs = w / "logs"
    logs.mkdir()
    procs = ProcessSet()
    started: list[int] = []
    idents: set = set()

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        fh = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the test ends
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        p = procs.spawn(name, argv, env=env, cwd=w, stdout=fh)
        fh.close()
        started.append(p.pid)
        return p

    try:
        # -- data and PKI (the study CA, the aggregator certificate, sz's key from the script)
        _ok(_run([*FEDGEN, "simulate", "--out", "data", "--sites", "hk=200,sz=150", "--variants", "2000"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "ca", "--dir", "pki"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "server", "--dir", "pki", "--host", "127.0.0.1"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "site", "--dir", "pki", "sz"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "ca", "--dir", "other-pki", "--name", "some other CA"], w))
        assert oct((w / "pki" / "ca.key").stat().st_mode & 0o777) == "0o600"

        # -- aggregator
        port = _free_port()
        agg_cfg = w / "agg" / "aggregator.toml"
        _ok(_run([*FEDGEN, "aggregator", "init", "--state-dir", "agg", "--ca-cert", "pki/ca.pem", "--cert", "pki/server.pem",
                  "--key", "pki/server.key", "--host", "127.0.0.1", "--port", str(port)], w))  # fmt: skip
        agg = spawn("aggregator", [*FEDGEN, "aggregator", "start", "--config", str(agg_cfg)])

        # -- site nodes: hk makes its key with `node init`, sz uses the one from the script
        address = f"127.0.0.1:{port}"
        sites = {
            "hk": ["--ca-cert", "pki/ca.pem"],
            "sz": ["--ca-cert", "pki/ca.pem", "--private-key", "pki/sites/sz/node.key"],
            "mo": ["--ca-cert", "pki/ca.pem"],  # never registered
            "xx": ["--ca-cert", "other-pki/ca.pem"],  # registered, but trusts the wrong CA
        }
        inits = {}
        for site, extra in sites.items():  # in parallel: four `fedgen node init`
            data = "hk" if site in ("mo", "xx") else site
            inits[site] = subprocess.Popen(
                [*FEDGEN, "node", "init", "--site", site, "--vcf", f"data/{data}/genotypes.vcf.gz",
                 "--samples", f"data/{data}/samples.tsv", "--state-dir", f"nodes/{site}", "--aggregator", address,
                 "--runtime-port", str(_free_port()), "--poll-interval", "0.2", *extra],
                cwd=w, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        for p in inits.values():
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0 and "node public key:" in out, out
        assert (w / "nodes" / "hk" / "keys" / "node.key").stat().st_mode & 0o077 == 0
        assert (w / "nodes" / "hk" / "policy.toml").exists()

        def health() -> bool:
            ctx = ssl.create_default_context(cafile=str(w / "pki" / "ca.pem"))
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=ctx) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(lambda: agg.poll() is not None or health(), 40, "the aggregator to answer over TLS")
        assert agg.poll() is None, (logs / "aggregator.log").read_text()[-3000:]
        for site, key in (("hk", "nodes/hk/keys/node.key.pub"), ("sz", "pki/sites/sz/node.key.pub"),
                          ("xx", "nodes/xx/keys/node.key.pub")):  # fmt: skip
            out = _ok(_run([*FEDGEN, "aggregator", "register", "--config", str(agg_cfg), site, key], w))
            assert re.search(rf"registered site {site}: node id \d+, key SHA256:", out), out

        # -- the doctor passes for hk (data, cache, policy, certificates, key, aggregator over TLS)
        out = _ok(_run([*FEDGEN, "node", "check", "--config", "nodes/hk/node.toml"], w))
        assert [ln.split()[0] for ln in out.splitlines()] == ["OK"] * 11, out
        assert "TLSv1.3" in out or "TLSv1.2" in out

        # -- start the nodes
        nodes = {s: spawn(f"node-{s}", [*FEDGEN, "node", "start", "--config", f"nodes/{s}/node.toml"]) for s in sites}

        for s in ("hk", "sz"):
            _wait(lambda s=s: "SuperNode ID:" in (logs / f"node-{s}.log").read_text(), 60, f"node {s} to connect")
        out = _ok(_run([*FEDGEN, "aggregator", "nodes", "--config", str(agg_cfg)], w))
        status = {r[0]: r[2] for r in (ln.split() for ln in out.splitlines()[1:]) if len(r) >= 3}
        assert status["hk"] == status["sz"] == "online", out
        assert status.get("xx") != "online" and "mo" not in status, out

        # -- rejected nodes exit by themselves, with the reason in their log
        for site, reason in (("mo", "Failed to activate SuperNode"), ("xx", "CERTIFICATE_VERIFY_FAILED")):
            _wait(lambda p=nodes[site]: p.poll() is not None, 30, f"node {site} to be turned away")
            assert nodes[site].returncode != 0
            assert reason in (logs / f"node-{site}.log").read_text(), (logs / f"node-{site}.log").read_text()[-2000:]
        res = _run([*FEDGEN, "node", "check", "--config", "nodes/xx/node.toml"], w)
        assert res.returncode == 1
        assert re.search(r"^FAIL aggregator .*TLS certificate not accepted", res.stdout, re.M), res.stdout
        assert "Failed to activate" not in (logs / "node-hk.log").read_text()

        # -- the QC study through federation=remote, results at the aggregator
        cfg = w / "cfg" / "sites"
        cfg.mkdir(parents=True)
        (cfg / "study.yaml").write_text("hk: null\nsz: null\n")
        res = _run([*FEDGEN, "run", "federation=remote", f"federation.control_address={address}",
                    "federation.root_certificates=pki/ca.pem", "sites=study", f"hydra.searchpath=[file://{w / 'cfg'}]",
                    "study=qc", "output_dir=results/qc", "federation.run_timeout=120"], w, timeout=180)  # fmt: skip
        _ok(res)
        assert "connected sites: hk" in res.stdout + res.stderr  # progress streamed from the ServerApp
        manifest = json.loads((w / "results" / "qc" / "manifest.json").read_text())
        assert manifest["federation"] == "remote"
        assert set(manifest["sites"]) == {"hk", "sz"}

        # same study, same data, all sites in one process: identical PLINK files
        (cfg / "local.yaml").write_text(yaml.safe_dump({s: {"vcf": f"data/{s}/genotypes.vcf.gz",
                                                            "samples": f"data/{s}/samples.tsv"} for s in ("hk", "sz")}))  # fmt: skip
        run_study(["federation=inprocess", "sites=local", f"hydra.searchpath=[file://{w / 'cfg'}]", "study=qc",
                   "output_dir=results/qc-inprocess"], base_dir=w)  # fmt: skip
        for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "variants.tsv"):
            assert (w / "results" / "qc" / name).read_text() == (w / "results" / "qc-inprocess" / name).read_text(), name

        # -- logs: plain, no duplicated lines, no access-log spam, one line per request and reply
        hk_log = (logs / "node-hk.log").read_text()
        _assert_plain_log(hk_log, "node-hk", unique=True)
        assert re.search(r"run \d+: request fedgen-\d+-genotype_counts received", hk_log)
        assert re.search(r"run \d+: reply fedgen-\d+-genotype_counts sent", hk_log)
        assert "uvicorn" not in hk_log and "HTTP/1.1" not in hk_log
        agg_log = (logs / "aggregator.log").read_text()
        _assert_plain_log(agg_log, "aggregator", unique=False)
        access = [ln for ln in agg_log.splitlines() if "HTTP/1.1" in ln]
        assert access and all("/v1/control/" in ln or re.search(r'" [45]\d\d$', ln) for ln in access), access
        assert "BEGIN PUBLIC KEY" not in agg_log  # rejected keys are shown as fingerprints
        assert agg.poll() is None and nodes["hk"].poll() is None and nodes["sz"].poll() is None
        idents |= procs.all_idents()
    finally:
        procs.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = _processes_with_flwr_home_under(tmp_path) + [(p, "") for p in started if _pid_alive(p)]
        left += [(i[0], "") for i in idents if _pid_alive(i[0])]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left running: {left}"
    assert time.monotonic() - t0 < 120


def test_key_rotation_revocation_and_admin_gate(tmp_path):
    """A site rotates its key (register new, restart, revoke old); revoking the live key
    disconnects the node; a SuperLink whose admin hosts exclude this machine refuses Control
    API calls (registering a key) but still serves the Fleet API."""
    from fedgen.federation.local import ProcessSet, flower_env, write_connection

    w = tmp_path
    logs = w / "logs"
    logs.mkdir()
    procs = ProcessSet()
    started: list[int] = []

    def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logs / f"{name}.log", "ab") as fh:
            p = procs.spawn(name, argv, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=w, stdout=fh)
        started.append(p.pid)
        return p

    def node_ids(log: str) -> list[str]:
        return re.findall(r"SuperNode ID: (\d+)", (logs / log).read_text())

    try:
        _ok(_run(["bash", str(MAKE_CERTS), "ca", "--dir", "pki"], w))
        _ok(_run(["bash", str(MAKE_CERTS), "server", "--dir", "pki", "--host", "127.0.0.1"], w))
        _ok(_run([*FEDGEN, "simulate", "--out", "data", "--sites", "hk=60", "--variants", "200"], w))
        port = _free_port()
        cfg = str(w / "agg" / "aggregator.toml")
        _ok(_run([*FEDGEN, "aggregator", "init", "--state-dir", "agg", "--ca-cert", "pki/ca.pem", "--cert", "pki/server.pem",
                  "--key", "pki/server.key", "--host", "127.0.0.1", "--port", str(port)], w))  # fmt: skip
        agg = spawn("aggregator", [*FEDGEN, "aggregator", "start", "--config", cfg])
        _ok(_run([*FEDGEN, "node", "init", "--site", "hk", "--vcf", "data/hk/genotypes.vcf.gz", "--samples",
                  "data/hk/samples.tsv", "--state-dir", "hk", "--aggregator", f"127.0.0.1:{port}", "--ca-cert",
                  "pki/ca.pem", "--runtime-port", str(_free_port())], w))  # fmt: skip
        _wait(
            lambda: "Uvicorn running on https://" in (logs / "aggregator.log").read_text() or agg.poll() is not None,
            40,
            "aggregator",
        )
        _ok(_run([*FEDGEN, "aggregator", "register", "--config", cfg, "hk", "hk/keys/node.key.pub"], w))
        node = spawn("node-1", [*FEDGEN, "node", "start", "--config", "hk/node.toml"])
        old_id = _wait(lambda: node_ids("node-1.log"), 40, "hk to connect")[0]

        # -- rotation: new key registered, node restarted with it, old key revoked
        out = _ok(_run([*FEDGEN, "node", "rotate-key", "--config", "hk/node.toml"], w))
        assert "new node public key:" in out and list((w / "hk" / "keys" / "retired").glob("node-*.key"))
        _ok(_run([*FEDGEN, "aggregator", "register", "--config", cfg, "hk", "hk/keys/node.key.pub"], w))
        procs.stop_one(node)
        node = spawn("node-2", [*FEDGEN, "node", "start", "--config", "hk/node.toml"])
        new_id = _wait(lambda: node_ids("node-2.log"), 40, "hk to reconnect with its new key")[0]
        assert new_id != old_id
        out = _ok(_run([*FEDGEN, "aggregator", "unregister", "--config", cfg, "hk", "--node-id", old_id], w))
        assert f"revoked site hk: node id(s) {old_id}" in out
        rows = {
            r[1]: r[2]
            for r in (ln.split() for ln in _ok(_run([*FEDGEN, "aggregator", "nodes", "--config", cfg], w)).splitlines()[1:])
        }
        assert rows[old_id] == "revoked" and rows[new_id] == "online", rows

        # -- revoking the live key disconnects the node; it cannot come back
        _ok(_run([*FEDGEN, "aggregator", "unregister", "--config", cfg, "hk"], w))
        _wait(lambda: node.poll() is not None, 30, "the revoked node to be disconnected")
        assert node.returncode == 0  # a clean stop: systemd's Restart=on-failure leaves it down
        again = spawn("node-3", [*FEDGEN, "node", "start", "--config", "hk/node.toml"])
        _wait(lambda: again.poll() is not None, 30, "the revoked node to be refused")
        assert again.returncode != 0 and "Failed to activate SuperNode" in (logs / "node-3.log").read_text()

        # -- admin gate on a real SuperLink: this machine is not an admin host there
        gport = _free_port()
        env = flower_env(w / "gate-home", {"FEDGEN_ADMIN_HOSTS": "192.0.2.1"})
        spawn("gated", [sys.executable, "-m", "fedgen.node.superlink", "--ssl-certfile", "pki/server.pem", "--ssl-keyfile",
                        "pki/server.key", "--ssl-ca-certfile", "pki/ca.pem", "--enable-supernode-auth", "--host",
                        "127.0.0.1", "--port", str(gport)], env)  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(w / "pki" / "ca.pem"))

        def post(path: str) -> int:
            req = urllib.request.Request(f"https://127.0.0.1:{gport}{path}", data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        _wait(lambda: post("/v1/fleet/activate-node") != 0, 40, "the gated SuperLink")
        assert post("/v1/control/register-node") == 403
        assert post("/v1/control/start-run") == 403
        assert post("/v1/runtime/pull-task-input") == 403
        assert post("/v1/fleet/activate-node") not in (0, 403)  # reaches Flower (unsigned: rejected there)
        write_connection(
            w / "gate-cli", "gated", address=f"127.0.0.1:{gport}", insecure=False, root_certificates=str(w / "pki" / "ca.pem")
        )
        res = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "register", "hk/keys/node.key.pub", "gated"],
                             cwd=w, capture_output=True, text=True, timeout=60, env=flower_env(w / "gate-cli"))  # fmt: skip
        assert "registered successfully" not in res.stdout, res.stdout
        assert "refused POST /v1/control/register-node from 127.0.0.1" in (logs / "gated.log").read_text()
    finally:
        procs.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = _processes_with_flwr_home_under(tmp_path) + [(p, "") for p in started if _pid_alive(p)]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left running: {left}"
