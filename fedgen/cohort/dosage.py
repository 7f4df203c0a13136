"""Imputed dosages (``study.dosage``): read, stored and converted exactly as PLINK 2 does.

PLINK 2 (``plink2 --vcf FILE dosage=DS``, checked against v2.00a3.5) keeps an ALT dosage as a
whole number of 1/16384 units (0..32768 for 0..2 copies): a VCF value ``x`` becomes
``floor(x * 16384 + 0.5)``. fedgen stores the same integers (``dosage.u16`` in the site's
genotype cache, :data:`MISSING` = no dosage), so federated sums equal PLINK's pooled ones.

* **DS** (``Number=A``): one value per ALT, in [0, 2]; a value outside it is an error, as in
  PLINK. ``.`` with a GT call takes the GT call's dosage; ``.`` without one is missing.
* **GP** (only when FORMAT DS is not declared, as ``dosage=GP-force``): the dosage is
  ``(P(het) + 2 P(hom ALT)) / (P(hom REF) + P(het) + P(hom ALT))`` (PLINK normalises the sum).
* **Hard calls** (for ``--missing``, ``--hardy``, and the small-cell rules) are derived from the
  dosage with ``--hard-call-threshold`` 0.1: a dosage within 0.1 × 16384 units of 0, 1 or 2
  gives that call, any other is a missing call (GT is not used where a dosage is given).
* BCF stores floats as float32: PLINK quantises that float32, and so does fedgen (BCF records
  reach fedgen as htslib's VCF text, six significant digits, so a BCF value written with more
  digits than that may land one unit off PLINK's).
* Multi-allelic VCF records (split as ``bcftools norm -m-any``) keep their GT dosages;
  DS/GP of such records are not read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fedgen.errors import InputError

UNIT = 16384  #: dosage units per allele copy (PLINK 2's kDosageMid)
MISSING = 65535  #: no dosage for this call
ABSENT = 65534  #: (while reading) no DS/GP value: take the GT call's dosage
HARD_CALL_THRESHOLD = 0.1  #: PLINK 2's default --hard-call-threshold

_TAB, _NL, _CR, _COLON, _COMMA, _DOT = 9, 10, 13, 58, 44, 46


def quantise(x: np.ndarray) -> np.ndarray:
    """Dosages (float, NaN = missing) → uint16 units of 1/16384 as PLINK 2 rounds them."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full(x.shape, MISSING, dtype=np.uint16)
    ok = ~np.isnan(x)
    out[ok] = np.floor(x[ok] * UNIT + 0.5).astype(np.uint16)
    return out


def from_hardcalls(g: np.ndarray) -> np.ndarray:
    """int8 hard calls (-1 missing) → uint16 dosage units."""
    g = np.asarray(g)
    return np.where(g < 0, MISSING, g.astype(np.int64) * UNIT).astype(np.uint16)


def to_float(u: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
    """uint16 units → float64 ALT (or, where ``flip``, REF) dosages, NaN = missing."""
    u = np.asarray(u)
    miss = u == MISSING
    d = u.astype(np.float64)
    if flip is not None and np.any(flip):
        f = np.asarray(flip, dtype=bool)
        d[f] = 2 * UNIT - d[f]
    d /= UNIT
    d[miss] = np.nan
    return d


def to_hardcalls(u: np.ndarray, flip: np.ndarray | None = None, threshold: float = HARD_CALL_THRESHOLD) -> np.ndarray:
    """uint16 units → int8 hard calls (-1 missing) by PLINK 2's ``--hard-call-threshold``."""
    u = np.asarray(u)
    miss = u == MISSING
    v = u.astype(np.int64)
    call = (v + UNIT // 2) // UNIT  # nearest whole genotype
    dist = np.abs(v - call * UNIT)
    g = call.astype(np.int8)
    g[(dist > threshold * UNIT) | miss] = -1
    if flip is not None and np.any(flip):
        f = np.asarray(flip, dtype=bool)
        sub = g[f]
        g[f] = np.where(sub < 0, sub, 2 - sub)
    return g


def vcf_dosage_field(path: Path) -> str | None:
    """``"DS"`` or ``"GP"`` when the VCF/BCF header declares that FORMAT field (DS preferred), else None."""
    from fedgen.cohort.vcf import detect_format

    fmt = detect_format(path)
    if fmt == "bcf":
        import pysam

        pysam.set_verbosity(0)
        with pysam.VariantFile(str(path)) as vf:
            ids = set(vf.header.formats.keys())
    else:
        ids = set()
        from fedgen.cohort.vcf import iter_text

        buf = b""
        for chunk in iter_text(path, fmt):
            buf += chunk
            if b"\n#CHROM" in buf or len(buf) > (64 << 20):
                break
        for line in buf.split(b"\n"):
            if line.startswith(b"#CHROM") or not line.startswith(b"##"):
                break
            if line.startswith(b"##FORMAT=<ID="):
                ids.add(line[13:].split(b",", 1)[0].decode("utf-8", "replace"))
    return "DS" if "DS" in ids else ("GP" if "GP" in ids else None)


def _part_spans(r: np.ndarray, S: np.ndarray, E: np.ndarray, sep: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Spans [start, end) of the ``j``-th ``sep``-separated part of each field [S, E) of ``r``;
    a field with fewer parts gets an empty span."""
    seps = np.flatnonzero(r == sep)
    first = np.searchsorted(seps, S)
    last = len(seps) - 1
    if j == 0:
        start = S.copy()
    else:
        k = first + j - 1
        at = seps[np.minimum(k, last)] if len(seps) else E
        has = (k <= last) & (at < E)
        start = np.where(has, at + 1, E)
    k = first + j
    at = seps[np.minimum(k, last)] if len(seps) else E
    end = np.where((k <= last) & (at < E) & (start < E), at, E)
    return start, np.maximum(end, start)


def _floats(r: np.ndarray, start: np.ndarray, end: np.ndarray, what: str, width: int = 32) -> np.ndarray:
    """Numbers in spans of ``r`` (NaN for an empty span or ``.``); raises ValueError on junk.

    Plain decimals (``0.735``, ``2``, ``.5``; at most 15 digits) are parsed with integer arithmetic:
    digits / 10^k is one correctly rounded division, the double ``strtod`` gives; anything else
    (exponents, signs) goes through numpy's own string conversion."""
    n = len(start)
    L = end - start
    out = np.full(n, np.nan)
    W = int(L.max(initial=0))
    if W == 0:
        return out
    if W > width:
        raise ValueError(f"a {what} value is longer than {width} characters")
    pad = np.concatenate([r, np.zeros(W, dtype=np.uint8)])
    cols = np.arange(W)
    inside = cols[None, :] < L[:, None]
    c = np.where(inside, pad[start[:, None] + cols[None, :]], 0)
    ok = (L > 0) & ~((L == 1) & (c[:, 0] == _DOT))
    isdig = (c >= 48) & (c <= 57)
    isdot = c == _DOT
    ndig = isdig.sum(1)
    plain = ok & ((isdig | isdot) == inside).all(1) & (isdot.sum(1) <= 1) & (ndig >= 1) & (ndig <= 15)
    m = np.zeros(n, dtype=np.int64)
    for j in range(W):  # the digits as one integer
        d = isdig[:, j]
        m = np.where(d, m * 10 + (c[:, j].astype(np.int64) - 48), m)
    has_dot = isdot.any(1)
    k = np.where(has_dot, L - 1 - np.argmax(isdot, axis=1), 0)  # digits after the point
    out[plain] = m[plain] / 10.0 ** k[plain]
    rest = ok & ~plain
    if rest.any():
        buf = np.ascontiguousarray(c[rest].astype(np.uint8))
        txt = buf.view(f"S{W}").ravel()
        try:
            out[rest] = txt.astype(np.float64)
        except ValueError:
            raise ValueError(f"malformed {what} value") from None
    return out


def record_dosages(r: np.ndarray, n: int, fmt: bytes, field: str, *, f32: bool = False) -> np.ndarray:
    """One biallelic record's samples section (bytes after FORMAT) → uint16 units, :data:`ABSENT`
    where the call has no value (its GT dosage is used). ``f32``: the values are BCF float32s
    (PLINK quantises the float32 value, not the decimal). Raises ValueError with the reason."""
    keys = fmt.split(b":")
    key = field.encode()
    out = np.full(n, ABSENT, dtype=np.uint16)
    if key not in keys:
        return out
    j = keys.index(key)
    tabs = np.flatnonzero(r == _TAB)
    if len(tabs) != n - 1:
        raise ValueError(f"expected {n} sample columns, found {len(tabs) + 1}")
    S = np.concatenate([[0], tabs + 1])
    E = np.concatenate([tabs, [len(r)]])
    s0, e0 = _part_spans(r, S, E, _COLON, j)
    if field == "DS":
        x = _floats(r, s0, e0, "DS")
        if f32:
            x = x.astype(np.float32).astype(np.float64)
        if np.any((x < 0) | (x > 2)):
            raise ValueError("a DS value is outside [0, 2]")
    else:
        p = [_floats(r, *_part_spans(r, s0, e0, _COMMA, k), "GP") for k in range(3)]
        if f32:
            p = [q.astype(np.float32).astype(np.float64) for q in p]
        if any(np.any((q < 0) | (q > 1)) for q in p):
            raise ValueError("a GP value is outside [0, 1]")
        tot = p[0] + p[1] + p[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(tot > 0, (p[1] + 2 * p[2]) / tot, np.nan)
    given = ~np.isnan(x)
    out[given] = quantise(x[given])
    return out


def read_vcf_dosages(paths: list[Path], fields: list[str | None]) -> Iterator[np.ndarray]:
    """(rows, samples) uint16 dosage blocks of VCF/BCF files (``fields``: each file's DS/GP field
    or None), one row per biallelic variant in the order :func:`fedgen.cohort.vcf.read_vcfs`
    gives; :data:`ABSENT` where a call has no value (and for multi-allelic records)."""
    from fedgen.cohort.vcf import _bcf_text, _split_header, detect_format, iter_text

    for path, field in zip(paths, fields):
        field = field or "-"  # no such FORMAT key: every call ABSENT
        fmt = detect_format(path)
        header, text = _bcf_text(path) if fmt == "bcf" else _split_header(iter_text(path, fmt), path)
        n = len(header.samples)
        line_no = header.meta_lines + 2
        carry = b""
        for chunk in text:
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1
            rows, line_no = _chunk_dosages(data, cut, n, field, path, line_no, fmt == "bcf")
            if rows:
                yield np.stack(rows)
            carry = data[cut:]
        if carry.strip():
            rows, _ = _chunk_dosages(carry + b"\n", len(carry) + 1, n, field, path, line_no, fmt == "bcf")
            if rows:
                yield np.stack(rows)


def _chunk_dosages(data: bytes, cut: int, n: int, field: str, path: Path, line_no: int, f32: bool
                   ) -> tuple[list[np.ndarray], int]:
    rows: list[np.ndarray] = []
    src = np.frombuffer(data, dtype=np.uint8)
    p = 0
    while p < cut:
        e = data.find(b"\n", p)
        if e < 0 or e >= cut:
            e = cut - 1
        le = e - 1 if e > p and data[e - 1] == _CR else e
        if le > p:
            t = p
            cols = []
            for _ in range(9):  # the 9 fixed columns (validated by the genotype reader)
                nt = data.find(b"\t", t, le)
                if nt < 0:
                    break
                cols.append((t, nt))
                t = nt + 1
            if len(cols) == 9:
                k = data.count(b",", cols[4][0], cols[4][1]) + 1
                if k > 1:
                    rows.extend(np.full(n, ABSENT, dtype=np.uint16) for _ in range(k))
                else:
                    try:
                        rows.append(record_dosages(src[t:le], n, data[cols[8][0]:cols[8][1]], field, f32=f32))
                    except ValueError as exc:
                        raise InputError(f"{path}: line {line_no}: {exc}") from None
        p = e + 1
        line_no += 1
    return rows, line_no
