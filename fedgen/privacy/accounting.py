"""Privacy accounting: RDP composition of fedgen's privacy events with Google's ``dp_accounting``.

Neighbouring data sets differ by adding or removing one individual (``ADD_OR_REMOVE_ONE``).
A privacy event is a JSON-able dict, stored as-is in the site ledger and the run manifest:

``{"type": "gaussian", "sigma": σ, "l2": Δ₂, "count": n}``
    n releases of (discrete) Gaussian noise with scale σ on a query of L2 sensitivity Δ₂.
    The discrete Gaussian has the zCDP/RDP of the continuous one (Canonne, Kamath & Steinke
    2020), so this maps to ``GaussianDpEvent(noise_multiplier=σ/Δ₂)``.
``{"type": "zcdp", "rho": ρ, "count": n}``
    n ρ-zCDP mechanisms, e.g. an exponential-mechanism / Gumbel pick with ε₀ has ρ = ε₀²/8
    (bounded range); maps to ``ZCDpEvent(rho)``.

``{"type": "dpsgd", "sample_rate": q, "noise_multiplier": z, "count": steps}``
    ``steps`` DP-SGD steps (Opacus): Poisson sampling with rate q, per-sample gradients clipped
    to C and Gaussian noise of standard deviation z·C on their sum; maps to
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.

Other keys (e.g. ``"label"``) are kept as they are and ignored by the accounting.
"""

from __future__ import annotations

import json
import math
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import rdp

NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
MAX_COUNT = 10**6

#: RDP orders: steps of 0.01 on (1, 2), then geometric (ratio ≈ 1.014) from 2 to 512, plus
#: dp_accounting's default orders (so the bound is never looser than the library default).
RDP_ORDERS: tuple[float, ...] = tuple(
    sorted(
        set(np.round(np.arange(1.01, 2.0, 0.01), 2).tolist())
        | set(np.geomspace(2.0, 512.0, 401).tolist())
        | {float(a) for a in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS}
    )
)

_REQUIRED = {"gaussian": ("sigma", "l2"), "zcdp": ("rho",), "dpsgd": ("sample_rate", "noise_multiplier")}


def _positive(e: dict[str, Any], key: str, *, allow_zero: bool = False) -> float:
    v = e.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"privacy event {e!r}: {key!r} must be a number")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"privacy event {e!r}: {key!r} must be {'>= 0' if allow_zero else '> 0'} and finite")
    return v


def validate_event(e: dict[str, Any]) -> dict[str, Any]:
    """A normalised copy of a privacy event (floats, int count, default count 1).

    Raises
    ------
    ValueError
        Unknown type, missing or non-positive parameters, a count that is not an integer in
        [1, 10^6], or keys that are not JSON-serialisable.
    """
    if not isinstance(e, dict):
        raise ValueError(f"privacy event must be a dict, got {type(e).__name__}")
    kind = e.get("type")
    if kind not in _REQUIRED:
        raise ValueError(f"privacy event {e!r}: unknown type {kind!r} (expected one of {sorted(_REQUIRED)})")
    out: dict[str, Any] = dict(e)
    out["type"] = kind
    if kind == "gaussian":
        out["sigma"] = _positive(e, "sigma")
        out["l2"] = _positive(e, "l2")
    elif kind == "dpsgd":
        out["sample_rate"] = _positive(e, "sample_rate")
        if out["sample_rate"] > 1:
            raise ValueError(f"privacy event {e!r}: sample_rate must be in (0, 1]")
        out["noise_multiplier"] = _positive(e, "noise_multiplier")
    else:
        out["rho"] = _positive(e, "rho", allow_zero=True)
    count = e.get("count", 1)
    if isinstance(count, bool):
        raise ValueError(f"privacy event {e!r}: count must be an integer")
    if isinstance(count, (float, np.floating)) and float(count).is_integer():
        count = int(count)
    if not isinstance(count, (int, np.integer)) or not 1 <= int(count) <= MAX_COUNT:
        raise ValueError(f"privacy event {e!r}: count must be an integer in [1, {MAX_COUNT}]")
    out["count"] = int(count)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"privacy event {e!r} is not JSON-serialisable: {exc}") from None
    return out


def gaussian_event(sigma: float, l2: float, count: int = 1, **extra: Any) -> dict[str, Any]:
    """``{"type": "gaussian", ...}`` for ``count`` (discrete) Gaussian releases."""
    return validate_event({"type": "gaussian", "sigma": sigma, "l2": l2, "count": count, **extra})


def zcdp_event(rho: float, count: int = 1, **extra: Any) -> dict[str, Any]:
    """``{"type": "zcdp", ...}`` for ``count`` ρ-zCDP mechanisms."""
    return validate_event({"type": "zcdp", "rho": rho, "count": count, **extra})


def gumbel_event(epsilon_per_pick: float, k: int, **extra: Any) -> dict[str, Any]:
    """The event of ``k`` exponential-mechanism / Gumbel picks with ε₀ each: ρ = ε₀²/8 per pick."""
    eps0 = float(epsilon_per_pick)
    if not math.isfinite(eps0) or eps0 <= 0:
        raise ValueError(f"epsilon_per_pick must be positive and finite, got {epsilon_per_pick!r}")
    return zcdp_event(eps0 * eps0 / 8.0, k, **extra)


def event_rho(e: dict[str, Any]) -> float:
    """zCDP ρ of the whole event (count included)."""
    v = validate_event(e)
    if v["type"] == "gaussian":
        return v["count"] * v["l2"] ** 2 / (2.0 * v["sigma"] ** 2)
    if v["type"] == "dpsgd":  # an upper bound: the same steps without subsampling
        return v["count"] / (2.0 * v["noise_multiplier"] ** 2)
    return v["count"] * v["rho"]


def _single_dp_event(v: dict[str, Any]) -> dp_accounting.DpEvent:
    if v["type"] == "gaussian":
        return dp_accounting.GaussianDpEvent(noise_multiplier=v["sigma"] / v["l2"])
    if v["type"] == "dpsgd":
        return dp_accounting.PoissonSampledDpEvent(v["sample_rate"], dp_accounting.GaussianDpEvent(v["noise_multiplier"]))
    return dp_accounting.ZCDpEvent(rho=v["rho"])


def to_dp_event(e: dict[str, Any]) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event: the single event, or a ``ComposedDpEvent`` of ``count`` copies.

    Explicit copies rather than ``SelfComposedDpEvent``: some accountants ignore the count of
    self-composed events of some types (tests/test_accounting.py checks the totals).
    """
    v = validate_event(e)
    one = _single_dp_event(v)
    if v["count"] == 1:
        return one
    return dp_accounting.ComposedDpEvent([one] * v["count"])


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0 < d < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


#: dp_accounting's default orders only: a subset of :data:`RDP_ORDERS`, so the ε it gives is never
#: below the full grid's (a search may use it to find a parameter quickly, then refine on the
#: full grid; the sampled Gaussian's fractional orders are slow to evaluate at large sampling rates)
COARSE_RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


def new_accountant(orders: tuple[float, ...] = RDP_ORDERS) -> rdp.RdpAccountant:
    """A fresh RDP accountant (add/remove-one, :data:`RDP_ORDERS` unless ``orders`` is given)."""
    return rdp.RdpAccountant(orders=list(orders), neighboring_relation=NEIGHBORING_RELATION)


def compose_epsilon(events: list[dict[str, Any]], delta: float, *, orders: tuple[float, ...] = RDP_ORDERS) -> float:
    """ε at ``delta`` of all ``events`` composed (RDP accountant, add/remove-one); 0.0 if empty.

    ``orders``: the RDP orders (default :data:`RDP_ORDERS`; what every ledger charges with)."""
    d = _check_delta(delta)
    events = [validate_event(e) for e in events]
    if not events:
        return 0.0
    # Identical events are grouped and composed with the accountant's own ``count`` argument
    # (multiplies the RDP curve; the tests check it equals explicit copies for both event types),
    # so a ledger of many releases or a large count stays fast.
    counts: dict[dp_accounting.DpEvent, int] = {}
    for e in events:
        one = _single_dp_event(e)
        counts[one] = counts.get(one, 0) + e["count"]
    acc = new_accountant(orders)
    for one, n in counts.items():
        acc.compose(one, n)
    return float(acc.get_epsilon(d))


def rho_for_epsilon(epsilon: float, delta: float) -> float:
    """Largest ρ with ``compose_epsilon([zcdp ρ], delta) <= epsilon`` (bisection, rel. tol 1e-9).

    This is how a study splits an (ε, δ) budget into zCDP shares: ρ adds over mechanisms.
    """
    eps = float(epsilon)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    d = _check_delta(delta)

    def f(rho: float) -> float:
        return compose_epsilon([{"type": "zcdp", "rho": rho, "count": 1}], d)

    lo, hi = 0.0, max(eps * eps / 8.0, 1e-12)
    while f(hi) <= eps:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            raise ValueError(f"no finite rho reaches epsilon={eps} at delta={d}")
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if f(mid) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


def spend_summary(events: list[dict[str, Any]], delta: float) -> dict[str, Any]:
    """``{"epsilon", "delta", "rho", "events"}`` of ``events`` composed (``rho`` = total zCDP ρ)."""
    d = _check_delta(delta)
    events = [validate_event(e) for e in events]
    return {
        "epsilon": compose_epsilon(events, d),
        "delta": d,
        "rho": float(sum(event_rho(e) for e in events)),
        "events": len(events),
    }
