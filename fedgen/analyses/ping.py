"""Liveness check: the site answers with its name and fedgen version."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

import fedgen
from fedgen.analyses import register
from fedgen.analyses.spec import Spec, arr


@register("ping", Spec(outputs={"one": arr("i8", 1)}, meta=frozenset({"site", "version"}), doc="liveness; no site data"))
def ping(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    return {"one": np.ones(1, dtype=np.int64)}, {"site": str(node_config.get("site", "?")), "version": fedgen.__version__}
