"""The one progress display: what is done, time spent, and time left where the work is known."""

from __future__ import annotations

import logging

from fedgen.progress import Progress


def test_progress_lines_show_done_total_and_time_left(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("fedgen.progress.time.monotonic", lambda: clock[0])
    p = Progress("QC", 10, unit="blocks", every=5.0)
    with caplog.at_level(logging.INFO, logger="fedgen.progress"):
        clock[0] = 102.0
        p.update(2)            # too soon: no line
        clock[0] = 108.0
        p.update(4)            # 8 s for 4 blocks → 12 s for the 6 left
        clock[0] = 120.0
        p.update(10)           # finished: always a line, no estimate
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["QC: 4/10 blocks, 8 s, about 12 s left", "QC: 10/10 blocks, 20 s"]


def test_progress_without_a_known_total_reports_rounds_and_detail(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("fedgen.progress.time.monotonic", lambda: clock[0])
    p = Progress("association", None, unit="rounds", every=5.0)
    with caplog.at_level(logging.INFO, logger="fedgen.progress"):
        clock[0] = 6.0
        p.update(3, detail="glm:T2D (4 requests)")
        clock[0] = 400.0
        p.update(40, total=50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "association: 3 rounds, 6 s (glm:T2D (4 requests))"
    assert lines[1] == "association: 40/50 rounds, 6.7 min, about 1.7 min left"
