"""Differential-privacy mechanisms: secure randomness, discrete Gaussian, Gumbel top-k, calibration.

Everything here works on add/remove-one neighbours (one individual joins or leaves a site's data);
see ``fedgen.privacy.accounting`` for how releases are charged.

Randomness comes from a :class:`NoiseSource`. At a site it is always ``NoiseSource()``, which reads
the operating system's CSPRNG (``os.urandom``); a seeded source (numpy PCG64) is for tests only,
since PCG64's state can be recovered from its outputs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from scipy.special import log_ndtr

Shape = int | tuple[int, ...]

_TWO_POW_M53 = 2.0**-53
_MAX_SIGMA = 1e15  # keeps |noise| (at most ~50 σ in practice) far inside int64


def _shape(shape: Shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),)
    out = tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise ValueError(f"negative dimension in shape {shape!r}")
    return out


class NoiseSource:
    """Randomness for DP noise.

    Parameters
    ----------
    seed
        ``None`` (the only mode used at sites): every random bit is read from the operating
        system's CSPRNG via ``os.urandom``. An ``int`` gives a deterministic numpy PCG64 stream;
        it exists for tests only (PCG64 is not a cryptographic generator: its state can be
        recovered from its outputs, so seeded noise must never protect real data).

    Notes
    -----
    Both modes produce 64-bit words and share every transformation below, so a seeded source
    exercises exactly the code a site runs.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.seed = None if seed is None else int(seed)
        self._bitgen = None if seed is None else np.random.PCG64(int(seed))

    @property
    def secure(self) -> bool:
        """True when the bits come from the OS CSPRNG (no seed)."""
        return self._bitgen is None

    def __repr__(self) -> str:
        return "NoiseSource(os.urandom)" if self.secure else f"NoiseSource(seed={self.seed}, TESTS ONLY)"

    def words(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit words (uint64)."""
        n = int(n)
        if n < 0:
            raise ValueError("n must be >= 0")
        if n == 0:
            return np.zeros(0, dtype=np.uint64)
        if self._bitgen is None:
            return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).copy()
        return np.asarray(self._bitgen.random_raw(n), dtype=np.uint64)

    def bits(self, shape: Shape) -> np.ndarray:
        """Independent fair bits (int64 0/1) of the given shape."""
        shp = _shape(shape)
        n = math.prod(shp)
        # one word gives 64 bits
        w = self.words((n + 63) // 64)
        b = np.unpackbits(w.view(np.uint8))[:n]
        return b.astype(np.int64).reshape(shp)

    def uniform(self, shape: Shape) -> np.ndarray:
        """Uniform float64 in [0, 1) with 53 random bits each (multiples of 2^-53)."""
        shp = _shape(shape)
        w = self.words(math.prod(shp))
        return ((w >> np.uint64(11)).astype(np.float64) * _TWO_POW_M53).reshape(shp)

    def uniform_open(self, shape: Shape) -> np.ndarray:
        """Uniform float64 in (0, 1): the midpoints (k + 1/2)·2^-53, k uniform on 53 bits."""
        shp = _shape(shape)
        w = self.words(math.prod(shp))
        return (((w >> np.uint64(11)).astype(np.float64) + 0.5) * _TWO_POW_M53).reshape(shp)

    def integers(self, low: int, high: int, shape: Shape) -> np.ndarray:
        """Uniform int64 on [low, high), by rejection (no modulo bias)."""
        low, high = int(low), int(high)
        if high <= low:
            raise ValueError(f"empty range [{low}, {high})")
        span = high - low
        if low < -(2**63) or high > 2**63:
            raise ValueError("range does not fit in int64")
        shp = _shape(shape)
        n = math.prod(shp)
        out = np.empty(n, dtype=np.int64)
        if span == 1:
            out.fill(low)
            return out.reshape(shp)
        offset = np.uint64(low % 2**64)  # two's complement: uint64 arithmetic wraps to the int64 value
        if span == 2**64:
            out[:] = self.words(n).view(np.int64)
            return out.reshape(shp)
        limit = (2**64 // span) * span  # accept words < limit: each residue equally often
        exact = limit == 2**64  # span is a power of two
        filled = 0
        while filled < n:
            need = n - filled
            w = self.words(need if exact else need + need // 16 + 1)
            if not exact:
                w = w[w < np.uint64(limit)]
            w = w[:need]
            out[filled : filled + w.size] = ((w % np.uint64(span)) + offset).view(np.int64)
            filled += w.size
        return out.reshape(shp)

    def bernoulli(self, p: Any, shape: Shape | None = None) -> np.ndarray:
        """Bernoulli(p) booleans (``uniform < p``; p evaluated in float64, error <= 2^-53)."""
        p = np.asarray(p, dtype=np.float64)
        shp = p.shape if shape is None else _shape(shape)
        return self.uniform(shp) < p


# ---------------------------------------------------------------------------------------------
# Discrete Gaussian (Canonne, Kamath & Steinke 2020)
# ---------------------------------------------------------------------------------------------


def _geometric_exp_minus_one(n: int, source: NoiseSource) -> np.ndarray:
    """Number of successes of Bernoulli(e^-1) before the first failure, ``n`` times (vectorised)."""
    v = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    p = math.exp(-1.0)
    while active.size:
        ok = source.uniform(active.size) < p
        active = active[ok]
        v[active] += 1
    return v


def discrete_laplace(t: int, n: int, source: NoiseSource) -> np.ndarray:
    """``n`` draws of the discrete Laplace with pmf ∝ exp(-|x|/t), ``t`` a positive integer.

    CKS 2020 Algorithm 2: U uniform on {0..t-1} accepted with Bernoulli(exp(-U/t)); V = run of
    Bernoulli(e^-1) successes; magnitude U + tV; random sign, rejecting -0. Vectorised: whole
    batches are drawn and rejections are masked out.
    """
    t = int(t)
    if t < 1:
        raise ValueError("t must be a positive integer")
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        m = int(need * 1.7) + 16  # acceptance ≈ (1-e^-1)·(1 - 1/2·P[X=0]) ≥ 0.6
        u = source.integers(0, t, m)
        keep = source.uniform(m) < np.exp(-u / t)
        u = u[keep]
        v = _geometric_exp_minus_one(u.size, source)
        x = u + t * v
        neg = source.bits(u.size).astype(bool)
        keep = ~(neg & (x == 0))
        y = np.where(neg, -x, x)[keep][:need]
        out[filled : filled + y.size] = y
        filled += y.size
    return out


def discrete_gaussian(sigma: float, shape: Shape, source: NoiseSource) -> np.ndarray:
    """Draws from the discrete Gaussian N_Z(0, σ²): P[x] ∝ exp(-x²/(2σ²)) on the integers.

    Canonne, Kamath & Steinke 2020 (Algorithm 3): propose Y from the discrete Laplace with
    t = ⌊σ⌋ + 1 and accept with probability exp(-(|Y| - σ²/t)² / (2σ²)). Vectorised over batches
    of candidates with rejection by masks.

    Parameters
    ----------
    sigma
        Scale σ > 0 (finite, at most 1e15). On an integer query of L2 sensitivity Δ₂ the noise
        gives ρ = Δ₂²/(2σ²)-zCDP, as the continuous Gaussian does.
    shape
        Output shape.
    source
        Randomness; use ``NoiseSource()`` (OS CSPRNG) for real releases.

    Returns
    -------
    np.ndarray
        int64 array of the given shape.

    Notes
    -----
    The Bernoulli acceptance probabilities exp(·) are evaluated in float64 and compared with
    53-bit uniforms, so each Bernoulli trial is off by at most ~2^-53 and the output law is
    within a total-variation distance of about 1e-16 (a small multiple of 2^-53) of the exact
    discrete Gaussian per draw. The output set is exactly the integers, whatever the data, so
    Mironov's (2012) floating-point attack on real-valued noise does not apply. The run time
    depends on the noise drawn (rejection sampling), not on the data it is added to.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    if sigma > _MAX_SIGMA:
        raise ValueError(f"sigma={sigma!r} is larger than supported ({_MAX_SIGMA:g})")
    if not isinstance(source, NoiseSource):
        raise TypeError("source must be a NoiseSource")
    shp = _shape(shape)
    n = math.prod(shp)
    t = int(math.floor(sigma)) + 1
    s2 = sigma * sigma
    centre = s2 / t
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        m = int(need * 1.4) + 16  # the final rejection accepts ≳ 0.75 of proposals
        y = discrete_laplace(t, m, source)
        d = np.abs(y).astype(np.float64) - centre
        keep = source.uniform(m) < np.exp(-(d * d) / (2.0 * s2))
        y = y[keep][:need]
        out[filled : filled + y.size] = y
        filled += y.size
    return out.reshape(shp)


def discrete_gaussian_pmf(x: Any, sigma: float, *, support: int | None = None) -> np.ndarray:
    """Exact-in-float64 pmf of N_Z(0, σ²) at integers ``x`` (normalised over a wide support)."""
    sigma = float(sigma)
    if support is None:
        support = int(math.ceil(40 * sigma)) + 40
    k = np.arange(-support, support + 1, dtype=np.float64)
    z = np.exp(-(k * k) / (2 * sigma * sigma)).sum()
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-(x * x) / (2 * sigma * sigma)) / z


# ---------------------------------------------------------------------------------------------
# Gumbel noise and one-shot top-k (Durfee & Rogers 2019)
# ---------------------------------------------------------------------------------------------


def gumbel(scale: float, shape: Shape, source: NoiseSource) -> np.ndarray:
    """Gumbel(0, scale) draws by inverse CDF, -scale·log(-log U), U uniform on (0, 1)."""
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    u = source.uniform_open(shape)
    return -scale * np.log(-np.log(u))


def gumbel_top_k(
    scores: np.ndarray,
    k: int,
    *,
    epsilon_per_pick: float,
    sensitivity: float,
    source: NoiseSource,
    monotone: bool = False,
) -> np.ndarray:
    """Indices of ``k`` items picked by the exponential mechanism, in one shot.

    Adds Gumbel(b) noise to every score, b = 2Δ/ε₀ (Δ/ε₀ when ``monotone``, i.e. every score
    moves in the same direction between neighbours), and returns the indices of the k largest
    noisy scores, largest first. This has the law of k peeled exponential-mechanism draws with
    weights ∝ exp(ε₀·s/(2Δ)) (Durfee & Rogers 2019); each pick is ε₀-DP and ε₀-bounded-range,
    i.e. ε₀²/8-zCDP, so the release costs ``{"type": "zcdp", "rho": ε₀²/8, "count": k}``.

    Only the indices are released; the noisy scores are discarded. The Gumbel noise is computed
    in float64 from 53-bit uniforms, which perturbs the selection probabilities by a relative
    amount of order 1e-15 (no output-set leak as with real-valued releases).

    Parameters
    ----------
    scores
        1-D array of real scores. NaN is treated as -inf (never preferred over a finite score);
        +inf is rejected.
    k
        Number of picks, 0 <= k <= len(scores).
    epsilon_per_pick, sensitivity
        ε₀ > 0 of each pick and Δ > 0, the largest change of any one score between neighbours.
    source
        Randomness.
    monotone
        Scores are one-directional (halves the noise scale).

    Returns
    -------
    np.ndarray
        int64 indices, distinct, in decreasing order of noisy score. If k exceeds the number of
        finite scores, the remaining picks are a uniformly random order of the -inf/NaN ones.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError("scores must be a 1-D array")
    eps0 = float(epsilon_per_pick)
    delta = float(sensitivity)
    if not math.isfinite(eps0) or eps0 <= 0:
        raise ValueError(f"epsilon_per_pick must be positive and finite, got {epsilon_per_pick!r}")
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"sensitivity must be positive and finite, got {sensitivity!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError("k must be an int")
    k = int(k)
    if not 0 <= k <= s.size:
        raise ValueError(f"k={k} must be between 0 and the number of scores ({s.size})")
    if np.any(s == np.inf):
        raise ValueError("scores must not contain +inf")
    s = np.where(np.isnan(s), -np.inf, s)
    b = (delta if monotone else 2.0 * delta) / eps0
    noisy = s + gumbel(b, s.size, source)  # -inf stays -inf
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    finite = np.flatnonzero(np.isfinite(noisy))
    n_fin = finite.size
    if k <= n_fin:
        cand = finite
        vals = noisy[finite]
        if k < n_fin:
            part = np.argpartition(-vals, k - 1)[:k]
            cand, vals = cand[part], vals[part]
        order = np.argsort(-vals, kind="stable")
        return cand[order].astype(np.int64)
    top = finite[np.argsort(-noisy[finite], kind="stable")]
    rest = np.flatnonzero(~np.isfinite(noisy))
    keys = source.uniform(rest.size)
    rest = rest[np.argsort(keys, kind="stable")][: k - n_fin]
    return np.concatenate([top, rest]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def sigma_for_rho(l2_sensitivity: float, rho: float) -> float:
    """Gaussian (or discrete Gaussian) scale giving ρ-zCDP: σ = Δ₂/√(2ρ)."""
    l2 = float(l2_sensitivity)
    rho = float(rho)
    if not math.isfinite(l2) or l2 <= 0:
        raise ValueError(f"l2_sensitivity must be positive and finite, got {l2_sensitivity!r}")
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be positive and finite, got {rho!r}")
    return l2 / math.sqrt(2.0 * rho)


def _gaussian_log_delta(s: float, eps: float) -> float:
    """log δ(ε) of the Gaussian mechanism with σ/Δ = s (Balle & Wang 2018, Theorem 8)."""
    a = log_ndtr(1.0 / (2.0 * s) - eps * s)
    b = eps + log_ndtr(-1.0 / (2.0 * s) - eps * s)
    if b >= a:
        return -math.inf
    return float(a + math.log1p(-math.exp(b - a)))


def analytic_gaussian_sigma(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """Smallest σ for which the Gaussian mechanism is (ε, δ)-DP (Balle & Wang 2018).

    Solves Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ) = δ for σ by bisection (in log space) and
    returns the upper end of the final bracket, so the result always satisfies the constraint.
    At (ε, δ) = (1, 1e-6), σ/Δ = 4.2247.
    """
    eps = float(epsilon)
    dlt = float(delta)
    l2 = float(l2_sensitivity)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"epsilon must be positive and finite, got {epsilon!r}")
    if not 0 < dlt < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not math.isfinite(l2) or l2 <= 0:
        raise ValueError(f"l2_sensitivity must be positive and finite, got {l2_sensitivity!r}")
    target = math.log(dlt)
    hi = 1.0
    while _gaussian_log_delta(hi, eps) > target:
        hi *= 2.0
    lo = hi / 2.0
    while lo > 1e-12 and _gaussian_log_delta(lo, eps) <= target:
        hi, lo = lo, lo / 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _gaussian_log_delta(mid, eps) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-13 * hi:
            break
    return hi * l2


# ---------------------------------------------------------------------------------------------
# GWAS sensitivities
# ---------------------------------------------------------------------------------------------


def _uhler_allelic_safe(r: int, s: int) -> float:
    """2N²/(min(R,S)·(max(R,S)+1)), N = R+S; 0 when a group is empty (χ² is then 0)."""
    if r < 1 or s < 1:
        return 0.0
    n = r + s
    return 2.0 * n * n / (min(r, s) * (max(r, s) + 1))


def allelic_chi2_sensitivity(n_cases: int, n_controls: int) -> float:
    """Bound on the change of one variant's allelic χ² when one individual is added or removed.

    The allelic test is Pearson's χ² (1 df, no continuity correction) on the 2×2 table of
    case/control × alt/ref allele counts, with χ² = 0 when a margin of the table is zero.
    The bound is Uhler/Yu's "safe" replace-one value f(R, S) = 2N²/(min(R,S)(max(R,S)+1)),
    N = R+S, maximised over the margins of the data set and its add/remove neighbours:
    max f over (R,S), (R±1,S), (R,S±1) (groups of size 0 skipped: χ² is 0 there). A brute
    force over every data set with 1 <= R, S <= 80 and every add/remove neighbour confirms it
    (largest change/bound 0.988; f(R,S) alone is attained at R=1); the tests repeat this for
    R, S <= 12. It is not a proof for larger R, S.

    Parameters
    ----------
    n_cases, n_controls
        R and S: the numbers of cases and of controls *with a called genotype* at the variant
        (the allele-table margins are 2R and 2S; an individual with a missing call adds nothing
        and changes nothing). Individuals' genotypes are 0/1/2.

    Notes
    -----
    The bound depends on R and S. Under add/remove neighbours R and S are themselves private,
    so noise calibrated to the data's own (R, S) is only DP if those margins are public (or a
    public value is used in their place); the caller must decide which margins it treats as public.
    """
    for name, v in (("n_cases", n_cases), ("n_controls", n_controls)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    r, s = int(n_cases), int(n_controls)
    return max(_uhler_allelic_safe(r + dr, s + ds) for dr, ds in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)))


def allelic_chi2(case_alt: Any, case_alleles: Any, control_alt: Any, control_alleles: Any) -> np.ndarray:
    """Pearson χ² (no continuity correction) of 2×2 allele tables; 0 when a margin is zero."""
    a = np.asarray(case_alt, dtype=np.float64)
    r2 = np.asarray(case_alleles, dtype=np.float64)
    b = np.asarray(control_alt, dtype=np.float64)
    s2 = np.asarray(control_alleles, dtype=np.float64)
    n = r2 + s2
    c1 = a + b
    c2 = n - c1
    den = r2 * s2 * c1 * c2
    num = n * (a * (s2 - b) - b * (r2 - a)) ** 2
    pos = den > 0
    return np.where(pos, num / np.where(pos, den, 1.0), 0.0)
