"""chrX Hardy–Weinberg exact test with males (Graffelman & Weir 2016), as PLINK 2 ``--hardy``.

PLINK 2 (v2.00a3.5) writes chrX variants to ``.hardy.x``: female genotype counts, male allele
counts, and a P value from the exact test that conditions on the total allele counts of both
sexes. The evaluation below walks the same tables in the same order with the same scaled
probabilities and stopping rules as PLINK's ``HweXchrP``, so the doubles agree; with no male
calls it is the autosomal test (:func:`fedgen.stats.hwe.hwe_exact_p`).

The walk is sequential per variant (each row of tables starts where the previous one stopped),
so it runs one variant at a time in Python, at the aggregator: about 7 ms per variant with
5,000 women and 5,000 men (2,000 variants in 14 s), growing with the number of male allele
splits walked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedgen.stats.hwe import hwe_exact_p

_BIAS = 2.0**-83
_EPS2 = 2.0**-40
_SMALL_EPS = 2.0**-44
_DBL_MAX = float(np.finfo(np.float64).max)


def _tailsum(high: bool, base: float, hets: float, hom1: float, hom2: float, ties: int
             ) -> tuple[int, float, float, float, float, int, float]:
    """One row's tail beyond the centre, on the low-het (``high`` False) or high-het side.

    Returns (stop, base, hets, hom1, hom2, ties, total); stop = 1 when every table of this row
    and the later rows is less probable than the observed one."""
    total = 0.0
    cur = base
    th, t1, t2 = hets, hom1, hom2
    if high:
        if cur > _BIAS:
            prev = t1 * t2
            while prev > 0.5:
                th += 2
                cur *= (4 * prev) / (th * (th - 1))
                t1 -= 1
                t2 -= 1
                if cur <= _BIAS:
                    break
                prev = t1 * t2
            base = cur
            sh, s1, s2 = th, t1, t2
        else:
            sh, s1, s2 = th, t1, t2
            while True:
                prev = cur
                t1 += 1
                t2 += 1
                cur *= (th * (th - 1)) / (4 * t1 * t2)
                if cur < prev:
                    return 1, base, th, t1, t2, ties, 0.0
                th -= 2
                if cur > (1 - 2 * _EPS2) * _BIAS:
                    if cur > (1 - _SMALL_EPS) * _BIAS:
                        break
                    ties += 1
                total += cur
            prev = cur
            cur = base
            base = prev
    else:
        if cur > _BIAS:
            while th > 1.5:
                t1 += 1
                t2 += 1
                cur *= (th * (th - 1)) / (4 * t1 * t2)
                th -= 2
                if cur <= _BIAS:
                    break
            base = cur
            sh, s1, s2 = th, t1, t2
        else:
            sh, s1, s2 = th, t1, t2
            while True:
                prev = cur
                th += 2
                cur *= (4 * t1 * t2) / (th * (th - 1))
                if cur < prev:
                    return 1, base, th, t1, t2, ties, 0.0
                t1 -= 1
                t2 -= 1
                if cur > (1 - 2 * _EPS2) * _BIAS:
                    if cur > _BIAS:
                        break
                    ties += 1
                total += cur
            prev = cur
            cur = base
            base = prev
    hets, hom1, hom2 = th, t1, t2
    if cur > (1 - 2 * _EPS2) * _BIAS:
        if cur > _BIAS:  # even the row's most extreme table is too probable
            return 0, base, hets, hom1, hom2, ties, 0.0
        ties += 1
    if high:
        while True:
            prev_tot = total
            total += cur
            if total <= prev_tot:
                break
            sh += 2
            cur *= (4 * s1 * s2) / (sh * (sh - 1))
            s1 -= 1
            s2 -= 1
    else:
        while True:
            prev_tot = total
            total += cur
            if total <= prev_tot:
                break
            s1 += 1
            s2 += 1
            cur *= (sh * (sh - 1)) / (4 * s1 * s2)
            sh -= 2
    return 0, base, hets, hom1, hom2, ties, total


def _first_row(hetab: float, homa: float, homb: float):
    """Tail and centre mass of the observed male split's row (the autosomal walk), and where
    the centre region ends on each side. None when the centre overflows (P = 0)."""
    cur = (1 - _EPS2) * _BIAS
    tailp = cur
    centerp = 0.0
    ties = 1
    th = hetab
    if hetab * hetab > 4 * homa * homb:  # more hets lowers the probability from here: scan left first
        base_r, r_state = cur, (hetab, homa, homb)
        ta, tb = homa, homb
        while th > 1.5:
            ta += 1
            tb += 1
            cur *= (th * (th - 1)) / (4 * ta * tb)
            th -= 2
            if cur < _BIAS:
                ties += cur > (1 - 2 * _EPS2) * _BIAS
                tailp += cur
                break
            centerp += cur
            if centerp > _DBL_MAX:
                return None
        l_state, base_l = (th, ta, tb), cur
        while th > 1.5:
            ta += 1
            tb += 1
            cur *= (th * (th - 1)) / (4 * ta * tb)
            th -= 2
            pre = tailp
            tailp += cur
            if tailp <= pre:
                break
        th, ta, tb = hetab, homa, homb
        cur = base_r
        while True:
            th += 2
            cur *= (4 * ta * tb) / (th * (th - 1))
            pre = tailp
            tailp += cur
            if tailp <= pre:
                break
            ta -= 1
            tb -= 1
    else:  # fewer hets lowers the probability: scan right first
        base_l, l_state = cur, (hetab, homa, homb)
        ta, tb = homa, homb
        while True:
            q = ta * tb
            if q <= 0.5:
                break
            th += 2
            cur *= (4 * q) / (th * (th - 1))
            ta -= 1
            tb -= 1
            if cur < _BIAS:
                # PLINK's tie test on this side reads (1 - (2 eps) * bias): kept as written
                ties += cur > (1 - (2 * _EPS2) * _BIAS)
                tailp += cur
                q = ta * tb
                break
            centerp += cur
            if centerp > _DBL_MAX:
                return None
        r_state, base_r = (th, ta, tb), cur
        while q > 0.5:
            th += 2
            cur *= (4 * q) / (th * (th - 1))
            ta -= 1
            tb -= 1
            pre = tailp
            tailp += cur
            if tailp <= pre:
                break
            q = ta * tb
        th, ta, tb = hetab, homa, homb
        cur = base_l
        while th > 1.5:
            ta += 1
            tb += 1
            cur *= (th * (th - 1)) / (4 * ta * tb)
            pre = tailp
            tailp += cur
            if tailp <= pre:
                break
            th -= 2
    return tailp, centerp, ties, base_l, base_r, l_state, r_state


def hwe_xchr_p_one(fhet: int, fhom1: int, fhom2: int, male1: int, male2: int, *, midp: bool = False) -> float:
    """P value of one chrX variant: female het/hom1/hom2 counts and male allele-1/allele-2 counts."""
    if male1 == 0 and male2 == 0:
        return float(hwe_exact_p(np.array([fhet]), np.array([fhom1]), np.array([fhom2]), midp=midp)[0])
    n1 = float(fhet + 2 * fhom1)
    n2 = float(fhet + 2 * fhom2)
    first = _first_row(float(fhet), float(fhom1), float(fhom2))
    if first is None:
        return 0.0
    tailp, centerp, ties, obase_l, obase_r, ol, orr = first
    row0 = tailp + centerp
    n1 += male1
    n2 += male2
    for m1_down in (False, True):
        m1, m2 = float(male1), float(male2)
        row = row0
        lh, l1, l2 = ol
        rh, r1, r2 = orr
        base_l, base_r = obase_l, obase_r
        if m1_down:
            iters = min(2 * fhom2 + fhet, male1)
        else:
            iters = min(2 * fhom1 + fhet, male2)
        for _ in range(iters):
            if m1_down:
                old_m1 = m1
                old_f2 = n2 - m2
                m2 += 1
                m1 -= 1
                row *= (old_m1 * old_f2) / (m2 * (n1 - m1))
                if lh != 0.0:  # never step right of the mode here
                    l1 += 1
                    base_l *= (old_m1 * lh) / (2 * m2 * l1)
                    lh -= 1
                else:
                    lh += 1
                    base_l *= (2 * old_m1 * l2) / (m2 * lh)
                    l2 -= 1
            else:
                old_m2 = m2
                old_f1 = n1 - m1
                m1 += 1
                m2 -= 1
                row *= (old_m2 * old_f1) / (m1 * (n2 - m2))
                if lh != 0.0:
                    l2 += 1
                    base_l *= (old_m2 * lh) / (2 * m1 * l2)
                    lh -= 1
                else:
                    lh += 1
                    base_l *= (2 * old_m2 * l1) / (m1 * lh)
                    l1 -= 1
            stop, base_l, lh, l1, l2, ties, incr1 = _tailsum(False, base_l, lh, l1, l2, ties)
            if stop:  # this row and every later one is less probable than the observed table
                f1, f2 = n1 - m1, n2 - m2
                while True:
                    pre = tailp
                    tailp += row
                    if tailp == pre:
                        break
                    if m1_down:
                        m2 += 1
                        f1 += 1
                        row *= (m1 * f2) / (m2 * f1)
                        m1 -= 1
                        f2 -= 1
                    else:
                        m1 += 1
                        f2 += 1
                        row *= (m2 * f1) / (m1 * f2)
                        m2 -= 1
                        f1 -= 1
                break
            tailp += incr1
            if m1_down:
                old_m1 = m1 + 1
                if r2 != 0.0:
                    rh += 1
                    base_r *= (2 * old_m1 * r2) / (m2 * rh)
                    r2 -= 1
                else:
                    r1 += 1
                    base_r *= (old_m1 * rh) / (2 * m2 * r1)
                    rh -= 1
            else:
                old_m2 = m2 + 1
                if r1 != 0.0:
                    rh += 1
                    base_r *= (2 * old_m2 * r1) / (m1 * rh)
                    r1 -= 1
                else:
                    r2 += 1
                    base_r *= (old_m2 * rh) / (2 * m1 * r2)
                    rh -= 1
            _, base_r, rh, r1, r2, ties, incr2 = _tailsum(True, base_r, rh, r1, r2, ties)
            tailp += incr2
            centerp += row - incr1 - incr2
            if centerp > _DBL_MAX:
                return 0.0
    if not midp:
        return tailp / (tailp + centerp)
    return (tailp - ((1 - _EPS2) * _BIAS * 0.5) * ties) / (tailp + centerp)


def hwe_xchr_p(fhet: Any, fhom1: Any, fhom2: Any, male1: Any, male2: Any, *, midp: bool = False) -> np.ndarray:
    """:func:`hwe_xchr_p_one` per variant (arrays of counts, same shape)."""
    cols = [np.asarray(x, dtype=np.int64).ravel() for x in (fhet, fhom1, fhom2, male1, male2)]
    out = np.array([hwe_xchr_p_one(*map(int, t), midp=midp) for t in zip(*cols)], dtype=np.float64)
    return out.reshape(np.shape(fhet))
