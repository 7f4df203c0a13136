"""PLINK-exact number printing: PLINK 2 ``dtoa_g``/``lntoa_g`` and PLINK 1.9 ``dtoa_g_wxp4``.

PLINK does not use printf.  It scales the value by powers of ten with a fixed sequence of
double multiplications, then rounds half-to-even with a tolerance window (a scaled value
within ~5e-9 of .5 counts as a tie for PLINK 2, ~5e-11 for PLINK 1.9).  The functions here
repeat those exact double operations, vectorised with numpy, so the printed text is
byte-identical to PLINK's (plink-ng ``plink2_string.cc``: ``dtoa_g``; 1.9 ``plink_common.c``).

Ported from plink-ng ``2.0/include/plink2_string.cc`` (v2.00a3.5) and ``1.9/plink_common.c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "dtoa_g",
    "format_g6",
    "lntoa_g",
    "format_g6_from_ln",
    "dtoa_g4",
    "format_g4",
]

_DBL_MAX = float(np.finfo(np.float64).max)
# plink2_base.h
_LN10 = 2.3025850929940457
_RECIP_LN10 = 0.43429448190325176
_BANKER8 = (0.499999995, 0.500000005)  # PLINK 2 kBankerRound8
_BANKER10 = (0.49999999995, 0.50000000005)  # PLINK 1.9 banker_round10


@dataclass(frozen=True)
class _Spec:
    """Constants of one PLINK %g-like printer with ``sig`` significant digits."""

    sig: int
    mant: str  # decimal mantissa of every range threshold, e.g. "9.9999949999999"
    banker: tuple[float, float]

    def t(self, p10: int) -> float:
        # Thresholds are C literals such as 9.9999949999999e-16; parse the same decimal text.
        return float(f"{self.mant}e{p10}")


_G6 = _Spec(6, "9.9999949999999", _BANKER8)
_G4 = _Spec(4, "9.9994999999999", _BANKER10)

# kind codes of a formatted value
_NAN, _ZERO, _INF, _EXP_NEG, _EXP_POS, _PLAIN, _DEC, _ONE = range(8)


def _banker_round(scaled: np.ndarray, banker: tuple[float, float]) -> np.ndarray:
    """PLINK's BankerRoundD on non-negative values: int32 truncation plus windowed half-even."""
    trunc = np.trunc(scaled)
    r = trunc.astype(np.int64)
    window = np.where(r & 1, banker[1], banker[0])
    return r + np.trunc((scaled - trunc) + window).astype(np.int64)


def _scale_small(v: np.ndarray, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """dtoa_g's scaling of 0 < v < 1e-4 into [1, 10): returns (scaled v, decimal exponent)."""
    v = v.copy()
    xp = np.zeros(v.shape, dtype=np.int64)
    tiny = v < spec.t(-128)
    m = tiny & (v < spec.t(-256))
    v[m] *= 1.0e256
    xp[m] |= 256
    m = tiny & ~m
    v[m] *= 1.0e128
    xp[m] |= 128
    for p10, mult in ((64, 1.0e64), (32, 1.0e32), (16, 1.0e16), (8, 100000000.0),
                      (4, 10000.0), (2, 100.0), (1, 10.0)):
        m = v < spec.t(-p10)
        v[m] *= mult
        xp[m] += p10
    return v, xp


def _scale_large(v: np.ndarray, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """dtoa_g's scaling of finite v >= 10^sig into [1, 10)."""
    v = v.copy()
    xp = np.zeros(v.shape, dtype=np.int64)
    huge = v >= spec.t(127)
    m = huge & (v >= spec.t(255))
    v[m] *= 1.0e-256
    xp[m] |= 256
    m = huge & ~m
    v[m] *= 1.0e-128
    xp[m] |= 128
    for p10, thr, mult in ((64, 63, 1.0e-64), (32, 31, 1.0e-32), (16, 15, 1.0e-16),
                           (8, 7, 1.0e-8), (4, 3, 1.0e-4), (2, 1, 1.0e-2), (1, 0, 1.0e-1)):
        m = v >= spec.t(thr)
        v[m] *= mult
        xp[m] += p10
    return v, xp


class _Parts:
    """Per-value pieces from which the text is assembled."""

    def __init__(self, n: int) -> None:
        self.kind = np.full(n, _NAN, dtype=np.int64)
        self.neg = np.zeros(n, dtype=bool)
        self.digits = np.zeros(n, dtype=np.int64)  # rounded significand, `sig` digits
        self.intlen = np.ones(n, dtype=np.int64)  # digits before the point (_PLAIN)
        self.lead0 = np.zeros(n, dtype=np.int64)  # zeros after "0." (_DEC)
        self.xp = np.zeros(n, dtype=np.int64)  # |decimal exponent| (_EXP_*)


def _fill_plain(parts: _Parts, idx: np.ndarray, v: np.ndarray, spec: _Spec) -> None:
    """Significand-only range [~1, ~10^sig): dtoa_so6 / dtoa_so4."""
    scaled = v.copy()
    intlen = np.full(v.shape, spec.sig, dtype=np.int64)
    done = np.zeros(v.shape, dtype=bool)
    for k in range(1, spec.sig):
        m = ~done & (v < spec.t(k - 1))
        scaled[m] = v[m] * float(10 ** (spec.sig - k))
        intlen[m] = k
        done |= m
    parts.kind[idx] = _PLAIN
    parts.intlen[idx] = intlen
    parts.digits[idx] = _banker_round(scaled, spec.banker)


def _fill_decimal(parts: _Parts, idx: np.ndarray, v: np.ndarray, spec: _Spec) -> None:
    """Range [1e-4, 1): "0." + leading zeros + `sig` digits."""
    v = v.copy()
    lead0 = np.zeros(v.shape, dtype=np.int64)
    m = v < spec.t(-3)
    v[m] *= 100.0
    lead0[m] += 2
    m = v < spec.t(-2)
    v[m] *= 10.0
    lead0[m] += 1
    parts.kind[idx] = _DEC
    parts.lead0[idx] = lead0
    parts.digits[idx] = _banker_round(v * float(10**spec.sig), spec.banker)


def _fill_exp(parts: _Parts, idx: np.ndarray, v: np.ndarray, xp: np.ndarray, kind: int,
              spec: _Spec) -> None:
    parts.kind[idx] = kind
    parts.xp[idx] = xp
    parts.digits[idx] = _banker_round(v * float(10 ** (spec.sig - 1)), spec.banker)


def _parts_from_values(x: np.ndarray, spec: _Spec) -> _Parts:
    n = x.size
    parts = _Parts(n)
    finite_or_inf = ~np.isnan(x)
    parts.neg = finite_or_inf & (x < 0)
    a = np.abs(x)
    small = finite_or_inf & (a < spec.t(-5))
    zero = small & (a == 0.0)
    parts.kind[zero] = _ZERO
    idx = np.flatnonzero(small & ~zero)
    if idx.size:
        v, xp = _scale_small(a[idx], spec)
        _fill_exp(parts, idx, v, xp, _EXP_NEG, spec)
    large = finite_or_inf & (a >= spec.t(spec.sig - 1))
    inf = large & (a > _DBL_MAX)
    parts.kind[inf] = _INF
    idx = np.flatnonzero(large & ~inf)
    if idx.size:
        v, xp = _scale_large(a[idx], spec)
        _fill_exp(parts, idx, v, xp, _EXP_POS, spec)
    mid = finite_or_inf & ~small & ~large
    plain = mid & (a >= spec.t(-1))
    idx = np.flatnonzero(plain)
    if idx.size:
        _fill_plain(parts, idx, a[idx], spec)
    idx = np.flatnonzero(mid & ~plain)
    if idx.size:
        _fill_decimal(parts, idx, a[idx], spec)
    return parts


def _render(parts: _Parts, spec: _Spec, nan: str, exp_width: int) -> list[str]:
    """Assemble strings.  ``exp_width``: minimum exponent digits (2 for both PLINKs)."""
    sig = spec.sig
    tail = sig - 1
    out: list[str] = []
    append = out.append
    for kind, neg, d, il, l0, xp in zip(parts.kind.tolist(), parts.neg.tolist(),
                                        parts.digits.tolist(), parts.intlen.tolist(),
                                        parts.lead0.tolist(), parts.xp.tolist()):
        if kind == _PLAIN:
            s = f"{d:0{sig}d}"
            frac = s[il:].rstrip("0")
            body = s[:il] + "." + frac if frac else s[:il]
        elif kind == _DEC:
            body = "0." + "0" * l0 + f"{d:0{sig}d}".rstrip("0")
        elif kind == _EXP_NEG or kind == _EXP_POS:
            q, r = divmod(d, 10**tail)
            frac = f"{r:0{tail}d}".rstrip("0")
            body = chr(48 + q) + ("." + frac if frac else "")
            body += ("e-" if kind == _EXP_NEG else "e+") + f"{xp:0{exp_width}d}"
        elif kind == _ZERO:
            body = "0"
        elif kind == _ONE:
            body = "1"
        elif kind == _INF:
            body = "inf"
        else:
            append(nan)
            continue
        append("-" + body if neg else body)
    return out


def _as_float_array(values: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    arr = np.asarray(values, dtype=np.float64)
    return arr.reshape(-1), arr.shape


def format_g6(values: Any, *, nan: str = "nan") -> list[str]:
    """Format numbers exactly as PLINK 2's ``dtoa_g`` (6 significant digits).

    Parameters
    ----------
    values : array_like of float
        Values to print; any shape (flattened in C order).
    nan : str, default "nan"
        Text for NaN (PLINK prints ``nan``; pass ``"NA"`` for columns where PLINK writes NA).

    Returns
    -------
    list of str, length ``values.size``
        E.g. ``0.123458`` (0.1234575, half-to-even with PLINK's tie window), ``2.5e-05``,
        ``1.23457e+06``, ``0``, ``inf``, ``-inf``, ``nan``.

    Notes
    -----
    Exponent form when ``|x| < 9.9999949999999e-5`` or ``|x| >= 999999.49999999``; trailing
    zeros and a bare decimal point are stripped.  Subnormal values are printed normally.

    References
    ----------
    plink-ng v2.00a3.5, ``2.0/include/plink2_string.cc``: ``dtoa_g``, ``dtoa_so6``,
    ``BankerRoundD``.
    """
    flat, _ = _as_float_array(values)
    return _render(_parts_from_values(flat, _G6), _G6, nan, 2)


def dtoa_g(x: float) -> str:
    """PLINK 2's ``dtoa_g`` for one value (see :func:`format_g6`)."""
    return format_g6([x])[0]


# ---------------------------------------------------------------------------- lntoa_g
def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = a * b
    split = 134217729.0  # 2^27 + 1, Veltkamp
    ta = split * a
    ah = ta - (ta - a)
    al = a - ah
    tb = split * b
    bh = tb - (tb - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded a*b + c without hardware FMA.

    Boldo & Melquiond (2008), "Emulation of FMA and correctly rounded sums: proved
    algorithms using rounding to odd", IEEE Trans. Comput. 57(4): the error terms are summed
    with round-to-odd, then one round-to-nearest gives the exact FMA result.
    """
    uh, ul = _two_prod(a, b)
    th, tl = _two_sum(c, uh)
    s, err = _two_sum(tl, ul)
    even = (s.view(np.int64) & 1) == 0
    bump = (err != 0) & even
    if bump.any():
        s = s.copy()
        s[bump] = np.nextafter(s[bump], np.where(err[bump] > 0, np.inf, -np.inf))
    return th + s


def _parts_from_ln(ln: np.ndarray, spec: _Spec, use_fma: bool) -> _Parts:
    n = ln.size
    parts = _Parts(n)
    isnan = np.isnan(ln)
    below = ~isnan & (ln < 13.81551005796414)  # log(999999.49999999)
    noexp = below & (ln > -9.210340871976317)  # log(9.9999949999999e-5)
    near1 = noexp & (ln > -5.000001349509205e-7)  # log(0.99999949999999)
    one = near1 & (ln < 4.999987599993995e-6)  # log(1.0000050000001)
    parts.kind[one] = _ONE
    plain_idx = np.flatnonzero(near1 & ~one)
    dec_idx = np.flatnonzero(noexp & ~near1)
    zero = below & ~noexp & (ln < 0x7FFFFFFB * (-_LN10))
    parts.kind[zero] = _ZERO
    inf = ~isnan & ~below & (ln > 0x7FFFFFFB * _LN10)
    parts.kind[inf] = _INF
    exp_idx = np.flatnonzero(~isnan & ~one & ~near1 & ~noexp & ~zero & ~inf)
    need_exp = np.concatenate([plain_idx, dec_idx])
    if need_exp.size:
        # glibc exp, as PLINK calls it (numpy's SIMD exp may differ in the last ulp)
        ex = np.array([math.exp(v) for v in ln[need_exp].tolist()], dtype=np.float64)
        k = plain_idx.size
        if k:
            _fill_plain(parts, plain_idx, ex[:k], spec)
        if dec_idx.size:
            _fill_decimal(parts, dec_idx, ex[k:], spec)
    if exp_idx.size:
        lv = ln[exp_idx]
        xp10 = np.trunc((5.000001349509205e-7 + lv) * _RECIP_LN10)
        neg_ln10 = np.full(lv.shape, -_LN10)
        arg = _fma(xp10, neg_ln10, lv) if use_fma else xp10 * neg_ln10 + lv
        mant = np.array([math.exp(v) for v in arg.tolist()], dtype=np.float64)
        xp = xp10.astype(np.int64)
        lo = mant < 0.99999949999999
        mant[lo] *= 10.0
        xp[lo] -= 1
        hi = ~lo & (mant > 9.9999949999999)
        mant[hi] *= 0.1
        xp[hi] += 1
        parts.digits[exp_idx] = _banker_round(mant * 100000.0, spec.banker)
        parts.kind[exp_idx] = np.where(xp < 0, _EXP_NEG, _EXP_POS)
        parts.xp[exp_idx] = np.abs(xp)
    return parts


def format_g6_from_ln(ln_values: Any, *, nan: str = "nan", fma: bool = True) -> list[str]:
    """Print exp(ln_values) exactly as PLINK 2's ``lntoa_g`` (P and OR columns of --glm).

    Parameters
    ----------
    ln_values : array_like of float
        Natural logs of non-negative quantities; any shape (flattened in C order).  Values
        below ln(1e-308) print correctly (e.g. ``7.31179e-350``), since nothing is
        exponentiated outside [1, 10).
    nan : str, default "nan"
        Text for NaN input.
    fma : bool, default True
        The AVX2 build of PLINK 2 (the one ``/usr/bin/plink2`` runs on AVX2 machines)
        computes the mantissa exponent ``xp10*(-ln 10) + ln_x`` with a fused multiply-add;
        the SSE2 build does not.  This changes the 6th digit only in rare near-tie cases.

    Returns
    -------
    list of str, length ``ln_values.size``

    References
    ----------
    plink-ng v2.00a3.5, ``2.0/include/plink2_string.cc``: ``lntoa_g``.
    """
    flat, _ = _as_float_array(ln_values)
    return _render(_parts_from_ln(flat, _G6, fma), _G6, nan, 2)


def lntoa_g(ln_x: float, *, fma: bool = True) -> str:
    """PLINK 2's ``lntoa_g`` for one value (see :func:`format_g6_from_ln`)."""
    return format_g6_from_ln([ln_x], fma=fma)[0]


# ----------------------------------------------------------------------- PLINK 1.9
def format_g4(values: Any, *, width: int = 0, nan: str = "nan") -> list[str]:
    """Format numbers exactly as PLINK 1.9's ``dtoa_g_wxp4`` (4 significant digits, %.4g-like).

    Parameters
    ----------
    values : array_like of float
        Values to print; any shape (flattened in C order).
    width : int, default 0
        Minimum field width; shorter strings are right-aligned with spaces, as in the
        fixed-width ``--assoc`` columns (F_A/F_U width 8; CHISQ, P, OR width 12).
    nan : str, default "nan"
        Text for NaN.  ``--assoc`` writes ``NA`` where a statistic is undefined; pass
        ``nan="NA"`` after setting those entries to NaN.

    Returns
    -------
    list of str, length ``values.size``
        E.g. ``0.1235``, ``1.234e-05``, ``1.235e+04``, ``0``, ``inf``, ``nan``.

    Notes
    -----
    Exponent form when ``|x| < 9.9994999999999e-5`` or ``|x| >= 9999.4999999999``;
    half-to-even rounding with a ±5e-11 tie window on the scaled value.

    References
    ----------
    plink-ng 1.9 (daf779cf), ``1.9/plink_common.c``: ``dtoa_g_wxp4``, ``dtoa_so4``,
    ``double_bround``.
    """
    flat, _ = _as_float_array(values)
    out = _render(_parts_from_values(flat, _G4), _G4, nan, 2)
    if width > 0:
        out = [s.rjust(width) for s in out]
    return out


def dtoa_g4(x: float, *, width: int = 0) -> str:
    """PLINK 1.9's ``dtoa_g_wxp4`` for one value (see :func:`format_g4`)."""
    return format_g4([x], width=width)[0]
