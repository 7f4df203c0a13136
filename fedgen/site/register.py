"""The site's register of released sample sets: the rule against differencing (trackers).

Every exact aggregate a site releases is a sum over some set of its people: all analysed
samples (QC, PCA, LD), the samples with a phenotype and every covariate present (association),
the samples with one covariate present (covariate moments). Two aggregates over sets that
differ by a few people give, by subtraction, those few people's values: their genotypes at
every variant and their phenotypes (Denning's tracker, 1979). No query-set-size rule stops
this, because each set on its own is large.

The register keeps every set the site has released an aggregate over, for the site's lifetime,
in ``<state_dir>/sample_sets.sqlite`` (members as 64-bit hashes of their sample IDs, so a set
survives people joining or leaving the cohort). A new set is accepted only when no linear
combination of sums over the released sets and the new one is non-zero on 1..``min_count``-1
people (:func:`atoms_ok`). This bounds every differencing attack, over pairs of sets or over any
number of them (unions, intersections, complements), and also the "before and after one person
joins" attack on the whole cohort.

A study also gets at most ``max_sample_sets_per_study`` distinct sets.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from fedgen.errors import FedgenError

REGISTER_FILE = "sample_sets.sqlite"


class SetRefused(FedgenError):
    """A sample set the register refuses (the message carries no counts)."""


def hash_ids(iids: Sequence[str]) -> np.ndarray:
    """64-bit hashes of sample IDs, in the given order (the register's representation of people)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in iids),
        dtype=np.uint64,
        count=len(iids),
    )


def _digest(members: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(members, dtype=np.uint64).tobytes()).hexdigest()


#: most small atoms whose combinations are checked one by one; beyond, every small atom refuses
MAX_SMALL_ATOMS = 14


def atoms_ok(sets: Sequence[np.ndarray], new: np.ndarray, min_count: int) -> bool:
    """True when no combination of sums over ``sets`` + ``new`` isolates 1..min_count-1 people.

    The sets cut the people into atoms (people with the same membership in every set); each
    set is a 0/1 vector over atoms (matrix ``M``, sets × atoms). The aggregator can form any
    vector in the row space of ``M``. One that is non-zero only on a group of atoms ``T``
    exists exactly when ``rank(M) > rank(M without T's columns)``; such a group of fewer than
    ``min_count`` people is a leak. Only atoms smaller than ``min_count`` can be in such a group;
    their combinations are checked one by one (all of them, when there are at most
    ``MAX_SMALL_ATOMS``; otherwise any small atom refuses, the safe side).
    """
    if min_count <= 1:
        return True
    all_sets = [np.asarray(s) for s in (*sets, new)]
    universe = np.unique(np.concatenate(all_sets))
    if len(universe) == 0:
        return True
    # signature of each person: which sets hold them (packed bits), then people per signature
    bits = np.zeros((len(universe), (len(all_sets) + 7) // 8), dtype=np.uint8)
    for j, s in enumerate(all_sets):
        member = np.isin(universe, s, assume_unique=True)
        bits[member, j // 8] |= np.uint8(1 << (j % 8))
    sigs, sizes = np.unique(bits, axis=0, return_counts=True)
    small = np.flatnonzero(sizes < min_count)
    if len(small) == 0:
        return True
    if len(small) > MAX_SMALL_ATOMS:
        return False
    M = np.unpackbits(sigs, axis=1, bitorder="little")[:, : len(all_sets)].T.astype(float)  # sets × atoms
    full = np.linalg.matrix_rank(M)
    from itertools import combinations

    for r in range(1, len(small) + 1):
        for group in combinations(small.tolist(), r):
            if sizes[list(group)].sum() >= min_count:
                continue
            keep = np.ones(M.shape[1], bool)
            keep[list(group)] = False
            if np.linalg.matrix_rank(M[:, keep]) < full:
                return False
    return True


class SampleSetRegister:
    """``<state_dir>/sample_sets.sqlite``: every sample set this site released an aggregate over."""

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / REGISTER_FILE
        self._db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sets (digest TEXT PRIMARY KEY, size INTEGER, members BLOB, "
            "study_id TEXT, analysis TEXT, created REAL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS study_sets (study_id TEXT, digest TEXT, PRIMARY KEY (study_id, digest))")
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(sets)")}
        if "attrs" not in cols:  # registers written before attributes were recorded
            self._db.execute("ALTER TABLE sets ADD COLUMN attrs TEXT NOT NULL DEFAULT '[]'")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "SampleSetRegister":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sets_with_attrs(self) -> list[tuple[np.ndarray, set[str]]]:
        """Every released set with what was summed over it: ``#g``/``#x`` families and attribute names."""
        import json

        out = []
        for b, a in self._db.execute("SELECT members, attrs FROM sets"):
            names = set(json.loads(a or "[]"))
            out.append((np.frombuffer(b, dtype=np.uint64), names or {"#g", "#x", "#gx"}))  # unrecorded: all (safe side)
        return out

    def admit(self, members: np.ndarray, *, min_count: int, study_id: str, analysis: str, max_per_study: int,
              attrs: Sequence[str] = (), families: Sequence[str] = ("g", "x", "gx")) -> bool:
        """Record ``members`` as released, or raise :class:`SetRefused`. True if the set is new."""
        members = np.sort(np.asarray(members, dtype=np.uint64))
        digest = _digest(members)
        marks = {f"#{f}" for f in families}
        attrs = [*attrs, *sorted(marks)]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            known = db.execute("SELECT 1 FROM sets WHERE digest = ?", (digest,)).fetchone() is not None
            in_study = db.execute("SELECT 1 FROM study_sets WHERE study_id = ? AND digest = ?", (study_id, digest)).fetchone()
            if not in_study:
                n_study = db.execute("SELECT COUNT(*) FROM study_sets WHERE study_id = ?", (study_id,)).fetchone()[0]
                if n_study >= max_per_study:
                    raise SetRefused(
                        f"{analysis}: this study already used the most distinct sample sets the site's policy allows "
                        "(max_sample_sets_per_study); align the study's phenotypes and covariates"
                    )
            import json

            fams: dict[str, set[str]] = {}
            rows: dict[str, np.ndarray] = {}
            for d, b, a in db.execute("SELECT digest, members, attrs FROM sets"):
                fams[d] = {x for x in json.loads(a or "[]") if x.startswith("#")} or {"#g", "#x", "#gx"}
                rows[d] = np.frombuffer(b, dtype=np.uint64)
            # a set must be checked against every set that summed the same kind of values: when
            # it is new, and when a known set starts to carry a kind of values it did not before
            new_marks = marks - fams.get(digest, set())
            if new_marks:
                if 0 < len(members) < min_count:
                    raise SetRefused(f"{analysis}: the aggregate would rest on fewer samples than the site's min_count")
                # "#x" marks a set recorded before per-column marks existed: it may hold any column's values
                spans = [[m for d, m in rows.items() if d != digest and (f in fams[d] or (f.startswith("#x") and "#x" in fams[d]))]
                         for f in sorted(new_marks)]
                if not all(atoms_ok(others, members, min_count) for others in spans):
                    raise SetRefused(
                        f"{analysis}: its sample set differs from one this site already released aggregates over by "
                        "fewer people than the site's min_count; subtracting the two would reveal those people "
                        "(differencing). Use the same phenotype/covariate missingness as earlier studies, or ask the site"
                    )
            if not known:
                db.execute(
                    "INSERT INTO sets (digest, size, members, study_id, analysis, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (digest, len(members), members.tobytes(), study_id, analysis, time.time()),
                )
            if not in_study:
                db.execute("INSERT INTO study_sets VALUES (?, ?)", (study_id, digest))
            if attrs:
                (old,) = db.execute("SELECT attrs FROM sets WHERE digest = ?", (digest,)).fetchone()
                merged = sorted(set(json.loads(old or "[]")) | {str(a) for a in attrs})
                db.execute("UPDATE sets SET attrs = ? WHERE digest = ?", (json.dumps(merged), digest))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return not known


class PcaRegister:
    """PCA rank revealed per study and over the site's lifetime, and each study's frequencies.

    Every ``pca_product`` round multiplies the site's data by an aggregator-chosen basis and
    reveals ``Z_s H`` with ``H = Z_sᵀ Q`` (samples × b); ``pca_scores`` does the same with its
    loadings. At full rank these give ``Z_s Z_sᵀ`` and from it genotypes, so:

    * per study, the total basis width is capped (``pca_rank_per_study`` × N columns);
    * over the site's lifetime, the dimension of the span of every ``H`` it has multiplied its
      data by (in sample space, where the information lives) is capped (``pca_rank_lifetime`` ×
      N). An honest PCA repeated on the same data adds no new dimension; random bases add all
      of theirs. The span is kept as an orthonormal basis in ``<state_dir>/pca/revealed-*.npy``.

    A study's frequencies are bound at first use: the same variants get the same frequencies for
    the whole study (no differencing of products over varied standardisations).
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(state_dir / REGISTER_FILE), timeout=60, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS pca_rank (study_id TEXT, columns INTEGER, analysis TEXT, created REAL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS pca_freq (study_id TEXT, key TEXT, digest TEXT, PRIMARY KEY (study_id, key))")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "PcaRegister":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_pca(self, study_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM pca_rank WHERE study_id = ? AND analysis = 'pca_product'", (study_id,)).fetchone()
        return row is not None

    def charge(self, study_id: str, columns: int, *, analysis: str, per_study_cap: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            study = db.execute("SELECT COALESCE(SUM(columns), 0) FROM pca_rank WHERE study_id = ?", (study_id,)).fetchone()[0]
            if study + columns > per_study_cap:
                raise SetRefused(f"{analysis}: the study would exceed the PCA rank this site reveals per study (pca_rank_per_study)")
            db.execute("INSERT INTO pca_rank VALUES (?, ?, ?, ?)", (study_id, int(columns), analysis, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def reveal(self, state_dir: Path, cohort_key: str, H: np.ndarray, *, analysis: str, lifetime_cap: int) -> int:
        """Add the span of ``H`` (samples × b) to the site's revealed subspace; refuse past the cap.

        Returns the number of new dimensions. Directions whose residual after projecting out the
        revealed basis is below 1e-9 of ``H``'s norm are not new.
        """
        from fedgen.fileio import atomic_write_bytes

        path = Path(state_dir) / "pca" / f"revealed-{cohort_key}.npy"
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # serialises updates of the basis file too
        try:
            B = np.load(path) if path.exists() else np.zeros((H.shape[0], 0))
            if B.shape[0] != H.shape[0]:
                raise SetRefused(f"{analysis}: the site's PCA register does not match its samples")
            R = H - B @ (B.T @ H) if B.shape[1] else np.array(H, dtype=np.float64)
            scale = max(float(np.linalg.norm(H)), 1e-300)
            U, s, _ = np.linalg.svd(R, full_matrices=False)
            new = U[:, s > 1e-9 * scale]
            if new.shape[1]:
                new = new - B @ (B.T @ new)  # one more pass for orthogonality
                new, _ = np.linalg.qr(new)
                if B.shape[1] + new.shape[1] > lifetime_cap:
                    raise SetRefused(f"{analysis}: the site's lifetime PCA rank (pca_rank_lifetime) is used up")
                buf = io.BytesIO()
                np.save(buf, np.hstack([B, new]))
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, buf.getvalue(), private=True)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(new.shape[1])

    def bind_freq(self, study_id: str, key: str, digest: str) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT digest FROM pca_freq WHERE study_id = ? AND key = ?", (study_id, key)).fetchone()
            if row is None:
                db.execute("INSERT INTO pca_freq VALUES (?, ?, ?)", (study_id, key, digest))
            elif row[0] != digest:
                raise SetRefused("PCA: the study's allele frequencies changed between requests; the site answers one set per study")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
