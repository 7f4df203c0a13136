"""What hospital IT sees of its site: the policy it actually ran, δ agreed up front, the audit chain head, retention."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import qc_plan, split_sites

from fedgen.errors import ConfigError
from fedgen.federation.transport import InProcessTransport
from fedgen.privacy.cli import ledger_report
from fedgen.privacy.ledger import LEDGER_FILE
from fedgen.site import audit
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

GT = dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")


@pytest.fixture()
def nodes(tmp_path):
    data = make_synth(240, 120, seed=8, missing_rate=0.01)
    return split_sites(data, tmp_path / "sites", [0.5, 0.5], seed=1, conventions=[GT], policy=None)


def test_ledger_reports_the_inline_policy_the_site_ran(nodes, tmp_path):
    for nc in nodes.values():
        nc["policy"] = json.dumps({"epsilon_budget": 4.0, "delta": 1e-7})
    run_plan(qc_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    report = ledger_report(nodes["site1"]["state_dir"])
    assert "inline policy" in report["policy"] and report["epsilon_budget"] == 4.0 and report["delta"] == 1e-7


def test_a_study_delta_that_differs_from_a_site_policy_is_refused_before_any_release(nodes, tmp_path):
    nodes["site2"]["policy"] = json.dumps({"delta": 1e-5})
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc"], phenotypes=["BIN"],
                   qc={"maf": None, "geno": None, "hwe": None}, pca=None, pcs=0)
    plan["privacy"] = {"mode": "dp", "epsilon": 1.0, "delta": 1e-6, "force": True}
    with pytest.raises(ConfigError, match=r"differs from the δ of site polic\(ies\) site2: 1e-05"):
        run_plan(plan, InProcessTransport(nodes))
    for nc in nodes.values():
        assert not (Path(nc["state_dir"]) / LEDGER_FILE).exists()  # nothing was charged anywhere


def test_audit_prints_its_chain_head_and_payloads_expire(nodes, tmp_path, capsys):
    from fedgen.site.audit_cli import cmd_audit

    for nc in nodes.values():
        nc["audit_payload_retention_days"] = "1"
    run_plan(qc_plan(tmp_path / "out", list(nodes)), InProcessTransport(nodes))
    state = Path(nodes["site1"]["state_dir"])
    args = type("A", (), {"state_dir": str(state), "study": None, "verify": True, "json": False})()
    assert cmd_audit(args) == 0
    head = audit.head(state)
    assert f"Chain head: {head}" in capsys.readouterr().out
    lines = (state / audit.AUDIT_LOG).read_text().splitlines()
    assert head == audit._line_hash(lines[-1])
    kept = list((state / audit.PAYLOAD_DIR).glob("*.npz"))
    assert kept
    old = time.time() - 3 * 86400
    for p in kept:
        os.utime(p, (old, old))
    assert audit.prune_payloads(state, older_than_days=1) == len(kept)
    assert audit.verify(state) == []  # the hashes stay in the log; only the copies expired
