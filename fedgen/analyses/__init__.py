"""Registry of federated analyses: the only code a site executes for a request."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from fedgen.errors import FedgenError

Partial = Callable[[Mapping[str, Any], dict[str, Any], dict[str, np.ndarray]], tuple[dict[str, np.ndarray], dict[str, Any]]]

REGISTRY: dict[str, Partial] = {}


def register(name: str) -> Callable[[Partial], Partial]:
    """Register a site-side partial under ``name``."""

    def deco(fn: Partial) -> Partial:
        REGISTRY[name] = fn
        return fn

    return deco


def execute(
    node_config: Mapping[str, Any],
    analysis: str,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run one registered analysis step at a site.

    ``node_config`` is the site's own configuration (site name, vcf, samples,
    state_dir); the request cannot change it. Returns named arrays (sums over
    the site's samples, no samples axis) and JSON-able metadata.
    Raises :class:`FedgenError` with a user-facing message on refusal or bad input.
    """
    _load_builtin()
    fn = REGISTRY.get(analysis)
    if fn is None:
        raise FedgenError(f"unknown analysis {analysis!r}: this site runs only {sorted(REGISTRY)}")
    return fn(node_config, params, arrays)


def _load_builtin() -> None:
    from fedgen.analyses import assoc, pca, ping, qc  # noqa: F401
