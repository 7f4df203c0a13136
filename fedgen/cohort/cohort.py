"""A site's cohort: cached genotype matrix, variant table and the matched samples table.

The genotype cache lives in the site's state folder (``<state_dir>/cache``) and is reused
while the VCF's path, size and modification time are unchanged. It is written to a temporary
folder and renamed into place, so an interrupted ingest never leaves a half cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedgen.cohort.contigs import autosome_number, harmonise_contig
from fedgen.cohort.samples import SamplesTable, read_samples_table
from fedgen.cohort.vcf import file_fingerprint
from fedgen.errors import FedgenError, InputError

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 2: unusable (polyploid) calls counted; 3: multi-allelic records split (bcftools norm -m-any);
# 4: dosage store (dosage.u16) for inputs with imputed dosages


@dataclass
class Cohort:
    """One site's data, ready for analyses.

    ``dosage`` is (variants, VCF samples) int8 ALT dosage, -1 = missing, memory-mapped.
    ``sample_cols`` are the VCF columns of the analysed samples (those in both the VCF and the
    samples table), in VCF order; ``table_rows`` are their rows in the samples table.
    """

    site: str
    vcf: Path
    chrom: np.ndarray
    pos: np.ndarray
    ids: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    dosage: np.ndarray
    vcf_samples: list[str]
    contigs: dict[str, int | None]
    table: SamplesTable
    sample_cols: np.ndarray
    table_rows: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)
    #: (variants, VCF samples) uint16 ALT dosages in 1/16384 units (65535 = missing), memory-mapped;
    #: None when the input carries no dosages (see :mod:`fedgen.cohort.dosage`)
    dosage16: np.ndarray | None = None
    #: memory (MB) for the per-variant work reused across IRLS rounds (fedgen.analyses.rowcache)
    row_cache_mb: float = 256.0
    #: threads for block work (0 = every core; fedgen.analyses.threads)
    threads: int = 0

    @property
    def n_samples(self) -> int:
        return len(self.sample_cols)

    def sample_values(self, column: str, *, numeric: bool = True) -> np.ndarray:
        """Samples-table column for the analysed samples, aligned to ``sample_cols``."""
        if numeric:
            return self.table.numeric(column)[self.table_rows]
        return np.asarray(self.table.require(column), dtype=object)[self.table_rows]

    def block(self, idx: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
        """Dosages of variants ``idx`` for the analysed samples, (len(idx), n_samples) int8.

        ``flip`` marks variants whose REF/ALT are swapped relative to the study's alleles.
        """
        g = read_rows(self.dosage, np.asarray(idx, dtype=np.int64))
        if len(self.sample_cols) != g.shape[1] or not self._all_cols:
            g = g.take(self.sample_cols, axis=1)  # C order: a[:, idx] is column-major and halves later passes
        if flip is not None and np.any(flip):
            f = np.asarray(flip, dtype=bool)
            sub = g[f]
            g[f] = np.where(sub < 0, sub, 2 - sub)
        return g

    def require_dosages(self) -> np.ndarray:
        """The dosage store, or a one-line error when the site's genotypes carry no dosages."""
        if self.dosage16 is None:
            raise FedgenError(f"study.dosage: this site's genotypes ({self.vcf.name}) carry no imputed dosages (FORMAT "
                              "DS or GP in a VCF/BCF, dosages in a .pgen); run the study without study.dosage")
        return self.dosage16

    def dosage_block(self, idx: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
        """Imputed dosages of variants ``idx`` for the analysed samples, (len(idx), n_samples)
        float64 in multiples of 1/16384 (as PLINK 2 stores them), NaN = missing."""
        from fedgen.cohort.dosage import to_float

        return to_float(self._dosage_rows(idx), flip)

    def dosage_hardcalls(self, idx: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
        """Hard calls derived from the dosages as PLINK 2 does (``--hard-call-threshold`` 0.1),
        int8 like :meth:`block`."""
        from fedgen.cohort.dosage import to_hardcalls

        return to_hardcalls(self._dosage_rows(idx), flip)

    def _dosage_rows(self, idx: np.ndarray) -> np.ndarray:
        u = read_rows(self.require_dosages(), np.asarray(idx, dtype=np.int64))
        if len(self.sample_cols) != u.shape[1] or not self._all_cols:
            u = u.take(self.sample_cols, axis=1)
        return u

    @property
    def _all_cols(self) -> bool:
        return len(self.sample_cols) == len(self.vcf_samples) and bool(
            np.all(self.sample_cols == np.arange(len(self.vcf_samples)))
        )


def read_rows(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a (variants, samples) matrix, as a new in-memory array.

    For the memory-mapped genotype cache the rows are read with ``os.preadv`` (one call per run
    of consecutive rows) instead of through the mapping: pages read through a mapping stay
    mapped into the process and count in its resident memory, so a site that swept its whole
    cache would peak at the cache's size. Read this way, a site's resident memory is its
    current block's, whatever the number of variants (issue: bounded memory per site).
    """
    filename = getattr(matrix, "filename", None)
    if not isinstance(matrix, np.memmap) or filename is None or not hasattr(os, "preadv"):
        return np.asarray(matrix[idx])
    n_rows, width = matrix.shape
    out = np.empty((idx.size, width), dtype=matrix.dtype)
    if idx.size == 0:
        return out
    if idx.min() < 0 or idx.max() >= n_rows:
        raise IndexError(f"variant index out of range 0..{n_rows - 1}")
    row_bytes = width * matrix.dtype.itemsize
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks]).tolist()
    ends = np.concatenate([breaks, [idx.size]]).tolist()
    fd = os.open(filename, os.O_RDONLY)
    try:
        for a, b in zip(starts, ends):
            view = memoryview(out[a:b]).cast("B")
            off = int(matrix.offset) + int(idx[a]) * row_bytes
            done = 0
            while done < view.nbytes:  # preadv may return short reads
                n = os.preadv(fd, [view[done:]], off + done)
                if n <= 0:
                    raise OSError(f"genotype cache {filename} is shorter than its index says")
                done += n
    finally:
        os.close(fd)
    return out


_COHORTS: dict[str, Cohort] = {}

#: node-config keys that name a site's genotypes (exactly one is given)
GENOTYPE_KEYS = ("vcf", "pgen", "bed")


def genotype_fingerprint(node_config: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The site's genotype file (a VCF/BCF, or a fileset's .pgen/.bed) and the fingerprint its
    genotype cache is keyed by (for a fileset: all three files). Raises InputError."""
    given = [k for k in GENOTYPE_KEYS if node_config.get(k)]
    if not given:
        raise InputError("site configuration has no genotype input: give one of 'vcf', 'pgen' (PLINK 2 fileset "
                         "prefix) or 'bed' (PLINK 1 fileset prefix)")
    if len(given) > 1:
        raise InputError(f"site configuration gives several genotype inputs ({', '.join(given)}); give one")
    kind = given[0]
    if kind == "vcf":
        files = vcf_files(str(node_config["vcf"]))
        if len(files) == 1:
            return files[0], dict(file_fingerprint(files[0]))
        return files[0], {**file_fingerprint(files[0]), "files": [file_fingerprint(f) for f in files[1:]]}
    from fedgen.cohort.plinkfiles import fileset_paths

    files = fileset_paths(str(node_config[kind]), kind)
    return files[0], {**file_fingerprint(files[0]), "kind": kind, "files": [file_fingerprint(f) for f in files[1:]]}


def _natural_key(path: Path) -> list[Any]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def vcf_files(spec: str) -> list[Path]:
    """The VCF/BCF files of a site: one path, a glob (``/data/hk/chr*.vcf.gz``, natural order:
    chr2 before chr10) or several paths, one per line (a YAML list in a sites file)."""
    import glob

    out: list[Path] = []
    for item in [x.strip() for x in str(spec).splitlines() if x.strip()]:
        p = Path(item).expanduser()
        if any(ch in item for ch in "*?["):
            hits = sorted((Path(h) for h in glob.glob(str(p))), key=_natural_key)
            if not hits:
                raise InputError(f"{item}: no VCF/BCF file matches this pattern")
            out += hits
        else:
            if not p.exists():
                raise InputError(f"{p}: VCF/BCF file not found")
            out.append(p)
    if not out:
        raise InputError("site configuration: 'vcf' names no file")
    dup = {str(p.resolve()) for p in out if sum(q.resolve() == p.resolve() for q in out) > 1}
    if dup:
        raise InputError(f"the site's VCF list names a file twice: {', '.join(sorted(dup))}")
    return out


def cache_dir(state: Path, fp: Mapping[str, Any]) -> Path:
    """Where the genotype cache of fingerprint ``fp`` lives under a state folder."""
    path_tag = hashlib.sha256(str(fp["path"]).encode()).hexdigest()[:12]
    return state / "cache" / f"{path_tag}-{_cache_key(fp)}"


def genotype_input(node_config: Mapping[str, Any]) -> Path | None:
    """The path a site's genotypes are given by (its first VCF/BCF file or pattern, or a PLINK
    fileset prefix), or None; its folder holds the default state folder."""
    for key in GENOTYPE_KEYS:
        if node_config.get(key):
            first = next((x.strip() for x in str(node_config[key]).splitlines() if x.strip()), "")
            return Path(first).expanduser() if first else None
    return None


def default_state_dir(vcf: Path) -> Path:
    return Path(vcf).resolve().parent / "fedgen-state"


def load_cohort(node_config: Mapping[str, Any], *, progress: bool = False) -> Cohort:
    """Load (and cache) the cohort described by a site's node config.

    Keys: ``site``, one genotype input (``vcf``: a VCF/BCF file, a glob or one path per line,
    e.g. per-chromosome files; ``pgen``: a PLINK 2 fileset
    prefix; ``bed``: a PLINK 1 fileset prefix), ``samples``, optional ``state_dir``.
    """
    site = str(node_config.get("site") or "site")
    vcf, fp = genotype_fingerprint(node_config)
    if not node_config.get("samples"):
        raise InputError("site configuration has no 'samples' path")
    samples = Path(str(node_config["samples"])).expanduser()
    state = Path(str(node_config.get("state_dir") or default_state_dir(vcf))).expanduser()
    if not samples.exists():
        raise InputError(f"{samples}: samples table not found")
    sp = file_fingerprint(samples)
    memo_key = json.dumps([site, fp, sp, str(state)], sort_keys=True)
    budget, threads = _row_cache_mb(node_config), _threads(node_config)
    hit = _COHORTS.get(memo_key)
    if hit is not None:
        hit.row_cache_mb, hit.threads = budget, threads
        return hit
    geno = _load_or_build_cache(vcf, state, fp, progress=progress)
    table = read_samples_table(samples)
    cohort = _match(site, vcf, geno, table)
    while len(_COHORTS) >= 8:  # keep memory bounded (in-process runs hold several sites)
        _COHORTS.pop(next(iter(_COHORTS)))
    cohort.row_cache_mb, cohort.threads = budget, threads
    _COHORTS[memo_key] = cohort
    return cohort


def _threads(node_config: Mapping[str, Any]) -> int:
    """The site's ``threads`` for block work (0 or unset: every core the process may use)."""
    raw = node_config.get("threads")
    if raw is None or str(raw).strip() == "":
        return 0
    try:
        n = int(str(raw).strip())
    except ValueError:
        n = -1
    if not 0 <= n <= 4096:
        raise InputError(f"threads = {raw!r}: give a whole number of threads (0 = every core)")
    return n


def _row_cache_mb(node_config: Mapping[str, Any]) -> float:
    """The site's ``row_cache_mb`` (memory for per-variant work reused across IRLS rounds)."""
    from fedgen.analyses.rowcache import DEFAULT_BUDGET_MB

    raw = node_config.get("row_cache_mb")
    if raw is None or str(raw).strip() == "":
        return float(DEFAULT_BUDGET_MB)
    try:
        mb = float(raw)
    except (TypeError, ValueError):
        mb = -1.0
    if not (0.0 <= mb <= 1 << 20):
        raise InputError(f"row_cache_mb = {raw!r}: give a number of megabytes (0 turns the memo off)")
    return mb


def _cache_key(fp: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **fp}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _load_or_build_cache(vcf: Path, state: Path, fp: Mapping[str, Any], *, progress: bool) -> dict[str, Any]:
    cache_root = state / "cache"
    path_tag = hashlib.sha256(str(fp["path"]).encode()).hexdigest()[:12]
    final = cache_dir(state, fp)
    if (final / "meta.json").exists():
        try:
            return _open_cache(final)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("genotype cache %s unreadable (%s); rebuilding", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{state}: cannot create the site's state folder ({exc.strerror})") from None
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_root))
    try:
        _build_cache(vcf, tmp, fp, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in cache_root.glob(f"{path_tag}-*"):  # older caches of the same file
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return _open_cache(final)


def _build_cache(vcf: Path, out: Path, fp: Mapping[str, Any], *, progress: bool) -> None:
    t0 = time.perf_counter()
    if fp.get("kind") in ("pgen", "bed"):
        from fedgen.cohort.plinkfiles import read_fileset

        header, blocks, stats = read_fileset(vcf, str(fp["kind"]))
    else:
        from fedgen.cohort.vcf import read_vcfs

        header, blocks, stats = read_vcfs([vcf, *(Path(f["path"]) for f in fp.get("files", []))])
    n = len(header.samples)
    chrom: list[str] = []
    pos: list[np.ndarray] = []
    ids: list[str] = []
    ref: list[str] = []
    alt: list[str] = []
    n_var = 0
    meter = None
    if progress:
        from fedgen.progress import Progress

        meter = Progress(f"reading {vcf.name}", None, unit="variants", logger=log)
    with open(out / "dosage.i8", "wb") as fh:
        for blk in blocks:
            chrom.extend(blk.chrom)
            pos.append(blk.pos)
            ids.extend(blk.ids)
            ref.extend(blk.ref)
            alt.extend(blk.alt)
            fh.write(np.ascontiguousarray(blk.dosage).tobytes())
            n_var += len(blk.pos)
            if meter is not None:
                meter.update(n_var)
    if n_var == 0:
        raise InputError(f"{vcf}: VCF has no biallelic variant records ({stats.records} records read)")
    dosage_field = _build_dosage_store(vcf, out, fp, n_var, n)
    np.savez(
        out / "variants.npz",
        chrom=np.asarray(chrom),
        pos=np.concatenate(pos),
        ids=np.asarray(ids),
        ref=np.asarray(ref),
        alt=np.asarray(alt),
    )
    meta = {
        "version": CACHE_VERSION,
        "fingerprint": dict(fp),
        "samples": header.samples,
        "contigs": header.contigs,
        "n_variants": n_var,
        "stats": {
            "records": stats.records,
            "multiallelic_split": stats.multiallelic,  # records split (was multiallelic_skipped: records skipped)
            "split_variants": stats.split_variants,  # the biallelic variants they gave
            "general_path_records": stats.general_path,
            "records_without_gt": stats.no_gt,
            "unusable_calls": int(stats.extra.get("unusable_calls", 0)),
            "dosage_store": int(dosage_field is not None),  # imputed dosages kept (dosage.u16)
        },
        "dosage_field": dosage_field,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "meta.json").write_text(json.dumps(meta))
    log.info(
        "%s: cached %d variants x %d samples in %.1f s (%d multi-allelic records split into %d variants)",
        vcf.name, n_var, n, meta["seconds"], stats.multiallelic, stats.split_variants,
    )


def _open_cache(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "meta.json").read_text())
    v = np.load(path / "variants.npz")
    n = len(meta["samples"])
    dosage = np.memmap(path / "dosage.i8", dtype=np.int8, mode="r", shape=(meta["n_variants"], n))
    dosage16 = None
    if meta.get("dosage_field"):
        dosage16 = np.memmap(path / "dosage.u16", dtype=np.uint16, mode="r", shape=(meta["n_variants"], n))
    return {"meta": meta, "variants": {k: v[k] for k in v.files}, "dosage": dosage, "dosage16": dosage16}


def _build_dosage_store(vcf: Path, out: Path, fp: Mapping[str, Any], n_var: int, n: int) -> str | None:
    """Write ``dosage.u16`` beside the hard calls when the input carries imputed dosages: a VCF/BCF
    whose header declares FORMAT DS (else GP), or a .pgen with dosages (kept only if some dosage
    differs from its hard call). Streams in blocks; a call without a DS/GP value takes its GT dosage.
    Returns the source (``"DS"``, ``"GP"``, ``"pgen"``) or None (no store)."""
    from fedgen.cohort import dosage as ds

    kind = fp.get("kind")
    if kind == "bed":
        return None
    if kind == "pgen":
        from fedgen.cohort.plinkfiles import read_fileset_dosages

        source: str | None = "pgen"
        blocks = read_fileset_dosages(vcf)
    else:
        paths = [vcf, *(Path(f["path"]) for f in fp.get("files", []))]
        fields = [ds.vcf_dosage_field(p) for p in paths]
        if not any(fields):
            return None
        source = "DS" if "DS" in fields else "GP"
        blocks = ds.read_vcf_dosages(paths, fields)
    hard = np.memmap(out / "dosage.i8", dtype=np.int8, mode="r", shape=(n_var, n))
    differs = False
    row = 0
    with open(out / "dosage.u16", "wb") as fh:
        for blk in blocks:
            gt = ds.from_hardcalls(read_rows(hard, np.arange(row, min(row + len(blk), n_var))))
            if gt.shape != blk.shape:
                raise InputError(f"{vcf}: dosages and genotype calls disagree on the number of variants")
            u = np.where(blk == ds.ABSENT, gt, blk)
            differs = differs or bool(np.any(u != gt))
            fh.write(np.ascontiguousarray(u).tobytes())
            row += len(blk)
    del hard
    if row != n_var:
        raise InputError(f"{vcf}: dosages and genotype calls disagree on the number of variants")
    if kind == "pgen" and not differs:  # hard calls only
        (out / "dosage.u16").unlink()
        return None
    return source


def _match(site: str, vcf: Path, geno: dict[str, Any], table: SamplesTable) -> Cohort:
    meta = geno["meta"]
    vcf_samples: list[str] = meta["samples"]
    pos_in_table = {iid: i for i, iid in enumerate(table.iid)}
    cols = [j for j, s in enumerate(vcf_samples) if s in pos_in_table]
    if not cols:
        # sample IDs stay in the site's own log: this message may travel to the aggregator
        log.warning("%s: samples table IIDs (e.g. %s) and %s samples (e.g. %s) do not overlap", table.path,
                    ", ".join(table.iid[:3]), vcf.name, ", ".join(vcf_samples[:3]))
        raise InputError(
            f"{table.path}: no sample overlap between the samples table's IID column and {vcf.name} "
            "(the site's log shows examples of both)"
        )
    rows = [pos_in_table[vcf_samples[j]] for j in cols]
    var = geno["variants"]
    chrom = np.asarray([harmonise_contig(c) for c in var["chrom"].tolist()])
    contigs_raw: dict[str, int | None] = meta["contigs"]
    contigs = {harmonise_contig(k): v for k, v in contigs_raw.items()}
    counts = {
        "vcf_samples": len(vcf_samples),
        "table_samples": len(table.iid),
        "samples": len(cols),
        "vcf_only_samples": len(vcf_samples) - len(cols),
        "table_only_samples": len(table.iid) - len(cols),
        "variants": int(meta["n_variants"]),
        "autosomal_variants": int(np.count_nonzero([autosome_number(c) > 0 for c in chrom.tolist()])),
        **{k: int(v) for k, v in meta["stats"].items()},
    }
    return Cohort(
        site=site,
        vcf=vcf,
        chrom=chrom,
        pos=var["pos"],
        ids=var["ids"],
        ref=var["ref"],
        alt=var["alt"],
        dosage=geno["dosage"],
        dosage16=geno.get("dosage16"),
        vcf_samples=vcf_samples,
        contigs=contigs,
        table=table,
        sample_cols=np.asarray(cols, dtype=np.int64),
        table_rows=np.asarray(rows, dtype=np.int64),
        counts=counts,
    )
