"""Registry of federated analyses: the only code a site executes for a request."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from fedgen.analyses.spec import Spec
from fedgen.errors import FedgenError

#: an analysis: (the site's cohort, or None for analyses that need none; the typed request)
#: -> (named arrays, sums over the site's samples with no samples axis; JSON-able metadata)
Partial = Callable[[Any, Any], tuple[dict[str, np.ndarray], dict[str, Any]]]

REGISTRY: dict[str, Partial] = {}
SPECS: dict[str, Spec] = {}


def register(name: str, spec: Spec) -> Callable[[Partial], Partial]:
    """Register a site-side partial under ``name`` with its declaration (see :mod:`.spec`)."""

    def deco(fn: Partial) -> Partial:
        REGISTRY[name] = fn
        SPECS[name] = spec
        return fn

    return deco


def execute(
    node_config: Mapping[str, Any],
    analysis: str,
    params: dict[str, Any],
    arrays: dict[str, np.ndarray],
    *,
    context: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run one request at a site through the site pipeline (:mod:`fedgen.site.pipeline`).

    ``node_config`` is the site's own configuration (site name, vcf, samples, state_dir,
    policy); the request cannot change it. ``context`` carries run/study ids and the message
    type for the audit log. Returns named arrays (sums over the site's samples, no samples
    axis) and JSON-able metadata. Raises :class:`fedgen.site.pipeline.Refused` (a
    :class:`FedgenError`) with a reason that carries no counts on any refusal or failure.
    """
    from fedgen.site.pipeline import handle

    return handle(node_config, analysis, params, arrays, context=context)


def _load_builtin() -> None:
    from fedgen.analyses import assoc, dp, pca, ping, qc  # noqa: F401

    try:  # training needs torch and opacus (a site without them answers everything else)
        from fedgen.analyses import learn  # noqa: F401
    except ImportError:
        pass
