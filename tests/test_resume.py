"""Long studies survive interruptions: an aggregator killed mid-study and relaunched with the same
output folder resumes from its journal (answered rounds are not asked again), and no site is
charged ε twice for the same release (issue 16 §5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import qc_plan, split_sites

from fedgen.federation.transport import InProcessTransport, Request, request_digest
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.site import audit
from fedgen.study.journal import LOG, journal_dir
from fedgen.study.runner import run_plan
from fedgen.testing import make_synth

GT = dict(chr_prefix=False, fmt="GT", phased=0.0, compress="bgzip")
NO_QC = {"maf": None, "geno": None, "hwe": None}
VOLATILE_FILES = {"manifest.json", "report.html"}


class Killed(BaseException):
    """The aggregator process dies here (not an error the study could handle)."""


class Recording(InProcessTransport):
    """The sites: records every request each site answered (its digest as the site sees it) and
    every reply; with ``kill_at`` the aggregator dies at that round, before sending it
    (``after_reply=False``) or once the sites answered it (``after_reply=True``)."""

    def __init__(self, node_configs, *, kill_at: int | None = None, after_reply: bool = False):
        super().__init__(node_configs)
        self.kill_at, self.after_reply = kill_at, after_reply
        self.rounds = 0
        self.seen: list[str] = []
        self.replies: list[list[dict]] = []

    def query(self, request: Request):
        return self.query_many([request])[0]

    def query_many(self, requests):
        self.rounds += 1
        if self.kill_at is not None and self.rounds == self.kill_at and not self.after_reply:
            raise Killed()
        out = [InProcessTransport.query(self, r) for r in requests]
        for r in requests:
            for site in self.sites():
                self.seen.append(request_digest(r.analysis, r.params, r.arrays_for(site), r.study_id, extra=site))
        self.replies.append(out)
        if self.kill_at is not None and self.rounds == self.kill_at:
            raise Killed()
        return out


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in VOLATILE_FILES and p.suffix not in (".png", ".svg")}


@pytest.fixture(scope="module")
def data():
    return make_synth(300, 200, seed=5, missing_rate=0.01)


@pytest.fixture()
def nodes(data, tmp_path):
    return split_sites(data, tmp_path / "sites", [0.55, 0.45], seed=3, conventions=[GT, dict(GT, chr_prefix=True)])


def _exact_plan(out: Path, sites):
    return qc_plan(out, sites, analyses=["freq", "missing", "hardy", "assoc", "glm"], phenotypes=["CC", "QT2"],
                   covariates=["age", "sex"], qc=NO_QC, block_size=40)


def _dp_plan(out: Path, sites, eps: float = 2.0):
    plan = qc_plan(out, sites, analyses=["freq", "missing", "hardy", "assoc", "topk"], phenotypes=["BIN"], covariates=[],
                   qc=NO_QC, block_size=60, pca=None, pcs=0)
    plan["privacy"] = {"mode": "dp", "epsilon": eps, "delta": 1e-6, "topk": 5, "force": True}
    return plan


def test_killed_study_resumes_with_identical_results_and_no_repeated_request(nodes, data, tmp_path):
    # the uninterrupted reference
    ref_tr = Recording(nodes)
    ref = run_plan(_exact_plan(tmp_path / "ref", list(nodes)), ref_tr)
    total = ref["rounds"]
    assert total >= 6 and ref["resumed"] == {"rounds_replayed": 0, "rounds_live": total}
    assert not journal_dir(tmp_path / "ref").exists()  # published: journal removed

    out = tmp_path / "out"
    plan = _exact_plan(out, list(nodes))
    first = Recording(nodes, kill_at=total // 2 + 1)
    with pytest.raises(Killed):
        run_plan(dict(plan), first)
    assert not out.exists() and journal_dir(out).exists()  # nothing published, the journal kept
    asked = total // 2
    assert len(first.replies) == asked

    second = Recording(nodes)
    manifest = run_plan(dict(plan), second)  # relaunched: same output folder, same plan
    assert manifest["resumed"] == {"rounds_replayed": asked, "rounds_live": total - asked}
    assert manifest["rounds"] == total and manifest["rounds_per_phase"] == ref["rounds_per_phase"]
    # the sites answered every request once: nothing asked in the first run was asked again
    assert not set(first.seen) & set(second.seen)
    assert len(first.seen) + len(second.seen) == len(ref_tr.seen)
    assert len(set(first.seen + second.seen)) == len(set(ref_tr.seen))
    # the same study (the journal's study id) and byte-identical results
    sids = {json.loads(line)["study_id"] for nc in nodes.values() for line in
            (Path(nc["state_dir"]) / audit.AUDIT_LOG).read_text().splitlines()
            if json.loads(line).get("run_id") == "inprocess" and json.loads(line)["study_id"] != ref["study_id"]}
    assert sids == {manifest["study_id"]}
    a, b = _files(tmp_path / "ref"), _files(out)
    assert a.keys() == b.keys() and any(k.endswith(".glm.linear") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    assert not journal_dir(out).exists()


def _ledger_eps(nc) -> tuple[float, int]:
    led = Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=100, delta=1e-6)
    sp = led.spent()
    return sp["epsilon"], len(led.entries())


def test_dp_study_killed_after_sites_replied_charges_each_site_once(nodes, tmp_path):
    eps = 2.0
    out = tmp_path / "out"
    plan = _dp_plan(out, list(nodes), eps)
    first = Recording(nodes, kill_at=3, after_reply=True)  # round 3: DP genotype counts, answered, not journaled
    with pytest.raises(Killed):
        run_plan(dict(plan), first)
    killed_round = first.replies[-1]
    dp = [req for req in (e for nc in nodes.values() for e in audit.read(Path(nc["state_dir"])))
          if req["decision"] == "sent" and str(req["analysis"]).startswith("dp_")]
    assert dp and all(e["epsilon"] > 0 and e.get("request_sha256") for e in dp)  # released and charged
    second = Recording(nodes)
    manifest = run_plan(dict(plan), second)
    assert manifest["resumed"]["rounds_replayed"] == 2
    # the killed round was asked again and answered with the very payload sent the first time
    again = second.replies[0]
    assert len(again) == len(killed_round)
    for by_site_1, by_site_2 in zip(killed_round, again):
        for site in nodes:
            r1, r2 = by_site_1[site], by_site_2[site]
            assert r1.arrays.keys() == r2.arrays.keys()
            assert all(np.array_equal(r1.arrays[k], r2.arrays[k]) for k in r1.arrays)
            assert json.dumps(r1.meta, sort_keys=True, default=str) == json.dumps(r2.meta, sort_keys=True, default=str)
    for site, nc in nodes.items():
        spent, _ = _ledger_eps(nc)
        assert spent == pytest.approx(eps, rel=1e-6)  # the study's ε, once
        assert manifest["sites"][site]["epsilon_spent"] == pytest.approx(eps, rel=1e-6)
        entries = list(audit.read(Path(nc["state_dir"])))
        replays = [e for e in entries if e.get("replay_of")]
        assert len(replays) == len(killed_round) and all(e["epsilon"] == 0.0 for e in replays)
        originals = {e["sha256"] for e in entries if e["decision"] == "sent" and e.get("events")}
        assert {e["replay_of"] for e in replays} <= originals
        assert audit.verify(Path(nc["state_dir"])) == []


def test_replay_needs_the_kept_payload_and_still_passes_policy(nodes, tmp_path):
    """Without kept payloads a repeated DP request is a new, charged release (and the audit log says
    so); a request the policy no longer allows is refused even though it was answered before."""
    from fedgen.errors import SiteError

    site, nc = next(iter(nodes.items()))
    plan = _dp_plan(tmp_path / "o1", [site])
    no_keep = {site: {**nc, "audit_payloads": "false"}}
    first = Recording(no_keep, kill_at=3, after_reply=True)
    with pytest.raises(Killed):
        run_plan(dict(plan), first)
    eps1, _ = _ledger_eps(nc)
    second = Recording(no_keep, kill_at=3, after_reply=True)  # replays 2 rounds, asks the DP round live
    with pytest.raises(Killed):
        run_plan(dict(plan), second)
    eps2, _ = _ledger_eps(nc)
    assert eps2 > eps1  # charged again: nothing to replay
    notes = [e for e in audit.read(Path(nc["state_dir"])) if e.get("replay_unavailable")]
    assert notes and "charged" in notes[0]["replay_unavailable"]
    # the policy no longer allows that analysis: refused, not replayed
    from fedgen.node.policy import load_policy

    analysis = notes[0]["analysis"]
    pol = dict(load_policy(nc.get("policy")))
    pol["allowed_analyses"] = [a for a in pol["allowed_analyses"] if a != analysis]
    strict = {site: {**nc, "policy": json.dumps(pol)}}  # payloads kept from here on
    with pytest.raises(Killed):
        run_plan(_dp_plan(tmp_path / "o2", [site]), Recording({site: nc}, kill_at=3, after_reply=True))
    n_before = sum(1 for e in audit.read(Path(nc["state_dir"])) if e.get("replay_of"))
    with pytest.raises(SiteError, match="not allowed"):
        run_plan(_dp_plan(tmp_path / "o2", [site]), Recording(strict))
    assert sum(1 for e in audit.read(Path(nc["state_dir"])) if e.get("replay_of")) == n_before


def test_changed_plan_does_not_reuse_the_journal(nodes, tmp_path):
    out = tmp_path / "out"
    plan = _exact_plan(out, list(nodes))
    with pytest.raises(Killed):
        run_plan(dict(plan), Recording(nodes, kill_at=4))
    changed = {**plan, "qc": {"maf": 0.01, "geno": None, "hwe": None}}
    tr = Recording(nodes)
    manifest = run_plan(changed, tr)
    assert manifest["resumed"]["rounds_replayed"] == 0 and len(tr.replies) == manifest["rounds"]
    stale = list(out.parent.glob(f".{out.name}.journal.stale-*"))
    assert len(stale) == 1  # moved aside, not mixed in, not deleted
    # federation.resume=false: the same plan starts afresh too
    with pytest.raises(Killed):
        run_plan(dict(plan), Recording(nodes, kill_at=4))
    tr = Recording(nodes)
    manifest = run_plan({**plan, "resume": False}, tr)
    assert manifest["resumed"]["rounds_replayed"] == 0 and len(tr.replies) == manifest["rounds"]
    # volatile fields (timeouts) do not count as a change
    with pytest.raises(Killed):
        run_plan(dict(plan), Recording(nodes, kill_at=4))
    manifest = run_plan({**plan, "timeout": 5.0}, Recording(nodes))
    assert manifest["resumed"]["rounds_replayed"] == 3


def test_torn_journal_record_is_ignored(nodes, tmp_path):
    out = tmp_path / "out"
    plan = _exact_plan(out, list(nodes))
    with pytest.raises(Killed):
        run_plan(dict(plan), Recording(nodes, kill_at=5))
    log = journal_dir(out) / LOG
    whole = log.read_bytes()
    log.write_bytes(whole[: len(whole) - 100])  # the last record torn half-way
    tr = Recording(nodes)
    manifest = run_plan(dict(plan), tr)
    assert manifest["resumed"]["rounds_replayed"] == 3
    assert len(tr.replies) == manifest["rounds"] - 3
    # a corrupt (bit-flipped) record ends the journal there
    out2 = tmp_path / "out2"
    plan2 = _exact_plan(out2, list(nodes))
    with pytest.raises(Killed):
        run_plan(dict(plan2), Recording(nodes, kill_at=5))
    log = journal_dir(out2) / LOG
    raw = bytearray(log.read_bytes())
    from fedgen.study.journal import _scan

    recs, _ = _scan(log)
    raw[recs[1][0] + 10] ^= 0xFF  # inside the second record's payload
    log.write_bytes(bytes(raw))
    manifest = run_plan(dict(plan2), Recording(nodes))
    assert manifest["resumed"]["rounds_replayed"] == 1
    assert _files(out) == _files(out2)


def test_journal_is_locked_against_a_second_aggregator(nodes, tmp_path):
    from fedgen.errors import FedgenError
    from fedgen.study.journal import open_journal

    plan = _exact_plan(tmp_path / "out", list(nodes))
    j = open_journal(plan)
    try:
        with pytest.raises(FedgenError, match="another study is running"):
            run_plan(dict(plan), Recording(nodes))
    finally:
        j.close()


@pytest.mark.slow
def test_fedgen_run_on_flower_killed_by_pid_resumes(tmp_path):
    """A real `fedgen run` (SuperLink + SuperNodes on loopback) killed mid-study, then rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    from fedgen.study.journal import _scan

    data = make_synth(300, 400, seed=8, missing_rate=0.01)
    nodes = split_sites(data, tmp_path / "sites", [0.6, 0.4], seed=1)
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "mine.yaml").write_text(yaml.safe_dump({s: {"vcf": c["vcf"], "samples": c["samples"]} for s, c in nodes.items()}))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fedgen.cli", "run", "sites=mine", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]",
            "study=qc", f"output_dir={out}", "study.block_size=1"]
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout's fedgen in every process
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = journal_dir(out) / LOG
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(_scan(log)[0]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished before it could be killed"
        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # the launcher and every process it started, by pid
        for child in tree:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait(30)
        psutil.wait_procs(tree, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "manifest.json").exists()
    done = len(_scan(log)[0])
    assert done >= 3
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed"]["rounds_replayed"] >= 3 and m["resumed"]["rounds_replayed"] + m["resumed"]["rounds_live"] == m["rounds"]
    assert not journal_dir(out).exists()
    ref = tmp_path / "ref"
    from fedgen.federation.transport import InProcessTransport as IPT  # noqa: N814

    plan = qc_plan(ref, list(nodes), analyses=["freq", "missing", "hardy"], qc=m["qc"]["filters"], block_size=50,
                   missing=m["config"]["study"].get("glm", {}).get("missing", "impute"))
    run_plan(plan, IPT(nodes))
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "variants.tsv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_journal_writes_in_the_background_in_order_and_reports_a_failed_write(nodes, tmp_path, monkeypatch):
    """A round is written while the next one runs: every append waits for the one before (records
    stay in order and complete), and a write that failed stops the study at the next round."""
    from fedgen.errors import FedgenError
    from fedgen.federation.transport import Reply
    from fedgen.study.journal import _scan, open_journal

    plan = _exact_plan(tmp_path / "out", list(nodes))
    j = open_journal(plan)
    try:
        j.replay("")
        for k in range(3):
            j.append(f"round-{k}", [{"s1": Reply("s1", {"x": np.arange(5) + k})}])
        assert j.summary()["rounds_live"] == 3  # summary waits for the last write
        recs, _ = _scan(j.folder / LOG)
        assert [r[2] for r in recs] == ["round-0", "round-1", "round-2"]
        import builtins

        real_open = builtins.open

        def failing_open(path, *a, **kw):
            if str(path).endswith(LOG) and a and "+" in a[0]:
                raise OSError(28, "No space left on device")
            return real_open(path, *a, **kw)

        monkeypatch.setattr(builtins, "open", failing_open)
        j.append("round-3", [{"s1": Reply("s1", {"x": np.arange(5)})}])  # fails in the background
        with pytest.raises(FedgenError, match="could not write the study journal"):
            j.append("round-4", [{"s1": Reply("s1", {"x": np.arange(5)})}])
        monkeypatch.undo()
        assert [r[2] for r in _scan(j.folder / LOG)[0]] == ["round-0", "round-1", "round-2"]
    finally:
        j.close()
