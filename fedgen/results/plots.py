"""Plots from a results folder (matplotlib, Agg backend; PNG files under ``plots/``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
        p = _read_column(results / "hardy.hardy", "P")
        p = np.sort(p[np.isfinite(p) & (p > 0)])
        if len(p):
            exp = -np.log10((np.arange(1, len(p) + 1) - 0.5) / len(p))
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.scatter(exp, -np.log10(p), s=4, color="#333333")
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
