"""Site node deployment pieces: configs, keys, the PKI script, `fedgen node check` (one test per
failing check), the aggregator's admin gate, plain node logs, and the files in ``nodes/``."""

from __future__ import annotations

import datetime as dt
import http.server
import logging
import os
import re
import ssl
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest

from conftest import split_sites
from fedgen.cli import main
from fedgen.errors import ConfigError, FedgenError
from fedgen.node import pki
from fedgen.node.check import FAIL, OK, SKIP, WARN, run_checks
from fedgen.node.config import load_aggregator_config, load_site_config
from fedgen.node.ops import init_site
from fedgen.testing import make_synth

REPO = Path(__file__).resolve().parent.parent
NODES = REPO / "nodes"


# ---------------------------------------------------------------- certificates made in-process


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(path: Path, *, days: float = 3650, start_days_ago: float = 1, cn: str = "test CA"):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=start_days_ago))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(ca, cert_path: Path, key_path: Path, *, days: float = 365, names=("127.0.0.1", "localhost")):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)


class _TlsServer:
    """A tiny HTTPS server on 127.0.0.1 standing in for the aggregator's /health."""

    def __init__(self, cert: Path, key: Path, *, status: int = 200) -> None:
        code = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(code if self.path == "/health" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- a site set up with `node init`


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A valid site node (data, state folder, policy, key, CA) and a stand-in aggregator."""
    monkeypatch.chdir(tmp_path)
    data = make_synth(n_samples=40, n_variants=30, seed=5)
    nc = split_sites(data, tmp_path / "data", [1.0])["site1"]
    ca = make_ca(tmp_path / "pki" / "ca.pem")
    make_server_cert(ca, tmp_path / "pki" / "server.pem", tmp_path / "pki" / "server.key")
    server = _TlsServer(tmp_path / "pki" / "server.pem", tmp_path / "pki" / "server.key")
    res = init_site(
        site="hk",
        vcf=nc["vcf"],
        samples=nc["samples"],
        state_dir=tmp_path / "state",
        aggregator=f"127.0.0.1:{server.port}",
        ca_cert=tmp_path / "pki" / "ca.pem",
    )
    yield {"config": res.config, "tmp": tmp_path, "ca": ca, "server": server, "nc": nc}
    server.close()


def _check(config: Path, **kw) -> dict[str, tuple[str, str]]:
    kw.setdefault("timeout", 3.0)
    return {c.name: (c.status, c.detail) for c in run_checks(config, **kw)}


def _edit(config: Path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (a TOML literal) in ``[section]`` of a node config."""
    lines = config.read_text().splitlines()
    out, in_sec, done = [], False, False
    for ln in lines:
        if ln.startswith("["):
            if in_sec and not done:
                out.append(f"{key} = {value}")
                done = True
            in_sec = ln.strip() == f"[{section}]"
        if in_sec and re.match(rf"^{key}\s*=", ln):
            ln, done = f"{key} = {value}", True
        out.append(ln)
    if in_sec and not done:
        out.append(f"{key} = {value}")
    config.write_text("\n".join(out) + "\n")


def test_healthy_node_passes_every_check(site, capsys):
    assert main(["node", "check", "--config", str(site["config"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[1] for ln in lines]
    assert names == ["config", "state_dir", "vcf", "samples", "cache", "policy", "training", "ca_cert", "node_key", "aggregator",
                     "audit_log"]
    assert all(ln.startswith("OK ") for ln in lines), lines
    assert "built now" in lines[4]
    assert main(["node", "check", "--config", str(site["config"]), "--no-build"]) == 0  # now current
    assert "current (" in capsys.readouterr().out


def test_check_config_missing_or_invalid(site, tmp_path, capsys):
    r = _check(tmp_path / "nope.toml")
    assert r == {"config": (FAIL, f"{tmp_path / 'nope.toml'}: node config not found")}
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nname = 1")
    assert "not valid TOML" in _check(bad)["config"][1]
    cfg = site["config"]
    _edit(cfg, "site", "nmae", '"hk"')
    assert re.search(r"unknown key\(s\) in \[site\]: nmae", _check(cfg)["config"][1])
    _edit(cfg, "site", "nmae", '"x"')
    cfg.write_text(cfg.read_text().replace('nmae = "x"\n', ""))
    _edit(cfg, "aggregator", "address", '"no-port"')
    assert "expected HOST:PORT" in _check(cfg)["config"][1]
    _edit(cfg, "aggregator", "address", '"127.0.0.1:1"')
    _edit(cfg, "site", "name", '"h k"')
    assert "use letters, digits" in _check(cfg)["config"][1]
    assert main(["node", "check", "--config", str(cfg)]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 1  # nothing else can be checked


def test_check_state_dir_missing_or_open(site):
    cfg = site["config"]
    os.chmod(site["tmp"] / "state", 0o755)
    r = _check(cfg)
    assert r["state_dir"][0] == WARN and "chmod 700" in r["state_dir"][1]
    _edit(cfg, "site", "state_dir", f'"{site["tmp"] / "elsewhere"}"')
    r = _check(cfg)
    assert r["state_dir"][0] == FAIL and "not found" in r["state_dir"][1]
    assert r["cache"][0] == SKIP


def test_check_vcf_missing_or_not_a_vcf(site):
    cfg = site["config"]
    _edit(cfg, "site", "vcf", '"missing.vcf.gz"')
    r = _check(cfg)
    assert r["vcf"][0] == FAIL and "file not found" in r["vcf"][1]
    assert r["samples"][0] == SKIP and r["cache"][0] == SKIP
    (site["tmp"] / "notes.txt").write_text("hello\n")
    _edit(cfg, "site", "vcf", f'"{site["tmp"] / "notes.txt"}"')
    assert "not a VCF or BCF" in _check(cfg)["vcf"][1]


def test_check_samples_invalid_or_not_matching(site):
    cfg = site["config"]
    bad = site["tmp"] / "bad.tsv"
    bad.write_text("ID,age\nA,3\n")
    _edit(cfg, "site", "samples", f'"{bad}"')
    r = _check(cfg)
    assert r["samples"][0] == FAIL and "no IID column" in r["samples"][1] and "tab-separated" in r["samples"][1]
    bad.write_text("IID\tage\nnobody\t3\n")
    r = _check(cfg)
    assert r["samples"][0] == FAIL and "no IID matches a VCF sample" in r["samples"][1]
    assert r["cache"][0] == SKIP


def test_check_cache_not_built_or_unbuildable(site):
    cfg = site["config"]
    r = _check(cfg, build_cache=False)
    assert r["cache"][0] == FAIL and "not built" in r["cache"][1]
    broken = site["tmp"] / "broken.vcf"
    header = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tS1\n"
    broken.write_text(header + "1\tnot-a-position\t.\tA\tG\t.\t.\t.\tGT\t0/1\n")
    samples = site["tmp"] / "s1.tsv"
    samples.write_text("IID\nS1\n")
    _edit(cfg, "site", "vcf", f'"{broken}"')
    _edit(cfg, "site", "samples", f'"{samples}"')
    r = _check(cfg)
    assert r["vcf"][0] == OK and r["samples"][0] == OK  # the header is fine ...
    assert r["cache"][0] == FAIL and "broken.vcf" in r["cache"][1]  # ... the records are not


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "policy file not found"),
        ("version = [", "not valid TOML"),
        ("__DEFAULT__\nmax_variants = 10\n", "unknown key(s): max_variants"),
        ("__DEFAULT__", None),
        ("version = 1\n", "missing key(s): allowed_analyses, min_count"),
    ],
)
def test_check_policy_syntax_and_keys(site, text, message):
    policy = site["tmp"] / "state" / "policy.toml"
    default = policy.read_text()
    if text is None:
        policy.unlink()
    else:
        policy.write_text(text.replace("__DEFAULT__", default))
    status, detail = _check(site["config"])["policy"]
    if message is None:
        assert status == OK
    else:
        assert status == FAIL and message in detail, detail


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("min_count", "0", "min_count must be a whole number >= 1"),
        ("epsilon_budget", "-1.0", "epsilon_budget must be a number > 0"),
        ("delta", "1.5", "delta must be a number in (0, 1)"),
        ("max_variants_per_request", '"many"', "max_variants_per_request must be a whole number"),
        ("allowed_analyses", '["genotype_counts", "everything"]', "unknown analysis everything"),
        ("allowed_analyses", "[]", "allowed_analyses is empty"),
        ("version", "2", "version must be 1"),
    ],
)
def test_check_policy_values(site, key, value, message):
    policy = site["tmp"] / "state" / "policy.toml"
    data = tomllib.loads(policy.read_text())
    text = "\n".join(f"{k} = {value if k == key else _toml(v)}" for k, v in data.items())
    policy.write_text(text + "\n")
    status, detail = _check(site["config"])["policy"]
    assert status == FAIL and message in detail, detail


def _toml(v) -> str:  # noqa: ANN001
    import tomli_w

    return tomli_w.dumps({"x": v})[4:].strip()


def test_check_ca_cert_missing_not_ca_expired_or_expiring(site):
    cfg, tmp = site["config"], site["tmp"]
    _edit(cfg, "aggregator", "ca_cert", '"missing.pem"')
    r = _check(cfg)
    assert r["ca_cert"][0] == FAIL and "certificate file not found" in r["ca_cert"][1]
    assert r["aggregator"][0] == SKIP
    _edit(cfg, "aggregator", "ca_cert", f'"{tmp / "pki" / "server.pem"}"')
    assert "not a CA certificate" in _check(cfg)["ca_cert"][1]
    make_ca(tmp / "old.pem", days=-2, start_days_ago=400)
    _edit(cfg, "aggregator", "ca_cert", f'"{tmp / "old.pem"}"')
    status, detail = _check(cfg, network=False)["ca_cert"]
    assert status == FAIL and "expired 2 days ago" in detail
    make_ca(tmp / "soon.pem", days=10.5)
    _edit(cfg, "aggregator", "ca_cert", f'"{tmp / "soon.pem"}"')
    status, detail = _check(cfg, network=False)["ca_cert"]
    assert status == FAIL and "expires in 10 days" in detail
    assert _check(cfg, network=False, min_days=5)["ca_cert"][0] == OK


def test_check_node_key_missing_open_mismatched_or_wrong_type(site):
    cfg, tmp = site["config"], site["tmp"]
    key = tmp / "state" / "keys" / "node.key"
    os.chmod(key, 0o644)
    status, detail = _check(cfg, network=False)["node_key"]
    assert status == FAIL and "readable beyond its owner" in detail and "chmod 600" in detail
    os.chmod(key, 0o600)
    other = tmp / "other" / "node.key"
    pki.generate_node_key(other, other.with_suffix(".key.pub"))
    _edit(cfg, "auth", "public_key", f'"{other.with_suffix(".key.pub")}"')
    assert "does not belong to" in _check(cfg, network=False)["node_key"][1]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = tmp / "ed.key"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    os.chmod(ed, 0o600)
    _edit(cfg, "auth", "private_key", f'"{ed}"')
    assert "not an ECDSA key" in _check(cfg, network=False)["node_key"][1]
    _edit(cfg, "auth", "private_key", '"gone.key"')
    assert "private key file not found" in _check(cfg, network=False)["node_key"][1]


def test_check_aggregator_refused_untrusted_expiring_or_not_fedgen(site):
    cfg, tmp = site["config"], site["tmp"]
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    _edit(cfg, "aggregator", "address", f'"127.0.0.1:{closed}"')
    status, detail = _check(cfg)["aggregator"]
    assert status == FAIL and "connection refused" in detail

    other_ca = make_ca(tmp / "other" / "ca.pem", cn="someone else")
    make_server_cert(other_ca, tmp / "other" / "server.pem", tmp / "other" / "server.key")
    make_server_cert(site["ca"], tmp / "soon.pem", tmp / "soon.key", days=3)
    make_server_cert(site["ca"], tmp / "named.pem", tmp / "named.key", names=("aggregator.example.org",))
    cases = [
        (_TlsServer(tmp / "other" / "server.pem", tmp / "other" / "server.key"), "TLS certificate not accepted"),
        (_TlsServer(tmp / "soon.pem", tmp / "soon.key"), "the aggregator's certificate expires in 3 days"),
        (_TlsServer(tmp / "named.pem", tmp / "named.key"), "does the aggregator certificate name 127.0.0.1"),
        (_TlsServer(tmp / "pki" / "server.pem", tmp / "pki" / "server.key", status=503), "/health answered"),
    ]
    try:
        for server, message in cases:
            _edit(cfg, "aggregator", "address", f'"127.0.0.1:{server.port}"')
            status, detail = _check(cfg)["aggregator"]
            assert status == FAIL and message in detail, detail
    finally:
        for server, _ in cases:
            server.close()


def test_check_audit_log_must_be_json_lines(site):
    log = site["tmp"] / "state" / "audit.jsonl"
    log.write_text('{"time": "2025-01-01T00:00:00Z", "analysis": "ping"}\n{"time": "2025-01-02T00:00:00Z"}\n')
    status, detail = _check(site["config"], network=False)["audit_log"]
    assert status == OK and "2 entries, last at 2025-01-02" in detail
    log.write_text('{"time": 1}\nnot json\n')
    status, detail = _check(site["config"], network=False)["audit_log"]
    assert status == FAIL and "line 2 is not JSON" in detail


def test_check_exit_codes_and_one_line_per_check(site, capsys):
    (site["tmp"] / "state" / "policy.toml").write_text("version = 1\n")
    assert main(["node", "check", "--config", str(site["config"]), "--offline"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11
    assert [ln.split()[0] for ln in lines].count("FAIL") == 1
    assert lines[9].startswith("SKIP aggregator") and lines[6].startswith("OK   training")


# ---------------------------------------------------------------- node init, keys, rotation


def test_node_init_writes_private_files_and_keeps_keys(site, tmp_path):
    state = tmp_path / "state"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    for p in (state / "node.toml", state / "policy.toml", state / "keys" / "node.key"):
        assert p.stat().st_mode & 0o077 == 0, p
    c = load_site_config(site["config"])
    assert c.node_config() == {
        "site": "hk",
        "vcf": site["nc"]["vcf"],
        "samples": site["nc"]["samples"],
        "state_dir": str(state),
        "policy": str(state / "policy.toml"),
        "audit_payloads": "true",
        "audit_payload_retention_days": "0",
        "threads": "0",
        "row_cache_mb": "256",
    }
    fp = pki.fingerprint_public_key(c.public_key)
    with pytest.raises(ConfigError, match="already exists"):
        init_site(site="hk", vcf="a", samples="b", state_dir=state, aggregator="x:1", ca_cert=tmp_path / "pki" / "ca.pem")
    init_site(site="hk", vcf="a", samples="b", state_dir=state, aggregator="x:1", ca_cert=tmp_path / "pki" / "ca.pem", force=True)
    assert pki.fingerprint_public_key(c.public_key) == fp  # the key survives --force
    with pytest.raises(ConfigError, match="not a CA certificate"):
        init_site(
            site="sz", vcf="a", samples="b", state_dir=tmp_path / "sz", aggregator="x:1", ca_cert=tmp_path / "pki" / "server.pem"
        )
    with pytest.raises(ConfigError, match="HOST:PORT"):
        init_site(site="sz", vcf="a", samples="b", state_dir=tmp_path / "sz", aggregator="x", ca_cert=tmp_path / "pki" / "ca.pem")


def test_fingerprint_matches_ssh_keygen(tmp_path):
    pub = tmp_path / "k.pub"
    fp = pki.generate_node_key(tmp_path / "k", pub)
    ssh_keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True)
    if ssh_keygen.returncode != 0:
        pytest.skip("ssh-keygen not available")
    assert fp in ssh_keygen.stdout and "(ECDSA)" in ssh_keygen.stdout
    with pytest.raises(FedgenError, match="not overwriting"):
        pki.generate_node_key(tmp_path / "k", pub)


def test_rotate_key_retires_the_old_pair(site, capsys):
    c = load_site_config(site["config"])
    old = pki.fingerprint_public_key(c.public_key)
    assert main(["node", "rotate-key", "--config", str(site["config"])]) == 0
    out = capsys.readouterr().out
    new = pki.fingerprint_public_key(c.public_key)
    assert new != old and new in out
    retired = list((c.private_key.parent / "retired").glob("node-*.key.pub"))
    assert len(retired) == 1 and pki.fingerprint_public_key(retired[0]) == old
    assert _check(site["config"], network=False)["node_key"][0] == OK


# ---------------------------------------------------------------- the PKI script


def test_make_certs_script(tmp_path):
    script = NODES / "make-certs.sh"
    assert os.access(script, os.X_OK)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(script), *args], cwd=tmp_path, capture_output=True, text=True)

    assert run("ca", "--dir", "pki").returncode == 0
    res = run("server", "--dir", "pki", "--host", "agg.example.org", "--host", "203.0.113.7")
    assert res.returncode == 0, res.stderr
    assert run("site", "--dir", "pki", "hk").returncode == 0
    pkd = tmp_path / "pki"
    info = pki.read_cert_info(pkd / "server.pem")[0]
    assert set(info.names) == {"agg.example.org", "203.0.113.7", "localhost", "127.0.0.1", "::1"}
    assert not info.is_ca and 820 < info.days_left() < 826
    assert pki.read_cert_info(pkd / "ca.pem")[0].is_ca
    assert pki.verify_issued_by(pkd / "server.pem", pkd / "ca.pem")
    assert pki.cert_matches_key(pkd / "server.pem", pkd / "server.key")
    assert pki.key_pair_matches(pkd / "sites" / "hk" / "node.key", pkd / "sites" / "hk" / "node.key.pub")
    for secret in ("ca.key", "server.key", "sites/hk/node.key"):
        assert (pkd / secret).stat().st_mode & 0o077 == 0, secret
    again = run("ca", "--dir", "pki")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert run("site", "--dir", "pki", "h k").returncode != 0
    assert "server.pem" in run("show", "--dir", "pki").stdout


# ---------------------------------------------------------------- aggregator config and gate


def test_aggregator_init_checks_tls_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ca = make_ca(tmp_path / "ca.pem")
    make_server_cert(ca, tmp_path / "server.pem", tmp_path / "server.key")
    make_server_cert(ca, tmp_path / "public.pem", tmp_path / "public.key", names=("agg.example.org",))
    other = make_ca(tmp_path / "other.pem")
    make_server_cert(other, tmp_path / "foreign.pem", tmp_path / "foreign.key")
    base = ["aggregator", "init", "--state-dir", "agg", "--ca-cert", "ca.pem"]
    assert main([*base, "--cert", "server.pem", "--key", "public.key"]) == 2
    assert "is not the private key of" in capsys.readouterr().err
    assert main([*base, "--cert", "foreign.pem", "--key", "foreign.key", "--force"]) == 2
    assert "was not issued by the CA" in capsys.readouterr().err
    assert main([*base, "--cert", "public.pem", "--key", "public.key", "--force"]) == 2
    assert "does not name 127.0.0.1" in capsys.readouterr().err
    assert main([*base, "--cert", "server.pem", "--key", "server.key", "--force", "--port", "9443"]) == 0
    c = load_aggregator_config(tmp_path / "agg" / "aggregator.toml")
    assert (c.port, c.host, c.local_address) == (9443, "0.0.0.0", "127.0.0.1:9443")
    assert c.allowed_admin_hosts() == ["127.0.0.1", "::1"]
    c.host = "10.1.2.3"
    assert c.allowed_admin_hosts() == ["127.0.0.1", "::1", "10.1.2.3"]
    c.admin_hosts = ["10.9.9.9"]  # loopback stays allowed: the aggregator's own processes use it
    assert c.allowed_admin_hosts() == ["127.0.0.1", "::1", "10.9.9.9", "10.1.2.3"]


def test_aggregator_command_has_tls_auth_and_no_installs(tmp_path, monkeypatch):
    from fedgen.node.ops import aggregator_command, init_aggregator

    monkeypatch.chdir(tmp_path)
    ca = make_ca(tmp_path / "ca.pem")
    make_server_cert(ca, tmp_path / "server.pem", tmp_path / "server.key")
    cfg = init_aggregator(state_dir="agg", ca_cert="ca.pem", cert="server.pem", key="server.key", port=9092)
    argv, env = aggregator_command(load_aggregator_config(cfg))
    joined = " ".join(argv)
    assert "--insecure" not in argv and "--enable-supernode-auth" in argv
    assert f"--ssl-certfile {tmp_path / 'server.pem'}" in joined and f"--ssl-ca-certfile {tmp_path / 'ca.pem'}" in joined
    assert "--disable-runtime-dependency-installation" in argv
    assert f"--database {tmp_path / 'agg' / 'superlink.db'}" in joined
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FEDGEN_ADMIN_HOSTS"] == "127.0.0.1,::1"


def test_node_command_has_tls_auth_and_no_installs(site):
    from fedgen.node.ops import site_command

    c = load_site_config(site["config"])
    argv, env = site_command(c)
    assert argv[1:3] == ["-m", "fedgen.federation.supernode"]
    assert "--insecure" not in argv and "--allow-runtime-dependency-installation" not in argv
    i = argv.index
    assert argv[i("--root-certificates") + 1] == str(c.ca_cert)
    assert argv[i("--auth-supernode-private-key") + 1] == str(c.private_key)
    assert argv[i("--host") + 1] == "127.0.0.1"
    node_cfg = Path(argv[i("--node-config") + 1])
    assert tomllib.loads(node_cfg.read_text()) == c.node_config()
    assert node_cfg.stat().st_mode & 0o077 == 0
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_supernode_refuses_runtime_installs(monkeypatch):
    import sys

    from fedgen.federation import supernode

    monkeypatch.setattr(sys, "argv", ["x", "--allow-runtime-dependency-installation"])
    with pytest.raises(SystemExit, match="never install packages"):
        supernode.main()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_admin_gate_keeps_control_api_to_admin_hosts():
    import warnings

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's notice about its httpx test client
        from starlette.testclient import TestClient

    from fedgen.node.superlink import AdminGate

    async def ok(request):  # noqa: ANN001, ANN202
        return PlainTextResponse("ok")

    routes = [Route(p, ok, methods=["GET", "POST"]) for p in ("/health", "/v1/fleet/pull-messages", "/v1/control/start-run",
                                                              "/v1/control/register-node", "/v1/runtime/pull-task-input", "/docs")]  # fmt: skip
    outsider = TestClient(Starlette(routes=routes, middleware=[Middleware(AdminGate, allow=["127.0.0.1", "::1"])]))
    assert outsider.get("/health").status_code == 200
    assert outsider.post("/v1/fleet/pull-messages").status_code == 200
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/pull-task-input", "/docs"):
        assert outsider.post(path).status_code == 403, path
    admin = TestClient(Starlette(routes=routes, middleware=[Middleware(AdminGate, allow=["testclient"])]))
    assert admin.post("/v1/control/register-node").status_code == 200
    gate = AdminGate(None, allow=["127.0.0.1", "::1"])  # type: ignore[arg-type]
    assert gate.permitted("/v1/control/start-run", "::ffff:127.0.0.1")  # IPv4-mapped loopback
    assert not gate.permitted("/v1/control/start-run", "10.0.0.8")
    assert not gate.permitted("/v1/control/start-run", None)


# ---------------------------------------------------------------- plain node logs


def test_node_logs_fold_flower_chatter(capfd):
    from fedgen.federation.supernode import setup_plain_logging

    root = logging.getLogger()
    flwr_logger = logging.getLogger("flwr")
    saved = (list(root.handlers), root.level, flwr_logger.handlers[:], flwr_logger.propagate, flwr_logger.level)
    flwr_logger.setLevel(logging.WARNING)  # as `fedgen` CLI logging leaves it: the node setup must undo that
    try:
        setup_plain_logging("INFO")
        setup_plain_logging("INFO")  # twice: still one handler
        from flwr.supercore import log as flog

        flog(logging.INFO, "")
        flog(logging.INFO, "[RUN %s, ROUND %s]", 7, "fedgen-3-genotype_counts")
        flog(logging.INFO, "Receiving: %s message (ID: %s)", "query.fedgen", "ab" * 32)
        flog(logging.INFO, "Received successfully")
        flog(logging.INFO, "Start `flwr-clientapp` process")
        flog(logging.INFO, "[RUN %s, ROUND %s]", 7, "fedgen-3-genotype_counts")
        flog(logging.INFO, "Sending: %s message (ID: %s)", "query.fedgen", "cd" * 32)
        flog(logging.WARNING, "Connection attempt failed, retrying in %.2f seconds", 1.5)
        logging.getLogger("fedgen.site").warning("refused request: %s", "not allowed")
        logging.getLogger("uvicorn.access").info('127.0.0.1:1 - "POST /v1/fleet/pull-messages HTTP/1.1" 200')
        err = capfd.readouterr().err
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for h in saved[2]:
            if h not in flwr_logger.handlers:
                flwr_logger.addHandler(h)
        flwr_logger.propagate = saved[3]
        flwr_logger.setLevel(saved[4])
    lines = [re.sub(r"^\S+ \S+ ", "", ln) for ln in err.splitlines()]
    assert lines == [
        "INFO flwr: run 7: request fedgen-3-genotype_counts received (query.fedgen, message abababababab)",
        "INFO flwr: run 7: reply fedgen-3-genotype_counts sent (query.fedgen, message cdcdcdcdcdcd)",
        "WARNING flwr: Connection attempt failed, retrying in 1.50 seconds",
        "WARNING fedgen.site: refused request: not allowed",
    ], err


# ---------------------------------------------------------------- files in nodes/


def test_templates_in_nodes_load_and_match_what_init_writes(site):
    from fedgen.node.policy import known_analyses, validate_policy

    example = load_site_config(NODES / "node.example.toml")
    written = load_site_config(site["config"])
    assert example.site == "hk" and example.aggregator.endswith(":9092")
    keys = lambda p: {s: set(v) for s, v in tomllib.loads(Path(p).read_text()).items()}  # noqa: E731
    assert keys(NODES / "node.example.toml") == keys(site["config"])
    assert written.runtime_port == example.runtime_port
    agg = load_aggregator_config(NODES / "aggregator.example.toml")
    assert agg.port == 9092 and agg.admin_hosts == ["127.0.0.1", "::1"]
    policy = tomllib.loads((NODES / "policy.example.toml").read_text())
    assert validate_policy(policy, known_analyses=known_analyses()) == []


def test_service_files_run_fedgen_commands():
    import yaml

    from fedgen.cli import build_parser

    parser = build_parser()
    commands = []
    for unit in (NODES / "systemd").glob("*.service"):
        text = unit.read_text()
        m = re.search(r"^ExecStart=/opt/fedgen/\.venv/bin/fedgen (.+)$", text, re.M)
        assert m, unit
        commands.append(m.group(1).replace("%i", "hk").split())
        assert "ReadWritePaths=" in text and "NoNewPrivileges=yes" in text
    compose = yaml.safe_load((NODES / "compose" / "compose.yaml").read_text())
    node = compose["services"]["node"]
    commands.append(node["command"])
    assert "ports" not in node  # outbound only
    assert any(v.endswith(":/data:ro") for v in node["volumes"])
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command in ("node", "aggregator") and args.config.endswith(".toml"), argv
    assert len(commands) == 3


def test_check_policy_reports_installed_fedgen_and_accepted_fabs(site, capsys):
    """`node check` names the installed fedgen and which study FABs the node accepts."""
    import fedgen

    policy = site["tmp"] / "state" / "policy.toml"
    status, detail = _check(site["config"], network=False)["policy"]
    assert status == OK
    assert f"installed fedgen {fedgen.__version__}" in detail
    assert f"accepted fedgen versions: {fedgen.__version__}; accepted FAB hashes: none" in detail
    text = policy.read_text().replace(f'accepted_fedgen_versions = ["{fedgen.__version__}"]', 'accepted_fedgen_versions = ["0.0.1"]')
    policy.write_text(text)
    status, detail = _check(site["config"], network=False)["policy"]
    assert status == WARN and "refuses every study" in detail, detail
    policy.write_text(text.replace("accepted_fab_hashes = []", f'accepted_fab_hashes = ["{"ab" * 32}"]'))
    status, detail = _check(site["config"], network=False)["policy"]
    assert status == OK and "accepted FAB hashes: abababababab…" in detail, detail


def test_node_start_runs_with_safe_path_and_names_the_boundary(site):
    import fedgen
    from fedgen.node.ops import code_boundary_summary, site_command

    c = load_site_config(site["config"])
    _, env = site_command(c)
    assert env["PYTHONSAFEPATH"] == "1"
    line = code_boundary_summary(c.policy)
    assert f"runs only its installed fedgen {fedgen.__version__} ClientApp" in line and "accepted FAB hashes: none" in line


def test_node_with_a_plink_fileset_passes_its_checks(site, capsys):
    """A site holding a PLINK 1 fileset instead of a VCF: node.toml `bed = PREFIX` (one genotype input only)."""
    pytest.importorskip("pgenlib")
    from test_site_inputs import write_bed

    from fedgen.cohort.cohort import load_cohort

    cohort = load_cohort(site["nc"])
    prefix = site["tmp"] / "data" / "cohort"
    write_bed(cohort, prefix)
    _edit(site["config"], "site", "bed", f'"{prefix}"')
    with pytest.raises(ConfigError, match="exactly one genotype input"):
        load_site_config(site["config"])  # vcf and bed both set
    lines = [ln for ln in site["config"].read_text().splitlines() if not ln.startswith("vcf =")]
    site["config"].write_text("\n".join(lines) + "\n")
    c = load_site_config(site["config"])
    assert c.genotype_kind == "bed" and c.node_config()["bed"] == str(prefix) and "vcf" not in c.node_config()
    assert main(["node", "check", "--config", str(site["config"])]) == 0
    out = capsys.readouterr().out
    assert "PLINK 1 fileset, 40 samples" in out and "built now" in out
