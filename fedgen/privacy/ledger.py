"""A site's persistent privacy ledger (SQLite, ``<state_dir>/ledger.sqlite``).

Every differentially private release a site makes is charged here before it leaves the site:

1. :meth:`Ledger.reserve` composes the privacy events of every release on record (committed and
   reserved) with the candidate's, and refuses (:class:`BudgetExceeded`, nothing written) if
   ε at the policy's δ would exceed the site's budget; otherwise it records a *reserved* row.
2. The release is sent, then :meth:`Ledger.commit` marks the row *committed*.
3. :meth:`Ledger.void` cancels a reservation whose release never happened.

A reserved row counts as spent: if the process dies between reserve and commit, the ledger
over-counts rather than under-counts. Reservations are serialised across processes with
``BEGIN IMMEDIATE`` and every write is a committed transaction with ``synchronous=FULL``
(durable before the method returns). Sites hold disjoint individuals, so ledgers of different
sites compose in parallel; a pooled release is charged to every site that contributed.

ε is always recomputed from the stored events at the δ the ledger is opened with (the site
policy's current δ); ``epsilon_after`` records the value at the time of each reservation.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fedgen.errors import FedgenError, InputError
from fedgen.privacy.accounting import compose_epsilon, event_rho, validate_event

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite"
LEDGER_FORMAT = "fedgen-privacy-ledger"
LEDGER_VERSION = 1
BUDGET_SLACK = 1e-12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id            INTEGER PRIMARY KEY,
    created       TEXT NOT NULL,
    updated       TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'void')),
    site          TEXT NOT NULL DEFAULT '',
    study_id      TEXT NOT NULL DEFAULT '',
    run_id        TEXT NOT NULL DEFAULT '',
    analysis      TEXT NOT NULL DEFAULT '',
    step          TEXT NOT NULL DEFAULT '',
    events        JSON NOT NULL,
    epsilon_after REAL NOT NULL,
    note          TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS releases_study ON releases (study_id);
"""


class BudgetExceeded(FedgenError):
    """A release was refused because it would take the site over its privacy budget."""

    def __init__(
        self,
        message: str | None = None,
        *,
        epsilon_after: float = math.nan,
        epsilon_budget: float = math.nan,
        delta: float = math.nan,
        spent: float = math.nan,
        releases: int = 0,
        pending: int = 0,
    ) -> None:
        self.epsilon_after = epsilon_after
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        self.spent = spent
        self.releases = releases
        self.pending = pending
        if message is None:
            over = f"{releases} release{'s' if releases != 1 else ''}"
            if pending:
                over += f", {pending} of them reserved but not confirmed"
            message = (
                f"privacy budget exhausted: this release would bring the site's ε to {epsilon_after:.4g} "
                f"(δ={delta:g}) but its policy allows {epsilon_budget:.4g} (spent {spent:.4g} over {over})"
            )
        super().__init__(message)


@dataclass(frozen=True)
class Reservation:
    """A reserved (not yet committed) release: its row id, normalised events and the site's ε after it."""

    id: int
    events: list[dict[str, Any]] = field(default_factory=list)
    epsilon_after: float = 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class Ledger:
    """A site's privacy ledger.

    Parameters
    ----------
    path
        The SQLite file (normally ``<state_dir>/ledger.sqlite``). A missing or empty file is
        created and initialised (unless ``readonly``); a file that is not a fedgen ledger raises
        :class:`~fedgen.errors.InputError`.
    epsilon_budget, delta
        The site policy's total ε and the δ at which ε is computed.
    readonly
        Open without creating or writing anything (a missing file is an error).
    """

    def __init__(self, path: str | Path, *, epsilon_budget: float, delta: float, readonly: bool = False) -> None:
        self.path = Path(path)
        budget = float(epsilon_budget)
        if not math.isfinite(budget) or budget < 0:
            raise ValueError(f"epsilon_budget must be >= 0 and finite, got {epsilon_budget!r}")
        d = float(delta)
        if not 0 < d < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.epsilon_budget = budget
        self.delta = d
        self.readonly = readonly
        if readonly and not self.path.is_file():
            raise InputError(f"{self.path}: privacy ledger not found")
        if not readonly:
            if self.path.exists() and not self.path.is_file():
                raise InputError(f"{self.path}: not a privacy ledger (not a regular file)")
            if not self.path.parent.is_dir():
                raise InputError(f"{self.path}: folder {self.path.parent} does not exist")
        self._init()

    # -- connection and schema -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
            else:
                conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            if not self.readonly:
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=60000")
        except sqlite3.Error as exc:
            raise InputError(f"{self.path}: cannot open privacy ledger ({exc})") from None
        return conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise FedgenError(f"{self.path}: privacy ledger is locked by another process ({exc})") from None
            raise InputError(f"{self.path}: cannot use privacy ledger ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: not a fedgen privacy ledger or damaged ({exc})") from None
        finally:
            conn.close()

    def _init(self) -> None:
        with self._transaction(write=not self.readonly) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                if self.readonly:
                    raise InputError(f"{self.path}: not a fedgen privacy ledger (empty database)")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", LEDGER_FORMAT),
                        ("version", str(LEDGER_VERSION)),
                        ("created", _now()),
                        ("neighboring_relation", "ADD_OR_REMOVE_ONE"),
                        ("accountant", "dp_accounting RdpAccountant"),
                    ],
                )
                log.info("created privacy ledger %s", self.path)
                return
            if "meta" not in tables or "releases" not in tables:
                raise InputError(f"{self.path}: not a fedgen privacy ledger (an SQLite database with other tables)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != LEDGER_FORMAT:
                raise InputError(f"{self.path}: not a fedgen privacy ledger (format {meta.get('format')!r})")
            if meta.get("version") != str(LEDGER_VERSION):
                raise InputError(
                    f"{self.path}: privacy ledger version {meta.get('version')!r} is not supported "
                    f"by this fedgen (expects {LEDGER_VERSION})"
                )

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _active_events(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], int, int]:
        events: list[dict[str, Any]] = []
        committed = reserved = 0
        for status, text in conn.execute("SELECT status, events FROM releases WHERE status != 'void' ORDER BY id"):
            events.extend(json.loads(text))
            if status == "committed":
                committed += 1
            else:
                reserved += 1
        return events, committed, reserved

    def _status(self, conn: sqlite3.Connection, reservation_id: int) -> str:
        row = conn.execute("SELECT status FROM releases WHERE id = ?", (int(reservation_id),)).fetchone()
        if row is None:
            raise ValueError(f"{self.path}: no release with id {reservation_id}")
        return str(row[0])

    def _writable(self) -> None:
        if self.readonly:
            raise ValueError(f"{self.path}: ledger opened read-only")

    # -- public API ------------------------------------------------------------------------

    def reserve(
        self,
        events: list[dict[str, Any]],
        *,
        site: str = "",
        study_id: str = "",
        run_id: str = "",
        analysis: str = "",
        step: str = "",
    ) -> Reservation:
        """Reserve budget for a release; raise :class:`BudgetExceeded` (writing nothing) if it does not fit."""
        self._writable()
        if isinstance(events, dict):
            events = [events]
        cand = [validate_event(e) for e in events]
        if not cand:
            raise ValueError("a release must carry at least one privacy event")
        with self._transaction(write=True) as conn:
            prior, committed, reserved = self._active_events(conn)
            eps_after = compose_epsilon(prior + cand, self.delta)
            if eps_after > self.epsilon_budget + BUDGET_SLACK:
                raise BudgetExceeded(
                    epsilon_after=eps_after,
                    epsilon_budget=self.epsilon_budget,
                    delta=self.delta,
                    spent=compose_epsilon(prior, self.delta),
                    releases=committed + reserved,
                    pending=reserved,
                )
            now = _now()
            cur = conn.execute(
                "INSERT INTO releases (created, updated, status, site, study_id, run_id, analysis, step, events,"
                " epsilon_after, note) VALUES (?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?, '')",
                (now, now, str(site), str(study_id), str(run_id), str(analysis), str(step), json.dumps(cand), eps_after),
            )
            rid = int(cur.lastrowid)
        log.info("privacy ledger: reserved release %d (%s/%s), site ε now %.4g", rid, study_id, analysis, eps_after)
        return Reservation(id=rid, events=cand, epsilon_after=eps_after)

    def would_fit(self, events: list[dict[str, Any]]) -> bool:
        """Whether ``events`` would fit the budget on top of everything on record (nothing is written)."""
        cand = [validate_event(e) for e in events]
        with self._transaction(write=False) as conn:
            prior, _, _ = self._active_events(conn)
        return compose_epsilon(prior + cand, self.delta) <= self.epsilon_budget + BUDGET_SLACK

    def commit(self, reservation_id: int) -> None:
        """Mark a reserved release as made (idempotent); a voided one raises ValueError."""
        self._writable()
        with self._transaction(write=True) as conn:
            status = self._status(conn, reservation_id)
            if status == "void":
                raise ValueError(f"{self.path}: release {reservation_id} was voided and cannot be committed")
            if status == "reserved":
                conn.execute(
                    "UPDATE releases SET status = 'committed', updated = ? WHERE id = ?", (_now(), int(reservation_id))
                )

    def void(self, reservation_id: int, reason: str) -> None:
        """Cancel a reservation whose release never happened (nothing of it left the site).

        A committed release cannot be voided (ValueError); voiding a void row is a no-op.
        """
        self._writable()
        with self._transaction(write=True) as conn:
            status = self._status(conn, reservation_id)
            if status == "committed":
                raise ValueError(f"{self.path}: release {reservation_id} was committed and cannot be voided")
            if status == "reserved":
                conn.execute(
                    "UPDATE releases SET status = 'void', updated = ?, note = ? WHERE id = ?",
                    (_now(), str(reason), int(reservation_id)),
                )
        log.info("privacy ledger: voided release %d (%s)", reservation_id, reason)

    def spent(self) -> dict[str, Any]:
        """ε spent (committed and reserved releases) at the ledger's δ, the budget and what remains."""
        with self._transaction(write=False) as conn:
            events, committed, reserved = self._active_events(conn)
        eps = compose_epsilon(events, self.delta)
        return {
            "epsilon": eps,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "remaining": max(0.0, self.epsilon_budget - eps),
            "rho": float(sum(event_rho(e) for e in events)),
            "releases": committed,
            "reserved": reserved,
        }

    def entries(self) -> list[dict[str, Any]]:
        """Every row, oldest first, with ``events`` parsed."""
        with self._transaction(write=False) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM releases ORDER BY id").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["events"] = json.loads(d["events"])
            out.append(d)
        return out

    def by_study(self) -> list[dict[str, Any]]:
        """Per study: committed and pending releases, ε of that study's events alone, analyses."""
        studies: dict[str, dict[str, Any]] = {}
        for e in self.entries():
            if e["status"] == "void":
                continue
            s = studies.setdefault(
                e["study_id"], {"study_id": e["study_id"], "releases": 0, "reserved": 0, "events": [], "analyses": []}
            )
            s["releases" if e["status"] == "committed" else "reserved"] += 1
            s["events"].extend(e["events"])
            if e["analysis"] and e["analysis"] not in s["analyses"]:
                s["analyses"].append(e["analysis"])
        out = []
        for s in studies.values():
            events = s.pop("events")
            s["epsilon"] = compose_epsilon(events, self.delta)
            s["rho"] = float(sum(event_rho(e) for e in events))
            out.append(s)
        return out
