"""PLINK filesets as site inputs: PLINK 2 (``.pgen/.pvar/.psam``) and PLINK 1 (``.bed/.bim/.fam``).

Both are read with ``pgenlib`` (PLINK 2's own reader, which also reads PLINK 1 ``.bed``) into
the same :class:`~fedgen.cohort.vcf.RecordBlock` stream the VCF reader produces, so a fileset
feeds the same genotype cache, harmonisation and analyses; the same data gives the same
results from VCF, BCF, pgen or bed.

Conventions: hard calls counted as ALT dosage (``-1`` = missing). In a ``.bim`` the 5th column
is ALT (PLINK's A1) and the 6th REF (A2), as PLINK 2 reads it. A ``.pgen`` variant with more
than one ALT (``.pvar`` ``C,G``) is split into one biallelic variant per ALT, as VCF multi-allelic
records are (``bcftools norm -m-any``): each counts the copies of its ALT (pgenlib reads the
count of one allele index), the other ALTs count as REF; the allele counts are taken from the
``.pvar``, as PLINK 2 does. A ``.bim`` allele with a comma is refused (PLINK 1 filesets are
biallelic). Samples are
named by IID (``.psam``: the ``IID`` column; ``.fam``: the 2nd column). ``.pvar`` contig
lengths (``##contig=<ID=…,length=…>``) are kept for the genome-build check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from fedgen.cohort.vcf import ParseStats, RecordBlock, VcfHeader
from fedgen.errors import InputError

#: suffixes of each kind of fileset: genotypes, variants, samples
KINDS = {"pgen": (".pgen", ".pvar", ".psam"), "bed": (".bed", ".bim", ".fam")}
_CONTIG = re.compile(r"##contig=<.*?ID=([^,>]+)(?:.*?length=(\d+))?", re.IGNORECASE)
BLOCK = 4096


def fileset_paths(prefix: str | Path, kind: str) -> tuple[Path, Path, Path]:
    """The three files of a fileset given its prefix (or any one of its files)."""
    p = Path(str(prefix)).expanduser()
    suffixes = KINDS[kind]
    if p.suffix in suffixes:
        p = p.with_suffix("")
    paths = tuple(Path(str(p) + s) for s in suffixes)
    missing = [str(q) for q in paths if not q.exists()]
    if missing:
        raise InputError(f"{kind} fileset {p}: missing {', '.join(missing)}")
    return paths  # type: ignore[return-value]


def _samples(path: Path, kind: str) -> list[str]:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise InputError(f"{path}: no samples")
    if kind == "pgen" and lines[0].startswith("#"):
        head = lines[0].lstrip("#").split()
        if "IID" not in head:
            raise InputError(f"{path}: header has no IID column")
        j = head.index("IID")
        rows = [line.split() for line in lines[1:]]
    else:  # .fam, or a .psam without a header (the .fam layout): FID IID ...
        j = 1
        rows = [line.split() for line in lines]
    bad = [i for i, r in enumerate(rows) if len(r) <= j]
    if bad:
        raise InputError(f"{path}: line {bad[0] + 1} has no IID")
    iids = [r[j] for r in rows]
    dup = sorted({x for x in iids if iids.count(x) > 1}) if len(set(iids)) != len(iids) else []
    if dup:
        raise InputError(f"{path}: {len(dup)} IID(s) appear twice")
    return iids


def _variants(path: Path, kind: str) -> tuple[dict[str, int | None], list[tuple[str, int, str, str, str]]]:
    """(contig lengths, [(chrom, pos, id, ref, alt), ...]) from a .pvar or .bim."""
    contigs: dict[str, int | None] = {}
    out: list[tuple[str, int, str, str, str]] = []
    cols = None
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.startswith("##"):
                m = _CONTIG.match(line)
                if m:
                    contigs[m.group(1)] = int(m.group(2)) if m.group(2) else None
                continue
            f = line.split()
            if not f:
                continue
            if line.startswith("#"):
                cols = [c.lstrip("#") for c in f]
                continue
            try:
                if kind == "bed":  # chrom id cm pos A1(=ALT) A2(=REF)
                    out.append((f[0], int(f[3]), f[1], f[5], f[4]))
                elif cols is None:  # a .pvar without header: the .bim layout
                    out.append((f[0], int(f[3]), f[1], f[5], f[4]))
                else:
                    r = dict(zip(cols, f))
                    out.append((r["CHROM"], int(r["POS"]), r.get("ID", "."), r["REF"], r["ALT"]))
            except (IndexError, KeyError, ValueError):
                raise InputError(f"{path}: line {n} is not a valid variant line") from None
    return contigs, out


def read_fileset(prefix: str | Path, kind: str) -> tuple[VcfHeader, Iterator[RecordBlock], ParseStats]:
    """Open a fileset: (header, biallelic record blocks, stats) as :func:`fedgen.cohort.vcf.read_vcf`."""
    try:
        import pgenlib
    except ImportError:
        raise InputError("reading PLINK filesets needs the 'pgenlib' package (pip install pgenlib)") from None
    geno, var_path, sam_path = fileset_paths(prefix, kind)
    samples = _samples(sam_path, kind)
    contigs, variants = _variants(var_path, kind)
    stats = ParseStats()
    offsets = None  # allele counts from the .pvar (as PLINK 2 passes them), needed for multi-allelic variants
    if kind == "bed":
        bad = next((k for k, v in enumerate(variants) if "," in v[3] or "," in v[4]), None)
        if bad is not None:
            raise InputError(f"{var_path}: variant {bad + 1} ({variants[bad][2]}) has a comma in an allele; a PLINK 1 "
                             "fileset is biallelic (write multi-allelic variants as a .pgen or VCF)")
    elif any("," in v[4] for v in variants):
        offsets = np.zeros(len(variants) + 1, dtype=np.uintp)
        offsets[1:] = np.cumsum([1 + len(v[4].split(",")) for v in variants])
    try:
        if offsets is None:
            reader = pgenlib.PgenReader(str(geno).encode(), raw_sample_ct=len(samples))
        else:  # with the variant count, so pgenlib checks it against the file before taking the offsets
            reader = pgenlib.PgenReader(str(geno).encode(), raw_sample_ct=len(samples), variant_ct=len(variants),
                                        allele_idx_offsets=offsets)
    except Exception as exc:  # noqa: BLE001 - pgenlib raises plain RuntimeError on bad files
        raise InputError(f"{geno}: not a readable {kind} file ({exc})") from None
    n_var = reader.get_variant_ct()
    if n_var != len(variants):
        reader.close()
        raise InputError(f"{geno}: {n_var} variants, but {var_path.name} lists {len(variants)}")
    if reader.get_raw_sample_ct() != len(samples):
        reader.close()
        raise InputError(f"{geno}: {reader.get_raw_sample_ct()} samples, but {sam_path.name} lists {len(samples)}")
    header = VcfHeader(samples=samples, contigs=contigs, meta_lines=0)

    def blocks() -> Iterator[RecordBlock]:
        try:
            buf = np.empty((BLOCK, len(samples)), dtype=np.int8)
            one = np.empty(len(samples), dtype=np.int8)
            for s in range(0, n_var, BLOCK):
                e = min(n_var, s + BLOCK)
                part = variants[s:e]
                stats.records += e - s
                keep = np.array([v[4] not in (".", "*") for v in part], dtype=bool)
                if not keep.any():
                    continue
                out = buf[: e - s]
                reader.read_range(s, e, out)  # copies of ALT 1 (allele index 1)
                nalt = [len(v[4].split(",")) if k else 0 for v, k in zip(part, keep.tolist())]
                rows: list[tuple[str, int, str, str, str]] = []
                pieces: list[np.ndarray] = []
                for j, (v, k) in enumerate(zip(part, nalt)):
                    if k == 0:
                        continue
                    if k == 1:
                        rows.append(v)
                        pieces.append(out[j])
                        continue
                    stats.multiallelic += 1  # split: one variant per ALT, as bcftools norm -m-any
                    stats.split_variants += k
                    for a, alt in enumerate(v[4].split(","), start=1):
                        rows.append((v[0], v[1], v[2], v[3], alt))
                        if a == 1:
                            pieces.append(out[j])
                        else:
                            reader.read(s + j, one, a)  # copies of ALT a; the other alleles count as REF
                            pieces.append(one.copy())
                g = np.stack(pieces) if len(pieces) != e - s else out.copy()
                g[g < 0] = -1  # pgenlib: -9 = missing
                yield RecordBlock(
                    chrom=[r[0] for r in rows], pos=np.array([r[1] for r in rows], dtype=np.int64),
                    ids=[r[2] for r in rows], ref=[r[3] for r in rows], alt=[r[4] for r in rows], dosage=g,
                    lines=e - s,
                )
        finally:
            reader.close()

    return header, blocks(), stats


def read_fileset_dosages(prefix: str | Path) -> Iterator[np.ndarray]:
    """The dosages of a .pgen (pgenlib ``read_dosages_range``; hard calls where a variant stores
    none) as uint16 blocks of 1/16384 units (:mod:`fedgen.cohort.dosage`), row for row as
    :func:`read_fileset` gives variants (a multi-allelic variant: one row per ALT)."""
    import pgenlib

    from fedgen.cohort.dosage import MISSING, UNIT

    geno, var_path, sam_path = fileset_paths(prefix, "pgen")
    n = len(_samples(sam_path, "pgen"))
    _, variants = _variants(var_path, "pgen")
    kw = {}
    if any("," in v[4] for v in variants):
        offsets = np.zeros(len(variants) + 1, dtype=np.uintp)
        offsets[1:] = np.cumsum([1 + len(v[4].split(",")) for v in variants])
        kw = {"variant_ct": len(variants), "allele_idx_offsets": offsets}
    reader = pgenlib.PgenReader(str(geno).encode(), raw_sample_ct=n, **kw)

    def units(d: np.ndarray) -> np.ndarray:
        u = np.floor(d * UNIT + 0.5)
        return np.where(d < 0, MISSING, u).astype(np.uint16)  # pgenlib: -9 = missing

    try:
        buf = np.empty((BLOCK, n), dtype=np.float64)
        one = np.empty(n, dtype=np.float64)
        for s in range(0, len(variants), BLOCK):
            e = min(len(variants), s + BLOCK)
            out = buf[: e - s]
            reader.read_dosages_range(s, e, out)
            if all("," not in v[4] and v[4] not in (".", "*") for v in variants[s:e]):
                yield units(out)
                continue
            rows = []
            for j, v in enumerate(variants[s:e]):
                if v[4] in (".", "*"):
                    continue
                for a in range(1, len(v[4].split(",")) + 1):
                    if a == 1:
                        rows.append(units(out[j]))
                    else:
                        reader.read_dosages(s + j, one, a)
                        rows.append(units(one))
            if rows:
                yield np.stack(rows)
    finally:
        reader.close()
