"""Plots from a results folder (matplotlib, Agg backend; PNG files under ``plots/``)."""

from __future__ import annotations

from pathlib import Path

from typing import Any

import numpy as np


#: points at or below this −log10 P may be thinned in the Manhattan and QQ plots
KEEP_MLOG10P = 2.0
#: at most this many points with −log10 P > KEEP_MLOG10P per Manhattan plot (the strongest)
MAX_STRONG_POINTS = 30_000
#: at most this many of the other points per Manhattan plot (a random sample)
MAX_BULK_POINTS = 20_000
#: at most this many thinned points per QQ plot
MAX_QQ_BULK_POINTS = 2_000


def thin_indices(m: np.ndarray, *, keep_above: float = KEEP_MLOG10P, max_strong: int = MAX_STRONG_POINTS,
                 max_bulk: int = MAX_BULK_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows to plot, as (strong, bulk) row indices (each sorted).

    Strong: every row with −log10 P > ``keep_above``, or the ``max_strong`` strongest of them
    when there are more (a large null-ish study has 1 % of its variants below P = 0.01). Bulk:
    a seeded random sample of at most ``max_bulk`` of the other rows with a P value."""
    has_p = ~np.isnan(m)
    strong = np.flatnonzero(has_p & (m > keep_above))
    if len(strong) > max_strong:
        strong = np.sort(strong[np.argsort(-m[strong], kind="stable")[:max_strong]])
    rest = np.ones(len(m), bool)
    rest[strong] = False
    bulk = np.flatnonzero(has_p & rest)
    if len(bulk) > max_bulk:
        bulk = np.sort(np.random.default_rng(seed).choice(bulk, max_bulk, replace=False))
    return strong, bulk


def qq_keep(exp: np.ndarray, obs: np.ndarray, *, max_bulk: int = MAX_QQ_BULK_POINTS) -> np.ndarray:
    """Points of a QQ plot to draw (sorted): every point with expected or observed −log10 P above
    ``KEEP_MLOG10P``, and at most ``max_bulk`` evenly spaced quantiles of the rest."""
    is_strong = (exp > KEEP_MLOG10P) | (obs > KEEP_MLOG10P)
    strong, bulk = np.flatnonzero(is_strong), np.flatnonzero(~is_strong)
    if len(bulk) > max_bulk:
        bulk = bulk[np.unique(np.linspace(0, len(bulk) - 1, max_bulk).round().astype(int))]
    return np.sort(np.concatenate([strong, bulk]))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mlog10p_from_text(values: Any) -> np.ndarray:
    """−log10 P from P values as printed (``"5.07596e-435"``): exact below 1e-308, where
    ``float()`` gives 0; NA/nan/empty → NaN."""
    from decimal import Decimal, InvalidOperation

    text = [str(v).strip() for v in values]
    num = np.full(len(text), np.nan)
    for i, t in enumerate(text):
        try:
            num[i] = float(t)
        except ValueError:
            pass
    out = np.full(len(text), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        fine = np.isfinite(num) & (num > 1e-300)
        out[fine] = -np.log10(num[fine])
    for i in np.flatnonzero(np.isfinite(num) & ~fine):  # tiny (or printed as 0): from the digits
        try:
            d = Decimal(text[i])
        except InvalidOperation:
            continue
        out[i] = -float(d.log10()) if d > 0 else (np.inf if d == 0 else np.nan)
    return out


def _read_column(path: Path, name: str) -> np.ndarray:
    with open(path) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        j = header.index(name)
        vals = [line.rstrip("\n").split("\t")[j] for line in fh]
    return np.array([float(v) if v not in ("NA", "nan") else np.nan for v in vals])


def qc_plots(results: Path) -> list[Path]:
    """Allele-frequency spectrum, missingness histogram and HWE QQ plot for a QC results folder."""
    plt = _plt()
    results = Path(results)
    out = results / "plots"
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    if (results / "freq.afreq").exists():
        f = _read_column(results / "freq.afreq", "ALT_FREQS")
        maf = np.minimum(f, 1 - f)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(maf[np.isfinite(maf)], bins=50, color="#3b6ea8")
        ax.set_xlabel("minor allele frequency (all sites pooled)")
        ax.set_ylabel("variants")
        ax.set_title("Minor allele frequency spectrum")
        fig.tight_layout()
        written.append(_save(fig, out / "maf_spectrum.png"))
    if (results / "missing.vmiss").exists():
        m = _read_column(results / "missing.vmiss", "F_MISS")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(m[np.isfinite(m)], bins=50, color="#a85a3b")
        ax.set_xlabel("variant missing call rate")
        ax.set_ylabel("variants")
        ax.set_yscale("log")
        ax.set_title("Variant missingness")
        fig.tight_layout()
        written.append(_save(fig, out / "variant_missingness.png"))
    if (results / "hardy.hardy").exists():
        with open(results / "hardy.hardy") as fh:
            header = fh.readline().rstrip("\n").split("\t")
            j = header.index("P")
            m = mlog10p_from_text([line.rstrip("\n").split("\t")[j] for line in fh])
        obs = np.sort(m[np.isfinite(m)])[::-1]
        if len(obs):
            exp = -np.log10((np.arange(1, len(obs) + 1) - 0.5) / len(obs))
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.scatter(exp, obs, s=4, color="#333333")
            lim = max(exp.max(), 1.0)
            ax.plot([0, lim], [0, lim], color="red", lw=1)
            ax.set_xlabel("expected -log10(P)")
            ax.set_ylabel("observed -log10(P)")
            ax.set_title("Hardy-Weinberg exact test QQ")
            fig.tight_layout()
            written.append(_save(fig, out / "hwe_qq.png"))
    return written


def _save(fig, path: Path) -> Path:
    import os

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def lambda_gc(p: np.ndarray | None = None, *, mlog10p: np.ndarray | None = None) -> float:
    """Genomic inflation λGC: median χ²₁ of the P values over its null expectation (0.4549).

    Give the P values, or ``mlog10p`` = −log10 P (which keeps P values below 1e-308).
    """
    from scipy.special import chdtri  # χ² isf; scipy.stats costs seconds to import

    if mlog10p is not None:
        m = np.asarray(mlog10p, dtype=float)
        m = m[np.isfinite(m) & (m >= 0)]
        if len(m) == 0:
            return float("nan")
        # χ² of each P (P below 1e-308 gives +inf, which the median does not mind)
        return float(np.mean(chdtri(1, 10.0 ** -_middle(m))) / CHI2_1_MEDIAN)
    p = np.asarray(p, dtype=float)
    p = p[np.isfinite(p) & (p > 0) & (p <= 1)]
    if len(p) == 0:
        return float("nan")
    return float(np.mean(chdtri(1, _middle(p))) / CHI2_1_MEDIAN)


#: median of χ²₁ (scipy.stats.chi2.ppf(0.5, 1))
CHI2_1_MEDIAN = 0.454936423119572714


def _middle(x: np.ndarray) -> np.ndarray:
    """The middle one (odd length) or two (even length) order statistics of ``x``: the χ² of a
    P value is monotone in it, so the median χ² is the mean χ² of these (no χ² of every row)."""
    k = len(x) // 2
    if len(x) % 2:
        return np.partition(x, k)[k : k + 1]
    return np.partition(x, [k - 1, k])[k - 1 : k + 1]


def manhattan_qq(
    chrom: np.ndarray, pos: np.ndarray, p: np.ndarray | None = None, *, title: str, out_prefix: Path,
    highlight: set[int] | None = None, mlog10p: np.ndarray | None = None,
) -> list[Path]:
    """Manhattan and QQ plots (λGC annotated) for one set of association P values.

    Give ``p`` or ``mlog10p`` (−log10 P, which keeps and plots P values below 1e-308)."""
    plt = _plt()
    from fedgen.cohort.contigs import contig_sort_key

    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)

    chrom = np.asarray(chrom).astype(str)
    pos = np.asarray(pos, dtype=np.int64)
    if mlog10p is None:
        p = np.asarray(p, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            mlog10p = np.where(np.isfinite(p) & (p > 0), -np.log10(p), np.nan)
    lp = np.asarray(mlog10p, dtype=float)
    ok = np.isfinite(lp)
    lam = lambda_gc(mlog10p=lp)
    order = sorted(set(chrom.tolist()), key=contig_sort_key)
    x = np.zeros(len(lp))
    ticks, offset = [], 0.0
    for k, c in enumerate(order):
        m = chrom == c
        span = pos[m].max() - pos[m].min() + 1 if m.any() else 1
        x[m] = offset + (pos[m] - pos[m].min())
        ticks.append((offset + span / 2, c))
        offset += span * 1.02
    strong, bulk = thin_indices(np.where(ok, lp, np.nan))  # a 1100 x 440 px PNG: the bulk is sampled
    draw = np.sort(np.concatenate([strong, bulk]))
    even = np.isin(chrom[draw], order[::2])
    fig, ax = plt.subplots(figsize=(10, 4))
    for sel, colour in ((even, "#1f4e79"), (~even, "#7fa7d1")):
        ax.scatter(x[draw[sel]], lp[draw[sel]], s=3, color=colour, rasterized=True)
    ax.axhline(-np.log10(5e-8), color="red", lw=0.8, ls="--")
    ax.set_xticks([t for t, _ in ticks], [c for _, c in ticks])
    ax.set_xlabel("chromosome")
    ax.set_ylabel("-log10(P)")
    ax.set_title(f"{title}  (λGC = {lam:.3f})")
    fig.tight_layout()
    written = [_save(fig, Path(f"{out_prefix}_manhattan.png"))]
    obs = np.sort(lp[ok])[::-1]
    if len(obs):
        exp = -np.log10((np.arange(1, len(obs) + 1) - 0.5) / len(obs))
        keep = qq_keep(exp, obs)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(exp[keep], obs[keep], s=4, color="#333333", rasterized=True)
        lim = float(exp.max())
        ax.plot([0, lim], [0, lim], color="red", lw=1)
        ax.set_xlabel("expected -log10(P)")
        ax.set_ylabel("observed -log10(P)")
        ax.set_title(f"{title} QQ  (λGC = {lam:.3f})")
        fig.tight_layout()
        written.append(_save(fig, Path(f"{out_prefix}_qq.png")))
    return written


def regional_plot(
    pos: np.ndarray, mlog10p: np.ndarray, lead: int, *, chrom: str, title: str, out: Path, labels: list[str] | None = None,
) -> Path:
    """Static regional plot: −log10 P against position (Mb) on one contig, the lead variant
    (row ``lead``) marked and labelled. P printed as 0 (−log10 P infinite) is drawn at the top."""
    plt = _plt()
    pos = np.asarray(pos, dtype=np.int64)
    lp = np.asarray(mlog10p, dtype=float)
    top = float(np.nanmax(lp[np.isfinite(lp)])) if np.isfinite(lp).any() else -np.log10(5e-8)
    y = np.where(np.isinf(lp), top * 1.05 + 1, lp)
    ok = np.isfinite(y)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter(pos[ok] / 1e6, y[ok], s=10, color="#3b6ea8", label="variants")
    ax.scatter([pos[lead] / 1e6], [y[lead]], s=70, marker="D", color="#d62728", edgecolor="black", zorder=3,
               label="lead variant")
    name = labels[lead] if labels is not None else f"{chrom}:{pos[lead]}"
    ax.annotate(name, (pos[lead] / 1e6, y[lead]), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.axhline(-np.log10(5e-8), color="red", lw=0.8, ls="--")
    ax.set_xlabel(f"chromosome {chrom} position (Mb)")
    ax.set_ylabel("-log10(P)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)
