"""The per-site privacy ledger: reservations, budget refusals, crashes, concurrency, ``fedgen ledger``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import rdp

from fedgen.errors import FedgenError, InputError
from fedgen.privacy.accounting import RDP_ORDERS, compose_epsilon, gaussian_event, gumbel_event, zcdp_event
from fedgen.privacy.cli import add_command, cmd_ledger
from fedgen.privacy.ledger import LEDGER_FILE, BudgetExceeded, Ledger, Reservation

DELTA = 1e-6
REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_new_ledger_is_created_and_empty(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    led = Ledger(path, epsilon_budget=10.0, delta=DELTA)
    assert path.is_file()
    assert led.spent() == {
        "epsilon": 0.0,
        "delta": DELTA,
        "epsilon_budget": 10.0,
        "remaining": 10.0,
        "rho": 0.0,
        "releases": 0,
        "reserved": 0,
    }
    assert led.entries() == [] and led.by_study() == []
    # reopening an existing ledger works and sees the same rows
    r = led.reserve([zcdp_event(0.01)], study_id="s")
    assert [e["id"] for e in Ledger(path, epsilon_budget=10.0, delta=DELTA).entries()] == [r.id]


def test_reserve_commit_void_accounting(tmp_path: Path) -> None:
    led = Ledger(tmp_path / LEDGER_FILE, epsilon_budget=10.0, delta=DELTA)
    e1 = [gaussian_event(5.0, 1.0, 10)]
    e2 = [gumbel_event(0.1, 10), gaussian_event(30.0, 2 * 10**0.5)]
    e3 = [zcdp_event(0.05)]
    r1 = led.reserve(e1, site="hk", study_id="gwas1", run_id="run1", analysis="assoc", step="counts")
    assert isinstance(r1, Reservation) and r1.events == e1
    assert r1.epsilon_after == pytest.approx(compose_epsilon(e1, DELTA))
    s = led.spent()
    assert s["reserved"] == 1 and s["releases"] == 0 and s["epsilon"] == pytest.approx(r1.epsilon_after)  # reserved counts
    led.commit(r1.id)
    led.commit(r1.id)  # idempotent
    r2 = led.reserve(e2, site="hk", study_id="gwas2", analysis="assoc", step="select")
    r3 = led.reserve(e3, site="hk", study_id="gwas2", analysis="qc")
    assert r3.epsilon_after == pytest.approx(compose_epsilon(e1 + e2 + e3, DELTA))
    led.void(r2.id, "aggregator unreachable; nothing sent")
    led.void(r2.id, "again")  # no-op
    led.commit(r3.id)
    s = led.spent()
    assert s["epsilon"] == pytest.approx(compose_epsilon(e1 + e3, DELTA))
    assert s["releases"] == 2 and s["reserved"] == 0
    assert s["remaining"] == pytest.approx(10.0 - s["epsilon"])
    assert s["rho"] == pytest.approx(0.2 + 0.05)
    rows = led.entries()
    assert [r["status"] for r in rows] == ["committed", "void", "committed"]
    assert rows[1]["note"] == "aggregator unreachable; nothing sent"
    assert rows[0]["site"] == "hk" and rows[0]["run_id"] == "run1" and rows[0]["step"] == "counts"
    assert rows[0]["events"] == e1
    by = {s["study_id"]: s for s in led.by_study()}
    assert set(by) == {"gwas1", "gwas2"}
    assert by["gwas1"]["releases"] == 1 and by["gwas1"]["epsilon"] == pytest.approx(compose_epsilon(e1, DELTA))
    assert by["gwas2"]["releases"] == 1 and by["gwas2"]["analyses"] == ["qc"]
    assert by["gwas2"]["epsilon"] == pytest.approx(compose_epsilon(e3, DELTA))
    # state errors
    with pytest.raises(ValueError, match="cannot be voided"):
        led.void(r1.id, "oops")
    with pytest.raises(ValueError, match="cannot be committed"):
        led.commit(r2.id)
    with pytest.raises(ValueError, match="no release"):
        led.commit(9999)
    with pytest.raises(ValueError):
        led.reserve([])
    with pytest.raises(ValueError):
        led.reserve([{"type": "gaussian", "sigma": -1, "l2": 1}])


def test_stored_epsilon_matches_dp_accounting(tmp_path: Path) -> None:
    led = Ledger(tmp_path / LEDGER_FILE, epsilon_budget=50.0, delta=DELTA)
    batches = [
        [gaussian_event(4.53, 1.0)],
        [gumbel_event(0.1, 10)],
        [gaussian_event(20.0, 4.0, 3), zcdp_event(0.004, 2)],
        [gaussian_event(4.53, 1.0)],
    ]
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    so_far: list[dict] = []
    for batch in batches:
        r = led.reserve(batch, study_id="s")
        led.commit(r.id)
        so_far += batch
        for e in batch:  # dp_accounting driven by hand, explicit copies
            ev = (
                dp_accounting.GaussianDpEvent(e["sigma"] / e["l2"])
                if e["type"] == "gaussian"
                else dp_accounting.ZCDpEvent(e["rho"])
            )
            for _ in range(e["count"]):
                acc.compose(ev)
        assert r.epsilon_after == pytest.approx(compose_epsilon(so_far, DELTA), rel=1e-12)
        assert r.epsilon_after == pytest.approx(acc.get_epsilon(DELTA), rel=1e-10)
    assert [e["epsilon_after"] for e in led.entries()][-1] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-10)
    assert led.spent()["epsilon"] == pytest.approx(acc.get_epsilon(DELTA), rel=1e-10)


def test_refused_reservation_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    led = Ledger(path, epsilon_budget=3.0, delta=DELTA)
    for _ in range(3):
        led.commit(led.reserve([gaussian_event(10.0, 1.0, 4)], study_id="a").id)
    led.reserve([zcdp_event(0.01)], study_id="b")  # pending
    before_rows, before_hash = led.entries(), _sha(path)
    spent = led.spent()["epsilon"]
    with pytest.raises(BudgetExceeded) as info:
        led.reserve([gaussian_event(2.0, 1.0, 5)], study_id="c", analysis="assoc")
    exc = info.value
    assert isinstance(exc, FedgenError)
    assert exc.epsilon_budget == 3.0 and exc.epsilon_after > 3.0
    assert exc.spent == pytest.approx(spent) and exc.releases == 4 and exc.pending == 1
    msg = str(exc)
    assert msg.startswith("privacy budget exhausted: this release would bring the site's ε to ")
    assert "(δ=1e-06) but its policy allows 3 (spent " in msg and "over 4 releases" in msg
    assert led.entries() == before_rows and _sha(path) == before_hash
    # a release that fits still goes through afterwards
    assert led.reserve([zcdp_event(0.001)]).epsilon_after <= 3.0


def test_budget_boundary_is_exact(tmp_path: Path) -> None:
    ev = zcdp_event(0.01)
    budget = compose_epsilon([zcdp_event(0.01, 5)], DELTA)
    led = Ledger(tmp_path / LEDGER_FILE, epsilon_budget=budget, delta=DELTA)
    for _ in range(5):
        led.reserve([ev])
    with pytest.raises(BudgetExceeded):
        led.reserve([ev])
    assert led.spent()["reserved"] == 5


def test_not_a_ledger(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(InputError, match="junk.sqlite"):
        Ledger(junk, epsilon_budget=1.0, delta=DELTA)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE samples (id TEXT)")
    con.commit()
    con.close()
    with pytest.raises(InputError, match="not a fedgen privacy ledger"):
        Ledger(other, epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(InputError):
        Ledger(tmp_path, epsilon_budget=1.0, delta=DELTA)  # a folder
    with pytest.raises(InputError):
        Ledger(tmp_path / "missing" / LEDGER_FILE, epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(InputError):
        Ledger(tmp_path / "absent.sqlite", epsilon_budget=1.0, delta=DELTA, readonly=True)
    assert not (tmp_path / "absent.sqlite").exists()
    with pytest.raises(ValueError):
        Ledger(tmp_path / LEDGER_FILE, epsilon_budget=1.0, delta=0.0)


def test_readonly_ledger(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    Ledger(path, epsilon_budget=5.0, delta=DELTA).reserve([zcdp_event(0.1)], study_id="s")
    ro = Ledger(path, epsilon_budget=5.0, delta=DELTA, readonly=True)
    assert ro.spent()["reserved"] == 1
    with pytest.raises(ValueError, match="read-only"):
        ro.reserve([zcdp_event(0.1)])


CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from fedgen.privacy.ledger import Ledger
    led = Ledger(sys.argv[1], epsilon_budget=10.0, delta=1e-6)
    r = led.reserve([{"type": "gaussian", "sigma": 5.0, "l2": 1.0, "count": 10}],
                    site="hk", study_id="crash", run_id="r1", analysis="assoc", step="counts")
    print(r.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies between reserve and commit
    led.commit(r.id)
    """
)


def test_crash_between_reserve_and_commit_is_counted(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    Ledger(path, epsilon_budget=10.0, delta=DELTA).commit(
        Ledger(path, epsilon_budget=10.0, delta=DELTA).reserve([zcdp_event(0.01)], study_id="before").id
    )
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(path)], capture_output=True, text=True, env=_child_env(), timeout=120
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILL
    rid = int(proc.stdout.strip())
    led = Ledger(path, epsilon_budget=10.0, delta=DELTA)
    s = led.spent()
    assert s["reserved"] == 1 and s["releases"] == 1
    events = [zcdp_event(0.01), gaussian_event(5.0, 1.0, 10)]
    assert s["epsilon"] == pytest.approx(compose_epsilon(events, DELTA))
    row = [e for e in led.entries() if e["id"] == rid][0]
    assert row["status"] == "reserved" and row["study_id"] == "crash"
    by = {b["study_id"]: b for b in led.by_study()}
    assert by["crash"]["reserved"] == 1 and by["crash"]["releases"] == 0
    # the next reservation is charged on top of the crashed one
    r = led.reserve([zcdp_event(0.01)])
    assert r.epsilon_after == pytest.approx(compose_epsilon(events + [zcdp_event(0.01)], DELTA))


RACE_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedgen.privacy.ledger import Ledger, BudgetExceeded
    path, budget, go = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
    led = Ledger(path, epsilon_budget=budget, delta=1e-6)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    ok = 0
    for i in range(20):
        try:
            r = led.reserve([{"type": "zcdp", "rho": 0.01, "count": 1}], study_id=sys.argv[4], step=str(i))
        except BudgetExceeded:
            continue
        ok += 1
        if i % 2:
            led.commit(r.id)
    print(ok, flush=True)
    """
)


def test_concurrent_reservations_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    eps25 = compose_epsilon([zcdp_event(0.01, 25)], DELTA)
    eps26 = compose_epsilon([zcdp_event(0.01, 26)], DELTA)
    budget = (eps25 + eps26) / 2
    Ledger(path, epsilon_budget=budget, delta=DELTA)  # create the file first
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, str(path), repr(budget), str(go), f"p{k}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        for k in range(2)
    ]
    try:
        for p in procs:  # both children are up before either starts reserving
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    successes = [int(out.strip()) for out, _ in outs]
    assert sum(successes) == 25
    led = Ledger(path, epsilon_budget=budget, delta=DELTA)
    s = led.spent()
    assert s["releases"] + s["reserved"] == 25
    assert s["epsilon"] == pytest.approx(eps25) and s["epsilon"] <= budget
    assert sorted(b["study_id"] for b in led.by_study()) == sorted(f"p{k}" for k, n in enumerate(successes) if n)
    # every stored ε is within budget and the sequence of ε after each row increases
    after = [e["epsilon_after"] for e in led.entries()]
    assert all(a <= budget for a in after) and after == sorted(after)


# ---------------------------------------------------------------------------------------------
# fedgen ledger
# ---------------------------------------------------------------------------------------------


def test_cmd_ledger_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "policy.toml").write_text("version = 1\nepsilon_budget = 4.0\ndelta = 1e-5\n", encoding="utf-8")
    led = Ledger(state / LEDGER_FILE, epsilon_budget=4.0, delta=1e-5)
    led.commit(led.reserve([gaussian_event(5.0, 1.0, 10)], study_id="gwas-2025", analysis="assoc").id)
    led.commit(led.reserve([gumbel_event(0.1, 10)], study_id="gwas-2025", analysis="select").id)
    pending = led.reserve([zcdp_event(0.01)], study_id="qc-run", run_id="run-42", analysis="qc", step="counts")
    led.void(led.reserve([zcdp_event(0.05)], study_id="voided").id, "never sent")
    before = _sha(state / LEDGER_FILE)

    rc = cmd_ledger(argparse.Namespace(state_dir=str(state), json=False))
    out = capsys.readouterr().out
    assert rc == 0
    total = compose_epsilon(
        [gaussian_event(5.0, 1.0, 10), gumbel_event(0.1, 10), zcdp_event(0.01)], 1e-5
    )
    assert "ε = 4 at δ = 1e-05" in out
    assert f"spent:       ε = {total:.4g}" in out
    assert f"remaining:   ε = {4.0 - total:.4g}" in out
    assert "2 committed, 1 pending reservation" in out
    assert "gwas-2025" in out and "assoc, select" in out and "qc-run" in out and "voided" not in out
    assert f"#{pending.id}" in out and "run-42" in out

    rc = cmd_ledger(argparse.Namespace(state_dir=str(state), json=True))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["epsilon_budget"] == 4.0 and report["delta"] == 1e-5
    assert report["epsilon"] == pytest.approx(total)
    assert report["remaining"] == pytest.approx(4.0 - total)
    assert report["releases"] == 2 and report["reserved"] == 1
    studies = {s["study_id"]: s for s in report["studies"]}
    assert set(studies) == {"gwas-2025", "qc-run"}
    assert studies["gwas-2025"]["releases"] == 2 and studies["gwas-2025"]["analyses"] == ["assoc", "select"]
    assert studies["gwas-2025"]["epsilon"] == pytest.approx(
        compose_epsilon([gaussian_event(5.0, 1.0, 10), gumbel_event(0.1, 10)], 1e-5)
    )
    assert [p["id"] for p in report["pending"]] == [pending.id]
    assert _sha(state / LEDGER_FILE) == before  # reading changes nothing


def test_cmd_ledger_without_ledger_or_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedgen.node.policy import load_policy

    defaults = load_policy(None)
    rc = cmd_ledger(argparse.Namespace(state_dir=str(tmp_path), json=True))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["epsilon"] == 0.0 and report["releases"] == 0 and report["studies"] == []
    assert report["epsilon_budget"] == defaults["epsilon_budget"] and report["delta"] == defaults["delta"]
    assert report["remaining"] == defaults["epsilon_budget"]
    assert list(tmp_path.iterdir()) == []  # nothing created
    rc = cmd_ledger(argparse.Namespace(state_dir=str(tmp_path), json=False))
    assert rc == 0 and "nothing spent" in capsys.readouterr().out


def test_cmd_ledger_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cmd_ledger(argparse.Namespace(state_dir=str(tmp_path / "nope"), json=False))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LEDGER_FILE).write_bytes(b"garbage" * 200)
    rc = cmd_ledger(argparse.Namespace(state_dir=str(bad), json=True))
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and captured.err.count("\n") == 1 and "ledger" in captured.err
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "policy.toml").write_text("epsilon_budget = -1\n", encoding="utf-8")
    rc = cmd_ledger(argparse.Namespace(state_dir=str(pol), json=False))
    err = capsys.readouterr().err
    assert rc == 2 and "epsilon_budget" in err and err.count("\n") == 1


def test_add_command_registers_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedgen")
    sub = parser.add_subparsers(dest="command", required=True)
    add_command(sub)
    args = parser.parse_args(["ledger", "--state-dir", str(tmp_path), "--json"])
    assert args.func is cmd_ledger and args.json is True
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["ledger"])
