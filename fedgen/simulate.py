"""Simulated multi-hospital cohorts with realistic genotypes, phenotypes and truth.

:func:`simulate_cohorts` writes one bgzipped, tabix-indexed VCF and one samples
table per site, plus the ground truth (causal variants, per-person ancestry).

Population-genetic model
------------------------
Coalescent with recombination (``msprime.sim_ancestry``, Hudson model) plus
mutations under JC69 (``msprime.sim_mutations``; REF = ancestral nucleotide).
Autosomes ``chr1``..``chr4`` (more are added only if too few common variants
came out) use recombination rate 1e-8 per bp per generation and mutation rate
1.25e-8. Their lengths are proportional to GRCh38 chr1..chr4 and scaled so
that about 3 x ``n_variants`` variants with MAF >= 1 % arise (~3.4 common
variants per kb at these parameters; 2 x 2,000 people and 30,000 variants give
~26 Mb); the surplus is thinned at random, which keeps LD between neighbouring
markers realistic for an array rather than for sequencing. Each contig is
built from independent ``sim_ancestry`` runs of <= 2 Mb laid end to end
(Hudson's algorithm is superlinear in length; LD beyond 2 Mb is nil at these
rates anyway, so a boundary acts like a recombination hotspot).

Demography (diploid sizes, generations before present)::

    ANC  (Ne = 15,000)
     |---- split 230 generations ago (~6.7 ky at 29 y/generation)
    north (Ne = 15,000)     south (Ne = 15,000)          -- Han-like sources
     |  \\                  /  |
     |   adm_<site>  (pulse 30 generations ago, proportions = site mix)

Expected Hudson F_ST between the sources is T/(T + 2 Ne) = 230/30,230 ~ 0.0076
(tskit's ``Fst`` reports roughly half of that, ~0.0035). That is ~50x the PCA
detection threshold 1/sqrt(n_samples * n_snps) for 4,000 people and 30,000
SNPs, so the north/south axis is PC1.

Each site draws 70 % of its people directly from ``north``/``south`` in its
mix (north fraction 1 or 0) and 30 % from its own admixed population
``adm_<site>``; the admixed people's north fraction is measured exactly from
the tree sequences (census at 30.5 generations + ``link_ancestors``), pooled
over all chromosomes. Default mixes: ``hk`` 20 % north / 80 % south, ``sz``
55 % / 45 %; any other site name gets a north share drawn uniformly from
[0.15, 0.85] from the seed and the site name.

Variants written (identical list at every site)
-----------------------------------------------
Every variant with pooled (all sites) MAF >= 1 % (thinned to exactly
``n_variants``), plus ``rare_fraction`` (default 5 %) x ``n_variants`` rarer variants (MAC >= 1). Multi-
allelic sites produced by recurrent mutation (about 0.5 %) are written as-is
(cap 0.75 % of the common ones). Positions are sorted and unique per contig,
IDs are unique random ``rsNNNNNNN`` strings, genotypes are phased ``a|b``.
Missingness: 0.3 % of calls at random are ``.|.``, and 3-5 samples per site
have a 10-20 % missing-call rate.

With ``n_chrx`` (``fedgen simulate --chrx N``) a ``chrX`` contig follows the autosomes:
simulated like them (its own seed streams, so the autosomes are those of the same run
without it), moved past PAR1 (positions from 2,800,001), written diploid for women and
haploid (``0``/``1``/``.``, the first haplotype) for men, by the samples table's ``sex``.
It carries no causal variant.

Phenotypes (``samples.tsv``)
----------------------------
``sex`` (1 male, 2 female), ``age`` (site-specific mean; hk 58, sz 50),
``smoking`` (never/former/current, sex-specific rates),
``T2D`` (0/1, about 30 % overall) from a logistic model::

    logit P = b0 + 0.55 (age-55)/10 + 0.25 male + 0.15 former + 0.30 current
              + 0.70 (1 - north_fraction) + sum_j beta_j (g_j - 2 p_j)

(``b0`` is solved so that pooled prevalence is 0.30), and ``LDL`` (mmol/L)::

    LDL = 2.9 + 0.012 (age-55) - 0.08 male + 0.05 current + 0.25 north_fraction
          + site_offset + sum_j beta_j (g_j - 2 p_j) + N(0, 0.75^2)

Five causal biallelic variants per trait (pooled MAF 5-40 %, >= ~200 kb apart,
disjoint between traits): T2D |log OR| in [log 1.3, log 1.6], LDL |beta| in
[0.1, 0.2] x 0.8 mmol/L (0.1-0.2 SD), random signs. Ancestry confounds both:
south has higher T2D odds and lower LDL, so a pooled association test without
PCs is inflated (lambda_GC clearly > 1). About 2 % of T2D and of LDL values
are ``NA``. Rows are shuffled relative to the VCF; 2-3 rows per site have an
IID absent from the VCF and 2-3 VCF samples have no row.

Truth
-----
``truth/causal.tsv``: trait, CHROM, POS, ID, REF, ALT, effect (per ALT allele:
log odds ratio for T2D, mmol/L for LDL). ``truth/ancestry.tsv``: IID, site,
north_fraction for every VCF sample and every table-only person.
``truth/model.json``: the parameters above.

Everything is driven by ``seed``: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import msprime
import numpy as np
import pysam
import tskit

from fedgen.errors import ConfigError

log = logging.getLogger(__name__)
# msprime logs every sampling step and model run at INFO; fedgen reports its own progress
logging.getLogger("msprime").setLevel(logging.WARNING)

__all__ = ["simulate_cohorts", "DEFAULT_SITES", "DEFAULT_NORTH_SHARE"]

# ---------------------------------------------------------------- parameters
NE = 15_000  # diploid effective size of ANC, north, south
T_SPLIT = 230.0  # generations since north/south split
T_ADMIX = 30.0  # generations since the admixture pulse of each site's admixed pop
T_CENSUS = T_ADMIX + 0.5
MU = 1.25e-8
RECOMB = 1e-8
ADMIXED_SHARE = 0.30  # fraction of each site's people drawn from adm_<site>
OVERSAMPLE = 3.0  # simulate ~3x the common variants needed, then thin at random
MIN_MAF = 0.01
RARE_EXTRA = 0.05  # rare variants written, as a fraction of n_variants
MAX_MULTIALLELIC = 0.0075
SPORADIC_MISSING = 0.003
N_CAUSAL = 5
# GRCh38 autosome lengths (Mb), used only as relative weights / names.
GRCH38_MB = (248.96, 242.19, 198.30, 190.21, 181.54, 170.81, 159.35, 145.14, 138.39,
             133.80, 135.09, 133.28, 114.36, 107.04, 101.99, 90.34, 83.26, 80.37,
             58.62, 64.44, 46.71, 50.82)
N_BASE_CHROMS = 4
SEGMENT_BP = 2_000_000  # independent coalescent runs per contig (LD-free boundaries)

DEFAULT_SITES: Mapping[str, int] = MappingProxyType({"hk": 2000, "sz": 2000})
DEFAULT_NORTH_SHARE: Mapping[str, float] = MappingProxyType({"hk": 0.20, "sz": 0.55})
DEFAULT_AGE_MEAN: Mapping[str, float] = MappingProxyType({"hk": 58.0, "sz": 50.0})

T2D_PREVALENCE = 0.30
T2D_COEF = {"age_per_10y": 0.55, "male": 0.25, "former": 0.15, "current": 0.30,
            "south_fraction": 0.70}
LDL_COEF = {"intercept": 2.9, "age_per_y": 0.012, "male": -0.08, "current": 0.05,
            "north_fraction": 0.25, "residual_sd": 0.75, "sd_unit": 0.8}
SMOKING_P = {1: (0.45, 0.15, 0.40), 2: (0.92, 0.03, 0.05)}  # never, former, current
SMOKING_LEVELS = ("never", "former", "current")

BGZF_BLOCK = 0xFF00  # same uncompressed block size as htslib
BGZF_LEVEL = 4
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
_BIALLELIC = np.array([0, 1], dtype=np.uint8)
MISSING_CODE = 25  # genotype code for '.|.'; called genotypes are a*5 + b
HAPLOID_CODE = 26  # + allele: a male's chrX call 'a'; HAPLOID_CODE + 5 is a missing one '.'
X_OFFSET = 2_800_000  # chrX variants start past PAR1 (GRCh37 ends 2,699,520; GRCh38 2,781,479)
CHUNK = 2048  # variants per VCF text chunk


# ---------------------------------------------------------------- seeding
def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _rng(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(map(_key, names))))


def _msp_seed(seed: int, *names: str) -> int:
    state = np.random.SeedSequence(seed, spawn_key=tuple(map(_key, names))).generate_state(1)
    return int(state[0]) % (2**31 - 2) + 1


# ---------------------------------------------------------------- BGZF output
class _BgzfWriter:
    """Deterministic BGZF writer (zlib raw deflate in worker threads, htslib-compatible
    blocks of 0xff00 input bytes, EOF marker). Compression overlaps the caller's work."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor) -> None:
        self._fh = open(path, "wb")
        self._pool = pool
        self._buf = bytearray()
        self._pending: deque[Future[bytes]] = deque()

    @staticmethod
    def _block(data: bytes) -> bytes:
        comp = zlib.compressobj(BGZF_LEVEL, zlib.DEFLATED, -15)
        payload = comp.compress(data) + comp.flush()
        header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00"
        return (header + struct.pack("<H", len(payload) + 25) + payload
                + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data)))

    def _submit(self, final: bool) -> None:
        end = len(self._buf) if final else len(self._buf) // BGZF_BLOCK * BGZF_BLOCK
        for i in range(0, end, BGZF_BLOCK):
            self._pending.append(self._pool.submit(self._block, bytes(self._buf[i:i + BGZF_BLOCK])))
        del self._buf[:end]

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._fh.write(self._pending.popleft().result())

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 16 * BGZF_BLOCK:
            self._submit(final=False)
            self._drain(keep=128)

    def close(self) -> None:
        self._submit(final=True)
        self._drain(keep=0)
        self._fh.write(BGZF_EOF)
        self._fh.close()


def _gt_tokens() -> np.ndarray:
    """Lookup table: genotype code (a*5 + b, or MISSING_CODE) -> 4 bytes 'a|b\\t'; a haploid
    code (HAPLOID_CODE + a, or + 5 for missing) -> 'a\\t' and two pad bytes the writer drops."""
    tok = np.zeros((HAPLOID_CODE + 6, 4), dtype=np.uint8)
    for a in range(5):
        for b in range(5):
            tok[a * 5 + b] = np.frombuffer(f"{a}|{b}\t".encode(), dtype=np.uint8)
        tok[HAPLOID_CODE + a, :2] = np.frombuffer(f"{a}\t".encode(), dtype=np.uint8)
    tok[MISSING_CODE] = np.frombuffer(b".|.\t", dtype=np.uint8)
    tok[HAPLOID_CODE + 5, :2] = np.frombuffer(b".\t", dtype=np.uint8)
    return tok


# ---------------------------------------------------------------- progress
class _Progress:
    def __init__(self, enabled: bool) -> None:
        self._p = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                       TextColumn, TimeElapsedColumn)
            self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(),
                               console=Console(stderr=True))

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if self._p is None:
            yield self
            return
        with self._p:
            yield self

    def task(self, description: str, total: int) -> int | None:
        log.info("%s (%d steps)", description, total)
        return None if self._p is None else self._p.add_task(description, total=total)

    def advance(self, task: int | None, n: int = 1) -> None:
        if self._p is not None and task is not None:
            self._p.advance(task, n)


# ---------------------------------------------------------------- design
@dataclass
class _Site:
    name: str
    n: int
    north_share: float
    age_mean: float
    prefix: str
    individuals: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # VCF order
    iids: list[str] = field(default_factory=list)


def _check_args(sites: Mapping[str, int], n_variants: int) -> None:
    if not sites:
        raise ConfigError("simulate_cohorts: at least one site is required")
    prefixes = set()
    for name, n in sites.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name == "truth":
            raise ConfigError(f"simulate_cohorts: invalid site name {name!r} "
                              "(letters, digits, '_' or '-'; not 'truth')")
        if int(n) < 10:
            raise ConfigError(f"simulate_cohorts: site {name} needs >= 10 samples, got {n}")
        prefix = _prefix(name)
        if prefix in prefixes:
            raise ConfigError(f"simulate_cohorts: site {name} gives a duplicate ID prefix {prefix}")
        prefixes.add(prefix)
    if int(n_variants) < 20:
        raise ConfigError(f"simulate_cohorts: n_variants must be >= 20, got {n_variants}")


def _prefix(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", name).upper()


def _design_sites(sites: Mapping[str, int], seed: int) -> list[_Site]:
    out = []
    for name, n in sites.items():
        r = _rng(seed, "site-mix", name)
        share = DEFAULT_NORTH_SHARE.get(name, float(np.round(r.uniform(0.15, 0.85), 3)))
        age = DEFAULT_AGE_MEAN.get(name, float(np.round(r.uniform(45.0, 60.0), 1)))
        out.append(_Site(name, int(n), share, age, _prefix(name)))
    return out


def _demography(site_list: list[_Site]) -> msprime.Demography:
    dem = msprime.Demography()
    dem.add_population(name="north", initial_size=NE, description="northern Han-like source")
    dem.add_population(name="south", initial_size=NE, description="southern Han-like source")
    dem.add_population(name="ANC", initial_size=NE, description="common ancestral population")
    for s in site_list:
        dem.add_population(name=f"adm_{s.name}", initial_size=NE,
                           description=f"admixed population sampled at {s.name}")
        dem.add_admixture(time=T_ADMIX, derived=f"adm_{s.name}", ancestral=["north", "south"],
                          proportions=[s.north_share, 1.0 - s.north_share])
    dem.add_census(time=T_CENSUS)
    dem.add_population_split(time=T_SPLIT, derived=["north", "south"], ancestral="ANC")
    dem.sort_events()
    return dem


def _sample_sets(site_list: list[_Site]) -> tuple[list[msprime.SampleSet], np.ndarray, np.ndarray]:
    """Sample sets in individual order, plus each individual's site index and source
    (0 north, 1 south, 2 admixed)."""
    sets, site_of, source = [], [], []
    for k, s in enumerate(site_list):
        n_adm = int(round(ADMIXED_SHARE * s.n))
        n_pure = s.n - n_adm
        n_north = int(round(s.north_share * n_pure))
        for pop, cnt, src in (("north", n_north, 0), ("south", n_pure - n_north, 1),
                              (f"adm_{s.name}", n_adm, 2)):
            if cnt > 0:
                sets.append(msprime.SampleSet(cnt, population=pop, ploidy=2))
                site_of += [k] * cnt
                source += [src] * cnt
    return sets, np.asarray(site_of), np.asarray(source)


# ---------------------------------------------------------------- per chromosome
@dataclass
class _Chrom:
    """One contig: independent coalescent segments laid end to end, and the
    candidate variants (common ones and a random sample of rare ones)."""

    name: str
    length: int
    segments: list[tskit.TreeSequence]
    seg: np.ndarray  # segment index of each candidate
    site_ids: np.ndarray  # tskit site id within the segment
    pos: np.ndarray  # 1-based VCF POS on the contig
    maf: np.ndarray  # pooled, exact
    n_alt: np.ndarray
    ref: list[str]
    alt: list[str]
    remap: list[np.ndarray]  # per candidate: tskit allele index -> VCF allele index


def _simulate_segment(length: int, dem: msprime.Demography, sets: list[msprime.SampleSet],
                      seed: int, key: str, north_bp: np.ndarray,
                      admixed_nodes: np.ndarray) -> tskit.TreeSequence:
    ts = msprime.sim_ancestry(sets, demography=dem, sequence_length=length,
                              recombination_rate=RECOMB, random_seed=_msp_seed(seed, "anc", key))
    ts = msprime.sim_mutations(ts, rate=MU, model=msprime.JC69(),
                               random_seed=_msp_seed(seed, "mut", key))
    n_hap = ts.num_samples
    if not (np.array_equal(ts.samples(), np.arange(n_hap))
            and np.array_equal(ts.nodes_individual[:n_hap], np.arange(n_hap) // 2)):
        raise RuntimeError("unexpected msprime sample node numbering")
    # exact north ancestry of admixed haplotypes: census lineages -> their population
    if admixed_nodes.size:
        census = np.flatnonzero(ts.nodes_flags & msprime.NODE_IS_CEN_EVENT).astype(np.int32)
        edges = ts.dump_tables().link_ancestors(admixed_nodes.astype(np.int32), census)
        north_id = next(p.id for p in ts.populations() if p.metadata["name"] == "north")
        is_north = ts.nodes_population[edges.parent] == north_id
        np.add.at(north_bp, edges.child[is_north] // 2, (edges.right - edges.left)[is_north])
    return ts


def _simulate_chrom(name: str, length: int, dem: msprime.Demography,
                    sets: list[msprime.SampleSet], seed: int, north_bp: np.ndarray,
                    admixed_nodes: np.ndarray, n_rare_wanted: int) -> _Chrom:
    n_seg = max(1, math.ceil(length / SEGMENT_BP))
    bounds = np.linspace(0, length, n_seg + 1).round().astype(np.int64)
    rng = _rng(seed, "rare-candidates", name)
    segments, cols = [], {k: [] for k in ("seg", "sid", "pos", "maf", "nalt", "ref", "alt", "remap")}
    for k in range(n_seg):
        ts = _simulate_segment(int(bounds[k + 1] - bounds[k]), dem, sets, seed, f"{name}:{k}",
                               north_bp, admixed_nodes)
        segments.append(ts)
        n_hap = ts.num_samples
        # C-level prefilter: per-site heterozygosity 1 - sum p_i^2 >= 2 maf (1 - maf)
        het = ts.diversity(windows="sites", mode="site", span_normalise=False) * (n_hap - 1) / n_hap
        lim = 2 * MIN_MAF * (1 - MIN_MAF) * (1 - 1e-9)
        common = np.flatnonzero(het >= lim)
        rare = np.flatnonzero((het > 0) & (het < lim))
        n_take = min(rare.size, int(np.ceil(3 * n_rare_wanted / n_seg)) + 2)
        cand = np.union1d(common, rng.choice(rare, size=n_take, replace=False))
        # single-mutation sites are biallelic: exact MAF straight from het = 2 p (1 - p)
        n_mut = np.bincount(ts.mutations_site, minlength=ts.num_sites)
        first_mut = np.searchsorted(ts.mutations_site, np.arange(ts.num_sites))
        single = cand[n_mut[cand] == 1]
        minor = (1.0 - np.sqrt(np.clip(1.0 - 2.0 * het[single], 0.0, None))) / 2.0
        info = {int(sid): (float(m), 1, ref, alt, _BIALLELIC)
                for sid, m, ref, alt in zip(single, np.round(minor * n_hap) / n_hap,
                                            ts.sites_ancestral_state[single].tolist(),
                                            ts.mutations_derived_state[first_mut[single]].tolist())}
        # recurrent mutation: decode and count every allele
        var = tskit.Variant(ts)
        for sid in cand[n_mut[cand] > 1]:
            var.decode(int(sid))
            counts = np.bincount(var.genotypes, minlength=len(var.alleles))
            obs = np.flatnonzero(counts[1:]) + 1
            m = 1.0 - counts.max() / n_hap
            if obs.size == 0 or m <= 0.0:
                continue
            table = np.zeros(len(var.alleles), dtype=np.uint8)
            table[obs] = np.arange(1, obs.size + 1)
            info[int(sid)] = (m, obs.size, var.alleles[0],
                              ",".join(var.alleles[i] for i in obs), table)
        sids = sorted(info)
        cols["seg"] += [k] * len(sids)
        cols["sid"] += sids
        cols["pos"] += (ts.sites_position[sids].astype(np.int64) + 1 + bounds[k]).tolist()
        for name_, j in (("maf", 0), ("nalt", 1), ("ref", 2), ("alt", 3), ("remap", 4)):
            cols[name_] += [info[x][j] for x in sids]
    return _Chrom(name, length, segments, np.asarray(cols["seg"], np.int64),
                  np.asarray(cols["sid"], np.int64), np.asarray(cols["pos"], np.int64),
                  np.asarray(cols["maf"], float), np.asarray(cols["nalt"], np.int64),
                  cols["ref"], cols["alt"], cols["remap"])


def _harmonic_common(n_hap: int) -> float:
    lo = max(1, math.ceil(MIN_MAF * n_hap))
    return float(np.sum(1.0 / np.arange(lo, n_hap - lo + 1))) if n_hap - lo >= lo else 1.0


# ---------------------------------------------------------------- selection
def _select(chroms: list[_Chrom], n_variants: int, rng: np.random.Generator, rare_fraction: float = RARE_EXTRA
            ) -> list[np.ndarray]:
    """Per chromosome: sorted indices (into the chromosome's polymorphic sites) to write."""
    maf = np.concatenate([c.maf for c in chroms])
    n_alt = np.concatenate([c.n_alt for c in chroms])
    offs = np.cumsum([0] + [len(c.maf) for c in chroms])
    common = np.flatnonzero(maf >= MIN_MAF)
    # cap multi-allelic sites among the common ones (recurrent mutation ~0.5 %)
    multi = common[n_alt[common] > 1]
    if multi.size > MAX_MULTIALLELIC * common.size:
        keep = int(0.005 * common.size)
        common = np.setdiff1d(common, rng.choice(multi, size=multi.size - keep, replace=False))
    if common.size < n_variants:
        raise RuntimeError("not enough common variants")  # caller guarantees this
    chosen = np.sort(rng.choice(common, size=n_variants, replace=False))
    rare = np.flatnonzero((maf > 0) & (maf < MIN_MAF))
    n_rare = min(rare.size, int(round(rare_fraction * n_variants)))
    chosen = np.union1d(chosen, rng.choice(rare, size=n_rare, replace=False))
    return [chosen[(chosen >= offs[i]) & (chosen < offs[i + 1])] - offs[i]
            for i in range(len(chroms))]


def _pick_causal(chroms: list[_Chrom], selected: list[np.ndarray], rng: np.random.Generator,
                 total_len: int) -> dict[str, list[tuple[int, int]]]:
    """Return trait -> [(chrom index, row in selected[chrom])]."""
    cand = []
    for ci, (c, sel) in enumerate(zip(chroms, selected)):
        ok = (c.n_alt[sel] == 1) & (c.maf[sel] >= 0.05) & (c.maf[sel] <= 0.40)
        cand += [(ci, int(r)) for r in np.flatnonzero(ok)]
    order = rng.permutation(len(cand))
    min_gap = min(200_000, total_len // (8 * N_CAUSAL))
    picked: list[tuple[int, int]] = []
    for k in order:
        ci, r = cand[k]
        p = chroms[ci].pos[selected[ci][r]]
        if all(ci != cj or abs(p - chroms[cj].pos[selected[cj][rj]]) >= min_gap for cj, rj in picked):
            picked.append((ci, r))
        if len(picked) == 2 * N_CAUSAL:
            break
    if len(picked) < 2:
        raise RuntimeError("too few candidate causal variants; increase n_variants")
    half = len(picked) // 2
    return {"T2D": sorted(picked[:half]), "LDL": sorted(picked[half:])}


# ---------------------------------------------------------------- main entry
def simulate_cohorts(
    out: Path,
    *,
    sites: Mapping[str, int] | None = DEFAULT_SITES,
    n_variants: int = 30000,
    seed: int = 1,
    progress: bool = True,
    rare_fraction: float = RARE_EXTRA,
    n_chrx: int = 0,
) -> dict:
    """Simulate per-site genotypes (VCF), phenotype tables and the truth; see module doc.

    ``n_chrx`` adds that many chrX variants of MAF >= 1 % (plus ``rare_fraction`` rarer ones)
    after the autosomes: women diploid, men haploid (``0``/``1``), outside the
    pseudo-autosomal regions; they carry no causal effect.

    Returns ``{"out", "seed", "sites": {site: n_vcf_samples}, "n_variants",
    "n_common", "n_multiallelic", "n_chrx", "chromosomes": {chrom: length}, "seconds"}``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    sites = dict(DEFAULT_SITES if sites is None else sites)
    _check_args(sites, n_variants)
    n_variants = int(n_variants)
    n_chrx = int(n_chrx)
    if n_chrx < 0:
        raise ConfigError(f"simulate_cohorts: n_chrx must be >= 0, got {n_chrx}")
    if not 0.0 <= float(rare_fraction) <= 2.0:
        raise ConfigError(f"simulate_cohorts: rare_fraction must be between 0 and 2, got {rare_fraction}")
    site_list = _design_sites(sites, seed)
    dem = _demography(site_list)
    sets, site_of, source = _sample_sets(site_list)
    n_ind = site_of.size
    n_hap = 2 * n_ind
    adm_ind = np.flatnonzero(source == 2)
    admixed_nodes = np.sort(np.concatenate([2 * adm_ind, 2 * adm_ind + 1]))
    north_bp = np.zeros(n_ind)
    pr = _Progress(progress)

    with pr.running():
        # ---- 1. coalescent simulation, chromosome by chromosome
        per_bp = 4 * NE * MU * _harmonic_common(n_hap)
        total = OVERSAMPLE * n_variants / per_bp
        w = np.asarray(GRCH38_MB[:N_BASE_CHROMS])
        lengths = [max(10_000, int(round(total * x / w.sum()))) for x in w]
        chroms: list[_Chrom] = []
        task = pr.task("simulating chromosomes", len(lengths))
        n_common = 0
        while True:
            for length in lengths:
                name = f"chr{len(chroms) + 1}"
                n_rare = int(np.ceil(rare_fraction * n_variants * length / total))
                chroms.append(_simulate_chrom(name, length, dem, sets, seed, north_bp,
                                              admixed_nodes, n_rare))
                n_common += int(np.sum(chroms[-1].maf >= MIN_MAF))
                pr.advance(task)
            if n_common >= 1.02 * n_variants:
                break
            if len(chroms) >= len(GRCH38_MB):
                raise RuntimeError(f"only {n_common} common variants on {len(chroms)} chromosomes")
            deficit = 1.02 * n_variants - n_common
            lengths = [max(10_000, int(round(1.5 * deficit / per_bp)))]
        genome_bp = sum(c.length for c in chroms)

        north_fraction = np.where(source == 0, 1.0, 0.0)
        north_fraction[adm_ind] = north_bp[adm_ind] / (2.0 * genome_bp)

        # ---- 2. choose variants, IDs, causal variants
        rng_sel = _rng(seed, "select")
        selected = _select(chroms, n_variants, rng_sel, rare_fraction)
        n_written = int(sum(s.size for s in selected))
        rs = rng_sel.choice(98_999_999, size=n_written, replace=False) + 1_000_000
        rs_ids, k = [], 0
        for sel in selected:
            rs_ids.append([f"rs{x}" for x in rs[k:k + sel.size]])
            k += sel.size
        causal = _pick_causal(chroms, selected, rng_sel, genome_bp)
        if n_chrx:  # after the autosomes' choices, so that those stay as without chrX
            xchrom, xsel = _simulate_chrx(n_chrx, per_bp, dem, sets, seed, n_ind, admixed_nodes, rare_fraction)
            chroms.append(xchrom)
            selected.append(xsel)
            rs_x = _rng(seed, "ids-x").choice(98_999_999, size=xsel.size, replace=False) + 100_000_000
            rs_ids.append([f"rs{x}" for x in rs_x])
            n_written += int(xsel.size)
        causal_rows = {(ci, r) for v in causal.values() for ci, r in v}
        dosage: dict[tuple[int, int], np.ndarray] = {}

        # ---- 3. sample order, IDs and missingness per site
        for k, s in enumerate(site_list):
            r = _rng(seed, "order", s.name)
            s.individuals = r.permutation(np.flatnonzero(site_of == k))
            width = max(5, len(str(s.n + 3)))
            s.iids = [f"{s.prefix}{j:0{width}d}" for j in range(1, s.n + 1)]
        missing = []  # per site: (rng, poor-sample columns, their missing rate)
        for s in site_list:
            r = _rng(seed, "missing", s.name)
            poor = np.sort(r.choice(s.n, size=int(r.integers(3, 6)), replace=False))
            missing.append((r, poor, r.uniform(0.10, 0.20, size=poor.size)))

        # the VCF samples' sex (drawn again with the phenotypes, from the same stream)
        males = [_covariates(_rng(seed, "covariates", s.name), s.n, s.age_mean)[0] == 1 for s in site_list]

        # ---- 4. write the VCFs
        tokens = _gt_tokens().view("<u4").ravel()  # code -> 4 bytes as one uint32
        with ThreadPoolExecutor(2) as pool:
            writers = []
            for s in site_list:
                (out / s.name).mkdir(parents=True, exist_ok=True)
                wtr = _BgzfWriter(out / s.name / "genotypes.vcf.gz", pool)
                wtr.write(_vcf_header(s, chroms, seed).encode())
                writers.append(wtr)
            task = pr.task("writing VCFs", n_written)
            for ci, (c, sel) in enumerate(zip(chroms, selected)):
                decoders = [tskit.Variant(t) for t in c.segments]
                for start in range(0, sel.size, CHUNK):
                    rows = sel[start:start + CHUNK]
                    hap = np.empty((rows.size, n_hap), dtype=np.uint8)
                    for j, row in enumerate(rows):
                        var = decoders[c.seg[row]]
                        var.decode(int(c.site_ids[row]))
                        hap[j] = c.remap[row][var.genotypes]
                        if (ci, start + j) in causal_rows:
                            g = hap[j].reshape(n_ind, 2)  # biallelic: 0 REF, 1 ALT
                            dosage[(ci, start + j)] = g.sum(axis=1, dtype=np.float64)
                    prefixes = [
                        f"{c.name}\t{c.pos[row]}\t{rs_ids[ci][start + j]}\t{c.ref[row]}\t"
                        f"{c.alt[row]}\t.\tPASS\t.\tGT\t".encode()
                        for j, row in enumerate(rows)]
                    hap3 = hap.reshape(rows.size, n_ind, 2)
                    for si, s in enumerate(site_list):
                        a = hap3[:, s.individuals, :]
                        code = np.empty((rows.size, s.n), dtype=np.uint8)
                        np.multiply(a[:, :, 0], 5, out=code)
                        code += a[:, :, 1]
                        _add_missing(code, *missing[si])
                        if c.name == "chrX" and males[si].any():  # men: one allele, 'a' or '.'
                            m = males[si]
                            code[:, m] = np.where(code[:, m] == MISSING_CODE, HAPLOID_CODE + 5,
                                                  HAPLOID_CODE + a[:, m, 0])
                            keep = np.ones((s.n, 4), dtype=bool)
                            keep[m, 2:] = False
                            body = tokens[code].view(np.uint8)[:, keep.ravel()]
                        else:
                            body = tokens[code].view(np.uint8)  # (rows, 4 * n) bytes
                        body[:, -1] = ord("\n")
                        writers[si].write(b"".join(p + b.tobytes() for p, b in zip(prefixes, body)))
                    pr.advance(task, rows.size)
            for wtr in writers:
                wtr.close()
        for s in site_list:
            pysam.tabix_index(str(out / s.name / "genotypes.vcf.gz"), preset="vcf", force=True)

        # ---- 5. phenotypes, tables, truth
        effects = _effects(causal, _rng(seed, "effects"))
        freq = {key: dosage[key].mean() / 2.0 for key in dosage}
        pheno = _phenotypes(site_list, site_of, north_fraction, causal, effects, dosage, freq, seed)
        _write_tables(out, site_list, pheno, seed)
        _write_truth(out, chroms, selected, rs_ids, causal, effects, site_list, pheno, seed)

    n_common_written = int(sum(np.sum(c.maf[s] >= MIN_MAF) for c, s in zip(chroms, selected)))
    n_multi = int(sum(np.sum(c.n_alt[s] > 1) for c, s in zip(chroms, selected)))
    summary = {
        "out": str(out),
        "seed": seed,
        "sites": {s.name: s.n for s in site_list},
        "n_variants": n_written,
        "n_common": n_common_written,
        "n_multiallelic": n_multi,
        "n_chrx": int(selected[-1].size) if n_chrx else 0,
        "chromosomes": {c.name: c.length for c in chroms},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("simulated cohorts: %s", summary)
    return summary


def _simulate_chrx(n_chrx: int, per_bp: float, dem: msprime.Demography, sets: list[msprime.SampleSet],
                   seed: int, n_ind: int, admixed_nodes: np.ndarray, rare_fraction: float
                   ) -> tuple[_Chrom, np.ndarray]:
    """chrX with about ``n_chrx`` common variants (simulated like an autosome; the writer makes
    men haploid), positions moved past PAR1; and the rows to write."""
    length = max(10_000, int(round(OVERSAMPLE * n_chrx / per_bp)))
    for _ in range(4):
        c = _simulate_chrom("chrX", length, dem, sets, seed, np.zeros(n_ind), admixed_nodes,
                            int(np.ceil(rare_fraction * n_chrx)))
        if int(np.sum(c.maf >= MIN_MAF)) >= n_chrx:
            break
        length = int(length * 1.5)
    else:
        raise RuntimeError(f"only {int(np.sum(c.maf >= MIN_MAF))} common chrX variants")
    sel = _select([c], n_chrx, _rng(seed, "select-x"), rare_fraction)[0]
    c.pos = c.pos + X_OFFSET
    c.length = c.length + X_OFFSET
    return c, sel


def _add_missing(code: np.ndarray, rng: np.random.Generator, poor: np.ndarray,
                 poor_rate: np.ndarray) -> None:
    """Set sporadic (SPORADIC_MISSING of all calls) and poor-sample calls to '.|.'."""
    flat = code.reshape(-1)
    flat[rng.integers(0, flat.size, rng.binomial(flat.size, SPORADIC_MISSING))] = MISSING_CODE
    hit = rng.random((code.shape[0], poor.size)) < (poor_rate - SPORADIC_MISSING)
    sub = code[:, poor]
    sub[hit] = MISSING_CODE
    code[:, poor] = sub


def _vcf_header(s: _Site, chroms: list[_Chrom], seed: int) -> str:
    lines = [
        "##fileformat=VCFv4.2",
        "##source=fedgen-simulate",
        f"##fedgen_simulate=<seed={seed},site={s.name},north_share={s.north_share},"
        f"Ne={NE},split_generations={T_SPLIT:g},mu={MU:g},rho={RECOMB:g}>",
        "##reference=simulated",
    ]
    lines += [f"##contig=<ID={c.name},length={c.length}>" for c in chroms]
    lines += [
        '##FILTER=<ID=PASS,Description="All filters passed">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT",
                   *s.iids]),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- phenotypes
def _effects(causal: dict[str, list[tuple[int, int]]],
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_t2d, n_ldl = len(causal["T2D"]), len(causal["LDL"])
    sign = rng.choice([-1.0, 1.0], size=n_t2d + n_ldl)
    t2d = rng.uniform(math.log(1.3), math.log(1.6), size=n_t2d) * sign[:n_t2d]
    ldl = rng.uniform(0.10, 0.20, size=n_ldl) * LDL_COEF["sd_unit"] * sign[n_t2d:]
    return {"T2D": np.round(t2d, 4), "LDL": np.round(ldl, 4)}


@dataclass
class _Pheno:
    iid: list[str]
    site: np.ndarray
    in_vcf: np.ndarray
    north: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    smoking: np.ndarray
    t2d: np.ndarray  # float with nan
    ldl: np.ndarray
    b0: float


def _covariates(r: np.random.Generator, n: int, age_mean: float):
    sex = np.where(r.random(n) < 0.5, 1, 2)
    age = np.round(np.clip(r.normal(age_mean, 12.0, n), 18.0, 95.0), 1)
    u = r.random(n)
    p = np.array([SMOKING_P[int(x)] for x in (1, 2)])  # rows: male, female
    cum = np.cumsum(p[sex - 1], axis=1)
    smoking = (u[:, None] > cum[:, :2]).sum(axis=1)  # 0 never, 1 former, 2 current
    return sex, age, smoking


def _linear_parts(sex, age, smoking, north):
    male = (sex == 1).astype(float)
    eta = (T2D_COEF["age_per_10y"] * (age - 55.0) / 10.0 + T2D_COEF["male"] * male
           + T2D_COEF["former"] * (smoking == 1) + T2D_COEF["current"] * (smoking == 2)
           + T2D_COEF["south_fraction"] * (1.0 - north))
    mu = (LDL_COEF["intercept"] + LDL_COEF["age_per_y"] * (age - 55.0) + LDL_COEF["male"] * male
          + LDL_COEF["current"] * (smoking == 2) + LDL_COEF["north_fraction"] * north)
    return eta, mu


def _phenotypes(site_list, site_of, north_fraction, causal, effects, dosage, freq, seed) -> _Pheno:
    n_ind = site_of.size
    sex = np.zeros(n_ind, int)
    age = np.zeros(n_ind)
    smoking = np.zeros(n_ind, int)
    ldl_offset = np.zeros(n_ind)
    extra = []  # (site index, iid, sex, age, smoking, north, genetic eta, genetic ldl)
    for k, s in enumerate(site_list):
        r = _rng(seed, "covariates", s.name)
        ind = s.individuals
        sex[ind], age[ind], smoking[ind] = _covariates(r, s.n, s.age_mean)
        off = 0.0 if k == 0 else float(np.round(r.normal(0.0, 0.06), 3))  # lab calibration
        ldl_offset[site_of == k] = off
        n_extra = int(r.integers(2, 4))
        esex, eage, esmk = _covariates(r, n_extra, s.age_mean)
        pure = r.random(n_extra) >= ADMIXED_SHARE
        enorth = np.where(pure, (r.random(n_extra) < s.north_share).astype(float),
                          np.clip(r.normal(s.north_share, 0.1, n_extra), 0, 1))
        g_eta = np.zeros(n_extra)
        g_ldl = np.zeros(n_extra)
        for trait, acc in (("T2D", g_eta), ("LDL", g_ldl)):
            for key, beta in zip(causal[trait], effects[trait]):
                acc += beta * (r.binomial(2, freq[key], n_extra) - 2 * freq[key])
        width = max(5, len(str(s.n + 3)))
        for j in range(n_extra):
            extra.append((k, f"{s.prefix}{s.n + 1 + j:0{width}d}", esex[j], eage[j], esmk[j],
                          enorth[j], g_eta[j], g_ldl[j], off))

    g_eta = np.zeros(n_ind)
    g_ldl = np.zeros(n_ind)
    for trait, acc in (("T2D", g_eta), ("LDL", g_ldl)):
        for key, beta in zip(causal[trait], effects[trait]):
            acc += beta * (dosage[key] - 2 * freq[key])
    eta, mu = _linear_parts(sex, age, smoking, north_fraction)
    eta += g_eta
    mu += g_ldl + ldl_offset
    b0 = _solve_intercept(eta, T2D_PREVALENCE)

    # append table-only people
    ex = list(zip(*extra)) if extra else [[] for _ in range(9)]
    e_site, e_iid, e_sex, e_age, e_smk, e_north, e_geta, e_gldl, e_off = (np.asarray(x) for x in ex)
    e_eta, e_mu = _linear_parts(e_sex.astype(int), e_age.astype(float), e_smk.astype(int),
                                e_north.astype(float))
    iid = [""] * n_ind
    for s in site_list:
        for j, i in enumerate(s.individuals):
            iid[i] = s.iids[j]
    all_eta = np.concatenate([eta, e_eta + e_geta.astype(float)]) + b0
    all_mu = np.concatenate([mu, e_mu + e_gldl.astype(float) + e_off.astype(float)])
    n_all = all_eta.size
    r = _rng(seed, "outcomes")
    t2d = (r.random(n_all) < 1.0 / (1.0 + np.exp(-all_eta))).astype(float)
    ldl = np.round(all_mu + r.normal(0.0, LDL_COEF["residual_sd"], n_all), 2)
    t2d[r.random(n_all) < 0.02] = np.nan
    ldl[r.random(n_all) < 0.02] = np.nan
    return _Pheno(
        iid=iid + list(e_iid), site=np.concatenate([site_of, e_site.astype(int)]),
        in_vcf=np.r_[np.ones(n_ind, bool), np.zeros(len(extra), bool)],
        north=np.concatenate([north_fraction, e_north.astype(float)]),
        sex=np.concatenate([sex, e_sex.astype(int)]),
        age=np.concatenate([age, e_age.astype(float)]),
        smoking=np.concatenate([smoking, e_smk.astype(int)]), t2d=t2d, ldl=ldl, b0=b0)


def _solve_intercept(eta: np.ndarray, prevalence: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(eta + mid)))) < prevalence:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 6)


def _write_tables(out: Path, site_list: list[_Site], ph: _Pheno, seed: int) -> None:
    for k, s in enumerate(site_list):
        r = _rng(seed, "table", s.name)
        vcf_rows = np.flatnonzero((ph.site == k) & ph.in_vcf)
        drop = r.choice(vcf_rows, size=int(r.integers(2, 4)), replace=False)
        rows = np.concatenate([np.setdiff1d(vcf_rows, drop), np.flatnonzero((ph.site == k) & ~ph.in_vcf)])
        rows = r.permutation(rows)
        lines = ["IID\tsex\tage\tsmoking\tT2D\tLDL"]
        for i in rows:
            t2d = "NA" if np.isnan(ph.t2d[i]) else str(int(ph.t2d[i]))
            ldl = "NA" if np.isnan(ph.ldl[i]) else f"{ph.ldl[i]:.2f}"
            lines.append(f"{ph.iid[i]}\t{ph.sex[i]}\t{ph.age[i]:.1f}\t"
                         f"{SMOKING_LEVELS[ph.smoking[i]]}\t{t2d}\t{ldl}")
        (out / s.name / "samples.tsv").write_text("\n".join(lines) + "\n")


def _write_truth(out, chroms, selected, rs_ids, causal, effects, site_list, ph, seed) -> None:
    d = out / "truth"
    d.mkdir(parents=True, exist_ok=True)
    lines = ["trait\tCHROM\tPOS\tID\tREF\tALT\teffect"]
    for trait in ("T2D", "LDL"):
        for (ci, r), beta in zip(causal[trait], effects[trait]):
            c, row = chroms[ci], selected[ci][r]
            lines.append(f"{trait}\t{c.name}\t{c.pos[row]}\t{rs_ids[ci][r]}\t{c.ref[row]}\t"
                         f"{c.alt[row]}\t{beta:.4f}")
    (d / "causal.tsv").write_text("\n".join(lines) + "\n")
    lines = ["IID\tsite\tnorth_fraction"]
    for k, s in enumerate(site_list):
        rows = [i for i in s.individuals] + list(np.flatnonzero((ph.site == k) & ~ph.in_vcf))
        lines += [f"{ph.iid[i]}\t{s.name}\t{ph.north[i]:.4f}" for i in rows]
    (d / "ancestry.tsv").write_text("\n".join(lines) + "\n")
    model = {
        "seed": seed,
        "demography": {"Ne": NE, "split_generations": T_SPLIT, "admixture_generations": T_ADMIX,
                       "mutation_rate": MU, "recombination_rate": RECOMB,
                       "admixed_share_per_site": ADMIXED_SHARE,
                       "expected_hudson_fst": round(T_SPLIT / (T_SPLIT + 2 * NE), 5)},
        "sites": {s.name: {"n": s.n, "north_share": s.north_share, "age_mean": s.age_mean}
                  for s in site_list},
        "T2D": {"intercept": ph.b0, "target_prevalence": T2D_PREVALENCE, **T2D_COEF,
                "effect_unit": "log odds ratio per ALT allele"},
        "LDL": {**LDL_COEF, "effect_unit": "mmol/L per ALT allele"},
        "chromosomes": {c.name: c.length for c in chroms},
    }
    (d / "model.json").write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")
