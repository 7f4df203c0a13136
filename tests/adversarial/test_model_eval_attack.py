"""A curious aggregator uses the risk-model evaluation to read one held-out person's phenotype.

The evaluation scores a site's held-out people at weights the aggregator chooses. A logistic
"model" with all its weight on age (logit = 100 × (age − the target's age)) puts the target alone in the middle bin of a three-bin histogram (everyone else is ≥ 10 logits away):
the case/control counts of that bin are the target's phenotype. Even where small cells are
merged, moving the target from one side of a threshold to the other between two requests
(differencing) gives it away. Routes closed: exact evaluation is not in the default policy
(``model_eval_exact`` is opt-in); the default evaluation is differentially private
(``dp_model_eval``), charged to the site's ledger, and its noise at a study's σ leaves the
attack at chance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hostile import HostileAggregator, Refusal, Site, idx

from fedgen.learn import evaluate

STUDY = "attack"
HOLDOUT = 0.9  # the aggregator picks the fraction: as many people held out as the site allows


def _targets(site: Site, k: int) -> list[int]:
    ids = [site.data.samples[c] for c in site.members.tolist()]
    held = evaluate.holdout_mask(ids, STUDY, HOLDOUT)
    ages, counts = np.unique(site.age, return_counts=True)
    unique = set(ages[counts == 1].tolist())
    return [j for j in range(len(site.members)) if held[j] and site.age[j] in unique][:k]


def _ask(agg: HostileAggregator, analysis: str, centre: float, **extra):
    # a plausible standardisation (the site checks it); the weights do the isolating:
    # logit = 100 (age − centre), so ages 0.1 apart are 10 logits apart
    mean, sd = 50.0, 17.0
    params = {"phenotype": "D", "kind": "binary", "missing": "impute", "holdout": HOLDOUT,
              "covariates": [{"name": "age", "kind": "numeric", "mean": mean, "sd": sd}],
              "model": {"kind": "logistic", "hidden": 4}, "bins": {"lo": -1.5, "hi": 1.5, "n": 3}, **extra}
    w_age = sd / 0.01
    arrays = {**idx(1), "freq": np.array([0.3]), "weights": np.array([0.0, w_age, -w_age * (float(centre) - mean) / sd])}
    return agg.ask(analysis, params, arrays, study_id=STUDY)


def _differencing_guess(agg: HostileAggregator, age: float, analysis: str, **extra) -> int:
    """Target just above the threshold, then just below it: the lowest bin gains the target (case or control)."""
    above, _ = _ask(agg, analysis, age - 0.05, **extra)  # target at +5: in the upper bin
    below, _ = _ask(agg, analysis, age + 0.05, **extra)  # target at -5: in the lower bin
    gain = below["hist"][:, 0].astype(float) - above["hist"][:, 0].astype(float)
    return int(gain[1] > gain[0])


def test_default_policy_refuses_exact_evaluation_and_dp_noise_hides_the_target(tmp_path, monkeypatch):
    import fedgen.analyses.learn as L
    from fedgen.privacy.mechanisms import NoiseSource

    site = Site(tmp_path / "hk", policy=None)  # the default policy
    agg = HostileAggregator(site.node_config)
    targets = _targets(site, 30)
    assert len(targets) == 30
    # 1. exact evaluation: refused before anything is computed
    with pytest.raises(Refusal, match="model_eval_exact.*not allowed by the site's policy.*opt-in"):
        _ask(agg, "model_eval_exact", site.age[targets[0]])
    # 2. the DP evaluation at the σ a study gets (ε = 3 per site, 10% to evaluation, 10 rounds)
    from fedgen.privacy.accounting import rho_for_epsilon

    sigma = 1.0 / math.sqrt(2.0 * rho_for_epsilon(0.3, 1e-6) / 10)
    monkeypatch.setattr(L, "_noise_source", lambda src=NoiseSource(7): src)  # seeded for a reproducible test
    right_isolated = right_diff = 0
    for j in targets:
        out, meta = _ask(agg, "dp_model_eval", site.age[j], sigma=sigma)
        h = out["hist"]
        right_isolated += int(int(h[1, 1] > h[0, 1]) == site.d[j])  # the middle bin: the target alone
        assert meta["privacy"]["events"][0]["sigma"] == sigma and "n_eval" not in meta
    for j in targets[:10]:
        right_diff += int(_differencing_guess(agg, site.age[j], "dp_model_eval", sigma=sigma) == site.d[j])
    print(f"DP evaluation, σ = {sigma:.1f}: isolated-bin guess right for {right_isolated}/30, differencing {right_diff}/10")
    # chance is 15 of 30 (5 of 10); at this σ one release moves the odds by Φ(1/(2√2 σ)) − ½ ≈ 0.002
    assert right_isolated <= 21 and right_diff <= 8, (right_isolated, right_diff)
    # 3. the aggregator cannot buy a noise-free read: a σ whose ε exceeds the site's budget is refused
    with pytest.raises(Refusal, match="privacy budget exhausted"):
        _ask(agg, "dp_model_eval", site.age[targets[0]], sigma=0.05)


def test_exact_evaluation_where_a_site_opts_in_is_a_phenotype_oracle(tmp_path):
    """Why model_eval_exact is opt-in: merging small cells stops the one-person bin, not differencing."""
    site = Site(tmp_path / "hk", policy={"extra_analyses": ["model_eval_exact"]})
    agg = HostileAggregator(site.node_config)
    targets = _targets(site, 10)
    isolated, _ = _ask(agg, "model_eval_exact", site.age[targets[0]])
    assert isolated["hist"][:, 1].sum() != 1  # the target's own bin never leaves as a bin of one
    right = sum(int(_differencing_guess(agg, site.age[j], "model_eval_exact") == site.d[j]) for j in targets)
    print(f"exact evaluation (opted in): differencing right for {right}/{len(targets)}")
    assert right == len(targets)  # every target's phenotype, exactly: the documented risk of opting in
