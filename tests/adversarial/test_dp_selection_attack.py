"""A curious aggregator against the DP top-k selection's per-variant weights.

``dp_topk_select`` takes a weight per requested variant from the aggregator (the study sends
weights computed from released frequencies). The score's sensitivity bound 1/min(R, S) holds
only for weights in [0, 1]: a weight of 10⁶ would make the Gumbel noise negligible and turn the
release into an exact comparison oracle. The attack asks for membership of one person: it
finds two variants whose exact scores change order when that person leaves the site, then asks
the site to pick one of the two.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hostile import HostileAggregator, Refusal, Site

from fedgen.analyses.dp import selection_scores, selection_sensitivity
from fedgen.privacy.mechanisms import NoiseSource, gumbel_top_k

POLICY = {"epsilon_budget": 1e6}
PARAMS = {"phenotype": "D", "kind": "binary", "covariates": [], "k": 1, "epsilon_per_pick": 1.0}


def _scores(site: Site, drop: int | None) -> tuple[np.ndarray, int, int]:
    """The site's unweighted selection scores over every variant, with person ``drop`` left out."""
    keep = np.ones(len(site.members), bool)
    if drop is not None:
        keep[drop] = False
    g = np.where(site.data.dosage[:, site.members] < 0, 0, site.data.dosage[:, site.members])[:, keep]
    case = site.d[keep] == 1
    R, S = int(case.sum()), int((~case).sum())
    counts = np.stack([g[:, case].sum(1), 0 * g[:, 0], g[:, ~case].sum(1), 0 * g[:, 0]], axis=1)
    return selection_scores(counts, R, S), R, S


def _pair(site: Site, target: int) -> tuple[int, int]:
    """Variants j, r with s_j > s_r with the target in the site and s_j < s_r without them."""
    s_in, _, _ = _scores(site, None)
    s_out, _, _ = _scores(site, target)
    d_in = s_in[:, None] - s_in[None, :]
    d_out = s_out[:, None] - s_out[None, :]
    margin = np.where((d_in > 0) & (d_out < 0), np.minimum(d_in, -d_out), -np.inf)
    j, r = np.unravel_index(int(np.argmax(margin)), margin.shape)
    assert np.isfinite(margin[j, r]), "no variant pair changes order with the target"
    return int(j), int(r)


def _ask(agg: HostileAggregator, pair: tuple[int, int], weight: np.ndarray, study: str) -> int:
    arrays = {"idx": np.asarray(pair, np.int64), "flip": np.zeros(2, np.uint8), "weight": weight}
    out, meta = agg.ask("dp_topk_select", PARAMS, arrays, study_id=study)
    assert meta["sensitivity"] == pytest.approx(1.0 / min(meta["n_cases"], meta["n_controls"]))
    return int(pair[int(out["selected"][0])])


@pytest.fixture()
def sites(tmp_path: Path) -> tuple[Site, Site, int]:
    """The same hospital with (D) and without (E) the target, a case."""
    with_t = Site(tmp_path / "with", n=160, v=60, policy=POLICY)
    target = int(np.flatnonzero(with_t.d == 1)[0])
    without = Site(tmp_path / "without", n=160, v=60, policy=POLICY)
    without.write_samples(drop=target)
    return with_t, without, target


def test_amplifying_weights_are_refused_and_would_have_told_membership(sites):
    with_t, without, target = sites
    j, r = _pair(with_t, target)
    # what an amplified score would release: the exact order of s_j and s_r, i.e. whether the target is in
    src = NoiseSource(5)
    for site, drop, expect in ((with_t, None, j), (without, target, r)):
        s, R, S = _scores(site, drop)
        picks = {int((j, r)[gumbel_top_k(1e6 * s[[j, r]], 1, epsilon_per_pick=1.0,
                                         sensitivity=selection_sensitivity(R, S), source=src)[0]])
                 for _ in range(40)}
        assert picks == {expect}
    # the site refuses every weight outside [0, 1] (or malformed), charges nothing and logs the refusal
    for site in (with_t, without):
        agg = HostileAggregator(site.node_config)
        for bad in ([1e6, 1e6], [1.0, 1.0000001], [-1.0, 1.0], [np.nan, 1.0], [np.inf, 0.5], [1.0]):
            with pytest.raises(Refusal, match="weight"):
                _ask(agg, (j, r), np.asarray(bad, np.float64), f"amplify-{bad}")
        from fedgen.privacy.ledger import LEDGER_FILE, Ledger
        from fedgen.site import audit

        led = Ledger(Path(site.node_config["state_dir"]) / LEDGER_FILE, epsilon_budget=1e6, delta=1e-6)
        assert led.spent()["epsilon"] == 0.0
        entries = [e for e in audit.read(Path(site.node_config["state_dir"])) if e.get("analysis") == "dp_topk_select"]
        assert len(entries) == 6 and all(e["decision"] == "refused" and e["bytes"] == 0 for e in entries)


def test_with_weights_in_range_one_pick_tells_membership_no_better_than_its_epsilon(sites):
    """The same question with weights of 1: each pick is ε₀-DP, so the attacker's best guess from one
    pick is right with probability at most e^ε₀ / (1 + e^ε₀) (0.73 at ε₀ = 1); measured over 120 picks
    each from the site with and without the target."""
    with_t, without, target = sites
    j, r = _pair(with_t, target)
    reps = 120
    hits = {}
    for name, site in (("with", with_t), ("without", without)):
        agg = HostileAggregator(site.node_config)
        hits[name] = sum(_ask(agg, (j, r), np.ones(2), f"pick-{name}-{i}") == j for i in range(reps)) / reps
    accuracy = (hits["with"] + 1.0 - hits["without"]) / 2.0  # guess "in" when j is picked
    bound = math.exp(1.0) / (1.0 + math.exp(1.0))
    assert accuracy <= bound + 3.0 * math.sqrt(0.25 / (2 * reps))
    # the picks are random at all: neither site answers j (or r) every time
    assert 0.1 < hits["with"] < 0.9 and 0.1 < hits["without"] < 0.9
