"""fedgen's privacy core: DP mechanisms, RDP accounting and the per-site privacy ledger.

- :mod:`fedgen.privacy.mechanisms`: :class:`NoiseSource` (OS CSPRNG), the discrete Gaussian,
  Gumbel top-k selection, Gaussian calibration and GWAS sensitivities;
- :mod:`fedgen.privacy.accounting`: privacy events (JSON dicts) and their composition;
- :mod:`fedgen.privacy.ledger`: the SQLite ledger that refuses releases over a site's budget;
- :mod:`fedgen.privacy.cli`: ``fedgen ledger``.

The names below are imported lazily (``dp_accounting`` takes about a second to import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compose_epsilon": "accounting",
    "event_rho": "accounting",
    "gaussian_event": "accounting",
    "gumbel_event": "accounting",
    "rho_for_epsilon": "accounting",
    "spend_summary": "accounting",
    "to_dp_event": "accounting",
    "validate_event": "accounting",
    "zcdp_event": "accounting",
    "LEDGER_FILE": "ledger",
    "BudgetExceeded": "ledger",
    "Ledger": "ledger",
    "Reservation": "ledger",
    "NoiseSource": "mechanisms",
    "allelic_chi2": "mechanisms",
    "allelic_chi2_sensitivity": "mechanisms",
    "analytic_gaussian_sigma": "mechanisms",
    "discrete_gaussian": "mechanisms",
    "gumbel": "mechanisms",
    "gumbel_top_k": "mechanisms",
    "sigma_for_rho": "mechanisms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
