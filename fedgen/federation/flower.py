"""Flower implementation of :class:`~fedgen.federation.transport.Transport`.

The aggregator side (:class:`FlowerTransport`, used by the ServerApp) and the
wire format shared with the site side (``client_app.py``) live here.

Wire format of one request (message type ``query.fedgen``)::

    RecordDict{
        "fedgen": ConfigRecord{"protocol": 1, "analysis": str, "params": JSON str},
        "arrays": ArrayRecord{name: Array(ndarray), ...},
    }

and of its reply::

    RecordDict{
        "fedgen": ConfigRecord{"protocol": 1, "meta": JSON str},
        "arrays": ArrayRecord{name: Array(ndarray), ...},
    }

A site that refuses or fails answers with ``meta == {"error": message}`` and
no arrays. Arrays travel as ``.npy`` bytes (``allow_pickle=False`` both ways).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedgen.errors import ConfigError, FedgenError, SiteError
from fedgen.federation.transport import Reply, Request

log = logging.getLogger(__name__)

#: Flower message type of every fedgen request (``@app.query("fedgen")``).
MESSAGE_TYPE = "query.fedgen"
PROTOCOL = 1
_CONFIG_KEY = "fedgen"
_ARRAYS_KEY = "arrays"


#: how errors that are not an answer from the site begin (timeouts, undeliverable requests)
_NO_ANSWER = ("did not answer within", "the request could not be delivered")

# ---------------------------------------------------------------- wire format


def _encode_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.hasobject:
            raise FedgenError(f"array {name!r} has dtype object, which cannot be sent")
        record[str(name)] = Array(arr)
    return record


def _decode_arrays(record: ArrayRecord | None) -> tuple[dict[str, np.ndarray], int]:
    """Return the arrays and the number of payload bytes they took on the wire."""
    if record is None:
        return {}, 0
    out: dict[str, np.ndarray] = {}
    nbytes = 0
    for name, arr in record.items():
        out[name] = arr.numpy()
        nbytes += len(arr.data)
    return out, nbytes


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
                }
            ),
            _ARRAYS_KEY: _encode_arrays(arrays),
        }
    )


def decode_request(content: RecordDict) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """RecordDict → (analysis, params, arrays). Raises FedgenError if malformed."""
    rec = _config(content, "request")
    try:
        params = json.loads(str(rec["params"]))
    except (KeyError, ValueError) as exc:
        raise FedgenError(f"malformed request: bad params ({exc})") from None
    if not isinstance(params, dict):
        raise FedgenError("malformed request: params must be a JSON object")
    arrays, _ = _decode_arrays(content.array_records.get(_ARRAYS_KEY))
    return str(rec.get("analysis", "")), params, arrays


def request_study_id(content: RecordDict) -> str:
    """The study id a request names (for the site's audit log); '' if none."""
    rec = content.config_records.get(_CONFIG_KEY)
    return str(rec.get("study_id", "")) if rec is not None else ""


def encode_reply(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> RecordDict:
    """Reply (arrays, JSON-able meta) → RecordDict."""
    return RecordDict(
        {
            _CONFIG_KEY: ConfigRecord({"protocol": PROTOCOL, "meta": json.dumps(dict(meta), allow_nan=False)}),
            _ARRAYS_KEY: _encode_arrays(arrays),
        }
    )


def error_reply(message: str) -> RecordDict:
    """The reply of a site that refused or failed: ``meta == {"error": message}``, no arrays."""
    return encode_reply({}, {"error": str(message)})


def decode_reply(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Any], int]:
    """RecordDict → (arrays, meta, nbytes as received: array payloads + meta JSON)."""
    rec = _config(content, "reply")
    meta_json = str(rec.get("meta", "{}"))
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:
        raise FedgenError(f"malformed reply: bad meta ({exc})") from None
    if not isinstance(meta, dict):
        raise FedgenError("malformed reply: meta must be a JSON object")
    arrays, nbytes = _decode_arrays(content.array_records.get(_ARRAYS_KEY))
    return arrays, meta, nbytes + len(meta_json.encode("utf-8"))


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
        self._node_of: dict[str, int] = self._discover()

    # -- Transport protocol

    def sites(self) -> list[str]:
        return list(self._node_of)

    def node_ids(self) -> dict[str, int]:
        """Site name → Flower node id."""
        return dict(self._node_of)

    def query(self, request: Request) -> dict[str, Reply]:
        sites = list(self._node_of)
        contents = {
            s: encode_request(request.analysis, request.params, request.arrays_for(s), study_id=request.study_id) for s in sites
        }
        got, errors = self._exchange(request.analysis, {s: self._node_of[s] for s in sites}, contents, self._timeout)
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
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        """Send one message per site; return (replies, errors) keyed by site."""
        self._round += 1
        group = f"fedgen-{self._round}-{analysis}"
        ttl = max(float(timeout), 1.0) + 30.0
        sites = list(nodes)
        messages = [Message(contents[s], nodes[s], MESSAGE_TYPE, ttl=ttl, group_id=group) for s in sites]
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
        wait = self._poll[0]
        while pending:
            for msg in self._grid.pull_messages(list(pending)):
                site = pending.pop(msg.metadata.reply_to_message_id, None)
                if site is None:
                    continue
                try:
                    replies[site] = self._to_reply(site, nodes[site], msg)
                except SiteError as exc:
                    errors[site] = exc.reason
            if not pending:
                break
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(wait, deadline - now))
            wait = min(wait * 1.5, self._poll[1])
        for site in pending.values():
            errors[site] = f"{_NO_ANSWER[0]} {timeout:g} s"
        return replies, errors

    @staticmethod
    def _to_reply(site: str, node_id: int, msg: Message) -> Reply:
        if msg.has_error():
            err = msg.error
            raise SiteError(site, f"Flower error {err.code}: {err.reason}")
        if msg.metadata.src_node_id != node_id:
            raise SiteError(site, f"reply came from node {msg.metadata.src_node_id}, expected {node_id}")
        try:
            arrays, meta, nbytes = decode_reply(msg.content)
        except FedgenError as exc:
            raise SiteError(site, str(exc)) from None
        if "error" in meta:
            if meta.get("refused") and meta.get("site"):  # the site's FAB gate refused the whole run
                raise SiteError(site, f"site {meta['site']} {meta['error']}")
            raise SiteError(site, str(meta["error"]))
        return Reply(site=site, arrays=arrays, meta=meta, nbytes=nbytes)

    def _discover(self) -> dict[str, int]:
        """Wait for SuperNodes, ping each new one, map site name → node id."""
        expected = self._expected
        deadline = time.monotonic() + self._connect_timeout
        site_of: dict[int, str] = {}  # node id → site, for nodes that answered the ping
        silent: dict[int, str] = {}  # node id → why it gave no usable answer
        wait = 0.2
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
            wait = min(wait * 1.5, 1.0)

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
    raise SiteError(first, msg)
