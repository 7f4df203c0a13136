"""The site's egress audit log: ``<state_dir>/audit.jsonl``, one JSON line per message that left
the site or was refused.

Each entry records what left (array names, dtypes, shapes, bytes, the SHA-256 of the payload),
for whom (run and study ids, analysis and step), the privacy charged (ε, δ) and the decision
with its reason. Entries are hash-chained: ``prev`` is the SHA-256 of the previous line, so a
deleted, inserted or edited line breaks :func:`verify` from that point on. Appends hold an
exclusive ``flock`` on the file, so concurrent ClientApp processes of one node cannot interleave.

When ``keep_payloads`` is on (the default for site nodes) the exact bytes of every payload that
left are also kept under ``<state_dir>/audit-payloads/<sha256>.npz``, so a compliance officer can
re-hash them; the hash covers array names, dtypes, shapes, raw bytes and the metadata JSON.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

AUDIT_LOG = "audit.jsonl"
PAYLOAD_DIR = "audit-payloads"
GENESIS = "0" * 64


def payload_digest(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> tuple[str, int]:
    """SHA-256 (hex) of a reply payload and its size in bytes (array bytes only).

    Canonical form: for each array sorted by name, ``name``, ``dtype.str``, ``shape`` and the
    C-ordered raw bytes; then the metadata as sorted-key JSON.
    """
    h = hashlib.sha256()
    nbytes = 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(memoryview(a).cast("B") if a.size else b"")
        nbytes += int(a.nbytes)
    h.update(json.dumps(dict(meta or {}), sort_keys=True, default=str).encode())
    return h.hexdigest(), nbytes


def describe_arrays(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [
        {"name": n, "dtype": np.asarray(a).dtype.str, "shape": list(np.shape(a)), "bytes": int(np.asarray(a).nbytes)}
        for n, a in sorted(arrays.items())
    ]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _line_hash(line: str) -> str:
    return hashlib.sha256(line.rstrip("\n").encode()).hexdigest()


def _last_hash(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return GENESIS
    step = 4096
    pos = size
    tail = b""
    while pos > 0:
        pos = max(0, pos - step)
        f.seek(pos)
        tail = f.read(size - pos)
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped or pos == 0:
            last = stripped.rsplit(b"\n", 1)[-1]
            return _line_hash(last.decode())
        step *= 2
    return GENESIS


def append(state_dir: str | Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Append one entry (adding ``time`` and the chain hash ``prev``); return what was written."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    path = state / AUDIT_LOG
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            record = {"time": _now(), **dict(entry)}
            record["prev"] = _last_hash(f)
            line = json.dumps(record, sort_keys=False, default=str, separators=(",", ":"))
            f.seek(0, os.SEEK_END)
            f.write((line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return record


def keep_payload(state_dir: str | Path, digest: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Store the exact payload that left, as ``audit-payloads/<digest>.npz`` (atomic)."""
    folder = Path(state_dir) / PAYLOAD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest}.npz"
    if target.exists():
        return target
    buf = io.BytesIO()
    np.savez(buf, **{f"a_{k}": np.asarray(v) for k, v in arrays.items()}, __meta__=np.frombuffer(json.dumps(dict(meta), sort_keys=True, default=str).encode(), dtype=np.uint8))
    tmp = folder / f".{digest}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return target


def head(state_dir: str | Path) -> str:
    """SHA-256 of the last line of the audit log (the chain head; GENESIS when empty).

    An operator who writes it down outside the site (a ticket, a printed log) can later prove
    that no entry before it was changed: ``fedgen audit --verify`` must end at a chain that
    contains this hash.
    """
    path = Path(state_dir) / AUDIT_LOG
    if not path.exists():
        return GENESIS
    with open(path, "rb") as f:
        return _last_hash(f)


def prune_payloads(state_dir: str | Path, *, older_than_days: float) -> int:
    """Delete kept payloads older than the retention period; returns how many (the log keeps their hashes)."""
    import time

    folder = Path(state_dir) / PAYLOAD_DIR
    if not folder.is_dir():
        return 0
    cutoff = time.time() - float(older_than_days) * 86400.0
    n = 0
    for p in folder.glob("*.npz"):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except FileNotFoundError:
            continue
    return n


def load_payload(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k[2:]: z[k] for k in z.files if k.startswith("a_")}
        meta = json.loads(bytes(z["__meta__"]).decode()) if "__meta__" in z.files else {}
    return arrays, meta


def read(state_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Entries of a site's audit log, oldest first (a malformed line raises ValueError)."""
    path = Path(state_dir) / AUDIT_LOG
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None


def verify(state_dir: str | Path) -> list[str]:
    """Problems found (empty = intact): broken hash chain, stored payloads whose hash differs."""
    path = Path(state_dir) / AUDIT_LOG
    problems: list[str] = []
    if not path.exists():
        return [f"{path}: no audit log"]
    prev = GENESIS
    payload_dir = Path(state_dir) / PAYLOAD_DIR
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"line {n}: not valid JSON")
                prev = _line_hash(line)
                continue
            if rec.get("prev") != prev:
                problems.append(f"line {n}: hash chain broken (an entry before it was changed, removed or inserted)")
            prev = _line_hash(line)
            digest = rec.get("sha256")
            if rec.get("decision") == "sent" and digest:
                stored = payload_dir / f"{digest}.npz"
                if stored.exists():
                    arrays, meta = load_payload(stored)
                    again, _ = payload_digest(arrays, meta)
                    if again != digest:
                        problems.append(f"line {n}: stored payload {stored.name} does not match its hash")
    return problems
