"""The compiled site kernel (``_glmkernel.c``), loaded with ctypes when it was built.

``pip install`` builds it where a C compiler is available (``setup.py``, an optional
extension). Without it, :func:`logistic_sums` returns None and the numpy kernel in
:mod:`fedgen.stats.glm` computes the same sums. ``FEDGEN_KERNEL=numpy`` turns the compiled kernel
off (for comparisons); :func:`name` says which one a process uses (a site worker logs a warning
at start when it is ``numpy``).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def _lib() -> Any:
    if os.environ.get("FEDGEN_KERNEL", "").strip().lower() == "numpy":
        return None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"_glmkernel{suffix}"
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            f = lib.fedgen_logistic_sums
            f.restype = None
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            f.argtypes = [i64, i64, i64] + [ptr] * 14
            d = lib.fedgen_decode_gt
            d.restype = None
            d.argtypes = [ptr, i64, i64] + [ptr] * 5
            return lib
    return None


def name() -> str:
    """``"compiled"`` or ``"numpy"``: the logistic kernel this process runs."""
    return "compiled" if _lib() is not None else "numpy"


def _p(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


class CovariateTerms:
    """A sample set's covariate rows and their pairwise products, laid out for the kernel
    (computed once per design and reused by every block of every round)."""

    def __init__(self, y: np.ndarray, C: np.ndarray) -> None:
        k = C.shape[1]
        self.y = np.ascontiguousarray(y, dtype=np.float64)
        self.Ct = np.ascontiguousarray(C.T, dtype=np.float64)
        iu, ju = np.triu_indices(k)
        self.iu = np.ascontiguousarray(iu, dtype=np.int64)
        self.ju = np.ascontiguousarray(ju, dtype=np.int64)
        self.CC = np.ascontiguousarray(self.Ct[iu] * self.Ct[ju])
        self.k = k


def logistic_sums(g: np.ndarray, terms: CovariateTerms, beta: np.ndarray, *, fill: np.ndarray | None,
                  with_loglik: bool) -> dict[str, np.ndarray] | None:
    """The compiled kernel's sums for hard-call blocks (int8, negative = missing), or None
    when it is not available or ``g`` is not such a block."""
    lib = _lib()
    if lib is None or g.dtype != np.int8:
        return None
    g = np.ascontiguousarray(g)
    V, N = g.shape
    p = terms.k + 2
    beta = np.ascontiguousarray(beta, dtype=np.float64)
    fill_a = None if fill is None else np.ascontiguousarray(fill, dtype=np.float64)
    # the C code trusts every length: check them all here (a short array would be read past its end)
    if (beta.shape != (V, p) or terms.Ct.shape != (terms.k, N) or terms.y.shape != (N,)
            or terms.CC.shape != (len(terms.iu), N) or (fill_a is not None and fill_a.shape != (V,))):
        raise ValueError("g, beta, fill and the covariates disagree on their shapes")
    # the C code writes H[2 + iu[j], 2 + ju[j]] for j < k(k+1)/2: the triangle must be exactly that
    kk = terms.k * (terms.k + 1) // 2
    if (terms.iu.shape != (kk,) or terms.ju.shape != (kk,) or terms.iu.dtype != np.int64 or terms.ju.dtype != np.int64
            or (kk and (min(terms.iu.min(), terms.ju.min()) < 0 or max(terms.iu.max(), terms.ju.max()) >= terms.k))):
        raise ValueError("the covariate triangle's indices do not match its covariates")
    for a in (terms.y, terms.Ct, terms.CC, terms.iu, terms.ju):
        if not a.flags.c_contiguous:
            raise ValueError("the covariate terms must be C-contiguous")
    H = np.empty((V, p, p))
    grad = np.empty((V, p))
    n = np.empty(V, dtype=np.int64)
    neff = np.empty(V)
    loglik = np.empty(V) if with_loglik else None
    work = np.empty(4 * N)
    lib.fedgen_logistic_sums(V, N, terms.k, _p(g), _p(fill_a), _p(terms.y), _p(terms.Ct), _p(terms.CC),
                             _p(terms.iu), _p(terms.ju), _p(beta), _p(H), _p(grad), _p(n), _p(neff), _p(loglik),
                             _p(work))
    out = {"H": H, "grad": grad, "n": n, "neff": neff}
    if with_loglik:
        out["loglik"] = loglik
    return out


def decode_gt(chunk: bytes, starts: np.ndarray, rows: np.ndarray, nalt: np.ndarray, dosage: np.ndarray) -> np.ndarray | None:
    """Fixed-width GT records decoded into ``dosage`` by the compiled kernel; returns which records
    were (the rest need the general path), or None without the kernel. See ``fedgen_decode_gt``."""
    lib = _lib()
    if lib is None:
        return None
    n = dosage.shape[1]
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    nalt = np.ascontiguousarray(nalt, dtype=np.int64)
    R = len(starts)
    # the C code trusts these bounds: every record's calls inside the chunk, every output row inside dosage
    if (dosage.dtype != np.int8 or not dosage.flags.c_contiguous or rows.shape != (R,) or nalt.shape != (R,)
            or (R and (starts.min() < 0 or int(starts.max()) + 4 * n - 1 > len(chunk) or rows.min() < 0
                       or int((rows + np.maximum(nalt, 1)).max()) > dosage.shape[0]))):
        raise ValueError("decode_gt: records or output rows out of bounds")
    ok = np.zeros(R, dtype=np.uint8)
    buf = np.frombuffer(chunk, dtype=np.uint8)
    lib.fedgen_decode_gt(_p(buf), R, n, _p(starts), _p(rows), _p(nalt), _p(dosage), _p(ok))
    return ok.astype(bool)
