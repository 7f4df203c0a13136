"""A site's memo of per-variant work that repeats across IRLS rounds.

A logistic or Firth fit asks a site for the same variants in round after round, each time at a
new β. What the site derives from a variant's genotype row before the β enters (the row restricted
to the request's samples, the imputation value, the carrier / other / odd-one-out cells that the
disclosure rules check and the cells per atom of the rules' cell structures) does not change
between those rounds, and re-reading and re-counting it was about a quarter of a site's time in a
Firth-heavy GWAS.

:class:`RowCache` keeps those values for the rows it has computed, per *context*: the genotype
source, the imputation mode, the exact sample mask and the exact cell structures of the request.
A row is served from the memo only when its context is byte-for-byte the one it was computed in
(for a cell structure: its labels and number of atoms, all a row's atom counts depend on) and its
allele flip is the same; anything else is computed afresh. The memo is a cache of values
the site would compute anyway: it never changes what a reply contains, only how long it takes
(``tests/test_rowcache.py`` replays varied request sequences with and without it).

The memo lives on the opened cohort (a new or changed input file is a new cohort, so a new memo)
and is bounded by ``row_cache_mb`` in the site's node config (default 256 MB; 0 turns it off).
Contexts are evicted oldest first. A row's derived values (tens of bytes) are kept before its
genotypes (a byte per sample), and genotypes only when all the site's rows would fit in half the
budget: a site too large to hold its genotypes keeps only the derived values, skips the counting in later
rounds and re-reads the rows; rows that would not fit at all are simply not kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

DEFAULT_BUDGET_MB = 256


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(repr((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


class _Context:
    """Rows of one (source, impute, sample mask, cell structures).

    Two tiers: a row's derived values (imputation value, cells, atom cells: tens of bytes) and its
    genotypes for the request's samples (a byte or eight per sample). The first tier is kept for
    every row that fits, the second while room is left, so that a biobank-sized site, whose
    genotypes cannot all stay in memory, still skips the counting and only re-reads the rows.
    """

    def __init__(self, n_variants: int, owner: "RowCache", regenerable: bool) -> None:
        self.owner = owner
        self.regenerable = regenerable  # the genotypes can be re-read cheaply (hard calls)
        self.pos = np.full(n_variants, -1, dtype=np.int64)  # cohort variant -> stored derived values
        self.gpos = np.full(n_variants, -1, dtype=np.int64)  # cohort variant -> stored genotypes
        self.flip = np.zeros(n_variants, dtype=bool)
        self.n = self.n_g = 0
        self.cap = self.cap_g = 0
        self.g: np.ndarray | None = None
        self.fill: np.ndarray | None = None
        self.cells: np.ndarray | None = None
        self.atoms: np.ndarray | None = None
        self.meta_bytes = self.g_bytes = 0
        self.started = False

    @property
    def nbytes(self) -> int:
        return self.n * self.meta_bytes + self.n_g * self.g_bytes

    def get(self, idx: np.ndarray, flip: np.ndarray) -> tuple | None:
        """(g or None, fill, cells, atoms) when every row is held with the same flip; g is None
        when some row's genotypes are not held (the caller re-reads them)."""
        if not self.started or idx.size == 0:
            return None
        p = self.pos[idx]
        if (p < 0).any() or (self.flip[idx] != flip).any():
            return None
        gp = self.gpos[idx]
        if (gp < 0).any():
            if not self.regenerable:
                return None
            g = None
        else:
            g = self.g[gp]
        return (g, None if self.fill is None else self.fill[p], self.cells[p],
                None if self.atoms is None else self.atoms[p])

    def put(self, idx: np.ndarray, flip: np.ndarray, g: np.ndarray, fill: np.ndarray | None,
            cells: np.ndarray, atoms: np.ndarray | None) -> None:
        held = self.pos[idx] >= 0
        stale = held & (self.flip[idx] != flip)
        if stale.any():  # held with the other allele order: forget them, then store afresh
            self.pos[idx[stale]] = -1
            self.gpos[idx[stale]] = -1
        new = self.pos[idx] < 0
        if not new.any():
            return
        if not self.started:
            self.meta_bytes = cells.shape[1] * 8 + (8 if fill is not None else 0) + (0 if atoms is None else atoms[0].size * 8)
            self.g_bytes = g.shape[1] * g.dtype.itemsize
            budget = self.owner.budget
            self.cap = int(min(self.pos.size, budget // max(1, self.meta_bytes)))
            if not self.regenerable:  # derived values only with their genotypes
                self.cap = int(min(self.pos.size, budget // max(1, self.meta_bytes + self.g_bytes)))
            self.cap_g = int(min(self.pos.size, budget // max(1, self.g_bytes)))
            if self.regenerable and self.pos.size * self.g_bytes > budget // 2:
                # the site's genotypes would not fit: holding a few percent of them saves a few
                # percent of the reads but costs the whole budget in resident memory
                self.cap_g = 0
            if self.cap == 0:
                return
            # np.empty only reserves address space: pages are touched as rows are written
            self.fill = None if fill is None else np.empty(self.cap)
            self.cells = np.empty((self.cap, cells.shape[1]), dtype=np.int64)
            self.atoms = None if atoms is None else np.empty((self.cap, *atoms.shape[1:]), dtype=np.int64)
            self.g = np.empty((self.cap_g, g.shape[1]), dtype=g.dtype) if self.cap_g else None
            self.started = True
        rows = np.flatnonzero(new)
        step = self.meta_bytes + (0 if self.regenerable else self.g_bytes)
        room = min(self.cap - self.n, self.owner.room(self, step) // max(1, step))
        rows = rows[: max(0, room)]
        if rows.size == 0:
            return
        at = np.arange(self.n, self.n + rows.size)
        if self.fill is not None:
            self.fill[at] = fill[rows]
        self.cells[at] = cells[rows]
        if self.atoms is not None:
            self.atoms[at] = atoms[rows]
        self.pos[idx[rows]] = at
        self.flip[idx[rows]] = flip[rows]
        self.n += rows.size
        # genotypes while room is left (always, for rows that cannot be re-read)
        if self.g is not None:
            room_g = min(self.cap_g - self.n_g, self.owner.room(self, self.g_bytes) // max(1, self.g_bytes))
            take = rows if not self.regenerable else rows[: max(0, room_g)]
            take = take[: max(0, self.cap_g - self.n_g)]
            if take.size:
                at_g = np.arange(self.n_g, self.n_g + take.size)
                self.g[at_g] = g[take]
                self.gpos[idx[take]] = at_g
                self.n_g += take.size
            if not self.regenerable and take.size < rows.size:  # no room for their genotypes: forget them
                lost = rows[take.size:]
                self.pos[idx[lost]] = -1


class RowCache:
    """Bounded memo of per-row genotype work, per request context (see the module doc)."""

    def __init__(self, n_variants: int, budget_bytes: int) -> None:
        self.n_variants = int(n_variants)
        self.budget = max(0, int(budget_bytes))
        self._contexts: OrderedDict[str, _Context] = OrderedDict()

    def context(self, source: str, impute: bool, keep: np.ndarray, structures: Sequence[tuple]) -> _Context | None:
        """The memo of one request context, or None when the memo is off."""
        if self.budget <= 0:
            return None
        # a row's atom counts depend on each structure's labels and number of atoms, not on which
        # sets the atoms make up (M's rows grow as sets are registered; the rule reads M afresh)
        key = _digest(source, bool(impute), np.asarray(keep, dtype=bool),
                      *[x for labels, M in structures for x in (np.asarray(labels), np.asarray(M).shape[1])])
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = _Context(self.n_variants, self, regenerable=source in ("gt", "hard"))
        self._contexts.move_to_end(key)
        return ctx

    def room(self, ctx: _Context, row_bytes: int) -> int:
        """Bytes ``ctx`` may still fill, evicting older contexts first."""
        used = sum(c.nbytes for c in self._contexts.values())
        while used > self.budget - row_bytes and len(self._contexts) > 1:
            oldest_key = next(iter(self._contexts))
            if self._contexts[oldest_key] is ctx:
                break
            used -= self._contexts.pop(oldest_key).nbytes
        return max(0, self.budget - used)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._contexts.values())


def row_cache(cohort: Any) -> RowCache:
    """The cohort's memo, created on first use with the site's ``row_cache_mb`` budget."""
    budget = int(float(getattr(cohort, "row_cache_mb", DEFAULT_BUDGET_MB)) * (1 << 20))
    cache = getattr(cohort, "_row_cache", None)
    if cache is None:
        cache = cohort._row_cache = RowCache(cohort.dosage.shape[0], budget)
    elif cache.budget != budget:  # the node's setting changed: start over within the new bound
        cache = cohort._row_cache = RowCache(cohort.dosage.shape[0], budget)
    return cache
