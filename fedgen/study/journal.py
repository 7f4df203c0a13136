"""The aggregator's study journal: a study killed mid-way resumes where it stopped.

The aggregator's logic is a deterministic function of the plan and the sites' replies (the
plan's ``study_id`` aside, which the journal keeps). So every message round is journaled
beside the output folder, in ``<parent>/.<output name>.journal/``:

* ``identity.json``: the study id and the SHA-256 of the plan without its volatile fields
  (study id, status file, timeouts, polling, the resume switch);
* ``rounds.log``: append-only records, one per message round: the digest of the request batch
  (:func:`fedgen.federation.transport.batch_digest`) and every site's reply. Each record is
  ``MAGIC | length | sha256(payload) | payload`` and is fsync'ed before the replies reach the
  study; a torn or corrupt record ends the log (it and anything after it are dropped).

A relaunch with the same output folder and the same plan reuses the journal's study id, and
:class:`JournalTransport` answers each round whose digest equals the next record's from the
journal instead of asking the sites. The first round that differs (or the end of the journal)
switches to live queries for the rest of the study; records after a difference are dropped, so
a journal never mixes two runs' paths. A different plan (or ``federation.resume: false``) moves
the old journal aside (``.<output name>.journal.stale-<time>``) and starts afresh. Once the
results are published the journal is removed. One aggregator at a time: the journal is locked.

The journal assumes the sites' data did not change between the interrupted run and the resume
(the same assumption as the plan itself); after changing a site's data, resume with
``federation.resume=false``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.errors import FedgenError
from fedgen.federation.transport import Reply, Request, batch_digest
from fedgen.fileio import json_default

log = logging.getLogger("fedgen.study")

MAGIC = b"FGJ1"
_HEAD = len(MAGIC) + 8 + 32
IDENTITY = "identity.json"
LOG = "rounds.log"
LOCK = "lock"
#: plan keys that do not change what the study asks or computes
#: (min_sites: how many sites may drop out; a relaunch with another value still resumes, and a
#: round asked of other sites than the journal recorded has another digest anyway)
VOLATILE = ("study_id", "status_file", "timeout", "connect_timeout", "run_timeout", "poll", "max_poll", "resume",
            "min_sites")
VOLATILE_FED = ("timeout", "connect_timeout", "run_timeout", "poll", "max_poll", "workdir", "keep_logs", "resume",
                "min_sites")


def journal_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir).resolve()
    return out.parent / f".{out.name}.journal"


def plan_hash(plan: dict[str, Any]) -> str:
    """SHA-256 of the plan without its volatile fields."""
    stable = {k: v for k, v in plan.items() if k not in VOLATILE}
    cfg = stable.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("federation"), dict):
        stable["config"] = {**cfg, "federation": {k: v for k, v in cfg["federation"].items() if k not in VOLATILE_FED}}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def encode_round(digest: str, replies: list[dict[str, Reply]]) -> bytes:
    """One round's replies → bytes (a JSON head with the metadata, then an npz of the arrays)."""
    arrays: dict[str, np.ndarray] = {}
    head: list[list[dict[str, Any]]] = []
    for by_site in replies:
        row = []
        for site, rep in by_site.items():
            names = {}
            for name, a in rep.arrays.items():
                key = f"a{len(arrays)}"
                arrays[key] = np.asarray(a)
                names[name] = key
            row.append({"site": site, "reply_site": rep.site, "meta": rep.meta, "nbytes": int(rep.nbytes), "arrays": names})
        head.append(row)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    h = json.dumps({"digest": digest, "replies": head}, separators=(",", ":"), default=json_default).encode()
    return len(h).to_bytes(8, "little") + h + buf.getvalue()


def decode_round(payload: bytes) -> tuple[str, list[dict[str, Reply]]]:
    n = int.from_bytes(payload[:8], "little")
    head = json.loads(payload[8 : 8 + n].decode())
    with np.load(io.BytesIO(payload[8 + n :]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    out = []
    for row in head["replies"]:
        out.append({e["site"]: Reply(site=e["reply_site"], arrays={name: arrays[key] for name, key in e["arrays"].items()},
                                     meta=e["meta"], nbytes=int(e["nbytes"])) for e in row})
    return head["digest"], out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """An open study journal (see the module docstring). Use :func:`open_journal`."""

    def __init__(self, folder: Path, study_id: str, records: list[tuple[int, int, str]], end: int, lock_fd: int) -> None:
        self.folder = folder
        self.study_id = study_id
        self._records = records  # (offset of payload, payload length, batch digest) of each valid record
        self._next = 0
        self._end = end  # where the next record goes
        self._lock_fd = lock_fd
        self._live = not records
        self.rounds_replayed = 0
        self.rounds_live = 0
        self._writing: threading.Thread | None = None  # the last round's write (see append)
        self._write_error: BaseException | None = None

    # ---------------------------------------------------------------- replay
    def replay(self, digest: str) -> list[dict[str, Reply]] | None:
        """The journaled replies of the next round if its request digest is ``digest``, else None
        (and from then on every round is live: later records are dropped)."""
        if self._live:
            return None
        if self._next < len(self._records) and self._records[self._next][2] == digest:
            offset, length, _ = self._records[self._next]
            with open(self.folder / LOG, "rb") as f:
                f.seek(offset)
                payload = f.read(length)
            if hashlib.sha256(payload).digest() == self._stored_hash(offset):
                self._next += 1
                self.rounds_replayed += 1
                return decode_round(payload)[1]
        dropped = len(self._records) - self._next
        if dropped:
            log.warning("study journal: round %d asks something else than the journal recorded; %d journaled "
                        "round(s) dropped, the rest of the study is asked live", self.rounds_replayed + 1, dropped)
            self._end = self._records[self._next][0] - _HEAD
        elif self._records:
            log.info("study journal: %d round(s) replayed; the rest of the study is asked live", self.rounds_replayed)
        self._truncate()
        self._live = True
        return None

    def _stored_hash(self, offset: int) -> bytes:
        with open(self.folder / LOG, "rb") as f:
            f.seek(offset - 32)
            return f.read(32)

    def _truncate(self) -> None:
        path = self.folder / LOG
        with open(path, "r+b") as f:
            f.truncate(self._end)
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------- record
    def append(self, digest: str, replies: list[dict[str, Reply]]) -> None:
        """Journal one live round.

        The round is encoded here and written (and fsync'ed) by a background thread while the
        study goes on: the write of round k overlaps round k+1, and each append first waits
        for the previous write, so records stay in order and an I/O error stops the study at the
        next round (or at :meth:`flush`). A crash mid-write leaves a torn last record, which the
        next start detects by its hash and drops: that round is asked again."""
        if not self._live:  # a live round while records were pending: replay() decides; be safe
            self.replay("")
        self.flush()
        payload = encode_round(digest, replies)
        record = MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload
        self._writing = threading.Thread(target=self._write, args=(record,), name="fedgen-journal", daemon=True)
        self._writing.start()

    def _write(self, record: bytes) -> None:
        try:
            with open(self.folder / LOG, "r+b") as f:
                f.seek(self._end)
                f.write(record)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            self._end += len(record)
            self.rounds_live += 1
        except BaseException as exc:  # noqa: BLE001 - raised in the study's thread by flush()
            self._write_error = exc

    def flush(self) -> None:
        """Wait until every appended round is on disk; raise the error of a failed write."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._write_error is not None:
            exc, self._write_error = self._write_error, None
            raise FedgenError(f"could not write the study journal {self.folder / LOG}: {exc}") from exc

    # ---------------------------------------------------------------- end
    def summary(self) -> dict[str, int]:
        self.flush()
        return {"rounds_replayed": self.rounds_replayed, "rounds_live": self.rounds_live}

    def _settle(self) -> None:
        """The last write finished (its error logged: the study has ended either way)."""
        try:
            self.flush()
        except FedgenError as exc:
            log.error("%s", exc)

    def close(self) -> None:
        self._settle()
        if self._lock_fd >= 0:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
            self._lock_fd = -1

    def abandon(self) -> None:
        """The study failed: keep the journal for a relaunch, unless it holds no round at all."""
        self._settle()  # the last round's write
        if self._end == 0:
            self.remove()
        else:
            self.close()

    def remove(self) -> None:
        """The study was published: the journal is no longer needed."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _scan(path: Path) -> tuple[list[tuple[int, int, str]], int]:
    """Valid records of a log and where the valid part ends (a torn or corrupt record ends it)."""
    records: list[tuple[int, int, str]] = []
    end = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return records, 0
    with f:
        size = os.fstat(f.fileno()).st_size
        while end + _HEAD <= size:
            f.seek(end)
            head = f.read(_HEAD)
            if head[: len(MAGIC)] != MAGIC:
                break
            length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "little")
            if end + _HEAD + length > size:
                break
            payload = f.read(length)
            if hashlib.sha256(payload).digest() != head[len(MAGIC) + 8 :]:
                break
            n = int.from_bytes(payload[:8], "little")
            try:
                digest = json.loads(payload[8 : 8 + n].decode())["digest"]
            except (ValueError, KeyError, UnicodeDecodeError):
                break
            records.append((end + _HEAD, length, str(digest)))
            end += _HEAD + length
        if end < size:
            log.warning("study journal %s: %d byte(s) after the last complete record ignored (a torn write)", path, size - end)
    return records, end


def open_journal(plan: dict[str, Any]) -> Journal:
    """Open (or start) the journal of ``plan`` beside its output folder; see the module docstring."""
    folder = journal_dir(plan["output_dir"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    want = plan_hash(plan)
    resume = plan.get("resume", True) is not False
    if folder.exists():
        try:
            ident = json.loads((folder / IDENTITY).read_text())
        except (OSError, ValueError):
            ident = {}
        reason = None
        if not resume:
            reason = "federation.resume is false"
        elif ident.get("plan_sha256") != want or not ident.get("study_id"):
            reason = "the plan differs from the interrupted study's"
        if reason:
            aside = folder.parent / f"{folder.name}.stale-{int(time.time() * 1e6)}"
            os.replace(folder, aside)
            log.warning("study journal: %s; the old journal was moved to %s and the study starts afresh", reason, aside)
    fresh = not folder.exists()
    if fresh:
        tmp = folder.parent / f"{folder.name}.new-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        study_id = str(plan.get("study_id") or uuid.uuid4().hex)
        ident = {"study_id": study_id, "plan_sha256": want, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "study": plan.get("name")}
        (tmp / IDENTITY).write_text(json.dumps(ident, indent=2) + "\n")
        (tmp / LOG).write_bytes(b"")
        try:
            os.rename(tmp, folder)
        except OSError:  # another aggregator created it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            raise FedgenError(f"another study is starting in {plan['output_dir']} at the same time") from None
        _fsync_dir(folder.parent)
    lock_fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        raise FedgenError(f"another study is running with output folder {plan['output_dir']} (its journal "
                          f"{folder} is locked); wait for it to finish or stop it") from None
    ident = json.loads((folder / IDENTITY).read_text())
    records, end = _scan(folder / LOG)
    if records:
        log.info("resuming study %s from its journal (%d round(s) recorded in %s)", ident["study_id"], len(records), folder)
    return Journal(folder, str(ident["study_id"]), records, end, lock_fd)


class JournalTransport:
    """A transport that answers journaled rounds from the journal and journals the live ones."""

    def __init__(self, inner: Any, journal: Journal) -> None:
        self.inner = inner
        self.journal = journal

    def __getattr__(self, name: str) -> Any:  # last_round and other transport extras
        return getattr(self.inner, name)

    def sites(self) -> list[str]:
        return self.inner.sites()

    def query(self, request: Request) -> dict[str, Reply]:
        return self._round([request], single=True)[0]

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        return self._round(list(requests), single=False)

    def train(self, request: Request) -> dict[str, Reply]:
        """A model-update round (Flower ``train`` messages), journaled like any other round."""
        digest = batch_digest([request], single=True, train=True)
        hit = self.journal.replay(digest)
        if hit is not None:
            return hit[0]
        out = [self.inner.train(request)]
        self.journal.append(digest, out)
        return out[0]

    def _round(self, requests: list[Request], *, single: bool) -> list[dict[str, Reply]]:
        digest = batch_digest(requests, single=single)
        hit = self.journal.replay(digest)
        if hit is not None:
            return hit
        out = [self.inner.query(requests[0])] if single else list(self.inner.query_many(requests))
        self.journal.append(digest, out)
        return out
