"""Which FABs a site accepts (fedgen.federation.fab_gate), and the node wrapper's refusals."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

import fedgen
from fedgen.federation.fab_gate import (
    CLIENTAPP_REF,
    SERVERAPP_REF,
    build_fab,
    check_fab,
    check_run,
    study_fab,
    write_study_app,
)
from fedgen.node.policy import load_policy

VERSION = fedgen.__version__


def _fab(files: dict[str, str], tmp_path: Path) -> bytes:
    """A FAB built by Flower's own builder (what `flwr run DIR` submits) from ``files``."""
    app = tmp_path / "app"
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    return build_fab(app)


def _pyproject(clientapp: str = CLIENTAPP_REF, serverapp: str = SERVERAPP_REF, version: str | None = VERSION) -> str:
    text = f"""\
[project]
name = "some-study"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
plan = ""
"""
    if version is not None:
        text += f'\n[tool.fedgen]\nversion = "{version}"\n'
    return text


def test_study_fab_is_a_code_free_manifest_accepted_by_default():
    content, digest = study_fab()
    assert digest == hashlib.sha256(content).hexdigest()
    zf = zipfile.ZipFile(io.BytesIO(content))
    assert sorted(zf.namelist()) == [".info/CONTENT", "pyproject.toml"]
    decision = check_fab(content, load_policy(None))
    accepted, reason, fab_hash, declared = decision  # unpacks as a 4-tuple
    assert accepted and fab_hash == digest and declared == VERSION
    assert "study manifest (no code)" in reason and decision.fab_id == "fedgen/fedgen-study"


def test_study_fab_is_deterministic_and_is_what_flwr_run_builds(tmp_path):
    """Same fedgen + flwr version, same bytes: a site can pin the hash of fedgen's study FAB."""
    a, ha = study_fab()
    b = build_fab(write_study_app(tmp_path / "x" / "fedgen-study"))
    assert a == b and ha == study_fab()[1]
    assert study_fab("9.9.9")[1] != ha  # the declared version is part of the FAB


def test_fab_carrying_code_is_refused_and_reason_names_hash_and_files(tmp_path):
    content = _fab(
        {"pyproject.toml": _pyproject(clientapp="evil.client:app"), "evil/__init__.py": "", "evil/client.py": "x = 1\n"},
        tmp_path,
    )
    accepted, reason, fab_hash, _ = check_fab(content, load_policy(None))
    assert not accepted
    assert fab_hash == hashlib.sha256(content).hexdigest()
    assert f"FAB sha256 {fab_hash} is not accepted by the site's policy" in reason
    assert "evil/client.py" in reason and "not a fedgen study manifest" in reason
    assert f"accepted fedgen versions: {VERSION}; accepted FAB hashes: none" in reason


def test_shadowing_fedgen_inside_the_fab_is_refused(tmp_path):
    """fedgen's own component names, but a copy of fedgen/federation/client_app.py in the FAB."""
    content = _fab(
        {"pyproject.toml": _pyproject(), "fedgen/__init__.py": "", "fedgen/federation/client_app.py": "app = None\n"},
        tmp_path,
    )
    accepted, reason, _, declared = check_fab(content, load_policy(None))
    assert not accepted and declared == VERSION
    assert "fedgen/federation/client_app.py" in reason


@pytest.mark.parametrize(
    "pyproject,policy,message",
    [
        (_pyproject(version="9.9.9"), {"accepted_fedgen_versions": ["9.9.9"]}, f"but this site runs fedgen {VERSION}"),
        (_pyproject(), {"accepted_fedgen_versions": ["0.0.1"]}, "which is not in accepted_fedgen_versions"),
        (_pyproject(), {"accepted_fedgen_versions": []}, "accepted fedgen versions: none"),
        (_pyproject(version=None), {}, "declares no fedgen version"),
        (_pyproject(clientapp="other.client:app"), {}, "its clientapp is 'other.client:app'"),
        (_pyproject(serverapp="other.server:app"), {}, "its serverapp is 'other.server:app'"),
    ],
)
def test_manifest_refusals(tmp_path, pyproject, policy, message):
    content = _fab({"pyproject.toml": pyproject}, tmp_path)
    accepted, reason, _, _ = check_fab(content, load_policy(policy))
    assert not accepted and message in reason, reason


def test_listed_hash_is_accepted_even_with_code(tmp_path):
    content = _fab({"pyproject.toml": _pyproject(clientapp="evil.client:app"), "evil/client.py": "x = 1\n"}, tmp_path)
    digest = hashlib.sha256(content).hexdigest()
    assert not check_fab(content, load_policy(None)).accepted
    decision = check_fab(content, load_policy({"accepted_fab_hashes": [digest.upper()], "accepted_fedgen_versions": []}))
    assert decision.accepted and "accepted_fab_hashes" in decision.reason
    other = "0" * 64
    refused = check_fab(content, load_policy({"accepted_fab_hashes": [other]}))
    assert not refused.accepted and "accepted FAB hashes: 000000000000…" in refused.reason


def test_not_a_fab_is_refused():
    accepted, reason, fab_hash, declared = check_fab(b"not a zip", {})
    assert not accepted and "not a readable FAB archive" in reason
    assert fab_hash == hashlib.sha256(b"not a zip").hexdigest() and declared is None


def test_flower_fab_object_hash_is_recomputed():
    from flwr.supercore.fab import Fab

    content, digest = study_fab()
    decision = check_fab(Fab("f" * 64, content, {}), {})  # a claimed hash is never trusted
    assert decision.accepted and decision.fab_hash == digest


def test_check_run_reads_the_sites_policy(tmp_path):
    content, digest = study_fab()
    assert check_run(content, {"site": "hk"}).accepted  # no policy: defaults
    policy = tmp_path / "policy.toml"
    policy.write_text('accepted_fedgen_versions = ["0.0.1"]\n')
    assert not check_run(content, {"site": "hk", "policy": str(policy)}).accepted
    policy.write_text(f'accepted_fedgen_versions = []\naccepted_fab_hashes = ["{digest}"]\n')
    assert check_run(content, {"site": "hk", "policy": str(policy)}).accepted
    inline = json.dumps({"accepted_fedgen_versions": ["0.0.1"]})
    assert not check_run(content, {"site": "hk", "policy": inline}).accepted
    policy.write_text("version = [\n")
    d = check_run(content, {"site": "hk", "policy": str(policy)})
    assert not d.accepted and "policy cannot be used" in d.reason and d.fab_hash == digest
    d = check_run(content, {"site": "hk", "policy": str(tmp_path / "missing.toml")})
    assert not d.accepted and "policy file not found" in d.reason


def test_submitted_template_declares_installed_version(tmp_path):
    import tomllib

    app = write_study_app(tmp_path / "fedgen-study")
    data = tomllib.loads((app / "pyproject.toml").read_text())
    assert data["tool"]["fedgen"]["version"] == VERSION == data["project"]["version"]
    assert data["tool"]["flwr"]["app"]["components"] == {"serverapp": SERVERAPP_REF, "clientapp": CLIENTAPP_REF}
    assert data["project"]["dependencies"] == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--allow-runtime-dependency-installation"], "never install packages"),
        (["--isolation", "process"], "--isolation process"),
        (["--isolation=process"], "--isolation process"),
    ],
)
def test_supernode_refuses_other_executors_and_installs(monkeypatch, argv, message):
    import sys

    from fedgen.federation import supernode

    monkeypatch.setattr(sys, "argv", ["x", *argv])
    with pytest.raises(SystemExit, match=message):
        supernode.main()
    assert supernode._refuse(["--isolation", "subprocess"]) is None


def test_supernode_starts_nothing_but_fedgens_superexec(monkeypatch):
    import subprocess

    import flwr.supernode.start_client_internal as sci

    from fedgen.federation import supernode

    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **k: calls.append(cmd))
    monkeypatch.setattr(sci, "subprocess", subprocess)
    supernode._use_fedgen_superexec()
    sci.subprocess.Popen(["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:1"])
    assert calls[0][1:5] == ["-P", "-m", "fedgen.federation.supernode", "--fedgen-superexec"]
    for bad in (["flwr-clientapp", "--token", "t"], ["flower-superexec", "--allow-runtime-dependency-installation"]):
        with pytest.raises(RuntimeError, match="fedgen site node"):
            sci.subprocess.Popen(bad)
    assert len(calls) == 1


def test_runner_uses_the_installed_client_app():
    from fedgen.federation import client_app, superexec

    assert superexec.installed_client_app() is client_app.app
    args = superexec._task_args(
        type("Spec", (), {"runtime_api_address": "127.0.0.1:1", "token": "t", "insecure": True,
                          "root_certificates_path": None, "parent_pid": 7, "task_type": "flwr-agentapp"})()
    )  # fmt: skip
    assert "--allow-runtime-dependency-installation" not in args
    parsed = superexec._task_parser().parse_args(args)
    assert parsed.fedgen_task_type == "flwr-agentapp" and parsed.parent_pid == 7 and parsed.insecure
