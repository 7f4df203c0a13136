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
from fedgen.analyses.spec import AnalysisRequest, Spec, arr, meta_count, small_cells
from fedgen.cohort.cohort import Cohort
from fedgen.cohort.pcs import (
    check_study_id,
    cohort_iids,
    load_site_pcs,
    plot_site_scores,
    write_site_pcs,
)
from fedgen.errors import FedgenError
from fedgen.stats import pca as pcastats

#: A site with fewer samples refuses PCA requests: Z_s Z_sᵀ of a handful of samples spans
#: their genotype vectors.
MIN_SITE_SAMPLES = 10
#: Largest basis (columns) a site accepts in one request.
MAX_BASIS_COLUMNS = 256
#: Keep the decoded genotypes between the two passes of ``pca_product`` up to this many bytes.
KEEP_DECODED_BYTES = 512 * 2**20
MIN_CELL_DEFAULT = 5


def _cohort(cohort: Cohort) -> Cohort:
    if cohort.n_samples < MIN_SITE_SAMPLES:
        raise FedgenError(f"this site has too few analysed samples for PCA (it needs at least {MIN_SITE_SAMPLES})")
    return cohort


def _state(req: AnalysisRequest) -> Path:
    if req.rules.state_dir is None:
        raise FedgenError("the site has no state folder")
    return Path(req.rules.state_dir)


#: how far (in standard errors of the site's own estimate, plus a rounding allowance) a PCA
#: request's frequency may lie from the site's own allele frequency
FREQ_TOLERANCE_SE = 8.0


def _site_freq_ok(cohort: Cohort, idx: np.ndarray, flip: np.ndarray, freq: np.ndarray) -> None:
    """PCA frequencies must be plausible pooled estimates given this site's own data.

    Route closed: crafted frequencies (near 0 or 1 for variants the site's people carry) blow up
    the standardisation of a few carriers, so the product is dominated by their genotypes.
    """
    counts = np.zeros(len(idx))
    called = np.zeros(len(idx))
    for sl in _blocks(len(idx)):
        g = cohort.block(idx[sl], flip[sl])
        ok = g >= 0
        counts[sl] = np.where(ok, g, 0).sum(1)
        called[sl] = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_site = np.where(called > 0, counts / (2 * np.maximum(called, 1)), np.nan)
    se = np.sqrt(np.clip(f_site * (1 - f_site), 0.25 / np.maximum(called, 1), None) / (2 * np.maximum(called, 1)))
    bad = np.isfinite(f_site) & (np.abs(freq - f_site) > FREQ_TOLERANCE_SE * se + 1.0 / (2 * np.maximum(called, 1)))
    if bad.any():
        raise FedgenError("PCA: the request's allele frequencies are not consistent with this site's data")


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


PCA_OPT_IN = ("its exact products reveal who is in the site's cohort: a membership test on an honest PCA transcript "
              "reaches an AUC near 1 even at rank 5 (docs/THREAT_MODEL.md)")
MAX_LD_WINDOW = 1000
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
        sample_sets=lambda cohort, req: [np.ones(cohort.n_samples, bool)],
        validate=lambda cohort, req: _validate_pca(cohort, req),
        rank=lambda req: _rank_of(req, "basis"),
        opt_in_reason=PCA_OPT_IN,
        doc="Z_s(Z_sᵀQ) for the aggregator's basis Q (variants × b); Z_sᵀQ stays at the site",
    ),
)
def pca_product(cohort: Any, req: AnalysisRequest):
    """``Z_s (Z_sᵀ Q)``, (V, b) float64, for the requested variants and basis ``Q``.

    ``phase``: ``"single"`` (default; the request holds every variant), ``"project"`` (block
    ``block`` of ``n_blocks``: accumulate ``Z_bᵀ Q_b`` at the site, reply nothing) or
    ``"product"`` (block of variants: reply ``Z_b H`` with the accumulated ``H``).
    """
    cohort = _cohort(cohort)
    params, arrays = req.params, req.arrays
    idx, flip = _block_args(cohort, arrays)
    two_p, inv_sd = _standardisation(arrays, len(idx))
    phase = str(params.get("phase", "single"))
    blocks = _blocks(len(idx))
    if phase == "product":
        state = _state(req)
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
        total = _accumulate(_state(req), tag, block, n_blocks, H, keep_complete=True)
        out = {} if total is None else {"_H": total}  # complete: the products that follow reveal Z_b H
        return out, {"n_samples": cohort.n_samples, "projected": block + 1}
    Y = np.empty_like(Q)
    for b, sl in enumerate(blocks):
        g = decoded[b] if keep else cohort.block(idx[sl], flip[sl])
        Y[sl] = pcastats.site_variant_products(g, two_p[sl], inv_sd[sl], H)
    return {"product": Y, "_H": H}, {"n_samples": cohort.n_samples}


@register(
    "ld_pair_sums",
    Spec(
        params=frozenset({"n_first", "window", "missing"}),
        inputs=VARIANT_INPUTS,
        outputs={"pairs": arr("u2|u4|f8", "f", "w", 6)},
        param_dims=lambda params, nc: {"f": int(params["n_first"]), "w": int(params["window"]) - 1},
        limits={"w": MAX_LD_WINDOW - 1},
        meta=frozenset({"n_samples", "suppressed"}),
        contributors=meta_count("n_samples"),
        sample_sets=lambda cohort, req: [np.ones(cohort.n_samples, bool)],
        validate=lambda cohort, req: _validate_ld(cohort, req),
        doc="per variant pair in a window: n, Σg_i, Σg_i², Σg_j, Σg_j², Σg_i·g_j (missing calls at the site's "
        "best-guess genotype, or pairwise complete under missing: drop)",
    ),
)
def ld_pair_sums(cohort: Any, req: AnalysisRequest):
    """(n_first, window-1, 6) sums (n, Σg_i, Σg_i², Σg_j, Σg_j², Σg_i g_j) per variant pair.

    A pair is withheld (all zero) when either variant has 1..min_cell-1 carriers of one of its
    alleles at the site, or when the two lie on different contigs or further apart than the site's
    ``ld_max_window_bp`` (route: a window of cross-products around a rare variant spells out
    its carriers' genotypes).
    """
    cohort = _cohort(cohort)
    params, arrays = req.params, req.arrays
    idx, flip = _block_args(cohort, arrays)
    n_first, window = int(params["n_first"]), int(params["window"])
    impute = str(params.get("missing", "impute")) == "impute"
    out = np.zeros((n_first, window - 1, 6), dtype=np.int64)
    def best_guess(g: np.ndarray) -> np.ndarray:
        """Missing calls at the variant's mean dosage rounded to a whole genotype (as in association)."""
        called = g >= 0
        fill = np.rint(np.where(called.any(1), np.where(called, g, 0).sum(1) / np.maximum(called.sum(1), 1), 0.0))
        return np.where(called, g, fill[:, None].astype(g.dtype))

    small = np.zeros(len(idx), dtype=bool)
    for s in range(0, len(idx), SUB_BLOCK):
        g = cohort.block(idx[s : s + SUB_BLOCK], flip[s : s + SUB_BLOCK])
        gi = best_guess(g) if impute else g
        # carriers of A1, of A2, and people unlike the variant's most common genotype (a variant where
        # everyone is het but one person makes Σ(g_i − 1)·g_j that person's genotypes)
        n_k = np.stack([np.count_nonzero(gi == k, axis=1) for k in (0, 1, 2)], axis=1)
        odd = n_k.sum(1) - n_k.max(1)
        small[s : s + len(g)] = small_cells(np.stack([(gi > 0).sum(1), ((gi >= 0) & (gi < 2)).sum(1), odd], axis=1),
                                            req.rules.min_cell)
    for s in range(0, n_first, SUB_BLOCK):
        first = min(SUB_BLOCK, n_first - s)
        rows = slice(s, min(s + first + window - 1, len(idx)))
        g = cohort.block(idx[rows], flip[rows])
        if impute:  # whole genotypes, every sample in every pair: the sums are integers
            out[s : s + first] = pcastats.site_ld_pair_sums(best_guess(g), first, window)
        else:
            out[s : s + first] = pcastats.site_ld_pair_sums(g, first, window)
    # pairs withheld: a small cell at either end, different contigs, or too far apart
    pos, chrom = cohort.pos[idx], cohort.chrom[idx]
    i = np.arange(n_first)[:, None]
    j = i + np.arange(1, window)[None, :]
    inside = j < len(idx)
    jc = np.where(inside, j, 0)
    withheld = inside & (small[i] | small[jc] | (chrom[i] != chrom[jc]) | (pos[jc] - pos[i] > req.rules.ld_max_window_bp))
    out[withheld] = 0
    meta = {"n_samples": cohort.n_samples}
    if withheld.any():
        meta["suppressed"] = int(withheld.sum())
    dtype = np.uint16 if 4 * cohort.n_samples <= np.iinfo(np.uint16).max else np.uint32
    return {"pairs": out.astype(dtype)}, meta


def _validate_pca(cohort: Cohort, req: AnalysisRequest) -> None:
    """PCA requests: frequencies consistent with the site's own data (see :func:`_site_freq_ok`)."""
    cohort = _cohort(cohort)
    idx, flip = _block_args(cohort, req.arrays)
    p = _vector(req.arrays, "freq", len(idx))
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise FedgenError("'freq' must hold allele frequencies in [0, 1]")
    _site_freq_ok(cohort, idx, flip, p)


def _rank_of(req: AnalysisRequest, key: str) -> int:
    """Basis columns a request multiplies the site's data by (once per round or per score pass)."""
    phase = str(req.params.get("phase", "single"))
    if phase == "product":
        return 0
    try:
        block = int(req.params.get("block", 0))
    except (TypeError, ValueError):
        raise FedgenError("'block' must be an integer") from None
    a = req.arrays.get(key)
    return 0 if a is None or block != 0 else int(np.shape(a)[1]) if np.ndim(a) == 2 else 0


def _validate_ld(cohort: Cohort, req: AnalysisRequest) -> None:
    """LD requests: the site's own order (strictly increasing positions on one contig), bounded windows.

    Route closed: aggregator-chosen index sets (any variants, any window) give the exact
    cross-product matrix of the site's genotypes, from which every genotype follows.
    """
    from fedgen.analyses.assoc import check_missing_mode

    try:
        n_first, window = int(req.params["n_first"]), int(req.params["window"])
    except (KeyError, TypeError, ValueError):
        raise FedgenError("ld_pair_sums needs integer parameters 'n_first' and 'window'") from None
    idx, _ = _block_args(cohort, req.arrays)
    if not (0 <= n_first <= len(idx)) or not 2 <= window <= MAX_LD_WINDOW:
        raise FedgenError(f"ld_pair_sums: 'n_first' must be within the request and 2 <= window <= {MAX_LD_WINDOW}")
    if len(idx) > 1:
        chrom = cohort.chrom[idx]
        if np.any(chrom != chrom[0]):
            raise FedgenError("ld_pair_sums: a request covers one contig")
        if np.any(np.diff(idx) <= 0) or np.any(np.diff(cohort.pos[idx]) < 0):
            raise FedgenError("ld_pair_sums: variants must be in the site's order (increasing positions, no repeats)")
    check_missing_mode(cohort, req)


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
        sample_sets=lambda cohort, req: [np.ones(cohort.n_samples, bool)],
        validate=lambda cohort, req: _validate_pca(cohort, req),
        rank=lambda req: _rank_of(req, "loadings"),
        opt_in_reason=PCA_OPT_IN,
        needs_study_pca=True,
        doc="stores the site's PC scores locally; replies Σ, Σ² (and, only where the site allows pca_histograms, "
        "small-cell-suppressed 1-D histograms)",
    ),
)
def pca_scores(cohort: Any, req: AnalysisRequest):
    """Compute and store this site's PC scores; reply with Σv, Σv² and 1-D histograms per PC.

    The loadings must belong to a PCA this site answered for the study (the pipeline checks
    this and charges their width to the PCA rank register), and every stored PC must spread
    over many people: a PC whose squared scores have a Kish effective size below min_count is
    refused (route: planted "PCs" that single people out and then enter a GLM as covariates).
    """
    cohort = _cohort(cohort)
    params, arrays = req.params, req.arrays
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
    state = _state(req)
    total = _accumulate(state, f"{study_id}.scores", block, n_blocks, proj)
    if total is None:
        return {}, {"n_samples": cohort.n_samples, "projected": block + 1}
    scores = total / np.sqrt(theta)
    sq = scores * scores
    with np.errstate(invalid="ignore", divide="ignore"):
        neff = np.where(sq.sum(0) > 0, sq.sum(0) ** 2 / np.maximum((sq * sq).sum(0), 1e-300), 0.0)
    if np.any(neff < max(req.rules.min_count, MIN_SITE_SAMPLES)):
        raise FedgenError("pca_scores: a PC would rest on a few people at this site (not a PCA of the study's data)")
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
        try:
            plot_site_scores(scores, path.with_suffix(".png"), eigenvalues=eigenval,
                             title=f"{cohort.site}: PC scores of {cohort.n_samples} local samples (not shared)")
        except ImportError:  # a site-node install has no matplotlib: the plot is a local extra, the scores are stored
            import logging

            logging.getLogger(__name__).warning("local PC plot skipped: matplotlib is not installed at this site "
                                                "(pip install matplotlib to have it)")
    sums = np.stack([scores.sum(axis=0), (scores * scores).sum(axis=0)], axis=1)
    if "pca_histograms" not in ((req.rules.public_policy or {}).get("allowed_analyses") or ()):
        return {"sums": sums, "_H": scores}, {"n_samples": cohort.n_samples, "stored": True}
    h = _hist_params(params)
    h["min_count"] = max(h["min_count"], req.rules.min_count)
    n_h = min(h["pcs"], k)
    edges = np.linspace(h["lo"], h["hi"], h["bins"] + 1)
    hist = np.zeros((n_h, h["bins"]), dtype=np.int64)
    hidden = np.zeros(n_h, dtype=np.int64)
    for j in range(n_h):
        counts, _ = np.histogram(scores[:, j], bins=edges)
        hist[j], hidden[j] = pcastats.suppress_small_cells(counts, h["min_count"])
        hidden[j] += cohort.n_samples - int(counts.sum())
    return {"sums": sums, "hist1d": hist, "hidden": hidden, "_H": scores}, {"n_samples": cohort.n_samples, "stored": True}


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
def pca_histograms(cohort: Any, req: AnalysisRequest):
    """2-D histograms of stored scores for PC pairs, small cells suppressed.

    Params: ``study_id``, ``pairs`` ([[0, 1], [2, 3]]: 0-based PC indices), ``ranges``
    ([lo, hi] per pair and axis: [[[lo, hi], [lo, hi]], ...]), ``bins`` (an integer, or a
    mapping site name → integer), ``min_count``.
    Replies ``hist2d`` (pairs, bins, bins), ``outside`` and ``hidden`` (pairs,).
    """
    cohort = _cohort(cohort)
    params = req.params
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
        min_count = max(int(params.get("min_count", MIN_CELL_DEFAULT)), MIN_CELL_DEFAULT, req.rules.min_count)
    except (TypeError, ValueError, IndexError):
        raise FedgenError("pca_histograms: bad 'pairs', 'ranges' or 'bins'") from None
    if len(ranges) != len(pairs) or not 1 <= bins <= 1000 or any(min(p) < 0 for p in pairs):
        raise FedgenError("pca_histograms: one range per pair and 1 <= bins <= 1000 needed")
    if any(lo >= hi for r in ranges for lo, hi in r):
        raise FedgenError("pca_histograms: empty range")
    n_pc = 1 + max((max(p) for p in pairs), default=0)
    scores = load_site_pcs(cohort, study_id, n_pc, state_dir=_state(req))
    out = np.zeros((len(pairs), bins, bins), dtype=np.int64)
    outside = np.zeros(len(pairs), dtype=np.int64)
    hidden = np.zeros(len(pairs), dtype=np.int64)
    for i, ((a, b), (ra, rb)) in enumerate(zip(pairs, ranges)):
        counts, _, _ = np.histogram2d(scores[:, a], scores[:, b], bins=bins, range=[ra, rb])
        counts = counts.astype(np.int64)
        outside[i] = cohort.n_samples - int(counts.sum())
        out[i], hidden[i] = pcastats.suppress_small_cells(counts, min_count)
    return {"hist2d": out, "outside": outside, "hidden": hidden}, {"n_samples": cohort.n_samples}
