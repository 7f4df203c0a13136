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


def _part_spans(r: np.ndarray, S: np.ndarray, E: np.ndarray, sep: int, j, seps: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Spans [start, end) of the ``j``-th (a number, or one per field) ``sep``-separated part of
    each field [S, E) of ``r``; a field with fewer parts gets an empty span. ``seps``: the
    positions of ``sep`` in ``r``, when already known."""
    seps = np.flatnonzero(r == sep) if seps is None else seps
    j = np.asarray(j)
    if len(seps) == 0:
        start = np.where(j == 0, S, E)
        return start, np.maximum(E, start)
    first = np.searchsorted(seps, S)
    last = len(seps) - 1
    k = first + j - 1  # the separator before part j
    at = seps[np.clip(k, 0, last)]
    start = np.where(j == 0, S, np.where((k >= first) & (k <= last) & (at < E), at + 1, E))
    k = first + j  # the separator after it
    at = seps[np.minimum(k, last)]
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
    first = pad[start]
    ok = (L > 0) & ~((L == 1) & (first == _DOT))
    m = np.zeros(n, dtype=np.int64)  # the digits as one integer
    ndig = np.zeros(n, dtype=np.int16)
    ndot = np.zeros(n, dtype=np.int16)
    after = np.zeros(n, dtype=np.int16)  # digits after the point
    other = np.zeros(n, dtype=bool)
    for j in range(W):  # one character column at a time (contiguous vectors over the calls)
        c = first if j == 0 else pad[start + j]
        inside = L > j
        d = c.astype(np.int64) - 48
        isdig = inside & (d >= 0) & (d <= 9)
        isdot = inside & (c == _DOT)
        other |= inside & ~(isdig | isdot)
        m = np.where(isdig, m * 10 + d, m)
        after += isdig & (ndot > 0)
        ndig += isdig
        ndot += isdot
    plain = ok & ~other & (ndot <= 1) & (ndig >= 1) & (ndig <= 15)
    out[plain] = m[plain] / 10.0 ** after[plain]
    c = pad[start[:, None] + np.arange(W)[None, :]] if (ok & ~plain).any() else None
    if c is not None:
        c[np.arange(W)[None, :] >= L[:, None]] = 0
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
    if key not in keys:
        return np.full(n, ABSENT, dtype=np.uint16)
    tabs = np.flatnonzero(r == _TAB)
    if len(tabs) != n - 1:
        raise ValueError(f"expected {n} sample columns, found {len(tabs) + 1}")
    S = np.concatenate([[0], tabs + 1])
    E = np.concatenate([tabs, [len(r)]])
    return _field_dosages(r, S, E, keys.index(key), field, f32)


def _field_dosages(r: np.ndarray, S: np.ndarray, E: np.ndarray, j, field: str, f32: bool,
                   colons: np.ndarray | None = None) -> np.ndarray:
    """uint16 units (:data:`ABSENT` where no value) of the calls [S, E) of ``r`` whose DS/GP is
    their ``j``-th subfield. Raises ValueError with the reason."""
    s0, e0 = _part_spans(r, S, E, _COLON, j, colons)
    if field == "DS":
        x = _floats(r, s0, e0, "DS")
        if f32:
            x = x.astype(np.float32).astype(np.float64)
        if np.any((x < 0) | (x > 2)):
            raise ValueError("a DS value is outside [0, 2]")
    else:
        commas = np.flatnonzero(r == _COMMA)
        p = [_floats(r, *_part_spans(r, s0, e0, _COMMA, k, commas), "GP") for k in range(3)]
        if f32:
            p = [q.astype(np.float32).astype(np.float64) for q in p]
        if any(np.any((q < 0) | (q > 1)) for q in p):
            raise ValueError("a GP value is outside [0, 1]")
        tot = p[0] + p[1] + p[2]
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(tot > 0, (p[1] + 2 * p[2]) / tot, np.nan)
    out = np.full(len(S), ABSENT, dtype=np.uint16)
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


BATCH_CALLS = 1 << 20  #: calls parsed at once (records of one chunk batched together)


def _chunk_dosages(data: bytes, cut: int, n: int, field: str, path: Path, line_no: int, f32: bool
                   ) -> tuple[list[np.ndarray], int]:
    """Dosage rows of the whole lines in ``data[:cut]``; the records' calls are parsed in batches."""
    key = field.encode()
    plan: list[tuple] = []  # ("absent", rows) or ("rec", samples start, end, subfield index, FORMAT, line)
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
                fmt = data[cols[8][0]:cols[8][1]]
                keys = fmt.split(b":")
                if k > 1 or key not in keys:
                    plan.append(("absent", k))
                else:
                    plan.append(("rec", t, le, keys.index(key), fmt, line_no))
        p = e + 1
        line_no += 1
    recs = [q for q in plan if q[0] == "rec"]
    parsed = _parse_batch(np.frombuffer(data, dtype=np.uint8, count=cut), n, recs, field, f32, path) if recs else None
    rows: list[np.ndarray] = []
    r = 0
    for q in plan:
        if q[0] == "absent":
            rows.extend(np.full(n, ABSENT, dtype=np.uint16) for _ in range(q[1]))
        else:
            rows.append(parsed[r])
            r += 1
    return rows, line_no


def _parse_batch(src: np.ndarray, n: int, recs: list[tuple], field: str, f32: bool, path: Path) -> np.ndarray:
    """(records, n) uint16 dosages of the records ``recs`` of one chunk (see :func:`_chunk_dosages`)."""
    tabs = np.flatnonzero(src == _TAB)
    colons = np.flatnonzero(src == _COLON)
    out = np.empty((len(recs), n), dtype=np.uint16)
    step = max(1, BATCH_CALLS // max(1, n))
    for b0 in range(0, len(recs), step):
        batch = recs[b0 : b0 + step]
        T = np.array([q[1] for q in batch], dtype=np.int64)
        LE = np.array([q[2] for q in batch], dtype=np.int64)
        i0 = np.searchsorted(tabs, T)
        bad = np.flatnonzero(np.searchsorted(tabs, LE) - i0 != n - 1)
        if len(bad):
            q = batch[int(bad[0])]
            raise InputError(f"{path}: line {q[5]}: expected {n} sample columns")
        S = np.empty((len(batch), n), dtype=np.int64)
        E = np.empty((len(batch), n), dtype=np.int64)
        if n > 1:
            t = tabs[i0[:, None] + np.arange(n - 1)[None, :]]
            S[:, 1:] = t + 1
            E[:, :-1] = t
        S[:, 0] = T
        E[:, -1] = LE
        J = np.repeat(np.array([q[3] for q in batch], dtype=np.int64), n)
        try:
            out[b0 : b0 + len(batch)] = _field_dosages(src, S.ravel(), E.ravel(), J, field, f32, colons).reshape(len(batch), n)
        except ValueError:  # name the line: parse the batch's records one by one
            for q in batch:
                try:
                    record_dosages(src[q[1] : q[2]], n, q[4], field, f32=f32)
                except ValueError as exc:
                    raise InputError(f"{path}: line {q[5]}: {exc}") from None
            raise
    return out
