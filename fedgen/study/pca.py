"""Federated PCA at the aggregator: variant selection, LD pruning, block Krylov SVD, site scores.

Protocol (every reply is a sum over one site's samples; see :mod:`fedgen.analyses.pca`):

1. *Selection* (no round): variants passing QC, MAF ≥ ``pca.maf`` by pooled counts, outside
   the long-range LD regions when the genome build is recognised.
2. *LD pruning* (optional, ``pca.ld_prune``): ``ld_pair_sums`` per block of candidates; the
   aggregator runs PLINK 2's ``--indep-pairwise`` on the summed pair statistics.
3. *Block Krylov SVD*: iteration j sends the orthonormal M × b block ``Q_j`` (plus the pooled
   ALT frequencies and each site's variant indices); each site returns ``Z_s Z_sᵀ Q_j``
   (M × b). :class:`fedgen.stats.pca.BlockKrylovPCA` does Rayleigh–Ritz on the Krylov
   space until converged. Eigenvalues ``θ/M`` (PLINK 2's scaling) go to ``pca.eigenval``.
   One message round per iteration when the M variants fit one request (``block_size``);
   otherwise 2 × (number of variant blocks) rounds: ``project`` blocks (the site adds
   ``Z_bᵀ Q_b`` into a work file in its state folder) then ``product`` blocks.
4. *Scores* (one round per variant block): the M × k loadings go to the sites; each writes its
   samples' scores to ``<state_dir>/pca/<study_id>.eigenvec`` and returns Σv, Σv² and 1-D
   histograms.
5. *Histograms* (one round): per-site 2-D histograms of PC1×PC2 and PC3×PC4 on a grid chosen
   from the pooled 1-D histograms, small cells suppressed at the site; overlaid by site in
   ``plots/pca_sites.png``.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedgen.errors import ConfigError, FedgenError
from fedgen.federation.transport import Reply, Request
from fedgen.stats import pca as pcastats
from fedgen.stats.plinkfmt import format_g6
from fedgen.stats.qc import variant_alt_freq
from fedgen.study.align import Alignment
from fedgen.study.writers import atomic_write_text, write_tsv

log = logging.getLogger("fedgen.study")

#: ``study.pca`` keys and their defaults.
PCA_DEFAULTS: dict[str, Any] = {
    "k": 10,
    "maf": 0.05,
    "ld_prune": None,
    "exclude_long_range_ld": True,
    "build": "auto",
    "seed": 1,
    "block": None,
    "max_rounds": 25,
    "tol": 1e-5,
    "hist_bins": 40,
    "min_cell": 5,
    "local_plot": False,
}
LD_PRUNE_DEFAULTS: dict[str, Any] = {"window": 50, "step": 5, "r2": 0.2}


def pca_settings(pca: Mapping[str, Any] | None, *, pcs: int | None = None) -> dict[str, Any]:
    """Validate ``study.pca`` (and ``study.pcs``) and fill defaults. Raises :class:`ConfigError`.

    ``ld_prune``: ``null`` (no pruning), ``true`` (PLINK's classic ``50 5 0.2``) or a mapping
    ``{window: variants, step: variants, r2: threshold}``. ``build``: ``auto`` (from the VCF
    headers' contig lengths), ``GRCh37``, ``GRCh38`` or ``null`` (do not exclude regions).
    """
    given = dict(pca or {})
    unknown = sorted(set(given) - set(PCA_DEFAULTS))
    if unknown:
        raise ConfigError(f"study.pca: unknown key(s) {', '.join(unknown)} (known: {', '.join(PCA_DEFAULTS)})")
    cfg = {**PCA_DEFAULTS, **given}

    def integer(name: str, lo: int, hi: int) -> int:
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or not lo <= int(v) <= hi:
            raise ConfigError(f"study.pca.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return int(v)

    cfg["k"] = integer("k", 1, 100)
    cfg["seed"] = integer("seed", 0, 2**32 - 1)
    cfg["max_rounds"] = integer("max_rounds", 1, 1000)
    cfg["hist_bins"] = integer("hist_bins", 5, 400)
    cfg["min_cell"] = integer("min_cell", 5, 10_000)
    if cfg["block"] is not None:
        cfg["block"] = integer("block", cfg["k"], 256)
    if cfg["maf"] is not None and not (isinstance(cfg["maf"], (int, float)) and 0 <= float(cfg["maf"]) < 0.5):
        raise ConfigError(f"study.pca.maf must be a number in [0, 0.5) or null, got {cfg['maf']!r}")
    cfg["maf"] = None if cfg["maf"] is None else float(cfg["maf"])
    if not (isinstance(cfg["tol"], (int, float)) and 0 < float(cfg["tol"]) < 1):
        raise ConfigError(f"study.pca.tol must be in (0, 1), got {cfg['tol']!r}")
    if cfg["build"] not in (None, "auto", "GRCh37", "GRCh38"):
        raise ConfigError(f"study.pca.build must be auto, GRCh37, GRCh38 or null, got {cfg['build']!r}")
    lp = cfg["ld_prune"]
    if lp is True:
        lp = dict(LD_PRUNE_DEFAULTS)
    elif lp is False:
        lp = None
    if lp is not None:
        if not isinstance(lp, Mapping):
            raise ConfigError("study.pca.ld_prune must be null or {window: N, step: N, r2: X}")
        bad = sorted(set(lp) - set(LD_PRUNE_DEFAULTS))
        if bad:
            raise ConfigError(f"study.pca.ld_prune: unknown key(s) {', '.join(bad)} (known: window, step, r2)")
        lp = {**LD_PRUNE_DEFAULTS, **lp}
        try:
            window, step, r2 = int(lp["window"]), int(lp["step"]), float(lp["r2"])
        except (TypeError, ValueError):
            raise ConfigError("study.pca.ld_prune: window and step must be integers, r2 a number") from None
        if not (2 <= window <= 10_000 and 1 <= step <= window and 0 <= r2 < 1):
            raise ConfigError("study.pca.ld_prune needs 2 <= window <= 10000, 1 <= step <= window, 0 <= r2 < 1")
        lp = {"window": window, "step": step, "r2": r2}
    cfg["ld_prune"] = lp
    cfg["exclude_long_range_ld"] = bool(cfg["exclude_long_range_ld"])
    cfg["local_plot"] = bool(cfg["local_plot"])
    if pcs is not None:
        if isinstance(pcs, bool) or int(pcs) != pcs or not 0 <= int(pcs) <= cfg["k"]:
            raise ConfigError(f"study.pcs must be an integer between 0 and study.pca.k = {cfg['k']}, got {pcs!r}")
    return cfg


class _Traffic:
    """Rounds and bytes per phase (replies = what each site sent; requests = what it got)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.rounds: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def query(self, phase: str, request: Request) -> dict[str, Reply]:
        return self.query_many(phase, [request])[0]

    def query_many(self, phase: str, requests: list[Request]) -> list[dict[str, Reply]]:
        """Independent requests in one round (one batch message per site)."""
        out = self.ctx.query_many(requests)
        self.rounds[phase] = self.rounds.get(phase, 0) + 1
        key = f"pca:{phase}"  # the manifest's rounds per phase
        self.ctx.phase_rounds[key] = self.ctx.phase_rounds.get(key, 0) + 1
        for request, replies in zip(requests, out):
            for site, rep in replies.items():
                self.sent[site] = self.sent.get(site, 0) + int(rep.nbytes)
                self.received[site] = self.received.get(site, 0) + sum(
                    int(np.asarray(a).nbytes) for a in request.arrays_for(site).values())
        return out


def _total(replies: Mapping[str, Reply], key: str, *, dtype: Any = np.float64) -> np.ndarray:
    total = None
    for site, rep in replies.items():
        if key not in rep.arrays:
            raise FedgenError(f"site {site}: reply has no {key!r} array")
        a = np.asarray(rep.arrays[key], dtype=dtype)
        if total is not None and a.shape != total.shape:
            raise FedgenError(f"site {site}: {key!r} has shape {a.shape}, expected {total.shape}")
        total = a.copy() if total is None else total + a
    if total is None:
        raise FedgenError("no site replied")
    return total


def _site_arrays(aln: Alignment, rows: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    return {s: {"idx": aln.idx[s][rows], "flip": aln.flip[s][rows]} for s in aln.idx}


# --------------------------------------------------------------------------- selection


def select_pca_variants(
    aln: Alignment,
    counts: np.ndarray,
    qc_pass: np.ndarray,
    *,
    maf: float | None,
    build: str | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows of ``aln`` used for PCA before LD pruning, and a summary of the filters."""
    f, obs = variant_alt_freq(counts)
    with np.errstate(invalid="ignore"):
        minor = np.minimum(f, 1 - f)
    ok = np.asarray(qc_pass, dtype=bool) & (obs > 0)
    n_qc = int(ok.sum())
    if maf is not None:
        ok &= np.nan_to_num(minor, nan=-1.0) >= maf
    n_maf = int(ok.sum())
    excluded = 0
    if build:
        hit = pcastats.in_regions(aln.chrom.tolist(), aln.pos, pcastats.LONG_RANGE_LD[build]) & ok
        excluded = int(hit.sum())
        ok &= ~hit
    info = {
        "passing_qc": n_qc,
        "passing_maf": n_maf,
        "long_range_ld_excluded": excluded,
        "build": build,
        "candidates": int(ok.sum()),
    }
    return np.flatnonzero(ok), info


def resolve_build(setting: str | None, exclude: bool, info: Mapping[str, Reply] | None) -> tuple[str | None, str]:
    """Build whose long-range LD regions are excluded, and a note saying why."""
    if not exclude or setting is None:
        return None, "long-range LD regions not excluded (switched off)"
    if setting in ("GRCh37", "GRCh38"):
        return setting, f"long-range LD regions of {setting} excluded (configured)"
    builds = set()
    for site, rep in (info or {}).items():
        builds.add(pcastats.detect_genome_build(rep.meta.get("contigs") or {}))
    if len(builds) == 1 and None not in builds:
        b = builds.pop()
        return b, f"long-range LD regions of {b} excluded (build recognised from contig lengths)"
    return None, "genome build not recognised from the VCF headers; long-range LD regions not excluded"


# --------------------------------------------------------------------------- LD pruning


def federated_ld_prune(
    traffic: _Traffic,
    aln: Alignment,
    counts: np.ndarray,
    rows: np.ndarray,
    *,
    window: int,
    step: int,
    r2: float,
    block: int,
    missing: str = "impute",
) -> np.ndarray:
    """PLINK 2 ``--indep-pairwise window step r2`` over candidate ``rows``; returns kept rows.

    Requests cover one contig each (sites refuse anything else). With ``missing="impute"``
    the sites impute missing calls at their own mean dosage; ``"drop"`` is PLINK's pairwise
    complete computation (sites must allow per-variant sample sets).
    """
    n = len(rows)
    if n == 0:
        return rows
    W1 = window - 1
    dtype = np.int64
    pair_sums = np.zeros((n, W1, 6), dtype=dtype)
    step_rows = max(1, int(block) - W1)  # a request (rows + look-ahead) stays within block_size
    chrom = aln.chrom[rows]
    bounds = np.flatnonzero(np.r_[True, chrom[1:] != chrom[:-1], True])
    # one request per contig piece (sites refuse windows across contigs); the pieces travel
    # together, up to block_size variants per round
    pending: list[tuple[int, int, Request]] = []
    for c0, c1 in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for b0 in range(c0, c1, step_rows):
            first = int(min(step_rows, c1 - b0))
            sub = rows[b0 : min(b0 + first + W1, c1)]
            pending.append((b0, first, Request(
                "ld_pair_sums",
                params={"n_first": first, "window": window, "missing": missing},
                per_site_arrays=_site_arrays(aln, sub),
            )))
    while pending:
        group, size = [], 0
        while pending and (not group or size + pending[0][1] <= block):
            group.append(pending.pop(0))
            size += group[-1][1]
        replies = traffic.query_many("ld_prune", [req for _, _, req in group])
        for (b0, first, _), rep in zip(group, replies):
            pair_sums[b0 : b0 + first] = _total(rep, "pairs", dtype=dtype)
    exceeds = pcastats.ld_pair_r2_exceeds(pair_sums, r2)
    # pairs across contigs never share a window; mask them anyway
    same = np.zeros_like(exceeds)
    for d in range(1, W1 + 1):
        same[: n - d, d - 1] = chrom[: n - d] == chrom[d:]
    exceeds &= same
    f, _ = variant_alt_freq(np.asarray(counts)[rows])
    major = np.maximum(f, 1 - f)
    mono = pcastats.variant_monomorphic_for_ld(np.asarray(counts)[rows])
    keep = pcastats.ld_prune_pairwise(exceeds, chrom.tolist(), major, window=window, step=step, drop=mono)
    return rows[keep]


# --------------------------------------------------------------------------- the PCA


def _gram_product(
    traffic: _Traffic,
    study_id: str,
    rnd: int,
    basis: np.ndarray,
    freq: np.ndarray,
    blocks: list[slice],
    per_block: list[dict[str, dict[str, np.ndarray]]],
) -> np.ndarray:
    """``Σ_sites Z_s Z_sᵀ Q``: one request when the variants fit one block, else the sites
    accumulate ``Z_bᵀ Q_b`` over ``project`` blocks and return ``Z_b H`` per ``product`` block."""
    if len(blocks) == 1:
        req = Request("pca_product", arrays={"freq": freq, "basis": basis}, per_site_arrays=per_block[0])
        return _total(traffic.query("svd", req), "product")
    common = {"study_id": study_id, "round": rnd, "n_blocks": len(blocks)}
    for b, sl in enumerate(blocks):
        req = Request("pca_product", params={**common, "phase": "project", "block": b},
                      arrays={"freq": freq[sl], "basis": basis[sl]}, per_site_arrays=per_block[b])
        traffic.query("svd", req)
    out = np.empty_like(basis)
    for b, sl in enumerate(blocks):
        req = Request("pca_product", params={**common, "phase": "product", "block": b},
                      arrays={"freq": freq[sl]}, per_site_arrays=per_block[b])
        out[sl] = _total(traffic.query("svd", req), "product")
    return out


def run_pca(
    ctx: Any,
    aln: Alignment,
    counts: np.ndarray,
    qc_pass: np.ndarray,
    out_dir: Path,
    *,
    info: Mapping[str, Reply] | None = None,
) -> dict[str, Any]:
    """Federated PCA of the study (``ctx.plan["pca"]`` settings); writes ``pca.eigenval``,
    ``pca.variants.tsv`` and ``plots/pca_sites.png`` into ``out_dir`` and has every site store
    its samples' scores under ``ctx.plan["study_id"]``. Returns the manifest summary.

    ``info`` (the ``site_info`` replies) lets the genome build be recognised from the sites'
    contig lengths (for ``build: auto``).
    """
    t0 = time.perf_counter()
    plan = ctx.plan
    cfg = pca_settings(plan.get("pca"), pcs=plan.get("pcs"))
    study_id = str(plan.get("study_id") or uuid.uuid4().hex)
    out_dir = Path(out_dir)
    traffic = _Traffic(ctx)
    k = cfg["k"]
    notes: list[str] = []

    build, note = resolve_build(cfg["build"], cfg["exclude_long_range_ld"], info)
    notes.append(note)
    rows, selection = select_pca_variants(aln, counts, qc_pass, maf=cfg["maf"], build=build)
    block_rows = int(plan.get("block_size") or 65536)
    if cfg["ld_prune"]:
        lp = cfg["ld_prune"]
        with ctx.timed("pca_ld_prune"):
            rows = federated_ld_prune(traffic, aln, counts, rows, block=block_rows, missing=ctx.plan.get("missing", "impute"), **lp)
        selection["ld_pruned_kept"] = len(rows)
        log.info("PCA: LD pruning (window %d, step %d, r2 %g) kept %d of %d candidates",
                 lp["window"], lp["step"], lp["r2"], len(rows), selection["candidates"])
    M = len(rows)
    n_total = int(np.asarray(counts)[0].sum()) if len(counts) else 0
    if M < k or M < 2:
        raise FedgenError(f"PCA: only {M} variants left after selection; need at least k = {k}")
    if n_total <= k:
        raise FedgenError(f"PCA: {n_total} samples cannot give {k} principal components")
    drv = pcastats.BlockKrylovPCA(M, k, block=cfg["block"], seed=cfg["seed"], tol=cfg["tol"], max_rounds=cfg["max_rounds"])
    f, _ = variant_alt_freq(np.asarray(counts)[rows])
    freq = np.nan_to_num(f, nan=0.0)
    blocks = [slice(b, min(b + block_rows, M)) for b in range(0, M, block_rows)]
    per_block = [_site_arrays(aln, rows[sl]) for sl in blocks]
    log.info("PCA: %d variants (%d block(s)), %d samples, k = %d, basis of %d columns per round",
             M, len(blocks), n_total, k, drv.block)
    from fedgen.progress import Progress

    progress = Progress("PCA", None, unit="rounds")
    with ctx.timed("pca_svd"):
        while not drv.done:
            drv.update(_gram_product(traffic, study_id, drv.rounds, drv.basis, freq, blocks, per_block))
            progress.update(drv.rounds)
    theta = drv.eigenvalues
    if not np.all(theta > 0):
        raise FedgenError("PCA: the genotype matrix has fewer than k non-zero singular values")
    eigenval = pcastats.plink_eigenvalues(theta, M)
    log.info("PCA: eigenvalues %s after %d rounds (%s; max relative residual %.1e)",
             ", ".join(format_g6(eigenval[: min(k, 6)])), drv.rounds,
             "converged" if drv.converged else "round limit reached", float(drv.relative_residuals.max()))
    if not drv.converged:
        notes.append(f"PCA stopped at the round limit ({cfg['max_rounds']}); max relative residual "
                     f"{float(drv.relative_residuals.max()):.2e}")
    files = []
    atomic_write_text(out_dir / "pca.eigenval", "\n".join(format_g6(eigenval)) + "\n")
    files.append("pca.eigenval")
    write_tsv(
        out_dir / "pca.variants.tsv",
        ["#CHROM", "POS", "ID", "REF", "ALT", "ALT_FREQ"],
        [aln.chrom[rows].tolist(), aln.pos[rows], aln.ids[rows].tolist(), aln.ref[rows].tolist(), aln.alt[rows].tolist(), freq],
    )
    files.append("pca.variants.tsv")

    with ctx.timed("pca_scores"):
        n_bins_1d = int(min(100_000, max(50, np.ceil(8 * np.sqrt(n_total)))))
        loadings = drv.loadings
        for b, sl in enumerate(blocks):  # the sites accumulate Z_bᵀU_b; the last block finishes
            req = Request(
                "pca_scores",
                params={
                    "study_id": study_id,
                    "block": b,
                    "n_blocks": len(blocks),
                    "n_variants": M,
                    "theta": theta.tolist(),
                    "eigenvalues": eigenval.tolist(),
                    "hist": {"pcs": min(k, 4), "bins": n_bins_1d, "lo": -1.0, "hi": 1.0, "min_count": cfg["min_cell"]},
                    "local_plot": cfg["local_plot"],
                },
                arrays={"freq": freq[sl], "loadings": loadings[sl]},
                per_site_arrays=per_block[b],
            )
            replies = traffic.query("scores", req)
    sums = _total(replies, "sums")
    n_sites = {s: int(r.meta.get("n_samples", 0)) for s, r in replies.items()}
    mean = sums[:, 0] / n_total
    sd = np.sqrt(np.maximum(sums[:, 1] - n_total * mean * mean, 0.0) / max(n_total - 1, 1))
    norm_err = float(np.max(np.abs(sums[:, 1] - 1.0)))
    if norm_err > 1e-6:
        notes.append(f"PC score vectors deviate from unit norm by up to {norm_err:.1e}")

    refusing = ctx.sites_not_allowing("pca_histograms")
    if refusing or any("hist1d" not in r.arrays for r in replies.values()):
        note = (f"per-site PC histograms (plots/pca_sites.png) skipped: the policy of site(s) {', '.join(refusing)} does "
                "not allow pca_histograms")
        notes.append(note)
        log.info(note)
        plot_files, hist_summary = [], None
    else:
        plot_files, hist_summary = _site_histograms(traffic, ctx, replies, study_id, k, n_total, cfg, eigenval, out_dir)
    files += plot_files
    summary = {
        "study_id": study_id,
        "k": k,
        "eigenvalues": [float(x) for x in eigenval],
        "variants_used": M,
        "samples": n_total,
        "samples_per_site": n_sites,
        "selection": selection,
        "ld_prune": cfg["ld_prune"],
        "settings": {key: cfg[key] for key in ("maf", "seed", "tol", "max_rounds", "min_cell")},
        "basis_columns": drv.block,
        "svd_iterations": drv.rounds,
        "variant_blocks": len(blocks),
        "converged": bool(drv.converged),
        "max_relative_residual": float(drv.relative_residuals.max()),
        "rounds": {**traffic.rounds, "total": int(sum(traffic.rounds.values()))},
        "bytes_sent_by_site": traffic.sent,
        "bytes_received_by_site": traffic.received,
        "pc_moments": {"mean": mean.tolist(), "sd": sd.tolist()},
        "scores_at_sites": f"<state_dir>/pca/{study_id}.eigenvec",
        "histograms": hist_summary,
        "files": files,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    ctx.notes.extend(f"PCA: {n}" for n in notes if not n.startswith("long-range LD regions of"))
    return summary


def _hist_ranges(replies: Mapping[str, Reply], n_total: int, n_pc: int, *, tail: float = 0.002) -> list[tuple[float, float]]:
    """Per PC, the plot range: the central ``1 - 2·tail`` of the visible (not suppressed)
    pooled 1-D histogram counts, widened by 10 % on each side."""
    hist = _total(replies, "hist1d", dtype=np.int64)
    nb = hist.shape[1]
    edges = np.linspace(-1.0, 1.0, nb + 1)
    out = []
    for j in range(n_pc):
        c = hist[j]
        if c.sum() == 0:
            lo, hi = -4 / np.sqrt(n_total), 4 / np.sqrt(n_total)
        else:
            cum = np.cumsum(c) / c.sum()
            lo = edges[int(np.searchsorted(cum, tail, side="left"))]
            hi = edges[int(np.searchsorted(cum, 1 - tail, side="left")) + 1]
        pad = 0.1 * (hi - lo)
        out.append((float(lo - pad), float(hi + pad)))
    return out


def site_hist_bins(n_samples: int, max_bins: int) -> int:
    """Bins per axis of a site's 2-D histogram: ~sqrt(n) (8..max_bins), so that a site's
    samples are not spread over cells that would all fall under the small-cell limit."""
    return int(np.clip(np.sqrt(max(n_samples, 1)), 8, max_bins))


def _site_histograms(traffic, ctx, score_replies, study_id, k, n_total, cfg, eigenval, out_dir: Path):
    pairs = [(a, a + 1) for a in (0, 2) if a + 1 < min(k, 4)]
    if not pairs:
        return [], {}
    ranges = _hist_ranges(score_replies, n_total, min(k, 4))
    n_by_site = {s: int(r.meta.get("n_samples", 0)) for s, r in score_replies.items()}
    with ctx.timed("pca_histograms"):
        req = Request(
            "pca_histograms",
            params={
                "study_id": study_id,
                "pairs": [list(p) for p in pairs],
                "ranges": [[list(ranges[a]), list(ranges[b])] for a, b in pairs],
                "bins": {s: site_hist_bins(n, cfg["hist_bins"]) for s, n in n_by_site.items()},
                "min_count": cfg["min_cell"],
            },
        )
        replies = traffic.query("histograms", req)
    hists = {s: np.asarray(r.arrays["hist2d"], dtype=np.int64) for s, r in replies.items()}
    n_site = {s: int(r.meta.get("n_samples", 0)) for s, r in replies.items()}
    shown = {s: int(h.sum()) for s, h in hists.items()}
    path = plot_site_histograms(
        hists, pairs, [(ranges[a], ranges[b]) for a, b in pairs], out_dir / "plots" / "pca_sites.png",
        eigenvalues=eigenval, n_samples=n_site, min_cell=cfg["min_cell"],
    )
    return [f"plots/{path.name}"], {"pairs": [[a + 1, b + 1] for a, b in pairs],
                                    "bins": {s: int(h.shape[1]) for s, h in hists.items()},
                                    "samples_shown": shown, "samples_hidden": {s: n_site[s] - shown[s] for s in hists}}


# --------------------------------------------------------------------------- plot

def _box_smooth(H: np.ndarray) -> np.ndarray:
    """3 x 3 moving average (zero padding) of a 2-D histogram, for the plot's outlines."""
    P = np.pad(H, 1)
    return sum(P[i : i + H.shape[0], j : j + H.shape[1]] for i in range(3) for j in range(3)) / 9.0


SITE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def plot_site_histograms(
    hists: Mapping[str, np.ndarray],
    pairs: list[tuple[int, int]],
    ranges: list[tuple[tuple[float, float], tuple[float, float]]],
    path: Path,
    *,
    eigenvalues: Any = (),
    n_samples: Mapping[str, int] | None = None,
    min_cell: int = 5,
) -> Path:
    """Overlay of per-site 2-D histograms (one colour per site, opacity ~ sqrt(count)).

    ``hists[site]`` is (pairs, bins, bins) with x along axis 1 (bins may differ by site);
    suppressed cells are 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    ev = list(np.asarray(eigenvalues, dtype=float))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.6 * len(pairs), 5.0), squeeze=False)
    handles = []
    for s_i, site in enumerate(hists):
        colour = SITE_COLOURS[s_i % len(SITE_COLOURS)]
        n = (n_samples or {}).get(site)
        handles.append(Patch(color=colour, alpha=0.7, label=f"{site}" + (f" (n={n})" if n else "")))
    for ax, i, (a, b), (rx, ry) in zip(axes[0], range(len(pairs)), pairs, ranges):
        for s_i, (site, h) in enumerate(hists.items()):
            H = np.asarray(h[i], dtype=float)
            if H.max() <= 0:
                continue
            rgba = np.zeros(H.shape + (4,))
            rgba[..., :3] = to_rgb(SITE_COLOURS[s_i % len(SITE_COLOURS)])
            rgba[..., 3] = 0.8 * np.sqrt(H / H.max())
            ax.imshow(np.transpose(rgba, (1, 0, 2)), origin="lower", extent=[rx[0], rx[1], ry[0], ry[1]],
                      aspect="auto", interpolation="nearest")
            xs = np.linspace(rx[0], rx[1], H.shape[0] + 1)
            ys = np.linspace(ry[0], ry[1], H.shape[1] + 1)
            smooth = _box_smooth(H)
            if np.count_nonzero(H) > 3 and smooth.max() > 0:  # outline of the site's bulk
                ax.contour(0.5 * (xs[1:] + xs[:-1]), 0.5 * (ys[1:] + ys[:-1]), smooth.T, levels=[0.3 * smooth.max()],
                           colors=[SITE_COLOURS[s_i % len(SITE_COLOURS)]], linewidths=1.2)
        ax.set_xlim(rx)
        ax.set_ylim(ry)
        ax.set_xlabel(f"PC{a + 1}" + (f" (eigenvalue {ev[a]:.3g})" if len(ev) > a else ""))
        ax.set_ylabel(f"PC{b + 1}" + (f" (eigenvalue {ev[b]:.3g})" if len(ev) > b else ""))
        ax.set_title(f"PC{a + 1} x PC{b + 1}")
    axes[0][0].legend(handles=handles, loc="best", fontsize=8)
    fig.suptitle(f"Federated PCA: per-site histograms (cells with < {min_cell} samples suppressed at the site)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os

    os.replace(tmp, path)
    return path
