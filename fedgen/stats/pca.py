"""PCA of the standardised genotype matrix from sums over samples (PLINK 2 ``--pca`` scaling).

Samples are split across sites (horizontal partitioning), so the aggregator may only see sums
over samples. With ``Z`` the variants × samples matrix of standardised dosages (PLINK 2:
``z = (g - 2p) / sqrt(2p(1-p))``, ``p`` = pooled ALT frequency, a missing call becomes 0),
the variance-standardised relationship matrix is ``K = ZᵀZ / M`` (samples × samples) and its
non-zero eigenvalues are those of ``A / M`` with ``A = Z Zᵀ = Σ_sites Z_s Z_sᵀ`` (variants ×
variants). ``A Q`` for a variants × b basis ``Q`` is therefore a sum over samples: each site
computes ``H_s = Z_sᵀ Q`` (per sample; it never leaves the site) and returns ``Z_s H_s``.

The aggregator runs a randomized block Krylov (block Lanczos with full re-orthogonalisation)
iteration on ``A`` (:class:`BlockKrylovPCA`): round j sends the orthonormal block ``Q_j`` and
receives ``A Q_j``; a Rayleigh–Ritz step on ``span(Q_0..Q_j)`` gives eigenvalues ``θ`` and
variant loadings ``U``; it stops when every wanted Ritz pair has a small residual or its
value has stopped moving. Eigenvalues in PLINK's scale are ``θ / M``; each site's PC scores
(PLINK's unit-norm eigenvectors of ``K``, its own rows) are ``Z_sᵀ U / sqrt(θ)``.

Missing calls: this ``K`` is PLINK's ``--pca approx`` (mean imputation). PLINK's exact mode
divides each ``K_jk`` by the number of variants called in both samples; that element-wise
division has no sum-over-samples form across sites, so it is not reproduced (the eigenvalues
differ by roughly twice the missing-call rate; identical without missing calls).

Also here: PLINK 2 ``--indep-pairwise`` from summed pair statistics (:func:`site_ld_pair_sums`,
:func:`ld_prune_pairwise`), small-cell suppression for histograms, and long-range LD regions.

References
----------
Halko N, Martinsson PG, Tropp JA (2011). Finding structure with randomness. SIAM Review 53:217.
Musco C, Musco C (2015). Randomized block Krylov methods for stronger and faster approximate
singular value decomposition. NeurIPS.
Hartebrodt A, Torkzadehmahani R, et al. (2021). Federated principal component analysis for
genome-wide association studies. IEEE ICDM 2021 (federated subspace iteration; samples split).
Price AL et al. (2008). Long-range LD can confound genome scans in admixed populations. AJHG 83:132.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "VAR_FLOOR",
    "variant_standardisation",
    "standardised_dosage",
    "site_sample_projection",
    "site_variant_products",
    "site_gram_product",
    "BlockKrylovPCA",
    "plink_eigenvalues",
    "site_ld_pair_sums",
    "ld_pair_r2_exceeds",
    "ld_prune_pairwise",
    "variant_monomorphic_for_ld",
    "suppress_small_cells",
    "LONG_RANGE_LD",
    "detect_genome_build",
    "in_regions",
]

#: PLINK 2 zeroes a variant's row when 2p(1-p) is at most 2^-44 (it still counts in M).
VAR_FLOOR = 2.0**-44
#: PLINK's tie tolerance (kSmallEpsilon) in --indep-pairwise comparisons.
SMALL_EPSILON = 2.0**-44


# --------------------------------------------------------------------------- standardisation


def variant_standardisation(alt_freq: Any) -> tuple[np.ndarray, np.ndarray]:
    """Centre and inverse scale per variant, as PLINK 2's ``--pca`` standardises.

    Parameters
    ----------
    alt_freq : (V,) pooled ALT allele frequency ``p``.

    Returns
    -------
    two_p : (V,) float64, ``2p`` (the dosage mean)
    inv_sd : (V,) float64, ``1 / sqrt(2p(1-p))``; 0 where ``2p(1-p) <= 2^-44`` (or ``p`` is NaN),
        so such a variant's standardised row is all zero.
    """
    p = np.asarray(alt_freq, dtype=np.float64)
    var = 2.0 * p * (1.0 - p)
    ok = np.isfinite(var) & (var > VAR_FLOOR)
    inv_sd = np.zeros(len(p))
    inv_sd[ok] = 1.0 / np.sqrt(var[ok])
    return np.where(np.isfinite(p), 2.0 * p, 0.0), inv_sd


def standardised_dosage(dosage: Any, two_p: Any, inv_sd: Any, *, dtype: Any = np.float64) -> np.ndarray:
    """``Z`` for a block of variants: ``(g - 2p) / sd``, 0 for a missing call (-1).

    Parameters
    ----------
    dosage : (V, N) int8 ALT dosage, -1 missing.
    two_p, inv_sd : (V,) from :func:`variant_standardisation`.

    Returns
    -------
    (V, N) array of ``dtype``.
    """
    g = np.asarray(dosage)
    two_p = np.asarray(two_p, dtype=dtype)[:, None]
    inv_sd = np.asarray(inv_sd, dtype=dtype)[:, None]
    z = (g.astype(dtype) - two_p) * inv_sd
    z[g < 0] = 0.0
    return z


#: Variants standardised at once: small enough for the float64 temporaries to stay in cache
#: (4096-variant blocks of 2,000 samples ran 3-4x slower).
_CHUNK = 512


def site_sample_projection(dosage: Any, two_p: Any, inv_sd: Any, basis: Any) -> np.ndarray:
    """``Zᵀ Q`` for one block of variants, (N, b). Per sample: stays at the site."""
    g = np.asarray(dosage)
    two_p, inv_sd = np.asarray(two_p, dtype=np.float64), np.asarray(inv_sd, dtype=np.float64)
    Q = np.asarray(basis, dtype=np.float64)
    out = np.zeros((g.shape[1], Q.shape[1]))
    for s in range(0, len(g), _CHUNK):
        sl = slice(s, s + _CHUNK)
        out += standardised_dosage(g[sl], two_p[sl], inv_sd[sl]).T @ Q[sl]
    return out


def site_variant_products(dosage: Any, two_p: Any, inv_sd: Any, sample_matrix: Any) -> np.ndarray:
    """``Z H`` for one block of variants, (V, b): a sum over the site's samples."""
    g = np.asarray(dosage)
    two_p, inv_sd = np.asarray(two_p, dtype=np.float64), np.asarray(inv_sd, dtype=np.float64)
    H = np.asarray(sample_matrix, dtype=np.float64)
    out = np.empty((len(g), H.shape[1]))
    for s in range(0, len(g), _CHUNK):
        sl = slice(s, s + _CHUNK)
        out[sl] = standardised_dosage(g[sl], two_p[sl], inv_sd[sl]) @ H
    return out


def site_gram_product(dosage: Any, two_p: Any, inv_sd: Any, basis: Any) -> np.ndarray:
    """``Z (Zᵀ Q)`` for one site holding all requested variants in memory, (V, b).

    The reference definition of the site partial of :class:`BlockKrylovPCA` (the analysis
    code streams variant blocks in two passes instead).
    """
    z = standardised_dosage(dosage, two_p, inv_sd)
    return z @ (z.T @ np.asarray(basis, dtype=np.float64))


def plink_eigenvalues(theta: Any, n_variants: int) -> np.ndarray:
    """PLINK 2 ``.eigenval`` values: eigenvalues of ``Z Zᵀ`` divided by M (variants used)."""
    return np.asarray(theta, dtype=np.float64) / float(n_variants)


# --------------------------------------------------------------------------- block Krylov


def _orthonormal_columns(W: np.ndarray, *, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """``W = Q R`` with orthonormal ``Q`` spanning the numerically non-null part of ``W``."""
    if W.shape[1] == 0:
        return W, np.zeros((0, 0))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    keep = s > rtol
    return U[:, keep], s[keep, None] * Vt[keep]


class BlockKrylovPCA:
    """Aggregator state of the federated randomized block Krylov eigensolver for ``A = Z Zᵀ``.

    Usage::

        drv = BlockKrylovPCA(n_variants, k, seed=1)
        while not drv.done:
            drv.update(sum over sites of site_gram_product(..., drv.basis))
        theta, U = drv.eigenvalues, drv.loadings

    Parameters
    ----------
    n_variants : rows of ``Z`` sent to the sites (M).
    k : eigenpairs wanted.
    block : columns per round (default ``max(2k, 10)``, PLINK approx's 2K), capped by M.
    seed : seed of the Gaussian start block (numpy PCG64; reproducible, not secret).
    tol : stop when every wanted Ritz pair has ``‖A u − θ u‖ ≤ tol·θ``, or when
        ``stable_tol`` is met: all wanted Ritz values moved by ≤ ``stable_tol`` (relative)
        over the last round, and the leading ``min(k, 4)`` have residual ≤ ``sqrt(tol)·θ``.
    max_rounds : hard limit on rounds (products with ``A``).
    start : optional (M, block) start block instead of the Gaussian one.

    Notes
    -----
    The aggregator keeps the Krylov basis, M × block × rounds float64 (19,000 variants × 20
    columns × 17 rounds = 52 MB on the demo cohorts). Compared with PLINK's ``approx`` (which
    keeps every power-iteration block and does one Rayleigh–Ritz step at the end) the blocks
    are re-orthogonalised as they arrive and convergence is checked every round.
    """

    def __init__(
        self,
        n_variants: int,
        k: int,
        *,
        block: int | None = None,
        seed: int = 1,
        tol: float = 1e-5,
        stable_tol: float = 1e-8,
        max_rounds: int = 25,
        start: np.ndarray | None = None,
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        if n_variants < k:
            raise ValueError(f"{n_variants} variants cannot give {k} principal components")
        self.n_variants = int(n_variants)
        self.k = int(k)
        self.block = int(min(block or max(2 * k, 10), n_variants))
        if self.block < k:
            raise ValueError("block must be at least k")
        self.tol = float(tol)
        self.stable_tol = float(stable_tol)
        self.max_rounds = int(max_rounds)
        if start is None:
            start = np.random.default_rng(seed).standard_normal((n_variants, self.block))
        Q0, _ = _orthonormal_columns(np.asarray(start, dtype=np.float64), rtol=1e-12)
        self._Q: list[np.ndarray] = [Q0]
        self._T: dict[tuple[int, int], np.ndarray] = {}
        self.rounds = 0
        self.done = False
        self.converged = False
        self.theta = np.zeros(0)
        self.residual = np.zeros(0)
        self._W = np.zeros((0, 0))
        self._history: list[np.ndarray] = []
        self._scale = 0.0

    @property
    def basis(self) -> np.ndarray:
        """The (M, b) orthonormal block whose product ``A Q`` the sites compute next."""
        return self._Q[-1]

    @property
    def subspace_dim(self) -> int:
        return sum(q.shape[1] for q in self._Q)

    def update(self, product: Any) -> None:
        """Consume ``A Q_j`` (summed over sites) for the current block ``Q_j``."""
        if self.done:
            raise RuntimeError("BlockKrylovPCA.update after convergence")
        Y = np.asarray(product, dtype=np.float64)
        j = len(self._Q) - 1
        if Y.shape != self._Q[j].shape:
            raise ValueError(f"product has shape {Y.shape}, expected {self._Q[j].shape}")
        if not np.all(np.isfinite(Y)):
            raise ValueError("product has non-finite values")
        self.rounds += 1
        self._scale = max(self._scale, float(np.linalg.norm(Y)))
        # Y_j ∈ span(Q_0..Q_j+1): coefficients on the existing blocks, then the new block.
        W = Y.copy()
        coef = [np.zeros((q.shape[1], Y.shape[1])) for q in self._Q]
        for _ in range(2):  # classical Gram–Schmidt, twice (full re-orthogonalisation)
            for i, q in enumerate(self._Q):
                c = q.T @ W
                W -= q @ c
                coef[i] += c
        for i, c in enumerate(coef):
            self._T[(i, j)] = c
        Qn, R = _orthonormal_columns(W, rtol=1e-10 * max(self._scale, 1e-300))
        self._T[(j + 1, j)] = R
        self._ritz(j, R)
        self._history.append(self.theta[: self.k].copy())
        exhausted = Qn.shape[1] == 0 or self.subspace_dim + Qn.shape[1] > self.n_variants
        if self._is_converged() or exhausted:
            self.converged = True
            self.done = True
        elif self.rounds >= self.max_rounds:
            self.done = True
        else:
            self._Q.append(Qn)

    def _ritz(self, j: int, R: np.ndarray) -> None:
        sizes = [q.shape[1] for q in self._Q[: j + 1]]
        offs = np.concatenate([[0], np.cumsum(sizes)])
        n = int(offs[-1])
        T = np.zeros((n, n))
        for (r, c), blk in self._T.items():
            if r <= j and c <= j:
                T[offs[r] : offs[r + 1], offs[c] : offs[c + 1]] = blk
        T = 0.5 * (T + T.T)
        w, V = np.linalg.eigh(T)
        order = np.argsort(w)[::-1]
        self.theta, self._W = w[order], V[:, order]
        last = self._W[offs[j] : offs[j + 1], :]
        self.residual = np.linalg.norm(R @ last, axis=0) if R.size else np.zeros(len(w))

    def _is_converged(self) -> bool:
        k = self.k
        if len(self.theta) < k:
            return False
        th = np.maximum(self.theta[:k], 1e-300)
        rel = self.residual[:k] / th
        if np.all(rel <= self.tol):
            return True
        if len(self._history) >= 2:
            prev, cur = self._history[-2], self._history[-1]
            moved = np.abs(cur - prev) / th
            lead = min(k, 4)
            if np.all(moved <= self.stable_tol) and np.all(rel[:lead] <= np.sqrt(self.tol)):
                return True
        return False

    @property
    def eigenvalues(self) -> np.ndarray:
        """(k,) Ritz values: eigenvalues of ``Z Zᵀ`` (descending)."""
        return self.theta[: self.k].copy()

    @property
    def relative_residuals(self) -> np.ndarray:
        """(k,) ``‖A u − θ u‖ / θ`` of the returned pairs."""
        return self.residual[: self.k] / np.maximum(self.theta[: self.k], 1e-300)

    @property
    def loadings(self) -> np.ndarray:
        """(M, k) orthonormal Ritz vectors ``U`` (left singular vectors of ``Z``).

        Signs are fixed so that each column's largest-magnitude entry is positive.
        """
        U = np.zeros((self.n_variants, self.k))
        row = 0
        for q in self._Q:
            w = self._W[row : row + q.shape[1], : self.k]
            if w.shape[0] == 0:
                break
            U += q @ w
            row += q.shape[1]
            if row >= self._W.shape[0]:
                break
        pivot = np.argmax(np.abs(U), axis=0)
        sign = np.sign(U[pivot, np.arange(self.k)])
        sign[sign == 0] = 1.0
        return U * sign


# --------------------------------------------------------------------------- LD pruning


def site_ld_pair_sums(dosage: Any, n_first: int, window: int, *, tile: int = 64, fill: Any = None) -> np.ndarray:
    """Pairwise-complete sums for each variant and its next ``window - 1`` neighbours.

    Parameters
    ----------
    dosage : (R, N) int8 ALT dosage (-1 missing) of ``R >= n_first`` consecutive candidate
        variants: the ``n_first`` variants asked for, then up to ``window - 1`` that follow.
    n_first : number of leading rows whose pairs are returned.
    window : PLINK ``--indep-pairwise`` window size (variants).

    Returns
    -------
    (n_first, window - 1, 6) int64: for the pair (i, i + d), d = 1..window-1, over samples with
    both calls present: ``n``, ``Σg_i``, ``Σg_i²``, ``Σg_j``, ``Σg_j²``, ``Σg_i g_j``.
    Pairs past the last row are 0. Sums over samples: they add up across sites.
    With ``fill`` (one value per row), a missing call is imputed with it: every sample counts in
    every pair, and the sums are float64.
    """
    g = np.asarray(dosage)
    R = g.shape[0]
    W1 = int(window) - 1
    out = np.zeros((n_first, max(W1, 0), 6), dtype=np.int64 if fill is None else np.float64)
    if W1 <= 0 or n_first == 0:
        return out
    rows_used = min(R, n_first + W1)
    g = g[:rows_used]
    # float32 products of small integers are exact while every sum stays below 2^24 (4N)
    dtype = np.float32 if 4 * g.shape[1] < 2**24 and fill is None else np.float64
    if fill is None:
        present = (g >= 0).astype(dtype)
        g0 = np.where(g >= 0, g, 0).astype(dtype)
    else:
        present = np.ones(g.shape, dtype)
        g0 = np.where(g >= 0, g, np.asarray(fill, dtype=np.float64)[: g.shape[0], None]).astype(dtype)
    g2 = g0 * g0
    left = np.stack([present, g0, g2])  # (3, R, N)
    right = left[:2]  # present, g
    d = np.arange(1, W1 + 1)
    for t in range(0, n_first, tile):
        r = slice(t, min(t + tile, n_first))
        c = slice(t, min(r.stop + W1, rows_used))
        nr, nc = r.stop - t, c.stop - t
        # the six sums from two products: [present; g; g²]_rows x [present; g]_colsᵀ (five of its
        # six blocks are needed) and present_rows x g²_colsᵀ (the 3 x 3 product wasted a third)
        prod = left[:, r].reshape(3 * nr, -1) @ right[:, c].reshape(2 * nc, -1).T
        blocks = prod.reshape(3, nr, 2, nc)
        p_g2 = present[r] @ g2[c].T
        mats = (blocks[0, :, 0], blocks[1, :, 0], blocks[2, :, 0], blocks[0, :, 1], p_g2, blocks[1, :, 1])
        ii = np.arange(nr)[:, None]
        jj = ii + d[None, :]
        ok = jj < nc
        jc = np.where(ok, jj, 0)
        blk = np.stack([m[ii, jc] for m in mats], axis=-1)
        blk[~ok] = 0
        out[r] = np.rint(blk).astype(np.int64) if fill is None else blk
    return out


def ld_pair_r2_exceeds(pair_sums: Any, r2: float) -> np.ndarray:
    """PLINK's pruning test per pair: ``cov² > r2·(1+2^-44)·var_i·var_j`` (pairwise complete).

    ``pair_sums`` is (V, W-1, 6) from :func:`site_ld_pair_sums`, summed over sites. The
    covariance and variances are ``n``-scaled integers, as in plink2_ld.cc.
    """
    s = np.asarray(pair_sums)
    s = s.astype(np.int64) if s.dtype.kind in "iu" else s.astype(np.float64)
    n, sx, sxx, sy, syy, dot = (s[..., i] for i in range(6))
    cov = (dot * n - sx * sy).astype(np.float64)
    v1 = (sxx * n - sx * sx).astype(np.float64)
    v2 = (syy * n - sy * sy).astype(np.float64)
    thresh = float(r2) * (1.0 + SMALL_EPSILON)
    return cov * cov > thresh * v1 * v2


def variant_monomorphic_for_ld(counts: Any) -> np.ndarray:
    """Variants ``--indep-pairwise`` drops on sight: no hom calls, or all non-missing calls
    the same homozygote (PLINK's ±1 coding: no +1 and no -1, or all +1, or all -1)."""
    c = np.asarray(counts, dtype=np.int64)
    hom_ref, het, hom_alt = c[:, 0], c[:, 1], c[:, 2]
    nm = hom_ref + het + hom_alt
    return ((hom_ref == 0) & (hom_alt == 0)) | (hom_ref == nm) | (hom_alt == nm)


def ld_prune_pairwise(
    exceeds: Any,
    contig: Sequence[Any],
    major_freq: Any,
    *,
    window: int,
    step: int,
    drop: Any = None,
) -> np.ndarray:
    """PLINK 2.00a3.5 ``--indep-pairwise <window> <step> <r2>`` (variant-count windows).

    A port of ``IndepPairwiseThread`` (plink2_ld.cc, PLINK 1.x pruning order): windows of
    ``window`` consecutive variants per contig, moved ``step`` variants at a time; within a
    window each kept variant is compared with the kept variants after it that it has not yet
    been checked against; when a pair's r² exceeds the threshold the variant with the lower
    MAF (higher major allele frequency; the later one on a tie) is removed; repeated until no
    more removals, then the window moves. Contigs with a single variant are kept as they are.

    Parameters
    ----------
    exceeds : (V, window-1) bool, pair (i, i+d) above the r² threshold
        (:func:`ld_pair_r2_exceeds`).
    contig : (V,) contig of each candidate variant, candidates in study order.
    major_freq : (V,) major allele frequency, ``max(p, 1-p)`` (pooled).
    drop : (V,) bool, variants removed on loading (:func:`variant_monomorphic_for_ld`).

    Returns
    -------
    keep : (V,) bool, PLINK's ``.prune.in``.
    """
    ex = np.asarray(exceeds, dtype=bool)
    maj = np.asarray(major_freq, dtype=np.float64)
    n = len(maj)
    if window < 2 or not 1 <= step <= window:
        raise ValueError("need window >= 2 and 1 <= step <= window")
    removed = np.zeros(n, dtype=bool)
    mono = np.zeros(n, dtype=bool) if drop is None else np.asarray(drop, dtype=bool)
    first_unchecked = np.arange(1, n + 1)
    eps = 1.0 + SMALL_EPSILON
    contig = list(contig)
    starts = [0] + [i for i in range(1, n) if contig[i] != contig[i - 1]] + [n]

    def ld(a: int, b: int) -> bool:
        return bool(ex[a, b - a - 1])

    for c0, c1 in zip(starts[:-1], starts[1:]):
        if c1 - c0 < 2:
            continue
        win: list[int] = []
        start = c0
        end = c0 + min(c1 - c0, window)
        cur = c0
        while True:
            while cur < end:
                if mono[cur]:
                    removed[cur] = True
                win.append(cur)
                cur += 1
            # window complete: PLINK 1.x order, repeated until nothing more is removed
            while True:
                before = int(removed[win].sum())
                fw = 0
                size = len(win)
                while True:
                    while fw < size and removed[win[fw]]:
                        fw += 1
                    if fw == size:
                        break
                    f = win[fw]
                    fu = first_unchecked[f]
                    sw = fw + 1
                    while sw < size:
                        if removed[win[sw]]:
                            sw += 1
                            continue
                        if win[sw] >= fu:
                            while True:
                                s = win[sw]
                                if ld(f, s):
                                    if maj[f] > maj[s] * eps:
                                        removed[f] = True
                                    else:
                                        removed[s] = True
                                        nxt = sw + 1
                                        while nxt < size and removed[win[nxt]]:
                                            nxt += 1
                                        first_unchecked[f] = win[nxt] if nxt < size else cur
                                    break
                                sw += 1
                                while sw < size and removed[win[sw]]:
                                    sw += 1
                                if sw == size:
                                    first_unchecked[f] = cur
                                    break
                            break
                        sw += 1
                    fw += 1
                if int(removed[win].sum()) <= before:
                    break
            if end == c1:
                break
            start += step
            end = min(start + window, c1)
            win = [v for v in win if not removed[v] and v >= start]
    return ~removed


# --------------------------------------------------------------------------- histograms


def suppress_small_cells(counts: Any, min_count: int) -> tuple[np.ndarray, int]:
    """Zero every non-empty cell holding fewer than ``min_count`` samples.

    Returns the suppressed counts (int64) and how many samples were in suppressed cells.
    """
    c = np.asarray(counts, dtype=np.int64).copy()
    small = (c > 0) & (c < int(min_count))
    hidden = int(c[small].sum())
    c[small] = 0
    return c, hidden


# --------------------------------------------------------------------------- long-range LD

#: Long-range LD regions to leave out of PCA (Price et al. 2008, Table 1, as used by
#: plinkQC / flashpca), 0-based half-open BED intervals on harmonised contig names.
#: GRCh38: the main UCSC liftOver segment of each region (tiny liftOver fragments on other
#: contigs dropped).
LONG_RANGE_LD: dict[str, list[tuple[str, int, int]]] = {
    "GRCh37": [
        ("1", 48227412, 52227412), ("2", 86146488, 101133568), ("2", 183291754, 190291755),
        ("3", 47524995, 50024996), ("3", 83417309, 86917310), ("5", 44464242, 50464243),
        ("5", 128972100, 131972101), ("6", 25392020, 33392022), ("6", 56892040, 63942041),
        ("6", 139958306, 142458307), ("7", 55032505, 66362565), ("8", 7962589, 11962591),
        ("8", 42880842, 49837447), ("8", 111930823, 114930824), ("10", 36959993, 43679994),
        ("11", 87860351, 90860352), ("12", 33108732, 41713733), ("20", 32536338, 35066586),
    ],
    "GRCh38": [
        ("1", 47761740, 51761740), ("2", 85919365, 100517106), ("2", 182427027, 189427029),
        ("3", 47483505, 49987563), ("3", 83368158, 86868160), ("5", 44464140, 51168409),
        ("5", 129636407, 132636409), ("6", 25391792, 33424245), ("6", 57788603, 58453888),
        ("6", 61109122, 61357029), ("6", 139637169, 142137170), ("7", 54964812, 66897578),
        ("8", 8105067, 12105082), ("8", 43025699, 48924888), ("8", 110918594, 113918595),
        ("10", 36671065, 43184546), ("11", 88127183, 91127184), ("12", 32955798, 41319931),
        ("20", 33948532, 36438183),
    ],
}

_BUILD_LENGTHS: dict[str, dict[str, int]] = {
    "GRCh37": {"1": 249250621, "2": 243199373, "3": 198022430, "4": 191154276, "5": 180915260,
               "6": 171115067, "7": 159138663, "8": 146364022, "10": 135534747, "11": 135006516,
               "12": 133851895, "20": 63025520, "22": 51304566},
    "GRCh38": {"1": 248956422, "2": 242193529, "3": 198295559, "4": 190214555, "5": 181538259,
               "6": 170805979, "7": 159345973, "8": 145138636, "10": 133797422, "11": 135086622,
               "12": 133275309, "20": 64444167, "22": 50818468},
}


def detect_genome_build(contig_lengths: Mapping[str, Any]) -> str | None:
    """``"GRCh37"``, ``"GRCh38"`` or None from declared contig lengths (harmonised names).

    A build is recognised when at least one autosome's length matches it and none matches
    only the other build.
    """
    hits = {b: 0 for b in _BUILD_LENGTHS}
    for name, length in contig_lengths.items():
        if not length:
            continue
        for b, table in _BUILD_LENGTHS.items():
            if table.get(str(name)) == int(length):
                hits[b] += 1
    found = [b for b, h in hits.items() if h]
    return found[0] if len(found) == 1 else None


def in_regions(chrom: Sequence[str], pos: Any, regions: Sequence[tuple[str, int, int]]) -> np.ndarray:
    """(V,) bool: 1-based ``pos`` on ``chrom`` inside a 0-based half-open BED interval."""
    chrom_arr = np.asarray(chrom).astype(str)
    pos_arr = np.asarray(pos, dtype=np.int64)
    hit = np.zeros(len(pos_arr), dtype=bool)
    for c, a, b in regions:
        hit |= (chrom_arr == c) & (pos_arr > a) & (pos_arr <= b)
    return hit
