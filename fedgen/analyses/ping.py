"""Liveness check: the site answers with its name and fedgen version.

An optional ``pad`` byte array (at most 16 MB) is accepted and ignored, so that round-latency
benchmarks (``scripts/bench_rounds.py``) can time a round that carries a payload.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fedgen
from fedgen.analyses import register
from fedgen.analyses.spec import AnalysisRequest, Spec, arr


#: largest ``pad`` a ping accepts (bytes): round-latency benchmarks carry up to this much to a site
MAX_PAD = 16_000_000


@register("ping", Spec(outputs={"one": arr("i8", 1)}, inputs={"pad": arr("u1", "b", optional=True)},
                       limits={"b": MAX_PAD}, meta=frozenset({"site", "version"}), needs_cohort=False,
                       doc="liveness; no site data"))
def ping(cohort: Any, req: AnalysisRequest):
    return {"one": np.ones(1, dtype=np.int64)}, {"site": req.rules.site or "?", "version": fedgen.__version__}
