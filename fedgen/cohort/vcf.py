"""Read VCF/BCF genotypes into an ALT-dosage matrix, fast.

Two paths share one output format (int8 ALT dosage per call: 0, 1, 2, or -1 = missing):

* the **fast path** parses VCF *text* in blocks of whole records with vectorised numpy
  (tab and newline positions, then the three GT characters of every call at once); bgzipped
  input is inflated block-parallel in threads (zlib releases the GIL);
* the **general path** handles any record the fast path cannot (multi-digit allele indices,
  GT not first in FORMAT, odd ploidy) with a per-record Python parser, and BCF input through
  pysam/htslib, whose records are rendered back to VCF text and fed to the same parser.

Genotype semantics follow PLINK 2's VCF import (plink-ng ``plink2_import.cc``: ``VcfToPgen``): phased ``|`` and
unphased ``/`` are the same; a half-call (``./1``) is missing; a haploid call on an autosome
(``1``) counts as a homozygote (2 ALT alleles).

Multi-allelic records are split into biallelic ones exactly as ``bcftools norm -m-any`` does
(without ``-f``: no left-alignment or trimming): a record with ALT ``C,G`` becomes two variants
at the same CHROM/POS/ID, REF>C and REF>G; in each, a call counts the copies of that ALT and
every other ALT allele counts as REF (``1/2`` gives ``0/1`` and ``0/1``, ``2/2`` gives ``0/0`` and
``1/1``), a missing allele stays missing (so a half-call stays a half-call, i.e. missing), and
phase and ploidy are kept. Split records are counted in :class:`ParseStats`.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedgen.errors import InputError

_TAB, _NL, _CR = 9, 10, 13
_COLON, _SLASH, _PIPE, _DOT = 58, 47, 124, 46
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
FIXED_COLUMNS = ("#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT")


@dataclass
class VcfHeader:
    """What the header says: sample IDs in column order and contig lengths (when declared)."""

    samples: list[str]
    contigs: dict[str, int | None]
    meta_lines: int


@dataclass
class RecordBlock:
    """Parsed biallelic records of one chunk (a multi-allelic record gives one per ALT allele).

    ``dosage`` has shape (records, samples), int8, -1 = missing.
    """

    chrom: list[str]
    pos: np.ndarray
    ids: list[str]
    ref: list[str]
    alt: list[str]
    dosage: np.ndarray
    lines: int = 0


@dataclass
class ParseStats:
    """Counts of what the reader met: ``records`` read, ``multiallelic`` records split into
    ``split_variants`` biallelic variants, records that took the general path or have no GT."""

    records: int = 0
    multiallelic: int = 0
    split_variants: int = 0
    general_path: int = 0
    no_gt: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def detect_format(path: Path) -> str:
    """Return ``"bcf"``, ``"bgzf-vcf"``, ``"gzip-vcf"`` or ``"vcf"``; raise InputError otherwise."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a VCF/BCF file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(18)
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror})") from None
    if len(head) == 0:
        raise InputError(f"{path}: file is empty, expected a VCF/BCF file")
    if head[:2] == b"\x1f\x8b":
        bgzf = len(head) >= 16 and head[3] & 4 and head[12:14] == b"BC"
        try:
            with gzip.open(path, "rb") as fh:
                magic = fh.read(5)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt or truncated gzip data ({exc})") from None
        if magic[:3] == b"BCF":
            return "bcf"
        if magic.startswith(b"##") or magic.startswith(b"#CHR"):
            return "bgzf-vcf" if bgzf else "gzip-vcf"
        raise InputError(f"{path}: compressed file is not a VCF or BCF (starts with {magic!r})")
    if head[:3] == b"BCF":
        return "bcf"
    if head.startswith(b"##") or head.startswith(b"#CHROM"):
        return "vcf"
    raise InputError(f"{path}: not a VCF or BCF file (expected '##fileformat=VCF...' header)")


# ----------------------------------------------------------------------------- byte streams


def _bgzf_blocks(path: Path, raw_chunk: int = 2 << 20) -> Iterator[list[memoryview]]:
    """Yield lists of raw deflate payloads (with their expected sizes) from a BGZF file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pending = b""
        offset = 0
        saw_eof = False
        while True:
            data = fh.read(raw_chunk)
            buf = pending + data
            mv = memoryview(buf)
            pos = 0
            batch: list[memoryview] = []
            while pos + 18 <= len(buf):
                if buf[pos] != 0x1F or buf[pos + 1] != 0x8B or buf[pos + 2] != 8 or not buf[pos + 3] & 4:
                    raise InputError(f"{path}: corrupt BGZF block at byte {offset + pos} (not a gzip block header)")
                xlen = struct.unpack_from("<H", buf, pos + 10)[0]
                bsize = None
                x = pos + 12
                xend = x + xlen
                if xend > len(buf):
                    break
                while x + 4 <= xend:
                    si1, si2, slen = buf[x], buf[x + 1], struct.unpack_from("<H", buf, x + 2)[0]
                    if si1 == 66 and si2 == 67 and slen == 2:
                        bsize = struct.unpack_from("<H", buf, x + 4)[0]
                    x += 4 + slen
                if bsize is None:
                    raise InputError(f"{path}: gzip member at byte {offset + pos} is not BGZF")
                end = pos + bsize + 1
                if end > len(buf):
                    break
                saw_eof = buf[pos:end] == BGZF_EOF
                batch.append(mv[pos + 12 + xlen : end])  # deflate data + CRC32 + ISIZE
                pos = end
            if batch:
                yield batch
            offset += pos
            pending = bytes(buf[pos:])
            if not data:
                break
        if pending:
            raise InputError(
                f"{path}: truncated bgzip file: incomplete block at byte {offset} of {size} "
                "(was the file copied completely?)"
            )
        if not saw_eof:
            raise InputError(f"{path}: truncated bgzip file: the BGZF end-of-file marker is missing")


try:  # ISA-L inflates 1.3-2x faster than zlib; same output
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover
    _zlib = zlib  # type: ignore[misc]


def _inflate_block(block: memoryview) -> bytes:
    isize = struct.unpack_from("<I", block, len(block) - 4)[0]
    out = _zlib.decompress(block[:-8], wbits=-15, bufsize=max(isize, 1))
    if len(out) != isize:
        raise zlib.error("block size does not match its header")
    return out


def _inflate_batch(batch: list[memoryview]) -> bytes:
    return b"".join(_inflate_block(b) for b in batch)


def iter_text(path: Path, fmt: str, *, threads: int = 2) -> Iterator[bytes]:
    """Yield the decompressed text of a (bgzipped/gzipped/plain) VCF in chunks."""
    if fmt == "vcf":
        with open(path, "rb") as fh:
            while chunk := fh.read(16 << 20):
                yield chunk
        return
    if fmt == "gzip-vcf":
        d = zlib.decompressobj(wbits=31)
        with open(path, "rb") as fh:
            try:
                while chunk := fh.read(4 << 20):
                    out = d.decompress(chunk)
                    while d.eof and d.unused_data:  # multi-member gzip
                        rest = d.unused_data
                        d = zlib.decompressobj(wbits=31)
                        out += d.decompress(rest)
                    if out:
                        yield out
            except zlib.error as exc:
                raise InputError(f"{path}: corrupt gzip data ({exc})") from None
        if not d.eof:
            raise InputError(f"{path}: truncated gzip file (stream ends before its end marker)")
        return
    # BGZF: inflate blocks in parallel threads; order is kept by map().
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        batches = _bgzf_blocks(path)
        pending = []
        try:
            for batch in batches:
                # split into sub-batches so both threads work on one raw chunk
                step = max(1, len(batch) // max(1, threads))
                futs = [pool.submit(_inflate_batch, batch[i : i + step]) for i in range(0, len(batch), step)]
                pending.append(futs)
                if len(pending) > 1:
                    for f in pending.pop(0):
                        yield f.result()
            for futs in pending:
                for f in futs:
                    yield f.result()
        except (zlib.error, _zlib.error) as exc:
            raise InputError(f"{path}: corrupt bgzip data ({exc})") from None


# ----------------------------------------------------------------------------- header


_CONTIG_RE = re.compile(rb"##contig=<(.*)>")


def parse_header(lines: list[bytes], path: Path) -> VcfHeader:
    """Parse the meta lines and the ``#CHROM`` line."""
    if not lines or not lines[0].startswith(b"##fileformat=VCF"):
        raise InputError(f"{path}: not a VCF file (first line must be '##fileformat=VCFv4.x')")
    contigs: dict[str, int | None] = {}
    for line in lines:
        m = _CONTIG_RE.match(line)
        if m:
            fields = dict(_split_meta(m.group(1).decode("utf-8", "replace")))
            if "ID" in fields:
                length = fields.get("length")
                contigs[fields["ID"]] = int(length) if length and length.isdigit() else None
    last = lines[-1].rstrip(b"\r\n").decode("utf-8", "replace")
    if not last.startswith("#CHROM"):
        raise InputError(f"{path}: VCF header has no '#CHROM' line")
    cols = last.split("\t")
    if tuple(cols[:8]) != FIXED_COLUMNS[:8]:
        raise InputError(f"{path}: malformed '#CHROM' header line (expected tab-separated {' '.join(FIXED_COLUMNS)})")
    samples = cols[9:]
    if len(cols) > 8 and cols[8] != "FORMAT":
        raise InputError(f"{path}: column 9 of the '#CHROM' line must be FORMAT, found {cols[8]!r}")
    if not samples:
        raise InputError(f"{path}: VCF has no sample columns")
    if len(set(samples)) != len(samples):
        dup = sorted({s for s in samples if samples.count(s) > 1})[:5]
        raise InputError(f"{path}: duplicate sample IDs in VCF header: {', '.join(dup)}")
    return VcfHeader(samples=samples, contigs=contigs, meta_lines=len(lines) - 1)


def _split_meta(body: str) -> Iterator[tuple[str, str]]:
    key, val, quoted, cur, in_val = "", "", False, [], False
    for ch in body + ",":
        if ch == '"':
            quoted = not quoted
        elif ch == "=" and not in_val and not quoted:
            key, cur, in_val = "".join(cur), [], True
        elif ch == "," and not quoted:
            val = "".join(cur)
            yield key.strip(), val.strip().strip('"')
            cur, in_val = [], False
        else:
            cur.append(ch)


# ----------------------------------------------------------------------------- records


_FIXED_RE = re.compile(rb"([^\t\n]*)\t([^\t\n]*)\t([^\t\n]*)\t([^\t\n]*)\t([^\t\n]*)\t[^\t\n]*\t[^\t\n]*\t[^\t\n]*\t([^\t\n]*)\t")
# allele character -> allele index: '0'..'9' -> 0..9, '.' -> -1 (missing), other -> 99 (invalid)
_IDX = np.full(256, 99, dtype=np.int16)
_IDX[ord("0") : ord("9") + 1] = np.arange(10)
_IDX[_DOT] = -1


def _expand(a0: np.ndarray, a1: np.ndarray, k: int) -> np.ndarray:
    """ALT dosages (k, samples) int8 of a record with ``k`` ALT alleles from its calls' two allele
    indices (-1 = missing; a haploid call passes its allele twice, a homozygote as PLINK counts
    it): row ``j`` counts copies of ALT ``j + 1``, the other ALTs count as REF (``bcftools norm
    -m-any``); a call with a missing allele is missing in every row."""
    miss = (a0 < 0) | (a1 < 0)
    out = np.empty((k,) + a0.shape, dtype=np.int8)
    for j in range(1, k + 1):
        d = (a0 == j).astype(np.int8)
        d += a1 == j
        d[miss] = -1
        out[j - 1] = d
    return out


def parse_records(
    chunk: bytes,
    n_samples: int,
    *,
    first_line: int,
    path: Path,
    stats: ParseStats,
    start: int = 0,
    end: int | None = None,
) -> RecordBlock:
    """Parse a chunk of whole VCF data lines into biallelic dosages.

    Per record, a regex finds the fixed columns; genotype calls are decoded with numpy: all
    records whose calls are fixed-width (``0/1``, ``1|1``, ``./.``) are copied into one
    (records, samples, 4) byte array and decoded at once; other records are split on tabs
    with numpy; anything unusual takes the per-record general path. A multi-allelic record
    gives one output row per ALT allele (split as ``bcftools norm -m-any`` does), counted in
    ``stats``.
    """
    n = n_samples
    chrom: list[str] = []
    pos: list[int] = []
    ids: list[str] = []
    ref: list[str] = []
    alt: list[str] = []
    fixed_rows: list[tuple[int, int, int]] = []  # (first output row, region start, ALT count)
    other_rows: list[tuple[int, int, int, bool, int]] = []  # (row, region start, region end, gt_first, ALT count)
    p = start
    end_all = len(chunk) if end is None else end
    line_no = first_line
    width = 4 * n - 1
    match = _FIXED_RE.match
    find = chunk.find
    while p < end_all:
        e = find(b"\n", p)
        if e < 0:
            e = end_all
        le = e - 1 if e > p and chunk[e - 1] == _CR else e
        if le <= p:  # blank line
            p = e + 1
            line_no += 1
            continue
        m = match(chunk, p, le)
        if m is None:
            ncol = chunk.count(b"\t", p, le) + 1
            raise InputError(
                f"{path}: line {line_no}: expected {9 + n} tab-separated columns (9 fixed + {n} samples), found {ncol}"
            )
        stats.records += 1
        a = m.group(5).decode()
        try:
            position = int(m.group(2))
        except ValueError:
            raise InputError(f"{path}: line {line_no}: POS {m.group(2)[:20]!r} is not an integer") from None
        row = len(pos)
        if "," in a:  # split as bcftools norm -m-any: one record per ALT, same CHROM/POS/ID/REF
            alts = a.split(",")
            stats.multiallelic += 1
            stats.split_variants += len(alts)
        else:
            alts = [a]
        k = len(alts)
        c, i, r = m.group(1).decode(), m.group(3).decode(), m.group(4).decode()
        chrom.extend([c] * k)
        pos.extend([position] * k)
        ids.extend([i] * k)
        ref.extend([r] * k)
        alt.extend(alts)
        fmt = m.group(6)
        s0 = m.end()
        gt_first = fmt[:2] == b"GT" and (len(fmt) == 2 or fmt[2] == _COLON)
        if gt_first and le - s0 == width:
            fixed_rows.append((row, s0, k))
        else:
            if not gt_first and b"GT" not in fmt.split(b":"):
                stats.no_gt += 1
            other_rows.append((row, s0, le, gt_first, k))
        p = e + 1
        line_no += 1
    dosage = np.full((len(pos), n), -1, dtype=np.int8)
    slow: list[tuple[int, int, int, int]] = []
    if fixed_rows and n:
        from fedgen.stats import kernel

        done = kernel.decode_gt(chunk, np.array([s0 for _, s0, _ in fixed_rows], dtype=np.int64),
                                np.array([r for r, _, _ in fixed_rows], dtype=np.int64),
                                np.array([k for _, _, k in fixed_rows], dtype=np.int64), dosage)
        if done is not None:  # the compiled decoder: the records it could not take go the general way
            for j in np.flatnonzero(~done).tolist():
                r, s0, k = fixed_rows[j]
                other_rows.append((r, s0, s0 + width, True, k))
            fixed_rows = []
    if fixed_rows:
        buf = np.empty((len(fixed_rows), n, 4), dtype=np.uint8)
        flat = buf.reshape(len(fixed_rows), 4 * n)
        src = np.frombuffer(chunk, dtype=np.uint8)
        for j, (_, s0, _) in enumerate(fixed_rows):
            flat[j, :width] = src[s0 : s0 + width]
        flat[:, width] = _TAB
        sep = buf[:, :, 1]
        ok = (buf[:, :, 3] == _TAB) & ((sep == _SLASH) | (sep == _PIPE))
        a0 = _IDX[buf[:, :, 0]]
        a1 = _IDX[buf[:, :, 2]]
        rows = np.fromiter((r for r, _, _ in fixed_rows), dtype=np.int64, count=len(fixed_rows))
        nalt = np.fromiter((k for _, _, k in fixed_rows), dtype=np.int16, count=len(fixed_rows))
        ok &= (a0 <= nalt[:, None]) & (a1 <= nalt[:, None])
        row_ok = ok.all(axis=1)
        miss = (a0 < 0) | (a1 < 0)
        for j in range(1, int(nalt[row_ok].max(initial=0)) + 1):  # ALT j of every record that has it
            sel = row_ok & (nalt >= j)
            if sel.all():
                d = (a0 == j).astype(np.int8)
                d += a1 == j
                d[miss] = -1
            else:
                d = (a0[sel] == j).astype(np.int8)
                d += a1[sel] == j
                d[miss[sel]] = -1
            dosage[rows[sel] + (j - 1)] = d
        for j in np.flatnonzero(~row_ok).tolist():
            r, s0, k = fixed_rows[j]
            other_rows.append((r, s0, s0 + width, True, k))
    for r, s0, s1, gt_first, k in other_rows:
        got = _parse_split(chunk, s0, s1, n, k) if gt_first else None
        if got is None:
            slow.append((r, s0, s1, k))
        else:
            dosage[r : r + k] = got
    for r, s0, s1, k in slow:
        stats.general_path += 1
        line_start = chunk.rfind(b"\n", 0, s0) + 1
        fmt_text = chunk[line_start:s0].split(b"\t")[8]
        line_no_r = first_line + chunk.count(b"\n", start, s0)
        dosage[r : r + k] = _parse_general(fmt_text, chunk[s0:s1], n, k, path=path, line_no=line_no_r, stats=stats)
    blk = RecordBlock(chrom=chrom, pos=np.asarray(pos, dtype=np.int64), ids=ids, ref=ref, alt=alt, dosage=dosage)
    blk.lines = line_no - first_line
    return blk


def _parse_split(chunk: bytes, s0: int, s1: int, n: int, k: int = 1) -> np.ndarray | None:
    """GT-first record (``k`` ALT alleles) with any field widths: split calls on tabs with numpy;
    (k, n) dosages, or None when a call is unusual (multi-digit allele, polyploid, ...)."""
    r = np.frombuffer(chunk, dtype=np.uint8, count=s1 - s0, offset=s0)
    tabs = np.flatnonzero(r == _TAB)
    if len(tabs) != n - 1:
        return None
    S = np.empty(n, dtype=np.int64)
    S[0] = 0
    S[1:] = tabs + 1
    E = np.empty(n, dtype=np.int64)
    E[:-1] = tabs
    E[-1] = len(r)
    flen = E - S
    pad = np.concatenate([r, np.zeros(4, dtype=np.uint8)])
    c0, c1, c2, c3 = pad[S], pad[S + 1], pad[S + 2], pad[S + 3]
    dip = ((c1 == _SLASH) | (c1 == _PIPE)) & ((flen == 3) | (c3 == _COLON))
    hap = (flen == 1) | (c1 == _COLON)
    v0 = _IDX[c0]
    v2 = _IDX[c2]
    ok = (dip & (v0 <= k) & (v2 <= k)) | (hap & (v0 <= k))
    if not ok.all():
        return None
    return _expand(v0, np.where(dip, v2, v0), k)  # a haploid call counts as a homozygote


def _empty_block(n: int) -> RecordBlock:
    return RecordBlock([], np.empty(0, np.int64), [], [], [], np.empty((0, n), np.int8))


def _parse_general(fmt_text: bytes, calls: bytes, n_samples: int, k: int = 1, *, path: Path, line_no: int,
                   stats: ParseStats | None = None) -> np.ndarray:
    """Parse one record with ``k`` ALT alleles and any FORMAT layout (per-record path) into
    (k, samples) dosages, split as :func:`_expand` does.

    A call fedgen cannot use (more than two alleles, e.g. ``1/1/1``) counts as missing and as an
    ``unusable_calls`` in ``stats``; it does not stop the read."""
    fmt = fmt_text.decode("utf-8", "replace").split(":")
    a0 = np.full(n_samples, -1, dtype=np.int16)
    a1 = np.full(n_samples, -1, dtype=np.int16)
    if "GT" not in fmt:
        return _expand(a0, a1, k)
    gi = fmt.index("GT")
    fields = calls.decode("utf-8", "replace").split("\t")
    if len(fields) != n_samples:
        raise InputError(f"{path}: line {line_no}: expected {n_samples} sample columns, found {len(fields)}")
    for s, field_ in enumerate(fields):
        parts = field_.split(":")
        gt = parts[gi] if gi < len(parts) else "."
        alleles = re.split(r"[/|]", gt)
        if any(a in (".", "") for a in alleles):
            continue
        try:
            idx = [int(a) for a in alleles]
        except ValueError:
            raise InputError(f"{path}: line {line_no}: malformed GT {gt!r} in sample column {s + 1}") from None
        if any(a > k or a < 0 for a in idx):
            raise InputError(
                f"{path}: line {line_no}: GT {gt!r} in sample column {s + 1} names allele "
                f"{max(idx)} but the record has only {'one ALT allele' if k == 1 else f'{k} ALT alleles'}"
            )
        if len(idx) == 1:  # haploid: a homozygote
            a0[s] = a1[s] = idx[0]
        elif len(idx) == 2:
            a0[s], a1[s] = idx
        elif stats is not None:  # polyploid: missing, and counted
            stats.extra["unusable_calls"] = stats.extra.get("unusable_calls", 0) + 1
    return _expand(a0, a1, k)


# ----------------------------------------------------------------------------- whole files


def read_vcf(path: Path, *, threads: int = 2) -> tuple[VcfHeader, Iterator[RecordBlock], ParseStats]:
    """Open a VCF/BCF and return its header and an iterator of parsed record blocks."""
    path = Path(path)
    fmt = detect_format(path)
    stats = ParseStats()
    if fmt == "bcf":
        header, text = _bcf_text(path)
    else:
        header, text = _split_header(iter_text(path, fmt, threads=threads), path)

    def blocks() -> Iterator[RecordBlock]:
        line_no = header.meta_lines + 2
        carry = b""
        for chunk in text:
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1
            pos = 0
            while pos < cut:  # bounded pieces of whole lines
                stop = data.find(b"\n", min(pos + (32 << 20), cut - 1)) + 1 or cut
                blk = parse_records(data, len(header.samples), first_line=line_no, path=path, stats=stats, start=pos, end=stop)
                line_no += blk.lines
                pos = stop
                yield blk
            carry = data[cut:]
        if carry.strip():
            blk = parse_records(carry + b"\n", len(header.samples), first_line=line_no, path=path, stats=stats)
            yield blk

    return header, blocks(), stats


def read_vcfs(paths: list[Path], *, threads: int = 2) -> tuple[VcfHeader, Iterator[RecordBlock], ParseStats]:
    """Several VCF/BCF files of one cohort (e.g. one per chromosome) read as one: every file must
    hold the same samples in the same order; contig lengths are merged (a contig declared with two
    lengths is an error). Records come file by file, in the order given."""
    if len(paths) == 1:
        return read_vcf(paths[0], threads=threads)
    opened = [read_vcf(p, threads=threads) for p in paths]
    first = opened[0][0]
    contigs: dict[str, int | None] = {}
    for p, (h, _, _) in zip(paths, opened):
        if h.samples != first.samples:
            raise InputError(f"{p}: its samples differ from {paths[0].name}'s (files of one site must hold the same "
                             "samples in the same order)")
        for c, n in h.contigs.items():
            if n and contigs.get(c) and contigs[c] != n:
                raise InputError(f"{p}: contig {c} has length {n}, but {contigs[c]} in another file of this site")
            contigs[c] = n or contigs.get(c)
    stats = ParseStats()

    def blocks() -> Iterator[RecordBlock]:
        for _, it, st in opened:
            yield from it
            for k in ("records", "multiallelic", "split_variants", "general_path", "no_gt"):
                setattr(stats, k, getattr(stats, k) + getattr(st, k))
            for k, v in st.extra.items():
                stats.extra[k] = stats.extra.get(k, 0) + v

    return VcfHeader(samples=first.samples, contigs=contigs, meta_lines=first.meta_lines), blocks(), stats


def _split_header(text: Iterator[bytes], path: Path) -> tuple[VcfHeader, Iterator[bytes]]:
    """Consume the header lines from a byte stream; return the header and the rest of the stream."""
    buf = b""
    body_start = -1
    for chunk in text:
        buf += chunk
        i = buf.find(b"\n#CHROM")
        if buf.startswith(b"#CHROM"):
            i = -1
        j = buf.find(b"\n", i + 1)
        if (i >= 0 or buf.startswith(b"#CHROM")) and j >= 0:
            body_start = j + 1
            break
        if len(buf) > (256 << 20):
            break
        if not buf.startswith(b"#"):
            break
    if body_start < 0:
        if not buf.startswith(b"##fileformat=VCF"):
            raise InputError(f"{path}: not a VCF file (first line must be '##fileformat=VCFv4.x')")
        raise InputError(f"{path}: VCF header has no '#CHROM' line (file empty or truncated?)")
    lines = buf[:body_start].splitlines(keepends=True)
    header = parse_header(lines, path)
    rest = buf[body_start:]

    def body() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from text

    return header, body()


def _bcf_text(path: Path) -> tuple[VcfHeader, Iterator[bytes]]:
    """Read BCF through htslib and render records as VCF text for the vectorised parser."""
    import pysam

    pysam.set_verbosity(0)  # no "could not retrieve index" noise for unindexed BCF
    try:
        vf = pysam.VariantFile(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot open BCF ({exc})") from None
    lines = str(vf.header).encode().splitlines(keepends=True)
    header = parse_header(lines, path)

    def body() -> Iterator[bytes]:
        buf: list[str] = []
        size = 0
        it = iter(vf)
        while True:
            try:
                rec = next(it, None)
            except (OSError, ValueError) as exc:
                vf.close()
                raise InputError(f"{path}: corrupt or truncated BCF ({exc})") from None
            if rec is None:
                break
            s = str(rec)
            buf.append(s)
            size += len(s)
            if size > (8 << 20):
                yield "".join(buf).encode()
                buf, size = [], 0
        vf.close()
        if buf:
            yield "".join(buf).encode()

    return header, body()


def file_fingerprint(path: Path) -> dict[str, int | str]:
    """Identity of a file's current content for cache keys: path, size, mtime."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
