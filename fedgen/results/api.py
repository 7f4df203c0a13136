"""Load a fedgen results folder into pandas DataFrames (for notebooks and scripts): ``fedgen.results.load_results``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".assoc":  # PLINK 1.9: space-aligned columns
        df = pd.read_csv(path, sep=r"\s+", na_values=["NA"])
    else:
        df = pd.read_csv(path, sep="\t", na_values=["NA", "nan"], keep_default_na=False,
                         dtype={"#CHROM": str, "ID": str, "P": str})
        df = df.rename(columns={"#CHROM": "CHROM"})
    if "P" in df.columns:  # −log10 P from the printed text: P values below 1e-308 keep their size
        from fedgen.results.plots import mlog10p_from_text

        text = df["P"].astype(str).tolist()
        df["MLOG10P"] = mlog10p_from_text(text)
        df["P"] = pd.to_numeric(df["P"], errors="coerce")
    elif "LOG10_P" in df.columns:  # written with PLINK's log10 modifier (study.glm.cols=+log10p)
        df["MLOG10P"] = pd.to_numeric(df["LOG10_P"], errors="coerce")
        df["P"] = 10.0 ** -df["MLOG10P"]
    return df


@dataclass
class Results:
    """A results folder: QC tables, association tables per phenotype, manifest, plots."""

    path: Path
    manifest: dict[str, Any]
    freq: pd.DataFrame | None = None
    missing: pd.DataFrame | None = None
    hardy: pd.DataFrame | None = None
    #: chrX Hardy–Weinberg (PLINK 2's ``.hardy.x``: females' genotypes, males' alleles)
    hardy_x: pd.DataFrame | None = None
    variants: pd.DataFrame | None = None
    glm: dict[str, pd.DataFrame] = field(default_factory=dict)
    assoc: dict[str, pd.DataFrame] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    model: dict[str, Any] | None = None
    model_card: str | None = None
    eigenval: pd.Series | None = None
    pca_variants: pd.DataFrame | None = None

    def model_curve(self) -> pd.DataFrame:
        """Per FedAvg round of the risk model: the weights' norm, the bytes each site sent and the
        evaluation on the sites' held-out people (``auc``, ``auc_se`` (noise SE), ``auc_tie_bound``,
        or ``r2``, ``r2_se``; ``n_eval``), where the study evaluated."""
        if not self.model:
            return pd.DataFrame()
        rows = []
        for r in self.model.get("training", {}).get("curve", []):
            ev = {k: r[k] for k in ("auc", "auc_se", "auc_tie_bound", "r2", "r2_se", "n_eval") if k in r}
            rows.append({"round": r["round"], "weight_norm": r["weight_norm"], **ev,
                         **{f"bytes_{s}": b for s, b in r["bytes"].items()}})
        return pd.DataFrame(rows).set_index("round") if rows else pd.DataFrame()

    def model_weights(self) -> pd.DataFrame:
        """The logistic/linear model's coefficients by feature (variants, then covariate columns)."""
        if not self.model or self.model.get("kind") != "logistic":
            return pd.DataFrame()
        names = [f"{v['chrom']}:{v['pos']}:{v['scored_allele']}" for v in self.model["variants"]]
        names += list(self.model.get("covariate_columns") or [])
        w = self.model["weights"]
        return pd.DataFrame({"feature": [*names, "(intercept)"], "weight": [*w[:-1], w[-1]]}).set_index("feature")

    def site_summary(self) -> pd.DataFrame:
        """One row per site: samples, variants, harmonisation counts, multi-allelic records split
        (``multiallelic_split``) and the biallelic variants they gave (``split_variants``), bytes
        sent, ε spent. A manifest written before fedgen split multi-allelic records has
        ``multiallelic_skipped`` (records skipped) instead; it is shown when present."""
        rows = []
        for site, s in self.manifest.get("sites", {}).items():
            h = s.get("harmonisation", {})
            rows.append(
                {
                    "site": site,
                    "samples": s.get("samples"),
                    "vcf_only_samples": s.get("vcf_only_samples"),
                    "table_only_samples": s.get("table_only_samples"),
                    "variants": s.get("variants"),
                    "shared_variants": h.get("shared"),
                    "ref_alt_swapped": h.get("ref_alt_swapped"),
                    "multiallelic_split": s.get("multiallelic_split"),  # multi-allelic records split
                    "split_variants": s.get("split_variants"),  # the biallelic variants they gave
                    "bytes_sent": s.get("bytes_sent"),
                    "epsilon_spent": s.get("epsilon_spent"),
                }
            )
            if "multiallelic_skipped" in s:  # manifests before fedgen split them: records skipped
                rows[-1]["multiallelic_skipped"] = s["multiallelic_skipped"]
        return pd.DataFrame(rows).set_index("site") if rows else pd.DataFrame()

    def privacy_spent(self) -> pd.DataFrame:
        """One row per (site, release) of a ``privacy=dp`` study: ε charged, noise, site total after.

        Empty for an exact study (nothing was noised; ε spent is 0 at every site).
        """
        rows = []
        for site, s in self.manifest.get("sites", {}).items():
            for r in s.get("privacy_releases") or []:
                events = r.get("events") or []
                rows.append(
                    {
                        "site": site,
                        "analysis": r.get("analysis"),
                        "epsilon": r.get("epsilon"),
                        "sigma": next((e.get("sigma") for e in events if e.get("type") == "gaussian"), None),
                        "l2_sensitivity": next((e.get("l2") for e in events if e.get("type") == "gaussian"), None),
                        "zcdp_rho": sum(float(e.get("rho", 0)) * int(e.get("count", 1)) for e in events if e.get("type") == "zcdp") or None,
                        "site_epsilon_after": r.get("site_epsilon_spent_after"),
                    }
                )
        return pd.DataFrame(rows)

    def top_hits(self, phenotype: str, n: int = 10) -> pd.DataFrame:
        df = self.glm[phenotype]
        return df.sort_values("MLOG10P", ascending=False).head(n)


def load_results(path: str | Path) -> Results:
    """Read every known file of a results folder."""
    p = Path(path)
    mf = p / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(f"{p}: no manifest.json (not a complete fedgen results folder)")
    res = Results(path=p, manifest=json.loads(mf.read_text()))
    for attr, name in (("freq", "freq.afreq"), ("missing", "missing.vmiss"), ("hardy", "hardy.hardy"), ("hardy_x", "hardy.x"),
                      ("variants", "variants.tsv")):
        if (p / name).exists():
            setattr(res, attr, _read(p / name))
    for f in sorted(p.glob("*.glm.*")):
        res.glm[f.name.split(".glm.")[0]] = _read(f)
    for f in sorted(p.glob("*.assoc")):
        res.assoc[f.name[: -len(".assoc")]] = _read(f)
    if (p / "pca.eigenval").exists():  # PLINK 2 --pca: one eigenvalue per line
        vals = [float(x) for x in (p / "pca.eigenval").read_text().split()]
        res.eigenval = pd.Series(vals, index=[f"PC{i + 1}" for i in range(len(vals))], name="eigenvalue")
    if (p / "pca.variants.tsv").exists():
        res.pca_variants = _read(p / "pca.variants.tsv")
    res.plots = sorted((p / "plots").glob("*.png")) if (p / "plots").exists() else []
    if (p / "model" / "model.json").exists():
        res.model = json.loads((p / "model" / "model.json").read_text())
        card = p / "model" / "card.md"
        res.model_card = card.read_text() if card.exists() else None
    return res


def load_sweep(path: str | Path) -> pd.DataFrame:
    """A ``fedgen run -m`` sweep folder: ``sweep_summary.tsv``, one row per job (overrides, results
    folder, status, headline figures), with each finished job's privacy settings from its manifest."""
    p = Path(path)
    summary = p / "sweep_summary.tsv"
    if not summary.exists():
        raise FileNotFoundError(f"{p}: no sweep_summary.tsv (not a fedgen run -m sweep folder)")
    df = pd.read_csv(summary, sep="\t", dtype={"overrides": str, "status": str, "output_dir": str})
    eps, mode = [], []
    for out, status in zip(df["output_dir"], df["status"]):
        priv: dict[str, Any] = {}
        if status == "ok" and (Path(out) / "manifest.json").exists():
            priv = json.loads((Path(out) / "manifest.json").read_text()).get("config", {}).get("privacy", {})
        mode.append(priv.get("mode"))
        eps.append(priv.get("epsilon") if priv.get("mode") == "dp" else None)
    df["privacy"] = mode
    df["epsilon"] = pd.to_numeric(pd.Series(eps, dtype=object), errors="coerce")
    return df
