"""Hardy–Weinberg exact test and ``--hardy`` heterozygosity columns, bit-for-bit as PLINK 2.

The exact test repeats PLINK 2's ``HweP`` (plink-ng v2.00a3.5, ``2.0/include/plink2_stats.cc``)
operation for operation: probabilities of neighbouring het counts come from the ratio
recurrence, scaled so that the observed count has probability (1 - 2^-44)·2^-83; walks stop
when an added term no longer changes the tail sum.  Every variant runs that state machine,
vectorised across variants (all variants take one step per numpy operation; finished ones
are dropped), so the returned doubles equal PLINK's and print identically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["hwe_exact_p", "hwe_het_observed", "hwe_het_expected"]

_SMALL_EPS = 2.0**-44  # kSmallEpsilon
_BIAS = 2.0**-83  # kExactTestBias
_T0 = (1 - _SMALL_EPS) * _BIAS  # scaled probability of the observed het count
_TIE_LO = (1 - 2 * _SMALL_EPS) * _BIAS
_HALF_T0 = (1 - _SMALL_EPS) * _BIAS * 0.5
_DBL_MAX = float(np.finfo(np.float64).max)
_DBL_MIN = float(np.finfo(np.float64).tiny)  # smallest normal double


def _step(h: np.ndarray, r: np.ndarray, c: np.ndarray, lp: np.ndarray, down: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Move the het count by 2 and update its scaled probability ``lp`` exactly as PLINK."""
    if down:
        # het_probs[h - 2] = het_probs[h] * h (h - 1) / (4 (r + 1) (c + 1))
        r = r + 1
        c = c + 1
        lp = lp * ((h * (h - 1)) / (4 * r * c))
        return h - 2, r, c, lp
    # het_probs[h + 2] = het_probs[h] * 4 r c / ((h + 2) (h + 1))
    h = h + 2
    lp = lp * ((4 * r * c) / (h * (h - 1)))
    return h, r - 1, c - 1, lp


def _movable(h: np.ndarray, r: np.ndarray, down: bool) -> np.ndarray:
    return h > 1.5 if down else r > 0.5


# The walks below advance all variants in lockstep.  A variant that finishes has its result
# recorded and is then ignored (its arrays keep being stepped, harmlessly); the arrays are
# compacted once fewer than half are still live, so the long walks of a few extreme variants
# cost little while the common short ones need no per-step bookkeeping.

def _center_walk(h: np.ndarray, r: np.ndarray, c: np.ndarray, down: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                            np.ndarray]:
    """Walk from the observed het count towards the mode, summing ``centerp``.

    Stops at the first count less likely than the observed one (status 1; ``lp`` is that
    count's probability), when ``centerp`` overflows (status 2, P = 0) or at the end of the
    support (status 0).  Returns final h, r, c, lp, centerp, status.
    """
    n = h.size
    fh, fr, fc = h.copy(), r.copy(), c.copy()
    flp, fcen = np.full(n, _T0), np.zeros(n)
    fstatus = np.zeros(n, dtype=np.int8)
    idx = np.arange(n)
    lp, cen = np.full(n, _T0), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    n_alive = n

    def record(sel: np.ndarray, status: Any) -> int:
        j = idx[sel]
        fh[j], fr[j], fc[j], flp[j], fcen[j] = h[sel], r[sel], c[sel], lp[sel], cen[sel]
        fstatus[j] = status if np.isscalar(status) else status[sel]
        alive[sel] = False
        return int(j.size)

    while n_alive:
        stuck = alive & ~_movable(h, r, down)
        if stuck.any():
            n_alive -= record(stuck, 0)
            if not n_alive:
                break
        h, r, c, lp = _step(h, r, c, lp, down)
        below = lp < _BIAS
        cen = np.where(below, cen, cen + lp)
        fin = alive & (below | (cen > _DBL_MAX))
        if fin.any():
            n_alive -= record(fin, np.where(below, 1, 2))
        if 2 * n_alive < idx.size:
            h, r, c, lp, cen, idx = h[alive], r[alive], c[alive], lp[alive], cen[alive], idx[alive]
            alive = np.ones(idx.size, dtype=bool)
    return fh, fr, fc, flp, fcen, fstatus


def _tail_walk(h: np.ndarray, r: np.ndarray, c: np.ndarray, lp: np.ndarray, tailp: np.ndarray,
               down: bool) -> np.ndarray:
    """Add successive probabilities to ``tailp`` until one no longer changes it."""
    ftail = tailp.copy()
    idx = np.arange(h.size)
    alive = np.ones(h.size, dtype=bool)
    n_alive = h.size

    def record(sel: np.ndarray) -> int:
        j = idx[sel]
        ftail[j] = tailp[sel]
        alive[sel] = False
        return int(j.size)

    while n_alive:
        stuck = alive & ~_movable(h, r, down)
        if stuck.any():
            n_alive -= record(stuck)
            if not n_alive:
                break
        h, r, c, lp = _step(h, r, c, lp, down)
        new = tailp + lp
        fin = alive & (new <= tailp)
        tailp = new
        if fin.any():
            n_alive -= record(fin)
        if 2 * n_alive < idx.size:
            h, r, c, lp = h[alive], r[alive], c[alive], lp[alive]
            tailp, idx = tailp[alive], idx[alive]
            alive = np.ones(idx.size, dtype=bool)
    return ftail


def _hwe_branch(het: np.ndarray, homr: np.ndarray, homc: np.ndarray, *, upper: bool,
                midp: bool) -> np.ndarray:
    """HweP for variants whose observed het count is above (``upper``) or at/below the mode."""
    n = het.size
    h = het.astype(np.float64)
    r = homr.astype(np.float64)
    c = homc.astype(np.float64)
    # "tail 2" walks from the observed count through the mode and beyond; "tail 1" walks away
    down2 = upper
    h2, r2, c2, lp2, centerp, status = _center_walk(h, r, c, down2)
    entered = status == 1
    tie = 1 + (entered & (lp2 > _TIE_LO))
    tailp = np.where(entered, _T0 + lp2, _T0)
    out = np.empty(n)
    zero = status == 2
    out[zero] = 0.0
    one = ~zero & (centerp == 0) if not midp else np.zeros(n, dtype=bool)
    out[one] = 1.0
    live = ~zero & ~one
    cont = live & entered  # elsewhere tail 2 already hit the end of the support
    if cont.any():
        tailp[cont] = _tail_walk(h2[cont], r2[cont], c2[cont], lp2[cont], tailp[cont], down2)
    if live.any():
        tailp[live] = _tail_walk(h[live], r[live], c[live], np.full(int(live.sum()), _T0),
                                 tailp[live], not down2)
        tp, cp = tailp[live], centerp[live]
        if midp:
            out[live] = (tp - _HALF_T0 * tie[live]) / (tp + cp)
        else:
            out[live] = tp / (tp + cp)
    return out


def hwe_exact_p(het: Any, hom1: Any, hom2: Any, *, midp: bool = False) -> np.ndarray:
    """Two-sided Hardy–Weinberg exact test P value per variant, exactly as PLINK 2 ``--hardy``.

    Parameters
    ----------
    het, hom1, hom2 : array_like of int
        Counts of heterozygous, homozygous-A1 and homozygous-A2 genotypes (missing calls
        excluded), same shape.  The test is symmetric in ``hom1`` and ``hom2``.
    midp : bool, default False
        Mid-p variant (Graffelman & Moreno 2013): subtract half the probability mass of the
        het counts tied with the observed one (the observed one included).

    Returns
    -------
    p : ndarray of float64, same shape as ``het``
        Sum of the conditional probabilities (given the allele counts) of all het counts at
        most as likely as the observed one; het counts whose probability is within relative
        2^-44 of the observed one count as ties and are included.  Monomorphic variants and
        N = 0 give 1 (0.5 with ``midp``).  P values below the smallest normal double
        (2.2e-308) are 0, as in PLINK, which flushes subnormal results to zero.

    Notes
    -----
    Cost per variant is the number of het counts between the observed one and the point
    where tail terms fall below double precision: O(sqrt(N)) near equilibrium, O(N) for the
    rare variants far out of equilibrium.

    References
    ----------
    Wigginton JE, Cutler DJ, Abecasis GR (2005). A note on exact tests of Hardy-Weinberg
    equilibrium. Am J Hum Genet 76:887–893.
    Graffelman J, Moreno V (2013). The mid p-value in exact tests for Hardy-Weinberg
    equilibrium. Stat Appl Genet Mol Biol 12(4):433–448.
    Chang CC et al. PLINK 2, ``HweP`` in ``2.0/include/plink2_stats.cc`` (v2.00a3.5).
    """
    het_a = np.asarray(het, dtype=np.int64)
    h1 = np.asarray(hom1, dtype=np.int64)
    h2 = np.asarray(hom2, dtype=np.int64)
    if not (het_a.shape == h1.shape == h2.shape):
        raise ValueError("het, hom1 and hom2 must have the same shape")
    if np.any(het_a < 0) or np.any(h1 < 0) or np.any(h2 < 0):
        raise ValueError("genotype counts must be non-negative")
    shape = het_a.shape
    het_a, h1, h2 = het_a.reshape(-1), h1.reshape(-1), h2.reshape(-1)
    homc = np.maximum(h1, h2)
    homr = np.minimum(h1, h2)
    rare = 2 * homr + het_a
    geno2 = 2 * (het_a + homc + homr)
    out = np.full(het_a.size, 0.5 if midp else 1.0)
    upper = het_a * geno2 > rare * (geno2 - rare)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for is_upper, sel in ((True, upper), (False, ~upper & (geno2 > 0))):
            if sel.any():
                out[sel] = _hwe_branch(het_a[sel], homr[sel], homc[sel], upper=is_upper,
                                       midp=midp)
    # PLINK 2 runs with the x86 flush-to-zero flag set (_MM_SET_FLUSH_ZERO_MODE in main()),
    # so a P value that would be subnormal is 0.
    out[out < _DBL_MIN] = 0.0
    return out.reshape(shape)


def hwe_het_observed(het: Any, hom1: Any, hom2: Any) -> np.ndarray:
    """Observed heterozygote frequency, ``.hardy`` column O(HET_A1), computed as PLINK 2 does.

    Returns
    -------
    o : ndarray of float64, same shape as ``het``
        ``het * (1/N)`` with N = het + hom1 + hom2 (a reciprocal product, as PLINK; this
        can differ from ``het / N`` in the last bit).  NaN when N = 0.
    """
    het_a = np.asarray(het, dtype=np.int64)
    n = het_a + np.asarray(hom1, dtype=np.int64) + np.asarray(hom2, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = 1.0 / n.astype(np.float64)
        return het_a.astype(np.float64) * recip


def hwe_het_expected(het: Any, hom1: Any, hom2: Any) -> np.ndarray:
    """Expected heterozygote frequency, ``.hardy`` column E(HET_A1), computed as PLINK 2 does.

    Returns
    -------
    e : ndarray of float64, same shape as ``het``
        f·(1 − f/2) with f = (2·hom1 + het)·(1/N), i.e. 2pq.  Exactly 0 when hom1 = N
        (PLINK prints ``0`` there, including N = 0).
    """
    het_a = np.asarray(het, dtype=np.int64)
    h1 = np.asarray(hom1, dtype=np.int64)
    n = het_a + h1 + np.asarray(hom2, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recip = 1.0 / n.astype(np.float64)
        f = (h1 * 2 + het_a).astype(np.float64) * recip
        e = f * (1.0 - f * 0.5)
    return np.where(h1 == n, 0.0, e)
