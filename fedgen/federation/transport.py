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


class InProcessTransport:
    """Runs each site's handler in this process. Same site code path as Flower; for tests."""

    def __init__(self, node_configs: Mapping[str, Mapping[str, Any]]) -> None:
        self._configs = {k: dict(v) for k, v in node_configs.items()}

    def sites(self) -> list[str]:
        return list(self._configs)

    def query(self, request: Request) -> dict[str, Reply]:
        from fedgen.analyses import execute
        from fedgen.errors import FedgenError, SiteError

        replies: dict[str, Reply] = {}
        for site, cfg in self._configs.items():
            try:
                arrays, meta = execute(
                    cfg, request.analysis, request.params, request.arrays_for(site),
                    context={"run_id": "inprocess", "study_id": request.study_id},
                )
            except FedgenError as exc:
                raise SiteError(site, str(exc)) from None
            nbytes = sum(int(a.nbytes) for a in arrays.values())
            replies[site] = Reply(site=site, arrays=arrays, meta=meta, nbytes=nbytes)
        return replies

    def query_many(self, requests: list[Request]) -> list[dict[str, Reply]]:
        return [self.query(r) for r in requests]
