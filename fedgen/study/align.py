"""Harmonise variants across sites: shared (chrom, pos, ref, alt) with REF/ALT swaps aligned.

Runs at the aggregator on the variant tables the sites describe in ``site_info``. The study's
allele orientation is the first site's; a site that lists the same variant with REF and ALT
swapped gets a ``flip`` flag so its dosages are counted for the study's ALT allele.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedgen.cohort.contigs import autosome_number, contig_sort_key
from fedgen.errors import FedgenError


@dataclass
class SiteVariants:
    chrom: list[str]
    pos: np.ndarray
    ids: list[str]
    ref: list[str]
    alt: list[str]


@dataclass
class Alignment:
    """Study variants (sorted by contig, position) and each site's local index and flip flag."""

    chrom: np.ndarray
    pos: np.ndarray
    ids: np.ndarray
    ref: np.ndarray
    alt: np.ndarray
    idx: dict[str, np.ndarray]
    flip: dict[str, np.ndarray]
    report: dict[str, dict[str, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pos)


def check_genome_builds(contigs: dict[str, dict[str, int | None]], builds: dict[str, str | None] | None = None
                        ) -> list[str]:
    """Raise if two sites are on different builds (declared or recognised, ``builds``) or declare
    different lengths for the same contig; return notes."""
    notes: list[str] = []
    known = {s: b for s, b in (builds or {}).items() if b}
    if len(set(known.values())) > 1:
        raise FedgenError("sites are on different genome builds: " + ", ".join(f"{s} {b}" for s, b in known.items())
                          + " (lift one site over to the other's build)")
    seen: dict[str, tuple[str, int]] = {}
    for site, table in contigs.items():
        if not any(v for v in table.values()):
            notes.append(f"site {site}: VCF header declares no contig lengths; genome build not checked")
        for name, length in table.items():
            if not length:
                continue
            if name in seen and seen[name][1] != length:
                other, olen = seen[name]
                raise FedgenError(
                    f"sites {other} and {site} are on different genome builds: contig {name} has length "
                    f"{olen:,} at {other} but {length:,} at {site} (lift one site over to the other's build)"
                )
            seen.setdefault(name, (site, length))
    return notes


def align_variants(tables: dict[str, SiteVariants], *, sex_chroms: bool = False) -> Alignment:
    """Variants present at every site (autosomes only, and with ``sex_chroms`` chrX, chrY, the
    pseudo-autosomal XY and MT too), oriented like the first site."""
    from fedgen.cohort.sex import SEX_CHROMS

    extra = frozenset((*SEX_CHROMS, "XY")) if sex_chroms else frozenset()
    sites = list(tables)
    if not sites:
        raise FedgenError("no sites")
    report: dict[str, dict[str, int]] = {}
    lookups: dict[str, dict[tuple[str, int, str, str], int]] = {}
    for s in sites:
        t = tables[s]
        d: dict[tuple[str, int, str, str], int] = {}
        dup: set[tuple[str, int, str, str]] = set()
        non_auto = 0
        no_alt = 0
        for i, (c, p, r, a) in enumerate(zip(t.chrom, t.pos.tolist(), t.ref, t.alt)):
            if not autosome_number(c) and c not in extra:
                non_auto += 1
                continue
            if a in (".", "*", "<*>", "<NON_REF>"):
                no_alt += 1
                continue
            k = (c, p, r.upper(), a.upper())
            if k in d:
                dup.add(k)
            d[k] = i
        for k in dup:
            del d[k]
        lookups[s] = d
        report[s] = {
            "variants": len(t.pos),
            "non_autosomal": non_auto,
            "no_alt_allele": no_alt,
            "duplicate_keys_dropped": len(dup),
        }
    first = sites[0]
    t0 = tables[first]
    keys0 = list(lookups[first].items())
    keys0.sort(key=lambda kv: (contig_sort_key(kv[0][0]), kv[0][1], kv[1]))
    idx = {s: [] for s in sites}
    flip = {s: [] for s in sites}
    chosen: list[tuple[str, int, str, str]] = []
    ids: list[str] = []
    for k, i0 in keys0:
        locs = []
        ok = True
        for s in sites[1:]:
            j = lookups[s].get(k)
            if j is not None:
                locs.append((j, 0))
                continue
            j = lookups[s].get((k[0], k[1], k[3], k[2]))
            if j is None:
                ok = False
                break
            locs.append((j, 1))
        if not ok:
            continue
        chosen.append(k)
        idx[first].append(i0)
        flip[first].append(0)
        vid = t0.ids[i0]
        for s, (j, f) in zip(sites[1:], locs):
            idx[s].append(j)
            flip[s].append(f)
            if vid == "." and tables[s].ids[j] != ".":
                vid = tables[s].ids[j]
        ids.append(vid)
    n = len(chosen)
    for s in sites:
        report[s]["shared"] = n
        report[s]["not_shared"] = len(lookups[s]) - n
        report[s]["ref_alt_swapped"] = int(sum(flip[s]))
    if n == 0:
        raise FedgenError(
            "no variants are shared by all sites after harmonisation (check contig naming, genome build and "
            "that the VCFs cover the same regions); per site: "
            + "; ".join(f"{s}: {report[s]['variants']} variants" for s in sites)
        )
    return Alignment(
        chrom=np.asarray([k[0] for k in chosen]),
        pos=np.asarray([k[1] for k in chosen], dtype=np.int64),
        ids=np.asarray(ids),
        ref=np.asarray([t0.ref[i] for i in idx[first]]),
        alt=np.asarray([t0.alt[i] for i in idx[first]]),
        idx={s: np.asarray(v, dtype=np.int64) for s, v in idx.items()},
        flip={s: np.asarray(v, dtype=np.uint8) for s, v in flip.items()},
        report=report,
    )
