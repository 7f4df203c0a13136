"""A site that drops out mid-study is handled per ``federation.min_sites`` (issue 16 §5): with every
site required the study stops with an error naming the site and the phase and writes nothing;
with fewer required it restarts on the others, and every result equals the pooled computation over
exactly those sites; below ``min_sites`` it stops. ε a dropped site spent is still reported."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import needs_plink2, qc_plan, split_sites

from fedgen.errors import ConfigError, FedgenError, SiteError
from fedgen.federation.transport import InProcessTransport, Request
from fedgen.privacy.ledger import LEDGER_FILE, Ledger
from fedgen.study.journal import journal_dir
from fedgen.study.runner import resolve_min_sites, run_plan
from fedgen.testing import make_synth, run_plink2, write_pooled_vcf

NO_QC = {"maf": None, "geno": None, "hwe": None}
VOLATILE_FILES = {"manifest.json", "report.html"}


class Faulty(InProcessTransport):
    """The sites, in process; ``fail`` maps a site to the message round from which on it no longer
    answers (it is not asked at all: its node is gone)."""

    def __init__(self, node_configs, fail: dict[str, int] | None = None):
        super().__init__(node_configs)
        self.fail = dict(fail or {})
        self.rounds = 0
        self.asked: list[set[str]] = []

    def query(self, request: Request):
        return self.query_many([request])[0]

    def query_many(self, requests):
        self.rounds += 1
        for site, at in self.fail.items():
            if site in self.sites() and self.rounds >= at:
                raise SiteError(site, "did not answer within 600 s")
        self.asked.append(set(self.sites()))
        return [InProcessTransport.query(self, r) for r in requests]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in VOLATILE_FILES and p.suffix not in (".png", ".svg")}


@pytest.fixture(scope="module")
def data():
    return make_synth(200, 100, seed=21, missing_rate=0.02)


@pytest.fixture(scope="module")
def nodes(data, tmp_path_factory):
    return split_sites(data, tmp_path_factory.mktemp("dropout") / "sites", [0.4, 0.35, 0.25], seed=4)


def _plan(out: Path, sites, **kw):
    return qc_plan(out, list(sites), analyses=["freq", "missing", "hardy", "assoc", "glm"], phenotypes=["QT2"],
                   covariates=["age", "sex"], qc=NO_QC, block_size=40, glm_block_size=10, **kw)


@pytest.fixture(scope="module")
def reference(nodes, tmp_path_factory):
    """The study without failures on the two survivors only (its rounds are the full study's)."""
    tmp = tmp_path_factory.mktemp("ref")
    two = {s: nodes[s] for s in ("site1", "site2")}
    m = run_plan(_plan(tmp / "two", two), InProcessTransport(two))
    return {"rounds": m["rounds"], "two": _files(tmp / "two")}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


def test_every_site_required_by_default_stops_with_a_clear_error_and_writes_nothing(nodes, reference, tmp_path):
    out = tmp_path / "out"
    at = reference["rounds"]  # late: during association
    tr = Faulty(nodes, {"site3": at})
    with pytest.raises(SiteError) as err:
        run_plan(_plan(out, nodes), tr)
    msg = str(err.value)
    assert "\n" not in msg and err.value.site == "site3"
    assert msg.startswith("site site3: failed during association ") and f"(round {at}): did not answer within 600 s" in msg
    assert "federation.min_sites=3" in msg and "all sites" in msg and "no results were written" in msg
    assert not out.exists() and _leftovers(out) == []  # nothing presented, complete or not
    assert len(tr.asked) == at - 1  # no restart
    # an explicit min_sites equal to the number of sites behaves the same
    out2 = tmp_path / "out2"
    with pytest.raises(FedgenError, match="site site3: failed during genotype_counts .*min_sites=3"):
        run_plan(_plan(out2, nodes, min_sites=3), Faulty(nodes, {"site3": 2}))
    assert not out2.exists()
    # relaunched once site3 is back: resumes from the journal (answered rounds not asked again), all sites
    m = run_plan(_plan(out, nodes), Faulty(nodes))
    assert m["resumed"] == {"rounds_replayed": at - 1, "rounds_live": 1} and m["dropped"] == [] and m["attempts"] == 1
    assert set(m["sites"]) == {"site1", "site2", "site3"} and m["min_sites"] == 3


def test_dropout_restarts_on_the_survivors_and_results_equal_their_pooled_study(nodes, reference, tmp_path):
    out = tmp_path / "out"
    at = reference["rounds"]  # the last GLM round: the GLM had rounds with site3 already
    tr = Faulty(nodes, {"site3": at})
    m = run_plan(_plan(out, nodes, min_sites=2), tr)
    assert m["dropped"][0]["phase"] == "association" and reference["rounds"] >= 5
    # the first attempt asked all three sites, every round after the drop only the survivors
    assert all(a == {"site1", "site2", "site3"} for a in tr.asked[: at - 1])
    assert all(a == {"site1", "site2"} for a in tr.asked[at - 1:]) and len(tr.asked) > at - 1
    # every result: exactly the study over site1 + site2 (byte for byte), no trace of site3
    got = _files(out)
    assert got.keys() == reference["two"].keys() and any(k.endswith(".glm.linear") for k in got)
    assert [k for k in got if got[k] != reference["two"][k]] == []
    assert set(m["sites"]) == {"site1", "site2"}
    assert m["samples_total"] == sum(m["sites"][s]["samples"] for s in ("site1", "site2"))
    # the manifest says who contributed and who dropped out, where and why
    assert m["min_sites"] == 2 and m["attempts"] == 2
    assert [(d["site"], d["round"], d["reason"]) for d in m["dropped"]] == [("site3", at, "did not answer within 600 s")]
    assert m["dropped"][0]["rounds_discarded"] == at  # the failed round included
    assert m["dropped"][0]["messages"] == at - 1 and m["dropped"][0]["epsilon_spent"] == 0.0
    contributed = m["sites_contributed"]
    assert set(contributed["outputs"]) == set(m["files"])
    assert all(v == ["site1", "site2"] for v in [*contributed["outputs"].values(), *contributed["phases"].values()])
    assert any("site3 dropped out" in n and "site1, site2" in n for n in m["notes"])
    assert "site3 dropped out" in (out / "report.html").read_text()
    # the rounds really sent (both attempts and the failed one) are counted; the journal is gone
    assert m["rounds"] == len(tr.asked) + 1 and not journal_dir(out).exists()
    assert json.loads((out / "manifest.json").read_text())["dropped"][0]["site"] == "site3"


class Killed(BaseException):
    """The aggregator process dies here."""


def test_aggregator_killed_after_a_dropout_resumes_on_the_survivors(nodes, reference, tmp_path):
    out = tmp_path / "out"
    at = reference["rounds"]

    class Dies(Faulty):
        def query_many(self, requests):
            if self.rounds + 1 == at + 3:  # the restart's 3rd round
                raise Killed()
            return super().query_many(requests)

    with pytest.raises(Killed):
        run_plan(_plan(out, nodes, min_sites=2), Dies(nodes, {"site3": at}))
    assert not out.exists() and journal_dir(out).exists()
    # relaunched, site3 still gone: the journal answers the first attempt's rounds; the failed round
    # is asked again (site3 may be back), fails again, and the restart is asked live
    tr = Faulty(nodes, {"site3": 1})
    m = run_plan(_plan(out, nodes, min_sites=2), tr)
    assert m["resumed"]["rounds_replayed"] == at - 1
    assert [d["site"] for d in m["dropped"]] == ["site3"] and all(a == {"site1", "site2"} for a in tr.asked)
    got = _files(out)
    assert [k for k in reference["two"] if got.get(k) != reference["two"][k]] == []
    # relaunched after the same kill with site3 back: the study goes on with all three sites
    out2 = tmp_path / "out2"
    with pytest.raises(Killed):
        run_plan(_plan(out2, nodes, min_sites=2), Dies(nodes, {"site3": at}))
    m = run_plan(_plan(out2, nodes, min_sites=2), Faulty(nodes))
    assert m["dropped"] == [] and set(m["sites"]) == {"site1", "site2", "site3"}
    assert m["resumed"]["rounds_replayed"] == at - 1


@needs_plink2
@pytest.mark.plink
def test_dropout_qc_equals_live_plink_on_the_survivors_samples(data, nodes, reference, tmp_path):
    out = tmp_path / "out"
    m = run_plan(qc_plan(out, list(nodes), qc=NO_QC, min_sites=2), Faulty(nodes, {"site1": 2}))  # genotype counts
    assert [(d["site"], d["phase"]) for d in m["dropped"]] == [("site1", "genotype_counts")]
    write_pooled_vcf(data, tmp_path / "pooled.vcf")
    keep = []
    for s in ("site2", "site3"):
        q = subprocess.run(["bcftools", "query", "-l", nodes[s]["vcf"]], capture_output=True, text=True, check=True)
        keep += q.stdout.split()
    (tmp_path / "keep.txt").write_text("#IID\n" + "\n".join(keep) + "\n")
    run_plink2(["--vcf", "pooled.vcf", "--keep", "keep.txt", "--freq", "cols=+pos", "--missing", "variant-only",
                "vcols=+pos", "--hardy", "cols=+pos", "--out", "ref"], tmp_path)
    for ext, name in (("afreq", "freq.afreq"), ("vmiss", "missing.vmiss"), ("hardy", "hardy.hardy")):
        assert (out / name).read_text() == (tmp_path / f"ref.{ext}").read_text(), name


def test_fewer_than_min_sites_left_stops_the_study(nodes, reference, tmp_path):
    out = tmp_path / "out"
    # site3 drops out, the study restarts on site1 + site2, then site2 fails too: 1 < min_sites=2
    tr = Faulty(nodes, {"site3": 4, "site2": 6})
    with pytest.raises(FedgenError) as err:
        run_plan(_plan(out, nodes, min_sites=2), tr)
    msg = str(err.value)
    assert msg.startswith("site site2: failed during genotype_counts (round 6)")  # the restart's 2nd round
    assert "at least 2 sites" in msg and "only 1 would be left (site1)" in msg and "no results were written" in msg
    assert "dropped earlier: site site3" in msg
    assert not out.exists() and _leftovers(out) == []
    # two sites failing in the same round with min_sites=2 of 3: stop at once
    with pytest.raises(FedgenError, match="only 1 would be left"):
        run_plan(_plan(out, nodes, min_sites=2), _Both(nodes))
    assert not out.exists()


class _Both(InProcessTransport):
    """site2 and site3 both fail in round 3 (as the Flower transport reports it: one SiteError, every site)."""

    def __init__(self, node_configs):
        super().__init__(node_configs)
        self.rounds = 0

    def query(self, request):
        return self.query_many([request])[0]

    def query_many(self, requests):
        self.rounds += 1
        if self.rounds == 3:
            exc = SiteError("site2", "Flower error 0: node gone; also failed: site site3: node gone")
            exc.failed = {"site2": "Flower error 0: node gone", "site3": "node gone"}
            raise exc
        return [InProcessTransport.query(self, r) for r in requests]


def test_flower_transport_reports_every_failed_site_and_stops_asking_a_dropped_one(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    from test_federation_flower import FakeGrid

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a ServerApp task
        monkeypatch.setattr(TaskIdentity, key, value)

    from fedgen.federation.flower import FlowerTransport

    grid = FakeGrid({11: {"site": "hk"}, 22: {"site": "sz"}, 33: {"site": "xx"}})
    t = FlowerTransport(grid, expected_sites=["hk", "sz", "xx"], connect_timeout=2, timeout=0.3)
    grid.silent |= {22, 33}
    with pytest.raises(SiteError) as ei:
        t.query_many([Request("ping"), Request("ping")])
    assert ei.value.failed == {"sz": "did not answer within 0.3 s", "xx": "did not answer within 0.3 s"}
    t.drop_site("sz")
    t.drop_site("xx")
    sent = grid.sent
    assert list(t.query(Request("ping"))) == ["hk"] and grid.sent == sent + 1 and t.sites() == ["hk"]


def test_min_sites_must_be_between_one_and_the_number_of_sites():
    assert resolve_min_sites(None, 3) == 3 and resolve_min_sites(1, 3) == 1
    for bad in (0, 4, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="federation.min_sites"):
            resolve_min_sites(bad, 3)


def _spent(nc) -> float:
    if not Path(nc["state_dir"]).is_dir():
        return 0.0
    return Ledger(Path(nc["state_dir"]) / LEDGER_FILE, epsilon_budget=100, delta=1e-6).spent()["epsilon"]


def test_dp_dropped_site_epsilon_is_reported_truthfully(nodes, tmp_path):
    plan = qc_plan(tmp_path / "out", list(nodes), analyses=["freq", "missing", "hardy", "assoc", "topk"],
                   phenotypes=["BIN"], covariates=[], qc=NO_QC, block_size=60, pca=None, pcs=0, min_sites=2)
    plan["privacy"] = {"mode": "dp", "epsilon": 2.0, "delta": 1e-6, "topk": 5, "force": True}
    before = {s: _spent(nc) for s, nc in nodes.items()}
    m = run_plan(plan, Faulty(nodes, {"site3": 4}))  # after its DP genotype counts were released
    (d,) = m["dropped"]
    assert d["site"] == "site3" and d["epsilon_spent"] > 0 and d["privacy_releases"]
    # what the manifest says each site spent is what each site's own ledger charged this study
    assert d["epsilon_spent"] == pytest.approx(_spent(nodes["site3"]) - before["site3"], rel=1e-9)
    for s in ("site1", "site2"):  # both attempts' releases (the first was not free)
        assert m["sites"][s]["epsilon_spent"] == pytest.approx(_spent(nodes[s]) - before[s], rel=1e-9)
        assert m["sites"][s]["epsilon_spent"] > d["epsilon_spent"]
    assert any("site3 dropped out" in n and "ε" in n for n in m["notes"])
    from fedgen.results.report import epsilon_figure

    bars = epsilon_figure(m).data[0]
    assert list(bars.x) == ["site1", "site2", "site3 (dropped)"] and bars.y[2] == pytest.approx(d["epsilon_spent"])


@pytest.mark.slow
def test_fedgen_run_on_flower_with_a_supernode_killed_by_pid_continues_on_the_others(tmp_path):
    """A real `fedgen run` (SuperLink + three SuperNodes on loopback, federation.min_sites=2): one
    site's SuperNode process is killed mid-study; the study restarts on the other two and its QC
    results equal the in-process study over those two."""
    import os
    import signal
    import sys
    import time

    import psutil
    import yaml

    from fedgen.study.journal import LOG, _scan

    data = make_synth(300, 160, seed=8, missing_rate=0.01)
    nodes = split_sites(data, tmp_path / "sites", [0.4, 0.35, 0.25], seed=1)
    cfg = tmp_path / "cfg" / "sites"
    cfg.mkdir(parents=True)
    (cfg / "mine.yaml").write_text(yaml.safe_dump({s: {"vcf": c["vcf"], "samples": c["samples"]} for s, c in nodes.items()}))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fedgen.cli", "run", "sites=mine", f"hydra.searchpath=[file://{tmp_path / 'cfg'}]",
            "study=qc", f"output_dir={out}", "study.block_size=1", "federation.min_sites=2", "federation.timeout=30"]
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout's fedgen in every process
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = journal_dir(out) / LOG
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(_scan(log)[0]) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished before a site could be killed"
        node = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "fedgen.federation.supernode" in " ".join(p.cmdline()) and any(a.endswith("site3.toml") for a in p.cmdline())]
        assert len(node) == 1
        tree = [node[0], *node[0].children(recursive=True)]
        for p in tree:  # site3's SuperNode and its worker, by pid
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "fedgen: warning: site site3 dropped out during" in err
    m = json.loads((out / "manifest.json").read_text())
    assert [d["site"] for d in m["dropped"]] == ["site3"] and set(m["sites"]) == {"site1", "site2"}
    assert m["sites_contributed"]["outputs"]["freq.afreq"] == ["site1", "site2"]
    two = {s: nodes[s] for s in ("site1", "site2")}
    ref = tmp_path / "ref"
    run_plan(qc_plan(ref, list(two), qc=m["qc"]["filters"], block_size=50), InProcessTransport(two))
    for name in ("freq.afreq", "missing.vmiss", "hardy.hardy", "variants.tsv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
