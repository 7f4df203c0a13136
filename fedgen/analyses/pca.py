"""Site-side partials for federated PCA: sums over the site's samples; scores stay at the site.

* ``pca_product``: given the pooled ALT frequencies and a variants × b basis ``Q``, returns
  ``Z_s (Z_sᵀ Q)`` (variants × b), ``Z_s`` = this site's standardised dosages. ``Z_sᵀ Q`` is
  per sample and never leaves the site. When the variants do not fit one request, the
  aggregator sends them in blocks: ``phase="project"`` blocks add ``Z_bᵀ Q_b`` into a work
  file in the site's state folder (``<state_dir>/pca/.work/``), then ``phase="product"``
  blocks return ``Z_b H``; the work file is deleted after the last block.
* ``ld_pair_sums``: pairwise-complete sums for each requested variant and the next
  ``window - 1`` (PLINK ``--indep-pairwise``), as small unsigned integers.
* ``pca_scores``: given the final loadings ``U`` and eigenvalues, computes this site's PC
  scores ``Z_sᵀ U / sqrt(θ)`` (accumulated over blocks like ``project``), writes them to
  ``<state_dir>/pca/<study_id>.eigenvec`` (and optionally a local scatter plot), and returns
  per PC only Σv, Σv² and a 1-D histogram with small cells suppressed.
* ``pca_histograms``: 2-D histograms (PC1×PC2, PC3×PC4, …) of the stored scores on the
  aggregator's grid, small cells suppressed; one per site, for the overlay plot.

No reply array has a samples axis.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import fedgen
from fedgen.analyses import register
from fedgen.analyses.qc import SUB_BLOCK, VARIANT_INPUTS, _block_args
from fedgen.analyses.spec import Spec, arr, meta_count
from fedgen.cohort.cohort import Cohort, load_cohort
from fedgen.cohort.pcs import (
    check_study_id,
    cohort_iids,
    load_site_pcs,
    plot_site_scores,
    site_state_dir,
    write_site_pcs,
)
from fedgen.errors import FedgenError
from fedgen.site.guard import site_min_count
from fedgen.stats import pca as pcastats

#: A site with fewer samples refuses PCA requests: Z_s Z_sᵀ of a handful of samples spans
#: their genotype vectors.
MIN_SITE_SAMPLES = 10
#: Largest basis (columns) a site accepts in one request.
MAX_BASIS_COLUMNS = 256
#: Keep the decoded genotypes between the two passes of ``pca_product`` up to this many bytes.
KEEP_DECODED_BYTES = 512 * 2**20
MIN_CELL_DEFAULT = 5


def _cohort(node_config: Mapping[str, Any]) -> Cohort:
    cohort = load_cohort(node_config)
    if cohort.n_samples < MIN_SITE_SAMPLES:
        raise FedgenError(
            f"this site has {cohort.n_samples} analysed samples; PCA needs at least {MIN_SITE_SAMPLES} per site"
        )
    return cohort


def _vector(arrays: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    if name not in arrays:
        raise FedgenError(f"request has no array {name!r}")
    v = np.asarray(arrays[name], dtype=np.float64)
    if v.shape != (n,):
        raise FedgenError(f"{name!r} must have one value per requested variant")
    return v


def _matrix(arrays: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    if name not in arrays:
        raise FedgenError(f"request has no array {name!r}")
    m = np.asarray(arrays[name], dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != n or not 1 <= m.shape[1] <= MAX_BASIS_COLUMNS:
        raise FedgenError(f"{name!r} must be (variants, 1..{MAX_BASIS_COLUMNS}) with one row per requested variant")
    if not np.all(np.isfinite(m)):
        raise FedgenError(f"{name!r} has non-finite values")
    return m


def _standardisation(arrays: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    p = _vector(arrays, "freq", n)
    if np.any((p < 0) | (p > 1)):
        raise FedgenError("'freq' must hold allele frequencies in [0, 1]")
    return pcastats.variant_standardisation(p)


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(s + SUB_BLOCK, n)) for s in range(0, n, SUB_BLOCK)]


def _block_of(params: dict[str, Any]) -> tuple[int, int]:
    """(block, n_blocks) of a blocked request; (0, 1) when the request holds every variant."""
    try:
        block, n_blocks = int(params.get("block", 0)), int(params.get("n_blocks", 1))
    except (TypeError, ValueError):
        raise FedgenError("'block' and 'n_blocks' must be integers") from None
    if not 0 <= block < n_blocks <= 100_000:
        raise FedgenError("need 0 <= block < n_blocks")
    return block, n_blocks


def _accumulate(
    state: Path, tag: str, block: int, n_blocks: int, value: np.ndarray, *, keep_complete: bool = False
) -> np.ndarray | None:
    """Add ``value`` into this site's work file for ``tag``; the total once every block is in.

    Blocks must arrive in order (0, 1, …); block 0 starts a new sum. The file holds per-sample
    values and lives only in the site's state folder; once complete it is removed, unless
    ``keep_complete`` (then later requests read it with :func:`_load_accumulated`).
    """
    if n_blocks == 1 and not keep_complete:
        return value
    work = state / "pca" / ".work"
    path = work / f"{tag}.npz"
    if block == 0:
        total, nxt = value, 1
    else:
        try:
            with np.load(path) as z:
                total, nxt = z["sum"], int(z["next"])
        except (OSError, KeyError, ValueError):
            raise FedgenError(f"block {block} of {tag} arrived without the blocks before it") from None
        if nxt != block or total.shape != value.shape:
            raise FedgenError(f"block {block} of {tag} arrived out of order (expected block {nxt})")
        total, nxt = total + value, nxt + 1
    if nxt == n_blocks and not keep_complete:
        path.unlink(missing_ok=True)
        return total
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{tag}.tmp.npz"
    np.savez(tmp, sum=total, next=nxt)
    os.replace(tmp, path)
    return total if nxt == n_blocks else None


def _load_accumulated(state: Path, tag: str, n_blocks: int) -> np.ndarray:
    try:
        with np.load(state / "pca" / ".work" / f"{tag}.npz") as z:
            total, nxt = z["sum"], int(z["next"])
    except (OSError, KeyError, ValueError):
        raise FedgenError(f"no completed projection {tag} at this site (send the 'project' blocks first)") from None
    if nxt != n_blocks:
        raise FedgenError(f"projection {tag} is incomplete ({nxt} of {n_blocks} blocks)")
    return total


def _round_tag(params: dict[str, Any], what: str) -> str:
    study_id = check_study_id(str(params.get("study_id") or "study"))
    try:
        rnd = int(params.get("round", 0))
    except (TypeError, ValueError):
        raise FedgenError("'round' must be an integer") from None
    return f"{study_id}.{what}.{rnd}"


MAX_BASIS = 64  # columns of a PCA basis: enough for 20+ PCs with oversampling; far below any site's n

_BLOCK_PARAMS = frozenset({"study_id", "round", "n_blocks", "phase", "block"})


@register(
    "pca_product",
    Spec(
        params=_BLOCK_PARAMS,
        inputs={**VARIANT_INPUTS, "freq": arr("*", "v"), "basis": arr("*", "v", "b", optional=True)},
        outputs={"product": arr("f8", "v", "b", optional=True)},
        limits={"b": MAX_BASIS},
        free={"b": MAX_BASIS},
        meta=frozenset({"n_samples", "projected"}),
        contributors=meta_count("n_samples"),
        may_be_empty=True,
        doc="Z_s(Z_sᵀQ) for the aggregator's basis Q (variants × b); Z_sᵀQ stays at the site",
    ),
)
def pca_product(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """``Z_s (Z_sᵀ Q)``, (V, b) float64, for the requested variants and basis ``Q``.

    ``phase``: ``"single"`` (default; the request holds every variant), ``"project"`` (block
    ``block`` of ``n_blocks``: accumulate ``Z_bᵀ Q_b`` at the site, reply nothing) or
    ``"product"`` (block of variants: reply ``Z_b H`` with the accumulated ``H``).
    """
    cohort = _cohort(node_config)
    idx, flip = _block_args(cohort, arrays)
    two_p, inv_sd = _standardisation(arrays, len(idx))
    phase = str(params.get("phase", "single"))
    blocks = _blocks(len(idx))
    if phase == "product":
        state = site_state_dir(node_config)
        tag = _round_tag(params, "H")
        block, n_blocks = _block_of(params)
        H = _load_accumulated(state, tag, n_blocks)
        if H.shape[0] != cohort.n_samples:
            raise FedgenError("stored projection does not match this site's samples")
        Y = np.empty((len(idx), H.shape[1]))
        for sl in blocks:
            Y[sl] = pcastats.site_variant_products(cohort.block(idx[sl], flip[sl]), two_p[sl], inv_sd[sl], H)
        if block == n_blocks - 1:
            (state / "pca" / ".work" / f"{tag}.npz").unlink(missing_ok=True)
        return {"product": Y}, {"n_samples": cohort.n_samples}
    if phase not in ("single", "project"):
        raise FedgenError(f"unknown pca_product phase {phase!r}")
    Q = _matrix(arrays, "basis", len(idx))
    keep = phase == "single" and len(idx) * cohort.n_samples <= KEEP_DECODED_BYTES
    decoded: list[np.ndarray] = []
    H = np.zeros((cohort.n_samples, Q.shape[1]))
    for sl in blocks:
        g = cohort.block(idx[sl], flip[sl])
        if keep:
            decoded.append(g)
        H += pcastats.site_sample_projection(g, two_p[sl], inv_sd[sl], Q[sl])
    if phase == "project":
        block, n_blocks = _block_of(params)
        tag = _round_tag(params, "H")
        if n_blocks == 1:
            raise FedgenError("a 'project' phase needs n_blocks > 1")
        _accumulate(site_state_dir(node_config), tag, block, n_blocks, H, keep_complete=True)
        return {}, {"n_samples": cohort.n_samples, "projected": block + 1}
    Y = np.empty_like(Q)
    for b, sl in enumerate(blocks):
        g = decoded[b] if keep else cohort.block(idx[sl], flip[sl])
        Y[sl] = pcastats.site_variant_products(g, two_p[sl], inv_sd[sl], H)
    return {"product": Y}, {"n_samples": cohort.n_samples}


@register(
    "ld_pair_sums",
    Spec(
        params=frozenset({"n_first", "window"}),
        inputs=VARIANT_INPUTS,
        outputs={"pairs": arr("u2|u4", "f", "w", 6)},
        param_dims=lambda params, nc: {"f": int(params["n_first"]), "w": int(params["window"]) - 1},
        meta=frozenset({"n_samples"}),
        contributors=meta_count("n_samples"),
        doc="per variant pair in a window: pairwise-complete n, Σg_i, Σg_i², Σg_j, Σg_j², Σg_i·g_j",
    ),
)
def ld_pair_sums(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """(n_first, window-1, 6) pairwise-complete sums (n, Σg_i, Σg_i², Σg_j, Σg_j², Σg_i g_j)."""
    cohort = _cohort(node_config)
    idx, flip = _block_args(cohort, arrays)
    try:
        n_first = int(params["n_first"])
        window = int(params["window"])
    except (KeyError, TypeError, ValueError):
        raise FedgenError("ld_pair_sums needs integer parameters 'n_first' and 'window'") from None
    if not (0 <= n_first <= len(idx)) or not 2 <= window <= 100_000:
        raise FedgenError("ld_pair_sums: 'n_first' must be within the request and 2 <= window <= 100000")
    out = np.zeros((n_first, window - 1, 6), dtype=np.int64)
    for s in range(0, n_first, SUB_BLOCK):
        first = min(SUB_BLOCK, n_first - s)
        rows = slice(s, min(s + first + window - 1, len(idx)))
        g = cohort.block(idx[rows], flip[rows])
        out[s : s + first] = pcastats.site_ld_pair_sums(g, first, window)
    dtype = np.uint16 if 4 * cohort.n_samples <= np.iinfo(np.uint16).max else np.uint32
    return {"pairs": out.astype(dtype)}, {"n_samples": cohort.n_samples}


def _hist_params(params: dict[str, Any]) -> dict[str, Any]:
    h = dict(params.get("hist") or {})
    try:
        out = {
            "pcs": int(h.get("pcs", 4)),
            "bins": int(h.get("bins", 400)),
            "lo": float(h.get("lo", -1.0)),
            "hi": float(h.get("hi", 1.0)),
            "min_count": int(h.get("min_count", MIN_CELL_DEFAULT)),
        }
    except (TypeError, ValueError):
        raise FedgenError("bad histogram parameters") from None
    # a small-cell threshold below the default is not the aggregator's to choose
    out["min_count"] = max(out["min_count"], MIN_CELL_DEFAULT)
    if not (0 <= out["pcs"] <= 64 and 1 <= out["bins"] <= 100_000 and out["lo"] < out["hi"]):
        raise FedgenError("bad histogram parameters")
    return out


def _hist_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    h = dict(params.get("hist") or {})
    return {"nb": int(h.get("bins", 400))}


@register(
    "pca_scores",
    Spec(
        params=frozenset({"study_id", "block", "n_blocks", "n_variants", "theta", "eigenvalues", "hist", "local_plot"}),
        inputs={**VARIANT_INPUTS, "freq": arr("*", "v"), "loadings": arr("*", "v", "k")},
        outputs={"sums": arr("f8", "k", 2), "hist1d": arr("i8", "h", "nb", optional=True), "hidden": arr("i8", "h", optional=True)},
        param_dims=_hist_dims,
        limits={"k": MAX_BASIS},
        free={"h": MAX_BASIS},
        meta=frozenset({"n_samples", "projected", "stored"}),
        contributors=meta_count("n_samples"),
        may_be_empty=True,
        doc="stores the site's PC scores locally; replies Σ, Σ² (and, only where the site allows pca_histograms, "
        "small-cell-suppressed 1-D histograms)",
    ),
)
def pca_scores(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """Compute and store this site's PC scores; reply with Σv, Σv² and 1-D histograms per PC."""
    cohort = _cohort(node_config)
    study_id = check_study_id(str(params.get("study_id") or ""))
    idx, flip = _block_args(cohort, arrays)
    two_p, inv_sd = _standardisation(arrays, len(idx))
    U = _matrix(arrays, "loadings", len(idx))
    k = U.shape[1]
    theta = np.asarray(params.get("theta") or [], dtype=np.float64)
    if theta.shape != (k,) or not np.all(theta > 0):
        raise FedgenError("'theta' must list one positive eigenvalue per loading column")
    block, n_blocks = _block_of(params)
    proj = np.zeros((cohort.n_samples, k))
    for sl in _blocks(len(idx)):
        g = cohort.block(idx[sl], flip[sl])
        proj += pcastats.site_sample_projection(g, two_p[sl], inv_sd[sl], U[sl])
    state = site_state_dir(node_config)
    total = _accumulate(state, f"{study_id}.scores", block, n_blocks, proj)
    if total is None:
        return {}, {"n_samples": cohort.n_samples, "projected": block + 1}
    scores = total / np.sqrt(theta)
    eigenval = [float(x) for x in params.get("eigenvalues") or []]
    meta = {
        "study_id": study_id,
        "site": cohort.site,
        "fedgen_version": fedgen.__version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_samples": cohort.n_samples,
        "n_variants": int(params.get("n_variants") or len(idx)),
        "eigenvalues": eigenval,
        "scores": "unit-norm eigenvectors of the pooled variance-standardised relationship matrix (PLINK 2 .eigenvec)",
    }
    path = write_site_pcs(state, study_id, cohort_iids(cohort), scores, meta=meta)
    if params.get("local_plot"):
        plot_site_scores(scores, path.with_suffix(".png"), eigenvalues=eigenval,
                         title=f"{cohort.site}: PC scores of {cohort.n_samples} local samples (not shared)")
    sums = np.stack([scores.sum(axis=0), (scores * scores).sum(axis=0)], axis=1)
    if "pca_histograms" not in ((node_config.get("_policy") or {}).get("allowed_analyses") or ()):
        return {"sums": sums}, {"n_samples": cohort.n_samples, "stored": True}
    h = _hist_params(params)
    h["min_count"] = max(h["min_count"], site_min_count(node_config))
    n_h = min(h["pcs"], k)
    edges = np.linspace(h["lo"], h["hi"], h["bins"] + 1)
    hist = np.zeros((n_h, h["bins"]), dtype=np.int64)
    hidden = np.zeros(n_h, dtype=np.int64)
    for j in range(n_h):
        counts, _ = np.histogram(scores[:, j], bins=edges)
        hist[j], hidden[j] = pcastats.suppress_small_cells(counts, h["min_count"])
        hidden[j] += cohort.n_samples - int(counts.sum())
    return {"sums": sums, "hist1d": hist, "hidden": hidden}, {"n_samples": cohort.n_samples, "stored": True}


def _hist2d_dims(params: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, int]:
    bins = params.get("bins", 40)
    if isinstance(bins, Mapping):
        bins = bins.get(str(node_config.get("site", "")), 40)
    return {"q": len(list(params.get("pairs") or [])), "nb": int(bins)}


@register(
    "pca_histograms",
    Spec(
        params=frozenset({"study_id", "pairs", "ranges", "bins", "min_count"}),
        outputs={"hist2d": arr("i8", "q", "nb", "nb"), "outside": arr("i8", "q"), "hidden": arr("i8", "q")},
        param_dims=_hist2d_dims,
        meta=frozenset({"n_samples"}),
        contributors=meta_count("n_samples"),
        sample_level=True,
        doc="2-D histograms of the site's stored PC scores, small cells suppressed (off unless the site allows it: "
        "counts over aggregator-chosen ranges of aggregator-chosen projections can single out samples by differencing)",
    ),
)
def pca_histograms(node_config: Mapping[str, Any], params: dict[str, Any], arrays: dict[str, np.ndarray]):
    """2-D histograms of stored scores for PC pairs, small cells suppressed.

    Params: ``study_id``, ``pairs`` ([[0, 1], [2, 3]]: 0-based PC indices), ``ranges``
    ([lo, hi] per pair and axis: [[[lo, hi], [lo, hi]], ...]), ``bins`` (an integer, or a
    mapping site name → integer), ``min_count``.
    Replies ``hist2d`` (pairs, bins, bins), ``outside`` and ``hidden`` (pairs,).
    """
    cohort = _cohort(node_config)
    study_id = check_study_id(str(params.get("study_id") or ""))
    pairs = params.get("pairs") or []
    ranges = params.get("ranges") or []
    try:
        pairs = [(int(a), int(b)) for a, b in pairs]
        ranges = [((float(r[0][0]), float(r[0][1])), (float(r[1][0]), float(r[1][1]))) for r in ranges]
        bins_param = params.get("bins", 40)
        if isinstance(bins_param, Mapping):  # one grid size per site
            bins_param = bins_param.get(cohort.site, 40)
        bins = int(bins_param)
        min_count = max(int(params.get("min_count", MIN_CELL_DEFAULT)), MIN_CELL_DEFAULT, site_min_count(node_config))
    except (TypeError, ValueError, IndexError):
        raise FedgenError("pca_histograms: bad 'pairs', 'ranges' or 'bins'") from None
    if len(ranges) != len(pairs) or not 1 <= bins <= 1000 or any(min(p) < 0 for p in pairs):
        raise FedgenError("pca_histograms: one range per pair and 1 <= bins <= 1000 needed")
    if any(lo >= hi for r in ranges for lo, hi in r):
        raise FedgenError("pca_histograms: empty range")
    n_pc = 1 + max((max(p) for p in pairs), default=0)
    scores = load_site_pcs(cohort, study_id, n_pc, state_dir=site_state_dir(node_config))
    out = np.zeros((len(pairs), bins, bins), dtype=np.int64)
    outside = np.zeros(len(pairs), dtype=np.int64)
    hidden = np.zeros(len(pairs), dtype=np.int64)
    for i, ((a, b), (ra, rb)) in enumerate(zip(pairs, ranges)):
        counts, _, _ = np.histogram2d(scores[:, a], scores[:, b], bins=bins, range=[ra, rb])
        counts = counts.astype(np.int64)
        outside[i] = cohort.n_samples - int(counts.sum())
        out[i], hidden[i] = pcastats.suppress_small_cells(counts, min_count)
    return {"hist2d": out, "outside": outside, "hidden": hidden}, {"n_samples": cohort.n_samples}
