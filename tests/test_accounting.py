"""Privacy events and their RDP composition (dp_accounting, add/remove-one)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedgen.privacy.accounting import (
    RDP_ORDERS,
    compose_epsilon,
    event_rho,
    gaussian_event,
    gumbel_event,
    rho_for_epsilon,
    spend_summary,
    to_dp_event,
    validate_event,
    zcdp_event,
)

DELTA = 1e-6
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _direct(events: list[tuple[str, float, int]], delta: float, orders: list[float] | None = None) -> float:
    """ε from driving dp_accounting's RdpAccountant by hand, one explicit event per release."""
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS) if orders is None else orders, neighboring_relation=ADD_REMOVE)
    for kind, param, count in events:
        ev = dp_accounting.GaussianDpEvent(noise_multiplier=param) if kind == "g" else dp_accounting.ZCDpEvent(rho=param)
        for _ in range(count):
            acc.compose(ev)
    return acc.get_epsilon(delta)


def test_ten_gaussian_releases_known_value() -> None:
    ev = {"type": "gaussian", "sigma": 5.0, "l2": 1.0, "count": 10}
    assert compose_epsilon([ev], DELTA) == pytest.approx(3.1311, abs=1e-3)
    # same noise multiplier, other scale
    assert compose_epsilon([{"type": "gaussian", "sigma": 30.0, "l2": 6.0, "count": 10}], DELTA) == pytest.approx(
        compose_epsilon([ev], DELTA), rel=1e-12
    )
    # the RDP of the Gaussian is α/(2z²): 10 releases at z=5 are exactly ρ = 0.2 zCDP
    assert compose_epsilon([{"type": "zcdp", "rho": 0.2, "count": 1}], DELTA) == pytest.approx(
        compose_epsilon([ev], DELTA), rel=1e-9
    )


def test_mixed_events_match_rdp_accountant_driven_directly() -> None:
    events = [
        gaussian_event(4.53, 1.0, 3),
        gumbel_event(0.1, 10),
        gaussian_event(120.0, 2 * math.sqrt(10)),
        zcdp_event(0.003, 2),
    ]
    spec = [("g", 4.53, 3), ("z", 0.1**2 / 8, 10), ("g", 120.0 / (2 * math.sqrt(10)), 1), ("z", 0.003, 2)]
    got = compose_epsilon(events, DELTA)
    assert got == pytest.approx(_direct(spec, DELTA), rel=1e-10)
    # the dense grid is never looser than dp_accounting's default orders
    default_orders = list(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    assert got <= _direct(spec, DELTA, orders=default_orders) + 1e-12
    for delta in (1e-5, 1e-9):
        assert compose_epsilon(events, delta) == pytest.approx(_direct(spec, delta), rel=1e-10)


def test_to_dp_event_uses_explicit_copies() -> None:
    one = to_dp_event({"type": "gaussian", "sigma": 2.0, "l2": 1.0})
    assert one == dp_accounting.GaussianDpEvent(noise_multiplier=2.0)
    many = to_dp_event({"type": "zcdp", "rho": 0.01, "count": 4})
    assert isinstance(many, dp_accounting.ComposedDpEvent)
    assert many.events == [dp_accounting.ZCDpEvent(rho=0.01)] * 4
    # composing the event tree in an accountant gives compose_epsilon's value
    events = [gaussian_event(3.0, 1.0, 5), zcdp_event(0.02, 3)]
    acc = rdp.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=ADD_REMOVE)
    acc.compose(dp_accounting.ComposedDpEvent([to_dp_event(e) for e in events]))
    assert acc.get_epsilon(DELTA) == pytest.approx(compose_epsilon(events, DELTA), rel=1e-10)


@pytest.mark.parametrize("event", [gaussian_event(3.0, 1.5), zcdp_event(0.013)])
def test_count_equals_separate_events(event: dict) -> None:
    n = 7
    together = compose_epsilon([{**event, "count": n}], DELTA)
    separate = compose_epsilon([dict(event) for _ in range(n)], DELTA)
    assert together == pytest.approx(separate, rel=1e-12)
    assert together > compose_epsilon([event], DELTA) * 2
    assert event_rho({**event, "count": n}) == pytest.approx(n * event_rho(event))


def test_zcdp_conversion_against_hand_formula() -> None:
    """ε(ρ, δ) = min_α [αρ + (ln(1/δ) + (α−1) ln(1−1/α) − ln α)/(α−1)] (the RDP-to-(ε, δ) conversion of Canonne, Kamath & Steinke 2020, as in dp-accounting)."""
    alphas = np.linspace(1.02, 600, 2_000_000)
    for rho in (0.0244, 0.2, 3.0):
        tail = (np.log(1 / DELTA) + (alphas - 1) * np.log1p(-1 / alphas) - np.log(alphas)) / (alphas - 1)
        hand = float(np.min(alphas * rho + tail))
        got = compose_epsilon([{"type": "zcdp", "rho": rho}], DELTA)
        assert got >= hand - 1e-9  # a finite grid can only be looser
        assert got == pytest.approx(hand, rel=2e-4)
    assert compose_epsilon([{"type": "zcdp", "rho": 0.0244}], DELTA) == pytest.approx(1.0, abs=2e-3)


def test_rho_for_epsilon_round_trip() -> None:
    for eps, delta in [(1.0, 1e-6), (0.3, 1e-5), (8.0, 1e-9)]:
        rho = rho_for_epsilon(eps, delta)
        assert compose_epsilon([{"type": "zcdp", "rho": rho, "count": 1}], delta) <= eps
        assert compose_epsilon([{"type": "zcdp", "rho": rho * (1 + 1e-8)}], delta) > eps
    assert rho_for_epsilon(1.0, 1e-6) == pytest.approx(0.0244, abs=2e-4)
    # splitting: two halves of ρ compose back to the whole ε
    rho = rho_for_epsilon(1.0, 1e-6)
    assert compose_epsilon([zcdp_event(rho / 2), gaussian_event(1.0, math.sqrt(rho))], 1e-6) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError):
        rho_for_epsilon(0.0, 1e-6)
    with pytest.raises(ValueError):
        rho_for_epsilon(1.0, 0.0)


def test_event_rho_values() -> None:
    assert event_rho({"type": "gaussian", "sigma": 10.0, "l2": 2.0, "count": 3}) == pytest.approx(3 * 4 / 200)
    assert event_rho(gumbel_event(0.05, 10)) == pytest.approx(10 * 0.05**2 / 8)
    assert event_rho({"type": "zcdp", "rho": 0.0}) == 0.0


def test_empty_and_summary() -> None:
    assert compose_epsilon([], DELTA) == 0.0
    s = spend_summary([gaussian_event(5.0, 1.0, 10), gumbel_event(0.1, 10)], DELTA)
    assert s["delta"] == DELTA and s["events"] == 2
    assert s["rho"] == pytest.approx(0.2 + 10 * 0.01 / 8)
    assert s["epsilon"] == pytest.approx(compose_epsilon([gaussian_event(5.0, 1.0, 10), gumbel_event(0.1, 10)], DELTA))
    assert spend_summary([], DELTA) == {"epsilon": 0.0, "delta": DELTA, "rho": 0.0, "events": 0}


def test_validate_event_normalises() -> None:
    v = validate_event({"type": "gaussian", "sigma": 3, "l2": 2, "label": "top-10 counts"})
    assert v == {"type": "gaussian", "sigma": 3.0, "l2": 2.0, "count": 1, "label": "top-10 counts"}
    assert isinstance(v["sigma"], float)
    assert validate_event({"type": "zcdp", "rho": 0.1, "count": 3.0})["count"] == 3
    src = {"type": "zcdp", "rho": 0.1}
    validate_event(src)
    assert src == {"type": "zcdp", "rho": 0.1}  # a copy


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {},
        {"type": "laplace", "b": 1.0},
        {"type": "gaussian", "sigma": 1.0},
        {"type": "gaussian", "sigma": 0.0, "l2": 1.0},
        {"type": "gaussian", "sigma": -1.0, "l2": 1.0},
        {"type": "gaussian", "sigma": float("nan"), "l2": 1.0},
        {"type": "gaussian", "sigma": 1.0, "l2": float("inf")},
        {"type": "gaussian", "sigma": "1", "l2": 1.0},
        {"type": "zcdp", "rho": -0.1},
        {"type": "zcdp", "rho": True},
        {"type": "zcdp", "rho": 0.1, "count": 0},
        {"type": "zcdp", "rho": 0.1, "count": 2.5},
        {"type": "zcdp", "rho": 0.1, "count": True},
        {"type": "zcdp", "rho": 0.1, "count": 10**7},
        {"type": "zcdp", "rho": 0.1, "extra": object()},
    ],
)
def test_validate_event_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        validate_event(bad)  # type: ignore[arg-type]
    if isinstance(bad, dict) and bad:
        with pytest.raises(ValueError):
            compose_epsilon([bad], DELTA)


def test_compose_rejects_bad_delta() -> None:
    for d in (0.0, 1.0, -1e-6):
        with pytest.raises(ValueError):
            compose_epsilon([zcdp_event(0.1)], d)
