"""Flower implementation of :class:`~fedgen.federation.transport.Transport`.

The aggregator side (:class:`FlowerTransport`, used by the ServerApp) and the
wire format shared with the site side (``client_app.py``) live here.

Wire format (protocol 2) of one request (message type ``query.fedgen``)::

    RecordDict{"fedgen": ConfigRecord{"protocol": 2, "analysis": str, "params": JSON str,
                                      "study_id": str, "arrays": bytes}}

and of its reply::

    RecordDict{"fedgen": ConfigRecord{"protocol": 2, "meta": JSON str, "arrays": bytes}}

``arrays`` packs every named array of the message into one byte string
(:func:`pack_arrays`): ``b"FGA2"``, a 4-byte little-endian header length, a JSON header
(name, dtype, shape, offset, nbytes of each array) and the raw buffers. Only plain numeric
and boolean dtypes are accepted (no objects, no structured or pickled data), and every
offset and size is checked before a buffer is read.

Why one byte string: Flower moves a message as a tree of objects (each record, each array,
each 5 MB chunk), and every object costs a request on each hop (aggregator → SuperLink →
SuperNode → ClientApp and back). A fedgen reply with seven arrays was some thirty objects
a round; packed, a message is three objects whatever it carries.

A **batch** carries several requests in one message (one round for independent steps: two
phenotypes, a logistic and a Firth step)::

    RecordDict{"fedgen": ConfigRecord{"protocol": 2, "batch": JSON [{"analysis", "params",
                                      "study_id"}, ...], "arrays": bytes}}

with the arrays of request ``i`` named ``"i/<name>"``; the site answers each request through
its own pass of the site pipeline, in order, and replies with ``"metas"`` (JSON list, one meta
per request, ``{"error": ...}`` for a refused one) and the arrays of reply ``i`` as ``"i/<name>"``.
At most :data:`MAX_BATCH` requests travel in one message.

A site that refuses or fails answers with ``meta == {"error": message}`` and no arrays.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from fedgen.errors import ConfigError, FedgenError, SiteError
from fedgen.federation.transport import Reply, Request

log = logging.getLogger(__name__)

#: Flower message type of every fedgen request (``@app.query("fedgen")``) but model updates, which
#: travel as ``train`` messages (``@app.train()``; :mod:`fedgen.federation.train`).
MESSAGE_TYPE = "query.fedgen"
PROTOCOL = 2
_CONFIG_KEY = "fedgen"
_ARRAYS_KEY = "arrays"
_MAGIC = b"FGA2"
#: most requests one batch message may carry
MAX_BATCH = 64
#: dtype kinds an array on the wire may have: bool, signed/unsigned int, float
_KINDS = frozenset("biuf")


#: how errors that are not an answer from the site begin (timeouts, undeliverable requests)
_NO_ANSWER = ("did not answer within", "the request could not be delivered")

# ---------------------------------------------------------------- wire format


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named numeric arrays → one byte string (see the module docstring)."""
    header, parts, offset = [], [], 0
    for name, value in arrays.items():
        orig = np.asarray(value)
        arr = np.ascontiguousarray(orig)  # (0-d arrays come back 1-d; the header keeps the shape)
        if arr.dtype.hasobject or arr.dtype.kind not in _KINDS or arr.dtype.fields is not None:
            raise FedgenError(f"array {name!r} has dtype {arr.dtype}, which cannot be sent")
        header.append({"name": str(name), "dtype": arr.dtype.str, "shape": list(orig.shape), "offset": offset,
                       "nbytes": int(arr.nbytes)})
        parts.append(arr)
        offset += int(arr.nbytes)
    head = json.dumps(header, separators=(",", ":")).encode()
    # one copy: the join reads each array's buffer directly
    return b"".join([_MAGIC, len(head).to_bytes(4, "little"), head,
                     *(memoryview(a.reshape(-1).view(np.uint8)) for a in parts)])


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays`; raises FedgenError on anything malformed."""
    blob = memoryview(blob)
    if not len(blob):
        return {}
    if len(blob) < len(_MAGIC) + 4 or bytes(blob[: len(_MAGIC)]) != _MAGIC:
        raise FedgenError("malformed arrays: not a fedgen array pack")
    n = int.from_bytes(blob[len(_MAGIC) : len(_MAGIC) + 4], "little")
    start = len(_MAGIC) + 4 + n
    if start > len(blob):
        raise FedgenError("malformed arrays: header runs past the end")
    try:
        header = json.loads(bytes(blob[len(_MAGIC) + 4 : start]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FedgenError(f"malformed arrays: bad header ({exc})") from None
    if not isinstance(header, list):
        raise FedgenError("malformed arrays: header must be a list")
    body = bytearray(blob[start:])  # one writable copy; the arrays are views into it
    out: dict[str, np.ndarray] = {}
    for entry in header:
        try:
            name = entry["name"]
            dtype = np.dtype(str(entry["dtype"]))
            shape = tuple(int(x) for x in entry["shape"])
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FedgenError(f"malformed arrays: bad header entry ({type(exc).__name__}: {exc})") from None
        if not isinstance(name, str) or name in out:
            raise FedgenError(f"malformed arrays: bad or repeated array name {name!r}")
        if dtype.hasobject or dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise FedgenError(f"malformed arrays: array {name!r} has dtype {dtype}, which is not accepted")
        if any(x < 0 for x in shape) or len(shape) > 8:
            raise FedgenError(f"malformed arrays: array {name!r} has a bad shape {shape}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if nbytes != count * dtype.itemsize or offset < 0 or offset + nbytes > len(body):
            raise FedgenError(f"malformed arrays: array {name!r} does not fit its declared size")
        out[name] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
    return out


def _arrays_of(rec: ConfigRecord) -> dict[str, np.ndarray]:
    blob = rec.get(_ARRAYS_KEY, b"")
    if not isinstance(blob, (bytes, bytearray)):
        raise FedgenError(f"malformed message: {_ARRAYS_KEY!r} must be bytes")
    return unpack_arrays(blob)


def _config(content: RecordDict, what: str) -> ConfigRecord:
    rec = content.config_records.get(_CONFIG_KEY)
    if rec is None:
        raise FedgenError(f"malformed {what}: no {_CONFIG_KEY!r} config record")
    if int(rec.get("protocol", -1)) != PROTOCOL:
        raise FedgenError(f"{what} uses fedgen wire protocol {rec.get('protocol')!r}; this side speaks {PROTOCOL}")
    return rec


def encode_request(
    analysis: str, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, study_id: str = ""
) -> RecordDict:
    """Request (analysis name, JSON params, arrays) → RecordDict."""
    return RecordDict(
        {
            _CONFIG_KEY: ConfigRecord(
                {
                    "protocol": PROTOCOL,
                    "analysis": str(analysis),
                    "params": json.dumps(dict(params), allow_nan=False),
                    "study_id": str(study_id),
                    _ARRAYS_KEY: pack_arrays(arrays),
                }
            ),
        }
    )


def json_object(text: Any, where: str, field: str) -> dict[str, Any]:
    """The JSON object in a message's ``field`` (``text``; None if absent); FedgenError naming
    ``where`` and ``field`` if it is absent, not JSON or not an object."""
    try:
        value = json.loads(str(text)) if text is not None else None
    except ValueError as exc:
        raise FedgenError(f"malformed {where}: bad {field} ({exc})") from None
    if not isinstance(value, dict):
        raise FedgenError(f"malformed {where}: {field} must be a JSON object")
    return value


def decode_request(content: RecordDict) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """RecordDict → (analysis, params, arrays). Raises FedgenError if malformed."""
    rec = _config(content, "request")
    params = json_object(rec.get("params"), "request", "params")
    return str(rec.get("analysis", "")), params, _arrays_of(rec)


def request_study_id(content: RecordDict) -> str:
    """The study id a request names (for the site's audit log); '' if none."""
    rec = content.config_records.get(_CONFIG_KEY)
    return str(rec.get("study_id", "")) if rec is not None else ""


def encode_reply(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> RecordDict:
    """Reply (arrays, JSON-able meta) → RecordDict."""
    return RecordDict(
        {
            _CONFIG_KEY: ConfigRecord(
                {"protocol": PROTOCOL, "meta": json.dumps(dict(meta), allow_nan=False), _ARRAYS_KEY: pack_arrays(arrays)}
            ),
        }
    )


def error_reply(message: str) -> RecordDict:
    """The reply of a site that refused or failed: ``meta == {"error": message}``, no arrays."""
    return encode_reply({}, {"error": str(message)})


def decode_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """RecordDict → (arrays, meta, nbytes as received: array payloads + meta JSON)."""
    rec = _config(content, "reply")
    meta_json = str(rec.get("meta", "{}"))
    meta = json_object(meta_json, "reply", "meta")
    blob = rec.get(_ARRAYS_KEY, b"")
    arrays = _arrays_of(rec)
    return arrays, meta, len(blob) + len(meta_json.encode("utf-8"))


def encode_batch(requests: list[tuple[str, Mapping[str, Any], Mapping[str, np.ndarray]]], *, study_id: str = "") -> RecordDict:
    """Several (analysis, params, arrays) requests → one batch RecordDict."""
    if not 0 < len(requests) <= MAX_BATCH:
        raise FedgenError(f"a batch carries 1..{MAX_BATCH} requests, not {len(requests)}")
    heads, arrays = [], {}
    for i, (analysis, params, arrs) in enumerate(requests):
        heads.append({"analysis": str(analysis), "params": dict(params), "study_id": str(study_id)})
        arrays.update({f"{i}/{k}": v for k, v in arrs.items()})
    return RecordDict(
        {
            _CONFIG_KEY: ConfigRecord(
                {"protocol": PROTOCOL, "batch": json.dumps(heads, allow_nan=False), _ARRAYS_KEY: pack_arrays(arrays)}
            )
        }
    )


def is_batch(content: RecordDict) -> bool:
    rec = content.config_records.get(_CONFIG_KEY)
    return rec is not None and "batch" in rec


def _split(arrays: Mapping[str, np.ndarray], n: int, what: str) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for name, a in arrays.items():
        head, sep, rest = name.partition("/")
        if not sep or not head.isdigit() or int(head) >= n or not rest:
            raise FedgenError(f"malformed {what}: array name {name!r} names no request of the batch")
        out[int(head)][rest] = a
    return out


def decode_batch(content: RecordDict) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray], str]]:
    """Batch RecordDict → [(analysis, params, arrays, study_id), ...]. Raises FedgenError if malformed."""
    rec = _config(content, "request")
    try:
        heads = json.loads(str(rec["batch"]))
    except (KeyError, ValueError) as exc:
        raise FedgenError(f"malformed request: bad batch ({exc})") from None
    if not isinstance(heads, list) or not 0 < len(heads) <= MAX_BATCH:
        raise FedgenError(f"malformed request: a batch is a list of 1..{MAX_BATCH} requests")
    parts = _split(_arrays_of(rec), len(heads), "request")
    out = []
    for h, arrs in zip(heads, parts):
        if not isinstance(h, dict) or not isinstance(h.get("params"), dict):
            raise FedgenError("malformed request: each batch entry needs 'analysis' and object 'params'")
        out.append((str(h.get("analysis", "")), h["params"], arrs, str(h.get("study_id", ""))))
    return out


def encode_batch_reply(replies: list[tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]) -> RecordDict:
    """[(arrays, meta), ...] → one batch reply RecordDict."""
    metas = [dict(m) for _, m in replies]
    arrays = {f"{i}/{k}": v for i, (arrs, _) in enumerate(replies) for k, v in arrs.items()}
    return RecordDict(
        {
            _CONFIG_KEY: ConfigRecord(
                {"protocol": PROTOCOL, "metas": json.dumps(metas, allow_nan=False), _ARRAYS_KEY: pack_arrays(arrays)}
            )
        }
    )


def decode_batch_reply(content: RecordDict, n: int) -> list[tuple[dict[str, np.ndarray], dict[str, Any], int]]:
    """Batch reply → [(arrays, meta, nbytes), ...] for ``n`` requests (a whole-message error
    reply gives that error for each of them)."""
    rec = _config(content, "reply")
    if "metas" not in rec:
        arrays, meta, nbytes = decode_reply(content)
        return [(arrays, meta, nbytes if i == 0 else 0) for i in range(n)]
    try:
        metas = json.loads(str(rec["metas"]))
    except ValueError as exc:
        raise FedgenError(f"malformed reply: bad metas ({exc})") from None
    if not isinstance(metas, list) or len(metas) != n or not all(isinstance(m, dict) for m in metas):
        raise FedgenError(f"malformed reply: expected {n} metas")
    blob = rec.get(_ARRAYS_KEY, b"")
    parts = _split(_arrays_of(rec), n, "reply")
    out = []
    for i, (arrs, meta) in enumerate(zip(parts, metas)):
        nb = sum(int(a.nbytes) for a in arrs.values()) + len(json.dumps(meta))
        out.append((arrs, meta, nb))
    if out and blob:  # header bytes: count them once
        out[0] = (out[0][0], out[0][1], out[0][2] + max(0, len(blob) - sum(int(a.nbytes) for r in parts for a in r.values())))
    return out


# ---------------------------------------------------------------- transport


class FlowerTransport:
    """Sends fedgen requests to SuperNodes through a Flower ``Grid``.

    On construction it waits (up to ``connect_timeout`` s) for the SuperNodes
    to connect and learns which node is which site by sending each one the
    ``ping`` analysis (the reply's ``meta["site"]`` comes from the site's own
    node config). With ``expected_sites`` it waits for exactly those sites and
    rejects unknown or duplicated ones; with ``None`` it waits for at least one
    site and then takes every site that connected within ``connect_timeout``
    (sites that answer later are not used).

    Each :meth:`query` sends one message per site and waits up to ``timeout``
    s for all replies; a site that does not answer, refuses, or fails raises
    :class:`~fedgen.errors.SiteError` naming it.
    """

    def __init__(
        self,
        grid: Any,
        *,
        expected_sites: list[str] | None,
        connect_timeout: float,
        timeout: float,
        poll_interval: float = 0.05,
        max_poll_interval: float = 0.5,
    ) -> None:
        if expected_sites is not None:
            dupes = sorted({s for s in expected_sites if list(expected_sites).count(s) > 1})
            if dupes:
                raise ConfigError(f"site names must be unique; repeated: {', '.join(dupes)}")
            if not expected_sites:
                raise ConfigError("the study lists no sites")
        self._grid = grid
        self._expected = list(expected_sites) if expected_sites is not None else None
        self._connect_timeout = float(connect_timeout)
        self._timeout = float(timeout)
        self._poll = (float(poll_interval), float(max_poll_interval))
        self._round = 0
        #: timings of the last query (seconds): encode, decode
        self.last_round: dict[str, float] = {}
        self._node_of: dict[str, int] = self._discover()

    # -- Transport protocol

    def sites(self) -> list[str]:
        return list(self._node_of)

    def drop_site(self, site: str) -> None:
        """Stop asking ``site`` (it dropped out; see ``federation.min_sites``)."""
        self._node_of.pop(site, None)

    def node_ids(self) -> dict[str, int]:
        """Site name → Flower node id."""
        return dict(self._node_of)

    def query(self, request: Request) -> dict[str, Reply]:
        sites = list(self._node_of)
        t0 = time.perf_counter()
        contents = {
            s: encode_request(request.analysis, request.params, request.arrays_for(s), study_id=request.study_id) for s in sites
        }
        self.last_round = {"encode": time.perf_counter() - t0, "decode": 0.0}
        got, errors = self._exchange(request.analysis, {s: self._node_of[s] for s in sites}, contents, self._timeout)
        if errors:
            _raise_first(errors, sites)
        return {s: got[s] for s in sites}

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        """Several requests in one round: one batch message per site (see the module docstring)."""
        if len(requests) == 1:
            return [self.query(requests[0])]
        out: list[dict[str, Reply]] = [{} for _ in requests]
        for start in range(0, len(requests), MAX_BATCH):
            chunk = requests[start : start + MAX_BATCH]
            sites = list(self._node_of)
            t0 = time.perf_counter()
            contents = {
                s: encode_batch([(r.analysis, r.params, r.arrays_for(s)) for r in chunk], study_id=chunk[0].study_id)
                for s in sites
            }
            self.last_round = {"encode": time.perf_counter() - t0, "decode": 0.0}
            label = "+".join(sorted({r.analysis for r in chunk}))
            got, errors = self._exchange(label, {s: self._node_of[s] for s in sites}, contents, self._timeout,
                                         batch=len(chunk))
            if errors:
                _raise_first(errors, sites)
            for site in sites:
                for i, rep in enumerate(got[site]):  # type: ignore[union-attr]
                    out[start + i][site] = rep
        return out

    def train(self, request: Request) -> dict[str, Reply]:
        """A model update: one Flower ``train`` message per site (layout: :mod:`fedgen.federation.train`),
        answered by the sites' ``@app.train()`` handler through their site pipeline."""
        from fedgen.federation.train import TRAIN_MESSAGE_TYPE, encode_train_request

        sites = list(self._node_of)
        t0 = time.perf_counter()
        contents = {s: encode_train_request(request.analysis, request.params, request.arrays_for(s), study_id=request.study_id)
                    for s in sites}
        self.last_round = {"encode": time.perf_counter() - t0, "decode": 0.0}
        got, errors = self._exchange(request.analysis, {s: self._node_of[s] for s in sites}, contents, self._timeout,
                                     message_type=TRAIN_MESSAGE_TYPE)
        if errors:
            _raise_first(errors, sites)
        return {s: got[s] for s in sites}

    # -- internals

    def _exchange(
        self,
        analysis: str,
        nodes: Mapping[str, int],
        contents: Mapping[str, RecordDict],
        timeout: float,
        batch: int = 0,
        message_type: str = MESSAGE_TYPE,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Send one message per site; return (replies, errors) keyed by site."""
        self._round += 1
        group = f"fedgen-{self._round}-{analysis}"
        ttl = max(float(timeout), 1.0) + 30.0
        sites = list(nodes)
        messages = [Message(contents[s], nodes[s], message_type, ttl=ttl, group_id=group) for s in sites]
        replies: dict[str, Reply] = {}
        errors: dict[str, str] = {}

        ids = list(self._grid.push_messages(messages))
        pending: dict[str, str] = {}
        for i, site in enumerate(sites):
            mid = ids[i] if i < len(ids) else None
            if not mid:
                errors[site] = f"{_NO_ANSWER[1]} (rejected by the SuperLink; too large?)"
            else:
                pending[mid] = site

        deadline = time.monotonic() + float(timeout)
        from fedgen.federation.polling import Backoff, wait_after

        backoff = Backoff(self._poll[0], max(self._poll))
        while pending:
            t_pull = time.monotonic()
            for msg in self._grid.pull_messages(list(pending)):
                site = pending.pop(msg.metadata.reply_to_message_id, None)
                if site is None:
                    continue
                t_dec = time.perf_counter()
                try:
                    got = self._to_replies(site, nodes[site], msg, batch, train=message_type != MESSAGE_TYPE)
                    replies[site] = got if batch else got[0]
                except SiteError as exc:
                    errors[site] = exc.reason
                self.last_round["decode"] = self.last_round.get("decode", 0.0) + time.perf_counter() - t_dec
            if not pending:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            wait = min(wait_after(backoff.next(), now - t_pull), deadline - now)  # a held pull: at once
            if wait > 0:
                time.sleep(wait)
        for site in pending.values():
            errors[site] = f"{_NO_ANSWER[0]} {timeout:g} s"
        return replies, errors

    @staticmethod
    def _to_replies(site: str, node_id: int, msg: Message, n: int = 0, *, train: bool = False) -> list[Reply]:
        """A site's reply message → its replies (``n`` for a batch of n requests, 0 for one request)."""
        if msg.has_error():
            err = msg.error
            raise SiteError(site, f"Flower error {err.code}: {err.reason}")
        if msg.metadata.src_node_id != node_id:
            raise SiteError(site, f"reply came from node {msg.metadata.src_node_id}, expected {node_id}")
        try:
            if train:
                from fedgen.federation.train import decode_train_reply

                parts = [decode_train_reply(msg.content)]
            else:
                parts = decode_batch_reply(msg.content, n) if n else [decode_reply(msg.content)]
        except FedgenError as exc:
            raise SiteError(site, str(exc)) from None
        out = []
        for arrays, meta, nbytes in parts:
            if "error" in meta:
                if meta.get("refused") and meta.get("site"):  # the site's FAB gate refused the whole run
                    raise SiteError(site, f"site {meta['site']} {meta['error']}")
                raise SiteError(site, str(meta["error"]))
            out.append(Reply(site=site, arrays=arrays, meta=meta, nbytes=nbytes))
        return out

    def _discover(self) -> dict[str, int]:
        """Wait for SuperNodes, ping each new one, map site name → node id."""
        expected = self._expected
        deadline = time.monotonic() + self._connect_timeout
        site_of: dict[int, str] = {}  # node id → site, for nodes that answered the ping
        silent: dict[int, str] = {}  # node id → why it gave no usable answer
        wait = 0.05
        while True:
            node_ids = [int(n) for n in self._grid.get_node_ids()]
            new = [n for n in node_ids if n not in site_of and n not in silent]
            if new:
                remaining = max(deadline - time.monotonic(), 0.0)
                ping_timeout = max(min(self._timeout, remaining), min(self._timeout, 10.0))
                names = {f"node {n}": n for n in new}
                got, errors = self._exchange(
                    "ping", names, {k: encode_request("ping", {}, {}) for k in names}, ping_timeout
                )
                for key, reply in got.items():
                    site = str(reply.meta.get("site", ""))
                    if not site or site == "?":
                        silent[names[key]] = "answered the ping without a site name (node config has no 'site')"
                    else:
                        site_of[names[key]] = site
                for key, why in errors.items():
                    silent[names[key]] = why
                answered = {k: why for k, why in errors.items() if not why.startswith(_NO_ANSWER)}
                if answered:  # a node that answers with a refusal will not change its mind: stop now
                    raise FedgenError(
                        "a site node refused this run: " + "; ".join(f"{k}: {why}" for k, why in answered.items())
                    )
                self._check_sites(site_of)
            found = set(site_of.values())
            if expected is not None and found >= set(expected):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(wait)
            wait = min(wait * 1.5, 0.5)

        found = set(site_of.values())
        if expected is not None:
            missing = [s for s in expected if s not in found]
            if missing:
                msg = (
                    f"did not connect within {self._connect_timeout:g} s "
                    f"(connected: {', '.join(sorted(found)) or 'none'}"
                )
                if silent:
                    msg += "; nodes that did not identify themselves: " + "; ".join(
                        f"node {n}: {why}" for n, why in silent.items()
                    )
                msg += ")"
                if len(missing) == 1:
                    raise SiteError(missing[0], msg)
                raise FedgenError(f"sites {', '.join(missing)}: {msg}")
            order = list(expected)
        else:
            if not found:
                raise FedgenError(f"no site connected within {self._connect_timeout:g} s")
            order = sorted(found)
        by_site = {site: node for node, site in site_of.items()}
        mapping = {s: by_site[s] for s in order}
        log.info("connected sites: %s", ", ".join(f"{s} (node {n})" for s, n in mapping.items()))
        return mapping

    def _check_sites(self, site_of: Mapping[int, str]) -> None:
        seen: dict[str, list[int]] = {}
        for node, site in site_of.items():
            seen.setdefault(site, []).append(node)
        for site, nodes in seen.items():
            if len(nodes) > 1:
                raise SiteError(
                    site,
                    f"{len(nodes)} SuperNodes claim this site name (nodes {', '.join(map(str, nodes))}); "
                    "each site must run exactly one SuperNode with a unique 'site' in its node config",
                )
        if self._expected is not None:
            unknown = sorted(set(seen) - set(self._expected))
            if unknown:
                raise FedgenError(
                    f"unknown site(s) connected to the SuperLink: {', '.join(unknown)} "
                    f"(this study expects: {', '.join(self._expected)})"
                )


def _raise_first(errors: Mapping[str, str], order: Iterable[str]) -> None:
    ordered = [s for s in order if s in errors]
    first = ordered[0]
    msg = errors[first]
    if len(ordered) > 1:
        msg += "; also failed: " + "; ".join(f"site {s}: {errors[s]}" for s in ordered[1:])
    exc = SiteError(first, msg)
    exc.failed = {s: errors[s] for s in ordered}  # type: ignore[attr-defined]  # every site that failed this round
    raise exc
