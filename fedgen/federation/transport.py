"""How the aggregator talks to sites: one request out, one reply per site back.

The study runner only sees :class:`Transport`; Flower (``flower.py``) and the
in-process transport used by fast tests implement it. Both run the same site
code path, :func:`fedgen.analyses.execute`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np


@dataclass
class Reply:
    """One site's answer to a request: named arrays (sums, never per-sample) and metadata."""

    site: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class Request:
    """A request for one analysis step.

    ``params`` is JSON-serialisable; ``arrays`` holds per-variant inputs (index
    lists, flip flags, bases). ``per_site_arrays`` overrides/extends ``arrays``
    for one site (e.g. its own variant indices).
    """

    analysis: str
    params: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    per_site_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    study_id: str = ""

    def arrays_for(self, site: str) -> dict[str, np.ndarray]:
        out = dict(self.arrays)
        out.update(self.per_site_arrays.get(site, {}))
        return out


class Transport(Protocol):
    """Sends a request to every site and returns their replies, keyed by site name."""

    def sites(self) -> list[str]: ...

    def query(self, request: Request) -> dict[str, Reply]: ...

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        """Independent requests in one round (each site answers each through its own pipeline pass)."""
        ...

    def train(self, request: Request) -> dict[str, Reply]:
        """A model update (``dp_model_update``/``model_update``): a Flower ``train`` message to every
        site (:mod:`fedgen.federation.train`), answered through the same site pipeline."""
        ...


class InProcessTransport:
    """Runs each site's handler in this process. Same site code path as Flower; for tests."""

    def __init__(self, node_configs: Mapping[str, Mapping[str, Any]]) -> None:
        self._configs = {k: dict(v) for k, v in node_configs.items()}

    def sites(self) -> list[str]:
        return list(self._configs)

    def drop_site(self, site: str) -> None:
        """Stop asking ``site`` (it dropped out; see ``federation.min_sites``)."""
        self._configs.pop(site, None)

    def query(self, request: Request) -> dict[str, Reply]:
        return self._ask(request, {})

    def train(self, request: Request) -> dict[str, Reply]:
        """A model update, as the site sees a Flower ``train`` message (same pipeline)."""
        return self._ask(request, {"message_type": "train"})

    def _ask(self, request: Request, extra: dict[str, Any]) -> dict[str, Reply]:
        from fedgen.analyses import execute
        from fedgen.errors import FedgenError, SiteError

        replies: dict[str, Reply] = {}
        for site, cfg in self._configs.items():
            try:
                arrays, meta = execute(
                    cfg, request.analysis, request.params, request.arrays_for(site),
                    context={"run_id": "inprocess", "study_id": request.study_id, **extra},
                )
            except FedgenError as exc:
                raise SiteError(site, str(exc)) from None
            nbytes = sum(int(a.nbytes) for a in arrays.values())
            replies[site] = Reply(site=site, arrays=arrays, meta=meta, nbytes=nbytes)
        return replies

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        return [self.query(r) for r in requests]


def _canonical_json(obj: Any) -> bytes:
    import json

    from fedgen.fileio import json_default as default

    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default, allow_nan=True).encode()


def _update_framed(h: Any, data: bytes | memoryview) -> None:
    """One length-prefixed field: no two different field sequences hash the same bytes."""
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _update_arrays(h: Any, arrays: Mapping[str, np.ndarray]) -> None:
    _update_framed(h, str(len(arrays)).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        if a.dtype.hasobject:
            raise ValueError(f"array {name!r}: object arrays have no canonical encoding")
        _update_framed(h, _canonical_json([name, a.dtype.str, list(a.shape)]))
        _update_framed(h, memoryview(a).cast("B") if a.size else b"")


def request_digest(analysis: str, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], study_id: str,
                   *, extra: Any = None) -> str:
    """SHA-256 (hex) of a request's canonical encoding: analysis, params (sorted-key JSON), every
    array (name, dtype, shape, raw bytes), study id and ``extra``, each field length-prefixed.

    Two requests share a digest only if they ask the same question of the same study (or if
    SHA-256 collides). Used by the aggregator's journal and by a site's replay of DP releases."""
    import hashlib

    h = hashlib.sha256(b"fedgen-request-v1")
    _update_framed(h, str(analysis).encode())
    _update_framed(h, _canonical_json(dict(params)))
    _update_arrays(h, arrays)
    _update_framed(h, str(study_id).encode())
    _update_framed(h, _canonical_json(extra))
    return h.hexdigest()


def batch_digest(requests: list[Request], *, single: bool, train: bool = False) -> str:
    """SHA-256 (hex) of one message round as the aggregator sends it (every request, with its
    per-site arrays; ``single``: sent with :meth:`Transport.query` rather than ``query_many``;
    ``train``: one request sent with :meth:`Transport.train`)."""
    import hashlib

    h = hashlib.sha256(b"fedgen-round-v1")
    _update_framed(h, (b"query" if single else f"query_many:{len(requests)}".encode()) if not train else b"train")
    for r in requests:
        per_site = {s: request_digest("", {}, a, "") for s, a in sorted(r.per_site_arrays.items())}
        _update_framed(h, request_digest(r.analysis, r.params, r.arrays, r.study_id, extra=per_site).encode())
    return h.hexdigest()
