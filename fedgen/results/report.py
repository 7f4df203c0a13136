"""A self-contained interactive HTML report of one results folder (``RESULTS/report.html``).

One file that opens offline: plotly.js is inlined once in the page head and every figure is a
plotly ``<div>`` using it. Contents:

* per phenotype: a Manhattan plot and a QQ plot (λGC, and λGC without PCs when the study
  adjusted for them) of −log10 P, read from the printed P text so that P values below 1e-308
  keep their size (a row with P = 1e-400 plots at 400);
* the sites: samples, variants, harmonisation counts, bytes sent, ε/δ spent;
* for ``privacy=dp`` studies: ε spent per site against the study's budget and every release;
* for studies that ran PCA: eigenvalues and the per-site PC histograms (``plots/pca_sites.png``,
  embedded). Individual PC scores never leave the sites (each keeps them in
  ``<state_dir>/pca/<study_id>.eigenvec``), so the aggregator has no per-person scatter;
* QC counts, the manifest's notes, and the provenance manifest (pretty printed, collapsed).

Large studies: every point with −log10 P > :data:`KEEP_MLOG10P` (P < 0.01) is plotted, with
its ID and P on hover, up to :data:`MAX_STRONG_POINTS` (beyond that the strongest; a null-ish
study of 10M variants has 100,000 below P = 0.01); the rest (the flat, dense bulk) are thinned
to a random sample of at most :data:`MAX_BULK_POINTS` per phenotype (seeded, so a report is
reproducible); the QQ bulk is thinned to evenly spaced quantiles. λGC and the counts are
computed from every row before thinning. The report so stays at plotly.js (~4.6 MB) plus at
most ~2.5 MB per phenotype, however many variants were tested.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedgen.stats.pvalues import p_text  # noqa: F401 - used here and by fedgen plot
import pandas as pd

from fedgen.errors import FedgenError
from fedgen.fileio import atomic_write_text

log = logging.getLogger("fedgen.results")

REPORT_NAME = "report.html"
# thinning of big studies' plots: shared with the PNG plots (fedgen.results.plots)
from fedgen.results.plots import (  # noqa: E402,F401
    KEEP_MLOG10P,
    MAX_BULK_POINTS,
    MAX_QQ_BULK_POINTS,
    MAX_STRONG_POINTS,
    qq_keep,
    thin_indices,
)

GENOME_WIDE = -np.log10(5e-8)
COLOURS = ("#1f4e79", "#7fa7d1")
SITE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


# --------------------------------------------------------------------------- tables

def _mlog10p(text: pd.Series) -> np.ndarray:
    """−log10 P of printed P values; the digits are parsed only where float() underflows."""
    from fedgen.results.plots import mlog10p_from_text

    num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=float)
    out = np.full(len(num), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        fine = np.isfinite(num) & (num > 1e-300)
        out[fine] = -np.log10(num[fine])
    tiny = np.flatnonzero(np.isfinite(num) & ~fine)
    if len(tiny):
        out[tiny] = mlog10p_from_text(text.to_numpy()[tiny])
    return out


def read_association(path: Path) -> pd.DataFrame:
    """An association table (``*.glm.*`` or PLINK 1.9 ``*.assoc``) as CHROM, POS, ID, MLOG10P
    (one row per tested variant; the ADD test only where a TEST column exists)."""
    path = Path(path)
    if path.name.endswith(".assoc"):
        df = pd.read_csv(path, sep=r"\s+", dtype=str, keep_default_na=False)
        df = df.rename(columns={"CHR": "CHROM", "SNP": "ID", "BP": "POS"})
    else:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        df = df.rename(columns={"#CHROM": "CHROM"})
        if "TEST" in df.columns:
            df = df[df["TEST"] == "ADD"]
    missing = [c for c in ("CHROM", "POS", "ID") if c not in df.columns]
    if "P" not in df.columns and "LOG10_P" not in df.columns:
        missing.append("P")
    if missing:
        raise FedgenError(f"{path}: not an association table (no {', '.join(missing)} column)")
    if "P" in df.columns:
        mlog10p = _mlog10p(df["P"].reset_index(drop=True))
    else:  # PLINK's log10 modifier: the column holds −log10 P
        mlog10p = pd.to_numeric(df["LOG10_P"], errors="coerce").to_numpy(dtype=float)
    return pd.DataFrame({
        "CHROM": df["CHROM"].astype(str).to_numpy(),
        "POS": pd.to_numeric(df["POS"], errors="coerce").fillna(-1).astype(np.int64).to_numpy(),
        "ID": df["ID"].astype(str).to_numpy(),
        "MLOG10P": mlog10p,
    })


def association_files(results_dir: Path) -> dict[str, Path]:
    """Phenotype → its association table: the regression (``*.glm.*``) when there is one, else
    the allelic test (``*.assoc``; a DP study's noisy ``*.assoc``, not its top-k table)."""
    results_dir = Path(results_dir)
    found: dict[str, Path] = {}
    for f in sorted(results_dir.glob("*.assoc")):
        if not f.name.startswith(".") and ".dp_topk" not in f.name:
            found[f.name[: -len(".assoc")]] = f
    for f in sorted(results_dir.glob("*.glm.*")):
        if not f.name.startswith("."):
            found[f.name.split(".glm.")[0]] = f
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------- figures

def _genome_x(chrom: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, list[tuple[float, str]], list[str]]:
    """Cumulative x position of each variant (contigs in karyotype order), tick positions, contig order."""
    from fedgen.cohort.contigs import contig_sort_key, harmonise_contig

    order = sorted(set(chrom.tolist()), key=lambda c: contig_sort_key(harmonise_contig(c)))
    x = np.zeros(len(pos), dtype=float)
    ticks, offset = [], 0.0
    for c in order:
        m = chrom == c
        lo, hi = pos[m].min(), pos[m].max()
        x[m] = offset + (pos[m] - lo)
        ticks.append((offset + (hi - lo + 1) / 2, c))
        offset += (hi - lo + 1) * 1.02 + 1
    return x, ticks, order


def _hover(ids: np.ndarray, chrom: np.ndarray, pos: np.ndarray, m: np.ndarray) -> list[str]:
    return [f"{i if i != '.' else ''} {c}:{p}<br>P = {p_text(v)}" for i, c, p, v in zip(ids, chrom, pos, m)]


def manhattan_figure(df: pd.DataFrame, title: str, *, max_bulk: int = MAX_BULK_POINTS):
    """Plotly Manhattan plot of an association table (:func:`read_association`), thinned."""
    import plotly.graph_objects as go

    m_all = df["MLOG10P"].to_numpy(dtype=float)
    strong, bulk = thin_indices(m_all, max_bulk=max_bulk)
    chrom_all = df["CHROM"].to_numpy().astype(str)
    x_all, ticks, order = _genome_x(chrom_all, df["POS"].to_numpy())
    shown = m_all[np.concatenate([strong, bulk])]
    finite_max = float(shown[np.isfinite(shown)].max()) if np.isfinite(shown).any() else GENOME_WIDE
    even_all = np.isin(chrom_all, order[::2])
    fig = go.Figure()
    for rows, hover in ((bulk, False), (strong, True)):  # bulk first: the strong points are drawn on top
        m = m_all[rows]
        y = np.round(np.where(np.isinf(m), finite_max * 1.05 + 1, m), 4)  # P printed as 0: drawn above the top
        for k, sel in enumerate((even_all[rows], ~even_all[rows])):
            if not sel.any():
                continue
            r = rows[sel]
            trace = {"x": np.round(x_all[r]).astype(np.int64).tolist(), "y": y[sel].tolist(), "mode": "markers",
                     "marker": {"size": 4, "color": COLOURS[k]}, "showlegend": False}
            if hover:
                trace.update(text=_hover(df["ID"].to_numpy().astype(str)[r], chrom_all[r], df["POS"].to_numpy()[r], m[sel]),
                             hovertemplate="%{text}<extra></extra>")
            else:
                trace.update(hovertemplate="−log10 P = %{y:.2f}<extra></extra>")
            fig.add_trace(go.Scattergl(**trace))
    fig.add_hline(y=GENOME_WIDE, line={"color": "red", "width": 1, "dash": "dash"})
    thinned = int(np.count_nonzero(~np.isnan(m_all))) - len(strong) - len(bulk)
    fig.update_layout(
        title=f"{title}: Manhattan plot" + (f" ({thinned:,} weaker points not drawn)" if thinned > 0 else ""),
        xaxis={"tickmode": "array", "tickvals": [t for t, _ in ticks], "ticktext": [c for _, c in ticks],
               "title": "chromosome", "showgrid": False},
        yaxis={"title": "−log10(P)", "rangemode": "tozero"}, height=420, margin={"t": 50, "l": 60, "r": 20, "b": 50},
        template="plotly_white",
    )
    return fig


def qq_figure(df: pd.DataFrame, title: str, *, lambda_without_pcs: float | None = None,
              max_bulk: int = MAX_QQ_BULK_POINTS):
    """Plotly QQ plot with λGC (from every row; the bulk is thinned to evenly spaced quantiles)."""
    import plotly.graph_objects as go

    from fedgen.results.plots import lambda_gc

    m = df["MLOG10P"].to_numpy(dtype=float)
    obs = np.sort(m[np.isfinite(m) | np.isinf(m)])[::-1]
    lam = lambda_gc(mlog10p=obs)
    n = len(obs)
    exp = -np.log10((np.arange(1, n + 1) - 0.5) / max(n, 1))
    keep = qq_keep(exp, obs, max_bulk=max_bulk)
    finite_max = float(obs[np.isfinite(obs)].max()) if np.isfinite(obs).any() else 1.0
    y = np.where(np.isinf(obs[keep]), finite_max * 1.05 + 1, obs[keep])
    lim = float(exp.max()) if n else 1.0
    lam_text = f"λGC = {lam:.3f}" + (f" (without PCs {lambda_without_pcs:.3f})" if lambda_without_pcs is not None else "")
    fig = go.Figure()
    fig.add_trace(go.Scattergl(x=exp[keep].tolist(), y=y.tolist(), mode="markers", marker={"size": 4, "color": "#333333"},
                               name="variants", hovertemplate="expected %{x:.2f}<br>observed %{y:.2f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, lim], y=[0, lim], mode="lines", line={"color": "red", "width": 1}, name="y = x",
                             hoverinfo="skip"))
    fig.update_layout(title=f"{title}: QQ plot, {lam_text}", xaxis={"title": "expected −log10(P)"},
                      yaxis={"title": "observed −log10(P)"}, height=420, width=480, showlegend=False,
                      template="plotly_white", margin={"t": 50, "l": 60, "r": 20, "b": 50})
    return fig, lam


def epsilon_figure(manifest: dict[str, Any]):
    import plotly.graph_objects as go

    sites = manifest.get("sites") or {}
    names = list(sites)
    eps = [float(sites[s].get("epsilon_spent") or 0.0) for s in names]
    for d in manifest.get("dropped") or []:  # a site that dropped out spent ε before it did
        names.append(f"{d['site']} (dropped)")
        eps.append(float(d.get("epsilon_spent") or 0.0))
    fig = go.Figure(go.Bar(x=names, y=eps, marker={"color": [SITE_COLOURS[i % len(SITE_COLOURS)] for i in range(len(names))]},
                           text=[f"ε = {e:.3g}" for e in eps], textposition="outside", name="ε spent"))
    budget = (manifest.get("privacy") or {}).get("epsilon")
    if budget:
        fig.add_hline(y=float(budget), line={"color": "red", "dash": "dash"}, annotation_text=f"study ε = {budget}")
    fig.update_layout(title="ε spent by this study at each site (releases composed)", yaxis={"title": "ε"},
                      xaxis={"title": "site"}, height=360, width=520, template="plotly_white")
    return fig


def scree_figure(eigenvalues: list[float]):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[f"PC{i + 1}" for i in range(len(eigenvalues))], y=list(eigenvalues), marker={"color": "#3b6ea8"}))
    fig.update_layout(title="PCA eigenvalues", yaxis={"title": "eigenvalue"}, height=320, width=520, template="plotly_white")
    return fig


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em} th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f5f8} td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:12px;overflow:auto;font-size:0.8em;max-height:600px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .muted{color:#666;font-size:0.9em}
details summary{cursor:pointer;font-weight:600}
"""


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _table(header: list[str], rows: list[list[Any]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.4g}" if np.isfinite(v) else "NA"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return v


def _div(fig, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id, config={"displaylogo": False})


def _site_rows(manifest: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["site", "samples", "variants", "shared variants", "REF/ALT swapped", "multi-allelic records split",
              "split variants", "bytes sent", "messages", "ε spent", "δ spent"]
    rows = []
    for site, s in (manifest.get("sites") or {}).items():
        h = s.get("harmonisation") or {}
        rows.append([site, s.get("samples"), s.get("variants"), h.get("shared"), h.get("ref_alt_swapped"),
                     # a manifest from before multi-allelic records were split: "N skipped"
                     s.get("multiallelic_split", None if s.get("multiallelic_skipped") is None
                           else f"{s['multiallelic_skipped']} skipped"),
                     s.get("split_variants"), s.get("bytes_sent"), s.get("messages"), s.get("epsilon_spent"),
                     s.get("delta_spent")])
    return header, rows


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def render_report(results_dir: Path, manifest: dict[str, Any]) -> str:
    """The report's HTML text (see the module docstring)."""
    import plotly.offline

    from fedgen.results import Results

    results_dir = Path(results_dir)
    divs: list[str] = []  # body sections
    n_figs = 0
    title = f"fedgen study report: {manifest.get('study', 'study')}"
    divs.append(f"<h1>{_esc(title)}</h1>")
    divs.append(f'<p class="muted">study id {_esc(manifest.get("study_id"))} · finished {_esc(manifest.get("finished"))} · '
                f'federation {_esc(manifest.get("federation"))} · privacy {_esc((manifest.get("privacy") or {}).get("mode", "none"))} · '
                f'fedgen {_esc((manifest.get("versions") or {}).get("fedgen"))} · genome build '
                f'{_esc(manifest.get("genome_build") or "unknown")}</p>')

    # sites
    header, rows = _site_rows(manifest)
    divs.append('<h2 id="sites">Sites</h2>')
    divs.append(_table(header, rows, cls="sites"))
    divs.append(f'<p class="muted">{_fmt(int(manifest.get("samples_total") or 0))} samples in total; '
                f'{_fmt(int((manifest.get("variants") or {}).get("study") or 0))} variants shared by all sites.</p>')
    qc = manifest.get("qc") or {}
    if qc:
        filt = ", ".join(f"{k} {v}" for k, v in (qc.get("filters") or {}).items() if v is not None) or "none"
        qrows = [[k, v] for k, v in qc.items() if k != "filters"]
        divs.append(f"<h3>QC</h3><p class='muted'>filters: {_esc(filt)}</p>" + _table(["", "variants"], qrows))

    # association
    files = association_files(results_dir)
    assoc_meta = manifest.get("association") or {}
    if files:
        divs.append('<h2 id="association">Association</h2>')
        divs.append(f'<p class="muted">−log10 P from the printed P values (P below 1e-308 kept). Every point with '
                    f'P &lt; 0.01 is drawn (at most the {MAX_STRONG_POINTS:,} strongest); at most {MAX_BULK_POINTS:,} of '
                    f'the rest per phenotype (random, seeded) '
                    f'and {MAX_QQ_BULK_POINTS:,} QQ quantiles. Dashed line: P = 5e-8.</p>')
    for pheno, path in files.items():
        df = read_association(path)
        meta = assoc_meta.get(pheno) or {}
        slug = _slug(pheno)
        divs.append(f'<h3 id="pheno-{slug}">{_esc(pheno)} <span class="muted">({_esc(path.name)}; '
                    f'{_esc(meta.get("kind", ""))}; {int(np.isfinite(df["MLOG10P"]).sum()):,} tested)</span></h3>')
        if not len(df):
            divs.append("<p>no rows</p>")
            continue
        divs.append(_div(manhattan_figure(df, pheno), f"manhattan-{slug}"))
        qq, lam = qq_figure(df, pheno, lambda_without_pcs=meta.get("lambda_gc_without_pcs"))
        top = df.assign(_o=-df["MLOG10P"].fillna(-np.inf)).sort_values("_o", kind="stable").head(10)
        top_rows = [[r.ID, r.CHROM, int(r.POS), p_text(r.MLOG10P), round(float(r.MLOG10P), 3)]
                    for r in top.itertuples() if np.isfinite(r.MLOG10P) or r.MLOG10P == np.inf]
        divs.append('<div class="row">' + _div(qq, f"qq-{slug}")
                    + f'<div><p><b>λGC = {lam:.4f}</b></p><p>Top hits</p>'
                    + _table(["ID", "CHROM", "POS", "P", "−log10 P"], top_rows, cls="tophits") + "</div></div>")
        n_figs += 2

    # privacy
    if (manifest.get("privacy") or {}).get("mode") == "dp":
        divs.append('<h2 id="privacy">Differential privacy: ε spent</h2>')
        divs.append(_div(epsilon_figure(manifest), "epsilon"))
        n_figs += 1
        spent = Results(path=results_dir, manifest=manifest).privacy_spent()
        if len(spent):
            divs.append(_table(list(spent.columns), spent.astype(object).where(spent.notna(), None).values.tolist(),
                               cls="releases"))

    # PCA
    pca = manifest.get("pca")
    if pca:
        divs.append('<h2 id="pca">PCA</h2>')
        divs.append(f'<p class="muted">{_esc(pca.get("variants_used"))} variants, {_esc(pca.get("samples"))} samples, '
                    f'k = {_esc(pca.get("k"))}. Individual PC scores stay at the sites ({_esc(pca.get("scores_at_sites"))}); '
                    'the aggregator holds per-site 2-D histograms of the scores with small cells suppressed, shown below '
                    'coloured by site.</p>')
        parts = []
        if pca.get("eigenvalues"):
            parts.append(_div(scree_figure(pca["eigenvalues"]), "pca-eigenvalues"))
            n_figs += 1
        per_site = pca.get("samples_per_site") or {}
        if per_site:
            parts.append(_table(["site", "samples with PC scores"], [[s, n] for s, n in per_site.items()]))
        divs.append('<div class="row">' + "".join(parts) + "</div>")
        png = results_dir / "plots" / "pca_sites.png"
        if png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            divs.append(f'<img alt="PC histograms by site" style="max-width:100%" src="data:image/png;base64,{data}">')

    notes = manifest.get("notes") or []
    if notes:
        divs.append('<h2 id="notes">Notes</h2><ul>' + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")

    divs.append('<h2 id="manifest">Provenance</h2>')
    divs.append("<details><summary>manifest.json</summary><pre>"
                + _esc(json.dumps(manifest, indent=2, default=str)) + "</pre></details>")

    script = f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>' if n_figs else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style>{script}</head><body>\n"
            + "\n".join(divs) + "\n</body></html>\n")


def write_report(results_dir: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write ``results_dir/report.html`` (atomically) and return its path.

    ``manifest`` is the study's manifest dict; without it ``results_dir/manifest.json`` is read.
    """
    results_dir = Path(results_dir)
    if manifest is None:
        mf = results_dir / "manifest.json"
        if not mf.exists():
            raise FedgenError(f"{results_dir}: no manifest.json (not a complete fedgen results folder)")
        manifest = json.loads(mf.read_text())
    path = results_dir / REPORT_NAME
    atomic_write_text(path, render_report(results_dir, manifest))
    return path


def write_study_report(stage: Path, manifest: dict[str, Any]) -> None:
    """At the end of a study run: write ``report.html`` into the staging folder and list it in
    ``manifest["files"]`` (before the manifest is written). A failure costs the report, not the
    study: it is logged and noted in the manifest."""
    files = manifest.setdefault("files", [])
    files.append(REPORT_NAME)
    try:
        write_report(stage, manifest)
    except Exception as exc:  # noqa: BLE001 - the results stand without their report
        files.remove(REPORT_NAME)
        note = f"report.html not written: {type(exc).__name__}: {exc}"
        log.warning(note)
        manifest.setdefault("notes", []).append(note)


# --------------------------------------------------------------------------- regional plot

_LOCUS = re.compile(r"^\s*([A-Za-z0-9_.]+):([0-9][0-9,]*)\s*$")


def parse_locus(text: str) -> tuple[str, int]:
    """``CHR:POS`` (``1:12345``, ``chr1:12,345``) → (canonical contig, position)."""
    from fedgen.cohort.contigs import harmonise_contig

    m = _LOCUS.match(str(text))
    if not m:
        raise FedgenError(f"expected a position as CHR:POS (e.g. 1:12345), got {text!r}")
    return harmonise_contig(m.group(1)), int(m.group(2).replace(",", ""))


def region_figure(df: pd.DataFrame, lead: int, *, chrom: str, title: str):
    """Plotly regional plot of the rows of ``df`` (one contig), the lead variant (row ``lead``) marked."""
    import plotly.graph_objects as go

    pos = df["POS"].to_numpy()
    m = df["MLOG10P"].to_numpy(dtype=float)
    ids = df["ID"].to_numpy().astype(str)
    top = float(np.nanmax(m[np.isfinite(m)])) if np.isfinite(m).any() else GENOME_WIDE
    y = np.where(np.isinf(m), top * 1.05 + 1, m)
    ok = np.isfinite(y)
    chroms = np.full(len(pos), chrom)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=(pos[ok] / 1e6).tolist(), y=y[ok].tolist(), mode="markers", name="variants",
                             text=_hover(ids[ok], chroms[ok], pos[ok], m[ok]), hovertemplate="%{text}<extra></extra>",
                             marker={"size": 7, "color": "#3b6ea8"}))
    fig.add_trace(go.Scatter(x=[pos[lead] / 1e6], y=[float(y[lead])], mode="markers+text", name="lead variant",
                             text=[f"{ids[lead] if ids[lead] != '.' else f'{chrom}:{pos[lead]}'} (P = {p_text(m[lead])})"],
                             textposition="top right", hovertemplate="%{text}<extra></extra>",
                             marker={"size": 13, "symbol": "diamond", "color": "#d62728", "line": {"width": 1, "color": "black"}}))
    fig.add_hline(y=GENOME_WIDE, line={"color": "red", "width": 1, "dash": "dash"})
    fig.update_layout(title=title, xaxis={"title": f"chromosome {chrom} position (Mb)"},
                      yaxis={"title": "−log10(P)", "rangemode": "tozero"}, template="plotly_white", height=450)
    return fig


def plot_region(results_dir: str | Path, locus: str, *, phenotype: str | None = None, window: int = 500_000,
                out: str | Path | None = None) -> dict[str, Any]:
    """Regional plot of −log10 P within ``window`` bp either side of ``locus`` (``CHR:POS``, which
    must have a result): a PNG (matplotlib) and an interactive HTML (plotly, self-contained).

    ``phenotype`` defaults to the phenotype with the smallest P at ``locus``. ``out`` is the
    output path without (or with) a ``.png``/``.html`` suffix; default
    ``RESULTS/plots/region_<phenotype>_<chr>_<pos>``. Returns the phenotype, lead variant and paths.
    """
    import plotly.io as pio

    from fedgen.cohort.contigs import harmonise_contig
    from fedgen.results.plots import regional_plot

    results_dir = Path(results_dir)
    chrom, pos = parse_locus(locus)
    if window < 0:
        raise FedgenError(f"--window must be >= 0, got {window}")
    if not results_dir.is_dir():
        raise FedgenError(f"{results_dir}: no such results folder")
    files = association_files(results_dir)
    if not files:
        raise FedgenError(f"{results_dir}: no association results (*.glm.* or *.assoc); run a study with "
                          "association analyses (assoc or glm) first")
    if phenotype is not None and phenotype not in files:
        raise FedgenError(f"phenotype {phenotype!r} has no association results in {results_dir}; "
                          f"phenotypes: {', '.join(files)}")
    candidates = {phenotype: files[phenotype]} if phenotype is not None else files
    best: tuple[float, str, pd.DataFrame, int] | None = None
    for ph, path in candidates.items():
        df = read_association(path)
        df = df[np.array([harmonise_contig(c) for c in df["CHROM"]]) == chrom].reset_index(drop=True)
        m = df["MLOG10P"].to_numpy(dtype=float)
        at = np.flatnonzero((df["POS"].to_numpy() == pos) & ~np.isnan(m))
        if len(at):
            i = int(at[np.argmax(m[at])])
            if best is None or m[i] > best[0]:
                best = (float(m[i]), ph, df, i)
    if best is None:
        which = f"phenotype {phenotype}" if phenotype is not None else "any phenotype"
        raise FedgenError(f"no association result at {chrom}:{pos} for {which} in {results_dir}"
                          + _nearest_note(results_dir, candidates, chrom, pos))
    _, ph, df, lead = best
    p = df["POS"].to_numpy()
    sel = np.flatnonzero((p >= pos - window) & (p <= pos + window))
    region = df.iloc[sel].reset_index(drop=True)
    lead = int(np.flatnonzero(sel == lead)[0])
    title = (f"{ph}: {chrom}:{max(pos - window, 0):,}-{pos + window:,}, lead "
             f"{region['ID'].iloc[lead] if region['ID'].iloc[lead] != '.' else f'{chrom}:{pos}'} "
             f"(P = {p_text(region['MLOG10P'].iloc[lead])})")
    if out is None:
        base = results_dir / "plots" / f"region_{_slug(ph)}_{_slug(chrom)}_{pos}"
    else:
        base = Path(out)
        if base.suffix.lower() in (".png", ".html"):
            base = base.with_suffix("")
    png = regional_plot(region["POS"].to_numpy(), region["MLOG10P"].to_numpy(), lead, chrom=chrom, title=title,
                        out=base.with_name(base.name + ".png"),
                        labels=[i if i != "." else f"{chrom}:{q}" for i, q in zip(region["ID"], region["POS"])])
    html_path = base.with_name(base.name + ".html")
    atomic_write_text(html_path, pio.to_html(region_figure(region, lead, chrom=chrom, title=title),
                                             include_plotlyjs=True, full_html=True, config={"displaylogo": False}))
    return {"phenotype": ph, "chrom": chrom, "pos": pos, "id": str(region["ID"].iloc[lead]),
            "mlog10p": float(region["MLOG10P"].iloc[lead]), "variants": len(region), "png": png, "html": html_path}


def _nearest_note(results_dir: Path, files: dict[str, Path], chrom: str, pos: int) -> str:
    """'; nearest tested positions: …' from the first table, or a hint that the contig has none."""
    from fedgen.cohort.contigs import harmonise_contig

    df = read_association(next(iter(files.values())))
    df = df[~np.isnan(df["MLOG10P"].to_numpy(dtype=float))]
    on = df[np.array([harmonise_contig(c) for c in df["CHROM"]], dtype=object) == chrom] if len(df) else df
    if not len(on):
        contigs = sorted(set(df["CHROM"]))
        return f"; contig {chrom} has no tested variants (contigs: {', '.join(contigs[:30])})"
    near = on.iloc[np.argsort(np.abs(on["POS"].to_numpy() - pos), kind="stable")[:3]]
    return "; nearest tested positions: " + ", ".join(f"{c}:{q}" for c, q in zip(near["CHROM"], near["POS"]))
