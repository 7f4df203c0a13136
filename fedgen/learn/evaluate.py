"""Evaluation of a federated risk model without pooling: held-out splits, histograms, sums.

Each site holds out a deterministic share of its people (:func:`holdout_mask`): person i is
held out for study s when HMAC-SHA256(key = s, message = i's sample ID), read as a number in
[0, 1), is below the fraction. The split is the same in every round of a study (training never
sees the held-out people) and differs between studies; the site computes it, the aggregator
only sends the fraction.

Binary trait: each site bins its held-out people's linear predictors (the logit of the predicted
probability) into ``n`` equal bins on [lo, hi] (values outside fall into the end bins), one
histogram per class. The aggregator sums them over sites and computes the Mann-Whitney AUC
with the pairs that share a bin counted one half (:func:`histogram_auc`). Against the exact AUC
of the pooled held-out people, the only error is the order *within* a bin, so

    |AUC_hist − AUC_exact| ≤ ½ Σ_b h1[b] h0[b] / (n1 n0)        (the tie bound)

which :func:`histogram_auc` returns beside the AUC (with noisy DP histograms the bound is itself
computed from the noisy counts, clipped at 0).

Quantitative trait: Σ(y − ŷ)², Σ(y − c), Σ(y − c)², n over the held-out people (c a centre the
aggregator declares); the pooled R² = 1 − Σ(y − ŷ)² / (Σ(y − c)² − (Σ(y − c))²/n) is exact.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Iterable

import numpy as np

MIN_HOLDOUT, MAX_HOLDOUT = 0.01, 0.9
MAX_BINS = 1000
#: quantisation of the real-valued R² sums before the discrete Gaussian (units per sensitivity)
R2_QUANTA = 1024


def holdout_mask(sample_ids: Iterable[str], study_id: str, fraction: float) -> np.ndarray:
    """True for the people held out for evaluation in study ``study_id`` (keyed hash of the sample ID)."""
    ids = [str(i) for i in sample_ids]
    f = float(fraction)
    if f <= 0:
        return np.zeros(len(ids), dtype=bool)
    key = str(study_id).encode()
    out = []
    for sid in ids:
        d = hmac.new(key, sid.encode(), hashlib.sha256).digest()
        out.append(int.from_bytes(d[:8], "big") / 2.0**64 < f)
    return np.asarray(out, dtype=bool)


def bin_index(logit: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """Bin of each value: n equal bins on [lo, hi]; values outside go to the end bins."""
    x = (np.asarray(logit, dtype=np.float64) - lo) / (hi - lo) * n
    return np.clip(np.floor(x), 0, n - 1).astype(np.int64)


def histogram_auc(h0: np.ndarray, h1: np.ndarray) -> tuple[float, float]:
    """(AUC, tie bound) from per-class histograms over the same ordered bins (controls h0, cases h1).

    Counts below 0 (DP noise) are taken as 0, which keeps the AUC in [0, 1] but, where noise
    dominates (many near-empty cells), adds mass to empty bins and pulls the AUC towards ½. AUC = Σ_b h1[b] (Σ_{b'<b} h0[b'] + ½ h0[b]) / (n1 n0).
    """
    h0 = np.clip(np.asarray(h0, dtype=np.float64), 0, None)
    h1 = np.clip(np.asarray(h1, dtype=np.float64), 0, None)
    n0, n1 = h0.sum(), h1.sum()
    if n0 <= 0 or n1 <= 0:
        return math.nan, math.nan
    below = np.cumsum(h0) - h0
    auc = float((h1 * (below + 0.5 * h0)).sum() / (n1 * n0))
    return auc, float(0.5 * (h1 * h0).sum() / (n1 * n0))


def histogram_auc_se(h0: np.ndarray, h1: np.ndarray, cell_var: float) -> float:
    """SE of :func:`histogram_auc` from independent noise of variance ``cell_var`` in every cell (delta method)."""
    if cell_var <= 0:
        return 0.0
    h0 = np.clip(np.asarray(h0, dtype=np.float64), 0, None)
    h1 = np.clip(np.asarray(h1, dtype=np.float64), 0, None)
    n0, n1 = h0.sum(), h1.sum()
    if n0 <= 0 or n1 <= 0:
        return math.nan
    auc, _ = histogram_auc(h0, h1)
    below0 = np.cumsum(h0) - h0
    above1 = h1.sum() - np.cumsum(h1)
    g1 = (below0 + 0.5 * h0) / (n1 * n0) - auc / n1
    g0 = (above1 + 0.5 * h1) / (n1 * n0) - auc / n0
    return float(math.sqrt(cell_var * ((g1 ** 2).sum() + (g0 ** 2).sum())))


def pooled_r2(srr: float, sy: float, syy: float, n: float) -> float:
    """R² of held-out predictions from summed Σ(y−ŷ)², Σ(y−c), Σ(y−c)², n."""
    if n <= 1:
        return math.nan
    sst = syy - sy * sy / n
    return float(1.0 - srr / sst) if sst > 0 else math.nan


def pooled_r2_se(srr: float, sy: float, syy: float, n: float, var: tuple[float, float, float, float]) -> float:
    """SE of :func:`pooled_r2` from independent noise of the given variances on (srr, sy, syy, n) (delta method)."""
    if n <= 1 or not any(var):
        return 0.0
    sst = syy - sy * sy / n
    if sst <= 0:
        return math.nan
    g_rr = -1.0 / sst
    dr_dsst = srr / sst ** 2
    g_y = dr_dsst * (-2.0 * sy / n)
    g_yy = dr_dsst
    g_n = dr_dsst * (sy * sy / n ** 2)
    return float(math.sqrt(g_rr ** 2 * var[0] + g_y ** 2 * var[1] + g_yy ** 2 * var[2] + g_n ** 2 * var[3]))


def r2_sensitivities(lo: float, hi: float) -> tuple[float, float, float, float]:
    """Per-person bounds of (|y−ŷ|², |y−c|, (y−c)², 1) when y and ŷ are clipped to [lo, hi], c = (lo+hi)/2."""
    w = float(hi) - float(lo)
    h = w / 2.0
    return (w * w, h, h * h, 1.0)


def window(weights: np.ndarray, kind: str, n_features: int, *, width: float = 4.0) -> tuple[float, float]:
    """A logit window for the histograms from the (public) weights alone: for the logistic model the
    intercept ± ``width`` × the norm of the feature weights (the SD of the linear predictor when the
    standardised features are uncorrelated); [-8, 8] for the MLP."""
    w = np.asarray(weights, dtype=np.float64)
    if kind != "logistic":
        return -8.0, 8.0
    centre = float(w[-1])
    spread = max(float(np.linalg.norm(w[:n_features])), 0.25)
    return centre - width * spread, centre + width * spread

