"""A deliberately curious ServerApp against real site nodes (Flower processes on 127.0.0.1).

The aggregator's own code (the ServerApp in its FAB, which the sites accept by hash: it runs at
the aggregator, while the sites still answer with their installed fedgen ClientApp) asks for an
analysis the site policy forbids, sends a foreign message type, asks for per-sample output,
asks for an aggregate over fewer than ``min_count`` samples, and repeats a DP query until the
budget runs out. Every probe is refused with its reason and logged; nothing else leaves the
sites; the honest study then runs on the same nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import qc_plan, split_sites

from fedgen.testing import make_synth

pytestmark = [pytest.mark.slow]

CURIOUS_SERVER = '''\
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgen.federation.flower import decode_reply, encode_request

app = ServerApp()


def query(analysis, params, arrays):
    return encode_request(analysis, params, arrays, study_id="curious")


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["record"]))
    want = int(context.run_config["sites"])
    deadline = time.monotonic() + 30
    nodes = []
    while time.monotonic() < deadline and len(nodes) < want:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    idx = np.arange(10, dtype=np.int64)
    probes = [
        ("forbidden", "query.fedgen", lambda: query("pca_product", {}, {"idx": idx, "freq": np.full(10, 0.3), "basis": np.ones((10, 2))})),
        ("foreign", "evaluate", lambda: RecordDict()),
        # a train message (the model-update path) carrying anything but a well-formed model update
        ("train", "train", lambda: RecordDict()),
        ("per_sample", "query.fedgen", lambda: query("genotype_counts", {"per_sample": True}, {"idx": idx})),
        ("min_count", "query.fedgen", lambda: query("glm_linear", {"phenotype": "RARE", "kind": "quantitative", "covariates": []}, {"idx": idx})),
    ] + [("dp", "query.fedgen", lambda s=s: query("dp_genotype_counts", {"sigma": s}, {"idx": np.arange(50, dtype=np.int64)}))
          # six different releases (an identical repeat would get the same payload back, at no cost)
          for s in (20.0, 20.1, 20.2, 20.3, 20.4, 20.5)]
    record = []
    for name, mtype, make in probes:
        msgs = [Message(make(), n, mtype, ttl=60) for n in nodes]
        for r in grid.send_and_receive(msgs, timeout=60):
            entry = {"probe": name, "node": int(r.metadata.src_node_id), "error": None, "meta": None, "arrays": {}}
            if r.has_error():
                entry["error"] = r.error.reason
            else:
                arrays, entry["meta"], _ = decode_reply(r.content)
                entry["arrays"].update({f"arrays/{k}": list(a.shape) for k, a in arrays.items()})
            record.append(entry)
    out.write_text(json.dumps(record))
'''


def test_curious_serverapp_on_real_nodes(tmp_path):
    from test_boundary_e2e import _pyproject, fab_hash, submit

    from fedgen.federation.local import LOCAL_CONNECTION, LocalFederation
    from fedgen.privacy.ledger import LEDGER_FILE, Ledger
    from fedgen.site import audit

    app = tmp_path / "curious-app"
    (app / "curious").mkdir(parents=True)
    (app / "curious" / "__init__.py").write_text("")
    (app / "curious" / "server.py").write_text(CURIOUS_SERVER)
    (app / "pyproject.toml").write_text(_pyproject("curious-study", "fedgen.federation.client_app:app", "curious.server:app"))
    digest = fab_hash(app)

    data = make_synth(120, 80, seed=9)
    nodes = split_sites(data, tmp_path / "sites", [0.5, 0.5], seed=4,
                        conventions=[dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")])
    p = Path(nodes["site1"]["samples"])  # RARE: known for 6 samples at site1, all at site2
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0] + "\tRARE"] + [ln + ("\t1" if i < 6 else "\tNA") for i, ln in enumerate(lines[1:])]) + "\n")
    p2 = Path(nodes["site2"]["samples"])
    lines = p2.read_text().splitlines()
    p2.write_text("\n".join([lines[0] + "\tRARE"] + [ln + f"\t{i % 3}" for i, ln in enumerate(lines[1:])]) + "\n")
    from fedgen.node.policy import default_policy

    allowed = [a for a in default_policy()["allowed_analyses"] if a != "pca_product"]
    budget = 3.0  # two DP releases fit (ε ≈ 1.9, 2.7 at δ = 1e-6), the third does not
    for nc in nodes.values():
        nc["policy"] = json.dumps({"allowed_analyses": allowed, "min_count": 10, "epsilon_budget": budget,
                                   "accepted_fab_hashes": [digest]})

    with LocalFederation(nodes, workdir=tmp_path / "work") as fed:
        rec = submit(app, connection=LOCAL_CONNECTION, flwr_home=fed.cli_home, record=tmp_path / "record.json",
                     sites=2, cwd=tmp_path)
        # the honest study afterwards, on the same nodes and policies
        fed.run(qc_plan(tmp_path / "honest", list(nodes), federation="local"))
    assert (tmp_path / "honest" / "freq.afreq").exists()

    by_probe: dict[str, list[dict]] = {}
    for r in rec:
        by_probe.setdefault(r["probe"], []).append(r)

    def err(r: dict) -> str | None:
        return r["error"] or (r["meta"] or {}).get("error")

    for r in by_probe["forbidden"]:
        assert "analysis 'pca_product' is not allowed by the site's policy" in err(r) and not any(r["arrays"].values())
    for r in by_probe["foreign"]:
        assert "message type 'evaluate' is not one this fedgen site answers" in err(r)
    for r in by_probe["train"]:
        assert "malformed train message" in err(r) and not any(r["arrays"].values())
    for r in by_probe["per_sample"]:
        assert "'per_sample' are not declared" in err(r)
    mc = sorted(by_probe["min_count"], key=lambda r: err(r) is None)
    assert "than the site's min_count" in err(mc[0]) and "6" not in err(mc[0])
    assert err(mc[1]) is None and mc[1]["meta"]["n"] == 60  # site2's aggregate rests on all 60 samples
    dp = by_probe["dp"]
    assert len(dp) == 12
    sent = [r for r in dp if err(r) is None]
    refused = [r for r in dp if err(r) is not None]
    assert sent and refused and all("privacy budget exhausted" in err(r) for r in refused)
    for r in sent:
        assert r["arrays"] == {"arrays/counts": [50, 4]} and r["meta"]["privacy"]["site_epsilon_spent"] <= budget

    for site, nc in nodes.items():
        state = Path(nc["state_dir"])
        entries = [e for e in audit.read(state) if e["study_id"] == "curious" or e["message_type"] in ("evaluate", "train")]
        ref = [e for e in entries if e["decision"] == "refused"]
        assert all(e["bytes"] == 0 and e["reason"] for e in ref)
        reasons = " | ".join(e["reason"] for e in ref)
        for needle in ("not allowed by the site's policy", "message type 'evaluate'", "malformed train message", "per_sample",
                       "privacy budget exhausted"):
            assert needle in reasons, (site, needle)
        ok = [e for e in entries if e["decision"] == "sent"]
        # what left for the curious run: site2's legitimate aggregate and the DP releases within budget
        assert {e["analysis"] for e in ok} <= {"glm_linear", "dp_genotype_counts"}
        assert all(e["fab_hash"] == digest for e in ok)
        led = Ledger(state / LEDGER_FILE, epsilon_budget=budget, delta=1e-6)
        assert led.spent()["epsilon"] <= budget and led.spent()["releases"] == len([e for e in ok if e["analysis"] == "dp_genotype_counts"])
        assert audit.verify(state) == []
